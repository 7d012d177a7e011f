//! The evaluator and the selector end to end against the simulated exchange: the upstream cost
//! of one tick of 25 bots on each path.

use std::{sync::Arc, time::Duration};

use tickshare::{
    BatchEvaluator, Bot, CoordinatedSource, DirectSource, MarketDataSource, MigrationFlags,
    MovingAverageCrossover, RateLimiter, Route, SourceSelector, TickSchedule,
    sim::{SimExchange, SimHandle},
};
use time::macros::datetime;

use crate::support::fixed_clock;

fn bots(sim: &SimHandle, n: usize) -> Vec<Bot> {
    let products = sim.products();
    (0..n)
        .map(|i| {
            Bot::new(
                format!("bot-{i:03}"),
                products[i % products.len()].clone(),
                Arc::new(MovingAverageCrossover::default()),
            )
        })
        .collect()
}

/// An exchange on the fixed clock (09:56:38) with `products` products and `latency`, a
/// coordinated source over it, an evaluator metering that source, and one bot per product.
async fn coordinated_fleet(
    products: usize,
    latency: Duration,
) -> (SimExchange, CoordinatedSource, BatchEvaluator, Vec<Bot>) {
    let sim = SimExchange::builder()
        .products(products)
        .latency(latency)
        .clock(fixed_clock())
        .start()
        .await
        .unwrap();
    let source = CoordinatedSource::coinbase(sim.client().unwrap()).clock(sim.clock()).build().unwrap();
    let eval =
        BatchEvaluator::new(Arc::new(source.clone())).clock(sim.clock()).meter(Arc::new(source.clone()));
    let bots = bots(&sim.handle(), products);
    (sim, source, eval, bots)
}

/// A selector over a coordinated source and a legacy `DirectSource` on `sim`; the legacy client
/// shares the coordinated rate limiter when `shared_limiter`, else it has none (the seed).
fn migration(
    sim: &SimExchange,
    flags: MigrationFlags,
    shared_limiter: bool,
) -> (SourceSelector, CoordinatedSource) {
    let limiter = RateLimiter::coinbase();
    let coordinated =
        CoordinatedSource::coinbase(sim.client_builder().rate_limiter(limiter.clone()).build().unwrap())
            .clock(sim.clock())
            .build()
            .unwrap();
    let legacy_client = if shared_limiter {
        sim.client_builder().rate_limiter(limiter)
    } else {
        sim.client_builder().unlimited()
    };
    let legacy = DirectSource::new(legacy_client.build().unwrap());
    let selector = SourceSelector::new(
        Arc::new(legacy) as Arc<dyn MarketDataSource>,
        Arc::new(coordinated.clone()) as Arc<dyn MarketDataSource>,
        flags,
    );
    (selector, coordinated)
}

/// One tick of 25 bots over 25 products under `flags`; returns (calls, 429s, bot errors).
async fn one_tick(flags: MigrationFlags, shared_limiter: bool) -> (u64, u64, usize, Vec<Route>) {
    let sim = SimExchange::builder().products(25).latency(Duration::from_millis(30)).start().await.unwrap();
    let (selector, _) = migration(&sim, flags, shared_limiter);
    let eval = BatchEvaluator::with_selector(selector).clock(sim.clock());
    let report = eval.evaluate_all(&bots(&sim, 25)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = sim.stats();
    (
        s.total_calls,
        s.rate_limited_429,
        report.errors().count(),
        report.results.iter().map(|r| r.route).collect(),
    )
}

#[tokio::test(start_paused = true)]
async fn legacy_coordinated_and_mixed_ticks() {
    let (legacy_calls, legacy_429, _, routes) = one_tick(MigrationFlags::default(), false).await;
    assert!(routes.iter().all(|r| *r == Route::Legacy));
    assert!(legacy_calls >= 100, "legacy tick made {legacy_calls} calls");
    assert!(legacy_429 > 0, "100 unthrottled calls at once exceed 30/s");

    let all = MigrationFlags { enabled: true, rollout_percent: 100, ..Default::default() };
    let (coord_calls, coord_429, coord_errors, routes) = one_tick(all, false).await;
    assert!(routes.iter().all(|r| *r == Route::Coordinated));
    assert!(coord_calls <= 27, "coordinated tick made {coord_calls} calls");
    assert_eq!((coord_429, coord_errors), (0, 0));

    let half = MigrationFlags { enabled: true, rollout_percent: 50, ..Default::default() };
    let (mixed_calls, mixed_429, mixed_errors, routes) = one_tick(half, true).await;
    let migrated = routes.iter().filter(|r| **r == Route::Coordinated).count();
    assert!(migrated > 0 && migrated < 25, "{migrated}");
    assert!(mixed_calls > coord_calls && mixed_calls < legacy_calls, "{mixed_calls}");
    assert_eq!((mixed_429, mixed_errors), (0, 0), "legacy bots drew from the shared limiter");
}

#[tokio::test(start_paused = true)]
async fn warm_coordinated_ticks_cost_two_calls() {
    let sim = SimExchange::builder().products(25).start().await.unwrap();
    let source = CoordinatedSource::coinbase(sim.client().unwrap()).clock(sim.clock()).build().unwrap();
    let eval =
        BatchEvaluator::new(Arc::new(source.clone())).clock(sim.clock()).meter(Arc::new(source.clone()));
    let bots = bots(&sim, 25);
    let first = eval.evaluate_all(&bots).await;
    assert_eq!(first.upstream_calls, 27);
    // Five minutes later (same hour): one batched ticker call and one accounts call.
    tokio::time::sleep(Duration::from_secs(300)).await;
    let clock = sim.clock();
    let next = eval.evaluate_all(&bots).await;
    if clock.now_utc().minute() >= 5 {
        assert_eq!(next.upstream_calls, 2, "{:?}", source.stats().upstream_calls_by_endpoint);
    }
    assert_eq!(next.errors().count(), 0);
}

/// Flags flipping and the kill switch while ticks run: no panic, no failed bot, and every
/// tick's routes come from one configuration (all legacy or all coordinated, never split).
#[tokio::test(start_paused = true)]
async fn hot_reload_under_concurrent_evaluation() {
    let sim = SimExchange::builder().products(10).start().await.unwrap();
    let client = sim.client().unwrap();
    let limiter = client.rate_limiter().cloned().unwrap();
    let coordinated = CoordinatedSource::coinbase(client).clock(sim.clock()).build().unwrap();
    let legacy = DirectSource::new(sim.client_builder().rate_limiter(limiter).build().unwrap());
    let selector = SourceSelector::new(
        Arc::new(legacy) as Arc<dyn MarketDataSource>,
        Arc::new(coordinated) as Arc<dyn MarketDataSource>,
        MigrationFlags::default(),
    );
    let bots = Arc::new(bots(&sim, 10));
    let mut loops = Vec::new();
    for _ in 0..4 {
        let (selector, bots, clock) = (selector.clone(), bots.clone(), sim.clock());
        loops.push(tokio::spawn(async move {
            let eval = BatchEvaluator::with_selector(selector).clock(clock);
            let mut splits = 0;
            for _ in 0..6 {
                let r = eval.evaluate_all(&bots).await;
                assert_eq!(r.errors().count(), 0, "{:?}", r.errors().next());
                let first = r.results[0].route;
                splits += usize::from(r.results.iter().any(|b| b.route != first));
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            splits
        }));
    }
    let flipper = tokio::spawn({
        let selector = selector.clone();
        async move {
            for i in 0..12 {
                let pct = if i % 2 == 0 { 100 } else { 0 };
                selector
                    .set_flags(MigrationFlags { enabled: true, rollout_percent: pct, ..Default::default() })
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(700)).await;
                if i == 9 {
                    selector.kill_switch();
                }
            }
        }
    });
    flipper.await.unwrap();
    for l in loops {
        assert_eq!(l.await.unwrap(), 0, "a tick was split between two flag configurations");
    }
    assert!(selector.is_killed());
    assert!(bots.iter().all(|b| selector.route(&b.id) == Route::Legacy));
}

/// Refresh-ahead on five-minute ticks at 30 ms latency: the snapshot is fetched 1.5 s before
/// each tick, so every tick reads only the cache and its bots wait for nothing; an overrun
/// runs the latest due tick at once and skips the older ones.
#[tokio::test(start_paused = true)]
async fn refresh_ahead_ticks_read_the_cache() {
    let (sim, _, eval, bots) = coordinated_fleet(25, Duration::from_millis(30)).await;
    // Long enough for the hourly candle refresh of 25 series at the private limit (30/s).
    let lead = Duration::from_millis(1500);
    let mut ticks = eval.schedule(TickSchedule::every(Duration::from_secs(300)).refresh_ahead(lead)).unwrap();

    // A cold tick at 09:56:38 fills the cache. Then every tick is prefetched 1.5 s ahead and
    // makes no call itself: at 10:00 the tickers and balances (expired since 09:56) are
    // refreshed ahead, and the hourly candles are served within the close's grace, their 09:00
    // candle marked provisional. From 10:00:00.5 the source refreshes each series in the
    // background (`AfterClose::ServeLastKnown`: one incremental call per product), so the
    // 10:05 window holds those 25 calls besides the prefetch's 2.
    assert_eq!(eval.evaluate_all(&bots).await.upstream_calls, 27);
    for (due, calls, window, provisional) in [
        (datetime!(2024-04-24 10:00:00 UTC), 2, 2, 25),
        (datetime!(2024-04-24 10:05:00 UTC), 2, 27, 0),
        (datetime!(2024-04-24 10:10:00 UTC), 2, 2, 0),
    ] {
        sim.reset_stats();
        let t = ticks.tick(&bots).await;
        assert_eq!((t.due, t.missed), (due, 0));
        let p = t.prefetch.as_ref().expect("prefetched");
        assert_eq!(p.started_at, due - lead);
        assert_eq!((p.bots, p.upstream_calls, p.failed_reads), (25, calls, 0), "{due}");
        assert!(p.duration >= Duration::from_millis(30), "one round trip at least: {:?}", p.duration);
        assert!(p.duration < lead, "{due}: {:?}", p.duration);
        assert_eq!(t.report.upstream_calls, 0, "{due}");
        assert_eq!(t.report.cache_hit_rate, 1.0);
        assert_eq!(t.report.errors().count(), 0);
        assert_eq!(t.latency, Duration::ZERO, "{due}: the bots waited for nothing");
        assert_eq!(t.report.provisional_series, provisional, "{due}");
        assert_eq!(sim.stats().total_calls, window, "{:?}", sim.stats().calls_by_endpoint);
    }

    // The caller overran past 10:15: that tick runs at once (late, without prefetch) and
    // 10:10's successor at 10:15 is not run twice.
    tokio::time::sleep_until(sim.clock().instant_at(datetime!(2024-04-24 10:16:00 UTC))).await;
    let late = ticks.tick(&bots).await;
    assert_eq!((late.due, late.missed), (datetime!(2024-04-24 10:15:00 UTC), 0));
    assert!(late.prefetch.is_none());
    assert!(late.latency >= Duration::from_secs(60), "{:?}", late.latency);
    tokio::time::sleep_until(sim.clock().instant_at(datetime!(2024-04-24 10:31:00 UTC))).await;
    let skipped = ticks.tick(&bots).await;
    assert_eq!((skipped.due, skipped.missed), (datetime!(2024-04-24 10:30:00 UTC), 2));
    let next = ticks.tick(&bots).await;
    assert_eq!(next.due, datetime!(2024-04-24 10:35:00 UTC));
    assert!(next.prefetch.is_some());
    assert_eq!(next.report.upstream_calls, 0);
    assert_eq!(sim.stats().rate_limited_429, 0);
}

/// Under a selector only the migrated bots are prefetched; legacy bots still make their own
/// four calls at the tick.
#[tokio::test(start_paused = true)]
async fn refresh_ahead_prefetches_the_migrated_bots_only() {
    let sim = SimExchange::builder().products(25).clock(fixed_clock()).start().await.unwrap();
    let half = MigrationFlags { enabled: true, rollout_percent: 50, ..Default::default() };
    let (selector, coordinated) = migration(&sim, half, true);
    let eval =
        BatchEvaluator::with_selector(selector.clone()).clock(sim.clock()).meter(Arc::new(coordinated));
    let bots = bots(&sim.handle(), 25);
    let migrated = bots.iter().filter(|b| selector.route(&b.id) == Route::Coordinated).count();
    assert!(migrated > 0 && migrated < 25, "{migrated}");

    let routed_before = selector.stats().routed_coordinated;
    let p = eval.prefetch(&bots, Duration::from_secs(1)).await;
    assert_eq!(p.bots, migrated);
    assert_eq!(selector.stats().routed_coordinated, routed_before, "prefetching routes nobody");
    let legacy_bots = (25 - migrated) as u64;
    sim.reset_stats();
    let report = eval.evaluate_all(&bots).await;
    assert_eq!(report.errors().count(), 0);
    assert_eq!(report.upstream_calls, 0, "the coordinated source made no call at the tick");
    assert_eq!(sim.stats().total_calls, 4 * legacy_bots, "legacy bots fetch their own data");
}

/// Ticks as often as the ticker TTL (5 s): data fetched by one prefetch is still fresh at the
/// next prefetch but would expire before its tick, so the prefetch fetches it again (it keeps
/// it fresh for twice the lead) and no tick waits. Over a `DirectSource` there is no cache to
/// warm: the prefetch makes no call and says so.
#[tokio::test(start_paused = true)]
async fn refresh_ahead_when_the_period_equals_the_ttl_and_over_a_direct_source() {
    let (sim, source, eval, bots) = coordinated_fleet(5, Duration::from_millis(30)).await;
    assert_eq!(source.config().ticker_ttl, Duration::from_secs(5));
    let schedule = TickSchedule::every(Duration::from_secs(5)).refresh_ahead(Duration::from_millis(200));
    let mut ticks = eval.schedule(schedule).unwrap();
    ticks.tick(&bots).await;
    for _ in 0..24 {
        let t = ticks.tick(&bots).await;
        let p = t.prefetch.as_ref().expect("prefetched");
        assert!(p.supported);
        assert!(p.upstream_calls >= 1, "tickers refreshed ahead: {p:?}");
        assert_eq!(t.report.upstream_calls, 0, "{}: the tick waited for the exchange", t.due);
        assert_eq!(t.latency, Duration::ZERO);
    }

    let direct = BatchEvaluator::new(Arc::new(DirectSource::new(sim.client().unwrap()))).clock(sim.clock());
    sim.reset_stats();
    let p = direct.prefetch(&bots, Duration::from_secs(1)).await;
    assert_eq!((p.supported, p.bots, p.failed_reads), (false, 0, 0));
    assert_eq!(sim.stats().total_calls, 0);
}

/// `TickLoop::tick` is cancel safe: dropped while it waits (as `tokio::select!` with a shutdown
/// signal does), the next call waits for the same tick; a bad schedule is a typed error.
#[tokio::test(start_paused = true)]
async fn tick_loop_cancel_safety_and_validation() {
    let (sim, _, eval, bots) = coordinated_fleet(3, Duration::ZERO).await;
    let five = Duration::from_secs(300);
    assert!(matches!(
        eval.schedule(TickSchedule::every(five).refresh_ahead(five)),
        Err(tickshare::Error::Config(_))
    ));
    assert!(matches!(eval.schedule(TickSchedule::every(Duration::ZERO)), Err(tickshare::Error::Config(_))));

    let mut ticks = eval.schedule(TickSchedule::every(five).refresh_ahead(Duration::from_secs(1))).unwrap();
    // 09:56:38: the 10:00 tick is 3 min 22 s away; give up after one minute, and again inside
    // the prefetch window.
    assert!(tokio::time::timeout(Duration::from_secs(60), ticks.tick(&bots)).await.is_err());
    tokio::time::sleep_until(sim.clock().instant_at(datetime!(2024-04-24 09:59:59.5 UTC))).await;
    assert!(tokio::time::timeout(Duration::from_millis(1), ticks.tick(&bots)).await.is_err());
    let t = ticks.tick(&bots).await;
    assert_eq!((t.due, t.missed), (datetime!(2024-04-24 10:00:00 UTC), 0));
    // Called within the lead, the loop prefetched at once.
    let p = t.prefetch.as_ref().expect("prefetched");
    assert_eq!(p.started_at, datetime!(2024-04-24 09:59:59.501 UTC));
    assert_eq!(t.report.errors().count(), 0);
    let next = ticks.tick(&bots).await;
    assert_eq!(next.due, datetime!(2024-04-24 10:05:00 UTC));
    assert!(next.prefetch.is_some());
}

/// With ticks three seconds past the grid, the series refreshed in the background from the
/// close's grace on (`AfterClose::ServeLastKnown`) are exact again by the tick: the bots read
/// the closed hour at that tick (not at the next one) and still wait for nothing.
#[tokio::test(start_paused = true)]
async fn an_offset_grid_reads_the_closed_candle_at_the_hour() {
    let (sim, source, eval, bots) = coordinated_fleet(25, Duration::from_millis(30)).await;
    let schedule = TickSchedule::every(Duration::from_secs(300))
        .offset(Duration::from_secs(3))
        .refresh_ahead(Duration::from_millis(1_500));
    let mut ticks = eval.schedule(schedule).unwrap();
    assert_eq!(eval.evaluate_all(&bots).await.upstream_calls, 27, "cold at 09:56:38");
    let hour = ticks.tick(&bots).await;
    assert_eq!(hour.due, datetime!(2024-04-24 10:00:03 UTC));
    let p = hour.prefetch.as_ref().expect("prefetched");
    // The prefetch's tickers and accounts, plus whichever background refreshes landed during it.
    assert!(p.upstream_calls >= 2 && p.failed_reads == 0, "{p:?}");
    assert_eq!((hour.report.upstream_calls, hour.latency), (0, Duration::ZERO));
    assert_eq!(hour.report.provisional_series, 0, "every series was exact again by 10:00:03");
    let refreshed = source.stats().close_refresh;
    assert_eq!((refreshed.refreshed, refreshed.failed, refreshed.pending), (25, 0, 0));
    assert_eq!(refreshed.scheduled, 25, "read again at 10:00:03: queued for the 11:00 close");
    assert_eq!(sim.stats().calls(tickshare::sim::Endpoint::Candles), 50, "25 cold, 25 final 09:00 candles");
    // The series read at 10:00:03 held the 09:00 candle as the exchange closed it.
    let product = &bots[0].product;
    let range =
        tickshare::CandleRange::lookback(tickshare::Granularity::OneHour, 2, sim.clock().now_utc()).unwrap();
    let cached = source
        .candles_with(product, tickshare::Granularity::OneHour, range, Default::default())
        .await
        .unwrap();
    assert_eq!(cached.origin, tickshare::Origin::Cache);
    let nine =
        cached.value.iter().find(|c| c.start == datetime!(2024-04-24 09:00:00 UTC)).expect("09:00 candle");
    let closed = sim
        .handle()
        .candle_at(product, tickshare::Granularity::OneHour, datetime!(2024-04-24 09:00:00 UTC))
        .expect("sim candle");
    assert_eq!(nine, &closed);

    let next = ticks.tick(&bots).await;
    assert_eq!(next.due, datetime!(2024-04-24 10:05:03 UTC));
    assert_eq!(next.prefetch.as_ref().map(|p| p.upstream_calls), Some(2));
    assert_eq!((next.report.upstream_calls, next.latency), (0, Duration::ZERO));
}

/// Decision-level shadow: every shadowed bot's strategy also runs on the coordinated answers
/// each tick, and the report counts, per bot, how often both gave the same signal.
#[tokio::test(start_paused = true)]
async fn shadowed_bots_decisions_are_compared_on_both_paths() {
    let sim = SimExchange::builder().products(5).clock(fixed_clock()).start().await.unwrap();
    let fleet = bots(&sim.handle(), 5);
    let flags = MigrationFlags {
        enabled: true,
        shadow_bot_ids: fleet[..3].iter().map(|b| b.id.clone()).collect(),
        ..MigrationFlags::default()
    };
    let (selector, _) = migration(&sim, flags, true);
    let eval = BatchEvaluator::with_selector(selector.clone()).clock(sim.clock());
    for _ in 0..4 {
        let report = eval.evaluate_all(&fleet).await;
        assert_eq!(report.errors().count(), 0);
        tokio::time::sleep(Duration::from_secs(300)).await;
    }
    selector.shadow().wait_idle().await;
    let r = selector.shadow().report();
    assert_eq!(r.decision_comparisons, Some(12), "3 shadowed bots × 4 ticks");
    assert_eq!(r.decision_agreement, Some(1.0));
    assert_eq!(r.bots.len(), 3);
    assert!(r.bots.values().all(|b| (b.decisions, b.agreed) == (4, 4)), "{:?}", r.bots);
    let strict =
        tickshare::MigrationGate { min_comparisons: 1, min_decision_agreement: 1.0, ..Default::default() };
    assert_eq!(r.gate(&strict), tickshare::GateVerdict::Proceed, "{r:?}");
}

/// The seed's KPIs in every tick report: 4 data reads per bot, the share answered without an
/// upstream call of their own, and the bots that got usable data.
#[tokio::test(start_paused = true)]
async fn tick_reports_carry_the_seeds_read_hit_rate_and_availability() {
    let (sim, _source, eval, bots) = coordinated_fleet(25, Duration::ZERO).await;
    let cold = eval.evaluate_all(&bots).await;
    assert_eq!(cold.bot_reads, 100);
    assert_eq!(cold.read_hit_rate, 1.0 - cold.upstream_calls as f64 / 100.0);
    assert_eq!(cold.availability, 1.0);
    // A minute later, within the hour (the fixed clock starts at 09:56:38): tickers and
    // accounts only.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let warm = eval.evaluate_all(&bots).await;
    assert!(warm.upstream_calls <= 3, "{}", warm.upstream_calls);
    assert!(warm.read_hit_rate >= 0.97, "{}", warm.read_hit_rate);
    // A bot on a product the exchange does not list: its tick is unavailable.
    let mut more = bots.clone();
    more.push(Bot::new("ghost", "NOPE-USD".parse().unwrap(), Arc::new(MovingAverageCrossover::default())));
    let r = eval.evaluate_all(&more).await;
    assert_eq!(r.bot_reads, 104);
    assert_eq!(r.availability, 25.0 / 26.0);
    drop(sim);
}

/// A strategy that records what it was shown: the marks and the last candle's close.
#[derive(Debug, Default)]
struct Recorder(
    std::sync::Mutex<Vec<(tickshare::CandleMarks, rust_decimal::Decimal, rust_decimal::Decimal)>>,
);

impl tickshare::Strategy for Recorder {
    fn name(&self) -> &str {
        "recorder"
    }

    fn evaluate(&self, view: &tickshare::MarketView<'_>) -> tickshare::Decision {
        let close = view.candles.last().map(|c| c.close).unwrap_or_default();
        self.0.lock().unwrap().push((view.marks, close, view.ticker.price));
        tickshare::Decision::hold("recorded")
    }
}

impl Recorder {
    fn take(&self) -> Vec<(tickshare::CandleMarks, rust_decimal::Decimal, rust_decimal::Decimal)> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// Issue 14: a strategy run by the evaluator sees how exact its last candles are — an exact
/// candle in progress after a fetch, a patched one once a newer last trade moved it, and a
/// provisional closed candle between a close and its refresh — on both paths.
#[tokio::test(start_paused = true)]
async fn strategies_see_how_exact_their_last_candles_are() {
    use tickshare::{CandleFidelity, Granularity};
    let clock = fixed_clock(); // 09:56:38
    let sim = SimExchange::builder().products(2).clock(clock).start().await.unwrap();
    let source = CoordinatedSource::coinbase(sim.client().unwrap()).clock(clock).build().unwrap();
    let recorder = Arc::new(Recorder::default());
    let bots: Vec<Bot> = sim
        .products()
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            Bot::new(format!("bot-{i}"), p, Arc::clone(&recorder) as Arc<dyn tickshare::Strategy>)
                .granularity(Granularity::OneHour)
                .lookback(24)
        })
        .collect();
    let eval = BatchEvaluator::new(Arc::new(source.clone())).clock(clock);

    // Fetched at the tick: exact as of now.
    assert_eq!(eval.evaluate_all(&bots).await.errors().count(), 0);
    for (m, _, _) in recorder.take() {
        let p = m.in_progress.expect("a coordinated read tracks its candle in progress");
        assert_eq!(p.fidelity, CandleFidelity::Exact);
        assert_eq!(p.start, datetime!(2024-04-24 09:00 UTC));
        assert!(m.provisional.is_none() && m.is_exact(), "{m:?}");
    }

    // A minute later the tick's fresh tickers move the cached candle: patched, and its close
    // is the price the strategy was given.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(eval.evaluate_all(&bots).await.errors().count(), 0);
    for (m, close, price) in recorder.take() {
        let p = m.in_progress.unwrap();
        assert_eq!(p.fidelity, CandleFidelity::Patched, "{m:?}");
        assert!(!m.is_exact());
        assert_eq!(close, price);
    }

    // Just after the 10:00 close, before the background refresh: the 09:00 candle is served
    // as last known and marked provisional.
    tokio::time::sleep_until(clock.instant_at(datetime!(2024-04-24 10:00:00.1 UTC))).await;
    assert_eq!(eval.evaluate_all(&bots).await.errors().count(), 0);
    for (m, _, _) in recorder.take() {
        let p = m.provisional.expect("the just-closed candle is provisional");
        assert_eq!(p.start, datetime!(2024-04-24 09:00 UTC));
        assert!(!m.is_exact());
    }

    // Once the refresh has landed: exact again, now with the 10:00 candle in progress.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(eval.evaluate_all(&bots).await.errors().count(), 0);
    for (m, _, _) in recorder.take() {
        assert!(m.provisional.is_none(), "{m:?}");
        assert_eq!(m.in_progress.unwrap().start, datetime!(2024-04-24 10:00 UTC));
    }

    // The legacy path: the exchange's own answer, exact as of the fetch.
    let legacy = BatchEvaluator::new(Arc::new(DirectSource::new(sim.client().unwrap()))).clock(clock);
    assert_eq!(legacy.evaluate_all(&bots).await.errors().count(), 0);
    for (m, _, _) in recorder.take() {
        assert!(m.is_exact(), "{m:?}");
        assert!(m.provisional.is_none());
    }
}
