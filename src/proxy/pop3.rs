//! The POP3 front end. Before authentication authswap answers CAPA
//! (rewritten: `USER`, `SASL PLAIN`, `STLS` with a certificate), USER/PASS,
//! AUTH PLAIN, STLS and QUIT; it then logs in upstream (implicit TLS or STLS,
//! AUTH XOAUTH2) and splices the streams.

use super::line::{BoxIo, LineError, LineIo};
use super::mail::{splice, LoginFailure, MailFrontEnd, UpstreamLogin};
use super::sasl::{self, Credentials};
use crate::secret::Secret;
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Protocol errors tolerated before the connection is closed.
const MAX_ERRORS: u32 = 10;

/// The POP3 front end.
pub struct Pop3 {
    front: Arc<MailFrontEnd>,
}

async fn read(io: &mut LineIo<BoxIo>, t: Duration) -> Result<Bytes, UpstreamLogin> {
    tokio::time::timeout(t, io.read_line())
        .await
        .map_err(|_| UpstreamLogin::Failed("upstream did not answer in time".into()))?
        .map_err(|e| UpstreamLogin::Failed(format!("reading upstream: {e}")))?
        .ok_or_else(|| UpstreamLogin::Failed("upstream closed the connection".into()))
}

async fn write(io: &mut LineIo<BoxIo>, data: &[u8]) -> Result<(), UpstreamLogin> {
    io.send(data)
        .await
        .map_err(|e| UpstreamLogin::Failed(format!("writing to upstream: {e}")))
}

impl Pop3 {
    /// Wraps the shared front end.
    pub fn new(front: Arc<MailFrontEnd>) -> Arc<Pop3> {
        Arc::new(Pop3 { front })
    }

    async fn upstream_login(
        &self,
        mailbox: &str,
        token: &Secret,
    ) -> Result<(LineIo<BoxIo>, Bytes), UpstreamLogin> {
        let t = self.front.cfg.upstream_timeout;
        let (mut up, tls) = self.front.connect_upstream().await?;
        let greeting = read(&mut up, t).await?;
        if !greeting.starts_with(b"+OK") {
            return Err(UpstreamLogin::Failed(
                "upstream greeting was not +OK".into(),
            ));
        }
        if !tls {
            write(&mut up, b"STLS\r\n").await?;
            let r = read(&mut up, t).await?;
            if !r.starts_with(b"+OK") {
                return Err(UpstreamLogin::Failed(
                    "upstream refused STLS; refusing to send a token in the clear".into(),
                ));
            }
            up = self.front.upgrade_upstream(up).await?;
        }
        write(&mut up, b"AUTH XOAUTH2\r\n").await?;
        let cont = read(&mut up, t).await?;
        if !cont.starts_with(b"+") || cont.starts_with(b"+OK") {
            return Err(if cont.starts_with(b"-ERR") {
                UpstreamLogin::Failed("upstream does not accept AUTH XOAUTH2".into())
            } else {
                UpstreamLogin::Failed("unexpected upstream answer to AUTH".into())
            });
        }
        let ir = sasl::xoauth2(mailbox, token);
        write(&mut up, format!("{}\r\n", ir.expose()).as_bytes()).await?;
        let mut answer = read(&mut up, t).await?;
        if answer.starts_with(b"+ ") || answer.as_ref() == b"+" {
            // Error details as a challenge: answer with an empty line.
            write(&mut up, b"\r\n").await?;
            answer = read(&mut up, t).await?;
        }
        if answer.starts_with(b"+OK") {
            Ok((up, answer))
        } else if answer
            .to_ascii_uppercase()
            .windows(10)
            .any(|w| w == b"[SYS/TEMP]")
        {
            Err(UpstreamLogin::Temporary(
                String::from_utf8_lossy(&answer).into_owned(),
            ))
        } else {
            Err(UpstreamLogin::Rejected(crate::token::refusal::pop3(
                &String::from_utf8_lossy(&answer),
            )))
        }
    }

    fn capa(&self, tls: bool) -> String {
        let mut s = String::from("+OK Capability list follows\r\nUSER\r\nSASL PLAIN\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n");
        if self.front.acceptor.is_some() && !tls {
            s.push_str("STLS\r\n");
        }
        s.push_str(".\r\n");
        s
    }

    /// Serves one client connection.
    pub async fn session(self: Arc<Self>, mut io: LineIo<BoxIo>, peer: SocketAddr, mut tls: bool) {
        let cfg = &self.front.cfg;
        if io.send(b"+OK authswap POP3 ready\r\n").await.is_err() {
            return;
        }
        let mut user: Option<String> = None;
        let mut errors = 0u32;
        loop {
            let line = match tokio::time::timeout(cfg.idle_timeout, io.read_line()).await {
                Err(_) => {
                    let _ = io.send(b"-ERR Idle timeout, closing connection\r\n").await;
                    return;
                }
                Ok(Ok(Some(l))) => l,
                Ok(Ok(None)) | Ok(Err(LineError::Io(_))) => return,
                Ok(Err(LineError::TooLong)) => {
                    errors += 1;
                    if self.err(&mut io, "-ERR Line too long", errors).await {
                        return;
                    }
                    continue;
                }
            };
            let text = String::from_utf8_lossy(&line).into_owned();
            let (verb, arg) = match text.split_once(' ') {
                Some((v, a)) => (v.to_ascii_uppercase(), a.to_owned()),
                None => (text.trim().to_ascii_uppercase(), String::new()),
            };
            let reply: String = match verb.as_str() {
                "CAPA" => self.capa(tls),
                "USER" if !arg.trim().is_empty() => {
                    user = Some(arg.trim().to_owned());
                    "+OK Send your password\r\n".into()
                }
                "USER" => "-ERR USER needs a name\r\n".into(),
                "PASS" => match user.take() {
                    None => "-ERR Send USER first\r\n".into(),
                    Some(name) => {
                        let creds = Credentials {
                            name,
                            password: Secret::new(arg),
                        };
                        match self.authenticate(&mut io, &creds, peer).await {
                            Ok(Some(up)) => return splice(io, up).await,
                            Ok(None) => continue,
                            Err(()) => return,
                        }
                    }
                },
                "AUTH" if arg.trim().is_empty() => "+OK\r\nPLAIN\r\n.\r\n".into(),
                "AUTH" => {
                    let mut words = arg.split_whitespace();
                    let mech = words.next().unwrap_or("").to_ascii_uppercase();
                    if mech != "PLAIN" {
                        "-ERR Unsupported mechanism; use PLAIN\r\n".into()
                    } else {
                        let response = match words.next() {
                            Some(ir) if ir != "=" => Bytes::from(ir.as_bytes().to_vec()),
                            _ => {
                                if io.send(b"+ \r\n").await.is_err() {
                                    return;
                                }
                                match tokio::time::timeout(cfg.idle_timeout, io.read_line()).await {
                                    Ok(Ok(Some(l))) => l,
                                    _ => return,
                                }
                            }
                        };
                        if response.trim_ascii() == b"*" {
                            "-ERR Authentication cancelled\r\n".into()
                        } else {
                            match sasl::decode_plain(&response) {
                                None => {
                                    self.front.undecodable();
                                    "-ERR Cannot decode the authentication response\r\n".into()
                                }
                                Some(creds) => match self.authenticate(&mut io, &creds, peer).await
                                {
                                    Ok(Some(up)) => return splice(io, up).await,
                                    Ok(None) => continue,
                                    Err(()) => return,
                                },
                            }
                        }
                    }
                }
                "STLS" if self.front.acceptor.is_some() && !tls => {
                    if io.send(b"+OK Begin TLS negotiation\r\n").await.is_err() {
                        return;
                    }
                    match self.front.upgrade_client(io).await {
                        Some(upgraded) => {
                            io = upgraded;
                            tls = true;
                            user = None;
                            continue;
                        }
                        None => return,
                    }
                }
                "STLS" => "-ERR STLS not available\r\n".into(),
                "QUIT" => {
                    let _ = io.send(b"+OK authswap signing off\r\n").await;
                    return;
                }
                "NOOP" => "+OK\r\n".into(),
                _ => {
                    errors += 1;
                    if self
                        .err(
                            &mut io,
                            "-ERR Unknown command or not allowed before authentication",
                            errors,
                        )
                        .await
                    {
                        return;
                    }
                    continue;
                }
            };
            if io.send(reply.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    async fn err(&self, io: &mut LineIo<BoxIo>, msg: &str, errors: u32) -> bool {
        if errors >= MAX_ERRORS {
            let _ = io
                .send(b"-ERR Too many errors, closing connection\r\n")
                .await;
            return true;
        }
        io.send(format!("{msg}\r\n").as_bytes()).await.is_err()
    }

    async fn authenticate(
        &self,
        io: &mut LineIo<BoxIo>,
        creds: &Credentials,
        peer: SocketAddr,
    ) -> Result<Option<LineIo<BoxIo>>, ()> {
        let result = self
            .front
            .login(creds, peer, |identity, token| async move {
                self.upstream_login(&identity.mailbox, token.secret()).await
            })
            .await;
        let reply = match result {
            Ok((_, (up, ok))) => {
                let mut out = ok.to_vec();
                out.extend_from_slice(b"\r\n");
                io.send(&out).await.map_err(|_| ())?;
                return Ok(Some(up));
            }
            Err(LoginFailure::BadCredentials | LoginFailure::Locked) => {
                "-ERR [AUTH] Authentication failed".to_owned()
            }
            Err(LoginFailure::Reauth { identity }) => format!(
                "-ERR [AUTH] Identity {identity} needs re-authentication: an administrator must run authswap identity login {identity}"
            ),
            Err(LoginFailure::RefusedFresh) => {
                "-ERR [SYS/TEMP] The mail server refused freshly issued access tokens, try again later".to_owned()
            }
            // The upstream's own line, passed through.
            Err(LoginFailure::UpstreamRefused { text }) => text,
            Err(LoginFailure::Unavailable | LoginFailure::UpstreamTemporary) => {
                "-ERR [SYS/TEMP] Temporary authentication failure, try again later".to_owned()
            }
            Err(LoginFailure::UpstreamFailed) => {
                let _ = io
                    .send(b"-ERR [SYS/TEMP] Mail server unreachable, closing connection\r\n")
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
