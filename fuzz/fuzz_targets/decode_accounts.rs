//! `wire::decode_accounts` on arbitrary bytes: never panics; a next-page cursor is never empty.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tickshare::coinbase::wire;

fuzz_target!(|body: &[u8]| {
    if let Ok((_accounts, Some(cursor))) = wire::decode_accounts(body) {
        assert!(!cursor.is_empty());
    }
});
