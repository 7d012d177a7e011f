//! The Coinbase-shaped endpoints: routing, query parsing and the JSON bodies.
//!
//! Bodies are built from the structs in [`crate::coinbase::wire`], the same ones the client
//! decodes, so the two cannot drift apart. Every handler is synchronous and pure given the
//! request, the market, the accounts and the current time.

use std::collections::HashSet;

use rust_decimal::Decimal;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use super::{
    API_BASE_PATH, BOOK_DEPTH, CandleLimit, DEFAULT_ACCOUNTS_LIMIT, Endpoint, MAX_ACCOUNTS_LIMIT,
    MAX_CANDLES, MAX_TRADES, SimAccount,
    market::{Market, ProductSpec, mix, unix_ms},
    stats::CandleRequest,
};
use crate::{
    coinbase::wire::{
        Accounts, BestBidAsk, Candles, Level, MarketTrades, Money, PriceBook, Product, ProductBook, Products,
        ServerTime, Trade, WireAccount, WireCandle, format_time,
    },
    model::{Candle, Granularity, ProductId},
};

/// The largest UNIX second accepted in a query (9999-12-31T23:59:59Z).
const MAX_UNIX: i64 = 253_402_300_799;

/// The message of the 404 for an unknown or malformed product id.
pub(crate) const PRODUCT_NOT_FOUND: &str = "ProductID is invalid";

pub(crate) use crate::coinbase::reply::{Reply, percent_decode};

/// The gRPC-style error id Coinbase uses for an HTTP status.
pub(crate) fn error_id(status: u16) -> &'static str {
    match status {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        408 | 504 => "DEADLINE_EXCEEDED",
        429 => "RATE_LIMIT_EXCEEDED",
        500 => "INTERNAL",
        501 => "UNIMPLEMENTED",
        502 | 503 => "UNAVAILABLE",
        _ => "UNKNOWN",
    }
}

/// Match `path` to an endpoint and its product id segment (percent-decoded).
pub(crate) fn route(path: &str) -> Option<(Endpoint, Option<String>)> {
    let rest = path.strip_prefix(API_BASE_PATH)?.strip_prefix('/')?;
    let segments: Vec<&str> = rest.split('/').collect();
    let id = |s: &str| Some(percent_decode(s));
    Some(match segments.as_slice() {
        ["time"] => (Endpoint::Time, None),
        ["best_bid_ask"] => (Endpoint::BestBidAsk, None),
        ["accounts"] => (Endpoint::Accounts, None),
        ["product_book"] => (Endpoint::ProductBook, None),
        ["market", "product_book"] => (Endpoint::MarketProductBook, None),
        ["market", "products"] => (Endpoint::MarketProducts, None),
        ["market", "products", p] => (Endpoint::MarketProduct, id(p)),
        ["market", "products", p, "ticker"] => (Endpoint::MarketTicker, id(p)),
        ["market", "products", p, "candles"] => (Endpoint::MarketCandles, id(p)),
        ["products"] => (Endpoint::Products, None),
        ["products", p] => (Endpoint::Product, id(p)),
        ["products", p, "ticker"] => (Endpoint::Ticker, id(p)),
        ["products", p, "candles"] => (Endpoint::Candles, id(p)),
        ["orders", "historical", "batch"] => (Endpoint::ListOrders, None),
        ["orders", "historical", "fills"] => (Endpoint::ListFills, None),
        ["orders", "historical", o] => (Endpoint::GetOrder, id(o)),
        _ => return None,
    })
}

/// Match a `POST` to an order endpoint.
pub(crate) fn route_post(path: &str) -> Option<Endpoint> {
    match path.strip_prefix(API_BASE_PATH)? {
        "/orders" => Some(Endpoint::CreateOrder),
        "/orders/batch_cancel" => Some(Endpoint::CancelOrders),
        "/orders/edit" => Some(Endpoint::EditOrder),
        "/orders/preview" => Some(Endpoint::PreviewOrder),
        _ => None,
    }
}

/// A parsed query string: `key=value` pairs in order, keys may repeat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    pub(crate) fn parse(query: Option<&str>) -> Query {
        let pairs = query
            .unwrap_or_default()
            .split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect();
        Query { pairs }
    }

    /// Every value of `key`, in order.
    pub(crate) fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.pairs.iter().filter(move |(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The first value of `key`.
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn int<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, Reply> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| Reply::bad_request(&format!("{key} is not a valid integer: {}", shown(v)))),
        }
    }

    fn required_int<T: std::str::FromStr>(&self, key: &str) -> Result<T, Reply> {
        self.int(key)?.ok_or_else(|| Reply::bad_request(&format!("{key} is required")))
    }

    /// A boolean, case-insensitively (`true`, `True`, `FALSE`, ...).
    fn bool(&self, key: &str) -> Result<Option<bool>, Reply> {
        match self.get(key) {
            None => Ok(None),
            Some(v) if v.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(v) if v.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(v) => Err(Reply::bad_request(&format!("{key} is not a valid boolean: {}", shown(v)))),
        }
    }
}

/// A user value quoted and cut for an error message.
pub(super) fn shown(v: &str) -> String {
    format!("{:?}", crate::error::truncate(v, 40))
}

/// Everything a handler may read.
#[derive(Debug)]
pub(crate) struct Ctx<'a> {
    pub(crate) market: &'a Market,
    pub(crate) accounts: &'a [SimAccount],
    pub(crate) seed: u64,
    pub(crate) candle_limit: CandleLimit,
    pub(crate) now: OffsetDateTime,
    /// How far the exchange's own clock (what `/time` says) is ahead of the market's.
    pub(crate) skew: time::Duration,
}

/// The answer of a handler, and the candle request to log if it served one.
#[derive(Debug)]
pub(crate) struct Handled {
    pub(crate) reply: Reply,
    pub(crate) candle: Option<CandleRequest>,
}

impl From<Reply> for Handled {
    fn from(reply: Reply) -> Self {
        Handled { reply, candle: None }
    }
}

/// Answer one request to `endpoint`.
pub(crate) fn handle(endpoint: Endpoint, product: Option<&str>, query: &Query, ctx: &Ctx<'_>) -> Handled {
    let spec = product.map(|id| ctx.market.get(id));
    let result = match (endpoint, spec) {
        (_, Some(None)) => Err(Reply::not_found(PRODUCT_NOT_FOUND)),
        (Endpoint::Time, _) => Ok(time(ctx)),
        (Endpoint::BestBidAsk, _) => Ok(best_bid_ask(query, ctx)),
        (Endpoint::Accounts, _) => accounts(query, ctx),
        (Endpoint::MarketProductBook | Endpoint::ProductBook, _) => product_book(query, ctx),
        (Endpoint::MarketProducts | Endpoint::Products, _) => {
            products(endpoint == Endpoint::Products, query, ctx)
        }
        (Endpoint::MarketProduct | Endpoint::Product, Some(Some(p))) => {
            Ok(Reply::json(200, &product_object(p, ctx)))
        }
        (Endpoint::MarketTicker | Endpoint::Ticker, Some(Some(p))) => ticker(p, query, ctx),
        (Endpoint::MarketCandles | Endpoint::Candles, Some(Some(p))) => {
            return candles(endpoint, p, query, ctx).unwrap_or_else(Handled::from);
        }
        _ => Err(Reply::not_found(PRODUCT_NOT_FOUND)),
    };
    result.unwrap_or_else(|e| e).into()
}

fn time(ctx: &Ctx<'_>) -> Reply {
    let t = ctx.now + ctx.skew;
    let ms = unix_ms(t);
    let iso = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    Reply::json(
        200,
        &ServerTime { iso, epoch_seconds: ms.div_euclid(1000).to_string(), epoch_millis: ms.to_string() },
    )
}

fn ticker(p: &ProductSpec, q: &Query, ctx: &Ctx<'_>) -> Result<Reply, Reply> {
    let limit: u32 = q.required_int("limit")?;
    // `start` and `end` are accepted (and must be integers) but do not change the answer.
    q.int::<i64>("start")?;
    q.int::<i64>("end")?;
    let m = ctx.market;
    let now_ms = unix_ms(ctx.now);
    let (bid, ask) = m.bid_ask(p, now_ms);
    let trades = (0..u64::from(limit.min(MAX_TRADES)))
        .map(|k| {
            let (ms, time) = if k == 0 {
                (now_ms, ctx.now)
            } else {
                let ms = now_ms - (k as i64) * 1000 - m.trade_gap_ms(p, now_ms, k);
                (ms, from_ms(ms))
            };
            Trade {
                trade_id: ms.to_string(),
                product_id: p.id.to_string(),
                price: m.price(p, ms).to_string(),
                size: m.size(p, 0x7A, now_ms, k).to_string(),
                time: format_time(time),
                side: if m.is_buy(p, now_ms, k) { "BUY" } else { "SELL" }.into(),
                bid: Some(String::new()),
                ask: Some(String::new()),
                exchange: None,
            }
        })
        .collect();
    Ok(Reply::json(200, &MarketTrades { trades, best_bid: bid.to_string(), best_ask: ask.to_string() }))
}

fn from_ms(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn candles(endpoint: Endpoint, p: &ProductSpec, q: &Query, ctx: &Ctx<'_>) -> Result<Handled, Reply> {
    let start: i64 = q.required_int("start")?;
    let end: i64 = q.required_int("end")?;
    let granularity = q.get("granularity").ok_or_else(|| Reply::bad_request("granularity is required"))?;
    let granularity: Granularity = granularity
        .parse()
        .map_err(|_| Reply::bad_request(&format!("granularity is invalid: {}", shown(granularity))))?;
    let limit: Option<u32> = q.int("limit")?;
    if matches!(limit, Some(l) if l == 0 || i64::from(l) > MAX_CANDLES) {
        return Err(Reply::bad_request(&format!("limit must be between 1 and {MAX_CANDLES}")));
    }
    if !(0..=MAX_UNIX).contains(&start) || !(0..=MAX_UNIX).contains(&end) {
        return Err(Reply::bad_request("start and end must be valid UNIX seconds"));
    }
    if end < start {
        return Err(Reply::bad_request("start must not be after end"));
    }
    let g = granularity.seconds();
    // Inclusive bounds: `(end - start) / g + 1` buckets; the observed rule, "(end - start) / g
    // < 300", is the same as at most 300 of them.
    if (end - start) / g + 1 > ctx.candle_limit.max_buckets() {
        return Err(Reply::bad_request(ctx.candle_limit.error_details()));
    }
    let now_ms = unix_ms(ctx.now);
    let first = start + (g - start.rem_euclid(g)) % g;
    let mut out: Vec<Candle> = (0..)
        .map(|k| first + k * g)
        .take_while(|&s| s <= end)
        .map_while(|s| ctx.market.candle(p, granularity, s, now_ms))
        .collect();
    out.reverse(); // newest first
    if let Some(l) = limit {
        out.truncate(l as usize);
    }
    let candles = out.iter().map(WireCandle::from).collect();
    Ok(Handled {
        reply: Reply::json(200, &Candles { candles }),
        candle: Some(CandleRequest {
            endpoint: endpoint.name(),
            product: p.id.clone(),
            granularity,
            start,
            end,
            limit,
        }),
    })
}

/// `product_book`: [`BOOK_DEPTH`] levels a side, at widening gaps from the best bid and ask
/// of the moment (the same as `best_bid_ask`'s, sizes included), grouped by
/// `aggregation_price_increment` when given (bids rounded down, asks up, sizes summed), then
/// cut to `limit` levels a side.
fn product_book(q: &Query, ctx: &Ctx<'_>) -> Result<Reply, Reply> {
    let id = q.get("product_id").filter(|s| !s.trim().is_empty());
    let id = id.ok_or_else(|| Reply::bad_request("product_id is required"))?;
    let m = ctx.market;
    let p = m.get(id).ok_or_else(|| Reply::not_found(PRODUCT_NOT_FOUND))?;
    let limit = match q.int::<u32>("limit")? {
        None | Some(0) => BOOK_DEPTH,
        Some(l) => l.min(BOOK_DEPTH),
    };
    let tick = p.quote_increment();
    let step = match q.get("aggregation_price_increment").map(str::trim) {
        None | Some("") => tick,
        Some(v) => match v.parse::<Decimal>() {
            Ok(d) if d > Decimal::ZERO => d.max(tick),
            _ => {
                return Err(Reply::bad_request(&format!(
                    "aggregation_price_increment is invalid: {}",
                    shown(v)
                )));
            }
        },
    };
    let now_ms = unix_ms(ctx.now);
    let (bid, ask) = m.bid_ask(p, now_ms);
    let side = |top: Decimal, sign: Decimal, tag: u64, round: fn(Decimal, Decimal) -> Decimal| {
        let mut out: Vec<(Decimal, Decimal)> = Vec::new();
        for k in 0..u64::from(BOOK_DEPTH) {
            // Level k sits k(k+3)/4 increments (integer division) from the top: dense near
            // it, sparser deeper, some 1 % of the price away at the bottom of the book.
            let raw = top + sign * tick * Decimal::from(k * (k + 3) / 4);
            let price = round(raw, step);
            if price <= Decimal::ZERO {
                break;
            }
            let size = m.size(p, tag, now_ms, k);
            match out.last_mut() {
                Some((last, sum)) if *last == price => *sum += size,
                _ => out.push((price, size)),
            }
        }
        out.truncate(limit as usize);
        out.into_iter()
            .map(|(price, size)| Level { price: price.to_string(), size: size.to_string() })
            .collect()
    };
    let down = |x: Decimal, step: Decimal| ((x / step).floor() * step).normalize().max(Decimal::ZERO);
    let up = |x: Decimal, step: Decimal| ((x / step).ceil() * step).normalize();
    let mid = (bid + ask) / Decimal::TWO;
    let spread = ask - bid;
    let book = ProductBook {
        pricebook: PriceBook {
            product_id: p.id.to_string(),
            bids: side(bid, Decimal::NEGATIVE_ONE, 0xB1, down),
            asks: side(ask, Decimal::ONE, 0xA5, up),
            time: format_time(ctx.now),
        },
        last: Some(m.price(p, now_ms).to_string()),
        mid_market: Some(mid.normalize().to_string()),
        spread_bps: Some((spread / mid * Decimal::from(10_000)).round_dp(4).normalize().to_string()),
        spread_absolute: Some(spread.to_string()),
    };
    Ok(Reply::json(200, &book))
}

fn best_bid_ask(q: &Query, ctx: &Ctx<'_>) -> Reply {
    let m = ctx.market;
    let now_ms = unix_ms(ctx.now);
    let mut seen = HashSet::new();
    let requested: Vec<&ProductSpec> =
        q.all("product_ids").filter(|id| seen.insert(*id)).filter_map(|id| m.get(id)).collect();
    let selected: Vec<&ProductSpec> = if seen.is_empty() { m.products().iter().collect() } else { requested };
    let time = format_time(ctx.now);
    let pricebooks = selected
        .into_iter()
        .map(|p| {
            let (bid, ask) = m.bid_ask(p, now_ms);
            PriceBook {
                product_id: p.id.to_string(),
                bids: vec![Level { price: bid.to_string(), size: m.size(p, 0xB1, now_ms, 0).to_string() }],
                asks: vec![Level { price: ask.to_string(), size: m.size(p, 0xA5, now_ms, 0).to_string() }],
                time: time.clone(),
            }
        })
        .collect();
    Reply::json(200, &BestBidAsk { pricebooks })
}

fn products(private: bool, q: &Query, ctx: &Ctx<'_>) -> Result<Reply, Reply> {
    let m = ctx.market;
    q.bool("get_all_products")?;
    q.bool("get_tradability_status")?;
    let limit = q.int::<u32>("limit")?.unwrap_or(0) as usize;
    let offset = q.int::<u32>("offset")?.unwrap_or(0) as usize;
    let spot = match q.get("product_type") {
        None => true,
        Some(t) if t.eq_ignore_ascii_case("SPOT") => true,
        Some(t) if t.eq_ignore_ascii_case("UNKNOWN_PRODUCT_TYPE") => true,
        Some(t) if t.eq_ignore_ascii_case("FUTURE") => false,
        Some(t) => {
            return Err(Reply::bad_request(&format!("product_type is invalid: {}", shown(t))));
        }
    };
    let mut seen = HashSet::new();
    let requested: Vec<&ProductSpec> =
        q.all("product_ids").filter(|id| seen.insert(*id)).filter_map(|id| m.get(id)).collect();
    let selected: Vec<&ProductSpec> = match (spot, seen.is_empty()) {
        (false, _) => Vec::new(),
        (true, true) => m.products().iter().collect(),
        (true, false) => requested,
    };
    let total = selected.len();
    let page: Vec<Product> = selected
        .into_iter()
        .skip(offset)
        .take(if limit == 0 { usize::MAX } else { limit })
        .map(|p| product_object(p, ctx))
        .collect();
    let has_next = limit != 0 && offset.saturating_add(limit) < total;
    let pagination = private.then(|| {
        json!({
            "prev_cursor": "",
            "next_cursor": "",
            "has_next": has_next,
            "has_prev": offset > 0,
        })
    });
    Ok(Reply::json(200, &Products { products: page, num_products: Value::from(total), pagination }))
}

/// The full product object of §2.5.
fn product_object(p: &ProductSpec, ctx: &Ctx<'_>) -> Product {
    let m = ctx.market;
    let now_ms = unix_ms(ctx.now);
    let price = m.price(p, now_ms);
    let before = m.price(p, now_ms.saturating_sub(86_400_000));
    let change = percent_change(price, before);
    let (volume, volume_before) = m.volume_24h(p, now_ms);
    let volume_change = percent_change(volume, volume_before);
    let quote_volume = volume.checked_mul(price).map_or(Decimal::ZERO, |v| v.round_dp(2));
    let (base, quote) = (p.id.base(), p.id.quote());
    // `BTC-USDC` is an alias of `BTC-USD` (`alias`), which lists it in `alias_to`.
    let alias = p.id.usd_alias().filter(|usd| m.get(usd.as_str()).is_some()).map(String::from);
    let usdc = ProductId::new(&format!("{base}-USDC")).ok().filter(|c| c.usd_alias().as_ref() == Some(&p.id));
    let alias_to: Vec<Value> = usdc
        .filter(|c| m.get(c.as_str()).is_some())
        .map(|c| Value::from(String::from(c)))
        .into_iter()
        .collect();
    let mut extra = Map::new();
    let mut put = |k: &str, v: Value| {
        extra.insert(k.to_string(), v);
    };
    let s = |d: Decimal| Value::from(d.to_string());
    put("price_percentage_change_24h", s(change));
    put("volume_24h", s(volume));
    put("volume_percentage_change_24h", s(volume_change));
    put("base_increment", Value::from("0.00000001"));
    put("quote_increment", s(p.quote_increment()));
    put("quote_min_size", Value::from("1"));
    put("quote_max_size", Value::from("150000000"));
    put("base_min_size", Value::from("0.00000001"));
    put("base_max_size", Value::from("42000"));
    put("base_name", Value::from(p.base_name.as_str()));
    put("quote_name", Value::from(p.quote_name.as_str()));
    put("watched", Value::from(false));
    put("is_disabled", Value::from(false));
    put("new", Value::from(false));
    put("cancel_only", Value::from(false));
    put("limit_only", Value::from(false));
    put("post_only", Value::from(false));
    put("auction_mode", Value::from(false));
    put("quote_currency_id", Value::from(quote));
    put("base_currency_id", Value::from(base));
    put("fcm_trading_session_details", Value::Null);
    put("mid_market_price", Value::from(""));
    put("alias", Value::from(alias.unwrap_or_default()));
    put("alias_to", Value::from(alias_to));
    put("base_display_symbol", Value::from(base));
    put("quote_display_symbol", Value::from(quote));
    put("view_only", Value::from(false));
    put("price_increment", s(p.quote_increment()));
    put("display_name", Value::from(p.id.as_str()));
    put("product_venue", Value::from("CBE"));
    put("approximate_quote_24h_volume", s(quote_volume));
    put("new_at", Value::from("2023-01-01T00:00:00Z"));
    Product {
        product_id: p.id.to_string(),
        price: price.to_string(),
        status: "online".into(),
        trading_disabled: false,
        product_type: "SPOT".into(),
        extra,
    }
}

/// `(now - before) / before * 100`, 14 decimal places (like the real samples).
fn percent_change(now: Decimal, before: Decimal) -> Decimal {
    (now - before)
        .checked_mul(Decimal::ONE_HUNDRED)
        .and_then(|d| d.checked_div(before))
        .map_or(Decimal::ZERO, |d| d.round_dp(14).normalize())
}

fn accounts(q: &Query, ctx: &Ctx<'_>) -> Result<Reply, Reply> {
    let limit = match q.int::<u32>("limit")? {
        None | Some(0) => DEFAULT_ACCOUNTS_LIMIT,
        Some(l) => l.min(MAX_ACCOUNTS_LIMIT),
    } as usize;
    let from = match q.get("cursor").map(str::trim) {
        None | Some("") => 0,
        Some(c) => {
            c.parse::<usize>().map_err(|_| Reply::bad_request(&format!("cursor is invalid: {}", shown(c))))?
        }
    };
    let all = ctx.accounts;
    let page: Vec<WireAccount> =
        all.iter().enumerate().skip(from).take(limit).map(|(i, a)| wire_account(i, a, ctx.seed)).collect();
    let next = from.saturating_add(limit);
    let has_next = next < all.len();
    Ok(Reply::json(
        200,
        &Accounts {
            size: page.len() as i64,
            accounts: page,
            has_next,
            cursor: if has_next { next.to_string() } else { String::new() },
        },
    ))
}

/// A stable UUID-shaped id from a seed and a key.
pub(super) fn uuid(seed: u64, key: &str, i: usize) -> String {
    let a = mix(seed, super::market::fnv1a(key.as_bytes()) ^ i as u64);
    let b = mix(a, 0x00DD_BA11);
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xFFFF,
        a & 0xFFF,
        (b >> 48) & 0xFFF,
        b & 0xFFFF_FFFF_FFFF
    )
}

/// Amounts as real data shows them: 16 decimal places.
fn amount(d: Decimal) -> String {
    let mut d = d;
    if d.scale() < 16 {
        d.rescale(16);
    }
    d.to_string()
}

pub(super) fn wire_account(i: usize, a: &SimAccount, seed: u64) -> WireAccount {
    let currency = a.currency.clone();
    WireAccount {
        uuid: uuid(seed, &currency, i),
        name: a.name.clone().unwrap_or_else(|| format!("{currency} Wallet")),
        available_balance: Money { value: amount(a.available), currency: currency.clone() },
        default: true,
        active: a.active,
        created_at: "2023-01-04T06:20:06.456Z".into(),
        updated_at: "2023-01-04T06:20:07.181Z".into(),
        deleted_at: None,
        account_type: a.account_type().to_string(),
        ready: true,
        hold: Some(Money { value: amount(a.hold), currency: currency.clone() }),
        retail_portfolio_id: Some(uuid(seed, "portfolio", 0)),
        platform: Some("ACCOUNT_PLATFORM_CONSUMER".into()),
        currency,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coinbase::{wire, wire::ErrorBody};
    use time::macros::datetime;

    fn market() -> Market {
        let ids: Vec<ProductId> =
            ["BTC-USD", "ETH-USD", "BTC-USDC"].iter().map(|s| s.parse().unwrap()).collect();
        Market::new(1, &ids)
    }

    fn run(path: &str, query: &str, now: OffsetDateTime, accounts: &[SimAccount]) -> Handled {
        let m = market();
        let ctx = Ctx {
            market: &m,
            accounts,
            seed: 1,
            candle_limit: CandleLimit::Observed,
            now,
            skew: time::Duration::ZERO,
        };
        let (endpoint, product) = route(&format!("{API_BASE_PATH}{path}")).unwrap();
        handle(endpoint, product.as_deref(), &Query::parse(Some(query)), &ctx)
    }

    const NOW: OffsetDateTime = datetime!(2024-04-24 09:56:38.063595 UTC);

    #[test]
    fn routing_table() {
        let rows = [
            ("/time", Some((Endpoint::Time, None))),
            ("/market/products/BTC-USD/ticker", Some((Endpoint::MarketTicker, Some("BTC-USD")))),
            ("/products/BTC%2DUSD/candles", Some((Endpoint::Candles, Some("BTC-USD")))),
            ("/products/x", Some((Endpoint::Product, Some("x")))),
            ("/market/products", Some((Endpoint::MarketProducts, None))),
            ("/products/", Some((Endpoint::Product, Some("")))),
            ("/accounts/abc", None),
            ("", None),
            ("/market", None),
            ("/products/A/B/C/D", None),
        ];
        for (path, expected) in rows {
            let got = route(&format!("{API_BASE_PATH}{path}"));
            let got = got.as_ref().map(|(e, p)| (*e, p.as_deref()));
            assert_eq!(got, expected, "{path}");
        }
        assert_eq!(route("/api/v3/brokeragetime"), None);
    }

    #[test]
    fn query_parsing() {
        let q = Query::parse(Some("product_ids=A&product_ids=B%2DC&x&y=1+2&bad=%zz&&b=TRUE"));
        assert_eq!(q.all("product_ids").collect::<Vec<_>>(), ["A", "B-C"]);
        assert_eq!(q.get("x"), Some(""));
        assert_eq!(q.get("y"), Some("1 2"));
        assert_eq!(q.get("bad"), Some("%zz"));
        assert_eq!(q.bool("b").unwrap(), Some(true));
        assert!(q.bool("y").is_err());
        assert_eq!(Query::parse(None), Query::default());
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%ff"), "\u{FFFD}");
    }

    #[test]
    fn candle_window_is_inclusive_and_newest_first() {
        let start = datetime!(2024-04-24 09:00 UTC).unix_timestamp();
        let h = run(
            "/products/BTC-USD/candles",
            &format!("start={start}&end={}&granularity=ONE_MINUTE", start + 299 * 60),
            NOW,
            &[],
        );
        assert_eq!(h.reply.status, 200);
        let candles = wire::decode_candles(&h.reply.body).unwrap();
        // 09:00 .. 09:56 inclusive (the rest is in the future).
        assert_eq!(candles.len(), 57);
        let w: Candles = serde_json::from_slice(&h.reply.body).unwrap();
        assert_eq!(w.candles[0].start, (start + 56 * 60).to_string(), "newest first");
        let logged = h.candle.unwrap();
        assert_eq!((logged.start, logged.granularity), (start, Granularity::OneMinute));

        // 301 buckets: (end - start) / 60 = 300 is not "less than 300".
        let too_many = run(
            "/products/BTC-USD/candles",
            &format!("start={start}&end={}&granularity=ONE_MINUTE", start + 300 * 60),
            NOW,
            &[],
        );
        assert_eq!(too_many.reply.status, 400);
        let e: ErrorBody = serde_json::from_slice(&too_many.reply.body).unwrap();
        assert_eq!(e.error_details.as_deref(), Some(super::super::CANDLE_RANGE_ERROR));
        assert!(too_many.candle.is_none());
    }

    #[test]
    fn the_documented_candle_limit_allows_350_buckets() {
        let m = market();
        let start = datetime!(2024-04-20 09:00 UTC).unix_timestamp();
        let ask = |limit: CandleLimit, buckets: i64| {
            let ctx = Ctx {
                market: &m,
                accounts: &[],
                seed: 1,
                candle_limit: limit,
                now: NOW,
                skew: time::Duration::ZERO,
            };
            let q = format!("start={start}&end={}&granularity=ONE_MINUTE", start + (buckets - 1) * 60);
            handle(Endpoint::Candles, Some("BTC-USD"), &Query::parse(Some(&q)), &ctx).reply
        };
        assert_eq!(ask(CandleLimit::Observed, 300).status, 200);
        assert_eq!(ask(CandleLimit::Observed, 301).status, 400);
        let r = ask(CandleLimit::Documented, 350);
        assert_eq!((r.status, wire::decode_candles(&r.body).unwrap().len()), (200, 350));
        let r = ask(CandleLimit::Documented, 351);
        let e: ErrorBody = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            (r.status, e.error_details.as_deref()),
            (400, Some(super::super::DOCUMENTED_CANDLE_RANGE_ERROR))
        );
        // One fact each: the texts name their limits.
        for limit in [CandleLimit::Observed, CandleLimit::Documented] {
            assert!(limit.error_details().ends_with(&format!("less than {}", limit.max_buckets())));
        }
    }

    #[test]
    fn bad_candle_params_are_400() {
        for q in [
            "start=1&end=2",
            "start=1&granularity=ONE_MINUTE",
            "start=x&end=2&granularity=ONE_MINUTE",
            "start=5&end=2&granularity=ONE_MINUTE",
            "start=1&end=2&granularity=UNKNOWN_GRANULARITY",
            "start=1&end=2&granularity=one_minute",
            "start=-1&end=2&granularity=ONE_MINUTE",
            "start=1&end=99999999999999&granularity=ONE_MINUTE",
            "start=1&end=2&granularity=ONE_MINUTE&limit=0",
            "start=1&end=2&granularity=ONE_MINUTE&limit=351",
            "start=9223372036854775807&end=9223372036854775807&granularity=ONE_DAY",
        ] {
            let h = run("/market/products/BTC-USD/candles", q, NOW, &[]);
            assert_eq!(h.reply.status, 400, "{q}");
            let e: ErrorBody = serde_json::from_slice(&h.reply.body).unwrap();
            assert_eq!(e.error, "INVALID_ARGUMENT");
        }
    }

    #[test]
    fn ticker_last_price_lies_inside_the_book() {
        let h = run("/market/products/ETH-USD/ticker", "limit=3", NOW, &[]);
        assert_eq!(h.reply.status, 200);
        let t = wire::decode_ticker(&"ETH-USD".parse().unwrap(), &h.reply.body).unwrap();
        assert!(t.best_bid.unwrap() < t.price && t.price < t.best_ask.unwrap());
        assert_eq!(t.time, NOW);
        let w: MarketTrades = serde_json::from_slice(&h.reply.body).unwrap();
        assert_eq!(w.trades.len(), 3);
        assert!(w.trades[0].time > w.trades[1].time && w.trades[1].time > w.trades[2].time);
        assert_eq!(run("/market/products/ETH-USD/ticker", "", NOW, &[]).reply.status, 400);
        assert_eq!(run("/market/products/ETH-USD/ticker", "limit=-1", NOW, &[]).reply.status, 400);
        assert_eq!(run("/products/NOPE-USD/ticker", "limit=1", NOW, &[]).reply.status, 404);
        assert_eq!(run("/products/btc-usd/ticker", "limit=1", NOW, &[]).reply.status, 404);
    }

    #[test]
    fn products_and_aliases() {
        let h = run("/products/BTC-USD", "", NOW, &[]);
        let p = wire::decode_product(&h.reply.body).unwrap();
        assert_eq!(p.extra["alias_to"], json!(["BTC-USDC"]));
        assert_eq!(p.extra["quote_increment"], "0.01");
        let h = run("/market/products", "product_ids=ETH-USD&product_ids=NOPE-X&limit=5", NOW, &[]);
        let w: Products = serde_json::from_slice(&h.reply.body).unwrap();
        assert_eq!(w.products.len(), 1);
        assert_eq!(w.num_products, json!(1));
        assert!(w.pagination.is_none(), "public list has no pagination");
        let h = run("/products", "limit=2&offset=1&get_all_products=False", NOW, &[]);
        let w: Products = serde_json::from_slice(&h.reply.body).unwrap();
        assert_eq!(w.products.len(), 2);
        assert_eq!(w.num_products, json!(3));
        assert_eq!(w.pagination.unwrap()["has_prev"], json!(true));
        assert_eq!(run("/products", "get_all_products=yes", NOW, &[]).reply.status, 400);
        assert_eq!(run("/products", "product_type=future", NOW, &[]).reply.status, 200);
    }

    #[test]
    fn time_body() {
        let h = run("/time", "", NOW, &[]);
        let w: ServerTime = serde_json::from_slice(&h.reply.body).unwrap();
        assert_eq!(w.iso, "2024-04-24T09:56:38Z");
        assert_eq!(w.epoch_seconds, "1713952598");
        assert_eq!(w.epoch_millis, "1713952598063");
    }

    /// Seeded garbage through routing and every handler: answers are 2xx/4xx, never a panic.
    #[test]
    fn no_panics_on_garbage() {
        let m = market();
        let accounts = [SimAccount::new("USD", Decimal::ONE)];
        let mut rng = fastrand::Rng::with_seed(42);
        let segments = [
            "market",
            "products",
            "BTC-USD",
            "ticker",
            "candles",
            "best_bid_ask",
            "accounts",
            "time",
            "",
            "%",
            "%FF",
            "btc-usd",
            "A-B-C",
            "..",
            "BTC-USD%00",
        ];
        let keys = [
            "limit",
            "start",
            "end",
            "granularity",
            "product_ids",
            "cursor",
            "offset",
            "product_type",
            "get_all_products",
            "x",
        ];
        let values = [
            "",
            "0",
            "1",
            "-1",
            "350",
            "351",
            "99999999999999999999",
            "9223372036854775807",
            "-9223372036854775808",
            "ONE_MINUTE",
            "ONE_DAY",
            "UNKNOWN_GRANULARITY",
            "True",
            "false",
            "BTC-USD",
            "SPOT",
            "FUTURE",
            "%ZZ",
            "+",
            "1713952500",
            "1713952598",
        ];
        let pick = |rng: &mut fastrand::Rng, xs: &[&'static str]| xs[rng.usize(..xs.len())];
        let mut answered = 0;
        for _ in 0..20_000 {
            let depth = rng.usize(1..6);
            let path: String = (0..depth).map(|_| format!("/{}", pick(&mut rng, &segments))).collect();
            let query: Vec<String> = (0..rng.usize(0..6))
                .map(|_| format!("{}={}", pick(&mut rng, &keys), pick(&mut rng, &values)))
                .collect();
            let now = NOW + time::Duration::seconds(rng.i64(-1_000_000..1_000_000));
            let ctx = Ctx {
                market: &m,
                accounts: &accounts,
                seed: 1,
                candle_limit: CandleLimit::Observed,
                now,
                skew: time::Duration::ZERO,
            };
            if let Some((endpoint, product)) = route(&format!("{API_BASE_PATH}{path}")) {
                let q = Query::parse(Some(&query.join("&")));
                let h = handle(endpoint, product.as_deref(), &q, &ctx);
                assert!([200, 400, 404].contains(&h.reply.status), "{path}?{query:?}");
                answered += 1;
            }
        }
        assert!(answered > 1_000, "{answered}");
    }

    #[test]
    fn uuids_look_like_uuids() {
        let u = uuid(1, "USD", 0);
        assert_eq!(u.len(), 36);
        assert_eq!(u.split('-').map(str::len).collect::<Vec<_>>(), [8, 4, 4, 4, 12]);
        assert_ne!(u, uuid(1, "USD", 1));
        assert_eq!(amount(Decimal::new(5, 1)), "0.5000000000000000");
    }
}
