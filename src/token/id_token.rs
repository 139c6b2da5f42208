//! OpenID Connect ID tokens: reads the signed-in account (`preferred_username`
//! or `upn`, `oid`, `tid`) from the ID token of a code or device-code grant and
//! validates it per OpenID Connect Core 3.1.3.7: issuer, audience, expiry,
//! issue time and nonce.
//!
//! The signature is not checked. OIDC Core 3.1.3.7 (item 6) allows that when
//! the token was received directly from the token endpoint over TLS, which is
//! the only way authswap obtains ID tokens: they are never taken from a
//! browser, a redirect or a user.

use base64::Engine;
use serde::Deserialize;

/// Clock skew tolerated on `exp` and `iat`.
pub const SKEW_SECS: i64 = 300;
/// Largest ID token accepted.
const MAX_LEN: usize = 16 * 1024;

/// The account an ID token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdClaims {
    /// `preferred_username` (or `upn`): usually the UPN.
    pub account: String,
    /// Object id of the account.
    pub oid: String,
    /// Tenant id.
    pub tid: String,
}

/// What the ID token must match.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// `identity_provider.authority` (`https://login.microsoftonline.com`).
    pub authority: &'a str,
    /// `identity_provider.tenant` (a GUID, a domain, `organizations`, `common`).
    pub tenant: &'a str,
    /// `identity_provider.client_id`.
    pub client_id: &'a str,
    /// The nonce sent in the authorization request (none for device code).
    pub nonce: Option<&'a str>,
    /// Current Unix time.
    pub now: i64,
}

/// Why an ID token was refused. Never carries the token itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdTokenError {
    /// Not three base64url parts with a JSON payload.
    #[error("the ID token is not a well-formed JWT")]
    Malformed,
    /// A required claim is absent.
    #[error("the ID token has no `{0}` claim")]
    Missing(&'static str),
    /// `iss` is not the configured authority for the token's tenant.
    #[error("the ID token was issued by `{found}`, expected `{expected}`")]
    Issuer {
        /// The token's issuer (bounded).
        found: String,
        /// What was expected.
        expected: String,
    },
    /// `tid` is not the configured tenant.
    #[error("the ID token is from tenant `{0}`, not the configured tenant")]
    Tenant(String),
    /// `aud` is not our client id.
    #[error("the ID token was issued to another application")]
    Audience,
    /// `exp` is in the past.
    #[error("the ID token has expired")]
    Expired,
    /// `iat` is in the future.
    #[error("the ID token was issued in the future (check the clock)")]
    IssuedInFuture,
    /// `nonce` is not the one sent with this sign-in.
    #[error("the ID token does not belong to this sign-in (nonce mismatch)")]
    Nonce,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Claims {
    iss: Option<String>,
    aud: Option<Audience>,
    exp: Option<f64>,
    iat: Option<f64>,
    nonce: Option<String>,
    tid: Option<String>,
    oid: Option<String>,
    preferred_username: Option<String>,
    upn: Option<String>,
}

/// Whether `s` looks like a GUID (a tenant id rather than a domain or alias).
pub fn is_guid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn bounded(s: &str) -> String {
    s.chars().take(200).collect()
}

/// Decodes and validates an ID token; returns the account it names.
pub fn validate(token: &str, expected: &Expected<'_>) -> Result<IdClaims, IdTokenError> {
    if token.len() > MAX_LEN {
        return Err(IdTokenError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(IdTokenError::Malformed);
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| IdTokenError::Malformed)?;
    let claims: Claims = serde_json::from_slice(&bytes).map_err(|_| IdTokenError::Malformed)?;

    let tid = claims.tid.ok_or(IdTokenError::Missing("tid"))?;
    let iss = claims.iss.ok_or(IdTokenError::Missing("iss"))?;
    // Microsoft's multi-tenant endpoints (`organizations`, `common`) issue
    // tokens whose issuer names the user's tenant: check the issuer against
    // the configured authority with the token's own `tid`, and the tenant
    // itself when one is configured by id.
    let want_iss = format!("{}/{}/v2.0", expected.authority.trim_end_matches('/'), tid);
    if iss != want_iss {
        return Err(IdTokenError::Issuer {
            found: bounded(&iss),
            expected: want_iss,
        });
    }
    if is_guid(expected.tenant) && !tid.eq_ignore_ascii_case(expected.tenant) {
        return Err(IdTokenError::Tenant(bounded(&tid)));
    }
    let aud_ok = match claims.aud.ok_or(IdTokenError::Missing("aud"))? {
        Audience::One(a) => a == expected.client_id,
        Audience::Many(list) => list.iter().any(|a| a == expected.client_id),
    };
    if !aud_ok {
        return Err(IdTokenError::Audience);
    }
    let exp = claims.exp.ok_or(IdTokenError::Missing("exp"))? as i64;
    if exp.saturating_add(SKEW_SECS) <= expected.now {
        return Err(IdTokenError::Expired);
    }
    let iat = claims.iat.ok_or(IdTokenError::Missing("iat"))? as i64;
    if iat > expected.now.saturating_add(SKEW_SECS) {
        return Err(IdTokenError::IssuedInFuture);
    }
    if let Some(want) = expected.nonce {
        // Compared in constant time: it is cheap and the nonce is a secret
        // of this sign-in.
        use subtle::ConstantTimeEq;
        let got = claims.nonce.ok_or(IdTokenError::Nonce)?;
        if !bool::from(got.as_bytes().ct_eq(want.as_bytes())) {
            return Err(IdTokenError::Nonce);
        }
    }
    let account = claims
        .preferred_username
        .filter(|s| !s.trim().is_empty())
        .or(claims.upn.filter(|s| !s.trim().is_empty()))
        .ok_or(IdTokenError::Missing("preferred_username"))?;
    let oid = claims.oid.ok_or(IdTokenError::Missing("oid"))?;
    Ok(IdClaims {
        account: account.trim().to_owned(),
        oid,
        tid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TID: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    const NOW: i64 = 1_800_000_000;

    fn jwt(payload: serde_json::Value) -> String {
        let e = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.{}",
            e(br#"{"alg":"RS256","typ":"JWT","kid":"k1"}"#),
            e(payload.to_string().as_bytes()),
            e(b"signature")
        )
    }

    fn good() -> serde_json::Value {
        json!({
            "iss": format!("https://login.microsoftonline.com/{TID}/v2.0"),
            "aud": "client-1",
            "exp": NOW + 3600,
            "iat": NOW - 10,
            "nbf": NOW - 10,
            "nonce": "n-123",
            "tid": TID,
            "oid": "00000000-0000-0000-0000-000000000001",
            "preferred_username": "Alice@Contoso.com",
            "name": "Alice",
        })
    }

    fn expected(tenant: &str) -> Expected<'_> {
        Expected {
            authority: "https://login.microsoftonline.com/",
            tenant,
            client_id: "client-1",
            nonce: Some("n-123"),
            now: NOW,
        }
    }

    fn with(key: &str, value: serde_json::Value) -> String {
        let mut p = good();
        p[key] = value;
        jwt(p)
    }

    #[test]
    fn a_good_token_names_the_account() {
        for tenant in ["organizations", "common", TID, "contoso.onmicrosoft.com"] {
            let c = validate(&jwt(good()), &expected(tenant)).unwrap();
            assert_eq!(c.account, "Alice@Contoso.com");
            assert_eq!(c.tid, TID);
        }
        // `upn` when there is no preferred_username; `aud` as an array.
        let mut p = good();
        p.as_object_mut().unwrap().remove("preferred_username");
        p["upn"] = json!("alice@contoso.com");
        p["aud"] = json!(["other", "client-1"]);
        assert_eq!(
            validate(&jwt(p), &expected("organizations"))
                .unwrap()
                .account,
            "alice@contoso.com"
        );
        // Device code: no nonce expected.
        let mut e = expected("organizations");
        e.nonce = None;
        let mut p = good();
        p.as_object_mut().unwrap().remove("nonce");
        assert!(validate(&jwt(p), &e).is_ok());
    }

    #[test]
    fn bad_issuer_audience_expiry_and_nonce_are_refused() {
        let e = expected("organizations");
        assert!(matches!(
            validate(&with("iss", json!("https://evil.example/x/v2.0")), &e),
            Err(IdTokenError::Issuer { .. })
        ));
        // The issuer must name the token's own tenant.
        assert!(matches!(
            validate(
                &with(
                    "iss",
                    json!("https://login.microsoftonline.com/00000000-0000-0000-0000-000000000000/v2.0")
                ),
                &e
            ),
            Err(IdTokenError::Issuer { .. })
        ));
        // Another tenant than the configured one.
        assert_eq!(
            validate(
                &jwt(good()),
                &expected("11111111-2222-3333-4444-555555555555")
            ),
            Err(IdTokenError::Tenant(TID.into()))
        );
        assert_eq!(
            validate(&with("aud", json!("client-2")), &e),
            Err(IdTokenError::Audience)
        );
        assert_eq!(
            validate(&with("exp", json!(NOW - SKEW_SECS - 1)), &e),
            Err(IdTokenError::Expired)
        );
        assert_eq!(
            validate(&with("iat", json!(NOW + SKEW_SECS + 60)), &e),
            Err(IdTokenError::IssuedInFuture)
        );
        assert_eq!(
            validate(&with("nonce", json!("n-999")), &e),
            Err(IdTokenError::Nonce)
        );
        let mut p = good();
        p.as_object_mut().unwrap().remove("nonce");
        assert_eq!(validate(&jwt(p), &e), Err(IdTokenError::Nonce));
        let mut p = good();
        p.as_object_mut().unwrap().remove("oid");
        assert_eq!(validate(&jwt(p), &e), Err(IdTokenError::Missing("oid")));
    }

    #[test]
    fn garbage_is_malformed_and_errors_hold_no_token() {
        let e = expected("organizations");
        for bad in ["", "a.b", "a.b.c.d", "x.!!!.y", "eyJ.e30.x"] {
            assert!(validate(bad, &e).is_err(), "{bad}");
        }
        let token = with("aud", json!("client-2"));
        let err = validate(&token, &e).unwrap_err();
        assert!(!format!("{err} {err:?}").contains(&token));
        assert!(is_guid(TID) && !is_guid("organizations"));
    }
}
