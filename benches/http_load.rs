//! HTTP overhead, side by side in one run: the same minimal hyper origin
//! (plain HTTP and TLS) reached (a) directly with a Bearer token, (b) through
//! authswap with Basic credentials, (c) through nginx injecting a static
//! `Authorization: Bearer` header, and two bare hyper proxies that show
//! what a hyper-based proxy costs at the least: hyper-naive (the pooled
//! client authswap's hyper path uses) and hyper-affinity (one upstream
//! connection per client connection, in the same task). authswap serves
//! these requests on its native HTTP/1.1 path. Closed-loop keep-alive load at 1, 16 and
//! 64 connections from a small hyper load generator; req/s, p50, p99, p99.9
//! and the ratios authswap/direct and authswap/nginx.
//!
//! `cargo bench --bench http_load` (or `benches/run.sh`, which installs
//! nginx first). Under `cargo test` it runs a few hundred milliseconds.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use bytes::Bytes;
use common::{
    cpu_time, duration, machine_ticks, quick_mode, ratio, sleeps, Authswap, Latencies, Table,
};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::harness::{basic, Env};
use tokio::net::{TcpListener, TcpStream};

const BEARER: &str = "Bearer static-benchmark-token";
/// The path through two authswap replicas sharing one PostgreSQL store.
const PG_PATH: &str = "authswap-pg-x2";

/// The origin: answers every request with a small fixed body.
fn start_origin(tls: bool) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let acceptor = tls.then(|| {
                tokio_rustls::TlsAcceptor::from(support::pki().server_config(&[b"http/1.1"]))
            });
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                let _ = stream.set_nodelay(true);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req: Request<Incoming>| async {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(b"<ok/>"),
                        )))
                    });
                    let builder = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                        Some(a) => {
                            if let Ok(s) = a.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(s), service).await;
                            }
                        }
                    }
                });
            }
        });
    });
    rx.recv().unwrap()
}

/// A target of the load generator.
#[derive(Clone)]
struct Target {
    /// Connection `i` goes to `addrs[i % addrs.len()]` (several replicas).
    addrs: Vec<SocketAddr>,
    tls: bool,
    authorization: String,
}

struct Measured {
    rps: f64,
    lat: Latencies,
    /// Requests answered during the whole call, warm-up included.
    all: u64,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// A byte stream, plain or TLS.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// Connects to `addr`, over TLS (as `localhost`) when `tls` is given.
async fn dial(addr: SocketAddr, tls: Option<Arc<rustls::ClientConfig>>) -> Box<dyn Stream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let _ = tcp.set_nodelay(true);
    match tls {
        None => Box::new(tcp),
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let connector = tokio_rustls::TlsConnector::from(config);
            Box::new(connector.connect(name, tcp).await.unwrap())
        }
    }
}

async fn connect(t: &Target, i: usize) -> Sender {
    let tls = t.tls.then(|| support::pki().client_config_no_alpn());
    let io = dial(t.addrs[i % t.addrs.len()], tls).await;
    let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    s
}

/// Closed loop on `conns` keep-alive connections for `measure` after a warm-up.
async fn load(t: &Target, conns: usize, measure: Duration) -> Measured {
    let warmup = if quick_mode() {
        Duration::from_millis(50)
    } else {
        Duration::from_millis(500)
    };
    let start = Instant::now() + warmup;
    let end = start + measure;
    let mut tasks = Vec::new();
    for i in 0..conns {
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(&t, i).await;
            let mut lat = Latencies::default();
            let mut n = 0u64;
            let mut all = 0u64;
            let mut reconnects = 0u32;
            // Bounded: by time, and by count as a safety net.
            for _ in 0..50_000_000u64 {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                let req = Request::post("/EWS/Exchange.asmx")
                    .header("host", "localhost")
                    .header("authorization", &t.authorization)
                    .header("content-type", "text/xml; charset=utf-8")
                    .body(Full::new(Bytes::from_static(b"<soap/>")))
                    .unwrap();
                // A server may close a keep-alive connection (nginx does
                // after keepalive_requests): reconnect, bounded.
                if sender.ready().await.is_err() {
                    reconnects += 1;
                    assert!(reconnects < 1000, "too many reconnects");
                    sender = connect(&t, i).await;
                }
                let res = sender.send_request(req).await.expect("response");
                assert!(res.status().is_success(), "status {}", res.status());
                let _ = res.into_body().collect().await.unwrap();
                all += 1;
                if now >= start {
                    lat.record(now.elapsed());
                    n += 1;
                }
            }
            (n, all, lat)
        }));
    }
    let mut total = 0;
    let mut all = 0;
    let mut lat = Latencies::default();
    for t in tasks {
        let (n, a, l) = t.await.unwrap();
        total += n;
        all += a;
        lat.add(&l);
    }
    Measured {
        rps: total as f64 / measure.as_secs_f64(),
        lat,
        all,
    }
}

/// One path at one level, over all rounds.
#[derive(Default)]
struct Cell {
    rps: Vec<f64>,
    lat: Latencies,
    cpu: Duration,
    requests: u64,
    /// CPU time of this process: the load generator and the origin.
    rest: Duration,
    /// Machine clock ticks, idle and all.
    idle: u64,
    ticks: u64,
    /// Voluntary context switches of the proxy process(es).
    sleeps: u64,
}

impl Cell {
    fn median_rps(&self) -> f64 {
        let mut v = self.rps.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Nginx {
    child: std::process::Child,
    plain: SocketAddr,
    tls: SocketAddr,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM makes the master stop its workers; SIGKILL would orphan
        // them (still listening, still scheduled).
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nginx {
    /// The master and its workers.
    fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.child.id()];
        let children = format!("/proc/{0}/task/{0}/children", self.child.id());
        if let Ok(list) = std::fs::read_to_string(children) {
            pids.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
        pids
    }
}

/// Starts Debian's nginx (one worker, upstream keep-alive, static header).
fn start_nginx(
    dir: &std::path::Path,
    plain: SocketAddr,
    tls: SocketAddr,
    ca: &std::path::Path,
) -> Option<Nginx> {
    let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let (np, nt) = (free_port(), free_port());
    let d = dir.display();
    let conf = format!(
        r#"
user root;
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 75s;
  client_body_temp_path {d}/nx-body;
  proxy_temp_path {d}/nx-proxy;
  fastcgi_temp_path {d}/nx-fcgi;
  uwsgi_temp_path {d}/nx-uwsgi;
  scgi_temp_path {d}/nx-scgi;
  upstream origin_plain {{ server {plain}; keepalive 128; keepalive_requests 100000000; }}
  upstream origin_tls {{ server {tls}; keepalive 128; keepalive_requests 100000000; }}
  server {{
    listen 127.0.0.1:{np};
    location / {{
      proxy_pass http://origin_plain;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "{BEARER}";
    }}
  }}
  server {{
    listen 127.0.0.1:{nt};
    location / {{
      proxy_pass https://origin_tls;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "{BEARER}";
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate {ca};
      proxy_ssl_name localhost;
      proxy_ssl_server_name on;
      proxy_ssl_session_reuse on;
    }}
  }}
}}
"#,
        ca = ca.display()
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).ok()?;
    let child = std::process::Command::new(bin)
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let nginx = Nginx {
        child,
        plain: SocketAddr::from(([127, 0, 0, 1], np)),
        tls: SocketAddr::from(([127, 0, 0, 1], nt)),
    };
    // Wait (bounded) until it accepts.
    for _ in 0..100 {
        if std::net::TcpStream::connect(nginx.plain).is_ok() {
            return Some(nginx);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn us(v: u64) -> String {
    format!("{v}")
}

/// The floor for a hyper-based proxy: the same pooled client authswap uses
/// (hyper-util's, over the same rustls connector), a plain hyper HTTP/1.1
/// server, and nothing else per request but swapping whatever
/// `Authorization` came in for a static Bearer and rewriting the URI.
/// Runs as a separate process (this binary re-executed with
/// `HTTP_LOAD_NAIVE_UPSTREAM=<url>` and `HTTP_LOAD_NAIVE_CA=<pem>`), one
/// worker thread like authswap's default, so its CPU time is its own.
/// Prints its port on stdout.
///
/// With `HTTP_LOAD_NAIVE_AFFINITY` set it is **hyper-affinity** instead: no
/// pool; each client connection gets its own upstream HTTP/1.1 connection,
/// driven in the client connection's task (one task per request path, as
/// nginx has one event loop). It measures the headroom of that design.
fn naive_proxy(upstream: String) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let tls = authswap::config::TlsConfig {
            extra_ca_file: std::env::var_os("HTTP_LOAD_NAIVE_CA").map(Into::into),
        };
        let client_config = authswap::tls::client_config(&tls).unwrap();
        let client = authswap::tls::https_client(client_config.clone(), Duration::from_secs(10));
        let base: hyper::Uri = upstream.parse().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", listener.local_addr().unwrap().port());
        let bearer = hyper::header::HeaderValue::from_static(BEARER);
        let affinity = std::env::var("HTTP_LOAD_NAIVE_AFFINITY").is_ok();
        let upstream_tls = (base.scheme_str() == Some("https")).then(|| Arc::new(client_config));
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                break;
            };
            let _ = stream.set_nodelay(true);
            if affinity {
                let (base, bearer, upstream_tls) =
                    (base.clone(), bearer.clone(), upstream_tls.clone());
                tokio::spawn(async move {
                    let addr = SocketAddr::from(([127, 0, 0, 1], base.port_u16().unwrap()));
                    let io = dial(addr, upstream_tls).await;
                    type B = http_body_util::combinators::UnsyncBoxBody<Bytes, hyper::Error>;
                    let (tx, conn) =
                        hyper::client::conn::http1::handshake::<_, B>(TokioIo::new(io))
                            .await
                            .unwrap();
                    let tx = Arc::new(std::sync::Mutex::new(Some(tx)));
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (tx, base, bearer) = (tx.clone(), base.clone(), bearer.clone());
                        async move {
                            let (mut parts, body) = req.into_parts();
                            let mut uri = base.into_parts();
                            uri.scheme = None;
                            uri.authority = None;
                            uri.path_and_query = parts.uri.path_and_query().cloned();
                            parts.uri = hyper::Uri::from_parts(uri).unwrap();
                            parts.headers.insert(
                                hyper::header::HOST,
                                hyper::header::HeaderValue::from_static("localhost"),
                            );
                            parts.headers.insert(hyper::header::AUTHORIZATION, bearer);
                            let mut sender = tx.lock().unwrap().take().unwrap();
                            let res = sender
                                .send_request(Request::from_parts(parts, body.boxed_unsync()))
                                .await;
                            *tx.lock().unwrap() = Some(sender);
                            res
                        }
                    });
                    let server = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::select! { _ = server => {}, _ = conn => {} }
                });
                continue;
            }
            let (client, base, bearer) = (client.clone(), base.clone(), bearer.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (client, base, bearer) = (client.clone(), base.clone(), bearer.clone());
                    async move {
                        let (mut parts, body) = req.into_parts();
                        let mut uri = base.into_parts();
                        uri.path_and_query = parts.uri.path_and_query().cloned();
                        parts.uri = hyper::Uri::from_parts(uri).unwrap();
                        parts.headers.remove(hyper::header::HOST);
                        parts.headers.insert(hyper::header::AUTHORIZATION, bearer);
                        let body = body
                            .map_err(|e| -> authswap::tls::BoxError { Box::new(e) })
                            .boxed_unsync();
                        client.request(Request::from_parts(parts, body)).await
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

/// A running naive proxy process.
struct Naive {
    child: std::process::Child,
    addr: SocketAddr,
}

impl Naive {
    /// Starts hyper-naive, or hyper-affinity when `affinity`.
    fn start(upstream: &str, ca: &std::path::Path, affinity: bool) -> Naive {
        use std::io::BufRead;
        // HTTP_LOAD_NAIVE_WRAPPER="valgrind --tool=callgrind" profiles the
        // bare proxies as AUTHSWAP_BENCH_WRAPPER profiles authswap.
        let wrapper = std::env::var("HTTP_LOAD_NAIVE_WRAPPER").unwrap_or_default();
        let mut argv: Vec<String> = wrapper.split_whitespace().map(str::to_owned).collect();
        argv.push(std::env::current_exe().unwrap().display().to_string());
        let mut cmd = std::process::Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        if affinity {
            cmd.env("HTTP_LOAD_NAIVE_AFFINITY", "1");
        }
        let mut child = cmd
            .env("HTTP_LOAD_NAIVE_UPSTREAM", upstream)
            .env("HTTP_LOAD_NAIVE_CA", ca)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("naive proxy");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line.trim().parse().expect("naive proxy port");
        Naive {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    /// The load generator's target: plain HTTP, any credentials.
    fn target(&self) -> Target {
        Target {
            addrs: vec![self.addr],
            tls: false,
            authorization: "Basic ignored".into(),
        }
    }
}

impl Drop for Naive {
    fn drop(&mut self) {
        // SIGTERM first, so that a profiler wrapping the proxy writes its output.
        let _ = std::process::Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn main() {
    if let Ok(upstream) = std::env::var("HTTP_LOAD_NAIVE_UPSTREAM") {
        naive_proxy(upstream);
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let env = Env::start().await;
    env.add_linked("bench", "bench@contoso.com", "bench-password-1")
        .await;
    // Two replicas on one PostgreSQL database beside the one on SQLite
    // (issue 14), when PostgreSQL is installed (`.ci/run` installs it):
    // the same identity, seeded in both stores.
    let pg_url = support::pg::database().await;
    if let Some(url) = &pg_url {
        env.use_store_url(url);
        env.add_linked("bench", "bench@contoso.com", "bench-password-1")
            .await;
        *env.store_url.lock().unwrap() = None;
    }
    let origin_plain = start_origin(false);
    let origin_tls = start_origin(true);
    let nginx = if quick_mode() {
        None
    } else {
        start_nginx(env.dir.path(), origin_plain, origin_tls, &env.ca_file)
    };

    let mut table = Table::new(
        "http_load",
        &[
            "upstream",
            "conns",
            "path",
            "req/s",
            "p50 µs",
            "p99 µs",
            "p99.9 µs",
            "proxy CPU µs/req",
            "load+origin CPU µs/req",
            "machine idle %",
            "proxy sleeps/req",
            "req/s vs direct",
            "req/s vs nginx",
            "CPU/req vs nginx",
        ],
    );
    let measure = duration(Duration::from_secs(2));
    let rounds = if quick_mode() {
        1
    } else {
        std::env::var("HTTP_LOAD_ROUNDS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(5)
    };
    // HTTP_LOAD_CONNS=16,64 and HTTP_LOAD_UPSTREAMS=http narrow a run down
    // (for profiling one case); the default is the whole table.
    let conn_levels: Vec<usize> = match std::env::var("HTTP_LOAD_CONNS") {
        Ok(v) => v.split(',').filter_map(|n| n.trim().parse().ok()).collect(),
        Err(_) if quick_mode() => vec![1, 4],
        Err(_) => vec![1, 16, 64],
    };
    let upstreams = std::env::var("HTTP_LOAD_UPSTREAMS").unwrap_or_else(|_| "http,https".into());
    let mut added_p99_at_1 = Vec::new();
    let mut vs_nginx = Vec::new();
    let mut argon2_notes = Vec::new();
    let mut vs_naive = Vec::new();
    let mut vs_sqlite = Vec::new();
    for (kind, origin, tls) in [("http", origin_plain, false), ("https", origin_tls, true)] {
        if !upstreams.split(',').any(|u| u.trim() == kind) {
            continue;
        }
        // authswap in front of this origin (a fresh process per upstream kind).
        let mut toml = env.config_toml();
        let scheme = if tls {
            "https://localhost"
        } else {
            "http://127.0.0.1"
        };
        toml = toml.replace(
            &format!("upstream = \"{}\"", env.ews.base_url()),
            &format!("upstream = \"{scheme}:{}\"", origin.port()),
        );
        let path = env.dir.path().join(format!("bench-{kind}.toml"));
        std::fs::write(&path, toml).unwrap();
        let proxy = Authswap::start(&path).await;
        let proxy_pid = proxy.child.id().expect("authswap pid");
        let mut replicas = Vec::new();
        if let Some(url) = &pg_url {
            let pg_toml = std::fs::read_to_string(&path).unwrap().replacen(
                "[store]\n",
                &format!("[store]\nurl = \"{url}\"\n"),
                1,
            );
            let pg_path = env.dir.path().join(format!("bench-{kind}-pg.toml"));
            std::fs::write(&pg_path, pg_toml).unwrap();
            // One after the other: the first creates the admin token file.
            replicas.push(Authswap::start(&pg_path).await);
            replicas.push(Authswap::start(&pg_path).await);
        }
        let upstream_url = format!("{scheme}:{}", origin.port());
        let naive = Naive::start(&upstream_url, &env.ca_file, false);
        let affinity = Naive::start(&upstream_url, &env.ca_file, true);
        let mut paths = vec![
            (
                "direct",
                Target {
                    addrs: vec![origin],
                    tls,
                    authorization: BEARER.into(),
                },
                Vec::new(),
            ),
            (
                "authswap",
                Target {
                    addrs: vec![proxy.addr("http")],
                    tls: false,
                    authorization: basic("bench", "bench-password-1"),
                },
                vec![proxy_pid],
            ),
            ("hyper-naive", naive.target(), vec![naive.child.id()]),
            (
                "hyper-affinity",
                affinity.target(),
                vec![affinity.child.id()],
            ),
        ];
        if !replicas.is_empty() {
            // Connections alternate between the two replicas.
            paths.push((
                PG_PATH,
                Target {
                    addrs: replicas.iter().map(|r| r.addr("http")).collect(),
                    tls: false,
                    authorization: basic("bench", "bench-password-1"),
                },
                replicas
                    .iter()
                    .map(|r| r.child.id().expect("replica pid"))
                    .collect(),
            ));
        }
        if let Some(nx) = &nginx {
            paths.push((
                "nginx",
                Target {
                    addrs: vec![if tls { nx.tls } else { nx.plain }],
                    tls: false,
                    authorization: "Basic ignored".into(),
                },
                nx.pids(),
            ));
        }
        for &conns in &conn_levels {
            // Rounds with the order rotated, so a slow phase of the machine
            // does not land on one path only; req/s is the median round.
            let mut results: Vec<Cell> = paths.iter().map(|_| Cell::default()).collect();
            for round in 0..rounds {
                for i in 0..paths.len() {
                    let k = (i + round) % paths.len();
                    let (_, target, pids) = &paths[k];
                    let cpu_before: Duration = pids.iter().map(|&p| cpu_time(p)).sum();
                    let sleeps_before: u64 = pids.iter().map(|&p| sleeps(p)).sum();
                    let rest_before = cpu_time(std::process::id());
                    let (idle_before, ticks_before) = machine_ticks();
                    let m = load(target, conns, measure).await;
                    let cpu: Duration =
                        pids.iter().map(|&p| cpu_time(p)).sum::<Duration>() - cpu_before;
                    let (idle_after, ticks_after) = machine_ticks();
                    let cell = &mut results[k];
                    cell.rest += cpu_time(std::process::id()) - rest_before;
                    cell.sleeps += pids.iter().map(|&p| sleeps(p)).sum::<u64>() - sleeps_before;
                    cell.idle += idle_after - idle_before;
                    cell.ticks += ticks_after - ticks_before;
                    cell.rps.push(m.rps);
                    cell.lat.add(&m.lat);
                    cell.cpu += cpu;
                    cell.requests += m.all;
                }
            }
            let rps: Vec<f64> = results.iter().map(Cell::median_rps).collect();
            let cpu: Vec<Option<f64>> = paths
                .iter()
                .zip(&results)
                .map(|((_, _, pids), c)| {
                    (!pids.is_empty()).then(|| c.cpu.as_secs_f64() * 1e6 / c.requests.max(1) as f64)
                })
                .collect();
            let nginx_at = paths.iter().position(|(n, _, _)| *n == "nginx");
            let naive_at = paths.iter().position(|(n, _, _)| *n == "hyper-naive");
            let authswap_at = paths.iter().position(|(n, _, _)| *n == "authswap");
            if let (Some(a), Some(p)) = (
                authswap_at,
                paths.iter().position(|(n, _, _)| *n == PG_PATH),
            ) {
                vs_sqlite.push(format!(
                    "{kind}/{conns}: req/s {}, CPU/req {}, p99 {}",
                    ratio(rps[p], rps[a]),
                    match (cpu[p], cpu[a]) {
                        (Some(x), Some(y)) => ratio(x, y),
                        _ => "-".into(),
                    },
                    ratio(
                        results[p].lat.quantile_us(0.99) as f64,
                        results[a].lat.quantile_us(0.99) as f64
                    ),
                ));
            }
            if let (Some(a), Some(h)) = (authswap_at, naive_at) {
                vs_naive.push(format!(
                    "{kind}/{conns}: req/s {}, CPU/req {}",
                    ratio(rps[a], rps[h]),
                    match (cpu[a], cpu[h]) {
                        (Some(x), Some(y)) => ratio(x, y),
                        _ => "-".into(),
                    }
                ));
            }
            for (k, (name, _, _)) in paths.iter().enumerate() {
                let c = &results[k];
                let vs_n = nginx_at.map_or("-".into(), |n| ratio(rps[k], rps[n]));
                let cpu_vs_n = match (nginx_at, cpu[k]) {
                    (Some(n), Some(mine)) if *name != "direct" => {
                        ratio(mine, cpu[n].unwrap_or(0.0))
                    }
                    _ => "-".into(),
                };
                table.row(vec![
                    kind.to_owned(),
                    conns.to_string(),
                    name.to_string(),
                    format!("{:.0}", rps[k]),
                    us(c.lat.quantile_us(0.50)),
                    us(c.lat.quantile_us(0.99)),
                    us(c.lat.quantile_us(0.999)),
                    cpu[k].map_or("-".into(), |v| format!("{v:.1}")),
                    format!(
                        "{:.1}",
                        c.rest.as_secs_f64() * 1e6 / c.requests.max(1) as f64
                    ),
                    format!("{:.0}", 100.0 * c.idle as f64 / c.ticks.max(1) as f64),
                    if paths[k].2.is_empty() {
                        "-".into()
                    } else {
                        format!("{:.2}", c.sleeps as f64 / c.requests.max(1) as f64)
                    },
                    ratio(rps[k], rps[0]),
                    vs_n.clone(),
                    cpu_vs_n,
                ]);
                if *name == "authswap" {
                    if conns == 1 {
                        added_p99_at_1.push(format!(
                            "{kind}: authswap adds {} µs to direct p99 at 1 connection (target < 100 µs)",
                            c.lat.quantile_us(0.99) as i64 - results[0].lat.quantile_us(0.99) as i64
                        ));
                    }
                    if conns >= 16 {
                        vs_nginx.push(format!("{kind}/{conns}: {vs_n}"));
                    }
                }
            }
        }
        // No argon2 on the steady-state path: one verification for the
        // first request, the cache for every other one.
        let verified = proxy
            .metric("authswap_credential_checks_total{result=\"verified\"}")
            .await;
        let hits = proxy
            .metric("authswap_credential_checks_total{result=\"cache_hit\"}")
            .await;
        assert_eq!(verified, 1.0, "argon2 ran more than once under load");
        argon2_notes.push(format!(
            "{kind}: authswap_credential_checks_total over the run: verified (argon2) = {verified}, cache_hit = {hits}"
        ));
        for r in &replicas {
            // Each replica verifies the password once, then caches it;
            // neither reads the store per request.
            let verified = r
                .metric("authswap_credential_checks_total{result=\"verified\"}")
                .await;
            assert_eq!(verified, 1.0, "argon2 ran more than once on a replica");
        }
        for r in replicas {
            r.stop().await;
        }
        proxy.stop().await;
    }
    table.note(format!(
        "Closed-loop keep-alive HTTP/1.1 POSTs of a 7-byte body; {rounds} round(s) of {}s per path and level after a warm-up, order rotated each round; req/s is the median round, latencies merge all rounds. authswap serves these requests on its native HTTP/1.1 path (http.native_http1). hyper-naive = the floor for a hyper-based proxy: the pooled client of authswap's hyper path and a plain hyper HTTP/1.1 server in their own process (one worker thread), swapping in a static Bearer and nothing else. hyper-affinity = the same without the pool: one upstream connection per client connection, driven in the client connection's task. Load generator (2 threads), origin (1 thread), authswap, hyper-naive, hyper-affinity{} share this machine's {} cores. Client→authswap and client→nginx are plain loopback HTTP; the upstream leg is plain or TLS as in the first column. Proxy CPU = user+system time of the proxy process(es) per request answered (warm-ups included): the cost that does not depend on how the machine's two cores were shared. Load+origin CPU = the same for this benchmark's own process (load generator and origin), per request: what each path makes the rest of the machine spend. Machine idle = the share of both cores' time left idle during the rounds (/proc/stat). Proxy sleeps = voluntary context switches of the proxy's threads per request: how often it ran out of work and waited in the kernel.",
        measure.as_secs_f64(),
        if nginx.is_some() { " and nginx (1 worker)" } else { "" },
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    ));
    if nginx.is_none() {
        table.note("nginx not measured (quick mode, or nginx not installed: run benches/run.sh).");
    }
    table.note(format!(
        "authswap / hyper-naive (authswap, native HTTP/1.1 path and all its own work, against the leanest pooled hyper proxy): {}",
        vs_naive.join("; ")
    ));
    if vs_sqlite.is_empty() {
        table.note("PostgreSQL not installed: the two-replica path was not measured.");
    } else {
        table.note(format!(
            "{PG_PATH} = two authswap processes on one PostgreSQL database (a throwaway local cluster, fsync off), connections alternating between them, on the same two cores as everything else; authswap = one process on SQLite. {PG_PATH} / authswap: {}",
            vs_sqlite.join("; ")
        ));
    }
    for n in argon2_notes {
        table.note(n);
    }
    for n in added_p99_at_1 {
        table.note(n);
    }
    if !vs_nginx.is_empty() {
        table.note(format!(
            "Target: authswap ≥ nginx at 16 and 64 connections; authswap/nginx = {}",
            vs_nginx.join(", ")
        ));
    }
    table.finish();
}
