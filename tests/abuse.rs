//! Regression tests for the findings of the security review (issue 11,
//! section 3): faults of the machine (a full disk) and abuse by a hostile
//! local process or a hostile upstream. Each test failed on the code the
//! review was made against.

mod support;

use authswap::secret::Secret;
use authswap::store::{Sealer, Status, Store};
use http::StatusCode;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::h1::{H1Fault, RawH1Upstream};
use support::harness::{basic, sample, Env, HttpClient, SOAP};
use support::raw::{field, status, Raw};

const GRACE: Duration = Duration::from_secs(5);
const ALICE: &str = "alice@contoso.com";

/// A small tmpfs mounted for one test (the tests run as root, as `.ci/run`
/// does), unmounted when dropped.
struct SmallFs {
    dir: PathBuf,
}

impl SmallFs {
    fn mount(dir: &Path, size: &str) -> SmallFs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs and needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallFs {
            dir: dir.to_owned(),
        }
    }

    /// Writes a file until the file system is full; returns its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).and_then(|_| f.sync_all()).is_ok() {}
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[tokio::test]
async fn a_full_disk_fails_refreshes_only_while_it_is_full_and_loses_no_token() {
    let env = Env::start().await;
    // The store (database and key file) lives on a 2 MiB file system.
    let fs = SmallFs::mount(&env.dir.path().join("data"), "2m");
    // The platform retires a refresh token when it rotates it: a rotated
    // token that authswap lost would leave the identity unusable.
    env.idp.set_revoke_on_rotation(true);
    env.add_linked("alice", ALICE, "pw-alice-123").await;
    let server = env.serve().await;
    let addr = server.http_addr().unwrap();
    let client = HttpClient::default();
    let ews = |c: &HttpClient| {
        let c = c.clone();
        async move { c.ews(addr, "alice", "pw-alice-123", SOAP).await }
    };
    assert_eq!(ews(&client).await.status, StatusCode::OK);

    // Disk full, then the access token is revoked: the refresh works at
    // the platform, but the rotated token cannot be committed, so its
    // access token is not used.
    let filler = fs.fill();
    env.idp.revoke_user_access_tokens(ALICE);
    let refreshes = env.idp.successful_refreshes();
    let r = ews(&client).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert!(
        r.text().contains("cannot use its store"),
        "the answer says whose failure it is: {}",
        r.text()
    );
    assert!(
        env.idp.successful_refreshes() > refreshes,
        "the platform was asked (and rotated the token)"
    );

    // Space again: refreshes work without a restart, and the token the
    // platform rotated while the disk was full is the one in the store.
    std::fs::remove_file(&filler).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let r = ews(&client).await;
        if r.status == StatusCode::OK {
            break;
        }
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
        assert!(
            tokio::time::Instant::now() < deadline,
            "refreshes still fail after the disk was freed: {}",
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And again, for a refresh that starts from a clean state.
    env.idp.revoke_user_access_tokens(ALICE);
    assert_eq!(ews(&client).await.status, StatusCode::OK);

    let store = env.store().await;
    let rec = store.get("alice").await.unwrap().unwrap();
    assert_eq!(rec.status, Status::Linked, "{:?}", rec.last_error);
    let (sealed, _) = store.refresh_token(rec.id).await.unwrap().unwrap();
    let sealer = Sealer::read(&env.config().store)
        .unwrap()
        .expect("key file");
    let stored: Secret = sealer.open(rec.id, &sealed).unwrap();
    assert!(
        env.idp.is_refresh_token_valid(stored.expose()).is_some(),
        "the stored refresh token is the platform's newest"
    );
    server.shutdown(GRACE).await;
    drop(store);
}

/// authswap (alice linked, then `tweak`) in front of a raw HTTP/1.1
/// upstream that tests can script byte for byte.
async fn raw_rig(
    tweak: impl FnOnce(&mut authswap::config::Config),
) -> (Env, RawH1Upstream, authswap::server::Server) {
    let env = Env::start_http1().await;
    let up = RawH1Upstream::start(H1Fault::None).await;
    env.add_linked("alice", ALICE, "pw-alice-123").await;
    let url = up.url();
    let server = env
        .serve_with(move |c| {
            c.http.upstream = url;
            tweak(c);
        })
        .await;
    (env, up, server)
}

fn get(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\r\n",
        basic("alice", "pw-alice-123")
    )
}

fn open_http(metrics: &str) -> f64 {
    sample(metrics, "authswap_open_connections{protocol=\"http\"}").unwrap_or(0.0)
}

#[tokio::test]
async fn a_stalled_or_misframed_upstream_body_is_cut_and_shutdown_ends_every_connection() {
    let (_env, up, server) =
        raw_rig(|c| c.http.body_idle_timeout = Duration::from_millis(700)).await;
    let addr = server.http_addr().unwrap();

    // The upstream stops in the middle of a chunked body: the client gets
    // what came, then the connection is cut once the body idled too long.
    up.script(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        false,
    );
    let mut c = Raw::connect(addr).await;
    c.send(&get("/stall")).await;
    let started = std::time::Instant::now();
    let rest = c.rest().await;
    assert!(rest.starts_with("HTTP/1.1 200 OK\r\n"), "{rest}");
    assert!(
        rest.ends_with("5\r\nhello\r\n"),
        "cut, not completed: {rest}"
    );
    assert!(started.elapsed() >= Duration::from_millis(600));

    // A trailer that ends in a bare LF never ends the body by the rules:
    // the relay refuses it instead of waiting for an end.
    up.script(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nx-sum: 1\n\r\n",
        false,
    );
    let mut c = Raw::connect(addr).await;
    c.send(&get("/bare-lf")).await;
    let rest = c.rest().await;
    assert!(!rest.ends_with("\r\n\r\n"), "{rest}");

    // A Connection field naming a framing field: the client's copy would
    // lose what the relay frames by. 502.
    up.script(
        "HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 3\r\n\r\nabc",
        false,
    );
    let mut c = Raw::connect(addr).await;
    let (head, _) = c.response_to(&get("/connection-names-length")).await;
    assert_eq!(status(&head), 502, "{head}");
    c.close().await;
    // HTTP/1.0 with a transfer coding: 502 too.
    up.script(
        "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        true,
    );
    let mut c = Raw::connect(addr).await;
    let (head, _) = c.response_to(&get("/http10-chunked")).await;
    assert_eq!(status(&head), 502, "{head}");
    c.close().await;

    let admin = server.admin_addr();
    let client = HttpClient::default();
    let (m, gone) = client
        .metrics_until(admin, Duration::from_secs(5), |m| open_http(m) == 0.0)
        .await;
    assert!(gone, "connections still counted open: {m}");
    server.shutdown(GRACE).await;

    // With a long idle limit, a stalled relay still ends with the server.
    let (_env, up, server) = raw_rig(|c| c.http.body_idle_timeout = Duration::from_secs(600)).await;
    up.script(
        "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial",
        false,
    );
    let mut c = Raw::connect(server.http_addr().unwrap()).await;
    c.send(&get("/stall")).await;
    c.until("partial").await;
    let started = std::time::Instant::now();
    tokio::time::timeout(
        Duration::from_secs(10),
        server.shutdown(Duration::from_secs(1)),
    )
    .await
    .expect("shutdown ends every connection within its grace period");
    assert!(started.elapsed() < Duration::from_secs(5));
    let rest = c.rest().await;
    assert!(!rest.contains("HTTP/1.1"), "{rest}");
}

#[tokio::test]
async fn a_body_trickling_in_gets_408_and_replay_buffers_are_bounded_in_total() {
    let (_env, up, server) = raw_rig(|c| {
        c.http.header_read_timeout = Duration::from_millis(1500);
        c.http.min_body_rate = authswap::config::ByteSize(1024);
        c.http.replay_buffer_limit = authswap::config::ByteSize(1024 * 1024);
        c.http.replay_buffer_total = authswap::config::ByteSize(64 * 1024);
    })
    .await;
    let addr = server.http_addr().unwrap();
    let auth = basic("alice", "pw-alice-123");

    // One byte every 200 ms used to re-arm the body timer forever; now
    // the body must keep 1 KiB/s after a 1.5 s grace.
    let mut slow = Raw::connect(addr).await;
    slow.send(&format!(
        "POST /slow HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 60000\r\n\r\n"
    ))
    .await;
    let started = std::time::Instant::now();
    let trickle = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        for _ in 0..100 {
            if slow.stream.write_all(b"x").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        slow
    });

    // Meanwhile the slow body holds 60000 of the 65536 bytes of replay
    // buffer: a 10000-byte body does not fit, so it streams (no replay):
    // a refused token gets 503 and "send it again", not a replay.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let admin = server.admin_addr();
    let client = HttpClient::default();
    let (m, held) = client
        .metrics_until(admin, Duration::from_secs(5), |m| {
            sample(m, "authswap_http_replay_buffer_bytes") == Some(60000.0)
        })
        .await;
    assert!(held, "{m}");
    up.script(
        "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\nContent-Length: 0\r\n\r\n",
        false,
    );
    let mut c = Raw::connect(addr).await;
    let body = "y".repeat(10000);
    let (head, _) = c
        .response_to(&format!(
            "POST /fits-no-more HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 10000\r\n\r\n{body}"
        ))
        .await;
    assert_eq!(status(&head), 503, "{head}");
    assert_eq!(field(&head, "retry-after").as_deref(), Some("1"));
    assert_eq!(
        up.requests()
            .iter()
            .filter(|r| r.target == "/fits-no-more")
            .count(),
        1,
        "streamed once, not replayed"
    );

    let mut slow = trickle.await.unwrap();
    let (head, _) = slow.response().await;
    assert_eq!(status(&head), 408, "{head}");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "cut after {took:?}, for a body that would take 60000 x 200 ms"
    );
    let (m, released) = client
        .metrics_until(admin, Duration::from_secs(5), |m| {
            sample(m, "authswap_http_replay_buffer_bytes") == Some(0.0)
        })
        .await;
    assert!(released, "{m}");
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn guesses_delay_checks_but_never_lock_out_the_right_password_or_reveal_names() {
    let env = Env::start().await;
    env.add_linked("alice", ALICE, "pw-alice-123").await;
    let server = env
        .serve_with(|c| {
            c.auth.lockout = Duration::from_millis(100);
            c.auth.max_lockout = Duration::from_millis(400);
        })
        .await;
    let addr = server.http_addr().unwrap();
    let client = HttpClient::default();
    // Twelve wrong guesses for alice (the review's case), and as many for a
    // name that does not exist.
    let mut answers = Vec::new();
    for name in ["alice", "nobody"] {
        for i in 0..12 {
            let r = client.ews(addr, name, &format!("guess-{i}"), SOAP).await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED);
            answers.push((r.text(), r.header("www-authenticate")));
        }
    }
    assert!(
        answers.windows(2).all(|w| w[0] == w[1]),
        "the same answers for a known and an unknown name: {answers:?}"
    );
    // alice's own client, with the right password and nothing cached: in,
    // after a delay, instead of `401 Retry-After`.
    let r = client.ews(addr, "alice", "pw-alice-123", SOAP).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    let m = client.get(server.admin_addr(), "/metrics").await.text();
    for scope in ["identity", "unknown_name"] {
        assert_eq!(
            sample(
                &m,
                &format!("authswap_auth_lockouts_total{{scope=\"{scope}\"}}")
            ),
            Some(1.0),
            "{scope}"
        );
    }
    // argon2 ran for every guess, known name or not: 24 rejected, 1 verified.
    assert_eq!(
        sample(&m, "authswap_credential_checks_total{result=\"rejected\"}"),
        Some(24.0)
    );
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn mail_clients_are_told_when_the_server_shuts_down_or_they_never_log_in() {
    use support::mail::{ImapOptions, Pop3Options, SmtpOptions};
    use support::mailrig::{b64, start_with, Raw as Line};
    let m = start_with(
        SmtpOptions::default(),
        ImapOptions::default(),
        Pop3Options::default(),
        |c| {
            c.smtp.login_timeout = Duration::from_millis(1500);
            c.smtp.idle_timeout = Duration::from_secs(10);
        },
    )
    .await;

    // A client that keeps talking but never logs in loses its slot after
    // login_timeout (it used to reset the 5-minute idle timer each time).
    let mut busy = Line::connect(m.server.smtp_addr().unwrap()).await;
    busy.line().await;
    let started = std::time::Instant::now();
    loop {
        busy.send(b"NOOP\r\n").await;
        let r = busy.reply().await;
        if r.starts_with("421 4.4.2") {
            break;
        }
        assert!(r.starts_with("250"), "{r}");
        assert!(started.elapsed() < Duration::from_secs(5), "never cut");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(busy.closed().await);

    // Sessions not logged in, and one in the middle of DATA.
    let mut smtp = Line::connect(m.server.smtp_addr().unwrap()).await;
    smtp.line().await;
    let mut imap = Line::connect(m.server.imap_addr().unwrap()).await;
    imap.line().await;
    let mut pop3 = Line::connect(m.server.pop3_addr().unwrap()).await;
    pop3.line().await;
    let mut data = Line::connect(m.server.smtp_addr().unwrap()).await;
    data.line().await;
    data.send(b"EHLO scanner\r\n").await;
    data.reply().await;
    data.send(format!("AUTH PLAIN {}\r\n", b64(b"\0alice\0alice-pw-123")).as_bytes())
        .await;
    assert!(data.reply().await.starts_with("235"));
    data.send(b"MAIL FROM:<alice@contoso.com>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
        .await;
    assert!(data.reply().await.starts_with("250"));
    assert!(data.reply().await.starts_with("250"));
    assert!(data.reply().await.starts_with("354"));
    data.send(b"Subject: half a message\r\n\r\nfirst line\r\n")
        .await;

    let server = m.server;
    let stopping = tokio::spawn(server.shutdown(Duration::from_secs(10)));
    let r = smtp.reply().await;
    assert!(r.starts_with("421 4.3.2"), "{r}");
    assert!(smtp.closed().await);
    let r = imap.line().await;
    assert!(r.starts_with("* BYE"), "{r}");
    assert!(imap.closed().await);
    let r = pop3.line().await;
    assert!(r.starts_with("-ERR"), "{r}");
    assert!(pop3.closed().await);
    // The session in DATA gets a moment, then the same 421 (temporary:
    // the sender queues the message and sends it again later).
    let r = data.reply().await;
    assert!(r.starts_with("421 4.3.2"), "{r}");
    assert!(data.closed().await);
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("shut down in time")
        .unwrap();
    assert!(
        m.smtp.messages().is_empty(),
        "the half message was not delivered"
    );
}

#[tokio::test]
async fn idle_connections_that_prove_nothing_cannot_lock_clients_out() {
    use lettre::transport::smtp::authentication::Mechanism;
    use lettre::AsyncTransport;
    use support::mail::{ImapOptions, Pop3Options, SmtpOptions};
    use support::mailrig::{lettre_mailer, message, start_with};
    let m = start_with(
        SmtpOptions::default(),
        ImapOptions::default(),
        Pop3Options::default(),
        |c| {
            c.http.max_connections = 20;
            c.http.header_read_timeout = Duration::from_secs(30);
            c.http.login_timeout = Duration::from_secs(30);
            c.smtp.max_connections = 10;
            c.smtp.idle_timeout = Duration::from_secs(30);
        },
    )
    .await;
    let http = m.server.http_addr().unwrap();
    let client = HttpClient::default();
    // A client that proved its credentials keeps its connection.
    let mut kept = Raw::connect(http).await;
    let get = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\r\n",
            basic("alice", "alice-pw-123")
        )
    };
    let (head, _) = kept.response_to(&get("/first")).await;
    assert_eq!(status(&head), 200, "{head}");

    // More idle connections than the listener has slots, never a byte.
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(tokio::net::TcpStream::connect(http).await.unwrap());
    }
    for _ in 0..15 {
        idle.push(
            tokio::net::TcpStream::connect(m.server.smtp_addr().unwrap())
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // New clients get in at once: the oldest idle connections make room.
    let started = std::time::Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(3),
        client.ews(http, "alice", "alice-pw-123", SOAP),
    )
    .await
    .expect("a new HTTP client is served without waiting for idle ones to time out");
    assert_eq!(r.status, StatusCode::OK);
    tokio::time::timeout(
        Duration::from_secs(5),
        lettre_mailer(
            m.server.smtp_addr().unwrap(),
            "alice",
            "alice-pw-123",
            Mechanism::Plain,
        )
        .send(message("through a full listener")),
    )
    .await
    .expect("a new SMTP client is served without waiting")
    .expect("sent");
    assert!(started.elapsed() < Duration::from_secs(5));
    // And the proved connection was not the one given away.
    let (head, _) = kept.response_to(&get("/second")).await;
    assert_eq!(status(&head), 200, "{head}");
    drop(idle);
    m.server.shutdown(GRACE).await;
}

#[tokio::test]
async fn an_http_connection_that_proves_nothing_is_closed_after_the_login_timeout() {
    let (_env, _up, server) = raw_rig(|c| {
        c.http.login_timeout = Duration::from_millis(600);
        c.http.header_read_timeout = Duration::from_secs(30);
    })
    .await;
    let addr = server.http_addr().unwrap();
    let mut guesser = Raw::connect(addr).await;
    let mut proved = Raw::connect(addr).await;
    let (head, _) = guesser
        .response_to(&format!(
            "GET / HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\r\n",
            basic("alice", "wrong")
        ))
        .await;
    assert_eq!(status(&head), 401);
    let (head, _) = proved.response_to(&get("/ok")).await;
    assert_eq!(status(&head), 200);
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(guesser.rest().await, "", "closed without another word");
    let (head, _) = proved.response_to(&get("/still")).await;
    assert_eq!(status(&head), 200, "a proved connection stays");
    server.shutdown(GRACE).await;
}
