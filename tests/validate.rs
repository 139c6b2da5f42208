//! `identity validate`: every enabled front end proved against its upstream
//! double (EWS GetFolder, SMTP/IMAP/POP3 XOAUTH2 logins), each result
//! recorded with the upstream's answer and its plain-words meaning, the run
//! audited; the CLI's lines and exit codes.

mod support;

use authswap::store::Store;
use support::mail::{ImapOptions, Pop3Options, SmtpOptions};
use support::mailrig::start;

const SMTP_AUTH_DISABLED: &str = "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information. [FAKE0001.namprd00.prod.outlook.com]";

/// What Exchange Online answers to a GetFolder that works.
const GETFOLDER_OK: &str = r#"<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><m:GetFolderResponse xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages"><m:ResponseMessages><m:GetFolderResponseMessage ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode></m:GetFolderResponseMessage></m:ResponseMessages></m:GetFolderResponse></s:Body></s:Envelope>"#;

async fn mail_rig() -> support::mailrig::Mail {
    start(
        SmtpOptions::default(),
        ImapOptions::default(),
        Pop3Options::default(),
    )
    .await
}

#[tokio::test]
async fn every_protocol_passes_and_is_recorded() {
    let m = mail_rig().await;
    m.env.ews.respond_next(
        200,
        &[("content-type", "text/xml; charset=utf-8")],
        GETFOLDER_OK,
    );
    let app = m.server.app().clone();
    let results = authswap::validate::validate(&app, "alice", "test")
        .await
        .unwrap();
    let protocols: Vec<&str> = results.iter().map(|r| r.protocol.as_str()).collect();
    assert_eq!(protocols, ["ews", "smtp", "imap", "pop3"]);
    for r in &results {
        assert!(r.ok, "{r:?}");
        assert!(r.meaning.starts_with("works"), "{r:?}");
    }
    assert!(results[0].answer.contains("NoError"), "{:?}", results[0]);
    assert!(results[1].answer.starts_with("235"), "{:?}", results[1]);

    // The EWS request: GetFolder of the inbox, anchored to the mailbox.
    let req = m.env.ews.last_request().unwrap();
    assert_eq!(req.path_and_query, "/EWS/Exchange.asmx");
    assert_eq!(
        req.header("x-anchormailbox").as_deref(),
        Some("alice@contoso.com")
    );
    let body = String::from_utf8_lossy(&req.body);
    assert!(
        body.contains("GetFolder") && body.contains(r#"Id="inbox""#),
        "{body}"
    );
    // Each mail upstream saw one XOAUTH2 login.
    assert_eq!(m.smtp.auth_successes(), 1);
    assert_eq!(m.imap.auth_successes(), 1);
    assert_eq!(m.pop3.auth_successes(), 1);

    let store = m.env.store().await;
    let id = store.get("alice").await.unwrap().unwrap().id;
    let stored: Vec<_> = store
        .validations()
        .await
        .unwrap()
        .into_iter()
        .filter(|(i, _)| *i == id)
        .collect();
    assert_eq!(stored.len(), 4);
    assert!(stored.iter().all(|(_, v)| v.ok));
    let audit = store.audit_log(Some("alice"), None, 10).await.unwrap();
    let entry = audit
        .iter()
        .find(|a| a.action == "identity.validate")
        .expect("audited");
    assert_eq!(entry.outcome, "ok");
    assert_eq!(entry.actor, "test");
}

#[tokio::test]
async fn smtp_auth_disabled_and_ews_403_are_recorded_and_explained() {
    let m = mail_rig().await;
    m.smtp.refuse_auth_with(Some(SMTP_AUTH_DISABLED));
    m.env.ews.respond_next(
        403,
        &[(
            "x-ms-diagnostics",
            "2000008;reason=\"EWS is disabled for this mailbox\"",
        )],
        "",
    );
    let app = m.server.app().clone();
    let results = authswap::validate::validate(&app, "alice", "admin")
        .await
        .unwrap();
    let by = |p: &str| results.iter().find(|r| r.protocol == p).unwrap().clone();
    let smtp = by("smtp");
    assert!(!smtp.ok);
    assert!(
        smtp.answer.starts_with(
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant"
        ),
        "{smtp:?}"
    );
    assert!(smtp.meaning.contains("SMTP AUTH is disabled"), "{smtp:?}");
    assert!(
        smtp.meaning.contains("SmtpClientAuthenticationDisabled"),
        "{smtp:?}"
    );
    let ews = by("ews");
    assert!(!ews.ok);
    assert!(ews.answer.contains("HTTP 403"), "{ews:?}");
    assert!(ews.meaning.contains("EWS access is blocked"), "{ews:?}");
    assert!(by("imap").ok && by("pop3").ok);
    // A permanent refusal: no refresh-and-retry for it.
    assert_eq!(m.smtp.auth_attempts(), 1);

    let store = m.env.store().await;
    let stored = store.validations().await.unwrap();
    let smtp_stored = stored
        .iter()
        .find(|(_, v)| v.protocol == "smtp")
        .map(|(_, v)| v)
        .unwrap();
    assert_eq!(smtp_stored, &smtp);
    let audit = store.audit_log(Some("alice"), None, 10).await.unwrap();
    let entry = audit
        .iter()
        .find(|a| a.action == "identity.validate")
        .unwrap();
    assert_eq!(entry.outcome, "failed");
    assert!(
        entry
            .detail
            .as_deref()
            .unwrap_or_default()
            .contains("smtp FAILED"),
        "{entry:?}"
    );
    // No token anywhere in what was recorded.
    for t in m.env.idp.issued_access_tokens() {
        for r in &results {
            assert!(!r.answer.contains(&t) && !r.meaning.contains(&t));
        }
    }
}

// Multi-threaded: the doubles keep answering while the test thread waits
// for the child process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_prints_one_line_per_protocol_and_exits_by_result() {
    let env = support::harness::Env::start().await;
    env.add_linked("alice", "alice@contoso.com", "pw-alice-123")
        .await;
    env.ews.respond_next(200, &[], GETFOLDER_OK);
    let out = env.cli(&["identity", "validate", "alice"], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().next().unwrap();
    assert!(
        line.starts_with("ews") && line.contains(" ok ") && line.contains("NoError"),
        "{stdout}"
    );

    env.ews.respond_next(403, &[], "");
    let out = env.cli(&["identity", "validate", "alice", "--json"], None);
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["protocol"], "ews");
    assert_eq!(json[0]["ok"], false);
    assert!(json[0]["meaning"]
        .as_str()
        .unwrap()
        .contains("EWS access is blocked"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("failed validation"));

    // `identity list` shows the last validation per protocol.
    let out = env.cli(&["identity", "list"], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("VALIDATION") && stdout.contains("ews:FAILED"),
        "{stdout}"
    );
    let out = env.cli(&["identity", "list", "--json"], None);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["validation"][0]["protocol"], "ews");
    assert_eq!(json[0]["validation"][0]["ok"], false);

    let out = env.cli(&["identity", "validate", "nobody"], None);
    assert_eq!(out.status.code(), Some(1));
}
