//! A bounded line codec for the mail front ends: reads CRLF (or bare LF)
//! terminated lines up to a maximum length from any byte stream, keeps what
//! it read ahead (pipelined commands) so it can be handed on when the session
//! is spliced, and reads IMAP literals of a given size.

use bytes::{Buf, Bytes, BytesMut};
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Any bidirectional byte stream (plain TCP or TLS).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A boxed stream.
pub type BoxIo = Box<dyn Io>;

/// A line that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// Longer than the limit; the rest of the line was discarded.
    #[error("line too long")]
    TooLong,
    /// The stream failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Line-oriented reader/writer over a stream.
pub struct LineIo<S> {
    io: S,
    buf: BytesMut,
    max: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> LineIo<S> {
    /// Wraps `io`; lines longer than `max` bytes are refused.
    pub fn new(io: S, max: usize) -> Self {
        LineIo {
            io,
            buf: BytesMut::with_capacity(1024),
            max,
        }
    }

    /// Wraps `io` with bytes already read from it.
    pub fn with_buffer(io: S, max: usize, buf: BytesMut) -> Self {
        LineIo { io, buf, max }
    }

    /// Changes the line limit.
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    async fn fill(&mut self) -> io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(4096);
        }
        self.io.read_buf(&mut self.buf).await
    }

    /// Reads one line, without its line ending. `Ok(None)` at end of stream.
    pub async fn read_line(&mut self) -> Result<Option<Bytes>, LineError> {
        let mut scanned = 0;
        let mut discarding = false;
        loop {
            if let Some(pos) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + pos;
                if discarding {
                    self.buf.advance(end + 1);
                    return Err(LineError::TooLong);
                }
                let mut line = self.buf.split_to(end + 1);
                line.truncate(end);
                if line.last() == Some(&b'\r') {
                    line.truncate(end - 1);
                }
                if line.len() > self.max {
                    return Err(LineError::TooLong);
                }
                return Ok(Some(line.freeze()));
            }
            scanned = self.buf.len();
            if scanned > self.max + 2 {
                // Too long: drop what we have and skip to the next newline.
                discarding = true;
                self.buf.clear();
                scanned = 0;
            }
            if self.fill().await? == 0 {
                if discarding {
                    return Err(LineError::TooLong);
                }
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(LineError::Io(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Reads exactly `n` bytes (an IMAP literal).
    pub async fn read_exact(&mut self, n: usize) -> io::Result<Bytes> {
        while self.buf.len() < n {
            if self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(self.buf.split_to(n).freeze())
    }

    /// Reads and drops exactly `n` bytes (a refused IMAP literal), holding
    /// at most one read's worth of them in memory.
    pub async fn discard(&mut self, mut n: u64) -> io::Result<()> {
        loop {
            let take = usize::try_from(n).map_or(self.buf.len(), |n| n.min(self.buf.len()));
            self.buf.advance(take);
            n -= take as u64;
            if n == 0 {
                return Ok(());
            }
            if self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Writes `data` and flushes.
    pub async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.io.write_all(data).await?;
        self.io.flush().await
    }

    /// Bytes read ahead and not yet consumed.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Drops bytes read ahead (e.g. injected after STARTTLS).
    pub fn discard_buffered(&mut self) {
        self.buf.clear();
    }

    /// The stream and what was read ahead.
    pub fn into_parts(self) -> (S, BytesMut) {
        (self.io, self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_pipelining_and_limits() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        b.write_all(b"EHLO x\r\nNOOP\nQUIT\r\n").await.unwrap();
        let mut l = LineIo::new(a, 10);
        assert_eq!(&l.read_line().await.unwrap().unwrap()[..], b"EHLO x");
        assert_eq!(l.buffered(), b"NOOP\nQUIT\r\n");
        assert_eq!(&l.read_line().await.unwrap().unwrap()[..], b"NOOP");
        assert_eq!(&l.read_line().await.unwrap().unwrap()[..], b"QUIT");
        let long = vec![b'a'; 5000];
        b.write_all(&long).await.unwrap();
        b.write_all(b"\r\nNEXT\r\n").await.unwrap();
        assert!(matches!(l.read_line().await, Err(LineError::TooLong)));
        assert_eq!(&l.read_line().await.unwrap().unwrap()[..], b"NEXT");
        b.write_all(&[b'x'; 10_000]).await.unwrap();
        b.write_all(b"AFTER\r\n").await.unwrap();
        l.discard(10_000).await.unwrap();
        assert_eq!(&l.read_line().await.unwrap().unwrap()[..], b"AFTER");
        b.write_all(b"12345").await.unwrap();
        assert_eq!(&l.read_exact(3).await.unwrap()[..], b"123");
        drop(b);
        assert!(l.read_line().await.is_err(), "partial line at EOF");
    }
}
