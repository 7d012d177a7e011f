//! Many worker processes on one API key acting as one client, through a [`SharedTier`] on
//! Redis: K processes run the same 25 bots against one simulated exchange, and together they
//! cost the exchange what one process costs, never exceeding its rate limit.
//!
//! ```text
//! cargo run --example multi_worker                      # 4 workers, a table
//! cargo run --example multi_worker -- --workers 8 --json
//! cargo run --example multi_worker -- --redis-url redis://127.0.0.1:6379/
//! ```
//!
//! The parent starts the simulated exchange on its own runtime and, unless `--redis-url` is
//! given, a throwaway `redis-server` on a free loopback port (`--save '' --appendonly no`,
//! killed at the end; `apt-get install redis-server` provides it). It then runs the workload
//! twice: once with a single worker process (the baseline), then with `--workers` processes at
//! once, each in its own Redis namespace so the second run starts cold. Every worker is this
//! same binary in `--worker` mode: its own `CoinbaseClient` (built `.unlimited()`: the tier
//! gates every request), its own `SharedTier`, its own in-process `CoordinatedSource` (L1) and
//! `BatchEvaluator`, and `--ticks` ticks `--tick-ms` apart, aligned across processes on the
//! wall clock. Time is real here: Redis and the processes do not share a tokio clock.
//!
//! `--json` prints one line with `workers`, `upstream_calls`, `single_process_upstream_calls`,
//! `rate_limited_429`, `max_requests_in_any_1s` and `limits`, plus a few tier counters per
//! worker.
//! Exits non-zero if the exchange answered any 429 or a bot evaluation failed.

use std::{error::Error, net::TcpListener, process::Stdio, sync::Arc, time::Duration};

use serde_json::{Value, json};
use tickshare::{
    BatchEvaluator, Bot, CoinbaseClient, CoordinatedSource, Credentials, MovingAverageCrossover, ProductId,
    RsiThreshold, SharedTier, Strategy,
    sim::{SimExchange, SimStats},
};
use time::OffsetDateTime;
use tokio::process::Command;

/// The key id every worker uses: one API key, one shared budget.
const KEY_ID: &str = "organizations/sim/apiKeys/sim";

const USAGE: &str = "usage: multi_worker [--workers K] [--bots N] [--products N] [--ticks N] [--tick-ms MS] \
[--latency-ms L] [--redis-url URL] [--json]\n\
defaults: --workers 4 --bots 25 --products 25 --ticks 5 --tick-ms 1500 --latency-ms 20";

#[derive(Debug, Clone)]
struct Args {
    workers: usize,
    bots: usize,
    products: usize,
    ticks: u32,
    tick_ms: u64,
    latency_ms: u64,
    redis_url: Option<String>,
    json: bool,
}

/// What a worker is told on its command line.
#[derive(Debug)]
struct WorkerArgs {
    id: usize,
    workers: u32,
    sim_url: String,
    redis_url: String,
    namespace: String,
    products: Vec<ProductId>,
    bots: usize,
    ticks: u32,
    tick_ms: u64,
    start_at_ms: i128,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        workers: 4,
        bots: 25,
        products: 25,
        ticks: 5,
        tick_ms: 1500,
        latency_ms: 20,
        redis_url: None,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"));
        let num = |v: String| v.parse::<u64>().map_err(|_| format!("{flag}: not a number: {v}\n{USAGE}"));
        match flag.as_str() {
            "--workers" => a.workers = num(value()?)?.clamp(1, 64) as usize,
            "--bots" => a.bots = num(value()?)?.max(1) as usize,
            "--products" => a.products = num(value()?)?.clamp(1, 100) as usize,
            "--ticks" => a.ticks = num(value()?)?.clamp(1, 1000) as u32,
            "--tick-ms" => a.tick_ms = num(value()?)?.max(1),
            "--latency-ms" => a.latency_ms = num(value()?)?,
            "--redis-url" => a.redis_url = Some(value()?),
            "--json" => a.json = true,
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(a)
}

fn parse_worker_args() -> Result<WorkerArgs, Box<dyn Error>> {
    let mut w = WorkerArgs {
        id: 0,
        workers: 1,
        sim_url: String::new(),
        redis_url: String::new(),
        namespace: String::new(),
        products: Vec::new(),
        bots: 25,
        ticks: 1,
        tick_ms: 1000,
        start_at_ms: 0,
    };
    let mut it = std::env::args().skip(2);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--id" => w.id = v.parse()?,
            "--workers" => w.workers = v.parse()?,
            "--sim-url" => w.sim_url = v,
            "--redis-url" => w.redis_url = v,
            "--namespace" => w.namespace = v,
            "--products" => w.products = v.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--bots" => w.bots = v.parse()?,
            "--ticks" => w.ticks = v.parse()?,
            "--tick-ms" => w.tick_ms = v.parse()?,
            "--start-at-ms" => w.start_at_ms = v.parse()?,
            other => return Err(format!("unknown worker argument {other}").into()),
        }
    }
    Ok(w)
}

fn bots(products: &[ProductId], n: usize) -> Vec<Bot> {
    (0..n)
        .map(|i| {
            let strategy: Arc<dyn Strategy> = if i % 2 == 0 {
                Arc::new(MovingAverageCrossover::default())
            } else {
                Arc::new(RsiThreshold::default())
            };
            Bot::new(format!("bot-{i:03}"), products[i % products.len()].clone(), strategy).lookback(24)
        })
        .collect()
}

fn now_ms() -> i128 {
    OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000
}

/// Worker mode: one process's stack, the ticks, then one JSON line of stats on stdout.
async fn worker(w: WorkerArgs) -> Result<(), Box<dyn Error>> {
    let client = CoinbaseClient::builder()
        .base_url(&w.sim_url)
        .credentials(Credentials::generate(KEY_ID))
        .unlimited()
        .build()?;
    let tier = SharedTier::coinbase(&w.redis_url, KEY_ID, client)
        .namespace(&w.namespace)
        .expected_workers(w.workers)
        .build()
        .await?;
    let l1 = CoordinatedSource::builder(tier.clone()).build()?;
    let evaluator = BatchEvaluator::new(Arc::new(l1.clone()));
    let bots = bots(&w.products, w.bots);
    let mut bot_errors = 0u64;
    for tick in 0..w.ticks {
        // Ticks on the wall clock, so that every process ticks at the same moments.
        let at = w.start_at_ms + i128::from(tick) * i128::from(w.tick_ms);
        let wait = u64::try_from(at - now_ms()).unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let report = evaluator.evaluate_all(&bots).await;
        bot_errors += report.errors().count() as u64;
    }
    let line = json!({
        "worker": w.id,
        "bot_errors": bot_errors,
        "l1_hit_rate": l1.stats().hit_rate,
        "tier": tier.stats(),
    });
    println!("{line}");
    Ok(())
}

/// A `redis-server` this example started; killed when dropped, also on an early error.
struct OwnRedis(std::process::Child);

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_redis() -> Result<(OwnRedis, String), Box<dyn Error>> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            format!("could not start redis-server ({e}); install it (apt-get install redis-server) or pass --redis-url")
        })?;
    let guard = OwnRedis(child);
    let url = format!("redis://127.0.0.1:{port}/");
    let client = redis::Client::open(url.as_str())?;
    for _ in 0..200 {
        if let Ok(mut c) = client.get_multiplexed_async_connection().await
            && redis::cmd("PING").query_async::<String>(&mut c).await.is_ok()
        {
            return Ok((guard, url));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err("redis-server did not answer within 5 s".into())
}

/// One run: `workers` processes over the same workload in `namespace`; the sim's counters and
/// each worker's stats line.
async fn run(
    args: &Args,
    sim: &SimExchange,
    redis_url: &str,
    namespace: &str,
    workers: usize,
) -> Result<(SimStats, Vec<Value>), Box<dyn Error>> {
    let exe = std::env::current_exe()?;
    let products: Vec<String> = sim.products().iter().map(ToString::to_string).collect();
    sim.reset_stats();
    // Start far enough ahead that every process is up before the first tick.
    let start_at = now_ms() + 1500;
    let mut children = Vec::new();
    for id in 0..workers {
        let child = Command::new(&exe)
            .arg("--worker")
            .args(["--id", &id.to_string()])
            .args(["--workers", &workers.to_string()])
            .args(["--sim-url", sim.base_url()])
            .args(["--redis-url", redis_url])
            .args(["--namespace", namespace])
            .args(["--products", &products.join(",")])
            .args(["--bots", &args.bots.to_string()])
            .args(["--ticks", &args.ticks.to_string()])
            .args(["--tick-ms", &args.tick_ms.to_string()])
            .args(["--start-at-ms", &start_at.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        children.push(child);
    }
    let budget = Duration::from_millis(5000 + args.tick_ms * u64::from(args.ticks)) * 4;
    let mut lines = Vec::new();
    for child in children {
        let out = tokio::time::timeout(budget, child.wait_with_output())
            .await
            .map_err(|_| "a worker did not finish in time")??;
        if !out.status.success() {
            return Err(format!("a worker failed: {}", out.status).into());
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().ok_or("a worker printed nothing")?;
        lines.push(serde_json::from_str::<Value>(line)?);
    }
    Ok((sim.stats(), lines))
}

async fn parent(args: Args) -> Result<bool, Box<dyn Error>> {
    let sim = SimExchange::builder()
        .products(args.products)
        .latency(Duration::from_millis(args.latency_ms))
        .start()
        .await?;
    let (_own_redis, redis_url) = match &args.redis_url {
        Some(url) => (None, url.clone()),
        None => {
            let (guard, url) = start_redis().await?;
            (Some(guard), url)
        }
    };
    let tag = format!("mw{}-{:x}", std::process::id(), fastrand::u32(..));
    if !args.json {
        println!(
            "multi_worker: {} bots over {} products, {} ticks {} ms apart, {} ms exchange latency",
            args.bots, args.products, args.ticks, args.tick_ms, args.latency_ms
        );
        println!(
            "simulated exchange at {} (limits 10 req/s public, 30 req/s private); redis {}\n",
            sim.base_url(),
            if args.redis_url.is_some() { "given" } else { "started for this run" }
        );
    }

    let (one, _) = run(&args, &sim, &redis_url, &format!("{tag}-single"), 1).await?;
    let (many, lines) = run(&args, &sim, &redis_url, &format!("{tag}-multi"), args.workers).await?;

    let bot_errors: u64 = lines.iter().map(|l| l["bot_errors"].as_u64().unwrap_or(0)).sum();
    let ok = many.rate_limited_429 == 0 && one.rate_limited_429 == 0 && bot_errors == 0;
    if args.json {
        let line = json!({
            "workers": args.workers,
            "bots": args.bots,
            "products": args.products,
            "ticks": args.ticks,
            "tick_ms": args.tick_ms,
            "upstream_calls": many.total_calls,
            "single_process_upstream_calls": one.total_calls,
            "rate_limited_429": many.rate_limited_429,
            "single_process_rate_limited_429": one.rate_limited_429,
            "max_requests_in_any_1s": many.max_requests_in_any_1s,
            "single_process_max_requests_in_any_1s": one.max_requests_in_any_1s,
            "limits": {"public": 10, "private": 30},
            "calls_by_endpoint": many.calls_by_endpoint.iter().filter(|(_, n)| **n > 0).collect::<std::collections::BTreeMap<_, _>>(),
            "bot_errors": bot_errors,
            "per_worker": lines.iter().map(|l| {
                let t = &l["tier"];
                json!({
                    "worker": l["worker"],
                    "mode": t["mode"],
                    "upstream_calls": t["upstream_calls"],
                    "l2_hits": t["l2_hits"],
                    "l2_misses": t["l2_misses"],
                    "lease_waits": t["lease_waits"],
                    "lease_takeovers": t["lease_takeovers"],
                    "shared_limiter_waits": t["shared_limiter"]["waits"],
                    "bot_errors": l["bot_errors"],
                })
            }).collect::<Vec<_>>(),
        });
        println!("{line}");
    } else {
        println!("{:<22} {:>10} {:>6} {:>22}", "run", "upstream", "429s", "max req/s pub/priv");
        for (name, s) in [("1 worker".to_string(), &one), (format!("{} workers", args.workers), &many)] {
            println!(
                "{:<22} {:>10} {:>6} {:>19}/{}",
                name,
                s.total_calls,
                s.rate_limited_429,
                s.max_requests_in_any_1s.public,
                s.max_requests_in_any_1s.private
            );
        }
        println!("\nper worker ({} workers):", args.workers);
        println!(
            "{:>7} {:>9} {:>8} {:>10} {:>12} {:>9} {:>11}",
            "worker", "upstream", "l2 hits", "l2 misses", "lease waits", "takeovers", "bot errors"
        );
        for l in &lines {
            let n = |v: &Value| v.as_u64().unwrap_or(0);
            let t = &l["tier"];
            println!(
                "{:>7} {:>9} {:>8} {:>10} {:>12} {:>9} {:>11}",
                n(&l["worker"]),
                n(&t["upstream_calls"]),
                n(&t["l2_hits"]),
                n(&t["l2_misses"]),
                n(&t["lease_waits"]),
                n(&t["lease_takeovers"]),
                n(&l["bot_errors"])
            );
        }
        println!(
            "\n{} workers made {} upstream calls together, one worker alone {}; {} answered 429 (limit 30/s private, busiest second {})",
            args.workers,
            many.total_calls,
            one.total_calls,
            many.rate_limited_429,
            many.max_requests_in_any_1s.private
        );
    }
    sim.shutdown().await;
    Ok(ok)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    if std::env::args().nth(1).as_deref() == Some("--worker") {
        return worker(parse_worker_args()?).await;
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    if !parent(args).await? {
        eprintln!("the exchange answered 429 or a bot evaluation failed");
        std::process::exit(1);
    }
    Ok(())
}
