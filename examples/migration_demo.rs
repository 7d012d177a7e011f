//! The main job: migrate 25 trading bots from the legacy path (every bot calls the exchange
//! itself) to the coordinated path (one shared, cached, batched, rate-limited fetch per tick),
//! against the embedded simulated Coinbase exchange, and print what each phase cost.
//!
//! ```text
//! cargo run --example migration_demo                 # table
//! cargo run --example migration_demo -- --json       # one JSON object per phase per line
//! cargo run --example migration_demo -- --bots 100 --products 30 --ticks 24 --latency-ms 50
//! ```
//!
//! Phases: `legacy` (flags off: 4 calls per bot per tick, no client-side limit, as the seed
//! system did), `mixed` (half the bots migrated by percentage rollout; legacy bots draw from
//! the coordinated rate limiter so they cannot cause 429s for everyone), `coordinated` (every
//! bot migrated), `prefetched` (every bot migrated, ticks on a `TickSchedule` that fetches each
//! tick's data 1.5 s before it, so the bots wait for nothing at the tick), `streaming` (every bot migrated, and the coordinated source kept hot by
//! the simulated exchange's WebSocket feed: after a warm-up through the first hourly close,
//! only accounts go to REST). Each phase runs `--ticks` ticks five simulated minutes apart. Time is
//! tokio's paused clock, so an hour of ticks runs in a moment and every figure is
//! reproducible; latencies and tick times are on that simulated clock.
//!
//! Exits non-zero if a fully migrated phase (coordinated, prefetched, streaming) drew any 429
//! from the exchange.

use std::{error::Error, sync::Arc, time::Duration};

use serde_json::json;
use tickshare::{
    BatchEvaluator, Bot, CoordinatedSource, DirectSource, Granularity, MarketDataSource, MarketStream,
    MigrationFlags, MovingAverageCrossover, RateLimiter, RsiThreshold, SourceSelector, Strategy, StreamStats,
    TickSchedule,
    sim::{SimExchange, SimStats, WsConfig},
};

struct Args {
    bots: usize,
    products: usize,
    ticks: usize,
    latency_ms: u64,
    json: bool,
}

fn parse_args() -> Result<Args, Box<dyn Error>> {
    let mut a = Args { bots: 25, products: 25, ticks: 12, latency_ms: 30, json: false };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| -> Result<usize, Box<dyn Error>> {
            let v = it.next().ok_or(format!("{name} needs a value"))?;
            Ok(v.parse::<usize>().map_err(|_| format!("{name}: not a number: {v}"))?)
        };
        match flag.as_str() {
            "--bots" => a.bots = value("--bots")?.max(1),
            "--products" => a.products = value("--products")?.max(1),
            "--ticks" => a.ticks = value("--ticks")?.max(1),
            "--latency-ms" => a.latency_ms = value("--latency-ms")? as u64,
            "--json" => a.json = true,
            "-h" | "--help" => {
                println!(
                    "usage: migration_demo [--bots N] [--products N] [--ticks N] [--latency-ms L] [--json]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}; try --help").into()),
        }
    }
    Ok(a)
}

/// One phase's figures.
struct Phase {
    name: &'static str,
    migrated_percent: u8,
    upstream_calls: u64,
    rate_limited_429: u64,
    hit_rate: f64,
    /// Bot reads answered without an upstream call of their own, after the first (cold) tick.
    warm_read_hit_rate: f64,
    tick_ms: Vec<f64>,
    bot_errors: u64,
    max_in_1s: (u64, u64),
    sim: SimStats,
    stream: Option<StreamStats>,
}

impl Phase {
    fn p50(&self) -> f64 {
        let mut t = self.tick_ms.clone();
        t.sort_by(f64::total_cmp);
        t.get(t.len() / 2).copied().unwrap_or(0.0)
    }
    /// The seed's read hit rate over the phase: bot reads answered without an upstream call of
    /// their own.
    fn read_hit_rate(&self, bot_ticks: u64) -> f64 {
        tickshare::read_hit_rate(bot_ticks * tickshare::READS_PER_BOT, self.upstream_calls)
    }
    /// Bot-ticks that got usable data and decided.
    fn availability(&self, bot_ticks: u64) -> f64 {
        if bot_ticks == 0 { 0.0 } else { bot_ticks.saturating_sub(self.bot_errors) as f64 / bot_ticks as f64 }
    }
    fn max(&self) -> f64 {
        self.tick_ms.iter().copied().fold(0.0, f64::max)
    }
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() -> Result<(), Box<dyn Error>> {
    let args = parse_args()?;
    let wall = std::time::Instant::now();

    // The embedded simulated exchange: Coinbase's limits (10/s public, 30/s private), a
    // latency per request, on this runtime and its paused clock.
    // Its WebSocket side pushes candles every 5 s rather than Coinbase's every second, which
    // keeps the streaming phase quick in debug builds and changes none of its REST counts.
    let sim = SimExchange::builder()
        .products(args.products)
        .latency(Duration::from_millis(args.latency_ms))
        .ws(WsConfig::default().candle_interval(Duration::from_secs(5)))
        .start()
        .await?;
    let products = sim.products();
    let bots: Vec<Bot> = (0..args.bots)
        .map(|i| {
            let strategy: Arc<dyn Strategy> = if i % 2 == 0 {
                Arc::new(MovingAverageCrossover::default())
            } else {
                Arc::new(RsiThreshold::default())
            };
            Bot::new(format!("bot-{i:03}"), products[i % products.len()].clone(), strategy)
                .granularity(Granularity::OneHour)
                .lookback(24)
        })
        .collect();
    let bot_ids: Vec<String> = bots.iter().map(|b| b.id.clone()).collect();

    if !args.json {
        println!(
            "tickshare migration demo: {} bots over {} products, {} ticks of 5 simulated minutes per phase, {} ms exchange latency",
            args.bots,
            products.len(),
            args.ticks,
            args.latency_ms
        );
        println!(
            "simulated exchange at {} (Coinbase limits: 10 req/s public, 30 req/s private)\n",
            sim.base_url()
        );
    }

    let mut phases = Vec::new();
    let mut final_stats = serde_json::Value::Null;
    let mut shadow_stats = serde_json::Value::Null;
    let mut migration_report: Option<tickshare::MigrationReport> = None;
    let phase_names =
        [("legacy", 0u8), ("mixed", 50), ("coordinated", 100), ("prefetched", 100), ("streaming", 100)];
    // The mixed phase's deployment, kept for the coordinated phase: a host migrates by
    // flipping flags on the running selector (`set_flags`, or a hot-reloaded flags file), so
    // the coordinated source's cache carries over, as it would in production.
    let mut deployment: Option<(CoordinatedSource, DirectSource, SourceSelector, BatchEvaluator)> = None;
    for (name, percent) in phase_names {
        let mut flags =
            MigrationFlags { enabled: percent > 0, rollout_percent: percent, ..Default::default() };
        if name == "mixed" {
            // Shadow mode for six of the bots the rollout leaves on legacy (a migrated bot is
            // not shadowed): served by legacy, compared against coordinated, answer by answer
            // and decision by decision.
            flags.shadow_bot_ids = bot_ids
                .iter()
                .filter(|id| tickshare::rollout_bucket(id) >= percent)
                .take(6)
                .cloned()
                .collect();
        }
        let (coordinated, legacy, selector, evaluator) = match deployment.take() {
            Some(d) if name == "coordinated" => {
                // The flip: every bot to the coordinated path, shadowing over.
                d.2.set_flags(flags)?;
                d
            }
            _ => {
                // Otherwise fresh sources, so the phase starts cold like a fresh deployment.
                let limiter = RateLimiter::coinbase();
                let coordinated_client = sim.client_builder().rate_limiter(limiter.clone()).build()?;
                let legacy_client = if name == "mixed" {
                    // During the migration, legacy bots draw from the same budget.
                    sim.client_builder().rate_limiter(limiter.clone()).build()?
                } else {
                    // The seed system: no client-side limit at all.
                    sim.client_builder().unlimited().build()?
                };
                let coordinated =
                    CoordinatedSource::coinbase(coordinated_client).clock(sim.clock()).build()?;
                let legacy = DirectSource::new(legacy_client);
                let selector = SourceSelector::new(
                    Arc::new(legacy.clone()) as Arc<dyn MarketDataSource>,
                    Arc::new(coordinated.clone()) as Arc<dyn MarketDataSource>,
                    flags,
                );
                let evaluator = BatchEvaluator::with_selector(selector.clone())
                    .clock(sim.clock())
                    .meter(Arc::new(coordinated.clone()))
                    .meter(Arc::new(legacy.clone()));
                (coordinated, legacy, selector, evaluator)
            }
        };
        let cache_before = coordinated.stats();

        // The streaming phase: the WebSocket feed keeps the source hot. Warm-up: each series'
        // history once, then through the first hourly close (the feed joined that hour late,
        // so its candle comes from REST once); then only accounts should reach REST.
        let stream = if name == "streaming" {
            let stream = MarketStream::builder(coordinated.clone())
                .url(sim.ws_url())
                .products(products.clone())
                .start()?;
            let warm_until =
                Granularity::OneHour.next_close(sim.clock().now_utc()) + Duration::from_secs(300);
            while sim.clock().now_utc() < warm_until {
                evaluator.evaluate_all(&bots).await;
                tokio::time::sleep(Duration::from_secs(300)).await;
            }
            Some(stream)
        } else {
            None
        };
        sim.reset_stats();
        let phase_start = tokio::time::Instant::now();
        let mut tick_ms = Vec::new();
        let mut bot_errors = 0;
        let (mut warm_reads, mut warm_calls) = (0, 0);
        // Refresh-ahead: long enough for the hourly refresh of the candle series at the
        // private limit (25 series at 30/s take under a second).
        let lead = if name == "prefetched" { Duration::from_millis(1_500) } else { Duration::ZERO };
        // Unaligned: the first tick is due at once, the others five minutes apart.
        let mut schedule = evaluator
            .schedule(TickSchedule::every(Duration::from_secs(300)).aligned(false).refresh_ahead(lead))?;
        for _ in 0..args.ticks {
            // What the bots waited, from the tick's due time to their decisions.
            let tick = schedule.tick(&bots).await;
            tick_ms.push(tick.latency.as_secs_f64() * 1000.0);
            bot_errors += tick.report.errors().count() as u64;
            if tick_ms.len() > 1 {
                warm_reads += tick.report.bot_reads;
                warm_calls += tick.report.upstream_calls;
            }
        }
        // The phase is its ticks' hour: read the exchange's counts when the next tick would be
        // due, so every call (the background refresh after an hourly close included) lands in
        // exactly one phase, and each phase holds exactly one hourly close.
        tokio::time::sleep_until(phase_start + Duration::from_secs(300) * args.ticks as u32).await;
        let s = sim.stats();
        let cs = coordinated.stats();
        let (hits, misses) =
            (cs.cache_hits - cache_before.cache_hits, cs.cache_misses - cache_before.cache_misses);
        phases.push(Phase {
            name,
            migrated_percent: selector.migration_progress(&bot_ids).migration_percentage.round() as u8,
            upstream_calls: s.total_calls,
            rate_limited_429: s.rate_limited_429,
            hit_rate: if hits + misses == 0 { 0.0 } else { hits as f64 / (hits + misses) as f64 },
            warm_read_hit_rate: tickshare::read_hit_rate(warm_reads, warm_calls),
            tick_ms,
            bot_errors,
            max_in_1s: (s.max_requests_in_any_1s.public, s.max_requests_in_any_1s.private),
            sim: s,
            stream: stream.as_ref().map(MarketStream::stats),
        });
        if let Some(stream) = stream {
            stream.shutdown().await;
        }
        if name == "mixed" {
            selector.shadow().wait_idle().await;
            shadow_stats = serde_json::to_value(selector.stats().shadow)?;
            migration_report = Some(selector.shadow().report());
        }
        if name == "coordinated" {
            final_stats = json!({
                "shadow_during_mixed_phase": shadow_stats,
                "migration_report": migration_report,
                "coordinated": cs,
                "legacy": legacy.stats(),
                "migration_progress": selector.migration_progress(&bot_ids),
                "selector": {
                    "routed_legacy": selector.stats().routed_legacy,
                    "routed_coordinated": selector.stats().routed_coordinated,
                    "kill_switch_active": selector.stats().kill_switch_active,
                },
            });
        }
        if name == "mixed" {
            deployment = Some((coordinated, legacy, selector, evaluator));
        }
    }

    if args.json {
        for p in &phases {
            let line = json!({
                "phase": p.name,
                "bots": args.bots,
                "products": products.len(),
                "ticks": args.ticks,
                "migrated_percent": p.migrated_percent,
                "upstream_calls": p.upstream_calls,
                "upstream_calls_per_tick": p.upstream_calls as f64 / args.ticks as f64,
                "rate_limited_429": p.rate_limited_429,
                "cache_key_hit_rate": p.hit_rate,
                "read_hit_rate": p.read_hit_rate(args.bots as u64 * args.ticks as u64),
                "warm_read_hit_rate": p.warm_read_hit_rate,
                "availability": p.availability(args.bots as u64 * args.ticks as u64),
                "tick_ms_p50": p.p50(),
                "tick_ms_max": p.max(),
                "bot_errors": p.bot_errors,
                "max_requests_in_any_1s": {"public": p.max_in_1s.0, "private": p.max_in_1s.1},
                "calls_by_endpoint": p.sim.calls_by_endpoint.iter().filter(|(_, n)| **n > 0).collect::<std::collections::BTreeMap<_, _>>(),
                "stream": p.stream,
            });
            println!("{line}");
        }
    } else {
        println!(
            "{:<12} {:>9} {:>10} {:>10} {:>6} {:>9} {:>9} {:>9} {:>12} {:>12} {:>11} {:>15}",
            "phase",
            "migrated",
            "upstream",
            "per tick",
            "429s",
            "read hit",
            "warm hit",
            "avail",
            "tick p50 ms",
            "tick max ms",
            "bot errors",
            "max req/s pub/priv"
        );
        for p in &phases {
            println!(
                "{:<12} {:>8}% {:>10} {:>10.1} {:>6} {:>8.1}% {:>8.1}% {:>8.1}% {:>12.1} {:>12.1} {:>11} {:>11}/{}",
                p.name,
                p.migrated_percent,
                p.upstream_calls,
                p.upstream_calls as f64 / args.ticks as f64,
                p.rate_limited_429,
                p.read_hit_rate(args.bots as u64 * args.ticks as u64) * 100.0,
                p.warm_read_hit_rate * 100.0,
                p.availability(args.bots as u64 * args.ticks as u64) * 100.0,
                p.p50(),
                p.max(),
                p.bot_errors,
                p.max_in_1s.0,
                p.max_in_1s.1,
            );
        }
        let phase = |n: &str| phases.iter().find(|p| p.name == n);
        if let (Some(l), Some(c)) = (phase("legacy"), phase("coordinated")) {
            println!(
                "\ncoordinated vs legacy: {:.1}x fewer upstream calls, {} vs {} 429s, {} vs {} failed bot evaluations",
                l.upstream_calls as f64 / c.upstream_calls.max(1) as f64,
                c.rate_limited_429,
                l.rate_limited_429,
                c.bot_errors,
                l.bot_errors
            );
        }
        if let Some(r) = &migration_report {
            let gate = tickshare::MigrationGate { min_comparisons: 200, ..Default::default() };
            println!(
                "mixed phase shadow: {} comparisons, {} unexplained mismatches, worst ticker {:.2} bps, worst candle in progress {:.2} bps, closed candles differing {}; safe_to_migrate {}; gate(>= 200 comparisons, 0 unexplained): {:?}",
                r.comparisons,
                r.unexplained_mismatches,
                r.worst_ticker_bps,
                r.worst_in_progress_candle_bps,
                r.closed_candle_mismatches,
                r.safe_to_migrate,
                r.gate(&gate),
            );
            for reason in &r.reasons {
                println!("  - {reason}");
            }
            let strict = tickshare::MigrationGate { min_decision_agreement: 1.0, ..gate };
            println!(
                "decision-level shadow: {} decisions compared over {} bots, agreement {}; gate(+100 % decision agreement): {:?}",
                r.decision_comparisons.unwrap_or(0),
                r.bots.len(),
                r.decision_agreement.map_or("n/a".to_string(), |a| format!("{:.1} %", a * 100.0)),
                r.gate(&strict),
            );
        }
        if let (Some(c), Some(pf)) = (phase("coordinated"), phase("prefetched")) {
            println!(
                "prefetched: bots decided {:.1} ms after a tick at the median (coordinated: {:.1} ms), with {} vs {} upstream calls",
                pf.p50(),
                c.p50(),
                pf.upstream_calls,
                c.upstream_calls
            );
        }
        if let (Some(c), Some(st)) = (phase("coordinated"), phase("streaming")) {
            let hours = args.ticks as f64 / 12.0;
            println!(
                "streaming: {:.1} REST calls per simulated hour after warm-up (coordinated: {:.1}), {} of them for market data; {} reconnects, {} gaps",
                st.upstream_calls as f64 / hours,
                c.upstream_calls as f64 / hours,
                st.upstream_calls - st.sim.calls(tickshare::sim::Endpoint::Accounts),
                st.stream.as_ref().map_or(0, |s| s.reconnects),
                st.stream.as_ref().map_or(0, |s| s.sequence_gaps),
            );
        }
        println!("\nfinal migration stats (what a host serves at /migration/stats):");
        println!("{}", serde_json::to_string_pretty(&final_stats)?);
        println!("\n(real time taken: {:.2} s)", wall.elapsed().as_secs_f64());
    }

    let coordinated_429: u64 =
        phases.iter().filter(|p| p.migrated_percent == 100).map(|p| p.rate_limited_429).sum();
    if coordinated_429 > 0 {
        eprintln!("FAIL: the coordinated phase drew {coordinated_429} 429s from the exchange");
        std::process::exit(1);
    }
    Ok(())
}
