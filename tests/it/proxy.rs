//! Issue 17: the caching proxy in front of the simulated exchange, with 25 legacy clients
//! (each a `CoinbaseClient` with its own limiter) pointed at it.

use std::{collections::BTreeMap, time::Duration};

use tickshare::{
    CandleRange, CoinbaseClient, CoordinatedSource, Credentials, Granularity, MarketDataSource, ProductId,
    proxy::{Proxy, ProxyBuilder, TickerAnswer},
    sim::{SimExchange, SimHandle},
};

use crate::support::{fixed_clock, get, http, on_one_connection, sdk_style_get};

const TOKEN: &str = "local-token-for-the-proxy-tests";
const BOTS: usize = 25;
const TICKS: usize = 12;
const PRODUCTS: usize = 10;

async fn sim(creds: &Credentials) -> SimExchange {
    SimExchange::builder()
        .products(PRODUCTS)
        .clock(fixed_clock())
        .jwt_public_key_pem(&creds.public_key_pem())
        .start()
        .await
        .unwrap()
}

async fn proxy(creds: &Credentials, sim: &SimHandle) -> Proxy {
    proxy_with(creds, sim, |b| b).await
}

/// The test proxy in front of `sim`, with `f` applied to its builder.
async fn proxy_with(
    creds: &Credentials,
    sim: &SimHandle,
    f: impl FnOnce(ProxyBuilder) -> ProxyBuilder,
) -> Proxy {
    let b = Proxy::builder(creds.clone())
        .upstream(sim.base_url())
        .listen("127.0.0.1:0".parse().unwrap())
        .local_token(TOKEN)
        .header_read_timeout(None)
        .clock(sim.clock());
    f(b).start().await.unwrap()
}

/// A simulator and the default test proxy in front of it, on one generated key.
async fn started() -> (Credentials, SimExchange, Proxy) {
    let creds = Credentials::generate("organizations/t/apiKeys/proxy");
    let upstream = sim(&creds).await;
    let proxy = proxy(&creds, &upstream).await;
    (creds, upstream, proxy)
}

/// One bot of the legacy pattern: its own client (own limiter), pointed at `base`.
fn bot(base: &str, creds: &Credentials, sim: &SimHandle) -> CoinbaseClient {
    CoinbaseClient::builder().base_url(base).credentials(creds.clone()).clock(sim.clock()).build().unwrap()
}

/// One tick of one bot: ticker, candles of the last hour, accounts, a balance check.
async fn tick(src: &dyn MarketDataSource, p: &ProductId, sim: &SimHandle) {
    let now = sim.clock().now_utc();
    let t = src.ticker(p).await.unwrap();
    // Within the freshness contract (ticker TTL 5 s), the price the exchange had then.
    assert!(now - t.time <= time::Duration::seconds(5), "{now} {}", t.time);
    assert_eq!(Some(t.price), sim.price_at(p, t.time), "{p}");
    assert!(
        t.best_bid.is_some() && t.best_bid < t.best_ask,
        "{p}: the book, as the exchange answers it: {t:?}"
    );
    let range = CandleRange::new(now - time::Duration::hours(1), now).unwrap();
    let candles = src.candles(p, Granularity::OneMinute, range).await.unwrap();
    assert!(candles.len() >= 59, "{}", candles.len());
    for c in candles.iter().filter(|c| Granularity::OneMinute.is_closed(c.start, now)) {
        assert_eq!(Some(*c), sim.candle_at(p, Granularity::OneMinute, c.start), "{p} {}", c.start);
    }
    assert!(!src.accounts().await.unwrap().is_empty());
    src.validate_trade_balance("USD", 10.into()).await.unwrap();
}

fn calls(sim: &SimHandle) -> BTreeMap<String, u64> {
    sim.stats().calls_by_endpoint.into_iter().filter(|(_, n)| *n > 0).collect()
}

#[tokio::test(start_paused = true)]
async fn twenty_five_legacy_clients_through_the_proxy_cost_what_the_coordinated_source_costs() {
    let creds = Credentials::generate("organizations/t/apiKeys/proxy");
    // What CoordinatedSource alone makes for the same answers: the bots' tickers carry the
    // book (Coinbase's ticker has best_bid/best_ask), so the reference fetches it too.
    let reference_sim = sim(&creds).await;
    let reference = CoordinatedSource::coinbase(
        reference_sim
            .client_builder()
            .credentials(creds.clone())
            .ticker_batch(tickshare::TickerBatch::LastTradeAndBook)
            .build()
            .unwrap(),
    )
    .clock(reference_sim.clock())
    .build()
    .unwrap();
    // The proxy in front of its own simulator (same seed, same clock).
    let upstream = sim(&creds).await;
    let proxy = proxy(&creds, &upstream).await;
    let bots: Vec<CoinbaseClient> = (0..BOTS).map(|_| bot(&proxy.base_url(), &creds, &upstream)).collect();
    let products = upstream.products();

    for _ in 0..TICKS {
        let through_proxy = futures_util::future::join_all(
            bots.iter().enumerate().map(|(i, b)| tick(b, &products[i % PRODUCTS], &upstream)),
        );
        let alone = futures_util::future::join_all(
            (0..BOTS).map(|i| tick(&reference, &products[i % PRODUCTS], &reference_sim)),
        );
        tokio::join!(through_proxy, alone);
        tokio::time::sleep(Duration::from_secs(60)).await;
    }

    let (got, want) = (upstream.stats(), reference_sim.stats());
    eprintln!("through the proxy: {:?}\nalone: {:?}", calls(&upstream), calls(&reference_sim));
    assert!(got.total_calls <= want.total_calls, "{} > {}", got.total_calls, want.total_calls);
    assert_eq!(got.rate_limited_429, 0);
    assert_eq!(got.auth_failures, 0, "the proxy signs with the key the exchange knows");
    assert!(got.max_requests_in_any_1s.private <= 30 && got.max_requests_in_any_1s.public <= 10);
    let s = proxy.stats();
    // Every bot read: ticker, candles, accounts twice, per tick.
    assert_eq!(s.requests_by_route["ticker"], (BOTS * TICKS) as u64);
    assert_eq!(s.requests_by_route["candles"], (BOTS * TICKS) as u64);
    assert_eq!(s.requests_by_route["accounts"], (2 * BOTS * TICKS) as u64);
    assert_eq!(s.requests_by_route["passthrough"], 0);
    assert!(s.coordinated.coalesced_waiters > 0 || s.coordinated.cache_hits > 0);
    assert!(s.coordinated.batch_calls >= 1, "ticker reads merged into batches");
    assert_eq!(got.calls_by_endpoint["ticker"] + got.calls_by_endpoint["market/ticker"], 0);

    // Accounts equal a direct read.
    let direct = upstream.client_builder().credentials(creds.clone()).build().unwrap();
    let mut want = direct.accounts().await.unwrap();
    let mut have = bots[0].accounts().await.unwrap();
    want.sort_by(|a, b| a.uuid.cmp(&b.uuid));
    have.sort_by(|a, b| a.uuid.cmp(&b.uuid));
    assert_eq!(have, want);
}

#[tokio::test(start_paused = true)]
async fn an_order_passes_through_once_and_the_next_balance_read_is_fresh() {
    let (creds, upstream, proxy) = started().await;
    let b = bot(&proxy.base_url(), &creds, &upstream);
    let before = b.accounts().await.unwrap();
    assert_eq!(upstream.stats().calls_by_endpoint["accounts"], 1);
    b.accounts().await.unwrap();
    assert_eq!(upstream.stats().calls_by_endpoint["accounts"], 1, "served from the cache");

    // A market buy placed through the proxy: signed by the proxy, filled by the exchange.
    let path = "/api/v3/brokerage/orders";
    let host = proxy.addr().to_string();
    let order = r#"{"client_order_id":"1","product_id":"BTC-USD","side":"BUY","order_configuration":{"market_market_ioc":{"quote_size":"100"}}}"#;
    let resp = http()
        .post(format!("{}{path}", proxy.base_url()))
        .bearer_auth(creds.rest_jwt("POST", &host, path))
        .header("content-type", "application/json")
        .body(order)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let created: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(created["success"], true, "{created}");
    // Sent once, never retried, and the exchange saw the proxy's token, not the client's.
    assert_eq!(upstream.stats().calls_by_endpoint["orders"], 1);
    assert_eq!(upstream.stats().auth_failures, 0);
    let s = proxy.stats();
    assert_eq!(
        (s.requests_by_route["passthrough"], s.passthrough_retries, s.accounts_invalidations),
        (1, 0, 1)
    );

    // The next balance read is fresh: it shows the fill, as a direct read does.
    let after = b.accounts().await.unwrap();
    assert_eq!(upstream.stats().calls_by_endpoint["accounts"], 2, "fresh after the order");
    assert_ne!(after, before);
    let direct = upstream.client_builder().credentials(creds.clone()).build().unwrap();
    assert_eq!(after, direct.accounts().await.unwrap());
    let usd = |a: &[tickshare::Account]| a.iter().find(|a| a.currency == "USD").map(|a| a.available);
    assert!(usd(&after) < usd(&before), "{:?} -> {:?}", usd(&before), usd(&after));

    // Reading the order back passes through too (never cached: each read goes upstream).
    let id = created["order_id"].as_str().unwrap();
    let get_path = format!("/api/v3/brokerage/orders/historical/{id}");
    for _ in 0..2 {
        let jwt = creds.rest_jwt("GET", &host, &get_path);
        let r = get(&http(), &format!("{}{get_path}", proxy.base_url()), Some(&jwt)).await;
        assert_eq!(r.json()["order"]["status"], "FILLED");
    }
    assert_eq!(upstream.stats().calls_by_endpoint["orders/historical"], 2);
    assert_eq!(proxy.stats().accounts_invalidations, 1, "reads do not invalidate");

    // Anything else that can move funds invalidates too (a v2 send; the simulator has none).
    let send = "/v2/accounts/some-account/transactions";
    let r = http()
        .post(format!("{}{send}", proxy.base_url()))
        .bearer_auth(creds.rest_jwt("POST", &host, send))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(proxy.stats().accounts_invalidations, 2);
    b.accounts().await.unwrap();
    assert_eq!(upstream.stats().calls_by_endpoint["accounts"], 4, "fresh again");
}

#[tokio::test(start_paused = true)]
async fn unauthenticated_clients_get_401_and_nothing_is_forwarded() {
    let (creds, upstream, proxy) = started().await;
    let base = proxy.base_url();
    let c = http();
    let other = Credentials::generate("organizations/x/apiKeys/other");
    let paths = [
        "/api/v3/brokerage/accounts",
        "/api/v3/brokerage/market/products/BTC-USD/ticker?limit=1",
        "/api/v3/brokerage/orders/historical/batch",
        "/metrics",
        "/stats",
    ];
    for p in paths {
        let bare = p.split('?').next().unwrap();
        assert_eq!(get(&c, &format!("{base}{p}"), None).await.status, 401, "{p}");
        let forged = other.rest_jwt("GET", &proxy.addr().to_string(), bare);
        assert_eq!(get(&c, &format!("{base}{p}"), Some(&forged)).await.status, 401, "{p}");
        assert_eq!(get(&c, &format!("{base}{p}"), Some("not-the-token-but-long")).await.status, 401, "{p}");
        // A token of the right key for another path is refused too.
        let wrong_path = creds.rest_jwt("GET", "api.coinbase.com", "/api/v3/brokerage/time");
        assert_eq!(get(&c, &format!("{base}{p}"), Some(&wrong_path)).await.status, 401, "{p}");
    }
    let order = c.post(format!("{base}/api/v3/brokerage/orders")).body("{}").send().await.unwrap();
    assert_eq!(order.status(), 401);
    assert_eq!(upstream.stats().total_calls, 0, "nothing forwarded");
    assert_eq!(proxy.stats().unauthorized, 21);
    // /healthz needs no credentials; the local token and an SDK-style JWT both work.
    assert_eq!(get(&c, &format!("{base}/healthz"), None).await.json()["status"], "ok");
    let ok = get(&c, &format!("{base}/api/v3/brokerage/market/products/BTC-USD/ticker?limit=1"), Some(TOKEN))
        .await;
    assert_eq!(ok.status, 200);
    let sdk = creds.rest_jwt("GET", "api.coinbase.com", "/api/v3/brokerage/time");
    assert_eq!(get(&c, &format!("{base}/api/v3/brokerage/time"), Some(&sdk)).await.status, 200);
    // Non-loopback needs explicit configuration and a token.
    let remote = Proxy::builder(creds.clone()).listen("0.0.0.0:0".parse().unwrap()).start().await;
    assert!(matches!(remote, Err(tickshare::Error::Config(_))));
    let remote =
        Proxy::builder(creds.clone()).listen("0.0.0.0:0".parse().unwrap()).allow_remote(true).start().await;
    assert!(matches!(remote, Err(tickshare::Error::Config(_))));
}

/// Real time: the per-connection bucket refills with the clock.
#[tokio::test]
async fn a_connection_over_its_budget_gets_the_proxys_429_and_costs_nothing_upstream() {
    let creds = Credentials::generate("organizations/t/apiKeys/proxy");
    let upstream = sim(&creds).await;
    let proxy = proxy_with(&creds, &upstream, |b| b.per_connection_rate(1, 5)).await;
    let url = format!("{}/api/v3/brokerage/market/products/BTC-USD/ticker?limit=1", proxy.base_url());
    // One client, requests one after another: one keep-alive connection.
    let greedy = http();
    let t0 = std::time::Instant::now();
    let mut got = Vec::new();
    for _ in 0..20 {
        got.push(get(&greedy, &url, Some(TOKEN)).await);
    }
    let elapsed = t0.elapsed().as_secs();
    let calls_then = upstream.stats().total_calls;
    // The burst, then refusals (give back one token per whole second the loop took).
    assert!(
        got[..5].iter().all(|g| g.status == 200),
        "{:?}",
        got.iter().map(|g| g.status).collect::<Vec<_>>()
    );
    let refused: Vec<_> = got.iter().filter(|g| g.status == 429).collect();
    assert!(refused.len() as u64 + elapsed + 1 >= 15, "{} refused in {elapsed} s", refused.len());
    for r in &refused {
        assert_eq!(r.json()["error"], "RATE_LIMIT_EXCEEDED");
        assert_eq!(r.header("retry-after"), Some("1"), "the next token is at most a second away");
    }
    assert_eq!(proxy.stats().limited, refused.len() as u64);
    // Another connection has a budget of its own; the refused requests cost nothing upstream.
    let polite = http();
    assert_eq!(get(&polite, &url, Some(TOKEN)).await.status, 200);
    assert_eq!(upstream.stats().total_calls, calls_then);
    assert_eq!(upstream.stats().rate_limited_429, 0);
    proxy.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn bodies_are_coinbase_shaped_and_metrics_are_scraped() {
    let (_, upstream, proxy) = started().await;
    let (base, c) = (proxy.base_url(), http());
    let api = format!("{base}/api/v3/brokerage");
    let ids = "product_ids=BTC-USD&product_ids=ETH-USD";
    for (path, key) in [
        ("/market/products/BTC-USD/ticker?limit=1".to_string(), "trades"),
        (format!("/best_bid_ask?{ids}"), "pricebooks"),
        (format!("/market/products?{ids}"), "products"),
        ("/products".to_string(), "products"),
        ("/accounts?limit=2".to_string(), "accounts"),
        ("/time".to_string(), "epochMillis"),
    ] {
        let got = get(&c, &format!("{api}{path}"), Some(TOKEN)).await;
        assert_eq!(got.status, 200, "{path}: {}", String::from_utf8_lossy(&got.body));
        assert!(got.json().get(key).is_some(), "{path}: {}", String::from_utf8_lossy(&got.body));
    }
    let two = get(&c, &format!("{api}/market/products?{ids}"), Some(TOKEN)).await.json();
    assert_eq!(two["num_products"], 2);
    let product = get(&c, &format!("{api}/market/products/ETH-USD"), Some(TOKEN)).await.json();
    assert_eq!(product["product_id"], "ETH-USD");
    assert_eq!(
        get(&c, &format!("{api}/market/products/NOPE-USD/ticker?limit=1"), Some(TOKEN)).await.status,
        404
    );
    let page = get(&c, &format!("{api}/accounts?limit=2"), Some(TOKEN)).await.json();
    assert_eq!(page["has_next"], true);
    let next =
        get(&c, &format!("{api}/accounts?limit=2&cursor={}", page["cursor"].as_str().unwrap()), Some(TOKEN))
            .await;
    assert_eq!(next.status, 200);
    let now = upstream.clock().now_utc().unix_timestamp();
    let window = format!("start={}&end={now}&granularity=ONE_MINUTE", now - 3600);
    let candles =
        get(&c, &format!("{api}/market/products/BTC-USD/candles?{window}"), Some(TOKEN)).await.json();
    let direct = get(&c, &format!("{}/market/products/BTC-USD/candles?{window}", upstream.api_url()), None)
        .await
        .json();
    assert_eq!(candles, direct, "the same bytes' meaning as the exchange's own answer");
    let wide = format!("start={}&end={now}&granularity=ONE_MINUTE", now - 400 * 60);
    assert_eq!(
        get(&c, &format!("{api}/market/products/BTC-USD/candles?{wide}"), Some(TOKEN)).await.status,
        400
    );

    let scrape = || async {
        let got = get(&c, &format!("{base}/metrics"), Some(TOKEN)).await;
        assert_eq!(got.status, 200);
        parse_prometheus(&String::from_utf8(got.body).unwrap())
    };
    let first = scrape().await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    get(&c, &format!("{api}/market/products/BTC-USD/ticker?limit=1"), Some(TOKEN)).await;
    get(&c, &format!("{api}/market/products/BTC-USD/ticker?limit=1"), Some(TOKEN)).await;
    let second = scrape().await;
    for name in [
        "tickshare_upstream_calls_total{endpoint=\"tickers\",class=\"private\"}",
        "tickshare_cache_hits_total",
        "tickshare_cache_misses_total",
        "tickshare_coalesced_waiters_total",
        "tickshare_batch_calls_total",
        "tickshare_batched_products_total",
        "tickshare_rate_limited_total",
        "tickshare_stale_serves_total",
        "tickshare_breaker_state{class=\"private\",state=\"closed\"}",
        "tickshare_proxy_requests_total{route=\"ticker\"}",
        "tickshare_limiter_acquired_total{class=\"private\"}",
    ] {
        assert!(first.contains_key(name) && second.contains_key(name), "{name} missing: {second:?}");
    }
    for (k, v) in &first {
        if k.contains("_total") {
            assert!(second[k] >= *v, "{k} went down");
        }
    }
    assert!(second["tickshare_cache_hits_total"] > first["tickshare_cache_hits_total"]);
    assert_eq!(second["tickshare_breaker_state{class=\"private\",state=\"closed\"}"], 1.0);
    assert_eq!(second["tickshare_rate_limited_total"], 0.0);
    let stats = get(&c, &format!("{base}/stats"), Some(TOKEN)).await.json();
    assert!(stats["coordinated"]["upstream_calls"].as_u64().unwrap() >= 1);
}

/// `name{labels} value` lines; HELP/TYPE lines are checked for every name.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(kind == "counter" || kind == "gauge", "{line}");
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let name = series.split('{').next().unwrap();
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{line}");
        assert!(typed.contains(name), "no TYPE for {name}");
        out.insert(series.to_string(), value.parse::<f64>().unwrap());
    }
    out
}

#[tokio::test(start_paused = true)]
async fn books_are_served_not_emptied() {
    // The proxy answers in Coinbase's shapes, which carry the book: `best_bid_ask` and a
    // ticker's `best_bid`/`best_ask` must be the exchange's, not empty (they were, once the
    // batched ticker read became the last trades only).
    let (creds, upstream, proxy) = started().await;
    let (api, c) = (format!("{}/api/v3/brokerage", proxy.base_url()), http());
    let direct = bot(upstream.base_url(), &creds, &upstream);
    let books = get(&c, &format!("{api}/best_bid_ask?product_ids=BTC-USD&product_ids=ETH-USD"), Some(TOKEN))
        .await
        .json();
    let books = books["pricebooks"].as_array().unwrap().clone();
    assert_eq!(books.len(), 2);
    for book in &books {
        let p: ProductId = book["product_id"].as_str().unwrap().parse().unwrap();
        let truth = direct.ticker(&p).await.unwrap();
        let level =
            |side: &str| book[side][0]["price"].as_str().map(|s| s.parse::<rust_decimal::Decimal>().unwrap());
        assert_eq!(level("bids"), truth.best_bid, "{p}: {book}");
        assert_eq!(level("asks"), truth.best_ask, "{p}: {book}");
        assert!(truth.best_bid.is_some() && truth.best_bid < truth.best_ask, "{truth:?}");
        // The ticker route: the last trade as price, and the same book.
        let t = get(&c, &format!("{api}/market/products/{p}/ticker?limit=1"), Some(TOKEN)).await.json();
        assert_eq!(t["trades"][0]["price"].as_str().unwrap().parse().ok(), Some(truth.price), "{t}");
        assert_eq!(t["best_bid"].as_str().unwrap().parse().ok(), truth.best_bid, "{t}");
        assert_eq!(t["best_ask"].as_str().unwrap().parse().ok(), truth.best_ask, "{t}");
    }
    proxy.shutdown().await;
}

/// A request for trades (`fetch_trades`, or any ticker with [`TickerAnswer::Trades`]) gets the
/// exchange's own answer, every field of every trade, from one fetch per product for every
/// client; a smaller `limit` is a prefix of the cached answer.
#[tokio::test(start_paused = true)]
async fn trades_are_the_exchanges_own_and_fetched_once_for_every_client() {
    let creds = Credentials::generate("organizations/t/apiKeys/proxy");
    let upstream = sim(&creds).await;
    let proxy = proxy_with(&creds, &upstream, |b| b.ticker_answer(TickerAnswer::Trades)).await;
    let (api, c) = (format!("{}/api/v3/brokerage", proxy.base_url()), http());
    let ticker = |limit: u32| format!("{api}/market/products/ETH-USD/ticker?limit={limit}");
    // The exchange's answer at this instant (the paused clock stands still meanwhile).
    let truth = get(&c, &format!("{}/market/products/ETH-USD/ticker?limit=20", upstream.api_url()), None)
        .await
        .json();
    assert_eq!(truth["trades"].as_array().unwrap().len(), 20);
    let before = upstream.stats().total_calls;
    let url = ticker(20);
    let answers = futures_util::future::join_all((0..30).map(|_| get(&c, &url, Some(TOKEN)))).await;
    for a in &answers {
        assert_eq!(a.status, 200);
        assert_eq!(a.json(), truth, "the exchange's answer, field by field");
    }
    assert_eq!(upstream.stats().total_calls - before, 1, "thirty clients, one fetch");
    // Fewer trades: the first ones of the cached answer, no call.
    for limit in [1, 5] {
        let got = get(&c, &ticker(limit), Some(TOKEN)).await.json();
        let trades = got["trades"].as_array().unwrap();
        assert_eq!(trades.as_slice(), &truth["trades"].as_array().unwrap()[..limit as usize]);
        assert!(
            !trades[0]["trade_id"].as_str().unwrap().is_empty()
                && !trades[0]["size"].as_str().unwrap().is_empty()
        );
        assert_eq!(got["best_bid"], truth["best_bid"]);
    }
    assert_eq!(upstream.stats().total_calls - before, 1);
    assert_eq!(proxy.stats().trades_upstream, 1);
    // Unknown products are remembered; bad limits are refused here.
    let nope = format!("{api}/market/products/NOPE-USD/ticker?limit=3");
    assert_eq!(get(&c, &nope, Some(TOKEN)).await.status, 404);
    assert_eq!(get(&c, &nope, Some(TOKEN)).await.status, 404);
    assert_eq!(upstream.stats().total_calls - before, 2);
    assert_eq!(get(&c, &ticker(0), Some(TOKEN)).await.status, 400);
    // After the ticker TTL, one refresh for everyone, at the largest limit asked recently.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let one = get(&c, &ticker(1), Some(TOKEN)).await.json();
    assert_eq!(upstream.stats().total_calls - before, 3);
    let twenty = get(&c, &ticker(20), Some(TOKEN)).await.json();
    assert_eq!(upstream.stats().total_calls - before, 3, "the refresh fetched twenty");
    assert_eq!(twenty["trades"][0], one["trades"][0]);
    assert_ne!(twenty["trades"][0], truth["trades"][0], "a new last trade after 6 s");
    proxy.shutdown().await;
}

/// With the default [`TickerAnswer::Batched`], a one-trade ticker joins the batch and a longer
/// history goes to the trades cache: neither is passed through.
#[tokio::test(start_paused = true)]
async fn a_trade_history_is_cached_beside_the_batched_ticker() {
    let (_, upstream, proxy) = started().await;
    let (api, c) = (format!("{}/api/v3/brokerage", proxy.base_url()), http());
    let one = get(&c, &format!("{api}/market/products/BTC-USD/ticker?limit=1"), Some(TOKEN)).await.json();
    assert_eq!(one["trades"][0]["trade_id"], "", "the batch carries no trade id");
    let zero = format!("{api}/market/products/BTC-USD/ticker?limit=0");
    assert_eq!(get(&c, &zero, Some(TOKEN)).await.status, 400, "as under TickerAnswer::Trades");
    // `limit` is required and an integer, as upstream; a malformed product id is named first.
    for (query, status) in [("BTC-USD/ticker", 400), ("BTC-USD/ticker?limit=x", 400), ("btc_usd/ticker", 404)]
    {
        let r = get(&c, &format!("{api}/market/products/{query}"), Some(TOKEN)).await;
        assert_eq!(r.status, status, "{query}: {}", String::from_utf8_lossy(&r.body));
    }
    for _ in 0..3 {
        let t = get(&c, &format!("{api}/market/products/BTC-USD/ticker?limit=50"), Some(TOKEN)).await.json();
        assert_eq!(t["trades"].as_array().unwrap().len(), 50);
    }
    let s = proxy.stats();
    assert_eq!((s.trades_upstream, s.requests_by_route["passthrough"]), (1, 0));
    assert_eq!(calls(&upstream).get("ticker"), Some(&1), "{:?}", calls(&upstream));
    proxy.shutdown().await;
}

/// #18: the proxy's clients read Coinbase's wire format, which cannot carry
/// `Fresh::provisional`, so a read just after a close waits for the series' refresh (already
/// under way in the background) instead of serving the just-closed candle as last known.
#[tokio::test(start_paused = true)]
async fn the_proxy_never_serves_a_just_closed_candle_as_final() {
    let creds = Credentials::generate("organizations/t/apiKeys/proxy");
    let upstream = SimExchange::builder()
        .products(PRODUCTS)
        .clock(fixed_clock())
        .jwt_public_key_pem(&creds.public_key_pem())
        .latency(Duration::from_secs(2))
        .start()
        .await
        .unwrap();
    let proxy = proxy(&creds, &upstream).await;
    let client = bot(&proxy.base_url(), &creds, &upstream);
    let p: ProductId = "BTC-USD".parse().unwrap();
    let g = Granularity::OneMinute;
    let read = |now: time::OffsetDateTime| {
        let client = client.clone();
        let p = p.clone();
        async move { client.candles(&p, g, CandleRange::lookback(g, 10, now).unwrap()).await.unwrap() }
    };
    read(upstream.clock().now_utc()).await; // cached, the 09:56 or 09:57 minute in progress
    let now = upstream.clock().now_utc();
    let close = g.next_close(now);
    // 1.2 s after the close: the background refresh started within the grace and jitter
    // (at most 1 s) and is still in flight (2 s latency).
    tokio::time::sleep_until(upstream.clock().instant_at(close) + Duration::from_millis(1_200)).await;
    let t0 = tokio::time::Instant::now();
    let candles = read(upstream.clock().now_utc()).await;
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "the read waited for the refresh: {:?}",
        t0.elapsed()
    );
    let just_closed = close - g.duration();
    let c = candles.iter().find(|c| c.start == just_closed).expect("the just-closed minute");
    assert_eq!(Some(*c), upstream.candle_at(&p, g, just_closed), "the exchange's final candle");
}

/// Issue 17 (the `proxy` scale scenario): 250 bots ticking on the same second open their
/// connections at once. The proxy listened with std's backlog of 128, so the kernel dropped the
/// SYNs beyond it and those clients waited for a retransmission (a second of real time, which
/// a paused clock turns into a connect timeout).
#[tokio::test(start_paused = true)]
async fn three_hundred_clients_connecting_at_once_are_all_accepted() {
    let (_, _upstream, proxy) = started().await;
    let addr = proxy.addr();
    // All connects leave in one poll, before the accept loop runs again.
    let connects =
        (0..300).map(|_| tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)));
    let streams = futures_util::future::join_all(connects).await;
    let connected = streams.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
    assert_eq!(connected, 300);
    // And the proxy answers on each of them.
    let mut answered = 0;
    for s in streams.into_iter().flatten().flatten() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = s;
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: proxy\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        answered += usize::from(buf.starts_with(b"HTTP/1.1 200"));
    }
    assert_eq!(answered, 300);
    assert_eq!(proxy.stats().connections, 300);
}

/// Shutting down closes idle keep-alive connections at once (each hears of the stop), rather
/// than waiting out the 5 s drain; on the paused clock a missed signal shows as 5 s passed.
#[tokio::test(start_paused = true)]
async fn shutdown_closes_open_connections_without_waiting_out_the_drain() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_, _upstream, proxy) = started().await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
        let req = format!(
            "GET /api/v3/brokerage/market/products/BTC-USD/ticker?limit=1 HTTP/1.1\r\nHost: x\r\nX-Tickshare-Token: {TOKEN}\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
        open.push(s);
    }
    let before = tokio::time::Instant::now();
    proxy.shutdown().await;
    assert!(before.elapsed() < Duration::from_secs(1), "took {:?}", before.elapsed());
    for mut s in open {
        let mut rest = Vec::new();
        assert_eq!(s.read_to_end(&mut rest).await.unwrap(), 0, "the proxy closed the connection");
    }
}

/// `product_book` (ccxt's `fetch_order_book`): one upstream fetch serves every client and
/// every smaller `limit`, each answer the exchange's book cut as the exchange would cut it.
#[tokio::test(start_paused = true)]
async fn order_books_are_fetched_once_for_every_client_and_cut_to_each_limit() {
    let (creds, upstream, proxy) = started().await;
    let (api, c) = (format!("{}/api/v3/brokerage", proxy.base_url()), http());
    // What the exchange itself answers at this instant (the clock is paused).
    let direct =
        upstream.client_builder().credentials(creds.clone()).clock(upstream.clock()).build().unwrap();
    let btc: ProductId = "BTC-USD".parse().unwrap();
    let want = tickshare::coinbase::wire::ProductBook::from(&direct.order_book(&btc, None).await.unwrap());
    let want = serde_json::to_value(want).unwrap();
    let before = calls(&upstream).get("product_book").copied().unwrap_or(0);

    let first = get(&c, &format!("{api}/market/product_book?product_id=BTC-USD"), Some(TOKEN)).await;
    assert_eq!(first.status, 200, "{}", String::from_utf8_lossy(&first.body));
    assert_eq!(first.json(), want, "the whole book, as the exchange answered it");
    // 24 more clients at once, public and private paths, several limits (0 is no limit).
    let limits = [1usize, 5, 10, 50, 0, 3];
    let asks = (0..24).map(|i| {
        let (c, l) = (c.clone(), limits[i % limits.len()]);
        let path = if i % 2 == 0 { "market/product_book" } else { "product_book" };
        let url = format!("{api}/{path}?product_id=BTC-USD&limit={l}");
        async move { (l, get(&c, &url, Some(TOKEN)).await) }
    });
    for (l, got) in futures_util::future::join_all(asks).await {
        assert_eq!(got.status, 200);
        let body = got.json();
        let cut = |side: &str| {
            let all = want["pricebook"][side].as_array().unwrap();
            serde_json::Value::from(all[..if l == 0 { all.len() } else { l }].to_vec())
        };
        assert_eq!(
            (body["pricebook"]["bids"].clone(), body["pricebook"]["asks"].clone()),
            (cut("bids"), cut("asks"))
        );
        assert_eq!(body["pricebook"]["time"], want["pricebook"]["time"]);
        assert_eq!(body["spread_bps"], want["spread_bps"]);
    }
    let s = proxy.stats();
    assert_eq!((s.books_upstream, s.requests_by_route["product_book"]), (1, 25));
    let upstream_books = calls(&upstream).get("product_book").copied().unwrap_or(0)
        + calls(&upstream).get("market/product_book").copied().unwrap_or(0);
    assert_eq!(upstream_books - before, 1, "{:?}", calls(&upstream));

    // Refused as upstream would, without a call: no product_id, a malformed one, a bad limit.
    for (query, status) in
        [("", 400), ("?product_id=", 400), ("?product_id=btc_usd", 404), ("?product_id=BTC-USD&limit=x", 400)]
    {
        let r = get(&c, &format!("{api}/product_book{query}"), Some(TOKEN)).await;
        assert_eq!(r.status, status, "{query}: {}", String::from_utf8_lossy(&r.body));
    }
    // An unknown product: the exchange's 404, asked once and remembered.
    for _ in 0..3 {
        let r = get(&c, &format!("{api}/product_book?product_id=NOPE-USD&limit=5"), Some(TOKEN)).await;
        assert_eq!(r.status, 404);
    }
    assert_eq!(proxy.stats().books_upstream, 2);
    // A book grouped by price increment is another question: passed through.
    let grouped =
        format!("{api}/market/product_book?product_id=BTC-USD&limit=3&aggregation_price_increment=10");
    let g = get(&c, &grouped, Some(TOKEN)).await;
    assert_eq!(g.status, 200);
    let bids = g.json()["pricebook"]["bids"].as_array().unwrap().clone();
    assert_eq!(bids.len(), 3);
    for b in &bids {
        let price: tickshare::Decimal = b["price"].as_str().unwrap().parse().unwrap();
        assert_eq!(price % tickshare::Decimal::from(10), tickshare::Decimal::ZERO, "{b}");
    }
    let s = proxy.stats();
    assert_eq!((s.requests_by_route["passthrough"], s.books_upstream), (1, 2));
    assert_eq!(upstream.stats().rate_limited_429, 0);
    proxy.shutdown().await;
}

/// The official SDK sends `{}` with every GET over one keep-alive connection: every request
/// on it is answered (before the fix, the proxy left the body unread, hyper closed the
/// connection after the first answer, and the SDK's second call failed).
#[tokio::test(start_paused = true)]
async fn sdk_style_gets_with_a_body_keep_the_connection() {
    let (creds, upstream, proxy) = started().await;
    let host = proxy.addr().to_string();
    let paths = [
        "/api/v3/brokerage/products/BTC-USD?get_tradability_status=False",
        "/api/v3/brokerage/best_bid_ask?product_ids=BTC-USD&product_ids=ETH-USD",
        "/api/v3/brokerage/accounts",
        "/stats",
        // A GET the proxy passes through (its `{}` was read and dropped; none goes upstream).
        "/api/v3/brokerage/orders/historical/batch",
    ];
    let requests: Vec<String> = paths
        .iter()
        .map(|p| sdk_style_get(&host, p, &creds.rest_jwt("GET", &host, p.split('?').next().unwrap())))
        .collect();
    let statuses = on_one_connection(proxy.addr(), &requests).await;
    assert_eq!(statuses, vec![Some(200); paths.len()]);
    assert_eq!(proxy.stats().connections, 1);
    assert_eq!(upstream.stats().calls_by_endpoint["orders/historical/batch"], 1);
}

/// 25 bots read balances all the time while, one round after another, one of them places an
/// order through the proxy: whatever the others' reads have in flight, the bot that ordered
/// reads the balance after its own order, and so does everyone after it.
#[tokio::test(start_paused = true)]
async fn under_concurrent_reads_every_order_is_seen_by_the_next_balance_read() {
    let (creds, upstream, proxy) = started().await;
    let host = proxy.addr().to_string();
    let bots: Vec<CoinbaseClient> = (0..BOTS).map(|_| bot(&proxy.base_url(), &creds, &upstream)).collect();
    let direct = upstream.client_builder().credentials(creds.clone()).build().unwrap();
    let usd = |a: &[tickshare::Account]| a.iter().find(|a| a.currency == "USD").map(|a| a.available);
    let path = "/api/v3/brokerage/orders";
    for round in 0..6 {
        let order = serde_json::json!({"client_order_id": format!("r{round}"), "product_id": "BTC-USD",
            "side": "BUY", "order_configuration": {"market_market_ioc": {"quote_size": "25"}}});
        let place = async {
            // Let the others' reads get in flight first.
            tokio::time::sleep(Duration::from_millis(1)).await;
            let r = http()
                .post(format!("{}{path}", proxy.base_url()))
                .bearer_auth(creds.rest_jwt("POST", &host, path))
                .json(&order)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            // Right after the order's answer, through the proxy.
            usd(&bots[round].accounts().await.unwrap())
        };
        let reads =
            futures_util::future::join_all(bots.iter().map(|b| async { b.accounts().await.unwrap() }));
        let (mine, _) = tokio::join!(place, reads);
        let truth = usd(&direct.accounts().await.unwrap());
        assert_eq!(mine, truth, "round {round}: the bot that ordered read a balance from before its order");
        for b in &bots {
            assert_eq!(usd(&b.accounts().await.unwrap()), truth, "round {round}");
        }
    }
    let spent = usd(&direct.accounts().await.unwrap()).unwrap();
    assert!(spent < tickshare::Decimal::from(10_000 - 6 * 24), "six orders filled: {spent}");
    assert_eq!(upstream.stats().rate_limited_429, 0);
    assert_eq!(proxy.stats().accounts_invalidations, 6);
}
