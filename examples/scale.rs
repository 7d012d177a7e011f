//! Scale run (issue #6): the coordinated path at fleet sizes, on tokio's paused clock against
//! the embedded simulated exchange, so a simulated day of five-minute ticks runs in seconds.
//!
//! ```text
//! cargo run --release --example scale                      # a table
//! cargo run --release --example scale -- --json            # one JSON object per scenario per line
//! cargo run --release --example scale -- --scenario large --hours 6
//! ```
//!
//! Scenarios, in the order they run:
//!
//! - `cold_private_only`: the first tick of 25 bots (25 products, one-hour candles, 24 of
//!   them) at 30 ms exchange latency, every request on the private class (what a client with
//!   credentials does by default): 25 candle series, one `best_bid_ask`, one `accounts`.
//! - `cold`: the same tick with [`MarketDataPath::Balanced`], which lets candle requests
//!   overflow to the public class. Goal: within 1.2 × the floor set by the private limit
//!   (25 candle calls at 30/s ≈ 833 ms).
//! - `seed_kpi`: 25 bots, five-minute ticks, one-hour candles, REST only; after a warm-up
//!   hour, the upstream calls of one simulated hour. Goal: at most 49 (one batched ticker call
//!   and one accounts call per tick, one incremental candle call per product per hour).
//! - `seed_kpi_streaming`: the same fleet with the coordinated source kept hot by the
//!   simulated exchange's WebSocket feed (`MarketStream`: pushed tickers, five-minute candles
//!   aggregated into the one-hour series). Two warm-up hours (the feed joins the first hour
//!   late, so that hour's candle comes from REST once), then one measured hour. Goal: at most
//!   15 (accounts and gap repair only).
//! - `seed_kpi_refresh_ahead`: `seed_kpi` driven by a `TickSchedule` that prefetches each
//!   tick's snapshot 1.5 s ahead. Same goal for the calls (refresh-ahead moves them, it does
//!   not add any); `tick_ms_*` is then what the bots waited from the tick's due time. Goal:
//!   p99 under 1 ms.
//! - `large`: 10,000 bots over 500 products, five-minute ticks for a simulated day (the first
//!   hour is the warm-up). Goals: no 429, peak RSS under 100 MiB. The 500 series refresh at
//!   once after each hourly close (their data changes then), which takes about 16 s at both
//!   classes' rates, so this scenario raises the limiter's `max_wait` from 10 s to 60 s;
//!   with the default, the last series in the queue would fail locally instead of waiting.
//!
//! Figures: `calls_per_hour` and `calls_by_endpoint` (per hour) after the warm-up;
//! `rate_limited_429` and `max_requests_in_any_1s` over the whole run; `tick_ms_*` on the
//! simulated clock (waiting for the exchange and the rate limiter) after the warm-up;
//! `tick_cpu_ms_*` in real time (this process's work per tick: the HTTP round trips on
//! loopback, the cache, the evaluation of every bot); `peak_rss_mib` is `VmHWM` from
//! `/proc/self/status`, reset before each scenario through `/proc/self/clear_refs` where the
//! kernel allows it. Exits non-zero if a goal is missed.

use std::{collections::BTreeMap, error::Error, sync::Arc, time::Duration};

use serde::Serialize;
use tickshare::{
    BatchEvaluator, Bot, CoordinatedSource, Granularity, MarketDataPath, MarketStream,
    MovingAverageCrossover, RateLimiter, RateLimiterConfig, RsiThreshold, Strategy, TickSchedule,
    sim::{PerClass, SimExchange, SimStats},
};

const TICK: Duration = Duration::from_secs(300);
const LATENCY: Duration = Duration::from_millis(30);

struct Scenario {
    name: &'static str,
    bots: usize,
    products: usize,
    /// Hours of ticks before the measured window (0: a single cold tick is the whole run).
    warmup_hours: u64,
    /// Hours measured.
    hours: u64,
    market_data: MarketDataPath,
    max_wait: Duration,
    /// Refresh-ahead lead of the tick schedule (None: ticks evaluate when due, fetching then).
    lead: Option<Duration>,
}

#[derive(Debug, Serialize)]
struct Outcome {
    scenario: &'static str,
    bots: usize,
    products: usize,
    latency_ms: u64,
    market_data: MarketDataPath,
    simulated_hours: u64,
    ticks: usize,
    calls_per_hour: Option<f64>,
    calls_by_endpoint: BTreeMap<String, f64>,
    rate_limited_429: u64,
    max_requests_in_any_1s: PerClass,
    bot_errors: u64,
    peak_rss_mib: Option<f64>,
    peak_rss_scope: &'static str,
    tick_ms_p50: Option<f64>,
    tick_ms_p99: Option<f64>,
    tick_ms_max: Option<f64>,
    tick_cpu_ms_p50: f64,
    tick_cpu_ms_p99: f64,
    cold_tick_ms: f64,
    cold_tick_calls: u64,
    goal: String,
    met: bool,
    real_seconds: f64,
}

fn percentile(v: &[f64], p: f64) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied()
}

/// Reset the peak-RSS mark (Linux 4.0+); false where the kernel refuses.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// `VmHWM`, MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn fleet(n: usize, products: &[tickshare::ProductId]) -> Vec<Bot> {
    let ma: Arc<dyn Strategy> = Arc::new(MovingAverageCrossover::default());
    let rsi: Arc<dyn Strategy> = Arc::new(RsiThreshold::default());
    (0..n)
        .map(|i| {
            let strategy = if i % 2 == 0 { Arc::clone(&ma) } else { Arc::clone(&rsi) };
            Bot::new(format!("bot-{i:05}"), products[i % products.len()].clone(), strategy)
                .granularity(Granularity::OneHour)
                .lookback(24)
        })
        .collect()
}

fn max_per_class(a: PerClass, b: PerClass) -> PerClass {
    PerClass { public: a.public.max(b.public), private: a.private.max(b.private) }
}

async fn run(s: &Scenario) -> Result<Outcome, Box<dyn Error>> {
    let wall = std::time::Instant::now();
    let sim = SimExchange::builder().products(s.products).latency(LATENCY).start().await?;
    let limiter = RateLimiter::new(RateLimiterConfig { max_wait: s.max_wait, ..Default::default() })?;
    let client =
        sim.client_builder().rate_limiter(limiter).market_data(s.market_data).clock(sim.clock()).build()?;
    let source = CoordinatedSource::coinbase(client).clock(sim.clock()).build()?;
    let _stream = if s.name == "seed_kpi_streaming" {
        Some(MarketStream::builder(source.clone()).url(sim.ws_url()).products(sim.products()).start()?)
    } else {
        None
    };
    let evaluator = BatchEvaluator::new(Arc::new(source.clone())).clock(sim.clock()).meter(Arc::new(source));
    let bots = fleet(s.bots, &sim.products());

    let warmup_ticks = (s.warmup_hours * 3600 / TICK.as_secs()) as usize;
    let total_ticks = ((s.warmup_hours + s.hours) * 3600 / TICK.as_secs()).max(1) as usize;
    let start = tokio::time::Instant::now();
    let (mut tick_ms, mut cpu_ms) = (Vec::new(), Vec::new());
    let (mut cold_tick_ms, mut cold_tick_calls, mut bot_errors) = (0.0, 0, 0);
    let mut warmup: Option<SimStats> = None;
    // Unaligned: the first tick is due now, then one every TICK. Each tick's window (the calls
    // it causes) begins `lead` before it, at its prefetch when there is one.
    let lead = s.lead.unwrap_or_default();
    let mut ticks = evaluator.schedule(TickSchedule::every(TICK).aligned(false).refresh_ahead(lead))?;
    for i in 0..total_ticks {
        let due = start + TICK * i as u32;
        tokio::time::sleep_until(due.checked_sub(lead).unwrap_or(due)).await;
        if i == warmup_ticks && i > 0 {
            warmup = Some(sim.stats());
            sim.reset_stats();
        }
        let cpu = std::time::Instant::now();
        let tick = ticks.tick(&bots).await;
        // What the bots waited from the due time: the tick's own duration without refresh-ahead.
        let (report, ms) = (tick.report, tick.latency.as_secs_f64() * 1000.0);
        bot_errors += report.errors().count() as u64;
        if i == 0 {
            cold_tick_ms = ms;
            cold_tick_calls = report.upstream_calls;
        }
        if i >= warmup_ticks {
            tick_ms.push(ms);
            cpu_ms.push(cpu.elapsed().as_secs_f64() * 1000.0);
        }
    }
    // Close the measured window (and let the exchange's one-second windows end) where the next
    // tick's window would begin: at its prefetch with refresh-ahead.
    tokio::time::sleep_until(start + TICK * total_ticks as u32 - lead).await;
    let measured = sim.stats();
    let hours = s.hours as f64;
    let per_hour = |n: u64| n as f64 / hours;
    let (calls_per_hour, calls_by_endpoint) = if s.hours == 0 {
        (
            None,
            measured
                .calls_by_endpoint
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(k, n)| (k.clone(), *n as f64))
                .collect(),
        )
    } else {
        (
            Some(per_hour(measured.total_calls)),
            measured
                .calls_by_endpoint
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(k, n)| (k.clone(), per_hour(*n)))
                .collect(),
        )
    };
    let (w429, w1s) =
        warmup.as_ref().map_or((0, PerClass::default()), |w| (w.rate_limited_429, w.max_requests_in_any_1s));
    let warm = s.hours > 0;
    Ok(Outcome {
        scenario: s.name,
        bots: s.bots,
        products: s.products,
        latency_ms: LATENCY.as_millis() as u64,
        market_data: s.market_data,
        simulated_hours: s.warmup_hours + s.hours,
        ticks: total_ticks,
        calls_per_hour,
        calls_by_endpoint,
        rate_limited_429: w429 + measured.rate_limited_429,
        max_requests_in_any_1s: max_per_class(w1s, measured.max_requests_in_any_1s),
        bot_errors,
        peak_rss_mib: peak_rss_mib(),
        peak_rss_scope: "process",
        tick_ms_p50: if warm { percentile(&tick_ms, 0.50) } else { None },
        tick_ms_p99: if warm { percentile(&tick_ms, 0.99) } else { None },
        tick_ms_max: if warm { tick_ms.iter().copied().reduce(f64::max) } else { None },
        tick_cpu_ms_p50: percentile(&cpu_ms, 0.50).unwrap_or(0.0),
        tick_cpu_ms_p99: percentile(&cpu_ms, 0.99).unwrap_or(0.0),
        cold_tick_ms,
        cold_tick_calls,
        goal: String::new(),
        met: true,
        real_seconds: wall.elapsed().as_secs_f64(),
    })
}

/// Judge `o` against its scenario's goal.
fn judge(o: &mut Outcome) {
    let clean = o.rate_limited_429 == 0 && o.bot_errors == 0;
    let floor_ms = 25.0 / 30.0 * 1000.0;
    let (goal, met) = match o.scenario {
        "cold" => (
            format!("cold tick <= 1.2 x {floor_ms:.0} ms (25 candle calls at 30/s), no 429"),
            o.cold_tick_ms <= 1.2 * floor_ms && clean,
        ),
        "seed_kpi_refresh_ahead" => (
            "calls/hour <= 49, no 429, tick p99 < 1 ms after the due time".to_string(),
            o.calls_per_hour.is_some_and(|c| c <= 49.0) && clean && o.tick_ms_p99.is_some_and(|p| p < 1.0),
        ),
        "seed_kpi" => {
            ("calls/hour <= 49, no 429".to_string(), o.calls_per_hour.is_some_and(|c| c <= 49.0) && clean)
        }
        "seed_kpi_streaming" => (
            "calls/hour <= 15 (accounts and gap repair only), no 429".to_string(),
            o.calls_per_hour.is_some_and(|c| c <= 15.0) && clean,
        ),
        "large" => (
            "no 429, no bot error, peak RSS < 100 MiB".to_string(),
            clean && o.peak_rss_mib.is_some_and(|m| m < 100.0),
        ),
        _ => ("(reference: no 429)".to_string(), clean),
    };
    o.goal = goal;
    o.met = met;
}

struct Args {
    json: bool,
    only: Vec<String>,
    hours: Option<u64>,
}

fn parse_args() -> Result<Args, Box<dyn Error>> {
    let mut a = Args { json: false, only: Vec::new(), hours: None };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--json" => a.json = true,
            "--scenario" => a.only.push(it.next().ok_or("--scenario needs a name")?),
            "--hours" => {
                let v = it.next().ok_or("--hours needs a value")?;
                a.hours = Some(v.parse::<u64>().map_err(|_| format!("--hours: not a number: {v}"))?.max(1));
            }
            "-h" | "--help" => {
                println!(
                    "usage: scale [--json] [--scenario cold_private_only|cold|seed_kpi|seed_kpi_streaming|large]... [--hours H (large's measured hours, default 23)]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}; try --help").into()),
        }
    }
    Ok(a)
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = parse_args()?;
    let default_wait = RateLimiterConfig::default().max_wait;
    let scenarios = [
        Scenario {
            name: "cold_private_only",
            bots: 25,
            products: 25,
            warmup_hours: 0,
            hours: 0,
            market_data: MarketDataPath::Private,
            max_wait: default_wait,
            lead: None,
        },
        Scenario {
            name: "cold",
            bots: 25,
            products: 25,
            warmup_hours: 0,
            hours: 0,
            market_data: MarketDataPath::Balanced,
            max_wait: default_wait,
            lead: None,
        },
        Scenario {
            name: "seed_kpi",
            bots: 25,
            products: 25,
            warmup_hours: 1,
            hours: 1,
            market_data: MarketDataPath::Auto,
            max_wait: default_wait,
            lead: None,
        },
        Scenario {
            name: "seed_kpi_refresh_ahead",
            bots: 25,
            products: 25,
            warmup_hours: 1,
            hours: 1,
            market_data: MarketDataPath::Auto,
            max_wait: default_wait,
            lead: Some(Duration::from_millis(1_500)),
        },
        Scenario {
            name: "seed_kpi_streaming",
            bots: 25,
            products: 25,
            warmup_hours: 2,
            hours: 1,
            market_data: MarketDataPath::Auto,
            max_wait: default_wait,
            lead: None,
        },
        Scenario {
            name: "large",
            bots: 10_000,
            products: 500,
            warmup_hours: 1,
            hours: args.hours.unwrap_or(23),
            market_data: MarketDataPath::Balanced,
            max_wait: Duration::from_secs(60),
            lead: None,
        },
    ];
    let mut outcomes = Vec::new();
    for s in scenarios.iter().filter(|s| args.only.is_empty() || args.only.iter().any(|n| n == s.name)) {
        let scoped = reset_peak_rss();
        // A fresh runtime (and paused clock) per scenario.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build()?;
        let mut o = rt.block_on(run(s))?;
        drop(rt);
        if scoped {
            o.peak_rss_scope = "scenario";
        }
        judge(&mut o);
        if args.json {
            println!("{}", serde_json::to_string(&o)?);
        }
        outcomes.push(o);
    }

    if !args.json {
        println!(
            "{:<22} {:>6} {:>5} {:>6} {:>10} {:>5} {:>6} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8} {:>4}",
            "scenario",
            "bots",
            "prod",
            "hours",
            "calls/h",
            "429",
            "errors",
            "rss MiB",
            "cold ms",
            "p50 ms",
            "p99 ms",
            "cpu p50",
            "max/1s",
            "met"
        );
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        for o in &outcomes {
            println!(
                "{:<22} {:>6} {:>5} {:>6} {:>10} {:>5} {:>6} {:>8} {:>9.1} {:>9} {:>9} {:>9.2} {:>8} {:>4}",
                o.scenario,
                o.bots,
                o.products,
                o.simulated_hours,
                opt(o.calls_per_hour),
                o.rate_limited_429,
                o.bot_errors,
                opt(o.peak_rss_mib),
                o.cold_tick_ms,
                opt(o.tick_ms_p50),
                opt(o.tick_ms_p99),
                o.tick_cpu_ms_p50,
                format!("{}/{}", o.max_requests_in_any_1s.public, o.max_requests_in_any_1s.private),
                if o.met { "yes" } else { "NO" },
            );
        }
        println!();
        for o in &outcomes {
            println!("{}: {} -> {}", o.scenario, o.goal, if o.met { "met" } else { "MISSED" });
            let calls: Vec<String> = o.calls_by_endpoint.iter().map(|(k, v)| format!("{k} {v:.1}")).collect();
            let unit = if o.calls_per_hour.is_some() { "per hour after warm-up" } else { "in the tick" };
            println!("    calls {unit}: {}", calls.join(", "));
        }
    }
    if let Some(o) = outcomes.iter().find(|o| !o.met) {
        eprintln!("FAIL: {} missed its goal: {}", o.scenario, o.goal);
        std::process::exit(1);
    }
    Ok(())
}
