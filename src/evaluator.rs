//! [`BatchEvaluator`]: one market snapshot per tick, every bot evaluated on it.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    hash::{BuildHasherDefault, Hasher},
    sync::Arc,
    time::Duration,
};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize, ser::SerializeStruct};
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::{
    clock::Clock,
    coordinated::CandleMarks,
    error::{Error, Result},
    flags::Route,
    model::{Balances, Candle, CandleRange, Granularity, ProductId, Ticker},
    selector::SourceSelector,
    source::UpstreamMeter,
    source::{MarketDataSource, PrefetchRequest},
    strategy::{Decision, MarketView, Signal, Strategy},
};

/// A trading bot: what it trades, what history it needs, how much it would spend, and how it
/// decides.
#[derive(Debug, Clone)]
pub struct Bot {
    /// Unique id (used for routing during a migration).
    pub id: String,
    /// The product it trades.
    pub product: ProductId,
    /// Candle granularity it reads.
    pub granularity: Granularity,
    /// Candles it needs (the one in progress included).
    pub lookback: u32,
    /// Order size in the quote currency, checked against the balance each tick.
    pub order_size: Decimal,
    /// Its strategy.
    pub strategy: Arc<dyn Strategy>,
}

impl Bot {
    /// A bot reading 24 one-hour candles and sizing orders at 100 units of the quote currency.
    pub fn new(id: impl Into<String>, product: ProductId, strategy: Arc<dyn Strategy>) -> Self {
        Bot {
            id: id.into(),
            product,
            granularity: Granularity::OneHour,
            lookback: 24,
            order_size: Decimal::ONE_HUNDRED,
            strategy,
        }
    }

    /// Set the candle granularity.
    #[must_use]
    pub fn granularity(mut self, g: Granularity) -> Self {
        self.granularity = g;
        self
    }

    /// Set the lookback in candles.
    #[must_use]
    pub fn lookback(mut self, n: u32) -> Self {
        self.lookback = n;
        self
    }

    /// Set the order size (quote currency).
    #[must_use]
    pub fn order_size(mut self, size: Decimal) -> Self {
        self.order_size = size;
        self
    }
}

/// The market as one tick sees it: every ticker, candle series and the balances, fetched once.
#[derive(Debug, Clone)]
pub struct MarketSnapshot {
    /// Wall time the snapshot was taken.
    pub taken_at: OffsetDateTime,
    /// Tickers by product (an unknown product is its own `NotFound`).
    pub tickers: HashMap<ProductId, Result<Ticker>>,
    /// Candle series by product and granularity, each as long as the longest lookback asked.
    pub candles: HashMap<(ProductId, Granularity), Result<Arc<Vec<Candle>>>>,
    /// The marks of each series read (a series without an entry: nothing known).
    pub candle_marks: HashMap<(ProductId, Granularity), CandleMarks>,
    /// Balances, or the error fetching accounts.
    pub balances: Result<Balances>,
}

impl MarketSnapshot {
    /// Fetch what `bots` need from `source`: one batched tickers call, each distinct candle
    /// series once (at the longest lookback), accounts once — all concurrently.
    pub async fn fetch(source: &dyn MarketDataSource, bots: &[&Bot], now: OffsetDateTime) -> Self {
        let plan = Plan::new(bots.iter().copied());
        let fetched = plan.fetch(source, now).await;
        let key = |s: &SeriesNeed<'_>| (s.product.clone(), s.granularity);
        let candle_marks = plan.series.iter().zip(&fetched.marks).map(|(s, m)| (key(s), *m)).collect();
        let candles = plan.series.iter().zip(fetched.candles).map(|(s, c)| (key(s), c));
        MarketSnapshot {
            taken_at: now,
            tickers: fetched.tickers,
            candles: candles.collect(),
            candle_marks,
            balances: fetched.balances,
        }
    }

    /// Evaluate one bot on the snapshot.
    ///
    /// # Errors
    /// The bot's own data error: its ticker, candles or the balances could not be fetched.
    pub fn evaluate(&self, bot: &Bot) -> Result<Decision> {
        let ticker = match self.tickers.get(&bot.product) {
            Some(Ok(t)) => t,
            Some(Err(e)) => return Err(e.clone()),
            None => return Err(Error::NotFound(format!("{} is not in the snapshot", bot.product))),
        };
        let candles = match self.candles.get(&(bot.product.clone(), bot.granularity)) {
            Some(Ok(c)) => c,
            Some(Err(e)) => return Err(e.clone()),
            None => return Err(Error::NotFound(format!("{} candles are not in the snapshot", bot.product))),
        };
        let balances = self.balances.as_ref().map_err(Clone::clone)?;
        let n = (bot.lookback as usize).min(candles.len());
        let view = MarketView {
            ticker,
            candles: &candles[candles.len() - n..],
            balances,
            can_afford: balances.can_afford(bot.product.quote(), bot.order_size),
            marks: self
                .candle_marks
                .get(&(bot.product.clone(), bot.granularity))
                .copied()
                .unwrap_or_default(),
        };
        Ok(bot.strategy.evaluate(&view))
    }
}

/// One distinct candle series a tick needs, at the longest lookback any of its bots asks.
struct SeriesNeed<'a> {
    product: &'a ProductId,
    granularity: Granularity,
    lookback: u32,
}

/// What a tick fetches: the distinct series of its bots (in first-seen order) and, per bot,
/// the index of its series. Built with one hash lookup per bot, no allocation per bot.
struct Plan<'a> {
    series: Vec<SeriesNeed<'a>>,
    of_bot: Vec<usize>,
}

/// What a [`Plan`] fetched: tickers by product, candles by series (aligned with
/// `Plan::series`), balances.
struct Fetched {
    tickers: HashMap<ProductId, Result<Ticker>>,
    candles: Vec<Result<Arc<Vec<Candle>>>>,
    /// Each series' marks, in the order of `candles` (default for an error).
    marks: Vec<CandleMarks>,
    balances: Result<Balances>,
}

/// rustc's FxHash: one multiply and rotate per word, several times cheaper than the default
/// SipHash on short keys. Only for the tick's own index of series, whose keys come from the
/// host's bot list rather than from the network, so resistance to hash flooding buys nothing.
#[derive(Default)]
struct FxHasher(u64);

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    fn write_isize(&mut self, i: isize) {
        self.add(i as u64);
    }
    fn finish(&self) -> u64 {
        // The multiply leaves the best-mixed bits on top; hashbrown indexes with the low ones.
        self.0.rotate_left(26)
    }
}

type FxBuild = BuildHasherDefault<FxHasher>;

impl<'a> Plan<'a> {
    fn new(bots: impl Iterator<Item = &'a Bot>) -> Self {
        let (lower, _) = bots.size_hint();
        let mut index: HashMap<(&'a ProductId, Granularity), usize, FxBuild> = HashMap::default();
        let mut series: Vec<SeriesNeed<'a>> = Vec::new();
        let mut of_bot = Vec::with_capacity(lower);
        for b in bots {
            let i = *index.entry((&b.product, b.granularity)).or_insert_with(|| {
                series.push(SeriesNeed { product: &b.product, granularity: b.granularity, lookback: 0 });
                series.len() - 1
            });
            series[i].lookback = series[i].lookback.max(b.lookback);
            of_bot.push(i);
        }
        Plan { series, of_bot }
    }

    /// The distinct products of the series, in first-seen order.
    fn products(&self) -> Vec<ProductId> {
        let mut seen: HashSet<&ProductId, FxBuild> = HashSet::default();
        self.series.iter().filter(|s| seen.insert(s.product)).map(|s| s.product.clone()).collect()
    }

    /// One batched tickers call, then each series once; accounts once, concurrently.
    async fn fetch(&self, source: &dyn MarketDataSource, now: OffsetDateTime) -> Fetched {
        let products = self.products();
        let tickers_fut = async {
            match source.tickers(&products).await {
                Ok(list) => {
                    let mut by: HashMap<ProductId, Result<Ticker>> =
                        list.into_iter().map(|t| (t.product.clone(), Ok(t))).collect();
                    for p in &products {
                        by.entry(p.clone()).or_insert_with(|| Err(Error::NotFound(p.to_string())));
                    }
                    by
                }
                Err(e) => products.iter().map(|p| (p.clone(), Err(e.clone()))).collect(),
            }
        };
        let candles_fut = futures_util::future::join_all(self.series.iter().map(|s| async move {
            match CandleRange::lookback(s.granularity, s.lookback, now) {
                Ok(range) => source.candles_fresh(s.product, s.granularity, range).await.map(|f| {
                    let marks = CandleMarks::of(&f);
                    (Arc::new(f.value), marks)
                }),
                Err(e) => Err(e),
            }
        }));
        let accounts_fut = async { source.accounts().await.map(|a| Balances::from_accounts(&a)) };
        // Candles after tickers: the candle in progress is patched from the tick's last trades
        // (`InProgressCandle::Live`), so a series read before its ticker lands would carry the
        // previous tick's close. Cached series cost nothing more; a series fetched at the tick
        // waits one ticker round trip. Accounts run alongside.
        let market = async {
            let tickers = tickers_fut.await;
            (tickers, candles_fut.await)
        };
        let ((tickers, read), balances) = tokio::join!(market, accounts_fut);
        let marks = read.iter().map(|r| r.as_ref().map(|(_, m)| *m).unwrap_or_default()).collect();
        let candles = read.into_iter().map(|r| r.map(|(c, _)| c)).collect();
        Fetched { tickers, candles, marks, balances }
    }
}

/// A series' data resolved once for all its bots: the ticker, the candles and the available
/// balance of the quote currency, or the error every bot of the series gets (in the order
/// [`MarketSnapshot::evaluate`] reports them: ticker, candles, balances).
type Resolved<'f> = Result<(&'f Ticker, &'f [Candle], CandleMarks, &'f Balances, Decimal)>;

impl Fetched {
    fn resolve<'f>(
        &'f self,
        s: &SeriesNeed<'_>,
        candles: &'f Result<Arc<Vec<Candle>>>,
        marks: CandleMarks,
    ) -> Resolved<'f> {
        let ticker = match self.tickers.get(s.product) {
            Some(Ok(t)) => t,
            Some(Err(e)) => return Err(e.clone()),
            None => return Err(Error::NotFound(format!("{} is not in the snapshot", s.product))),
        };
        let candles = candles.as_ref().map_err(Clone::clone)?;
        let balances = self.balances.as_ref().map_err(Clone::clone)?;
        Ok((ticker, candles, marks, balances, balances.get(s.product.quote()).available))
    }
}

/// Evaluate `bot` on its resolved series (the same decision as [`MarketSnapshot::evaluate`]).
fn decide(bot: &Bot, resolved: &Resolved<'_>) -> Result<Decision> {
    let &(ticker, candles, marks, balances, available) = resolved.as_ref().map_err(Clone::clone)?;
    let n = (bot.lookback as usize).min(candles.len());
    let view = MarketView {
        ticker,
        candles: &candles[candles.len() - n..],
        balances,
        can_afford: !bot.order_size.is_sign_negative() && available >= bot.order_size,
        marks,
    };
    Ok(bot.strategy.evaluate(&view))
}

/// One bot's outcome in a tick.
#[derive(Debug, Clone)]
pub struct BotResult {
    /// The bot.
    pub bot_id: String,
    /// Its product.
    pub product: ProductId,
    /// The path its data came through.
    pub route: Route,
    /// Its decision, or its own error (one bad product never fails the others).
    pub outcome: Result<Decision>,
}

impl Serialize for BotResult {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("BotResult", 5)?;
        st.serialize_field("bot_id", &self.bot_id)?;
        st.serialize_field("product", &self.product)?;
        st.serialize_field("route", &self.route)?;
        match &self.outcome {
            Ok(d) => {
                st.serialize_field("decision", d)?;
                st.serialize_field("error", &Option::<String>::None)?;
            }
            Err(e) => {
                st.serialize_field("decision", &Option::<Decision>::None)?;
                st.serialize_field("error", &Some(e.to_string()))?;
            }
        }
        st.end()
    }
}

/// What one tick did.
#[derive(Debug, Clone, Serialize)]
pub struct TickReport {
    /// Wall time the tick started.
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    /// How long it took, fetching and evaluating.
    #[serde(with = "crate::util::duration_ms")]
    pub duration: Duration,
    /// Upstream calls made during the tick (by the meters given to the evaluator).
    pub upstream_calls: u64,
    /// Candle series read during the tick with their last candle provisional (by the meters'
    /// sources): its bucket had just closed and the series' refresh had not landed, so the
    /// bots saw that candle as last known ([`Fresh::provisional`](crate::Fresh::provisional)).
    pub provisional_series: u64,
    /// Cache hits during the tick.
    pub cache_hits: u64,
    /// Cache misses during the tick.
    pub cache_misses: u64,
    /// `cache_hits / (hits + misses)`, 0 without reads: a share of the source's cache lookups
    /// (one per distinct key per tick), not of the bots' reads; see `read_hit_rate`.
    pub cache_hit_rate: f64,
    /// The bots' data reads this tick, as the seed counts them: a ticker, a candle series, the
    /// accounts and a balance check per bot (4 × bots).
    pub bot_reads: u64,
    /// The seed's "cache hit rate": the share of `bot_reads` answered without an upstream call
    /// of their own, `1 − upstream_calls / bot_reads` (an upstream call is at most one read's
    /// own), 0 without bots.
    pub read_hit_rate: f64,
    /// The share of bots whose evaluation got usable data and decided (the seed's
    /// availability), 0 without bots.
    pub availability: f64,
    /// Bots by route.
    pub routes: BTreeMap<String, u64>,
    /// Decisions by signal, and `"error"`.
    pub outcomes: BTreeMap<String, u64>,
    /// Every bot's result, in the order given.
    pub results: Vec<BotResult>,
}

impl TickReport {
    /// The bots whose evaluation failed.
    pub fn errors(&self) -> impl Iterator<Item = &BotResult> {
        self.results.iter().filter(|r| r.outcome.is_err())
    }
}

type SharedSource = Arc<dyn MarketDataSource>;

enum Routing {
    Single(Arc<dyn MarketDataSource>),
    Selector(SourceSelector),
}

/// Evaluates every bot once per tick.
///
/// With a single source every bot reads the same snapshot. With a [`SourceSelector`] the bots
/// the flags migrate read one snapshot from the coordinated source, while legacy (and shadow)
/// bots each fetch their own data as the legacy code did: ticker, candles, accounts and a
/// balance check — four calls per bot.
///
/// ```
/// # async fn f(source: std::sync::Arc<dyn tickshare::MarketDataSource>) {
/// use std::sync::Arc;
/// use tickshare::{BatchEvaluator, Bot, MovingAverageCrossover};
/// let bots = vec![Bot::new("bot-1", "BTC-USD".parse().unwrap(), Arc::new(MovingAverageCrossover::default()))];
/// let report = BatchEvaluator::new(source).evaluate_all(&bots).await;
/// println!("{} upstream calls, {:?}", report.upstream_calls, report.outcomes);
/// # }
/// ```
pub struct BatchEvaluator {
    routing: Routing,
    clock: Clock,
    meters: Vec<Arc<dyn UpstreamMeter>>,
}

impl fmt::Debug for BatchEvaluator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchEvaluator").field("meters", &self.meters.len()).finish_non_exhaustive()
    }
}

impl BatchEvaluator {
    /// Every bot reads one snapshot from `source` per tick.
    pub fn new(source: Arc<dyn MarketDataSource>) -> Self {
        BatchEvaluator { routing: Routing::Single(source), clock: Clock::system(), meters: Vec::new() }
    }

    /// Bots are routed by `selector`'s flags, read at the start of each tick.
    pub fn with_selector(selector: SourceSelector) -> Self {
        BatchEvaluator { routing: Routing::Selector(selector), clock: Clock::system(), meters: Vec::new() }
    }

    /// The clock for candle ranges (default [`Clock::system`]).
    #[must_use]
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Count this source's (or client's) upstream calls and cache reads in tick reports. Add
    /// each distinct upstream once.
    #[must_use]
    pub fn meter(mut self, meter: Arc<dyn UpstreamMeter>) -> Self {
        self.meters.push(meter);
        self
    }

    pub(crate) fn clock_ref(&self) -> Clock {
        self.clock
    }

    fn read_meters(&self) -> (u64, u64, u64) {
        self.meters.iter().fold((0, 0, 0), |(c, h, m), meter| {
            let (hits, misses) = meter.cache_reads();
            (c + meter.upstream_calls(), h + hits, m + misses)
        })
    }

    fn provisional_reads(&self) -> u64 {
        self.meters.iter().map(|m| m.provisional_reads()).sum()
    }

    /// Refresh-ahead: fetch now what the snapshot bots of a coming tick will read, so that an
    /// [`evaluate_all`](Self::evaluate_all) within `horizon` reads only the cache and its bots
    /// decide without waiting for the exchange. [`TickSchedule::refresh_ahead`] calls this a
    /// set lead before each tick. Tickers and balances that would expire within `horizon` are
    /// fetched again even if fresh now.
    ///
    /// Only the bots the flags route to the coordinated source are prefetched (routing is not
    /// counted in the selector's stats): legacy and shadow bots fetch their own data at the
    /// tick, as the legacy code did. A source without a cache
    /// ([`MarketDataSource::prefetch`] returns `None`, as a
    /// [`DirectSource`](crate::DirectSource)'s does) is left alone: the report says
    /// `supported: false`.
    ///
    /// A candle that closes at the tick itself cannot be fetched before it: the series is
    /// served as it is within the source's close grace and refreshed at a later read.
    ///
    /// [`TickSchedule::refresh_ahead`]: crate::TickSchedule::refresh_ahead
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future leaves started fetches to complete for later readers.
    pub async fn prefetch(&self, bots: &[Bot], horizon: Duration) -> PrefetchReport {
        let t0 = Instant::now();
        let now = self.clock.now_utc();
        let (calls0, _, _) = self.read_meters();
        let (source, snapshot_bots): (SharedSource, Vec<&Bot>) = match &self.routing {
            Routing::Single(s) => (Arc::clone(s), bots.iter().collect()),
            Routing::Selector(sel) => {
                let flags = sel.flags();
                let bots: Vec<&Bot> =
                    bots.iter().filter(|b| flags.route(&b.id) == Route::Coordinated).collect();
                (sel.coordinated_source(), bots)
            }
        };
        let plan = Plan::new(snapshot_bots.iter().copied());
        let (mut supported, mut failed_reads) = (true, 0);
        if !plan.of_bot.is_empty() {
            let mut request = PrefetchRequest::new(horizon).tickers(plan.products()).accounts();
            let mut invalid = 0;
            for s in &plan.series {
                match CandleRange::lookback(s.granularity, s.lookback, now) {
                    Ok(range) => request = request.candles(s.product.clone(), s.granularity, range),
                    Err(_) => invalid += 1,
                }
            }
            match source.prefetch(&request).await {
                Some(errors) => failed_reads = errors.len() + invalid,
                None => supported = false,
            }
        }
        let (calls1, _, _) = self.read_meters();
        PrefetchReport {
            started_at: now,
            duration: t0.elapsed(),
            supported,
            bots: if supported { plan.of_bot.len() } else { 0 },
            upstream_calls: calls1.saturating_sub(calls0),
            failed_reads: failed_reads as u64,
        }
    }

    /// Evaluate every bot once.
    ///
    /// # Cancel safety
    /// Dropping the future abandons the tick; shared fetches it started still complete for
    /// other callers.
    pub async fn evaluate_all(&self, bots: &[Bot]) -> TickReport {
        let t0 = Instant::now();
        let now = self.clock.now_utc();
        let (calls0, hits0, misses0) = self.read_meters();
        let provisional0 = self.provisional_reads();

        // Resolve every bot's path under one view of the flags (a hot reload during this
        // loop cannot split the tick). A single source needs no per-bot work; a selector gives
        // the legacy (and shadow) bots their own source.
        let (routes_of, legacy, snapshot_source): (Vec<Route>, Vec<(usize, SharedSource)>, _) =
            match &self.routing {
                Routing::Single(s) => (vec![Route::Coordinated; bots.len()], Vec::new(), Some(Arc::clone(s))),
                Routing::Selector(sel) => {
                    let (mut routes, mut legacy, mut snapshot) =
                        (Vec::with_capacity(bots.len()), Vec::new(), None);
                    let resolved = sel.resolve_all(bots.iter().map(|b| b.id.as_str()));
                    for (i, (route, source)) in resolved.into_iter().enumerate() {
                        if route == Route::Coordinated {
                            snapshot.get_or_insert(source);
                        } else {
                            legacy.push((i, source));
                        }
                        routes.push(route);
                    }
                    (routes, legacy, snapshot)
                }
            };

        // The snapshot bots' data, fetched once; each series resolved once for all its bots.
        let plan =
            Plan::new(bots.iter().zip(&routes_of).filter(|(_, r)| **r == Route::Coordinated).map(|(b, _)| b));
        let snapshot_fut = async {
            match &snapshot_source {
                Some(s) if !plan.of_bot.is_empty() => Some(plan.fetch(s.as_ref(), now).await),
                _ => None,
            }
        };
        let legacy_fut = futures_util::future::join_all(
            legacy
                .iter()
                .map(|(i, s)| async move { (*i, legacy_evaluate(&bots[*i], s.as_ref(), now).await) }),
        );
        let (fetched, legacy) = tokio::join!(snapshot_fut, legacy_fut);
        self.compare_shadow_decisions(bots, &routes_of, &legacy, now).await;
        let resolved: Vec<Resolved<'_>> = match &fetched {
            Some(f) => plan
                .series
                .iter()
                .zip(&f.candles)
                .zip(&f.marks)
                .map(|((s, c), m)| f.resolve(s, c, *m))
                .collect(),
            None => Vec::new(),
        };

        let mut results = Vec::with_capacity(bots.len());
        let mut route_counts: Vec<(Route, u64)> = Vec::new();
        // Buy, sell, hold, error.
        let mut signal_counts = [0u64; 4];
        let mut legacy = legacy.into_iter().peekable();
        let mut of_bot = plan.of_bot.iter();
        for (i, (bot, route)) in bots.iter().zip(&routes_of).enumerate() {
            let outcome = if *route == Route::Coordinated {
                match of_bot.next().and_then(|g| resolved.get(*g)) {
                    Some(r) => decide(bot, r),
                    None => Err(Error::Closed("no snapshot was taken".into())),
                }
            } else {
                match legacy.next_if(|(j, _)| *j == i) {
                    Some((_, r)) => r,
                    None => Err(Error::Closed("the legacy evaluation did not run".into())),
                }
            };
            match route_counts.iter_mut().find(|(r, _)| r == route) {
                Some((_, n)) => *n += 1,
                None => route_counts.push((*route, 1)),
            }
            signal_counts[match &outcome {
                Ok(d) => match d.signal {
                    Signal::Buy => 0,
                    Signal::Sell => 1,
                    Signal::Hold => 2,
                },
                Err(_) => 3,
            }] += 1;
            results.push(BotResult {
                bot_id: bot.id.clone(),
                product: bot.product.clone(),
                route: *route,
                outcome,
            });
        }
        let routes = route_counts.into_iter().map(|(r, n)| (r.as_str().to_string(), n)).collect();
        let counts =
            [signal_name(Signal::Buy), signal_name(Signal::Sell), signal_name(Signal::Hold), "error"]
                .into_iter()
                .zip(signal_counts)
                .filter(|(_, n)| *n > 0)
                .map(|(k, n)| (k.to_string(), n))
                .collect();

        let (calls1, hits1, misses1) = self.read_meters();
        let (hits, misses) = (hits1.saturating_sub(hits0), misses1.saturating_sub(misses0));
        let bot_reads = READS_PER_BOT * bots.len() as u64;
        TickReport {
            started_at: now,
            duration: t0.elapsed(),
            upstream_calls: calls1.saturating_sub(calls0),
            provisional_series: self.provisional_reads().saturating_sub(provisional0),
            cache_hits: hits,
            cache_misses: misses,
            cache_hit_rate: if hits + misses == 0 { 0.0 } else { hits as f64 / (hits + misses) as f64 },
            bot_reads,
            read_hit_rate: read_hit_rate(bot_reads, calls1.saturating_sub(calls0)),
            availability: if bots.is_empty() {
                0.0
            } else {
                results.iter().filter(|r| r.outcome.is_ok()).count() as f64 / bots.len() as f64
            },
            routes,
            outcomes: counts,
            results,
        }
    }
}

impl BatchEvaluator {
    /// Decision-level shadow: each shadowed bot whose legacy evaluation succeeded is evaluated
    /// again on the coordinated answers (mostly from the cache the shadow's own reads just
    /// filled), and whether both gave the same signal goes into the shadow's
    /// [`MigrationReport`](crate::MigrationReport).
    async fn compare_shadow_decisions(
        &self,
        bots: &[Bot],
        routes: &[Route],
        legacy: &[(usize, Result<Decision>)],
        now: OffsetDateTime,
    ) {
        let Routing::Selector(sel) = &self.routing else { return };
        let shadow = sel.shadow();
        let coordinated = shadow.coordinated();
        let compared = legacy.iter().filter(|(i, r)| routes[*i] == Route::Shadow && r.is_ok()).map(
            |(i, r)| async move {
                let on_coordinated = legacy_evaluate(&bots[*i], coordinated.as_ref(), now).await;
                (*i, r, on_coordinated)
            },
        );
        for (i, r, c) in futures_util::future::join_all(compared).await {
            let agreed = matches!((r, &c), (Ok(l), Ok(c)) if l.signal == c.signal);
            shadow.record_decision(&bots[i].id, agreed);
        }
    }
}

/// The data reads of one bot per tick, as the seed counts them: ticker, candles, accounts,
/// balance check.
pub const READS_PER_BOT: u64 = 4;

/// The seed's read hit rate: the share of `reads` answered without an upstream call of their
/// own, `1 − calls / reads` (at least 0), 0 without reads.
pub fn read_hit_rate(reads: u64, calls: u64) -> f64 {
    if reads == 0 { 0.0 } else { reads.saturating_sub(calls) as f64 / reads as f64 }
}

fn signal_name(s: Signal) -> &'static str {
    match s {
        Signal::Buy => "buy",
        Signal::Sell => "sell",
        Signal::Hold => "hold",
    }
}

/// The legacy per-bot flow: four upstream calls, as the seed system made them — each one made
/// even when an earlier one failed (the seed fetched them independently), so a tick costs
/// 4 × bots calls; the first error is the bot's outcome.
async fn legacy_evaluate(bot: &Bot, source: &dyn MarketDataSource, now: OffsetDateTime) -> Result<Decision> {
    let ticker = source.ticker(&bot.product).await;
    let candles = match CandleRange::lookback(bot.granularity, bot.lookback, now) {
        Ok(range) => source.candles_fresh(&bot.product, bot.granularity, range).await,
        Err(e) => Err(e),
    };
    let accounts = source.accounts().await;
    let can_afford = source.validate_trade_balance(bot.product.quote(), bot.order_size).await;
    let (ticker, read, can_afford) = (ticker?, candles?, can_afford?);
    let balances = Balances::from_accounts(&accounts?);
    let marks = CandleMarks::of(&read);
    let candles = read.value;
    let n = (bot.lookback as usize).min(candles.len());
    let view = MarketView {
        ticker: &ticker,
        candles: &candles[candles.len() - n..],
        balances: &balances,
        can_afford,
        marks,
    };
    Ok(bot.strategy.evaluate(&view))
}

/// What a [`BatchEvaluator::prefetch`] did.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct PrefetchReport {
    /// Wall time the prefetch started.
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    /// How long it took.
    #[serde(with = "crate::util::duration_ms")]
    pub duration: Duration,
    /// Whether the source keeps a cache to warm ([`MarketDataSource::prefetch`] answered).
    pub supported: bool,
    /// Bots whose data was fetched (those the flags route to the coordinated source).
    pub bots: usize,
    /// Upstream calls made meanwhile (by the meters given to the evaluator).
    pub upstream_calls: u64,
    /// Reads that failed (a ticker, a candle series, the accounts): the tick will try again.
    pub failed_reads: u64,
}

/// Serde form of a tick summary without per-bot results, for logs and dashboards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TickSummary {
    /// Bots evaluated.
    pub bots: usize,
    /// Upstream calls during the tick.
    pub upstream_calls: u64,
    /// Cache hit rate during the tick.
    pub cache_hit_rate: f64,
    /// Tick duration, milliseconds.
    pub tick_ms: f64,
    /// Bots whose evaluation failed.
    pub errors: u64,
}

impl From<&TickReport> for TickSummary {
    fn from(r: &TickReport) -> Self {
        TickSummary {
            bots: r.results.len(),
            upstream_calls: r.upstream_calls,
            cache_hit_rate: r.cache_hit_rate,
            tick_ms: r.duration.as_secs_f64() * 1000.0,
            errors: r.errors().count() as u64,
        }
    }
}

#[cfg(test)]
mod tests;
