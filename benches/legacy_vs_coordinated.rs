//! One full tick of 25 bots against the simulated exchange with 30 ms latency (real time), the
//! legacy path against the coordinated one, in the same run. Goal (issue #6): coordinated under
//! 0.05 × legacy.
//!
//! - `legacy_unlimited`: the seed system. Every bot makes its own four calls (ticker, candles,
//!   accounts, balance check), with no client-side limit: 100 requests a tick, most of them
//!   answered 429 by the exchange's 30/s private limit (the bots concerned fail).
//! - `legacy_limited`: the same calls through a shared `RateLimiter`, so every bot succeeds:
//!   the time a legacy tick needs to do its job without 429s.
//! - `coordinated_5min`: a tick as the scheduler sees it every five minutes: tickers and
//!   balances have expired and are fetched again (one `best_bid_ask` call, one `accounts`
//!   call), the candle series are warm (refreshed once an hour).
//! - `coordinated_refresh_ahead`: the five-minute tick driven by a [`TickSchedule`] with
//!   refresh-ahead, timed as the bots see it, from the tick's due time to every decision: the
//!   same two calls are made `LEAD` before the tick (tickers and balances have expired since
//!   the previous tick, as at five-minute ticks), so the tick reads the cache. The time
//!   includes the scheduler's own timer wake-up.
//! - `coordinated_warm`: a tick within the ticker TTL: everything from cache.
//!
//! Ticks that call the exchange are spaced by 100 ms (not timed) so that back-to-back
//! iterations do not run the coordinated client into its own rate limiter, which five-minute
//! ticks never do. The group samples flat (each sample the same number of ticks) because a
//! `legacy_limited` tick takes about four seconds.
#![allow(missing_docs)]

use std::{
    cell::OnceCell,
    sync::Arc,
    time::{Duration, Instant},
};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use tickshare::{
    BatchEvaluator, Bot, CoordinatedSource, DirectSource, MarketDataSource, MigrationFlags, RateLimiter,
    SourceSelector, TickReport, TickSchedule,
    sim::{SimExchange, SimHandle},
};

use tokio::runtime::Runtime;

use crate::support::{current_thread, fleet};

const BOTS: usize = 25;
const LATENCY: Duration = Duration::from_millis(30);
const GAP: Duration = Duration::from_millis(100);
/// Refresh-ahead: ticks every `PERIOD`, prefetched `LEAD` before; tickers and balances live
/// `AHEAD_TTL`, longer than the lead and shorter than the period, so each prefetch fetches
/// them again (as at five-minute ticks) and each tick finds them fresh.
const PERIOD: Duration = Duration::from_millis(250);
const LEAD: Duration = Duration::from_millis(100);
const AHEAD_TTL: Duration = Duration::from_millis(180);

fn refresh_ahead() -> TickSchedule {
    TickSchedule::every(PERIOD).aligned(false).refresh_ahead(LEAD)
}

struct Path {
    name: &'static str,
    evaluator: BatchEvaluator,
}

/// One tick, with the exchange's count of what it cost.
async fn tick(sim: &SimHandle, evaluator: &BatchEvaluator, bots: &[Bot]) -> (Duration, TickReport, u64, u64) {
    sim.reset_stats();
    let t0 = Instant::now();
    let report = evaluator.evaluate_all(bots).await;
    let elapsed = t0.elapsed();
    let s = sim.stats();
    (elapsed, report, s.total_calls, s.rate_limited_429)
}

fn build(sim: &SimExchange) -> tickshare::Result<Vec<Path>> {
    let legacy_over = |client| -> Arc<dyn MarketDataSource> { Arc::new(DirectSource::new(client)) };
    let legacy_only = |legacy: Arc<dyn MarketDataSource>| -> tickshare::Result<BatchEvaluator> {
        // Flags off: every bot takes the legacy path.
        let unused = Arc::new(CoordinatedSource::coinbase(sim.client()?).build()?);
        let selector = SourceSelector::new(legacy, unused, MigrationFlags::default());
        Ok(BatchEvaluator::with_selector(selector).clock(sim.clock()))
    };
    let coordinated = |ttl: Duration| -> tickshare::Result<BatchEvaluator> {
        let source = CoordinatedSource::coinbase(sim.client()?)
            .clock(sim.clock())
            .ticker_ttl(ttl)
            .accounts_ttl(ttl)
            .max_stale(ttl.max(Duration::from_secs(60)))
            .build()?;
        Ok(BatchEvaluator::new(Arc::new(source.clone())).clock(sim.clock()).meter(Arc::new(source)))
    };
    Ok(vec![
        Path {
            name: "legacy_unlimited",
            evaluator: legacy_only(legacy_over(sim.client_builder().unlimited().build()?))?,
        },
        Path {
            name: "legacy_limited",
            evaluator: legacy_only(legacy_over(
                sim.client_builder().rate_limiter(RateLimiter::coinbase()).build()?,
            ))?,
        },
        // Tickers and balances expired at every tick, as at five-minute ticks.
        Path { name: "coordinated_5min", evaluator: coordinated(Duration::from_millis(1))? },
        Path { name: "coordinated_refresh_ahead", evaluator: coordinated(AHEAD_TTL)? },
        Path { name: "coordinated_warm", evaluator: coordinated(Duration::from_secs(3600))? },
    ])
}

struct Setup {
    sim: SimExchange,
    paths: Vec<Path>,
    bots: Vec<Bot>,
}

/// The exchange, the four paths, and the claims, checked once before timing (after one
/// warm-up tick for the coordinated paths, whose candle series are then cached as they are in
/// steady state).
fn setup(rt: &Runtime) -> Setup {
    rt.block_on(async {
        let sim = SimExchange::builder()
            .products(BOTS)
            .latency(LATENCY)
            .start()
            .await
            .unwrap_or_else(|e| panic!("sim: {e}"));
        let bots = fleet(BOTS, &sim.products());
        let paths = build(&sim).unwrap_or_else(|e| panic!("sources: {e}"));
        let handle = sim.handle();
        for p in &paths {
            if p.name.starts_with("coordinated") {
                let (_, r, _, _) = tick(&handle, &p.evaluator, &bots).await;
                assert_eq!(r.errors().count(), 0, "{}: cold tick", p.name);
            }
            // Let the exchange's one-second windows empty between paths.
            tokio::time::sleep(Duration::from_millis(1_100)).await;
            if p.name == "coordinated_refresh_ahead" {
                let mut ticks = p.evaluator.schedule(refresh_ahead()).unwrap_or_else(|e| panic!("{e}"));
                ticks.tick(&bots).await;
                handle.reset_stats();
                let t = ticks.tick(&bots).await;
                let s = handle.stats();
                let prefetch = t.prefetch.as_ref().map(|p| (p.upstream_calls, p.duration));
                eprintln!(
                    "legacy_vs_coordinated: {}: bots waited {:?} after the tick, {} upstream calls \
                     at it; prefetch {prefetch:?} (calls, time) {LEAD:?} ahead; {} answered 429",
                    p.name, t.latency, t.report.upstream_calls, s.rate_limited_429
                );
                assert_eq!(prefetch.map(|p| p.0), Some(2), "the prefetch refreshed tickers and balances");
                assert_eq!((t.report.upstream_calls, s.total_calls, s.rate_limited_429), (0, 2, 0));
                assert_eq!(t.report.errors().count(), 0);
                continue;
            }
            let (t, r, calls, r429) = tick(&handle, &p.evaluator, &bots).await;
            let errors = r.errors().count();
            eprintln!(
                "legacy_vs_coordinated: {}: one tick {t:?}, {calls} upstream calls, {r429} answered 429, \
                 {errors} of {BOTS} bots failed",
                p.name
            );
            match p.name {
                "legacy_unlimited" => assert_eq!(calls, 4 * BOTS as u64),
                "legacy_limited" => assert_eq!((calls, r429, errors), (4 * BOTS as u64, 0, 0)),
                "coordinated_5min" => assert_eq!((calls, r429, errors), (2, 0, 0)),
                _ => assert_eq!((calls, r429, errors), (0, 0, 0)),
            }
        }
        Setup { sim, paths, bots }
    })
}

pub(crate) fn bench(c: &mut Criterion) {
    let rt = current_thread();
    // Lazily: criterion calls a closure only when its id matches the filter.
    let state: OnceCell<Setup> = OnceCell::new();
    let mut g = c.benchmark_group("legacy_vs_coordinated");
    g.sample_size(10).sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Elements(BOTS as u64));
    for (i, name) in [
        "legacy_unlimited",
        "legacy_limited",
        "coordinated_5min",
        "coordinated_refresh_ahead",
        "coordinated_warm",
    ]
    .into_iter()
    .enumerate()
    {
        let gap = if name == "coordinated_warm" { Duration::ZERO } else { GAP };
        g.bench_function(BenchmarkId::new("tick_25_bots_30ms", name), |b| {
            let s = state.get_or_init(|| setup(&rt));
            let (handle, p, bots) = (s.sim.handle(), &s.paths[i], &s.bots);
            assert_eq!(p.name, name);
            if name == "coordinated_refresh_ahead" {
                b.to_async(&rt).iter_custom(|iters| async move {
                    let mut ticks = p.evaluator.schedule(refresh_ahead()).unwrap_or_else(|e| panic!("{e}"));
                    // The first tick is due at once, too late to prefetch: not timed.
                    ticks.tick(bots).await;
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += ticks.tick(bots).await.latency;
                    }
                    total
                });
                return;
            }
            b.to_async(&rt).iter_custom(|iters| {
                let handle = handle.clone();
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        if !gap.is_zero() {
                            tokio::time::sleep(gap).await;
                        }
                        let (t, _, _, _) = tick(&handle, &p.evaluator, bots).await;
                        total += t;
                    }
                    total
                }
            });
        });
    }
    g.finish();
}
