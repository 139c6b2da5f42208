//! Behaviour of the HTTP (EWS) front end against the identity-platform and
//! EWS doubles: real listeners on 127.0.0.1:0, TLS upstreams with a generated
//! CA, the real SQLite store.

mod support;

use bytes::Bytes;
use http::{Method, StatusCode};
use std::time::Duration;
use support::harness::{basic, eventually, sample, Env, HttpClient, SOAP};
use support::IdpOptions;

const GRACE: Duration = Duration::from_secs(5);

#[tokio::test]
async fn basic_credentials_become_a_bearer_token_upstream() {
    let env = Env::start().await;
    env.add_linked("alice", "alice@contoso.com", "alice-local-pw")
        .await;
    let server = env.serve().await;
    let addr = server.http_addr().unwrap();
    let client = HttpClient::default();

    let reply = client
        .send(
            addr,
            Method::POST,
            "/EWS/Exchange.asmx?x=1",
            Some(&basic("Alice", "alice-local-pw")),
            SOAP,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.text(), SOAP, "body echoed through both hops");
    assert_eq!(
        reply.header("x-echo-mailbox").as_deref(),
        Some("alice@contoso.com")
    );
    assert_eq!(
        reply.header("x-echo-path-and-query").as_deref(),
        Some("/EWS/Exchange.asmx?x=1")
    );

    let seen = env.ews.last_request().unwrap();
    let auth = seen.header("authorization").unwrap();
    assert!(auth.starts_with("Bearer at-"), "upstream got {auth:?}");
    assert!(env.idp.is_access_token_valid(&auth[7..]).is_some());
    assert_eq!(
        seen.header("content-type").as_deref(),
        Some("text/xml; charset=utf-8")
    );
    assert_eq!(env.idp.successful_refreshes(), 1);
    // The refresh asked for the EWS scope plus offline_access.
    let scopes = env.idp.requested_scopes();
    assert!(scopes[0].contains("EWS.AccessAsUser.All") && scopes[0].contains("offline_access"));

    // Steady state: no further refresh, no further argon2.
    for _ in 0..5 {
        let r = client.ews(addr, "alice", "alice-local-pw", SOAP).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    assert_eq!(env.idp.refresh_calls(), 1);
    let m = client.get(server.admin_addr(), "/metrics").await.text();
    assert_eq!(
        sample(&m, "authswap_credential_checks_total{result=\"verified\"}"),
        Some(1.0)
    );
    // Five requests, plus the first one once more: it was authenticated
    // before authswap dialled the upstream, learnt that it speaks HTTP/2
    // and handed the request to the hyper half (which recalls the
    // connection's proof).
    assert_eq!(
        sample(&m, "authswap_credential_checks_total{result=\"cache_hit\"}"),
        Some(6.0)
    );
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn upstream_is_reached_over_http2_when_offered() {
    let env = Env::start().await;
    env.add_linked("alice", "alice@contoso.com", "pw-alice-123")
        .await;
    let server = env.serve().await;
    let r = HttpClient::default()
        .ews(server.http_addr().unwrap(), "alice", "pw-alice-123", SOAP)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-echo-http-version").as_deref(), Some("HTTP/2.0"));
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn wrong_password_missing_or_malformed_credentials_get_401_and_nothing_goes_upstream() {
    let env = Env::start().await;
    env.add_linked("alice", "alice@contoso.com", "right-password")
        .await;
    let server = env.serve().await;
    let addr = server.http_addr().unwrap();
    let client = HttpClient::default();

    let r = client.ews(addr, "alice", "wrong-password", SOAP).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r
        .header("www-authenticate")
        .unwrap()
        .starts_with("Basic realm=\"authswap\""));

    let r = client
        .send(addr, Method::POST, "/EWS/Exchange.asmx", None, SOAP)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.header("www-authenticate").is_some());

    for bad in ["Basic !!notbase64", "Bearer abc", "Basic YWxpY2U="] {
        let r = client
            .send(addr, Method::POST, "/EWS/Exchange.asmx", Some(bad), SOAP)
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{bad}");
    }
    assert_eq!(env.ews.request_count(), 0, "nothing was sent upstream");
    assert_eq!(env.idp.token_requests(), 0, "no token was fetched");

    let m = client.get(server.admin_addr(), "/metrics").await.text();
    assert_eq!(
        sample(
            &m,
            "authswap_auth_failures_total{identity=\"alice\",protocol=\"http\",reason=\"bad_password\"}"
        ),
        Some(1.0)
    );
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn unknown_names_get_401_and_create_no_metric_series() {
    let env = Env::start().await;
    env.add_linked("alice", "alice@contoso.com", "right-password")
        .await;
    let server = env.serve().await;
    let addr = server.http_addr().unwrap();
    let client = HttpClient::default();
    let before = client.get(server.admin_addr(), "/metrics").await.text();
    let series_before = before.lines().filter(|l| !l.starts_with('#')).count();

    for i in 0..25 {
        let r = client
            .ews(addr, &format!("intruder-{i}"), "whatever", SOAP)
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.text(), "authentication failed\n");
    }
    let after = client.get(server.admin_addr(), "/metrics").await.text();
    assert!(
        !after.contains("intruder"),
        "user-supplied names never become labels"
    );
    // Checked and refused, or refused without checking once the source is
    // locked out: every attempt is counted under `_unknown`.
    let unknown = sample(
        &after,
        "authswap_auth_failures_total{identity=\"_unknown\",protocol=\"http\",reason=\"unknown_identity\"}",
    )
    .unwrap_or(0.0);
    let locked = sample(
        &after,
        "authswap_auth_failures_total{identity=\"_unknown\",protocol=\"http\",reason=\"locked_out\"}",
    )
    .unwrap_or(0.0);
    assert_eq!(unknown + locked, 25.0);
    assert!(unknown >= 10.0);
    let series_after = after.lines().filter(|l| !l.starts_with('#')).count();
    assert!(
        series_after <= series_before + 8,
        "a bounded number of new series: {series_before} -> {series_after}"
    );
    assert_eq!(env.ews.request_count(), 0);
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn upstream_401_refreshes_once_and_replays_the_body_byte_identical() {
    let env = Env::start().await;
    env.add_linked("alice", "alice@contoso.com", "pw-alice-123")
        .await;
    let server = env.serve().await;
    let addr = server.http_addr().unwrap();
    let client = HttpClient::default();
    // Warm up: the first token.
    assert_eq!(
        client.ews(addr, "alice", "pw-alice-123", SOAP).await.status,
        StatusCode::OK
    );
    env.ews.clear();

    // 64 KiB of every byte value, not valid UTF-8.
    let body: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(31) % 251) as u8)
        .collect();
    env.ews.reject_next(1);
    let r = client
        .send(
            addr,
            Method::POST,
            "/EWS/Exchange.asmx",
            Some(&basic("alice", "pw-alice-123")),
            body.clone(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, Bytes::from(body.clone()));
    let seen = env.ews.requests();
    assert_eq!(seen.len(), 2, "the request was replayed exactly once");
    assert_eq!(seen[0].body, seen[1].body);
    assert_eq!(seen[1].body, Bytes::from(body));
    assert_ne!(seen[0].bearer, seen[1].bearer, "replayed with a new token");
    assert_eq!(env.idp.successful_refreshes(), 2);

    // An upstream that refuses every token: one retry, then a temporary
    // answer, and the platform is not hammered (tests/refusals.rs has
    // the whole policy).
    env.ews.reject_next(10);
    let r = client.ews(addr, "alice", "pw-alice-123", SOAP).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let r = client.ews(addr, "alice", "pw-alice-123", SOAP).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(env.idp.successful_refreshes() <= 3, "no refresh storm");

    let m = client.get(server.admin_addr(), "/metrics").await.text();
    assert!(
        sample(
            &m,
            "authswap_auth_failures_total{identity=\"alice\",protocol=\"http\",reason=\"token_rejected\"}"
        )
        .unwrap()
            >= 2.0
    );
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn bodies_over_the_replay_limit_stream_without_replay() {
    let env = Env::start().await;
    env.add_linked("alice", "alice@contoso.com", "pw-alice-123")
        .await;
    let server = env.serve().await; // replay_buffer_limit = 1MiB in the test config
    let addr = server.http_addr().unwrap();
    let client = HttpClient::default();
    let body: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    let r = client
        .send(
            addr,
            Method::POST,
            "/upload",
            Some(&basic("alice", "pw-alice-123")),
            body.clone(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.len(), body.len());
    assert!(r.body == body);

    env.ews.clear();
    env.ews.reject_next(1);
    let r = client
        .send(
            addr,
            Method::POST,
            "/upload",
            Some(&basic("alice", "pw-alice-123")),
            body,
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "not replayable: the client is asked to send it again"
    );
    assert_eq!(env.ews.request_count(), 1);
    // The next request uses a fresh token.
    let r = client.ews(addr, "alice", "pw-alice-123", SOAP).await;
    assert_eq!(r.status, StatusCode::OK);
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn hundred_concurrent_requests_with_an_expired_token_cause_one_refresh() {
    let env = Env::start().await;
    env.add_linked("alice", "alice@contoso.com", "pw-alice-123")
        .await;
    let server = env.serve().await;
    let addr = server.http_addr().unwrap();
    let client = HttpClient::default();
    env.idp.set_expires_in(2);
    assert_eq!(
        client.ews(addr, "alice", "pw-alice-123", SOAP).await.status,
        StatusCode::OK
    );
    assert_eq!(env.idp.refresh_calls(), 1);
    env.idp.set_expires_in(3600);
    env.idp.set_delay(Duration::from_millis(200));
    tokio::time::sleep(Duration::from_millis(2200)).await; // the token has expired

    let mut tasks = Vec::new();
    for _ in 0..100 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            client.ews(addr, "alice", "pw-alice-123", SOAP).await.status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(
        env.idp.refresh_calls(),
        2,
        "exactly one refresh for 100 requests"
    );
    assert_eq!(env.ews.accepted_count(), 101);
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn revoked_refresh_token_marks_the_identity_needs_reauth() {
    let env = Env::start().await;
    env.add_linked("alice", "alice@contoso.com", "pw-alice-123")
        .await;
    env.idp.revoke_user("alice@contoso.com");
    let server = env.serve().await;
    let addr = server.http_addr().unwrap();
    let client = HttpClient::default();

    let r = client.ews(addr, "alice", "pw-alice-123", SOAP).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.text().contains("needs re-authentication"), "{}", r.text());
    assert!(r.text().contains("authswap identity login alice"));
    assert_eq!(env.ews.request_count(), 0);

    // No retry storm: further requests do not call the platform.
    for _ in 0..5 {
        let r = client.ews(addr, "alice", "pw-alice-123", SOAP).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(env.idp.refresh_calls(), 1);

    let out = env.cli(&["identity", "list", "--json"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "alice");
    assert_eq!(list[0]["status"], "needs_reauth");
    assert!(list[0]["last_error"]
        .as_str()
        .unwrap()
        .contains("AADSTS50173"));
    let out = env.cli(&["identity", "list", "--status", "error"], None);
    assert!(String::from_utf8_lossy(&out.stdout).contains("needs_reauth"));
    let out = env.cli(&["identity", "list", "--status", "ok"], None);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("alice"));

    let m = client.get(server.admin_addr(), "/metrics").await.text();
    assert_eq!(
        sample(&m, "authswap_identity_reauth_required{identity=\"alice\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &m,
            "authswap_token_refreshes_total{identity=\"alice\",result=\"reauth_required\"}"
        ),
        Some(1.0)
    );

    // Re-linking (import) while serving makes it work again without a restart.
    let rt = env.idp.seed_refresh_token("alice@contoso.com");
    let out = env.cli(
        &["identity", "import", "alice", "--refresh-token-stdin"],
        Some(&format!("{rt}\n")),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut ok = false;
    for _ in 0..50 {
        if client.ews(addr, "alice", "pw-alice-123", SOAP).await.status == StatusCode::OK {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "re-linked identity works without a restart");
    let m = client.get(server.admin_addr(), "/metrics").await.text();
    assert_eq!(
        sample(&m, "authswap_identity_reauth_required{identity=\"alice\"}"),
        Some(0.0)
    );
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn identity_platform_down_answers_503_with_retry_after_and_backs_off() {
    let env = Env::start().await;
    env.add_linked("alice", "alice@contoso.com", "pw-alice-123")
        .await;
    env.idp.set_unavailable(true);
    let server = env.serve().await;
    let addr = server.http_addr().unwrap();
    let client = HttpClient::default();

    let r = client.ews(addr, "alice", "pw-alice-123", SOAP).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(retry >= 2, "honours the platform's Retry-After: {retry}");
    for _ in 0..10 {
        let r = client.ews(addr, "alice", "pw-alice-123", SOAP).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.header("retry-after").is_some());
    }
    assert_eq!(env.idp.refresh_calls(), 1, "backing off, not hammering");
    assert_eq!(env.ews.request_count(), 0);

    // The identity is not marked as needing re-authentication, and the
    // platform's error is recorded (written in the background, so that the
    // client's 503 does not wait for the database: poll for it).
    let mut list = serde_json::Value::Null;
    for _ in 0..100 {
        let out = env.cli(&["identity", "list", "--json"], None);
        list = serde_json::from_slice(&out.stdout).unwrap();
        if list[0]["last_error"].is_string() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(list[0]["status"], "linked");
    assert!(
        list[0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("AADSTS90006")),
        "{list}"
    );

    env.idp.set_unavailable(false);
    let recovered = {
        let mut ok = false;
        for _ in 0..80 {
            if client.ews(addr, "alice", "pw-alice-123", SOAP).await.status == StatusCode::OK {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ok
    };
    assert!(recovered, "works again after the backoff");
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn throttling_and_other_upstream_answers_pass_through_unchanged() {
    let env = Env::start().await;
    env.add_linked("alice", "alice@contoso.com", "pw-alice-123")
        .await;
    let server = env.serve().await;
    let addr = server.http_addr().unwrap();
    let client = HttpClient::default();
    assert_eq!(
        client.ews(addr, "alice", "pw-alice-123", SOAP).await.status,
        StatusCode::OK
    );

    env.ews.respond_next(503, &[("retry-after", "7")], "busy");
    let r = client.ews(addr, "alice", "pw-alice-123", SOAP).await;
    assert_eq!(
        (
            r.status,
            r.header("retry-after").as_deref(),
            r.text().as_str()
        ),
        (StatusCode::SERVICE_UNAVAILABLE, Some("7"), "busy")
    );

    env.ews
        .respond_next_canned(support::server_busy_response(5000));
    let r = client.ews(addr, "alice", "pw-alice-123", SOAP).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(r.text().contains("ErrorServerBusy"));

    env.ews.respond_next(429, &[], "slow down");
    let r = client.ews(addr, "alice", "pw-alice-123", SOAP).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);

    assert_eq!(
        env.idp.refresh_calls(),
        1,
        "throttling is not an auth failure"
    );
    let m = client.get(server.admin_addr(), "/metrics").await.text();
    assert!(!m.contains("reason=\"token_rejected\""));
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn restart_keeps_working_with_the_rotated_refresh_token() {
    // The platform revokes a refresh token once it has been used.
    let env = Env::start_with(IdpOptions {
        revoke_on_rotation: true,
        ..IdpOptions::default()
    })
    .await;
    let original = env
        .add_linked("alice", "alice@contoso.com", "pw-alice-123")
        .await;
    let client = HttpClient::default();
    for round in 0..3 {
        let server = env.serve().await;
        let r = client
            .ews(server.http_addr().unwrap(), "alice", "pw-alice-123", SOAP)
            .await;
        assert_eq!(r.status, StatusCode::OK, "round {round}: {}", r.text());
        server.shutdown(GRACE).await;
    }
    assert!(env.idp.is_refresh_token_valid(&original).is_none());
    assert_eq!(env.idp.successful_refreshes(), 3);
    // The database does not hold any refresh token in the clear.
    let db = std::fs::read(env.dir.path().join("data/authswap.db")).unwrap();
    let wal = std::fs::read(env.dir.path().join("data/authswap.db-wal")).unwrap_or_default();
    for rt in env.idp.issued_refresh_tokens().iter().chain([&original]) {
        let needle = rt.as_bytes();
        assert!(!db.windows(needle.len()).any(|w| w == needle));
        assert!(!wal.windows(needle.len()).any(|w| w == needle));
    }
}

#[tokio::test]
async fn cli_changes_apply_to_the_running_server() {
    let env = Env::start().await;
    env.add_linked("alice", "alice@contoso.com", "first-password")
        .await;
    let server = env.serve().await;
    let addr = server.http_addr().unwrap();
    let admin = server.admin_addr();
    let client = HttpClient::default();
    assert_eq!(
        client
            .ews(addr, "alice", "first-password", SOAP)
            .await
            .status,
        StatusCode::OK
    );

    // New password: the old one (cached!) stops working, the new one works.
    let out = env.cli(
        &["identity", "set-password", "alice", "--password-stdin"],
        Some("second-password\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut switched = false;
    for _ in 0..50 {
        if client
            .ews(addr, "alice", "second-password", SOAP)
            .await
            .status
            == StatusCode::OK
        {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(switched);
    assert_eq!(
        client
            .ews(addr, "alice", "first-password", SOAP)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );

    // A new identity added and imported while serving.
    let out = env.cli(
        &[
            "identity",
            "add",
            "bob",
            "--mailbox",
            "bob@contoso.com",
            "--password-stdin",
        ],
        Some("bob-password-1\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rt = env.idp.seed_refresh_token("bob@contoso.com");
    let out = env.cli(
        &["identity", "import", "bob", "--refresh-token-stdin"],
        Some(&rt),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut bob_ok = false;
    for _ in 0..50 {
        let r = client.ews(addr, "BOB", "bob-password-1", SOAP).await;
        if r.status == StatusCode::OK {
            assert_eq!(
                r.header("x-echo-mailbox").as_deref(),
                Some("bob@contoso.com")
            );
            bob_ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(bob_ok);

    // Removal: refused at once, and its metric series disappear.
    let _ = client.ews(addr, "alice", "wrong", SOAP).await;
    let m = client.get(admin, "/metrics").await.text();
    assert!(m.contains("identity=\"alice\""));
    let out = env.cli(&["identity", "remove", "alice"], None);
    assert!(out.status.success());
    let gone = eventually(Duration::from_secs(5), || {
        server.app().directory.get("alice").is_none()
    })
    .await;
    assert!(gone);
    assert_eq!(
        client
            .ews(addr, "alice", "second-password", SOAP)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    // The directory drops the identity first, then its metric series.
    let (_, gone) = client
        .metrics_until(admin, Duration::from_secs(5), |m| {
            !m.contains("identity=\"alice\"")
        })
        .await;
    assert!(gone, "series of a removed identity are gone");
    let out = env.cli(&["identity", "list", "--json"], None);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn admin_endpoints_and_metrics_parse() {
    let env = Env::start().await;
    env.add_linked("alice", "alice@contoso.com", "pw-alice-123")
        .await;
    let server = env.serve().await;
    let client = HttpClient::default();
    let admin = server.admin_addr();
    assert_eq!(
        client
            .ews(server.http_addr().unwrap(), "alice", "pw-alice-123", SOAP)
            .await
            .status,
        StatusCode::OK
    );
    let _ = client
        .ews(server.http_addr().unwrap(), "nobody", "x", SOAP)
        .await;

    assert_eq!(client.get(admin, "/healthz").await.status, StatusCode::OK);
    assert_eq!(client.get(admin, "/readyz").await.status, StatusCode::OK);
    assert_eq!(
        client.get(admin, "/nope").await.status,
        StatusCode::NOT_FOUND
    );
    let r = client.get_openmetrics(admin).await;
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = r.text();
    assert!(text.trim_end().ends_with("# EOF"));
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("metrics parse");
    let names: std::collections::HashSet<&str> =
        scrape.samples.iter().map(|s| s.metric.as_str()).collect();
    for family in [
        "authswap_auth_failures_total",
        "authswap_token_refreshes_total",
        "authswap_requests_total",
        "authswap_upstream_request_duration_seconds",
        "authswap_identity_reauth_required",
        "authswap_access_token_expiry_timestamp_seconds",
        "authswap_credential_checks_total",
        "authswap_identities",
    ] {
        assert!(names.contains(family), "missing {family} in\n{text}");
    }
    let expiry = scrape
        .samples
        .iter()
        .find(|s| s.metric == "authswap_access_token_expiry_timestamp_seconds")
        .unwrap();
    // Which front end's token (one per scope set).
    assert_eq!(expiry.labels.get("protocol"), Some("http"), "{text}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    match expiry.value {
        prometheus_parse::Value::Gauge(v) => assert!(v > now + 3000.0 && v < now + 3700.0),
        ref other => panic!("unexpected {other:?}"),
    }
    // Histograms carry no identity label.
    assert!(!text
        .lines()
        .any(|l| l.starts_with("authswap_upstream_request_duration") && l.contains("identity=")));
    server.shutdown(GRACE).await;
}

/// Identity names that break the exposition format when written verbatim,
/// stored directly (as a store written before names were restricted may
/// hold them): the scrape still parses, strictly and with prometheus-parse,
/// and every label value reads back as the name.
#[tokio::test]
async fn metrics_scrape_survives_odd_identity_names_in_the_store() {
    let env = Env::start().await;
    let odd = [
        "q\"uote",
        "back\\slash",
        "{brace",
        "new\nline",
        "close}brace,a=b",
    ];
    for (i, name) in odd.iter().enumerate() {
        env.add_linked(name, &format!("odd{i}@contoso.com"), "odd-password-1")
            .await;
    }
    let server = env.serve().await;
    let client = HttpClient::default();
    // Per-identity counters too, not only the gauges set at start.
    for name in &odd[..4] {
        let r = client
            .ews(server.http_addr().unwrap(), name, "wrong-password", SOAP)
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    let text = client.get_openmetrics(server.admin_addr()).await.text();

    let samples = support::openmetrics::parse_strict(&text)
        .unwrap_or_else(|e| panic!("scrape is not valid OpenMetrics: {e}\n{text}"));
    for name in odd {
        assert!(
            samples
                .iter()
                .any(|s| s.name == "authswap_identity_reauth_required"
                    && s.label("identity") == Some(name)),
            "no reauth gauge for {name:?}"
        );
    }
    for name in &odd[..4] {
        assert!(
            samples
                .iter()
                .any(|s| s.name == "authswap_auth_failures_total"
                    && s.label("identity") == Some(*name)
                    && s.label("reason") == Some("bad_password")),
            "no failure counter for {name:?}"
        );
    }

    // prometheus-parse reads every line as a sample, except those whose
    // label holds `}` (its pattern stops at the first one, escaped or not).
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if line.contains("close}brace") {
            continue;
        }
        assert!(
            matches!(
                prometheus_parse::LineInfo::parse(line),
                prometheus_parse::LineInfo::Sample { .. }
            ),
            "prometheus-parse cannot read `{line}`"
        );
    }
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("metrics parse");
    let gauges = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "authswap_identity_reauth_required")
        .count();
    assert_eq!(gauges, 4, "one gauge per identity (but close}}brace)");
    server.shutdown(GRACE).await;
}

async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn oversized_heads_bodies_and_slow_clients_are_bounded() {
    let env = Env::start().await;
    env.add_linked("alice", "alice@contoso.com", "pw-alice-123")
        .await;
    let server = env
        .serve_with(|c| {
            c.http.header_read_timeout = Duration::from_millis(500);
            c.http.max_header_bytes = authswap::config::ByteSize(16 * 1024);
            c.http.max_body_bytes = authswap::config::ByteSize(100 * 1024);
        })
        .await;
    let addr = server.http_addr().unwrap();

    // A header larger than max_header_bytes.
    let big = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let answer = raw_exchange(addr, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.60}");

    // Garbage instead of HTTP.
    let answer = raw_exchange(addr, b"\x16\x03\x01garbage\r\n\r\n").await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer:.60}"
    );

    // A client that never finishes its head is cut off.
    let started = std::time::Instant::now();
    let answer = raw_exchange(addr, b"POST /EWS/Exchange.asmx HTTP/1.1\r\nhost: x\r\n").await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer:.60}"
    );

    // A declared body over max_body_bytes.
    let client = HttpClient::default();
    let r = client
        .send(
            addr,
            Method::POST,
            "/EWS/Exchange.asmx",
            Some(&basic("alice", "pw-alice-123")),
            vec![b'x'; 200 * 1024],
        )
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(env.ews.request_count(), 0);

    // The listener still serves well-behaved clients.
    let r = client.ews(addr, "alice", "pw-alice-123", SOAP).await;
    assert_eq!(r.status, StatusCode::OK);
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn local_https_listener_serves_legacy_clients_that_insist_on_tls() {
    let env = Env::start().await;
    env.add_linked("alice", "alice@contoso.com", "pw-alice-123")
        .await;
    let (cert, key) = support::pki().write_server_cert_files(env.dir.path());
    let server = env
        .serve_with(|c| {
            c.http.tls_cert_file = Some(cert);
            c.http.tls_key_file = Some(key);
        })
        .await;
    let addr = server.http_addr().unwrap();
    let tls = (*support::pki().client_config_no_alpn()).clone();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https);
    let req = http::Request::post(format!(
        "https://localhost:{}/EWS/Exchange.asmx",
        addr.port()
    ))
    .header("authorization", basic("alice", "pw-alice-123"))
    .body(http_body_util::Full::new(Bytes::from_static(
        SOAP.as_bytes(),
    )))
    .unwrap();
    let res = client.request(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    use http_body_util::BodyExt;
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, SOAP.as_bytes());
    // Plain HTTP on the TLS port does not get through.
    let answer = raw_exchange(addr, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(!answer.contains("200 OK"));
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn tokens_are_refreshed_ahead_of_expiry_without_making_clients_wait() {
    let env = Env::start().await;
    env.add_linked("alice", "alice@contoso.com", "pw-alice-123")
        .await;
    let server = env.serve().await;
    let addr = server.http_addr().unwrap();
    let client = HttpClient::default();
    // A 10 s token: refreshed from its half-life on (refresh_ahead is 5m,
    // capped at half the lifetime), usable until 1 s before it expires.
    env.idp.set_expires_in(10);
    assert_eq!(
        client.ews(addr, "alice", "pw-alice-123", SOAP).await.status,
        StatusCode::OK
    );
    let first = env.ews.last_request().unwrap().bearer;
    env.idp.set_expires_in(3600);
    tokio::time::sleep(Duration::from_millis(5300)).await;
    // Still valid: served at once with the old token while the refresh runs
    // in the background. The platform holds that refresh until the answer
    // is in, so a proxy that waited for it would time out here.
    env.idp.set_held(true);
    let reply = tokio::time::timeout(
        Duration::from_secs(3),
        client.ews(addr, "alice", "pw-alice-123", SOAP),
    )
    .await
    .expect("the client waited for the background refresh");
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(env.ews.last_request().unwrap().bearer, first);
    assert!(
        eventually(Duration::from_secs(5), || env.idp.refresh_calls() == 2).await,
        "a refresh started ahead of expiry"
    );
    env.idp.set_held(false);
    let series = "authswap_token_refreshes_total{identity=\"alice\",result=\"success\"}";
    let (m, done) = client
        .metrics_until(server.admin_addr(), Duration::from_secs(5), |m| {
            sample(m, series) == Some(2.0)
        })
        .await;
    assert!(
        done,
        "background refresh finished: {:?}",
        sample(&m, series)
    );
    assert_eq!(env.idp.successful_refreshes(), 2);
    assert_eq!(
        client.ews(addr, "alice", "pw-alice-123", SOAP).await.status,
        StatusCode::OK
    );
    assert_ne!(
        env.ews.last_request().unwrap().bearer,
        first,
        "the new token is used"
    );
    assert_eq!(env.idp.refresh_calls(), 2);
    server.shutdown(GRACE).await;
}
