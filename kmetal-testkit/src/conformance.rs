//! The datastore conformance suite: etcd's semantics, written once against `dyn Datastore` and
//! run against every driver (memory, etcd dedicated, etcd shared with auth, and the SQL drivers
//! as they land).
//!
//! Each check gets a fresh, empty store from the caller's factory and panics with the check's
//! name and the driver's name on the first divergence.
//!
//! ```no_run
//! # async fn demo() {
//! use std::sync::Arc;
//! use kmetal_datastore::{Datastore, MemoryStore};
//! kmetal_testkit::conformance::run("memory", || async {
//!     let store = MemoryStore::new().with_progress_interval(std::time::Duration::from_secs(1));
//!     Arc::new(store) as Arc<dyn Datastore>
//! })
//! .await;
//! # }
//! ```

// Test code: a failed expectation is a panic with context.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kmetal_datastore::model::{
    Compare, CompareOp, DeleteRangeRequest, EventKind, KeyRange, PutRequest, RangeRequest,
    RequestOp, ResponseOp, TxnRequest, WatchBatch, WatchRequest, prefix_end,
};
use kmetal_datastore::{Datastore, DatastoreError, WatchStream};

/// A check of the suite.
type Check = for<'a> fn(&'a dyn Datastore) -> std::pin::Pin<Box<dyn Future<Output = ()> + 'a>>;

macro_rules! checks {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), |s| Box::pin($name(s)))),*]
    };
}

/// Every check, by name.
const CHECKS: &[(&str, Check)] = checks![
    kube_apiserver_shapes,
    concurrent_guarded_writes,
    paginated_list_and_count,
    ranges_and_options,
    revisions_and_compaction,
    kube_apiserver_compaction,
    compares_on_every_target,
    failed_txn_leaves_no_trace,
    nested_txn,
    watch_replay_and_resume,
    watch_filters_and_live_events,
    watch_progress_notify,
    leases,
    lease_expiry,
    limits,
    tenant_prefixes_do_not_leak,
];

/// Runs every check against stores made by `fresh`, which must return an empty store each time,
/// configured to send watch progress notifications after at most 2 s of idleness (etcd:
/// `--experimental-watch-progress-notify-interval`; memory: `with_progress_interval`).
pub async fn run<F, Fut>(driver: &str, mut fresh: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Arc<dyn Datastore>>,
{
    for (name, check) in CHECKS {
        let store = fresh().await;
        eprintln!("conformance[{driver}]: {name}");
        let outcome = tokio::time::timeout(Duration::from_secs(60), check(store.as_ref())).await;
        assert!(
            outcome.is_ok(),
            "conformance[{driver}]: {name} did not finish in 60 s"
        );
    }
}

/// A store whose space quota is `quota` bytes refuses writes with `QuotaExceeded` once full,
/// and still serves reads (run separately: it needs a store built with a small quota).
pub async fn quota_exceeded(s: &dyn Datastore, quota: u64) {
    let value = vec![b'q'; 512 * 1024];
    let most = quota / value.len() as u64 * 4 + 16;
    let mut written = 0;
    for i in 0..most {
        match s
            .put(PutRequest::new(format!("/q/{i:06}"), value.clone()))
            .await
        {
            Ok(_) => written += 1,
            Err(DatastoreError::QuotaExceeded { quota: q, .. }) => {
                assert_eq!(q, quota, "the error names the quota");
                assert!(written > 0, "the first writes fit");
                let r = s
                    .range(RangeRequest::prefix("/q/").count_only())
                    .await
                    .unwrap();
                assert_eq!(r.count, written, "reads still work; nothing half-written");
                return;
            }
            Err(e) => panic!("expected QuotaExceeded, got {e:?}"),
        }
    }
    panic!("{written} writes of 512 KiB never exceeded a {quota}-byte quota");
}

/// A store configured to compact automatically keeping the last `keep` revisions does so
/// within 10 s of 30 writes, and reads below the compaction fail (run separately: it needs a
/// store built with automatic compaction).
pub async fn automatic_compaction(s: &dyn Datastore, keep: i64) {
    let first = s.put(PutRequest::new("/k", "0")).await.unwrap().revision;
    for i in 1..30 {
        s.put(PutRequest::new("/k", i.to_string())).await.unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let st = s.status().await.unwrap();
        if st.compact_revision >= st.revision - keep {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no automatic compaction: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(matches!(
        s.range(RangeRequest::get("/k").at_revision(first)).await,
        Err(DatastoreError::Compacted { .. })
    ));
    assert_eq!(
        s.range(RangeRequest::get("/k")).await.unwrap().kvs[0].value,
        "29"
    );
}

/// The names of the checks [`run`] runs.
pub fn check_names() -> Vec<&'static str> {
    CHECKS.iter().map(|(n, _)| *n).collect()
}

/// kube-apiserver's create: `If mod_revision(k) = 0 Then Put(k, v)`.
pub fn create(key: &str, value: &str) -> TxnRequest {
    TxnRequest {
        compare: vec![Compare::mod_revision(key.to_string(), CompareOp::Equal, 0)],
        success: vec![RequestOp::Put(PutRequest::new(
            key.to_string(),
            value.to_string(),
        ))],
        failure: vec![],
    }
}

/// kube-apiserver's update: `If mod_revision(k) = R Then Put Else Get`.
pub fn update(key: &str, rev: i64, value: &str) -> TxnRequest {
    TxnRequest {
        compare: vec![Compare::mod_revision(
            key.to_string(),
            CompareOp::Equal,
            rev,
        )],
        success: vec![RequestOp::Put(PutRequest::new(
            key.to_string(),
            value.to_string(),
        ))],
        failure: vec![RequestOp::Range(RangeRequest::get(key.to_string()))],
    }
}

/// The next batch, or a panic after 10 s.
pub async fn next_batch(w: &mut WatchStream) -> WatchBatch {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("a watch batch within 10 s")
        .expect("the watch is still open")
        .expect("the watch batch is not an error")
}

/// Collects at least `n` events.
pub async fn next_events(w: &mut WatchStream, n: usize) -> Vec<kmetal_datastore::model::Event> {
    let mut events = Vec::new();
    while events.len() < n {
        events.extend(next_batch(w).await.events);
    }
    events
}

/// Runs `futures` concurrently (on this task: the store's own queues batch them), answers in
/// their order.
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    use std::task::Poll;
    let mut futures: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futures.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *o = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.unwrap()).collect()
}

/// kube-apiserver's creates and updates arriving together, as a busy apiserver sends them:
/// per key exactly one racing create and one racing update win, each loser's get answers the
/// winner's row, a create on a missing lease fails alone, and the winners' revisions are
/// one each, gapless.
async fn concurrent_guarded_writes(s: &dyn Datastore) {
    let start = s.status().await.unwrap().revision;
    let mut live = s
        .watch(WatchRequest::prefix("/registry/cm/race/", 0).with_prev_kv())
        .await
        .unwrap();
    let lease = s.lease_grant(60, 0).await.unwrap().id;
    let keys: Vec<String> = (0..16)
        .map(|i| format!("/registry/cm/race/{i:02}"))
        .collect();
    let mut creates = Vec::new();
    for attempt in 0..4 {
        for key in &keys {
            let mut t = update(key, 0, &format!("{attempt}"));
            if let RequestOp::Put(p) = &mut t.success[0] {
                p.lease = lease;
            }
            creates.push(s.txn(t));
        }
    }
    let mut orphan = create("/registry/cm/race/orphan", "x");
    if let RequestOp::Put(p) = &mut orphan.success[0] {
        p.lease = lease + 1_000_000;
    }
    creates.push(s.txn(orphan));
    let answers = join_all(creates).await;
    let (orphan, answers) = answers.split_last().unwrap();
    assert!(
        matches!(orphan, Err(DatastoreError::LeaseNotFound { .. })),
        "a create on a missing lease fails: {orphan:?}"
    );
    let mut revisions = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let mine: Vec<_> = answers
            .iter()
            .skip(i)
            .step_by(keys.len())
            .map(|a| a.as_ref().unwrap())
            .collect();
        let won: Vec<_> = mine.iter().filter(|a| a.succeeded).collect();
        assert_eq!(won.len(), 1, "one create of {key} wins");
        let rev = won[0].revision;
        revisions.push(rev);
        for lost in mine.iter().filter(|a| !a.succeeded) {
            let ResponseOp::Range(current) = &lost.responses[0] else {
                panic!("a lost create's get answers")
            };
            assert_eq!(current.kvs.len(), 1, "{key}: the winner's row");
            assert_eq!(current.kvs[0].mod_revision, rev);
            assert_eq!(current.kvs[0].lease, lease);
        }
    }
    // The updates race at the winners' revisions.
    let updates: Vec<_> = (0..3)
        .flat_map(|n| {
            keys.iter()
                .zip(&revisions)
                .map(move |(k, r)| s.txn(update(k, *r, &format!("u{n}"))))
        })
        .collect();
    let answers = join_all(updates).await;
    for (i, key) in keys.iter().enumerate() {
        let won = answers
            .iter()
            .skip(i)
            .step_by(keys.len())
            .filter(|a| a.as_ref().unwrap().succeeded)
            .count();
        assert_eq!(won, 1, "one update of {key} wins");
    }
    revisions.extend(
        answers
            .iter()
            .map(|a| a.as_ref().unwrap())
            .filter(|a| a.succeeded)
            .map(|a| a.revision),
    );
    revisions.sort_unstable();
    let first = revisions[0];
    assert!(first > start);
    let expected: Vec<i64> = (first..first + revisions.len() as i64).collect();
    assert_eq!(
        revisions, expected,
        "one revision per winning write, gapless"
    );
    let all = s
        .range(RangeRequest::prefix("/registry/cm/race/"))
        .await
        .unwrap();
    assert_eq!(all.count, 16, "nothing else was written");
    assert!(all.kvs.iter().all(|kv| kv.version == 2));
    // What a live watch was sent is what a replay reads back from the store.
    let delivered = next_events(&mut live, revisions.len()).await;
    let mut replay = s
        .watch(WatchRequest::prefix("/registry/cm/race/", start + 1).with_prev_kv())
        .await
        .unwrap();
    let replayed = next_events(&mut replay, revisions.len()).await;
    assert_eq!(delivered, replayed, "live events equal their replay");
    assert!(delivered.iter().filter(|e| e.prev_kv.is_some()).count() == keys.len());
}

async fn kube_apiserver_shapes(s: &dyn Datastore) {
    let key = "/registry/pods/default/a";
    let r = s.txn(create(key, "v1")).await.unwrap();
    assert!(r.succeeded);
    let rev = r.revision;
    let again = s.txn(create(key, "v2")).await.unwrap();
    assert!(!again.succeeded, "a second create fails its guard");
    assert_eq!(
        again.revision, rev,
        "a failed guard does not bump the revision"
    );

    let upd = s.txn(update(key, rev, "v2")).await.unwrap();
    assert!(upd.succeeded);
    let stale = s.txn(update(key, rev, "v3")).await.unwrap();
    assert!(!stale.succeeded);
    let ResponseOp::Range(current) = &stale.responses[0] else {
        panic!("the failure branch's get answers")
    };
    assert_eq!(current.kvs[0].value, "v2");
    assert_eq!(current.kvs[0].version, 2);
    assert_eq!(current.kvs[0].create_revision, rev);
    assert_eq!(current.kvs[0].mod_revision, upd.revision);

    // get: Range(key, limit 1).
    let got = s.range(RangeRequest::get(key).with_limit(1)).await.unwrap();
    assert_eq!((got.count, got.more), (1, false));

    let del = TxnRequest {
        compare: vec![Compare::mod_revision(key, CompareOp::Equal, upd.revision)],
        success: vec![RequestOp::DeleteRange(DeleteRangeRequest::key(key))],
        failure: vec![RequestOp::Range(RangeRequest::get(key))],
    };
    let d = s.txn(del).await.unwrap();
    assert!(d.succeeded);
    let ResponseOp::DeleteRange(dr) = &d.responses[0] else {
        panic!("delete response expected")
    };
    assert_eq!(dr.deleted, 1);
    assert!(
        s.range(RangeRequest::get(key))
            .await
            .unwrap()
            .kvs
            .is_empty()
    );
    // Re-creating after a delete starts a new generation.
    let again = s.txn(create(key, "v4")).await.unwrap();
    assert!(again.succeeded);
    let kv = s.range(RangeRequest::get(key)).await.unwrap().kvs[0].clone();
    assert_eq!((kv.version, kv.create_revision), (1, again.revision));
}

async fn paginated_list_and_count(s: &dyn Datastore) {
    for i in 0..25 {
        s.put(PutRequest::new(format!("/registry/cm/ns/{i:03}"), "x"))
            .await
            .unwrap();
    }
    s.put(PutRequest::new("/registry/cmx", "outside"))
        .await
        .unwrap();
    let rev = s
        .range(RangeRequest::get("/registry/cmx"))
        .await
        .unwrap()
        .revision;
    // A write after the list started must not show up in later pages read at `rev`.
    s.put(PutRequest::new("/registry/cm/ns/000a", "late"))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut start: Bytes = Bytes::from_static(b"/registry/cm/");
    let end = Bytes::from(prefix_end(b"/registry/cm/"));
    loop {
        let page = s
            .range(
                RangeRequest::between(start.clone(), end.clone())
                    .with_limit(10)
                    .at_revision(rev),
            )
            .await
            .unwrap();
        assert_eq!(
            page.count as usize,
            25 - seen.len(),
            "each page counts the keys from its start on"
        );
        seen.extend(page.kvs.iter().map(|kv| kv.key.clone()));
        if !page.more {
            break;
        }
        let mut next = page.kvs.last().unwrap().key.to_vec();
        next.push(0);
        start = next.into();
    }
    assert_eq!(seen.len(), 25);
    assert!(seen.windows(2).all(|w| w[0] < w[1]));
    let count = s
        .range(RangeRequest::prefix("/registry/cm/").count_only())
        .await
        .unwrap();
    assert_eq!((count.count, count.kvs.len()), (26, 0));
    let keys = s
        .range(
            RangeRequest::prefix("/registry/cm/")
                .keys_only()
                .with_limit(1),
        )
        .await
        .unwrap();
    assert!(keys.kvs[0].value.is_empty() && keys.more && keys.count == 26);
}

async fn ranges_and_options(s: &dyn Datastore) {
    for k in ["a", "b", "c", "d"] {
        s.put(PutRequest::new(k, k)).await.unwrap();
    }
    let from_b = s
        .range(RangeRequest::between("b", vec![0u8]))
        .await
        .unwrap();
    assert_eq!(
        from_b.count, 3,
        "a [0] range end means every key from `key`"
    );
    let b_to_d = s.range(RangeRequest::between("b", "d")).await.unwrap();
    assert_eq!(
        b_to_d.kvs.iter().map(|k| k.key.clone()).collect::<Vec<_>>(),
        ["b", "c"]
    );
    let all = s.range(RangeRequest::prefix("")).await.unwrap();
    assert_eq!(all.count, 4);
    let prev = s
        .put(PutRequest::new("a", "a2").with_prev_kv())
        .await
        .unwrap();
    assert_eq!(prev.prev_kv.unwrap().value, "a");
    let fresh = s
        .put(PutRequest::new("new", "x").with_prev_kv())
        .await
        .unwrap();
    assert!(fresh.prev_kv.is_none());
    let d = s
        .delete_range(DeleteRangeRequest {
            range: KeyRange::between("b", "d"),
            prev_kv: true,
        })
        .await
        .unwrap();
    assert_eq!(d.deleted, 2);
    assert_eq!(d.prev_kvs.len(), 2);
    assert_eq!(d.prev_kvs[0].key, "b");
    let none = s
        .delete_range(DeleteRangeRequest::key("missing"))
        .await
        .unwrap();
    assert_eq!(none.deleted, 0);
    assert_eq!(none.revision, d.revision, "deleting nothing writes nothing");
}

async fn revisions_and_compaction(s: &dyn Datastore) {
    let r1 = s.put(PutRequest::new("k", "1")).await.unwrap().revision;
    let r2 = s.put(PutRequest::new("k", "2")).await.unwrap().revision;
    assert_eq!(r2, r1 + 1, "one revision per write");
    let old = s
        .range(RangeRequest::get("k").at_revision(r1))
        .await
        .unwrap();
    assert_eq!(old.kvs[0].value, "1");
    assert_eq!(old.revision, r2, "reads report the current revision");
    assert!(matches!(
        s.range(RangeRequest::get("k").at_revision(r2 + 100)).await,
        Err(DatastoreError::FutureRevision { requested, .. }) if requested == r2 + 100
    ));
    s.compact(r2).await.unwrap();
    let err = s.range(RangeRequest::get("k").at_revision(r1)).await;
    assert!(
        matches!(err, Err(DatastoreError::Compacted { requested, compacted }) if requested == r1 && compacted == r2),
        "{err:?}"
    );
    assert_eq!(
        s.range(RangeRequest::get("k").at_revision(r2))
            .await
            .unwrap()
            .kvs[0]
            .value,
        "2"
    );
    assert!(matches!(
        s.compact(r2).await,
        Err(DatastoreError::Compacted { .. })
    ));
    assert!(matches!(
        s.watch(WatchRequest::key("k", r1)).await,
        Err(DatastoreError::Compacted { .. })
    ));
    assert_eq!(s.status().await.unwrap().compact_revision, r2);
}

/// kube-apiserver's compactor: a txn on the version of `compact_rev_key`, then Compact.
async fn kube_apiserver_compaction(s: &dyn Datastore) {
    let key = "compact_rev_key";
    let cur = s
        .put(PutRequest::new("/registry/x", "1"))
        .await
        .unwrap()
        .revision;
    let txn = |version: i64, rev: i64| TxnRequest {
        compare: vec![Compare::version(key, CompareOp::Equal, version)],
        success: vec![RequestOp::Put(PutRequest::new(key, rev.to_string()))],
        failure: vec![RequestOp::Range(RangeRequest::get(key))],
    };
    let r = s.txn(txn(0, cur)).await.unwrap();
    assert!(r.succeeded);
    s.compact(cur).await.unwrap();
    // A second api-server that lost the race sees the winner's version.
    let lost = s.txn(txn(0, cur)).await.unwrap();
    assert!(!lost.succeeded);
    let ResponseOp::Range(g) = &lost.responses[0] else {
        panic!("range expected")
    };
    assert_eq!(g.kvs[0].version, 1);
}

async fn compares_on_every_target(s: &dyn Datastore) {
    let l = s.lease_grant(60, 0).await.unwrap().id;
    let r = s
        .put(PutRequest::new("c/1", "m").with_lease(l))
        .await
        .unwrap()
        .revision;
    s.put(PutRequest::new("c/2", "m")).await.unwrap();
    let passes = |c: Compare| async move {
        s.txn(TxnRequest {
            compare: vec![c],
            ..TxnRequest::default()
        })
        .await
        .unwrap()
        .succeeded
    };
    assert!(passes(Compare::version("c/1", CompareOp::Equal, 1)).await);
    assert!(passes(Compare::create_revision("c/1", CompareOp::Equal, r)).await);
    assert!(passes(Compare::mod_revision("c/1", CompareOp::Less, r + 1)).await);
    assert!(passes(Compare::value("c/1", CompareOp::Equal, "m")).await);
    assert!(passes(Compare::value("c/1", CompareOp::Greater, "a")).await);
    assert!(passes(Compare::lease("c/1", CompareOp::Equal, l)).await);
    assert!(passes(Compare::lease("c/2", CompareOp::Equal, 0)).await);
    assert!(passes(Compare::version("c/1", CompareOp::NotEqual, 7)).await);
    assert!(!passes(Compare::value("missing", CompareOp::Equal, "")).await);
    assert!(passes(Compare::version("missing", CompareOp::Equal, 0)).await);
    // A compare over a range holds only if every key in it passes.
    let over = |op, v: &str| Compare {
        range: KeyRange::prefix("c/"),
        op,
        target: kmetal_datastore::model::CompareTarget::Value(Bytes::from(v.to_string())),
    };
    assert!(passes(over(CompareOp::Equal, "m")).await);
    s.put(PutRequest::new("c/3", "z")).await.unwrap();
    assert!(!passes(over(CompareOp::Equal, "m")).await);
}

async fn failed_txn_leaves_no_trace(s: &dyn Datastore) {
    let before = s
        .put(PutRequest::new("t/base", "0"))
        .await
        .unwrap()
        .revision;
    let txn = TxnRequest {
        compare: vec![],
        success: vec![
            RequestOp::Put(PutRequest::new("t/a", "1")),
            RequestOp::Put(PutRequest::new("t/b", "1").with_lease(424242)),
        ],
        failure: vec![],
    };
    assert!(matches!(
        s.txn(txn).await,
        Err(DatastoreError::LeaseNotFound { .. })
    ));
    let after = s.range(RangeRequest::get("t/a")).await.unwrap();
    assert_eq!(after.revision, before, "a failed txn writes nothing");
    assert!(after.kvs.is_empty());
    let ok = TxnRequest {
        success: vec![
            RequestOp::Put(PutRequest::new("t/a", "1")),
            RequestOp::Put(PutRequest::new("t/b", "1")),
            RequestOp::Range(RangeRequest::prefix("t/")),
        ],
        ..TxnRequest::default()
    };
    let r = s.txn(ok).await.unwrap();
    assert_eq!(r.revision, before + 1, "a txn is one revision");
    let ResponseOp::Range(read) = &r.responses[2] else {
        panic!("range expected")
    };
    assert_eq!(read.count, 3, "reads inside a txn see its own writes");
}

async fn nested_txn(s: &dyn Datastore) {
    s.put(PutRequest::new("n/a", "1")).await.unwrap();
    let inner = TxnRequest {
        compare: vec![Compare::value("n/a", CompareOp::Equal, "1")],
        success: vec![RequestOp::Put(PutRequest::new("n/b", "inner"))],
        failure: vec![],
    };
    let outer = TxnRequest {
        compare: vec![],
        success: vec![RequestOp::Txn(inner)],
        failure: vec![],
    };
    let r = s.txn(outer).await.unwrap();
    let ResponseOp::Txn(t) = &r.responses[0] else {
        panic!("nested txn response expected")
    };
    assert!(t.succeeded);
    assert_eq!(s.range(RangeRequest::get("n/b")).await.unwrap().count, 1);
}

async fn watch_replay_and_resume(s: &dyn Datastore) {
    let start = s.put(PutRequest::new("/w/a", "1")).await.unwrap().revision;
    s.put(PutRequest::new("/w/a", "2")).await.unwrap();
    s.put(PutRequest::new("/wx", "not mine")).await.unwrap();
    s.delete_range(DeleteRangeRequest::key("/w/a"))
        .await
        .unwrap();
    let mut w = s
        .watch(WatchRequest::prefix("/w/", start).with_prev_kv())
        .await
        .unwrap();
    let events = next_events(&mut w, 3).await;
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(events[0].kind, EventKind::Put);
    assert_eq!(events[1].prev_kv.as_ref().unwrap().value, "1");
    assert_eq!(events[2].kind, EventKind::Delete);
    assert_eq!(events[2].kv.key, "/w/a");
    assert_eq!(events[2].prev_kv.as_ref().unwrap().value, "2");
    let last = events[2].kv.mod_revision;
    drop(w);
    // Writes while "disconnected", then resume from last + 1: nothing lost, nothing repeated.
    for i in 0..5 {
        s.put(PutRequest::new(format!("/w/{i}"), "x"))
            .await
            .unwrap();
    }
    let mut w = s
        .watch(WatchRequest::prefix("/w/", last + 1).with_prev_kv())
        .await
        .unwrap();
    s.put(PutRequest::new("/w/live", "y")).await.unwrap();
    let revs: Vec<i64> = next_events(&mut w, 6)
        .await
        .iter()
        .map(|e| e.kv.mod_revision)
        .collect();
    assert_eq!(revs.len(), 6, "{revs:?}");
    assert!(revs.windows(2).all(|p| p[0] < p[1]), "{revs:?}");
    assert_eq!(revs[0], last + 1);
}

async fn watch_filters_and_live_events(s: &dyn Datastore) {
    let mut puts_only = s
        .watch(WatchRequest {
            no_delete: true,
            ..WatchRequest::prefix("/f/", 0)
        })
        .await
        .unwrap();
    let mut deletes_only = s
        .watch(WatchRequest {
            no_put: true,
            ..WatchRequest::key("/f/x", 0)
        })
        .await
        .unwrap();
    // A txn writing two keys arrives as one revision.
    let t = s
        .txn(TxnRequest {
            success: vec![
                RequestOp::Put(PutRequest::new("/f/x", "1")),
                RequestOp::Put(PutRequest::new("/f/y", "1")),
            ],
            ..TxnRequest::default()
        })
        .await
        .unwrap();
    s.delete_range(DeleteRangeRequest::prefix("/f/"))
        .await
        .unwrap();
    s.put(PutRequest::new("/f/z", "2")).await.unwrap();
    let puts = next_events(&mut puts_only, 3).await;
    assert!(puts.iter().all(|e| e.kind == EventKind::Put), "{puts:?}");
    assert_eq!(puts[0].kv.mod_revision, t.revision);
    assert_eq!(puts[1].kv.mod_revision, t.revision);
    let dels = next_events(&mut deletes_only, 1).await;
    assert_eq!(dels.len(), 1);
    assert_eq!(
        (dels[0].kind, dels[0].kv.key.as_ref()),
        (EventKind::Delete, &b"/f/x"[..])
    );
}

/// An idle watch that asked for progress learns the current revision from empty batches.
async fn watch_progress_notify(s: &dyn Datastore) {
    let mut w = s
        .watch(WatchRequest {
            progress_notify: true,
            ..WatchRequest::prefix("/p/", 0)
        })
        .await
        .unwrap();
    let elsewhere = s
        .put(PutRequest::new("/elsewhere", "x"))
        .await
        .unwrap()
        .revision;
    let batch = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let b = next_batch(&mut w).await;
            assert!(b.events.is_empty(), "nothing under /p/ changed: {b:?}");
            if b.revision >= elsewhere {
                return b;
            }
        }
    })
    .await
    .expect("a progress notification within 10 s");
    assert!(batch.revision >= elsewhere);
}

async fn leases(s: &dyn Datastore) {
    let l = s.lease_grant(60, 0).await.unwrap();
    assert!(l.id != 0 && l.ttl >= 60);
    s.put(PutRequest::new("/l/a", "v").with_lease(l.id))
        .await
        .unwrap();
    let info = s.lease_time_to_live(l.id, true).await.unwrap();
    assert_eq!(info.granted_ttl, l.ttl);
    assert_eq!(info.keys, vec![Bytes::from_static(b"/l/a")]);
    assert!(s.lease_keep_alive(l.id).await.unwrap() >= 60);
    assert!(s.leases().await.unwrap().contains(&l.id));
    let rev = s.lease_revoke(l.id).await.unwrap();
    let after = s.range(RangeRequest::get("/l/a")).await.unwrap();
    assert_eq!(
        (after.count, after.revision),
        (0, rev),
        "revoking deletes the keys"
    );
    assert!(matches!(
        s.lease_time_to_live(l.id, false).await,
        Err(DatastoreError::LeaseNotFound { .. })
    ));
    assert!(matches!(
        s.lease_revoke(l.id).await,
        Err(DatastoreError::LeaseNotFound { .. })
    ));
    // An id next to one the store granted: a tenant of a shared etcd may choose only ids
    // of its own (`leases.rs` in the etcd driver).
    let id = l.id ^ (1 << 20);
    let chosen = s.lease_grant(60, id).await.unwrap();
    assert_eq!(chosen.id, id);
    assert!(matches!(
        s.lease_grant(60, id).await,
        Err(DatastoreError::LeaseExists { .. })
    ));
    assert!(matches!(
        s.lease_grant(0, 0).await,
        Err(DatastoreError::InvalidTtl { .. })
    ));
    s.lease_revoke(chosen.id).await.unwrap();
}

async fn lease_expiry(s: &dyn Datastore) {
    let l = s.lease_grant(2, 0).await.unwrap();
    s.put(PutRequest::new("/e/k", "v").with_lease(l.id))
        .await
        .unwrap();
    let mut w = s.watch(WatchRequest::key("/e/k", 0)).await.unwrap();
    let events = tokio::time::timeout(Duration::from_secs(15), next_events(&mut w, 1))
        .await
        .expect("the lease expires within 15 s");
    assert_eq!(
        events[0].kind,
        EventKind::Delete,
        "expiry deletes and notifies"
    );
    assert_eq!(s.range(RangeRequest::get("/e/k")).await.unwrap().count, 0);
    let renewed = s.lease_keep_alive(l.id).await;
    assert!(
        matches!(renewed, Err(DatastoreError::LeaseNotFound { .. })),
        "{renewed:?}"
    );
}

async fn limits(s: &dyn Datastore) {
    assert!(matches!(
        s.put(PutRequest::new("big", vec![0u8; 2 * 1024 * 1024]))
            .await,
        Err(DatastoreError::RequestTooLarge { .. })
    ));
    assert!(matches!(
        s.txn(TxnRequest {
            success: vec![RequestOp::Put(PutRequest::new(
                "big",
                vec![0u8; 2 * 1024 * 1024]
            ))],
            ..TxnRequest::default()
        })
        .await,
        Err(DatastoreError::RequestTooLarge { .. })
    ));
    assert!(matches!(
        s.put(PutRequest::new("", "v")).await,
        Err(DatastoreError::EmptyKey)
    ));
    assert!(matches!(
        s.range(RangeRequest::get("")).await,
        Err(DatastoreError::EmptyKey)
    ));
    let many = TxnRequest {
        success: (0..129)
            .map(|i| RequestOp::Put(PutRequest::new(format!("m{i}"), "v")))
            .collect(),
        ..TxnRequest::default()
    };
    assert!(matches!(
        s.txn(many).await,
        Err(DatastoreError::TooManyOps { .. })
    ));
    let dup = TxnRequest {
        success: vec![
            RequestOp::Put(PutRequest::new("d", "1")),
            RequestOp::Put(PutRequest::new("d", "2")),
        ],
        ..TxnRequest::default()
    };
    assert!(matches!(
        s.txn(dup).await,
        Err(DatastoreError::DuplicateKey)
    ));
    assert!(matches!(
        s.lease_keep_alive(99999).await,
        Err(DatastoreError::LeaseNotFound { .. })
    ));
    // The largest request that fits still works.
    s.put(PutRequest::new("fits", vec![0u8; 1024 * 1024]))
        .await
        .unwrap();
}

async fn tenant_prefixes_do_not_leak(s: &dyn Datastore) {
    s.put(PutRequest::new("/a/k", "a")).await.unwrap();
    s.put(PutRequest::new("/aa/k", "aa")).await.unwrap();
    let r = s.range(RangeRequest::prefix("/a/")).await.unwrap();
    assert_eq!(r.count, 1);
    let d = s
        .delete_range(DeleteRangeRequest::prefix("/a/"))
        .await
        .unwrap();
    assert_eq!(d.deleted, 1);
    assert_eq!(s.range(RangeRequest::get("/aa/k")).await.unwrap().count, 1);
}
