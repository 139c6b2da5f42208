//! The admin listener: `/metrics` (OpenMetrics text), `/healthz` (the
//! process is alive) and `/readyz` (the store answers). Bind it to loopback
//! or a pod-internal address: it is not authenticated.

use crate::app::App;
use crate::proxy::http::{full, text};
use crate::tls::OutBody;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use std::convert::Infallible;
use std::sync::Arc;

/// Content type of `/metrics`.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves one admin request.
pub async fn handle<B>(app: Arc<App>, req: Request<B>) -> Result<Response<OutBody>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    let response = match req.uri().path() {
        "/metrics" => {
            let mut r = Response::new(full(Bytes::from(app.metrics.encode())));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match app.store.revision().await {
            Ok(_) => {
                let mut body = String::from("ready\n");
                for missing in app.config.missing() {
                    body.push_str("warning: ");
                    body.push_str(&missing);
                    body.push('\n');
                }
                text(StatusCode::OK, &body)
            }
            Err(e) => {
                tracing::warn!(error = %e, "readiness check failed");
                text(StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n")
            }
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    Ok(response)
}
