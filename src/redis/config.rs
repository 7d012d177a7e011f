//! The knobs of a [`SharedTier`], the shape of its upstream calls ([`CallProfile`]), and its
//! builder.

use std::{
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use ::redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use super::{Counters, Inner, SharedTier, codec::Keys, health::Health, manager_config, ping};
use crate::{
    clock::Clock,
    coinbase::CoinbaseClient,
    error::{Error, Result},
    limiter::{ClassLimit, EndpointClass, RateLimiter, RateLimiterConfig},
    source::MarketDataSource,
    util::setters,
};

/// The knobs of a [`SharedTier`]. Plain data, so it can be loaded from a file (durations in
/// milliseconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SharedTierConfig {
    /// The first part of every key, to keep several deployments apart in one Redis.
    /// Default `"tickshare"`.
    pub namespace: String,
    /// How many tiers share the budget at most: every process, times every key of the
    /// [`account_identity`](Self::account_identity) it runs. Only used to size each tier's share
    /// of the limit while Redis is unreachable. Default 4.
    pub expected_workers: u32,
    /// The Coinbase user whose budget the tier draws from: any stable name of the user, the
    /// same for all of its keys (see
    /// [`CoinbaseClientBuilder::account_identity`](crate::CoinbaseClientBuilder::account_identity)).
    /// Coinbase limits private requests per user and requires one key per portfolio, so with an
    /// identity the rate-limit keys (and the pause after a 429) derive from it and every key of
    /// the user shares them; the cache keys stay per API key (accounts are per portfolio).
    /// Default `None`: the budget is the API key's, as before. [`SharedTier::coinbase`] takes
    /// the client's identity.
    pub account_identity: Option<String>,
    /// How long a ticker is shared. A bot can see a ticker as old as this plus the coordinated
    /// source's own `ticker_ttl`. Default 2 s.
    #[serde(with = "crate::util::duration_ms")]
    pub ticker_ttl: Duration,
    /// How long accounts are shared. Default 2 s; call [`SharedTier::invalidate_accounts`]
    /// after placing an order.
    #[serde(with = "crate::util::duration_ms")]
    pub accounts_ttl: Duration,
    /// How long candles of closed buckets are shared (they never change). Default 1 h.
    #[serde(with = "crate::util::duration_ms")]
    pub closed_candles_ttl: Duration,
    /// Candles that include the bucket in progress are shared until it closes, plus this.
    /// Default 500 ms.
    #[serde(with = "crate::util::duration_ms")]
    pub candle_grace: Duration,
    /// How long an unknown product is remembered. Default 10 s.
    #[serde(with = "crate::util::duration_ms")]
    pub negative_ttl: Duration,
    /// How long a transient upstream error (429, 5xx, timeout, transport) is handed to the
    /// processes that waited for the same key. Default 500 ms.
    #[serde(with = "crate::util::duration_ms")]
    pub error_ttl: Duration,
    /// How long a lease outlives its holder's last heartbeat (the wait after a holder dies).
    /// Default 2 s.
    #[serde(with = "crate::util::duration_ms")]
    pub lease_ttl: Duration,
    /// How often a process waiting for another's fetch looks for the value. Default 10 ms.
    #[serde(with = "crate::util::duration_ms")]
    pub lease_poll: Duration,
    /// The longest wait for another process's fetch; then the call fails with
    /// [`Error::Timeout`]. Default 15 s (the limiter's `max_wait` plus a request timeout).
    #[serde(with = "crate::util::duration_ms")]
    pub lease_wait_max: Duration,
    /// Time allowed for one Redis operation (and to connect). Default 500 ms.
    #[serde(with = "crate::util::duration_ms")]
    pub redis_timeout: Duration,
    /// How often Redis is probed while unreachable. Default 1 s.
    #[serde(with = "crate::util::duration_ms")]
    pub reconnect_interval: Duration,
}

impl Default for SharedTierConfig {
    fn default() -> Self {
        SharedTierConfig {
            namespace: "tickshare".into(),
            expected_workers: 4,
            account_identity: None,
            ticker_ttl: Duration::from_secs(2),
            accounts_ttl: Duration::from_secs(2),
            closed_candles_ttl: Duration::from_secs(3600),
            candle_grace: Duration::from_millis(500),
            negative_ttl: Duration::from_secs(10),
            error_ttl: Duration::from_millis(500),
            lease_ttl: Duration::from_secs(2),
            lease_poll: Duration::from_millis(10),
            lease_wait_max: Duration::from_secs(15),
            redis_timeout: Duration::from_millis(500),
            reconnect_interval: Duration::from_secs(1),
        }
    }
}

impl SharedTierConfig {
    /// Check the settings.
    ///
    /// # Errors
    /// [`Error::Config`] naming the bad setting and what it must be.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(m.to_string()));
        if self.namespace.is_empty() || self.namespace.contains(char::is_whitespace) {
            return bad("namespace must be non-empty and without whitespace");
        }
        if self.expected_workers == 0 {
            return bad("expected_workers must be at least 1");
        }
        if self.account_identity.as_deref().is_some_and(|id| id.trim().is_empty()) {
            return bad("account_identity must not be empty");
        }
        let durations = [
            self.ticker_ttl,
            self.accounts_ttl,
            self.closed_candles_ttl,
            self.negative_ttl,
            self.error_ttl,
            self.lease_ttl,
            self.lease_poll,
            self.lease_wait_max,
            self.redis_timeout,
            self.reconnect_interval,
        ];
        if durations.iter().any(|d| d.as_millis() == 0) {
            return bad("every TTL, lease, poll, timeout and interval must be at least 1 ms");
        }
        if self.lease_ttl <= self.redis_timeout {
            return bad(
                "lease_ttl must be longer than redis_timeout, or heartbeats cannot keep leases alive",
            );
        }
        Ok(())
    }
}

/// How the upstream turns trait calls into HTTP requests, so that the tier can make each
/// upstream call exactly one request and charge it to the right class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CallProfile {
    /// The class of `ticker` and `candles` requests.
    pub market_data_class: EndpointClass,
    /// The class of `tickers` requests.
    pub tickers_class: EndpointClass,
    /// Products per `tickers` request (1: the upstream sends one request per product).
    pub tickers_per_request: usize,
    /// Most candle buckets per request (the client's default, 300: what Coinbase enforces).
    pub candles_per_request: u32,
    /// Accounts per page (Coinbase: 250).
    pub accounts_per_page: u32,
}

impl Default for CallProfile {
    /// A [`CoinbaseClient`] with credentials and its default settings: market data on the
    /// private paths, 100 products per `best_bid_ask`, 300 candles, 250 accounts per page.
    fn default() -> Self {
        CallProfile {
            market_data_class: EndpointClass::Private,
            tickers_class: EndpointClass::Private,
            tickers_per_request: 100,
            candles_per_request: crate::coinbase::OBSERVED_MAX_CANDLES_PER_REQUEST,
            accounts_per_page: 250,
        }
    }
}

impl CallProfile {
    /// The profile of `client`: its market-data class, its `tickers` class and chunk
    /// ([`CoinbaseClient::tickers_class`], [`CoinbaseClient::tickers_chunk`]), its candle chunk.
    pub fn coinbase(client: &CoinbaseClient) -> Self {
        let tickers_class = client.tickers_class();
        let tickers_per_request = client.tickers_chunk();
        CallProfile {
            market_data_class: client.market_data_class(),
            tickers_class,
            tickers_per_request,
            candles_per_request: client.candle_max_buckets(),
            ..CallProfile::default()
        }
    }

    pub(super) fn validate(&self) -> Result<()> {
        if self.tickers_per_request == 0 || self.candles_per_request == 0 || self.accounts_per_page == 0 {
            return Err(Error::Config(
                "tickers_per_request, candles_per_request and accounts_per_page must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// Builder of a [`SharedTier`]; from [`SharedTier::builder`] or [`SharedTier::coinbase`].
#[must_use]
pub struct SharedTierBuilder {
    pub(super) redis_url: String,
    pub(super) api_key_id: String,
    pub(super) upstream: Arc<dyn MarketDataSource>,
    pub(super) cfg: SharedTierConfig,
    pub(super) limits: RateLimiterConfig,
    pub(super) fallback: Option<RateLimiterConfig>,
    pub(super) profile: CallProfile,
    pub(super) clock: Clock,
}

impl fmt::Debug for SharedTierBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may carry a password: not printed.
        f.debug_struct("SharedTierBuilder")
            .field("config", &self.cfg)
            .field("profile", &self.profile)
            .finish_non_exhaustive()
    }
}

impl SharedTierBuilder {
    setters! {
        /// See [`SharedTierConfig::expected_workers`].
        expected_workers: u32,
        /// See [`SharedTierConfig::ticker_ttl`].
        ticker_ttl: Duration,
        /// See [`SharedTierConfig::accounts_ttl`].
        accounts_ttl: Duration,
        /// See [`SharedTierConfig::closed_candles_ttl`].
        closed_candles_ttl: Duration,
        /// See [`SharedTierConfig::candle_grace`].
        candle_grace: Duration,
        /// See [`SharedTierConfig::negative_ttl`].
        negative_ttl: Duration,
        /// See [`SharedTierConfig::error_ttl`].
        error_ttl: Duration,
        /// See [`SharedTierConfig::lease_ttl`].
        lease_ttl: Duration,
        /// See [`SharedTierConfig::lease_poll`].
        lease_poll: Duration,
        /// See [`SharedTierConfig::lease_wait_max`].
        lease_wait_max: Duration,
        /// See [`SharedTierConfig::redis_timeout`].
        redis_timeout: Duration,
        /// See [`SharedTierConfig::reconnect_interval`].
        reconnect_interval: Duration,
    }

    /// See [`SharedTierConfig::namespace`].
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.cfg.namespace = namespace.into();
        self
    }

    /// See [`SharedTierConfig::account_identity`].
    pub fn account_identity(mut self, identity: impl Into<String>) -> Self {
        self.cfg.account_identity = Some(identity.into());
        self
    }

    /// Replace the whole configuration.
    pub fn config(mut self, cfg: SharedTierConfig) -> Self {
        self.cfg = cfg;
        self
    }

    /// The budget shared by every process (default [`RateLimiterConfig::default`]: Coinbase's
    /// limits at the in-process margins). `max_wait` bounds each call's wait for a slot;
    /// `max_waiters` bounds this process's queue; the backoff and ramp settings apply to the
    /// shared pause after a 429.
    pub fn limits(mut self, limits: RateLimiterConfig) -> Self {
        self.limits = limits;
        self
    }

    /// This process's limiter while Redis is unreachable. By default each class gets
    /// `(rate + burst) / expected_workers` requests per window of the shared budget (steady
    /// rate one less, burst 1), so the shares of all processes add up to no more than the
    /// budget; a class whose share would be below 2 sends nothing while Redis is down.
    pub fn fallback_limits(mut self, limits: RateLimiterConfig) -> Self {
        self.fallback = Some(limits);
        self
    }

    /// How the upstream maps calls to requests (default [`CallProfile::default`];
    /// [`SharedTier::coinbase`] sets it from the client).
    pub fn profile(mut self, profile: CallProfile) -> Self {
        self.profile = profile;
        self
    }

    /// The clock for candle boundaries and fetched-at times (default [`Clock::system`]).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Connect and build the tier. An unreachable Redis is not an error: the tier starts
    /// degraded (see the [module docs](crate::redis)) and connects when Redis comes up.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid setting or a `redis_url` that is not a `redis://` URL
    /// (`rediss://` needs TLS, which this build does not include).
    ///
    /// # Cancel safety
    /// Cancel safe: nothing outlives a dropped call but an idle connection attempt.
    pub async fn build(self) -> Result<SharedTier> {
        self.cfg.validate()?;
        self.limits.validate()?;
        self.profile.validate()?;
        if self.api_key_id.is_empty() {
            return Err(Error::Config("api_key_id must not be empty".into()));
        }
        let (fallback_cfg, closed) = match self.fallback {
            Some(cfg) => (cfg, [false, false]),
            None => fallback_share(&self.limits, self.cfg.expected_workers),
        };
        let fallback = RateLimiter::new(fallback_cfg)?;
        let client = ::redis::Client::open(self.redis_url.as_str()).map_err(|_| {
            Error::Config("redis_url is not a valid redis:// URL (rediss:// needs TLS, not included)".into())
        })?;
        let target = client.get_connection_info().addr().to_string();
        let manager_cfg = manager_config(&self.cfg);
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_cfg)
            .map_err(|e| Error::Config(format!("could not set up the redis connection: {e}")))?;
        let up = ping(&conn, self.cfg.redis_timeout).await;
        if !up {
            tracing::warn!(
                redis = %target,
                "redis unreachable at start; running in-process on a conservative share of the rate limit"
            );
        }
        let keys = Keys::new(&self.cfg.namespace, &self.api_key_id, self.cfg.account_identity.as_deref());
        let health = Health::new(up, self.cfg.reconnect_interval);
        Ok(SharedTier {
            inner: Arc::new(Inner {
                upstream: self.upstream,
                limits: self.limits,
                profile: self.profile,
                clock: self.clock,
                keys,
                target,
                client,
                conn: Mutex::new(conn),
                health,
                fallback,
                fallback_closed: closed,
                queues: [tokio::sync::Mutex::new(()), tokio::sync::Mutex::new(())],
                counters: Counters::default(),
                invalidations: std::sync::OnceLock::new(),
                alive: tokio::sync::watch::channel(()).0,
                cfg: self.cfg,
            }),
        })
    }
}

/// The default per-process share of `limits` for `workers` processes, and which classes have
/// no share at all.
pub(super) fn fallback_share(limits: &RateLimiterConfig, workers: u32) -> (RateLimiterConfig, [bool; 2]) {
    let share = |l: ClassLimit| -> Option<ClassLimit> {
        let per_window = (l.rate_per_second.get() + l.burst.get()) / workers.max(1);
        let rate = std::num::NonZeroU32::new(per_window.checked_sub(1)?)?;
        Some(ClassLimit {
            limit_per_second: l.limit_per_second,
            rate_per_second: rate,
            burst: std::num::NonZeroU32::MIN,
        })
    };
    // A closed class keeps a valid placeholder; the tier never draws from it.
    let placeholder = |l: ClassLimit| ClassLimit {
        rate_per_second: std::num::NonZeroU32::MIN,
        burst: std::num::NonZeroU32::MIN,
        ..l
    };
    let public = share(limits.public);
    let private = share(limits.private);
    let cfg = RateLimiterConfig {
        public: public.unwrap_or_else(|| placeholder(limits.public)),
        private: private.unwrap_or_else(|| placeholder(limits.private)),
        ..limits.clone()
    };
    (cfg, [public.is_none(), private.is_none()])
}
