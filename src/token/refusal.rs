//! What an upstream's refusal of an access token means, and what a front end
//! does about it: the one refusal policy that HTTP, SMTP, IMAP and POP3
//! share. Each front end turns its upstream's answer into a [`Refusal`]
//! with the classifiers here (pure functions over the upstream's words);
//! [`TokenEngine::refused`](super::TokenEngine::refused) decides the
//! [`Verdict`] and keeps the per-identity, per-scope-set state behind it.
//!
//! The rules:
//! - A refused token gets one refresh and one retry for the request that
//!   met the refusal ([`Verdict::Retry`]), unless the refused token was
//!   itself issued by a refresh that an earlier refusal caused and has not
//!   worked once since (a *fresh* token refused again): then the identity's
//!   scope set backs off (first `tokens.refused_backoff_min`, doubling up
//!   to `tokens.refused_backoff_max`, never sooner than the upstream's
//!   `Retry-After`) and clients get a temporary answer
//!   ([`Verdict::Backoff`]). One success resets the count.
//! - A refusal whose reason is permanent and needs an administrator (SMTP
//!   AUTH switched off for the tenant or mailbox, EWS blocked for the app
//!   or mailbox) is passed through to the client as the upstream said it
//!   ([`Verdict::PassThrough`]), and the identity shows status
//!   `upstream_refused` with the upstream's words until its next success.

use std::time::Duration;

/// Longest upstream text kept for the identity's status.
const MAX_TEXT: usize = 300;

/// How an upstream refused an access token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The token as such was refused (HTTP 401, SMTP `535 5.7.3`, IMAP
    /// `NO`, POP3 `-ERR`): a new token may help.
    Token {
        /// The upstream's `Retry-After`, when it gave one.
        retry_after: Option<Duration>,
        /// The upstream's words (bounded; for logs and the status).
        text: String,
    },
    /// A refusal that no token can cure: an administrator must change a
    /// setting upstream. The client gets the upstream's own answer.
    Permanent {
        /// The upstream's words (bounded).
        text: String,
    },
}

impl Refusal {
    /// A token refusal with the upstream's `text`.
    pub fn token(text: &str) -> Refusal {
        Refusal::Token {
            retry_after: None,
            text: bounded(text),
        }
    }

    /// A permanent refusal with the upstream's `text`.
    pub fn permanent(text: &str) -> Refusal {
        Refusal::Permanent {
            text: bounded(text),
        }
    }

    /// The upstream's words.
    pub fn text(&self) -> &str {
        match self {
            Refusal::Token { text, .. } | Refusal::Permanent { text } => text,
        }
    }
}

/// What a front end does after a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Take a token again (the engine refreshes once for everybody) and
    /// retry the request once.
    Retry,
    /// The upstream refuses freshly issued tokens: answer with a temporary
    /// error (HTTP 503, SMTP `454 4.7.0`, IMAP `NO [UNAVAILABLE]`, POP3
    /// `-ERR [SYS/TEMP]`) saying so, with this `Retry-After`.
    Backoff {
        /// When the identity's scope set is tried again.
        retry_after: Duration,
    },
    /// Pass the upstream's (permanent) answer through to the client.
    PassThrough,
}

/// The upstream's words, on one line, bounded, printable.
fn bounded(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_TEXT)
        .collect();
    if text.chars().count() > MAX_TEXT {
        out.push('…');
    }
    out.trim().to_owned()
}

/// SMTP enhanced status codes (RFC 3463) in an `AUTH` failure that mean an
/// administrator must act: no token will be accepted.
const SMTP_PERMANENT: &[&str] = &[
    // SmtpClientAuthentication is disabled for the tenant or mailbox.
    "5.7.139", // Basic authentication is not supported (after retirement).
    "5.7.30",
];

/// Classifies an SMTP answer to `AUTH XOAUTH2` that is neither success nor
/// a temporary (4xx) failure. `code` is the reply code, `text` the reply
/// lines joined. `5.7.3` ("Authentication unsuccessful") is what Exchange
/// Online answers for an expired or revoked token, so it is a token
/// refusal: a refresh cures it.
pub fn smtp(code: u16, text: &str) -> Refusal {
    let enhanced = text.split_whitespace().next().unwrap_or_default();
    let whole = format!("{code} {text}");
    if SMTP_PERMANENT.contains(&enhanced) {
        Refusal::permanent(&whole)
    } else {
        Refusal::token(&whole)
    }
}

/// IMAP response codes (RFC 5530) in a `NO` to `AUTHENTICATE` that mean the
/// token is fine but access is not allowed: an administrator must act.
const IMAP_PERMANENT: &[&str] = &["AUTHORIZATIONFAILED", "CONTACTADMIN", "NOPERM"];

/// Classifies an IMAP `NO` to `AUTHENTICATE`; `text` is what followed `NO`.
pub fn imap(text: &str) -> Refusal {
    match response_code(text) {
        Some(code) if IMAP_PERMANENT.iter().any(|p| p.eq_ignore_ascii_case(code)) => {
            Refusal::permanent(text)
        }
        _ => Refusal::token(text),
    }
}

/// Classifies a POP3 `-ERR` to `AUTH XOAUTH2`: `[SYS/PERM]` (RFC 3206: a
/// permanent system error, not the credentials) needs an administrator;
/// anything else is a token refusal.
pub fn pop3(line: &str) -> Refusal {
    let text = line.strip_prefix("-ERR").unwrap_or(line).trim_start();
    match response_code(text) {
        Some(code) if code.eq_ignore_ascii_case("SYS/PERM") => Refusal::permanent(line),
        _ => Refusal::token(line),
    }
}

/// The `[CODE ...]` at the start of an IMAP or POP3 response text.
fn response_code(text: &str) -> Option<&str> {
    let inner = text.trim_start().strip_prefix('[')?;
    let end = inner.find(']')?;
    inner[..end].split_whitespace().next()
}

/// Classifies an HTTP response: `401` is a token refusal (its `Retry-After`
/// honoured), `403` a permanent one (EWS disabled for the app or mailbox,
/// a missing permission), anything else no refusal at all. `header` looks
/// a response header up by (lower-case) name; the upstream's explanation
/// comes from `x-ms-diagnostics` or `WWW-Authenticate` when present.
pub fn http<'a>(status: u16, header: impl Fn(&str) -> Option<&'a [u8]>) -> Option<Refusal> {
    let explained = |what: &str| {
        let why = header("x-ms-diagnostics")
            .or_else(|| header("www-authenticate"))
            .map(String::from_utf8_lossy);
        match why {
            Some(why) => format!("HTTP {status} {what}: {why}"),
            None => format!("HTTP {status} {what}"),
        }
    };
    match status {
        401 => Some(Refusal::Token {
            retry_after: header("retry-after").and_then(retry_after_seconds),
            text: bounded(&explained("Unauthorized")),
        }),
        403 => Some(Refusal::permanent(&explained("Forbidden"))),
        _ => None,
    }
}

/// A `Retry-After` given in seconds (an HTTP date is ignored).
fn retry_after_seconds(v: &[u8]) -> Option<Duration> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let secs: u64 = s.parse().ok()?;
    Some(Duration::from_secs(secs.min(24 * 3600)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smtp_codes_that_need_an_admin_are_permanent() {
        assert!(matches!(
            smtp(535, "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant."),
            Refusal::Permanent { ref text } if text.starts_with("535 5.7.139 Authentication unsuccessful")
        ));
        assert!(matches!(
            smtp(535, "5.7.30 Basic authentication is not supported"),
            Refusal::Permanent { .. }
        ));
        // Exchange Online's answer to an expired or revoked token.
        assert!(matches!(
            smtp(535, "5.7.3 Authentication unsuccessful [X]"),
            Refusal::Token { .. }
        ));
        assert!(matches!(smtp(535, ""), Refusal::Token { .. }));
    }

    #[test]
    fn imap_and_pop3_response_codes() {
        assert!(matches!(
            imap("[AUTHORIZATIONFAILED] not allowed"),
            Refusal::Permanent { .. }
        ));
        assert!(matches!(
            imap("[contactadmin] ask"),
            Refusal::Permanent { .. }
        ));
        assert!(matches!(
            imap("AUTHENTICATE failed."),
            Refusal::Token { .. }
        ));
        assert!(matches!(
            imap("[AUTHENTICATIONFAILED] bad"),
            Refusal::Token { .. }
        ));
        assert!(matches!(
            pop3("-ERR [SYS/PERM] POP3 is disabled for this mailbox"),
            Refusal::Permanent { ref text } if text == "-ERR [SYS/PERM] POP3 is disabled for this mailbox"
        ));
        assert!(matches!(
            pop3("-ERR Authentication failure: unknown user name or bad password."),
            Refusal::Token { .. }
        ));
    }

    #[test]
    fn http_statuses() {
        let none = |_: &str| None;
        assert_eq!(http(200, none), None);
        assert_eq!(http(500, none), None);
        assert!(matches!(
            http(401, |n| (n == "retry-after").then_some(&b"7"[..])),
            Some(Refusal::Token { retry_after: Some(d), .. }) if d == Duration::from_secs(7)
        ));
        let r = http(403, |n| {
            (n == "x-ms-diagnostics").then_some(&b"2000008;reason=\"EWS is disabled\""[..])
        });
        assert!(
            matches!(&r, Some(Refusal::Permanent { text }) if text.contains("EWS is disabled")),
            "{r:?}"
        );
    }

    #[test]
    fn upstream_words_are_bounded_and_on_one_line() {
        let long = format!("5.7.139 {}\r\ninjected", "x".repeat(1000));
        let r = smtp(535, &long);
        assert!(!r.text().contains('\n') && !r.text().contains('\r'));
        assert!(r.text().chars().count() <= MAX_TEXT + 1);
    }
}
