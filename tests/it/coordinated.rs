//! `CoordinatedSource` over real HTTP against the simulated exchange: the seed's three tests
//! made strict, plus TTLs, candle closes, stale serving, negative caching and 429 backoff on
//! tokio's paused clock.

use std::time::Duration;

use tickshare::{
    CandleRange, CoordinatedSource, Error, Granularity, MarketDataSource, Origin, ProductId, ReadOptions,
    sim::{Endpoint, Fault, SimExchange},
};
use time::macros::datetime;

fn pid(s: &str) -> ProductId {
    s.parse().unwrap()
}

#[tokio::test(start_paused = true)]
async fn seed_a_sequential_reads_are_one_call() {
    let sim = SimExchange::builder().start().await.unwrap();
    let source = CoordinatedSource::coinbase(sim.client().unwrap()).build().unwrap();
    let btc = pid("BTC-USD");
    let first = source.ticker(&btc).await.unwrap();
    for _ in 0..99 {
        assert_eq!(source.ticker(&btc).await.unwrap(), first);
    }
    assert_eq!(sim.stats().total_calls, 1);
    let s = source.stats();
    assert_eq!(s.upstream_calls, 1);
    assert!(s.hit_rate >= 0.99, "{}", s.hit_rate);
}

#[tokio::test(start_paused = true)]
async fn seed_b_concurrent_reads_coalesce_and_batch() {
    let sim = SimExchange::builder().products(101).start().await.unwrap();
    let batch = 30;
    let source = CoordinatedSource::coinbase(sim.client().unwrap()).batch_size(batch).build().unwrap();
    let products = sim.products();
    let (one, hundred) = (products[0].clone(), products[1..].to_vec());
    let reads = (0..1000).map(|_| source.ticker(&one));
    assert!(futures_util::future::join_all(reads).await.iter().all(Result::is_ok));
    let reads = (0..1000).map(|i| source.ticker(&hundred[i % 100]));
    assert!(futures_util::future::join_all(reads).await.iter().all(Result::is_ok));
    let st = sim.stats();
    assert_eq!(st.rate_limited_429, 0);
    assert_eq!(st.total_calls, 1 + 100u64.div_ceil(batch as u64));
    assert_eq!(st.calls_by_endpoint["products"], st.total_calls, "batched last trades");
    assert!(st.max_requests_in_any_1s.private <= 30);
}

#[tokio::test(start_paused = true)]
async fn seed_c_scripted_429s_are_backed_off_as_told() {
    let sim = SimExchange::builder().retry_after(true).start().await.unwrap();
    let source = CoordinatedSource::coinbase(sim.client().unwrap()).build().unwrap();
    sim.add_fault(Fault::status(429).on(Endpoint::Products).times(2));
    let products = sim.products();
    let t0 = tokio::time::Instant::now();
    let reads = futures_util::future::join_all(products.iter().map(|p| source.ticker(p))).await;
    assert!(reads.iter().all(Result::is_ok), "{reads:?}");
    // Two pauses of about a second each, as Retry-After said.
    let took = t0.elapsed();
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(4), "{took:?}");
    let st = sim.stats();
    assert_eq!(st.rate_limited_429, 2);
    assert_eq!(st.calls_by_endpoint["products"], 3);
    assert!(st.max_requests_in_any_1s.private <= 30);
    let s = source.stats();
    assert_eq!((s.rate_limit_errors, s.retries), (2, 2));
    assert_eq!(s.limiter.unwrap().private.rate_limit_pauses, 2);
}

#[tokio::test(start_paused = true)]
async fn ticker_ttl_expires_on_the_paused_clock() {
    let sim = SimExchange::builder().start().await.unwrap();
    let source = CoordinatedSource::coinbase(sim.client().unwrap())
        .ticker_ttl(Duration::from_secs(3))
        .build()
        .unwrap();
    let btc = pid("BTC-USD");
    source.ticker(&btc).await.unwrap();
    tokio::time::advance(Duration::from_millis(2900)).await;
    assert_eq!(source.ticker_with(&btc, ReadOptions::default()).await.unwrap().origin, Origin::Cache);
    tokio::time::advance(Duration::from_millis(200)).await;
    assert_eq!(source.ticker_with(&btc, ReadOptions::default()).await.unwrap().origin, Origin::Upstream);
    assert_eq!(sim.stats().total_calls, 2);
}

#[tokio::test(start_paused = true)]
async fn candles_refresh_incrementally_at_the_close() {
    let clock = tickshare::Clock::starting_at(datetime!(2024-04-24 09:56:00 UTC));
    let sim = SimExchange::builder().clock(clock).start().await.unwrap();
    // The read-driven refresh (`AfterClose::Wait`); the background refresh after a close is
    // tested in freshness.rs.
    let source = CoordinatedSource::coinbase(sim.client().unwrap())
        .clock(clock)
        .candle_jitter(Duration::ZERO)
        .candle_grace(Duration::from_millis(500))
        .after_close(tickshare::AfterClose::Wait)
        .build()
        .unwrap();
    let btc = pid("BTC-USD");
    let g = Granularity::FiveMinute;
    let read = || async {
        source.candles(&btc, g, CandleRange::lookback(g, 100, clock.now_utc()).unwrap()).await.unwrap()
    };
    let first = read().await;
    assert_eq!(first.len(), 100);
    // Until 10:00:00.5 every read is served from cache.
    tokio::time::advance(Duration::from_secs(200)).await;
    read().await;
    assert_eq!(sim.stats().calls_by_endpoint["candles"], 1);
    tokio::time::advance(Duration::from_secs(41)).await; // 10:00:01
    let second = read().await;
    assert_eq!(second.len(), 100);
    let reqs = sim.stats().recent_candle_requests;
    assert_eq!(reqs.len(), 2);
    // The refresh asked only for the candle that was in progress (09:55) and the new one.
    assert_eq!(reqs[1].start, datetime!(2024-04-24 09:55 UTC).unix_timestamp());
    assert_eq!(reqs[1].end, datetime!(2024-04-24 10:05 UTC).unix_timestamp() - 1);
    // Closed candles agree with a fresh fetch: the merge lost nothing.
    let direct = sim.client().unwrap();
    let check =
        direct.candles(&btc, g, CandleRange::lookback(g, 100, clock.now_utc()).unwrap()).await.unwrap();
    assert_eq!(second, check);
}

#[tokio::test(start_paused = true)]
async fn stale_data_when_the_exchange_is_down() {
    let sim = SimExchange::builder().start().await.unwrap();
    let source = CoordinatedSource::coinbase(sim.client().unwrap())
        .max_stale(Duration::from_secs(30))
        .max_retries(0)
        .build()
        .unwrap();
    let btc = pid("BTC-USD");
    let fresh = source.ticker(&btc).await.unwrap();
    sim.set_down(true);
    tokio::time::advance(Duration::from_secs(10)).await;
    let stale = source.ticker_with(&btc, ReadOptions::default()).await.unwrap();
    assert!(stale.is_stale());
    assert_eq!(stale.value, fresh);
    tokio::time::advance(Duration::from_secs(25)).await;
    let e = source.ticker(&btc).await.unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
    sim.set_down(false);
    assert_eq!(source.ticker_with(&btc, ReadOptions::default()).await.unwrap().origin, Origin::Upstream);
    assert_eq!(source.stats().stale_serves, 1);
}

#[tokio::test(start_paused = true)]
async fn unknown_products_do_not_hammer_the_exchange() {
    let sim = SimExchange::builder().start().await.unwrap();
    let source = CoordinatedSource::coinbase(sim.client().unwrap()).build().unwrap();
    let bad = pid("NOPE-USD");
    for _ in 0..50 {
        assert!(matches!(source.ticker(&bad).await, Err(Error::NotFound(_))));
        assert!(matches!(
            source
                .candles(
                    &bad,
                    Granularity::OneHour,
                    CandleRange::lookback(Granularity::OneHour, 5, sim.clock().now_utc()).unwrap()
                )
                .await,
            Err(Error::NotFound(_))
        ));
    }
    assert!(sim.stats().total_calls <= 2, "{:?}", sim.stats().calls_by_endpoint);
}

#[tokio::test(start_paused = true)]
async fn balance_checks_make_no_call_while_accounts_are_fresh() {
    let sim = SimExchange::builder().start().await.unwrap();
    let source = CoordinatedSource::coinbase(sim.client().unwrap()).build().unwrap();
    for _ in 0..25 {
        source.validate_trade_balance("USD", tickshare::Decimal::ONE).await.unwrap();
    }
    assert_eq!(sim.stats().calls_by_endpoint["accounts"], 1);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_reader_does_not_cancel_the_shared_fetch() {
    let sim = SimExchange::builder().latency(Duration::from_millis(100)).start().await.unwrap();
    let source = CoordinatedSource::coinbase(sim.client().unwrap()).build().unwrap();
    let btc = pid("BTC-USD");
    let a = tokio::spawn({
        let (s, p) = (source.clone(), btc.clone());
        async move { s.ticker(&p).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let b = tokio::spawn({
        let (s, p) = (source.clone(), btc.clone());
        async move { s.ticker(&p).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    a.abort();
    assert!(b.await.unwrap().is_ok());
    assert!(source.ticker(&btc).await.is_ok());
    assert_eq!(sim.stats().total_calls, 1);
}

/// A coordinated source with retries over a client with retries of its own: the outer layer
/// owns the call (RetryPolicy), so a failing read sends 1 + 2 requests, not (1 + 2) × (1 + 3).
#[tokio::test(start_paused = true)]
async fn retries_on_both_layers_do_not_multiply() {
    let sim = SimExchange::builder().start().await.unwrap();
    sim.add_fault(Fault::status(503));
    let client = sim.client_builder().max_retries(3).build().unwrap();
    let source =
        CoordinatedSource::coinbase(client.clone()).batch_tickers(false).max_retries(2).build().unwrap();
    let e = source.ticker(&pid("BTC-USD")).await.unwrap_err();
    assert!(matches!(e, Error::Upstream { status: 503, .. }), "{e:?}");
    assert_eq!(sim.stats().total_calls, 3, "1 attempt + max_retries (2) of the coordinated source");
    assert_eq!(source.stats().retries, 2);
    assert_eq!(source.stats().upstream_calls, 3);
    // The client alone still retries as configured.
    let e = client.ticker(&pid("ETH-USD")).await.unwrap_err();
    assert!(matches!(e, Error::Upstream { status: 503, .. }), "{e:?}");
    assert_eq!(sim.stats().total_calls, 3 + 4);
}
