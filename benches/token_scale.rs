//! Token engine at scale (issue #4, benchmark 3).
//!
//! 10,000 linked identities whose access tokens are not cached (a fresh
//! engine: as if every token had expired) and 50,000 concurrent
//! `access_token` calls, five per identity in shuffled order, all released
//! at once on a multi-thread runtime. The engine is the real one, built by
//! `App::open` from the test harness configuration, so refreshes go through
//! the real IdpClient (hyper + rustls) to the TLS identity-platform double,
//! which sleeps 20 ms per request to model the network round trip.
//!
//! Reported per `tokens.max_concurrent_refreshes` setting (the default 64,
//! and 1024, in the same run): refresh calls seen by the platform (asserted
//! to equal the number of identities, never more), time to drain every
//! call, p50/p99/max wait per call (from the moment all calls were issued),
//! the wait compared with a lone refresh measured first (the baseline round
//! trip), and the single-flight wake-up spread (how far apart the five
//! callers of one identity finished).
//!
//! When PostgreSQL is installed, the same storm runs once more over two
//! engines (replicas) sharing a fresh PostgreSQL database, with the same
//! fleet-wide bound as the default run, and the two are compared.
//!
//! Quick mode (`cargo test --bench token_scale`): 200 identities, 1,000 calls.
//! Full: `cargo bench --bench token_scale`.

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use authswap::app::App;
use authswap::config::Config;
use authswap::identity::{hash_password, Identity};
use authswap::secret::Secret;
use authswap::store::{now_unix, open_sealer, KeyUse, NewIdentity, SqliteStore};
use authswap::token::Scopes;
use common::{cpu_time, quick_mode, ratio, Latencies, Table};
use rand::seq::SliceRandom;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{ConnectOptions, Connection};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::harness::Env;

/// Password of every seeded identity.
const PASSWORD: &str = "bench-password-1";
/// Delay the identity-platform double adds to every request.
const IDP_DELAY: Duration = Duration::from_millis(20);
/// Lone refreshes measured before each run (on identities outside the run).
const BASELINE_REFRESHES: usize = 5;
/// Upper bound for one run to drain.
const RUN_LIMIT: Duration = Duration::from_secs(300);

fn name(i: usize) -> String {
    format!("user{i:05}")
}

/// Seeds identities `1..=n` (ids = row ids), each linked to a refresh token
/// that the identity-platform double accepts, in one transaction written
/// straight into the database (one `create` + `link` per identity would cost
/// two fsyncs each).
async fn seed(env: &Env, config: &Config, n: usize) {
    // Open once through the store so the migrations run.
    let store = SqliteStore::open(&config.store.path)
        .await
        .expect("open store");
    let sealer = open_sealer(&config.store, &store, KeyUse::Link)
        .await
        .expect("key");
    drop(store);
    let hash = hash_password(PASSWORD, &config.auth).expect("hash");
    let mut conn = SqliteConnectOptions::new()
        .filename(&config.store.path)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect to the database");
    let now = now_unix();
    let mut tx = conn.begin().await.expect("begin");
    for i in 1..=n {
        let name = name(i);
        let mailbox = format!("{name}@contoso.com");
        let rt = env.idp.seed_refresh_token(&mailbox);
        let sealed = sealer.seal(i as i64, &Secret::new(rt));
        sqlx::query(
            "INSERT INTO identities (id, name, name_key, mailbox, password_hash, refresh_token, \
             key_id, token_generation, status, last_success_at, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, 1, 'linked', ?, ?, ?)",
        )
        .bind(i as i64)
        .bind(&name)
        .bind(&name)
        .bind(&mailbox)
        .bind(&hash)
        .bind(&sealed.blob)
        .bind(&sealed.key_id)
        .bind(now)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await
        .expect("insert identity");
    }
    sqlx::query("UPDATE meta SET v = v + 1 WHERE k = 'revision'")
        .execute(&mut *tx)
        .await
        .expect("bump revision");
    tx.commit().await.expect("commit");
    conn.close().await.expect("close");
}

/// Seeds identities `1..=n` into the PostgreSQL store of `config` through
/// the store's own API (one batch insert, then one link per identity).
async fn seed_pg(env: &Env, config: &Config, n: usize) {
    let store = authswap::store::open(config)
        .await
        .expect("open PostgreSQL");
    let sealer = open_sealer(&config.store, store.as_ref(), KeyUse::Link)
        .await
        .expect("key");
    let hash = hash_password(PASSWORD, &config.auth).expect("hash");
    let rows: Vec<NewIdentity> = (1..=n)
        .map(|i| NewIdentity::delegated(&name(i), &format!("{}@contoso.com", name(i)), &hash))
        .collect();
    for rec in store.create_many(&rows, "bench").await.expect("create") {
        let rt = env.idp.seed_refresh_token(&rec.mailbox);
        store
            .link(rec.id, &sealer.seal(rec.id, &Secret::new(rt)))
            .await
            .expect("link");
    }
}

struct Outcome {
    replicas: usize,
    permits: usize,
    refreshes: usize,
    errors: usize,
    baseline: Duration,
    drain: Duration,
    /// From the release of all calls to each call's completion.
    wait: Latencies,
    /// From each call's first poll to its completion.
    in_call: Latencies,
    /// Per identity: last minus first completion among its callers.
    spread: Latencies,
    /// CPU time of this whole process (callers, engine, store, the
    /// identity-platform double) from the release to the last completion.
    cpu: Duration,
}

/// One run against a fresh engine (nothing cached) with `permits` refreshes
/// in flight at most: `BASELINE_REFRESHES` lone refreshes on identities
/// `n+1..`, then `calls_per` calls for each of identities `1..=n`.
///
/// With `replicas` > 1 (PostgreSQL), that many engines (each with its own
/// pool, as separate `serve` processes would have) share the store, and the
/// calls of one identity alternate between them; `permits` is then the
/// fleet-wide bound, split evenly (each replica's pool holds its share of
/// leases plus two connections).
async fn run(
    env: &Env,
    base: &Config,
    replicas: usize,
    permits: usize,
    n: usize,
    calls_per: usize,
) -> Outcome {
    let mut config = base.clone();
    config.tokens.max_concurrent_refreshes = permits / replicas;
    if replicas > 1 {
        config.store.pool_size = u32::try_from(permits / replicas + 2).expect("pool size");
    }
    let mut apps = Vec::new();
    for _ in 0..replicas {
        let app = App::open(config.clone()).await.expect("app opens");
        assert_eq!(app.directory.len(), n + BASELINE_REFRESHES);
        apps.push(app);
    }
    let app = &apps[0];
    let engine = app.tokens.clone();
    let scopes = Scopes::new(&app.config.http.scopes);
    let identity = |i: usize| -> Arc<Identity> { app.directory.get(&name(i)).expect("seeded") };

    // Baseline: one refresh at a time, nothing else going on.
    let mut lone = Vec::new();
    for i in n + 1..=n + BASELINE_REFRESHES {
        let ident = identity(i);
        let t = Instant::now();
        engine
            .access_token(&ident, &scopes)
            .await
            .expect("lone refresh");
        lone.push(t.elapsed());
    }
    // The first one also opens the TLS connection; take the median.
    lone.sort();
    let baseline = lone[lone.len() / 2];

    // idents[r][i]: identity i as replica r knows it.
    let idents: Vec<Vec<Arc<Identity>>> = apps
        .iter()
        .map(|a| {
            (1..=n)
                .map(|i| a.directory.get(&name(i)).expect("seeded"))
                .collect()
        })
        .collect();
    // Call k of identity i goes to replica k % replicas.
    let mut order: Vec<(usize, usize)> = (0..n * calls_per)
        .map(|k| (k % n, (k / n) % replicas))
        .collect();
    order.shuffle(&mut rand::rng());
    let total = order.len();
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let parked = Arc::new(AtomicUsize::new(0));
    let before = env.idp.refresh_calls();
    let mut tasks = Vec::with_capacity(total);
    for (idx, replica) in order {
        let engine = apps[replica].tokens.clone();
        let ident = idents[replica][idx].clone();
        let scopes = scopes.clone();
        let mut go = go_rx.clone();
        let parked = parked.clone();
        tasks.push(tokio::spawn(async move {
            parked.fetch_add(1, Ordering::Relaxed);
            let _ = go.wait_for(|g| *g).await;
            let started = Instant::now();
            let ok = engine.access_token(&ident, &scopes).await.is_ok();
            (idx, started, Instant::now(), ok)
        }));
    }
    // Release only once every task is parked on the signal.
    let deadline = Instant::now() + Duration::from_secs(60);
    while parked.load(Ordering::Relaxed) < total {
        assert!(Instant::now() < deadline, "tasks did not start in time");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cpu_before = cpu_time(std::process::id());
    let go = Instant::now();
    go_tx.send(true).expect("release");
    let results = tokio::time::timeout(RUN_LIMIT, futures_util::future::join_all(tasks))
        .await
        .expect("every call completes within the run limit");
    let cpu = cpu_time(std::process::id()) - cpu_before;
    let refreshes = env.idp.refresh_calls() - before;

    let mut wait = Latencies::default();
    let mut in_call = Latencies::default();
    let mut errors = 0;
    let mut last = go;
    let mut ends: Vec<Option<(Instant, Instant)>> = vec![None; n];
    for r in results {
        let (idx, started, done, ok) = r.expect("call task");
        if !ok {
            errors += 1;
        }
        wait.record(done - go);
        in_call.record(done - started);
        last = last.max(done);
        let e = &mut ends[idx];
        *e = Some(match *e {
            None => (done, done),
            Some((a, b)) => (a.min(done), b.max(done)),
        });
    }
    let mut spread = Latencies::default();
    for (first, last) in ends.into_iter().flatten() {
        spread.record(last - first);
    }
    Outcome {
        replicas,
        permits,
        refreshes,
        errors,
        baseline,
        drain: last - go,
        wait,
        in_call,
        spread,
        cpu,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

fn ms_us(us: u64) -> String {
    format!("{:.1}", us as f64 / 1e3)
}

fn main() {
    let (n, calls_per) = if quick_mode() { (200, 5) } else { (10_000, 5) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let env = Env::start().await;
        let config = env.config();
        let seeding = Instant::now();
        seed(&env, &config, n + BASELINE_REFRESHES).await;
        println!(
            "seeded {} identities in {:.2} s",
            n + BASELINE_REFRESHES,
            seeding.elapsed().as_secs_f64()
        );
        env.idp.set_delay(IDP_DELAY);

        let mut table = Table::new(
            "token_scale",
            &[
                "store",
                "max_concurrent_refreshes",
                "identities",
                "calls",
                "refresh calls",
                "errors",
                "drain (ms)",
                "ideal drain (ms)",
                "wait p50 (ms)",
                "wait p99 (ms)",
                "wait max (ms)",
                "lone refresh (ms)",
                "p99 / lone",
                "in-call p99 (ms)",
                "join spread p99 / max (ms)",
                "machine CPU per refresh (µs)",
                "CPU floor of the drain (ms)",
                "target max wait ≤ lone + 10 ms",
            ],
        );
        let cores = std::thread::available_parallelism().map_or(1, |p| p.get());
        // The default, a large bound, and no bound at all (every refresh
        // in flight at once): the last shows what the machine itself allows.
        let mut runs: Vec<(Config, usize, usize)> =
            [64, 1024, n].map(|p| (config.clone(), 1, p)).to_vec();
        // Two replicas on one PostgreSQL database (issue 14), the same 64
        // refreshes in flight fleet-wide as the default run above: a fresh
        // database, since replicas adopt the access tokens stored there.
        if let Some(url) = support::pg::database().await {
            env.use_store_url(&url);
            let pg = env.config();
            *env.store_url.lock().unwrap() = None;
            let seeding = Instant::now();
            seed_pg(&env, &pg, n + BASELINE_REFRESHES).await;
            println!(
                "seeded {} identities in PostgreSQL in {:.2} s",
                n + BASELINE_REFRESHES,
                seeding.elapsed().as_secs_f64()
            );
            runs.push((pg, 2, 64));
        } else {
            println!("PostgreSQL not installed: the two-replica run is skipped");
        }
        let mut drains = Vec::new();
        for (config, replicas, permits) in runs {
            let o = run(&env, &config, replicas, permits, n, calls_per).await;
            // Every identity refreshed exactly once: single flight holds
            // under a cold-start storm.
            assert_eq!(
                o.refreshes, n,
                "refresh calls to the platform must equal the identities ({permits} permits)"
            );
            assert_eq!(o.errors, 0, "every call got a token ({permits} permits)");
            assert_eq!(o.wait.count(), (n * calls_per) as u64);
            // With the platform's delay as the only cost, `permits` refreshes
            // overlap: the drain cannot beat ceil(n / permits) round trips.
            let ideal = o.baseline * n.div_ceil(o.permits) as u32;
            let max = Duration::from_micros(o.wait.quantile_us(1.0));
            let target = o.baseline + Duration::from_millis(10);
            // However refreshes are scheduled, the machine must spend this
            // much CPU on them: the drain cannot beat it on `cores` cores.
            let per_refresh = o.cpu / n as u32;
            let floor = o.cpu / cores as u32;
            if o.permits == 64 {
                drains.push((o.replicas, o.drain, o.wait.quantile_us(0.99)));
            }
            table.row(vec![
                if o.replicas == 1 {
                    "SQLite".to_owned()
                } else {
                    format!("PostgreSQL, {} replicas", o.replicas)
                },
                o.permits.to_string(),
                n.to_string(),
                (n * calls_per).to_string(),
                o.refreshes.to_string(),
                o.errors.to_string(),
                ms(o.drain),
                ms(ideal),
                ms_us(o.wait.quantile_us(0.5)),
                ms_us(o.wait.quantile_us(0.99)),
                ms(max),
                ms(o.baseline),
                ratio(o.wait.quantile_us(0.99) as f64, o.baseline.as_micros() as f64),
                ms_us(o.in_call.quantile_us(0.99)),
                format!(
                    "{} / {}",
                    ms_us(o.spread.quantile_us(0.99)),
                    ms_us(o.spread.quantile_us(1.0))
                ),
                format!("{:.0}", per_refresh.as_secs_f64() * 1e6),
                ms(floor),
                format!(
                    "{} ({} ms vs {} ms)",
                    if max <= target { "met" } else { "missed" },
                    ms(max),
                    ms(target)
                ),
            ]);
        }
        table.note(format!(
            "Identity-platform double over TLS on loopback with {} ms added per request; \
             {calls_per} calls per identity, shuffled, all released at once on a {}-worker runtime \
             shared with the double. Wait = completion − release of all calls; in-call = completion − \
             the call's first poll. Lone refresh = median of {BASELINE_REFRESHES} sequential refreshes \
             on a quiet engine (the round trip a single caller sees). Ideal drain = lone refresh × \
             ceil(identities / max_concurrent_refreshes). Join spread = for one identity, last minus \
             first completion among its callers (the single-flight wake-up cost). Machine CPU per refresh = user + system time of this \
             whole process (the callers, the engine, sealing and storing the rotated refresh token, \
             the identity-platform double and its TLS) from the release to the last completion, \
             divided by the refreshes; CPU floor = that × identities / cores, the shortest drain any \
             schedule could reach on this machine (10 ms clock ticks).",
            IDP_DELAY.as_millis(),
            std::thread::available_parallelism().map_or(0, |p| p.get()),
        ));
        if let [(1, sqlite, sqlite_p99), (r, pg, pg_p99)] = drains[..] {
            table.note(format!(
                "PostgreSQL with {r} replicas (each its own engine and pool, calls of one identity \
                 alternating between them, 32 leases each = 64 fleet-wide) against one SQLite engine \
                 with 64 refreshes in flight: drain {}, wait p99 {}. Refresh calls were asserted \
                 to equal the identities in both: the lease held fleet-wide.",
                ratio(pg.as_secs_f64(), sqlite.as_secs_f64()),
                ratio(pg_p99 as f64, sqlite_p99 as f64),
            ));
        }
        table.finish();
    });
}
