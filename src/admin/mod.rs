//! The admin listener: `/metrics` (OpenMetrics when the scraper asks for
//! it, else the Prometheus text format 0.0.4), `/healthz` (the process is
//! alive) and `/readyz` (an app registration is configured and the store
//! answers within [`crate::app::READY_PROBE_TIMEOUT`]) without
//! authentication; the JSON API under `/api/v1` ([`api`]) and the console
//! ([`console`]) behind the admin credential ([`credential`]). Bind it to
//! loopback or a pod-internal address.

pub mod api;
pub mod console;
pub mod credential;
pub mod ops;
pub mod web;

use crate::app::App;
use crate::metrics::PROMETHEUS_TEXT;
use crate::proxy::http::{full, text};
use crate::tls::OutBody;
use bytes::Bytes;
use credential::{Credential, CredentialError, Sessions};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use std::convert::Infallible;
use std::sync::Arc;

/// Content type of `/metrics`.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The admin listener's state: the application, the credential, console
/// sessions and the compiled pages.
pub struct AdminListener {
    app: Arc<App>,
    credential: Credential,
    sessions: Arc<Sessions>,
    pages: console::Pages,
    /// Served over TLS (cookies are `Secure`, origins `https://`).
    secure: bool,
}

impl std::fmt::Debug for AdminListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminListener")
            .field("secure", &self.secure)
            .finish_non_exhaustive()
    }
}

impl AdminListener {
    /// Loads (or creates) the admin credential; `secure` when the listener
    /// serves TLS.
    pub fn new(app: Arc<App>, secure: bool) -> Result<Arc<AdminListener>, CredentialError> {
        Self::with_sessions(app, secure, None)
    }

    /// As [`AdminListener::new`], keeping the console sessions of the
    /// listener it replaces (a configuration reload) when their lifetime
    /// did not change.
    pub fn with_sessions(
        app: Arc<App>,
        secure: bool,
        previous: Option<Arc<Sessions>>,
    ) -> Result<Arc<AdminListener>, CredentialError> {
        let credential = Credential::load(&app.config.admin)?;
        let ttl = app.config.admin.session_ttl;
        let sessions = previous
            .filter(|s| s.ttl() == ttl)
            .unwrap_or_else(|| Arc::new(Sessions::new(ttl)));
        Ok(Arc::new(AdminListener {
            app,
            credential,
            sessions,
            pages: console::Pages::new(),
            secure,
        }))
    }

    /// The console sessions (handed to the listener a reload builds).
    pub fn sessions(&self) -> Arc<Sessions> {
        self.sessions.clone()
    }

    /// Serves one admin request.
    pub async fn handle<B>(
        self: Arc<Self>,
        req: Request<B>,
    ) -> Result<Response<OutBody>, Infallible>
    where
        B: hyper::body::Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = req.uri().path();
        if matches!(path, "/metrics" | "/healthz" | "/readyz") {
            return Ok(self.open_endpoint(&req).await);
        }
        let (parts, body) = req.into_parts();
        let response = if parts.uri.path().starts_with("/api/") {
            self.api(parts, body).await
        } else {
            console::serve(&self, parts, body).await
        };
        Ok(response)
    }

    async fn api<B>(&self, parts: http::request::Parts, body: B) -> Response<OutBody>
    where
        B: hyper::body::Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        use api::ApiError;
        let bearer = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.split_once(' ')
                    .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                    .map(|(_, t)| t.trim())
            });
        let authorised = match bearer {
            Some(token) => self.credential.matches(token),
            // A console session may read (GET) the API, e.g. the OpenAPI document.
            None => {
                matches!(parts.method, Method::GET | Method::HEAD)
                    && web::cookie(&parts.headers, console::SESSION_COOKIE)
                        .is_some_and(|id| self.sessions.csrf(&id).is_some())
            }
        };
        if !authorised {
            let message = if bearer.is_some() {
                "the bearer token is not the admin token"
            } else {
                "send the admin token as `Authorization: Bearer <token>`"
            };
            return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).response();
        }
        let path = parts.uri.path();
        let (route, params) = match api::resolve(&parts.method, path) {
            Ok(Some(found)) => found,
            Ok(None) => {
                return ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such API endpoint")
                    .response()
            }
            Err(allowed) => {
                let mut r = ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!("this endpoint takes {}", allowed.join(", ")),
                )
                .response();
                if let Ok(v) = HeaderValue::from_str(&allowed.join(", ")) {
                    r.headers_mut().insert(header::ALLOW, v);
                }
                return r;
            }
        };
        let body = match web::read_body(&parts.headers, body, api::body_limit(route)).await {
            Ok(b) => b,
            Err(e) => return ApiError::from(e).response(),
        };
        let query = parts.uri.query().unwrap_or("");
        api::serve(&self.app, route, params, &parts.headers, query, body).await
    }

    async fn open_endpoint<B>(&self, req: &Request<B>) -> Response<OutBody> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        let app = &self.app;
        match req.uri().path() {
            "/metrics" => {
                let accept = req
                    .headers()
                    .get_all(header::ACCEPT)
                    .iter()
                    .filter_map(|v| v.to_str().ok());
                let (body, kind) = if wants_openmetrics(accept) {
                    (app.metrics.encode(), OPENMETRICS)
                } else {
                    (app.metrics.encode_prometheus(), PROMETHEUS_TEXT)
                };
                let mut r = Response::new(full(Bytes::from(body)));
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
                r.headers_mut()
                    .insert(header::VARY, HeaderValue::from_static("Accept"));
                r
            }
            "/healthz" => text(StatusCode::OK, "ok\n"),
            _ => {
                // Logged once when the store is lost (see StoreHealth).
                if app.readiness_probe().await.is_err() {
                    return text(StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n");
                }
                let unready = app.config.unready();
                let mut body = String::from(if unready.is_empty() {
                    "ready\n"
                } else {
                    "not ready\n"
                });
                for reason in &unready {
                    body.push_str("reason: ");
                    body.push_str(reason);
                    body.push('\n');
                }
                for missing in app.config.missing() {
                    // Already a reason above.
                    if missing.starts_with("identity_provider.client_id is empty") {
                        continue;
                    }
                    body.push_str("warning: ");
                    body.push_str(&missing);
                    body.push('\n');
                }
                let status = if unready.is_empty() {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                text(status, &body)
            }
        }
    }
}

/// Whether the `Accept` header values prefer OpenMetrics
/// (`application/openmetrics-text`, any version) over the Prometheus text
/// format: the highest `q` wins, text on a tie or without any preference.
fn wants_openmetrics<'a>(accept: impl Iterator<Item = &'a str>) -> bool {
    let (mut om, mut plain) = (0.0f32, 0.0f32);
    for range in accept.flat_map(|v| v.split(',')) {
        let mut parts = range.split(';').map(str::trim);
        let kind = parts.next().unwrap_or("").to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .and_then(|(_, v)| v.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        match kind.as_str() {
            "application/openmetrics-text" => om = om.max(q),
            "text/plain" | "text/*" | "*/*" => plain = plain.max(q),
            _ => {}
        }
    }
    om > 0.0 && om > plain
}

#[cfg(test)]
mod tests {
    use super::wants_openmetrics;

    #[test]
    fn metrics_format_follows_the_accept_header() {
        let om = |h: &str| wants_openmetrics(std::iter::once(h));
        // Prometheus 2.x and 3.x.
        assert!(om("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"));
        assert!(om(
            "application/openmetrics-text; version=0.0.1,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        ));
        assert!(om("application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.6,application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1"));
        assert!(om("Application/OpenMetrics-Text"));
        assert!(!om("text/plain;version=0.0.4"));
        assert!(!om("*/*"));
        assert!(!om(""));
        assert!(!om(
            "text/plain;version=0.0.4,application/openmetrics-text;q=0.5"
        ));
        assert!(!om("application/openmetrics-text;q=0"));
        assert!(!wants_openmetrics(std::iter::empty()));
    }
}
