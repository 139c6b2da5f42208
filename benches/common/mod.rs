//! Shared plumbing for the load benchmarks: quick mode under `cargo test`,
//! latency histograms, markdown result tables, running the real `authswap`
//! binary with a configuration, and reading a process's resident memory.
//! Every load loop in the benchmarks is bounded in count and time; every
//! address is on loopback.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};

/// True under `cargo test` (no `--bench` argument): run a tiny smoke
/// version so the benchmark code is exercised without taking minutes.
pub fn quick_mode() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

/// Scales a measurement duration down in quick mode.
pub fn duration(full: Duration) -> Duration {
    if quick_mode() {
        Duration::from_millis(200)
    } else {
        full
    }
}

/// Latency recorder (microsecond resolution, up to 60 s).
pub struct Latencies(hdrhistogram::Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        Latencies(hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"))
    }
}

impl Latencies {
    /// Records one latency.
    pub fn record(&mut self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, 60_000_000);
        let _ = self.0.record(us);
    }

    /// Merges another recorder.
    pub fn add(&mut self, other: &Latencies) {
        let _ = self.0.add(&other.0);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// Quantile in microseconds.
    pub fn quantile_us(&self, q: f64) -> u64 {
        self.0.value_at_quantile(q)
    }
}

/// A results table printed as markdown and appended to
/// `target/bench-results/<name>.md`.
pub struct Table {
    name: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    notes: Vec<String>,
}

impl Table {
    /// A table with column titles.
    pub fn new(name: &str, header: &[&str]) -> Table {
        Table {
            name: name.to_owned(),
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Adds a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Adds a note under the table.
    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// The table as markdown.
    pub fn markdown(&self) -> String {
        let mut s = format!("| {} |\n", self.header.join(" | "));
        s.push_str(&format!("|{}\n", "---|".repeat(self.header.len())));
        for r in &self.rows {
            s.push_str(&format!("| {} |\n", r.join(" | ")));
        }
        for n in &self.notes {
            s.push_str(&format!("\n{n}\n"));
        }
        s
    }

    /// Prints it and writes it under target/bench-results (not in quick mode).
    pub fn finish(&self) {
        let md = self.markdown();
        println!("\n## {}\n\n{md}", self.name);
        if quick_mode() {
            return;
        }
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-results");
        let _ = std::fs::create_dir_all(&dir);
        if let Ok(mut f) = std::fs::File::create(dir.join(format!("{}.md", self.name))) {
            let _ = writeln!(f, "## {}\n\n{md}", self.name);
        }
    }
}

/// CPU time (user + system) of a process so far, from /proc (Linux).
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the ")".
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10) // USER_HZ = 100
}

/// The machine's idle and total CPU time so far, in clock ticks, from the
/// aggregate line of /proc/stat (idle includes iowait).
pub fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (idle, f.iter().take(8).sum())
}

/// CPU time the whole machine has spent busy so far (all CPUs; user, nice,
/// system, irq, softirq and steal from /proc/stat).
pub fn machine_busy() -> Duration {
    let (idle, total) = machine_ticks();
    Duration::from_millis(total.saturating_sub(idle) * 10) // USER_HZ = 100
}

/// How many times the threads of a process went to sleep waiting (voluntary
/// context switches, summed over its threads, from /proc): its wake-ups.
pub fn sleeps(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("voluntary_ctxt_switches:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Resident set size of a process in KiB (Linux /proc).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A running `authswap serve` child process.
pub struct Authswap {
    /// The child.
    pub child: tokio::process::Child,
    /// The "authswap is serving" log record (addresses of every listener).
    pub serving: serde_json::Value,
    /// Time from spawn to that record.
    pub startup: Duration,
}

impl Authswap {
    /// Starts the real binary (release build under `cargo bench`) with the
    /// configuration file `config`, waiting until it serves.
    pub async fn start(config: &std::path::Path) -> Authswap {
        let started = std::time::Instant::now();
        // AUTHSWAP_BENCH_WRAPPER="valgrind --tool=callgrind" runs the proxy
        // under a profiler (the figures are then meaningless, the profile is not).
        let wrapper = std::env::var("AUTHSWAP_BENCH_WRAPPER").unwrap_or_default();
        let mut argv: Vec<String> = wrapper.split_whitespace().map(str::to_owned).collect();
        argv.push(env!("CARGO_BIN_EXE_authswap").to_owned());
        let mut child = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .arg("-c")
            .arg(config)
            .args(["--log-format", "json", "serve"])
            .env("AUTHSWAP_LOG", "warn,authswap::server=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn authswap");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let serving = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["message"] == "authswap is serving" {
                        return v;
                    }
                }
            }
            panic!("authswap exited before serving");
        })
        .await
        .expect("authswap starts within 60 s");
        let startup = started.elapsed();
        // Keep draining the log so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Authswap {
            child,
            serving,
            startup,
        }
    }

    /// Address of a listener from the serving record (`http`, `smtp`, `admin`, ...).
    pub fn addr(&self, which: &str) -> std::net::SocketAddr {
        self.serving[which]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{which} listener not in {}", self.serving))
    }

    /// The value of one series in the admin listener's `/metrics`
    /// (`name{labels}` exactly as exposed), 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.addr("admin"))
            .await
            .expect("admin listener");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
        let mut text = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut text))
            .await
            .expect("metrics in time")
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Resident memory in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.child.id().and_then(rss_kib).unwrap_or(0)
    }

    /// Stops it with SIGTERM.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = tokio::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// Formats a ratio `a / b` with two decimals.
pub fn ratio(a: f64, b: f64) -> String {
    if b == 0.0 {
        "-".into()
    } else {
        format!("{:.2}", a / b)
    }
}
