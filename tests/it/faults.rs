//! The fault suite (#7): a `CoordinatedSource` over real HTTP against the simulated exchange
//! while it misbehaves, on tokio's paused clock.
//!
//! Every scenario reads tickers (one batched `best_bid_ask` call per round), candles and
//! accounts once per simulated second, before, during and after the fault, and checks each
//! answer: fresh data equal to the exchange's ground truth (`price_at`, `candle_at`), stale
//! data flagged as such and no older than `max_stale`, or a typed error of the kinds the fault
//! can cause, never a wrong value. Then: the exchange never saw more requests in any second
//! than its limit, the source recovered by itself once the fault ended, and the source's stats
//! agree with the exchange's counters.

use std::{collections::BTreeMap, time::Duration};

use tickshare::{
    Account, BreakerConfig, BreakerState, CandleRange, Clock, CoinbaseClientBuilder, CoordinatedBuilder,
    CoordinatedSource, EndpointClass, Error, Fresh, Granularity, Origin, ProductId, ReadOptions, Ticker,
    sim::{Endpoint, Fault, SimBuilder, SimExchange},
};

use crate::support::fixed_clock;

const MAX_STALE: Duration = Duration::from_secs(30);
const G: Granularity = Granularity::OneMinute;

/// What the reads of a run saw.
#[derive(Debug, Default)]
struct Tally {
    upstream: u64,
    cache: u64,
    stale: u64,
    errors: BTreeMap<&'static str, u64>,
}

impl Tally {
    fn errors(&self, kind: &str) -> u64 {
        self.errors.get(kind).copied().unwrap_or(0)
    }
}

/// One scenario: the exchange, the source under test and the checks.
struct Run {
    sim: SimExchange,
    source: CoordinatedSource,
    clock: Clock,
    products: Vec<ProductId>,
    accounts: Vec<Account>,
    /// Error kinds this scenario's fault may cause.
    allowed: &'static [&'static str],
    tally: Tally,
}

impl Run {
    /// Start the exchange and a source with a 2 s client timeout and a quick breaker, then warm
    /// every cache with one fault-free round.
    async fn start(
        sim: SimBuilder,
        allowed: &'static [&'static str],
        client: impl FnOnce(CoinbaseClientBuilder) -> CoinbaseClientBuilder,
        source: impl FnOnce(CoordinatedBuilder) -> CoordinatedBuilder,
    ) -> Run {
        let clock = fixed_clock();
        let sim = sim.products(5).clock(clock).start().await.unwrap();
        let client =
            client(sim.client_builder().clock(clock).timeout(Duration::from_secs(2))).build().unwrap();
        let breaker = BreakerConfig {
            failure_threshold: 5,
            open_for: Duration::from_secs(2),
            max_open_for: Duration::from_secs(8),
            ..Default::default()
        };
        let source = source(
            CoordinatedSource::coinbase(client)
                .clock(clock)
                .max_stale(MAX_STALE)
                .ticker_ttl(Duration::from_secs(3))
                .accounts_ttl(Duration::from_secs(3))
                .candle_jitter(Duration::ZERO)
                .breaker(breaker),
        )
        .build()
        .unwrap();
        let products = sim.products();
        let mut run =
            Run { sim, source, clock, products, accounts: Vec::new(), allowed, tally: Tally::default() };
        run.accounts = run.source.accounts_with(ReadOptions::default()).await.unwrap().value.to_vec();
        assert!(!run.accounts.is_empty());
        run.round().await;
        assert_eq!(run.tally.errors, BTreeMap::new(), "the warm-up round failed");
        run
    }

    /// One round of reads, every answer checked. Returns whether every read was answered
    /// fresh (from the upstream or fresh cache).
    async fn round(&mut self) -> bool {
        let range = CandleRange::lookback(G, 30, self.clock.now_utc()).unwrap();
        let (tickers, candles, accounts) = tokio::join!(
            self.source.tickers_with(&self.products, ReadOptions::default()),
            self.source.candles_with(&self.products[0], G, range, ReadOptions::default()),
            self.source.accounts_with(ReadOptions::default()),
        );
        // Values first: whatever was served must be right.
        for (p, r) in &tickers {
            if let Ok(f) = r {
                self.check_ticker(p, &f.value);
            }
        }
        if let Ok(f) = &candles {
            self.check_candles(&f.value, range, f.age);
        }
        if let Ok(f) = &accounts {
            assert_eq!(f.value.as_slice(), self.accounts.as_slice());
        }
        // Then provenance and errors.
        let mut all_fresh = true;
        for (_, r) in &tickers {
            all_fresh &= self.count(r);
        }
        all_fresh &= self.count(&candles);
        all_fresh &= self.count(&accounts);
        all_fresh
    }

    /// Tally one answer: stale data must be within `max_stale`, errors of an expected kind.
    fn count<T>(&mut self, r: &Result<Fresh<T>, Error>) -> bool {
        match r {
            Ok(f) => {
                match f.origin {
                    Origin::Upstream => self.tally.upstream += 1,
                    Origin::Cache => self.tally.cache += 1,
                    Origin::Stale => {
                        assert!(f.age <= MAX_STALE, "stale data older than max_stale: {:?}", f.age);
                        self.tally.stale += 1;
                    }
                }
                f.origin != Origin::Stale
            }
            Err(e) => {
                assert!(self.allowed.contains(&e.kind()), "unexpected error kind {}: {e}", e.kind());
                *self.tally.errors.entry(e.kind()).or_default() += 1;
                false
            }
        }
    }

    /// The price is the exchange's price at the ticker's own time, and that time is no older
    /// than stale data may be.
    fn check_ticker(&self, p: &ProductId, t: &Ticker) {
        assert_eq!(&t.product, p);
        assert_eq!(self.sim.price_at(p, t.time), Some(t.price), "wrong price for {p} at {}", t.time);
        let age = self.clock.now_utc() - t.time;
        assert!(
            age >= time::Duration::ZERO && age <= MAX_STALE + Duration::from_secs(3),
            "ticker from {}",
            t.time
        );
    }

    /// The candles lie in the range, in order, and every candle that had closed when the
    /// series was fetched (`age` ago) equals the exchange's.
    fn check_candles(&self, candles: &[tickshare::Candle], range: CandleRange, age: Duration) {
        assert!(!candles.is_empty());
        assert!(candles.windows(2).all(|w| w[0].start < w[1].start));
        let fetched = self.clock.now_utc() - age;
        for c in candles {
            assert!(range.contains(c.start), "candle {} outside {range:?}", c.start);
            if c.start + G.duration() <= fetched {
                let truth = self.sim.candle_at(&self.products[0], G, c.start);
                assert_eq!(Some(*c), truth, "closed candle at {} differs", c.start);
            } else {
                assert!(c.low <= c.open.min(c.close) && c.high >= c.open.max(c.close), "{c:?}");
            }
        }
    }

    /// Read once per simulated second for `d`.
    async fn run_for(&mut self, d: Duration) {
        let end = tokio::time::Instant::now() + d;
        while tokio::time::Instant::now() < end {
            self.round().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Read once per simulated second until a round is all fresh; returns how long it took.
    async fn recover(&mut self, within: Duration) -> Duration {
        let start = tokio::time::Instant::now();
        loop {
            if self.round().await {
                return start.elapsed();
            }
            assert!(start.elapsed() <= within, "no recovery within {within:?}: {:?}", self.tally);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// The exchange never saw more requests in a second than its limits (10 public, 30
    /// private), and never answered 429 on its own.
    fn assert_within_limits(&self) {
        let s = self.sim.stats();
        assert!(s.max_requests_in_any_1s.public <= 10, "{:?}", s.max_requests_in_any_1s);
        assert!(s.max_requests_in_any_1s.private <= 30, "{:?}", s.max_requests_in_any_1s);
    }

    /// The source's stats agree with the reads' tally and the exchange's counters.
    fn assert_stats_agree(&self) {
        let st = self.source.stats();
        eprintln!("{:?}\nsource: {st:?}\nsim: {:?}", self.tally, self.sim.stats());
        assert_eq!(st.stale_serves, self.tally.stale, "{st:?}");
        // One failed batched call fails several reads, so compare kinds, not counts.
        for kind in self.tally.errors.keys() {
            assert!(st.errors_by_kind.get(*kind).copied().unwrap_or(0) > 0, "{kind}: {st:?}");
        }
    }
}

/// Let the data go stale (past every TTL), so the next round must ask the upstream.
async fn expire() {
    tokio::time::sleep(Duration::from_secs(4)).await;
}

#[tokio::test(start_paused = true)]
async fn five_xx_burst_serves_stale_opens_the_breaker_and_recovers() {
    let mut run = Run::start(SimBuilder::default(), &["upstream", "circuit_open"], |c| c, |s| s).await;
    expire().await;
    run.sim.add_fault(Fault::status(503).for_duration(Duration::from_secs(20)));
    run.run_for(Duration::from_secs(20)).await;
    // Every read during the burst was stale data or a typed error, never fresh: nothing
    // fresh could be had.
    assert!(run.tally.stale > 0, "{:?}", run.tally);
    let st = run.source.stats();
    assert!(st.breaker.private.opened >= 1, "{:?}", st.breaker);
    // The breaker kept the exchange from being hammered: the threshold, then only probes.
    let failures = run.sim.stats().responses(503);
    assert_eq!(st.errors_by_kind["upstream"], failures);
    // (Up to two more calls were already in flight when it opened.)
    assert!(failures <= 5 + 2 + st.breaker.private.probes, "{failures} 503s, {:?}", st.breaker);
    run.recover(Duration::from_secs(10)).await;
    assert_eq!(run.source.stats().breaker.private.state, BreakerState::Closed);
    run.assert_within_limits();
    run.assert_stats_agree();
    assert_eq!(run.source.stats().upstream_calls, run.sim.stats().total_calls);
}

#[tokio::test(start_paused = true)]
async fn a_short_5xx_burst_is_absorbed_by_retries() {
    let mut run = Run::start(SimBuilder::default(), &[], |c| c, |s| s).await;
    expire().await;
    // Two 500s: the retries of the first batched call absorb them; every read is fresh.
    run.sim.add_fault(Fault::status(500).on(Endpoint::Products).times(2));
    assert!(run.round().await, "{:?}", run.tally);
    let st = run.source.stats();
    assert_eq!((st.retries, st.errors_by_kind["upstream"]), (2, 2));
    assert_eq!(st.breaker.private.state, BreakerState::Closed);
    run.assert_within_limits();
}

#[tokio::test(start_paused = true)]
async fn stalled_responses_time_out_into_stale_data() {
    let mut run = Run::start(SimBuilder::default(), &["timeout", "circuit_open"], |c| c, |s| s).await;
    expire().await;
    run.sim.add_fault(Fault::stall(Duration::from_secs(60)).for_duration(Duration::from_secs(15)));
    run.run_for(Duration::from_secs(15)).await;
    assert!(run.tally.stale > 0, "{:?}", run.tally);
    let st = run.source.stats();
    assert!(st.errors_by_kind["timeout"] >= 5, "{st:?}");
    assert!(st.breaker.private.opened >= 1);
    run.recover(Duration::from_secs(10)).await;
    run.assert_within_limits();
    run.assert_stats_agree();
    assert_eq!(run.source.stats().errors_by_kind["timeout"], run.sim.stats().faults_injected);
}

#[tokio::test(start_paused = true)]
async fn slow_but_timely_responses_are_fresh() {
    let mut run = Run::start(SimBuilder::default(), &[], |c| c, |s| s).await;
    run.sim.add_fault(Fault::latency(Duration::from_millis(1500)).for_duration(Duration::from_secs(20)));
    for _ in 0..5 {
        expire().await;
        assert!(run.round().await, "{:?}", run.tally);
    }
    assert_eq!(run.tally.stale, 0);
    assert_eq!(run.source.stats().errors_by_kind, BTreeMap::new());
    run.assert_within_limits();
}

#[tokio::test(start_paused = true)]
async fn connection_resets_are_transport_errors_then_recovery() {
    let mut run = Run::start(SimBuilder::default(), &["transport", "circuit_open"], |c| c, |s| s).await;
    expire().await;
    run.sim.add_fault(Fault::connection_reset().for_duration(Duration::from_secs(10)));
    run.run_for(Duration::from_secs(10)).await;
    assert!(run.tally.stale > 0, "{:?}", run.tally);
    let st = run.source.stats();
    assert!(st.breaker.private.opened >= 1);
    assert_eq!(st.errors_by_kind["transport"], run.sim.stats().faults_injected);
    run.recover(Duration::from_secs(10)).await;
    run.assert_within_limits();
    run.assert_stats_agree();
}

#[tokio::test(start_paused = true)]
async fn malformed_bodies_are_decode_errors_never_data() {
    let mut run = Run::start(SimBuilder::default(), &["decode", "circuit_open"], |c| c, |s| s).await;
    expire().await;
    run.sim.add_fault(Fault::malformed_body().for_duration(Duration::from_secs(10)));
    run.run_for(Duration::from_secs(10)).await;
    let st = run.source.stats();
    // Decode errors are not retried (the same body would come back) but count for the breaker.
    assert_eq!(st.errors_by_kind["decode"], run.sim.stats().faults_injected);
    assert!(st.breaker.private.opened >= 1, "{:?}", st.breaker);
    assert!(run.tally.stale > 0);
    run.recover(Duration::from_secs(10)).await;
    run.assert_within_limits();
    run.assert_stats_agree();
}

#[tokio::test(start_paused = true)]
async fn truncated_bodies_fail_typed_and_recover() {
    let mut run =
        Run::start(SimBuilder::default(), &["transport", "decode", "circuit_open"], |c| c, |s| s).await;
    expire().await;
    run.sim.add_fault(Fault::truncated_body().for_duration(Duration::from_secs(10)));
    run.run_for(Duration::from_secs(10)).await;
    let st = run.source.stats();
    let typed = st.errors_by_kind.get("transport").copied().unwrap_or(0)
        + st.errors_by_kind.get("decode").copied().unwrap_or(0);
    assert_eq!(typed, run.sim.stats().faults_injected, "{st:?}");
    assert!(run.tally.stale > 0);
    run.recover(Duration::from_secs(10)).await;
    run.assert_within_limits();
    run.assert_stats_agree();
}

/// A 429 storm: the rate limiter pauses the class (as `Retry-After` says, or by its own
/// backoff), stale data is served, and the breaker stays closed (429s are not failures).
async fn storm(retry_after: bool, html: bool) {
    let sim = SimBuilder::default().retry_after(retry_after).html_429(html);
    let mut run = Run::start(sim, &["rate_limited"], |c| c, |s| s).await;
    expire().await;
    run.sim.add_fault(Fault::status(429).for_duration(Duration::from_secs(30)));
    run.run_for(Duration::from_secs(30)).await;
    assert!(run.tally.stale > 0, "{:?}", run.tally);
    let st = run.source.stats();
    assert_eq!(st.rate_limit_errors, run.sim.stats().rate_limited_429);
    assert!(st.limiter.as_ref().unwrap().private.rate_limit_pauses >= 1, "{st:?}");
    assert_eq!(st.breaker.private.opened, 0, "429s must not open the circuit");
    // Backing off kept the storm's 429s to at most two per simulated second.
    assert!(run.sim.stats().rate_limited_429 <= 2 * 30, "{}", run.sim.stats().rate_limited_429);
    run.recover(Duration::from_secs(70)).await;
    run.assert_within_limits();
    run.assert_stats_agree();
}

#[tokio::test(start_paused = true)]
async fn storm_of_429s_with_retry_after() {
    storm(true, false).await;
}

#[tokio::test(start_paused = true)]
async fn storm_of_429s_without_retry_after() {
    storm(false, false).await;
}

#[tokio::test(start_paused = true)]
async fn storm_of_html_429s() {
    storm(false, true).await;
}

#[tokio::test(start_paused = true)]
async fn exchange_down_for_a_while_then_back() {
    let mut run = Run::start(SimBuilder::default(), &["transport", "circuit_open"], |c| c, |s| s).await;
    expire().await;
    run.sim.set_down(true);
    run.run_for(Duration::from_secs(45)).await;
    // Stale data while it was young enough, then typed errors: the outage outlived max_stale.
    assert!(run.tally.stale > 0, "{:?}", run.tally);
    assert!(run.tally.errors("circuit_open") > 0, "{:?}", run.tally);
    let st = run.source.stats();
    assert!(st.breaker.private.opened >= 2, "{:?}", st.breaker);
    // Requests refused while down never reached the exchange's counters.
    assert_eq!(run.sim.stats().total_calls, st.upstream_calls - st.errors_by_kind["transport"]);
    run.sim.set_down(false);
    // Back within the longest open time (8 s) plus a round.
    run.recover(Duration::from_secs(10)).await;
    run.assert_within_limits();
    run.assert_stats_agree();
}

#[tokio::test(start_paused = true)]
async fn flaky_exchange_never_yields_wrong_data() {
    // 30 % of requests fail with 502 for a minute: retries and stale data hide most of it.
    let mut run =
        Run::start(SimBuilder::default().seed(7), &["upstream", "circuit_open"], |c| c, |s| s).await;
    run.sim.add_fault(Fault::error_rate(0.3, 502).for_duration(Duration::from_secs(60)));
    for _ in 0..15 {
        expire().await;
        run.round().await;
    }
    assert!(run.tally.upstream > 0, "{:?}", run.tally);
    run.recover(Duration::from_secs(70)).await;
    run.assert_within_limits();
    run.assert_stats_agree();
    assert_eq!(
        run.source.stats().errors_by_kind.get("upstream").copied().unwrap_or(0),
        run.sim.stats().responses(502)
    );
}

#[tokio::test(start_paused = true)]
async fn without_the_breaker_the_exchange_gets_every_retry() {
    // The same 5xx burst with the breaker off: the source keeps calling (bounded by the rate
    // limiter and retries), which is what the breaker saves the exchange from.
    let mut run =
        Run::start(SimBuilder::default(), &["upstream"], |c| c, |s| s.breaker(BreakerConfig::disabled()))
            .await;
    expire().await;
    run.sim.add_fault(Fault::status(503).for_duration(Duration::from_secs(20)));
    run.run_for(Duration::from_secs(20)).await;
    let with_breaker_bound = 5 + 20;
    assert!(run.sim.stats().responses(503) > with_breaker_bound, "{}", run.sim.stats().responses(503));
    assert_eq!(run.source.stats().breaker.private.opened, 0);
    run.recover(Duration::from_secs(2)).await;
    run.assert_within_limits();
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_fails_fast_and_sends_nothing() {
    let mut run = Run::start(SimBuilder::default(), &["upstream", "circuit_open"], |c| c, |s| s).await;
    expire().await;
    run.sim.add_fault(Fault::status(500));
    // Two rounds of failed calls (with retries) open the circuit.
    run.round().await;
    run.round().await;
    assert_eq!(run.source.stats().breaker.private.state, BreakerState::Open);
    let calls = run.sim.stats().total_calls;
    // A product never read before: no stale data to fall back on, so the typed error, at once.
    let t0 = tokio::time::Instant::now();
    let accounts = run.source.accounts_with(ReadOptions::max_age(Duration::ZERO)).await;
    let e = run.source.ticker_with(&"NOPE-USD".parse().unwrap(), ReadOptions::default()).await.unwrap_err();
    // At once: the ticker only waited for its batch window (5 ms) to close.
    assert!(t0.elapsed() <= Duration::from_millis(5), "{:?}", t0.elapsed());
    assert!(
        matches!(e, Error::CircuitOpen { class: EndpointClass::Private, retry_in } if retry_in <= Duration::from_secs(2)),
        "{e:?}"
    );
    assert!(e.is_retryable() && e.retry_after().is_some());
    // Cached accounts were served stale instead.
    assert!(accounts.unwrap().is_stale());
    assert_eq!(run.sim.stats().total_calls, calls, "nothing reached the exchange");
    assert!(run.source.stats().breaker.private.rejected >= 2);
    run.sim.clear_faults();
    run.recover(Duration::from_secs(3)).await;
}
