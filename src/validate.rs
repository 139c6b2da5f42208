//! End-to-end validation of an identity: for each enabled front end, an
//! access token from the token engine (so refresh, rotation and status
//! updates apply as for any client) proved against the real upstream (EWS
//! `GetFolder` of the inbox or the configured HTTP probe path; SMTP
//! `EHLO`/`AUTH XOAUTH2`/`QUIT`; IMAP `AUTHENTICATE`/`LOGOUT`; POP3
//! `AUTH`/`QUIT`). Each protocol's result is stored with the upstream's own
//! answer and what it means in plain words, and the run is audited.
//!
//! Refusals go through the same policy as client traffic
//! ([`crate::token::refusal`]): a refused token is refreshed and tried once
//! more, a refusal that needs an administrator (SMTP `5.7.139`, EWS 403)
//! marks the identity `upstream_refused` exactly as a client login meeting
//! it would, and a success clears that state.

use crate::app::App;
use crate::identity::Identity;
use crate::metrics::Protocol;
use crate::proxy::imap::Imap;
use crate::proxy::mail::{MailFrontEnd, MailSetupError, UpstreamLogin};
use crate::proxy::pop3::Pop3;
use crate::proxy::smtp::Smtp;
use crate::store::{now_unix, NewAudit, StoreError, ValidationRecord};
use crate::token::idp::error_chain;
use crate::token::{refusal, AccessToken, ScopeSet, Scopes, TokenError, Verdict};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Path of the EWS endpoint under `[http] upstream`.
pub const EWS_PATH: &str = "/EWS/Exchange.asmx";
/// Longest time one HTTP probe may take (the proxy's own
/// `upstream_timeout` is sized for large mail items, not for a probe).
const HTTP_PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest probe response read.
const MAX_PROBE_BODY: usize = 1024 * 1024;
/// Longest upstream answer kept in a validation record.
const MAX_ANSWER: usize = 300;

/// An EWS `GetFolder` of the inbox (SOAP 1.1), the HTTP proof of a token.
const GET_INBOX: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/" xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types" xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages">
  <soap:Header><t:RequestServerVersion Version="Exchange2013_SP1"/></soap:Header>
  <soap:Body>
    <m:GetFolder>
      <m:FolderShape><t:BaseShape>IdOnly</t:BaseShape></m:FolderShape>
      <m:FolderIds><t:DistinguishedFolderId Id="inbox"/></m:FolderIds>
    </m:GetFolder>
  </soap:Body>
</soap:Envelope>"#;

/// Why an identity could not be validated at all (a failing protocol is
/// not an error: it is a record with `ok: false`).
#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    /// No identity with that name.
    #[error("no identity named `{0}`")]
    NotFound(String),
    /// The store failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// A mail front end's settings do not allow an upstream connection.
    #[error("{0}")]
    Setup(#[from] MailSetupError),
}

impl crate::error::Failure for ValidateError {
    fn origin(&self) -> crate::error::Origin {
        match self {
            ValidateError::NotFound(_) => crate::error::Origin::Client,
            ValidateError::Store(_) => crate::error::Origin::Store,
            ValidateError::Setup(_) => crate::error::Origin::Internal,
        }
    }

    fn retryable(&self) -> bool {
        matches!(self, ValidateError::Store(e) if e.retryable())
    }
}

/// Why using an identity's token upstream failed: no token, or the
/// upstream's refusal or failure (after the refusal policy ran).
#[derive(Debug, thiserror::Error)]
pub enum UseTokenError {
    /// No access token could be had.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The upstream refused or failed.
    #[error(transparent)]
    Upstream(#[from] UpstreamLogin),
}

impl UseTokenError {
    /// The upstream's own words (or what failed before it), on one line,
    /// bounded. Never holds a token: tokens never enter these errors.
    pub fn answer(&self) -> String {
        let text = match self {
            UseTokenError::Token(TokenError::ReauthRequired { message, .. })
            | UseTokenError::Token(TokenError::Unavailable { message, .. })
            | UseTokenError::Token(TokenError::AppCredential { message, .. }) => message.clone(),
            UseTokenError::Token(e @ TokenError::Refused { .. }) => e.to_string(),
            UseTokenError::Upstream(UpstreamLogin::Rejected(r)) => r.text().to_owned(),
            UseTokenError::Upstream(UpstreamLogin::Temporary(t)) => t.clone(),
            UseTokenError::Upstream(UpstreamLogin::Unexpected { said, .. }) => said.clone(),
            UseTokenError::Upstream(e) => error_chain(e),
        };
        one_line(&text)
    }
}

/// Gets `identity`'s access token for `scopes` and runs `attempt` with it
/// under the shared refusal policy: a refused token is reported to the
/// engine, refreshed and tried once more; a success is reported too (it
/// clears `upstream_refused`). At most two attempts.
pub async fn with_token<T, F, Fut>(
    app: &App,
    identity: &Arc<Identity>,
    scopes: &Scopes,
    protocol: Protocol,
    attempt: F,
) -> Result<T, UseTokenError>
where
    F: Fn(AccessToken) -> Fut,
    Fut: Future<Output = Result<T, UpstreamLogin>>,
{
    let mut retried = false;
    loop {
        let token = app.tokens.access_token(identity, scopes).await?;
        match attempt(token.clone()).await {
            Ok(v) => {
                app.tokens.accepted(identity, scopes, &token);
                return Ok(v);
            }
            Err(UpstreamLogin::Rejected(r)) => {
                match app.tokens.refused(identity, scopes, &token, protocol, &r) {
                    Verdict::Retry if !retried => retried = true,
                    _ => return Err(UpstreamLogin::Rejected(r).into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Validates identity `name` on every enabled front end, stores each
/// protocol's result and audits the run as done by `actor`.
pub async fn validate(
    app: &Arc<App>,
    name: &str,
    actor: &str,
) -> Result<Vec<ValidationRecord>, ValidateError> {
    // See identities added or linked a moment ago.
    if let Err(e) = app.reload().await {
        tracing::warn!(error = %e, "cannot reload identities before validating");
    }
    let record = app
        .store
        .get(name)
        .await?
        .ok_or_else(|| ValidateError::NotFound(name.to_owned()))?;
    let identity = app
        .directory
        .get(&record.name)
        .ok_or_else(|| ValidateError::NotFound(name.to_owned()))?;
    let cfg = app.config.clone();
    let mut results = Vec::new();
    let not_linked = !record.has_refresh_token && record.mode == crate::store::Mode::Delegated;
    let mut run = |protocol: &str, outcome: Result<String, UseTokenError>| {
        let rec = match outcome {
            Ok(answer) => ValidationRecord {
                protocol: protocol.to_owned(),
                at: now_unix(),
                ok: true,
                answer: one_line(&answer),
                meaning: "works: the upstream accepted the access token".to_owned(),
            },
            Err(e) => ValidationRecord {
                protocol: protocol.to_owned(),
                at: now_unix(),
                ok: false,
                answer: e.answer(),
                meaning: if not_linked {
                    "the identity is not linked to a Microsoft account yet: send an invitation (authswap invite NAME) or run authswap identity login NAME".to_owned()
                } else {
                    meaning(protocol, &e)
                },
            },
        };
        results.push(rec);
    };
    if cfg.http.enabled {
        let (label, path) = match cfg.http.probe_path.as_deref() {
            Some(p) if !p.eq_ignore_ascii_case(EWS_PATH) => ("http", Some(p.to_owned())),
            _ => ("ews", None),
        };
        let scopes = ScopeSet::new(&cfg.http.scopes, &cfg.http.app_scopes);
        let outcome = with_token(
            app,
            &identity,
            scopes.of(&identity),
            Protocol::http,
            |token| http_probe(app, &identity, token, path.clone()),
        )
        .await;
        run(label, outcome);
    }
    if cfg.smtp.enabled {
        let front = MailFrontEnd::new(
            app.clone(),
            cfg.smtp.clone(),
            Protocol::smtp,
            "smtp.upstream",
        )?;
        let scopes = front.scopes.of(&identity).clone();
        let smtp = Smtp::new(Arc::new(front));
        let outcome = with_token(app, &identity, &scopes, Protocol::smtp, |token| {
            let smtp = smtp.clone();
            let mailbox = identity.mailbox.clone();
            async move { smtp.probe(&mailbox, token.secret()).await }
        })
        .await;
        run("smtp", outcome);
    }
    if cfg.imap.enabled {
        let front = MailFrontEnd::new(
            app.clone(),
            cfg.imap.clone(),
            Protocol::imap,
            "imap.upstream",
        )?;
        let scopes = front.scopes.of(&identity).clone();
        let imap = Imap::new(Arc::new(front));
        let outcome = with_token(app, &identity, &scopes, Protocol::imap, |token| {
            let imap = imap.clone();
            let mailbox = identity.mailbox.clone();
            async move { imap.probe(&mailbox, token.secret()).await }
        })
        .await;
        run("imap", outcome);
    }
    if cfg.pop3.enabled {
        let front = MailFrontEnd::new(
            app.clone(),
            cfg.pop3.clone(),
            Protocol::pop3,
            "pop3.upstream",
        )?;
        let scopes = front.scopes.of(&identity).clone();
        let pop3 = Pop3::new(Arc::new(front));
        let outcome = with_token(app, &identity, &scopes, Protocol::pop3, |token| {
            let pop3 = pop3.clone();
            let mailbox = identity.mailbox.clone();
            async move { pop3.probe(&mailbox, token.secret()).await }
        })
        .await;
        run("pop3", outcome);
    }
    for r in &results {
        app.store.record_validation(record.id, r).await?;
    }
    let all_ok = !results.is_empty() && results.iter().all(|r| r.ok);
    let detail = if results.is_empty() {
        "no front end is enabled".to_owned()
    } else {
        results
            .iter()
            .map(|r| format!("{} {}", r.protocol, if r.ok { "ok" } else { "FAILED" }))
            .collect::<Vec<_>>()
            .join(", ")
    };
    app.store
        .audit(&NewAudit {
            actor,
            action: "identity.validate",
            identity: Some(&record.name),
            outcome: if all_ok { "ok" } else { "failed" },
            detail: Some(&detail),
        })
        .await?;
    tracing::info!(identity = %record.name, result = %detail, "identity validated");
    Ok(results)
}

/// One HTTP proof: the EWS `GetFolder` of the inbox (`path` `None`) or a
/// GET of `path`.
/// The `GetFolder` probe body; an app-only identity's impersonates its
/// mailbox, as its clients' requests do.
fn get_inbox(identity: &Identity, impersonation: bool) -> Bytes {
    let plain = Bytes::from_static(GET_INBOX.as_bytes());
    if identity.mode != crate::store::Mode::App || !impersonation {
        return plain;
    }
    match crate::proxy::http::soap::impersonate(GET_INBOX.as_bytes(), &identity.mailbox) {
        Ok(crate::proxy::http::soap::Impersonation::Rewritten(body)) => Bytes::from(body),
        _ => plain,
    }
}

async fn http_probe(
    app: &App,
    identity: &Identity,
    token: AccessToken,
    path: Option<String>,
) -> Result<String, UpstreamLogin> {
    let mailbox = identity.mailbox.as_str();
    let cfg = &app.config.http;
    let base = cfg.upstream.trim_end_matches('/');
    let ews = path.is_none();
    let step = if ews {
        "GetFolder"
    } else {
        "the probe request"
    };
    let (method, url, body) = match &path {
        None => (
            http::Method::POST,
            format!("{base}{EWS_PATH}"),
            get_inbox(identity, cfg.ews_impersonation),
        ),
        Some(p) => (http::Method::GET, format!("{base}{p}"), Bytes::new()),
    };
    let mut req = http::Request::builder()
        .method(method)
        .uri(&url)
        .header(http::header::AUTHORIZATION, token.bearer_header().clone())
        .header(
            "user-agent",
            concat!("authswap/", env!("CARGO_PKG_VERSION")),
        );
    if ews {
        req = req
            .header(http::header::CONTENT_TYPE, "text/xml; charset=utf-8")
            .header(
                "SOAPAction",
                "\"http://schemas.microsoft.com/exchange/services/2006/messages/GetFolder\"",
            );
    }
    if let Ok(v) = http::HeaderValue::from_str(mailbox) {
        req = req.header("X-AnchorMailbox", v);
    }
    let body: crate::tls::OutBody = Full::new(body)
        .map_err(|never| -> crate::tls::BoxError { match never {} })
        .boxed_unsync();
    let req = req
        .body(body)
        .map_err(|e| UpstreamLogin::unexpected(step, e.to_string().as_bytes()))?;
    let limit = cfg.upstream_timeout.min(HTTP_PROBE_TIMEOUT);
    let work = async {
        let res = app
            .client
            .request(req)
            .await
            .map_err(|e| UpstreamLogin::Connect {
                upstream: crate::config::redact_userinfo(base).into_owned(),
                source: std::io::Error::other(error_chain(&e)),
            })?;
        let (parts, body) = res.into_parts();
        let body = Limited::new(body, MAX_PROBE_BODY)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        Ok::<_, UpstreamLogin>((parts, body))
    };
    let (parts, body) = tokio::time::timeout(limit, work)
        .await
        .map_err(|_| UpstreamLogin::Timeout { step })??;
    let status = parts.status;
    if let Some(r) = refusal::http(status.as_u16(), |n| {
        parts.headers.get(n).map(|v| v.as_bytes())
    }) {
        // Name the EWS error of a 403 too (ErrorAccessDenied, ...).
        let r = match (r, response_code(&body)) {
            (refusal::Refusal::Permanent { text }, Some(code)) if !text.contains(&code) => {
                refusal::Refusal::permanent(&format!("{text} ({code})"))
            }
            (r, _) => r,
        };
        return Err(UpstreamLogin::Rejected(r));
    }
    let reason = status.canonical_reason().unwrap_or("");
    let code = response_code(&body);
    if status.is_success() {
        if !ews {
            return Ok(format!("HTTP {} {reason}", status.as_u16()));
        }
        if code.as_deref() == Some("NoError") {
            return Ok(format!("HTTP {} NoError", status.as_u16()));
        }
    }
    let mut said = format!("HTTP {} {reason}", status.as_u16());
    match code {
        Some(code) => {
            said.push_str(": ");
            said.push_str(&code);
        }
        None if ews && status.is_success() => said.push_str(": no EWS ResponseCode in the answer"),
        None => {}
    }
    Err(UpstreamLogin::Unexpected { step, said })
}

/// The first EWS `ResponseCode` (or SOAP `faultstring`) in a body.
fn response_code(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(&body[..body.len().min(64 * 1024)]);
    for tag in ["ResponseCode>", "faultstring>"] {
        if let Some(at) = text.find(tag) {
            let rest = &text[at + tag.len()..];
            let end = rest.find('<').unwrap_or(rest.len()).min(200);
            let code = rest[..end].trim();
            if !code.is_empty() {
                return Some(code.to_owned());
            }
        }
    }
    None
}

/// `text` on one line, printable, bounded.
fn one_line(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_ANSWER)
        .collect();
    if text.chars().count() > MAX_ANSWER {
        out.push('…');
    }
    out.trim().to_owned()
}

/// What a failed validation of `protocol` means, in plain words: the
/// table administrators read in `identity validate`, the API and the
/// console.
pub fn meaning(protocol: &str, e: &UseTokenError) -> String {
    let s = |t: &str| t.to_owned();
    let answer = e.answer();
    let upper = answer.to_ascii_uppercase();
    let has = |needle: &str| upper.contains(&needle.to_ascii_uppercase());
    match e {
        UseTokenError::Token(TokenError::ReauthRequired { .. }) => {
            if has("AADSTS700082") || has("AADSTS50173") || has("invalid_grant") {
                s("the refresh token no longer works (unused for 90 days, expired, revoked, or the password changed): the user must sign in again; send a re-authentication invitation")
            } else if has("AADSTS53003") || has("AADSTS50076") || has("AADSTS50079") || has("interaction_required") {
                s("a conditional access policy or MFA requirement needs the user to sign in again interactively: send a re-authentication invitation")
            } else if has("AADSTS65001") || has("consent") {
                s("the app lacks consent for the requested permissions: an administrator must grant consent, then the user signs in again")
            } else {
                s("the identity platform refused the refresh token: the user must sign in again; send a re-authentication invitation")
            }
        }
        UseTokenError::Token(TokenError::Unavailable { .. }) => s(
            "no access token could be obtained right now (identity platform unreachable, throttled or failing, or the store failed): try again later",
        ),
        UseTokenError::Token(TokenError::AppCredential { tenant, .. }) => format!(
            "the identity platform refuses the app credential of tenant {tenant} (secret expired or wrong, certificate not accepted): an administrator must renew it; nobody needs to sign in again"
        ),
        UseTokenError::Token(TokenError::Refused { .. }) => s(
            "the upstream kept refusing freshly issued tokens of this identity; authswap is backing off: check the mailbox's permissions and protocol settings",
        ),
        UseTokenError::Upstream(u) => match u {
            UpstreamLogin::Rejected(_) => rejected_meaning(protocol, &has),
            UpstreamLogin::Temporary(_) => s(
                "the upstream refused the login for now (throttling, too many connections or a service problem): try again later",
            ),
            UpstreamLogin::Connect { .. } | UpstreamLogin::Io(_) | UpstreamLogin::Closed => s(
                "network problem: the upstream could not be reached or dropped the connection (DNS, firewall, proxy, outage)",
            ),
            UpstreamLogin::Timeout { .. } => s(
                "network problem: the upstream did not answer in time (firewall, proxy, outage)",
            ),
            UpstreamLogin::Tls { .. } => s(
                "TLS problem: the upstream's certificate is not trusted or the handshake failed (check the upstream host name and [tls] extra_ca_file)",
            ),
            UpstreamLogin::NoTls(_) => s(
                "the upstream offers no TLS, so authswap will not send a token to it: check the upstream address and upstream_tls",
            ),
            UpstreamLogin::Unexpected { .. } => {
                if has("ErrorAccessDenied") {
                    s("EWS denies access to the mailbox: check that EWS is enabled for the organisation and the mailbox (EwsEnabled), that the app is allowed (EWSAllowedAppIds / EwsApplicationAccessPolicy) and that the mailbox's licence includes EWS")
                } else if has("ErrorServerBusy") || has("HTTP 503") || has("HTTP 429") {
                    s("the upstream is busy or throttling: try again later")
                } else if has("ErrorNonExistentMailbox") || has("ErrorMailboxMoveInProgress") {
                    s("the mailbox does not exist on this server or is being moved: check the identity's mailbox")
                } else if has("HTTP 404") {
                    s("the upstream has no such path: check [http] upstream and probe_path")
                } else {
                    s("the upstream gave an unexpected answer")
                }
            }
        },
    }
}

/// The meaning of an upstream's refusal of a token, by protocol.
fn rejected_meaning(protocol: &str, has: &dyn Fn(&str) -> bool) -> String {
    let s = |t: &str| t.to_owned();
    match protocol {
        "smtp" => {
            if has("5.7.139") {
                s("SMTP AUTH is disabled for the tenant or the mailbox: enable it (Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false, or Set-TransportConfig -SmtpClientAuthenticationDisabled $false for the tenant) or use another route")
            } else if has("5.7.30") {
                s("the server only offers basic authentication, which is retired: check smtp.upstream points at Exchange Online's OAuth-capable endpoint")
            } else if has("5.7.3") {
                s("the SMTP server refused the token (Authentication unsuccessful): the app may lack the SMTP.Send permission, the mailbox may not match the signed-in account, or the account is blocked; check consent and the mailbox, then sign in again")
            } else if has("5.7.8") || has("5.7.57") {
                s("the token was not accepted for this mailbox (invalid credentials / not authenticated to send): check the identity's mailbox matches the signed-in account and that SMTP.Send was consented")
            } else {
                s("the SMTP server refused the token: check the mailbox, the SMTP.Send permission and that SMTP AUTH is enabled")
            }
        }
        "imap" | "pop3" => {
            let (name, perm, flag) = if protocol == "imap" {
                ("IMAP", "IMAP.AccessAsUser.All", "ImapEnabled")
            } else {
                ("POP3", "POP.AccessAsUser.All", "PopEnabled")
            };
            if has("AUTHORIZATIONFAILED") || has("CONTACTADMIN") || has("NOPERM") || has("SYS/PERM")
            {
                format!("{name} access is not allowed for this mailbox: an administrator must enable it (Set-CASMailbox -Identity <mailbox> -{flag} $true)")
            } else {
                format!("{name} refused the login (AUTHENTICATE failed): {name} is disabled for the mailbox (Set-CASMailbox -{flag} $true) or the app lacks the {perm} permission; check consent and that the mailbox matches the signed-in account")
            }
        }
        _ => {
            if has("HTTP 403") || has("ErrorAccessDenied") {
                s("EWS access is blocked for the app or the mailbox: check EwsEnabled (organisation and mailbox), EWSAllowedAppIds / EwsApplicationAccessPolicy and that the mailbox's licence includes EWS")
            } else if has("invalid_token") || has("audience") || has("invalid_resource") {
                s("EWS refused the token (invalid_token): its audience or scope does not fit (http.scopes should be https://outlook.office365.com/EWS.AccessAsUser.All) or it was revoked; check the scopes and sign in again")
            } else {
                s("the HTTP upstream refused the token (401): check http.scopes and the app's permissions, then sign in again")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smtp_5_7_139_is_explained() {
        let e = UseTokenError::Upstream(UpstreamLogin::Rejected(refusal::smtp(
            535,
            "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.",
        )));
        assert!(e.answer().starts_with("535 5.7.139"));
        assert!(meaning("smtp", &e).contains("SMTP AUTH is disabled"));
    }

    #[test]
    fn response_codes_and_lines() {
        assert_eq!(
            response_code(b"<m:ResponseCode>NoError</m:ResponseCode>").as_deref(),
            Some("NoError")
        );
        assert_eq!(response_code(b"nothing"), None);
        assert_eq!(one_line("a\r\nb"), "a  b");
        assert!(one_line(&"x".repeat(1000)).chars().count() <= MAX_ANSWER + 1);
    }

    #[test]
    fn reauth_is_explained() {
        let e = UseTokenError::Token(TokenError::ReauthRequired {
            identity: "a".into(),
            message: "invalid_grant: AADSTS700082: The refresh token has expired".into(),
        });
        assert!(meaning("smtp", &e).contains("sign in again"));
    }
}
