//! The HTTP front end (EWS and any HTTPS API): `Authorization: Basic` from the
//! legacy client becomes `Authorization: Bearer` toward the upstream.
//!
//! One exchange policy ([`exchange`]: identify, token, body, send, refusal
//! policy, respond) runs every request, over one of two wire halves: the
//! native HTTP/1.1 relay (`h1.rs`, around the pure codec in [`codec`]),
//! which takes the common HTTP/1.1 request, and the hyper half
//! (`hyper_half.rs`), which serves HTTP/2 clients, an HTTP/2 upstream and
//! everything the native half hands over. This module owns what both
//! share: the listener's settings ([`HttpProxy`]), the credential check,
//! the local answers ([`LocalAnswer`], from a [`Rejection`]), the
//! hop-by-hop rules and the connection timer ([`LazyTimer`]). Bodies up to
//! `replay_buffer_limit` are buffered so a request refused with 401 can be
//! replayed byte-identical once after a refresh; larger bodies stream.
//! Every other upstream answer (throttling included) passes through.
//! [`soap`] rewrites EWS envelopes for app-only tokens
//! (`ExchangeImpersonation`).

pub mod codec;
pub mod ews_ops;
mod exchange;
mod h1;
mod hyper_half;
pub mod soap;

pub use h1::Served;
pub use hyper_half::Connection;

use super::upstream::Upstreams;
use crate::app::App;
use crate::error::{Failure as _, Origin};
use crate::identity::{AuthError, ConnectionMemo};
use crate::metrics::{FailureReason, Outcome, Protocol};
use crate::tls::{BoxError, OutBody};
use crate::token::{AccessToken, ScopeSet, TokenError};
use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full};
use std::future::Future as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Context;
use std::time::Duration;
use zeroize::Zeroizing;

/// Realm in our `WWW-Authenticate: Basic` challenge.
pub const REALM: &str = "authswap";

/// Per-listener state of the HTTP front end.
#[derive(Clone)]
pub struct HttpProxy {
    app: Arc<App>,
    upstream: Arc<Upstream>,
    upstreams: Arc<Upstreams>,
    scopes: ScopeSet,
    replay_limit: usize,
    /// App-only identities act as their mailbox the EWS way
    /// (`http.ews_impersonation`).
    ews_impersonation: bool,
    /// `runtime.access_log`.
    access_log: bool,
    replay_budget: Arc<ReplayBudget>,
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

/// When a request body being read must be complete: within
/// `http.header_read_timeout` of its start plus one second per
/// `http.min_body_rate` bytes received (Apache's `mod_reqtimeout` rule),
/// and with no pause longer than `header_read_timeout`. A body trickling
/// in a byte at a time cannot hold a connection for long.
pub(super) struct BodyPace {
    start: tokio::time::Instant,
    grace: Duration,
    rate: u64,
}

impl BodyPace {
    /// The deadline for the next read, `received` bytes in.
    pub(super) fn due(&self, received: u64) -> tokio::time::Instant {
        let earned = Duration::from_secs_f64(received as f64 / self.rate as f64);
        let total = self.start + self.grace + earned;
        total.min(tokio::time::Instant::now() + self.grace)
    }
}

/// Request-body bytes held for replay across all connections, bounded by
/// `http.replay_buffer_total`: past it, bodies stream without replay, so
/// that many slow uploads cannot make authswap hold their bodies at once.
pub(super) struct ReplayBudget {
    used: std::sync::atomic::AtomicU64,
    limit: u64,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

/// A share of the [`ReplayBudget`], given back when dropped.
pub(super) struct Reservation {
    budget: Arc<ReplayBudget>,
    bytes: u64,
}

impl ReplayBudget {
    /// `n` more bytes, if the budget has them.
    pub(super) fn reserve(self: &Arc<Self>, n: u64) -> Option<Reservation> {
        let mut r = Reservation {
            budget: self.clone(),
            bytes: 0,
        };
        r.grow(n).then_some(r)
    }
}

impl Reservation {
    /// Takes `n` more bytes; `false` (and nothing taken) when the budget
    /// does not have them.
    pub(super) fn grow(&mut self, n: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let b = &self.budget;
        let taken = b
            .used
            .fetch_update(Relaxed, Relaxed, |used| {
                used.checked_add(n).filter(|&total| total <= b.limit)
            })
            .is_ok();
        if taken {
            self.bytes += n;
            b.gauge.inc_by(i64::try_from(n).unwrap_or(i64::MAX));
        }
        taken
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            let b = &self.budget;
            b.used
                .fetch_sub(self.bytes, std::sync::atomic::Ordering::Relaxed);
            b.gauge
                .dec_by(i64::try_from(self.bytes).unwrap_or(i64::MAX));
        }
    }
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
            app.metrics.upstream_idle.clone(),
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
        let scopes = ScopeSet::new(&cfg.scopes, &cfg.app_scopes);
        app.metrics.front_end(Protocol::http, &scopes.keys());
        Ok(HttpProxy {
            scopes,
            replay_limit: cfg.replay_buffer_limit.as_usize(),
            ews_impersonation: cfg.ews_impersonation,
            access_log: app.config.runtime.access_log,
            replay_budget: Arc::new(ReplayBudget {
                used: Default::default(),
                limit: cfg.replay_buffer_total.0,
                gauge: app.metrics.replay_buffered.clone(),
            }),
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

    /// The pace a request body starting now must keep.
    pub(super) fn body_pace(&self) -> BodyPace {
        let cfg = &self.app.config.http;
        BodyPace {
            start: tokio::time::Instant::now(),
            grace: cfg.header_read_timeout,
            rate: cfg.min_body_rate.0.max(1),
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
            .access_token(identity, self.scopes.of(identity))
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

/// Why a request is answered locally.
#[derive(Debug)]
pub(super) enum Rejection {
    MissingCredentials,
    /// Not Basic, or not decodable: `401` with the challenge.
    MalformedCredentials,
    BadRequest(&'static str),
    /// An app-only identity's request impersonates another mailbox: `403`.
    OtherMailbox(String),
    /// The request body cannot be rewritten for an app-only identity.
    MalformedEnvelope(String),
    /// The body of an app-only identity's request is too large to be
    /// rewritten (past `http.replay_buffer_limit`): `413`.
    TooLargeToImpersonate,
    /// The identity's configuration cannot be used (its mailbox cannot
    /// be named in a header): `500`.
    Misconfigured(&'static str),
    Auth(AuthError),
    Token(TokenError),
    /// The upstream refused the token of a request too large to replay:
    /// the token was dropped; the client should send the request again.
    Resend,
    TooLarge,
    HeadTooLarge,
    BodyTimeout,
    /// The client went away (or failed) while its request was read: there
    /// is nobody to answer.
    ClientGone,
    Upstream,
    UpstreamTimeout,
}

/// An answer authswap gives itself, not the upstream's: whichever wire half
/// is in use serialises it ([`LocalAnswer::into_response`] for hyper,
/// [`LocalAnswer::write_h1`] for the native half).
#[derive(Debug)]
pub struct LocalAnswer {
    /// Status.
    pub status: StatusCode,
    /// Fields besides `content-type: text/plain` and `content-length`.
    pub headers: HeaderMap,
    /// A short plain-text body.
    pub body: Bytes,
    /// The connection closes after it (the client's request was not read
    /// whole, or is not worth waiting for).
    pub close: bool,
}

impl LocalAnswer {
    /// A plain-text answer.
    pub fn text(status: StatusCode, body: &str) -> LocalAnswer {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        LocalAnswer {
            status,
            headers,
            body: Bytes::copy_from_slice(body.as_bytes()),
            close: false,
        }
    }

    fn with(mut self, name: HeaderName, value: HeaderValue) -> LocalAnswer {
        self.headers.insert(name, value);
        self
    }

    fn challenge(self) -> LocalAnswer {
        self.with(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"authswap\", charset=\"UTF-8\""),
        )
    }

    fn closing(mut self) -> LocalAnswer {
        self.close = true;
        self
    }

    /// The answer for hyper (which closes the connection after a
    /// `connection: close` answer).
    pub fn into_response(self) -> Response<OutBody> {
        let mut r = Response::new(full(self.body));
        *r.status_mut() = self.status;
        *r.headers_mut() = self.headers;
        if self.close {
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }

    /// The answer as HTTP/1.1 bytes in `out` (replacing what it held),
    /// with `connection: close` when `close`.
    pub fn write_h1(&self, out: &mut Vec<u8>, close: bool) {
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(self.status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in &self.headers {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(self.body.len().to_string().as_bytes());
        if close {
            out.extend_from_slice(b"\r\nconnection: close");
        }
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(&self.body);
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::Auth(e) => write!(f, "{e}"),
            Rejection::Token(e) => write!(f, "{e}"),
            Rejection::BadRequest(why) => f.write_str(why),
            other => write!(f, "{other:?}"),
        }
    }
}

impl std::error::Error for Rejection {}

impl crate::error::Failure for Rejection {
    fn origin(&self) -> Origin {
        match self {
            Rejection::Token(e) => e.origin(),
            Rejection::Resend | Rejection::Upstream | Rejection::UpstreamTimeout => {
                Origin::Upstream
            }
            _ => Origin::Client,
        }
    }

    fn retryable(&self) -> bool {
        match self {
            Rejection::Token(e) => e.retryable(),
            Rejection::Auth(AuthError::Locked(_))
            | Rejection::Resend
            | Rejection::BodyTimeout
            | Rejection::Upstream
            | Rejection::UpstreamTimeout => true,
            _ => false,
        }
    }
}

impl Rejection {
    /// How a request answered with this ends, in `requests_total` and the
    /// access log.
    pub(super) fn outcome(&self) -> Outcome {
        match self {
            Rejection::MissingCredentials | Rejection::Auth(_) => Outcome::unauthorized,
            Rejection::Token(TokenError::ReauthRequired { .. }) => Outcome::reauth_required,
            Rejection::Token(TokenError::Unavailable { .. } | TokenError::AppCredential { .. }) => {
                Outcome::unavailable
            }
            Rejection::Token(TokenError::Refused { .. }) | Rejection::Resend => {
                Outcome::upstream_refused
            }
            Rejection::Misconfigured(_) | Rejection::Upstream | Rejection::UpstreamTimeout => {
                Outcome::upstream_error
            }
            Rejection::BadRequest(_)
            | Rejection::MalformedCredentials
            | Rejection::TooLarge
            | Rejection::OtherMailbox(_)
            | Rejection::MalformedEnvelope(_)
            | Rejection::TooLargeToImpersonate
            | Rejection::HeadTooLarge
            | Rejection::BodyTimeout
            | Rejection::ClientGone => Outcome::bad_request,
        }
    }

    /// The local answer (and its metrics).
    pub(super) fn into_local(self, app: &App) -> LocalAnswer {
        tracing::debug!(origin = ?self.origin(), retryable = self.retryable(), reason = %self, "answered locally");
        let m = &app.metrics;
        let p = Protocol::http;
        m.request(p, self.outcome());
        match self {
            Rejection::MissingCredentials => {
                LocalAnswer::text(StatusCode::UNAUTHORIZED, "authentication required\n").challenge()
            }
            Rejection::BadRequest(why) => {
                LocalAnswer::text(StatusCode::BAD_REQUEST, &format!("{why}\n"))
            }
            Rejection::MalformedCredentials => {
                m.auth_failure(None, p, FailureReason::bad_request);
                LocalAnswer::text(StatusCode::UNAUTHORIZED, "malformed Basic credentials\n")
                    .challenge()
            }
            Rejection::Auth(e) => {
                let r = LocalAnswer::text(StatusCode::UNAUTHORIZED, "authentication failed\n")
                    .challenge();
                match e {
                    AuthError::Locked(left) => r.with(header::RETRY_AFTER, retry_after_value(left)),
                    _ => r,
                }
            }
            Rejection::Token(TokenError::ReauthRequired { identity, message }) => {
                m.auth_failure(Some(&identity), p, FailureReason::reauth_required);
                LocalAnswer::text(
                    StatusCode::UNAUTHORIZED,
                    &format!(
                        "identity {identity} needs re-authentication: an administrator must run \
                         `authswap identity login {identity}` ({message})\n"
                    ),
                )
                .challenge()
            }
            Rejection::Token(TokenError::Unavailable {
                identity,
                retry_after,
                origin,
                ..
            }) => {
                m.auth_failure(Some(&identity), p, FailureReason::refresh_failed);
                let why = match origin {
                    Origin::Store => "authswap cannot use its store right now; try again later\n",
                    _ => "the identity platform is unavailable; try again later\n",
                };
                LocalAnswer::text(StatusCode::SERVICE_UNAVAILABLE, why)
                    .with(header::RETRY_AFTER, retry_after_value(retry_after))
            }
            Rejection::Token(TokenError::AppCredential {
                identity,
                tenant,
                retry_after,
                ..
            }) => {
                m.auth_failure(Some(&identity), p, FailureReason::app_credential);
                LocalAnswer::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!(
                        "the identity platform refuses the app credential of tenant {tenant}: an administrator must renew it; try again later\n"
                    ),
                )
                .with(header::RETRY_AFTER, retry_after_value(retry_after))
            }
            Rejection::Token(TokenError::Refused {
                identity,
                retry_after,
            }) => {
                m.auth_failure(Some(&identity), p, FailureReason::fresh_token_refused);
                LocalAnswer::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the upstream server refused freshly issued access tokens; try again later\n",
                )
                .with(header::RETRY_AFTER, retry_after_value(retry_after))
            }
            Rejection::Resend => {
                LocalAnswer::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the upstream server refused the access token; a new one is being obtained: send the request again\n",
                )
                .with(header::RETRY_AFTER, HeaderValue::from_static("1"))
            }
            Rejection::TooLarge => {
                LocalAnswer::text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n")
            }
            Rejection::OtherMailbox(named) => {
                LocalAnswer::text(
                    StatusCode::FORBIDDEN,
                    &format!(
                        "this identity may act only as its own mailbox; the request impersonates {named}\n"
                    ),
                )
            }
            Rejection::MalformedEnvelope(why) => {
                LocalAnswer::text(StatusCode::BAD_REQUEST, &format!("{why}\n"))
            }
            Rejection::TooLargeToImpersonate => {
                LocalAnswer::text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request body too large for an app-only identity: authswap must add the ExchangeImpersonation header to it (http.replay_buffer_limit)\n",
                )
                .closing()
            }
            Rejection::Misconfigured(why) => {
                LocalAnswer::text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{why}\n"))
            }
            Rejection::HeadTooLarge => {
                LocalAnswer::text(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "request head too large\n",
                )
                .closing()
            }
            Rejection::BodyTimeout => {
                LocalAnswer::text(
                    StatusCode::REQUEST_TIMEOUT,
                    "request body not received in time\n",
                )
                .closing()
            }
            Rejection::ClientGone => {
                LocalAnswer::text(StatusCode::BAD_REQUEST, "request body broken off\n").closing()
            }
            Rejection::Upstream => {
                LocalAnswer::text(StatusCode::BAD_GATEWAY, "upstream unreachable\n")
            }
            Rejection::UpstreamTimeout => {
                LocalAnswer::text(
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
    LocalAnswer::text(status, body).into_response()
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
    parse_basic(value).ok_or(Rejection::MalformedCredentials)
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

/// [`codec::HOP_BY_HOP`] as header names, for the hyper half.
const HOP_BY_HOP: [HeaderName; 8] = [
    HeaderName::from_static(codec::HOP_BY_HOP[0]),
    HeaderName::from_static(codec::HOP_BY_HOP[1]),
    HeaderName::from_static(codec::HOP_BY_HOP[2]),
    HeaderName::from_static(codec::HOP_BY_HOP[3]),
    HeaderName::from_static(codec::HOP_BY_HOP[4]),
    HeaderName::from_static(codec::HOP_BY_HOP[5]),
    HeaderName::from_static(codec::HOP_BY_HOP[6]),
    HeaderName::from_static(codec::HOP_BY_HOP[7]),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Poll;

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
