//! A client-side rate limiter per endpoint class that never lets a request out that would
//! exceed the exchange's limit, and pauses a whole class after a 429.
//!
//! Built on governor's GCRA with a clock adapter over [`tokio::time::Instant`], so waits obey
//! `tokio::time::pause` (governor's own `until_ready` sleeps in real time). One
//! [`RateLimiter`] is a cheap handle: every clone shares one budget.

use std::{
    collections::BTreeMap,
    fmt,
    num::NonZeroU32,
    ops::Add,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use governor::{
    Quota, clock::Reference, middleware::NoOpMiddleware, nanos::Nanos, state::InMemoryState, state::NotKeyed,
};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::{
    error::{Error, Result},
    util::lock,
};

/// The rate-limit classes of Coinbase Advanced Trade: public endpoints are limited per IP,
/// private ones per API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointClass {
    /// Unauthenticated market data (`/market/...`, `/time`): 10 requests/s per IP.
    Public,
    /// Authenticated endpoints (`/accounts`, `/best_bid_ask`, `/products/...`): 30 requests/s.
    Private,
}

impl EndpointClass {
    /// Both classes.
    pub const ALL: [EndpointClass; 2] = [EndpointClass::Public, EndpointClass::Private];

    /// `"public"` or `"private"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            EndpointClass::Public => "public",
            EndpointClass::Private => "private",
        }
    }

    const fn index(self) -> usize {
        match self {
            EndpointClass::Public => 0,
            EndpointClass::Private => 1,
        }
    }
}

impl fmt::Display for EndpointClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How urgent a request is when it has to wait for the rate limiter.
///
/// Waiting requests of one class are admitted highest priority first, and in arrival order
/// within a priority. Admission is not preemptive: the request already at the head of the queue
/// (sleeping until its cell frees) keeps its turn, which delays a newly arrived higher-priority
/// request by at most one admission interval (or the rest of a 429 pause). When `max_waiters`
/// are waiting, a new request evicts the newest waiter of the lowest priority below its own
/// (that waiter fails with [`Error::Overloaded`]); if there is none, the new request is shed.
///
/// [`CoinbaseClient`](crate::CoinbaseClient) sends accounts at [`High`](Priority::High),
/// tickers and `best_bid_ask` at [`Normal`](Priority::Normal) and candles (backfill) at
/// [`Low`](Priority::Low).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Served last: candle backfill and other bulk reads.
    Low,
    /// The default: ticker reads.
    #[default]
    Normal,
    /// Served first: account and balance reads that gate trading decisions.
    High,
}

impl Priority {
    /// Every priority, lowest first.
    pub const ALL: [Priority; 3] = [Priority::Low, Priority::Normal, Priority::High];

    /// `"low"`, `"normal"` or `"high"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }

    /// Queue rank: 0 is served first.
    const fn rank(self) -> u8 {
        match self {
            Priority::High => 0,
            Priority::Normal => 1,
            Priority::Low => 2,
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The limit of one class as the exchange states it, and how much of it to use.
///
/// The limiter admits requests at `rate` per second with a burst of `burst`, chosen so that
/// `rate + burst < limit`: no one-second window ever holds more than `limit - 1` requests, which
/// leaves room for network jitter between this process and the exchange's counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassLimit {
    /// The exchange's limit, requests per second.
    pub limit_per_second: NonZeroU32,
    /// Steady rate used, requests per second (at most `limit_per_second - 1`).
    pub rate_per_second: NonZeroU32,
    /// Requests that may go at once after a quiet period.
    pub burst: NonZeroU32,
}

impl ClassLimit {
    /// Use `percent` % of the exchange's `limit` as the steady rate (at least 1/s), with the
    /// largest burst that keeps every one-second window below the limit.
    ///
    /// # Errors
    /// [`Error::Config`] if `limit` is below 2 or `percent` is not in 1..=100.
    pub fn with_margin(limit: u32, percent: u32) -> Result<Self> {
        if limit < 2 {
            return Err(Error::Config(format!("rate limit must be at least 2 requests/s, got {limit}")));
        }
        if !(1..=100).contains(&percent) {
            return Err(Error::Config(format!("rate limit margin must be 1..=100 %, got {percent}")));
        }
        let rate = (limit * percent / 100).clamp(1, limit - 1);
        let burst = (limit - 1 - rate).max(1);
        Ok(ClassLimit { limit_per_second: nz(limit), rate_per_second: nz(rate), burst: nz(burst) })
    }

    /// Coinbase's public limit (10/s) at an 80 % margin: 8/s, burst 1.
    pub fn coinbase_public() -> Self {
        ClassLimit { limit_per_second: nz(10), rate_per_second: nz(8), burst: nz(1) }
    }

    /// Coinbase's private limit (30/s) at an 80 % margin: 24/s, burst 5.
    pub fn coinbase_private() -> Self {
        ClassLimit { limit_per_second: nz(30), rate_per_second: nz(24), burst: nz(5) }
    }

    fn validate(&self, class: EndpointClass) -> Result<()> {
        if self.rate_per_second.get() + self.burst.get() > self.limit_per_second.get() {
            return Err(Error::Config(format!(
                "{class} rate ({}/s) plus burst ({}) exceeds the limit ({}/s); lower them",
                self.rate_per_second, self.burst, self.limit_per_second
            )));
        }
        Ok(())
    }

    fn quota(&self) -> Quota {
        let period = Duration::from_nanos(1_000_000_000 / u64::from(self.rate_per_second.get()));
        Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(self.rate_per_second))
            .allow_burst(self.burst)
    }

    fn interval(&self) -> Duration {
        Duration::from_nanos(1_000_000_000 / u64::from(self.rate_per_second.get()))
    }
}

fn nz(v: u32) -> NonZeroU32 {
    NonZeroU32::new(v).unwrap_or(NonZeroU32::MIN)
}

/// Settings of a [`RateLimiter`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RateLimiterConfig {
    /// Public endpoints.
    pub public: ClassLimit,
    /// Private endpoints.
    pub private: ClassLimit,
    /// A request that would wait longer than this fails locally with
    /// [`Error::RateLimited`] (`local: true`) and sends nothing. Default 10 s.
    #[serde(with = "crate::util::duration_ms")]
    pub max_wait: Duration,
    /// At most this many requests may wait per class; more are shed with
    /// [`Error::Overloaded`], lowest [`Priority`] first (see there). Default 10,000.
    pub max_waiters: usize,
    /// First pause after a 429 without `Retry-After`; doubles on each consecutive 429.
    /// Default 1 s.
    #[serde(with = "crate::util::duration_ms")]
    pub backoff_base: Duration,
    /// Longest pause after a 429. Default 60 s.
    #[serde(with = "crate::util::duration_ms")]
    pub backoff_max: Duration,
    /// After a pause, the class runs at half rate for this long before returning to full
    /// rate. Default 5 s.
    #[serde(with = "crate::util::duration_ms")]
    pub ramp_up: Duration,
}

impl Default for RateLimiterConfig {
    fn default() -> Self {
        RateLimiterConfig {
            public: ClassLimit::coinbase_public(),
            private: ClassLimit::coinbase_private(),
            max_wait: Duration::from_secs(10),
            max_waiters: 10_000,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            ramp_up: Duration::from_secs(5),
        }
    }
}

impl RateLimiterConfig {
    /// Check the settings.
    ///
    /// # Errors
    /// [`Error::Config`] naming the bad setting.
    pub fn validate(&self) -> Result<()> {
        self.public.validate(EndpointClass::Public)?;
        self.private.validate(EndpointClass::Private)?;
        if self.max_waiters == 0 {
            return Err(Error::Config("max_waiters must be at least 1".into()));
        }
        if self.backoff_base.is_zero() || self.backoff_max < self.backoff_base {
            return Err(Error::Config("backoff_base must be > 0 and <= backoff_max".into()));
        }
        Ok(())
    }
}

/// governor's clock over tokio's (pausable) clock.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TokioClock;

/// A tokio instant as a governor [`Reference`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct TokioInstant(Instant);

impl Add<Nanos> for TokioInstant {
    type Output = TokioInstant;
    fn add(self, other: Nanos) -> TokioInstant {
        TokioInstant(self.0 + Duration::from(other))
    }
}

impl Reference for TokioInstant {
    fn duration_since(&self, earlier: Self) -> Nanos {
        self.0.saturating_duration_since(earlier.0).into()
    }
    fn saturating_sub(&self, duration: Nanos) -> Self {
        self.0.checked_sub(duration.into()).map(TokioInstant).unwrap_or(*self)
    }
}

impl governor::clock::Clock for TokioClock {
    type Instant = TokioInstant;
    fn now(&self) -> TokioInstant {
        TokioInstant(Instant::now())
    }
}

type Gcra = governor::RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<TokioInstant>>;

struct Class {
    limit: ClassLimit,
    full: Gcra,
    half: Gcra,
    /// Waiting requests by priority, then arrival. Only the holder of the turn polls the GCRA,
    /// so requests leave in queue order. A std mutex: it is never held across an await.
    queue: Mutex<Queue>,
    /// Requests in the slow path (queued or holding the turn), for the fast path and stats.
    waiting: AtomicUsize,
    pause: Mutex<Pause>,
    acquired: AtomicU64,
    waits: AtomicU64,
    wait_nanos: AtomicU64,
    rejected_local: AtomicU64,
    shed: AtomicU64,
    penalties: AtomicU64,
    consecutive_429: AtomicU32,
}

#[derive(Default)]
struct Pause {
    until: Option<Instant>,
    ramp_until: Option<Instant>,
}

struct Inner {
    cfg: RateLimiterConfig,
    classes: [Class; 2],
}

/// A shared, pausable rate limiter for both endpoint classes.
///
/// ```
/// # async fn f() -> tickshare::Result<()> {
/// use tickshare::{EndpointClass, RateLimiter};
/// let limiter = RateLimiter::coinbase();
/// limiter.acquire(EndpointClass::Private).await?; // waits for capacity, or fails fast
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RateLimiter {
    inner: Arc<Inner>,
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter").field("config", &self.inner.cfg).finish_non_exhaustive()
    }
}

/// Counters of one class, as served in stats.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassLimiterStats {
    /// Requests admitted.
    pub acquired: u64,
    /// Requests that had to wait before being admitted.
    pub waits: u64,
    /// Total time spent waiting, milliseconds.
    pub total_wait_ms: u64,
    /// Requests refused locally because they would have waited longer than `max_wait`.
    pub rejected_local: u64,
    /// Requests shed because too many were waiting (new arrivals refused, and waiters evicted
    /// by a higher-priority arrival).
    pub shed: u64,
    /// 429s reported by the exchange that paused this class.
    pub rate_limit_pauses: u64,
    /// Requests waiting right now.
    pub waiting_now: u64,
    /// Remaining pause after a 429, milliseconds (0 when not paused).
    pub paused_for_ms: u64,
}

/// Counters of both classes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimiterStats {
    /// Public endpoints.
    pub public: ClassLimiterStats,
    /// Private endpoints.
    pub private: ClassLimiterStats,
}

impl RateLimiter {
    /// A limiter with Coinbase's limits and the default margins.
    pub fn coinbase() -> Self {
        // The default configuration is valid by construction.
        Self::build(RateLimiterConfig::default())
    }

    /// A limiter with custom settings.
    ///
    /// # Errors
    /// [`Error::Config`] if the settings are invalid.
    pub fn new(cfg: RateLimiterConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self::build(cfg))
    }

    fn build(cfg: RateLimiterConfig) -> Self {
        let class = |limit: ClassLimit| {
            let half_rate = nz((limit.rate_per_second.get() / 2).max(1));
            let half = ClassLimit { rate_per_second: half_rate, burst: NonZeroU32::MIN, ..limit };
            Class {
                limit,
                full: governor::RateLimiter::direct_with_clock(limit.quota(), TokioClock),
                half: governor::RateLimiter::direct_with_clock(half.quota(), TokioClock),
                queue: Mutex::new(Queue::default()),
                waiting: AtomicUsize::new(0),
                pause: Mutex::new(Pause::default()),
                acquired: AtomicU64::new(0),
                waits: AtomicU64::new(0),
                wait_nanos: AtomicU64::new(0),
                rejected_local: AtomicU64::new(0),
                shed: AtomicU64::new(0),
                penalties: AtomicU64::new(0),
                consecutive_429: AtomicU32::new(0),
            }
        };
        let classes = [class(cfg.public), class(cfg.private)];
        RateLimiter { inner: Arc::new(Inner { cfg, classes }) }
    }

    /// The settings in force.
    pub fn config(&self) -> &RateLimiterConfig {
        &self.inner.cfg
    }

    /// Wait until a request of `class` may be sent, then count it as sent; the same as
    /// [`acquire_with`](Self::acquire_with) at [`Priority::Normal`].
    ///
    /// # Errors
    /// As [`acquire_with`](Self::acquire_with).
    ///
    /// # Cancel safety
    /// Cancel safe, as [`acquire_with`](Self::acquire_with).
    pub async fn acquire(&self, class: EndpointClass) -> Result<()> {
        self.acquire_with(class, Priority::Normal).await
    }

    /// Wait until a request of `class` may be sent, then count it as sent. Waiting requests
    /// are admitted by `priority`, then in arrival order (see [`Priority`]).
    ///
    /// # Errors
    /// [`Error::RateLimited`] with `local: true` when the wait would exceed `max_wait` (the
    /// request must not be sent); [`Error::Overloaded`] when `max_waiters` are already waiting
    /// and none of them has a lower priority, or when this request was waiting and a
    /// higher-priority one took its place.
    ///
    /// # Cancel safety
    /// Cancel safe: a dropped call leaves the queue (handing its turn on, if it had one) and
    /// consumes no capacity unless it had already been admitted.
    pub async fn acquire_with(&self, class: EndpointClass, priority: Priority) -> Result<()> {
        let c = &self.inner.classes[class.index()];
        let cfg = &self.inner.cfg;
        let start = Instant::now();
        let deadline = start + cfg.max_wait;

        // Fast path: nobody waiting, not paused, a cell is free.
        if c.waiting.load(Ordering::Acquire) == 0
            && self.pause_remaining(c, start).is_none()
            && self.try_cell(c, start).is_ok()
        {
            c.acquired.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }

        let _waiting = WaitingGuard::enter(&c.waiting);
        let mut slot = {
            let mut q = lock(&c.queue);
            let queued = q.waiters.len() + usize::from(q.busy);
            if queued >= cfg.max_waiters && !q.evict_below(priority) {
                c.shed.fetch_add(1, Ordering::Relaxed);
                return Err(Error::Overloaded(format!(
                    "{queued} {class} requests are already waiting for the rate limiter"
                )));
            }
            // Predict the wait from the requests ahead; fail fast rather than wait in vain.
            let ahead = q.ahead_of(priority) + usize::from(q.busy);
            let predicted = c.limit.interval().saturating_mul(u32::try_from(ahead).unwrap_or(u32::MAX))
                + self.pause_remaining(c, start).unwrap_or_default();
            if predicted > cfg.max_wait {
                c.rejected_local.fetch_add(1, Ordering::Relaxed);
                return Err(Error::RateLimited { retry_after: Some(predicted), local: true });
            }
            if q.busy || !q.waiters.is_empty() {
                let (key, rx) = q.push(priority);
                Slot { class: c, key: Some(key), rx: Some(rx), turn: false }
            } else {
                q.busy = true;
                Slot { class: c, key: None, rx: None, turn: true }
            }
        };

        if let Some(rx) = slot.rx.as_mut() {
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(Grant::Turn)) => {
                    slot.key = None;
                    slot.rx = None;
                    slot.turn = true;
                }
                Ok(Ok(Grant::Evicted) | Err(_)) => {
                    c.shed.fetch_add(1, Ordering::Relaxed);
                    return Err(Error::Overloaded(format!(
                        "a higher-priority {class} request took this one's place in the full rate-limiter queue"
                    )));
                }
                Err(_) => {
                    c.rejected_local.fetch_add(1, Ordering::Relaxed);
                    return Err(Error::RateLimited { retry_after: Some(c.limit.interval()), local: true });
                }
            }
        }

        // This request holds the turn: it alone polls the GCRA until admitted.
        loop {
            let now = Instant::now();
            let wait = match self.pause_remaining(c, now) {
                Some(p) => p,
                None => match self.try_cell(c, now) {
                    Ok(()) => break,
                    Err(w) => w,
                },
            };
            if now + wait > deadline {
                c.rejected_local.fetch_add(1, Ordering::Relaxed);
                return Err(Error::RateLimited { retry_after: Some(wait), local: true });
            }
            tokio::time::sleep(wait).await;
        }
        drop(slot);
        let waited = start.elapsed();
        c.acquired.fetch_add(1, Ordering::Relaxed);
        c.waits.fetch_add(1, Ordering::Relaxed);
        c.wait_nanos.fetch_add(u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
        Ok(())
    }

    fn try_cell(&self, c: &Class, now: Instant) -> std::result::Result<(), Duration> {
        let ramping = lock(&c.pause).ramp_until.is_some_and(|r| now < r);
        if ramping && let Err(nu) = c.half.check() {
            return Err(nu.wait_time_from(TokioInstant(now)));
        }
        c.full.check().map(|_| ()).map_err(|nu| nu.wait_time_from(TokioInstant(now)))
    }

    fn pause_remaining(&self, c: &Class, now: Instant) -> Option<Duration> {
        lock(&c.pause).until.filter(|u| *u > now).map(|u| u - now)
    }

    /// Report that the exchange answered 429 for `class`: the whole class pauses for
    /// `retry_after` when given, else for an exponential backoff with jitter, then runs at half
    /// rate for `ramp_up`. Returns the pause applied.
    pub fn penalize(&self, class: EndpointClass, retry_after: Option<Duration>) -> Duration {
        let c = &self.inner.classes[class.index()];
        let cfg = &self.inner.cfg;
        let n = c.consecutive_429.fetch_add(1, Ordering::AcqRel).min(16);
        let pause = match retry_after {
            Some(d) => d.min(cfg.backoff_max),
            None => {
                let exp = cfg.backoff_base.saturating_mul(1u32 << n).min(cfg.backoff_max);
                // Up to +25 % jitter so that many clients do not come back at once.
                exp + exp.mul_f64(fastrand::f64() * 0.25)
            }
        };
        let now = Instant::now();
        let mut p = lock(&c.pause);
        let until = (now + pause).max(p.until.unwrap_or(now));
        p.until = Some(until);
        p.ramp_until = Some(until + cfg.ramp_up);
        c.penalties.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            class = class.as_str(),
            pause_ms = pause.as_millis() as u64,
            "exchange answered 429; pausing the class"
        );
        pause
    }

    /// Report a successful response for `class` (resets the consecutive-429 count).
    pub fn record_success(&self, class: EndpointClass) {
        self.inner.classes[class.index()].consecutive_429.store(0, Ordering::Relaxed);
    }

    /// Remaining pause of `class` after a 429, if any.
    pub fn paused_for(&self, class: EndpointClass) -> Option<Duration> {
        self.pause_remaining(&self.inner.classes[class.index()], Instant::now())
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> LimiterStats {
        let now = Instant::now();
        let one = |class: EndpointClass| {
            let c = &self.inner.classes[class.index()];
            ClassLimiterStats {
                acquired: c.acquired.load(Ordering::Relaxed),
                waits: c.waits.load(Ordering::Relaxed),
                total_wait_ms: c.wait_nanos.load(Ordering::Relaxed) / 1_000_000,
                rejected_local: c.rejected_local.load(Ordering::Relaxed),
                shed: c.shed.load(Ordering::Relaxed),
                rate_limit_pauses: c.penalties.load(Ordering::Relaxed),
                waiting_now: c.waiting.load(Ordering::Relaxed) as u64,
                paused_for_ms: self.pause_remaining(c, now).map(|d| d.as_millis() as u64).unwrap_or(0),
            }
        };
        LimiterStats { public: one(EndpointClass::Public), private: one(EndpointClass::Private) }
    }
}

/// What a queued request is told when it leaves the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    /// It now holds the turn.
    Turn,
    /// A higher-priority request took its place in a full queue.
    Evicted,
}

/// `(rank, arrival)`: the smallest key is served first.
type Key = (u8, u64);

/// The waiting requests of one class.
#[derive(Default)]
struct Queue {
    /// Some request holds the turn (it alone polls the GCRA).
    busy: bool,
    next_seq: u64,
    waiters: BTreeMap<Key, tokio::sync::oneshot::Sender<Grant>>,
    by_rank: [usize; 3],
}

impl Queue {
    fn push(&mut self, priority: Priority) -> (Key, tokio::sync::oneshot::Receiver<Grant>) {
        let key = (priority.rank(), self.next_seq);
        self.next_seq += 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiters.insert(key, tx);
        self.by_rank[usize::from(key.0)] += 1;
        (key, rx)
    }

    fn remove(&mut self, key: &Key) -> Option<tokio::sync::oneshot::Sender<Grant>> {
        let tx = self.waiters.remove(key)?;
        self.by_rank[usize::from(key.0)] -= 1;
        Some(tx)
    }

    /// Waiters that will be served before a new request of `priority`.
    fn ahead_of(&self, priority: Priority) -> usize {
        self.by_rank[..=usize::from(priority.rank())].iter().sum()
    }

    /// Hand the turn to the first waiter, or mark it free. Called with the turn held.
    fn pass_turn(&mut self) {
        while let Some((key, tx)) = self.waiters.pop_first() {
            self.by_rank[usize::from(key.0)] -= 1;
            if tx.send(Grant::Turn).is_ok() {
                return;
            }
        }
        self.busy = false;
    }

    /// Evict the newest waiter of the lowest priority, if that is below `priority`.
    fn evict_below(&mut self, priority: Priority) -> bool {
        let Some(&key) = self.waiters.keys().next_back() else { return false };
        if key.0 <= priority.rank() {
            return false;
        }
        if let Some(tx) = self.remove(&key) {
            let _ = tx.send(Grant::Evicted);
        }
        true
    }
}

/// A request's place in its class's queue: waiting (`key` and `rx`) or holding the turn.
/// Dropping it, at any point, leaves the queue consistent: a waiter removes itself, and a turn
/// (including one granted just as the wait was abandoned) is handed on.
struct Slot<'a> {
    class: &'a Class,
    key: Option<Key>,
    rx: Option<tokio::sync::oneshot::Receiver<Grant>>,
    turn: bool,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut q = lock(&self.class.queue);
        if let Some(key) = self.key.take()
            && q.remove(&key).is_none()
        {
            // Already taken out of the queue under this lock: granted the turn or evicted.
            // Grants are sent under the lock, so the answer is in the channel.
            if let Some(mut rx) = self.rx.take()
                && rx.try_recv() == Ok(Grant::Turn)
            {
                self.turn = true;
            }
        }
        if self.turn {
            q.pass_turn();
        }
    }
}

struct WaitingGuard<'a>(&'a AtomicUsize);

impl<'a> WaitingGuard<'a> {
    fn enter(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        WaitingGuard(n)
    }
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// Admission times of `n` back-to-back acquires, relative to the start.
    async fn admit(limiter: &RateLimiter, class: EndpointClass, n: usize) -> Vec<Duration> {
        let start = Instant::now();
        let mut out = Vec::new();
        for _ in 0..n {
            limiter.acquire(class).await.unwrap();
            out.push(start.elapsed());
        }
        out
    }

    fn max_in_any_window(times: &[Duration], window: Duration) -> usize {
        let mut q: VecDeque<Duration> = VecDeque::new();
        let mut best = 0;
        for t in times {
            while q.front().is_some_and(|f| *t - *f >= window) {
                q.pop_front();
            }
            q.push_back(*t);
            best = best.max(q.len());
        }
        best
    }

    #[test]
    fn margins() {
        let l = ClassLimit::with_margin(10, 80).unwrap();
        assert_eq!((l.rate_per_second.get(), l.burst.get()), (8, 1));
        assert_eq!(l, ClassLimit::coinbase_public());
        let l = ClassLimit::with_margin(30, 80).unwrap();
        assert_eq!(l, ClassLimit::coinbase_private());
        let l = ClassLimit::with_margin(30, 100).unwrap();
        assert_eq!((l.rate_per_second.get(), l.burst.get()), (29, 1));
        assert!(ClassLimit::with_margin(1, 80).is_err());
        assert!(ClassLimit::with_margin(10, 0).is_err());
        let bad = RateLimiterConfig {
            public: ClassLimit { limit_per_second: nz(10), rate_per_second: nz(10), burst: nz(5) },
            ..Default::default()
        };
        assert!(matches!(RateLimiter::new(bad), Err(Error::Config(_))));
    }

    #[test]
    fn quota_arithmetic_with_fake_clock() {
        // The GCRA quota we derive admits `burst` at once, then one cell per interval.
        let clock = governor::clock::FakeRelativeClock::default();
        let l = ClassLimit::coinbase_private();
        let g = governor::RateLimiter::direct_with_clock(l.quota(), clock.clone());
        for _ in 0..5 {
            assert!(g.check().is_ok());
        }
        assert!(g.check().is_err());
        clock.advance(Duration::from_nanos(1_000_000_000 / 24));
        assert!(g.check().is_ok());
        assert!(g.check().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_limit_in_any_second() {
        let limiter = RateLimiter::coinbase();
        let times = admit(&limiter, EndpointClass::Public, 50).await;
        assert!(max_in_any_window(&times, Duration::from_secs(1)) <= 9, "{times:?}");
        // 50 requests at 8/s after a burst of 1 take about 49/8 s.
        let last = *times.last().unwrap();
        assert!(last >= Duration::from_millis(6000) && last <= Duration::from_millis(6200), "{last:?}");
        let s = limiter.stats();
        assert_eq!(s.public.acquired, 50);
        assert_eq!(s.private.acquired, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_waiters_share_one_budget_in_fifo_order() {
        let limiter = RateLimiter::coinbase();
        let start = Instant::now();
        let mut handles = Vec::new();
        for i in 0..100 {
            let l = limiter.clone();
            handles.push(tokio::spawn(async move {
                l.acquire(EndpointClass::Private).await.map(|_| (i, start.elapsed()))
            }));
            tokio::task::yield_now().await;
        }
        let mut times = Vec::new();
        for h in handles {
            times.push(h.await.unwrap().unwrap());
        }
        let mut sorted: Vec<Duration> = times.iter().map(|t| t.1).collect();
        sorted.sort();
        assert!(max_in_any_window(&sorted, Duration::from_secs(1)) <= 29);
        // FIFO: admission order follows arrival order.
        let by_time: Vec<usize> = {
            let mut t = times.clone();
            t.sort_by_key(|x| (x.1, x.0));
            t.iter().map(|x| x.0).collect()
        };
        assert_eq!(by_time, (0..100).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn fails_fast_beyond_max_wait_and_sheds_beyond_max_waiters() {
        let cfg = RateLimiterConfig {
            max_wait: Duration::from_millis(500),
            max_waiters: 1000,
            ..Default::default()
        };
        let limiter = RateLimiter::new(cfg).unwrap();
        let mut handles = Vec::new();
        for _ in 0..20 {
            let l = limiter.clone();
            handles.push(tokio::spawn(async move { l.acquire(EndpointClass::Public).await }));
        }
        let mut ok = 0;
        let mut local = 0;
        for h in handles {
            match h.await.unwrap() {
                Ok(()) => ok += 1,
                Err(Error::RateLimited { local: true, retry_after: Some(_) }) => local += 1,
                Err(e) => panic!("{e}"),
            }
        }
        // burst 1 + 4 more within 500 ms at 8/s.
        assert_eq!(ok, 5);
        assert_eq!(local, 15);
        assert_eq!(limiter.stats().public.rejected_local, 15);

        let cfg = RateLimiterConfig { max_waiters: 2, ..Default::default() };
        let limiter = RateLimiter::new(cfg).unwrap();
        limiter.acquire(EndpointClass::Public).await.unwrap();
        let a = tokio::spawn({
            let l = limiter.clone();
            async move { l.acquire(EndpointClass::Public).await }
        });
        let b = tokio::spawn({
            let l = limiter.clone();
            async move { l.acquire(EndpointClass::Public).await }
        });
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert!(matches!(limiter.acquire(EndpointClass::Public).await, Err(Error::Overloaded(_))));
        a.await.unwrap().unwrap();
        b.await.unwrap().unwrap();
    }

    /// Spawn one acquire per `(label, priority)`, in order, each queued before the next.
    async fn spawn_in_order(
        limiter: &RateLimiter,
        who: &[(&'static str, Priority)],
    ) -> (Arc<Mutex<Vec<&'static str>>>, Vec<tokio::task::JoinHandle<Result<()>>>) {
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for &(label, priority) in who {
            let (l, order) = (limiter.clone(), Arc::clone(&order));
            handles.push(tokio::spawn(async move {
                let r = l.acquire_with(EndpointClass::Public, priority).await;
                if r.is_ok() {
                    order.lock().unwrap().push(label);
                }
                r
            }));
            tokio::task::yield_now().await;
        }
        (order, handles)
    }

    #[tokio::test(start_paused = true)]
    async fn higher_priorities_first_fifo_within_a_priority() {
        use Priority::{High, Low, Normal};
        let limiter = RateLimiter::coinbase();
        limiter.acquire(EndpointClass::Public).await.unwrap(); // the burst of 1 is gone
        let who = [
            ("L0", Low),
            ("N0", Normal),
            ("H0", High),
            ("L1", Low),
            ("N1", Normal),
            ("H1", High),
            ("N2", Normal),
            ("H2", High),
        ];
        let (order, handles) = spawn_in_order(&limiter, &who).await;
        assert_eq!(limiter.stats().public.waiting_now, 8);
        let start = Instant::now();
        for h in handles {
            h.await.unwrap().unwrap();
        }
        // L0 found the queue empty and took the turn before the others arrived (admission is
        // not preemptive); then every High in arrival order, every Normal, the other Low.
        assert_eq!(*order.lock().unwrap(), ["L0", "H0", "H1", "H2", "N0", "N1", "N2", "L1"]);
        // One admission per 125 ms (8/s): the queue never let two out at once.
        assert_eq!(start.elapsed(), Duration::from_millis(1000));
        let s = limiter.stats().public;
        assert_eq!((s.acquired, s.waits, s.waiting_now), (9, 8, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_waiters_and_turn_holders_leave_the_queue_usable() {
        use Priority::Normal;
        let limiter = RateLimiter::coinbase();
        limiter.acquire(EndpointClass::Public).await.unwrap();
        let (order, mut handles) =
            spawn_in_order(&limiter, &[("A", Normal), ("B", Normal), ("C", Normal)]).await;
        // A holds the turn, B and C wait. Cancel A (the turn holder) and B (a waiter).
        handles[0].abort();
        handles[1].abort();
        tokio::task::yield_now().await;
        let start = Instant::now();
        handles.pop().unwrap().await.unwrap().unwrap();
        assert_eq!(*order.lock().unwrap(), ["C"]);
        // C got the first free cell: the cancelled requests consumed no capacity.
        assert_eq!(start.elapsed(), Duration::from_millis(125));
        let s = limiter.stats().public;
        assert_eq!((s.acquired, s.waiting_now), (2, 0));
        // The queue is idle again: the next request takes the fast path once a cell is free.
        tokio::time::advance(Duration::from_secs(1)).await;
        let t = Instant::now();
        limiter.acquire(EndpointClass::Public).await.unwrap();
        assert_eq!(t.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_sheds_the_lowest_priority_first() {
        use Priority::{High, Low, Normal};
        let cfg = RateLimiterConfig { max_waiters: 3, ..Default::default() };
        let limiter = RateLimiter::new(cfg).unwrap();
        limiter.acquire(EndpointClass::Public).await.unwrap();
        let (order, mut handles) = spawn_in_order(&limiter, &[("L0", Low), ("L1", Low), ("L2", Low)]).await;
        // Full. A Normal evicts the newest Low; a High evicts the next newest Low.
        let (o2, h2) = spawn_in_order(&limiter, &[("N", Normal), ("H", High)]).await;
        // Now the queue holds L0 (turn), N and H: a Low is shed at once, and so is another
        // Normal (nothing below it to evict).
        let shed = limiter.acquire_with(EndpointClass::Public, Low).await;
        assert!(matches!(shed, Err(Error::Overloaded(_))), "{shed:?}");
        let shed = limiter.acquire_with(EndpointClass::Public, Normal).await;
        assert!(matches!(shed, Err(Error::Overloaded(_))), "{shed:?}");
        let l2 = handles.pop().unwrap().await.unwrap();
        let l1 = handles.pop().unwrap().await.unwrap();
        assert!(matches!(l2, Err(Error::Overloaded(_))), "{l2:?}");
        assert!(matches!(l1, Err(Error::Overloaded(_))), "{l1:?}");
        handles.pop().unwrap().await.unwrap().unwrap();
        for h in h2 {
            h.await.unwrap().unwrap();
        }
        let mut all = order.lock().unwrap().clone();
        all.extend(o2.lock().unwrap().iter());
        assert_eq!(all, ["L0", "H", "N"]);
        assert_eq!(limiter.stats().public.shed, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn the_predicted_wait_counts_only_requests_served_first() {
        // Six Low requests queued (at 8/s): another Low would wait 750 ms and is refused at
        // once, but a High is served right after the current turn and is admitted.
        let cfg = RateLimiterConfig { max_wait: Duration::from_millis(500), ..Default::default() };
        let limiter = RateLimiter::new(cfg).unwrap();
        limiter.acquire(EndpointClass::Public).await.unwrap();
        let who: Vec<(&'static str, Priority)> = (0..6).map(|_| ("L", Priority::Low)).collect();
        let (_order, handles) = spawn_in_order(&limiter, &who).await;
        let t = Instant::now();
        let low = limiter.acquire_with(EndpointClass::Public, Priority::Low).await;
        assert!(matches!(low, Err(Error::RateLimited { local: true, .. })), "{low:?}");
        assert_eq!(t.elapsed(), Duration::ZERO);
        limiter.acquire_with(EndpointClass::Public, Priority::High).await.unwrap();
        assert_eq!(t.elapsed(), Duration::from_millis(250));
        for h in handles {
            let _ = h.await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn penalty_pauses_the_class_then_ramps_up() {
        let limiter = RateLimiter::coinbase();
        limiter.acquire(EndpointClass::Private).await.unwrap();
        let pause = limiter.penalize(EndpointClass::Private, Some(Duration::from_secs(2)));
        assert_eq!(pause, Duration::from_secs(2));
        let start = Instant::now();
        limiter.acquire(EndpointClass::Private).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        // Public is not affected.
        let p = Instant::now();
        limiter.acquire(EndpointClass::Public).await.unwrap();
        assert_eq!(p.elapsed(), Duration::ZERO);
        // During the ramp (5 s) the class runs at half rate (12/s): 12 more take ~1 s.
        let r = Instant::now();
        for _ in 0..12 {
            limiter.acquire(EndpointClass::Private).await.unwrap();
        }
        let ramp = r.elapsed();
        assert!(ramp >= Duration::from_millis(900), "{ramp:?}");
        // After the ramp, full rate again (24/s): 24 take ~1 s.
        tokio::time::advance(Duration::from_secs(10)).await;
        let f = Instant::now();
        for _ in 0..24 {
            limiter.acquire(EndpointClass::Private).await.unwrap();
        }
        assert!(f.elapsed() < Duration::from_millis(900), "{:?}", f.elapsed());
        assert_eq!(limiter.stats().private.rate_limit_pauses, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_without_retry_after_and_resets_on_success() {
        let limiter = RateLimiter::coinbase();
        let a = limiter.penalize(EndpointClass::Public, None);
        let b = limiter.penalize(EndpointClass::Public, None);
        let c = limiter.penalize(EndpointClass::Public, None);
        assert!(a >= Duration::from_secs(1) && a <= Duration::from_millis(1250), "{a:?}");
        assert!(b >= Duration::from_secs(2) && b <= Duration::from_millis(2500), "{b:?}");
        assert!(c >= Duration::from_secs(4) && c <= Duration::from_secs(5), "{c:?}");
        limiter.record_success(EndpointClass::Public);
        let d = limiter.penalize(EndpointClass::Public, None);
        assert!(d <= Duration::from_millis(1250), "{d:?}");
        assert!(limiter.paused_for(EndpointClass::Public).is_some());
    }
}
