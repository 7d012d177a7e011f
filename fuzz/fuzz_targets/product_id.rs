//! `ProductId` parsing, directly and through serde: never panics, and what it accepts is
//! upper-case `BASE-QUOTE`, at most `MAX_PRODUCT_ID_LEN` bytes, and round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tickshare::{MAX_PRODUCT_ID_LEN, ProductId};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let direct = ProductId::new(s);
        if let Ok(id) = &direct {
            assert!(id.as_str().len() <= MAX_PRODUCT_ID_LEN);
            assert!(id.as_str().bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-'));
            assert!(!id.base().is_empty() && !id.quote().is_empty());
            assert_eq!(id.to_string(), s);
            assert_eq!(s.parse::<ProductId>().ok().as_ref(), Some(id));
        }
        // Through serde, as a JSON string: the same verdict.
        if let Ok(json) = serde_json::to_string(s) {
            let via_serde = serde_json::from_str::<ProductId>(&json);
            assert_eq!(via_serde.is_ok(), direct.is_ok());
        }
    }
    // Any JSON at all where a product id is expected.
    let _ = serde_json::from_slice::<ProductId>(data);
});
