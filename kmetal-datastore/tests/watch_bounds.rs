//! Bounded watches on every fan-out driver (memory, SQLite, PostgreSQL) with a 16 KiB queue:
//! while a writer runs, a slow reader sees every event once, in order; a watch that never
//! read catches up on everything once it does; one that stalled past a compaction ends with
//! etcd's compacted error after what it had queued.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use kmetal_datastore::model::{Limits, PutRequest, Revision, WatchRequest};
use kmetal_datastore::postgres::{PgConfig, PgStore};
use kmetal_datastore::sqlite::{SqliteConfig, SqliteStore};
use kmetal_datastore::{Datastore, DatastoreError, MemoryStore, WatchStream};
use kmetal_testkit::{PostgresOptions, PostgresServer};

const WRITES: usize = 3_000;

fn small() -> Limits {
    Limits {
        watch_buffer_bytes: 16 << 10,
        ..Limits::default()
    }
}

/// Reads events until `n` have come (or the stream ends), pausing every few batches.
async fn read(w: &mut WatchStream, n: usize, pause: Option<Duration>) -> Vec<Revision> {
    let mut revs = Vec::new();
    let mut batches = 0;
    while revs.len() < n {
        let b = tokio::time::timeout(Duration::from_secs(60), w.next())
            .await
            .expect("the watch delivers")
            .expect("the watch goes on")
            .expect("a batch");
        for e in &b.events {
            assert_eq!(e.prev_kv.is_some(), e.kv.version > 1, "prev_kv as asked");
            revs.push(e.kv.mod_revision);
        }
        batches += 1;
        if let Some(p) = pause
            && batches % 20 == 0
        {
            tokio::time::sleep(p).await;
        }
    }
    revs
}

fn contiguous(revs: &[Revision], from: Revision, what: &str) {
    let want: Vec<Revision> = (from..from + revs.len() as i64).collect();
    assert_eq!(
        revs,
        want.as_slice(),
        "{what}: every revision once, in order"
    );
}

async fn check(store: Arc<dyn Datastore>) {
    let start = store.status().await.unwrap().revision + 1;
    let req = WatchRequest::prefix("/w/", start).with_prev_kv();
    let mut slow = store.watch(req.clone()).await.unwrap();
    let mut stalled = store.watch(req.clone()).await.unwrap();
    let mut compacted = store.watch(req).await.unwrap();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..WRITES {
                let key = format!("/w/{:03}", i % 100);
                store
                    .put(PutRequest::new(key, vec![(i % 251) as u8; 512]))
                    .await
                    .unwrap();
            }
        })
    };
    let seen = read(&mut slow, WRITES, Some(Duration::from_millis(5))).await;
    contiguous(&seen, start, "the slow reader");
    writer.await.unwrap();

    let seen = read(&mut stalled, WRITES, None).await;
    contiguous(&seen, start, "the watch that read only after the writes");

    let now = store.status().await.unwrap().revision;
    store.compact(now).await.unwrap();
    let mut queued = Vec::new();
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(60), compacted.next())
            .await
            .expect("the stalled watch answers")
        {
            Some(Ok(b)) => queued.extend(b.events.iter().map(|e| e.kv.mod_revision)),
            other => break other,
        }
    };
    assert!(
        !queued.is_empty() && queued.len() < WRITES,
        "it had a queue's worth: {}",
        queued.len()
    );
    contiguous(&queued, start, "what the stalled watch had queued");
    match end {
        Some(Err(DatastoreError::Compacted {
            requested,
            compacted,
        })) => {
            assert_eq!(requested, start + queued.len() as i64, "where it stopped");
            assert_eq!(compacted, now);
        }
        other => panic!("expected the compacted error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_watches_are_bounded_and_catch_up() {
    check(Arc::new(MemoryStore::with_limits(small()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_watches_are_bounded_and_catch_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = SqliteConfig::new(dir.path().join("w.db"));
    cfg.log.limits = small();
    check(Arc::new(SqliteStore::open(cfg).await.unwrap())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_watches_are_bounded_and_catch_up() {
    let pg = PostgresServer::start(PostgresOptions::default()).unwrap();
    pg.create_database("w").await.unwrap();
    let mut cfg = PgConfig::new(pg.conninfo("w"));
    cfg.log.limits = small();
    check(Arc::new(PgStore::connect(cfg).await.unwrap())).await;
}
