//! Evaluate every bot on a fixed schedule until Ctrl-C (the seed's Celery beat task, in Rust),
//! with refresh-ahead: each tick's data is fetched `--lead-ms` before it, so the bots decide
//! without waiting for the exchange.
//!
//! ```text
//! cargo run --example scheduler -- --every-secs 5 --lead-ms 200 --ticks 3
//! ```
//!
//! Runs against the simulated exchange (30 ms latency) in real time; ticks fall on the wall
//! clock's multiples of the period. On Ctrl-C (or SIGTERM) the wait or the tick in progress is
//! abandoned (cancel safe: fetches already started still fill the cache), the final stats are
//! printed, and the process exits cleanly. `--ticks N` stops after N ticks (for scripted
//! runs); `--lead-ms 0` turns refresh-ahead off, to compare.

use std::{error::Error, sync::Arc, time::Duration};

use tickshare::{
    BatchEvaluator, Bot, CoordinatedSource, MovingAverageCrossover, TickSchedule, sim::SimExchange,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let mut every = Duration::from_secs(5);
    let mut lead = Duration::from_millis(200);
    let mut max_ticks: Option<u64> = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--every-secs" => {
                every = Duration::from_secs(it.next().ok_or("--every-secs needs a value")?.parse()?)
            }
            "--lead-ms" => lead = Duration::from_millis(it.next().ok_or("--lead-ms needs a value")?.parse()?),
            "--ticks" => max_ticks = Some(it.next().ok_or("--ticks needs a value")?.parse()?),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }

    let sim = SimExchange::builder().latency(Duration::from_millis(30)).start().await?;
    let source = CoordinatedSource::coinbase(sim.client()?).build()?;
    let bots: Vec<Bot> = sim
        .products()
        .into_iter()
        .take(10)
        .enumerate()
        .map(|(i, p)| Bot::new(format!("bot-{i}"), p, Arc::new(MovingAverageCrossover::default())))
        .collect();
    let evaluator = BatchEvaluator::new(Arc::new(source.clone())).meter(Arc::new(source.clone()));

    // A tick whose time has passed is run once, at once; older missed ones are skipped.
    let mut schedule = evaluator.schedule(TickSchedule::every(every).refresh_ahead(lead))?;
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                println!("shutdown requested; stopping after {ticks} ticks");
                break;
            }
            tick = schedule.tick(&bots) => {
                ticks += 1;
                let prefetch = tick.prefetch.as_ref().map_or_else(
                    || "no prefetch".to_string(),
                    |p| format!("prefetch {} calls in {:.1} ms", p.upstream_calls, p.duration.as_secs_f64() * 1000.0),
                );
                let report = &tick.report;
                println!(
                    "tick {ticks} due {}: {prefetch}; {} bots decided {:.2} ms after the tick, {} upstream calls at it, \
                     hit rate {:.0} %, outcomes {:?}",
                    tick.due,
                    report.results.len(),
                    tick.latency.as_secs_f64() * 1000.0,
                    report.upstream_calls,
                    report.cache_hit_rate * 100.0,
                    report.outcomes
                );
                if max_ticks.is_some_and(|m| ticks >= m) {
                    break;
                }
            }
        }
    }
    println!("final stats: {}", serde_json::to_string(&source.stats())?);
    sim.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
