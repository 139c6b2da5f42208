//! SASL responses from mail clients. Properties: a decoded PLAIN response
//! has a non-empty name without NUL; XOAUTH2 encodes what it is given.
#![no_main]

use authswap::proxy::sasl;
use authswap::secret::Secret;
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(c) = sasl::decode_plain(data) {
        assert!(!c.name.is_empty());
        assert!(!c.name.contains('\0'));
        assert!(!c.password.expose().contains('\0'));
    }
    let _ = sasl::decode_login_step(data);
    let text = String::from_utf8_lossy(data);
    let blob = sasl::xoauth2("user@example.com", &Secret::new(text.as_ref()));
    let raw = base64::engine::general_purpose::STANDARD
        .decode(blob.expose())
        .expect("base64");
    assert_eq!(
        raw,
        format!("user=user@example.com\x01auth=Bearer {text}\x01\x01").into_bytes()
    );
});
