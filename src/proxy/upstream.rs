//! Upstream HTTP/1.1 connections of the HTTP front end: one pool of idle
//! connections for both wire halves. A connection waits in it as a plain
//! stream between responses (newest first, at most [`MAX_IDLE`], closed
//! after [`IDLE_TIMEOUT`]): the native HTTP/1.1 half takes and parks
//! streams as they are, and the hyper half's [`Lane`] (the upstream
//! connection of one client connection, driven inside that connection's
//! task, with no pool task in between, the way nginx serves both sides
//! from one event loop) runs hyper's HTTP/1.1 client over a parked stream
//! and parks the stream again when the client connection ends. So a
//! connection the native half hands to hyper reuses the upstream
//! connection it had, and legacy clients that reconnect for every request
//! start warm. A request that meets an upstream connection closed while
//! idle is re-sent on another one when hyper hands it back unsent. An
//! upstream that picks HTTP/2 by ALPN gets one shared HTTP/2 connection,
//! which multiplexes every client: the connection on which that was learnt
//! becomes it (it is not dropped and dialled again).

use super::line::BoxIo;
use crate::tls::{BoxError, OutBody};
use futures_util::task::noop_waker_ref;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::gauge::Gauge;
use rustls::pki_types::ServerName;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Waker};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Idle upstream connections parked between client connections.
pub const MAX_IDLE: usize = 256;
/// A parked connection idle longer than this is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Connections tried for one request when they turn out closed before the
/// request could be written.
const MAX_ATTEMPTS: usize = 3;

type Driver = Pin<Box<http1::Connection<TokioIo<BoxIo>, OutBody>>>;
type Sender = http1::SendRequest<OutBody>;

/// One upstream HTTP/1.1 connection: the handle to send on and the
/// connection future that must be polled for anything to happen.
struct Conn {
    sender: Sender,
    driver: Driver,
}

impl Conn {
    /// The stream under an idle connection (its last response read whole,
    /// nothing read ahead), to park; `None` when it is busy or closed.
    fn into_idle_stream(mut self) -> Option<BoxIo> {
        // Polled once without a task to wake: reads a close the upstream
        // already sent and lets an idle connection report itself ready.
        let mut cx = Context::from_waker(noop_waker_ref());
        if self.driver.as_mut().poll(&mut cx).is_ready()
            || self.sender.is_closed()
            || !self.sender.is_ready()
        {
            return None;
        }
        let parts = Pin::into_inner(self.driver).into_parts();
        parts.read_buf.is_empty().then(|| parts.io.into_inner())
    }
}

/// Parked idle streams, newest last: at most [`MAX_IDLE`], none idle
/// longer than [`IDLE_TIMEOUT`].
/// Their number is kept in a gauge.
struct Parked {
    idle: Mutex<Vec<(Instant, BoxIo)>>,
    gauge: Gauge,
}

impl Parked {
    fn new(gauge: Gauge) -> Parked {
        Parked {
            idle: Mutex::new(Vec::new()),
            gauge,
        }
    }

    fn count(&self, idle: &[(Instant, BoxIo)]) {
        self.gauge
            .set(i64::try_from(idle.len()).unwrap_or(i64::MAX));
    }

    /// The most recently parked live one.
    fn take(&self) -> Option<BoxIo> {
        let mut idle = lock(&self.idle);
        let mut found = None;
        while let Some((since, mut conn)) = idle.pop() {
            if since.elapsed() < IDLE_TIMEOUT && raw_alive(&mut conn) {
                found = Some(conn);
                break;
            }
        }
        self.count(&idle);
        found
    }

    /// Parks `conn` if it is alive (the oldest goes when full); whether it
    /// was parked.
    fn put(&self, mut conn: BoxIo) -> bool {
        if !raw_alive(&mut conn) {
            return false;
        }
        let mut idle = lock(&self.idle);
        if idle.len() >= MAX_IDLE {
            idle.remove(0);
        }
        idle.push((Instant::now(), conn));
        self.count(&idle);
        true
    }

    /// Closes the ones that timed out or that the upstream closed.
    fn sweep(&self) {
        let mut idle = lock(&self.idle);
        idle.retain_mut(|(since, conn)| since.elapsed() < IDLE_TIMEOUT && raw_alive(conn));
        self.count(&idle);
    }
}

/// Where the upstream is and how to reach it, plus the parked connections.
pub struct Upstreams {
    host: String,
    port: u16,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    connect_timeout: Duration,
    http2: AtomicBool,
    http1: AtomicBool,
    idle: Parked,
    /// The shared HTTP/2 connection, when the upstream chose HTTP/2.
    h2: Mutex<Option<http2::SendRequest<OutBody>>>,
    /// One dial at a time for a new HTTP/2 connection.
    h2_dialing: tokio::sync::Mutex<()>,
    sweeping: AtomicBool,
}

/// Why a request could not be sent on an upstream HTTP/1.1 connection.
#[derive(Debug)]
pub enum SendError {
    /// The upstream chose HTTP/2: send through the shared client.
    Http2(Box<Request<OutBody>>),
    /// No connection could be opened.
    Connect(BoxError),
    /// The request failed after it was written (or may have been).
    Failed {
        /// What hyper reported.
        error: hyper::Error,
        /// The connection had served requests before, so the failure may
        /// be the upstream closing it while idle as this one was sent.
        reused: bool,
    },
}

impl SendError {
    /// The error for logs.
    pub fn into_boxed(self) -> BoxError {
        match self {
            SendError::Http2(_) => "the upstream chose HTTP/2".into(),
            SendError::Connect(e) => format!("connecting to the upstream: {e}").into(),
            SendError::Failed { error, .. } => Box::new(error),
        }
    }
}

enum Dialed {
    Http1(Conn),
    Http2,
}

impl Upstreams {
    /// Upstream at `host:port`, over TLS when `tls` is set. `alpn` in the
    /// TLS configuration is replaced by `h2, http/1.1`.
    pub fn new(
        host: &str,
        port: u16,
        tls: Option<rustls::ClientConfig>,
        connect_timeout: Duration,
        idle_gauge: Gauge,
    ) -> Result<Upstreams, rustls::pki_types::InvalidDnsNameError> {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tls = match tls {
            None => None,
            Some(mut config) => {
                config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
                let name = ServerName::try_from(host.clone())?;
                Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
            }
        };
        Ok(Upstreams {
            host,
            port,
            http1: AtomicBool::new(tls.is_none()),
            tls,
            connect_timeout,
            http2: AtomicBool::new(false),
            idle: Parked::new(idle_gauge),
            h2: Mutex::new(None),
            h2_dialing: tokio::sync::Mutex::new(()),
            sweeping: AtomicBool::new(false),
        })
    }

    /// Whether a connection to the upstream has settled on HTTP/1.1 (or
    /// the upstream is plain HTTP, where there is no choice).
    pub fn speaks_http1(&self) -> bool {
        self.http1.load(Ordering::Relaxed)
    }

    /// Whether the upstream answered ALPN with `h2`.
    pub fn speaks_http2(&self) -> bool {
        self.http2.load(Ordering::Relaxed)
    }

    /// A new connection to the upstream, or `None` when it chose HTTP/2
    /// by ALPN (remembered: see [`Upstreams::speaks_http2`]).
    pub async fn connect(&self) -> Result<Option<BoxIo>, BoxError> {
        let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
        let tcp = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| timed_out())??;
        tcp.set_nodelay(true)?;
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
        Ok(Some(match &self.tls {
            None => Box::new(tcp),
            Some((connector, name)) => {
                let tls = tokio::time::timeout(
                    self.connect_timeout,
                    connector.connect(name.clone(), tcp),
                )
                .await
                .map_err(|_| timed_out())??;
                if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                    self.http2.store(true, Ordering::Relaxed);
                    // This connection becomes the shared HTTP/2 one.
                    self.adopt_h2(Box::new(tls)).await?;
                    return Ok(None);
                }
                self.http1.store(true, Ordering::Relaxed);
                Box::new(tls)
            }
        }))
    }

    async fn dial(&self) -> Result<Dialed, BoxError> {
        let Some(stream) = self.connect().await? else {
            return Ok(Dialed::Http2);
        };
        Ok(Dialed::Http1(handshake(stream).await?))
    }

    /// Makes `stream` (ALPN `h2`) the shared HTTP/2 connection.
    async fn adopt_h2(&self, stream: BoxIo) -> Result<(), BoxError> {
        let (sender, conn) = http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
            }
        });
        *lock(&self.h2) = Some(sender);
        Ok(())
    }

    fn h2_sender(&self) -> Option<http2::SendRequest<OutBody>> {
        lock(&self.h2).as_ref().filter(|s| !s.is_closed()).cloned()
    }

    /// Sends `req` (absolute-form URI) over the shared HTTP/2 connection,
    /// opening one when there is none (or it closed).
    pub async fn send_h2(&self, req: Request<OutBody>) -> Result<Response<Incoming>, BoxError> {
        let mut sender = match self.h2_sender() {
            Some(s) => s,
            None => {
                let _one = self.h2_dialing.lock().await;
                match self.h2_sender() {
                    Some(s) => s,
                    None => match Box::pin(self.connect()).await? {
                        None => self
                            .h2_sender()
                            .ok_or("the upstream HTTP/2 connection closed")?,
                        Some(h1) => {
                            // The upstream went back to HTTP/1.1: park it
                            // for the HTTP/1.1 paths and fail this one.
                            self.idle.put(h1);
                            return Err("the upstream stopped offering HTTP/2".into());
                        }
                    },
                }
            }
        };
        sender.ready().await?;
        Ok(sender.send_request(req).await?)
    }

    /// Sends one request (origin-form URI, `Host` set) on a parked
    /// connection or a new one, for a client that has no lane (an HTTP/2
    /// client in front of an HTTP/1.1 upstream): the connection goes back
    /// to the pool once its response has been read whole.
    pub async fn send_once(
        self: &Arc<Self>,
        mut req: Request<OutBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let mut last: Option<hyper::Error> = None;
        for _ in 0..MAX_ATTEMPTS {
            let (stream, reused) = match self.checkout_raw() {
                Some(stream) => (stream, true),
                None => match Box::pin(self.connect()).await.map_err(SendError::Connect)? {
                    Some(stream) => (stream, false),
                    None => return Err(SendError::Http2(Box::new(req))),
                },
            };
            let (mut sender, conn) =
                match http1::Builder::new().handshake(TokioIo::new(stream)).await {
                    Ok(v) => v,
                    Err(e) => {
                        last = Some(e);
                        continue;
                    }
                };
            // Once the response is read and the sender gone, the connection
            // ends without closing its stream, which is parked again.
            let pool = self.clone();
            tokio::spawn(async move {
                if let Ok(parts) = conn.without_shutdown().await {
                    if parts.read_buf.is_empty() {
                        pool.checkin_raw(parts.io.into_inner());
                    }
                }
            });
            match try_send(&mut sender, req, reused).await {
                Attempt::Sent(response) => return Ok(response),
                Attempt::Unsent(unsent, e) => {
                    req = unsent;
                    last = Some(e);
                }
                Attempt::Failed(e) => return Err(e),
            }
        }
        Err(exhausted(last))
    }

    /// The most recently parked live connection, as a stream.
    pub fn checkout_raw(&self) -> Option<BoxIo> {
        self.idle.take()
    }

    /// Parks a connection that is between responses.
    pub fn checkin_raw(self: &Arc<Self>, io: BoxIo) {
        if self.idle.put(io) {
            self.start_sweeper();
        }
    }

    fn start_sweeper(self: &Arc<Self>) {
        if !self.sweeping.swap(true, Ordering::Relaxed) {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(sweep(Arc::downgrade(self)));
            }
        }
    }
}

/// How sending on one connection went.
enum Attempt {
    Sent(Response<Incoming>),
    /// Not sent (the connection turned out closed): try another one.
    Unsent(Request<OutBody>, hyper::Error),
    Failed(SendError),
}

/// Sends `req` on `sender` (a connection that had served others when
/// `reused`), telling a request hyper hands back unsent from one that may
/// have reached the upstream.
async fn try_send(sender: &mut Sender, req: Request<OutBody>, reused: bool) -> Attempt {
    if let Err(e) = sender.ready().await {
        return Attempt::Unsent(req, e);
    }
    match sender.try_send_request(req).await {
        Ok(response) => Attempt::Sent(response),
        Err(mut e) => match e.take_message() {
            Some(unsent) => Attempt::Unsent(unsent, e.into_error()),
            None => Attempt::Failed(SendError::Failed {
                error: e.into_error(),
                reused,
            }),
        },
    }
}

/// The error after [`MAX_ATTEMPTS`] connections turned out closed.
fn exhausted(last: Option<hyper::Error>) -> SendError {
    match last {
        Some(error) => SendError::Failed {
            error,
            reused: true,
        },
        None => SendError::Connect("no upstream connection".into()),
    }
}

/// hyper's HTTP/1.1 client over a stream (no I/O: the handshake of an
/// HTTP/1.1 client connection only sets up its state).
async fn handshake(stream: BoxIo) -> Result<Conn, hyper::Error> {
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await?;
    Ok(Conn {
        sender,
        driver: Box::pin(conn),
    })
}

/// Closes parked connections that timed out or that the upstream closed,
/// until the upstream set is gone.
async fn sweep(upstreams: Weak<Upstreams>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(upstreams) = upstreams.upgrade() else {
            return;
        };
        upstreams.idle.sweep();
    }
}

/// The upstream connection of one client connection. [`Lane::poll_drive`]
/// must be polled in the client connection's task for as long as the lane
/// is used: it is what moves the upstream connection's bytes.
pub struct Lane {
    upstreams: Arc<Upstreams>,
    slot: Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    sender: Option<Sender>,
    driver: Option<Driver>,
    waker: Option<Waker>,
}

impl Lane {
    /// An empty lane; it connects (or takes a parked connection) on first use.
    pub fn new(upstreams: Arc<Upstreams>) -> Lane {
        Lane {
            upstreams,
            slot: Mutex::new(Slot::default()),
        }
    }

    /// Moves the lane's upstream connection along (never completes; call it
    /// from a future polled beside the client connection).
    pub fn poll_drive(&self, cx: &mut Context<'_>) {
        let mut slot = lock(&self.slot);
        if let Some(driver) = slot.driver.as_mut() {
            if driver.as_mut().poll(cx).is_ready() {
                slot.driver = None;
                slot.sender = None;
            }
        }
        if !slot.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            slot.waker = Some(cx.waker().clone());
        }
    }

    /// Sends `req` (origin-form URI, `Host` set) on the lane's connection,
    /// a parked one or a new one.
    pub async fn send(&self, mut req: Request<OutBody>) -> Result<Response<Incoming>, SendError> {
        let mut last: Option<hyper::Error> = None;
        for _ in 0..MAX_ATTEMPTS {
            let taken = lock(&self.slot).sender.take();
            let (mut sender, reused) = match taken {
                Some(sender) => (sender, true),
                None => match self.upstreams.checkout_raw() {
                    Some(stream) => match handshake(stream).await {
                        Ok(conn) => (self.install(conn), true),
                        Err(e) => {
                            last = Some(e);
                            continue;
                        }
                    },
                    // Boxed: the TLS handshake's state would otherwise
                    // make every request's future larger.
                    None => match Box::pin(self.upstreams.dial())
                        .await
                        .map_err(SendError::Connect)?
                    {
                        Dialed::Http2 => return Err(SendError::Http2(Box::new(req))),
                        Dialed::Http1(conn) => (self.install(conn), false),
                    },
                },
            };
            // (A connection closed while idle clears itself in the driver.)
            match try_send(&mut sender, req, reused).await {
                Attempt::Sent(response) => {
                    lock(&self.slot).sender = Some(sender);
                    return Ok(response);
                }
                Attempt::Unsent(unsent, e) => {
                    req = unsent;
                    last = Some(e);
                }
                Attempt::Failed(e) => return Err(e),
            }
        }
        Err(exhausted(last))
    }

    /// Makes `conn` the lane's connection and wakes the driver for it.
    fn install(&self, conn: Conn) -> Sender {
        let mut slot = lock(&self.slot);
        slot.driver = Some(conn.driver);
        slot.sender = None;
        if let Some(waker) = &slot.waker {
            waker.wake_by_ref();
        }
        conn.sender
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        let slot = self.slot.get_mut().unwrap_or_else(|e| e.into_inner());
        if let (Some(sender), Some(driver)) = (slot.sender.take(), slot.driver.take()) {
            if let Some(stream) = (Conn { sender, driver }).into_idle_stream() {
                self.upstreams.checkin_raw(stream);
            }
        }
    }
}

/// Whether a raw connection between responses is still open: polled once
/// without a task to wake, it must have nothing to say (a close, an error
/// or unsolicited bytes all mean it cannot be used).
pub fn raw_alive(io: &mut BoxIo) -> bool {
    let mut cx = Context::from_waker(noop_waker_ref());
    let mut byte = [0u8; 1];
    let mut buf = tokio::io::ReadBuf::new(&mut byte);
    Pin::new(&mut **io)
        .poll_read(&mut cx, &mut buf)
        .is_pending()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
