//! The mail session driver: the one skeleton of an SMTP, IMAP or POP3
//! client session before login, written once. It owns the greeting, the
//! time limits (`idle_timeout` per command, `login_timeout` from connecting
//! to logging in), the error budget, STARTTLS, the SASL exchanges (PLAIN,
//! LOGIN), the login through the shared path ([`MailFrontEnd::login`]) and
//! the splice after it, and what a client is told when the server shuts
//! down. A [`Dialect`] supplies only what differs: parsing a command, the
//! wording of replies, and the upstream login script. Lines that carry a
//! password are wiped once used.

use super::line::{BoxIo, LineError, LineIo};
use super::mail::{splice, LoginFailure, MailFrontEnd, UpstreamLogin};
use super::sasl::{self, Credentials};
use crate::identity::Identity;
use crate::token::AccessToken;
use bytes::Bytes;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Protocol errors tolerated before the connection is closed.
pub const MAX_ERRORS: u32 = 10;
/// How long a spliced session may go on once the server shuts down, before
/// the client is told and the connection closed.
pub const SPLICE_GRACE: Duration = Duration::from_secs(4);

/// What a dialect makes of one command line before login.
pub enum Next<C> {
    /// Send this (complete lines) and read the next command.
    Reply(String),
    /// A protocol error: counts toward the budget; this reply, or the
    /// dialect's closing line once the budget is spent.
    Error(String),
    /// Already answered (or nothing to answer): read the next command.
    Continue,
    /// Send this, then upgrade the client connection to TLS.
    StartTls(String),
    /// Run a SASL exchange (`initial`: the initial response, if the
    /// command carried one), then log in with what it yields.
    Sasl {
        /// The dialect's context for the login (IMAP: the tag).
        ctx: C,
        /// PLAIN or LOGIN.
        mech: Mech,
        /// Initial response.
        initial: Option<Bytes>,
    },
    /// Log in with these credentials.
    Login {
        /// The dialect's context for the login.
        ctx: C,
        /// Name and password.
        creds: Credentials,
    },
    /// Send this and close the connection.
    Close(String),
}

/// The SASL mechanisms offered to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mech {
    /// RFC 4616.
    Plain,
    /// The de facto LOGIN mechanism (user name, then password, base64).
    Login,
}

/// One protocol's part of a session. A dialect value lives as long as one
/// client session and holds its state (SMTP's EHLO name, POP3's USER).
pub(crate) trait Dialect: Send + Sync {
    /// What a login needs to remember from its command (IMAP: the tag).
    type Ctx: Send + Sync;
    /// A logged-in upstream connection, with what it said.
    type Upstream: Send;

    /// The greeting, whole lines.
    fn greeting(&self, tls: bool) -> String;
    /// Handles one command line before login; may read more from the
    /// client through `session` (IMAP literals).
    fn command(
        &mut self,
        session: &mut Session<'_>,
        line: Bytes,
    ) -> impl Future<Output = Next<Self::Ctx>> + Send;
    /// The connection became TLS: forget what was said before.
    fn upgraded(&mut self) {}
    /// A SASL challenge line (`challenge` is base64, maybe empty).
    fn sasl_prompt(&self, challenge: &str) -> String;
    /// The answer to a SASL exchange the client cancelled (`*`), or whose
    /// response cannot be decoded (`cancelled` false).
    fn sasl_refused(&self, ctx: &Self::Ctx, cancelled: bool) -> String;
    /// Logs in upstream for `identity` with `token`.
    fn upstream_login(
        &self,
        identity: &Identity,
        token: &AccessToken,
        ctx: &Self::Ctx,
    ) -> impl Future<Output = Result<Self::Upstream, UpstreamLogin>> + Send;
    /// The client's success answer and the upstream stream to splice.
    fn logged_in(&self, ctx: &Self::Ctx, upstream: Self::Upstream) -> (Vec<u8>, LineIo<BoxIo>);
    /// The client's answer to a failed login (whole lines). After
    /// [`LoginFailure::UpstreamFailed`] the connection closes.
    fn failure(&self, ctx: &Self::Ctx, failure: LoginFailure) -> String;
    /// The dialect's fixed lines.
    const WORDS: Words;
    /// A line of [`Dialect::WORDS`] as sent (SMTP puts its host name in).
    fn say(&self, line: &'static str) -> String {
        line.to_owned()
    }
}

/// A dialect's fixed lines (whole lines, CRLF included).
pub struct Words {
    /// Said before closing: silent too long, or not logged in in time.
    pub timeout: &'static str,
    /// The answer to a line over `max_line` (counts as an error).
    pub too_long: &'static str,
    /// Said before closing after [`MAX_ERRORS`] errors.
    pub too_many_errors: &'static str,
    /// Said before closing when the server shuts down (also to a spliced
    /// session after [`SPLICE_GRACE`]).
    pub shutdown: &'static str,
}

/// A client session before login, as a dialect sees it.
pub struct Session<'f> {
    /// The front end (configuration, TLS, login path).
    pub front: &'f MailFrontEnd,
    /// The client connection.
    pub io: LineIo<BoxIo>,
    /// Whether it is TLS.
    pub tls: bool,
    /// The client's address.
    pub peer: SocketAddr,
    errors: u32,
    /// When the client must have logged in.
    login_due: tokio::time::Instant,
    shutdown: watch::Receiver<bool>,
}

/// Why the session stops reading.
enum Stop {
    /// Closed by the client, or a write failed: nothing more to say.
    Gone,
    /// Time limit: say the dialect's timeout line.
    Timeout,
    /// The server shuts down.
    Shutdown,
}

impl Session<'_> {
    /// Reads the next client line (idle and login time limits, server
    /// shutdown); `Ok(Err(TooLong))` for an overlong line.
    async fn next_line(&mut self) -> Result<Result<Bytes, LineError>, Stop> {
        let due = (tokio::time::Instant::now() + self.front.cfg.idle_timeout).min(self.login_due);
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            read = tokio::time::timeout_at(due, self.io.read_line()) => match read {
                Err(_) => Err(Stop::Timeout),
                Ok(Ok(Some(line))) => Ok(Ok(line)),
                Ok(Ok(None)) | Ok(Err(LineError::Io(_))) => Err(Stop::Gone),
                Ok(Err(e @ LineError::TooLong)) => Ok(Err(e)),
            },
            _ = shutdown.wait_for(|stop| *stop) => Err(Stop::Shutdown),
        }
    }

    /// Reads one more client line within the time limits (a SASL
    /// response, the rest of a command); an overlong one ends the session.
    async fn read_more(&mut self) -> Result<Bytes, Stop> {
        match self.next_line().await {
            Ok(Ok(line)) => Ok(line),
            Ok(Err(_too_long)) => Err(Stop::Gone),
            Err(stop) => Err(stop),
        }
    }

    /// Sends `text`; `false` when the client is gone.
    pub async fn send(&mut self, text: &[u8]) -> bool {
        self.io.send(text).await.is_ok()
    }

    /// Counts a protocol error: `true` (after `closing`) when the budget is
    /// spent and the connection must close.
    async fn error(&mut self, reply: &str, closing: &str) -> bool {
        self.errors += 1;
        if self.errors >= MAX_ERRORS {
            let _ = self.io.send(closing.as_bytes()).await;
            return true;
        }
        !self.send(reply.as_bytes()).await
    }

    /// Counts a protocol error the dialect answered itself (a skipped
    /// literal); `true` when the budget is spent (the dialect closes).
    pub fn count_error(&mut self) -> bool {
        self.errors += 1;
        self.errors >= MAX_ERRORS
    }

    /// Runs a SASL exchange; `Ok(None)`: answered, go on; `Err(stop)`: the
    /// session ends.
    async fn sasl<D: Dialect>(
        &mut self,
        dialect: &D,
        ctx: &D::Ctx,
        mech: Mech,
        initial: Option<Bytes>,
    ) -> Result<Option<Credentials>, Stop> {
        let cancelled = |l: &[u8]| l.trim_ascii() == b"*";
        // "=" is an empty initial response (RFC 4954): ask for it.
        let initial = initial.filter(|i| i.as_ref() != b"=");
        let step = async |s: &mut Self, challenge: &str| -> Result<Bytes, Stop> {
            if !s.send(dialect.sasl_prompt(challenge).as_bytes()).await {
                return Err(Stop::Gone);
            }
            s.read_more().await
        };
        let creds = match mech {
            Mech::Plain => {
                let response = match initial {
                    Some(i) => i,
                    None => step(self, "").await?,
                };
                if cancelled(&response) {
                    return self.refuse(dialect, ctx, true).await;
                }
                let creds = sasl::decode_plain(&response);
                wipe(response);
                creds
            }
            Mech::Login => {
                let user = match initial {
                    Some(i) => i,
                    None => step(self, &sasl::encode("Username:")).await?,
                };
                if cancelled(&user) {
                    return self.refuse(dialect, ctx, true).await;
                }
                let pass = step(self, &sasl::encode("Password:")).await?;
                if cancelled(&pass) {
                    wipe(pass);
                    return self.refuse(dialect, ctx, true).await;
                }
                let creds = match (
                    sasl::decode_login_step(&user),
                    sasl::decode_login_step(&pass),
                ) {
                    (Some(u), Some(p)) if !u.is_empty() => Some(Credentials {
                        name: u.expose().to_owned(),
                        password: p,
                    }),
                    _ => None,
                };
                wipe(pass);
                creds
            }
        };
        match creds {
            Some(c) => Ok(Some(c)),
            None => {
                self.front.undecodable();
                self.refuse(dialect, ctx, false).await
            }
        }
    }

    async fn refuse<D: Dialect>(
        &mut self,
        dialect: &D,
        ctx: &D::Ctx,
        cancelled: bool,
    ) -> Result<Option<Credentials>, Stop> {
        let text = dialect.sasl_refused(ctx, cancelled);
        if self.send(text.as_bytes()).await {
            Ok(None)
        } else {
            Err(Stop::Gone)
        }
    }
}

impl Session<'_> {
    /// Ends the session with what `stop` calls for.
    async fn stop<D: Dialect>(mut self, dialect: &D, stop: Stop) {
        let last = match stop {
            Stop::Gone => return,
            Stop::Timeout => dialect.say(D::WORDS.timeout),
            Stop::Shutdown => dialect.say(D::WORDS.shutdown),
        };
        let _ = self.io.send(last.as_bytes()).await;
    }
}

/// Splits the arguments of an AUTH / AUTHENTICATE command: the mechanism
/// (upper case) and the initial response, if any (a slice of `args`, so
/// that it can be wiped once used).
pub fn sasl_request(args: &Bytes) -> (String, Option<Bytes>) {
    let mut words = args
        .split(|&b| b == b' ')
        .filter(|w| !w.trim_ascii().is_empty());
    let mech = words
        .next()
        .map(|m| String::from_utf8_lossy(m).trim().to_ascii_uppercase())
        .unwrap_or_default();
    let initial = words.next().map(|w| args.slice_ref(w.trim_ascii()));
    (mech, initial)
}

/// Wipes a line that carried a password, when this is its only copy.
pub fn wipe(line: Bytes) {
    if let Ok(mut m) = line.try_into_mut() {
        zeroize::Zeroize::zeroize(&mut m[..]);
    }
}

/// The access-log line of a mail session, written when it ends (whatever
/// way it ends) if `runtime.access_log` is on.
struct AccessEntry {
    on: bool,
    protocol: crate::metrics::Protocol,
    started: std::time::Instant,
    identity: Option<String>,
    outcome: &'static str,
}

impl Drop for AccessEntry {
    fn drop(&mut self) {
        if self.on {
            super::access_line(
                self.protocol,
                self.identity.as_deref(),
                self.outcome,
                None,
                self.started.elapsed(),
            );
        }
    }
}

/// Serves one client session with `dialect` until it logs in (then raises
/// `proved` and splices it with its upstream), leaves, or is closed.
pub(crate) async fn run<D: Dialect>(
    front: &MailFrontEnd,
    mut dialect: D,
    io: LineIo<BoxIo>,
    peer: SocketAddr,
    tls: bool,
    shutdown: watch::Receiver<bool>,
    proved: &AtomicBool,
) {
    let mut access = AccessEntry {
        on: front.app.config.runtime.access_log,
        protocol: front.protocol,
        started: std::time::Instant::now(),
        identity: None,
        // Until it tries to log in.
        outcome: "no_login",
    };
    let mut s = Session {
        front,
        io,
        tls,
        peer,
        errors: 0,
        login_due: tokio::time::Instant::now() + front.cfg.login_timeout,
        shutdown,
    };
    if !s.send(dialect.greeting(s.tls).as_bytes()).await {
        return;
    }
    loop {
        let line = match s.next_line().await {
            Ok(Ok(line)) => line,
            Ok(Err(_too_long)) => {
                let (reply, closing) = (D::WORDS.too_long, D::WORDS.too_many_errors);
                if s.error(reply, closing).await {
                    return;
                }
                continue;
            }
            Err(stop) => return s.stop(&dialect, stop).await,
        };
        let (ctx, creds) = match dialect.command(&mut s, line).await {
            Next::Continue => continue,
            Next::Reply(text) => {
                if !s.send(text.as_bytes()).await {
                    return;
                }
                continue;
            }
            Next::Error(text) => {
                if s.error(&text, D::WORDS.too_many_errors).await {
                    return;
                }
                continue;
            }
            Next::Close(text) => {
                let _ = s.io.send(text.as_bytes()).await;
                return;
            }
            Next::StartTls(text) => {
                if !s.send(text.as_bytes()).await {
                    return;
                }
                let Some(upgraded) = front.upgrade_client(s.io).await else {
                    return;
                };
                s.io = upgraded;
                s.tls = true;
                dialect.upgraded();
                continue;
            }
            Next::Login { ctx, creds } => (ctx, creds),
            Next::Sasl { ctx, mech, initial } => {
                match s.sasl(&dialect, &ctx, mech, initial).await {
                    Ok(Some(creds)) => (ctx, creds),
                    Ok(None) => continue,
                    Err(stop) => return s.stop(&dialect, stop).await,
                }
            }
        };
        let dialect_ref = &dialect;
        let ctx_ref = &ctx;
        let result = front
            .login(
                &creds,
                peer,
                s.shutdown.clone(),
                |identity: Arc<Identity>, token| async move {
                    dialect_ref.upstream_login(&identity, &token, ctx_ref).await
                },
            )
            .await;
        drop(creds);
        match result {
            Ok((identity, upstream, mut permit)) => {
                if access.on {
                    access.identity = Some(identity.name.clone());
                    access.outcome = "forwarded";
                }
                // Logged in: the connection's slot is never given away now.
                proved.store(true, Ordering::Release);
                let (answer, upstream) = dialect.logged_in(&ctx, upstream);
                if !s.send(&answer).await {
                    return;
                }
                let shutdown = s.shutdown.clone();
                let pacer = permit.take_pacer();
                splice(
                    s.io,
                    upstream,
                    shutdown,
                    dialect.say(D::WORDS.shutdown),
                    pacer,
                )
                .await;
                drop(permit);
                return;
            }
            Err(failure) => {
                if access.on {
                    access.identity = failure.identity().map(str::to_owned);
                    access.outcome = failure.outcome();
                }
                let closes = matches!(failure, LoginFailure::UpstreamFailed);
                let text = dialect.failure(&ctx, failure);
                if !s.send(text.as_bytes()).await || closes {
                    return;
                }
            }
        }
    }
}
