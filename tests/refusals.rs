//! The upstream-refusal policy, end to end on every front end: tokens
//! revoked upstream again and again cost one refresh each and never reach
//! the client; an upstream that refuses every token gets bounded refreshes
//! and the client temporary answers (HTTP 503, SMTP 454, IMAP
//! `NO [UNAVAILABLE]`, POP3 `-ERR [SYS/TEMP]`); a refusal that needs an
//! administrator is passed through and shows in the identity's status and
//! the failure metric until the next success.

mod support;

use authswap::config::Config;
use authswap::store::{Status, Store};
use http::StatusCode;
use std::time::Duration;
use support::harness::{basic, sample, Env, HttpClient, SOAP};
use support::mail::{ImapOptions, Pop3Options, SmtpOptions};
use support::mailrig::{b64, lettre_mailer, message, start_with, Mail, Raw};

const GRACE: Duration = Duration::from_secs(5);
const ALICE: &str = "alice@contoso.com";

/// Short refusal backoffs so that a test sees several of them.
fn short_backoff(c: &mut Config) {
    c.tokens.refused_backoff_min = Duration::from_millis(800);
    c.tokens.refused_backoff_max = Duration::from_millis(1600);
}

/// The identity's status and last error as stored, once `cond` holds for
/// them (at most 5 s).
async fn stored_status(env: &Env, cond: impl Fn(Status) -> bool) -> (Status, Option<String>) {
    stored_until(env, |s, _| cond(s)).await
}

/// Like [`stored_status`], with the last error in the condition too (the
/// status may already match while a newer reason is still being written).
async fn stored_until(env: &Env, cond: impl Fn(Status, &str) -> bool) -> (Status, Option<String>) {
    let store = env.store().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = store.get("alice").await.unwrap().unwrap();
        if cond(r.status, r.last_error.as_deref().unwrap_or_default())
            || tokio::time::Instant::now() >= deadline
        {
            return (r.status, r.last_error);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The doubles with alice linked; the EWS double speaks only HTTP/1.1
/// (the native half serves the requests) when `http1`, else HTTP/2 too
/// (the hyper half).
async fn alice_env(http1: bool) -> Env {
    let env = if http1 {
        Env::start_http1().await
    } else {
        Env::start().await
    };
    env.add_linked("alice", ALICE, "pw-alice-123").await;
    env
}

#[tokio::test]
async fn http_tokens_revoked_three_times_in_a_row_cost_one_refresh_each() {
    // An HTTP/2 upstream (the hyper half) and an HTTP/1.1 one (the native
    // half): the same policy on both.
    for http1 in [false, true] {
        let env = alice_env(http1).await;
        let server = env.serve().await;
        let addr = server.http_addr().unwrap();
        let client = HttpClient::default();
        let r = client.ews(addr, "alice", "pw-alice-123", SOAP).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(env.idp.successful_refreshes(), 1);
        for round in 1..=3 {
            // Sessions revoked upstream: the token in use stops working.
            env.idp.revoke_user_access_tokens(ALICE);
            let r = client.ews(addr, "alice", "pw-alice-123", SOAP).await;
            assert_eq!(
                r.status,
                StatusCode::OK,
                "http1={http1} round {round}: {}",
                r.text()
            );
            assert_eq!(
                env.idp.successful_refreshes(),
                1 + round,
                "http1={http1}: one refresh per revocation"
            );
            // And the next request needs none.
            let r = client.ews(addr, "alice", "pw-alice-123", SOAP).await;
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(env.idp.successful_refreshes(), 1 + round);
        }
        server.shutdown(GRACE).await;
    }
}

#[tokio::test]
async fn http_upstream_refusing_every_token_gets_bounded_refreshes_and_503() {
    for http1 in [false, true] {
        let env = alice_env(http1).await;
        let server = env.serve_with(short_backoff).await;
        let addr = server.http_addr().unwrap();
        let client = HttpClient::default();
        assert_eq!(
            client.ews(addr, "alice", "pw-alice-123", SOAP).await.status,
            StatusCode::OK
        );
        env.ews.reject_next(usize::MAX);
        env.ews.clear();

        // The first request meets the refusal, refreshes once, is refused
        // again: temporary answer.
        let r = client.ews(addr, "alice", "pw-alice-123", SOAP).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
        assert!(r.text().contains("refused freshly issued"), "{}", r.text());
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=2).contains(&retry), "Retry-After {retry}");
        assert_eq!(env.ews.request_count(), 2, "sent, refreshed, replayed once");
        assert_eq!(env.idp.successful_refreshes(), 2);

        // For 4 s, a request every 50 ms: all temporary, and the identity
        // platform sees one refresh per backoff interval at most.
        let until = tokio::time::Instant::now() + Duration::from_secs(4);
        let mut answers = 0;
        while tokio::time::Instant::now() < until {
            let r = client.ews(addr, "alice", "pw-alice-123", SOAP).await;
            assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
            assert!(r.header("retry-after").is_some());
            answers += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let refreshes = env.idp.successful_refreshes();
        assert!(answers > 30, "{answers}");
        // Backoffs of 0.8, 1.6, 1.6, 1.6 s: at most 4 more refreshes.
        assert!(
            (3..=6).contains(&refreshes),
            "http1={http1}: {refreshes} refreshes"
        );
        let (status, why) = stored_status(&env, |s| s == Status::UpstreamRefused).await;
        assert_eq!(status, Status::UpstreamRefused);
        assert!(
            why.as_deref()
                .unwrap_or_default()
                .contains("refused freshly issued"),
            "{why:?}"
        );
        let m = server.app().metrics.encode();
        assert!(
            sample(
                &m,
                "authswap_auth_failures_total{identity=\"alice\",protocol=\"http\",reason=\"fresh_token_refused\"}"
            )
            .unwrap_or(0.0)
                >= answers as f64,
            "{m}"
        );

        // The upstream accepts tokens again: served after the backoff, and
        // the status clears.
        env.ews.reject_next(0);
        tokio::time::sleep(Duration::from_millis(1700)).await;
        let r = client.ews(addr, "alice", "pw-alice-123", SOAP).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let (status, why) = stored_status(&env, |s| s == Status::Linked).await;
        assert_eq!((status, why), (Status::Linked, None));
        server.shutdown(GRACE).await;
    }
}

#[tokio::test]
async fn http_403_from_the_upstream_passes_through_and_shows_in_the_status() {
    for http1 in [false, true] {
        let env = alice_env(http1).await;
        let server = env.serve().await;
        let addr = server.http_addr().unwrap();
        let client = HttpClient::default();
        assert_eq!(
            client.ews(addr, "alice", "pw-alice-123", SOAP).await.status,
            StatusCode::OK
        );
        env.ews.respond_next(
            403,
            &[(
                "x-ms-diagnostics",
                "2000008;reason=\"EWS is disabled for this mailbox\";error_category=\"invalid_user\"",
            )],
            "EWS is disabled",
        );
        let r = client.ews(addr, "alice", "pw-alice-123", SOAP).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert_eq!(r.text(), "EWS is disabled", "the upstream's answer");
        assert_eq!(env.idp.successful_refreshes(), 1, "no refresh for a 403");
        let (status, why) = stored_status(&env, |s| s == Status::UpstreamRefused).await;
        assert_eq!(status, Status::UpstreamRefused, "http1={http1}");
        assert!(
            why.as_deref()
                .unwrap_or_default()
                .contains("EWS is disabled for this mailbox"),
            "{why:?}"
        );
        // The CLI lists it among the identities in error, in plain words.
        let out = env.cli(&["identity", "list", "--status", "error"], None);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("upstream_refused") && text.contains("EWS is disabled"),
            "{text}"
        );
        let m = server.app().metrics.encode();
        assert!(m.contains(
            "authswap_auth_failures_total{identity=\"alice\",protocol=\"http\",reason=\"upstream_refused\"} 1"
        ));
        // The next success clears it.
        assert_eq!(
            client.ews(addr, "alice", "pw-alice-123", SOAP).await.status,
            StatusCode::OK
        );
        assert_eq!(
            stored_status(&env, |s| s == Status::Linked).await,
            (Status::Linked, None)
        );
        server.shutdown(GRACE).await;
    }
}

#[tokio::test]
async fn http_refused_token_of_a_body_too_large_to_replay_gets_a_503_to_resend() {
    let env = Env::start().await;
    env.add_linked("alice", ALICE, "pw-alice-123").await;
    let server = env.serve().await; // replay_buffer_limit = 1MiB
    let addr = server.http_addr().unwrap();
    let client = HttpClient::default();
    let body = vec![b'x'; 2 * 1024 * 1024];
    env.ews.reject_next(1);
    let r = client
        .send(
            addr,
            http::Method::POST,
            "/upload",
            Some(&basic("alice", "pw-alice-123")),
            body.clone(),
        )
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    // Sent again, it goes through with a new token.
    let r = client
        .send(
            addr,
            http::Method::POST,
            "/upload",
            Some(&basic("alice", "pw-alice-123")),
            body,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(env.idp.successful_refreshes(), 2);
    server.shutdown(GRACE).await;
}

async fn mail(tweak: impl FnOnce(&mut Config) + Send + 'static) -> Mail {
    start_with(
        SmtpOptions::default(),
        ImapOptions::default(),
        Pop3Options::default(),
        tweak,
    )
    .await
}

/// Logs in over SMTP with AUTH PLAIN; returns the reply's last line.
async fn smtp_login(m: &Mail) -> String {
    let mut c = Raw::connect(m.server.smtp_addr().unwrap()).await;
    c.line().await;
    c.send(b"EHLO scanner\r\n").await;
    c.reply().await;
    c.send(format!("AUTH PLAIN {}\r\n", b64(b"\0alice\0alice-pw-123")).as_bytes())
        .await;
    c.reply().await
}

/// Logs in over IMAP with LOGIN; returns the tagged answer.
async fn imap_login(m: &Mail) -> String {
    let mut c = Raw::connect(m.server.imap_addr().unwrap()).await;
    c.line().await;
    c.send(b"a1 LOGIN alice alice-pw-123\r\n").await;
    loop {
        let l = c.line().await;
        if l.starts_with("a1 ") || l.is_empty() {
            return l;
        }
    }
}

/// Logs in over POP3 with USER/PASS; returns the answer to PASS.
async fn pop3_login(m: &Mail) -> String {
    let mut c = Raw::connect(m.server.pop3_addr().unwrap()).await;
    c.line().await;
    c.send(b"USER alice\r\n").await;
    c.line().await;
    c.send(b"PASS alice-pw-123\r\n").await;
    c.line().await
}

#[tokio::test]
async fn mail_tokens_revoked_three_times_in_a_row_cost_one_refresh_each() {
    use lettre::transport::smtp::authentication::Mechanism;
    use lettre::AsyncTransport;
    let m = mail(|_| {}).await;
    let smtp = m.server.smtp_addr().unwrap();
    let send = || async {
        lettre_mailer(smtp, "alice", "alice-pw-123", Mechanism::Plain)
            .send(message("hello"))
            .await
    };
    send().await.expect("first send");
    assert_eq!(m.env.idp.successful_refreshes(), 1);
    for round in 1..=3 {
        m.env.idp.revoke_user_access_tokens(ALICE);
        send()
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(m.env.idp.successful_refreshes(), 1 + round);
    }

    // IMAP and POP3 have their own scopes (one token each), same policy.
    let base = m.env.idp.successful_refreshes();
    assert!(imap_login(&m).await.starts_with("a1 OK"));
    assert!(pop3_login(&m).await.starts_with("+OK"));
    assert_eq!(m.env.idp.successful_refreshes(), base + 2);
    for round in 1..=3 {
        m.env.idp.revoke_user_access_tokens(ALICE);
        let r = imap_login(&m).await;
        assert!(r.starts_with("a1 OK"), "round {round}: {r}");
        let r = pop3_login(&m).await;
        assert!(r.starts_with("+OK"), "round {round}: {r}");
        assert_eq!(m.env.idp.successful_refreshes(), base + 2 + 2 * round);
    }
    m.server.shutdown(GRACE).await;
}

/// Exchange Online's answer when SMTP AUTH is switched off for the tenant.
const SMTP_AUTH_DISABLED: &str = "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information. [FAKE0001.namprd00.prod.outlook.com]";

#[tokio::test]
async fn smtp_refusing_every_token_answers_454_then_passes_a_permanent_code_through() {
    use lettre::transport::smtp::authentication::Mechanism;
    use lettre::AsyncTransport;
    let m = mail(short_backoff).await;
    assert!(smtp_login(&m).await.starts_with("235"));
    m.smtp.reject_auth_next(usize::MAX);

    // Every login for 3 s: temporary, so senders queue and retry.
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut tries = 0;
    while tokio::time::Instant::now() < until {
        let r = smtp_login(&m).await;
        assert!(
            r.starts_with("454 4.7.0") && r.contains("refused freshly issued"),
            "{r}"
        );
        tries += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(tries > 10);
    let refreshes = m.env.idp.successful_refreshes();
    assert!((2..=5).contains(&refreshes), "{refreshes} refreshes");
    assert!(
        m.smtp.auth_attempts() <= 2 * refreshes,
        "no upstream login while backing off"
    );
    let (status, _) = stored_status(&m.env, |s| s == Status::UpstreamRefused).await;
    assert_eq!(status, Status::UpstreamRefused);

    // Now the tenant has SMTP AUTH switched off: that answer, permanent,
    // reaches the client as the upstream said it.
    m.smtp.reject_auth_next(0);
    m.smtp.refuse_auth_with(Some(SMTP_AUTH_DISABLED));
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let before = m.env.idp.successful_refreshes();
    let r = smtp_login(&m).await;
    assert!(
        r.starts_with(
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled"
        ),
        "{r}"
    );
    let err = lettre_mailer(
        m.server.smtp_addr().unwrap(),
        "alice",
        "alice-pw-123",
        Mechanism::Plain,
    )
    .send(message("x"))
    .await
    .unwrap_err();
    assert!(err.is_permanent(), "{err}");
    assert!(
        m.env.idp.successful_refreshes() <= before + 1,
        "a permanent refusal needs no refresh"
    );
    let (status, why) = stored_until(&m.env, |s, why| {
        s == Status::UpstreamRefused && why.contains("SmtpClientAuthentication is disabled")
    })
    .await;
    assert_eq!(status, Status::UpstreamRefused);
    assert!(
        why.as_deref()
            .unwrap_or_default()
            .contains("SmtpClientAuthentication is disabled"),
        "{why:?}"
    );
    let metrics = m.server.app().metrics.encode();
    for reason in ["fresh_token_refused", "upstream_refused"] {
        let series = format!(
            "authswap_auth_failures_total{{identity=\"alice\",protocol=\"smtp\",reason=\"{reason}\"}}"
        );
        assert!(sample(&metrics, &series).unwrap_or(0.0) >= 1.0, "{series}");
    }

    // Switched back on: the next login works and the status clears.
    m.smtp.refuse_auth_with(None);
    assert!(smtp_login(&m).await.starts_with("235"));
    assert_eq!(
        stored_status(&m.env, |s| s == Status::Linked).await,
        (Status::Linked, None)
    );
    m.server.shutdown(GRACE).await;
}

#[tokio::test]
async fn imap_and_pop3_refusals_answer_temporary_then_pass_permanent_ones_through() {
    let m = mail(short_backoff).await;
    assert!(imap_login(&m).await.starts_with("a1 OK"));
    assert!(pop3_login(&m).await.starts_with("+OK"));

    m.imap.reject_auth_next(usize::MAX);
    m.pop3.reject_auth_next(usize::MAX);
    for _ in 0..3 {
        let r = imap_login(&m).await;
        assert!(
            r.starts_with("a1 NO [UNAVAILABLE]") && r.contains("refused freshly issued"),
            "{r}"
        );
        let r = pop3_login(&m).await;
        assert!(
            r.starts_with("-ERR [SYS/TEMP]") && r.contains("refused freshly issued"),
            "{r}"
        );
    }
    m.imap.reject_auth_next(0);
    m.pop3.reject_auth_next(0);
    m.imap.refuse_auth_with(Some(
        "NO [AUTHORIZATIONFAILED] IMAP is disabled for this mailbox",
    ));
    m.pop3
        .refuse_auth_with(Some("-ERR [SYS/PERM] POP3 is disabled for this mailbox"));
    tokio::time::sleep(Duration::from_millis(1700)).await;
    assert_eq!(
        imap_login(&m).await.trim_end(),
        "a1 NO [AUTHORIZATIONFAILED] IMAP is disabled for this mailbox"
    );
    assert_eq!(
        pop3_login(&m).await.trim_end(),
        "-ERR [SYS/PERM] POP3 is disabled for this mailbox"
    );
    let (status, why) = stored_until(&m.env, |s, why| {
        s == Status::UpstreamRefused && why.contains("is disabled")
    })
    .await;
    assert_eq!(status, Status::UpstreamRefused);
    assert!(why.unwrap_or_default().contains("is disabled"));

    m.imap.refuse_auth_with(None);
    m.pop3.refuse_auth_with(None);
    assert!(imap_login(&m).await.starts_with("a1 OK"));
    assert!(pop3_login(&m).await.starts_with("+OK"));
    assert_eq!(
        stored_status(&m.env, |s| s == Status::Linked).await,
        (Status::Linked, None)
    );
    m.server.shutdown(GRACE).await;
}
