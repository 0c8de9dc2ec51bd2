//! Per-tenant snapshots and live migrations across real drivers: an etcd tenant's snapshot
//! restored into PostgreSQL with the same content; a live migration memory → PostgreSQL →
//! etcd → SQLite under write load loses nothing; a migration that fails leaves the source serving;
//! corrupt snapshots are refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kmetal_datastore::backup::{self, BackupError, content_hash};
use kmetal_datastore::etcd::{EtcdConfig, EtcdStore, Keyspace};
use kmetal_datastore::migrate::{MigratableStore, MigrationError, Progress, migrate};
use kmetal_datastore::model::{Limits, PutRequest, RangeRequest};
use kmetal_datastore::postgres::{PgConfig, PgStore};
use kmetal_datastore::{Datastore, MemoryStore};
use kmetal_testkit::{EtcdCluster, EtcdOptions, PostgresOptions, PostgresServer};

async fn pg_store(pg: &PostgresServer, db: &str) -> Arc<dyn Datastore> {
    pg.create_database(db).await.unwrap();
    Arc::new(
        PgStore::connect(PgConfig::new(pg.conninfo(db)))
            .await
            .unwrap(),
    )
}

async fn fill(s: &dyn Datastore, n: usize) {
    let lease = s.lease_grant(600, 0).await.unwrap().id;
    for i in 0..n {
        let mut p = PutRequest::new(
            format!("/registry/pods/ns/{i:04}"),
            vec![(i % 251) as u8; 300],
        );
        if i % 10 == 0 {
            p = p.with_lease(lease);
        }
        s.put(p).await.unwrap();
    }
    // Binary keys too: etcd keys are bytes, not text.
    s.put(PutRequest::new(vec![0x00, 0xff, 0x7f], vec![0u8, 1, 2]))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_snapshot_restores_into_postgres() {
    let etcd = EtcdCluster::start(EtcdOptions::default()).await.unwrap();
    let source = EtcdStore::connect(
        EtcdConfig::new(etcd.endpoints()),
        Keyspace::shared("tenant1").unwrap(),
    )
    .await
    .unwrap();
    fill(&source, 300).await;
    let mut file = Vec::new();
    let info = backup::snapshot(&source, &mut file).await.unwrap();
    assert_eq!((info.keys, info.leases), (301, 1));

    let pg = PostgresServer::start(PostgresOptions {
        fsync: false,
        ..PostgresOptions::default()
    })
    .unwrap();
    let target = pg_store(&pg, "restored").await;
    let restored = backup::restore(target.as_ref(), &file).await.unwrap();
    assert_eq!(restored, info);
    assert_eq!(
        content_hash(&source, 0).await.unwrap(),
        content_hash(target.as_ref(), 0).await.unwrap()
    );
    let leased = target
        .range(RangeRequest::get("/registry/pods/ns/0010"))
        .await
        .unwrap();
    assert_ne!(leased.kvs[0].lease, 0, "lease attachments survive");

    // Restoring twice would mix data: refused.
    assert!(matches!(
        backup::restore(target.as_ref(), &file).await,
        Err(BackupError::TargetNotEmpty { keys: 301 })
    ));
    // One flipped bit anywhere is caught.
    let mut corrupt = file.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 1;
    assert!(matches!(
        backup::restore(&MemoryStore::new(), &corrupt).await,
        Err(BackupError::Checksum)
    ));
    assert!(matches!(
        backup::restore(
            &MemoryStore::new(),
            b"not a snapshot at all, just text...................................."
        )
        .await,
        Err(BackupError::Format { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_memory_to_postgres_to_etcd_to_sqlite_loses_nothing() {
    let pg = PostgresServer::start(PostgresOptions {
        fsync: false,
        ..PostgresOptions::default()
    })
    .unwrap();
    let etcd = EtcdCluster::start(EtcdOptions::default()).await.unwrap();
    let store = Arc::new(MigratableStore::new(Arc::new(MemoryStore::new())));
    fill(store.as_ref(), 500).await;

    // A writer keeps going through both migrations; its writes wait while frozen.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("/live/{i:05}");
                store.put(PutRequest::new(key.clone(), "x")).await.unwrap();
                acked.push(key);
                i += 1;
                // A steady client, not a flood: the copy stays a few thousand keys.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut seen = Vec::new();
    let report = migrate(&store, pg_store(&pg, "tenant").await, |p| seen.push(p))
        .await
        .unwrap();
    assert!(report.keys > 500);
    assert_eq!(report.leases, 1);
    assert!(seen.contains(&Progress::Frozen) && seen.contains(&Progress::SwitchedOver));
    assert!(
        seen.iter()
            .any(|p| matches!(p, Progress::Copying { done, total } if done == total))
    );
    tokio::time::sleep(Duration::from_millis(200)).await;

    let etcd_target: Arc<dyn Datastore> = Arc::new(
        EtcdStore::connect(EtcdConfig::new(etcd.endpoints()), Keyspace::Dedicated)
            .await
            .unwrap(),
    );
    migrate(&store, etcd_target.clone(), |_| {}).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let acked = writer.await.unwrap();
    assert!(acked.len() > 10, "writes went on around the migrations");

    // Everything acknowledged before, during and after both migrations is in etcd now.
    let live = etcd_target
        .range(RangeRequest::prefix("/live/"))
        .await
        .unwrap();
    assert_eq!(live.count as usize, acked.len());
    let pods = etcd_target
        .range(RangeRequest::prefix("/registry/pods/").count_only())
        .await
        .unwrap();
    assert_eq!(pods.count, 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_migration_leaves_the_source_serving() {
    let source: Arc<dyn Datastore> = Arc::new(MemoryStore::new());
    let store = MigratableStore::new(source.clone());
    fill(&store, 200).await;
    let before = content_hash(source.as_ref(), 0).await.unwrap();
    // A target too small to hold the tenant fails mid-copy.
    let tiny = Arc::new(MemoryStore::with_limits(Limits {
        quota_backend_bytes: 20_000,
        ..Limits::default()
    }));
    let err = migrate(&store, tiny, |_| {}).await.unwrap_err();
    assert!(matches!(err, MigrationError::Target { .. }), "{err:?}");
    // Still the source, untouched, and writable.
    assert_eq!(
        content_hash(store.backend().await.as_ref(), 0)
            .await
            .unwrap(),
        before
    );
    store.put(PutRequest::new("/after", "ok")).await.unwrap();
    assert_eq!(
        source
            .range(RangeRequest::get("/after"))
            .await
            .unwrap()
            .count,
        1
    );
    // A non-empty target is refused before anything is frozen.
    let busy = Arc::new(MemoryStore::new());
    busy.put(PutRequest::new("/other-tenant", "x"))
        .await
        .unwrap();
    assert!(matches!(
        migrate(&store, busy, |_| {}).await,
        Err(MigrationError::TargetNotEmpty { keys: 1 })
    ));
}

/// Watches opened before a migration go on across it: memory → SQLite → PostgreSQL keep
/// every revision (a key's mod revision is the same on the target, writes after the switch
/// continue the numbering) and the watchers, with and without prev_kv, see every write of a
/// writer running throughout once, in order; the move to etcd (which chooses its revisions)
/// ends them with the compacted error instead of leaving them silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_follow_a_migration_and_revisions_are_kept() {
    use kmetal_datastore::DatastoreError;
    use kmetal_datastore::model::WatchRequest;
    use kmetal_datastore::sqlite::{SqliteConfig, SqliteStore};
    let pg = PostgresServer::start(PostgresOptions {
        fsync: false,
        ..PostgresOptions::default()
    })
    .unwrap();
    let etcd = EtcdCluster::start(EtcdOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(MigratableStore::new(Arc::new(MemoryStore::new())));
    fill(store.as_ref(), 100).await;
    let before = store
        .range(RangeRequest::get("/registry/pods/ns/0042"))
        .await
        .unwrap();

    let mut watchers = Vec::new();
    for prev_kv in [false, true] {
        let mut req = WatchRequest::prefix("/live/", 0);
        req.prev_kv = prev_kv;
        watchers.push(store.watch(req).await.unwrap());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let r = store
                    .put(PutRequest::new(format!("/live/{}", i % 7), format!("v{i}")))
                    .await
                    .unwrap();
                acked.push(r.revision);
                i += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let sqlite: Arc<dyn Datastore> = Arc::new(
        SqliteStore::open(SqliteConfig::new(dir.path().join("t.db")))
            .await
            .unwrap(),
    );
    let report = migrate(&store, sqlite, |_| {}).await.unwrap();
    assert!(report.revisions_kept);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let report = migrate(&store, pg_store(&pg, "follow").await, |_| {})
        .await
        .unwrap();
    assert!(report.revisions_kept);
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    let acked = writer.await.unwrap();
    assert!(acked.len() > 20, "{} writes", acked.len());
    // Revisions on the target are the source's: same mod revision, and numbering continued.
    let after = store
        .range(RangeRequest::get("/registry/pods/ns/0042"))
        .await
        .unwrap();
    assert_eq!(after.kvs[0].mod_revision, before.kvs[0].mod_revision);
    assert_eq!(after.kvs[0].create_revision, before.kvs[0].create_revision);
    assert!(
        acked.windows(2).all(|w| w[1] > w[0]),
        "revisions only go up"
    );

    for (i, w) in watchers.iter_mut().enumerate() {
        let mut seen = Vec::new();
        while seen.len() < acked.len() {
            let batch = tokio::time::timeout(Duration::from_secs(10), w.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "watcher {i} went silent after {} of {}",
                        seen.len(),
                        acked.len()
                    )
                })
                .expect("open")
                .expect("no error");
            for ev in batch.events {
                if i == 1 && ev.kv.version > 1 {
                    assert!(ev.prev_kv.is_some(), "prev_kv across the switch");
                }
                seen.push(ev.kv.mod_revision);
            }
        }
        assert_eq!(seen, acked, "watcher {i}: every write once, in order");
    }

    // etcd picks its own revisions: the open watches end with the compacted error.
    let etcd_target: Arc<dyn Datastore> = Arc::new(
        EtcdStore::connect(EtcdConfig::new(etcd.endpoints()), Keyspace::Dedicated)
            .await
            .unwrap(),
    );
    let report = migrate(&store, etcd_target, |_| {}).await.unwrap();
    assert!(!report.revisions_kept);
    for w in &mut watchers {
        let end = tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .expect("the watch ends, not silent");
        assert!(
            matches!(end, Some(Err(DatastoreError::Compacted { .. }))),
            "{end:?}"
        );
    }
}

/// A snapshot restored with `Revisions::Keep` into memory, SQLite and PostgreSQL has every
/// key's create/mod revision and version of the source and the source's revision, so a
/// client's resourceVersions stay valid and the next write is the next revision; etcd,
/// which chooses its own revisions, refuses it and is left empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_keeping_revisions_is_invisible_to_clients() {
    use kmetal_datastore::backup::Revisions;
    use kmetal_datastore::model::{DeleteRangeRequest, WatchRequest};
    use kmetal_datastore::sqlite::{SqliteConfig, SqliteStore};

    let source = MemoryStore::new();
    fill(&source, 300).await;
    for i in (0..300).step_by(7) {
        let key = format!("/registry/pods/ns/{i:04}");
        source
            .put(PutRequest::new(key.clone(), "v2"))
            .await
            .unwrap();
        if i % 2 == 0 {
            source
                .delete_range(DeleteRangeRequest::key(key))
                .await
                .unwrap();
        }
    }
    let mut file = Vec::new();
    let info = backup::snapshot(&source, &mut file).await.unwrap();
    let all = RangeRequest::prefix(bytes::Bytes::new());
    let want = source.range(all.clone()).await.unwrap().kvs;

    let dir = tempfile::tempdir().unwrap();
    let pg = PostgresServer::start(PostgresOptions {
        fsync: false,
        ..PostgresOptions::default()
    })
    .unwrap();
    let targets: Vec<(&str, Arc<dyn Datastore>)> = vec![
        ("memory", Arc::new(MemoryStore::new())),
        (
            "sqlite",
            Arc::new(
                SqliteStore::open(SqliteConfig::new(dir.path().join("r.db")))
                    .await
                    .unwrap(),
            ),
        ),
        ("postgres", pg_store(&pg, "kept").await),
    ];
    for (name, target) in targets {
        let restored = backup::restore_with(target.as_ref(), &file, Revisions::Keep)
            .await
            .unwrap();
        assert_eq!(restored, info, "{name}");
        let got = target.range(all.clone()).await.unwrap();
        assert_eq!(
            got.kvs, want,
            "{name}: same revisions, versions, leases, values"
        );
        assert_eq!(got.revision, info.revision, "{name}: the source's revision");
        let mut w = target
            .watch(WatchRequest::prefix("/registry/", info.revision + 1))
            .await
            .unwrap();
        let put = target
            .put(PutRequest::new("/registry/after", "x"))
            .await
            .unwrap();
        assert_eq!(put.revision, info.revision + 1, "{name}: numbering goes on");
        let b = tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(b.events[0].kv.mod_revision, info.revision + 1, "{name}");
    }

    let etcd = EtcdCluster::start(EtcdOptions::default()).await.unwrap();
    let target = EtcdStore::connect(EtcdConfig::new(etcd.endpoints()), Keyspace::Dedicated)
        .await
        .unwrap();
    assert!(matches!(
        backup::restore_with(&target, &file, Revisions::Keep).await,
        Err(BackupError::RevisionsNotKept)
    ));
    assert_eq!(target.range(all.count_only()).await.unwrap().count, 0);
    assert!(
        target.leases().await.unwrap().is_empty(),
        "its leases revoked"
    );
}
