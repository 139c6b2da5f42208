//! A bare HTTP/1.1 upstream over TLS (ALPN `http/1.1` only) written on the
//! socket, for connection-level behaviour that a full server library hides:
//! it counts the TCP connections it accepted, records every request with
//! its connection number, and can misbehave per connection: close silently
//! after every answer (no `Connection: close`, the way an upstream's idle
//! timer closes a kept-alive connection), or read the second request on a
//! connection and close without answering (a request lost in that race).
//! Tests can also script the exact bytes of the next answers, to check how
//! each framing of a response is relayed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::server::lock;

/// How the upstream treats its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum H1Fault {
    /// Answer every request, keep every connection open.
    None,
    /// Answer, then close the connection without saying so.
    CloseAfterEachAnswer,
    /// Answer the first request of a connection; read the second one and
    /// close without answering.
    LoseSecondRequest,
}

/// One request as received.
#[derive(Clone, Debug)]
pub struct H1Request {
    /// Method.
    pub method: String,
    /// Request target.
    pub target: String,
    /// 1-based number of the connection it arrived on.
    pub connection: usize,
    /// `Authorization` header.
    pub authorization: Option<String>,
    /// Body bytes.
    pub body: Vec<u8>,
    /// The request head as received (request line and fields).
    pub head: String,
}

/// A scripted answer: these bytes verbatim, then maybe a close.
struct Scripted {
    bytes: Vec<u8>,
    close: bool,
}

struct Shared {
    fault: Mutex<H1Fault>,
    accepted: AtomicUsize,
    requests: Mutex<Vec<H1Request>>,
    script: Mutex<std::collections::VecDeque<Scripted>>,
}

/// The running upstream; stops when dropped.
pub struct RawH1Upstream {
    addr: std::net::SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for RawH1Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawH1Upstream {
    /// Binds 127.0.0.1:0 and serves with the shared test PKI.
    pub async fn start(fault: H1Fault) -> RawH1Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = TlsAcceptor::from(super::pki().server_config(&[b"http/1.1"]));
        let shared = Arc::new(Shared {
            fault: Mutex::new(fault),
            accepted: AtomicUsize::new(0),
            requests: Mutex::new(Vec::new()),
            script: Mutex::new(Default::default()),
        });
        let st = shared.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let n = st.accepted.fetch_add(1, Ordering::SeqCst) + 1;
                let (acceptor, st) = (acceptor.clone(), st.clone());
                conns.spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        serve(tls, n, st).await;
                    }
                });
            }
        });
        RawH1Upstream { addr, shared, task }
    }

    /// `https://localhost:PORT` (the test certificate's name).
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Requests received so far.
    pub fn requests(&self) -> Vec<H1Request> {
        lock(&self.shared.requests).clone()
    }

    /// The next request is answered with exactly `bytes` (then the
    /// connection is closed when `close`); scripted answers go in order,
    /// before the default answer.
    pub fn script(&self, bytes: impl AsRef<[u8]>, close: bool) {
        lock(&self.shared.script).push_back(Scripted {
            bytes: bytes.as_ref().to_vec(),
            close,
        });
    }

    /// Changes the behaviour for requests from now on.
    pub fn set_fault(&self, fault: H1Fault) {
        *lock(&self.shared.fault) = fault;
    }
}

async fn serve<S>(mut io: S, connection: usize, st: Arc<Shared>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf: Vec<u8> = Vec::new();
    for seq in 1usize.. {
        let Some(request) = read_request(&mut io, &mut buf, connection).await else {
            return;
        };
        lock(&st.requests).push(request);
        let scripted = lock(&st.script).pop_front();
        if let Some(s) = scripted {
            if io.write_all(&s.bytes).await.is_err() || io.flush().await.is_err() {
                return;
            }
            if s.close {
                let _ = io.shutdown().await;
                return;
            }
            continue;
        }
        let fault = *lock(&st.fault);
        if fault == H1Fault::LoseSecondRequest && seq == 2 {
            let _ = io.shutdown().await;
            return;
        }
        let body = format!("connection {connection} request {seq}\n");
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        if io.write_all(head.as_bytes()).await.is_err()
            || io.write_all(body.as_bytes()).await.is_err()
            || io.flush().await.is_err()
        {
            return;
        }
        if fault == H1Fault::CloseAfterEachAnswer {
            let _ = io.shutdown().await;
            return;
        }
    }
}

/// Reads one request (head up to 64 KiB, `Content-Length` body).
async fn read_request<S>(io: &mut S, buf: &mut Vec<u8>, connection: usize) -> Option<H1Request>
where
    S: tokio::io::AsyncRead + Unpin,
{
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let mut chunk = [0u8; 4096];
        let n = io.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, target) = (first.next()?.to_owned(), first.next()?.to_owned());
    let mut length = 0usize;
    let mut authorization = None;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().ok()?,
                "authorization" => authorization = Some(value.trim().to_owned()),
                _ => {}
            }
        }
    }
    buf.drain(..end);
    while buf.len() < length {
        let mut chunk = [0u8; 4096];
        let n = io.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body: Vec<u8> = buf.drain(..length).collect();
    Some(H1Request {
        head,
        method,
        target,
        connection,
        authorization,
        body,
    })
}
