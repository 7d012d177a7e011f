//! Load (#7): many tasks reading tickers through one `CoordinatedSource` over real HTTP from
//! the simulated exchange, 99 % of the reads over 500 hot products and 1 % over a pool of cold
//! ones, on tokio's paused clock. Checks: every read answered with the exchange's price, zero
//! 429s at the exchange and no second over its limit, the cache bounded by its capacity
//! although the reads touch several times more products, and the run finishing (a deadlock
//! would let the paused clock run into the time limit).
//!
//! CI runs 100 tasks × 1,000 reads. The full form, 1,000 tasks × 1,000 reads:
//!
//! ```text
//! cargo test --release --test it load::full -- --ignored --nocapture
//! ```

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant as WallInstant},
};

use tickshare::{CoordinatedSource, Error, MarketDataSource, ProductId, sim::SimExchange};

use crate::support::fixed_clock;

const HOT: usize = 500;
const COLD: usize = 4_000;
const CAPACITY: u64 = 1_000;

#[derive(Debug)]
struct LoadReport {
    reads: u64,
    refused: u64,
    cold_reads: u64,
    distinct_products: u64,
    upstream_calls: u64,
    sim_calls: u64,
    sim_429: u64,
    max_private_in_1s: u64,
    cache_entries: u64,
    hit_rate: f64,
    simulated: Duration,
    wall: Duration,
    max_rss_kib: Option<u64>,
}

/// The peak resident set size of this process (`VmHWM`), when the OS tells it.
fn max_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Run the load. On the paused clock every read must succeed; on the real clock
/// (`refusals_allowed`) a read may also be refused locally by the rate limiter (typed, nothing
/// sent), since real time passes while the reads are served.
async fn load(tasks: usize, reads_per_task: usize, refusals_allowed: bool) -> LoadReport {
    let clock = fixed_clock();
    let sim = SimExchange::builder().products(HOT + COLD).clock(clock).start().await.unwrap();
    let source = CoordinatedSource::coinbase(sim.client_builder().clock(clock).build().unwrap())
        .clock(clock)
        .cache_capacity(CAPACITY)
        .build()
        .unwrap();
    let products: Arc<Vec<ProductId>> = Arc::new(sim.products());
    let cold_reads = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let cold_seen: Arc<Mutex<HashSet<usize>>> = Arc::default();
    let wall = WallInstant::now();
    let start = tokio::time::Instant::now();
    let mut handles = Vec::with_capacity(tasks);
    for task in 0..tasks {
        let (source, products, sim, cold_reads, cold_seen, refused) = (
            source.clone(),
            Arc::clone(&products),
            sim.handle(),
            Arc::clone(&cold_reads),
            Arc::clone(&cold_seen),
            Arc::clone(&refused),
        );
        handles.push(tokio::spawn(async move {
            let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (task as u64 + 1);
            for i in 0..reads_per_task {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let p = if rng.is_multiple_of(100) {
                    cold_reads.fetch_add(1, Ordering::Relaxed);
                    let i = HOT + (rng >> 8) as usize % COLD;
                    cold_seen.lock().unwrap().insert(i);
                    &products[i]
                } else {
                    &products[(rng >> 8) as usize % HOT]
                };
                let t = match source.ticker(p).await {
                    Ok(t) => t,
                    Err(Error::RateLimited { local: true, .. } | Error::Overloaded(_))
                        if refusals_allowed =>
                    {
                        refused.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Err(e) => panic!("read of {p} failed: {e}"),
                };
                if i.is_multiple_of(97) {
                    assert_eq!(sim.price_at(p, t.time), Some(t.price), "wrong price for {p}");
                }
                if i.is_multiple_of(64) {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    let all = async {
        for h in handles {
            h.await.unwrap();
        }
    };
    // On the paused clock a deadlock makes time jump straight to this limit.
    tokio::time::timeout(Duration::from_secs(600), all).await.expect("the load did not finish: deadlock?");
    let st = source.stats();
    let sim_stats = sim.stats();
    LoadReport {
        reads: (tasks * reads_per_task) as u64,
        refused: refused.load(Ordering::Relaxed),
        cold_reads: cold_reads.load(Ordering::Relaxed),
        distinct_products: (HOT + cold_seen.lock().unwrap().len()) as u64,
        upstream_calls: st.upstream_calls,
        sim_calls: sim_stats.total_calls,
        sim_429: sim_stats.rate_limited_429,
        max_private_in_1s: sim_stats.max_requests_in_any_1s.private,
        cache_entries: st.cache_entries,
        hit_rate: st.hit_rate,
        simulated: start.elapsed(),
        wall: wall.elapsed(),
        max_rss_kib: max_rss_kib(),
    }
}

fn check(r: &LoadReport) {
    eprintln!(
        "load: {} reads ({} refused, {} cold) over {} products in {:.2} s wall, {:.1} s simulated; {} upstream calls, \
         hit rate {:.4}, {} cache entries (capacity {CAPACITY}), 429s {}, peak {}/s private, max RSS {} KiB",
        r.reads,
        r.refused,
        r.cold_reads,
        r.distinct_products,
        r.wall.as_secs_f64(),
        r.simulated.as_secs_f64(),
        r.upstream_calls,
        r.hit_rate,
        r.cache_entries,
        r.sim_429,
        r.max_private_in_1s,
        r.max_rss_kib.map_or_else(|| "?".to_string(), |k| k.to_string()),
    );
    assert_eq!(r.sim_429, 0, "{r:?}");
    assert!(r.max_private_in_1s <= 30, "{r:?}");
    assert_eq!(r.upstream_calls, r.sim_calls);
    // The cold reads touched far more products than the cache may hold, and it held no more
    // than its capacity (moka's count may lag a little behind the latest inserts).
    assert!(r.distinct_products > CAPACITY + CAPACITY / 4, "{r:?}");
    assert!(r.cache_entries <= CAPACITY + CAPACITY / 10, "{r:?}");
    assert!(r.hit_rate > 0.9, "{r:?}");
}

#[tokio::test(start_paused = true)]
async fn short() {
    let r = load(100, 1_000, false).await;
    check(&r);
    assert_eq!(r.reads, 100_000);
}

/// The full form on a multi-threaded runtime and the real clock: the same checks, with reads
/// refused locally allowed (and counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: cargo test --release --test it load::full_multi_thread -- --ignored --nocapture"]
async fn full_multi_thread() {
    let r = load(1_000, 1_000, true).await;
    check(&r);
    assert_eq!(r.reads, 1_000_000);
}

#[tokio::test(start_paused = true)]
#[ignore = "long: cargo test --release --test it load::full -- --ignored --nocapture"]
async fn full() {
    let r = load(1_000, 1_000, false).await;
    check(&r);
    assert_eq!(r.reads, 1_000_000);
    assert_eq!(r.refused, 0);
}

/// With a queue at the rate limiter (a candle backfill of 60 products), a balance read is
/// served first and a ticker read next, instead of after the backfill.
#[tokio::test(start_paused = true)]
async fn balance_reads_jump_the_backfill_queue() {
    use tickshare::{CandleRange, Granularity};
    let clock = fixed_clock();
    let sim = SimExchange::builder().products(61).clock(clock).start().await.unwrap();
    let client = sim.client_builder().clock(clock).build().unwrap();
    let products = sim.products();
    let range = CandleRange::lookback(Granularity::OneHour, 24, clock.now_utc()).unwrap();
    let start = tokio::time::Instant::now();
    let backfill: Vec<_> = products[1..]
        .iter()
        .map(|p| {
            let (c, p) = (client.clone(), p.clone());
            tokio::spawn(async move {
                c.candles(&p, Granularity::OneHour, range).await.unwrap();
                start.elapsed()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (accounts, ticker) = tokio::join!(
        async {
            client.accounts().await.unwrap();
            start.elapsed()
        },
        async {
            client.ticker(&products[0]).await.unwrap();
            start.elapsed()
        }
    );
    let mut candles = Vec::new();
    for h in backfill {
        candles.push(h.await.unwrap());
    }
    candles.sort();
    let last = *candles.last().unwrap();
    // 60 requests at 24/s after a burst of 5 take about 2.3 s; the balance read came out
    // within two admission intervals of asking, the ticker right after it.
    assert!(last >= Duration::from_secs(2), "{last:?}");
    assert!(accounts <= Duration::from_millis(100 + 2 * 42), "accounts at {accounts:?}");
    assert!(ticker <= Duration::from_millis(100 + 3 * 42), "ticker at {ticker:?}");
    // Both overtake the bulk reads; the balance read is never served after the ticker.
    assert!(accounts <= ticker);
    let before_ticker = candles.iter().filter(|t| **t < ticker).count();
    assert!(before_ticker <= 8, "{before_ticker} candle requests went before the ticker");
    assert_eq!(sim.stats().rate_limited_429, 0);
}
