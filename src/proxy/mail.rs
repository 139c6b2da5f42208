//! What the SMTP, IMAP and POP3 front ends share: the listener (connection
//! limit, optional implicit TLS), upstream connections (implicit TLS or a
//! STARTTLS upgrade, certificates verified), the login path (local password →
//! access token → upstream XOAUTH2, one refresh and retry when the upstream
//! refuses the token) and the final splice of the two streams.

use super::line::{BoxIo, LineIo};
use super::sasl::Credentials;
use crate::app::App;
use crate::config::{MailConfig, UpstreamTls};
use crate::identity::{AuthError, Identity};
use crate::metrics::{FailureReason, Outcome, Protocol};
use crate::token::{AccessToken, Refusal, ScopeSet, TokenError, Verdict};
use rustls::pki_types::ServerName;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Largest upstream reply line accepted.
pub const UPSTREAM_MAX_LINE: usize = 64 * 1024;

/// Settings and clients of one mail front end.
pub struct MailFrontEnd {
    /// Application core.
    pub app: Arc<App>,
    /// Section of the configuration.
    pub cfg: MailConfig,
    /// Which protocol (metrics, logs).
    pub protocol: Protocol,
    /// Token scopes.
    pub scopes: ScopeSet,
    /// Local TLS (STARTTLS or implicit) when a certificate is configured.
    pub acceptor: Option<tokio_rustls::TlsAcceptor>,
    /// Per-identity session and message limits.
    pub shaper: super::shaping::Shaper,
    connector: tokio_rustls::TlsConnector,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
}

/// Why a mail front end cannot start.
#[derive(Debug, thiserror::Error)]
pub enum MailSetupError {
    /// Bad upstream.
    #[error("{key}: `{value}` is not a usable host:port")]
    Upstream {
        /// Config key.
        key: &'static str,
        /// Value.
        value: String,
    },
    /// Certificates.
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// Why a login upstream did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamLogin {
    /// The upstream refused the access token (its answer classified by
    /// [`crate::token::refusal`]).
    #[error("the upstream refused the access token: {}", .0.text())]
    Rejected(Refusal),
    /// A temporary refusal (SMTP 4xx, IMAP `NO [UNAVAILABLE]`, POP3
    /// `[SYS/TEMP]`), with the upstream's words.
    #[error("the upstream refused the login for now: {0}")]
    Temporary(String),
    /// No connection.
    #[error("connecting to {upstream}")]
    Connect {
        /// `host:port`.
        upstream: String,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// A step had no answer within `upstream_timeout`.
    #[error("{step}: no answer from the upstream in time")]
    Timeout {
        /// Which step.
        step: &'static str,
    },
    /// The TLS handshake failed (certificate, protocol).
    #[error("TLS handshake with {upstream}")]
    Tls {
        /// `host:port`.
        upstream: String,
        /// What rustls said.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing failed.
    #[error("talking to the upstream")]
    Io(#[from] std::io::Error),
    /// The upstream closed the connection.
    #[error("the upstream closed the connection")]
    Closed,
    /// The upstream offers no TLS upgrade: no token is sent in the clear.
    #[error("the upstream does not offer {0}; refusing to send a token in the clear")]
    NoTls(&'static str),
    /// An answer that does not fit the protocol.
    #[error("unexpected answer from the upstream to {step}: {said}")]
    Unexpected {
        /// Which step.
        step: &'static str,
        /// What it said (bounded, lossy).
        said: String,
    },
}

impl UpstreamLogin {
    /// An unexpected answer, quoted (bounded).
    pub fn unexpected(step: &'static str, said: &[u8]) -> UpstreamLogin {
        let said = String::from_utf8_lossy(&said[..said.len().min(200)]).into_owned();
        UpstreamLogin::Unexpected { step, said }
    }
}

impl crate::error::Failure for UpstreamLogin {
    fn origin(&self) -> crate::error::Origin {
        crate::error::Origin::Upstream
    }

    fn retryable(&self) -> bool {
        match self {
            UpstreamLogin::Rejected(Refusal::Permanent { .. })
            | UpstreamLogin::NoTls(_)
            | UpstreamLogin::Tls { .. } => false,
            UpstreamLogin::Rejected(Refusal::Token { .. })
            | UpstreamLogin::Temporary(_)
            | UpstreamLogin::Connect { .. }
            | UpstreamLogin::Timeout { .. }
            | UpstreamLogin::Io(_)
            | UpstreamLogin::Closed
            | UpstreamLogin::Unexpected { .. } => true,
        }
    }
}

/// Reads one upstream line (`step` names it in errors) within `limit`.
pub async fn upstream_line(
    io: &mut LineIo<BoxIo>,
    limit: Duration,
    step: &'static str,
) -> Result<bytes::Bytes, UpstreamLogin> {
    match tokio::time::timeout(limit, io.read_line()).await {
        Err(_) => Err(UpstreamLogin::Timeout { step }),
        Ok(Ok(Some(line))) => Ok(line),
        Ok(Ok(None)) => Err(UpstreamLogin::Closed),
        Ok(Err(super::line::LineError::Io(e))) => Err(UpstreamLogin::Io(e)),
        Ok(Err(super::line::LineError::TooLong)) => Err(UpstreamLogin::Unexpected {
            step,
            said: "a line over 64 KiB".into(),
        }),
    }
}

/// Writes to the upstream.
pub async fn upstream_send(io: &mut LineIo<BoxIo>, data: &[u8]) -> Result<(), UpstreamLogin> {
    Ok(io.send(data).await?)
}

/// Why a client login failed (the protocol chooses the words).
#[derive(Debug)]
pub enum LoginFailure {
    /// Unknown name or wrong password.
    BadCredentials,
    /// Too many failures.
    Locked,
    /// The identity needs a person to sign in again.
    Reauth {
        /// Identity name.
        identity: String,
    },
    /// No token could be had; try later.
    Unavailable,
    /// The upstream refuses freshly issued tokens: a temporary answer that
    /// says so.
    RefusedFresh,
    /// The upstream refused for a reason an administrator must fix: its
    /// words (one line, bounded), to pass through.
    UpstreamRefused {
        /// What the upstream said.
        text: String,
    },
    /// The upstream answered with a temporary failure.
    UpstreamTemporary,
    /// The upstream is unreachable or misbehaved.
    UpstreamFailed,
    /// The identity has `max_sessions_per_identity` sessions open and none
    /// ended within `session_wait`: try again later.
    Busy,
}

impl LoginFailure {
    /// The access log's word for it (as `authswap_requests_total`'s
    /// outcomes; `busy` for a login refused by `max_sessions_per_identity`).
    pub fn outcome(&self) -> &'static str {
        match self {
            LoginFailure::BadCredentials | LoginFailure::Locked => "unauthorized",
            LoginFailure::Reauth { .. } => "reauth_required",
            LoginFailure::Unavailable => "unavailable",
            LoginFailure::RefusedFresh | LoginFailure::UpstreamRefused { .. } => "upstream_refused",
            LoginFailure::UpstreamTemporary | LoginFailure::UpstreamFailed => "upstream_error",
            LoginFailure::Busy => "busy",
        }
    }

    /// The identity named in it, if any.
    pub fn identity(&self) -> Option<&str> {
        match self {
            LoginFailure::Reauth { identity } => Some(identity),
            _ => None,
        }
    }
}

impl MailFrontEnd {
    /// Builds the front end for `cfg`.
    pub fn new(
        app: Arc<App>,
        cfg: MailConfig,
        protocol: Protocol,
        section: &'static str,
    ) -> Result<MailFrontEnd, MailSetupError> {
        let bad = || MailSetupError::Upstream {
            key: section,
            value: cfg.upstream.clone(),
        };
        let (host, port) = cfg.upstream_host_port().ok_or_else(bad)?;
        let server_name = ServerName::try_from(host.clone()).map_err(|_| bad())?;
        let client_config = crate::tls::client_config(&app.config.tls)?;
        let acceptor = match (&cfg.tls_cert_file, &cfg.tls_key_file) {
            (Some(cert), Some(key)) => Some(tokio_rustls::TlsAcceptor::from(
                crate::tls::server_config(cert, key, &[])?,
            )),
            _ => None,
        };
        let scopes = ScopeSet::new(&cfg.scopes, &cfg.app_scopes);
        app.metrics.front_end(protocol, &scopes.keys());
        Ok(MailFrontEnd {
            shaper: super::shaping::Shaper::new(protocol, &cfg),
            scopes,
            connector: tokio_rustls::TlsConnector::from(Arc::new(client_config)),
            app,
            cfg,
            protocol,
            acceptor,
            host,
            port,
            server_name,
        })
    }

    /// Connects to the upstream; with implicit TLS the handshake is done.
    /// Returns the stream and whether it is already TLS.
    pub async fn connect_upstream(&self) -> Result<(LineIo<BoxIo>, bool), UpstreamLogin> {
        let timeout = self.cfg.upstream_timeout;
        let tcp =
            tokio::time::timeout(timeout, TcpStream::connect((self.host.as_str(), self.port)))
                .await
                .map_err(|_| UpstreamLogin::Timeout { step: "connect" })?
                .map_err(|source| UpstreamLogin::Connect {
                    upstream: self.cfg.upstream.clone(),
                    source,
                })?;
        let _ = tcp.set_nodelay(true);
        match self.cfg.upstream_tls {
            UpstreamTls::Implicit => {
                let tls = self.tls_connect(tcp).await?;
                Ok((LineIo::new(tls, UPSTREAM_MAX_LINE), true))
            }
            UpstreamTls::Starttls => Ok((LineIo::new(Box::new(tcp), UPSTREAM_MAX_LINE), false)),
        }
    }

    async fn tls_connect<S: super::line::Io + 'static>(
        &self,
        io: S,
    ) -> Result<BoxIo, UpstreamLogin> {
        let tls = tokio::time::timeout(
            self.cfg.upstream_timeout,
            self.connector.connect(self.server_name.clone(), io),
        )
        .await
        .map_err(|_| UpstreamLogin::Timeout {
            step: "TLS handshake",
        })?
        .map_err(|source| UpstreamLogin::Tls {
            upstream: self.cfg.upstream.clone(),
            source,
        })?;
        Ok(Box::new(tls))
    }

    /// Upgrades an upstream connection after its STARTTLS/STLS was accepted.
    pub async fn upgrade_upstream(
        &self,
        io: LineIo<BoxIo>,
    ) -> Result<LineIo<BoxIo>, UpstreamLogin> {
        let (io, buffered) = io.into_parts();
        if !buffered.is_empty() {
            return Err(UpstreamLogin::unexpected(
                "STARTTLS",
                b"data after agreeing to start TLS",
            ));
        }
        let tls = self.tls_connect(io).await?;
        Ok(LineIo::new(tls, UPSTREAM_MAX_LINE))
    }

    /// Upgrades a client connection after we agreed to STARTTLS/STLS. Bytes
    /// the client sent ahead of the handshake are discarded (command
    /// injection defence).
    pub async fn upgrade_client(&self, io: LineIo<BoxIo>) -> Option<LineIo<BoxIo>> {
        let acceptor = self.acceptor.clone()?;
        let (io, _) = io.into_parts();
        let tls = tokio::time::timeout(self.cfg.idle_timeout, acceptor.accept(io))
            .await
            .ok()?
            .ok()?;
        Some(LineIo::new(Box::new(tls), self.cfg.max_line.as_usize()))
    }

    /// Counts an authentication response that could not be decoded.
    pub fn undecodable(&self) {
        self.app
            .metrics
            .request(self.protocol, Outcome::bad_request);
        self.app
            .metrics
            .auth_failure(None, self.protocol, FailureReason::bad_request);
    }

    /// Runs the shared login path: local password, access token, then
    /// `attempt` (a fresh upstream login with that token); on `Rejected` the
    /// token is refused, refreshed once and `attempt` runs once more. Before
    /// going upstream the login takes one of the identity's session permits
    /// (waiting up to `session_wait`, or until `shutdown`); the session
    /// holds it while it lasts.
    pub async fn login<U, F, Fut>(
        &self,
        creds: &Credentials,
        peer: SocketAddr,
        mut shutdown: watch::Receiver<bool>,
        attempt: F,
    ) -> Result<(Arc<Identity>, U, super::shaping::SessionPermit), LoginFailure>
    where
        F: Fn(Arc<Identity>, AccessToken) -> Fut,
        Fut: Future<Output = Result<U, UpstreamLogin>>,
    {
        let app = &self.app;
        let m = &app.metrics;
        let p = self.protocol;
        let identity = match app
            .auth
            .authenticate(
                &creds.name,
                creds.password.expose().as_bytes(),
                peer.ip(),
                p,
            )
            .await
        {
            Ok(i) => i,
            Err(AuthError::Locked(_)) => {
                m.request(p, Outcome::unauthorized);
                return Err(LoginFailure::Locked);
            }
            Err(_) => {
                m.request(p, Outcome::unauthorized);
                return Err(LoginFailure::BadCredentials);
            }
        };
        let permit = tokio::select! {
            permit = self.shaper.session(&identity.name, &app.metrics) => permit,
            _ = shutdown.wait_for(|stop| *stop) => Err(super::shaping::Busy),
        };
        let Ok(permit) = permit else {
            m.request(p, Outcome::unavailable);
            return Err(LoginFailure::Busy);
        };
        let mut retried = false;
        loop {
            let token = match app
                .tokens
                .access_token(&identity, self.scopes.of(&identity))
                .await
            {
                Ok(t) => t,
                Err(e) => return Err(self.no_token(e)),
            };
            let started = Instant::now();
            let result = attempt(identity.clone(), token.clone()).await;
            m.upstream_duration(p, started.elapsed().as_secs_f64());
            match result {
                Ok(u) => {
                    app.tokens
                        .accepted(&identity, self.scopes.of(&identity), &token);
                    m.request(p, Outcome::forwarded);
                    tracing::info!(identity = %identity.name, protocol = ?p, "logged in upstream");
                    return Ok((identity, u, permit));
                }
                Err(UpstreamLogin::Rejected(refusal)) => {
                    match app.tokens.refused(
                        &identity,
                        self.scopes.of(&identity),
                        &token,
                        p,
                        &refusal,
                    ) {
                        Verdict::Retry if !retried => retried = true,
                        // Refused again after this login's one refresh.
                        Verdict::Retry | Verdict::Backoff { .. } => {
                            m.request(p, Outcome::upstream_refused);
                            m.auth_failure(
                                Some(&identity.name),
                                p,
                                FailureReason::fresh_token_refused,
                            );
                            return Err(LoginFailure::RefusedFresh);
                        }
                        Verdict::PassThrough => {
                            m.request(p, Outcome::upstream_refused);
                            return Err(LoginFailure::UpstreamRefused {
                                text: refusal.text().to_owned(),
                            });
                        }
                    }
                }
                Err(e) => {
                    use crate::error::Failure as _;
                    tracing::warn!(identity = %identity.name, protocol = ?p, error = %crate::token::idp::error_chain(&e), origin = ?e.origin(), retryable = e.retryable(), "upstream login failed");
                    m.request(p, Outcome::upstream_error);
                    // A temporary refusal is answered as temporary and the
                    // session goes on; anything else ends it.
                    return Err(match e {
                        UpstreamLogin::Temporary(_) => LoginFailure::UpstreamTemporary,
                        _ => LoginFailure::UpstreamFailed,
                    });
                }
            }
        }
    }

    /// The failure (and its metrics) when no access token can be had.
    fn no_token(&self, e: TokenError) -> LoginFailure {
        let (m, p) = (&self.app.metrics, self.protocol);
        match e {
            TokenError::ReauthRequired { identity, .. } => {
                m.request(p, Outcome::reauth_required);
                m.auth_failure(Some(&identity), p, FailureReason::reauth_required);
                LoginFailure::Reauth { identity }
            }
            TokenError::Unavailable { identity, .. } => {
                m.request(p, Outcome::unavailable);
                m.auth_failure(Some(&identity), p, FailureReason::refresh_failed);
                LoginFailure::Unavailable
            }
            TokenError::AppCredential { identity, .. } => {
                m.request(p, Outcome::unavailable);
                m.auth_failure(Some(&identity), p, FailureReason::app_credential);
                LoginFailure::Unavailable
            }
            TokenError::Refused { identity, .. } => {
                m.request(p, Outcome::upstream_refused);
                m.auth_failure(Some(&identity), p, FailureReason::fresh_token_refused);
                LoginFailure::RefusedFresh
            }
        }
    }
}

/// Hands the session over: what each side sent ahead goes across first,
/// then bytes flow both ways unchanged until either side closes. With a
/// `pacer` (SMTP with `messages_per_minute`), a `MAIL` command from the
/// client is held until the identity's window has room. When the server
/// shuts down, the session may go on for [`SPLICE_GRACE`]; then the client
/// is sent `closing` (the protocol's way of saying the server is going
/// away) and the connection is closed.
///
/// [`SPLICE_GRACE`]: super::session::SPLICE_GRACE
pub async fn splice(
    client: LineIo<BoxIo>,
    upstream: LineIo<BoxIo>,
    mut shutdown: watch::Receiver<bool>,
    closing: String,
    pacer: Option<super::shaping::Pacer>,
) {
    let (mut c, c_buf) = client.into_parts();
    let (mut u, u_buf) = upstream.into_parts();
    let mut scanner = super::shaping::MailScanner::default();
    if !c_buf.is_empty() {
        let sent = match &pacer {
            Some(p) => {
                paced_write(
                    &mut u,
                    &c_buf,
                    &mut scanner,
                    p,
                    None::<&mut BoxIo>,
                    &mut Vec::new(),
                )
                .await
            }
            None => u.write_all(&c_buf).await,
        };
        if sent.is_err() {
            return;
        }
    }
    if !u_buf.is_empty() && c.write_all(&u_buf).await.is_err() {
        return;
    }
    {
        // 16 KiB per direction: a full TLS record, little memory per idle
        // session.
        let copy = async {
            match &pacer {
                None => {
                    let _ = tokio::io::copy_bidirectional_with_sizes(
                        &mut c,
                        &mut u,
                        16 * 1024,
                        16 * 1024,
                    )
                    .await;
                }
                Some(pacer) => {
                    let (mut cr, mut cw) = tokio::io::split(&mut c);
                    let (mut ur, mut uw) = tokio::io::split(&mut u);
                    let down = async {
                        let mut buf = vec![0u8; 16 * 1024];
                        let mut carry = Vec::new();
                        loop {
                            let n = tokio::io::AsyncReadExt::read(&mut cr, &mut buf).await?;
                            if n == 0 {
                                return uw.shutdown().await;
                            }
                            let mut chunk = buf[..n].to_vec();
                            // What arrived while a command was held goes
                            // next, in order.
                            loop {
                                paced_write(
                                    &mut uw,
                                    &chunk,
                                    &mut scanner,
                                    pacer,
                                    Some(&mut cr),
                                    &mut carry,
                                )
                                .await?;
                                if carry.is_empty() {
                                    break;
                                }
                                chunk = std::mem::take(&mut carry);
                            }
                        }
                    };
                    let up = async {
                        let mut r = tokio::io::BufReader::with_capacity(16 * 1024, &mut ur);
                        tokio::io::copy_buf(&mut r, &mut cw).await?;
                        cw.shutdown().await
                    };
                    let _ = tokio::try_join!(down, up);
                }
            }
        };
        tokio::pin!(copy);
        tokio::select! {
            _ = &mut copy => return,
            _ = shutdown.wait_for(|stop| *stop) => {}
        }
        if tokio::time::timeout(super::session::SPLICE_GRACE, &mut copy)
            .await
            .is_ok()
        {
            return;
        }
    }
    drop(u);
    let _ = c.write_all(closing.as_bytes()).await;
    let _ = c.shutdown().await;
}

/// Writes `data` from the client upstream, holding each `MAIL` command
/// until `pacer` lets one more message through. While a command is held,
/// `client` is still read (into `carry`, at most 16 KiB, sent next by the
/// caller) so that a client that leaves ends the session at once.
async fn paced_write<W, R>(
    w: &mut W,
    data: &[u8],
    scanner: &mut super::shaping::MailScanner,
    pacer: &super::shaping::Pacer,
    mut client: Option<&mut R>,
    carry: &mut Vec<u8>,
) -> std::io::Result<()>
where
    W: tokio::io::AsyncWrite + Unpin,
    R: tokio::io::AsyncRead + Unpin,
{
    let mut cuts: [usize; 8] = [0; 8];
    let mut n = 0;
    let mut from = 0;
    let mut overflow = Vec::new();
    scanner.scan(data, |at| {
        if n < cuts.len() {
            cuts[n] = at;
            n += 1;
        } else {
            overflow.push(at);
        }
    });
    for at in cuts[..n].iter().chain(overflow.iter()) {
        w.write_all(&data[from..*at]).await?;
        w.flush().await?;
        let held = pacer.message();
        tokio::pin!(held);
        loop {
            let room = (16 * 1024usize).saturating_sub(carry.len());
            match client.as_deref_mut() {
                Some(c) if room > 0 => {
                    let mut spare = [0u8; 4096];
                    let max = room.min(spare.len());
                    tokio::select! {
                        () = &mut held => break,
                        read = tokio::io::AsyncReadExt::read(c, &mut spare[..max]) => match read? {
                            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                            got => carry.extend_from_slice(&spare[..got]),
                        },
                    }
                }
                _ => {
                    (&mut held).await;
                    break;
                }
            }
        }
        from = *at;
    }
    w.write_all(&data[from..]).await?;
    w.flush().await
}

/// Accepts connections for a mail front end until `shutdown`, running a
/// session ([`super::session::run`]) with a new dialect from `dialect` for
/// each (after the implicit-TLS handshake when configured).
pub(crate) async fn accept_loop<F, D>(
    listener: Arc<TcpListener>,
    front: Arc<MailFrontEnd>,
    dialect: F,
    mut retire: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
) where
    F: Fn() -> D + Send + Sync + 'static,
    D: super::session::Dialect + 'static,
{
    let slots = super::slots::Slots::new(
        front.cfg.max_connections,
        front.cfg.max_connections_per_source,
    );
    let dialect = Arc::new(dialect);
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        // Every slot held by a logged-in session: wait for one to end.
        tokio::select! {
            _ = slots.room() => {}
            () = crate::server::stopped(&mut retire, &mut shutdown) => break,
        }
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = crate::server::stopped(&mut retire, &mut shutdown) => break,
        };
        let Some(slot) = slots.admit(peer.ip()) else {
            continue;
        };
        while tasks.try_join_next().is_some() {}
        let _ = stream.set_nodelay(true);
        let front = front.clone();
        let dialect = dialect.clone();
        let stop = shutdown.clone();
        tasks.spawn(async move {
            let _guard = front.app.metrics.connection(front.protocol);
            let session = async {
                let max = front.cfg.max_line.as_usize();
                let (io, tls): (BoxIo, bool) = match (&front.acceptor, front.cfg.implicit_tls) {
                    (Some(acceptor), true) => {
                        let limit = front.cfg.idle_timeout.min(front.cfg.login_timeout);
                        match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => (Box::new(s), true),
                            _ => return,
                        }
                    }
                    _ => (Box::new(stream), false),
                };
                let io = LineIo::new(io, max);
                let proved = slot.proved_flag();
                super::session::run(&front, dialect(), io, peer, tls, stop, &proved).await;
            };
            // Closed early to make room for another connection (only
            // before login: a logged-in session is never displaced).
            tokio::select! {
                biased;
                () = session => {}
                () = slot.evicted() => {}
            }
        });
    }
    drop(listener);
    // Retired by a reload: the sessions go on until they end or the
    // server stops.
    let ended = tokio::select! {
        _ = async { while tasks.join_next().await.is_some() {} } => true,
        _ = shutdown.wait_for(|stop| *stop) => false,
    };
    if ended {
        return;
    }
    // Give sessions (logins in progress and spliced sessions) a moment to
    // finish, then close them.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
}
