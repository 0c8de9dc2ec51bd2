//! First proof that each harness of the real peers is real: a kube-apiserver on etcd 3.6 and
//! on kine (SQLite, PostgreSQL) answers kubectl with the namespaces it creates at start-up, a
//! kube-controller-manager and kube-scheduler from the same bundle elect leaders, a 3-member
//! etcd 3.6 cluster elects a new leader when its leader dies, and a real konnectivity-agent
//! connects to a real konnectivity-server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use kmetal_testkit::konnectivity::{AgentOptions, LinkTls, ServerOptions};
use kmetal_testkit::kube::{ApiserverOptions, Controller, SYSTEM_NAMESPACES};
use kmetal_testkit::{
    EtcdCluster, EtcdOptions, EtcdRelease, Kine, KineBackend, KonnectivityAgent,
    KonnectivityServer, KubeApiserver, KubeController, PostgresOptions, PostgresServer,
};

/// A kube-apiserver on a real etcd 3.6 answers `kubectl get ns` with the system namespaces;
/// the controller-manager and scheduler from the same bundle take their leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_on_etcd_3_6_answers_kubectl() {
    let etcd = EtcdCluster::start(EtcdOptions {
        release: EtcdRelease::V36,
        ..EtcdOptions::default()
    })
    .await
    .unwrap();
    let mut status = etcd.client().await.unwrap();
    let version = status.status().await.unwrap().version().to_owned();
    assert!(version.starts_with("3.6."), "etcd reports {version}");
    let api = KubeApiserver::start(ApiserverOptions::new(etcd.endpoints()))
        .await
        .unwrap();
    assert_eq!(api.system_namespaces().await.unwrap(), SYSTEM_NAMESPACES);
    let version = api.kubectl(&["version", "-o", "json"]).unwrap();
    assert!(version.contains(r#""gitVersion": "v1.34."#), "{version}");

    for kind in [Controller::ControllerManager, Controller::Scheduler] {
        let mut controller = KubeController::start(kind, &api, &[]).await.unwrap();
        let holder = lease_holder(&api, kind.lease()).await;
        assert!(
            holder.is_some(),
            "{} holds no lease; its log:\n{}",
            kind.lease(),
            controller.log_tail(20)
        );
        assert!(controller.is_running());
    }
}

/// The holder of the Lease `name` in kube-system, once there is one (leader election takes
/// a few seconds after /healthz).
async fn lease_holder(api: &KubeApiserver, name: &str) -> Option<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = api.kubectl(&[
            "get",
            "lease",
            "-n",
            "kube-system",
            name,
            "-o",
            "jsonpath={.spec.holderIdentity}",
            "--ignore-not-found",
        ]);
        if let Ok(holder) = out
            && !holder.trim().is_empty()
        {
            return Some(holder.trim().to_owned());
        }
        if tokio::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A kube-apiserver on the real kine over SQLite answers `kubectl get ns`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_on_kine_sqlite_answers_kubectl() {
    let kine = Kine::start(KineBackend::Sqlite).await.unwrap();
    let api = KubeApiserver::start(ApiserverOptions::new([kine.endpoint()]))
        .await
        .unwrap();
    assert_eq!(api.system_namespaces().await.unwrap(), SYSTEM_NAMESPACES);
}

/// A kube-apiserver on the real kine over PostgreSQL 15 answers `kubectl get ns`, and kine
/// keeps its log in the database it created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_on_kine_postgres_answers_kubectl() {
    let pg = PostgresServer::start(PostgresOptions {
        fsync: false,
        ..PostgresOptions::default()
    })
    .unwrap();
    let kine = Kine::start(KineBackend::Postgres(pg.url("kine")))
        .await
        .unwrap();
    let api = KubeApiserver::start(ApiserverOptions::new([kine.endpoint()]))
        .await
        .unwrap();
    assert_eq!(api.system_namespaces().await.unwrap(), SYSTEM_NAMESPACES);
    let (client, conn) = tokio_postgres::connect(&pg.conninfo("kine"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT count(*) FROM kine WHERE name = '/registry/namespaces/kube-system'",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, i64>(0) >= 1, "kine's table holds kube-system");
}

/// A 3-member etcd 3.6 cluster: every member reports 3.6, and when the leader is killed the
/// other two elect a new one and keep serving writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_3_6_cluster_survives_its_leader() {
    let mut etcd = EtcdCluster::start(EtcdOptions {
        release: EtcdRelease::V36,
        members: 3,
        ..EtcdOptions::default()
    })
    .await
    .unwrap();
    for i in 0..3 {
        let mut c = etcd.member_client(i).await.unwrap();
        let version = c.status().await.unwrap().version().to_owned();
        assert!(version.starts_with("3.6."), "member {i} reports {version}");
    }
    let leader = etcd.leader().await.unwrap();
    etcd.kill(leader).unwrap();
    let next = etcd.wait_for_leader(Duration::from_secs(20)).await.unwrap();
    assert_ne!(next, leader);
    let mut c = etcd.member_client(next).await.unwrap();
    c.put("after-failover", "ok", None).await.unwrap();
    let got = c.get("after-failover", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"ok");
}

/// A real konnectivity-agent connects over mTLS to a real konnectivity-server in gRPC mode:
/// the agent says it is connected and the server counts one ready backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_agent_connects_to_real_server() {
    let tls = LinkTls::generate().unwrap();
    let server = KonnectivityServer::start(ServerOptions::grpc_uds(&tls))
        .await
        .unwrap();
    assert!(!server.has_agent().await.unwrap(), "no agent yet");
    let mut agent = KonnectivityAgent::start(AgentOptions::to(&server, &tls))
        .await
        .unwrap();
    agent.wait_connected().await.unwrap();
    assert!(server.has_agent().await.unwrap(), "{}", server.log_tail(20));
    let metrics = server.metrics().await.unwrap();
    let ready = metrics
        .lines()
        .find(|l| l.starts_with("konnectivity_network_proxy_server_ready_backend_connections"))
        .unwrap_or_else(|| panic!("no backend gauge in:\n{metrics}"));
    assert!(ready.ends_with(" 1"), "{ready}");
    assert!(server.uds().exists());
}

/// A peer that was never built is a loud error naming the script, not a skip.
#[test]
fn a_missing_peer_names_the_script() {
    let err = kmetal_testkit::process::peer_binary("kube-apiserver-that-does-not-exist")
        .expect_err("no such peer");
    assert!(err.to_string().contains("scripts/peers.sh"), "{err}");
}
