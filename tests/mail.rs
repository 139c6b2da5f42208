//! Behaviour of the SMTP, IMAP and POP3 front ends against in-process
//! upstream doubles (STARTTLS and implicit TLS with a generated CA, XOAUTH2
//! validated against the identity-platform double), driven by real client
//! libraries (lettre for SMTP, async-imap for IMAP) and raw sockets for the
//! edge cases.

mod support;

use std::net::SocketAddr;
use std::time::Duration;
use support::harness::Env;
use support::mail::{FakeImap, FakeSmtp, ImapOptions, Pop3Options, SmtpOptions, TlsMode};
use support::mailrig::{b64, default_mail, lettre_mailer, message, start, Raw};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const GRACE: Duration = Duration::from_secs(5);

#[tokio::test]
async fn smtp_lettre_sends_through_authswap_with_xoauth2_upstream() {
    use lettre::transport::smtp::authentication::Mechanism;
    use lettre::AsyncTransport;
    let m = default_mail().await;
    let addr = m.server.smtp_addr().unwrap();
    for mech in [Mechanism::Plain, Mechanism::Login] {
        let mailer = lettre_mailer(addr, "Alice", "alice-pw-123", mech);
        let body = "Hello,\r\n.leading dot line\r\n..two dots\r\nbye\r\n";
        mailer.send(message(body)).await.expect("sent");
    }
    let msgs = m.smtp.wait_for_messages(2).await;
    assert_eq!(msgs[0].authenticated_as.to_lowercase(), "alice@contoso.com");
    assert_eq!(msgs[0].rcpt_to, vec!["bob@example.com"]);
    let text = String::from_utf8_lossy(&msgs[0].message);
    assert!(
        text.contains("\r\n.leading dot line\r\n..two dots\r\n"),
        "{text}"
    );
    // Upstream saw XOAUTH2 only, over TLS; never a password.
    assert_eq!(m.smtp.non_xoauth2_auth_attempts(), 0);
    assert_eq!(m.smtp.auth_without_tls(), 0);
    assert!(m.smtp.starttls_count() >= 2);
    for line in m.smtp.command_lines() {
        assert!(!line.contains(&b64(b"\0Alice\0alice-pw-123")));
    }
    assert_eq!(m.env.idp.refresh_calls(), 1, "one token for both sessions");
    m.server.shutdown(GRACE).await;
}

#[tokio::test]
async fn smtp_ehlo_relays_upstream_extensions_and_requires_auth() {
    let m = default_mail().await;
    let mut c = Raw::connect(m.server.smtp_addr().unwrap()).await;
    assert!(c.line().await.starts_with("220 "));
    c.send(b"MAIL FROM:<a@b.c>\r\n").await;
    assert!(c.reply().await.starts_with("530 5.7.0"));
    c.send(b"EHLO scanner.local\r\n").await;
    let mut lines = Vec::new();
    loop {
        let l = c.line().await;
        let last = l.as_bytes()[3] == b' ';
        lines.push(l);
        if last {
            break;
        }
    }
    let all = lines.join("");
    for ext in [
        "AUTH LOGIN PLAIN",
        "SIZE",
        "8BITMIME",
        "PIPELINING",
        "SMTPUTF8",
        "CHUNKING",
    ] {
        assert!(all.contains(ext), "{ext} missing in {all}");
    }
    assert!(!all.contains("XOAUTH2"));
    c.send(b"AUTH CRAM-MD5\r\n").await;
    assert!(c.reply().await.starts_with("504"));
    c.send(b"QUIT\r\n").await;
    assert!(c.reply().await.starts_with("221"));
    m.server.shutdown(GRACE).await;
}

#[tokio::test]
async fn smtp_wrong_password_never_reaches_upstream_auth() {
    use lettre::transport::smtp::authentication::Mechanism;
    use lettre::AsyncTransport;
    let m = default_mail().await;
    let addr = m.server.smtp_addr().unwrap();
    let err = lettre_mailer(addr, "alice", "wrong", Mechanism::Plain)
        .send(message("x"))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("5.7.8") || err.is_permanent(),
        "{err}"
    );
    let mut c = Raw::connect(addr).await;
    c.line().await;
    c.send(b"EHLO x\r\n").await;
    c.reply().await;
    c.send(format!("AUTH PLAIN {}\r\n", b64(b"\0nobody\0pw")).as_bytes())
        .await;
    assert!(c.reply().await.starts_with("535 5.7.8"));
    c.send(format!("AUTH LOGIN {}\r\n", b64(b"alice")).as_bytes())
        .await;
    assert!(c.reply().await.starts_with("334 UGFzc3dvcmQ6"));
    c.send(format!("{}\r\n", b64(b"bad")).as_bytes()).await;
    assert!(c.reply().await.starts_with("535 5.7.8"));
    c.send(b"AUTH PLAIN\r\n").await;
    assert!(c.reply().await.starts_with("334"));
    c.send(b"*\r\n").await;
    assert!(c.reply().await.starts_with("501"));
    assert_eq!(m.smtp.auth_attempts(), 0, "upstream never saw AUTH");
    assert_eq!(m.env.idp.token_requests(), 0);
    m.server.shutdown(GRACE).await;
}

#[tokio::test]
async fn smtp_refreshes_once_when_upstream_refuses_the_token() {
    use lettre::transport::smtp::authentication::Mechanism;
    use lettre::AsyncTransport;
    for google in [false, true] {
        let m = start(
            SmtpOptions {
                google_style_failure: google,
                ..SmtpOptions::default()
            },
            ImapOptions::default(),
            Pop3Options::default(),
        )
        .await;
        m.smtp.reject_auth_next(1);
        lettre_mailer(
            m.server.smtp_addr().unwrap(),
            "alice",
            "alice-pw-123",
            Mechanism::Plain,
        )
        .send(message("after refresh"))
        .await
        .expect("sent after one refresh");
        assert_eq!(m.smtp.auth_attempts(), 2);
        assert_eq!(m.smtp.auth_successes(), 1);
        assert_eq!(m.env.idp.successful_refreshes(), 2, "google={google}");
        let metrics = m.server.app().metrics.encode();
        assert!(metrics.contains(
            "authswap_auth_failures_total{identity=\"alice\",protocol=\"smtp\",reason=\"token_rejected\"} 1"
        ));
        m.server.shutdown(GRACE).await;
    }
}

#[tokio::test]
async fn smtp_temporary_and_fatal_failures_use_the_right_codes() {
    // Identity platform down: 454 so senders queue and retry.
    let m = default_mail().await;
    m.env.idp.set_unavailable(true);
    let addr = m.server.smtp_addr().unwrap();
    let mut c = Raw::connect(addr).await;
    c.line().await;
    c.send(b"EHLO x\r\n").await;
    c.reply().await;
    c.send(format!("AUTH PLAIN {}\r\n", b64(b"\0alice\0alice-pw-123")).as_bytes())
        .await;
    assert!(c.reply().await.starts_with("454 4.7.0"));
    m.env.idp.set_unavailable(false);

    // Needs re-authentication: 535 with a text that says so.
    m.env.idp.revoke_user("alice@contoso.com");
    tokio::time::sleep(Duration::from_millis(2100)).await; // backoff from the 503 expires
    let mut c = Raw::connect(addr).await;
    c.line().await;
    c.send(b"EHLO x\r\n").await;
    c.reply().await;
    c.send(format!("AUTH PLAIN {}\r\n", b64(b"\0alice\0alice-pw-123")).as_bytes())
        .await;
    let r = c.reply().await;
    assert!(
        r.starts_with("535 5.7.8") && r.contains("re-authentication"),
        "{r}"
    );
    m.server.shutdown(GRACE).await;

    // Upstream that does not offer STARTTLS: refused, 421 4.4.2, no AUTH sent.
    let m = start(
        SmtpOptions {
            offer_starttls: false,
            ..SmtpOptions::default()
        },
        ImapOptions::default(),
        Pop3Options::default(),
    )
    .await;
    let mut c = Raw::connect(m.server.smtp_addr().unwrap()).await;
    c.line().await;
    c.send(b"EHLO x\r\n").await;
    c.reply().await;
    c.send(format!("AUTH PLAIN {}\r\n", b64(b"\0alice\0alice-pw-123")).as_bytes())
        .await;
    assert!(c.reply().await.starts_with("421 4.4.2"));
    assert!(c.closed().await);
    assert_eq!(m.smtp.auth_attempts(), 0);
    assert_eq!(m.smtp.auth_without_tls(), 0);
    m.server.shutdown(GRACE).await;

    // Upstream unreachable.
    let env = Env::start().await;
    env.add_linked("alice", "alice@contoso.com", "alice-pw-123")
        .await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let server = env
        .serve_with(|c| {
            c.smtp.enabled = true;
            c.smtp.upstream = format!("127.0.0.1:{port}");
        })
        .await;
    let mut c = Raw::connect(server.smtp_addr().unwrap()).await;
    c.line().await;
    c.send(b"EHLO x\r\n").await;
    c.reply().await;
    c.send(format!("AUTH PLAIN {}\r\n", b64(b"\0alice\0alice-pw-123")).as_bytes())
        .await;
    assert!(c.reply().await.starts_with("421 4.4.2"));
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn smtp_relays_a_10_mb_message_byte_identical_with_pipelining() {
    let m = default_mail().await;
    let mut c = Raw::connect(m.server.smtp_addr().unwrap()).await;
    c.line().await;
    c.send(b"EHLO x\r\n").await;
    c.reply().await;
    c.send(format!("AUTH PLAIN {}\r\n", b64(b"\0alice\0alice-pw-123")).as_bytes())
        .await;
    assert!(c.reply().await.starts_with("235"));
    // 10 MB of lines, many starting with '.', already dot-stuffed by us.
    let mut body = Vec::with_capacity(10 * 1024 * 1024 + 1024);
    body.extend_from_slice(b"Subject: big\r\n\r\n");
    let mut i = 0u64;
    while body.len() < 10 * 1024 * 1024 {
        if i.is_multiple_of(3) {
            body.extend_from_slice(b"..stuffed line ");
        } else {
            body.extend_from_slice(b"plain line ");
        }
        body.extend_from_slice(format!("{i:08} {}\r\n", "x".repeat(60)).as_bytes());
        i += 1;
    }
    // Pipelined envelope and DATA in one write.
    c.send(b"MAIL FROM:<alice@contoso.com>\r\nRCPT TO:<bob@example.com>\r\nRCPT TO:<carol@example.com>\r\nDATA\r\n").await;
    for expect in ["250", "250", "250", "354"] {
        let r = c.reply().await;
        assert!(r.starts_with(expect), "{r}");
    }
    c.send(&body).await;
    c.send(b".\r\n").await;
    assert!(c.reply().await.starts_with("250"));
    c.send(b"QUIT\r\n").await;
    assert!(c.reply().await.starts_with("221"));
    let msgs = m.smtp.wait_for_messages(1).await;
    assert_eq!(msgs[0].raw_data.len(), body.len());
    assert!(
        msgs[0].raw_data == body,
        "byte-identical, dot-stuffing untouched"
    );
    assert_eq!(msgs[0].rcpt_to.len(), 2);
    m.server.shutdown(GRACE).await;
}

#[tokio::test]
async fn smtp_oversize_lines_garbage_and_idle_clients_are_handled() {
    let m = default_mail().await;
    let addr = m.server.smtp_addr().unwrap();
    let mut bad = Raw::connect(addr).await;
    bad.line().await;
    bad.send(&vec![b'A'; 100_000]).await;
    bad.send(b"\r\n").await;
    assert!(bad.reply().await.starts_with("500 5.5.6"));
    bad.send(b"\x00\x01\x02 garbage\r\n").await;
    assert!(bad.reply().await.starts_with("500"));
    // Others are served meanwhile.
    let mut good = Raw::connect(addr).await;
    assert!(good.line().await.starts_with("220"));
    good.send(b"EHLO ok\r\n").await;
    assert!(good.reply().await.starts_with("250 "));
    // Too many errors close the connection with 421.
    let mut last = String::new();
    for _ in 0..12 {
        bad.send(b"FOO\r\n").await;
        last = bad.reply().await;
        if last.starts_with("421") {
            break;
        }
    }
    assert!(last.starts_with("421"), "{last}");
    // An idle client is closed with 421 after idle_timeout (3 s here).
    let mut idle = Raw::connect(addr).await;
    idle.line().await;
    let r = idle.reply().await;
    assert!(r.starts_with("421 4.4.2"), "{r}");
    m.server.shutdown(GRACE).await;
}

#[tokio::test]
async fn imap_async_imap_client_logs_in_and_appends_through_authswap() {
    let m = default_mail().await;
    let addr = m.server.imap_addr().unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut client = async_imap::Client::new(tcp);
    let _greeting = client.read_response().await.unwrap().unwrap();
    let mut session = client
        .login("alice", "alice-pw-123")
        .await
        .map_err(|(e, _)| e)
        .expect("login");
    let mbox = session.select("INBOX").await.unwrap();
    assert_eq!(mbox.exists, 3);
    let big: Vec<u8> = {
        let mut v = b"Subject: big\r\n\r\n".to_vec();
        while v.len() < 10 * 1024 * 1024 {
            v.extend_from_slice(b".line starting with a dot and some text\r\n");
        }
        v
    };
    session.append("INBOX", None, None, &big).await.unwrap();
    session.logout().await.unwrap();
    let appended = m.imap.appended();
    assert_eq!(appended.len(), 1);
    assert!(appended[0] == big, "10 MB literal relayed byte-identical");
    assert_eq!(m.imap.authenticated_mailboxes(), vec!["alice@contoso.com"]);
    assert_eq!(m.imap.non_xoauth2_auth_attempts(), 0);
    m.server.shutdown(GRACE).await;
}

#[tokio::test]
async fn imap_login_forms_capability_failures_and_refresh() {
    let m = start(
        SmtpOptions::default(),
        ImapOptions {
            tls: TlsMode::StartTls,
            ..ImapOptions::default()
        },
        Pop3Options::default(),
    )
    .await;
    let addr = m.server.imap_addr().unwrap();
    let mut c = Raw::connect(addr).await;
    let greeting = c.line().await;
    assert!(greeting.contains("AUTH=PLAIN") && !greeting.contains("LOGINDISABLED"));
    c.send(b"a1 CAPABILITY\r\n").await;
    let caps = c.line().await;
    assert!(caps.starts_with("* CAPABILITY") && caps.contains("AUTH=PLAIN"));
    assert!(c.line().await.starts_with("a1 OK"));
    c.send(b"a2 LOGIN alice wrong\r\n").await;
    assert!(c.line().await.starts_with("a2 NO [AUTHENTICATIONFAILED]"));
    assert_eq!(m.imap.auth_attempts(), 0, "upstream never saw AUTHENTICATE");
    c.send(b"a3 SELECT INBOX\r\n").await;
    assert!(c.line().await.starts_with("a3 BAD"));
    // Literal user name and quoted password with an escaped quote? Here:
    // literal name, quoted password.
    c.send(b"a4 LOGIN {5}\r\n").await;
    assert!(c.line().await.starts_with("+ "));
    c.send(b"alice \"alice-pw-123\"\r\n").await;
    let ok = c.line().await;
    assert!(ok.starts_with("a4 OK"), "{ok}");
    // Spliced: the upstream answers from now on.
    c.send(b"a5 SELECT INBOX\r\n").await;
    let mut seen = String::new();
    loop {
        let l = c.line().await;
        seen.push_str(&l);
        if l.starts_with("a5 ") {
            break;
        }
    }
    assert!(seen.contains("EXISTS") && seen.contains("a5 OK"), "{seen}");
    assert_eq!(m.imap.starttls_count(), 1);
    assert_eq!(m.imap.auth_without_tls(), 0);

    // AUTHENTICATE PLAIN with SASL-IR, after the upstream refuses once.
    m.imap.reject_auth_next(1);
    let mut c = Raw::connect(addr).await;
    c.line().await;
    c.send(
        format!(
            "t1 AUTHENTICATE PLAIN {}\r\n",
            b64(b"\0alice\0alice-pw-123")
        )
        .as_bytes(),
    )
    .await;
    assert!(c.line().await.starts_with("t1 OK"));
    assert_eq!(m.env.idp.successful_refreshes(), 2);

    // Non-synchronising literal and continuation-style AUTHENTICATE.
    let mut c = Raw::connect(addr).await;
    c.line().await;
    c.send(b"t2 LOGIN {5+}\r\nalice {12+}\r\nalice-pw-123\r\n")
        .await;
    assert!(c.line().await.starts_with("t2 OK"));
    let mut c = Raw::connect(addr).await;
    c.line().await;
    c.send(b"t3 AUTHENTICATE PLAIN\r\n").await;
    assert!(c.line().await.starts_with("+"));
    c.send(format!("{}\r\n", b64(b"\0alice\0alice-pw-123")).as_bytes())
        .await;
    assert!(c.line().await.starts_with("t3 OK"));
    m.server.shutdown(GRACE).await;
}

#[tokio::test]
async fn imap_identity_platform_down_and_garbage() {
    let m = default_mail().await;
    m.env.idp.set_unavailable(true);
    let addr = m.server.imap_addr().unwrap();
    let mut c = Raw::connect(addr).await;
    c.line().await;
    c.send(b"x LOGIN alice alice-pw-123\r\n").await;
    assert!(c.line().await.starts_with("x NO [UNAVAILABLE]"));
    c.send(&vec![b'z'; 50_000]).await;
    c.send(b"\r\n").await;
    assert!(c.line().await.starts_with("* BAD"));
    c.send(b"\r\n").await;
    assert!(c.line().await.contains("BAD"));
    let mut other = Raw::connect(addr).await;
    assert!(other.line().await.starts_with("* OK"));
    assert_eq!(m.imap.auth_attempts(), 0);
    m.server.shutdown(GRACE).await;
}

#[tokio::test]
async fn pop3_user_pass_and_auth_plain_relay_retr_byte_identical() {
    let big: Vec<u8> = {
        let mut v = b"Subject: big\r\n\r\n".to_vec();
        while v.len() < 10 * 1024 * 1024 {
            v.extend_from_slice(b".dot line in a pop3 message\r\nplain line\r\n");
        }
        v
    };
    let m = start(
        SmtpOptions::default(),
        ImapOptions::default(),
        Pop3Options {
            tls: TlsMode::StartTls,
            ..Pop3Options::default()
        },
    )
    .await;
    m.pop3.set_mailbox(vec![big.clone()]);
    let addr = m.server.pop3_addr().unwrap();
    let mut c = Raw::connect(addr).await;
    assert!(c.line().await.starts_with("+OK"));
    c.send(b"CAPA\r\n").await;
    let mut capa = String::new();
    loop {
        let l = c.line().await;
        if l == ".\r\n" {
            break;
        }
        capa.push_str(&l);
    }
    assert!(capa.contains("USER") && capa.contains("SASL PLAIN") && !capa.contains("XOAUTH2"));
    c.send(b"USER alice\r\nPASS wrong\r\n").await;
    assert!(c.line().await.starts_with("+OK"));
    assert!(c.line().await.starts_with("-ERR [AUTH]"));
    assert_eq!(m.pop3.auth_attempts(), 0, "upstream never saw AUTH");
    let mut other = Raw::connect(addr).await;
    assert!(
        other.line().await.starts_with("+OK"),
        "listener serves others"
    );
    c.send(b"USER alice\r\n").await;
    c.line().await;
    c.send(b"PASS alice-pw-123\r\n").await;
    assert!(c.line().await.starts_with("+OK"));
    // Pipelined after login: STAT and RETR in one write.
    c.send(b"STAT\r\nRETR 1\r\n").await;
    assert!(c.line().await.starts_with("+OK 1"));
    assert!(c.line().await.starts_with("+OK"));
    let mut got = Vec::new();
    loop {
        let mut l = String::new();
        c.r.read_line(&mut l).await.unwrap();
        if l == ".\r\n" {
            break;
        }
        got.extend_from_slice(l.strip_prefix('.').unwrap_or(&l).as_bytes());
    }
    assert!(got == big, "10 MB RETR relayed byte-identical");
    c.send(b"QUIT\r\n").await;
    assert!(c.line().await.starts_with("+OK"));
    assert_eq!(m.pop3.starttls_count(), 1);
    assert_eq!(m.pop3.auth_without_tls(), 0);
    assert_eq!(m.pop3.non_xoauth2_auth_attempts(), 0);

    // AUTH PLAIN, refreshed once after a refusal.
    m.pop3.reject_auth_next(1);
    let mut c = Raw::connect(addr).await;
    c.line().await;
    c.send(b"AUTH PLAIN\r\n").await;
    assert!(c.line().await.starts_with("+"));
    c.send(format!("{}\r\n", b64(b"\0alice\0alice-pw-123")).as_bytes())
        .await;
    assert!(c.line().await.starts_with("+OK"));
    assert_eq!(m.env.idp.successful_refreshes(), 2);

    m.server.shutdown(GRACE).await;

    // Identity platform down (no token cached yet).
    let m = default_mail().await;
    m.env.idp.set_unavailable(true);
    let mut c = Raw::connect(m.server.pop3_addr().unwrap()).await;
    c.line().await;
    c.send(format!("AUTH PLAIN {}\r\n", b64(b"\0alice\0alice-pw-123")).as_bytes())
        .await;
    assert!(c.line().await.starts_with("-ERR [SYS/TEMP]"));
    // Garbage and oversize lines.
    c.send(&vec![b'q'; 20_000]).await;
    c.send(b"\r\n").await;
    assert!(c.line().await.starts_with("-ERR"));
    c.send(b"RETR 1\r\n").await;
    assert!(c.line().await.starts_with("-ERR"));
    m.server.shutdown(GRACE).await;
}

async fn tls_connect(
    addr: SocketAddr,
    tcp: TcpStream,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let _ = addr;
    let connector = tokio_rustls::TlsConnector::from(support::pki().client_config_no_alpn());
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector
        .connect(name, tcp)
        .await
        .expect("TLS with authswap")
}

async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> String {
    let mut s = String::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut s))
        .await
        .expect("answer in time")
        .unwrap();
    s
}

#[tokio::test]
async fn local_starttls_and_implicit_tls_for_clients_that_insist() {
    let env = Env::start().await;
    env.add_linked("alice", "alice@contoso.com", "alice-pw-123")
        .await;
    let v = env.idp.validator();
    let smtp = FakeSmtp::start(v.clone(), SmtpOptions::default()).await;
    let imap = FakeImap::start(v, ImapOptions::default()).await;
    let (cert, key) = support::pki().write_server_cert_files(env.dir.path());
    let (sp, ip) = (smtp.port(), imap.port());
    let server = env
        .serve_with(move |c| {
            c.smtp.enabled = true;
            c.smtp.upstream = format!("localhost:{sp}");
            c.smtp.tls_cert_file = Some(cert.clone());
            c.smtp.tls_key_file = Some(key.clone());
            c.imap.enabled = true;
            c.imap.upstream = format!("localhost:{ip}");
            c.imap.tls_cert_file = Some(cert);
            c.imap.tls_key_file = Some(key);
            c.imap.implicit_tls = true;
        })
        .await;

    // SMTP: STARTTLS offered, then AUTH over TLS.
    let addr = server.smtp_addr().unwrap();
    let mut c = Raw::connect(addr).await;
    c.line().await;
    c.send(b"EHLO x\r\n").await;
    let mut ehlo = String::new();
    loop {
        let l = c.line().await;
        ehlo.push_str(&l);
        if l.as_bytes()[3] == b' ' {
            break;
        }
    }
    assert!(ehlo.contains("STARTTLS"), "{ehlo}");
    c.send(b"STARTTLS\r\n").await;
    assert!(c.reply().await.starts_with("220"));
    let tcp = c.r.into_inner().reunite(c.w).unwrap();
    let tls = tls_connect(addr, tcp).await;
    let (r, mut w) = tokio::io::split(tls);
    let mut r = BufReader::new(r);
    w.write_all(b"EHLO x\r\n").await.unwrap();
    loop {
        let l = read_line(&mut r).await;
        assert!(!l.contains("STARTTLS"), "not offered twice");
        if l.as_bytes()[3] == b' ' {
            break;
        }
    }
    w.write_all(format!("AUTH PLAIN {}\r\n", b64(b"\0alice\0alice-pw-123")).as_bytes())
        .await
        .unwrap();
    assert!(read_line(&mut r).await.starts_with("235"));

    // IMAP: TLS from the first byte.
    let addr = server.imap_addr().unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tls_connect(addr, tcp).await;
    let (r, mut w) = tokio::io::split(tls);
    let mut r = BufReader::new(r);
    assert!(read_line(&mut r).await.starts_with("* OK"));
    w.write_all(b"a LOGIN alice alice-pw-123\r\n")
        .await
        .unwrap();
    assert!(read_line(&mut r).await.starts_with("a OK"));
    server.shutdown(GRACE).await;
}

/// The bytes of a literal that authswap refuses are never read as
/// commands: a non-synchronising literal over `max_line` is read and
/// dropped (up to 1 MiB; beyond that the connection is closed), and the
/// connection goes on with the next command.
#[tokio::test]
async fn imap_refused_literals_are_not_executed_as_commands() {
    let m = default_mail().await;
    let addr = m.server.imap_addr().unwrap();
    // Literal content that looks like commands, 50,000 bytes in all.
    let literal = |n: usize| {
        let mut v = b"b CAPABILITY\r\nb2 LOGIN alice alice-pw-123\r\n".to_vec();
        v.resize(n - 2, b'x');
        v.extend_from_slice(b"\r\n");
        v
    };
    let mut c = Raw::connect(addr).await;
    assert!(c.line().await.starts_with("* OK"));
    c.send(b"a LOGIN {50000+}\r\n").await;
    c.send(&literal(50_000)).await;
    c.send(b" password\r\nc NOOP\r\n").await;
    let first = c.line().await;
    assert!(first.starts_with("a BAD literal too large"), "{first}");
    let next = c.line().await;
    assert!(next.starts_with("c OK NOOP"), "literal executed: {next}");

    // The same inside a command authswap does not know before login.
    c.send(b"d APPEND INBOX {14+}\r\nb CAPABILITY\r\n\r\ne NOOP\r\n")
        .await;
    let d = c.line().await;
    assert!(d.starts_with("d BAD"), "{d}");
    let e = c.line().await;
    assert!(e.starts_with("e OK NOOP"), "literal executed: {e}");

    // A synchronising literal that is too large is refused before the
    // client sends it; the connection stays usable.
    c.send(b"f LOGIN {50000}\r\n").await;
    assert!(c.line().await.starts_with("f BAD literal too large"));
    c.send(b"g NOOP\r\n").await;
    assert!(c.line().await.starts_with("g OK"));

    // More than 1 MiB announced: refused and the connection closed, without
    // reading any of it as commands.
    let mut c = Raw::connect(addr).await;
    c.line().await;
    c.send(b"h LOGIN {5000000+}\r\n").await;
    c.send(&literal(10_000)).await;
    assert!(c.line().await.starts_with("h BAD literal too large"));
    let bye = c.line().await;
    assert!(bye.starts_with("* BYE [TOOBIG]"), "{bye}");
    assert!(c.closed().await);
    assert_eq!(m.imap.auth_attempts(), 0, "nothing logged in upstream");
    m.server.shutdown(GRACE).await;
}

#[tokio::test]
async fn smtp_sessions_of_one_identity_are_shaped_to_three_upstream() {
    use lettre::transport::smtp::authentication::Mechanism;
    use lettre::AsyncTransport;
    use support::harness::sample;
    // Defaults: Exchange Online's 3 sessions per mailbox (the per-minute
    // limit is raised so that 20 messages do not take a minute).
    let m = support::mailrig::start_with(
        SmtpOptions::default(),
        ImapOptions::default(),
        Pop3Options::default(),
        |c| {
            assert_eq!(c.smtp.max_sessions_per_identity, 3);
            assert_eq!(c.smtp.messages_per_minute, 30);
            c.smtp.messages_per_minute = 1000;
        },
    )
    .await;
    // Like Exchange Online: a fourth session fails at MAIL FROM.
    m.smtp.set_session_limit(Some(3));
    let addr = m.server.smtp_addr().unwrap();
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..10 {
        clients.spawn(async move {
            let mailer = lettre_mailer(addr, "alice", "alice-pw-123", Mechanism::Plain);
            for j in 0..2 {
                mailer
                    .send(message(&format!("client {i} message {j}\r\n")))
                    .await
                    .map_err(|e| format!("client {i} message {j}: {e}"))?;
            }
            Ok::<_, String>(())
        });
    }
    let all = tokio::time::timeout(Duration::from_secs(60), async {
        let mut results = Vec::new();
        while let Some(r) = clients.join_next().await {
            results.push(r.unwrap());
        }
        results
    })
    .await
    .expect("every client done in time");
    for r in all {
        r.expect("no client saw a failure");
    }
    assert_eq!(m.smtp.message_count(), 20, "every message delivered");
    let max = m.smtp.max_concurrent_sessions();
    assert!((1..=3).contains(&max), "at most 3 upstream at once: {max}");
    assert!(!m.smtp.command_lines().iter().any(|l| l.starts_with("432")));
    let admin = m.server.admin_addr();
    let (text, _) = support::harness::HttpClient::default()
        .metrics_until(admin, Duration::from_secs(2), |t| {
            t.contains("authswap_mail_sessions_active{identity=\"alice\",protocol=\"smtp\"} 0")
        })
        .await;
    let admitted = sample(
        &text,
        "authswap_mail_session_waits_total{identity=\"alice\",protocol=\"smtp\",result=\"admitted\"}",
    )
    .unwrap_or(0.0);
    assert!(admitted >= 1.0, "logins waited: {text}");
    assert!(text.contains("authswap_mail_sessions_active{identity=\"alice\",protocol=\"smtp\"} 0"));
    assert!(!text.contains("result=\"refused\"} 1"), "{text}");
    m.server.shutdown(GRACE).await;
}

#[tokio::test]
async fn sessions_over_the_limit_are_refused_cleanly_after_session_wait() {
    use support::harness::sample;
    let m = support::mailrig::start_with(
        SmtpOptions::default(),
        ImapOptions::default(),
        Pop3Options::default(),
        |c| {
            c.smtp.max_sessions_per_identity = 1;
            c.smtp.messages_per_minute = 2;
            c.smtp.session_wait = Duration::from_millis(300);
            // Microsoft documents no IMAP/POP3 limit: off by default,
            // but configurable.
            assert_eq!(c.pop3.max_sessions_per_identity, 0);
            assert_eq!(c.imap.max_sessions_per_identity, 0);
            c.pop3.max_sessions_per_identity = 1;
            c.pop3.session_wait = Duration::from_millis(300);
        },
    )
    .await;
    let smtp = m.server.smtp_addr().unwrap();
    let auth = format!("AUTH PLAIN {}\r\n", b64(b"\0alice\0alice-pw-123"));
    let mut first = Raw::connect(smtp).await;
    first.line().await;
    first.send(b"EHLO one\r\n").await;
    first.reply().await;
    first.send(auth.as_bytes()).await;
    assert!(first.reply().await.starts_with("235"));

    let mut second = Raw::connect(smtp).await;
    second.line().await;
    second.send(b"EHLO two\r\n").await;
    second.reply().await;
    let asked = std::time::Instant::now();
    second.send(auth.as_bytes()).await;
    let r = second.reply().await;
    assert!(r.starts_with("454 4.7.0"), "{r}");
    assert!(asked.elapsed() >= Duration::from_millis(300));
    // The session goes on: the client may try again or leave.
    second.send(b"NOOP\r\n").await;
    assert!(second.reply().await.starts_with("250"));

    // messages_per_minute = 2: the third MAIL FROM is held (not refused,
    // not failed mid-transaction).
    for i in 0..2 {
        first
            .send(b"MAIL FROM:<alice@contoso.com>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
            .await;
        assert!(first.reply().await.starts_with("250"));
        assert!(first.reply().await.starts_with("250"));
        assert!(first.reply().await.starts_with("354"));
        first
            .send(format!("Subject: {i}\r\n\r\nbody\r\n.\r\n").as_bytes())
            .await;
        assert!(first.reply().await.starts_with("250"));
    }
    first.send(b"MAIL FROM:<alice@contoso.com>\r\n").await;
    let held = tokio::time::timeout(Duration::from_millis(800), first.line()).await;
    assert!(held.is_err(), "the third message is held: {held:?}");
    assert_eq!(m.smtp.mail_times().len(), 2);

    // The first session ends: the next login gets its place.
    drop(first);
    second.send(auth.as_bytes()).await;
    assert!(second.reply().await.starts_with("235"));

    // POP3 (configured): -ERR [IN-USE].
    let pop3 = m.server.pop3_addr().unwrap();
    let mut p1 = Raw::connect(pop3).await;
    p1.line().await;
    p1.send(b"USER alice\r\n").await;
    p1.line().await;
    p1.send(b"PASS alice-pw-123\r\n").await;
    assert!(p1.line().await.starts_with("+OK"));
    let mut p2 = Raw::connect(pop3).await;
    p2.line().await;
    p2.send(b"USER alice\r\n").await;
    p2.line().await;
    p2.send(b"PASS alice-pw-123\r\n").await;
    let r = p2.line().await;
    assert!(r.starts_with("-ERR [IN-USE]"), "{r}");

    let text = support::harness::HttpClient::default()
        .get(m.server.admin_addr(), "/metrics")
        .await
        .text();
    let series = |p: &str, r: &str| {
        sample(
            &text,
            &format!("authswap_mail_session_waits_total{{identity=\"alice\",protocol=\"{p}\",result=\"{r}\"}}"),
        )
    };
    assert_eq!(series("smtp", "refused"), Some(1.0), "{text}");
    assert_eq!(series("pop3", "refused"), Some(1.0), "{text}");
    assert_eq!(
        sample(
            &text,
            "authswap_mail_message_delays_total{identity=\"alice\",protocol=\"smtp\"}"
        ),
        Some(1.0),
        "{text}"
    );
    m.server.shutdown(GRACE).await;
}
