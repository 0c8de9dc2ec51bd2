//! kubectl against a real kube-apiserver on kmetal's gateway, per backend (memory, SQLite,
//! PostgreSQL): 2,000 ConfigMaps and a CRD with 1,000 custom resources listed in chunks of
//! 500, label and field selectors, a stale update refused with 409, and a raw watch from a
//! resourceVersion that sees every change in order.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::sync::Arc;

use kmetal_datastore::Datastore;
use kmetal_datastore::gateway::Gateway;
use kmetal_datastore::postgres::{PgConfig, PgStore};
use kmetal_datastore::sqlite::{SqliteConfig, SqliteStore};
use kmetal_testkit::kube::{ApiserverOptions, KubeError};
use kmetal_testkit::{KubeApiserver, PostgresOptions, PostgresServer};

const CONFIGMAPS: usize = 2000;
const WIDGETS: usize = 1000;

/// Serves `store` on a loopback port; the gateway stops with the runtime.
async fn serve(store: Arc<dyn Datastore>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(Gateway::new(store).serve_on(listener, None, std::future::pending()));
    endpoint
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

async fn scenarios(backend: &str, endpoint: String) {
    let api = KubeApiserver::start(ApiserverOptions::new([endpoint]))
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
    assert!(api.log_tail(500).lines().all(|l| !l.contains("panic")));
}

/// The memory driver behind the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_scenarios_on_memory() {
    let store = Arc::new(kmetal_datastore::MemoryStore::new());
    scenarios("memory", serve(store).await).await;
}

/// The SQLite log behind the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_scenarios_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(SqliteConfig::new(dir.path().join("t.db")))
        .await
        .unwrap();
    scenarios("SQLite", serve(Arc::new(store)).await).await;
}

/// The PostgreSQL log behind the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_scenarios_on_postgres() {
    let pg = PostgresServer::start(PostgresOptions {
        fsync: false,
        ..PostgresOptions::default()
    })
    .unwrap();
    pg.create_database("e2e").await.unwrap();
    let store = PgStore::connect(PgConfig::new(pg.conninfo("e2e")))
        .await
        .unwrap();
    scenarios("PostgreSQL", serve(Arc::new(store)).await).await;
}
