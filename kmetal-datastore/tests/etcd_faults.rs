//! The etcd driver on a real 3-member cluster under faults: leader killed during CAS load,
//! quorum lost, members restarted under a running watch.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kmetal_datastore::etcd::{EtcdConfig, EtcdStore, Keyspace};
use kmetal_datastore::model::{
    Compare, CompareOp, PutRequest, RangeRequest, RequestOp, TxnRequest, WatchRequest,
};
use kmetal_datastore::{Datastore, DatastoreError};
use kmetal_testkit::{EtcdCluster, EtcdOptions};

async fn three_members() -> EtcdCluster {
    EtcdCluster::start(EtcdOptions {
        members: 3,
        ..EtcdOptions::default()
    })
    .await
    .unwrap()
}

async fn store(c: &EtcdCluster, deadline: Duration) -> EtcdStore {
    let cfg = EtcdConfig::new(c.endpoints())
        .with_request_timeout(deadline)
        .with_watch_resume_timeout(Duration::from_secs(30));
    EtcdStore::connect(cfg, Keyspace::Dedicated).await.unwrap()
}

/// Reads until the store answers (used to settle an ambiguous write).
async fn read_until_ok(s: &EtcdStore, req: RangeRequest) -> kmetal_datastore::model::RangeResponse {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        match s.range(req.clone()).await {
            Ok(r) => return r,
            Err(DatastoreError::Unavailable { .. }) if Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("read failed: {e:?}"),
        }
    }
}

/// One task's increments: CAS on the counter's mod_revision plus a per-operation record key
/// created in the same txn. An ambiguous failure (timeout, lost connection) is settled by
/// reading the record: present means applied.
async fn increment_loop(s: EtcdStore, task: usize, stop: Arc<AtomicBool>, acks: Arc<AtomicU64>) {
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let record = format!("/ops/{task}/{seq:06}");
        let current = match s.range(RangeRequest::get("/counter")).await {
            Ok(r) => r,
            Err(DatastoreError::Unavailable { .. }) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => panic!("task {task}: read failed: {e:?}"),
        };
        let kv = &current.kvs[0];
        let value: u64 = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
        let txn = TxnRequest {
            compare: vec![
                Compare::mod_revision("/counter", CompareOp::Equal, kv.mod_revision),
                Compare::version(record.clone(), CompareOp::Equal, 0),
            ],
            success: vec![
                RequestOp::Put(PutRequest::new("/counter", (value + 1).to_string())),
                RequestOp::Put(PutRequest::new(record.clone(), (value + 1).to_string())),
            ],
            failure: vec![],
        };
        match s.txn(txn).await {
            Ok(r) if r.succeeded => {
                acks.fetch_add(1, Ordering::Relaxed);
                seq += 1;
            }
            Ok(_) => {} // lost the race; read again
            Err(DatastoreError::Unavailable { .. }) => {
                let r = read_until_ok(&s, RangeRequest::get(record.clone())).await;
                if r.count == 1 {
                    acks.fetch_add(1, Ordering::Relaxed);
                    seq += 1;
                }
            }
            Err(e) => panic!("task {task}: txn failed: {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kill_during_cas_load_loses_and_repeats_nothing() {
    let mut cluster = three_members().await;
    let s = store(&cluster, Duration::from_secs(3)).await;
    s.put(PutRequest::new("/counter", "0")).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..8)
        .map(|t| tokio::spawn(increment_loop(s.clone(), t, stop.clone(), acks.clone())))
        .collect();

    tokio::time::sleep(Duration::from_secs(1)).await;
    let before_kill = acks.load(Ordering::Relaxed);
    assert!(before_kill > 0, "load is running");
    let leader = cluster.leader().await.unwrap();
    cluster.kill(leader).unwrap();
    cluster
        .wait_for_leader(Duration::from_secs(30))
        .await
        .unwrap();
    // Keep the load on until the survivors have acknowledged more work.
    let until = Instant::now() + Duration::from_secs(30);
    while acks.load(Ordering::Relaxed) < before_kill + 50 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acks.load(Ordering::Relaxed);
    assert!(acked > before_kill, "writes continue after the leader dies");

    let counter = read_until_ok(&s, RangeRequest::get("/counter")).await;
    let counter: u64 = std::str::from_utf8(&counter.kvs[0].value)
        .unwrap()
        .parse()
        .unwrap();
    let records = read_until_ok(&s, RangeRequest::prefix("/ops/")).await;
    let values: BTreeSet<u64> = records
        .kvs
        .iter()
        .map(|kv| std::str::from_utf8(&kv.value).unwrap().parse().unwrap())
        .collect();
    assert_eq!(counter, acked, "the counter equals the acknowledgements");
    assert_eq!(
        records.count as u64, acked,
        "every acknowledged write is present"
    );
    assert_eq!(
        values,
        (1..=acked).collect::<BTreeSet<_>>(),
        "each increment applied exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_loss_is_unavailable_within_the_deadline_then_recovers() {
    let mut cluster = three_members().await;
    let deadline = Duration::from_secs(2);
    let s = store(&cluster, deadline).await;
    s.put(PutRequest::new("/k", "1")).await.unwrap();
    cluster.kill(1).unwrap();
    cluster.kill(2).unwrap();
    // An outer bound several times the deadline turns a hang into a failure.
    let started = Instant::now();
    let r = tokio::time::timeout(deadline * 5, s.put(PutRequest::new("/k", "2")))
        .await
        .expect("a write without quorum must not hang");
    assert!(
        matches!(r, Err(DatastoreError::Unavailable { .. })),
        "{r:?}"
    );
    let r = tokio::time::timeout(deadline * 5, s.range(RangeRequest::get("/k")))
        .await
        .expect("a linearizable read without quorum must not hang");
    assert!(
        matches!(r, Err(DatastoreError::Unavailable { .. })),
        "{r:?}"
    );
    eprintln!(
        "two requests without quorum failed after {:?}",
        started.elapsed()
    );

    cluster.restart(1).await.unwrap();
    cluster.restart(2).await.unwrap();
    cluster
        .wait_for_leader(Duration::from_secs(30))
        .await
        .unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        match s.put(PutRequest::new("/k", "3")).await {
            Ok(_) => break,
            Err(DatastoreError::Unavailable { .. }) if Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no recovery: {e:?}"),
        }
    }
    let v = s.range(RangeRequest::get("/k")).await.unwrap();
    assert_eq!(v.kvs[0].value, "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_resumes_across_member_failures_without_gap_or_duplicate() {
    let mut cluster = three_members().await;
    let s = store(&cluster, Duration::from_secs(3)).await;
    let start = s
        .put(PutRequest::new("/w/0000", "x"))
        .await
        .unwrap()
        .revision;
    let mut watch = s
        .watch(WatchRequest::prefix("/w/", start).with_prev_kv())
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let writer = {
        let s = s.clone();
        let stop = stop.clone();
        let acked = acked.clone();
        tokio::spawn(async move {
            let mut i = 1;
            while !stop.load(Ordering::Relaxed) {
                // Each write is a new key, so the keys present afterwards are exactly the
                // writes that were applied, acknowledged or not.
                if s.put(PutRequest::new(format!("/w/{i:04}"), "x"))
                    .await
                    .is_ok()
                {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // Kill and restart every member in turn: whichever one serves the watch goes down.
    for m in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        cluster.kill(m).unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        cluster.restart(m).await.unwrap();
        cluster
            .wait_for_leader(Duration::from_secs(30))
            .await
            .unwrap();
    }
    // A loaded CI machine may spend most of the fault phase in timeouts; keep writing after
    // the faults until the watch has something substantial to prove.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::Relaxed) <= 50 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();

    let present = read_until_ok(&s, RangeRequest::prefix("/w/")).await;
    let expected: Vec<i64> = {
        let mut v: Vec<i64> = present.kvs.iter().map(|kv| kv.mod_revision).collect();
        v.sort_unstable();
        v
    };
    let mut seen = Vec::new();
    while seen.len() < expected.len() {
        let batch = tokio::time::timeout(Duration::from_secs(30), watch.next())
            .await
            .expect("the watch keeps delivering after the faults")
            .expect("the watch is open")
            .expect("the watch resumed instead of failing");
        seen.extend(batch.events.iter().map(|e| e.kv.mod_revision));
    }
    assert_eq!(
        seen, expected,
        "every applied write once, in revision order"
    );
    assert!(
        expected.len() > 50,
        "the writer made progress: {}",
        expected.len()
    );
}
