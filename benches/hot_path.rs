//! Micro-benchmarks of the per-request hot path: the verified-credential
//! cache (no argon2 in steady state, compared with one argon2 verification
//! as the baseline), the access-token lookup, the header rewrite and the
//! mail line codec.

#[path = "../tests/support/mod.rs"]
mod support;

use authswap::config::AuthConfig;
use authswap::identity::{hash_password, Authenticator, Directory};
use authswap::metrics::{Metrics, Protocol};
use authswap::proxy::http::parse_basic;
use authswap::store::{IdentityRecord, Status};
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

fn record(id: i64, name: &str, hash: &str) -> IdentityRecord {
    IdentityRecord {
        id,
        name: name.into(),
        mailbox: format!("{name}@contoso.com"),
        password_hash: hash.into(),
        status: Status::Linked,
        last_error: None,
        last_success_at: None,
        last_failure_at: None,
        created_at: 0,
        has_refresh_token: true,
        token_generation: 1,
        account: None,
        linked_at: None,
        tenant: "default".into(),
        mode: Default::default(),
        tenant_block: None,
    }
}

/// Polls a call that completes without waiting (a cache hit) once, with a
/// no-op waker, inside the caller's runtime context: the figure is the call,
/// not `block_on`'s own cost. Panics if it would wait.
fn ready<F: std::future::Future>(call: F) -> F::Output {
    let call = std::pin::pin!(call);
    let mut cx = std::task::Context::from_waker(futures_util::task::noop_waker_ref());
    match call.poll(&mut cx) {
        std::task::Poll::Ready(out) => out,
        std::task::Poll::Pending => panic!("a cache hit needs no waiting"),
    }
}

fn credentials(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = AuthConfig::default(); // shipped argon2id costs
    let hash = hash_password("correct horse battery", &config).unwrap();
    let directory = Arc::new(Directory::default());
    let records: Vec<_> = (0..10_000)
        .map(|i| record(i, &format!("user{i}"), &hash))
        .collect();
    directory.apply(&records);
    let metrics = Arc::new(Metrics::new());
    let auth = Authenticator::new(directory.clone(), metrics.clone(), config);
    let src = IpAddr::V4(Ipv4Addr::LOCALHOST);
    rt.block_on(auth.authenticate("user42", b"correct horse battery", src, Protocol::http))
        .unwrap();

    let mut group = c.benchmark_group("credential_check");
    let context = rt.enter();
    group.bench_function("cache_hit_10k_identities", |b| {
        b.iter(|| {
            ready(auth.authenticate(
                black_box("user42"),
                black_box(b"correct horse battery"),
                src,
                Protocol::http,
            ))
            .unwrap()
        })
    });
    // A keep-alive HTTP client resending its header: the connection memo.
    let memo = authswap::identity::ConnectionMemo::default();
    let header = b"Basic dXNlcjQyOmNvcnJlY3QgaG9yc2UgYmF0dGVyeQ==";
    let user42 = directory.get("user42").unwrap();
    auth.memorize(&memo, auth.memo_tag(header), &user42);
    group.bench_function("connection_memo_hit", |b| {
        b.iter(|| {
            let tag = auth.memo_tag(black_box(header));
            auth.recall(&memo, tag).unwrap()
        })
    });
    drop(context);
    group.sample_size(10);
    group.bench_function("argon2id_verify_baseline", |b| {
        use argon2::password_hash::{PasswordHash, PasswordVerifier};
        let parsed = PasswordHash::new(&hash).unwrap();
        b.iter(|| {
            argon2::Argon2::default()
                .verify_password(black_box(b"correct horse battery"), &parsed)
                .unwrap()
        })
    });
    group.finish();
    assert_eq!(
        metrics.credential_check_count(authswap::metrics::CredentialCheck::verified),
        1,
        "the steady state never ran argon2"
    );
}

fn basic_header(c: &mut Criterion) {
    let value = b"Basic dXNlcjQyOmNvcnJlY3QgaG9yc2UgYmF0dGVyeQ==";
    c.bench_function("parse_basic_header", |b| {
        b.iter(|| parse_basic(black_box(value)).unwrap())
    });
}

fn token_lookup(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (_env, app) = rt.block_on(async {
        let env = support::harness::Env::start().await;
        env.add_linked("alice", "alice@contoso.com", "pw").await;
        let app = authswap::app::App::open(env.config()).await.unwrap();
        (env, app)
    });
    let identity = app.directory.get("alice").unwrap();
    let scopes = authswap::token::Scopes::new(&app.config.http.scopes);
    rt.block_on(app.tokens.access_token(&identity, &scopes))
        .unwrap();
    let _context = rt.enter();
    c.bench_function("access_token_cache_hit", |b| {
        b.iter(|| ready(app.tokens.access_token(black_box(&identity), &scopes)).unwrap())
    });
}

fn header_rewrite(c: &mut Criterion) {
    use http::header::{HeaderMap, HeaderValue};
    let mut template = HeaderMap::new();
    for (k, v) in [
        ("host", "127.0.0.1:8080"),
        (
            "authorization",
            "Basic dXNlcjQyOmNvcnJlY3QgaG9yc2UgYmF0dGVyeQ==",
        ),
        ("content-type", "text/xml; charset=utf-8"),
        (
            "soapaction",
            "\"http://schemas.microsoft.com/exchange/services/2006/messages/FindItem\"",
        ),
        ("user-agent", "ExchangeServicesClient/15.00.0913.015"),
        ("accept", "text/xml"),
        ("connection", "keep-alive"),
        ("expect", "100-continue"),
        ("content-length", "1024"),
    ] {
        template.insert(k, HeaderValue::from_static(v));
    }
    let mut bearer =
        HeaderValue::from_static("Bearer eyJ0eXAiOiJKV1QiLCJub25jZSI6IjEyMyJ9.payload.sig");
    bearer.set_sensitive(true);
    c.bench_function("header_rewrite_basic_to_bearer", |b| {
        b.iter(|| {
            let mut h = template.clone();
            let creds = parse_basic(h.get("authorization").unwrap().as_bytes()).unwrap();
            authswap::proxy::http::prepare_upstream_headers(&mut h);
            h.insert("authorization", bearer.clone());
            black_box((creds, h))
        })
    });
    // The same request as bytes, as the native HTTP/1.1 path rewrites it
    // (the path that serves it by default).
    let mut raw = String::from("POST /EWS/Exchange.asmx HTTP/1.1\r\n");
    for (k, v) in &template {
        raw.push_str(&format!("{k}: {}\r\n", v.to_str().unwrap()));
    }
    raw.push_str("\r\n");
    let raw = raw.into_bytes();
    let mut out = Vec::with_capacity(2048);
    c.bench_function("header_rewrite_native_http1", |b| {
        b.iter(|| {
            use authswap::proxy::http::codec::{parse_request_head, RequestParse};
            let RequestParse::Native(head) =
                parse_request_head(black_box(&raw), b"", b"outlook.office365.com", &mut out)
            else {
                panic!("taken by the native path")
            };
            let len = head.len;
            out.extend_from_slice(bearer.as_bytes());
            out.extend_from_slice(b"\r\n\r\n");
            black_box((len, out.len()))
        })
    });
    // What an EWS request adds: the operation read from the held body (a
    // bounded quick-xml scan) and its per-identity counter.
    let body = br#"<?xml version="1.0" encoding="utf-8"?>
<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/" xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages" xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types">
  <soap:Header><t:RequestServerVersion Version="Exchange2016"/></soap:Header>
  <soap:Body><m:FindItem Traversal="Shallow"><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape></m:ItemShape><m:ParentFolderIds><t:DistinguishedFolderId Id="inbox"/></m:ParentFolderIds></m:FindItem></soap:Body>
</soap:Envelope>"#;
    let metrics = Metrics::new();
    c.bench_function("ews_operation_count", |b| {
        b.iter(|| {
            let op = authswap::proxy::http::ews_ops::operation(black_box(body));
            metrics.ews_operation("alice", op);
            black_box(op)
        })
    });
}

fn line_codec(c: &mut Criterion) {
    use authswap::proxy::line::LineIo;
    use tokio::io::AsyncWriteExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let lines: Vec<u8> = (0..1000)
        .flat_map(|i| format!("RCPT TO:<user{i}@example.com>\r\n").into_bytes())
        .collect();
    let mut group = c.benchmark_group("line_codec");
    group.throughput(criterion::Throughput::Elements(1000));
    group.bench_function("read_1000_pipelined_lines", |b| {
        b.iter(|| {
            rt.block_on(async {
                let (a, mut w) = tokio::io::duplex(1 << 20);
                w.write_all(&lines).await.unwrap();
                drop(w);
                let mut io = LineIo::new(a, 4096);
                let mut n = 0;
                while let Some(l) = io.read_line().await.unwrap() {
                    n += l.len();
                }
                black_box(n)
            })
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    credentials,
    basic_header,
    token_lookup,
    header_rewrite,
    line_codec
);
criterion_main!(benches);
