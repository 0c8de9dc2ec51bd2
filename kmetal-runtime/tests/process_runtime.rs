//! The process runtime against the real control plane (kube-apiserver, kube-controller-manager,
//! kube-scheduler from `scripts/peers.sh`) on a real etcd: Ready only when the tenant answers,
//! a killed replica turns it NotReady naming the replica and Ready again after the restart,
//! a version without binaries is refused, removal leaves nothing running.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use kmetal_core::TenantControlPlane;
use kmetal_pki::{Bundle, PkiSpec};
use kmetal_runtime::layout::ReplicaId;
use kmetal_runtime::{
    Catalog, Component, ControlPlanePlan, ControlPlaneRuntime, ControlPlaneStatus, EtcdClient,
    EtcdTls, ProcessRuntime, ProcessRuntimeConfig, ReplicaState, RuntimeError,
};
use kmetal_testkit::ports::free_port;
use kmetal_testkit::{EtcdCluster, EtcdOptions};

fn catalog() -> Catalog {
    let catalog = Catalog::discover([kmetal_testkit::process::peers_dir()]).expect("catalog");
    assert!(
        catalog.newest().is_some(),
        "no kube-apiserver in {}: run scripts/peers.sh",
        kmetal_testkit::process::peers_dir().display()
    );
    catalog
}

/// A tenant on its own loopback address, `replicas` api-servers, the given version.
fn tenant(name: &str, ip: Ipv4Addr, port: u16, replicas: i64, version: &str) -> TenantControlPlane {
    let mut tcp = TenantControlPlane::named(name, Some("tenants"));
    tcp.spec.kubernetes.version = Some(version.into());
    tcp.spec.control_plane.deployment.replicas = Some(replicas);
    tcp.spec.network_profile.address = Some(ip.to_string());
    tcp.spec.network_profile.port = Some(i64::from(port));
    tcp
}

fn plan(tcp: &TenantControlPlane, etcd: &EtcdCluster) -> ControlPlanePlan {
    let bundle = Bundle::generate(&PkiSpec::from_tenant(tcp).expect("spec")).expect("bundle");
    let etcd = EtcdClient {
        servers: etcd.endpoints(),
        tls: EtcdTls::None,
        prefix: Some(format!(
            "/{}",
            tcp.metadata.name.as_deref().unwrap_or_default()
        )),
    };
    ControlPlanePlan::from_tenant(tcp, bundle, etcd, None).expect("plan")
}

/// Calls `ensure` until `done` holds for the status, at most `timeout`.
async fn ensure_until(
    rt: &ProcessRuntime,
    plan: &ControlPlanePlan,
    timeout: Duration,
    done: impl Fn(&ControlPlaneStatus) -> bool,
) -> ControlPlaneStatus {
    let end = Instant::now() + timeout;
    loop {
        let status = rt.ensure(plan).await.expect("ensure");
        if done(&status) {
            return status;
        }
        assert!(
            Instant::now() < end,
            "not there after {timeout:?}: {:#?}",
            status.problems()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn kubectl(dir: &Path, args: &[&str]) -> Result<String, kmetal_testkit::kube::KubeError> {
    kmetal_testkit::kube::kubectl(&dir.join("admin.conf"), args)
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

/// Two replicas serve kubectl through the tenant's address; killing one turns the tenant not
/// ready naming it while the other keeps serving; it comes back; removal stops everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_serve_kubectl_and_a_killed_one_comes_back() {
    let etcd = EtcdCluster::start(EtcdOptions::default())
        .await
        .expect("etcd");
    let state = tempfile::tempdir().expect("tempdir");
    let rt = ProcessRuntime::new(ProcessRuntimeConfig::new(state.path(), catalog()));
    let version = catalog().newest().expect("version").to_string();
    let ip = Ipv4Addr::new(127, 0, 83, 1);
    let tcp = tenant("alpha", ip, free_port().expect("port"), 2, &version);
    let plan = plan(&tcp, &etcd);
    let mut changes = rt.changes();

    let ready = ensure_until(&rt, &plan, Duration::from_secs(120), |s| s.is_ready()).await;
    assert_eq!(ready.endpoint, plan.endpoint);
    assert_eq!(ready.replicas.len(), 6, "{ready:#?}");
    assert!(ready.leases.iter().all(|(_, h)| h.is_some()), "{ready:#?}");
    let dir = rt.tenant_dir(&plan.tenant);
    let ns = kubectl(&dir, &["get", "ns", "-o", "name"]).expect("kubectl");
    assert!(ns.contains("namespace/kube-system"), "{ns}");
    let kubeconfig = std::fs::read_to_string(dir.join("admin.conf")).expect("admin.conf");
    assert!(kubeconfig.contains(&format!("https://{}", plan.endpoint)));

    let victim = ReplicaId {
        component: Component::ApiServer,
        index: 1,
    };
    let pid = rt.kill_replica(&plan.tenant, victim).await.expect("killed");
    let down = ensure_until(&rt, &plan, Duration::from_secs(30), |s| !s.is_ready()).await;
    let problems = down.problems().join("\n");
    assert!(problems.starts_with("kube-apiserver-1: "), "{problems}");
    // The other replica serves through the tenant's address meanwhile.
    kubectl(&dir, &["get", "ns", "default"]).expect("served by replica 0");
    assert!(
        tokio::time::timeout(Duration::from_secs(5), changes.recv())
            .await
            .is_ok(),
        "the runtime announced the change"
    );
    let back = ensure_until(&rt, &plan, Duration::from_secs(120), |s| s.is_ready()).await;
    let replica = back
        .replicas
        .iter()
        .find(|r| r.replica == victim)
        .expect("replica");
    assert!(
        replica.restarts >= 1 && replica.pid != Some(pid),
        "{replica:?}"
    );
    assert!(matches!(replica.state, ReplicaState::Ready));

    let pids: Vec<u32> = back.replicas.iter().filter_map(|r| r.pid).collect();
    rt.remove(&plan.tenant).await;
    assert!(pids.iter().all(|p| !alive(*p)), "every process stopped");
    assert!(!dir.exists(), "files removed");
    std::net::TcpListener::bind(plan.endpoint).expect("the tenant's address is free again");
}

/// Renewed certificates reach the running processes: the replicas restart one at a time and
/// kubectl, looping through the tenant's address, never fails meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_bundle_rolls_the_replicas_while_served() {
    let etcd = EtcdCluster::start(EtcdOptions::default())
        .await
        .expect("etcd");
    let state = tempfile::tempdir().expect("tempdir");
    let rt = ProcessRuntime::new(ProcessRuntimeConfig::new(state.path(), catalog()));
    let version = catalog().newest().expect("version").to_string();
    let tcp = tenant(
        "roll",
        Ipv4Addr::new(127, 0, 83, 3),
        free_port().expect("port"),
        2,
        &version,
    );
    let mut plan = plan(&tcp, &etcd);
    let ready = ensure_until(&rt, &plan, Duration::from_secs(120), |s| s.is_ready()).await;
    let before: Vec<Option<u32>> = ready.replicas.iter().map(|r| r.pid).collect();
    let dir = rt.tenant_dir(&plan.tenant);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let looper = {
        let (stop, dir) = (stop.clone(), dir.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failures) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match kubectl(&dir, &["get", "ns", "default", "-o", "name"]) {
                    Ok(_) => ok += 1,
                    Err(e) => failures.push(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (ok, failures)
        })
    };
    let mut renewed = plan.bundle.clone();
    renewed
        .renew_all(std::time::SystemTime::now())
        .expect("renew");
    plan.bundle = renewed;
    let rolled = ensure_until(&rt, &plan, Duration::from_secs(300), |s| {
        s.is_ready()
            && s.replicas
                .iter()
                .zip(&before)
                .all(|(r, old)| r.pid.is_some() && r.pid != *old)
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failures) = looper.join().expect("looper");
    assert!(ok > 10, "kubectl ran {ok} times");
    assert!(
        failures.is_empty(),
        "{} failed of {}: {failures:#?}",
        failures.len(),
        ok as usize + failures.len()
    );
    let served = std::fs::read_to_string(dir.join("pki/apiserver.crt")).expect("cert");
    assert_eq!(Some(served.as_str()), plan.bundle.get("pki/apiserver.crt"));
    // Replaced, not restarted: new processes count their restarts from zero, as new pods do.
    assert!(
        rolled.replicas.iter().all(|r| r.restarts == 0),
        "{rolled:#?}"
    );
    rt.shutdown().await;
}

/// With room for one booting tenant, a second waits its turn (nothing of it runs, its status
/// says where it is), is told when the first is ready, then boots; a removed tenant leaves
/// the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_tenant_waits_its_turn_to_boot() {
    let etcd = EtcdCluster::start(EtcdOptions::default())
        .await
        .expect("etcd");
    let state = tempfile::tempdir().expect("tempdir");
    let mut config = ProcessRuntimeConfig::new(state.path(), catalog());
    config.boot_limit = 1;
    let rt = ProcessRuntime::new(config);
    let version = catalog().newest().expect("version").to_string();
    let tenants: Vec<ControlPlanePlan> = ["first", "second", "third"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let ip = Ipv4Addr::new(127, 0, 83, 10 + i as u8);
            plan(
                &tenant(name, ip, free_port().expect("port"), 1, &version),
                &etcd,
            )
        })
        .collect();
    let [first, second, third] = &tenants[..] else {
        unreachable!()
    };
    let mut changes = rt.changes();

    let booting = rt.ensure(first).await.expect("first");
    assert!(booting.queued.is_none(), "{booting:#?}");
    assert_eq!(booting.replicas.len(), 3);
    let waiting = rt.ensure(second).await.expect("second");
    let q = waiting.queued.expect("second is queued");
    assert_eq!((q.ahead, q.booting, q.limit), (0, 1, 1));
    assert!(waiting.replicas.is_empty(), "{waiting:#?}");
    assert_eq!(
        waiting.problems(),
        ["queued to start: 0 tenant(s) ahead, 1 of 1 booting"]
    );
    assert!(
        !rt.tenant_dir(&second.tenant).exists(),
        "nothing of it runs"
    );
    std::net::TcpListener::bind(second.endpoint).expect("its address is free");
    let behind = rt.ensure(third).await.expect("third");
    assert_eq!(behind.queued.map(|q| q.ahead), Some(1));
    rt.remove(&third.tenant).await;
    assert_eq!(rt.gate().waiting(), 1, "the removed tenant left the queue");

    ensure_until(&rt, first, Duration::from_secs(120), |s| {
        s.replicas
            .iter()
            .all(|r| matches!(r.state, ReplicaState::Ready))
    })
    .await;
    // Its place is free: the runtime tells the next in line.
    let told = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match changes.recv().await {
                Ok(t) if t == second.tenant => return,
                Ok(_) => continue,
                Err(e) => panic!("changes: {e}"),
            }
        }
    })
    .await;
    assert!(told.is_ok(), "the second tenant was not told its turn came");
    let started = rt.ensure(second).await.expect("second");
    assert!(started.queued.is_none(), "{started:#?}");
    assert_eq!(rt.gate().booting(), 1);
    ensure_until(&rt, second, Duration::from_secs(120), |s| s.is_ready()).await;
    let dir = rt.tenant_dir(&second.tenant);
    kubectl(&dir, &["get", "ns", "default"]).expect("the second tenant answers");
    rt.shutdown().await;
}

/// A version the runtime has no binaries for is refused with the versions it has, and
/// nothing starts.
#[tokio::test]
async fn a_version_without_binaries_is_refused() {
    let etcd = EtcdCluster::start(EtcdOptions::default())
        .await
        .expect("etcd");
    let state = tempfile::tempdir().expect("tempdir");
    let catalog = catalog();
    let have = catalog.versions();
    let rt = ProcessRuntime::new(ProcessRuntimeConfig::new(state.path(), catalog));
    let addr: SocketAddr = (Ipv4Addr::new(127, 0, 83, 2), free_port().expect("port")).into();
    let tcp = tenant(
        "old",
        Ipv4Addr::new(127, 0, 83, 2),
        addr.port(),
        1,
        "v1.29.3",
    );
    let e = rt.ensure(&plan(&tcp, &etcd)).await.expect_err("refused");
    assert!(matches!(e, RuntimeError::Catalog(_)), "{e:?}");
    let have: Vec<String> = have.iter().map(ToString::to_string).collect();
    assert_eq!(
        e.to_string(),
        format!(
            "no kube-apiserver binary for v1.29.3; available: {}",
            have.join(", ")
        )
    );
    assert!(rt.status(&plan(&tcp, &etcd).tenant).await.is_none());
    std::net::TcpListener::bind(addr).expect("nothing listens");
}
