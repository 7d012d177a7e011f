//! The simulated exchange over real HTTP (issue #3): shapes, rate limits, auth, faults,
//! counters, determinism.

// Helpers outside `#[test]` functions panic on purpose: a failed request fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use p256::{
    ecdsa::{Signature, SigningKey, signature::Signer},
    pkcs8::{EncodePublicKey, LineEnding},
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tickshare::{
    Decimal, Granularity, ProductId,
    coinbase::wire::{self, ErrorBody},
    sim::{CANDLE_RANGE_ERROR, Endpoint, EndpointClass, Fault, HTML_429_BODY, SimAccount, SimExchange},
};
use tokio::time::{Instant, advance};

use crate::support::{any_jwt, fixed_clock, get, http};

fn pid(s: &str) -> ProductId {
    s.parse().unwrap()
}

fn error_of(body: &[u8]) -> ErrorBody {
    serde_json::from_slice(body).unwrap()
}

#[tokio::test(start_paused = true)]
async fn every_endpoint_answers_its_documented_shape() {
    let sim = SimExchange::builder().products(5).clock(fixed_clock()).start().await.unwrap();
    let api = sim.api_url();
    assert_eq!(sim.base_url(), format!("http://{}", sim.addr()));
    assert!(sim.base_url().starts_with("http://127.0.0.1:"));
    let c = http();
    let jwt = any_jwt();
    let btc = pid("BTC-USD");
    let now = sim.clock().now_utc();

    // Tickers, public and private: last price now, mid == last.
    for (path, auth) in [("/market/products", None), ("/products", Some(jwt.as_str()))] {
        let r = get(&c, &format!("{api}{path}/BTC-USD/ticker?limit=2"), auth).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        let t = wire::decode_ticker(&btc, &r.body).unwrap();
        assert_eq!(t.price, sim.price(&btc).unwrap());
        // The last trade inside the book, 1 to 4 increments from each side (rarely the mid).
        let (bid, ask) = (t.best_bid.unwrap(), t.best_ask.unwrap());
        assert!(bid < t.price && t.price < ask);
        assert!(ask - bid <= Decimal::new(8, 2));
        assert_eq!(t.time, now);
        let raw = r.json();
        assert_eq!(raw["trades"].as_array().unwrap().len(), 2);
        assert_eq!(raw["trades"][0]["bid"], "");
        assert_eq!(raw["trades"][0]["product_id"], "BTC-USD");
    }

    // Candles, public and private: inclusive window, newest first, in-progress close = price.
    let start = now.unix_timestamp() - now.unix_timestamp() % 3600 - 5 * 3600;
    for (path, auth) in [("/market/products", None), ("/products", Some(jwt.as_str()))] {
        let url = format!(
            "{api}{path}/BTC-USD/candles?start={start}&end={}&granularity=ONE_HOUR",
            start + 5 * 3600
        );
        let r = get(&c, &url, auth).await;
        assert_eq!(r.status, 200, "{path}");
        let raw = r.json();
        let starts: Vec<&str> =
            raw["candles"].as_array().unwrap().iter().map(|c| c["start"].as_str().unwrap()).collect();
        let expected: Vec<String> = (0..6).rev().map(|k| (start + k * 3600).to_string()).collect();
        assert_eq!(starts, expected, "six candles, newest first");
        let candles = wire::decode_candles(&r.body).unwrap();
        let last = candles.last().unwrap();
        assert_eq!(last.close, sim.price(&btc).unwrap());
        assert_eq!(Some(*last), sim.candle_at(&btc, Granularity::OneHour, now));
    }

    // best_bid_ask: repeated keys, unknown ids omitted, none = all.
    let r = get(
        &c,
        &format!("{api}/best_bid_ask?product_ids=ETH-USD&product_ids=NOPE-USD&product_ids=BTC-USD"),
        Some(&jwt),
    )
    .await;
    assert_eq!(r.status, 200);
    let books = wire::decode_best_bid_ask(&r.body).unwrap();
    let ids: Vec<&str> = books.iter().map(|t| t.product.as_str()).collect();
    assert_eq!(ids, ["ETH-USD", "BTC-USD"]);
    let last = sim.price(&btc).unwrap();
    assert!(
        books[1].best_bid.unwrap() < last && last < books[1].best_ask.unwrap(),
        "the last trade inside the book"
    );
    assert!(r.json()["pricebooks"][0]["time"].is_string());
    let all = get(&c, &format!("{api}/best_bid_ask"), Some(&jwt)).await;
    assert_eq!(wire::decode_best_bid_ask(&all.body).unwrap().len(), 5);

    // Product lists and single products.
    for (path, auth, private) in [("/market/products", None, false), ("/products", Some(jwt.as_str()), true)]
    {
        let r = get(&c, &format!("{api}{path}?product_ids=ETH-USD&product_ids=SOL-USD"), auth).await;
        assert_eq!(r.status, 200);
        let products = wire::decode_products(&r.body).unwrap();
        assert_eq!(products.len(), 2);
        let raw = r.json();
        assert_eq!(raw["num_products"], json!(2), "a number, not a string");
        assert_eq!(raw.get("pagination").is_some(), private);
        let r = get(&c, &format!("{api}{path}/ETH-USD"), auth).await;
        let p = wire::decode_product(&r.body).unwrap();
        assert_eq!(p.product_id, "ETH-USD");
        assert_eq!(p.price, sim.price(&pid("ETH-USD")).unwrap().to_string());
        let raw = r.json();
        for field in [
            "price_percentage_change_24h",
            "volume_24h",
            "volume_percentage_change_24h",
            "base_increment",
            "quote_increment",
            "quote_min_size",
            "quote_max_size",
            "base_min_size",
            "base_max_size",
            "base_name",
            "quote_name",
            "watched",
            "is_disabled",
            "new",
            "status",
            "cancel_only",
            "limit_only",
            "post_only",
            "trading_disabled",
            "auction_mode",
            "product_type",
            "quote_currency_id",
            "base_currency_id",
            "fcm_trading_session_details",
            "mid_market_price",
            "alias",
            "alias_to",
            "base_display_symbol",
            "quote_display_symbol",
            "view_only",
            "price_increment",
            "display_name",
            "product_venue",
            "approximate_quote_24h_volume",
            "new_at",
        ] {
            assert!(raw.get(field).is_some(), "{path}: missing {field}");
        }
        assert_eq!(raw["status"], "online");
        assert_eq!(raw["trading_disabled"], false);
        assert_eq!(raw["product_type"], "SPOT");
    }

    // Accounts (§2.6 shape) and server time.
    let r = get(&c, &format!("{api}/accounts"), Some(&jwt)).await;
    assert_eq!(r.status, 200);
    let (accounts, next) = wire::decode_accounts(&r.body).unwrap();
    assert_eq!(accounts.len(), SimAccount::defaults().len());
    assert_eq!(next, None);
    let raw = r.json();
    assert_eq!(raw["cursor"], "");
    assert_eq!(raw["has_next"], false);
    assert_eq!(raw["accounts"][0]["type"], "ACCOUNT_TYPE_FIAT");
    assert_eq!(raw["accounts"][1]["type"], "ACCOUNT_TYPE_CRYPTO");
    assert_eq!(raw["accounts"][0]["available_balance"]["value"], "10000.0000000000000000");
    assert!(raw["accounts"][0]["deleted_at"].is_null());
    let r = get(&c, &format!("{api}/time"), None).await;
    assert_eq!(wire::decode_server_time(&r.body).unwrap(), now);
    assert_eq!(r.json()["iso"], "2024-04-24T09:56:38Z");

    // Order books (§2.4 shape), public and private.
    for path in ["market/product_book", "product_book"] {
        let r = get(&c, &format!("{api}/{path}?product_id=BTC-USD&limit=2"), Some(&jwt)).await;
        assert_eq!(r.status, 200, "{path}");
        let book = wire::decode_order_book(&"BTC-USD".parse().unwrap(), Some(2), &r.body).unwrap();
        assert_eq!((book.bids.len(), book.asks.len()), (2, 2), "{path}");
        assert_eq!(r.json()["pricebook"]["product_id"], "BTC-USD");
    }

    // Orders (tests/it/orders.rs has the semantics): create, get, list, fills, cancel.
    let order = serde_json::json!({"client_order_id": "c1", "product_id": "BTC-USD", "side": "BUY",
        "order_configuration": {"market_market_ioc": {"quote_size": "10"}}});
    let r = c.post(format!("{api}/orders")).bearer_auth(&jwt).json(&order).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let created: serde_json::Value = r.json().await.unwrap();
    let id = created["success_response"]["order_id"].as_str().unwrap().to_string();
    let r = get(&c, &format!("{api}/orders/historical/{id}"), Some(&jwt)).await;
    assert_eq!(r.json()["order"]["status"], "FILLED");
    let r = get(&c, &format!("{api}/orders/historical/batch"), Some(&jwt)).await;
    assert_eq!(r.json()["orders"][0]["order_id"], id.as_str());
    let r = get(&c, &format!("{api}/orders/historical/fills"), Some(&jwt)).await;
    assert_eq!(r.json()["fills"][0]["order_id"], id.as_str());
    let r = c.post(format!("{api}/orders/preview")).bearer_auth(&jwt).json(&order).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let edit = serde_json::json!({"order_id": id, "size": "1"});
    let r = c.post(format!("{api}/orders/edit")).bearer_auth(&jwt).json(&edit).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let cancel = serde_json::json!({"order_ids": [id]});
    let r =
        c.post(format!("{api}/orders/batch_cancel")).bearer_auth(&jwt).json(&cancel).send().await.unwrap();
    assert_eq!(r.status(), 200);

    let stats = sim.stats();
    for e in Endpoint::ALL {
        let expected = if e == Endpoint::BestBidAsk { 2 } else { 1 };
        assert_eq!(stats.calls(e), expected, "{e}");
    }
    assert_eq!(stats.total_calls, 21);
    assert_eq!(stats.responses(200), 21);
    assert_eq!((stats.rate_limited_429, stats.auth_failures), (0, 0));
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn errors_have_the_coinbase_shape_and_nothing_panics() {
    let sim = SimExchange::builder().products(3).start().await.unwrap();
    let api = sim.api_url();
    let c = http();
    let jwt = any_jwt();
    let not_found = json!({
        "error": "NOT_FOUND",
        "error_details": "ProductID is invalid",
        "message": "ProductID is invalid"
    });
    for path in [
        "/market/products/NOPE-USD/ticker?limit=1",
        "/market/products/btc-usd/ticker?limit=1",
        "/market/products/%FF%00/candles?start=1&end=2&granularity=ONE_MINUTE",
        "/market/products/NOPE-USD",
        "/market/products/",
    ] {
        let r = get(&c, &format!("{api}{path}"), None).await;
        assert_eq!((r.status, r.json()), (StatusCode::NOT_FOUND, not_found.clone()), "{path}");
    }
    for path in [
        "/market/products/BTC-USD/ticker",
        "/market/products/BTC-USD/ticker?limit=x",
        "/market/products/BTC-USD/candles?start=1&end=2",
        "/market/products/BTC-USD/candles?start=1&end=2&granularity=UNKNOWN_GRANULARITY",
        "/market/products/BTC-USD/candles?start=a&end=2&granularity=ONE_MINUTE",
        "/market/products?get_all_products=maybe",
        "/market/products?limit=-3",
    ] {
        let r = get(&c, &format!("{api}{path}"), None).await;
        assert_eq!(r.status, 400, "{path}");
        assert_eq!(error_of(&r.body).error, "INVALID_ARGUMENT", "{path}");
        advance(Duration::from_secs(1)).await; // stay under the public limit
    }
    let r = get(&c, &format!("{api}/accounts?cursor=zzz"), Some(&jwt)).await;
    assert_eq!(r.status, 400);
    // Booleans are case-insensitive.
    let r = get(&c, &format!("{api}/market/products?get_all_products=False"), None).await;
    assert_eq!(r.status, 200);
    // Unknown paths and methods: 404, counted as "unknown", never rate limited.
    for _ in 0..15 {
        let r = get(&c, &format!("{api}/nope"), None).await;
        assert_eq!(r.status, 404);
    }
    let r = c.post(format!("{api}/accounts")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let stats = sim.stats();
    assert_eq!(stats.calls_by_endpoint["unknown"], 16);
    assert_eq!(stats.rate_limited_429, 0);
}

#[tokio::test(start_paused = true)]
async fn public_burst_of_50_gets_exactly_10_ok_and_40_429() {
    let sim = SimExchange::builder().clock(fixed_clock()).start().await.unwrap();
    let c = http();
    let url = format!("{}/market/products/BTC-USD/ticker?limit=1", sim.api_url());
    let burst = |n: usize| {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            let (c, url) = (c.clone(), url.clone());
            tasks.spawn(async move { get(&c, &url, None).await });
        }
        tasks
    };
    let t0 = Instant::now();
    let responses = burst(50).join_all().await;
    assert_eq!(Instant::now(), t0, "the burst took no simulated time");
    let ok = responses.iter().filter(|r| r.status == 200).count();
    let limited: Vec<_> = responses.iter().filter(|r| r.status == 429).collect();
    assert_eq!((ok, limited.len()), (10, 40));
    let r = limited[0];
    assert_eq!(
        r.json(),
        json!({"error":"RATE_LIMIT_EXCEEDED","error_details":"Too many requests","message":"Too many requests"})
    );
    assert_eq!(r.header("x-ratelimit-limit"), Some("10"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    let reset = (sim.clock().now_utc() + Duration::from_secs(1)).unix_timestamp();
    assert_eq!(r.header("x-ratelimit-reset"), Some(reset.to_string().as_str()));
    assert_eq!(r.header("retry-after"), None, "off by default");

    let stats = sim.stats();
    assert_eq!(stats.rate_limited_429, 40);
    assert_eq!(stats.calls(Endpoint::MarketTicker), 50);
    assert_eq!(stats.max_requests_in_any_1s.public, 50);
    assert_eq!(stats.max_requests_in_any_1s.private, 0);

    // Just before the window slides nothing passes; one second later ten pass again.
    advance(Duration::from_millis(999)).await;
    assert_eq!(get(&c, &url, None).await.status, 429);
    advance(Duration::from_millis(1)).await;
    let again = burst(12).join_all().await;
    assert_eq!(again.iter().filter(|r| r.status == 200).count(), 10);
    let ok = again.iter().find(|r| r.status == 200).unwrap();
    assert!(ok.header("x-ratelimit-remaining").is_some());
    let stats = sim.stats();
    assert_eq!(stats.rate_limited_429, 43);
    // (t0 - 1 s, t0 + 999 ms] held the burst and the lone request after it; later windows less.
    assert_eq!(stats.max_requests_in_any_1s.public, 51);
    assert_eq!(serde_json::to_value(&stats).unwrap()["total_calls"], 63);

    // The control paths are neither counted nor limited.
    for _ in 0..20 {
        let r = get(&c, &format!("{}/__sim/stats", sim.base_url()), None).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["total_calls"], 63);
        assert_eq!(r.json()["max_requests_in_any_1s"], json!({"public": 51, "private": 0}));
    }
    assert_eq!(sim.stats().total_calls, 63);
}

#[tokio::test(start_paused = true)]
async fn max_requests_in_any_second_is_exact_over_a_sliding_window() {
    let sim = SimExchange::builder().private_limit(5).start().await.unwrap();
    let c = http();
    let jwt = any_jwt();
    let url = format!("{}/accounts", sim.api_url());
    let mut statuses = Vec::new();
    // t=0: 4, t=0.6: 4 (window 8 received, 5 accepted), t=1.2: 3 (t=0 out: 7 received).
    for (wait, n) in [(0, 4), (600, 4), (600, 3)] {
        advance(Duration::from_millis(wait)).await;
        for _ in 0..n {
            statuses.push(get(&c, &url, Some(&jwt)).await.status.as_u16());
        }
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429, 200, 200, 200]);
    let stats = sim.stats();
    assert_eq!(stats.max_requests_in_any_1s.private, 8);
    assert_eq!(stats.rate_limited_429, 3);
    sim.reset_stats();
    let stats = sim.stats();
    assert_eq!((stats.total_calls, stats.max_requests_in_any_1s.private), (0, 0));
    assert_eq!(stats.calls_by_endpoint["accounts"], 0);
    // The admission window survives the reset: 4 of 5 slots are taken at t=1.2.
    assert_eq!(get(&c, &url, Some(&jwt)).await.status, 200);
    assert_eq!(get(&c, &url, Some(&jwt)).await.status, 429);
    assert_eq!(sim.stats().max_requests_in_any_1s.private, 2);
}

#[tokio::test(start_paused = true)]
async fn html_429_and_retry_after_modes() {
    let sim = SimExchange::builder().public_limit(1).html_429(true).retry_after(true).start().await.unwrap();
    let c = http();
    let url = format!("{}/time", sim.api_url());
    assert_eq!(get(&c, &url, None).await.status, 200);
    advance(Duration::from_millis(300)).await;
    let r = get(&c, &url, None).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("content-type"), Some("text/html"));
    assert_eq!(r.body, HTML_429_BODY.as_bytes());
    assert!(HTML_429_BODY.starts_with("<html> <head> <title>Coinbase</title>"));
    assert_eq!(r.header("retry-after"), Some("1"), "0.7 s rounds up");
    sim.set_html_429(false);
    sim.set_retry_after(false);
    let r = get(&c, &url, None).await;
    assert_eq!(error_of(&r.body).error, "RATE_LIMIT_EXCEEDED");
    assert_eq!(r.header("retry-after"), None);
}

fn sign(key: &SigningKey, claims: &Value) -> String {
    let header = json!({"alg":"ES256","kid":"organizations/o/apiKeys/k","nonce":"00ff","typ":"JWT"});
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig: Signature = key.sign(input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
}

#[tokio::test(start_paused = true)]
async fn jwt_is_verified_with_a_configured_key() {
    let key = SigningKey::random(&mut rand_core::OsRng);
    let pem = key.verifying_key().to_public_key_pem(LineEnding::LF).unwrap();
    let sim = SimExchange::builder().jwt_public_key_pem(&pem).start().await.unwrap();
    let c = http();
    let api = sim.api_url();
    let host = sim.addr().to_string();
    let path = "/api/v3/brokerage/accounts";
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = |uri: String, nbf: u64, exp: u64| json!({"sub":"organizations/o/apiKeys/k","iss":"cdp","nbf":nbf,"exp":exp,"uri":uri});
    let valid = sign(&key, &claims(format!("GET {host}{path}"), now, now + 120));
    let ccxt_style = sign(&key, &claims(format!("GET http://{host}{path}"), now, now + 120));
    let other_host = sign(&key, &claims(format!("GET api.coinbase.com{path}"), now, now + 120));
    let url = format!("{api}/accounts?limit=2");
    for ok in [&valid, &ccxt_style, &other_host] {
        let r = get(&c, &url, Some(ok)).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }

    let stranger = SigningKey::random(&mut rand_core::OsRng);
    let bad = [
        sign(&key, &claims(format!("GET {host}/api/v3/brokerage/products"), now, now + 120)),
        sign(&key, &claims(format!("POST {host}{path}"), now, now + 120)),
        sign(&key, &claims(format!("GET {host}{path}?limit=2"), now, now + 120)),
        sign(&key, &claims(format!("GET {host}{path}"), now - 300, now - 180)),
        sign(&key, &claims(format!("GET {host}{path}"), now + 60, now + 180)),
        sign(&stranger, &claims(format!("GET {host}{path}"), now, now + 120)),
        any_jwt(),
        "garbage".to_string(),
        format!("{valid}x"),
    ];
    for (i, token) in bad.iter().enumerate() {
        let r = get(&c, &url, Some(token)).await;
        assert_eq!(r.status, 401, "token {i}");
        assert_eq!(error_of(&r.body).error, "UNAUTHENTICATED", "token {i}");
    }
    let r = get(&c, &url, None).await;
    assert_eq!(r.status, 401, "missing header");
    // Public endpoints ignore the header entirely.
    assert_eq!(get(&c, &format!("{api}/time"), Some("garbage")).await.status, 200);
    let stats = sim.stats();
    assert_eq!(stats.auth_failures, bad.len() as u64 + 1);
    assert_eq!(stats.responses(401), bad.len() as u64 + 1);
}

#[tokio::test(start_paused = true)]
async fn without_a_key_any_well_formed_jwt_passes_but_none_does_not() {
    let sim = SimExchange::builder().start().await.unwrap();
    let c = http();
    let url = format!("{}/best_bid_ask?product_ids=BTC-USD", sim.api_url());
    assert_eq!(get(&c, &url, Some(&any_jwt())).await.status, 200);
    assert_eq!(get(&c, &url, None).await.status, 401);
    assert_eq!(get(&c, &url, Some("a.b")).await.status, 401);
    assert_eq!(sim.stats().auth_failures, 2);
}

#[tokio::test(start_paused = true)]
async fn accounts_paginate_across_three_pages() {
    let currencies = ["USD", "USDC", "BTC", "ETH", "SOL", "ADA", "DOGE"];
    let sim = SimExchange::builder()
        .accounts(
            currencies
                .iter()
                .enumerate()
                .map(|(i, c)| SimAccount::new(c, Decimal::new(i as i64 + 1, 0)).hold(Decimal::ONE)),
        )
        .start()
        .await
        .unwrap();
    let c = http();
    let jwt = any_jwt();
    let mut cursor = String::new();
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let r = get(&c, &format!("{}/accounts?limit=3&cursor={cursor}", sim.api_url()), Some(&jwt)).await;
        assert_eq!(r.status, 200);
        let raw = r.json();
        pages += 1;
        let (accounts, next) = wire::decode_accounts(&r.body).unwrap();
        assert_eq!(raw["size"], accounts.len());
        seen.extend(accounts);
        match next {
            Some(n) => {
                assert_eq!(raw["has_next"], true);
                cursor = n;
            }
            None => {
                assert_eq!((raw["has_next"].clone(), raw["cursor"].clone()), (json!(false), json!("")));
                break;
            }
        }
    }
    assert_eq!(pages, 3);
    let got: Vec<&str> = seen.iter().map(|a| a.currency.as_str()).collect();
    assert_eq!(got, currencies);
    assert_eq!(seen[2].available, Decimal::new(3, 0));
    assert_eq!(seen[2].hold, Decimal::ONE);
    let uuids: std::collections::HashSet<_> = seen.iter().map(|a| &a.uuid).collect();
    assert_eq!(uuids.len(), 7);
    // Default page size 49, maximum 250.
    sim.set_accounts((0..300).map(|i| SimAccount::new(&format!("C{i}"), Decimal::ZERO)));
    let r = get(&c, &format!("{}/accounts", sim.api_url()), Some(&jwt)).await;
    assert_eq!(r.json()["size"], 49);
    let r = get(&c, &format!("{}/accounts?limit=1000", sim.api_url()), Some(&jwt)).await;
    assert_eq!(r.json()["size"], 250);
    assert_eq!(r.json()["cursor"], "250");
    assert_eq!(sim.stats().calls(Endpoint::Accounts), 5);
}

#[tokio::test(start_paused = true)]
async fn candle_windows_over_300_buckets_are_400_and_requests_are_logged() {
    let sim = SimExchange::builder().clock(fixed_clock()).start().await.unwrap();
    let c = http();
    let start = sim.clock().now_utc().unix_timestamp() - 3 * 86_400;
    let start = start - start % 60;
    let url = |end: i64, g: &str| {
        format!("{}/market/products/ETH-USD/candles?start={start}&end={end}&granularity={g}", sim.api_url())
    };
    let r = get(&c, &url(start + 299 * 60, "ONE_MINUTE"), None).await;
    assert_eq!(r.status, 200);
    assert_eq!(wire::decode_candles(&r.body).unwrap().len(), 300);
    let r = get(&c, &url(start + 300 * 60, "ONE_MINUTE"), None).await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json(),
        json!({"error":"INVALID_ARGUMENT","error_details":CANDLE_RANGE_ERROR,"message":CANDLE_RANGE_ERROR})
    );
    let r = get(&c, &url(start + 60, "TEN_MINUTE"), None).await;
    assert_eq!(r.status, 400);
    // A window reaching into the future returns only what has started.
    let r = get(&c, &url(start + 299 * 86_400, "ONE_DAY"), None).await;
    assert_eq!(r.status, 200);
    assert_eq!(wire::decode_candles(&r.body).unwrap().len(), 3, "days 22, 23 and 24");
    // `limit` keeps the newest.
    let r = get(&c, &format!("{}&limit=2", url(start + 10 * 60, "ONE_MINUTE")), None).await;
    let candles = wire::decode_candles(&r.body).unwrap();
    assert_eq!(candles.len(), 2);
    assert_eq!(candles[1].start.unix_timestamp(), start + 600);

    let log = sim.stats().recent_candle_requests;
    let logged: Vec<_> = log
        .iter()
        .map(|r| (r.endpoint, r.product.as_str(), r.granularity, r.start, r.end, r.limit))
        .collect();
    assert_eq!(
        logged,
        [
            ("market/candles", "ETH-USD", Granularity::OneMinute, start, start + 299 * 60, None),
            ("market/candles", "ETH-USD", Granularity::OneDay, start, start + 299 * 86_400, None),
            ("market/candles", "ETH-USD", Granularity::OneMinute, start, start + 600, Some(2)),
        ],
        "only requests that were served are logged"
    );
    let json = serde_json::to_value(sim.stats()).unwrap();
    assert_eq!(json["recent_candle_requests"][1]["granularity"], "ONE_DAY");
}

#[tokio::test(start_paused = true)]
async fn same_seed_same_time_same_bodies_and_closed_candles_never_change() {
    let start =
        |seed| SimExchange::builder().seed(seed).clock(fixed_clock()).enforce_rate_limits(false).start();
    let (a, b, other) = (start(1).await.unwrap(), start(1).await.unwrap(), start(2).await.unwrap());
    let c = http();
    let jwt = any_jwt();
    let now = a.clock().now_utc().unix_timestamp();
    let candles = format!("/products/SOL-USD/candles?start={}&end={now}&granularity=FIVE_MINUTE", now - 3600);
    let paths = [
        "/market/products/BTC-USD/ticker?limit=5".to_string(),
        candles.clone(),
        "/best_bid_ask".to_string(),
        "/products".to_string(),
        "/accounts".to_string(),
        "/time".to_string(),
    ];
    for path in &paths {
        let ra = get(&c, &format!("{}{path}", a.api_url()), Some(&jwt)).await;
        let rb = get(&c, &format!("{}{path}", b.api_url()), Some(&jwt)).await;
        assert_eq!(ra.status, 200, "{path}");
        assert_eq!(ra.body, rb.body, "{path}");
    }
    let ro = get(&c, &format!("{}{}", other.api_url(), paths[0]), None).await;
    let ra = get(&c, &format!("{}{}", a.api_url(), paths[0]), None).await;
    assert_ne!(ra.body, ro.body, "another seed, another market");

    let before =
        wire::decode_candles(&get(&c, &format!("{}{candles}", a.api_url()), Some(&jwt)).await.body).unwrap();
    advance(Duration::from_secs(2 * 3600)).await;
    let after =
        wire::decode_candles(&get(&c, &format!("{}{candles}", a.api_url()), Some(&jwt)).await.body).unwrap();
    // 09:00 .. 09:55; the last one was in progress at 09:56:38.
    assert_eq!(before.len(), 12);
    assert_eq!(after.len(), 12);
    assert_eq!(before[..11], after[..11], "closed candles are unchanged");
    assert_ne!(before[11], after[11], "the candle that was in progress has closed");
    assert_eq!(Some(after[11]), a.candle_at(&pid("SOL-USD"), Granularity::FiveMinute, after[11].start));
}

#[tokio::test(start_paused = true)]
async fn thousands_of_products() {
    let sim = SimExchange::builder().products(3000).enforce_rate_limits(false).start().await.unwrap();
    assert_eq!(sim.products().len(), 3000);
    assert_eq!(sim.products()[2999].as_str(), "X2970-USD");
    let c = http();
    let r = get(&c, &format!("{}/market/products?limit=10&offset=2990", sim.api_url()), None).await;
    assert_eq!(r.json()["num_products"], 3000);
    assert_eq!(wire::decode_products(&r.body).unwrap().len(), 10);
    let r = get(&c, &format!("{}/best_bid_ask", sim.api_url()), Some(&any_jwt())).await;
    assert_eq!(wire::decode_best_bid_ask(&r.body).unwrap().len(), 3000);
    let r = get(&c, &format!("{}/market/products/X1234-USD/ticker?limit=1", sim.api_url()), None).await;
    assert_eq!(r.status, 200);
}

#[tokio::test(start_paused = true)]
async fn explicit_product_lists_and_bad_configs() {
    let sim = SimExchange::builder().products(["FOO-USD", "ETH-BTC", "FOO-USD"]).start().await.unwrap();
    assert_eq!(sim.products(), [pid("FOO-USD"), pid("ETH-BTC")]);
    assert!(sim.price(&pid("BTC-USD")).is_none());
    let err = SimExchange::builder().products(["btc"]).start().await.unwrap_err();
    assert!(matches!(err, tickshare::Error::Config(_)), "{err}");
    let err = SimExchange::builder().public_limit(0).start().await.unwrap_err();
    assert!(matches!(err, tickshare::Error::Config(_)));
    let err = SimExchange::builder()
        .jwt_public_key_pem("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----")
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, tickshare::Error::Config(_)));
    let taken = sim.addr().port();
    let err = SimExchange::builder().port(taken).start().await.unwrap_err();
    assert!(err.to_string().contains("bind"), "{err}");
}

async fn statuses(c: &reqwest::Client, url: &str, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(c.get(url).send().await.unwrap().status().as_u16());
    }
    out
}

#[tokio::test(start_paused = true)]
async fn scripted_statuses_and_time_windows() {
    let sim = SimExchange::builder().enforce_rate_limits(false).start().await.unwrap();
    let c = http();
    let ticker = format!("{}/market/products/BTC-USD/ticker?limit=1", sim.api_url());
    let time = format!("{}/time", sim.api_url());

    // "429 twice then normal", on the public ticker only.
    sim.add_fault(Fault::status(429).on(Endpoint::MarketTicker).times(2));
    assert_eq!(statuses(&c, &time, 1).await, [200]);
    let r = get(&c, &ticker, None).await;
    assert_eq!(error_of(&r.body).error, "RATE_LIMIT_EXCEEDED");
    assert_eq!(statuses(&c, &ticker, 3).await, [429, 200, 200]);
    assert_eq!(sim.active_faults(), 0);

    // "500 for 3 s" on the public class.
    sim.add_fault(Fault::status(500).on(EndpointClass::Public).for_duration(Duration::from_secs(3)));
    let r = get(&c, &time, None).await;
    assert_eq!(r.status, 500);
    assert_eq!(error_of(&r.body).error, "INTERNAL");
    advance(Duration::from_millis(2999)).await;
    assert_eq!(statuses(&c, &ticker, 2).await, [500, 500]);
    advance(Duration::from_millis(1)).await;
    assert_eq!(statuses(&c, &ticker, 2).await, [200, 200]);

    // A fault that starts later, and removal.
    let id = sim.add_fault(Fault::status(503).after(Duration::from_secs(1)));
    assert_eq!(statuses(&c, &time, 1).await, [200]);
    advance(Duration::from_secs(1)).await;
    assert_eq!(statuses(&c, &time, 1).await, [503]);
    assert!(sim.remove_fault(id));
    assert_eq!(statuses(&c, &time, 1).await, [200]);

    let stats = sim.stats();
    assert_eq!(stats.faults_injected, 2 + 3 + 1);
    assert_eq!(stats.rate_limited_429, 2);
    assert_eq!(stats.responses(500), 3);
    assert_eq!(stats.total_calls, 1 + 1 + 3 + 1 + 2 + 2 + 3);
}

#[tokio::test(start_paused = true)]
async fn error_rate_is_seeded_and_reproducible() {
    let run = |seed| async move {
        let sim = SimExchange::builder().seed(seed).enforce_rate_limits(false).start().await.unwrap();
        sim.add_fault(Fault::error_rate(0.3, 503).on(Endpoint::Time));
        statuses(&http(), &format!("{}/time", sim.api_url()), 40).await
    };
    let first = run(9).await;
    assert_eq!(first, run(9).await);
    let failed = first.iter().filter(|s| **s == 503).count();
    assert!(failed > 0 && failed < 40, "{first:?}");
    assert!(first.iter().all(|s| *s == 200 || *s == 503));
}

#[tokio::test(start_paused = true)]
async fn latency_and_stalls_run_on_tokios_clock() {
    let sim = SimExchange::builder().latency(Duration::from_millis(40)).start().await.unwrap();
    let c = http();
    let url = format!("{}/time", sim.api_url());
    let t0 = Instant::now();
    assert_eq!(get(&c, &url, None).await.status, 200);
    assert_eq!(t0.elapsed(), Duration::from_millis(40));

    sim.add_fault(Fault::latency(Duration::from_millis(250)).on(Endpoint::Time).times(1));
    let t0 = Instant::now();
    let r = get(&c, &url, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(t0.elapsed(), Duration::from_millis(290));
    // The answer reflects the time after the latency.
    let served = wire::decode_server_time(&r.body).unwrap();
    let ms = |t: time::OffsetDateTime| t.unix_timestamp_nanos() / 1_000_000;
    assert_eq!(ms(served), ms(sim.clock().now_utc()));

    sim.add_fault(Fault::stall(Duration::from_secs(300)).times(1));
    let err = c.get(&url).timeout(Duration::from_secs(5)).send().await.unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert_eq!(sim.stats().faults_injected, 1);
}

#[tokio::test(start_paused = true)]
async fn broken_bodies_and_resets_are_visible_to_a_client() {
    let sim = SimExchange::builder().enforce_rate_limits(false).start().await.unwrap();
    let c = http();
    let btc = pid("BTC-USD");
    let url = format!("{}/market/products/BTC-USD/ticker?limit=1", sim.api_url());

    sim.add_fault(Fault::malformed_body().times(1));
    let r = get(&c, &url, None).await;
    assert_eq!(r.status, 200);
    let err = wire::decode_ticker(&btc, &r.body).unwrap_err();
    assert!(matches!(err, tickshare::Error::Decode(_)), "{err}");

    sim.add_fault(Fault::truncated_body().times(1));
    let resp = c.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let announced = resp.content_length().unwrap();
    assert!(announced > 0);
    assert!(resp.bytes().await.is_err(), "the body ends early");

    sim.add_fault(Fault::connection_reset().times(1));
    let err = c.get(&url).send().await.unwrap_err();
    assert!(!err.is_timeout() && !err.is_status(), "{err}");

    // And the exchange is fine afterwards.
    let r = get(&c, &url, None).await;
    wire::decode_ticker(&btc, &r.body).unwrap();
    let stats = sim.stats();
    assert_eq!(stats.faults_injected, 3);
    assert_eq!(stats.calls(Endpoint::MarketTicker), 4);
}

#[tokio::test(start_paused = true)]
async fn down_refuses_new_requests_fails_those_in_flight_and_comes_back() {
    let sim = SimExchange::builder().start().await.unwrap();
    let time = format!("{}/time", sim.api_url());
    let c = http();
    assert_eq!(get(&c, &time, None).await.status, 200);

    // A request in flight (stalled) fails when the exchange goes down.
    sim.add_fault(Fault::stall(Duration::from_secs(60)).times(1));
    let in_flight = tokio::spawn({
        let (c, time) = (c.clone(), time.clone());
        async move { c.get(&time).send().await }
    });
    while sim.stats().total_calls < 2 {
        tokio::task::yield_now().await;
    }
    sim.set_down(true);
    assert!(sim.is_down());
    let err = in_flight.await.unwrap().unwrap_err();
    assert!(!err.is_timeout(), "{err}");

    let fresh = http();
    assert!(fresh.get(&time).send().await.is_err());
    let stats = sim.stats();
    assert_eq!(stats.total_calls, 2, "refused requests are not counted");
    assert!(stats.connections_dropped_while_down >= 2, "{stats:?}");

    sim.set_down(false);
    assert_eq!(get(&fresh, &time, None).await.status, 200);
    assert_eq!(get(&c, &time, None).await.status, 200);
}

#[tokio::test(start_paused = true)]
async fn control_paths_and_shutdown() {
    let sim = SimExchange::builder().start().await.unwrap();
    let c = http();
    let base = sim.base_url().to_string();
    get(&c, &format!("{}/time", sim.api_url()), None).await;
    let stats = get(&c, &format!("{base}/__sim/stats"), None).await.json();
    assert_eq!(stats["calls_by_endpoint"]["time"], 1);
    assert_eq!(stats["total_calls"], 1);
    assert_eq!(stats["rate_limited_429"], 0);
    let reset = c.post(format!("{base}/__sim/reset")).send().await.unwrap();
    assert_eq!(reset.status(), 200);
    assert_eq!(sim.stats().total_calls, 0);
    assert_eq!(get(&c, &format!("{base}/__sim/nope"), None).await.status, 404);

    let handle = sim.handle();
    sim.shutdown().await;
    assert!(http().get(format!("{base}/__sim/stats")).send().await.is_err());
    assert_eq!(handle.stats().total_calls, 0, "the handle outlives the server");
}

#[tokio::test(start_paused = true)]
async fn dropping_the_exchange_stops_it() {
    let sim = SimExchange::builder().start().await.unwrap();
    let url = format!("{}/time", sim.api_url());
    assert_eq!(get(&http(), &url, None).await.status, 200);
    drop(sim);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(http().get(&url).send().await.is_err());
}

/// The official SDK sends `{}` with every GET over one keep-alive connection: the simulator,
/// like Coinbase, answers them all on it.
#[tokio::test(start_paused = true)]
async fn sdk_style_gets_with_a_body_keep_the_connection() {
    let sim = SimExchange::builder().products(3).clock(fixed_clock()).start().await.unwrap();
    let host = sim.addr().to_string();
    let jwt = any_jwt();
    let paths = [
        "/api/v3/brokerage/products/BTC-USD",
        "/api/v3/brokerage/accounts",
        "/api/v3/brokerage/orders/historical/batch",
        "/v2/time",
        "/api/v3/brokerage/best_bid_ask?product_ids=BTC-USD",
    ];
    let requests: Vec<String> = paths.iter().map(|p| crate::support::sdk_style_get(&host, p, &jwt)).collect();
    let statuses = crate::support::on_one_connection(sim.addr(), &requests).await;
    assert_eq!(statuses, vec![Some(200); paths.len()]);
    sim.shutdown().await;
}
