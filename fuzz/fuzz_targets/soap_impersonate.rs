//! The EWS `ExchangeImpersonation` rewrite. Properties: it never panics,
//! and a rewritten body, read again for the same mailbox, is left as it is
//! (exactly one impersonation, naming that mailbox, in a well-formed
//! envelope).
#![no_main]

use authswap::proxy::http::soap::{impersonate, Impersonation};
use libfuzzer_sys::fuzz_target;

/// Mailboxes that need no escaping, XML escaping, and character references.
const MAILBOXES: [&str; 3] = [
    "alice@contoso.com",
    "o'neil&<co>@example.org",
    "j\u{fc}rgen@m\u{fc}ller.example",
];

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let mailbox = MAILBOXES[usize::from(which) % MAILBOXES.len()];
    if let Ok(Impersonation::Rewritten(out)) = impersonate(body, mailbox) {
        assert!(out.len() > body.len());
        assert_eq!(impersonate(&out, mailbox), Ok(Impersonation::Unchanged));
    }
});
