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

/// A running server.
pub struct Server {
    app: Arc<App>,
    http_addr: Option<SocketAddr>,
    admin_addr: SocketAddr,
    smtp_addr: Option<SocketAddr>,
    imap_addr: Option<SocketAddr>,
    pop3_addr: Option<SocketAddr>,
    onboarding_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("http", &self.http_addr)
            .field("admin", &self.admin_addr)
            .finish_non_exhaustive()
    }
}

async fn bind(key: &'static str, value: &str) -> Result<TcpListener, ServeError> {
    let addr = parse_listen(key, value)?;
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { key, addr, source })
}

impl Server {
    /// Opens everything and starts serving. Listen ports may be 0.
    pub async fn start(mut config: Config) -> Result<Server, ServeError> {
        for missing in config.missing() {
            tracing::warn!("{missing}");
        }
        // Bound first: without `public_url`, links and the redirect URI use
        // the address actually bound (port 0 in tests).
        let mut onboarding_listener = None;
        if config.onboarding.enabled {
            let listener = bind("onboarding.listen", &config.onboarding.listen).await?;
            let addr = listener.local_addr().map_err(|source| ServeError::Bind {
                key: "onboarding.listen",
                addr: parse_listen("onboarding.listen", &config.onboarding.listen)
                    .expect("validated"),
                source,
            })?;
            if config.onboarding.public_url.is_none() {
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
            onboarding_listener = Some((listener, addr));
        }
        let app = App::open(config).await?;
        let (shutdown, rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let cfg = app.config.clone();

        let admin_listener = bind("admin.listen", &cfg.admin.listen).await?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| ServeError::Bind {
                key: "admin.listen",
                addr: parse_listen("admin.listen", &cfg.admin.listen).expect("validated"),
                source,
            })?;
        {
            let admin_tls = match (&cfg.admin.tls_cert_file, &cfg.admin.tls_key_file) {
                (Some(cert), Some(key)) => Some(tokio_rustls::TlsAcceptor::from(
                    crate::tls::server_config(cert, key, &[b"http/1.1"])?,
                )),
                _ => None,
            };
            let admin = admin::AdminListener::new(app.clone(), admin_tls.is_some())?;
            let rx = rx.clone();
            tasks.spawn(async move {
                let service = move |_peer: SocketAddr, _memo: ConnectionMemo| {
                    let admin = admin.clone();
                    let service = service_fn(move |req| admin.clone().handle(req));
                    (service, std::future::pending::<()>())
                };
                accept_loop(
                    admin_listener,
                    admin_tls,
                    service,
                    64,
                    Duration::from_secs(10),
                    rx,
                    None,
                )
                .await;
            });
        }

        let mut onboarding_addr = None;
        if let Some((listener, addr)) = onboarding_listener {
            onboarding_addr = Some(addr);
            let onboarding = crate::onboarding::Onboarding::new(app.clone())?;
            let tls = match (&cfg.onboarding.tls_cert_file, &cfg.onboarding.tls_key_file) {
                (Some(cert), Some(key)) => Some(tokio_rustls::TlsAcceptor::from(
                    crate::tls::server_config(cert, key, &[b"http/1.1"])?,
                )),
                _ => None,
            };
            let rx = rx.clone();
            tasks.spawn(async move {
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
                    rx,
                    None,
                )
                .await;
            });
        }

        let mut http_addr = None;
        if cfg.http.enabled {
            let listener = bind("http.listen", &cfg.http.listen).await?;
            http_addr = listener.local_addr().ok();
            let proxy = HttpProxy::new(app.clone())?;
            let tls = match (&cfg.http.tls_cert_file, &cfg.http.tls_key_file) {
                (Some(cert), Some(key)) => Some(tokio_rustls::TlsAcceptor::from(
                    crate::tls::server_config(cert, key, &[b"h2", b"http/1.1"])?,
                )),
                _ => None,
            };
            let max_conn = cfg.http.max_connections;
            let header_timeout = cfg.http.header_read_timeout;
            let rx = rx.clone();
            let metrics = app.metrics.clone();
            let max_header = cfg.http.max_header_bytes.as_usize();
            let limits = Limits {
                max_header,
                metrics,
                proxy: proxy.clone(),
                per_source: cfg.http.max_connections_per_source,
                login_timeout: cfg.http.login_timeout,
            };
            tasks.spawn(async move {
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
                    rx,
                    Some(limits),
                )
                .await;
            });
        }
        let mut smtp_addr = None;
        if cfg.smtp.enabled {
            let listener = bind("smtp.listen", &cfg.smtp.listen).await?;
            smtp_addr = listener.local_addr().ok();
            let front = Arc::new(MailFrontEnd::new(
                app.clone(),
                cfg.smtp.clone(),
                Protocol::smtp,
                "smtp.upstream",
            )?);
            let smtp = Smtp::new(front.clone());
            tasks.spawn(crate::proxy::mail::accept_loop(
                listener,
                front,
                move || smtp.dialect(),
                rx.clone(),
            ));
        }
        let mut imap_addr = None;
        if cfg.imap.enabled {
            let listener = bind("imap.listen", &cfg.imap.listen).await?;
            imap_addr = listener.local_addr().ok();
            let front = Arc::new(MailFrontEnd::new(
                app.clone(),
                cfg.imap.clone(),
                Protocol::imap,
                "imap.upstream",
            )?);
            let imap = Imap::new(front.clone());
            tasks.spawn(crate::proxy::mail::accept_loop(
                listener,
                front,
                move || imap.dialect(),
                rx.clone(),
            ));
        }
        let mut pop3_addr = None;
        if cfg.pop3.enabled {
            let listener = bind("pop3.listen", &cfg.pop3.listen).await?;
            pop3_addr = listener.local_addr().ok();
            let front = Arc::new(MailFrontEnd::new(
                app.clone(),
                cfg.pop3.clone(),
                Protocol::pop3,
                "pop3.upstream",
            )?);
            let pop3 = Pop3::new(front.clone());
            tasks.spawn(crate::proxy::mail::accept_loop(
                listener,
                front,
                move || pop3.dialect(),
                rx.clone(),
            ));
        }
        tasks.spawn({
            let handle = app.spawn_background(rx.clone());
            async move {
                let _ = handle.await;
            }
        });
        tasks.spawn({
            let handle = crate::notify::spawn(app.clone(), rx.clone());
            async move {
                let _ = handle.await;
            }
        });
        tracing::info!(
            admin = %admin_addr,
            http = %http_addr.map_or_else(|| "disabled".to_owned(), |a| a.to_string()),
            smtp = %smtp_addr.map_or_else(|| "disabled".to_owned(), |a| a.to_string()),
            imap = %imap_addr.map_or_else(|| "disabled".to_owned(), |a| a.to_string()),
            pop3 = %pop3_addr.map_or_else(|| "disabled".to_owned(), |a| a.to_string()),
            onboarding = %onboarding_addr.map_or_else(|| "disabled".to_owned(), |a| a.to_string()),
            identities = app.directory.len(),
            "authswap is serving"
        );
        Ok(Server {
            app,
            http_addr,
            admin_addr,
            smtp_addr,
            imap_addr,
            pop3_addr,
            onboarding_addr,
            shutdown,
            tasks,
        })
    }

    /// The application core (tests and embedding).
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Address of the HTTP front end, if enabled.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Address of the SMTP front end, if enabled.
    pub fn smtp_addr(&self) -> Option<SocketAddr> {
        self.smtp_addr
    }

    /// Address of the IMAP front end, if enabled.
    pub fn imap_addr(&self) -> Option<SocketAddr> {
        self.imap_addr
    }

    /// Address of the POP3 front end, if enabled.
    pub fn pop3_addr(&self) -> Option<SocketAddr> {
        self.pop3_addr
    }

    /// Address of the onboarding listener, if enabled.
    pub fn onboarding_addr(&self) -> Option<SocketAddr> {
        self.onboarding_addr
    }

    /// Address of the admin listener.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Stops accepting, waits up to `grace` for in-flight requests, then stops.
    pub async fn shutdown(mut self, grace: Duration) {
        let _ = self.shutdown.send(true);
        let all = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("in-flight requests did not finish within {grace:?}; closing them");
            self.tasks.abort_all();
        }
        tracing::info!("authswap stopped");
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
async fn accept_loop<F, S, B, D>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    make_service: F,
    max_connections: usize,
    header_timeout: Duration,
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
            _ = shutdown.changed() => break,
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
            _ = shutdown.changed() => break,
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
    graceful.shutdown().await;
    // Connections on the native path close once idle; wait for them too.
    while conns.join_next().await.is_some() {}
}
