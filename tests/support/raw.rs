//! A raw HTTP/1.1 client for the HTTP front end's tests: writes requests as
//! given, reads responses byte for byte (heads, `Content-Length` bodies,
//! everything until close), with a time limit on every read.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A raw client connection: bytes in, bytes out, nothing normalised.
pub struct Raw {
    pub stream: TcpStream,
    /// Bytes read and not yet returned.
    buf: Vec<u8>,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        Raw::new(TcpStream::connect(addr).await.expect("connect"))
    }

    /// Reads from a connection the test has been writing to itself.
    pub fn new(stream: TcpStream) -> Raw {
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &str) {
        self.stream
            .write_all(bytes.as_bytes())
            .await
            .expect("write");
    }

    /// Reads until `buf` holds `marker`; returns everything up to and
    /// including it.
    pub async fn until(&mut self, marker: &str) -> String {
        let work = async {
            loop {
                if let Some(i) = find(&self.buf, marker.as_bytes()) {
                    let end = i + marker.len();
                    let text = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                    self.buf.drain(..end);
                    return text;
                }
                let mut chunk = [0u8; 8192];
                let n = self.stream.read(&mut chunk).await.expect("read");
                assert!(
                    n > 0,
                    "closed before {marker:?}; got {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
                self.buf.extend_from_slice(&chunk[..n]);
            }
        };
        tokio::time::timeout(Duration::from_secs(10), work)
            .await
            .expect("answered in time")
    }

    /// Reads one response with a `Content-Length` body: (head, body).
    pub async fn response(&mut self) -> (String, String) {
        let head = self.until("\r\n\r\n").await;
        let length: usize = field(&head, "content-length")
            .map(|v| v.parse().expect("length"))
            .unwrap_or(0);
        let work = async {
            while self.buf.len() < length {
                let mut chunk = [0u8; 8192];
                let n = self.stream.read(&mut chunk).await.expect("read");
                assert!(n > 0, "closed inside a body");
                self.buf.extend_from_slice(&chunk[..n]);
            }
        };
        tokio::time::timeout(Duration::from_secs(10), work)
            .await
            .expect("body in time");
        let body = String::from_utf8_lossy(&self.buf[..length]).into_owned();
        self.buf.drain(..length);
        (head, body)
    }

    /// Sends `req`, then reads one response as [`Raw::response`].
    pub async fn response_to(&mut self, req: &str) -> (String, String) {
        self.send(req).await;
        self.response().await
    }

    /// Everything until authswap closes the connection.
    pub async fn rest(&mut self) -> String {
        let mut rest = std::mem::take(&mut self.buf);
        tokio::time::timeout(Duration::from_secs(10), self.stream.read_to_end(&mut rest))
            .await
            .expect("closed in time")
            .expect("read");
        String::from_utf8_lossy(&rest).into_owned()
    }
    /// Closes our side and waits until authswap has closed its side too,
    /// so that its connection is gone when this returns.
    pub async fn close(mut self) {
        self.stream.shutdown().await.expect("shutdown");
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.stream.read_to_end(&mut rest))
            .await
            .expect("authswap closed its side");
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A header field's value in a head (first match, any case).
pub fn field(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

/// The status code of a response head.
pub fn status(head: &str) -> u16 {
    head[9..12].parse().expect("status code")
}
