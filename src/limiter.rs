//! A client-side rate limiter per endpoint class that never lets a request out that would
//! exceed the exchange's limit, and pauses a whole class after a 429.
//!
//! Built on governor's GCRA with a clock adapter over [`tokio::time::Instant`], so waits obey
//! `tokio::time::pause` (governor's own `until_ready` sleeps in real time). One
//! [`RateLimiter`] is a cheap handle: every clone shares one budget.

use std::{
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

use crate::error::{Error, Result};

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
    #[serde(with = "crate::config::duration_ms")]
    pub max_wait: Duration,
    /// At most this many requests may wait per class; more are shed with
    /// [`Error::Overloaded`]. Default 10,000.
    pub max_waiters: usize,
    /// First pause after a 429 without `Retry-After`; doubles on each consecutive 429.
    /// Default 1 s.
    #[serde(with = "crate::config::duration_ms")]
    pub backoff_base: Duration,
    /// Longest pause after a 429. Default 60 s.
    #[serde(with = "crate::config::duration_ms")]
    pub backoff_max: Duration,
    /// After a pause, the class runs at half rate for this long before returning to full
    /// rate. Default 5 s.
    #[serde(with = "crate::config::duration_ms")]
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
    /// FIFO of waiting requests: tokio's mutex is fair, so the head of the queue is the only
    /// one polling the GCRA, and requests leave in arrival order.
    queue: tokio::sync::Mutex<()>,
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
    /// Requests shed because too many were waiting.
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
                queue: tokio::sync::Mutex::new(()),
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

    /// Wait until a request of `class` may be sent, then count it as sent.
    ///
    /// # Errors
    /// [`Error::RateLimited`] with `local: true` when the wait would exceed `max_wait` (the
    /// request must not be sent); [`Error::Overloaded`] when `max_waiters` are already waiting.
    ///
    /// # Cancel safety
    /// Cancel safe: a dropped call leaves the queue and consumes no capacity unless it had
    /// already been admitted.
    pub async fn acquire(&self, class: EndpointClass) -> Result<()> {
        let c = &self.inner.classes[class.index()];
        let start = Instant::now();
        let deadline = start + self.inner.cfg.max_wait;

        // Fast path: nobody waiting, not paused, a cell is free.
        if c.waiting.load(Ordering::Acquire) == 0
            && self.pause_remaining(c, start).is_none()
            && self.try_cell(c, start).is_ok()
        {
            c.acquired.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }

        // Predict the wait from the queue length; fail fast rather than wait in vain.
        let ahead = c.waiting.load(Ordering::Acquire);
        if ahead >= self.inner.cfg.max_waiters {
            c.shed.fetch_add(1, Ordering::Relaxed);
            return Err(Error::Overloaded(format!(
                "{ahead} {class} requests are already waiting for the rate limiter"
            )));
        }
        let predicted = c.limit.interval().saturating_mul(ahead as u32)
            + self.pause_remaining(c, start).unwrap_or_default();
        if predicted > self.inner.cfg.max_wait {
            c.rejected_local.fetch_add(1, Ordering::Relaxed);
            return Err(Error::RateLimited { retry_after: Some(predicted), local: true });
        }

        let _waiting = WaitingGuard::enter(&c.waiting);
        let Ok(_turn) = tokio::time::timeout_at(deadline, c.queue.lock()).await else {
            c.rejected_local.fetch_add(1, Ordering::Relaxed);
            return Err(Error::RateLimited { retry_after: Some(c.limit.interval()), local: true });
        };
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

/// Lock a std mutex, recovering from poisoning (the data are plain timestamps, always valid).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
