//! The native HTTP/1.1 path of the HTTP front end, byte for byte: request
//! heads rewritten for the upstream (hop-by-hop fields, `Host` and the
//! credentials replaced, everything else kept in order), every response
//! framing relayed exactly (content-length, chunked with extensions and
//! trailers, close-delimited, HEAD, 204, interim 1xx), pipelined requests,
//! malformed upstream answers, `Expect: 100-continue`, and the hand-over to
//! the hyper path for the requests the native path does not take (chunked
//! uploads, HTTP/1.0); oversized heads. Raw sockets on both sides, so that nothing
//! a client or server library would smooth over goes unseen.

mod support;

use std::net::SocketAddr;
use std::time::Duration;
use support::h1::{H1Fault, RawH1Upstream};
use support::harness::{basic, Env};
use support::raw::{field, status, Raw};

const GRACE: Duration = Duration::from_secs(5);

/// authswap (alice linked, `http.header_read_timeout` 800 ms, then
/// `tweak`) in front of a fresh raw HTTP/1.1 upstream.
struct Rig {
    env: Env,
    up: RawH1Upstream,
    server: authswap::server::Server,
    addr: SocketAddr,
}

async fn rig_with(tweak: impl FnOnce(&mut authswap::config::Config)) -> Rig {
    let env = Env::start_http1().await;
    let up = RawH1Upstream::start(H1Fault::None).await;
    env.add_linked("alice", "alice@contoso.com", "pw-alice-123")
        .await;
    let url = up.url();
    let server = env
        .serve_with(move |c| {
            c.http.upstream = url;
            c.http.header_read_timeout = Duration::from_millis(800);
            tweak(c);
        })
        .await;
    let addr = server.http_addr().unwrap();
    Rig {
        env,
        up,
        server,
        addr,
    }
}

async fn rig() -> Rig {
    rig_with(|_| {}).await
}

fn auth() -> String {
    basic("alice", "pw-alice-123")
}

/// A request with alice's credentials and `extra` header lines.
fn request(method: &str, path: &str, extra: &str, body: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: legacy.local\r\nAuthorization: {}\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        auth(),
        body.len()
    )
}

#[tokio::test]
async fn request_heads_reach_the_upstream_rewritten_and_pipelined_requests_in_order() {
    let Rig {
        env,
        up,
        server,
        addr,
    } = rig().await;
    let mut c = Raw::connect(addr).await;
    // Two requests in one write, with hop-by-hop fields of every kind.
    let first = request(
        "POST",
        "/EWS/Exchange.asmx?a=1&b=%20",
        "X-First: 1\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic c2VjcmV0\r\nTE: trailers\r\nSOAPAction: \"urn:GetFolder\"\r\nX-Last: 2\r\n",
        "<soap/>",
    );
    let second = request("GET", "/second", "", "");
    c.send(&format!("{first}{second}")).await;
    let (h1, b1) = c.response().await;
    let (h2, b2) = c.response().await;
    assert_eq!((status(&h1), status(&h2)), (200, 200));
    assert_eq!(b1, "connection 1 request 1\n");
    assert_eq!(b2, "connection 1 request 2\n");

    let seen = up.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].target, "/EWS/Exchange.asmx?a=1&b=%20");
    assert_eq!(seen[0].body, b"<soap/>");
    let head = &seen[0].head;
    let bearer = seen[0].authorization.clone().unwrap();
    assert!(bearer.starts_with("Bearer at-"), "{bearer}");
    assert!(env.idp.is_access_token_valid(&bearer[7..]).is_some());
    assert_eq!(field(head, "host").as_deref(), Some(&up.url()[8..]));
    for gone in ["connection", "keep-alive", "proxy-authorization", "te"] {
        assert_eq!(
            field(head, gone),
            None,
            "{gone} reached the upstream: {head}"
        );
    }
    assert!(
        !head.contains("Basic"),
        "no Basic credentials upstream: {head}"
    );
    // The other fields arrive as sent: same case, same order.
    let x_first = head.find("X-First: 1\r\n").expect("X-First");
    let soap = head
        .find("SOAPAction: \"urn:GetFolder\"\r\n")
        .expect("SOAPAction");
    let x_last = head.find("X-Last: 2\r\n").expect("X-Last");
    assert!(x_first < soap && soap < x_last, "{head}");
    assert_eq!(field(head, "content-length").as_deref(), Some("7"));
    assert_eq!(seen[1].method, "GET");
    assert_eq!(seen[1].connection, 1);
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn every_response_framing_is_relayed_exactly() {
    let Rig {
        env: _env,
        up,
        server,
        addr,
    } = rig().await;
    let mut c = Raw::connect(addr).await;

    // Chunked, with an extension and a trailer: relayed as framed.
    let chunked = "5;name=x\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: 42\r\n\r\n";
    up.script(
        format!("HTTP/1.1 200 Fine\r\nTransfer-Encoding: chunked\r\nConnection: X-Private\r\nX-Private: drop\r\nKeep-Alive: timeout=9\r\nX-Kept: yes\r\n\r\n{chunked}"),
        false,
    );
    c.send(&request("GET", "/chunked", "", "")).await;
    let head = c.until("\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200 Fine\r\n"), "{head}");
    assert_eq!(
        field(&head, "transfer-encoding").as_deref(),
        Some("chunked")
    );
    assert_eq!(field(&head, "x-kept").as_deref(), Some("yes"));
    for gone in ["x-private", "keep-alive", "connection"] {
        assert_eq!(
            field(&head, gone),
            None,
            "{gone} reached the client: {head}"
        );
    }
    assert_eq!(c.until("X-Checksum: 42\r\n\r\n").await, chunked);

    // A length beside a transfer coding is not the message's: dropped.
    up.script(
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        false,
    );
    c.send(&request("GET", "/both", "", "")).await;
    let head = c.until("\r\n\r\n").await;
    assert_eq!(field(&head, "content-length"), None, "{head}");
    assert_eq!(c.until("0\r\n\r\n").await, "3\r\nabc\r\n0\r\n\r\n");

    // HEAD: the length is announced, no body follows.
    up.script("HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", false);
    c.send(&request("HEAD", "/head", "", "")).await;
    let head = c.until("\r\n\r\n").await;
    assert_eq!(field(&head, "content-length").as_deref(), Some("1000"));

    // Interim 100 skipped, then 204 without a body.
    up.script(
        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nX-After: 1\r\n\r\n",
        false,
    );
    c.send(&request("DELETE", "/item", "", "")).await;
    let head = c.until("\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 204 No Content\r\n"), "{head}");
    assert_eq!(field(&head, "x-after").as_deref(), Some("1"));

    // An HTTP/1.0 upstream answer keeps its length and is relayed as 1.1.
    up.script(
        "HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok",
        false,
    );
    c.send(&request("GET", "/ten", "", "")).await;
    let (head, body) = c.response().await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(body, "ok");

    // The same client connection is still in use (HEAD and 204 left no
    // stray bytes), and so is the upstream's.
    let (head, body) = c.response_to(&request("GET", "/plain", "", "")).await;
    assert_eq!(status(&head), 200);
    assert!(body.starts_with("connection 1 request "), "{body}");

    // Close-delimited: the client is told, gets every byte, then the close.
    up.script(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end",
        true,
    );
    c.send(&request("GET", "/close", "", "")).await;
    let rest = c.rest().await;
    let (head, body) = rest.split_once("\r\n\r\n").unwrap();
    assert_eq!(field(head, "connection").as_deref(), Some("close"));
    assert_eq!(body, "until the end");

    // A new client connection is served on a new upstream connection.
    let mut c = Raw::connect(addr).await;
    let (head, _) = c.response_to(&request("GET", "/again", "", "")).await;
    assert_eq!(status(&head), 200);
    assert_eq!(up.connections(), 2);
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn malformed_upstream_answers_get_502_or_a_cut_connection() {
    let Rig {
        env: _env,
        up,
        server,
        addr,
    } = rig().await;

    // Not HTTP at all: 502, and the client connection stays usable.
    let mut c = Raw::connect(addr).await;
    up.script("SSH-2.0-OpenSSH\r\n\r\n", true);
    let (head, body) = c.response_to(&request("GET", "/garbage", "", "")).await;
    assert_eq!(status(&head), 502, "{head}{body}");
    let (head, _) = c.response_to(&request("GET", "/fine", "", "")).await;
    assert_eq!(status(&head), 200);

    // Two different lengths: 502.
    up.script(
        "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        false,
    );
    let (head, _) = c.response_to(&request("GET", "/lengths", "", "")).await;
    assert_eq!(status(&head), 502);

    // Broken chunked framing seen before anything went to the client: 502,
    // and the connection is closed (its upstream state is unknown).
    up.script(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX",
        false,
    );
    c.send(&request("GET", "/broken", "", "")).await;
    let rest = c.rest().await;
    assert!(rest.starts_with("HTTP/1.1 502"), "{rest}");

    // Seen after the head and some data went out: the client's connection
    // is cut, so it cannot take a truncated body for a whole one.
    let mut c = Raw::connect(addr).await;
    up.script(
        format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n30d40\r\n{}XX",
            "a".repeat(200_000)
        ),
        false,
    );
    c.send(&request("GET", "/broken-later", "", "")).await;
    let rest = c.rest().await;
    assert!(
        rest.starts_with("HTTP/1.1 200 OK\r\n"),
        "{}",
        &rest[..rest.len().min(100)]
    );
    assert!(rest.len() < 200_100 && !rest.ends_with("0\r\n\r\n"));

    // The upstream closing in the middle of a length-delimited body: cut too.
    let mut c = Raw::connect(addr).await;
    up.script(
        "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this",
        true,
    );
    c.send(&request("GET", "/short", "", "")).await;
    let rest = c.rest().await;
    assert!(rest.ends_with("only this"), "{rest}");
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn other_requests_are_handed_to_the_hyper_path_on_the_same_connection() {
    let Rig {
        env: _env,
        up,
        server,
        addr,
    } = rig().await;
    let mut c = Raw::connect(addr).await;
    // Native first, then a chunked upload: the connection moves to hyper
    // with the bytes already read, and the next request is served too.
    let (head, _) = c.response_to(&request("GET", "/native", "", "")).await;
    assert_eq!(status(&head), 200);
    let chunked = format!(
        "POST /chunked HTTP/1.1\r\nHost: legacy\r\nAuthorization: {}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n",
        auth()
    );
    c.send(&format!("{chunked}{}", request("GET", "/after", "", "")))
        .await;
    let (head, _) = c.response().await;
    assert_eq!(status(&head), 200, "{head}");
    let (head, _) = c.response().await;
    assert_eq!(status(&head), 200, "{head}");
    let seen = up.requests();
    let targets: Vec<&str> = seen.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(targets, ["/native", "/chunked", "/after"]);
    assert_eq!(seen[1].body, b"abcdefg");
    // One upstream pool: the connection handed to hyper did not dial again.
    assert!(
        seen.iter().all(|r| r.connection == 1),
        "{:?}",
        seen.iter().map(|r| r.connection).collect::<Vec<_>>()
    );
    assert_eq!(up.connections(), 1);

    // HTTP/1.0 is served (by hyper), and closed after its answer.
    let mut c = Raw::connect(addr).await;
    c.send(&format!(
        "GET /old HTTP/1.0\r\nAuthorization: {}\r\n\r\n",
        auth()
    ))
    .await;
    let rest = c.rest().await;
    assert!(rest.starts_with("HTTP/1.0 200 OK\r\n"), "{rest}");

    // A head over max_header_bytes: 431, nothing upstream.
    let before = up.requests().len();
    let mut c = Raw::connect(addr).await;
    let huge = format!("X-Big: {}\r\n", "a".repeat(70 * 1024));
    c.send(&request("GET", "/huge", &huge, "")).await;
    let rest = c.rest().await;
    assert!(
        rest.starts_with("HTTP/1.1 431"),
        "{}",
        &rest[..rest.len().min(200)]
    );
    assert_eq!(up.requests().len(), before);
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn local_answers_keep_or_close_the_connection_as_asked() {
    let Rig {
        env: _env,
        up,
        server,
        addr,
    } = rig().await;
    let mut c = Raw::connect(addr).await;
    // A wrong password: 401 with the challenge; the body was consumed, so
    // the next request on the connection works.
    let wrong = format!(
        "POST /x HTTP/1.1\r\nHost: l\r\nAuthorization: {}\r\nContent-Length: 5\r\n\r\nhello",
        basic("alice", "wrong")
    );
    let (head, body) = c.response_to(&wrong).await;
    assert_eq!(status(&head), 401);
    assert!(field(&head, "www-authenticate")
        .unwrap()
        .starts_with("Basic realm=\"authswap\""));
    assert_eq!(body, "authentication failed\n");
    let (head, _) = c.response_to(&request("GET", "/ok", "", "")).await;
    assert_eq!(status(&head), 200);
    assert!(up.requests().iter().all(|r| r.target != "/x"));

    // Connection: close is honoured after a forwarded answer.
    c.send(&request("GET", "/last", "Connection: close\r\n", ""))
        .await;
    let rest = c.rest().await;
    assert!(rest.starts_with("HTTP/1.1 200 OK\r\n"));
    assert_eq!(
        field(rest.split("\r\n\r\n").next().unwrap(), "connection").as_deref(),
        Some("close")
    );

    // A body that stops arriving: 408 after the header timeout, then close.
    let mut c = Raw::connect(addr).await;
    c.send(&format!(
        "POST /slow HTTP/1.1\r\nHost: l\r\nAuthorization: {}\r\nContent-Length: 10\r\n\r\nhalf",
        auth()
    ))
    .await;
    let rest = c.rest().await;
    assert!(rest.starts_with("HTTP/1.1 408"), "{rest}");
    assert!(up.requests().iter().all(|r| r.target != "/slow"));
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn shutdown_lets_a_native_request_finish_and_closes_idle_connections() {
    let Rig {
        env,
        up,
        server,
        addr,
    } = rig().await;
    let mut idle = Raw::connect(addr).await;
    let (head, _) = idle.response_to(&request("GET", "/warm", "", "")).await;
    assert_eq!(status(&head), 200);
    // The next request has to wait a second for a new token.
    let alice = server.app().directory.get("alice").unwrap();
    server.app().tokens.forget(alice.id);
    env.idp.set_delay(Duration::from_secs(1));
    let mut busy = Raw::connect(addr).await;
    busy.send(&request("GET", "/in-flight", "", "")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stop = tokio::spawn(server.shutdown(GRACE));
    // The idle connection is closed without an answer...
    assert_eq!(idle.rest().await, "");
    // ...the request in flight is answered, and its connection closed.
    let rest = busy.rest().await;
    assert!(rest.starts_with("HTTP/1.1 200 OK\r\n"), "{rest}");
    assert_eq!(
        field(rest.split("\r\n\r\n").next().unwrap(), "connection").as_deref(),
        Some("close")
    );
    assert_eq!(up.requests().last().unwrap().target, "/in-flight");
    tokio::time::timeout(Duration::from_secs(10), stop)
        .await
        .expect("shutdown finished")
        .unwrap();
}

#[tokio::test]
async fn expect_100_continue_is_answered_after_the_credentials_are_checked() {
    let Rig {
        env: _env,
        up,
        server,
        addr,
    } = rig().await;
    let put = |auth: &str| {
        format!(
            "PUT /expect HTTP/1.1\r\nHost: legacy\r\nAuthorization: {auth}\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
        )
    };
    // Good credentials: 100 Continue, then the body goes upstream (without
    // the expectation, which was met here).
    let mut c = Raw::connect(addr).await;
    c.send(&put(&auth())).await;
    let interim = c.until("\r\n\r\n").await;
    assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
    c.send("body").await;
    let (head, _) = c.response().await;
    assert_eq!(status(&head), 200);
    let seen = up.requests();
    assert_eq!(seen.last().unwrap().body, b"body");
    assert_eq!(field(&seen.last().unwrap().head, "expect"), None);
    // The connection goes on.
    let (head, _) = c.response_to(&request("GET", "/next", "", "")).await;
    assert_eq!(status(&head), 200);

    // Wrong credentials: 401 at once, no 100, and the connection closes
    // (the client may or may not send the body it was not asked for).
    let mut c = Raw::connect(addr).await;
    c.send(&put(&basic("alice", "wrong"))).await;
    let rest = c.rest().await;
    assert!(rest.starts_with("HTTP/1.1 401"), "{rest}");
    assert!(!rest.contains("100 Continue"));
    assert_eq!(
        field(rest.split("\r\n\r\n").next().unwrap(), "connection").as_deref(),
        Some("close")
    );
    assert_eq!(up.requests().len(), seen.len() + 1);
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn a_whole_head_over_max_header_bytes_gets_431_even_in_one_read() {
    let Rig {
        env: _env,
        up,
        server,
        addr,
    } = rig_with(|c| c.http.max_header_bytes = authswap::config::ByteSize(2048)).await;
    let mut c = Raw::connect(addr).await;
    // 3 KiB of head, complete, in one write: it fits one read.
    let big = format!("X-Big: {}\r\n", "b".repeat(3 * 1024));
    c.send(&request("GET", "/big", &big, "")).await;
    let rest = c.rest().await;
    assert!(
        rest.starts_with("HTTP/1.1 431"),
        "{}",
        &rest[..rest.len().min(200)]
    );
    assert!(up.requests().is_empty());
    server.shutdown(GRACE).await;
}

/// Runs curl (a real, independent HTTP/1.1 client) and returns
/// (stdout, exit status).
async fn curl(args: &[&str]) -> (String, std::process::ExitStatus) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("curl is installed (.ci/run installs it)");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status,
    )
}

#[tokio::test]
async fn curl_uploads_with_expect_and_chunked_and_reads_every_answer() {
    let Rig {
        env: _env,
        up,
        server,
        addr,
    } = rig().await;
    let base = format!("http://{addr}");
    let dir = tempfile::tempdir().unwrap();
    // 2 MiB: curl sends `Expect: 100-continue` for bodies over 1 MiB.
    let big: Vec<u8> = (0..2 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let file = dir.path().join("big.bin");
    std::fs::write(&file, &big).unwrap();
    let data = format!("@{}", file.display());

    let (out, _) = curl(&[
        "-u",
        "alice:pw-alice-123",
        "--data-binary",
        &data,
        "-w",
        "\n%{http_code}",
        &format!("{base}/EWS/Exchange.asmx"),
    ])
    .await;
    assert!(out.ends_with("\n200"), "{out}");
    let seen = up.requests();
    let last = seen.last().unwrap();
    assert_eq!(last.body.len(), big.len());
    assert!(last.body == big, "the 2 MiB body arrived intact");
    assert!(last
        .authorization
        .as_deref()
        .unwrap()
        .starts_with("Bearer "));

    // Chunked upload (handed to the hyper path), then HEAD and a wrong
    // password on the same curl invocation's connections.
    let (out, _) = curl(&[
        "-u",
        "alice:pw-alice-123",
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        "chunked body",
        "-w",
        "\n%{http_code}",
        &format!("{base}/chunked"),
    ])
    .await;
    assert!(out.ends_with("\n200"), "{out}");
    assert_eq!(up.requests().last().unwrap().body, b"chunked body");
    let (out, _) = curl(&[
        "-u",
        "alice:pw-alice-123",
        "-I",
        "-w",
        "%{http_code}",
        &format!("{base}/head"),
    ])
    .await;
    assert!(out.ends_with("200"), "{out}");
    assert_eq!(up.requests().last().unwrap().method, "HEAD");
    let (out, _) = curl(&[
        "-u",
        "alice:wrong",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{base}/x"),
    ])
    .await;
    assert_eq!(out, "401");
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn curl_over_the_local_https_listener_takes_the_native_path_too() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = support::pki().write_server_cert_files(dir.path());
    let Rig {
        env,
        up,
        server,
        addr,
    } = rig_with(|c| {
        c.http.tls_cert_file = Some(cert);
        c.http.tls_key_file = Some(key);
    })
    .await;
    let port = addr.port();
    let big: Vec<u8> = (0..1536 * 1024).map(|i| (i % 253) as u8).collect();
    let file = dir.path().join("big.bin");
    std::fs::write(&file, &big).unwrap();
    let data = format!("@{}", file.display());
    let resolve = format!("localhost:{port}:127.0.0.1");
    let ca = env.ca_file.display().to_string();
    // One curl, two requests on one TLS connection (HTTP/1.1 forced, so
    // the native path serves it): an upload with Expect, then a GET.
    let (out, _) = curl(&[
        "--http1.1",
        "--cacert",
        &ca,
        "--resolve",
        &resolve,
        "-u",
        "alice:pw-alice-123",
        "--data-binary",
        &data,
        "-w",
        "\n%{http_code}\n",
        &format!("https://localhost:{port}/upload"),
        "--next",
        "--http1.1",
        "--cacert",
        &ca,
        "--resolve",
        &resolve,
        "-u",
        "alice:pw-alice-123",
        "-w",
        "\n%{http_code}\n",
        &format!("https://localhost:{port}/after"),
    ])
    .await;
    assert_eq!(out.matches("\n200\n").count(), 2, "{out}");
    let seen = up.requests();
    assert_eq!(seen.len(), 2);
    assert!(seen[0].body == big, "upload intact");
    assert_eq!(seen[1].target, "/after");
    assert_eq!(seen[1].connection, seen[0].connection);
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn ambiguous_request_lengths_never_reach_the_upstream() {
    let Rig {
        env: _env,
        up,
        server,
        addr,
    } = rig().await;
    for lengths in [
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        "Content-Length: +5\r\n",
        "Content-Length: 5, 6\r\n",
    ] {
        let mut c = Raw::connect(addr).await;
        c.send(&format!(
            "POST /smuggle HTTP/1.1\r\nHost: l\r\nAuthorization: {}\r\n{lengths}\r\nhelloGET /second HTTP/1.1\r\n\r\n",
            auth()
        ))
        .await;
        let rest = c.rest().await;
        assert!(rest.starts_with("HTTP/1.1 400"), "{lengths:?}: {rest}");
    }
    assert!(up.requests().is_empty(), "{:?}", up.requests());
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn two_authorization_headers_get_400_on_both_halves_and_reach_nothing() {
    let Rig {
        up, server, addr, ..
    } = rig().await;
    let second = basic("mallory", "pw-mallory-123");
    // The native half: a plain request.
    let mut c = Raw::connect(addr).await;
    let (head, body) = c
        .response_to(&format!(
            "GET /a HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nAuthorization: {second}\r\n\r\n",
            auth()
        ))
        .await;
    assert_eq!(status(&head), 400, "{head}");
    assert!(
        body.contains("more than one Authorization header"),
        "{body}"
    );
    // The hyper half: a chunked upload, which the native half hands over.
    let mut c = Raw::connect(addr).await;
    let (head, body) = c
        .response_to(&format!(
            "POST /b HTTP/1.1\r\nHost: x\r\nAuthorization: {second}\r\nTransfer-Encoding: chunked\r\nAuthorization: {}\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            auth()
        ))
        .await;
    assert_eq!(status(&head), 400, "{head}");
    assert!(
        body.contains("more than one Authorization header"),
        "{body}"
    );
    assert!(up.requests().is_empty(), "nothing went upstream");
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn no_upstream_connection_is_opened_before_the_request_is_authenticated() {
    // A TLS upstream whose protocol (HTTP/1.1 or HTTP/2) is not known yet:
    // a listener that counts connections and never answers.
    let env = Env::start().await;
    env.add_linked("alice", "alice@contoso.com", "pw-alice-123")
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let dialled = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = dialled.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(s);
        }
    });
    let server = env
        .serve_with(move |c| c.http.upstream = format!("https://localhost:{port}"))
        .await;
    let addr = server.http_addr().unwrap();
    for creds in [
        basic("alice", "wrong-password"),
        basic("nobody", "pw"),
        "Bearer abc".to_owned(),
    ] {
        let mut c = Raw::connect(addr).await;
        let (head, _) = c
            .response_to(&format!(
                "GET / HTTP/1.1\r\nHost: x\r\nAuthorization: {creds}\r\n\r\n"
            ))
            .await;
        assert_eq!(status(&head), 401, "{head}");
    }
    let mut c = Raw::connect(addr).await;
    let (head, _) = c.response_to("GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status(&head), 401, "{head}");
    assert_eq!(
        dialled.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the upstream was dialled for a request that proved nothing"
    );
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn the_connection_that_learnt_http2_becomes_the_shared_one() {
    // An upstream that offers HTTP/2: the first request learns it on the
    // native half's first connection, which is then the one every client
    // shares (it is not dropped and dialled again).
    let env = Env::start().await;
    env.add_linked("alice", "alice@contoso.com", "pw-alice-123")
        .await;
    let server = env.serve().await;
    let addr = server.http_addr().unwrap();
    for path in ["/one", "/two", "/three"] {
        let mut c = Raw::connect(addr).await;
        let (head, _) = c.response_to(&request("GET", path, "", "")).await;
        assert_eq!(status(&head), 200, "{head}");
    }
    assert_eq!(env.ews.request_count(), 3);
    assert_eq!(env.ews.connections(), 1, "one upstream connection in all");
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn http2_clients_share_the_pool_of_upstream_connections() {
    use http_body_util::{BodyExt, Empty};
    let Rig {
        env: _env,
        up,
        server,
        addr,
    } = rig().await;
    // An HTTP/1.1 client parks its upstream connection when it leaves...
    let mut c = Raw::connect(addr).await;
    let (head, body) = c.response_to(&request("GET", "/h1", "", "")).await;
    assert_eq!(status(&head), 200, "{head}{body}");
    c.close().await;
    parked(&server).await;
    // ... an HTTP/2 client's requests (served by the hyper half, without a
    // lane) take it from the pool and put it back...
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<bytes::Bytes>>();
    for path in ["/h2-a", "/h2-b"] {
        let req = http::Request::get(format!("http://{addr}{path}"))
            .header("authorization", auth())
            .body(Empty::new())
            .unwrap();
        let res = h2.request(req).await.expect("HTTP/2 request");
        assert_eq!(res.version(), http::Version::HTTP_2);
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(status, 200, "{body:?}");
        // The connection goes back to the pool as soon as the response is
        // read whole, from a task of its own.
        parked(&server).await;
    }
    // ... and the next HTTP/1.1 client finds it there again.
    let mut c = Raw::connect(addr).await;
    let (head, _) = c.response_to(&request("GET", "/h1-again", "", "")).await;
    assert_eq!(status(&head), 200);
    let seen: Vec<(String, usize)> = up
        .requests()
        .iter()
        .map(|r| (r.target.clone(), r.connection))
        .collect();
    assert_eq!(up.connections(), 1, "one upstream connection: {seen:?}");
    server.shutdown(GRACE).await;
}

/// Waits (at most 5 s) until one upstream connection is parked in the pool.
async fn parked(server: &authswap::server::Server) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !server
        .app()
        .metrics
        .encode()
        .contains("authswap_http_upstream_idle_connections 1\n")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no upstream connection parked"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
