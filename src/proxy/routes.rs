//! The paths answered from the cache, in Coinbase's JSON (the wire structs).

use std::{borrow::Cow, cell::RefCell, collections::HashMap, sync::Arc, time::Duration};

use time::OffsetDateTime;
use tokio::{sync::Mutex, time::Instant};

use super::{Shared, TickerAnswer, prefix::UNLIMITED};
use crate::{
    coinbase::{
        API_PREFIX, MAX_CANDLES_PER_REQUEST, MAX_TRADES_PER_REQUEST,
        wire::{
            Accounts, BestBidAsk, Candles, Level, MarketTrades, Money, PriceBook, Product, ProductBook,
            Products, ServerTime, Trade, WireAccount, WireCandle, format_time,
        },
    },
    coordinated::ReadOptions,
    error::Error,
    limiter::EndpointClass,
    model::{Account, CandleRange, Granularity, ProductId, Ticker, from_unix},
    util::inc,
};

/// A cached route, or pass-through (product ids borrowed from the request path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route<'a> {
    Ticker(&'a str),
    Candles(&'a str),
    BestBidAsk,
    ProductBook,
    Products { private: bool },
    Product(&'a str),
    Accounts,
    Time,
    Passthrough,
    Operator,
}

impl Route<'_> {
    pub(super) const NAMES: [&'static str; 10] = [
        "ticker",
        "candles",
        "best_bid_ask",
        "product_book",
        "products",
        "product",
        "accounts",
        "time",
        "passthrough",
        "operator",
    ];

    pub(super) fn index(&self) -> usize {
        match self {
            Route::Ticker(_) => 0,
            Route::Candles(_) => 1,
            Route::BestBidAsk => 2,
            Route::ProductBook => 3,
            Route::Products { .. } => 4,
            Route::Product(_) => 5,
            Route::Accounts => 6,
            Route::Time => 7,
            Route::Passthrough => 8,
            Route::Operator => 9,
        }
    }

    /// The route of a GET to `path` (a non-GET is always passed through).
    pub(super) fn of(path: &str) -> Route<'_> {
        let Some(rest) = path.strip_prefix(API_PREFIX) else {
            return Route::Passthrough;
        };
        // At most five segments matter (`market/products/{id}/candles`); more is pass-through.
        // Split on the byte '/' (always a char boundary): `str::split` with a char pattern
        // costs more than the rest of the routing on these short paths.
        let rest = rest.trim_matches('/');
        let mut parts = [""; 5];
        let mut n = 0;
        let mut start = 0;
        for end in rest.bytes().enumerate().filter_map(|(i, b)| (b == b'/').then_some(i)).chain([rest.len()])
        {
            let Some(slot) = parts.get_mut(n) else { return Route::Passthrough };
            *slot = rest.get(start..end).unwrap_or_default();
            n += 1;
            start = end + 1;
        }
        let segments = &parts[..n];
        let s = match segments {
            ["market", tail @ ..] => tail,
            tail => tail,
        };
        let public = segments.first() == Some(&"market");
        match s {
            ["time"] if !public => Route::Time,
            ["best_bid_ask"] if !public => Route::BestBidAsk,
            ["accounts"] if !public => Route::Accounts,
            ["product_book"] => Route::ProductBook,
            ["products"] => Route::Products { private: !public },
            ["products", p] => Route::Product(p),
            ["products", p, "ticker"] => Route::Ticker(p),
            ["products", p, "candles"] => Route::Candles(p),
            _ => Route::Passthrough,
        }
    }
}

pub(super) use crate::coinbase::reply::{Reply, percent_decoded};

/// The message of the 404 for an unknown or malformed product id, as Coinbase words it.
const PRODUCT_NOT_FOUND: &str = "ProductID is invalid";

impl Reply {
    /// The answer for an error of the coordinated source. Messages are the crate's own (no
    /// secrets: [`Error`]'s messages are scrubbed).
    pub(super) fn from_error(e: &Error) -> Reply {
        match e {
            Error::NotFound(_) => Reply::not_found(PRODUCT_NOT_FOUND),
            Error::InvalidInput(m) => Reply::bad_request(m),
            Error::RateLimited { .. } | Error::Overloaded(_) => {
                Reply::error(429, "RATE_LIMIT_EXCEEDED", "Too many requests")
            }
            Error::Unauthorized(_) => {
                Reply::error(502, "UNAVAILABLE", "the proxy's key was refused upstream")
            }
            Error::Upstream { status, .. } if (400..500).contains(status) => {
                Reply::error(*status, "UNKNOWN", &e.to_string())
            }
            Error::Timeout => Reply::error(504, "DEADLINE_EXCEEDED", &e.to_string()),
            _ => Reply::error(503, "UNAVAILABLE", &e.to_string()),
        }
    }
}

/// A parsed query string: repeated keys kept in order, percent-decoded (borrowed from the
/// request when there is nothing to decode, the common case).
#[derive(Debug, Default)]
pub(super) struct Query<'a>(Vec<(Cow<'a, str>, Cow<'a, str>)>);

impl<'a> Query<'a> {
    pub(super) fn parse(query: Option<&'a str>) -> Query<'a> {
        let pairs = query
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decoded(k), percent_decoded(v))
            })
            .collect();
        Query(pairs)
    }

    fn all<'k>(&'k self, key: &'k str) -> impl Iterator<Item = &'k str> + 'k {
        self.0.iter().filter(move |(k, _)| k == key).map(|(_, v)| v.as_ref())
    }

    pub(super) fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_ref())
    }

    fn int<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, Reply> {
        match self.get(key) {
            None | Some("") => Ok(None),
            Some(v) => v
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| Reply::bad_request(&format!("{key} is not a valid integer"))),
        }
    }

    fn required_int<T: std::str::FromStr>(&self, key: &str) -> Result<T, Reply> {
        self.int(key)?.ok_or_else(|| Reply::bad_request(&format!("{key} is required")))
    }
}

/// The product list, cached; concurrent misses wait for one fetch (the async mutex is held
/// across the fetch on purpose: that is the single flight).
#[derive(Debug)]
pub(super) struct ProductsCache {
    ttl: Duration,
    slot: Mutex<Option<(Instant, Arc<Vec<Product>>)>>,
}

impl ProductsCache {
    pub(super) fn new(ttl: Duration) -> Self {
        ProductsCache { ttl, slot: Mutex::new(None) }
    }

    async fn get(&self, shared: &Shared) -> Result<Arc<Vec<Product>>, Error> {
        let mut slot = self.slot.lock().await;
        if let Some((at, list)) = &*slot
            && at.elapsed() < self.ttl
        {
            return Ok(Arc::clone(list));
        }
        inc(&shared.counters.products_upstream);
        match shared.forwarder.gated(shared.client.market_data_class(), shared.client.products()).await {
            Ok(list) => {
                let list = Arc::new(list);
                *slot = Some((Instant::now(), Arc::clone(&list)));
                Ok(list)
            }
            // The stale contract, as for the source: an old list beats none.
            Err(e) if e.allows_stale() => match &*slot {
                Some((_, list)) => Ok(Arc::clone(list)),
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }
}

/// The exchange's clock minus ours, refreshed every minute.
#[derive(Debug, Default)]
pub(super) struct TimeOffset {
    slot: Mutex<Option<(Instant, time::Duration)>>,
}

impl TimeOffset {
    async fn now(&self, shared: &Shared) -> Result<OffsetDateTime, Error> {
        let mut slot = self.slot.lock().await;
        let fresh = slot.filter(|(at, _)| at.elapsed() < Duration::from_secs(60));
        let offset = match (fresh, *slot) {
            (Some((_, off)), _) => off,
            (None, old) => {
                inc(&shared.counters.time_upstream);
                match shared.forwarder.gated(EndpointClass::Public, shared.client.server_time()).await {
                    Ok(t) => {
                        let off = t - shared.clock.now_utc();
                        *slot = Some((Instant::now(), off));
                        off
                    }
                    Err(e) => match old {
                        Some((_, off)) => off,
                        None => return Err(e),
                    },
                }
            }
        };
        Ok(shared.clock.now_utc() + offset)
    }
}

fn product(id: &str) -> Result<ProductId, Reply> {
    ProductId::new(id).map_err(|_| Reply::not_found(PRODUCT_NOT_FOUND))
}

fn dec(d: Option<rust_decimal::Decimal>) -> String {
    d.map(|d| d.to_string()).unwrap_or_default()
}

/// Answer a cached route (`None`: pass it through after all).
pub(super) async fn answer(route: Route<'_>, query: &Query<'_>, shared: &Shared) -> Option<Reply> {
    let result = match route {
        Route::Ticker(p) => match query.int::<u32>("limit") {
            // More trades than one request may ask for: the exchange answers that.
            Ok(Some(l)) if l > MAX_TRADES_PER_REQUEST => return None,
            Ok(Some(0)) => Err(Reply::bad_request("limit must be at least 1")),
            Ok(Some(l)) if l > 1 || shared.ticker_answer == TickerAnswer::Trades => {
                Box::pin(recent_trades(p, l, shared)).await
            }
            limit => ticker(p, limit, shared).await,
        },
        Route::Candles(p) => Box::pin(candles(p, query, shared)).await,
        Route::BestBidAsk => Box::pin(best_bid_ask(query, shared)).await,
        // Grouped by price increment: a book of another shape, the exchange answers it.
        Route::ProductBook if query.get("aggregation_price_increment").is_some_and(|v| !v.is_empty()) => {
            return None;
        }
        Route::ProductBook => Box::pin(product_book(query, shared)).await,
        Route::Products { private } => Box::pin(products(private, query, shared)).await,
        Route::Product(p) => Box::pin(one_product(p, shared)).await,
        Route::Accounts => Box::pin(accounts(query, shared)).await,
        Route::Time => Box::pin(time_now(shared)).await,
        Route::Passthrough | Route::Operator => return None,
    };
    Some(result.unwrap_or_else(|r| r))
}

fn trades_of(t: &Ticker) -> MarketTrades {
    let trade = Trade {
        trade_id: String::new(),
        product_id: t.product.to_string(),
        price: t.price.to_string(),
        size: String::new(),
        time: format_time(t.time),
        side: String::new(),
        bid: Some(String::new()),
        ask: Some(String::new()),
        exchange: None,
    };
    MarketTrades { trades: vec![trade], best_bid: dec(t.best_bid), best_ask: dec(t.best_ask) }
}

/// A ticker request answered with the exchange's own trades, from the trades cache.
async fn recent_trades(p: &str, limit: u32, shared: &Shared) -> Result<Reply, Reply> {
    let id = product(p)?;
    let (client, forwarder) = (shared.client.clone(), Arc::clone(&shared.forwarder));
    let fetch = move |p: ProductId, want: u32| async move {
        forwarder.gated(client.market_data_class(), client.recent_trades(&p, want)).await
    };
    let (served, fetched) = shared.trades.get(&id, limit, fetch).await;
    if fetched {
        inc(&shared.counters.trades_upstream);
    }
    let mut body = MarketTrades::from(&*served.map_err(|e| Reply::from_error(&e))?);
    body.trades.truncate(limit as usize);
    Ok(Reply::json(200, &body))
}

/// `product_book?product_id=..[&limit=N]`, from the book cache. A `limit` of 0 is no limit,
/// as upstream (a proto3 field cannot tell 0 from none).
async fn product_book(q: &Query<'_>, shared: &Shared) -> Result<Reply, Reply> {
    let id = q.get("product_id").filter(|p| !p.trim().is_empty());
    let id = product(id.ok_or_else(|| Reply::bad_request("product_id is required"))?)?;
    let limit = match q.int::<u32>("limit")? {
        None | Some(0) => UNLIMITED,
        Some(l) => l,
    };
    let (client, forwarder) = (shared.client.clone(), Arc::clone(&shared.forwarder));
    let fetch = move |p: ProductId, want: u32| async move {
        let limit = (want != UNLIMITED).then_some(want);
        forwarder.gated(client.market_data_class(), client.order_book(&p, limit)).await
    };
    let (served, fetched) = shared.books.get(&id, limit, fetch).await;
    if fetched {
        inc(&shared.counters.books_upstream);
    }
    let book = served.map_err(|e| Reply::from_error(&e))?;
    Ok(Reply::json(200, &ProductBook::of(&book, limit as usize)))
}

/// A one-trade ticker request answered from the coordinated source's batched tickers.
/// `limit` as [`answer`] parsed it (required, as upstream; checked after the product).
async fn ticker(p: &str, limit: Result<Option<u32>, Reply>, shared: &Shared) -> Result<Reply, Reply> {
    let id = product(p)?;
    limit?.ok_or_else(|| Reply::bad_request("limit is required"))?;
    let t =
        shared.source.ticker_with(&id, ReadOptions::default()).await.map_err(|e| Reply::from_error(&e))?;
    Ok(TickerBodies::reply(&t.value))
}

/// The last one-trade ticker body answered for each product, with the ticker it was made from:
/// while the cached ticker stays the same, a request costs a comparison and a copy instead of a
/// serialization (two thirds of the proxy's own work per cached ticker request, measured with
/// callgrind). Bounded: at most [`TickerBodies::MAX`] products per thread, then it starts over.
///
/// One memo per thread, not one behind a lock: a lock is a cache line that every worker writes
/// on every request. A body is a function of its ticker alone, so a memo shared by all the
/// proxies a thread serves is as right as one per proxy.
pub(super) struct TickerBodies;

/// A body and the ticker it was made from.
type MadeFrom = (Ticker, Box<[u8]>);

thread_local! {
    static TICKER_BODIES: RefCell<HashMap<ProductId, MadeFrom>> = RefCell::new(HashMap::new());
}

impl TickerBodies {
    /// Products remembered at most, per thread (only products the source answered for).
    const MAX: usize = 4096;

    fn reply(t: &Ticker) -> Reply {
        let seen = TICKER_BODIES.with_borrow(|memo| {
            memo.get(&t.product).filter(|(seen, _)| seen == t).map(|(_, body)| body.to_vec())
        });
        if let Some(body) = seen {
            return Reply { status: 200, content_type: "application/json", body };
        }
        let r = Reply::json(200, &trades_of(t));
        if r.status == 200 {
            TICKER_BODIES.with_borrow_mut(|memo| {
                if memo.len() >= Self::MAX && !memo.contains_key(&t.product) {
                    memo.clear();
                }
                memo.insert(t.product.clone(), (t.clone(), r.body.clone().into_boxed_slice()));
            });
        }
        r
    }
}

async fn candles(p: &str, q: &Query<'_>, shared: &Shared) -> Result<Reply, Reply> {
    let id = product(p)?;
    let start: i64 = q.required_int("start")?;
    let end: i64 = q.required_int("end")?;
    let g: Granularity = q
        .get("granularity")
        .ok_or_else(|| Reply::bad_request("granularity is required"))?
        .parse()
        .map_err(|e: Error| Reply::bad_request(&e.to_string()))?;
    let limit: Option<u32> = q.int("limit")?;
    if matches!(limit, Some(l) if l == 0 || l > MAX_CANDLES_PER_REQUEST) {
        return Err(Reply::bad_request("limit must be between 1 and 350"));
    }
    if end < start {
        return Err(Reply::bad_request("end must not be before start"));
    }
    if (end - start) / g.seconds() + 1 > i64::from(MAX_CANDLES_PER_REQUEST) {
        return Err(Reply::bad_request(
            "start and end argument is invalid - number of candles requested should be less than 350",
        ));
    }
    // Inclusive bounds on the wire, never past now (a future window is empty upstream too).
    let now = shared.clock.now_utc().unix_timestamp();
    let last = end.min(now);
    if last < start {
        return Ok(Reply::json(200, &Candles { candles: Vec::new() }));
    }
    let range = CandleRange::new(from_unix(start), from_unix(last + 1))
        .map_err(|e| Reply::bad_request(&e.to_string()))?;
    let mut got = shared
        .source
        .candles_with(&id, g, range, ReadOptions::default())
        .await
        .map_err(|e| Reply::from_error(&e))?;
    // Coinbase's wire format cannot carry `Fresh::provisional`: rather than serve a candle that
    // has just closed as if it were final, wait for the refresh that brings it (data fetched
    // since the close only).
    if let Some(p) = got.provisional {
        let since_close = shared.clock.now_utc() - (p.start + g.duration());
        let max_age = std::time::Duration::try_from(since_close).unwrap_or_default();
        got = shared
            .source
            .candles_with(&id, g, range, ReadOptions::max_age(max_age))
            .await
            .map_err(|e| Reply::from_error(&e))?;
    }
    let mut candles: Vec<WireCandle> = got
        .value
        .iter()
        .rev()
        .filter(|c| (start..=last).contains(&c.start.unix_timestamp()))
        .map(WireCandle::from)
        .collect();
    if let Some(l) = limit {
        candles.truncate(l as usize);
    }
    Ok(Reply::json(200, &Candles { candles }))
}

async fn best_bid_ask(q: &Query<'_>, shared: &Shared) -> Result<Reply, Reply> {
    let mut ids: Vec<ProductId> = q.all("product_ids").filter_map(|p| ProductId::new(p).ok()).collect();
    if q.all("product_ids").next().is_none() {
        let list = shared.products.get(shared).await.map_err(|e| Reply::from_error(&e))?;
        ids = list.iter().filter_map(|p| ProductId::new(&p.product_id).ok()).collect();
    }
    let mut pricebooks = Vec::with_capacity(ids.len());
    for (_, r) in shared.source.tickers_with(&ids, ReadOptions::default()).await {
        match r {
            Ok(f) => {
                let t = f.value;
                let level = |p: Option<rust_decimal::Decimal>| {
                    p.map(|p| Level { price: p.to_string(), size: String::new() }).into_iter().collect()
                };
                pricebooks.push(PriceBook {
                    product_id: t.product.to_string(),
                    bids: level(t.best_bid),
                    asks: level(t.best_ask),
                    time: format_time(t.time),
                });
            }
            Err(Error::NotFound(_)) => {}
            Err(e) => return Err(Reply::from_error(&e)),
        }
    }
    Ok(Reply::json(200, &BestBidAsk { pricebooks }))
}

async fn products(private: bool, q: &Query<'_>, shared: &Shared) -> Result<Reply, Reply> {
    let list = shared.products.get(shared).await.map_err(|e| Reply::from_error(&e))?;
    let wanted: Vec<&str> = q.all("product_ids").collect();
    let kind = q.get("product_type").map(str::to_ascii_uppercase);
    let offset: usize = q.int("offset")?.unwrap_or(0);
    let limit: Option<usize> = q.int("limit")?.filter(|l| *l > 0);
    let selected: Vec<Product> = list
        .iter()
        .filter(|p| wanted.is_empty() || wanted.contains(&p.product_id.as_str()))
        .filter(|p| match kind.as_deref() {
            None | Some("UNKNOWN_PRODUCT_TYPE") => true,
            Some(k) => p.product_type.is_empty() || p.product_type.eq_ignore_ascii_case(k),
        })
        .skip(offset)
        .take(limit.unwrap_or(usize::MAX))
        .cloned()
        .collect();
    let n = selected.len();
    let pagination = private.then(
        || serde_json::json!({"prev_cursor": "", "next_cursor": "", "has_next": false, "has_prev": false}),
    );
    Ok(Reply::json(200, &Products { products: selected, num_products: n.into(), pagination }))
}

async fn one_product(p: &str, shared: &Shared) -> Result<Reply, Reply> {
    let list = shared.products.get(shared).await.map_err(|e| Reply::from_error(&e))?;
    match list.iter().find(|x| x.product_id == p) {
        Some(found) => Ok(Reply::json(200, found)),
        None => Err(Reply::not_found(PRODUCT_NOT_FOUND)),
    }
}

fn wire_account(a: &Account) -> WireAccount {
    let money = |d: rust_decimal::Decimal| Money { value: d.to_string(), currency: a.currency.clone() };
    WireAccount {
        uuid: a.uuid.clone(),
        name: a.name.clone(),
        currency: a.currency.clone(),
        available_balance: money(a.available),
        default: false,
        active: a.active,
        created_at: String::new(),
        updated_at: String::new(),
        deleted_at: None,
        account_type: a.account_type.clone(),
        ready: true,
        hold: Some(money(a.hold)),
        retail_portfolio_id: None,
        platform: None,
    }
}

async fn accounts(q: &Query<'_>, shared: &Shared) -> Result<Reply, Reply> {
    let limit = match q.int::<usize>("limit")? {
        None | Some(0) => 49,
        Some(l) => l.min(250),
    };
    let from: usize = match q.get("cursor").map(str::trim) {
        None | Some("") => 0,
        Some(c) => c.parse().map_err(|_| Reply::bad_request("cursor is invalid"))?,
    };
    let all = shared.source.accounts_with(ReadOptions::default()).await.map_err(|e| Reply::from_error(&e))?;
    let all = &all.value;
    let page: Vec<WireAccount> = all.iter().skip(from).take(limit).map(wire_account).collect();
    let next = from + page.len();
    let has_next = next < all.len();
    let size = i64::try_from(page.len()).unwrap_or(i64::MAX);
    Ok(Reply::json(
        200,
        &Accounts {
            accounts: page,
            has_next,
            cursor: if has_next { next.to_string() } else { String::new() },
            size,
        },
    ))
}

async fn time_now(shared: &Shared) -> Result<Reply, Reply> {
    let t = shared.time.now(shared).await.map_err(|e| Reply::from_error(&e))?;
    let ms = t.unix_timestamp_nanos() / 1_000_000;
    let iso = format!("{}Z", format_time(t).split('.').next().unwrap_or_default());
    Ok(Reply::json(
        200,
        &ServerTime { iso, epoch_seconds: t.unix_timestamp().to_string(), epoch_millis: ms.to_string() },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_table() {
        // Leaked: a route borrows its path, and these few test strings may live forever.
        let p = |s: &str| Route::of(String::leak(format!("{API_PREFIX}{s}")));
        assert_eq!(p("/market/products/BTC-USD/ticker"), Route::Ticker("BTC-USD"));
        assert_eq!(p("/products/BTC-USD/ticker"), Route::Ticker("BTC-USD"));
        assert_eq!(p("/products/BTC-USD/candles"), Route::Candles("BTC-USD"));
        assert_eq!(p("/products"), Route::Products { private: true });
        assert_eq!(p("/market/products"), Route::Products { private: false });
        assert_eq!(p("/products/ETH-USD"), Route::Product("ETH-USD"));
        assert_eq!(p("/accounts"), Route::Accounts);
        assert_eq!(p("/market/accounts"), Route::Passthrough);
        assert_eq!(p("/time"), Route::Time);
        assert_eq!(p("/best_bid_ask"), Route::BestBidAsk);
        assert_eq!(p("/orders"), Route::Passthrough);
        assert_eq!(p("/accounts/abc"), Route::Passthrough);
        assert_eq!(Route::of("/v2/currencies"), Route::Passthrough);
        // Longer than any cached path: pass-through, not a truncated match.
        assert_eq!(p("/market/products/BTC-USD/candles/x/y"), Route::Passthrough);
        assert_eq!(p("/products/BTC-USD/ticker/extra"), Route::Passthrough);
        // Slashes: trimmed at the ends, an empty segment inside (an empty product id).
        assert_eq!(p("/products/BTC-USD/ticker/"), Route::Ticker("BTC-USD"));
        assert_eq!(p("//products/BTC-USD//"), Route::Product("BTC-USD"));
        assert_eq!(p("/products//ticker"), Route::Ticker(""));
        assert_eq!(Route::of(API_PREFIX), Route::Passthrough);
        assert_eq!(p("/products/BTC-USDé/ticker"), Route::Ticker("BTC-USDé"));
    }

    #[test]
    fn ticker_bodies_follow_the_ticker() {
        let t = |price: i64| Ticker {
            product: "BTC-USD".parse().unwrap(),
            price: rust_decimal::Decimal::new(price, 0),
            best_bid: Some(rust_decimal::Decimal::new(price - 1, 0)),
            best_ask: None,
            time: OffsetDateTime::UNIX_EPOCH,
            price_kind: crate::model::PriceKind::LastTrade,
        };
        let fresh = |t: &Ticker| Reply::json(200, &trades_of(t));
        let (a, b) = (t(100), t(101));
        assert_eq!(TickerBodies::reply(&a), fresh(&a));
        // The remembered body, while the ticker is the same one.
        assert_eq!(TickerBodies::reply(&a), fresh(&a));
        // A new ticker is a new body, never the remembered one.
        assert_eq!(TickerBodies::reply(&b), fresh(&b));
        assert_ne!(TickerBodies::reply(&b).body, fresh(&a).body);
        let moved = Ticker { time: OffsetDateTime::UNIX_EPOCH + time::Duration::SECOND, ..b.clone() };
        assert_eq!(TickerBodies::reply(&moved), fresh(&moved));
    }

    #[test]
    fn queries_decode() {
        let q = Query::parse(Some("product_ids=BTC-USD&product_ids=ETH%2DUSD&x=%zz&y=%4"));
        assert_eq!(q.all("product_ids").collect::<Vec<_>>(), ["BTC-USD", "ETH-USD"]);
        assert_eq!(q.get("x"), Some("%zz"));
        assert_eq!(q.get("y"), Some("%4"));
        let q = Query::parse(Some("limit=1&a=b+c&&k"));
        assert_eq!((q.get("limit"), q.get("a"), q.get("k")), (Some("1"), Some("b c"), Some("")));
        assert!(matches!(q.0[0].1, Cow::Borrowed(_)), "nothing to decode, nothing copied");
    }
}
