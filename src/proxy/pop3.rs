//! The POP3 front end. Before authentication authswap answers CAPA
//! (rewritten: `USER`, `SASL PLAIN`, `STLS` with a certificate), USER/PASS,
//! AUTH PLAIN, STLS and QUIT; it then logs in upstream (implicit TLS or STLS,
//! AUTH XOAUTH2) and splices the streams.

use super::line::{BoxIo, LineIo};
use super::mail::{upstream_line, upstream_send, LoginFailure, MailFrontEnd, UpstreamLogin};
use super::sasl::{self, Credentials};
use super::session::{self, Dialect, Mech, Next, Session, Words};
use crate::identity::Identity;
use crate::secret::Secret;
use crate::token::AccessToken;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

/// The POP3 front end.
pub struct Pop3 {
    front: Arc<MailFrontEnd>,
}

async fn read(io: &mut LineIo<BoxIo>, t: Duration) -> Result<Bytes, UpstreamLogin> {
    upstream_line(io, t, "a command").await
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
            return Err(UpstreamLogin::unexpected("the greeting", &greeting));
        }
        if !tls {
            upstream_send(&mut up, b"STLS\r\n").await?;
            let r = read(&mut up, t).await?;
            if !r.starts_with(b"+OK") {
                return Err(UpstreamLogin::NoTls("STLS"));
            }
            up = self.front.upgrade_upstream(up).await?;
        }
        upstream_send(&mut up, b"AUTH XOAUTH2\r\n").await?;
        let cont = read(&mut up, t).await?;
        if !cont.starts_with(b"+") || cont.starts_with(b"+OK") {
            return Err(UpstreamLogin::unexpected("AUTH XOAUTH2", &cont));
        }
        let ir = sasl::xoauth2(mailbox, token);
        upstream_send(&mut up, format!("{}\r\n", ir.expose()).as_bytes()).await?;
        let mut answer = read(&mut up, t).await?;
        if answer.starts_with(b"+ ") || answer.as_ref() == b"+" {
            // Error details as a challenge: answer with an empty line.
            upstream_send(&mut up, b"\r\n").await?;
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

    /// Logs in upstream with `token` and says `QUIT`: proves that the
    /// upstream accepts the token for `mailbox` (validation). Returns the
    /// upstream's `+OK` answer.
    pub async fn probe(&self, mailbox: &str, token: &Secret) -> Result<String, UpstreamLogin> {
        let t = self.front.cfg.upstream_timeout;
        let (mut up, answer) = self.upstream_login(mailbox, token).await?;
        if upstream_send(&mut up, b"QUIT\r\n").await.is_ok() {
            let _ = read(&mut up, t).await;
        }
        Ok(String::from_utf8_lossy(&answer).trim_end().to_owned())
    }

    fn capa(&self, tls: bool) -> String {
        let mut s = String::from("+OK Capability list follows\r\nUSER\r\nSASL PLAIN\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n");
        if self.front.acceptor.is_some() && !tls {
            s.push_str("STLS\r\n");
        }
        s.push_str(".\r\n");
        s
    }

    /// The state of a new client session.
    pub(crate) fn dialect(self: &Arc<Self>) -> Pop3Session {
        Pop3Session {
            pop3: self.clone(),
            user: None,
        }
    }
}

/// One POP3 client session, as the session driver sees it.
pub(crate) struct Pop3Session {
    pop3: Arc<Pop3>,
    /// The name given with USER, waiting for PASS.
    user: Option<String>,
}

impl Dialect for Pop3Session {
    type Ctx = ();
    /// The upstream connection and its `+OK` line.
    type Upstream = (LineIo<BoxIo>, Bytes);

    fn greeting(&self, _tls: bool) -> String {
        "+OK authswap POP3 ready\r\n".into()
    }

    async fn command(&mut self, s: &mut Session<'_>, line: Bytes) -> Next<()> {
        // The verb is read from the bytes: PASS and AUTH carry credentials,
        // which are not copied into plain strings.
        let (verb, rest) = match line.iter().position(|&b| b == b' ') {
            Some(i) => (&line[..i], line.slice(i + 1..)),
            None => (&line[..], Bytes::new()),
        };
        let verb = String::from_utf8_lossy(verb).trim().to_ascii_uppercase();
        drop(line);
        let reply: String = match verb.as_str() {
            "PASS" => match self.user.take() {
                None => "-ERR Send USER first\r\n".into(),
                Some(name) => {
                    let password = Secret::new(String::from_utf8_lossy(&rest).into_owned());
                    session::wipe(rest);
                    return Next::Login {
                        ctx: (),
                        creds: Credentials { name, password },
                    };
                }
            },
            "AUTH" if rest.trim_ascii().is_empty() => "+OK\r\nPLAIN\r\n.\r\n".into(),
            "AUTH" => {
                let (mech, initial) = session::sasl_request(&rest);
                drop(rest);
                if mech != "PLAIN" {
                    "-ERR Unsupported mechanism; use PLAIN\r\n".into()
                } else {
                    return Next::Sasl {
                        ctx: (),
                        mech: Mech::Plain,
                        initial,
                    };
                }
            }
            "CAPA" => self.pop3.capa(s.tls),
            "USER" => {
                let name = String::from_utf8_lossy(&rest).trim().to_owned();
                if name.is_empty() {
                    "-ERR USER needs a name\r\n".into()
                } else {
                    self.user = Some(name);
                    "+OK Send your password\r\n".into()
                }
            }
            "STLS" if self.pop3.front.acceptor.is_some() && !s.tls => {
                return Next::StartTls("+OK Begin TLS negotiation\r\n".into())
            }
            "STLS" => "-ERR STLS not available\r\n".into(),
            "QUIT" => return Next::Close("+OK authswap signing off\r\n".into()),
            "NOOP" => "+OK\r\n".into(),
            _ => {
                return Next::Error(
                    "-ERR Unknown command or not allowed before authentication\r\n".into(),
                )
            }
        };
        Next::Reply(reply)
    }

    fn upgraded(&mut self) {
        self.user = None;
    }

    fn sasl_prompt(&self, challenge: &str) -> String {
        format!("+ {challenge}\r\n")
    }

    fn sasl_refused(&self, _: &(), cancelled: bool) -> String {
        if cancelled {
            "-ERR Authentication cancelled\r\n".into()
        } else {
            "-ERR Cannot decode the authentication response\r\n".into()
        }
    }

    async fn upstream_login(
        &self,
        identity: &Identity,
        token: &AccessToken,
        _: &(),
    ) -> Result<(LineIo<BoxIo>, Bytes), UpstreamLogin> {
        self.pop3
            .upstream_login(&identity.mailbox, token.secret())
            .await
    }

    fn logged_in(&self, _: &(), (up, ok): (LineIo<BoxIo>, Bytes)) -> (Vec<u8>, LineIo<BoxIo>) {
        let mut out = ok.to_vec();
        out.extend_from_slice(b"\r\n");
        (out, up)
    }

    fn failure(&self, _: &(), failure: LoginFailure) -> String {
        let reply = match failure {
            LoginFailure::BadCredentials | LoginFailure::Locked => {
                "-ERR [AUTH] Authentication failed".to_owned()
            }
            LoginFailure::Reauth { identity } => format!(
                "-ERR [AUTH] Identity {identity} needs re-authentication: an administrator must run authswap identity login {identity}"
            ),
            LoginFailure::RefusedFresh => {
                "-ERR [SYS/TEMP] The mail server refused freshly issued access tokens, try again later".to_owned()
            }
            // The upstream's own line, passed through.
            LoginFailure::UpstreamRefused { text } => text,
            LoginFailure::Unavailable | LoginFailure::UpstreamTemporary => {
                "-ERR [SYS/TEMP] Temporary authentication failure, try again later".to_owned()
            }
            LoginFailure::UpstreamFailed => {
                "-ERR [SYS/TEMP] Mail server unreachable, closing connection".to_owned()
            }
            // RFC 2449: the maildrop is in use by other sessions.
            LoginFailure::Busy => {
                "-ERR [IN-USE] Too many sessions for this identity, try again later".to_owned()
            }
        };
        format!("{reply}\r\n")
    }

    const WORDS: Words = Words {
        timeout: "-ERR Idle timeout, closing connection\r\n",
        too_long: "-ERR Line too long\r\n",
        too_many_errors: "-ERR Too many errors, closing connection\r\n",
        shutdown: "-ERR [SYS/TEMP] Server shutting down, closing connection\r\n",
    };
}
