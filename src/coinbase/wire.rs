//! Coinbase Advanced Trade v3 bodies exactly as they travel on the wire.
//!
//! Numbers are JSON strings and some fields arrive as `""`; these structs keep them as
//! strings and the `decode_*` functions turn a body into the domain model, answering
//! [`Error::Decode`] (never a panic) for anything malformed. The simulated exchange serializes
//! the same structs, so the client and the simulator cannot drift apart. Public so that host
//! applications and fuzzers can decode captured bodies.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::{
    error::{Error, Result},
    model::{Account, Candle, ProductId, Ticker, mid_price},
};

/// `GET /market/products/{id}/ticker` and `GET /products/{id}/ticker`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarketTrades {
    /// Most recent trades first.
    #[serde(default)]
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
    /// Newest first, as observed (not documented).
    #[serde(default)]
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

/// `GET /best_bid_ask`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BestBidAsk {
    /// One book per product.
    #[serde(default)]
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
    /// The products.
    #[serde(default)]
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
    /// This page's accounts.
    #[serde(default)]
    pub accounts: Vec<WireAccount>,
    /// Whether another page follows.
    #[serde(default)]
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
    serde_json::from_slice(body).map_err(|e| Error::decode(format_args!("{what}: {e}")))
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
/// The price is the most recent trade's; with no trades, the bid/ask mid.
///
/// # Errors
/// [`Error::Decode`] for a malformed body or one with neither trades nor a two-sided book.
pub fn decode_ticker(product: &ProductId, body: &[u8]) -> Result<Ticker> {
    let w: MarketTrades = parse_json(body, "ticker")?;
    let best_bid = parse_opt_decimal(&w.best_bid, "best_bid")?;
    let best_ask = parse_opt_decimal(&w.best_ask, "best_ask")?;
    let (price, time) = match w.trades.first() {
        Some(t) => (parse_decimal(&t.price, "trades[0].price")?, parse_time(&t.time, "trades[0].time")?),
        None => match (best_bid, best_ask) {
            (Some(b), Some(a)) => (mid_price(b, a), OffsetDateTime::UNIX_EPOCH),
            _ => return Err(Error::decode("ticker has no trades and no two-sided book")),
        },
    };
    Ok(Ticker { product: product.clone(), price, best_bid, best_ask, time })
}

/// Decode a candles body, oldest first, de-duplicated by start time.
///
/// # Errors
/// [`Error::Decode`] for a malformed body or candle.
pub fn decode_candles(body: &[u8]) -> Result<Vec<Candle>> {
    let w: Candles = parse_json(body, "candles")?;
    let mut out = w.candles.iter().map(candle_from_wire).collect::<Result<Vec<_>>>()?;
    out.sort_by_key(|c| c.start);
    out.dedup_by_key(|c| c.start);
    Ok(out)
}

/// Convert one wire candle.
///
/// # Errors
/// [`Error::Decode`] when a field is not a number.
pub fn candle_from_wire(c: &WireCandle) -> Result<Candle> {
    Ok(Candle {
        start: parse_unix(&c.start, "candle.start")?,
        open: parse_decimal(&c.open, "candle.open")?,
        high: parse_decimal(&c.high, "candle.high")?,
        low: parse_decimal(&c.low, "candle.low")?,
        close: parse_decimal(&c.close, "candle.close")?,
        volume: parse_decimal(&c.volume, "candle.volume")?,
    })
}

/// Decode a `best_bid_ask` body into tickers (price = bid/ask mid).
///
/// A book with both sides empty is left out: there is no price to report.
///
/// # Errors
/// [`Error::Decode`] for a malformed body or entry.
pub fn decode_best_bid_ask(body: &[u8]) -> Result<Vec<Ticker>> {
    let w: BestBidAsk = parse_json(body, "best_bid_ask")?;
    let mut out = Vec::with_capacity(w.pricebooks.len());
    for book in &w.pricebooks {
        let product = product_of(&book.product_id)?;
        let best_bid = book.bids.first().map(|l| parse_decimal(&l.price, "bids[0].price")).transpose()?;
        let best_ask = book.asks.first().map(|l| parse_decimal(&l.price, "asks[0].price")).transpose()?;
        let price = match (best_bid, best_ask) {
            (Some(b), Some(a)) => mid_price(b, a),
            (Some(p), None) | (None, Some(p)) => p,
            (None, None) => continue,
        };
        let time = if book.time.is_empty() {
            OffsetDateTime::UNIX_EPOCH
        } else {
            parse_time(&book.time, "pricebook.time")?
        };
        out.push(Ticker { product, price, best_bid, best_ask, time });
    }
    Ok(out)
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

/// Decode one page of accounts.
///
/// # Errors
/// [`Error::Decode`] for a malformed body or amount.
pub fn decode_accounts(body: &[u8]) -> Result<(Vec<Account>, Option<String>)> {
    let w: Accounts = parse_json(body, "accounts")?;
    let accounts = w.accounts.iter().map(account_from_wire).collect::<Result<Vec<_>>>()?;
    let next = (w.has_next && !w.cursor.is_empty()).then_some(w.cursor);
    Ok((accounts, next))
}

/// Convert one wire account.
///
/// # Errors
/// [`Error::Decode`] when an amount is not a number.
pub fn account_from_wire(a: &WireAccount) -> Result<Account> {
    Ok(Account {
        uuid: a.uuid.clone(),
        name: a.name.clone(),
        currency: a.currency.to_ascii_uppercase(),
        available: parse_decimal(&a.available_balance.value, "available_balance.value")?,
        hold: match &a.hold {
            Some(h) if !h.value.trim().is_empty() => parse_decimal(&h.value, "hold.value")?,
            _ => Decimal::ZERO,
        },
        active: a.active,
        account_type: a.account_type.clone(),
    })
}

/// Decode a products list, returning the product ids in order.
///
/// # Errors
/// [`Error::Decode`] for a malformed body or product id.
pub fn decode_products(body: &[u8]) -> Result<Vec<Product>> {
    let w: Products = parse_json(body, "products")?;
    for p in &w.products {
        product_of(&p.product_id)?;
    }
    Ok(w.products)
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
/// [`Error::Decode`] for a malformed body.
pub fn decode_server_time(body: &[u8]) -> Result<OffsetDateTime> {
    let w: ServerTime = parse_json(body, "time")?;
    if !w.epoch_millis.trim().is_empty()
        && let Ok(ms) = w.epoch_millis.trim().parse::<i64>()
    {
        return OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
            .map_err(|_| Error::decode("epochMillis is out of range"));
    }
    if !w.epoch_seconds.trim().is_empty() {
        return parse_unix(&w.epoch_seconds, "epochSeconds");
    }
    parse_time(&w.iso, "iso")
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

    #[test]
    fn empty_strings_are_tolerated_where_coinbase_sends_them() {
        let body = br#"{"trades":[{"trade_id":"1","product_id":"BTC-USD","price":"10","size":"1","time":"2024-04-24T09:56:38Z","side":"BUY","bid":"","ask":""}],"best_bid":"","best_ask":""}"#;
        let t = decode_ticker(&"BTC-USD".parse().unwrap(), body).unwrap();
        assert_eq!((t.best_bid, t.best_ask), (None, None));
        assert_eq!(t.price, Decimal::TEN);
    }
}
