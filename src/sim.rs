//! A simulated Coinbase Advanced Trade exchange on loopback (feature `sim`).
//!
//! [`SimExchange`] serves the market-data and balance endpoints of the real REST API under
//! [`API_BASE_PATH`] on `127.0.0.1`, with the same paths and JSON shapes (it serializes the very
//! structs of [`crate::coinbase::wire`] that the client decodes), and enforces Coinbase's rate
//! limits. It runs **on the caller's tokio runtime** (`tokio::spawn`), and all its timing uses
//! `tokio::time`, so a `#[tokio::test(start_paused = true)]` test that starts it stays
//! deterministic: an hour of simulated trading takes milliseconds.
//!
//! ```
//! use tickshare::sim::{Endpoint, SimExchange};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let sim = SimExchange::builder().products(5).seed(7).start().await?;
//! let url = format!("{}/market/products/BTC-USD/ticker?limit=1", sim.api_url());
//! let body = reqwest::get(&url).await?.bytes().await?;
//! let ticker = tickshare::coinbase::wire::decode_ticker(&"BTC-USD".parse()?, &body)?;
//! assert_eq!(ticker.mid(), Some(ticker.price));
//! assert_eq!(sim.stats().calls(Endpoint::MarketTicker), 1);
//! sim.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! # Endpoints
//!
//! | Counter name | Path (under [`API_BASE_PATH`]) | Class |
//! |---|---|---|
//! | `market/ticker` | `GET /market/products/{id}/ticker?limit=N` | public |
//! | `ticker` | `GET /products/{id}/ticker?limit=N` | private |
//! | `market/candles` | `GET /market/products/{id}/candles?start=&end=&granularity=[&limit=]` | public |
//! | `candles` | `GET /products/{id}/candles?...` | private |
//! | `best_bid_ask` | `GET /best_bid_ask[?product_ids=A&product_ids=B]` | private |
//! | `market/products` | `GET /market/products[?product_ids=..&limit=&offset=&product_type=]` | public |
//! | `products` | `GET /products[?...]` (adds `pagination`) | private |
//! | `market/product` | `GET /market/products/{id}` | public |
//! | `product` | `GET /products/{id}` | private |
//! | `accounts` | `GET /accounts[?limit=&cursor=]` | private |
//! | `time` | `GET /time` | public |
//!
//! Any other path (or method) answers 404 and counts as `unknown`, outside any rate limit.
//! Errors use the observed v3 shape `{"error","error_details","message"}`: an unknown or
//! malformed product id is 404 `NOT_FOUND` "ProductID is invalid"; missing or malformed query
//! parameters are 400 `INVALID_ARGUMENT`. Booleans in queries are case-insensitive.
//!
//! **Candles**: `start` and `end` are inclusive UNIX-second bounds; the answer holds the
//! candles whose aligned start `s` satisfies `start <= s <= end` and `s <= now`, newest first.
//! `(end - start) / granularity + 1` above [`MAX_CANDLES`] is a 400 with
//! [`CANDLE_RANGE_ERROR`]. `limit` (1 to 350) keeps the newest `limit` candles. The candle in
//! progress closes at the current price; closed candles never change.
//!
//! **Ticker**: the last trade is at the current price (on the quote increment) and time; the
//! best bid and ask are one increment below and above, so their mid is the last price exactly.
//! Prices and candles are a pure function of (seed, product, time); see [`SimHandle::price_at`].
//!
//! # Rate limits
//!
//! Per class (public 10/s, private 30/s by default): a request is accepted if fewer than
//! `limit` requests of its class were accepted in the sliding window `(now - 1 s, now]`;
//! otherwise it gets 429 with `{"error":"RATE_LIMIT_EXCEEDED",...}` (or an HTML page, see
//! [`SimBuilder::html_429`]) and the headers `x-ratelimit-limit`, `x-ratelimit-remaining` and
//! `x-ratelimit-reset` (UNIX seconds on the exchange's clock when a slot frees), plus
//! `Retry-After` if [enabled](SimBuilder::retry_after). Accepted responses carry the
//! `x-ratelimit-*` headers too. [`SimStats::max_requests_in_any_1s`] records the most requests
//! of each class *received* in any one-second window.
//!
//! # Authentication
//!
//! Private endpoints need `Authorization: Bearer <jwt>` (401 `UNAUTHENTICATED` otherwise).
//! Without [`SimBuilder::jwt_public_key_pem`], any well-formed JWT passes; with it, the ES256 or
//! EdDSA signature, `exp`/`nbf` (system time, 5 s leeway) and the `uri` claim
//! (`"GET {any host}{path}"`, optionally with `http://`) are verified.
//!
//! # Order of checks
//!
//! For each request: count it, apply the rate limit (a rejected request gets the configured
//! latency and its 429, nothing else), sleep the latency (configured plus latency faults),
//! apply a response [`Fault`] if one matches, check the JWT (private endpoints), then answer.
//!
//! # Down
//!
//! [`SimHandle::set_down`]`(true)` takes the exchange down: new connections are accepted and
//! immediately reset (the port stays bound, so bringing it back always works), and every open
//! connection is reset, failing its request in flight. The `/__sim` control paths are down too.
//!
//! # Control paths
//!
//! `GET /__sim/stats` returns [`SimStats`] as JSON; `POST /__sim/reset` zeroes the counters (as
//! [`SimHandle::reset_stats`]) and returns the zeroed stats. They are not counted, limited or
//! subject to faults.

mod faults;
mod jwt;
mod limits;
mod market;
mod routes;
mod stats;
mod ws;

use std::{
    fmt, io,
    net::{Ipv4Addr, SocketAddr},
    ops::Deref,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use hyper::{
    Method, Request, Response, StatusCode,
    body::{Body, Bytes, Frame, Incoming, SizeHint},
    header::{CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use rust_decimal::Decimal;
use time::OffsetDateTime;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::{JoinHandle, JoinSet},
    time::Instant,
};

pub use crate::limiter::EndpointClass;
pub use faults::{Fault, FaultId, FaultTarget};
pub use stats::{CANDLE_LOG_CAPACITY, CandleRequest, PerClass, SimStats};
pub use ws::{WsConfig, WsFault, WsStats};

use crate::{
    clock::Clock,
    coinbase::{CoinbaseClient, CoinbaseClientBuilder, Credentials, auth::VerifyingKey},
    error::{Error, Result},
    model::{Candle, Granularity, ProductId},
};
use faults::{FaultBook, ResponseFault};
use limits::{Admission, Limiter};
use market::{Market, unix_ms};
use routes::{Ctx, Query, Reply};
use stats::Counters;

/// The path prefix of every Coinbase endpoint: `/api/v3/brokerage`.
pub const API_BASE_PATH: &str = "/api/v3/brokerage";

/// The most candles one request may span: `(end - start) / granularity + 1 <= 350`.
pub const MAX_CANDLES: i64 = 350;

/// The `error_details` of the 400 for a candle window wider than [`MAX_CANDLES`].
///
/// **UNVERIFIED** for real Coinbase: the 2023 text said 300; the cap is now 350.
pub const CANDLE_RANGE_ERROR: &str =
    "start and end argument is invalid - number of candles requested should be less than 350";

/// Accounts per page when `limit` is absent or 0.
pub const DEFAULT_ACCOUNTS_LIMIT: u32 = 49;

/// The largest accepted accounts `limit`; larger values are clamped.
pub const MAX_ACCOUNTS_LIMIT: u32 = 250;

/// The most trades one ticker answer holds; a larger `limit` is clamped.
pub const MAX_TRADES: u32 = 1000;

/// The body of an HTML 429 (see [`SimBuilder::html_429`]), like the page Coinbase's edge sends.
pub const HTML_429_BODY: &str = "<html> <head> <title>Coinbase</title> </head> <body> <h1>429 Too Many Requests</h1> <p>You have been rate limited.</p> </body> </html>";

const RATE_LIMIT_MESSAGE: &str = "Too many requests";

/// The endpoints the simulated exchange serves; [`name`](Endpoint::name) is the counter name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Endpoint {
    /// `GET /market/products/{id}/ticker` (`"market/ticker"`).
    MarketTicker,
    /// `GET /products/{id}/ticker` (`"ticker"`).
    Ticker,
    /// `GET /market/products/{id}/candles` (`"market/candles"`).
    MarketCandles,
    /// `GET /products/{id}/candles` (`"candles"`).
    Candles,
    /// `GET /best_bid_ask` (`"best_bid_ask"`).
    BestBidAsk,
    /// `GET /market/products` (`"market/products"`).
    MarketProducts,
    /// `GET /products` (`"products"`).
    Products,
    /// `GET /market/products/{id}` (`"market/product"`).
    MarketProduct,
    /// `GET /products/{id}` (`"product"`).
    Product,
    /// `GET /accounts` (`"accounts"`).
    Accounts,
    /// `GET /time` (`"time"`).
    Time,
}

impl Endpoint {
    /// Every endpoint.
    pub const ALL: [Endpoint; 11] = [
        Endpoint::MarketTicker,
        Endpoint::Ticker,
        Endpoint::MarketCandles,
        Endpoint::Candles,
        Endpoint::BestBidAsk,
        Endpoint::MarketProducts,
        Endpoint::Products,
        Endpoint::MarketProduct,
        Endpoint::Product,
        Endpoint::Accounts,
        Endpoint::Time,
    ];

    /// The counter name: the path shape with `market/` for the public twin (`"market/ticker"`
    /// vs `"ticker"`).
    pub const fn name(self) -> &'static str {
        match self {
            Endpoint::MarketTicker => "market/ticker",
            Endpoint::Ticker => "ticker",
            Endpoint::MarketCandles => "market/candles",
            Endpoint::Candles => "candles",
            Endpoint::BestBidAsk => "best_bid_ask",
            Endpoint::MarketProducts => "market/products",
            Endpoint::Products => "products",
            Endpoint::MarketProduct => "market/product",
            Endpoint::Product => "product",
            Endpoint::Accounts => "accounts",
            Endpoint::Time => "time",
        }
    }

    /// Whether the endpoint is public or private.
    pub const fn class(self) -> EndpointClass {
        match self {
            Endpoint::MarketTicker
            | Endpoint::MarketCandles
            | Endpoint::MarketProducts
            | Endpoint::MarketProduct
            | Endpoint::Time => EndpointClass::Public,
            Endpoint::Ticker
            | Endpoint::Candles
            | Endpoint::BestBidAsk
            | Endpoint::Products
            | Endpoint::Product
            | Endpoint::Accounts => EndpointClass::Private,
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which products the exchange lists: a count or an explicit list (see
/// [`SimBuilder::products`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimProducts {
    /// The first `n` of 30 well-known pairs (`BTC-USD`, `ETH-USD`, `SOL-USD`, ...), then
    /// `X0001-USD`, `X0002-USD`, ... for more.
    Count(usize),
    /// Exactly these ids, in order (duplicates dropped); validated by
    /// [`SimBuilder::start`].
    List(Vec<String>),
}

impl Default for SimProducts {
    fn default() -> Self {
        SimProducts::Count(market::WELL_KNOWN_COUNT)
    }
}

impl From<usize> for SimProducts {
    fn from(n: usize) -> Self {
        SimProducts::Count(n)
    }
}

impl From<Vec<ProductId>> for SimProducts {
    fn from(ids: Vec<ProductId>) -> Self {
        SimProducts::List(ids.into_iter().map(String::from).collect())
    }
}

impl From<&[ProductId]> for SimProducts {
    fn from(ids: &[ProductId]) -> Self {
        SimProducts::List(ids.iter().map(ProductId::to_string).collect())
    }
}

impl From<Vec<&str>> for SimProducts {
    fn from(ids: Vec<&str>) -> Self {
        SimProducts::List(ids.into_iter().map(str::to_string).collect())
    }
}

impl From<&[&str]> for SimProducts {
    fn from(ids: &[&str]) -> Self {
        SimProducts::List(ids.iter().map(|s| (*s).to_string()).collect())
    }
}

impl<const N: usize> From<[&str; N]> for SimProducts {
    fn from(ids: [&str; N]) -> Self {
        SimProducts::List(ids.iter().map(|s| (*s).to_string()).collect())
    }
}

/// One account (wallet) of the simulated user.
///
/// ```
/// use tickshare::{Decimal, sim::SimAccount};
/// let usd = SimAccount::new("USD", Decimal::new(10_000, 0)).hold(Decimal::new(250, 0));
/// assert_eq!(usd.account_type(), "ACCOUNT_TYPE_FIAT");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct SimAccount {
    currency: String,
    available: Decimal,
    hold: Decimal,
    account_type: Option<String>,
    name: Option<String>,
    active: bool,
}

impl SimAccount {
    /// An active account of `currency` (upper-cased) with `available` funds and nothing on hold.
    pub fn new(currency: &str, available: Decimal) -> Self {
        SimAccount {
            currency: currency.to_ascii_uppercase(),
            available,
            hold: Decimal::ZERO,
            account_type: None,
            name: None,
            active: true,
        }
    }

    /// Funds on hold.
    pub fn hold(mut self, hold: Decimal) -> Self {
        self.hold = hold;
        self
    }

    /// Override the `type` field (default: `ACCOUNT_TYPE_FIAT` for USD, EUR, GBP, CAD, JPY,
    /// CHF and AUD, `ACCOUNT_TYPE_CRYPTO` otherwise).
    pub fn with_type(mut self, account_type: &str) -> Self {
        self.account_type = Some(account_type.to_string());
        self
    }

    /// Override the display name (default `"{CURRENCY} Wallet"`).
    pub fn with_name(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }

    /// Mark the account active or not.
    pub fn active(mut self, active: bool) -> Self {
        self.active = active;
        self
    }

    /// The currency code.
    pub fn currency(&self) -> &str {
        &self.currency
    }

    /// The `type` the account reports.
    pub fn account_type(&self) -> &str {
        match &self.account_type {
            Some(t) => t,
            None if matches!(
                self.currency.as_str(),
                "USD" | "EUR" | "GBP" | "CAD" | "JPY" | "CHF" | "AUD"
            ) =>
            {
                "ACCOUNT_TYPE_FIAT"
            }
            None => "ACCOUNT_TYPE_CRYPTO",
        }
    }

    /// The default accounts: USD 10000, USDC 5000, BTC 0.5, ETH 5, SOL 100 (EUR 0, inactive
    /// accounts none).
    pub fn defaults() -> Vec<SimAccount> {
        vec![
            SimAccount::new("USD", Decimal::new(10_000, 0)),
            SimAccount::new("USDC", Decimal::new(5_000, 0)),
            SimAccount::new("BTC", Decimal::new(5, 1)),
            SimAccount::new("ETH", Decimal::new(5, 0)),
            SimAccount::new("SOL", Decimal::new(100, 0)),
            SimAccount::new("EUR", Decimal::ZERO),
        ]
    }
}

/// Configures and starts a [`SimExchange`]; from [`SimExchange::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct SimBuilder {
    products: SimProducts,
    seed: u64,
    clock: Option<Clock>,
    public_limit: u32,
    private_limit: u32,
    enforce_limits: bool,
    latency: Duration,
    jitter: Duration,
    jwt_public_key_pem: Option<String>,
    html_429: bool,
    retry_after: bool,
    accounts: Vec<SimAccount>,
    port: u16,
    shutdown_grace: Duration,
    ws: ws::WsConfig,
}

impl Default for SimBuilder {
    fn default() -> Self {
        SimBuilder {
            products: SimProducts::default(),
            seed: 0x5EED,
            clock: None,
            public_limit: 10,
            private_limit: 30,
            enforce_limits: true,
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            jwt_public_key_pem: None,
            html_429: false,
            retry_after: false,
            accounts: SimAccount::defaults(),
            port: 0,
            shutdown_grace: Duration::from_secs(1),
            ws: ws::WsConfig::default(),
        }
    }
}

impl SimBuilder {
    /// The listed products: a count (`products(5)`, `products(5000)`) or a list
    /// (`products(["BTC-USD", "ETH-USD"])`, or a `Vec<ProductId>`). Default: 30 well-known pairs.
    pub fn products(mut self, products: impl Into<SimProducts>) -> Self {
        self.products = products.into();
        self
    }

    /// The seed of prices, volumes, ids and random faults. Same seed, same time: same bodies.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The exchange's wall clock. Share one [`Clock`] between the exchange and the code under
    /// test so they agree on "now". Default: [`Clock::system`] when started.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Public requests per second (default 10; must be at least 1).
    pub fn public_limit(mut self, per_second: u32) -> Self {
        self.public_limit = per_second;
        self
    }

    /// Private requests per second (default 30; must be at least 1).
    pub fn private_limit(mut self, per_second: u32) -> Self {
        self.private_limit = per_second;
        self
    }

    /// Whether to enforce the rate limits (default `true`). When off, nothing gets a 429 but
    /// [`SimStats::max_requests_in_any_1s`] is still recorded.
    pub fn enforce_rate_limits(mut self, enforce: bool) -> Self {
        self.enforce_limits = enforce;
        self
    }

    /// A latency added to every response of a Coinbase path (slept on tokio's clock).
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// A random extra latency in `[0, jitter]` per response, from the seeded generator.
    pub fn jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    /// Verify JWTs against this P-256 (ES256) or Ed25519 (EdDSA) public key (PEM,
    /// `-----BEGIN PUBLIC KEY-----`, as [`Credentials::public_key_pem`] writes it). Without it
    /// any well-formed JWT is accepted.
    pub fn jwt_public_key_pem(mut self, pem: &str) -> Self {
        self.jwt_public_key_pem = Some(pem.to_string());
        self
    }

    /// Answer 429s with Coinbase's HTML page ([`HTML_429_BODY`], `text/html`) instead of JSON.
    pub fn html_429(mut self, html: bool) -> Self {
        self.html_429 = html;
        self
    }

    /// Send a `Retry-After` header (whole seconds, rounded up) with 429s (default off: no
    /// source shows Coinbase sending one).
    pub fn retry_after(mut self, send: bool) -> Self {
        self.retry_after = send;
        self
    }

    /// The simulated user's accounts, in page order (default [`SimAccount::defaults`]).
    pub fn accounts(mut self, accounts: impl IntoIterator<Item = SimAccount>) -> Self {
        self.accounts = accounts.into_iter().collect();
        self
    }

    /// The port on 127.0.0.1 (default 0: any free port).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// How long [`SimExchange::shutdown`] lets requests in flight finish before cutting them
    /// (default 1 s on tokio's clock).
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Bind `127.0.0.1:port` and start serving on the current tokio runtime.
    ///
    /// # Errors
    /// [`Error::Config`] when a limit is 0, a product id is invalid, the PEM is neither a
    /// P-256 nor an Ed25519 public key, the port cannot be bound, or no tokio runtime is running.
    pub async fn start(self) -> Result<SimExchange> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Config("SimExchange must be started inside a tokio runtime".into()));
        }
        if self.public_limit == 0 || self.private_limit == 0 {
            return Err(Error::Config(
                "sim rate limits must be at least 1 request per second; use enforce_rate_limits(false) to disable them".into(),
            ));
        }
        let ids = match &self.products {
            SimProducts::Count(n) => market::generated_ids(*n),
            SimProducts::List(ids) => ids.clone(),
        };
        let ids = ids
            .iter()
            .map(|s| ProductId::new(s))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| Error::Config(format!("sim products: {e}")))?;
        let jwt_key = match &self.jwt_public_key_pem {
            None => None,
            Some(pem) => Some(VerifyingKey::from_public_key_pem(pem)?),
        };
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, self.port))
            .await
            .map_err(|e| Error::Config(format!("could not bind 127.0.0.1:{}: {e}", self.port)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Config(format!("could not read the bound address: {e}")))?;
        let (ws_listener, ws) = ws::bind(self.ws.clone()).await?;
        let limits = |l: u32| self.enforce_limits.then_some(l);
        let shared = Arc::new(Shared {
            base_url: format!("http://{addr}"),
            addr,
            clock: self.clock.unwrap_or_else(Clock::system),
            market: Market::new(self.seed, &ids),
            seed: self.seed,
            jwt_key,
            accounts: Mutex::new(Arc::new(self.accounts)),
            limiter: Mutex::new(Limiter::new(limits(self.public_limit), limits(self.private_limit))),
            counters: Mutex::new(Counters::default()),
            faults: Mutex::new(FaultBook::new(self.seed)),
            settings: Mutex::new(Settings {
                latency: self.latency,
                jitter: self.jitter,
                html_429: self.html_429,
                retry_after: self.retry_after,
            }),
            down: watch::Sender::new(false),
            ws,
        });
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(ws::serve(ws_listener, Arc::clone(&shared), stop_rx.clone()));
        let task = tokio::spawn(serve(listener, Arc::clone(&shared), stop_rx, self.shutdown_grace));
        tracing::debug!(%addr, "simulated exchange listening");
        Ok(SimExchange { handle: SimHandle { shared }, stop, task: Some(task) })
    }
}

/// A simulated Coinbase exchange serving on `127.0.0.1`; see the [module docs](self).
///
/// It dereferences to its [`SimHandle`], so every control method (`stats`, `add_fault`,
/// `set_down`, ...) is available directly; [`handle`](SimExchange::handle) gives a cloneable
/// handle for other tasks. Dropping the `SimExchange` stops the server (in the background);
/// [`shutdown`](SimExchange::shutdown) stops it and waits.
#[derive(Debug)]
pub struct SimExchange {
    handle: SimHandle,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl SimExchange {
    /// A builder with the defaults: 30 products, seed `0x5EED`, limits 10/30 per second, no
    /// latency, any well-formed JWT accepted, any free port.
    pub fn builder() -> SimBuilder {
        SimBuilder::default()
    }

    /// Start an exchange with the defaults.
    ///
    /// # Errors
    /// As [`SimBuilder::start`].
    pub async fn start() -> Result<SimExchange> {
        SimBuilder::default().start().await
    }

    /// A cloneable handle to inspect and steer the running exchange.
    pub fn handle(&self) -> SimHandle {
        self.handle.clone()
    }

    /// Stop accepting connections, let requests in flight finish (up to the
    /// [grace period](SimBuilder::shutdown_grace)), close everything and wait.
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

impl Deref for SimExchange {
    type Target = SimHandle;
    fn deref(&self) -> &SimHandle {
        &self.handle
    }
}

impl Drop for SimExchange {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// A cloneable handle to a running [`SimExchange`]: its address, counters, faults and market.
///
/// A handle does not keep the server alive: once the `SimExchange` is dropped, requests fail.
#[derive(Clone)]
pub struct SimHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimHandle")
            .field("base_url", &self.shared.base_url)
            .field("products", &self.shared.market.products().len())
            .finish_non_exhaustive()
    }
}

impl SimHandle {
    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> &str {
        &self.shared.base_url
    }

    /// `http://127.0.0.1:PORT/api/v3/brokerage`: the base URL the Coinbase client takes.
    pub fn api_url(&self) -> String {
        format!("{}{API_BASE_PATH}", self.shared.base_url)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// A [`CoinbaseClient`] builder pointed at this exchange. Without a configured JWT public
    /// key it carries freshly generated [`Credentials`] (any well-formed token is accepted), so
    /// private endpoints work; with one, set the matching credentials yourself.
    pub fn client_builder(&self) -> CoinbaseClientBuilder {
        let builder = CoinbaseClient::builder().base_url(self.base_url()).clock(self.clock());
        if self.shared.jwt_key.is_some() {
            builder
        } else {
            builder.credentials(Credentials::generate("organizations/sim/apiKeys/sim"))
        }
    }

    /// A [`CoinbaseClient`] for this exchange, from [`client_builder`](SimHandle::client_builder).
    ///
    /// # Errors
    /// As [`CoinbaseClientBuilder::build`].
    pub fn client(&self) -> Result<CoinbaseClient> {
        self.client_builder().build()
    }

    /// The exchange's clock.
    pub fn clock(&self) -> Clock {
        self.shared.clock
    }

    /// The listed products, in order.
    pub fn products(&self) -> Vec<ProductId> {
        self.shared.market.products().iter().map(|p| p.id.clone()).collect()
    }

    /// The price of `product` at `t` (what a ticker at `t` reports as the last trade), or
    /// `None` for an unlisted product.
    pub fn price_at(&self, product: &ProductId, t: OffsetDateTime) -> Option<Decimal> {
        let m = &self.shared.market;
        Some(m.price_at(m.get(product.as_str())?, t))
    }

    /// The current price of `product`.
    pub fn price(&self, product: &ProductId) -> Option<Decimal> {
        self.price_at(product, self.shared.clock.now_utc())
    }

    /// The candle of `product` at `granularity` containing `t`, as the exchange reports it now
    /// (`None` for an unlisted product or a candle not started yet).
    pub fn candle_at(
        &self,
        product: &ProductId,
        granularity: Granularity,
        t: OffsetDateTime,
    ) -> Option<Candle> {
        let m = &self.shared.market;
        let start = granularity.bucket_start(t).unix_timestamp();
        let now_ms = unix_ms(self.shared.clock.now_utc());
        m.candle(m.get(product.as_str())?, granularity, start, now_ms)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SimStats {
        let s = &self.shared;
        let max = {
            let l = lock(&s.limiter);
            PerClass {
                public: l.max_received(EndpointClass::Public),
                private: l.max_received(EndpointClass::Private),
            }
        };
        lock(&s.counters).snapshot(max)
    }

    /// Zero every counter and the candle log. Rate-limit admission is not reset.
    pub fn reset_stats(&self) {
        *lock(&self.shared.counters) = Counters::default();
        lock(&self.shared.limiter).reset_stats();
        self.shared.ws.reset_stats();
    }

    /// Install a fault (effective immediately, or after [`Fault::after`]).
    pub fn add_fault(&self, fault: Fault) -> FaultId {
        lock(&self.shared.faults).add(fault, Instant::now())
    }

    /// Remove an installed fault; `false` if it was already gone (spent, expired or removed).
    pub fn remove_fault(&self, id: FaultId) -> bool {
        lock(&self.shared.faults).remove(id)
    }

    /// Remove every fault.
    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
    }

    /// How many installed faults are still active or pending.
    pub fn active_faults(&self) -> usize {
        lock(&self.shared.faults).active(Instant::now())
    }

    /// Take the whole exchange down (`true`) or bring it back (`false`); see the
    /// [module docs](self#down).
    pub fn set_down(&self, down: bool) {
        self.shared.down.send_replace(down);
    }

    /// Whether the exchange is down.
    pub fn is_down(&self) -> bool {
        *self.shared.down.borrow()
    }

    /// Switch 429 bodies between JSON (`false`) and HTML (`true`).
    pub fn set_html_429(&self, html: bool) {
        lock(&self.shared.settings).html_429 = html;
    }

    /// Switch the `Retry-After` header on 429s on or off.
    pub fn set_retry_after(&self, send: bool) {
        lock(&self.shared.settings).retry_after = send;
    }

    /// Change the latency added to every response.
    pub fn set_latency(&self, latency: Duration, jitter: Duration) {
        let mut s = lock(&self.shared.settings);
        s.latency = latency;
        s.jitter = jitter;
    }

    /// Replace the simulated user's accounts.
    pub fn set_accounts(&self, accounts: impl IntoIterator<Item = SimAccount>) {
        *lock(&self.shared.accounts) = Arc::new(accounts.into_iter().collect());
    }
}

#[derive(Debug, Clone, Copy)]
struct Settings {
    latency: Duration,
    jitter: Duration,
    html_429: bool,
    retry_after: bool,
}

struct Shared {
    base_url: String,
    addr: SocketAddr,
    clock: Clock,
    market: Market,
    seed: u64,
    jwt_key: Option<VerifyingKey>,
    accounts: Mutex<Arc<Vec<SimAccount>>>,
    limiter: Mutex<Limiter>,
    counters: Mutex<Counters>,
    faults: Mutex<FaultBook>,
    settings: Mutex<Settings>,
    down: watch::Sender<bool>,
    ws: ws::WsShared,
}

/// Lock a std mutex (never held across `.await`), ignoring poisoning: every critical section
/// leaves the data consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The accept loop: one task per connection, until `stop`.
async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: watch::Receiver<bool>, grace: Duration) {
    let refused = |s: &Shared| lock(&s.counters).dropped_while_down();
    let mut conns = accept_until_stopped(&listener, &shared, stop, refused, serve_connection).await;
    drop(listener);
    let drain = async { while conns.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(grace, drain).await;
    conns.shutdown().await;
    tracing::debug!("simulated exchange stopped");
}

/// Accept connections until `stop`, each served by its own `serve` task (given the stop flag);
/// one arriving while the exchange is down is reset at once and counted by `refused`. Returns
/// the connections still open.
async fn accept_until_stopped<Fut>(
    listener: &TcpListener,
    shared: &Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    refused: impl Fn(&Shared),
    serve: impl Fn(TcpStream, Arc<Shared>, watch::Receiver<bool>) -> Fut,
) -> JoinSet<()>
where
    Fut: Future<Output = ()> + Send + 'static,
{
    let conn_stop = stop.clone();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = until_true(&mut stop) => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::task::yield_now().await;
                    continue;
                };
                if *shared.down.borrow() {
                    let _ = stream.set_zero_linger();
                    refused(shared);
                    continue;
                }
                conns.spawn(serve(stream, Arc::clone(shared), conn_stop.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns
}

/// Resolve once the watched flag is `true` or its sender is gone.
async fn until_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// Serve one connection until it closes, the exchange stops (gracefully) or goes down (reset).
async fn serve_connection(stream: TcpStream, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true);
    let reset = Arc::new(AtomicBool::new(false));
    let io = TokioIo::new(ResettableStream { inner: stream, reset: Arc::clone(&reset) });
    let svc_shared = Arc::clone(&shared);
    let svc_reset = Arc::clone(&reset);
    let service = service_fn(move |req| respond(Arc::clone(&svc_shared), req, Arc::clone(&svc_reset)));
    let mut conn = std::pin::pin!(http1::Builder::new().serve_connection(io, service));
    let mut down = shared.down.subscribe();
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            () = until_true(&mut stop), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            () = until_true(&mut down) => {
                reset.store(true, Ordering::Relaxed);
                lock(&shared.counters).dropped_while_down();
                return;
            }
        }
    }
}

/// Aborts the connection without a response (the service's error).
#[derive(Debug)]
struct ResetConnection;

impl fmt::Display for ResetConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection reset by fault injection")
    }
}

impl std::error::Error for ResetConnection {}

/// Answer one HTTP request.
async fn respond(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    reset: Arc<AtomicBool>,
) -> std::result::Result<Response<SimBody>, ResetConnection> {
    let path = req.uri().path();
    if let Some(rest) = path.strip_prefix("/__sim") {
        return Ok(control(&shared, req.method(), rest));
    }
    let query = Query::parse(req.uri().query());
    let routed = (req.method() == Method::GET).then(|| routes::route(path)).flatten();
    let Some((endpoint, product)) = routed else {
        let mut c = lock(&shared.counters);
        c.call(None);
        c.status(404);
        return Ok(http_response(Reply::not_found("Not Found"), &[]));
    };
    lock(&shared.counters).call(Some(endpoint));

    let now = Instant::now();
    let admission = lock(&shared.limiter).admit(endpoint.class(), now);
    let settings = *lock(&shared.settings);
    let mut latency = settings.latency;
    let mut plan = None;
    {
        let mut faults = lock(&shared.faults);
        latency = latency.saturating_add(faults.jitter(settings.jitter));
        if matches!(admission, Admission::Accepted { .. }) {
            let p = faults.plan(endpoint, now);
            latency = latency.saturating_add(p.latency);
            plan = p.response;
        }
    }
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }

    let (limit, remaining, reset_at) = match admission {
        Admission::Rejected { limit, reset_at } => {
            let reply = too_many(&shared, settings, Some(limit), 0, reset_at);
            lock(&shared.counters).status(429);
            return Ok(reply);
        }
        Admission::Accepted { limit, remaining, reset_at } => (limit, remaining, reset_at),
    };

    match plan {
        Some(ResponseFault::Status(status)) => {
            let mut c = lock(&shared.counters);
            c.fault();
            c.status(status);
            drop(c);
            if status == 429 {
                let (limit, remaining, reset_at) =
                    lock(&shared.limiter).peek(endpoint.class(), Instant::now());
                return Ok(too_many(&shared, settings, limit, remaining, reset_at));
            }
            let reply = Reply::error(
                status,
                routes::error_id(status),
                StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Error"),
            );
            return Ok(http_response(reply, &[]));
        }
        Some(ResponseFault::ConnectionReset) => {
            lock(&shared.counters).fault();
            reset.store(true, Ordering::Relaxed);
            return Err(ResetConnection);
        }
        Some(ResponseFault::Stall(d)) => {
            lock(&shared.counters).fault();
            tokio::time::sleep(d).await;
        }
        Some(ResponseFault::MalformedBody | ResponseFault::TruncatedBody) | None => {}
    }

    if endpoint.class() == EndpointClass::Private {
        let auth = req.headers().get(hyper::header::AUTHORIZATION);
        let checked =
            jwt::check(auth.map(HeaderValue::as_bytes), shared.jwt_key.as_ref(), req.method().as_str(), path);
        if let Err(e) = checked {
            let mut c = lock(&shared.counters);
            c.auth_failure();
            c.status(401);
            return Ok(http_response(Reply::error(401, "UNAUTHENTICATED", e.message()), &[]));
        }
    }

    let accounts = Arc::clone(&lock(&shared.accounts));
    let ctx =
        Ctx { market: &shared.market, accounts: &accounts, seed: shared.seed, now: shared.clock.now_utc() };
    let handled = routes::handle(endpoint, product.as_deref(), &query, &ctx);
    let mut reply = handled.reply;
    {
        let mut c = lock(&shared.counters);
        if let Some(candle) = handled.candle {
            c.candle_request(candle);
        }
        c.status(reply.status);
        if matches!(plan, Some(ResponseFault::MalformedBody | ResponseFault::TruncatedBody)) {
            c.fault();
        }
    }
    let mut headers = Vec::new();
    if let Some(limit) = limit {
        headers = rate_limit_headers(&shared, limit, remaining, reset_at);
    }
    let truncate = match plan {
        Some(ResponseFault::MalformedBody) => {
            reply.body.truncate(reply.body.len() / 2);
            false
        }
        Some(ResponseFault::TruncatedBody) => true,
        _ => false,
    };
    let mut response = http_response(reply, &headers);
    if truncate {
        let body = response.body_mut();
        body.fail_after = true;
        if let Some(data) = &mut body.data {
            let half = data.len() / 2;
            data.truncate(half);
        }
    }
    Ok(response)
}

/// The `/__sim` control paths.
fn control(shared: &Arc<Shared>, method: &Method, rest: &str) -> Response<SimBody> {
    let handle = SimHandle { shared: Arc::clone(shared) };
    match (method, rest) {
        (&Method::GET, "/stats") => http_response(Reply::json(200, &handle.stats()), &[]),
        (&Method::POST, "/reset") => {
            handle.reset_stats();
            http_response(Reply::json(200, &handle.stats()), &[])
        }
        _ => http_response(Reply::not_found("unknown control path"), &[]),
    }
}

fn rate_limit_headers(
    shared: &Shared,
    limit: u32,
    remaining: u32,
    reset_at: Instant,
) -> Vec<(HeaderName, HeaderValue)> {
    let reset = shared.clock.utc_at(reset_at);
    let reset_secs = reset.unix_timestamp() + i64::from(reset.nanosecond() > 0);
    vec![
        (HeaderName::from_static("x-ratelimit-limit"), HeaderValue::from(limit)),
        (HeaderName::from_static("x-ratelimit-remaining"), HeaderValue::from(remaining)),
        (HeaderName::from_static("x-ratelimit-reset"), HeaderValue::from(reset_secs)),
    ]
}

/// A 429 as the rate limiter sends it.
fn too_many(
    shared: &Shared,
    settings: Settings,
    limit: Option<u32>,
    remaining: u32,
    reset_at: Instant,
) -> Response<SimBody> {
    let reply = if settings.html_429 {
        Reply { status: 429, content_type: "text/html", body: HTML_429_BODY.as_bytes().to_vec() }
    } else {
        Reply::error(429, "RATE_LIMIT_EXCEEDED", RATE_LIMIT_MESSAGE)
    };
    let mut headers = match limit {
        Some(limit) => rate_limit_headers(shared, limit, remaining, reset_at),
        None => Vec::new(),
    };
    if settings.retry_after {
        let wait = reset_at.saturating_duration_since(Instant::now());
        let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
        headers.push((RETRY_AFTER, HeaderValue::from(secs)));
    }
    http_response(reply, &headers)
}

fn http_response(reply: Reply, headers: &[(HeaderName, HeaderValue)]) -> Response<SimBody> {
    let mut response = Response::new(SimBody::full(reply.body));
    *response.status_mut() = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
    for (name, value) in headers {
        h.insert(name.clone(), value.clone());
    }
    response
}

/// A response body: whole, or (for [`Fault::truncated_body`]) a prefix that ends in an error so
/// hyper aborts the connection after announcing the full length.
#[derive(Debug)]
struct SimBody {
    data: Option<Bytes>,
    len: u64,
    fail_after: bool,
    /// Whether the body already answered `Pending` once after its prefix, which lets hyper
    /// flush the head and the prefix before the error aborts the connection.
    paused: bool,
}

impl SimBody {
    fn full(body: Vec<u8>) -> Self {
        SimBody {
            len: body.len() as u64,
            data: (!body.is_empty()).then(|| Bytes::from(body)),
            fail_after: false,
            paused: false,
        }
    }
}

/// The error a truncated body ends with.
#[derive(Debug)]
struct Truncated;

impl fmt::Display for Truncated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("body truncated by fault injection")
    }
}

impl std::error::Error for Truncated {}

impl Body for SimBody {
    type Data = Bytes;
    type Error = Truncated;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, Truncated>>> {
        let this = self.get_mut();
        if let Some(data) = this.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if this.fail_after && !this.paused {
            this.paused = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if this.fail_after {
            this.fail_after = false;
            return Poll::Ready(Some(Err(Truncated)));
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && !self.fail_after
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len)
    }
}

/// A TCP stream that, once `reset` is set, skips the orderly shutdown and closes with RST.
struct ResettableStream {
    inner: TcpStream,
    reset: Arc<AtomicBool>,
}

impl Drop for ResettableStream {
    fn drop(&mut self) {
        if self.reset.load(Ordering::Relaxed) {
            let _ = self.inner.set_zero_linger();
        }
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.reset.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}
