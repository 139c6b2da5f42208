//! A throwaway PostgreSQL cluster for the tests, started by the tests
//! themselves: nothing needs to be set up by hand.
//!
//! - **Finding PostgreSQL:** `initdb` and `pg_ctl` on `PATH`, else the
//!   newest `/usr/lib/postgresql/*/bin` (Debian's `postgresql` package;
//!   `.ci/run` installs it when missing).
//! - **One cluster per test process**, started on first use (a
//!   [`OnceLock`]): `initdb -A trust -U authswap` in a temporary directory,
//!   then `pg_ctl start` listening on `127.0.0.1` only, on a free port, with
//!   its socket in that directory and `fsync=off` (nothing here needs to
//!   survive a crash). It also speaks TLS with the test PKI's `localhost`
//!   certificate (`support::pki`), for `sslmode=verify-full` tests. PostgreSQL refuses to run as root, so as root (CI,
//!   containers) its commands run as the `postgres` user through `runuser`
//!   (the directory is handed to that user first; the user is created when
//!   missing).
//! - **A fresh database per test** ([`database`]): `CREATE DATABASE`, so
//!   tests in one process run in parallel without seeing each other.
//! - **Stopping:** statics are never dropped in Rust, and the crate forbids
//!   the `unsafe` an `atexit` hook would need, so a small watchdog shell is
//!   started beside the cluster: it polls the test process, and when that
//!   is gone (passed, failed, killed) runs `pg_ctl stop -m immediate` and
//!   removes the directory.
//! - **A dedicated cluster** ([`dedicated`]) for a test that stops and
//!   restarts PostgreSQL (which would break the other tests of the process
//!   on the shared one): started the same way, with [`Dedicated::stop`]
//!   and [`Dedicated::start`] (same port, same data; commits are written
//!   out before they are acknowledged, so an immediate stop loses none of
//!   them, as on a real server); stopped and removed
//!   when dropped, and by its own watchdog after the process.
//! - **No PostgreSQL:** the tests that need it print a loud message and
//!   skip, unless `CI` is set, where that is a failure.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// The running cluster of this test process.
#[derive(Debug)]
pub struct Cluster {
    /// Loopback port it listens on.
    pub port: u16,
    /// Temporary directory holding its data, socket and log.
    pub dir: PathBuf,
}

/// The one user of the test cluster that must give its password.
pub const PASSWORD_USER: &str = "authswap_pw";
/// Its password.
pub const PASSWORD: &str = "pw-Secret-42";

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// The directory holding `initdb` and `pg_ctl`, if PostgreSQL is installed.
pub fn find_bin_dir() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                return Some(dir);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// `program args…`, as the `postgres` user when we are root.
fn pg_command(bin: &Path, program: &str, as_postgres: bool) -> Command {
    let exe = bin.join(program);
    if as_postgres {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(exe);
        cmd
    } else {
        Command::new(exe)
    }
}

fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn start() -> Result<Cluster, String> {
    start_new(false).map(|d| d.cluster)
}

/// A started cluster and what it takes to stop and start it again.
struct Started {
    cluster: Cluster,
    bin: PathBuf,
    as_postgres: bool,
    options: String,
}

/// `durable`: commits are written out before they are acknowledged
/// (`synchronous_commit=on`), so a stop with `-m immediate` loses none of
/// them (`fsync` stays off: the machine itself does not crash).
fn start_new(durable: bool) -> Result<Started, String> {
    let bin = find_bin_dir().ok_or_else(|| {
        "PostgreSQL not found (initdb on PATH or in /usr/lib/postgresql/*/bin); \
         install Debian's `postgresql` package"
            .to_owned()
    })?;
    let as_postgres = running_as_root();
    if as_postgres
        && !Command::new("id")
            .args(["-u", "postgres"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    {
        run(
            Command::new("useradd").args(["--system", "--no-create-home", "postgres"]),
            "useradd postgres",
        )?;
    }
    // Kept on disk on purpose: the watchdog removes it after the process.
    let dir = tempfile::Builder::new()
        .prefix("authswap-pg-")
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))?
        .keep();
    let data = dir.join("data");
    // TLS with the test PKI's `localhost`/`127.0.0.1` certificate, for
    // `sslmode=verify-full` tests; plain connections work too.
    let (cert, key) = super::pki().write_server_cert_files(&dir);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("key mode: {e}"))?;
    }
    if as_postgres {
        run(
            Command::new("chown").arg("-R").arg("postgres:").arg(&dir),
            "chown",
        )?;
    }
    run(
        pg_command(&bin, "initdb", as_postgres)
            .args([
                "-A",
                "trust",
                "-U",
                "authswap",
                "-E",
                "UTF8",
                "--locale=C",
                "-N",
                "-D",
            ])
            .arg(&data),
        "initdb",
    )?;
    // Every user is trusted, except PASSWORD_USER over TCP, whose password
    // is checked (SCRAM): for the tests of `store.password_file`.
    let hba = data.join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).map_err(|e| format!("pg_hba.conf: {e}"))?;
    std::fs::write(
        &hba,
        format!("host all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\n{rules}"),
    )
    .map_err(|e| format!("pg_hba.conf: {e}"))?;
    let mut last = String::new();
    for _ in 0..3 {
        let port = free_port();
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c fsync=off \
             -c synchronous_commit={} -c full_page_writes=off -c max_connections=300 \
             -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
            dir.display(),
            if durable { "on" } else { "off" },
            cert.display(),
            key.display(),
        );
        match pg_ctl_start(&bin, as_postgres, &dir, &options) {
            Ok(()) => {
                watchdog(&bin, &dir, as_postgres);
                return Ok(Started {
                    cluster: Cluster { port, dir },
                    bin,
                    as_postgres,
                    options,
                });
            }
            Err(e) => {
                let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
                last = format!("{e}\n{log}");
            }
        }
    }
    Err(last)
}

fn pg_ctl_start(bin: &Path, as_postgres: bool, dir: &Path, options: &str) -> Result<(), String> {
    run(
        pg_command(bin, "pg_ctl", as_postgres)
            .arg("-D")
            .arg(dir.join("data"))
            .arg("-l")
            .arg(dir.join("log"))
            .args(["-w", "-t", "60", "-o", options, "start"]),
        "pg_ctl start",
    )
}

/// Stops the cluster and removes its directory once this process is gone.
fn watchdog(bin: &Path, dir: &Path, as_postgres: bool) {
    let pg_ctl = bin.join("pg_ctl");
    let stop = if as_postgres {
        format!("runuser -u postgres -- '{}'", pg_ctl.display())
    } else {
        format!("'{}'", pg_ctl.display())
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.2; done; \
         {stop} -D '{dir}/data' stop -m immediate >/dev/null 2>&1; rm -rf '{dir}'",
        pid = std::process::id(),
        dir = dir.display(),
    );
    // Started in the background of a shell that exits at once (waited
    // for here), so the watchdog outlives this process.
    let status = Command::new("sh")
        .args(["-c", &format!("( {script} ) &")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("start the PostgreSQL watchdog");
    assert!(status.success(), "the PostgreSQL watchdog did not start");
}

/// The cluster of this process, started on first use; `None` (after a loud
/// message) when PostgreSQL is not installed and `CI` is not set.
pub fn cluster() -> Option<&'static Cluster> {
    or_skip(CLUSTER.get_or_init(start).as_ref().map_err(Clone::clone))
}

fn or_skip<T>(started: Result<T, String>) -> Option<T> {
    match started {
        Ok(c) => Some(c),
        Err(e) => {
            if std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false") {
                panic!("CI is set and the test PostgreSQL cannot start: {e}");
            }
            eprintln!(
                "\n!!!!!!!!!! SKIPPING a PostgreSQL test: {e}\n\
                 !!!!!!!!!! (set CI=true to make this a failure)\n"
            );
            None
        }
    }
}

/// The URL of a fresh, empty database on the test cluster (user
/// `authswap`, no password, no TLS), or `None` when the tests skip
/// PostgreSQL (see [`cluster`]).
pub async fn database() -> Option<String> {
    fresh_database("authswap").await
}

/// Like [`database`], but owned by [`PASSWORD_USER`], who must log in with
/// [`PASSWORD`] (not in the returned URL).
pub async fn database_with_password() -> Option<String> {
    fresh_database(PASSWORD_USER).await
}

async fn fresh_database(owner: &str) -> Option<String> {
    use sqlx::Connection as _;
    let cluster = tokio::task::spawn_blocking(cluster).await.expect("join")?;
    let name = format!(
        "t{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::Relaxed)
    );
    let admin = format!(
        "postgres://authswap@127.0.0.1:{}/postgres?sslmode=disable",
        cluster.port
    );
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .expect("connect to the test cluster");
    if owner == PASSWORD_USER {
        sqlx::query(&format!(
            "DO $$ BEGIN CREATE ROLE {PASSWORD_USER} LOGIN PASSWORD '{PASSWORD}'; \
             EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        ))
        .execute(&mut conn)
        .await
        .expect("create the password user");
    }
    sqlx::query(&format!("CREATE DATABASE {name} OWNER {owner}"))
        .execute(&mut conn)
        .await
        .expect("create a test database");
    conn.close().await.ok();
    Some(format!(
        "postgres://{owner}@127.0.0.1:{}/{name}?sslmode=disable",
        cluster.port
    ))
}

/// A cluster of one test's own, which the test may stop and start again
/// ([`dedicated`]).
#[derive(Debug)]
pub struct Dedicated {
    /// Loopback port it listens on (the same after a restart).
    pub port: u16,
    /// Temporary directory holding its data, socket and log.
    pub dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    options: String,
}

/// Starts a cluster for the calling test alone; `None` (after a loud
/// message) when PostgreSQL is not installed and `CI` is not set.
pub async fn dedicated() -> Option<Dedicated> {
    let started = tokio::task::spawn_blocking(|| start_new(true))
        .await
        .expect("join");
    or_skip(started).map(|s| Dedicated {
        port: s.cluster.port,
        dir: s.cluster.dir,
        bin: s.bin,
        as_postgres: s.as_postgres,
        options: s.options,
    })
}

impl Dedicated {
    /// Creates database `name` (owned by `authswap`) and returns its URL
    /// (no password, no TLS).
    pub async fn database(&self, name: &str) -> String {
        use sqlx::Connection as _;
        let admin = format!(
            "postgres://authswap@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        );
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .expect("connect to the dedicated cluster");
        sqlx::query(&format!("CREATE DATABASE {name} OWNER authswap"))
            .execute(&mut conn)
            .await
            .expect("create a test database");
        conn.close().await.ok();
        format!(
            "postgres://authswap@127.0.0.1:{}/{name}?sslmode=disable",
            self.port
        )
    }

    /// Stops PostgreSQL at once (`pg_ctl stop -m immediate`: connections
    /// are cut as in a crash; the data stays for [`Dedicated::start`]).
    pub async fn stop(&self) {
        let (bin, as_postgres, data) = (self.bin.clone(), self.as_postgres, self.dir.join("data"));
        tokio::task::spawn_blocking(move || {
            run(
                pg_command(&bin, "pg_ctl", as_postgres)
                    .arg("-D")
                    .arg(&data)
                    .args(["-w", "-t", "60", "stop", "-m", "immediate"]),
                "pg_ctl stop",
            )
        })
        .await
        .expect("join")
        .expect("PostgreSQL stops");
    }

    /// Starts it again, on the same port with the same data.
    pub async fn start(&self) {
        let (bin, as_postgres, dir, options) = (
            self.bin.clone(),
            self.as_postgres,
            self.dir.clone(),
            self.options.clone(),
        );
        tokio::task::spawn_blocking(move || pg_ctl_start(&bin, as_postgres, &dir, &options))
            .await
            .expect("join")
            .expect("PostgreSQL starts again");
    }
}

impl Drop for Dedicated {
    fn drop(&mut self) {
        // Already stopped is fine; the watchdog removes what is left.
        let _ = pg_command(&self.bin, "pg_ctl", self.as_postgres)
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["stop", "-m", "immediate"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
