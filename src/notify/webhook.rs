//! The webhook channel: a JSON POST to `[notifications] webhook_url`
//! through the shared outbound client, signed with HMAC-SHA256 of the body
//! in `X-Authswap-Signature: sha256=<hex>` when a secret is configured.

use super::{Notice, NotifyError};
use crate::app::App;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use sha2::Sha256;
use std::time::Duration;

/// Longest time one webhook attempt may take.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// The JSON body of a notification.
pub fn payload(notice: &Notice) -> serde_json::Value {
    let expires = u64::try_from(notice.invitation.record.expires_at)
        .map(|s| {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(s))
                .to_string()
        })
        .unwrap_or_default();
    serde_json::json!({
        "event": notice.kind.as_str(),
        "identity": notice.identity.name,
        "mailbox": notice.identity.mailbox,
        "reason": notice.reason,
        "aadsts": notice.aadsts,
        "reauth_url": notice.invitation.url.expose(),
        "code": notice.invitation.code.expose(),
        "expires_at": expires,
    })
}

/// `sha256=<hex of HMAC-SHA256(secret, body)>`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// One delivery attempt.
pub(super) async fn send(app: &App, notice: &Notice) -> Result<(), NotifyError> {
    let n = &app.config.notifications;
    let Some(url) = &n.webhook_url else {
        return Ok(());
    };
    let body =
        serde_json::to_vec(&payload(notice)).map_err(|e| NotifyError::Webhook(e.to_string()))?;
    let mut req = http::Request::builder()
        .method(http::Method::POST)
        .uri(url.as_str())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(
            "user-agent",
            concat!("authswap/", env!("CARGO_PKG_VERSION")),
        );
    if let Some(secret) = &n.webhook_secret {
        req = req.header(
            "X-Authswap-Signature",
            sign(secret.expose().as_bytes(), &body),
        );
    }
    let body: crate::tls::OutBody = Full::new(Bytes::from(body))
        .map_err(|never| -> crate::tls::BoxError { match never {} })
        .boxed_unsync();
    // The URL itself is left out of errors: webhook URLs often carry a key.
    let req = req
        .body(body)
        .map_err(|_| NotifyError::Webhook("the webhook URL is not usable".into()))?;
    let work = async {
        let res = app
            .client
            .request(req)
            .await
            .map_err(|e| NotifyError::Webhook(crate::token::idp::error_chain(&e)))?;
        let status = res.status();
        // Drain a little of the answer so the connection can be reused.
        let _ = http_body_util::Limited::new(res.into_body(), 64 * 1024)
            .collect()
            .await;
        if status.is_success() {
            Ok(())
        } else {
            Err(NotifyError::WebhookStatus(status.as_u16()))
        }
    };
    tokio::time::timeout(WEBHOOK_TIMEOUT, work)
        .await
        .map_err(|_| NotifyError::Webhook(format!("no answer within {WEBHOOK_TIMEOUT:?}")))?
}

#[cfg(test)]
mod tests {
    use super::sign;

    #[test]
    fn signature_is_hex_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
