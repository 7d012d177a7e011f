//! `wire::decode_best_bid_ask` on arbitrary bytes: never panics; every decoded ticker's price
//! lies between its bid and ask (the mid, or the one side present).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tickshare::coinbase::wire;

fuzz_target!(|body: &[u8]| {
    if let Ok(tickers) = wire::decode_best_bid_ask(body) {
        for t in tickers {
            let _ = t.mid();
            if let (Some(b), Some(a)) = (t.best_bid, t.best_ask) {
                assert!(t.price >= b.min(a) && t.price <= b.max(a));
            }
        }
    }
});
