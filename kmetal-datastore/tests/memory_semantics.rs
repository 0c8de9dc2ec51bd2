//! etcd semantics on the memory reference driver: kube-apiserver request shapes, watches,
//! compaction, leases, atomic txns and limits (written against `dyn Datastore` for reuse).

// The checks are shared helpers rather than #[test] fns, which clippy's test exemption misses.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use kmetal_datastore::model::{
    Compare, CompareOp, DeleteRangeRequest, EventKind, PutRequest, RangeRequest, RequestOp,
    ResponseOp, TxnRequest, WatchRequest,
};
use kmetal_datastore::{Datastore, DatastoreError, MemoryStore};

/// kube-apiserver's create: `If mod_revision(k) = 0 Then Put(k, v)`.
fn create(key: &str, value: &str) -> TxnRequest {
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
fn update(key: &str, rev: i64, value: &str) -> TxnRequest {
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

async fn kube_apiserver_shapes(s: &dyn Datastore) {
    let r = s
        .txn(create("/registry/pods/default/a", "v1"))
        .await
        .unwrap();
    assert!(r.succeeded);
    let rev = r.revision;
    // A second create of the same key fails its guard and writes nothing.
    let again = s
        .txn(create("/registry/pods/default/a", "v2"))
        .await
        .unwrap();
    assert!(!again.succeeded);
    assert_eq!(
        again.revision, rev,
        "a failed guard does not bump the revision"
    );

    let upd = s
        .txn(update("/registry/pods/default/a", rev, "v2"))
        .await
        .unwrap();
    assert!(upd.succeeded);
    let stale = s
        .txn(update("/registry/pods/default/a", rev, "v3"))
        .await
        .unwrap();
    assert!(!stale.succeeded);
    let ResponseOp::Range(current) = &stale.responses[0] else {
        panic!("get expected")
    };
    assert_eq!(current.kvs[0].value, "v2");
    assert_eq!(current.kvs[0].version, 2);
    assert_eq!(current.kvs[0].create_revision, rev);
    assert_eq!(current.kvs[0].mod_revision, upd.revision);

    let del = TxnRequest {
        compare: vec![Compare::mod_revision(
            "/registry/pods/default/a",
            CompareOp::Equal,
            upd.revision,
        )],
        success: vec![RequestOp::DeleteRange(DeleteRangeRequest::key(
            "/registry/pods/default/a",
        ))],
        failure: vec![RequestOp::Range(RangeRequest::get(
            "/registry/pods/default/a",
        ))],
    };
    let d = s.txn(del).await.unwrap();
    assert!(d.succeeded);
    let ResponseOp::DeleteRange(dr) = &d.responses[0] else {
        panic!()
    };
    assert_eq!(dr.deleted, 1);
    assert!(
        s.range(RangeRequest::get("/registry/pods/default/a"))
            .await
            .unwrap()
            .kvs
            .is_empty()
    );
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
    let rev = s.status().await.unwrap().revision;
    // A write after the list started must not show up in later pages read at `rev`.
    s.put(PutRequest::new("/registry/cm/ns/000a", "late"))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut start: Bytes = Bytes::from_static(b"/registry/cm/");
    let end = Bytes::from(kmetal_datastore::model::prefix_end(b"/registry/cm/"));
    loop {
        let page = s
            .range(
                RangeRequest::between(start.clone(), end.clone())
                    .with_limit(10)
                    .at_revision(rev),
            )
            .await
            .unwrap();
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

async fn revisions_and_compaction(s: &dyn Datastore) {
    let r1 = s.put(PutRequest::new("k", "1")).await.unwrap().revision;
    let r2 = s.put(PutRequest::new("k", "2")).await.unwrap().revision;
    let old = s
        .range(RangeRequest::get("k").at_revision(r1))
        .await
        .unwrap();
    assert_eq!(old.kvs[0].value, "1");
    assert!(matches!(
        s.range(RangeRequest::get("k").at_revision(r2 + 100)).await,
        Err(DatastoreError::FutureRevision { .. })
    ));
    s.compact(r2).await.unwrap();
    assert!(matches!(
        s.range(RangeRequest::get("k").at_revision(r1)).await,
        Err(DatastoreError::Compacted { requested, compacted }) if requested == r1 && compacted == r2
    ));
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

async fn failed_txn_leaves_no_trace(s: &dyn Datastore) {
    let before = s.status().await.unwrap().revision;
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
        Err(DatastoreError::LeaseNotFound { id: 424242 })
    ));
    assert_eq!(s.status().await.unwrap().revision, before);
    assert!(
        s.range(RangeRequest::get("t/a"))
            .await
            .unwrap()
            .kvs
            .is_empty()
    );
    // A txn that writes two keys is one revision.
    let ok = TxnRequest {
        success: vec![
            RequestOp::Put(PutRequest::new("t/a", "1")),
            RequestOp::Put(PutRequest::new("t/b", "1")),
            RequestOp::Range(RangeRequest::prefix("t/")),
        ],
        ..TxnRequest::default()
    };
    let r = s.txn(ok).await.unwrap();
    assert_eq!(r.revision, before + 1);
    let ResponseOp::Range(read) = &r.responses[2] else {
        panic!()
    };
    assert_eq!(read.count, 2, "reads inside a txn see its own writes");
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
    let mut events = Vec::new();
    while events.len() < 3 {
        let b = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        events.extend(b.events);
    }
    assert_eq!(events[0].kind, EventKind::Put);
    assert_eq!(events[1].prev_kv.as_ref().unwrap().value, "1");
    assert_eq!(events[2].kind, EventKind::Delete);
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
        .watch(WatchRequest::prefix("/w/", last + 1))
        .await
        .unwrap();
    s.put(PutRequest::new("/w/live", "y")).await.unwrap();
    let mut revs = Vec::new();
    while revs.len() < 6 {
        let b = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        revs.extend(b.events.iter().map(|e| e.kv.mod_revision));
    }
    assert!(revs.windows(2).all(|p| p[0] < p[1]), "{revs:?}");
    assert_eq!(revs[0], last + 1);
}

async fn limits(s: &dyn Datastore) {
    assert!(matches!(
        s.put(PutRequest::new("big", vec![0u8; 2 * 1024 * 1024]))
            .await,
        Err(DatastoreError::RequestTooLarge { .. })
    ));
    assert!(matches!(
        s.put(PutRequest::new("", "v")).await,
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
    assert!(matches!(
        s.lease_keep_alive(99999).await,
        Err(DatastoreError::LeaseNotFound { .. })
    ));
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

#[tokio::test]
async fn memory_driver_semantics() {
    kube_apiserver_shapes(&MemoryStore::new()).await;
    paginated_list_and_count(&MemoryStore::new()).await;
    revisions_and_compaction(&MemoryStore::new()).await;
    failed_txn_leaves_no_trace(&MemoryStore::new()).await;
    watch_replay_and_resume(&MemoryStore::new()).await;
    limits(&MemoryStore::new()).await;
    tenant_prefixes_do_not_leak(&MemoryStore::new()).await;
}

#[tokio::test(start_paused = true)]
async fn leases_expire_and_delete_their_keys() {
    let s = MemoryStore::new();
    let lease = s.lease_grant(5, 0).await.unwrap();
    s.put(PutRequest::new("/leased", "v").with_lease(lease.id))
        .await
        .unwrap();
    let mut w = s.watch(WatchRequest::key("/leased", 0)).await.unwrap();
    let info = s.lease_time_to_live(lease.id, true).await.unwrap();
    assert_eq!((info.granted_ttl, info.keys.len()), (5, 1));

    tokio::time::advance(Duration::from_secs(3)).await;
    assert_eq!(s.lease_keep_alive(lease.id).await.unwrap(), 5);
    tokio::time::advance(Duration::from_secs(3)).await;
    assert_eq!(
        s.range(RangeRequest::get("/leased")).await.unwrap().count,
        1,
        "kept alive"
    );

    tokio::time::advance(Duration::from_secs(6)).await;
    let b = w.next().await.unwrap().unwrap();
    assert_eq!(
        b.events[0].kind,
        EventKind::Delete,
        "expiry deletes and notifies"
    );
    assert_eq!(
        s.range(RangeRequest::get("/leased")).await.unwrap().count,
        0
    );
    assert!(matches!(
        s.lease_time_to_live(lease.id, false).await,
        Err(DatastoreError::LeaseNotFound { .. })
    ));
    assert!(s.leases().await.unwrap().is_empty());

    let l2 = s.lease_grant(60, 77).await.unwrap();
    assert_eq!(l2.id, 77);
    assert!(matches!(
        s.lease_grant(60, 77).await,
        Err(DatastoreError::LeaseExists { id: 77 })
    ));
    s.put(PutRequest::new("/x", "1").with_lease(77))
        .await
        .unwrap();
    let rev = s.lease_revoke(77).await.unwrap();
    assert_eq!(s.range(RangeRequest::get("/x")).await.unwrap().count, 0);
    assert_eq!(s.status().await.unwrap().revision, rev);
}
