//! Configuration: built-in defaults < TOML file < `AUTHSWAP_SECTION__KEY`
//! environment variables, loaded with figment and validated here, so every
//! other module receives values it can trust.

use crate::secret::Secret;
use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;
use url::Url;

/// Default location of the configuration file (relative to the working directory).
pub const DEFAULT_CONFIG_PATH: &str = "config/authswap.toml";

/// Delegated scope for Exchange Web Services.
pub const EWS_SCOPE: &str = "https://outlook.office365.com/EWS.AccessAsUser.All";
/// Scope that makes the identity platform return a refresh token.
pub const OFFLINE_ACCESS: &str = "offline_access";

/// Why the configuration cannot be used. Always names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file given with `-c` does not exist.
    #[error("configuration file {0} does not exist")]
    NotFound(PathBuf),
    /// A value has the wrong type or shape (figment names the key and the source).
    #[error("{0}")]
    Parse(#[from] Box<figment::Error>),
    /// A value parsed but is not acceptable.
    #[error("{key}: {message}")]
    Invalid {
        /// Dotted key, e.g. `http.upstream`.
        key: Cow<'static, str>,
        /// What is wrong and what to do.
        message: String,
    },
    /// A `*_file` could not be read.
    #[error("{key}: cannot read {path}: {source}")]
    File {
        /// Dotted key.
        key: Cow<'static, str>,
        /// The file.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
}

fn invalid(key: impl Into<Cow<'static, str>>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Embedded store and its sealing key.
    pub store: StoreConfig,
    /// Microsoft identity platform (or another OAuth 2.0 provider): the
    /// tenant named `default`.
    pub identity_provider: IdpConfig,
    /// More tenants, by name (`[tenants.NAME]`, same keys as
    /// `[identity_provider]`); `[tenants.default]` may stand in for
    /// `[identity_provider]`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tenants: BTreeMap<String, IdpConfig>,
    /// Keys whose secret is written in the TOML file itself (config check
    /// warns); filled by [`Config::load`].
    #[serde(skip)]
    pub secrets_in_file: Vec<String>,
    /// Trust roots for outbound TLS.
    pub tls: TlsConfig,
    /// The HTTP (EWS) front end.
    pub http: HttpConfig,
    /// Admin listener: metrics and health.
    pub admin: AdminConfig,
    /// Local credential checks.
    pub auth: AuthConfig,
    /// Token engine tuning.
    pub tokens: TokenConfig,
    /// SMTP submission front end.
    #[serde(deserialize_with = "smtp_de")]
    pub smtp: MailConfig,
    /// IMAP front end.
    #[serde(deserialize_with = "imap_de")]
    pub imap: MailConfig,
    /// POP3 front end.
    #[serde(deserialize_with = "pop3_de")]
    pub pop3: MailConfig,
    /// The async runtime.
    pub runtime: RuntimeConfig,
    /// Invitations and the public sign-in listener.
    pub onboarding: OnboardingConfig,
    /// Messages to users and admins when an identity needs attention.
    pub notifications: NotificationsConfig,
}

/// `[runtime]`: how many threads serve connections; the access log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Threads that run the listeners and connections; 0 = one per CPU.
    /// One is the default, as for a service-mesh sidecar: on a host shared
    /// with the application, a second worker mostly adds cross-thread
    /// wake-ups (see docs/benchmarks.md). argon2 runs on its own pool.
    pub worker_threads: usize,
    /// One `info` line per HTTP request and per mail session (target
    /// `authswap::access`): identity, protocol, outcome, upstream status,
    /// duration. Off by default.
    pub access_log: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            worker_threads: 1,
            access_log: false,
        }
    }
}

fn smtp_de<'de, D: Deserializer<'de>>(d: D) -> Result<MailConfig, D::Error> {
    mail_section(d, MailConfig::smtp())
}
fn imap_de<'de, D: Deserializer<'de>>(d: D) -> Result<MailConfig, D::Error> {
    mail_section(d, MailConfig::imap())
}
fn pop3_de<'de, D: Deserializer<'de>>(d: D) -> Result<MailConfig, D::Error> {
    mail_section(d, MailConfig::pop3())
}

impl Default for Config {
    fn default() -> Self {
        Config {
            store: StoreConfig::default(),
            identity_provider: IdpConfig::default(),
            tenants: BTreeMap::new(),
            secrets_in_file: Vec::new(),
            tls: TlsConfig::default(),
            http: HttpConfig::default(),
            admin: AdminConfig::default(),
            auth: AuthConfig::default(),
            tokens: TokenConfig::default(),
            smtp: MailConfig::smtp(),
            imap: MailConfig::imap(),
            pop3: MailConfig::pop3(),
            runtime: RuntimeConfig::default(),
            onboarding: OnboardingConfig::default(),
            notifications: NotificationsConfig::default(),
        }
    }
}

/// How a mail front end reaches its upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamTls {
    /// Plain connection upgraded with STARTTLS / STLS (refused when not offered).
    Starttls,
    /// TLS from the first byte.
    Implicit,
}

/// SMTP submission scope.
pub const SMTP_SCOPE: &str = "https://outlook.office.com/SMTP.Send";
/// IMAP scope.
pub const IMAP_SCOPE: &str = "https://outlook.office.com/IMAP.AccessAsUser.All";
/// POP3 scope.
pub const POP_SCOPE: &str = "https://outlook.office.com/POP.AccessAsUser.All";

/// `[smtp]`, `[imap]`, `[pop3]`: a mail front end.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailConfig {
    /// Serve this front end.
    #[serde(default)]
    pub enabled: bool,
    /// Local listen address.
    pub listen: String,
    /// Upstream `host:port`.
    pub upstream: String,
    /// `starttls` or `implicit`.
    pub upstream_tls: UpstreamTls,
    /// Scopes requested for this protocol's tokens.
    #[serde(deserialize_with = "scopes_de")]
    pub scopes: Vec<String>,
    /// Scopes of app-only identities' tokens (client-credentials grant).
    #[serde(default = "default_app_scopes", deserialize_with = "scopes_de")]
    pub app_scopes: Vec<String>,
    /// Certificate chain (PEM) to offer STARTTLS (or implicit TLS) to clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// Private key (PEM) for `tls_cert_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// With a certificate: TLS from the first byte (SMTPS/IMAPS/POP3S) instead of STARTTLS.
    #[serde(default)]
    pub implicit_tls: bool,
    /// Name in greetings.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// Longest accepted command line before login, in bytes.
    #[serde(default = "default_max_line")]
    pub max_line: ByteSize,
    /// A client silent this long before login is disconnected.
    #[serde(default = "default_idle", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A client not logged in this long after connecting is disconnected,
    /// however busy (a connection slot is not held by whoever cannot log
    /// in).
    #[serde(default = "default_login_timeout", with = "humantime_serde")]
    pub login_timeout: Duration,
    /// Time limit for connecting and logging in upstream.
    #[serde(default = "default_upstream_timeout", with = "humantime_serde")]
    pub upstream_timeout: Duration,
    /// Concurrent client connections; when full, the oldest connection not
    /// logged in makes room (else new ones wait).
    #[serde(default = "default_mail_connections")]
    pub max_connections: usize,
    /// Concurrent client connections from one non-loopback address.
    #[serde(default = "default_mail_connections_per_source")]
    pub max_connections_per_source: usize,
    /// Logged-in sessions one identity may have upstream at once (`0`: no
    /// limit). Sessions over it wait at login for up to `session_wait`.
    /// SMTP: 3 (Exchange Online's limit per mailbox); IMAP, POP3: 0.
    #[serde(default)]
    pub max_sessions_per_identity: usize,
    /// SMTP only: messages one identity may submit per minute (sliding
    /// window; `0`: no limit). A `MAIL FROM` over it is held until the
    /// window has room. SMTP: 30 (Exchange Online's limit); others: 0.
    #[serde(default)]
    pub messages_per_minute: u32,
    /// How long a login waits for one of the identity's sessions to end
    /// before it is refused with a temporary answer.
    #[serde(default = "default_session_wait", with = "humantime_serde")]
    pub session_wait: Duration,
}

/// How far ahead an expiring app credential is warned about.
pub const CREDENTIAL_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// A warning when the `what` of `section` expires within
/// [`CREDENTIAL_WARNING`] of `now`, or has expired.
pub fn expiry_warning(
    section: &str,
    what: &str,
    at: std::time::SystemTime,
    now: std::time::SystemTime,
) -> Option<String> {
    let when = humantime::format_rfc3339_seconds(at);
    match at.duration_since(now) {
        Err(_) => Some(format!(
            "{section}: the {what} expired at {when}: every identity of this tenant is blocked until it is renewed"
        )),
        Ok(left) if left <= CREDENTIAL_WARNING => Some(format!(
            "{section}: the {what} expires at {when}, in {} days: renew it in Entra ID \
             (App registrations → Certificates & secrets) and update the configuration",
            left.as_secs() / 86_400
        )),
        Ok(_) => None,
    }
}

/// Whether `name` may name a tenant (it appears in metric labels and
/// on the command line).
pub fn valid_tenant_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && !name.starts_with(['-', '_'])
}

/// Parses an expiry: a date (`2027-06-30`, midnight UTC) or RFC 3339.
pub fn parse_expiry(text: &str) -> Result<std::time::SystemTime, String> {
    let t = text.trim();
    let full = if t.len() == 10 {
        format!("{t}T00:00:00Z")
    } else {
        t.to_owned()
    };
    humantime::parse_rfc3339_weak(full.trim_end_matches('Z'))
        .map_err(|e| format!("`{t}` is not a date (2027-06-30) or an RFC 3339 time: {e}"))
}

fn check_app_scopes(key: &'static str, scopes: &[String]) -> Result<(), ConfigError> {
    if scopes.is_empty() {
        return Err(invalid(key, "at least one scope is required"));
    }
    if let Some(bad) = scopes.iter().find(|s| !s.ends_with("/.default")) {
        return Err(invalid(
            key,
            format!(
                "`{bad}`: app-only tokens take a resource's `/.default` scope, \
                 e.g. https://outlook.office365.com/.default"
            ),
        ));
    }
    Ok(())
}

/// The scope of app-only tokens for Exchange Online (EWS, SMTP, IMAP, POP).
pub const EXCHANGE_APP_SCOPE: &str = "https://outlook.office365.com/.default";

fn default_app_scopes() -> Vec<String> {
    vec![EXCHANGE_APP_SCOPE.into()]
}

fn default_hostname() -> String {
    "authswap".into()
}
fn default_max_line() -> ByteSize {
    ByteSize(4096)
}
fn default_idle() -> Duration {
    Duration::from_secs(300)
}
fn default_login_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_upstream_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_session_wait() -> Duration {
    Duration::from_secs(30)
}
fn default_mail_connections() -> usize {
    512
}
fn default_mail_connections_per_source() -> usize {
    128
}

impl MailConfig {
    fn base(listen: &str, upstream: &str, tls: UpstreamTls, scope: &str) -> MailConfig {
        MailConfig {
            enabled: true,
            listen: listen.into(),
            upstream: upstream.into(),
            upstream_tls: tls,
            scopes: vec![scope.into(), OFFLINE_ACCESS.into()],
            app_scopes: default_app_scopes(),
            tls_cert_file: None,
            tls_key_file: None,
            implicit_tls: false,
            hostname: default_hostname(),
            max_line: default_max_line(),
            idle_timeout: default_idle(),
            login_timeout: default_login_timeout(),
            upstream_timeout: default_upstream_timeout(),
            max_connections: default_mail_connections(),
            max_connections_per_source: default_mail_connections_per_source(),
            max_sessions_per_identity: 0,
            messages_per_minute: 0,
            session_wait: default_session_wait(),
        }
    }

    /// Defaults of `[smtp]`.
    pub fn smtp() -> MailConfig {
        MailConfig {
            // Exchange Online: 3 concurrent SMTP connections and 30
            // messages a minute per mailbox.
            max_sessions_per_identity: 3,
            messages_per_minute: 30,
            ..Self::base(
                "127.0.0.1:2525",
                "smtp.office365.com:587",
                UpstreamTls::Starttls,
                SMTP_SCOPE,
            )
        }
    }

    /// Defaults of `[imap]`.
    pub fn imap() -> MailConfig {
        Self::base(
            "127.0.0.1:1143",
            "outlook.office365.com:993",
            UpstreamTls::Implicit,
            IMAP_SCOPE,
        )
    }

    /// Defaults of `[pop3]`.
    pub fn pop3() -> MailConfig {
        Self::base(
            "127.0.0.1:1110",
            "outlook.office365.com:995",
            UpstreamTls::Implicit,
            POP_SCOPE,
        )
    }

    /// Upstream host and port.
    pub fn upstream_host_port(&self) -> Option<(String, u16)> {
        let (host, port) = self.upstream.rsplit_once(':')?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return None;
        }
        Some((host.to_owned(), port.parse().ok()?))
    }

    fn validate(&self, keys: &MailKeys) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        parse_listen(keys.listen, &self.listen)?;
        if self.upstream_host_port().is_none() || self.upstream.contains('@') {
            return Err(invalid(
                keys.upstream,
                format!(
                    "`{}` is not host:port (e.g. smtp.office365.com:587)",
                    redact_host_port(&self.upstream)
                ),
            ));
        }
        if self.scopes.is_empty() {
            return Err(invalid(keys.scopes, "at least one scope is required"));
        }
        check_app_scopes(keys.app_scopes, &self.app_scopes)?;
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(invalid(
                keys.tls_cert_file,
                "tls_cert_file and tls_key_file must be set together",
            ));
        }
        if self.implicit_tls && self.tls_cert_file.is_none() {
            return Err(invalid(
                keys.implicit_tls,
                "implicit_tls needs tls_cert_file and tls_key_file",
            ));
        }
        check_size(keys.max_line, self.max_line, 512, MAX_LINE)?;
        check_count(keys.max_connections, self.max_connections, MAX_CONNECTIONS)?;
        check_count(
            keys.max_connections_per_source,
            self.max_connections_per_source,
            MAX_CONNECTIONS,
        )?;
        check_duration(keys.idle_timeout, self.idle_timeout)?;
        check_duration(keys.login_timeout, self.login_timeout)?;
        check_duration(keys.upstream_timeout, self.upstream_timeout)?;
        check_duration(keys.session_wait, self.session_wait)?;
        if self.max_sessions_per_identity > MAX_CONNECTIONS {
            return Err(invalid(
                keys.max_sessions_per_identity,
                format!(
                    "must be at most {MAX_CONNECTIONS} (0: no limit), got {}",
                    self.max_sessions_per_identity
                ),
            ));
        }
        if self.messages_per_minute > MAX_MESSAGES_PER_MINUTE {
            return Err(invalid(
                keys.messages_per_minute,
                format!(
                    "must be at most {MAX_MESSAGES_PER_MINUTE} (0: no limit), got {}",
                    self.messages_per_minute
                ),
            ));
        }
        Ok(())
    }
}

/// The dotted keys of one mail section, for error messages.
struct MailKeys {
    listen: &'static str,
    upstream: &'static str,
    scopes: &'static str,
    app_scopes: &'static str,
    tls_cert_file: &'static str,
    implicit_tls: &'static str,
    max_line: &'static str,
    max_connections: &'static str,
    max_connections_per_source: &'static str,
    idle_timeout: &'static str,
    login_timeout: &'static str,
    upstream_timeout: &'static str,
    max_sessions_per_identity: &'static str,
    messages_per_minute: &'static str,
    session_wait: &'static str,
}

/// Upper bound of `messages_per_minute` (its window keeps one instant per
/// message).
const MAX_MESSAGES_PER_MINUTE: u32 = 10_000;

macro_rules! mail_keys {
    ($section:literal) => {
        MailKeys {
            listen: concat!($section, ".listen"),
            upstream: concat!($section, ".upstream"),
            scopes: concat!($section, ".scopes"),
            app_scopes: concat!($section, ".app_scopes"),
            tls_cert_file: concat!($section, ".tls_cert_file"),
            implicit_tls: concat!($section, ".implicit_tls"),
            max_line: concat!($section, ".max_line"),
            max_connections: concat!($section, ".max_connections"),
            max_connections_per_source: concat!($section, ".max_connections_per_source"),
            idle_timeout: concat!($section, ".idle_timeout"),
            login_timeout: concat!($section, ".login_timeout"),
            upstream_timeout: concat!($section, ".upstream_timeout"),
            max_sessions_per_identity: concat!($section, ".max_sessions_per_identity"),
            messages_per_minute: concat!($section, ".messages_per_minute"),
            session_wait: concat!($section, ".session_wait"),
        }
    };
}

/// Bounds of the settings that cost memory, CPU or time: values outside
/// them are mistakes (`0`, or a unit slip such as 100 GiB) that would
/// exhaust the machine, panic a timer, or stop authswap from working.
pub mod limits {
    use std::time::Duration;

    /// argon2id memory cost, KiB: 256 KiB (cheap hashes for tests; the
    /// default is 19 MiB) to 1 GiB.
    pub const ARGON2_MEMORY_KIB: (u32, u32) = (256, 1 << 20);
    /// argon2id iterations.
    pub const ARGON2_ITERATIONS: (u32, u32) = (1, 16);
    /// argon2id lanes (computed one after the other: more only costs time).
    pub const ARGON2_PARALLELISM: (u32, u32) = (1, 16);
    /// Longest mail command line / IMAP login literal.
    pub const MAX_LINE: u64 = 1 << 20;
    /// Largest HTTP request head.
    pub const MAX_HEADER_BYTES: u64 = 1 << 20;
    /// Largest request body buffered for a replay (per request).
    pub const REPLAY_BUFFER_LIMIT: u64 = 256 << 20;
    /// Most concurrent connections per listener.
    pub const MAX_CONNECTIONS: usize = 65_536;
    /// Most refreshes in flight.
    pub const MAX_CONCURRENT_REFRESHES: usize = 100_000;
    /// Longest duration setting.
    pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
}

use limits::{
    ARGON2_ITERATIONS, ARGON2_MEMORY_KIB, ARGON2_PARALLELISM, MAX_CONCURRENT_REFRESHES,
    MAX_CONNECTIONS, MAX_DURATION, MAX_HEADER_BYTES, MAX_LINE, REPLAY_BUFFER_LIMIT,
};

fn check_size(key: &'static str, value: ByteSize, min: u64, max: u64) -> Result<(), ConfigError> {
    if value.0 < min || value.0 > max {
        return Err(invalid(
            key,
            format!(
                "must be between {} and {}, got {value}",
                ByteSize(min),
                ByteSize(max)
            ),
        ));
    }
    Ok(())
}

fn check_count(key: &'static str, value: usize, max: usize) -> Result<(), ConfigError> {
    if value == 0 || value > max {
        return Err(invalid(
            key,
            format!("must be between 1 and {max}, got {value}"),
        ));
    }
    Ok(())
}

fn check_u32(key: &'static str, value: u32, (min, max): (u32, u32)) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(invalid(
            key,
            format!("must be between {min} and {max}, got {value}"),
        ));
    }
    Ok(())
}

/// A duration above zero and at most [`limits::MAX_DURATION`].
fn check_duration(key: &'static str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() || value > MAX_DURATION {
        return Err(invalid(
            key,
            format!(
                "must be above zero and at most 24h, got {}",
                humantime::format_duration(value)
            ),
        ));
    }
    Ok(())
}

fn mail_section<'de, D: Deserializer<'de>>(
    d: D,
    defaults: MailConfig,
) -> Result<MailConfig, D::Error> {
    // Missing keys take the protocol's defaults.
    let mut value = serde_json::to_value(&defaults).map_err(serde::de::Error::custom)?;
    let given = serde_json::Value::deserialize(d)?;
    if let (Some(base), Some(over)) = (value.as_object_mut(), given.as_object()) {
        for (k, v) in over {
            base.insert(k.clone(), v.clone());
        }
    }
    MailConfig::deserialize(value).map_err(serde::de::Error::custom)
}

/// `[store]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// SQLite database file (created with its directory when missing).
    pub path: PathBuf,
    /// File holding the 256-bit sealing key (created 0600 on first start).
    pub key_file: PathBuf,
    /// The sealing key itself (64 hex digits or base64), usually from
    /// `AUTHSWAP_STORE__KEY`; takes precedence over `key_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<Secret>,
    /// Accept a key file that group or others may read (only warn). Off by
    /// default: such a key file is refused.
    pub allow_insecure_key_file: bool,
    /// `postgres://user@host:port/db?sslmode=verify-full`: use this shared
    /// PostgreSQL database instead of the SQLite file at `path` (several
    /// replicas serve the same identities). `sslmode` defaults to `prefer`,
    /// as with libpq; `verify-full` checks the server's certificate and name
    /// against the built-in roots and `[tls] extra_ca_file`. Keep the
    /// password out of it: `password_file` or `AUTHSWAP_STORE__PASSWORD`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The database password, usually from `AUTHSWAP_STORE__PASSWORD`
    /// (used when `url` has none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// File holding the database password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Most connections to PostgreSQL (per process).
    pub pool_size: u32,
    /// How long to wait for a PostgreSQL connection (connecting, TLS and a
    /// free pooled connection included).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// PostgreSQL `statement_timeout` of authswap's connections.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
}

/// Largest `store.pool_size`.
pub const MAX_POOL_SIZE: u32 = 1000;

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("data/authswap.db"),
            key_file: PathBuf::from("data/authswap.key"),
            key: None,
            allow_insecure_key_file: false,
            url: None,
            password: None,
            password_file: None,
            pool_size: 8,
            connect_timeout: Duration::from_secs(10),
            statement_timeout: Duration::from_secs(30),
        }
    }
}

/// `[identity_provider]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdpConfig {
    /// Authority base URL.
    pub authority: String,
    /// Tenant id or domain, `organizations` or `common`.
    pub tenant: String,
    /// Application (client) id of the app registration.
    pub client_id: String,
    /// Client secret for confidential clients (leave unset for public clients).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<Secret>,
    /// File containing the client secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<PathBuf>,
    /// When the client secret expires (`2027-06-30` or RFC 3339), as shown
    /// in Entra ID: warned about 30 days ahead and exported as a metric.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret_expires: Option<String>,
    /// Certificate credential: the certificate (PEM) registered on the app.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate_file: Option<PathBuf>,
    /// The certificate's RSA private key (PEM, PKCS#8 or PKCS#1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_key_file: Option<PathBuf>,
    /// Signature algorithm of client assertions: `PS256` or `RS256`.
    pub assertion_algorithm: AssertionAlgorithm,
    /// Token endpoint; derived from authority and tenant when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_endpoint: Option<String>,
    /// Device authorization endpoint; derived when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_code_endpoint: Option<String>,
    /// Authorization endpoint (browser consent); derived when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorize_endpoint: Option<String>,
    /// Time limit for one request to the identity platform.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Scopes asked for (and consented to) at `identity login`; default:
    /// the scopes of every enabled front end.
    #[serde(
        default,
        deserialize_with = "opt_scopes_de",
        skip_serializing_if = "Option::is_none"
    )]
    pub login_scopes: Option<Vec<String>>,
}

fn opt_scopes_de<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    scopes_de(d).map(Some)
}

impl Default for IdpConfig {
    fn default() -> Self {
        IdpConfig {
            authority: "https://login.microsoftonline.com".into(),
            tenant: "organizations".into(),
            client_id: String::new(),
            client_secret: None,
            client_secret_file: None,
            client_secret_expires: None,
            certificate_file: None,
            private_key_file: None,
            assertion_algorithm: AssertionAlgorithm::default(),
            token_endpoint: None,
            device_code_endpoint: None,
            authorize_endpoint: None,
            timeout: Duration::from_secs(30),
            login_scopes: None,
        }
    }
}

pub use crate::token::assertion::AssertionAlgorithm;

/// How a tenant's app registration proves itself to the identity platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    /// Public client: no credential (delegated identities only).
    None,
    /// A client secret.
    Secret,
    /// A certificate and its private key (client assertion).
    Certificate,
}

impl CredentialKind {
    /// Display form.
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::None => "none",
            CredentialKind::Secret => "client secret",
            CredentialKind::Certificate => "certificate",
        }
    }
}

impl IdpConfig {
    /// Which credential is configured.
    pub fn credential_kind(&self) -> CredentialKind {
        if self.certificate_file.is_some() {
            CredentialKind::Certificate
        } else if self.client_secret.is_some() {
            CredentialKind::Secret
        } else {
            CredentialKind::None
        }
    }

    /// The configured expiry of the client secret (validated at load).
    pub fn secret_expiry(&self) -> Option<std::time::SystemTime> {
        self.client_secret_expires
            .as_deref()
            .and_then(|s| parse_expiry(s).ok())
    }

    /// Reads the `*_file` secret of section `section`.
    fn resolve_files(&mut self, section: &str) -> Result<(), ConfigError> {
        if let Some(file) = &self.client_secret_file {
            if self.client_secret.is_some() {
                return Err(invalid(
                    format!("{section}.client_secret_file"),
                    "set either client_secret or client_secret_file, not both",
                ));
            }
            let text = std::fs::read_to_string(file).map_err(|source| ConfigError::File {
                key: format!("{section}.client_secret_file").into(),
                path: file.clone(),
                source,
            })?;
            self.client_secret = Some(Secret::new(text.trim().to_owned()));
        }
        if self.client_secret.as_ref().is_some_and(Secret::is_empty) {
            self.client_secret = None;
        }
        Ok(())
    }

    /// Checks the section `section` (`identity_provider` or `tenants.NAME`).
    fn validate(&self, section: &str) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{section}.{k}");
        check_url(key("authority"), &self.authority)?;
        if self.tenant.trim().is_empty() || self.tenant.contains('/') {
            return Err(invalid(
                key("tenant"),
                "must be a tenant id, a domain, `organizations` or `common`",
            ));
        }
        check_url(key("token_endpoint"), &self.token_url())?;
        check_url(key("device_code_endpoint"), &self.device_code_url())?;
        check_url(key("authorize_endpoint"), &self.authorize_url())?;
        if self.timeout.is_zero() || self.timeout > MAX_DURATION {
            return Err(invalid(
                key("timeout"),
                "must be above zero and at most 24h",
            ));
        }
        if self.certificate_file.is_some() != self.private_key_file.is_some() {
            return Err(invalid(
                key("certificate_file"),
                "certificate_file and private_key_file must be set together",
            ));
        }
        if self.certificate_file.is_some() && self.client_secret.is_some() {
            return Err(invalid(
                key("certificate_file"),
                "configure one credential: a client secret or a certificate, not both",
            ));
        }
        if let Some(text) = &self.client_secret_expires {
            if let Err(e) = parse_expiry(text) {
                return Err(invalid(key("client_secret_expires"), e));
            }
        }
        Ok(())
    }

    fn derived(&self, explicit: &Option<String>, leaf: &str) -> String {
        match explicit {
            Some(url) => url.clone(),
            None => format!(
                "{}/{}/oauth2/v2.0/{leaf}",
                self.authority.trim_end_matches('/'),
                self.tenant
            ),
        }
    }

    /// Effective token endpoint.
    pub fn token_url(&self) -> String {
        self.derived(&self.token_endpoint, "token")
    }

    /// Effective device authorization endpoint.
    pub fn device_code_url(&self) -> String {
        self.derived(&self.device_code_endpoint, "devicecode")
    }

    /// Effective authorization endpoint.
    pub fn authorize_url(&self) -> String {
        self.derived(&self.authorize_endpoint, "authorize")
    }
}

/// `[tls]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with extra root certificates trusted for upstream and
    /// identity-platform connections (in addition to the built-in roots).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra_ca_file: Option<PathBuf>,
}

/// `[http]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Serve the HTTP front end at all.
    pub enabled: bool,
    /// Local listen address.
    pub listen: String,
    /// Upstream base URL (scheme, host, optional port).
    pub upstream: String,
    /// Scopes requested for HTTP upstream tokens.
    #[serde(deserialize_with = "scopes_de")]
    pub scopes: Vec<String>,
    /// Scopes of app-only identities' tokens (client-credentials grant).
    #[serde(deserialize_with = "scopes_de")]
    pub app_scopes: Vec<String>,
    /// With an app-only token, act as the identity's mailbox the way EWS
    /// requires: `X-AnchorMailbox` and an `ExchangeImpersonation` SOAP
    /// header (inserted when absent). Turn off for other HTTP APIs.
    pub ews_impersonation: bool,
    /// Request bodies up to this size are buffered so they can be replayed
    /// after a token refresh; larger ones stream without replay.
    pub replay_buffer_limit: ByteSize,
    /// Largest accepted request head (request line plus headers).
    pub max_header_bytes: ByteSize,
    /// Largest accepted request body (0 = unlimited).
    pub max_body_bytes: ByteSize,
    /// Concurrent client connections; when full, the oldest connection that
    /// has not proved credentials makes room (else new ones wait).
    pub max_connections: usize,
    /// Concurrent client connections from one non-loopback address.
    pub max_connections_per_source: usize,
    /// A connection must prove credentials this long after connecting.
    #[serde(with = "humantime_serde")]
    pub login_timeout: Duration,
    /// A client must send its request head within this time.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Upstream must answer (response head) within this time.
    #[serde(with = "humantime_serde")]
    pub upstream_timeout: Duration,
    /// Longest pause in a response body being relayed, in either direction
    /// (the upstream sending it, the client reading it).
    #[serde(with = "humantime_serde")]
    pub body_idle_timeout: Duration,
    /// Slowest request body accepted while authswap buffers it, in bytes
    /// per second: the body must be complete within `header_read_timeout`
    /// plus one second per `min_body_rate` bytes received.
    pub min_body_rate: ByteSize,
    /// Request-body bytes buffered for replay across all connections at
    /// once; past it, bodies stream without replay.
    pub replay_buffer_total: ByteSize,
    /// Serve plain HTTP/1.1 requests with authswap's own relay (the fast
    /// path); `false` sends every connection through hyper.
    pub native_http1: bool,
    /// Certificate chain (PEM) to serve HTTPS locally instead of plain HTTP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// Private key (PEM) for `tls_cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// Path that `identity validate` GETs upstream to prove a token
    /// (success: 2xx). Unset, or the EWS path: an EWS `GetFolder` of the
    /// inbox is POSTed to `/EWS/Exchange.asmx` instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_path: Option<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            listen: "127.0.0.1:8080".into(),
            upstream: "https://outlook.office365.com".into(),
            scopes: vec![EWS_SCOPE.into(), OFFLINE_ACCESS.into()],
            app_scopes: default_app_scopes(),
            ews_impersonation: true,
            replay_buffer_limit: ByteSize(8 * 1024 * 1024),
            max_header_bytes: ByteSize(64 * 1024),
            max_body_bytes: ByteSize(0),
            max_connections: 1024,
            max_connections_per_source: 256,
            login_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            upstream_timeout: Duration::from_secs(300),
            body_idle_timeout: Duration::from_secs(60),
            min_body_rate: ByteSize(1024),
            replay_buffer_total: ByteSize(64 * 1024 * 1024),
            native_http1: true,
            tls_cert_file: None,
            tls_key_file: None,
            probe_path: None,
        }
    }
}

/// `[admin]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Admin listen address (metrics, health, console, API).
    pub listen: String,
    /// File holding the admin credential (API bearer token, console
    /// sign-in); generated 0600 on first start when missing.
    pub token_file: PathBuf,
    /// The admin credential itself, usually from `AUTHSWAP_ADMIN__TOKEN`;
    /// takes precedence over `token_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// How long a console sign-in lasts.
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    /// Serve the admin listener over HTTPS (session cookies are then `Secure`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// Private key for `tls_cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9090".into(),
            token_file: PathBuf::from("data/admin.token"),
            token: None,
            session_ttl: Duration::from_secs(12 * 3600),
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

/// `[onboarding]`: invitations and the public listener where invited users
/// sign in with Microsoft (authorization code + PKCE) or a device code.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OnboardingConfig {
    /// Serve the onboarding listener.
    pub enabled: bool,
    /// Listen address of the onboarding pages and the OAuth callback.
    pub listen: String,
    /// Base URL users' browsers reach (a reverse proxy's HTTPS address);
    /// used in invitation links and the redirect URI. Default: derived
    /// from `listen` (`http://127.0.0.1:8081`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// Organisation named on the pages and in invitation e-mails.
    pub organization: String,
    /// How long an invitation stays valid.
    #[serde(with = "humantime_serde")]
    pub invitation_ttl: Duration,
    /// How long a started browser sign-in may take (the `state` lifetime).
    #[serde(with = "humantime_serde")]
    pub signin_ttl: Duration,
    /// Accounts accepted for a mailbox besides the mailbox itself
    /// (aliases), keyed by mailbox; compared case-insensitively.
    pub aliases: std::collections::BTreeMap<String, Vec<String>>,
    /// Serve HTTPS directly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// Private key for `tls_cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
}

impl Default for OnboardingConfig {
    fn default() -> Self {
        OnboardingConfig {
            enabled: true,
            listen: "127.0.0.1:8081".into(),
            public_url: None,
            organization: "Your organisation".into(),
            invitation_ttl: Duration::from_secs(7 * 24 * 3600),
            signin_ttl: Duration::from_secs(15 * 60),
            aliases: Default::default(),
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl OnboardingConfig {
    /// The base URL of the onboarding pages, without a trailing slash.
    pub fn base_url(&self) -> String {
        match &self.public_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => {
                let scheme = if self.tls_cert_file.is_some() {
                    "https"
                } else {
                    "http"
                };
                // An address that accepts every interface is not one a
                // browser can open: name loopback (as `serve` does).
                let listen = match self.listen.parse::<SocketAddr>() {
                    Ok(a) if a.ip().is_unspecified() => {
                        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), a.port()).to_string()
                    }
                    _ => self.listen.clone(),
                };
                format!("{scheme}://{listen}")
            }
        }
    }

    /// The redirect URI registered in Entra ID.
    pub fn redirect_uri(&self) -> String {
        format!("{}/callback", self.base_url())
    }

    /// Whether `account` (the signed-in UPN) may link `mailbox`.
    pub fn accepts(&self, mailbox: &str, account: &str) -> bool {
        let account = account.trim();
        if account.eq_ignore_ascii_case(mailbox.trim()) {
            return true;
        }
        self.aliases
            .iter()
            .filter(|(m, _)| m.trim().eq_ignore_ascii_case(mailbox.trim()))
            .flat_map(|(_, list)| list)
            .any(|a| a.trim().eq_ignore_ascii_case(account))
    }
}

/// `[notifications]`: what happens when an identity needs re-authentication
/// or its refresh token nears Microsoft's 90-day inactivity limit.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotificationsConfig {
    /// At most one notification per identity this often.
    #[serde(with = "humantime_serde")]
    pub min_interval: Duration,
    /// Warn when a refresh token has not been used for this long
    /// (Microsoft revokes it after 90 days of inactivity).
    #[serde(with = "humantime_serde")]
    pub inactivity_warning: Duration,
    /// Webhook receiving a JSON POST per notification.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// HMAC-SHA256 key for the `X-Authswap-Signature` header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<Secret>,
    /// File holding `webhook_secret`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_secret_file: Option<PathBuf>,
    /// E-mail the user (and `admin_email`) a fresh invitation.
    pub email: bool,
    /// Identity whose mailbox sends the e-mails (through the SMTP upstream).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email_sender: Option<String>,
    /// Copy every notification e-mail to this address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_email: Option<String>,
    /// First retry delay after a failed delivery (doubling).
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    /// Longest retry delay.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Attempts per notification before giving up until the next interval.
    pub max_attempts: u32,
    /// How often the notifier looks for identities needing a message.
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
}

impl Default for NotificationsConfig {
    fn default() -> Self {
        NotificationsConfig {
            min_interval: Duration::from_secs(24 * 3600),
            inactivity_warning: Duration::from_secs(80 * 24 * 3600),
            webhook_url: None,
            webhook_secret: None,
            webhook_secret_file: None,
            email: false,
            email_sender: None,
            admin_email: None,
            retry_min: Duration::from_secs(5),
            retry_max: Duration::from_secs(300),
            max_attempts: 5,
            check_interval: Duration::from_secs(60),
        }
    }
}

/// `[auth]`: local password checks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// How long a verified (name, password) pair is trusted without argon2.
    #[serde(with = "humantime_serde")]
    pub credential_cache_ttl: Duration,
    /// Failed attempts (per identity and per source address) before backoff.
    pub max_failures: u32,
    /// First lockout after `max_failures`; doubles with each further failure.
    #[serde(with = "humantime_serde")]
    pub lockout: Duration,
    /// Longest lockout.
    #[serde(with = "humantime_serde")]
    pub max_lockout: Duration,
    /// argon2id memory cost in KiB for new password hashes.
    pub argon2_memory_kib: u32,
    /// argon2id iterations for new password hashes.
    pub argon2_iterations: u32,
    /// argon2id lanes for new password hashes.
    pub argon2_parallelism: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            credential_cache_ttl: Duration::from_secs(300),
            max_failures: 10,
            lockout: Duration::from_secs(1),
            max_lockout: Duration::from_secs(30),
            // OWASP's argon2id recommendation (19 MiB, 2 iterations, 1 lane).
            argon2_memory_kib: 19 * 1024,
            argon2_iterations: 2,
            argon2_parallelism: 1,
        }
    }
}

/// `[tokens]`: token engine tuning.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenConfig {
    /// Refresh this long before an access token expires.
    #[serde(with = "humantime_serde")]
    pub refresh_ahead: Duration,
    /// First retry delay after a transient identity-platform failure.
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    /// Longest retry delay after repeated transient failures.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// First backoff after the upstream refused a freshly issued token
    /// (doubling with each consecutive refusal).
    #[serde(with = "humantime_serde")]
    pub refused_backoff_min: Duration,
    /// Longest backoff after consecutive refusals of fresh tokens.
    #[serde(with = "humantime_serde")]
    pub refused_backoff_max: Duration,
    /// How often `serve` looks for identity changes made by the CLI.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// Refreshes in flight against the identity platform at once (across
    /// identities); more wait their turn.
    pub max_concurrent_refreshes: usize,
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            refresh_ahead: Duration::from_secs(300),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            refused_backoff_min: Duration::from_secs(2),
            refused_backoff_max: Duration::from_secs(300),
            reload_interval: Duration::from_secs(1),
            max_concurrent_refreshes: 64,
        }
    }
}

/// A size in bytes; accepts `8388608`, `"8MiB"`, `"64 KiB"`, `"10MB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The size as `usize`.
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a size such as 8MiB or 65536"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            other => {
                return Err(format!(
                    "unknown size unit `{other}` (use B, KiB, MiB, GiB)"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("`{s}` is too large"))
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0;
        if n != 0 && n.is_multiple_of(1 << 20) {
            write!(f, "{}MiB", n >> 20)
        } else if n != 0 && n.is_multiple_of(1 << 10) {
            write!(f, "{}KiB", n >> 10)
        } else {
            write!(f, "{n}")
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Scopes as a TOML list or one space-separated string (handy in env vars).
fn scopes_de<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<String>),
        One(String),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::List(v) => v,
        Raw::One(s) => s.split_whitespace().map(str::to_owned).collect(),
    })
}

impl Config {
    /// Loads defaults < `path` < environment, reads `*_file` secrets and validates.
    ///
    /// A missing file is an error unless it is the default path, in which
    /// case the built-in defaults are used.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        // Only AUTHSWAP_SECTION__KEY variables are configuration; others
        // (AUTHSWAP_LOG, ...) are left alone.
        let env = Env::prefixed("AUTHSWAP_")
            .filter(|k| k.as_str().contains("__"))
            .split("__");
        Self::finish(Self::file_layer(path)?.merge(env))
    }

    fn file_layer(path: &Path) -> Result<Figment, ConfigError> {
        if path.exists() {
            Ok(Figment::new().merge(Toml::file_exact(path)))
        } else if path == Path::new(DEFAULT_CONFIG_PATH) {
            Ok(Figment::new())
        } else {
            Err(ConfigError::NotFound(path.to_owned()))
        }
    }

    fn finish(figment: Figment) -> Result<Config, ConfigError> {
        let mut config: Config = figment.extract().map_err(Box::new)?;
        // Secrets belong in files or the environment: note the ones the
        // TOML file itself holds, for `config check` to warn about.
        let mut keys: Vec<String> = vec![
            "identity_provider.client_secret".into(),
            "admin.token".into(),
            "notifications.webhook_secret".into(),
            "store.password".into(),
        ];
        keys.extend(
            config
                .tenants
                .keys()
                .map(|name| format!("tenants.{name}.client_secret")),
        );
        config.secrets_in_file = keys
            .into_iter()
            .filter(|k| {
                figment.find_value(k).is_ok()
                    && figment
                        .find_metadata(k)
                        .is_some_and(|m| matches!(m.source, Some(figment::Source::File(_))))
            })
            .collect();
        config.resolve_files()?;
        config.validate()?;
        Ok(config)
    }

    fn resolve_files(&mut self) -> Result<(), ConfigError> {
        if let Some(default) = self.tenants.remove(crate::store::DEFAULT_TENANT) {
            if !self.identity_provider.client_id.trim().is_empty() {
                return Err(invalid(
                    "tenants.default",
                    "the default tenant is [identity_provider]: configure it there or in [tenants.default], not both",
                ));
            }
            self.identity_provider = default;
        }
        self.identity_provider.resolve_files("identity_provider")?;
        for (name, tenant) in &mut self.tenants {
            tenant.resolve_files(&format!("tenants.{name}"))?;
        }
        let n = &mut self.notifications;
        if let Some(file) = &n.webhook_secret_file {
            if n.webhook_secret.is_some() {
                return Err(invalid(
                    "notifications.webhook_secret_file",
                    "set either webhook_secret or webhook_secret_file, not both",
                ));
            }
            let text = std::fs::read_to_string(file).map_err(|source| ConfigError::File {
                key: "notifications.webhook_secret_file".into(),
                path: file.clone(),
                source,
            })?;
            n.webhook_secret = Some(Secret::new(text.trim().to_owned()));
        }
        if n.webhook_secret.as_ref().is_some_and(Secret::is_empty) {
            n.webhook_secret = None;
        }
        if self.admin.token.as_ref().is_some_and(Secret::is_empty) {
            self.admin.token = None;
        }
        let st = &mut self.store;
        if let Some(file) = &st.password_file {
            if st.password.is_some() {
                return Err(invalid(
                    "store.password_file",
                    "set either password or password_file, not both",
                ));
            }
            let text = std::fs::read_to_string(file).map_err(|source| ConfigError::File {
                key: "store.password_file".into(),
                path: file.clone(),
                source,
            })?;
            // A trailing newline is not part of the password.
            st.password = Some(Secret::new(text.trim_end_matches(['\r', '\n']).to_owned()));
        }
        if st.password.as_ref().is_some_and(Secret::is_empty) {
            st.password = None;
        }
        if st.url.as_deref().is_some_and(|u| u.trim().is_empty()) {
            st.url = None;
        }
        Ok(())
    }

    /// Checks every value that figment cannot check by type.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.runtime.worker_threads > 1024 {
            return Err(invalid(
                "runtime.worker_threads",
                "must be between 0 (one per CPU) and 1024",
            ));
        }
        parse_listen("admin.listen", &self.admin.listen)?;
        self.validate_admin_side()?;
        self.validate_store()?;
        if self.http.enabled {
            parse_listen("http.listen", &self.http.listen)?;
        }
        check_url("http.upstream", &self.http.upstream)?;
        if self.http.scopes.is_empty() {
            return Err(invalid("http.scopes", "at least one scope is required"));
        }
        check_app_scopes("http.app_scopes", &self.http.app_scopes)?;
        if self.http.tls_cert_file.is_some() != self.http.tls_key_file.is_some() {
            return Err(invalid(
                "http.tls_cert_file",
                "tls_cert_file and tls_key_file must be set together",
            ));
        }
        check_size(
            "http.max_header_bytes",
            self.http.max_header_bytes,
            1024,
            MAX_HEADER_BYTES,
        )?;
        check_size(
            "http.replay_buffer_limit",
            self.http.replay_buffer_limit,
            0,
            REPLAY_BUFFER_LIMIT,
        )?;
        check_count(
            "http.max_connections",
            self.http.max_connections,
            MAX_CONNECTIONS,
        )?;
        check_count(
            "http.max_connections_per_source",
            self.http.max_connections_per_source,
            MAX_CONNECTIONS,
        )?;
        check_duration("http.login_timeout", self.http.login_timeout)?;
        check_duration("http.header_read_timeout", self.http.header_read_timeout)?;
        check_duration("http.upstream_timeout", self.http.upstream_timeout)?;
        if let Some(p) = &self.http.probe_path {
            if !p.starts_with('/') || p.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(invalid(
                    "http.probe_path",
                    "must be an absolute path such as /api/ping, without spaces",
                ));
            }
        }
        check_size(
            "http.replay_buffer_total",
            self.http.replay_buffer_total,
            0,
            16 << 30,
        )?;
        check_duration("http.body_idle_timeout", self.http.body_idle_timeout)?;
        if self.http.min_body_rate.0 == 0 {
            return Err(invalid(
                "http.min_body_rate",
                "must be at least 1 byte per second",
            ));
        }
        self.identity_provider.validate("identity_provider")?;
        for (name, tenant) in &self.tenants {
            if !valid_tenant_name(name) {
                return Err(invalid(
                    format!("tenants.{name}"),
                    "a tenant name is 1 to 64 lowercase letters, digits, `-` or `_`, starting with a letter or digit",
                ));
            }
            tenant.validate(&format!("tenants.{name}"))?;
        }
        if self.tokens.retry_min.is_zero() || self.tokens.retry_max < self.tokens.retry_min {
            return Err(invalid(
                "tokens.retry_max",
                "retry_min must be above zero and retry_max at least retry_min",
            ));
        }
        check_duration(
            "tokens.refused_backoff_max",
            self.tokens.refused_backoff_max,
        )?;
        if self.tokens.refused_backoff_min.is_zero()
            || self.tokens.refused_backoff_max < self.tokens.refused_backoff_min
        {
            return Err(invalid(
                "tokens.refused_backoff_max",
                "refused_backoff_min must be above zero and refused_backoff_max at least refused_backoff_min",
            ));
        }
        check_duration("tokens.retry_max", self.tokens.retry_max)?;
        check_duration("tokens.reload_interval", self.tokens.reload_interval)?;
        if self.tokens.refresh_ahead > MAX_DURATION {
            return Err(invalid("tokens.refresh_ahead", "must be at most 24h"));
        }
        self.smtp.validate(&mail_keys!("smtp"))?;
        self.imap.validate(&mail_keys!("imap"))?;
        self.pop3.validate(&mail_keys!("pop3"))?;
        check_count(
            "tokens.max_concurrent_refreshes",
            self.tokens.max_concurrent_refreshes,
            MAX_CONCURRENT_REFRESHES,
        )?;
        if self.auth.max_failures == 0 {
            return Err(invalid("auth.max_failures", "must be at least 1"));
        }
        if self.auth.credential_cache_ttl > MAX_DURATION {
            return Err(invalid("auth.credential_cache_ttl", "must be at most 24h"));
        }
        check_u32(
            "auth.argon2_memory_kib",
            self.auth.argon2_memory_kib,
            ARGON2_MEMORY_KIB,
        )?;
        check_u32(
            "auth.argon2_iterations",
            self.auth.argon2_iterations,
            ARGON2_ITERATIONS,
        )?;
        check_u32(
            "auth.argon2_parallelism",
            self.auth.argon2_parallelism,
            ARGON2_PARALLELISM,
        )?;
        argon2::Params::new(
            self.auth.argon2_memory_kib,
            self.auth.argon2_iterations,
            self.auth.argon2_parallelism,
            None,
        )
        .map_err(|e| {
            invalid(
                "auth.argon2_memory_kib",
                format!("invalid argon2 parameters: {e}"),
            )
        })?;
        Ok(())
    }

    /// `[admin]`, `[onboarding]` and `[notifications]`.
    fn validate_admin_side(&self) -> Result<(), ConfigError> {
        let (a, o, n) = (&self.admin, &self.onboarding, &self.notifications);
        if a.tls_cert_file.is_some() != a.tls_key_file.is_some() {
            return Err(invalid(
                "admin.tls_cert_file",
                "tls_cert_file and tls_key_file must be set together",
            ));
        }
        check_duration("admin.session_ttl", a.session_ttl)?;
        if o.enabled {
            parse_listen("onboarding.listen", &o.listen)?;
        }
        if o.tls_cert_file.is_some() != o.tls_key_file.is_some() {
            return Err(invalid(
                "onboarding.tls_cert_file",
                "tls_cert_file and tls_key_file must be set together",
            ));
        }
        if let Some(url) = &o.public_url {
            let parsed = check_url("onboarding.public_url", url)?;
            if parsed.query().is_some() || parsed.fragment().is_some() {
                return Err(invalid(
                    "onboarding.public_url",
                    "must be a base URL without query or fragment",
                ));
            }
        }
        if o.invitation_ttl.is_zero() || o.invitation_ttl > Duration::from_secs(90 * 24 * 3600) {
            return Err(invalid(
                "onboarding.invitation_ttl",
                "must be above zero and at most 90 days",
            ));
        }
        check_duration("onboarding.signin_ttl", o.signin_ttl)?;
        if o.organization.trim().is_empty() || o.organization.len() > 200 {
            return Err(invalid(
                "onboarding.organization",
                "must be 1 to 200 characters",
            ));
        }
        if n.min_interval.is_zero() {
            return Err(invalid("notifications.min_interval", "must be above zero"));
        }
        if n.inactivity_warning.is_zero()
            || n.inactivity_warning >= Duration::from_secs(90 * 24 * 3600)
        {
            return Err(invalid(
                "notifications.inactivity_warning",
                "must be above zero and below Microsoft's 90-day limit",
            ));
        }
        if let Some(url) = &n.webhook_url {
            check_url("notifications.webhook_url", url)?;
        }
        if n.email
            && n.email_sender
                .as_deref()
                .is_none_or(|s| s.trim().is_empty())
        {
            return Err(invalid(
                "notifications.email_sender",
                "e-mail notifications need the identity whose mailbox sends them",
            ));
        }
        if n.retry_min.is_zero() || n.retry_max < n.retry_min {
            return Err(invalid(
                "notifications.retry_max",
                "retry_min must be above zero and retry_max at least retry_min",
            ));
        }
        check_duration("notifications.check_interval", n.check_interval)?;
        if n.max_attempts == 0 || n.max_attempts > 100 {
            return Err(invalid(
                "notifications.max_attempts",
                "must be between 1 and 100",
            ));
        }
        Ok(())
    }

    /// Scopes requested by `identity login`: `identity_provider.login_scopes`,
    /// or the union of the enabled front ends' scopes (with `offline_access`).
    pub fn login_scopes(&self) -> Vec<String> {
        let mut scopes: Vec<String> = match &self.identity_provider.login_scopes {
            Some(s) => s.clone(),
            None => {
                let mut all = Vec::new();
                if self.http.enabled {
                    all.extend(self.http.scopes.iter().cloned());
                }
                for mail in [&self.smtp, &self.imap, &self.pop3] {
                    if mail.enabled {
                        all.extend(mail.scopes.iter().cloned());
                    }
                }
                all
            }
        };
        if !scopes.iter().any(|s| s == OFFLINE_ACCESS) {
            scopes.push(OFFLINE_ACCESS.into());
        }
        let mut seen = std::collections::HashSet::new();
        scopes.retain(|s| seen.insert(s.clone()));
        scopes
    }

    /// Checks `[store]`: a PostgreSQL URL that sqlx can use, a pool size and
    /// timeouts in range. Messages never quote a password.
    fn validate_store(&self) -> Result<(), ConfigError> {
        let st = &self.store;
        if st.pool_size == 0 || st.pool_size > MAX_POOL_SIZE {
            return Err(invalid(
                "store.pool_size",
                format!("must be between 1 and {MAX_POOL_SIZE}"),
            ));
        }
        for (key, value) in [
            ("store.connect_timeout", st.connect_timeout),
            ("store.statement_timeout", st.statement_timeout),
        ] {
            if value < Duration::from_secs(1) || value > Duration::from_secs(3600) {
                return Err(invalid(
                    key,
                    format!(
                        "{} is out of range: use 1s to 1h",
                        humantime::format_duration(value)
                    ),
                ));
            }
        }
        let Some(value) = st.url.as_deref() else {
            if st.password.is_some() || st.password_file.is_some() {
                return Err(invalid(
                    "store.password",
                    "a database password needs store.url (postgres://...); the SQLite store has none",
                ));
            }
            return Ok(());
        };
        let shown = redact_userinfo(value);
        let url = Url::parse(value.trim()).map_err(|e| {
            invalid(
                "store.url",
                format!("`{shown}` is not a URL such as postgres://authswap@db.example:5432/authswap: {e}"),
            )
        })?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(invalid(
                "store.url",
                format!(
                    "`{shown}`: only postgres:// URLs are supported (leave it unset for the \
                     SQLite file at store.path)"
                ),
            ));
        }
        if url.password().is_some() && st.password.is_some() {
            return Err(invalid(
                "store.url",
                "the URL holds a password and store.password (or password_file) is set too: \
                 keep only one, preferably password_file",
            ));
        }
        for (k, v) in url.query_pairs() {
            if k == "sslmode"
                && !matches!(
                    v.as_ref(),
                    "disable" | "allow" | "prefer" | "require" | "verify-ca" | "verify-full"
                )
            {
                return Err(invalid(
                    "store.url",
                    format!(
                        "sslmode={v} is not one of disable, allow, prefer, require, verify-ca, \
                         verify-full"
                    ),
                ));
            }
        }
        if let Err(e) = value.trim().parse::<sqlx::postgres::PgConnectOptions>() {
            return Err(invalid(
                "store.url",
                format!("`{shown}`: {}", redact_userinfo(&e.to_string())),
            ));
        }
        Ok(())
    }

    /// Why authswap cannot do its job with this configuration although
    /// `serve` runs (`/readyz` answers 503 with these): a tenant without an
    /// app registration.
    pub fn unready(&self) -> Vec<String> {
        self.tenant_configs()
            .into_iter()
            .filter(|(_, _, idp)| idp.client_id.trim().is_empty())
            .map(|(_, section, _)| {
                format!(
                    "no app registration: {section}.client_id is empty, so no identity can \
                     sign in or refresh tokens; register an app in Entra ID and set it"
                )
            })
            .collect()
    }

    /// What is still missing for authswap to do its job, or set weaker
    /// than it should be; `serve` logs these and keeps running (health and
    /// metrics work without them).
    pub fn missing(&self) -> Vec<String> {
        let mut out = Vec::new();
        let a = &self.auth;
        // OWASP's argon2id settings trade memory for iterations from
        // 46 MiB x 1 to 7 MiB x 5; all spend about 35 MiB-passes.
        if a.argon2_memory_kib < 7168
            || u64::from(a.argon2_memory_kib) * u64::from(a.argon2_iterations) < 35_840
        {
            out.push(format!(
                "auth.argon2_memory_kib = {} with argon2_iterations = {} is below OWASP's \
                 minimum for argon2id (19456 KiB with 2 iterations, or 7168 KiB with 5): new \
                 local password hashes are cheap to guess",
                a.argon2_memory_kib, a.argon2_iterations
            ));
        }
        if self.identity_provider.client_id.trim().is_empty() {
            out.push(
                "identity_provider.client_id is empty: register an app in Entra ID and set it, \
                 or identities cannot log in or refresh tokens"
                    .to_owned(),
            );
        }
        for key in &self.secrets_in_file {
            let env = format!("AUTHSWAP_{}", key.replace('.', "__").to_uppercase());
            out.push(format!(
                "{key} is written in the configuration file: keep secrets out of it, in \
                 {key}_file (mode 0600) or the environment variable {env}"
            ));
        }
        if let Some(url) = self.store.url.as_deref() {
            if Url::parse(url.trim()).is_ok_and(|u| u.password().is_some()) {
                out.push(
                    "store.url holds the database password: keep it out of the URL, in \
                     store.password_file (mode 0600) or the environment variable \
                     AUTHSWAP_STORE__PASSWORD"
                        .to_owned(),
                );
            }
        }
        let now = std::time::SystemTime::now();
        for (name, section, idp) in self.tenant_configs() {
            if idp.credential_kind() != CredentialKind::None
                && matches!(
                    idp.tenant.as_str(),
                    "organizations" | "common" | "consumers"
                )
            {
                out.push(format!(
                    "{section}.tenant = {}: app-only identities of tenant `{name}` need the \
                     tenant's id or domain (the client-credentials grant has no `organizations`)",
                    idp.tenant
                ));
            }
            if let Some(at) = idp.secret_expiry() {
                if let Some(w) = expiry_warning(&section, "client secret", at, now) {
                    out.push(w);
                }
            }
        }
        out
    }

    /// Every tenant: (name, config section, settings), `default` first.
    pub fn tenant_configs(&self) -> Vec<(&str, String, &IdpConfig)> {
        let mut out = vec![(
            crate::store::DEFAULT_TENANT,
            "identity_provider".to_owned(),
            &self.identity_provider,
        )];
        out.extend(
            self.tenants
                .iter()
                .map(|(name, idp)| (name.as_str(), format!("tenants.{name}"), idp)),
        );
        out
    }

    /// Whether an identity of `mode` may belong to tenant `tenant`: the
    /// tenant is configured, and app-only identities need its credential.
    pub fn check_identity_tenant(
        &self,
        tenant: &str,
        mode: crate::store::Mode,
    ) -> Result<(), String> {
        let Some(idp) = self.tenant(tenant) else {
            let known: Vec<&str> = self.tenant_configs().iter().map(|t| t.0).collect();
            return Err(format!(
                "no tenant named `{tenant}` is configured (known: {}); add a [tenants.{tenant}] section",
                known.join(", ")
            ));
        };
        if mode == crate::store::Mode::App && idp.credential_kind() == CredentialKind::None {
            return Err(format!(
                "tenant `{tenant}` has no client secret or certificate: app-only identities need one \
                 (client_secret_file, or certificate_file and private_key_file)"
            ));
        }
        Ok(())
    }

    /// The settings of tenant `name` (`default` is `[identity_provider]`).
    pub fn tenant(&self, name: &str) -> Option<&IdpConfig> {
        if name == crate::store::DEFAULT_TENANT {
            Some(&self.identity_provider)
        } else {
            self.tenants.get(name)
        }
    }

    /// The effective configuration as TOML, secrets redacted, derived
    /// endpoints filled in.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        let redact = |url: &str| redact_userinfo(url).into_owned();
        for idp in std::iter::once(&mut shown.identity_provider).chain(shown.tenants.values_mut()) {
            idp.token_endpoint = Some(redact(&idp.token_url()));
            idp.device_code_endpoint = Some(redact(&idp.device_code_url()));
            idp.authorize_endpoint = Some(redact(&idp.authorize_url()));
            idp.authority = redact(&idp.authority);
        }
        shown.http.upstream = redact(&shown.http.upstream);
        if let Some(url) = &mut shown.store.url {
            *url = redact(url);
        }
        if let Some(url) = &mut shown.notifications.webhook_url {
            *url = redact(url);
        }
        if let Some(url) = &mut shown.onboarding.public_url {
            *url = redact(url);
        }
        for mail in [&mut shown.smtp, &mut shown.imap, &mut shown.pop3] {
            mail.upstream = redact_host_port(&mail.upstream).into_owned();
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// What replaces the user name and password of a URL when it is shown.
pub const REDACTED_USERINFO: &str = "<redacted>";

/// `text` with the userinfo of every URL in it (`scheme://user:password@`)
/// replaced by `<redacted>`: for printing or logging configuration values,
/// and errors that quote them. Works on text that is not a valid URL too,
/// and errs on the side of hiding: everything between `://` and the last
/// `@` before the next space, quote or backtick goes.
pub fn redact_userinfo(text: &str) -> std::borrow::Cow<'_, str> {
    if !(text.contains("://") && text.contains('@')) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let start = i + 3;
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        let end = after
            .find(|c: char| c.is_whitespace() || matches!(c, '`' | '"' | '\'' | '<' | '>'))
            .unwrap_or(after.len());
        match after[..end].rfind('@') {
            Some(at) => {
                out.push_str(REDACTED_USERINFO);
                out.push_str(&after[at..end]);
            }
            None => out.push_str(&after[..end]),
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    std::borrow::Cow::Owned(out)
}

/// A mail `host:port` value with anything up to its last `@` (a user name
/// and password, which such a value must not hold) replaced by `<redacted>`.
fn redact_host_port(value: &str) -> std::borrow::Cow<'_, str> {
    match value.rfind('@') {
        Some(at) => format!("{REDACTED_USERINFO}{}", &value[at..]).into(),
        None => value.into(),
    }
}

/// Parses a listen address (`127.0.0.1:8080`, `[::1]:8080`).
pub fn parse_listen(key: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        invalid(
            key,
            format!("`{value}` is not an address such as 127.0.0.1:8080"),
        )
    })
}

/// True when `host` names this machine's loopback interface.
pub fn is_loopback_host(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => IpAddr::V4(*ip).is_loopback(),
        url::Host::Ipv6(ip) => IpAddr::V6(*ip).is_loopback(),
    }
}

/// Accepts `https://` URLs, and `http://` only to a loopback host.
pub fn check_url(key: impl Into<Cow<'static, str>>, value: &str) -> Result<Url, ConfigError> {
    let key: Cow<'static, str> = key.into();
    let invalid = |k: &Cow<'static, str>, m: String| invalid(k.clone(), m);
    let key = &key;
    let shown = redact_userinfo(value);
    let url =
        Url::parse(value).map_err(|e| invalid(key, format!("`{shown}` is not a URL: {e}")))?;
    let host = url
        .host()
        .ok_or_else(|| invalid(key, format!("`{shown}` has no host")))?;
    if !url.username().is_empty() || url.password().is_some() {
        // Never used (authswap authenticates with tokens and the client
        // secret), and the HTTP client would carry them into its log lines
        // and the HTTP/2 `:authority`.
        return Err(invalid(
            key,
            format!(
                "`{shown}`: a user name or password in the URL is not supported \
                 (authswap does not use it, and it would end up in logs); remove it"
            ),
        ));
    }
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback_host(&host) => Ok(url),
        "http" => Err(invalid(
            key,
            format!(
                "`{shown}`: plain http:// is refused except to a loopback address; use https://"
            ),
        )),
        other => Err(invalid(
            key,
            format!("`{shown}`: unsupported scheme `{other}`"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        std::fs::write(&path, toml).unwrap();
        let mut fig = Config::file_layer(&path)?;
        for (k, v) in env {
            fig = fig.merge((*k, *v));
        }
        Config::finish(fig)
    }

    #[test]
    fn tenants_are_named_sections_and_identity_provider_is_default() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("fabrikam.secret");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let c = load_str(
            &format!(
                "[identity_provider]\nclient_id = \"a\"\n\
                 [tenants.fabrikam]\ntenant = \"fabrikam.onmicrosoft.com\"\nclient_id = \"b\"\n\
                 client_secret_file = {:?}\nclient_secret_expires = \"2099-01-31\"\n",
                secret
            ),
            &[],
        )
        .unwrap();
        let names: Vec<&str> = c.tenant_configs().iter().map(|t| t.0).collect();
        assert_eq!(names, ["default", "fabrikam"]);
        let f = c.tenant("fabrikam").unwrap();
        assert_eq!(f.client_secret.as_ref().unwrap().expose(), "s3cret");
        assert_eq!(f.credential_kind(), CredentialKind::Secret);
        assert!(f.secret_expiry().is_some());
        assert_eq!(
            f.token_url(),
            "https://login.microsoftonline.com/fabrikam.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert!(c
            .check_identity_tenant("fabrikam", crate::store::Mode::App)
            .is_ok());
        let e = c
            .check_identity_tenant("default", crate::store::Mode::App)
            .unwrap_err();
        assert!(e.contains("no client secret or certificate"), "{e}");
        assert!(c
            .check_identity_tenant("nope", crate::store::Mode::Delegated)
            .unwrap_err()
            .contains("no tenant named `nope`"));
        assert!(!c.to_redacted_toml().contains("s3cret"));

        // [tenants.default] stands in for [identity_provider], but not both.
        let c = load_str("[tenants.default]\nclient_id = \"x\"\n", &[]).unwrap();
        assert_eq!(c.identity_provider.client_id, "x");
        assert!(c.tenants.is_empty());
        let e = load_str(
            "[identity_provider]\nclient_id = \"a\"\n[tenants.default]\nclient_id = \"x\"\n",
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("tenants.default"), "{e}");
    }

    #[test]
    fn tenant_settings_are_checked() {
        for (toml, key) in [
            ("[tenants.Big]\nclient_id = \"a\"\n", "tenants.Big"),
            (
                "[tenants.t]\nclient_id = \"a\"\ncertificate_file = \"c.pem\"\n",
                "tenants.t.certificate_file",
            ),
            (
                "[tenants.t]\nclient_id = \"a\"\nclient_secret = \"x\"\ncertificate_file = \"c\"\nprivate_key_file = \"k\"\n",
                "tenants.t.certificate_file",
            ),
            (
                "[tenants.t]\nclient_secret_expires = \"soon\"\n",
                "tenants.t.client_secret_expires",
            ),
            (
                "[tenants.t]\nauthority = \"http://login.example.com\"\n",
                "tenants.t.authority",
            ),
            (
                "[smtp]\napp_scopes = [\"https://outlook.office.com/SMTP.SendAsApp\"]\n",
                "smtp.app_scopes",
            ),
        ] {
            let e = load_str(toml, &[]).unwrap_err().to_string();
            assert!(e.starts_with(key), "{toml}: {e}");
        }
    }

    #[test]
    fn a_secret_in_the_file_is_warned_about_but_not_one_from_the_environment() {
        let c = load_str(
            "[tenants.t]\ntenant = \"contoso.com\"\nclient_id = \"a\"\nclient_secret = \"in-file\"\n",
            &[],
        )
        .unwrap();
        let w = c.missing().join("\n");
        assert!(
            w.contains("tenants.t.client_secret is written in the configuration file"),
            "{w}"
        );
        assert!(w.contains("AUTHSWAP_TENANTS__T__CLIENT_SECRET"), "{w}");
        assert!(!w.contains("in-file"));
        let c = load_str(
            "[tenants.t]\ntenant = \"contoso.com\"\nclient_id = \"a\"\n",
            &[("tenants.t.client_secret", "from-env")],
        )
        .unwrap();
        assert_eq!(
            c.tenants["t"].client_secret.as_ref().unwrap().expose(),
            "from-env"
        );
        assert!(!c
            .missing()
            .join("\n")
            .contains("written in the configuration file"));
        // A credential without a specific tenant cannot get app tokens.
        let c = load_str(
            "[tenants.t]\nclient_id = \"a\"\nclient_secret = \"x\"\n",
            &[],
        )
        .unwrap();
        assert!(c
            .missing()
            .join("\n")
            .contains("tenants.t.tenant = organizations"));
    }

    #[test]
    fn expiring_credentials_are_warned_about_30_days_ahead() {
        let now = std::time::SystemTime::now();
        let day = Duration::from_secs(86_400);
        let w = expiry_warning(
            "tenants.t",
            "client secret",
            now + 10 * day + Duration::from_secs(60),
            now,
        )
        .unwrap();
        assert!(w.contains("in 10 days"), "{w}");
        assert!(expiry_warning("tenants.t", "x", now + 31 * day, now).is_none());
        assert!(expiry_warning("tenants.t", "x", now - day, now)
            .unwrap()
            .contains("expired"));
        assert_eq!(
            parse_expiry("2027-06-30").unwrap(),
            parse_expiry("2027-06-30T00:00:00Z").unwrap()
        );
    }

    #[test]
    fn onboarding_base_url_never_names_an_unspecified_address() {
        let mut o = OnboardingConfig::default();
        assert_eq!(o.base_url(), "http://127.0.0.1:8081");
        o.listen = "0.0.0.0:8081".into();
        assert_eq!(o.redirect_uri(), "http://127.0.0.1:8081/callback");
        o.listen = "[::]:9000".into();
        assert_eq!(o.base_url(), "http://127.0.0.1:9000");
        o.public_url = Some("https://onboarding.contoso.com/".into());
        assert_eq!(o.base_url(), "https://onboarding.contoso.com");
    }

    #[test]
    fn defaults_validate_and_name_what_is_missing() {
        let c = Config::default();
        c.validate().unwrap();
        assert!(c.missing()[0].contains("identity_provider.client_id"));
        assert_eq!(
            c.identity_provider.token_url(),
            "https://login.microsoftonline.com/organizations/oauth2/v2.0/token"
        );
    }

    #[test]
    fn plain_http_upstream_only_to_loopback() {
        let err = load_str("[http]\nupstream = \"http://example.com\"\n", &[]).unwrap_err();
        assert!(err.to_string().starts_with("http.upstream:"), "{err}");
        load_str("[http]\nupstream = \"http://127.0.0.1:9\"\n", &[]).unwrap();
        load_str("[http]\nupstream = \"http://localhost:9\"\n", &[]).unwrap();
    }

    #[test]
    fn sizes_durations_and_scopes_parse() {
        let c = load_str(
            "[http]\nreplay_buffer_limit = \"1MiB\"\nheader_read_timeout = \"5s\"\nscopes = \"a b\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.http.replay_buffer_limit, ByteSize(1 << 20));
        assert_eq!(c.http.header_read_timeout, Duration::from_secs(5));
        assert_eq!(c.http.scopes, vec!["a", "b"]);
    }

    #[test]
    fn unknown_keys_and_bad_types_name_the_key() {
        let err = load_str("[http]\nlisten_addr = \"x\"\n", &[]).unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
        let err = load_str("[http]\nmax_connections = \"many\"\n", &[]).unwrap_err();
        assert!(err.to_string().contains("max_connections"), "{err}");
        let err = load_str("[admin]\nlisten = \"nowhere\"\n", &[]).unwrap_err();
        assert!(err.to_string().starts_with("admin.listen:"), "{err}");
    }

    #[test]
    fn runtime_worker_threads_default_to_one_and_are_bounded() {
        assert_eq!(Config::default().runtime.worker_threads, 1);
        let c = load_str("[runtime]\nworker_threads = 0\n", &[]).unwrap();
        assert_eq!(c.runtime.worker_threads, 0);
        let err = load_str("[runtime]\nworker_threads = 5000\n", &[]).unwrap_err();
        assert!(
            err.to_string().starts_with("runtime.worker_threads:"),
            "{err}"
        );
    }

    #[test]
    fn cost_and_size_settings_are_bounded() {
        for (toml, key) in [
            // 100 GiB, and nothing.
            (
                "[auth]\nargon2_memory_kib = 104857600\n",
                "auth.argon2_memory_kib",
            ),
            ("[auth]\nargon2_memory_kib = 0\n", "auth.argon2_memory_kib"),
            ("[auth]\nargon2_iterations = 0\n", "auth.argon2_iterations"),
            (
                "[auth]\nargon2_iterations = 1000\n",
                "auth.argon2_iterations",
            ),
            (
                "[auth]\nargon2_parallelism = 0\n",
                "auth.argon2_parallelism",
            ),
            (
                "[auth]\nargon2_parallelism = 64\n",
                "auth.argon2_parallelism",
            ),
            (
                "[auth]\ncredential_cache_ttl = \"30days\"\n",
                "auth.credential_cache_ttl",
            ),
            (
                "[http]\nreplay_buffer_limit = \"10GiB\"\n",
                "http.replay_buffer_limit",
            ),
            (
                "[http]\nmax_header_bytes = \"1GiB\"\n",
                "http.max_header_bytes",
            ),
            ("[http]\nmax_header_bytes = 100\n", "http.max_header_bytes"),
            (
                "[http]\nmax_connections = 10000000\n",
                "http.max_connections",
            ),
            ("[http]\nmax_connections = 0\n", "http.max_connections"),
            (
                "[http]\nheader_read_timeout = \"0s\"\n",
                "http.header_read_timeout",
            ),
            (
                "[http]\nupstream_timeout = \"1000years\"\n",
                "http.upstream_timeout",
            ),
            ("[imap]\nmax_line = \"1GiB\"\n", "imap.max_line"),
            ("[smtp]\nmax_line = 100\n", "smtp.max_line"),
            ("[smtp]\nidle_timeout = \"0s\"\n", "smtp.idle_timeout"),
            (
                "[pop3]\nupstream_timeout = \"1000years\"\n",
                "pop3.upstream_timeout",
            ),
            ("[pop3]\nmax_connections = 0\n", "pop3.max_connections"),
            (
                "[tokens]\nreload_interval = \"0s\"\n",
                "tokens.reload_interval",
            ),
            ("[tokens]\nretry_max = \"1000years\"\n", "tokens.retry_max"),
            (
                "[tokens]\nrefresh_ahead = \"1000years\"\n",
                "tokens.refresh_ahead",
            ),
            (
                "[tokens]\nmax_concurrent_refreshes = 0\n",
                "tokens.max_concurrent_refreshes",
            ),
            (
                "[identity_provider]\ntimeout = \"0s\"\n",
                "identity_provider.timeout",
            ),
        ] {
            let err = load_str(toml, &[]).unwrap_err();
            assert!(
                err.to_string().starts_with(&format!("{key}: must be")),
                "{toml}: {err}"
            );
        }
        let err = load_str("[auth]\nargon2_memory_kib = 104857600\n", &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "auth.argon2_memory_kib: must be between 256 and 1048576, got 104857600"
        );
        // The test harness's cheap costs and the largest accepted ones load
        // (the cheap ones with a warning).
        let c = load_str(
            "[auth]\nargon2_memory_kib = 256\nargon2_iterations = 1\n",
            &[],
        )
        .unwrap();
        assert!(c.missing().iter().any(|m| m.contains("OWASP")));
        load_str(
            "[auth]\nargon2_memory_kib = 1048576\nargon2_iterations = 16\nargon2_parallelism = 16\n",
            &[],
        )
        .unwrap();
        assert!(!Config::default()
            .missing()
            .iter()
            .any(|m| m.contains("OWASP")));
    }

    #[test]
    fn environment_overrides_file() {
        let c = load_str(
            "[admin]\nlisten = \"127.0.0.1:1\"\n",
            &[("admin.listen", "127.0.0.1:2")],
        )
        .unwrap();
        assert_eq!(c.admin.listen, "127.0.0.1:2");
    }

    #[test]
    fn redacted_output_hides_the_client_secret() {
        let mut c = Config::default();
        c.identity_provider.client_secret = Some(Secret::new("s3cr3t-value"));
        let out = c.to_redacted_toml();
        assert!(!out.contains("s3cr3t-value"));
        assert!(!format!("{c:?}").contains("s3cr3t-value"));
        assert!(out.contains("<redacted>"));
    }

    #[test]
    fn passwords_in_urls_are_never_shown() {
        let r = |t: &str| redact_userinfo(t).into_owned();
        assert_eq!(r("https://u:pw@host/x"), "https://<redacted>@host/x");
        assert_eq!(r("https://host/x"), "https://host/x");
        assert_eq!(
            r("https://u:p@ss@host:8443"),
            "https://<redacted>@host:8443"
        );
        assert_eq!(r("https://u:pa/ss@host/p"), "https://<redacted>@host/p");
        assert_eq!(
            r("`http://u:pw@a.example`: refused; see https://v:pw2@b.example/x"),
            "`http://<redacted>@a.example`: refused; see https://<redacted>@b.example/x"
        );

        // Such URLs are refused when loaded; a configuration built in code
        // is still shown without them.
        let mut c = Config::default();
        c.http.upstream = "https://svc:url-pw-1@outlook.example".into();
        c.identity_provider.authority = "https://idp:url-pw-2@login.example".into();
        c.smtp.upstream = "svc:url-pw-3@smtp.example:587".into();
        let out = c.to_redacted_toml();
        assert!(!out.contains("url-pw"), "{out}");
        assert!(
            out.contains("upstream = \"https://<redacted>@outlook.example\""),
            "{out}"
        );
        assert!(out.contains("https://<redacted>@login.example/organizations/oauth2/v2.0/token"));
        assert!(
            out.contains("upstream = \"<redacted>@smtp.example:587\""),
            "{out}"
        );

        for (toml, key) in [
            (
                "[http]\nupstream = \"https://svc:url-pw-3@example.com\"\n",
                "http.upstream",
            ),
            (
                "[http]\nupstream = \"https://svc@example.com\"\n",
                "http.upstream",
            ),
            (
                "[identity_provider]\ntoken_endpoint = \"https://:url-pw-3@login.example/t\"\n",
                "identity_provider.token_endpoint",
            ),
            (
                "[http]\nupstream = \"http://svc:url-pw-3@example.com\"\n",
                "http.upstream",
            ),
            (
                "[http]\nupstream = \"ftp://svc:url-pw-3@example.com\"\n",
                "http.upstream",
            ),
            (
                "[identity_provider]\nauthority = \"https://svc:url-pw-3@\"\n",
                "identity_provider.authority",
            ),
            (
                "[smtp]\nupstream = \"svc:url-pw-3@smtp.example:587\"\n",
                "smtp.upstream",
            ),
        ] {
            let err = load_str(toml, &[]).unwrap_err().to_string();
            assert!(err.starts_with(key), "{err}");
            assert!(!err.contains("url-pw"), "{err}");
        }
    }

    #[test]
    fn mail_sections_keep_protocol_defaults() {
        let c = load_str(
            "[smtp]\nlisten = \"127.0.0.1:2526\"\n[pop3]\nenabled = false\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.smtp.listen, "127.0.0.1:2526");
        assert_eq!(c.smtp.upstream, "smtp.office365.com:587");
        assert_eq!(c.smtp.upstream_tls, UpstreamTls::Starttls);
        assert_eq!(c.smtp.scopes[0], SMTP_SCOPE);
        assert_eq!(c.imap.upstream_tls, UpstreamTls::Implicit);
        assert!(c.imap.enabled);
        assert!(!c.pop3.enabled);
        assert_eq!(c.pop3.upstream, "outlook.office365.com:995");
        let err = load_str("[smtp]\nupstream = \"nohost\"\n", &[]).unwrap_err();
        assert!(err.to_string().starts_with("smtp.upstream:"), "{err}");
        let err = load_str("[imap]\nlisten_on = 1\n", &[]).unwrap_err();
        assert!(err.to_string().contains("listen_on"), "{err}");
    }

    #[test]
    fn byte_sizes() {
        assert_eq!("65536".parse::<ByteSize>().unwrap(), ByteSize(65536));
        assert_eq!("64 KiB".parse::<ByteSize>().unwrap(), ByteSize(65536));
        assert_eq!("10MB".parse::<ByteSize>().unwrap(), ByteSize(10_000_000));
        assert!("lots".parse::<ByteSize>().is_err());
    }

    #[test]
    fn store_url_selects_postgres_and_keeps_its_password_hidden() {
        let c = load_str("", &[]).unwrap();
        assert_eq!(c.store.url, None, "SQLite by default");
        assert_eq!(c.store.pool_size, 8);

        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("db.password");
        std::fs::write(&pw, "file-pw-1\n").unwrap();
        let c = load_str(
            &format!(
                "[store]\nurl = \"postgres://authswap@db.example:5432/authswap?sslmode=verify-full\"\n\
                 password_file = {:?}\npool_size = 3\nconnect_timeout = \"2s\"\n",
                pw.display()
            ),
            &[],
        )
        .unwrap();
        assert_eq!(c.store.password.as_ref().unwrap().expose(), "file-pw-1");
        assert_eq!(c.store.pool_size, 3);
        assert!(c.missing().iter().all(|m| !m.contains("store.")));
        let out = c.to_redacted_toml();
        assert!(!out.contains("file-pw-1"), "{out}");
        assert!(
            out.contains(
                "url = \"postgres://<redacted>@db.example:5432/authswap?sslmode=verify-full\""
            ),
            "{out}"
        );
        assert!(!format!("{c:?}").contains("file-pw-1"));

        // From the environment, as the password variable.
        let c = load_str(
            "",
            &[
                ("store.url", "postgres://authswap@db.example/authswap"),
                ("store.password", "env-pw-2"),
            ],
        )
        .unwrap();
        assert_eq!(c.store.password.as_ref().unwrap().expose(), "env-pw-2");
        assert!(c.missing().iter().all(|m| !m.contains("store.")));

        // In the URL, when the admin insists: works, with a warning; never shown.
        let c = load_str(
            "[store]\nurl = \"postgres://authswap:url-pw-3@db.example/authswap\"\n",
            &[],
        )
        .unwrap();
        assert!(
            c.missing()
                .iter()
                .any(|m| m.contains("store.url holds the database password")),
            "{:?}",
            c.missing()
        );
        assert!(!c.to_redacted_toml().contains("url-pw-3"));
        // In the file as `password`: warned like every secret.
        let c = load_str(
            "[store]\nurl = \"postgres://a@db.example/a\"\npassword = \"file-pw-4\"\n",
            &[],
        )
        .unwrap();
        assert!(c
            .missing()
            .iter()
            .any(|m| m.contains("store.password is written")));
        assert!(!c.to_redacted_toml().contains("file-pw-4"));
    }

    #[test]
    fn bad_store_settings_name_the_key() {
        for (toml, key) in [
            ("[store]\nurl = \"mysql://a@b/c\"\n", "store.url"),
            ("[store]\nurl = \"not a url\"\n", "store.url"),
            (
                "[store]\nurl = \"postgres://a:secret-pw@b/c?sslmode=sure\"\n",
                "store.url",
            ),
            (
                "[store]\nurl = \"postgres://a:secret-pw@b/c\"\npassword = \"x\"\n",
                "store.url",
            ),
            ("[store]\npassword = \"x\"\n", "store.password"),
            ("[store]\npool_size = 0\n", "store.pool_size"),
            (
                "[store]\nconnect_timeout = \"0s\"\n",
                "store.connect_timeout",
            ),
            (
                "[store]\nstatement_timeout = \"2h\"\n",
                "store.statement_timeout",
            ),
        ] {
            let err = load_str(toml, &[]).unwrap_err().to_string();
            assert!(err.starts_with(key), "{toml}: {err}");
            assert!(!err.contains("secret-pw"), "{err}");
        }
    }
}
