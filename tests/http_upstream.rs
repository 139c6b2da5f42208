//! The HTTP front end's upstream connections when the upstream speaks
//! HTTP/1.1: each client connection drives its own upstream connection,
//! idle ones pass to the next client connection, connections the upstream
//! closed while idle are replaced without the client noticing, and a
//! request lost on a reused connection is sent again only when that is
//! harmless. Real listeners on 127.0.0.1:0, TLS upstreams with the test CA.

mod support;

use http::{Method, StatusCode};
use std::net::SocketAddr;
use std::time::Duration;
use support::h1::{H1Fault, RawH1Upstream};
use support::harness::{basic, Env, HttpClient, SOAP};
use support::raw::{status, Raw};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GRACE: Duration = Duration::from_secs(5);

/// A keep-alive HTTP/1.1 client on one TCP connection, request by request.
struct RawClient(Raw);

impl RawClient {
    async fn connect(addr: SocketAddr) -> RawClient {
        RawClient(Raw::connect(addr).await)
    }

    /// Sends one request as alice and reads the answer.
    async fn request(&mut self, method: &str, path: &str, body: &str) -> (u16, String) {
        let auth = basic("alice", "pw-alice-123");
        self.request_with(&auth, method, path, body).await
    }

    /// Sends one request with `auth` and reads the answer (`Content-Length` bodies).
    async fn request_with(
        &mut self,
        auth: &str,
        method: &str,
        path: &str,
        body: &str,
    ) -> (u16, String) {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: legacy\r\nauthorization: {auth}\r\n\
             content-type: text/xml\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let (head, body) = self.0.response_to(&req).await;
        (status(&head), body)
    }

    /// Closes our side and waits until authswap has closed its side too,
    /// so that its connection (and lane) is gone when this returns.
    async fn close(self) {
        self.0.close().await
    }
}

/// authswap in front of `upstream` (an identity `alice` linked).
async fn proxy_to(env: &Env, upstream: String) -> authswap::server::Server {
    env.add_linked("alice", "alice@contoso.com", "pw-alice-123")
        .await;
    env.serve_with(move |c| c.http.upstream = upstream).await
}

#[tokio::test]
async fn http1_upstream_gets_bearer_replays_after_401_and_streams_both_ways() {
    let env = Env::start_http1().await;
    env.add_linked("alice", "alice@contoso.com", "pw-alice-123")
        .await;
    let server = env.serve().await;
    let addr = server.http_addr().unwrap();
    let client = HttpClient::default();

    let r = client.ews(addr, "alice", "pw-alice-123", SOAP).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("x-echo-http-version").as_deref(), Some("HTTP/1.1"));
    assert_eq!(
        r.header("x-echo-mailbox").as_deref(),
        Some("alice@contoso.com")
    );
    assert_eq!(r.text(), SOAP);

    // A refused token: refresh once, replay the same bytes on the lane.
    env.ews.clear();
    env.ews.reject_next(1);
    let r = client.ews(addr, "alice", "pw-alice-123", SOAP).await;
    assert_eq!(r.status, StatusCode::OK);
    let seen = env.ews.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].body, seen[1].body);
    assert_ne!(seen[0].bearer, seen[1].bearer, "fresh token on the replay");
    assert_eq!(env.idp.successful_refreshes(), 2);

    // Bodies above the replay limit stream up; big answers stream down.
    let body: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let auth = basic("alice", "pw-alice-123");
    let r = client
        .send(addr, Method::POST, "/upload", Some(&auth), body.clone())
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body == body, "3 MiB echoed intact");
    let r = client
        .send(
            addr,
            Method::GET,
            "/big-response?bytes=5000000",
            Some(&auth),
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body == support::expected_big_response(5_000_000));

    // Many client connections at once, each on its own upstream connection.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        tasks.spawn(async move {
            let mut c = RawClient::connect(addr).await;
            let mut statuses = Vec::new();
            for _ in 0..5 {
                statuses.push(c.request("POST", "/EWS/Exchange.asmx", SOAP).await.0);
            }
            c.close().await;
            statuses
        });
    }
    while let Some(statuses) = tasks.join_next().await {
        assert_eq!(statuses.unwrap(), vec![200; 5]);
    }
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn keep_alive_and_reconnecting_clients_reuse_one_upstream_connection() {
    let env = Env::start().await;
    let upstream = RawH1Upstream::start(H1Fault::None).await;
    let server = proxy_to(&env, upstream.url()).await;
    let addr = server.http_addr().unwrap();

    let mut client = RawClient::connect(addr).await;
    for i in 0..10 {
        let (status, body) = client.request("POST", "/EWS/Exchange.asmx", SOAP).await;
        assert_eq!(status, 200);
        assert_eq!(body, format!("connection 1 request {}\n", i + 1));
    }
    client.close().await;
    // Legacy clients that reconnect for every request find the parked
    // connection warm.
    for i in 10..15 {
        let mut client = RawClient::connect(addr).await;
        let (status, body) = client.request("GET", "/EWS/Exchange.asmx", "").await;
        assert_eq!(status, 200);
        assert_eq!(body, format!("connection 1 request {}\n", i + 1));
        client.close().await;
    }
    assert_eq!(upstream.connections(), 1);
    let requests = upstream.requests();
    assert_eq!(requests.len(), 15);
    assert!(requests.iter().all(|r| r
        .authorization
        .as_deref()
        .is_some_and(|a| a.starts_with("Bearer at-"))));
    assert!(requests
        .iter()
        .all(|r| r.body.is_empty() || r.body == SOAP.as_bytes()));

    // Two clients at once need two upstream connections.
    let mut a = RawClient::connect(addr).await;
    let mut b = RawClient::connect(addr).await;
    let ((sa, _), (sb, _)) = tokio::join!(
        a.request("POST", "/EWS/Exchange.asmx", SOAP),
        b.request("POST", "/EWS/Exchange.asmx", SOAP)
    );
    assert_eq!((sa, sb), (200, 200));
    assert_eq!(upstream.connections(), 2);
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn an_upstream_closing_idle_connections_is_invisible_to_clients() {
    let env = Env::start().await;
    let upstream = RawH1Upstream::start(H1Fault::CloseAfterEachAnswer).await;
    let server = proxy_to(&env, upstream.url()).await;
    let addr = server.http_addr().unwrap();

    let mut client = RawClient::connect(addr).await;
    for i in 0..10 {
        let method = if i % 2 == 0 { "POST" } else { "GET" };
        let (status, body) = client.request(method, &format!("/r{i}"), "").await;
        assert_eq!(status, 200, "request {i}: {body}");
        assert_eq!(body, format!("connection {} request 1\n", i + 1));
    }
    client.close().await;
    for i in 10..13 {
        let mut client = RawClient::connect(addr).await;
        let (status, _) = client.request("POST", &format!("/r{i}"), SOAP).await;
        assert_eq!(status, 200);
        client.close().await;
    }
    // Every request reached the upstream exactly once.
    let targets: Vec<String> = upstream.requests().into_iter().map(|r| r.target).collect();
    let expected: Vec<String> = (0..13).map(|i| format!("/r{i}")).collect();
    assert_eq!(targets, expected);
    assert_eq!(upstream.connections(), 13);
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn a_request_lost_on_a_reused_connection_is_resent_only_when_idempotent() {
    let env = Env::start().await;
    let upstream = RawH1Upstream::start(H1Fault::LoseSecondRequest).await;
    let server = proxy_to(&env, upstream.url()).await;
    let addr = server.http_addr().unwrap();
    let mut client = RawClient::connect(addr).await;

    assert_eq!(client.request("GET", "/a", "").await.0, 200);
    // The upstream reads GET /b on the reused connection and hangs up:
    // repeating a GET is harmless, so it goes again on a new connection.
    let (status, body) = client.request("GET", "/b", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "connection 2 request 1\n");
    // The same for a POST: it may have been applied, so it is not repeated.
    let (status, body) = client.request("POST", "/c", SOAP).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("upstream"), "{body}");
    // The client connection stays usable; the next request opens a new
    // upstream connection.
    let (status, body) = client.request("POST", "/d", SOAP).await;
    assert_eq!(status, 200);
    assert_eq!(body, "connection 3 request 1\n");

    let seen = |t: &str| upstream.requests().iter().filter(|r| r.target == t).count();
    assert_eq!(
        (seen("/a"), seen("/b"), seen("/c"), seen("/d")),
        (1, 2, 1, 1)
    );
    let m = HttpClient::default()
        .get(server.admin_addr(), "/metrics")
        .await
        .text();
    assert!(
        m.contains("authswap_requests_total{protocol=\"http\",outcome=\"upstream_error\"} 1"),
        "{m}"
    );
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn unreachable_and_slow_upstreams_answer_502_and_504() {
    let env = Env::start_http1().await;
    env.add_linked("alice", "alice@contoso.com", "pw-alice-123")
        .await;
    // Nothing listens on this port any more.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let server = env
        .serve_with(move |c| c.http.upstream = format!("https://127.0.0.1:{closed}"))
        .await;
    let mut client = RawClient::connect(server.http_addr().unwrap()).await;
    let (status, body) = client.request("POST", "/EWS/Exchange.asmx", SOAP).await;
    assert_eq!(status, 502, "{body}");
    client.close().await;
    server.shutdown(GRACE).await;

    let server = env
        .serve_with(|c| c.http.upstream_timeout = Duration::from_millis(300))
        .await;
    let mut client = RawClient::connect(server.http_addr().unwrap()).await;
    // A first request arms the connection's timer for its own due time...
    assert_eq!(
        client.request("POST", "/EWS/Exchange.asmx", SOAP).await.0,
        200
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...so for this one it fires early and must move to this one's due
    // time rather than end it before its 300 ms.
    env.ews.set_delay(Duration::from_secs(2));
    let started = std::time::Instant::now();
    let (status, body) = client.request("POST", "/EWS/Exchange.asmx", SOAP).await;
    let took = started.elapsed();
    assert_eq!(status, 504, "{body}");
    assert!(
        took >= Duration::from_millis(295) && took < Duration::from_millis(1500),
        "504 after {took:?}"
    );
    // The abandoned upstream connection is not reused; a new one answers.
    env.ews.set_delay(Duration::ZERO);
    let (status, body) = client.request("POST", "/EWS/Exchange.asmx", SOAP).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, SOAP);
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn chunked_bodies_below_and_above_the_replay_limit_arrive_intact_and_in_order() {
    let env = Env::start_http1().await;
    env.add_linked("alice", "alice@contoso.com", "pw-alice-123")
        .await;
    let server = env
        .serve_with(|c| c.http.replay_buffer_limit = authswap::config::ByteSize(2500))
        .await;
    let addr = server.http_addr().unwrap();
    for parts in [1usize, 2, 6] {
        // Chunks of 1000 distinct bytes: 1 and 2 are buffered (replayable),
        // 6 cross the limit on the third and stream.
        let chunks: Vec<Vec<u8>> = (0..parts).map(|p| vec![b'a' + p as u8; 1000]).collect();
        let mut req = format!(
            "POST /EWS/Exchange.asmx HTTP/1.1\r\nhost: legacy\r\nauthorization: {}\r\n\
             transfer-encoding: chunked\r\n\r\n",
            basic("alice", "pw-alice-123")
        )
        .into_bytes();
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(&req).await.unwrap();
        req.clear();
        for c in &chunks {
            stream
                .write_all(format!("{:x}\r\n", c.len()).as_bytes())
                .await
                .unwrap();
            stream.write_all(c).await.unwrap();
            stream.write_all(b"\r\n").await.unwrap();
            stream.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stream.write_all(b"0\r\n\r\n").await.unwrap();
        let (head, body) = Raw::new(stream).response().await;
        assert_eq!(status(&head), 200, "{parts} chunks: {body}");
        assert_eq!(body.into_bytes(), chunks.concat(), "{parts} chunks");
    }
    server.shutdown(GRACE).await;
}

#[tokio::test]
async fn a_connection_that_proved_a_password_loses_it_when_the_password_changes() {
    let env = Env::start_http1().await;
    env.add_linked("alice", "alice@contoso.com", "pw-alice-123")
        .await;
    let server = env.serve().await;
    let mut client = RawClient::connect(server.http_addr().unwrap()).await;
    let old = basic("alice", "pw-alice-123");
    assert_eq!(post(&mut client, &old).await, 200);
    assert_eq!(post(&mut client, &old).await, 200);
    // Other credentials on the same connection are checked, not recalled.
    assert_eq!(post(&mut client, &basic("alice", "wrong")).await, 401);
    assert_eq!(post(&mut client, &old).await, 200);

    let out = env.cli(
        &["identity", "set-password", "alice", "--password-stdin"],
        Some("pw-alice-456\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Within the reload interval the same connection's old password stops
    // working (it is not kept for the credential cache's TTL).
    let mut refused = false;
    for _ in 0..100 {
        if post(&mut client, &old).await == 401 {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "the old password still works on this connection");
    assert_eq!(
        post(&mut client, &basic("alice", "pw-alice-456")).await,
        200
    );
    server.shutdown(GRACE).await;
}

async fn post(client: &mut RawClient, auth: &str) -> u16 {
    client
        .request_with(auth, "POST", "/EWS/Exchange.asmx", SOAP)
        .await
        .0
}

#[tokio::test]
async fn idle_connections_close_after_the_header_timeout_but_busy_ones_do_not() {
    let env = Env::start_http1().await;
    env.add_linked("alice", "alice@contoso.com", "pw-alice-123")
        .await;
    let server = env
        .serve_with(|c| c.http.header_read_timeout = Duration::from_millis(300))
        .await;
    let addr = server.http_addr().unwrap();

    // Requests with short pauses keep a connection open well past the limit.
    let mut client = RawClient::connect(addr).await;
    for _ in 0..8 {
        assert_eq!(
            client.request("POST", "/EWS/Exchange.asmx", SOAP).await.0,
            200
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    // A slow upstream answer is not an idle connection.
    env.ews.set_delay(Duration::from_millis(700));
    assert_eq!(
        client.request("POST", "/EWS/Exchange.asmx", SOAP).await.0,
        200
    );
    env.ews.set_delay(Duration::ZERO);
    // Idle for longer than the limit: authswap closes the connection.
    let idle = std::time::Instant::now();
    let mut byte = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), client.0.stream.read(&mut byte))
        .await
        .expect("closed within 5 s")
        .unwrap_or(0);
    assert_eq!(n, 0, "EOF");
    assert!(
        idle.elapsed() >= Duration::from_millis(250),
        "{:?}",
        idle.elapsed()
    );

    // Neither is a long answer streamed to the client (8 chunks, 100 ms apart).
    let r = HttpClient::default()
        .send(
            addr,
            Method::GET,
            "/big-response?bytes=80000&chunk=10000&chunk_delay_ms=100",
            Some(&basic("alice", "pw-alice-123")),
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body == support::expected_big_response(80_000));

    // A connection that never sends a request is closed too.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut byte))
        .await
        .expect("closed within 5 s")
        .unwrap_or(0);
    assert_eq!(n, 0);
    server.shutdown(GRACE).await;
}
