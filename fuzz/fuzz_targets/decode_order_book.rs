//! `wire::decode_order_book` on arbitrary bytes: never panics; a decoded book is the product
//! asked about, no deeper than asked, each side strictly ordered, positive prices, not crossed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tickshare::{ProductId, coinbase::wire};

fuzz_target!(|body: &[u8]| {
    let Ok(product) = ProductId::new("BTC-USDT") else { return };
    if let Ok(b) = wire::decode_order_book(&product, Some(5), body) {
        assert_eq!(b.product, product);
        assert!(b.bids.len() <= 5 && b.asks.len() <= 5);
        assert!(b.bids.windows(2).all(|w| w[0].price > w[1].price));
        assert!(b.asks.windows(2).all(|w| w[0].price < w[1].price));
        if let (Some(bid), Some(ask)) = (b.bids.first(), b.asks.first()) {
            assert!(bid.price <= ask.price);
        }
    }
});
