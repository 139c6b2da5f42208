//! HTTP overhead, side by side in one run: the same minimal hyper origin
//! (plain HTTP and TLS) reached (a) directly with a Bearer token, (b) through
//! authswap with Basic credentials, (c) through nginx injecting a static
//! `Authorization: Bearer` header. Closed-loop keep-alive load at 1, 16 and
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
use common::{duration, quick_mode, ratio, Authswap, Latencies, Table};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::harness::{basic, Env};
use tokio::net::{TcpListener, TcpStream};

const BEARER: &str = "Bearer static-benchmark-token";

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
    addr: SocketAddr,
    tls: bool,
    authorization: String,
}

struct Measured {
    rps: f64,
    lat: Latencies,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(t: &Target) -> Sender {
    let tcp = TcpStream::connect(t.addr).await.unwrap();
    let _ = tcp.set_nodelay(true);
    if t.tls {
        let connector = tokio_rustls::TlsConnector::from(support::pki().client_config_no_alpn());
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        s
    } else {
        let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        s
    }
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
    for _ in 0..conns {
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(&t).await;
            let mut lat = Latencies::default();
            let mut n = 0u64;
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
                let res = sender.send_request(req).await.expect("response");
                assert!(res.status().is_success(), "status {}", res.status());
                let _ = res.into_body().collect().await.unwrap();
                if now >= start {
                    lat.record(now.elapsed());
                    n += 1;
                }
            }
            (n, lat)
        }));
    }
    let mut total = 0;
    let mut lat = Latencies::default();
    for t in tasks {
        let (n, l) = t.await.unwrap();
        total += n;
        lat.add(&l);
    }
    Measured {
        rps: total as f64 / measure.as_secs_f64(),
        lat,
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
        let _ = self.child.kill();
        let _ = self.child.wait();
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
  client_body_temp_path {d}/nx-body;
  proxy_temp_path {d}/nx-proxy;
  fastcgi_temp_path {d}/nx-fcgi;
  uwsgi_temp_path {d}/nx-uwsgi;
  scgi_temp_path {d}/nx-scgi;
  upstream origin_plain {{ server {plain}; keepalive 128; }}
  upstream origin_tls {{ server {tls}; keepalive 128; }}
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

fn main() {
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
            "req/s vs direct",
            "req/s vs nginx",
        ],
    );
    let measure = duration(Duration::from_secs(3));
    let conn_levels: &[usize] = if quick_mode() { &[1, 4] } else { &[1, 16, 64] };
    let mut added_p99_at_1 = Vec::new();
    let mut vs_nginx = Vec::new();
    for (kind, origin, tls) in [("http", origin_plain, false), ("https", origin_tls, true)] {
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
        let direct = Target {
            addr: origin,
            tls,
            authorization: BEARER.into(),
        };
        let via_authswap = Target {
            addr: proxy.addr("http"),
            tls: false,
            authorization: basic("bench", "bench-password-1"),
        };
        for &conns in conn_levels {
            let d = load(&direct, conns, measure).await;
            let a = load(&via_authswap, conns, measure).await;
            let n = match &nginx {
                Some(nx) => Some(
                    load(
                        &Target {
                            addr: if tls { nx.tls } else { nx.plain },
                            tls: false,
                            authorization: "Basic ignored".into(),
                        },
                        conns,
                        measure,
                    )
                    .await,
                ),
                None => None,
            };
            let row = |name: &str, m: &Measured, vs_d: String, vs_n: String| {
                vec![
                    kind.to_owned(),
                    conns.to_string(),
                    name.to_owned(),
                    format!("{:.0}", m.rps),
                    us(m.lat.quantile_us(0.50)),
                    us(m.lat.quantile_us(0.99)),
                    us(m.lat.quantile_us(0.999)),
                    vs_d,
                    vs_n,
                ]
            };
            table.row(row("direct", &d, "1.00".into(), "-".into()));
            if let Some(n) = &n {
                table.row(row("nginx", n, ratio(n.rps, d.rps), "1.00".into()));
            }
            let an = n.as_ref().map_or("-".into(), |n| ratio(a.rps, n.rps));
            table.row(row("authswap", &a, ratio(a.rps, d.rps), an.clone()));
            if conns == 1 {
                added_p99_at_1.push(format!(
                    "{kind}: authswap adds {} µs to direct p99 at 1 connection",
                    a.lat.quantile_us(0.99) as i64 - d.lat.quantile_us(0.99) as i64
                ));
            }
            if conns >= 16 {
                vs_nginx.push(format!("{kind}/{conns}: {an}"));
            }
        }
        proxy.stop().await;
    }
    table.note(format!(
        "Closed-loop keep-alive HTTP/1.1 POSTs of a 7-byte body; {}s per cell after a warm-up; load generator, origin, authswap{} share this machine's {} cores. Client→authswap and client→nginx are plain loopback HTTP; the upstream leg is plain or TLS as in the first column.",
        measure.as_secs_f64(),
        if nginx.is_some() { " and nginx" } else { "" },
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    ));
    if nginx.is_none() {
        table.note("nginx not measured (quick mode, or nginx not installed: run benches/run.sh).");
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
