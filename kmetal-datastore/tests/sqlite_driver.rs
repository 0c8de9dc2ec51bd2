//! The SQLite revision log (the embedded default) in a temp file: the conformance suite, data
//! and leases surviving a reopen, and two stores on one file seeing each other's writes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kmetal_datastore::Datastore;
use kmetal_datastore::model::{PutRequest, RangeRequest, WatchRequest};
use kmetal_datastore::sqlite::{SqliteConfig, SqliteStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_driver_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let n = AtomicUsize::new(0);
    let dir_path = dir.path().to_path_buf();
    kmetal_testkit::conformance::run("sqlite", || {
        let path = dir_path.join(format!("conf{}.db", n.fetch_add(1, Ordering::Relaxed)));
        async move {
            let cfg = SqliteConfig::new(path).with_progress_interval(Duration::from_secs(1));
            Arc::new(SqliteStore::open(cfg).await.unwrap()) as Arc<dyn Datastore>
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_and_leases_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let (rev, lease) = {
        let s = SqliteStore::open(SqliteConfig::new(&path)).await.unwrap();
        let lease = s.lease_grant(2, 0).await.unwrap().id;
        s.put(PutRequest::new("/keep", "v")).await.unwrap();
        let rev = s
            .put(PutRequest::new("/leased", "v").with_lease(lease))
            .await
            .unwrap()
            .revision;
        (rev, lease)
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let s = SqliteStore::open(SqliteConfig::new(&path)).await.unwrap();
    assert_eq!(s.status().await.unwrap().revision, rev);
    assert_eq!(s.range(RangeRequest::get("/keep")).await.unwrap().count, 1);
    assert!(s.leases().await.unwrap().contains(&lease));
    // The lease expires while the store is open again: the persisted expiry time counts.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.range(RangeRequest::get("/leased")).await.unwrap().count == 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the persisted lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_on_one_file_see_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let a = SqliteStore::open(SqliteConfig::new(&path)).await.unwrap();
    let b = SqliteStore::open(SqliteConfig::new(&path)).await.unwrap();
    let start = a.status().await.unwrap().revision + 1;
    let mut wb = b.watch(WatchRequest::prefix("/x/", start)).await.unwrap();
    for i in 0..20 {
        let s = if i % 2 == 0 { &a } else { &b };
        s.put(PutRequest::new(format!("/x/{i:02}"), "v"))
            .await
            .unwrap();
    }
    let mut revs = Vec::new();
    while revs.len() < 20 {
        let batch = tokio::time::timeout(Duration::from_secs(5), wb.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        revs.extend(batch.events.iter().map(|e| e.kv.mod_revision));
    }
    assert_eq!(revs, (start..start + 20).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_compaction_runs_on_its_interval() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = SqliteConfig::new(dir.path().join("auto.db"));
    cfg.log.auto_compact = Some((Duration::from_millis(200), 5));
    let s = SqliteStore::open(cfg).await.unwrap();
    kmetal_testkit::conformance::automatic_compaction(&s, 5).await;
}
