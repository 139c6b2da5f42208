//! App-only access and several tenants (issue 13), end to end: identities
//! in mode `app` get client-credentials tokens from the identity-platform
//! double (client secret, or a certificate's JWT assertion that the double
//! verifies), shared per tenant, and use them for EWS (with
//! `X-AnchorMailbox` and an `ExchangeImpersonation` header the EWS double
//! insists on) and for SMTP, IMAP and POP3 (XOAUTH2 with the app token).
//! Two tenants run side by side; an expired secret blocks its tenant, and
//! `config check` warns about a certificate that expires soon.

mod support;

use std::time::Duration;
use support::certs::{app_certificate, APP_KEY_1, APP_KEY_2};
use support::harness::{sample, Env, HttpClient};
use support::idp::AppCredential;
use support::mail::{ImapOptions, Pop3Options, SmtpOptions};
use support::mailrig::{b64, lettre_mailer, message, start_in, Raw};

const GRACE: Duration = Duration::from_secs(5);
/// Tenant path segments at the identity-platform double.
const FABRIKAM: &str = "fabrikam-test";
const NORTHWIND: &str = "northwind-test";
const FABRIKAM_APP: &str = "fabrikam-app-id";
const NORTHWIND_APP: &str = "northwind-app-id";
const FABRIKAM_SECRET: &str = "fabrikam-secret-value-1";

/// Registers both tenants' apps at the double and configures them:
/// `fabrikam` with a client secret (from a file), `northwind` with a
/// certificate (valid for `cert_days`) and its key.
fn two_tenants(env: &Env, cert_days: i64) {
    let d = env.dir.path();
    std::fs::write(d.join("fabrikam.secret"), format!("{FABRIKAM_SECRET}\n")).unwrap();
    let (pem, der) = app_certificate(APP_KEY_2, cert_days);
    std::fs::write(d.join("northwind.crt"), pem).unwrap();
    std::fs::write(d.join("northwind.key"), APP_KEY_2).unwrap();
    env.idp.register_app(
        FABRIKAM,
        FABRIKAM_APP,
        AppCredential::Secret(FABRIKAM_SECRET.into()),
    );
    env.idp.register_app(
        NORTHWIND,
        NORTHWIND_APP,
        AppCredential::Certificate { cert_der: der },
    );
    let authority = env.idp.base_url();
    env.add_toml(&format!(
        r#"
[tenants.fabrikam]
authority = "{authority}"
tenant = "{FABRIKAM}"
client_id = "{FABRIKAM_APP}"
client_secret_file = "{d}/fabrikam.secret"
timeout = "5s"

[tenants.northwind]
authority = "{authority}"
tenant = "{NORTHWIND}"
client_id = "{NORTHWIND_APP}"
certificate_file = "{d}/northwind.crt"
private_key_file = "{d}/northwind.key"
timeout = "5s"
"#,
        d = d.display()
    ));
}

/// The mail world with app identities: `svc` (fabrikam, secret) and
/// `robot` (northwind, certificate) besides the delegated `alice`.
async fn app_mail() -> support::mailrig::Mail {
    let env = Env::start().await;
    env.add_linked("alice", "alice@contoso.com", "alice-pw-123")
        .await;
    two_tenants(&env, 365);
    env.add_app("svc", "svc@fabrikam.com", "svc-pw-123456", "fabrikam")
        .await;
    env.add_app(
        "robot",
        "robot@northwind.com",
        "robot-pw-12345",
        "northwind",
    )
    .await;
    start_in(
        env,
        SmtpOptions::default(),
        ImapOptions::default(),
        Pop3Options::default(),
        |_| {},
    )
    .await
}

#[tokio::test]
async fn smtp_imap_and_pop3_log_in_with_app_tokens_of_two_tenants() {
    use lettre::transport::smtp::authentication::Mechanism;
    use lettre::AsyncTransport;
    let m = app_mail().await;

    // SMTP with a real client, as both app identities.
    let smtp = m.server.smtp_addr().unwrap();
    lettre_mailer(smtp, "svc", "svc-pw-123456", Mechanism::Plain)
        .send(message("from the fabrikam service\r\n"))
        .await
        .expect("sent as svc");
    lettre_mailer(smtp, "robot", "robot-pw-12345", Mechanism::Login)
        .send(message("from the northwind robot\r\n"))
        .await
        .expect("sent as robot");
    let msgs = m.smtp.wait_for_messages(2).await;
    let senders: Vec<String> = msgs
        .iter()
        .map(|m| m.authenticated_as.to_lowercase())
        .collect();
    assert_eq!(senders, ["svc@fabrikam.com", "robot@northwind.com"]);

    // IMAP with a real client.
    let tcp = tokio::net::TcpStream::connect(m.server.imap_addr().unwrap())
        .await
        .unwrap();
    let mut client = async_imap::Client::new(tcp);
    let _greeting = client.read_response().await.unwrap().unwrap();
    let mut session = client
        .login("svc", "svc-pw-123456")
        .await
        .map_err(|(e, _)| e)
        .expect("IMAP login as an app identity");
    session.select("INBOX").await.unwrap();
    session.logout().await.unwrap();
    assert_eq!(m.imap.authenticated_mailboxes(), ["svc@fabrikam.com"]);

    // POP3, raw.
    let mut c = Raw::connect(m.server.pop3_addr().unwrap()).await;
    assert!(c.line().await.starts_with("+OK"));
    c.send(b"USER robot\r\n").await;
    assert!(c.line().await.starts_with("+OK"));
    c.send(b"PASS robot-pw-12345\r\n").await;
    let answer = c.line().await;
    assert!(answer.starts_with("+OK"), "{answer}");
    c.send(b"QUIT\r\n").await;
    assert_eq!(m.pop3.authenticated_mailboxes(), ["robot@northwind.com"]);

    // Every upstream login used an app token of the right tenant, and the
    // upstreams saw XOAUTH2 with the identity's own mailbox only.
    let v = m.env.idp.validator();
    for attempt in m
        .smtp
        .xoauth2_attempts()
        .into_iter()
        .chain(m.imap.xoauth2_attempts())
        .chain(m.pop3.xoauth2_attempts())
    {
        let token = attempt.token.as_deref().expect("XOAUTH2 parsed");
        let user = attempt.user.as_deref().expect("XOAUTH2 parsed");
        let app = v.app_token(token).expect("an app-only token");
        let want = if user == "svc@fabrikam.com" {
            (FABRIKAM, FABRIKAM_APP)
        } else {
            assert_eq!(user, "robot@northwind.com");
            (NORTHWIND, NORTHWIND_APP)
        };
        assert_eq!((app.tenant.as_str(), app.client_id.as_str()), want);
    }
    // One client-credentials grant per tenant, each with its own
    // credential (the double checked the secret and the assertion), and
    // no refresh-token grant for app identities.
    assert_eq!(m.env.idp.client_credentials_calls(FABRIKAM), 1);
    assert_eq!(m.env.idp.client_credentials_calls(NORTHWIND), 1);
    assert_eq!(m.env.idp.refresh_calls(), 0);
    let grants: Vec<_> = m
        .env
        .idp
        .requests()
        .into_iter()
        .filter(|r| r.grant_type.as_deref() == Some("client_credentials"))
        .collect();
    for g in &grants {
        assert_eq!(
            g.scope.as_deref(),
            Some("https://outlook.office365.com/.default")
        );
        match g.tenant.as_str() {
            FABRIKAM => {
                assert_eq!(g.form_value("client_secret"), Some(FABRIKAM_SECRET));
                assert!(g.form_value("client_assertion").is_none());
            }
            NORTHWIND => {
                assert!(g.form_value("client_secret").is_none());
                assert!(g.form_value("client_assertion").is_some());
            }
            other => panic!("grant for unexpected tenant {other}"),
        }
    }

    // A delegated identity next to them still uses its refresh token.
    lettre_mailer(smtp, "alice", "alice-pw-123", Mechanism::Plain)
        .send(message("delegated\r\n"))
        .await
        .expect("sent as alice");
    assert_eq!(m.env.idp.refresh_calls(), 1);

    // Metrics tie identities to tenants and modes.
    let admin = m.server.admin_addr();
    let text = HttpClient::default().get(admin, "/metrics").await.text();
    for (identity, tenant, mode) in [
        ("svc", "fabrikam", "app"),
        ("robot", "northwind", "app"),
        ("alice", "default", "delegated"),
    ] {
        let series = format!(
            "authswap_identity_info{{identity=\"{identity}\",tenant=\"{tenant}\",mode=\"{mode}\"}}"
        );
        assert_eq!(sample(&text, &series), Some(1.0), "{series}\n{text}");
    }
    let expiry = sample(
        &text,
        "authswap_app_credential_expiry_timestamp_seconds{tenant=\"northwind\"}",
    )
    .expect("certificate expiry exported");
    let in_a_year = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        + 365.0 * 86_400.0;
    assert!((expiry - in_a_year).abs() < 2.0 * 86_400.0, "{expiry}");
    // Nothing secret in the metrics.
    assert!(!text.contains(FABRIKAM_SECRET));
    m.server.shutdown(GRACE).await;
}

#[tokio::test]
async fn many_app_identities_of_one_tenant_share_one_client_credentials_call() {
    let m = {
        let env = Env::start().await;
        two_tenants(&env, 365);
        for i in 0..8 {
            env.add_app(
                &format!("svc{i}"),
                &format!("svc{i}@fabrikam.com"),
                "svc-pw-123456",
                "fabrikam",
            )
            .await;
        }
        start_in(
            env,
            SmtpOptions::default(),
            ImapOptions::default(),
            Pop3Options::default(),
            |_| {},
        )
        .await
    };
    // Hold the identity platform so every login is waiting for the token
    // at once, then let it answer.
    m.env.idp.set_delay(Duration::from_millis(500));
    let smtp = m.server.smtp_addr().unwrap();
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..8 {
        sends.spawn(async move {
            use lettre::transport::smtp::authentication::Mechanism;
            use lettre::AsyncTransport;
            lettre_mailer(smtp, &format!("svc{i}"), "svc-pw-123456", Mechanism::Plain)
                .send(message("concurrent\r\n"))
                .await
                .map(|_| ())
        });
    }
    while let Some(r) = sends.join_next().await {
        r.unwrap().expect("sent");
    }
    let msgs = m.smtp.wait_for_messages(8).await;
    let mut senders: Vec<String> = msgs.iter().map(|m| m.authenticated_as.clone()).collect();
    senders.sort();
    let want: Vec<String> = (0..8).map(|i| format!("svc{i}@fabrikam.com")).collect();
    assert_eq!(senders, want);
    assert_eq!(
        m.env.idp.client_credentials_calls(FABRIKAM),
        1,
        "one grant for the tenant, shared by every app identity"
    );
    assert_eq!(m.env.idp.issued_app_tokens().len(), 1);
    m.server.shutdown(GRACE).await;
}

#[tokio::test]
async fn an_expired_secret_blocks_every_identity_of_its_tenant_only() {
    let m = {
        let env = Env::start().await;
        two_tenants(&env, 365);
        env.add_app("svc", "svc@fabrikam.com", "svc-pw-123456", "fabrikam")
            .await;
        env.add_app("svc2", "svc2@fabrikam.com", "svc-pw-123456", "fabrikam")
            .await;
        env.add_app(
            "robot",
            "robot@northwind.com",
            "robot-pw-12345",
            "northwind",
        )
        .await;
        start_in(
            env,
            SmtpOptions::default(),
            ImapOptions::default(),
            Pop3Options::default(),
            |_| {},
        )
        .await
    };
    assert!(m.env.idp.expire_app_secret(FABRIKAM, FABRIKAM_APP));
    let smtp = m.server.smtp_addr().unwrap();
    let mut c = Raw::connect(smtp).await;
    assert!(c.reply().await.starts_with("220"));
    c.send(b"EHLO legacy\r\n").await;
    c.reply().await;
    c.send(format!("AUTH PLAIN {}\r\n", b64(b"\0svc\0svc-pw-123456")).as_bytes())
        .await;
    let answer = c.reply().await;
    assert!(
        answer.starts_with("454 4.7.0"),
        "a temporary answer while the app credential is refused: {answer}"
    );
    assert_eq!(m.smtp.xoauth2_attempts().len(), 0, "nothing went upstream");

    // The other tenant is not affected.
    use lettre::transport::smtp::authentication::Mechanism;
    use lettre::AsyncTransport;
    lettre_mailer(smtp, "robot", "robot-pw-12345", Mechanism::Plain)
        .send(message("still fine\r\n"))
        .await
        .expect("northwind unaffected");

    // Every identity of fabrikam shows the tenant-wide problem, in plain
    // words, not a need for each user to sign in again.
    let list = m.env.cli(&["identity", "list", "--json"], None);
    assert!(list.status.success(), "{list:?}");
    let rows: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let by_name = |n: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == n)
            .cloned()
            .unwrap()
    };
    for name in ["svc", "svc2"] {
        let r = by_name(name);
        assert_eq!(r["status"], "app_credential", "{r}");
        assert_eq!(r["ok"], false);
        assert_eq!(r["tenant"], "fabrikam");
        assert_eq!(r["mode"], "app");
        let why = r["tenant_block"].as_str().unwrap();
        assert!(why.contains("client secret has expired"), "{why}");
        assert!(why.contains("AADSTS7000222"), "{why}");
    }
    let robot = by_name("robot");
    assert_eq!(robot["status"], "linked");
    assert_eq!(robot["ok"], true);
    let table = m.env.cli(&["identity", "list", "--status", "error"], None);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("svc2") && !table.contains("robot"),
        "{table}"
    );
    assert!(table.contains("app_credential"), "{table}");

    // Alerting sees it per tenant.
    let admin = m.server.admin_addr();
    let (text, ok) = HttpClient::default()
        .metrics_until(admin, Duration::from_secs(5), |t| {
            sample(t, "authswap_app_credential_blocked{tenant=\"fabrikam\"}") == Some(1.0)
        })
        .await;
    assert!(ok, "{text}");
    assert_eq!(
        sample(
            &text,
            "authswap_auth_failures_total{identity=\"svc\",protocol=\"smtp\",reason=\"app_credential\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert!(!text.contains(FABRIKAM_SECRET));
    m.server.shutdown(GRACE).await;
}

#[tokio::test]
async fn config_check_warns_about_a_certificate_that_expires_in_ten_days() {
    let env = Env::start().await;
    two_tenants(&env, 10);
    let out = env.cli(&["config", "check"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("tenants.northwind") && l.contains("certificate"))
        .unwrap_or_else(|| panic!("no certificate warning in:\n{stderr}"));
    assert!(line.starts_with("warning:"), "{line}");
    assert!(
        line.contains("in 9 days") || line.contains("in 10 days"),
        "{line}"
    );
    assert!(line.contains("CN=authswap test app"), "{line}");
    // The secret is never printed.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains(FABRIKAM_SECRET) && !stderr.contains(FABRIKAM_SECRET));
    assert!(stdout.contains("[tenants.northwind]"), "{stdout}");

    // A key that does not belong to the certificate is refused.
    std::fs::write(env.dir.path().join("northwind.key"), APP_KEY_1).unwrap();
    let out = env.cli(&["config", "check"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("tenants.northwind"), "{stderr}");
}

#[tokio::test]
async fn the_cli_adds_app_identities_only_to_tenants_with_a_credential() {
    let env = Env::start().await;
    two_tenants(&env, 365);
    let out = env.cli(
        &[
            "identity",
            "add",
            "svc",
            "--mailbox",
            "svc@fabrikam.com",
            "--tenant",
            "fabrikam",
            "--mode",
            "app",
            "--password-stdin",
        ],
        Some("svc-pw-123456\n"),
    );
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("app-only"));
    // The default tenant of the test config is a public client.
    let out = env.cli(
        &[
            "identity",
            "add",
            "svc2",
            "--mailbox",
            "svc2@contoso.com",
            "--mode",
            "app",
            "--password-stdin",
        ],
        Some("svc-pw-123456\n"),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no client secret or certificate"));
    let out = env.cli(
        &[
            "identity",
            "add",
            "x",
            "--mailbox",
            "x@contoso.com",
            "--tenant",
            "nowhere",
            "--password-stdin",
        ],
        Some("svc-pw-123456\n"),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no tenant named `nowhere`"));
    // App identities have nothing to sign in to.
    let out = env.cli(&["invite", "svc"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("app-only"));
    let out = env.cli(&["identity", "login", "svc"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("app-only"));
    let store = env.store().await;
    use authswap::store::Store as _;
    let rec = store.get("svc").await.unwrap().unwrap();
    assert_eq!(rec.mode, authswap::store::Mode::App);
    assert_eq!(rec.tenant, "fabrikam");
    assert!(rec.is_ok());
}

/// What Exchange Online answers to a GetFolder that works.
const GETFOLDER_OK: &str = r#"<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><m:GetFolderResponse xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages"><m:ResponseMessages><m:GetFolderResponseMessage ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode></m:GetFolderResponseMessage></m:ResponseMessages></m:GetFolderResponse></s:Body></s:Envelope>"#;

/// EWS envelopes as legacy clients send them.
const WITH_HEADER: &str = r#"<?xml version="1.0" encoding="utf-8"?><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/" xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types"><soap:Header><t:RequestServerVersion Version="Exchange2013"/></soap:Header><soap:Body><GetFolder xmlns="http://schemas.microsoft.com/exchange/services/2006/messages"/></soap:Body></soap:Envelope>"#;
const WITHOUT_HEADER: &str = r#"<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><FindItem xmlns="http://schemas.microsoft.com/exchange/services/2006/messages"/></s:Body></s:Envelope>"#;

fn impersonating(mailbox: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?>
<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/" xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types">
  <soap:Header>
    <t:ExchangeImpersonation><t:ConnectingSID><t:PrimarySmtpAddress>{mailbox}</t:PrimarySmtpAddress></t:ConnectingSID></t:ExchangeImpersonation>
  </soap:Header>
  <soap:Body><GetItem xmlns="http://schemas.microsoft.com/exchange/services/2006/messages"/></soap:Body>
</soap:Envelope>"#
    )
}

/// The impersonation header authswap inserts for `mailbox`.
fn inserted(mailbox: &str) -> String {
    format!(
        "<t:ExchangeImpersonation xmlns:t=\"http://schemas.microsoft.com/exchange/services/2006/types\"><t:ConnectingSID><t:PrimarySmtpAddress>{mailbox}</t:PrimarySmtpAddress></t:ConnectingSID></t:ExchangeImpersonation>"
    )
}

async fn ews_app_world(http1_only: bool) -> (Env, authswap::server::Server) {
    let env = if http1_only {
        Env::start_http1().await
    } else {
        Env::start().await
    };
    two_tenants(&env, 365);
    env.add_app("svc", "svc@fabrikam.com", "svc-pw-123456", "fabrikam")
        .await;
    env.add_app(
        "robot",
        "robot@northwind.com",
        "robot-pw-12345",
        "northwind",
    )
    .await;
    env.add_linked("alice", "alice@contoso.com", "alice-pw-123")
        .await;
    let server = env.serve().await;
    (env, server)
}

#[tokio::test]
async fn ews_app_identities_act_as_their_own_mailbox() {
    for http1_only in [true, false] {
        let (env, server) = ews_app_world(http1_only).await;
        let addr = server.http_addr().unwrap();
        let client = HttpClient::default();

        // A header element exists: the impersonation goes at its end.
        let r = client.ews(addr, "svc", "svc-pw-123456", WITH_HEADER).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let up = env.ews.last_request().unwrap();
        assert!(up.accepted);
        assert_eq!(up.app_id.as_deref(), Some(FABRIKAM_APP));
        assert_eq!(up.mailbox.as_deref(), Some("svc@fabrikam.com"));
        assert_eq!(
            up.header("x-anchormailbox").as_deref(),
            Some("svc@fabrikam.com")
        );
        let want = WITH_HEADER.replace(
            "</soap:Header>",
            &format!("{}</soap:Header>", inserted("svc@fabrikam.com")),
        );
        assert_eq!(String::from_utf8_lossy(&up.body), want);
        assert_eq!(
            up.header("content-length"),
            Some(want.len().to_string()),
            "Content-Length follows the rewrite"
        );
        assert_eq!(r.body, want.as_bytes(), "the double echoes what it got");

        // No header element: one is created, in the envelope's prefix.
        let r = client
            .ews(addr, "robot", "robot-pw-12345", WITHOUT_HEADER)
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let up = env.ews.last_request().unwrap();
        assert_eq!(up.app_id.as_deref(), Some(NORTHWIND_APP));
        assert_eq!(up.mailbox.as_deref(), Some("robot@northwind.com"));
        let want = WITHOUT_HEADER.replace(
            "<s:Body>",
            &format!(
                "<s:Header>{}</s:Header><s:Body>",
                inserted("robot@northwind.com")
            ),
        );
        assert_eq!(String::from_utf8_lossy(&up.body), want);

        // Already impersonating its own mailbox (another case): sent as it is.
        let own = impersonating("SVC@Fabrikam.com");
        let r = client.ews(addr, "svc", "svc-pw-123456", &own).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let up = env.ews.last_request().unwrap();
        assert!(up.body == own.as_bytes(), "byte-identical");
        assert_eq!(up.header("content-length"), Some(own.len().to_string()));
        assert_eq!(
            up.header("x-anchormailbox").as_deref(),
            Some("svc@fabrikam.com")
        );

        // Another mailbox: refused here, never sent.
        let before = env.ews.request_count();
        let r = client
            .ews(
                addr,
                "svc",
                "svc-pw-123456",
                &impersonating("ceo@fabrikam.com"),
            )
            .await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert!(r.text().contains("ceo@fabrikam.com"));
        assert_eq!(env.ews.request_count(), before);
        // A malformed envelope is the client's error.
        let r = client
            .ews(addr, "svc", "svc-pw-123456", "<soap:Envelope xmlns:soap=\"http://schemas.xmlsoap.org/soap/envelope/\"><soap:Body>")
            .await;
        assert_eq!(r.status, 400, "{}", r.text());
        assert_eq!(env.ews.request_count(), before);

        // A delegated identity beside them is untouched.
        let r = client.ews(addr, "alice", "alice-pw-123", WITH_HEADER).await;
        assert_eq!(r.status, 200);
        let up = env.ews.last_request().unwrap();
        assert!(up.body == WITH_HEADER.as_bytes());
        assert!(up.header("x-anchormailbox").is_none());
        assert!(up.app_id.is_none());

        // One grant per tenant for all of it.
        assert_eq!(env.idp.client_credentials_calls(FABRIKAM), 1);
        assert_eq!(env.idp.client_credentials_calls(NORTHWIND), 1);
        server.shutdown(GRACE).await;
    }
}

#[tokio::test]
async fn ews_app_token_refused_is_refreshed_once_and_large_bodies_get_413() {
    let (env, server) = ews_app_world(false).await;
    let addr = server.http_addr().unwrap();
    let client = HttpClient::default();
    let r = client.ews(addr, "svc", "svc-pw-123456", WITH_HEADER).await;
    assert_eq!(r.status, 200);
    // The upstream refuses the (shared) app token once: one new grant,
    // and the request is replayed with the same rewritten body.
    env.ews.reject_next(1);
    let r = client.ews(addr, "svc", "svc-pw-123456", WITH_HEADER).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(env.idp.client_credentials_calls(FABRIKAM), 2);
    let reqs = env.ews.requests();
    let (refused, replayed) = (&reqs[reqs.len() - 2], &reqs[reqs.len() - 1]);
    assert!(!refused.accepted && replayed.accepted);
    assert!(refused.body == replayed.body);
    assert_ne!(refused.bearer, replayed.bearer);

    // Bodies past http.replay_buffer_limit (1 MiB in the test config)
    // cannot be rewritten: 413, nothing sent upstream.
    let before = env.ews.request_count();
    let filler = "x".repeat(2 * 1024 * 1024);
    let big = WITH_HEADER.replace("<soap:Body>", &format!("<soap:Body><!--{filler}-->"));
    let r = client.ews(addr, "svc", "svc-pw-123456", &big).await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(env.ews.request_count(), before);
    // The same body from a delegated identity streams as before.
    let r = client.ews(addr, "alice", "alice-pw-123", &big).await;
    assert_eq!(r.status, 200);
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn a_mailbox_outside_the_apps_scope_backs_off_alone_without_a_grant_storm() {
    let m = {
        let env = Env::start().await;
        two_tenants(&env, 365);
        env.add_app("svc", "svc@fabrikam.com", "svc-pw-123456", "fabrikam")
            .await;
        env.add_app("ceo", "ceo@fabrikam.com", "ceo-pw-1234567", "fabrikam")
            .await;
        start_in(
            env,
            SmtpOptions::default(),
            ImapOptions::default(),
            Pop3Options::default(),
            |_| {},
        )
        .await
    };
    // RBAC for Applications scopes the app to svc's mailbox only.
    assert!(m
        .env
        .idp
        .restrict_app_mailboxes(FABRIKAM, FABRIKAM_APP, &["svc@fabrikam.com"]));
    let pop3 = m.server.pop3_addr().unwrap();
    let login = |user: &'static str, pw: &'static str| async move {
        let mut c = Raw::connect(pop3).await;
        c.line().await;
        c.send(format!("USER {user}\r\nPASS {pw}\r\n").as_bytes())
            .await;
        c.line().await;
        c.line().await
    };
    assert!(login("svc", "svc-pw-123456").await.starts_with("+OK"));
    // ceo is refused upstream: one new grant and a retry, refused again,
    // then ceo backs off; svc goes on with the shared token meanwhile.
    let first = login("ceo", "ceo-pw-1234567").await;
    assert!(first.starts_with("-ERR"), "{first}");
    let grants = m.env.idp.client_credentials_calls(FABRIKAM);
    assert_eq!(grants, 2, "one grant for the first refusal, not more");
    for _ in 0..3 {
        assert!(login("svc", "svc-pw-123456").await.starts_with("+OK"));
        let again = login("ceo", "ceo-pw-1234567").await;
        assert!(again.starts_with("-ERR [SYS/TEMP]"), "{again}");
    }
    assert_eq!(
        m.env.idp.client_credentials_calls(FABRIKAM),
        grants,
        "ceo's refusals do not throw away the token svc uses"
    );
    let list = m.env.cli(&["identity", "list", "--json"], None);
    let rows: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let ceo = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "ceo")
        .unwrap();
    assert_eq!(ceo["status"], "upstream_refused", "{ceo}");
    assert!(ceo["last_error"]
        .as_str()
        .unwrap()
        .contains("mailbox permissions"));
    m.server.shutdown(GRACE).await;
}

#[tokio::test]
async fn validate_proves_an_app_identity_on_every_protocol() {
    let m = app_mail().await;
    m.env.ews.respond_next(
        200,
        &[("content-type", "text/xml; charset=utf-8")],
        GETFOLDER_OK,
    );
    let app = m.server.app().clone();
    let results = authswap::validate::validate(&app, "svc", "test")
        .await
        .unwrap();
    let protocols: Vec<&str> = results.iter().map(|r| r.protocol.as_str()).collect();
    assert_eq!(protocols, ["ews", "smtp", "imap", "pop3"]);
    for r in &results {
        assert!(r.ok, "{r:?}");
    }
    // The EWS probe impersonates the mailbox, as Exchange requires of
    // app-only tokens (the double refuses it otherwise).
    let req = m.env.ews.last_request().unwrap();
    assert!(req.accepted);
    assert_eq!(req.app_id.as_deref(), Some(FABRIKAM_APP));
    assert_eq!(req.mailbox.as_deref(), Some("svc@fabrikam.com"));
    assert!(String::from_utf8_lossy(&req.body).contains(&inserted("svc@fabrikam.com")));
    assert_eq!(m.env.idp.client_credentials_calls(FABRIKAM), 1);
    m.server.shutdown(GRACE).await;
}

#[tokio::test]
async fn the_admin_api_creates_app_identities_and_shows_tenant_and_mode() {
    let env = Env::start().await;
    two_tenants(&env, 365);
    let server = env
        .serve_with(|c| c.admin.token = Some(authswap::secret::Secret::new("api-token-123")))
        .await;
    let base = format!("http://{}/api/v1", server.admin_addr());
    let http = reqwest::Client::new();
    let post = |body: serde_json::Value| {
        http.post(format!("{base}/identities"))
            .bearer_auth("api-token-123")
            .json(&body)
            .send()
    };
    let r = post(serde_json::json!({
        "name": "svc", "mailbox": "svc@fabrikam.com", "generate": true,
        "tenant": "fabrikam", "mode": "app"
    }))
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let created: serde_json::Value = r.json().await.unwrap();
    assert_eq!(created["identity"]["mode"], "app");
    assert_eq!(created["identity"]["tenant"], "fabrikam");
    assert_eq!(created["identity"]["status"], "linked");
    // The generated password works at once: no sign-in for app identities.
    let password = created["password"].as_str().unwrap().to_owned();
    let reply = HttpClient::default()
        .ews(server.http_addr().unwrap(), "svc", &password, WITH_HEADER)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());

    // An app identity needs a tenant with a credential; the tenant must exist.
    for (body, why) in [
        (
            serde_json::json!({"name": "x", "mailbox": "x@contoso.com", "mode": "app"}),
            "no client secret or certificate",
        ),
        (
            serde_json::json!({"name": "y", "mailbox": "y@contoso.com", "tenant": "nowhere"}),
            "no tenant named `nowhere`",
        ),
    ] {
        let r = post(body).await.unwrap();
        assert!(r.status().is_client_error(), "{}", r.status());
        let e: serde_json::Value = r.json().await.unwrap();
        assert!(e.to_string().contains(why), "{e}");
    }
    // Nothing to invite an app identity to.
    let r = http
        .post(format!("{base}/identities/svc/invitations/resend"))
        .bearer_auth("api-token-123")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());
    let e: serde_json::Value = r.json().await.unwrap();
    assert!(e.to_string().contains("app-only"), "{e}");
    server.shutdown(GRACE).await;
}
