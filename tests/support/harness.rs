//! Harness for behaviour tests: a temporary directory with a configuration
//! pointing at the in-process identity platform and EWS doubles, helpers to
//! seed identities, run authswap in-process or as the real binary, and talk
//! HTTP to it.

use super::{pki, FakeEws, FakeIdp, IdpOptions};
use authswap::config::Config;
use authswap::identity::hash_password;
use authswap::secret::Secret;
use authswap::server::Server;
use authswap::store::{open_sealer, KeyUse, SqliteStore, Store};
use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use tempfile::TempDir;

/// Tenant used in test configurations.
pub const TENANT: &str = "contoso-test";

/// One test's world.
pub struct Env {
    /// Holds the database, key, CA and config files.
    pub dir: TempDir,
    /// Identity-platform double.
    pub idp: FakeIdp,
    /// EWS double.
    pub ews: FakeEws,
    /// Test CA file trusted by authswap.
    pub ca_file: PathBuf,
    /// More TOML appended to the configuration (e.g. `[tenants.NAME]`).
    pub extra_toml: std::sync::Mutex<String>,
    /// `store.url` when the test runs on PostgreSQL ([`Env::use_store_url`]).
    pub store_url: std::sync::Mutex<Option<String>>,
}

impl Env {
    /// Starts the doubles with default options.
    pub async fn start() -> Env {
        Env::start_with(IdpOptions::default()).await
    }

    /// Starts the doubles with `opts` for the identity platform.
    pub async fn start_with(opts: IdpOptions) -> Env {
        Env::start_full(opts, false).await
    }

    /// Starts the doubles, the EWS one speaking only HTTP/1.1.
    pub async fn start_http1() -> Env {
        Env::start_full(IdpOptions::default(), true).await
    }

    async fn start_full(opts: IdpOptions, http1_only: bool) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let idp = FakeIdp::start_with(opts).await;
        // App-only tokens issued by the identity-platform double are held
        // to Exchange's rules (anchor and impersonation).
        let v = idp.validator();
        let app_tokens: super::ews::AppTokenPolicy =
            std::sync::Arc::new(move |token: &str| v.app_token(token).map(|a| a.client_id));
        let ews = FakeEws::start_with(super::EwsOptions {
            http1_only,
            app_tokens: Some(app_tokens),
            ..super::EwsOptions::new(idp.validator())
        })
        .await;
        let ca_file = pki().write_ca_file(dir.path());
        Env {
            dir,
            idp,
            ews,
            ca_file,
            extra_toml: Default::default(),
            store_url: Default::default(),
        }
    }

    /// The configuration as TOML (ports 0, cheap argon2, fast reload).
    pub fn config_toml(&self) -> String {
        let d = self.dir.path().display();
        let url = match self.store_url.lock().expect("lock").as_deref() {
            Some(url) => format!("url = \"{url}\"\n"),
            None => String::new(),
        };
        format!(
            r#"
[store]
path = "{d}/data/authswap.db"
key_file = "{d}/data/authswap.key"
{url}
[identity_provider]
authority = "{authority}"
tenant = "{TENANT}"
client_id = "{client_id}"
authorize_endpoint = "{authorize}"
timeout = "5s"

[tls]
extra_ca_file = "{ca}"

[http]
listen = "127.0.0.1:0"
upstream = "{upstream}"
replay_buffer_limit = "1MiB"
header_read_timeout = "5s"
upstream_timeout = "10s"

[admin]
listen = "127.0.0.1:0"
token_file = "{d}/data/admin.token"

[onboarding]
listen = "127.0.0.1:0"

[auth]
argon2_memory_kib = 256
argon2_iterations = 1
argon2_parallelism = 1

[smtp]
enabled = false
listen = "127.0.0.1:0"

[imap]
enabled = false
listen = "127.0.0.1:0"

[pop3]
enabled = false
listen = "127.0.0.1:0"

[tokens]
reload_interval = "100ms"
retry_min = "1s"
retry_max = "5s"
"#,
            authority = self.idp.base_url(),
            client_id = self.idp.client_id(),
            authorize = self.idp.authorize_endpoint(TENANT),
            ca = self.ca_file.display(),
            upstream = self.ews.base_url(),
        )
    }

    /// Writes the configuration file and returns its path.
    pub fn write_config(&self) -> PathBuf {
        let path = self.dir.path().join("authswap.toml");
        let extra = self.extra_toml.lock().expect("lock").clone();
        std::fs::write(&path, format!("{}\n{extra}", self.config_toml())).expect("write config");
        path
    }

    /// Appends `toml` to the configuration.
    pub fn add_toml(&self, toml: &str) {
        let mut extra = self.extra_toml.lock().expect("lock");
        extra.push('\n');
        extra.push_str(toml);
    }

    /// Runs this world on the PostgreSQL database at `url` instead of the
    /// SQLite file (see `support::pg::database`).
    pub fn use_store_url(&self, url: &str) {
        *self.store_url.lock().expect("lock") = Some(url.to_owned());
    }

    /// Opens the configured store (SQLite or PostgreSQL) directly.
    pub async fn any_store(&self) -> std::sync::Arc<dyn Store> {
        authswap::store::open(&self.config())
            .await
            .expect("open store")
    }

    /// Adds an app-only identity of tenant `tenant`.
    pub async fn add_app(&self, name: &str, mailbox: &str, password: &str, tenant: &str) {
        let config = self.config();
        let store = self.any_store().await;
        let hash = hash_password(password, &config.auth).expect("hash");
        store
            .create(&authswap::store::NewIdentity {
                name: name.to_owned(),
                mailbox: mailbox.to_owned(),
                password_hash: hash,
                tenant: tenant.to_owned(),
                mode: authswap::store::Mode::App,
            })
            .await
            .expect("create");
    }

    /// The loaded configuration (through the real loader).
    pub fn config(&self) -> Config {
        Config::load(&self.write_config()).expect("valid test config")
    }

    /// Opens the store directly.
    pub async fn store(&self) -> SqliteStore {
        SqliteStore::open(&self.dir.path().join("data/authswap.db"))
            .await
            .expect("open store")
    }

    /// Adds an identity linked to a refresh token seeded at the identity
    /// platform; returns that refresh token.
    pub async fn add_linked(&self, name: &str, mailbox: &str, password: &str) -> String {
        let config = self.config();
        let store = self.any_store().await;
        let hash = hash_password(password, &config.auth).expect("hash");
        let rec = store
            .create(&authswap::store::NewIdentity::delegated(
                name, mailbox, &hash,
            ))
            .await
            .expect("create");
        let rt = self.idp.seed_refresh_token(mailbox);
        let sealer = open_sealer(&config.store, store.as_ref(), KeyUse::Link)
            .await
            .expect("key");
        store
            .link(rec.id, &sealer.seal(rec.id, &Secret::new(rt.clone())))
            .await
            .expect("link");
        rt
    }

    /// Starts authswap in-process.
    pub async fn serve(&self) -> Server {
        self.serve_with(|_| {}).await
    }

    /// Starts authswap in-process after `tweak`ing the configuration.
    pub async fn serve_with(&self, tweak: impl FnOnce(&mut Config)) -> Server {
        let mut config = self.config();
        tweak(&mut config);
        Server::start(config).await.expect("server starts")
    }

    /// Runs the real binary with `args` (after `-c <config>`), feeding `stdin`.
    pub fn cli(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let config = self.write_config();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_authswap"));
        cmd.arg("-c").arg(&config).args(args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn authswap");
        {
            use std::io::Write;
            let mut pipe = child.stdin.take().expect("stdin");
            if let Some(input) = stdin {
                pipe.write_all(input.as_bytes()).expect("write stdin");
            }
        }
        child.wait_with_output().expect("authswap output")
    }
}

/// `Basic` header value.
pub fn basic(name: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{name}:{password}"))
    )
}

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Reply {
    /// Body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap_or_default().to_owned())
    }
}

/// Plain HTTP/1.1 keep-alive client toward authswap.
#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for HttpClient {
    fn default() -> Self {
        HttpClient {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }
}

impl HttpClient {
    /// Sends one request, reading the whole answer (10 s limit).
    pub async fn send(
        &self,
        addr: SocketAddr,
        method: Method,
        path: &str,
        auth: Option<&str>,
        body: impl Into<Bytes>,
    ) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"))
            .header("content-type", "text/xml; charset=utf-8");
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        self.exchange(req.body(Full::new(body.into())).expect("request"))
            .await
    }

    /// Sends `req` and collects the whole answer (at most 20 s).
    async fn exchange(&self, req: Request<Full<Bytes>>) -> Reply {
        let work = async {
            let res = self.client.request(req).await.expect("request to authswap");
            let (parts, body) = res.into_parts();
            let body = body.collect().await.expect("body").to_bytes();
            Reply {
                status: parts.status,
                headers: parts.headers,
                body,
            }
        };
        tokio::time::timeout(Duration::from_secs(20), work)
            .await
            .expect("authswap answered in time")
    }

    /// POST to EWS through authswap as `name`/`password`.
    pub async fn ews(&self, addr: SocketAddr, name: &str, password: &str, body: &str) -> Reply {
        self.send(
            addr,
            Method::POST,
            "/EWS/Exchange.asmx",
            Some(&basic(name, password)),
            body.to_owned(),
        )
        .await
    }

    /// GET a path on the admin listener.
    pub async fn get(&self, addr: SocketAddr, path: &str) -> Reply {
        self.send(addr, Method::GET, path, None, Bytes::new()).await
    }

    /// GET `/metrics` asking for OpenMetrics, as Prometheus does (without
    /// it, the Prometheus text format 0.0.4 is served).
    pub async fn get_openmetrics(&self, addr: SocketAddr) -> Reply {
        let req = Request::get(format!("http://{addr}/metrics"))
            .header(
                "accept",
                "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
            )
            .body(Full::new(Bytes::new()))
            .expect("request");
        self.exchange(req).await
    }

    /// Scrapes `/metrics` on the admin listener every 20 ms until `cond`
    /// holds for the text (at most `limit`); returns the last scrape and
    /// whether it held. For state that authswap updates in the background.
    pub async fn metrics_until(
        &self,
        admin: SocketAddr,
        limit: Duration,
        mut cond: impl FnMut(&str) -> bool,
    ) -> (String, bool) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let m = self.get(admin, "/metrics").await.text();
            if cond(&m) {
                return (m, true);
            }
            if tokio::time::Instant::now() >= deadline {
                return (m, false);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A SOAP-ish body for requests.
pub const SOAP: &str = r#"<?xml version="1.0" encoding="utf-8"?><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body><GetFolder xmlns="http://schemas.microsoft.com/exchange/services/2006/messages"/></soap:Body></soap:Envelope>"#;

/// Waits until `cond` holds (checked every 20 ms, at most `limit`).
pub async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// The value of one sample in OpenMetrics text, if present.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l[series.len()..].trim().parse().ok())
}
