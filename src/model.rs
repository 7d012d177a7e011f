//! The domain model: products, tickers, candles, granularities, accounts and balances.
//!
//! Every price and amount is a [`Decimal`]; floats never appear.

use std::{collections::BTreeMap, fmt, str::FromStr, sync::Arc, time::Duration};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::{Error, Result};

/// The longest product id accepted (`BTC-PERP-INTX` is 13 bytes; real ids are far shorter).
pub const MAX_PRODUCT_ID_LEN: usize = 32;

/// A validated Coinbase product id such as `BTC-USD`.
///
/// Ids are upper-case ASCII letters and digits in two or more `-`-separated segments
/// (`BASE-QUOTE`, or longer for derivatives such as `BTC-PERP-INTX`), at most
/// [`MAX_PRODUCT_ID_LEN`] bytes. Cloning is cheap (a reference count).
///
/// ```
/// use tickshare::ProductId;
/// let id: ProductId = "BTC-USD".parse()?;
/// assert_eq!((id.base(), id.quote()), ("BTC", "USD"));
/// assert!("btc-usd".parse::<ProductId>().is_err());
/// # Ok::<(), tickshare::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ProductId(Arc<str>);

impl ProductId {
    /// Validate and build a product id.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when the id is empty, too long, contains lower-case letters,
    /// whitespace or other characters, or is not of the form `BASE-QUOTE`.
    pub fn new(id: &str) -> Result<Self> {
        validate_product_id(id)?;
        Ok(ProductId(Arc::from(id)))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The base currency (the first segment): `BTC` in `BTC-USD`.
    pub fn base(&self) -> &str {
        self.0.split('-').next().unwrap_or_default()
    }

    /// The quote currency (the second segment): `USD` in `BTC-USD`.
    pub fn quote(&self) -> &str {
        self.0.split('-').nth(1).unwrap_or_default()
    }

    /// The `-USD` product whose book serves this `-USDC` one, or `None`.
    ///
    /// Coinbase aliases `X-USDC` to `X-USD` (the product's `alias_to`): one book, and its
    /// market-data WebSocket channels answer a `BTC-USDC` subscription with `BTC-USD` frames and
    /// acknowledgements (COINBASE.md §5). [`USDC_OWN_MARKETS`] are the exceptions, markets of
    /// their own on every channel.
    ///
    /// ```
    /// use tickshare::ProductId;
    /// let twin = |s: &str| s.parse::<ProductId>().unwrap().usd_alias().map(String::from);
    /// assert_eq!(twin("BTC-USDC").as_deref(), Some("BTC-USD"));
    /// assert_eq!(twin("USDT-USDC"), None);
    /// assert_eq!(twin("BTC-USD"), None);
    /// ```
    pub fn usd_alias(&self) -> Option<ProductId> {
        let base = self.0.strip_suffix("-USDC")?;
        if base.contains('-') || USDC_OWN_MARKETS.contains(&self.as_str()) {
            return None;
        }
        Some(ProductId(Arc::from(format!("{base}-USD"))))
    }

    /// The product whose book serves this one: its [`usd_alias`](Self::usd_alias), or itself.
    pub fn book_id(&self) -> ProductId {
        self.usd_alias().unwrap_or_else(|| self.clone())
    }
}

/// The `-USDC` products that are markets of their own, not aliases of a `-USD` twin
/// (COINBASE.md §5: "USDT-USDC and EURC-USDC are the exceptions, on all channels").
pub const USDC_OWN_MARKETS: [&str; 2] = ["USDT-USDC", "EURC-USDC"];

fn validate_product_id(id: &str) -> Result<()> {
    // The id as the message shows it, made only on failure (this runs on every proxy request).
    let fail = |why: &str| {
        let shown = crate::error::truncate(&id.escape_debug().to_string(), 48);
        Err(Error::InvalidInput(format!("product id \"{shown}\" {why}")))
    };
    if id.is_empty() {
        return fail("is empty; expected BASE-QUOTE such as BTC-USD");
    }
    if id.len() > MAX_PRODUCT_ID_LEN {
        return fail(&format!("is longer than {MAX_PRODUCT_ID_LEN} bytes"));
    }
    // One pass over the characters (this runs on every proxy request); the first failing rule
    // in this order names the error.
    let (mut space, mut lower, mut other) = (false, false, false);
    for c in id.chars() {
        if c.is_whitespace() {
            space = true;
        } else if c.is_ascii_lowercase() {
            lower = true;
        } else if !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '-') {
            other = true;
        }
    }
    if space {
        return fail("contains whitespace");
    }
    if lower {
        return fail("must be upper-case, e.g. BTC-USD");
    }
    if other {
        return fail("may contain only A-Z, 0-9 and '-'");
    }
    if !id.contains('-') || id.starts_with('-') || id.ends_with('-') || id.contains("--") {
        return fail("is not of the form BASE-QUOTE, e.g. BTC-USD");
    }
    Ok(())
}

impl FromStr for ProductId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ProductId::new(s)
    }
}

impl TryFrom<String> for ProductId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        validate_product_id(&s)?;
        Ok(ProductId(Arc::from(s)))
    }
}

impl TryFrom<&str> for ProductId {
    type Error = Error;
    fn try_from(s: &str) -> Result<Self> {
        ProductId::new(s)
    }
}

impl From<ProductId> for String {
    fn from(p: ProductId) -> String {
        p.0.to_string()
    }
}

impl AsRef<str> for ProductId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProductId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ProductId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// The latest price of a product with the best bid and ask.
///
/// `price` is the **last trade** on every path of this crate (the legacy market-trades call,
/// the coordinated source's batched `GET /market/products?product_ids=…` call, the WebSocket
/// `ticker` channel, the Redis tier, the blocking facade). The one exception is a ticker
/// built from the book alone (the `best_bid_ask` or product-book endpoints, which carry no
/// trades): its price is the bid/ask mid and [`price_kind`](Self::price_kind) says so. An
/// empty or unknown side of the book is `None`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticker {
    /// The product.
    pub product: ProductId,
    /// The last trade price (see [`price_kind`](Self::price_kind)).
    pub price: Decimal,
    /// The best bid, if the book has one (and the path carries the book).
    pub best_bid: Option<Decimal>,
    /// The best ask, if the book has one (and the path carries the book).
    pub best_ask: Option<Decimal>,
    /// When the exchange observed this price.
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// Which price `price` is: the last trade unless the path only knew the book.
    #[serde(default)]
    pub price_kind: PriceKind,
}

/// What [`Ticker::price`] carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PriceKind {
    /// The last trade's price (every path by default).
    #[default]
    LastTrade,
    /// The bid/ask mid: the ticker came from a book-only endpoint (`best_bid_ask`,
    /// `product_book`) or a market-trades answer without trades.
    Mid,
}

impl Ticker {
    /// The bid/ask mid price, when both sides are present.
    pub fn mid(&self) -> Option<Decimal> {
        Some(mid_price(self.best_bid?, self.best_ask?))
    }
}

/// A product's most recent trades and its best bid and ask, as
/// `GET .../products/{id}/ticker?limit=N` answers them
/// ([`CoinbaseClient::recent_trades`](crate::CoinbaseClient::recent_trades)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentTrades {
    /// The product asked for.
    pub product: ProductId,
    /// Most recent first; at most the `limit` asked for, each trade id once.
    pub trades: Vec<MarketTrade>,
    /// The best bid, if the book has one.
    pub best_bid: Option<Decimal>,
    /// The best ask, if the book has one.
    pub best_ask: Option<Decimal>,
}

/// A product's order book, as `GET .../product_book?product_id=…&limit=N` answers it
/// ([`CoinbaseClient::order_book`](crate::CoinbaseClient::order_book)), every level checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderBook {
    /// The product asked for.
    pub product: ProductId,
    /// Bids, best (highest) first: prices strictly falling, each price once.
    pub bids: Vec<BookLevel>,
    /// Asks, best (lowest) first: prices strictly rising, each price once.
    pub asks: Vec<BookLevel>,
    /// The book's time (the UNIX epoch when the exchange gave none).
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// The last trade's price, when the exchange sent it beside the book (`last`).
    pub last: Option<Decimal>,
    /// `mid_market`, when sent.
    pub mid_market: Option<Decimal>,
    /// `spread_bps`, when sent.
    pub spread_bps: Option<Decimal>,
    /// `spread_absolute`, when sent.
    pub spread_absolute: Option<Decimal>,
}

impl OrderBook {
    /// The book cut to at most `levels` levels a side (what the exchange answers to a smaller
    /// `limit` at the same moment: each side is best first).
    #[must_use]
    pub fn truncated(mut self, levels: usize) -> OrderBook {
        self.bids.truncate(levels);
        self.asks.truncate(levels);
        self
    }
}

/// One price level of an [`OrderBook`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BookLevel {
    /// Price, positive.
    pub price: Decimal,
    /// Size at that price, zero or more.
    pub size: Decimal,
}

/// One trade of [`RecentTrades`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarketTrade {
    /// The exchange's trade id (not empty).
    pub trade_id: String,
    /// Price, positive.
    pub price: Decimal,
    /// Size, zero or more.
    pub size: Decimal,
    /// When it traded.
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// The taker's side.
    pub side: TradeSide,
}

/// The taker side of a [`MarketTrade`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TradeSide {
    /// `"BUY"`.
    Buy,
    /// `"SELL"`.
    Sell,
    /// Anything else the exchange said (`""`, `"UNKNOWN_ORDER_SIDE"`).
    Unknown,
}

impl TradeSide {
    /// Coinbase's spelling: `"BUY"`, `"SELL"`, or `""` for [`Unknown`](Self::Unknown).
    pub fn as_wire(self) -> &'static str {
        match self {
            TradeSide::Buy => "BUY",
            TradeSide::Sell => "SELL",
            TradeSide::Unknown => "",
        }
    }
}

/// The mean of a bid and an ask, without overflowing at the edges of `Decimal`'s range (the
/// exchange's numbers are input: `bid + ask` alone panics there).
pub(crate) fn mid_price(bid: Decimal, ask: Decimal) -> Decimal {
    // Halves of values near the edge round away from zero, so even they are added saturating.
    bid.checked_add(ask)
        .map_or_else(|| (bid / Decimal::TWO).saturating_add(ask / Decimal::TWO), |sum| sum / Decimal::TWO)
}

/// One OHLCV candle. `start` is the opening time of its bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candle {
    /// Start of the bucket (UTC, aligned to the granularity).
    #[serde(with = "time::serde::timestamp")]
    pub start: OffsetDateTime,
    /// Opening price.
    pub open: Decimal,
    /// Highest price.
    pub high: Decimal,
    /// Lowest price.
    pub low: Decimal,
    /// Closing (or, for the candle in progress, latest) price.
    pub close: Decimal,
    /// Traded base volume.
    pub volume: Decimal,
}

/// Candle granularities supported by Coinbase Advanced Trade.
///
/// Buckets are aligned to the Unix epoch (every duration divides a day, so daily candles start
/// at 00:00 UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Granularity {
    /// 1 minute.
    OneMinute,
    /// 5 minutes.
    FiveMinute,
    /// 15 minutes.
    FifteenMinute,
    /// 30 minutes.
    ThirtyMinute,
    /// 1 hour.
    OneHour,
    /// 2 hours.
    TwoHour,
    /// 4 hours.
    FourHour,
    /// 6 hours.
    SixHour,
    /// 1 day.
    OneDay,
}

impl Granularity {
    /// Every granularity, shortest first.
    pub const ALL: [Granularity; 9] = [
        Granularity::OneMinute,
        Granularity::FiveMinute,
        Granularity::FifteenMinute,
        Granularity::ThirtyMinute,
        Granularity::OneHour,
        Granularity::TwoHour,
        Granularity::FourHour,
        Granularity::SixHour,
        Granularity::OneDay,
    ];

    /// The bucket length in seconds.
    pub const fn seconds(self) -> i64 {
        match self {
            Granularity::OneMinute => 60,
            Granularity::FiveMinute => 300,
            Granularity::FifteenMinute => 900,
            Granularity::ThirtyMinute => 1_800,
            Granularity::OneHour => 3_600,
            Granularity::TwoHour => 7_200,
            Granularity::FourHour => 14_400,
            Granularity::SixHour => 21_600,
            Granularity::OneDay => 86_400,
        }
    }

    /// The bucket length.
    pub const fn duration(self) -> Duration {
        Duration::from_secs(self.seconds() as u64)
    }

    /// The name Coinbase uses on the wire (`"ONE_HOUR"`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Granularity::OneMinute => "ONE_MINUTE",
            Granularity::FiveMinute => "FIVE_MINUTE",
            Granularity::FifteenMinute => "FIFTEEN_MINUTE",
            Granularity::ThirtyMinute => "THIRTY_MINUTE",
            Granularity::OneHour => "ONE_HOUR",
            Granularity::TwoHour => "TWO_HOUR",
            Granularity::FourHour => "FOUR_HOUR",
            Granularity::SixHour => "SIX_HOUR",
            Granularity::OneDay => "ONE_DAY",
        }
    }

    /// Start of the bucket that contains `t`.
    pub fn bucket_start(self, t: OffsetDateTime) -> OffsetDateTime {
        let secs = t.unix_timestamp();
        let start = secs - secs.rem_euclid(self.seconds());
        from_unix(start)
    }

    /// When the bucket containing `t` closes (the start of the next bucket). A `t` exactly on
    /// a boundary belongs to the bucket that starts there, so it closes one bucket later.
    pub fn next_close(self, t: OffsetDateTime) -> OffsetDateTime {
        self.bucket_start(t) + time::Duration::seconds(self.seconds())
    }

    /// Whether the candle starting at `start` has closed at time `now`.
    pub fn is_closed(self, start: OffsetDateTime, now: OffsetDateTime) -> bool {
        start + time::Duration::seconds(self.seconds()) <= now
    }
}

pub(crate) fn from_unix(secs: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

impl fmt::Display for Granularity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Granularity {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Granularity::ALL
            .into_iter()
            .find(|g| g.as_str() == s)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "unknown granularity \"{}\"; expected one of ONE_MINUTE, FIVE_MINUTE, FIFTEEN_MINUTE, THIRTY_MINUTE, ONE_HOUR, TWO_HOUR, FOUR_HOUR, SIX_HOUR, ONE_DAY",
                    crate::error::truncate(s, 32)
                ))
            })
    }
}

/// A half-open range of candle start times, `[start, end)`, aligned to a granularity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CandleRange {
    /// First candle start included.
    #[serde(with = "time::serde::timestamp")]
    pub start: OffsetDateTime,
    /// First candle start excluded.
    #[serde(with = "time::serde::timestamp")]
    pub end: OffsetDateTime,
}

impl CandleRange {
    /// A range from `start` (inclusive) to `end` (exclusive).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if `end` is not after `start`.
    pub fn new(start: OffsetDateTime, end: OffsetDateTime) -> Result<Self> {
        if end <= start {
            return Err(Error::InvalidInput(format!(
                "candle range end ({}) must be after its start ({})",
                end.unix_timestamp(),
                start.unix_timestamp()
            )));
        }
        Ok(CandleRange { start, end })
    }

    /// The `count` most recent candles at `now`, the one in progress included: what a bot with
    /// a lookback of `count` candles asks for.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if `count` is zero.
    pub fn lookback(granularity: Granularity, count: u32, now: OffsetDateTime) -> Result<Self> {
        if count == 0 {
            return Err(Error::InvalidInput("candle lookback must be at least 1".into()));
        }
        let end = granularity.next_close(now);
        let start = end - time::Duration::seconds(granularity.seconds() * i64::from(count));
        Ok(CandleRange { start, end })
    }

    /// Align both ends to bucket starts of `granularity` (start down, end up).
    pub fn aligned(self, granularity: Granularity) -> Self {
        let start = granularity.bucket_start(self.start);
        let mut end = granularity.bucket_start(self.end);
        if end < self.end {
            end += time::Duration::seconds(granularity.seconds());
        }
        CandleRange { start, end }
    }

    /// How many buckets of `granularity` the range spans (rounded up).
    pub fn buckets(self, granularity: Granularity) -> u64 {
        let span = (self.end - self.start).whole_seconds().max(0);
        (span as u64).div_ceil(granularity.seconds() as u64)
    }

    /// The range split into consecutive requests of at most `per` buckets of `granularity`
    /// (at least one bucket each), oldest first: how the client sends a long range within
    /// Coinbase's per-request candle cap, and how the shared tier keys it.
    pub fn chunks(self, granularity: Granularity, per: u32) -> Vec<CandleRange> {
        let step = time::Duration::seconds(granularity.seconds().saturating_mul(i64::from(per.max(1))));
        let mut out = Vec::new();
        let mut start = self.start;
        while start < self.end {
            let end = start.checked_add(step).map_or(self.end, |e| e.min(self.end));
            out.push(CandleRange { start, end });
            start = end;
        }
        out
    }

    /// Whether a candle starting at `t` falls in the range.
    pub fn contains(self, t: OffsetDateTime) -> bool {
        self.start <= t && t < self.end
    }
}

/// One Coinbase account (a wallet for one currency).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Account id.
    pub uuid: String,
    /// Display name ("BTC Wallet").
    pub name: String,
    /// Currency code, upper-case.
    pub currency: String,
    /// Funds available to trade.
    pub available: Decimal,
    /// Funds on hold (open orders, pending transfers).
    pub hold: Decimal,
    /// Whether the account is active.
    pub active: bool,
    /// The account type as the exchange reports it (`ACCOUNT_TYPE_CRYPTO`, `FIAT`, ...).
    pub account_type: String,
}

/// The balance of one currency, summed over its accounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Balance {
    /// Funds available to trade.
    pub available: Decimal,
    /// Funds on hold.
    pub hold: Decimal,
}

impl Balance {
    /// `available + hold` (saturating at `Decimal::MAX`).
    pub fn total(&self) -> Decimal {
        self.available.saturating_add(self.hold)
    }
}

/// Balances by currency, built from a list of accounts.
///
/// ```
/// use tickshare::{Account, Balances, Decimal};
/// let usd = Account {
///     uuid: "1".into(), name: "USD Wallet".into(), currency: "USD".into(),
///     available: Decimal::new(10_000, 2), hold: Decimal::ZERO,
///     active: true, account_type: "ACCOUNT_TYPE_FIAT".into(),
/// };
/// let balances = Balances::from_accounts(&[usd]);
/// assert!(balances.can_afford("usd", Decimal::new(5_000, 2)));
/// assert!(!balances.can_afford("USD", Decimal::new(10_001, 2)));
/// assert!(!balances.can_afford("BTC", Decimal::ONE));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Balances(BTreeMap<String, Balance>);

impl Balances {
    /// Sum the active accounts by currency (saturating: amounts come from the exchange, and a
    /// plain sum would panic at the edge of `Decimal`'s range).
    pub fn from_accounts(accounts: &[Account]) -> Self {
        let mut map: BTreeMap<String, Balance> = BTreeMap::new();
        for a in accounts.iter().filter(|a| a.active) {
            let b = map.entry(a.currency.to_ascii_uppercase()).or_default();
            b.available = b.available.saturating_add(a.available);
            b.hold = b.hold.saturating_add(a.hold);
        }
        Balances(map)
    }

    /// The balance of `currency` (case-insensitive); zero when there is no account.
    pub fn get(&self, currency: &str) -> Balance {
        // Currencies are stored upper case; allocate an upper-case copy only when needed.
        let found = if currency.bytes().any(|b| b.is_ascii_lowercase()) {
            self.0.get(&currency.to_ascii_uppercase())
        } else {
            self.0.get(currency)
        };
        found.copied().unwrap_or_default()
    }

    /// Whether `amount` of `currency` is available to trade. A negative amount is never
    /// affordable.
    pub fn can_afford(&self, currency: &str, amount: Decimal) -> bool {
        !amount.is_sign_negative() && self.get(currency).available >= amount
    }

    /// Iterate over `(currency, balance)` pairs, currencies in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Balance)> {
        self.0.iter().map(|(c, b)| (c.as_str(), b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn candle_ranges_split_in_chunks() {
        let g = Granularity::OneMinute;
        let r = CandleRange::new(datetime!(2024-01-01 00:00 UTC), datetime!(2024-01-01 12:00 UTC)).unwrap();
        let chunks = r.chunks(g, 350);
        assert_eq!(chunks.len(), 3); // 720 buckets: 350 + 350 + 20
        assert_eq!(chunks[0].start, r.start);
        assert_eq!(chunks[2].end, r.end);
        assert!(chunks.windows(2).all(|w| w[0].end == w[1].start));
        assert!(chunks.iter().all(|c| c.buckets(g) <= 350));
        assert_eq!(r.chunks(g, 720), vec![r]);
    }

    #[test]
    fn product_id_validation_table() {
        let long = "A".repeat(30) + "-USD";
        let rows: &[(&str, bool)] = &[
            ("BTC-USD", true),
            ("ETH-USDC", true),
            ("1INCH-USD", true),
            ("BTC-PERP-INTX", true),
            ("", false),
            ("btc-usd", false),
            ("BTC-usd", false),
            ("BTC USD", false),
            (" BTC-USD", false),
            ("BTC-USD\n", false),
            ("BTCUSD", false),
            ("BTC-", false),
            ("-USD", false),
            ("BTC--USD", false),
            ("BTC/USD", false),
            ("BTC-ÜSD", false),
            (long.as_str(), false),
        ];
        for (s, ok) in rows {
            assert_eq!(ProductId::new(s).is_ok(), *ok, "{s:?}");
        }
        let err = ProductId::new("btc-usd").unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)));
        assert!(err.to_string().contains("upper-case"), "{err}");
    }

    #[test]
    fn product_id_serde_validates() {
        let id: ProductId = serde_json::from_str("\"BTC-USD\"").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"BTC-USD\"");
        assert!(serde_json::from_str::<ProductId>("\"btc\"").is_err());
    }

    #[test]
    fn granularity_names_and_durations() {
        let expected = [60, 300, 900, 1800, 3600, 7200, 14400, 21600, 86400];
        for (g, secs) in Granularity::ALL.iter().zip(expected) {
            assert_eq!(g.seconds(), secs);
            assert_eq!(g.as_str().parse::<Granularity>().unwrap(), *g);
            assert_eq!(serde_json::to_string(g).unwrap(), format!("\"{}\"", g.as_str()));
        }
        assert_eq!(Granularity::FourHour.as_str(), "FOUR_HOUR");
        assert!("UNKNOWN_GRANULARITY".parse::<Granularity>().is_err());
    }

    #[test]
    fn bucket_arithmetic() {
        let t = datetime!(2024-04-24 09:56:38 UTC);
        assert_eq!(Granularity::OneHour.bucket_start(t), datetime!(2024-04-24 09:00 UTC));
        assert_eq!(Granularity::OneHour.next_close(t), datetime!(2024-04-24 10:00 UTC));
        assert_eq!(Granularity::FiveMinute.next_close(t), datetime!(2024-04-24 10:00 UTC));
        assert_eq!(Granularity::FifteenMinute.bucket_start(t), datetime!(2024-04-24 09:45 UTC));
        assert_eq!(Granularity::FourHour.bucket_start(t), datetime!(2024-04-24 08:00 UTC));
        assert_eq!(Granularity::FourHour.next_close(t), datetime!(2024-04-24 12:00 UTC));
        assert_eq!(Granularity::SixHour.next_close(t), datetime!(2024-04-24 12:00 UTC));
        assert_eq!(Granularity::OneDay.bucket_start(t), datetime!(2024-04-24 00:00 UTC));
        assert_eq!(Granularity::OneDay.next_close(t), datetime!(2024-04-25 00:00 UTC));
        // Exactly on a boundary: the bucket starting there.
        let b = datetime!(2024-04-24 10:00 UTC);
        assert_eq!(Granularity::OneHour.bucket_start(b), b);
        assert_eq!(Granularity::OneHour.next_close(b), datetime!(2024-04-24 11:00 UTC));
        assert!(Granularity::OneHour.is_closed(datetime!(2024-04-24 09:00 UTC), b));
        assert!(!Granularity::OneHour.is_closed(b, b));
        // Before the epoch still floors.
        let pre = datetime!(1969-12-31 23:59:59 UTC);
        assert_eq!(Granularity::OneMinute.bucket_start(pre), datetime!(1969-12-31 23:59 UTC));
    }

    #[test]
    fn candle_ranges() {
        let now = datetime!(2024-04-24 09:56:38 UTC);
        let r = CandleRange::lookback(Granularity::OneHour, 24, now).unwrap();
        assert_eq!(r.end, datetime!(2024-04-24 10:00 UTC));
        assert_eq!(r.start, datetime!(2024-04-23 10:00 UTC));
        assert_eq!(r.buckets(Granularity::OneHour), 24);
        assert!(r.contains(datetime!(2024-04-24 09:00 UTC)));
        assert!(!r.contains(r.end));
        assert!(CandleRange::lookback(Granularity::OneHour, 0, now).is_err());
        assert!(CandleRange::new(now, now).is_err());
        let odd = CandleRange::new(datetime!(2024-04-24 09:10 UTC), datetime!(2024-04-24 10:01 UTC)).unwrap();
        let a = odd.aligned(Granularity::OneHour);
        assert_eq!((a.start, a.end), (datetime!(2024-04-24 09:00 UTC), datetime!(2024-04-24 11:00 UTC)));
    }

    #[test]
    fn balances_sum_and_afford() {
        let acct = |cur: &str, avail: i64, active: bool| Account {
            uuid: cur.into(),
            name: cur.into(),
            currency: cur.into(),
            available: Decimal::new(avail, 2),
            hold: Decimal::ONE,
            active,
            account_type: "ACCOUNT_TYPE_CRYPTO".into(),
        };
        let b = Balances::from_accounts(&[
            acct("USD", 100, true),
            acct("usd", 50, true),
            acct("BTC", 999, false),
        ]);
        assert_eq!(b.get("USD").available, Decimal::new(150, 2));
        assert_eq!(b.get("USD").total(), Decimal::new(350, 2));
        assert!(b.can_afford("USD", Decimal::new(150, 2)));
        assert!(!b.can_afford("USD", Decimal::new(151, 2)));
        assert!(!b.can_afford("USD", Decimal::new(-1, 0)));
        assert!(!b.can_afford("BTC", Decimal::new(1, 2)), "inactive accounts do not count");
        assert_eq!(b.get("usd"), b.get("USD"), "lookups ignore case");
        assert_eq!(b.get("Usd").available, Decimal::new(150, 2));
        assert_eq!(b.get("EUR"), Balance::default());
    }
}
