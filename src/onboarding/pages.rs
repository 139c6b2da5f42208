//! The onboarding pages: minijinja templates compiled into the binary
//! (autoescaped HTML), and the plain-words explanations of what went wrong
//! with a sign-in, for the person and for their administrator.

use crate::token::PlatformDetails;
use minijinja::{context, Environment};
use serde::Serialize;
use std::time::{Duration, UNIX_EPOCH};

/// The compiled templates.
pub struct Pages {
    env: Environment<'static>,
    organization: String,
    root: String,
}

impl std::fmt::Debug for Pages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pages")
    }
}

/// A template failed to compile (a bug in the embedded templates).
#[derive(Debug, thiserror::Error)]
#[error("onboarding template: {0}")]
pub struct TemplateError(#[from] minijinja::Error);

/// How a message page looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tone {
    /// Success.
    Ok,
    /// Something failed.
    Error,
    /// Neutral information.
    Info,
}

/// The identity platform's codes, shown in a small block for the admin.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AdminDetails {
    /// OAuth `error`.
    pub error: Option<String>,
    /// AADSTS code.
    pub aadsts: Option<u32>,
    /// Correlation id.
    pub correlation_id: Option<String>,
    /// Trace id.
    pub trace_id: Option<String>,
    /// When it happened (UTC).
    pub time: String,
}

impl AdminDetails {
    /// From a platform answer, now.
    pub fn from_platform(d: &PlatformDetails) -> AdminDetails {
        AdminDetails {
            error: Some(d.error.clone()).filter(|e| !e.is_empty()),
            aadsts: d.aadsts,
            correlation_id: d.correlation_id.clone(),
            trace_id: d.trace_id.clone(),
            time: format_time(crate::store::now_unix()),
        }
    }
}

/// A message page: a badge, a title, sentences, and optionally the admin
/// block and a link back to the start page.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    /// Badge colour.
    pub tone: Tone,
    /// Badge text.
    pub badge: &'static str,
    /// Headline.
    pub title: String,
    /// Sentences, one paragraph each.
    pub lines: Vec<String>,
    /// Details for the administrator.
    pub admin: Option<AdminDetails>,
    /// Offer the code start page.
    pub start_again: bool,
}

impl Message {
    /// An error page.
    pub fn error(title: impl Into<String>, lines: &[&str]) -> Message {
        Message {
            tone: Tone::Error,
            badge: "Not connected",
            title: title.into(),
            lines: lines.iter().map(|s| (*s).to_owned()).collect(),
            admin: None,
            start_again: false,
        }
    }
}

/// The device-code page's state.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceView {
    /// `waiting`, `done` or `failed`.
    pub status: &'static str,
    /// Where to sign in.
    pub verification_uri: String,
    /// The code to type there.
    pub user_code: String,
    /// The invited mailbox.
    pub mailbox: String,
    /// When the code expires.
    pub expires: String,
    /// On failure: headline and sentences.
    pub title: String,
    /// On failure: what to do.
    pub lines: Vec<String>,
}

/// Unix seconds as `2026-12-09 14:05 UTC`.
pub fn format_time(unix: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap_or(0));
    let s = humantime::format_rfc3339_seconds(t).to_string();
    // 2026-12-09T14:05:00Z
    match (s.get(..10), s.get(11..16)) {
        (Some(day), Some(hm)) => format!("{day} {hm} UTC"),
        _ => s,
    }
}

/// Who an invitation says invited the person.
pub fn inviter(actor: &str) -> String {
    match actor {
        "" | "cli" | "admin" | "api" | "system" | "notifier" | "console" => {
            "Your administrator".to_owned()
        }
        other => other.chars().take(100).collect(),
    }
}

impl Pages {
    /// Compiles the embedded templates.
    pub fn new(organization: &str) -> Result<Pages, TemplateError> {
        let mut env = Environment::new();
        env.add_template(
            "base.html",
            include_str!("../../templates/onboarding/base.html"),
        )?;
        env.add_template(
            "start.html",
            include_str!("../../templates/onboarding/start.html"),
        )?;
        env.add_template(
            "invitation.html",
            include_str!("../../templates/onboarding/invitation.html"),
        )?;
        env.add_template(
            "message.html",
            include_str!("../../templates/onboarding/message.html"),
        )?;
        env.add_template(
            "device.html",
            include_str!("../../templates/onboarding/device.html"),
        )?;
        Ok(Pages {
            env,
            organization: organization.to_owned(),
            root: String::new(),
        })
    }

    /// Links on the pages start with `root` (the path of `public_url`).
    pub fn with_root(mut self, root: &str) -> Pages {
        self.root = root.to_owned();
        self
    }

    fn render(&self, name: &str, ctx: minijinja::Value) -> String {
        let ctx = context! { organization => &self.organization, root => &self.root, ..ctx };
        match self.env.get_template(name).and_then(|t| t.render(ctx)) {
            Ok(html) => html,
            Err(e) => {
                tracing::error!(template = name, error = %e, "cannot render onboarding page");
                "<!doctype html><title>Error</title><p>Something went wrong on this page. Try again later.</p>".to_owned()
            }
        }
    }

    /// The start page with the code form.
    pub fn start(&self, error: Option<&str>) -> String {
        self.render(
            "start.html",
            context! { title => "Link your mailbox", error => error },
        )
    }

    /// The invitation page. `action` is where its forms post (`""`: the
    /// same URL); `code` is sent back in a hidden field when the person
    /// typed it.
    pub fn invitation(
        &self,
        mailbox: &str,
        inviter: &str,
        expires_at: i64,
        action: &str,
        code: Option<&str>,
    ) -> String {
        self.render(
            "invitation.html",
            context! {
                title => "Connect your mailbox",
                mailbox => mailbox,
                inviter => inviter,
                expires => format_time(expires_at),
                action => action,
                code => code,
            },
        )
    }

    /// A message page.
    pub fn message(&self, m: &Message) -> String {
        self.render(
            "message.html",
            context! {
                title => &m.title,
                tone => m.tone,
                badge => m.badge,
                lines => &m.lines,
                admin => &m.admin,
                start_again => m.start_again,
            },
        )
    }

    /// The device-code page (refreshes itself while waiting).
    pub fn device(&self, v: &DeviceView) -> String {
        self.render(
            "device.html",
            context! {
                title => if v.status == "done" { "Connected" } else { "Sign in with a code" },
                status => v.status,
                refresh => v.status == "waiting",
                verification_uri => &v.verification_uri,
                user_code => &v.user_code,
                mailbox => &v.mailbox,
                expires => &v.expires,
                lines => &v.lines,
                fail_title => &v.title,
            },
        )
    }
}

/// Plain sentences for an error the identity platform reported (on the
/// redirect or from the token endpoint): a headline and what to do next.
pub fn explain(error: &str, aadsts: Option<u32>) -> (String, Vec<String>) {
    let again = "Open your invitation link again and sign in once more.";
    let admin = "If it happens again, send your administrator the details below.";
    let (title, lines): (&str, Vec<&str>) = match (error, aadsts) {
        (_, Some(65004)) | ("access_denied", None) => (
            "You cancelled the sign-in or declined the permissions",
            vec![
                "The mailbox was not connected because the sign-in was cancelled or the permissions were declined.",
                "To connect it, open your invitation link again, sign in and choose Accept when Microsoft asks for permission.",
            ],
        ),
        (_, Some(65001)) | ("consent_required", _) | (_, Some(90094)) | (_, Some(90095)) => (
            "Your organisation must approve this application first",
            vec![
                "Microsoft needs an administrator of your organisation to approve the permissions this application asks for before you can sign in.",
                "Ask your administrator to grant admin consent for the application, then open your invitation link again.",
            ],
        ),
        (_, Some(c)) if (53000..=53999).contains(&c) => (
            "Your organisation's access policy blocked this sign-in",
            vec![
                "A Conditional Access policy of your organisation did not allow this sign-in, for example because of the device, the network or the location you signed in from.",
                "Try again from a computer and network your organisation manages. If that is not possible, ask your administrator to allow this application.",
            ],
        ),
        (_, Some(50076)) | (_, Some(50079)) | (_, Some(50074)) | (_, Some(50072)) => (
            "Multi-factor authentication is required",
            vec![
                "Your organisation requires a second verification step (for example the Microsoft Authenticator app), and it was not completed.",
                "Open your invitation link again and complete the verification when Microsoft asks for it. If you have not set it up yet, do that first at https://aka.ms/mfasetup.",
            ],
        ),
        (_, Some(501481)) => (
            "The sign-in could not be verified",
            vec![
                "The sign-in did not match the one this page started, so it was not accepted. Nothing was changed.",
                again,
            ],
        ),
        (_, Some(700082)) | (_, Some(70008)) | (_, Some(54005)) | (_, Some(70000))
        | ("invalid_grant", _) => (
            "The sign-in expired or was already used",
            vec![
                "Microsoft did not accept this sign-in any more: it took too long, or the same sign-in was used twice.",
                again,
            ],
        ),
        (_, Some(50126)) | (_, Some(50034)) | (_, Some(50057)) | (_, Some(50053)) => (
            "Microsoft did not accept your account",
            vec![
                "The account is unknown, disabled, locked, or the password was wrong.",
                "Check the account with your administrator, then open your invitation link again.",
            ],
        ),
        (_, Some(7000215)) | (_, Some(7000222)) | (_, Some(700016)) | (_, Some(50011))
        | (_, Some(700054)) | ("invalid_client", _) | ("unauthorized_client", _)
        | ("invalid_request", _) | ("unsupported_response_type", _) | ("invalid_scope", _) => (
            "This sign-in is not set up correctly",
            vec![
                "The application you are signing in to is not configured correctly at Microsoft, so the sign-in cannot finish. This is not something you can fix.",
                "Tell your administrator and send them the details below.",
            ],
        ),
        ("temporarily_unavailable", _) | ("server_error", _) => (
            "Microsoft's sign-in service is busy",
            vec![
                "Microsoft's sign-in service could not answer right now.",
                "Wait a few minutes, then open your invitation link again.",
            ],
        ),
        ("interaction_required", _) | ("login_required", _) => (
            "Microsoft needs more from you to sign in",
            vec![
                "Microsoft asked for an extra step that could not be completed here.",
                again,
            ],
        ),
        _ => (
            "Microsoft could not complete the sign-in",
            vec!["The sign-in did not finish, so your mailbox was not connected.", again, admin],
        ),
    };
    (
        title.to_owned(),
        lines.into_iter().map(str::to_owned).collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_render_and_escape() {
        let p = Pages::new("Contoso <Ltd>").unwrap();
        let html = p.invitation("a<b>@contoso.com", "Your administrator", 0, "", None);
        assert!(html.contains("a&lt;b&gt;@contoso.com"));
        assert!(html.contains("Contoso &lt;Ltd&gt;"));
        assert!(html.contains("1970-01-01 00:00 UTC"));
        let mut m = Message::error("x", &["y"]);
        m.admin = Some(AdminDetails {
            correlation_id: Some("<script>".into()),
            ..Default::default()
        });
        assert!(p.message(&m).contains("&lt;script&gt;"));
        assert!(p.start(Some("bad")).contains("bad"));
    }

    #[test]
    fn explanations_are_plain_words() {
        assert!(explain("access_denied", Some(65004)).0.contains("declined"));
        assert!(explain("interaction_required", Some(53003))
            .0
            .contains("access policy"));
        assert!(explain("interaction_required", Some(50076))
            .0
            .contains("Multi-factor"));
        assert!(explain("invalid_grant", Some(54005))
            .0
            .contains("already used"));
        assert!(explain("consent_required", Some(65001))
            .0
            .contains("approve"));
        assert_eq!(inviter("cli"), "Your administrator");
    }
}
