//! Whether a decoded answer can be true, and whether it answers the question asked.
//!
//! The rules are listed, per field, in the [`wire`](super::wire) module documentation. The
//! checks that need no clock run inside the `wire::decode_*` functions; the ones relative to
//! "now" (times too far ahead, candles off the requested grid, pagination across pages) run in
//! [`CoinbaseClient`](super::CoinbaseClient), on its [`Clock`](crate::Clock).

use std::collections::HashSet;

use rust_decimal::Decimal;
use time::{OffsetDateTime, macros::datetime};

use crate::{
    error::{Error, Result},
    model::{Account, Candle, Granularity, ProductId, Ticker},
};

/// No exchange time before this is believed (Bitcoin's first block is 2009-01-03).
pub(crate) const EARLIEST: OffsetDateTime = datetime!(2009-01-01 00:00 UTC);

/// How far ahead of the client's clock an exchange time may be: clock skew, never more.
pub(crate) const MAX_AHEAD: time::Duration = time::Duration::DAY;

/// `value` is a price: strictly positive.
pub(crate) fn price(value: Decimal, field: &str) -> Result<Decimal> {
    if value <= Decimal::ZERO {
        return Err(Error::decode(format_args!("{field} is not a positive price: {value}")));
    }
    Ok(value)
}

/// `value` is an amount or a volume: zero or more.
pub(crate) fn amount(value: Decimal, field: &str) -> Result<Decimal> {
    if value.is_sign_negative() && !value.is_zero() {
        return Err(Error::decode(format_args!("{field} is negative: {value}")));
    }
    Ok(value)
}

/// A two-sided book is not crossed (a locked book, bid = ask, is accepted).
pub(crate) fn book(bid: Option<Decimal>, ask: Option<Decimal>, what: &str) -> Result<()> {
    if let (Some(b), Some(a)) = (bid, ask)
        && b > a
    {
        return Err(Error::decode(format_args!("{what}: crossed book, bid {b} above ask {a}")));
    }
    Ok(())
}

/// An exchange time is not before [`EARLIEST`].
pub(crate) fn not_before_earliest(t: OffsetDateTime, field: &str) -> Result<OffsetDateTime> {
    if t < EARLIEST {
        return Err(Error::decode(format_args!("{field} is before 2009: {}", t.unix_timestamp())));
    }
    Ok(t)
}

/// A candle's prices are positive and consistent: `low <= open, close <= high`; its volume is
/// not negative.
pub(crate) fn candle(c: &Candle) -> Result<()> {
    for (v, f) in
        [(c.open, "candle.open"), (c.high, "candle.high"), (c.low, "candle.low"), (c.close, "candle.close")]
    {
        price(v, f)?;
    }
    amount(c.volume, "candle.volume")?;
    let at = c.start.unix_timestamp();
    if c.high < c.low {
        return Err(Error::decode(format_args!("candle {at}: high {} below low {}", c.high, c.low)));
    }
    for (v, f) in [(c.open, "open"), (c.close, "close")] {
        if v < c.low || v > c.high {
            return Err(Error::decode(format_args!("candle {at}: {f} {v} outside low..high")));
        }
    }
    Ok(())
}

/// Whether `answered` is the market `asked` for: the same id, or the `-USD`/`-USDC` alias pair
/// (Coinbase serves `BTC-USDC` from the `BTC-USD` book; `USDT-USDC` and `EURC-USDC` are
/// markets of their own, see [`ProductId::usd_alias`]).
pub(crate) fn same_market(asked: &ProductId, answered: &str) -> bool {
    asked.as_str() == answered || ProductId::new(answered).is_ok_and(|a| a.book_id() == asked.book_id())
}

/// An exchange time is not more than [`MAX_AHEAD`] after `now`.
pub(crate) fn not_ahead(t: OffsetDateTime, now: OffsetDateTime, field: &str) -> Result<()> {
    if t > now.saturating_add(MAX_AHEAD) {
        return Err(Error::decode(format_args!(
            "{field} is more than a day ahead of the local clock: {}",
            t.unix_timestamp()
        )));
    }
    Ok(())
}

/// A ticker's time is not ahead of `now` (a ticker without any exchange time, reported as
/// the UNIX epoch, has nothing to check).
pub(crate) fn ticker_at(t: &Ticker, now: OffsetDateTime) -> Result<()> {
    not_ahead(t.time, now, "ticker time")
}

/// Candles answer a `granularity` request at `now`: every start on the granularity's grid and
/// not ahead of `now`.
pub(crate) fn candles_at(candles: &[Candle], granularity: Granularity, now: OffsetDateTime) -> Result<()> {
    for c in candles {
        let at = c.start.unix_timestamp();
        if at.rem_euclid(granularity.seconds()) != 0 {
            return Err(Error::decode(format_args!("candle start {at} is not on the {granularity} grid")));
        }
        not_ahead(c.start, now, "candle.start")?;
    }
    Ok(())
}

/// The pages of one accounts listing: bounded in number, no cursor twice, no account twice.
#[derive(Debug)]
pub(crate) struct AccountPages {
    max_pages: u32,
    pages: u32,
    cursors: HashSet<String>,
    uuids: HashSet<String>,
}

impl AccountPages {
    /// A listing of at most `max_pages` pages.
    pub(crate) fn new(max_pages: u32) -> Self {
        AccountPages { max_pages, pages: 0, cursors: HashSet::new(), uuids: HashSet::new() }
    }

    /// Take one page and the cursor of the next one.
    ///
    /// # Errors
    /// [`Error::Decode`] when an account was already listed (on this page or an earlier one),
    /// when the next cursor was already followed, or when a next page would exceed `max_pages`.
    pub(crate) fn accept(&mut self, page: &[Account], next: Option<&str>) -> Result<()> {
        self.pages += 1;
        for a in page {
            if !self.uuids.insert(a.uuid.clone()) {
                return Err(Error::decode(format_args!(
                    "accounts pagination listed account {} twice",
                    crate::error::truncate(&a.uuid, 40)
                )));
            }
        }
        if let Some(c) = next {
            if !self.cursors.insert(c.to_string()) {
                return Err(Error::decode("accounts pagination repeated a cursor"));
            }
            if self.pages >= self.max_pages {
                return Err(Error::decode(format_args!(
                    "accounts pagination goes on past {} pages (accounts_max_pages)",
                    self.max_pages
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid(s: &str) -> ProductId {
        s.parse().unwrap()
    }

    #[test]
    fn usdc_aliases() {
        assert!(same_market(&pid("BTC-USD"), "BTC-USD"));
        assert!(same_market(&pid("BTC-USD"), "BTC-USDC"));
        assert!(same_market(&pid("BTC-USDC"), "BTC-USD"));
        assert!(!same_market(&pid("BTC-USD"), "ETH-USD"));
        assert!(!same_market(&pid("BTC-USD"), "BTC-EUR"));
        assert!(!same_market(&pid("BTC-USDT"), "BTC-USD"));
        assert!(!same_market(&pid("USDT-USDC"), "USDT-USD"));
        assert!(!same_market(&pid("EURC-USD"), "EURC-USDC"));
        assert!(!same_market(&pid("BTC-USD"), ""));
    }

    #[test]
    fn pages_are_bounded_and_never_repeat() {
        let acct = |uuid: &str| Account {
            uuid: uuid.into(),
            name: String::new(),
            currency: "USD".into(),
            available: Decimal::ONE,
            hold: Decimal::ZERO,
            active: true,
            account_type: String::new(),
        };
        let mut p = AccountPages::new(3);
        p.accept(&[acct("a")], Some("1")).unwrap();
        p.accept(&[acct("b")], Some("2")).unwrap();
        assert!(matches!(p.accept(&[acct("c")], Some("3")), Err(Error::Decode(_))), "a fourth page");
        let mut p = AccountPages::new(3);
        p.accept(&[acct("a")], Some("1")).unwrap();
        assert!(matches!(p.accept(&[acct("a")], None), Err(Error::Decode(_))));
        let mut p = AccountPages::new(3);
        p.accept(&[acct("a")], Some("1")).unwrap();
        assert!(matches!(p.accept(&[acct("b")], Some("1")), Err(Error::Decode(_))));
        let mut p = AccountPages::new(1);
        p.accept(&[acct("a"), acct("b")], None).unwrap();
    }
}
