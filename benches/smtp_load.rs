//! SMTP relay throughput (issue 4, benchmark 2): messages/s and MB/s for
//! 20 KB and 5 MB messages over 1 and 8 connections, sent (D) straight to
//! the SMTP upstream double with STARTTLS + XOAUTH2 and (A) through the real
//! `authswap` binary with AUTH PLAIN, in one run, with the ratio
//! authswap/direct (target ≥ 0.8). A third path (R) goes through a minimal
//! relay that splices the same way and checks nothing: the floor cost of an
//! extra user-space hop, to tell authswap's own overhead from the hop's.
//!
//! All paths use the same small raw-socket tokio client: after login, a
//! bounded loop of pipelined MAIL FROM + RCPT TO + DATA, the pre-generated
//! dot-stuffed message and `.`, each reply read and checked. Connections
//! are logged in before the clock starts; each cell is measured in the
//! order D A R R A D D A R R A D to balance drift on a noisy shared machine.
//! Results: `target/bench-results/smtp_load.md`.
//!
//! Run: `cargo bench --bench smtp_load` (about 1.5 minutes); `cargo test
//! --bench smtp_load` runs a few-second smoke version. For profiling,
//! `SMTP_LOAD_CELLS=20000x1` keeps only the given cells (size x connections)
//! and `SMTP_LOAD_SECS=20` lengthens the measurement per path per cell.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use base64::Engine as _;
use common::{cpu_time, machine_busy, quick_mode, ratio, Authswap, Latencies, Table};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::harness::Env;
use support::mail::{dot_stuff, xoauth2_blob, FakeSmtp, SmtpOptions};
use support::pki;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const NAME: &str = "bench";
const MAILBOX: &str = "bench@contoso.test";
const PASSWORD: &str = "bench-password-1";
const RCPT: &str = "rcpt@example.com";
/// Message sizes (bytes before dot-stuffing; 1 MB = 10^6 bytes).
const SIZES: [usize; 2] = [20_000, 5_000_000];
/// Measured time per path per cell (split over four slots per path).
const PER_PATH: Duration = Duration::from_secs(3);
/// `SMTP_LOAD_SECS` (for profiling): measured seconds per path per cell.
fn per_path() -> Duration {
    std::env::var("SMTP_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0 && *s <= 600.0)
        .map_or(PER_PATH, Duration::from_secs_f64)
}

/// `SMTP_LOAD_CELLS` (for profiling): only these cells, e.g. `20000x1,5000000x8`.
fn selected(size: usize, conns: usize) -> bool {
    std::env::var("SMTP_LOAD_CELLS").map_or(true, |v| {
        v.split(',').any(|c| c.trim() == format!("{size}x{conns}"))
    })
}

/// Per connection per slot: at most this many messages of `size`.
fn cap(size: usize) -> usize {
    match (quick_mode(), size >= 1_000_000) {
        (true, true) => 1,
        (true, false) => 50,
        (false, true) => 10, // 40 per connection per cell over four slots
        (false, false) => 1_000_000,
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A minimal SMTP client session.
struct Client {
    s: BufReader<Box<dyn Io>>,
    line: Vec<u8>,
}

impl Client {
    fn new(io: Box<dyn Io>) -> Client {
        Client {
            s: BufReader::with_capacity(16 * 1024, io),
            line: Vec::with_capacity(256),
        }
    }

    async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        let w = self.s.get_mut();
        w.write_all(data).await?;
        w.flush().await
    }

    /// Reads one (possibly multi-line) reply: code and its text lines.
    async fn reply(&mut self) -> io::Result<(u16, Vec<String>)> {
        let mut lines = Vec::new();
        loop {
            self.line.clear();
            if self.s.read_until(b'\n', &mut self.line).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let l = String::from_utf8_lossy(&self.line);
            let l = l.trim_end();
            let code = l
                .get(..3)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| io::Error::other(format!("malformed reply {l:?}")))?;
            lines.push(l.get(4..).unwrap_or("").to_owned());
            if l.as_bytes().get(3) != Some(&b'-') {
                return Ok((code, lines));
            }
        }
    }

    async fn expect(&mut self, code: u16, after: &str) -> Vec<String> {
        let (got, lines) = self
            .reply()
            .await
            .unwrap_or_else(|e| panic!("reading the reply to {after}: {e}"));
        assert_eq!(got, code, "reply to {after}: {got} {lines:?}");
        lines
    }

    /// One pipelined transaction; `body` is dot-stuffed with its final `.`.
    async fn transaction(&mut self, body: &[u8]) {
        let cmds = format!("MAIL FROM:<{MAILBOX}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n");
        self.send(cmds.as_bytes())
            .await
            .expect("send MAIL/RCPT/DATA");
        self.expect(250, "MAIL FROM").await;
        self.expect(250, "RCPT TO").await;
        self.expect(354, "DATA").await;
        self.send(body).await.expect("send message");
        let done = self.expect(250, "end of data").await;
        assert!(
            done[0].contains("FAKE0001"),
            "accepted by the double: {done:?}"
        );
    }

    async fn quit(mut self) {
        if self.send(b"QUIT\r\n").await.is_ok() {
            let _ = self.reply().await;
        }
    }
}

fn has_keyword(ehlo: &[String], kw: &str) -> bool {
    ehlo.iter().any(|l| {
        l.split_whitespace()
            .next()
            .is_some_and(|k| k.eq_ignore_ascii_case(kw))
    })
}

async fn tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s
}

/// Which way a session goes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    /// To the double: STARTTLS, AUTH XOAUTH2 with a seeded token.
    Direct,
    /// To authswap over plain loopback: AUTH PLAIN with the local password.
    Authswap,
    /// To the minimal relay (see [`relay`]) over plain loopback.
    Relay,
}

impl Path {
    const ALL: [Path; 3] = [Path::Direct, Path::Authswap, Path::Relay];

    fn index(self) -> usize {
        self as usize
    }

    fn letter(self) -> &'static str {
        match self {
            Path::Direct => "D",
            Path::Authswap => "A",
            Path::Relay => "R",
        }
    }
}

#[derive(Clone)]
struct Target {
    direct: SocketAddr,
    authswap: SocketAddr,
    relay: SocketAddr,
    token: Arc<String>,
    tls: tokio_rustls::TlsConnector,
}

impl Target {
    /// Connects and logs in; the session is ready for MAIL.
    async fn login(&self, path: Path) -> Client {
        match path {
            Path::Direct => {
                let mut c = Client::new(Box::new(tcp(self.direct).await));
                c.expect(220, "connect").await;
                c.send(b"EHLO bench.local\r\n").await.expect("EHLO");
                c.expect(250, "EHLO").await;
                c.send(b"STARTTLS\r\n").await.expect("STARTTLS");
                c.expect(220, "STARTTLS").await;
                assert!(c.s.buffer().is_empty(), "nothing after 220 to STARTTLS");
                let plain = c.s.into_inner();
                let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
                let tls = self.tls.connect(name, plain).await.expect("TLS handshake");
                let mut c = Client::new(Box::new(tls));
                c.send(b"EHLO bench.local\r\n").await.expect("EHLO");
                let ehlo = c.expect(250, "EHLO after TLS").await;
                assert!(has_keyword(&ehlo, "PIPELINING"), "{ehlo:?}");
                let auth = format!("AUTH XOAUTH2 {}\r\n", xoauth2_blob(MAILBOX, &self.token));
                c.send(auth.as_bytes()).await.expect("AUTH");
                c.expect(235, "AUTH XOAUTH2").await;
                c
            }
            Path::Authswap | Path::Relay => {
                let addr = if path == Path::Relay {
                    self.relay
                } else {
                    self.authswap
                };
                let mut c = Client::new(Box::new(tcp(addr).await));
                c.expect(220, "connect").await;
                c.send(b"EHLO bench.local\r\n").await.expect("EHLO");
                let ehlo = c.expect(250, "EHLO").await;
                assert!(has_keyword(&ehlo, "PIPELINING"), "{ehlo:?}");
                let plain = base64::engine::general_purpose::STANDARD
                    .encode(format!("\0{NAME}\0{PASSWORD}"));
                c.send(format!("AUTH PLAIN {plain}\r\n").as_bytes())
                    .await
                    .expect("AUTH");
                c.expect(235, "AUTH PLAIN").await;
                c
            }
        }
    }
}

/// A minimal relay, the floor cost of a user-space hop: it does what
/// authswap does around a session with none of its checks (no password,
/// token engine, metrics or logs). Greets, answers EHLO and any AUTH itself,
/// logs in upstream (STARTTLS, XOAUTH2 with the seeded token), answers
/// `235`, then copies both ways with 16 KiB buffers like authswap's splice.
/// Runs on its own runtime (`handle`), as another process would.
fn relay(handle: &tokio::runtime::Handle, upstream: Target) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind relay");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("relay addr");
    handle.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("relay listener");
        while let Ok((client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                client.set_nodelay(true)?;
                let mut c = BufReader::new(client);
                let mut line = Vec::new();
                c.get_mut().write_all(b"220 relay ESMTP\r\n").await?;
                loop {
                    line.clear();
                    if c.read_until(b'\n', &mut line).await? == 0 {
                        return Ok::<_, io::Error>(());
                    }
                    if line.starts_with(b"EHLO") {
                        let ehlo = b"250-relay\r\n250-PIPELINING\r\n250 AUTH PLAIN\r\n";
                        c.get_mut().write_all(ehlo).await?;
                    } else if line.starts_with(b"AUTH") {
                        break;
                    } else {
                        c.get_mut().write_all(b"500 relay: EHLO, AUTH\r\n").await?;
                    }
                }
                let up = upstream.login(Path::Direct).await;
                assert!(up.s.buffer().is_empty() && c.buffer().is_empty());
                let mut up = up.s.into_inner();
                let mut c = c.into_inner();
                c.write_all(b"235 2.7.0 relay ok\r\n").await?;
                tokio::io::copy_bidirectional_with_sizes(&mut c, &mut up, 16 * 1024, 16 * 1024)
                    .await?;
                Ok(())
            });
        }
    });
    addr
}

/// A message of exactly `size` bytes: headers, then 76-character lines of
/// base64-like text (CRLF), every 40th starting with `.`. Returned
/// dot-stuffed, with the terminating `.` line.
fn message(size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: Bench <{MAILBOX}>\r\nTo: <{RCPT}>\r\nSubject: smtp_load {size}\r\n\
         Message-ID: <smtp-load-{size}@bench.local>\r\nMIME-Version: 1.0\r\n\
         Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    )
    .into_bytes();
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut x: u32 = 0x9E37_79B9;
    let mut n = 0usize;
    while m.len() < size {
        // Full 78-byte lines; the last one takes what is left (at least 3).
        let room = size - m.len();
        let len = match room {
            0..=78 => room,
            79..=80 => room - 3,
            _ => 78,
        };
        let mut line: Vec<u8> = (0..len.saturating_sub(2))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                ALPHABET[(x % 64) as usize]
            })
            .collect();
        if n % 40 == 39 && !line.is_empty() {
            line[0] = b'.';
        }
        line.extend_from_slice(&b"\r\n"[..len.min(2)]);
        m.extend_from_slice(&line);
        n += 1;
    }
    assert_eq!(m.len(), size);
    assert!(m.ends_with(b"\r\n"));
    dot_stuff(&m)
}

/// What one slot measured.
#[derive(Default)]
struct Run {
    messages: u64,
    bytes: u64,
    wall: Duration,
    authswap_cpu: Duration,
    bench_cpu: Duration,
    /// Machine CPU time not used by authswap or this process.
    other_cpu: Duration,
    latencies: Latencies,
}

impl Run {
    fn add(&mut self, other: Run) {
        self.messages += other.messages;
        self.bytes += other.bytes;
        self.wall += other.wall;
        self.authswap_cpu += other.authswap_cpu;
        self.bench_cpu += other.bench_cpu;
        self.other_cpu += other.other_cpu;
        self.latencies.add(&other.latencies);
    }

    fn msgs_per_s(&self) -> f64 {
        self.messages as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.wall.as_secs_f64().max(1e-9)
    }
}

/// Logs in `conns` sessions, then sends for `time` (bounded by `cap`
/// messages per connection); wall time runs to the last reply.
#[allow(clippy::too_many_arguments)]
async fn measure(
    target: &Target,
    path: Path,
    conns: usize,
    size: usize,
    body: &Arc<Vec<u8>>,
    time: Duration,
    authswap_pid: u32,
    logins: &mut Latencies,
) -> Run {
    let mut clients = Vec::with_capacity(conns);
    for _ in 0..conns {
        let t = Instant::now();
        clients.push(target.login(path).await);
        logins.record(t.elapsed());
    }
    let (cpu_a, cpu_b) = (cpu_time(authswap_pid), cpu_time(std::process::id()));
    let busy = machine_busy();
    let start = Instant::now();
    let deadline = start + time;
    let limit = cap(size);
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            let body = body.clone();
            tokio::spawn(async move {
                let mut lat = Latencies::default();
                let mut n = 0u64;
                while (n as usize) < limit && Instant::now() < deadline {
                    let t = Instant::now();
                    c.transaction(&body).await;
                    lat.record(t.elapsed());
                    n += 1;
                }
                let end = Instant::now();
                c.quit().await;
                (n, lat, end)
            })
        })
        .collect();
    let mut run = Run::default();
    let mut last = start;
    for t in tasks {
        let (n, lat, end) = t.await.expect("client task");
        run.messages += n;
        run.latencies.add(&lat);
        last = last.max(end);
    }
    run.bytes = run.messages * size as u64;
    run.wall = last - start;
    run.authswap_cpu = cpu_time(authswap_pid).saturating_sub(cpu_a);
    run.bench_cpu = cpu_time(std::process::id()).saturating_sub(cpu_b);
    run.other_cpu = machine_busy()
        .saturating_sub(busy)
        .saturating_sub(run.authswap_cpu + run.bench_cpu);
    run
}

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

fn human(size: usize) -> String {
    if size >= 1_000_000 {
        format!("{} MB", size / 1_000_000)
    } else {
        format!("{} KB", size / 1000)
    }
}

fn cpu_pct(cpu: Duration, wall: Duration) -> String {
    format!(
        "{:.0}%",
        100.0 * cpu.as_secs_f64() / wall.as_secs_f64().max(1e-9)
    )
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} × {cpu}")
}

async fn run(env: &Env, smtp: Arc<FakeSmtp>, relay_rt: &tokio::runtime::Handle) {
    let disabled = "[smtp]\nenabled = false\nlisten = \"127.0.0.1:0\"\n";
    let base = env.config_toml();
    assert!(base.contains(disabled), "harness [smtp] section changed");
    let config = base.replace(
        disabled,
        &format!(
            // Throughput of the relay itself: no per-identity shaping
            // (its defaults would hold 8 sessions of one mailbox to 3
            // and 30 messages a minute).
            "[smtp]\nenabled = true\nlisten = \"127.0.0.1:0\"\nupstream = \"localhost:{}\"\nupstream_tls = \"starttls\"\nmax_sessions_per_identity = 0\nmessages_per_minute = 0\n",
            smtp.port()
        ),
    );
    let config_path = env.dir.path().join("smtp-load.toml");
    std::fs::write(&config_path, config).expect("write config");
    let authswap = Authswap::start(&config_path).await;
    let authswap_pid = authswap.child.id().expect("authswap pid");
    let mut target = Target {
        direct: smtp.addr(),
        authswap: authswap.addr("smtp"),
        relay: smtp.addr(),
        token: Arc::new(env.idp.seed_access_token(MAILBOX)),
        tls: tokio_rustls::TlsConnector::from(pki().client_config_no_alpn()),
    };
    target.relay = relay(relay_rt, target.clone());

    // The double keeps every message (5 MB ones twice): forget them often.
    let reaper = {
        let smtp = smtp.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                smtp.clear_messages();
            }
        })
    };

    // Warm up every path (token fetch, credential cache, extension probe).
    let warm = Arc::new(message(SIZES[0]));
    for path in Path::ALL {
        let mut c = target.login(path).await;
        for _ in 0..3 {
            c.transaction(&warm).await;
        }
        c.quit().await;
    }

    let conn_counts: &[usize] = if quick_mode() { &[1, 2] } else { &[1, 8] };
    let slot = common::duration(per_path() / 4);
    // Each path gets the same number of slots; mirrored rounds balance drift.
    let order: Vec<Path> = if quick_mode() {
        Path::ALL.to_vec()
    } else {
        let round: Vec<Path> = Path::ALL
            .iter()
            .chain(Path::ALL.iter().rev())
            .copied()
            .collect();
        round.iter().chain(round.iter()).copied().collect()
    };
    let slots_per_path = (order.len() / Path::ALL.len()) as u32;

    let mut table = Table::new(
        "smtp_load",
        &[
            "message",
            "conns",
            "direct msg/s",
            "direct MB/s",
            "authswap msg/s",
            "authswap MB/s",
            "ratio",
            "relay msg/s",
            "authswap/relay",
            "p50/p99 ms direct",
            "authswap",
            "relay",
            "CPU direct: bench",
            "CPU authswap: bench + authswap",
        ],
    );
    let mut logins: [Latencies; 3] = Default::default();
    let mut below_target = Vec::new();
    let mut background: f64 = 0.0;
    for &size in &SIZES {
        let body = Arc::new(message(size));
        for &conns in conn_counts {
            if !selected(size, conns) {
                continue;
            }
            let mut runs: [Run; 3] = Default::default();
            for &path in &order {
                smtp.clear_messages();
                let r = measure(
                    &target,
                    path,
                    conns,
                    size,
                    &body,
                    slot,
                    authswap_pid,
                    &mut logins[path.index()],
                )
                .await;
                assert!(r.messages > 0, "{path:?} sent nothing");
                runs[path.index()].add(r);
            }
            let [direct, via, floor] = &runs;
            let q = |r: &Run| {
                format!(
                    "{} / {}",
                    ms(r.latencies.quantile_us(0.5)),
                    ms(r.latencies.quantile_us(0.99))
                )
            };
            for run in &runs {
                let share = run.other_cpu.as_secs_f64() / run.wall.as_secs_f64().max(1e-9);
                background = background.max(share);
            }
            let r = via.msgs_per_s() / direct.msgs_per_s();
            if r < 0.8 {
                below_target.push(format!("{} × {conns}: {r:.2}", human(size)));
            }
            table.row(vec![
                human(size),
                conns.to_string(),
                format!("{:.0}", direct.msgs_per_s()),
                format!("{:.1}", direct.mb_per_s()),
                format!("{:.0}", via.msgs_per_s()),
                format!("{:.1}", via.mb_per_s()),
                ratio(via.msgs_per_s(), direct.msgs_per_s()),
                format!("{:.0}", floor.msgs_per_s()),
                ratio(via.msgs_per_s(), floor.msgs_per_s()),
                q(direct),
                q(via),
                q(floor),
                cpu_pct(direct.bench_cpu, direct.wall),
                format!(
                    "{} + {}",
                    cpu_pct(via.bench_cpu, via.wall),
                    cpu_pct(via.authswap_cpu, via.wall)
                ),
            ]);
        }
    }
    reaper.abort();
    smtp.clear_messages();

    // Every upstream login was XOAUTH2 over TLS; no Basic auth reached it.
    let stats = smtp.stats();
    assert_eq!(stats.non_xoauth2_auth_attempts, 0);
    assert_eq!(stats.auth_without_tls, 0);
    assert_eq!(stats.auth_failures, 0);
    let sessions: u64 = logins.iter().map(Latencies::count).sum();
    assert!(
        stats.auth_successes as u64 >= sessions,
        "every session logged in"
    );

    table.note(format!(
        "Machine: {}, shared by the load generator, the doubles, the minimal relay (this \
         process, on three separate tokio runtimes) and authswap (the real binary, its own \
         process). {} build. Each cell: {:?} per path, as {} slot(s) of {:?} in the order {}; \
         sessions log in before the clock starts; a slot ends at its last reply. 5 MB \
         messages: at most {} per connection per slot.",
        machine(),
        if quick_mode() {
            "Debug (quick mode)"
        } else {
            "Release"
        },
        slot * slots_per_path,
        slots_per_path,
        slot,
        order.iter().map(|p| p.letter()).collect::<String>(),
        cap(SIZES[1]),
    ));
    table.note(
        "Legs: D (direct) = client → double with STARTTLS (TLS 1.3) and AUTH XOAUTH2. \
         A (authswap) = client → authswap over **plain TCP on loopback** (AUTH PLAIN), then \
         authswap → the same double with STARTTLS (TLS 1.3) and AUTH XOAUTH2. R (relay) = the \
         same legs through a minimal relay that checks nothing and splices like authswap (16 KiB \
         buffers): the floor cost of an extra user-space hop on this machine. On A and R the \
         client no longer encrypts; the proxy does, and one more loopback hop is added.",
    );
    table.note(
        "Per transaction: pipelined MAIL FROM + RCPT TO + DATA, wait for 250/250/354, send the \
         dot-stuffed message (76-character base64-like lines, every 40th starting with `.`) and \
         `.`, wait for 250: two round trips. Latency = MAIL FROM sent → final 250. MB = 10^6 \
         bytes of message (before dot-stuffing); ratio = authswap msg/s ÷ direct msg/s (target \
         ≥ 0.80). CPU = user+system time ÷ wall time (100% = one core of two): \"bench\" is this \
         process (client and doubles), \"authswap\" the proxy process.",
    );
    table.note(format!(
        "Session set-up (connect → 235), p50 / p99 ms: direct {} / {} (STARTTLS + XOAUTH2), \
         authswap {} / {} (password from cache + upstream EHLO, STARTTLS, EHLO, XOAUTH2), \
         relay {} / {}.",
        ms(logins[0].quantile_us(0.5)),
        ms(logins[0].quantile_us(0.99)),
        ms(logins[1].quantile_us(0.5)),
        ms(logins[1].quantile_us(0.99)),
        ms(logins[2].quantile_us(0.5)),
        ms(logins[2].quantile_us(0.99)),
    ));
    table.note(format!(
        "Background: the machine's CPU time not used by this process or authswap (other \
         processes, interrupt time) reached at most {:.0}% of a core in a cell{}.",
        100.0 * background,
        if background > 0.15 {
            " — the machine was not quiet, numbers are disturbed"
        } else {
            ""
        }
    ));
    if !below_target.is_empty() {
        table.note(format!(
            "Below the 0.8 target: {}.",
            below_target.join(", ")
        ));
    }
    table.finish();
    authswap.stop().await;
}

fn runtime(name: &str) -> tokio::runtime::Runtime {
    // Explicit worker count, so TOKIO_WORKER_THREADS only affects authswap.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn main() {
    // The doubles (IdP, SMTP upstream), the minimal relay and the load
    // generator each get a runtime, so the direct client and the double
    // never hand a message over inside one worker thread: they would never
    // share a process.
    let doubles = runtime("doubles");
    let relay = runtime("relay");
    let (env, smtp) = doubles.block_on(async {
        let env = Env::start().await;
        let smtp = FakeSmtp::start(env.idp.validator(), SmtpOptions::default()).await;
        env.add_linked(NAME, MAILBOX, PASSWORD).await;
        (env, Arc::new(smtp))
    });
    runtime("load").block_on(run(&env, smtp, relay.handle()));
}
