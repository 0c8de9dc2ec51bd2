//! The conformance suite on the memory reference driver, plus lease expiry on a paused clock.

use std::sync::Arc;
use std::time::Duration;

use kmetal_datastore::model::{EventKind, PutRequest, RangeRequest, WatchRequest};
use kmetal_datastore::{Datastore, DatastoreError, MemoryStore};

#[tokio::test]
async fn memory_driver_conforms() {
    kmetal_testkit::conformance::run("memory", || async {
        Arc::new(MemoryStore::new().with_progress_interval(Duration::from_secs(1)))
            as Arc<dyn Datastore>
    })
    .await;
}

#[tokio::test]
async fn memory_quota_is_enforced() {
    let quota = 8 * 1024 * 1024;
    let store = MemoryStore::with_limits(kmetal_datastore::model::Limits {
        quota_backend_bytes: quota,
        ..Default::default()
    });
    kmetal_testkit::conformance::quota_exceeded(&store, quota).await;
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
}
