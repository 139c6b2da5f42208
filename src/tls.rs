//! TLS plumbing: the rustls client configuration (built-in webpki roots plus
//! `tls.extra_ca_file`) used for every upstream and identity-platform
//! connection, the pooled outbound HTTP client built on it, and the server
//! configuration for local listeners that serve TLS.

use crate::config::TlsConfig;
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Time limit for opening an outbound connection (TCP, then TLS).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Boxed error for streaming bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every outbound request.
pub type OutBody = UnsyncBoxBody<Bytes, BoxError>;
/// Pooled HTTPS (and loopback HTTP) client, HTTP/1.1 and HTTP/2 by ALPN.
pub type HttpsClient = Client<HttpsConnector<HttpConnector>, OutBody>;

/// A TLS setup problem, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{key} {path}: {message}")]
    Pem {
        /// Config key that named the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_pem(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Pem {
        key,
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Certificates from a PEM file.
pub fn load_certs(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_pem(key, path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            key,
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            key,
            path: path.to_owned(),
            message: "no PEM certificate found".into(),
        });
    }
    Ok(certs)
}

/// The client configuration: webpki roots + the extra CA file.
pub fn client_config(tls: &TlsConfig) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = &tls.extra_ca_file {
        for cert in load_certs("tls.extra_ca_file", path)? {
            roots.add(cert).map_err(|e| TlsError::Pem {
                key: "tls.extra_ca_file",
                path: path.clone(),
                message: e.to_string(),
            })?;
        }
    }
    // ALPN is left empty: the HTTPS connector sets h2 + http/1.1 itself,
    // and mail connections need none.
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A pooled client over `config`.
pub fn https_client(config: rustls::ClientConfig, connect_timeout: Duration) -> HttpsClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .http2_keep_alive_interval(Some(Duration::from_secs(30)))
        .build(connector)
}

/// Server configuration for a local TLS listener.
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = load_certs("tls_cert_file", cert_file)?;
    let pem = read_pem("tls_key_file", key_file)?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| TlsError::Pem {
            key: "tls_key_file",
            path: key_file.to_owned(),
            message: e.to_string(),
        })?
        .ok_or_else(|| TlsError::Pem {
            key: "tls_key_file",
            path: key_file.to_owned(),
            message: "no PEM private key found".into(),
        })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}
