//! Every sample body of shared/COINBASE.md (copied into tests/fixtures) decodes into the domain
//! model, and damaged variants of each give typed errors, never panics.

use tickshare::{Decimal, Error, ProductId, coinbase::wire};
use time::macros::datetime;

macro_rules! fixture {
    ($name:literal) => {
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/", $name)).as_slice()
    };
}

fn pid(s: &str) -> ProductId {
    s.parse().unwrap()
}

fn dec(s: &str) -> Decimal {
    s.parse().unwrap()
}

#[test]
fn ticker_samples() {
    let t = wire::decode_ticker(&pid("BTC-USDC"), fixture!("ticker_real.json")).unwrap();
    assert_eq!(t.price, dec("66363.03"));
    assert_eq!((t.best_bid, t.best_ask), (Some(dec("66367.58")), Some(dec("66367.59"))));
    assert_eq!(t.time, datetime!(2024-04-24 09:56:38.063595 UTC));
    let d = wire::decode_ticker(&pid("BTC-USD"), fixture!("ticker_doc.json")).unwrap();
    assert_eq!((d.price, d.best_bid, d.best_ask), (dec("140.91"), Some(dec("291.13")), Some(dec("292.40"))));
}

#[test]
fn candle_samples() {
    let c = wire::decode_candles(fixture!("candles_real.json")).unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].start, datetime!(2023-01-10 23:03 UTC));
    assert_eq!(
        (c[0].open, c[0].high, c[0].low, c[0].close),
        (dec("17417.74"), dec("17417.99"), dec("17414.36"), dec("17417.38"))
    );
    assert_eq!(c[0].volume, dec("1.87780853"));
    let d = wire::decode_candles(fixture!("candles_doc.json")).unwrap();
    assert_eq!(d[0].volume, dec("56437345"));
}

#[test]
fn book_samples() {
    let t = wire::decode_best_bid_ask(fixture!("best_bid_ask_real.json")).unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].product, pid("TRAC-EUR"));
    assert_eq!((t[0].best_bid, t[0].best_ask), (Some(dec("0.2384")), Some(dec("0.2406"))));
    assert_eq!(t[0].price, dec("0.2395"));
    let b = wire::decode_product_book(fixture!("product_book_real.json")).unwrap();
    assert_eq!(b.product, pid("BTC-USDT"));
    assert_eq!(b.best_ask, Some(dec("30759.07")));
}

#[test]
fn order_book_samples_decode_and_write_back_as_they_came() {
    let body = fixture!("product_book_real.json");
    let b = wire::decode_order_book(&pid("BTC-USDT"), None, body).unwrap();
    assert_eq!(b.bids, [tickshare::BookLevel { price: dec("30757.85"), size: dec("0.115") }]);
    assert_eq!(b.asks, [tickshare::BookLevel { price: dec("30759.07"), size: dec("0.04877659") }]);
    assert_eq!(b.last, None);
    // Written back, the same JSON (the proxy's answer is Coinbase's).
    let again = serde_json::to_value(wire::ProductBook::from(&b)).unwrap();
    assert_eq!(again, serde_json::from_slice::<serde_json::Value>(body).unwrap());
    // The limit asked is checked: one level a side fits a limit of 1.
    assert!(wire::decode_order_book(&pid("BTC-USDT"), Some(1), body).is_ok());
    // Another product's book is not an answer.
    let other = wire::decode_order_book(&pid("ETH-USDT"), None, body).unwrap_err();
    assert!(matches!(other, tickshare::Error::Decode(_)), "{other}");
}

#[test]
fn product_samples() {
    let list = wire::decode_products(fixture!("products_real.json")).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0].product_id.as_str(), list[0].price.as_str(), list[0].status.as_str()),
        ("ETH-USD", "4471.59", "online")
    );
    // Fields tickshare does not model survive in `extra`.
    assert_eq!(list[0].extra["base_increment"], "0.00000001");
    let one = wire::decode_product(fixture!("product_real.json")).unwrap();
    assert_eq!(one.product_id, "ETH-USD");
    // num_products as a string is accepted too.
    let s = br#"{"products": [], "num_products": "646"}"#;
    assert!(wire::decode_products(s).unwrap().is_empty());
}

#[test]
fn account_samples() {
    let (a, next) = wire::decode_accounts(fixture!("accounts_real.json")).unwrap();
    assert_eq!(next, None);
    assert_eq!((a[0].currency.as_str(), a[0].available, a[0].hold), ("USDC", Decimal::ZERO, Decimal::ZERO));
    assert_eq!(a[0].account_type, "ACCOUNT_TYPE_CRYPTO");
    let (d, next) = wire::decode_accounts(fixture!("accounts_doc.json")).unwrap();
    assert_eq!(next.as_deref(), Some("789100"));
    assert_eq!((d[0].available, d[0].hold, d[0].account_type.as_str()), (dec("1.23"), dec("1.23"), "FIAT"));
}

#[test]
fn time_sample() {
    let t = wire::decode_server_time(fixture!("time.json")).unwrap();
    assert_eq!(t, datetime!(2024-02-27 03:37:14.333 UTC));
}

#[test]
fn error_samples_parse() {
    for body in [fixture!("error_documented.json"), fixture!("error_observed.json")] {
        let e: wire::ErrorBody = serde_json::from_slice(body).unwrap();
        assert!(!e.message.is_empty());
    }
}

/// Damage every sample: truncations, an HTML page, empty strings for every string value, and
/// wrong types. Each must decode or fail with `Error::Decode`, never panic.
#[test]
fn damaged_samples_are_typed_errors() {
    type Decoder = fn(&[u8]) -> Result<(), Error>;
    let decoders: Vec<(&[u8], Decoder)> = vec![
        (fixture!("ticker_real.json"), |b| wire::decode_ticker(&"BTC-USD".parse().unwrap(), b).map(drop)),
        (fixture!("ticker_doc.json"), |b| wire::decode_ticker(&"BTC-USD".parse().unwrap(), b).map(drop)),
        (fixture!("candles_real.json"), |b| wire::decode_candles(b).map(drop)),
        (fixture!("best_bid_ask_real.json"), |b| wire::decode_best_bid_ask(b).map(drop)),
        (fixture!("product_book_real.json"), |b| wire::decode_product_book(b).map(drop)),
        (fixture!("products_real.json"), |b| wire::decode_products(b).map(drop)),
        (fixture!("product_real.json"), |b| wire::decode_product(b).map(drop)),
        (fixture!("accounts_real.json"), |b| wire::decode_accounts(b).map(drop)),
        (fixture!("accounts_doc.json"), |b| wire::decode_accounts(b).map(drop)),
        (fixture!("time.json"), |b| wire::decode_server_time(b).map(drop)),
    ];
    let html: &[u8] =
        b"<html> <head> <title>Coinbase</title></head><body>429 Too Many Requests</body></html>";
    for (sample, decode) in decoders {
        let sample = sample.trim_ascii_end();
        assert!(decode(sample).is_ok());
        for cut in [0, 1, sample.len() / 3, sample.len() / 2, sample.len() - 1] {
            assert!(matches!(decode(&sample[..cut]), Err(Error::Decode(_))), "cut at {cut}");
        }
        assert!(matches!(decode(html), Err(Error::Decode(_))));
        assert!(matches!(decode(b"null"), Err(Error::Decode(_))));
        // Every string value emptied: numbers become "", which must be a typed error (or, where
        // Coinbase sends "" for real, accepted).
        let text = std::str::from_utf8(sample).unwrap();
        let emptied = regex_free_empty_strings(text);
        match decode(emptied.as_bytes()) {
            Ok(()) | Err(Error::Decode(_)) => {}
            Err(e) => panic!("unexpected error kind {e:?}"),
        }
        // Numbers where strings are expected.
        let typed = text.replace("\"66363.03\"", "66363.03").replace("\"17414.36\"", "17414.36");
        match decode(typed.as_bytes()) {
            Ok(()) | Err(Error::Decode(_)) => {}
            Err(e) => panic!("unexpected error kind {e:?}"),
        }
    }
}

/// Replace every JSON string value (after a colon) with "".
fn regex_free_empty_strings(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let mut after_colon = false;
    while let Some(c) = chars.next() {
        match c {
            ':' => {
                after_colon = true;
                out.push(c);
            }
            '"' if after_colon => {
                out.push_str("\"\"");
                for d in chars.by_ref() {
                    if d == '"' {
                        break;
                    }
                }
                after_colon = false;
            }
            c if c.is_whitespace() => out.push(c),
            _ => {
                after_colon = false;
                out.push(c);
            }
        }
    }
    out
}

#[test]
fn empty_string_numbers_are_decode_errors() {
    let body =
        br#"{"candles":[{"start":"1673391780","low":"","high":"1","open":"1","close":"1","volume":"1"}]}"#;
    let e = wire::decode_candles(body).unwrap_err();
    assert!(matches!(e, Error::Decode(ref m) if m.contains("candle.low")), "{e:?}");
    let body = br#"{"accounts":[{"uuid":"u","currency":"USD","available_balance":{"value":"","currency":"USD"}}],"has_next":false,"cursor":""}"#;
    assert!(matches!(wire::decode_accounts(body), Err(Error::Decode(_))));
}

#[test]
fn out_of_range_server_time_is_an_error_not_1970() {
    let body = br#"{"iso":"","epochSeconds":"","epochMillis":"9223372036854775807"}"#;
    assert!(matches!(wire::decode_server_time(body), Err(Error::Decode(_))));
}
