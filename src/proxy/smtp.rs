//! The SMTP submission front end. Before authentication authswap speaks for
//! itself (greeting, EHLO/HELO, STARTTLS when a certificate is configured,
//! AUTH PLAIN/LOGIN); it then logs in upstream (EHLO, STARTTLS, EHLO,
//! AUTH XOAUTH2), answers `235` and splices the streams, so MAIL, RCPT, DATA,
//! BDAT and everything after pass byte-exact and are never held in memory.

use super::line::{BoxIo, LineError, LineIo};
use super::mail::{splice, LoginFailure, MailFrontEnd, UpstreamLogin};
use super::sasl::{self, Credentials};
use crate::config::UpstreamTls;
use crate::secret::Secret;
use crate::token::refusal;
use std::net::SocketAddr;
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
/// Protocol errors tolerated before the connection is closed.
const MAX_ERRORS: u32 = 10;

/// An SMTP reply: code and text lines.
#[derive(Debug)]
struct Reply {
    code: u16,
    lines: Vec<String>,
}

async fn read_reply(io: &mut LineIo<BoxIo>, timeout: Duration) -> Result<Reply, UpstreamLogin> {
    let mut lines = Vec::new();
    loop {
        let line = tokio::time::timeout(timeout, io.read_line())
            .await
            .map_err(|_| UpstreamLogin::Failed("upstream did not answer in time".into()))?
            .map_err(|e| UpstreamLogin::Failed(format!("reading upstream reply: {e}")))?
            .ok_or_else(|| UpstreamLogin::Failed("upstream closed the connection".into()))?;
        if line.len() < 3 || lines.len() > 200 {
            return Err(UpstreamLogin::Failed("malformed upstream reply".into()));
        }
        let code: u16 = std::str::from_utf8(&line[..3])
            .ok()
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| UpstreamLogin::Failed("malformed upstream reply".into()))?;
        let more = line.get(3) == Some(&b'-');
        lines.push(String::from_utf8_lossy(line.get(4..).unwrap_or_default()).into_owned());
        if !more {
            return Ok(Reply { code, lines });
        }
    }
}

async fn command(
    io: &mut LineIo<BoxIo>,
    line: &str,
    timeout: Duration,
) -> Result<Reply, UpstreamLogin> {
    io.send(format!("{line}\r\n").as_bytes())
        .await
        .map_err(|e| UpstreamLogin::Failed(format!("writing to upstream: {e}")))?;
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

/// Sends a SASL challenge and reads the client's answer.
async fn step(io: &mut LineIo<BoxIo>, prompt: &str, timeout: Duration) -> Result<bytes::Bytes, ()> {
    io.send(prompt.as_bytes()).await.map_err(|_| ())?;
    match tokio::time::timeout(timeout, io.read_line()).await {
        Ok(Ok(Some(l))) => Ok(l),
        Err(_) => {
            let _ = io
                .send(b"421 4.4.2 Timeout waiting for the authentication response, closing connection\r\n")
                .await;
            Err(())
        }
        _ => Err(()),
    }
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
            return Err(UpstreamLogin::Failed(format!(
                "upstream greeting was {} {}",
                greeting.code,
                greeting.lines.join(" ")
            )));
        }
        let mut ehlo = command(&mut up, &format!("EHLO {helo}"), t).await?;
        if ehlo.code != 250 {
            return Err(UpstreamLogin::Failed(format!(
                "upstream refused EHLO: {}",
                ehlo.code
            )));
        }
        if !tls {
            debug_assert_eq!(front.cfg.upstream_tls, UpstreamTls::Starttls);
            if !has_extension(&extensions(&ehlo), "STARTTLS") {
                return Err(UpstreamLogin::Failed(
                    "upstream does not offer STARTTLS; refusing to send a token in the clear"
                        .into(),
                ));
            }
            let r = command(&mut up, "STARTTLS", t).await?;
            if r.code != 220 {
                return Err(UpstreamLogin::Failed(format!(
                    "upstream refused STARTTLS: {}",
                    r.code
                )));
            }
            up = front.upgrade_upstream(up).await?;
            ehlo = command(&mut up, &format!("EHLO {helo}"), t).await?;
            if ehlo.code != 250 {
                return Err(UpstreamLogin::Failed(format!(
                    "upstream refused EHLO: {}",
                    ehlo.code
                )));
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
        let t = self.front.cfg.upstream_timeout;
        let (mut up, _) = self.open_upstream(helo).await?;
        let ir = sasl::xoauth2(mailbox, token);
        let mut reply = command(&mut up, &format!("AUTH XOAUTH2 {}", ir.expose()), t).await?;
        if reply.code == 334 {
            // Error details as a challenge: answer with an empty line.
            reply = command(&mut up, "", t).await?;
        }
        match reply.code {
            235 => Ok(up),
            535 | 534 | 530 => Err(UpstreamLogin::Rejected(refusal::smtp(
                reply.code,
                &reply.lines.join(" "),
            ))),
            c if (400..500).contains(&c) => Err(UpstreamLogin::Temporary(format!(
                "{c} {}",
                reply.lines.join(" ")
            ))),
            c => Err(UpstreamLogin::Failed(format!(
                "upstream answered AUTH with {c} {}",
                reply.lines.join(" ")
            ))),
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
                let learned = tokio::time::timeout(Duration::from_secs(5), probe)
                    .await
                    .ok()
                    .and_then(Result::ok);
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

    /// Serves one client connection.
    pub async fn session(self: Arc<Self>, mut io: LineIo<BoxIo>, peer: SocketAddr, mut tls: bool) {
        let cfg = &self.front.cfg;
        let host = cfg.hostname.clone();
        if io
            .send(format!("220 {host} ESMTP authswap ready\r\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
        let mut helo: Option<String> = None;
        let mut errors = 0u32;
        loop {
            let line = match tokio::time::timeout(cfg.idle_timeout, io.read_line()).await {
                Err(_) => {
                    let _ = io
                        .send(
                            format!("421 4.4.2 {host} Idle timeout, closing connection\r\n")
                                .as_bytes(),
                        )
                        .await;
                    return;
                }
                Ok(Ok(Some(l))) => l,
                Ok(Ok(None)) | Ok(Err(LineError::Io(_))) => return,
                Ok(Err(LineError::TooLong)) => {
                    errors += 1;
                    if self.error(&mut io, "500 5.5.6 Line too long", errors).await {
                        return;
                    }
                    continue;
                }
            };
            let text = String::from_utf8_lossy(&line);
            let (verb, arg) = match text.split_once(' ') {
                Some((v, a)) => (v.to_ascii_uppercase(), a.trim().to_owned()),
                None => (text.trim().to_ascii_uppercase(), String::new()),
            };
            let reply: String = match verb.as_str() {
                "EHLO" | "HELO" if arg.is_empty() => "501 5.5.4 Syntax: EHLO hostname".into(),
                "EHLO" => {
                    helo = Some(arg.clone());
                    let mut lines = vec![format!("{host} Hello {arg}"), "AUTH LOGIN PLAIN".into()];
                    if self.front.acceptor.is_some() && !tls {
                        lines.push("STARTTLS".into());
                    }
                    lines.extend(self.advertised(&arg).await);
                    let n = lines.len();
                    lines
                        .iter()
                        .enumerate()
                        .map(|(i, l)| format!("250{}{l}", if i + 1 == n { ' ' } else { '-' }))
                        .collect::<Vec<_>>()
                        .join("\r\n")
                }
                "HELO" => {
                    helo = Some(arg.clone());
                    format!("250 {host} Hello {arg}")
                }
                "STARTTLS" if self.front.acceptor.is_some() && !tls => {
                    if io.send(b"220 2.0.0 Ready to start TLS\r\n").await.is_err() {
                        return;
                    }
                    match self.front.upgrade_client(io).await {
                        Some(upgraded) => {
                            io = upgraded;
                            tls = true;
                            helo = None;
                            continue;
                        }
                        None => return,
                    }
                }
                "STARTTLS" => "502 5.5.1 STARTTLS not available".into(),
                "AUTH" => {
                    let Some(helo_name) = helo.clone() else {
                        errors += 1;
                        if self
                            .error(&mut io, "503 5.5.1 Send EHLO first", errors)
                            .await
                        {
                            return;
                        }
                        continue;
                    };
                    match self.read_credentials(&mut io, &arg).await {
                        Ok(Some(creds)) => {
                            match self.authenticate(&mut io, &creds, peer, &helo_name).await {
                                Ok(Some(upstream)) => {
                                    splice(io, upstream).await;
                                    return;
                                }
                                Ok(None) => continue,
                                Err(()) => return,
                            }
                        }
                        Ok(None) => continue,
                        Err(()) => return,
                    }
                }
                "MAIL" | "RCPT" | "DATA" | "BDAT" => "530 5.7.0 Authentication required".into(),
                "RSET" | "NOOP" => "250 2.0.0 OK".into(),
                "QUIT" => {
                    let _ = io
                        .send(format!("221 2.0.0 {host} Bye\r\n").as_bytes())
                        .await;
                    return;
                }
                "HELP" => "214 2.0.0 Authenticate with AUTH PLAIN or AUTH LOGIN".into(),
                "VRFY" => "252 2.5.2 Cannot VRFY user".into(),
                _ => {
                    errors += 1;
                    if self
                        .error(&mut io, "500 5.5.2 Command not recognized", errors)
                        .await
                    {
                        return;
                    }
                    continue;
                }
            };
            if io.send(format!("{reply}\r\n").as_bytes()).await.is_err() {
                return;
            }
        }
    }

    /// Sends an error reply; returns true (after a 421) when the client has
    /// made too many errors and the connection must close.
    async fn error(&self, io: &mut LineIo<BoxIo>, reply: &str, errors: u32) -> bool {
        if errors >= MAX_ERRORS {
            let _ = io
                .send(b"421 4.7.0 Too many errors, closing connection\r\n")
                .await;
            return true;
        }
        io.send(format!("{reply}\r\n").as_bytes()).await.is_err()
    }

    /// Reads AUTH PLAIN / LOGIN credentials. `Ok(None)`: answered with an
    /// error, continue; `Err(())`: connection gone.
    async fn read_credentials(
        &self,
        io: &mut LineIo<BoxIo>,
        arg: &str,
    ) -> Result<Option<Credentials>, ()> {
        let mut parts = arg.split_whitespace();
        let mech = parts.next().unwrap_or("").to_ascii_uppercase();
        let initial = parts.next().map(str::to_owned);
        let timeout = self.front.cfg.idle_timeout;
        let cancelled = |l: &[u8]| l.trim_ascii() == b"*";
        let creds = match mech.as_str() {
            "PLAIN" => {
                let response = match initial {
                    Some(i) if i != "=" => bytes::Bytes::from(i.into_bytes()),
                    _ => step(io, "334 \r\n", timeout).await?,
                };
                if cancelled(&response) {
                    io.send(b"501 5.7.0 Authentication cancelled\r\n")
                        .await
                        .map_err(|_| ())?;
                    return Ok(None);
                }
                sasl::decode_plain(&response)
            }
            "LOGIN" => {
                let user = match initial {
                    Some(i) => bytes::Bytes::from(i.into_bytes()),
                    None => step(io, "334 VXNlcm5hbWU6\r\n", timeout).await?,
                };
                if cancelled(&user) {
                    io.send(b"501 5.7.0 Authentication cancelled\r\n")
                        .await
                        .map_err(|_| ())?;
                    return Ok(None);
                }
                let pass = step(io, "334 UGFzc3dvcmQ6\r\n", timeout).await?;
                if cancelled(&pass) {
                    io.send(b"501 5.7.0 Authentication cancelled\r\n")
                        .await
                        .map_err(|_| ())?;
                    return Ok(None);
                }
                match (
                    sasl::decode_login_step(&user),
                    sasl::decode_login_step(&pass),
                ) {
                    (Some(u), Some(p)) if !u.is_empty() => Some(Credentials {
                        name: u.expose().to_owned(),
                        password: p,
                    }),
                    _ => None,
                }
            }
            "" => {
                io.send(b"501 5.5.4 Syntax: AUTH mechanism\r\n")
                    .await
                    .map_err(|_| ())?;
                return Ok(None);
            }
            _ => {
                io.send(b"504 5.5.4 Unrecognized authentication type; use PLAIN or LOGIN\r\n")
                    .await
                    .map_err(|_| ())?;
                return Ok(None);
            }
        };
        match creds {
            Some(c) => Ok(Some(c)),
            None => {
                self.front.undecodable();
                io.send(b"501 5.5.2 Cannot decode the authentication response\r\n")
                    .await
                    .map_err(|_| ())?;
                Ok(None)
            }
        }
    }

    /// Logs in; on success answers 235 and returns the upstream connection.
    /// `Ok(None)`: refused, the session goes on; `Err(())`: close it.
    async fn authenticate(
        &self,
        io: &mut LineIo<BoxIo>,
        creds: &Credentials,
        peer: SocketAddr,
        helo: &str,
    ) -> Result<Option<LineIo<BoxIo>>, ()> {
        let result = self
            .front
            .login(creds, peer, |identity, token| async move {
                self.upstream_login(helo, &identity.mailbox, token.secret())
                    .await
            })
            .await;
        let reply = match result {
            Ok((_, upstream)) => {
                io.send(b"235 2.7.0 Authentication successful\r\n")
                    .await
                    .map_err(|_| ())?;
                return Ok(Some(upstream));
            }
            Err(LoginFailure::BadCredentials | LoginFailure::Locked) => {
                "535 5.7.8 Authentication credentials invalid".to_owned()
            }
            Err(LoginFailure::Reauth { identity }) => format!(
                "535 5.7.8 Identity {identity} needs re-authentication: an administrator must run authswap identity login {identity}"
            ),
            Err(LoginFailure::RefusedFresh) => {
                "454 4.7.0 Temporary authentication failure: the mail server refused freshly issued access tokens, try again later".to_owned()
            }
            // The upstream's own reply (code first), passed through.
            Err(LoginFailure::UpstreamRefused { text }) => text,
            Err(LoginFailure::Unavailable | LoginFailure::UpstreamTemporary) => {
                "454 4.7.0 Temporary authentication failure, try again later".to_owned()
            }
            Err(LoginFailure::UpstreamFailed) => {
                let _ = io
                    .send(b"421 4.4.2 Mail server unreachable, closing connection\r\n")
                    .await;
                return Err(());
            }
        };
        io.send(format!("{reply}\r\n").as_bytes())
            .await
            .map_err(|_| ())?;
        Ok(None)
    }
}
