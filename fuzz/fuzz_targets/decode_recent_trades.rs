//! `wire::decode_recent_trades` on arbitrary bytes: never panics; decoded trades are no more
//! than asked, most recent first, each id once, priced above zero.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tickshare::{ProductId, coinbase::wire};

fuzz_target!(|body: &[u8]| {
    let Ok(product) = ProductId::new("BTC-USD") else { return };
    if let Ok(r) = wire::decode_recent_trades(&product, 3, body) {
        assert_eq!(r.product, product);
        assert!(r.trades.len() <= 3);
        assert!(r.trades.windows(2).all(|w| w[0].time >= w[1].time));
        for (i, t) in r.trades.iter().enumerate() {
            assert!(t.price > tickshare::Decimal::ZERO);
            assert!(r.trades[..i].iter().all(|u| u.trade_id != t.trade_id));
        }
    }
});
