//! The SMTP submission front end. Before authentication authswap speaks for
//! itself (greeting, EHLO/HELO, STARTTLS when a certificate is configured,
//! AUTH PLAIN/LOGIN); it then logs in upstream (EHLO, STARTTLS, EHLO,
//! AUTH XOAUTH2), answers `235` and splices the streams, so MAIL, RCPT, DATA,
//! BDAT and everything after pass byte-exact and are never held in memory.

use super::line::{BoxIo, LineIo};
use super::mail::{upstream_line, upstream_send, LoginFailure, MailFrontEnd, UpstreamLogin};
use super::sasl;
use super::session::{self, Dialect, Mech, Next, Session, Words};
use crate::config::UpstreamTls;
use crate::identity::Identity;
use crate::secret::Secret;
use crate::token::refusal;
use crate::token::AccessToken;
use bytes::Bytes;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Upstream extensions passed on in our EHLO answer.
const RELAYED_EXTENSIONS: &[&str] = &[
    "SIZE",
    "8BITMIME",
    "PIPELINING",
    "SMTPUTF8",
    "CHUNKING",
    "BINARYMIME",
    "DSN",
    "ENHANCEDSTATUSCODES",
];
/// Advertised when the upstream's extensions are not known yet.
const DEFAULT_EXTENSIONS: &[&str] = &["SIZE", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES"];
/// How long a learned extension list is trusted.
const EXTENSIONS_TTL: Duration = Duration::from_secs(600);
/// After a failed probe of the upstream's extensions, wait this long
/// before probing again (EHLO answers use the safe set meanwhile).
const PROBE_RETRY: Duration = Duration::from_secs(60);
/// How long the capability probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// An SMTP reply: code and text lines.
#[derive(Debug)]
struct Reply {
    code: u16,
    lines: Vec<String>,
}

async fn read_reply(io: &mut LineIo<BoxIo>, timeout: Duration) -> Result<Reply, UpstreamLogin> {
    let mut lines = Vec::new();
    loop {
        let line = upstream_line(io, timeout, "a reply").await?;
        if line.len() < 3 || lines.len() > 200 {
            return Err(UpstreamLogin::unexpected("a reply", &line));
        }
        let code: u16 = std::str::from_utf8(&line[..3])
            .ok()
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| UpstreamLogin::unexpected("a reply", &line))?;
        let more = line.get(3) == Some(&b'-');
        lines.push(String::from_utf8_lossy(line.get(4..).unwrap_or_default()).into_owned());
        if !more {
            return Ok(Reply { code, lines });
        }
    }
}

/// A reply that does not fit the step, quoted.
fn unexpected(step: &'static str, reply: &Reply) -> UpstreamLogin {
    UpstreamLogin::Unexpected {
        step,
        said: format!("{} {}", reply.code, reply.lines.join(" ")),
    }
}

async fn command(
    io: &mut LineIo<BoxIo>,
    line: &str,
    timeout: Duration,
) -> Result<Reply, UpstreamLogin> {
    upstream_send(io, format!("{line}\r\n").as_bytes()).await?;
    read_reply(io, timeout).await
}

fn extensions(reply: &Reply) -> Vec<String> {
    reply.lines.iter().skip(1).cloned().collect()
}

fn has_extension(ext: &[String], name: &str) -> bool {
    ext.iter().any(|e| {
        e.split_whitespace()
            .next()
            .is_some_and(|k| k.eq_ignore_ascii_case(name))
    })
}

/// `message` ready for `DATA`: lines end in CRLF, a leading `.` is doubled
/// (RFC 5321 4.5.2), and the terminating `.` line is appended.
pub fn dot_stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 64);
    let mut at_line_start = true;
    let mut prev = 0u8;
    for &b in message {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        at_line_start = b == b'\n';
        prev = b;
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// The SMTP front end.
pub struct Smtp {
    front: Arc<MailFrontEnd>,
    learned: Mutex<Option<(Instant, Vec<String>)>>,
    probe_failed: Mutex<Option<Instant>>,
}

impl Smtp {
    /// Wraps the shared front end.
    pub fn new(front: Arc<MailFrontEnd>) -> Arc<Smtp> {
        Arc::new(Smtp {
            front,
            learned: Mutex::new(None),
            probe_failed: Mutex::new(None),
        })
    }

    /// The shared front end.
    pub fn front(&self) -> &Arc<MailFrontEnd> {
        &self.front
    }

    /// Connects and greets the upstream up to (not including) AUTH: EHLO,
    /// STARTTLS (required unless implicit TLS), EHLO again.
    async fn open_upstream(
        &self,
        helo: &str,
    ) -> Result<(LineIo<BoxIo>, Vec<String>), UpstreamLogin> {
        let front = &self.front;
        let t = front.cfg.upstream_timeout;
        let (mut up, tls) = front.connect_upstream().await?;
        let greeting = read_reply(&mut up, t).await?;
        if greeting.code != 220 {
            return Err(unexpected("the greeting", &greeting));
        }
        let mut ehlo = command(&mut up, &format!("EHLO {helo}"), t).await?;
        if ehlo.code != 250 {
            return Err(unexpected("EHLO", &ehlo));
        }
        if !tls {
            debug_assert_eq!(front.cfg.upstream_tls, UpstreamTls::Starttls);
            if !has_extension(&extensions(&ehlo), "STARTTLS") {
                return Err(UpstreamLogin::NoTls("STARTTLS"));
            }
            let r = command(&mut up, "STARTTLS", t).await?;
            if r.code != 220 {
                return Err(UpstreamLogin::NoTls("STARTTLS"));
            }
            up = front.upgrade_upstream(up).await?;
            ehlo = command(&mut up, &format!("EHLO {helo}"), t).await?;
            if ehlo.code != 250 {
                return Err(unexpected("EHLO", &ehlo));
            }
        }
        let ext = extensions(&ehlo);
        if let Ok(mut g) = self.learned.lock() {
            *g = Some((Instant::now(), ext.clone()));
        }
        Ok((up, ext))
    }

    /// One upstream login with `token`.
    async fn upstream_login(
        &self,
        helo: &str,
        mailbox: &str,
        token: &Secret,
    ) -> Result<LineIo<BoxIo>, UpstreamLogin> {
        Ok(self.authenticate(helo, mailbox, token).await?.0)
    }

    /// Logs in upstream with `token` and says `QUIT`: proves that the
    /// upstream accepts the token for `mailbox` (validation). Returns the
    /// upstream's `235` answer.
    pub async fn probe(&self, mailbox: &str, token: &Secret) -> Result<String, UpstreamLogin> {
        let t = self.front.cfg.upstream_timeout;
        let helo = self.front.cfg.hostname.clone();
        let (mut up, answer) = self.authenticate(&helo, mailbox, token).await?;
        let _ = command(&mut up, "QUIT", t).await;
        Ok(answer)
    }

    /// Logs in upstream as `mailbox` with `token` and submits one message:
    /// `MAIL FROM:<from>`, `RCPT TO:<..>` for each of `to`, `DATA` with
    /// `message` (a complete RFC 5322 message; dot-stuffed here), `QUIT`.
    /// Returns the upstream's answer to the end of `DATA`. A refused
    /// envelope or message is [`UpstreamLogin::Unexpected`] with the
    /// upstream's words.
    pub async fn send_message(
        &self,
        mailbox: &str,
        token: &Secret,
        from: &str,
        to: &[String],
        message: &[u8],
    ) -> Result<String, UpstreamLogin> {
        let t = self.front.cfg.upstream_timeout;
        let helo = self.front.cfg.hostname.clone();
        let (mut up, _) = self.authenticate(&helo, mailbox, token).await?;
        let clean = |a: &str| {
            a.chars()
                .filter(|c| !c.is_control() && *c != '<' && *c != '>')
                .collect::<String>()
        };
        let r = command(&mut up, &format!("MAIL FROM:<{}>", clean(from)), t).await?;
        if r.code != 250 {
            return Err(unexpected("MAIL FROM", &r));
        }
        for rcpt in to {
            let r = command(&mut up, &format!("RCPT TO:<{}>", clean(rcpt)), t).await?;
            if r.code != 250 && r.code != 251 {
                return Err(unexpected("RCPT TO", &r));
            }
        }
        let r = command(&mut up, "DATA", t).await?;
        if r.code != 354 {
            return Err(unexpected("DATA", &r));
        }
        upstream_send(&mut up, &dot_stuff(message)).await?;
        let r = read_reply(&mut up, t).await?;
        if r.code != 250 {
            return Err(unexpected("the end of DATA", &r));
        }
        let _ = command(&mut up, "QUIT", t).await;
        Ok(format!("{} {}", r.code, r.lines.join(" ")))
    }

    /// Logs in upstream with `token`; returns the connection and the
    /// upstream's success answer.
    async fn authenticate(
        &self,
        helo: &str,
        mailbox: &str,
        token: &Secret,
    ) -> Result<(LineIo<BoxIo>, String), UpstreamLogin> {
        let t = self.front.cfg.upstream_timeout;
        let (mut up, _) = self.open_upstream(helo).await?;
        let ir = sasl::xoauth2(mailbox, token);
        let mut reply = command(&mut up, &format!("AUTH XOAUTH2 {}", ir.expose()), t).await?;
        if reply.code == 334 {
            // Error details as a challenge: answer with an empty line.
            reply = command(&mut up, "", t).await?;
        }
        match reply.code {
            235 => Ok((up, format!("235 {}", reply.lines.join(" ")))),
            535 | 534 | 530 => Err(UpstreamLogin::Rejected(refusal::smtp(
                reply.code,
                &reply.lines.join(" "),
            ))),
            c if (400..500).contains(&c) => Err(UpstreamLogin::Temporary(format!(
                "{c} {}",
                reply.lines.join(" ")
            ))),
            _ => Err(unexpected("AUTH XOAUTH2", &reply)),
        }
    }

    async fn advertised(&self, helo: &str) -> Vec<String> {
        let fresh = self
            .learned
            .lock()
            .ok()
            .and_then(|g| g.clone())
            .filter(|(at, _)| at.elapsed() < EXTENSIONS_TTL)
            .map(|(_, e)| e);
        let recently_failed = self
            .probe_failed
            .lock()
            .ok()
            .and_then(|g| *g)
            .is_some_and(|at| at.elapsed() < PROBE_RETRY);
        let ext = match fresh {
            Some(e) => Some(e),
            None if recently_failed => None,
            None => {
                // Learn them once, quickly; fall back to a safe set.
                let probe = async {
                    let (mut up, ext) = self.open_upstream(helo).await?;
                    let _ = up.send(b"QUIT\r\n").await;
                    Ok::<_, UpstreamLogin>(ext)
                };
                let learned = match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
                    Ok(Ok(ext)) => Some(ext),
                    Ok(Err(e)) => {
                        use crate::error::Failure as _;
                        tracing::warn!(upstream = %self.front.cfg.upstream, error = %crate::token::idp::error_chain(&e), origin = ?e.origin(), retry_in = ?PROBE_RETRY, "cannot learn the SMTP upstream's extensions; advertising a safe set");
                        None
                    }
                    Err(_) => {
                        tracing::warn!(upstream = %self.front.cfg.upstream, waited = ?PROBE_TIMEOUT, retry_in = ?PROBE_RETRY, "the SMTP upstream did not answer the capability probe in time; advertising a safe set");
                        None
                    }
                };
                if learned.is_none() {
                    if let Ok(mut g) = self.probe_failed.lock() {
                        *g = Some(Instant::now());
                    }
                }
                learned
            }
        };
        match ext {
            Some(ext) => ext
                .into_iter()
                .filter(|e| {
                    let key = e.split_whitespace().next().unwrap_or("");
                    RELAYED_EXTENSIONS
                        .iter()
                        .any(|r| r.eq_ignore_ascii_case(key))
                })
                .collect(),
            None => DEFAULT_EXTENSIONS.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The state of a new client session.
    pub(crate) fn dialect(self: &Arc<Self>) -> SmtpSession {
        SmtpSession {
            smtp: self.clone(),
            helo: None,
        }
    }
}

/// One SMTP client session, as the session driver sees it.
pub(crate) struct SmtpSession {
    smtp: Arc<Smtp>,
    /// The client's EHLO/HELO name (AUTH needs one).
    helo: Option<String>,
}

impl SmtpSession {
    fn host(&self) -> &str {
        &self.smtp.front.cfg.hostname
    }
}

impl Dialect for SmtpSession {
    /// The client's EHLO name, used upstream too.
    type Ctx = String;
    type Upstream = LineIo<BoxIo>;

    fn greeting(&self, _tls: bool) -> String {
        format!("220 {} ESMTP authswap ready\r\n", self.host())
    }

    async fn command(&mut self, s: &mut Session<'_>, line: Bytes) -> Next<String> {
        // The verb is read from the bytes: the rest of an AUTH line is a
        // credential and is not copied into a string.
        let (verb, rest) = match line.iter().position(|&b| b == b' ') {
            Some(i) => (&line[..i], line.slice(i + 1..)),
            None => (&line[..], Bytes::new()),
        };
        let verb = String::from_utf8_lossy(verb).trim().to_ascii_uppercase();
        if verb == "AUTH" {
            let Some(helo) = self.helo.clone() else {
                return Next::Error("503 5.5.1 Send EHLO first\r\n".into());
            };
            let (mech, initial) = session::sasl_request(&rest);
            drop((line, rest));
            return match mech.as_str() {
                "PLAIN" => Next::Sasl {
                    ctx: helo,
                    mech: Mech::Plain,
                    initial,
                },
                "LOGIN" => Next::Sasl {
                    ctx: helo,
                    mech: Mech::Login,
                    initial,
                },
                "" => Next::Reply("501 5.5.4 Syntax: AUTH mechanism\r\n".into()),
                _ => Next::Reply(
                    "504 5.5.4 Unrecognized authentication type; use PLAIN or LOGIN\r\n".into(),
                ),
            };
        }
        let arg = String::from_utf8_lossy(&rest).trim().to_owned();
        let host = self.host().to_owned();
        let reply = match verb.as_str() {
            "EHLO" | "HELO" if arg.is_empty() => "501 5.5.4 Syntax: EHLO hostname".into(),
            "EHLO" => {
                self.helo = Some(arg.clone());
                let mut lines = vec![format!("{host} Hello {arg}"), "AUTH LOGIN PLAIN".into()];
                if self.smtp.front.acceptor.is_some() && !s.tls {
                    lines.push("STARTTLS".into());
                }
                lines.extend(self.smtp.advertised(&arg).await);
                let n = lines.len();
                lines
                    .iter()
                    .enumerate()
                    .map(|(i, l)| format!("250{}{l}", if i + 1 == n { ' ' } else { '-' }))
                    .collect::<Vec<_>>()
                    .join("\r\n")
            }
            "HELO" => {
                self.helo = Some(arg.clone());
                format!("250 {host} Hello {arg}")
            }
            "STARTTLS" if self.smtp.front.acceptor.is_some() && !s.tls => {
                return Next::StartTls("220 2.0.0 Ready to start TLS\r\n".into())
            }
            "STARTTLS" => "502 5.5.1 STARTTLS not available".into(),
            "MAIL" | "RCPT" | "DATA" | "BDAT" => "530 5.7.0 Authentication required".into(),
            "RSET" | "NOOP" => "250 2.0.0 OK".into(),
            "QUIT" => return Next::Close(format!("221 2.0.0 {host} Bye\r\n")),
            "HELP" => "214 2.0.0 Authenticate with AUTH PLAIN or AUTH LOGIN".into(),
            "VRFY" => "252 2.5.2 Cannot VRFY user".into(),
            _ => return Next::Error("500 5.5.2 Command not recognized\r\n".into()),
        };
        Next::Reply(format!("{reply}\r\n"))
    }

    fn upgraded(&mut self) {
        // RFC 3207: the client starts over with EHLO.
        self.helo = None;
    }

    fn sasl_prompt(&self, challenge: &str) -> String {
        format!("334 {challenge}\r\n")
    }

    fn sasl_refused(&self, _helo: &String, cancelled: bool) -> String {
        if cancelled {
            "501 5.7.0 Authentication cancelled\r\n".into()
        } else {
            "501 5.5.2 Cannot decode the authentication response\r\n".into()
        }
    }

    async fn upstream_login(
        &self,
        identity: &Identity,
        token: &AccessToken,
        helo: &String,
    ) -> Result<LineIo<BoxIo>, UpstreamLogin> {
        self.smtp
            .upstream_login(helo, &identity.mailbox, token.secret())
            .await
    }

    fn logged_in(&self, _helo: &String, upstream: LineIo<BoxIo>) -> (Vec<u8>, LineIo<BoxIo>) {
        (
            b"235 2.7.0 Authentication successful\r\n".to_vec(),
            upstream,
        )
    }

    fn failure(&self, _helo: &String, failure: LoginFailure) -> String {
        let reply = match failure {
            LoginFailure::BadCredentials | LoginFailure::Locked => {
                "535 5.7.8 Authentication credentials invalid".to_owned()
            }
            LoginFailure::Reauth { identity } => format!(
                "535 5.7.8 Identity {identity} needs re-authentication: an administrator must run authswap identity login {identity}"
            ),
            LoginFailure::RefusedFresh => {
                "454 4.7.0 Temporary authentication failure: the mail server refused freshly issued access tokens, try again later".to_owned()
            }
            // The upstream's own reply (code first), passed through.
            LoginFailure::UpstreamRefused { text } => text,
            LoginFailure::Unavailable | LoginFailure::UpstreamTemporary => {
                "454 4.7.0 Temporary authentication failure, try again later".to_owned()
            }
            LoginFailure::UpstreamFailed => {
                "421 4.4.2 Mail server unreachable, closing connection".to_owned()
            }
            LoginFailure::Busy => {
                "454 4.7.0 Too many sessions for this identity, try again later".to_owned()
            }
        };
        format!("{reply}\r\n")
    }

    const WORDS: Words = Words {
        timeout: "421 4.4.2 {host} Idle timeout, closing connection\r\n",
        too_long: "500 5.5.6 Line too long\r\n",
        too_many_errors: "421 4.7.0 Too many errors, closing connection\r\n",
        shutdown: "421 4.3.2 {host} Service shutting down, closing connection\r\n",
    };

    fn say(&self, line: &'static str) -> String {
        line.replace("{host}", self.host())
    }
}

#[cfg(test)]
mod tests {
    use super::dot_stuff;

    #[test]
    fn dot_stuffing_doubles_leading_dots_and_ends_with_the_dot_line() {
        assert_eq!(dot_stuff(b"a\r\n.b\r\n"), b"a\r\n..b\r\n.\r\n");
        assert_eq!(dot_stuff(b".\nx"), b"..\r\nx\r\n.\r\n");
        assert_eq!(dot_stuff(b""), b"\r\n.\r\n");
    }
}
