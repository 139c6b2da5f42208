//! `serve`: binds the listeners, runs the accept loops with connection
//! limits and timeouts, and shuts down gracefully (stop accepting, let
//! in-flight requests finish within a bound).

use crate::admin;
use crate::app::{App, AppError};
use crate::config::{parse_listen, Config, ConfigError};
use crate::identity::ConnectionMemo;
use crate::metrics::Protocol;
use crate::proxy::http::{HttpProxy, Served, UpstreamUrlError};
use crate::proxy::imap::Imap;
use crate::proxy::line::BoxIo;
use crate::proxy::mail::{MailFrontEnd, MailSetupError};
use crate::proxy::pop3::Pop3;
use crate::proxy::slots::{Slot, Slots};
use crate::proxy::smtp::Smtp;
use crate::reload::{ReloadError, ReloadReport};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Why `serve` could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Bad configuration.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// Store, key or TLS problem.
    #[error("{0}")]
    App(#[from] AppError),
    /// The upstream URL.
    #[error("{0}")]
    Upstream(#[from] UpstreamUrlError),
    /// A listener could not be bound.
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind {
        /// Config key.
        key: &'static str,
        /// Address.
        addr: SocketAddr,
        /// Underlying error.
        source: std::io::Error,
    },
    /// Local TLS certificate or key.
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    /// A mail front end.
    #[error("{0}")]
    Mail(#[from] MailSetupError),
    /// The admin credential.
    #[error("{0}")]
    Admin(#[from] admin::credential::CredentialError),
    /// The onboarding pages.
    #[error("{0}")]
    Onboarding(#[from] crate::onboarding::OnboardingError),
}

/// The listeners a server can run, in start order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Admin,
    Onboarding,
    Http,
    Smtp,
    Imap,
    Pop3,
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::Admin,
        Kind::Onboarding,
        Kind::Http,
        Kind::Smtp,
        Kind::Imap,
        Kind::Pop3,
    ];

    /// Its configuration section.
    fn section(self) -> &'static str {
        match self {
            Kind::Admin => "admin",
            Kind::Onboarding => "onboarding",
            Kind::Http => "http",
            Kind::Smtp => "smtp",
            Kind::Imap => "imap",
            Kind::Pop3 => "pop3",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Kind::Admin => "admin.listen",
            Kind::Onboarding => "onboarding.listen",
            Kind::Http => "http.listen",
            Kind::Smtp => "smtp.listen",
            Kind::Imap => "imap.listen",
            Kind::Pop3 => "pop3.listen",
        }
    }

    /// The configured address, `None` when disabled.
    fn listen(self, c: &Config) -> Option<&str> {
        let (enabled, listen) = match self {
            Kind::Admin => (true, &c.admin.listen),
            Kind::Onboarding => (c.onboarding.enabled, &c.onboarding.listen),
            Kind::Http => (c.http.enabled, &c.http.listen),
            Kind::Smtp => (c.smtp.enabled, &c.smtp.listen),
            Kind::Imap => (c.imap.enabled, &c.imap.listen),
            Kind::Pop3 => (c.pop3.enabled, &c.pop3.listen),
        };
        enabled.then_some(listen.as_str())
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One listener's accept loop: its socket (shared with the loop that
/// replaces it when a reload keeps the address) and the sender whose drop
/// (or `true`) makes the loop stop accepting.
struct Running {
    listen: String,
    addr: SocketAddr,
    listener: Arc<TcpListener>,
    retire: watch::Sender<bool>,
}

/// An accept loop to start on a listener: `(listener, retire, shutdown)`.
type Launch = Box<
    dyn FnOnce(
            Arc<TcpListener>,
            watch::Receiver<bool>,
            watch::Receiver<bool>,
        ) -> futures_util::future::BoxFuture<'static, ()>
        + Send,
>;

/// What a reload does with one listener.
enum Step {
    Nothing,
    Stop,
    Keep,
    Start {
        listen: String,
        addr: SocketAddr,
        listener: Arc<TcpListener>,
    },
}

/// What may change while serving.
struct State {
    app: Arc<App>,
    /// The configuration as loaded (before `onboarding.public_url` is
    /// derived from the bound address), to compare a reload against.
    loaded: Config,
    running: [Option<Running>; 6],
    /// The admin console's sessions, kept across reloads.
    sessions: Option<Arc<admin::credential::Sessions>>,
    /// Stops the identity reload and notification tasks of `app`.
    background: watch::Sender<bool>,
    tasks: JoinSet<()>,
    /// The configuration file reloads read.
    source: Option<std::path::PathBuf>,
}

struct Shared {
    state: tokio::sync::Mutex<State>,
    /// The current application and listener addresses, for the getters.
    current: std::sync::Mutex<(Arc<App>, [Option<SocketAddr>; 6])>,
    shutdown: watch::Sender<bool>,
}

/// A running server.
pub struct Server {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("http", &self.http_addr())
            .field("admin", &self.admin_addr())
            .finish_non_exhaustive()
    }
}

async fn bind(key: &'static str, value: &str) -> Result<(TcpListener, SocketAddr), ServeError> {
    let addr = parse_listen(key, value)?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { key, addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { key, addr, source })?;
    Ok((listener, bound))
}

/// Without `public_url`, invitation links and the redirect URI use the
/// address actually bound (port 0 in tests).
fn derive_public_url(config: &mut Config, addr: SocketAddr) {
    if config.onboarding.public_url.is_some() {
        return;
    }
    let scheme = if config.onboarding.tls_cert_file.is_some() {
        "https"
    } else {
        "http"
    };
    let shown = if addr.ip().is_unspecified() {
        tracing::warn!(
            listen = %addr,
            "onboarding.listen accepts every address but onboarding.public_url is not set: invitation links name 127.0.0.1; set public_url to the address users' browsers reach"
        );
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    };
    config.onboarding.public_url = Some(format!("{scheme}://{shown}"));
}

fn acceptor(
    cert: &Option<std::path::PathBuf>,
    key: &Option<std::path::PathBuf>,
    alpn: &[&[u8]],
) -> Result<Option<tokio_rustls::TlsAcceptor>, ServeError> {
    Ok(match (cert, key) {
        (Some(cert), Some(key)) => Some(tokio_rustls::TlsAcceptor::from(
            crate::tls::server_config(cert, key, alpn)?,
        )),
        _ => None,
    })
}

/// Builds `kind`'s services on `app` (everything that can fail), returning
/// the accept loop to start. The admin listener keeps the console sessions
/// in `sessions` (shared by every admin listener of the server).
fn prepare(
    kind: Kind,
    app: &Arc<App>,
    sessions: &mut Option<Arc<admin::credential::Sessions>>,
) -> Result<Launch, ServeError> {
    let cfg = app.config.clone();
    Ok(match kind {
        Kind::Admin => {
            let tls = acceptor(
                &cfg.admin.tls_cert_file,
                &cfg.admin.tls_key_file,
                &[b"http/1.1"],
            )?;
            let admin =
                admin::AdminListener::with_sessions(app.clone(), tls.is_some(), sessions.clone())?;
            *sessions = Some(admin.sessions());
            Box::new(move |listener, retire, shutdown| {
                Box::pin(async move {
                    let service = move |_peer: SocketAddr, _memo: ConnectionMemo| {
                        let admin = admin.clone();
                        let service = service_fn(move |req| admin.clone().handle(req));
                        (service, std::future::pending::<()>())
                    };
                    accept_loop(
                        listener,
                        tls,
                        service,
                        64,
                        Duration::from_secs(10),
                        retire,
                        shutdown,
                        None,
                    )
                    .await;
                })
            })
        }
        Kind::Onboarding => {
            let onboarding = crate::onboarding::Onboarding::new(app.clone())?;
            let tls = acceptor(
                &cfg.onboarding.tls_cert_file,
                &cfg.onboarding.tls_key_file,
                &[b"http/1.1"],
            )?;
            Box::new(move |listener, retire, shutdown| {
                Box::pin(async move {
                    let service = move |peer: SocketAddr, _memo: ConnectionMemo| {
                        let onboarding = onboarding.clone();
                        let service = service_fn(move |req| {
                            onboarding
                                .clone()
                                .handle(req, crate::onboarding::Peer(peer))
                        });
                        (service, std::future::pending::<()>())
                    };
                    accept_loop(
                        listener,
                        tls,
                        service,
                        256,
                        Duration::from_secs(10),
                        retire,
                        shutdown,
                        None,
                    )
                    .await;
                })
            })
        }
        Kind::Http => {
            let proxy = HttpProxy::new(app.clone())?;
            let tls = acceptor(
                &cfg.http.tls_cert_file,
                &cfg.http.tls_key_file,
                &[b"h2", b"http/1.1"],
            )?;
            let max_conn = cfg.http.max_connections;
            let header_timeout = cfg.http.header_read_timeout;
            let limits = Limits {
                max_header: cfg.http.max_header_bytes.as_usize(),
                metrics: app.metrics.clone(),
                proxy: proxy.clone(),
                per_source: cfg.http.max_connections_per_source,
                login_timeout: cfg.http.login_timeout,
            };
            Box::new(move |listener, retire, shutdown| {
                Box::pin(async move {
                    // Each client connection drives its own upstream lane.
                    let service = move |peer: SocketAddr, memo: ConnectionMemo| {
                        let proxy = proxy.clone();
                        let (conn, driver) = proxy.connection(memo);
                        let service = service_fn(move |req| {
                            let (proxy, conn) = (proxy.clone(), conn.clone());
                            async move { proxy.handle(req, peer, &conn).await }
                        });
                        (service, driver)
                    };
                    accept_loop(
                        listener,
                        tls,
                        service,
                        max_conn,
                        header_timeout,
                        retire,
                        shutdown,
                        Some(limits),
                    )
                    .await;
                })
            })
        }
        Kind::Smtp => {
            let front = Arc::new(MailFrontEnd::new(
                app.clone(),
                cfg.smtp.clone(),
                Protocol::smtp,
                "smtp.upstream",
            )?);
            let smtp = Smtp::new(front.clone());
            Box::new(move |listener, retire, shutdown| {
                Box::pin(crate::proxy::mail::accept_loop(
                    listener,
                    front,
                    move || smtp.dialect(),
                    retire,
                    shutdown,
                ))
            })
        }
        Kind::Imap => {
            let front = Arc::new(MailFrontEnd::new(
                app.clone(),
                cfg.imap.clone(),
                Protocol::imap,
                "imap.upstream",
            )?);
            let imap = Imap::new(front.clone());
            Box::new(move |listener, retire, shutdown| {
                Box::pin(crate::proxy::mail::accept_loop(
                    listener,
                    front,
                    move || imap.dialect(),
                    retire,
                    shutdown,
                ))
            })
        }
        Kind::Pop3 => {
            let front = Arc::new(MailFrontEnd::new(
                app.clone(),
                cfg.pop3.clone(),
                Protocol::pop3,
                "pop3.upstream",
            )?);
            let pop3 = Pop3::new(front.clone());
            Box::new(move |listener, retire, shutdown| {
                Box::pin(crate::proxy::mail::accept_loop(
                    listener,
                    front,
                    move || pop3.dialect(),
                    retire,
                    shutdown,
                ))
            })
        }
    })
}

/// Starts the identity reload and notification tasks of `app`; they stop
/// when the returned sender says so (or is dropped).
fn spawn_background(app: &Arc<App>, tasks: &mut JoinSet<()>) -> watch::Sender<bool> {
    let (tx, rx) = watch::channel(false);
    let handle = app.spawn_background(rx.clone());
    tasks.spawn(async move {
        let _ = handle.await;
    });
    let handle = crate::notify::spawn(app.clone(), rx);
    tasks.spawn(async move {
        let _ = handle.await;
    });
    tx
}

fn log_serving(app: &App, addrs: &[Option<SocketAddr>; 6], message: &'static str) {
    let shown = |k: Kind| addrs[k.index()].map_or_else(|| "disabled".to_owned(), |a| a.to_string());
    tracing::info!(
        admin = %shown(Kind::Admin),
        http = %shown(Kind::Http),
        smtp = %shown(Kind::Smtp),
        imap = %shown(Kind::Imap),
        pop3 = %shown(Kind::Pop3),
        onboarding = %shown(Kind::Onboarding),
        identities = app.directory.len(),
        "{message}"
    );
}

impl Server {
    /// Opens everything and starts serving. Listen ports may be 0.
    pub async fn start(config: Config) -> Result<Server, ServeError> {
        for missing in config.missing() {
            tracing::warn!("{missing}");
        }
        let loaded = config.clone();
        let mut config = config;
        let mut bound: [Option<(String, TcpListener, SocketAddr)>; 6] = Default::default();
        // Onboarding first: its address may make `public_url`.
        if let Some(listen) = Kind::Onboarding.listen(&config) {
            let listen = listen.to_owned();
            let (listener, addr) = bind(Kind::Onboarding.key(), &listen).await?;
            derive_public_url(&mut config, addr);
            bound[Kind::Onboarding.index()] = Some((listen, listener, addr));
        }
        let app = App::open(config).await?;
        let cfg = app.config.clone();
        let (shutdown, _) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut running: [Option<Running>; 6] = Default::default();
        let mut addrs = [None; 6];
        let mut sessions = None;
        for kind in Kind::ALL {
            let Some(listen) = kind.listen(&cfg) else {
                continue;
            };
            let (listen, listener, addr) = match bound[kind.index()].take() {
                Some(b) => b,
                None => {
                    let (l, a) = bind(kind.key(), listen).await?;
                    (listen.to_owned(), l, a)
                }
            };
            let launch = prepare(kind, &app, &mut sessions)?;
            let listener = Arc::new(listener);
            let (retire, retire_rx) = watch::channel(false);
            tasks.spawn(launch(listener.clone(), retire_rx, shutdown.subscribe()));
            addrs[kind.index()] = Some(addr);
            running[kind.index()] = Some(Running {
                listen,
                addr,
                listener,
                retire,
            });
        }
        let background = spawn_background(&app, &mut tasks);
        log_serving(&app, &addrs, "authswap is serving");
        Ok(Server {
            shared: Arc::new(Shared {
                current: std::sync::Mutex::new((app.clone(), addrs)),
                state: tokio::sync::Mutex::new(State {
                    app,
                    loaded,
                    running,
                    sessions,
                    background,
                    tasks,
                    source: None,
                }),
                shutdown,
            }),
        })
    }

    /// Reads the configuration from `path` on [`Server::reload`], `SIGHUP`
    /// and `POST /api/v1/reload`.
    pub async fn reload_from(&self, path: std::path::PathBuf) {
        let mut state = self.shared.state.lock().await;
        state.source = Some(path);
        let weak = Arc::downgrade(&self.shared);
        let reloader = crate::reload::Reloader::new(move || {
            let weak = weak.clone();
            Box::pin(async move {
                match weak.upgrade() {
                    Some(shared) => shared.reload(None).await,
                    None => Err(ReloadError::Unavailable),
                }
            })
        });
        let _ = state.app.reloader.set(reloader);
    }

    /// Re-reads the configuration file (see [`Server::reload_from`]) and
    /// the environment and applies it; refused (the running configuration
    /// kept) with the reason.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        self.shared.reload(None).await
    }

    /// Applies `config` as a reload would.
    pub async fn reload_with(&self, config: Config) -> Result<ReloadReport, ReloadError> {
        self.shared.reload(Some(config)).await
    }

    /// The application core (tests and embedding); a reload replaces it.
    pub fn app(&self) -> Arc<App> {
        self.current().0
    }

    fn current(&self) -> (Arc<App>, [Option<SocketAddr>; 6]) {
        self.shared
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Address of the HTTP front end, if enabled.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.current().1[Kind::Http.index()]
    }

    /// Address of the SMTP front end, if enabled.
    pub fn smtp_addr(&self) -> Option<SocketAddr> {
        self.current().1[Kind::Smtp.index()]
    }

    /// Address of the IMAP front end, if enabled.
    pub fn imap_addr(&self) -> Option<SocketAddr> {
        self.current().1[Kind::Imap.index()]
    }

    /// Address of the POP3 front end, if enabled.
    pub fn pop3_addr(&self) -> Option<SocketAddr> {
        self.current().1[Kind::Pop3.index()]
    }

    /// Address of the onboarding listener, if enabled.
    pub fn onboarding_addr(&self) -> Option<SocketAddr> {
        self.current().1[Kind::Onboarding.index()]
    }

    /// Address of the admin listener.
    pub fn admin_addr(&self) -> SocketAddr {
        self.current().1[Kind::Admin.index()].expect("the admin listener always runs")
    }

    /// Stops accepting, waits up to `grace` for in-flight requests, then stops.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.shared.shutdown.send(true);
        let mut tasks = {
            let mut state = self.shared.state.lock().await;
            let _ = state.background.send(true);
            std::mem::take(&mut state.tasks)
        };
        let all = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("in-flight requests did not finish within {grace:?}; closing them");
            tasks.abort_all();
        }
        tracing::info!("authswap stopped");
    }
}

impl Shared {
    /// A reload with its log line and metrics.
    async fn reload(&self, config: Option<Config>) -> Result<ReloadReport, ReloadError> {
        let result = self.apply(config).await;
        match &result {
            Ok(report) => {
                if !report.restart_required.is_empty() {
                    tracing::warn!(
                        sections = %report.restart_required.join(", "),
                        "configuration reloaded, but these sections changed and need a restart; their running values are kept"
                    );
                }
                tracing::info!(
                    applied = %report.applied.join(", "),
                    "configuration reloaded"
                );
            }
            Err(e) => tracing::error!(error = %e, "configuration reload refused"),
        }
        let app = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone();
        app.metrics.config_reload(result.is_ok());
        result
    }

    async fn apply(&self, config: Option<Config>) -> Result<ReloadReport, ReloadError> {
        if *self.shutdown.borrow() {
            return Err(ReloadError::Unavailable);
        }
        let mut state = self.state.lock().await;
        let mut config = match config {
            Some(c) => {
                c.validate()?;
                c
            }
            None => {
                let path = state.source.clone().ok_or(ReloadError::Unavailable)?;
                Config::load(&path)?
            }
        };
        let restart = crate::reload::keep_restart_required(&state.loaded, &mut config);
        let changed = crate::reload::changed_sections(&state.loaded, &config);
        let new_tenants = changed
            .iter()
            .any(|s| matches!(*s, "identity_provider" | "tls"));
        let loaded = config.clone();
        let apply_err = |e: ServeError| ReloadError::Apply(e.to_string());

        // Listeners first: a new address that cannot be bound refuses the
        // reload before anything changed.
        let mut steps = Vec::with_capacity(6);
        for kind in Kind::ALL {
            let running = state.running[kind.index()].as_ref();
            let step = match (running, kind.listen(&config)) {
                (None, None) => Step::Nothing,
                (Some(_), None) => Step::Stop,
                (Some(_), Some(_)) if !new_tenants && !changed.contains(&kind.section()) => {
                    Step::Keep
                }
                (Some(r), Some(listen)) if r.listen == listen => Step::Start {
                    listen: listen.to_owned(),
                    addr: r.addr,
                    listener: r.listener.clone(),
                },
                (_, Some(listen)) => {
                    let (listener, addr) = bind(kind.key(), listen).await.map_err(apply_err)?;
                    Step::Start {
                        listen: listen.to_owned(),
                        addr,
                        listener: Arc::new(listener),
                    }
                }
            };
            steps.push(step);
        }
        match &steps[Kind::Onboarding.index()] {
            Step::Start { addr, .. } => derive_public_url(&mut config, *addr),
            Step::Keep => {
                config.onboarding.public_url = state.app.config.onboarding.public_url.clone()
            }
            _ => {}
        }
        let (app, tenants) = state
            .app
            .reconfigured(config, new_tenants)
            .await
            .map_err(|e| ReloadError::Apply(e.to_string()))?;
        let mut launches: Vec<Option<Launch>> = Vec::with_capacity(6);
        let mut sessions = state.sessions.clone();
        for (kind, step) in Kind::ALL.into_iter().zip(&steps) {
            launches.push(match step {
                Step::Start { .. } => Some(prepare(kind, &app, &mut sessions).map_err(apply_err)?),
                _ => None,
            });
        }

        // Nothing can fail from here on.
        if let Some(tenants) = tenants {
            tenants.report_expiry(&app.metrics);
            app.tokens.set_tenants(tenants);
        }
        let mut addrs = self.current.lock().unwrap_or_else(|e| e.into_inner()).1;
        let mut report = ReloadReport {
            applied: changed
                .iter()
                .filter(|s| !restart.contains(s))
                .map(|s| (*s).to_owned())
                .collect(),
            restart_required: restart.iter().map(|s| (*s).to_owned()).collect(),
            ..ReloadReport::default()
        };
        for ((kind, step), launch) in Kind::ALL.into_iter().zip(steps).zip(launches) {
            match step {
                Step::Nothing | Step::Keep => {}
                Step::Stop => {
                    // Dropping it retires the loop; open connections finish.
                    state.running[kind.index()] = None;
                    addrs[kind.index()] = None;
                    tracing::info!(listener = kind.section(), "listener stopped");
                }
                Step::Start {
                    listen,
                    addr,
                    listener,
                } => {
                    let (retire, retire_rx) = watch::channel(false);
                    if let Some(launch) = launch {
                        state.tasks.spawn(launch(
                            listener.clone(),
                            retire_rx,
                            self.shutdown.subscribe(),
                        ));
                    }
                    let old = state.running[kind.index()].replace(Running {
                        listen,
                        addr,
                        listener,
                        retire,
                    });
                    if let Some(old) = old {
                        if old.addr != addr {
                            tracing::info!(listener = kind.section(), from = %old.addr, to = %addr, "listener moved");
                        }
                        let _ = old.retire.send(true);
                    }
                    addrs[kind.index()] = Some(addr);
                }
            }
        }
        for kind in Kind::ALL {
            if let Some(addr) = addrs[kind.index()] {
                report
                    .listeners
                    .insert(kind.section().to_owned(), addr.to_string());
            }
        }
        let _ = state.background.send(true);
        state.background = spawn_background(&app, &mut state.tasks);
        state.app = app.clone();
        state.sessions = sessions;
        state.loaded = loaded;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = (app.clone(), addrs);
        log_serving(&app, &addrs, "serving with the reloaded configuration");
        Ok(report)
    }
}

/// Completes when a connection that has not proved credentials must close:
/// `limit` after it started (never when there is no limit, or once it
/// proved them).
pub(crate) async fn unproved(slot: &Slot, limit: Option<Duration>) {
    match limit {
        Some(limit) => {
            tokio::time::sleep(limit).await;
            if slot.proved() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// Completes when an accept loop must stop accepting: retired by a reload
/// (or its sender dropped), or the server stopping.
pub(crate) async fn stopped(
    retire: &mut watch::Receiver<bool>,
    shutdown: &mut watch::Receiver<bool>,
) {
    tokio::select! {
        _ = retire.wait_for(|stop| *stop) => {}
        _ = shutdown.wait_for(|stop| *stop) => {}
    }
}

/// What the HTTP front end's listener has that the admin listener has not.
struct Limits {
    max_header: usize,
    metrics: Arc<crate::metrics::Metrics>,
    /// HTTP/1 connections start on its native path and come to hyper only
    /// if it hands them over.
    proxy: HttpProxy,
    /// `http.max_connections_per_source`.
    per_source: usize,
    /// `http.login_timeout`.
    login_timeout: Duration,
}

/// Serves connections from `listener`. `make_service` gives, per client
/// connection, the request service and a companion future that runs in the
/// connection's task: the HTTP front end's upstream lane and idle watchdog.
/// The connection is closed when the companion completes. `limits` are
/// the HTTP front end's.
#[allow(clippy::too_many_arguments)]
async fn accept_loop<F, S, B, D>(
    listener: Arc<TcpListener>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    make_service: F,
    max_connections: usize,
    header_timeout: Duration,
    mut retire: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
    limits: Option<Limits>,
) where
    F: Fn(SocketAddr, ConnectionMemo) -> (S, D) + Send + Sync + 'static,
    D: std::future::Future<Output = ()> + Send + 'static,
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<B>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let graceful = GracefulShutdown::new();
    let (per_source, login_timeout) = limits.as_ref().map_or((max_connections, None), |l| {
        (l.per_source, Some(l.login_timeout))
    });
    let slots = Slots::new(max_connections, per_source);
    // Every connection task, so that none outlives the listener: when the
    // server's grace period ends, this loop's task is aborted and the set
    // aborts them with it.
    let mut conns = JoinSet::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The HTTP front end times heads and idle connections itself (see
        // `proxy::http::Connection`), without a timer per request.
        .header_read_timeout(if limits.is_some() {
            None
        } else {
            Some(header_timeout)
        })
        .max_buf_size(
            limits
                .as_ref()
                .map_or(64 * 1024, |l| l.max_header.max(8192)),
        )
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.as_ref().map_or(64 * 1024, |l| l.max_header as u32))
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let builder = Arc::new(builder);
    let make_service = Arc::new(make_service);
    loop {
        // Every slot held by a connection that proved credentials: wait for
        // one to end (new connections wait in the accept queue).
        tokio::select! {
            _ = slots.room() => {}
            () = stopped(&mut retire, &mut shutdown) => break,
        }
        let (stream, peer): (TcpStream, SocketAddr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut retire, &mut shutdown) => break,
        };
        let Some(slot) = slots.admit(peer.ip()) else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let guard = limits
            .as_ref()
            .map(|l| l.metrics.connection(Protocol::http));
        let make_service = make_service.clone();
        let native = limits.as_ref().map(|l| l.proxy.clone());
        let shutdown = shutdown.clone();
        // Reap the finished ones so the set stays as large as the open
        // connections.
        while conns.try_join_next().is_some() {}
        conns.spawn(async move {
            let _guard = guard;
            let serve = async {
                let memo = ConnectionMemo::new(slot.proved_flag());
                let (io, h2): (BoxIo, bool) = match tls {
                    None => (Box::new(stream), false),
                    Some(acceptor) => {
                        let stream =
                            match tokio::time::timeout(header_timeout, acceptor.accept(stream))
                                .await
                            {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => return,
                            };
                        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                        (Box::new(stream), h2)
                    }
                };
                let (io, memo) = match native {
                    Some(proxy) if !h2 && proxy.native_http1() => {
                        // Boxed: its state lives for the whole connection.
                        match Box::pin(proxy.serve_h1(io, peer, shutdown, memo)).await {
                            Served::Done => return,
                            Served::Handover(io, memo) => (io, memo),
                        }
                    }
                    _ => (io, memo),
                };
                let (service, companion) = make_service(peer, memo);
                let served = watcher.watch(
                    builder
                        .serve_connection(TokioIo::new(io), service)
                        .into_owned(),
                );
                tokio::select! {
                    biased;
                    _ = served => {}
                    () = companion => {}
                }
            };
            // Closed early to make room for another connection, or for
            // not proving credentials within the login timeout.
            tokio::select! {
                biased;
                () = serve => {}
                () = slot.evicted() => {}
                () = unproved(&slot, login_timeout) => {}
            }
        });
    }
    drop(listener);
    // Retired by a reload: the open connections go on until they end or
    // the server stops.
    let ended = tokio::select! {
        _ = async { while conns.join_next().await.is_some() {} } => true,
        _ = shutdown.wait_for(|stop| *stop) => false,
    };
    if ended {
        return;
    }
    graceful.shutdown().await;
    // Connections on the native path close once idle; wait for them too.
    while conns.join_next().await.is_some() {}
}
