//! Several replicas on one PostgreSQL store (issue 14): two `serve`
//! instances (in-process, each with its own engine, pool and listeners)
//! share identities; an expiry storm spread over both costs one refresh
//! per identity in total (the refresh lease in the database, and the
//! access token the first replica stored), and the identity-platform
//! double revokes every refresh token once it is rotated, so a replica
//! that redeemed a superseded one would fail loudly.

mod support;

use std::time::Duration;
use support::harness::{Env, HttpClient, SOAP};
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
