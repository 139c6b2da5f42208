//! The chunked-body scanner. Property: where a body ends (or that it is
//! malformed) does not depend on how its bytes were split across reads.
#![no_main]

use authswap::proxy::http::codec::ChunkScanner;
use libfuzzer_sys::fuzz_target;

fn scan(data: &[u8], step: usize) -> Result<Option<usize>, ()> {
    let mut s = ChunkScanner::default();
    let mut at = 0;
    while at < data.len() {
        let end = (at + step).min(data.len());
        match s.scan(&data[at..end]) {
            Err(_) => return Err(()),
            Ok(Some(n)) => return Ok(Some(at + n)),
            Ok(None) => at = end,
        }
    }
    Ok(None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, data)) = data.split_first() else {
        return;
    };
    let whole = scan(data, data.len().max(1));
    assert_eq!(whole, scan(data, usize::from(step).max(1)));
    assert_eq!(whole, scan(data, 1));
});
