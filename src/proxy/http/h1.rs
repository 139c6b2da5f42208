//! The native HTTP/1.1 half of the HTTP front end: authswap's own relay
//! for the common request, the way nginx serves it. It is the socket I/O
//! and the timers around the codec (`codec.rs`: head parsing and
//! rewriting, response framing, the chunk scanner), under the exchange
//! policy that both halves share (`exchange.rs`: identify, token, body,
//! send, refusal policy). Both sides of a request are served from the
//! client connection's task, with one upstream connection per client
//! connection, taken from and parked in the one upstream pool
//! ([`Upstreams`](crate::proxy::upstream::Upstreams)).
//!
//! Only HTTP/1.1 requests with no body or a `Content-Length` body up to
//! `replay_buffer_limit` take this path; the body is buffered, so a 401 is
//! replayed byte-identical after a refresh (`Expect: 100-continue` is
//! answered once the credentials are checked). Anything else (chunked or
//! large bodies, other expectations, `Upgrade`, HTTP/1.0, a head `httparse`
//! refuses, an upstream that speaks HTTP/2) hands the connection, with the
//! bytes read so far, to the hyper half, which serves it from there on.

use super::codec::{self, ChunkScanner, Framing, HeadEnd, RequestHead, RequestParse, ResponseHead};
use super::exchange::{may_resend, Half};
use super::{HttpProxy, LazyTimer, Rejection};
use crate::identity::ConnectionMemo;
use crate::proxy::line::BoxIo;
use crate::proxy::upstream::raw_alive;
use crate::token::{refusal, AccessToken, Refusal};
use bytes::{Buf, Bytes, BytesMut};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

/// Longest upstream response head accepted.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Bodies up to this size go out in the same write as their head.
const INLINE: usize = 16 * 1024;
/// Upstream bodies up to this size are read and dropped to keep the
/// connection after a refused (401) answer; larger ones close it.
const MAX_DISCARD: u64 = 64 * 1024;

/// How a connection left the native path.
pub enum Served {
    /// Closed, or the client left.
    Done,
    /// A request this path does not take: serve the connection with hyper
    /// from here on; the stream replays the bytes already read, and the
    /// memo carries the credentials the connection proved.
    Handover(BoxIo, ConnectionMemo),
}

/// The upstream connection of a client connection.
struct Up {
    io: BoxIo,
    buf: BytesMut,
    /// Responses it has carried.
    served: u32,
}

/// Why the native half stops short of an upstream answer.
enum Stop {
    /// A local answer.
    Local(Rejection),
    /// The request, and the connection, go to the hyper half (the
    /// upstream chose HTTP/2, or the body cannot be held for a replay).
    Hyper(&'static str),
}

impl From<Rejection> for Stop {
    fn from(r: Rejection) -> Stop {
        Stop::Local(r)
    }
}

#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    #[error("the upstream chose HTTP/2")]
    Http2,
    #[error("connecting to the upstream: {0}")]
    Connect(crate::tls::BoxError),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Malformed(#[from] codec::Malformed),
}

impl HttpProxy {
    /// Serves a client connection on the native path until it ends or a
    /// request needs the hyper half.
    pub async fn serve_h1(
        &self,
        io: BoxIo,
        peer: SocketAddr,
        mut shutdown: watch::Receiver<bool>,
        memo: ConnectionMemo,
    ) -> Served {
        let mut c = NativeConn {
            proxy: self,
            client: io,
            cbuf: BytesMut::with_capacity(8192),
            head_end: HeadEnd::default(),
            body: Bytes::new(),
            reservation: None,
            up: None,
            out: Vec::with_capacity(2048),
            reply: Vec::with_capacity(1024),
            idle: LazyTimer::new(tokio::time::Instant::now() + self.header_limit()),
            upstream_timer: None,
            answered: false,
        };
        let served = c.run(peer, &mut shutdown, memo).await;
        // Done or handed over: a clean upstream connection waits for the
        // next client connection (or for the hyper half's lane).
        if let Some(up) = c.up.take() {
            if up.buf.is_empty() {
                self.upstreams.checkin_raw(up.io);
            }
        }
        served
    }

    fn header_limit(&self) -> std::time::Duration {
        self.app.config.http.header_read_timeout
    }
}

struct NativeConn<'a> {
    proxy: &'a HttpProxy,
    client: BoxIo,
    cbuf: BytesMut,
    /// Where the request head in `cbuf` ends, found incrementally.
    head_end: HeadEnd,
    /// The current request's body (kept for a replay).
    body: Bytes,
    /// Its share of the replay budget.
    reservation: Option<super::Reservation>,
    up: Option<Up>,
    /// The upstream request head (kept for a replay); local answers.
    out: Vec<u8>,
    /// The client's copy of the upstream's response head.
    reply: Vec<u8>,
    idle: LazyTimer,
    upstream_timer: Option<LazyTimer>,
    /// Whether the client has been sent any of the current answer.
    answered: bool,
}

/// One request on the native half, as the exchange policy sees it.
struct NativeRequest<'c, 'a> {
    conn: &'c mut NativeConn<'a>,
    head: &'c RequestHead,
    /// The body has been taken from the client (all of it).
    body_read: bool,
}

impl Half for NativeRequest<'_, '_> {
    type Answer = ResponseHead;
    type Stop = Stop;

    async fn body(&mut self) -> Result<(), Stop> {
        let conn = &mut *self.conn;
        let proxy = conn.proxy;
        let declared = self.head.content_length;
        if declared > 0 {
            // Held for the replay: within the budget of all connections,
            // else the hyper half streams it without replay.
            conn.reservation = Some(
                proxy
                    .replay_budget
                    .reserve(declared)
                    .ok_or(Stop::Hyper("the replay buffers are full"))?,
            );
        }
        // At most the replay limit (a `usize`): larger ones went to hyper.
        let want = usize::try_from(declared).map_err(|_| Rejection::TooLarge)?;
        if conn.cbuf.len() < want && self.head.expect_continue {
            // The client waits for this before it sends the body.
            let sent = async {
                conn.client
                    .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                    .await?;
                conn.client.flush().await
            };
            if sent.await.is_err() {
                return Err(Rejection::ClientGone.into());
            }
        }
        let pace = proxy.body_pace();
        while conn.cbuf.len() < want {
            let due = pace.due(conn.cbuf.len() as u64);
            let left = (want - conn.cbuf.len()) as u64;
            reserve_body(&mut conn.cbuf, left);
            match timed(&mut conn.idle, due, conn.client.read_buf(&mut conn.cbuf)).await {
                Some(Ok(n)) if n > 0 => {}
                Some(_) => return Err(Rejection::ClientGone.into()),
                None => return Err(Rejection::BodyTimeout.into()),
            }
        }
        conn.body = conn.cbuf.split_to(want).freeze();
        self.body_read = true;
        Ok(())
    }

    fn replayable(&self) -> bool {
        true
    }

    fn ews_operation(&self) -> Option<super::ews_ops::Operation> {
        self.head
            .ews
            .then(|| super::ews_ops::operation(&self.conn.body))
    }

    async fn act_as(&mut self, _mailbox: &str) -> Result<(), Stop> {
        // The hyper half rewrites heads and bodies; nothing of the body
        // has been read yet, so the request goes there whole.
        Err(Stop::Hyper("an app-only identity's request is rewritten"))
    }

    async fn send(&mut self, token: &AccessToken) -> Result<ResponseHead, Stop> {
        let conn = &mut *self.conn;
        let due = tokio::time::Instant::now() + conn.proxy.upstream_timeout;
        let mut timer = conn
            .upstream_timer
            .take()
            .unwrap_or_else(|| LazyTimer::new(due));
        let result = timed(&mut timer, due, conn.exchange(token, self.head)).await;
        conn.upstream_timer = Some(timer);
        match result {
            Some(Ok(response)) => Ok(response),
            None => Err(Rejection::UpstreamTimeout.into()),
            Some(Err(ExchangeError::Http2)) => Err(Stop::Hyper("the upstream chose HTTP/2")),
            Some(Err(e)) => {
                tracing::warn!(error = %crate::token::idp::error_chain(&e), "upstream request failed");
                Err(Rejection::Upstream.into())
            }
        }
    }

    fn refusal(&self, answer: &ResponseHead) -> Option<Refusal> {
        if !matches!(answer.status, 401 | 403) {
            return None;
        }
        let head = self.conn.up.as_ref().map(|up| &up.buf[..answer.len])?;
        refusal::http(answer.status, |name| codec::header_value(head, name))
    }

    async fn discard(&mut self, answer: ResponseHead) {
        self.conn.discard_response(&answer).await;
    }

    fn status(answer: &ResponseHead) -> u16 {
        answer.status
    }

    fn rejection(stop: &Stop) -> Option<&Rejection> {
        match stop {
            Stop::Local(r) => Some(r),
            Stop::Hyper(_) => None,
        }
    }
}

impl NativeConn<'_> {
    async fn run(
        &mut self,
        peer: SocketAddr,
        shutdown: &mut watch::Receiver<bool>,
        memo: ConnectionMemo,
    ) -> Served {
        if *shutdown.borrow() {
            return Served::Done;
        }
        // A cheap probe between requests, and one waiter for the
        // connection's life (not one per request) to end an idle wait.
        let probe = shutdown.clone();
        let stopped = || probe.has_changed().unwrap_or(true);
        let mut stop = std::pin::pin!(shutdown.changed());
        let proxy = self.proxy;
        let limit = proxy.header_limit();
        let max_head = proxy.app.config.http.max_header_bytes.as_usize().max(1024);
        loop {
            // The request head, within the limit after the last answer.
            let due = tokio::time::Instant::now() + limit;
            self.head_end.reset();
            let head = loop {
                // Empty lines before a request line are ignored (RFC 9112
                // §2.2), so that they cannot make a head end early.
                let blank = codec::leading_empty_lines(&self.cbuf);
                if blank > 0 {
                    self.cbuf.advance(blank);
                    self.head_end.reset();
                }
                let end = self.head_end.find(&self.cbuf);
                if end.map_or(self.cbuf.len() >= max_head, |n| n > max_head) {
                    if self
                        .answer_local(Rejection::HeadTooLarge, true)
                        .await
                        .is_ok()
                    {
                        self.linger().await;
                    }
                    return Served::Done;
                }
                if let Some(len) = end {
                    match self.parse_request(len) {
                        RequestParse::Native(head) => break head,
                        RequestParse::Reject(why) => {
                            // Its body's length is unknown: close after.
                            if self
                                .answer_local(Rejection::BadRequest(why), true)
                                .await
                                .is_ok()
                            {
                                self.linger().await;
                            }
                            return Served::Done;
                        }
                        RequestParse::Fallback | RequestParse::Partial => {
                            return self.handover(Bytes::new(), memo)
                        }
                    }
                }
                if self.cbuf.is_empty() && stopped() {
                    return Served::Done;
                }
                reserve(&mut self.cbuf);
                let read = tokio::select! {
                    biased;
                    r = timed(&mut self.idle, due, self.client.read_buf(&mut self.cbuf)) => r,
                    _ = stop.as_mut(), if self.cbuf.is_empty() => return Served::Done,
                };
                match read {
                    Some(Ok(n)) if n > 0 => {}
                    _ => return Served::Done,
                }
            };
            let request = self.cbuf.split_to(head.len).freeze();
            let authorization = head.authorization.map(|(a, b)| request.slice(a..b));
            self.body = Bytes::new();
            self.reservation = None;
            let (result, body_read) = {
                let mut half = NativeRequest {
                    conn: self,
                    head: &head,
                    body_read: false,
                };
                let result = proxy
                    .exchange(&mut half, authorization.as_deref(), peer, &memo)
                    .await;
                (result, half.body_read)
            };
            let response = match result {
                Ok(response) => response,
                Err(Stop::Hyper(why)) => {
                    // The request (with what was read of its body) and the
                    // rest of the connection go through the hyper half.
                    tracing::debug!(why, "handing the connection to the hyper half");
                    let mut replay = BytesMut::with_capacity(request.len() + self.body.len());
                    replay.extend_from_slice(&request);
                    replay.extend_from_slice(&self.body);
                    return self.handover(replay.freeze(), memo);
                }
                Err(Stop::Local(Rejection::ClientGone)) => return Served::Done,
                Err(Stop::Local(rejection)) => {
                    // Refused before the body was needed: skip it when it
                    // is here, else close rather than wait for it.
                    let mut here = body_read;
                    if !here {
                        if let Ok(len) = usize::try_from(head.content_length) {
                            if self.cbuf.len() >= len {
                                self.cbuf.advance(len);
                                here = true;
                            }
                        }
                    }
                    match self.answer_local(rejection, head.close || !here).await {
                        Ok(true) => continue,
                        Ok(false) if !here => {
                            self.linger().await;
                            return Served::Done;
                        }
                        _ => return Served::Done,
                    }
                }
            };
            let close = head.close || response.framing == Framing::Close || stopped();
            self.answered = false;
            match self.relay(&response, close).await {
                Ok(()) if !close => {}
                Ok(()) => return Served::Done,
                Err(e) => {
                    // Before the client got anything it can still be told;
                    // after, cutting the connection is the only way to say
                    // the body is not whole.
                    tracing::warn!(error = %e, "relaying the upstream's answer failed");
                    self.up = None;
                    if !self.answered {
                        let _ = self.answer_local(Rejection::Upstream, true).await;
                    }
                    return Served::Done;
                }
            }
        }
    }

    /// Parses the complete request head of `len` bytes at the start of
    /// `cbuf`; for the native path, also writes the upstream request head
    /// (without the token and the final CRLF) into `out`.
    fn parse_request(&mut self, len: usize) -> RequestParse {
        let proxy = self.proxy;
        let parsed = codec::parse_request_head(
            &self.cbuf[..len],
            proxy.upstream.base_path.as_bytes(),
            proxy.upstream.host.as_bytes(),
            &mut self.out,
        );
        match parsed {
            RequestParse::Native(head)
                if head.content_length > proxy.replay_limit as u64
                    || head.content_length > proxy.max_body as u64 =>
            {
                RequestParse::Fallback
            }
            other => other,
        }
    }

    /// Gives the connection to the hyper half: `replay` (a request already
    /// taken from the buffer) and what was read after it come first.
    /// (The upstream connection is parked by [`HttpProxy::serve_h1`].)
    fn handover(&mut self, replay: Bytes, memo: ConnectionMemo) -> Served {
        let mut prefix = BytesMut::from(replay);
        prefix.extend_from_slice(&self.cbuf);
        let io = std::mem::replace(&mut self.client, Box::new(tokio::io::empty()));
        Served::Handover(
            Box::new(Rewind {
                prefix: prefix.freeze(),
                io,
            }),
            memo,
        )
    }

    /// Before closing on a client that may still be sending (a head over
    /// the limit, a body refused unread): says so with a FIN and drops what
    /// arrives for a moment, so that the client reads the answer instead of
    /// a reset (nginx's lingering close). At most 2 s and 1 MiB.
    async fn linger(&mut self) {
        let _ = self.client.shutdown().await;
        let drain = async {
            let mut sink = vec![0u8; 16 * 1024];
            let mut total = 0usize;
            while total < 1024 * 1024 {
                match self.client.read(&mut sink).await {
                    Ok(n) if n > 0 => total += n,
                    _ => break,
                }
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), drain).await;
    }

    /// Answers locally; `Ok(true)` when the connection stays open.
    async fn answer_local(&mut self, rejection: Rejection, close: bool) -> io::Result<bool> {
        let answer = rejection.into_local(&self.proxy.app);
        let close = close || answer.close;
        answer.write_h1(&mut self.out, close);
        self.client.write_all(&self.out).await?;
        self.client.flush().await?;
        Ok(!close)
    }

    /// Sends the request (the head in `out`, then `token` and the body)
    /// and reads the response head. A request that meets a closed
    /// connection is sent on another one; one that a reused connection
    /// lost after it was written is sent again as [`may_resend`] says.
    async fn exchange(
        &mut self,
        token: &AccessToken,
        head: &RequestHead,
    ) -> Result<ResponseHead, ExchangeError> {
        let upstreams = &self.proxy.upstreams;
        let body = &self.body;
        let head_len = self.out.len();
        self.out.extend_from_slice(token.bearer_header().as_bytes());
        self.out.extend_from_slice(b"\r\n\r\n");
        // Small bodies go in the same write as the head.
        let inline = body.len() <= INLINE;
        if inline {
            self.out.extend_from_slice(body);
        }
        let mut resent = false;
        let result = loop {
            let own = self
                .up
                .take()
                .filter(|up| up.buf.is_empty())
                .and_then(|mut up| raw_alive(&mut up.io).then_some(up));
            let (mut up, reused) = match own {
                Some(up) => {
                    let reused = up.served > 0;
                    (up, reused)
                }
                None => match upstreams.checkout_raw() {
                    Some(io) => (Up::new(io), true),
                    None => match Box::pin(upstreams.connect()).await {
                        Ok(Some(io)) => (Up::new(io), false),
                        Ok(None) => break Err(ExchangeError::Http2),
                        Err(e) => break Err(ExchangeError::Connect(e)),
                    },
                },
            };
            let sent = async {
                up.io.write_all(&self.out).await?;
                if !inline {
                    up.io.write_all(body).await?;
                }
                up.io.flush().await
            }
            .await;
            let answer = match sent {
                Ok(()) => read_response_head(&mut up, head.head_method, &mut self.reply).await,
                Err(e) => Err(ExchangeError::Io(e)),
            };
            match answer {
                Ok(Some(response)) => {
                    up.served += 1;
                    self.up = Some(up);
                    break Ok(response);
                }
                // Closed before any answer on a connection that had served
                // others: the keep-alive race.
                Ok(None) | Err(ExchangeError::Io(_))
                    if may_resend(head.idempotent, reused, resent) =>
                {
                    tracing::debug!(
                        "reused upstream connection lost the request; sending it again"
                    );
                    resent = true;
                    continue;
                }
                Ok(None) => {
                    break Err(ExchangeError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the upstream closed the connection without an answer",
                    )))
                }
                Err(e) => break Err(e),
            }
        };
        self.out.truncate(head_len);
        result
    }

    /// Reads and drops the body of `response` so the connection can carry
    /// the replay; closes it instead when that is not cheap.
    async fn discard_response(&mut self, response: &ResponseHead) {
        let Some(mut up) = self.up.take() else {
            return;
        };
        up.buf.advance(response.len);
        let keep = match response.framing {
            Framing::Empty => true,
            Framing::Length(n) if n <= MAX_DISCARD => {
                let n = n as usize;
                let mut ok = true;
                while up.buf.len() < n {
                    reserve(&mut up.buf);
                    if !matches!(up.io.read_buf(&mut up.buf).await, Ok(m) if m > 0) {
                        ok = false;
                        break;
                    }
                }
                if ok {
                    up.buf.advance(n);
                }
                ok
            }
            _ => false,
        };
        if keep && !response.close && up.buf.is_empty() {
            self.up = Some(up);
        }
    }

    /// Writes the response head (rewritten) and relays the body.
    async fn relay(&mut self, response: &ResponseHead, close: bool) -> io::Result<()> {
        let Some(mut up) = self.up.take() else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        codec::finish_response_head(&mut self.reply, close);
        up.buf.advance(response.len);
        let client = &mut self.client;
        let out = &mut self.reply;
        let answered = &mut self.answered;
        // Every read from the upstream and write to the client must make
        // progress within `http.body_idle_timeout`.
        let mut stall = Stall {
            timer: self
                .upstream_timer
                .get_or_insert_with(|| LazyTimer::new(tokio::time::Instant::now())),
            limit: self.proxy.app.config.http.body_idle_timeout,
        };
        let done = match response.framing {
            Framing::Empty => {
                *answered = true;
                stall.io(client.write_all(out)).await?;
                true
            }
            Framing::Length(n) => {
                let mut left = n;
                let now = (up.buf.len() as u64).min(left) as usize;
                *answered = true;
                if now <= INLINE {
                    out.extend_from_slice(&up.buf[..now]);
                    stall.io(client.write_all(out)).await?;
                } else {
                    stall.io(client.write_all(out)).await?;
                    stall.io(client.write_all(&up.buf[..now])).await?;
                }
                up.buf.advance(now);
                left -= now as u64;
                while left > 0 {
                    reserve_body(&mut up.buf, left);
                    if stall.io(up.io.read_buf(&mut up.buf)).await? == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    let now = (up.buf.len() as u64).min(left) as usize;
                    stall.io(client.write_all(&up.buf[..now])).await?;
                    up.buf.advance(now);
                    left -= now as u64;
                }
                true
            }
            Framing::Chunked => {
                let mut scan = ChunkScanner::default();
                let mut first = true;
                loop {
                    let end = scan
                        .scan(&up.buf)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    let now = end.unwrap_or(up.buf.len());
                    if first {
                        *answered = true;
                        out.extend_from_slice(&up.buf[..now]);
                        stall.io(client.write_all(out)).await?;
                        first = false;
                    } else if now > 0 {
                        stall.io(client.write_all(&up.buf[..now])).await?;
                    }
                    up.buf.advance(now);
                    if end.is_some() {
                        break;
                    }
                    reserve_body(&mut up.buf, scan.data_left());
                    if stall.io(up.io.read_buf(&mut up.buf)).await? == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                }
                true
            }
            Framing::Close => {
                *answered = true;
                stall.io(client.write_all(out)).await?;
                loop {
                    if !up.buf.is_empty() {
                        stall.io(client.write_all(&up.buf)).await?;
                        up.buf.clear();
                    }
                    reserve_body(&mut up.buf, u64::MAX);
                    if stall.io(up.io.read_buf(&mut up.buf)).await? == 0 {
                        break;
                    }
                }
                false
            }
        };
        stall.io(client.flush()).await?;
        if done && !response.close && up.buf.is_empty() {
            self.up = Some(up);
        }
        Ok(())
    }
}

/// The relay's guard against a body that stops moving: each I/O step must
/// finish within `limit` (one lazily re-armed timer for the connection).
struct Stall<'t> {
    timer: &'t mut LazyTimer,
    limit: std::time::Duration,
}

impl Stall<'_> {
    async fn io<T>(&mut self, step: impl Future<Output = io::Result<T>>) -> io::Result<T> {
        let due = tokio::time::Instant::now() + self.limit;
        timed(self.timer, due, step).await.unwrap_or_else(|| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the response body stalled",
            ))
        })
    }
}

impl Up {
    fn new(io: BoxIo) -> Up {
        Up {
            io,
            buf: BytesMut::with_capacity(8192),
            served: 0,
        }
    }
}

/// Reads the upstream's response head into `up.buf`, skipping interim
/// (1xx) responses. `Ok(None)`: the connection closed before any byte.
async fn read_response_head(
    up: &mut Up,
    head_request: bool,
    out: &mut Vec<u8>,
) -> Result<Option<ResponseHead>, ExchangeError> {
    let mut end = HeadEnd::default();
    loop {
        if let Some(len) = end.find(&up.buf) {
            match codec::parse_response_head(&up.buf[..len], head_request, out)? {
                Some(r) if (100..200).contains(&r.status) => {
                    if r.status == 101 {
                        return Err(codec::Malformed("101 to a request without Upgrade").into());
                    }
                    up.buf.advance(r.len);
                    end.reset();
                    continue;
                }
                Some(r) => return Ok(Some(r)),
                None => return Err(codec::Malformed("unparsable head").into()),
            }
        }
        if up.buf.len() >= MAX_RESPONSE_HEAD {
            return Err(codec::Malformed("response head too large").into());
        }
        reserve(&mut up.buf);
        if up.io.read_buf(&mut up.buf).await? == 0 {
            if up.buf.is_empty() {
                return Ok(None);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the upstream closed the connection inside a response head",
            )
            .into());
        }
    }
}

/// Room to read a head into, reusing the buffer's allocation once what was
/// split off it is gone, but not one that a large body made large: an idle
/// connection holds 8 KiB, not its largest body.
fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(8192);
        if buf.capacity() > 64 * 1024 && buf.len() <= 8192 {
            let mut fresh = BytesMut::with_capacity(8192);
            fresh.extend_from_slice(buf);
            *buf = fresh;
        }
    }
}

/// Room for a body of which `left` bytes are still to come: reads of up
/// to 64 KiB for large bodies.
fn reserve_body(buf: &mut BytesMut, left: u64) {
    let want = (left.min(64 * 1024) as usize).max(1024);
    if buf.capacity() - buf.len() < want {
        buf.reserve(want.max(8192));
    }
}

/// `work`, or `None` once `due` has passed on `timer` (see
/// [`LazyTimer::passed`]).
async fn timed<F: Future>(
    timer: &mut LazyTimer,
    due: tokio::time::Instant,
    work: F,
) -> Option<F::Output> {
    let mut work = std::pin::pin!(work);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = work.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        if timer.passed(due, cx) {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// A client stream that first replays bytes already read from it.
struct Rewind {
    prefix: Bytes,
    io: BoxIo,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut *self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}
