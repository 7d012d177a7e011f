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
pub(crate) mod coalesce;
mod config;
#[cfg(feature = "stream")]
pub(crate) mod feed;
mod refresh;
mod series;
mod stats;
mod upstream;

use std::{
    fmt,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::time::Instant;

use self::{
    batch::Batcher,
    cache::{Entry, SeriesEntry},
    coalesce::{Role, SingleFlight},
    stats::Counters,
};
use crate::{
    clock::Clock,
    coinbase::CoinbaseClient,
    error::{Error, Result},
    limiter::RateLimiter,
    model::{Account, Balances, Candle, CandleRange, Granularity, ProductId, Ticker},
    retry::RetryPolicy,
    source::{MarketDataSource, PrefetchRequest, distinct},
    util::{inc, lock},
};

pub use self::{
    breaker::{BreakerConfig, BreakerState, BreakerStats, ClassBreakerStats},
    config::{AfterClose, CoordinatedBuilder, CoordinatedConfig, InProgressCandle},
    refresh::{CloseRefreshStats, CloseSettlement},
    stats::{CoordinatedStats, LatencyStats},
};

/// Where a value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Fetched from the upstream for this read (or by a fetch this read joined).
    Upstream,
    /// Served from fresh cache, or, with [`AfterClose::ServeLastKnown`], from a series whose
    /// candle has just closed and whose refresh is under way: then exactly its last candle is
    /// not final, and [`Fresh::provisional`] says so.
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
    #[serde(with = "crate::util::duration_ms")]
    pub age: Duration,
    /// For candles: what the last candle returned is, when it is the one in progress. `None`
    /// for tickers and accounts, for candle reads that end at a closed candle, and from
    /// sources that do not track it (the default [`MarketDataSource::candles_fresh`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_progress: Option<InProgress>,
    /// For candles: the last candle returned is a bucket that closed after the series was
    /// fetched, served as last known until the refresh that brings the exchange's final candle
    /// lands ([`AfterClose::ServeLastKnown`]). `None` when every closed candle returned is the
    /// exchange's final one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisional: Option<Provisional>,
}

/// The closed candle at the end of a candle read that is not final yet: its bucket closed
/// after the series was fetched (while it was in progress), and the refresh has not landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provisional {
    /// Start of its bucket.
    #[serde(with = "time::serde::rfc3339")]
    pub start: OffsetDateTime,
    /// Whether it is the exchange's answer at `as_of` or that answer moved by later last-trade
    /// prices (as [`InProgress::fidelity`]).
    pub fidelity: CandleFidelity,
    /// The exchange time of the newest price in it (the fetch, or the last patch), before the
    /// bucket's close.
    #[serde(with = "time::serde::rfc3339")]
    pub as_of: OffsetDateTime,
    /// Last-trade prices applied since the fetch (0 when as fetched).
    pub patches: u32,
}

/// The candle in progress at the end of a candle read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InProgress {
    /// Start of its bucket.
    #[serde(with = "time::serde::rfc3339")]
    pub start: OffsetDateTime,
    /// Whether it is the exchange's own answer or patched from later prices.
    pub fidelity: CandleFidelity,
    /// The exchange time of the newest price in it (the fetch, or the last patch).
    #[serde(with = "time::serde::rfc3339")]
    pub as_of: OffsetDateTime,
    /// Last-trade prices applied since the fetch (0 when exact).
    pub patches: u32,
}

/// How far a candle in progress can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CandleFidelity {
    /// As the exchange answered at `as_of`.
    Exact,
    /// The exchange's candle moved by later last-trade prices: `close` is the latest price the
    /// source holds, `high`/`low` bracket every price it saw; `volume`, and extremes between
    /// two of those prices, are as of the fetch.
    Patched,
}

impl<T> Fresh<T> {
    /// Whether the value is stale (see [`Origin::Stale`]).
    pub fn is_stale(&self) -> bool {
        self.origin == Origin::Stale
    }
}

/// What a candle read knew about the last candles of its series, without the candles: the
/// marks of a [`Fresh`] series. A strategy gets them in
/// [`MarketView::marks`](crate::MarketView::marks), so it can tell an exact candle from a
/// patched or provisional one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CandleMarks {
    /// The candle in progress at the end of the read, if the source tracks it
    /// ([`Fresh::in_progress`]).
    pub in_progress: Option<InProgress>,
    /// A closed last candle that is not the exchange's final one yet ([`Fresh::provisional`]).
    pub provisional: Option<Provisional>,
}

impl CandleMarks {
    /// The marks of `read`.
    pub fn of<T>(read: &Fresh<T>) -> Self {
        CandleMarks { in_progress: read.in_progress, provisional: read.provisional }
    }

    /// Whether every candle is as the exchange answered: no provisional closed candle and no
    /// patched candle in progress. A source that tracks neither (the marks' default) counts as
    /// exact.
    pub fn is_exact(&self) -> bool {
        self.provisional.is_none() && self.in_progress.is_none_or(|p| p.fidelity == CandleFidelity::Exact)
    }
}

/// Per-read options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// Refuse cached data older than this, even if the default policy would serve it.
    pub max_age: Option<Duration>,
    /// Answer by this instant: when the upstream has not answered by then, the read returns
    /// cached data within `max_stale` (flagged [`Origin::Stale`]) or [`Error::Timeout`], and
    /// the fetch goes on in the background for the next read. Default: now +
    /// [`CoordinatedConfig::read_timeout`].
    pub deadline: Option<Instant>,
}

impl ReadOptions {
    /// Demand data no older than `max_age`.
    pub fn max_age(max_age: Duration) -> Self {
        ReadOptions { max_age: Some(max_age), deadline: None }
    }

    /// Answer by `deadline` (see [`deadline`](ReadOptions::deadline)).
    #[must_use]
    pub fn by(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }
}

struct Inner {
    upstream: Arc<dyn MarketDataSource>,
    cfg: CoordinatedConfig,
    clock: Clock,
    limiting: Limiting,
    retry: RetryPolicy,
    /// moka's sync cache, not its future one: a ticker hit is the proxy's hot path, and the
    /// future cache's `get` is an 848-byte future (its housekeeping inline) for a lookup that
    /// never waits. Housekeeping still runs on the caller, under a lock held for microseconds.
    tickers: moka::sync::Cache<ProductId, Entry<Ticker>>,
    series: moka::future::Cache<(ProductId, Granularity), SeriesEntry>,
    negative: moka::future::Cache<ProductId, Instant>,
    /// One slot; a std mutex is enough because it is never held across an await.
    accounts: Mutex<Option<Entry<Arc<Vec<Account>>>>>,
    /// Bumped (under the `accounts` lock) by every [`CoordinatedSource::invalidate_accounts`]:
    /// a fetch that began before an invalidation neither fills the slot nor serves callers who
    /// came after it (the flight is keyed by the epoch).
    accounts_epoch: std::sync::atomic::AtomicU64,
    ticker_flight: Arc<SingleFlight<ProductId, Entry<Ticker>>>,
    series_flight: Arc<SingleFlight<(ProductId, Granularity), SeriesEntry>>,
    accounts_flight: Arc<SingleFlight<u64, Entry<Arc<Vec<Account>>>>>,
    closes: refresh::CloseQueue,
    batcher: Batcher,
    counters: Counters,
    breaker: breaker::Breakers,
}

/// Where this source's rate limiting happens: the one field that holds its limiter.
#[derive(Debug, Clone, Default)]
enum Limiting {
    /// No limiter known (the upstream limits itself, or nothing does).
    #[default]
    None,
    /// This source acquires every upstream call from the limiter and records its outcome.
    Gate(RateLimiter),
    /// The upstream (a [`CoinbaseClient`]) acquires from this limiter itself; the source
    /// only reports it in the stats.
    Upstream(RateLimiter),
}

impl Limiting {
    /// The limiter this source acquires from itself.
    fn gate(&self) -> Option<&RateLimiter> {
        match self {
            Limiting::Gate(l) => Some(l),
            Limiting::None | Limiting::Upstream(_) => None,
        }
    }

    /// The limiter in use, wherever it is acquired.
    fn limiter(&self) -> Option<&RateLimiter> {
        match self {
            Limiting::Gate(l) | Limiting::Upstream(l) => Some(l),
            Limiting::None => None,
        }
    }
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
            limiting: Limiting::None,
            gate_conflict: false,
        }
    }

    /// A builder over a [`CoinbaseClient`], matched to it: the client's rate limiter is
    /// reported in the stats, the batch size fits one `tickers` request (`best_bid_ask`, or the
    /// keyless `/market/products`), and the market-data class is the client's.
    pub fn coinbase(client: CoinbaseClient) -> CoordinatedBuilder {
        let limiter = client.rate_limiter().cloned();
        let class = client.market_data_class();
        let batch = client.tickers_chunk().min(CoordinatedConfig::default().batch_size);
        let batch_class = client.tickers_class();
        let mut b = Self::builder(client).market_data_class(class).batch_size(batch).batch_class(batch_class);
        if let Some(l) = limiter {
            b.limiting = Limiting::Upstream(l);
        }
        b
    }

    /// The configuration in force.
    pub fn config(&self) -> &CoordinatedConfig {
        &self.inner.cfg
    }

    /// The rate limiter in use (the gate, or the upstream's), if known.
    pub fn rate_limiter(&self) -> Option<&RateLimiter> {
        self.inner.limiting.limiter()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> CoordinatedStats {
        let mut stats = self.inner.counters.snapshot(self.rate_limiter().map(RateLimiter::stats));
        stats.breaker = self.inner.breaker.stats();
        stats.close_refresh = self.inner.closes.stats();
        let inner = &self.inner;
        stats.cache_entries =
            inner.tickers.entry_count() + inner.series.entry_count() + inner.negative.entry_count();
        stats
    }

    /// The live counters, for cheap reads ([`UpstreamMeter`](crate::UpstreamMeter)).
    pub(crate) fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// Forget the cached accounts, e.g. after placing an order: every read that starts after
    /// this call gets balances fetched after it. A fetch already in flight still answers the
    /// callers that were waiting for it, but is not cached and is not joined by later readers.
    pub fn invalidate_accounts(&self) {
        let mut slot = lock(&self.inner.accounts);
        self.inner.accounts_epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        *slot = None;
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
        let cached = inner.tickers.get(product);
        let hit = cached.as_ref().and_then(|e| {
            let hit = inner.serve_cached(e, now, opts, || self.spawn_ticker_refresh(product.clone(), now))?;
            if inner.expires_soon(e, now) {
                self.spawn_ticker_refresh(product.clone(), now);
            }
            Some(hit.map(|_| ()))
        });
        // The cache handed out a copy of the entry: a hit moves its value out rather than
        // cloning it again (each clone is a count on the product id's `Arc`, a cache line that
        // every worker serving that product writes).
        let cached = match (hit, cached) {
            (Some(hit), Some(e)) => return Ok(hit.map(|()| e.value)),
            (_, cached) => cached,
        };
        // Boxed: every hit would otherwise carry the miss path's future (negative cache,
        // flight, deadline) in its own (see `tests::a_cache_hit_future_stays_small`).
        Box::pin(self.ticker_miss(product, now, opts, cached)).await
    }

    /// `ticker_with` after a miss (or an entry too old for `opts`) at `now`.
    async fn ticker_miss(
        &self,
        product: &ProductId,
        now: Instant,
        opts: ReadOptions,
        cached: Option<Entry<Ticker>>,
    ) -> Result<Fresh<Ticker>> {
        let inner = &self.inner;
        inner.check_negative(product).await?;
        inc(&inner.counters.cache_misses);
        // `now` was read before the cache: a flight that ended between that read and this join
        // wrote a value at least as recent.
        let (result, role) =
            inner.bounded(now, opts, self.ticker_flight(product.clone(), now, opts.max_age)).await;
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
        let now_utc = inner.clock.utc_at(now);
        let refetch =
            cached.as_ref().is_some_and(|e| inner.in_progress_too_old(e, granularity, now, now_utc));
        if let Some(e) = &cached
            && !refetch
        {
            if inner.series_covers(e, range, granularity, now) {
                let swr = || self.spawn_series_refresh(key.clone(), range);
                if let Some(hit) = inner.serve_cached(e, now, opts, swr) {
                    let hit = hit.map(Arc::clone);
                    self.queue_close_refresh(&key, e);
                    return Ok(self
                        .serve_series(hit, product, granularity, range, inner.deadline(now, opts))
                        .await);
                }
            }
            // Its candle has just closed: the series as last known, at once, while the
            // background refresh brings the final candle (`AfterClose::ServeLastKnown`).
            if opts.max_age.is_none() && inner.serves_last_known(e, range, granularity, now, now_utc) {
                inc(&inner.counters.cache_hits);
                self.queue_close_refresh(&key, e);
                let hit = Fresh {
                    value: Arc::clone(&e.value),
                    origin: Origin::Cache,
                    age: e.age(now),
                    in_progress: None,
                    provisional: None,
                };
                return Ok(self
                    .serve_series(hit, product, granularity, range, inner.deadline(now, opts))
                    .await);
            }
        }
        inner.check_negative(product).await?;
        inc(&inner.counters.cache_misses);
        // Up to two rounds: a joined fetch may have been for a narrower range.
        let mut result = Err(Error::Closed("no fetch was made".into()));
        for _ in 0..2 {
            let (r, role) = inner.bounded(now, opts, self.series_flight(key.clone(), range, refetch)).await;
            inner.note_role(role);
            let retry = role == Role::Joined && matches!(&r, Ok(e) if !e.value.covers(range));
            result = r;
            if !retry {
                break;
            }
        }
        if let Ok(e) = &result {
            self.queue_close_refresh(&key, e);
        }
        let cached = cached.filter(|e| e.value.covers(range));
        let fresh = inner.settle(result, cached.as_ref(), Instant::now())?;
        Ok(self.serve_series(fresh, product, granularity, range, inner.deadline(now, opts)).await)
    }

    /// A read's candles from `series` under the source's [`InProgressCandle`] contract.
    async fn serve_series(
        &self,
        series: Fresh<Arc<cache::Series>>,
        product: &ProductId,
        g: Granularity,
        range: CandleRange,
        deadline: Option<Instant>,
    ) -> Fresh<Vec<Candle>> {
        let inner = &self.inner;
        let now_utc = inner.clock.utc_at(Instant::now());
        let latest = match inner.cfg.in_progress {
            InProgressCandle::Live => {
                // A ticker of this product in flight lands first: the candle then carries the
                // price it brings (no extra call; at most the wait for that fetch).
                // Never past the read's deadline: a stalled ticker fetch leaves the candle as
                // the cache has it.
                let wait = inner.ticker_flight.wait_if_running(product);
                match deadline {
                    Some(d) => {
                        let _ = tokio::time::timeout_at(d, wait).await;
                    }
                    None => wait.await,
                }
                inner.tickers.get(product).map(|e| e.value)
            }
            InProgressCandle::Exact | InProgressCandle::ClosedOnly => None,
        };
        let (candles, in_progress, provisional) =
            inner.serve_series(&series.value, g, range, now_utc, latest.as_ref());
        if provisional.is_some() {
            inc(&inner.counters.provisional_serves);
        }
        Fresh { value: candles, origin: series.origin, age: series.age, in_progress, provisional }
    }

    /// With [`AfterClose::ServeLastKnown`]: queue the series `e` of `key` for a background
    /// refresh when the bucket it was fetched in closes.
    fn queue_close_refresh(&self, key: &(ProductId, Granularity), e: &SeriesEntry) {
        let inner = &self.inner;
        // Only a series that holds the bucket in progress at its fetch: a read of older
        // history alone is not kept up to date.
        if !inner.closes_in_background() || e.value.to != key.1.next_close(e.value.fetched_utc) {
            return;
        }
        if inner.closes.schedule(key, e, inner.clock.instant_at(e.value.to)) {
            inner.closes.ensure_worker(&self.inner);
        }
    }

    fn series_flight(
        &self,
        key: (ProductId, Granularity),
        range: CandleRange,
        refetch_in_progress: bool,
    ) -> impl Future<Output = (Result<SeriesEntry>, Role)> + Send + '_ {
        let inner = Arc::clone(&self.inner);
        let flight = Arc::clone(&self.inner.series_flight);
        async move {
            let k = key.clone();
            flight
                .run(
                    key,
                    move || async move { Inner::fetch_series(inner, k, range, refetch_in_progress).await },
                )
                .await
        }
    }

    fn spawn_series_refresh(&self, key: (ProductId, Granularity), range: CandleRange) {
        inc(&self.inner.counters.revalidations);
        let this = self.clone();
        tokio::spawn(async move {
            let _ = this.series_flight(key, range, false).await;
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
        let (result, role) = inner.bounded(now, opts, self.accounts_flight(now)).await;
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
        let epoch = inner.accounts_epoch.load(std::sync::atomic::Ordering::SeqCst);
        async move {
            flight.run(epoch, move || async move { Inner::fetch_accounts(inner, read_at, epoch).await }).await
        }
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
        Fresh {
            value: f(self.value),
            origin: self.origin,
            age: self.age,
            in_progress: self.in_progress,
            provisional: self.provisional,
        }
    }
}

impl Inner {
    /// The deadline of a read that started at `start`: its own, else `read_timeout` later
    /// (`None`: unbounded).
    fn deadline(&self, start: Instant, opts: ReadOptions) -> Option<Instant> {
        opts.deadline.or_else(|| {
            let t = self.cfg.read_timeout;
            (!t.is_zero()).then(|| crate::clock::later(start, t))
        })
    }

    /// Wait for a flight until the read's deadline (`opts`, else `read_timeout` after
    /// `start`). The flight runs in its own task: a read that gives up leaves it to finish and
    /// fill the cache for the next read.
    async fn bounded<T>(
        &self,
        start: Instant,
        opts: ReadOptions,
        flight: impl Future<Output = (Result<T>, Role)>,
    ) -> (Result<T>, Role) {
        let Some(deadline) = self.deadline(start, opts) else { return flight.await };
        match tokio::time::timeout_at(deadline, flight).await {
            Ok(r) => r,
            Err(_) => {
                inc(&self.counters.deadline_misses);
                (Err(Error::Timeout), Role::Leader)
            }
        }
    }

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
            return Some(Fresh {
                value: &e.value,
                origin: Origin::Cache,
                age: e.age(now),
                in_progress: None,
                provisional: None,
            });
        }
        if self.cfg.stale_while_revalidate && opts.max_age.is_none() && e.age(now) <= self.cfg.max_stale {
            revalidate();
            inc(&self.counters.cache_hits);
            inc(&self.counters.stale_serves);
            return Some(Fresh {
                value: &e.value,
                origin: Origin::Stale,
                age: e.age(now),
                in_progress: None,
                provisional: None,
            });
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
            Ok(e) => Ok(Fresh {
                age: e.age(now),
                value: e.value,
                origin: Origin::Upstream,
                in_progress: None,
                provisional: None,
            }),
            Err(err) => match cached {
                Some(c) if err.allows_stale() && c.age(now) <= self.cfg.max_stale => {
                    inc(&self.counters.stale_serves);
                    tracing::debug!(error = %err, age_ms = c.age(now).as_millis() as u64, "serving stale data");
                    Ok(Fresh {
                        value: c.value.clone(),
                        origin: Origin::Stale,
                        age: c.age(now),
                        in_progress: None,
                        provisional: None,
                    })
                }
                _ => Err(err),
            },
        }
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

    /// [`candles_with`](CoordinatedSource::candles_with) with the default options: what the
    /// cache holds, with its origin, age and the mark of its candle in progress.
    async fn candles_fresh(
        &self,
        product: &ProductId,
        granularity: Granularity,
        range: CandleRange,
    ) -> Result<Fresh<Vec<Candle>>> {
        self.candles_with(product, granularity, range, ReadOptions::default()).await
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
