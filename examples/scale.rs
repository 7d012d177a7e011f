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
//!   hour is the warm-up), REST only, [`MarketDataPath::Balanced`]. The clock starts two
//!   seconds past an hour, so a tick falls two seconds after every hourly close, while the
//!   500 series are being refreshed in the background (`AfterClose::ServeLastKnown`): that
//!   tick is served at once, the just-closed candles marked provisional. Goals: no 429, no bot
//!   error, peak RSS under 100 MiB, tick p99 under 100 ms (simulated), and, for every close,
//!   the last series exact again (`last_series_exact_ms`, from the source's
//!   `close_refresh` stats) within 1.1 × the floor the limiter sets: the grace, then 500
//!   candle calls at the limiter's rates (public 8/s + private 24/s, bursts 1 + 5). The
//!   exchange's own limits (10/s + 30/s) would allow 12.5 s; the limiter keeps a 20 % margin
//!   under them, so that figure is printed as `exchange_floor_ms` for reference only.
//! - `large_cold`: the first tick of the same fleet: 500 candle series, the ticker batches and
//!   accounts, on both classes. Goal: within 1.2 × the floor the limiter sets for that many
//!   calls, no 429, no bot error. It takes longer than the default `read_timeout` (15 s) and
//!   queues more requests than the default `max_wait` (10 s) allows, so `large` and
//!   `large_cold` raise them to 30 s and 60 s: a fleet this size cannot start cold within the
//!   defaults (hourly, after the warm-up, the background refresh keeps at most 16 requests in
//!   the limiter, and neither is needed).
//!
//! - `proxy`: 250 naive clients (each a `CoinbaseClient` with its own rate limiter, the legacy
//!   pattern per five-minute tick: ticker, one-hour candles of the last day, accounts, a balance
//!   check) over 50 products, pointed at a `tickshare::proxy::Proxy` in front of the
//!   simulated exchange; one warm-up hour, three measured. Beside it, on a second simulator,
//!   the same 250 bots' reads go through one `CoordinatedSource` alone: the reference, which
//!   fetches tickers as the proxy does (`TickerBatch::LastTradeAndBook`: a ticker carries the
//!   last trade and the book). Goals: no 429 (simulator, clients, the proxy's own), no client
//!   error, every answer what the exchange had (the ticker's price at its time and within the
//!   freshness TTL, with a book; every closed candle), and upstream calls per hour at most the reference's. `proxy.*` holds the
//!   scenario's own figures; `peak_rss_mib` is the whole process (simulators, proxy, 250
//!   clients, the reference), an upper bound on the proxy's memory, and
//!   `proxy.rss_growth_mib` what the resident set grew from just before the proxy started to
//!   the end of the run (the proxy's caches and connections, plus the clients' pools).
//! - `large_streaming` (issue #18): the `large` fleet fed by the simulated exchange's WebSocket
//!   side (`MarketStream` over 500 products: subscribe messages of at most 100 products, at
//!   most 200 products per connection, so three connections sharing one budget of 8 messages
//!   per second; the simulator enforces the same caps). Warm-up: the first tick fetches every
//!   series' history once; the stream joins that hour late, so the first hourly close is
//!   served from REST once more (500 calls), then every hour is derived from the pushed
//!   five-minute candles. Two warm-up hours, then 22 measured (`--hours`). Goals: at most 15
//!   REST calls an hour, 0 × 429, every product's cached one-hour series equal to a REST fetch
//!   at the end (closed candles; the check's fetches are not counted), tick p50 and p99 under
//!   50 ms of simulated time, peak RSS under 100 MiB, no subscribe refused by the simulator's
//!   caps. The simulator pushes candle updates every second as Coinbase does
//!   (`--candle-interval-ms` changes it; the output's `candle_interval_ms` says which): about
//!   20 s of real CPU per simulated hour, so the day takes several minutes.
//!
//!   `feed_cpu_ms_per_hour` is the stream client's own work per simulated hour (decoding
//!   frames and applying them to the cache, timed in real time by `MarketStream`,
//!   `StreamStats::busy_us`); `non_tick_cpu_ms_per_hour` is the process's CPU time
//!   (`/proc/self/stat`) outside the ticks per simulated hour, which adds the simulator's own
//!   WebSocket side (building and serializing every frame) and the runtime's scheduling.
//!
//! Figures: `calls_per_hour` and `calls_by_endpoint` (per hour) after the warm-up;
//! `rate_limited_429` and `max_requests_in_any_1s` over the whole run; `tick_ms_*` on the
//! simulated clock (waiting for the exchange and the rate limiter) after the warm-up;
//! `tick_cpu_ms_*` in real time (this process's work per tick: the HTTP round trips on
//! loopback, the cache, the evaluation of every bot); `peak_rss_mib` is `VmHWM` from
//! `/proc/self/status`, reset before each scenario through `/proc/self/clear_refs` where the
//! kernel allows it. Exits non-zero if a goal is missed.

use std::{
    collections::BTreeMap,
    error::Error,
    sync::{Arc, OnceLock},
    time::Duration,
};

use serde::Serialize;
use tickshare::{
    BatchEvaluator, Bot, CandleRange, Clock, CoinbaseClient, CoordinatedConfig, CoordinatedSource,
    Credentials, Granularity, MarketDataPath, MarketDataSource, MarketStream, MovingAverageCrossover,
    ProductId, RateLimiter, RateLimiterConfig, RsiThreshold, Strategy, TickSchedule,
    proxy::Proxy,
    sim::{PerClass, SimExchange, SimHandle, SimStats, WsConfig},
};
use time::{OffsetDateTime, macros::datetime};

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
    /// The source's `read_timeout` (None: the default).
    read_timeout: Option<Duration>,
    /// The exchange's clock at the start (None: the system's).
    start: Option<OffsetDateTime>,
}

/// The large fleet's clock: two seconds past an hour, so that a tick falls two seconds after
/// every hourly close, while the series are being refreshed.
const LARGE_START: OffsetDateTime = datetime!(2025-01-06 00:00:02 UTC);

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
    /// The cold tick's floor: its calls at the limiter's rates (bursts first), ms.
    cold_floor_ms: Option<f64>,
    /// The same calls at the exchange's stated limits (10/s + 30/s), ms, for reference.
    cold_exchange_floor_ms: Option<f64>,
    /// Per hourly close after the cold start: time from the close until the last series was
    /// exact again, from the source's `close_refresh` stats; the worst close.
    last_series_exact_ms: Option<f64>,
    /// The same, median over the closes.
    last_series_exact_ms_p50: Option<f64>,
    /// Closes measured, and the series refreshed after each (the fewest).
    closes_measured: Option<usize>,
    close_series_min: Option<u64>,
    /// The floor of one close's refresh: the grace, then its series' calls at the limiter's
    /// rates (bursts first), ms; and those calls at the exchange's limits, for reference.
    exact_floor_ms: Option<f64>,
    exchange_floor_ms: Option<f64>,
    /// The most series a tick read with a provisional last candle.
    provisional_series_max: Option<u64>,
    goal: String,
    met: bool,
    real_seconds: f64,
    /// The `proxy` scenario's own figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    proxy: Option<ProxyFigures>,
    /// Streaming scenarios: how the push feed ran (absent without the stream).
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<StreamOutcome>,
}

/// What the `proxy` scenario measures besides the common figures.
#[derive(Debug, Serialize)]
struct ProxyFigures {
    /// Upstream calls per hour of the same reads through one `CoordinatedSource` alone.
    reference_calls_per_hour: f64,
    /// Requests the 250 clients sent to the proxy over the whole run.
    client_requests: u64,
    /// 429s the clients received (from the proxy).
    client_429: u64,
    /// Requests the proxy refused with its per-connection limit.
    proxy_limited: u64,
    /// Answers that differ from what the exchange had (ticker price or age, closed candles,
    /// empty accounts, a failed balance check).
    answer_mismatches: u64,
    /// Answers checked.
    answers_checked: u64,
    /// Errors of the reference source's reads.
    reference_errors: u64,
    /// Resident set growth from just before the proxy started to the end of the run, MiB.
    rss_growth_mib: Option<f64>,
}

/// What a streaming scenario adds (issue #18).
#[derive(Debug, Serialize)]
struct StreamOutcome {
    /// The simulator's candle update period (Coinbase: 1,000).
    candle_interval_ms: u64,
    max_products_per_message: usize,
    max_products_per_connection: usize,
    connections: u64,
    reconnects: u64,
    sequence_gaps: u64,
    repairs: u64,
    /// REST market-data reads the stream could not serve, measured window.
    rest_fallbacks: u64,
    /// Frames the client decoded, measured window, per hour.
    messages_per_hour: f64,
    /// The most client messages (subscribes) the exchange received in any second, whole run.
    max_client_messages_in_any_1s: u64,
    /// Client messages the exchange refused (over a limit), whole run.
    refused_messages: u64,
    /// The stream client's decode + apply time per simulated hour (real ms).
    feed_cpu_ms_per_hour: f64,
    /// Process CPU outside the ticks per simulated hour (real ms): feed + simulator + runtime.
    non_tick_cpu_ms_per_hour: Option<f64>,
    /// Products whose cached one-hour series was compared with a REST fetch at the end.
    series_checked: usize,
    /// Products whose cached closed candles differed from REST's (must be 0).
    series_mismatched: usize,
    /// Candle REST calls in the measured window, per hour.
    candle_calls_per_hour: f64,
}

/// The streaming setup of a scenario, by name (None: REST only).
struct StreamSetup {
    candle_interval: Duration,
    max_products_per_message: usize,
    max_products_per_connection: usize,
}

/// `--candle-interval-ms` for `large_streaming`.
static CANDLE_INTERVAL: OnceLock<Duration> = OnceLock::new();

fn stream_setup(name: &str) -> Option<StreamSetup> {
    let defaults = tickshare::StreamConfig::default();
    let (per_message, per_connection) =
        (defaults.max_products_per_message, defaults.max_products_per_connection);
    let interval = match name {
        // The seed fleet: every update the simulator's default (1 s) would send.
        "seed_kpi_streaming" => {
            return Some(StreamSetup {
                candle_interval: WsConfig::default().candle_interval,
                max_products_per_message: per_message,
                max_products_per_connection: per_connection,
            });
        }
        "large_streaming" => CANDLE_INTERVAL.get().copied().unwrap_or(Duration::from_secs(1)),
        _ => return None,
    };
    Some(StreamSetup {
        candle_interval: interval,
        max_products_per_message: per_message,
        max_products_per_connection: per_connection,
    })
}

/// This process's CPU time (user + system) in ms, from `/proc/self/stat`.
fn process_cpu_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces) close with ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(ticks * 10.0)
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
    let setup = stream_setup(s.name);
    let mut sim = SimExchange::builder().products(s.products).latency(LATENCY);
    if let Some(start) = s.start {
        sim = sim.clock(Clock::starting_at(start));
    }
    if let Some(st) = &setup {
        sim = sim.ws(WsConfig::default()
            .candle_interval(st.candle_interval)
            .max_products_per_message(st.max_products_per_message)
            .max_products_per_connection(st.max_products_per_connection));
    }
    let sim = sim.start().await?;
    let limits = RateLimiterConfig { max_wait: s.max_wait, ..Default::default() };
    let limiter = RateLimiter::new(limits.clone())?;
    let client =
        sim.client_builder().rate_limiter(limiter).market_data(s.market_data).clock(sim.clock()).build()?;
    let mut source = CoordinatedSource::coinbase(client).clock(sim.clock());
    if let Some(t) = s.read_timeout {
        source = source.read_timeout(t);
    } else if setup.is_some() {
        // The cold tick queues 500 history fetches behind the rate limiter (about 16 s): let
        // reads wait as long as the limiter may, as `max_wait` does for the limiter.
        source = source.read_timeout(s.max_wait.max(Duration::from_secs(15)));
    }
    let source = source.build()?;
    let grace_ms = source.config().candle_grace.as_secs_f64() * 1000.0;
    let meter = source.clone();
    let stream = match &setup {
        Some(st) => Some(
            MarketStream::builder(source.clone())
                .url(sim.ws_url())
                .max_products_per_message(st.max_products_per_message)
                .max_products_per_connection(st.max_products_per_connection)
                // A slower simulated push interval needs a longer wait for the closing push.
                .candle_grace(tickshare::StreamConfig::default().candle_grace.max(st.candle_interval * 2))
                .products(sim.products())
                .start()?,
        ),
        None => None,
    };
    let check_source = source.clone();
    let evaluator = BatchEvaluator::new(Arc::new(source.clone())).clock(sim.clock()).meter(Arc::new(meter));
    let bots = fleet(s.bots, &sim.products());

    let warmup_ticks = (s.warmup_hours * 3600 / TICK.as_secs()) as usize;
    let total_ticks = ((s.warmup_hours + s.hours) * 3600 / TICK.as_secs()).max(1) as usize;
    let start = tokio::time::Instant::now();
    let (mut tick_ms, mut cpu_ms) = (Vec::new(), Vec::new());
    let (mut cold_tick_ms, mut cold_tick_calls, mut bot_errors) = (0.0, 0, 0);
    let mut warmup: Option<SimStats> = None;
    // Hourly closes after the cold start: close -> (ms until the last series was exact, series).
    let mut closes: BTreeMap<OffsetDateTime, (f64, u64)> = BTreeMap::new();
    let mut provisional_max = 0;
    let first_close = Granularity::OneHour.next_close(sim.clock().now_utc());
    let note_closes = |closes: &mut BTreeMap<OffsetDateTime, (f64, u64)>| {
        for c in source.stats().close_refresh.recent_closes {
            if let (Some(ms), true) = (c.last_exact_after_ms, c.close >= first_close && c.series > 0) {
                closes.insert(c.close, (ms, c.series));
            }
        }
    };
    let mut at_warm: Option<(Option<f64>, tickshare::StreamStats)> = None;
    let mut ws_warm: Option<tickshare::sim::WsStats> = None;
    // Unaligned: the first tick is due now, then one every TICK. Each tick's window (the calls
    // it causes) begins `lead` before it, at its prefetch when there is one.
    let lead = s.lead.unwrap_or_default();
    let mut ticks = evaluator.schedule(TickSchedule::every(TICK).aligned(false).refresh_ahead(lead))?;
    for i in 0..total_ticks {
        let due = start + TICK * i as u32;
        tokio::time::sleep_until(due.checked_sub(lead).unwrap_or(due)).await;
        if i == warmup_ticks && i > 0 {
            warmup = Some(sim.stats());
            ws_warm = Some(sim.ws_stats());
            sim.reset_stats();
            if let Some(st) = &stream {
                at_warm = Some((process_cpu_ms(), st.stats()));
            }
        }
        let cpu = std::time::Instant::now();
        let tick = ticks.tick(&bots).await;
        // What the bots waited from the due time: the tick's own duration without refresh-ahead.
        let (report, ms) = (tick.report, tick.latency.as_secs_f64() * 1000.0);
        bot_errors += report.errors().count() as u64;
        provisional_max = provisional_max.max(report.provisional_series);
        note_closes(&mut closes);
        // `SCALE_DEBUG=1`: say why bots failed (stderr), when a goal is missed on errors.
        if std::env::var_os("SCALE_DEBUG").is_some()
            && let Some(e) = report.errors().next()
        {
            eprintln!("tick {i}: {} errors, e.g. {:?}", report.errors().count(), e.outcome);
        }
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
    note_closes(&mut closes);
    let measured = sim.stats();
    let ws_measured = sim.ws_stats();
    let cpu_end = process_cpu_ms();
    let stream_outcome = match (&stream, &setup) {
        (Some(stream), Some(setup)) => {
            let end = stream.stats();
            let (cpu0, st0) = at_warm.clone().unwrap_or((None, tickshare::StreamStats::default()));
            let hours = (s.hours as f64).max(1.0);
            let tick_cpu: f64 = cpu_ms.iter().sum();
            // Exactness: every product's cached one-hour series against a REST fetch now
            // (after the measured window closed: these calls are not counted).
            let direct = sim.client()?;
            let now = sim.clock().now_utc();
            let range = tickshare::CandleRange::lookback(Granularity::OneHour, 24, now)?;
            let mut mismatched = 0;
            let products = sim.products();
            for p in &products {
                let cached = check_source.candles(p, Granularity::OneHour, range).await?;
                let rest = direct.candles(p, Granularity::OneHour, range).await?;
                let closed = |v: &[tickshare::Candle]| -> Vec<tickshare::Candle> {
                    v.iter().filter(|c| Granularity::OneHour.is_closed(c.start, now)).copied().collect()
                };
                if closed(&cached) != closed(&rest) || closed(&cached).len() < 23 {
                    mismatched += 1;
                }
            }
            let candle_calls = measured
                .calls_by_endpoint
                .iter()
                .filter(|(k, _)| k.contains("candles"))
                .map(|(_, n)| *n)
                .sum::<u64>();
            Some(StreamOutcome {
                candle_interval_ms: setup.candle_interval.as_millis() as u64,
                max_products_per_message: setup.max_products_per_message,
                max_products_per_connection: setup.max_products_per_connection,
                connections: end.connection_count,
                reconnects: end.reconnects,
                sequence_gaps: end.sequence_gaps,
                repairs: end.repairs,
                rest_fallbacks: end.rest_fallbacks - st0.rest_fallbacks,
                messages_per_hour: (end.messages - st0.messages) as f64 / hours,
                // Over the whole run: the subscriptions go out in the warm-up.
                max_client_messages_in_any_1s: ws_measured
                    .max_client_messages_in_any_1s
                    .max(ws_warm.as_ref().map_or(0, |w| w.max_client_messages_in_any_1s)),
                refused_messages: ws_measured.refused_messages
                    + ws_warm.as_ref().map_or(0, |w| w.refused_messages),
                feed_cpu_ms_per_hour: (end.busy_us - st0.busy_us) as f64 / 1000.0 / hours,
                non_tick_cpu_ms_per_hour: cpu0
                    .zip(cpu_end)
                    .map(|(a, b)| ((b - a - tick_cpu) / hours).max(0.0)),
                series_checked: products.len(),
                series_mismatched: mismatched,
                candle_calls_per_hour: candle_calls as f64 / hours,
            })
        }
        _ => None,
    };
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
    // Floors: `n` calls at the limiter's rates after its bursts, and at the exchange's limits,
    // on the classes the scenario's market data uses (both with `Balanced`, else the private
    // one: these clients have a key).
    use tickshare::EndpointClass::{Private, Public};
    let both = s.market_data == MarketDataPath::Balanced;
    let classes: &[tickshare::EndpointClass] = if both { &[Public, Private] } else { &[Private] };
    let rate: f64 = classes.iter().map(|c| f64::from(limits.class(*c).rate_per_second.get())).sum();
    let burst: f64 = classes.iter().map(|c| f64::from(limits.class(*c).burst.get())).sum();
    let exchange_rate: f64 = classes.iter().map(|c| f64::from(c.coinbase_limit())).sum();
    let floor_ms = |n: f64| (n - burst).max(0.0) / rate * 1000.0;
    let exchange_ms = |n: f64| n / exchange_rate * 1000.0;
    let large = s.products >= 100;
    let close_ms: Vec<f64> = closes.values().map(|(ms, _)| *ms).collect();
    let close_series_min = closes.values().map(|(_, n)| *n).min();
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
        cold_floor_ms: large.then(|| floor_ms(cold_tick_calls as f64)),
        cold_exchange_floor_ms: large.then(|| exchange_ms(cold_tick_calls as f64)),
        last_series_exact_ms: close_ms.iter().copied().reduce(f64::max),
        last_series_exact_ms_p50: percentile(&close_ms, 0.5),
        closes_measured: warm.then_some(closes.len()),
        close_series_min,
        exact_floor_ms: close_series_min.map(|n| grace_ms + floor_ms(n as f64)),
        exchange_floor_ms: close_series_min.map(|n| exchange_ms(n as f64)),
        provisional_series_max: warm.then_some(provisional_max),
        goal: String::new(),
        met: true,
        real_seconds: wall.elapsed().as_secs_f64(),
        stream: stream_outcome,
        proxy: None,
    })
}

/// `VmRSS`, MiB.
fn rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Errors and wrong answers of one tick of one bot.
#[derive(Debug, Default, Clone, Copy)]
struct Checked {
    errors: u64,
    mismatches: u64,
    answers: u64,
}

impl std::ops::AddAssign for Checked {
    fn add_assign(&mut self, o: Checked) {
        self.errors += o.errors;
        self.mismatches += o.mismatches;
        self.answers += o.answers;
    }
}

/// One tick of one naive bot: ticker, one-hour candles of the last day, accounts, a balance
/// check; each answer checked against what the exchange had.
async fn naive_tick(src: &dyn MarketDataSource, p: &ProductId, sim: &SimHandle, ttl: Duration) -> Checked {
    let mut c = Checked::default();
    let now = sim.clock().now_utc();
    let fresh = time::Duration::try_from(ttl).unwrap_or(time::Duration::MAX);
    match src.ticker(p).await {
        Ok(t) => {
            c.answers += 1;
            // The last trade's price, and the book, as Coinbase's ticker carries both (the
            // proxy once answered an empty book).
            let book = matches!((t.best_bid, t.best_ask), (Some(b), Some(a)) if b <= a);
            let right = now - t.time <= fresh && sim.price_at(p, t.time) == Some(t.price) && book;
            c.mismatches += u64::from(!right);
        }
        Err(_) => c.errors += 1,
    }
    let g = Granularity::OneHour;
    match CandleRange::new(now - time::Duration::hours(24), now) {
        Ok(range) => match src.candles(p, g, range).await {
            Ok(candles) => {
                c.answers += 1;
                let closed: Vec<_> = candles.iter().filter(|k| g.is_closed(k.start, now)).collect();
                let right =
                    closed.len() >= 23 && closed.iter().all(|k| sim.candle_at(p, g, k.start) == Some(**k));
                c.mismatches += u64::from(!right);
            }
            Err(_) => c.errors += 1,
        },
        Err(_) => c.errors += 1,
    }
    match src.accounts().await {
        Ok(a) => {
            c.answers += 1;
            c.mismatches += u64::from(a.is_empty());
        }
        Err(_) => c.errors += 1,
    }
    match src.validate_trade_balance("USD", 10.into()).await {
        Ok(ok) => {
            c.answers += 1;
            c.mismatches += u64::from(!ok);
        }
        Err(_) => c.errors += 1,
    }
    c
}

/// One tick of a fleet of naive bots, bot `b` on product `b % products.len()`, each bot a
/// task of its own. A task that failed to finish counts as one error.
async fn naive_fleet_tick(
    bots: impl Iterator<Item = Arc<dyn MarketDataSource>>,
    products: &[ProductId],
    sim: &SimHandle,
    ttl: Duration,
) -> Vec<Checked> {
    let tasks: Vec<_> = bots
        .enumerate()
        .map(|(b, src)| {
            let (p, sim) = (products[b % products.len()].clone(), sim.clone());
            tokio::spawn(async move { naive_tick(&*src, &p, &sim, ttl).await })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap_or(Checked { errors: 1, ..Checked::default() }));
    }
    out
}

/// The `proxy` scenario (see the module docs).
async fn run_proxy(s: &Scenario) -> Result<Outcome, Box<dyn Error>> {
    let wall = std::time::Instant::now();
    let creds = Credentials::generate("organizations/scale/apiKeys/proxy");
    let start_sim = || {
        SimExchange::builder()
            .products(s.products)
            .latency(LATENCY)
            .jwt_public_key_pem(&creds.public_key_pem())
            .start()
    };
    let sim = start_sim().await?;
    // The reference: the same reads through one coordinated source, on a simulator of its own
    // (same seed, same clock).
    let reference_sim = start_sim().await?;
    // It fetches what the proxy must to answer a ticker (the last trades and the book, the
    // proxy's default), so both serve the same data and their calls compare.
    let reference_client = reference_sim
        .client_builder()
        .credentials(creds.clone())
        .ticker_batch(tickshare::coinbase::TickerBatch::LastTradeAndBook)
        .build()?;
    let reference = CoordinatedSource::coinbase(reference_client).clock(reference_sim.clock()).build()?;
    let rss_before = rss_mib();
    let proxy = Proxy::builder(creds.clone())
        .upstream(sim.base_url())
        .listen("127.0.0.1:0".parse()?)
        .header_read_timeout(None)
        .clock(sim.clock())
        .start()
        .await?;
    // 250 naive clients, each with its own limiter and connection pool, signing with the key
    // the proxy verifies.
    let clients = (0..s.bots)
        .map(|_| {
            CoinbaseClient::builder()
                .base_url(proxy.base_url())
                .credentials(creds.clone())
                .clock(sim.clock())
                .build()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let products = sim.products();
    let (sim_handle, reference_handle) = (sim.handle(), reference_sim.handle());
    let ttl = CoordinatedConfig::default().ticker_ttl;

    let warmup_ticks = (s.warmup_hours * 3600 / TICK.as_secs()) as usize;
    let total_ticks = ((s.warmup_hours + s.hours) * 3600 / TICK.as_secs()).max(1) as usize;
    let start = tokio::time::Instant::now();
    let (mut through, mut alone) = (Checked::default(), Checked::default());
    let (mut warmup, mut reference_warmup): (Option<SimStats>, Option<SimStats>) = (None, None);
    let mut tick_ms = Vec::new();
    let mut cpu_ms = Vec::new();
    let (mut cold_tick_ms, mut cold_tick_calls) = (0.0, 0);
    for i in 0..total_ticks {
        tokio::time::sleep_until(start + TICK * i as u32).await;
        if i == warmup_ticks && i > 0 {
            warmup = Some(sim.stats());
            reference_warmup = Some(reference_sim.stats());
            sim.reset_stats();
            reference_sim.reset_stats();
        }
        let (cpu, t0) = (std::time::Instant::now(), tokio::time::Instant::now());
        // Every bot is a task of its own, as independent bots are.
        let via_proxy = async {
            let checks = naive_fleet_tick(
                clients.iter().map(|c| Arc::new(c.clone()) as Arc<dyn MarketDataSource>),
                &products,
                &sim_handle,
                ttl,
            )
            .await;
            (checks, t0.elapsed().as_secs_f64() * 1000.0)
        };
        let via_reference = naive_fleet_tick(
            (0..s.bots).map(|_| Arc::new(reference.clone()) as Arc<dyn MarketDataSource>),
            &products,
            &reference_handle,
            ttl,
        );
        let ((checks, ms), reference_checks) = tokio::join!(via_proxy, via_reference);
        checks.into_iter().for_each(|c| through += c);
        reference_checks.into_iter().for_each(|c| alone += c);
        if i == 0 {
            cold_tick_ms = ms;
            cold_tick_calls = sim.stats().total_calls;
        }
        if i >= warmup_ticks {
            tick_ms.push(ms);
            cpu_ms.push(cpu.elapsed().as_secs_f64() * 1000.0);
        }
    }
    tokio::time::sleep_until(start + TICK * total_ticks as u32).await;
    let (measured, reference_measured) = (sim.stats(), reference_sim.stats());
    let hours = s.hours.max(1) as f64;
    let client_stats: Vec<_> = clients.iter().map(CoinbaseClient::stats).collect();
    let proxy_stats = proxy.stats();
    let (w429, w1s) =
        warmup.as_ref().map_or((0, PerClass::default()), |w| (w.rate_limited_429, w.max_requests_in_any_1s));
    let figures = ProxyFigures {
        reference_calls_per_hour: reference_measured.total_calls as f64 / hours,
        client_requests: client_stats.iter().map(|c| c.total_requests).sum(),
        client_429: client_stats.iter().map(|c| c.rate_limited_429).sum(),
        proxy_limited: proxy_stats.limited,
        answer_mismatches: through.mismatches,
        answers_checked: through.answers,
        reference_errors: alone.errors
            + alone.mismatches
            + reference_warmup.map_or(0, |w| w.rate_limited_429)
            + reference_measured.rate_limited_429,
        rss_growth_mib: rss_mib().zip(rss_before).map(|(after, before)| after - before),
    };
    Ok(Outcome {
        scenario: s.name,
        bots: s.bots,
        products: s.products,
        latency_ms: LATENCY.as_millis() as u64,
        market_data: s.market_data,
        simulated_hours: s.warmup_hours + s.hours,
        ticks: total_ticks,
        calls_per_hour: Some(measured.total_calls as f64 / hours),
        calls_by_endpoint: measured
            .calls_by_endpoint
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| (k.clone(), *n as f64 / hours))
            .collect(),
        rate_limited_429: w429 + measured.rate_limited_429,
        max_requests_in_any_1s: max_per_class(w1s, measured.max_requests_in_any_1s),
        bot_errors: through.errors,
        peak_rss_mib: peak_rss_mib(),
        peak_rss_scope: "process",
        tick_ms_p50: percentile(&tick_ms, 0.50),
        tick_ms_p99: percentile(&tick_ms, 0.99),
        tick_ms_max: tick_ms.iter().copied().reduce(f64::max),
        tick_cpu_ms_p50: percentile(&cpu_ms, 0.50).unwrap_or(0.0),
        tick_cpu_ms_p99: percentile(&cpu_ms, 0.99).unwrap_or(0.0),
        cold_tick_ms,
        cold_tick_calls,
        cold_floor_ms: None,
        cold_exchange_floor_ms: None,
        last_series_exact_ms: None,
        last_series_exact_ms_p50: None,
        closes_measured: None,
        close_series_min: None,
        exact_floor_ms: None,
        exchange_floor_ms: None,
        provisional_series_max: None,
        goal: String::new(),
        met: true,
        real_seconds: wall.elapsed().as_secs_f64(),
        proxy: Some(figures),
        stream: None,
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
        "large" => {
            let floor = o.exact_floor_ms.unwrap_or(0.0);
            (
                format!(
                    "no 429, no bot error, peak RSS < 100 MiB, tick p99 < 100 ms, every hourly close's series exact within 1.1 x {floor:.0} ms (grace + {} calls at the limiter's rates)",
                    o.close_series_min.unwrap_or(0)
                ),
                clean
                    && o.peak_rss_mib.is_some_and(|m| m < 100.0)
                    && o.tick_ms_p99.is_some_and(|p| p < 100.0)
                    && o.closes_measured.is_some_and(|n| n >= (o.simulated_hours as usize).saturating_sub(2))
                    && o.last_series_exact_ms.is_some_and(|ms| ms <= 1.1 * floor),
            )
        }
        "large_cold" => {
            let floor = o.cold_floor_ms.unwrap_or(0.0);
            (
                format!(
                    "cold tick <= 1.2 x {floor:.0} ms ({} calls at the limiter's rates), no 429, no bot error",
                    o.cold_tick_calls
                ),
                clean && o.cold_tick_ms <= 1.2 * floor,
            )
        }
        "proxy" => {
            let met = o.proxy.as_ref().is_some_and(|p| {
                p.client_429 == 0
                    && p.proxy_limited == 0
                    && p.answer_mismatches == 0
                    && p.answers_checked > 0
                    && p.reference_errors == 0
                    && o.calls_per_hour.is_some_and(|c| c <= p.reference_calls_per_hour)
            });
            (
                "no 429 (exchange, clients, proxy), no client error, every answer right, calls/hour <= CoordinatedSource alone"
                    .to_string(),
                clean && met,
            )
        }
        "large_streaming" => (
            "calls/hour <= 15, 0 candle calls, no 429, every series exact, tick p50 and p99 < 50 ms, peak RSS < 100 MiB, <= 8 client messages/s and none refused"
                .to_string(),
            clean
                && o.calls_per_hour.is_some_and(|c| c <= 15.0)
                && o.tick_ms_p50.is_some_and(|p| p < 50.0)
                && o.tick_ms_p99.is_some_and(|p| p < 50.0)
                && o.peak_rss_mib.is_some_and(|m| m < 100.0)
                && o.stream.as_ref().is_some_and(|st| {
                    st.series_mismatched == 0
                        && st.candle_calls_per_hour == 0.0
                        && st.refused_messages == 0
                        && st.max_client_messages_in_any_1s <= 8
                }),
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
    candle_interval_ms: Option<u64>,
}

fn parse_args() -> Result<Args, Box<dyn Error>> {
    let mut a = Args { json: false, only: Vec::new(), hours: None, candle_interval_ms: None };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--json" => a.json = true,
            "--scenario" => a.only.push(it.next().ok_or("--scenario needs a name")?),
            "--hours" => {
                let v = it.next().ok_or("--hours needs a value")?;
                a.hours = Some(v.parse::<u64>().map_err(|_| format!("--hours: not a number: {v}"))?.max(1));
            }
            "--candle-interval-ms" => {
                let v = it.next().ok_or("--candle-interval-ms needs a value")?;
                a.candle_interval_ms = Some(
                    v.parse::<u64>().map_err(|_| format!("--candle-interval-ms: not a number: {v}"))?.max(1),
                );
            }
            "-h" | "--help" => {
                println!(
                    "usage: scale [--json] [--scenario cold_private_only|cold|seed_kpi|seed_kpi_refresh_ahead|seed_kpi_streaming|large|large_cold|large_streaming|proxy]... [--hours H (large's measured hours, default 23; large_streaming's, default 22)] [--candle-interval-ms MS (large_streaming's simulated candle cadence, default 1000 as Coinbase)]"
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
    if let Some(ms) = args.candle_interval_ms {
        let _ = CANDLE_INTERVAL.set(Duration::from_millis(ms));
    }
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
            read_timeout: None,
            start: None,
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
            read_timeout: None,
            start: None,
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
            read_timeout: None,
            start: None,
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
            read_timeout: None,
            start: None,
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
            read_timeout: None,
            start: None,
        },
        Scenario {
            name: "large",
            bots: 10_000,
            products: 500,
            warmup_hours: 1,
            hours: args.hours.unwrap_or(23),
            market_data: MarketDataPath::Balanced,
            // For the cold first tick only (see the module docs).
            max_wait: Duration::from_secs(60),
            lead: None,
            read_timeout: Some(Duration::from_secs(30)),
            start: Some(LARGE_START),
        },
        Scenario {
            name: "large_cold",
            bots: 10_000,
            products: 500,
            warmup_hours: 0,
            hours: 0,
            market_data: MarketDataPath::Balanced,
            max_wait: Duration::from_secs(60),
            lead: None,
            read_timeout: Some(Duration::from_secs(30)),
            start: Some(LARGE_START),
        },
        Scenario {
            name: "proxy",
            bots: 250,
            products: 50,
            warmup_hours: 1,
            hours: 3,
            market_data: MarketDataPath::Auto,
            max_wait: default_wait,
            lead: None,
            read_timeout: None,
            start: None,
        },
        Scenario {
            name: "large_streaming",
            bots: 10_000,
            products: 500,
            warmup_hours: 2,
            hours: args.hours.unwrap_or(22),
            market_data: MarketDataPath::Balanced,
            max_wait: Duration::from_secs(60),
            lead: None,
            read_timeout: None,
            start: None,
        },
    ];
    let mut outcomes = Vec::new();
    for s in scenarios.iter().filter(|s| args.only.is_empty() || args.only.iter().any(|n| n == s.name)) {
        let scoped = reset_peak_rss();
        // A fresh runtime (and paused clock) per scenario.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build()?;
        let mut o = if s.name == "proxy" { rt.block_on(run_proxy(s))? } else { rt.block_on(run(s))? };
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
            if let Some(p) = &o.proxy {
                println!(
                    "    reference (CoordinatedSource alone) {:.1} calls/h; clients sent {}, got {} x 429; {} of {} answers wrong; RSS grew {} MiB",
                    p.reference_calls_per_hour,
                    p.client_requests,
                    p.client_429,
                    p.answer_mismatches,
                    p.answers_checked,
                    p.rss_growth_mib.map_or("-".to_string(), |m| format!("{m:.1}")),
                );
            }
            if let Some(st) = &o.stream {
                println!(
                    "    stream: {} connections (<= {} products each, <= {} per message), candles every {} ms, {:.0} frames/h, feed CPU {:.0} ms/h (process outside ticks {} ms/h), {} reconnects, {} gaps, {} repairs, {}/{} series differ from REST, {} refused messages",
                    st.connections,
                    st.max_products_per_connection,
                    st.max_products_per_message,
                    st.candle_interval_ms,
                    st.messages_per_hour,
                    st.feed_cpu_ms_per_hour,
                    st.non_tick_cpu_ms_per_hour.map_or("-".to_string(), |v| format!("{v:.0}")),
                    st.reconnects,
                    st.sequence_gaps,
                    st.repairs,
                    st.series_mismatched,
                    st.series_checked,
                    st.refused_messages,
                );
            }
        }
    }
    if let Some(o) = outcomes.iter().find(|o| !o.met) {
        eprintln!("FAIL: {} missed its goal: {}", o.scenario, o.goal);
        std::process::exit(1);
    }
    Ok(())
}
