//! `wire::decode_product` on arbitrary bytes: never panics; the product id it accepts is a
//! valid `ProductId`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tickshare::{ProductId, coinbase::wire};

fuzz_target!(|body: &[u8]| {
    if let Ok(p) = wire::decode_product(body) {
        assert!(ProductId::new(&p.product_id).is_ok());
    }
});
