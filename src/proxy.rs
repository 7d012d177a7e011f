//! A local Coinbase-compatible caching proxy (feature `proxy`): every bot, in any language,
//! migrates by changing its base URL.
//!
//! [`Proxy`] listens on loopback and serves the Advanced Trade v3 market-data and balance
//! paths from one [`CoordinatedSource`], in Coinbase's JSON (the [`wire`](crate::coinbase::wire)
//! structs). Concurrent requests from every client coalesce, ticker requests within the batch
//! window merge into one `best_bid_ask`, and the rate limiter, 429 pause, circuit breaker and
//! stale contract apply to all clients together. Every other path is passed through, signed
//! with the proxy's own key.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use tickshare::{Credentials, proxy::Proxy};
//! let proxy = Proxy::builder(Credentials::from_env()?)
//!     .listen("127.0.0.1:8787".parse()?)
//!     .local_token("a-long-random-string")
//!     .start()
//!     .await?;
//! println!("point bots at {}", proxy.base_url());
//! # Ok(()) }
//! ```
//!
//! # Served from the cache
//!
//! Paths under `/api/v3/brokerage`; the public `/market/...` and private twins answer alike.
//!
//! | path | answered from | notes |
//! |---|---|---|
//! | `GET [/market]/products/{id}/ticker?limit=1` | [`CoordinatedSource::ticker_with`] (batched: last trades and book, [`ProxyBuilder::ticker_batch`]), or with [`TickerAnswer::Trades`] the trades cache | batched: one trade (price = the last trade, time, product) and `best_bid`/`best_ask`; `trade_id`, `size`, `side` are `""`. Trades: the exchange's answer, every field |
//! | `GET [/market]/products/{id}/ticker?limit=N`, 1 < N ≤ 1,000 | the trades cache: one fetch per product and ticker TTL for the largest `limit` asked recently, coalesced, every trade checked ([`CoinbaseClient::recent_trades`]) | the first N trades of it, most recent first; `limit` over 1,000 is passed through |
//! | `GET [/market]/products/{id}/candles?start=&end=&granularity=[&limit=]` | [`CoordinatedSource::candles_with`] | inclusive bounds, newest first, as Coinbase; a window over 350 buckets is 400 |
//! | `GET /best_bid_ask[?product_ids=..]` | [`CoordinatedSource::tickers_with`] | one level per side, `size` `""`; no ids means every listed product |
//! | `GET [/market]/product_book?product_id=[&limit=]` | the book cache: one fetch per product and ticker TTL for the largest `limit` asked recently (or none), coalesced, every level checked ([`CoinbaseClient::order_book`]) | the first `limit` levels a side; `last`, `mid_market`, `spread_*` as the exchange sent them; with `aggregation_price_increment` passed through |
//! | `GET [/market]/products[?product_ids=..&product_type=&limit=&offset=]` | the product list, cached for `products_ttl` | |
//! | `GET [/market]/products/{id}` | the same list | |
//! | `GET /accounts[?limit=&cursor=]` | [`CoordinatedSource::accounts_with`], paginated locally | `limit` 49 by default, at most 250; the cursor is the proxy's own |
//! | `GET /time` | the proxy's clock plus the exchange's offset (refreshed every minute) | |
//!
//! # Passed through
//!
//! Any other path and method (orders, fills, portfolios, v2, ...) is forwarded to the upstream
//! with a fresh JWT for that path, through the same rate limiter at
//! [`Priority::High`](crate::Priority::High), never cached. Only GET and HEAD are retried (on a
//! transport error, 5xx or 429, with a fresh JWT each time); anything else is sent once. A
//! request that can move funds (any method but GET, HEAD and OPTIONS: orders, edits, cancels,
//! conversions, portfolio moves, v2 sends) invalidates the cached accounts
//! ([`CoordinatedSource::invalidate_accounts`], and the shared tier's with the `redis`
//! feature) when its answer arrives, so every balance read that starts after an order's answer
//! is fetched after it; an accounts fetch already in flight is neither cached nor joined.
//! With the shared tier, the invalidation is published over Redis pub/sub and every proxy on
//! the key and namespace forgets its in-process accounts when it arrives (within a Redis
//! round trip of the order's answer; [`SharedTier::accounts_invalidations`]).
//!
//! # Security
//!
//! - The proxy binds loopback unless [`ProxyBuilder::allow_remote`] is set, and then only with
//!   a local token configured.
//! - Every path but `/healthz` needs either a bearer JWT signed by the proxy's own CDP key
//!   (ES256, verified with its public key; `nbf`/`exp` with 5 s leeway; `uri` checked for
//!   method and path, any host, with or without scheme — so both ccxt's and the SDK's tokens
//!   pass) or a configured local token, as `Authorization: Bearer <token>` or
//!   `X-Tickshare-Token: <token>`. Anything else is 401 and nothing is forwarded.
//! - Client tokens are never sent upstream: the proxy drops `Authorization`, cookies and
//!   hop-by-hop headers, and signs its own.
//! - Request bodies ([`ProxyBuilder::max_body_bytes`], 64 KiB) and headers
//!   ([`ProxyBuilder::max_header_bytes`], 16 KiB) are bounded; each connection gets a token
//!   bucket ([`ProxyBuilder::per_connection_rate`]); connections are capped
//!   ([`ProxyBuilder::max_connections`]). Whatever clients send, upstream traffic goes through
//!   one [`RateLimiter`](crate::RateLimiter), so it cannot exceed the exchange's limit.
//!
//! # Operator paths
//!
//! `GET /healthz` (no auth) answers `{"status":"ok"|"degraded",..}`; `GET /metrics` the
//! Prometheus text of [`metrics`](crate::metrics) plus the proxy's own counters; `GET /stats`
//! the JSON [`ProxyStats`].

mod auth;
mod forward;
mod prefix;
mod routes;
mod server;

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{sync::watch, task::JoinHandle};

#[cfg(feature = "redis")]
use crate::redis::{SharedTier, SharedTierConfig};
use crate::{
    clock::Clock,
    coinbase::{CoinbaseClient, Credentials, DEFAULT_BASE_URL, TickerBatch},
    coordinated::{CoordinatedConfig, CoordinatedSource, CoordinatedStats},
    error::{Error, Result},
    model::{OrderBook, RecentTrades},
};

/// How the proxy answers `GET [/market]/products/{id}/ticker?limit=1`
/// ([`ProxyBuilder::ticker_answer`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TickerAnswer {
    /// From the coordinated source's tickers: requests for every product within the batch
    /// window merge into one batch ([`ProxyBuilder::ticker_batch`], two calls per chunk by
    /// default), whatever the number of products. The one trade carries the last trade's
    /// price and time, the product and the book; its `trade_id`, `size` and `side` are `""`,
    /// because the batched calls do not carry them. Default: the cheapest answer for a fleet
    /// that reads prices (ccxt's `fetch_ticker` reads `price`, `time`, `best_bid`, `best_ask`).
    #[default]
    Batched,
    /// From the trades cache: the exchange's own answer, every field, one call per product
    /// per ticker TTL (concurrent clients still share it). For clients that read the last
    /// trade's size, id or side.
    Trades,
}

/// Builder of a [`Proxy`].
#[must_use]
pub struct ProxyBuilder {
    credentials: Credentials,
    upstream: String,
    listen: SocketAddr,
    local_tokens: Vec<String>,
    allow_remote: bool,
    max_body_bytes: usize,
    max_header_bytes: usize,
    per_connection_rate: u32,
    per_connection_burst: u32,
    max_connections: usize,
    header_read_timeout: Option<Duration>,
    coordinated: Option<CoordinatedConfig>,
    products_ttl: Duration,
    ticker_batch: TickerBatch,
    ticker_answer: TickerAnswer,
    clock: Clock,
    #[cfg(feature = "redis")]
    shared_tier: Option<(String, SharedTierConfig)>,
}

impl fmt::Debug for ProxyBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyBuilder")
            .field("credentials", &self.credentials)
            .field("upstream", &self.upstream)
            .field("listen", &self.listen)
            .field("local_tokens", &format_args!("<{} redacted>", self.local_tokens.len()))
            .field("allow_remote", &self.allow_remote)
            .finish_non_exhaustive()
    }
}

impl ProxyBuilder {
    /// The upstream host (default `https://api.coinbase.com`; the simulated exchange's
    /// `base_url` in tests).
    pub fn upstream(mut self, url: impl Into<String>) -> Self {
        self.upstream = url.into();
        self
    }

    /// The address to listen on (default `127.0.0.1:8787`; port 0 picks a free one).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Accept `token` as a client credential (as `Authorization: Bearer <token>` or
    /// `X-Tickshare-Token`), besides JWTs signed by the proxy's key. May be called more than
    /// once. Tokens shorter than 16 bytes are refused by [`start`](Self::start).
    pub fn local_token(mut self, token: impl Into<String>) -> Self {
        self.local_tokens.push(token.into());
        self
    }

    /// Allow binding a non-loopback address (default `false`). Needs a local token.
    pub fn allow_remote(mut self, allow: bool) -> Self {
        self.allow_remote = allow;
        self
    }

    /// The largest request body accepted (default 64 KiB); larger is 413, nothing forwarded.
    pub fn max_body_bytes(mut self, n: usize) -> Self {
        self.max_body_bytes = n;
        self
    }

    /// The most bytes of request head (line and headers) buffered per request (default
    /// 16 KiB, at least 8 KiB); larger closes the connection with 431.
    pub fn max_header_bytes(mut self, n: usize) -> Self {
        self.max_header_bytes = n;
        self
    }

    /// Requests per second each connection may send (default 10,000) and its burst (default
    /// 20,000); beyond, 429 from the proxy itself, with `Retry-After`. A bot sends a few per
    /// second. The default stops a flood on one connection (one keep-alive connection does
    /// about 25,000 cached requests/s back to back on loopback here) without refusing a load
    /// test over ten or more connections at full speed; the default used to be 500, which
    /// such a test exhausted in a tenth of a second.
    pub fn per_connection_rate(mut self, per_second: u32, burst: u32) -> Self {
        self.per_connection_rate = per_second;
        self.per_connection_burst = burst;
        self
    }

    /// The most open client connections (default 4,096); further ones are closed at once.
    /// Also the listening socket's accept backlog (at least 128; the kernel caps it at
    /// `net.core.somaxconn`), so that as many clients connecting at once are not kept waiting
    /// for a SYN retransmission.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }

    /// How long a client may take to send a request head (default 10 s; `None` disables it,
    /// e.g. in paused-clock tests).
    pub fn header_read_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    /// The coordinated source's settings (the endpoint classes and batch size are then matched
    /// to the client as [`CoordinatedSource::coinbase`] does).
    ///
    /// Default: [`CoordinatedConfig::default`] with
    /// [`refresh_before_expiry`](CoordinatedConfig::refresh_before_expiry) at
    /// [`DEFAULT_REFRESH_AHEAD`]. A proxy's clients poll all the time, so a read in the last
    /// half second of a hot entry's life refetches it in the background and no reader waits
    /// for the refetch at expiry (at 20,000 requests/s that wait held about a hundred requests
    /// every ticker TTL). Data never gets older for it; the price is up to a tenth more ticker
    /// calls under continuous polling, none when reads come in bursts as bots' ticks do.
    pub fn coordinated(mut self, cfg: CoordinatedConfig) -> Self {
        self.coordinated = Some(cfg);
        self
    }

    /// How long the product list stays fresh (default 60 s).
    pub fn products_ttl(mut self, ttl: Duration) -> Self {
        self.products_ttl = ttl;
        self
    }

    /// How the cached tickers are fetched (default [`TickerBatch::LastTradeAndBook`]).
    ///
    /// The proxy answers in Coinbase's shapes, and those carry the book: `best_bid_ask` is
    /// nothing but bids and asks, a ticker has `best_bid`/`best_ask`. So by default each batch
    /// is two calls per chunk (`/market/products?product_ids=` for the last trades,
    /// `/best_bid_ask` for the book). [`TickerBatch::LastTrade`] halves the ticker calls for
    /// clients that read only last prices; their books are then empty (`bids: []`, and
    /// `best_bid: ""`). [`TickerBatch::Book`] prices tickers at the mid.
    pub fn ticker_batch(mut self, batch: TickerBatch) -> Self {
        self.ticker_batch = batch;
        self
    }

    /// How a one-trade ticker request (`.../ticker?limit=1`, ccxt's `fetch_ticker`) is
    /// answered (default [`TickerAnswer::Batched`]). Requests for more trades are always
    /// answered from the trades cache.
    pub fn ticker_answer(mut self, answer: TickerAnswer) -> Self {
        self.ticker_answer = answer;
        self
    }

    /// The clock (default [`Clock::system`]); give it the simulated exchange's in tests.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Share the upstream with every other proxy (or Rust host) on the same key through
    /// [`SharedTier`] on the Redis at `redis_url` (feature `redis`): one L2 cache, one
    /// single-flight per key across processes, and one distributed rate limit, which the
    /// pass-through takes its slots from too. The proxy's own client is then built without a
    /// limiter of its own ([`unlimited`](crate::CoinbaseClientBuilder::unlimited)); while Redis
    /// is unreachable the proxy runs on its share of the limit
    /// ([`SharedTierConfig::expected_workers`]). An order through any proxy on the tier makes
    /// every one of them forget its in-process accounts
    /// ([`SharedTier::accounts_invalidations`]); `start` waits for that subscription, at
    /// most a second (the whole second only when Redis is unreachable). See the [`redis`](crate::redis) module docs.
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn shared_tier(mut self, redis_url: impl Into<String>, cfg: SharedTierConfig) -> Self {
        self.shared_tier = Some((redis_url.into(), cfg));
        self
    }

    /// Bind and start serving on the current tokio runtime.
    ///
    /// # Errors
    /// [`Error::Config`] for a non-loopback address without [`allow_remote`](Self::allow_remote)
    /// and a local token, a local token under 16 bytes, zero limits, a bad upstream URL or an
    /// invalid coordinated configuration or shared-tier configuration; [`Error::Transport`] if
    /// the address cannot be bound.
    pub async fn start(self) -> Result<Proxy> {
        let remote_ok = self.allow_remote && !self.local_tokens.is_empty();
        if !self.listen.ip().is_loopback() && !remote_ok {
            return Err(Error::Config(format!(
                "refusing to listen on {} (not loopback): set allow_remote(true) and a local_token",
                self.listen
            )));
        }
        if self.local_tokens.iter().any(|t| t.len() < 16) {
            return Err(Error::Config("local tokens must be at least 16 bytes".into()));
        }
        if self.max_body_bytes == 0
            || self.per_connection_rate == 0
            || self.per_connection_burst == 0
            || self.max_connections == 0
        {
            return Err(Error::Config(
                "max_body_bytes, per_connection_rate, its burst and max_connections must be >= 1".into(),
            ));
        }
        let client = CoinbaseClient::builder()
            .base_url(self.upstream.clone())
            .credentials(self.credentials.clone())
            .ticker_batch(self.ticker_batch)
            .clock(self.clock);
        #[cfg(feature = "redis")]
        let client = if self.shared_tier.is_some() { client.unlimited() } else { client };
        let client = client.build()?;
        let source = CoordinatedSource::coinbase(client.clone());
        #[cfg(feature = "redis")]
        let (source, tier) = match self.shared_tier {
            Some((url, cfg)) => {
                let tier = SharedTier::coinbase(url, self.credentials.key_name(), client.clone())
                    .config(cfg)
                    .clock(self.clock)
                    .build()
                    .await?;
                // Matched to the client as `CoordinatedSource::coinbase` does; the tier limits.
                let source = CoordinatedSource::builder(tier.clone())
                    .market_data_class(client.market_data_class())
                    .batch_size(client.tickers_chunk().min(CoordinatedConfig::default().batch_size))
                    .batch_class(client.tickers_class());
                (source, Some(tier))
            }
            None => (source, None),
        };
        let mut source = source.clock(self.clock);
        if let Some(cfg) = self.coordinated {
            let batch = client.tickers_chunk().min(cfg.batch_size);
            source = source
                .config(cfg)
                .market_data_class(client.market_data_class())
                .batch_class(client.tickers_class())
                .batch_size(batch);
        }
        let source = source.build()?;
        let key = self.credentials.verifying_key();
        #[allow(unused_mut)]
        let mut gate = match client.rate_limiter() {
            Some(l) => forward::Gate::Local(l.clone()),
            None => forward::Gate::None,
        };
        #[cfg(feature = "redis")]
        if let Some(tier) = &tier {
            gate = forward::Gate::Shared(tier.clone());
        }
        let forwarder = Arc::new(forward::Forwarder::new(&self.upstream, self.credentials.clone(), gate)?);
        let (ttl, max_stale) = (source.config().ticker_ttl, source.config().max_stale);
        let listener = bind(self.listen, self.max_connections)?;
        let addr = listener.local_addr().map_err(|e| Error::Transport(e.to_string()))?;
        let shared = Arc::new(Shared {
            source,
            client,
            forwarder,
            auth: auth::Auth::new(key, self.local_tokens),
            limits: server::Limits {
                max_body_bytes: self.max_body_bytes,
                max_header_bytes: self.max_header_bytes.max(8192),
                rate: self.per_connection_rate,
                burst: self.per_connection_burst,
                max_connections: self.max_connections,
                header_read_timeout: self.header_read_timeout,
            },
            products: routes::ProductsCache::new(self.products_ttl),
            trades: prefix::PrefixCache::new(ttl, max_stale),
            books: prefix::PrefixCache::new(ttl, max_stale),
            ticker_answer: self.ticker_answer,
            time: routes::TimeOffset::default(),
            clock: self.clock,
            counters: ProxyCounters::default(),
            #[cfg(feature = "redis")]
            tier,
        });
        let (stop, stop_rx) = watch::channel(false);
        // With the shared tier, an order placed through any proxy (or host) on this key makes
        // this one forget its in-process accounts too.
        #[cfg(feature = "redis")]
        if let Some(tier) = &shared.tier {
            let mut invalidated = tier.accounts_invalidations();
            // Hear them from the start: wait (bounded, for a Redis that is down) until the
            // subscription is in place, which counts as the first invalidation.
            let _ = tokio::time::timeout(Duration::from_secs(1), invalidated.wait_for(|n| *n > 0)).await;
            let (source, mut stopped) = (shared.source.clone(), stop_rx.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        changed = invalidated.changed() => {
                            if changed.is_err() {
                                return;
                            }
                            source.invalidate_accounts();
                        }
                        _ = stopped.wait_for(|s| *s) => return,
                    }
                }
            });
        }
        let task = tokio::spawn(server::serve(listener, Arc::clone(&shared), stop_rx));
        tracing::info!(%addr, "tickshare proxy listening");
        Ok(Proxy { shared, addr, stop, task: Some(task) })
    }
}

/// Bind `addr` with an accept backlog of `max_connections` (the kernel caps it at
/// `net.core.somaxconn`). `TcpListener::bind` would listen with std's backlog of 128: when more
/// clients than that connect at once (a fleet of bots ticking on the same second), the kernel
/// drops the further SYNs and those clients wait for their retransmission, a second or more.
fn bind(addr: SocketAddr, max_connections: usize) -> Result<tokio::net::TcpListener> {
    let bind_error = |e: std::io::Error| Error::Transport(format!("could not bind {addr}: {e}"));
    let socket =
        if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
            .map_err(bind_error)?;
    socket.set_reuseaddr(true).map_err(bind_error)?;
    socket.bind(addr).map_err(bind_error)?;
    socket.listen(u32::try_from(max_connections).unwrap_or(u32::MAX).clamp(128, 65_535)).map_err(bind_error)
}

/// What the proxy shares between connections.
struct Shared {
    source: CoordinatedSource,
    client: CoinbaseClient,
    forwarder: Arc<forward::Forwarder>,
    auth: auth::Auth,
    limits: server::Limits,
    products: routes::ProductsCache,
    trades: prefix::PrefixCache<RecentTrades>,
    books: prefix::PrefixCache<OrderBook>,
    ticker_answer: TickerAnswer,
    time: routes::TimeOffset,
    clock: Clock,
    counters: ProxyCounters,
    /// The shared tier, whose accounts an order invalidates too.
    #[cfg(feature = "redis")]
    tier: Option<SharedTier>,
}

/// How long before a cached ticker or the accounts expire a proxy's read refreshes them in
/// the background (see [`ProxyBuilder::coordinated`]).
pub const DEFAULT_REFRESH_AHEAD: Duration = Duration::from_millis(500);

/// The proxy's own counters.
#[derive(Debug, Default)]
struct ProxyCounters {
    /// Requests by route name (`ticker`, `candles`, ..., `passthrough`, `operator`).
    by_route: [AtomicU64; routes::Route::NAMES.len()],
    unauthorized: AtomicU64,
    limited: AtomicU64,
    too_large: AtomicU64,
    refused_connections: AtomicU64,
    connections: AtomicU64,
    passthrough_retries: AtomicU64,
    accounts_invalidations: AtomicU64,
    products_upstream: AtomicU64,
    trades_upstream: AtomicU64,
    books_upstream: AtomicU64,
    time_upstream: AtomicU64,
}

/// A snapshot of a proxy's counters and its coordinated source's stats.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ProxyStats {
    /// Client requests by route: `ticker`, `candles`, `best_bid_ask`, `product_book`,
    /// `products`, `product`, `accounts`, `time`, `passthrough`, `operator` (`/healthz`,
    /// `/metrics`, `/stats`).
    pub requests_by_route: BTreeMap<String, u64>,
    /// Requests refused with 401.
    pub unauthorized: u64,
    /// Requests refused by the per-connection limit (429 from the proxy).
    pub limited: u64,
    /// Requests refused for their size (413).
    pub too_large: u64,
    /// Connections accepted.
    pub connections: u64,
    /// Connections closed at once because `max_connections` were open.
    pub refused_connections: u64,
    /// Pass-through retries (GET and HEAD only).
    pub passthrough_retries: u64,
    /// Times a pass-through that can move funds (any method but GET, HEAD, OPTIONS)
    /// invalidated the cached accounts.
    pub accounts_invalidations: u64,
    /// Product-list fetches from the upstream.
    pub products_upstream: u64,
    /// Recent-trades fetches from the upstream (the ticker route's trades cache).
    pub trades_upstream: u64,
    /// Order-book fetches from the upstream (the `product_book` route's cache).
    pub books_upstream: u64,
    /// Server-time fetches from the upstream.
    pub time_upstream: u64,
    /// The coordinated source's stats.
    pub coordinated: CoordinatedStats,
}

impl Shared {
    fn stats(&self) -> ProxyStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProxyStats {
            requests_by_route: routes::Route::NAMES
                .iter()
                .zip(c.by_route.iter())
                .map(|(n, a)| ((*n).to_string(), get(a)))
                .collect(),
            unauthorized: get(&c.unauthorized),
            limited: get(&c.limited),
            too_large: get(&c.too_large),
            connections: get(&c.connections),
            refused_connections: get(&c.refused_connections),
            passthrough_retries: get(&c.passthrough_retries),
            accounts_invalidations: get(&c.accounts_invalidations),
            products_upstream: get(&c.products_upstream),
            trades_upstream: get(&c.trades_upstream),
            books_upstream: get(&c.books_upstream),
            time_upstream: get(&c.time_upstream),
            coordinated: self.source.stats(),
        }
    }
}

/// A running proxy; see the [module docs](self). Dropping it stops the server.
#[derive(Debug)]
pub struct Proxy {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared").field("source", &self.source).finish_non_exhaustive()
    }
}

impl Proxy {
    /// A builder signing with `credentials` (the CDP key whose tokens clients may present).
    pub fn builder(credentials: Credentials) -> ProxyBuilder {
        ProxyBuilder {
            credentials,
            upstream: DEFAULT_BASE_URL.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8787)),
            local_tokens: Vec::new(),
            allow_remote: false,
            max_body_bytes: 64 * 1024,
            max_header_bytes: 16 * 1024,
            per_connection_rate: 10_000,
            per_connection_burst: 20_000,
            max_connections: 4096,
            header_read_timeout: Some(Duration::from_secs(10)),
            coordinated: Some(CoordinatedConfig {
                refresh_before_expiry: DEFAULT_REFRESH_AHEAD,
                ..CoordinatedConfig::default()
            }),
            products_ttl: Duration::from_secs(60),
            ticker_batch: TickerBatch::LastTradeAndBook,
            ticker_answer: TickerAnswer::Batched,
            clock: Clock::system(),
            #[cfg(feature = "redis")]
            shared_tier: None,
        }
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`: the base URL to give bots (ccxt's `urls['api']['rest']`,
    /// [`CoinbaseClientBuilder::base_url`](crate::CoinbaseClientBuilder::base_url)).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The coordinated source behind the proxy.
    pub fn source(&self) -> &CoordinatedSource {
        &self.shared.source
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ProxyStats {
        self.shared.stats()
    }

    /// Stop accepting, let requests in flight finish (up to 5 s) and wait.
    ///
    /// # Cancel safety
    /// Dropping the future leaves the shutdown running in the background.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}
