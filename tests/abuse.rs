//! Regression tests for the findings of the security review (issue 11,
//! section 3): faults of the machine (a full disk) and abuse by a hostile
//! local process or a hostile upstream. Each test failed on the code the
//! review was made against.

mod support;

use authswap::secret::Secret;
use authswap::store::{Sealer, Status, Store};
use http::StatusCode;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::harness::{Env, HttpClient, SOAP};

const GRACE: Duration = Duration::from_secs(5);
const ALICE: &str = "alice@contoso.com";

/// A small tmpfs mounted for one test (the tests run as root, as `.ci/run`
/// does), unmounted when dropped.
struct SmallFs {
    dir: PathBuf,
}

impl SmallFs {
    fn mount(dir: &Path, size: &str) -> SmallFs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs and needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallFs {
            dir: dir.to_owned(),
        }
    }

    /// Writes a file until the file system is full; returns its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).and_then(|_| f.sync_all()).is_ok() {}
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[tokio::test]
async fn a_full_disk_fails_refreshes_only_while_it_is_full_and_loses_no_token() {
    let env = Env::start().await;
    // The store (database and key file) lives on a 2 MiB file system.
    let fs = SmallFs::mount(&env.dir.path().join("data"), "2m");
    // The platform retires a refresh token when it rotates it: a rotated
    // token that authswap lost would leave the identity unusable.
    env.idp.set_revoke_on_rotation(true);
    env.add_linked("alice", ALICE, "pw-alice-123").await;
    let server = env.serve().await;
    let addr = server.http_addr().unwrap();
    let client = HttpClient::default();
    let ews = |c: &HttpClient| {
        let c = c.clone();
        async move { c.ews(addr, "alice", "pw-alice-123", SOAP).await }
    };
    assert_eq!(ews(&client).await.status, StatusCode::OK);

    // Disk full, then the access token is revoked: the refresh works at
    // the platform, but the rotated token cannot be committed, so its
    // access token is not used.
    let filler = fs.fill();
    env.idp.revoke_user_access_tokens(ALICE);
    let refreshes = env.idp.successful_refreshes();
    let r = ews(&client).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert!(
        env.idp.successful_refreshes() > refreshes,
        "the platform was asked (and rotated the token)"
    );

    // Space again: refreshes work without a restart, and the token the
    // platform rotated while the disk was full is the one in the store.
    std::fs::remove_file(&filler).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let r = ews(&client).await;
        if r.status == StatusCode::OK {
            break;
        }
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
        assert!(
            tokio::time::Instant::now() < deadline,
            "refreshes still fail after the disk was freed: {}",
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And again, for a refresh that starts from a clean state.
    env.idp.revoke_user_access_tokens(ALICE);
    assert_eq!(ews(&client).await.status, StatusCode::OK);

    let store = env.store().await;
    let rec = store.get("alice").await.unwrap().unwrap();
    assert_eq!(rec.status, Status::Linked, "{:?}", rec.last_error);
    let (sealed, _) = store.refresh_token(rec.id).await.unwrap().unwrap();
    let sealer = Sealer::load(None, &env.config().store.key_file).unwrap();
    let stored: Secret = sealer.open(rec.id, &sealed).unwrap();
    assert!(
        env.idp.is_refresh_token_valid(stored.expose()).is_some(),
        "the stored refresh token is the platform's newest"
    );
    server.shutdown(GRACE).await;
    drop(store);
}
