//! The EWS operation scan behind `authswap_ews_operations_total`.
//! Properties: it never panics, it reads no more than its scan limit
//! (bytes past it change nothing), and the name it reports round-trips
//! through the known-name table.
#![no_main]

use authswap::proxy::http::ews_ops::{operation, Operation, SCAN_LIMIT};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let op = operation(data);
    assert_eq!(Operation::from_name(op.name().as_bytes()), op);
    let mut longer = data.to_vec();
    longer.extend_from_slice(&[b'x'; 64]);
    if data.len() >= SCAN_LIMIT {
        assert_eq!(operation(&longer), op);
    }
});
