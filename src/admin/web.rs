//! Small HTTP helpers of the admin listener: bounded body reading, path
//! matching with `{param}` segments, query and form decoding, cookies and
//! the same-origin checks of state-changing browser requests.

use bytes::Bytes;
use http::{header, HeaderMap};
use http_body_util::BodyExt;
use std::time::Duration;

/// Largest body of an ordinary request.
pub const BODY_LIMIT: usize = 16 * 1024;
/// Largest body of a CSV import.
pub const IMPORT_LIMIT: usize = 1024 * 1024;
/// How long a client may take to send its body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Larger than allowed.
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    /// Not sent in time.
    #[error("the request body did not arrive in time")]
    Timeout,
    /// The connection failed.
    #[error("the request body could not be read")]
    Read,
}

/// Reads a whole body of at most `limit` bytes within [`BODY_TIMEOUT`].
pub async fn read_body<B>(headers: &HeaderMap, body: B, limit: usize) -> Result<Bytes, BodyError>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(BodyError::TooLarge(limit));
        }
    }
    let limited = http_body_util::Limited::new(body, limit);
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => Err(BodyError::Timeout),
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge(limit)),
        Ok(Err(_)) => Err(BodyError::Read),
    }
}

/// Decodes `%XX` escapes of a path segment (not `+`); `None` when the
/// result is not UTF-8 or an escape is malformed.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encodes a path segment.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Matches `path` against `pattern` (`/api/v1/identities/{name}`); returns
/// the decoded `{...}` segments in order.
pub fn match_path(pattern: &str, path: &str) -> Option<Vec<String>> {
    let mut params = Vec::new();
    let mut p = pattern.split('/');
    let mut s = path.split('/');
    loop {
        match (p.next(), s.next()) {
            (None, None) => return Some(params),
            (Some(pp), Some(ss)) if pp.starts_with('{') && pp.ends_with('}') => {
                if ss.is_empty() {
                    return None;
                }
                params.push(percent_decode(ss)?);
            }
            (Some(pp), Some(ss)) if pp == ss => {}
            _ => return None,
        }
    }
}

/// Decoded `application/x-www-form-urlencoded` pairs (queries and forms).
pub fn form_pairs(input: &[u8]) -> Vec<(String, String)> {
    url::form_urlencoded::parse(input)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The first value of `key` among `pairs`.
pub fn field<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The value of cookie `name`.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// Whether a state-changing browser request comes from our own pages:
/// `Sec-Fetch-Site`, when sent, is `same-origin` or `none`, and `Origin`,
/// when sent, is this listener (`scheme://Host`).
pub fn same_origin(headers: &HeaderMap, secure: bool) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or("");
        if site != "same-origin" && site != "none" {
            return false;
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
            return false;
        };
        let scheme = if secure { "https" } else { "http" };
        return origin.to_str().ok() == Some(&format!("{scheme}://{host}"));
    }
    true
}

/// Whether the `Content-Type` is `mime` (parameters ignored).
pub fn content_type_is(headers: &HeaderMap, mime: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(mime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_match_with_decoded_params() {
        assert_eq!(
            match_path("/api/v1/identities/{name}", "/api/v1/identities/a%20b"),
            Some(vec!["a b".to_owned()])
        );
        assert_eq!(
            match_path("/api/v1/identities/{name}", "/api/v1/identities/"),
            None
        );
        assert_eq!(
            match_path("/api/v1/identities", "/api/v1/identities/x"),
            None
        );
        assert_eq!(
            match_path("/x/{a}/y", "/x/%C3%A9/y"),
            Some(vec!["é".to_owned()])
        );
        assert_eq!(match_path("/x/{a}", "/x/%zz"), None);
        assert_eq!(
            percent_decode(&percent_encode("jörg/x y")).unwrap(),
            "jörg/x y"
        );
    }

    #[test]
    fn origin_checks() {
        let mut h = HeaderMap::new();
        assert!(same_origin(&h, false));
        h.insert(header::HOST, "127.0.0.1:9090".parse().unwrap());
        h.insert(header::ORIGIN, "http://127.0.0.1:9090".parse().unwrap());
        assert!(same_origin(&h, false));
        assert!(!same_origin(&h, true));
        h.insert(header::ORIGIN, "http://evil.example".parse().unwrap());
        assert!(!same_origin(&h, false));
        h.remove(header::ORIGIN);
        h.insert("sec-fetch-site", "cross-site".parse().unwrap());
        assert!(!same_origin(&h, false));
        h.insert("sec-fetch-site", "same-origin".parse().unwrap());
        assert!(same_origin(&h, false));
    }

    #[test]
    fn cookies_are_found() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; authswap_admin=xyz; b=2".parse().unwrap(),
        );
        assert_eq!(cookie(&h, "authswap_admin").as_deref(), Some("xyz"));
        assert_eq!(cookie(&h, "c"), None);
    }
}
