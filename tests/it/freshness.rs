//! The freshness contract of the candle in progress, on the simulator over many ticks:
//! `live` (patched from the last trades the source serves, at no extra call), `exact`
//! (refetched when older than a bound, the calls counted) and `closed_only`.

use std::time::Duration;

use tickshare::{
    CandleFidelity, CandleRange, CoordinatedSource, Granularity, InProgressCandle, MarketDataSource,
    ProductId, ReadOptions, sim::SimExchange,
};

use crate::support::fixed_clock;

fn pid(s: &str) -> ProductId {
    s.parse().unwrap()
}

const G: Granularity = Granularity::OneHour;

async fn setup(mode: InProgressCandle) -> (SimExchange, CoordinatedSource) {
    let sim = SimExchange::builder().clock(fixed_clock()).products(5).start().await.unwrap();
    let client = sim.client_builder().clock(sim.clock()).build().unwrap();
    let source = CoordinatedSource::coinbase(client)
        .clock(sim.clock())
        .in_progress(mode)
        .in_progress_max_age(Duration::from_secs(20))
        .build()
        .unwrap();
    (sim, source)
}

fn range(sim: &SimExchange) -> CandleRange {
    CandleRange::lookback(G, 24, sim.clock().now_utc()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn live_in_progress_candle_follows_every_price_the_source_served() {
    let (sim, source) = setup(InProgressCandle::Live).await;
    let products: Vec<ProductId> = sim.products();
    // Unlimited: the reference fetch must not wait for a limiter (five candle reads per tick
    // are paced one at a time), or its candle in progress would be later than the source's.
    let exact = sim.client_builder().clock(sim.clock()).unlimited().build().unwrap();
    let mut seen: Vec<(ProductId, time::OffsetDateTime, tickshare::Decimal)> = Vec::new();
    let (mut patched, mut mismatched_close_bps) = (0, Vec::new());
    // 200 ticks 37 s apart: more than two hours, two hourly closes.
    for _ in 0..200 {
        let tickers = source.tickers(&products).await.unwrap();
        for t in &tickers {
            seen.push((t.product.clone(), t.time, t.price));
        }
        for p in &products {
            let read = source.candles_with(p, G, range(&sim), ReadOptions::default()).await.unwrap();
            let last = *read.value.last().unwrap();
            let ticker = tickers.iter().find(|t| &t.product == p).unwrap();
            let now = sim.clock().now_utc();
            let open = G.bucket_start(now);
            assert_eq!(last.start, open, "the bucket in progress is served");
            let ip = read.in_progress.expect("the last candle is in progress");
            if ip.fidelity == CandleFidelity::Patched {
                patched += 1;
                // Its close is the latest price the source served ...
                assert_eq!(last.close, ticker.price, "{p}");
                assert_eq!(ip.as_of, ticker.time);
            }
            // ... and its high and low bracket every price it saw in this bucket.
            for (_, _, px) in seen.iter().filter(|(q, at, _)| q == p && *at >= open) {
                assert!(last.low <= *px && *px <= last.high, "{p}: {px} outside {last:?}");
            }
            // Closed candles equal a fresh fetch, exactly.
            let fresh = exact.candles(p, G, range(&sim)).await.unwrap();
            let closed = read.value.len() - 1;
            assert_eq!(read.value[..closed], fresh[..closed], "{p}");
            // The patched in-progress candle is close to the exchange's own (the sim's last
            // trade is the price now, so the close matches to the millisecond of the tick).
            let truth = fresh.last().unwrap();
            let bps: f64 = ((last.close - truth.close).abs() / truth.close
                * tickshare::Decimal::from(10_000))
            .to_string()
            .parse()
            .unwrap();
            mismatched_close_bps.push(bps);
        }
        tokio::time::sleep(Duration::from_secs(37)).await;
    }
    let st = source.stats();
    assert!(patched > 500, "{patched}");
    assert!(st.live_patches > 0);
    let worst = mismatched_close_bps.iter().copied().fold(0.0, f64::max);
    assert!(worst < 0.5, "in-progress close off by {worst} bps at most");
    // Live costs nothing: one batched ticker call per tick, and each series fetched once plus
    // once per hourly close.
    assert_eq!(st.upstream_calls_by_endpoint["tickers"], 200);
    assert!(st.upstream_calls_by_endpoint["candles"] <= 5 * 4, "{:?}", st.upstream_calls_by_endpoint);
    assert_eq!(st.in_progress_refetches, 0);
}

#[tokio::test(start_paused = true)]
async fn exact_mode_matches_a_fresh_fetch_and_counts_its_calls() {
    let (sim, source) = setup(InProgressCandle::Exact).await;
    let btc = pid("BTC-USD");
    let exact = sim.client_builder().clock(sim.clock()).build().unwrap();
    for _ in 0..120 {
        let _ = source.ticker(&btc).await.unwrap();
        let read = source.candles_with(&btc, G, range(&sim), ReadOptions::default()).await.unwrap();
        let fresh = exact.candles(&btc, G, range(&sim)).await.unwrap();
        let ip = read.in_progress.unwrap();
        assert_eq!(ip.fidelity, CandleFidelity::Exact);
        let age = sim.clock().now_utc() - ip.as_of;
        assert!(age <= time::Duration::seconds(20), "{age}");
        // Within the bound the candle is as the exchange answered at `as_of`; right after a
        // refetch it is the exchange's candle now.
        if age.is_zero() {
            assert_eq!(read.value, fresh);
        } else {
            let closed = read.value.len() - 1;
            assert_eq!(read.value[..closed], fresh[..closed]);
        }
        tokio::time::sleep(Duration::from_secs(7)).await;
    }
    let st = source.stats();
    assert!(st.in_progress_refetches >= 30, "{}", st.in_progress_refetches);
    // The first fetch, the counted refetches, and the refresh after the 10:00 close.
    assert_eq!(st.upstream_calls_by_endpoint["candles"], 2 + st.in_progress_refetches);
    assert_eq!(st.live_patches, 0);
}

#[tokio::test(start_paused = true)]
async fn closed_only_never_returns_the_bucket_in_progress() {
    let (sim, source) = setup(InProgressCandle::ClosedOnly).await;
    let products = sim.products();
    for _ in 0..100 {
        source.tickers(&products).await.unwrap();
        for p in &products {
            let read = source.candles_with(p, G, range(&sim), ReadOptions::default()).await.unwrap();
            let open = G.bucket_start(sim.clock().now_utc());
            assert!(read.value.iter().all(|c| c.start < open), "{p}");
            assert_eq!(read.value.last().unwrap().start, open - G.duration());
            assert!(read.in_progress.is_none());
            let via_trait = source.candles(p, G, range(&sim)).await.unwrap();
            assert!(via_trait.iter().all(|c| c.start < open));
        }
        tokio::time::sleep(Duration::from_secs(53)).await;
    }
    assert_eq!(source.stats().live_patches, 0);
}

/// A coordinated path that really diverges: its tickers are 1 % high.
struct Inflated(CoordinatedSource);

#[async_trait::async_trait]
impl MarketDataSource for Inflated {
    async fn ticker(&self, p: &ProductId) -> tickshare::Result<tickshare::Ticker> {
        let mut t = self.0.ticker(p).await?;
        t.price *= tickshare::Decimal::new(101, 2);
        Ok(t)
    }
    async fn tickers(&self, p: &[ProductId]) -> tickshare::Result<Vec<tickshare::Ticker>> {
        let mut out = Vec::new();
        for q in p {
            out.push(self.ticker(q).await?);
        }
        Ok(out)
    }
    async fn candles(
        &self,
        p: &ProductId,
        g: Granularity,
        r: CandleRange,
    ) -> tickshare::Result<Vec<tickshare::Candle>> {
        self.0.candles(p, g, r).await
    }
    async fn accounts(&self) -> tickshare::Result<Vec<tickshare::Account>> {
        self.0.accounts().await
    }
}

async fn shadow_run(broken: bool) -> tickshare::MigrationReport {
    use std::sync::Arc;
    let (sim, source) = setup(InProgressCandle::Live).await;
    let legacy = tickshare::DirectSource::new(sim.client_builder().clock(sim.clock()).build().unwrap());
    let coordinated: Arc<dyn MarketDataSource> =
        if broken { Arc::new(Inflated(source)) } else { Arc::new(source) };
    let shadow = tickshare::ShadowSource::new(Arc::new(legacy), coordinated);
    let products = sim.products();
    for _ in 0..60 {
        for p in &products {
            shadow.ticker(p).await.unwrap();
            // A bot reads its ticker, then its candles (as the evaluator's snapshot does).
            shadow.wait_idle().await;
            shadow.candles(p, G, range(&sim)).await.unwrap();
        }
        shadow.validate_trade_balance("USD", tickshare::Decimal::ONE).await.unwrap();
        shadow.wait_idle().await;
        tokio::time::sleep(Duration::from_secs(61)).await;
    }
    shadow.report()
}

#[tokio::test(start_paused = true)]
async fn shadow_report_is_safe_on_a_faithful_path_and_holds_on_a_broken_one() {
    let ok = shadow_run(false).await;
    assert!(ok.comparisons >= 200, "{ok:?}");
    assert_eq!(ok.closed_candle_mismatches, 0, "{ok:?}");
    assert!(ok.safe_to_migrate, "{ok:?}");
    let gate = tickshare::MigrationGate { min_comparisons: 200, ..Default::default() };
    assert!(ok.gate(&gate).is_proceed());
    // Requiring decision agreement that was not measured holds the rollout, saying why.
    let strict = tickshare::MigrationGate { min_decision_agreement: 1.0, ..gate };
    assert!(
        matches!(ok.gate(&strict), tickshare::GateVerdict::Hold { reasons } if reasons[0].contains("decision"))
    );

    let bad = shadow_run(true).await;
    assert!(!bad.safe_to_migrate, "{bad:?}");
    assert!(bad.worst_ticker_bps >= 99.0, "{bad:?}");
    assert!(bad.reasons.iter().any(|r| r.contains("ticker")), "{:?}", bad.reasons);
    let json = serde_json::to_value(&bad).unwrap();
    assert_eq!(json["safe_to_migrate"], false);
}

#[tokio::test(start_paused = true)]
async fn the_marks_reach_a_host_through_the_trait() {
    // A host holds its sources as `Arc<dyn MarketDataSource>` (the selector's routes):
    // `candles_fresh` tells it an exact candle in progress from a patched one, on both paths.
    let (sim, source) = setup(InProgressCandle::Live).await;
    let legacy = tickshare::DirectSource::new(sim.client_builder().clock(sim.clock()).build().unwrap());
    let selector = tickshare::SourceSelector::new(
        std::sync::Arc::new(legacy.clone()),
        std::sync::Arc::new(source.clone()),
        tickshare::MigrationFlags {
            enabled: true,
            bot_ids: ["new".to_string()].into(),
            ..Default::default()
        },
    );
    let p = pid("BTC-USD");
    let (old, new) = (selector.source_for("old"), selector.source_for("new"));
    // Into the hour, so the bucket in progress has trades.
    tokio::time::sleep(Duration::from_secs(90)).await;
    let first = new.candles_fresh(&p, G, range(&sim)).await.unwrap();
    assert_eq!(selector.route("new"), tickshare::Route::Coordinated);
    let ip = first.in_progress.expect("the last candle is in progress");
    assert_eq!((ip.fidelity, ip.patches), (CandleFidelity::Exact, 0), "just fetched");
    assert_eq!(first.origin, tickshare::Origin::Upstream);
    // Later prices patch it: the coordinated answer says so, from the cache.
    tokio::time::sleep(Duration::from_secs(30)).await;
    new.tickers(std::slice::from_ref(&p)).await.unwrap();
    let later = new.candles_fresh(&p, G, range(&sim)).await.unwrap();
    assert_eq!(later.origin, tickshare::Origin::Cache);
    let ip = later.in_progress.unwrap();
    assert_eq!(ip.fidelity, CandleFidelity::Patched);
    assert!(ip.patches >= 1 && ip.as_of > first.in_progress.unwrap().as_of, "{ip:?}");
    // The legacy path's answer is the exchange's own, exact as of now, and counted as a call.
    let direct = old.candles_fresh(&p, G, range(&sim)).await.unwrap();
    let ip = direct.in_progress.unwrap();
    assert_eq!((ip.fidelity, ip.as_of), (CandleFidelity::Exact, sim.clock().now_utc()));
    assert_eq!(direct.value.last().map(|c| c.start), Some(G.bucket_start(sim.clock().now_utc())));
    assert_eq!(legacy.stats().upstream_calls, 1);
    // A series that ends at a closed candle carries no mark.
    let closed = CandleRange::new(range(&sim).start, G.bucket_start(sim.clock().now_utc())).unwrap();
    assert!(old.candles_fresh(&p, G, closed).await.unwrap().in_progress.is_none());
}

/// A fleet of one bot per product on its own exchange (the fixed clock, 30 ms latency, both
/// classes), its products in `order` reversed or not, and a source that draws no jitter (so
/// the refresh order after a close is the source's tie-break alone).
async fn close_fleet(
    products: usize,
    reverse: bool,
) -> (SimExchange, CoordinatedSource, tickshare::BatchEvaluator, Vec<tickshare::Bot>) {
    let sim = SimExchange::builder()
        .clock(fixed_clock())
        .products(products)
        .latency(Duration::from_millis(30))
        .start()
        .await
        .unwrap();
    let client = sim
        .client_builder()
        .clock(sim.clock())
        .market_data(tickshare::MarketDataPath::Balanced)
        .build()
        .unwrap();
    let source =
        CoordinatedSource::coinbase(client).clock(sim.clock()).candle_jitter(Duration::ZERO).build().unwrap();
    let eval = tickshare::BatchEvaluator::new(std::sync::Arc::new(source.clone()))
        .clock(sim.clock())
        .meter(std::sync::Arc::new(source.clone()));
    let mut ids = sim.products();
    if reverse {
        ids.reverse();
    }
    let strategy: std::sync::Arc<dyn tickshare::Strategy> =
        std::sync::Arc::new(tickshare::MovingAverageCrossover::default());
    let bots = ids
        .into_iter()
        .enumerate()
        .map(|(i, p)| tickshare::Bot::new(format!("bot-{i:02}"), p, std::sync::Arc::clone(&strategy)))
        .collect();
    (sim, source, eval, bots)
}

/// #18: the tick just after an hourly close is served at once, every series that has not
/// been refreshed yet marked provisional (its 09:00 candle as last known); the series are
/// refreshed in the background in an order that does not follow the bots' order, all of them
/// exact within the floor the limiter sets (the grace, then 50 calls at 8/s + 24/s), and then
/// equal to a fresh fetch.
#[tokio::test(start_paused = true)]
async fn after_an_hourly_close_the_tick_is_served_at_once_and_the_series_become_exact() {
    let n = 50;
    let (sim, source, eval, bots) = close_fleet(n, false).await;
    let (sim_r, source_r, eval_r, bots_r) = close_fleet(n, true).await;
    // What the exchange closed, without a request (the reads below must not compete with the
    // refresh for the exchange's limits).
    let exchange = |p: &ProductId, c: &tickshare::Candle| sim.candle_at(p, G, c.start) == Some(*c);
    // Cold at 09:56:38: every series fetched, its 09:00 candle in progress.
    for (e, b) in [(&eval, &bots), (&eval_r, &bots_r)] {
        let cold = e.evaluate_all(b).await;
        assert_eq!(cold.errors().count(), 0);
    }
    let close = time::macros::datetime!(2024-04-24 10:00 UTC);
    tokio::time::sleep_until(sim.clock().instant_at(close) + Duration::from_millis(700)).await;

    // 10:00:00.7: the refresh began at 10:00:00.5; the tick does not wait for it.
    for (e, b) in [(&eval, &bots), (&eval_r, &bots_r)] {
        let tick = e.evaluate_all(b).await;
        assert_eq!(tick.errors().count(), 0);
        assert!(tick.provisional_series >= 30, "{}", tick.provisional_series);
        // One ticker batch and the accounts (the series alone would take 1.5 s at the limits).
        assert!(tick.duration < Duration::from_millis(200), "{:?}", tick.duration);
    }
    let now = sim.clock().now_utc();
    let range = CandleRange::lookback(G, 24, now).unwrap();
    let mut provisional = 0;
    for p in sim.products() {
        let read = source.candles_with(&p, G, range, ReadOptions::default()).await.unwrap();
        let closed = &read.value[..read.value.len() - 1];
        match read.provisional {
            Some(mark) => {
                provisional += 1;
                assert_eq!(read.in_progress, None);
                let last = read.value.last().unwrap();
                assert_eq!((last.start, mark.start), (close - G.duration(), close - G.duration()));
                assert!(mark.as_of < close);
                // Every candle before it is the exchange's.
                assert!(closed.iter().all(|c| exchange(&p, c)), "{p}");
            }
            None => {
                assert_eq!(read.value.last().unwrap().start, close, "{p}: refreshed");
                assert!(closed.iter().all(|c| exchange(&p, c)), "{p}");
            }
        }
    }
    assert!(provisional >= 30, "{provisional}");

    // 10:00:05: every series exact, the last within the floor (the grace, then 50 calls at
    // the limiter's 32/s, with the ticks' own calls served first).
    tokio::time::sleep_until(sim.clock().instant_at(close) + Duration::from_secs(5)).await;
    for s in [&source, &source_r] {
        let st = s.stats().close_refresh;
        assert_eq!((st.refreshed, st.failed, st.pending), (n as u64, 0, 0));
        let c = st.recent_closes.iter().find(|c| c.close == close).unwrap();
        assert_eq!((c.series, c.exact), (n as u64, n as u64));
        let after = c.last_exact_after_ms.unwrap();
        let floor = 500.0 + n as f64 / 32.0 * 1000.0;
        assert!(after >= 500.0 && after <= floor + 150.0, "{after} ms (floor {floor} ms)");
    }
    let range = CandleRange::lookback(G, 24, sim.clock().now_utc()).unwrap();
    for p in sim.products() {
        let read = source.candles_with(&p, G, range, ReadOptions::default()).await.unwrap();
        assert_eq!(read.provisional, None, "{p}");
        let closed = &read.value[..read.value.len() - 1];
        assert_eq!(closed.len(), 23);
        assert!(closed.iter().all(|c| exchange(&p, c)), "{p}: the 09:00 candle as the exchange closed it");
    }

    // Fair: each series refreshed once, in the same order for both fleets although their bots
    // read in opposite orders.
    // (The refreshes are the requests from the 09:00 bucket; the reference reads ask 24.)
    let from = (close - G.duration()).unix_timestamp();
    let order = |sim: &SimExchange| -> Vec<ProductId> {
        let reqs = sim.stats().recent_candle_requests;
        reqs.iter().filter(|r| r.start == from).map(|r| r.product.clone()).collect()
    };
    let (a, b) = (order(&sim), order(&sim_r));
    assert_eq!(a, b);
    let mut distinct = a.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), n);
    assert_ne!(a, sim.products(), "not the bots' order");
    for s in [sim.stats(), sim_r.stats()] {
        assert_eq!(s.rate_limited_429, 0);
    }
}
