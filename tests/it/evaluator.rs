//! The evaluator and the selector end to end against the simulated exchange: the upstream cost
//! of one tick of 25 bots on each path.

use std::{sync::Arc, time::Duration};

use tickshare::{
    BatchEvaluator, Bot, CoordinatedSource, DirectSource, MarketDataSource, MigrationFlags,
    MovingAverageCrossover, RateLimiter, Route, SourceSelector,
    sim::{SimExchange, SimHandle},
};

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

/// One tick of 25 bots over 25 products under `flags`; returns (calls, 429s, bot errors).
async fn one_tick(flags: MigrationFlags, shared_limiter: bool) -> (u64, u64, usize, Vec<Route>) {
    let sim = SimExchange::builder().products(25).latency(Duration::from_millis(30)).start().await.unwrap();
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
        Arc::new(coordinated) as Arc<dyn MarketDataSource>,
        flags,
    );
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
