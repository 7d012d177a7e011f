//! Configuring a simulated exchange: products, accounts, limits, latency, and `start`.

use std::{
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Duration,
};

use rust_decimal::Decimal;
use tokio::{net::TcpListener, sync::watch};

use super::{
    CandleLimit, Settings, Shared, SimExchange, SimHandle,
    faults::FaultBook,
    limits::Limiter,
    market::{self, Market},
    server::serve,
    stats::Counters,
    ws,
};
use crate::{
    clock::Clock,
    coinbase::auth::VerifyingKey,
    error::{Error, Result},
    limiter::EndpointClass,
    model::ProductId,
};

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
    pub(super) currency: String,
    pub(super) available: Decimal,
    pub(super) hold: Decimal,
    pub(super) account_type: Option<String>,
    pub(super) name: Option<String>,
    pub(super) active: bool,
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
    pub(super) products: SimProducts,
    pub(super) seed: u64,
    pub(super) clock: Option<Clock>,
    pub(super) public_limit: u32,
    pub(super) private_limit: u32,
    pub(super) enforce_limits: bool,
    pub(super) candle_limit: CandleLimit,
    pub(super) latency: Duration,
    pub(super) jitter: Duration,
    pub(super) jwt_public_key_pem: Option<String>,
    pub(super) clock_skew: time::Duration,
    pub(super) jwt_leeway: Duration,
    pub(super) html_429: bool,
    pub(super) retry_after: bool,
    pub(super) accounts: Vec<SimAccount>,
    pub(super) port: u16,
    pub(super) shutdown_grace: Duration,
    pub(super) ws: ws::WsConfig,
}

impl Default for SimBuilder {
    fn default() -> Self {
        SimBuilder {
            products: SimProducts::default(),
            seed: 0x5EED,
            clock: None,
            public_limit: EndpointClass::Public.coinbase_limit(),
            private_limit: EndpointClass::Private.coinbase_limit(),
            enforce_limits: true,
            candle_limit: CandleLimit::Observed,
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            jwt_public_key_pem: None,
            clock_skew: time::Duration::ZERO,
            jwt_leeway: Duration::from_secs(super::jwt::LEEWAY_SECS.unsigned_abs()),
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
    /// [`SimStats::max_requests_in_any_1s`](crate::sim::SimStats::max_requests_in_any_1s) is still recorded.
    pub fn enforce_rate_limits(mut self, enforce: bool) -> Self {
        self.enforce_limits = enforce;
        self
    }

    /// Which candle-window rule to enforce (default [`CandleLimit::Observed`]: at most 300
    /// buckets per request, as the real exchange answers; [`CandleLimit::Documented`] allows the
    /// documented 350).
    pub fn candle_limit(mut self, limit: CandleLimit) -> Self {
        self.candle_limit = limit;
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

    /// The exchange's clock runs `skew` ahead of the host's (negative: behind): `/time`
    /// answers with it, and a pinned key's JWTs are judged by it (`nbf`, `exp`). Default zero.
    /// With [`jwt_leeway`](SimBuilder::jwt_leeway) zero, a client that mints tokens from its
    /// own clock is refused as soon as its clock is ahead of the exchange's.
    pub fn clock_skew(mut self, skew: time::Duration) -> Self {
        self.clock_skew = skew;
        self
    }

    /// How far outside `nbf`..`exp` a pinned key's JWT is still accepted (default 5 s; Coinbase
    /// has been seen refusing a token minted about a second ahead).
    pub fn jwt_leeway(mut self, leeway: Duration) -> Self {
        self.jwt_leeway = leeway;
        self
    }

    /// Verify JWTs against this P-256 (ES256) or Ed25519 (EdDSA) public key (PEM,
    /// `-----BEGIN PUBLIC KEY-----`, as [`Credentials::public_key_pem`](crate::Credentials::public_key_pem) writes it). Without it
    /// any well-formed JWT is accepted.
    pub fn jwt_public_key_pem(mut self, pem: &str) -> Self {
        self.jwt_public_key_pem = Some(pem.to_string());
        self
    }

    /// Answer 429s with Coinbase's HTML page ([`HTML_429_BODY`](crate::sim::HTML_429_BODY), `text/html`) instead of JSON.
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
            candle_limit: self.candle_limit,
            jwt_key,
            clock_skew: self.clock_skew,
            jwt_leeway_secs: i64::try_from(self.jwt_leeway.as_secs()).unwrap_or(i64::MAX),
            accounts: Mutex::new(Arc::new(self.accounts)),
            orders: Mutex::new(super::orders::OrderBook::default()),
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
