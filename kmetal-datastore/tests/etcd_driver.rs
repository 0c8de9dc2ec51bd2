//! The etcd driver on real etcd: the conformance suite in dedicated and shared-with-auth modes,
//! tenant isolation by RBAC (password and client-certificate users), and provisioning.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, DeleteOptions, GetOptions, WatchOptions};
use kmetal_datastore::etcd::{
    AuthBootstrap, EtcdConfig, EtcdCredentials, EtcdProvisioner, EtcdStore, EtcdTls, Keyspace,
};
use kmetal_datastore::model::{DeleteRangeRequest, PutRequest, RangeRequest, WatchRequest};
use kmetal_datastore::provision::{ProvisionError, Provisioner, TenantSlice};
use kmetal_datastore::{Datastore, DatastoreError};
use kmetal_testkit::tls::Pem;
use kmetal_testkit::{EtcdCluster, EtcdOptions};

const ROOT_PASSWORD: &str = "kmetal-test-root";

fn config(c: &EtcdCluster, identity: Option<Pem>) -> EtcdConfig {
    let mut cfg = EtcdConfig::new(c.endpoints()).with_request_timeout(Duration::from_secs(10));
    if let Some(ca) = c.ca_pem() {
        cfg = cfg.with_tls(EtcdTls {
            ca_pem: ca.to_string(),
            identity: identity.map(|p| (p.cert, p.key)),
            domain: Some("localhost".into()),
        });
    }
    cfg
}

/// The etcd releases the lease and provisioning walls are checked on.
const RELEASES: [kmetal_testkit::EtcdRelease; 2] = [
    kmetal_testkit::EtcdRelease::Debian34,
    kmetal_testkit::EtcdRelease::V36,
];

/// A one-member cluster of `release`.
async fn cluster_of(release: kmetal_testkit::EtcdRelease) -> EtcdCluster {
    EtcdCluster::start(EtcdOptions {
        release,
        ..EtcdOptions::default()
    })
    .await
    .unwrap()
}

async fn shared_provisioner(c: &EtcdCluster) -> EtcdProvisioner {
    let root = c.client_cert("root").unwrap();
    let admin = config(c, root);
    let bootstrap = AuthBootstrap::EnableWithRoot {
        password: ROOT_PASSWORD.into(),
    };
    EtcdProvisioner::shared(admin, bootstrap).await.unwrap()
}

async fn tenant(creds: &EtcdCredentials, identity: Option<Pem>) -> EtcdStore {
    let cfg = creds
        .config(identity.map(|p| (p.cert, p.key)))
        .with_request_timeout(Duration::from_secs(10));
    let cfg = match cfg.tls.clone() {
        Some(mut t) => {
            t.domain = Some("localhost".into());
            cfg.with_tls(t)
        }
        None => cfg,
    };
    EtcdStore::connect(cfg, creds.keyspace.clone())
        .await
        .unwrap()
}

#[tokio::test]
async fn dedicated_etcd_conforms() {
    let cluster = EtcdCluster::start(EtcdOptions {
        progress_notify_interval: Some(Duration::from_secs(1)),
        ..EtcdOptions::default()
    })
    .await
    .unwrap();
    let cfg = config(&cluster, None);
    let root = cluster.client().await.unwrap();
    kmetal_testkit::conformance::run("etcd-dedicated", || {
        let cfg = cfg.clone();
        let mut root = root.clone();
        async move {
            // A fresh store is an empty keyspace with no leases; revisions go on rising.
            root.delete(vec![0], Some(DeleteOptions::new().with_from_key()))
                .await
                .unwrap();
            for l in root.leases().await.unwrap().leases() {
                let _ = root.lease_revoke(l.id()).await;
            }
            Arc::new(EtcdStore::connect(cfg, Keyspace::Dedicated).await.unwrap())
                as Arc<dyn Datastore>
        }
    })
    .await;
}

#[tokio::test]
async fn shared_etcd_with_auth_conforms() {
    let cluster = EtcdCluster::start(EtcdOptions {
        progress_notify_interval: Some(Duration::from_secs(1)),
        ..EtcdOptions::default()
    })
    .await
    .unwrap();
    let provisioner = shared_provisioner(&cluster).await;
    let n = AtomicUsize::new(0);
    kmetal_testkit::conformance::run("etcd-shared-auth", || {
        let slice = TenantSlice::with_password(
            format!("tenant{}", n.fetch_add(1, Ordering::Relaxed)),
            format!("user{}", n.load(Ordering::Relaxed)),
            "tenant-password",
        );
        let provisioner = provisioner.clone();
        async move {
            let creds = provisioner.provision(&slice).await.unwrap();
            Arc::new(tenant(&creds, None).await) as Arc<dyn Datastore>
        }
    })
    .await;
}

/// Tenant `/a/` and tenant `/aa/`: neither sees, changes or watches the other, through the
/// driver or with a raw client holding its credentials.
#[tokio::test]
async fn tenants_are_isolated_by_rbac() {
    let cluster = EtcdCluster::start(EtcdOptions::default()).await.unwrap();
    let p = shared_provisioner(&cluster).await;
    let a = p
        .provision(&TenantSlice::with_password("a", "user-a", "pw-a"))
        .await
        .unwrap();
    let aa = p
        .provision(&TenantSlice::with_password("aa", "user-aa", "pw-aa"))
        .await
        .unwrap();
    let store_a = tenant(&a, None).await;
    let store_aa = tenant(&aa, None).await;
    store_a
        .put(PutRequest::new("/registry/k", "a"))
        .await
        .unwrap();
    store_aa
        .put(PutRequest::new("/registry/k", "aa"))
        .await
        .unwrap();
    store_aa
        .put(PutRequest::new("/registry/only-aa", "aa"))
        .await
        .unwrap();

    // Through the driver, each tenant's whole keyspace holds only its own keys.
    let all_a = store_a.range(RangeRequest::prefix("")).await.unwrap();
    assert_eq!(all_a.count, 1);
    assert_eq!(all_a.kvs[0].value, "a");
    let gone = store_a
        .delete_range(DeleteRangeRequest::prefix(""))
        .await
        .unwrap();
    assert_eq!(gone.deleted, 1);
    assert_eq!(
        store_aa
            .range(RangeRequest::prefix(""))
            .await
            .unwrap()
            .count,
        2,
        "deleting all of /a/ leaves /aa/ alone"
    );

    // A's credentials on B's keyspace: refused at connect, and on every operation.
    let mut a_on_aa = a.config(None);
    a_on_aa.request_timeout = Duration::from_secs(10);
    let err = EtcdStore::connect(a_on_aa, aa.keyspace.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(err, DatastoreError::PermissionDenied { .. }),
        "{err:?}"
    );

    // A raw client with A's password, bypassing the driver's prefixing.
    let opts = ConnectOptions::new().with_user("user-a", "pw-a");
    let mut raw = Client::connect(cluster.endpoints(), Some(opts))
        .await
        .unwrap();
    let denied = |r: Result<(), etcd_client::Error>| match r {
        Err(etcd_client::Error::GRpcStatus(s)) => {
            assert!(s.message().contains("permission denied"), "{s:?}")
        }
        other => panic!("expected permission denied, got {other:?}"),
    };
    denied(raw.get("/aa/registry/k", None).await.map(drop));
    // `/a` without its slash would cover `/aa/`: the range exceeds A's permission.
    denied(
        raw.get("/a", Some(GetOptions::new().with_prefix()))
            .await
            .map(drop),
    );
    denied(raw.put("/aa/registry/k", "evil", None).await.map(drop));
    denied(raw.delete("/aa/registry/k", None).await.map(drop));
    let mut w = raw
        .watch("/aa/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    let mut cancelled = false;
    while let Ok(Ok(Some(resp))) = tokio::time::timeout(Duration::from_secs(5), w.message()).await {
        if resp.canceled() {
            assert!(resp.cancel_reason().contains("permission denied"));
            cancelled = true;
            break;
        }
        assert!(resp.events().is_empty(), "nothing of /aa/ may leak");
    }
    assert!(cancelled, "etcd cancels a watch outside the tenant's range");
    // B's data is untouched.
    let b = store_aa
        .range(RangeRequest::get("/registry/k"))
        .await
        .unwrap();
    assert_eq!(b.kvs[0].value, "aa");
    // Another tenant's lease does not exist for A (`shared_tenants_own_their_leases`).
    let lease = store_aa.lease_grant(60, 0).await.unwrap();
    store_aa
        .put(PutRequest::new("/leased", "x").with_lease(lease.id))
        .await
        .unwrap();
    assert!(matches!(
        store_a.lease_time_to_live(lease.id, true).await,
        Err(DatastoreError::LeaseNotFound { .. })
    ));
}

/// A tenant whose slice is deprovisioned while its store is open gets typed permission errors
/// on every operation, and a watch ends with one; a tenant user cannot use the raw keyspace.
#[tokio::test]
async fn revoked_tenant_gets_permission_errors() {
    let cluster = EtcdCluster::start(EtcdOptions::default()).await.unwrap();
    let p = shared_provisioner(&cluster).await;
    let slice = TenantSlice::with_password("ta", "ua", "pa");
    let a = p.provision(&slice).await.unwrap();
    let cfg = a.config(None).with_request_timeout(Duration::from_secs(10));
    let err = EtcdStore::connect(cfg, Keyspace::Dedicated)
        .await
        .unwrap_err();
    assert!(
        matches!(err, DatastoreError::PermissionDenied { .. }),
        "{err:?}"
    );

    let store_a = tenant(&a, None).await;
    store_a.put(PutRequest::new("/k", "v")).await.unwrap();
    let mut w = store_a.watch(WatchRequest::prefix("", 0)).await.unwrap();
    p.deprovision(&slice).await.unwrap();
    let denied = |r: Result<(), DatastoreError>| {
        assert!(
            matches!(r, Err(DatastoreError::PermissionDenied { .. })),
            "{r:?}"
        )
    };
    denied(store_a.put(PutRequest::new("/k", "v2")).await.map(drop));
    denied(store_a.range(RangeRequest::get("/k")).await.map(drop));
    denied(
        store_a
            .delete_range(DeleteRangeRequest::key("/k"))
            .await
            .map(drop),
    );
    denied(store_a.watch(WatchRequest::prefix("", 0)).await.map(drop));
    // The open watch sees its own keys deleted by deprovisioning, then either ends with an
    // error or stays silent; nothing else reaches it.
    while let Ok(Some(item)) = tokio::time::timeout(Duration::from_secs(3), w.next()).await {
        match item {
            Ok(batch) => {
                assert!(
                    batch.events.iter().all(|e| e.kv.key == "/k"
                        && e.kind == kmetal_datastore::model::EventKind::Delete),
                    "unexpected events after revocation: {batch:?}"
                )
            }
            Err(e) => {
                assert!(
                    matches!(
                        e,
                        DatastoreError::PermissionDenied { .. }
                            | DatastoreError::Unavailable { .. }
                    ),
                    "{e:?}"
                );
                break;
            }
        }
    }
}

/// Re-provisioning changes the password in place; deprovisioning removes keys, user and role,
/// and both are idempotent.
#[tokio::test]
async fn provisioning_is_idempotent_and_complete() {
    let cluster = EtcdCluster::start(EtcdOptions::default()).await.unwrap();
    let p = shared_provisioner(&cluster).await;
    let first = TenantSlice::with_password("prov", "prov-user", "one");
    let creds = p.provision(&first).await.unwrap();
    tenant(&creds, None)
        .await
        .put(PutRequest::new("/k", "v"))
        .await
        .unwrap();
    let second = TenantSlice::with_password("prov", "prov-user", "two");
    let creds2 = p.provision(&second).await.unwrap();
    assert_eq!(creds2.password.as_deref(), Some("two"));
    let err = EtcdStore::connect(creds.config(None), creds.keyspace.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(err, DatastoreError::PermissionDenied { .. }),
        "{err:?}"
    );
    let store = tenant(&creds2, None).await;
    assert_eq!(store.range(RangeRequest::get("/k")).await.unwrap().count, 1);

    p.deprovision(&second).await.unwrap();
    p.deprovision(&second).await.unwrap();
    let mut root = Client::connect(
        cluster.endpoints(),
        Some(ConnectOptions::new().with_user("root", ROOT_PASSWORD)),
    )
    .await
    .unwrap();
    let left = root
        .get(
            "/prov/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap();
    assert_eq!(left.count(), 0, "the tenant's keys are gone");
    let users = root.user_list().await.unwrap();
    assert!(!users.users().iter().any(|u| u == "prov-user"));
    let roles = root.role_list().await.unwrap();
    assert!(!roles.roles().iter().any(|r| r == "prov-user"));
    let err = EtcdStore::connect(creds2.config(None), creds2.keyspace.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(err, DatastoreError::PermissionDenied { .. }),
        "{err:?}"
    );

    // Names that could escape the prefix are refused before anything is created.
    let bad = TenantSlice::with_password("x/..", "u", "p");
    assert!(matches!(
        p.provision(&bad).await,
        Err(ProvisionError::InvalidSchema(_))
    ));
}

/// On a TLS cluster, tenants authenticate by client-certificate CN; another tenant's
/// certificate is refused on this tenant's keys.
#[tokio::test]
async fn client_certificate_tenants_are_isolated() {
    let cluster = EtcdCluster::start(EtcdOptions {
        tls: true,
        ..EtcdOptions::default()
    })
    .await
    .unwrap();
    let p = shared_provisioner(&cluster).await;
    let a = p
        .provision(&TenantSlice::with_client_certificate("cert_a", "cert-a"))
        .await
        .unwrap();
    let b = p
        .provision(&TenantSlice::with_client_certificate("cert_b", "cert-b"))
        .await
        .unwrap();
    assert!(a.password.is_none());
    let store_a = tenant(&a, cluster.client_cert("cert-a").unwrap()).await;
    store_a.put(PutRequest::new("/x", "a")).await.unwrap();
    let store_b = tenant(&b, cluster.client_cert("cert-b").unwrap()).await;
    assert_eq!(
        store_b.range(RangeRequest::prefix("")).await.unwrap().count,
        0
    );
    // B's certificate on A's keyspace.
    let cfg = a
        .config(
            cluster
                .client_cert("cert-b")
                .unwrap()
                .map(|p| (p.cert, p.key)),
        )
        .with_request_timeout(Duration::from_secs(10));
    let mut tls = cfg.tls.clone().unwrap();
    tls.domain = Some("localhost".into());
    let err = EtcdStore::connect(cfg.with_tls(tls), a.keyspace.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(err, DatastoreError::PermissionDenied { .. }),
        "{err:?}"
    );
    // A certificate from a CA etcd does not trust is refused by TLS itself.
    let stranger = kmetal_testkit::tls::TestCa::new("stranger").unwrap();
    let cfg = a
        .config(Some({
            let p = stranger.client("cert-a").unwrap();
            (p.cert, p.key)
        }))
        .with_request_timeout(Duration::from_secs(3));
    let mut tls = cfg.tls.clone().unwrap();
    tls.domain = Some("localhost".into());
    let err = EtcdStore::connect(cfg.with_tls(tls), a.keyspace.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, DatastoreError::Unavailable { .. }), "{err:?}");
}

/// A full backend refuses writes with QuotaExceeded (etcd's NOSPACE alarm) and keeps serving
/// reads.
#[tokio::test]
async fn etcd_quota_is_a_typed_error() {
    let quota = 8 * 1024 * 1024;
    let cluster = EtcdCluster::start(EtcdOptions {
        quota_backend_bytes: Some(quota),
        ..EtcdOptions::default()
    })
    .await
    .unwrap();
    let mut cfg = config(&cluster, None);
    cfg.limits.quota_backend_bytes = quota;
    let store = EtcdStore::connect(cfg, Keyspace::Dedicated).await.unwrap();
    kmetal_testkit::conformance::quota_exceeded(&store, quota).await;
}

/// Each tenant of a shared etcd 3.6 compacts only its own view: reads and watches below its
/// compaction fail (on etcd 3.6 a tenant's role may not compact the cluster at all), another
/// tenant's history is untouched, a new gateway on the tenant sees its compaction, and the
/// cluster's operator compacts etcd itself only up to the lowest of its tenants' compactions.
#[tokio::test]
async fn shared_tenants_compact_their_own_views() {
    let cluster = EtcdCluster::start(EtcdOptions {
        release: kmetal_testkit::EtcdRelease::V36,
        ..EtcdOptions::default()
    })
    .await
    .unwrap();
    let p = shared_provisioner(&cluster).await;
    let a = p
        .provision(&TenantSlice::with_password("a", "user-a", "pw-a"))
        .await
        .unwrap();
    let b = p
        .provision(&TenantSlice::with_password("b", "user-b", "pw-b"))
        .await
        .unwrap();
    let (store_a, store_b) = (tenant(&a, None).await, tenant(&b, None).await);
    let a1 = store_a
        .put(PutRequest::new("/k", "1"))
        .await
        .unwrap()
        .revision;
    let b1 = store_b
        .put(PutRequest::new("/k", "1"))
        .await
        .unwrap()
        .revision;
    let a2 = store_a
        .put(PutRequest::new("/k", "2"))
        .await
        .unwrap()
        .revision;
    store_b.put(PutRequest::new("/k", "2")).await.unwrap();

    // Each tenant's revision is its own last write's, whatever the others write.
    let seen = |r: kmetal_datastore::model::RangeResponse| r.revision;
    assert_eq!(
        seen(store_a.range(RangeRequest::get("/k")).await.unwrap()),
        a2
    );
    assert_eq!(store_a.status().await.unwrap().revision, a2);
    store_a.compact(a2).await.unwrap();
    assert_eq!(
        seen(store_a.range(RangeRequest::get("/k")).await.unwrap()),
        a2,
        "a compaction moves no revision"
    );
    let nothing = store_a
        .delete_range(DeleteRangeRequest::key("/absent"))
        .await
        .unwrap();
    assert_eq!(
        (nothing.deleted, nothing.revision),
        (0, a2),
        "deleting nothing moves none"
    );
    let below = store_a.range(RangeRequest::get("/k").at_revision(a1)).await;
    assert!(
        matches!(below, Err(DatastoreError::Compacted { requested, compacted }) if requested == a1 && compacted == a2),
        "{below:?}"
    );
    let watch = store_a.watch(WatchRequest::prefix("/", a1)).await;
    assert!(matches!(watch, Err(DatastoreError::Compacted { .. })));
    assert!(matches!(
        store_a.compact(a1).await,
        Err(DatastoreError::Compacted { .. })
    ));
    assert_eq!(store_a.status().await.unwrap().compact_revision, a2);
    let old_b = store_b
        .range(RangeRequest::get("/k").at_revision(b1))
        .await
        .unwrap();
    assert_eq!(old_b.kvs[0].value, "1", "b's history stays");
    assert_eq!(store_b.status().await.unwrap().compact_revision, 0);

    let again = tenant(&a, None).await;
    assert!(matches!(
        again.range(RangeRequest::get("/k").at_revision(a1)).await,
        Err(DatastoreError::Compacted { .. })
    ));

    // b has never compacted: etcd stays whole; once it has, etcd goes up to the lower one.
    assert_eq!(p.compact_shared(&["a", "b"]).await.unwrap(), None);
    let b3 = store_b
        .put(PutRequest::new("/k", "3"))
        .await
        .unwrap()
        .revision;
    store_b.compact(b3).await.unwrap();
    assert_eq!(p.compact_shared(&["a", "b"]).await.unwrap(), Some(a2));
    let root_login = ConnectOptions::new().with_user("root", ROOT_PASSWORD);
    let mut root = Client::connect(cluster.endpoints(), Some(root_login))
        .await
        .unwrap();
    let raw = root
        .get("/b//k", Some(GetOptions::new().with_revision(b1)))
        .await;
    assert!(raw.is_err(), "etcd itself is compacted up to {a2}");
}

/// Provisioning other tenants moves etcd's auth revision, which makes etcd refuse requests
/// carrying an older token ("revision of auth store is old"): the store renews its token and
/// every write and watch goes on.
#[tokio::test]
async fn requests_go_on_while_other_tenants_are_provisioned() {
    let cluster = EtcdCluster::start(EtcdOptions::default()).await.unwrap();
    let p = shared_provisioner(&cluster).await;
    let a = p
        .provision(&TenantSlice::with_password("busy", "user-busy", "pw"))
        .await
        .unwrap();
    let store = tenant(&a, None).await;
    let mut w = store.watch(WatchRequest::prefix("/", 0)).await.unwrap();
    let provisioning = {
        let p = p.clone();
        tokio::spawn(async move {
            for i in 0..6 {
                let slice = TenantSlice::with_password(format!("new{i}"), format!("u{i}"), "pw");
                p.provision(&slice).await.unwrap();
            }
        })
    };
    let mut written = 0;
    while !provisioning.is_finished() || written < 20 {
        store
            .put(PutRequest::new(format!("/k{written}"), "v"))
            .await
            .unwrap_or_else(|e| panic!("write {written} while provisioning: {e:?}"));
        written += 1;
    }
    provisioning.await.unwrap();
    let mut seen = 0;
    while seen < written {
        let batch = tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .expect("the watch goes on")
            .expect("open")
            .expect("no error");
        seen += batch.events.len();
    }
    assert_eq!(seen, written);
}

/// Eight provisioners set up 40 tenants at once on one etcd (3.4 and 3.6) while roles keep
/// changing: an auth change between etcd stamping a request and applying it refuses the
/// request as stale ("revision of auth store is old"), and every provisioning still
/// completes, each tenant with a lease tag of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_provisioners_all_complete() {
    for release in RELEASES {
        let cluster = cluster_of(release).await;
        let mut provisioners = Vec::new();
        for _ in 0..8 {
            provisioners.push(shared_provisioner(&cluster).await);
        }
        // Roles keep changing, so requests are stamped with an auth revision that moves before
        // they apply far more often than eight provisioners alone make happen. Paced: etcd
        // retries a login until no auth change lands during its password check.
        let root_login = ConnectOptions::new().with_user("root", ROOT_PASSWORD);
        let mut root = Client::connect(cluster.endpoints(), Some(root_login))
            .await
            .unwrap();
        let churn = tokio::spawn(async move {
            for i in 0.. {
                let _ = root.role_add(format!("churn{}", i % 4)).await;
                let _ = root.role_delete(format!("churn{}", i % 4)).await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        let mut runs = Vec::new();
        for (p, provisioner) in provisioners.into_iter().enumerate() {
            runs.push(tokio::spawn(async move {
                let mut made = Vec::new();
                for i in 0..5 {
                    let slice =
                        TenantSlice::with_password(format!("c{p}x{i}"), format!("u{p}x{i}"), "pw");
                    let creds = provisioner
                        .provision(&slice)
                        .await
                        .unwrap_or_else(|e| panic!("provisioning c{p}x{i}: {e:?}"));
                    made.push(creds);
                }
                made
            }));
        }
        let mut made = Vec::new();
        for run in runs {
            made.extend(run.await.unwrap());
        }
        churn.abort();
        let mut tags = std::collections::BTreeSet::new();
        for creds in made {
            let store = tenant(&creds, None).await;
            let id = store.lease_grant(60, 0).await.unwrap().id;
            assert!(
                tags.insert(id >> 32),
                "lease tag {} handed out twice",
                id >> 32
            );
        }
        assert_eq!(tags.len(), 40);
    }
}

/// Two tenants on one real etcd with auth (3.4 and 3.6): each lists only its own leases;
/// another tenant's lease id, which etcd itself would let it keep alive, attach keys to and
/// so block its owner's revoke, is a lease that does not exist through the driver; granting
/// one is refused; the owner's revoke still deletes its keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_tenants_own_their_leases() {
    for release in RELEASES {
        let cluster = cluster_of(release).await;
        let p = shared_provisioner(&cluster).await;
        let a = p
            .provision(&TenantSlice::with_password("la", "user-la", "pw-a"))
            .await
            .unwrap();
        let b = p
            .provision(&TenantSlice::with_password("lb", "user-lb", "pw-b"))
            .await
            .unwrap();
        let (store_a, store_b) = (tenant(&a, None).await, tenant(&b, None).await);
        let la = store_a.lease_grant(60, 0).await.unwrap().id;
        let lb = store_b.lease_grant(60, 0).await.unwrap().id;
        assert_ne!(
            la >> 32,
            lb >> 32,
            "{release:?}: each tenant's ids carry its own tag"
        );
        store_a
            .put(PutRequest::new("/registry/leased", "a").with_lease(la))
            .await
            .unwrap();

        // etcd's own gap, on its raw API: B attaches a key of its own to a lease of A's,
        // and A can no longer revoke that lease.
        let la2 = store_a.lease_grant(60, 0).await.unwrap().id;
        let mut raw = Client::connect(
            cluster.endpoints(),
            Some(ConnectOptions::new().with_user("user-lb", "pw-b")),
        )
        .await
        .unwrap();
        let attach = etcd_client::PutOptions::new().with_lease(la2);
        raw.put("/lb/hijack", "b", Some(attach)).await.unwrap();
        assert!(
            matches!(
                store_a.lease_revoke(la2).await,
                Err(DatastoreError::PermissionDenied { .. })
            ),
            "{release:?}: etcd blocks the owner's revoke"
        );
        raw.delete("/lb/hijack", None).await.unwrap();
        store_a.lease_revoke(la2).await.unwrap();

        // Listing leases is root's on etcd with auth; where it is allowed, a tenant sees
        // only its own.
        for (store, own) in [(&store_a, la), (&store_b, lb)] {
            match store.leases().await {
                Ok(ids) => assert_eq!(ids, vec![own], "{release:?}"),
                Err(DatastoreError::PermissionDenied { .. }) => {
                    eprintln!("{release:?}: etcd refuses a tenant the lease list");
                }
                Err(e) => panic!("{release:?}: {e}"),
            }
        }
        let not_found = |r: Result<(), DatastoreError>, what: &str| {
            assert!(
                matches!(r, Err(DatastoreError::LeaseNotFound { id }) if id == la),
                "{release:?}: {what} of a foreign lease: {r:?}"
            );
        };
        not_found(store_b.lease_keep_alive(la).await.map(drop), "keep-alive");
        not_found(
            store_b.lease_time_to_live(la, true).await.map(drop),
            "time-to-live",
        );
        not_found(store_b.lease_revoke(la).await.map(drop), "revoke");
        not_found(
            store_b
                .put(PutRequest::new("/registry/hijack", "b").with_lease(la))
                .await
                .map(drop),
            "a put attached",
        );
        assert!(
            matches!(
                store_b.lease_grant(60, la + 1).await,
                Err(DatastoreError::PermissionDenied { .. })
            ),
            "{release:?}: granting an id of another tenant's"
        );
        // Nothing of B's hangs on A's lease, so A's revoke deletes A's key.
        store_a.lease_revoke(la).await.unwrap();
        let left = store_a
            .range(RangeRequest::get("/registry/leased"))
            .await
            .unwrap();
        assert!(
            left.kvs.is_empty(),
            "{release:?}: the owner's revoke went through"
        );
        assert!(store_b.lease_keep_alive(lb).await.is_ok(), "{release:?}");
    }
}
