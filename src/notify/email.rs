//! The e-mail channel: a plain-text message rendered from
//! `templates/notify/invitation.txt` (organisation, link, code, expiry,
//! reason), built with lettre and submitted through the SMTP upstream as
//! the `[notifications] email_sender` identity, with that identity's
//! XOAUTH2 token (the same login path and refusal policy as client
//! traffic).

use super::NotifyError;
use crate::app::App;
use crate::config::Config;
use crate::metrics::{NotifyChannel, NotifyResult, Protocol};
use crate::onboarding::IssuedInvitation;
use crate::proxy::mail::MailFrontEnd;
use crate::proxy::smtp::Smtp;
use crate::store::IdentityRecord;
use crate::validate::with_token;
use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use std::sync::Arc;
use std::time::Duration;

/// The e-mail template (plain text, not escaped).
const TEMPLATE: &str = include_str!("../../templates/notify/invitation.txt");

/// A rendered notification e-mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailText {
    /// Subject line.
    pub subject: String,
    /// Plain-text body (holds the link and code: never log it).
    pub body: String,
}

/// Renders the e-mail for `identity` carrying `invitation`; `reason` (plain
/// words) makes it a re-authentication request rather than a first
/// invitation.
pub fn render_email(
    config: &Config,
    identity: &IdentityRecord,
    invitation: &IssuedInvitation,
    reason: Option<&str>,
) -> Result<EmailText, NotifyError> {
    let org = config.onboarding.organization.trim();
    let expires = u64::try_from(invitation.record.expires_at)
        .map(|s| {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(s))
                .to_string()
                .replace('T', " ")
                .replace('Z', " UTC")
        })
        .unwrap_or_default();
    let mut env = minijinja::Environment::new();
    env.set_keep_trailing_newline(true);
    env.add_template("invitation.txt", TEMPLATE)
        .map_err(|e| NotifyError::Message(e.to_string()))?;
    let body = env
        .get_template("invitation.txt")
        .and_then(|t| {
            t.render(minijinja::context! {
                organization => org,
                identity => identity.name,
                mailbox => identity.mailbox,
                link => invitation.url.expose(),
                code => invitation.code.expose(),
                start_url => format!("{}/", config.onboarding.base_url()),
                expires_at => expires,
                reason => reason,
            })
        })
        // minijinja errors name the template and line, never the values.
        .map_err(|e| NotifyError::Message(e.to_string()))?;
    let subject = match reason {
        Some(_) => format!("Action needed: sign in again to keep your mail working ({org})"),
        None => format!("{org}: link your mailbox {}", identity.mailbox),
    };
    Ok(EmailText { subject, body })
}

/// Sends `invitation` by e-mail to `identity`'s mailbox (and `[notifications]
/// admin_email`), as the `email_sender` identity through the SMTP upstream.
/// One attempt, counted in `authswap_notifications_total{channel="email"}`;
/// the caller audits. For `authswap invite NAME --email`, the API and the
/// console.
pub async fn send_invitation_email(
    app: &Arc<App>,
    identity: &IdentityRecord,
    invitation: &IssuedInvitation,
) -> Result<(), NotifyError> {
    let result = send(app, identity, invitation, None).await;
    app.metrics.notification(
        NotifyChannel::email,
        if result.is_ok() {
            NotifyResult::sent
        } else {
            NotifyResult::failed
        },
    );
    result
}

/// One delivery attempt (not counted: the caller counts).
pub(super) async fn send(
    app: &Arc<App>,
    identity: &IdentityRecord,
    invitation: &IssuedInvitation,
    reason: Option<&str>,
) -> Result<(), NotifyError> {
    let n = &app.config.notifications;
    let text = render_email(&app.config, identity, invitation, reason)?;
    let sender_name = n
        .email_sender
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or(NotifyError::NoSender)?;
    let sender = match app.directory.get(sender_name) {
        Some(s) => s,
        None => {
            app.reload().await?;
            app.directory
                .get(sender_name)
                .ok_or_else(|| NotifyError::SenderNotFound(sender_name.to_owned()))?
        }
    };
    let bad = |what: &str, e: &dyn std::fmt::Display| NotifyError::Message(format!("{what}: {e}"));
    let from: lettre::Address = sender
        .mailbox
        .parse()
        .map_err(|e| bad("the sender's mailbox", &e))?;
    let to: lettre::Address = identity
        .mailbox
        .parse()
        .map_err(|e| bad("the identity's mailbox", &e))?;
    let org = app.config.onboarding.organization.trim().to_owned();
    let mut builder = lettre::Message::builder()
        .from(Mailbox::new(Some(org), from))
        .to(Mailbox::new(None, to))
        .subject(text.subject)
        .header(ContentType::TEXT_PLAIN);
    if let Some(admin) = n
        .admin_email
        .as_deref()
        .map(str::trim)
        .filter(|a| !a.is_empty())
    {
        let admin: lettre::Address = admin.parse().map_err(|e| bad("admin_email", &e))?;
        builder = builder.cc(Mailbox::new(None, admin));
    }
    let message = builder
        .body(text.body)
        .map_err(|e| bad("the message", &e))?;
    let recipients: Vec<String> = message
        .envelope()
        .to()
        .iter()
        .map(ToString::to_string)
        .collect();
    let bytes = Arc::new(message.formatted());
    let front = MailFrontEnd::new(
        app.clone(),
        app.config.smtp.clone(),
        Protocol::smtp,
        "smtp.upstream",
    )?;
    let scopes = front.scopes.clone();
    let smtp = Smtp::new(Arc::new(front));
    let recipients = Arc::new(recipients);
    with_token(app, &sender, scopes.of(&sender), Protocol::smtp, |token| {
        let (smtp, bytes, recipients) = (smtp.clone(), bytes.clone(), recipients.clone());
        let mailbox = sender.mailbox.clone();
        async move {
            smtp.send_message(&mailbox, token.secret(), &mailbox, &recipients, &bytes)
                .await
        }
    })
    .await?;
    tracing::info!(identity = %identity.name, sender = %sender.name, "invitation e-mail sent");
    Ok(())
}
