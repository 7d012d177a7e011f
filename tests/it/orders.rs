//! The simulator's orders over real HTTP: market and limit orders that move balances, holds,
//! resting orders that fill when the price path crosses them, cancels, expiry, fills, lists,
//! idempotent `client_order_id`s, and every failure as Coinbase shapes it.

use std::time::Duration;

use serde_json::{Value, json};
use tickshare::{
    CoinbaseClient, Credentials, Decimal, MarketDataSource, ProductId,
    sim::{Endpoint, MAKER_FEE_RATE, SimAccount, SimExchange, TAKER_FEE_RATE},
};

use crate::support::{Got, fixed_clock, get, http};

struct Ex {
    sim: SimExchange,
    creds: Credentials,
    client: CoinbaseClient,
    http: reqwest::Client,
}

async fn started() -> Ex {
    let creds = Credentials::generate("organizations/t/apiKeys/orders");
    let sim = SimExchange::builder()
        .products(5)
        .clock(fixed_clock())
        .jwt_public_key_pem(&creds.public_key_pem())
        .accounts([SimAccount::new("USD", Decimal::new(10_000, 0)), SimAccount::new("BTC", Decimal::ONE)])
        .start()
        .await
        .unwrap();
    let client = sim.client_builder().credentials(creds.clone()).build().unwrap();
    Ex { sim, creds, client, http: http() }
}

impl Ex {
    fn host(&self) -> String {
        self.sim.addr().to_string()
    }

    async fn post(&self, path: &str, body: &Value) -> Got {
        let full = format!("/api/v3/brokerage{path}");
        let jwt = self.creds.rest_jwt("POST", &self.host(), &full);
        let resp = self
            .http
            .post(format!("{}{full}", self.sim.base_url()))
            .bearer_auth(jwt)
            .json(body)
            .send()
            .await
            .unwrap();
        Got {
            status: resp.status(),
            headers: resp.headers().clone(),
            body: resp.bytes().await.unwrap().to_vec(),
        }
    }

    async fn get(&self, path_and_query: &str) -> Got {
        let full = format!("/api/v3/brokerage{path_and_query}");
        let path = full.split('?').next().unwrap();
        let jwt = self.creds.rest_jwt("GET", &self.host(), path);
        get(&self.http, &format!("{}{full}", self.sim.base_url()), Some(&jwt)).await
    }

    async fn order(&self, id: &str) -> Value {
        let r = self.get(&format!("/orders/historical/{id}")).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()["order"].clone()
    }

    /// `(available, hold)` of `currency`, read through the real accounts endpoint.
    async fn balance(&self, currency: &str) -> (Decimal, Decimal) {
        let accounts = self.client.accounts().await.unwrap();
        accounts
            .iter()
            .find(|a| a.currency == currency)
            .map_or((Decimal::ZERO, Decimal::ZERO), |a| (a.available, a.hold))
    }

    async fn best(&self, p: &ProductId) -> (Decimal, Decimal) {
        let b = self.client.best_bid_ask(std::slice::from_ref(p)).await.unwrap();
        (b[0].best_bid.unwrap(), b[0].best_ask.unwrap())
    }
}

fn dec(v: &Value) -> Decimal {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}")).parse().unwrap()
}

fn market_buy(client_id: &str, quote: &str) -> Value {
    json!({"client_order_id": client_id, "product_id": "BTC-USD", "side": "BUY",
           "order_configuration": {"market_market_ioc": {"quote_size": quote}}})
}

fn limit(client_id: &str, side: &str, size: &str, price: Decimal, extra: Value) -> Value {
    let mut cfg = json!({"base_size": size, "limit_price": price.to_string()});
    let key = match extra.get("tif").and_then(Value::as_str) {
        Some("gtd") => {
            cfg["end_time"] = extra["end_time"].clone();
            "limit_limit_gtd"
        }
        Some("ioc") => "sor_limit_ioc",
        Some("fok") => "limit_limit_fok",
        _ => "limit_limit_gtc",
    };
    if let Some(p) = extra.get("post_only") {
        cfg["post_only"] = p.clone();
    }
    json!({"client_order_id": client_id, "product_id": "BTC-USD", "side": side,
           "order_configuration": {key: cfg}})
}

#[tokio::test(start_paused = true)]
async fn a_market_buy_fills_at_the_ask_moves_both_balances_and_is_idempotent() {
    let ex = started().await;
    let btc: ProductId = "BTC-USD".parse().unwrap();
    let (_, ask) = ex.best(&btc).await;

    let r = ex.post("/orders", &market_buy("cid-1", "1000")).await;
    assert_eq!(r.status, 200);
    let created = r.json();
    assert_eq!(created["success"], true, "{created}");
    let id = created["order_id"].as_str().unwrap().to_string();
    assert_eq!(created["success_response"]["order_id"], id.as_str());
    assert_eq!(created["success_response"]["client_order_id"], "cid-1");
    assert_eq!(created["success_response"]["side"], "BUY");
    assert_eq!(created["order_configuration"]["market_market_ioc"]["quote_size"], "1000");

    let o = ex.order(&id).await;
    assert_eq!((o["status"].as_str(), o["order_type"].as_str()), (Some("FILLED"), Some("MARKET")));
    assert_eq!(o["time_in_force"], "IMMEDIATE_OR_CANCEL");
    assert_eq!(o["size_in_quote"], true);
    let (size, value, fees) = (dec(&o["filled_size"]), dec(&o["filled_value"]), dec(&o["total_fees"]));
    assert_eq!(dec(&o["average_filled_price"]), ask, "a market buy takes the best ask");
    assert_eq!(value, size * ask);
    assert_eq!(fees, value * TAKER_FEE_RATE);
    assert!(value + fees <= Decimal::new(1000, 0) && value + fees > Decimal::new(999, 0), "{value} + {fees}");
    assert!(size.scale() <= 8);

    assert_eq!(ex.balance("USD").await, (Decimal::new(10_000, 0) - value - fees, Decimal::ZERO));
    assert_eq!(ex.balance("BTC").await, (Decimal::ONE + size, Decimal::ZERO));

    // One taker fill, as list fills shows it.
    let fills = ex.get(&format!("/orders/historical/fills?order_ids={id}")).await.json();
    let f = &fills["fills"];
    assert_eq!(f.as_array().unwrap().len(), 1, "{fills}");
    assert_eq!(
        (f[0]["liquidity_indicator"].as_str(), f[0]["trade_type"].as_str()),
        (Some("TAKER"), Some("FILL"))
    );
    // A quote-sized order's fill is sized in the quote currency (`size_in_quote`), as ccxt reads it.
    assert_eq!(f[0]["size_in_quote"], true);
    assert_eq!((dec(&f[0]["price"]), dec(&f[0]["size"]), dec(&f[0]["commission"])), (ask, value, fees));
    assert_eq!(f[0]["entry_id"].as_str().unwrap().len(), 64);

    // The same client_order_id again is the same order: no second fill, balances unchanged.
    let again = ex.post("/orders", &market_buy("cid-1", "1000")).await.json();
    assert_eq!(again["order_id"], id.as_str());
    assert_eq!(ex.balance("BTC").await.0, Decimal::ONE + size);
    let all = ex.get("/orders/historical/batch").await.json();
    assert_eq!(all["orders"].as_array().unwrap().len(), 1);

    // A market sell of base size takes the bid.
    let (bid, _) = ex.best(&btc).await;
    let sell = json!({"client_order_id": "cid-2", "product_id": "BTC-USD", "side": "SELL",
                      "order_configuration": {"market_market_ioc": {"base_size": "0.5"}}});
    let sold = ex.post("/orders", &sell).await.json();
    let o = ex.order(sold["order_id"].as_str().unwrap()).await;
    assert_eq!(dec(&o["average_filled_price"]), bid);
    let proceeds = bid * Decimal::new(5, 1) * (Decimal::ONE - TAKER_FEE_RATE);
    assert_eq!(dec(&o["total_value_after_fees"]), proceeds);
    assert_eq!(ex.balance("BTC").await.0, Decimal::new(5, 1) + size);
    assert_eq!(ex.balance("USD").await.0, Decimal::new(10_000, 0) - value - fees + proceeds);
    assert_eq!(ex.sim.stats().calls(Endpoint::CreateOrder), 3);
    assert_eq!(ex.sim.stats().rate_limited_429, 0);
}

#[tokio::test(start_paused = true)]
async fn a_resting_limit_order_holds_funds_and_fills_when_the_price_path_crosses_it() {
    let ex = started().await;
    let btc: ProductId = "BTC-USD".parse().unwrap();
    let (bid, _) = ex.best(&btc).await;
    // 0.2% below the bid, on the increment: it rests, then fills on a dip.
    let price = (bid * Decimal::new(998, 3)).round_dp(2);
    let size = Decimal::new(1, 1);
    let r = ex.post("/orders", &limit("rest-1", "BUY", "0.1", price, json!({}))).await.json();
    assert_eq!(r["success"], true, "{r}");
    let id = r["order_id"].as_str().unwrap().to_string();
    let o = ex.order(&id).await;
    assert_eq!(
        (o["status"].as_str(), o["time_in_force"].as_str()),
        (Some("OPEN"), Some("GOOD_UNTIL_CANCELLED"))
    );
    let hold = size * price * (Decimal::ONE + TAKER_FEE_RATE);
    assert_eq!(dec(&o["outstanding_hold_amount"]), hold);
    assert_eq!(ex.balance("USD").await, (Decimal::new(10_000, 0) - hold, hold));
    let open = ex.get("/orders/historical/batch?order_status=OPEN&product_id=BTC-USD").await.json();
    assert_eq!(open["orders"][0]["order_id"], id.as_str());

    // Walk the simulated clock until it fills (the path is a pure function of the seed).
    let start = ex.sim.clock().now_utc();
    let mut filled = None;
    for _ in 0..(48 * 6) {
        tokio::time::sleep(Duration::from_secs(600)).await;
        let o = ex.order(&id).await;
        if o["status"] == "FILLED" {
            filled = Some(o);
            break;
        }
        assert_eq!(o["status"], "OPEN");
    }
    let o = filled.expect("a 0.2% dip within two simulated days");
    assert_eq!(dec(&o["average_filled_price"]), price, "a resting order fills at its limit");
    let fee = size * price * MAKER_FEE_RATE;
    assert_eq!(dec(&o["total_fees"]), fee);
    assert_eq!(dec(&o["outstanding_hold_amount"]), Decimal::ZERO);
    let fill_time = time::OffsetDateTime::parse(
        o["last_fill_time"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(fill_time > start);
    // The ask was at or under the limit then, so the last trade was below it.
    assert!(ex.sim.price_at(&btc, fill_time).unwrap() < price);
    assert_eq!(ex.balance("USD").await, (Decimal::new(10_000, 0) - size * price - fee, Decimal::ZERO));
    assert_eq!(ex.balance("BTC").await, (Decimal::ONE + size, Decimal::ZERO));
    let fills = ex.get(&format!("/orders/historical/fills?product_id=BTC-USD&order_id={id}")).await.json();
    assert_eq!(fills["fills"][0]["liquidity_indicator"], "MAKER");
}

#[tokio::test(start_paused = true)]
async fn cancel_expiry_ioc_post_only_and_funds_follow_coinbase() {
    let ex = started().await;
    let btc: ProductId = "BTC-USD".parse().unwrap();
    let (bid, ask) = ex.best(&btc).await;
    let far_above = (ask * Decimal::TWO).round_dp(2);

    // A sell far above the market rests with its base on hold; cancel releases it.
    let r = ex.post("/orders", &limit("s-1", "SELL", "0.4", far_above, json!({}))).await.json();
    let id = r["order_id"].as_str().unwrap().to_string();
    assert_eq!(ex.balance("BTC").await, (Decimal::new(6, 1), Decimal::new(4, 1)));
    let c = ex.post("/orders/batch_cancel", &json!({"order_ids": [id, "no-such-order"]})).await.json();
    assert_eq!(
        c["results"][0],
        json!({"success": true, "failure_reason": "UNKNOWN_CANCEL_FAILURE_REASON", "order_id": id})
    );
    assert_eq!(
        (c["results"][1]["success"].as_bool(), c["results"][1]["failure_reason"].as_str()),
        (Some(false), Some("UNKNOWN_CANCEL_ORDER"))
    );
    assert_eq!(ex.order(&id).await["status"], "CANCELLED");
    assert_eq!(ex.balance("BTC").await, (Decimal::ONE, Decimal::ZERO));
    let twice = ex.post("/orders/batch_cancel", &json!({"order_ids": [id]})).await.json();
    assert_eq!(twice["results"][0]["success"], false, "a closed order cannot be cancelled");

    // Good-till-date: expires at its end time and gives its hold back.
    let end = ex.sim.clock().now_utc() + time::Duration::minutes(30);
    let end_s = end.format(&time::format_description::well_known::Rfc3339).unwrap();
    let r = ex
        .post("/orders", &limit("d-1", "SELL", "0.3", far_above, json!({"tif": "gtd", "end_time": end_s})))
        .await
        .json();
    let gtd = r["order_id"].as_str().unwrap().to_string();
    assert_eq!(ex.order(&gtd).await["time_in_force"], "GOOD_UNTIL_DATE_TIME");
    assert_eq!(ex.balance("BTC").await.1, Decimal::new(3, 1));
    tokio::time::sleep(Duration::from_secs(31 * 60)).await;
    assert_eq!(ex.balance("BTC").await, (Decimal::ONE, Decimal::ZERO), "settled before the balance read");
    assert_eq!(ex.order(&gtd).await["status"], "EXPIRED");

    // IOC and FOK that cannot fill now are cancelled at once, nothing held.
    let (bid2, _) = ex.best(&btc).await;
    let low = (bid2 * Decimal::new(9, 1)).round_dp(2);
    for (cid, tif) in [("i-1", "ioc"), ("f-1", "fok")] {
        let r = ex.post("/orders", &limit(cid, "BUY", "0.1", low, json!({"tif": tif}))).await.json();
        assert_eq!(ex.order(r["order_id"].as_str().unwrap()).await["status"], "CANCELLED", "{tif}");
    }
    assert_eq!(ex.balance("USD").await, (Decimal::new(10_000, 0), Decimal::ZERO));

    // Failures are 200 with success:false and Coinbase's reason; nothing is created.
    let before = ex.get("/orders/historical/batch").await.json()["orders"].as_array().unwrap().len();
    let (bid3, ask3) = ex.best(&btc).await;
    let cases = [
        (limit("p-1", "BUY", "0.1", ask3, json!({"post_only": true})), "INVALID_LIMIT_PRICE_POST_ONLY"),
        (market_buy("m-1", "1000000"), "INSUFFICIENT_FUND"),
        (limit("p-2", "SELL", "5", bid3, json!({})), "INSUFFICIENT_FUND"),
        (limit("p-3", "BUY", "0.000000001", bid3, json!({})), "INVALID_SIZE_PRECISION"),
        (limit("p-4", "BUY", "0.1", bid3 + Decimal::new(1, 3), json!({})), "INVALID_PRICE_PRECISION"),
        (
            json!({"client_order_id": "x-1", "product_id": "NOPE-USD", "side": "BUY", "order_configuration": {}}),
            "INVALID_PRODUCT_ID",
        ),
        (
            json!({"client_order_id": "x-2", "product_id": "BTC-USD", "side": "HOLD", "order_configuration": {}}),
            "INVALID_SIDE",
        ),
        (
            json!({"client_order_id": "x-3", "product_id": "BTC-USD", "side": "BUY",
                "order_configuration": {"stop_limit_stop_limit_gtc": {"base_size": "1"}}}),
            "UNSUPPORTED_ORDER_CONFIGURATION",
        ),
        (
            json!({"client_order_id": "x-4", "product_id": "BTC-USD", "side": "BUY",
                "order_configuration": {"market_market_ioc": {"quote_size": "1", "base_size": "1"}}}),
            "UNSUPPORTED_ORDER_CONFIGURATION",
        ),
        (
            json!({"client_order_id": "x-5", "product_id": "BTC-USD", "side": "BUY",
                "order_configuration": {"market_market_ioc": {"quote_size": "-5"}}}),
            "INVALID_REQUEST",
        ),
        (
            json!({"client_order_id": "x-6", "product_id": "BTC-USD", "side": "BUY",
                "order_configuration": {"market_market_ioc": {"base_size": "99999999999999999999999999"}}}),
            "INVALID_REQUEST",
        ),
    ];
    for (body, reason) in cases {
        let r = ex.post("/orders", &body).await;
        assert_eq!(r.status, 200, "{body}");
        let v = r.json();
        assert_eq!(v["success"], false, "{body}: {v}");
        assert_eq!(v["order_id"], "");
        assert_eq!(v["error_response"]["error"], reason, "{body}: {v}");
        assert_eq!(v["error_response"]["new_order_failure_reason"], reason);
    }
    let after = ex.get("/orders/historical/batch").await.json()["orders"].as_array().unwrap().len();
    assert_eq!(before, after);
    assert_eq!(ex.balance("USD").await, (Decimal::new(10_000, 0), Decimal::ZERO));
    let _ = bid;
}

#[tokio::test(start_paused = true)]
async fn lists_page_and_filter_and_bad_requests_are_coinbase_errors() {
    let ex = started().await;
    let btc: ProductId = "BTC-USD".parse().unwrap();
    let (bid, _) = ex.best(&btc).await;
    let low = (bid * Decimal::new(5, 1)).round_dp(2);
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = ex.post("/orders", &limit(&format!("l-{i}"), "BUY", "0.01", low, json!({}))).await.json();
        ids.push(r["order_id"].as_str().unwrap().to_string());
    }
    // What the simulator keeps of a configuration is what it understood: extra fields are
    // neither echoed nor stored.
    let junk = json!({"client_order_id": "m-1", "product_id": "BTC-USD", "side": "BUY",
        "order_configuration": {"market_market_ioc": {"quote_size": "10", "junk": "x".repeat(10_000)}}});
    let m = ex.post("/orders", &junk).await.json();
    let o = ex.order(m["order_id"].as_str().unwrap()).await;
    assert_eq!(o["order_configuration"], json!({"market_market_ioc": {"quote_size": "10"}}));
    assert_eq!(m["order_configuration"], o["order_configuration"]);
    // Newest first, two per page, cursor to the end.
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = ex
            .get(&format!("/orders/historical/batch?order_status=OPEN&limit=2&cursor={cursor}"))
            .await
            .json();
        for o in page["orders"].as_array().unwrap() {
            seen.push(o["order_id"].as_str().unwrap().to_string());
        }
        if page["has_next"] != true {
            assert_eq!(page["cursor"], "");
            break;
        }
        cursor = page["cursor"].as_str().unwrap().to_string();
    }
    ids.reverse();
    assert_eq!(seen, ids);
    let filled = ex.get("/orders/historical/batch?order_status=FILLED").await.json();
    assert_eq!(filled["orders"].as_array().unwrap().len(), 1);
    let by_side = ex.get("/orders/historical/batch?order_side=SELL").await.json();
    assert!(by_side["orders"].as_array().unwrap().is_empty());
    let other = ex.get("/orders/historical/batch?product_ids=ETH-USD").await.json();
    assert!(other["orders"].as_array().unwrap().is_empty());

    // Errors in Coinbase's shapes.
    let missing = ex.get("/orders/historical/not-an-order").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error_details"], "order with this orderID was not found");
    assert_eq!(ex.get("/orders/historical/batch?order_status=DONE").await.status, 400);
    assert_eq!(ex.get("/orders/historical/batch?limit=x").await.status, 400);
    assert_eq!(ex.get("/orders/historical/fills?start_sequence_timestamp=yesterday").await.status, 400);
    assert_eq!(ex.post("/orders", &json!("not an object")).await.status, 400);
    assert_eq!(ex.post("/orders", &json!({"product_id": "BTC-USD"})).await.status, 400, "no client_order_id");
    let too_many: Vec<String> = (0..101).map(|i| i.to_string()).collect();
    assert_eq!(ex.post("/orders/batch_cancel", &json!({"order_ids": too_many})).await.status, 400);
    assert_eq!(ex.post("/orders/batch_cancel", &json!({})).await.status, 400);
    // A body over the bound is refused without being read whole.
    let huge = json!({"client_order_id": "h", "pad": "x".repeat(100_000)});
    assert_eq!(ex.post("/orders", &huge).await.status, 400);

    // Unauthenticated: 401 and nothing is created.
    let url = format!("{}/api/v3/brokerage/orders", ex.sim.base_url());
    let r = ex.http.post(&url).json(&market_buy("u-1", "10")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let wrong_method = ex.creds.rest_jwt("GET", &ex.host(), "/api/v3/brokerage/orders");
    let r = ex.http.post(&url).bearer_auth(wrong_method).json(&market_buy("u-2", "10")).send().await.unwrap();
    assert_eq!(r.status(), 401, "a GET token does not place an order");
    let all = ex.get("/orders/historical/batch?limit=100").await.json();
    assert_eq!(all["orders"].as_array().unwrap().len(), 6);
    assert_eq!(ex.sim.stats().auth_failures, 2);
}

#[tokio::test(start_paused = true)]
async fn an_open_gtc_order_can_be_edited_and_an_edit_that_crosses_fills() {
    let ex = started().await;
    let btc: ProductId = "BTC-USD".parse().unwrap();
    let (bid, _) = ex.best(&btc).await;
    let low = (bid * Decimal::new(8, 1)).round_dp(2);
    let r = ex.post("/orders", &limit("e-1", "BUY", "0.1", low, json!({}))).await.json();
    let id = r["order_id"].as_str().unwrap().to_string();

    // A new size and price: the hold follows, the history records it.
    let lower = (bid * Decimal::new(7, 1)).round_dp(2);
    let e =
        ex.post("/orders/edit", &json!({"order_id": id, "price": lower.to_string(), "size": "0.2"})).await;
    assert_eq!(e.json(), json!({"success": true, "errors": []}));
    let o = ex.order(&id).await;
    assert_eq!(o["order_configuration"]["limit_limit_gtc"]["limit_price"], lower.to_string());
    assert_eq!(o["order_configuration"]["limit_limit_gtc"]["base_size"], "0.2");
    assert_eq!(o["edit_history"].as_array().unwrap().len(), 1);
    let hold = Decimal::new(2, 1) * lower * (Decimal::ONE + TAKER_FEE_RATE);
    assert_eq!(ex.balance("USD").await, (Decimal::new(10_000, 0) - hold, hold));

    // Failures name their reason; nothing changes.
    for (body, reason) in [
        (
            json!({"order_id": id, "price": lower.to_string(), "size": "0.2"}),
            "EDIT_REQUEST_EQUAL_TO_ORIGINAL_REQUEST",
        ),
        (json!({"order_id": id, "price": "-1"}), "INVALID_EDITED_PRICE"),
        (json!({"order_id": id, "size": "0.000000001"}), "INVALID_EDITED_SIZE"),
        (json!({"order_id": id, "size": "1000"}), "COMMANDER_REJECTED_EDIT_ORDER"),
        (json!({"order_id": "nope", "size": "1"}), "ORDER_NOT_FOUND"),
    ] {
        let v = ex.post("/orders/edit", &body).await.json();
        assert_eq!(v["success"], false, "{body}");
        assert_eq!(v["errors"][0]["edit_failure_reason"], reason, "{body}");
    }
    assert_eq!(ex.balance("USD").await, (Decimal::new(10_000, 0) - hold, hold));
    assert_eq!(ex.post("/orders/edit", &json!({"price": "1"})).await.status, 400);

    // An edit above the ask fills it at once, at the ask, taking liquidity (the funds are
    // checked at the fill's cost: 0.2 BTC would be more than the account holds).
    let (_, ask) = ex.best(&btc).await;
    let above = (ask * Decimal::new(101, 2)).round_dp(2);
    let e = ex
        .post("/orders/edit", &json!({"order_id": id, "price": above.to_string(), "size": "0.1"}))
        .await
        .json();
    assert_eq!(e["success"], true, "{e}");
    let o = ex.order(&id).await;
    assert_eq!(o["status"], "FILLED");
    assert_eq!(dec(&o["average_filled_price"]), ask);
    let cost = Decimal::new(1, 1) * ask * (Decimal::ONE + TAKER_FEE_RATE);
    assert_eq!(ex.balance("USD").await, (Decimal::new(10_000, 0) - cost, Decimal::ZERO));
    let v = ex.post("/orders/edit", &json!({"order_id": id, "size": "0.3"})).await.json();
    assert_eq!(v["errors"][0]["edit_failure_reason"], "ONLY_OPEN_ORDERS_CAN_BE_EDITED");
    // Only GTC limit orders can be edited.
    let m = ex.post("/orders", &market_buy("e-2", "10")).await.json();
    let v = ex.post("/orders/edit", &json!({"order_id": m["order_id"], "size": "1"})).await.json();
    assert_eq!(v["errors"][0]["edit_failure_reason"], "ONLY_LIMIT_ORDER_EDITS_SUPPORTED");
    assert_eq!(ex.sim.stats().calls(Endpoint::EditOrder), 10);
}

#[tokio::test(start_paused = true)]
async fn a_preview_says_what_a_create_would_do_and_changes_nothing() {
    let ex = started().await;
    let btc: ProductId = "BTC-USD".parse().unwrap();
    let (bid, ask) = ex.best(&btc).await;
    let mut buy = market_buy("ignored", "1000");
    buy.as_object_mut().unwrap().remove("client_order_id");
    let p = ex.post("/orders/preview", &buy).await.json();
    assert_eq!(p["errs"], json!([]), "{p}");
    let (size, value, fee) = (dec(&p["base_size"]), dec(&p["quote_size"]), dec(&p["commission_total"]));
    assert_eq!((dec(&p["best_bid"]), dec(&p["best_ask"])), (bid, ask));
    assert_eq!(value, size * ask);
    assert_eq!(fee, value * TAKER_FEE_RATE);
    assert_eq!(dec(&p["order_total"]), value + fee);
    assert!(value + fee <= Decimal::new(1000, 0));
    assert_eq!(p["preview_id"].as_str().unwrap().len(), 36);
    // The create that follows fills on exactly those terms (same simulated instant).
    let o = ex.post("/orders", &market_buy("after-preview", "1000")).await.json();
    let o = ex.order(o["order_id"].as_str().unwrap()).await;
    assert_eq!((dec(&o["filled_size"]), dec(&o["total_fees"])), (size, fee));

    // A resting limit previews at its limit, as a maker; failures are listed in errs.
    let low = (bid * Decimal::new(9, 1)).round_dp(2);
    let p = ex.post("/orders/preview", &limit("x", "BUY", "0.01", low, json!({}))).await.json();
    assert_eq!(dec(&p["commission_total"]), Decimal::new(1, 2) * low * MAKER_FEE_RATE);
    let p = ex.post("/orders/preview", &market_buy("x", "1000000")).await.json();
    assert_eq!(p["errs"], json!(["PREVIEW_INSUFFICIENT_FUND"]));
    let p = ex.post("/orders/preview", &json!({"product_id": "NOPE-USD", "side": "BUY"})).await.json();
    assert_eq!(p["errs"], json!(["PREVIEW_INVALID_PRODUCT_ID"]));
    assert_eq!(ex.post("/orders/preview", &json!("nope")).await.status, 400);

    // Nothing but the one create happened.
    assert_eq!(ex.get("/orders/historical/batch").await.json()["orders"].as_array().unwrap().len(), 1);
    assert_eq!(ex.sim.stats().calls(Endpoint::PreviewOrder), 5);
}
