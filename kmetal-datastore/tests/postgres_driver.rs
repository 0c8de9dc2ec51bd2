//! The PostgreSQL revision log on a real PostgreSQL 15: the conformance suite (a fresh
//! database per check) and the quota-free limits.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kmetal_datastore::Datastore;
use kmetal_datastore::postgres::{PgConfig, PgStore};
use kmetal_testkit::{PostgresOptions, PostgresServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_driver_conforms() {
    let pg = PostgresServer::start(PostgresOptions {
        fsync: false,
        ..PostgresOptions::default()
    })
    .unwrap();
    let n = AtomicUsize::new(0);
    let pg = &pg;
    kmetal_testkit::conformance::run("postgres", || {
        let name = format!("conf{}", n.fetch_add(1, Ordering::Relaxed));
        async move {
            pg.create_database(&name).await.unwrap();
            let mut cfg =
                PgConfig::new(pg.conninfo(&name)).with_progress_interval(Duration::from_secs(1));
            cfg.log.request_timeout = Duration::from_secs(10);
            Arc::new(PgStore::connect(cfg).await.unwrap()) as Arc<dyn Datastore>
        }
    })
    .await;
}

/// Two stores on one database (as two processes would be), 16 concurrent writers across
/// them, a watcher on each: both see every revision exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_on_two_stores_see_every_revision_once() {
    use kmetal_datastore::model::{PutRequest, WatchRequest};
    let pg = PostgresServer::start(PostgresOptions {
        fsync: false,
        ..PostgresOptions::default()
    })
    .unwrap();
    pg.create_database("shared").await.unwrap();
    let a = PgStore::connect(PgConfig::new(pg.conninfo("shared")))
        .await
        .unwrap();
    let b = PgStore::connect(PgConfig::new(pg.conninfo("shared")))
        .await
        .unwrap();
    let start = a.status().await.unwrap().revision + 1;
    let mut wa = a.watch(WatchRequest::prefix("/w/", start)).await.unwrap();
    let mut wb = b.watch(WatchRequest::prefix("/w/", start)).await.unwrap();
    const WRITERS: usize = 16;
    const EACH: usize = 40;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let s = if w % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                s.put(PutRequest::new(format!("/w/{w}/{i}"), "x"))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = WRITERS * EACH;
    for (name, w) in [("a", &mut wa), ("b", &mut wb)] {
        let mut revs = Vec::new();
        while revs.len() < total {
            let batch = tokio::time::timeout(Duration::from_secs(10), w.next())
                .await
                .unwrap_or_else(|_| panic!("watcher {name} stalled at {} of {total}", revs.len()))
                .unwrap()
                .unwrap();
            revs.extend(batch.events.iter().map(|e| e.kv.mod_revision));
        }
        let expected: Vec<i64> = (start..start + total as i64).collect();
        assert_eq!(
            revs, expected,
            "watcher {name}: every revision once, in order, no gap"
        );
    }
}

/// `pg_ctl restart` under write load and a watch: the pool and the watch recover by
/// themselves, every acknowledged write is present, and the watch has no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_mid_load_loses_nothing() {
    use kmetal_datastore::DatastoreError;
    use kmetal_datastore::model::{PutRequest, RangeRequest, WatchRequest};
    let mut pg = PostgresServer::start(PostgresOptions::default()).unwrap();
    pg.create_database("faults").await.unwrap();
    let mut cfg = PgConfig::new(pg.conninfo("faults"));
    cfg.log.request_timeout = Duration::from_secs(3);
    let s = PgStore::connect(cfg).await.unwrap();
    let start = s.status().await.unwrap().revision + 1;
    let mut w = s.watch(WatchRequest::prefix("/f/", start)).await.unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (s, stop, acked) = (s.clone(), stop.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("/f/{t}/{i:05}");
                match s.put(PutRequest::new(key.clone(), "x")).await {
                    Ok(_) => acked.lock().unwrap().push(key),
                    Err(DatastoreError::Unavailable { .. }) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => panic!("unexpected error {e:?}"),
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    pg.restart().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = acked.lock().unwrap().len();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > before, "writes resumed after the restart");
    let present = s.range(RangeRequest::prefix("/f/")).await.unwrap();
    let keys: std::collections::HashSet<Vec<u8>> =
        present.kvs.iter().map(|kv| kv.key.to_vec()).collect();
    for k in &acked {
        assert!(
            keys.contains(k.as_bytes()),
            "acknowledged write {k} is present"
        );
    }
    // The watch saw every present key once, in revision order, across the restart.
    let mut seen = Vec::new();
    while seen.len() < present.kvs.len() {
        let b = tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .expect("the watch resumes after the restart")
            .unwrap()
            .unwrap();
        seen.extend(b.events.iter().map(|e| e.kv.mod_revision));
    }
    let mut expected: Vec<i64> = present.kvs.iter().map(|kv| kv.mod_revision).collect();
    expected.sort_unstable();
    assert_eq!(seen, expected);
}

/// Per-tenant databases and roles: a tenant's role works on its own database only;
/// provisioning is idempotent (the last password wins); deprovisioning drops both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioned_tenants_are_isolated() {
    use kmetal_datastore::DatastoreError;
    use kmetal_datastore::model::{PutRequest, RangeRequest};
    use kmetal_datastore::postgres::PgProvisioner;
    use kmetal_datastore::provision::{Provisioner, TenantSlice, generate_password};
    let pg = PostgresServer::start(PostgresOptions {
        fsync: false,
        ..PostgresOptions::default()
    })
    .unwrap();
    let p = PgProvisioner::new(pg.conninfo("postgres"));
    let a_slice = TenantSlice::with_password("tenant_a", "role_a", generate_password());
    let b_slice = TenantSlice::with_password("tenant_b", "role_b", generate_password());
    let a = p.provision(&a_slice).await.unwrap();
    let b = p.provision(&b_slice).await.unwrap();
    let store_a = PgStore::connect(PgConfig::new(a.conninfo())).await.unwrap();
    store_a.put(PutRequest::new("/k", "a")).await.unwrap();
    let store_b = PgStore::connect(PgConfig::new(b.conninfo())).await.unwrap();
    assert_eq!(
        store_b.range(RangeRequest::get("/k")).await.unwrap().count,
        0
    );

    // A's role on B's database.
    let mut cross = a.clone();
    cross.database = b.database.clone();
    let err = PgStore::connect(PgConfig::new(cross.conninfo()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, DatastoreError::PermissionDenied { .. }),
        "{err:?}"
    );

    // Re-provisioning sets the new password; the old one stops working.
    let again = TenantSlice::with_password("tenant_a", "role_a", generate_password());
    let a2 = p.provision(&again).await.unwrap();
    let err = PgStore::connect(PgConfig::new(a.conninfo()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, DatastoreError::PermissionDenied { .. }),
        "{err:?}"
    );
    let store_a2 = PgStore::connect(PgConfig::new(a2.conninfo()))
        .await
        .unwrap();
    assert_eq!(
        store_a2.range(RangeRequest::get("/k")).await.unwrap().count,
        1,
        "data kept"
    );
    drop((store_a, store_a2));

    p.deprovision(&again).await.unwrap();
    p.deprovision(&again).await.unwrap();
    let err = PgStore::connect(PgConfig::new(a2.conninfo()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, DatastoreError::PermissionDenied { .. }),
        "{err:?}"
    );
    assert!(matches!(
        p.provision(&TenantSlice::with_client_certificate("x", "y"))
            .await,
        Err(kmetal_datastore::provision::ProvisionError::UnsupportedAuth { .. })
    ));
}

/// Automatic compaction on an interval keeps the last revisions and compacts the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_compaction_runs_on_its_interval() {
    let pg = PostgresServer::start(PostgresOptions {
        fsync: false,
        ..PostgresOptions::default()
    })
    .unwrap();
    pg.create_database("auto").await.unwrap();
    let mut cfg = PgConfig::new(pg.conninfo("auto"));
    cfg.log.auto_compact = Some((Duration::from_millis(200), 5));
    let s = PgStore::connect(cfg).await.unwrap();
    kmetal_testkit::conformance::automatic_compaction(&s, 5).await;
}

/// With TLS configured the store's connections are encrypted and the server certificate is
/// verified: a store trusting another CA cannot connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connections_are_encrypted_and_verified() {
    use kmetal_datastore::DatastoreError;
    use kmetal_datastore::model::{PutRequest, RangeRequest, WatchRequest};
    use kmetal_datastore::postgres::PgTls;
    let pg = PostgresServer::start(PostgresOptions {
        fsync: false,
        tls: true,
        ..PostgresOptions::default()
    })
    .unwrap();
    pg.create_database("secure").await.unwrap();
    let mut cfg = PgConfig::new(pg.conninfo("secure"));
    cfg.tls = Some(PgTls {
        ca_pem: pg.ca_pem().unwrap().to_string(),
        identity: None,
    });
    let s = PgStore::connect(cfg.clone()).await.unwrap();
    let mut w = s.watch(WatchRequest::prefix("/tls/", 0)).await.unwrap();
    s.put(PutRequest::new("/tls/k", "v")).await.unwrap();
    assert_eq!(s.range(RangeRequest::get("/tls/k")).await.unwrap().count, 1);
    let b = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(b.events.len(), 1, "watches work over TLS too");
    // The server sees the store's connections as TLS.
    let (client, conn) = tokio_postgres::connect(&pg.conninfo("postgres"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let ssl: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid
             WHERE s.ssl AND a.datname = 'secure'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl >= 2, "pooled and LISTEN connections use TLS ({ssl})");
    // Trusting another CA: the server certificate is refused.
    let stranger = kmetal_testkit::tls::TestCa::new("stranger").unwrap();
    cfg.tls = Some(PgTls {
        ca_pem: stranger.cert_pem.clone(),
        identity: None,
    });
    cfg.log.request_timeout = Duration::from_secs(3);
    let err = PgStore::connect(cfg).await.unwrap_err();
    assert!(matches!(err, DatastoreError::Unavailable { .. }), "{err:?}");
}

/// A lease outlives the store that granted it: a new store (a restarted process) expires the
/// lease from its persisted time and deletes the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_expire_across_a_process_restart() {
    use kmetal_datastore::model::{PutRequest, RangeRequest};
    let pg = PostgresServer::start(PostgresOptions {
        fsync: false,
        ..PostgresOptions::default()
    })
    .unwrap();
    pg.create_database("leases").await.unwrap();
    {
        let s = PgStore::connect(PgConfig::new(pg.conninfo("leases")))
            .await
            .unwrap();
        let lease = s.lease_grant(2, 0).await.unwrap().id;
        s.put(PutRequest::new("/leased", "v").with_lease(lease))
            .await
            .unwrap();
    }
    let s = PgStore::connect(PgConfig::new(pg.conninfo("leases")))
        .await
        .unwrap();
    assert_eq!(
        s.range(RangeRequest::get("/leased")).await.unwrap().count,
        1
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.range(RangeRequest::get("/leased")).await.unwrap().count == 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the persisted lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(s.leases().await.unwrap().is_empty());
}

/// Many concurrent puts to one key land in the same batches: every put gets its own
/// revision and the version counts them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts_to_one_key_each_count() {
    use kmetal_datastore::model::{PutRequest, RangeRequest};
    let pg = PostgresServer::start(PostgresOptions {
        fsync: false,
        ..PostgresOptions::default()
    })
    .unwrap();
    pg.create_database("hot").await.unwrap();
    let s = PgStore::connect(PgConfig::new(pg.conninfo("hot")))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for t in 0..32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut revs = Vec::new();
            for i in 0..10 {
                let r = s
                    .put(PutRequest::new("/hot", format!("{t}-{i}")))
                    .await
                    .unwrap();
                // Another key in the same batches, too.
                s.put(PutRequest::new(format!("/cold/{t}/{i}"), "x"))
                    .await
                    .unwrap();
                revs.push(r.revision);
            }
            revs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 320, "every put has its own revision");
    let kv = s.range(RangeRequest::get("/hot")).await.unwrap().kvs[0].clone();
    assert_eq!(kv.version, 320);
    assert_eq!(kv.mod_revision, *all.last().unwrap());
}
