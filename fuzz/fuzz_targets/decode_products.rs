//! `wire::decode_products` on arbitrary bytes: never panics; every product id it accepts is a
//! valid `ProductId`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tickshare::{ProductId, coinbase::wire};

fuzz_target!(|body: &[u8]| {
    if let Ok(products) = wire::decode_products(body) {
        for p in products {
            assert!(ProductId::new(&p.product_id).is_ok());
        }
    }
});
