//! A client-side rate limiter per endpoint class that never lets a request out that would
//! exceed the exchange's limit, and pauses a whole class after a 429.
//!
//! Built on governor's GCRA with a clock adapter over [`tokio::time::Instant`], so waits obey
//! `tokio::time::pause` (governor's own `until_ready` sleeps in real time). One
//! [`RateLimiter`] is a cheap handle: every clone shares one budget. Coinbase's private limit is
//! per **user**, and a user has one key per portfolio: [`RateLimiter::shared_for`] gives every
//! client of one user the same limiter, process-wide.

use std::{
    fmt,
    num::NonZeroU32,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use governor::{middleware::NoOpMiddleware, state::InMemoryState, state::NotKeyed};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::{
    error::{Error, Result},
    util::lock,
};

mod config;
mod queue;
mod shared;

pub use self::config::{ClassLimit, EndpointClass, Priority, RateLimiterConfig};
use self::{
    config::nz,
    queue::{Grant, Queue, Slot, WaitingGuard},
};
use crate::clock::{TokioClock, TokioInstant};

type Gcra = governor::RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<TokioInstant>>;

struct Class {
    limit: ClassLimit,
    full: Gcra,
    half: Gcra,
    /// The pace of [`Priority::Low`] requests: `low_priority_rate_percent` of the rate, a burst
    /// of one, so bulk reads leave the class's burst to the requests that gate decisions.
    low: Gcra,
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
    /// The account identity of a limiter from [`RateLimiter::shared_for`].
    identity: Option<String>,
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

/// The admission interval of [`Priority::Low`] requests: the class's, stretched to
/// `percent` % of its rate.
fn low_interval(limit: &ClassLimit, percent: u32) -> Duration {
    (limit.interval() * 100) / percent.clamp(1, 100)
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
        Self::build(RateLimiterConfig::default(), None)
    }

    /// A limiter with custom settings.
    ///
    /// # Errors
    /// [`Error::Config`] if the settings are invalid.
    pub fn new(cfg: RateLimiterConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self::build(cfg, None))
    }

    fn build(cfg: RateLimiterConfig, identity: Option<String>) -> Self {
        let class = |limit: ClassLimit| {
            let half_rate = nz((limit.rate_per_second.get() / 2).max(1));
            let half = ClassLimit { rate_per_second: half_rate, burst: NonZeroU32::MIN, ..limit };
            let low = governor::Quota::with_period(low_interval(&limit, cfg.low_priority_rate_percent))
                .unwrap_or_else(|| limit.quota())
                .allow_burst(NonZeroU32::MIN);
            Class {
                limit,
                full: governor::RateLimiter::direct_with_clock(limit.quota(), TokioClock),
                half: governor::RateLimiter::direct_with_clock(half.quota(), TokioClock),
                low: governor::RateLimiter::direct_with_clock(low, TokioClock),
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
        RateLimiter { inner: Arc::new(Inner { cfg, classes, identity }) }
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
            && self.try_cell(c, start, priority).is_ok()
        {
            c.acquired.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        // Above `Low`, with only bulk reads waiting (their turn-holder asleep until its paced
        // cell): take a free cell at once instead of queueing behind them.
        if priority > Priority::Low {
            let q = lock(&c.queue);
            if q.ahead_of(priority) == 0
                && (!q.busy || q.holder_low)
                && self.pause_remaining(c, start).is_none()
                && self.try_cell(c, start, priority).is_ok()
            {
                c.acquired.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }

        let _waiting = WaitingGuard::enter(&c.waiting);
        let (mut slot, place) = {
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
                (Slot { class: c, key: Some(key), rx: Some(rx), turn: false }, key)
            } else {
                q.busy = true;
                q.holder_low = priority == Priority::Low;
                let key = q.place(priority);
                (Slot { class: c, key: None, rx: None, turn: true }, key)
            }
        };

        // This request holds the turn: it alone polls the GCRA until admitted.
        loop {
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
                        return Err(Error::RateLimited {
                            retry_after: Some(c.limit.interval()),
                            local: true,
                        });
                    }
                }
            }
            // A bulk read holding the turn steps aside for a request that gates a decision,
            // keeping its place among the bulk reads.
            if priority == Priority::Low {
                let mut q = lock(&c.queue);
                if q.ahead_of(Priority::Normal) > 0 {
                    let rx = q.reinsert(place);
                    q.pass_turn();
                    drop(q);
                    slot.turn = false;
                    slot.key = Some(place);
                    slot.rx = Some(rx);
                    continue;
                }
            }
            let now = Instant::now();
            let wait = match self.pause_remaining(c, now) {
                Some(p) => p,
                None => match self.try_cell(c, now, priority) {
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

    /// How long a request of `class` at `priority` would wait if it asked now, as the limiter
    /// predicts it: one admission interval for itself and for each request that would be
    /// served before it (at [`Priority::Low`], at the bulk pace), plus the rest of a 429 pause.
    /// The estimate [`MarketDataPath::Balanced`](crate::MarketDataPath::Balanced) picks a
    /// class by.
    pub fn predicted_wait(&self, class: EndpointClass, priority: Priority) -> Duration {
        let c = &self.inner.classes[class.index()];
        let ahead = {
            let q = lock(&c.queue);
            q.ahead_of(priority) + usize::from(q.busy)
        };
        let interval = if priority == Priority::Low {
            low_interval(&c.limit, self.inner.cfg.low_priority_rate_percent)
        } else {
            c.limit.interval()
        };
        interval.saturating_mul(u32::try_from(ahead + 1).unwrap_or(u32::MAX))
            + self.pause_remaining(c, Instant::now()).unwrap_or_default()
    }

    fn try_cell(&self, c: &Class, now: Instant, priority: Priority) -> std::result::Result<(), Duration> {
        // Low first: a low cell taken when the class then refuses is a bulk read slowed a
        // little, where the other order would waste a cell of the exchange's budget.
        if priority == Priority::Low
            && let Err(nu) = c.low.check()
        {
            return Err(nu.wait_time_from(TokioInstant(now)));
        }
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

    /// Record the outcome of one request of `class` that this limiter admitted: a success
    /// resets the consecutive-429 count, the exchange's 429 pauses the class
    /// ([`penalize`](RateLimiter::penalize)), anything else leaves the limiter as it is. The one
    /// place where every layer (the client, a coordinated source's gate, the shared tier's
    /// fallback) reports to a limiter.
    pub fn record<T>(&self, class: EndpointClass, outcome: &Result<T>) {
        match outcome {
            Ok(_) => self.record_success(class),
            Err(Error::RateLimited { retry_after, local: false }) => {
                self.penalize(class, *retry_after);
            }
            Err(_) => {}
        }
    }

    /// Whether `other` is a handle to this very limiter (one shared budget).
    pub fn same_as(&self, other: &RateLimiter) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
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
        // L0 found the queue empty and took the turn before the others arrived, but a bulk read
        // steps aside for the higher priorities (keeping its place among the Low ones): every
        // High in arrival order, every Normal, then L0 and L1.
        assert_eq!(*order.lock().unwrap(), ["H0", "H1", "H2", "N0", "N1", "N2", "L0", "L1"]);
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
        // once, but a High is served first (the Low turn-holder steps aside) and is admitted
        // at the next cell.
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
        assert_eq!(t.elapsed(), Duration::from_millis(125));
        for h in handles {
            let _ = h.await.unwrap();
        }
    }

    /// #18: bulk reads run at the class's rate one at a time, never from its burst, so the
    /// reads that gate decisions still find the burst (less the cell the bulk read has just
    /// taken) however long a bulk refresh runs, and take it without queueing behind it.
    #[tokio::test(start_paused = true)]
    async fn bulk_reads_leave_the_burst_to_higher_priorities() {
        let limiter = RateLimiter::coinbase(); // private: 24/s, burst 5
        let admitted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut bulk = Vec::new();
        for _ in 0..60 {
            let (l, n) = (limiter.clone(), Arc::clone(&admitted));
            bulk.push(tokio::spawn(async move {
                l.acquire_with(EndpointClass::Private, Priority::Low).await.unwrap();
                n.fetch_add(1, Ordering::SeqCst);
            }));
        }
        tokio::time::sleep(Duration::from_millis(1_010)).await;
        // One at once, then one per 1/24 s: no burst of five.
        assert_eq!(admitted.load(Ordering::SeqCst), 25);
        let t = Instant::now();
        for _ in 0..4 {
            limiter.acquire_with(EndpointClass::Private, Priority::Normal).await.unwrap();
        }
        assert_eq!(t.elapsed(), Duration::ZERO, "four of the burst's five cells were free");
        for h in bulk {
            h.await.unwrap();
        }
        assert_eq!(limiter.stats().private.acquired, 64);

        // At half the rate, bulk reads leave the whole burst most of the time.
        let cfg = RateLimiterConfig { low_priority_rate_percent: 50, ..Default::default() };
        let limiter = RateLimiter::new(cfg).unwrap();
        let start = Instant::now();
        for _ in 0..12 {
            limiter.acquire_with(EndpointClass::Private, Priority::Low).await.unwrap();
        }
        // Eleven intervals of 1/12 s (each sleep rounded up to tokio's millisecond).
        let took = start.elapsed();
        assert!(took >= Duration::from_secs(1) / 12 * 11 && took < Duration::from_millis(940), "{took:?}");
        assert!(matches!(
            RateLimiter::new(RateLimiterConfig { low_priority_rate_percent: 0, ..Default::default() }),
            Err(Error::Config(_))
        ));
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
