//! `wire::decode_candles` on arbitrary bytes: never panics; decoded candles are sorted by start
//! with no duplicates.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tickshare::coinbase::wire;

fuzz_target!(|body: &[u8]| {
    if let Ok(candles) = wire::decode_candles(body) {
        assert!(candles.windows(2).all(|w| w[0].start < w[1].start));
    }
});
