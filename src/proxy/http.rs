//! The HTTP front end (EWS and any HTTPS API): `Authorization: Basic` from the
//! legacy client becomes `Authorization: Bearer` toward the upstream. Bodies
//! up to `replay_buffer_limit` are buffered so a request refused with 401 can
//! be replayed byte-identical once after a refresh; larger bodies stream.
//! Every other upstream answer (throttling included) passes through.
//! HTTP/1.1 client connections start on the native relay (`http/h1.rs`), which
//! takes the common request and hands the connection to the hyper-based
//! path here for anything else. On this path, HTTP/1.1 client connections
//! reach an HTTP/1.1 upstream through their own
//! [`Lane`] (see [`super::upstream`]); HTTP/2 clients, and every client when
//! the upstream chose HTTP/2, go through the shared pooled client. Each
//! client [`Connection`] also keeps what it last proved (a keyed hash, so a
//! keep-alive client's repeated header skips the credential check) and its
//! own lazily re-armed timers for the upstream timeout and for request
//! heads and idleness.

mod h1;

pub use h1::{rewrite_request_head, Served};

use super::upstream::{Lane, SendError, Upstreams};
use crate::app::App;
use crate::identity::{AuthError, ConnectionMemo};
use crate::metrics::{FailureReason, Outcome, Protocol};
use crate::tls::{BoxError, OutBody};
use crate::token::{refusal, AccessToken, Scopes, TokenError, Verdict};
use base64::Engine as _;
use bytes::Bytes;
use futures_util::FutureExt as _;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::collections::VecDeque;
use std::future::Future as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// Realm in our `WWW-Authenticate: Basic` challenge.
pub const REALM: &str = "authswap";

/// Per-listener state of the HTTP front end.
#[derive(Clone)]
pub struct HttpProxy {
    app: Arc<App>,
    upstream: Arc<Upstream>,
    upstreams: Arc<Upstreams>,
    scopes: Scopes,
    replay_limit: usize,
    max_body: usize,
    upstream_timeout: Duration,
}

struct Upstream {
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    base_path: String,
    /// `Host` for HTTP/1.1 requests, computed once (host, plus the port
    /// when it is not the scheme's default), as the pooled client would on
    /// every request otherwise. Over HTTP/2 it equals `:authority`.
    host: HeaderValue,
}

/// Why the HTTP front end cannot start.
#[derive(Debug, thiserror::Error)]
#[error("http.upstream: `{0}` is not a usable URL")]
pub struct UpstreamUrlError(String);

impl HttpProxy {
    /// Builds the front end from the application's configuration.
    pub fn new(app: Arc<App>) -> Result<HttpProxy, UpstreamUrlError> {
        let cfg = &app.config.http;
        let bad = || UpstreamUrlError(cfg.upstream.clone());
        let uri: Uri = cfg.upstream.parse().map_err(|_| bad())?;
        let host = host_header(&uri).ok_or_else(bad)?;
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let upstreams = Upstreams::new(
            uri.host().ok_or_else(bad)?,
            port,
            https.then(|| app.client_tls.clone()),
            crate::tls::CONNECT_TIMEOUT,
        )
        .map_err(|_| bad())?;
        let parts = uri.into_parts();
        let upstream = Upstream {
            host,
            scheme: parts.scheme.ok_or_else(bad)?,
            authority: parts.authority.ok_or_else(bad)?,
            base_path: parts
                .path_and_query
                .map(|p| p.path().trim_end_matches('/').to_owned())
                .unwrap_or_default(),
        };
        Ok(HttpProxy {
            scopes: Scopes::new(&cfg.scopes),
            replay_limit: cfg.replay_buffer_limit.as_usize(),
            max_body: match cfg.max_body_bytes.as_usize() {
                0 => usize::MAX,
                n => n,
            },
            upstream_timeout: cfg.upstream_timeout,
            upstream: Arc::new(upstream),
            upstreams: Arc::new(upstreams),
            app,
        })
    }

    /// Whether new client connections start on the native HTTP/1.1 path:
    /// when it is enabled and the upstream has not chosen HTTP/2.
    pub fn native_http1(&self) -> bool {
        self.app.config.http.native_http1 && !self.upstreams.speaks_http2()
    }

    /// The state of a new client connection, and its companion future: run
    /// it beside the client connection, which must end when it completes.
    /// It drives the connection's upstream lane and completes when the
    /// client has been idle, or slow to send a request head, for
    /// `http.header_read_timeout`.
    pub fn connection(&self) -> (Arc<Connection>, impl std::future::Future<Output = ()>) {
        let limit = self.app.config.http.header_read_timeout;
        let conn = Arc::new(Connection {
            lane: Lane::new(self.upstreams.clone()),
            memo: ConnectionMemo::default(),
            deadline: Deadline::default(),
            activity: Activity::new(),
        });
        let mut watchdog = LazyTimer::new(tokio::time::Instant::now() + limit);
        let companion = {
            let conn = conn.clone();
            std::future::poll_fn(move |cx| {
                conn.lane.poll_drive(cx);
                conn.activity.poll_watch(&mut watchdog, limit, cx)
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
                rejection.into_response(&self.app)
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
        let auth = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        let identity = self.identify(auth, peer, &conn.memo).await?;
        let token = self.token(&identity).await?;

        let (parts, body) = req.into_parts();
        let uri = self.upstream_path(&parts.uri)?;
        let mut headers = parts.headers;
        prepare_upstream_headers(&mut headers);
        let method = parts.method;

        let body = self.read_body(body, &headers).await?;
        let build = |token: &AccessToken, body: OutBody| {
            let mut r = Request::new(body);
            *r.method_mut() = method.clone();
            *r.uri_mut() = Uri::from(uri.clone());
            *r.headers_mut() = headers.clone();
            r.headers_mut()
                .insert(header::AUTHORIZATION, token.bearer_header().clone());
            r.headers_mut()
                .insert(header::HOST, self.upstream.host.clone());
            r
        };

        match body {
            RequestBody::Buffered(bytes) => {
                // A request lost on a reused connection is sent again only
                // when repeating it is harmless (RFC 9110 §9.2.2).
                let send = |token: &AccessToken| {
                    let request = build(token, full(bytes.clone()));
                    let again = method
                        .is_idempotent()
                        .then(|| build(token, full(bytes.clone())));
                    self.send(h1, request, again)
                };
                let mut token = token;
                let mut retried = false;
                loop {
                    let response = send(&token).await?;
                    let verdict = match self.refused(&identity, &token, &response) {
                        None => return Ok(self.respond(response, conn)),
                        Some(verdict) => verdict,
                    };
                    match verdict {
                        Verdict::PassThrough => return Ok(self.respond(response, conn)),
                        Verdict::Retry if !retried => {
                            // Drop the refused answer (the connection can
                            // be reused), refresh, replay the same bytes.
                            retried = true;
                            drop(response);
                            token = self.token(&identity).await?;
                        }
                        // Refused again after this request's one refresh.
                        Verdict::Retry => return Err(self.refused_fresh(&identity, None)),
                        Verdict::Backoff { retry_after } => {
                            return Err(self.refused_fresh(&identity, Some(retry_after)))
                        }
                    }
                }
            }
            RequestBody::Streaming(body) => {
                let response = self.send(h1, build(&token, body), None).await?;
                match self.refused(&identity, &token, &response) {
                    None | Some(Verdict::PassThrough) => Ok(self.respond(response, conn)),
                    // Too large to replay: the client sends it again.
                    Some(Verdict::Retry) => Err(Rejection::Resend),
                    Some(Verdict::Backoff { retry_after }) => {
                        Err(self.refused_fresh(&identity, Some(retry_after)))
                    }
                }
            }
        }
    }

    /// Applies the refusal policy to an upstream answer: `None` when it is
    /// no refusal (the token is recorded as accepted), else what to do.
    fn refused<B>(
        &self,
        identity: &crate::identity::Identity,
        token: &AccessToken,
        response: &Response<B>,
    ) -> Option<Verdict> {
        let tokens = &self.app.tokens;
        let headers = response.headers();
        match refusal::http(response.status().as_u16(), |name| {
            headers.get(name).map(|v| v.as_bytes())
        }) {
            None => {
                tokens.accepted(identity, &self.scopes, token);
                None
            }
            Some(refusal) => {
                Some(tokens.refused(identity, &self.scopes, token, Protocol::http, &refusal))
            }
        }
    }

    /// The temporary answer when the upstream refuses fresh tokens.
    pub(super) fn refused_fresh(
        &self,
        identity: &crate::identity::Identity,
        retry_after: Option<Duration>,
    ) -> Rejection {
        Rejection::Token(TokenError::Refused {
            identity: identity.name.clone(),
            retry_after: retry_after.unwrap_or(self.app.config.tokens.refused_backoff_min),
        })
    }

    /// The identity the request's Basic credentials prove: from the
    /// connection's memo when the client resent what it proved last.
    pub(super) async fn identify(
        &self,
        authorization: Option<&[u8]>,
        peer: SocketAddr,
        memo: &ConnectionMemo,
    ) -> Result<Arc<crate::identity::Identity>, Rejection> {
        let auth = &self.app.auth;
        let tag = authorization.map(|v| auth.memo_tag(v));
        if let Some(identity) = tag.and_then(|t| auth.recall(memo, t)) {
            return Ok(identity);
        }
        let credentials = basic_credentials(authorization)?;
        let identity = auth
            .authenticate(
                credentials.name(),
                credentials.password(),
                peer.ip(),
                Protocol::http,
            )
            .await
            .map_err(Rejection::Auth)?;
        if let Some(tag) = tag {
            auth.memorize(memo, tag, &identity);
        }
        Ok(identity)
    }

    pub(super) async fn token(
        &self,
        identity: &Arc<crate::identity::Identity>,
    ) -> Result<AccessToken, Rejection> {
        self.app
            .tokens
            .access_token(identity, &self.scopes)
            .await
            .map_err(Rejection::Token)
    }

    /// The upstream request target (origin-form) for the client's.
    fn upstream_path(&self, uri: &Uri) -> Result<http::uri::PathAndQuery, Rejection> {
        let pq = match uri.path_and_query() {
            Some(pq) if pq.as_str().starts_with('/') => pq.clone(),
            _ => http::uri::PathAndQuery::from_static("/"),
        };
        if self.upstream.base_path.is_empty() {
            return Ok(pq);
        }
        format!("{}{}", self.upstream.base_path, pq)
            .parse()
            .map_err(|_| Rejection::BadRequest("invalid request target"))
    }

    async fn read_body(
        &self,
        mut body: Incoming,
        headers: &HeaderMap,
    ) -> Result<RequestBody, Rejection> {
        if body.is_end_stream() {
            return Ok(RequestBody::Buffered(Bytes::new()));
        }
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body as u64) {
            return Err(Rejection::TooLarge);
        }
        if declared.is_some_and(|n| n > self.replay_limit as u64) {
            return Ok(RequestBody::Streaming(limited(
                VecDeque::new(),
                body,
                self.max_body,
            )));
        }
        // The first chunk is held apart: most bodies are one chunk, and an
        // empty VecDeque does not allocate.
        let mut first: Option<Bytes> = None;
        let mut more: VecDeque<Bytes> = VecDeque::new();
        let mut total = 0usize;
        let idle = self.app.config.http.header_read_timeout;
        loop {
            // A small body has usually arrived with the head: take it
            // without arming a timer.
            let frame = match body.frame().now_or_never() {
                Some(frame) => frame,
                None => tokio::time::timeout(idle, body.frame())
                    .await
                    .map_err(|_| Rejection::BodyTimeout)?,
            };
            let frame = match frame {
                None => break,
                Some(Err(_)) => return Err(Rejection::BadRequest("request body broken off")),
                Some(Ok(frame)) => frame,
            };
            if let Ok(data) = frame.into_data() {
                total += data.len();
                if total > self.max_body {
                    return Err(Rejection::TooLarge);
                }
                match first {
                    None => first = Some(data),
                    Some(_) => more.push_back(data),
                }
                if total > self.replay_limit {
                    more.extend(first.take());
                    more.rotate_right(1);
                    return Ok(RequestBody::Streaming(limited(more, body, self.max_body)));
                }
            }
        }
        let bytes = match (first, more.is_empty()) {
            (None, _) => Bytes::new(),
            (Some(only), true) => only,
            (Some(head), false) => {
                let mut buf = Vec::with_capacity(total);
                buf.extend_from_slice(&head);
                for c in more {
                    buf.extend_from_slice(&c);
                }
                Bytes::from(buf)
            }
        };
        Ok(RequestBody::Buffered(bytes))
    }

    /// Sends `req` upstream within `http.upstream_timeout`: on the lane of
    /// `h1` (the HTTP/1.1 client connection it came on) when the upstream
    /// speaks HTTP/1.1, else through the shared pooled client. `again` is
    /// sent when `req` was lost on a reused connection after it was written.
    async fn send(
        &self,
        h1: Option<&Connection>,
        req: Request<OutBody>,
        again: Option<Request<OutBody>>,
    ) -> Result<Response<Incoming>, Rejection> {
        let started = Instant::now();
        let lane = h1.map(|c| &c.lane);
        let attempt = async {
            let Some(lane) = lane.filter(|_| !self.upstreams.speaks_http2()) else {
                return self.send_shared(req).await;
            };
            match lane.send(req).await {
                Ok(response) => Ok(response),
                Err(SendError::Http2(req)) => self.send_shared(*req).await,
                Err(SendError::Failed {
                    reused: true,
                    error,
                }) => {
                    let Some(again) = again else {
                        return Err(error.into());
                    };
                    tracing::debug!(error = %crate::token::idp::error_chain(&error), "reused upstream connection lost the request; sending it again");
                    match lane.send(again).await {
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
        self.app
            .metrics
            .upstream_duration(Protocol::http, started.elapsed().as_secs_f64());
        match result {
            None => Err(Rejection::UpstreamTimeout),
            Some(Err(e)) => {
                tracing::warn!(error = %crate::token::idp::error_chain(&*e), "upstream request failed");
                Err(Rejection::Upstream)
            }
            Some(Ok(r)) => Ok(r),
        }
    }

    /// Sends through the shared pooled client (absolute-form URI). The
    /// client's future is large: it is boxed so that it is not part of
    /// every request's future.
    async fn send_shared(&self, mut req: Request<OutBody>) -> Result<Response<Incoming>, BoxError> {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.upstream.scheme.clone());
        parts.authority = Some(self.upstream.authority.clone());
        parts.path_and_query = req.uri().path_and_query().cloned();
        *req.uri_mut() = Uri::from_parts(parts)?;
        Ok(Box::pin(self.app.client.request(req)).await?)
    }

    fn respond(&self, response: Response<Incoming>, conn: &Arc<Connection>) -> Response<OutBody> {
        self.app.metrics.request(Protocol::http, Outcome::forwarded);
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let body = Relayed {
            body,
            conn: conn.clone(),
        };
        Response::from_parts(parts, body.boxed_unsync())
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
}

impl Activity {
    fn new() -> Activity {
        Activity {
            born: Instant::now(),
            busy: Default::default(),
            http2: Default::default(),
            idle_since: Default::default(),
        }
    }

    fn begin(&self, version: http::Version) {
        use std::sync::atomic::Ordering::Relaxed;
        if version >= http::Version::HTTP_2 {
            self.http2.store(true, Relaxed);
        }
        self.busy.store(true, Relaxed);
    }

    fn end(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let ns = u64::try_from(self.born.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.idle_since.store(ns, Relaxed);
        self.busy.store(false, Relaxed);
    }

    /// Ready when the connection must close.
    fn poll_watch(&self, timer: &mut LazyTimer, limit: Duration, cx: &mut Context<'_>) -> Poll<()> {
        use std::sync::atomic::Ordering::Relaxed;
        while timer.fired(cx) {
            if self.http2.load(Relaxed) {
                return Poll::Pending;
            }
            let now = Instant::now();
            let due = if self.busy.load(Relaxed) {
                now + limit
            } else {
                let since = self.born + Duration::from_nanos(self.idle_since.load(Relaxed));
                if now >= since + limit {
                    return Poll::Ready(());
                }
                since + limit
            };
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
        Pin::new(&mut self.body)
            .poll_frame(cx)
            .map_err(|e| -> BoxError { Box::new(e) })
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

/// A timer owned by one task, polled only when that is needed: once after
/// it is set (to register the task's waker) and when it has fired. A
/// connection's futures are polled on every wake-up of its task; polling
/// the timer each time would cost more than the timer saves.
struct LazyTimer {
    sleep: Pin<Box<tokio::time::Sleep>>,
    registered: bool,
}

impl LazyTimer {
    fn new(deadline: tokio::time::Instant) -> LazyTimer {
        LazyTimer {
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            registered: false,
        }
    }

    /// Whether the deadline has passed.
    fn fired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.registered && !self.sleep.is_elapsed() {
            return false;
        }
        self.registered = true;
        self.sleep.as_mut().poll(cx).is_ready()
    }

    /// The deadline it is set to.
    fn deadline(&self) -> tokio::time::Instant {
        self.sleep.deadline()
    }

    /// Whether `due` has passed; if not, the task is woken by then. A timer
    /// set for an earlier due time is re-armed when it fires early, one set
    /// for a later one at once; dues that only move forward (requests one
    /// after another) thus cost a clock read, not a timer registration.
    fn passed(&mut self, due: tokio::time::Instant, cx: &mut Context<'_>) -> bool {
        if self.deadline() > due {
            self.reset(due);
        }
        while self.fired(cx) {
            if tokio::time::Instant::now() >= due {
                return true;
            }
            self.reset(due);
        }
        false
    }

    /// Sets a new deadline (the next [`LazyTimer::fired`] registers it).
    fn reset(&mut self, deadline: tokio::time::Instant) {
        self.sleep.as_mut().reset(deadline);
        self.registered = false;
    }
}

enum RequestBody {
    Buffered(Bytes),
    Streaming(OutBody),
}

/// Why a request is answered locally.
#[derive(Debug)]
pub(super) enum Rejection {
    MissingCredentials,
    BadRequest(&'static str),
    Auth(AuthError),
    Token(TokenError),
    /// The upstream refused the token of a request too large to replay:
    /// the token was dropped; the client should send the request again.
    Resend,
    TooLarge,
    HeadTooLarge,
    BodyTimeout,
    Upstream,
    UpstreamTimeout,
}

impl Rejection {
    fn into_response(self, app: &App) -> Response<OutBody> {
        self.into_local(app).map(full)
    }

    /// The local answer (and its metrics).
    pub(super) fn into_local(self, app: &App) -> Response<Bytes> {
        let m = &app.metrics;
        let challenge = || HeaderValue::from_static("Basic realm=\"authswap\", charset=\"UTF-8\"");
        match self {
            Rejection::MissingCredentials => {
                m.request(Protocol::http, Outcome::unauthorized);
                let mut r = local_text(StatusCode::UNAUTHORIZED, "authentication required\n");
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, challenge());
                r
            }
            Rejection::BadRequest(why) => {
                m.request(Protocol::http, Outcome::bad_request);
                if why == "malformed Basic credentials" {
                    m.auth_failure(None, Protocol::http, FailureReason::bad_request);
                    let mut r =
                        local_text(StatusCode::UNAUTHORIZED, "malformed Basic credentials\n");
                    r.headers_mut()
                        .insert(header::WWW_AUTHENTICATE, challenge());
                    return r;
                }
                local_text(StatusCode::BAD_REQUEST, &format!("{why}\n"))
            }
            Rejection::Auth(e) => {
                m.request(Protocol::http, Outcome::unauthorized);
                let mut r = local_text(StatusCode::UNAUTHORIZED, "authentication failed\n");
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, challenge());
                if let AuthError::Locked(left) = e {
                    r.headers_mut()
                        .insert(header::RETRY_AFTER, retry_after_value(left));
                }
                r
            }
            Rejection::Token(TokenError::ReauthRequired { identity, message }) => {
                m.request(Protocol::http, Outcome::reauth_required);
                m.auth_failure(
                    Some(&identity),
                    Protocol::http,
                    FailureReason::reauth_required,
                );
                let mut r = local_text(
                    StatusCode::UNAUTHORIZED,
                    &format!(
                        "identity {identity} needs re-authentication: an administrator must run \
                         `authswap identity login {identity}` ({message})\n"
                    ),
                );
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, challenge());
                r
            }
            Rejection::Token(TokenError::Unavailable {
                identity,
                retry_after,
                ..
            }) => {
                m.request(Protocol::http, Outcome::unavailable);
                m.auth_failure(
                    Some(&identity),
                    Protocol::http,
                    FailureReason::refresh_failed,
                );
                let mut r = local_text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the identity platform is unavailable; try again later\n",
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, retry_after_value(retry_after));
                r
            }
            Rejection::Token(TokenError::Refused {
                identity,
                retry_after,
            }) => {
                m.request(Protocol::http, Outcome::upstream_refused);
                m.auth_failure(
                    Some(&identity),
                    Protocol::http,
                    FailureReason::fresh_token_refused,
                );
                let mut r = local_text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the upstream server refused freshly issued access tokens; try again later\n",
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, retry_after_value(retry_after));
                r
            }
            Rejection::Resend => {
                m.request(Protocol::http, Outcome::upstream_refused);
                let mut r = local_text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the upstream server refused the access token; a new one is being obtained: send the request again\n",
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                r
            }
            Rejection::TooLarge => {
                m.request(Protocol::http, Outcome::bad_request);
                local_text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n")
            }
            Rejection::HeadTooLarge => {
                m.request(Protocol::http, Outcome::bad_request);
                local_text(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "request head too large\n",
                )
            }
            Rejection::BodyTimeout => {
                m.request(Protocol::http, Outcome::bad_request);
                local_text(
                    StatusCode::REQUEST_TIMEOUT,
                    "request body not received in time\n",
                )
            }
            Rejection::Upstream => {
                m.request(Protocol::http, Outcome::upstream_error);
                local_text(StatusCode::BAD_GATEWAY, "upstream unreachable\n")
            }
            Rejection::UpstreamTimeout => {
                m.request(Protocol::http, Outcome::upstream_error);
                local_text(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream did not answer in time\n",
                )
            }
        }
    }
}

fn retry_after_value(d: Duration) -> HeaderValue {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    HeaderValue::from(secs.max(1))
}

/// A small plain-text response.
pub fn text(status: StatusCode, body: &str) -> Response<OutBody> {
    local_text(status, body).map(full)
}

fn local_text(status: StatusCode, body: &str) -> Response<Bytes> {
    let mut r = Response::new(Bytes::copy_from_slice(body.as_bytes()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A complete body.
pub fn full(bytes: Bytes) -> OutBody {
    Full::new(bytes)
        .map_err(|never| -> BoxError { match never {} })
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> OutBody {
    Empty::new()
        .map_err(|never| -> BoxError { match never {} })
        .boxed_unsync()
}

/// Parses an `Authorization: Basic` value into (name, password).
fn basic_credentials(value: Option<&[u8]>) -> Result<BasicCredentials, Rejection> {
    let Some(value) = value else {
        return Err(Rejection::MissingCredentials);
    };
    parse_basic(value).ok_or(Rejection::BadRequest("malformed Basic credentials"))
}

/// Decoded `Authorization: Basic` credentials: one buffer, wiped on drop.
pub struct BasicCredentials {
    /// `name:password`, UTF-8.
    decoded: Zeroizing<Vec<u8>>,
    colon: usize,
}

impl BasicCredentials {
    /// The name (non-empty).
    pub fn name(&self) -> &str {
        std::str::from_utf8(&self.decoded[..self.colon]).unwrap_or_default()
    }

    /// The password (may contain `:`).
    pub fn password(&self) -> &[u8] {
        &self.decoded[self.colon + 1..]
    }
}

impl std::fmt::Debug for BasicCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BasicCredentials")
            .field("name", &self.name())
            .finish_non_exhaustive()
    }
}

/// Decodes an `Authorization: Basic` value (RFC 7617) into a non-empty name
/// and the password (which may contain `:`). `None` when malformed.
pub fn parse_basic(value: &[u8]) -> Option<BasicCredentials> {
    if value.len() < 6 || !value[..6].eq_ignore_ascii_case(b"basic ") {
        return None;
    }
    let encoded = value[6..].trim_ascii();
    // Sized up front so decoding never reallocates (and leaves no copy).
    let mut decoded = Zeroizing::new(Vec::with_capacity(encoded.len() / 4 * 3 + 3));
    base64::engine::general_purpose::STANDARD
        .decode_vec(encoded, &mut decoded)
        .ok()?;
    // RFC 7617 says UTF-8; many legacy Windows clients send ISO-8859-1.
    if std::str::from_utf8(&decoded).is_err() {
        let latin1: String = decoded.iter().map(|&b| char::from(b)).collect();
        decoded = Zeroizing::new(latin1.into_bytes());
    }
    let colon = decoded.iter().position(|&b| b == b':')?;
    if colon == 0 {
        return None;
    }
    Some(BasicCredentials { decoded, colon })
}

/// Turns the client's request headers into the upstream's, minus the
/// credentials: hop-by-hop headers, `Host` (set from the upstream URI),
/// `Authorization` (replaced by the Bearer token) and `Expect` (the body is
/// read or streamed by authswap; the upstream must not wait for a
/// 100-continue the client already had) are removed.
pub fn prepare_upstream_headers(headers: &mut HeaderMap) {
    // Always present: removed directly, so that the scan below usually
    // finds nothing and allocates nothing.
    headers.remove(header::AUTHORIZATION);
    headers.remove(header::HOST);
    strip_headers(headers, &[header::EXPECT]);
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// `Host` as an HTTP/1.1 client sends it for `uri`: the host, and the port
/// when it is not the scheme's default.
fn host_header(uri: &Uri) -> Option<HeaderValue> {
    let host = uri.host()?;
    let default_port = match uri.scheme_str() {
        Some("https") => Some(443),
        Some("http") => Some(80),
        _ => None,
    };
    let value = match uri.port_u16() {
        Some(port) if Some(port) != default_port => format!("{host}:{port}"),
        _ => host.to_owned(),
    };
    HeaderValue::from_maybe_shared(Bytes::from(value)).ok()
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those named in `Connection`.
///
/// One pass over the names present (a request carries a handful), instead
/// of a hashed removal for every name that might be there.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip_headers(headers, &[]);
}

/// Removes the hop-by-hop headers and `also`, scanning the names present
/// once.
fn strip_headers(headers: &mut HeaderMap, also: &[HeaderName]) {
    let doomed = |n: &HeaderName| HOP_BY_HOP.contains(n) || also.contains(n);
    if !headers.keys().any(doomed) {
        return;
    }
    let found: Vec<HeaderName> = headers.keys().filter(|n| doomed(n)).cloned().collect();
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named.into_iter().chain(found) {
        headers.remove(name);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        m
    }

    #[tokio::test(start_paused = true)]
    async fn a_lazy_timer_still_wakes_its_task_after_a_reset() {
        let start = tokio::time::Instant::now();
        let mut timer = LazyTimer::new(start + Duration::from_millis(100));
        let mut resets = 0;
        let fired_twice = std::future::poll_fn(|cx| {
            while timer.fired(cx) {
                if resets == 1 {
                    return Poll::Ready(());
                }
                resets += 1;
                timer.reset(tokio::time::Instant::now() + Duration::from_millis(100));
            }
            Poll::Pending
        });
        // Nothing else wakes this task: only the timer's own wake-up can.
        tokio::time::timeout(Duration::from_secs(10), fired_twice)
            .await
            .expect("woken by the re-armed timer");
        assert!(start.elapsed() >= Duration::from_millis(200));
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn basic_parsing() {
        let enc = base64::engine::general_purpose::STANDARD.encode("Alice:p:w");
        let c = basic_credentials(Some(format!("Basic {enc}").as_bytes())).unwrap();
        assert_eq!((c.name(), c.password()), ("Alice", &b"p:w"[..]));
        assert!(!format!("{c:?}").contains("p:w"), "Debug shows no password");
        let c = basic_credentials(Some(format!("basic  {enc} ").as_bytes())).unwrap();
        assert_eq!(c.name(), "Alice");
        assert!(basic_credentials(Some("Bearer x".as_bytes())).is_err());
        assert!(basic_credentials(Some("Basic !!!".as_bytes())).is_err());
        let latin1 = base64::engine::general_purpose::STANDARD.encode(b"ren\xe9:caf\xe9");
        let c = basic_credentials(Some(format!("Basic {latin1}").as_bytes())).unwrap();
        assert_eq!(
            (c.name(), c.password()),
            ("ren\u{e9}", "caf\u{e9}".as_bytes())
        );
        let empty_name = base64::engine::general_purpose::STANDARD.encode(":pw");
        assert!(basic_credentials(Some(format!("Basic {empty_name}").as_bytes())).is_err());
        let nocolon = base64::engine::general_purpose::STANDARD.encode("alice");
        assert!(basic_credentials(Some(format!("Basic {nocolon}").as_bytes())).is_err());
        assert!(matches!(
            basic_credentials(None),
            Err(Rejection::MissingCredentials)
        ));
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut m = HeaderMap::new();
        m.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        m.insert("x-private", HeaderValue::from_static("1"));
        m.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        m.insert("soapaction", HeaderValue::from_static("x"));
        strip_hop_by_hop(&mut m);
        assert_eq!(m.len(), 1);
        assert!(m.contains_key("soapaction"));

        // No hop-by-hop header at all: nothing is touched.
        let mut m = HeaderMap::new();
        m.insert("x-private", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut m);
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn upstream_headers_lose_credentials_host_expect_and_hop_by_hop() {
        let mut m = h("Basic YTpi");
        m.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic second"),
        );
        m.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        m.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        m.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        m.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/xml"));
        prepare_upstream_headers(&mut m);
        assert_eq!(m.len(), 1, "{m:?}");
        assert!(m.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn host_header_omits_default_ports() {
        let host = |u: &str| host_header(&u.parse().unwrap()).unwrap();
        assert_eq!(
            host("https://outlook.office365.com"),
            "outlook.office365.com"
        );
        assert_eq!(
            host("https://outlook.office365.com:443/ews"),
            "outlook.office365.com"
        );
        assert_eq!(host("https://localhost:8443"), "localhost:8443");
        assert_eq!(host("http://127.0.0.1:80"), "127.0.0.1");
        assert_eq!(host("http://[::1]:9000"), "[::1]:9000");
    }
}
