//! Several replicas on one PostgreSQL store (issue 14): two `serve`
//! instances (in-process, each with its own engine, pool and listeners)
//! share identities; an expiry storm spread over both costs one refresh
//! per identity in total (the refresh lease in the database, and the
//! access token the first replica stored), and the identity-platform
//! double revokes every refresh token once it is rotated, so a replica
//! that redeemed a superseded one would fail loudly.
//!
//! The second half runs real `authswap serve` processes
//! (`support::fleet`) on one database: an expiry storm of 200 identities
//! over three of them, changes made through one reaching the others within
//! 2 s by `NOTIFY` alone, and a process killed (`SIGKILL`) while its
//! refresh is at the identity platform.

mod support;

use std::time::Duration;
use support::fleet::{seed_linked, start_fleet, try_ews, within, Replica, ADMIN_TOKEN};
use support::harness::{sample, Env, HttpClient, SOAP};
use support::IdpOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_storm_over_two_replicas_costs_one_refresh_per_identity() {
    let Some(url) = support::pg::database().await else {
        return;
    };
    let env = Env::start_with(IdpOptions {
        // A superseded refresh token no longer works: a second redemption
        // of one would mark the identity needs_reauth.
        revoke_on_rotation: true,
        ..IdpOptions::default()
    })
    .await;
    env.use_store_url(&url);
    const N: usize = 40;
    for i in 0..N {
        env.add_linked(
            &format!("user{i}"),
            &format!("user{i}@contoso.com"),
            "user-password-1",
        )
        .await;
    }
    let a = env.serve().await;
    let b = env.serve().await;
    // Every identity asked for at once on both replicas, twice each: no
    // access token is cached anywhere yet.
    env.idp.set_delay(Duration::from_millis(30));
    let client = HttpClient::default();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..N {
        for addr in [a.http_addr().unwrap(), b.http_addr().unwrap()] {
            for _ in 0..2 {
                let client = client.clone();
                calls.spawn(async move {
                    client
                        .ews(addr, &format!("user{i}"), "user-password-1", SOAP)
                        .await
                });
            }
        }
    }
    while let Some(reply) = calls.join_next().await {
        let reply = reply.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(
        env.idp.refresh_calls(),
        N,
        "one refresh per identity across both replicas"
    );
    assert_eq!(env.idp.successful_refreshes(), N);
    // Nobody was marked as needing a new sign-in, and both replicas hold
    // the stored (rotated) state.
    let store = env.any_store().await;
    for r in store.list().await.unwrap() {
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(r.token_generation, 1, "{r:?}");
    }
    a.shutdown(Duration::from_secs(5)).await;
    b.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_on_one_replica_is_not_undone_by_the_token_the_other_stored() {
    let Some(url) = support::pg::database().await else {
        return;
    };
    let env = Env::start().await;
    env.use_store_url(&url);
    env.add_linked("alice", "alice@contoso.com", "alice-password-1")
        .await;
    let a = env.serve().await;
    let b = env.serve().await;
    let client = HttpClient::default();
    let (ha, hb) = (a.http_addr().unwrap(), b.http_addr().unwrap());
    assert_eq!(
        client
            .ews(ha, "alice", "alice-password-1", SOAP)
            .await
            .status,
        200
    );
    // B takes the token A stored: still one refresh.
    assert_eq!(
        client
            .ews(hb, "alice", "alice-password-1", SOAP)
            .await
            .status,
        200
    );
    assert_eq!(env.idp.refresh_calls(), 1);
    // The upstream refuses it (revoked): B refreshes instead of taking the
    // refused token back from the store, and A then takes B's new one.
    env.idp.revoke_all_access_tokens();
    assert_eq!(
        client
            .ews(hb, "alice", "alice-password-1", SOAP)
            .await
            .status,
        200
    );
    assert_eq!(env.idp.refresh_calls(), 2);
    assert_eq!(
        client
            .ews(ha, "alice", "alice-password-1", SOAP)
            .await
            .status,
        200
    );
    assert_eq!(
        env.idp.refresh_calls(),
        2,
        "A's refusal is met with the token B stored after it"
    );
    a.shutdown(Duration::from_secs(5)).await;
    b.shutdown(Duration::from_secs(5)).await;
}

// ---- several real `authswap serve` processes (support::fleet) --------------

/// The local password of the identities seeded below.
const PASSWORD: &str = "user-password-1";

/// How soon a change made through one replica must be seen by the others.
/// The processes below poll the store's revision only every 60 s, so only
/// the `NOTIFY` pushed at commit can meet it.
const PROPAGATION: Duration = Duration::from_secs(2);

/// The refresh grants the identity-platform double received, as
/// (refresh token redeemed, status answered; 0 = never answered).
fn refresh_grants(env: &Env) -> Vec<(String, u16)> {
    env.idp
        .requests()
        .into_iter()
        .filter(|r| r.grant_type.as_deref() == Some("refresh_token"))
        .map(|r| {
            let rt = r.form_value("refresh_token").unwrap_or_default().to_owned();
            (rt, r.status)
        })
        .collect()
}

/// The refresh token stored for `name`, unsealed, with its generation.
async fn stored_refresh_token(env: &Env, name: &str) -> (String, i64) {
    use authswap::store::{open_sealer, KeyUse};
    let config = env.config();
    let store = env.any_store().await;
    let rec = store.get(name).await.unwrap().expect("identity");
    let (sealed, generation) = store.refresh_token(rec.id).await.unwrap().expect("linked");
    let sealer = open_sealer(&config.store, store.as_ref(), KeyUse::Link)
        .await
        .unwrap();
    let rt = sealer.open(rec.id, &sealed).unwrap();
    (rt.expose().to_owned(), generation)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_storm_over_three_processes_costs_one_refresh_per_identity() {
    let Some(url) = support::pg::database().await else {
        return;
    };
    let env = Env::start_with(IdpOptions {
        // Redeeming a superseded refresh token fails (invalid_grant) and
        // marks the identity needs_reauth: a double refresh is loud.
        revoke_on_rotation: true,
        ..IdpOptions::default()
    })
    .await;
    env.use_store_url(&url);
    const N: usize = 200;
    let names: Vec<String> = (0..N).map(|i| format!("user{i}")).collect();
    let seeded = seed_linked(&env, &names, PASSWORD).await;
    let fleet = start_fleet(&env, 3, &[]).await;
    // Nothing is cached or stored: every identity asked on every replica
    // at once (3 × 200 requests in flight), each refresh taking a while.
    env.idp.set_delay(Duration::from_millis(20));
    let started = std::time::Instant::now();
    let client = HttpClient::default();
    let mut calls = tokio::task::JoinSet::new();
    for name in &names {
        for r in &fleet {
            let (client, name, addr, replica) =
                (client.clone(), name.clone(), r.http, r.name.clone());
            calls.spawn(async move {
                let reply = client.ews(addr, &name, PASSWORD, SOAP).await;
                (name, replica, reply)
            });
        }
    }
    while let Some(done) = calls.join_next().await {
        let (name, replica, reply) = done.unwrap();
        assert_eq!(reply.status, 200, "{name} on {replica}: {}", reply.text());
    }
    eprintln!(
        "{} requests over 3 processes in {:?}",
        3 * N,
        started.elapsed()
    );
    assert_eq!(
        env.idp.refresh_calls(),
        N,
        "one refresh per identity across the three processes"
    );
    assert_eq!(env.idp.successful_refreshes(), N);
    // Each seeded refresh token was redeemed exactly once, successfully.
    let grants = refresh_grants(&env);
    for (rt, status) in &grants {
        assert_eq!(*status, 200, "a refresh failed: {grants:?}");
        assert!(seeded.contains(rt), "redeemed a token never seeded");
    }
    let distinct: std::collections::HashSet<_> = grants.iter().map(|(rt, _)| rt).collect();
    assert_eq!(distinct.len(), N);
    assert_eq!(env.ews.requests().len(), 3 * N);
    // Nobody needs a new sign-in; every identity is on its first link
    // (the token generation counts links; the rotation shows above).
    let store = env.any_store().await;
    let records = store.list().await.unwrap();
    assert_eq!(records.len(), N);
    for r in records {
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(r.token_generation, 1, "{r:?}");
    }
    for mut r in fleet {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_password_change_and_relink_through_one_process_reach_the_others() {
    let Some(url) = support::pg::database().await else {
        return;
    };
    let env = Env::start_with(IdpOptions {
        revoke_on_rotation: true,
        ..IdpOptions::default()
    })
    .await;
    env.use_store_url(&url);
    let names = ["alice", "bob", "carol"].map(String::from);
    let seeded = seed_linked(&env, &names, PASSWORD).await;
    // The revision poll (the safety net) only every minute.
    let fleet = start_fleet(&env, 3, &[("AUTHSWAP_TOKENS__RELOAD_INTERVAL", "60s")]).await;
    let limit = Duration::from_secs(10);
    for name in &names {
        for r in &fleet {
            assert_eq!(try_ews(r.http, name, PASSWORD, limit).await, Ok(200));
        }
    }
    assert_eq!(env.idp.refresh_calls(), 3, "one refresh per identity");
    let admin = reqwest::Client::new();
    let api = |r: &Replica, path: &str| format!("http://{}/api/v1/identities/{path}", r.admin);

    // alice removed through r0: refused everywhere.
    let res = admin
        .delete(api(&fleet[0], "alice"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204, "{:?}", res.text().await);
    for r in &fleet {
        let took = within(PROPAGATION, || async move {
            try_ews(r.http, "alice", PASSWORD, limit).await == Ok(401)
        })
        .await
        .unwrap_or_else(|| panic!("{} still serves a removed identity", r.name));
        eprintln!("removal seen by {} after {took:?}", r.name);
    }

    // bob's password changed through r1: the old one is refused and the
    // new one accepted everywhere.
    let res = admin
        .put(api(&fleet[1], "bob/password"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({ "password": "bob-password-2" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{:?}", res.text().await);
    for r in &fleet {
        let took = within(PROPAGATION, || async move {
            try_ews(r.http, "bob", PASSWORD, limit).await == Ok(401)
        })
        .await
        .unwrap_or_else(|| panic!("{} still accepts bob's old password", r.name));
        eprintln!("password change seen by {} after {took:?}", r.name);
        assert_eq!(
            try_ews(r.http, "bob", "bob-password-2", limit).await,
            Ok(200)
        );
    }

    // carol re-linked (`identity import`, another process on the same
    // database) to a new refresh token; the old grant is revoked. Every
    // replica drops the access token of the old link and serves carol
    // with one from the new one, costing one refresh fleet-wide.
    assert_eq!(
        try_ews(fleet[0].http, "carol", PASSWORD, limit).await,
        Ok(200)
    );
    let old_access = env.ews.last_request().and_then(|r| r.bearer);
    assert!(old_access.is_some());
    for r in &fleet[1..] {
        assert_eq!(try_ews(r.http, "carol", PASSWORD, limit).await, Ok(200));
        assert_eq!(env.ews.last_request().unwrap().bearer, old_access);
    }
    let calls_before = env.idp.refresh_calls();
    let new_rt = env.idp.seed_refresh_token("carol@contoso.com");
    assert!(env
        .idp
        .revoke_refresh_token(&stored_refresh_token(&env, "carol").await.0));
    let out = tokio::task::block_in_place(|| {
        env.cli(
            &[
                "identity",
                "import",
                "carol",
                "--refresh-token-stdin",
                "--no-verify",
            ],
            Some(&format!("{new_rt}\n")),
        )
    });
    assert!(out.status.success(), "{out:?}");
    let (ews, old_access) = (&env.ews, &old_access);
    for r in &fleet {
        let took = within(PROPAGATION, || async move {
            try_ews(r.http, "carol", PASSWORD, limit).await == Ok(200)
                && ews.last_request().unwrap().bearer != *old_access
        })
        .await
        .unwrap_or_else(|| panic!("{} still uses the old link's access token", r.name));
        eprintln!("re-link seen by {} after {took:?}", r.name);
    }
    assert_eq!(env.idp.refresh_calls(), calls_before + 1);
    let grants = refresh_grants(&env);
    assert_eq!(grants.last().unwrap(), &(new_rt.clone(), 200));
    assert!(
        grants.iter().all(|(_, status)| *status == 200),
        "{grants:?}"
    );
    // Nobody needs a new sign-in; carol's link moved on by one rotation.
    let store = env.any_store().await;
    for r in store.list().await.unwrap() {
        assert!(r.is_ok(), "{r:?}");
    }
    // Linked a second time (the token generation counts links), and
    // rotated by the one refresh since.
    let (stored, generation) = stored_refresh_token(&env, "carol").await;
    assert_eq!(generation, 2);
    assert_ne!(stored, seeded[2]);
    assert_ne!(stored, new_rt);
    assert_eq!(
        env.idp.is_refresh_token_valid(&stored).as_deref(),
        Some("carol@contoso.com")
    );
    for mut r in fleet {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_in_the_middle_of_a_refresh_loses_nothing() {
    let Some(url) = support::pg::database().await else {
        return;
    };
    let env = Env::start_with(IdpOptions {
        // A second redemption of the seeded refresh token (superseded by
        // a rotation) would fail and mark the identity needs_reauth.
        revoke_on_rotation: true,
        ..IdpOptions::default()
    })
    .await;
    env.use_store_url(&url);
    let seeded = seed_linked(&env, &["dave".to_owned()], PASSWORD).await;
    let seeded = seeded[0].clone();
    // A held refresh must not time out on its own while the test acts.
    let envs = [("AUTHSWAP_IDENTITY_PROVIDER__TIMEOUT", "30s")];
    let mut fleet = start_fleet(&env, 2, &envs).await;
    let (a_http, b_http) = (fleet[0].http, fleet[1].http);
    let db = &sqlx::PgPool::connect(&url).await.unwrap();
    // (The cluster is shared with the other tests: this database only.)
    let leases_held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
        AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";
    let client = HttpClient::default();
    let b_admin = fleet[1].admin;
    let b_waits = || {
        let client = client.clone();
        async move {
            let text = client.get(b_admin, "/metrics").await.text();
            sample(&text, "authswap_refresh_lease_waits_total").unwrap_or(0.0)
        }
    };

    let idp = &env.idp;
    // A's refresh is at the platform, unanswered: A holds dave's lease.
    env.idp.set_held(true);
    let on_a = tokio::spawn(try_ews(a_http, "dave", PASSWORD, Duration::from_secs(30)));
    assert!(
        within(Duration::from_secs(10), || async move {
            idp.refresh_calls() == 1
        })
        .await
        .is_some(),
        "A's refresh did not reach the platform"
    );
    let held: i64 = sqlx::query_scalar(leases_held).fetch_one(db).await.unwrap();
    assert_eq!(held, 1, "A holds dave's lease in the database");
    // B's request for dave finds that lease held and waits for it.
    let on_b = tokio::spawn(try_ews(b_http, "dave", PASSWORD, Duration::from_secs(30)));
    let waits = within(Duration::from_secs(10), || async { b_waits().await == 1.0 }).await;
    assert!(waits.is_some(), "B is not waiting for A's lease");
    assert_eq!(
        env.idp.refresh_calls(),
        1,
        "B went to the platform meanwhile"
    );
    assert_eq!(env.idp.abandoned_requests(), 0);

    // SIGKILL A in the middle of its refresh.
    fleet[0].kill9().await;
    assert!(on_a.await.unwrap().is_err(), "a killed replica answered");
    // PostgreSQL ends A's connection, the lease goes with it (nothing was
    // committed), and B refreshes from the stored token: B's request
    // arrives at the platform (held as well).
    assert!(
        within(Duration::from_secs(10), || async move {
            idp.refresh_calls() == 2
        })
        .await
        .is_some(),
        "B did not take over after A died"
    );
    // The platform never processes A's request: its client is gone.
    assert!(
        within(Duration::from_secs(10), || async move {
            idp.abandoned_requests() == 1
        })
        .await
        .is_some(),
        "A's held request was not dropped by the platform"
    );
    env.idp.set_held(false);
    assert_eq!(on_b.await.unwrap(), Ok(200));
    assert_eq!(env.idp.successful_refreshes(), 1);
    assert_eq!(
        refresh_grants(&env),
        [(seeded.clone(), 0), (seeded.clone(), 200)],
        "A's redemption never answered, B's answered"
    );
    // The rotated refresh token is stored, valid, and the seeded one is
    // superseded; dave is fine (and still on his first link).
    let (stored, generation) = stored_refresh_token(&env, "dave").await;
    assert_eq!(generation, 1);
    assert_ne!(stored, seeded);
    assert_eq!(
        env.idp.is_refresh_token_valid(&stored).as_deref(),
        Some("dave@contoso.com")
    );
    assert_eq!(env.idp.is_refresh_token_valid(&seeded), None);
    let store = env.any_store().await;
    let rec = store.get("dave").await.unwrap().unwrap();
    assert!(rec.is_ok(), "{rec:?}");

    // A comes back and takes the access token B stored: no refresh.
    let config = env.write_config();
    fleet[0] = Replica::start("r0-restarted", &config, &envs).await;
    assert_eq!(
        try_ews(fleet[0].http, "dave", PASSWORD, Duration::from_secs(10)).await,
        Ok(200)
    );
    assert_eq!(env.idp.refresh_calls(), 2);
    // The chain goes on from the stored token: after the access token is
    // revoked, the next refresh redeems the rotated one.
    env.idp.revoke_all_access_tokens();
    assert_eq!(
        try_ews(fleet[0].http, "dave", PASSWORD, Duration::from_secs(10)).await,
        Ok(200)
    );
    assert_eq!(env.idp.successful_refreshes(), 2);
    assert_eq!(refresh_grants(&env).last(), Some(&(stored, 200)));
    let rec = store.get("dave").await.unwrap().unwrap();
    assert!(rec.is_ok(), "{rec:?}");
    assert_eq!(rec.token_generation, 1, "still the first link");
    let (rotated_again, _) = stored_refresh_token(&env, "dave").await;
    assert!(env.idp.is_refresh_token_valid(&rotated_again).is_some());
    for mut r in fleet {
        r.stop().await;
    }
}
