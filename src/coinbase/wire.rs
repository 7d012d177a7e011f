//! Coinbase Advanced Trade v3 bodies exactly as they travel on the wire.
//!
//! Numbers are JSON strings and some fields arrive as `""`; these structs keep them as
//! strings and the `decode_*` functions turn a body into the domain model, answering
//! [`Error::Decode`] (never a panic) for anything malformed. The simulated exchange serializes
//! the same structs, so the client and the simulator cannot drift apart. Public so that host
//! applications and fuzzers can decode captured bodies.
//!
//! # Validation: an answer that does not fit the question is an error, never a value
//!
//! Every answer is untrusted until checked. The `decode_*` functions apply the checks that
//! need no clock; [`CoinbaseClient`](super::CoinbaseClient) adds the ones marked *client*,
//! which need its [`Clock`](crate::Clock) or the request (granularity, asked products, earlier
//! pages). **Rejected** means the whole answer fails with [`Error::Decode`] (not retried; it
//! counts as a failure towards a circuit breaker). The message names the field and never
//! quotes anything token-like ([`Error`]'s messages are scrubbed).
//!
//! | answer | field or case | rule | outcome |
//! |---|---|---|---|
//! | every 200 | its list (`trades`, `candles`, `pricebooks`, `accounts`, `products`) or `has_next` missing, e.g. `{}` or an error object `{"error":"INTERNAL",..}` | the list must be present; an empty list (`"pricebooks": []`) is a valid empty answer | rejected (the message names an error object's code) |
//! | every body | size | at most `max_body_bytes` (default 4 MiB, *client*); a larger `Content-Length` fails before reading, an endless body once the limit is passed | rejected, the rest is not read |
//! | every body | cut short (fewer bytes than `Content-Length`, then the connection closes) | *client* | [`Error::Transport`] (retryable), not `Decode` |
//! | ticker | `trades[].product_id` | the asked product, its `-USD`/`-USDC` alias, or empty | another product: rejected |
//! | ticker | `trades[0].price`, `best_bid`, `best_ask` | positive (`""` for a side is "no quote") | zero or negative: rejected |
//! | ticker, best_bid_ask | `best_bid` > `best_ask` | a crossed book cannot be priced (also in auction mode: no mid is a price then) | rejected; a locked book (bid = ask) is kept |
//! | ticker, best_bid_ask | time (`trades[0].time`, `pricebooks[].time`) | from 2009 on; at most a day ahead of the client's clock (*client*) | rejected; a missing time is reported as the UNIX epoch, as before |
//! | best_bid_ask | an entry for a product not asked for (*client*) | ignored without being decoded, even if malformed | dropped |
//! | best_bid_ask | a malformed or impossible entry for an asked product | the whole chunk, since one answer cannot be half trusted, and "left out" would read as an unknown product (`NotFound`, remembered) | rejected, naming the product |
//! | best_bid_ask | a product twice | identical entries collapse to one (first position kept); different ones cannot both be right | conflicting: rejected |
//! | best_bid_ask | a book with both sides empty | no price | dropped (the product is left out, as an unknown one) |
//! | candles | `open`, `high`, `low`, `close` | positive; `low <= open, close <= high` (so `high >= low`) | rejected |
//! | candles | `volume` | zero or more | negative: rejected |
//! | candles | `start` | from 2009 on; on the requested granularity's grid and at most a day ahead (*client*) | rejected |
//! | candles | a `start` twice | identical candles collapse; different ones are rejected | conflicting: rejected |
//! | candles | outside the requested range (*client*) | the exchange's bounds may be inclusive | dropped, as before |
//! | accounts | `available_balance.value`, `hold.value` | zero or more | negative: rejected |
//! | accounts | `uuid`, `currency` | not empty; an amount's `currency`, when given, is the account's | rejected |
//! | accounts | `has_next: true` with an empty or missing `cursor` | pagination would silently stop | rejected |
//! | accounts | pages (*client*) | at most `accounts_max_pages` (default 100); no cursor twice; no `uuid` twice, on one page or across pages (never counted twice) | rejected |
//! | time | `epochMillis`, `epochSeconds`, `iso` | from 2009 on; not checked against the local clock (`/time` is how a host finds out its clock is off) | rejected |
//! | products | `product_id` | a valid [`ProductId`] | rejected |
//! | products as tickers ([`decode_product_tickers_for`]) | an entry for a product not asked for | ignored without being decoded, even if malformed | dropped |
//! | products as tickers | `price` of an asked product | positive; `""` is "no last trade" | zero, negative or malformed: the chunk is rejected, naming the product; `""`: dropped (left out, as an unknown product) |
//! | products as tickers | a product twice | identical prices collapse; different ones cannot both be right | conflicting: rejected |
//! | recent trades ([`decode_recent_trades`]) | count | at most the `limit` asked for | more: rejected |
//! | recent trades | each trade | `trade_id` not empty; `price` positive; `size` zero or more; `time` from 2009 on and at most a day ahead (*client*); `product_id` as for the ticker | rejected |
//! | recent trades | a `trade_id` twice | identical trades collapse; different ones cannot both be right | conflicting: rejected |
//! | recent trades | order | most recent first | re-sorted (stable), not rejected |
//!
//! Fields the model does not carry (a ticker's trade sizes, ids and sides, `name`, ...) are
//! neither parsed nor checked. Nothing is ever "kept but flagged": the model has no place for a flag that a
//! bot would be sure to read, so a value is either checked and served or not served at all.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::validate;
use crate::{
    error::{Error, Result},
    model::{
        Account, BookLevel, Candle, MarketTrade, OrderBook, PriceKind, ProductId, RecentTrades, Ticker,
        TradeSide, mid_price,
    },
};

/// `GET /market/products/{id}/ticker` and `GET /products/{id}/ticker`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarketTrades {
    /// Most recent trades first (required: a body without it is not an answer).
    pub trades: Vec<Trade>,
    /// Best bid, `""` when the book side is empty.
    #[serde(default)]
    pub best_bid: String,
    /// Best ask, `""` when the book side is empty.
    #[serde(default)]
    pub best_ask: String,
}

/// One trade of [`MarketTrades`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trade {
    /// Trade id.
    #[serde(default)]
    pub trade_id: String,
    /// Product id.
    #[serde(default)]
    pub product_id: String,
    /// Price (decimal string).
    pub price: String,
    /// Size (decimal string).
    #[serde(default)]
    pub size: String,
    /// RFC 3339 time with microseconds.
    pub time: String,
    /// `"BUY"`, `"SELL"` or `""`.
    #[serde(default)]
    pub side: String,
    /// Always `""` in real data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bid: Option<String>,
    /// Always `""` in real data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ask: Option<String>,
    /// Present in the documentation's example only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exchange: Option<String>,
}

/// `GET .../candles`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candles {
    /// Newest first, as observed (not documented). Required.
    pub candles: Vec<WireCandle>,
}

/// One candle; every field, `start` included, is a string.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireCandle {
    /// Bucket start, UNIX seconds.
    pub start: String,
    /// Low.
    pub low: String,
    /// High.
    pub high: String,
    /// Open.
    pub open: String,
    /// Close.
    pub close: String,
    /// Volume.
    pub volume: String,
}

impl From<&Candle> for WireCandle {
    /// A candle as Coinbase writes it (every field a string; what the simulated exchange and
    /// the proxy serve).
    fn from(c: &Candle) -> Self {
        WireCandle {
            start: c.start.unix_timestamp().to_string(),
            low: c.low.to_string(),
            high: c.high.to_string(),
            open: c.open.to_string(),
            close: c.close.to_string(),
            volume: c.volume.to_string(),
        }
    }
}

/// `GET /best_bid_ask`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BestBidAsk {
    /// One book per product. Required.
    pub pricebooks: Vec<PriceBook>,
}

/// One product's top of book.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceBook {
    /// Product id.
    pub product_id: String,
    /// Bid levels, best first.
    #[serde(default)]
    pub bids: Vec<Level>,
    /// Ask levels, best first.
    #[serde(default)]
    pub asks: Vec<Level>,
    /// RFC 3339 time.
    #[serde(default)]
    pub time: String,
}

/// `GET /market/product_book` and `GET /product_book`: one product's book (note the
/// singular `pricebook`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductBook {
    /// The book.
    pub pricebook: PriceBook,
    /// The last trade's price (docs and SDK; optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<String>,
    /// The bid/ask mid (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mid_market: Option<String>,
    /// The spread in basis points (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread_bps: Option<String>,
    /// The spread in the quote currency (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread_absolute: Option<String>,
}

/// One price level.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Level {
    /// Price.
    pub price: String,
    /// Size.
    pub size: String,
}

/// `GET /market/products` and `GET /products`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Products {
    /// The products. Required.
    pub products: Vec<Product>,
    /// A number in the docs, sometimes a string in real data: both are accepted.
    #[serde(default)]
    pub num_products: serde_json::Value,
    /// Present on the private list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pagination: Option<serde_json::Value>,
}

/// The fields of a product tickshare uses; the rest of the object is kept in `extra` so that
/// a round trip loses nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Product {
    /// Product id.
    pub product_id: String,
    /// Last price (string, may be `""`).
    #[serde(default)]
    pub price: String,
    /// `"online"` in real data.
    #[serde(default)]
    pub status: String,
    /// Whether trading is disabled.
    #[serde(default)]
    pub trading_disabled: bool,
    /// `SPOT`, `FUTURE` or `UNKNOWN_PRODUCT_TYPE`.
    #[serde(default)]
    pub product_type: String,
    /// Every other field, as sent.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// `GET /accounts`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accounts {
    /// This page's accounts. Required.
    pub accounts: Vec<WireAccount>,
    /// Whether another page follows. Required: without it, a client cannot tell the last page.
    pub has_next: bool,
    /// Cursor of the next page; `""` on the last page.
    #[serde(default)]
    pub cursor: String,
    /// Number of accounts on this page (the real API's value is not always that).
    #[serde(default)]
    pub size: i64,
}

/// One account.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireAccount {
    /// Account id.
    pub uuid: String,
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// Currency code.
    pub currency: String,
    /// Available balance.
    pub available_balance: Money,
    /// Whether this is the default account of its currency.
    #[serde(default)]
    pub default: bool,
    /// Whether the account is active.
    #[serde(default)]
    pub active: bool,
    /// Creation time.
    #[serde(default)]
    pub created_at: String,
    /// Update time.
    #[serde(default)]
    pub updated_at: String,
    /// Deletion time, `null` in real data.
    #[serde(default)]
    pub deleted_at: Option<String>,
    /// `ACCOUNT_TYPE_CRYPTO`, `ACCOUNT_TYPE_FIAT` (real data) or `FIAT` (docs).
    #[serde(default, rename = "type")]
    pub account_type: String,
    /// Whether the account is ready.
    #[serde(default)]
    pub ready: bool,
    /// Funds on hold; absent is zero.
    #[serde(default)]
    pub hold: Option<Money>,
    /// Deprecated portfolio id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retail_portfolio_id: Option<String>,
    /// Platform.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
}

/// An amount with its currency.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Money {
    /// Decimal string.
    pub value: String,
    /// Currency code.
    pub currency: String,
}

/// `GET /time`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerTime {
    /// RFC 3339.
    pub iso: String,
    /// UNIX seconds as a string.
    #[serde(rename = "epochSeconds")]
    pub epoch_seconds: String,
    /// UNIX milliseconds as a string.
    #[serde(rename = "epochMillis")]
    pub epoch_millis: String,
}

/// The v3 error body, in both its documented and observed shapes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Error id, e.g. `"NOT_FOUND"`, `"RATE_LIMIT_EXCEEDED"`.
    #[serde(default)]
    pub error: String,
    /// Numeric code (documented shape).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i64>,
    /// Human-readable message.
    #[serde(default)]
    pub message: String,
    /// Details (observed shape).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_details: Option<String>,
}

fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8], what: &str) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| match error_object(body) {
        Some(code) => Error::decode(format_args!("{what}: a 200 answer carrying an error object ({code})")),
        None => Error::decode(format_args!("{what}: {e}")),
    })
}

/// The error code of a body that is an error object (`{"error":"INTERNAL",...}`), when the
/// code is a plain identifier; `"no code"` for an object whose `error` is something else.
fn error_object(body: &[u8]) -> Option<String> {
    let e: ErrorBody = serde_json::from_slice(body).ok()?;
    let code = e.error.trim();
    if code.is_empty() && e.message.trim().is_empty() && e.error_details.is_none() {
        return None;
    }
    let plain = !code.is_empty()
        && code.len() <= 40
        && code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    Some(if plain { code.to_string() } else { "no code".into() })
}

/// Parse a decimal string. `field` names it in the error.
///
/// # Errors
/// [`Error::Decode`] for anything but a plain decimal number.
pub fn parse_decimal(s: &str, field: &str) -> Result<Decimal> {
    let t = s.trim();
    if t.is_empty() {
        return Err(Error::decode(format_args!("{field} is empty")));
    }
    t.parse::<Decimal>().or_else(|_| Decimal::from_scientific(t)).map_err(|_| {
        Error::decode(format_args!("{field} is not a decimal: {:?}", crate::error::truncate(s, 40)))
    })
}

fn parse_opt_decimal(s: &str, field: &str) -> Result<Option<Decimal>> {
    if s.trim().is_empty() { Ok(None) } else { parse_decimal(s, field).map(Some) }
}

/// Parse an RFC 3339 time.
///
/// # Errors
/// [`Error::Decode`] when `s` is not RFC 3339.
pub fn parse_time(s: &str, field: &str) -> Result<OffsetDateTime> {
    OffsetDateTime::parse(s.trim(), &Rfc3339).map_err(|_| {
        Error::decode(format_args!("{field} is not an RFC 3339 time: {:?}", crate::error::truncate(s, 40)))
    })
}

fn parse_unix(s: &str, field: &str) -> Result<OffsetDateTime> {
    let secs: i64 = s.trim().parse().map_err(|_| {
        Error::decode(format_args!("{field} is not UNIX seconds: {:?}", crate::error::truncate(s, 40)))
    })?;
    OffsetDateTime::from_unix_timestamp(secs)
        .map_err(|_| Error::decode(format_args!("{field} is out of range")))
}

fn product_of(s: &str) -> Result<ProductId> {
    ProductId::new(s).map_err(|e| Error::decode(format_args!("bad product_id: {e}")))
}

/// Decode a market-trades ("ticker") body for `product`.
///
/// The price is the most recent trade's; with no trades, the bid/ask mid (and the time the
/// UNIX epoch: the body has none).
///
/// # Errors
/// [`Error::Decode`] for a malformed body, one with neither trades nor a two-sided book,
/// trades of another product, a price that is not positive, a crossed book, or a trade before
/// 2009 (see the [module documentation](self)).
pub fn decode_ticker(product: &ProductId, body: &[u8]) -> Result<Ticker> {
    let w: MarketTrades = parse_json(body, "ticker")?;
    if let Some(t) =
        w.trades.iter().find(|t| !t.product_id.is_empty() && !validate::same_market(product, &t.product_id))
    {
        return Err(Error::decode(format_args!(
            "ticker for {product} carries a trade of another product ({:?})",
            crate::error::truncate(&t.product_id, 40)
        )));
    }
    let best_bid =
        parse_opt_decimal(&w.best_bid, "best_bid")?.map(|b| validate::price(b, "best_bid")).transpose()?;
    let best_ask =
        parse_opt_decimal(&w.best_ask, "best_ask")?.map(|a| validate::price(a, "best_ask")).transpose()?;
    validate::book(best_bid, best_ask, "ticker")?;
    let (price, time, price_kind) = match w.trades.first() {
        Some(t) => (
            validate::price(parse_decimal(&t.price, "trades[0].price")?, "trades[0].price")?,
            validate::not_before_earliest(parse_time(&t.time, "trades[0].time")?, "trades[0].time")?,
            PriceKind::LastTrade,
        ),
        None => match (best_bid, best_ask) {
            (Some(b), Some(a)) => (mid_price(b, a), OffsetDateTime::UNIX_EPOCH, PriceKind::Mid),
            _ => return Err(Error::decode("ticker has no trades and no two-sided book")),
        },
    };
    Ok(Ticker { product: product.clone(), price, best_bid, best_ask, time, price_kind })
}

/// Decode a market-trades body for `product` asked with `limit`: every trade, most recent
/// first, each checked (see the [module documentation](self)).
///
/// # Errors
/// [`Error::Decode`] for a malformed body, more trades than `limit`, a trade of another
/// product, an empty trade id, a price that is not positive, a negative size, a trade before
/// 2009, two different trades with one id, or a crossed book.
pub fn decode_recent_trades(product: &ProductId, limit: u32, body: &[u8]) -> Result<RecentTrades> {
    let w: MarketTrades = parse_json(body, "ticker")?;
    if w.trades.len() > limit as usize {
        return Err(Error::decode(format_args!(
            "ticker for {product} has {} trades, more than the {limit} asked for",
            w.trades.len()
        )));
    }
    let best_bid =
        parse_opt_decimal(&w.best_bid, "best_bid")?.map(|b| validate::price(b, "best_bid")).transpose()?;
    let best_ask =
        parse_opt_decimal(&w.best_ask, "best_ask")?.map(|a| validate::price(a, "best_ask")).transpose()?;
    validate::book(best_bid, best_ask, "ticker")?;
    let mut trades: Vec<MarketTrade> = Vec::with_capacity(w.trades.len());
    for t in &w.trades {
        if !t.product_id.is_empty() && !validate::same_market(product, &t.product_id) {
            return Err(Error::decode(format_args!(
                "ticker for {product} carries a trade of another product ({:?})",
                crate::error::truncate(&t.product_id, 40)
            )));
        }
        if t.trade_id.trim().is_empty() {
            return Err(Error::decode(format_args!("ticker for {product} has a trade without trade_id")));
        }
        let trade = MarketTrade {
            trade_id: t.trade_id.trim().to_string(),
            price: validate::price(parse_decimal(&t.price, "trades[].price")?, "trades[].price")?,
            size: validate::amount(parse_decimal(&t.size, "trades[].size")?, "trades[].size")?,
            time: validate::not_before_earliest(parse_time(&t.time, "trades[].time")?, "trades[].time")?,
            side: match t.side.trim() {
                s if s.eq_ignore_ascii_case("BUY") => TradeSide::Buy,
                s if s.eq_ignore_ascii_case("SELL") => TradeSide::Sell,
                _ => TradeSide::Unknown,
            },
        };
        match trades.iter().find(|seen| seen.trade_id == trade.trade_id) {
            Some(seen) if *seen == trade => {}
            Some(_) => {
                return Err(Error::decode(format_args!(
                    "ticker for {product} has two different trades with id {:?}",
                    crate::error::truncate(&trade.trade_id, 40)
                )));
            }
            None => trades.push(trade),
        }
    }
    // Most recent first, as Coinbase sends them; a stable sort keeps the order of equal times.
    trades.sort_by_key(|t| std::cmp::Reverse(t.time));
    Ok(RecentTrades { product: product.clone(), trades, best_bid, best_ask })
}

impl From<&RecentTrades> for MarketTrades {
    /// The wire body of `r`, as Coinbase would send it (`bid`/`ask` of each trade `""`, as in
    /// real data).
    fn from(r: &RecentTrades) -> Self {
        let dec = |d: Option<Decimal>| d.map(|d| d.to_string()).unwrap_or_default();
        MarketTrades {
            trades: r
                .trades
                .iter()
                .map(|t| Trade {
                    trade_id: t.trade_id.clone(),
                    product_id: r.product.to_string(),
                    price: t.price.to_string(),
                    size: t.size.to_string(),
                    time: format_time(t.time),
                    side: t.side.as_wire().to_string(),
                    bid: Some(String::new()),
                    ask: Some(String::new()),
                    exchange: None,
                })
                .collect(),
            best_bid: dec(r.best_bid),
            best_ask: dec(r.best_ask),
        }
    }
}

/// Decode a candles body, oldest first, de-duplicated by start time.
///
/// # Errors
/// [`Error::Decode`] for a malformed body or candle, an impossible candle (a price that is not
/// positive, `high < low`, `open` or `close` outside `low..=high`, a negative volume, a start
/// before 2009), or two different candles with one start.
pub fn decode_candles(body: &[u8]) -> Result<Vec<Candle>> {
    let w: Candles = parse_json(body, "candles")?;
    let mut out = w.candles.iter().map(candle_from_wire).collect::<Result<Vec<_>>>()?;
    out.iter().try_for_each(validate::candle)?;
    out.sort_by_key(|c| c.start);
    if let Some(w) = out.windows(2).find(|w| w[0].start == w[1].start && w[0] != w[1]) {
        return Err(Error::decode(format_args!(
            "two different candles start at {}",
            w[0].start.unix_timestamp()
        )));
    }
    out.dedup_by_key(|c| c.start);
    Ok(out)
}

/// Convert one wire candle.
///
/// # Errors
/// [`Error::Decode`] when a field is not a number, or the start is before 2009. (Whether the
/// prices are consistent is checked by [`decode_candles`].)
pub fn candle_from_wire(c: &WireCandle) -> Result<Candle> {
    Ok(Candle {
        start: validate::not_before_earliest(parse_unix(&c.start, "candle.start")?, "candle.start")?,
        open: parse_decimal(&c.open, "candle.open")?,
        high: parse_decimal(&c.high, "candle.high")?,
        low: parse_decimal(&c.low, "candle.low")?,
        close: parse_decimal(&c.close, "candle.close")?,
        volume: parse_decimal(&c.volume, "candle.volume")?,
    })
}

/// Decode a `best_bid_ask` body into tickers (price = bid/ask mid), in the body's order.
///
/// A book with both sides empty is left out: there is no price to report. Identical entries
/// for one product collapse to one.
///
/// # Errors
/// [`Error::Decode`] for a malformed body or entry, an impossible entry (a price that is not
/// positive, a crossed book, a time before 2009), or two different entries for one product.
pub fn decode_best_bid_ask(body: &[u8]) -> Result<Vec<Ticker>> {
    books(body, None)
}

/// Decode a `best_bid_ask` body that answers a request for `asked`: as
/// [`decode_best_bid_ask`], but entries for other products are dropped without being decoded,
/// so a malformed entry the request did not ask for cannot fail the answer.
///
/// # Errors
/// As [`decode_best_bid_ask`], for the entries of asked products (the message names the
/// product).
pub fn decode_best_bid_ask_for(asked: &[ProductId], body: &[u8]) -> Result<Vec<Ticker>> {
    books(body, Some(asked))
}

fn books(body: &[u8], asked: Option<&[ProductId]>) -> Result<Vec<Ticker>> {
    /// Entries stay raw until their product is known to be asked for.
    #[derive(Deserialize)]
    struct Raw {
        pricebooks: Vec<serde_json::Value>,
    }
    let w: Raw = parse_json(body, "best_bid_ask")?;
    let mut out: Vec<Ticker> =
        Vec::with_capacity(w.pricebooks.len().min(asked.map_or(usize::MAX, <[_]>::len)));
    let mut at = std::collections::HashMap::new();
    for entry in w.pricebooks {
        let named = match asked {
            None => None,
            Some(asked) => {
                let id = entry.get("product_id").and_then(serde_json::Value::as_str);
                match id.and_then(|id| asked.iter().find(|p| p.as_str() == id)) {
                    Some(p) => Some(p),
                    None => continue,
                }
            }
        };
        let ticker = book_ticker(entry).map_err(|e| match (e, named) {
            (Error::Decode(m), Some(p)) => Error::Decode(format!("entry for {p}: {m}")),
            (e, _) => e,
        })?;
        let Some(t) = ticker else { continue };
        match at.get(&t.product) {
            None => {
                at.insert(t.product.clone(), out.len());
                out.push(t);
            }
            Some(&i) if out[i] == t => {}
            Some(_) => {
                return Err(Error::decode(format_args!(
                    "best_bid_ask answered {} twice, differently",
                    t.product
                )));
            }
        }
    }
    Ok(out)
}

/// One `pricebooks` entry as a ticker; `None` for a book with both sides empty.
fn book_ticker(entry: serde_json::Value) -> Result<Option<Ticker>> {
    let book: PriceBook =
        serde_json::from_value(entry).map_err(|e| Error::decode(format_args!("pricebook: {e}")))?;
    let product = product_of(&book.product_id)?;
    let side = |levels: &[Level], field: &str| -> Result<Option<Decimal>> {
        levels.first().map(|l| validate::price(parse_decimal(&l.price, field)?, field)).transpose()
    };
    let best_bid = side(&book.bids, "bids[0].price")?;
    let best_ask = side(&book.asks, "asks[0].price")?;
    validate::book(best_bid, best_ask, "pricebook")?;
    let price = match (best_bid, best_ask) {
        (Some(b), Some(a)) => mid_price(b, a),
        (Some(p), None) | (None, Some(p)) => p,
        (None, None) => return Ok(None),
    };
    let time = if book.time.is_empty() {
        OffsetDateTime::UNIX_EPOCH
    } else {
        validate::not_before_earliest(parse_time(&book.time, "pricebook.time")?, "pricebook.time")?
    };
    Ok(Some(Ticker { product, price, best_bid, best_ask, time, price_kind: PriceKind::Mid }))
}

/// Decode a product-book body for `product`, asked with `limit` levels a side (`None`: the
/// exchange's default).
///
/// # Errors
/// [`Error::Decode`] for a malformed body, a book of another product (or of none), a side with
/// more levels than asked, a price that is not positive or a negative size, a side out of
/// order or with a price twice, a crossed book, a negative spread, or a time before 2009.
pub fn decode_order_book(product: &ProductId, limit: Option<u32>, body: &[u8]) -> Result<OrderBook> {
    let w: ProductBook = parse_json(body, "product_book")?;
    let b = &w.pricebook;
    if !validate::same_market(product, &b.product_id) {
        return Err(Error::decode(format_args!(
            "product_book for {product} is the book of {:?}",
            crate::error::truncate(&b.product_id, 40)
        )));
    }
    let side =
        |levels: &[Level], name: &str, better: fn(Decimal, Decimal) -> bool| -> Result<Vec<BookLevel>> {
            if let Some(l) = limit
                && levels.len() > l as usize
            {
                return Err(Error::decode(format_args!(
                    "product_book for {product} has {} {name}, more than the {l} asked for",
                    levels.len()
                )));
            }
            let mut out: Vec<BookLevel> = Vec::with_capacity(levels.len());
            for l in levels {
                let level = BookLevel {
                    price: validate::price(parse_decimal(&l.price, "pricebook price")?, "pricebook price")?,
                    size: validate::amount(parse_decimal(&l.size, "pricebook size")?, "pricebook size")?,
                };
                if let Some(prev) = out.last()
                    && !better(prev.price, level.price)
                {
                    return Err(Error::decode(format_args!(
                        "product_book for {product}: {name} out of order or repeated ({} then {})",
                        prev.price, level.price
                    )));
                }
                out.push(level);
            }
            Ok(out)
        };
    let bids = side(&b.bids, "bids", |prev, next| prev > next)?;
    let asks = side(&b.asks, "asks", |prev, next| prev < next)?;
    validate::book(bids.first().map(|l| l.price), asks.first().map(|l| l.price), "product_book")?;
    let extra = |v: &Option<String>, field: &str| -> Result<Option<Decimal>> {
        v.as_deref().map_or(Ok(None), |s| parse_opt_decimal(s, field))
    };
    let last = extra(&w.last, "last")?.map(|p| validate::price(p, "last")).transpose()?;
    let mid_market =
        extra(&w.mid_market, "mid_market")?.map(|p| validate::price(p, "mid_market")).transpose()?;
    let spread_bps =
        extra(&w.spread_bps, "spread_bps")?.map(|s| validate::amount(s, "spread_bps")).transpose()?;
    let spread_absolute = extra(&w.spread_absolute, "spread_absolute")?
        .map(|s| validate::amount(s, "spread_absolute"))
        .transpose()?;
    let time = if b.time.trim().is_empty() {
        OffsetDateTime::UNIX_EPOCH
    } else {
        validate::not_before_earliest(parse_time(&b.time, "pricebook.time")?, "pricebook.time")?
    };
    Ok(OrderBook {
        product: product.clone(),
        bids,
        asks,
        time,
        last,
        mid_market,
        spread_bps,
        spread_absolute,
    })
}

impl From<&OrderBook> for ProductBook {
    /// The wire body of `b`, as Coinbase would send it (decimals keep the scale they were
    /// read with, so a book read and written again is the same text).
    fn from(b: &OrderBook) -> Self {
        ProductBook::of(b, usize::MAX)
    }
}

impl ProductBook {
    /// The wire body of `b` cut to `levels` levels a side (what the exchange answers to a
    /// smaller `limit` at the same moment).
    pub fn of(b: &OrderBook, levels: usize) -> Self {
        let levels = |side: &[BookLevel]| {
            side.iter()
                .take(levels)
                .map(|l| Level { price: l.price.to_string(), size: l.size.to_string() })
                .collect()
        };
        let dec = |d: Option<Decimal>| d.map(|d| d.to_string());
        ProductBook {
            pricebook: PriceBook {
                product_id: b.product.to_string(),
                bids: levels(&b.bids),
                asks: levels(&b.asks),
                time: if b.time == OffsetDateTime::UNIX_EPOCH { String::new() } else { format_time(b.time) },
            },
            last: dec(b.last),
            mid_market: dec(b.mid_market),
            spread_bps: dec(b.spread_bps),
            spread_absolute: dec(b.spread_absolute),
        }
    }
}

/// Decode a product-book body into a top-of-book ticker (price = bid/ask mid).
///
/// # Errors
/// [`Error::Decode`] for a malformed body, or a book with both sides empty.
pub fn decode_product_book(body: &[u8]) -> Result<Ticker> {
    let w: ProductBook = parse_json(body, "product_book")?;
    let wrapped = BestBidAsk { pricebooks: vec![w.pricebook] };
    let bytes = serde_json::to_vec(&wrapped).map_err(Error::decode)?;
    decode_best_bid_ask(&bytes)?.pop().ok_or_else(|| Error::decode("product book has no bids and no asks"))
}

/// Decode one page of accounts, and the cursor of the next page (`None` on the last page).
///
/// # Errors
/// [`Error::Decode`] for a malformed body or amount, a negative amount, an account without a
/// `uuid` or `currency`, an amount in another currency than its account's, or `has_next: true`
/// without a cursor.
pub fn decode_accounts(body: &[u8]) -> Result<(Vec<Account>, Option<String>)> {
    let w: Accounts = parse_json(body, "accounts")?;
    let accounts = w.accounts.iter().map(account_from_wire).collect::<Result<Vec<_>>>()?;
    if w.has_next && w.cursor.trim().is_empty() {
        return Err(Error::decode("accounts: has_next is true but the cursor is empty"));
    }
    let next = w.has_next.then_some(w.cursor);
    Ok((accounts, next))
}

/// Convert one wire account.
///
/// # Errors
/// [`Error::Decode`] when an amount is not a number or is negative, the `uuid` or `currency`
/// is empty, or an amount's currency is not the account's.
pub fn account_from_wire(a: &WireAccount) -> Result<Account> {
    if a.uuid.trim().is_empty() {
        return Err(Error::decode("account without a uuid"));
    }
    let currency = a.currency.trim().to_ascii_uppercase();
    if currency.is_empty() {
        return Err(Error::decode("account without a currency"));
    }
    let money = |m: &Money, field: &str| -> Result<Decimal> {
        if !m.currency.trim().is_empty() && !m.currency.trim().eq_ignore_ascii_case(&currency) {
            return Err(Error::decode(format_args!(
                "{field} is in {:?}, the account in {currency:?}",
                crate::error::truncate(&m.currency, 16)
            )));
        }
        validate::amount(parse_decimal(&m.value, field)?, field)
    };
    let available = money(&a.available_balance, "available_balance.value")?;
    let hold = match &a.hold {
        Some(h) if !h.value.trim().is_empty() => money(h, "hold.value")?,
        _ => Decimal::ZERO,
    };
    Ok(Account {
        uuid: a.uuid.clone(),
        name: a.name.clone(),
        currency,
        available,
        hold,
        active: a.active,
        account_type: a.account_type.clone(),
    })
}

/// Decode a products list, returning the product ids in order.
///
/// # Errors
/// [`Error::Decode`] for a malformed body (one without `products`) or product id.
pub fn decode_products(body: &[u8]) -> Result<Vec<Product>> {
    let w: Products = parse_json(body, "products")?;
    for p in &w.products {
        product_of(&p.product_id)?;
    }
    Ok(w.products)
}

/// Decode a products list that answers `GET /market/products?product_ids=…` for `asked` into
/// tickers, in the body's order (Coinbase's keyless batch of last prices, COINBASE.md §2.5,
/// §7).
///
/// What the list says, and no more: `price` is the product's **last trade price** (Coinbase
/// caches public answers for 1 s); the list carries **no best bid or ask** (`best_bid` and
/// `best_ask` are `None`; `mid_market_price` is `""` in real data and not a quote) and **no
/// time**, so `time` is `received_at`, the client's clock when the answer arrived. Entries
/// for products not asked for are dropped without being decoded; an asked product with an
/// empty `price` has no last trade to report and is left out, as an unknown product is.
///
/// # Errors
/// [`Error::Decode`] for a body without `products`, an asked product's malformed entry, a
/// price that is not positive, or one product listed twice with different prices (the message
/// names the product).
pub fn decode_product_tickers_for(
    asked: &[ProductId],
    body: &[u8],
    received_at: OffsetDateTime,
) -> Result<Vec<Ticker>> {
    /// Entries stay raw until their product is known to be asked for.
    #[derive(Deserialize)]
    struct Raw {
        products: Vec<serde_json::Value>,
    }
    let w: Raw = parse_json(body, "products")?;
    let mut out: Vec<Ticker> = Vec::with_capacity(w.products.len().min(asked.len()));
    for entry in w.products {
        let id = entry.get("product_id").and_then(serde_json::Value::as_str);
        let Some(product) = id.and_then(|id| asked.iter().find(|p| p.as_str() == id)) else { continue };
        let named = |e: Error| match e {
            Error::Decode(m) => Error::Decode(format!("product {product}: {m}")),
            e => e,
        };
        let p: Product = serde_json::from_value(entry)
            .map_err(|e| Error::decode(format_args!("product {product}: {e}")))?;
        let Some(price) = parse_opt_decimal(&p.price, "price").map_err(named)? else { continue };
        let price = validate::price(price, "price").map_err(named)?;
        match out.iter().find(|t| &t.product == product) {
            None => out.push(Ticker {
                product: product.clone(),
                price,
                best_bid: None,
                best_ask: None,
                time: received_at,
                price_kind: PriceKind::LastTrade,
            }),
            Some(t) if t.price == price => {}
            Some(_) => {
                return Err(Error::decode(format_args!("products answered {product} twice, differently")));
            }
        }
    }
    Ok(out)
}

/// Decode one product (the bare object the single-product endpoint returns).
///
/// # Errors
/// [`Error::Decode`] for a malformed body or product id.
pub fn decode_product(body: &[u8]) -> Result<Product> {
    let p: Product = parse_json(body, "product")?;
    product_of(&p.product_id)?;
    Ok(p)
}

/// Decode `GET /time`.
///
/// # Errors
/// [`Error::Decode`] for a malformed body or a time before 2009.
pub fn decode_server_time(body: &[u8]) -> Result<OffsetDateTime> {
    let w: ServerTime = parse_json(body, "time")?;
    let t = if !w.epoch_millis.trim().is_empty()
        && let Ok(ms) = w.epoch_millis.trim().parse::<i64>()
    {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
            .map_err(|_| Error::decode("epochMillis is out of range"))?
    } else if !w.epoch_seconds.trim().is_empty() {
        parse_unix(&w.epoch_seconds, "epochSeconds")?
    } else {
        parse_time(&w.iso, "iso")?
    };
    validate::not_before_earliest(t, "server time")
}

/// Format a time as Coinbase does (RFC 3339, UTC, microseconds).
pub fn format_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn decimals_and_times() {
        assert_eq!(parse_decimal("66363.03", "x").unwrap(), Decimal::new(6636303, 2));
        assert_eq!(parse_decimal("0.0000000000000000", "x").unwrap(), Decimal::ZERO);
        assert!(matches!(parse_decimal("", "x"), Err(Error::Decode(_))));
        assert!(matches!(parse_decimal("abc", "x"), Err(Error::Decode(_))));
        assert!(matches!(parse_decimal("1e999999", "x"), Err(Error::Decode(_))));
        let t = parse_time("2024-04-24T09:56:38.063595Z", "t").unwrap();
        assert_eq!(format_time(t), "2024-04-24T09:56:38.063595Z");
        assert_eq!(format_time(datetime!(2024-01-01 00:00 UTC)), "2024-01-01T00:00:00.000000Z");
    }

    /// Issue 16: the clock-free rules of the module table, decoder by decoder.
    #[test]
    fn answers_that_cannot_be_true_are_decode_errors() {
        let btc: ProductId = "BTC-USD".parse().unwrap();
        let trade = |product: &str, price: &str, bid: &str, ask: &str, time: &str| {
            format!(
                r#"{{"trades":[{{"product_id":"{product}","price":"{price}","time":"{time}"}}],"best_bid":"{bid}","best_ask":"{ask}"}}"#
            )
        };
        let t = "2024-04-24T09:56:38Z";
        let bad_tickers = [
            "{}".to_string(),
            r#"{"error":"INTERNAL","message":"x"}"#.into(),
            trade("ETH-USD", "1", "", "", t),
            trade("BTC-USD", "0", "", "", t),
            trade("BTC-USD", "1", "2", "1", t),
            trade("BTC-USD", "1", "0", "", t),
            trade("BTC-USD", "1", "", "", "2008-12-31T23:59:59Z"),
        ];
        for body in &bad_tickers {
            assert!(matches!(decode_ticker(&btc, body.as_bytes()), Err(Error::Decode(_))), "{body}");
        }
        assert!(decode_ticker(&btc, trade("", "1", "1", "1", t).as_bytes()).is_ok(), "locked, no id");
        assert!(decode_ticker(&btc, trade("BTC-USDC", "1", "", "", t).as_bytes()).is_ok(), "alias");
        let e = decode_ticker(&btc, br#"{"error":"INTERNAL","message":"x"}"#).unwrap_err();
        assert_eq!(e, Error::Decode("ticker: a 200 answer carrying an error object (INTERNAL)".into()));

        let book = |id: &str, bid: &str, ask: &str| {
            format!(
                r#"{{"product_id":"{id}","bids":[{{"price":"{bid}","size":"1"}}],"asks":[{{"price":"{ask}","size":"1"}}]}}"#
            )
        };
        let books = |entries: &[String]| format!(r#"{{"pricebooks":[{}]}}"#, entries.join(","));
        for body in [
            "{}".to_string(),
            books(&[book("BTC-USD", "2", "1")]),
            books(&[book("BTC-USD", "-1", "1")]),
            books(&[book("BTC-USD", "1", "2"), book("BTC-USD", "1", "3")]),
            books(&[book("BTC-USD", "1", "2"), r#"{"product_id":"ETH-USD","bids":"x"}"#.into()]),
        ] {
            assert!(matches!(decode_best_bid_ask(body.as_bytes()), Err(Error::Decode(_))), "{body}");
        }
        let dup = books(&[book("BTC-USD", "1", "3"), book("ETH-USD", "1", "1"), book("BTC-USD", "1", "3")]);
        let got = decode_best_bid_ask(dup.as_bytes()).unwrap();
        assert_eq!(got.iter().map(|t| t.product.as_str()).collect::<Vec<_>>(), ["BTC-USD", "ETH-USD"]);
        let extra = books(&[r#"{"product_id":"ETH-USD","bids":"x"}"#.into(), book("BTC-USD", "1", "3")]);
        let got = decode_best_bid_ask_for(std::slice::from_ref(&btc), extra.as_bytes()).unwrap();
        assert_eq!(got.len(), 1);
        let e = decode_best_bid_ask_for(
            std::slice::from_ref(&btc),
            books(&[book("BTC-USD", "x", "1")]).as_bytes(),
        );
        assert!(matches!(e, Err(Error::Decode(ref m)) if m.starts_with("entry for BTC-USD: ")), "{e:?}");

        let candle = |o: &str, h: &str, l: &str, c: &str, v: &str| {
            format!(
                r#"{{"candles":[{{"start":"1713942000","low":"{l}","high":"{h}","open":"{o}","close":"{c}","volume":"{v}"}}]}}"#
            )
        };
        for body in [
            "{}".to_string(),
            candle("1", "1", "2", "1", "1"),
            candle("3", "2", "1", "1", "1"),
            candle("1", "2", "1", "0.5", "1"),
            candle("1", "1", "1", "1", "-1"),
            candle("0", "1", "0", "1", "1"),
            candle("1", "1", "1", "1", "1").replace("1713942000", "1230767999"),
        ] {
            assert!(matches!(decode_candles(body.as_bytes()), Err(Error::Decode(_))), "{body}");
        }
        assert!(decode_candles(candle("1", "1", "1", "1", "0").as_bytes()).is_ok());

        let account = |uuid: &str, cur: &str, value: &str, money_cur: &str| {
            format!(
                r#"{{"accounts":[{{"uuid":"{uuid}","currency":"{cur}","available_balance":{{"value":"{value}","currency":"{money_cur}"}}}}],"has_next":false,"cursor":""}}"#
            )
        };
        for body in [
            "{}".to_string(),
            r#"{"accounts":[]}"#.into(),
            r#"{"accounts":[],"has_next":true,"cursor":""}"#.into(),
            account("", "USD", "1", "USD"),
            account("u", "", "1", ""),
            account("u", "USD", "-1", "USD"),
            account("u", "USD", "1", "BTC"),
        ] {
            assert!(matches!(decode_accounts(body.as_bytes()), Err(Error::Decode(_))), "{body}");
        }
        assert!(decode_accounts(account("u", "usd", "0", "USD").as_bytes()).is_ok());
        assert!(decode_accounts(account("u", "USD", "1", "").as_bytes()).is_ok());
        assert!(matches!(decode_products(b"{}"), Err(Error::Decode(_))));
        let old = br#"{"iso":"2008-01-01T00:00:00Z","epochSeconds":"","epochMillis":""}"#;
        assert!(matches!(decode_server_time(old), Err(Error::Decode(_))));
    }

    #[test]
    fn an_order_book_that_cannot_be_true_is_a_decode_error() {
        let p: ProductId = "BTC-USD".parse().unwrap();
        let book = |bids: &str, asks: &str, extra: &str| {
            format!(
                r#"{{"pricebook":{{"product_id":"BTC-USD","bids":[{bids}],"asks":[{asks}],"time":"2026-01-01T00:00:00.000000Z"}}{extra}}}"#
            )
        };
        let lv = |p: &str, s: &str| format!(r#"{{"price":"{p}","size":"{s}"}}"#);
        let two_bids = format!("{},{}", lv("100.02", "1"), lv("100.01", "2"));
        let ok = book(
            &two_bids,
            &lv("100.03", "1"),
            r#","last":"100.02","mid_market":"100.025","spread_bps":"0.1","spread_absolute":"0.01""#,
        );
        let b = decode_order_book(&p, Some(2), ok.as_bytes()).unwrap();
        assert_eq!((b.bids.len(), b.asks.len()), (2, 1));
        assert_eq!(b.spread_absolute, Some(Decimal::new(1, 2)));
        // Written back, the same text for every number (the scale is kept).
        let again = serde_json::to_value(ProductBook::from(&b)).unwrap();
        assert_eq!(again, serde_json::from_str::<serde_json::Value>(&ok).unwrap());
        assert_eq!(ProductBook::of(&b, 1).pricebook.bids.len(), 1);
        let cases = [
            ("more levels than asked", decode_order_book(&p, Some(1), ok.as_bytes())),
            ("another product", decode_order_book(&"ETH-USD".parse().unwrap(), None, ok.as_bytes())),
            ("no product", decode_order_book(&p, None, ok.replace("\"BTC-USD\"", "\"\"").as_bytes())),
            (
                "bids rising",
                decode_order_book(
                    &p,
                    None,
                    book(&format!("{},{}", lv("1", "1"), lv("2", "1")), "", "").as_bytes(),
                ),
            ),
            (
                "a bid twice",
                decode_order_book(
                    &p,
                    None,
                    book(&format!("{},{}", lv("2", "1"), lv("2", "1")), "", "").as_bytes(),
                ),
            ),
            (
                "asks falling",
                decode_order_book(
                    &p,
                    None,
                    book("", &format!("{},{}", lv("3", "1"), lv("2", "1")), "").as_bytes(),
                ),
            ),
            ("crossed", decode_order_book(&p, None, book(&lv("5", "1"), &lv("4", "1"), "").as_bytes())),
            ("zero price", decode_order_book(&p, None, book(&lv("0", "1"), "", "").as_bytes())),
            ("negative size", decode_order_book(&p, None, book(&lv("1", "-1"), "", "").as_bytes())),
            ("not a number", decode_order_book(&p, None, book(&lv("1", "lots"), "", "").as_bytes())),
            (
                "negative spread",
                decode_order_book(&p, None, book("", "", r#","spread_bps":"-3""#).as_bytes()),
            ),
            ("no pricebook", decode_order_book(&p, None, br#"{"bids":[]}"#)),
        ];
        for (what, r) in cases {
            assert!(matches!(r, Err(Error::Decode(_))), "{what}: {r:?}");
        }
        // Empty extras are "not sent", as elsewhere on the wire.
        let empty = decode_order_book(&p, None, book("", "", r#","last":"""#).as_bytes()).unwrap();
        assert_eq!((empty.last, empty.bids.len()), (None, 0));
    }

    #[test]
    fn products_as_tickers_keep_to_what_was_asked_and_say_no_more() {
        let asked: Vec<ProductId> =
            ["ETH-USD", "BTC-USD", "ADA-USD", "SOL-USD"].iter().map(|s| s.parse().unwrap()).collect();
        let at = time::macros::datetime!(2024-04-24 09:56:38 UTC);
        let entry = |id: &str, price: &str| {
            format!(r#"{{"product_id":"{id}","price":"{price}","mid_market_price":"","status":"online"}}"#)
        };
        let body = format!(
            r#"{{"products":[{},{},{{"product_id":"DOGE-USD","price":{{}}}},{},{},{}],"num_products":"5"}}"#,
            entry("BTC-USD", "100.5"),
            entry("XRP-USD", "-1"),
            entry("ETH-USD", "2000"),
            entry("ADA-USD", ""),
            entry("BTC-USD", "100.50"),
        );
        let got = decode_product_tickers_for(&asked, body.as_bytes(), at).unwrap();
        let ticker = |id: &str, price| Ticker {
            product: id.parse().unwrap(),
            price,
            best_bid: None,
            best_ask: None,
            time: at,
            price_kind: PriceKind::LastTrade,
        };
        assert_eq!(
            got,
            [ticker("BTC-USD", Decimal::new(1005, 1)), ticker("ETH-USD", Decimal::new(2000, 0))],
            "not asked: dropped unread; no price: left out; identical duplicate: one; no bid/ask"
        );
        for (bad, what) in [
            (format!(r#"{{"products":[{},{}]}}"#, entry("BTC-USD", "1"), entry("BTC-USD", "2")), "twice"),
            (
                format!(r#"{{"products":[{}]}}"#, entry("SOL-USD", "0")),
                "product SOL-USD: price is not a positive",
            ),
            (
                format!(r#"{{"products":[{}]}}"#, entry("SOL-USD", "one")),
                "product SOL-USD: price is not a decimal",
            ),
            (r#"{"products":[{"product_id":"SOL-USD","price":7}]}"#.to_string(), "product SOL-USD"),
            ("{}".to_string(), "missing field"),
        ] {
            match decode_product_tickers_for(&asked, bad.as_bytes(), at) {
                Err(Error::Decode(m)) => assert!(m.contains(what), "{m} / {what}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn empty_strings_are_tolerated_where_coinbase_sends_them() {
        let body = br#"{"trades":[{"trade_id":"1","product_id":"BTC-USD","price":"10","size":"1","time":"2024-04-24T09:56:38Z","side":"BUY","bid":"","ask":""}],"best_bid":"","best_ask":""}"#;
        let t = decode_ticker(&"BTC-USD".parse().unwrap(), body).unwrap();
        assert_eq!((t.best_bid, t.best_ask), (None, None));
        assert_eq!(t.price, Decimal::TEN);
    }

    /// The recent-trades decoder: every trade checked, no more than asked, no id twice.
    #[test]
    fn recent_trades_are_checked_trade_by_trade() {
        let btc: ProductId = "BTC-USD".parse().unwrap();
        let trade = |id: &str, price: &str, size: &str, time: &str| {
            format!(
                r#"{{"trade_id":"{id}","product_id":"BTC-USD","price":"{price}","size":"{size}","time":"{time}","side":"SELL","bid":"","ask":""}}"#
            )
        };
        let body = |trades: &[String]| {
            format!(r#"{{"trades":[{}],"best_bid":"99.5","best_ask":"100.5"}}"#, trades.join(","))
        };
        let (t1, t2) = ("2024-04-24T09:56:38.063595Z", "2024-04-24T09:56:39.000001Z");
        // Out of order on the wire: served most recent first; an identical repeat collapses.
        let ok = body(&[
            trade("1", "100", "0.5", t1),
            trade("2", "101.25", "0", t2),
            trade("1", "100", "0.5", t1),
        ]);
        let got = decode_recent_trades(&btc, 3, ok.as_bytes()).unwrap();
        assert_eq!(got.trades.iter().map(|t| t.trade_id.as_str()).collect::<Vec<_>>(), ["2", "1"]);
        assert_eq!(got.trades[0].price, Decimal::new(10125, 2));
        assert_eq!(got.trades[0].side, TradeSide::Sell);
        assert_eq!((got.best_bid, got.best_ask), (Some(Decimal::new(995, 1)), Some(Decimal::new(1005, 1))));
        // Back on the wire: the exchange's strings.
        let wire = MarketTrades::from(&got);
        assert_eq!(wire.trades[0].price, "101.25");
        assert_eq!(wire.trades[1].time, t1);
        assert_eq!(wire.trades[1].side, "SELL");
        let bad = |b: String, limit: u32| {
            let e = decode_recent_trades(&btc, limit, b.as_bytes());
            assert!(matches!(e, Err(Error::Decode(_))), "{b}: {e:?}");
        };
        bad(body(&[trade("1", "100", "1", t1), trade("2", "100", "1", t2)]), 1); // more than asked
        bad(body(&[trade("1", "100", "1", t1), trade("1", "100", "2", t1)]), 5); // one id, two trades
        bad(body(&[trade("", "100", "1", t1)]), 5);
        bad(body(&[trade("1", "0", "1", t1)]), 5);
        bad(body(&[trade("1", "100", "-1", t1)]), 5);
        bad(body(&[trade("1", "100", "", t1)]), 5);
        bad(body(&[trade("1", "100", "1", "2001-01-01T00:00:00Z")]), 5);
        bad(body(&[trade("1", "100", "1", t1).replace("BTC-USD", "ETH-USD")]), 5);
        bad(body(&[trade("1", "100", "1", t1)]).replace("99.5", "101"), 5); // crossed book
        bad(r#"{"best_bid":"1"}"#.to_string(), 5);
        // The alias market answers for its pair; an empty list is a valid empty answer.
        let alias = body(&[trade("1", "100", "1", t1).replace("BTC-USD", "BTC-USDC")]);
        assert_eq!(decode_recent_trades(&btc, 1, alias.as_bytes()).unwrap().trades.len(), 1);
        assert!(decode_recent_trades(&btc, 1, body(&[]).as_bytes()).unwrap().trades.is_empty());
    }
}
