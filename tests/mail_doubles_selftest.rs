//! Self-test of the in-process upstream mail doubles in
//! `tests/support/mail.rs` (fake SMTP, IMAP and POP3), driven by raw tokio
//! TCP + tokio-rustls clients. Does not use the `authswap` library.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use support::mail::{
    xoauth2_blob, FakeImap, FakePop3, FakeSmtp, ImapOptions, Pop3Options, SmtpOptions, TlsMode,
    GOOGLE_STYLE_CHALLENGE, POP3_AUTH_FAILED,
};
use support::{pki, FakeIdp};

const IO_TIMEOUT: Duration = Duration::from_secs(5);
const USER: &str = "alice@contoso.test";

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A line-oriented test client over plain TCP or TLS.
struct Client {
    rd: BufReader<Box<dyn Io>>,
}

async fn tls_wrap(io: Box<dyn Io>) -> Box<dyn Io> {
    let connector = TlsConnector::from(pki().client_config_no_alpn());
    let name = ServerName::try_from("localhost").expect("server name");
    let tls = tokio::time::timeout(IO_TIMEOUT, connector.connect(name, io))
        .await
        .expect("TLS handshake timed out")
        .expect("TLS handshake");
    Box::new(tls)
}

impl Client {
    async fn plain(addr: SocketAddr) -> Client {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        Client {
            rd: BufReader::new(Box::new(tcp)),
        }
    }

    async fn tls(addr: SocketAddr) -> Client {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        Client {
            rd: BufReader::new(tls_wrap(Box::new(tcp)).await),
        }
    }

    async fn starttls(self) -> Client {
        assert!(self.rd.buffer().is_empty(), "data buffered before TLS");
        Client {
            rd: BufReader::new(tls_wrap(self.rd.into_inner()).await),
        }
    }

    async fn send(&mut self, data: impl AsRef<[u8]>) {
        let w = self.rd.get_mut();
        w.write_all(data.as_ref()).await.expect("write");
        w.flush().await.expect("flush");
    }

    /// One CRLF-terminated line, without the CRLF.
    async fn line(&mut self) -> String {
        let mut buf = Vec::new();
        tokio::time::timeout(IO_TIMEOUT, self.rd.read_until(b'\n', &mut buf))
            .await
            .expect("read timed out")
            .expect("read");
        assert!(buf.ends_with(b"\r\n"), "unterminated line {buf:?}");
        buf.truncate(buf.len() - 2);
        String::from_utf8(buf).expect("utf-8 line")
    }

    /// A complete (possibly multi-line) SMTP reply.
    async fn reply(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let l = self.line().await;
            let last = l.as_bytes().get(3) != Some(&b'-');
            lines.push(l);
            if last {
                return lines;
            }
        }
    }

    /// Lines up to and including the one starting with `prefix`.
    async fn lines_until(&mut self, prefix: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let l = self.line().await;
            let done = l.starts_with(prefix);
            lines.push(l);
            if done {
                return lines;
            }
        }
    }

    async fn exact(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        tokio::time::timeout(IO_TIMEOUT, self.rd.read_exact(&mut buf))
            .await
            .expect("read timed out")
            .expect("read");
        buf
    }

    /// A POP3 multi-line body (after the `+OK` line) up to `.\r\n`, raw.
    async fn dot_body(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let mut buf = Vec::new();
            tokio::time::timeout(IO_TIMEOUT, self.rd.read_until(b'\n', &mut buf))
                .await
                .expect("read timed out")
                .expect("read");
            assert!(!buf.is_empty(), "EOF in multi-line response");
            if buf == b".\r\n" {
                return body;
            }
            body.extend_from_slice(&buf);
        }
    }
}

fn auth_line(verb: &str, user: &str, token: &str) -> String {
    format!("{verb} {}\r\n", xoauth2_blob(user, token))
}

fn unstuff(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in raw.split_inclusive(|b| *b == b'\n') {
        out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
    }
    out
}

/// Implicit-TLS SMTP session that has said EHLO and authenticated.
async fn smtp_logged_in(smtp: &FakeSmtp, token: &str) -> Client {
    let mut c = Client::tls(smtp.addr()).await;
    assert_eq!(c.line().await, "220 fake.outlook ESMTP");
    c.send("EHLO client.test\r\n").await;
    c.reply().await;
    c.send(auth_line("AUTH XOAUTH2", USER, token)).await;
    assert_eq!(c.line().await, "235 2.7.0 Authentication successful");
    c
}

#[tokio::test]
async fn smtp_starttls_xoauth2_and_dot_unstuffing() {
    let idp = FakeIdp::start().await;
    let token = idp.seed_access_token(USER);
    let smtp = FakeSmtp::start(idp.validator(), SmtpOptions::default()).await;
    assert_eq!(smtp.tls_mode(), TlsMode::StartTls);

    let mut c = Client::plain(smtp.addr()).await;
    assert_eq!(c.line().await, "220 fake.outlook ESMTP");
    c.send("EHLO client.test\r\n").await;
    let ehlo = c.reply().await;
    assert!(ehlo.iter().any(|l| &l[4..] == "STARTTLS"), "{ehlo:?}");
    assert!(!ehlo.iter().any(|l| l.contains("AUTH")), "{ehlo:?}");
    // Refused before TLS, without looking at credentials.
    c.send(auth_line("AUTH XOAUTH2", USER, &token)).await;
    assert!(c.line().await.starts_with("504 "));
    c.send("STARTTLS\r\n").await;
    assert!(c.line().await.starts_with("220 "));
    let mut c = c.starttls().await;

    c.send("EHLO client.test\r\n").await;
    let ehlo = c.reply().await;
    let keywords: Vec<&str> = ehlo.iter().map(|l| &l[4..]).collect();
    assert_eq!(keywords.last(), Some(&"AUTH LOGIN XOAUTH2"), "{ehlo:?}");
    for ext in ["SIZE 157286400", "8BITMIME", "PIPELINING", "CHUNKING"] {
        assert!(keywords.contains(&ext), "{ext} missing in {ehlo:?}");
    }
    assert!(!keywords.contains(&"STARTTLS"));

    c.send("MAIL FROM:<alice@contoso.test>\r\n").await;
    assert!(c.line().await.starts_with("530 5.7.57 "));
    c.send(auth_line("AUTH XOAUTH2", USER, &token)).await;
    assert_eq!(c.line().await, "235 2.7.0 Authentication successful");
    c.send("MAIL FROM:<alice@contoso.test> BODY=8BITMIME\r\n")
        .await;
    assert!(c.line().await.starts_with("250 2.1.0"));
    c.send("RCPT TO:<bob@example.com>\r\n").await;
    assert!(c.line().await.starts_with("250 2.1.5"));
    c.send("DATA\r\n").await;
    assert!(c.line().await.starts_with("354 "));
    let raw: &[u8] = b"Subject: dots\r\n\r\n..leading dot\r\nmiddle\r\n...\r\nend\r\n";
    c.send([raw, b".\r\n"].concat()).await;
    assert!(c.line().await.starts_with("250 2.0.0 OK <"));
    c.send("QUIT\r\n").await;
    assert!(c.line().await.starts_with("221 "));

    let msgs = smtp.messages();
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(m.raw_data, raw);
    assert_eq!(
        m.message,
        b"Subject: dots\r\n\r\n.leading dot\r\nmiddle\r\n..\r\nend\r\n"
    );
    assert_eq!(m.mail_from, USER);
    assert_eq!(m.mail_params, "BODY=8BITMIME");
    assert_eq!(m.rcpt_to, vec!["bob@example.com".to_string()]);
    assert_eq!(m.authenticated_as, USER);
    assert!(!m.bdat);

    let s = smtp.stats();
    assert_eq!(s.connections, 1);
    assert_eq!(s.starttls, 1);
    assert_eq!(
        (s.auth_attempts, s.auth_successes, s.auth_failures),
        (1, 1, 0)
    );
    assert_eq!(s.auth_without_tls, 1);
    assert!(!smtp.non_xoauth2_auth_attempted());
    assert_eq!(s.commands[0], b"EHLO client.test\r\n");
    assert!(s.commands[1].starts_with(b"AUTH XOAUTH2 "));
    assert_eq!(s.commands[2], b"STARTTLS\r\n");
    assert_eq!(smtp.command_lines().last().unwrap(), "QUIT");
    assert_eq!(smtp.authenticated_mailboxes(), vec![USER.to_string()]);
}

#[tokio::test]
async fn smtp_bad_token_basic_auth_and_forced_rejection() {
    let idp = FakeIdp::start().await;
    let token = idp.seed_access_token(USER);
    let opts = SmtpOptions {
        tls: TlsMode::Implicit,
        ..SmtpOptions::default()
    };
    let smtp = FakeSmtp::start(idp.validator(), opts).await;
    let mut c = Client::tls(smtp.addr()).await;
    assert_eq!(c.line().await, "220 fake.outlook ESMTP");
    c.send("EHLO client.test\r\n").await;
    let ehlo = c.reply().await;
    assert_eq!(ehlo.last().unwrap(), "250 AUTH LOGIN XOAUTH2");

    // Unknown token.
    c.send(auth_line("AUTH XOAUTH2", USER, "not-a-token")).await;
    assert!(c
        .line()
        .await
        .starts_with("535 5.7.3 Authentication unsuccessful"));
    // Valid token, wrong mailbox.
    c.send(auth_line("AUTH XOAUTH2", "bob@contoso.test", &token))
        .await;
    assert!(c.line().await.starts_with("535 5.7.3 "));
    // Basic auth is refused (and recorded).
    c.send("AUTH LOGIN\r\n").await;
    assert_eq!(c.line().await, "334 VXNlcm5hbWU6");
    c.send("dXNlcg==\r\n").await;
    assert_eq!(c.line().await, "334 UGFzc3dvcmQ6");
    c.send("cGFzcw==\r\n").await;
    assert!(c.line().await.starts_with("535 5.7.139 "));
    // Forced rejection of a valid token, via the 334 continuation.
    smtp.reject_auth_next(1);
    c.send("AUTH XOAUTH2\r\n").await;
    assert_eq!(c.line().await, "334 ");
    c.send(format!("{}\r\n", xoauth2_blob(USER, &token))).await;
    assert!(c.line().await.starts_with("535 5.7.3 "));
    assert_eq!(smtp.pending_auth_rejections(), 0);
    // Mailbox compare is case-insensitive.
    c.send(auth_line("AUTH XOAUTH2", &USER.to_uppercase(), &token))
        .await;
    assert_eq!(c.line().await, "235 2.7.0 Authentication successful");

    assert_eq!(smtp.auth_attempts(), 4);
    assert_eq!(smtp.auth_successes(), 1);
    assert_eq!(smtp.auth_failures(), 3);
    assert!(smtp.non_xoauth2_auth_attempted());
    assert_eq!(smtp.non_xoauth2_auth_attempts(), 1);
    let attempts = smtp.xoauth2_attempts();
    assert_eq!(attempts[0].token.as_deref(), Some("not-a-token"));
    assert!(attempts[2].forced_rejection && !attempts[2].accepted);
    assert!(attempts[3].accepted);
    // The Basic credentials lines were recorded as received.
    assert!(smtp.commands().contains(&b"cGFzcw==\r\n".to_vec()));
}

#[tokio::test]
async fn xoauth2_accepts_app_tokens_for_permitted_mailboxes() {
    let idp = FakeIdp::start().await;
    let app = idp.seed_app_token("fabrikam.onmicrosoft.com", "app-1");
    let opts = SmtpOptions {
        tls: TlsMode::Implicit,
        ..SmtpOptions::default()
    };
    let smtp = FakeSmtp::start(idp.validator(), opts).await;
    let mut c = Client::tls(smtp.addr()).await;
    assert_eq!(c.line().await, "220 fake.outlook ESMTP");
    c.send("EHLO client.test\r\n").await;
    c.reply().await;
    // Any mailbox while the app is unrestricted.
    c.send(auth_line("AUTH XOAUTH2", "bob@contoso.test", &app))
        .await;
    assert_eq!(c.line().await, "235 2.7.0 Authentication successful");
    let mut c = Client::tls(smtp.addr()).await;
    c.line().await;
    c.send("EHLO client.test\r\n").await;
    c.reply().await;
    idp.restrict_app_mailboxes("fabrikam.onmicrosoft.com", "app-1", &[USER]);
    c.send(auth_line("AUTH XOAUTH2", "bob@contoso.test", &app))
        .await;
    assert!(c.line().await.starts_with("535 5.7.3 "));
    c.send(auth_line("AUTH XOAUTH2", USER, &app)).await;
    assert_eq!(c.line().await, "235 2.7.0 Authentication successful");
    // Revoked app tokens are refused.
    idp.revoke_all_access_tokens();
    let mut c = Client::tls(smtp.addr()).await;
    c.line().await;
    c.send("EHLO client.test\r\n").await;
    c.reply().await;
    c.send(auth_line("AUTH XOAUTH2", USER, &app)).await;
    assert!(c.line().await.starts_with("535 5.7.3 "));
    assert_eq!(smtp.auth_successes(), 2);
}

#[tokio::test]
async fn smtp_google_style_failure() {
    let idp = FakeIdp::start().await;
    let opts = SmtpOptions {
        tls: TlsMode::Implicit,
        google_style_failure: true,
        ..SmtpOptions::default()
    };
    let smtp = FakeSmtp::start(idp.validator(), opts).await;
    let mut c = Client::tls(smtp.addr()).await;
    c.line().await;
    c.send("EHLO client.test\r\n").await;
    c.reply().await;
    c.send(auth_line("AUTH XOAUTH2", USER, "expired")).await;
    let challenge = c.line().await;
    assert_eq!(challenge, format!("334 {GOOGLE_STYLE_CHALLENGE}"));
    let json = base64::engine::general_purpose::STANDARD
        .decode(&challenge[4..])
        .unwrap();
    assert!(String::from_utf8(json)
        .unwrap()
        .contains("\"status\":\"401\""));
    c.send("\r\n").await;
    assert!(c.line().await.starts_with("535 5.7.8 "));

    smtp.set_google_style_failure(false);
    c.send(auth_line("AUTH XOAUTH2", USER, "expired")).await;
    assert!(c.line().await.starts_with("535 5.7.3 "));
    assert_eq!(smtp.auth_failures(), 2);
}

#[tokio::test]
async fn smtp_pipelining_bdat_and_big_message() {
    let idp = FakeIdp::start().await;
    let token = idp.seed_access_token(USER);
    let opts = SmtpOptions {
        tls: TlsMode::Implicit,
        ..SmtpOptions::default()
    };
    let smtp = FakeSmtp::start(idp.validator(), opts).await;
    let mut c = smtp_logged_in(&smtp, &token).await;

    // PIPELINING: one write, replies in order.
    c.send(
        "MAIL FROM:<alice@contoso.test>\r\nRCPT TO:<bob@example.com>\r\n\
         RCPT TO:<carol@example.com>\r\nDATA\r\n",
    )
    .await;
    assert!(c.line().await.starts_with("250 2.1.0"));
    assert!(c.line().await.starts_with("250 2.1.5"));
    assert!(c.line().await.starts_with("250 2.1.5"));
    assert!(c.line().await.starts_with("354 "));
    c.send("Subject: pipelined\r\n\r\nhi\r\n.\r\n").await;
    assert!(c.line().await.starts_with("250 2.0.0 OK"));

    // CHUNKING, fully pipelined.
    c.send(
        "MAIL FROM:<>\r\nRCPT TO:<bob@example.com>\r\nBDAT 7\r\n.hello\nBDAT 8 LAST\r\n world\r\n",
    )
    .await;
    assert!(c.line().await.starts_with("250 2.1.0"));
    assert!(c.line().await.starts_with("250 2.1.5"));
    assert_eq!(c.line().await, "250 2.0.0 7 bytes received");
    assert!(c.line().await.starts_with("250 2.0.0 OK"));

    // A 10 MiB message with stuffed lines.
    let mut raw = Vec::with_capacity(10 * 1024 * 1024 + 100);
    let mut i = 0u64;
    while raw.len() < 10 * 1024 * 1024 {
        if i.is_multiple_of(1000) {
            raw.extend_from_slice(b"..stuffed line\r\n");
        }
        raw.extend_from_slice(format!("{i:08} ").as_bytes());
        raw.extend_from_slice(&[b'a' + (i % 26) as u8; 89]);
        raw.extend_from_slice(b"\r\n");
        i += 1;
    }
    let started = Instant::now();
    c.send("MAIL FROM:<alice@contoso.test>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
        .await;
    c.line().await;
    c.line().await;
    assert!(c.line().await.starts_with("354 "));
    c.send([&raw[..], b".\r\n"].concat()).await;
    assert!(c.line().await.starts_with("250 2.0.0 OK"));
    let elapsed = started.elapsed();
    c.send("QUIT\r\n").await;
    assert!(c.line().await.starts_with("221 "));

    let msgs = smtp.wait_for_messages(3).await;
    assert_eq!(
        msgs[0].rcpt_to,
        vec![
            "bob@example.com".to_string(),
            "carol@example.com".to_string()
        ]
    );
    assert_eq!(msgs[0].message, b"Subject: pipelined\r\n\r\nhi\r\n");
    assert!(msgs[1].bdat);
    assert_eq!(msgs[1].mail_from, "");
    assert_eq!(msgs[1].message, b".hello\n world\r\n");
    assert_eq!(msgs[1].raw_data, msgs[1].message);
    assert_eq!(msgs[2].raw_data, raw);
    assert_eq!(msgs[2].message, unstuff(&raw));
    assert!(
        elapsed < Duration::from_secs(3),
        "10 MiB DATA took {elapsed:?}"
    );
}

#[tokio::test]
async fn imap_implicit_tls_sasl_ir_append_fetch_idle() {
    let idp = FakeIdp::start().await;
    let token = idp.seed_access_token(USER);
    let imap = FakeImap::start(idp.validator(), ImapOptions::default()).await;
    let mut c = Client::tls(imap.addr()).await;
    let greeting = c.line().await;
    assert!(
        greeting.starts_with("* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2 ")
            && greeting.ends_with("] fake ready"),
        "{greeting}"
    );

    c.send("a0 LOGIN alice secret\r\n").await;
    assert_eq!(c.line().await, "a0 NO LOGIN failed.");
    c.send("a1 AUTHENTICATE XOAUTH2 ").await;
    c.send(format!("{}\r\n", xoauth2_blob(USER, "bogus"))).await;
    assert_eq!(c.line().await, "a1 NO AUTHENTICATE failed.");
    c.send(auth_line("a2 AUTHENTICATE XOAUTH2", USER, &token))
        .await;
    assert_eq!(c.line().await, "a2 OK AUTHENTICATE completed.");

    let msg1: &[u8] = b"Subject: appended\r\n\r\nHello\r\n.dot line\r\n";
    c.send(format!("a3 APPEND INBOX (\\Seen) {{{}}}\r\n", msg1.len()))
        .await;
    assert_eq!(c.line().await, "+ Ready for literal data");
    c.send([msg1, b"\r\n"].concat()).await;
    assert!(c.line().await.starts_with("a3 OK [APPENDUID 14 4] APPEND"));
    let msg2: &[u8] = b"Subject: non-sync\r\n\r\nliteral+\r\n";
    c.send(
        [
            format!("a4 APPEND INBOX {{{}+}}\r\n", msg2.len()).as_bytes(),
            msg2,
            b"\r\n",
        ]
        .concat(),
    )
    .await;
    assert!(c.line().await.starts_with("a4 OK "));

    c.send("a5 SELECT INBOX\r\n").await;
    let sel = c.lines_until("a5 ").await;
    assert!(sel.contains(&"* 5 EXISTS".to_string()), "{sel:?}");
    assert!(sel.last().unwrap().starts_with("a5 OK [READ-WRITE]"));

    c.send("a6 FETCH 4 BODY[]\r\n").await;
    assert_eq!(
        c.line().await,
        format!("* 4 FETCH (BODY[] {{{}}}", msg1.len())
    );
    assert_eq!(c.exact(msg1.len()).await, msg1);
    assert_eq!(c.line().await, ")");
    assert_eq!(c.line().await, "a6 OK FETCH completed.");

    c.send("a7 IDLE\r\n").await;
    assert_eq!(c.line().await, "+ idling");
    c.send("DONE\r\n").await;
    assert_eq!(c.line().await, "a7 OK IDLE completed.");
    c.send("a8 LOGOUT\r\n").await;
    assert!(c.line().await.starts_with("* BYE"));
    assert_eq!(c.line().await, "a8 OK LOGOUT completed.");

    assert_eq!(imap.appended(), vec![msg1.to_vec(), msg2.to_vec()]);
    assert_eq!(imap.authenticated_mailboxes(), vec![USER.to_string()]);
    assert_eq!(
        (
            imap.auth_attempts(),
            imap.auth_successes(),
            imap.auth_failures()
        ),
        (2, 1, 1)
    );
    assert!(imap.non_xoauth2_auth_attempted());
    assert_eq!(imap.idle_count(), 1);
    assert_eq!(imap.connections(), 1);
    assert_eq!(imap.command_lines()[0], "a0 LOGIN alice secret");
}

#[tokio::test]
async fn imap_starttls_capabilities() {
    let idp = FakeIdp::start().await;
    let token = idp.seed_access_token(USER);
    let opts = ImapOptions {
        tls: TlsMode::StartTls,
        ..ImapOptions::default()
    };
    let imap = FakeImap::start(idp.validator(), opts).await;
    let mut c = Client::plain(imap.addr()).await;
    let greeting = c.line().await;
    assert!(greeting.contains("STARTTLS LOGINDISABLED"), "{greeting}");
    assert!(!greeting.contains("AUTH="), "{greeting}");
    c.send(auth_line("a1 AUTHENTICATE XOAUTH2", USER, &token))
        .await;
    assert_eq!(c.line().await, "a1 NO AUTHENTICATE failed.");
    c.send("a2 STARTTLS\r\n").await;
    assert!(c.line().await.starts_with("a2 OK "));
    let mut c = c.starttls().await;
    c.send("a3 CAPABILITY\r\n").await;
    let caps = c.line().await;
    assert!(caps.contains("AUTH=XOAUTH2") && !caps.contains("STARTTLS"));
    assert_eq!(c.line().await, "a3 OK CAPABILITY completed.");
    c.send("a4 AUTHENTICATE XOAUTH2\r\n").await;
    assert_eq!(c.line().await, "+ ");
    c.send(format!("{}\r\n", xoauth2_blob(USER, &token))).await;
    assert_eq!(c.line().await, "a4 OK AUTHENTICATE completed.");
    assert_eq!(imap.auth_without_tls(), 1);
    assert_eq!(imap.starttls_count(), 1);
    assert_eq!(imap.auth_attempts(), 1);
}

#[tokio::test]
async fn pop3_implicit_tls_xoauth2_and_retr() {
    let idp = FakeIdp::start().await;
    let token = idp.seed_access_token(USER);
    let pop = FakePop3::start(idp.validator(), Pop3Options::default()).await;

    // A bad token first.
    let mut c = Client::tls(pop.addr()).await;
    c.line().await;
    c.send(auth_line("AUTH XOAUTH2", USER, "bad")).await;
    assert_eq!(c.line().await, POP3_AUTH_FAILED);
    drop(c);

    let mut c = Client::tls(pop.addr()).await;
    assert_eq!(
        c.line().await,
        "+OK The Microsoft Exchange POP3 service is ready."
    );
    c.send("CAPA\r\n").await;
    let capa = c.lines_until(".").await;
    assert_eq!(
        capa,
        [
            "+OK",
            "TOP",
            "UIDL",
            "SASL XOAUTH2",
            "USER",
            "PIPELINING",
            "RESP-CODES",
            "."
        ]
    );
    c.send("USER alice\r\n").await;
    assert!(c.line().await.starts_with("-ERR"));
    c.send("STAT\r\n").await;
    assert!(c.line().await.starts_with("-ERR"));
    c.send("AUTH XOAUTH2\r\n").await;
    assert_eq!(c.line().await, "+ ");
    c.send(format!("{}\r\n", xoauth2_blob(USER, &token))).await;
    assert!(c.line().await.starts_with("+OK"));
    c.send("STAT\r\nLIST\r\n").await;
    assert_eq!(c.line().await, "+OK 2 320");
    assert_eq!(c.line().await, "+OK 2 320");
    assert_eq!(c.dot_body().await, b"1 160\r\n2 160\r\n");
    c.send("RETR 2\r\n").await;
    assert_eq!(c.line().await, "+OK 160 octets");
    let body = c.dot_body().await;
    assert!(
        body.windows(22).any(|w| w == b"\r\n..leading dot line\r\n"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(unstuff(&body), pop.mailbox()[1]);
    c.send("QUIT\r\n").await;
    assert!(c.line().await.starts_with("+OK"));

    assert_eq!(pop.connections(), 2);
    assert_eq!(
        (
            pop.auth_attempts(),
            pop.auth_successes(),
            pop.auth_failures()
        ),
        (2, 1, 1)
    );
    assert!(pop.non_xoauth2_auth_attempted());
    assert_eq!(pop.retrieved(), vec![2]);
}

#[tokio::test]
async fn pop3_stls() {
    let idp = FakeIdp::start().await;
    let token = idp.seed_access_token(USER);
    let opts = Pop3Options {
        tls: TlsMode::StartTls,
        ..Pop3Options::default()
    };
    let pop = FakePop3::start(idp.validator(), opts).await;
    let mut c = Client::plain(pop.addr()).await;
    c.line().await;
    c.send("CAPA\r\n").await;
    let capa = c.lines_until(".").await;
    assert!(capa.contains(&"STLS".to_string()) && !capa.iter().any(|l| l.starts_with("SASL")));
    c.send("STLS\r\n").await;
    assert!(c.line().await.starts_with("+OK"));
    let mut c = c.starttls().await;
    c.send("CAPA\r\n").await;
    let capa = c.lines_until(".").await;
    assert!(capa.contains(&"SASL XOAUTH2".to_string()) && !capa.contains(&"STLS".to_string()));
    c.send(auth_line("AUTH XOAUTH2", USER, &token)).await;
    assert_eq!(c.line().await, "+OK User successfully authenticated.");
    assert_eq!(pop.starttls_count(), 1);
}
