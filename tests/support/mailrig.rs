//! The mail test rig: authswap with its SMTP, IMAP and POP3 front ends in
//! front of the upstream doubles, a raw line client, and real-client
//! helpers (lettre). Shared by the mail behaviour tests.

use super::harness::Env;
use super::mail::{FakeImap, FakePop3, FakeSmtp, ImapOptions, Pop3Options, SmtpOptions, TlsMode};
use authswap::config::{Config, UpstreamTls};
use authswap::server::Server;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// One test's mail world: authswap with SMTP, IMAP and POP3 on, and the
/// three upstream doubles.
pub struct Mail {
    pub env: Env,
    pub server: Server,
    pub smtp: FakeSmtp,
    pub imap: FakeImap,
    pub pop3: FakePop3,
}

/// Starts the doubles with these options and authswap in front of them,
/// with `alice` (password `alice-pw-123`) linked; `tweak` adjusts the
/// configuration.
pub async fn start_with(
    smtp: SmtpOptions,
    imap: ImapOptions,
    pop3: Pop3Options,
    tweak: impl FnOnce(&mut Config) + Send + 'static,
) -> Mail {
    let env = Env::start().await;
    env.add_linked("alice", "alice@contoso.com", "alice-pw-123")
        .await;
    start_in(env, smtp, imap, pop3, tweak).await
}

/// [`start_with`] in an `env` the caller prepared (identities, tenants).
pub async fn start_in(
    env: Env,
    smtp: SmtpOptions,
    imap: ImapOptions,
    pop3: Pop3Options,
    tweak: impl FnOnce(&mut Config) + Send + 'static,
) -> Mail {
    let v = env.idp.validator();
    let smtp_tls = smtp.tls;
    let imap_tls = imap.tls;
    let pop3_tls = pop3.tls;
    let smtp = FakeSmtp::start(v.clone(), smtp).await;
    let imap = FakeImap::start(v.clone(), imap).await;
    let pop3 = FakePop3::start(v, pop3).await;
    let mode = |t: TlsMode| match t {
        TlsMode::Implicit => UpstreamTls::Implicit,
        TlsMode::StartTls => UpstreamTls::Starttls,
    };
    let (sp, ip, pp) = (smtp.port(), imap.port(), pop3.port());
    let server = env
        .serve_with(move |c| {
            c.smtp.enabled = true;
            c.smtp.upstream = format!("localhost:{sp}");
            c.smtp.upstream_tls = mode(smtp_tls);
            c.imap.enabled = true;
            c.imap.upstream = format!("localhost:{ip}");
            c.imap.upstream_tls = mode(imap_tls);
            c.pop3.enabled = true;
            c.pop3.upstream = format!("localhost:{pp}");
            c.pop3.upstream_tls = mode(pop3_tls);
            for m in [&mut c.smtp, &mut c.imap, &mut c.pop3] {
                m.idle_timeout = Duration::from_secs(3);
                m.upstream_timeout = Duration::from_secs(5);
            }
            tweak(c);
        })
        .await;
    Mail {
        env,
        server,
        smtp,
        imap,
        pop3,
    }
}

/// [`start_with`] without a tweak.
pub async fn start(smtp: SmtpOptions, imap: ImapOptions, pop3: Pop3Options) -> Mail {
    start_with(smtp, imap, pop3, |_| {}).await
}

/// Every double with default options.
pub async fn default_mail() -> Mail {
    start(
        SmtpOptions::default(),
        ImapOptions::default(),
        Pop3Options::default(),
    )
    .await
}

/// A line-oriented raw client.
pub struct Raw {
    pub r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    pub w: tokio::net::tcp::OwnedWriteHalf,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        let (r, w) = TcpStream::connect(addr).await.unwrap().into_split();
        Raw {
            r: BufReader::new(r),
            w,
        }
    }

    pub async fn line(&mut self) -> String {
        let mut s = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), self.r.read_line(&mut s))
            .await
            .expect("answer in time")
            .unwrap();
        if n == 0 {
            return String::new();
        }
        s
    }

    /// Reads an SMTP reply (all lines), returning the last.
    pub async fn reply(&mut self) -> String {
        loop {
            let l = self.line().await;
            if l.len() < 4 || l.as_bytes()[3] != b'-' {
                return l;
            }
        }
    }

    pub async fn send(&mut self, s: &[u8]) {
        self.w.write_all(s).await.unwrap();
    }

    pub async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(10), self.r.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

/// Standard base64.
pub fn b64(s: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A lettre SMTP transport to `addr` (plain, no TLS) with these credentials.
pub fn lettre_mailer(
    addr: SocketAddr,
    user: &str,
    pw: &str,
    mech: lettre::transport::smtp::authentication::Mechanism,
) -> lettre::AsyncSmtpTransport<lettre::Tokio1Executor> {
    use lettre::transport::smtp::authentication::Credentials;
    lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous(addr.ip().to_string())
        .port(addr.port())
        .credentials(Credentials::new(user.into(), pw.into()))
        .authentication(vec![mech])
        .timeout(Some(Duration::from_secs(20)))
        .build()
}

/// A small message from alice to bob.
pub fn message(body: &str) -> lettre::Message {
    lettre::Message::builder()
        .from("alice@contoso.com".parse().unwrap())
        .to("bob@example.com".parse().unwrap())
        .subject("quarterly report")
        .body(body.to_owned())
        .unwrap()
}
