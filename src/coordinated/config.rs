//! The knobs of a [`CoordinatedSource`] and its builder.

use std::{
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{
    CoordinatedSource, Inner, Limiting, batch::Batcher, breaker, coalesce::SingleFlight, refresh::CloseQueue,
    stats::Counters,
};
use crate::{
    clock::Clock,
    error::{Error, Result},
    limiter::{EndpointClass, RateLimiter},
    retry::RetryPolicy,
    source::MarketDataSource,
    util::setters,
};

pub(super) use super::breaker::BreakerConfig;

/// The knobs of a [`CoordinatedSource`], with defaults right for Coinbase. Plain data, so it
/// can be loaded from a file (durations in milliseconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CoordinatedConfig {
    /// How long a ticker stays fresh. Default 5 s (public data is cached 1 s upstream anyway;
    /// bots tick every few minutes).
    #[serde(with = "crate::util::duration_ms")]
    pub ticker_ttl: Duration,
    /// How long accounts stay fresh. Default 10 s; call
    /// [`CoordinatedSource::invalidate_accounts`] after placing an order.
    #[serde(with = "crate::util::duration_ms")]
    pub accounts_ttl: Duration,
    /// Refresh-ahead of tickers and accounts: a read that finds one fresh but due to expire
    /// within this time is served from the cache and refreshes it in the background (one
    /// upstream call however many readers), so that steady readers never wait for a miss.
    /// Zero (the default) turns it off. Must be shorter than both TTLs. Candle series are not
    /// refreshed ahead: their expiry is a candle's close, and nothing newer exists before it.
    #[serde(with = "crate::util::duration_ms")]
    pub refresh_before_expiry: Duration,
    /// A candle series is fresh until the candle in progress closes, plus this grace (so the
    /// exchange has finished the candle). Default 500 ms.
    #[serde(with = "crate::util::duration_ms")]
    pub candle_grace: Duration,
    /// Up to this much random extra time after the grace, so that many series do not all
    /// refresh at the same close. Default 500 ms.
    #[serde(with = "crate::util::duration_ms")]
    pub candle_jitter: Duration,
    /// How long an unknown product's `NotFound` is remembered. Default 60 s.
    #[serde(with = "crate::util::duration_ms")]
    pub negative_ttl: Duration,
    /// The oldest data served when the upstream fails. Default 60 s.
    #[serde(with = "crate::util::duration_ms")]
    pub max_stale: Duration,
    /// Serve expired data (up to `max_stale`) at once and refresh it in the background.
    /// Default off.
    pub stale_while_revalidate: bool,
    /// How long the first ticker request of a batch waits for others. Default 5 ms.
    #[serde(with = "crate::util::duration_ms")]
    pub batch_window: Duration,
    /// Most products per batched ticker call. Default 100.
    pub batch_size: usize,
    /// Merge ticker requests into `tickers` (best_bid_ask) calls. Default on.
    pub batch_tickers: bool,
    /// Retries of a failed idempotent upstream call when the error is retryable. Default 2.
    pub max_retries: u32,
    /// First retry delay when the error gives none; doubles each retry, with jitter.
    /// Default 250 ms.
    #[serde(with = "crate::util::duration_ms")]
    pub retry_backoff: Duration,
    /// The longest wait before a retry: the backoff stops growing here, and a retry the
    /// exchange asks to delay longer (`Retry-After`) is not made; the caller gets stale data or
    /// the error at once. Default 5 s.
    #[serde(with = "crate::util::duration_ms")]
    pub max_retry_wait: Duration,
    /// The longest a read waits for the upstream (every retry included) before it answers with
    /// stale data within `max_stale` or [`Error::Timeout`]; the fetch goes on in the background.
    /// Default 15 s, so that a tick of many bots stays within a 30 s budget however the
    /// exchange stalls (the client's 10 s timeout × (1 + 2 retries) would be 31 s). Zero: no
    /// bound. A read can set its own with [`ReadOptions::by`](crate::ReadOptions::by).
    #[serde(with = "crate::util::duration_ms")]
    pub read_timeout: Duration,
    /// Most cached tickers (and, separately, candle series). Default 100,000.
    pub cache_capacity: u64,
    /// Most candles kept per series (oldest dropped). Default 1,000.
    pub max_candles_per_series: usize,
    /// The endpoint class of ticker and candle calls, for this source's gate
    /// ([`CoordinatedBuilder::rate_limiter`]) and circuit breaker. Default public.
    pub market_data_class: EndpointClass,
    /// The endpoint class of batched ticker calls, likewise. Default private (Coinbase's
    /// `best_bid_ask` needs a key); [`CoordinatedSource::coinbase`] takes the client's.
    pub batch_class: EndpointClass,
    /// The circuit breaker of upstream calls, per endpoint class: after a run of failures
    /// reads get stale data or [`Error::CircuitOpen`] at once, until a probe succeeds.
    pub breaker: BreakerConfig,
    /// What a read gets for the candle in progress: [`InProgressCandle::Live`] (default),
    /// [`Exact`](InProgressCandle::Exact) or [`ClosedOnly`](InProgressCandle::ClosedOnly).
    pub in_progress: InProgressCandle,
    /// With [`InProgressCandle::Exact`]: the oldest a served candle in progress may be; an
    /// older one is fetched again (one call per series, counted in
    /// `stats().in_progress_refetches`). Default 5 s.
    #[serde(with = "crate::util::duration_ms")]
    pub in_progress_max_age: Duration,
    /// What a read gets when the candle its cached series was fetched in has closed and the
    /// series has not been refreshed yet: [`AfterClose::ServeLastKnown`] (default) or
    /// [`AfterClose::Wait`]. Applies with [`InProgressCandle::Live`] only; `Exact` and
    /// `ClosedOnly` readers always wait for the refresh.
    pub after_close: AfterClose,
    /// With [`AfterClose::ServeLastKnown`]: most background close refreshes in flight at once
    /// (each waits its turn in the rate limiter at candle priority, so a small number keeps both
    /// classes busy without queueing hundreds of requests there). Default 16.
    pub close_refresh_concurrency: usize,
}

/// What happens at a candle close to the series read before it (see
/// [`CoordinatedConfig::after_close`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterClose {
    /// Every series read since its last fetch is refreshed in the background when its candle
    /// closes (after `candle_grace` and its jitter), in a fair order: by when each went stale,
    /// ties broken by a hash of the series and the close (never by which bot reads first),
    /// through the same single-flight and rate limiter as any read, at most
    /// `close_refresh_concurrency` at once. Until its refresh lands (for at most `max_stale`
    /// past its freshness), a read of that series is answered at once from the cache: its
    /// closed candles are exact, and its last candle, the bucket that has just closed, is the
    /// last known state of that bucket (as fetched while in progress, moved by later last
    /// trades), marked in [`Fresh::provisional`](crate::Fresh::provisional). A read with a
    /// `max_age` ([`ReadOptions::max_age`](crate::ReadOptions::max_age)) waits for the
    /// refresh instead. Default.
    #[default]
    ServeLastKnown,
    /// No background refresh: the first read after the close fetches the series (and every
    /// reader waits for it): the behaviour before this setting existed.
    Wait,
}

/// The freshness contract of the candle in progress (closed candles are always exact and
/// never fetched twice).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InProgressCandle {
    /// At no extra call: every fresher last-trade price the source holds (each batched
    /// ticker, each pushed ticker or trade) moves the candle's close and widens its high and
    /// low. Its volume, and any extreme between two prices the source saw, stay as the exchange
    /// answered at the last fetch; such a candle is flagged
    /// [`CandleFidelity::Patched`](crate::CandleFidelity::Patched) in
    /// [`Fresh::in_progress`](crate::Fresh::in_progress). Default.
    #[default]
    Live,
    /// The bucket in progress is fetched again when older than
    /// [`in_progress_max_age`](CoordinatedConfig::in_progress_max_age): exactly the exchange's
    /// candle, at one call per series per refetch.
    Exact,
    /// Never return the bucket in progress (Freqtrade's convention): a read ends at the last
    /// closed candle.
    ClosedOnly,
}

impl Default for CoordinatedConfig {
    fn default() -> Self {
        CoordinatedConfig {
            ticker_ttl: Duration::from_secs(5),
            accounts_ttl: Duration::from_secs(10),
            refresh_before_expiry: Duration::ZERO,
            candle_grace: Duration::from_millis(500),
            candle_jitter: Duration::from_millis(500),
            negative_ttl: Duration::from_secs(60),
            max_stale: Duration::from_secs(60),
            stale_while_revalidate: false,
            batch_window: Duration::from_millis(5),
            batch_size: 100,
            batch_tickers: true,
            max_retries: 2,
            retry_backoff: Duration::from_millis(250),
            max_retry_wait: Duration::from_secs(5),
            read_timeout: Duration::from_secs(15),
            cache_capacity: 100_000,
            max_candles_per_series: 1_000,
            market_data_class: EndpointClass::Public,
            batch_class: EndpointClass::Private,
            breaker: BreakerConfig::default(),
            in_progress: InProgressCandle::Live,
            in_progress_max_age: Duration::from_secs(5),
            after_close: AfterClose::ServeLastKnown,
            close_refresh_concurrency: 16,
        }
    }
}

impl CoordinatedConfig {
    /// The retry policy these settings describe.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::new(self.max_retries).backoff(self.retry_backoff).max_wait(self.max_retry_wait)
    }

    /// Check the settings.
    ///
    /// # Errors
    /// [`Error::Config`] naming the bad setting and what it must be.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(m.to_string()));
        if self.ticker_ttl.is_zero() || self.accounts_ttl.is_zero() {
            return bad("ticker_ttl and accounts_ttl must be greater than zero");
        }
        if self.refresh_before_expiry >= self.ticker_ttl.min(self.accounts_ttl) {
            return bad("refresh_before_expiry must be shorter than ticker_ttl and accounts_ttl");
        }
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1");
        }
        if self.cache_capacity == 0 || self.max_candles_per_series == 0 {
            return bad("cache_capacity and max_candles_per_series must be at least 1");
        }
        if self.in_progress == InProgressCandle::Exact && self.in_progress_max_age.is_zero() {
            return bad("in_progress_max_age must be greater than zero with in_progress = exact");
        }
        if self.close_refresh_concurrency == 0 {
            return bad("close_refresh_concurrency must be at least 1");
        }
        if self.max_stale < self.ticker_ttl {
            return bad("max_stale must be at least ticker_ttl");
        }
        if self.breaker.enabled {
            self.breaker.validate()?;
        }
        Ok(())
    }
}

/// Builder of a [`CoordinatedSource`].
#[must_use]
pub struct CoordinatedBuilder {
    pub(super) upstream: Arc<dyn MarketDataSource>,
    pub(super) cfg: CoordinatedConfig,
    pub(super) clock: Clock,
    pub(super) limiting: Limiting,
    /// [`rate_limiter`](CoordinatedBuilder::rate_limiter) was given the limiter the upstream
    /// already acquires from: every call would be counted twice.
    pub(super) gate_conflict: bool,
}

impl fmt::Debug for CoordinatedBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoordinatedBuilder").field("config", &self.cfg).finish_non_exhaustive()
    }
}

impl CoordinatedBuilder {
    setters! {
        /// See [`CoordinatedConfig::ticker_ttl`].
        ticker_ttl: Duration,
        /// See [`CoordinatedConfig::accounts_ttl`].
        accounts_ttl: Duration,
        /// See [`CoordinatedConfig::refresh_before_expiry`].
        refresh_before_expiry: Duration,
        /// See [`CoordinatedConfig::candle_grace`].
        candle_grace: Duration,
        /// See [`CoordinatedConfig::candle_jitter`].
        candle_jitter: Duration,
        /// See [`CoordinatedConfig::negative_ttl`].
        negative_ttl: Duration,
        /// See [`CoordinatedConfig::max_stale`].
        max_stale: Duration,
        /// See [`CoordinatedConfig::stale_while_revalidate`].
        stale_while_revalidate: bool,
        /// See [`CoordinatedConfig::batch_window`].
        batch_window: Duration,
        /// See [`CoordinatedConfig::batch_size`].
        batch_size: usize,
        /// See [`CoordinatedConfig::batch_tickers`].
        batch_tickers: bool,
        /// See [`CoordinatedConfig::max_retries`].
        max_retries: u32,
        /// See [`CoordinatedConfig::retry_backoff`].
        retry_backoff: Duration,
        /// See [`CoordinatedConfig::max_retry_wait`].
        max_retry_wait: Duration,
        /// See [`CoordinatedConfig::read_timeout`].
        read_timeout: Duration,
        /// See [`CoordinatedConfig::cache_capacity`].
        cache_capacity: u64,
        /// See [`CoordinatedConfig::max_candles_per_series`].
        max_candles_per_series: usize,
        /// See [`CoordinatedConfig::market_data_class`].
        market_data_class: EndpointClass,
        /// See [`CoordinatedConfig::batch_class`].
        batch_class: EndpointClass,
        /// See [`CoordinatedConfig::in_progress`].
        in_progress: InProgressCandle,
        /// See [`CoordinatedConfig::in_progress_max_age`].
        in_progress_max_age: Duration,
        /// See [`CoordinatedConfig::after_close`].
        after_close: AfterClose,
        /// See [`CoordinatedConfig::close_refresh_concurrency`].
        close_refresh_concurrency: usize,
    }

    /// The circuit breaker's settings (see [`CoordinatedConfig::breaker`]);
    /// [`BreakerConfig::disabled`] turns it off.
    pub fn breaker(mut self, breaker: BreakerConfig) -> Self {
        self.cfg.breaker = breaker;
        self
    }

    /// Replace the whole configuration.
    pub fn config(mut self, cfg: CoordinatedConfig) -> Self {
        self.cfg = cfg;
        self
    }

    /// The clock for candle boundaries (default [`Clock::system`]). Share it with the
    /// simulated exchange in tests.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Gate every upstream call through `limiter` (for upstreams that do not limit
    /// themselves), replacing any limiter set before. Giving it the limiter the upstream
    /// client already acquires from (as [`CoordinatedSource::coinbase`] records) is refused by
    /// [`build`](CoordinatedBuilder::build): each request would take two slots.
    pub fn rate_limiter(mut self, limiter: RateLimiter) -> Self {
        self.gate_conflict = matches!(&self.limiting, Limiting::Upstream(u) if u.same_as(&limiter));
        self.limiting = Limiting::Gate(limiter);
        self
    }

    /// The limiter the upstream already draws from: reported in the stats, not acquired again
    /// (replacing any limiter set before).
    pub fn upstream_rate_limiter(mut self, limiter: RateLimiter) -> Self {
        self.gate_conflict = false;
        self.limiting = Limiting::Upstream(limiter);
        self
    }

    /// The retry policy of upstream calls: sets
    /// [`max_retries`](CoordinatedConfig::max_retries),
    /// [`retry_backoff`](CoordinatedConfig::retry_backoff) and
    /// [`max_retry_wait`](CoordinatedConfig::max_retry_wait) at once.
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.cfg.max_retries = policy.max_retries;
        self.cfg.retry_backoff = policy.backoff;
        self.cfg.max_retry_wait = policy.max_wait;
        self
    }

    /// Build the source.
    ///
    /// # Errors
    /// [`Error::Config`] if the configuration is invalid.
    pub fn build(self) -> Result<CoordinatedSource> {
        self.cfg.validate()?;
        if self.gate_conflict {
            return Err(Error::Config(
                "rate_limiter: this limiter already gates the upstream client; give it to one of them only"
                    .into(),
            ));
        }
        let cfg = self.cfg;
        // moka's TTL only bounds memory: freshness is judged on tokio's clock (see cache.rs).
        let memory_bound = cfg.max_stale.max(cfg.negative_ttl) + Duration::from_secs(60);
        let series_bound = Duration::from_secs(86_400 * 2) + cfg.max_stale;
        let inner = Inner {
            tickers: moka::sync::Cache::builder()
                .max_capacity(cfg.cache_capacity)
                .time_to_live(memory_bound)
                .build(),
            series: moka::future::Cache::builder()
                .max_capacity(cfg.cache_capacity)
                .time_to_live(series_bound)
                .build(),
            negative: moka::future::Cache::builder()
                .max_capacity(cfg.cache_capacity)
                .time_to_live(memory_bound)
                .build(),
            accounts: Mutex::new(None),
            accounts_epoch: std::sync::atomic::AtomicU64::new(0),
            ticker_flight: SingleFlight::new(),
            series_flight: SingleFlight::new(),
            accounts_flight: SingleFlight::new(),
            closes: CloseQueue::default(),
            batcher: Batcher::new(cfg.batch_size),
            counters: Counters::default(),
            upstream: self.upstream,
            clock: self.clock,
            limiting: self.limiting,
            retry: cfg.retry_policy(),
            breaker: breaker::Breakers::new(cfg.breaker.clone()),
            cfg,
        };
        Ok(CoordinatedSource { inner: Arc::new(inner) })
    }
}
