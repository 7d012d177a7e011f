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
//! 3. **Distributed rate limit** before each upstream request: one GCRA budget per API key (or
//!    per user, with [`SharedTierConfig::account_identity`]: Coinbase's private limit is per
//!    user, whose keys are one per portfolio) and endpoint class for all processes, atomic in a Lua script on Redis's clock, with
//!    the same
//!    margins as the in-process [`RateLimiter`] ([`ClassLimit`](crate::ClassLimit): 24/s + burst 5 of Coinbase's
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
//! `rl:{class}:{tat,pause,ramp,strikes}` for the rate limiter (under
//! [`SharedTier::budget_prefix`], `{namespace}:{hash of the account identity}:` when
//! [`SharedTierConfig::account_identity`] is set, so that all keys of one user share them).
//! Values are `ts1:` and JSON. Every key has a TTL, so the tier needs no cleanup; point it at a
//! Redis without persistence (`--save '' --appendonly no`).
//!
//! # Time
//!
//! The tier's own waits (lease polls, limiter waits, the quiet window, reconnect probes) use
//! `tokio::time`; Redis runs in real time and the limiter reads Redis's clock, so a test of the
//! tier against a real Redis runs in real time. (Under `tokio::time::pause`, an idle runtime
//! jumps past `redis_timeout` while a Redis answer is on its way, and the tier would take Redis
//! for down.) Without Redis, the degraded path is paused-clock friendly.

mod codec;
mod config;
mod flight;
mod health;
mod limit;
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

#[cfg(feature = "proxy")]
pub(crate) use self::health::Path as TierPath;
use self::{
    codec::Keys,
    flight::{Answer, BoxFut, FetchFn, Fetched},
    health::{Health, Path, WINDOW},
};
pub use self::{
    config::{CallProfile, SharedTierBuilder, SharedTierConfig},
    health::TierMode,
};
use crate::{
    clock::Clock,
    coinbase::CoinbaseClient,
    error::{Error, Result},
    limiter::{EndpointClass, LimiterStats, RateLimiter, RateLimiterConfig},
    model::{Account, Candle, CandleRange, Granularity, ProductId, Ticker},
    source::{MarketDataSource, distinct},
    util::{inc, lock},
};

pub(super) fn manager_config(cfg: &SharedTierConfig) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(cfg.redis_timeout))
        .set_response_timeout(Some(cfg.redis_timeout))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(cfg.reconnect_interval)
}

pub(super) async fn ping(conn: &ConnectionManager, timeout: Duration) -> bool {
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
    /// The accounts invalidations followed over pub/sub, once asked for.
    invalidations: std::sync::OnceLock<tokio::sync::watch::Sender<u64>>,
    /// Dropped with the tier: ends its background subscription.
    alive: tokio::sync::watch::Sender<()>,
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

    /// A builder over a [`CoinbaseClient`], with the [`CallProfile`] and the
    /// [`account_identity`](SharedTierConfig::account_identity) read from the client.
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
        let identity = client.account_identity().map(str::to_string);
        let builder = Self::builder(redis_url, api_key_id, client).profile(profile);
        match identity {
            Some(id) => builder.account_identity(id),
            None => builder,
        }
    }

    /// The regime now.
    pub fn mode(&self) -> TierMode {
        self.inner.health.mode()
    }

    /// The prefix of every cache key of this tier: `{namespace}:{hash of the API key id}:`.
    pub fn key_prefix(&self) -> &str {
        self.inner.keys.prefix()
    }

    /// The prefix of the rate-limit keys: [`key_prefix`](Self::key_prefix), or
    /// `{namespace}:{hash of the account identity}:` with
    /// [`SharedTierConfig::account_identity`], shared by every key of that user.
    pub fn budget_prefix(&self) -> &str {
        self.inner.keys.budget_prefix()
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
    /// on the source above too). The accounts' lease goes too: a fetch in flight in any process
    /// (begun before the order) answers its own callers but is not stored, and the next read
    /// fetches anew.
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
        let lease = Keys::lease(&key);
        let mut pipe = ::redis::pipe();
        pipe.cmd("DEL").arg(&key).arg(&lease).ignore();
        pipe.cmd("PUBLISH").arg(inner.keys.accounts_invalidated()).arg("1").ignore();
        inner
            .op(pipe.query_async::<()>(&mut conn))
            .await
            .map_err(|_| Error::Transport("redis unavailable; shared accounts expire by their TTL".into()))
    }

    /// Invalidations of the shared accounts by any process on this key and namespace (this
    /// one included, through [`invalidate_accounts`](Self::invalidate_accounts)), as a
    /// counter that changes with each. A process that keeps accounts in memory above the tier
    /// (a [`CoordinatedSource`](crate::CoordinatedSource)) forgets them on every change, so an
    /// order placed anywhere is seen everywhere within a Redis round trip:
    ///
    /// ```no_run
    /// # async fn f(tier: tickshare::SharedTier, source: tickshare::CoordinatedSource) {
    /// let mut invalidated = tier.accounts_invalidations();
    /// tokio::spawn(async move {
    ///     while invalidated.changed().await.is_ok() {
    ///         source.invalidate_accounts();
    ///     }
    /// });
    /// # }
    /// ```
    ///
    /// The subscription runs in a background task, started by the first call and ended when
    /// the tier (its last clone) is dropped. It is in place once the counter is above zero
    /// (`receiver.wait_for(|n| *n > 0)`); what is published before that is not heard. It reconnects after a Redis outage (every
    /// [`reconnect_interval`](SharedTierConfig::reconnect_interval)) and counts each
    /// (re)subscription as an invalidation too, since messages sent while it was away are
    /// lost. Without Redis, accounts above the tier expire by their own TTL.
    pub fn accounts_invalidations(&self) -> tokio::sync::watch::Receiver<u64> {
        let inner = &self.inner;
        let tx = inner.invalidations.get_or_init(|| {
            let (tx, _) = tokio::sync::watch::channel(0u64);
            tokio::spawn(follow_invalidations(
                inner.client.clone(),
                inner.keys.accounts_invalidated(),
                inner.cfg.reconnect_interval,
                tx.clone(),
                inner.alive.subscribe(),
            ));
            tx
        });
        tx.subscribe()
    }
}

/// Subscribe to `channel` and bump `tx` on every message and every (re)subscription, until
/// the tier is dropped (`alive`'s sender with it).
async fn follow_invalidations(
    client: ::redis::Client,
    channel: String,
    reconnect: Duration,
    tx: tokio::sync::watch::Sender<u64>,
    mut alive: tokio::sync::watch::Receiver<()>,
) {
    use futures_util::StreamExt as _;
    let bump = |tx: &tokio::sync::watch::Sender<u64>| tx.send_modify(|n| *n = n.wrapping_add(1));
    loop {
        let subscribed = match client.get_async_pubsub().await {
            Ok(mut pubsub) => pubsub.subscribe(&channel).await.is_ok().then_some(pubsub),
            Err(_) => None,
        };
        match subscribed {
            Some(mut pubsub) => {
                bump(&tx);
                let mut messages = pubsub.on_message();
                loop {
                    tokio::select! {
                        m = messages.next() => match m {
                            Some(_) => bump(&tx),
                            None => break,
                        },
                        _ = alive.changed() => return,
                    }
                }
                tracing::debug!("accounts invalidation subscription lost; resubscribing");
            }
            None => tracing::debug!("could not subscribe to accounts invalidations; retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(reconnect) => {}
            _ = alive.changed() => return,
        }
    }
}

impl SharedTier {
    /// Wait for one request's slot of `class` in the budget every process shares (or, while
    /// Redis is unreachable, in this process's share), for a request the caller sends itself:
    /// the proxy's pass-through. Report its outcome with [`record`](Self::record) and the path
    /// returned.
    ///
    /// # Errors
    /// [`Error::RateLimited`] (`local: true`) when no slot comes within the limiter's
    /// `max_wait`, or the class has no share while Redis is down.
    #[cfg(feature = "proxy")]
    pub(crate) async fn admit(&self, class: EndpointClass) -> Result<Path> {
        let inner = &*self.inner;
        if let path @ Path::Shared { .. } = inner.path().await
            && let Ok(admitted) = inner.gate(path, class).await
        {
            return admitted.map(|()| path);
        }
        let path = inner.degraded_path();
        match inner.gate(path, class).await {
            Ok(admitted) => admitted.map(|()| path),
            // A degraded path never touches Redis.
            Err(RedisDown) => Err(Error::Closed("the shared tier lost track of a request".into())),
        }
    }

    /// Record the outcome of a request [`admit`](Self::admit)ted on `path`: a 429 pauses the
    /// class in every process, as one of the tier's own calls would.
    #[cfg(feature = "proxy")]
    pub(crate) async fn record(&self, path: Path, class: EndpointClass, outcome: &Result<()>) {
        inc(&self.inner.counters.upstream_calls);
        self.inner.record(path, class, outcome).await;
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
        let chunks = range.chunks(granularity, inner.profile.candles_per_request);
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
