//! Notifications: a background task that finds identities needing a person
//! (status `needs_reauth`, or a refresh token unused for `[notifications]
//! inactivity_warning`, close to Microsoft's 90-day limit), claims the right
//! to notify (at most once per identity and kind per `min_interval`, kept in
//! the store so restarts and replicas respect it), issues a fresh
//! invitation and delivers it by webhook and/or e-mail, retrying each
//! channel with backoff. Every attempt is audited (without the link or
//! code) and counted in `authswap_notifications_total{channel,result}`.

mod email;
mod webhook;

pub use email::{render_email, send_invitation_email, EmailText};
pub use webhook::{payload, sign};

use crate::app::App;
use crate::metrics::{NotifyChannel, NotifyResult};
use crate::onboarding::{invite, InviteError, IssuedInvitation};
use crate::store::{now_unix, IdentityRecord, NewAudit, Status, StoreError};
use crate::validate::UseTokenError;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// What a notification is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The identity platform refused the refresh token.
    NeedsReauth,
    /// The refresh token has not been used for `inactivity_warning`.
    Inactive,
}

impl Kind {
    /// Name in the webhook payload and the store's notification state.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::NeedsReauth => "needs_reauth",
            Kind::Inactive => "inactive",
        }
    }
}

/// Why a notification could not be delivered.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The store failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// No invitation could be issued.
    #[error("{0}")]
    Invite(#[from] InviteError),
    /// `[notifications] email_sender` is not set.
    #[error(
        "notifications.email_sender is not set: e-mail needs an identity whose mailbox sends it"
    )]
    NoSender,
    /// The sender identity does not exist.
    #[error("the e-mail sender identity `{0}` does not exist")]
    SenderNotFound(String),
    /// The SMTP upstream is not usable.
    #[error("{0}")]
    Setup(#[from] crate::proxy::mail::MailSetupError),
    /// The message could not be built (bad address, template).
    #[error("cannot build the e-mail: {0}")]
    Message(String),
    /// The SMTP upstream or the token engine refused or failed.
    #[error("sending the e-mail: {0}")]
    Send(#[from] UseTokenError),
    /// The webhook could not be reached or did not answer in time.
    #[error("webhook: {0}")]
    Webhook(String),
    /// The webhook answered with a status other than 2xx.
    #[error("webhook answered HTTP {0}")]
    WebhookStatus(u16),
}

impl crate::error::Failure for NotifyError {
    fn origin(&self) -> crate::error::Origin {
        use crate::error::Origin;
        match self {
            NotifyError::Store(_) => Origin::Store,
            NotifyError::Invite(e) => e.origin(),
            NotifyError::NoSender
            | NotifyError::SenderNotFound(_)
            | NotifyError::Setup(_)
            | NotifyError::Message(_) => Origin::Internal,
            NotifyError::Send(_) | NotifyError::Webhook(_) | NotifyError::WebhookStatus(_) => {
                Origin::Upstream
            }
        }
    }

    fn retryable(&self) -> bool {
        match self {
            NotifyError::Store(e) => e.retryable(),
            NotifyError::Invite(e) => e.retryable(),
            NotifyError::NoSender
            | NotifyError::SenderNotFound(_)
            | NotifyError::Setup(_)
            | NotifyError::Message(_) => false,
            NotifyError::Send(_) | NotifyError::Webhook(_) | NotifyError::WebhookStatus(_) => true,
        }
    }
}

/// One notification to deliver.
#[derive(Debug, Clone)]
pub struct Notice {
    /// What it is about.
    pub kind: Kind,
    /// The identity.
    pub identity: IdentityRecord,
    /// The fresh invitation it carries.
    pub invitation: IssuedInvitation,
    /// Why, in plain words.
    pub reason: String,
    /// The `AADSTS` code of the identity's last error, if any.
    pub aadsts: Option<String>,
}

/// The `AADSTS` code in an identity-platform message (`AADSTS700082`).
pub fn aadsts_code(text: &str) -> Option<String> {
    let at = text.find("AADSTS")?;
    let digits: String = text[at + 6..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    (!digits.is_empty()).then(|| format!("AADSTS{digits}"))
}

/// Why an identity is notified, in plain words for the person and the
/// admin.
pub fn reason(kind: Kind, record: &IdentityRecord, inactivity: Duration) -> String {
    match kind {
        Kind::Inactive => format!(
            "the sign-in has not been used for more than {} days, and Microsoft cancels it after 90 days without use",
            inactivity.as_secs() / 86_400
        ),
        Kind::NeedsReauth => {
            let code = record.last_error.as_deref().and_then(aadsts_code);
            let why = match code.as_deref() {
                Some("AADSTS700082") | Some("AADSTS70008") => {
                    "the sign-in expired after a long time without use"
                }
                Some("AADSTS50173") | Some("AADSTS50133") => {
                    "the password was changed or the sign-in sessions were revoked"
                }
                Some("AADSTS700084") => "the sign-in reached its maximum lifetime",
                Some("AADSTS70043") | Some("AADSTS70044") => {
                    "the organisation's sign-in frequency policy requires a new sign-in"
                }
                Some("AADSTS50076") | Some("AADSTS50078") | Some("AADSTS50079") => {
                    "multi-factor authentication is now required"
                }
                Some("AADSTS53003") => "a conditional access policy requires a new sign-in",
                Some("AADSTS65001") => "the app needs consent again",
                _ => "Microsoft no longer accepts the stored sign-in",
            };
            format!("{why}; mail programs using this mailbox stop working until you sign in again")
        }
    }
}

/// The kind of notification `r` needs now, if any.
fn due(r: &IdentityRecord, now: i64, inactivity: Duration) -> Option<Kind> {
    if r.mailbox.trim().is_empty() {
        return None;
    }
    match r.status {
        Status::NeedsReauth => Some(Kind::NeedsReauth),
        Status::Linked if r.has_refresh_token => {
            let last = r.last_success_at.or(r.linked_at)?;
            let limit = i64::try_from(inactivity.as_secs()).unwrap_or(i64::MAX);
            (now.saturating_sub(last) >= limit).then_some(Kind::Inactive)
        }
        _ => None,
    }
}

/// Whether any channel is configured.
pub fn enabled(app: &App) -> bool {
    let n = &app.config.notifications;
    n.webhook_url.is_some() || n.email
}

/// Starts the notifier; it stops when `shutdown` fires (deliveries in
/// progress are dropped). Does nothing when no channel is configured.
pub fn spawn(app: Arc<App>, mut shutdown: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if !enabled(&app) {
            return;
        }
        let mut tick = tokio::time::interval(app.config.notifications.check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut deliveries = JoinSet::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => break,
            }
            while deliveries.try_join_next().is_some() {}
            if let Err(e) = check(&app, &mut deliveries).await {
                tracing::warn!(error = %e, "notifier: cannot check identities");
            }
        }
        deliveries.abort_all();
    })
}

/// One pass: claims and starts the notifications that are due.
async fn check(app: &Arc<App>, deliveries: &mut JoinSet<()>) -> Result<(), StoreError> {
    let n = &app.config.notifications;
    let now = now_unix();
    let interval = i64::try_from(n.min_interval.as_secs()).unwrap_or(i64::MAX);
    for r in app.store.list().await? {
        let Some(kind) = due(&r, now, n.inactivity_warning) else {
            continue;
        };
        if !app
            .store
            .claim_notification(r.id, kind.as_str(), now, interval)
            .await?
        {
            continue;
        }
        let invitation = match invite::issue(app.store.as_ref(), &app.config, &r, "notifier").await
        {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(identity = %r.name, error = %e, "notifier: cannot issue an invitation");
                continue;
            }
        };
        tracing::info!(identity = %r.name, kind = kind.as_str(), "notifying: a person must sign in again");
        let notice = Arc::new(Notice {
            kind,
            reason: reason(kind, &r, n.inactivity_warning),
            aadsts: r.last_error.as_deref().and_then(aadsts_code),
            identity: r,
            invitation,
        });
        if n.webhook_url.is_some() {
            let (app, notice) = (app.clone(), notice.clone());
            deliveries.spawn(async move { deliver(&app, &notice, NotifyChannel::webhook).await });
        }
        if n.email {
            let (app, notice) = (app.clone(), notice.clone());
            deliveries.spawn(async move { deliver(&app, &notice, NotifyChannel::email).await });
        }
    }
    Ok(())
}

/// Delivers `notice` on `channel`: up to `max_attempts` attempts,
/// `retry_min` apart at first, doubling up to `retry_max`; each attempt
/// audited and counted.
async fn deliver(app: &Arc<App>, notice: &Notice, channel: NotifyChannel) {
    let n = &app.config.notifications;
    let max = n.max_attempts.max(1);
    let mut delay = n.retry_min;
    let action = match channel {
        NotifyChannel::webhook => "notification.webhook",
        NotifyChannel::email => "notification.email",
    };
    for attempt in 1..=max {
        let result = match channel {
            NotifyChannel::webhook => webhook::send(app, notice).await,
            NotifyChannel::email => {
                email::send(
                    app,
                    &notice.identity,
                    &notice.invitation,
                    Some(&notice.reason),
                )
                .await
            }
        };
        let (outcome, detail, counted) = match &result {
            Ok(()) => (
                "ok",
                format!(
                    "{}: invitation sent (attempt {attempt})",
                    notice.kind.as_str()
                ),
                NotifyResult::sent,
            ),
            Err(e) => (
                "failed",
                format!(
                    "{}: attempt {attempt} of {max} failed: {}",
                    notice.kind.as_str(),
                    crate::token::idp::error_chain(e)
                ),
                NotifyResult::failed,
            ),
        };
        app.metrics.notification(channel, counted);
        if let Err(e) = app
            .store
            .audit(&NewAudit {
                actor: "notifier",
                action,
                identity: Some(&notice.identity.name),
                outcome,
                detail: Some(&detail),
            })
            .await
        {
            tracing::warn!(error = %e, "notifier: cannot write the audit log");
        }
        match result {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(identity = %notice.identity.name, channel = ?channel, attempt, error = %crate::token::idp::error_chain(&e), "notification not delivered");
                use crate::error::Failure as _;
                if !e.retryable() || attempt == max {
                    return;
                }
            }
        }
        tokio::time::sleep(delay).await;
        delay = delay.saturating_mul(2).min(n.retry_max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(status: Status, last_success_at: Option<i64>) -> IdentityRecord {
        IdentityRecord {
            id: 1,
            name: "a".into(),
            mailbox: "a@contoso.com".into(),
            password_hash: String::new(),
            status,
            last_error: Some("invalid_grant: AADSTS700082: The refresh token has expired".into()),
            last_success_at,
            last_failure_at: None,
            created_at: 0,
            has_refresh_token: true,
            token_generation: 1,
            account: None,
            linked_at: Some(0),
            tenant: "default".into(),
            mode: Default::default(),
            tenant_block: None,
        }
    }

    #[test]
    fn what_is_due() {
        let day = 86_400;
        let warn = Duration::from_secs(80 * day as u64);
        let now = 100 * day;
        assert_eq!(
            due(&record(Status::NeedsReauth, None), now, warn),
            Some(Kind::NeedsReauth)
        );
        assert_eq!(
            due(&record(Status::Linked, Some(now - 81 * day)), now, warn),
            Some(Kind::Inactive)
        );
        assert_eq!(
            due(&record(Status::Linked, Some(now - day)), now, warn),
            None
        );
        assert_eq!(due(&record(Status::Pending, None), now, warn), None);
    }

    #[test]
    fn aadsts_codes_and_reasons() {
        assert_eq!(
            aadsts_code("x AADSTS700082: expired").as_deref(),
            Some("AADSTS700082")
        );
        assert_eq!(aadsts_code("AADSTS: none"), None);
        let r = reason(
            Kind::NeedsReauth,
            &record(Status::NeedsReauth, None),
            Duration::ZERO,
        );
        assert!(r.contains("expired"), "{r}");
    }
}
