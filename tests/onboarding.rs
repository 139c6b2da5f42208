//! Browser sign-in on the onboarding listener, end to end against the
//! identity-platform double: invitation page → authorize (PKCE S256) →
//! callback → linked, served at once by the running EWS and SMTP front
//! ends; the code start page; and every refusal (expired, revoked and used
//! invitations, unknown or foreign state, wrong verifier, wrong account,
//! error redirects), with a real HTTP client that keeps cookies and follows
//! redirects. Log output is captured to check that no secret reaches it.

mod support;

use authswap::identity::hash_password;
use authswap::onboarding::invite::{hash_secret, issue, IssuedInvitation};
use authswap::server::Server;
use authswap::store::{InvitationState, NewInvitation, Status, Store};
use std::io::Write;
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use support::harness::{sample, Env, HttpClient, SOAP};
use support::SignedInAccount;

const GRACE: Duration = Duration::from_secs(5);

// ---- captured logs ----------------------------------------------------------

#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every log line of this test binary (all tests share it).
fn logs() -> &'static LogBuf {
    static LOGS: OnceLock<LogBuf> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = LogBuf::default();
        let writer = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("authswap=debug")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init();
        buf
    })
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

// ---- helpers ------------------------------------------------------------------

/// A browser: cookies kept, redirects followed (onboarding ↔ double).
fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::limited(10))
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// A browser that does not follow redirects (to step through by hand).
fn stepping_browser() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

fn base(server: &Server) -> String {
    format!(
        "http://{}",
        server.onboarding_addr().expect("onboarding on")
    )
}

/// Creates a pending identity and invites it (as the CLI would).
async fn invite(server: &Server, name: &str, mailbox: &str, password: &str) -> IssuedInvitation {
    let app = server.app();
    let hash = hash_password(password, &app.config.auth).unwrap();
    let rec = match app.store.get(name).await.unwrap() {
        Some(r) => r,
        None => app
            .store
            .create(&authswap::store::NewIdentity::delegated(
                name, mailbox, &hash,
            ))
            .await
            .unwrap(),
    };
    issue(app.store.as_ref(), &app.config, &rec, "cli")
        .await
        .unwrap()
}

fn token_of(inv: &IssuedInvitation) -> String {
    inv.url.expose().rsplit('/').next().unwrap().to_owned()
}

/// Status and body, with the HTML escapes of the templates undone so that
/// assertions read like the rendered text.
async fn page(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    (status, unescape(&r.text().await.unwrap()))
}

fn unescape(html: &str) -> String {
    html.replace("&#x2f;", "/")
        .replace("&#x27;", "'")
        .replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// Opens the invitation link and presses "Sign in with Microsoft".
async fn sign_in(b: &reqwest::Client, inv: &IssuedInvitation) -> (u16, String) {
    let r = b
        .post(inv.url.expose())
        .form(&[("action", "signin")])
        .send()
        .await
        .unwrap();
    page(r).await
}

async fn status_of(server: &Server, name: &str) -> Status {
    server.app().store.get(name).await.unwrap().unwrap().status
}

async fn invitation_state(server: &Server, inv: &IssuedInvitation) -> InvitationState {
    server
        .app()
        .store
        .invitation(inv.record.id)
        .await
        .unwrap()
        .unwrap()
        .state
}

fn assert_no_secrets(texts: &[&str], secrets: &[&str]) {
    for t in texts {
        for s in secrets {
            assert!(!s.is_empty());
            assert!(!t.contains(s), "a secret leaked: {s}");
        }
    }
}

// ---- tests ----------------------------------------------------------------------

#[tokio::test]
async fn browser_signin_links_and_is_served_by_ews_and_smtp_without_restart() {
    use lettre::transport::smtp::authentication::Mechanism;
    use lettre::AsyncTransport;
    logs();
    let m = support::mailrig::start_with(
        Default::default(),
        Default::default(),
        Default::default(),
        |c| c.onboarding.organization = "Contoso Ltd".into(),
    )
    .await;
    let server = &m.server;
    let inv = invite(server, "bob", "bob@contoso.com", "bob-pw-123").await;
    assert!(inv
        .url
        .expose()
        .starts_with(&format!("{}/i/", base(server))));
    let token = token_of(&inv);
    let b = browser();

    // The invitation page.
    let r = b.get(inv.url.expose()).send().await.unwrap();
    let headers = r.headers().clone();
    let (status, html) = page(r).await;
    assert_eq!(status, 200);
    for want in [
        "bob@contoso.com",
        "Contoso Ltd",
        "Your administrator",
        "Valid until",
        "Sign in with Microsoft",
        "Use a code instead",
    ] {
        assert!(html.contains(want), "{want} missing: {html}");
    }
    let expiry = authswap::onboarding::pages::format_time(inv.record.expires_at);
    assert!(html.contains(&expiry), "{expiry}");
    assert!(
        !html.contains(&token),
        "the link token is not repeated in the page"
    );
    assert_eq!(headers["referrer-policy"], "no-referrer");
    assert_eq!(headers["x-frame-options"], "DENY");
    assert!(headers["cache-control"]
        .to_str()
        .unwrap()
        .contains("no-store"));
    assert!(headers["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("frame-ancestors 'none'"));

    // Sign in: onboarding → authorize → callback → done.
    let (status, html) = sign_in(&b, &inv).await;
    assert_eq!(status, 200, "{html}");
    assert!(
        html.contains("You are done, you can close this page"),
        "{html}"
    );

    // What the authorization request carried.
    let auth = m.env.idp.authorize_requests();
    assert_eq!(auth.len(), 1);
    let q = |k: &str| auth[0].form_value(k).unwrap_or("").to_owned();
    assert_eq!(q("code_challenge_method"), "S256");
    assert_eq!(q("response_type"), "code");
    assert_eq!(q("login_hint"), "bob@contoso.com");
    assert_eq!(q("prompt"), "select_account");
    assert_eq!(q("response_mode"), "query");
    assert_eq!(q("redirect_uri"), format!("{}/callback", base(server)));
    assert!(q("nonce").len() >= 32 && q("state").len() >= 32);
    let scope = q("scope");
    for s in [
        "openid",
        "profile",
        "offline_access",
        "EWS.AccessAsUser.All",
        "SMTP.Send",
    ] {
        assert!(scope.contains(s), "{s} not in {scope}");
    }
    let redeemed = m.env.idp.code_redemptions();
    assert_eq!(redeemed.len(), 1);
    assert!(redeemed[0].form_value("code_verifier").unwrap().len() >= 43);
    assert_eq!(redeemed[0].status, 200);

    // Linked, with the account, durably.
    let rec = server.app().store.get("bob").await.unwrap().unwrap();
    assert_eq!(rec.status, Status::Linked);
    assert!(rec.has_refresh_token);
    let account = rec.account.expect("account recorded");
    assert_eq!(account.upn, "bob@contoso.com");
    assert_eq!(account.tid, support::idp::DEFAULT_TID);
    assert_eq!(
        invitation_state(server, &inv).await,
        InvitationState::Completed
    );

    // Served at once by the running front ends.
    let r = HttpClient::default()
        .ews(server.http_addr().unwrap(), "bob", "bob-pw-123", SOAP)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mailer = lettre_mailer_for(server, "bob", "bob-pw-123", Mechanism::Plain);
    mailer
        .send(support::mailrig::message("hello from bob"))
        .await
        .expect("SMTP login and send as bob");
    let msgs = m.smtp.wait_for_messages(1).await;
    assert_eq!(msgs[0].authenticated_as.to_lowercase(), "bob@contoso.com");

    // The link works once.
    let (status, html) = page(b.get(inv.url.expose()).send().await.unwrap()).await;
    assert_eq!(status, 410);
    assert!(html.contains("already used"), "{html}");

    let metrics = HttpClient::default()
        .get(server.admin_addr(), "/metrics")
        .await
        .text();
    assert_eq!(
        sample(
            &metrics,
            "authswap_onboarding_signins_total{result=\"linked\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    let audit = server
        .app()
        .store
        .audit_log(Some("bob"), None, 20)
        .await
        .unwrap();
    assert!(
        audit.iter().any(|a| a.action == "identity.linked"),
        "{audit:?}"
    );

    // No secret in the logs, the pages or the audit log.
    let refresh: Vec<String> = m.env.idp.issued_refresh_tokens();
    let logs = log_text();
    assert!(
        logs.contains("identity linked by its user"),
        "logs are captured"
    );
    let audit_text = format!("{audit:?}");
    let code = redeemed[0].form_value("code").unwrap().to_owned();
    let verifier = redeemed[0].form_value("code_verifier").unwrap().to_owned();
    let state = q("state");
    let mut secrets = vec![
        token.as_str(),
        code.as_str(),
        verifier.as_str(),
        state.as_str(),
    ];
    secrets.extend(refresh.iter().map(String::as_str));
    assert_no_secrets(&[&logs, &html, &audit_text], &secrets);
    m.server.shutdown(GRACE).await;
}

fn lettre_mailer_for(
    server: &Server,
    user: &str,
    pw: &str,
    mech: lettre::transport::smtp::authentication::Mechanism,
) -> lettre::AsyncSmtpTransport<lettre::Tokio1Executor> {
    support::mailrig::lettre_mailer(server.smtp_addr().unwrap(), user, pw, mech)
}

#[tokio::test]
async fn code_start_page_expired_revoked_unknown_and_throttled() {
    logs();
    let env = Env::start().await;
    let server = env.serve().await;
    let b = browser();
    let start = base(&server);

    // The start page.
    let (status, html) = page(b.get(format!("{start}/")).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert!(html.contains("Invitation code"), "{html}");

    // A typed code (lower case, no dash) finds the invitation, then signs in.
    let inv = invite(&server, "carol", "carol@contoso.com", "carol-pw-1").await;
    let typed = inv.code.expose().replace('-', "").to_lowercase();
    let (status, html) = page(
        b.post(format!("{start}/"))
            .form(&[("code", typed.as_str())])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{html}");
    assert!(html.contains("carol@contoso.com") && html.contains("Sign in with Microsoft"));
    let (status, html) = page(
        b.post(format!("{start}/"))
            .form(&[("code", typed.as_str()), ("action", "signin")])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{html}");
    assert!(html.contains("You are done"), "{html}");
    assert_eq!(status_of(&server, "carol").await, Status::Linked);
    // Used: the code now says so.
    let (status, html) = page(
        b.post(format!("{start}/"))
            .form(&[("code", inv.code.expose())])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 410);
    assert!(html.contains("already used"), "{html}");

    // Revoked: re-inviting withdraws the older link.
    let first = invite(&server, "dave", "dave@contoso.com", "dave-pw-1").await;
    let second = invite(&server, "dave", "dave@contoso.com", "dave-pw-1").await;
    let (status, html) = page(b.get(first.url.expose()).send().await.unwrap()).await;
    assert_eq!(status, 410);
    assert!(html.contains("withdrew"), "{html}");
    let (status, html) = sign_in(&b, &first).await;
    assert_eq!(status, 410, "{html}");
    assert_eq!(status_of(&server, "dave").await, Status::Pending);
    assert_eq!(m_state(&server, &second).await, InvitationState::Pending);

    // Expired.
    let store = server.app().store.clone();
    let erin = store
        .create(&authswap::store::NewIdentity::delegated(
            "erin",
            "erin@contoso.com",
            "$unused",
        ))
        .await
        .unwrap();
    let now = authswap::store::now_unix();
    store
        .create_invitation(&NewInvitation {
            identity_id: erin.id,
            token_hash: hash_secret("expired-link-token-0123456789"),
            code_hash: hash_secret("EXPIREDCOD"),
            created_at: now - 100,
            expires_at: now - 1,
            actor: "cli".into(),
        })
        .await
        .unwrap();
    let (status, html) = page(
        b.get(format!("{start}/i/expired-link-token-0123456789"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 410);
    assert!(
        html.contains("expired") && html.contains("new invitation"),
        "{html}"
    );
    assert_eq!(env.idp.authorize_requests().len(), 1, "only carol's");

    // Unknown link, unknown route.
    let (status, html) = page(b.get(format!("{start}/i/nope")).send().await.unwrap()).await;
    assert_eq!(status, 404);
    assert!(html.contains("not valid"), "{html}");
    let (status, _) = page(b.get(format!("{start}/metrics")).send().await.unwrap()).await;
    assert_eq!(status, 404, "only onboarding pages here");
    let (status, _) = page(
        b.get(format!("{start}/api/v1/identities"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404);

    // Guessing codes is throttled per source.
    for _ in 0..authswap::onboarding::server::CODE_ATTEMPTS {
        let (status, html) = page(
            b.post(format!("{start}/"))
                .form(&[("code", "ZZZZZ-ZZZZZ")])
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 400);
        assert!(html.contains("does not match"), "{html}");
    }
    let (status, html) = page(
        b.post(format!("{start}/"))
            .form(&[("code", second.code.expose())])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 429, "even a right code waits: {html}");
    assert!(html.contains("Too many"));
    let metrics = HttpClient::default()
        .get(server.admin_addr(), "/metrics")
        .await
        .text();
    assert_eq!(
        sample(
            &metrics,
            "authswap_onboarding_signins_total{result=\"bad_code\"}"
        ),
        Some(authswap::onboarding::server::CODE_ATTEMPTS as f64)
    );
    assert!(sample(
        &metrics,
        "authswap_onboarding_signins_total{result=\"throttled\"}"
    )
    .is_some());
    assert!(
        sample(
            &metrics,
            "authswap_onboarding_signins_total{result=\"expired_invitation\"}"
        )
        .unwrap_or(0.0)
            >= 3.0
    );

    let logs = log_text();
    assert_no_secrets(
        &[&logs],
        &[
            &token_of(&inv),
            &token_of(&second),
            inv.code.expose(),
            second.code.expose(),
            &typed.to_uppercase(),
        ],
    );
    server.shutdown(GRACE).await;
}

async fn m_state(server: &Server, inv: &IssuedInvitation) -> InvitationState {
    invitation_state(server, inv).await
}

#[tokio::test]
async fn callback_refuses_bad_state_verifier_account_and_error_redirects() {
    logs();
    let env = Env::start().await;
    let server = env.serve().await;
    let start = base(&server);
    let inv = invite(&server, "frank", "frank@contoso.com", "frank-pw-1").await;

    // Unknown state.
    let b = browser();
    let (status, html) = page(
        b.get(format!("{start}/callback?code=abc&state=not-a-state"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    assert!(html.contains("already used or has expired"), "{html}");
    assert!(html.contains("Start again from your invitation"));

    // Consent refused: an error redirect in plain words, codes for the admin.
    env.idp.fail_next_authorize(
        "access_denied",
        65004,
        "User declined to consent to access the app.",
    );
    let (status, html) = sign_in(&b, &inv).await;
    assert_eq!(status, 400);
    assert!(html.contains("declined the permissions"), "{html}");
    assert!(html.contains("AADSTS65004"), "{html}");
    assert!(html.contains("Correlation ID"), "{html}");
    assert!(
        !html.contains("User declined to consent"),
        "no raw description"
    );
    assert_eq!(status_of(&server, "frank").await, Status::Pending);
    assert_eq!(
        invitation_state(&server, &inv).await,
        InvitationState::Pending
    );

    // Conditional access.
    env.idp.fail_next_authorize(
        "access_denied",
        53003,
        "Access has been blocked by Conditional Access policies.",
    );
    let (_, html) = sign_in(&b, &inv).await;
    assert!(
        html.contains("access policy") && html.contains("AADSTS53003"),
        "{html}"
    );

    // A verifier that does not match the challenge (AADSTS501481).
    env.idp.tamper_next_challenge();
    let (status, html) = sign_in(&b, &inv).await;
    assert_eq!(status, 400, "{html}");
    assert!(html.contains("could not be verified"), "{html}");
    assert!(html.contains("AADSTS501481"), "{html}");
    assert_eq!(status_of(&server, "frank").await, Status::Pending);
    let last = env.idp.code_redemptions().pop().unwrap();
    assert_eq!(last.status, 400);

    // Another account than the invited mailbox.
    env.idp
        .set_signin_account(Some(SignedInAccount::new("mallory@contoso.com")));
    let (status, html) = sign_in(&b, &inv).await;
    assert_eq!(status, 403, "{html}");
    assert!(
        html.contains("You signed in as mallory@contoso.com"),
        "{html}"
    );
    assert!(
        html.contains("this invitation is for frank@contoso.com"),
        "{html}"
    );
    assert_eq!(status_of(&server, "frank").await, Status::Pending);
    assert!(
        !server
            .app()
            .store
            .get("frank")
            .await
            .unwrap()
            .unwrap()
            .has_refresh_token
    );
    assert_eq!(
        invitation_state(&server, &inv).await,
        InvitationState::Pending
    );
    let audit = server
        .app()
        .store
        .audit_log(Some("frank"), None, 20)
        .await
        .unwrap();
    assert!(
        audit.iter().any(|a| a.action == "signin.wrong_account"),
        "{audit:?}"
    );
    env.idp.set_signin_account(None);

    // No refresh token (offline_access not granted): nothing stored.
    env.idp.omit_next_refresh_token();
    let (status, html) = sign_in(&b, &inv).await;
    assert_eq!(status, 502, "{html}");
    assert!(html.contains("did not allow lasting access"), "{html}");
    assert!(html.contains("offline_access"), "{html}");
    assert_eq!(status_of(&server, "frank").await, Status::Pending);
    assert_eq!(
        invitation_state(&server, &inv).await,
        InvitationState::Pending
    );

    // Step by hand: the state works once, and only in the browser that
    // started the sign-in.
    let b = stepping_browser();
    let r = b
        .post(inv.url.expose())
        .form(&[("action", "signin")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    let authorize = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(authorize.starts_with(&env.idp.authorize_endpoint(support::harness::TENANT)));
    let r = b.get(&authorize).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 302);
    let callback = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        callback.starts_with(&format!("{start}/callback?")),
        "{callback}"
    );
    // Another browser (no cookie) is refused and does not burn the state.
    let (status, html) = page(browser().get(&callback).send().await.unwrap()).await;
    assert_eq!(status, 400);
    assert!(html.contains("already used or has expired"), "{html}");
    let (status, html) = page(b.get(&callback).send().await.unwrap()).await;
    assert_eq!(status, 200, "{html}");
    assert!(html.contains("You are done"), "{html}");
    assert_eq!(status_of(&server, "frank").await, Status::Linked);
    // Replayed callback: refused.
    let (status, html) = page(b.get(&callback).send().await.unwrap()).await;
    assert_eq!(status, 400);
    assert!(html.contains("already used or has expired"), "{html}");

    let metrics = HttpClient::default()
        .get(server.admin_addr(), "/metrics")
        .await
        .text();
    for (result, n) in [
        ("invalid_state", 3.0),
        ("idp_error", 4.0),
        ("wrong_account", 1.0),
        ("linked", 1.0),
    ] {
        assert_eq!(
            sample(
                &metrics,
                &format!("authswap_onboarding_signins_total{{result=\"{result}\"}}")
            ),
            Some(n),
            "{result}: {metrics}"
        );
    }
    assert_no_secrets(&[&log_text()], &[&token_of(&inv)]);
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn device_code_fallback_links_from_the_onboarding_page() {
    logs();
    let env = Env::start().await;
    let server = env.serve().await;
    let inv = invite(&server, "gina", "gina@contoso.com", "gina-pw-1").await;
    let b = browser();
    let r = b
        .post(inv.url.expose())
        .form(&[("action", "device")])
        .send()
        .await
        .unwrap();
    let page_url = r.url().to_string();
    let (status, html) = page(r).await;
    assert_eq!(status, 200, "{html}");
    assert!(page_url.contains("/device/"), "{page_url}");
    let user_code = env.idp.wait_for_device_code().await;
    assert!(html.contains(&user_code), "{html}");
    assert!(html.contains("https://microsoft.com/devicelogin"));
    assert!(html.contains(r#"http-equiv="refresh""#));
    let asked = env.idp.requests();
    let dc = asked
        .iter()
        .find(|r| r.path.ends_with("/devicecode"))
        .unwrap();
    assert!(dc.scope.as_deref().unwrap().contains("openid"));
    assert!(env.idp.approve_device(&user_code, "gina@contoso.com"));
    let mut done = String::new();
    for _ in 0..100 {
        done = page(b.get(&page_url).send().await.unwrap()).await.1;
        if !done.contains("Waiting for you") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(done.contains("You are done"), "{done}");
    assert_eq!(status_of(&server, "gina").await, Status::Linked);
    assert_eq!(
        invitation_state(&server, &inv).await,
        InvitationState::Completed
    );
    let r = HttpClient::default()
        .ews(server.http_addr().unwrap(), "gina", "gina-pw-1", SOAP)
        .await;
    assert_eq!(r.status, 200);
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn identity_login_refuses_another_account() {
    let env = Env::start().await;
    let out = env.cli(
        &[
            "identity",
            "add",
            "henry",
            "--mailbox",
            "henry@contoso.com",
            "--password-stdin",
        ],
        Some("henry-pw-1\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = env.write_config();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_authswap"))
        .arg("-c")
        .arg(&config)
        .args(["identity", "login", "henry"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let code = env.idp.wait_for_device_code().await;
    assert!(env.idp.approve_device(&code, "mallory@contoso.com"));
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mallory@contoso.com") && err.contains("henry@contoso.com"),
        "{err}"
    );
    let asked = env.idp.requests();
    assert!(asked
        .iter()
        .filter(|r| r.path.ends_with("/devicecode"))
        .all(|r| r.scope.as_deref().unwrap_or("").contains("openid")));
    let store = env.store().await;
    let rec = store.get("henry").await.unwrap().unwrap();
    assert_eq!(rec.status, Status::Pending);
    assert!(!rec.has_refresh_token);
}

#[tokio::test]
async fn a_public_url_with_a_path_prefix_is_honoured() {
    logs();
    let env = Env::start().await;
    // A proxy that keeps the prefix: links, forms, the redirect URI and
    // the state cookie all carry it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = env
        .serve_with(move |c| {
            c.onboarding.listen = format!("127.0.0.1:{port}");
            c.onboarding.public_url = Some(format!("http://127.0.0.1:{port}/authswap/"));
        })
        .await;
    let inv = invite(&server, "ivan", "ivan@contoso.com", "ivan-pw-1").await;
    let prefix = format!("http://127.0.0.1:{port}/authswap");
    assert!(inv.url.expose().starts_with(&format!("{prefix}/i/")));
    let b = browser();
    let (status, html) = page(b.get(format!("{prefix}/")).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert!(html.contains(r#"action="/authswap/""#), "{html}");
    let (status, html) = sign_in(&b, &inv).await;
    assert_eq!(status, 200, "{html}");
    assert!(html.contains("You are done"), "{html}");
    let auth = env.idp.authorize_requests();
    assert_eq!(
        auth[0].form_value("redirect_uri"),
        Some(format!("{prefix}/callback").as_str())
    );
    assert_eq!(status_of(&server, "ivan").await, Status::Linked);
    server.shutdown(GRACE).await;
}

/// Renders the invitation page with headless Chromium into
/// `$ONBOARDING_SCREENSHOT` (default `target/onboarding.png`); the copy in
/// `docs/` comes from here. Ignored by default: it needs `chromium`.
#[tokio::test]
#[ignore = "needs chromium; run with --ignored"]
async fn screenshot_of_the_invitation_page() {
    let env = Env::start().await;
    let server = env
        .serve_with(|c| c.onboarding.organization = "Contoso Ltd".into())
        .await;
    let inv = invite(&server, "bob", "bob.wilson@contoso.com", "bob-pw-123").await;
    let out = std::env::var("ONBOARDING_SCREENSHOT").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/onboarding.png").to_owned()
    });
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    let profile = env.dir.path().join("chromium");
    let status = tokio::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1100,800",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={out}"))
        .arg(inv.url.expose())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .status();
    let status = tokio::time::timeout(Duration::from_secs(60), status)
        .await
        .expect("chromium finished")
        .expect("chromium runs");
    assert!(status.success());
    assert!(std::fs::metadata(&out).unwrap().len() > 10_000);
    server.shutdown(GRACE).await;
}

/// Polls a device-code status page until it stops waiting.
async fn device_outcome(b: &reqwest::Client, page_url: &str) -> String {
    let mut html = String::new();
    for _ in 0..100 {
        html = page(b.get(page_url).send().await.unwrap()).await.1;
        if !html.contains("Waiting for you") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    html
}

#[tokio::test]
async fn device_code_fallback_refuses_another_account_a_decline_and_an_expiry() {
    logs();
    let env = Env::start().await;
    let server = env.serve().await;
    for (name, how) in [("hal", "wrong"), ("ivy", "decline"), ("jon", "expire")] {
        let mailbox = format!("{name}@contoso.com");
        let inv = invite(&server, name, &mailbox, "pw-device-123").await;
        let b = browser();
        let r = b
            .post(inv.url.expose())
            .form(&[("action", "device")])
            .send()
            .await
            .unwrap();
        let page_url = r.url().to_string();
        assert!(page_url.contains("/device/"), "{page_url}");
        let user_code = env.idp.wait_for_device_code().await;
        let acted = match how {
            "wrong" => env.idp.approve_device(&user_code, "mallory@contoso.com"),
            "decline" => env.idp.decline_device(&user_code),
            _ => env.idp.expire_device(&user_code),
        };
        assert!(acted, "{how}");
        let html = device_outcome(&b, &page_url).await;
        assert!(!html.contains("You are done"), "{how}: {html}");
        assert!(!html.contains("Waiting for you"), "{how}: {html}");
        match how {
            "wrong" => assert!(html.contains("but this invitation is for"), "{how}: {html}"),
            "expire" => assert!(html.contains("expired"), "{how}: {html}"),
            _ => {}
        }
        assert_eq!(status_of(&server, name).await, Status::Pending, "{how}");
        assert_eq!(
            invitation_state(&server, &inv).await,
            InvitationState::Pending,
            "{how}: the invitation can be used again"
        );
    }
    server.shutdown(GRACE).await;
}
