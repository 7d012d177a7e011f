//! [`SourceSelector`]: hands each bot the legacy or the coordinated source under the current
//! [`MigrationFlags`], which can be changed (or killed) while the bots run.
//!
//! The flags live behind an `RwLock<Arc<MigrationFlags>>`: a routing decision clones the
//! `Arc` under a read lock held for a few instructions, and a reload swaps in a new `Arc`. A
//! bot that already holds its source keeps it for the call in progress; its next
//! [`source_for`](SourceSelector::source_for) sees the new flags. So a reload never disturbs
//! an evaluation in flight, and no evaluation sees half-applied flags.

mod shadow;

use std::{
    collections::BTreeSet,
    fmt,
    path::PathBuf,
    sync::{
        Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{task::JoinHandle, time::MissedTickBehavior};

pub use self::shadow::{
    BotAgreement, GateVerdict, MethodShadowStats, MigrationGate, MigrationReport, PathLatency, ShadowSource,
    ShadowStats, ShadowTolerance,
};
use crate::{
    error::Result,
    flags::{MigrationFlags, Route},
    source::MarketDataSource,
    util::inc,
};

/// The shortest polling interval of [`SourceSelector::watch_file`].
const MIN_WATCH_INTERVAL: Duration = Duration::from_millis(1);

/// Routes bots to the legacy or the coordinated [`MarketDataSource`] by their id.
///
/// Cheap to clone; clones share the flags, the sources and the counters.
///
/// Precedence of the flags: see [`MigrationFlags`].
///
/// # Kill switch
/// [`kill_switch`](SourceSelector::kill_switch) sends every bot back to the legacy path at
/// once (the current flags with `enabled = false`) and *latches*: until
/// [`resume`](SourceSelector::resume), flags set by [`set_flags`](SourceSelector::set_flags)
/// or read by [`watch_file`](SourceSelector::watch_file) are stored but applied with
/// `enabled = false`. Someone editing the flags file during an incident cannot undo the
/// switch by accident; `resume` then applies the latest flags as they were set.
///
/// # Example
/// ```
/// # fn f(legacy: tickshare::DirectSource, coordinated: tickshare::CoordinatedSource) -> tickshare::Result<()> {
/// use std::sync::Arc;
/// use tickshare::{MigrationFlags, Route, SourceSelector};
///
/// let selector = SourceSelector::new(Arc::new(legacy), Arc::new(coordinated), MigrationFlags::from_env()?);
/// let source = selector.source_for("bot-7"); // an Arc<dyn MarketDataSource>
///
/// selector.set_flags(MigrationFlags::from_json_str(r#"{"enabled": true, "bot_ids": ["bot-7"]}"#)?)?;
/// assert_eq!(selector.route("bot-7"), Route::Coordinated);
///
/// selector.kill_switch(); // every bot legacy, now
/// assert_eq!(selector.route("bot-7"), Route::Legacy);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SourceSelector {
    inner: Arc<Inner>,
}

struct Inner {
    legacy: Arc<dyn MarketDataSource>,
    coordinated: Arc<dyn MarketDataSource>,
    shadow: Arc<ShadowSource>,
    state: RwLock<State>,
    counters: Counters,
}

/// The flags as last set, the flags in force, and the kill-switch latch. One lock, so a
/// reader never sees one updated without the others.
struct State {
    requested: Arc<MigrationFlags>,
    effective: Arc<MigrationFlags>,
    killed: bool,
}

#[derive(Default)]
struct Counters {
    routed: [AtomicU64; 3],
    flag_updates: AtomicU64,
    file_reloads: AtomicU64,
    file_reload_errors: AtomicU64,
    kill_switch_activations: AtomicU64,
    resumes: AtomicU64,
}

fn route_index(route: Route) -> usize {
    match route {
        Route::Legacy => 0,
        Route::Coordinated => 1,
        Route::Shadow => 2,
    }
}

impl fmt::Debug for SourceSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.read();
        f.debug_struct("SourceSelector")
            .field("flags", &state.effective)
            .field("killed", &state.killed)
            .finish_non_exhaustive()
    }
}

/// Counters of a [`SourceSelector`], exact and monotonic since it was built.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SelectorStats {
    /// Sources handed out for the legacy route.
    pub routed_legacy: u64,
    /// Sources handed out for the coordinated route.
    pub routed_coordinated: u64,
    /// Sources handed out for the shadow route.
    pub routed_shadow: u64,
    /// Flag changes applied by [`SourceSelector::set_flags`] (file reloads included; setting
    /// the flags already in force is not counted).
    pub flag_updates: u64,
    /// Changes read from the watched flags file.
    pub file_reloads: u64,
    /// Watched-file contents that could not be read or were invalid (each distinct content
    /// counted once); the flags in force were kept.
    pub file_reload_errors: u64,
    /// Times the kill switch went from off to on.
    pub kill_switch_activations: u64,
    /// Times [`SourceSelector::resume`] lifted the kill switch.
    pub resumes: u64,
    /// Whether the kill switch is on now.
    pub kill_switch_active: bool,
    /// The shadow comparisons.
    pub shadow: ShadowStats,
}

/// How far a set of bots has moved to the coordinated path under the current flags.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationProgress {
    /// Bots routed to the coordinated path.
    pub bots_migrated: u64,
    /// Bots in shadow mode (served by the legacy path, so not migrated).
    pub bots_in_shadow: u64,
    /// Distinct bots considered.
    pub total_bots: u64,
    /// `100 * bots_migrated / total_bots`, 0 without bots.
    pub migration_percentage: f64,
}

impl SourceSelector {
    /// A selector over the two paths, starting with `flags`.
    ///
    /// `flags` are not rejected here: invalid values are logged and routed sanely (a
    /// percentage above 100 acts as 100). Check them with [`MigrationFlags::validate`] first,
    /// or apply them with [`set_flags`](SourceSelector::set_flags), which refuses them.
    pub fn new(
        legacy: Arc<dyn MarketDataSource>,
        coordinated: Arc<dyn MarketDataSource>,
        flags: MigrationFlags,
    ) -> Self {
        if let Err(e) = flags.validate() {
            tracing::warn!(error = %e, "source selector started with invalid migration flags");
        }
        let flags = Arc::new(flags);
        let shadow = Arc::new(ShadowSource::new(Arc::clone(&legacy), Arc::clone(&coordinated)));
        SourceSelector {
            inner: Arc::new(Inner {
                legacy,
                coordinated,
                shadow,
                state: RwLock::new(State { requested: Arc::clone(&flags), effective: flags, killed: false }),
                counters: Counters::default(),
            }),
        }
    }

    // A poisoned lock only means a panic elsewhere while it was held; every write below
    // replaces whole `Arc`s, so the state is consistent and safe to keep using.
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.inner.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.inner.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The flags in force (with `enabled = false` while the kill switch is on).
    pub fn flags(&self) -> Arc<MigrationFlags> {
        Arc::clone(&self.read().effective)
    }

    /// The route of `bot_id` under the flags in force. Not counted in the stats (use it for
    /// reports); [`source_for`](SourceSelector::source_for) is the counted decision.
    pub fn route(&self, bot_id: &str) -> Route {
        self.flags().route(bot_id)
    }

    /// The source `bot_id` should use now: the legacy source, the coordinated source, or the
    /// shared [`ShadowSource`] (legacy answers, coordinated compared). Counted per route.
    ///
    /// Hold the returned source for one evaluation and ask again for the next, so flag
    /// changes take effect between evaluations and never within one.
    pub fn source_for(&self, bot_id: &str) -> Arc<dyn MarketDataSource> {
        self.resolve(bot_id).1
    }

    /// [`source_for`](SourceSelector::source_for) together with the route it was chosen
    /// for, both from the same flags.
    pub fn resolve(&self, bot_id: &str) -> (Route, Arc<dyn MarketDataSource>) {
        self.source_by_route(self.route(bot_id))
    }

    /// [`resolve`](SourceSelector::resolve) for many bots under one view of the flags, so a
    /// flag change during the call cannot split them between two configurations (what a
    /// [`BatchEvaluator`](crate::BatchEvaluator) does at the start of each tick).
    pub fn resolve_all<'a>(
        &self,
        bot_ids: impl IntoIterator<Item = &'a str>,
    ) -> Vec<(Route, Arc<dyn MarketDataSource>)> {
        let flags = self.flags();
        bot_ids.into_iter().map(|id| self.source_by_route(flags.route(id))).collect()
    }

    /// The coordinated source, without counting a routing decision (for prefetching).
    pub(crate) fn coordinated_source(&self) -> Arc<dyn MarketDataSource> {
        Arc::clone(&self.inner.coordinated)
    }

    fn source_by_route(&self, route: Route) -> (Route, Arc<dyn MarketDataSource>) {
        inc(&self.inner.counters.routed[route_index(route)]);
        let source: Arc<dyn MarketDataSource> = match route {
            Route::Legacy => Arc::clone(&self.inner.legacy),
            Route::Coordinated => Arc::clone(&self.inner.coordinated),
            Route::Shadow => self.inner.shadow.clone(),
        };
        (route, source)
    }

    /// Replace the flags (hot reload). Takes effect for every later routing decision; sources
    /// already handed out are not affected. While the kill switch is on, the flags are stored
    /// and applied with `enabled = false` until [`resume`](SourceSelector::resume).
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) if the flags are invalid
    /// ([`MigrationFlags::validate`]); the flags in force are kept.
    pub fn set_flags(&self, flags: MigrationFlags) -> Result<()> {
        self.replace_flags(flags).map(|_| ())
    }

    /// [`set_flags`](SourceSelector::set_flags), telling whether anything changed.
    fn replace_flags(&self, flags: MigrationFlags) -> Result<bool> {
        flags.validate()?;
        let mut state = self.write();
        if *state.requested == flags {
            return Ok(false);
        }
        let flags = Arc::new(flags);
        let killed = state.killed;
        state.effective = if killed { Arc::new(flags.disabled()) } else { Arc::clone(&flags) };
        state.requested = Arc::clone(&flags);
        drop(state);
        inc(&self.inner.counters.flag_updates);
        if killed {
            tracing::warn!(
                "kill switch is on: new migration flags stored, every bot stays legacy until resume()"
            );
        }
        tracing::info!(
            enabled = flags.enabled,
            bot_ids = flags.bot_ids.len(),
            rollout_percent = flags.rollout_percent,
            shadow_bot_ids = flags.shadow_bot_ids.len(),
            killed,
            "migration flags updated"
        );
        Ok(true)
    }

    /// Send every bot back to the legacy path, now: the flags in force become the current
    /// flags with `enabled = false`, and stay so until [`resume`](SourceSelector::resume)
    /// (see the type docs). Calls already running on the coordinated source finish there.
    /// Idempotent.
    pub fn kill_switch(&self) {
        let mut state = self.write();
        if state.killed {
            return;
        }
        state.killed = true;
        state.effective = Arc::new(state.effective.disabled());
        drop(state);
        inc(&self.inner.counters.kill_switch_activations);
        tracing::warn!("migration kill switch activated: every bot is on the legacy path");
    }

    /// Lift the kill switch and apply the flags last set (by
    /// [`new`](SourceSelector::new), [`set_flags`](SourceSelector::set_flags) or the watched
    /// file). Returns `false`, doing nothing, when the switch was not on.
    pub fn resume(&self) -> bool {
        let mut state = self.write();
        if !state.killed {
            return false;
        }
        state.killed = false;
        state.effective = Arc::clone(&state.requested);
        let enabled = state.effective.enabled;
        drop(state);
        inc(&self.inner.counters.resumes);
        tracing::warn!(enabled, "migration kill switch lifted");
        true
    }

    /// Whether the kill switch is on.
    pub fn is_killed(&self) -> bool {
        self.read().killed
    }

    /// Poll a JSON flags file (see [`MigrationFlags::from_json_str`]) every `interval`, first
    /// at once, and apply its contents whenever they change.
    ///
    /// - Only a *change* of the file's bytes is applied, so flags set in code or the kill
    ///   switch are not overwritten by re-reading an unchanged file.
    /// - A file that cannot be read or holds invalid flags is skipped: the flags in force are
    ///   kept, a warning is logged and [`SelectorStats::file_reload_errors`] counts it (once
    ///   per distinct content). A partly written file is therefore harmless; write the new
    ///   file and rename it over the old one when you can.
    /// - An `interval` below 1 ms is taken as 1 ms.
    ///
    /// The polling task stops when the returned [`FlagsWatcher`] is dropped, or when every
    /// clone of this selector is.
    ///
    /// # Panics
    /// If called outside a tokio runtime (it spawns the polling task).
    pub fn watch_file(&self, path: impl Into<PathBuf>, interval: Duration) -> FlagsWatcher {
        let path = path.into();
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let period = interval.max(MIN_WATCH_INTERVAL);
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            // What the file held at the last poll: its bytes, or the read error's text.
            let mut last: Option<std::result::Result<Vec<u8>, String>> = None;
            loop {
                ticks.tick().await;
                let Some(inner) = weak.upgrade() else {
                    break;
                };
                let selector = SourceSelector { inner };
                // A flags file is a few hundred bytes: a synchronous read is cheaper than a
                // trip to the blocking pool.
                let now = std::fs::read(&path).map_err(|e| e.to_string());
                if last.as_ref() == Some(&now) {
                    continue;
                }
                selector.apply_file(&path, &now);
                last = Some(now);
            }
        });
        FlagsWatcher { task }
    }

    fn apply_file(&self, path: &std::path::Path, content: &std::result::Result<Vec<u8>, String>) {
        let parsed = match content {
            Ok(bytes) => std::str::from_utf8(bytes)
                .map_err(|e| crate::Error::Config(format!("not UTF-8: {e}")))
                .and_then(MigrationFlags::from_json_str),
            Err(e) => Err(crate::Error::Config(format!("cannot read: {e}"))),
        };
        match parsed.and_then(|flags| self.replace_flags(flags)) {
            Ok(true) => inc(&self.inner.counters.file_reloads),
            Ok(false) => {}
            Err(e) => {
                inc(&self.inner.counters.file_reload_errors);
                tracing::warn!(path = %path.display(), error = %e, "migration flags file not applied; keeping the flags in force");
            }
        }
    }

    /// How many of `bot_ids` (duplicates counted once) the current flags route to the
    /// coordinated path. Shadowed bots are served by the legacy path and do not count as
    /// migrated. Not counted in the routing stats.
    pub fn migration_progress(
        &self,
        bot_ids: impl IntoIterator<Item = impl AsRef<str>>,
    ) -> MigrationProgress {
        let flags = self.flags();
        let bots: BTreeSet<String> = bot_ids.into_iter().map(|b| b.as_ref().to_string()).collect();
        let mut progress = MigrationProgress { total_bots: bots.len() as u64, ..Default::default() };
        for bot in &bots {
            match flags.route(bot) {
                Route::Coordinated => progress.bots_migrated += 1,
                Route::Shadow => progress.bots_in_shadow += 1,
                Route::Legacy => {}
            }
        }
        if progress.total_bots > 0 {
            progress.migration_percentage =
                100.0 * progress.bots_migrated as f64 / progress.total_bots as f64;
        }
        progress
    }

    /// The shadow source handed to shadowed bots, for its [`ShadowSource::stats`] and
    /// [`ShadowSource::wait_idle`].
    pub fn shadow(&self) -> &ShadowSource {
        &self.inner.shadow
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SelectorStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SelectorStats {
            routed_legacy: get(&c.routed[route_index(Route::Legacy)]),
            routed_coordinated: get(&c.routed[route_index(Route::Coordinated)]),
            routed_shadow: get(&c.routed[route_index(Route::Shadow)]),
            flag_updates: get(&c.flag_updates),
            file_reloads: get(&c.file_reloads),
            file_reload_errors: get(&c.file_reload_errors),
            kill_switch_activations: get(&c.kill_switch_activations),
            resumes: get(&c.resumes),
            kill_switch_active: self.is_killed(),
            shadow: self.inner.shadow.stats(),
        }
    }
}

/// The polling task of [`SourceSelector::watch_file`]; dropping it stops the polling.
#[must_use = "the flags file is watched only while the FlagsWatcher is alive"]
#[derive(Debug)]
pub struct FlagsWatcher {
    task: JoinHandle<()>,
}

impl FlagsWatcher {
    /// Whether the polling task has ended (every selector clone was dropped).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for FlagsWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        Error, MockMarketDataSource,
        model::{Account, Candle, CandleRange, Granularity, ProductId, Ticker},
    };
    use async_trait::async_trait;
    use rust_decimal::Decimal;
    use time::OffsetDateTime;

    fn btc() -> ProductId {
        "BTC-USD".parse().unwrap()
    }

    fn ticker(product: &ProductId, price: i64) -> Ticker {
        Ticker {
            product: product.clone(),
            price: Decimal::new(price, 0),
            best_bid: None,
            best_ask: None,
            time: OffsetDateTime::UNIX_EPOCH,
            price_kind: crate::model::PriceKind::LastTrade,
        }
    }

    fn flags(enabled: bool, bots: &[&str], percent: u8, shadow: &[&str]) -> MigrationFlags {
        MigrationFlags {
            enabled,
            bot_ids: bots.iter().map(|s| s.to_string()).collect(),
            rollout_percent: percent,
            shadow_bot_ids: shadow.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Answers every ticker with its own price, after yielding so that flags can change
    /// while a call is in flight.
    struct Priced(i64);

    #[async_trait]
    impl MarketDataSource for Priced {
        async fn ticker(&self, product: &ProductId) -> crate::Result<Ticker> {
            tokio::task::yield_now().await;
            Ok(ticker(product, self.0))
        }
        async fn tickers(&self, _: &[ProductId]) -> crate::Result<Vec<Ticker>> {
            Ok(vec![])
        }
        async fn candles(&self, _: &ProductId, _: Granularity, _: CandleRange) -> crate::Result<Vec<Candle>> {
            Ok(vec![])
        }
        async fn accounts(&self) -> crate::Result<Vec<Account>> {
            Ok(vec![])
        }
    }

    const LEGACY: i64 = 1;
    const COORDINATED: i64 = 2;

    fn priced_selector(f: MigrationFlags) -> SourceSelector {
        SourceSelector::new(Arc::new(Priced(LEGACY)), Arc::new(Priced(COORDINATED)), f)
    }

    #[tokio::test]
    async fn routes_calls_to_the_right_mock() {
        let mut legacy = MockMarketDataSource::new();
        legacy.expect_ticker().times(3).returning(|p| Ok(ticker(p, LEGACY)));
        legacy.expect_accounts().times(1).returning(|| Ok(vec![]));
        let mut coordinated = MockMarketDataSource::new();
        coordinated.expect_ticker().times(2).returning(|p| Ok(ticker(p, COORDINATED)));
        coordinated.expect_accounts().never();
        let selector =
            SourceSelector::new(Arc::new(legacy), Arc::new(coordinated), flags(true, &["migrated"], 0, &[]));
        for _ in 0..2 {
            let s = selector.source_for("migrated");
            assert_eq!(s.ticker(&btc()).await.unwrap().price, Decimal::TWO);
        }
        for _ in 0..3 {
            let s = selector.source_for("other");
            assert_eq!(s.ticker(&btc()).await.unwrap().price, Decimal::ONE);
        }
        selector.source_for("other").accounts().await.unwrap();
        let stats = selector.stats();
        assert_eq!((stats.routed_coordinated, stats.routed_legacy), (2, 4));
        assert_eq!(stats.routed_shadow, 0);
    }

    #[tokio::test]
    async fn shadow_route_calls_both_and_serves_legacy() {
        let mut legacy = MockMarketDataSource::new();
        legacy.expect_ticker().times(2).returning(|p| Ok(ticker(p, 100)));
        let mut coordinated = MockMarketDataSource::new();
        let mut first = true;
        coordinated.expect_ticker().times(2).returning(move |p| {
            // First a failure, then a different price.
            if std::mem::take(&mut first) { Err(Error::Timeout) } else { Ok(ticker(p, 103)) }
        });
        let selector =
            SourceSelector::new(Arc::new(legacy), Arc::new(coordinated), flags(true, &[], 0, &["shadowed"]));
        for _ in 0..2 {
            let (route, s) = selector.resolve("shadowed");
            assert_eq!(route, Route::Shadow);
            assert_eq!(s.ticker(&btc()).await.unwrap().price, Decimal::new(100, 0));
        }
        selector.shadow().wait_idle().await;
        let stats = selector.stats();
        assert_eq!(stats.routed_shadow, 2);
        assert_eq!(stats.shadow.coordinated_errors, 1);
        assert_eq!(stats.shadow.mismatches, 1);
        assert_eq!(stats.shadow.ticker_price_max_abs_delta, Decimal::new(3, 0));
        let json = serde_json::to_value(&stats).unwrap();
        assert_eq!(json["shadow"]["ticker_price_max_abs_delta"], "3");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn hot_reload_under_concurrent_evaluation() {
        use std::sync::atomic::{AtomicBool, AtomicUsize};
        const WORKERS: usize = 16;
        const CALLS: usize = 300;
        let selector = priced_selector(flags(true, &[], 50, &["bot-3", "bot-5"]));
        let bots: Vec<String> = (0..20).map(|i| format!("bot-{i}")).collect();
        let done = Arc::new(AtomicUsize::new(0));
        let killed_for_good = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for w in 0..WORKERS {
            let (selector, bots) = (selector.clone(), bots.clone());
            let (done, killed_for_good) = (Arc::clone(&done), Arc::clone(&killed_for_good));
            workers.push(tokio::spawn(async move {
                for i in 0..CALLS {
                    let bot = &bots[(w + i) % bots.len()];
                    let after_kill = killed_for_good.load(Ordering::Acquire);
                    let (route, source) = selector.resolve(bot);
                    if after_kill {
                        assert_eq!(route, Route::Legacy, "{bot} after the kill switch");
                    }
                    // The source obtained serves the whole call, whatever happens to the
                    // flags meanwhile.
                    let price = source.ticker(&btc()).await.unwrap().price;
                    let expected = match route {
                        Route::Coordinated => COORDINATED,
                        Route::Legacy | Route::Shadow => LEGACY,
                    };
                    assert_eq!(price, Decimal::new(expected, 0), "{bot} on {route:?}");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        let flipper = {
            let selector = selector.clone();
            let (done, killed_for_good) = (Arc::clone(&done), Arc::clone(&killed_for_good));
            tokio::spawn(async move {
                let choices = [
                    flags(true, &[], 100, &[]),
                    flags(false, &["bot-1"], 100, &[]),
                    flags(true, &["bot-1", "bot-2"], 0, &["bot-3"]),
                    flags(true, &[], 37, &["bot-4"]),
                ];
                // Flip while the workers run, until half their calls are done.
                let mut i = 0;
                while done.load(Ordering::Relaxed) < WORKERS * CALLS / 2 {
                    selector.set_flags(choices[i % choices.len()].clone()).unwrap();
                    if i % 50 == 49 {
                        selector.kill_switch();
                        selector.resume();
                    }
                    i += 1;
                    tokio::task::yield_now().await;
                }
                selector.kill_switch();
                killed_for_good.store(true, Ordering::Release);
                i / 50
            })
        };
        let kill_resume_cycles = flipper.await.unwrap();
        // Every bot is legacy at once, while the workers still run.
        for bot in &bots {
            assert_eq!(selector.route(bot), Route::Legacy, "{bot}");
            let source = selector.source_for(bot);
            assert_eq!(source.ticker(&btc()).await.unwrap().price, Decimal::new(LEGACY, 0));
        }
        for w in workers {
            w.await.unwrap();
        }
        selector.shadow().wait_idle().await;
        let s = selector.stats();
        assert!(s.kill_switch_active);
        assert_eq!(s.kill_switch_activations as usize, kill_resume_cycles + 1);
        assert_eq!(s.routed_legacy + s.routed_coordinated + s.routed_shadow, (WORKERS * CALLS + 20) as u64);
        assert!(s.routed_coordinated > 0);
        assert_eq!(s.shadow.calls, s.routed_shadow);
        assert!(bots.iter().all(|b| selector.flags().route(b) == Route::Legacy));
    }

    #[test]
    fn kill_switch_latches_until_resume() {
        let selector = priced_selector(flags(true, &["a"], 0, &["b"]));
        assert_eq!(selector.route("a"), Route::Coordinated);
        assert_eq!(selector.route("b"), Route::Shadow);
        selector.kill_switch();
        selector.kill_switch();
        assert!(selector.is_killed());
        assert!(!selector.flags().enabled);
        assert_eq!(selector.flags().bot_ids.len(), 1, "only the switch changes");
        assert_eq!(selector.route("a"), Route::Legacy);
        assert_eq!(selector.route("b"), Route::Legacy, "shadowing stops too");
        // New flags are stored but not applied while killed.
        selector.set_flags(flags(true, &["c"], 0, &[])).unwrap();
        assert_eq!(selector.route("c"), Route::Legacy);
        assert_eq!(selector.flags().bot_ids.iter().next().unwrap(), "c");
        assert!(selector.resume());
        assert!(!selector.resume());
        assert_eq!(selector.route("c"), Route::Coordinated);
        assert_eq!(selector.route("a"), Route::Legacy);
        let s = selector.stats();
        assert_eq!((s.kill_switch_activations, s.resumes, s.flag_updates), (1, 1, 1));
        assert!(!s.kill_switch_active);
    }

    #[test]
    fn set_flags_refuses_invalid_flags_and_keeps_the_old_ones() {
        let selector = priced_selector(flags(true, &["a"], 0, &[]));
        let err = selector.set_flags(flags(true, &[], 101, &[])).unwrap_err();
        assert!(matches!(err, Error::Config(_)));
        let err = selector.set_flags(flags(true, &[""], 0, &[])).unwrap_err();
        assert!(matches!(err, Error::Config(_)));
        assert_eq!(selector.route("a"), Route::Coordinated);
        // Setting the flags in force is not an update.
        selector.set_flags(flags(true, &["a"], 0, &[])).unwrap();
        assert_eq!(selector.stats().flag_updates, 0);
    }

    #[test]
    fn migration_progress_counts_only_coordinated_bots() {
        let selector = priced_selector(flags(true, &["a", "b"], 0, &["b", "c"]));
        let p = selector.migration_progress(["a", "b", "c", "d", "a"]);
        assert_eq!(
            p,
            MigrationProgress {
                bots_migrated: 2,
                bots_in_shadow: 1,
                total_bots: 4,
                migration_percentage: 50.0,
            }
        );
        let owned: Vec<String> = vec!["a".into(), "x".into(), "y".into()];
        let p = selector.migration_progress(&owned);
        assert_eq!((p.bots_migrated, p.total_bots), (1, 3));
        assert!((p.migration_percentage - 100.0 / 3.0).abs() < 1e-9);
        assert_eq!(selector.migration_progress(Vec::<String>::new()), MigrationProgress::default());
        selector.kill_switch();
        assert_eq!(selector.migration_progress(["a", "b"]).bots_migrated, 0);
        // Reports do not count as routing decisions.
        assert_eq!(selector.stats().routed_coordinated, 0);
        // The seed's empty id is not a bot: an empty allowlist migrates nobody.
        let none = priced_selector(MigrationFlags::from_json_str(r#"{"enabled": true}"#).unwrap());
        assert_eq!(none.migration_progress(["a", "b"]).bots_migrated, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn watch_file_applies_changes_keeps_flags_on_bad_files_and_stops() {
        let dir = std::env::temp_dir().join(format!("tickshare-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("flags.json");
        let write = |text: &str| std::fs::write(&path, text).unwrap();
        let step = Duration::from_secs(1);

        write(r#"{"enabled": true, "bot_ids": ["a"]}"#);
        let selector = priced_selector(MigrationFlags::default());
        let watcher = selector.watch_file(&path, step);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(selector.route("a"), Route::Coordinated);
        assert_eq!(selector.stats().file_reloads, 1);

        // Invalid contents: old flags kept, counted once however often they are polled.
        write(r#"{"enabled": true, "bot_ids": ["a"], "rollout_percent": 101}"#);
        tokio::time::sleep(step * 3).await;
        assert_eq!(selector.route("a"), Route::Coordinated);
        assert_eq!(selector.stats().file_reload_errors, 1);
        write("{ half a file");
        tokio::time::sleep(step).await;
        assert_eq!(selector.stats().file_reload_errors, 2);

        // A kill switch is not undone by polling an unchanged file...
        write(r#"{"enabled": true, "bot_ids": ["a"]}"#);
        tokio::time::sleep(step).await;
        assert_eq!(selector.stats().file_reloads, 1, "same flags: not an update");
        selector.kill_switch();
        tokio::time::sleep(step * 2).await;
        assert_eq!(selector.route("a"), Route::Legacy);
        // ...nor by a changed one: stored, applied on resume.
        write(r#"{"enabled": true, "bot_ids": ["b"]}"#);
        tokio::time::sleep(step).await;
        assert_eq!(selector.route("b"), Route::Legacy);
        selector.resume();
        assert_eq!(selector.route("b"), Route::Coordinated);

        // A missing file keeps the flags too.
        std::fs::remove_file(&path).unwrap();
        tokio::time::sleep(step).await;
        assert_eq!(selector.route("b"), Route::Coordinated);
        assert_eq!(selector.stats().file_reload_errors, 3);

        // Dropping the watcher stops the polling.
        drop(watcher);
        write(r#"{"enabled": false}"#);
        tokio::time::sleep(step * 2).await;
        assert_eq!(selector.route("b"), Route::Coordinated);
        let s = selector.stats();
        assert_eq!((s.file_reloads, s.flag_updates), (2, 2));

        // Dropping the selector ends a watcher's task.
        let watcher = selector.watch_file(&path, step);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(selector.route("b"), Route::Legacy);
        drop(selector);
        tokio::time::sleep(step * 2).await;
        assert!(watcher.is_finished());
        std::fs::remove_dir_all(&dir).ok();
    }
}
