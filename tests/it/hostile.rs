//! Hostile and broken upstreams (issue 16): bounded memory and time, never wrong data.
//!
//! A small axum server on 127.0.0.1:0 (or, for a body cut short, a raw TCP one) serves scripted
//! bodies and headers to a real [`CoinbaseClient`]. Each test names the class of misbehaviour
//! it reproduces and checks the outcome (a typed error, a dropped entry), that the call ends
//! in bounded time (the paused clock where time is the subject, a generous bound otherwise)
//! and, for bodies, that the client stops reading.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    http::{HeaderMap, HeaderValue, StatusCode, Uri, header},
    response::Response,
};
use tickshare::{
    CandleRange, CoinbaseClient, CoinbaseClientBuilder, Credentials, Decimal, Error, Granularity,
    MarketDataSource, ProductId, RetryPolicy,
};
use time::{OffsetDateTime, macros::format_description};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    task::JoinHandle,
};

use crate::support::fixed_clock;

/// What no call may take longer than (the client's own timeout is 10 s).
const BOUND: Duration = Duration::from_secs(30);

fn pid(s: &str) -> ProductId {
    s.parse().unwrap()
}

fn dec(s: &str) -> Decimal {
    s.parse().unwrap()
}

/// One request as the hostile server saw it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    query: String,
    authorization: String,
}

/// A scripted server; stops when dropped.
struct Hostile {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Hostile {
    /// Serve every request with `script(request, how many requests came before it)`.
    async fn start(script: impl Fn(&Seen, usize) -> Response + Send + Sync + 'static) -> Hostile {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let script = Arc::new(script);
        let log = Arc::clone(&seen);
        let app = Router::new().fallback(move |uri: Uri, headers: HeaderMap| {
            let request = Seen {
                path: uri.path().to_string(),
                query: uri.query().unwrap_or_default().to_string(),
                authorization: headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string(),
            };
            let n = {
                let mut log = log.lock().unwrap();
                log.push(request.clone());
                log.len() - 1
            };
            let response = script(&request, n);
            async move { response }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Hostile { addr, seen, task }
    }

    /// Answer every request with the same status and body.
    async fn always(status: u16, body: impl Into<String>) -> Hostile {
        let body = body.into();
        Hostile::start(move |_, _| reply(status, &body)).await
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn hits(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// A client with credentials (private paths, a JWT on every request), no rate limiter
    /// and the tests' fixed clock (2024-04-24T09:56:38Z).
    fn client(&self) -> CoinbaseClientBuilder {
        CoinbaseClient::builder()
            .base_url(self.url())
            .credentials(Credentials::generate("organizations/o/apiKeys/k"))
            .unlimited()
            .clock(fixed_clock())
    }
}

/// A JSON answer.
fn reply(status: u16, body: &str) -> Response {
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn with_header(mut r: Response, name: &'static str, value: &str) -> Response {
    r.headers_mut().insert(name, HeaderValue::from_str(value).unwrap());
    r
}

/// Await `f`, failing the test if it takes longer than [`BOUND`].
async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f).await.expect("the call must end in bounded time")
}

fn decode_error<T: std::fmt::Debug>(r: Result<T, Error>, needle: &str) -> String {
    match r {
        Err(Error::Decode(m)) => {
            assert!(m.contains(needle), "{m:?} should mention {needle:?}");
            m
        }
        other => panic!("expected Error::Decode mentioning {needle:?}, got {other:?}"),
    }
}

/// The last hour-long candles at the fixed clock: [07:00, 10:00) on 2024-04-24.
fn three_hours() -> CandleRange {
    CandleRange::lookback(Granularity::OneHour, 3, fixed_clock().now_utc()).unwrap()
}

fn ticker_body(product: &str, price: &str, bid: &str, ask: &str, time: &str) -> String {
    format!(
        r#"{{"trades":[{{"trade_id":"1","product_id":"{product}","price":"{price}","size":"1","time":"{time}","side":"BUY","bid":"","ask":""}}],"best_bid":"{bid}","best_ask":"{ask}"}}"#
    )
}

fn book(product: &str, bid: &str, ask: &str) -> String {
    format!(
        r#"{{"product_id":"{product}","bids":[{{"price":"{bid}","size":"1"}}],"asks":[{{"price":"{ask}","size":"1"}}],"time":"2024-04-24T09:56:00.000000Z"}}"#
    )
}

fn candle(start: i64, open: &str, high: &str, low: &str, close: &str, volume: &str) -> String {
    format!(
        r#"{{"start":"{start}","low":"{low}","high":"{high}","open":"{open}","close":"{close}","volume":"{volume}"}}"#
    )
}

fn account(uuid: &str, currency: &str, available: &str) -> String {
    format!(
        r#"{{"uuid":"{uuid}","name":"{currency} Wallet","currency":"{currency}","available_balance":{{"value":"{available}","currency":"{currency}"}},"active":true,"type":"ACCOUNT_TYPE_CRYPTO","hold":{{"value":"0","currency":"{currency}"}}}}"#
    )
}

// --- 1. A 200 that is not an answer ------------------------------------------------------

/// `{}` and an error object on a 200 used to decode as an empty success for best_bid_ask,
/// accounts and candles (their lists had `#[serde(default)]`): a bot saw "no products", "no
/// money" or "no candles". Now every endpoint answers `Error::Decode`.
#[tokio::test]
async fn a_200_error_object_or_empty_object_is_not_an_empty_success() {
    for body in ["{}", r#"{"error":"INTERNAL","message":"try again later"}"#] {
        let server = Hostile::always(200, body).await;
        let client = server.client().build().unwrap();
        let btc = pid("BTC-USD");
        let what = if body == "{}" { "missing field" } else { "error object (INTERNAL)" };
        decode_error(within(client.best_bid_ask(std::slice::from_ref(&btc))).await, what);
        decode_error(within(client.tickers(&[btc.clone(), pid("ETH-USD")])).await, what);
        decode_error(within(client.accounts()).await, what);
        decode_error(within(client.candles(&btc, Granularity::OneHour, three_hours())).await, what);
        decode_error(within(client.ticker(&btc)).await, what);
        decode_error(within(client.products()).await, what);
    }
}

/// A list that is present and empty is a valid empty answer.
#[tokio::test]
async fn an_empty_list_is_a_valid_empty_answer() {
    let btc = pid("BTC-USD");
    let server = Hostile::always(200, r#"{"pricebooks":[]}"#).await;
    assert_eq!(
        within(server.client().build().unwrap().best_bid_ask(std::slice::from_ref(&btc))).await,
        Ok(vec![])
    );
    let server = Hostile::always(200, r#"{"accounts":[],"has_next":false,"cursor":"","size":0}"#).await;
    assert_eq!(within(server.client().build().unwrap().accounts()).await, Ok(vec![]));
    let server = Hostile::always(200, r#"{"candles":[]}"#).await;
    let client = server.client().build().unwrap();
    assert_eq!(within(client.candles(&btc, Granularity::OneHour, three_hours())).await, Ok(vec![]));
}

// --- 2. Bodies are bounded ---------------------------------------------------------------

/// A `Content-Length` over `max_body_bytes` fails before the body is read: this server
/// announces 1 GiB, sends 10 bytes and then nothing, so a client that waited for the body
/// would hang until its timeout.
#[tokio::test]
async fn a_content_length_over_the_limit_fails_before_reading() {
    let produced = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&produced);
    let server = Hostile::start(move |_, _| {
        let count = Arc::clone(&count);
        let first = futures_util::stream::once(async move {
            count.fetch_add(10, Ordering::SeqCst);
            Ok::<_, std::io::Error>(Bytes::from_static(b"{\"trades\":"))
        });
        let body = Body::from_stream(futures_util::StreamExt::chain(first, futures_util::stream::pending()));
        with_header(
            with_header(Response::new(body), "content-length", "1073741824"),
            "content-type",
            "application/json",
        )
    })
    .await;
    let client = server.client().max_body_bytes(64 * 1024).timeout(Duration::from_secs(20)).build().unwrap();
    let t0 = std::time::Instant::now();
    decode_error(within(client.ticker(&pid("BTC-USD"))).await, "exceeds 65536 bytes");
    assert!(t0.elapsed() < Duration::from_secs(5), "refused from the header, not after a timeout");
    assert!(produced.load(Ordering::SeqCst) <= 10);
}

/// An endless chunked body: the client stops at the limit and drops the connection; the
/// server gets to write only the limit plus what the socket buffers hold.
#[tokio::test]
async fn an_endless_body_is_cut_at_the_limit() {
    let produced = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&produced);
    let server = Hostile::start(move |_, _| {
        let count = Arc::clone(&count);
        let chunk = Bytes::from(vec![b' '; 16 * 1024]);
        let endless = futures_util::stream::repeat_with(move || {
            count.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            Ok::<_, std::io::Error>(chunk.clone())
        });
        with_header(Response::new(Body::from_stream(endless)), "content-type", "application/json")
    })
    .await;
    let limit = 256 * 1024;
    let client = server.client().max_body_bytes(limit).build().unwrap();
    let e = within(client.candles(&pid("BTC-USD"), Granularity::OneHour, three_hours())).await;
    decode_error(e, "exceeds 262144 bytes (max_body_bytes)");
    // The connection is closed: the server stops producing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = produced.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(produced.load(Ordering::SeqCst), after, "the server still writes: the client kept reading");
    assert!(after < 64 * 1024 * 1024, "{after} bytes produced for a {limit}-byte limit");
}

/// An error body is read only a little (16 KiB): an endless 429 page is still a 429, with its
/// wait, at once.
#[tokio::test]
async fn an_endless_error_body_is_still_classified() {
    let server = Hostile::start(|_, _| {
        let endless =
            futures_util::stream::repeat_with(|| Ok::<_, std::io::Error>(Bytes::from_static(b"<html>")));
        let mut r = Response::new(Body::from_stream(endless));
        *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        with_header(with_header(r, "content-type", "text/html"), "retry-after", "2")
    })
    .await;
    let client = server.client().build().unwrap();
    let e = within(client.ticker(&pid("BTC-USD"))).await.unwrap_err();
    assert!(matches!(e, Error::RateLimited { local: false, .. }), "{e:?}");
    assert_eq!(e.retry_after(), Some(Duration::from_secs(2)));
}

// --- 3. Pagination -----------------------------------------------------------------------

/// An exchange that always has a next page used to keep the client paging forever.
#[tokio::test]
async fn accounts_pagination_is_bounded() {
    let server = Hostile::start(|_, n| {
        let page = format!(
            r#"{{"accounts":[{}],"has_next":true,"cursor":"c{n}","size":1}}"#,
            account(&format!("u{n}"), "USD", "1")
        );
        reply(200, &page)
    })
    .await;
    let client = server.client().accounts_max_pages(5).build().unwrap();
    decode_error(within(client.accounts()).await, "past 5 pages (accounts_max_pages)");
    assert_eq!(server.hits(), 5);
    let seen = server.seen.lock().unwrap().clone();
    assert!(seen.iter().all(|s| s.path == "/api/v3/brokerage/accounts"), "{seen:?}");
    assert!(seen[4].query.contains("cursor=c3"), "{seen:?}");
}

/// The same account on two pages used to be counted twice (twice the money).
#[tokio::test]
async fn an_account_on_two_pages_is_an_error_not_counted_twice() {
    let server = Hostile::start(|seen, _| {
        let page = if seen.query.contains("cursor=2") {
            format!(
                r#"{{"accounts":[{},{}],"has_next":false,"cursor":""}}"#,
                account("a", "USD", "100"),
                account("b", "BTC", "1")
            )
        } else {
            format!(r#"{{"accounts":[{}],"has_next":true,"cursor":"2"}}"#, account("a", "USD", "100"))
        };
        reply(200, &page)
    })
    .await;
    decode_error(within(server.client().build().unwrap().accounts()).await, "listed account a twice");
    assert_eq!(server.hits(), 2);
}

/// `has_next: true` without a cursor used to end the listing silently after the first page.
#[tokio::test]
async fn has_next_without_a_cursor_is_an_error_not_a_short_list() {
    for tail in [r#""has_next":true,"cursor":"""#, r#""has_next":true"#, r#""has_next":true,"cursor":"  ""#] {
        let body = format!(r#"{{"accounts":[{}],{tail}}}"#, account("a", "USD", "1"));
        let server = Hostile::always(200, body).await;
        decode_error(within(server.client().build().unwrap().accounts()).await, "cursor is empty");
        assert_eq!(server.hits(), 1);
    }
}

// --- 4. Answers that do not match the question ------------------------------------------

/// A ticker whose trades are of another product used to be labelled with the asked product.
/// The `-USD`/`-USDC` alias pair is the same market and is accepted.
#[tokio::test]
async fn a_ticker_of_another_product_is_an_error() {
    let server =
        Hostile::always(200, ticker_body("ETH-USD", "3000", "2999", "3001", "2024-04-24T09:56:00Z")).await;
    let client = server.client().build().unwrap();
    decode_error(within(client.ticker(&pid("BTC-USD"))).await, "trade of another product (\"ETH-USD\")");
    let server =
        Hostile::always(200, ticker_body("BTC-USDC", "100", "99", "101", "2024-04-24T09:56:00Z")).await;
    let t = within(server.client().build().unwrap().ticker(&pid("BTC-USD"))).await.unwrap();
    assert_eq!((t.product, t.price), (pid("BTC-USD"), dec("100")));
}

/// Keyless tickers (issue 15) come from the public products list: the same rules as
/// `best_bid_ask` (products not asked for dropped unread, identical duplicates collapse,
/// conflicting ones and impossible prices rejected), no bid/ask, no JWT, one request.
#[tokio::test]
async fn keyless_tickers_keep_to_what_was_asked() {
    let product =
        |id: &str, price: &str| format!(r#"{{"product_id":"{id}","price":"{price}","status":"online"}}"#);
    let body = format!(
        r#"{{"products":[{},{},{{"product_id":"DOGE-USD","price":["oops"]}},{},{}],"num_products":4}}"#,
        product("BTC-USD", "100"),
        product("SOL-USD", "-1"),
        product("ETH-USD", "2000"),
        product("BTC-USD", "100"),
    );
    let server = Hostile::always(200, body).await;
    let keyless = || CoinbaseClient::builder().base_url(server.url()).unlimited().clock(fixed_clock());
    let got = within(keyless().build().unwrap().tickers(&[pid("ETH-USD"), pid("BTC-USD"), pid("ADA-USD")]))
        .await
        .unwrap();
    let prices: Vec<(&str, Decimal, Option<Decimal>)> =
        got.iter().map(|t| (t.product.as_str(), t.price, t.best_bid)).collect();
    assert_eq!(prices, [("BTC-USD", dec("100"), None), ("ETH-USD", dec("2000"), None)]);
    let seen = server.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/api/v3/brokerage/market/products");
    assert_eq!(seen[0].query, "product_ids=ETH-USD&product_ids=BTC-USD&product_ids=ADA-USD");
    assert_eq!(seen[0].authorization, "", "a public request carries no JWT");
    drop(server);
    for (body, needle) in [
        (format!(r#"{{"products":[{},{}]}}"#, product("BTC-USD", "1"), product("BTC-USD", "2")), "twice"),
        (format!(r#"{{"products":[{}]}}"#, product("BTC-USD", "0")), "product BTC-USD"),
    ] {
        let server = Hostile::always(200, body).await;
        let client = CoinbaseClient::builder().base_url(server.url()).unlimited().clock(fixed_clock());
        decode_error(within(client.build().unwrap().tickers(&[pid("BTC-USD")])).await, needle);
    }
}

/// Entries for products not asked for are dropped without being decoded, so one malformed
/// extra entry cannot fail the batch; identical duplicates collapse.
#[tokio::test]
async fn best_bid_ask_keeps_to_what_was_asked() {
    let body = format!(
        r#"{{"pricebooks":[{},{},{},{},{{"bids":"garbage"}},{{"product_id":"btc usd"}},{{"product_id":7}},{}]}}"#,
        book("BTC-USD", "99", "101"),
        book("SOL-USD", "-1", "x"),
        r#"{"product_id":"DOGE-USD","bids":{"price":"oops"}}"#,
        book("ETH-USD", "1999", "2001"),
        book("BTC-USD", "99", "101"),
    );
    let server = Hostile::always(200, body).await;
    let client = server.client().build().unwrap();
    let got = within(client.best_bid_ask(&[pid("ETH-USD"), pid("BTC-USD"), pid("ADA-USD")])).await.unwrap();
    let prices: Vec<(&str, Decimal)> = got.iter().map(|t| (t.product.as_str(), t.price)).collect();
    assert_eq!(prices, [("BTC-USD", dec("100")), ("ETH-USD", dec("2000"))]);
}

/// Two different books for one product cannot both be right: the chunk is an error. So is a
/// malformed entry for an asked product (the message names it).
#[tokio::test]
async fn conflicting_or_malformed_entries_for_asked_products_fail_the_chunk() {
    let body =
        format!(r#"{{"pricebooks":[{},{}]}}"#, book("BTC-USD", "99", "101"), book("BTC-USD", "98", "101"));
    let server = Hostile::always(200, body).await;
    let client = server.client().build().unwrap();
    decode_error(within(client.best_bid_ask(&[pid("BTC-USD")])).await, "answered BTC-USD twice, differently");
    let body = format!(
        r#"{{"pricebooks":[{},{{"product_id":"ETH-USD","bids":[{{"price":"abc","size":"1"}}],"asks":[]}}]}}"#,
        book("BTC-USD", "99", "101")
    );
    let server = Hostile::always(200, body).await;
    let client = server.client().build().unwrap();
    decode_error(within(client.best_bid_ask(&[pid("BTC-USD"), pid("ETH-USD")])).await, "entry for ETH-USD");
}

// --- 5. Impossible values ----------------------------------------------------------------

/// Prices that are not positive, crossed books, impossible candles, off-grid or far-away
/// times and negative balances: each was served as data before; each is `Error::Decode` now.
#[tokio::test]
async fn impossible_values_are_rejected() {
    let t = "2024-04-24T09:56:00Z";
    let h = three_hours().start.unix_timestamp(); // 07:00, on the hour grid
    let ok = candle(h, "10", "12", "9", "11", "5");
    let candles = |c: String| format!(r#"{{"candles":[{ok},{c}]}}"#);
    let books = |b: String| format!(r#"{{"pricebooks":[{b}]}}"#);
    let accounts = |a: String| format!(r#"{{"accounts":[{a}],"has_next":false,"cursor":""}}"#);
    #[derive(Debug)]
    enum Call {
        Ticker,
        Books,
        Candles,
        Accounts,
    }
    let rows: Vec<(Call, String, &str)> = vec![
        (Call::Ticker, ticker_body("BTC-USD", "0", "", "", t), "trades[0].price is not a positive price"),
        (Call::Ticker, ticker_body("BTC-USD", "-5", "", "", t), "not a positive price"),
        (Call::Ticker, ticker_body("BTC-USD", "100", "-1", "101", t), "best_bid is not a positive price"),
        (Call::Ticker, ticker_body("BTC-USD", "100", "102", "101", t), "crossed book"),
        (Call::Ticker, ticker_body("BTC-USD", "100", "", "", "2300-01-01T00:00:00Z"), "a day ahead"),
        (Call::Ticker, ticker_body("BTC-USD", "100", "", "", "1990-01-01T00:00:00Z"), "before 2009"),
        (Call::Books, books(book("BTC-USD", "101", "100")), "crossed book"),
        (Call::Books, books(book("BTC-USD", "0", "100")), "bids[0].price is not a positive price"),
        (Call::Books, books(book("BTC-USD", "99", "100").replace("2024-04-24", "2999-04-24")), "a day ahead"),
        (Call::Candles, candles(candle(h + 3600, "10", "9", "12", "11", "5")), "high 9 below low 12"),
        (Call::Candles, candles(candle(h + 3600, "8", "12", "9", "11", "5")), "open 8 outside low..high"),
        (Call::Candles, candles(candle(h + 3600, "10", "12", "9", "13", "5")), "close 13 outside"),
        (Call::Candles, candles(candle(h + 3600, "10", "12", "9", "11", "-1")), "candle.volume is negative"),
        (Call::Candles, candles(candle(h + 3600, "0", "12", "0", "11", "5")), "not a positive price"),
        (Call::Candles, candles(candle(h + 1800, "10", "12", "9", "11", "5")), "not on the ONE_HOUR grid"),
        (Call::Candles, candles(candle(10_413_792_000, "10", "12", "9", "11", "5")), "a day ahead"),
        (Call::Candles, candles(candle(631_152_000, "10", "12", "9", "11", "5")), "before 2009"),
        (Call::Candles, candles(candle(h, "10", "12", "9", "11.5", "5")), "two different candles"),
        (Call::Accounts, accounts(account("a", "USD", "-1")), "available_balance.value is negative"),
        (
            Call::Accounts,
            accounts(account("a", "USD", "1").replace(r#""value":"0""#, r#""value":"-0.5""#)),
            "hold.value is negative",
        ),
        (
            Call::Accounts,
            accounts(account("a", "USD", "1").replacen(r#""currency":"USD"}"#, r#""currency":"BTC"}"#, 1)),
            "available_balance.value is in \"BTC\"",
        ),
        (Call::Accounts, accounts(account("", "USD", "1")), "without a uuid"),
    ];
    for (call, body, needle) in rows {
        let server = Hostile::always(200, body.clone()).await;
        let client = server.client().build().unwrap();
        let btc = pid("BTC-USD");
        let r = match call {
            Call::Ticker => within(client.ticker(&btc)).await.map(drop),
            Call::Books => within(client.best_bid_ask(std::slice::from_ref(&btc))).await.map(drop),
            Call::Candles => {
                within(client.candles(&btc, Granularity::OneHour, three_hours())).await.map(drop)
            }
            Call::Accounts => within(client.accounts()).await.map(drop),
        };
        let r = r.map_err(|e| {
            assert!(matches!(e, Error::Decode(_)), "{call:?} {body}: {e:?}");
            e
        });
        decode_error(r, needle);
    }
}

/// What stays valid: a locked book, zero volume, identical duplicate candles, candles just
/// outside the range (dropped), a zero balance.
#[tokio::test]
async fn edge_values_that_can_be_true_are_kept() {
    let h = three_hours().start.unix_timestamp();
    let server =
        Hostile::always(200, format!(r#"{{"pricebooks":[{}]}}"#, book("BTC-USD", "100", "100"))).await;
    let t = within(server.client().build().unwrap().best_bid_ask(&[pid("BTC-USD")])).await.unwrap();
    assert_eq!(t[0].price, dec("100"));
    let c = candle(h, "10", "10", "10", "10", "0");
    let body = format!(r#"{{"candles":[{c},{c},{}]}}"#, candle(h + 3 * 3600, "1", "1", "1", "1", "1"));
    let server = Hostile::always(200, body).await;
    let client = server.client().build().unwrap();
    let got = within(client.candles(&pid("BTC-USD"), Granularity::OneHour, three_hours())).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].volume, Decimal::ZERO);
    let body = format!(r#"{{"accounts":[{}],"has_next":false,"cursor":""}}"#, account("a", "USD", "0"));
    let server = Hostile::always(200, body).await;
    assert_eq!(
        within(server.client().build().unwrap().accounts()).await.unwrap()[0].available,
        Decimal::ZERO
    );
}

// --- 6. Rate-limit headers ---------------------------------------------------------------

fn http_date(t: OffsetDateTime) -> String {
    t.format(format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    ))
    .unwrap()
}

/// `Retry-After` as an HTTP-date used to be ignored (no wait at all); `x-ratelimit-reset` in
/// milliseconds used to be read as seconds (an hour's wait); any wait is now at most
/// `max_retry_after` (60 s by default; it was an hour).
#[tokio::test]
async fn rate_limit_headers_are_understood_and_clamped() {
    let now = fixed_clock().now_utc();
    let in_5s = now + time::Duration::seconds(5);
    let rows: Vec<(&'static str, String, Option<Duration>, Duration)> = vec![
        ("retry-after", http_date(in_5s), None, Duration::from_secs(5)),
        ("x-ratelimit-reset", (in_5s.unix_timestamp() * 1000).to_string(), None, Duration::from_secs(5)),
        ("x-ratelimit-reset", in_5s.unix_timestamp().to_string(), None, Duration::from_secs(5)),
        ("retry-after", "86400".into(), None, Duration::from_secs(60)),
        ("retry-after", http_date(now + time::Duration::days(400)), None, Duration::from_secs(60)),
        ("x-ratelimit-reset", "99999999999999999".into(), None, Duration::from_secs(60)),
        ("retry-after", "86400".into(), Some(Duration::from_secs(10)), Duration::from_secs(10)),
    ];
    for (name, value, cap, want) in rows {
        let v = value.clone();
        let server = Hostile::start(move |_, _| with_header(reply(429, "{}"), name, &v)).await;
        let mut builder = server.client();
        if let Some(cap) = cap {
            builder = builder.max_retry_after(cap);
        }
        let e = within(builder.build().unwrap().ticker(&pid("BTC-USD"))).await.unwrap_err();
        let got = e.retry_after().unwrap_or_else(|| panic!("{name}: {value} not understood: {e:?}"));
        // Whole seconds on the wire: up to a second less while the clock moves on.
        assert!(
            got <= want && got + Duration::from_secs(1) >= want,
            "{name}: {value}: {got:?}, want {want:?}"
        );
    }
}

/// `retry_backoff * 2u32.pow(attempt - 1)` overflowed (a panic in debug builds) from the 33rd
/// retry on. Now the backoff saturates and is capped by the retry policy's `max_wait`, so 40
/// retries of a 503 take at most 40 × 1 s of (paused) time.
#[tokio::test(start_paused = true)]
async fn many_retries_do_not_overflow_the_backoff() {
    let server = Hostile::always(503, r#"{"error":"UNAVAILABLE","message":"down"}"#).await;
    let policy = RetryPolicy::new(40).max_wait(Duration::from_secs(1));
    let client = server.client().retry_policy(policy).build().unwrap();
    let t0 = tokio::time::Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(120), client.ticker(&pid("BTC-USD")))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, Error::Upstream { status: 503, .. }), "{e:?}");
    assert_eq!(server.hits(), 41);
    // 250 ms, 500 ms, then 1 s for each of the other 38 retries.
    let slept = Duration::from_millis(250 + 500 + 38 * 1000);
    assert!(t0.elapsed() >= slept && t0.elapsed() < slept + Duration::from_secs(1), "{:?}", t0.elapsed());
}

// --- 7. Redirects ------------------------------------------------------------------------

/// A redirect used to be followed (JWT and all) to wherever it pointed, and that server's
/// answer served as the exchange's. Now a 3xx is `Error::Upstream { status: 30x }` and
/// nothing goes to the other server.
#[tokio::test]
async fn redirects_are_refused_not_followed() {
    let elsewhere = Hostile::always(200, ticker_body("BTC-USD", "1", "", "", "2024-04-24T09:56:00Z")).await;
    for status in [301u16, 302, 303, 307, 308] {
        let target = format!("{}/api/v3/brokerage/products/BTC-USD/ticker?limit=1", elsewhere.url());
        let server = Hostile::start(move |_, _| with_header(reply(status, ""), "location", &target)).await;
        let e = within(server.client().build().unwrap().ticker(&pid("BTC-USD"))).await.unwrap_err();
        assert!(matches!(e, Error::Upstream { status: s, .. } if s == status), "{e:?}");
        assert!(e.to_string().contains("redirect refused"), "{e}");
        assert!(!e.is_retryable());
        assert_eq!(server.hits(), 1);
    }
    assert_eq!(elsewhere.hits(), 0, "the redirect target was never contacted");
}

// --- 8. No secret in error text ----------------------------------------------------------

/// A server that echoes the `Authorization` header (whole, as the bare JWT, or its signature)
/// in every kind of error body and in malformed 200 bodies: no error's `Display` or `Debug`
/// contains the token, its signature, or anything JWT-like. Before, up to 160 bytes of a
/// JSON message were quoted, enough for a whole signature.
#[tokio::test]
async fn an_echoed_authorization_header_never_reaches_error_text() {
    let templates: Vec<(u16, &'static str)> = vec![
        (401, r#"{"error":"UNAUTHENTICATED","message":"bad {AUTH}"}"#),
        (401, r#"{"error":"UNAUTHENTICATED","message":"sig {SIG} rejected"}"#),
        (403, r#"{"error":"PERMISSION_DENIED","error_details":"{SIG}","message":""}"#),
        (403, r#"{"error":"{JWT}"}"#),
        (400, r#"{"error":"INVALID_ARGUMENT","message":"{JWT}"}"#),
        (400, r#"{"errors":[{"id":"x","message":"{SIG}"}]}"#),
        (404, r#"{"error":"NOT_FOUND","message":"no {SIG}"}"#),
        (429, r#"{"error":"RATE_LIMIT_EXCEEDED","message":"{AUTH}"}"#),
        (500, r#"{"error":"INTERNAL","message":"{SIG}"}"#),
        (500, "upstream said {AUTH}"),
        (502, "<html><body>{SIG}</body></html>"),
        (200, r#"{"trades":"{JWT}"}"#),
        (200, r#"{"trades":[{"product_id":"BTC-USD","price":"{SIG}","time":"x"}]}"#),
        (200, r#"{"trades":[{"product_id":"{SIG}","price":"1","time":"x"}]}"#),
        (200, r#"{"error":"{JWT}","message":"{SIG}"}"#),
        (200, "{SIG}"),
    ];
    let count = templates.len();
    let server = Hostile::start(move |seen, n| {
        let (status, template) = templates[n % templates.len()];
        let jwt = seen.authorization.trim_start_matches("Bearer ");
        let sig = jwt.rsplit('.').next().unwrap_or_default();
        let body =
            template.replace("{AUTH}", &seen.authorization).replace("{JWT}", jwt).replace("{SIG}", sig);
        with_header(
            reply(status, &body),
            "content-type",
            if body.starts_with('{') { "application/json" } else { "text/plain" },
        )
    })
    .await;
    // One request per answer: no clock sync and retry after the 401s (tests/it/clock.rs).
    let client = server.client().unauthorized_retry(None).build().unwrap();
    let btc = pid("BTC-USD");
    let mut errors = Vec::new();
    for _ in 0..count {
        errors.push(within(client.ticker(&btc)).await.unwrap_err());
    }
    let seen = server.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), count);
    for (e, request) in errors.iter().zip(&seen) {
        let jwt = request.authorization.trim_start_matches("Bearer ");
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3, "{jwt}");
        for text in [e.to_string(), format!("{e:?}")] {
            assert!(!text.contains(jwt), "the token leaked: {text}");
            for part in &parts {
                assert!(!text.contains(&part[..part.len().min(24)]), "a token segment leaked: {text}");
            }
            assert!(!text.contains("eyJ"), "something JWT-like: {text}");
        }
    }
    assert!(matches!(errors[0], Error::Unauthorized(_)), "{:?}", errors[0]);
    assert!(matches!(errors[8], Error::Upstream { status: 500, .. }), "{:?}", errors[8]);
    // Prose around a token survives.
    assert!(errors[1].to_string().contains("sig <redacted> rejected"), "{}", errors[1]);
}

// --- 9. A body cut short -----------------------------------------------------------------

/// A raw server: announces 1,000 bytes, sends 11, closes. reqwest reports that as a decode
/// error, which the client used to pass on as `Error::Decode` (not retried). It is the
/// connection failing: `Error::Transport`, retryable.
#[tokio::test]
async fn a_body_cut_short_is_a_transport_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    let task = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let response = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"trades\":[";
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        }
    });
    let client = CoinbaseClient::builder()
        .base_url(format!("http://{addr}"))
        .credentials(Credentials::generate("organizations/o/apiKeys/k"))
        .unlimited()
        .build()
        .unwrap();
    let e = within(client.ticker(&pid("BTC-USD"))).await.unwrap_err();
    task.abort();
    assert!(matches!(e, Error::Transport(ref m) if m.contains("cut short")), "{e:?}");
    assert!(e.is_retryable());
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}
