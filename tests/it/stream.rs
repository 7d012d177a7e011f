//! `MarketStream` against the simulated exchange's WebSocket endpoint, on tokio's paused clock:
//! a hot cache with no market-data REST call, reconnect and repair, gaps, silence, runtime
//! (un)subscription, and the simulator's message shapes and limits.

use std::{sync::Arc, time::Duration};

use futures_util::{SinkExt, StreamExt};
use tickshare::{
    BatchEvaluator, Bot, CandleRange, Clock, CoordinatedSource, Granularity, MarketDataSource, MarketStream,
    MovingAverageCrossover, Origin, ProductId, ReadOptions,
    sim::{Endpoint, SimExchange, SimStats, WsConfig, WsDialect, WsFault},
};
use time::macros::datetime;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::support;

fn pid(s: &str) -> ProductId {
    s.parse().unwrap()
}

/// Ticker and candle calls, public and private: what the stream should make unnecessary.
fn market_calls(s: &SimStats) -> u64 {
    [
        Endpoint::MarketTicker,
        Endpoint::Ticker,
        Endpoint::MarketCandles,
        Endpoint::Candles,
        Endpoint::BestBidAsk,
        Endpoint::Products,
        Endpoint::MarketProducts,
    ]
    .iter()
    .map(|e| s.calls(*e))
    .sum()
}

use support::{candle_calls, closed, sleep_until_utc, until};

/// Evaluate `bots` `n` times, five minutes apart, without an error; `steady`: each tick makes
/// exactly one upstream call (accounts).
async fn five_minute_ticks(evaluator: &BatchEvaluator, bots: &[Bot], n: usize, steady: bool) {
    for _ in 0..n {
        let report = evaluator.evaluate_all(bots).await;
        assert_eq!(report.errors().count(), 0);
        if steady {
            assert_eq!(report.upstream_calls, 1, "accounts only");
        }
        tokio::time::sleep(Duration::from_secs(300)).await;
    }
}

fn lookback(g: Granularity, n: u32, clock: Clock) -> CandleRange {
    CandleRange::lookback(g, n, clock.now_utc()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn twenty_five_bots_make_no_market_data_rest_calls_after_warm_up() {
    let clock = Clock::starting_at(datetime!(2024-04-24 10:46:38 UTC));
    // Candle updates every 5 s instead of every second: a fifth of the messages (this test
    // counts REST calls, not the cadence), so it stays fast in debug builds.
    let ws = WsConfig::default().candle_interval(Duration::from_secs(5));
    let sim = SimExchange::builder().products(5).clock(clock).ws(ws).start().await.unwrap();
    let products = sim.products();
    let source = CoordinatedSource::coinbase(sim.client().unwrap()).clock(clock).build().unwrap();
    let stream =
        MarketStream::builder(source.clone()).url(sim.ws_url()).products(products.clone()).start().unwrap();
    until("the stream to go live", Duration::from_secs(10), || stream.is_live()).await;
    // 25 bots over 5 products, half on five-minute candles and half on hourly ones.
    let bots: Vec<Bot> = (0..25)
        .map(|i| {
            let g = if i % 2 == 0 { Granularity::FiveMinute } else { Granularity::OneHour };
            Bot::new(
                format!("bot-{i:02}"),
                products[i % 5].clone(),
                Arc::new(MovingAverageCrossover::default()),
            )
            .granularity(g)
            .lookback(24)
        })
        .collect();
    let evaluator =
        BatchEvaluator::new(Arc::new(source.clone())).clock(clock).meter(Arc::new(source.clone()));
    // Warm-up: 10:46:38 fetches each series' history; 10:51:38 needs no call. The five-minute
    // history reaches back to 08:50, so the stream can derive the 10:00 hour at its close.
    five_minute_ticks(&evaluator, &bots, 2, false).await;
    let warm = sim.stats();
    assert_eq!(market_calls(&warm), 10, "5 five-minute histories, 5 hourly histories");
    assert_eq!(warm.calls(Endpoint::Products), 0, "tickers came from the stream from the start");
    // Eight ticks, 10:56:38 to 11:31:38: the 11:00 hourly close included.
    five_minute_ticks(&evaluator, &bots, 8, true).await;
    let s = sim.stats();
    assert_eq!(market_calls(&s), market_calls(&warm), "no ticker or candle REST call after the warm-up");
    assert_eq!(s.calls(Endpoint::Accounts) - warm.calls(Endpoint::Accounts), 8);
    assert_eq!(s.rate_limited_429, 0);
    let st = stream.stats();
    assert_eq!((st.reconnects, st.sequence_gaps, st.silences, st.repairs), (0, 0, 0, 0));
    assert_eq!(st.rest_fallbacks, 10);
    assert!(st.derived_updates > 0 && st.candle_merges > 0 && st.tickers_applied > 0);
    assert_eq!(st.live_products, 5);

    // Exactness: closed five-minute candles equal REST's; the stream-derived 10:00 hour is the
    // exact aggregate of REST's five-minute candles (and its open and close are REST's hourly).
    let direct = sim.client().unwrap();
    let now = clock.now_utc();
    for p in &products {
        let g = Granularity::FiveMinute;
        let cached = source.candles(p, g, lookback(g, 24, clock)).await.unwrap();
        let rest = direct.candles(p, g, lookback(g, 24, clock)).await.unwrap();
        assert_eq!(closed(&cached, now, g), closed(&rest, now, g), "{p}");
        let hour =
            CandleRange::new(datetime!(2024-04-24 10:00 UTC), datetime!(2024-04-24 11:00 UTC)).unwrap();
        let cached = source.candles(p, Granularity::OneHour, hour).await.unwrap();
        let five = direct.candles(p, g, hour).await.unwrap();
        assert_eq!(five.len(), 12);
        let h = cached[0];
        assert_eq!(h.open, five[0].open);
        assert_eq!(h.close, five[11].close);
        assert_eq!(h.high, five.iter().map(|c| c.high).max().unwrap());
        assert_eq!(h.low, five.iter().map(|c| c.low).min().unwrap());
        assert_eq!(h.volume, five.iter().map(|c| c.volume).sum());
        let rest_hour = direct.candles(p, Granularity::OneHour, hour).await.unwrap();
        assert_eq!((h.open, h.close), (rest_hour[0].open, rest_hour[0].close));
    }
    stream.shutdown().await;
}

/// Issue 15: Coinbase's market-data channels answer a `BTC-USDC` subscription with `BTC-USD`
/// frames and acknowledgements (USDT-USDC excepted), with no JWT needed. Bots on `-USDC`
/// products are fed by the stream with no ticker or candle REST call after the warm-up; `ETH-USD`
/// and `ETH-USDC` followed together share one subscription.
#[tokio::test(start_paused = true)]
async fn usdc_bots_are_fed_by_the_stream_through_their_usd_twins() {
    let clock = Clock::starting_at(datetime!(2024-04-24 10:46:38 UTC));
    let ws = WsConfig::default().candle_interval(Duration::from_secs(5));
    let sim = SimExchange::builder()
        .products(["BTC-USD", "BTC-USDC", "ETH-USD", "ETH-USDC", "USDT-USDC"])
        .clock(clock)
        .ws(ws)
        .start()
        .await
        .unwrap();
    let followed = [pid("BTC-USDC"), pid("ETH-USDC"), pid("ETH-USD"), pid("USDT-USDC")];
    let source = CoordinatedSource::coinbase(sim.client().unwrap()).clock(clock).build().unwrap();
    // Credentials, but no `jwt_on_market_data`: market-data subscriptions go unsigned.
    let stream = MarketStream::builder(source.clone())
        .url(sim.ws_url())
        .credentials(tickshare::Credentials::generate("organizations/sim/apiKeys/sim"))
        .products(followed.clone())
        .start()
        .unwrap();
    until("the stream to go live", Duration::from_secs(10), || stream.is_live()).await;
    let bots: Vec<Bot> = followed
        .iter()
        .flat_map(|p| [Granularity::FiveMinute, Granularity::OneHour].map(|g| (p.clone(), g)))
        .enumerate()
        .map(|(i, (p, g))| {
            Bot::new(format!("bot-{i}"), p, Arc::new(MovingAverageCrossover::default()))
                .granularity(g)
                .lookback(24)
        })
        .collect();
    let evaluator =
        BatchEvaluator::new(Arc::new(source.clone())).clock(clock).meter(Arc::new(source.clone()));
    five_minute_ticks(&evaluator, &bots, 2, false).await;
    let warm = sim.stats();
    assert_eq!(market_calls(&warm), 8, "4 five-minute histories, 4 hourly histories");
    assert_eq!(warm.calls(Endpoint::BestBidAsk), 0, "tickers came from the stream from the start");
    five_minute_ticks(&evaluator, &bots, 8, true).await;
    let s = sim.stats();
    assert_eq!(market_calls(&s), market_calls(&warm), "no ticker or candle REST call after the warm-up");
    let st = stream.stats();
    assert_eq!((st.live_products, st.exchange_errors, st.reconnects, st.sequence_gaps), (4, 0, 0, 0));
    assert_eq!(st.rest_fallbacks, 8);
    // Heartbeats, candles and ticker_batch, each acknowledged at once: the acks name BTC-USD
    // and ETH-USD, and the stream took them for its BTC-USDC and ETH-USDC.
    let ws = sim.ws_stats();
    assert_eq!(ws.subscribe_messages, 3);
    assert_eq!(ws.authenticated_messages, 0, "no JWT on market-data channels");
    // The pushed values are the book's: a BTC-USDC ticker is BTC-USD's price (ticker_batch has
    // no bid/ask in production); candles equal REST's.
    let direct = sim.client().unwrap();
    let now = clock.now_utc();
    for p in &followed {
        let t = source.ticker_with(p, ReadOptions::default()).await.unwrap();
        assert_eq!(t.origin, Origin::Cache, "{p}");
        assert_eq!((&t.value.product, t.value.best_bid), (p, None));
        assert_eq!(Some(t.value.price), sim.price_at(p, t.value.time), "{p}");
        let g = Granularity::FiveMinute;
        let cached = source.candles(p, g, lookback(g, 24, clock)).await.unwrap();
        let rest = direct.candles(p, g, lookback(g, 24, clock)).await.unwrap();
        assert_eq!(closed(&cached, now, g), closed(&rest, now, g), "{p}");
    }
    let btc = source.ticker(&pid("BTC-USDC")).await.unwrap();
    assert_eq!(sim.price_at(&pid("BTC-USD"), btc.time), Some(btc.price));
    stream.shutdown().await;
}

/// The simulator's WebSocket side speaks production by default: no `client_id`, an integer
/// `heartbeat_counter`, no bid/ask on `ticker_batch`, `-USDC` answered as `-USD`; the docs'
/// shapes on request.
#[tokio::test(start_paused = true)]
async fn the_simulated_endpoint_speaks_production_or_the_docs() {
    let clock = support::fixed_clock();
    for dialect in [WsDialect::Production, WsDialect::Documented] {
        let sim = SimExchange::builder()
            .products(["BTC-USD", "BTC-USDC", "USDT-USDC"])
            .clock(clock)
            .ws(WsConfig::default().dialect(dialect))
            .start()
            .await
            .unwrap();
        let production = dialect == WsDialect::Production;
        let (mut ws, _) = tokio_tungstenite::connect_async(sim.ws_url()).await.unwrap();
        send(&mut ws, serde_json::json!({"type":"subscribe","product_ids":[],"channel":"heartbeats"})).await;
        let _ack = read_json(&mut ws).await;
        let hb = read_json(&mut ws).await;
        assert_eq!(hb["channel"], "heartbeats");
        if production {
            assert!(hb.get("client_id").is_none(), "{hb}");
            assert_eq!(hb["events"][0]["heartbeat_counter"], 1);
        } else {
            assert_eq!(hb["client_id"], "");
            assert_eq!(hb["events"][0]["heartbeat_counter"], "1");
        }
        send(
            &mut ws,
            serde_json::json!({"type":"subscribe","product_ids":["BTC-USDC","USDT-USDC"],"channel":"ticker_batch"}),
        )
        .await;
        let ack = loop {
            let m = read_json(&mut ws).await;
            if m["channel"] == "subscriptions" {
                break m;
            }
        };
        let twin = if production { "BTC-USD" } else { "BTC-USDC" };
        let mut expected = vec![twin, "USDT-USDC"];
        expected.sort();
        assert_eq!(
            ack["events"][0]["subscriptions"]["ticker_batch"],
            serde_json::json!(expected),
            "{dialect:?}"
        );
        let snap = loop {
            let m = read_json(&mut ws).await;
            if m["channel"] == "ticker_batch" {
                break m;
            }
        };
        let tickers = snap["events"][0]["tickers"].as_array().unwrap();
        let ids: Vec<&str> = tickers.iter().map(|t| t["product_id"].as_str().unwrap()).collect();
        assert_eq!(ids, expected, "{dialect:?}");
        for t in tickers {
            assert_eq!(t.get("best_bid").is_some(), !production, "{t}");
            assert_eq!(t.get("best_ask").is_some(), !production, "{t}");
        }
        sim.shutdown().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_dropped_connection_reconnects_resubscribes_and_repairs_each_series_once() {
    let clock = support::fixed_clock();
    let sim = SimExchange::builder().products(3).clock(clock).start().await.unwrap();
    let products = sim.products();
    let source = CoordinatedSource::coinbase(sim.client().unwrap()).clock(clock).build().unwrap();
    let stream =
        MarketStream::builder(source.clone()).url(sim.ws_url()).products(products.clone()).start().unwrap();
    until("live", Duration::from_secs(10), || stream.is_live()).await;
    let g = Granularity::FiveMinute;
    for p in &products {
        source.candles(p, g, lookback(g, 24, clock)).await.unwrap();
        source.ticker(p).await.unwrap();
    }
    let before = sim.stats();
    let ws_before = sim.ws_stats();
    assert_eq!(candle_calls(&before), 3);
    // Drop the connection just before the 10:00 close: every series misses its candle's final
    // state.
    sleep_until_utc(clock, datetime!(2024-04-24 09:59:59.7 UTC)).await;
    sim.ws_fault(WsFault::DropConnections);
    until("the reconnect", Duration::from_secs(30), || stream.stats().reconnects == 1 && stream.is_live())
        .await;
    until("the repairs", Duration::from_secs(10), || stream.stats().repairs == 3).await;
    let after = sim.stats();
    assert_eq!(candle_calls(&after) - candle_calls(&before), 3, "exactly one REST repair per series");
    let repairs = &after.recent_candle_requests[after.recent_candle_requests.len() - 3..];
    let mut repaired: Vec<ProductId> = repairs.iter().map(|r| r.product.clone()).collect();
    repaired.sort();
    let mut expected = products.clone();
    expected.sort();
    assert_eq!(repaired, expected);
    for r in repairs {
        // From the candle in progress at the last good update.
        assert_eq!(r.start, datetime!(2024-04-24 09:55 UTC).unix_timestamp());
    }
    let ws = sim.ws_stats();
    assert_eq!(ws.connections_accepted - ws_before.connections_accepted, 1);
    assert_eq!(
        ws.subscribe_messages - ws_before.subscribe_messages,
        3,
        "heartbeats, candles, ticker_batch again"
    );
    let st = stream.stats();
    assert_eq!((st.connections, st.reconnects, st.sequence_gaps), (2, 1, 0));
    assert!(st.stale_marks >= 1 && st.disconnected_ms > 0);
    // Served from the cache again, exactly, with no further call.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let direct = sim.client().unwrap();
    for p in &products {
        let read = source.candles_with(p, g, lookback(g, 24, clock), ReadOptions::default()).await.unwrap();
        assert_eq!(read.origin, Origin::Cache);
        let rest = direct.candles(p, g, lookback(g, 24, clock)).await.unwrap();
        let now = clock.now_utc();
        assert_eq!(closed(&read.value, now, g), closed(&rest, now, g));
        assert_eq!(source.ticker_with(p, ReadOptions::default()).await.unwrap().origin, Origin::Cache);
    }
    assert_eq!(market_calls(&sim.stats()) - market_calls(&after), 3, "only the direct client's checks");
}

#[tokio::test(start_paused = true)]
async fn a_sequence_gap_marks_data_stale_and_reads_fall_back_to_rest() {
    let clock = support::fixed_clock();
    // Candles every 30 s, so the gap's effect on them lasts long enough to observe.
    let ws = WsConfig::default().candle_interval(Duration::from_secs(30));
    let sim = SimExchange::builder().products(2).clock(clock).ws(ws).start().await.unwrap();
    let btc = pid("BTC-USD");
    let source = CoordinatedSource::coinbase(sim.client().unwrap()).clock(clock).build().unwrap();
    let stream =
        MarketStream::builder(source.clone()).url(sim.ws_url()).products(sim.products()).start().unwrap();
    until("live", Duration::from_secs(40), || stream.is_live()).await;
    let g = Granularity::FiveMinute;
    source.candles(&btc, g, lookback(g, 24, clock)).await.unwrap();
    // Right after a ticker_batch, so the next message is a bare heartbeat.
    let n = stream.stats().tickers_applied;
    until("a ticker batch", Duration::from_secs(10), || stream.stats().tickers_applied > n).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(source.ticker_with(&btc, ReadOptions::default()).await.unwrap().origin, Origin::Cache);
    let before = sim.stats();
    let limiter_before = source.stats().limiter.unwrap();
    sim.ws_fault(WsFault::SkipSequence(3));
    until("the gap", Duration::from_secs(5), || stream.stats().sequence_gaps == 1).await;
    assert!(!stream.is_live());
    // Stale: both reads go to REST, through the source's rate limiter.
    assert_eq!(source.ticker_with(&btc, ReadOptions::default()).await.unwrap().origin, Origin::Upstream);
    let read = source.candles_with(&btc, g, lookback(g, 24, clock), ReadOptions::default()).await.unwrap();
    assert_eq!(read.origin, Origin::Upstream);
    let after = sim.stats();
    assert_eq!(after.calls(Endpoint::Products) - before.calls(Endpoint::Products), 1);
    assert_eq!(candle_calls(&after) - candle_calls(&before), 1);
    let limiter = source.stats().limiter.unwrap();
    assert_eq!(
        limiter.public.acquired + limiter.private.acquired
            - limiter_before.public.acquired
            - limiter_before.private.acquired,
        2
    );
    // The stream recovers without reconnecting; reads are served from it again.
    until("recovery", Duration::from_secs(40), || stream.is_live()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(source.ticker_with(&btc, ReadOptions::default()).await.unwrap().origin, Origin::Cache);
    assert_eq!(
        source.candles_with(&btc, g, lookback(g, 24, clock), ReadOptions::default()).await.unwrap().origin,
        Origin::Cache
    );
    let st = stream.stats();
    assert_eq!((st.sequence_gaps, st.reconnects, st.stale_marks), (1, 0, 1));
    assert_eq!(market_calls(&sim.stats()), market_calls(&after));
}

#[tokio::test(start_paused = true)]
async fn stream_silence_is_detected_within_the_threshold() {
    let clock = support::fixed_clock();
    let sim = SimExchange::builder().products(2).clock(clock).start().await.unwrap();
    let btc = pid("BTC-USD");
    let source = CoordinatedSource::coinbase(sim.client().unwrap()).clock(clock).build().unwrap();
    let threshold = Duration::from_secs(5);
    let stream = MarketStream::builder(source.clone())
        .url(sim.ws_url())
        .silence_timeout(threshold)
        .products(sim.products())
        .start()
        .unwrap();
    until("live", Duration::from_secs(10), || stream.is_live()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t0 = Instant::now();
    sim.ws_fault(WsFault::Silence(Duration::from_secs(120)));
    until("the silence", Duration::from_secs(30), || stream.stats().silences == 1).await;
    let took = t0.elapsed();
    // The last message came at most a second before the fault; the check runs every second.
    assert!(
        took >= threshold - Duration::from_secs(1) && took <= threshold + Duration::from_secs(1),
        "{took:?}"
    );
    // Stale until the new connection delivers: REST now.
    assert_eq!(source.ticker_with(&btc, ReadOptions::default()).await.unwrap().origin, Origin::Upstream);
    until("live again", Duration::from_secs(10), || stream.is_live()).await;
    assert_eq!(source.ticker_with(&btc, ReadOptions::default()).await.unwrap().origin, Origin::Cache);
    let st = stream.stats();
    assert_eq!((st.silences, st.reconnects, st.connections), (1, 1, 2));
}

#[tokio::test(start_paused = true)]
async fn products_follow_the_bots_within_the_message_limit() {
    let clock = support::fixed_clock();
    let sim = SimExchange::builder().products(10).clock(clock).start().await.unwrap();
    let products = sim.products();
    let (btc, eth) = (products[0].clone(), products[1].clone());
    let source = CoordinatedSource::coinbase(sim.client().unwrap()).clock(clock).build().unwrap();
    // With credentials and `jwt_on_market_data`, every message carries a fresh JWT (none of
    // these channels needs one; without the switch none is sent).
    let stream = MarketStream::builder(source.clone())
        .url(sim.ws_url())
        .credentials(tickshare::Credentials::generate("organizations/sim/apiKeys/sim"))
        .jwt_on_market_data(true)
        .products([btc.clone()])
        .start()
        .unwrap();
    until("live", Duration::from_secs(10), || stream.is_live()).await;
    // A product added at runtime is subscribed; a refused subscription is sent again.
    sim.ws_fault(WsFault::RefuseSubscriptions(1));
    stream.set_products([btc.clone(), eth.clone()]);
    until("ETH live", Duration::from_secs(30), || stream.is_live()).await;
    assert_eq!(stream.stats().exchange_errors, 1);
    assert_eq!(source.ticker_with(&eth, ReadOptions::default()).await.unwrap().origin, Origin::Cache);
    // Churn: many changes in a moment stay within 8 messages per second.
    for i in 0..20 {
        stream.set_products(products[..i % 10 + 1].iter().cloned());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stream.set_products([eth.clone()]);
    until("only ETH", Duration::from_secs(60), || {
        let st = stream.stats();
        st.followed_products == 1 && stream.is_live()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let ws = sim.ws_stats();
    assert!(ws.max_client_messages_in_any_1s <= 8, "{ws:?}");
    assert_eq!(ws.refused_messages, 1, "only the injected refusal");
    assert!(ws.unsubscribe_messages >= 2);
    assert_eq!(ws.authenticated_messages, ws.subscribe_messages + ws.unsubscribe_messages);
    // BTC is no longer followed: its pushed ticker went stale and REST serves it.
    assert_eq!(source.ticker_with(&btc, ReadOptions::default()).await.unwrap().origin, Origin::Upstream);
    assert_eq!(source.ticker_with(&eth, ReadOptions::default()).await.unwrap().origin, Origin::Cache);
    assert_eq!(stream.products(), vec![eth]);
}

/// A raw WebSocket client against the simulator: Coinbase's shapes, limits and deadline.
#[tokio::test(start_paused = true)]
async fn the_simulated_endpoint_speaks_coinbase() {
    let clock = support::fixed_clock();
    let sim = SimExchange::builder().products(3).clock(clock).start().await.unwrap();
    let (mut ws, _) = tokio_tungstenite::connect_async(sim.ws_url()).await.unwrap();
    send(&mut ws, serde_json::json!({"type":"subscribe","product_ids":[],"channel":"heartbeats"})).await;
    let ack = read_json(&mut ws).await;
    assert_eq!(ack["channel"], "subscriptions");
    assert_eq!(ack["sequence_num"], 0);
    assert!(ack["events"][0]["subscriptions"]["heartbeats"].is_array());
    let hb = read_json(&mut ws).await;
    assert_eq!((hb["channel"].as_str(), hb["sequence_num"].as_u64()), (Some("heartbeats"), Some(1)));
    assert_eq!(hb["events"][0]["heartbeat_counter"], 1, "an integer, as production sends it");
    assert!(hb["events"][0]["current_time"].as_str().unwrap().contains(" +0000 UTC m=+"));
    send(&mut ws, serde_json::json!({"type":"subscribe","product_ids":["BTC-USD","NOPE-USD"],"channel":"candles","jwt":"x.y.z"}))
        .await;
    let err = read_json(&mut ws).await;
    assert_eq!(err["type"], "error");
    let ack = read_json(&mut ws).await;
    assert_eq!(ack["events"][0]["subscriptions"]["candles"], serde_json::json!(["BTC-USD"]));
    let snap = read_json(&mut ws).await;
    assert_eq!(
        (snap["channel"].as_str(), snap["events"][0]["type"].as_str()),
        (Some("candles"), Some("snapshot"))
    );
    let c = &snap["events"][0]["candles"][0];
    let btc = pid("BTC-USD");
    let expected = sim.candle_at(&btc, Granularity::FiveMinute, clock.now_utc()).unwrap();
    assert_eq!(c["start"], expected.start.unix_timestamp().to_string());
    assert_eq!(c["close"], expected.close.to_string());
    assert_eq!(c["product_id"], "BTC-USD");
    assert_eq!(snap["sequence_num"].as_u64(), Some(3));
    assert_eq!(sim.ws_stats().authenticated_messages, 1);
    // Over 8 messages in a second: refused with an error frame.
    for _ in 0..8 {
        send(&mut ws, serde_json::json!({"type":"subscribe","product_ids":["ETH-USD"],"channel":"ticker"}))
            .await;
    }
    let mut errors = 0;
    for _ in 0..30 {
        let m = read_json(&mut ws).await;
        errors +=
            usize::from(m["type"] == "error" && m["message"].as_str().unwrap_or("").contains("rate limit"));
        if errors > 0 {
            break;
        }
    }
    assert_eq!(errors, 1);
    assert_eq!(sim.ws_stats().refused_messages, 1, "the 9th message within one second");
    // A connection that never subscribes is closed after 5 s.
    let (mut idle, _) = tokio_tungstenite::connect_async(sim.ws_url()).await.unwrap();
    let t0 = Instant::now();
    while let Some(Ok(m)) = idle.next().await {
        if m.is_close() {
            break;
        }
    }
    assert!(t0.elapsed() >= Duration::from_secs(5) && t0.elapsed() < Duration::from_secs(6));
    assert_eq!(sim.ws_stats().closed_without_subscribe, 1);
    // More than 8 connections in a second: the handshake is refused with 429.
    let mut refused = 0;
    for _ in 0..9 {
        if tokio_tungstenite::connect_async(sim.ws_url()).await.is_err() {
            refused += 1;
        }
    }
    assert_eq!(refused, 1, "8 connections fit in one second, the 9th does not");
    assert_eq!(sim.ws_stats().connections_refused, 1);
}

async fn send<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, v: serde_json::Value)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::text(v.to_string())).await.unwrap();
}

async fn read_json<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> serde_json::Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match ws.next().await.unwrap().unwrap() {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            _ => continue,
        }
    }
}
