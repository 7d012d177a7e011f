//! Evaluate every bot on a fixed interval until Ctrl-C (the seed's Celery beat task, in Rust).
//!
//! ```text
//! cargo run --example scheduler -- --every-secs 5 --ticks 3
//! ```
//!
//! Runs against the simulated exchange in real time. On Ctrl-C (or SIGTERM) the tick in
//! progress finishes, the final stats are printed, and the process exits cleanly. `--ticks N`
//! stops after N ticks (for scripted runs).

use std::{error::Error, sync::Arc, time::Duration};

use tickshare::{BatchEvaluator, Bot, CoordinatedSource, MovingAverageCrossover, sim::SimExchange};
use tokio::time::MissedTickBehavior;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let mut every = Duration::from_secs(5);
    let mut max_ticks: Option<u64> = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--every-secs" => {
                every = Duration::from_secs(it.next().ok_or("--every-secs needs a value")?.parse()?)
            }
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

    let mut interval = tokio::time::interval(every);
    // A slow tick must not cause a burst of catch-up ticks.
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                println!("shutdown requested; stopping after {ticks} ticks");
                break;
            }
            _ = interval.tick() => {
                let report = evaluator.evaluate_all(&bots).await;
                ticks += 1;
                println!(
                    "tick {ticks}: {} bots in {:.1} ms, {} upstream calls, hit rate {:.0} %, outcomes {:?}",
                    report.results.len(),
                    report.duration.as_secs_f64() * 1000.0,
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
