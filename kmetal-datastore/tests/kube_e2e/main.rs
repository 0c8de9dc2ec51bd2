//! kubectl against a real kube-apiserver and kube-controller-manager on kmetal's gateway, per
//! backend (memory, SQLite, PostgreSQL, a tenant slice of a shared etcd with RBAC): 2,000 ConfigMaps and a CRD with 1,000 custom resources
//! listed in chunks of 500, selectors, a 409 on a stale update, watches from a resourceVersion,
//! watch-list and consistent reads from the watch cache, finalizers and garbage collection,
//! events on a second datastore, compaction driven by the apiserver, and a restart of the
//! gateway underneath the running apiserver.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod control;
mod objects;
mod served;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kmetal_datastore::Datastore;
use kmetal_datastore::etcd::{AuthBootstrap, EtcdConfig, EtcdProvisioner, EtcdStore};
use kmetal_datastore::postgres::{PgConfig, PgStore};
use kmetal_datastore::provision::{Provisioner, TenantSlice};
use kmetal_datastore::sqlite::{SqliteConfig, SqliteStore};
use kmetal_testkit::kube::{ApiserverOptions, Controller, KubeController, KubeError};
use kmetal_testkit::{
    EtcdCluster, EtcdOptions, EtcdRelease, KubeApiserver, PostgresOptions, PostgresServer,
};

use served::Served;

/// How often the apiserver compacts (its default is 5 minutes).
const COMPACTION: Duration = Duration::from_secs(5);

/// One backend's running control plane and the stores under it.
pub struct Ctx {
    backend: &'static str,
    api: KubeApiserver,
    /// The store behind `--etcd-servers`.
    main: Arc<dyn Datastore>,
    /// The store behind `--etcd-servers-overrides=/events#…`.
    events: Arc<dyn Datastore>,
}

impl Ctx {
    fn k(&self, args: &[&str]) -> Result<String, KubeError> {
        self.api.kubectl(args)
    }

    /// Writes `text` into the apiserver's directory and returns the path.
    fn file(&self, name: &str, text: &str) -> String {
        let path = self.api.dir().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    /// The resourceVersion of ConfigMap `name` in `e2e`.
    fn rv(&self, name: &str) -> String {
        self.k(&[
            "get",
            "cm",
            name,
            "-n",
            "e2e",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ])
        .unwrap()
    }

    /// How many objects `kubectl get <args> -o name` prints whose name starts with `prefix`.
    fn count(&self, args: &[&str], prefix: &str) -> usize {
        let mut all = args.to_vec();
        all.extend(["-o", "name"]);
        names(&self.k(&all).unwrap(), prefix)
    }
}

/// Names of the objects `kubectl get -o name` printed with `prefix` (`configmap/cm-`).
fn names(out: &str, prefix: &str) -> usize {
    out.lines().filter(|l| l.starts_with(prefix)).count()
}

/// Polls `f` every 500 ms until it answers `Some`; panics naming `what` after `timeout`.
async fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn scenarios<F, Fut>(backend: &'static str, open: F, events: Arc<dyn Datastore>)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Arc<dyn Datastore>>,
{
    let main = open().await;
    let served = Served::start(main.clone()).await;
    let events_served = Served::start(events.clone()).await;
    let mut options = ApiserverOptions::new([served.endpoint()]);
    options.compaction_interval = Some(COMPACTION);
    options.etcd_servers_overrides = vec![format!("/events#{}", events_served.endpoint())];
    let api = KubeApiserver::start(options).await.unwrap();
    let mut manager = KubeController::start(Controller::ControllerManager, &api, &[])
        .await
        .unwrap();
    let ctx = Ctx {
        backend,
        api,
        main,
        events,
    };
    ctx.k(&["create", "namespace", "e2e"]).unwrap();

    objects::many_listed(&ctx).await;
    control::watch_list(&ctx);
    objects::stale_update_refused(&ctx);
    objects::watch_in_order(&ctx);
    control::finalizer_holds_deletion(&ctx).await;
    control::garbage_collection(&ctx).await;
    control::events_on_second_store(&ctx).await;
    control::compaction_under_watch(&ctx).await;
    control::consistent_reads_from_cache(&ctx);
    assert!(manager.is_running(), "{backend}: controller-manager exited");

    let Ctx { api, main, .. } = ctx;
    drop(main);
    objects::across_restart(backend, &api, served, open).await;
    for log in [api.log_tail(2000), manager.log_tail(2000)] {
        assert!(
            log.lines().all(|l| !l.contains("panic")),
            "{backend}: {log}"
        );
    }
    drop(events_served);
}

fn postgres() -> PostgresServer {
    PostgresServer::start(PostgresOptions {
        fsync: false,
        ..PostgresOptions::default()
    })
    .unwrap()
}

async fn pg_store(pg: &PostgresServer, db: &str) -> Arc<dyn Datastore> {
    let store = PgStore::connect(PgConfig::new(pg.conninfo(db)))
        .await
        .unwrap();
    Arc::new(store)
}

async fn sqlite_store(path: std::path::PathBuf) -> Arc<dyn Datastore> {
    Arc::new(SqliteStore::open(SqliteConfig::new(path)).await.unwrap())
}

/// The memory driver behind the gateway (the restarted gateway serves the same store), events
/// on a second memory store.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn kubectl_scenarios_on_memory() {
    let store: Arc<dyn Datastore> = Arc::new(kmetal_datastore::MemoryStore::new());
    let events = Arc::new(kmetal_datastore::MemoryStore::new());
    scenarios(
        "memory",
        || {
            let store = store.clone();
            async move { store }
        },
        events,
    )
    .await;
}

/// The SQLite log behind the gateway (the restarted gateway opens the file again), events on
/// PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn kubectl_scenarios_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let pg = postgres();
    pg.create_database("events").await.unwrap();
    let events = pg_store(&pg, "events").await;
    scenarios("SQLite", || sqlite_store(path.clone()), events).await;
}

/// The PostgreSQL log behind the gateway (the restarted gateway connects again), events on
/// SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn kubectl_scenarios_on_postgres() {
    let pg = postgres();
    pg.create_database("e2e").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let events = sqlite_store(dir.path().join("events.db")).await;
    scenarios("PostgreSQL", || pg_store(&pg, "e2e"), events).await;
}

/// A tenant slice (prefix + RBAC user) of a shared etcd 3.6 behind the gateway (the restarted
/// gateway connects again with the tenant's credentials), events on a second tenant's slice
/// of the same cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn kubectl_scenarios_on_shared_etcd() {
    let cluster = EtcdCluster::start(EtcdOptions {
        release: EtcdRelease::V36,
        ..EtcdOptions::default()
    })
    .await
    .unwrap();
    let bootstrap = AuthBootstrap::EnableWithRoot {
        password: "root-secret".into(),
    };
    let provisioner = EtcdProvisioner::shared(EtcdConfig::new(cluster.endpoints()), bootstrap)
        .await
        .unwrap();
    let mut slices = Vec::new();
    for schema in ["e2e", "e2e_events"] {
        let slice = TenantSlice::with_password(schema, schema, "tenant-secret");
        slices.push(provisioner.provision(&slice).await.unwrap());
    }
    let connect = |i: usize| {
        let creds = slices[i].clone();
        async move {
            let store = EtcdStore::connect(creds.config(None), creds.keyspace.clone())
                .await
                .unwrap();
            Arc::new(store) as Arc<dyn Datastore>
        }
    };
    let events = connect(1).await;
    scenarios("shared etcd", || connect(0), events).await;
}
