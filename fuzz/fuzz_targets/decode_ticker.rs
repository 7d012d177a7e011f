//! `wire::decode_ticker` on arbitrary bytes: never panics (nor does `Ticker::mid` on what it
//! decodes); a decoded ticker is for the product asked about.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tickshare::{ProductId, coinbase::wire};

fuzz_target!(|body: &[u8]| {
    let Ok(product) = ProductId::new("BTC-USD") else { return };
    if let Ok(t) = wire::decode_ticker(&product, body) {
        assert_eq!(t.product, product);
        let _ = t.mid();
    }
});
