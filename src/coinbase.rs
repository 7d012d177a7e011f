//! The Coinbase Advanced Trade v3 REST client.
//!
//! [`CoinbaseClient`] speaks the real API (reqwest over rustls, EdDSA or ES256 JWT auth) and
//! implements [`MarketDataSource`] with one HTTP request per call, except where the exchange
//! forces more: candle ranges over [`candle_max_buckets`](CoinbaseClientBuilder::candle_max_buckets)
//! (300) buckets are split, `best_bid_ask` and the keyless `/market/products` ticker batch are
//! chunked, and accounts are paginated. Point it at the simulated exchange with
//! [`CoinbaseClientBuilder::base_url`].

pub mod auth;
mod body;
mod builder;
mod classify;
#[cfg(any(feature = "sim", feature = "proxy"))]
pub(crate) mod reply;
mod validate;
pub mod wire;

use std::{
    collections::BTreeMap,
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

pub use self::{auth::Credentials, builder::CoinbaseClientBuilder};
use crate::{
    clock::Clock,
    error::{Error, Result},
    limiter::{EndpointClass, Priority, RateLimiter},
    model::{Account, Candle, CandleRange, Granularity, ProductId, Ticker},
    retry::RetryPolicy,
    source::{MarketDataSource, distinct},
};

/// The production API host.
pub const DEFAULT_BASE_URL: &str = "https://api.coinbase.com";
/// The path prefix of every Advanced Trade v3 endpoint.
pub const API_PREFIX: &str = "/api/v3/brokerage";
/// The most candle buckets one request may span by Coinbase's documentation (`limit` "max
/// 350"): the upper bound of [`CoinbaseClientBuilder::candle_max_buckets`].
pub const MAX_CANDLES_PER_REQUEST: u32 = 350;

/// The most candle buckets one request may span as the exchange enforces it: wider windows
/// have been answered "start and end argument is invalid - number of candles requested should
/// be less than 300", and no source shows an answer of more than 300 candles (COINBASE.md
/// §1.1). The default of [`CoinbaseClientBuilder::candle_max_buckets`].
pub const OBSERVED_MAX_CANDLES_PER_REQUEST: u32 = 300;

/// The largest `limit` of one market-trades (`ticker`) request this crate sends: the
/// documentation lists no maximum, ccxt caps `fetchTrades` at 1,000 (COINBASE.md §7, an
/// unverified fact), and so does the simulated exchange.
pub const MAX_TRADES_PER_REQUEST: u32 = 1000;

/// The REST endpoints the client calls, for per-endpoint counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Endpoint {
    /// Market trades with best bid/ask (`.../products/{id}/ticker`).
    Ticker,
    /// Candles (`.../products/{id}/candles`).
    Candles,
    /// Best bid/ask of many products (`/best_bid_ask`).
    BestBidAsk,
    /// Product list (`.../products`).
    Products,
    /// One product (`.../products/{id}`).
    Product,
    /// Accounts (`/accounts`).
    Accounts,
    /// Server time (`/time`).
    Time,
    /// One product's order book (`.../product_book`).
    ProductBook,
}

impl Endpoint {
    /// Every endpoint.
    pub const ALL: [Endpoint; 8] = [
        Endpoint::Ticker,
        Endpoint::Candles,
        Endpoint::BestBidAsk,
        Endpoint::Products,
        Endpoint::Product,
        Endpoint::Accounts,
        Endpoint::Time,
        Endpoint::ProductBook,
    ];

    /// A stable snake_case name (`"best_bid_ask"`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Endpoint::Ticker => "ticker",
            Endpoint::Candles => "candles",
            Endpoint::BestBidAsk => "best_bid_ask",
            Endpoint::Products => "products",
            Endpoint::Product => "product",
            Endpoint::Accounts => "accounts",
            Endpoint::Time => "time",
            Endpoint::ProductBook => "product_book",
        }
    }

    /// How urgent a request to this endpoint is when it waits for the rate limiter: accounts
    /// (balances gate trades) [`High`](Priority::High), candles (backfill)
    /// [`Low`](Priority::Low), everything else [`Normal`](Priority::Normal).
    pub const fn priority(self) -> Priority {
        match self {
            Endpoint::Accounts => Priority::High,
            Endpoint::Candles => Priority::Low,
            Endpoint::Ticker
            | Endpoint::BestBidAsk
            | Endpoint::Products
            | Endpoint::Product
            | Endpoint::Time
            | Endpoint::ProductBook => Priority::Normal,
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// Which paths serve market data (tickers, candles, products).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MarketDataPath {
    /// Private paths when credentials are configured, public ones otherwise (default).
    #[default]
    Auto,
    /// Always the public `/market/...` paths (10 requests/s per IP, cached 1 s upstream).
    Public,
    /// Always the private paths (30 requests/s per key; requires credentials).
    Private,
    /// The private paths, with the public ones as overflow: each market-data request takes
    /// the class whose rate-limiter queue would admit it sooner, so a burst (a cold start's
    /// candle series) draws on both budgets, 24 + 8 requests/s with the default limiter
    /// instead of 24. Requires credentials; without a rate limiter it is
    /// [`Private`](MarketDataPath::Private). Public answers may be up to 1 s old (Coinbase
    /// caches them), which closed candles never notice.
    Balanced,
}

/// What one batched ticker read ([`MarketDataSource::tickers`] on a [`CoinbaseClient`], and so
/// every coordinated ticker batch) asks the exchange.
///
/// No Coinbase endpoint returns the last trade *and* the book for many products in one call:
/// `GET /market/products?product_ids=…` carries each product's last trade price,
/// `GET /best_bid_ask` only the book. The default keeps [`Ticker::price`] the last trade on
/// every path at one call per batch; a host that needs the book too pays one more call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TickerBatch {
    /// One `products?product_ids=…` call per chunk: `price` is the last trade (as on the
    /// legacy and WebSocket paths); `best_bid`/`best_ask` are `None` (this call does not carry
    /// the book). Public or private per [`MarketDataPath`]; works without a key. Default.
    #[default]
    LastTrade,
    /// One `best_bid_ask` call per chunk: the book, and `price` is the bid/ask mid, flagged
    /// [`PriceKind::Mid`](crate::PriceKind::Mid). Needs credentials.
    Book,
    /// Both calls per chunk, merged: the last trade and the book (twice the calls).
    LastTradeAndBook,
}

/// A Coinbase Advanced Trade REST client. Cheap to clone; clones share the connection pool,
/// the counters and the rate limiter.
///
/// ```no_run
/// # async fn f() -> tickshare::Result<()> {
/// use tickshare::{CoinbaseClient, Credentials, MarketDataSource};
/// let client = CoinbaseClient::builder().credentials(Credentials::from_env()?).build()?;
/// let btc = client.ticker(&"BTC-USD".parse()?).await?;
/// println!("{} {}", btc.product, btc.price);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct CoinbaseClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    http: reqwest::Client,
    base: String,
    jwt_host: String,
    creds: Option<Credentials>,
    limiter: Option<RateLimiter>,
    account_identity: Option<String>,
    private_md: bool,
    /// [`MarketDataPath::Balanced`]: market data may overflow to the public class.
    balanced_md: bool,
    best_bid_ask_chunk: usize,
    ticker_batch: TickerBatch,
    public_tickers_chunk: usize,
    candle_max_buckets: u32,
    accounts_page_limit: u32,
    retry: RetryPolicy,
    unauthorized_retry: Option<Duration>,
    /// The exchange's clock minus ours, milliseconds ([`CoinbaseClient::sync_clock`]).
    exchange_offset_ms: AtomicI64,
    /// A private request has succeeded with this key.
    key_worked: AtomicBool,
    accounts_max_pages: u32,
    /// Body size and rate-limit wait bounds (body.rs).
    limits: body::Limits,
    requests: [AtomicU64; Endpoint::ALL.len()],
    rate_limited: AtomicU64,
    failures: AtomicU64,
    clock: Clock,
}

impl fmt::Debug for CoinbaseClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoinbaseClient")
            .field("base_url", &self.inner.base)
            .field("credentials", &self.inner.creds)
            .field("private_market_data", &self.inner.private_md)
            .field("rate_limited", &self.inner.limiter.is_some())
            .finish_non_exhaustive()
    }
}

/// Request counters of a [`CoinbaseClient`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientStats {
    /// HTTP requests sent, by endpoint name.
    pub requests_by_endpoint: BTreeMap<String, u64>,
    /// All HTTP requests sent.
    pub total_requests: u64,
    /// 429 answers received.
    pub rate_limited_429: u64,
    /// Requests that ended in any other error.
    pub failures: u64,
}

impl CoinbaseClient {
    /// A builder with production defaults.
    pub fn builder() -> CoinbaseClientBuilder {
        CoinbaseClientBuilder::default()
    }

    /// The rate limiter this client draws from, if any.
    pub fn rate_limiter(&self) -> Option<&RateLimiter> {
        self.inner.limiter.as_ref()
    }

    /// The Coinbase user this client's key belongs to, if configured
    /// ([`CoinbaseClientBuilder::account_identity`]).
    pub fn account_identity(&self) -> Option<&str> {
        self.inner.account_identity.as_deref()
    }

    /// Whether credentials are configured.
    pub fn has_credentials(&self) -> bool {
        self.inner.creds.is_some()
    }

    /// The class of the endpoints that serve tickers and candles for this client (the
    /// first choice with [`MarketDataPath::Balanced`], which may overflow to the public one).
    pub fn market_data_class(&self) -> EndpointClass {
        if self.inner.private_md { EndpointClass::Private } else { EndpointClass::Public }
    }

    /// What a batched ticker read asks the exchange.
    pub fn ticker_batch(&self) -> TickerBatch {
        self.inner.ticker_batch
    }

    /// How many products one `best_bid_ask` request carries.
    pub fn best_bid_ask_chunk(&self) -> usize {
        self.inner.best_bid_ask_chunk
    }

    /// The class [`MarketDataSource::tickers`] requests go on, per [`TickerBatch`]: the
    /// market-data class for the last trades, private for the book with a key (`best_bid_ask`),
    /// public without one.
    pub fn tickers_class(&self) -> EndpointClass {
        match self.inner.ticker_batch {
            TickerBatch::LastTrade => self.market_data_class(),
            TickerBatch::Book | TickerBatch::LastTradeAndBook if self.has_credentials() => {
                EndpointClass::Private
            }
            TickerBatch::Book | TickerBatch::LastTradeAndBook => EndpointClass::Public,
        }
    }

    /// How many products one [`MarketDataSource::tickers`] request carries, per
    /// [`TickerBatch`]: the `/market/products` chunk for the last trades, the `best_bid_ask`
    /// chunk for the book (1 without a key: one ticker request per product), the smaller of the
    /// two for both.
    pub fn tickers_chunk(&self) -> usize {
        let (products, book) = (self.inner.public_tickers_chunk, self.inner.best_bid_ask_chunk);
        match self.inner.ticker_batch {
            TickerBatch::LastTrade => products,
            TickerBatch::Book if self.has_credentials() => book,
            TickerBatch::Book => 1,
            TickerBatch::LastTradeAndBook => products.min(book),
        }
    }

    /// The most candles one request may carry.
    pub fn candle_max_buckets(&self) -> u32 {
        self.inner.candle_max_buckets
    }

    /// A snapshot of the request counters.
    pub fn stats(&self) -> ClientStats {
        let mut by = BTreeMap::new();
        let mut total = 0;
        for e in Endpoint::ALL {
            let n = self.inner.requests[e.index()].load(Ordering::Relaxed);
            total += n;
            by.insert(e.as_str().to_string(), n);
        }
        ClientStats {
            requests_by_endpoint: by,
            total_requests: total,
            rate_limited_429: self.inner.rate_limited.load(Ordering::Relaxed),
            failures: self.inner.failures.load(Ordering::Relaxed),
        }
    }

    /// The class and path of the next market-data request for `rest` (a path below
    /// [`API_PREFIX`] without `/market`).
    fn md_route(&self, endpoint: Endpoint, rest: &str) -> (EndpointClass, String) {
        match self.md_class(endpoint) {
            EndpointClass::Private => (EndpointClass::Private, rest.to_string()),
            EndpointClass::Public => (EndpointClass::Public, format!("/market{rest}")),
        }
    }

    /// The client's market-data class or, with [`MarketDataPath::Balanced`], the class whose
    /// limiter would admit one more request of `endpoint`'s priority sooner
    /// ([`RateLimiter::predicted_wait`]: the requests served before it, not the bulk reads it
    /// overtakes).
    fn md_class(&self, endpoint: Endpoint) -> EndpointClass {
        let base = self.market_data_class();
        let (true, Some(limiter)) = (self.inner.balanced_md, &self.inner.limiter) else {
            return base;
        };
        let eta = |class| limiter.predicted_wait(class, endpoint.priority());
        if eta(EndpointClass::Public) < eta(EndpointClass::Private) {
            EndpointClass::Public
        } else {
            EndpointClass::Private
        }
    }

    /// One GET, with limiter, auth, retries and classification. `path` is below
    /// [`API_PREFIX`].
    async fn get(
        &self,
        endpoint: Endpoint,
        class: EndpointClass,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<Vec<u8>> {
        let inner = &self.inner;
        let full_path = format!("{API_PREFIX}{path}");
        let mut url = reqwest::Url::parse(&format!("{}{}", inner.base, full_path))
            .map_err(|_| Error::InvalidInput("request path is not valid in a URL".into()))?;
        if !query.is_empty() {
            let mut q = url.query_pairs_mut();
            for (k, v) in query {
                q.append_pair(k, v);
            }
        }
        let on_retry = |retry: u32, e: &Error, wait: Duration| {
            tracing::debug!(endpoint = endpoint.as_str(), attempt = retry, error = %e, wait_ms = wait.as_millis() as u64, "retrying");
        };
        // The last attempt's number, for the one extra attempt after a 401 below.
        let mut last = 1;
        let r = inner
            .retry
            .run(
                |n| {
                    last = n;
                    self.attempt(endpoint, class, &url, &full_path, n)
                },
                on_retry,
            )
            .await;
        match (r, inner.unauthorized_retry) {
            (Err(Error::Unauthorized(m)), Some(backoff))
                if class == EndpointClass::Private && inner.creds.is_some() =>
            {
                // A token from a clock ahead of the exchange's, or throttling answered 401
                // (both seen on Coinbase): re-read the exchange's clock; try once more, after
                // a backoff and with a fresh token, if the key has worked before or the clock
                // was off by a second or more. A key that never worked and a right clock: the
                // key is refused, and retrying would only count another failure.
                let before = self.clock_offset();
                let skewed = match Box::pin(self.sync_clock()).await {
                    Ok(after) => (after - before).abs() >= time::Duration::SECOND,
                    Err(e) => {
                        tracing::debug!(error = %e, "could not read the exchange's clock after a 401");
                        false
                    }
                };
                if !(skewed || inner.key_worked.load(Ordering::Relaxed)) {
                    return Err(Error::Unauthorized(m));
                }
                tokio::time::sleep(backoff).await;
                tracing::debug!(endpoint = endpoint.as_str(), skewed, "retrying once after 401");
                self.attempt(endpoint, class, &url, &full_path, last + 1).await
            }
            (r, _) => r,
        }
    }

    /// Read the exchange's clock (`GET /time`, public) and mint every later JWT from it: `nbf`
    /// is the system time plus the offset found. Called by the client after a 401; call it at
    /// start-up on a host whose clock may be off. Returns the offset (the exchange's clock minus
    /// this client's [`Clock`]).
    ///
    /// # Errors
    /// Transport, rate-limit, decode errors of `/time`; the offset is then left as it was.
    ///
    /// # Cancel safety
    /// Cancel safe: the offset is written only once the answer is in.
    pub async fn sync_clock(&self) -> Result<time::Duration> {
        let server = self.server_time().await?;
        // Compared with the time the answer arrived: its transit makes the offset a little
        // low, never high, so a token is never minted ahead of the exchange's clock.
        let offset = server - self.inner.clock.now_utc();
        let ms = i64::try_from(offset.whole_milliseconds()).unwrap_or(0);
        self.inner.exchange_offset_ms.store(ms, Ordering::Relaxed);
        tracing::debug!(offset_ms = ms, "exchange clock offset");
        Ok(offset)
    }

    /// The offset to the exchange's clock in use for JWTs (zero until
    /// [`sync_clock`](CoinbaseClient::sync_clock) has run).
    pub fn clock_offset(&self) -> time::Duration {
        time::Duration::milliseconds(self.inner.exchange_offset_ms.load(Ordering::Relaxed))
    }

    /// The exchange's "now" for a JWT's `nbf`, UNIX seconds (rounded down).
    fn jwt_now(&self) -> u64 {
        let ms = i128::from(auth::unix_now()) * 1000
            + i128::from(self.inner.exchange_offset_ms.load(Ordering::Relaxed));
        u64::try_from(ms.div_euclid(1000)).unwrap_or(0)
    }

    /// One HTTP request, attempt number `attempt` (1-based) of its call: the limiter admits
    /// it, it is signed and sent, and its outcome is recorded into the limiter and the
    /// counters.
    async fn attempt(
        &self,
        endpoint: Endpoint,
        class: EndpointClass,
        url: &reqwest::Url,
        path: &str,
        attempt: u32,
    ) -> Result<Vec<u8>> {
        let inner = &self.inner;
        if let Some(l) = &inner.limiter {
            l.acquire_with(class, endpoint.priority()).await?;
        }
        let mut req = inner.http.get(url.clone());
        if class == EndpointClass::Private {
            let creds = inner.creds.as_ref().ok_or_else(|| {
                Error::Unauthorized(format!(
                    "{} needs credentials; configure a CDP API key",
                    endpoint.as_str()
                ))
            })?;
            req = req.bearer_auth(creds.rest_jwt_at("GET", &inner.jwt_host, path, self.jwt_now()));
        }
        inner.requests[endpoint.index()].fetch_add(1, Ordering::Relaxed);
        // One span per HTTP request: endpoint, class, attempt (1-based, within the retry loop
        // of whichever layer owns the call), status, outcome and latency; never the URL's
        // query, a header or a token.
        let span = tracing::debug_span!(
            "upstream_request",
            endpoint = endpoint.as_str(),
            class = class.as_str(),
            attempt,
            status = tracing::field::Empty,
            outcome = tracing::field::Empty,
            latency_ms = tracing::field::Empty,
        );
        let t0 = tokio::time::Instant::now();
        let request_span = span.clone();
        let outcome = tracing::Instrument::instrument(
            async move {
                let resp = req.send().await.map_err(classify::classify_transport)?;
                request_span.record("status", resp.status().as_u16());
                let now = u64::try_from(inner.clock.now_utc().unix_timestamp()).unwrap_or(0);
                body::read(resp, inner.limits, now).await
            },
            span.clone(),
        )
        .await;
        span.record("outcome", outcome.as_ref().err().map_or("ok", Error::kind));
        span.record("latency_ms", u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX));
        if let Some(l) = &inner.limiter {
            l.record(class, &outcome);
        }
        match &outcome {
            Ok(_) if class == EndpointClass::Private => inner.key_worked.store(true, Ordering::Relaxed),
            Ok(_) => {}
            Err(Error::RateLimited { .. }) => {
                inner.rate_limited.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                inner.failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(endpoint = endpoint.as_str(), error = %e, "request failed");
            }
        }
        outcome
    }

    /// `GET .../products/{id}/ticker?limit=1`.
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown product; [`Error::Decode`] for an answer about
    /// another product or with impossible values ([`wire`]); transport, rate-limit errors.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future abandons the request; a rate-limiter slot already
    /// admitted stays spent (the request may have left), and nothing else is changed.
    pub async fn market_trades(&self, product: &ProductId) -> Result<Ticker> {
        let (class, path) = self.md_route(Endpoint::Ticker, &format!("/products/{product}/ticker"));
        let body = self.get(Endpoint::Ticker, class, &path, &[("limit", "1".into())]).await?;
        let ticker = wire::decode_ticker(product, &body)?;
        validate::ticker_at(&ticker, self.inner.clock.now_utc())?;
        Ok(ticker)
    }

    /// `GET .../products/{id}/ticker?limit={limit}`: the product's most recent trades and its
    /// book, every trade checked ([`wire::decode_recent_trades`]).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a `limit` of 0 or over [`MAX_TRADES_PER_REQUEST`];
    /// [`Error::NotFound`] for an unknown product; [`Error::Decode`] for an answer with more
    /// trades than asked, about another product, with a duplicate trade id or impossible
    /// values, or a trade more than a day ahead of this client's clock; transport and
    /// rate-limit errors.
    ///
    /// # Cancel safety
    /// As [`market_trades`](Self::market_trades).
    pub async fn recent_trades(&self, product: &ProductId, limit: u32) -> Result<crate::RecentTrades> {
        if limit == 0 || limit > MAX_TRADES_PER_REQUEST {
            return Err(Error::InvalidInput(format!(
                "limit must be between 1 and {MAX_TRADES_PER_REQUEST}, not {limit}"
            )));
        }
        let (class, path) = self.md_route(Endpoint::Ticker, &format!("/products/{product}/ticker"));
        let body = self.get(Endpoint::Ticker, class, &path, &[("limit", limit.to_string())]).await?;
        let trades = wire::decode_recent_trades(product, limit, &body)?;
        let now = self.inner.clock.now_utc();
        trades.trades.iter().try_for_each(|t| validate::not_ahead(t.time, now, "trades[].time"))?;
        Ok(trades)
    }

    /// `GET .../product_book?product_id={id}[&limit={limit}]`: the product's order book, at
    /// most `limit` levels a side (`None`: as many as the exchange gives by default), every
    /// level checked ([`wire::decode_order_book`]). The path follows [`MarketDataPath`] as the
    /// other market-data reads do.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a `limit` of 0; [`Error::NotFound`] for an unknown product;
    /// [`Error::Decode`] for a book of another product, with more levels than asked, a side
    /// out of order or with a price twice, impossible values, or a time more than a day ahead
    /// of this client's clock; transport and rate-limit errors.
    ///
    /// # Cancel safety
    /// As [`market_trades`](Self::market_trades).
    pub async fn order_book(&self, product: &ProductId, limit: Option<u32>) -> Result<crate::OrderBook> {
        if limit == Some(0) {
            return Err(Error::InvalidInput("limit must be at least 1".into()));
        }
        let (class, path) = self.md_route(Endpoint::ProductBook, "/product_book");
        let mut query = vec![("product_id", product.to_string())];
        if let Some(l) = limit {
            query.push(("limit", l.to_string()));
        }
        let body = self.get(Endpoint::ProductBook, class, &path, &query).await?;
        let book = wire::decode_order_book(product, limit, &body)?;
        validate::not_ahead(book.time, self.inner.clock.now_utc(), "pricebook.time")?;
        Ok(book)
    }

    /// `GET /best_bid_ask` for `products`, chunked; tickers priced at the bid/ask mid.
    /// Unknown products are left out, and so are entries for products not asked for.
    ///
    /// # Errors
    /// [`Error::Unauthorized`] without credentials; [`Error::Decode`] for a chunk whose entry
    /// for an asked product is malformed, impossible or contradicted by a second entry
    /// ([`wire`]); transport, rate-limit errors.
    ///
    /// # Cancel safety
    /// Cancel safe, but not free: a dropped call abandons the request in flight and the ones it
    /// had not sent yet; the pages or chunks already received are dropped with it and the
    /// rate-limiter slots they were admitted with stay spent. Call again to start over.
    pub async fn best_bid_ask(&self, products: &[ProductId]) -> Result<Vec<Ticker>> {
        let products = distinct(products);
        let mut out = Vec::with_capacity(products.len());
        for chunk in products.chunks(self.inner.best_bid_ask_chunk) {
            let query: Vec<(&str, String)> = chunk.iter().map(|p| ("product_ids", p.to_string())).collect();
            let body =
                self.get(Endpoint::BestBidAsk, EndpointClass::Private, "/best_bid_ask", &query).await?;
            let tickers = wire::decode_best_bid_ask_for(chunk, &body)?;
            let now = self.inner.clock.now_utc();
            tickers.iter().try_for_each(|t| validate::ticker_at(t, now))?;
            out.extend(tickers);
        }
        Ok(out)
    }

    /// The last trade of each of `products`, from the product list filtered by `product_ids`
    /// (`GET /market/products?product_ids=…`, or the private `/products`, per
    /// [`MarketDataPath`]), chunked by
    /// [`public_tickers_chunk`](CoinbaseClientBuilder::public_tickers_chunk). See
    /// [`public_tickers`](CoinbaseClient::public_tickers) for what the tickers hold.
    ///
    /// # Errors
    /// As [`public_tickers`](CoinbaseClient::public_tickers).
    ///
    /// # Cancel safety
    /// As [`best_bid_ask`](CoinbaseClient::best_bid_ask).
    pub async fn last_trades(&self, products: &[ProductId]) -> Result<Vec<Ticker>> {
        self.product_tickers(products, || self.md_route(Endpoint::Products, "/products")).await
    }

    /// Last prices of `products` without a key: `GET /market/products?product_ids=A&product_ids=B…`
    /// (public), chunked by [`public_tickers_chunk`](CoinbaseClientBuilder::public_tickers_chunk),
    /// one request per chunk instead of one per product.
    ///
    /// The answer is the product list, so each ticker is what it holds: `price` is the last
    /// trade price (up to 1 s old: Coinbase caches public answers), `best_bid` and `best_ask`
    /// are `None` (the list has none), and `time` is this client's clock on arrival (the list
    /// has no time). Unknown products, and products with no last trade, are left out; see
    /// [`wire::decode_product_tickers_for`] for what else is checked.
    ///
    /// # Errors
    /// [`Error::Decode`] for a chunk whose entry for an asked product is malformed, priced at
    /// zero or less, or contradicted by a second entry; transport, rate-limit errors.
    ///
    /// # Cancel safety
    /// As [`best_bid_ask`](CoinbaseClient::best_bid_ask).
    pub async fn public_tickers(&self, products: &[ProductId]) -> Result<Vec<Ticker>> {
        self.product_tickers(products, || (EndpointClass::Public, "/market/products".to_string())).await
    }

    /// Tickers from the product list, chunked; `route` gives each request's class and path.
    async fn product_tickers(
        &self,
        products: &[ProductId],
        route: impl Fn() -> (EndpointClass, String),
    ) -> Result<Vec<Ticker>> {
        let products = distinct(products);
        let mut out = Vec::with_capacity(products.len());
        for chunk in products.chunks(self.inner.public_tickers_chunk) {
            let query: Vec<(&str, String)> = chunk.iter().map(|p| ("product_ids", p.to_string())).collect();
            let (class, path) = route();
            let body = self.get(Endpoint::Products, class, &path, &query).await?;
            out.extend(wire::decode_product_tickers_for(chunk, &body, self.inner.clock.now_utc())?);
        }
        Ok(out)
    }

    /// Candles in `range`, split into requests of at most `candle_max_buckets` buckets and
    /// merged oldest first without duplicates.
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown product; [`Error::Decode`] for impossible candles or
    /// starts off the granularity's grid ([`wire`]); transport, rate-limit errors.
    ///
    /// # Cancel safety
    /// Cancel safe, but not free: a dropped call abandons the request in flight and the ones it
    /// had not sent yet; the pages or chunks already received are dropped with it and the
    /// rate-limiter slots they were admitted with stay spent. Call again to start over.
    pub async fn candles_in(
        &self,
        product: &ProductId,
        granularity: Granularity,
        range: CandleRange,
    ) -> Result<Vec<Candle>> {
        let range = range.aligned(granularity);
        let rest = format!("/products/{product}/candles");
        let mut out: Vec<Candle> = Vec::new();
        for chunk in range.chunks(granularity, self.inner.candle_max_buckets) {
            // `end` one second before the next chunk: n buckets whether the server treats the
            // bound as inclusive or exclusive.
            let query = [
                ("start", chunk.start.unix_timestamp().to_string()),
                ("end", (chunk.end.unix_timestamp() - 1).to_string()),
                ("granularity", granularity.as_str().to_string()),
            ];
            // Chosen per request: with `MarketDataPath::Balanced` a long range spreads too.
            let (class, path) = self.md_route(Endpoint::Candles, &rest);
            let body = self.get(Endpoint::Candles, class, &path, &query).await?;
            let candles = wire::decode_candles(&body)?;
            validate::candles_at(&candles, granularity, self.inner.clock.now_utc())?;
            out.extend(candles);
        }
        out.retain(|c| range.contains(c.start));
        out.sort_by_key(|c| c.start);
        out.dedup_by_key(|c| c.start);
        Ok(out)
    }

    /// All accounts, following `cursor` while `has_next`.
    ///
    /// # Errors
    /// [`Error::Unauthorized`] without credentials; [`Error::Decode`] if the exchange repeats a
    /// cursor or an account, answers `has_next` without a cursor, or paginates past
    /// `accounts_max_pages`; transport, rate-limit, decode errors.
    ///
    /// # Cancel safety
    /// Cancel safe, but not free: a dropped call abandons the request in flight and the ones it
    /// had not sent yet; the pages or chunks already received are dropped with it and the
    /// rate-limiter slots they were admitted with stay spent. Call again to start over.
    pub async fn list_accounts(&self) -> Result<Vec<Account>> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        let mut pages = validate::AccountPages::new(self.inner.accounts_max_pages);
        loop {
            let mut query = vec![("limit", self.inner.accounts_page_limit.to_string())];
            if let Some(c) = &cursor {
                query.push(("cursor", c.clone()));
            }
            let body = self.get(Endpoint::Accounts, EndpointClass::Private, "/accounts", &query).await?;
            let (page, next) = wire::decode_accounts(&body)?;
            pages.accept(&page, next.as_deref())?;
            out.extend(page);
            match next {
                Some(c) => cursor = Some(c),
                None => return Ok(out),
            }
        }
    }

    /// The product list (ids and status), public or private per [`MarketDataPath`].
    ///
    /// # Errors
    /// Transport, rate-limit, decode errors.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future abandons the request; a rate-limiter slot already
    /// admitted stays spent (the request may have left), and nothing else is changed.
    pub async fn products(&self) -> Result<Vec<wire::Product>> {
        let (class, path) = self.md_route(Endpoint::Products, "/products");
        let body = self.get(Endpoint::Products, class, &path, &[]).await?;
        wire::decode_products(&body)
    }

    /// One product.
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown product; transport, rate-limit, decode errors.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future abandons the request; a rate-limiter slot already
    /// admitted stays spent (the request may have left), and nothing else is changed.
    pub async fn product(&self, product: &ProductId) -> Result<wire::Product> {
        let (class, path) = self.md_route(Endpoint::Product, &format!("/products/{product}"));
        let body = self.get(Endpoint::Product, class, &path, &[]).await?;
        wire::decode_product(&body)
    }

    /// The exchange's clock (`GET /time`, public).
    ///
    /// # Errors
    /// Transport, rate-limit, decode errors.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future abandons the request; a rate-limiter slot already
    /// admitted stays spent (the request may have left), and nothing else is changed.
    pub async fn server_time(&self) -> Result<OffsetDateTime> {
        let body = self.get(Endpoint::Time, EndpointClass::Public, "/time", &[]).await?;
        wire::decode_server_time(&body)
    }
}

#[async_trait]
impl MarketDataSource for CoinbaseClient {
    async fn ticker(&self, product: &ProductId) -> Result<Ticker> {
        self.market_trades(product).await
    }

    /// Per [`TickerBatch`]: by default one batched `products` request per chunk (the last
    /// trades, with or without a key); `Book` is `best_bid_ask` (needs a key; without one,
    /// it falls back to one public ticker request per product); `LastTradeAndBook` merges
    /// both. Unknown products are left out.
    async fn tickers(&self, products: &[ProductId]) -> Result<Vec<Ticker>> {
        match self.inner.ticker_batch {
            TickerBatch::LastTrade => self.last_trades(products).await,
            TickerBatch::Book if self.inner.creds.is_some() => self.best_bid_ask(products).await,
            TickerBatch::Book => {
                let mut out = Vec::new();
                for p in distinct(products) {
                    match self.market_trades(&p).await {
                        Ok(t) => out.push(t),
                        Err(Error::NotFound(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(out)
            }
            TickerBatch::LastTradeAndBook => {
                let (last, book) = tokio::join!(self.last_trades(products), self.best_bid_ask(products));
                let book = book?;
                Ok(last?
                    .into_iter()
                    .map(|mut t| {
                        if let Some(b) = book.iter().find(|b| b.product == t.product) {
                            t.best_bid = b.best_bid;
                            t.best_ask = b.best_ask;
                        }
                        t
                    })
                    .collect())
            }
        }
    }

    async fn candles(
        &self,
        product: &ProductId,
        granularity: Granularity,
        range: CandleRange,
    ) -> Result<Vec<Candle>> {
        self.candles_in(product, granularity, range).await
    }

    /// The exchange's answer, just fetched; a last candle still in progress by this client's
    /// clock is marked exact as of now.
    async fn candles_fresh(
        &self,
        product: &ProductId,
        granularity: Granularity,
        range: CandleRange,
    ) -> Result<crate::Fresh<Vec<Candle>>> {
        let value = self.candles_in(product, granularity, range).await?;
        let now = self.inner.clock.now_utc() + self.clock_offset();
        let in_progress = crate::source::fetched_in_progress(&value, granularity, now);
        Ok(crate::Fresh {
            value,
            origin: crate::Origin::Upstream,
            age: Duration::ZERO,
            in_progress,
            provisional: None,
        })
    }

    async fn accounts(&self) -> Result<Vec<Account>> {
        self.list_accounts().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_validates() {
        assert!(CoinbaseClient::builder().build().is_ok());
        assert!(matches!(CoinbaseClient::builder().base_url("ftp://x").build(), Err(Error::Config(_))));
        assert!(matches!(CoinbaseClient::builder().base_url("not a url").build(), Err(Error::Config(_))));
        assert!(matches!(CoinbaseClient::builder().best_bid_ask_chunk(0).build(), Err(Error::Config(_))));
        assert!(matches!(CoinbaseClient::builder().public_tickers_chunk(0).build(), Err(Error::Config(_))));
        assert!(matches!(CoinbaseClient::builder().account_identity(" ").build(), Err(Error::Config(_))));
        assert!(matches!(CoinbaseClient::builder().candle_max_buckets(351).build(), Err(Error::Config(_))));
        assert!(matches!(CoinbaseClient::builder().max_body_bytes(0).build(), Err(Error::Config(_))));
        assert!(matches!(CoinbaseClient::builder().accounts_max_pages(0).build(), Err(Error::Config(_))));
        assert!(matches!(
            CoinbaseClient::builder().market_data(MarketDataPath::Private).build(),
            Err(Error::Config(_))
        ));
        let c = CoinbaseClient::builder().base_url("http://127.0.0.1:18080/").build().unwrap();
        assert_eq!(c.inner.jwt_host, "127.0.0.1:18080");
        assert_eq!(c.market_data_class(), EndpointClass::Public);
        let c = CoinbaseClient::builder().credentials(Credentials::generate("k")).build().unwrap();
        assert_eq!(c.inner.jwt_host, "api.coinbase.com");
        assert_eq!(c.market_data_class(), EndpointClass::Private);
    }

    #[test]
    fn debug_hides_the_key() {
        let c = CoinbaseClient::builder()
            .credentials(Credentials::generate("organizations/o/apiKeys/k"))
            .build()
            .unwrap();
        let d = format!("{c:?}");
        assert!(d.contains("<redacted>"), "{d}");
    }
}
