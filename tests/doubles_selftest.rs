//! Self-test of the in-process test doubles in `tests/support/` (fake IdP,
//! fake EWS, test PKI), driven by a plain hyper-util client. Uses the
//! `authswap` library only to sign client assertions
//! ([`authswap::token::AppCertificate`]).

mod support;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use support::{pki, EwsOptions, FakeEws, FakeIdp, IdpOptions};

const EWS_SCOPE: &str = "https://outlook.office365.com/EWS.AccessAsUser.All offline_access";

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

fn client(h2: bool) -> HttpsClient {
    let cfg = (*pki().client_config_no_alpn()).clone();
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(cfg)
        .https_only()
        .enable_http1();
    let conn = if h2 {
        b.enable_http2().build()
    } else {
        b.build()
    };
    Client::builder(TokioExecutor::new()).build(conn)
}

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("json body")
    }
    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("missing header {name}"))
            .to_str()
            .unwrap()
            .to_string()
    }
}

async fn send(c: &HttpsClient, req: Request<Full<Bytes>>) -> Resp {
    let resp = tokio::time::timeout(Duration::from_secs(5), c.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let (parts, body) = resp.into_parts();
    Resp {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.expect("body").to_bytes(),
    }
}

async fn post_form(
    c: &HttpsClient,
    url: &str,
    pairs: &[(&str, &str)],
    basic: Option<(&str, &str)>,
) -> Resp {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    let mut req =
        Request::post(url).header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some((id, secret)) = basic {
        let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let cred = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            enc(id),
            enc(secret)
        ));
        req = req.header(header::AUTHORIZATION, format!("Basic {cred}"));
    }
    send(c, req.body(Full::new(Bytes::from(body))).unwrap()).await
}

async fn refresh(c: &HttpsClient, idp: &FakeIdp, rt: &str) -> Resp {
    post_form(
        c,
        &idp.token_endpoint("contoso.onmicrosoft.com"),
        &[
            ("client_id", "test-client-id"),
            ("grant_type", "refresh_token"),
            ("refresh_token", rt),
            ("scope", EWS_SCOPE),
        ],
        None,
    )
    .await
}

fn assert_ms_error(r: &Resp, status: u16, error: &str, code: u64) {
    assert_eq!(r.status.as_u16(), status, "body: {:?}", r.body);
    let j = r.json();
    assert_eq!(j["error"], error, "{j}");
    assert_eq!(j["error_codes"][0].as_u64(), Some(code), "{j}");
    let desc = j["error_description"].as_str().unwrap();
    assert!(desc.starts_with(&format!("AADSTS{code}: ")), "{desc}");
    for k in ["timestamp", "trace_id", "correlation_id"] {
        assert!(j[k].is_string(), "missing {k} in {j}");
    }
}

#[tokio::test]
async fn refresh_rotates_and_old_token_still_works() {
    let idp = FakeIdp::start().await;
    let c = client(false);
    let rt0 = idp.seed_refresh_token("alice@contoso.com");

    let r1 = refresh(&c, &idp, &rt0).await;
    assert_eq!(r1.status, StatusCode::OK);
    let j1 = r1.json();
    assert_eq!(j1["token_type"], "Bearer");
    assert_eq!(
        j1["scope"],
        "https://outlook.office365.com/EWS.AccessAsUser.All"
    );
    assert_eq!(j1["expires_in"], 3600);
    assert_eq!(j1["ext_expires_in"], 3600);
    let at1 = j1["access_token"].as_str().unwrap().to_string();
    let rt1 = j1["refresh_token"].as_str().unwrap().to_string();
    assert!(at1.starts_with("at-") && rt1.starts_with("rt-"));
    assert_ne!(rt1, rt0);
    assert_eq!(
        idp.is_access_token_valid(&at1).as_deref(),
        Some("alice@contoso.com")
    );

    // The old refresh token stays valid (Microsoft behaviour).
    idp.set_expires_in(120);
    let j2 = refresh(&c, &idp, &rt0).await.json();
    assert_eq!(j2["expires_in"], 120);
    assert_ne!(j2["access_token"], j1["access_token"]);
    assert_ne!(j2["refresh_token"], j1["refresh_token"]);
    // And the rotated one works too.
    assert_eq!(refresh(&c, &idp, &rt1).await.status, StatusCode::OK);

    assert_eq!(idp.refresh_calls(), 3);
    assert_eq!(idp.successful_refreshes(), 3);
    assert_eq!(idp.token_requests(), 3);
    assert_eq!(idp.requested_scopes(), vec![EWS_SCOPE.to_string(); 3]);
    assert_eq!(idp.tenants()[0], "contoso.onmicrosoft.com");
    assert_eq!(idp.issued_access_tokens().len(), 3);

    idp.revoke_access_token(&at1);
    assert_eq!(idp.is_access_token_valid(&at1), None);
}

#[tokio::test]
async fn revoke_unknown_and_client_errors() {
    let idp = FakeIdp::start().await;
    let c = client(false);
    let rt = idp.seed_refresh_token("bob@contoso.com");

    assert_ms_error(
        &refresh(&c, &idp, "rt-nope").await,
        400,
        "invalid_grant",
        70008,
    );

    idp.revoke_user("bob@contoso.com");
    assert_ms_error(&refresh(&c, &idp, &rt).await, 400, "invalid_grant", 50173);
    // A fresh token for the same user works again.
    let rt2 = idp.seed_refresh_token("bob@contoso.com");
    assert_eq!(refresh(&c, &idp, &rt2).await.status, StatusCode::OK);
    assert!(idp.revoke_refresh_token(&rt2));
    assert_ms_error(&refresh(&c, &idp, &rt2).await, 400, "invalid_grant", 50173);
    assert_eq!(idp.refresh_calls(), 4);
    assert_eq!(idp.successful_refreshes(), 1);

    let r = post_form(
        &c,
        &idp.token_endpoint("common"),
        &[
            ("client_id", "someone-else"),
            ("grant_type", "refresh_token"),
            ("refresh_token", &rt),
        ],
        None,
    )
    .await;
    assert_ms_error(&r, 400, "unauthorized_client", 700016);

    // Confidential client: secret in the body or as Basic auth.
    let idp2 = FakeIdp::start_with(IdpOptions {
        client_secret: Some("s3cr:et+/=".to_string()),
        revoke_on_rotation: true,
        ..Default::default()
    })
    .await;
    let rt = idp2.seed_refresh_token("carol@contoso.com");
    let form = [("grant_type", "refresh_token"), ("refresh_token", &rt)];
    let url = idp2.token_endpoint("common");
    let r = post_form(&c, &url, &form, Some(("test-client-id", "wrong"))).await;
    assert_ms_error(&r, 401, "invalid_client", 7000215);
    let mut with_body = form.to_vec();
    with_body.extend([("client_id", "test-client-id")]);
    let r = post_form(&c, &url, &with_body, None).await;
    assert_ms_error(&r, 401, "invalid_client", 7000215);
    let r = post_form(&c, &url, &form, Some(("test-client-id", "s3cr:et+/="))).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    // revoke_on_rotation: the used token is now dead.
    with_body.push(("client_secret", "s3cr:et+/="));
    let r = post_form(&c, &url, &with_body, None).await;
    assert_ms_error(&r, 400, "invalid_grant", 50173);
    let recs = idp2.requests();
    assert_eq!(recs[2].client_auth, support::ClientAuth::Basic);
    assert_eq!(recs[3].client_auth, support::ClientAuth::Body);
}

#[tokio::test]
async fn faults_and_http_errors() {
    let idp = FakeIdp::start().await;
    let c = client(false);
    let rt = idp.seed_refresh_token("dave@contoso.com");

    idp.set_unavailable(true);
    let r = refresh(&c, &idp, &rt).await;
    assert_ms_error(&r, 503, "temporarily_unavailable", 90006);
    assert_eq!(r.header("retry-after"), "2");
    idp.set_unavailable(false);

    idp.set_throttled(true);
    let r = refresh(&c, &idp, &rt).await;
    assert_eq!(r.status.as_u16(), 429);
    assert_eq!(r.header("retry-after"), "3");
    idp.set_throttled(false);

    idp.set_next_error(500, serde_json::json!({"error": "server_error"}));
    let r = refresh(&c, &idp, &rt).await;
    assert_eq!(r.status.as_u16(), 500);
    assert_eq!(r.json()["error"], "server_error");
    assert_eq!(refresh(&c, &idp, &rt).await.status, StatusCode::OK);
    assert_eq!(idp.refresh_calls(), 4);
    assert_eq!(idp.successful_refreshes(), 1);

    let get = Request::get(idp.token_endpoint("common"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&c, get).await.status.as_u16(), 405);
    let r = post_form(&c, &format!("{}/nope", idp.base_url()), &[], None).await;
    assert_eq!(r.status.as_u16(), 404);
    let big = Request::post(idp.token_endpoint("common"))
        .body(Full::new(Bytes::from(vec![b'a'; 70 * 1024])))
        .unwrap();
    assert_eq!(send(&c, big).await.status.as_u16(), 413);

    idp.set_delay(Duration::from_millis(150));
    let t = std::time::Instant::now();
    refresh(&c, &idp, &rt).await;
    assert!(t.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn device_code_flow() {
    let idp = Arc::new(
        FakeIdp::start_with(IdpOptions {
            interval: 2,
            ..Default::default()
        })
        .await,
    );
    let c = client(false);

    let waiter = {
        let idp = idp.clone();
        tokio::spawn(async move { idp.wait_for_device_code().await })
    };
    let r = new_device_code(&c, &idp).await;
    assert_eq!(r.status, StatusCode::OK);
    let j = r.json();
    let user_code = j["user_code"].as_str().unwrap().to_string();
    let device_code = j["device_code"].as_str().unwrap().to_string();
    assert_eq!(j["interval"], 2);
    assert_eq!(j["expires_in"], 900);
    assert_eq!(j["verification_uri"], "https://microsoft.com/devicelogin");
    assert!(j["message"].as_str().unwrap().contains(&user_code));
    assert_eq!(waiter.await.unwrap(), user_code);
    assert_eq!(idp.last_user_code().as_deref(), Some(user_code.as_str()));

    assert_ms_error(
        &poll_device(&c, &idp, &device_code).await,
        400,
        "authorization_pending",
        70016,
    );
    idp.slow_down_once();
    assert_eq!(
        poll_device(&c, &idp, &device_code).await.json()["error"],
        "slow_down"
    );
    assert!(idp.approve_device(&user_code, "erin@contoso.com"));
    let r = poll_device(&c, &idp, &device_code).await;
    assert_eq!(r.status, StatusCode::OK);
    let j = r.json();
    let at = j["access_token"].as_str().unwrap();
    assert_eq!(
        idp.is_access_token_valid(at).as_deref(),
        Some("erin@contoso.com")
    );
    let rt = j["refresh_token"].as_str().unwrap();
    assert_eq!(
        idp.is_refresh_token_valid(rt).as_deref(),
        Some("erin@contoso.com")
    );
    assert_eq!(
        poll_device(&c, &idp, &device_code).await.json()["error"],
        "invalid_grant"
    );
    assert_eq!(idp.device_polls(), 4);

    // Declined / expired / unknown.
    let j = new_device_code(&c, &idp).await.json();
    assert!(idp.decline_device(j["user_code"].as_str().unwrap()));
    let dc = j["device_code"].as_str().unwrap();
    assert_ms_error(
        &poll_device(&c, &idp, dc).await,
        400,
        "authorization_declined",
        70000,
    );
    let j = new_device_code(&c, &idp).await.json();
    assert_eq!(idp.wait_for_nth_device_code(3).await, j["user_code"]);
    assert!(idp.expire_device(j["user_code"].as_str().unwrap()));
    let dc = j["device_code"].as_str().unwrap();
    assert_ms_error(
        &poll_device(&c, &idp, dc).await,
        400,
        "expired_token",
        70020,
    );
    assert_eq!(
        poll_device(&c, &idp, "nope").await.json()["error"],
        "bad_verification_code"
    );
}

async fn new_device_code(c: &HttpsClient, idp: &FakeIdp) -> Resp {
    post_form(
        c,
        &idp.device_code_endpoint("organizations"),
        &[("client_id", "test-client-id"), ("scope", EWS_SCOPE)],
        None,
    )
    .await
}

async fn poll_device(c: &HttpsClient, idp: &FakeIdp, device_code: &str) -> Resp {
    post_form(
        c,
        &idp.token_endpoint("organizations"),
        &[
            ("client_id", "test-client-id"),
            ("grant_type", support::idp::DEVICE_CODE_GRANT),
            ("device_code", device_code),
        ],
        None,
    )
    .await
}

fn ews_request(url: &str, token: Option<&str>, body: &'static [u8]) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header(header::CONTENT_TYPE, "text/xml; charset=utf-8");
    if let Some(t) = token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    b.body(Full::new(Bytes::from_static(body))).unwrap()
}

const SOAP: &[u8] = b"<?xml version=\"1.0\" encoding=\"utf-8\"?>\r\n<soap:Envelope>\xc3\xa9\t  \r\n</soap:Envelope>\n";

#[tokio::test]
async fn ews_echo_401_and_h2() {
    let idp = FakeIdp::start().await;
    let ews = FakeEws::start(idp.validator()).await;
    let at = idp.seed_access_token("frank@contoso.com");

    for (h2, want) in [(true, "HTTP/2.0"), (false, "HTTP/1.1")] {
        let c = client(h2);
        let url = format!("{}?x=1", ews.ews_url());
        let r = send(&c, ews_request(&url, Some(&at), SOAP)).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(&r.body[..], SOAP, "body must be echoed byte-for-byte");
        assert_eq!(r.header("content-type"), "text/xml; charset=utf-8");
        assert_eq!(r.header("x-echo-method"), "POST");
        assert_eq!(r.header("x-echo-path-and-query"), "/EWS/Exchange.asmx?x=1");
        assert_eq!(r.header("x-echo-mailbox"), "frank@contoso.com");
        assert_eq!(r.header("x-echo-http-version"), want);
        assert_eq!(r.header("x-echo-body-len"), SOAP.len().to_string());
    }

    // 401 shape: bad token, and missing token.
    let c = client(true);
    for token in [Some("at-0-forged"), None] {
        let r = send(&c, ews_request(&ews.ews_url(), token, SOAP)).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert!(r.body.is_empty());
        let www = r.header("www-authenticate");
        assert!(www.starts_with("Bearer client_id=\"00000002-0000-0ff1-ce00-000000000000\""));
        assert!(www.contains("error=\"invalid_token\""));
        assert!(r.header("x-ms-diagnostics").starts_with("2000003;"));
    }
    // Revoked token → 401.
    idp.revoke_access_token(&at);
    let r = send(&c, ews_request(&ews.ews_url(), Some(&at), SOAP)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    assert_eq!(ews.request_count(), 5);
    assert_eq!(ews.accepted_count(), 2);
    assert_eq!(ews.rejected_count(), 3);
    let recs = ews.requests();
    assert_eq!(recs[0].version_str(), "HTTP/2.0");
    assert_eq!(recs[1].version_str(), "HTTP/1.1");
    assert_eq!(&recs[1].body[..], SOAP);
    assert_eq!(recs[1].bearer.as_deref(), Some(at.as_str()));
    assert_eq!(recs[3].bearer, None);
    ews.clear();
    assert_eq!(ews.request_count(), 0);
}

#[tokio::test]
async fn ews_faults_big_response_and_http1_only() {
    let idp = FakeIdp::start().await;
    let ews = FakeEws::start_with(EwsOptions {
        http1_only: true,
        ..EwsOptions::new(idp.validator())
    })
    .await;
    let at = idp.seed_access_token("gina@contoso.com");
    let c = client(true); // offers h2, server only speaks http/1.1

    ews.reject_next(1);
    let r = send(&c, ews_request(&ews.ews_url(), Some(&at), SOAP)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    ews.respond_next_canned(support::server_busy_response(1234));
    ews.respond_next(503, &[("retry-after", "7")], "busy");
    let r = send(&c, ews_request(&ews.ews_url(), Some(&at), SOAP)).await;
    assert_eq!(r.status.as_u16(), 500);
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    assert!(text.contains("ErrorServerBusy") && text.contains(">1234</t:Value>"));
    let r = send(&c, ews_request(&ews.ews_url(), Some(&at), SOAP)).await;
    assert_eq!(r.status.as_u16(), 503);
    assert_eq!(r.header("retry-after"), "7");
    let r = send(&c, ews_request(&ews.ews_url(), Some(&at), SOAP)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-echo-http-version"), "HTTP/1.1");

    let n = 200_000u64;
    let req = Request::get(format!(
        "{}/big-response?bytes={n}&chunk=7000",
        ews.base_url()
    ))
    .header(header::AUTHORIZATION, format!("Bearer {at}"))
    .body(Full::new(Bytes::new()))
    .unwrap();
    let r = send(&c, req).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.len() as u64, n);
    assert_eq!(&r.body[..], &support::expected_big_response(n)[..]);

    ews.set_delay(Duration::from_millis(100));
    let t = std::time::Instant::now();
    send(&c, ews_request(&ews.ews_url(), Some(&at), SOAP)).await;
    assert!(t.elapsed() >= Duration::from_millis(100));
    ews.wait_for_requests(6).await;
    assert_eq!(ews.accepted_count(), 5);
}

fn envelope(header: &str) -> Vec<u8> {
    format!(
        "<?xml version=\"1.0\"?><s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
         xmlns:t=\"http://schemas.microsoft.com/exchange/services/2006/types\">{header}\
         <s:Body><GetFolder/></s:Body></s:Envelope>"
    )
    .into_bytes()
}

fn impersonating(address: &str) -> String {
    format!(
        "<s:Header><t:ExchangeImpersonation><t:ConnectingSID>{address}\
         </t:ConnectingSID></t:ExchangeImpersonation></s:Header>"
    )
}

#[tokio::test]
async fn ews_app_tokens_need_an_anchor_and_a_matching_impersonation() {
    use support::ews::{
        impersonated, EwsBody, IMPERSONATION_DENIED, MISSING_ANCHOR, MISSING_IMPERSONATION,
    };
    let idp = FakeIdp::start().await;
    let ews = FakeEws::start_with(EwsOptions {
        app_tokens: Some(Arc::new(|t: &str| {
            (t == "app-token").then(|| "app-1".to_string())
        })),
        ..EwsOptions::new(idp.validator())
    })
    .await;
    let c = client(true);
    let post = |token: &str, anchor: Option<&str>, body: Vec<u8>| {
        let mut b = Request::builder()
            .method(Method::POST)
            .uri(ews.ews_url())
            .header(header::CONTENT_TYPE, "text/xml; charset=utf-8")
            .header(header::AUTHORIZATION, format!("Bearer {token}"));
        if let Some(a) = anchor {
            b = b.header("x-anchormailbox", a);
        }
        b.body(Full::new(Bytes::from(body))).unwrap()
    };
    let fault = |r: &Resp, status: u16, (code, message): (&str, &str)| {
        assert_eq!(r.status.as_u16(), status);
        let text = String::from_utf8(r.body.to_vec()).unwrap();
        assert!(
            text.contains(&format!(">{code}</e:ResponseCode>")),
            "{text}"
        );
        assert!(text.contains(message), "{text}");
    };
    let alice = "<t:PrimarySmtpAddress>alice@contoso.com</t:PrimarySmtpAddress>";

    // Accepted: anchor and impersonation agree (case aside).
    let ok = envelope(&impersonating(alice));
    let r = send(&c, post("app-token", Some("Alice@Contoso.com"), ok.clone())).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.body[..], &ok[..]);
    assert_eq!(r.header("x-echo-mailbox"), "alice@contoso.com");
    let rec = ews.last_request().unwrap();
    assert!(rec.accepted);
    assert_eq!(rec.app_id.as_deref(), Some("app-1"));
    assert_eq!(rec.mailbox.as_deref(), Some("alice@contoso.com"));
    // Not SOAP: the anchor alone.
    let r = send(
        &c,
        post("app-token", Some("bob@contoso.com"), b"{}".to_vec()),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        ews.last_request().unwrap().mailbox.as_deref(),
        Some("bob@contoso.com")
    );

    // Refused: no impersonation, no anchor, another mailbox, a SID.
    let r = send(
        &c,
        post("app-token", Some("alice@contoso.com"), envelope("")),
    )
    .await;
    fault(&r, 500, MISSING_IMPERSONATION);
    let r = send(
        &c,
        post(
            "app-token",
            Some("alice@contoso.com"),
            envelope("<s:Header/>"),
        ),
    )
    .await;
    fault(&r, 500, MISSING_IMPERSONATION);
    let r = send(&c, post("app-token", None, ok.clone())).await;
    fault(&r, 400, MISSING_ANCHOR);
    let r = send(&c, post("app-token", Some("bob@contoso.com"), ok.clone())).await;
    fault(&r, 500, IMPERSONATION_DENIED);
    let sid = envelope(&impersonating("<t:SID>S-1-5-21</t:SID>"));
    let r = send(&c, post("app-token", Some("alice@contoso.com"), sid)).await;
    fault(&r, 500, IMPERSONATION_DENIED);
    let rec = ews.last_request().unwrap();
    assert!(!rec.accepted);
    assert_eq!(rec.app_id.as_deref(), Some("app-1"));
    assert_eq!(rec.mailbox, None);

    // A delegated token is as before; an unknown one is a 401.
    let at = idp.seed_access_token("carol@contoso.com");
    let r = send(&c, post(&at, None, envelope(""))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(ews.last_request().unwrap().app_id, None);
    let r = send(
        &c,
        post("other-token", Some("alice@contoso.com"), ok.clone()),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // The double's reader.
    assert_eq!(impersonated(b"{}"), EwsBody::Other);
    assert_eq!(impersonated(SOAP), EwsBody::Other, "unbound prefix");
    assert_eq!(impersonated(&envelope("")), EwsBody::Envelope(None));
    assert_eq!(
        impersonated(&envelope(&impersonating(
            "<t:SmtpAddress> a&amp;b@&#x63;.com </t:SmtpAddress>"
        ))),
        EwsBody::Envelope(Some("a&b@c.com".into()))
    );
    assert_eq!(
        impersonated(b"<s:Envelope xmlns:s='http://www.w3.org/2003/05/soap-envelope'><s:Body>"),
        EwsBody::Malformed
    );
}

#[tokio::test]
async fn raw_tls_client_config_and_pem_files() {
    let idp = FakeIdp::start().await;
    let connector = tokio_rustls::TlsConnector::from(pki().client_config());
    let tcp = tokio::net::TcpStream::connect(idp.addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));

    let dir = tempfile::tempdir().unwrap();
    let ca = pki().write_ca_file(dir.path());
    let (cert, key) = pki().write_server_cert_files(dir.path());
    let ca_pem = std::fs::read(&ca).unwrap();
    assert_eq!(
        rustls_pemfile::certs(&mut &ca_pem[..]).count(),
        1,
        "one CA cert"
    );
    assert!(
        rustls_pemfile::private_key(&mut &std::fs::read(&key).unwrap()[..])
            .unwrap()
            .is_some()
    );
    assert!(std::fs::read_to_string(&cert)
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
}

#[tokio::test]
async fn servers_stop_when_dropped() {
    let idp = FakeIdp::start().await;
    let ews = FakeEws::start(idp.validator()).await;
    let addrs = [idp.addr(), ews.addr()];
    drop(ews);
    drop(idp);
    // Abort is asynchronous: allow the runtime a bounded moment to drop the listeners.
    for addr in addrs {
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "{addr} still accepting"
            );
            tokio::task::yield_now().await;
        }
    }
}

// ---- app-only access: the client-credentials grant ---------------------------

const APP_SCOPE: &str = "https://outlook.office365.com/.default";
const APP_TENANT: &str = "fabrikam.onmicrosoft.com";

async fn app_secret_grant(c: &HttpsClient, idp: &FakeIdp, client_id: &str, secret: &str) -> Resp {
    post_form(
        c,
        &idp.token_endpoint(APP_TENANT),
        &[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("client_secret", secret),
            ("scope", APP_SCOPE),
        ],
        None,
    )
    .await
}

async fn app_assertion_grant(c: &HttpsClient, idp: &FakeIdp, client_id: &str, jwt: &str) -> Resp {
    post_form(
        c,
        &idp.token_endpoint(APP_TENANT),
        &[
            ("grant_type", "client_credentials"),
            ("client_id", client_id),
            ("client_assertion_type", support::idp::JWT_BEARER_ASSERTION),
            ("client_assertion", jwt),
            ("scope", APP_SCOPE),
        ],
        None,
    )
    .await
}

fn assert_app_token(r: &Resp) -> String {
    assert_eq!(r.status, StatusCode::OK, "body: {:?}", r.body);
    let j = r.json();
    assert_eq!(j["token_type"], "Bearer");
    assert_eq!(j["expires_in"], 3600);
    assert!(j.get("refresh_token").is_none(), "{j}");
    j["access_token"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn client_credentials_with_secrets() {
    use support::idp::{AppCredential, AppToken};
    let idp = FakeIdp::start().await;
    let c = client(false);
    idp.register_app(APP_TENANT, "app-s", AppCredential::Secret("s3cret".into()));

    let at = assert_app_token(&app_secret_grant(&c, &idp, "app-s", "s3cret").await);
    assert_eq!(
        idp.app_token(&at),
        Some(AppToken {
            tenant: APP_TENANT.into(),
            client_id: "app-s".into()
        })
    );
    let v = idp.validator();
    assert_eq!(v.validate(&at), None, "app tokens are not delegated tokens");
    assert!(v.accepts_for(&at, "anyone@fabrikam.com"));

    let r = app_secret_grant(&c, &idp, "app-s", "wrong").await;
    assert_ms_error(&r, 401, "invalid_client", 7000215);
    let r = app_secret_grant(&c, &idp, "unknown-app", "s3cret").await;
    assert_ms_error(&r, 400, "unauthorized_client", 700016);
    // The registration is per tenant segment.
    let r = post_form(
        &c,
        &idp.token_endpoint("other.onmicrosoft.com"),
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "app-s"),
            ("client_secret", "s3cret"),
            ("scope", APP_SCOPE),
        ],
        None,
    )
    .await;
    assert_ms_error(&r, 400, "unauthorized_client", 700016);
    let r = post_form(
        &c,
        &idp.token_endpoint(APP_TENANT),
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "app-s"),
            ("client_secret", "s3cret"),
            ("scope", "https://outlook.office365.com/Mail.Send"),
        ],
        None,
    )
    .await;
    assert_ms_error(&r, 400, "invalid_scope", 1002012);

    // Faults apply to this grant too.
    idp.set_unavailable(true);
    let r = app_secret_grant(&c, &idp, "app-s", "s3cret").await;
    assert_ms_error(&r, 503, "temporarily_unavailable", 90006);
    idp.set_unavailable(false);

    idp.expire_app_secret(APP_TENANT, "app-s");
    let r = app_secret_grant(&c, &idp, "app-s", "s3cret").await;
    assert_ms_error(&r, 401, "invalid_client", 7000222);
    assert_eq!(idp.client_credentials_calls(APP_TENANT), 6);
    assert_eq!(idp.client_credentials_calls("other.onmicrosoft.com"), 1);

    // Restricted mailboxes, revocation and expiry.
    assert!(idp.restrict_app_mailboxes(APP_TENANT, "app-s", &["Shared@fabrikam.com"]));
    assert!(v.accepts_for(&at, "shared@fabrikam.com"));
    assert!(!v.accepts_for(&at, "ceo@fabrikam.com"));
    assert!(idp.expire_access_token(&at));
    assert!(v.app_token(&at).is_none());
    assert!(!v.accepts_for(&at, "shared@fabrikam.com"));
}

#[tokio::test]
async fn client_credentials_with_certificates() {
    use authswap::token::{AppCertificate, AssertionAlgorithm};
    use support::certs::{app_certificate, APP_KEY_1, APP_KEY_2};
    use support::idp::AppCredential;

    let idp = FakeIdp::start().await;
    let c = client(false);
    let (pem1, der1) = app_certificate(APP_KEY_1, 10);
    let (pem2, _) = app_certificate(APP_KEY_2, 10);
    let cert1 = AppCertificate::from_pem(pem1.as_bytes(), APP_KEY_1.as_bytes()).unwrap();
    let cert2 = AppCertificate::from_pem(pem2.as_bytes(), APP_KEY_2.as_bytes()).unwrap();
    idp.register_app(
        APP_TENANT,
        "app-c",
        AppCredential::Certificate { cert_der: der1 },
    );
    let endpoint = idp.token_endpoint(APP_TENANT);

    let mut tokens = Vec::new();
    for alg in [AssertionAlgorithm::Rs256, AssertionAlgorithm::Ps256] {
        let jwt = cert1.assertion("app-c", &endpoint, alg).unwrap();
        let r = app_assertion_grant(&c, &idp, "app-c", jwt.expose()).await;
        tokens.push(assert_app_token(&r));

        // The same assertion again: its jti was used.
        let r = app_assertion_grant(&c, &idp, "app-c", jwt.expose()).await;
        assert_ms_error(&r, 401, "invalid_client", 700027);
        assert!(r.json()["error_description"]
            .as_str()
            .unwrap()
            .contains("jti"));
    }

    // Wrong audience.
    let jwt = cert1
        .assertion(
            "app-c",
            &idp.token_endpoint("other.onmicrosoft.com"),
            AssertionAlgorithm::Ps256,
        )
        .unwrap();
    let r = app_assertion_grant(&c, &idp, "app-c", jwt.expose()).await;
    assert_ms_error(&r, 401, "invalid_client", 700027);
    assert!(r.json()["error_description"]
        .as_str()
        .unwrap()
        .contains("aud"));

    // Signed with another certificate: its x5t#S256 matches no registration.
    let jwt = cert2
        .assertion("app-c", &endpoint, AssertionAlgorithm::Ps256)
        .unwrap();
    let r = app_assertion_grant(&c, &idp, "app-c", jwt.expose()).await;
    assert_ms_error(&r, 401, "invalid_client", 700027);
    assert!(r.json()["error_description"]
        .as_str()
        .unwrap()
        .contains("x5t#S256"));

    // Another client id in iss/sub than the one authenticating.
    idp.register_app(
        APP_TENANT,
        "app-d",
        AppCredential::Certificate {
            cert_der: cert1.certificate_der().to_vec(),
        },
    );
    let jwt = cert1
        .assertion("app-c", &endpoint, AssertionAlgorithm::Rs256)
        .unwrap();
    let r = app_assertion_grant(&c, &idp, "app-d", jwt.expose()).await;
    assert_ms_error(&r, 401, "invalid_client", 700027);

    // A secret does not authenticate a certificate-only app.
    let r = app_secret_grant(&c, &idp, "app-c", "guess").await;
    assert_ms_error(&r, 401, "invalid_client", 7000215);

    // The tokens are app tokens, for every mailbox until restricted.
    let v = idp.validator();
    for at in &tokens {
        assert!(v.accepts_for(at, "room1@fabrikam.com"));
    }
    idp.restrict_app_mailboxes(APP_TENANT, "app-c", &["room2@fabrikam.com"]);
    assert!(!v.accepts_for(&tokens[0], "room1@fabrikam.com"));
    assert!(v.accepts_for(&tokens[0], "room2@fabrikam.com"));
    idp.revoke_all_access_tokens();
    assert!(!v.accepts_for(&tokens[1], "room2@fabrikam.com"));
    assert_eq!(idp.issued_app_tokens(), tokens);
}

/// A hand-made assertion signed with `key_pem` (RSA PKCS #8), header
/// `x5t#S256` = `x5t`, with the given claims.
fn forged_assertion(key_pem: &str, x5t: &str, claims: &Value) -> String {
    let der = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .unwrap()
        .unwrap();
    let info = pkcs8::PrivateKeyInfo::try_from(der.secret_der()).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.x5t_s256 = Some(x5t.to_string());
    let key = jsonwebtoken::EncodingKey::from_rsa_der(info.private_key);
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

#[tokio::test]
async fn client_assertion_claim_checks() {
    use support::certs::{app_certificate, APP_KEY_1, APP_KEY_2};
    use support::idp::{thumbprint_s256, AppCredential};

    let idp = FakeIdp::start().await;
    let c = client(false);
    let (_, der1) = app_certificate(APP_KEY_1, 10);
    let x5t = thumbprint_s256(&der1);
    idp.register_app(
        APP_TENANT,
        "app-c",
        AppCredential::Certificate { cert_der: der1 },
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = |nbf: u64, exp: u64, jti: &str| {
        serde_json::json!({
            "aud": idp.token_endpoint(APP_TENANT),
            "iss": "app-c", "sub": "app-c",
            "jti": jti, "nbf": nbf, "iat": nbf, "exp": exp,
        })
    };
    let cases = [
        // (signing key, claims, word in the description)
        (APP_KEY_1, claims(now - 900, now - 300, "j1"), "expired"),
        (APP_KEY_1, claims(now, now + 3600, "j2"), "lifetime"),
        (APP_KEY_1, claims(now, now + 300, ""), "jti"),
        (
            APP_KEY_2,
            claims(now, now + 300, "j3"),
            "signature does not verify",
        ),
    ];
    for (key, claims, word) in cases {
        let jwt = forged_assertion(key, &x5t, &claims);
        let r = app_assertion_grant(&c, &idp, "app-c", &jwt).await;
        assert_ms_error(&r, 401, "invalid_client", 700027);
        let desc = r.json()["error_description"].as_str().unwrap().to_string();
        assert!(desc.contains(word), "{word}: {desc}");
    }
    // Within the rules, a hand-made assertion is accepted.
    let jwt = forged_assertion(APP_KEY_1, &x5t, &claims(now, now + 300, "j4"));
    assert_app_token(&app_assertion_grant(&c, &idp, "app-c", &jwt).await);
    assert_eq!(idp.client_credentials_calls(APP_TENANT), 5);
}
