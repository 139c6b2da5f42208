//! The native HTTP/1.1 path of the HTTP front end: authswap's own relay for
//! the common request, the way nginx serves it. The request head is parsed
//! in place (`httparse`), its `Authorization: Basic` is checked, and the
//! head is written upstream with the hop-by-hop headers, `Host` and the
//! credentials replaced; the upstream's response head is rewritten the same
//! way and its body relayed byte for byte (content-length, chunked or
//! close-delimited). Both sides are served from the client connection's
//! task, with one upstream connection per client connection (parked in
//! [`Upstreams`](crate::proxy::upstream::Upstreams) when the client goes).
//!
//! Only HTTP/1.1 requests with no body or a `Content-Length` body up to
//! `replay_buffer_limit` take this path; the body is buffered, so a 401 is
//! replayed byte-identical after a refresh (`Expect: 100-continue` is
//! answered once the credentials are checked). Anything else (chunked or
//! large bodies, other expectations, `Upgrade`, HTTP/1.0, a head this
//! parser refuses, an upstream that speaks HTTP/2) hands the connection,
//! with the bytes read so far, to the hyper path, which serves it from
//! there on.

use super::{HttpProxy, LazyTimer, Rejection};
use crate::identity::ConnectionMemo;
use crate::metrics::{Outcome, Protocol};
use crate::proxy::line::BoxIo;
use crate::proxy::upstream::raw_alive;
use crate::token::{refusal, AccessToken, Verdict};
use bytes::{Buf, Bytes, BytesMut};
use http::Response;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

/// Most header fields in a request or response head (hyper's default).
const MAX_HEADERS: usize = 100;
/// Longest upstream response head accepted.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Longest chunk-size line (with extensions) or trailer line accepted.
const MAX_CHUNK_LINE: usize = 4096;
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
    /// from here on; the stream replays the bytes already read.
    Handover(BoxIo),
}

/// A parsed request head that the native path takes.
struct Head {
    len: usize,
    content_length: usize,
    /// `Authorization` value, as offsets into the head.
    authorization: Option<(usize, usize)>,
    close: bool,
    /// `Expect: 100-continue`: the client waits for an interim answer
    /// before it sends the body.
    expect_continue: bool,
    idempotent: bool,
    head_method: bool,
}

enum Parse {
    Partial,
    Native(Head),
    Fallback,
}

/// How an upstream response body is delimited (RFC 9112 §6.3).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    Close,
}

/// An upstream response head, read into the connection's buffer.
struct ResponseHead {
    status: u16,
    len: usize,
    framing: Framing,
    /// The upstream will close the connection after this response.
    close: bool,
}

/// The upstream connection of a client connection.
struct Up {
    io: BoxIo,
    buf: BytesMut,
    /// Responses it has carried.
    served: u32,
}

#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    #[error("the upstream chose HTTP/2")]
    Http2,
    #[error("connecting to the upstream: {0}")]
    Connect(crate::tls::BoxError),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("invalid response head from the upstream")]
    BadResponse,
}

impl HttpProxy {
    /// Serves a client connection on the native path until it ends or a
    /// request needs the hyper path.
    pub async fn serve_h1(
        &self,
        io: BoxIo,
        peer: SocketAddr,
        mut shutdown: watch::Receiver<bool>,
    ) -> Served {
        let mut c = NativeConn {
            proxy: self,
            client: io,
            cbuf: BytesMut::with_capacity(8192),
            up: None,
            out: Vec::with_capacity(2048),
            reply: Vec::with_capacity(1024),
            memo: ConnectionMemo::default(),
            idle: LazyTimer::new(tokio::time::Instant::now() + self.header_limit()),
            upstream_timer: None,
            answered: false,
        };
        let served = c.run(peer, &mut shutdown).await;
        // Done or handed over: a clean upstream connection waits for the
        // next client connection.
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
    up: Option<Up>,
    /// The upstream request head (kept for a replay); local answers.
    out: Vec<u8>,
    /// The client's copy of the upstream's response head.
    reply: Vec<u8>,
    memo: ConnectionMemo,
    idle: LazyTimer,
    upstream_timer: Option<LazyTimer>,
    /// Whether the client has been sent any of the current answer.
    answered: bool,
}

impl NativeConn<'_> {
    async fn run(&mut self, peer: SocketAddr, shutdown: &mut watch::Receiver<bool>) -> Served {
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
        'requests: loop {
            // The request head, within the limit after the last answer.
            let due = tokio::time::Instant::now() + limit;
            let head = loop {
                if !self.cbuf.is_empty() {
                    match self.parse_request() {
                        Parse::Native(head) if head.len <= max_head => break head,
                        Parse::Partial if self.cbuf.len() < max_head => {}
                        Parse::Native(_) | Parse::Partial => {
                            if self
                                .answer_local(Rejection::HeadTooLarge, true)
                                .await
                                .is_ok()
                            {
                                self.linger().await;
                            }
                            return Served::Done;
                        }
                        Parse::Fallback => return self.handover(Bytes::new()),
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
            // Which protocol the upstream picks is learnt on its first
            // connection: before this request is acted on, so that an
            // HTTP/2 upstream gets it through the hyper path, untouched.
            if self.up.is_none() && !proxy.upstreams.speaks_http1() {
                match Box::pin(proxy.upstreams.connect()).await {
                    Ok(Some(io)) => self.up = Some(Up::new(io)),
                    Ok(None) => return self.handover(request),
                    // Reported when the request is sent.
                    Err(_) => {}
                }
            }
            let authorization = head.authorization.map(|(a, b)| &request[a..b]);
            let checked = match proxy.identify(authorization, peer, &self.memo).await {
                Ok(identity) => match proxy.token(&identity).await {
                    Ok(token) => Ok((identity, token)),
                    Err(rejection) => Err(rejection),
                },
                Err(rejection) => Err(rejection),
            };
            let (identity, token) = match checked {
                Ok(v) => v,
                Err(rejection) => {
                    // Refused before the body was needed: skip it when it
                    // is here, else close rather than wait for it.
                    let here = self.cbuf.len() >= head.content_length;
                    if here {
                        self.cbuf.advance(head.content_length);
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
            // The body (at most the replay limit), at the pace the head had
            // to keep; a client waiting for 100 Continue is sent it.
            if self.cbuf.len() < head.content_length {
                if head.expect_continue {
                    let sent = async {
                        self.client
                            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                            .await?;
                        self.client.flush().await
                    };
                    if sent.await.is_err() {
                        return Served::Done;
                    }
                }
                self.cbuf.reserve(head.content_length - self.cbuf.len());
            }
            while self.cbuf.len() < head.content_length {
                let due = tokio::time::Instant::now() + limit;
                match timed(&mut self.idle, due, self.client.read_buf(&mut self.cbuf)).await {
                    Some(Ok(n)) if n > 0 => {}
                    Some(_) => return Served::Done,
                    None => {
                        let _ = self.answer_local(Rejection::BodyTimeout, true).await;
                        return Served::Done;
                    }
                }
            }
            let body = self.cbuf.split_to(head.content_length).freeze();

            let started = Instant::now();
            let mut response = self.exchange_timed(&token, &body, &head, started).await;
            let mut token = token;
            let mut retried = false;
            while let Ok(r) = &response {
                let verdict = match self.refusal(&identity, &token, r) {
                    None | Some(Verdict::PassThrough) => break,
                    Some(verdict) => verdict,
                };
                // The refused answer is dropped either way.
                self.discard_response(r).await;
                let rejection = match verdict {
                    Verdict::Retry if !retried => {
                        // Refresh, then replay the same bytes once.
                        retried = true;
                        match proxy.token(&identity).await {
                            Ok(new) => {
                                token = new;
                                let started = Instant::now();
                                response = self.exchange_timed(&token, &body, &head, started).await;
                                continue;
                            }
                            Err(rejection) => rejection,
                        }
                    }
                    Verdict::Backoff { retry_after } => {
                        proxy.refused_fresh(&identity, Some(retry_after))
                    }
                    // Refused again after this request's one refresh.
                    Verdict::Retry | Verdict::PassThrough => proxy.refused_fresh(&identity, None),
                };
                match self.answer_local(rejection, head.close).await {
                    Ok(true) => continue 'requests,
                    _ => return Served::Done,
                }
            }
            let response = match response {
                Ok(r) => r,
                Err(None) => {
                    self.up = None;
                    match self
                        .answer_local(Rejection::UpstreamTimeout, head.close)
                        .await
                    {
                        Ok(true) => continue,
                        _ => return Served::Done,
                    }
                }
                Err(Some(ExchangeError::Http2)) => {
                    // Learnt on this request: it and the rest of the
                    // connection go through the shared HTTP/2 client.
                    let mut replay = BytesMut::with_capacity(request.len() + body.len());
                    replay.extend_from_slice(&request);
                    replay.extend_from_slice(&body);
                    return self.handover(replay.freeze());
                }
                Err(Some(e)) => {
                    self.up = None;
                    tracing::warn!(error = %crate::token::idp::error_chain(&e), "upstream request failed");
                    match self.answer_local(Rejection::Upstream, head.close).await {
                        Ok(true) => continue,
                        _ => return Served::Done,
                    }
                }
            };
            proxy
                .app
                .metrics
                .request(Protocol::http, Outcome::forwarded);
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

    /// Parses the request head at the start of `cbuf`; for the native path,
    /// also writes the upstream request head (without `Authorization` and
    /// the final CRLF) into `out`.
    fn parse_request(&mut self) -> Parse {
        let proxy = self.proxy;
        let parsed = parse_request_head(
            &self.cbuf,
            proxy.upstream.base_path.as_bytes(),
            proxy.upstream.host.as_bytes(),
            &mut self.out,
        );
        match parsed {
            Parse::Native(head)
                if head.content_length > proxy.replay_limit
                    || head.content_length > proxy.max_body =>
            {
                Parse::Fallback
            }
            other => other,
        }
    }

    /// Gives the connection to the hyper path: `replay` (a request already
    /// taken from the buffer) and what was read after it come first.
    /// (The upstream connection is parked by [`HttpProxy::serve_h1`].)
    fn handover(&mut self, replay: Bytes) -> Served {
        let mut prefix = BytesMut::from(replay);
        prefix.extend_from_slice(&self.cbuf);
        let io = std::mem::replace(&mut self.client, Box::new(tokio::io::empty()));
        Served::Handover(Box::new(Rewind {
            prefix: prefix.freeze(),
            io,
        }))
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
        let response: Response<Bytes> = rejection.into_local(&self.proxy.app);
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(response.status().as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(
            response
                .status()
                .canonical_reason()
                .unwrap_or("")
                .as_bytes(),
        );
        out.extend_from_slice(b"\r\n");
        for (name, value) in response.headers() {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(response.body().len().to_string().as_bytes());
        if close {
            out.extend_from_slice(b"\r\nconnection: close");
        }
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(response.body());
        self.client.write_all(out).await?;
        self.client.flush().await?;
        Ok(!close)
    }

    /// [`Self::exchange`] within `http.upstream_timeout` of `started`
    /// (`Err(None)` when it ran out), timed in the upstream metric.
    async fn exchange_timed(
        &mut self,
        token: &AccessToken,
        body: &Bytes,
        head: &Head,
        started: Instant,
    ) -> Result<ResponseHead, Option<ExchangeError>> {
        let proxy = self.proxy;
        let due = tokio::time::Instant::from_std(started + proxy.upstream_timeout);
        let mut timer = self
            .upstream_timer
            .take()
            .unwrap_or_else(|| LazyTimer::new(due));
        let result = timed(&mut timer, due, self.exchange(token, body, head)).await;
        self.upstream_timer = Some(timer);
        proxy
            .app
            .metrics
            .upstream_duration(Protocol::http, started.elapsed().as_secs_f64());
        match result {
            None => Err(None),
            Some(r) => r.map_err(Some),
        }
    }

    /// Sends the request (the head in `out`, then `token` and `body`) and
    /// reads the response head. A request that meets a closed connection is
    /// sent on another one; one that a reused connection lost after it was
    /// written is sent again only when repeating it is harmless (RFC 9110
    /// §9.2.2).
    async fn exchange(
        &mut self,
        token: &AccessToken,
        body: &Bytes,
        head: &Head,
    ) -> Result<ResponseHead, ExchangeError> {
        let upstreams = &self.proxy.upstreams;
        let head_len = self.out.len();
        self.out.extend_from_slice(token.bearer_header().as_bytes());
        self.out.extend_from_slice(b"\r\n\r\n");
        // Small bodies go in the same write as the head.
        let inline = body.len() <= INLINE;
        if inline {
            self.out.extend_from_slice(body);
        }
        let mut fresh_tried = false;
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
                    if reused && head.idempotent && !fresh_tried =>
                {
                    tracing::debug!(
                        "reused upstream connection lost the request; sending it again"
                    );
                    fresh_tried = true;
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

    /// Applies the refusal policy to an upstream answer (see
    /// [`HttpProxy::refused`]); the head is parsed again only for the
    /// statuses that can be refusals.
    fn refusal(
        &self,
        identity: &crate::identity::Identity,
        token: &AccessToken,
        response: &ResponseHead,
    ) -> Option<Verdict> {
        let proxy = self.proxy;
        let tokens = &proxy.app.tokens;
        let refusal = match response.status {
            401 | 403 => {
                let head = self.up.as_ref().map(|up| &up.buf[..response.len]);
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut parsed = httparse::Response::new(&mut headers);
                if let Some(head) = head {
                    let _ = parsed.parse(head);
                }
                refusal::http(response.status, |name| {
                    parsed
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| h.value)
                })
            }
            _ => None,
        };
        match refusal {
            None => {
                tokens.accepted(identity, &proxy.scopes, token);
                None
            }
            Some(refusal) => {
                Some(tokens.refused(identity, &proxy.scopes, token, Protocol::http, &refusal))
            }
        }
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
        finish_response_head(&mut self.reply, close);
        up.buf.advance(response.len);
        let client = &mut self.client;
        let out = &mut self.reply;
        let answered = &mut self.answered;
        let done = match response.framing {
            Framing::Empty => {
                *answered = true;
                client.write_all(out).await?;
                true
            }
            Framing::Length(n) => {
                let mut left = n;
                let now = (up.buf.len() as u64).min(left) as usize;
                *answered = true;
                if now <= INLINE {
                    out.extend_from_slice(&up.buf[..now]);
                    client.write_all(out).await?;
                } else {
                    client.write_all(out).await?;
                    client.write_all(&up.buf[..now]).await?;
                }
                up.buf.advance(now);
                left -= now as u64;
                while left > 0 {
                    reserve_body(&mut up.buf, left);
                    if up.io.read_buf(&mut up.buf).await? == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    let now = (up.buf.len() as u64).min(left) as usize;
                    client.write_all(&up.buf[..now]).await?;
                    up.buf.advance(now);
                    left -= now as u64;
                }
                true
            }
            Framing::Chunked => {
                let mut scan = ChunkScanner::default();
                let mut first = true;
                loop {
                    let end = scan.scan(&up.buf)?;
                    let now = end.unwrap_or(up.buf.len());
                    if first {
                        *answered = true;
                        out.extend_from_slice(&up.buf[..now]);
                        client.write_all(out).await?;
                        first = false;
                    } else if now > 0 {
                        client.write_all(&up.buf[..now]).await?;
                    }
                    up.buf.advance(now);
                    if end.is_some() {
                        break;
                    }
                    reserve_body(&mut up.buf, scan.left);
                    if up.io.read_buf(&mut up.buf).await? == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                }
                true
            }
            Framing::Close => {
                *answered = true;
                client.write_all(out).await?;
                loop {
                    if !up.buf.is_empty() {
                        client.write_all(&up.buf).await?;
                        up.buf.clear();
                    }
                    reserve_body(&mut up.buf, u64::MAX);
                    if up.io.read_buf(&mut up.buf).await? == 0 {
                        break;
                    }
                }
                false
            }
        };
        client.flush().await?;
        if done && !response.close && up.buf.is_empty() {
            self.up = Some(up);
        }
        Ok(())
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

/// Parses the request head at the start of `buf`; when the native path can
/// take it, also writes the upstream's request head into `out`: the request
/// line with `base_path` before the target, the fields minus hop-by-hop
/// ones, `Host` and `Authorization`, then `host: <host>` and the start of
/// the `Authorization` line (the token and the final CRLF are the
/// caller's).
fn parse_request_head(buf: &[u8], base_path: &[u8], host: &[u8], out: &mut Vec<u8>) -> Parse {
    // Uninitialised: zeroing 100 slots would cost more than parsing.
    let mut headers =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(_) => return Parse::Fallback,
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Parse::Fallback;
    };
    if method == "CONNECT" || !path.starts_with('/') {
        return Parse::Fallback;
    }
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(base_path);
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut content_length: Option<usize> = None;
    let mut authorization = None;
    let mut close = false;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        match request_header(name) {
            ReqHeader::Authorization => {
                let start = offset(buf, h.value);
                authorization = Some((start, start + h.value.len()));
                continue;
            }
            ReqHeader::Drop => continue,
            ReqHeader::Fallback => return Parse::Fallback,
            ReqHeader::Expect => {
                // The only expectation there is (RFC 9110 §10.1.1);
                // hyper's path answers others with 417.
                if !h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue") {
                    return Parse::Fallback;
                }
                expect_continue = true;
                continue;
            }
            ReqHeader::Connection => {
                for token in h.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                        // Names more hop-by-hop headers: hyper's path
                        // strips them.
                        return Parse::Fallback;
                    }
                }
                continue;
            }
            ReqHeader::ContentLength => {
                let Some(n) = parse_decimal(h.value) else {
                    return Parse::Fallback;
                };
                if content_length.is_some_and(|m| m != n) {
                    return Parse::Fallback;
                }
                if content_length.replace(n).is_some() {
                    continue;
                }
            }
            ReqHeader::Keep => {}
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    let content_length = content_length.unwrap_or(0);
    out.extend_from_slice(b"host: ");
    out.extend_from_slice(host);
    out.extend_from_slice(b"\r\nauthorization: ");
    let idempotent = matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    );
    Parse::Native(Head {
        len,
        content_length,
        authorization,
        close,
        expect_continue,
        idempotent,
        head_method: method == "HEAD",
    })
}

/// Rewrites a complete request head for the upstream as the native
/// HTTP/1.1 path does (see `parse_request_head`); the head's length, or
/// `None` when the native path would not take it. For the hot-path
/// benchmark.
#[doc(hidden)]
pub fn rewrite_request_head(
    buf: &[u8],
    base_path: &str,
    host: &str,
    out: &mut Vec<u8>,
) -> Option<usize> {
    match parse_request_head(buf, base_path.as_bytes(), host.as_bytes(), out) {
        Parse::Native(head) => Some(head.len),
        _ => None,
    }
}

/// Reads the upstream's response head into `up.buf`, skipping interim
/// (1xx) responses. `Ok(None)`: the connection closed before any byte.
async fn read_response_head(
    up: &mut Up,
    head_request: bool,
    out: &mut Vec<u8>,
) -> Result<Option<ResponseHead>, ExchangeError> {
    loop {
        if !up.buf.is_empty() {
            match parse_response(&up.buf, head_request, out)? {
                Some(r) if (100..200).contains(&r.status) => {
                    if r.status == 101 {
                        return Err(ExchangeError::BadResponse);
                    }
                    up.buf.advance(r.len);
                    continue;
                }
                Some(r) => return Ok(Some(r)),
                None if up.buf.len() >= MAX_RESPONSE_HEAD => {
                    return Err(ExchangeError::BadResponse)
                }
                None => {}
            }
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

/// Parses a response head (`None` when incomplete) and writes the
/// client's copy of it into `out`, all but its end (see
/// [`finish_response_head`]): an HTTP/1.1 status line with the upstream's
/// code and reason, and the upstream's fields minus the hop-by-hop ones
/// (and those its `Connection` names), keeping `Transfer-Encoding` (the
/// body is relayed as framed) but not a `Content-Length` beside it.
fn parse_response(
    buf: &[u8],
    head_request: bool,
    out: &mut Vec<u8>,
) -> Result<Option<ResponseHead>, ExchangeError> {
    let mut headers =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut res,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(ExchangeError::BadResponse),
    };
    let status = res.code.ok_or(ExchangeError::BadResponse)?;
    let http10 = res.version == Some(0);
    let mut length: Option<u64> = None;
    let mut chunked = None;
    let mut close = http10;
    // Fields the upstream's `Connection` names, beyond close/keep-alive.
    let mut named: Vec<&[u8]> = Vec::new();
    for h in res.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = parse_decimal(h.value).ok_or(ExchangeError::BadResponse)? as u64;
            if length.is_some_and(|m| m != n) {
                return Err(ExchangeError::BadResponse);
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // The last coding decides.
            let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    if http10 {
                        close = false;
                    }
                } else if !token.is_empty() {
                    named.push(token);
                }
            }
        }
    }
    let framing = if head_request || (100..200).contains(&status) || status == 204 || status == 304
    {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::Close,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::Close,
        }
    };
    if framing == Framing::Close {
        close = true;
    }

    // "HTTP/1.x" becomes "HTTP/1.1"; the code and reason stay as sent.
    let line = buf[..len]
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(ExchangeError::BadResponse)?;
    let line = buf[..line].strip_suffix(b"\r").unwrap_or(&buf[..line]);
    out.clear();
    out.extend_from_slice(b"HTTP/1.1");
    out.extend_from_slice(line.get(8..).ok_or(ExchangeError::BadResponse)?);
    out.extend_from_slice(b"\r\n");
    // With a transfer coding the length is not the message's (RFC 9112
    // §6.3): passing both on would invite request smuggling downstream.
    let coded = chunked.is_some();
    for h in res.headers.iter() {
        let name = h.name.as_bytes();
        if response_hop_by_hop(name)
            || (coded && name.eq_ignore_ascii_case(b"content-length"))
            || named.iter().any(|n| n.eq_ignore_ascii_case(name))
        {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    Ok(Some(ResponseHead {
        status,
        len,
        framing,
        close,
    }))
}

/// Ends the client's copy of a response head, with `connection: close`
/// when the client connection ends after it.
fn finish_response_head(out: &mut Vec<u8>, close: bool) {
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn response_hop_by_hop(name: &[u8]) -> bool {
    const NAMES: [&[u8]; 7] = [
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"upgrade",
    ];
    NAMES.iter().any(|n| n.eq_ignore_ascii_case(name))
}

enum ReqHeader {
    Keep,
    Drop,
    Authorization,
    Connection,
    ContentLength,
    Expect,
    Fallback,
}

/// What the native path does with a request header field.
fn request_header(name: &[u8]) -> ReqHeader {
    let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
    // Cheap first test: most fields are none of these.
    match name.len() {
        4 if is(b"host") => ReqHeader::Drop,
        2 if is(b"te") => ReqHeader::Drop,
        6 if is(b"expect") => ReqHeader::Expect,
        7 if is(b"upgrade") => ReqHeader::Fallback,
        7 if is(b"trailer") => ReqHeader::Drop,
        10 if is(b"connection") => ReqHeader::Connection,
        10 if is(b"keep-alive") => ReqHeader::Drop,
        13 if is(b"authorization") => ReqHeader::Authorization,
        14 if is(b"content-length") => ReqHeader::ContentLength,
        17 if is(b"transfer-encoding") => ReqHeader::Fallback,
        18 if is(b"proxy-authenticate") => ReqHeader::Drop,
        19 if is(b"proxy-authorization") => ReqHeader::Drop,
        _ => ReqHeader::Keep,
    }
}

/// A strict decimal (digits only, no sign, no overflow).
fn parse_decimal(v: &[u8]) -> Option<usize> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 18 {
        return None;
    }
    v.iter().try_fold(0usize, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + usize::from(b - b'0'))
    })
}

fn offset(base: &[u8], part: &[u8]) -> usize {
    part.as_ptr() as usize - base.as_ptr() as usize
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

/// Finds the end of a chunked body (RFC 9112 §7.1) in the bytes relayed so
/// far, without changing them.
#[derive(Default)]
struct ChunkScanner {
    state: Chunk,
    /// Data bytes left in the current chunk.
    left: u64,
    /// Length of the current size or trailer line.
    line: usize,
}

#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
enum Chunk {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// Start of a trailer line (an empty one ends the body).
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

impl ChunkScanner {
    /// Scans `buf` (the bytes after those already scanned); `Some(n)` when
    /// the body ends after `n` of them.
    fn scan(&mut self, buf: &[u8]) -> io::Result<Option<usize>> {
        let bad = |what: &str| {
            io::Error::new(io::ErrorKind::InvalidData, format!("chunked body: {what}"))
        };
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            match self.state {
                Chunk::Size => {
                    self.line += 1;
                    match b {
                        b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                            let digit = (b as char).to_digit(16).unwrap_or(0) as u64;
                            self.left = self
                                .left
                                .checked_mul(16)
                                .and_then(|v| v.checked_add(digit))
                                .ok_or_else(|| bad("size too large"))?;
                        }
                        b';' | b' ' | b'\t' if self.line > 1 => self.state = Chunk::Extension,
                        b'\r' if self.line > 1 => self.state = Chunk::SizeLf,
                        _ => return Err(bad("invalid size")),
                    }
                }
                Chunk::Extension => {
                    self.line += 1;
                    if b == b'\r' {
                        self.state = Chunk::SizeLf;
                    } else if b == b'\n' {
                        return Err(bad("bare LF"));
                    }
                }
                Chunk::SizeLf => {
                    if b != b'\n' {
                        return Err(bad("size line"));
                    }
                    self.line = 0;
                    self.state = if self.left == 0 {
                        Chunk::TrailerStart
                    } else {
                        Chunk::Data
                    };
                }
                Chunk::Data => {
                    let take = (self.left.min((buf.len() - i) as u64)) as usize;
                    self.left -= take as u64;
                    i += take;
                    if self.left == 0 {
                        self.state = Chunk::DataCr;
                    }
                    continue;
                }
                Chunk::DataCr => {
                    if b != b'\r' {
                        return Err(bad("missing CRLF after data"));
                    }
                    self.state = Chunk::DataLf;
                }
                Chunk::DataLf => {
                    if b != b'\n' {
                        return Err(bad("missing CRLF after data"));
                    }
                    self.state = Chunk::Size;
                }
                Chunk::TrailerStart => {
                    self.line = 1;
                    self.state = if b == b'\r' {
                        Chunk::EndLf
                    } else {
                        Chunk::Trailer
                    };
                }
                Chunk::Trailer => {
                    self.line += 1;
                    if b == b'\r' {
                        self.state = Chunk::TrailerLf;
                    }
                }
                Chunk::TrailerLf => {
                    if b != b'\n' {
                        return Err(bad("trailer line"));
                    }
                    self.state = Chunk::TrailerStart;
                }
                Chunk::EndLf => {
                    if b != b'\n' {
                        return Err(bad("last chunk"));
                    }
                    self.state = Chunk::Done;
                    return Ok(Some(i + 1));
                }
                Chunk::Done => return Ok(Some(i)),
            }
            if self.line > MAX_CHUNK_LINE {
                return Err(bad("line too long"));
            }
            i += 1;
        }
        Ok((self.state == Chunk::Done).then_some(buf.len()))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(body: &[u8], step: usize) -> io::Result<Option<usize>> {
        let mut s = ChunkScanner::default();
        let mut at = 0;
        while at < body.len() {
            let end = (at + step).min(body.len());
            if let Some(n) = s.scan(&body[at..end])? {
                return Ok(Some(at + n));
            }
            at = end;
        }
        Ok(None)
    }

    #[test]
    fn chunked_bodies_end_where_they_end_whatever_the_reads() {
        let body = b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nx-sum: 1\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, 100] {
            assert_eq!(
                scan_all(body, step).unwrap(),
                Some(body.len() - 4),
                "step {step}"
            );
        }
        assert_eq!(scan_all(b"0\r\n\r\n", 1).unwrap(), Some(5));
        assert_eq!(scan_all(b"5\r\nhel", 1).unwrap(), None);
        for broken in [&b"g\r\n"[..], b"5\r\nhelloXY", b"\r\n", b"5\nhello"] {
            assert!(scan_all(broken, 1).is_err(), "{broken:?}");
        }
        let long = format!("1;{}\r\n", "x".repeat(MAX_CHUNK_LINE + 1));
        assert!(scan_all(long.as_bytes(), 64).is_err());
        assert!(scan_all(b"fffffffffffffffffff\r\n", 4).is_err());
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let f = |head: &str, head_req: bool| {
            parse_response(head.as_bytes(), head_req, &mut Vec::new())
                .ok()
                .flatten()
                .map(|r| (r.framing, r.close))
        };
        assert_eq!(
            f("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false),
            Some((Framing::Length(5), false))
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true),
            Some((Framing::Empty, false))
        );
        assert_eq!(
            f(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 5\r\n\r\n",
                false
            ),
            Some((Framing::Chunked, false))
        );
        assert_eq!(
            f(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
                false
            ),
            Some((Framing::Close, true))
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\n\r\n", false),
            Some((Framing::Close, true))
        );
        assert_eq!(
            f("HTTP/1.1 204 No Content\r\n\r\n", false),
            Some((Framing::Empty, false))
        );
        assert_eq!(
            f("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", false),
            Some((Framing::Length(1), true))
        );
        assert_eq!(
            f(
                "HTTP/1.0 200 OK\r\ncontent-length: 1\r\nconnection: keep-alive\r\n\r\n",
                false
            ),
            Some((Framing::Length(1), false))
        );
        assert_eq!(
            f(
                "HTTP/1.1 200 OK\r\ncontent-length: 1\r\nconnection: close\r\n\r\n",
                false
            ),
            Some((Framing::Length(1), true))
        );
        assert_eq!(f("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n", false), None);
        let mut out = Vec::new();
        assert!(parse_response(
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            false,
            &mut out
        )
        .is_err());
        assert!(parse_response(
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            false,
            &mut out
        )
        .is_err());
    }

    #[test]
    fn response_heads_lose_hop_by_hop_fields() {
        let mut out = Vec::new();
        let head = b"HTTP/1.0 200 Fine\r\nConnection: x-private, keep-alive\r\nX-Private: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\nX-Kept: yes\r\n\r\n";
        let r = parse_response(head, false, &mut out).unwrap().unwrap();
        assert_eq!(
            (r.len, r.framing, r.close),
            (head.len(), Framing::Chunked, false)
        );
        finish_response_head(&mut out, true);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 Fine\r\nTransfer-Encoding: chunked\r\nX-Kept: yes\r\nconnection: close\r\n\r\n"
        );
    }

    #[test]
    fn decimals_are_strict() {
        assert_eq!(parse_decimal(b" 42 "), Some(42));
        for bad in [
            &b""[..],
            b"+1",
            b"-1",
            b"1e3",
            b"0x10",
            b"99999999999999999999",
        ] {
            assert_eq!(parse_decimal(bad), None, "{bad:?}");
        }
    }
}
