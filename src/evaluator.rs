//! [`BatchEvaluator`]: one market snapshot per tick, every bot evaluated on it.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    sync::Arc,
    time::Duration,
};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize, ser::SerializeStruct};
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::{
    clock::Clock,
    error::{Error, Result},
    flags::Route,
    model::{Balances, Candle, CandleRange, Granularity, ProductId, Ticker},
    selector::SourceSelector,
    source::{MarketDataSource, distinct},
    stats::UpstreamMeter,
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
    /// Balances, or the error fetching accounts.
    pub balances: Result<Balances>,
}

impl MarketSnapshot {
    /// Fetch what `bots` need from `source`: one batched tickers call, each distinct candle
    /// series once (at the longest lookback), accounts once — all concurrently.
    pub async fn fetch(source: &dyn MarketDataSource, bots: &[&Bot], now: OffsetDateTime) -> Self {
        let products = distinct(&bots.iter().map(|b| b.product.clone()).collect::<Vec<_>>());
        let mut series: BTreeMap<(ProductId, Granularity), u32> = BTreeMap::new();
        for b in bots {
            let e = series.entry((b.product.clone(), b.granularity)).or_default();
            *e = (*e).max(b.lookback);
        }
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
        let candles_fut =
            futures_util::future::join_all(series.iter().map(|((p, g), lookback)| async move {
                let r = match CandleRange::lookback(*g, *lookback, now) {
                    Ok(range) => source.candles(p, *g, range).await.map(Arc::new),
                    Err(e) => Err(e),
                };
                ((p.clone(), *g), r)
            }));
        let accounts_fut = async { source.accounts().await.map(|a| Balances::from_accounts(&a)) };
        let (tickers, candles, balances) = tokio::join!(tickers_fut, candles_fut, accounts_fut);
        MarketSnapshot { taken_at: now, tickers, candles: candles.into_iter().collect(), balances }
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
        };
        Ok(bot.strategy.evaluate(&view))
    }
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
    #[serde(with = "crate::config::duration_ms")]
    pub duration: Duration,
    /// Upstream calls made during the tick (by the meters given to the evaluator).
    pub upstream_calls: u64,
    /// Cache hits during the tick.
    pub cache_hits: u64,
    /// Cache misses during the tick.
    pub cache_misses: u64,
    /// `cache_hits / (hits + misses)`, 0 without reads.
    pub cache_hit_rate: f64,
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

    fn read_meters(&self) -> (u64, u64, u64) {
        self.meters.iter().fold((0, 0, 0), |(c, h, m), meter| {
            let (hits, misses) = meter.cache_reads();
            (c + meter.upstream_calls(), h + hits, m + misses)
        })
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

        // Resolve every bot's path under one view of the flags.
        let plan: Vec<(Route, Arc<dyn MarketDataSource>)> = match &self.routing {
            Routing::Single(s) => bots.iter().map(|_| (Route::Coordinated, Arc::clone(s))).collect(),
            Routing::Selector(sel) => bots.iter().map(|b| sel.resolve(&b.id)).collect(),
        };

        let snapshot_bots: Vec<&Bot> =
            bots.iter().zip(&plan).filter(|(_, (r, _))| *r == Route::Coordinated).map(|(b, _)| b).collect();
        let snapshot_source = plan.iter().find(|(r, _)| *r == Route::Coordinated).map(|(_, s)| Arc::clone(s));
        let snapshot_fut = async {
            match &snapshot_source {
                Some(s) if !snapshot_bots.is_empty() => {
                    Some(MarketSnapshot::fetch(s.as_ref(), &snapshot_bots, now).await)
                }
                _ => None,
            }
        };
        let legacy_fut = futures_util::future::join_all(
            bots.iter()
                .zip(&plan)
                .enumerate()
                .filter(|(_, (_, (r, _)))| *r != Route::Coordinated)
                .map(|(i, (b, (_, s)))| async move { (i, legacy_evaluate(b, s.as_ref(), now).await) }),
        );
        let (snapshot, legacy) = tokio::join!(snapshot_fut, legacy_fut);

        let mut outcomes: Vec<Option<Result<Decision>>> = vec![None; bots.len()];
        for (i, r) in legacy {
            outcomes[i] = Some(r);
        }
        let mut results = Vec::with_capacity(bots.len());
        let mut routes: BTreeMap<String, u64> = BTreeMap::new();
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for (i, (bot, (route, _))) in bots.iter().zip(&plan).enumerate() {
            let outcome = match outcomes[i].take() {
                Some(r) => r,
                None => match &snapshot {
                    Some(s) => s.evaluate(bot),
                    None => Err(Error::Closed("no snapshot was taken".into())),
                },
            };
            *routes.entry(route.as_str().to_string()).or_default() += 1;
            let key = match &outcome {
                Ok(d) => signal_name(d.signal),
                Err(_) => "error",
            };
            *counts.entry(key.to_string()).or_default() += 1;
            results.push(BotResult {
                bot_id: bot.id.clone(),
                product: bot.product.clone(),
                route: *route,
                outcome,
            });
        }

        let (calls1, hits1, misses1) = self.read_meters();
        let (hits, misses) = (hits1.saturating_sub(hits0), misses1.saturating_sub(misses0));
        TickReport {
            started_at: now,
            duration: t0.elapsed(),
            upstream_calls: calls1.saturating_sub(calls0),
            cache_hits: hits,
            cache_misses: misses,
            cache_hit_rate: if hits + misses == 0 { 0.0 } else { hits as f64 / (hits + misses) as f64 },
            routes,
            outcomes: counts,
            results,
        }
    }
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
        Ok(range) => source.candles(&bot.product, bot.granularity, range).await,
        Err(e) => Err(e),
    };
    let accounts = source.accounts().await;
    let can_afford = source.validate_trade_balance(bot.product.quote(), bot.order_size).await;
    let (ticker, candles, can_afford) = (ticker?, candles?, can_afford?);
    let balances = Balances::from_accounts(&accounts?);
    let n = (bot.lookback as usize).min(candles.len());
    let view = MarketView {
        ticker: &ticker,
        candles: &candles[candles.len() - n..],
        balances: &balances,
        can_afford,
    };
    Ok(bot.strategy.evaluate(&view))
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
