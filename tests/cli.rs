//! The real `authswap` binary: device-code login end to end, `config check`,
//! `serve` with trace logging (no secret may appear), graceful shutdown on
//! SIGTERM, `healthcheck`, and the default configuration on a fresh machine.
//! Also the project's own artefacts that cargo can check: completions and
//! the man page, the Dockerfile's placeholder stage against the manifest,
//! and `rust-version` against the locked crates.

mod support;

use http::StatusCode;
use std::process::Stdio;
use std::time::{Duration, Instant};
use support::harness::{basic, Env, HttpClient, SOAP};
use support::IdpOptions;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_authswap"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn device_code_login_end_to_end_honours_slow_down() {
    let env = Env::start().await;
    let out = env.cli(
        &[
            "identity",
            "add",
            "Alice",
            "--mailbox",
            "alice@contoso.com",
            "--password-stdin",
        ],
        Some("alice-password-1\n"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("pending"));

    let config = env.write_config();
    let child = bin()
        .arg("-c")
        .arg(&config)
        .args(["identity", "login", "alice"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    env.idp.slow_down_once();
    let code = env.idp.wait_for_device_code().await;
    // Let it poll (pending, then slow_down) before the person signs in.
    let started = Instant::now();
    while env.idp.device_polls() < 2 && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(env.idp.approve_device(&code, "alice@contoso.com"));
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("login finishes")
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains(&code), "{stdout}");
    assert!(stdout.contains("https://microsoft.com/devicelogin"));
    assert!(stdout.contains("linked"));
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "slow_down adds 5 s to the interval"
    );
    let asked: Vec<String> = env
        .idp
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/devicecode"))
        .filter_map(|r| r.scope.clone())
        .collect();
    assert_eq!(asked.len(), 1);
    assert!(asked[0].contains("EWS.AccessAsUser.All") && asked[0].contains("offline_access"));
    assert!(env.idp.tenants().iter().all(|t| t == "contoso-test"));

    // The linked identity works through the proxy.
    let server = env.serve().await;
    let r = HttpClient::default()
        .ews(
            server.http_addr().unwrap(),
            "alice",
            "alice-password-1",
            SOAP,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.header("x-echo-mailbox").as_deref(),
        Some("alice@contoso.com")
    );
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn declined_login_and_bad_commands_fail_with_one_line() {
    let env = Env::start().await;
    let out = env.cli(
        &[
            "identity",
            "add",
            "bob",
            "--mailbox",
            "bob@contoso.com",
            "--password-stdin",
        ],
        Some("bob-password-12\n"),
    );
    assert!(out.status.success());
    // Duplicate (case-insensitive).
    let out = env.cli(
        &[
            "identity",
            "add",
            "BOB",
            "--mailbox",
            "bob@contoso.com",
            "--password-stdin",
        ],
        Some("x\n"),
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // No terminal and no --password-stdin.
    let out = env.cli(
        &["identity", "add", "carol", "--mailbox", "carol@contoso.com"],
        None,
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--password-stdin"));
    // Bad names and mailboxes.
    let out = env.cli(
        &[
            "identity",
            "add",
            "a:b",
            "--mailbox",
            "x@y",
            "--password-stdin",
        ],
        Some("pw\n"),
    );
    assert!(!out.status.success());
    // Unknown identity.
    let out = env.cli(&["identity", "remove", "nobody"], None);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no identity named"));

    // Declined sign-in.
    let config = env.write_config();
    let child = bin()
        .arg("-c")
        .arg(&config)
        .args(["identity", "login", "bob"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let code = env.idp.wait_for_device_code().await;
    assert!(env.idp.decline_device(&code));
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("declined"), "{err}");
    let out = env.cli(&["identity", "list"], None);
    assert!(text(&out.stdout).contains("pending"));
}

#[tokio::test]
async fn config_check_redacts_secrets_and_names_bad_keys() {
    let env = Env::start().await;
    let config = env.write_config();
    let out = bin()
        .arg("-c")
        .arg(&config)
        .args(["config", "check"])
        .env(
            "AUTHSWAP_IDENTITY_PROVIDER__CLIENT_SECRET",
            "super-secret-value-42",
        )
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(!stdout.contains("super-secret-value-42"));
    assert!(
        stdout.contains("client_secret = \"<redacted>\""),
        "{stdout}"
    );
    assert!(stdout.contains(&format!(
        "{}/contoso-test/oauth2/v2.0/token",
        env.idp.base_url()
    )));

    let out = bin()
        .arg("-c")
        .arg(&config)
        .args(["config", "check"])
        .env("AUTHSWAP_HTTP__UPSTREAM", "http://outlook.office365.com")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.starts_with("authswap: error: http.upstream:"), "{err}");

    let out = bin()
        .args(["-c", "/nonexistent/authswap.toml", "config", "check"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("does not exist"));
}

/// Reads JSON log lines until the "serving" line; returns (admin, http).
async fn wait_for_serving(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
    log: &mut String,
) -> (std::net::SocketAddr, std::net::SocketAddr) {
    let v = wait_for_serving_json(lines, log).await;
    (
        v["admin"].as_str().unwrap().parse().unwrap(),
        v["http"].as_str().unwrap().parse().unwrap(),
    )
}

async fn wait_for_serving_json(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
    log: &mut String,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("log line")
            .unwrap()
            .expect("serve exited early");
        log.push_str(&line);
        log.push('\n');
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            if v["message"] == "authswap is serving" {
                return v;
            }
        }
    }
    panic!("serve did not start:\n{log}");
}

#[tokio::test]
async fn serve_logs_at_trace_level_never_contain_secrets_and_sigterm_is_graceful() {
    let client_secret = "client-secret-7f3a9-do-not-log";
    let env = Env::start_with(IdpOptions {
        client_secret: Some(client_secret.into()),
        ..IdpOptions::default()
    })
    .await;
    let password = "local-pass-Zq81-do-not-log";
    let seeded = env.add_linked("alice", "alice@contoso.com", password).await;
    env.add_linked("bob", "bob@contoso.com", "bob-pass-do-not-log")
        .await;
    env.idp.revoke_user("bob@contoso.com");
    let smtp =
        support::mail::FakeSmtp::start(env.idp.validator(), support::mail::SmtpOptions::default())
            .await;

    let config = env.write_config();
    let mut child = bin()
        .arg("-c")
        .arg(&config)
        .args(["--log-format", "json", "serve"])
        .env("AUTHSWAP_LOG", "trace")
        .env("AUTHSWAP_IDENTITY_PROVIDER__CLIENT_SECRET", client_secret)
        .env("AUTHSWAP_SMTP__ENABLED", "true")
        .env(
            "AUTHSWAP_SMTP__UPSTREAM",
            format!("localhost:{}", smtp.port()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut log = String::new();
    let serving = wait_for_serving_json(&mut lines, &mut log).await;
    let admin: std::net::SocketAddr = serving["admin"].as_str().unwrap().parse().unwrap();
    let http: std::net::SocketAddr = serving["http"].as_str().unwrap().parse().unwrap();
    let smtp_addr: std::net::SocketAddr = serving["smtp"].as_str().unwrap().parse().unwrap();
    // Keep draining the log in the background.
    let drain = tokio::spawn(async move {
        let mut rest = String::new();
        let mut inner = lines.into_inner();
        inner.read_to_string(&mut rest).await.unwrap();
        rest
    });

    let client = HttpClient::default();
    assert_eq!(
        client.ews(http, "alice", password, SOAP).await.status,
        StatusCode::OK
    );
    env.ews.reject_next(1);
    assert_eq!(
        client.ews(http, "alice", password, SOAP).await.status,
        StatusCode::OK
    );
    assert_eq!(
        client
            .ews(http, "alice", "wrong-pass-do-not-log", SOAP)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        client
            .ews(http, "bob", "bob-pass-do-not-log", SOAP)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(client.get(admin, "/metrics").await.status, StatusCode::OK);

    // An SMTP session with AUTH PLAIN, a message and QUIT.
    let plain = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("\0alice\0{password}"))
    };
    {
        use tokio::io::AsyncWriteExt;
        let (r, mut w) = tokio::net::TcpStream::connect(smtp_addr)
            .await
            .unwrap()
            .into_split();
        let mut r = BufReader::new(r);
        let mut transcript = String::new();
        w.write_all(format!("EHLO x\r\nAUTH PLAIN {plain}\r\n").as_bytes())
            .await
            .unwrap();
        w.write_all(b"MAIL FROM:<alice@contoso.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
            .await
            .unwrap();
        w.write_all(b"Subject: t\r\n\r\nhello\r\n.\r\nQUIT\r\n")
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), r.read_to_string(&mut transcript))
            .await
            .unwrap()
            .unwrap();
        assert!(transcript.contains("235 "), "{transcript}");
        assert!(transcript.contains("221"), "{transcript}");
    }
    assert_eq!(smtp.message_count(), 1);

    // healthcheck against the running server.
    let out = bin()
        .args(["healthcheck", "--url", &format!("http://{admin}/healthz")])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A slow request is in flight when SIGTERM arrives: it completes.
    env.ews.set_delay(Duration::from_millis(800));
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { client.ews(http, "alice", password, SOAP).await.status })
    };
    env.ews.wait_for_requests(env.ews.request_count() + 1).await;
    signal(child.id().unwrap(), "TERM").await;
    assert_eq!(slow.await.unwrap(), StatusCode::OK);
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    log.push_str(&drain.await.unwrap());

    assert!(log.contains("refreshed access token"), "trace log captured");
    let mut secrets: Vec<String> = vec![
        client_secret.into(),
        password.into(),
        "wrong-pass-do-not-log".into(),
        "bob-pass-do-not-log".into(),
        seeded,
        basic("alice", password)[6..].to_owned(),
        plain,
    ];
    secrets.extend(smtp.xoauth2_attempts().into_iter().map(|a| a.blob));
    secrets.extend(env.idp.issued_access_tokens());
    secrets.extend(env.idp.issued_refresh_tokens());
    assert!(secrets.len() >= 8);
    for s in &secrets {
        assert!(
            !log.contains(s.as_str()),
            "secret {s:?} leaked into the log"
        );
    }
    // After the stop the port is closed.
    let out = bin()
        .args(["healthcheck", "--url", &format!("http://{admin}/healthz")])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
}

async fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .await
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn shipped_configuration_works_on_a_fresh_machine() {
    let dir = tempfile::tempdir().unwrap();
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/authswap.toml");
    let out = bin()
        .args(["-c", shipped, "config", "check"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("identity_provider.client_id"));

    // serve starts with no identity and no app registration; health and
    // metrics answer. Only the addresses and data directory are moved;
    // `extra` adds to the environment.
    let serve_shipped = |extra: &[(&str, &str)]| {
        let mut cmd = bin();
        cmd.args(["-c", shipped, "--log-format", "json", "serve"])
            .envs(extra.iter().copied())
            .env("AUTHSWAP_HTTP__LISTEN", "127.0.0.1:0")
            .env("AUTHSWAP_ADMIN__LISTEN", "127.0.0.1:0")
            .env("AUTHSWAP_SMTP__LISTEN", "127.0.0.1:0")
            .env("AUTHSWAP_IMAP__LISTEN", "127.0.0.1:0")
            .env("AUTHSWAP_POP3__LISTEN", "127.0.0.1:0")
            .env("AUTHSWAP_ONBOARDING__LISTEN", "127.0.0.1:0")
            .env("AUTHSWAP_STORE__PATH", dir.path().join("db/authswap.db"))
            .env(
                "AUTHSWAP_STORE__KEY_FILE",
                dir.path().join("db/authswap.key"),
            )
            .env(
                "AUTHSWAP_ADMIN__TOKEN_FILE",
                dir.path().join("db/admin.token"),
            )
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let mut child = serve_shipped(&[]);
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = String::new();
    let (admin, http) = wait_for_serving(&mut lines, &mut log).await;
    assert!(
        log.contains("identity_provider.client_id"),
        "logs what is missing: {log}"
    );
    let client = HttpClient::default();
    assert_eq!(client.get(admin, "/healthz").await.status, StatusCode::OK);
    // Alive, but not ready: without an app registration nobody can sign
    // in or get a token, and the reason says what to set.
    let ready = client.get(admin, "/readyz").await;
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        ready.text()
    );
    assert!(ready.text().starts_with("not ready\n"), "{}", ready.text());
    assert!(
        ready
            .text()
            .contains("reason: no app registration: identity_provider.client_id is empty"),
        "{}",
        ready.text()
    );
    assert!(client
        .get(admin, "/metrics")
        .await
        .text()
        .contains("authswap_build_info"));
    assert_eq!(
        client.ews(http, "someone", "pw", SOAP).await.status,
        StatusCode::UNAUTHORIZED
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("db/authswap.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    signal(child.id().unwrap(), "INT").await;
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());

    // The shipped file plus the one setting it asks for is ready.
    let mut child = serve_shipped(&[(
        "AUTHSWAP_IDENTITY_PROVIDER__CLIENT_ID",
        "00000000-0000-0000-0000-000000000001",
    )]);
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = String::new();
    let (admin, _) = wait_for_serving(&mut lines, &mut log).await;
    let ready = client.get(admin, "/readyz").await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
    assert!(ready.text().starts_with("ready\n"), "{}", ready.text());
    signal(child.id().unwrap(), "INT").await;
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

fn add(env: &Env, name: &str, mailbox: &str) -> std::process::Output {
    env.cli(
        &[
            "identity",
            "add",
            name,
            "--mailbox",
            mailbox,
            "--password-stdin",
        ],
        Some("a-long-enough-password\n"),
    )
}

/// `identity add` keeps names to the documented character set (no `"`,
/// `\`, `{`, invisible characters; not `_unknown`), stores them in NFC,
/// refuses names that differ from an existing one only in case,
/// normalisation or invisible characters, and bounds mailboxes. `identity
/// list` copes with whatever an older store holds.
#[tokio::test]
async fn identity_names_are_restricted_and_list_copes_with_odd_stored_values() {
    let env = Env::start().await;
    for bad in [
        "q\"uote",
        "back\\slash",
        "{brace}",
        "a,b=c",
        "_unknown",
        "_UNKNOWN",
        "ali\u{200b}ce",
        "\u{feff}bob",
        "bob\u{202e}",
        "new\nline",
    ] {
        let out = add(&env, bad, "x@contoso.com");
        assert!(!out.status.success(), "{bad:?} accepted");
        let err = text(&out.stderr);
        assert!(err.starts_with("authswap: error: identity name"), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
    let long_mailbox = format!("{}@contoso.com", "a".repeat(250));
    let out = add(&env, "longmail", &long_mailbox);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--mailbox"));

    // Normalisation: the decomposed form of an existing name is the same name.
    let out = add(&env, "Ren\u{e9}", "rene@contoso.com");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = add(&env, "rene\u{301}", "other@contoso.com");
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("already exists"));

    // Written straight into the store, as an older version could have:
    // an invisible character, terminal escapes, a 100,000-character mailbox.
    let store = env.store().await;
    use authswap::store::Store;
    store
        .create(&authswap::store::NewIdentity::delegated(
            "alice\u{200b}",
            "alice@contoso.com",
            "$argon2id$x",
        ))
        .await
        .unwrap();
    store
        .create(&authswap::store::NewIdentity::delegated(
            "evil\u{1b}[2J",
            "evil@contoso.com",
            "$argon2id$x",
        ))
        .await
        .unwrap();
    let huge = format!("{}@contoso.com", "m".repeat(100_000));
    store
        .create(&authswap::store::NewIdentity::delegated(
            "huge",
            &huge,
            "$argon2id$x",
        ))
        .await
        .unwrap();
    let out = add(&env, "Alice", "alice2@contoso.com");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("already exists") && err.contains("invisible"),
        "{err}"
    );
    assert!(err.contains("alice\\u{200b}"), "shown escaped: {err}");

    let out = env.cli(&["identity", "list"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains(&huge), "the mailbox is shown whole");
    assert!(stdout.contains("evil\\u{1b}[2J"), "{stdout}");
    assert!(
        !stdout.contains('\u{1b}'),
        "no raw escape reaches the terminal"
    );
    let out = env.cli(&["identity", "list", "--json"], None);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 4);
}

/// Runs `authswap -c <config> <args>` to completion (20 s at most).
async fn run_bin(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    let child = bin()
        .arg("-c")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("authswap {args:?} did not exit"))
        .unwrap()
}

fn write_private(path: &std::path::Path, content: &[u8]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(content).unwrap();
}

/// A sealing key file that disappears while refresh tokens are stored is
/// not silently replaced by a new key (which could open none of them):
/// `serve` and `identity import` refuse with a message that says to
/// restore it, and no key file appears. Restoring it brings `serve` back.
#[tokio::test]
async fn a_missing_key_file_is_not_replaced_while_tokens_are_sealed() {
    let env = Env::start().await;
    env.add_linked("alice", "alice@contoso.com", "alice-pw-123")
        .await;
    let key_file = env.dir.path().join("data/authswap.key");
    let saved = std::fs::read(&key_file).unwrap();
    std::fs::remove_file(&key_file).unwrap();
    let config = env.write_config();

    let out = run_bin(&config, &["serve"]).await;
    assert!(!out.status.success(), "serve started without its key");
    let err = text(&out.stderr);
    assert!(err.contains("restore the key file"), "{err}");
    assert!(err.contains("1 identity (alice)"), "{err}");
    assert!(!key_file.exists(), "a new key file was created");

    let out = env.cli(
        &[
            "identity",
            "import",
            "alice",
            "--refresh-token-stdin",
            "--no-verify",
        ],
        Some("rt-imported\n"),
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("restore the key file"));
    assert!(!key_file.exists(), "a new key file was created");

    write_private(&key_file, &saved);
    let server = env.serve().await;
    let r = HttpClient::default()
        .ews(server.http_addr().unwrap(), "alice", "alice-pw-123", SOAP)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    server.shutdown(Duration::from_secs(5)).await;
}

/// A sealing key file that group or others may read stops `serve` and the
/// commands that use the key, unless `store.allow_insecure_key_file` is
/// set (then it is only a warning).
#[tokio::test]
async fn a_key_file_readable_by_others_is_refused_unless_allowed() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::start().await;
    env.add_linked("alice", "alice@contoso.com", "alice-pw-123")
        .await;
    let key_file = env.dir.path().join("data/authswap.key");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = env.write_config();

    let out = run_bin(&config, &["serve"]).await;
    assert!(!out.status.success(), "serve started");
    let err = text(&out.stderr);
    assert!(err.contains("readable by group or others"), "{err}");
    assert!(err.contains("chmod 600") && err.contains("allow_insecure_key_file"));
    let out = env.cli(
        &[
            "identity",
            "import",
            "alice",
            "--refresh-token-stdin",
            "--no-verify",
        ],
        Some("rt-imported\n"),
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("readable by group or others"));

    let mut child = bin()
        .arg("-c")
        .arg(&config)
        .args(["--log-format", "json", "serve"])
        .env("AUTHSWAP_STORE__ALLOW_INSECURE_KEY_FILE", "true")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = String::new();
    let (_, http) = wait_for_serving(&mut lines, &mut log).await;
    assert!(log.contains("readable by group or others"), "{log}");
    let r = HttpClient::default()
        .ews(http, "alice", "alice-pw-123", SOAP)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    signal(child.id().unwrap(), "TERM").await;
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

/// Cost settings outside their bounds stop `config check` (and so `serve`)
/// with an error naming the key; the test harness's cheap argon2 costs load
/// with a warning.
#[tokio::test]
async fn config_check_refuses_absurd_cost_settings() {
    let env = Env::start().await;
    let config = env.write_config();
    for (var, value, key) in [
        (
            "AUTHSWAP_AUTH__ARGON2_MEMORY_KIB",
            "104857600",
            "auth.argon2_memory_kib",
        ),
        (
            "AUTHSWAP_AUTH__ARGON2_ITERATIONS",
            "0",
            "auth.argon2_iterations",
        ),
        (
            "AUTHSWAP_HTTP__MAX_HEADER_BYTES",
            "1GiB",
            "http.max_header_bytes",
        ),
        (
            "AUTHSWAP_TOKENS__RELOAD_INTERVAL",
            "0s",
            "tokens.reload_interval",
        ),
    ] {
        let out = bin()
            .arg("-c")
            .arg(&config)
            .args(["config", "check"])
            .env(var, value)
            .output()
            .await
            .unwrap();
        assert!(!out.status.success(), "{var}={value} accepted");
        let err = text(&out.stderr);
        assert!(
            err.starts_with(&format!("authswap: error: {key}: must be")),
            "{err}"
        );
    }
    let out = bin()
        .arg("-c")
        .arg(&config)
        .args(["config", "check"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("warning: auth.argon2_memory_kib = 256"));
}

/// A password written into a URL of the configuration
/// (`https://user:password@host`) is never printed or logged. authswap
/// never uses one, and the HTTP client would log the URL's authority (at
/// debug level) and send it on, so such a URL is refused; the error, from
/// `config check` or `serve` (at trace level), shows it redacted.
#[tokio::test]
async fn passwords_in_configured_urls_are_never_printed() {
    let env = Env::start().await;
    let config = env.write_config();
    let idp_with_password = env
        .idp
        .base_url()
        .replacen("://", "://svc:Url-Password-7@", 1);
    for (var, value, key) in [
        (
            "AUTHSWAP_IDENTITY_PROVIDER__AUTHORITY",
            idp_with_password.as_str(),
            "identity_provider.authority",
        ),
        (
            "AUTHSWAP_HTTP__UPSTREAM",
            "https://svc:Url-Password-7@outlook.example",
            "http.upstream",
        ),
        (
            "AUTHSWAP_HTTP__UPSTREAM",
            "http://svc:Url-Password-7@outlook.example",
            "http.upstream",
        ),
    ] {
        for args in [
            &["config", "check"][..],
            &["--log-format", "json", "serve"][..],
        ] {
            let child = bin()
                .arg("-c")
                .arg(&config)
                .args(args)
                .env("AUTHSWAP_LOG", "trace")
                .env(var, value)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
                .await
                .expect("refused at once")
                .unwrap();
            assert!(!out.status.success(), "{args:?} with {var}={value}");
            let shown = format!("{}{}", text(&out.stdout), text(&out.stderr));
            assert!(!shown.contains("Url-Password-7"), "{shown}");
            assert!(
                shown.contains(&format!("authswap: error: {key}:")),
                "{shown}"
            );
            assert!(shown.contains("://<redacted>@"), "{shown}");
        }
    }
}

#[test]
fn completions_and_man_page_come_from_the_clap_definitions() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_authswap"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let bash = run(&["completions", "bash"]);
    assert!(bash.contains("complete -F _authswap"), "{bash}");
    for word in [
        "serve",
        "identity",
        "healthcheck",
        "completions",
        "import-csv",
    ] {
        assert!(bash.contains(word), "bash completion lacks {word}");
    }
    let zsh = run(&["completions", "zsh"]);
    assert!(zsh.starts_with("#compdef authswap"), "{zsh}");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_authswap"))
        .args(["completions", "cmd.exe"])
        .output()
        .unwrap();
    assert!(!bad.status.success());

    let man = run(&["man"]);
    assert!(man.contains(".TH authswap 1"), "{man}");
    assert!(man.contains(".SH NAME\nauthswap \\- "), "{man}");
    assert!(man.contains(".SH SUBCOMMANDS"), "{man}");
    assert!(man.contains("authswap\\-healthcheck"), "{man}");
    // Rendered by man(1) where it is installed (.ci/run installs man-db).
    let page = tempfile::Builder::new().suffix(".1").tempfile().unwrap();
    std::fs::write(page.path(), &man).unwrap();
    match std::process::Command::new("man")
        .arg("-l")
        .arg(page.path())
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "80")
        .output()
    {
        Ok(out) => {
            assert!(out.status.success(), "man -l: {}", text(&out.stderr));
            let shown = text(&out.stdout)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            assert!(shown.contains("NAME"), "{shown}");
            assert!(shown.contains("authswap - Sidecar"), "{shown}");
            assert!(shown.contains("SUBCOMMANDS"), "{shown}");
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("man(1) not installed: checked the roff text only")
        }
        Err(e) => panic!("man -l: {e}"),
    }
}

/// The Dockerfile's instructions with continuation lines joined and comment
/// lines dropped (as Docker reads them).
fn dockerfile_instructions() -> Vec<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in std::fs::read_to_string(path).unwrap().lines() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            // Docker drops the backslash and the line break.
            current.push_str(head);
            continue;
        }
        current.push_str(line);
        if !current.trim().is_empty() {
            out.push(current.trim().to_string());
        }
        current.clear();
    }
    out
}

fn cargo() -> std::process::Command {
    std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn host_triple() -> String {
    let out = std::process::Command::new("rustc")
        .arg("-vV")
        .output()
        .unwrap();
    text(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .to_string()
}

/// `cargo fetch --locked` reads the whole manifest (every target's source
/// file must exist, as for `cargo build`) and refuses a lock file that does
/// not match it, without compiling. (`cargo metadata --no-deps` and
/// `cargo read-manifest` accept a missing bench file, so they prove nothing.)
fn cargo_fetch_locked(dir: &std::path::Path) -> std::process::Output {
    cargo()
        .args(["fetch", "--locked", "--offline", "--target"])
        .arg(host_triple())
        .current_dir(dir)
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .unwrap()
}

#[test]
fn dockerfile_placeholders_satisfy_the_manifest() {
    let steps = dockerfile_instructions();
    let copy = steps
        .iter()
        .position(|s| s == "COPY Cargo.toml Cargo.lock ./")
        .expect("the dependency stage copies the manifest and the lock file");
    let placeholders = steps[copy + 1]
        .strip_prefix("RUN ")
        .expect("a RUN with the placeholder steps follows the COPY");
    assert!(
        !placeholders.contains("cargo"),
        "the placeholder RUN must not build: {placeholders}"
    );
    assert!(
        steps[copy + 2].starts_with("RUN cargo build --release --locked"),
        "the dependency build follows the placeholders: {}",
        steps[copy + 2]
    );

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    for f in ["Cargo.toml", "Cargo.lock"] {
        std::fs::copy(root.join(f), dir.path().join(f)).unwrap();
    }
    // Without the bench placeholders cargo refuses the manifest: the check
    // below can fail.
    std::fs::create_dir(dir.path().join("src")).unwrap();
    std::fs::write(dir.path().join("src/main.rs"), "fn main() {}\n").unwrap();
    std::fs::write(dir.path().join("src/lib.rs"), "").unwrap();
    let out = cargo_fetch_locked(dir.path());
    assert!(!out.status.success(), "cargo accepted missing benches");
    assert!(text(&out.stderr).contains("bench"), "{}", text(&out.stderr));

    // The Dockerfile's own steps, by the same shell as `RUN`.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(placeholders)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = cargo_fetch_locked(dir.path());
    assert!(
        out.status.success(),
        "cargo refuses the placeholder tree: {}",
        text(&out.stderr)
    );
}

fn parse_version(v: &str) -> (u64, u64, u64) {
    let mut parts = v.split('.').map(|p| p.parse::<u64>().unwrap());
    (
        parts.next().unwrap(),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

#[test]
fn rust_version_covers_every_locked_crate() {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Locked crates from a registry: not authswap itself (no source).
    let packages: Vec<&serde_json::Value> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| !p["source"].is_null())
        .collect();
    let ours = parse_version(env!("CARGO_PKG_RUST_VERSION"));
    let mut checked = 0;
    let mut too_new = Vec::new();
    for p in &packages {
        let Some(rv) = p["rust_version"].as_str() else {
            continue;
        };
        checked += 1;
        if parse_version(rv) > ours {
            too_new.push(format!("{} {} needs {rv}", p["name"], p["version"]));
        }
    }
    assert!(checked > 100, "only {checked} crates declare rust-version");
    assert!(
        too_new.is_empty(),
        "Cargo.toml says rust-version = {}, but: {too_new:?}",
        env!("CARGO_PKG_RUST_VERSION")
    );
    // The claim is tight: some locked crate needs exactly that version.
    assert!(
        packages
            .iter()
            .filter_map(|p| p["rust_version"].as_str())
            .any(|rv| parse_version(rv) == ours),
        "no locked crate needs {}: lower rust-version",
        env!("CARGO_PKG_RUST_VERSION")
    );
}

/// Reads JSON log lines until one whose message is `message`.
async fn wait_for_message(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
    log: &mut String,
    message: &str,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("log line")
            .unwrap()
            .expect("serve exited early");
        log.push_str(&line);
        log.push('\n');
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            if v["message"] == message {
                return v;
            }
        }
    }
    panic!("no {message:?} in the log:\n{log}");
}

#[tokio::test]
async fn sighup_reloads_the_configuration_and_never_kills_serve() {
    let env = Env::start().await;
    let password = "alice-pass-1234";
    env.add_linked("alice", "alice@contoso.com", password).await;
    let config = env.write_config();
    let mut child = bin()
        .arg("-c")
        .arg(&config)
        .args(["--log-format", "json", "serve"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = String::new();
    let (admin, http) = wait_for_serving(&mut lines, &mut log).await;
    let pid = child.id().unwrap();
    let client = HttpClient::default();

    // Unchanged: reloaded, still serving.
    signal(pid, "HUP").await;
    wait_for_message(&mut lines, &mut log, "configuration reloaded").await;
    assert_eq!(
        client.ews(http, "alice", password, SOAP).await.status,
        StatusCode::OK
    );

    // The HTTP front end moves.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let moved = env.config_toml().replace(
        "[http]\nlisten = \"127.0.0.1:0\"",
        &format!("[http]\nlisten = \"127.0.0.1:{port}\""),
    );
    std::fs::write(&config, &moved).unwrap();
    signal(pid, "HUP").await;
    let v = wait_for_message(
        &mut lines,
        &mut log,
        "serving with the reloaded configuration",
    )
    .await;
    let new_http: std::net::SocketAddr = v["http"].as_str().unwrap().parse().unwrap();
    assert_eq!(new_http.port(), port);
    assert_eq!(
        HttpClient::default()
            .ews(new_http, "alice", password, SOAP)
            .await
            .status,
        StatusCode::OK
    );

    // Broken: refused with the reason, the running one serves on.
    std::fs::write(
        &config,
        moved.replace("[tokens]", "[tokens]\nno_such_key = 1"),
    )
    .unwrap();
    signal(pid, "HUP").await;
    let v = wait_for_message(&mut lines, &mut log, "configuration reload refused").await;
    assert!(v["error"].as_str().unwrap().contains("no_such_key"), "{v}");
    assert_eq!(
        HttpClient::default()
            .ews(new_http, "alice", password, SOAP)
            .await
            .status,
        StatusCode::OK
    );
    let metrics = String::from_utf8_lossy(&client.get(admin, "/metrics").await.body).into_owned();
    assert!(
        metrics.contains("authswap_config_reloads_total{result=\"failure\"} 1"),
        "{metrics}"
    );
    assert!(child.try_wait().unwrap().is_none(), "serve exited:\n{log}");

    signal(pid, "TERM").await;
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "exit status {status:?}\n{log}");
}

/// Runs `authswap doctor` with `envs`; returns (success, stdout lines).
async fn doctor(config: &std::path::Path, envs: &[(&str, String)]) -> (bool, String, String) {
    let mut cmd = bin();
    cmd.arg("-c").arg(config).arg("doctor");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("doctor finishes")
        .unwrap();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// The line of `check` in a doctor report.
fn line_of<'a>(report: &'a str, check: &str) -> &'a str {
    report
        .lines()
        .find(|l| l[6.min(l.len())..].starts_with(&format!("{check}:")))
        .unwrap_or_else(|| panic!("no {check} line in:\n{report}"))
}

#[tokio::test]
async fn doctor_passes_a_healthy_setup_and_names_each_broken_part() {
    use authswap::store::Store as _;
    use support::mail::{
        FakeImap, FakePop3, FakeSmtp, ImapOptions, Pop3Options, SmtpOptions, TlsMode,
    };
    let env = Env::start().await;
    env.add_linked("alice", "alice@contoso.com", "alice-pass-1234")
        .await;
    env.add_linked("bob", "bob@contoso.com", "bob-pass-12345")
        .await;
    let smtp = FakeSmtp::start(env.idp.validator(), SmtpOptions::default()).await;
    let imap = FakeImap::start(
        env.idp.validator(),
        ImapOptions {
            tls: TlsMode::StartTls,
            ..ImapOptions::default()
        },
    )
    .await;
    let pop3 = FakePop3::start(
        env.idp.validator(),
        Pop3Options {
            tls: TlsMode::StartTls,
            ..Pop3Options::default()
        },
    )
    .await;
    let config = env.write_config();
    let mail = vec![
        ("AUTHSWAP_SMTP__ENABLED", "true".to_owned()),
        (
            "AUTHSWAP_SMTP__UPSTREAM",
            format!("localhost:{}", smtp.port()),
        ),
        ("AUTHSWAP_IMAP__ENABLED", "true".to_owned()),
        (
            "AUTHSWAP_IMAP__UPSTREAM",
            format!("localhost:{}", imap.port()),
        ),
        ("AUTHSWAP_IMAP__UPSTREAM_TLS", "starttls".to_owned()),
        ("AUTHSWAP_POP3__ENABLED", "true".to_owned()),
        (
            "AUTHSWAP_POP3__UPSTREAM",
            format!("localhost:{}", pop3.port()),
        ),
        ("AUTHSWAP_POP3__UPSTREAM_TLS", "starttls".to_owned()),
    ];

    // Healthy: every check ok (warnings allowed), exit 0.
    let (ok, report, err) = doctor(&config, &mail).await;
    assert!(ok, "{report}\n{err}");
    assert!(!report.contains("fail "), "{report}");
    for check in [
        "config",
        "store",
        "key",
        "identity platform (default)",
        "upstream http",
        "upstream smtp",
        "upstream imap",
        "upstream pop3",
        "identities",
    ] {
        let line = line_of(&report, check);
        assert!(line.starts_with("ok "), "{line}\n{report}");
    }
    assert!(
        line_of(&report, "identities").contains("2 of 2"),
        "{report}"
    );
    let out = bin()
        .arg("-c")
        .arg(&config)
        .args(["doctor", "--json"])
        .envs(mail.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let checks: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(checks.len() >= 9, "{checks:?}");
    assert!(checks
        .iter()
        .any(|c| c["check"] == "upstream smtp" && c["level"] == "ok"));

    // Broken: each part named on its own line, exit 1.
    use std::os::unix::fs::PermissionsExt;
    let key = env.dir.path().join("data/authswap.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let store = env.store().await;
    let bob = store
        .list()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.name == "bob")
        .unwrap();
    store
        .record_failure(
            bob.id,
            true,
            "AADSTS50173: the grant was revoked",
            authswap::store::now_unix(),
        )
        .await
        .unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut broken = mail.clone();
    broken.push((
        "AUTHSWAP_IDENTITY_PROVIDER__CLIENT_ID",
        "00000000-0000-0000-0000-00000000dead".to_owned(),
    ));
    broken.push(("AUTHSWAP_SMTP__UPSTREAM", format!("127.0.0.1:{closed}")));
    let (ok, report, err) = doctor(&config, &broken).await;
    assert!(!ok, "{report}");
    assert!(err.contains("failed"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let line = line_of(&report, "key");
    assert!(
        line.starts_with("fail") && line.contains("chmod 600"),
        "{line}"
    );
    let line = line_of(&report, "identity platform (default)");
    assert!(
        line.starts_with("fail") && line.contains("AADSTS700016"),
        "{line}"
    );
    let line = line_of(&report, "upstream smtp");
    assert!(
        line.starts_with("fail") && line.contains("cannot connect"),
        "{line}"
    );
    let line = line_of(&report, "identity bob");
    assert!(
        line.starts_with("fail") && line.contains("authswap invite bob"),
        "{line}"
    );
    assert!(
        line_of(&report, "upstream imap").starts_with("ok "),
        "{report}"
    );

    // A CA that did not sign the upstreams' certificates.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let other = tempfile::tempdir().unwrap();
    let wrong_ca = support::certs::TestPki::new().write_ca_file(other.path());
    let mut wrong = mail.clone();
    wrong.push((
        "AUTHSWAP_TLS__EXTRA_CA_FILE",
        wrong_ca.display().to_string(),
    ));
    let (ok, report, _) = doctor(&config, &wrong).await;
    assert!(!ok, "{report}");
    for check in ["upstream http", "upstream smtp", "upstream pop3"] {
        let line = line_of(&report, check);
        assert!(
            line.starts_with("fail")
                && line.contains("not trusted")
                && line.contains("extra_ca_file"),
            "{line}"
        );
    }
    assert!(
        line_of(&report, "identity platform (default)").starts_with("fail"),
        "{report}"
    );
    assert!(line_of(&report, "key").starts_with("ok "), "{report}");
}

#[tokio::test]
async fn usage_errors_log_filters_list_exit_codes_and_https_healthchecks() {
    let env = Env::start().await;
    let config = env.write_config();
    let run = |args: Vec<String>, envs: Vec<(&'static str, String)>| {
        let config = config.clone();
        async move {
            let mut cmd = bin();
            cmd.arg("-c").arg(&config).args(&args);
            for (k, v) in envs {
                cmd.env(k, v);
            }
            tokio::time::timeout(Duration::from_secs(30), cmd.output())
                .await
                .expect("finishes")
                .unwrap()
        }
    };
    let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();

    // Usage errors: one line and a hint, exit 2.
    for (bad, hint) in [
        (
            &["identity", "list", "--bogus"][..],
            "authswap identity list --help",
        ),
        (&["identity", "lst"][..], "authswap identity --help"),
        (&["identity", "list", "--status", "nope"][..], "--help"),
    ] {
        let out = run(args(bad), vec![]).await;
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        let err = text(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.starts_with("authswap: error: "), "{err}");
        assert!(err.contains(hint), "{err}");
    }
    let err = text(
        &run(args(&["identity", "list", "--status", "nope"]), vec![])
            .await
            .stderr,
    );
    assert!(err.contains("possible values: all, ok, error"), "{err}");

    // An invalid AUTHSWAP_LOG is said, not ignored.
    let out = run(
        args(&["config", "check"]),
        vec![("AUTHSWAP_LOG", "authswap=bogus".to_owned())],
    )
    .await;
    assert!(out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("AUTHSWAP_LOG=authswap=bogus is not a valid log filter"),
        "{err}"
    );
    let out = run(
        args(&["config", "check"]),
        vec![("AUTHSWAP_LOG", "authswap=debug,warn".to_owned())],
    )
    .await;
    assert!(!text(&out.stderr).contains("not a valid log filter"));

    // `identity list --status error`: exit 1 while it lists anyone.
    env.add_linked("alice", "alice@contoso.com", "alice-pass-1234")
        .await;
    let out = run(args(&["identity", "list", "--status", "error"]), vec![]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stdout).contains("alice"));
    let out = env.cli(
        &[
            "identity",
            "add",
            "carol",
            "--mailbox",
            "carol@contoso.com",
            "--password-stdin",
        ],
        Some("carol-pass-1234\n"),
    );
    assert!(out.status.success());
    for json in [false, true] {
        let mut a = args(&["identity", "list", "--status", "error"]);
        if json {
            a.push("--json".into());
        }
        let out = run(a, vec![]).await;
        assert_eq!(out.status.code(), Some(1));
        assert!(text(&out.stdout).contains("carol"));
        assert!(!text(&out.stdout).contains("alice"));
        assert_eq!(
            text(&out.stderr).trim_end(),
            "authswap: error: 1 identity needs attention"
        );
    }
    let out = run(args(&["identity", "list"]), vec![]).await;
    assert!(out.status.success(), "other filters keep exit 0");

    // healthcheck over TLS: verified against tls.extra_ca_file.
    let (cert, key) = support::certs::pki().write_server_cert_files(env.dir.path());
    let server = env
        .serve_with(|c| {
            c.admin.tls_cert_file = Some(cert);
            c.admin.tls_key_file = Some(key);
        })
        .await;
    let admin = server.admin_addr();
    let https = format!("https://localhost:{}/healthz", admin.port());
    let out = run(args(&["healthcheck", "--url", &https]), vec![]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Another CA: refused, saying why.
    let other = tempfile::tempdir().unwrap();
    let wrong_ca = support::certs::TestPki::new().write_ca_file(other.path());
    let out = run(
        args(&["healthcheck", "--url", &https]),
        vec![(
            "AUTHSWAP_TLS__EXTRA_CA_FILE",
            wrong_ca.display().to_string(),
        )],
    )
    .await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("certificate"), "{err}");
    // An https:// URL at a plain-HTTP listener is not healthy.
    let http = server.http_addr().unwrap();
    let out = run(
        args(&[
            "healthcheck",
            "--url",
            &format!("https://127.0.0.1:{}/healthz", http.port()),
        ]),
        vec![],
    )
    .await;
    assert!(!out.status.success(), "{}", text(&out.stdout));
    // Plain http:// at the TLS listener fails too; other schemes are refused.
    let out = run(
        args(&["healthcheck", "--url", &format!("http://{admin}/healthz")]),
        vec![],
    )
    .await;
    assert!(!out.status.success());
    let out = run(
        args(&["healthcheck", "--url", "ftp://127.0.0.1/healthz"]),
        vec![],
    )
    .await;
    assert!(text(&out.stderr).contains("only http:// and https://"));
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn doctor_checks_a_postgresql_store() {
    let Some(url) = support::pg::database().await else {
        return;
    };
    let env = Env::start().await;
    env.use_store_url(&url);
    env.add_linked("alice", "alice@contoso.com", "alice-pass-1234")
        .await;
    let config = env.write_config();
    let (ok, report, err) = doctor(&config, &[]).await;
    assert!(ok, "{report}\n{err}");
    let line = line_of(&report, "store");
    assert!(
        line.starts_with("ok ") && line.contains("PostgreSQL") && line.contains("up to date"),
        "{line}"
    );
    assert!(
        line_of(&report, "identities").contains("1 of 1"),
        "{report}"
    );
    // Unreachable: named, and the identity checks that need it are skipped.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (ok, report, _) = doctor(
        &config,
        &[
            (
                "AUTHSWAP_STORE__URL",
                format!("postgres://authswap@127.0.0.1:{closed}/authswap"),
            ),
            ("AUTHSWAP_STORE__CONNECT_TIMEOUT", "2s".to_owned()),
        ],
    )
    .await;
    assert!(!ok, "{report}");
    let line = line_of(&report, "store");
    assert!(
        line.starts_with("fail") && line.contains("PostgreSQL"),
        "{line}"
    );
    assert!(!report.contains("identities:"), "{report}");
}

/// The JSON log lines of `log` that have `message`.
fn lines_with<'l>(log: &'l [serde_json::Value], message: &str) -> Vec<&'l serde_json::Value> {
    log.iter().filter(|v| v["message"] == message).collect()
}

#[tokio::test]
async fn default_level_logs_the_audit_trail_and_the_access_log() {
    let env = Env::start().await;
    env.add_linked("alice", "alice@contoso.com", "alice-pass-do-not-log")
        .await;
    env.add_linked("bob", "bob@contoso.com", "bob-pass-do-not-log")
        .await;
    // An SMTP upstream that is not there: the capability probe fails.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = env.write_config();
    let mut child = bin()
        .arg("-c")
        .arg(&config)
        .args(["--log-format", "json", "serve"])
        .env_remove("AUTHSWAP_LOG")
        .env_remove("RUST_LOG")
        .env("AUTHSWAP_RUNTIME__ACCESS_LOG", "true")
        .env("AUTHSWAP_AUTH__MAX_FAILURES", "2")
        .env("AUTHSWAP_SMTP__ENABLED", "true")
        .env("AUTHSWAP_SMTP__UPSTREAM", format!("127.0.0.1:{closed}"))
        .env("AUTHSWAP_SMTP__UPSTREAM_TLS", "implicit")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut log = String::new();
    let serving = wait_for_serving_json(&mut lines, &mut log).await;
    let http: std::net::SocketAddr = serving["http"].as_str().unwrap().parse().unwrap();
    let smtp: std::net::SocketAddr = serving["smtp"].as_str().unwrap().parse().unwrap();
    let drain = tokio::spawn(async move {
        let mut rest = String::new();
        let mut inner = lines.into_inner();
        inner.read_to_string(&mut rest).await.unwrap();
        rest
    });

    let client = HttpClient::default();
    let r = client
        .ews(http, "alice", "alice-pass-do-not-log", SOAP)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    for _ in 0..2 {
        let r = client.ews(http, "bob", "wrong-pass-do-not-log", SOAP).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    let r = client
        .ews(http, "mallory", "mallory-pass-do-not-log", SOAP)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // An SMTP session that logs in against the missing upstream, and one
    // in the middle of AUTH LOGIN when the server stops.
    let mut failed = support::mailrig::Raw::connect(smtp).await;
    failed.line().await;
    failed.send(b"EHLO x\r\n").await;
    failed.reply().await;
    let plain = support::mailrig::b64(b"\0alice\0alice-pass-do-not-log");
    failed
        .send(format!("AUTH PLAIN {plain}\r\n").as_bytes())
        .await;
    let r = failed.reply().await;
    assert!(r.starts_with("421 4.4.2"), "{r}");
    let mut waiting = support::mailrig::Raw::connect(smtp).await;
    waiting.line().await;
    waiting.send(b"EHLO y\r\nAUTH LOGIN\r\n").await;
    waiting.reply().await;
    let r = waiting.line().await;
    assert!(r.starts_with("334 "), "{r}");

    signal(child.id().unwrap(), "TERM").await;
    // Not logged in: told that the server goes away.
    let r = waiting.line().await;
    assert!(r.starts_with("421 4.3.2"), "{r}");
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    log.push_str(&drain.await.unwrap());
    for secret in [
        "alice-pass-do-not-log",
        "wrong-pass-do-not-log",
        "mallory-pass-do-not-log",
        plain.as_str(),
    ] {
        assert!(!log.contains(secret), "{secret} leaked:\n{log}");
    }
    let entries: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();

    // Failed logins and the lockout, at the default level.
    let failed_logins = lines_with(&entries, "login failed: wrong local password");
    assert_eq!(failed_logins.len(), 2, "{log}");
    assert_eq!(failed_logins[0]["identity"], "bob");
    assert_eq!(failed_logins[0]["protocol"], "http");
    let unknown = lines_with(&entries, "login failed: no identity of that name");
    assert_eq!(unknown.len(), 1, "{log}");
    assert_eq!(unknown[0]["name"], "mallory");
    let lockout = lines_with(
        &entries,
        "failed logins for this identity: further checks are delayed",
    );
    assert_eq!(lockout.len(), 1, "{log}");
    assert_eq!(lockout[0]["identity"], "bob");

    // Refreshes say which scopes.
    let refreshed = lines_with(&entries, "refreshed access token");
    assert!(!refreshed.is_empty(), "{log}");
    assert!(
        refreshed[0]["scopes"]
            .as_str()
            .is_some_and(|s| s.contains("EWS.AccessAsUser.All")),
        "{log}"
    );

    // The unreachable SMTP upstream during the capability probe.
    let probe = lines_with(
        &entries,
        "cannot learn the SMTP upstream's extensions; advertising a safe set",
    );
    assert!(!probe.is_empty(), "{log}");

    // The access log: one line per HTTP request and mail session.
    let access = lines_with(&entries, "access");
    let http_lines: Vec<_> = access.iter().filter(|v| v["protocol"] == "http").collect();
    assert_eq!(http_lines.len(), 4, "{log}");
    assert_eq!(http_lines[0]["identity"], "alice");
    assert_eq!(http_lines[0]["outcome"], "forwarded");
    assert_eq!(http_lines[0]["upstream_status"], 200);
    assert!(http_lines[0]["duration_ms"].as_f64().is_some());
    assert_eq!(http_lines[1]["identity"], "bob");
    assert_eq!(http_lines[1]["outcome"], "unauthorized");
    assert!(http_lines[1].get("upstream_status").is_none());
    assert_eq!(http_lines[3]["identity"], "-");
    let smtp_lines: Vec<_> = access.iter().filter(|v| v["protocol"] == "smtp").collect();
    assert_eq!(smtp_lines.len(), 2, "{log}");
    let outcomes: Vec<_> = smtp_lines.iter().map(|v| v["outcome"].clone()).collect();
    assert!(outcomes.contains(&"upstream_error".into()), "{log}");
    assert!(outcomes.contains(&"no_login".into()), "{log}");
}
