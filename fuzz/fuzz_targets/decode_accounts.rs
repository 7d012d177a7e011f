//! `wire::decode_accounts` on arbitrary bytes, then the balance sums a balance check makes:
//! never panics; a next-page cursor is never empty.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tickshare::{Balances, coinbase::wire};

fuzz_target!(|body: &[u8]| {
    if let Ok((accounts, next)) = wire::decode_accounts(body) {
        assert!(next.is_none_or(|c| !c.is_empty()));
        for (_, b) in Balances::from_accounts(&accounts).iter() {
            let _ = b.total();
        }
    }
});
