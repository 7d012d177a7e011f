//! An exchange that fails for a minute, and one that stalls: the coordinated source with its
//! default settings (breaker, retries, read timeout) on tokio's paused clock, 25 bots' worth of
//! reads ticking every 10 s, as measured from outside in issue #16.

use std::time::Duration;

use tickshare::{
    CandleRange, Clock, CoordinatedSource, Error, Fresh, Granularity, Origin, ProductId, ReadOptions, Result,
    sim::{Fault, SimExchange},
};

use crate::support::fixed_clock;

const TICK: Duration = Duration::from_secs(10);
const G: Granularity = Granularity::FiveMinute;

/// What one tick's reads got: fresh answers (upstream or fresh cache), stale ones, errors.
#[derive(Debug, Default, PartialEq, Eq)]
struct Seen {
    fresh: usize,
    stale: usize,
    failed: usize,
}

impl Seen {
    fn add<T>(&mut self, r: &Result<Fresh<T>>) {
        match r {
            Ok(f) if f.origin == Origin::Stale => self.stale += 1,
            Ok(_) => self.fresh += 1,
            Err(_) => self.failed += 1,
        }
    }
}

/// One tick: every product's ticker (batched), two bots' candles, the accounts.
async fn tick(source: &CoordinatedSource, clock: Clock, products: &[ProductId], opts: ReadOptions) -> Seen {
    let range = CandleRange::lookback(G, 20, clock.now_utc()).unwrap();
    let (tickers, c0, c1, accounts) = tokio::join!(
        source.tickers_with(products, opts),
        source.candles_with(&products[0], G, range, opts),
        source.candles_with(&products[1], G, range, opts),
        source.accounts_with(opts),
    );
    let mut seen = Seen::default();
    tickers.iter().for_each(|(_, r)| seen.add(r));
    seen.add(&c0);
    seen.add(&c1);
    seen.add(&accounts);
    seen
}

/// 25 products on the simulated exchange with `latency`, and a coordinated source with its
/// default settings over it.
async fn start(latency: Duration) -> (SimExchange, CoordinatedSource, Clock, Vec<ProductId>) {
    let clock = fixed_clock();
    let sim = SimExchange::builder().latency(latency).products(25).clock(clock).start().await.unwrap();
    let client = sim.client_builder().clock(clock).build().unwrap();
    let source =
        CoordinatedSource::coinbase(client).clock(clock).candle_jitter(Duration::ZERO).build().unwrap();
    let products = sim.products();
    (sim, source, clock, products)
}

#[tokio::test(start_paused = true)]
async fn after_a_minute_of_500s_the_first_tick_is_fresh_and_the_outage_cost_little() {
    let (sim, source, clock, products) = start(Duration::from_millis(30)).await;
    let healthy = tick(&source, clock, &products, ReadOptions::default()).await;
    assert_eq!(healthy, Seen { fresh: 28, stale: 0, failed: 0 });

    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = sim.stats().total_calls;
    // From 5 s to 60 s every request fails with 500.
    sim.add_fault(Fault::status(500).for_duration(Duration::from_secs(55)));
    let mut during = Vec::new();
    // Ticks at 15, 25, ..., 55 s: inside the outage.
    for _ in 0..5 {
        tokio::time::sleep(TICK).await;
        during.push(tick(&source, clock, &products, ReadOptions::default()).await);
    }
    let outage_calls = sim.stats().total_calls - before;
    // Every read got an answer: stale within max_stale (60 s), errors after that, never a panic.
    assert!(during.iter().all(|s| s.fresh + s.stale + s.failed == 28), "{during:?}");
    assert!(during.iter().any(|s| s.stale > 0), "{during:?}");
    // The first tick's calls with their retries (3 calls × 3 attempts, until the breaker opens
    // after 5 failures) and then about one probe per tick: the outage does not hammer the
    // exchange.
    assert!(outage_calls <= 5 + 6, "{outage_calls} requests during the outage");

    // The first tick after the exchange is back (70 s) is fresh for every read.
    tokio::time::sleep(TICK).await;
    let recovered = tick(&source, clock, &products, ReadOptions::default()).await;
    assert_eq!(recovered, Seen { fresh: 28, stale: 0, failed: 0 }, "during: {during:?}");
    assert_eq!(source.stats().breaker.private.state, tickshare::BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_stalled_exchange_does_not_stall_a_tick_with_a_deadline() {
    let (sim, source, clock, products) = start(Duration::ZERO).await;
    assert_eq!(tick(&source, clock, &products, ReadOptions::default()).await.failed, 0);

    // Every request now hangs for 40 s: the client's timeout (10 s) × (1 + 2 retries) is 31 s.
    sim.add_fault(Fault::stall(Duration::from_secs(40)).for_duration(Duration::from_secs(30)));
    tokio::time::sleep(TICK).await;
    let t0 = tokio::time::Instant::now();
    let budget = Duration::from_secs(3);
    let stalled = tick(&source, clock, &products, ReadOptions::default().by(t0 + budget)).await;
    assert!(t0.elapsed() <= budget + Duration::from_millis(10), "the tick took {:?}", t0.elapsed());
    // Tickers and accounts expired (5 s, 10 s TTLs): stale-flagged by the deadline; the candle
    // series are fresh until the five-minute close and need no call.
    assert_eq!(stalled, Seen { fresh: 2, stale: 26, failed: 0 }, "by the deadline");
    assert!(source.stats().deadline_misses >= 4);

    // Without a per-read deadline the default read_timeout (15 s) bounds a read too.
    let t0 = tokio::time::Instant::now();
    let r = source.ticker_with(&products[0], ReadOptions::default()).await;
    assert!(t0.elapsed() <= Duration::from_secs(15) + Duration::from_millis(10), "{:?}", t0.elapsed());
    assert!(matches!(&r, Ok(f) if f.origin == Origin::Stale), "{r:?}");

    // A product never fetched has nothing stale: a typed error by the deadline.
    let t0 = tokio::time::Instant::now();
    let cold = source
        .candles_with(
            &products[5],
            G,
            CandleRange::lookback(G, 5, clock.now_utc()).unwrap(),
            ReadOptions::default().by(t0 + budget),
        )
        .await;
    assert!(matches!(cold, Err(Error::Timeout)), "{cold:?}");

    // Once the exchange answers again, the next tick is fresh.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let after = tick(&source, clock, &products, ReadOptions::default()).await;
    assert_eq!(after, Seen { fresh: 28, stale: 0, failed: 0 });
}
