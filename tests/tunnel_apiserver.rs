//! The real kube-apiserver's egress selector reaches a worker's kubelet-like HTTPS endpoint
//! that exists only inside the worker's network namespace: `kubectl get --raw
//! /api/v1/nodes/<node>/proxy/<path>` answers through our tunnel server and our agent, over a
//! unix socket in gRPC mode (Kamaji's setup) and in HTTPConnect mode, and the same through the
//! real konnectivity-server and the real konnectivity-agent (control).

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use kmetal_testkit::konnectivity::{AgentOptions, LinkTls, Mode, ServerOptions};
use kmetal_testkit::kube::{ApiserverOptions, Egress};
use kmetal_testkit::{
    EtcdCluster, EtcdOptions, EtcdRelease, KonnectivityAgent, KonnectivityServer, KubeApiserver,
};

use common::worker::{KUBELET_PORT, NODE, Worker};

/// An api-server on `etcd` whose egress for the cluster goes through `egress`, with a Node
/// object whose kubelet is the worker's endpoint.
async fn apiserver(etcd: &EtcdCluster, egress: Egress, worker: &Worker) -> KubeApiserver {
    let mut o = ApiserverOptions::new(etcd.endpoints());
    o.egress = Some(egress);
    let api = KubeApiserver::start(o).await.expect("kube-apiserver");
    let node = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE},
    });
    let file = api.dir().join("node.json");
    std::fs::write(&file, node.to_string()).expect("node");
    // Every api-server of a test shares the etcd, so the second one finds the Node.
    let _ = api.kubectl(&["create", "-f", &file.display().to_string()]);
    let status = serde_json::json!({"status": {
        "addresses": [{"type": "InternalIP", "address": worker.address.to_string()}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": KUBELET_PORT}},
    }});
    api.kubectl(&[
        "patch",
        "node",
        NODE,
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ])
    .expect("node status");
    api
}

/// `kubectl get --raw` of the worker's page through the node proxy, retried while the agent
/// connects; returns the body.
async fn page_through_node_proxy(api: &KubeApiserver, worker: &Worker) -> String {
    let path = format!("/api/v1/nodes/{NODE}/proxy/page.txt");
    let mut last = String::new();
    for _ in 0..100 {
        match api.kubectl(&["get", "--raw", &path]) {
            Ok(body) if body.contains(&worker.token) => return body,
            Ok(body) => last = body,
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    panic!(
        "no page through the node proxy: {last}\napi-server log:\n{}",
        api.log_tail(20)
    );
}

async fn etcd() -> EtcdCluster {
    EtcdCluster::start(EtcdOptions {
        release: EtcdRelease::V36,
        ..EtcdOptions::default()
    })
    .await
    .expect("etcd 3.6")
}

/// Our tunnel server (the `tunnel` example) on the host, with the gRPC and unix CONNECT
/// frontends, and our agent in the worker's namespace.
struct OurTunnel {
    _children: Vec<KillOnDrop>,
    grpc: PathBuf,
    connect: PathBuf,
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl OurTunnel {
    fn start(worker: &Worker) -> OurTunnel {
        let pki = worker.dir.path().join("tunnel");
        worker.tunnel_bundle().write_dir(&pki).expect("pki");
        let grpc = worker.dir.path().join("grpc.sock");
        let connect = worker.dir.path().join("connect.sock");
        let mut server = common::example("tunnel")
            .args(["server", "--server-id", "s0"])
            .arg("--agent-listen")
            .arg(format!("{}:0", worker.netns.host_ip()))
            .arg("--connect-listen")
            .arg(format!("unix://{}", connect.display()))
            .arg("--grpc-uds")
            .arg(&grpc)
            .arg("--pki")
            .arg(&pki)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("tunnel server");
        let found = common::lines_with(&mut server, &["listening agents=https://"]);
        let server = KillOnDrop(server);
        let agent = worker
            .netns
            .command(common::example("tunnel").get_program())
            .args(["agent", "--server", &found[0], "--identity"])
            .arg(format!("host={NODE}"))
            .arg("--pki")
            .arg(&pki)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tunnel agent");
        OurTunnel {
            _children: vec![KillOnDrop(agent), server],
            grpc,
            connect,
        }
    }
}

/// The real pair: konnectivity-server on the host's veth address, konnectivity-agent in the
/// worker's namespace.
async fn real_pair(worker: &Worker, mode: Mode) -> (KonnectivityServer, KonnectivityAgent) {
    let tls = LinkTls::from_bundle(&worker.tunnel_bundle()).expect("link certificates");
    let mut o = ServerOptions::grpc_uds(&tls);
    o.mode = mode;
    o.agent_bind = worker.netns.host_ip();
    let server = KonnectivityServer::start(o)
        .await
        .expect("konnectivity-server");
    let mut a = AgentOptions::to(&server, &tls);
    a.netns = Some(worker.netns.name().into());
    a.local_address = worker.netns.ns_ip();
    a.identifiers = Some(format!("host={NODE}"));
    let mut agent = KonnectivityAgent::start(a)
        .await
        .expect("konnectivity-agent");
    agent
        .wait_connected()
        .await
        .expect("the real agent connects");
    (server, agent)
}

/// Through our server and agent: the api-server's gRPC egress on a unix socket (Kamaji's
/// mode) and its HTTPConnect egress both reach the namespace-only kubelet endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_proxy_reaches_the_worker_through_our_tunnel() {
    let worker = Worker::start().await;
    worker.assert_unreachable_from_host();
    let tunnel = OurTunnel::start(&worker);
    let etcd = etcd().await;
    let grpc = apiserver(&etcd, Egress::GrpcUds(tunnel.grpc.clone()), &worker).await;
    let connect = apiserver(
        &etcd,
        Egress::HttpConnectUds(tunnel.connect.clone()),
        &worker,
    )
    .await;
    for api in [&grpc, &connect] {
        let body = page_through_node_proxy(api, &worker).await;
        assert_eq!(body.trim(), worker.token);
    }
}

/// Control: the same requests through the real konnectivity-server and agent, in gRPC and in
/// HTTP CONNECT mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_proxy_reaches_the_worker_through_the_real_konnectivity() {
    let worker = Worker::start().await;
    worker.assert_unreachable_from_host();
    let etcd = etcd().await;
    let (grpc_server, _grpc_agent) = real_pair(&worker, Mode::Grpc).await;
    let (connect_server, _connect_agent) = real_pair(&worker, Mode::HttpConnect).await;
    let grpc = apiserver(&etcd, Egress::GrpcUds(grpc_server.uds().into()), &worker).await;
    let connect = apiserver(
        &etcd,
        Egress::HttpConnectUds(connect_server.uds().into()),
        &worker,
    )
    .await;
    for api in [&grpc, &connect] {
        let body = page_through_node_proxy(api, &worker).await;
        assert_eq!(body.trim(), worker.token);
    }
}
