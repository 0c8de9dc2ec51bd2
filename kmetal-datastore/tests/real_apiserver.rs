//! A real kube-apiserver (built by scripts/peers.sh) on kmetal's etcd v3 gateway over SQLite:
//! it starts, creates its system namespaces, and kubectl reads and writes through it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use kmetal_datastore::Datastore;
use kmetal_datastore::gateway::Gateway;
use kmetal_datastore::model::RangeRequest;
use kmetal_datastore::sqlite::{SqliteConfig, SqliteStore};
use kmetal_testkit::KubeApiserver;
use kmetal_testkit::kube::{ApiserverOptions, SYSTEM_NAMESPACES};

/// kube-apiserver on the gateway over SQLite: `kubectl get ns` lists the system namespaces, a
/// ConfigMap written through kubectl lands in the SQLite log under /registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_on_gateway_over_sqlite_answers_kubectl() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SqliteStore::open(SqliteConfig::new(dir.path().join("tenant.db")))
            .await
            .unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(Gateway::new(store.clone()).serve_on(listener, None, std::future::pending()));

    let api = KubeApiserver::start(ApiserverOptions::new([endpoint]))
        .await
        .unwrap();
    assert_eq!(api.system_namespaces().await.unwrap(), SYSTEM_NAMESPACES);

    api.kubectl(&[
        "create",
        "configmap",
        "probe",
        "-n",
        "default",
        "--from-literal=k=v",
    ])
    .unwrap();
    let value = api
        .kubectl(&[
            "get",
            "configmap",
            "probe",
            "-n",
            "default",
            "-o",
            "jsonpath={.data.k}",
        ])
        .unwrap();
    assert_eq!(value, "v");
    let stored = store
        .range(RangeRequest::get("/registry/configmaps/default/probe"))
        .await
        .unwrap();
    assert_eq!(stored.count, 1, "the ConfigMap is in the SQLite log");
    assert!(api.log_tail(200).lines().all(|l| !l.contains("panic")));
}
