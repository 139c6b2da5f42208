//! Classification of identity-platform failures: does a person have to sign
//! in again (stop trying), must an admin fix the app registration, or is it
//! transient (retry later with backoff)? The `error` field decides first;
//! AADSTS codes refine it.

use std::time::Duration;

/// AADSTS codes that mean the user must sign in again.
const REAUTH_CODES: &[u32] = &[
    50173, 70008, 700082, 700084, 70043, 50076, 50078, 50079, 65001, 90094, 53003, 50126, 50055,
    50057, 50034, 70000,
];
/// AADSTS codes that mean the app's credential (secret, certificate) or
/// its registration in the tenant is broken: every identity of the tenant
/// is blocked until an admin fixes it.
const CREDENTIAL_CODES: &[u32] = &[7000215, 7000222, 700027, 700016, 7000218, 700024];
/// AADSTS codes that mean the app registration is misconfigured otherwise.
const APP_CODES: &[u32] = &[70011];
/// AADSTS codes that are transient.
const TRANSIENT_CODES: &[u32] = &[50033, 90006, 90024, 90033, 90090, 50087, 90015];

/// A failed exchange with the identity platform.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdpError {
    /// The refresh token is no longer accepted: a person must sign in again.
    #[error("re-authentication required: {message}")]
    Reauth {
        /// OAuth `error` value.
        error: String,
        /// The platform's description (first line).
        message: String,
    },
    /// The app registration, its secret or the requested scopes are wrong:
    /// an admin must fix the configuration. Retried slowly.
    #[error("identity platform refused the app configuration: {message}")]
    Configuration {
        /// What the platform said.
        message: String,
    },
    /// Unavailable, throttled, timed out or malformed: retry later.
    #[error("identity platform unavailable: {message}")]
    Transient {
        /// What went wrong.
        message: String,
        /// The platform's `Retry-After`, if any.
        retry_after: Option<Duration>,
    },
    /// The app's credential is refused (secret expired or wrong, assertion
    /// or certificate not accepted, app unknown in the tenant): an admin
    /// must fix it, and every identity of the tenant waits for that.
    #[error("the identity platform refused the app credential: {message}")]
    AppCredential {
        /// The AADSTS code, when given.
        code: Option<u32>,
        /// What to do, in plain words, then what the platform said.
        message: String,
    },
    /// `identity_provider.client_id` is not set.
    #[error("identity_provider.client_id is not configured")]
    NotConfigured,
}

impl crate::error::Failure for IdpError {
    fn origin(&self) -> crate::error::Origin {
        match self {
            IdpError::NotConfigured => crate::error::Origin::Internal,
            _ => crate::error::Origin::IdentityPlatform,
        }
    }

    fn retryable(&self) -> bool {
        matches!(self, IdpError::Transient { .. })
    }
}

impl IdpError {
    /// Transient with a message.
    pub fn transient(message: impl Into<String>) -> IdpError {
        IdpError::Transient {
            message: message.into(),
            retry_after: None,
        }
    }
}

/// First line of an error description, bounded, for storage and display.
pub fn summarize(description: &str) -> String {
    let line = description.lines().next().unwrap_or("").trim();
    let mut s: String = line.chars().take(400).collect();
    if s.len() < line.len() {
        s.push('…');
    }
    s
}

/// Extracts AADSTS codes mentioned in a description (when `error_codes` is absent).
fn codes_in(description: &str) -> Vec<u32> {
    description
        .match_indices("AADSTS")
        .filter_map(|(i, _)| {
            let digits: String = description[i + 6..]
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            digits.parse().ok()
        })
        .collect()
}

/// What a refused app credential means, in words an admin acts on.
fn credential_words(code: Option<u32>) -> &'static str {
    match code {
        Some(7000222) => "the app's client secret has expired: create a new one in Entra ID (App registrations → Certificates & secrets) and update client_secret_file",
        Some(7000215) => "the app's client secret is wrong: copy the secret's value (not its id) from Entra ID into client_secret_file",
        Some(700027) | Some(7000218) | Some(700024) => "the app's certificate credential was refused: upload the certificate to the app registration (Certificates & secrets), check it has not expired and the private key matches",
        Some(700016) => "the app is not known in this tenant: an admin of the tenant must consent to it (admin consent) or the tenant or client id is wrong",
        _ => "the identity platform refused the app's credential: check the client id and its secret or certificate",
    }
}

/// Classifies an OAuth error response.
pub fn classify(
    status: Option<u16>,
    error: &str,
    description: &str,
    error_codes: &[u32],
    retry_after: Option<Duration>,
) -> IdpError {
    let mut codes = error_codes.to_vec();
    if codes.is_empty() {
        codes = codes_in(description);
    }
    let message = {
        let s = summarize(description);
        if s.is_empty() {
            error.to_owned()
        } else {
            s
        }
    };
    let has = |list: &[u32]| codes.iter().any(|c| list.contains(c));
    if has(TRANSIENT_CODES)
        || matches!(error, "temporarily_unavailable" | "server_error")
        || status.is_some_and(|s| s == 429 || s >= 500)
    {
        return IdpError::Transient {
            message,
            retry_after,
        };
    }
    if has(CREDENTIAL_CODES) || error == "invalid_client" {
        let code = codes.iter().copied().find(|c| CREDENTIAL_CODES.contains(c));
        return IdpError::AppCredential {
            code,
            message: format!("{} ({message})", credential_words(code)),
        };
    }
    if has(APP_CODES)
        || matches!(
            error,
            "unauthorized_client" | "invalid_scope" | "unsupported_grant_type"
        )
    {
        return IdpError::Configuration { message };
    }
    if has(REAUTH_CODES)
        || matches!(
            error,
            "invalid_grant"
                | "interaction_required"
                | "consent_required"
                | "login_required"
                | "access_denied"
        )
    {
        return IdpError::Reauth {
            error: error.to_owned(),
            message,
        };
    }
    IdpError::Transient {
        message,
        retry_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_follows_error_then_codes() {
        assert!(matches!(
            classify(Some(400), "invalid_grant", "AADSTS70008: expired.\r\nTrace ID: x", &[70008], None),
            IdpError::Reauth { ref message, .. } if message == "AADSTS70008: expired."
        ));
        assert!(matches!(
            classify(Some(400), "invalid_grant", "AADSTS50076: MFA", &[], None),
            IdpError::Reauth { .. }
        ));
        assert!(matches!(
            classify(
                Some(401),
                "invalid_client",
                "AADSTS7000215: bad secret",
                &[7000215],
                None
            ),
            IdpError::AppCredential {
                code: Some(7000215),
                ..
            }
        ));
        assert!(matches!(
            classify(Some(401), "invalid_client", "AADSTS7000222: The provided client secret keys for app 'x' are expired.", &[], None),
            IdpError::AppCredential { code: Some(7000222), ref message } if message.contains("expired") && message.contains("AADSTS7000222")
        ));
        assert!(matches!(
            classify(
                Some(400),
                "invalid_scope",
                "AADSTS70011: bad scope",
                &[70011],
                None
            ),
            IdpError::Configuration { .. }
        ));
        assert!(matches!(
            classify(Some(503), "temporarily_unavailable", "AADSTS90006", &[], Some(Duration::from_secs(2))),
            IdpError::Transient { retry_after: Some(d), .. } if d == Duration::from_secs(2)
        ));
        assert!(matches!(
            classify(
                Some(400),
                "invalid_grant",
                "AADSTS50033: retry",
                &[50033],
                None
            ),
            IdpError::Transient { .. }
        ));
        assert!(matches!(
            classify(Some(429), "", "", &[], None),
            IdpError::Transient { .. }
        ));
    }
}
