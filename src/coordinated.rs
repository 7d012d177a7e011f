//! [`CoordinatedSource`]: one shared, rate-limited path to the exchange for any number of
//! bots.
//!
//! A read is answered, in order of preference, from fresh cache; by joining a fetch already
//! in flight for the same key (single-flight); by a new upstream call — batched with other
//! products' ticker requests that arrive within the batch window; and, if the upstream fails,
//! from cached data no older than `max_stale`, flagged as stale. Candle series are refreshed
//! incrementally: closed candles are never fetched twice.

mod batch;
mod breaker;
mod cache;
mod coalesce;
#[cfg(feature = "stream")]
pub(crate) mod feed;

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use self::{
    batch::{Batcher, Items, Next},
    cache::{Entry, Series, SeriesEntry},
    coalesce::{Role, SingleFlight},
};
use crate::{
    clock::Clock,
    coinbase::CoinbaseClient,
    error::{Error, Result},
    limiter::{EndpointClass, RateLimiter, lock},
    model::{Account, Balances, Candle, CandleRange, Granularity, ProductId, Ticker},
    source::{MarketDataSource, PrefetchRequest, distinct},
    stats::{CoordinatedStats, Counters, Op, add, inc},
};

pub use self::breaker::{BreakerConfig, BreakerState, BreakerStats, ClassBreakerStats};

/// Where a value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Fetched from the upstream for this read (or by a fetch this read joined).
    Upstream,
    /// Served from fresh cache.
    Cache,
    /// Served from cache past its freshness: the upstream failed (or, with
    /// stale-while-revalidate, a refresh is under way). Never older than `max_stale`.
    Stale,
}

/// A value with its provenance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fresh<T> {
    /// The value.
    pub value: T,
    /// Where it came from.
    pub origin: Origin,
    /// Time since it was fetched from the upstream.
    #[serde(with = "crate::config::duration_ms")]
    pub age: Duration,
}

impl<T> Fresh<T> {
    /// Whether the value is stale (see [`Origin::Stale`]).
    pub fn is_stale(&self) -> bool {
        self.origin == Origin::Stale
    }
}

/// Per-read options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// Refuse cached data older than this, even if the default policy would serve it.
    pub max_age: Option<Duration>,
}

impl ReadOptions {
    /// Demand data no older than `max_age`.
    pub fn max_age(max_age: Duration) -> Self {
        ReadOptions { max_age: Some(max_age) }
    }
}

/// The knobs of a [`CoordinatedSource`], with defaults right for Coinbase. Plain data, so it
/// can be loaded from a file (durations in milliseconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CoordinatedConfig {
    /// How long a ticker stays fresh. Default 5 s (public data is cached 1 s upstream anyway;
    /// bots tick every few minutes).
    #[serde(with = "crate::config::duration_ms")]
    pub ticker_ttl: Duration,
    /// How long accounts stay fresh. Default 10 s; call
    /// [`CoordinatedSource::invalidate_accounts`] after placing an order.
    #[serde(with = "crate::config::duration_ms")]
    pub accounts_ttl: Duration,
    /// Refresh-ahead of tickers and accounts: a read that finds one fresh but due to expire
    /// within this time is served from the cache and refreshes it in the background (one
    /// upstream call however many readers), so that steady readers never wait for a miss.
    /// Zero (the default) turns it off. Must be shorter than both TTLs. Candle series are not
    /// refreshed ahead: their expiry is a candle's close, and nothing newer exists before it.
    #[serde(with = "crate::config::duration_ms")]
    pub refresh_before_expiry: Duration,
    /// A candle series is fresh until the candle in progress closes, plus this grace (so the
    /// exchange has finished the candle). Default 500 ms.
    #[serde(with = "crate::config::duration_ms")]
    pub candle_grace: Duration,
    /// Up to this much random extra time after the grace, so that many series do not all
    /// refresh at the same close. Default 500 ms.
    #[serde(with = "crate::config::duration_ms")]
    pub candle_jitter: Duration,
    /// How long an unknown product's `NotFound` is remembered. Default 60 s.
    #[serde(with = "crate::config::duration_ms")]
    pub negative_ttl: Duration,
    /// The oldest data served when the upstream fails. Default 60 s.
    #[serde(with = "crate::config::duration_ms")]
    pub max_stale: Duration,
    /// Serve expired data (up to `max_stale`) at once and refresh it in the background.
    /// Default off.
    pub stale_while_revalidate: bool,
    /// How long the first ticker request of a batch waits for others. Default 5 ms.
    #[serde(with = "crate::config::duration_ms")]
    pub batch_window: Duration,
    /// Most products per batched ticker call. Default 100.
    pub batch_size: usize,
    /// Merge ticker requests into `tickers` (best_bid_ask) calls. Default on.
    pub batch_tickers: bool,
    /// Retries of a failed idempotent upstream call when the error is retryable. Default 2.
    pub max_retries: u32,
    /// First retry delay when the error gives none; doubles each retry, with jitter.
    /// Default 250 ms.
    #[serde(with = "crate::config::duration_ms")]
    pub retry_backoff: Duration,
    /// A retry that would wait longer than this is not made; the caller gets stale data or the
    /// error at once. Default 5 s.
    #[serde(with = "crate::config::duration_ms")]
    pub max_retry_wait: Duration,
    /// Most cached tickers (and, separately, candle series). Default 100,000.
    pub cache_capacity: u64,
    /// Most candles kept per series (oldest dropped). Default 1,000.
    pub max_candles_per_series: usize,
    /// The endpoint class of ticker and candle calls, used when this source gates upstream
    /// calls itself ([`CoordinatedBuilder::rate_limiter`]). Default public.
    pub market_data_class: EndpointClass,
    /// The circuit breaker of upstream calls, per endpoint class: after a run of failures
    /// reads get stale data or [`Error::CircuitOpen`] at once, until a probe succeeds.
    pub breaker: BreakerConfig,
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
            cache_capacity: 100_000,
            max_candles_per_series: 1_000,
            market_data_class: EndpointClass::Public,
            breaker: BreakerConfig::default(),
        }
    }
}

impl CoordinatedConfig {
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
    upstream: Arc<dyn MarketDataSource>,
    cfg: CoordinatedConfig,
    clock: Clock,
    gate: Option<RateLimiter>,
    upstream_limiter: Option<RateLimiter>,
}

impl fmt::Debug for CoordinatedBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoordinatedBuilder").field("config", &self.cfg).finish_non_exhaustive()
    }
}

macro_rules! setters {
    ($($(#[$m:meta])* $name:ident: $ty:ty),* $(,)?) => {
        $( $(#[$m])* pub fn $name(mut self, v: $ty) -> Self { self.cfg.$name = v; self } )*
    };
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
        /// See [`CoordinatedConfig::cache_capacity`].
        cache_capacity: u64,
        /// See [`CoordinatedConfig::max_candles_per_series`].
        max_candles_per_series: usize,
        /// See [`CoordinatedConfig::market_data_class`].
        market_data_class: EndpointClass,
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
    /// themselves). Do not also give the same limiter to the upstream client.
    pub fn rate_limiter(mut self, limiter: RateLimiter) -> Self {
        self.gate = Some(limiter);
        self
    }

    /// The limiter the upstream already draws from: reported in the stats, not acquired again.
    pub fn upstream_rate_limiter(mut self, limiter: RateLimiter) -> Self {
        self.upstream_limiter = Some(limiter);
        self
    }

    /// Build the source.
    ///
    /// # Errors
    /// [`Error::Config`] if the configuration is invalid.
    pub fn build(self) -> Result<CoordinatedSource> {
        self.cfg.validate()?;
        let cfg = self.cfg;
        // moka's TTL only bounds memory: freshness is judged on tokio's clock (see cache.rs).
        let memory_bound = cfg.max_stale.max(cfg.negative_ttl) + Duration::from_secs(60);
        let series_bound = Duration::from_secs(86_400 * 2) + cfg.max_stale;
        let inner = Inner {
            tickers: moka::future::Cache::builder()
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
            ticker_flight: SingleFlight::new(),
            series_flight: SingleFlight::new(),
            accounts_flight: SingleFlight::new(),
            batcher: Batcher::new(cfg.batch_size),
            counters: Counters::default(),
            upstream: self.upstream,
            clock: self.clock,
            gate: self.gate,
            upstream_limiter: self.upstream_limiter,
            breaker: breaker::Breakers::new(cfg.breaker.clone()),
            cfg,
        };
        Ok(CoordinatedSource { inner: Arc::new(inner) })
    }
}

struct Inner {
    upstream: Arc<dyn MarketDataSource>,
    cfg: CoordinatedConfig,
    clock: Clock,
    gate: Option<RateLimiter>,
    upstream_limiter: Option<RateLimiter>,
    tickers: moka::future::Cache<ProductId, Entry<Ticker>>,
    series: moka::future::Cache<(ProductId, Granularity), SeriesEntry>,
    negative: moka::future::Cache<ProductId, Instant>,
    /// One slot; a std mutex is enough because it is never held across an await.
    accounts: Mutex<Option<Entry<Arc<Vec<Account>>>>>,
    ticker_flight: Arc<SingleFlight<ProductId, Entry<Ticker>>>,
    series_flight: Arc<SingleFlight<(ProductId, Granularity), SeriesEntry>>,
    accounts_flight: Arc<SingleFlight<(), Entry<Arc<Vec<Account>>>>>,
    batcher: Batcher,
    counters: Counters,
    breaker: breaker::Breakers,
}

/// The coordinated path: cache, single-flight, batching, rate limits, 429 backoff, stale
/// serving, stats. Cheap to clone; clones share everything.
///
/// ```
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use tickshare::{CoordinatedSource, MarketDataSource, sim::SimExchange};
/// let sim = SimExchange::builder().start().await?;
/// let source = CoordinatedSource::coinbase(sim.client()?).build()?;
/// let btc = "BTC-USD".parse()?;
/// let first = source.ticker(&btc).await?;   // one upstream call
/// let second = source.ticker(&btc).await?;  // from cache
/// assert_eq!(first, second);
/// assert_eq!(source.stats().upstream_calls, 1);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct CoordinatedSource {
    inner: Arc<Inner>,
}

impl fmt::Debug for CoordinatedSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoordinatedSource").field("config", &self.inner.cfg).finish_non_exhaustive()
    }
}

impl CoordinatedSource {
    /// A builder over any upstream source.
    pub fn builder(upstream: impl MarketDataSource + 'static) -> CoordinatedBuilder {
        Self::builder_arc(Arc::new(upstream))
    }

    /// A builder over a shared upstream source.
    pub fn builder_arc(upstream: Arc<dyn MarketDataSource>) -> CoordinatedBuilder {
        CoordinatedBuilder {
            upstream,
            cfg: CoordinatedConfig::default(),
            clock: Clock::system(),
            gate: None,
            upstream_limiter: None,
        }
    }

    /// A builder over a [`CoinbaseClient`], matched to it: the client's rate limiter is
    /// reported in the stats, the batch size fits one `best_bid_ask` request, and the
    /// market-data class is the client's.
    pub fn coinbase(client: CoinbaseClient) -> CoordinatedBuilder {
        let limiter = client.rate_limiter().cloned();
        let class = client.market_data_class();
        let batch = client.best_bid_ask_chunk().min(CoordinatedConfig::default().batch_size);
        let mut b = Self::builder(client).market_data_class(class).batch_size(batch);
        b.upstream_limiter = limiter;
        b
    }

    /// The configuration in force.
    pub fn config(&self) -> &CoordinatedConfig {
        &self.inner.cfg
    }

    /// The rate limiter in use (the gate, or the upstream's), if known.
    pub fn rate_limiter(&self) -> Option<&RateLimiter> {
        self.inner.gate.as_ref().or(self.inner.upstream_limiter.as_ref())
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CoordinatedStats {
        let mut stats = self.inner.counters.snapshot(self.rate_limiter().map(RateLimiter::stats));
        stats.breaker = self.inner.breaker.stats();
        let inner = &self.inner;
        stats.cache_entries =
            inner.tickers.entry_count() + inner.series.entry_count() + inner.negative.entry_count();
        stats
    }

    /// The live counters, for cheap reads ([`UpstreamMeter`](crate::UpstreamMeter)).
    pub(crate) fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// Forget the cached accounts, e.g. after placing an order.
    pub fn invalidate_accounts(&self) {
        *lock(&self.inner.accounts) = None;
    }

    /// The ticker of `product`, with its provenance.
    ///
    /// # Errors
    /// As [`MarketDataSource::ticker`]; errors are never cached except `NotFound`, which is
    /// remembered for `negative_ttl`.
    ///
    /// # Cancel safety
    /// Cancel safe: the upstream fetch runs in its own task and still serves other callers.
    pub async fn ticker_with(&self, product: &ProductId, opts: ReadOptions) -> Result<Fresh<Ticker>> {
        let inner = &self.inner;
        let now = Instant::now();
        // A hit needs no negative-cache lookup (the most expensive part of a hit before):
        // remembering a product as unknown drops its cached data (`remember_unknown`).
        let cached = inner.tickers.get(product).await;
        if let Some(e) = &cached
            && let Some(hit) =
                inner.serve_cached(e, now, opts, || self.spawn_ticker_refresh(product.clone(), now))
        {
            if inner.expires_soon(e, now) {
                self.spawn_ticker_refresh(product.clone(), now);
            }
            return Ok(hit.map(|t| t.clone()));
        }
        inner.check_negative(product).await?;
        inc(&inner.counters.cache_misses);
        // `now` was read before the cache: a flight that ended between that read and this join
        // wrote a value at least as recent.
        let (result, role) = self.ticker_flight(product.clone(), now, opts.max_age).await;
        inner.note_role(role);
        inner.settle(result, cached.as_ref(), Instant::now())
    }

    /// Join or lead the flight for `product`. `missed_at` is when the caller began the cache
    /// read that missed and `max_age` what it asked: a value fetched since then, or fresh for
    /// it, is reused rather than fetched again.
    fn ticker_flight(
        &self,
        product: ProductId,
        missed_at: Instant,
        max_age: Option<Duration>,
    ) -> impl Future<Output = (Result<Entry<Ticker>>, Role)> + Send + '_ {
        let inner = Arc::clone(&self.inner);
        let flight = Arc::clone(&self.inner.ticker_flight);
        async move {
            let p = product.clone();
            flight
                .run(product, move || async move { Inner::fetch_ticker(inner, p, missed_at, max_age).await })
                .await
        }
    }

    /// Refresh `product` in the background, unless a fetch since `read_at` (when the caller
    /// read the entry it found expired or expiring) already did.
    fn spawn_ticker_refresh(&self, product: ProductId, read_at: Instant) {
        inc(&self.inner.counters.revalidations);
        let this = self.clone();
        tokio::spawn(async move {
            // A zero `max_age`: the entry the caller read does not count as fresh.
            let _ = this.ticker_flight(product, read_at, Some(Duration::ZERO)).await;
        });
    }

    /// Candles of `product` in `range`, with their provenance.
    ///
    /// # Errors
    /// As [`MarketDataSource::candles`].
    ///
    /// # Cancel safety
    /// Cancel safe, as [`ticker_with`](Self::ticker_with).
    pub async fn candles_with(
        &self,
        product: &ProductId,
        granularity: Granularity,
        range: CandleRange,
        opts: ReadOptions,
    ) -> Result<Fresh<Vec<Candle>>> {
        let inner = &self.inner;
        let range = range.aligned(granularity);
        let key = (product.clone(), granularity);
        let now = Instant::now();
        // As in `ticker_with`: the negative cache is consulted on a miss only.
        let cached = inner.series.get(&key).await;
        if let Some(e) = &cached
            && inner.series_covers(e, range, granularity, now)
        {
            let swr = || self.spawn_series_refresh(key.clone(), range);
            if let Some(hit) = inner.serve_cached(e, now, opts, swr) {
                return Ok(hit.map(|s| s.slice(range)));
            }
        }
        inner.check_negative(product).await?;
        inc(&inner.counters.cache_misses);
        // Up to two rounds: a joined fetch may have been for a narrower range.
        let mut result = Err(Error::Closed("no fetch was made".into()));
        for _ in 0..2 {
            let (r, role) = self.series_flight(key.clone(), range).await;
            inner.note_role(role);
            let retry = role == Role::Joined && matches!(&r, Ok(e) if !e.value.covers(range));
            result = r;
            if !retry {
                break;
            }
        }
        let cached = cached.filter(|e| e.value.covers(range));
        inner.settle(result, cached.as_ref(), Instant::now()).map(|f| f.map(|s| s.slice(range)))
    }

    fn series_flight(
        &self,
        key: (ProductId, Granularity),
        range: CandleRange,
    ) -> impl Future<Output = (Result<SeriesEntry>, Role)> + Send + '_ {
        let inner = Arc::clone(&self.inner);
        let flight = Arc::clone(&self.inner.series_flight);
        async move {
            let k = key.clone();
            flight.run(key, move || async move { Inner::fetch_series(inner, k, range).await }).await
        }
    }

    fn spawn_series_refresh(&self, key: (ProductId, Granularity), range: CandleRange) {
        inc(&self.inner.counters.revalidations);
        let this = self.clone();
        tokio::spawn(async move {
            let _ = this.series_flight(key, range).await;
        });
    }

    /// The accounts, with their provenance.
    ///
    /// # Errors
    /// As [`MarketDataSource::accounts`].
    ///
    /// # Cancel safety
    /// Cancel safe, as [`ticker_with`](Self::ticker_with).
    pub async fn accounts_with(&self, opts: ReadOptions) -> Result<Fresh<Arc<Vec<Account>>>> {
        let inner = &self.inner;
        let now = Instant::now();
        let cached = lock(&inner.accounts).clone();
        if let Some(e) = &cached
            && let Some(hit) = inner.serve_cached(e, now, opts, || self.spawn_accounts_refresh(now))
        {
            if inner.expires_soon(e, now) {
                self.spawn_accounts_refresh(now);
            }
            return Ok(hit.map(Arc::clone));
        }
        inc(&inner.counters.cache_misses);
        let (result, role) = self.accounts_flight(now).await;
        inner.note_role(role);
        inner.settle(result, cached.as_ref(), Instant::now())
    }

    /// Join or lead the accounts flight; `read_at` is when the caller read the cache (a value
    /// fetched since is reused).
    fn accounts_flight(
        &self,
        read_at: Instant,
    ) -> impl Future<Output = (Result<Entry<Arc<Vec<Account>>>>, Role)> + Send + '_ {
        let inner = Arc::clone(&self.inner);
        let flight = Arc::clone(&self.inner.accounts_flight);
        async move { flight.run((), move || async move { Inner::fetch_accounts(inner, read_at).await }).await }
    }

    fn spawn_accounts_refresh(&self, read_at: Instant) {
        inc(&self.inner.counters.revalidations);
        let this = self.clone();
        tokio::spawn(async move {
            let _ = this.accounts_flight(read_at).await;
        });
    }

    /// Tickers of `products` with their provenance, one result per distinct product, in the
    /// order given. Missing tickers are fetched in batched calls.
    ///
    /// # Cancel safety
    /// Cancel safe, as [`ticker_with`](Self::ticker_with).
    pub async fn tickers_with(
        &self,
        products: &[ProductId],
        opts: ReadOptions,
    ) -> Vec<(ProductId, Result<Fresh<Ticker>>)> {
        let products = distinct(products);
        let results =
            futures_util::future::join_all(products.iter().map(|p| self.ticker_with(p, opts))).await;
        products.into_iter().zip(results).collect()
    }
}

impl<T> Fresh<T> {
    fn map<U>(self, f: impl FnOnce(T) -> U) -> Fresh<U> {
        Fresh { value: f(self.value), origin: self.origin, age: self.age }
    }
}

impl Inner {
    async fn check_negative(&self, product: &ProductId) -> Result<()> {
        if let Some(until) = self.negative.get(product).await
            && Instant::now() < until
        {
            inc(&self.counters.negative_hits);
            return Err(Error::NotFound(format!("{product} (remembered unknown product)")));
        }
        Ok(())
    }

    fn note_role(&self, role: Role) {
        if role == Role::Joined {
            inc(&self.counters.coalesced);
        }
    }

    /// Whether a fresh `e` is due to expire within `refresh_before_expiry` (refresh-ahead).
    fn expires_soon<T>(&self, e: &Entry<T>, now: Instant) -> bool {
        let ahead = self.cfg.refresh_before_expiry;
        !ahead.is_zero() && now < e.fresh_until && e.fresh_until.saturating_duration_since(now) <= ahead
    }

    /// Serve `e` from cache if it is fresh, or, with stale-while-revalidate, if it is within
    /// `max_stale` (starting a background refresh).
    fn serve_cached<'e, T>(
        &self,
        e: &'e Entry<T>,
        now: Instant,
        opts: ReadOptions,
        revalidate: impl FnOnce(),
    ) -> Option<Fresh<&'e T>> {
        if e.is_fresh(now, opts.max_age) {
            inc(&self.counters.cache_hits);
            return Some(Fresh { value: &e.value, origin: Origin::Cache, age: e.age(now) });
        }
        if self.cfg.stale_while_revalidate && opts.max_age.is_none() && e.age(now) <= self.cfg.max_stale {
            revalidate();
            inc(&self.counters.cache_hits);
            inc(&self.counters.stale_serves);
            return Some(Fresh { value: &e.value, origin: Origin::Stale, age: e.age(now) });
        }
        None
    }

    /// Turn a fetch result into a read result, falling back to `cached` within `max_stale`.
    /// A caller's `max_age` decides what counts as a cache hit; when the upstream then fails,
    /// the stale fallback is bounded by `max_stale` only and flagged `Origin::Stale` with its
    /// age, so the caller can still refuse it.
    fn settle<T>(&self, result: Result<Entry<T>>, cached: Option<&Entry<T>>, now: Instant) -> Result<Fresh<T>>
    where
        T: Clone,
    {
        match result {
            Ok(e) => Ok(Fresh { age: e.age(now), value: e.value, origin: Origin::Upstream }),
            Err(err) => match cached {
                Some(c)
                    if !matches!(err, Error::NotFound(_) | Error::InvalidInput(_))
                        && c.age(now) <= self.cfg.max_stale =>
                {
                    inc(&self.counters.stale_serves);
                    tracing::debug!(error = %err, age_ms = c.age(now).as_millis() as u64, "serving stale data");
                    Ok(Fresh { value: c.value.clone(), origin: Origin::Stale, age: c.age(now) })
                }
                _ => Err(err),
            },
        }
    }

    /// One upstream call with gating, retries and accounting.
    async fn call<T, F, Fut>(&self, op: Op, class: EndpointClass, f: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut attempt: u32 = 0;
        loop {
            let permit = match self.breaker.admit(class) {
                Ok(p) => p,
                Err(e) => {
                    self.counters.error(&e);
                    return Err(e);
                }
            };
            if let Some(gate) = &self.gate
                && let Err(e) = gate.acquire_with(class, op.priority()).await
            {
                self.counters.error(&e);
                return Err(e);
            }
            let t0 = Instant::now();
            let r = f().await;
            permit.record(&r);
            let sent = !matches!(
                &r,
                Err(Error::RateLimited { local: true, .. }
                    | Error::Overloaded(_)
                    | Error::CircuitOpen { .. })
            );
            if sent {
                self.counters.upstream_call(op, t0.elapsed());
            }
            let e = match r {
                Ok(v) => {
                    if let Some(g) = &self.gate {
                        g.record_success(class);
                    }
                    return Ok(v);
                }
                Err(e) => e,
            };
            self.counters.error(&e);
            if let (Some(g), Error::RateLimited { local: false, retry_after }) = (&self.gate, &e) {
                g.penalize(class, *retry_after);
            }
            let wait = e.retry_after().unwrap_or_else(|| {
                let base = self.cfg.retry_backoff.saturating_mul(1 << attempt.min(10));
                base + base.mul_f64(fastrand::f64() * 0.25)
            });
            let retry =
                sent && e.is_retryable() && attempt < self.cfg.max_retries && wait <= self.cfg.max_retry_wait;
            if !retry {
                return Err(e);
            }
            attempt += 1;
            inc(&self.counters.retries);
            tracing::debug!(op = op.as_str(), attempt, error = %e, wait_ms = wait.as_millis() as u64, "retrying upstream call");
            tokio::time::sleep(wait).await;
        }
    }

    /// Remember `product` as unknown for `negative_ttl`, and drop its cached data: reads serve
    /// a cache hit without consulting the negative cache, so no hit may outlive this.
    async fn remember_unknown(&self, product: &ProductId) {
        self.negative.insert(product.clone(), Instant::now() + self.cfg.negative_ttl).await;
        self.tickers.invalidate(product).await;
        for g in Granularity::ALL {
            self.series.invalidate(&(product.clone(), g)).await;
        }
    }

    fn ticker_entry(&self, t: Ticker, now: Instant) -> Entry<Ticker> {
        Entry::new(t, now, now + self.cfg.ticker_ttl)
    }

    async fn fetch_ticker(
        this: Arc<Inner>,
        product: ProductId,
        missed_at: Instant,
        max_age: Option<Duration>,
    ) -> Result<Entry<Ticker>> {
        // Another fetch may have filled the cache after our miss (its flight ended between our
        // cache read and this flight): that value is as fresh as a new fetch would be. Its
        // `fetched_at` is taken just before its insert, which may land after our read began,
        // so a value that is simply fresh for this read (the policy and `max_age`) counts too;
        // without that, 1,000 concurrent cold reads on a running clock made two upstream calls.
        if let Some(e) = this.tickers.get(&product).await
            && (e.fetched_at >= missed_at || e.is_fresh(Instant::now(), max_age))
        {
            return Ok(e);
        }
        if !this.cfg.batch_tickers {
            let class = this.cfg.market_data_class;
            let r = this.call(Op::Ticker, class, || this.upstream.ticker(&product)).await;
            return match r {
                Ok(t) => {
                    let e = this.ticker_entry(t, Instant::now());
                    this.tickers.insert(product, e.clone()).await;
                    Ok(e)
                }
                Err(err) => {
                    if matches!(err, Error::NotFound(_)) {
                        this.remember_unknown(&product).await;
                    }
                    Err(err)
                }
            };
        }
        let (rx, next) = this.batcher.submit(product);
        match next {
            Next::Wait => {}
            Next::Flush(items) => {
                tokio::spawn(Inner::flush(Arc::clone(&this), items));
            }
            Next::StartTimer(id) => {
                let window = this.cfg.batch_window;
                let inner = Arc::clone(&this);
                tokio::spawn(async move {
                    tokio::time::sleep(window).await;
                    if let Some(items) = inner.batcher.take(id) {
                        Inner::flush(inner, items).await;
                    }
                });
            }
        }
        rx.await.unwrap_or_else(|_| Err(Error::Closed("the batch task stopped before answering".into())))
    }

    /// Send one batched call and answer every request in it.
    async fn flush(this: Arc<Inner>, items: Items) {
        let products: Vec<ProductId> = items.iter().map(|(p, _)| p.clone()).collect();
        inc(&this.counters.batch_calls);
        add(&this.counters.batched_products, products.len() as u64);
        let r = this.call(Op::Tickers, EndpointClass::Private, || this.upstream.tickers(&products)).await;
        let r = match r {
            // One bad id may fail a whole batch on some servers: ask for each product alone so
            // only the bad one is remembered as unknown.
            Err(Error::NotFound(_) | Error::Upstream { status: 400, .. }) if products.len() > 1 => {
                let class = this.cfg.market_data_class;
                let mut found = Vec::new();
                for p in &products {
                    if let Ok(t) = this.call(Op::Ticker, class, || this.upstream.ticker(p)).await {
                        found.push(t);
                    }
                }
                Ok(found)
            }
            r => r,
        };
        let now = Instant::now();
        match r {
            Ok(tickers) => {
                let mut by: HashMap<ProductId, Ticker> =
                    tickers.into_iter().map(|t| (t.product.clone(), t)).collect();
                for (p, tx) in items {
                    let reply = match by.remove(&p) {
                        Some(t) => {
                            let e = this.ticker_entry(t, now);
                            this.tickers.insert(p, e.clone()).await;
                            Ok(e)
                        }
                        None => {
                            this.remember_unknown(&p).await;
                            Err(Error::NotFound(p.to_string()))
                        }
                    };
                    let _ = tx.send(reply);
                }
            }
            Err(e) => {
                for (_, tx) in items {
                    let _ = tx.send(Err(e.clone()));
                }
            }
        }
    }

    fn series_covers(&self, e: &SeriesEntry, range: CandleRange, g: Granularity, now: Instant) -> bool {
        if e.value.covers(range) {
            return true;
        }
        // Within the grace after a close, the series still counts as covering the bucket that
        // just opened: it is served as is and refreshed when the grace ends.
        e.value.from <= range.start && range.end <= e.value.to + g.duration() && now < e.fresh_until
    }

    async fn fetch_series(
        this: Arc<Inner>,
        key: (ProductId, Granularity),
        range: CandleRange,
    ) -> Result<SeriesEntry> {
        let (product, g) = &key;
        let now = Instant::now();
        let now_utc = this.clock.utc_at(now);
        let current_end = g.next_close(now_utc);
        let want_end = range.end.min(current_end).max(range.start + g.duration());
        let existing_entry = this.series.get(&key).await;
        let still_fresh = existing_entry.as_ref().is_some_and(|e| now < e.fresh_until);
        let existing_fetched_at = existing_entry.as_ref().map(|e| e.fetched_at);
        let existing_fresh_until = existing_entry.as_ref().map(|e| e.fresh_until);
        let existing = existing_entry.map(|e| e.value);
        let class = this.cfg.market_data_class;
        let fetch = |r: CandleRange| {
            let this = &this;
            async move {
                let out = this.call(Op::Candles, class, || this.upstream.candles(product, *g, r)).await;
                if let Ok(c) = &out {
                    add(&this.counters.candles_fetched, c.len() as u64);
                }
                out
            }
        };
        let result = async {
            let (mut candles, from) = match &existing {
                Some(s) => {
                    let mut candles = Vec::new();
                    let mut from = s.from;
                    if range.start < s.from {
                        // Backfill older history the series does not have yet.
                        candles.extend(fetch(CandleRange::new(range.start, s.from)?).await?);
                        from = range.start;
                    }
                    // Refresh from the bucket that was in progress at the last fetch: every
                    // bucket before it had closed and is never fetched again.
                    let end = want_end.max(s.to);
                    let refresh_from = if still_fresh && end <= s.to {
                        s.to
                    } else {
                        g.bucket_start(s.fetched_utc).min(s.to)
                    };
                    candles.extend(s.candles.iter().filter(|c| c.start < refresh_from).copied());
                    if refresh_from < end {
                        candles.extend(fetch(CandleRange::new(refresh_from, end)?).await?);
                    }
                    (candles, from)
                }
                None => (fetch(CandleRange::new(range.start, want_end)?).await?, range.start),
            };
            candles.sort_by_key(|c| c.start);
            candles.dedup_by_key(|c| c.start);
            Ok::<_, Error>((candles, from))
        }
        .await;
        let (mut candles, mut from) = match result {
            Ok(v) => v,
            Err(e) => {
                if matches!(e, Error::NotFound(_)) {
                    this.remember_unknown(product).await;
                }
                return Err(e);
            }
        };
        let max = this.cfg.max_candles_per_series;
        if candles.len() > max {
            candles.drain(..candles.len() - max);
            if let Some(first) = candles.first() {
                from = from.max(first.start);
            }
        }
        let to = existing.as_ref().map_or(want_end, |s| s.to.max(want_end));
        let (fetched_at, fetched_utc, fresh_until) = match (&existing, still_fresh) {
            // Only older history was added: the newest data keeps its age and freshness.
            (Some(s), true) if to <= s.to => {
                (existing_fetched_at.unwrap_or(now), s.fetched_utc, existing_fresh_until.unwrap_or(now))
            }
            _ => {
                let jitter = this.cfg.candle_jitter.mul_f64(fastrand::f64());
                (now, now_utc, this.clock.instant_at(g.next_close(now_utc)) + this.cfg.candle_grace + jitter)
            }
        };
        let entry =
            Entry::new(Arc::new(Series { candles, from, to, fetched_utc }), fetched_at, fresh_until.max(now));
        this.series.insert(key, entry.clone()).await;
        Ok(entry)
    }

    async fn fetch_accounts(this: Arc<Inner>, read_at: Instant) -> Result<Entry<Arc<Vec<Account>>>> {
        // As for tickers: a flight that ended after the caller's cache read (between that read
        // and this flight) fetched a value as recent as a new call would.
        if let Some(e) = lock(&this.accounts).clone()
            && e.fetched_at >= read_at
        {
            return Ok(e);
        }
        let r = this.call(Op::Accounts, EndpointClass::Private, || this.upstream.accounts()).await?;
        let now = Instant::now();
        let e = Entry::new(Arc::new(r), now, now + this.cfg.accounts_ttl);
        *lock(&this.accounts) = Some(e.clone());
        Ok(e)
    }
}

#[async_trait]
impl MarketDataSource for CoordinatedSource {
    async fn ticker(&self, product: &ProductId) -> Result<Ticker> {
        self.ticker_with(product, ReadOptions::default()).await.map(|f| f.value)
    }

    async fn tickers(&self, products: &[ProductId]) -> Result<Vec<Ticker>> {
        let mut out = Vec::with_capacity(products.len());
        for (_, r) in self.tickers_with(products, ReadOptions::default()).await {
            match r {
                Ok(f) => out.push(f.value),
                Err(Error::NotFound(_)) => {}
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
        self.candles_with(product, granularity, range, ReadOptions::default()).await.map(|f| f.value)
    }

    async fn accounts(&self) -> Result<Vec<Account>> {
        self.accounts_with(ReadOptions::default()).await.map(|f| f.value.as_ref().clone())
    }

    /// From cached accounts: no upstream call while they are fresh.
    async fn validate_trade_balance(&self, currency: &str, amount: Decimal) -> Result<bool> {
        let accounts = self.accounts_with(ReadOptions::default()).await?.value;
        Ok(Balances::from_accounts(&accounts).can_afford(currency, amount))
    }

    /// Tickers and accounts that would no longer be fresh `request.horizon` from now are
    /// fetched again (batched, coalesced with other readers); candle series are read as usual
    /// (their expiry is a candle's close, and nothing newer exists before it).
    async fn prefetch(&self, request: &PrefetchRequest) -> Option<Vec<Error>> {
        let cfg = &self.inner.cfg;
        let within = |ttl: Duration| ReadOptions::max_age(ttl.saturating_sub(request.horizon));
        let tickers = self.tickers_with(&request.tickers, within(cfg.ticker_ttl));
        let candles = futures_util::future::join_all(
            request.candles.iter().map(|(p, g, r)| self.candles_with(p, *g, *r, ReadOptions::default())),
        );
        let accounts = async {
            if request.accounts { Some(self.accounts_with(within(cfg.accounts_ttl)).await) } else { None }
        };
        let (tickers, candles, accounts) = tokio::join!(tickers, candles, accounts);
        let mut errors: Vec<Error> = tickers.into_iter().filter_map(|(_, r)| r.err()).collect();
        errors.extend(candles.into_iter().filter_map(Result::err));
        errors.extend(accounts.and_then(Result::err));
        Some(errors)
    }
}

#[cfg(test)]
mod tests;
