//! kubectl against a real kube-apiserver on kmetal's gateway, per backend (memory, SQLite,
//! PostgreSQL): 2,000 ConfigMaps and a CRD with 1,000 custom resources listed in chunks of
//! 500, label and field selectors, a stale update refused with 409, a raw watch from a
//! resourceVersion that sees every change in order, and a watch that goes on across a
//! restart of the gateway underneath the running apiserver.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::sync::Arc;

use kmetal_datastore::Datastore;
use kmetal_datastore::gateway::Gateway;
use kmetal_datastore::postgres::{PgConfig, PgStore};
use kmetal_datastore::sqlite::{SqliteConfig, SqliteStore};
use kmetal_testkit::kube::{ApiserverOptions, KubeError};
use kmetal_testkit::{FaultProxy, KubeApiserver, PostgresOptions, PostgresServer};

const CONFIGMAPS: usize = 2000;
const WIDGETS: usize = 1000;

/// A gateway the apiserver reaches through a proxy, so that it can be restarted under the
/// apiserver: the proxy resets every connection (what the gateway process dying does), a new
/// gateway comes up on a newly opened store, and the proxy forwards to it.
struct Served {
    proxy: FaultProxy,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// Serves `store` on `listener` until the returned sender fires (or is dropped).
fn gateway(
    store: Arc<dyn Datastore>,
    listener: tokio::net::TcpListener,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        Gateway::new(store)
            .serve_on(listener, None, shutdown)
            .await
            .unwrap();
    });
    (stop, task)
}

impl Served {
    async fn start(store: Arc<dyn Datastore>) -> (Self, std::net::SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, task) = gateway(store, listener);
        let proxy = FaultProxy::start(addr).await.unwrap();
        (Self { proxy, stop, task }, addr)
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.proxy.addr())
    }

    /// Cuts the apiserver off, stops the gateway, serves `store` on the same port, and lets
    /// the apiserver back in.
    async fn restart(self, store: Arc<dyn Datastore>, addr: std::net::SocketAddr) -> Self {
        let Self { proxy, stop, task } = self;
        proxy.reset();
        let _ = stop.send(());
        tokio::time::timeout(std::time::Duration::from_secs(20), task)
            .await
            .expect("the gateway stops once its connections are gone")
            .unwrap();
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let (stop, task) = gateway(store, listener);
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        proxy.restore();
        Self { proxy, stop, task }
    }
}

fn write(api: &KubeApiserver, name: &str, text: &str) -> String {
    let path = api.dir().join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// Names of the objects `kubectl get -o name` printed with `prefix` (`configmap/cm-`).
fn names(out: &str, prefix: &str) -> usize {
    out.lines().filter(|l| l.starts_with(prefix)).count()
}

async fn scenarios<F, Fut>(backend: &str, open: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Arc<dyn Datastore>>,
{
    let (served, addr) = Served::start(open().await).await;
    let api = KubeApiserver::start(ApiserverOptions::new([served.endpoint()]))
        .await
        .unwrap();
    let k = |args: &[&str]| -> Result<String, KubeError> { api.kubectl(args) };
    k(&["create", "namespace", "e2e"]).unwrap();

    // 2,000 ConfigMaps, half of them tier=a.
    let mut cms = String::new();
    for i in 0..CONFIGMAPS {
        let tier = if i % 2 == 0 { "a" } else { "b" };
        write!(
            cms,
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm-{i:05}, namespace: e2e, labels: {{tier: {tier}}}}}\ndata: {{i: \"{i}\"}}\n"
        )
        .unwrap();
    }
    let file = write(&api, "cms.yaml", &cms);
    k(&["create", "-f", &file, "-o", "name"]).unwrap();
    let all = k(&["get", "cm", "-n", "e2e", "--chunk-size=500", "-o", "name"]).unwrap();
    assert_eq!(
        names(&all, "configmap/cm-"),
        CONFIGMAPS,
        "{backend}: chunked list"
    );
    let a = k(&[
        "get",
        "cm",
        "-n",
        "e2e",
        "-l",
        "tier=a",
        "--chunk-size=500",
        "-o",
        "name",
    ])
    .unwrap();
    assert_eq!(
        names(&a, "configmap/cm-"),
        CONFIGMAPS / 2,
        "{backend}: label selector"
    );
    let one = k(&[
        "get",
        "cm",
        "-n",
        "e2e",
        "--field-selector",
        "metadata.name=cm-00042",
        "-o",
        "name",
    ])
    .unwrap();
    assert_eq!(
        one.trim(),
        "configmap/cm-00042",
        "{backend}: field selector"
    );

    // A CRD and 1,000 of its custom resources.
    let crd = "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.e2e.kmetal.dev}
spec:
  group: e2e.kmetal.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec: {type: object, properties: {size: {type: integer}}}
";
    let file = write(&api, "crd.yaml", crd);
    k(&["create", "-f", &file]).unwrap();
    k(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/widgets.e2e.kmetal.dev",
    ])
    .unwrap();
    let mut widgets = String::new();
    for i in 0..WIDGETS {
        write!(
            widgets,
            "---\napiVersion: e2e.kmetal.dev/v1\nkind: Widget\nmetadata: {{name: w-{i:05}, namespace: e2e}}\nspec: {{size: {i}}}\n"
        )
        .unwrap();
    }
    let file = write(&api, "widgets.yaml", &widgets);
    // The CRD's REST endpoint appears a moment after Established on some servers: retry.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match k(&["create", "-f", &file, "-o", "name"]) {
            Ok(_) => break,
            Err(e) if std::time::Instant::now() < deadline => {
                let created = k(&["get", "widgets", "-n", "e2e", "-o", "name"]).unwrap_or_default();
                assert_eq!(
                    names(&created, "widget"),
                    0,
                    "{backend}: partial create: {e}"
                );
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
            Err(e) => panic!("{backend}: creating widgets: {e}"),
        }
    }
    let all = k(&[
        "get",
        "widgets",
        "-n",
        "e2e",
        "--chunk-size=500",
        "-o",
        "name",
    ])
    .unwrap();
    assert_eq!(
        names(&all, "widget.e2e.kmetal.dev/w-"),
        WIDGETS,
        "{backend}: CRs listed"
    );

    // An update carrying a stale resourceVersion is refused with 409.
    let stale = k(&["get", "cm", "cm-00001", "-n", "e2e", "-o", "json"]).unwrap();
    let file = write(
        &api,
        "stale.json",
        &stale.replace("\"i\": \"1\"", "\"i\": \"one\""),
    );
    k(&["replace", "-f", &file]).unwrap();
    let e = k(&["replace", "-f", &file]).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("Conflict") || text.contains("the object has been modified"),
        "{backend}: a stale update must be refused with 409: {text}"
    );

    // A raw watch from a resourceVersion sees each later change, in order.
    let rv = k(&[
        "get",
        "cm",
        "-n",
        "e2e",
        "cm-00002",
        "-o",
        "jsonpath={.metadata.resourceVersion}",
    ])
    .unwrap();
    k(&[
        "create",
        "configmap",
        "watched",
        "-n",
        "e2e",
        "--from-literal=v=1",
    ])
    .unwrap();
    k(&["label", "configmap", "watched", "-n", "e2e", "step=2"]).unwrap();
    k(&["delete", "configmap", "watched", "-n", "e2e"]).unwrap();
    let path =
        format!("/api/v1/namespaces/e2e/configmaps?watch=1&resourceVersion={rv}&timeoutSeconds=3");
    let events = k(&["get", "--raw", &path]).unwrap();
    let watched: Vec<&str> = events
        .lines()
        .filter(|l| l.contains("\"name\":\"watched\""))
        .map(|l| {
            ["ADDED", "MODIFIED", "DELETED"]
                .into_iter()
                .find(|t| l.starts_with(&format!("{{\"type\":\"{t}\"")))
                .unwrap_or("?")
        })
        .collect();
    assert_eq!(
        watched,
        ["ADDED", "MODIFIED", "DELETED"],
        "{backend}: the watch from {rv} saw every change in order"
    );

    // The gateway restarts underneath the apiserver while a client watches through it: the
    // apiserver recovers by itself and the watch sees a change made after the restart.
    let rv = k(&[
        "get",
        "cm",
        "-n",
        "e2e",
        "cm-00003",
        "-o",
        "jsonpath={.metadata.resourceVersion}",
    ])
    .unwrap();
    let (kubeconfig, watch_path) = (
        api.admin_kubeconfig(),
        format!("/api/v1/namespaces/e2e/configmaps?watch=1&resourceVersion={rv}&timeoutSeconds=20"),
    );
    let watching = tokio::task::spawn_blocking(move || {
        kmetal_testkit::kube::kubectl(&kubeconfig, &["get", "--raw", &watch_path])
    });
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let served = served.restart(open().await, addr).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match k(&[
            "create",
            "configmap",
            "after-restart",
            "-n",
            "e2e",
            "--from-literal=v=1",
        ]) {
            Ok(_) => break,
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => panic!("{backend}: the apiserver did not recover after the restart: {e}"),
        }
    }
    let events = watching.await.unwrap().unwrap();
    assert!(
        events
            .lines()
            .any(|l| l.starts_with("{\"type\":\"ADDED\"")
                && l.contains("\"name\":\"after-restart\"")),
        "{backend}: the watch opened before the restart saw the ConfigMap created after it"
    );
    let all = k(&["get", "cm", "-n", "e2e", "--chunk-size=500", "-o", "name"]).unwrap();
    assert_eq!(
        names(&all, "configmap/cm-"),
        CONFIGMAPS,
        "{backend}: nothing lost"
    );
    assert!(api.log_tail(500).lines().all(|l| !l.contains("panic")));
    drop(served);
}

/// The memory driver behind the gateway (the restarted gateway serves the same store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_scenarios_on_memory() {
    let store: Arc<dyn Datastore> = Arc::new(kmetal_datastore::MemoryStore::new());
    scenarios("memory", || {
        let store = store.clone();
        async move { store }
    })
    .await;
}

/// The SQLite log behind the gateway (the restarted gateway opens the file again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_scenarios_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    scenarios("SQLite", || {
        let path = path.clone();
        async move {
            let store = SqliteStore::open(SqliteConfig::new(path)).await.unwrap();
            Arc::new(store) as Arc<dyn Datastore>
        }
    })
    .await;
}

/// The PostgreSQL log behind the gateway (the restarted gateway connects again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_scenarios_on_postgres() {
    let pg = PostgresServer::start(PostgresOptions {
        fsync: false,
        ..PostgresOptions::default()
    })
    .unwrap();
    pg.create_database("e2e").await.unwrap();
    let url = pg.conninfo("e2e");
    scenarios("PostgreSQL", || {
        let url = url.clone();
        async move {
            let store = PgStore::connect(PgConfig::new(url)).await.unwrap();
            Arc::new(store) as Arc<dyn Datastore>
        }
    })
    .await;
}
