//! `MarketStream` at scale (issue #18) and the derived candle in progress (issue #14), on
//! tokio's paused clock against the simulated exchange: products spread over several
//! connections within per-message and per-connection caps the simulator enforces, one shared
//! message budget, each connection's liveness and repair on its own, and derived series exact
//! down to the candle in progress.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use tickshare::{
    BatchEvaluator, Bot, CandleFidelity, CandleRange, Clock, CoordinatedSource, Granularity,
    InProgressCandle, MarketDataSource, MarketStream, MovingAverageCrossover, Origin, ProductId, ReadOptions,
    RsiThreshold, Strategy,
    sim::{Endpoint, SimExchange, SimHandle, SimStats, WsConfig, WsConnFault},
};
use time::macros::datetime;

use crate::support;

use support::{candle_calls, closed, sleep_until_utc, until};

/// Every product's cached one-hour series against a REST fetch now: closed candles equal, and
/// the candle in progress equal to what REST answered at the instant it is as of.
async fn assert_hourly_series_exact(sim: &SimHandle, source: &CoordinatedSource, products: &[ProductId]) {
    let g = Granularity::OneHour;
    let direct = sim.client().unwrap();
    let now = sim.clock().now_utc();
    let range = CandleRange::lookback(g, 24, now).unwrap();
    for p in products {
        let read = source.candles_with(p, g, range, ReadOptions::default()).await.unwrap();
        assert_eq!(read.origin, Origin::Cache, "{p}");
        let rest = direct.candles(p, g, range).await.unwrap();
        let cached = closed(&read.value, now, g);
        assert!(cached.len() >= 23, "{p}: {} closed candles", cached.len());
        assert_eq!(cached, closed(&rest, now, g), "{p}");
        let ip = read.in_progress.unwrap();
        let last = *read.value.last().unwrap();
        let rest_then = sim.candle_as_of(p, g, ip.as_of).unwrap();
        match ip.fidelity {
            CandleFidelity::Exact => assert_eq!(rest_then, last, "{p}: in progress as of {}", ip.as_of),
            // `InProgressCandle::Live` (the default) moved it by a later pushed ticker: the
            // close is that trade's price; the rest is the last push's.
            _ => {
                assert_eq!((last.start, last.open), (rest_then.start, rest_then.open), "{p}");
                assert_eq!(Some(last.close), sim.price_at(p, ip.as_of), "{p}");
            }
        }
    }
}

/// Issue 18, reduced: 1,000 bots over 100 products, hourly candles, three simulated hours. The
/// simulator refuses messages of more than 25 products and more than 40 products per
/// connection and channel; the stream is configured to the same caps, so it runs three
/// connections (40, 40 and 17 books) within one budget of 8 messages a second. After the
/// warm-up (each series' history once, then the first hourly close once more, as the stream
/// joined that hour late) no candle REST call is made across two hourly closes, and every
/// series equals REST's.
#[tokio::test(start_paused = true)]
async fn a_thousand_bots_over_a_hundred_products_need_no_candle_rest_call_after_warm_up() {
    let clock = Clock::starting_at(datetime!(2024-04-24 10:46:38 UTC));
    // Candle updates every 10 s (Coinbase: every second) keep a debug build fast; each still
    // carries the bucket's full state, and the first after a close its final state.
    let ws = WsConfig::default()
        .candle_interval(Duration::from_secs(10))
        .max_products_per_message(25)
        .max_products_per_connection(40);
    let sim = SimExchange::builder().products(100).clock(clock).ws(ws).start().await.unwrap();
    let products = sim.products();
    assert_eq!(products.len(), 100);
    let source = CoordinatedSource::coinbase(sim.client().unwrap())
        .clock(clock)
        .read_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let stream = MarketStream::builder(source.clone())
        .url(sim.ws_url())
        .max_products_per_message(25)
        .max_products_per_connection(40)
        // Longer than the simulator's 10 s between candle pushes: the push that closes a
        // bucket arrives before the series expires and the background close refresh calls REST.
        .candle_grace(Duration::from_secs(15))
        .products(products.clone())
        .start()
        .unwrap();
    until("the stream to go live", Duration::from_secs(30), || stream.is_live()).await;
    let st = stream.stats();
    assert_eq!(st.connection_count, 3);
    let mut sizes: Vec<u64> = st.connection_stats.values().map(|c| c.products).collect();
    sizes.sort_unstable();
    // 100 products are 97 books: three -USDC products share their -USD twin's.
    let books: BTreeSet<ProductId> = products.iter().map(ProductId::book_id).collect();
    assert_eq!(books.len(), 97);
    assert_eq!(sizes, vec![17, 40, 40]);
    for c in st.connection_stats.values() {
        assert_eq!(c.acknowledged.get("candles"), Some(&c.products), "{c:?}");
        assert_eq!(c.acknowledged.get("ticker_batch"), Some(&c.products), "{c:?}");
        assert!(c.live_products >= c.products, "{c:?}");
    }
    assert_eq!(st.connection_stats.values().map(|c| c.live_products).sum::<u64>(), 100);
    // Heartbeats on each connection, then ⌈n / 25⌉ messages per channel per connection.
    assert_eq!(st.subscribe_messages, 3 + 2 * (2 + 2 + 1));

    let ma: Arc<dyn Strategy> = Arc::new(MovingAverageCrossover::default());
    let rsi: Arc<dyn Strategy> = Arc::new(RsiThreshold::default());
    let bots: Vec<Bot> = (0..1_000)
        .map(|i| {
            let s = if i % 2 == 0 { Arc::clone(&ma) } else { Arc::clone(&rsi) };
            Bot::new(format!("bot-{i:04}"), products[i % 100].clone(), s)
                .granularity(Granularity::OneHour)
                .lookback(24)
        })
        .collect();
    let evaluator =
        BatchEvaluator::new(Arc::new(source.clone())).clock(clock).meter(Arc::new(source.clone()));
    let mut measured_from: Option<SimStats> = None;
    // Ticks from 10:47:08 to 13:47:08; the warm-up ends with the tick after the 11:00 close.
    for i in 0..37 {
        let report = evaluator.evaluate_all(&bots).await;
        assert_eq!(report.errors().count(), 0, "tick {i}");
        if i == 4 {
            measured_from = Some(sim.stats());
        }
        tokio::time::sleep(Duration::from_secs(300)).await;
    }
    let warm = measured_from.unwrap();
    let end = sim.stats();
    assert_eq!(
        source.stats().close_refresh.refreshed,
        100,
        "REST closed only the hour the stream joined late"
    );
    assert_eq!(candle_calls(&warm), 200, "each history once, the hour the stream joined late once more");
    assert_eq!(
        candle_calls(&end),
        candle_calls(&warm),
        "no candle REST call across the 12:00 and 13:00 closes"
    );
    assert_eq!(end.calls(Endpoint::Accounts) - warm.calls(Endpoint::Accounts), 32, "one per tick");
    assert_eq!(end.rate_limited_429, 0);
    let ws = sim.ws_stats();
    assert_eq!(ws.refused_messages, 0, "every message within the caps");
    assert!(ws.max_client_messages_in_any_1s <= 8, "{ws:?}");
    let st = stream.stats();
    assert_eq!((st.reconnects, st.sequence_gaps, st.silences, st.repairs), (0, 0, 0, 0));
    assert_eq!(st.live_products, 100);
    assert_hourly_series_exact(&sim, &source, &products).await;
    stream.shutdown().await;
}

/// Issue 18: a drop or a sequence gap on one connection marks stale, and repairs, only the
/// products that connection carries; the other connections stay live and are not touched.
#[tokio::test(start_paused = true)]
async fn one_connection_s_drop_or_gap_repairs_only_its_own_products() {
    let clock = support::fixed_clock();
    let sim = SimExchange::builder().products(6).clock(clock).start().await.unwrap();
    let products = sim.products();
    let source = CoordinatedSource::coinbase(sim.client().unwrap()).clock(clock).build().unwrap();
    let stream = MarketStream::builder(source.clone())
        .url(sim.ws_url())
        .max_products_per_connection(2)
        .products(products.clone())
        .start()
        .unwrap();
    until("live", Duration::from_secs(10), || stream.is_live()).await;
    assert_eq!(stream.stats().connection_count, 3);
    let g = Granularity::FiveMinute;
    for p in &products {
        source.candles(p, g, CandleRange::lookback(g, 24, clock.now_utc()).unwrap()).await.unwrap();
    }
    let before = sim.stats();
    // The connection carrying the first product; its partner is the product assigned with it.
    // Books fill connections in order: the first connection carries the first two.
    let mut sorted = products.clone();
    sorted.sort();
    let victim = sorted[0].clone();
    let (victim_id, _) = {
        let st = stream.stats();
        let id = *st.connection_stats.keys().next().unwrap();
        (id, st)
    };
    let theirs: BTreeSet<ProductId> = sorted[..2].iter().cloned().collect();
    // Drop it just before the 10:00 close: its two series miss their candle's final state.
    sleep_until_utc(clock, datetime!(2024-04-24 09:59:59.7 UTC)).await;
    sim.ws_fault_on(&victim, WsConnFault::Drop);
    until("the reconnect", Duration::from_secs(30), || stream.stats().reconnects == 1 && stream.is_live())
        .await;
    until("the repairs", Duration::from_secs(10), || stream.stats().repairs == 2).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = sim.stats();
    assert_eq!(candle_calls(&after) - candle_calls(&before), 2, "one repair per series of that connection");
    let repaired: BTreeSet<ProductId> =
        after.recent_candle_requests.iter().rev().take(2).map(|r| r.product.clone()).collect();
    assert_eq!(repaired, theirs);
    let st = stream.stats();
    assert_eq!(st.repairs, 2);
    for (id, c) in &st.connection_stats {
        let expected = if *id == victim_id { 2 } else { 1 };
        assert_eq!(c.connections, expected, "connection {id}: {c:?}");
        assert_eq!(c.live_products, 2);
    }
    // A gap on another connection: only its products go stale, and nothing needs a repair
    // mid-bucket.
    let other = sorted[4].clone();
    sim.ws_fault_on(&other, WsConnFault::SkipSequence(3));
    until("the gap", Duration::from_secs(5), || stream.stats().sequence_gaps == 1).await;
    let st = stream.stats();
    let gapped: Vec<_> = st.connection_stats.values().filter(|c| c.sequence_gaps == 1).collect();
    assert_eq!(gapped.len(), 1);
    assert_eq!(st.stale_marks, 2, "the drop, then the gap");
    assert_eq!(source.ticker_with(&victim, ReadOptions::default()).await.unwrap().origin, Origin::Cache);
    assert!(!st.products[other.as_str()].live);
    assert!(st.products[victim.as_str()].live);
    until("recovery", Duration::from_secs(20), || stream.is_live()).await;
    assert_eq!(stream.stats().reconnects, 1, "a gap does not reconnect");
    stream.shutdown().await;
}

/// Issue 14: with the stream, a derived series' candle in progress is the exact aggregate of
/// the pushed five-minute buckets once the stream has covered its bucket from the start: what
/// the exchange's REST answers for it at the instant it is as of. An hour the stream joined
/// late is REST's answer, marked as of its fetch, and refetched (with `InProgressCandle::Exact`)
/// rather than derived.
#[tokio::test(start_paused = true)]
async fn the_derived_candle_in_progress_equals_rest_once_the_stream_covered_its_bucket() {
    let clock = Clock::starting_at(datetime!(2024-04-24 10:46:38 UTC));
    let sim = SimExchange::builder().products(3).clock(clock).start().await.unwrap();
    let products = sim.products();
    let source = CoordinatedSource::coinbase(sim.client().unwrap())
        .clock(clock)
        .in_progress(InProgressCandle::Exact)
        .build()
        .unwrap();
    let stream =
        MarketStream::builder(source.clone()).url(sim.ws_url()).products(products.clone()).start().unwrap();
    until("live", Duration::from_secs(10), || stream.is_live()).await;
    let h = Granularity::OneHour;
    let range = || CandleRange::lookback(h, 24, clock.now_utc()).unwrap();
    let p = &products[0];
    // 10:46:3x: REST's history; the 10:00 candle is in progress as of the fetch.
    let first = source.candles_with(p, h, range(), ReadOptions::default()).await.unwrap();
    let ip = first.in_progress.unwrap();
    assert_eq!(sim.candle_as_of(p, h, ip.as_of), first.value.last().copied());
    // 10:50: the stream joined the 10:00 hour late, so that candle is never derived: it is
    // older than `in_progress_max_age`, and REST answers again.
    sleep_until_utc(clock, datetime!(2024-04-24 10:50:00.5 UTC)).await;
    let calls = candle_calls(&sim.stats());
    let read = source.candles_with(p, h, range(), ReadOptions::default()).await.unwrap();
    assert_eq!(read.origin, Origin::Upstream);
    assert_eq!(candle_calls(&sim.stats()), calls + 1);
    let ip = read.in_progress.unwrap();
    assert_eq!(ip.as_of, datetime!(2024-04-24 10:50:00.5 UTC));
    assert_eq!(sim.candle_as_of(p, h, ip.as_of), read.value.last().copied());
    // After the 11:00 close, one REST refresh moves the series into the 11:00 hour, which the
    // stream covers from its start: from then on the candle in progress is derived.
    sleep_until_utc(clock, datetime!(2024-04-24 11:00:10 UTC)).await;
    for p in &products {
        source.candles(p, h, range()).await.unwrap();
    }
    let calls = candle_calls(&sim.stats());
    for t in [
        datetime!(2024-04-24 11:00:30.25 UTC),
        datetime!(2024-04-24 11:17:41.5 UTC),
        datetime!(2024-04-24 11:44:59.999 UTC),
        datetime!(2024-04-24 11:59:59.5 UTC),
        datetime!(2024-04-24 12:03:03 UTC),
    ] {
        sleep_until_utc(clock, t).await;
        for p in &products {
            let read = source.candles_with(p, h, range(), ReadOptions::default()).await.unwrap();
            assert_eq!(read.origin, Origin::Cache, "{p} at {t}");
            let ip = read.in_progress.unwrap();
            assert_eq!(ip.fidelity, CandleFidelity::Exact);
            assert!(t - ip.as_of <= time::Duration::seconds(1), "{p} at {t}: as of {}", ip.as_of);
            let last = *read.value.last().unwrap();
            assert_eq!(last.start, h.bucket_start(t));
            assert_eq!(sim.candle_as_of(p, h, ip.as_of), Some(last), "{p} at {t}");
        }
    }
    assert_eq!(candle_calls(&sim.stats()), calls, "derived from the stream: no REST call");
    // And the closed 11:00 hour equals REST's.
    let direct = sim.client().unwrap();
    let now = clock.now_utc();
    for p in &products {
        let cached = source.candles(p, h, range()).await.unwrap();
        let rest = direct.candles(p, h, range()).await.unwrap();
        assert_eq!(closed(&cached, now, h), closed(&rest, now, h), "{p}");
    }
    stream.shutdown().await;
}

/// Issue 18: products followed at runtime open connections as needed (paced, within the one
/// message budget) and connections left with nothing to carry are closed; the products that
/// stay keep their connection.
#[tokio::test(start_paused = true)]
async fn connections_follow_the_product_count() {
    let clock = support::fixed_clock();
    let sim = SimExchange::builder().products(10).clock(clock).start().await.unwrap();
    let mut products = sim.products();
    products.sort();
    let source = CoordinatedSource::coinbase(sim.client().unwrap()).clock(clock).build().unwrap();
    let stream = MarketStream::builder(source.clone())
        .url(sim.ws_url())
        .max_products_per_connection(2)
        .max_products_per_message(1)
        .products(products[..2].iter().cloned())
        .start()
        .unwrap();
    until("live", Duration::from_secs(10), || stream.is_live()).await;
    let first = stream.stats();
    assert_eq!(first.connection_count, 1);
    let first_id = *first.connection_stats.keys().next().unwrap();
    // Ten products at two per connection: five connections, one product per message.
    stream.set_products(products.iter().cloned());
    until("ten live", Duration::from_secs(30), || stream.is_live() && stream.stats().live_products == 10)
        .await;
    let st = stream.stats();
    assert_eq!(st.connection_count, 5);
    assert_eq!(st.connection_stats[&first_id].connections, 1, "the first connection was not reopened");
    assert!(
        st.connection_stats.values().all(|c| c.products == 2 && c.acknowledged.get("candles") == Some(&2))
    );
    let ws = sim.ws_stats();
    assert_eq!(ws.open_connections, 5);
    assert!(ws.max_client_messages_in_any_1s <= 8, "{ws:?}");
    assert_eq!(ws.refused_messages + ws.connections_refused, 0);
    // Back to the first two: the other four connections close.
    stream.set_products(products[..2].iter().cloned());
    until("one connection", Duration::from_secs(10), || sim.ws_stats().open_connections == 1).await;
    let st = stream.stats();
    assert_eq!((st.connection_count, st.live_products), (1, 2));
    assert!(st.connection_stats.contains_key(&first_id));
    assert!(stream.is_live());
    stream.shutdown().await;
}
