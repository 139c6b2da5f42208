//! `Authorization: Basic` values. Properties: a decoded value has a
//! non-empty name without `:`, and name and password are the decoded bytes
//! around the first colon.
#![no_main]

use authswap::proxy::http::parse_basic;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(c) = parse_basic(data) {
        assert!(!c.name().is_empty());
        assert!(!c.name().contains(':'));
        let _ = c.password();
    }
});
