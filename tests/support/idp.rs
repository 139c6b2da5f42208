//! Fake Microsoft identity platform (Entra ID v2.0 endpoints) over TLS /
//! HTTP/1.1: `/{tenant}/oauth2/v2.0/token` (refresh_token, device_code and
//! authorization_code grants, the last with PKCE S256 and single-use
//! codes) and `/{tenant}/oauth2/v2.0/devicecode`, with Microsoft-shaped
//! error bodies, fault switches, request records and a [`TokenValidator`]
//! that the fake EWS uses to check the access tokens issued here. The
//! browser-facing `/{tenant}/oauth2/v2.0/authorize` is also served over
//! plain HTTP ([`FakeIdp::authorize_endpoint`]), because test browsers
//! speak plain HTTP: it signs in a configurable account at once (no login
//! page) and redirects with a code, or with a configured error. Grants
//! that asked for `openid` carry an ID token (unsigned-looking JWT with
//! `iss`, `aud`, `exp`, `iat`, `nonce`, `tid`, `oid`, `preferred_username`).
//!
//! App-only access: [`FakeIdp::register_app`] registers an app with a client
//! secret or a certificate under a tenant path segment, and the
//! `client_credentials` grant on that tenant's token endpoint authenticates
//! it (secrets, or `client_assertion` JWTs checked for signature, `x5t#S256`,
//! `aud`, `iss`/`sub`, `exp`, lifetime and single-use `jti`), with the
//! Microsoft errors for unknown apps (AADSTS700016), wrong (7000215) or
//! expired (7000222) secrets and bad assertions (700027). The app tokens it
//! issues are checked with [`TokenValidator::app_token`] and
//! [`TokenValidator::accepts_for`].

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, Method, StatusCode};
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde_json::{json, Value};
use tokio::sync::watch;

use super::server::{
    full, lock, random_hex, random_uuid, read_body_limited, spawn_plain_server, spawn_tls_server,
    utc_timestamp, BodyError, HttpMode, RespBody, ServerHandle,
};

/// Largest accepted request body (bigger → 413).
pub const IDP_MAX_BODY: usize = 64 * 1024;
/// The `grant_type` value of the device authorization grant (RFC 8628).
pub const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// Scope recorded on seeded refresh tokens when nothing else is known.
pub const DEFAULT_EWS_SCOPE: &str = "https://outlook.office365.com/EWS.AccessAsUser.All";
/// The `grant_type` of the authorization code grant.
pub const AUTH_CODE_GRANT: &str = "authorization_code";
/// Tenant id (`tid`) of signed-in accounts unless set otherwise.
pub const DEFAULT_TID: &str = "9188040d-6c67-4c5b-b112-36a304b66dad";
/// The `grant_type` of the client-credentials grant (app-only access).
pub const CLIENT_CREDENTIALS_GRANT: &str = "client_credentials";
/// `client_assertion_type` of JWT client assertions (RFC 7523).
pub const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Longest accepted client assertion lifetime (`exp` - `nbf`, or - `iat`), seconds.
pub const MAX_ASSERTION_LIFETIME: u64 = 600;
/// How long `wait_for_device_code` waits before panicking.
const WAIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Start-up options for [`FakeIdp::start_with`].
#[derive(Clone, Debug)]
pub struct IdpOptions {
    /// The only client id accepted (default `test-client-id`).
    pub client_id: String,
    /// If set, token requests must carry this secret (body or Basic auth).
    pub client_secret: Option<String>,
    /// If true, a refresh token is revoked as soon as it is used.
    pub revoke_on_rotation: bool,
    /// `interval` advertised by the devicecode endpoint (seconds, default 1).
    pub interval: u64,
    /// Access-token lifetime (`expires_in`, default 3600); see `set_expires_in`.
    pub expires_in: u64,
    /// Device code lifetime (`expires_in` of the devicecode answer, default 900).
    pub device_code_expires_in: u64,
}

impl Default for IdpOptions {
    fn default() -> Self {
        IdpOptions {
            client_id: "test-client-id".to_string(),
            client_secret: None,
            revoke_on_rotation: false,
            interval: 1,
            expires_in: 3600,
            device_code_expires_in: 900,
        }
    }
}

/// How the client authenticated on a token/devicecode request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// No client id at all.
    None,
    /// `client_id` (and maybe `client_secret`) in the form body.
    Body,
    /// `Authorization: Basic` (RFC 6749 §2.3.1).
    Basic,
}

/// Which endpoint a recorded request hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdpEndpoint {
    Token,
    DeviceCode,
    /// The browser-facing authorization endpoint (GET, query parameters
    /// recorded as `form`).
    Authorize,
    /// Anything else (answered 404, or 503/429 while faulted).
    Other,
}

/// One request received by the fake IdP.
#[derive(Clone, Debug)]
pub struct IdpRequestRecord {
    pub method: Method,
    pub path: String,
    pub endpoint: IdpEndpoint,
    /// Tenant segment of the path (empty for `Other`).
    pub tenant: String,
    pub headers: HeaderMap,
    /// Decoded form fields, in order.
    pub form: Vec<(String, String)>,
    pub grant_type: Option<String>,
    pub scope: Option<String>,
    /// Client id as received (from Basic auth or the body).
    pub client_id: Option<String>,
    pub client_auth: ClientAuth,
    /// Status code answered (0 while the request is still being handled).
    pub status: u16,
}

impl IdpRequestRecord {
    /// First value of form field `name`.
    pub fn form_value(&self, name: &str) -> Option<&str> {
        form_get(&self.form, name)
    }
}

/// The account the authorize endpoint signs in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedInAccount {
    /// `preferred_username` (the UPN); the tokens belong to this mailbox.
    pub upn: String,
    /// `oid`.
    pub oid: String,
    /// `tid`.
    pub tid: String,
}

impl SignedInAccount {
    /// `upn` with a stable `oid` derived from it and [`DEFAULT_TID`].
    pub fn new(upn: &str) -> SignedInAccount {
        SignedInAccount {
            upn: upn.to_string(),
            oid: oid_for(upn),
            tid: DEFAULT_TID.to_string(),
        }
    }
}

/// A stable object id for a UPN.
pub fn oid_for(upn: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    upn.to_ascii_lowercase().hash(&mut h);
    let a = h.finish();
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        (a >> 52) & 0xfff,
        a & 0xffff_ffff_ffff
    )
}

/// An authorization code handed out by the authorize endpoint.
#[derive(Clone, Debug)]
struct CodeEntry {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    scope: String,
    nonce: Option<String>,
    account: SignedInAccount,
    used: bool,
    expires_at: Instant,
}

#[derive(Clone, Debug)]
struct RefreshEntry {
    mailbox: String,
    scope: String,
    revoked: bool,
}

#[derive(Clone, Debug)]
struct AccessEntry {
    mailbox: String,
    expires_at: Instant,
    revoked: bool,
}

/// A credential of an app registration (see [`FakeIdp::register_app`]).
#[derive(Clone)]
pub enum AppCredential {
    /// A client secret.
    Secret(String),
    /// A certificate (DER); the app signs client assertions with its key.
    Certificate { cert_der: Vec<u8> },
}

impl std::fmt::Debug for AppCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppCredential::Secret(_) => f.write_str("Secret(<redacted>)"),
            AppCredential::Certificate { cert_der } => f
                .debug_struct("Certificate")
                .field("x5t#S256", &thumbprint_s256(cert_der))
                .finish(),
        }
    }
}

/// Who an app-only access token was issued to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppToken {
    /// Tenant path segment of the token request.
    pub tenant: String,
    pub client_id: String,
}

/// An app registration under one tenant path segment.
#[derive(Clone, Debug, Default)]
struct AppRegistration {
    credentials: Vec<AppCredential>,
    /// Its secrets answer AADSTS7000222 (expired).
    secret_expired: bool,
    /// Mailboxes its tokens may access (None: all), lower case.
    mailboxes: Option<Vec<String>>,
}

#[derive(Clone, Debug)]
struct AppAccessEntry {
    app: AppToken,
    expires_at: Instant,
    revoked: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum DeviceStatus {
    Pending,
    Approved(String),
    Declined,
    Redeemed,
}

#[derive(Clone, Debug)]
struct DeviceEntry {
    user_code: String,
    scope: String,
    status: DeviceStatus,
    expires_at: Instant,
}

struct Inner {
    opts: IdpOptions,
    counter: u64,
    refresh_tokens: HashMap<String, RefreshEntry>,
    access_tokens: HashMap<String, AccessEntry>,
    issued_access: Vec<String>,
    issued_refresh: Vec<String>,
    devices: HashMap<String, DeviceEntry>,
    user_code_to_device: HashMap<String, String>,
    user_codes: Vec<String>,
    records: Vec<IdpRequestRecord>,
    refresh_calls: usize,
    successful_refreshes: usize,
    /// Requests dropped unanswered (their connection closed first).
    abandoned: usize,
    device_polls: usize,
    token_requests: usize,
    unavailable: bool,
    throttled: bool,
    delay: Duration,
    next_error: Option<(StatusCode, Value)>,
    slow_down_once: bool,
    /// `iss` base of ID tokens (`https://127.0.0.1:PORT`).
    issuer_base: String,
    codes: HashMap<String, CodeEntry>,
    /// Who the authorize endpoint signs in (None: the `login_hint`).
    account: Option<SignedInAccount>,
    /// The next authorize request redirects with this error.
    authorize_error: Option<(String, u32, String)>,
    /// The next authorize request's challenge is stored altered (so the
    /// client's verifier no longer matches).
    tamper_challenge: bool,
    /// When set, authorize refuses other redirect URIs.
    expected_redirect_uri: Option<String>,
    /// The next successful code redemption returns no refresh token (as
    /// when `offline_access` was not granted).
    omit_refresh_token: bool,
    /// App registrations by (tenant segment, client id).
    apps: HashMap<(String, String), AppRegistration>,
    /// App-only access tokens.
    app_tokens: HashMap<String, AppAccessEntry>,
    issued_app: Vec<String>,
    /// `jti`s of client assertions seen so far (single use).
    seen_jti: HashSet<String>,
}

struct IdpState {
    inner: Mutex<Inner>,
    device_codes_tx: watch::Sender<usize>,
    /// While true, requests wait before they are answered.
    held: watch::Sender<bool>,
}

impl IdpState {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    fn validate(&self, token: &str) -> Option<String> {
        let inner = self.inner();
        let e = inner.access_tokens.get(token)?;
        (!e.revoked && Instant::now() < e.expires_at).then(|| e.mailbox.clone())
    }

    fn app_token(&self, token: &str) -> Option<AppToken> {
        let inner = self.inner();
        let e = inner.app_tokens.get(token)?;
        (!e.revoked && Instant::now() < e.expires_at).then(|| e.app.clone())
    }

    fn accepts_for(&self, token: &str, mailbox: &str) -> bool {
        if self
            .validate(token)
            .is_some_and(|mb| mb.eq_ignore_ascii_case(mailbox))
        {
            return true;
        }
        let Some(app) = self.app_token(token) else {
            return false;
        };
        let inner = self.inner();
        match inner.apps.get(&(app.tenant, app.client_id)) {
            Some(reg) => match &reg.mailboxes {
                None => true,
                Some(allowed) => allowed.iter().any(|m| m.eq_ignore_ascii_case(mailbox)),
            },
            None => false,
        }
    }
}

/// Cheap cloneable handle that checks access tokens issued by a [`FakeIdp`].
#[derive(Clone)]
pub struct TokenValidator(Arc<IdpState>);

impl TokenValidator {
    /// Mailbox the token belongs to, if it was issued here, is unexpired and unrevoked.
    /// Delegated tokens only: app tokens give None (see [`Self::accepts_for`]).
    pub fn validate(&self, access_token: &str) -> Option<String> {
        self.0.validate(access_token)
    }

    /// The app an app-only token (client-credentials grant) was issued to,
    /// if it is unexpired and unrevoked.
    pub fn app_token(&self, access_token: &str) -> Option<AppToken> {
        self.0.app_token(access_token)
    }

    /// May `access_token` act on `mailbox`? A delegated token owned by
    /// `mailbox` (as [`Self::validate`]), or an app token whose app may
    /// access it (every mailbox unless [`FakeIdp::restrict_app_mailboxes`]).
    pub fn accepts_for(&self, access_token: &str, mailbox: &str) -> bool {
        self.0.accepts_for(access_token, mailbox)
    }
}

impl std::fmt::Debug for TokenValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenValidator")
    }
}

/// The running fake IdP. Shuts down when dropped.
pub struct FakeIdp {
    server: ServerHandle,
    /// Plain-HTTP listener for the browser-facing authorize endpoint.
    browser: ServerHandle,
    state: Arc<IdpState>,
}

impl FakeIdp {
    /// Starts with default [`IdpOptions`].
    pub async fn start() -> FakeIdp {
        Self::start_with(IdpOptions::default()).await
    }

    /// Starts with the given options; the listener is bound on return.
    pub async fn start_with(opts: IdpOptions) -> FakeIdp {
        let (device_codes_tx, _) = watch::channel(0usize);
        let state = Arc::new(IdpState {
            inner: Mutex::new(Inner {
                opts,
                counter: 0,
                refresh_tokens: HashMap::new(),
                access_tokens: HashMap::new(),
                issued_access: Vec::new(),
                issued_refresh: Vec::new(),
                devices: HashMap::new(),
                user_code_to_device: HashMap::new(),
                user_codes: Vec::new(),
                records: Vec::new(),
                refresh_calls: 0,
                successful_refreshes: 0,
                abandoned: 0,
                device_polls: 0,
                token_requests: 0,
                unavailable: false,
                throttled: false,
                delay: Duration::ZERO,
                next_error: None,
                slow_down_once: false,
                issuer_base: String::new(),
                codes: HashMap::new(),
                account: None,
                authorize_error: None,
                tamper_challenge: false,
                expected_redirect_uri: None,
                omit_refresh_token: false,
                apps: HashMap::new(),
                app_tokens: HashMap::new(),
                issued_app: Vec::new(),
                seen_jti: HashSet::new(),
            }),
            device_codes_tx,
            held: watch::channel(false).0,
        });
        let st = state.clone();
        let server = spawn_tls_server(HttpMode::Http1Only, move |req| {
            let st = st.clone();
            async move { handle(st, req).await }
        })
        .await;
        let st = state.clone();
        let browser = spawn_plain_server(move |req| {
            let st = st.clone();
            async move { handle(st, req).await }
        })
        .await;
        state.inner().issuer_base = format!("https://127.0.0.1:{}", server.addr().port());
        FakeIdp {
            server,
            browser,
            state,
        }
    }

    /// `http://127.0.0.1:PORT/{tenant}/oauth2/v2.0/authorize` on the plain
    /// HTTP listener (what a test browser can follow).
    pub fn authorize_endpoint(&self, tenant: &str) -> String {
        format!(
            "http://127.0.0.1:{}/{}/oauth2/v2.0/authorize",
            self.browser.addr().port(),
            tenant
        )
    }

    /// The authorize endpoint signs in `account` from now on (default: the
    /// request's `login_hint`).
    pub fn set_signin_account(&self, account: Option<SignedInAccount>) {
        self.state.inner().account = account;
    }

    /// The next authorize request redirects back with `error` and an
    /// `error_description` starting `AADSTS{code}: {text}`, plus
    /// `correlation_id` and `trace_id`.
    pub fn fail_next_authorize(&self, error: &str, code: u32, text: &str) {
        self.state.inner().authorize_error = Some((error.into(), code, text.into()));
    }

    /// The next authorize request stores a different PKCE challenge than it
    /// got, so redeeming its code with the client's verifier fails
    /// (AADSTS501481), as a tampered or lost verifier would.
    pub fn tamper_next_challenge(&self) {
        self.state.inner().tamper_challenge = true;
    }

    /// The next successful code redemption answers without a refresh token.
    pub fn omit_next_refresh_token(&self) {
        self.state.inner().omit_refresh_token = true;
    }

    /// Authorize refuses any other `redirect_uri` (like a registration).
    pub fn expect_redirect_uri(&self, uri: &str) {
        self.state.inner().expected_redirect_uri = Some(uri.to_string());
    }

    /// Recorded authorize requests (query parameters in `form`).
    pub fn authorize_requests(&self) -> Vec<IdpRequestRecord> {
        self.state
            .inner()
            .records
            .iter()
            .filter(|r| r.endpoint == IdpEndpoint::Authorize)
            .cloned()
            .collect()
    }

    /// Token requests with the authorization_code grant.
    pub fn code_redemptions(&self) -> Vec<IdpRequestRecord> {
        self.state
            .inner()
            .records
            .iter()
            .filter(|r| r.grant_type.as_deref() == Some(AUTH_CODE_GRANT))
            .cloned()
            .collect()
    }

    // ---- addresses -------------------------------------------------------

    pub fn addr(&self) -> std::net::SocketAddr {
        self.server.addr()
    }

    /// `https://127.0.0.1:PORT` (the authority; no trailing slash).
    pub fn base_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr().port())
    }

    /// `https://localhost:PORT` (also valid for the test certificate).
    pub fn localhost_url(&self) -> String {
        format!("https://localhost:{}", self.addr().port())
    }

    /// `{base}/{tenant}/oauth2/v2.0/token`
    pub fn token_endpoint(&self, tenant: &str) -> String {
        format!("{}/{}/oauth2/v2.0/token", self.base_url(), tenant)
    }

    /// `{base}/{tenant}/oauth2/v2.0/devicecode`
    pub fn device_code_endpoint(&self, tenant: &str) -> String {
        format!("{}/{}/oauth2/v2.0/devicecode", self.base_url(), tenant)
    }

    /// Validator handle for [`super::ews::FakeEws`].
    pub fn validator(&self) -> TokenValidator {
        TokenValidator(self.state.clone())
    }

    // ---- settings --------------------------------------------------------

    pub fn client_id(&self) -> String {
        self.state.inner().opts.client_id.clone()
    }

    /// Lifetime (seconds) of access tokens issued from now on.
    pub fn set_expires_in(&self, secs: u64) {
        self.state.inner().opts.expires_in = secs;
    }

    /// Device-flow polling interval advertised from now on.
    pub fn set_interval(&self, secs: u64) {
        self.state.inner().opts.interval = secs;
    }

    pub fn set_revoke_on_rotation(&self, on: bool) {
        self.state.inner().opts.revoke_on_rotation = on;
    }

    // ---- token seeding / validation ---------------------------------------

    /// Creates a valid refresh token for `mailbox` (scope: [`DEFAULT_EWS_SCOPE`] + offline_access).
    pub fn seed_refresh_token(&self, mailbox: &str) -> String {
        self.seed_refresh_token_with_scope(mailbox, &format!("{DEFAULT_EWS_SCOPE} offline_access"))
    }

    /// Creates a valid refresh token for `mailbox` remembering `scope`
    /// (used when a refresh request carries no `scope`).
    pub fn seed_refresh_token_with_scope(&self, mailbox: &str, scope: &str) -> String {
        let mut inner = self.state.inner();
        let n = next_counter(&mut inner);
        let rt = format!("rt-{n}-{}", random_hex(24));
        inner.refresh_tokens.insert(
            rt.clone(),
            RefreshEntry {
                mailbox: mailbox.to_string(),
                scope: scope.to_string(),
                revoked: false,
            },
        );
        inner.issued_refresh.push(rt.clone());
        rt
    }

    /// Issues an access token for `mailbox` directly (no HTTP round trip).
    pub fn seed_access_token(&self, mailbox: &str) -> String {
        let mut inner = self.state.inner();
        let n = next_counter(&mut inner);
        let at = format!("at-{n}-{}", random_hex(16));
        let expires_at = Instant::now() + Duration::from_secs(inner.opts.expires_in);
        inner.access_tokens.insert(
            at.clone(),
            AccessEntry {
                mailbox: mailbox.to_string(),
                expires_at,
                revoked: false,
            },
        );
        inner.issued_access.push(at.clone());
        at
    }

    /// `Some(mailbox)` if `token` was issued here, is unexpired and not revoked.
    pub fn is_access_token_valid(&self, token: &str) -> Option<String> {
        self.state.validate(token)
    }

    /// `Some(mailbox)` if `rt` is a known, unrevoked refresh token.
    pub fn is_refresh_token_valid(&self, rt: &str) -> Option<String> {
        let inner = self.state.inner();
        let e = inner.refresh_tokens.get(rt)?;
        (!e.revoked).then(|| e.mailbox.clone())
    }

    /// Mailbox a refresh token (valid or not) belongs to.
    pub fn refresh_token_owner(&self, rt: &str) -> Option<String> {
        self.state
            .inner()
            .refresh_tokens
            .get(rt)
            .map(|e| e.mailbox.clone())
    }

    // ---- faults ------------------------------------------------------------

    /// Revokes every refresh token currently held by `mailbox` (→ AADSTS50173).
    /// Tokens seeded/issued afterwards are valid again. Access tokens are
    /// left alone (as in Entra ID); use `revoke_user_access_tokens` for those.
    pub fn revoke_user(&self, mailbox: &str) {
        let mut inner = self.state.inner();
        for e in inner.refresh_tokens.values_mut() {
            if e.mailbox == mailbox {
                e.revoked = true;
            }
        }
    }

    /// Revokes all access tokens of `mailbox`.
    pub fn revoke_user_access_tokens(&self, mailbox: &str) {
        let mut inner = self.state.inner();
        for e in inner.access_tokens.values_mut() {
            if e.mailbox == mailbox {
                e.revoked = true;
            }
        }
    }

    /// Revokes a single refresh token (→ AADSTS50173). Returns false if unknown.
    pub fn revoke_refresh_token(&self, rt: &str) -> bool {
        match self.state.inner().refresh_tokens.get_mut(rt) {
            Some(e) => {
                e.revoked = true;
                true
            }
            None => false,
        }
    }

    /// Makes an access token (delegated or app) invalid for the other
    /// doubles. Returns false if unknown.
    pub fn revoke_access_token(&self, token: &str) -> bool {
        let mut inner = self.state.inner();
        if let Some(e) = inner.access_tokens.get_mut(token) {
            e.revoked = true;
            return true;
        }
        match inner.app_tokens.get_mut(token) {
            Some(e) => {
                e.revoked = true;
                true
            }
            None => false,
        }
    }

    /// Revokes every access token issued so far (app tokens too).
    pub fn revoke_all_access_tokens(&self) {
        let mut inner = self.state.inner();
        for e in inner.access_tokens.values_mut() {
            e.revoked = true;
        }
        for e in inner.app_tokens.values_mut() {
            e.revoked = true;
        }
    }

    /// Marks an access token (delegated or app) as already expired.
    pub fn expire_access_token(&self, token: &str) -> bool {
        let mut inner = self.state.inner();
        if let Some(e) = inner.access_tokens.get_mut(token) {
            e.expires_at = Instant::now();
            return true;
        }
        match inner.app_tokens.get_mut(token) {
            Some(e) => {
                e.expires_at = Instant::now();
                true
            }
            None => false,
        }
    }

    /// While on, every request gets 503 + `Retry-After: 2` (AADSTS90006).
    pub fn set_unavailable(&self, on: bool) {
        self.state.inner().unavailable = on;
    }

    /// While on, every request gets 429 + `Retry-After: 3` (AADSTS90055).
    pub fn set_throttled(&self, on: bool) {
        self.state.inner().throttled = on;
    }

    /// Sleep this long before answering each request.
    pub fn set_delay(&self, d: Duration) {
        self.state.inner().delay = d;
    }

    /// While on, every request is recorded and counted (`refresh_calls`)
    /// but not answered until it is turned off: a refresh that is provably
    /// still in flight, whatever the machine's load. A held request whose
    /// client goes away is never processed (its connection closes, hyper
    /// drops it): it counts in [`FakeIdp::abandoned_requests`] and redeems
    /// nothing.
    pub fn set_held(&self, on: bool) {
        self.state.held.send_replace(on);
    }

    /// The next request (any endpoint) gets exactly this status and JSON body.
    pub fn set_next_error(&self, status: u16, body: Value) {
        let status = StatusCode::from_u16(status).expect("valid status");
        self.state.inner().next_error = Some((status, body));
    }

    /// The next device-code poll answers `slow_down`.
    pub fn slow_down_once(&self) {
        self.state.inner().slow_down_once = true;
    }

    // ---- device flow -------------------------------------------------------

    /// Approves a pending device code for `mailbox`. False if unknown/not pending.
    pub fn approve_device(&self, user_code: &str, mailbox: &str) -> bool {
        self.set_device_status(user_code, DeviceStatus::Approved(mailbox.to_string()))
    }

    /// Declines a pending device code (→ `authorization_declined`).
    pub fn decline_device(&self, user_code: &str) -> bool {
        self.set_device_status(user_code, DeviceStatus::Declined)
    }

    /// Makes a device code expire now (→ `expired_token`).
    pub fn expire_device(&self, user_code: &str) -> bool {
        let mut inner = self.state.inner();
        let Some(dc) = inner.user_code_to_device.get(user_code).cloned() else {
            return false;
        };
        match inner.devices.get_mut(&dc) {
            Some(d) => {
                d.expires_at = Instant::now();
                true
            }
            None => false,
        }
    }

    fn set_device_status(&self, user_code: &str, status: DeviceStatus) -> bool {
        let mut inner = self.state.inner();
        let Some(dc) = inner.user_code_to_device.get(user_code).cloned() else {
            return false;
        };
        match inner.devices.get_mut(&dc) {
            Some(d) if d.status == DeviceStatus::Pending => {
                d.status = status;
                true
            }
            _ => false,
        }
    }

    /// Most recently issued user code.
    pub fn last_user_code(&self) -> Option<String> {
        self.state.inner().user_codes.last().cloned()
    }

    /// All user codes issued, in order.
    pub fn user_codes(&self) -> Vec<String> {
        self.state.inner().user_codes.clone()
    }

    /// Waits (≤ 10 s, then panics) until at least one devicecode request was
    /// answered and returns the latest user code.
    pub async fn wait_for_device_code(&self) -> String {
        self.wait_for_device_codes(1).await;
        self.last_user_code().expect("user code present")
    }

    /// Waits (≤ 10 s, then panics) for the `n`-th (1-based) devicecode
    /// answer and returns that user code.
    pub async fn wait_for_nth_device_code(&self, n: usize) -> String {
        assert!(n >= 1, "n is 1-based");
        self.wait_for_device_codes(n).await;
        self.state.inner().user_codes[n - 1].clone()
    }

    async fn wait_for_device_codes(&self, n: usize) {
        let mut rx = self.state.device_codes_tx.subscribe();
        tokio::time::timeout(WAIT_TIMEOUT, rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("no device code request #{n} within {WAIT_TIMEOUT:?}"))
            .expect("watch sender alive");
    }

    // ---- app-only access (client-credentials grant) -------------------------

    /// Registers (or adds a credential to) app `client_id` under the tenant
    /// path segment `tenant`: client-credentials requests to
    /// `/{tenant}/oauth2/v2.0/token` authenticate against it.
    pub fn register_app(&self, tenant: &str, client_id: &str, credential: AppCredential) {
        self.state
            .inner()
            .apps
            .entry((tenant.to_string(), client_id.to_string()))
            .or_default()
            .credentials
            .push(credential);
    }

    /// The app's (correct) secrets answer 401 `invalid_client` AADSTS7000222
    /// (expired) from now on. False if the app is unknown.
    pub fn expire_app_secret(&self, tenant: &str, client_id: &str) -> bool {
        match self
            .state
            .inner()
            .apps
            .get_mut(&(tenant.to_string(), client_id.to_string()))
        {
            Some(reg) => {
                reg.secret_expired = true;
                true
            }
            None => false,
        }
    }

    /// The app's tokens may access only these mailboxes (like an RBAC for
    /// Applications scope); default: every mailbox. False if unknown.
    pub fn restrict_app_mailboxes(
        &self,
        tenant: &str,
        client_id: &str,
        mailboxes: &[&str],
    ) -> bool {
        match self
            .state
            .inner()
            .apps
            .get_mut(&(tenant.to_string(), client_id.to_string()))
        {
            Some(reg) => {
                reg.mailboxes = Some(mailboxes.iter().map(|m| m.to_ascii_lowercase()).collect());
                true
            }
            None => false,
        }
    }

    /// Issues an app-only access token for app `client_id` of `tenant`
    /// directly (no HTTP round trip); registers the app (without
    /// credentials) if it is unknown.
    pub fn seed_app_token(&self, tenant: &str, client_id: &str) -> String {
        let mut inner = self.state.inner();
        inner
            .apps
            .entry((tenant.to_string(), client_id.to_string()))
            .or_default();
        issue_app_token(&mut inner, tenant, client_id).0
    }

    /// Client-credentials requests to `tenant`'s token endpoint (every
    /// attempt, including failed and faulted ones).
    pub fn client_credentials_calls(&self, tenant: &str) -> usize {
        self.state
            .inner()
            .records
            .iter()
            .filter(|r| {
                r.endpoint == IdpEndpoint::Token
                    && r.tenant == tenant
                    && r.grant_type.as_deref() == Some(CLIENT_CREDENTIALS_GRANT)
            })
            .count()
    }

    /// App-only access tokens issued so far, in order.
    pub fn issued_app_tokens(&self) -> Vec<String> {
        self.state.inner().issued_app.clone()
    }

    /// See [`TokenValidator::app_token`].
    pub fn app_token(&self, access_token: &str) -> Option<AppToken> {
        self.state.app_token(access_token)
    }

    /// See [`TokenValidator::accepts_for`].
    pub fn accepts_for(&self, access_token: &str, mailbox: &str) -> bool {
        self.state.accepts_for(access_token, mailbox)
    }

    // ---- counters and records ---------------------------------------------

    /// Requests with `grant_type=refresh_token` (including failed/faulted ones).
    pub fn refresh_calls(&self) -> usize {
        self.state.inner().refresh_calls
    }

    /// Refresh grants answered with tokens.
    pub fn successful_refreshes(&self) -> usize {
        self.state.inner().successful_refreshes
    }

    /// Requests (recorded and counted) that were dropped before they were
    /// processed because their client's connection closed, e.g. held ones
    /// ([`FakeIdp::set_held`]) of a killed process.
    pub fn abandoned_requests(&self) -> usize {
        self.state.inner().abandoned
    }

    /// Requests with the device_code grant type.
    pub fn device_polls(&self) -> usize {
        self.state.inner().device_polls
    }

    /// All requests to a token endpoint (any method, any grant).
    pub fn token_requests(&self) -> usize {
        self.state.inner().token_requests
    }

    /// Requests to a devicecode endpoint.
    pub fn device_code_requests(&self) -> usize {
        self.state
            .inner()
            .records
            .iter()
            .filter(|r| r.endpoint == IdpEndpoint::DeviceCode)
            .count()
    }

    /// The `scope` parameter of each token-endpoint request, in order
    /// (empty string when the request had no `scope`).
    pub fn requested_scopes(&self) -> Vec<String> {
        self.state
            .inner()
            .records
            .iter()
            .filter(|r| r.endpoint == IdpEndpoint::Token)
            .map(|r| r.scope.clone().unwrap_or_default())
            .collect()
    }

    /// Tenant path segment of every token/devicecode request, in order.
    pub fn tenants(&self) -> Vec<String> {
        self.state
            .inner()
            .records
            .iter()
            .filter(|r| matches!(r.endpoint, IdpEndpoint::Token | IdpEndpoint::DeviceCode))
            .map(|r| r.tenant.clone())
            .collect()
    }

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<IdpRequestRecord> {
        self.state.inner().records.clone()
    }

    /// Access tokens issued so far (including seeded), in order.
    pub fn issued_access_tokens(&self) -> Vec<String> {
        self.state.inner().issued_access.clone()
    }

    /// Refresh tokens issued so far (including seeded), in order.
    pub fn issued_refresh_tokens(&self) -> Vec<String> {
        self.state.inner().issued_refresh.clone()
    }
}

impl std::fmt::Debug for FakeIdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeIdp")
            .field("addr", &self.addr())
            .finish()
    }
}

// ---- request handling -------------------------------------------------------

fn next_counter(inner: &mut Inner) -> u64 {
    inner.counter += 1;
    inner.counter
}

fn form_get<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn parse_route(path: &str) -> (IdpEndpoint, String) {
    let segs: Vec<&str> = path.split('/').collect();
    if let ["", tenant, "oauth2", "v2.0", last] = segs.as_slice() {
        if !tenant.is_empty() {
            match *last {
                "token" => return (IdpEndpoint::Token, tenant.to_string()),
                "devicecode" => return (IdpEndpoint::DeviceCode, tenant.to_string()),
                "authorize" => return (IdpEndpoint::Authorize, tenant.to_string()),
                _ => {}
            }
        }
    }
    (IdpEndpoint::Other, String::new())
}

fn url_decode(s: &str) -> String {
    // Reuse the form decoder: `+` → space, `%XX` → byte.
    let encoded = format!("v={}", s.replace('&', "%26"));
    url::form_urlencoded::parse(encoded.as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// (how, client_id, client_secret)
fn client_credentials(
    headers: &HeaderMap,
    form: &[(String, String)],
) -> (ClientAuth, Option<String>, Option<String>) {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.to_str().unwrap_or("");
        if v.len() > 6 && v[..6].eq_ignore_ascii_case("basic ") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(v[6..].trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok());
            return match decoded.as_deref().and_then(|d| d.split_once(':')) {
                Some((id, secret)) => (
                    ClientAuth::Basic,
                    Some(url_decode(id)),
                    Some(url_decode(secret)),
                ),
                None => (ClientAuth::Basic, None, None),
            };
        }
    }
    match form_get(form, "client_id") {
        Some(id) => (
            ClientAuth::Body,
            Some(id.to_string()),
            form_get(form, "client_secret").map(str::to_string),
        ),
        None => (ClientAuth::None, None, None),
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<RespBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store, no-cache")
        .header(header::PRAGMA, "no-cache")
        .header("x-ms-request-id", random_uuid())
        .body(full(serde_json::to_vec(body).expect("json")))
        .expect("response")
}

/// A Microsoft-shaped error body (`error`, `error_description` starting with
/// `AADSTSnnnnn:`, `error_codes`, `timestamp`, `trace_id`, `correlation_id`, `error_uri`).
pub fn ms_error_body(error: &str, code: u32, text: &str) -> Value {
    let trace_id = random_uuid();
    let correlation_id = random_uuid();
    let timestamp = utc_timestamp();
    json!({
        "error": error,
        "error_description": format!(
            "AADSTS{code}: {text} Trace ID: {trace_id} Correlation ID: {correlation_id} Timestamp: {timestamp}"
        ),
        "error_codes": [code],
        "timestamp": timestamp,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
    })
}

fn ms_error(status: StatusCode, error: &str, code: u32, text: &str) -> Response<RespBody> {
    json_response(status, &ms_error_body(error, code, text))
}

fn missing_param(name: &str) -> Response<RespBody> {
    ms_error(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        900144,
        &format!("The request body must contain the following parameter: '{name}'."),
    )
}

fn with_retry_after(mut resp: Response<RespBody>, secs: u32) -> Response<RespBody> {
    resp.headers_mut()
        .insert(header::RETRY_AFTER, http::HeaderValue::from(secs));
    resp
}

async fn handle(state: Arc<IdpState>, req: Request<Incoming>) -> Response<RespBody> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let (endpoint, tenant) = parse_route(&path);
    let body = read_body_limited(body, IDP_MAX_BODY).await;
    let too_large = matches!(body, Err(BodyError::TooLarge));
    let body = body.unwrap_or_default();
    let form: Vec<(String, String)> = if endpoint == IdpEndpoint::Authorize {
        url::form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    } else {
        url::form_urlencoded::parse(&body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    };
    let (client_auth, client_id, client_secret) = client_credentials(&parts.headers, &form);
    let grant_type = form_get(&form, "grant_type").map(str::to_string);

    // Record + count, then take the delay / fault snapshot.
    let (idx, delay) = {
        let mut inner = state.inner();
        if endpoint == IdpEndpoint::Token {
            inner.token_requests += 1;
            match grant_type.as_deref() {
                Some("refresh_token") => inner.refresh_calls += 1,
                Some(DEVICE_CODE_GRANT) => inner.device_polls += 1,
                _ => {}
            }
        }
        inner.records.push(IdpRequestRecord {
            method: parts.method.clone(),
            path: path.clone(),
            endpoint,
            tenant: tenant.clone(),
            headers: parts.headers.clone(),
            form: form.clone(),
            grant_type: grant_type.clone(),
            scope: form_get(&form, "scope").map(str::to_string),
            client_id: client_id.clone(),
            client_auth,
            status: 0,
        });
        (inner.records.len() - 1, inner.delay)
    };
    // Counts the request as abandoned if hyper drops it (its connection
    // closed) before it is processed below.
    let abandoned = Abandoned(Some(state.clone()));
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let _ = state.held.subscribe().wait_for(|held| !*held).await;
    abandoned.processed();

    let resp = respond(
        &state,
        &parts.method,
        endpoint,
        &tenant,
        too_large,
        &form,
        client_id,
        client_secret,
    );
    state.inner().records[idx].status = resp.status().as_u16();
    resp
}

/// Counts a request dropped before [`Abandoned::processed`].
struct Abandoned(Option<Arc<IdpState>>);

impl Abandoned {
    fn processed(mut self) {
        self.0 = None;
    }
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        if let Some(state) = self.0.take() {
            state.inner().abandoned += 1;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn respond(
    state: &IdpState,
    method: &Method,
    endpoint: IdpEndpoint,
    tenant: &str,
    too_large: bool,
    form: &[(String, String)],
    client_id: Option<String>,
    client_secret: Option<String>,
) -> Response<RespBody> {
    // The browser-facing endpoint: no faults (they target the back channel).
    if endpoint == IdpEndpoint::Authorize {
        return authorize(&mut state.inner(), method, form);
    }
    // Global faults first: they apply to every path.
    {
        let mut inner = state.inner();
        if inner.unavailable {
            return with_retry_after(
                ms_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "temporarily_unavailable",
                    90006,
                    "The server is temporarily unable to service your request. Please try again later.",
                ),
                2,
            );
        }
        if inner.throttled {
            return with_retry_after(
                ms_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "temporarily_unavailable",
                    90055,
                    "TenantThrottlingError - There are too many incoming requests. Please try again later.",
                ),
                3,
            );
        }
        if let Some((status, body)) = inner.next_error.take() {
            return json_response(status, &body);
        }
    }

    if endpoint == IdpEndpoint::Other {
        return json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": "not_found", "error_description": "unknown path"}),
        );
    }
    if method != Method::POST {
        let mut resp = ms_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            900561,
            "The endpoint only accepts POST requests.",
        );
        resp.headers_mut()
            .insert(header::ALLOW, http::HeaderValue::from_static("POST"));
        return resp;
    }
    if too_large {
        return ms_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request",
            90027,
            "The request body is too large.",
        );
    }

    // App-only access has its own registrations.
    if endpoint == IdpEndpoint::Token
        && form_get(form, "grant_type") == Some(CLIENT_CREDENTIALS_GRANT)
    {
        return client_credentials_grant(
            &mut state.inner(),
            tenant,
            form,
            client_id,
            client_secret,
        );
    }

    // Client identification (both endpoints).
    let mut inner = state.inner();
    let Some(client_id) = client_id else {
        return missing_param("client_id");
    };
    if client_id != inner.opts.client_id {
        return ms_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            &format!(
                "Application with identifier '{client_id}' was not found in the directory '{tenant}'. \
                 This can happen if the application has not been installed by the administrator of the \
                 tenant or consented to by any user in the tenant. You may have sent your authentication \
                 request to the wrong tenant."
            ),
        );
    }

    match endpoint {
        IdpEndpoint::DeviceCode => {
            let resp = device_code(&mut inner, form);
            let n = inner.user_codes.len();
            drop(inner);
            state.device_codes_tx.send_modify(|c| *c = (*c).max(n));
            resp
        }
        IdpEndpoint::Token => {
            if let Some(expected) = inner.opts.client_secret.clone() {
                if client_secret.as_deref() != Some(expected.as_str()) {
                    return ms_error(
                        StatusCode::UNAUTHORIZED,
                        "invalid_client",
                        7000215,
                        &format!(
                            "Invalid client secret provided. Ensure the secret being sent in the request \
                             is the client secret value, not the client secret ID, for a secret added to \
                             app '{client_id}'."
                        ),
                    );
                }
            }
            match form_get(form, "grant_type") {
                Some("refresh_token") => refresh_grant(&mut inner, form),
                Some(DEVICE_CODE_GRANT) => device_grant(&mut inner, form),
                Some(AUTH_CODE_GRANT) => code_grant(&mut inner, &client_id, form),
                Some(other) => ms_error(
                    StatusCode::BAD_REQUEST,
                    "unsupported_grant_type",
                    70003,
                    &format!("The app requested an unsupported grant type '{other}'."),
                ),
                None => missing_param("grant_type"),
            }
        }
        IdpEndpoint::Other | IdpEndpoint::Authorize => unreachable!(),
    }
}

/// base64url (no padding) of SHA-256 over `der`.
pub fn thumbprint_s256(der: &[u8]) -> String {
    use sha2::Digest as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(der))
}

fn invalid_client(code: u32, text: &str) -> Response<RespBody> {
    ms_error(StatusCode::UNAUTHORIZED, "invalid_client", code, text)
}

/// The client-credentials grant: app lookup, client authentication
/// (secret or JWT assertion), scope check, app token.
fn client_credentials_grant(
    inner: &mut Inner,
    tenant: &str,
    form: &[(String, String)],
    client_id: Option<String>,
    client_secret: Option<String>,
) -> Response<RespBody> {
    let Some(client_id) = client_id else {
        return missing_param("client_id");
    };
    let key = (tenant.to_string(), client_id.clone());
    let Some(reg) = inner.apps.get(&key).cloned() else {
        return ms_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            &format!(
                "Application with identifier '{client_id}' was not found in the directory '{tenant}'. \
                 This can happen if the application has not been installed by the administrator of the \
                 tenant or consented to by any user in the tenant. You may have sent your authentication \
                 request to the wrong tenant."
            ),
        );
    };
    let assertion_type = form_get(form, "client_assertion_type");
    let assertion = form_get(form, "client_assertion");
    if assertion_type.is_some() || assertion.is_some() {
        if assertion_type != Some(JWT_BEARER_ASSERTION) {
            return ms_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                7000219,
                &format!("'client_assertion_type' must be '{JWT_BEARER_ASSERTION}'."),
            );
        }
        let Some(assertion) = assertion else {
            return missing_param("client_assertion");
        };
        let certs: Vec<&[u8]> = reg
            .credentials
            .iter()
            .filter_map(|c| match c {
                AppCredential::Certificate { cert_der } => Some(cert_der.as_slice()),
                AppCredential::Secret(_) => None,
            })
            .collect();
        let audience = format!("{}/{}/oauth2/v2.0/token", inner.issuer_base, tenant);
        if let Err(why) = check_assertion(
            &mut inner.seen_jti,
            &certs,
            &client_id,
            &audience,
            assertion,
        ) {
            return invalid_client(700027, &format!("Client assertion is not valid: {why}"));
        }
    } else if let Some(secret) = client_secret {
        let matches = reg
            .credentials
            .iter()
            .any(|c| matches!(c, AppCredential::Secret(s) if *s == secret));
        if !matches {
            return invalid_client(
                7000215,
                &format!(
                    "Invalid client secret provided. Ensure the secret being sent in the request \
                     is the client secret value, not the client secret ID, for a secret added to \
                     app '{client_id}'."
                ),
            );
        }
        if reg.secret_expired {
            return invalid_client(
                7000222,
                &format!(
                    "The provided client secret keys for app '{client_id}' are expired. Visit the \
                     Azure portal to create new keys for your app: \
                     https://aka.ms/NewClientSecret, or consider using certificate credentials for \
                     added security: https://aka.ms/certCreds."
                ),
            );
        }
    } else {
        return invalid_client(
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or \
             'client_secret'.",
        );
    }

    let Some(scope) = form_get(form, "scope") else {
        return missing_param("scope");
    };
    if !scope.ends_with("/.default") || scope.split_whitespace().count() != 1 {
        return ms_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            1002012,
            &format!(
                "The provided value for scope {scope} is not valid. Client credential flows must \
                 have a scope value with /.default suffixed to the resource identifier \
                 (application ID URI)."
            ),
        );
    }

    let (at, expires_in) = issue_app_token(inner, tenant, &client_id);
    json_response(
        StatusCode::OK,
        &json!({
            "token_type": "Bearer",
            "expires_in": expires_in,
            "ext_expires_in": expires_in,
            "access_token": at,
        }),
    )
}

/// A new app-only access token: `(token, expires_in)`.
fn issue_app_token(inner: &mut Inner, tenant: &str, client_id: &str) -> (String, u64) {
    let n = next_counter(inner);
    let at = format!("app-{n}-{}", random_hex(16));
    let expires_in = inner.opts.expires_in;
    inner.app_tokens.insert(
        at.clone(),
        AppAccessEntry {
            app: AppToken {
                tenant: tenant.to_string(),
                client_id: client_id.to_string(),
            },
            expires_at: Instant::now() + Duration::from_secs(expires_in),
            revoked: false,
        },
    );
    inner.issued_app.push(at.clone());
    (at, expires_in)
}

/// Checks a client assertion; `Err` says which check failed.
fn check_assertion(
    seen_jti: &mut HashSet<String>,
    certs: &[&[u8]],
    client_id: &str,
    audience: &str,
    assertion: &str,
) -> Result<(), String> {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    use x509_cert::der::Decode as _;

    let header = jsonwebtoken::decode_header(assertion).map_err(|e| format!("not a JWT ({e})."))?;
    if !matches!(header.alg, Algorithm::RS256 | Algorithm::PS256) {
        return Err(format!("unsupported algorithm {:?}.", header.alg));
    }
    let x5t = header
        .x5t_s256
        .ok_or_else(|| "the header has no x5t#S256.".to_string())?;
    if certs.is_empty() {
        return Err(format!("app '{client_id}' has no certificate credential."));
    }
    let cert = certs
        .iter()
        .find(|c| thumbprint_s256(c) == x5t)
        .ok_or_else(|| {
            format!("x5t#S256 '{x5t}' matches no certificate registered for app '{client_id}'.")
        })?;
    let x509 = x509_cert::Certificate::from_der(cert).map_err(|e| format!("bad cert ({e})."))?;
    let spki = x509
        .tbs_certificate
        .subject_public_key_info
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| "bad certificate key.".to_string())?
        .to_vec();
    let mut validation = Validation::new(header.alg);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims = HashSet::new();
    let claims =
        jsonwebtoken::decode::<Value>(assertion, &DecodingKey::from_rsa_der(&spki), &validation)
            .map_err(|e| {
                format!("the signature does not verify with the registered certificate ({e}).")
            })?
            .claims;

    let aud = claims["aud"].as_str().unwrap_or("");
    if aud != audience {
        return Err(format!(
            "aud '{aud}' is not the token endpoint '{audience}'."
        ));
    }
    for name in ["iss", "sub"] {
        let v = claims[name].as_str().unwrap_or("");
        if v != client_id {
            return Err(format!("{name} '{v}' is not the client id '{client_id}'."));
        }
    }
    let now = SystemTimeNow::secs();
    let exp = claims["exp"]
        .as_u64()
        .ok_or_else(|| "no exp claim.".to_string())?;
    if exp <= now {
        return Err("the assertion has expired (exp).".to_string());
    }
    let start = claims["nbf"]
        .as_u64()
        .or_else(|| claims["iat"].as_u64())
        .ok_or_else(|| "no nbf or iat claim.".to_string())?;
    if exp.saturating_sub(start) > MAX_ASSERTION_LIFETIME {
        return Err(format!(
            "the lifetime (exp - nbf = {} s) exceeds {MAX_ASSERTION_LIFETIME} s.",
            exp.saturating_sub(start)
        ));
    }
    let jti = claims["jti"]
        .as_str()
        .filter(|j| !j.is_empty())
        .ok_or_else(|| "no jti claim.".to_string())?;
    if !seen_jti.insert(jti.to_string()) {
        return Err(format!("jti '{jti}' was already used (replay)."));
    }
    Ok(())
}

fn strip_offline_access(scope: &str) -> String {
    scope
        .split_whitespace()
        .filter(|s| !s.eq_ignore_ascii_case("offline_access"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn issue_tokens(inner: &mut Inner, mailbox: &str, scope: &str) -> Response<RespBody> {
    issue_tokens_with(inner, mailbox, scope, None)
}

/// An ID token for `account` (JWT: header, payload, fake signature).
pub fn make_id_token(
    issuer_base: &str,
    client_id: &str,
    account: &SignedInAccount,
    nonce: Option<&str>,
) -> String {
    let now = SystemTimeNow::secs();
    let e = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let mut payload = json!({
        "aud": client_id,
        "iss": format!("{issuer_base}/{}/v2.0", account.tid),
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "name": account.upn.split('@').next().unwrap_or(""),
        "oid": account.oid,
        "preferred_username": account.upn,
        "sub": format!("sub-{}", account.oid),
        "tid": account.tid,
        "ver": "2.0",
    });
    if let Some(n) = nonce {
        payload["nonce"] = json!(n);
    }
    format!(
        "{}.{}.{}",
        e(br#"{"typ":"JWT","alg":"RS256","kid":"test-key"}"#),
        e(payload.to_string().as_bytes()),
        e(random_hex(32).as_bytes())
    )
}

struct SystemTimeNow;

impl SystemTimeNow {
    fn secs() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

fn wants_openid(scope: &str) -> bool {
    scope.split_whitespace().any(|s| s == "openid")
}

/// Resource scopes of a grant (what access tokens are for): without the
/// OpenID Connect ones.
fn resource_scope(scope: &str) -> String {
    scope
        .split_whitespace()
        .filter(|s| !matches!(*s, "openid" | "profile" | "email"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn issue_tokens_with(
    inner: &mut Inner,
    mailbox: &str,
    scope: &str,
    id_token: Option<String>,
) -> Response<RespBody> {
    let n = next_counter(inner);
    let at = format!("at-{n}-{}", random_hex(16));
    let rt = format!("rt-{n}-{}", random_hex(24));
    let expires_in = inner.opts.expires_in;
    inner.access_tokens.insert(
        at.clone(),
        AccessEntry {
            mailbox: mailbox.to_string(),
            expires_at: Instant::now() + Duration::from_secs(expires_in),
            revoked: false,
        },
    );
    inner.issued_access.push(at.clone());
    inner.refresh_tokens.insert(
        rt.clone(),
        RefreshEntry {
            mailbox: mailbox.to_string(),
            scope: scope.to_string(),
            revoked: false,
        },
    );
    inner.issued_refresh.push(rt.clone());
    let mut body = json!({
        "token_type": "Bearer",
        "scope": strip_offline_access(scope),
        "expires_in": expires_in,
        "ext_expires_in": expires_in,
        "access_token": at,
        "refresh_token": rt,
    });
    if let Some(t) = id_token {
        body["id_token"] = json!(t);
    }
    json_response(StatusCode::OK, &body)
}

fn redirect(to: &str) -> Response<RespBody> {
    Response::builder()
        .status(StatusCode::FOUND)
        .header(header::LOCATION, to)
        .header(header::CACHE_CONTROL, "no-store")
        .body(full(Bytes::new()))
        .expect("response")
}

fn browser_error(status: StatusCode, code: u32, text: &str) -> Response<RespBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(full(format!("AADSTS{code}: {text}\n")))
        .expect("response")
}

fn with_query(base: &str, pairs: &[(&str, &str)]) -> String {
    let mut url = url::Url::parse(base).expect("redirect_uri is a URL");
    {
        let mut q = url.query_pairs_mut();
        for (k, v) in pairs {
            q.append_pair(k, v);
        }
    }
    url.into()
}

fn authorize(inner: &mut Inner, method: &Method, q: &[(String, String)]) -> Response<RespBody> {
    if method != Method::GET {
        return browser_error(StatusCode::METHOD_NOT_ALLOWED, 900561, "Use GET.");
    }
    let get = |k: &str| form_get(q, k).unwrap_or("");
    if get("client_id") != inner.opts.client_id {
        return browser_error(
            StatusCode::BAD_REQUEST,
            700016,
            "Application with identifier was not found in the directory.",
        );
    }
    let redirect_uri = get("redirect_uri").to_string();
    if url::Url::parse(&redirect_uri).is_err()
        || inner
            .expected_redirect_uri
            .as_deref()
            .is_some_and(|e| e != redirect_uri)
    {
        return browser_error(
            StatusCode::BAD_REQUEST,
            50011,
            "The redirect URI specified in the request does not match the redirect URIs configured for the application.",
        );
    }
    let state = get("state").to_string();
    let correlation_id = random_uuid();
    let trace_id = random_uuid();
    let fail = |error: &str, code: u32, text: &str| {
        redirect(&with_query(
            &redirect_uri,
            &[
                ("error", error),
                (
                    "error_description",
                    &format!("AADSTS{code}: {text} Trace ID: {trace_id} Correlation ID: {correlation_id} Timestamp: {}", utc_timestamp()),
                ),
                ("error_uri", &format!("https://login.microsoftonline.com/error?code={code}")),
                ("state", &state),
                ("correlation_id", &correlation_id),
                ("trace_id", &trace_id),
            ],
        ))
    };
    if get("response_type") != "code" {
        return fail(
            "unsupported_response_type",
            700054,
            "response_type 'code' is required.",
        );
    }
    if get("code_challenge_method") != "S256" || get("code_challenge").len() < 43 {
        return fail(
            "invalid_request",
            501491,
            "Invalid size of Code_Challenge parameter or method is not S256.",
        );
    }
    if let Some((error, code, text)) = inner.authorize_error.take() {
        return fail(&error, code, &text);
    }
    let account = inner
        .account
        .clone()
        .unwrap_or_else(|| SignedInAccount::new(get("login_hint")));
    let mut challenge = get("code_challenge").to_string();
    if std::mem::take(&mut inner.tamper_challenge) {
        challenge = format!("x{}", &challenge[1..]);
    }
    let code = format!("0.AAAA{}", random_hex(48));
    inner.codes.insert(
        code.clone(),
        CodeEntry {
            client_id: get("client_id").to_string(),
            redirect_uri: redirect_uri.clone(),
            challenge,
            scope: get("scope").to_string(),
            nonce: form_get(q, "nonce").map(str::to_string),
            account,
            used: false,
            expires_at: Instant::now() + Duration::from_secs(600),
        },
    );
    redirect(&with_query(
        &redirect_uri,
        &[
            ("code", &code),
            ("state", &state),
            ("session_state", &random_uuid()),
        ],
    ))
}

fn code_grant(inner: &mut Inner, client_id: &str, form: &[(String, String)]) -> Response<RespBody> {
    let Some(code) = form_get(form, "code") else {
        return missing_param("code");
    };
    let Some(entry) = inner.codes.get_mut(code) else {
        return ms_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            9002313,
            "Invalid request. Request is malformed or invalid.",
        );
    };
    if entry.used {
        return ms_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            54005,
            "OAuth2 Authorization code was already redeemed, please retry with a new valid code or use an existing refresh token.",
        );
    }
    // A code is good for one redemption attempt.
    entry.used = true;
    let entry = entry.clone();
    if Instant::now() >= entry.expires_at {
        return ms_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            70008,
            "The provided authorization code or refresh token has expired due to inactivity.",
        );
    }
    if entry.client_id != client_id {
        return ms_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            70000,
            "The code was issued to another client.",
        );
    }
    if form_get(form, "redirect_uri") != Some(entry.redirect_uri.as_str()) {
        return ms_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            70002,
            "The redirect_uri does not match the one of the authorization request.",
        );
    }
    let verified = form_get(form, "code_verifier").is_some_and(|v| {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(v.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest) == entry.challenge
    });
    if !verified {
        return ms_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            501481,
            "The Code_Verifier does not match the code_challenge supplied in the authorization request.",
        );
    }
    let id_token = wants_openid(&entry.scope).then(|| {
        make_id_token(
            &inner.issuer_base,
            &entry.client_id,
            &entry.account,
            entry.nonce.as_deref(),
        )
    });
    let scope = resource_scope(&entry.scope);
    let resp = issue_tokens_with(inner, &entry.account.upn, &scope, id_token.clone());
    if !std::mem::take(&mut inner.omit_refresh_token) {
        return resp;
    }
    drop(resp);
    let n = next_counter(inner);
    let at = format!("at-{n}-{}", random_hex(16));
    let mut body = json!({
        "token_type": "Bearer",
        "scope": strip_offline_access(&scope),
        "expires_in": inner.opts.expires_in,
        "access_token": at,
    });
    if let Some(t) = id_token {
        body["id_token"] = json!(t);
    }
    json_response(StatusCode::OK, &body)
}

fn refresh_grant(inner: &mut Inner, form: &[(String, String)]) -> Response<RespBody> {
    let Some(rt) = form_get(form, "refresh_token") else {
        return missing_param("refresh_token");
    };
    let revoke_on_rotation = inner.opts.revoke_on_rotation;
    let (mailbox, scope) = match inner.refresh_tokens.get_mut(rt) {
        None => {
            return ms_error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                70008,
                "The provided authorization code or refresh token has expired due to inactivity. \
                 Send a new interactive authorization request for this user and resource.",
            )
        }
        Some(e) if e.revoked => {
            return ms_error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                50173,
                "The provided grant has expired due to it being revoked, a fresh auth token is needed. \
                 The user might have changed or reset their password.",
            )
        }
        Some(e) => {
            if revoke_on_rotation {
                e.revoked = true;
            }
            let scope = form_get(form, "scope")
                .map(str::to_string)
                .unwrap_or_else(|| e.scope.clone());
            (e.mailbox.clone(), scope)
        }
    };
    inner.successful_refreshes += 1;
    issue_tokens(inner, &mailbox, &scope)
}

fn device_grant(inner: &mut Inner, form: &[(String, String)]) -> Response<RespBody> {
    let Some(dc) = form_get(form, "device_code").or_else(|| form_get(form, "code")) else {
        return missing_param("device_code");
    };
    if std::mem::take(&mut inner.slow_down_once) {
        return ms_error(
            StatusCode::BAD_REQUEST,
            "slow_down",
            70016,
            "OAuth 2.0 device flow error. The client is polling too quickly; increase the interval.",
        );
    }
    let Some(dev) = inner.devices.get_mut(dc) else {
        return ms_error(
            StatusCode::BAD_REQUEST,
            "bad_verification_code",
            70019,
            "The provided device_code is not valid.",
        );
    };
    if dev.status != DeviceStatus::Redeemed && Instant::now() >= dev.expires_at {
        return ms_error(
            StatusCode::BAD_REQUEST,
            "expired_token",
            70020,
            "The provided value for the input parameter 'device_code' is not valid. Device codes expire after 15 minutes.",
        );
    }
    match dev.status.clone() {
        DeviceStatus::Pending => ms_error(
            StatusCode::BAD_REQUEST,
            "authorization_pending",
            70016,
            "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
        ),
        DeviceStatus::Declined => ms_error(
            StatusCode::BAD_REQUEST,
            "authorization_declined",
            70000,
            "The user has denied access to the scope requested by the client application.",
        ),
        DeviceStatus::Redeemed => ms_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            54005,
            "OAuth2 Authorization code was already redeemed, please retry with a new valid code or use an existing refresh token.",
        ),
        DeviceStatus::Approved(mailbox) => {
            dev.status = DeviceStatus::Redeemed;
            let scope = dev.scope.clone();
            let id_token = wants_openid(&scope).then(|| {
                make_id_token(
                    &inner.issuer_base,
                    &inner.opts.client_id,
                    &SignedInAccount::new(&mailbox),
                    None,
                )
            });
            issue_tokens_with(inner, &mailbox, &resource_scope(&scope), id_token)
        }
    }
}

fn device_code(inner: &mut Inner, form: &[(String, String)]) -> Response<RespBody> {
    let Some(scope) = form_get(form, "scope") else {
        return missing_param("scope");
    };
    let user_code = loop {
        let code = random_user_code();
        if !inner.user_code_to_device.contains_key(&code) {
            break code;
        }
    };
    let device_code = format!("DAQABAAEAAAD{}", random_hex(96));
    let expires_in = inner.opts.device_code_expires_in;
    inner.devices.insert(
        device_code.clone(),
        DeviceEntry {
            user_code: user_code.clone(),
            scope: scope.to_string(),
            status: DeviceStatus::Pending,
            expires_at: Instant::now() + Duration::from_secs(expires_in),
        },
    );
    inner
        .user_code_to_device
        .insert(user_code.clone(), device_code.clone());
    inner.user_codes.push(user_code.clone());
    json_response(
        StatusCode::OK,
        &json!({
            "user_code": user_code,
            "device_code": device_code,
            "verification_uri": "https://microsoft.com/devicelogin",
            "expires_in": expires_in,
            "interval": inner.opts.interval,
            "message": format!(
                "To sign in, use a web browser to open the page https://microsoft.com/devicelogin \
                 and enter the code {user_code} to authenticate."
            ),
        }),
    )
}

fn random_user_code() -> String {
    use rand::Rng;
    const ALPHA: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ";
    let mut rng = rand::rng();
    let mut s = String::with_capacity(9);
    for i in 0..8 {
        if i == 4 {
            s.push('-');
        }
        s.push(ALPHA[rng.random_range(0..ALPHA.len())] as char);
    }
    s
}

/// Convenience: body bytes of a token response parsed as JSON.
pub fn parse_json(bytes: &Bytes) -> Value {
    serde_json::from_slice(bytes).expect("JSON body")
}
