//! Footprint (issue #4, benchmark 4): the real `authswap serve` process
//! (release build under `cargo bench`) measured from outside.
//!
//! (a) Resident memory idle, with 0 and with 10,000 linked identities
//!     loaded, read from /proc after the process reports serving and a
//!     short settle.
//! (b) Start-up time to ready: spawn → the admin listener's `/readyz`
//!     answers 200 (polled with small sleeps, bounded), with 10,000
//!     identities compared with 0; the time to the "authswap is serving" log
//!     record is shown too. Median of several starts. A third row uses the
//!     shipped argon2 costs in the configuration (the other rows use the
//!     test harness's cheap ones), which only changes the dummy hash
//!     `Authenticator::new` computes at start-up; a second table times the
//!     start-up steps in-process (store open, list, directory apply,
//!     `App::open`, one shipped-cost argon2 hash).
//! (c) Memory per open mail connection, SMTP and IMAP front ends enabled
//!     against the in-process upstream doubles (STARTTLS SMTP, implicit-TLS
//!     IMAP): idle client connections (greeting read, nothing else) and
//!     logged-in ones (AUTH PLAIN / LOGIN, spliced to the upstream, one NOOP
//!     answered through the splice). One fresh process per kind; the RSS
//!     delta over a warmed-up baseline, divided by the connections.
//!
//! Targets from the issue: < 64 MiB resident with 10,000 identities,
//! < 64 KiB per idle mail connection, start-up < 200 ms.
//!
//! Quick mode (`cargo test --bench footprint`): 100 identities, 20
//! connections per kind. Full: `cargo bench --bench footprint`.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use authswap::app::App;
use authswap::config::{AuthConfig, Config};
use authswap::identity::{hash_password, Directory};
use authswap::secret::Secret;
use authswap::store::{now_unix, open_sealer, KeyUse, SqliteStore, Store};
use base64::Engine as _;
use common::{quick_mode, ratio, Authswap, Table};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{ConnectOptions, Connection};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use support::harness::{sample, Env, HttpClient};
use support::mail::{FakeImap, FakeSmtp, ImapOptions, SmtpOptions};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Password of every seeded identity.
const PASSWORD: &str = "bench-password-1";
/// Identity used for the logged-in mail connections.
const MAIL_USER: &str = "alice";
const MAIL_PASSWORD: &str = "alice-pw-123";
/// Time limit of one client step (connect, one reply).
const STEP: Duration = Duration::from_secs(10);

const TARGET_RSS_KIB: f64 = 64.0 * 1024.0;
const TARGET_IDLE_CONN_KIB: f64 = 64.0;
const TARGET_STARTUP_MS: f64 = 200.0;

fn name(i: usize) -> String {
    format!("user{i:05}")
}

/// Seeds identities `1..=n` (ids = row ids), each linked to a refresh token
/// the identity-platform double accepts, in one transaction written straight
/// into the database (one `create` + `link` each would cost two fsyncs).
/// With `n == 0` the database is only created and migrated.
async fn seed(env: &Env, config: &Config, n: usize) {
    let store = SqliteStore::open(&config.store.path)
        .await
        .expect("open store");
    let sealer = open_sealer(&config.store, &store, KeyUse::Link)
        .await
        .expect("key");
    drop(store);
    if n == 0 {
        return;
    }
    let hash = hash_password(PASSWORD, &config.auth).expect("hash");
    let mut conn = SqliteConnectOptions::new()
        .filename(&config.store.path)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect to the database");
    let now = now_unix();
    let mut tx = conn.begin().await.expect("begin");
    for i in 1..=n {
        let name = name(i);
        let mailbox = format!("{name}@contoso.com");
        let rt = env.idp.seed_refresh_token(&mailbox);
        let sealed = sealer.seal(i as i64, &Secret::new(rt));
        sqlx::query(
            "INSERT INTO identities (id, name, name_key, mailbox, password_hash, refresh_token, \
             key_id, token_generation, status, last_success_at, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, 1, 'linked', ?, ?, ?)",
        )
        .bind(i as i64)
        .bind(&name)
        .bind(&name)
        .bind(&mailbox)
        .bind(&hash)
        .bind(&sealed.blob)
        .bind(&sealed.key_id)
        .bind(now)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await
        .expect("insert identity");
    }
    sqlx::query("UPDATE meta SET v = v + 1 WHERE k = 'revision'")
        .execute(&mut *tx)
        .await
        .expect("bump revision");
    tx.commit().await.expect("commit");
    conn.close().await.expect("close");
}

/// Replaces `from` (which must occur) in `toml`.
fn replace(toml: &str, from: &str, to: &str) -> String {
    assert!(toml.contains(from), "`{from}` not in the harness config");
    toml.replacen(from, to, 1)
}

/// Writes a configuration file named `file` into the environment.
fn write(env: &Env, file: &str, toml: &str) -> PathBuf {
    let path = env.dir.path().join(file);
    std::fs::write(&path, toml).expect("write config");
    path
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("ephemeral port")
        .port()
}

/// Whether `GET /readyz` on `addr` answers 200 (one attempt).
async fn readyz(addr: SocketAddr) -> bool {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: authswap\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut head = Vec::with_capacity(64);
        let mut buf = [0u8; 64];
        while head.len() < 12 {
            let n = s.read(&mut buf).await.ok()?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Some(head.starts_with(b"HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Some(true))
    )
}

/// Polls `/readyz` every 2 ms from `t0` until it answers 200 (≤ 30 s).
async fn time_to_ready(addr: SocketAddr, t0: Instant) -> Option<Duration> {
    let limit = t0 + Duration::from_secs(30);
    while Instant::now() < limit {
        if readyz(addr).await {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

/// Median of a few RSS readings 50 ms apart (KiB).
async fn rss_now(a: &Authswap) -> u64 {
    let mut v = Vec::new();
    for _ in 0..3 {
        v.push(a.rss_kib());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    v.sort_unstable();
    v[1]
}

fn median<T: Copy + Ord>(v: &mut [T]) -> T {
    v.sort_unstable();
    v[v.len() / 2]
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

struct StartStats {
    identities: usize,
    argon2: &'static str,
    serving: Duration,
    ready: Duration,
    ready_min: Duration,
    ready_max: Duration,
    rss_kib: u64,
}

/// The harness's cheap argon2 costs (as in every other configuration here).
const CHEAP_ARGON2: &str =
    "[auth]\nargon2_memory_kib = 256\nargon2_iterations = 1\nargon2_parallelism = 1\n";

/// (a) and (b) for the `n` identities seeded in `env`: `starts` fresh
/// processes with configuration `toml` (its admin listener moved to a known
/// port so `/readyz` can be polled from the moment of the spawn).
async fn idle_and_startup(
    env: &Env,
    n: usize,
    toml: &str,
    argon2: &'static str,
    starts: usize,
    settle: Duration,
) -> StartStats {
    let (mut serving, mut ready, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..starts {
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let toml = replace(
            toml,
            "[admin]\nlisten = \"127.0.0.1:0\"",
            &format!("[admin]\nlisten = \"{admin}\""),
        );
        let path = write(env, "footprint.toml", &toml);
        let t0 = Instant::now();
        let poller = tokio::spawn(time_to_ready(admin, t0));
        let a = Authswap::start(&path).await;
        let r = poller
            .await
            .expect("poller")
            .expect("/readyz answers 200 within 30 s");
        assert_eq!(
            a.serving["identities"].as_u64(),
            Some(n as u64),
            "{}",
            a.serving
        );
        tokio::time::sleep(settle).await;
        serving.push(a.startup);
        ready.push(r);
        rss.push(rss_now(&a).await);
        a.stop().await;
    }
    StartStats {
        identities: n,
        argon2,
        serving: median(&mut serving),
        ready: median(&mut ready),
        ready_min: ready[0],
        ready_max: ready[ready.len() - 1],
        rss_kib: median(&mut rss),
    }
}

/// Start-up steps timed in-process (this binary, same database): median of
/// `rounds` of each.
struct Breakdown {
    store_open: Duration,
    list: Duration,
    apply: Duration,
    app_open: Duration,
    shipped_hash: Duration,
}

async fn breakdown(config: &Config, rounds: usize) -> Breakdown {
    let (mut open, mut list, mut apply, mut app, mut hash) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        let store = SqliteStore::open(&config.store.path)
            .await
            .expect("open store");
        open.push(t.elapsed());
        let t = Instant::now();
        let records = store.list().await.expect("list");
        list.push(t.elapsed());
        drop(store);
        let directory = Directory::default();
        let t = Instant::now();
        let changes = directory.apply(&records);
        apply.push(t.elapsed());
        assert_eq!(changes.replaced.len(), records.len());
        drop((changes, directory, records));
        let t = Instant::now();
        let a = App::open(config.clone()).await.expect("app opens");
        app.push(t.elapsed());
        drop(a);
        // What `Authenticator::new` spends on its dummy hash with the
        // shipped costs (the configurations above use 256 KiB, t=1).
        let t = Instant::now();
        hash_password("dummy-password-for-timing", &AuthConfig::default()).expect("hash");
        hash.push(t.elapsed());
    }
    Breakdown {
        store_open: median(&mut open),
        list: median(&mut list),
        apply: median(&mut apply),
        app_open: median(&mut app),
        shipped_hash: median(&mut hash),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Smtp,
    Imap,
}

/// One client connection toward authswap.
struct Client {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let s = tokio::time::timeout(STEP, TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .expect("connect");
        let (r, w) = s.into_split();
        Client {
            r: BufReader::with_capacity(1024, r),
            w,
        }
    }

    async fn line(&mut self) -> String {
        let mut s = String::new();
        let n = tokio::time::timeout(STEP, self.r.read_line(&mut s))
            .await
            .expect("reply in time")
            .expect("read");
        assert!(n > 0, "connection closed by authswap");
        s
    }

    /// Reads lines until one starts with `prefix` (SMTP multi-line replies,
    /// IMAP untagged lines); returns that line. Bounded to 50 lines.
    async fn until(&mut self, done: impl Fn(&str) -> bool) -> String {
        for _ in 0..50 {
            let l = self.line().await;
            if done(&l) {
                return l;
            }
        }
        panic!("no final reply within 50 lines");
    }

    async fn send(&mut self, s: &[u8]) {
        tokio::time::timeout(STEP, self.w.write_all(s))
            .await
            .expect("send in time")
            .expect("send");
    }

    /// Greeting only: the client then sits idle before authenticating.
    async fn idle(addr: SocketAddr, p: Proto) -> Client {
        let mut c = Client::connect(addr).await;
        let g = c.line().await;
        match p {
            Proto::Smtp => assert!(g.starts_with("220"), "{g}"),
            Proto::Imap => assert!(g.starts_with("* OK"), "{g}"),
        }
        c
    }

    /// Logs in and checks the splice with one NOOP answered by the upstream.
    async fn logged_in(addr: SocketAddr, p: Proto) -> Client {
        let mut c = Client::idle(addr, p).await;
        match p {
            Proto::Smtp => {
                c.send(b"EHLO bench.local\r\n").await;
                let r = c.until(|l| l.len() < 4 || l.as_bytes()[3] != b'-').await;
                assert!(r.starts_with("250"), "{r}");
                let plain = base64::engine::general_purpose::STANDARD
                    .encode(format!("\0{MAIL_USER}\0{MAIL_PASSWORD}"));
                c.send(format!("AUTH PLAIN {plain}\r\n").as_bytes()).await;
                let r = c.line().await;
                assert!(r.starts_with("235"), "{r}");
                c.send(b"NOOP\r\n").await;
                let r = c.line().await;
                assert!(r.starts_with("250"), "{r}");
            }
            Proto::Imap => {
                c.send(format!("a1 LOGIN {MAIL_USER} {MAIL_PASSWORD}\r\n").as_bytes())
                    .await;
                let r = c.until(|l| l.starts_with("a1 ")).await;
                assert!(r.starts_with("a1 OK"), "{r}");
                c.send(b"a2 NOOP\r\n").await;
                let r = c.until(|l| l.starts_with("a2 ")).await;
                assert!(r.starts_with("a2 OK"), "{r}");
            }
        }
        c
    }
}

struct ConnStats {
    proto: Proto,
    logged_in: bool,
    count: usize,
    before_kib: u64,
    after_kib: u64,
    open_gauge: Option<f64>,
}

impl ConnStats {
    fn per_conn_kib(&self) -> f64 {
        (self.after_kib as f64 - self.before_kib as f64) / self.count as f64
    }
}

/// (c) for one kind of connection, in a fresh process.
async fn per_connection(
    config: &std::path::Path,
    proto: Proto,
    logged_in: bool,
    count: usize,
    settle: Duration,
) -> ConnStats {
    let a = Authswap::start(config).await;
    let addr = a.addr(match proto {
        Proto::Smtp => "smtp",
        Proto::Imap => "imap",
    });
    let open = move |logged_in: bool| async move {
        if logged_in {
            Client::logged_in(addr, proto).await
        } else {
            Client::idle(addr, proto).await
        }
    };
    // Warm up: the first connection pays one-time costs (argon2 and the
    // token refresh for a login, lazily built state); keep it open.
    let warm = open(logged_in).await;
    tokio::time::sleep(settle).await;
    let before_kib = rss_now(&a).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut clients = Vec::with_capacity(count);
    for _ in 0..count {
        assert!(
            Instant::now() < deadline,
            "opening connections took too long"
        );
        clients.push(open(logged_in).await);
    }
    tokio::time::sleep(settle).await;
    let after_kib = rss_now(&a).await;
    let metrics = HttpClient::default().get(a.addr("admin"), "/metrics").await;
    let series = format!(
        "authswap_open_connections{{protocol=\"{}\"}}",
        match proto {
            Proto::Smtp => "smtp",
            Proto::Imap => "imap",
        }
    );
    let open_gauge = sample(&metrics.text(), &series);
    drop(clients);
    drop(warm);
    a.stop().await;
    ConnStats {
        proto,
        logged_in,
        count,
        before_kib,
        after_kib,
        open_gauge,
    }
}

fn main() {
    let quick = quick_mode();
    let n = if quick { 100 } else { 10_000 };
    let (idle_conns, login_conns) = if quick { (20, 20) } else { (500, 200) };
    let starts = if quick { 2 } else { 5 };
    let settle = if quick {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(1)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        // (a) + (b)
        let env0 = Env::start().await;
        seed(&env0, &env0.config(), 0).await;
        let cheap = "test: 256 KiB, t=1";
        let empty = idle_and_startup(&env0, 0, &env0.config_toml(), cheap, starts, settle).await;
        drop(env0);
        let env = Env::start().await;
        let config = env.config();
        let seeding = Instant::now();
        seed(&env, &config, n).await;
        println!(
            "seeded {n} identities in {:.2} s",
            seeding.elapsed().as_secs_f64()
        );
        let toml = env.config_toml();
        let loaded = idle_and_startup(&env, n, &toml, cheap, starts, settle).await;
        let shipped_toml = replace(&toml, CHEAP_ARGON2, "[auth]\n");
        let shipped = idle_and_startup(
            &env,
            n,
            &shipped_toml,
            "shipped: 19 MiB, t=2",
            starts,
            settle,
        )
        .await;
        let mut t = Table::new(
            "footprint_idle",
            &[
                "identities",
                "argon2 costs in config",
                "RSS idle (MiB)",
                "target (MiB)",
                "RSS / target",
                "to serving log (ms)",
                "to /readyz 200, median (min–max) (ms)",
                "target (ms)",
                "startup / target",
            ],
        );
        for s in [&empty, &loaded, &shipped] {
            t.row(vec![
                s.identities.to_string(),
                s.argon2.to_string(),
                mib(s.rss_kib),
                format!("{:.0}", TARGET_RSS_KIB / 1024.0),
                ratio(s.rss_kib as f64, TARGET_RSS_KIB),
                ms(s.serving),
                format!(
                    "{} ({}–{})",
                    ms(s.ready),
                    ms(s.ready_min),
                    ms(s.ready_max)
                ),
                format!("{TARGET_STARTUP_MS:.0}"),
                ratio(s.ready.as_secs_f64() * 1e3, TARGET_STARTUP_MS),
            ]);
        }
        t.note(format!(
            "`authswap serve` ({} build) with the HTTP front end and admin listener, mail front ends \
             off; identities linked, seeded straight into SQLite (their password hashes use the test \
             costs in every row; the argon2 costs in the configuration only change the dummy hash \
             computed at start-up). RSS = VmRSS from /proc, median of {starts} starts, read {} ms \
             after the serving log record. Start-up = spawn → first 200 from GET /readyz (polled \
             every 2 ms), median of {starts} starts. Per identity loaded (test costs): {:.2} KiB RSS, \
             {:.1} µs start-up.",
            if quick { "debug" } else { "release" },
            settle.as_millis(),
            (loaded.rss_kib as f64 - empty.rss_kib as f64) / n as f64,
            (loaded.ready.as_secs_f64() - empty.ready.as_secs_f64()) * 1e6 / n as f64,
        ));
        t.finish();

        let b = breakdown(&config, if quick { 1 } else { 3 }).await;
        drop(env);
        let mut t = Table::new(
            "footprint_startup_breakdown",
            &["step (in-process, same database)", "time (ms)"],
        );
        for (step, d) in [
            ("SqliteStore::open (migrations already applied)".to_owned(), b.store_open),
            (format!("Store::list of {n} identities"), b.list),
            (format!("Directory::apply of {n} records (fresh directory)"), b.apply),
            (format!("App::open with {n} identities (test argon2 costs)"), b.app_open),
            ("one argon2id hash at the shipped costs (Authenticator::new's dummy hash)".to_owned(), b.shipped_hash),
        ] {
            t.row(vec![step, ms(d)]);
        }
        t.note(format!(
            "Timed inside the benchmark process ({} build), median of {} rounds.",
            if quick { "debug" } else { "release" },
            if quick { 1 } else { 3 }
        ));
        t.finish();

        // (c)
        let env = Env::start().await;
        env.add_linked(MAIL_USER, &format!("{MAIL_USER}@contoso.com"), MAIL_PASSWORD)
            .await;
        let v = env.idp.validator();
        let smtp = FakeSmtp::start(v.clone(), SmtpOptions::default()).await;
        let imap = FakeImap::start(v, ImapOptions::default()).await;
        let mut toml = env.config_toml();
        toml = replace(
            &toml,
            "[smtp]\nenabled = false\n",
            &format!(
                // Many sessions of one identity: no per-identity shaping.
                "[smtp]\nenabled = true\nupstream = \"localhost:{}\"\nupstream_tls = \"starttls\"\n\
                 max_connections = 2048\nmax_sessions_per_identity = 0\n",
                smtp.port()
            ),
        );
        toml = replace(
            &toml,
            "[imap]\nenabled = false\n",
            &format!(
                "[imap]\nenabled = true\nupstream = \"localhost:{}\"\nupstream_tls = \"implicit\"\n\
                 max_connections = 2048\n",
                imap.port()
            ),
        );
        let config = write(&env, "footprint-mail.toml", &toml);
        let mut results = Vec::new();
        for (proto, logged_in, count) in [
            (Proto::Smtp, false, idle_conns),
            (Proto::Imap, false, idle_conns),
            (Proto::Smtp, true, login_conns),
            (Proto::Imap, true, login_conns),
        ] {
            let s = per_connection(&config, proto, logged_in, count, settle).await;
            assert_eq!(
                s.open_gauge,
                Some((count + 1) as f64),
                "authswap counts every connection as open ({proto:?}, logged in: {logged_in})"
            );
            results.push(s);
        }
        let mut t = Table::new(
            "footprint_connections",
            &[
                "front end",
                "state",
                "connections",
                "RSS before (MiB)",
                "RSS after (MiB)",
                "per connection (KiB)",
                "target (KiB)",
                "per conn / target",
            ],
        );
        for s in &results {
            t.row(vec![
                format!("{:?}", s.proto).to_uppercase(),
                if s.logged_in {
                    "logged in (spliced)".into()
                } else {
                    "idle (greeting read)".into()
                },
                s.count.to_string(),
                mib(s.before_kib),
                mib(s.after_kib),
                format!("{:.1}", s.per_conn_kib()),
                if s.logged_in {
                    "-".into()
                } else {
                    format!("{TARGET_IDLE_CONN_KIB:.0}")
                },
                if s.logged_in {
                    "-".into()
                } else {
                    ratio(s.per_conn_kib(), TARGET_IDLE_CONN_KIB)
                },
            ]);
        }
        t.note(format!(
            "One fresh `authswap serve` per row (SMTP and IMAP front ends on; upstreams: in-process \
             doubles, STARTTLS SMTP and implicit-TLS IMAP on loopback). Baseline after one warm-up \
             connection of the same kind (kept open); then the connections are opened one by one and \
             kept open; RSS read {} ms later. Logged in = AUTH PLAIN (SMTP) / LOGIN (IMAP) accepted, \
             spliced to an upstream TLS session, one NOOP answered through the splice. The delta is \
             user-space memory only (socket buffers are kernel memory, not in RSS). The issue's \
             target applies to idle connections.",
            settle.as_millis()
        ));
        t.finish();
        drop((smtp, imap));
    });
}
