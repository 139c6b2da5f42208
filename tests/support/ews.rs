//! Fake Exchange Web Services upstream over TLS, speaking HTTP/2 or
//! HTTP/1.1 by ALPN. It checks `Authorization: Bearer` tokens with a
//! [`TokenValidator`] from the fake IdP, answers Exchange-Online-shaped 401s,
//! echoes accepted request bodies byte-for-byte, records every request, and
//! has fault switches (forced 401s, canned responses, delays) plus a
//! streamed `/big-response?bytes=N` endpoint.
//!
//! App-only tokens ([`EwsOptions::app_tokens`]) are held to Exchange
//! Online's rules: `X-AnchorMailbox` is required, and a SOAP request must
//! carry an `ExchangeImpersonation` header naming that mailbox (read here
//! with quick-xml, independently of authswap's own rewrite); the answers
//! otherwise are Exchange's SOAP faults ([`soap_fault_body`]).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response};
use tokio::sync::watch;

use super::idp::TokenValidator;
use super::server::{
    empty, full, lock, random_uuid, read_body_limited, spawn_tls_server, BodyError, HttpMode,
    RespBody, ServerHandle,
};

/// Largest accepted request body (bigger → 413).
pub const EWS_MAX_BODY: usize = 64 * 1024 * 1024;
/// Value of the `WWW-Authenticate` header on 401s (as sent by Exchange Online).
pub const EWS_WWW_AUTHENTICATE: &str =
    "Bearer client_id=\"00000002-0000-0ff1-ce00-000000000000\", \
trusted_issuers=\"00000001-0000-0000-c000-000000000000@*\", \
token_types=\"app_asserted_user_v1 service_asserted_app_v1\", \
authorization_uri=\"https://login.microsoftonline.com/common/oauth2/authorize\", \
error=\"invalid_token\"";
/// Value of the `x-ms-diagnostics` header on 401s.
pub const EWS_X_MS_DIAGNOSTICS: &str =
    "2000003;reason=\"The token has an invalid signature.\";error_category=\"invalid_resource\"";
/// Default chunk size of `/big-response`.
pub const BIG_RESPONSE_CHUNK: usize = 16 * 1024;
const WAIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Given a bearer token, `Some(app id)` when it is an app-only token the
/// double should accept (see [`EwsOptions::app_tokens`]).
pub type AppTokenPolicy = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Start-up options for [`FakeEws::start_with`].
#[derive(Clone)]
pub struct EwsOptions {
    pub validator: TokenValidator,
    /// Offer only `http/1.1` in ALPN (default: `h2` and `http/1.1`).
    pub http1_only: bool,
    /// App-only tokens: a token this names is accepted (before the
    /// validator is asked) only with `X-AnchorMailbox` and, on a SOAP
    /// request, an `ExchangeImpersonation` header naming that mailbox.
    /// `None` (the default): no token is app-only.
    pub app_tokens: Option<AppTokenPolicy>,
}

impl EwsOptions {
    pub fn new(validator: TokenValidator) -> Self {
        EwsOptions {
            validator,
            http1_only: false,
            app_tokens: None,
        }
    }
}

impl std::fmt::Debug for EwsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EwsOptions")
            .field("validator", &self.validator)
            .field("http1_only", &self.http1_only)
            .field("app_tokens", &self.app_tokens.is_some())
            .finish()
    }
}

/// One request received by the fake EWS (accepted or not).
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: Method,
    /// Full request URI as hyper saw it (for HTTP/2 it includes scheme + authority).
    pub uri: Uri,
    pub path_and_query: String,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Token from `Authorization: Bearer <token>`, if any.
    pub bearer: Option<String>,
    /// Mailbox the token belongs to (if it validated); for an app-only
    /// token, the mailbox the request impersonated (or, without a SOAP
    /// body, its `X-AnchorMailbox`).
    pub mailbox: Option<String>,
    /// `Some(app id)` when the token was app-only (accepted or not).
    pub app_id: Option<String>,
    /// Passed authentication (valid token and not force-rejected).
    pub accepted: bool,
    /// Status answered.
    pub status: u16,
}

impl RecordedRequest {
    /// First value of header `name` as a string (lossy).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    /// All values of header `name`.
    pub fn header_all(&self, name: &str) -> Vec<Vec<u8>> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| v.as_bytes().to_vec())
            .collect()
    }

    /// Headers as `(name, value-bytes)` pairs, in hyper's order.
    pub fn header_pairs(&self) -> Vec<(String, Vec<u8>)> {
        self.headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    /// "HTTP/1.1" or "HTTP/2.0".
    pub fn version_str(&self) -> String {
        format!("{:?}", self.version)
    }
}

/// A one-shot canned answer (see [`FakeEws::respond_next`]).
#[derive(Clone, Debug)]
pub struct CannedResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// Realistic EWS `ErrorServerBusy` SOAP fault (sent by Exchange Online with
/// HTTP 500 when EWS throttling kicks in). Note: real EWS carries the back-off
/// as `<t:MessageXml><t:Value Name="BackOffMilliseconds">N</t:Value></t:MessageXml>`.
pub fn server_busy_body(backoff_ms: u64) -> String {
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Header><h:ServerVersionInfo MajorVersion="15" MinorVersion="20" MajorBuildNumber="7918" MinorBuildNumber="31" Version="V2018_01_08" xmlns:h="http://schemas.microsoft.com/exchange/services/2006/types" xmlns="http://schemas.microsoft.com/exchange/services/2006/types" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"/></s:Header><s:Body><s:Fault><faultcode xmlns:a="http://schemas.microsoft.com/exchange/services/2006/types">a:ErrorServerBusy</faultcode><faultstring xml:lang="en-US">The server cannot service this request right now. Try again later.</faultstring><detail><e:ResponseCode xmlns:e="http://schemas.microsoft.com/exchange/services/2006/errors">ErrorServerBusy</e:ResponseCode><e:Message xmlns:e="http://schemas.microsoft.com/exchange/services/2006/errors">The server cannot service this request right now. Try again later.</e:Message><t:MessageXml xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types"><t:Value Name="BackOffMilliseconds">{backoff_ms}</t:Value></t:MessageXml></detail></s:Fault></s:Body></s:Envelope>"#
    )
}

/// An Exchange Online SOAP fault: `code` is the EWS response code (also the
/// `faultcode`), `message` its text.
pub fn soap_fault_body(code: &str, message: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><s:Fault><faultcode xmlns:a="http://schemas.microsoft.com/exchange/services/2006/types">a:{code}</faultcode><faultstring xml:lang="en-US">{message}</faultstring><detail><e:ResponseCode xmlns:e="http://schemas.microsoft.com/exchange/services/2006/errors">{code}</e:ResponseCode><e:Message xmlns:e="http://schemas.microsoft.com/exchange/services/2006/errors">{message}</e:Message></detail></s:Fault></s:Body></s:Envelope>"#
    )
}

/// Exchange's answer to an app-only token without impersonation.
pub const MISSING_IMPERSONATION: (&str, &str) = (
    "ErrorInvalidExchangeImpersonationHeaderData",
    "ExchangeImpersonation SOAP header must be present for this type of OAuth token.",
);
/// The double's answer to an app-only token without `X-AnchorMailbox`
/// (HTTP 400).
pub const MISSING_ANCHOR: (&str, &str) = (
    "ErrorInvalidExchangeImpersonationHeaderData",
    "X-AnchorMailbox header must be present for this type of OAuth token.",
);
/// Exchange's answer to an impersonation of another mailbox than the anchor.
pub const IMPERSONATION_DENIED: (&str, &str) = (
    "ErrorImpersonateUserDenied",
    "The account does not have permission to impersonate the requested user.",
);

fn soap_fault(status: u16, (code, message): (&str, &str)) -> CannedResponse {
    CannedResponse {
        status,
        headers: vec![(
            "content-type".to_string(),
            "text/xml; charset=utf-8".to_string(),
        )],
        body: Bytes::from(soap_fault_body(code, message)),
    }
}

/// HTTP 500 + `text/xml` + [`server_busy_body`], ready for [`FakeEws::respond_next_canned`].
pub fn server_busy_response(backoff_ms: u64) -> CannedResponse {
    CannedResponse {
        status: 500,
        headers: vec![(
            "content-type".to_string(),
            "text/xml; charset=utf-8".to_string(),
        )],
        body: Bytes::from(server_busy_body(backoff_ms)),
    }
}

/// Byte `i` of the deterministic `/big-response` content.
pub fn big_response_byte(i: u64) -> u8 {
    const PATTERN: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    PATTERN[(i % PATTERN.len() as u64) as usize]
}

/// The full expected `/big-response?bytes=n` body.
pub fn expected_big_response(n: u64) -> Vec<u8> {
    (0..n).map(big_response_byte).collect()
}

struct Inner {
    records: Vec<RecordedRequest>,
    reject_next: usize,
    canned: VecDeque<CannedResponse>,
    delay: Duration,
}

struct EwsState {
    validator: TokenValidator,
    app_tokens: Option<AppTokenPolicy>,
    inner: Mutex<Inner>,
    count_tx: watch::Sender<usize>,
}

/// The running fake EWS. Shuts down when dropped.
pub struct FakeEws {
    server: ServerHandle,
    state: Arc<EwsState>,
}

impl std::fmt::Debug for FakeEws {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeEws")
            .field("addr", &self.addr())
            .finish()
    }
}

impl FakeEws {
    /// Starts offering `h2` and `http/1.1`.
    pub async fn start(validator: TokenValidator) -> FakeEws {
        Self::start_with(EwsOptions::new(validator)).await
    }

    /// Starts with options; the listener is bound on return.
    pub async fn start_with(opts: EwsOptions) -> FakeEws {
        let (count_tx, _) = watch::channel(0usize);
        let state = Arc::new(EwsState {
            validator: opts.validator,
            app_tokens: opts.app_tokens,
            inner: Mutex::new(Inner {
                records: Vec::new(),
                reject_next: 0,
                canned: VecDeque::new(),
                delay: Duration::ZERO,
            }),
            count_tx,
        });
        let mode = if opts.http1_only {
            HttpMode::Http1Only
        } else {
            HttpMode::Auto
        };
        let st = state.clone();
        let server = spawn_tls_server(mode, move |req| {
            let st = st.clone();
            async move { handle(st, req).await }
        })
        .await;
        FakeEws { server, state }
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.server.addr()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.server.connections()
    }

    /// `https://127.0.0.1:PORT`
    pub fn base_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr().port())
    }

    /// `https://localhost:PORT`
    pub fn localhost_url(&self) -> String {
        format!("https://localhost:{}", self.addr().port())
    }

    /// `{base}/EWS/Exchange.asmx`
    pub fn ews_url(&self) -> String {
        format!("{}/EWS/Exchange.asmx", self.base_url())
    }

    // ---- records -----------------------------------------------------------

    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.state.inner).records.clone()
    }

    pub fn last_request(&self) -> Option<RecordedRequest> {
        lock(&self.state.inner).records.last().cloned()
    }

    pub fn request_count(&self) -> usize {
        lock(&self.state.inner).records.len()
    }

    pub fn accepted_count(&self) -> usize {
        lock(&self.state.inner)
            .records
            .iter()
            .filter(|r| r.accepted)
            .count()
    }

    pub fn rejected_count(&self) -> usize {
        lock(&self.state.inner)
            .records
            .iter()
            .filter(|r| !r.accepted)
            .count()
    }

    /// Forgets recorded requests (fault switches are kept).
    pub fn clear(&self) {
        lock(&self.state.inner).records.clear();
        self.state.count_tx.send_replace(0);
    }

    /// Waits (≤ 10 s, then panics) until at least `n` requests are recorded.
    pub async fn wait_for_requests(&self, n: usize) {
        let mut rx = self.state.count_tx.subscribe();
        tokio::time::timeout(WAIT_TIMEOUT, rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("fewer than {n} EWS requests within {WAIT_TIMEOUT:?}"))
            .expect("watch sender alive");
    }

    // ---- faults ------------------------------------------------------------

    /// The next `n` requests get the Exchange 401 even with a valid token.
    pub fn reject_next(&self, n: usize) {
        lock(&self.state.inner).reject_next = n;
    }

    /// Queues a one-shot canned answer for the next authenticated request
    /// (several calls queue several answers, used in order).
    pub fn respond_next(&self, status: u16, headers: &[(&str, &str)], body: impl Into<Bytes>) {
        self.respond_next_canned(CannedResponse {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.into(),
        });
    }

    pub fn respond_next_canned(&self, canned: CannedResponse) {
        lock(&self.state.inner).canned.push_back(canned);
    }

    /// Sleep this long (after reading the body) before answering each request.
    pub fn set_delay(&self, d: Duration) {
        lock(&self.state.inner).delay = d;
    }
}

/// The Exchange Online 401 (empty body).
pub fn unauthorized_response() -> Response<RespBody> {
    Response::builder()
        .status(StatusCode::UNAUTHORIZED)
        .header(header::WWW_AUTHENTICATE, EWS_WWW_AUTHENTICATE)
        .header("x-ms-diagnostics", EWS_X_MS_DIAGNOSTICS)
        .header("request-id", random_uuid())
        .header(header::CONTENT_LENGTH, "0")
        .body(empty())
        .expect("response")
}

fn bearer_token(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
        .filter(|t| !t.is_empty())
}

fn query_param(uri: &Uri, name: &str) -> Option<String> {
    url::form_urlencoded::parse(uri.query()?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

enum Plan {
    Status(StatusCode),
    Unauthorized,
    Canned(CannedResponse),
    Echo,
    Big,
}

async fn handle(state: Arc<EwsState>, req: Request<Incoming>) -> Response<RespBody> {
    let (parts, body) = req.into_parts();
    let body = read_body_limited(body, EWS_MAX_BODY).await;
    let bearer = bearer_token(&parts.headers);
    let app_id = bearer
        .as_deref()
        .and_then(|t| state.app_tokens.as_ref().and_then(|policy| policy(t)));
    // An app-only token: what it acts as, or Exchange's fault.
    let app = match (&app_id, &body) {
        (Some(_), Ok(body)) => Some(app_mailbox(&parts.headers, body)),
        _ => None,
    };
    let mailbox = match &app {
        Some(Ok(mailbox)) => Some(mailbox.clone()),
        Some(Err(_)) => None,
        None => bearer.as_deref().and_then(|t| state.validator.validate(t)),
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());

    let (plan, delay, body, count) = {
        let mut inner = lock(&state.inner);
        let mut accepted = false;
        let (plan, body) = match body {
            Err(BodyError::TooLarge) => (Plan::Status(StatusCode::PAYLOAD_TOO_LARGE), Bytes::new()),
            Err(BodyError::Io) => (Plan::Status(StatusCode::BAD_REQUEST), Bytes::new()),
            Ok(body) => {
                let plan = if inner.reject_next > 0 {
                    inner.reject_next -= 1;
                    Plan::Unauthorized
                } else if let Some(Err(fault)) = app {
                    Plan::Canned(fault)
                } else if mailbox.is_none() {
                    Plan::Unauthorized
                } else {
                    accepted = true;
                    match inner.canned.pop_front() {
                        Some(c) => Plan::Canned(c),
                        None if parts.uri.path() == "/big-response" => Plan::Big,
                        None => Plan::Echo,
                    }
                };
                (plan, body)
            }
        };
        let status = match &plan {
            Plan::Status(s) => s.as_u16(),
            Plan::Unauthorized => 401,
            Plan::Canned(c) => c.status,
            Plan::Echo | Plan::Big => 200,
        };
        inner.records.push(RecordedRequest {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            path_and_query: path_and_query.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            body: body.clone(),
            bearer: bearer.clone(),
            mailbox: if accepted { mailbox.clone() } else { None },
            app_id,
            accepted,
            status,
        });
        (plan, inner.delay, body, inner.records.len())
    };
    state.count_tx.send_modify(|c| *c = count);

    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    match plan {
        Plan::Status(s) => Response::builder()
            .status(s)
            .body(empty())
            .expect("response"),
        Plan::Unauthorized => unauthorized_response(),
        Plan::Canned(c) => {
            let mut b = Response::builder().status(c.status);
            for (k, v) in &c.headers {
                b = b.header(k.as_str(), v.as_str());
            }
            b.body(full(c.body)).expect("canned response")
        }
        Plan::Echo | Plan::Big => {
            let mut resp = if matches!(plan, Plan::Big) {
                let total: u64 = query_param(&parts.uri, "bytes")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let chunk: usize = query_param(&parts.uri, "chunk")
                    .and_then(|v| v.parse().ok())
                    .filter(|c: &usize| *c > 0)
                    .unwrap_or(BIG_RESPONSE_CHUNK);
                let chunk_delay = query_param(&parts.uri, "chunk_delay_ms")
                    .and_then(|v| v.parse().ok())
                    .map(Duration::from_millis)
                    .unwrap_or(Duration::ZERO);
                let mut r = Response::new(
                    PatternBody {
                        pos: 0,
                        total,
                        chunk,
                        delay: chunk_delay,
                        sleep: None,
                    }
                    .boxed(),
                );
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                r
            } else {
                let mut r = Response::new(full(body.clone()));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/xml; charset=utf-8"),
                );
                r
            };
            let h = resp.headers_mut();
            let mut put = |name: &'static str, v: HeaderValue| {
                h.insert(HeaderName::from_static(name), v);
            };
            put(
                "x-echo-method",
                HeaderValue::from_str(parts.method.as_str()).expect("method"),
            );
            put(
                "x-echo-path-and-query",
                HeaderValue::from_bytes(path_and_query.as_bytes())
                    .unwrap_or_else(|_| HeaderValue::from_static("?")),
            );
            put(
                "x-echo-mailbox",
                HeaderValue::from_bytes(mailbox.unwrap_or_default().as_bytes())
                    .unwrap_or_else(|_| HeaderValue::from_static("?")),
            );
            put(
                "x-echo-http-version",
                HeaderValue::from_str(&format!("{:?}", parts.version)).expect("version"),
            );
            put("x-echo-body-len", HeaderValue::from(body.len()));
            put(
                "request-id",
                HeaderValue::from_str(&random_uuid()).expect("uuid"),
            );
            resp
        }
    }
}

/// The mailbox a request with an app-only token acts as: its
/// `X-AnchorMailbox`, which a SOAP request must also impersonate.
fn app_mailbox(headers: &HeaderMap, body: &[u8]) -> Result<String, CannedResponse> {
    let anchor = headers
        .get("x-anchormailbox")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| soap_fault(400, MISSING_ANCHOR))?;
    match impersonated(body) {
        EwsBody::Other => Ok(anchor.to_string()),
        EwsBody::Malformed => Err(CannedResponse {
            status: 400,
            headers: Vec::new(),
            body: Bytes::new(),
        }),
        EwsBody::Envelope(None) => Err(soap_fault(500, MISSING_IMPERSONATION)),
        EwsBody::Envelope(Some(named)) if named.eq_ignore_ascii_case(anchor) => Ok(named),
        EwsBody::Envelope(Some(_)) => Err(soap_fault(500, IMPERSONATION_DENIED)),
    }
}

/// What a request body says about impersonation.
#[derive(Debug, PartialEq, Eq)]
pub enum EwsBody {
    /// Not an XML document with a SOAP `Envelope` root.
    Other,
    /// An envelope, not well-formed.
    Malformed,
    /// An envelope, and the address its `ExchangeImpersonation` header
    /// names (trimmed; a `SID` is given as `SID:<sid>`), if it has one.
    Envelope(Option<String>),
}

/// Reads `body` as Exchange would: `Envelope/Header/ExchangeImpersonation/
/// ConnectingSID/(PrimarySmtpAddress|SmtpAddress|PrincipalName|SID)`.
pub fn impersonated(body: &[u8]) -> EwsBody {
    use quick_xml::events::Event;
    use quick_xml::name::{Namespace, ResolveResult};
    const SOAP: [&[u8]; 2] = [
        b"http://schemas.xmlsoap.org/soap/envelope/",
        b"http://www.w3.org/2003/05/soap-envelope",
    ];
    const TYPES: &[u8] = b"http://schemas.microsoft.com/exchange/services/2006/types";
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let mut reader = quick_xml::reader::NsReader::from_reader(body);
    // (namespace, local name) of the open elements.
    let mut path: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut named: Option<String> = None;
    let mut sid = false;
    let mut text = String::new();
    let mut root_seen = false;
    // Whether `path` (plus the element being opened) is where the address is.
    let at_address = |path: &[(Vec<u8>, Vec<u8>)]| {
        let names: Vec<(&[u8], &[u8])> = path
            .iter()
            .map(|(ns, l)| (ns.as_slice(), l.as_slice()))
            .collect();
        matches!(
            names.as_slice(),
            [(e, b"Envelope"), (h, b"Header"), (TYPES, b"ExchangeImpersonation"), (TYPES, b"ConnectingSID"), (TYPES, b"PrimarySmtpAddress" | b"SmtpAddress" | b"PrincipalName" | b"SID")]
                if SOAP.contains(e) && e == h
        )
    };
    // Closes the innermost element; an address element gives its text.
    let close =
        |path: &mut Vec<(Vec<u8>, Vec<u8>)>, text: &str, sid: bool, named: &mut Option<String>| {
            if at_address(path) {
                let value = text.trim();
                *named = Some(if sid {
                    format!("SID:{value}")
                } else {
                    value.to_string()
                });
            }
            path.pop();
        };
    loop {
        let (ns, event) = match reader.read_resolved_event() {
            Ok((ResolveResult::Bound(Namespace(ns)), event)) => (ns.to_vec(), event),
            Ok((_, event)) => (Vec::new(), event),
            Err(_) if root_seen => return EwsBody::Malformed,
            Err(_) => return EwsBody::Other,
        };
        let empty = matches!(event, Event::Empty(_));
        match event {
            Event::Start(e) | Event::Empty(e) => {
                let local = e.local_name().as_ref().to_vec();
                if !root_seen {
                    if !(SOAP.contains(&ns.as_slice()) && local == b"Envelope") {
                        return EwsBody::Other;
                    }
                    root_seen = true;
                }
                path.push((ns, local));
                if at_address(&path) {
                    sid = path.last().is_some_and(|(_, l)| l == b"SID");
                    text.clear();
                }
                if empty {
                    close(&mut path, &text, sid, &mut named);
                }
            }
            Event::End(_) => close(&mut path, &text, sid, &mut named),
            Event::Text(t) if at_address(&path) => match t.decode() {
                Ok(t) => text.push_str(&t),
                Err(_) => return EwsBody::Malformed,
            },
            Event::CData(t) if at_address(&path) => match t.decode() {
                Ok(t) => text.push_str(&t),
                Err(_) => return EwsBody::Malformed,
            },
            Event::GeneralRef(r) if at_address(&path) => {
                let c = match r.resolve_char_ref() {
                    Ok(Some(c)) => c,
                    Ok(None) => match &*r {
                        b"lt" => '<',
                        b"gt" => '>',
                        b"amp" => '&',
                        b"apos" => '\'',
                        b"quot" => '"',
                        _ => return EwsBody::Malformed,
                    },
                    Err(_) => return EwsBody::Malformed,
                };
                text.push(c);
            }
            Event::Eof if !root_seen => return EwsBody::Other,
            Event::Eof if !path.is_empty() => return EwsBody::Malformed,
            Event::Eof => return EwsBody::Envelope(named),
            _ => {}
        }
    }
}

/// Streams `total` deterministic bytes in `chunk`-sized frames, sleeping
/// `delay` between frames (not before the first one).
struct PatternBody {
    pos: u64,
    total: u64,
    chunk: usize,
    delay: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if this.pos >= this.total {
            return Poll::Ready(None);
        }
        if this.pos > 0 && !this.delay.is_zero() {
            let delay = this.delay;
            let sleep = this
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
            ready!(sleep.as_mut().poll(cx));
            this.sleep = None;
        }
        let n = (this.total - this.pos).min(this.chunk as u64);
        let data: Vec<u8> = (this.pos..this.pos + n).map(big_response_byte).collect();
        this.pos += n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(data)))))
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.total
    }
}
