//! The native HTTP/1.1 half's request head: found incrementally, parsed
//! and rewritten. Properties: the end of a head does not depend on how the
//! bytes arrived; a head the native half takes ends where httparse says;
//! the rewritten head never carries the client's credentials.
#![no_main]

use authswap::proxy::http::codec::{parse_request_head, HeadEnd, RequestParse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let whole = HeadEnd::default().find(data);
    let cut = (split as usize).min(data.len());
    let mut parts = HeadEnd::default();
    let early = parts.find(&data[..cut]);
    let pieces = early.or_else(|| parts.find(data));
    assert_eq!(whole, pieces, "the end of a head depends on the reads");
    let Some(end) = whole else {
        return;
    };
    let mut out = Vec::new();
    if let RequestParse::Native(head) = parse_request_head(&data[..end], b"/base", b"up", &mut out) {
        assert_eq!(head.len, end);
        let mut headers = [httparse::EMPTY_HEADER; 100];
        let mut req = httparse::Request::new(&mut headers);
        assert_eq!(req.parse(data).ok(), Some(httparse::Status::Complete(end)));
        assert!(out.ends_with(b"\r\nauthorization: "));
        let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
        assert_eq!(
            text.matches("\nauthorization:").count(),
            1,
            "only the token's field: {text}"
        );
    }
});
