//! Several real `authswap serve` processes on one configuration (one
//! PostgreSQL store): each [`Replica`] is a child process (killed when
//! dropped) whose listeners are bound to port 0 and read back from its
//! "authswap is serving" JSON log line; its log (stderr) is drained in the
//! background into a buffer that is printed when a test fails.

use super::harness::{basic, Env, SOAP};
use authswap::identity::hash_password;
use authswap::secret::Secret;
use authswap::store::{open_sealer, KeyUse, NewIdentity};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// How long a replica may take to start serving.
const START_LIMIT: Duration = Duration::from_secs(20);

/// One `authswap serve` process.
pub struct Replica {
    /// Name used in failure output.
    pub name: String,
    child: Child,
    /// Its process id.
    pub pid: u32,
    /// The HTTP front end.
    pub http: SocketAddr,
    /// The admin listener (API, `/metrics`).
    pub admin: SocketAddr,
    log: Arc<Mutex<String>>,
    drain: tokio::task::JoinHandle<()>,
}

impl Replica {
    /// Starts `authswap -c CONFIG --log-format json serve` with `envs`
    /// added to its environment, and waits (at most 20 s) for its serving
    /// line. The configuration must listen on port 0 everywhere.
    pub async fn start(name: &str, config: &Path, envs: &[(&str, &str)]) -> Replica {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_authswap"));
        cmd.arg("-c")
            .arg(config)
            .args(["--log-format", "json", "serve"])
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn authswap serve");
        let pid = child.id().expect("pid");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let log = Arc::new(Mutex::new(String::new()));
        let push = |log: &Mutex<String>, line: &str| {
            let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
            l.push_str(line);
            l.push('\n');
        };
        let deadline = tokio::time::Instant::now() + START_LIMIT;
        let serving = loop {
            let line = match tokio::time::timeout_at(deadline, lines.next_line()).await {
                Ok(Ok(Some(line))) => line,
                Ok(_) => panic!(
                    "replica {name} exited before serving:\n{}",
                    log.lock().unwrap()
                ),
                Err(_) => panic!(
                    "replica {name} did not serve within {START_LIMIT:?}:\n{}",
                    log.lock().unwrap()
                ),
            };
            push(&log, &line);
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v["message"] == "authswap is serving" {
                    break v;
                }
            }
        };
        let addr = |key: &str| -> SocketAddr {
            serving[key]
                .as_str()
                .unwrap_or_else(|| panic!("no {key} address in {serving}"))
                .parse()
                .expect("address")
        };
        let (http, admin) = (addr("http"), addr("admin"));
        let sink = log.clone();
        let drain = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                push(&sink, &line);
            }
        });
        Replica {
            name: name.to_owned(),
            child,
            pid,
            http,
            admin,
            log,
            drain,
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// `kill -KILL`, then waits (at most 10 s) until it is gone: its
    /// sockets (database, identity platform, listeners) are closed then.
    pub async fn kill9(&mut self) {
        self.child.start_kill().expect("SIGKILL");
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("a killed replica is gone within 10 s")
            .expect("wait");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "{status:?}"
        );
    }

    /// Graceful stop: SIGTERM, then waits (at most 15 s) for the exit.
    pub async fn stop(&mut self) -> ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await
            .expect("kill -TERM");
        assert!(sent.success(), "kill -TERM {}", self.pid);
        let status = tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("replica {} ignored SIGTERM:\n{}", self.name, self.log()))
            .expect("wait");
        assert!(
            status.success(),
            "replica {} exited with {status:?}:\n{}",
            self.name,
            self.log()
        );
        status
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- log of replica {} (pid {}) ----\n{}---- end of {} ----",
                self.name,
                self.pid,
                self.log(),
                self.name
            );
        }
        self.drain.abort();
        // kill_on_drop does the rest.
    }
}

/// Starts `n` replicas (`r0`, `r1`, …) of `env`'s configuration at once.
/// The admin token file is written first, so they share it instead of
/// racing to create it; `envs` go to every process.
pub async fn start_fleet(env: &Env, n: usize, envs: &[(&str, &str)]) -> Vec<Replica> {
    let config = env.write_config();
    write_admin_token(env);
    let envs: Vec<(String, String)> = envs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let mut starts = tokio::task::JoinSet::new();
    for i in 0..n {
        let (config, envs) = (config.clone(), envs.clone());
        starts.spawn(async move {
            let envs: Vec<(&str, &str)> =
                envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            (i, Replica::start(&format!("r{i}"), &config, &envs).await)
        });
    }
    let mut fleet: Vec<(usize, Replica)> = Vec::new();
    while let Some(started) = starts.join_next().await {
        fleet.push(started.expect("replica start"));
    }
    fleet.sort_by_key(|(i, _)| *i);
    fleet.into_iter().map(|(_, r)| r).collect()
}

/// The admin token every replica of `env` accepts.
pub const ADMIN_TOKEN: &str = "fleet-admin-token-0123456789abcdef";

/// Writes [`ADMIN_TOKEN`] to the configured `admin.token_file` (0600).
pub fn write_admin_token(env: &Env) {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let path = env.dir.path().join("data/admin.token");
    std::fs::create_dir_all(path.parent().unwrap()).expect("data dir");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .expect("admin token file");
    std::io::Write::write_all(&mut f, ADMIN_TOKEN.as_bytes()).expect("write admin token");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// Adds `names` (mailbox `NAME@contoso.com`, one shared `password`) as
/// delegated identities linked to refresh tokens seeded at the identity
/// platform, through the real store API with one connection pool, one
/// sealer and one password hash (each with its own salt would only cost
/// time). Returns the seeded refresh tokens, in order.
pub async fn seed_linked(env: &Env, names: &[String], password: &str) -> Vec<String> {
    let config = env.config();
    let store = env.any_store().await;
    let hash = hash_password(password, &config.auth).expect("hash");
    let sealer = open_sealer(&config.store, store.as_ref(), KeyUse::Link)
        .await
        .expect("key");
    let mut tokens = Vec::with_capacity(names.len());
    for name in names {
        let mailbox = format!("{name}@contoso.com");
        let rec = store
            .create(&NewIdentity::delegated(name, &mailbox, &hash))
            .await
            .expect("create");
        let rt = env.idp.seed_refresh_token(&mailbox);
        store
            .link(rec.id, &sealer.seal(rec.id, &Secret::new(rt.clone())))
            .await
            .expect("link");
        tokens.push(rt);
    }
    tokens
}

/// One EWS request as `name`/`password` on a fresh connection that
/// tolerates the server going away: the status, or why there is none.
/// At most `limit`.
pub async fn try_ews(
    addr: SocketAddr,
    name: &str,
    password: &str,
    limit: Duration,
) -> Result<u16, String> {
    let work = async {
        let mut tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let req = format!(
            "POST /EWS/Exchange.asmx HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {}\r\n\
             Content-Type: text/xml; charset=utf-8\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{SOAP}",
            basic(name, password),
            SOAP.len()
        );
        tcp.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        tcp.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf);
        text.split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no HTTP answer: {text:?}"))
    };
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {limit:?}")))
}

/// Polls `probe` every 20 ms until it returns true; the time it took, or
/// `None` after `limit`.
pub async fn within<F, Fut>(limit: Duration, mut probe: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if probe().await {
            return Some(start.elapsed());
        }
        if start.elapsed() >= limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
