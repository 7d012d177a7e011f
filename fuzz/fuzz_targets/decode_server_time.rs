//! `wire::decode_server_time` on arbitrary bytes: never panics, whatever the epochs hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tickshare::coinbase::wire;

fuzz_target!(|body: &[u8]| {
    let _ = wire::decode_server_time(body);
});
