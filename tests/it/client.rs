//! The Coinbase client over real HTTP against the simulated exchange: pagination, candle
//! splitting, best_bid_ask chunking, error classification, auth and timeouts.

use std::time::Duration;

use tickshare::{
    CandleRange, CoinbaseClient, Credentials, Decimal, Error, Granularity, MarketDataPath, MarketDataSource,
    PriceKind, ProductId, TickerBatch,
    sim::{CandleLimit, Fault, SimAccount, SimExchange},
};

use crate::support::fixed_clock;

fn pid(s: &str) -> ProductId {
    s.parse().unwrap()
}

#[tokio::test(start_paused = true)]
async fn the_order_book_is_the_simulators_and_agrees_with_best_bid_ask() {
    let sim = SimExchange::builder().clock(fixed_clock()).start().await.unwrap();
    let client = sim.client_builder().clock(sim.clock()).build().unwrap();
    let btc = pid("BTC-USD");
    let top = client.best_bid_ask(std::slice::from_ref(&btc)).await.unwrap().remove(0);
    let full = client.order_book(&btc, None).await.unwrap();
    assert_eq!(full.product, btc);
    let depth = tickshare::sim::BOOK_DEPTH as usize;
    assert_eq!((full.bids.len(), full.asks.len()), (depth, depth), "no limit: the whole simulated book");
    assert_eq!((Some(full.bids[0].price), Some(full.asks[0].price)), (top.best_bid, top.best_ask));
    assert!(full.bids.windows(2).all(|w| w[0].price > w[1].price));
    assert!(full.asks.windows(2).all(|w| w[0].price < w[1].price));
    assert!(full.bids.iter().chain(&full.asks).all(|l| l.size > Decimal::ZERO));
    let mid = (top.best_bid.unwrap() + top.best_ask.unwrap()) / Decimal::TWO;
    assert_eq!(full.mid_market, Some(mid.normalize()));
    assert_eq!(full.spread_absolute, Some(top.best_ask.unwrap() - top.best_bid.unwrap()));
    // The same instant (the clock is paused): a smaller limit is a prefix of the full book.
    let five = client.order_book(&btc, Some(5)).await.unwrap();
    assert_eq!(five, full.clone().truncated(5));
    // On the public path as well, counted as its own endpoint.
    let public = sim.client_builder().clock(sim.clock()).market_data(MarketDataPath::Public).build().unwrap();
    assert_eq!(public.order_book(&btc, Some(5)).await.unwrap(), five);
    let calls = sim.stats().calls_by_endpoint;
    assert_eq!((calls["product_book"], calls["market/product_book"]), (2, 1));
    // Unknown products and a limit of 0 are typed errors.
    assert!(matches!(client.order_book(&pid("NOPE-USD"), Some(5)).await, Err(Error::NotFound(_))));
    assert!(matches!(client.order_book(&btc, Some(0)).await, Err(Error::InvalidInput(_))));
    assert_eq!(client.stats().requests_by_endpoint["product_book"], 3);
}

#[tokio::test(start_paused = true)]
async fn every_endpoint_decodes() {
    let sim = SimExchange::builder().clock(fixed_clock()).start().await.unwrap();
    let client = sim.client_builder().clock(sim.clock()).build().unwrap();
    let btc = pid("BTC-USD");
    let t = client.ticker(&btc).await.unwrap();
    assert_eq!(t.product, btc);
    assert_eq!(Some(t.price), sim.price(&btc));
    assert!(t.best_bid.unwrap() < t.price && t.price < t.best_ask.unwrap(), "the last trade inside the book");
    let books = client.best_bid_ask(&[btc.clone(), pid("ETH-USD")]).await.unwrap();
    assert_eq!(books.len(), 2);
    let book = books.iter().find(|b| b.product == btc).unwrap();
    assert_eq!((book.best_bid, book.best_ask), (t.best_bid, t.best_ask));
    assert_eq!((book.price, book.price_kind), (t.mid().unwrap(), PriceKind::Mid));
    let now = sim.clock().now_utc();
    let c = client
        .candles(
            &btc,
            Granularity::FiveMinute,
            CandleRange::lookback(Granularity::FiveMinute, 12, now).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(c.len(), 12);
    assert!(c.windows(2).all(|w| w[0].start < w[1].start));
    assert!(!client.accounts().await.unwrap().is_empty());
    assert_eq!(client.products().await.unwrap().len(), 30);
    assert_eq!(client.product(&btc).await.unwrap().product_id, "BTC-USD");
    let server = client.server_time().await.unwrap();
    assert!((server - now).abs() < time::Duration::seconds(2));
    let s = client.stats();
    assert_eq!(s.total_requests, 7);
    assert_eq!(sim.stats().total_calls, 7);
}

#[tokio::test(start_paused = true)]
async fn public_paths_without_credentials() {
    let sim = SimExchange::builder().start().await.unwrap();
    let client = CoinbaseClient::builder().base_url(sim.base_url()).build().unwrap();
    let btc = pid("BTC-USD");
    client.ticker(&btc).await.unwrap();
    // Without credentials, a batch is one public `market/products` request (the last trades).
    let batch = client.tickers(&[btc.clone(), pid("ETH-USD"), btc.clone()]).await.unwrap();
    assert_eq!(batch.len(), 2);
    assert_eq!(batch[0].price, sim.price(&btc).unwrap(), "the last trade");
    let st = sim.stats();
    assert_eq!(st.calls_by_endpoint["market/ticker"], 1);
    assert_eq!(st.calls_by_endpoint["market/products"], 1);
    assert_eq!(st.calls_by_endpoint["best_bid_ask"], 0);
    // With `TickerBatch::Book` and no key: one public ticker request per product.
    let book =
        CoinbaseClient::builder().base_url(sim.base_url()).ticker_batch(TickerBatch::Book).build().unwrap();
    assert_eq!(book.tickers(&[btc.clone(), pid("ETH-USD"), btc.clone()]).await.unwrap().len(), 2);
    assert_eq!(sim.stats().calls_by_endpoint["market/ticker"], 3);
    assert!(matches!(client.accounts().await, Err(Error::Unauthorized(_))));
    assert_eq!(sim.stats().total_calls, 4, "no request is sent without credentials");
}

#[tokio::test(start_paused = true)]
async fn accounts_follow_the_cursor_across_three_pages() {
    let accounts: Vec<SimAccount> = ["USD", "USDC", "BTC", "ETH", "SOL", "ADA", "DOT"]
        .iter()
        .map(|c| SimAccount::new(c, Decimal::ONE))
        .collect();
    let sim = SimExchange::builder().accounts(accounts).start().await.unwrap();
    let client = sim.client_builder().accounts_page_limit(3).build().unwrap();
    let got = client.accounts().await.unwrap();
    assert_eq!(got.len(), 7);
    assert_eq!(sim.stats().calls_by_endpoint["accounts"], 3);
}

#[tokio::test(start_paused = true)]
async fn candle_ranges_over_350_are_split_and_merged() {
    let sim = SimExchange::builder().clock(fixed_clock()).start().await.unwrap();
    let client = sim.client().unwrap();
    let btc = pid("BTC-USD");
    let range = CandleRange::lookback(Granularity::OneMinute, 1000, sim.clock().now_utc()).unwrap();
    let c = client.candles(&btc, Granularity::OneMinute, range).await.unwrap();
    assert_eq!(c.len(), 1000);
    assert!(c.windows(2).all(|w| w[1].start - w[0].start == time::Duration::minutes(1)));
    let reqs = sim.stats().recent_candle_requests;
    // 300 + 300 + 300 + 100 (it was 350 + 350 + 300 before the client's default followed the
    // exchange's observed 300).
    assert_eq!(reqs.len(), 4);
    // Contiguous, non-overlapping windows of at most 350 buckets.
    assert_eq!(reqs[0].start, range.start.unix_timestamp());
    for w in reqs.windows(2) {
        assert_eq!(w[1].start, w[0].end + 1);
    }
    for r in &reqs {
        assert!((r.end - r.start) / 60 < 350);
    }
}

/// Issue 15: the exchange answers a window of more than 300 buckets with a 400, whatever its
/// documentation says. A 350-bucket backfill goes out as 300 + 50 and comes back whole.
#[tokio::test(start_paused = true)]
async fn a_350_bucket_backfill_goes_out_in_requests_of_at_most_300_buckets_without_a_gap() {
    let sim = SimExchange::builder().clock(fixed_clock()).start().await.unwrap();
    let client = sim.client().unwrap();
    assert_eq!(client.candle_max_buckets(), tickshare::coinbase::OBSERVED_MAX_CANDLES_PER_REQUEST);
    let btc = pid("BTC-USD");
    let g = Granularity::OneMinute;
    let range = CandleRange::lookback(g, 350, sim.clock().now_utc()).unwrap();
    let c = client.candles(&btc, g, range).await.unwrap();
    // Every candle, oldest first, no duplicate, no gap, exactly the exchange's.
    assert_eq!(c.len(), 350);
    assert_eq!(c[0].start, range.start);
    assert!(c.windows(2).all(|w| w[1].start - w[0].start == time::Duration::minutes(1)));
    for candle in [&c[0], &c[299], &c[300], &c[349]] {
        assert_eq!(Some(*candle), sim.candle_at(&btc, g, candle.start));
    }
    let s = sim.stats();
    assert_eq!(s.responses(400), 0, "no request was over the exchange's limit");
    let buckets: Vec<i64> = s.recent_candle_requests.iter().map(|r| (r.end - r.start) / 60 + 1).collect();
    assert_eq!(buckets, [300, 50]);
    assert_eq!(s.recent_candle_requests[1].start, s.recent_candle_requests[0].end + 1);

    // The documented 350 is still allowed when configured, against an exchange that allows it.
    let documented = SimExchange::builder()
        .clock(fixed_clock())
        .candle_limit(CandleLimit::Documented)
        .start()
        .await
        .unwrap();
    let client = documented.client_builder().candle_max_buckets(350).build().unwrap();
    // The closed candles: the one in progress depends on when each exchange was asked (the
    // second 50-bucket request above waited one admission interval: bulk reads never take
    // the burst).
    assert_eq!(client.candles(&btc, g, range).await.unwrap()[..349], c[..349]);
    assert_eq!(documented.stats().recent_candle_requests.len(), 1);
    // Against the real rule, a 350-bucket request is refused.
    let e = sim.client_builder().candle_max_buckets(350).build().unwrap().candles(&btc, g, range).await;
    assert!(
        matches!(&e, Err(Error::Upstream { status: 400, message }) if message.contains("less than 300")),
        "{e:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn best_bid_ask_is_chunked() {
    let sim = SimExchange::builder().start().await.unwrap();
    let client = sim.client_builder().best_bid_ask_chunk(8).ticker_batch(TickerBatch::Book).build().unwrap();
    let products = sim.products();
    let got = client.tickers(&products).await.unwrap();
    assert_eq!(got.len(), 30);
    assert_eq!(sim.stats().calls_by_endpoint["best_bid_ask"], 4);
    assert!(got.iter().all(|t| t.price_kind == PriceKind::Mid), "the book's mid, and it says so");
    // The default batch: the last trades, chunked the same way.
    let last =
        sim.client_builder().public_tickers_chunk(8).build().unwrap().tickers(&products).await.unwrap();
    assert_eq!(last.len(), 30);
    assert_eq!(sim.stats().calls_by_endpoint["products"], 4);
    for t in &last {
        assert_eq!((t.price_kind, Some(t.price)), (PriceKind::LastTrade, sim.price(&t.product)));
    }
    // Both: the last trade and the book, twice the calls.
    let both = sim.client_builder().ticker_batch(TickerBatch::LastTradeAndBook).build().unwrap();
    let t = both.tickers(&products[..1]).await.unwrap().remove(0);
    assert_eq!(Some(t.price), sim.price(&t.product));
    assert!(t.best_bid.unwrap() < t.price && t.price < t.best_ask.unwrap());
    // Unknown products are left out, not an error.
    let got = client.tickers(&[pid("BTC-USD"), pid("NOPE-USD")]).await.unwrap();
    assert_eq!(got.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_429_is_rate_limited_with_retry_after_json_or_html() {
    for html in [false, true] {
        let sim =
            SimExchange::builder().private_limit(2).html_429(html).retry_after(true).start().await.unwrap();
        let client = sim.client_builder().unlimited().clock(sim.clock()).build().unwrap();
        let btc = pid("BTC-USD");
        client.ticker(&btc).await.unwrap();
        client.ticker(&btc).await.unwrap();
        let e = client.ticker(&btc).await.unwrap_err();
        assert!(matches!(e, Error::RateLimited { local: false, .. }), "{e:?}");
        let wait = e.retry_after().expect("retry-after");
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1), "{wait:?}");
        assert!(e.is_retryable());
        assert_eq!(client.stats().rate_limited_429, 1);
    }
}

#[tokio::test(start_paused = true)]
async fn x_ratelimit_reset_alone_gives_the_wait() {
    let sim = SimExchange::builder().private_limit(2).retry_after(false).start().await.unwrap();
    let client = sim.client_builder().unlimited().clock(sim.clock()).build().unwrap();
    let btc = pid("BTC-USD");
    let _ = client.ticker(&btc).await;
    let _ = client.ticker(&btc).await;
    let e = client.ticker(&btc).await.unwrap_err();
    let wait = e.retry_after().expect("x-ratelimit-reset read");
    assert!(wait <= Duration::from_secs(2), "{wait:?}");
}

#[tokio::test(start_paused = true)]
async fn bad_jwt_is_unauthorized_and_the_right_key_passes() {
    let creds = Credentials::generate("organizations/o/apiKeys/k");
    let sim = SimExchange::builder().jwt_public_key_pem(&creds.public_key_pem()).start().await.unwrap();
    let good = sim.client_builder().credentials(creds).build().unwrap();
    assert!(good.accounts().await.is_ok());
    let wrong =
        sim.client_builder().credentials(Credentials::generate("organizations/o/apiKeys/k")).build().unwrap();
    assert!(matches!(wrong.accounts().await, Err(Error::Unauthorized(_))));
    assert_eq!(sim.stats().auth_failures, 1);
}

#[tokio::test(start_paused = true)]
async fn a_stalled_response_is_a_timeout() {
    let sim = SimExchange::builder().start().await.unwrap();
    sim.add_fault(Fault::stall(Duration::from_secs(60)));
    let client = sim.client_builder().timeout(Duration::from_secs(2)).build().unwrap();
    let t0 = tokio::time::Instant::now();
    let e = client.ticker(&pid("BTC-USD")).await.unwrap_err();
    assert_eq!(e, Error::Timeout);
    assert!(t0.elapsed() >= Duration::from_secs(2) && t0.elapsed() < Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn faults_become_typed_errors() {
    let sim = SimExchange::builder().start().await.unwrap();
    let client = sim.client().unwrap();
    let btc = pid("BTC-USD");
    sim.add_fault(Fault::status(503).times(1));
    assert!(matches!(client.ticker(&btc).await, Err(Error::Upstream { status: 503, .. })));
    sim.add_fault(Fault::malformed_body().times(1));
    assert!(matches!(client.ticker(&btc).await, Err(Error::Decode(_))));
    sim.add_fault(Fault::truncated_body().times(1));
    let e = client.ticker(&btc).await.unwrap_err();
    assert!(matches!(e, Error::Decode(_) | Error::Transport(_)), "{e:?}");
    sim.add_fault(Fault::connection_reset().times(1));
    assert!(matches!(client.ticker(&btc).await, Err(Error::Transport(_))));
    assert!(matches!(client.ticker(&pid("NOPE-USD")).await, Err(Error::NotFound(_))));
    // Recovered.
    assert!(client.ticker(&btc).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn the_default_limiter_never_exceeds_the_exchange_limit() {
    let sim = SimExchange::builder().start().await.unwrap();
    let client = sim.client_builder().market_data(MarketDataPath::Public).build().unwrap();
    let btc = pid("BTC-USD");
    let all = futures_util::future::join_all((0..50).map(|_| client.ticker(&btc))).await;
    assert!(all.iter().all(|r| r.is_ok()));
    let s = sim.stats();
    assert_eq!(s.rate_limited_429, 0);
    assert!(s.max_requests_in_any_1s.public <= 10, "{:?}", s.max_requests_in_any_1s);
}

#[tokio::test(start_paused = true)]
async fn errors_never_leak_the_query_or_the_token() {
    let sim = SimExchange::builder().start().await.unwrap();
    let client = sim.client().unwrap();
    sim.set_down(true);
    let e = client
        .candles(
            &pid("BTC-USD"),
            Granularity::OneHour,
            CandleRange::lookback(Granularity::OneHour, 5, sim.clock().now_utc()).unwrap(),
        )
        .await
        .unwrap_err();
    let msg = format!("{e} {e:?}");
    assert!(!msg.contains("granularity=") && !msg.contains("start=") && !msg.contains("Bearer"), "{msg}");
    assert!(e.is_retryable());
}

/// `MarketDataPath::Balanced` (issue #6): a cold burst of 25 candle requests draws on both
/// classes' budgets and finishes sooner than on the private class alone, with no 429 and no
/// one-second window over either limit; a lone request stays private.
#[tokio::test(start_paused = true)]
async fn balanced_market_data_spreads_a_burst_over_both_classes() {
    let sim = SimExchange::builder().products(25).latency(Duration::from_millis(30)).start().await.unwrap();
    let products = sim.products();
    let now = sim.clock().now_utc();
    let range = CandleRange::lookback(Granularity::OneHour, 24, now).unwrap();
    let mut elapsed = Vec::new();
    for path in [MarketDataPath::Private, MarketDataPath::Balanced] {
        let client = sim.client_builder().market_data(path).build().unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        sim.reset_stats();
        let t0 = tokio::time::Instant::now();
        let all = futures_util::future::join_all(
            products.iter().map(|p| client.candles(p, Granularity::OneHour, range)),
        )
        .await;
        elapsed.push(t0.elapsed());
        assert!(all.iter().all(|r| r.as_ref().is_ok_and(|c| c.len() == 24)), "{path:?}");
        let s = sim.stats();
        assert_eq!(s.rate_limited_429, 0, "{path:?}");
        assert!(s.max_requests_in_any_1s.public < 10 && s.max_requests_in_any_1s.private < 30, "{s:?}");
        let (public, private) = (s.calls_by_endpoint["market/candles"], s.calls_by_endpoint["candles"]);
        assert_eq!(public + private, 25);
        if path == MarketDataPath::Balanced {
            assert!(public >= 4 && private >= 15, "{public} public, {private} private");
        } else {
            assert_eq!(public, 0);
        }
    }
    // Candles are bulk reads, paced one at a time (never from the burst): private alone at
    // 24/s (~1.03 s), both classes at ~32/s (~0.78 s).
    assert!(elapsed[0] > Duration::from_millis(1_000), "{elapsed:?}");
    assert!(elapsed[1] < Duration::from_millis(820), "{elapsed:?}");

    // An idle limiter admits a lone request on the private class at once.
    let client = sim.client_builder().market_data(MarketDataPath::Balanced).build().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    sim.reset_stats();
    client.candles(&products[0], Granularity::OneHour, range).await.unwrap();
    client.ticker(&products[0]).await.unwrap();
    let s = sim.stats();
    assert_eq!((s.calls_by_endpoint["candles"], s.calls_by_endpoint["ticker"]), (1, 1));
    assert!(matches!(
        CoinbaseClient::builder().market_data(MarketDataPath::Balanced).build(),
        Err(Error::Config(_))
    ));
}

/// Issue 15: Coinbase limits private requests per user and wants one key per portfolio, so a
/// user's keys share one 30/s budget. Two clients on two keys of one user, each firing 60
/// private requests at once, together never send more than 30 in any second; with a limiter
/// each (no identity), they would send nearly twice the limit.
#[tokio::test(start_paused = true)]
async fn two_keys_of_one_user_share_one_private_budget() {
    let two_clients = |sim: &SimExchange, identity: Option<&str>| {
        ["organizations/o/apiKeys/main-portfolio", "organizations/o/apiKeys/savings-portfolio"].map(|key| {
            let b = sim.client_builder().credentials(Credentials::generate(key));
            match identity {
                Some(id) => b.account_identity(id),
                None => b,
            }
            .build()
            .unwrap()
        })
    };
    let burst = |clients: [CoinbaseClient; 2]| async move {
        let calls = clients.iter().flat_map(|c| (0..60).map(move |_| c.accounts()));
        futures_util::future::join_all(calls).await
    };

    let sim = SimExchange::builder().start().await.unwrap();
    let clients = two_clients(&sim, Some("alice@example.com"));
    assert!(clients[0].rate_limiter().unwrap().same_as(clients[1].rate_limiter().unwrap()));
    assert_eq!(clients[0].account_identity(), Some("alice@example.com"));
    let all = burst(clients).await;
    assert!(all.iter().all(Result::is_ok));
    let s = sim.stats();
    assert_eq!(s.calls(tickshare::sim::Endpoint::Accounts), 120);
    assert_eq!(s.rate_limited_429, 0);
    assert!(s.max_requests_in_any_1s.private <= 30, "{:?}", s.max_requests_in_any_1s);

    // Without the identity, each key has its own 29-per-window budget: the user's limit is
    // exceeded (the exchange here counts without refusing).
    let sim = SimExchange::builder().enforce_rate_limits(false).start().await.unwrap();
    let clients = two_clients(&sim, None);
    assert!(!clients[0].rate_limiter().unwrap().same_as(clients[1].rate_limiter().unwrap()));
    assert!(burst(clients).await.iter().all(Result::is_ok));
    assert!(sim.stats().max_requests_in_any_1s.private > 30, "{:?}", sim.stats().max_requests_in_any_1s);
}

/// Issue 15: without a key, tickers of many products come from `GET /market/products` with
/// repeated `product_ids`, one public request per chunk, instead of one request per product.
/// Each is the list's last trade price, with no bid/ask.
#[tokio::test(start_paused = true)]
async fn keyless_tickers_are_batched_through_the_public_products_list() {
    let sim = SimExchange::builder().products(30).clock(fixed_clock()).start().await.unwrap();
    let products: Vec<ProductId> = sim.products().into_iter().take(25).collect();
    for chunk in [10, 100] {
        sim.reset_stats();
        let client = CoinbaseClient::builder()
            .base_url(sim.base_url())
            .clock(sim.clock())
            .public_tickers_chunk(chunk)
            .build()
            .unwrap();
        assert!(!client.has_credentials());
        assert_eq!(client.tickers_chunk(), chunk);
        let mut asked = products.clone();
        asked.push(pid("NOPE-USD"));
        let got = client.tickers(&asked).await.unwrap();
        assert_eq!(got.iter().map(|t| t.product.clone()).collect::<Vec<_>>(), products, "unknown left out");
        for t in &got {
            // Stamped on arrival (the list has no time); chunks after the first waited for the
            // public limiter (8/s).
            assert!(t.time >= fixed_clock().now_utc() && t.time <= sim.clock().now_utc());
            assert_eq!(
                Some(t.price),
                sim.price_at(&t.product, t.time),
                "{}: the last trade price",
                t.product
            );
            assert_eq!((t.best_bid, t.best_ask), (None, None), "the list has no bid/ask");
        }
        let s = sim.stats();
        let calls = 26usize.div_ceil(chunk) as u64;
        assert_eq!(s.calls(tickshare::sim::Endpoint::MarketProducts), calls, "chunk {chunk}");
        assert_eq!(s.total_calls, calls, "public calls only, nothing per product");
        assert_eq!(s.max_requests_in_any_1s.private, 0);
    }
    // Through a coordinated source: one batch, one call.
    sim.reset_stats();
    let keyless = CoinbaseClient::builder().base_url(sim.base_url()).clock(sim.clock()).build().unwrap();
    let source = tickshare::CoordinatedSource::coinbase(keyless).clock(sim.clock()).build().unwrap();
    assert_eq!(source.tickers(&products).await.unwrap().len(), 25);
    assert_eq!(sim.stats().total_calls, 1);
}
