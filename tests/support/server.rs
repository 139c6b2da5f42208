//! Shared plumbing for the TLS test servers: the accept loop (bound to
//! 127.0.0.1:0 before the constructor returns), per-connection TLS +
//! HTTP/1.1 / HTTP/2 serving, drop-to-shutdown handles, and small
//! helpers (boxed bodies, random hex, RFC 3339-ish timestamps).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

/// Response body type used by all doubles.
pub type RespBody = BoxBody<Bytes, Infallible>;

/// Which HTTP versions the server speaks (ALPN is configured to match).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpMode {
    /// Only HTTP/1.1 (ALPN `http/1.1`).
    Http1Only,
    /// HTTP/2 or HTTP/1.1 (ALPN `h2`, `http/1.1`).
    Auto,
}

/// A running server; the accept loop and all its connections are aborted on drop.
pub struct ServerHandle {
    addr: SocketAddr,
    task: JoinHandle<()>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl ServerHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds 127.0.0.1:0 and serves TLS (shared test PKI) with `handler`.
pub async fn spawn_tls_server<F, Fut>(mode: HttpMode, handler: F) -> ServerHandle
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<RespBody>> + Send + 'static,
{
    let alpn: &[&[u8]] = match mode {
        HttpMode::Http1Only => &[b"http/1.1"],
        HttpMode::Auto => &[b"h2", b"http/1.1"],
    };
    let acceptor = TlsAcceptor::from(super::certs::pki().server_config(alpn));
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local_addr");
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();

    let task = tokio::spawn(async move {
        // Dropping the JoinSet (when this task is aborted) aborts every
        // connection task too.
        let mut conns = JoinSet::new();
        loop {
            let (tcp, _peer) = match listener.accept().await {
                Ok(x) => x,
                Err(_) => continue,
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            while conns.try_join_next().is_some() {}
            let acceptor = acceptor.clone();
            let handler = handler.clone();
            conns.spawn(async move {
                let _ = tcp.set_nodelay(true);
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut builder = auto::Builder::new(TokioExecutor::new());
                if mode == HttpMode::Http1Only {
                    builder = builder.http1_only();
                }
                let svc = hyper::service::service_fn(move |req| {
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
            });
        }
    });
    ServerHandle {
        addr,
        task,
        accepted,
    }
}

/// Binds 127.0.0.1:0 and serves plain HTTP/1.1 with `handler` (for the
/// browser-facing endpoints of a double: test browsers speak plain HTTP).
pub async fn spawn_plain_server<F, Fut>(handler: F) -> ServerHandle
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<RespBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local_addr");
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let (tcp, _peer) = match listener.accept().await {
                Ok(x) => x,
                Err(_) => continue,
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            while conns.try_join_next().is_some() {}
            let handler = handler.clone();
            conns.spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    ServerHandle {
        addr,
        task,
        accepted,
    }
}

/// Full body from bytes.
pub fn full(b: impl Into<Bytes>) -> RespBody {
    Full::new(b.into()).boxed()
}

/// Empty body.
pub fn empty() -> RespBody {
    full(Bytes::new())
}

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..n)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

/// Random UUID-shaped string (v4 layout, not RFC-exact bits).
pub fn random_uuid() -> String {
    let h = random_hex(16);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Current UTC time as `YYYY-MM-DD HH:MM:SSZ` (the format Entra ID uses in
/// the `timestamp` field of error bodies).
pub fn utc_timestamp() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
        y,
        m,
        d,
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Locks a std mutex, ignoring poisoning (a panicking test thread must not
/// cascade into every other assertion).
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Error from [`read_body_limited`].
#[derive(Debug)]
pub enum BodyError {
    /// The body exceeded the limit.
    TooLarge,
    /// The connection failed while reading.
    Io,
}

/// Collects a request body, failing with [`BodyError::TooLarge`] above `limit` bytes.
pub async fn read_body_limited(body: Incoming, limit: usize) -> Result<Bytes, BodyError> {
    use hyper::body::Body as _;
    if body.size_hint().lower() > limit as u64 {
        return Err(BodyError::TooLarge);
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge),
        Err(_) => Err(BodyError::Io),
    }
}
