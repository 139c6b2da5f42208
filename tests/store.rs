//! The store's behaviour, written once over `&dyn Store` and run against
//! both engines: the embedded SQLite file and PostgreSQL (a throwaway
//! cluster started by `support::pg`; skipped loudly when PostgreSQL is not
//! installed, a failure when `CI` is set). Also: a database migrated by a
//! newer authswap is refused, a replica with another sealing key refuses to
//! start, and `serve` plus the CLI work end to end on PostgreSQL. At the
//! end (`outage`): PostgreSQL stopped and started again under load, on a
//! cluster of that test's own.

mod support;

use authswap::config::Config;
use authswap::secret::Secret;
use authswap::store::{
    open_sealer, Completion, InvitationState, KeyError, KeyUse, LinkedAccount, Mode, NewAudit,
    NewIdentity, NewInvitation, Sealer, Signin, Status, Store, StoreError, ValidationRecord,
};
use std::sync::Arc;
use tempfile::TempDir;

/// A fresh SQLite store (through `store::open`) and the directory holding it.
async fn sqlite() -> (Arc<dyn Store>, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.store.path = dir.path().join("data/authswap.db");
    config.store.key_file = dir.path().join("data/authswap.key");
    (authswap::store::open(&config).await.unwrap(), dir)
}

/// The configuration of a fresh PostgreSQL database, or `None` to skip.
async fn postgres_config() -> Option<(Config, TempDir)> {
    let url = support::pg::database().await?;
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.store.url = Some(url);
    config.store.path = dir.path().join("unused.db");
    config.store.key_file = dir.path().join("authswap.key");
    Some((config, dir))
}

/// A fresh PostgreSQL store (through `store::open`), or `None` to skip.
async fn postgres() -> Option<Arc<dyn Store>> {
    let (config, _dir) = postgres_config().await?;
    Some(authswap::store::open(&config).await.unwrap())
}

/// Runs each behaviour against SQLite and PostgreSQL.
macro_rules! on_both_engines {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                let (store, _dir) = super::sqlite().await;
                super::$name(store.as_ref()).await;
            }

            #[tokio::test]
            async fn postgres() {
                if let Some(store) = super::postgres().await {
                    super::$name(store.as_ref()).await;
                }
            }
        }
    )*};
}

on_both_engines!(
    create_get_list,
    create_many_is_all_or_nothing,
    link_and_rotate_compare_and_set,
    refresh_outcomes_and_status,
    upstream_refusal,
    tenant_blocks,
    invitations,
    signins_and_admin_links_work_once,
    validations_and_notifications,
    audit_log_pages,
    forget_and_remove,
    token_keys,
);

fn delegated(name: &str) -> NewIdentity {
    NewIdentity::delegated(name, &format!("{name}@contoso.com"), "$argon2id$hash")
}

fn sealer() -> Sealer {
    Sealer::from_key(&[7; 32])
}

fn seal(id: i64, token: &str) -> authswap::store::SealedToken {
    sealer().seal(id, &Secret::new(token))
}

async fn create_get_list(store: &dyn Store) {
    let r0 = store.revision().await.unwrap();
    let bob = store.create(&delegated("Bob")).await.unwrap();
    assert_eq!(bob.status, Status::Pending);
    assert_eq!(bob.name, "Bob");
    assert_eq!(bob.mailbox, "Bob@contoso.com");
    assert_eq!(bob.tenant, "default");
    assert_eq!(bob.mode, Mode::Delegated);
    assert!(!bob.has_refresh_token);
    assert_eq!(bob.token_generation, 0);
    assert!(store.revision().await.unwrap() > r0, "create bumps");

    let app = store
        .create(&NewIdentity {
            name: " Ärger ".into(),
            mailbox: " scanner@fabrikam.com ".into(),
            password_hash: "h".into(),
            tenant: "fabrikam".into(),
            mode: Mode::App,
        })
        .await
        .unwrap();
    assert_eq!(app.status, Status::Linked, "app-only needs no link");
    assert_eq!(app.name, "Ärger", "trimmed");
    assert_eq!(app.mailbox, "scanner@fabrikam.com");
    assert_eq!((app.tenant.as_str(), app.mode), ("fabrikam", Mode::App));
    store.create(&delegated("alice")).await.unwrap();

    // Names are case-insensitive (Unicode too), for lookups and uniqueness.
    assert_eq!(store.get("BOB").await.unwrap().unwrap().id, bob.id);
    assert_eq!(store.get("ärger").await.unwrap().unwrap().id, app.id);
    assert!(store.get("nobody").await.unwrap().is_none());
    for taken in ["bob", " BOB ", "ÄRGER"] {
        match store.create(&delegated(taken)).await {
            Err(StoreError::AlreadyExists(n)) => assert_eq!(n, taken.trim()),
            other => panic!("{taken}: {other:?}"),
        }
    }
    // Ordered by the lookup key, bytewise (as SQLite does).
    let names: Vec<String> = store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, ["alice", "Bob", "Ärger"]);

    let r1 = store.revision().await.unwrap();
    store.set_password("bob", "$new").await.unwrap();
    assert_eq!(
        store.get("bob").await.unwrap().unwrap().password_hash,
        "$new"
    );
    assert!(
        store.revision().await.unwrap() > r1,
        "password change bumps"
    );
    assert!(matches!(
        store.set_password("nobody", "x").await,
        Err(StoreError::NotFound(_))
    ));
    let r2 = store.revision().await.unwrap();
    store.set_mailbox("BOB", " b@x ").await.unwrap();
    assert_eq!(store.get("bob").await.unwrap().unwrap().mailbox, "b@x");
    assert!(store.revision().await.unwrap() > r2, "mailbox change bumps");
    assert!(matches!(
        store.set_mailbox("nobody", "x").await,
        Err(StoreError::NotFound(_))
    ));
}

async fn create_many_is_all_or_nothing(store: &dyn Store) {
    store.create(&delegated("taken")).await.unwrap();
    let r0 = store.revision().await.unwrap();
    let batch = [delegated("a1"), delegated("a2"), delegated("TAKEN")];
    assert!(matches!(
        store.create_many(&batch, "cli").await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert!(store.get("a1").await.unwrap().is_none(), "rolled back");
    assert_eq!(store.revision().await.unwrap(), r0);
    let dup = [delegated("b1"), delegated("B1")];
    assert!(store.create_many(&dup, "cli").await.is_err());
    assert!(store.get("b1").await.unwrap().is_none());

    let made = store
        .create_many(&[delegated("c1"), delegated("c2")], "admin")
        .await
        .unwrap();
    assert_eq!(made.len(), 2);
    assert!(store.revision().await.unwrap() > r0);
    let log = store.audit_log(None, None, 10).await.unwrap();
    assert_eq!(log.len(), 2, "one audit entry per imported identity");
    assert_eq!(log[0].identity.as_deref(), Some("c2"));
    assert_eq!(
        (
            log[1].actor.as_str(),
            log[1].action.as_str(),
            log[1].outcome.as_str()
        ),
        ("admin", "identity.create", "ok")
    );
    assert_eq!(log[1].detail.as_deref(), Some("imported"));
}

async fn link_and_rotate_compare_and_set(store: &dyn Store) {
    let rec = store.create(&delegated("carol")).await.unwrap();
    assert!(store.refresh_token(rec.id).await.unwrap().is_none());
    let r0 = store.revision().await.unwrap();
    let t1 = seal(rec.id, "rt-1");
    store.link(rec.id, &t1).await.unwrap();
    assert!(store.revision().await.unwrap() > r0, "link bumps");
    let got = store.get("carol").await.unwrap().unwrap();
    assert_eq!(got.status, Status::Linked);
    assert!(got.has_refresh_token);
    assert_eq!(got.token_generation, 1);
    assert!(got.linked_at.is_some());
    assert!(got.account.is_none());
    assert_eq!(
        store.refresh_token(rec.id).await.unwrap(),
        Some((t1.clone(), 1))
    );
    assert_eq!(
        sealer()
            .open(
                rec.id,
                &store.refresh_token(rec.id).await.unwrap().unwrap().0
            )
            .unwrap()
            .expose(),
        "rt-1"
    );

    // Rotation: compare-and-set on the generation; a plain rotation does not
    // bump the revision.
    let r1 = store.revision().await.unwrap();
    let t2 = seal(rec.id, "rt-2");
    assert!(store.rotate(rec.id, 1, &t2, 100).await.unwrap());
    assert_eq!(store.revision().await.unwrap(), r1);
    let got = store.get("carol").await.unwrap().unwrap();
    assert_eq!(got.last_success_at, Some(100));
    assert_eq!(got.token_generation, 1, "rotation keeps the generation");
    assert_eq!(
        store.refresh_token(rec.id).await.unwrap(),
        Some((t2.clone(), 1))
    );

    // Re-linked meanwhile: the stale rotation changes nothing.
    let account = LinkedAccount {
        upn: "carol@contoso.com".into(),
        oid: "oid-1".into(),
        tid: "tid-1".into(),
    };
    let t3 = seal(rec.id, "rt-3");
    store.link_account(rec.id, &t3, &account).await.unwrap();
    let got = store.get("carol").await.unwrap().unwrap();
    assert_eq!(got.token_generation, 2);
    assert_eq!(got.account, Some(account));
    assert!(!store
        .rotate(rec.id, 1, &seal(rec.id, "stale"), 101)
        .await
        .unwrap());
    assert_eq!(store.refresh_token(rec.id).await.unwrap(), Some((t3, 2)));

    // A rotation that recovers from needs_reauth bumps and audits.
    store
        .record_failure(rec.id, true, "AADSTS70008", 102)
        .await
        .unwrap();
    let r2 = store.revision().await.unwrap();
    assert!(store.rotate(rec.id, 2, &t2, 103).await.unwrap());
    assert!(store.revision().await.unwrap() > r2);
    assert_eq!(
        store.get("carol").await.unwrap().unwrap().status,
        Status::Linked
    );
    let log = store.audit_log(Some("carol"), None, 1).await.unwrap();
    assert_eq!(log[0].action, "status.recovered");

    assert!(matches!(
        store.rotate(9_999_999, 0, &t2, 1).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.link(9_999_999, &t2).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn refresh_outcomes_and_status(store: &dyn Store) {
    let rec = store.create(&delegated("dave")).await.unwrap();
    store.link(rec.id, &seal(rec.id, "rt")).await.unwrap();
    // Times after the link's own success.
    let t = authswap::store::now_unix() + 1000;

    // A transient failure: error and time recorded, no status change, no bump.
    let r0 = store.revision().await.unwrap();
    store
        .record_failure(rec.id, false, "timeout", t + 10)
        .await
        .unwrap();
    assert_eq!(store.revision().await.unwrap(), r0);
    let got = store.get("dave").await.unwrap().unwrap();
    assert_eq!(got.status, Status::Linked);
    assert_eq!(got.last_error.as_deref(), Some("timeout"));
    assert_eq!(got.last_failure_at, Some(t + 10));
    assert!(!got.is_ok(), "failed after the last success");

    store.record_success(rec.id, t + 11).await.unwrap();
    assert_eq!(store.revision().await.unwrap(), r0, "still linked: no bump");
    let got = store.get("dave").await.unwrap().unwrap();
    assert_eq!(got.last_error, None);
    assert_eq!(got.last_success_at, Some(t + 11));
    assert!(got.is_ok());

    // Needs re-authentication: status, bump, one audit entry.
    store
        .record_failure(rec.id, true, "AADSTS700082", t + 12)
        .await
        .unwrap();
    let r1 = store.revision().await.unwrap();
    assert!(r1 > r0);
    store
        .record_failure(rec.id, true, "AADSTS700082", t + 13)
        .await
        .unwrap();
    let got = store.get("dave").await.unwrap().unwrap();
    assert_eq!(got.status, Status::NeedsReauth);
    assert_eq!(got.last_error.as_deref(), Some("AADSTS700082"));
    let log = store.audit_log(Some("dave"), None, 100).await.unwrap();
    let needs: Vec<_> = log
        .iter()
        .filter(|e| e.action == "status.needs_reauth")
        .collect();
    assert_eq!(needs.len(), 1, "audited once");
    assert_eq!(
        (
            needs[0].actor.as_str(),
            needs[0].outcome.as_str(),
            needs[0].detail.as_deref()
        ),
        ("system", "needs_reauth", Some("AADSTS700082"))
    );

    let r2 = store.revision().await.unwrap();
    store.record_success(rec.id, t + 14).await.unwrap();
    assert!(store.revision().await.unwrap() > r2, "recovery bumps");
    assert_eq!(
        store.get("dave").await.unwrap().unwrap().status,
        Status::Linked
    );
    assert!(matches!(
        store.record_success(9_999_999, 1).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.record_failure(9_999_999, false, "x", 1).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn upstream_refusal(store: &dyn Store) {
    let rec = store.create(&delegated("erin")).await.unwrap();
    store.link(rec.id, &seal(rec.id, "rt")).await.unwrap();
    let words = "535 5.7.139 SMTP AUTH is disabled";
    let r0 = store.revision().await.unwrap();
    store
        .set_upstream_refusal(rec.id, Some(words), 5)
        .await
        .unwrap();
    let r1 = store.revision().await.unwrap();
    assert!(r1 > r0);
    let got = store.get("erin").await.unwrap().unwrap();
    assert_eq!(got.status, Status::UpstreamRefused);
    assert_eq!(got.last_error.as_deref(), Some(words));
    assert_eq!(got.shown_status(), "upstream_refused");
    // Same words: no change; token refreshes leave it alone.
    store
        .set_upstream_refusal(rec.id, Some(words), 6)
        .await
        .unwrap();
    assert_eq!(store.revision().await.unwrap(), r1);
    assert!(store
        .rotate(rec.id, 1, &seal(rec.id, "rt2"), 7)
        .await
        .unwrap());
    store.record_success(rec.id, 8).await.unwrap();
    assert_eq!(
        store.get("erin").await.unwrap().unwrap().status,
        Status::UpstreamRefused
    );
    // Needs re-authentication wins over the refusal.
    store.record_failure(rec.id, true, "gone", 9).await.unwrap();
    assert_eq!(
        store.get("erin").await.unwrap().unwrap().status,
        Status::NeedsReauth
    );
    store.record_success(rec.id, 10).await.unwrap();
    let r2 = store.revision().await.unwrap();
    store.set_upstream_refusal(rec.id, None, 11).await.unwrap();
    assert!(store.revision().await.unwrap() > r2);
    let got = store.get("erin").await.unwrap().unwrap();
    assert_eq!((got.status, got.last_error), (Status::Linked, None));
    assert_eq!(got.last_success_at, Some(11));
    let r3 = store.revision().await.unwrap();
    store.set_upstream_refusal(rec.id, None, 12).await.unwrap();
    assert_eq!(store.revision().await.unwrap(), r3, "nothing to clear");
    // Linking again clears a refusal.
    store
        .set_upstream_refusal(rec.id, Some(words), 13)
        .await
        .unwrap();
    store.link(rec.id, &seal(rec.id, "rt3")).await.unwrap();
    assert_eq!(
        store.get("erin").await.unwrap().unwrap().status,
        Status::Linked
    );
    let actions: Vec<String> = store
        .audit_log(Some("erin"), None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert!(actions.contains(&"status.upstream_refused".to_owned()));
}

async fn tenant_blocks(store: &dyn Store) {
    let app = |name: &str, tenant: &str| NewIdentity {
        name: name.into(),
        mailbox: format!("{name}@x"),
        password_hash: "h".into(),
        tenant: tenant.into(),
        mode: Mode::App,
    };
    store.create(&app("scan1", "fabrikam")).await.unwrap();
    store.create(&app("scan2", "other")).await.unwrap();
    let r0 = store.revision().await.unwrap();
    assert!(store
        .set_tenant_block("fabrikam", Some("AADSTS7000222 secret expired"), 50)
        .await
        .unwrap());
    assert!(store.revision().await.unwrap() > r0);
    let r1 = store.revision().await.unwrap();
    assert!(
        !store
            .set_tenant_block("fabrikam", Some("AADSTS7000222 secret expired"), 51)
            .await
            .unwrap(),
        "same reason: no change"
    );
    assert_eq!(store.revision().await.unwrap(), r1);
    assert!(store
        .set_tenant_block("fabrikam", Some("AADSTS7000215 wrong secret"), 52)
        .await
        .unwrap());
    assert_eq!(
        store.tenant_blocks().await.unwrap(),
        vec![(
            "fabrikam".to_owned(),
            "AADSTS7000215 wrong secret".to_owned(),
            50
        )]
    );
    let s1 = store.get("scan1").await.unwrap().unwrap();
    assert_eq!(
        s1.tenant_block.as_deref(),
        Some("AADSTS7000215 wrong secret")
    );
    assert_eq!(s1.shown_status(), "app_credential");
    assert_eq!(s1.shown_error(), Some("AADSTS7000215 wrong secret"));
    assert!(!s1.is_ok());
    let s2 = store.get("scan2").await.unwrap().unwrap();
    assert_eq!(s2.tenant_block, None);
    assert!(s2.is_ok());
    assert!(store
        .list()
        .await
        .unwrap()
        .iter()
        .any(|r| r.name == "scan1" && r.tenant_block.is_some()));
    let log = store.audit_log(None, None, 1).await.unwrap();
    assert_eq!(
        (log[0].action.as_str(), log[0].outcome.as_str()),
        ("tenant.blocked", "fabrikam")
    );

    assert!(store.set_tenant_block("fabrikam", None, 60).await.unwrap());
    assert!(!store.set_tenant_block("fabrikam", None, 61).await.unwrap());
    assert!(store.tenant_blocks().await.unwrap().is_empty());
    assert_eq!(
        store.get("scan1").await.unwrap().unwrap().tenant_block,
        None
    );
}

fn invitation(identity_id: i64, n: u8, created_at: i64, expires_at: i64) -> NewInvitation {
    NewInvitation {
        identity_id,
        token_hash: vec![n; 32],
        code_hash: vec![n.wrapping_add(100); 32],
        created_at,
        expires_at,
        actor: "cli".into(),
    }
}

async fn invitations(store: &dyn Store) {
    let now = authswap::store::now_unix();
    let rec = store.create(&delegated("frank")).await.unwrap();
    let r0 = store.revision().await.unwrap();
    let first = store
        .create_invitation(&invitation(rec.id, 1, now, now + 3600))
        .await
        .unwrap();
    assert!(store.revision().await.unwrap() > r0);
    assert_eq!(first.state, InvitationState::Pending);
    assert_eq!(
        (
            first.identity.as_str(),
            first.mailbox.as_str(),
            first.tenant.as_str()
        ),
        ("frank", "frank@contoso.com", "default")
    );
    assert_eq!(
        store.invitation_by_token(&[1; 32]).await.unwrap(),
        Some(first.clone())
    );
    assert_eq!(
        store.invitation_by_code(&[101; 32]).await.unwrap(),
        Some(first.clone())
    );
    assert!(store.invitation_by_token(&[9; 32]).await.unwrap().is_none());

    // A newer invitation revokes the older pending one.
    let second = store
        .create_invitation(&invitation(rec.id, 2, now + 1, now + 3600))
        .await
        .unwrap();
    let old = store.invitation(first.id).await.unwrap().unwrap();
    assert_eq!(old.state, InvitationState::Revoked);
    assert_eq!(old.finished_at, Some(now + 1));
    let listed: Vec<i64> = store
        .list_invitations()
        .await
        .unwrap()
        .iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(listed, vec![second.id, first.id], "newest first");

    // Completing: links the identity, once.
    let account = LinkedAccount {
        upn: "frank@contoso.com".into(),
        oid: "o".into(),
        tid: "t".into(),
    };
    let token = seal(rec.id, "rt-invited");
    assert_eq!(
        store
            .complete_invitation(first.id, &token, &account, now + 2)
            .await
            .unwrap(),
        Completion::NotPending(InvitationState::Revoked)
    );
    assert_eq!(
        store
            .complete_invitation(second.id, &token, &account, now + 2)
            .await
            .unwrap(),
        Completion::Linked
    );
    let got = store.get("frank").await.unwrap().unwrap();
    assert_eq!(got.status, Status::Linked);
    assert_eq!(got.account, Some(account.clone()));
    assert_eq!(got.token_generation, 1);
    assert_eq!(
        store.invitation(second.id).await.unwrap().unwrap().state,
        InvitationState::Completed
    );
    assert_eq!(
        store
            .complete_invitation(second.id, &token, &account, now + 3)
            .await
            .unwrap(),
        Completion::NotPending(InvitationState::Completed)
    );
    assert_eq!(
        store
            .complete_invitation(9_999_999, &token, &account, now)
            .await
            .unwrap(),
        Completion::NotPending(InvitationState::Revoked)
    );

    // Expiry is applied at read time and refuses completion.
    let expired = store
        .create_invitation(&invitation(rec.id, 3, now - 100, now - 1))
        .await
        .unwrap();
    // (Read at its creation time, it was still pending.)
    assert_eq!(expired.state, InvitationState::Pending);
    assert_eq!(
        store.invitation(expired.id).await.unwrap().unwrap().state,
        InvitationState::Expired
    );
    assert_eq!(
        store
            .complete_invitation(expired.id, &token, &account, now)
            .await
            .unwrap(),
        Completion::NotPending(InvitationState::Expired)
    );

    // Revoking: how many, and only pending ones.
    let third = store
        .create_invitation(&invitation(rec.id, 4, now, now + 60))
        .await
        .unwrap();
    store
        .put_signin(&signin(third.id, 40, now + 600))
        .await
        .unwrap();
    let r1 = store.revision().await.unwrap();
    assert_eq!(store.revoke_invitations(rec.id, now + 5).await.unwrap(), 1);
    assert!(store.revision().await.unwrap() > r1);
    assert_eq!(
        store.invitation(third.id).await.unwrap().unwrap().state,
        InvitationState::Revoked
    );
    assert!(
        store.take_signin(&[40; 32], now).await.unwrap().is_none(),
        "revoking drops the sign-ins in progress"
    );
    let r2 = store.revision().await.unwrap();
    assert_eq!(store.revoke_invitations(rec.id, now + 6).await.unwrap(), 0);
    assert_eq!(store.revision().await.unwrap(), r2);

    // Unique hashes.
    assert!(store
        .create_invitation(&invitation(rec.id, 4, now, now + 60))
        .await
        .is_err());
}

fn signin(invitation_id: i64, n: u8, expires_at: i64) -> Signin {
    Signin {
        state_hash: vec![n; 32],
        invitation_id,
        verifier: Secret::new(format!("verifier-{n}")),
        nonce: format!("nonce-{n}"),
        expires_at,
    }
}

async fn signins_and_admin_links_work_once(store: &dyn Store) {
    let now = authswap::store::now_unix();
    let rec = store.create(&delegated("gina")).await.unwrap();
    let inv = store
        .create_invitation(&invitation(rec.id, 1, now, now + 3600))
        .await
        .unwrap();
    store
        .put_signin(&signin(inv.id, 10, now + 600))
        .await
        .unwrap();
    store
        .put_signin(&signin(inv.id, 11, now + 1))
        .await
        .unwrap();
    let taken = store.take_signin(&[10; 32], now).await.unwrap().unwrap();
    assert_eq!(taken, signin(inv.id, 10, now + 600));
    assert!(
        store.take_signin(&[10; 32], now).await.unwrap().is_none(),
        "single use"
    );
    assert!(
        store
            .take_signin(&[11; 32], now + 1)
            .await
            .unwrap()
            .is_none(),
        "expired"
    );
    assert!(store.take_signin(&[12; 32], now).await.unwrap().is_none());

    store.put_admin_link(&[1; 32], now + 300).await.unwrap();
    store.put_admin_link(&[2; 32], now + 1).await.unwrap();
    assert!(store.take_admin_link(&[1; 32], now).await.unwrap());
    assert!(!store.take_admin_link(&[1; 32], now).await.unwrap(), "once");
    assert!(!store.take_admin_link(&[2; 32], now + 1).await.unwrap());
    assert!(!store.take_admin_link(&[3; 32], now).await.unwrap());
}

async fn validations_and_notifications(store: &dyn Store) {
    let a = store.create(&delegated("hank")).await.unwrap();
    let b = store.create(&delegated("ida")).await.unwrap();
    let v = |protocol: &str, at: i64, ok: bool| ValidationRecord {
        protocol: protocol.into(),
        at,
        ok,
        answer: format!("answer {at}"),
        meaning: "meaning".into(),
    };
    store
        .record_validation(b.id, &v("smtp", 1, false))
        .await
        .unwrap();
    store
        .record_validation(a.id, &v("smtp", 2, true))
        .await
        .unwrap();
    store
        .record_validation(a.id, &v("ews", 3, true))
        .await
        .unwrap();
    store
        .record_validation(b.id, &v("smtp", 4, true))
        .await
        .unwrap();
    assert_eq!(
        store.validations().await.unwrap(),
        vec![
            (a.id, v("ews", 3, true)),
            (a.id, v("smtp", 2, true)),
            (b.id, v("smtp", 4, true)),
        ],
        "one per identity and protocol, the last one"
    );

    assert!(store
        .claim_notification(a.id, "needs_reauth", 1000, 3600)
        .await
        .unwrap());
    assert!(!store
        .claim_notification(a.id, "needs_reauth", 1001, 3600)
        .await
        .unwrap());
    assert!(store
        .claim_notification(a.id, "expiring", 1001, 3600)
        .await
        .unwrap());
    assert!(store
        .claim_notification(b.id, "needs_reauth", 1001, 3600)
        .await
        .unwrap());
    assert!(store
        .claim_notification(a.id, "needs_reauth", 4600, 3600)
        .await
        .unwrap());
    assert!(!store
        .claim_notification(a.id, "needs_reauth", 4601, 3600)
        .await
        .unwrap());
}

async fn audit_log_pages(store: &dyn Store) {
    for i in 0..5 {
        let detail = format!("d{i}");
        store
            .audit(&NewAudit {
                actor: "admin",
                action: "identity.test",
                identity: Some(if i % 2 == 0 { "even" } else { "odd" }),
                outcome: "ok",
                detail: Some(&detail),
            })
            .await
            .unwrap();
    }
    store
        .audit(&NewAudit {
            actor: "cli",
            action: "config.test",
            identity: None,
            outcome: "ok",
            detail: None,
        })
        .await
        .unwrap();
    let all = store.audit_log(None, None, 100).await.unwrap();
    assert_eq!(all.len(), 6);
    assert!(all.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    assert_eq!(all[0].identity, None);
    assert!(all[0].at > 0);
    let page = store.audit_log(None, None, 2).await.unwrap();
    assert_eq!(page, all[..2]);
    let next = store.audit_log(None, Some(page[1].id), 2).await.unwrap();
    assert_eq!(next, all[2..4]);
    let even = store.audit_log(Some("even"), None, 100).await.unwrap();
    let details: Vec<_> = even.iter().map(|e| e.detail.clone().unwrap()).collect();
    assert_eq!(details, ["d4", "d2", "d0"]);
    let older = store
        .audit_log(Some("even"), Some(even[0].id), 100)
        .await
        .unwrap();
    assert_eq!(older, even[1..]);
    assert_eq!(
        store.audit_log(None, None, 0).await.unwrap().len(),
        1,
        "at least one"
    );
}

async fn forget_and_remove(store: &dyn Store) {
    let now = authswap::store::now_unix();
    let rec = store.create(&delegated("jack")).await.unwrap();
    let account = LinkedAccount {
        upn: "jack@contoso.com".into(),
        oid: "o".into(),
        tid: "t".into(),
    };
    store
        .link_account(rec.id, &seal(rec.id, "rt"), &account)
        .await
        .unwrap();
    store
        .set_upstream_refusal(rec.id, Some("refused"), 3)
        .await
        .unwrap();
    store
        .record_validation(
            rec.id,
            &ValidationRecord {
                protocol: "smtp".into(),
                at: 1,
                ok: true,
                answer: "235".into(),
                meaning: "ok".into(),
            },
        )
        .await
        .unwrap();
    store
        .claim_notification(rec.id, "needs_reauth", 1, 10)
        .await
        .unwrap();
    store
        .create_invitation(&invitation(rec.id, 5, now, now + 60))
        .await
        .unwrap();
    store
        .audit(&NewAudit {
            actor: "admin",
            action: "identity.note",
            identity: Some("jack"),
            outcome: "ok",
            detail: Some("personal detail"),
        })
        .await
        .unwrap();

    let r0 = store.revision().await.unwrap();
    store.forget("JACK").await.unwrap();
    assert!(store.revision().await.unwrap() > r0);
    let got = store.get("jack").await.unwrap().unwrap();
    assert_eq!(got.status, Status::Pending);
    assert_eq!(got.mailbox, "");
    assert_eq!(got.password_hash, "$argon2id$hash", "the password stays");
    assert!(!got.has_refresh_token);
    assert_eq!(
        (
            got.account,
            got.last_error,
            got.linked_at,
            got.last_success_at
        ),
        (None, None, None, None)
    );
    assert_eq!(
        got.token_generation, 2,
        "a stale rotation cannot restore it"
    );
    assert!(store.refresh_token(rec.id).await.unwrap().is_none());
    assert!(store.validations().await.unwrap().is_empty());
    assert!(store.list_invitations().await.unwrap().is_empty());
    assert!(
        store
            .claim_notification(rec.id, "needs_reauth", 2, 10)
            .await
            .unwrap(),
        "notification state forgotten"
    );
    assert!(store
        .audit_log(Some("jack"), None, 100)
        .await
        .unwrap()
        .iter()
        .all(|e| e.detail.is_none()));
    assert!(matches!(
        store.forget("nobody").await,
        Err(StoreError::NotFound(_))
    ));

    store.set_mailbox("jack", "new@contoso.com").await.unwrap();
    let r1 = store.revision().await.unwrap();
    store.remove("Jack").await.unwrap();
    assert!(store.revision().await.unwrap() > r1);
    assert!(store.get("jack").await.unwrap().is_none());
    assert!(matches!(
        store.remove("jack").await,
        Err(StoreError::NotFound(_))
    ));
    // Ids are never reused.
    let again = store.create(&delegated("jack")).await.unwrap();
    assert!(again.id > rec.id);
}

async fn token_keys(store: &dyn Store) {
    assert!(store.token_keys().await.unwrap().is_empty());
    let b = store.create(&delegated("b")).await.unwrap();
    let a = store.create(&delegated("A")).await.unwrap();
    store.create(&delegated("c")).await.unwrap();
    store.link(b.id, &seal(b.id, "x")).await.unwrap();
    let other = Sealer::from_key(&[8; 32]);
    store
        .link(a.id, &other.seal(a.id, &Secret::new("y")))
        .await
        .unwrap();
    let keys: Vec<(String, String)> = store
        .token_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|k| (k.name, k.key_id))
        .collect();
    assert_eq!(
        keys,
        vec![
            ("A".to_owned(), other.key_id().to_owned()),
            ("b".to_owned(), sealer().key_id().to_owned()),
        ]
    );
}

/// A replica given another sealing key than the one that sealed the stored
/// tokens refuses to start, saying which key is needed.
async fn other_key_is_refused(config: &mut Config, store: &dyn Store) {
    let rec = store.create(&delegated("kim")).await.unwrap();
    store.link(rec.id, &seal(rec.id, "rt")).await.unwrap();
    config.store.key = Some(Secret::new("07".repeat(32)));
    open_sealer(&config.store, store, KeyUse::Serve)
        .await
        .expect("the right key works");
    config.store.key = Some(Secret::new("08".repeat(32)));
    let err = open_sealer(&config.store, store, KeyUse::Serve)
        .await
        .expect_err("another key is refused");
    assert!(matches!(err, KeyError::Mismatch { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("kim"), "{text}");
    assert!(text.contains(sealer().key_id()), "{text}");
    assert!(text.contains("restore the key"), "{text}");
}

#[tokio::test]
async fn sqlite_replica_with_another_key_refuses_to_start() {
    let (store, dir) = sqlite().await;
    let mut config = Config::default();
    config.store.key_file = dir.path().join("k");
    other_key_is_refused(&mut config, store.as_ref()).await;
}

#[tokio::test]
async fn postgres_replica_with_another_key_refuses_to_start() {
    let Some((mut config, _dir)) = postgres_config().await else {
        return;
    };
    let store = authswap::store::open(&config).await.unwrap();
    other_key_is_refused(&mut config, store.as_ref()).await;
}

fn assert_too_new(result: Result<Arc<dyn Store>, StoreError>) {
    match result {
        Err(e @ StoreError::SchemaTooNew(9999)) => assert_eq!(
            e.to_string(),
            "the database schema is newer than this authswap (migration 9999); upgrade authswap"
        ),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a newer schema was accepted"),
    }
}

#[tokio::test]
async fn sqlite_newer_schema_is_refused() {
    use sqlx::Connection as _;
    let (store, dir) = sqlite().await;
    drop(store);
    let path = dir.path().join("data/authswap.db");
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, \
         execution_time) VALUES (9999, 'from the future', TRUE, ?, 0)",
    )
    .bind(vec![0u8; 48])
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    let mut config = Config::default();
    config.store.path = path;
    assert_too_new(authswap::store::open(&config).await);
}

#[tokio::test]
async fn postgres_newer_schema_is_refused() {
    use sqlx::Connection as _;
    let Some((config, _dir)) = postgres_config().await else {
        return;
    };
    drop(authswap::store::open(&config).await.unwrap());
    let mut conn = sqlx::PgConnection::connect(config.store.url.as_deref().unwrap())
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, \
         execution_time) VALUES (9999, 'from the future', TRUE, $1, 0)",
    )
    .bind(vec![0u8; 48])
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    assert_too_new(authswap::store::open(&config).await);
}

#[tokio::test]
async fn postgres_reopen_keeps_everything() {
    let Some((config, _dir)) = postgres_config().await else {
        return;
    };
    let store = authswap::store::open(&config).await.unwrap();
    let rec = store.create(&delegated("lena")).await.unwrap();
    let token = seal(rec.id, "rt");
    store.link(rec.id, &token).await.unwrap();
    drop(store);
    // Migrations already applied: opening again is a no-op.
    let store = authswap::store::open(&config).await.unwrap();
    assert_eq!(store.refresh_token(rec.id).await.unwrap(), Some((token, 1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_rotations_compare_and_set() {
    let Some(store) = postgres().await else {
        return;
    };
    let rec = store.create(&delegated("mona")).await.unwrap();
    store.link(rec.id, &seal(rec.id, "rt-0")).await.unwrap();
    // Many rotations of the same generation at once: all succeed (the
    // engine rotates one at a time per identity); one re-link in the middle
    // makes every later one with the old generation fail.
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            let token = seal(rec.id, &format!("rt-{i}"));
            tokio::spawn(async move { store.rotate(rec.id, 1, &token, i).await })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap().unwrap());
    }
    store.link(rec.id, &seal(rec.id, "relinked")).await.unwrap();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            let token = seal(rec.id, &format!("late-{i}"));
            tokio::spawn(async move { store.rotate(rec.id, 1, &token, i).await })
        })
        .collect();
    for t in tasks {
        assert!(!t.await.unwrap().unwrap());
    }
    let (sealed, generation) = store.refresh_token(rec.id).await.unwrap().unwrap();
    assert_eq!(generation, 2);
    assert_eq!(sealer().open(rec.id, &sealed).unwrap().expose(), "relinked");
}

/// `authswap serve` on PostgreSQL serves a linked identity's EWS request
/// through the doubles, and the CLI (a separate process) sees and changes
/// the same identities.
#[tokio::test]
async fn serve_and_cli_on_postgres() {
    use http::StatusCode;
    use support::harness::{Env, HttpClient, SOAP};
    let Some(url) = support::pg::database().await else {
        return;
    };
    let env = Env::start().await;
    env.use_store_url(&url);
    env.add_linked("alice", "alice@contoso.com", "alice-local-pw")
        .await;
    let server = env.serve().await;
    let addr = server.http_addr().unwrap();
    let reply = HttpClient::default()
        .ews(addr, "Alice", "alice-local-pw", SOAP)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.text(), SOAP);
    let seen = env.ews.last_request().unwrap();
    assert!(seen.header("authorization").unwrap().starts_with("Bearer "));
    assert!(
        !env.dir.path().join("data/authswap.db").exists(),
        "nothing went to SQLite"
    );

    let add = env.cli(
        &[
            "identity",
            "add",
            "bob",
            "--mailbox",
            "bob@contoso.com",
            "--password-stdin",
        ],
        Some("bob-local-pw\n"),
    );
    assert!(add.status.success(), "{add:?}");
    let list = env.cli(&["identity", "list", "--json"], None);
    assert!(list.status.success(), "{list:?}");
    let rows: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let names: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alice", "bob"]);
    assert_eq!(rows[0]["status"], "linked");
    assert_eq!(rows[1]["status"], "pending");
    // The config check shows the URL without the user name.
    let check = env.cli(&["config", "check"], None);
    assert!(check.status.success(), "{check:?}");
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(!text.contains("authswap@127.0.0.1"), "{text}");
    assert!(text.contains("postgres://<redacted>@127.0.0.1"), "{text}");
    drop(server);
}

/// `sslmode=verify-full`: the server's certificate must chain to a trusted
/// root (here the test CA, given as `[tls] extra_ca_file`) and name the
/// host; then the connection is TLS.
#[tokio::test]
async fn postgres_over_tls_with_verify_full() {
    use sqlx::Connection as _;
    let Some((mut config, dir)) = postgres_config().await else {
        return;
    };
    let url = config
        .store
        .url
        .take()
        .unwrap()
        .replace("@127.0.0.1:", "@localhost:")
        .replace("sslmode=disable", "sslmode=verify-full");
    config.store.url = Some(url);
    config.store.connect_timeout = std::time::Duration::from_secs(5);
    match authswap::store::open(&config).await {
        Err(e) => assert!(
            e.to_string().contains("invalid peer certificate"),
            "says why: {e}"
        ),
        Ok(_) => panic!("an unknown CA was trusted"),
    }
    config.tls.extra_ca_file = Some(support::pki().write_ca_file(dir.path()));
    let store = authswap::store::open(&config).await.unwrap();
    store.create(&delegated("tls")).await.unwrap();
    assert!(store.get("tls").await.unwrap().is_some());

    let settings = authswap::store::postgres_settings(&config.store, &config.tls)
        .unwrap()
        .unwrap();
    let mut conn = sqlx::PgConnection::connect_with(&settings.options)
        .await
        .unwrap();
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(ssl, "the connection is TLS");
    let timeout: String = sqlx::query_scalar("SHOW statement_timeout")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(timeout, "30s", "store.statement_timeout applies");
    conn.close().await.unwrap();
}

/// The password from `store.password_file` (through the real loader),
/// refused when wrong without showing it, or written in the URL.
#[tokio::test]
async fn postgres_password_from_file_or_url() {
    use support::pg::{PASSWORD, PASSWORD_USER};
    let Some(url) = support::pg::database_with_password().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    std::fs::write(dir.path().join("db.password"), format!("{PASSWORD}\n")).unwrap();
    let toml = dir.path().join("authswap.toml");
    std::fs::write(
        &toml,
        format!(
            "[store]\nurl = \"{url}\"\npassword_file = \"{d}/db.password\"\n\
             key_file = \"{d}/authswap.key\"\nconnect_timeout = \"5s\"\n"
        ),
    )
    .unwrap();
    let mut config = Config::load(&toml).unwrap();
    let store = authswap::store::open(&config).await.unwrap();
    store.create(&delegated("pw")).await.unwrap();
    drop(store);

    config.store.password = Some(Secret::new("wrong-pw-99"));
    let err = match authswap::store::open(&config).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a wrong password was accepted"),
    };
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(!err.contains("wrong-pw-99"), "{err}");

    config.store.password = None;
    config.store.url = Some(url.replace(
        &format!("{PASSWORD_USER}@"),
        &format!("{PASSWORD_USER}:{PASSWORD}@"),
    ));
    let store = authswap::store::open(&config).await.unwrap();
    assert!(store.get("pw").await.unwrap().is_some());
}

/// The connection settings built from `[store]` never show the password,
/// and a URL sqlx cannot use is refused naming the key.
#[test]
fn postgres_settings_never_show_the_password() {
    let mut config = Config::default();
    config.store.url = Some("postgres://u:url-pw-5@db.example:6543/x?sslmode=verify-full".into());
    let settings = authswap::store::postgres_settings(&config.store, &config.tls)
        .unwrap()
        .unwrap();
    let shown = format!("{settings:?}");
    assert!(!shown.contains("url-pw-5"), "{shown}");
    assert!(
        shown.contains("db.example") && shown.contains("6543"),
        "{shown}"
    );
    assert_eq!(settings.pool_size, 8);

    config.store.url = None;
    assert!(
        authswap::store::postgres_settings(&config.store, &config.tls)
            .unwrap()
            .is_none()
    );

    config.store.url = Some("postgres://u:url-pw-6@db.example:port/x".into());
    let err = authswap::store::postgres_settings(&config.store, &config.tls)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("store.url: "), "{err}");
    assert!(!err.contains("url-pw-6"), "{err}");
}

/// Two replicas (two stores on one database) acting on one identity at
/// once serialise on its row: one invitation stays pending, one completion
/// links, the status change is audited once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_replicas_serialise_on_an_identity() {
    let Some((config, _dir)) = postgres_config().await else {
        return;
    };
    let a = authswap::store::open(&config).await.unwrap();
    let b = authswap::store::open(&config).await.unwrap();
    let rec = a.create(&delegated("nina")).await.unwrap();
    let now = authswap::store::now_unix();

    let tasks: Vec<_> = (0..20u8)
        .map(|n| {
            let store = if n % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                store
                    .create_invitation(&invitation(rec.id, n, now, now + 600))
                    .await
            })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap().unwrap().id);
    }
    let pending: Vec<_> = a
        .list_invitations()
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.state == InvitationState::Pending)
        .collect();
    assert_eq!(pending.len(), 1, "{pending:?}");

    let account = LinkedAccount {
        upn: "nina@contoso.com".into(),
        oid: "o".into(),
        tid: "t".into(),
    };
    let id = pending[0].id;
    let tasks: Vec<_> = (0..10)
        .map(|n| {
            let store = if n % 2 == 0 { a.clone() } else { b.clone() };
            let account = account.clone();
            let token = seal(rec.id, &format!("rt-{n}"));
            tokio::spawn(async move { store.complete_invitation(id, &token, &account, now).await })
        })
        .collect();
    let mut linked = 0;
    for t in tasks {
        match t.await.unwrap().unwrap() {
            Completion::Linked => linked += 1,
            Completion::NotPending(state) => assert_eq!(state, InvitationState::Completed),
        }
    }
    assert_eq!(linked, 1);
    assert_eq!(b.get("nina").await.unwrap().unwrap().token_generation, 1);

    let tasks: Vec<_> = (0..10)
        .map(|n| {
            let store = if n % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { store.record_failure(rec.id, true, "gone", now).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let audited = a
        .audit_log(Some("nina"), None, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "status.needs_reauth")
        .count();
    assert_eq!(audited, 1);
}

/// Runs `authswap store migrate` (the real binary) with `args`.
fn store_migrate(config_dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    let config = config_dir.join("migrate.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\npath = \"{d}/unused.db\"\nkey_file = \"{d}/authswap.key\"\n",
            d = config_dir.display()
        ),
    )
    .unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_authswap"))
        .arg("-c")
        .arg(&config)
        .args(["store", "migrate"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

#[tokio::test]
async fn store_migrate_copies_sqlite_into_postgres_once_and_dry_runs_first() {
    let Some((pg_config, _pg_dir)) = postgres_config().await else {
        return;
    };
    let url = pg_config.store.url.clone().unwrap();
    // An embedded store with a bit of everything.
    let (src, dir) = sqlite().await;
    let db = dir.path().join("data/authswap.db");
    let now = authswap::store::now_unix();
    let alice = src.create(&delegated("alice")).await.unwrap();
    let token = seal(alice.id, "rt-alice");
    src.link(alice.id, &token).await.unwrap();
    let svc = src
        .create(&NewIdentity {
            tenant: "fabrikam".into(),
            mode: Mode::App,
            ..delegated("svc")
        })
        .await
        .unwrap();
    let bob = src.create(&delegated("bob")).await.unwrap();
    let inv = src
        .create_invitation(&invitation(bob.id, 3, now, now + 3600))
        .await
        .unwrap();
    src.record_validation(
        alice.id,
        &ValidationRecord {
            protocol: "smtp".into(),
            at: now,
            ok: true,
            answer: "235 2.7.0".into(),
            meaning: "works".into(),
        },
    )
    .await
    .unwrap();
    src.set_tenant_block("fabrikam", Some("secret expired"), now)
        .await
        .unwrap();
    let audit_before = src.audit_log(None, None, 1000).await.unwrap().len();
    drop(src);
    let from = format!("sqlite:{}", db.display());

    // Dry run: counts, nothing written.
    let out = store_migrate(dir.path(), &["--from", &from, "--to", &url, "--json"]);
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["applied"], false);
    let copied = |r: &serde_json::Value, t: &str| {
        r["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["table"] == t)
            .unwrap()["copied"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(copied(&report, "identities"), 3);
    let pg = authswap::store::open(&pg_config).await.unwrap();
    assert!(
        pg.list().await.unwrap().is_empty(),
        "a dry run writes nothing"
    );

    // Apply.
    let r0 = pg.revision().await.unwrap();
    let out = store_migrate(dir.path(), &["--from", &from, "--to", &url, "--apply"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("copied"), "{text}");
    assert!(!text.contains(&url), "the URL is not printed");
    assert!(pg.revision().await.unwrap() > r0, "running servers notice");
    let names: Vec<String> = pg
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, ["alice", "bob", "svc"]);
    // Same ids, so the sealed token still opens with the same key.
    let (stored, generation) = pg.refresh_token(alice.id).await.unwrap().unwrap();
    assert_eq!((stored.clone(), generation), (token, 1));
    assert_eq!(
        sealer().open(alice.id, &stored).unwrap().expose(),
        "rt-alice"
    );
    let got_svc = pg.get("svc").await.unwrap().unwrap();
    assert_eq!(
        (got_svc.id, got_svc.mode, got_svc.tenant.as_str()),
        (svc.id, Mode::App, "fabrikam")
    );
    assert_eq!(got_svc.tenant_block.as_deref(), Some("secret expired"));
    assert_eq!(pg.invitation_by_token(&[3; 32]).await.unwrap(), Some(inv));
    let v = pg.validations().await.unwrap();
    assert_eq!(v.len(), 1);
    assert!(v[0].1.ok);
    assert_eq!(
        pg.audit_log(None, None, 1000).await.unwrap().len(),
        audit_before
    );
    // New rows get new ids after the copied ones.
    let carol = pg.create(&delegated("carol")).await.unwrap();
    assert!(carol.id > svc.id);

    // Again: nothing new.
    let out = store_migrate(
        dir.path(),
        &["--from", &from, "--to", &url, "--apply", "--json"],
    );
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for t in report["tables"].as_array().unwrap() {
        assert_eq!(t["copied"], 0, "{t}");
    }

    // A clash (the same name under another id) stops the copy whole.
    let (other, other_dir) = sqlite().await;
    other.create(&delegated("zed")).await.unwrap();
    other.create(&delegated("carol")).await.unwrap();
    drop(other);
    let other_db = format!(
        "sqlite:{}",
        other_dir.path().join("data/authswap.db").display()
    );
    let out = store_migrate(
        other_dir.path(),
        &["--from", &other_db, "--to", &url, "--apply"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("clashes"), "{err}");
    assert!(pg.get("zed").await.unwrap().is_none(), "nothing was copied");
}

#[tokio::test]
async fn postgres_pushes_changes_to_running_replicas_without_polling() {
    let Some((mut config, _dir)) = postgres_config().await else {
        return;
    };
    // No poll for an hour: only LISTEN/NOTIFY can bring the changes.
    config.tokens.reload_interval = std::time::Duration::from_secs(3600);
    let app = authswap::app::App::open(config.clone()).await.unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let background = app.spawn_background(stopped);
    // Another replica (here: another store on the same database) adds one.
    let other = authswap::store::open(&config).await.unwrap();
    // The subscription starts with the background task; wait for its
    // first reload, then change the store.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    other.create(&delegated("nina")).await.unwrap();
    assert!(
        within(|| app.directory.get("nina").is_some()).await,
        "the running replica saw the new identity through NOTIFY"
    );
    other.remove("nina").await.unwrap();
    assert!(
        within(|| app.directory.get("nina").is_none()).await,
        "and its removal"
    );
    stop.send(true).unwrap();
    background.await.unwrap();
}

/// Whether `cond` holds within 5 s (checked every 20 ms).
async fn within(cond: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    cond()
}

// ---------------------------------------------------------------------------
// Losing the database (issue 14): PostgreSQL stopped and started again
// under load, on a cluster of the test's own (stopping the shared one would
// break the other tests of this process).
// ---------------------------------------------------------------------------

mod outage {
    use super::support;
    use authswap::store::{open_sealer, KeyUse, Status};
    use http::StatusCode;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    use support::harness::{sample, Env, HttpClient, SOAP};
    use support::mail::{ImapOptions, Pop3Options, SmtpOptions};
    use support::mailrig::{b64, start_in, Raw};
    use support::IdpOptions;

    /// Identities whose access tokens stay fresh for an hour: served from
    /// memory all through the outage.
    const CACHED: usize = 4;
    /// Identities whose access tokens expire during the outage.
    const EXPIRING: usize = 4;
    /// Lifetime of the expiring identities' access tokens (seconds); they
    /// are refreshed `tokens.refresh_ahead` (2 s) before.
    const SHORT_LIFE: u64 = 5;
    const PASSWORD: &str = "user-password-1";

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Group {
        Cached,
        Expiring,
        WrongPassword,
    }

    /// Phases of the run, as the load loop sees them.
    const BEFORE: u8 = 0;
    const DOWN: u8 = 1;
    const BACK: u8 = 2;

    #[derive(Debug)]
    struct Answer {
        phase: u8,
        group: Group,
        #[allow(dead_code)] // shown in failure messages
        name: String,
        status: StatusCode,
        retry_after: Option<String>,
        at: Instant,
    }

    fn name(group: Group, i: usize) -> String {
        match group {
            Group::Cached => format!("cached{i}"),
            Group::Expiring => format!("expiring{i}"),
            Group::WrongPassword => format!("cached{i}"),
        }
    }

    /// SMTP: `AUTH PLAIN` as `user`; the reply.
    async fn smtp_login(addr: SocketAddr, user: &str, password: &str) -> String {
        let mut c = Raw::connect(addr).await;
        c.line().await;
        c.send(b"EHLO x\r\n").await;
        c.reply().await;
        let plain = b64(format!("\0{user}\0{password}").as_bytes());
        c.send(format!("AUTH PLAIN {plain}\r\n").as_bytes()).await;
        c.reply().await
    }

    /// IMAP: `LOGIN`; the tagged answer.
    async fn imap_login(addr: SocketAddr, user: &str, password: &str) -> String {
        let mut c = Raw::connect(addr).await;
        c.line().await;
        c.send(format!("a LOGIN {user} {password}\r\n").as_bytes())
            .await;
        for _ in 0..20 {
            let l = c.line().await;
            if l.is_empty() || l.starts_with("a ") {
                return l;
            }
        }
        panic!("no tagged IMAP answer");
    }

    /// POP3: `USER` and `PASS`; the answer to `PASS`.
    async fn pop3_login(addr: SocketAddr, user: &str, password: &str) -> String {
        let mut c = Raw::connect(addr).await;
        c.line().await;
        c.send(format!("USER {user}\r\n").as_bytes()).await;
        assert!(c.line().await.starts_with("+OK"));
        c.send(format!("PASS {password}\r\n").as_bytes()).await;
        c.line().await
    }

    /// Logs `user` in on SMTP, IMAP and POP3; the three answers.
    async fn mail_logins(
        server: &authswap::server::Server,
        user: &str,
        password: &str,
    ) -> [String; 3] {
        [
            smtp_login(server.smtp_addr().unwrap(), user, password).await,
            imap_login(server.imap_addr().unwrap(), user, password).await,
            pop3_login(server.pop3_addr().unwrap(), user, password).await,
        ]
    }

    fn mail_served(answers: &[String; 3]) -> bool {
        answers[0].starts_with("235")
            && answers[1].starts_with("a OK")
            && answers[2].starts_with("+OK")
    }

    /// Every identity's stored refresh token, unsealed, by name.
    async fn stored_refresh_tokens(env: &Env) -> std::collections::HashMap<String, String> {
        let config = env.config();
        let store = env.any_store().await;
        let sealer = open_sealer(&config.store, store.as_ref(), KeyUse::Serve)
            .await
            .unwrap();
        let mut out = std::collections::HashMap::new();
        for r in store.list().await.unwrap() {
            let (sealed, _) = store.refresh_token(r.id).await.unwrap().unwrap();
            let token = sealer.open(r.id, &sealed).unwrap();
            out.insert(r.name, token.expose().to_owned());
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_database_stopped_and_restarted_under_load() {
        let Some(pg) = support::pg::dedicated().await else {
            return;
        };
        let url = pg.database("outage").await;
        let env = Env::start_with(IdpOptions {
            // A superseded refresh token no longer works: a rotated one
            // that was not stored would show as needs_reauth.
            revoke_on_rotation: true,
            ..IdpOptions::default()
        })
        .await;
        env.use_store_url(&url);
        for i in 0..CACHED {
            env.add_linked(
                &name(Group::Cached, i),
                &format!("cached{i}@contoso.com"),
                PASSWORD,
            )
            .await;
        }
        for i in 0..EXPIRING {
            env.add_linked(
                &name(Group::Expiring, i),
                &format!("expiring{i}@contoso.com"),
                PASSWORD,
            )
            .await;
        }
        // HTTP, SMTP, IMAP and POP3 in front of their doubles.
        let rig = start_in(
            env,
            SmtpOptions::default(),
            ImapOptions::default(),
            Pop3Options::default(),
            |c| {
                c.store.connect_timeout = Duration::from_secs(2);
                c.tokens.refresh_ahead = Duration::from_secs(2);
            },
        )
        .await;
        let (env, server) = (&rig.env, &rig.server);
        let (http, admin) = (server.http_addr().unwrap(), server.admin_addr());
        let client = HttpClient::default();

        // Warm up: the expiring identities get short-lived tokens, the
        // cached ones tokens good for an hour.
        env.idp.set_expires_in(SHORT_LIFE);
        for i in 0..EXPIRING {
            let r = client
                .ews(http, &name(Group::Expiring, i), PASSWORD, SOAP)
                .await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
        let short_issued = Instant::now();
        env.idp.set_expires_in(3600);
        for i in 0..CACHED {
            let r = client
                .ews(http, &name(Group::Cached, i), PASSWORD, SOAP)
                .await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
        // cached0's mail token too (its own scopes).
        let mail = mail_logins(server, "cached0", PASSWORD).await;
        assert!(mail_served(&mail), "{mail:?}");
        assert_eq!(client.get(admin, "/readyz").await.status, 200);
        // The refresh tokens stored before the outage.
        let stored_before = stored_refresh_tokens(env).await;

        // Load: 4 workers cycling over every identity (and a wrong
        // password), bounded in time and count.
        let phase = Arc::new(AtomicU8::new(BEFORE));
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(Mutex::new(Vec::<Answer>::new()));
        let mut workers = tokio::task::JoinSet::new();
        for w in 0..4usize {
            let (client, phase, stop, answers) =
                (client.clone(), phase.clone(), stop.clone(), answers.clone());
            workers.spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut n = w;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && n < 20_000 {
                    let (group, i) = match n % 9 {
                        k @ 0..=3 => (Group::Cached, k),
                        k @ 4..=7 => (Group::Expiring, k - 4),
                        _ => (Group::WrongPassword, n / 9 % CACHED),
                    };
                    let who = name(group, i);
                    let password = if group == Group::WrongPassword {
                        "not-the-password-1"
                    } else {
                        PASSWORD
                    };
                    let seen = phase.load(Ordering::Acquire);
                    let r = client.ews(http, &who, password, SOAP).await;
                    answers.lock().unwrap().push(Answer {
                        // The phase at the start of the request.
                        phase: seen,
                        group,
                        name: who,
                        status: r.status,
                        retry_after: r.header("retry-after"),
                        at: Instant::now(),
                    });
                    n += 4;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
        }
        tokio::time::sleep(Duration::from_millis(300)).await;

        // PostgreSQL goes away.
        pg.stop().await;
        phase.store(DOWN, Ordering::Release);
        let stopped = Instant::now();
        let (m, down) = client
            .metrics_until(admin, Duration::from_secs(10), |m| {
                sample(m, "authswap_store_up") == Some(0.0)
            })
            .await;
        assert!(
            down,
            "authswap_store_up is not 0 while PostgreSQL is down:\n{m}"
        );
        let went_down = stopped.elapsed();
        let t = Instant::now();
        let ready = client.get(admin, "/readyz").await;
        let probe = t.elapsed();
        assert_eq!(ready.status, 503, "{}", ready.text());
        assert!(
            probe < Duration::from_secs(3),
            "/readyz took {probe:?} on a dead database"
        );
        // Down long enough for the short-lived tokens to expire, and then
        // some answers more.
        let expired = short_issued + Duration::from_secs(SHORT_LIFE) + Duration::from_secs(2);
        tokio::time::sleep(expired.saturating_duration_since(Instant::now())).await;
        let m = client.get(admin, "/metrics").await.text();
        assert_eq!(sample(&m, "authswap_store_up"), Some(0.0), "{m}");
        assert!(
            sample(&m, "authswap_store_errors_total{operation=\"reload\"}").unwrap_or(0.0) > 0.0,
            "{m}"
        );
        assert_eq!(client.get(admin, "/readyz").await.status, 503);
        // Mail: the token in memory is served; an identity that needs a
        // refresh gets each protocol's temporary answer; a wrong password
        // is still refused as such.
        let mail = mail_logins(server, "cached0", PASSWORD).await;
        assert!(mail_served(&mail), "mail from memory: {mail:?}");
        let mail = mail_logins(server, "expiring0", PASSWORD).await;
        assert!(mail[0].starts_with("454 "), "{mail:?}");
        assert!(mail[1].starts_with("a NO [UNAVAILABLE]"), "{mail:?}");
        assert!(mail[2].starts_with("-ERR [SYS/TEMP]"), "{mail:?}");
        let mail = mail_logins(server, "expiring1", "not-the-password-1").await;
        assert!(mail[0].starts_with("535 "), "{mail:?}");
        assert!(
            mail[1].starts_with("a NO [AUTHENTICATIONFAILED]"),
            "{mail:?}"
        );
        assert!(mail[2].starts_with("-ERR [AUTH]"), "{mail:?}");
        assert_eq!(
            sample(
                &client.get(admin, "/metrics").await.text(),
                "authswap_store_up"
            ),
            Some(0.0)
        );

        // PostgreSQL comes back: full service without a restart.
        pg.start().await;
        phase.store(BACK, Ordering::Release);
        let started = Instant::now();
        let limit = Duration::from_secs(15);
        let mut recovered = None;
        while started.elapsed() < limit {
            let mut all = client.get(admin, "/readyz").await.status == 200;
            for i in 0..EXPIRING {
                let r = client
                    .ews(http, &name(Group::Expiring, i), PASSWORD, SOAP)
                    .await;
                all &= r.status == 200;
            }
            if all {
                recovered = Some(started.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let Some(recovered) = recovered else {
            panic!(
                "no full service within {limit:?} after PostgreSQL came back:\n{}",
                client.get(admin, "/metrics").await.text()
            )
        };
        let (m, up) = client
            .metrics_until(admin, Duration::from_secs(5), |m| {
                sample(m, "authswap_store_up") == Some(1.0)
            })
            .await;
        assert!(up, "{m}");
        let mail = mail_logins(server, "expiring0", PASSWORD).await;
        assert!(mail_served(&mail), "mail after the outage: {mail:?}");
        // Some more load on the recovered server, then stop.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let settled = Instant::now();
        stop.store(true, Ordering::Relaxed);
        while let Some(done) = workers.join_next().await {
            done.unwrap();
        }
        eprintln!(
            "outage: store_up 0 after {went_down:?}, /readyz answered in {probe:?}, \
             full service {recovered:?} after PostgreSQL started"
        );

        // What the clients got.
        let answers = std::mem::take(&mut *answers.lock().unwrap());
        let mut temporary = 0;
        for a in answers.iter() {
            match a.group {
                Group::WrongPassword => {
                    assert_eq!(a.status, 401, "a wrong password: {a:?}")
                }
                Group::Cached => {
                    assert_eq!(a.status, 200, "a token held in memory is served: {a:?}")
                }
                Group::Expiring => match a.status.as_u16() {
                    200 => {}
                    503 => {
                        assert_ne!(
                            a.phase, BEFORE,
                            "a temporary answer before the outage: {a:?}"
                        );
                        assert!(a.retry_after.is_some(), "503 without Retry-After: {a:?}");
                        assert!(
                            a.at < settled,
                            "a temporary answer after full service was back: {a:?}"
                        );
                        temporary += 1;
                    }
                    _ => panic!("only 200 or 503 while the database is away: {a:?}"),
                },
            }
        }
        let after: Vec<_> = answers.iter().filter(|a| a.at >= settled).collect();
        let during = answers.iter().filter(|a| a.phase == DOWN).count();
        eprintln!(
            "outage: {} answers, {during} started while PostgreSQL was down, {temporary} temporary",
            answers.len()
        );
        assert!(
            temporary > 0,
            "tokens that expired while PostgreSQL was down were answered 200?"
        );
        for group in [Group::Cached, Group::Expiring, Group::WrongPassword] {
            assert!(
                answers.iter().any(|a| a.phase == DOWN && a.group == group),
                "no {group:?} request during the outage"
            );
        }
        assert!(after
            .iter()
            .all(|a| a.group == Group::WrongPassword || a.status == 200));

        // Nothing lost: nobody needs a new sign-in, every expiring identity
        // rotated its refresh token after the outage, and the stored one is
        // the identity platform's newest (and still valid) one.
        let stored_after = stored_refresh_tokens(env).await;
        let issued = env.idp.issued_refresh_tokens();
        for r in env.any_store().await.list().await.unwrap() {
            assert_eq!(r.status, Status::Linked, "{r:?}");
            assert!(r.is_ok(), "{r:?}");
            let stored = &stored_after[&r.name];
            assert!(
                env.idp.is_refresh_token_valid(stored).is_some(),
                "{}: the stored refresh token is not valid at the identity platform",
                r.name
            );
            let newest = issued
                .iter()
                .rev()
                .find(|t| env.idp.refresh_token_owner(t).as_deref() == Some(&r.mailbox))
                .unwrap();
            assert_eq!(stored, newest, "{}: not the newest refresh token", r.name);
            if r.name.starts_with("expiring") {
                assert_ne!(
                    stored, &stored_before[&r.name],
                    "{} did not refresh after the outage",
                    r.name
                );
            }
        }
        let m = client.get(admin, "/metrics").await.text();
        assert!(
            !m.lines()
                .any(|l| l.starts_with("authswap_identity_reauth_required{") && l.ends_with(" 1")),
            "{m}"
        );
        rig.server.shutdown(Duration::from_secs(5)).await;
    }
}
