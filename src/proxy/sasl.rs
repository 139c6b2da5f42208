//! SASL pieces the mail front ends share: decoding the client's PLAIN and
//! LOGIN responses, and encoding the XOAUTH2 initial response for the
//! upstream (`user=U\x01auth=Bearer T\x01\x01`, base64).

use crate::secret::Secret;
use base64::Engine as _;
use zeroize::Zeroizing;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Credentials a legacy client presented.
#[derive(Debug)]
pub struct Credentials {
    /// Identity name.
    pub name: String,
    /// Local password.
    pub password: Secret,
}

/// Text that may be UTF-8 or (legacy clients) ISO-8859-1.
fn text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => bytes.iter().map(|&b| char::from(b)).collect(),
    }
}

/// Decodes base64 text sent by a client (whitespace around it ignored).
pub fn decode_b64(line: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    B64.decode(line.trim_ascii()).ok().map(Zeroizing::new)
}

/// Decodes a base64 SASL LOGIN step (user name or password).
pub fn decode_login_step(line: &[u8]) -> Option<Secret> {
    decode_b64(line).map(|b| Secret::new(text(&b)))
}

/// Decodes a SASL PLAIN response: `authzid NUL authcid NUL passwd`.
/// The authentication identity (authcid) is the identity name; an authzid
/// different from it is refused.
pub fn decode_plain(line: &[u8]) -> Option<Credentials> {
    let raw = decode_b64(line)?;
    let mut parts = raw.split(|&b| b == 0);
    let authzid = parts.next()?;
    let authcid = parts.next()?;
    let passwd = parts.next()?;
    if parts.next().is_some() || authcid.is_empty() {
        return None;
    }
    let name = text(authcid);
    if !authzid.is_empty() && text(authzid) != name {
        return None;
    }
    Some(Credentials {
        name,
        password: Secret::new(text(passwd)),
    })
}

/// The XOAUTH2 initial client response, base64-encoded.
pub fn xoauth2(user: &str, token: &Secret) -> Secret {
    let raw = Zeroizing::new(format!(
        "user={user}\x01auth=Bearer {}\x01\x01",
        token.expose()
    ));
    Secret::new(B64.encode(raw.as_bytes()))
}

/// Base64 of `s` (server challenges such as `Username:`).
pub fn encode(s: &str) -> String {
    B64.encode(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_xoauth2() {
        let c = decode_plain(B64.encode(b"\0alice\0pw:1").as_bytes()).unwrap();
        assert_eq!((c.name.as_str(), c.password.expose()), ("alice", "pw:1"));
        let c = decode_plain(B64.encode(b"alice\0alice\0pw").as_bytes()).unwrap();
        assert_eq!(c.name, "alice");
        assert!(decode_plain(B64.encode(b"bob\0alice\0pw").as_bytes()).is_none());
        assert!(decode_plain(b"!!!").is_none());
        assert!(decode_plain(B64.encode(b"alice").as_bytes()).is_none());
        let x = xoauth2("a@b.c", &Secret::new("T"));
        assert_eq!(
            B64.decode(x.expose()).unwrap(),
            b"user=a@b.c\x01auth=Bearer T\x01\x01"
        );
        assert_eq!(decode_login_step(b"YWxpY2U=\r").unwrap().expose(), "alice");
    }
}
