//! Run the simulated Coinbase exchange as a standalone server, to point any client at it
//! (your own bot, ccxt with a patched host, curl).
//!
//! ```text
//! cargo run --example sim_exchange -- --port 18080 [--products N] [--latency-ms L] [--seed S]
//! ```
//!
//! It prints `listening on http://127.0.0.1:PORT` once ready and serves until Ctrl-C or
//! SIGTERM. Private endpoints accept any well-formed bearer JWT (no public key is configured).
//! Counters are at `GET /__sim/stats`; `POST /__sim/reset` zeroes them.

use std::{error::Error, io::Write as _, time::Duration};

use tickshare::sim::SimExchange;

/// The command line, parsed by hand.
#[derive(Debug)]
struct Args {
    port: u16,
    products: usize,
    latency_ms: u64,
    seed: u64,
}

const USAGE: &str = "usage: sim_exchange [--port PORT] [--products N] [--latency-ms L] [--seed S]\n\
    defaults: --port 18080 --products 30 --latency-ms 0 --seed 24301";

fn parse_args() -> Result<Args, String> {
    let mut args = Args { port: 18080, products: 30, latency_ms: 0, seed: 0x5EED };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.to_string());
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let bad = |e: std::num::ParseIntError| format!("{flag} {value:?}: {e}\n{USAGE}");
        match flag.as_str() {
            "--port" => args.port = value.parse().map_err(bad)?,
            "--products" => args.products = value.parse().map_err(bad)?,
            "--latency-ms" => args.latency_ms = value.parse().map_err(bad)?,
            "--seed" => args.seed = value.parse().map_err(bad)?,
            _ => return Err(format!("unknown argument {flag:?}\n{USAGE}")),
        }
    }
    Ok(args)
}

/// Resolve on Ctrl-C, or on SIGTERM where there is one.
async fn shutdown_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };

    // The exchange runs on this runtime; it stops when `sim` is shut down or dropped.
    let sim = SimExchange::builder()
        .port(args.port)
        .products(args.products)
        .latency(Duration::from_millis(args.latency_ms))
        .seed(args.seed)
        .start()
        .await?;

    println!("listening on {}", sim.base_url());
    std::io::stdout().flush()?;

    shutdown_signal().await?;
    let stats = sim.stats();
    sim.shutdown().await;
    eprintln!("stopped after {} calls ({} answered 429)", stats.total_calls, stats.rate_limited_429);
    Ok(())
}
