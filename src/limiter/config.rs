//! The vocabulary and settings of the rate limiter: endpoint classes, priorities, the limit of
//! a class with its safety margin, and [`RateLimiterConfig`].

use std::{fmt, num::NonZeroU32, time::Duration};

use governor::Quota;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The rate-limit classes of Coinbase Advanced Trade: public endpoints are limited per IP,
/// private ones per user (every API key of the user together, COINBASE.md §3, §7).
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

    /// Coinbase's stated limit of the class, requests per second: 10 per IP for public
    /// endpoints, 30 per user for private ones. The one place the client's limiter, the
    /// simulator and the shared tier take it from.
    pub const fn coinbase_limit(self) -> u32 {
        match self {
            EndpointClass::Public => 10,
            EndpointClass::Private => 30,
        }
    }

    pub(crate) const fn index(self) -> usize {
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
    pub(super) const fn rank(self) -> u8 {
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

    /// Coinbase's public limit ([`EndpointClass::coinbase_limit`], 10/s) at an 80 % margin:
    /// 8/s, burst 1.
    pub const fn coinbase_public() -> Self {
        Self::coinbase(EndpointClass::Public)
    }

    /// Coinbase's private limit ([`EndpointClass::coinbase_limit`], 30/s) at an 80 % margin:
    /// 24/s, burst 5.
    pub const fn coinbase_private() -> Self {
        Self::coinbase(EndpointClass::Private)
    }

    /// Coinbase's limit of `class` at an 80 % margin, with the largest burst that keeps every
    /// one-second window below the limit (as [`with_margin`](ClassLimit::with_margin)`(limit, 80)`).
    pub const fn coinbase(class: EndpointClass) -> Self {
        let limit = class.coinbase_limit();
        let rate = limit * 80 / 100;
        let burst = limit - 1 - rate;
        ClassLimit { limit_per_second: nz(limit), rate_per_second: nz(rate), burst: nz(burst) }
    }

    pub(super) fn validate(&self, class: EndpointClass) -> Result<()> {
        if self.rate_per_second.get() + self.burst.get() > self.limit_per_second.get() {
            return Err(Error::Config(format!(
                "{class} rate ({}/s) plus burst ({}) exceeds the limit ({}/s); lower them",
                self.rate_per_second, self.burst, self.limit_per_second
            )));
        }
        Ok(())
    }

    pub(super) fn quota(&self) -> Quota {
        let period = Duration::from_nanos(1_000_000_000 / u64::from(self.rate_per_second.get()));
        Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(self.rate_per_second))
            .allow_burst(self.burst)
    }

    pub(crate) fn interval(&self) -> Duration {
        Duration::from_nanos(1_000_000_000 / u64::from(self.rate_per_second.get()))
    }
}

pub(super) const fn nz(v: u32) -> NonZeroU32 {
    match NonZeroU32::new(v) {
        Some(n) => n,
        None => NonZeroU32::MIN,
    }
}

/// Settings of a [`RateLimiter`](crate::RateLimiter).
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
    /// [`Priority::Low`] requests (candle backfill and refreshes) are admitted at most at this
    /// percentage of each class's rate, one at a time (never from the burst): however long a
    /// bulk refresh runs, the class keeps its burst, less the cell the bulk read has just
    /// taken, for the ticker and account reads of the next tick. 1..=100; default 100 (bulk
    /// reads still use the whole rate).
    pub low_priority_rate_percent: u32,
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
            low_priority_rate_percent: 100,
        }
    }
}

impl RateLimiterConfig {
    /// The limit of `class`.
    pub fn class(&self, class: EndpointClass) -> ClassLimit {
        match class {
            EndpointClass::Public => self.public,
            EndpointClass::Private => self.private,
        }
    }

    /// Check the settings.
    ///
    /// # Errors
    /// [`Error::Config`] naming the bad setting.
    pub fn validate(&self) -> Result<()> {
        self.public.validate(EndpointClass::Public)?;
        self.private.validate(EndpointClass::Private)?;
        if !(1..=100).contains(&self.low_priority_rate_percent) {
            return Err(Error::Config(format!(
                "low_priority_rate_percent must be 1..=100, got {}",
                self.low_priority_rate_percent
            )));
        }
        if self.max_waiters == 0 {
            return Err(Error::Config("max_waiters must be at least 1".into()));
        }
        if self.backoff_base.is_zero() || self.backoff_max < self.backoff_base {
            return Err(Error::Config("backoff_base must be > 0 and <= backoff_max".into()));
        }
        Ok(())
    }
}
