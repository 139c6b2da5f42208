//! `authswap doctor`: checks a live setup end to end (configuration, key
//! file, store, identity platform and app registration, each enabled front
//! end's upstream with its TLS certificate, each identity) and says for
//! each check, in plain words, whether it is fine and what to fix.

use crate::config::{Config, MailConfig, UpstreamTls};
use crate::store::{KeyUse, Status, Store};
use crate::token::IdpError;
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long one network check may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Fine.
    Ok,
    /// Works, but worth a look.
    Warn,
    /// Broken: something must be fixed.
    Fail,
}

impl Level {
    /// `ok`, `warn` or `fail`.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "fail",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked (`config`, `key`, `store`, `identity platform
    /// (default)`, `upstream http`, `identity alice`, ...).
    pub check: String,
    /// The verdict.
    pub level: Level,
    /// What was found and, when not ok, what to do.
    pub message: String,
}

#[derive(Default)]
struct Report(Vec<Check>);

impl Report {
    fn add(&mut self, check: impl Into<String>, level: Level, message: impl Into<String>) {
        self.0.push(Check {
            check: check.into(),
            level,
            message: message.into(),
        });
    }
}

/// Runs every check against the configuration at `path` (and the
/// environment), as `serve` would load it.
pub async fn run(path: &Path) -> Vec<Check> {
    let mut r = Report::default();
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            r.add(
                "config",
                Level::Fail,
                format!("{e}; fix it (authswap config check shows the whole configuration)"),
            );
            return r.0;
        }
    };
    r.add("config", Level::Ok, format!("{} is valid", path.display()));
    for missing in config.missing() {
        r.add("config", Level::Warn, missing);
    }
    let store = check_store(&config, &mut r).await;
    if let Some(store) = &store {
        check_key(&config, store.as_ref(), &mut r).await;
    }
    check_idp(&config, &mut r).await;
    check_upstreams(&config, &mut r).await;
    if let Some(store) = &store {
        check_identities(store.as_ref(), &mut r).await;
    }
    r.0
}

async fn check_store(config: &Config, r: &mut Report) -> Option<Arc<dyn Store>> {
    let pg = config
        .store
        .url
        .as_deref()
        .is_some_and(|u| !u.trim().is_empty());
    let what = if pg {
        "PostgreSQL (store.url)".to_owned()
    } else {
        if !config.store.path.exists() {
            r.add(
                "store",
                Level::Warn,
                format!(
                    "{} does not exist yet: serve creates it at first start (check store.path if it should exist)",
                    config.store.path.display()
                ),
            );
            return None;
        }
        format!("SQLite {}", config.store.path.display())
    };
    match tokio::time::timeout(PROBE_TIMEOUT * 3, crate::store::open(config)).await {
        Err(_) => {
            r.add(
                "store",
                Level::Fail,
                format!("{what} did not answer within 30 s: check that the database runs and is reachable"),
            );
            None
        }
        Ok(Err(e)) => {
            r.add(
                "store",
                Level::Fail,
                format!("{what} cannot be opened or migrated: {e}"),
            );
            None
        }
        Ok(Ok(store)) => match store.revision().await {
            Ok(_) => {
                r.add(
                    "store",
                    Level::Ok,
                    format!("{what} is reachable and its schema is up to date"),
                );
                Some(store)
            }
            Err(e) => {
                r.add("store", Level::Fail, format!("{what} does not answer: {e}"));
                None
            }
        },
    }
}

async fn check_key(config: &Config, store: &dyn Store, r: &mut Report) {
    let cfg = &config.store;
    if cfg.key.as_ref().is_some_and(|k| !k.is_empty()) {
        match crate::store::open_sealer(cfg, store, KeyUse::Serve).await {
            Ok(_) => r.add(
                "key",
                Level::Ok,
                "the sealing key from the configuration (store.key) opens the stored tokens",
            ),
            Err(e) => r.add("key", Level::Fail, e.to_string()),
        }
        return;
    }
    let path = &cfg.key_file;
    match std::fs::metadata(path) {
        Err(_) => {
            let sealed = store.token_keys().await.map(|t| t.len()).unwrap_or(0);
            if sealed == 0 {
                r.add(
                    "key",
                    Level::Warn,
                    format!(
                        "{} does not exist yet: serve creates it (mode 0600) at first start",
                        path.display()
                    ),
                );
            } else {
                r.add(
                    "key",
                    Level::Fail,
                    format!(
                        "{} is missing but {sealed} stored tokens were sealed with a key: restore the key file from its backup (or sign the identities in again)",
                        path.display()
                    ),
                );
            }
        }
        Ok(meta) => {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                let level = if cfg.allow_insecure_key_file {
                    Level::Warn
                } else {
                    Level::Fail
                };
                r.add(
                    "key",
                    level,
                    format!(
                        "{} has mode {mode:04o}: group or others may read the sealing key; run chmod 600 {}",
                        path.display(),
                        path.display()
                    ),
                );
                if level == Level::Fail {
                    return;
                }
            }
            match crate::store::open_sealer(cfg, store, KeyUse::Serve).await {
                Ok(_) if mode & 0o077 == 0 => r.add(
                    "key",
                    Level::Ok,
                    format!(
                        "{} (mode {mode:04o}) opens the stored tokens",
                        path.display()
                    ),
                ),
                Ok(_) => {}
                Err(e) => r.add("key", Level::Fail, e.to_string()),
            }
        }
    }
}

async fn check_idp(config: &Config, r: &mut Report) {
    let tls = match crate::tls::client_config(&config.tls) {
        Ok(t) => t,
        Err(e) => {
            r.add("tls", Level::Fail, e.to_string());
            return;
        }
    };
    let client = crate::tls::https_client(tls, crate::tls::CONNECT_TIMEOUT);
    let tenants = match crate::tenant::Tenants::new(config, client) {
        Ok(t) => t,
        Err(e) => {
            r.add("identity platform", Level::Fail, e.to_string());
            return;
        }
    };
    let scopes = vec!["offline_access".to_owned()];
    for (tenant, (section, idp)) in tenants
        .all()
        .iter()
        .zip(config.tenant_configs().into_iter().map(|(_, s, i)| (s, i)))
    {
        let check = format!("identity platform ({})", tenant.name);
        if idp.client_id.trim().is_empty() {
            r.add(
                check,
                Level::Fail,
                format!("{section}.client_id is not set: register the app in Entra ID and set it"),
            );
            continue;
        }
        // A refresh grant with a token that cannot exist: the platform's
        // refusal says whether it knows the app and accepts its credential.
        let probe = crate::secret::Secret::new("authswap-doctor-probe-not-a-token");
        let answer = tokio::time::timeout(
            idp.timeout.max(PROBE_TIMEOUT),
            tenant.idp.refresh(&probe, &scopes),
        )
        .await;
        let endpoint = idp.token_url();
        let client_id = &idp.client_id;
        match answer {
            Err(_) => r.add(
                check,
                Level::Fail,
                format!("{endpoint} did not answer in time: check the network path (proxy, firewall, DNS) to the identity platform"),
            ),
            Ok(Ok(_)) | Ok(Err(IdpError::Reauth { .. })) => r.add(
                check,
                Level::Ok,
                format!("{endpoint} answers and knows the app registration {client_id} (its credential is accepted)"),
            ),
            Ok(Err(IdpError::AppCredential { code: Some(700016), .. })) => r.add(
                check,
                Level::Fail,
                format!("the identity platform does not know the application {client_id} in tenant {} (AADSTS700016): check {section}.client_id and {section}.tenant against the app registration in Entra ID", idp.tenant),
            ),
            Ok(Err(IdpError::AppCredential { message, .. })) => r.add(
                check,
                Level::Fail,
                format!("the app registration {client_id} exists but its credential is refused: {message}"),
            ),
            Ok(Err(IdpError::Configuration { message })) => r.add(
                check,
                Level::Fail,
                format!("the identity platform refuses the app configuration of {client_id}: {message}"),
            ),
            Ok(Err(IdpError::NotConfigured)) => r.add(
                check,
                Level::Fail,
                format!("{section}.client_id is not set"),
            ),
            Ok(Err(IdpError::Transient { message, .. })) => r.add(
                check,
                Level::Fail,
                format!("{endpoint} is not reachable or failing: {message}"),
            ),
        }
    }
}

async fn check_upstreams(config: &Config, r: &mut Report) {
    let tls = match crate::tls::client_config(&config.tls) {
        Ok(t) => Arc::new(t),
        Err(_) => return, // reported by the identity-platform check
    };
    if config.http.enabled {
        let check = "upstream http";
        match url::Url::parse(&config.http.upstream) {
            Err(e) => r.add(check, Level::Fail, format!("http.upstream: {e}")),
            Ok(u) if u.scheme() == "http" => r.add(
                check,
                Level::Warn,
                format!(
                    "{} is plain HTTP: tokens cross the network unencrypted; use https://",
                    config.http.upstream
                ),
            ),
            Ok(u) => {
                let host = u
                    .host_str()
                    .unwrap_or_default()
                    .trim_matches(['[', ']'])
                    .to_owned();
                let port = u.port_or_known_default().unwrap_or(443);
                let verdict = tls_probe(&tls, &host, port, None).await;
                report_upstream(r, check, &format!("{host}:{port}"), verdict);
            }
        }
    }
    for (section, cfg, dialect) in [
        ("smtp", &config.smtp, Dialect::Smtp),
        ("imap", &config.imap, Dialect::Imap),
        ("pop3", &config.pop3, Dialect::Pop3),
    ] {
        if !cfg.enabled {
            continue;
        }
        let check = format!("upstream {section}");
        let Some((host, port)) = cfg.upstream_host_port() else {
            r.add(
                check,
                Level::Fail,
                format!("{section}.upstream: not host:port"),
            );
            continue;
        };
        let starttls = (cfg.upstream_tls == UpstreamTls::Starttls).then_some(dialect);
        let verdict = tls_probe(&tls, &host, port, starttls).await;
        report_upstream(r, &check, &upstream_name(cfg), verdict);
    }
}

fn upstream_name(cfg: &MailConfig) -> String {
    let how = match cfg.upstream_tls {
        UpstreamTls::Starttls => "STARTTLS",
        UpstreamTls::Implicit => "TLS",
    };
    format!("{} ({how})", cfg.upstream)
}

fn report_upstream(r: &mut Report, check: &str, name: &str, verdict: Result<(), Probe>) {
    match verdict {
        Ok(()) => r.add(
            check,
            Level::Ok,
            format!("{name} answers with a certificate trusted for its name"),
        ),
        Err(Probe::Connect(e)) => r.add(
            check,
            Level::Fail,
            format!("cannot connect to {name}: {e}; check the address and the network path"),
        ),
        Err(Probe::Certificate(e)) => r.add(
            check,
            Level::Fail,
            format!("the TLS certificate of {name} is not trusted: {e}; if the server uses a private CA, put that CA in tls.extra_ca_file, else check the host name"),
        ),
        Err(Probe::Protocol(e)) => r.add(
            check,
            Level::Fail,
            format!("{name} did not start TLS: {e}"),
        ),
    }
}

#[derive(Clone, Copy)]
enum Dialect {
    Smtp,
    Imap,
    Pop3,
}

enum Probe {
    Connect(String),
    Certificate(String),
    Protocol(String),
}

/// Connects to `host:port` (after STARTTLS/STLS in `starttls`'s dialect)
/// and completes a TLS handshake verified against the configured trust.
async fn tls_probe(
    tls: &Arc<rustls::ClientConfig>,
    host: &str,
    port: u16,
    starttls: Option<Dialect>,
) -> Result<(), Probe> {
    let work = async {
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|e| Probe::Connect(e.to_string()))?;
        let tcp = match starttls {
            None => tcp,
            Some(d) => upgrade(tcp, d).await?,
        };
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| Probe::Protocol(e.to_string()))?;
        tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| Probe::Certificate(crate::token::idp::error_chain(&e)))?;
        Ok(())
    };
    tokio::time::timeout(PROBE_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| Err(Probe::Connect("no answer within 10 s".into())))
}

/// Says STARTTLS (STLS) and returns the stream once the server agreed.
async fn upgrade(tcp: TcpStream, dialect: Dialect) -> Result<TcpStream, Probe> {
    let proto = |s: &str| Probe::Protocol(s.to_owned());
    let io = |e: std::io::Error| Probe::Protocol(e.to_string());
    let mut rd = BufReader::new(tcp);
    let mut line = String::new();
    // Reads one reply (SMTP: through the last `NNN ` line).
    async fn reply(
        rd: &mut BufReader<TcpStream>,
        line: &mut String,
        smtp: bool,
    ) -> std::io::Result<String> {
        for _ in 0..100 {
            line.clear();
            if rd.read_line(line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            if !smtp || line.as_bytes().get(3) != Some(&b'-') {
                return Ok(line.trim_end().to_owned());
            }
        }
        Err(std::io::ErrorKind::InvalidData.into())
    }
    let smtp = matches!(dialect, Dialect::Smtp);
    let greeting = reply(&mut rd, &mut line, smtp).await.map_err(io)?;
    let (commands, ok): (&[&str], &str) = match dialect {
        Dialect::Smtp => (&["EHLO authswap-doctor\r\n", "STARTTLS\r\n"], "220"),
        Dialect::Imap => (&["A1 STARTTLS\r\n"], "A1 OK"),
        Dialect::Pop3 => (&["STLS\r\n"], "+OK"),
    };
    let greeted = match dialect {
        Dialect::Smtp => greeting.starts_with("220"),
        Dialect::Imap => greeting.starts_with("* OK"),
        Dialect::Pop3 => greeting.starts_with("+OK"),
    };
    if !greeted {
        return Err(proto(&format!("unexpected greeting {greeting:?}")));
    }
    let mut last = String::new();
    for c in commands {
        rd.get_mut().write_all(c.as_bytes()).await.map_err(io)?;
        last = loop {
            let l = reply(&mut rd, &mut line, smtp).await.map_err(io)?;
            // IMAP: skip untagged lines before the tagged answer.
            if matches!(dialect, Dialect::Imap) && l.starts_with('*') {
                continue;
            }
            break l;
        };
    }
    if !last.starts_with(ok) {
        return Err(proto(&format!("STARTTLS refused: {last:?}")));
    }
    if !rd.buffer().is_empty() {
        return Err(proto("data after agreeing to start TLS"));
    }
    Ok(rd.into_inner())
}

async fn check_identities(store: &dyn Store, r: &mut Report) {
    let records = match store.list().await {
        Ok(l) => l,
        Err(e) => {
            r.add(
                "identities",
                Level::Fail,
                format!("cannot list identities: {e}"),
            );
            return;
        }
    };
    if records.is_empty() {
        r.add(
            "identities",
            Level::Warn,
            "none yet: add one with authswap identity add NAME --mailbox UPN",
        );
        return;
    }
    let mut fine = 0;
    for rec in &records {
        let check = format!("identity {}", crate::names::Shown(&rec.name));
        let why = rec.last_error.as_deref().unwrap_or("no details");
        match rec.status {
            _ if rec.is_ok() => fine += 1,
            Status::Pending => r.add(
                check,
                Level::Warn,
                format!("not linked yet: authswap invite {} (or identity login)", rec.name),
            ),
            Status::NeedsReauth => r.add(
                check,
                Level::Fail,
                format!("needs a person to sign in again ({why}): authswap invite {}", rec.name),
            ),
            Status::UpstreamRefused => r.add(
                check,
                Level::Fail,
                format!("the upstream refuses it ({why}): an Exchange administrator must allow the protocol for the mailbox"),
            ),
            Status::Linked => match &rec.tenant_block {
                Some(block) => r.add(
                    check,
                    Level::Fail,
                    format!("its tenant's app credential is refused ({block}): renew it in Entra ID and the configuration"),
                ),
                None => r.add(
                    check,
                    Level::Warn,
                    format!("its last token refresh failed ({why}); it recovers by itself when the cause goes away"),
                ),
            },
        }
    }
    if fine > 0 {
        r.add(
            "identities",
            Level::Ok,
            format!("{fine} of {} linked and refreshing", records.len()),
        );
    }
}
