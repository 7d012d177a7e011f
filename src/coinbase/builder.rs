//! Configuring a [`CoinbaseClient`]: host, timeouts, credentials, limiter, market-data paths,
//! chunk sizes, bounds on answers, retries; and `build`, which checks it all.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, AtomicU64},
    },
    time::Duration,
};

use super::{
    ClientInner, CoinbaseClient, Credentials, DEFAULT_BASE_URL, MAX_CANDLES_PER_REQUEST, MarketDataPath,
    OBSERVED_MAX_CANDLES_PER_REQUEST, TickerBatch, body,
};
use crate::{
    clock::Clock,
    error::{Error, Result},
    limiter::RateLimiter,
    retry::RetryPolicy,
};

/// Builder of a [`CoinbaseClient`].
#[must_use]
#[derive(Debug, Clone)]
pub struct CoinbaseClientBuilder {
    pub(super) base_url: String,
    pub(super) timeout: Duration,
    pub(super) connect_timeout: Duration,
    pub(super) credentials: Option<Credentials>,
    pub(super) limiter: Option<Option<RateLimiter>>,
    pub(super) account_identity: Option<String>,
    pub(super) market_data: MarketDataPath,
    pub(super) best_bid_ask_chunk: usize,
    pub(super) ticker_batch: TickerBatch,
    pub(super) public_tickers_chunk: usize,
    pub(super) candle_max_buckets: u32,
    pub(super) accounts_page_limit: u32,
    pub(super) retry: RetryPolicy,
    pub(super) unauthorized_retry: Option<Duration>,
    pub(super) accounts_max_pages: u32,
    pub(super) max_body_bytes: usize,
    pub(super) max_retry_after: Duration,
    pub(super) user_agent: String,
    pub(super) clock: Clock,
}

impl Default for CoinbaseClientBuilder {
    fn default() -> Self {
        CoinbaseClientBuilder {
            base_url: DEFAULT_BASE_URL.into(),
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            credentials: None,
            limiter: None,
            account_identity: None,
            market_data: MarketDataPath::Auto,
            best_bid_ask_chunk: 100,
            ticker_batch: TickerBatch::LastTrade,
            public_tickers_chunk: 100,
            candle_max_buckets: OBSERVED_MAX_CANDLES_PER_REQUEST,
            accounts_page_limit: 250,
            retry: RetryPolicy::none(),
            unauthorized_retry: Some(Duration::from_millis(500)),
            accounts_max_pages: 100,
            max_body_bytes: body::DEFAULT_MAX_BODY_BYTES,
            max_retry_after: body::DEFAULT_MAX_RETRY_AFTER,
            user_agent: concat!("tickshare/", env!("CARGO_PKG_VERSION")).into(),
            clock: Clock::system(),
        }
    }
}

impl CoinbaseClientBuilder {
    /// The API host, `https://api.coinbase.com` by default; `http://127.0.0.1:PORT` for the
    /// simulated exchange.
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        self.base_url = url.into();
        self
    }

    /// Total time allowed for one request, body included (default 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Time allowed to connect (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// CDP API key for private endpoints.
    pub fn credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = Some(credentials);
        self
    }

    /// Gate every HTTP request through `limiter` (and report 429s to it). Share one limiter
    /// between every client of the same Coinbase user (all its API keys: the private limit is
    /// per user) or IP. Without this call the client gets the limiter of its
    /// [`account_identity`](Self::account_identity), or else its own [`RateLimiter::coinbase`].
    pub fn rate_limiter(mut self, limiter: RateLimiter) -> Self {
        self.limiter = Some(Some(limiter));
        self
    }

    /// The Coinbase user this client's key belongs to: any stable name of the user (an email,
    /// a CDP project id), the same for all of its keys. Coinbase limits private requests per
    /// user (30/s) and requires one key per portfolio, so the clients of one user's keys must
    /// share one budget: with an identity, the client draws from
    /// [`RateLimiter::shared_for`]`(identity)`, the one limiter of that user in this process
    /// (unless [`rate_limiter`](Self::rate_limiter) or [`unlimited`](Self::unlimited) says
    /// otherwise). Across processes, give the [`SharedTier`](crate::SharedTier) the same
    /// identity. Default: none, and the client has a limiter of its own.
    ///
    /// ```
    /// # fn f() -> tickshare::Result<()> {
    /// use tickshare::{CoinbaseClient, Credentials};
    /// let main = CoinbaseClient::builder()
    ///     .credentials(Credentials::generate("organizations/o/apiKeys/main-portfolio"))
    ///     .account_identity("alice@example.com")
    ///     .build()?;
    /// let savings = CoinbaseClient::builder()
    ///     .credentials(Credentials::generate("organizations/o/apiKeys/savings-portfolio"))
    ///     .account_identity("alice@example.com")
    ///     .build()?;
    /// assert!(main.rate_limiter().unwrap().same_as(savings.rate_limiter().unwrap()));
    /// # Ok(()) }
    /// # f().unwrap();
    /// ```
    pub fn account_identity(mut self, identity: impl Into<String>) -> Self {
        self.account_identity = Some(identity.into());
        self
    }

    /// Send requests without any client-side rate limit, as the legacy code did. The exchange
    /// will answer 429 when the limit is exceeded; use only to reproduce that, or when another
    /// layer limits.
    pub fn unlimited(mut self) -> Self {
        self.limiter = Some(None);
        self
    }

    /// Which paths serve market data (default [`MarketDataPath::Auto`]).
    pub fn market_data(mut self, path: MarketDataPath) -> Self {
        self.market_data = path;
        self
    }

    /// What a batched ticker read asks the exchange (default [`TickerBatch::LastTrade`]: the
    /// last trades, one `products?product_ids=` call per chunk; see [`TickerBatch`]).
    pub fn ticker_batch(mut self, batch: TickerBatch) -> Self {
        self.ticker_batch = batch;
        self
    }

    /// How many products one `best_bid_ask` (or batched `products`) request carries.
    pub fn best_bid_ask_chunk(mut self, n: usize) -> Self {
        self.best_bid_ask_chunk = n;
        self
    }

    /// Most products per keyless ticker request (`GET /market/products?product_ids=…`, see
    /// [`CoinbaseClient::public_tickers`]); default 100, which keeps the URL near 2 KB.
    pub fn public_tickers_chunk(mut self, n: usize) -> Self {
        self.public_tickers_chunk = n;
        self
    }

    /// Most candle buckets per request: default [`OBSERVED_MAX_CANDLES_PER_REQUEST`] (300, what
    /// the exchange enforces), at most [`MAX_CANDLES_PER_REQUEST`] (350, what it documents).
    pub fn candle_max_buckets(mut self, n: u32) -> Self {
        self.candle_max_buckets = n;
        self
    }

    /// Accounts per page (default 250, the maximum).
    pub fn accounts_page_limit(mut self, n: u32) -> Self {
        self.accounts_page_limit = n;
        self
    }

    /// The most pages one accounts listing may take (default 100: 25,000 accounts at 250 per
    /// page). An exchange that keeps answering `has_next: true` past it gets
    /// [`Error::Decode`] instead of an endless loop.
    pub fn accounts_max_pages(mut self, n: u32) -> Self {
        self.accounts_max_pages = n;
        self
    }

    /// The largest response body accepted (default 4 MiB). A larger one, or an endless one, is
    /// [`Error::Decode`] and is not read further; a `Content-Length` over the limit fails
    /// before any of the body is read.
    pub fn max_body_bytes(mut self, n: usize) -> Self {
        self.max_body_bytes = n;
        self
    }

    /// The longest wait a 429's `Retry-After` or `x-ratelimit-reset` may ask for (default
    /// 60 s): longer waits are cut to this, so a bogus header cannot pause the limiter for an
    /// hour. A retry never waits longer than the [`RetryPolicy`]'s `max_wait` either.
    pub fn max_retry_after(mut self, max: Duration) -> Self {
        self.max_retry_after = max;
        self
    }

    /// Retry a failed idempotent GET up to `n` times when the error is worth it (default 0:
    /// the caller decides), with the rest of the [`RetryPolicy`] as it is. Each attempt goes
    /// through the rate limiter and gets a fresh JWT. Under a layer that retries itself (a
    /// [`CoordinatedSource`](crate::CoordinatedSource) with retries), that layer owns the call
    /// and the client makes one attempt per attempt of it.
    pub fn max_retries(mut self, n: u32) -> Self {
        self.retry.max_retries = n;
        self
    }

    /// After a 401 on a private request, re-read the exchange's clock
    /// ([`CoinbaseClient::sync_clock`]) and, if the clock was off by a second or more or the key
    /// has worked before, wait `backoff` and send once more with a fresh token (default on,
    /// 500 ms; `None` turns it off). Coinbase answers 401 for a token minted by a clock ahead of
    /// its own, and has been seen answering throttled requests 401. A key that is refused from
    /// the start costs one `/time` request before [`Error::Unauthorized`].
    pub fn unauthorized_retry(mut self, backoff: Option<Duration>) -> Self {
        self.unauthorized_retry = backoff;
        self
    }

    /// The whole retry policy of idempotent GETs (default [`RetryPolicy::none`]).
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// The clock used to read `x-ratelimit-reset` (an epoch time); default
    /// [`Clock::system`]. Give it the simulated exchange's clock in simulations.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The `User-Agent` header.
    pub fn user_agent(mut self, ua: impl Into<String>) -> Self {
        self.user_agent = ua.into();
        self
    }

    /// Build the client.
    ///
    /// # Errors
    /// [`Error::Config`] for a base URL that is not http(s), a zero chunk, page size, page count
    /// or body limit, a candle chunk over [`MAX_CANDLES_PER_REQUEST`], an empty account
    /// identity, private market data without credentials, or a TLS setup failure.
    pub fn build(self) -> Result<CoinbaseClient> {
        let base = reqwest::Url::parse(self.base_url.trim_end_matches('/'))
            .map_err(|e| Error::Config(format!("base_url is not a URL: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
            return Err(Error::Config("base_url must be http:// or https:// with a host".into()));
        }
        let mut jwt_host = base.host_str().unwrap_or_default().to_string();
        if let Some(port) = base.port() {
            jwt_host = format!("{jwt_host}:{port}");
        }
        if self.best_bid_ask_chunk == 0
            || self.public_tickers_chunk == 0
            || self.accounts_page_limit == 0
            || self.accounts_page_limit > 250
        {
            return Err(Error::Config(
                "best_bid_ask_chunk and public_tickers_chunk must be >= 1 and accounts_page_limit 1..=250"
                    .into(),
            ));
        }
        if self.accounts_max_pages == 0 || self.max_body_bytes == 0 {
            return Err(Error::Config("accounts_max_pages and max_body_bytes must be >= 1".into()));
        }
        if self.candle_max_buckets == 0 || self.candle_max_buckets > MAX_CANDLES_PER_REQUEST {
            return Err(Error::Config(format!("candle_max_buckets must be 1..={MAX_CANDLES_PER_REQUEST}")));
        }
        if self.account_identity.as_deref().is_some_and(|id| id.trim().is_empty()) {
            return Err(Error::Config("account_identity must not be empty".into()));
        }
        if matches!(self.market_data, MarketDataPath::Private | MarketDataPath::Balanced)
            && self.credentials.is_none()
        {
            return Err(Error::Config(format!("MarketDataPath::{:?} needs credentials", self.market_data)));
        }
        let http = reqwest::Client::builder()
            .timeout(self.timeout)
            .connect_timeout(self.connect_timeout)
            .user_agent(self.user_agent.clone())
            .pool_idle_timeout(Duration::from_secs(30))
            // An answer from another URL is not an answer to the request (and a redirect must
            // not carry the JWT anywhere): a 3xx is an error (classify.rs).
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::Config(format!("could not build the HTTP client: {e}")))?;
        let private_md = match self.market_data {
            MarketDataPath::Auto => self.credentials.is_some(),
            MarketDataPath::Public => false,
            MarketDataPath::Private | MarketDataPath::Balanced => true,
        };
        Ok(CoinbaseClient {
            inner: Arc::new(ClientInner {
                http,
                base: base.to_string().trim_end_matches('/').to_string(),
                jwt_host,
                creds: self.credentials,
                limiter: self.limiter.unwrap_or_else(|| {
                    Some(
                        self.account_identity
                            .as_deref()
                            .map_or_else(RateLimiter::coinbase, RateLimiter::shared_for),
                    )
                }),
                account_identity: self.account_identity,
                private_md,
                balanced_md: self.market_data == MarketDataPath::Balanced,
                best_bid_ask_chunk: self.best_bid_ask_chunk,
                ticker_batch: self.ticker_batch,
                public_tickers_chunk: self.public_tickers_chunk,
                candle_max_buckets: self.candle_max_buckets,
                accounts_page_limit: self.accounts_page_limit,
                retry: self.retry,
                unauthorized_retry: self.unauthorized_retry,
                exchange_offset_ms: AtomicI64::new(0),
                key_worked: AtomicBool::new(false),
                accounts_max_pages: self.accounts_max_pages,
                limits: body::Limits {
                    max_body_bytes: self.max_body_bytes,
                    max_retry_after: self.max_retry_after,
                },
                requests: Default::default(),
                rate_limited: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                clock: self.clock,
            }),
        })
    }
}
