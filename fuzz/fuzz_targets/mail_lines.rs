//! The mail front ends' line reader and IMAP literals. Properties: no line
//! is longer than the limit or holds a line feed; a non-synchronising
//! literal a line announces is skipped exactly, whatever it contains.
#![no_main]

use authswap::proxy::imap::trailing_nonsync_literal;
use authswap::proxy::line::{LineError, LineIo};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 64;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let io = tokio::io::join(data, tokio::io::sink());
        let mut lines = LineIo::new(io, MAX);
        for _ in 0..10_000 {
            match lines.read_line().await {
                Ok(Some(line)) => {
                    assert!(line.len() <= MAX);
                    assert!(!line.contains(&b'\n'));
                    if let Some(n) = trailing_nonsync_literal(&line) {
                        if n <= 4096 && lines.discard(n).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(None) | Err(LineError::Io(_)) => return,
                Err(LineError::TooLong) => {}
            }
        }
    });
});
