//! [`ShadowSource`]: serve the legacy answer, ask the coordinated path the same question, and
//! record how the two differ.
//!
//! The coordinated call runs in its own task, started together with the legacy call. The
//! caller gets the legacy result as soon as the legacy path answers; the comparison is
//! recorded when the coordinated path answers too. So a slow, failing, hanging or even
//! panicking coordinated path changes neither the value nor the latency a shadowed bot sees.

use std::{
    collections::BTreeMap,
    fmt,
    future::Future,
    panic::AssertUnwindSafe,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use futures_util::FutureExt;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{Notify, oneshot},
    time::Instant,
};

use crate::{
    error::{Error, Result},
    model::{Account, Candle, CandleRange, Granularity, ProductId, Ticker},
    source::MarketDataSource,
    util::inc,
    util::lock,
};

/// The trait methods, for per-method counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Ticker = 0,
    Tickers = 1,
    Candles = 2,
    Accounts = 3,
    ValidateTradeBalance = 4,
}

impl Method {
    const ALL: [Method; 5] =
        [Method::Ticker, Method::Tickers, Method::Candles, Method::Accounts, Method::ValidateTradeBalance];

    const fn as_str(self) -> &'static str {
        match self {
            Method::Ticker => "ticker",
            Method::Tickers => "tickers",
            Method::Candles => "candles",
            Method::Accounts => "accounts",
            Method::ValidateTradeBalance => "validate_trade_balance",
        }
    }
}

/// Which side answered what, for one shadowed call.
#[derive(Debug, Default)]
struct MethodCounters {
    calls: AtomicU64,
    compared: AtomicU64,
    mismatches: AtomicU64,
    coordinated_errors: AtomicU64,
    legacy_errors: AtomicU64,
    both_errors: AtomicU64,
}

/// Running sum and maximum of absolute ticker price differences. A std mutex: it is held for
/// two additions, never across an await.
#[derive(Debug, Default)]
struct PriceDeltas {
    samples: u64,
    sum: Decimal,
    max: Decimal,
}

#[derive(Debug, Default)]
struct PathTime {
    calls: AtomicU64,
    total_us: AtomicU64,
}

impl PathTime {
    fn record(&self, elapsed: Duration) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.total_us.fetch_add(us, Ordering::Relaxed);
    }

    fn snapshot(&self) -> PathLatency {
        let calls = self.calls.load(Ordering::Relaxed);
        let total_ms = self.total_us.load(Ordering::Relaxed) as f64 / 1000.0;
        PathLatency { calls, total_ms, mean_ms: if calls == 0 { 0.0 } else { total_ms / calls as f64 } }
    }
}

/// The shared counters behind one or more [`ShadowSource`]s.
#[derive(Debug, Default)]
struct Recorder {
    methods: [MethodCounters; 5],
    prices: Mutex<PriceDeltas>,
    ticker_price_differences: AtomicU64,
    candle_mismatches: AtomicU64,
    candle_count_mismatches: AtomicU64,
    coordinated_panics: AtomicU64,
    abandoned: AtomicU64,
    in_flight: AtomicU64,
    idle: Notify,
    legacy_time: PathTime,
    coordinated_time: PathTime,
    tolerance: ShadowTolerance,
    /// Worst ticker and in-progress candle deltas, in basis points.
    worst_bps: Mutex<(f64, f64)>,
    /// Decisions compared per bot: `(compared, agreed)`.
    decisions: Mutex<BTreeMap<String, (u64, u64)>>,
    closed_candle_mismatches: AtomicU64,
}

/// How far two answers may differ and still agree. Closed candles, accounts and balance checks
/// must be identical; a ticker or the candle in progress moves between two reads, so they get
/// a tolerance that grows with the time between the two prices.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ShadowTolerance {
    /// Ticker prices within this many basis points agree. Default 5.
    pub ticker_bps: f64,
    /// Plus this many basis points per second between the two tickers' times. Default 2.
    pub ticker_bps_per_second: f64,
    /// The last candle agrees when its close is within this many basis points and its
    /// high/low lie inside the legacy candle's range (or within this many basis points
    /// outside it): a live candle cannot know extremes between two prices it saw, and its
    /// volume (not compared) is as of its fetch. Default 25.
    pub in_progress_candle_bps: f64,
}

impl Default for ShadowTolerance {
    fn default() -> Self {
        ShadowTolerance { ticker_bps: 5.0, ticker_bps_per_second: 2.0, in_progress_candle_bps: 25.0 }
    }
}

fn bps(a: Decimal, b: Decimal) -> f64 {
    if b.is_zero() {
        return if a == b { 0.0 } else { f64::MAX };
    }
    let r = ((a - b).abs() / b.abs()) * Decimal::from(10_000);
    r.to_string().parse().unwrap_or(f64::MAX)
}

impl Recorder {
    fn worst(&self, ticker: f64, candle: f64) {
        let mut w = lock(&self.worst_bps);
        w.0 = w.0.max(ticker);
        w.1 = w.1.max(candle);
    }

    /// A ticker pair within the tolerance.
    fn ticker_within(&self, l: &Ticker, c: &Ticker) -> bool {
        let exact = self.price_delta(l.price, c.price);
        let d = bps(c.price, l.price);
        self.worst(d, 0.0);
        let apart = (l.time - c.time).abs().as_seconds_f64();
        exact || d <= self.tolerance.ticker_bps + self.tolerance.ticker_bps_per_second * apart
    }

    fn price_delta(&self, legacy: Decimal, coordinated: Decimal) -> bool {
        let delta = (legacy - coordinated).abs();
        let mut p = lock(&self.prices);
        p.samples += 1;
        // Saturate rather than panic on a sum beyond Decimal's range (about 7.9e28).
        p.sum = p.sum.checked_add(delta).unwrap_or(Decimal::MAX);
        p.max = p.max.max(delta);
        drop(p);
        if delta.is_zero() {
            true
        } else {
            inc(&self.ticker_price_differences);
            false
        }
    }

    /// Compare two answers of `method`; `true` when they agree.
    fn record<T>(&self, method: Method, legacy: &Result<T>, coordinated: &Result<T>) -> bool
    where
        T: Comparable,
    {
        let m = &self.methods[method as usize];
        match (legacy, coordinated) {
            (Ok(l), Ok(c)) => {
                inc(&m.compared);
                let same = T::agree(self, l, c);
                if !same {
                    inc(&m.mismatches);
                    tracing::debug!(method = method.as_str(), "shadow answers differ");
                }
                same
            }
            (Ok(_), Err(e)) => {
                inc(&m.coordinated_errors);
                tracing::debug!(method = method.as_str(), error = %e, "shadow: only the coordinated path failed");
                false
            }
            (Err(e), Ok(_)) => {
                inc(&m.legacy_errors);
                tracing::debug!(method = method.as_str(), error = %e, "shadow: only the legacy path failed");
                false
            }
            (Err(_), Err(_)) => {
                inc(&m.both_errors);
                true
            }
        }
    }

    fn snapshot(&self) -> ShadowStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let by_method: BTreeMap<String, MethodShadowStats> = Method::ALL
            .iter()
            .map(|m| {
                let c = &self.methods[*m as usize];
                let s = MethodShadowStats {
                    calls: get(&c.calls),
                    comparisons: get(&c.compared),
                    mismatches: get(&c.mismatches),
                    coordinated_errors: get(&c.coordinated_errors),
                    legacy_errors: get(&c.legacy_errors),
                    both_errors: get(&c.both_errors),
                };
                (m.as_str().to_string(), s)
            })
            .collect();
        let sum = |f: fn(&MethodShadowStats) -> u64| by_method.values().map(f).sum::<u64>();
        let prices = lock(&self.prices);
        let mean = if prices.samples == 0 {
            Decimal::ZERO
        } else {
            (prices.sum / Decimal::from(prices.samples)).round_dp(12).normalize()
        };
        ShadowStats {
            calls: sum(|m| m.calls),
            comparisons: sum(|m| m.comparisons),
            mismatches: sum(|m| m.mismatches),
            coordinated_errors: sum(|m| m.coordinated_errors),
            legacy_errors: sum(|m| m.legacy_errors),
            both_errors: sum(|m| m.both_errors),
            coordinated_panics: get(&self.coordinated_panics),
            abandoned: get(&self.abandoned),
            in_flight: self.in_flight.load(Ordering::Acquire),
            ticker_price_samples: prices.samples,
            ticker_price_differences: get(&self.ticker_price_differences),
            ticker_price_max_abs_delta: prices.max.normalize(),
            ticker_price_mean_abs_delta: mean,
            candle_mismatches: get(&self.candle_mismatches),
            candle_count_mismatches: get(&self.candle_count_mismatches),
            legacy_latency: self.legacy_time.snapshot(),
            coordinated_latency: self.coordinated_time.snapshot(),
            by_method,
        }
    }
}

/// Marks one comparison in flight; the count drops (and idle waiters wake) when the
/// comparison task ends, whether it recorded, was abandoned or unwound.
struct InFlight(Arc<Recorder>);

impl InFlight {
    fn start(rec: &Arc<Recorder>) -> Self {
        rec.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(rec))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// How two successful answers of the same method are compared.
trait Comparable: Clone + Send + 'static {
    /// `true` when they agree; records the details (price deltas, candle mismatches).
    fn agree(rec: &Recorder, legacy: &Self, coordinated: &Self) -> bool;
}

impl Comparable for Ticker {
    fn agree(rec: &Recorder, l: &Self, c: &Self) -> bool {
        rec.ticker_within(l, c) && l.product == c.product
    }
}

impl Comparable for Vec<Ticker> {
    fn agree(rec: &Recorder, l: &Self, c: &Self) -> bool {
        let coordinated: BTreeMap<&ProductId, &Ticker> = c.iter().map(|t| (&t.product, t)).collect();
        let mut same = l.len() == c.len();
        for t in l {
            match coordinated.get(&t.product) {
                Some(ct) => same &= rec.ticker_within(t, ct),
                None => same = false,
            }
        }
        same
    }
}

impl Comparable for Vec<Candle> {
    fn agree(rec: &Recorder, l: &Self, c: &Self) -> bool {
        let same = if l.len() != c.len() {
            inc(&rec.candle_count_mismatches);
            false
        } else if l == c {
            true
        } else {
            // Closed candles identical; the last one (possibly in progress) within tolerance.
            let n = l.len().saturating_sub(1);
            let closed_same = l[..n] == c[..n];
            if !closed_same {
                inc(&rec.closed_candle_mismatches);
            }
            let last_within = match (l.last(), c.last()) {
                (Some(a), Some(b)) if a.start == b.start && a.open == b.open => {
                    // The close within tolerance; the range inside the exchange's (a live
                    // candle cannot know the extremes between two prices it saw), or within
                    // tolerance of it. Volume is not compared (a live candle's is as of its fetch).
                    let tol = rec.tolerance.in_progress_candle_bps;
                    let d = bps(b.close, a.close);
                    let over = |x: Decimal, y: Decimal| if x > y { bps(x, y) } else { 0.0 };
                    let range = over(b.high, a.high).max(over(a.low, b.low));
                    rec.worst(0.0, d.max(range));
                    d <= tol && range <= tol
                }
                _ => false,
            };
            closed_same && last_within
        };
        if !same {
            inc(&rec.candle_mismatches);
        }
        same
    }
}

impl Comparable for Vec<Account> {
    fn agree(_: &Recorder, l: &Self, c: &Self) -> bool {
        let sorted = |v: &Self| {
            let mut v = v.clone();
            v.sort_by(|a, b| a.uuid.cmp(&b.uuid));
            v
        };
        sorted(l) == sorted(c)
    }
}

impl Comparable for bool {
    fn agree(_: &Recorder, l: &Self, c: &Self) -> bool {
        l == c
    }
}

/// Counters of one trait method in shadow mode.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MethodShadowStats {
    /// Calls shadowed.
    pub calls: u64,
    /// Calls where both paths answered successfully and the answers were compared.
    pub comparisons: u64,
    /// Comparisons whose answers differed.
    pub mismatches: u64,
    /// Calls where the legacy path answered and the coordinated path failed.
    pub coordinated_errors: u64,
    /// Calls where the legacy path failed and the coordinated path answered.
    pub legacy_errors: u64,
    /// Calls where both paths failed.
    pub both_errors: u64,
}

/// Time spent by one path in shadow mode.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PathLatency {
    /// Calls timed.
    pub calls: u64,
    /// Total time, milliseconds.
    pub total_ms: f64,
    /// `total_ms / calls`, 0 without calls.
    pub mean_ms: f64,
}

/// A snapshot of the divergence between the legacy and coordinated paths, recorded by
/// [`ShadowSource`]. Counts are exact and monotonic.
///
/// The two paths may differ for good reasons: the coordinated path serves cached data (up to
/// its ticker TTL old), its batched tickers carry the bid/ask mid price where the legacy
/// ticker carries the last trade, and the candle in progress moves between two fetches. Read
/// the deltas, not only the mismatch counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowStats {
    /// Calls shadowed (all methods).
    pub calls: u64,
    /// Calls where both answers were compared.
    pub comparisons: u64,
    /// Comparisons whose answers differed.
    pub mismatches: u64,
    /// Calls where only the coordinated path failed (panics included).
    pub coordinated_errors: u64,
    /// Calls where only the legacy path failed.
    pub legacy_errors: u64,
    /// Calls where both failed.
    pub both_errors: u64,
    /// Coordinated calls that panicked (counted as coordinated errors too).
    pub coordinated_panics: u64,
    /// Calls dropped by their caller before the legacy path answered: nothing to compare.
    pub abandoned: u64,
    /// Comparisons still waiting for the coordinated path.
    pub in_flight: u64,
    /// Ticker prices compared (one per product present in both answers).
    pub ticker_price_samples: u64,
    /// Ticker prices that differed.
    pub ticker_price_differences: u64,
    /// Largest absolute ticker price difference.
    pub ticker_price_max_abs_delta: Decimal,
    /// Mean absolute ticker price difference over all samples (rounded to 12 places).
    pub ticker_price_mean_abs_delta: Decimal,
    /// Candle answers that differed: another number of candles, or a candle at the same start
    /// with other OHLCV values.
    pub candle_mismatches: u64,
    /// The part of `candle_mismatches` with a different number of candles.
    pub candle_count_mismatches: u64,
    /// Time spent by the legacy path.
    pub legacy_latency: PathLatency,
    /// Time spent by the coordinated path.
    pub coordinated_latency: PathLatency,
    /// The counters by trait method (`ticker`, `tickers`, `candles`, `accounts`,
    /// `validate_trade_balance`).
    pub by_method: BTreeMap<String, MethodShadowStats>,
}

/// What a shadow run shows about migrating: the input of a rollout decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// Answers compared (both paths answered).
    pub comparisons: u64,
    /// Comparisons beyond [`ShadowTolerance`], by method.
    pub mismatches_by_method: BTreeMap<String, u64>,
    /// Closed candles that differed (must be 0: closed candles are exact on both paths).
    pub closed_candle_mismatches: u64,
    /// Worst ticker price delta seen, basis points.
    pub worst_ticker_bps: f64,
    /// Worst delta of the last candle (close, high or low), basis points.
    pub worst_in_progress_candle_bps: f64,
    /// Mismatches beyond tolerance plus calls only the coordinated path failed: nothing in
    /// the tolerance explains them.
    pub unexplained_mismatches: u64,
    /// Decisions compared (a strategy evaluated on both answers); `None` when not measured.
    pub decision_comparisons: Option<u64>,
    /// Share of compared decisions that agreed; `None` when not measured.
    pub decision_agreement: Option<f64>,
    /// Per shadowed bot: decisions compared and how many agreed (what a trader checks before
    /// a bot's flag flips).
    #[serde(default)]
    pub bots: BTreeMap<String, BotAgreement>,
    /// Whether [`MigrationGate::default`] passes.
    pub safe_to_migrate: bool,
    /// Why not (empty when safe), or what the verdict rests on.
    pub reasons: Vec<String>,
}

/// One shadowed bot's decisions on both paths.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BotAgreement {
    /// Ticks on which the bot's strategy was evaluated on both answers.
    pub decisions: u64,
    /// Of those, ticks on which both gave the same signal.
    pub agreed: u64,
}

/// What a host requires before a rollout step, e.g. "≥ 200 comparisons and no unexplained
/// mismatch".
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MigrationGate {
    /// At least this many comparisons. Default 200.
    pub min_comparisons: u64,
    /// At most this many unexplained mismatches. Default 0.
    pub max_unexplained_mismatches: u64,
    /// At least this share of agreeing decisions (0 = not required). When required and not
    /// measured, the gate holds. Default 0.
    pub min_decision_agreement: f64,
}

impl Default for MigrationGate {
    fn default() -> Self {
        MigrationGate { min_comparisons: 200, max_unexplained_mismatches: 0, min_decision_agreement: 0.0 }
    }
}

/// The typed answer of [`MigrationReport::gate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "verdict")]
pub enum GateVerdict {
    /// Every requirement is met: the rollout step may proceed.
    Proceed,
    /// At least one is not; the reasons say which.
    Hold {
        /// One sentence per unmet requirement.
        reasons: Vec<String>,
    },
}

impl GateVerdict {
    /// Whether the rollout step may proceed.
    pub fn is_proceed(&self) -> bool {
        matches!(self, GateVerdict::Proceed)
    }
}

impl MigrationReport {
    /// Judge the report against `gate`.
    pub fn gate(&self, gate: &MigrationGate) -> GateVerdict {
        let mut reasons = Vec::new();
        if self.comparisons < gate.min_comparisons {
            reasons.push(format!("{} comparisons, {} required", self.comparisons, gate.min_comparisons));
        }
        if self.unexplained_mismatches > gate.max_unexplained_mismatches {
            let by: Vec<String> = self
                .mismatches_by_method
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(m, n)| format!("{m}: {n}"))
                .collect();
            reasons.push(format!(
                "{} unexplained mismatches (beyond tolerance or coordinated errors; {}), at most {} allowed",
                self.unexplained_mismatches,
                if by.is_empty() { "coordinated errors only".to_string() } else { by.join(", ") },
                gate.max_unexplained_mismatches
            ));
        }
        if self.closed_candle_mismatches > 0 {
            reasons.push(format!("{} closed candles differ", self.closed_candle_mismatches));
        }
        if gate.min_decision_agreement > 0.0 {
            match self.decision_agreement {
                None => reasons.push("decision agreement was not measured".into()),
                Some(a) if a < gate.min_decision_agreement => reasons.push(format!(
                    "decision agreement {:.1} %, {:.1} % required",
                    a * 100.0,
                    gate.min_decision_agreement * 100.0
                )),
                Some(_) => {}
            }
        }
        if reasons.is_empty() { GateVerdict::Proceed } else { GateVerdict::Hold { reasons } }
    }
}

/// A [`MarketDataSource`] that serves the legacy path's answers while comparing them with
/// the coordinated path's.
///
/// Every call starts both paths at once: the coordinated call in a spawned task, the legacy
/// call on the caller's task. The caller receives the legacy result (value or error) as soon
/// as the legacy path answers; the coordinated answer is compared when it arrives and counted
/// in [`ShadowStats`]. Divergence never reaches the caller: not a different value, not an
/// error, not the coordinated path's latency, not a panic.
///
/// Clones share the counters. Note that the coordinated path does real work (it may call the
/// exchange), so shadowing a bot costs what migrating it costs, on top of the legacy calls.
///
/// # Cancel safety
/// Dropping a call abandons the legacy call; the coordinated call runs to completion in its
/// task and is counted as [`abandoned`](ShadowStats::abandoned).
///
/// # Panics
/// The methods spawn a task, so they must run inside a tokio runtime (as every source of this
/// crate must).
///
/// ```
/// # async fn f(legacy: std::sync::Arc<dyn tickshare::MarketDataSource>,
/// #            coordinated: std::sync::Arc<dyn tickshare::MarketDataSource>) -> tickshare::Result<()> {
/// use tickshare::{MarketDataSource, ShadowSource};
/// let shadow = ShadowSource::new(legacy, coordinated);
/// let served = shadow.ticker(&"BTC-USD".parse()?).await?; // the legacy answer
/// shadow.wait_idle().await;
/// println!("{}", shadow.stats().ticker_price_max_abs_delta);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ShadowSource {
    legacy: Arc<dyn MarketDataSource>,
    coordinated: Arc<dyn MarketDataSource>,
    recorder: Arc<Recorder>,
}

impl fmt::Debug for ShadowSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShadowSource").field("stats", &self.stats()).finish_non_exhaustive()
    }
}

impl ShadowSource {
    /// Shadow `coordinated` behind `legacy`, with [`ShadowTolerance::default`].
    pub fn new(legacy: Arc<dyn MarketDataSource>, coordinated: Arc<dyn MarketDataSource>) -> Self {
        Self::with_tolerance(legacy, coordinated, ShadowTolerance::default())
    }

    /// Shadow `coordinated` behind `legacy` with a declared tolerance.
    pub fn with_tolerance(
        legacy: Arc<dyn MarketDataSource>,
        coordinated: Arc<dyn MarketDataSource>,
        tolerance: ShadowTolerance,
    ) -> Self {
        ShadowSource {
            legacy,
            coordinated,
            recorder: Arc::new(Recorder { tolerance, ..Recorder::default() }),
        }
    }

    /// The migration report of everything shadowed so far, judged by [`MigrationGate::default`].
    pub fn report(&self) -> MigrationReport {
        let s = self.stats();
        let rec = &self.recorder;
        let (worst_ticker_bps, worst_in_progress_candle_bps) = *lock(&rec.worst_bps);
        let mismatches_by_method: BTreeMap<String, u64> =
            s.by_method.iter().map(|(m, st)| (m.clone(), st.mismatches)).collect();
        let mut report = MigrationReport {
            comparisons: s.comparisons,
            mismatches_by_method,
            closed_candle_mismatches: rec.closed_candle_mismatches.load(Ordering::Relaxed),
            worst_ticker_bps,
            worst_in_progress_candle_bps,
            unexplained_mismatches: s.mismatches + s.coordinated_errors,
            decision_comparisons: None,
            decision_agreement: None,
            bots: BTreeMap::new(),
            safe_to_migrate: false,
            reasons: Vec::new(),
        };
        {
            let decisions = lock(&rec.decisions);
            let (compared, agreed) = decisions.values().fold((0, 0), |(c, a), (dc, da)| (c + dc, a + da));
            if compared > 0 {
                report.decision_comparisons = Some(compared);
                report.decision_agreement = Some(agreed as f64 / compared as f64);
            }
            report.bots = decisions
                .iter()
                .map(|(id, (d, a))| (id.clone(), BotAgreement { decisions: *d, agreed: *a }))
                .collect();
        }
        match report.gate(&MigrationGate::default()) {
            GateVerdict::Proceed => {
                report.safe_to_migrate = true;
                report.reasons.push(format!(
                    "{} comparisons, none beyond tolerance (worst ticker {:.2} bps, worst candle in progress {:.2} bps)",
                    report.comparisons, worst_ticker_bps, worst_in_progress_candle_bps
                ));
            }
            GateVerdict::Hold { reasons } => report.reasons = reasons,
        }
        report
    }

    /// Record one decision of a shadowed bot on both paths (the evaluator does this for every
    /// shadowed bot each tick): `agreed` when both answers gave the same signal.
    pub fn record_decision(&self, bot_id: &str, agreed: bool) {
        let mut d = lock(&self.recorder.decisions);
        let e = d.entry(bot_id.to_string()).or_default();
        e.0 += 1;
        e.1 += u64::from(agreed);
    }

    /// The coordinated side of the comparison.
    pub fn coordinated(&self) -> &Arc<dyn MarketDataSource> {
        &self.coordinated
    }

    /// A snapshot of the divergence counters.
    pub fn stats(&self) -> ShadowStats {
        self.recorder.snapshot()
    }

    /// Wait until every comparison started so far has been recorded (every coordinated call
    /// answered). Useful before reading [`stats`](ShadowSource::stats) in tests and reports;
    /// waits forever if a coordinated call never ends.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future only stops the wait.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.recorder.idle.notified();
            tokio::pin!(notified);
            // Register before checking, so a comparison ending in between still wakes us.
            notified.as_mut().enable();
            if self.recorder.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Run `legacy` on this task and `coordinated` in a spawned one; serve the legacy result.
    async fn shadow<T, L, C>(&self, method: Method, legacy: L, coordinated: C) -> Result<T>
    where
        T: Comparable,
        L: Future<Output = Result<T>> + Send,
        C: Future<Output = Result<T>> + Send + 'static,
    {
        let rec = &self.recorder;
        inc(&rec.methods[method as usize].calls);
        let (tx, rx) = oneshot::channel::<Result<T>>();
        let guard = InFlight::start(rec);
        let task_rec = Arc::clone(rec);
        let started = Instant::now();
        tokio::spawn(async move {
            let _guard = guard;
            let rec = task_rec;
            // A panic in the coordinated path is the extreme divergence: contain it here, so
            // it reaches neither the caller nor the in-flight count.
            let answer = match AssertUnwindSafe(coordinated).catch_unwind().await {
                Ok(answer) => answer,
                Err(_) => {
                    inc(&rec.coordinated_panics);
                    tracing::warn!(method = method.as_str(), "coordinated path panicked in shadow mode");
                    Err(Error::Closed("coordinated path panicked".into()))
                }
            };
            rec.coordinated_time.record(started.elapsed());
            match rx.await {
                Ok(legacy) => {
                    rec.record(method, &legacy, &answer);
                }
                Err(_) => inc(&rec.abandoned),
            }
        });
        let served = legacy.await;
        rec.legacy_time.record(started.elapsed());
        // Fails only if the comparison task is gone (its runtime is shutting down): then
        // there is nothing to compare against, and the caller is served all the same.
        let _ = tx.send(served.clone());
        served
    }
}

#[async_trait]
impl MarketDataSource for ShadowSource {
    async fn ticker(&self, product: &ProductId) -> Result<Ticker> {
        let (c, p) = (Arc::clone(&self.coordinated), product.clone());
        self.shadow(Method::Ticker, self.legacy.ticker(product), async move { c.ticker(&p).await }).await
    }

    async fn tickers(&self, products: &[ProductId]) -> Result<Vec<Ticker>> {
        let (c, p) = (Arc::clone(&self.coordinated), products.to_vec());
        self.shadow(Method::Tickers, self.legacy.tickers(products), async move { c.tickers(&p).await }).await
    }

    async fn candles(
        &self,
        product: &ProductId,
        granularity: Granularity,
        range: CandleRange,
    ) -> Result<Vec<Candle>> {
        let (c, p) = (Arc::clone(&self.coordinated), product.clone());
        self.shadow(Method::Candles, self.legacy.candles(product, granularity, range), async move {
            c.candles(&p, granularity, range).await
        })
        .await
    }

    async fn accounts(&self) -> Result<Vec<Account>> {
        let c = Arc::clone(&self.coordinated);
        self.shadow(Method::Accounts, self.legacy.accounts(), async move { c.accounts().await }).await
    }

    async fn validate_trade_balance(&self, currency: &str, amount: Decimal) -> Result<bool> {
        let (c, cur) = (Arc::clone(&self.coordinated), currency.to_string());
        self.shadow(
            Method::ValidateTradeBalance,
            self.legacy.validate_trade_balance(currency, amount),
            async move { c.validate_trade_balance(&cur, amount).await },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MockMarketDataSource;
    use time::{OffsetDateTime, macros::datetime};

    fn btc() -> ProductId {
        "BTC-USD".parse().unwrap()
    }

    fn ticker(product: &ProductId, price: Decimal) -> Ticker {
        Ticker {
            product: product.clone(),
            price,
            best_bid: None,
            best_ask: None,
            time: OffsetDateTime::UNIX_EPOCH,
            price_kind: crate::model::PriceKind::LastTrade,
        }
    }

    fn candle(minute: i64, close: i64) -> Candle {
        Candle {
            start: datetime!(2024-01-01 00:00 UTC) + time::Duration::minutes(minute),
            open: Decimal::ONE,
            high: Decimal::TEN,
            low: Decimal::ONE,
            close: Decimal::new(close, 0),
            volume: Decimal::ONE,
        }
    }

    fn pair(
        legacy: MockMarketDataSource,
        coordinated: MockMarketDataSource,
    ) -> (Arc<dyn MarketDataSource>, Arc<dyn MarketDataSource>) {
        (Arc::new(legacy), Arc::new(coordinated))
    }

    #[tokio::test]
    async fn serves_legacy_when_coordinated_differs_and_records_the_delta() {
        let mut legacy = MockMarketDataSource::new();
        legacy.expect_ticker().times(3).returning(|p| Ok(ticker(p, Decimal::new(100, 0))));
        let mut coordinated = MockMarketDataSource::new();
        let mut prices = vec![Decimal::new(1015, 1), Decimal::new(99, 0), Decimal::new(100, 0)].into_iter();
        coordinated.expect_ticker().times(3).returning(move |p| Ok(ticker(p, prices.next().unwrap())));
        let (l, c) = pair(legacy, coordinated);
        let shadow = ShadowSource::new(l, c);
        for _ in 0..3 {
            let served = shadow.ticker(&btc()).await.unwrap();
            assert_eq!(served.price, Decimal::new(100, 0));
        }
        shadow.wait_idle().await;
        let s = shadow.stats();
        assert_eq!((s.calls, s.comparisons, s.mismatches), (3, 3, 2));
        assert_eq!(s.ticker_price_samples, 3);
        assert_eq!(s.ticker_price_differences, 2);
        assert_eq!(s.ticker_price_max_abs_delta, Decimal::new(15, 1));
        // (1.5 + 1 + 0) / 3
        assert_eq!(s.ticker_price_mean_abs_delta, Decimal::new(833_333_333_333, 12));
        assert_eq!(s.by_method["ticker"].mismatches, 2);
        assert_eq!(s.in_flight, 0);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["ticker_price_max_abs_delta"], "1.5", "{json}");
        assert_eq!(json["ticker_price_mean_abs_delta"], "0.833333333333");
    }

    #[tokio::test]
    async fn serves_legacy_when_either_side_fails() {
        let mut legacy = MockMarketDataSource::new();
        let mut legacy_answers = vec![Ok(vec![]), Err(Error::Timeout), Err(Error::Timeout)].into_iter();
        legacy.expect_accounts().times(3).returning(move || legacy_answers.next().unwrap());
        let mut coordinated = MockMarketDataSource::new();
        let mut coordinated_answers =
            vec![Err(Error::RateLimited { retry_after: None, local: true }), Ok(vec![]), Err(Error::Timeout)]
                .into_iter();
        coordinated.expect_accounts().times(3).returning(move || coordinated_answers.next().unwrap());
        let (l, c) = pair(legacy, coordinated);
        let shadow = ShadowSource::new(l, c);
        assert_eq!(shadow.accounts().await, Ok(vec![]));
        assert_eq!(shadow.accounts().await, Err(Error::Timeout));
        assert_eq!(shadow.accounts().await, Err(Error::Timeout));
        shadow.wait_idle().await;
        let s = shadow.stats();
        assert_eq!((s.comparisons, s.coordinated_errors, s.legacy_errors, s.both_errors), (0, 1, 1, 1));
        assert_eq!(s.by_method["accounts"].calls, 3);
    }

    #[tokio::test]
    async fn candle_mismatches_by_count_and_by_value() {
        let mut legacy = MockMarketDataSource::new();
        legacy.expect_candles().times(3).returning(|_, _, _| Ok(vec![candle(0, 5), candle(1, 6)]));
        let mut coordinated = MockMarketDataSource::new();
        let mut answers =
            vec![vec![candle(0, 5), candle(1, 6)], vec![candle(0, 5)], vec![candle(0, 5), candle(1, 7)]]
                .into_iter();
        coordinated.expect_candles().times(3).returning(move |_, _, _| Ok(answers.next().unwrap()));
        let (l, c) = pair(legacy, coordinated);
        let shadow = ShadowSource::new(l, c);
        let range =
            CandleRange::new(datetime!(2024-01-01 00:00 UTC), datetime!(2024-01-01 00:02 UTC)).unwrap();
        for _ in 0..3 {
            let served = shadow.candles(&btc(), Granularity::OneMinute, range).await.unwrap();
            assert_eq!(served, vec![candle(0, 5), candle(1, 6)]);
        }
        shadow.wait_idle().await;
        let s = shadow.stats();
        assert_eq!((s.comparisons, s.mismatches), (3, 2));
        assert_eq!((s.candle_mismatches, s.candle_count_mismatches), (2, 1));
        assert_eq!(s.by_method["candles"].mismatches, 2);
    }

    #[tokio::test]
    async fn batched_tickers_compare_per_product() {
        let eth: ProductId = "ETH-USD".parse().unwrap();
        let mut legacy = MockMarketDataSource::new();
        legacy
            .expect_tickers()
            .times(2)
            .returning(|ps| Ok(ps.iter().map(|p| ticker(p, Decimal::new(10, 0))).collect()));
        let mut coordinated = MockMarketDataSource::new();
        let mut round = 0;
        coordinated.expect_tickers().times(2).returning(move |ps| {
            round += 1;
            // First round: same prices in another order; second: one product missing.
            let mut v: Vec<Ticker> = ps.iter().rev().map(|p| ticker(p, Decimal::new(10, 0))).collect();
            if round == 2 {
                v.pop();
            }
            Ok(v)
        });
        let (l, c) = pair(legacy, coordinated);
        let shadow = ShadowSource::new(l, c);
        for _ in 0..2 {
            assert_eq!(shadow.tickers(&[btc(), eth.clone()]).await.unwrap().len(), 2);
        }
        shadow.wait_idle().await;
        let s = shadow.stats();
        assert_eq!((s.comparisons, s.mismatches), (2, 1));
        assert_eq!(s.ticker_price_samples, 3);
        assert_eq!(s.ticker_price_max_abs_delta, Decimal::ZERO);
    }

    /// A source that sleeps, panics or never answers, for what mocks cannot script.
    struct Scripted {
        delay: Duration,
        behaviour: &'static str,
    }

    #[async_trait]
    impl MarketDataSource for Scripted {
        async fn ticker(&self, product: &ProductId) -> Result<Ticker> {
            tokio::time::sleep(self.delay).await;
            match self.behaviour {
                "panic" => panic!("scripted panic"),
                "hang" => std::future::pending().await,
                _ => Ok(ticker(product, Decimal::new(7, 0))),
            }
        }
        async fn tickers(&self, _: &[ProductId]) -> Result<Vec<Ticker>> {
            unimplemented!()
        }
        async fn candles(&self, _: &ProductId, _: Granularity, _: CandleRange) -> Result<Vec<Candle>> {
            unimplemented!()
        }
        async fn accounts(&self) -> Result<Vec<Account>> {
            unimplemented!()
        }
        async fn validate_trade_balance(&self, _: &str, _: Decimal) -> Result<bool> {
            Ok(self.behaviour == "yes")
        }
    }

    fn scripted(ms: u64, behaviour: &'static str) -> Arc<dyn MarketDataSource> {
        Arc::new(Scripted { delay: Duration::from_millis(ms), behaviour })
    }

    #[tokio::test(start_paused = true)]
    async fn latency_of_each_path_and_a_slow_coordinated_path_does_not_delay_the_answer() {
        let shadow = ShadowSource::new(scripted(10, "ok"), scripted(30, "ok"));
        let t0 = Instant::now();
        shadow.ticker(&btc()).await.unwrap();
        shadow.ticker(&btc()).await.unwrap();
        // Served at the legacy path's pace (paused clock: exact).
        assert_eq!(t0.elapsed(), Duration::from_millis(20));
        shadow.wait_idle().await;
        let s = shadow.stats();
        assert_eq!(s.legacy_latency.calls, 2);
        assert_eq!(s.legacy_latency.total_ms, 20.0);
        assert_eq!(s.legacy_latency.mean_ms, 10.0);
        assert_eq!(s.coordinated_latency.total_ms, 60.0);
        assert_eq!(s.coordinated_latency.mean_ms, 30.0);
        assert_eq!(s.comparisons, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_or_panicking_coordinated_path_is_contained() {
        let hanging = ShadowSource::new(scripted(1, "ok"), scripted(0, "hang"));
        assert_eq!(hanging.ticker(&btc()).await.unwrap().price, Decimal::new(7, 0));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(hanging.stats().in_flight, 1);
        assert_eq!(hanging.stats().comparisons, 0);

        let panicking = ShadowSource::new(scripted(1, "ok"), scripted(0, "panic"));
        assert_eq!(panicking.ticker(&btc()).await.unwrap().price, Decimal::new(7, 0));
        panicking.wait_idle().await;
        let s = panicking.stats();
        assert_eq!((s.coordinated_panics, s.coordinated_errors), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_call_is_counted_as_abandoned() {
        let shadow = ShadowSource::new(scripted(100, "ok"), scripted(1, "ok"));
        let call = tokio::time::timeout(Duration::from_millis(10), shadow.ticker(&btc())).await;
        assert!(call.is_err(), "the legacy path is still running");
        shadow.wait_idle().await;
        let s = shadow.stats();
        assert_eq!((s.abandoned, s.comparisons, s.calls), (1, 0, 1));
    }

    #[tokio::test]
    async fn balance_checks_are_compared() {
        let shadow = ShadowSource::new(scripted(0, "yes"), scripted(0, "no"));
        assert!(shadow.validate_trade_balance("USD", Decimal::ONE).await.unwrap());
        shadow.wait_idle().await;
        let s = shadow.stats();
        assert_eq!(s.by_method["validate_trade_balance"].mismatches, 1);
    }
}
