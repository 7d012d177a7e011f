//! `wire::decode_products` on arbitrary bytes: never panics; every product id it accepts is a
//! valid `ProductId`. `wire::decode_product_tickers_for` on the same bytes: never panics; only
//! asked products, each once, priced above zero, without bid/ask.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tickshare::{ProductId, coinbase::wire};

fuzz_target!(|body: &[u8]| {
    let asked: Vec<ProductId> = ["ETH-USD", "BTC-USD"].iter().map(|s| s.parse().unwrap()).collect();
    let at = wire::parse_time("2024-04-24T09:56:38Z", "at").unwrap();
    if let Ok(tickers) = wire::decode_product_tickers_for(&asked, body, at) {
        assert!(tickers.len() <= asked.len());
        for (i, t) in tickers.iter().enumerate() {
            assert!(asked.contains(&t.product) && tickers[..i].iter().all(|u| u.product != t.product));
            assert!(t.price > tickshare::Decimal::ZERO && t.best_bid.is_none() && t.best_ask.is_none());
        }
    }
    if let Ok(products) = wire::decode_products(body) {
        for p in products {
            assert!(ProductId::new(&p.product_id).is_ok());
        }
    }
});
