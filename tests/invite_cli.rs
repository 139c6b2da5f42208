//! `authswap invite` and `authswap identity import-csv` against a real
//! store, and a running `serve` picking their results up.

mod support;

use authswap::onboarding::invite::{hash_secret, normalise_code};
use authswap::store::{InvitationState, Status, Store};
use support::harness::Env;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test]
async fn invite_creates_the_identity_prints_json_and_reinvite_revokes() {
    let env = Env::start().await;
    let out = env.cli(
        &[
            "invite",
            "alice",
            "--mailbox",
            "Alice@Contoso.com",
            "--generate-password",
            "--json",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["identity"], "alice");
    let url = v["url"].as_str().unwrap();
    let code = v["code"].as_str().unwrap();
    assert!(url.contains("/i/"), "{url}");
    assert!(v["expires_at"].as_str().unwrap().starts_with("20"));
    assert!(stderr(&out).contains("shown once"));

    let store = env.store().await;
    let alice = store.get("alice").await.unwrap().unwrap();
    assert_eq!(alice.status, Status::Pending);
    assert!(alice.password_hash.starts_with("$argon2id$"));
    let token = url.rsplit('/').next().unwrap();
    let first = store
        .invitation_by_token(&hash_secret(token))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.state, InvitationState::Pending);
    assert_eq!(
        store
            .invitation_by_code(&hash_secret(&normalise_code(code)))
            .await
            .unwrap()
            .unwrap()
            .id,
        first.id
    );

    // Re-invite: the first one is revoked.
    let out = env.cli(&["invite", "alice"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("link: "));
    let first = store.invitation(first.id).await.unwrap().unwrap();
    assert_eq!(first.state, InvitationState::Revoked);

    let out = env.cli(&["invite", "list", "--json"], None);
    let list: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let states: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["pending", "revoked"]);
    assert!(!stdout(&out).contains(token), "no link token in the list");

    let out = env.cli(&["invite", "revoke", "alice"], None);
    assert!(out.status.success());
    assert!(stdout(&out).contains("1 pending invitation(s)"));
    let out = env.cli(&["invite", "list"], None);
    assert!(!stdout(&out).contains("pending"), "{}", stdout(&out));

    // A mailbox that disagrees with the identity is refused.
    let out = env.cli(&["invite", "alice", "--mailbox", "bob@contoso.com"], None);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is for"), "{}", stderr(&out));
    // Unknown identity without a mailbox.
    let out = env.cli(&["invite", "nobody"], None);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--mailbox"));

    // The audit log has the CLI's actions.
    let log = store.audit_log(Some("alice"), None, 50).await.unwrap();
    let actions: Vec<&str> = log.iter().map(|e| e.action.as_str()).collect();
    for want in ["identity.create", "invitation.create", "invitation.revoke"] {
        assert!(actions.contains(&want), "{actions:?}");
    }
}

#[tokio::test]
async fn import_csv_is_all_or_nothing_then_invite_all_pending() {
    let env = Env::start().await;
    env.add_linked("linked", "linked@contoso.com", "pw-linked-123")
        .await;
    let bad = env.dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        "name,mailbox,password\nalice,alice@contoso.com,generate\nbob,bob-at-contoso,\n",
    )
    .unwrap();
    let out = env.cli(&["identity", "import-csv", bad.to_str().unwrap()], None);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("bad.csv:3: mailbox"),
        "{}",
        stderr(&out)
    );
    let store = env.store().await;
    assert!(
        store.get("alice").await.unwrap().is_none(),
        "nothing imported"
    );

    let good = env.dir.path().join("good.csv");
    std::fs::write(
        &good,
        "name,mailbox,password\nalice,alice@contoso.com,generate\nbob,bob@contoso.com,\n",
    )
    .unwrap();
    let out = env.cli(
        &["identity", "import-csv", good.to_str().unwrap(), "--json"],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["generated_password"].as_str().unwrap().len(), 20);
    assert!(rows[1]["generated_password"].is_null());

    let out = env.cli(&["invite", "--all-pending", "--json"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let invited: Vec<String> = stdout(&out)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["identity"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(
        invited,
        ["alice", "bob"],
        "the linked identity is not invited"
    );
}

#[tokio::test]
async fn forget_deletes_registration_data_and_serve_stops_using_it() {
    let env = Env::start().await;
    let refresh_token = env
        .add_linked("alice", "alice.smith@contoso.com", "pw-alice-123")
        .await;
    let server = env.serve().await;
    let client = support::harness::HttpClient::default();
    let addr = server.http_addr().unwrap();
    let r = client
        .ews(addr, "alice", "pw-alice-123", support::harness::SOAP)
        .await;
    assert_eq!(r.status, http::StatusCode::OK);

    let out = env.cli(&["identity", "forget", "alice"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let store = env.store().await;
    let alice = store.get("alice").await.unwrap().unwrap();
    assert_eq!(alice.status, Status::Pending);
    assert!(!alice.has_refresh_token);
    assert!(alice.mailbox.is_empty());
    // The running server drops alice's cached access token.
    let mut refused = false;
    for _ in 0..50 {
        let r = client
            .ews(addr, "alice", "pw-alice-123", support::harness::SOAP)
            .await;
        if r.status != http::StatusCode::OK {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(refused, "a forgotten identity is not served");
    drop(server);
    let mut bytes = std::fs::read(env.dir.path().join("data/authswap.db")).unwrap();
    bytes.extend(std::fs::read(env.dir.path().join("data/authswap.db-wal")).unwrap_or_default());
    for needle in [
        "alice.smith@contoso.com",
        "alice.smith",
        refresh_token.as_str(),
    ] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{needle} still in the database file"
        );
    }
}
