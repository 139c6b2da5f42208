//! Micro-benchmarks of the per-request hot path: the verified-credential
//! cache (no argon2 in steady state, compared with one argon2 verification
//! as the baseline) and Basic header parsing.

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
    let auth = Authenticator::new(directory, metrics.clone(), config);
    let src = IpAddr::V4(Ipv4Addr::LOCALHOST);
    rt.block_on(auth.authenticate("user42", b"correct horse battery", src, Protocol::http))
        .unwrap();

    let mut group = c.benchmark_group("credential_check");
    group.bench_function("cache_hit_10k_identities", |b| {
        b.iter(|| {
            rt.block_on(auth.authenticate(
                black_box("user42"),
                black_box(b"correct horse battery"),
                src,
                Protocol::http,
            ))
            .unwrap()
        })
    });
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

criterion_group!(benches, credentials, basic_header);
criterion_main!(benches);
