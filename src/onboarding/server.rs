//! The public onboarding listener: the invitation pages, the browser
//! sign-in (authorization code + PKCE, `state` bound to the invitation and
//! to the browser) with its OAuth callback, and the device-code fallback.
//! It serves nothing else: no admin console, no API, no metrics.
//!
//! Routes: `GET /` (type the short code) and `POST /` (look it up, then
//! act on it), `GET|POST /i/{link token}`, `GET /callback`,
//! `GET /device/{id}`. Every answer is `no-store`, may not be framed and
//! sends no referrer, so the link token in the URL does not leak.

use super::invite::{hash_secret, normalise_code};
use super::pages::{self, AdminDetails, DeviceView, Message, Pages, Tone};
use crate::app::App;
use crate::metrics::SigninResult;
use crate::proxy::http::full;
use crate::secret::Secret;
use crate::store::{
    now_unix, Completion, InvitationRecord, InvitationState, LinkedAccount, NewAudit, Signin,
};
use crate::tls::OutBody;
use crate::token::id_token::{self, Expected};
use crate::token::idp::{random_token, with_signin_scopes, AuthorizeParams};
use crate::token::{IdpError, PlatformDetails, TokenGrant};
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Largest form body accepted.
const MAX_FORM: usize = 4 * 1024;
/// Longest path or query accepted.
const MAX_URI: usize = 4 * 1024;
/// Failed code look-ups allowed per source address per [`CODE_WINDOW`].
pub const CODE_ATTEMPTS: u32 = 10;
/// The window of [`CODE_ATTEMPTS`].
pub const CODE_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Source addresses remembered by the code throttle.
const THROTTLE_ENTRIES: usize = 10_000;
/// Device-code sign-ins in progress at once.
const MAX_DEVICE_SESSIONS: usize = 256;
/// Time limit of one request (the identity platform has its own).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Cookie binding a started sign-in to the browser that started it.
const STATE_COOKIE: &str = "authswap_signin";

/// Why the onboarding listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OnboardingError {
    /// An embedded template does not compile.
    #[error("{0}")]
    Template(#[from] pages::TemplateError),
}

/// Failed code look-ups per source address.
#[derive(Default)]
struct Throttle {
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl Throttle {
    /// Whether `ip` may try a code now.
    fn allowed(&self, ip: IpAddr) -> bool {
        let Ok(map) = self.failures.lock() else {
            return false;
        };
        match map.get(&ip) {
            Some((since, n)) => since.elapsed() >= CODE_WINDOW || *n < CODE_ATTEMPTS,
            None => true,
        }
    }

    /// Counts a failed look-up from `ip`; returns the count in the window.
    fn failed(&self, ip: IpAddr) -> u32 {
        let Ok(mut map) = self.failures.lock() else {
            return u32::MAX;
        };
        if map.len() >= THROTTLE_ENTRIES {
            map.retain(|_, (since, _)| since.elapsed() < CODE_WINDOW);
        }
        if map.len() >= THROTTLE_ENTRIES && !map.contains_key(&ip) {
            // Still full of recent failures from many addresses: count
            // this one against a shared slot rather than grow.
            return u32::MAX;
        }
        let e = map.entry(ip).or_insert((Instant::now(), 0));
        if e.0.elapsed() >= CODE_WINDOW {
            *e = (Instant::now(), 0);
        }
        e.1 = e.1.saturating_add(1);
        e.1
    }
}

/// A device-code sign-in started from the onboarding page.
#[derive(Clone)]
struct DeviceSession {
    mailbox: String,
    verification_uri: String,
    user_code: String,
    expires_at: i64,
    state: DeviceState,
}

#[derive(Clone)]
enum DeviceState {
    Waiting,
    Done,
    Failed(String, Vec<String>),
}

/// The onboarding service shared by every connection of the listener.
pub struct Onboarding {
    app: Arc<App>,
    pages: Pages,
    throttle: Throttle,
    devices: Mutex<HashMap<String, DeviceSession>>,
    csp: HeaderValue,
    secure_cookie: bool,
    /// Path of `public_url` (`""`, or `/authswap` behind a proxy that
    /// serves the pages under a prefix): links and cookies use it.
    root: String,
    /// Itself, for the device-code tasks it spawns.
    me: std::sync::Weak<Onboarding>,
}

impl std::fmt::Debug for Onboarding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Onboarding").finish_non_exhaustive()
    }
}

/// Who is asking, for the throttle and the logs.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

type Answer = Response<OutBody>;

fn origin_of(url: &str) -> Option<String> {
    let u = url::Url::parse(url).ok()?;
    Some(u.origin().ascii_serialization()).filter(|o| o != "null")
}

impl Onboarding {
    /// Builds the service (templates compiled once).
    pub fn new(app: Arc<App>) -> Result<Arc<Onboarding>, OnboardingError> {
        let pages = Pages::new(&app.config.onboarding.organization)?;
        // Forms post here and are redirected to the authorization endpoint:
        // browsers apply `form-action` to that redirect too.
        let mut form_action = "'self'".to_owned();
        if let Some(o) = origin_of(&app.config.identity_provider.authorize_url()) {
            form_action.push(' ');
            form_action.push_str(&o);
        }
        let csp = format!(
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; \
             form-action {form_action}; frame-ancestors 'none'; base-uri 'none'"
        );
        let csp = HeaderValue::from_str(&csp).unwrap_or_else(|_| {
            HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'")
        });
        let base = app.config.onboarding.base_url();
        let secure_cookie = base.starts_with("https://");
        let root = url::Url::parse(&base)
            .map(|u| u.path().trim_end_matches('/').to_owned())
            .unwrap_or_default();
        let pages = pages.with_root(&root);
        Ok(Arc::new_cyclic(|me| Onboarding {
            app,
            pages,
            throttle: Throttle::default(),
            devices: Mutex::new(HashMap::new()),
            csp,
            secure_cookie,
            root,
            me: me.clone(),
        }))
    }

    /// Serves one request (bounded in time).
    pub async fn handle(
        self: Arc<Self>,
        req: Request<hyper::body::Incoming>,
        peer: Peer,
    ) -> Result<Answer, Infallible> {
        let this = self.clone();
        let mut answer = match tokio::time::timeout(REQUEST_TIMEOUT, this.route(req, peer)).await {
            Ok(a) => a,
            Err(_) => self.html(
                StatusCode::GATEWAY_TIMEOUT,
                self.pages.message(&Message::error(
                    "This took too long",
                    &["The page did not finish in time. Open your invitation link again."],
                )),
            ),
        };
        self.secure(&mut answer);
        Ok(answer)
    }

    fn secure(&self, r: &mut Answer) {
        let h = r.headers_mut();
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store, max-age=0"),
        );
        h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        h.insert(header::CONTENT_SECURITY_POLICY, self.csp.clone());
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
    }

    fn html(&self, status: StatusCode, body: String) -> Answer {
        let mut r = Response::new(full(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        r
    }

    fn message(&self, status: StatusCode, m: &Message) -> Answer {
        self.html(status, self.pages.message(m))
    }

    fn not_found(&self) -> Answer {
        self.message(
            StatusCode::NOT_FOUND,
            &Message {
                tone: Tone::Info,
                badge: "Not found",
                title: "There is nothing here".into(),
                lines: vec![
                    "Open the invitation link your administrator sent you, or enter its code on the start page.".into(),
                ],
                admin: None,
                start_again: true,
            },
        )
    }

    fn redirect(&self, to: &str) -> Answer {
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = StatusCode::SEE_OTHER;
        if let Ok(v) = HeaderValue::from_str(to) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        r
    }

    fn me(&self) -> Option<Arc<Onboarding>> {
        self.me.upgrade()
    }

    fn count(&self, result: SigninResult) {
        self.app.metrics.onboarding_signin(result);
    }

    async fn audit(&self, action: &str, identity: &str, outcome: &str, detail: Option<&str>) {
        if let Err(e) = self
            .app
            .store
            .audit(&NewAudit {
                actor: "user",
                action,
                identity: Some(identity),
                outcome,
                detail,
            })
            .await
        {
            tracing::warn!(error = %e, action, "cannot write the audit log");
        }
    }

    async fn route(&self, req: Request<hyper::body::Incoming>, peer: Peer) -> Answer {
        let (parts, body) = req.into_parts();
        let mut path = parts.uri.path().to_owned();
        // Behind a proxy that keeps the `public_url` prefix.
        if !self.root.is_empty() {
            if let Some(rest) = path.strip_prefix(self.root.as_str()) {
                if rest.is_empty() || rest.starts_with('/') {
                    path = if rest.is_empty() {
                        "/".into()
                    } else {
                        rest.to_owned()
                    };
                }
            }
        }
        let query = parts.uri.query().unwrap_or("").to_owned();
        if path.len() + query.len() > MAX_URI {
            return self.message(
                StatusCode::URI_TOO_LONG,
                &Message::error(
                    "This address is too long",
                    &["Open your invitation link again."],
                ),
            );
        }
        let method = parts.method.clone();
        if method != Method::GET && method != Method::HEAD && method != Method::POST {
            let mut r = self.message(
                StatusCode::METHOD_NOT_ALLOWED,
                &Message::error("Not allowed", &["Open your invitation link again."]),
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, POST"));
            return r;
        }
        let form = if method == Method::POST {
            match Limited::new(body, MAX_FORM).collect().await {
                Ok(b) => parse_form(&b.to_bytes()),
                Err(_) => {
                    return self.message(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        &Message::error("The form was too large", &["Go back and try again."]),
                    )
                }
            }
        } else {
            drop(body);
            Vec::new()
        };
        let get = method != Method::POST;
        match path.as_str() {
            "/" if get => self.html(StatusCode::OK, self.pages.start(None)),
            "/" => self.code_form(&form, peer).await,
            "/callback" if get => self.callback(&query, &parts.headers, peer).await,
            _ => {
                if let Some(token) = path.strip_prefix("/i/") {
                    if token.is_empty() || token.len() > 128 || token.contains('/') {
                        return self.not_found();
                    }
                    let token = Secret::new(token.to_owned());
                    return self.link(&token, get, &form, peer).await;
                }
                if let Some(id) = path.strip_prefix("/device/") {
                    if get {
                        return self.device_page(id);
                    }
                }
                self.not_found()
            }
        }
    }

    /// The page (or refusal) for an invitation that is no longer pending.
    fn not_pending(&self, state: InvitationState) -> Answer {
        self.count(SigninResult::expired_invitation);
        let (title, lines): (&str, &[&str]) = match state {
            InvitationState::Completed => (
                "This invitation was already used",
                &[
                    "Your mailbox was connected with this invitation already; there is nothing more to do.",
                    "If you need to connect it again, ask your administrator for a new invitation.",
                ],
            ),
            InvitationState::Revoked => (
                "This invitation was withdrawn",
                &[
                    "Your administrator withdrew this invitation or sent you a newer one.",
                    "Use the newest invitation you received, or ask your administrator for a new one.",
                ],
            ),
            InvitationState::Expired | InvitationState::Pending => (
                "This invitation has expired",
                &["Invitations are valid for a limited time. Ask your administrator for a new invitation."],
            ),
        };
        let mut m = Message::error(title, lines);
        if state == InvitationState::Completed {
            m.tone = Tone::Info;
            m.badge = "Already used";
        }
        self.message(StatusCode::GONE, &m)
    }

    /// `GET|POST /i/{token}`.
    async fn link(
        &self,
        token: &Secret,
        get: bool,
        form: &[(String, String)],
        peer: Peer,
    ) -> Answer {
        let inv = match self
            .app
            .store
            .invitation_by_token(&hash_secret(token.expose()))
            .await
        {
            Ok(Some(inv)) => inv,
            Ok(None) => {
                tracing::info!(peer = %peer.0.ip(), "unknown invitation link");
                self.count(SigninResult::unknown_invitation);
                return self.message(
                    StatusCode::NOT_FOUND,
                    &Message {
                        start_again: true,
                        ..Message::error(
                            "This invitation link is not valid",
                            &["Check that you opened the whole link from your invitation, or enter the invitation code instead. If it still does not work, ask your administrator for a new invitation."],
                        )
                    },
                );
            }
            Err(e) => return self.store_failed(&e),
        };
        if inv.state != InvitationState::Pending {
            return self.not_pending(inv.state);
        }
        if get {
            return self.html(
                StatusCode::OK,
                self.pages.invitation(
                    &inv.mailbox,
                    &pages::inviter(&inv.actor),
                    inv.expires_at,
                    "",
                    None,
                ),
            );
        }
        self.act(&inv, form_get(form, "action"), peer).await
    }

    /// `POST /`: look up a typed code, then show its invitation or act on it.
    async fn code_form(&self, form: &[(String, String)], peer: Peer) -> Answer {
        let ip = peer.0.ip();
        if !self.throttle.allowed(ip) {
            self.count(SigninResult::throttled);
            tracing::warn!(peer = %ip, "invitation code attempts throttled");
            return self.html(
                StatusCode::TOO_MANY_REQUESTS,
                self.pages.start(Some(
                    "Too many wrong codes were entered from this network. Wait 15 minutes and try again, or open the link from your invitation instead.",
                )),
            );
        }
        let typed = form_get(form, "code").unwrap_or("");
        let code = normalise_code(typed);
        let found = if code.is_empty() || code.len() > 32 {
            None
        } else {
            match self.app.store.invitation_by_code(&hash_secret(&code)).await {
                Ok(f) => f,
                Err(e) => return self.store_failed(&e),
            }
        };
        let Some(inv) = found else {
            let n = self.throttle.failed(ip);
            self.count(SigninResult::bad_code);
            tracing::info!(peer = %ip, failures = n, "unknown invitation code entered");
            return self.html(
                StatusCode::BAD_REQUEST,
                self.pages.start(Some(
                    "That code does not match any invitation. Check it and try again (letters and digits, the dash is optional).",
                )),
            );
        };
        if inv.state != InvitationState::Pending {
            return self.not_pending(inv.state);
        }
        match form_get(form, "action") {
            None | Some("") => self.html(
                StatusCode::OK,
                self.pages.invitation(
                    &inv.mailbox,
                    &pages::inviter(&inv.actor),
                    inv.expires_at,
                    &format!("{}/", self.root),
                    Some(&code),
                ),
            ),
            action => self.act(&inv, action, peer).await,
        }
    }

    async fn act(&self, inv: &InvitationRecord, action: Option<&str>, peer: Peer) -> Answer {
        match action {
            Some("device") => self.start_device(inv).await,
            _ => self.start_signin(inv, peer).await,
        }
    }

    fn store_failed(&self, e: &crate::store::StoreError) -> Answer {
        tracing::error!(error = %e, "onboarding: store failed");
        self.count(SigninResult::failed);
        self.message(
            StatusCode::SERVICE_UNAVAILABLE,
            &Message::error(
                "Something went wrong on our side",
                &["Nothing was changed. Try again in a few minutes; if it keeps happening, tell your administrator."],
            ),
        )
    }

    /// The identity-platform client of the invited identity's tenant.
    fn idp(&self, inv: &InvitationRecord) -> Arc<crate::tenant::Tenant> {
        self.app.tokens.tenant_or_default(&inv.tenant)
    }

    /// Starts the browser sign-in: `state`, PKCE verifier and nonce, stored
    /// for `signin_ttl`, then off to the authorization endpoint.
    async fn start_signin(&self, inv: &InvitationRecord, peer: Peer) -> Answer {
        let config = &self.app.config;
        let state = random_token();
        let verifier = random_token();
        let nonce = random_token();
        let ttl = i64::try_from(config.onboarding.signin_ttl.as_secs()).unwrap_or(900);
        let signin = Signin {
            state_hash: hash_secret(state.expose()),
            invitation_id: inv.id,
            verifier: verifier.clone(),
            nonce: nonce.expose().to_owned(),
            expires_at: now_unix().saturating_add(ttl),
        };
        let scopes = with_signin_scopes(&config.login_scopes());
        let redirect_uri = config.onboarding.redirect_uri();
        let url = match self.idp(inv).idp.authorization_url(&AuthorizeParams {
            redirect_uri: &redirect_uri,
            scopes: &scopes,
            state: &state,
            verifier: &verifier,
            nonce: nonce.expose(),
            login_hint: &inv.mailbox,
        }) {
            Ok(u) => u,
            Err(e) => {
                tracing::error!(error = %e, "cannot start a browser sign-in");
                self.count(SigninResult::failed);
                return self.message(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &Message::error(
                        "Sign-in is not set up yet",
                        &["authswap is not yet configured to sign you in with Microsoft. Tell your administrator."],
                    ),
                );
            }
        };
        if let Err(e) = self.app.store.put_signin(&signin).await {
            return self.store_failed(&e);
        }
        tracing::info!(
            identity = %crate::names::Shown(&inv.identity),
            invitation = inv.id,
            peer = %peer.0.ip(),
            "browser sign-in started"
        );
        let mut r = self.redirect(&url);
        let cookie = format!(
            "{STATE_COOKIE}={}; Path={}/callback; Max-Age={ttl}; HttpOnly; SameSite=Lax{}",
            state.expose(),
            self.root,
            if self.secure_cookie { "; Secure" } else { "" }
        );
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
        r
    }

    fn invalid_state(&self, why: &str, peer: Peer) -> Answer {
        self.count(SigninResult::invalid_state);
        tracing::info!(peer = %peer.0.ip(), why, "sign-in callback refused");
        self.message(
            StatusCode::BAD_REQUEST,
            &Message::error(
                "This sign-in link was already used or has expired",
                &[
                    "Sign-ins must be finished within a few minutes, in the same browser, and each one works only once.",
                    "Start again from your invitation link.",
                ],
            ),
        )
    }

    /// `GET /callback`.
    async fn callback(&self, query: &str, headers: &http::HeaderMap, peer: Peer) -> Answer {
        let q = parse_form(query.as_bytes());
        let Some(state) = form_get(&q, "state").filter(|s| !s.is_empty() && s.len() <= 256) else {
            return self.invalid_state("no state", peer);
        };
        let state = Secret::new(state.to_owned());
        // The state must come back to the browser that started the sign-in.
        let cookie_ok = cookie_values(headers, STATE_COOKIE).any(|v| {
            use subtle::ConstantTimeEq;
            bool::from(v.as_bytes().ct_eq(state.expose().as_bytes()))
        });
        if !cookie_ok {
            return self.invalid_state("state does not match this browser", peer);
        }
        let signin = match self
            .app
            .store
            .take_signin(&hash_secret(state.expose()), now_unix())
            .await
        {
            Ok(Some(s)) => s,
            Ok(None) => return self.invalid_state("unknown, used or expired state", peer),
            Err(e) => return self.store_failed(&e),
        };
        let mut answer = self.finish_callback(&q, &signin).await;
        let clear = format!(
            "{STATE_COOKIE}=; Path={}/callback; Max-Age=0; HttpOnly; SameSite=Lax{}",
            self.root,
            if self.secure_cookie { "; Secure" } else { "" }
        );
        if let Ok(v) = HeaderValue::from_str(&clear) {
            answer.headers_mut().insert(header::SET_COOKIE, v);
        }
        answer
    }

    async fn finish_callback(&self, q: &[(String, String)], signin: &Signin) -> Answer {
        let inv = match self.app.store.invitation(signin.invitation_id).await {
            Ok(Some(inv)) => inv,
            Ok(None) => return self.not_pending(InvitationState::Revoked),
            Err(e) => return self.store_failed(&e),
        };
        if let Some(error) = form_get(q, "error") {
            let description = form_get(q, "error_description").unwrap_or("");
            let details = PlatformDetails {
                error: bounded(error, 64),
                aadsts: crate::token::idp::first_aadsts(description),
                correlation_id: form_get(q, "correlation_id")
                    .map(|s| bounded(s, 64))
                    .or_else(|| id_after(description, "Correlation ID:")),
                trace_id: form_get(q, "trace_id")
                    .map(|s| bounded(s, 64))
                    .or_else(|| id_after(description, "Trace ID:")),
            };
            return self.platform_refused(&inv, &details).await;
        }
        if inv.state != InvitationState::Pending {
            return self.not_pending(inv.state);
        }
        let Some(code) = form_get(q, "code").filter(|c| !c.is_empty() && c.len() <= 4096) else {
            return self
                .platform_refused(
                    &inv,
                    &PlatformDetails {
                        error: "no_code".into(),
                        ..Default::default()
                    },
                )
                .await;
        };
        let code = Secret::new(code.to_owned());
        let redirect_uri = self.app.config.onboarding.redirect_uri();
        let grant = match self
            .idp(&inv)
            .idp
            .redeem_code(&code, &signin.verifier, &redirect_uri)
            .await
        {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(
                    identity = %crate::names::Shown(&inv.identity),
                    error = %e,
                    "authorization code refused"
                );
                return self.platform_refused(&inv, &e.details).await;
            }
        };
        match self
            .link_grant(&inv, grant, Some(&signin.nonce), "browser")
            .await
        {
            Ok(()) => self.message(
                StatusCode::OK,
                &Message {
                    tone: Tone::Ok,
                    badge: "Done",
                    title: "You are done, you can close this page".into(),
                    lines: vec![format!(
                        "Your mailbox {} is connected. Your applications can use it now.",
                        inv.mailbox
                    )],
                    admin: None,
                    start_again: false,
                },
            ),
            Err(refusal) => self.message(refusal.status, &refusal.message),
        }
    }

    async fn platform_refused(&self, inv: &InvitationRecord, d: &PlatformDetails) -> Answer {
        self.count(SigninResult::idp_error);
        let detail = match d.aadsts {
            Some(c) => format!("{} AADSTS{c}", d.error),
            None => d.error.clone(),
        };
        tracing::info!(
            identity = %crate::names::Shown(&inv.identity),
            error = %detail,
            correlation_id = d.correlation_id.as_deref().unwrap_or(""),
            "browser sign-in failed at the identity platform"
        );
        self.audit("signin.failed", &inv.identity, "failed", Some(&detail))
            .await;
        let (title, lines) = pages::explain(&d.error, d.aadsts);
        self.message(
            StatusCode::BAD_REQUEST,
            &Message {
                tone: Tone::Error,
                badge: "Not connected",
                title,
                lines,
                admin: Some(AdminDetails::from_platform(d)),
                start_again: false,
            },
        )
    }

    /// Checks the grant's account and links the invitation's identity
    /// with it (durably), then makes the running instance serve it.
    async fn link_grant(
        &self,
        inv: &InvitationRecord,
        grant: TokenGrant,
        nonce: Option<&str>,
        how: &str,
    ) -> Result<(), Refusal> {
        let config = &self.app.config;
        let Some(id_token) = grant.id_token.as_ref() else {
            self.count(SigninResult::idp_error);
            tracing::warn!("the identity platform returned no ID token");
            return Err(Refusal::error(
                StatusCode::BAD_GATEWAY,
                "Microsoft did not say who signed in",
                &["The sign-in finished without the account details authswap needs. Tell your administrator (the openid scope must be allowed)."],
            ));
        };
        let idp = config
            .tenant(&inv.tenant)
            .unwrap_or(&config.identity_provider);
        let claims = match id_token::validate(
            id_token.expose(),
            &Expected {
                authority: &idp.authority,
                tenant: &idp.tenant,
                client_id: idp.client_id.trim(),
                nonce,
                now: now_unix(),
            },
        ) {
            Ok(c) => c,
            Err(e) => {
                self.count(SigninResult::idp_error);
                tracing::warn!(identity = %crate::names::Shown(&inv.identity), error = %e, "ID token refused");
                self.audit(
                    "signin.failed",
                    &inv.identity,
                    "refused",
                    Some(&e.to_string()),
                )
                .await;
                return Err(Refusal::error(
                    StatusCode::BAD_GATEWAY,
                    "The sign-in could not be verified",
                    &["The account details Microsoft sent did not check out, so nothing was changed. Start again from your invitation link; if it happens again, tell your administrator."],
                ));
            }
        };
        if !config.onboarding.accepts(&inv.mailbox, &claims.account) {
            self.count(SigninResult::wrong_account);
            tracing::info!(
                identity = %crate::names::Shown(&inv.identity),
                "sign-in with another account than the invited mailbox refused"
            );
            let detail = format!("signed in as {}", bounded(&claims.account, 200));
            self.audit(
                "signin.wrong_account",
                &inv.identity,
                "refused",
                Some(&detail),
            )
            .await;
            return Err(Refusal {
                status: StatusCode::FORBIDDEN,
                message: Message {
                    tone: Tone::Error,
                    badge: "Wrong account",
                    title: "You signed in with a different account".into(),
                    lines: vec![
                        format!(
                            "You signed in as {}, but this invitation is for {}.",
                            claims.account, inv.mailbox
                        ),
                        format!(
                            "Open your invitation link again and, when Microsoft asks you to pick an account, choose {} (use \"Use another account\" if it is not listed). Nothing was changed.",
                            inv.mailbox
                        ),
                    ],
                    admin: None,
                    start_again: false,
                },
            });
        }
        let Some(refresh) = grant.refresh_token.as_ref() else {
            self.count(SigninResult::idp_error);
            tracing::warn!(identity = %crate::names::Shown(&inv.identity), "no refresh token in the sign-in grant");
            return Err(Refusal::error(
                StatusCode::BAD_GATEWAY,
                "Microsoft did not allow lasting access",
                &["The sign-in worked, but Microsoft did not grant the offline access the applications need (offline_access), so nothing was changed. Tell your administrator."],
            ));
        };
        let sealed = self.app.sealer.seal(inv.identity_id, refresh);
        let account = LinkedAccount {
            upn: claims.account.clone(),
            oid: claims.oid.clone(),
            tid: claims.tid.clone(),
        };
        match self
            .app
            .store
            .complete_invitation(inv.id, &sealed, &account, now_unix())
            .await
        {
            Ok(Completion::Linked) => {}
            Ok(Completion::NotPending(state)) => {
                self.count(SigninResult::expired_invitation);
                return Err(Refusal::error(
                    StatusCode::GONE,
                    match state {
                        InvitationState::Completed => "This invitation was already used",
                        InvitationState::Revoked => "This invitation was withdrawn",
                        _ => "This invitation has expired",
                    },
                    &["Nothing was changed. Ask your administrator for a new invitation if your mailbox still needs connecting."],
                ));
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot store the linked identity");
                self.count(SigninResult::failed);
                return Err(Refusal::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Something went wrong on our side",
                    &["Your mailbox could not be connected. Start again from your invitation link in a few minutes."],
                ));
            }
        }
        self.count(SigninResult::linked);
        tracing::info!(
            identity = %crate::names::Shown(&inv.identity),
            invitation = inv.id,
            via = how,
            "identity linked by its user"
        );
        if let Err(e) = self.app.reload().await {
            // The background reload picks it up on its next tick.
            tracing::warn!(error = %e, "cannot reload identities after a link");
        }
        Ok(())
    }

    /// Starts a device-code sign-in for the invitation's identity and sends
    /// the browser to its status page.
    async fn start_device(&self, inv: &InvitationRecord) -> Answer {
        let config = &self.app.config;
        {
            let Ok(mut map) = self.devices.lock() else {
                return self.store_failed(&crate::store::StoreError::Batch("lock".into()));
            };
            let now = now_unix();
            map.retain(|_, s| s.expires_at + 120 > now);
            if map.len() >= MAX_DEVICE_SESSIONS {
                drop(map);
                return self.message(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &Message::error(
                        "Too many sign-ins in progress",
                        &["Wait a few minutes, then open your invitation link again."],
                    ),
                );
            }
        }
        let scopes = with_signin_scopes(&config.login_scopes());
        let login = match self.idp(inv).idp.start_device_login(&scopes).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a device-code sign-in");
                self.count(SigninResult::idp_error);
                return self.message(
                    StatusCode::BAD_GATEWAY,
                    &Message::error(
                        "Sign-in with a code is not available right now",
                        &["Use \"Sign in with Microsoft\" on your invitation page, or try again in a few minutes."],
                    ),
                );
            }
        };
        let id = random_token().expose().to_owned();
        let expires_in = login.expires_in().min(Duration::from_secs(3600));
        let session = DeviceSession {
            mailbox: inv.mailbox.clone(),
            verification_uri: login.verification_uri().to_owned(),
            user_code: login.user_code().to_owned(),
            expires_at: now_unix().saturating_add(expires_in.as_secs() as i64),
            state: DeviceState::Waiting,
        };
        if let Ok(mut map) = self.devices.lock() {
            map.insert(id.clone(), session);
        }
        tracing::info!(
            identity = %crate::names::Shown(&inv.identity),
            invitation = inv.id,
            "device-code sign-in started from the onboarding page"
        );
        self.spawn_device(inv.clone(), login, id.clone(), expires_in);
        self.redirect(&format!("{}/device/{id}", self.root))
    }

    fn spawn_device(
        &self,
        inv: InvitationRecord,
        login: crate::token::DeviceLogin,
        id: String,
        expires_in: Duration,
    ) {
        let Some(me) = self.me() else {
            return;
        };
        tokio::spawn(async move {
            // Bounded: the platform stops the code at its expiry; the
            // timeout covers a platform that keeps answering "pending".
            let limit = expires_in + Duration::from_secs(30);
            let result =
                tokio::time::timeout(limit, me.idp(&inv).idp.finish_device_login(&login, |_| {}))
                    .await;
            let outcome = match result {
                Err(_) => Err(Refusal::error(
                    StatusCode::GONE,
                    "The code expired",
                    &["Open your invitation link again to get a new code."],
                )),
                Ok(Err(e)) => {
                    me.count(SigninResult::idp_error);
                    tracing::info!(identity = %crate::names::Shown(&inv.identity), error = %e, "device-code sign-in failed");
                    let (title, lines) = match &e {
                        IdpError::Reauth { error, .. } if error == "expired_token" => (
                            "The code expired".to_owned(),
                            vec!["Open your invitation link again to get a new code.".to_owned()],
                        ),
                        IdpError::Reauth { error, .. } => pages::explain(error, None),
                        _ => pages::explain("temporarily_unavailable", None),
                    };
                    Err(Refusal {
                        status: StatusCode::BAD_REQUEST,
                        message: Message {
                            title,
                            lines,
                            ..Message::error("", &[])
                        },
                    })
                }
                Ok(Ok(grant)) => me.link_grant(&inv, grant, None, "device code").await,
            };
            if let Ok(mut map) = me.devices.lock() {
                if let Some(s) = map.get_mut(&id) {
                    s.state = match outcome {
                        Ok(()) => DeviceState::Done,
                        Err(r) => DeviceState::Failed(r.message.title, r.message.lines),
                    };
                }
            }
        });
    }

    fn device_page(&self, id: &str) -> Answer {
        let session = self.devices.lock().ok().and_then(|m| m.get(id).cloned());
        let Some(s) = session else {
            return self.not_found();
        };
        let (status, title, lines) = match s.state {
            DeviceState::Waiting => ("waiting", String::new(), Vec::new()),
            DeviceState::Done => ("done", String::new(), Vec::new()),
            DeviceState::Failed(t, l) => ("failed", t, l),
        };
        self.html(
            StatusCode::OK,
            self.pages.device(&DeviceView {
                status,
                verification_uri: s.verification_uri,
                user_code: s.user_code,
                mailbox: s.mailbox,
                expires: pages::format_time(s.expires_at),
                title,
                lines,
            }),
        )
    }
}

/// A refused link: the page to show.
struct Refusal {
    status: StatusCode,
    message: Message,
}

impl Refusal {
    fn error(status: StatusCode, title: &str, lines: &[&str]) -> Refusal {
        Refusal {
            status,
            message: Message::error(title, lines),
        }
    }
}

fn parse_form(bytes: &[u8]) -> Vec<(String, String)> {
    url::form_urlencoded::parse(bytes)
        .take(32)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn form_get<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn bounded(s: &str, n: usize) -> String {
    s.chars().filter(|c| !c.is_control()).take(n).collect()
}

/// The id after `label` in an `error_description` (`... Correlation ID: x ...`).
fn id_after(text: &str, label: &str) -> Option<String> {
    let i = text.find(label)?;
    let id: String = text[i + label.len()..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_hexdigit() || *c == '-')
        .take(64)
        .collect();
    Some(id).filter(|s| !s.is_empty())
}

fn cookie_values<'a>(
    headers: &'a http::HeaderMap,
    name: &'a str,
) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(move |pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}
