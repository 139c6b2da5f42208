//! The hyper half of the HTTP front end: HTTP/2 clients, an HTTP/2
//! upstream, and every HTTP/1.1 request the native half hands over
//! (chunked or large uploads, `Upgrade`, HTTP/1.0, ...). hyper does the
//! wire work on both sides; [`HyperRequest`] gives the shared exchange
//! policy (`exchange.rs`) its body, send and discard steps. HTTP/1.1
//! client connections reach an HTTP/1.1 upstream through their own
//! [`Lane`] (see [`crate::proxy::upstream`]); HTTP/2 clients, and every
//! client when the upstream chose HTTP/2, go through the shared pooled
//! client. Each client [`Connection`] also keeps what it last proved (a
//! keyed hash, so a keep-alive client's repeated header skips the
//! credential check) and its own lazily re-armed timers for the upstream
//! timeout and for request heads and idleness.

use super::codec;
use super::exchange::{may_resend, Half};
use super::soap::ImpersonationError;
use super::{
    full, prepare_upstream_headers, strip_hop_by_hop, HttpProxy, LazyTimer, Rejection, Reservation,
};
use crate::identity::ConnectionMemo;
use crate::proxy::upstream::{Lane, SendError};
use crate::tls::{BoxError, OutBody};
use crate::token::{refusal, AccessToken, Refusal};
use bytes::Bytes;
use futures_util::FutureExt as _;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

impl HttpProxy {
    /// The state of a new client connection, and its companion future: run
    /// it beside the client connection, which must end when it completes.
    /// It drives the connection's upstream lane and completes when the
    /// client has been idle, or slow to send a request head, for
    /// `http.header_read_timeout`. `memo` is what the connection proved
    /// before (on the native half, when it hands the connection over).
    pub fn connection(
        &self,
        memo: ConnectionMemo,
    ) -> (Arc<Connection>, impl std::future::Future<Output = ()>) {
        let limit = self.app.config.http.header_read_timeout;
        let body_idle = self.app.config.http.body_idle_timeout;
        let conn = Arc::new(Connection {
            lane: Lane::new(self.upstreams.clone()),
            memo,
            deadline: Deadline::default(),
            activity: Activity::new(),
        });
        let mut watchdog = LazyTimer::new(tokio::time::Instant::now() + limit);
        let companion = {
            let conn = conn.clone();
            std::future::poll_fn(move |cx| {
                conn.lane.poll_drive(cx);
                conn.activity
                    .poll_watch(&mut watchdog, limit, body_idle, cx)
            })
        };
        (conn, companion)
    }

    /// Handles one client request arriving on `conn`.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        conn: &Arc<Connection>,
    ) -> Result<Response<OutBody>, std::convert::Infallible> {
        conn.activity.begin(req.version());
        let response = match self.proxy(req, peer, conn).await {
            Ok(r) => r,
            Err(rejection) => {
                // A short local answer: the connection counts as idle from now.
                conn.activity.end();
                rejection.into_local(&self.app).into_response()
            }
        };
        Ok(response)
    }

    async fn proxy(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        conn: &Arc<Connection>,
    ) -> Result<Response<OutBody>, Rejection> {
        // An HTTP/2 client multiplexes requests: they share the pooled client.
        let h1 = (req.version() < http::Version::HTTP_2).then_some(&**conn);
        let (parts, body) = req.into_parts();
        let mut credentials = parts.headers.get_all(header::AUTHORIZATION).iter();
        let authorization = credentials.next().cloned();
        if credentials.next().is_some() {
            return Err(Rejection::BadRequest("more than one Authorization header"));
        }
        let uri = self.upstream_path(&parts.uri)?;
        let mut headers = parts.headers;
        prepare_upstream_headers(&mut headers);
        let mut half = HyperRequest {
            proxy: self,
            h1,
            idempotent: codec::idempotent(parts.method.as_str().as_bytes()),
            method: parts.method,
            uri,
            headers,
            incoming: Some(body),
            body: None,
            reservation: None,
        };
        let response = self
            .exchange(
                &mut half,
                authorization.as_ref().map(|v| v.as_bytes()),
                peer,
                &conn.memo,
            )
            .await?;
        Ok(self.respond(response, conn))
    }

    async fn read_body(
        &self,
        mut body: Incoming,
        headers: &HeaderMap,
    ) -> Result<(RequestBody, Option<Reservation>), Rejection> {
        if body.is_end_stream() {
            return Ok((RequestBody::Buffered(Bytes::new()), None));
        }
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| codec::parse_length(v.as_bytes()));
        if declared.is_some_and(|n| n > self.max_body as u64) {
            return Err(Rejection::TooLarge);
        }
        let stream = |prefix: VecDeque<Bytes>, body: Incoming| {
            Ok((
                RequestBody::Streaming(limited(prefix, body, self.max_body)),
                None,
            ))
        };
        if declared.is_some_and(|n| n > self.replay_limit as u64) {
            return stream(VecDeque::new(), body);
        }
        // Held for the replay within the budget of all connections; a body
        // of unknown length takes its share as it grows.
        let mut reservation = match self.replay_budget.reserve(declared.unwrap_or(0)) {
            Some(r) => r,
            None => return stream(VecDeque::new(), body),
        };
        // The first chunk is held apart: most bodies are one chunk, and an
        // empty VecDeque does not allocate.
        let mut first: Option<Bytes> = None;
        let mut more: VecDeque<Bytes> = VecDeque::new();
        let mut total = 0u64;
        let pace = self.body_pace();
        loop {
            // A small body has usually arrived with the head: take it
            // without arming a timer.
            let frame = match body.frame().now_or_never() {
                Some(frame) => frame,
                None => tokio::time::timeout_at(pace.due(total), body.frame())
                    .await
                    .map_err(|_| Rejection::BodyTimeout)?,
            };
            let frame = match frame {
                None => break,
                Some(Err(_)) => return Err(Rejection::ClientGone),
                Some(Ok(frame)) => frame,
            };
            if let Ok(data) = frame.into_data() {
                let n = data.len() as u64;
                total = total.saturating_add(n);
                if total > self.max_body as u64 {
                    return Err(Rejection::TooLarge);
                }
                let within = declared.is_some() || reservation.grow(n);
                match first {
                    None => first = Some(data),
                    Some(_) => more.push_back(data),
                }
                if total > self.replay_limit as u64 || !within {
                    more.extend(first.take());
                    more.rotate_right(1);
                    return stream(more, body);
                }
            }
        }
        let bytes = match (first, more.is_empty()) {
            (None, _) => Bytes::new(),
            (Some(only), true) => only,
            (Some(head), false) => {
                let mut buf = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
                buf.extend_from_slice(&head);
                for c in more {
                    buf.extend_from_slice(&c);
                }
                Bytes::from(buf)
            }
        };
        Ok((RequestBody::Buffered(bytes), Some(reservation)))
    }

    /// Sends `req` upstream within `http.upstream_timeout`: when the
    /// upstream speaks HTTP/1.1, on the lane of `h1` (the HTTP/1.1 client
    /// connection it came on), or on a connection of the pool for a client
    /// without one (HTTP/2); else over the shared HTTP/2 connection. `again` is
    /// sent when `req` was lost on a reused connection after it was written
    /// (`again` exists only for idempotent requests: see [`may_resend`]).
    async fn send(
        &self,
        h1: Option<&Connection>,
        req: Request<OutBody>,
        again: Option<Request<OutBody>>,
    ) -> Result<Response<Incoming>, Rejection> {
        let started = Instant::now();
        let lane = h1.map(|c| &c.lane);
        let upstreams = &self.upstreams;
        let send_h1 = |req: Request<OutBody>| async move {
            match lane {
                Some(lane) => lane.send(req).await,
                None => upstreams.send_once(req).await,
            }
        };
        let attempt = async {
            if upstreams.speaks_http2() {
                return self.send_shared(req).await;
            }
            match send_h1(req).await {
                Ok(response) => Ok(response),
                Err(SendError::Http2(req)) => self.send_shared(*req).await,
                Err(SendError::Failed { reused, error }) => {
                    let Some(again) = again.filter(|_| may_resend(true, reused, false)) else {
                        return Err(error.into());
                    };
                    tracing::debug!(error = %crate::token::idp::error_chain(&error), "reused upstream connection lost the request; sending it again");
                    match send_h1(again).await {
                        Err(SendError::Http2(req)) => self.send_shared(*req).await,
                        other => other.map_err(SendError::into_boxed),
                    }
                }
                Err(e) => Err(e.into_boxed()),
            }
        };
        let result = match h1 {
            Some(conn) => {
                conn.deadline
                    .within(started, self.upstream_timeout, attempt)
                    .await
            }
            None => tokio::time::timeout(self.upstream_timeout, attempt)
                .await
                .ok(),
        };
        match result {
            None => Err(Rejection::UpstreamTimeout),
            Some(Err(e)) => {
                tracing::warn!(error = %crate::token::idp::error_chain(&*e), "upstream request failed");
                Err(Rejection::Upstream)
            }
            Some(Ok(r)) => Ok(r),
        }
    }

    /// Sends over the shared HTTP/2 connection (absolute-form URI). Boxed:
    /// its future is large and not part of every request's.
    async fn send_shared(&self, mut req: Request<OutBody>) -> Result<Response<Incoming>, BoxError> {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.upstream.scheme.clone());
        parts.authority = Some(self.upstream.authority.clone());
        parts.path_and_query = req.uri().path_and_query().cloned();
        *req.uri_mut() = Uri::from_parts(parts)?;
        Box::pin(self.upstreams.send_h2(req)).await
    }

    fn respond(&self, response: Response<Incoming>, conn: &Arc<Connection>) -> Response<OutBody> {
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        conn.activity.progress();
        let body = Relayed {
            body,
            conn: conn.clone(),
        };
        Response::from_parts(parts, body.boxed_unsync())
    }
}

/// The header that routes an EWS request made with an app-only token.
const ANCHOR_MAILBOX: HeaderName = HeaderName::from_static("x-anchormailbox");

/// One request on the hyper half, as the exchange policy sees it.
struct HyperRequest<'a> {
    proxy: &'a HttpProxy,
    /// The HTTP/1.1 client connection it came on (its lane), if any.
    h1: Option<&'a Connection>,
    method: Method,
    idempotent: bool,
    uri: http::uri::PathAndQuery,
    headers: HeaderMap,
    incoming: Option<Incoming>,
    body: Option<RequestBody>,
    /// The buffered body's share of the replay budget.
    reservation: Option<Reservation>,
}

impl HyperRequest<'_> {
    fn build(&self, token: &AccessToken, body: OutBody) -> Request<OutBody> {
        let mut r = Request::new(body);
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = Uri::from(self.uri.clone());
        *r.headers_mut() = self.headers.clone();
        r.headers_mut()
            .insert(header::AUTHORIZATION, token.bearer_header().clone());
        r.headers_mut()
            .insert(header::HOST, self.proxy.upstream.host.clone());
        r
    }
}

impl Half for HyperRequest<'_> {
    type Answer = Response<Incoming>;
    type Stop = Rejection;

    async fn body(&mut self) -> Result<(), Rejection> {
        if let Some(incoming) = self.incoming.take() {
            let (body, reservation) = self.proxy.read_body(incoming, &self.headers).await?;
            self.body = Some(body);
            self.reservation = reservation;
        }
        Ok(())
    }

    fn replayable(&self) -> bool {
        matches!(self.body, Some(RequestBody::Buffered(_)))
    }

    fn ews_operation(&self) -> Option<super::ews_ops::Operation> {
        use super::ews_ops::{is_ews_path, operation, Operation};
        if self.method != Method::POST || !is_ews_path(self.uri.path()) {
            return None;
        }
        Some(match &self.body {
            Some(RequestBody::Buffered(bytes)) => operation(bytes),
            _ => Operation::other,
        })
    }

    async fn act_as(&mut self, mailbox: &str) -> Result<(), Rejection> {
        self.body().await?;
        let bytes = match self.body.take() {
            Some(RequestBody::Buffered(bytes)) => bytes,
            None => Bytes::new(),
            // Past the replay limit (or budget): it cannot be rewritten.
            Some(RequestBody::Streaming(_)) => return Err(Rejection::TooLargeToImpersonate),
        };
        let app = match super::soap::app_request(Some(mailbox), &bytes) {
            Ok(Some(app)) => app,
            Ok(None) => unreachable!("a mailbox was given"),
            Err(ImpersonationError::OtherMailbox { named }) => {
                tracing::warn!(mailbox, impersonated = %crate::names::Shown(&named), "refused: an app-only identity may act only as its own mailbox");
                return Err(Rejection::OtherMailbox(named));
            }
            Err(ImpersonationError::Malformed(why)) => {
                return Err(Rejection::MalformedEnvelope(format!(
                    "malformed SOAP envelope: {why}"
                )))
            }
            Err(ImpersonationError::NotSoap) => unreachable!("app_request sends it as it is"),
            Err(ImpersonationError::InvalidMailbox) => {
                tracing::error!(mailbox = %crate::names::Shown(mailbox), "the identity's mailbox cannot be named in X-AnchorMailbox or a SOAP header");
                return Err(Rejection::Misconfigured(
                    "the identity's mailbox is not valid: an administrator must correct it",
                ));
            }
        };
        self.headers.insert(ANCHOR_MAILBOX, app.anchor);
        let bytes = match app.body {
            None => bytes,
            Some(new) => {
                self.headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(new.len()));
                if let Some(r) = self.reservation.as_mut() {
                    // A few hundred bytes: within the budget or not, they
                    // are held only as long as the request.
                    let _ = r.grow(new.len().saturating_sub(bytes.len()) as u64);
                }
                Bytes::from(new)
            }
        };
        self.body = Some(RequestBody::Buffered(bytes));
        Ok(())
    }

    async fn send(&mut self, token: &AccessToken) -> Result<Response<Incoming>, Rejection> {
        let (request, again) = match self.body.take() {
            Some(RequestBody::Buffered(bytes)) => {
                let request = self.build(token, full(bytes.clone()));
                // For a request lost on a reused connection.
                let again = self
                    .idempotent
                    .then(|| self.build(token, full(bytes.clone())));
                self.body = Some(RequestBody::Buffered(bytes));
                (request, again)
            }
            // Sent once: the body goes with it.
            Some(RequestBody::Streaming(body)) => (self.build(token, body), None),
            None => (self.build(token, super::empty()), None),
        };
        self.proxy.send(self.h1, request, again).await
    }

    fn refusal(&self, answer: &Response<Incoming>) -> Option<Refusal> {
        let headers = answer.headers();
        refusal::http(answer.status().as_u16(), |name| {
            headers.get(name).map(|v| v.as_bytes())
        })
    }

    async fn discard(&mut self, answer: Response<Incoming>) {
        // Dropping an unread body lets hyper close or reuse the connection.
        drop(answer);
    }

    fn status(answer: &Response<Incoming>) -> u16 {
        answer.status().as_u16()
    }

    fn rejection(stop: &Rejection) -> Option<&Rejection> {
        Some(stop)
    }
}

/// What authswap keeps per client connection: its upstream lane, the
/// credentials it proved last, its upstream-timeout timer and whether a
/// request is in progress.
pub struct Connection {
    lane: Lane,
    memo: ConnectionMemo,
    deadline: Deadline,
    activity: Activity,
}

/// `http.header_read_timeout` for an HTTP/1.1 connection, in place of
/// hyper's, which allocates and registers a timer for every request head:
/// the connection is closed once it has been without a request in progress
/// (idle, or receiving a head that is not complete yet) for the limit. A
/// request is in progress from its head until its response body is done.
/// One lazily re-armed timer per connection. HTTP/2 connections are left
/// alone (their streams are not sequential; hyper's own settings apply).
struct Activity {
    born: Instant,
    busy: std::sync::atomic::AtomicBool,
    http2: std::sync::atomic::AtomicBool,
    /// Nanoseconds after `born` when the connection last became idle.
    idle_since: std::sync::atomic::AtomicU64,
    /// A response body is being relayed.
    relaying: std::sync::atomic::AtomicBool,
    /// Nanoseconds after `born` when the response body last moved.
    progress: std::sync::atomic::AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            born: Instant::now(),
            busy: Default::default(),
            http2: Default::default(),
            idle_since: Default::default(),
            relaying: Default::default(),
            progress: Default::default(),
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn begin(&self, version: http::Version) {
        use std::sync::atomic::Ordering::Relaxed;
        if version >= http::Version::HTTP_2 {
            self.http2.store(true, Relaxed);
        }
        self.busy.store(true, Relaxed);
    }

    /// The response body starts (or goes on) moving toward the client.
    fn progress(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.progress.store(self.now_ns(), Relaxed);
        self.relaying.store(true, Relaxed);
    }

    fn end(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.idle_since.store(self.now_ns(), Relaxed);
        self.relaying.store(false, Relaxed);
        self.busy.store(false, Relaxed);
    }

    /// Ready when the connection must close: idle (or slow to send a head)
    /// for `limit`, or a response body that made no progress, in either
    /// direction, for `body_idle`.
    fn poll_watch(
        &self,
        timer: &mut LazyTimer,
        limit: Duration,
        body_idle: Duration,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        use std::sync::atomic::Ordering::Relaxed;
        while timer.fired(cx) {
            if self.http2.load(Relaxed) {
                return Poll::Pending;
            }
            let now = Instant::now();
            let (since, limit) = if !self.busy.load(Relaxed) {
                (self.idle_since.load(Relaxed), limit)
            } else if self.relaying.load(Relaxed) {
                (self.progress.load(Relaxed), body_idle)
            } else {
                // Waiting for the upstream (its own timeout applies) or
                // reading a body (the body's pace applies).
                timer.reset(tokio::time::Instant::from_std(now + limit));
                continue;
            };
            let due = self.born + Duration::from_nanos(since) + limit;
            if now >= due {
                return Poll::Ready(());
            }
            timer.reset(tokio::time::Instant::from_std(due));
        }
        Poll::Pending
    }
}

/// An upstream response body on its way to the client; the connection's
/// request ends when it is done (or dropped).
struct Relayed {
    body: Incoming,
    conn: Arc<Connection>,
}

impl Body for Relayed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.body)
            .poll_frame(cx)
            .map_err(|e| -> BoxError { Box::new(e) });
        if polled.is_ready() {
            self.conn.activity.progress();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Relayed {
    fn drop(&mut self) {
        self.conn.activity.end();
    }
}

/// `http.upstream_timeout` for the requests of one HTTP/1.1 client
/// connection, which come one at a time: a single timer, armed at the first
/// request's due time. When it fires it either ends the request that has
/// run too long or moves to that request's due time, so a request costs a
/// clock read instead of inserting and removing a timer. (HTTP/2 requests
/// run concurrently in their own tasks and use a timer each.)
#[derive(Default)]
struct Deadline(std::sync::Mutex<Option<LazyTimer>>);

impl Deadline {
    /// `work`, or `None` once `limit` has passed since `started`.
    async fn within<T>(
        &self,
        started: Instant,
        limit: Duration,
        work: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        let due = tokio::time::Instant::from_std(started + limit);
        let mut work = std::pin::pin!(work);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(v) = work.as_mut().poll(cx) {
                return Poll::Ready(Some(v));
            }
            let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
            let timer = slot.get_or_insert_with(|| LazyTimer::new(due));
            if timer.passed(due, cx) {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await
    }
}

enum RequestBody {
    Buffered(Bytes),
    Streaming(OutBody),
}

/// A body that yields already-read chunks, then the rest of the client's
/// body, failing if the total exceeds `max`.
struct PrefixedBody {
    prefix: VecDeque<Bytes>,
    rest: Incoming,
    seen: usize,
    max: usize,
}

fn limited(prefix: VecDeque<Bytes>, rest: Incoming, max: usize) -> OutBody {
    let seen = prefix.iter().map(Bytes::len).sum();
    PrefixedBody {
        prefix,
        rest,
        seen,
        max,
    }
    .boxed_unsync()
}

impl Body for PrefixedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(chunk) = self.prefix.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        match Pin::new(&mut self.rest).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.seen += data.len();
                    if self.seen > self.max {
                        return Poll::Ready(Some(Err("request body too large".into())));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.rest.size_hint();
        let pre: u64 = self.prefix.iter().map(|b| b.len() as u64).sum();
        hint.set_lower(hint.lower() + pre);
        if let Some(u) = hint.upper() {
            hint.set_upper(u + pre);
        }
        hint
    }
}
