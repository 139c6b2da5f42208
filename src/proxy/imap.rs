//! The IMAP front end. Before authentication authswap answers CAPABILITY
//! (`AUTH=PLAIN`, never `LOGINDISABLED`), NOOP, ID, LOGOUT, STARTTLS (with a
//! certificate), LOGIN (atoms, quoted strings and `{n}` / `{n+}` literals)
//! and AUTHENTICATE PLAIN; it then logs in upstream (implicit TLS or
//! STARTTLS, AUTHENTICATE XOAUTH2 with SASL-IR when advertised) and splices
//! the streams, so IDLE, APPEND literals and everything else pass through.

use super::line::{BoxIo, LineError, LineIo};
use super::mail::{upstream_line, upstream_send, LoginFailure, MailFrontEnd, UpstreamLogin};
use super::sasl::{self, Credentials};
use super::session::{self, Dialect, Mech, Next, Session, Words};
use crate::identity::Identity;
use crate::secret::Secret;
use crate::token::AccessToken;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

/// Most bytes of refused non-synchronising literals read and dropped for
/// one command; a client announcing more is disconnected instead.
const MAX_SKIPPED_LITERALS: u64 = 1 << 20;

/// The size of the non-synchronising literal (`{n+}`, also `~{n+}`) that
/// ends `line`, if any: the client sends those bytes without waiting for a
/// continuation, so they belong to the command even when it is refused.
/// Sizes too large for `u64` count as `u64::MAX`. (Public for the fuzz
/// targets.)
pub fn trailing_nonsync_literal(line: &[u8]) -> Option<u64> {
    let inner = line.strip_suffix(b"+}")?;
    let open = inner.iter().rposition(|&c| c == b'{')?;
    let digits = &inner[open + 1..];
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        std::str::from_utf8(digits)
            .ok()?
            .parse()
            .unwrap_or(u64::MAX),
    )
}

/// Reads and drops the non-synchronising literal of `n` bytes that a
/// command carries, and the rest of that command (which may end in another
/// such literal), so none of it is taken for commands. `Err` holds the
/// `* BYE` line to send before closing the connection instead: more than
/// [`MAX_SKIPPED_LITERALS`] in all, or a client that stopped sending.
async fn skip_literals(
    io: &mut LineIo<BoxIo>,
    mut n: u64,
    timeout: Duration,
) -> Result<(), &'static str> {
    let mut total = 0u64;
    loop {
        total = total.saturating_add(n);
        if total > MAX_SKIPPED_LITERALS {
            return Err("* BYE [TOOBIG] Literal too large, closing connection\r\n");
        }
        let incomplete = "* BYE Incomplete literal, closing connection\r\n";
        if !matches!(
            tokio::time::timeout(timeout, io.discard(n)).await,
            Ok(Ok(()))
        ) {
            return Err(incomplete);
        }
        let rest = match tokio::time::timeout(timeout, io.read_line()).await {
            Ok(Ok(Some(l))) => l,
            // The rest of the line was skipped up to its end.
            Ok(Err(LineError::TooLong)) => return Ok(()),
            _ => return Err(incomplete),
        };
        match trailing_nonsync_literal(&rest) {
            Some(next) => n = next,
            None => return Ok(()),
        }
    }
}

/// The IMAP front end.
pub struct Imap {
    front: Arc<MailFrontEnd>,
}

/// Successful upstream login: the connection, untagged lines received
/// during it, and the text of the tagged OK.
pub(crate) struct Upstream {
    io: LineIo<BoxIo>,
    untagged: Vec<Bytes>,
    ok_text: String,
}

async fn read(io: &mut LineIo<BoxIo>, t: Duration) -> Result<Bytes, UpstreamLogin> {
    upstream_line(io, t, "a command").await
}

/// Reads until the tagged answer to `tag`; returns (status, text, untagged).
async fn tagged(
    io: &mut LineIo<BoxIo>,
    tag: &str,
    t: Duration,
) -> Result<(String, String, Vec<Bytes>), UpstreamLogin> {
    let mut untagged = Vec::new();
    loop {
        let line = read(io, t).await?;
        let text = String::from_utf8_lossy(&line);
        if let Some(rest) = text.strip_prefix(tag).and_then(|r| r.strip_prefix(' ')) {
            let (status, msg) = rest.split_once(' ').unwrap_or((rest, ""));
            return Ok((status.to_ascii_uppercase(), msg.to_owned(), untagged));
        }
        if untagged.len() > 1000 {
            return Err(UpstreamLogin::unexpected(
                "a command",
                b"more than 1000 lines before its answer",
            ));
        }
        untagged.push(line);
    }
}

fn caps_of(lines: &[Bytes]) -> Vec<String> {
    lines
        .iter()
        .map(|l| String::from_utf8_lossy(l).to_ascii_uppercase())
        .filter_map(|l| l.strip_prefix("* CAPABILITY ").map(str::to_owned))
        .flat_map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .collect()
}

/// Parses IMAP astrings from `rest`, reading literals from the client as
/// needed. Returns the arguments, or `Err(msg)` for a BAD answer;
/// `Ok(None)` when the connection is gone. After an `Err`, `rest` holds the
/// end of the last line read (to find a literal the client sends anyway).
async fn read_args(
    io: &mut LineIo<BoxIo>,
    rest: &mut Vec<u8>,
    max: usize,
    timeout: Duration,
) -> Result<Option<Vec<Secret>>, &'static str> {
    let mut args = Vec::new();
    loop {
        let mut i = 0;
        while i < rest.len() && rest[i] == b' ' {
            i += 1;
        }
        if i >= rest.len() {
            return Ok(Some(args));
        }
        if args.len() >= 8 {
            return Err("too many arguments");
        }
        match rest[i] {
            b'"' => {
                let mut s = Vec::new();
                let mut j = i + 1;
                loop {
                    match rest.get(j) {
                        None => return Err("unterminated quoted string"),
                        Some(b'\\') => {
                            s.push(*rest.get(j + 1).ok_or("bad escape")?);
                            j += 2;
                        }
                        Some(b'"') => break,
                        Some(&c) => {
                            s.push(c);
                            j += 1;
                        }
                    }
                }
                args.push(Secret::new(String::from_utf8_lossy(&s).into_owned()));
                rest.drain(..=j);
            }
            b'{' => {
                let close = rest[i..]
                    .iter()
                    .position(|&c| c == b'}')
                    .ok_or("bad literal")?
                    + i;
                if close + 1 != rest.len() {
                    return Err("literal must end the line");
                }
                let spec = std::str::from_utf8(&rest[i + 1..close]).map_err(|_| "bad literal")?;
                let (num, sync) = match spec.strip_suffix('+') {
                    Some(n) => (n, false),
                    None => (spec, true),
                };
                if num.is_empty() || !num.bytes().all(|c| c.is_ascii_digit()) {
                    return Err("bad literal");
                }
                let n = match num.parse::<usize>() {
                    Ok(n) if n <= max => n,
                    _ => return Err("literal too large"),
                };
                if sync && io.send(b"+ Ready for literal data\r\n").await.is_err() {
                    return Ok(None);
                }
                let data = match tokio::time::timeout(timeout, io.read_exact(n)).await {
                    Ok(Ok(d)) => d,
                    _ => return Ok(None),
                };
                args.push(Secret::new(String::from_utf8_lossy(&data).into_owned()));
                session::wipe(data);
                // Refilled in place: the caller wipes the buffer it owns.
                rest.clear();
                match tokio::time::timeout(timeout, io.read_line()).await {
                    Ok(Ok(Some(l))) => {
                        rest.extend_from_slice(&l);
                        session::wipe(l);
                    }
                    Ok(Err(LineError::TooLong)) => return Err("line too long"),
                    _ => return Ok(None),
                };
            }
            _ => {
                let end = rest[i..]
                    .iter()
                    .position(|&c| c == b' ')
                    .map_or(rest.len(), |p| p + i);
                let atom = &rest[i..end];
                if atom.iter().any(|&c| {
                    matches!(c, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\') || c < 0x20
                }) {
                    return Err("bad atom");
                }
                args.push(Secret::new(String::from_utf8_lossy(atom).into_owned()));
                rest.drain(..end);
            }
        }
    }
}

impl Imap {
    /// Wraps the shared front end.
    pub fn new(front: Arc<MailFrontEnd>) -> Arc<Imap> {
        Arc::new(Imap { front })
    }

    fn capability(&self, tls: bool) -> String {
        let mut caps = String::from("IMAP4rev1 AUTH=PLAIN SASL-IR LITERAL+ ID");
        if self.front.acceptor.is_some() && !tls {
            caps.push_str(" STARTTLS");
        }
        caps
    }

    async fn upstream_login(
        &self,
        mailbox: &str,
        token: &Secret,
    ) -> Result<Upstream, UpstreamLogin> {
        let t = self.front.cfg.upstream_timeout;
        let (mut up, tls) = self.front.connect_upstream().await?;
        let greeting = read(&mut up, t).await?;
        if !greeting.starts_with(b"* OK") {
            return Err(UpstreamLogin::unexpected("the greeting", &greeting));
        }
        if !tls {
            upstream_send(&mut up, b"A0 STARTTLS\r\n").await?;
            let (status, _, _) = tagged(&mut up, "A0", t).await?;
            if status != "OK" {
                return Err(UpstreamLogin::NoTls("STARTTLS"));
            }
            up = self.front.upgrade_upstream(up).await?;
        }
        upstream_send(&mut up, b"A1 CAPABILITY\r\n").await?;
        let (status, _, untagged) = tagged(&mut up, "A1", t).await?;
        let caps = caps_of(&untagged);
        if status != "OK" {
            return Err(UpstreamLogin::unexpected("CAPABILITY", status.as_bytes()));
        }
        let ir = sasl::xoauth2(mailbox, token);
        if caps.iter().any(|c| c == "SASL-IR") {
            upstream_send(
                &mut up,
                format!("A2 AUTHENTICATE XOAUTH2 {}\r\n", ir.expose()).as_bytes(),
            )
            .await?;
        } else {
            upstream_send(&mut up, b"A2 AUTHENTICATE XOAUTH2\r\n").await?;
            let cont = read(&mut up, t).await?;
            if !cont.starts_with(b"+") {
                return Err(UpstreamLogin::unexpected("AUTHENTICATE XOAUTH2", &cont));
            }
            upstream_send(&mut up, format!("{}\r\n", ir.expose()).as_bytes()).await?;
        }
        let mut untagged = Vec::new();
        loop {
            let line = read(&mut up, t).await?;
            if line.starts_with(b"+") {
                // Error details as a challenge: answer with an empty line.
                upstream_send(&mut up, b"\r\n").await?;
                continue;
            }
            let text = String::from_utf8_lossy(&line).into_owned();
            if let Some(rest) = text.strip_prefix("A2 ") {
                let (status, msg) = rest.split_once(' ').unwrap_or((rest, ""));
                return match status.to_ascii_uppercase().as_str() {
                    "OK" => Ok(Upstream {
                        io: up,
                        untagged,
                        ok_text: msg.to_owned(),
                    }),
                    "NO" if msg.to_ascii_uppercase().contains("[UNAVAILABLE]") => {
                        Err(UpstreamLogin::Temporary(msg.to_owned()))
                    }
                    "NO" => Err(UpstreamLogin::Rejected(crate::token::refusal::imap(msg))),
                    _ => Err(UpstreamLogin::unexpected(
                        "AUTHENTICATE XOAUTH2",
                        text.as_bytes(),
                    )),
                };
            }
            if untagged.len() > 100 {
                return Err(UpstreamLogin::unexpected(
                    "AUTHENTICATE XOAUTH2",
                    b"more than 100 lines before its answer",
                ));
            }
            untagged.push(line);
        }
    }

    /// Logs in upstream with `token` and says `LOGOUT`: proves that the
    /// upstream accepts the token for `mailbox` (validation). Returns the
    /// upstream's tagged `OK` answer.
    pub async fn probe(&self, mailbox: &str, token: &Secret) -> Result<String, UpstreamLogin> {
        let t = self.front.cfg.upstream_timeout;
        let mut up = self.upstream_login(mailbox, token).await?;
        let answer = format!("OK {}", up.ok_text);
        if upstream_send(&mut up.io, b"A3 LOGOUT\r\n").await.is_ok() {
            let _ = tagged(&mut up.io, "A3", t).await;
        }
        Ok(answer)
    }

    /// The state of a new client session.
    pub(crate) fn dialect(self: &Arc<Self>) -> ImapSession {
        ImapSession { imap: self.clone() }
    }
}

/// One IMAP client session, as the session driver sees it.
pub(crate) struct ImapSession {
    imap: Arc<Imap>,
}

impl Dialect for ImapSession {
    /// The tag of the login command.
    type Ctx = String;
    type Upstream = Upstream;

    fn greeting(&self, tls: bool) -> String {
        format!(
            "* OK [CAPABILITY {}] {} authswap IMAP ready\r\n",
            self.imap.capability(tls),
            self.imap.front.cfg.hostname
        )
    }

    async fn command(&mut self, s: &mut Session<'_>, line: Bytes) -> Next<String> {
        let cfg = &self.imap.front.cfg;
        let mut parts = line.splitn(3, |&b| b == b' ');
        let tag = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
        let cmd = String::from_utf8_lossy(parts.next().unwrap_or_default()).to_ascii_uppercase();
        // The rest may hold a password: it is wiped when dropped.
        let mut rest = Zeroizing::new(parts.next().unwrap_or_default().to_vec());
        let bad_tag = tag.is_empty()
            || cmd.is_empty()
            || tag
                .bytes()
                .any(|c| matches!(c, b'*' | b'+' | b'{' | b'(' | b'"') || c < 0x21);
        // A non-synchronising literal ending the line is part of this
        // command (LOGIN reads its own): drop its bytes rather than read
        // them as commands.
        if bad_tag || cmd != "LOGIN" {
            if let Some(n) = trailing_nonsync_literal(&line) {
                if let Err(bye) = skip_literals(&mut s.io, n, cfg.idle_timeout).await {
                    return Next::Close(bye.into());
                }
            }
        }
        session::wipe(line);
        if bad_tag {
            return Next::Error("* BAD Invalid tag or command\r\n".into());
        }
        let reply = match cmd.as_str() {
            "CAPABILITY" => format!(
                "* CAPABILITY {}\r\n{tag} OK CAPABILITY completed\r\n",
                self.imap.capability(s.tls)
            ),
            "NOOP" => format!("{tag} OK NOOP completed\r\n"),
            "ID" => format!("* ID NIL\r\n{tag} OK ID completed\r\n"),
            "LOGOUT" => {
                return Next::Close(format!(
                    "* BYE authswap signing off\r\n{tag} OK LOGOUT completed\r\n"
                ))
            }
            "STARTTLS" if self.imap.front.acceptor.is_some() && !s.tls => {
                return Next::StartTls(format!("{tag} OK Begin TLS negotiation now\r\n"))
            }
            "STARTTLS" => format!("{tag} BAD STARTTLS not available\r\n"),
            "LOGIN" => {
                let max = cfg.max_line.as_usize();
                match read_args(&mut s.io, &mut rest, max, cfg.idle_timeout).await {
                    Ok(None) => return Next::Close(String::new()),
                    Err(why) => match trailing_nonsync_literal(&rest) {
                        None => format!("{tag} BAD {why}\r\n"),
                        // Refused, but the client sends the literal anyway
                        // (e.g. one over `max_line`): skip it, or close.
                        Some(n) => {
                            if let Err(bye) = skip_literals(&mut s.io, n, cfg.idle_timeout).await {
                                return Next::Close(format!("{tag} BAD {why}\r\n{bye}"));
                            }
                            return Next::Error(format!("{tag} BAD {why}\r\n"));
                        }
                    },
                    Ok(Some(mut args)) if args.len() == 2 && !args[0].is_empty() => {
                        let password = args.pop().unwrap_or_default();
                        let name = args.pop().unwrap_or_default();
                        return Next::Login {
                            ctx: tag,
                            creds: Credentials {
                                name: name.expose().to_owned(),
                                password,
                            },
                        };
                    }
                    Ok(Some(_)) => format!("{tag} BAD LOGIN needs a user name and a password\r\n"),
                }
            }
            "AUTHENTICATE" => {
                // A copy that the initial response (a slice of it) owns
                // alone once this returns, so that it can be wiped.
                let (mech, initial) = session::sasl_request(&Bytes::copy_from_slice(&rest));
                if mech != "PLAIN" {
                    format!("{tag} NO Unsupported authentication mechanism; use PLAIN\r\n")
                } else {
                    return Next::Sasl {
                        ctx: tag,
                        mech: Mech::Plain,
                        initial,
                    };
                }
            }
            _ => {
                return Next::Error(format!(
                    "{tag} BAD Command unknown or not allowed before authentication\r\n"
                ))
            }
        };
        Next::Reply(reply)
    }

    fn sasl_prompt(&self, challenge: &str) -> String {
        format!("+ {challenge}\r\n")
    }

    fn sasl_refused(&self, tag: &String, cancelled: bool) -> String {
        if cancelled {
            format!("{tag} BAD AUTHENTICATE cancelled\r\n")
        } else {
            format!("{tag} BAD Cannot decode the authentication response\r\n")
        }
    }

    async fn upstream_login(
        &self,
        identity: &Identity,
        token: &AccessToken,
        _tag: &String,
    ) -> Result<Upstream, UpstreamLogin> {
        self.imap
            .upstream_login(&identity.mailbox, token.secret())
            .await
    }

    fn logged_in(&self, tag: &String, up: Upstream) -> (Vec<u8>, LineIo<BoxIo>) {
        let mut out = Vec::new();
        for l in &up.untagged {
            out.extend_from_slice(l);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("{tag} OK {}\r\n", up.ok_text).as_bytes());
        (out, up.io)
    }

    fn failure(&self, tag: &String, failure: LoginFailure) -> String {
        match failure {
            LoginFailure::BadCredentials | LoginFailure::Locked => {
                format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed\r\n")
            }
            LoginFailure::Reauth { identity } => format!(
                "{tag} NO [AUTHENTICATIONFAILED] Identity {identity} needs re-authentication: an administrator must run authswap identity login {identity}\r\n"
            ),
            LoginFailure::RefusedFresh => format!(
                "{tag} NO [UNAVAILABLE] The mail server refused freshly issued access tokens, try again later\r\n"
            ),
            // The upstream's own words after its `NO`, passed through.
            LoginFailure::UpstreamRefused { text } => format!("{tag} NO {text}\r\n"),
            LoginFailure::Unavailable | LoginFailure::UpstreamTemporary => format!(
                "{tag} NO [UNAVAILABLE] Temporary authentication failure, try again later\r\n"
            ),
            LoginFailure::UpstreamFailed => {
                "* BYE [UNAVAILABLE] Mail server unreachable, closing connection\r\n".into()
            }
            LoginFailure::Busy => format!(
                "{tag} NO [UNAVAILABLE] Too many sessions for this identity, try again later\r\n"
            ),
        }
    }

    const WORDS: Words = Words {
        timeout: "* BYE Idle timeout, closing connection\r\n",
        too_long: "* BAD Line too long\r\n",
        too_many_errors: "* BYE Too many errors, closing connection\r\n",
        shutdown: "* BYE [UNAVAILABLE] Server shutting down, closing connection\r\n",
    };
}

#[cfg(test)]
mod tests {
    use super::trailing_nonsync_literal as lit;

    #[test]
    fn non_synchronising_literal_at_the_end_of_a_line() {
        assert_eq!(lit(b"a LOGIN {5+}"), Some(5));
        assert_eq!(lit(b"a APPEND INBOX ~{12+}"), Some(12));
        assert_eq!(lit(b"a LOGIN {99999999999999999999999+}"), Some(u64::MAX));
        assert_eq!(lit(b"a LOGIN {5}"), None, "synchronising: client waits");
        assert_eq!(lit(b"a LOGIN {+}"), None);
        assert_eq!(lit(b"a LOGIN {5+} x"), None);
        assert_eq!(lit(b"a LOGIN {-5+}"), None);
    }
}
