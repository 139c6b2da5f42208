//! The upstream's response head: parsed, its framing decided, the client's
//! copy written. Properties: a head accepted ends where httparse says, and
//! the client's copy carries no hop-by-hop field but Transfer-Encoding.
#![no_main]

use authswap::proxy::http::codec::{is_hop_by_hop, parse_response_head, HeadEnd};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let Some(end) = HeadEnd::default().find(data) else {
        return;
    };
    let mut out = Vec::new();
    if let Ok(Some(head)) = parse_response_head(&data[..end], flags & 1 == 1, &mut out) {
        assert_eq!(head.len, end);
        let mut headers = [httparse::EMPTY_HEADER; 100];
        let mut res = httparse::Response::new(&mut headers);
        assert_eq!(res.parse(data).ok(), Some(httparse::Status::Complete(end)));
        out.extend_from_slice(b"\r\n");
        let mut headers = [httparse::EMPTY_HEADER; 100];
        let mut copy = httparse::Response::new(&mut headers);
        assert!(matches!(copy.parse(&out), Ok(httparse::Status::Complete(_))));
        for h in copy.headers.iter() {
            assert!(
                !is_hop_by_hop(h.name.as_bytes())
                    || h.name.eq_ignore_ascii_case("transfer-encoding"),
                "{}",
                h.name
            );
        }
    }
});
