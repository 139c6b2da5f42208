//! Notifications: an identity that needs re-authentication (or whose
//! refresh token sits unused) gets one webhook POST and one e-mail per
//! interval, each carrying a working re-authentication link; a failing
//! webhook is retried with backoff; every attempt is audited (without
//! secrets) and counted.

mod support;

use authswap::config::{Config, UpstreamTls};
use authswap::onboarding::hash_secret;
use authswap::server::Server;
use authswap::store::{now_unix, InvitationState, Store};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::harness::{eventually, Env};
use support::mail::{FakeSmtp, SmtpOptions};

const SECRET: &str = "webhook-test-secret-1";
const EXPIRED: &str =
    "invalid_grant: AADSTS700082: The refresh token has expired due to inactivity";

/// One request the webhook receiver got.
#[derive(Clone, Debug)]
struct Hook {
    signature: Option<String>,
    body: Bytes,
}

/// An in-test webhook receiver on 127.0.0.1: records requests, answers
/// queued statuses (then 200).
#[derive(Clone, Default)]
struct Receiver {
    hooks: Arc<Mutex<Vec<Hook>>>,
    statuses: Arc<Mutex<VecDeque<u16>>>,
}

impl Receiver {
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let this = this.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let this = this.clone();
                        async move {
                            let signature = req
                                .headers()
                                .get("x-authswap-signature")
                                .map(|v| v.to_str().unwrap().to_owned());
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            this.hooks.lock().unwrap().push(Hook { signature, body });
                            let status = this.statuses.lock().unwrap().pop_front().unwrap_or(200);
                            Ok::<_, std::convert::Infallible>(
                                Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from_static(b"{}")))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        format!("http://{addr}/hook")
    }

    fn hooks(&self) -> Vec<Hook> {
        self.hooks.lock().unwrap().clone()
    }
}

/// The world: alice (who will need re-authentication), the sender
/// identity `mailer`, the SMTP double and the webhook receiver.
struct World {
    env: Env,
    smtp: FakeSmtp,
    hooks: Receiver,
    url: String,
}

async fn world() -> World {
    let env = Env::start().await;
    env.add_linked("alice", "alice@contoso.com", "alice-pw-123")
        .await;
    env.add_linked("mailer", "mailer@contoso.com", "mailer-pw-123")
        .await;
    let smtp = FakeSmtp::start(env.idp.validator(), SmtpOptions::default()).await;
    let hooks = Receiver::default();
    let url = hooks.start().await;
    World {
        env,
        smtp,
        hooks,
        url,
    }
}

impl World {
    async fn serve(&self, tweak: impl FnOnce(&mut Config)) -> Server {
        let (port, url) = (self.smtp.port(), self.url.clone());
        self.env
            .serve_with(move |c| {
                c.smtp.upstream = format!("localhost:{port}");
                c.smtp.upstream_tls = UpstreamTls::Starttls;
                c.smtp.upstream_timeout = Duration::from_secs(5);
                let n = &mut c.notifications;
                n.webhook_url = Some(url);
                n.webhook_secret = Some(authswap::secret::Secret::new(SECRET));
                n.email = true;
                n.email_sender = Some("mailer".into());
                n.admin_email = Some("admin@contoso.com".into());
                n.check_interval = Duration::from_millis(200);
                n.min_interval = Duration::from_secs(3600);
                n.retry_min = Duration::from_millis(100);
                n.retry_max = Duration::from_millis(400);
                n.max_attempts = 3;
                c.onboarding.organization = "Contoso Ltd".into();
                tweak(c);
            })
            .await
    }

    async fn alice_needs_reauth(&self) {
        let store = self.env.store().await;
        let id = store.get("alice").await.unwrap().unwrap().id;
        store
            .record_failure(id, true, EXPIRED, now_unix())
            .await
            .unwrap();
    }
}

/// Quoted-printable soft breaks and `=XX` escapes undone (lettre encodes
/// long lines that way).
fn unqp(text: &str) -> String {
    let joined = text.replace("=\r\n", "");
    let mut out = Vec::new();
    let b = joined.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'=' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&joined[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn counter(metrics: &str, series: &str) -> f64 {
    support::harness::sample(metrics, series).unwrap_or(0.0)
}

#[tokio::test]
async fn needs_reauth_sends_one_webhook_and_one_email_per_interval() {
    let w = world().await;
    w.alice_needs_reauth().await;
    let server = w.serve(|_| {}).await;

    assert!(eventually(Duration::from_secs(10), || !w.hooks.hooks().is_empty()).await);
    let messages = w.smtp.wait_for_messages(1).await;
    // Several more check intervals: nothing more.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let hooks = w.hooks.hooks();
    assert_eq!(hooks.len(), 1, "one webhook per interval");
    assert_eq!(w.smtp.message_count(), 1, "one e-mail per interval");

    // The webhook: signed, with the payload fields and a working link.
    let hook = &hooks[0];
    assert_eq!(
        hook.signature.as_deref(),
        Some(authswap::notify::sign(SECRET.as_bytes(), &hook.body).as_str())
    );
    let json: serde_json::Value = serde_json::from_slice(&hook.body).unwrap();
    assert_eq!(json["event"], "needs_reauth");
    assert_eq!(json["identity"], "alice");
    assert_eq!(json["mailbox"], "alice@contoso.com");
    assert_eq!(json["aadsts"], "AADSTS700082");
    assert!(
        json["reason"].as_str().unwrap().contains("expired"),
        "{json}"
    );
    assert!(
        json["expires_at"].as_str().unwrap().ends_with('Z'),
        "{json}"
    );
    let url = json["reauth_url"].as_str().unwrap();
    let code = json["code"].as_str().unwrap();
    let token = url.rsplit_once("/i/").unwrap().1;
    let store = w.env.store().await;
    let invitation = store
        .invitation_by_token(&hash_secret(token))
        .await
        .unwrap()
        .expect("the link is an invitation");
    assert_eq!(invitation.identity, "alice");
    assert_eq!(invitation.state, InvitationState::Pending);
    assert_eq!(invitation.actor, "notifier");

    // The e-mail: from the sender identity's mailbox over its XOAUTH2
    // login, to alice and the admin, with the same link and code.
    let m = &messages[0];
    assert_eq!(m.authenticated_as, "mailer@contoso.com");
    assert_eq!(m.mail_from, "mailer@contoso.com");
    assert_eq!(m.rcpt_to, ["alice@contoso.com", "admin@contoso.com"]);
    let text = unqp(&String::from_utf8_lossy(&m.message));
    assert!(text.contains(url), "{text}");
    assert!(text.contains(code), "{text}");
    assert!(text.contains("Contoso Ltd"), "{text}");
    assert!(text.contains("Subject: Action needed"), "{text}");

    // Audited and counted, with no secret in the audit log.
    let audit = store.audit_log(Some("alice"), None, 50).await.unwrap();
    for action in ["notification.webhook", "notification.email"] {
        let e = audit
            .iter()
            .find(|a| a.action == action)
            .unwrap_or_else(|| panic!("{action} audited: {audit:?}"));
        assert_eq!(e.outcome, "ok", "{e:?}");
        assert!(e.detail.as_deref().unwrap().contains("invitation sent"));
    }
    for e in &audit {
        let d = format!("{e:?}");
        assert!(
            !d.contains(token) && !d.contains(code) && !d.contains(SECRET),
            "{d}"
        );
    }
    let metrics = server.app().metrics.encode();
    assert_eq!(
        counter(
            &metrics,
            r#"authswap_notifications_total{channel="webhook",result="sent"}"#
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        counter(
            &metrics,
            r#"authswap_notifications_total{channel="email",result="sent"}"#
        ),
        1.0
    );
    server.shutdown(Duration::from_secs(5)).await;

    // A restart within the interval sends nothing again.
    let server = w.serve(|_| {}).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(w.hooks.hooks().len(), 1);
    assert_eq!(w.smtp.message_count(), 1);
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_failing_webhook_is_retried_with_backoff() {
    let w = world().await;
    w.alice_needs_reauth().await;
    w.hooks.statuses.lock().unwrap().push_back(500);
    let server = w
        .serve(|c| {
            c.notifications.email = false;
        })
        .await;
    assert!(eventually(Duration::from_secs(10), || w.hooks.hooks().len() >= 2).await);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let hooks = w.hooks.hooks();
    assert_eq!(hooks.len(), 2, "failed once, then sent");
    assert_eq!(
        hooks[0].body, hooks[1].body,
        "the same notification retried"
    );
    let metrics = server.app().metrics.encode();
    assert_eq!(
        counter(
            &metrics,
            r#"authswap_notifications_total{channel="webhook",result="failed"}"#
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        counter(
            &metrics,
            r#"authswap_notifications_total{channel="webhook",result="sent"}"#
        ),
        1.0
    );
    let store = w.env.store().await;
    let audit = store.audit_log(Some("alice"), None, 50).await.unwrap();
    let outcomes: Vec<&str> = audit
        .iter()
        .rev()
        .filter(|a| a.action == "notification.webhook")
        .map(|a| a.outcome.as_str())
        .collect();
    assert_eq!(outcomes, ["failed", "ok"]);
    let failed = audit.iter().find(|a| a.outcome == "failed").unwrap();
    assert!(
        failed.detail.as_deref().unwrap().contains("HTTP 500"),
        "{failed:?}"
    );
    assert_eq!(w.smtp.message_count(), 0, "e-mail off");
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn an_unused_refresh_token_gets_the_inactivity_warning() {
    let w = world().await;
    let store = w.env.store().await;
    let id = store.get("alice").await.unwrap().unwrap().id;
    store
        .record_success(id, now_unix() - 85 * 86_400)
        .await
        .unwrap();
    let server = w.serve(|_| {}).await;
    assert!(eventually(Duration::from_secs(10), || !w.hooks.hooks().is_empty()).await);
    w.smtp.wait_for_messages(1).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let hooks = w.hooks.hooks();
    assert_eq!(hooks.len(), 1, "only alice; mailer was used recently");
    let json: serde_json::Value = serde_json::from_slice(&hooks[0].body).unwrap();
    assert_eq!(json["event"], "inactive");
    assert_eq!(json["identity"], "alice");
    assert!(json["aadsts"].is_null());
    assert!(
        json["reason"].as_str().unwrap().contains("90 days"),
        "{json}"
    );
    assert_eq!(w.smtp.message_count(), 1);
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn invite_email_sends_the_invitation_through_the_smtp_upstream() {
    let w = world().await;
    let store = w.env.store().await;
    store
        .create(&authswap::store::NewIdentity::delegated(
            "bob",
            "bob@contoso.com",
            "",
        ))
        .await
        .expect("create bob");
    let config = w.env.write_config();
    let port = w.smtp.port().to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_authswap"))
            .arg("-c")
            .arg(&config)
            .args(["invite", "bob", "--email", "--json"])
            .env("AUTHSWAP_SMTP__UPSTREAM", format!("localhost:{port}"))
            .env("AUTHSWAP_SMTP__UPSTREAM_TLS", "starttls")
            .env("AUTHSWAP_NOTIFICATIONS__EMAIL", "true")
            .env("AUTHSWAP_NOTIFICATIONS__EMAIL_SENDER", "mailer")
            .env("AUTHSWAP_ONBOARDING__ORGANIZATION", "Contoso Ltd")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run authswap")
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("e-mailed to bob@contoso.com"), "{stderr}");
    let json: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    let messages = w.smtp.wait_for_messages(1).await;
    let m = &messages[0];
    assert_eq!(m.authenticated_as, "mailer@contoso.com");
    assert_eq!(m.rcpt_to, ["bob@contoso.com"]);
    let text = unqp(&String::from_utf8_lossy(&m.message));
    assert!(text.contains(json["url"].as_str().unwrap()), "{text}");
    assert!(text.contains(json["code"].as_str().unwrap()), "{text}");
    assert!(text.contains("Contoso Ltd"), "{text}");
    let audit = store.audit_log(Some("bob"), None, 10).await.unwrap();
    assert!(audit
        .iter()
        .any(|e| e.action == "notification.email" && e.outcome == "ok"));
}
