//! [`SharedTier`]: a shared tier on Redis, so that many worker processes on one API key act as
//! one client (feature `redis`).
//!
//! A [`CoordinatedSource`](crate::CoordinatedSource) coordinates the bots of **one** process.
//! Run the same bots in K processes and each has its own cache, its own single-flight and its
//! own rate limiter: K times the upstream calls, and K budgets that together exceed the
//! exchange's limit. The shared tier sits **under** each process's coordinated source (L1) and
//! above the real client:
//!
//! ```text
//! process 1: bots ─► CoordinatedSource (L1) ─► SharedTier ─┐            ┌─► CoinbaseClient ─► exchange
//! process 2: bots ─► CoordinatedSource (L1) ─► SharedTier ─┼─► Redis ◄──┤    (.unlimited())
//! process K: bots ─► CoordinatedSource (L1) ─► SharedTier ─┘   L2 cache, leases, one rate limit
//! ```
//!
//! Each call of the [`MarketDataSource`] trait:
//!
//! 1. **L2 lookup** in Redis, for every key of the call in one atomic script.
//! 2. **Lease** each missing key (`SET NX PX`, in the same script): one process fetches it;
//!    the others wait for its value (polling on the tokio clock) and take the lease over if its
//!    holder dies (it expires after `lease_ttl` once its heartbeat stops).
//! 3. **Distributed rate limit** before each upstream request: one GCRA budget per API key and
//!    endpoint class for all processes, atomic in a Lua script on Redis's clock, with the same
//!    margins as the in-process [`RateLimiter`] ([`ClassLimit`]: 24/s + burst 5 of Coinbase's
//!    30/s private, 8/s + 1 of 10/s public). A 429 seen by any process pauses every process
//!    (a shared pause key), with the same backoff and half-rate ramp as the in-process limiter.
//! 4. **Store** the result with its fetched-at wall time and a TTL: tickers and accounts a few
//!    seconds, candles of closed buckets an hour, candles with the bucket in progress until it
//!    closes (plus a grace), unknown products as negative entries, transient upstream errors for
//!    half a second so that every waiter gets the same error instead of retrying at once.
//!
//! The tier splits every call into upstream calls of **one HTTP request each**: tickers into
//! chunks of [`CallProfile::tickers_per_request`] products, candle ranges into at most
//! [`CallProfile::candles_per_request`] buckets. So a limiter slot is exactly one request. (A
//! coordinated source above already batches tickers and asks for short candle ranges, so most
//! calls pass through whole.) Accounts are one request per page of 250; the rare extra pages are
//! charged to the budget after the fact.
//!
//! # Wiring
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use tickshare::{CoinbaseClient, CoordinatedSource, Credentials, SharedTier};
//! let credentials = Credentials::from_env()?;
//! let key_id = credentials.key_name().to_string();
//! // The tier gates every request itself: build the client without its own limiter.
//! let client = CoinbaseClient::builder().credentials(credentials).unlimited().build()?;
//! let tier = SharedTier::coinbase("redis://127.0.0.1:6379", &key_id, client)
//!     .expected_workers(4) // sizes each process's share when Redis is unreachable
//!     .build()
//!     .await?;
//! let source = CoordinatedSource::builder(tier.clone()).build()?; // the in-process L1
//! # Ok(()) }
//! ```
//!
//! # When Redis is unreachable
//!
//! The tier never fails a call because of Redis. It logs a warning, counts the outage in
//! [`SharedTierStats`], and serves calls in-process: straight to the upstream, through a local
//! [`RateLimiter`] sized to a conservative share of the limit (by default the shared budget
//! divided by [`SharedTierConfig::expected_workers`]; see [`SharedTierBuilder::fallback_limits`]),
//! after one quiet window of 1 s so that requests the shared limiter admitted just before the
//! failure cannot add up with the local ones. Every `reconnect_interval` one call probes Redis;
//! once it answers, a handover period follows in which calls pass both the local share and the
//! shared limiter ([`TierMode::Handover`]), so processes that have not noticed the recovery yet
//! cannot add up with one that has. Only a partition that cuts off *some* processes from Redis
//! for longer than the handover, while the others reach it, can exceed the limit: size
//! `expected_workers` for the largest fleet you run, and keep Redis next to the workers.
//!
//! If a share rounds down to fewer than two requests per window (more workers than the class
//! allows, e.g. five workers on the public 10/s class), that class sends nothing while Redis is
//! down: its calls fail at once with a local [`Error::RateLimited`], and the coordinated source
//! above serves stale data.
//!
//! # Keys
//!
//! Every key starts with `{namespace}:{16 hex digits of a hash of the API key id}:` (see
//! [`SharedTier::key_prefix`]): `t:{product}` tickers, `c:{product}:{granularity}:{start}:{end}`
//! candles, `a` accounts, each with a `:lease` twin while being fetched, and
//! `rl:{class}:{tat,pause,ramp,strikes}` for the rate limiter. Values are `ts1:` and JSON. Every
//! key has a TTL, so the tier needs no cleanup; point it at a Redis without persistence
//! (`--save '' --appendonly no`).
//!
//! # Time
//!
//! The tier's own waits (lease polls, limiter waits, the quiet window, reconnect probes) use
//! `tokio::time`; Redis runs in real time and the limiter reads Redis's clock, so a test of the
//! tier against a real Redis runs in real time. (Under `tokio::time::pause`, an idle runtime
//! jumps past `redis_timeout` while a Redis answer is on its way, and the tier would take Redis
//! for down.) Without Redis, the degraded path is paused-clock friendly.

mod codec;
mod flight;
mod health;
mod scripts;
#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use ::redis::{
    RedisResult,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

pub use self::health::TierMode;
use self::{
    codec::Keys,
    flight::{Answer, BoxFut, FetchFn, Fetched},
    health::{Health, Path, WINDOW},
};
use crate::{
    clock::Clock,
    coinbase::CoinbaseClient,
    error::{Error, Result},
    limiter::{ClassLimit, EndpointClass, LimiterStats, RateLimiter, RateLimiterConfig},
    model::{Account, Candle, CandleRange, Granularity, ProductId, Ticker},
    source::{MarketDataSource, distinct},
    util::{add, inc, lock},
};

/// The knobs of a [`SharedTier`]. Plain data, so it can be loaded from a file (durations in
/// milliseconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SharedTierConfig {
    /// The first part of every key, to keep several deployments apart in one Redis.
    /// Default `"tickshare"`.
    pub namespace: String,
    /// How many processes share the API key at most. Only used to size each process's share of
    /// the limit while Redis is unreachable. Default 4.
    pub expected_workers: u32,
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
    /// Most candle buckets per request (Coinbase: 350).
    pub candles_per_request: u32,
    /// Accounts per page (Coinbase: 250).
    pub accounts_per_page: u32,
}

impl Default for CallProfile {
    /// A [`CoinbaseClient`] with credentials and its default settings: market data on the
    /// private paths, 100 products per `best_bid_ask`, 350 candles, 250 accounts per page.
    fn default() -> Self {
        CallProfile {
            market_data_class: EndpointClass::Private,
            tickers_class: EndpointClass::Private,
            tickers_per_request: 100,
            candles_per_request: crate::coinbase::MAX_CANDLES_PER_REQUEST,
            accounts_per_page: 250,
        }
    }
}

impl CallProfile {
    /// The profile of `client`: its market-data class, its `best_bid_ask` chunk with
    /// credentials (one public ticker request per product without), its candle chunk.
    pub fn coinbase(client: &CoinbaseClient) -> Self {
        let (tickers_class, tickers_per_request) = if client.has_credentials() {
            (EndpointClass::Private, client.best_bid_ask_chunk())
        } else {
            (client.market_data_class(), 1)
        };
        CallProfile {
            market_data_class: client.market_data_class(),
            tickers_class,
            tickers_per_request,
            candles_per_request: client.candle_max_buckets(),
            ..CallProfile::default()
        }
    }

    fn validate(&self) -> Result<()> {
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
    redis_url: String,
    api_key_id: String,
    upstream: Arc<dyn MarketDataSource>,
    cfg: SharedTierConfig,
    limits: RateLimiterConfig,
    fallback: Option<RateLimiterConfig>,
    profile: CallProfile,
    clock: Clock,
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

macro_rules! setters {
    ($($(#[$m:meta])* $name:ident: $ty:ty),* $(,)?) => {
        $( $(#[$m])* pub fn $name(mut self, v: $ty) -> Self { self.cfg.$name = v; self } )*
    };
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
    /// degraded (see the [module docs](self)) and connects when Redis comes up.
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
        let keys = Keys::new(&self.cfg.namespace, &self.api_key_id);
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
                cfg: self.cfg,
            }),
        })
    }
}

/// The default per-process share of `limits` for `workers` processes, and which classes have
/// no share at all.
fn fallback_share(limits: &RateLimiterConfig, workers: u32) -> (RateLimiterConfig, [bool; 2]) {
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

fn manager_config(cfg: &SharedTierConfig) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(cfg.redis_timeout))
        .set_response_timeout(Some(cfg.redis_timeout))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(cfg.reconnect_interval)
}

async fn ping(conn: &ConnectionManager, timeout: Duration) -> bool {
    let mut c = conn.clone();
    let r = tokio::time::timeout(timeout, ::redis::cmd("PING").query_async::<String>(&mut c)).await;
    matches!(r, Ok(Ok(_)))
}

/// Redis failed during a call; the health state already knows. The call goes on in-process.
#[derive(Debug)]
pub(crate) struct RedisDown;

#[derive(Debug, Default)]
pub(crate) struct Counters {
    l2_hits: AtomicU64,
    l2_misses: AtomicU64,
    leases_acquired: AtomicU64,
    lease_waits: AtomicU64,
    lease_waits_served: AtomicU64,
    lease_takeovers: AtomicU64,
    lease_wait_timeouts: AtomicU64,
    decode_failures: AtomicU64,
    upstream_calls: AtomicU64,
    upstream_errors: AtomicU64,
    rate_limited_429: AtomicU64,
    shared_acquired: AtomicU64,
    shared_waits: AtomicU64,
    shared_wait_nanos: AtomicU64,
    shared_rejected_local: AtomicU64,
    shared_pauses: AtomicU64,
    degraded_calls: AtomicU64,
    degraded_refused: AtomicU64,
}

struct Inner {
    upstream: Arc<dyn MarketDataSource>,
    cfg: SharedTierConfig,
    limits: RateLimiterConfig,
    profile: CallProfile,
    clock: Clock,
    keys: Keys,
    /// `host:port` of Redis, for logs (never the URL: it may carry a password).
    target: String,
    client: ::redis::Client,
    /// Replaced by a fresh manager when a probe succeeds after an outage. A std mutex: only
    /// held to clone or swap.
    conn: Mutex<ConnectionManager>,
    health: Health,
    fallback: RateLimiter,
    /// Classes with no share while Redis is down (public, private).
    fallback_closed: [bool; 2],
    /// One local FIFO per class in front of the shared limiter, so that only the head of this
    /// process's queue polls Redis for a slot (held across awaits: a tokio mutex, which is fair).
    queues: [tokio::sync::Mutex<()>; 2],
    counters: Counters,
}

fn class_index(class: EndpointClass) -> usize {
    match class {
        EndpointClass::Public => 0,
        EndpointClass::Private => 1,
    }
}

/// The shared tier: an L2 cache, cross-process leases and one distributed rate limit on Redis,
/// over any upstream [`MarketDataSource`]; in-process with a conservative share of the limit
/// while Redis is unreachable. Cheap to clone; clones share everything. See the
/// [module docs](self).
#[derive(Clone)]
pub struct SharedTier {
    inner: Arc<Inner>,
}

impl fmt::Debug for SharedTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedTier")
            .field("redis", &self.inner.target)
            .field("key_prefix", &self.inner.keys.prefix())
            .field("mode", &self.inner.health.mode())
            .finish_non_exhaustive()
    }
}

/// Counters of the distributed rate limiter, as seen by one process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedLimiterStats {
    /// Slots this process took.
    pub acquired: u64,
    /// Slots it had to wait for.
    pub waits: u64,
    /// Total time spent waiting, milliseconds.
    pub total_wait_ms: u64,
    /// Calls refused locally because the wait would have exceeded `max_wait` (nothing sent).
    pub rejected_local: u64,
    /// Shared pauses this process set after a 429.
    pub pauses_set: u64,
}

/// A snapshot of one process's [`SharedTier`] counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedTierStats {
    /// The regime now.
    pub mode: TierMode,
    /// Keys found in Redis at the first look.
    pub l2_hits: u64,
    /// Keys this process had to fetch itself (a lease taken at the first look, or an unreadable
    /// value).
    pub l2_misses: u64,
    /// Leases taken.
    pub leases_acquired: u64,
    /// Keys for which this process waited for another's fetch.
    pub lease_waits: u64,
    /// Of those, keys whose value arrived while waiting.
    pub lease_waits_served: u64,
    /// Of those, keys whose holder vanished: the lease expired (or was released after a
    /// failure) and this process fetched itself.
    pub lease_takeovers: u64,
    /// Of those, keys that were still leased after `lease_wait_max`.
    pub lease_wait_timeouts: u64,
    /// Values of another format version (or damaged), fetched again and overwritten.
    pub decode_failures: u64,
    /// Calls this process made to the upstream (one HTTP request each).
    pub upstream_calls: u64,
    /// Of those, the ones that failed.
    pub upstream_errors: u64,
    /// Of those, the ones the exchange answered with 429.
    pub rate_limited_429: u64,
    /// The distributed rate limiter.
    pub shared_limiter: SharedLimiterStats,
    /// Redis operations that failed or timed out.
    pub redis_errors: u64,
    /// Times this process lost Redis (including an unreachable Redis at start).
    pub outages: u64,
    /// Times it got Redis back.
    pub recoveries: u64,
    /// Trait calls (or parts of calls) served without Redis.
    pub degraded_calls: u64,
    /// Of those, calls refused because their class has no share while Redis is down.
    pub degraded_refused: u64,
    /// How long the current outage has lasted, milliseconds (0 when Redis is reachable).
    pub degraded_for_ms: u64,
    /// The in-process limiter used while Redis is unreachable (and during the handover).
    pub fallback_limiter: LimiterStats,
}

impl SharedTier {
    /// A builder over any upstream, for the API key `api_key_id` (all processes that share the
    /// key must use the same id and namespace; the id is hashed into key names, never stored).
    /// Give the upstream no rate limiter of its own (e.g. [`CoinbaseClient`] built with
    /// [`unlimited`](crate::CoinbaseClientBuilder::unlimited)): the tier gates every request.
    pub fn builder(
        redis_url: impl Into<String>,
        api_key_id: impl AsRef<str>,
        upstream: impl MarketDataSource + 'static,
    ) -> SharedTierBuilder {
        Self::builder_arc(redis_url, api_key_id, Arc::new(upstream))
    }

    /// A builder over a shared upstream.
    pub fn builder_arc(
        redis_url: impl Into<String>,
        api_key_id: impl AsRef<str>,
        upstream: Arc<dyn MarketDataSource>,
    ) -> SharedTierBuilder {
        SharedTierBuilder {
            redis_url: redis_url.into(),
            api_key_id: api_key_id.as_ref().to_string(),
            upstream,
            cfg: SharedTierConfig::default(),
            limits: RateLimiterConfig::default(),
            fallback: None,
            profile: CallProfile::default(),
            clock: Clock::system(),
        }
    }

    /// A builder over a [`CoinbaseClient`], with the [`CallProfile`] read from the client.
    /// Build the client with [`unlimited`](crate::CoinbaseClientBuilder::unlimited): its own
    /// per-process limiter would only add a second, smaller budget.
    pub fn coinbase(
        redis_url: impl Into<String>,
        api_key_id: impl AsRef<str>,
        client: CoinbaseClient,
    ) -> SharedTierBuilder {
        if client.rate_limiter().is_some() {
            tracing::debug!("the client keeps its own rate limiter under a SharedTier; prefer .unlimited()");
        }
        let profile = CallProfile::coinbase(&client);
        Self::builder(redis_url, api_key_id, client).profile(profile)
    }

    /// The regime now.
    pub fn mode(&self) -> TierMode {
        self.inner.health.mode()
    }

    /// The prefix of every key of this tier: `{namespace}:{hash of the API key id}:`.
    pub fn key_prefix(&self) -> &str {
        self.inner.keys.prefix()
    }

    /// The configuration in force.
    pub fn config(&self) -> &SharedTierConfig {
        &self.inner.cfg
    }

    /// The call profile in force.
    pub fn profile(&self) -> &CallProfile {
        &self.inner.profile
    }

    /// The in-process limiter used while Redis is unreachable.
    pub fn fallback_limiter(&self) -> &RateLimiter {
        &self.inner.fallback
    }

    /// A snapshot of this process's counters.
    pub fn stats(&self) -> SharedTierStats {
        let c = &self.inner.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let h = &self.inner.health;
        SharedTierStats {
            mode: h.mode(),
            l2_hits: g(&c.l2_hits),
            l2_misses: g(&c.l2_misses),
            leases_acquired: g(&c.leases_acquired),
            lease_waits: g(&c.lease_waits),
            lease_waits_served: g(&c.lease_waits_served),
            lease_takeovers: g(&c.lease_takeovers),
            lease_wait_timeouts: g(&c.lease_wait_timeouts),
            decode_failures: g(&c.decode_failures),
            upstream_calls: g(&c.upstream_calls),
            upstream_errors: g(&c.upstream_errors),
            rate_limited_429: g(&c.rate_limited_429),
            shared_limiter: SharedLimiterStats {
                acquired: g(&c.shared_acquired),
                waits: g(&c.shared_waits),
                total_wait_ms: g(&c.shared_wait_nanos) / 1_000_000,
                rejected_local: g(&c.shared_rejected_local),
                pauses_set: g(&c.shared_pauses),
            },
            redis_errors: g(&h.redis_errors),
            outages: g(&h.outages),
            recoveries: g(&h.recoveries),
            degraded_calls: g(&c.degraded_calls),
            degraded_refused: g(&c.degraded_refused),
            degraded_for_ms: h.degraded_for().map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            fallback_limiter: self.inner.fallback.stats(),
        }
    }

    /// Forget the shared accounts, e.g. after placing an order (call
    /// [`CoordinatedSource::invalidate_accounts`](crate::CoordinatedSource::invalidate_accounts)
    /// on the source above too).
    ///
    /// # Errors
    /// [`Error::Transport`] when Redis cannot be reached (the entry then expires by its TTL).
    ///
    /// # Cancel safety
    /// Cancel safe: the deletion either happened or not.
    pub async fn invalidate_accounts(&self) -> Result<()> {
        let inner = &self.inner;
        let mut conn = inner.conn();
        let key = inner.keys.accounts();
        inner
            .op(::redis::cmd("DEL").arg(&key).query_async::<i64>(&mut conn))
            .await
            .map(|_| ())
            .map_err(|_| Error::Transport("redis unavailable; shared accounts expire by their TTL".into()))
    }
}

impl Inner {
    fn conn(&self) -> ConnectionManager {
        lock(&self.conn).clone()
    }

    /// One Redis operation under `redis_timeout`; a failure marks Redis down.
    async fn op<T>(&self, f: impl Future<Output = RedisResult<T>>) -> std::result::Result<T, RedisDown> {
        match tokio::time::timeout(self.cfg.redis_timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.health.mark_down(&e.to_string());
                Err(RedisDown)
            }
            Err(_) => {
                self.health.mark_down("operation timed out");
                Err(RedisDown)
            }
        }
    }

    /// The path of a call starting now, probing Redis first when a probe is due.
    async fn path(&self) -> Path {
        if self.health.begin_probe() {
            // A fresh manager: whatever state the old one's reconnect logic is in, this one
            // starts clean.
            let ok =
                match ConnectionManager::new_lazy_with_config(self.client.clone(), manager_config(&self.cfg))
                {
                    Ok(conn) if ping(&conn, self.cfg.redis_timeout).await => {
                        *lock(&self.conn) = conn;
                        true
                    }
                    _ => false,
                };
            self.health.probed(ok);
        }
        self.health.path()
    }

    /// A degraded path for work that a shared attempt left undone.
    fn degraded_path(&self) -> Path {
        match self.health.path() {
            p @ Path::Degraded { .. } => p,
            // Recovered in the meantime: stay conservative for this call.
            Path::Shared { .. } => Path::Degraded { quiet_until: Instant::now() + WINDOW },
        }
    }

    /// Wait for permission to send one request of `class` on `path`.
    async fn gate(&self, path: Path, class: EndpointClass) -> std::result::Result<Result<()>, RedisDown> {
        match path {
            Path::Degraded { quiet_until } => {
                tokio::time::sleep_until(quiet_until).await;
                if self.fallback_closed[class_index(class)] {
                    inc(&self.counters.degraded_refused);
                    return Ok(Err(Error::RateLimited {
                        retry_after: Some(self.cfg.reconnect_interval),
                        local: true,
                    }));
                }
                Ok(self.fallback.acquire(class).await)
            }
            Path::Shared { local_too } => {
                if local_too
                    && !self.fallback_closed[class_index(class)]
                    && let Err(e) = self.fallback.acquire(class).await
                {
                    return Ok(Err(e));
                }
                self.acquire_shared(class).await
            }
        }
    }

    /// Take one slot of the distributed limiter, waiting in this process's FIFO and then for
    /// Redis's answer, for at most `max_wait`.
    async fn acquire_shared(&self, class: EndpointClass) -> std::result::Result<Result<()>, RedisDown> {
        let c = &self.counters;
        let start = Instant::now();
        let deadline = start + self.limits.max_wait;
        let refuse = |wait: Duration| {
            inc(&c.shared_rejected_local);
            Ok(Err(Error::RateLimited { retry_after: Some(wait), local: true }))
        };
        let Ok(_turn) = tokio::time::timeout_at(deadline, self.queues[class_index(class)].lock()).await
        else {
            return refuse(self.class_limit(class).interval());
        };
        let keys = self.keys.limiter(class);
        let gcra = self.gcra(class);
        let mut waited = false;
        loop {
            let mut conn = self.conn();
            match self.op(scripts::acquire(&mut conn, &keys, gcra, 1, false)).await? {
                None => break,
                Some(wait) => {
                    if Instant::now() + wait > deadline {
                        return refuse(wait);
                    }
                    waited = true;
                    tokio::time::sleep(wait).await;
                }
            }
        }
        inc(&c.shared_acquired);
        if waited {
            inc(&c.shared_waits);
            add(&c.shared_wait_nanos, u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
        Ok(Ok(()))
    }

    fn class_limit(&self, class: EndpointClass) -> ClassLimitExt {
        ClassLimitExt(match class {
            EndpointClass::Public => self.limits.public,
            EndpointClass::Private => self.limits.private,
        })
    }

    fn gcra(&self, class: EndpointClass) -> scripts::Gcra {
        let l = self.class_limit(class);
        scripts::Gcra { interval: l.interval(), burst: l.0.burst.get() }
    }

    /// Charge `n` requests that were already sent (extra pages) to the budget of `class`.
    async fn charge(&self, path: Path, class: EndpointClass, n: u32) {
        if n == 0 {
            return;
        }
        match path {
            Path::Shared { .. } => {
                let mut conn = self.conn();
                let keys = self.keys.limiter(class);
                let _ = self.op(scripts::acquire(&mut conn, &keys, self.gcra(class), n, true)).await;
            }
            Path::Degraded { .. } => {
                for _ in 0..n {
                    let _ = self.fallback.acquire(class).await;
                }
            }
        }
    }

    /// One upstream request on `path`: gate, send, count, and report a 429 to every process.
    async fn call<T, Fut>(
        &self,
        path: Path,
        class: EndpointClass,
        send: impl FnOnce() -> Fut,
    ) -> std::result::Result<Result<T>, RedisDown>
    where
        Fut: Future<Output = Result<T>>,
    {
        if let Err(e) = self.gate(path, class).await? {
            return Ok(Err(e));
        }
        let c = &self.counters;
        inc(&c.upstream_calls);
        let r = send().await;
        match &r {
            Ok(_) => self.fallback.record_success(class),
            Err(Error::RateLimited { retry_after, local: false }) => {
                inc(&c.upstream_errors);
                inc(&c.rate_limited_429);
                // The local limiter pauses too, so that a fall-back right after keeps the pause.
                self.fallback.penalize(class, *retry_after);
                if let Path::Shared { .. } = path {
                    let mut conn = self.conn();
                    let keys = self.keys.limiter(class);
                    let backoff = scripts::Backoff {
                        base: self.limits.backoff_base,
                        max: self.limits.backoff_max,
                        ramp: self.limits.ramp_up,
                    };
                    if let Ok(pause) =
                        self.op(scripts::penalize(&mut conn, &keys, *retry_after, backoff)).await
                    {
                        inc(&c.shared_pauses);
                        tracing::warn!(
                            class = class.as_str(),
                            pause_ms = pause.as_millis() as u64,
                            "exchange answered 429; pausing the class in every process"
                        );
                    }
                }
            }
            Err(e) => {
                inc(&c.upstream_errors);
                tracing::debug!(class = class.as_str(), error = %e, "upstream call failed");
            }
        }
        Ok(r)
    }

    /// Answer `keys` through Redis when possible, in-process otherwise (from the start, or for
    /// what a failing Redis left undone).
    async fn resolve<T>(&self, keys: Vec<String>, fetch: &FetchFn<'_, T>) -> Vec<Answer<T>>
    where
        T: Serialize + serde::de::DeserializeOwned + Send,
    {
        let mut answers: Vec<Option<Answer<T>>> = (0..keys.len()).map(|_| None).collect();
        if let path @ Path::Shared { .. } = self.path().await {
            let _ = self.flight(&keys, path, fetch, &mut answers).await;
        }
        let missing: Vec<usize> = (0..keys.len()).filter(|&i| answers[i].is_none()).collect();
        if !missing.is_empty() {
            inc(&self.counters.degraded_calls);
            let path = self.degraded_path();
            // A degraded path never touches Redis, so this cannot fail; if it did, the
            // answers left empty become errors below.
            if let Ok(fetched) = fetch(path, missing.clone()).await {
                for (i, f) in missing.into_iter().zip(fetched) {
                    answers[i] = Some(f.answer);
                }
            }
        }
        answers
            .into_iter()
            .map(|a| {
                a.unwrap_or_else(|| Err(Error::Closed("the shared tier lost track of a request".into())))
            })
            .collect()
    }

    fn candle_ttl(&self, g: Granularity, r: CandleRange) -> Duration {
        let now = self.clock.now_utc();
        if r.end <= g.bucket_start(now) {
            return self.cfg.closed_candles_ttl;
        }
        let to_close = Duration::try_from(g.next_close(now) - now).unwrap_or(Duration::ZERO);
        (to_close + self.cfg.candle_grace).max(Duration::from_millis(1))
    }
}

/// `interval()` of a [`ClassLimit`] (the in-process limiter keeps its own private).
struct ClassLimitExt(ClassLimit);

impl ClassLimitExt {
    fn interval(&self) -> Duration {
        Duration::from_nanos(1_000_000_000 / u64::from(self.0.rate_per_second.get()))
    }
}

/// Split `range` into requests of at most `per` buckets, as the client would.
fn candle_chunks(g: Granularity, range: CandleRange, per: u32) -> Vec<CandleRange> {
    let step = time::Duration::seconds(g.seconds() * i64::from(per.max(1)));
    let mut out = Vec::new();
    let mut start = range.start;
    while start < range.end {
        let end = (start + step).min(range.end);
        out.push(CandleRange { start, end });
        start = end;
    }
    out
}

#[async_trait]
impl MarketDataSource for SharedTier {
    async fn ticker(&self, product: &ProductId) -> Result<Ticker> {
        let inner = &*self.inner;
        let class = inner.profile.market_data_class;
        let fetch = |path: Path,
                     idx: Vec<usize>|
         -> BoxFut<'_, std::result::Result<Vec<Fetched<Ticker>>, RedisDown>> {
            Box::pin(async move {
                let mut out = Vec::with_capacity(idx.len());
                for _ in idx {
                    out.push(match inner.call(path, class, || inner.upstream.ticker(product)).await? {
                        Ok(t) => Fetched::value(t, inner.cfg.ticker_ttl),
                        Err(Error::NotFound(_)) => Fetched::not_found(inner.cfg.negative_ttl),
                        Err(e) => Fetched::error(e, inner.cfg.error_ttl),
                    });
                }
                Ok(out)
            })
        };
        let answer = inner.resolve(vec![inner.keys.ticker(product)], &fetch).await.pop();
        match answer {
            Some(Ok(Some(t))) => Ok(t),
            Some(Ok(None)) => Err(Error::NotFound(product.to_string())),
            Some(Err(e)) => Err(e),
            None => Err(Error::Closed("the shared tier lost track of a request".into())),
        }
    }

    async fn tickers(&self, products: &[ProductId]) -> Result<Vec<Ticker>> {
        let inner = &*self.inner;
        let products = distinct(products);
        if products.is_empty() {
            return Ok(Vec::new());
        }
        let class = inner.profile.tickers_class;
        let per = inner.profile.tickers_per_request.max(1);
        let ps = &products;
        let fetch = |path: Path,
                     idx: Vec<usize>|
         -> BoxFut<'_, std::result::Result<Vec<Fetched<Ticker>>, RedisDown>> {
            Box::pin(async move {
                let mut out = Vec::with_capacity(idx.len());
                for chunk in idx.chunks(per) {
                    let wanted: Vec<ProductId> = chunk.iter().map(|&i| ps[i].clone()).collect();
                    match inner.call(path, class, || inner.upstream.tickers(&wanted)).await? {
                        Ok(list) => {
                            let mut by: HashMap<ProductId, Ticker> =
                                list.into_iter().map(|t| (t.product.clone(), t)).collect();
                            for p in &wanted {
                                out.push(match by.remove(p) {
                                    Some(t) => Fetched::value(t, inner.cfg.ticker_ttl),
                                    None => Fetched::not_found(inner.cfg.negative_ttl),
                                });
                            }
                        }
                        Err(e) => {
                            out.extend(wanted.iter().map(|_| Fetched::error(e.clone(), inner.cfg.error_ttl)))
                        }
                    }
                }
                Ok(out)
            })
        };
        let keys = products.iter().map(|p| inner.keys.ticker(p)).collect();
        let mut out = Vec::with_capacity(products.len());
        for answer in inner.resolve(keys, &fetch).await {
            match answer {
                Ok(Some(t)) => out.push(t),
                Ok(None) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    async fn candles(
        &self,
        product: &ProductId,
        granularity: Granularity,
        range: CandleRange,
    ) -> Result<Vec<Candle>> {
        let inner = &*self.inner;
        let range = range.aligned(granularity);
        let chunks = candle_chunks(granularity, range, inner.profile.candles_per_request);
        let class = inner.profile.market_data_class;
        let cs = &chunks;
        let fetch = |path: Path,
                     idx: Vec<usize>|
         -> BoxFut<'_, std::result::Result<Vec<Fetched<Vec<Candle>>>, RedisDown>> {
            Box::pin(async move {
                let mut out = Vec::with_capacity(idx.len());
                for i in idx {
                    let r = cs[i];
                    out.push(
                        match inner
                            .call(path, class, || inner.upstream.candles(product, granularity, r))
                            .await?
                        {
                            Ok(c) => Fetched::value(c, inner.candle_ttl(granularity, r)),
                            Err(Error::NotFound(_)) => Fetched::not_found(inner.cfg.negative_ttl),
                            Err(e) => Fetched::error(e, inner.cfg.error_ttl),
                        },
                    );
                }
                Ok(out)
            })
        };
        let keys = chunks.iter().map(|r| inner.keys.candles(product, granularity, *r)).collect();
        let mut candles = Vec::new();
        for answer in inner.resolve(keys, &fetch).await {
            match answer {
                Ok(Some(c)) => candles.extend(c),
                Ok(None) => return Err(Error::NotFound(product.to_string())),
                Err(e) => return Err(e),
            }
        }
        candles.retain(|c| range.contains(c.start));
        candles.sort_by_key(|c| c.start);
        candles.dedup_by_key(|c| c.start);
        Ok(candles)
    }

    async fn accounts(&self) -> Result<Vec<Account>> {
        let inner = &*self.inner;
        let per_page = inner.profile.accounts_per_page.max(1);
        let fetch = |path: Path,
                     idx: Vec<usize>|
         -> BoxFut<'_, std::result::Result<Vec<Fetched<Vec<Account>>>, RedisDown>> {
            Box::pin(async move {
                let mut out = Vec::with_capacity(idx.len());
                for _ in idx {
                    let r = inner.call(path, EndpointClass::Private, || inner.upstream.accounts()).await?;
                    out.push(match r {
                        Ok(list) => {
                            // One request per page; the slot taken covered the first.
                            let extra = u32::try_from(list.len()).unwrap_or(u32::MAX) / per_page;
                            inner.charge(path, EndpointClass::Private, extra).await;
                            Fetched::value(list, inner.cfg.accounts_ttl)
                        }
                        Err(e) => Fetched::error(e, inner.cfg.error_ttl),
                    });
                }
                Ok(out)
            })
        };
        match inner.resolve(vec![inner.keys.accounts()], &fetch).await.pop() {
            Some(Ok(Some(a))) => Ok(a),
            Some(Ok(None)) => Ok(Vec::new()),
            Some(Err(e)) => Err(e),
            None => Err(Error::Closed("the shared tier lost track of a request".into())),
        }
    }
}
