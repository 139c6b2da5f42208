//! In-process upstream mail servers shaped like Microsoft 365: SMTP
//! submission ([`FakeSmtp`]), IMAP ([`FakeImap`]) and POP3 ([`FakePop3`]).
//! Each binds 127.0.0.1:0, speaks TLS with the shared test PKI (implicit or
//! after STARTTLS/STLS), accepts only SASL XOAUTH2 logins whose bearer token
//! the fake IdP's [`TokenValidator`] maps to the claimed mailbox (or an app
//! token whose app may access it), records what it saw (connections, raw
//! command lines, AUTH outcomes, messages) and has fault switches that can
//! be flipped while it runs. Stops when dropped.
//! Does not depend on the `authswap` library.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
    ReadBuf,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use super::certs::pki;
use super::idp::TokenValidator;
use super::server::lock;

/// Longest accepted command line, terminator included (longer → connection dropped).
pub const MAX_LINE: usize = 64 * 1024;
/// Largest accepted message (SMTP DATA/BDAT, IMAP literal); bigger ones are
/// read and discarded, then refused (SMTP `552`, IMAP `NO`).
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// The base64 JSON challenge of a Google-style XOAUTH2 failure.
pub const GOOGLE_STYLE_CHALLENGE: &str = "eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIiwic2NvcGUiOiJodHRwczovL21haWwuZ29vZ2xlLmNvbS8ifQ==";
/// SMTP reply to a rejected XOAUTH2 login (Microsoft style).
pub const SMTP_AUTH_FAILED: &str = "535 5.7.3 Authentication unsuccessful [FAKE0001.namprd00.prod.outlook.com 2026-11-01T00:00:00.000Z 08DD00000000000]";
/// SMTP reply after a Google-style failure's empty line.
pub const SMTP_AUTH_FAILED_GOOGLE: &str = "535 5.7.8 Username and Password not accepted. For more information, go to https://support.google.com/mail/?p=BadCredentials";
/// SMTP reply to `AUTH LOGIN` (Basic auth disabled).
pub const SMTP_BASIC_DISABLED: &str = "535 5.7.139 Authentication unsuccessful, basic authentication is disabled. [FAKE0001.namprd00.prod.outlook.com 2026-11-01T00:00:00.000Z 08DD00000000000]";
/// SMTP reply to MAIL/RCPT/DATA/BDAT before authentication.
pub const SMTP_NOT_AUTHENTICATED: &str =
    "530 5.7.57 Client not authenticated to send mail. [FAKE0001.namprd00.prod.outlook.com]";
/// POP3 reply to a rejected XOAUTH2 login.
pub const POP3_AUTH_FAILED: &str =
    "-ERR Authentication failure: unknown user name or bad password.";
/// How long the `wait_for_*` helpers wait before panicking.
const WAIT_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// XOAUTH2
// ---------------------------------------------------------------------------

/// base64(`user=` U `\x01auth=Bearer ` T `\x01\x01`), the XOAUTH2 initial response.
pub fn xoauth2_blob(user: &str, token: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
}

/// Strictly parses an XOAUTH2 initial response into `(user, token)`.
pub fn parse_xoauth2(blob: &str) -> Option<(String, String)> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(blob.trim())
        .ok()?;
    let s = String::from_utf8(raw).ok()?;
    let rest = s.strip_suffix("\x01\x01")?;
    let (user, auth) = rest.split_once('\x01')?;
    let user = user.strip_prefix("user=")?;
    let auth = auth.strip_prefix("auth=")?;
    let (scheme, token) = auth.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("Bearer")
        || user.is_empty()
        || token.is_empty()
        || token.contains('\x01')
    {
        return None;
    }
    Some((user.to_string(), token.to_string()))
}

/// How a server does TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// TLS from the first byte (SMTPS 465 / IMAPS 993 / POP3S 995 style).
    Implicit,
    /// Plain text until STARTTLS (SMTP, IMAP) or STLS (POP3).
    StartTls,
}

/// One XOAUTH2 attempt as seen by a server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Xoauth2Attempt {
    /// The base64 blob as received.
    pub blob: String,
    /// `user=` value, if the blob parsed.
    pub user: Option<String>,
    /// Bearer token, if the blob parsed.
    pub token: Option<String>,
    /// Answered with success.
    pub accepted: bool,
    /// Failed because of `reject_auth_next` (whatever the token).
    pub forced_rejection: bool,
}

/// What a server recorded (shared by all three doubles).
#[derive(Clone, Debug, Default)]
pub struct MailStats {
    /// TCP connections accepted.
    pub connections: usize,
    /// Successful STARTTLS/STLS upgrades.
    pub starttls: usize,
    /// XOAUTH2 attempts (only XOAUTH2; see `non_xoauth2_auth_attempts`).
    pub auth_attempts: usize,
    /// XOAUTH2 attempts answered with success.
    pub auth_successes: usize,
    /// XOAUTH2 attempts answered with failure.
    pub auth_failures: usize,
    /// AUTH LOGIN/PLAIN/other mechanisms, IMAP LOGIN, POP3 USER/PASS/APOP.
    pub non_xoauth2_auth_attempts: usize,
    /// Authentication commands (any kind) sent before TLS in StartTls mode
    /// (they are refused without looking at the credentials).
    pub auth_without_tls: usize,
    /// Every line read from clients, raw, terminator included, in order
    /// (commands, SASL continuation lines, IMAP lines after literals, IDLE's
    /// `DONE`); not message data or literal bytes.
    pub commands: Vec<Vec<u8>>,
    /// Every XOAUTH2 attempt.
    pub xoauth2: Vec<Xoauth2Attempt>,
    /// Mailboxes (the `user=` value) of successful logins, in order.
    pub authenticated: Vec<String>,
}

struct Faults {
    reject_auth_next: usize,
    google_style_failure: bool,
    offer_starttls: bool,
    /// Refuse every XOAUTH2 attempt with this answer (IMAP: after the tag).
    refuse_auth_with: Option<String>,
}

/// State shared by every protocol: validator, TLS, records, fault switches.
struct Core {
    validator: TokenValidator,
    tls_mode: TlsMode,
    acceptor: TlsAcceptor,
    stats: Mutex<MailStats>,
    faults: Mutex<Faults>,
}

impl Core {
    fn new(
        validator: TokenValidator,
        tls_mode: TlsMode,
        reject_auth_next: usize,
        google_style_failure: bool,
        offer_starttls: bool,
    ) -> Arc<Core> {
        Arc::new(Core {
            validator,
            tls_mode,
            acceptor: TlsAcceptor::from(pki().server_config(&[])),
            stats: Mutex::new(MailStats::default()),
            faults: Mutex::new(Faults {
                reject_auth_next,
                google_style_failure,
                offer_starttls,
                refuse_auth_with: None,
            }),
        })
    }

    /// Decides an XOAUTH2 attempt and records it. `Some(user)` = accepted.
    fn judge(&self, blob: &str) -> Option<String> {
        let parsed = parse_xoauth2(blob);
        // A delegated token of that mailbox, or an app token whose app may
        // access it (app-only access).
        let valid = parsed
            .as_ref()
            .is_some_and(|(user, token)| self.validator.accepts_for(token, user));
        let forced = {
            let mut f = lock(&self.faults);
            if f.refuse_auth_with.is_some() {
                true
            } else if f.reject_auth_next > 0 {
                f.reject_auth_next -= 1;
                true
            } else {
                false
            }
        };
        let accepted = valid && !forced;
        let (user, token) = match parsed {
            Some((u, t)) => (Some(u), Some(t)),
            None => (None, None),
        };
        let mut st = lock(&self.stats);
        st.auth_attempts += 1;
        if accepted {
            st.auth_successes += 1;
            st.authenticated.push(user.clone().unwrap_or_default());
        } else {
            st.auth_failures += 1;
        }
        st.xoauth2.push(Xoauth2Attempt {
            blob: blob.to_string(),
            user: user.clone(),
            token,
            accepted,
            forced_rejection: forced,
        });
        if accepted {
            user
        } else {
            None
        }
    }

    fn google_style(&self) -> bool {
        lock(&self.faults).google_style_failure
    }

    /// The answer every XOAUTH2 attempt gets while `refuse_auth_with` is set.
    fn refusal(&self) -> Option<String> {
        lock(&self.faults).refuse_auth_with.clone()
    }

    fn offer_starttls(&self) -> bool {
        lock(&self.faults).offer_starttls
    }

    fn note_non_xoauth2(&self) {
        lock(&self.stats).non_xoauth2_auth_attempts += 1;
    }

    fn note_auth_without_tls(&self) {
        lock(&self.stats).auth_without_tls += 1;
    }
}

// ---------------------------------------------------------------------------
// Connection plumbing
// ---------------------------------------------------------------------------

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Placeholder while upgrading (reads EOF, writes fail).
    Closed,
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Closed => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }
}

fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "client closed the connection")
}

/// One client connection: a buffered reader plus an output queue that is
/// written out only when no further pipelined input is already buffered.
struct Conn {
    rd: BufReader<Stream>,
    out: Vec<u8>,
    core: Arc<Core>,
}

impl Conn {
    fn new(stream: Stream, core: Arc<Core>) -> Conn {
        Conn {
            rd: BufReader::with_capacity(MAX_LINE, stream),
            out: Vec::new(),
            core,
        }
    }

    fn is_tls(&self) -> bool {
        matches!(self.rd.get_ref(), Stream::Tls(_))
    }

    /// Queues `line` + CRLF.
    fn say(&mut self, line: &str) {
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    /// Queues raw bytes.
    fn say_bytes(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.rd.get_mut().write_all(&self.out).await?;
            self.out.clear();
        }
        self.rd.get_mut().flush().await
    }

    /// Sends queued replies unless more pipelined input is already buffered.
    async fn flush_if_idle(&mut self) -> io::Result<()> {
        if self.rd.buffer().is_empty() {
            self.flush().await
        } else {
            Ok(())
        }
    }

    /// Next line (raw, terminator included), recorded; `None` at EOF.
    async fn read_line(&mut self) -> io::Result<Option<Vec<u8>>> {
        self.flush_if_idle().await?;
        let mut line = Vec::new();
        (&mut self.rd)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .await?;
        if !line.ends_with(b"\n") {
            if line.len() >= MAX_LINE {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
            }
            return Ok(None);
        }
        lock(&self.core.stats).commands.push(line.clone());
        Ok(Some(line))
    }

    /// Like [`Conn::read_line`] but EOF is an error; returns the trimmed text.
    async fn read_line_required(&mut self) -> io::Result<String> {
        match self.read_line().await? {
            Some(l) => Ok(line_str(&l)),
            None => Err(eof()),
        }
    }

    /// Appends up to `limit` bytes, stopping after `\n`; not recorded.
    async fn read_piece(&mut self, buf: &mut Vec<u8>, limit: usize) -> io::Result<usize> {
        self.flush_if_idle().await?;
        (&mut self.rd)
            .take(limit as u64)
            .read_until(b'\n', buf)
            .await
    }

    /// Reads exactly `n` bytes; returns them if `n <= room`, otherwise reads
    /// and discards them and returns `None`.
    async fn read_exact_capped(&mut self, n: u64, room: usize) -> io::Result<Option<Vec<u8>>> {
        self.flush_if_idle().await?;
        if n <= room as u64 {
            let mut v = Vec::with_capacity(n as usize);
            (&mut self.rd).take(n).read_to_end(&mut v).await?;
            if (v.len() as u64) < n {
                return Err(eof());
            }
            Ok(Some(v))
        } else {
            let copied =
                tokio::io::copy(&mut (&mut self.rd).take(n), &mut tokio::io::sink()).await?;
            if copied < n {
                return Err(eof());
            }
            Ok(None)
        }
    }

    /// Sends queued replies, discards buffered plaintext and does the TLS
    /// handshake on the same TCP connection.
    async fn starttls(&mut self) -> io::Result<()> {
        self.flush().await?;
        let pending = self.rd.buffer().len();
        Pin::new(&mut self.rd).consume(pending);
        let old = std::mem::replace(self.rd.get_mut(), Stream::Closed);
        let Stream::Plain(tcp) = old else {
            return Err(io::Error::other("TLS already active"));
        };
        let tls = self.core.acceptor.accept(tcp).await?;
        *self.rd.get_mut() = Stream::Tls(Box::new(tls));
        lock(&self.core.stats).starttls += 1;
        Ok(())
    }
}

/// A line without its `\r\n` / `\n`, lossily decoded.
fn line_str(raw: &[u8]) -> String {
    let l = raw.strip_suffix(b"\n").unwrap_or(raw);
    let l = l.strip_suffix(b"\r").unwrap_or(l);
    String::from_utf8_lossy(l).into_owned()
}

/// `("VERB" uppercased, rest with leading spaces removed)`.
fn split_verb(line: &str) -> (String, &str) {
    match line.split_once(' ') {
        Some((v, rest)) => (v.to_ascii_uppercase(), rest.trim_start()),
        None => (line.to_ascii_uppercase(), ""),
    }
}

/// Accept loop; aborted (with all its connections) on drop.
struct ServerTask {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for ServerTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn spawn_mail_server<F, Fut>(core: Arc<Core>, handler: F) -> ServerTask
where
    F: Fn(Conn) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = io::Result<()>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local_addr");
    let task = tokio::spawn(async move {
        // Dropping the JoinSet (when this task is aborted) aborts every connection.
        let mut conns = JoinSet::new();
        loop {
            let tcp = match listener.accept().await {
                Ok((tcp, _)) => tcp,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            };
            while conns.try_join_next().is_some() {}
            lock(&core.stats).connections += 1;
            let core = core.clone();
            let handler = handler.clone();
            conns.spawn(async move {
                let _ = tcp.set_nodelay(true);
                let stream = match core.tls_mode {
                    TlsMode::StartTls => Stream::Plain(tcp),
                    TlsMode::Implicit => match core.acceptor.accept(tcp).await {
                        Ok(tls) => Stream::Tls(Box::new(tls)),
                        Err(_) => return,
                    },
                };
                let _ = handler(Conn::new(stream, core)).await;
            });
        }
    });
    ServerTask { addr, task }
}

/// Accessors and fault switches common to the three doubles.
macro_rules! common_api {
    ($proto:literal) => {
        pub fn addr(&self) -> SocketAddr {
            self.task.addr
        }

        pub fn port(&self) -> u16 {
            self.task.addr.port()
        }

        pub fn tls_mode(&self) -> TlsMode {
            self.core.tls_mode
        }

        /// Snapshot of everything recorded.
        pub fn stats(&self) -> MailStats {
            lock(&self.core.stats).clone()
        }

        /// TCP connections accepted.
        pub fn connections(&self) -> usize {
            lock(&self.core.stats).connections
        }

        /// Successful STARTTLS/STLS upgrades.
        pub fn starttls_count(&self) -> usize {
            lock(&self.core.stats).starttls
        }

        /// XOAUTH2 attempts (successful or not).
        pub fn auth_attempts(&self) -> usize {
            lock(&self.core.stats).auth_attempts
        }

        pub fn auth_successes(&self) -> usize {
            lock(&self.core.stats).auth_successes
        }

        pub fn auth_failures(&self) -> usize {
            lock(&self.core.stats).auth_failures
        }

        /// Every line received, raw (terminator included).
        pub fn commands(&self) -> Vec<Vec<u8>> {
            lock(&self.core.stats).commands.clone()
        }

        /// Every line received, without terminator, lossily decoded.
        pub fn command_lines(&self) -> Vec<String> {
            lock(&self.core.stats)
                .commands
                .iter()
                .map(|l| line_str(l))
                .collect()
        }

        /// Whether anything but XOAUTH2 was tried (Basic auth of any form).
        pub fn non_xoauth2_auth_attempted(&self) -> bool {
            lock(&self.core.stats).non_xoauth2_auth_attempts > 0
        }

        pub fn non_xoauth2_auth_attempts(&self) -> usize {
            lock(&self.core.stats).non_xoauth2_auth_attempts
        }

        /// Authentication commands sent before TLS (StartTls mode).
        pub fn auth_without_tls(&self) -> usize {
            lock(&self.core.stats).auth_without_tls
        }

        pub fn xoauth2_attempts(&self) -> Vec<Xoauth2Attempt> {
            lock(&self.core.stats).xoauth2.clone()
        }

        /// `user=` values of successful logins, in order.
        pub fn authenticated_mailboxes(&self) -> Vec<String> {
            lock(&self.core.stats).authenticated.clone()
        }

        /// Forgets all records (fault switches and stored mail are kept).
        pub fn clear_records(&self) {
            *lock(&self.core.stats) = MailStats::default();
        }

        /// Fails the next `n` XOAUTH2 attempts even with a valid token.
        pub fn reject_auth_next(&self, n: usize) {
            lock(&self.core.faults).reject_auth_next = n;
        }

        /// Forced rejections still pending.
        pub fn pending_auth_rejections(&self) -> usize {
            lock(&self.core.faults).reject_auth_next
        }

        /// Refuses every XOAUTH2 attempt, valid token or not, with `answer`
        /// (SMTP: the whole reply line; IMAP: what follows the tag; POP3:
        /// the whole line) until called with `None`.
        pub fn refuse_auth_with(&self, answer: Option<&str>) {
            lock(&self.core.faults).refuse_auth_with = answer.map(str::to_owned);
        }

        /// Switches Google-style failures (challenge, empty line, failure).
        pub fn set_google_style_failure(&self, on: bool) {
            lock(&self.core.faults).google_style_failure = on;
        }

        /// Whether STARTTLS/STLS is advertised and accepted (StartTls mode).
        pub fn set_offer_starttls(&self, on: bool) {
            lock(&self.core.faults).offer_starttls = on;
        }

        /// Waits (≤ 10 s, then panics) until `pred` holds for the records.
        pub async fn wait_until(&self, what: &str, pred: impl Fn(&MailStats) -> bool) {
            let deadline = tokio::time::Instant::now() + WAIT_TIMEOUT;
            loop {
                if pred(&lock(&self.core.stats)) {
                    return;
                }
                if tokio::time::Instant::now() >= deadline {
                    panic!("{}: {what} did not happen within {WAIT_TIMEOUT:?}", $proto);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }

        /// Waits (≤ 10 s) until at least `n` XOAUTH2 attempts were made.
        pub async fn wait_for_auth_attempts(&self, n: usize) {
            self.wait_until(&format!("{n} XOAUTH2 attempts"), |s| s.auth_attempts >= n)
                .await
        }
    };
}

// ---------------------------------------------------------------------------
// SMTP
// ---------------------------------------------------------------------------

/// Extensions advertised after TLS by default (besides `AUTH LOGIN XOAUTH2`).
pub fn default_smtp_extensions() -> Vec<String> {
    [
        "SIZE 157286400",
        "8BITMIME",
        "PIPELINING",
        "SMTPUTF8",
        "CHUNKING",
        "ENHANCEDSTATUSCODES",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Start-up options for [`FakeSmtp::start`].
#[derive(Clone, Debug)]
pub struct SmtpOptions {
    /// Default [`TlsMode::StartTls`] (like smtp.office365.com:587).
    pub tls: TlsMode,
    /// Fail the next n XOAUTH2 attempts even if valid.
    pub reject_auth_next: usize,
    /// Answer a bad token with `334 <GOOGLE_STYLE_CHALLENGE>`, wait for the
    /// client's (empty) line, then `535 5.7.8`.
    pub google_style_failure: bool,
    /// EHLO keywords after TLS, in order (`AUTH LOGIN XOAUTH2` is appended).
    pub extensions: Vec<String>,
    /// StartTls mode: advertise and accept STARTTLS (default true).
    pub offer_starttls: bool,
}

impl Default for SmtpOptions {
    fn default() -> Self {
        SmtpOptions {
            tls: TlsMode::StartTls,
            reject_auth_next: 0,
            google_style_failure: false,
            extensions: default_smtp_extensions(),
            offer_starttls: true,
        }
    }
}

/// One accepted message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmtpMessage {
    /// Reverse path without `<>` (empty for the null sender).
    pub mail_from: String,
    /// MAIL FROM parameters after the path (e.g. `SIZE=123 BODY=8BITMIME`).
    pub mail_params: String,
    /// Forward paths without `<>`, in order.
    pub rcpt_to: Vec<String>,
    /// DATA: bytes as received up to (excluding) the terminating `.\r\n`,
    /// still dot-stuffed. BDAT: the chunks concatenated.
    pub raw_data: Vec<u8>,
    /// The message: `raw_data` dot-unstuffed (BDAT: same as `raw_data`).
    pub message: Vec<u8>,
    /// Sent with BDAT (CHUNKING) rather than DATA.
    pub bdat: bool,
    /// Mailbox of the authenticated session.
    pub authenticated_as: String,
    /// Queue id answered in the `250`.
    pub id: String,
}

struct SmtpInner {
    extensions: Vec<String>,
    messages: Vec<SmtpMessage>,
    next_id: u64,
    /// Authenticated sessions open now, by mailbox.
    active: std::collections::HashMap<String, usize>,
    /// The most authenticated sessions one mailbox had open at once.
    max_active: usize,
    /// Like Exchange Online: more authenticated sessions of one mailbox
    /// than this get `432 4.3.2` at MAIL FROM.
    session_limit: Option<usize>,
    /// When each MAIL FROM was accepted.
    mail_times: Vec<std::time::Instant>,
}

/// Counts an authenticated SMTP session while it lasts.
struct ActiveSession {
    inner: Arc<Mutex<SmtpInner>>,
    mailbox: String,
}

impl Drop for ActiveSession {
    fn drop(&mut self) {
        let mut g = lock(&self.inner);
        if let Some(n) = g.active.get_mut(&self.mailbox) {
            *n -= 1;
        }
    }
}

/// The running fake SMTP submission server. Shuts down when dropped.
pub struct FakeSmtp {
    task: ServerTask,
    core: Arc<Core>,
    inner: Arc<Mutex<SmtpInner>>,
}

impl std::fmt::Debug for FakeSmtp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeSmtp")
            .field("addr", &self.addr())
            .finish()
    }
}

impl FakeSmtp {
    /// Starts; the listener is bound on return.
    pub async fn start(validator: TokenValidator, opts: SmtpOptions) -> FakeSmtp {
        let core = Core::new(
            validator,
            opts.tls,
            opts.reject_auth_next,
            opts.google_style_failure,
            opts.offer_starttls,
        );
        let inner = Arc::new(Mutex::new(SmtpInner {
            extensions: opts.extensions,
            messages: Vec::new(),
            next_id: 1,
            active: Default::default(),
            max_active: 0,
            session_limit: None,
            mail_times: Vec::new(),
        }));
        let i = inner.clone();
        let task = spawn_mail_server(core.clone(), move |conn| smtp_session(conn, i.clone())).await;
        FakeSmtp { task, core, inner }
    }

    common_api!("FakeSmtp");

    /// Accepted messages, in order.
    pub fn messages(&self) -> Vec<SmtpMessage> {
        lock(&self.inner).messages.clone()
    }

    pub fn message_count(&self) -> usize {
        lock(&self.inner).messages.len()
    }

    /// Forgets accepted messages.
    pub fn clear_messages(&self) {
        lock(&self.inner).messages.clear();
    }

    /// Waits (≤ 10 s, then panics) until at least `n` messages were accepted.
    pub async fn wait_for_messages(&self, n: usize) -> Vec<SmtpMessage> {
        let deadline = tokio::time::Instant::now() + WAIT_TIMEOUT;
        loop {
            let msgs = self.messages();
            if msgs.len() >= n {
                return msgs;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("FakeSmtp: fewer than {n} messages within {WAIT_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The most authenticated sessions one mailbox had open at once.
    pub fn max_concurrent_sessions(&self) -> usize {
        lock(&self.inner).max_active
    }

    /// Like Exchange Online, answer MAIL FROM with `432 4.3.2` while the
    /// session's mailbox has more than `limit` authenticated sessions.
    pub fn set_session_limit(&self, limit: Option<usize>) {
        lock(&self.inner).session_limit = limit;
    }

    /// When each MAIL FROM was accepted, in order.
    pub fn mail_times(&self) -> Vec<std::time::Instant> {
        lock(&self.inner).mail_times.clone()
    }

    /// EHLO keywords advertised after TLS from now on.
    pub fn set_extensions(&self, extensions: Vec<String>) {
        lock(&self.inner).extensions = extensions;
    }
}

#[derive(Default)]
struct SmtpSession {
    /// Counted among the mailbox's open sessions while authenticated.
    active: Option<ActiveSession>,
    helo: bool,
    authed: Option<String>,
    mail: Option<(String, String)>,
    rcpts: Vec<String>,
    bdat: Vec<u8>,
    bdat_overflow: bool,
}

impl SmtpSession {
    fn reset_txn(&mut self) {
        self.mail = None;
        self.rcpts.clear();
        self.bdat = Vec::new();
        self.bdat_overflow = false;
    }
}

fn smtp_multi(c: &mut Conn, code: u16, lines: &[String]) {
    for (i, l) in lines.iter().enumerate() {
        let sep = if i + 1 == lines.len() { ' ' } else { '-' };
        c.say(&format!("{code}{sep}{l}"));
    }
}

/// Parses `FROM:<addr> params` / `TO:<addr> params` → `(addr, params)`.
fn parse_path(rest: &str, keyword: &str) -> Option<(String, String)> {
    let head = rest.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = rest[keyword.len()..].trim_start();
    if let Some(r) = rest.strip_prefix('<') {
        let end = r.find('>')?;
        Some((r[..end].to_string(), r[end + 1..].trim().to_string()))
    } else {
        let (addr, params) = rest.split_once(' ').unwrap_or((rest, ""));
        (!addr.is_empty()).then(|| (addr.to_string(), params.trim().to_string()))
    }
}

async fn smtp_session(mut c: Conn, inner: Arc<Mutex<SmtpInner>>) -> io::Result<()> {
    c.say("220 fake.outlook ESMTP");
    let mut s = SmtpSession::default();
    loop {
        let Some(raw) = c.read_line().await? else {
            return Ok(());
        };
        let line = line_str(&raw);
        let (verb, rest) = split_verb(&line);
        match verb.as_str() {
            "EHLO" | "HELO" if rest.trim().is_empty() => {
                c.say("501 5.5.4 Invalid domain name");
            }
            "EHLO" => {
                s.helo = true;
                s.reset_txn();
                let mut lines = vec!["fake.outlook Hello [127.0.0.1]".to_string()];
                if c.is_tls() {
                    lines.extend(lock(&inner).extensions.iter().cloned());
                    lines.push("AUTH LOGIN XOAUTH2".to_string());
                } else {
                    lines.push("SIZE 157286400".to_string());
                    lines.push("PIPELINING".to_string());
                    if c.core.offer_starttls() {
                        lines.push("STARTTLS".to_string());
                    }
                }
                smtp_multi(&mut c, 250, &lines);
            }
            "HELO" => {
                s.helo = true;
                s.reset_txn();
                c.say("250 fake.outlook Hello [127.0.0.1]");
            }
            "STARTTLS" => {
                if c.is_tls() {
                    c.say("503 5.5.1 TLS already active");
                } else if !c.core.offer_starttls() {
                    c.say("454 4.7.0 TLS not available");
                } else {
                    c.say("220 2.0.0 SMTP server ready");
                    c.starttls().await?;
                    s = SmtpSession::default();
                }
            }
            "AUTH" => {
                smtp_auth(&mut c, &mut s, rest).await?;
                if let (Some(user), None) = (&s.authed, &s.active) {
                    let mailbox = user.to_ascii_lowercase();
                    let mut g = lock(&inner);
                    let n = g.active.entry(mailbox.clone()).or_default();
                    *n += 1;
                    let n = *n;
                    g.max_active = g.max_active.max(n);
                    drop(g);
                    s.active = Some(ActiveSession {
                        inner: inner.clone(),
                        mailbox,
                    });
                }
            }
            "MAIL" => {
                let over_limit = s.active.as_ref().is_some_and(|a| {
                    let g = lock(&inner);
                    g.session_limit
                        .is_some_and(|l| g.active.get(&a.mailbox).copied().unwrap_or(0) > l)
                });
                if !s.helo {
                    c.say("503 5.5.1 Send hello first");
                } else if s.authed.is_none() {
                    c.say(SMTP_NOT_AUTHENTICATED);
                } else if over_limit {
                    c.say("432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded");
                } else if s.mail.is_some() {
                    c.say("503 5.5.1 Sender already specified");
                } else if let Some(path) = parse_path(rest, "FROM:") {
                    s.mail = Some(path);
                    lock(&inner).mail_times.push(std::time::Instant::now());
                    c.say("250 2.1.0 Sender OK");
                } else {
                    c.say("501 5.5.4 Invalid arguments");
                }
            }
            "RCPT" => {
                if !s.helo {
                    c.say("503 5.5.1 Send hello first");
                } else if s.authed.is_none() {
                    c.say(SMTP_NOT_AUTHENTICATED);
                } else if s.mail.is_none() {
                    c.say("503 5.5.1 Need mail command");
                } else if let Some((addr, _)) = parse_path(rest, "TO:") {
                    s.rcpts.push(addr);
                    c.say("250 2.1.5 Recipient OK");
                } else {
                    c.say("501 5.5.4 Invalid arguments");
                }
            }
            "DATA" => {
                if s.authed.is_none() {
                    c.say(SMTP_NOT_AUTHENTICATED);
                    continue;
                }
                if s.mail.is_none() {
                    c.say("503 5.5.1 Need mail command");
                    continue;
                }
                if s.rcpts.is_empty() {
                    c.say("503 5.5.1 Need rcpt command");
                    continue;
                }
                if !s.bdat.is_empty() {
                    c.say("503 5.5.1 DATA not allowed after BDAT");
                    continue;
                }
                c.say("354 Start mail input; end with <CRLF>.<CRLF>");
                let (raw_data, message, overflow) = read_dot_data(&mut c).await?;
                if overflow {
                    c.say("552 5.3.4 Message size exceeds fixed maximum message size");
                } else {
                    let id = store_smtp(&inner, &mut s, raw_data, message, false);
                    c.say(&format!(
                        "250 2.0.0 OK {id} [Hostname=FAKE0001.namprd00.prod.outlook.com]"
                    ));
                }
                s.reset_txn();
            }
            "BDAT" => smtp_bdat(&mut c, &mut s, rest, &inner).await?,
            "RSET" => {
                s.reset_txn();
                c.say("250 2.0.0 Resetting");
            }
            "NOOP" => c.say("250 2.0.0 OK"),
            "QUIT" => {
                c.say("221 2.0.0 Service closing transmission channel");
                c.flush().await?;
                let _ = c.rd.get_mut().shutdown().await;
                return Ok(());
            }
            _ => c.say("500 5.3.3 Unrecognized command"),
        }
    }
}

fn store_smtp(
    inner: &Mutex<SmtpInner>,
    s: &mut SmtpSession,
    raw_data: Vec<u8>,
    message: Vec<u8>,
    bdat: bool,
) -> String {
    let (mail_from, mail_params) = s.mail.clone().unwrap_or_default();
    let mut g = lock(inner);
    let id = format!("<{:08X}.fake@fake.outlook>", g.next_id);
    g.next_id += 1;
    g.messages.push(SmtpMessage {
        mail_from,
        mail_params,
        rcpt_to: s.rcpts.clone(),
        raw_data,
        message,
        bdat,
        authenticated_as: s.authed.clone().unwrap_or_default(),
        id: id.clone(),
    });
    id
}

async fn smtp_auth(c: &mut Conn, s: &mut SmtpSession, rest: &str) -> io::Result<()> {
    let mut args = rest.split_whitespace();
    let mech = args.next().unwrap_or("").to_ascii_uppercase();
    let ir = args.next().map(str::to_string);
    if mech != "XOAUTH2" {
        c.core.note_non_xoauth2();
    }
    if !c.is_tls() {
        c.core.note_auth_without_tls();
        c.say("504 5.7.4 Unrecognized authentication type");
        return Ok(());
    }
    if !s.helo {
        c.say("503 5.5.1 Send hello first");
        return Ok(());
    }
    if s.authed.is_some() {
        c.say("503 5.5.1 Already authenticated");
        return Ok(());
    }
    match mech.as_str() {
        "XOAUTH2" => {
            let blob = match ir {
                Some(b) => b,
                None => {
                    c.say("334 ");
                    c.read_line_required().await?
                }
            };
            if blob == "*" {
                c.say("501 5.7.0 Authentication aborted");
                return Ok(());
            }
            match c.core.judge(&blob) {
                Some(user) => {
                    s.authed = Some(user);
                    c.say("235 2.7.0 Authentication successful");
                }
                None if c.core.refusal().is_some() => {
                    c.say(&c.core.refusal().unwrap_or_default());
                }
                None if c.core.google_style() => {
                    c.say(&format!("334 {GOOGLE_STYLE_CHALLENGE}"));
                    c.read_line_required().await?;
                    c.say(SMTP_AUTH_FAILED_GOOGLE);
                }
                None => c.say(SMTP_AUTH_FAILED),
            }
        }
        "LOGIN" => {
            if ir.is_none() {
                c.say("334 VXNlcm5hbWU6");
                if c.read_line_required().await? == "*" {
                    c.say("501 5.7.0 Authentication aborted");
                    return Ok(());
                }
            }
            c.say("334 UGFzc3dvcmQ6");
            if c.read_line_required().await? == "*" {
                c.say("501 5.7.0 Authentication aborted");
                return Ok(());
            }
            c.say(SMTP_BASIC_DISABLED);
        }
        _ => c.say("504 5.7.4 Unrecognized authentication type"),
    }
    Ok(())
}

async fn smtp_bdat(
    c: &mut Conn,
    s: &mut SmtpSession,
    rest: &str,
    inner: &Mutex<SmtpInner>,
) -> io::Result<()> {
    let mut args = rest.split_whitespace();
    let Some(n) = args.next().and_then(|a| a.parse::<u64>().ok()) else {
        c.say("501 5.5.4 Invalid arguments");
        return Ok(());
    };
    let last = args.next().is_some_and(|a| a.eq_ignore_ascii_case("LAST"));
    let ready = s.helo && s.authed.is_some() && s.mail.is_some() && !s.rcpts.is_empty();
    let room = if ready && !s.bdat_overflow {
        MAX_MESSAGE.saturating_sub(s.bdat.len())
    } else {
        0
    };
    // The chunk is always consumed so the session stays in sync.
    let chunk = c.read_exact_capped(n, room).await?;
    if !ready {
        if s.authed.is_none() {
            c.say(SMTP_NOT_AUTHENTICATED);
        } else if s.mail.is_none() {
            c.say("503 5.5.1 Need mail command");
        } else {
            c.say("503 5.5.1 Need rcpt command");
        }
        s.reset_txn();
        return Ok(());
    }
    match chunk {
        Some(b) if !s.bdat_overflow => s.bdat.extend_from_slice(&b),
        _ => {
            s.bdat_overflow = true;
            s.bdat = Vec::new();
        }
    }
    if !last {
        c.say(&format!("250 2.0.0 {n} bytes received"));
        return Ok(());
    }
    if s.bdat_overflow {
        c.say("552 5.3.4 Message size exceeds fixed maximum message size");
    } else {
        let data = std::mem::take(&mut s.bdat);
        let id = store_smtp(inner, s, data.clone(), data, true);
        c.say(&format!(
            "250 2.0.0 OK {id} [Hostname=FAKE0001.namprd00.prod.outlook.com]"
        ));
    }
    s.reset_txn();
    Ok(())
}

/// Reads DATA up to `CRLF.CRLF`: `(raw, unstuffed, too_big)`.
async fn read_dot_data(c: &mut Conn) -> io::Result<(Vec<u8>, Vec<u8>, bool)> {
    let mut raw = Vec::new();
    let mut msg = Vec::new();
    let mut overflow = false;
    let mut at_line_start = true;
    let mut last = 0u8;
    let mut piece = Vec::with_capacity(8192);
    loop {
        piece.clear();
        if c.read_piece(&mut piece, 1 << 20).await? == 0 {
            return Err(eof());
        }
        if at_line_start && piece == b".\r\n" {
            break;
        }
        if !overflow && raw.len() + piece.len() <= MAX_MESSAGE {
            raw.extend_from_slice(&piece);
            let body = if at_line_start && piece[0] == b'.' {
                &piece[1..]
            } else {
                &piece[..]
            };
            msg.extend_from_slice(body);
        } else if !overflow {
            overflow = true;
            raw = Vec::new();
            msg = Vec::new();
        }
        let n = piece.len();
        let before_lf = if n >= 2 { piece[n - 2] } else { last };
        at_line_start = piece[n - 1] == b'\n' && before_lf == b'\r';
        last = piece[n - 1];
    }
    Ok((raw, msg, overflow))
}

// ---------------------------------------------------------------------------
// IMAP
// ---------------------------------------------------------------------------

/// A small RFC 5322 message (`Subject`, `body` lines) for canned mailboxes.
pub fn canned_message(subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: Sender <sender@example.com>\r\nTo: user@contoso.test\r\nSubject: {subject}\r\nMessage-ID: <{subject_id}@example.com>\r\n\r\n{body}",
        subject_id = subject.replace(' ', "-").to_ascii_lowercase()
    )
    .into_bytes()
}

/// The three messages an IMAP INBOX starts with (hence `* 3 EXISTS`).
pub fn default_imap_messages() -> Vec<Vec<u8>> {
    vec![
        canned_message("First message", "Hello from message one.\r\n"),
        canned_message(
            "Second message",
            "Line one.\r\n.A line starting with a dot\r\n",
        ),
        canned_message("Third message", "Bye.\r\n"),
    ]
}

/// Start-up options for [`FakeImap::start`].
#[derive(Clone, Debug)]
pub struct ImapOptions {
    /// Default [`TlsMode::Implicit`] (like outlook.office365.com:993).
    pub tls: TlsMode,
    /// Fail the next n XOAUTH2 attempts even if valid.
    pub reject_auth_next: usize,
    /// On a bad token send `+ <GOOGLE_STYLE_CHALLENGE>`, wait for the
    /// client's line, then `NO AUTHENTICATE failed.`
    pub google_style_failure: bool,
    /// StartTls mode: advertise and accept STARTTLS (default true).
    pub offer_starttls: bool,
    /// INBOX contents (default [`default_imap_messages`]).
    pub mailbox: Vec<Vec<u8>>,
}

impl Default for ImapOptions {
    fn default() -> Self {
        ImapOptions {
            tls: TlsMode::Implicit,
            reject_auth_next: 0,
            google_style_failure: false,
            offer_starttls: true,
            mailbox: default_imap_messages(),
        }
    }
}

struct ImapInner {
    mailbox: Vec<Vec<u8>>,
    appended: Vec<Vec<u8>>,
    idles: usize,
}

/// The running fake IMAP server. Shuts down when dropped.
pub struct FakeImap {
    task: ServerTask,
    core: Arc<Core>,
    inner: Arc<Mutex<ImapInner>>,
}

impl std::fmt::Debug for FakeImap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeImap")
            .field("addr", &self.addr())
            .finish()
    }
}

impl FakeImap {
    /// Starts; the listener is bound on return.
    pub async fn start(validator: TokenValidator, opts: ImapOptions) -> FakeImap {
        let core = Core::new(
            validator,
            opts.tls,
            opts.reject_auth_next,
            opts.google_style_failure,
            opts.offer_starttls,
        );
        let inner = Arc::new(Mutex::new(ImapInner {
            mailbox: opts.mailbox,
            appended: Vec::new(),
            idles: 0,
        }));
        let i = inner.clone();
        let task = spawn_mail_server(core.clone(), move |conn| imap_session(conn, i.clone())).await;
        FakeImap { task, core, inner }
    }

    common_api!("FakeImap");

    /// Messages stored by APPEND (exact literal bytes), in order.
    pub fn appended(&self) -> Vec<Vec<u8>> {
        lock(&self.inner).appended.clone()
    }

    /// Current INBOX (initial contents plus appended messages).
    pub fn mailbox(&self) -> Vec<Vec<u8>> {
        lock(&self.inner).mailbox.clone()
    }

    /// Replaces the INBOX contents.
    pub fn set_mailbox(&self, messages: Vec<Vec<u8>>) {
        lock(&self.inner).mailbox = messages;
    }

    /// IDLE commands completed with `DONE`.
    pub fn idle_count(&self) -> usize {
        lock(&self.inner).idles
    }
}

fn imap_caps(c: &Conn) -> String {
    const COMMON: &str = "IDLE LITERAL+ UIDPLUS ID UNSELECT CHILDREN NAMESPACE";
    if c.is_tls() {
        format!("IMAP4rev1 SASL-IR AUTH=XOAUTH2 {COMMON}")
    } else if c.core.offer_starttls() {
        format!("IMAP4rev1 STARTTLS LOGINDISABLED {COMMON}")
    } else {
        format!("IMAP4rev1 LOGINDISABLED {COMMON}")
    }
}

/// `{n}` / `{n+}` at the end of a line → `(n, synchronizing)`.
fn literal_suffix(line: &str) -> Option<(u64, bool)> {
    let s = line.strip_suffix('}')?;
    let open = s.rfind('{')?;
    let spec = &s[open + 1..];
    let (num, sync) = match spec.strip_suffix('+') {
        Some(n) => (n, false),
        None => (spec, true),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((num.parse().ok()?, sync))
}

struct ImapCommand {
    /// First line, without terminator.
    line: String,
    /// Literal payloads, in order.
    literals: Vec<Vec<u8>>,
    /// A literal was too big and was discarded.
    overflow: bool,
}

/// Reads one command including its literals (answering `+ Ready for
/// literal data` to synchronizing ones).
async fn read_imap_command(c: &mut Conn) -> io::Result<Option<ImapCommand>> {
    let Some(raw) = c.read_line().await? else {
        return Ok(None);
    };
    let mut cmd = ImapCommand {
        line: line_str(&raw),
        literals: Vec::new(),
        overflow: false,
    };
    let mut current = cmd.line.clone();
    let mut total = 0usize;
    while let Some((n, sync)) = literal_suffix(&current) {
        if sync {
            c.say("+ Ready for literal data");
        }
        let room = if cmd.overflow {
            0
        } else {
            MAX_MESSAGE.saturating_sub(total)
        };
        match c.read_exact_capped(n, room).await? {
            Some(b) => {
                total += b.len();
                cmd.literals.push(b);
            }
            None => cmd.overflow = true,
        }
        current = c.read_line_required().await?;
    }
    Ok(Some(cmd))
}

fn is_inbox(arg: &str) -> bool {
    let name = arg.split_whitespace().next().unwrap_or("");
    name.trim_matches('"').eq_ignore_ascii_case("INBOX")
}

async fn imap_session(mut c: Conn, inner: Arc<Mutex<ImapInner>>) -> io::Result<()> {
    let caps = imap_caps(&c);
    c.say(&format!("* OK [CAPABILITY {caps}] fake ready"));
    let mut authed: Option<String> = None;
    let mut selected = false;
    loop {
        let Some(cmd) = read_imap_command(&mut c).await? else {
            return Ok(());
        };
        let mut words = cmd.line.splitn(3, ' ');
        let tag = words.next().unwrap_or("").to_string();
        let verb = words.next().unwrap_or("").to_ascii_uppercase();
        let args = words.next().unwrap_or("").to_string();
        if tag.is_empty() || verb.is_empty() {
            c.say("* BAD Command Error. 10");
            continue;
        }
        let invalid_state = format!("{tag} BAD Command received in Invalid state.");
        match verb.as_str() {
            "CAPABILITY" => {
                let caps = imap_caps(&c);
                c.say(&format!("* CAPABILITY {caps}"));
                c.say(&format!("{tag} OK CAPABILITY completed."));
            }
            "NOOP" => c.say(&format!("{tag} OK NOOP completed.")),
            "LOGOUT" => {
                c.say("* BYE Microsoft Exchange Server IMAP4 server signing off.");
                c.say(&format!("{tag} OK LOGOUT completed."));
                c.flush().await?;
                let _ = c.rd.get_mut().shutdown().await;
                return Ok(());
            }
            "STARTTLS" => {
                if c.is_tls() || !c.core.offer_starttls() {
                    c.say(&invalid_state);
                } else {
                    c.say(&format!("{tag} OK Begin TLS negotiation now."));
                    c.starttls().await?;
                }
            }
            "AUTHENTICATE" => {
                if authed.is_some() {
                    c.say(&invalid_state);
                    continue;
                }
                authed = imap_authenticate(&mut c, &tag, &args).await?;
            }
            "LOGIN" => {
                c.core.note_non_xoauth2();
                if !c.is_tls() {
                    c.core.note_auth_without_tls();
                }
                c.say(&format!("{tag} NO LOGIN failed."));
            }
            "SELECT" | "EXAMINE" => {
                if authed.is_none() {
                    c.say(&invalid_state);
                } else if is_inbox(&args) {
                    let n = lock(&inner).mailbox.len();
                    const FLAGS: &str = r"(\Seen \Answered \Flagged \Deleted \Draft $MDNSent)";
                    c.say(&format!("* {n} EXISTS"));
                    c.say("* 0 RECENT");
                    c.say(&format!("* FLAGS {FLAGS}"));
                    c.say(&format!("* OK [PERMANENTFLAGS {FLAGS}] Permanent flags"));
                    c.say("* OK [UIDVALIDITY 14] UIDVALIDITY value");
                    c.say(&format!(
                        "* OK [UIDNEXT {}] The next unique identifier value",
                        n + 1
                    ));
                    let mode = if verb == "SELECT" {
                        "READ-WRITE"
                    } else {
                        "READ-ONLY"
                    };
                    c.say(&format!("{tag} OK [{mode}] {verb} completed."));
                    selected = true;
                } else {
                    selected = false;
                    c.say(&format!("{tag} NO {verb} failed."));
                }
            }
            "APPEND" => {
                if cmd.overflow {
                    c.say(&format!("{tag} NO [LIMIT] Message too large."));
                } else if authed.is_none() {
                    c.say(&invalid_state);
                } else if !is_inbox(&args) {
                    c.say(&format!("{tag} NO [TRYCREATE] Folder not found."));
                } else if let Some(msg) = cmd.literals.into_iter().next() {
                    let mut g = lock(&inner);
                    g.mailbox.push(msg.clone());
                    g.appended.push(msg);
                    let uid = g.mailbox.len();
                    drop(g);
                    c.say(&format!("{tag} OK [APPENDUID 14 {uid}] APPEND completed."));
                } else {
                    c.say(&format!("{tag} BAD Command Argument Error. 11"));
                }
            }
            "IDLE" => {
                if authed.is_none() {
                    c.say(&invalid_state);
                    continue;
                }
                c.say("+ idling");
                let done = c.read_line_required().await?;
                if done.eq_ignore_ascii_case("DONE") {
                    lock(&inner).idles += 1;
                    c.say(&format!("{tag} OK IDLE completed."));
                } else {
                    c.say(&format!("{tag} BAD Command Argument Error. 11"));
                }
            }
            "FETCH" => {
                if !selected {
                    c.say(&invalid_state);
                    continue;
                }
                imap_fetch(&mut c, &tag, &args, &inner);
            }
            _ => c.say(&format!("{tag} BAD Command Error. 12")),
        }
    }
}

async fn imap_authenticate(c: &mut Conn, tag: &str, args: &str) -> io::Result<Option<String>> {
    let mut a = args.split_whitespace();
    let mech = a.next().unwrap_or("").to_ascii_uppercase();
    let ir = a.next().map(str::to_string);
    if mech != "XOAUTH2" {
        c.core.note_non_xoauth2();
    }
    if !c.is_tls() {
        c.core.note_auth_without_tls();
        c.say(&format!("{tag} NO AUTHENTICATE failed."));
        return Ok(None);
    }
    if mech != "XOAUTH2" {
        c.say(&format!("{tag} NO AUTHENTICATE failed."));
        return Ok(None);
    }
    let blob = match ir {
        Some(b) if b == "=" => String::new(),
        Some(b) => b,
        None => {
            c.say("+ ");
            c.read_line_required().await?
        }
    };
    if blob == "*" {
        c.say(&format!("{tag} BAD AUTHENTICATE aborted."));
        return Ok(None);
    }
    match c.core.judge(&blob) {
        Some(user) => {
            c.say(&format!("{tag} OK AUTHENTICATE completed."));
            Ok(Some(user))
        }
        None => {
            if let Some(answer) = c.core.refusal() {
                c.say(&format!("{tag} {answer}"));
                return Ok(None);
            }
            if c.core.google_style() {
                c.say(&format!("+ {GOOGLE_STYLE_CHALLENGE}"));
                c.read_line_required().await?;
            }
            c.say(&format!("{tag} NO AUTHENTICATE failed."));
            Ok(None)
        }
    }
}

fn imap_fetch(c: &mut Conn, tag: &str, args: &str, inner: &Mutex<ImapInner>) {
    let (seq, items) = args.split_once(' ').unwrap_or((args, ""));
    let items = items.to_ascii_uppercase();
    let item = if items.contains("BODY[]") || items.contains("BODY.PEEK[]") {
        "BODY[]"
    } else if items.contains("RFC822") {
        "RFC822"
    } else {
        c.say(&format!("{tag} BAD Command Argument Error. 11"));
        return;
    };
    let msg = seq
        .parse::<usize>()
        .ok()
        .filter(|n| *n >= 1)
        .and_then(|n| lock(inner).mailbox.get(n - 1).cloned());
    let Some(msg) = msg else {
        c.say(&format!("{tag} NO The specified message set is invalid."));
        return;
    };
    c.say_bytes(format!("* {seq} FETCH ({item} {{{}}}\r\n", msg.len()).as_bytes());
    c.say_bytes(&msg);
    c.say_bytes(b")\r\n");
    c.say(&format!("{tag} OK FETCH completed."));
}

// ---------------------------------------------------------------------------
// POP3
// ---------------------------------------------------------------------------

/// A canned message padded to exactly `size` bytes.
fn sized_message(subject: &str, body: &str, size: usize) -> Vec<u8> {
    let mut m = canned_message(subject, body);
    assert!(m.len() + 3 <= size, "canned POP3 message too long");
    m.extend(std::iter::repeat_n(b'x', size - m.len() - 2));
    m.extend_from_slice(b"\r\n");
    m
}

/// The two messages a POP3 maildrop starts with: 160 bytes each, so `STAT`
/// answers `+OK 2 320`. Message 2 has a line starting with `.`.
pub fn default_pop3_messages() -> Vec<Vec<u8>> {
    vec![
        sized_message("POP one", "Hello from POP message one.\r\n", 160),
        sized_message("POP two", ".leading dot line\r\n", 160),
    ]
}

/// Start-up options for [`FakePop3::start`].
#[derive(Clone, Debug)]
pub struct Pop3Options {
    /// Default [`TlsMode::Implicit`] (like outlook.office365.com:995).
    pub tls: TlsMode,
    /// Fail the next n XOAUTH2 attempts even if valid.
    pub reject_auth_next: usize,
    /// On a bad token send `+ <GOOGLE_STYLE_CHALLENGE>`, wait for the
    /// client's line, then the `-ERR`.
    pub google_style_failure: bool,
    /// StartTls mode: advertise and accept STLS (default true).
    pub offer_starttls: bool,
    /// Maildrop contents (default [`default_pop3_messages`]).
    pub mailbox: Vec<Vec<u8>>,
}

impl Default for Pop3Options {
    fn default() -> Self {
        Pop3Options {
            tls: TlsMode::Implicit,
            reject_auth_next: 0,
            google_style_failure: false,
            offer_starttls: true,
            mailbox: default_pop3_messages(),
        }
    }
}

struct Pop3Inner {
    mailbox: Vec<Vec<u8>>,
    retrieved: Vec<usize>,
}

/// The running fake POP3 server. Shuts down when dropped.
pub struct FakePop3 {
    task: ServerTask,
    core: Arc<Core>,
    inner: Arc<Mutex<Pop3Inner>>,
}

impl std::fmt::Debug for FakePop3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakePop3")
            .field("addr", &self.addr())
            .finish()
    }
}

impl FakePop3 {
    /// Starts; the listener is bound on return.
    pub async fn start(validator: TokenValidator, opts: Pop3Options) -> FakePop3 {
        let core = Core::new(
            validator,
            opts.tls,
            opts.reject_auth_next,
            opts.google_style_failure,
            opts.offer_starttls,
        );
        let inner = Arc::new(Mutex::new(Pop3Inner {
            mailbox: opts.mailbox,
            retrieved: Vec::new(),
        }));
        let i = inner.clone();
        let task = spawn_mail_server(core.clone(), move |conn| pop3_session(conn, i.clone())).await;
        FakePop3 { task, core, inner }
    }

    common_api!("FakePop3");

    /// The maildrop (message n is index n-1).
    pub fn mailbox(&self) -> Vec<Vec<u8>> {
        lock(&self.inner).mailbox.clone()
    }

    /// Replaces the maildrop.
    pub fn set_mailbox(&self, messages: Vec<Vec<u8>>) {
        lock(&self.inner).mailbox = messages;
    }

    /// Message numbers sent by RETR, in order.
    pub fn retrieved(&self) -> Vec<usize> {
        lock(&self.inner).retrieved.clone()
    }
}

/// POP3/NNTP dot-stuffing plus the terminating `.` line.
pub fn dot_stuff(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + msg.len() / 64 + 8);
    let mut at_start = true;
    for &b in msg {
        if at_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_start = b == b'\n';
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

fn pop3_message(inner: &Mutex<Pop3Inner>, arg: &str) -> Option<(usize, Vec<u8>)> {
    let n = arg.trim().parse::<usize>().ok().filter(|n| *n >= 1)?;
    lock(inner).mailbox.get(n - 1).cloned().map(|m| (n, m))
}

async fn pop3_session(mut c: Conn, inner: Arc<Mutex<Pop3Inner>>) -> io::Result<()> {
    const INVALID_STATE: &str = "-ERR Command is not valid in this state.";
    const NO_SUCH: &str = "-ERR The specified message is out of range.";
    c.say("+OK The Microsoft Exchange POP3 service is ready.");
    let mut authed: Option<String> = None;
    loop {
        let Some(raw) = c.read_line().await? else {
            return Ok(());
        };
        let line = line_str(&raw);
        let (verb, rest) = split_verb(&line);
        let transaction = matches!(
            verb.as_str(),
            "STAT" | "LIST" | "UIDL" | "RETR" | "TOP" | "DELE" | "RSET"
        );
        if transaction && authed.is_none() {
            c.say(INVALID_STATE);
            continue;
        }
        match verb.as_str() {
            "CAPA" => {
                c.say("+OK");
                c.say("TOP");
                c.say("UIDL");
                if c.is_tls() {
                    c.say("SASL XOAUTH2");
                }
                c.say("USER");
                if !c.is_tls() && c.core.offer_starttls() {
                    c.say("STLS");
                }
                c.say("PIPELINING");
                c.say("RESP-CODES");
                c.say(".");
            }
            "STLS" => {
                if c.is_tls() || !c.core.offer_starttls() || authed.is_some() {
                    c.say(INVALID_STATE);
                } else {
                    c.say("+OK Begin TLS negotiation.");
                    c.starttls().await?;
                }
            }
            "AUTH" => {
                if authed.is_some() {
                    c.say(INVALID_STATE);
                    continue;
                }
                authed = pop3_auth(&mut c, rest).await?;
            }
            "USER" | "PASS" | "APOP" => {
                c.core.note_non_xoauth2();
                if !c.is_tls() {
                    c.core.note_auth_without_tls();
                }
                c.say("-ERR Logon failure: unknown user name or bad password.");
            }
            "STAT" => {
                let g = lock(&inner);
                let total: usize = g.mailbox.iter().map(Vec::len).sum();
                let line = format!("+OK {} {total}", g.mailbox.len());
                drop(g);
                c.say(&line);
            }
            "LIST" | "UIDL" => {
                let uidl = verb == "UIDL";
                let value = |n: usize, m: &Vec<u8>| {
                    if uidl {
                        format!("{n} AAMkFakeUid{n:04}")
                    } else {
                        format!("{n} {}", m.len())
                    }
                };
                if rest.trim().is_empty() {
                    let g = lock(&inner);
                    let total: usize = g.mailbox.iter().map(Vec::len).sum();
                    let mut lines = vec![format!("+OK {} {total}", g.mailbox.len())];
                    lines.extend(g.mailbox.iter().enumerate().map(|(i, m)| value(i + 1, m)));
                    drop(g);
                    for l in &lines {
                        c.say(l);
                    }
                    c.say(".");
                } else {
                    match pop3_message(&inner, rest) {
                        Some((n, m)) => c.say(&format!("+OK {}", value(n, &m))),
                        None => c.say(NO_SUCH),
                    }
                }
            }
            "RETR" => match pop3_message(&inner, rest) {
                Some((n, m)) => {
                    lock(&inner).retrieved.push(n);
                    c.say(&format!("+OK {} octets", m.len()));
                    c.say_bytes(&dot_stuff(&m));
                }
                None => c.say(NO_SUCH),
            },
            "TOP" => {
                let (n, k) = rest.trim().split_once(' ').unwrap_or((rest, ""));
                let Some(k) = k.trim().parse::<usize>().ok() else {
                    c.say("-ERR Protocol error. 14");
                    continue;
                };
                match pop3_message(&inner, n) {
                    Some((_, m)) => {
                        let split = m
                            .windows(4)
                            .position(|w| w == b"\r\n\r\n")
                            .map_or(m.len(), |p| p + 4);
                        let mut out = m[..split].to_vec();
                        for l in m[split..].split_inclusive(|b| *b == b'\n').take(k) {
                            out.extend_from_slice(l);
                        }
                        c.say("+OK");
                        c.say_bytes(&dot_stuff(&out));
                    }
                    None => c.say(NO_SUCH),
                }
            }
            "DELE" => match pop3_message(&inner, rest) {
                Some(_) => c.say("+OK"),
                None => c.say(NO_SUCH),
            },
            "RSET" | "NOOP" => c.say("+OK"),
            "QUIT" => {
                c.say("+OK Microsoft Exchange Server POP3 server signing off.");
                c.flush().await?;
                let _ = c.rd.get_mut().shutdown().await;
                return Ok(());
            }
            _ => c.say("-ERR Protocol error. 14"),
        }
    }
}

async fn pop3_auth(c: &mut Conn, rest: &str) -> io::Result<Option<String>> {
    let mut args = rest.split_whitespace();
    let Some(mech) = args.next().map(str::to_ascii_uppercase) else {
        // RFC 1734-style mechanism listing.
        c.say("+OK");
        if c.is_tls() {
            c.say("XOAUTH2");
        }
        c.say(".");
        return Ok(None);
    };
    let ir = args.next().map(str::to_string);
    if mech != "XOAUTH2" {
        c.core.note_non_xoauth2();
    }
    if !c.is_tls() {
        c.core.note_auth_without_tls();
        c.say("-ERR Command is not valid in this state.");
        return Ok(None);
    }
    if mech != "XOAUTH2" {
        c.say("-ERR Unrecognized authentication type.");
        return Ok(None);
    }
    let blob = match ir {
        Some(b) if b == "=" => String::new(),
        Some(b) => b,
        None => {
            c.say("+ ");
            c.read_line_required().await?
        }
    };
    if blob == "*" {
        c.say("-ERR Authentication canceled.");
        return Ok(None);
    }
    match c.core.judge(&blob) {
        Some(user) => {
            c.say("+OK User successfully authenticated.");
            Ok(Some(user))
        }
        None => {
            if let Some(answer) = c.core.refusal() {
                c.say(&answer);
                return Ok(None);
            }
            if c.core.google_style() {
                c.say(&format!("+ {GOOGLE_STYLE_CHALLENGE}"));
                c.read_line_required().await?;
            }
            c.say(POP3_AUTH_FAILED);
            Ok(None)
        }
    }
}
