//! The operator runs real tenant control planes (kube-apiserver, kube-controller-manager,
//! kube-scheduler from `scripts/peers.sh`): Ready means kubectl works with the tenant's
//! admin.conf; the controllers do their work; a killed replica turns the tenant NotReady
//! naming it; a version without binaries is a condition; deletion and shutdown leave nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::operator::{Op, apply, condition, operator, ready, tenant, wait_until};
use kmetal_testkit::kube::{KubeError, kubectl};
use kmetal_testkit::ports::free_port;
use serde_json::Value;

/// The Kubernetes version `scripts/peers.sh` builds (what `kube-apiserver --version` says).
fn pinned_version() -> String {
    let bin = kmetal_testkit::process::peer_binary("kube-apiserver").expect("kube-apiserver");
    let out = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .expect("--version");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .expect("Kubernetes vX.Y.Z")
        .to_string()
}

fn tenant_yaml(name: &str, address: &str, port: u16, replicas: u32, version: &str) -> String {
    tenant_yaml_with(name, address, port, replicas, version, "{}")
}

fn tenant_yaml_with(
    name: &str,
    address: &str,
    port: u16,
    replicas: u32,
    version: &str,
    annotations: &str,
) -> String {
    format!(
        r#"
apiVersion: kamaji.clastix.io/v1alpha1
kind: TenantControlPlane
metadata: {{name: {name}, namespace: tenants, annotations: {annotations}}}
spec:
  dataStore: embedded
  controlPlane: {{deployment: {{replicas: {replicas}}}, service: {{serviceType: ClusterIP}}}}
  kubernetes: {{version: {version}}}
  networkProfile: {{address: {address}, port: {port}}}
"#
    )
}

struct Env {
    dir: tempfile::TempDir,
    state: String,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = format!("sqlite://{}/management.db", dir.path().display());
        let slices = dir.path().join("slices");
        let env = Self { dir, state };
        let ds = format!(
            "apiVersion: kamaji.clastix.io/v1alpha1\nkind: DataStore\nmetadata: {{name: embedded}}\n\
             spec: {{driver: SQLite, endpoints: [\"{}\"]}}\n",
            slices.display()
        );
        apply(&env.state, env.dir.path(), "ds.yaml", &ds);
        env
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn run(&self) -> Op {
        self.run_with(&[])
    }

    fn run_with(&self, args: &[&str]) -> Op {
        let log = std::fs::File::create(self.path("operator.log")).expect("log");
        let child = operator(&self.state, &["run"])
            .args(args)
            .arg("--state-dir")
            .arg(self.path("state"))
            .arg("--out")
            .arg(self.path("out"))
            .env("KMETAL_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("run");
        Op(child)
    }

    fn kubectl(&self, tenant: &str, args: &[&str]) -> Result<String, KubeError> {
        kubectl(&self.admin_conf(tenant), args)
    }

    fn admin_conf(&self, tenant: &str) -> PathBuf {
        self.path(&format!("out/{tenant}/admin.conf"))
    }

    /// The tenant's runtime folder (`run/<replica>.pid`, `logs/`).
    fn runtime_dir(&self, tenant: &str) -> PathBuf {
        self.path(&format!("state/control-planes/tenants/{tenant}"))
    }

    fn pid(&self, tenant: &str, replica: &str) -> Option<u32> {
        std::fs::read_to_string(self.runtime_dir(tenant).join(format!("run/{replica}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn pids(&self, tenant: &str) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir(self.runtime_dir(tenant).join("run")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
            .collect()
    }

    /// The last lines of every component's log, for failure messages.
    fn logs(&self, tenant: &str) -> String {
        let mut out = format!("operator:\n{}\n", tail(&self.path("operator.log"), 20));
        let dir = self.runtime_dir(tenant).join("logs");
        let mut logs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        logs.sort();
        for log in logs {
            out.push_str(&format!("{}:\n{}\n", log.display(), tail(&log, 15)));
        }
        out
    }

    /// Deletes the tenant and waits until it is finalized, its processes are gone and its
    /// runtime folder is removed.
    fn delete_and_wait_gone(&self, name: &str, pids: &[u32]) {
        let out = operator(
            &self.state,
            &["delete", &format!("tcp/{name}"), "-n", "tenants"],
        )
        .output()
        .expect("delete");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            wait_until(Duration::from_secs(60), || tenant(&self.state, name)
                .is_none()),
            "{name} not finalized"
        );
        assert!(wait_gone(pids), "{name}'s processes still run");
        assert!(!self.runtime_dir(name).exists(), "{name}'s files removed");
    }

    fn tenant(&self, name: &str) -> Value {
        tenant(&self.state, name).unwrap_or(Value::Null)
    }

    fn wait_ready(&self, name: &str, timeout: Duration) {
        let ok = wait_until(timeout, || ready(&self.tenant(name)));
        assert!(
            ok,
            "{name} not Ready after {timeout:?}: {:#}\noperator log tail:\n{}",
            self.tenant(name)["status"],
            tail(&self.path("operator.log"), 30)
        );
    }
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

fn wait_gone(pids: &[u32]) -> bool {
    wait_until(Duration::from_secs(30), || pids.iter().all(|p| !alive(*p)))
}

/// Two tenants with real control planes: each one's admin.conf reaches its own cluster and
/// is refused by the other's; controller-manager and scheduler do their work; a killed
/// api-server replica turns the tenant NotReady naming it and Ready again; a version with
/// no binaries is a condition; deletion and operator shutdown stop every process.
#[test]
fn tenants_run_real_control_planes() {
    let env = Env::new();
    let version = pinned_version();
    let (pa, pb) = (free_port().expect("port"), free_port().expect("port"));
    apply(
        &env.state,
        env.dir.path(),
        "a.yaml",
        &tenant_yaml("alpha", "127.0.84.1", pa, 2, &version),
    );
    apply(
        &env.state,
        env.dir.path(),
        "b.yaml",
        &tenant_yaml("beta", "127.0.84.2", pb, 1, &version),
    );
    let started = Instant::now();
    let op = env.run();
    env.wait_ready("alpha", Duration::from_secs(240));
    env.wait_ready("beta", Duration::from_secs(120));
    eprintln!(
        "both tenants Ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Each admin.conf names its tenant's own address and works there.
    let alpha = env.tenant("alpha");
    assert_eq!(
        alpha["status"]["controlPlaneEndpoint"],
        format!("127.0.84.1:{pa}")
    );
    let deployment = &alpha["status"]["kubernetesResources"]["deployment"];
    assert_eq!(deployment["readyReplicas"], 2, "{deployment:#}");
    assert_eq!(deployment["components"].as_array().map(Vec::len), Some(6));
    let ns = env
        .kubectl("alpha", &["get", "ns", "-o", "name"])
        .expect("kubectl");
    assert!(ns.contains("namespace/kube-system"), "{ns}");
    env.kubectl("beta", &["get", "ns", "default"])
        .expect("beta's own cluster");

    // Another tenant's admin.conf is refused by alpha's api-server: its CA does not trust
    // alpha's serving certificate, and alpha does not trust its client certificate.
    let alpha_url = format!("https://127.0.84.1:{pa}");
    let e = env
        .kubectl("beta", &["--server", &alpha_url, "get", "ns"])
        .expect_err("beta's CA must not trust alpha");
    assert!(e.to_string().contains("certificate"), "{e}");
    let e = env
        .kubectl(
            "beta",
            &[
                "--server",
                &alpha_url,
                "--insecure-skip-tls-verify",
                "get",
                "ns",
            ],
        )
        .expect_err("alpha must not accept beta's client certificate");
    assert!(e.to_string().contains("Unauthorized"), "{e}");

    // The controller-manager runs: a namespace gets its default ServiceAccount, a Deployment
    // a ReplicaSet and Pods (Pending: no nodes), and deleting it collects them.
    env.kubectl("alpha", &["create", "namespace", "team"])
        .expect("namespace");
    assert!(
        wait_until(Duration::from_secs(60), || env
            .kubectl("alpha", &["-n", "team", "get", "serviceaccount", "default"])
            .is_ok()),
        "no default ServiceAccount in team"
    );
    env.kubectl(
        "alpha",
        &[
            "-n",
            "team",
            "create",
            "deployment",
            "web",
            "--image=registry.invalid/web",
            "--replicas=2",
        ],
    )
    .expect("deployment");
    let pods = || {
        env.kubectl("alpha", &["-n", "team", "get", "pods", "-o", "name"])
            .unwrap_or_default()
            .lines()
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(60), || pods() == 2),
        "no pods"
    );
    let phases = env
        .kubectl(
            "alpha",
            &[
                "-n",
                "team",
                "get",
                "pods",
                "-o",
                "jsonpath={.items[*].status.phase}",
            ],
        )
        .expect("pods");
    assert_eq!(phases.trim(), "Pending Pending");
    env.kubectl("alpha", &["-n", "team", "delete", "deployment", "web"])
        .expect("delete");
    assert!(
        wait_until(Duration::from_secs(60), || pods() == 0
            && env
                .kubectl("alpha", &["-n", "team", "get", "replicasets", "-o", "name"])
                .is_ok_and(|o| o.trim().is_empty())),
        "garbage collection left the ReplicaSet or its Pods"
    );

    // A replica that dies: NotReady naming it while the other serves, Ready after restart.
    let victim = env.pid("alpha", "kube-apiserver-1").expect("pid");
    let status = std::process::Command::new("kill")
        .args(["-KILL", &victim.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let named = wait_until(Duration::from_secs(30), || {
        let t = env.tenant("alpha");
        condition(&t, "ControlPlaneReady").is_some_and(|c| {
            c["status"] == "False"
                && c["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("kube-apiserver-1"))
        }) && !ready(&t)
    });
    assert!(named, "{:#}", env.tenant("alpha")["status"]);
    env.kubectl("alpha", &["get", "ns", "team"])
        .expect("replica 0 serves meanwhile");
    env.wait_ready("alpha", Duration::from_secs(120));
    assert_ne!(env.pid("alpha", "kube-apiserver-1"), Some(victim));

    // A version without binaries is a condition, not a crash.
    let pc = free_port().expect("port");
    apply(
        &env.state,
        env.dir.path(),
        "c.yaml",
        &tenant_yaml("gamma", "127.0.84.3", pc, 1, "v1.29.3"),
    );
    let refused = wait_until(Duration::from_secs(60), || {
        condition(&env.tenant("gamma"), "ControlPlaneReady")
            .is_some_and(|c| c["reason"] == "VersionUnavailable")
    });
    let gamma = env.tenant("gamma");
    assert!(refused, "{:#}", gamma["status"]);
    let message = condition(&gamma, "ControlPlaneReady").expect("condition")["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        message,
        format!("no kube-apiserver binary for v1.29.3; available: {version}")
    );
    assert!(!ready(&gamma));

    // Deleting a tenant stops its processes and frees its address and files.
    let alpha_pids = env.pids("alpha");
    assert_eq!(alpha_pids.len(), 6, "{alpha_pids:?}");
    env.delete_and_wait_gone("alpha", &alpha_pids);
    std::net::TcpListener::bind(("127.0.84.1", pa)).expect("alpha's address is free");

    // The operator's shutdown stops the control planes it runs.
    let beta_pids = env.pids("beta");
    assert_eq!(beta_pids.len(), 3, "{beta_pids:?}");
    drop(op);
    assert!(
        wait_gone(&beta_pids),
        "beta's processes outlived the operator"
    );
}

/// Runs kubectl with `conf` every 100 ms until stopped; what failed, and how often it ran.
struct Looper {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(u32, Vec<String>)>,
}

impl Looper {
    fn start(conf: PathBuf) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                match kubectl(&conf, &["get", "ns", "default", "-o", "name"]) {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (ok, failed)
        });
        Self { stop, thread }
    }

    fn finish(self) -> (u32, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("looper")
    }
}

/// CA rotation (prepare → finalize) on a running two-replica tenant while kubectl loops with
/// its admin.conf: no request fails in either phase; every process restarts with the new
/// certificates; the old admin.conf works during the overlap and is refused after finalize.
#[test]
fn ca_rotation_keeps_the_tenant_served() {
    let env = Env::new();
    let version = pinned_version();
    let port = free_port().expect("port");
    let yaml =
        |annotations: &str| tenant_yaml_with("rot", "127.0.84.5", port, 2, &version, annotations);
    apply(&env.state, env.dir.path(), "r.yaml", &yaml("{}"));
    let _op = env.run();
    env.wait_ready("rot", Duration::from_secs(240));
    let old_conf = env.path("old-admin.conf");
    std::fs::copy(env.admin_conf("rot"), &old_conf).expect("old admin.conf");
    let old = kubectl(&old_conf, &["get", "ns", "default"]);
    assert!(old.is_ok(), "{old:?}");
    let looper = Looper::start(env.admin_conf("rot"));

    let apiservers =
        |env: &Env| ["kube-apiserver-0", "kube-apiserver-1"].map(|r| env.pid("rot", r));
    // Rolled: every replica's pid changed and the tenant is Ready again in `phase`.
    let rolled = |env: &Env, before: [Option<u32>; 2], phase: &str| {
        wait_until(Duration::from_secs(300), || {
            let t = env.tenant("rot");
            let now = apiservers(env);
            ready(&t)
                && t["status"]["kubernetesResources"]["version"]["status"] == phase
                && now.iter().zip(&before).all(|(n, b)| n.is_some() && n != b)
        })
    };
    let before = apiservers(&env);
    apply(
        &env.state,
        env.dir.path(),
        "r.yaml",
        &yaml("{kmetal.io/rotate-ca: prepare}"),
    );
    assert!(
        rolled(&env, before, "CertificateAuthorityRotating"),
        "prepare did not roll: {:#}\n{}",
        env.tenant("rot")["status"],
        env.logs("rot")
    );
    let overlap = kubectl(&old_conf, &["get", "ns", "default"]);
    assert!(
        overlap.is_ok(),
        "the old admin.conf works during the overlap: {overlap:?}"
    );

    let before = apiservers(&env);
    apply(
        &env.state,
        env.dir.path(),
        "r.yaml",
        &yaml("{kmetal.io/rotate-ca: finalize}"),
    );
    assert!(
        rolled(&env, before, "Ready"),
        "finalize did not roll: {:#}\n{}",
        env.tenant("rot")["status"],
        env.logs("rot")
    );
    let (ok, failed) = looper.finish();
    assert!(ok > 20, "kubectl ran {ok} times");
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:#?}",
        failed.len(),
        ok as usize + failed.len()
    );
    let refused = kubectl(&old_conf, &["get", "ns", "default"]);
    assert!(
        refused.is_err(),
        "the old admin.conf must be refused after finalize"
    );
    env.kubectl("rot", &["get", "ns", "default"])
        .expect("the new admin.conf works");
}

/// Tenants on PostgreSQL and on shared etcd (RBAC, per-tenant client certificates) run real
/// control planes too: kubectl works with each one's admin.conf and a namespace written
/// through one is not seen by the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_and_shared_etcd_tenants_serve_kubectl() {
    let etcd = kmetal_testkit::EtcdCluster::start(kmetal_testkit::EtcdOptions {
        tls: true,
        ..kmetal_testkit::EtcdOptions::default()
    })
    .await
    .expect("etcd");
    let pg = kmetal_testkit::PostgresServer::start(kmetal_testkit::PostgresOptions::default())
        .expect("postgres");
    let env = Env::new();
    let version = pinned_version();
    let dir = env.dir.path();
    apply(
        &env.state,
        dir,
        "etcd.yaml",
        &kmetal_testkit::manifests::etcd_datastore(&etcd).expect("a TLS cluster"),
    );
    apply(
        &env.state,
        dir,
        "pg.yaml",
        &kmetal_testkit::manifests::pg_datastore(&pg),
    );
    let with_store = |yaml: String, store: &str| {
        yaml.replace("dataStore: embedded", &format!("dataStore: {store}"))
    };
    let (pe, pp) = (free_port().expect("port"), free_port().expect("port"));
    apply(
        &env.state,
        dir,
        "e.yaml",
        &with_store(
            tenant_yaml("on-etcd", "127.0.84.6", pe, 1, &version),
            "etcd-shared",
        ),
    );
    apply(
        &env.state,
        dir,
        "p.yaml",
        &with_store(
            tenant_yaml("on-pg", "127.0.84.7", pp, 1, &version),
            "postgres-main",
        ),
    );
    let _op = env.run();
    tokio::task::block_in_place(|| {
        env.wait_ready("on-etcd", Duration::from_secs(240));
        env.wait_ready("on-pg", Duration::from_secs(240));
        for (tenant, driver) in [("on-etcd", "etcd"), ("on-pg", "PostgreSQL")] {
            assert_eq!(env.tenant(tenant)["status"]["storage"]["driver"], driver);
            let ns = env
                .kubectl(tenant, &["get", "ns", "-o", "name"])
                .expect("kubectl");
            assert!(ns.contains("namespace/kube-system"), "{tenant}: {ns}");
        }
        env.kubectl("on-etcd", &["create", "namespace", "only-on-etcd"])
            .expect("namespace");
        let other = env.kubectl("on-pg", &["get", "ns", "only-on-etcd"]);
        assert!(
            other.is_err(),
            "a tenant sees another's namespace: {other:?}"
        );
    });
}

/// Pattern C: a worker in its own network namespace runs the kmetal agent, dialing out to
/// its tenant's Konnectivity server, and a kubelet stand-in the host cannot reach; the
/// tenant's real api-server reaches it through the tunnel for `kubectl get --raw
/// /api/v1/nodes/<node>/proxy/<path>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_proxy_reaches_a_worker_through_the_tenants_tunnel() {
    use common::worker::{KUBELET_PORT, NODE, Worker};
    let worker = Worker::start().await;
    worker.assert_unreachable_from_host();
    let host_ip = worker.netns.host_ip();
    let env = Env::new();
    let port = free_port().expect("port");
    let yaml = tenant_yaml("edge", "127.0.84.8", port, 1, &pinned_version()).replace(
        &format!("port: {port}}}"),
        &format!("port: {port}, certSANs: [\"{host_ip}\"]}}"),
    );
    apply(&env.state, env.dir.path(), "edge.yaml", &yaml);
    let _op = env.run_with(&["--konnectivity-listen", &host_ip.to_string()]);
    tokio::task::block_in_place(|| env.wait_ready("edge", Duration::from_secs(240)));
    let konnectivity = condition(&env.tenant("edge"), "KonnectivityReady")
        .and_then(|c| c["message"].as_str())
        .and_then(|m| m.strip_prefix("agents connect to "))
        .expect("the agents' address")
        .to_string();
    let _agent = common::operator::Op(
        worker
            .netns
            .command(common::example("tunnel").get_program())
            .args(["agent", "--server", &konnectivity, "--identity"])
            .arg(format!("host={NODE}"))
            .arg("--pki")
            .arg(env.path("out/edge"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("agent"),
    );
    let node = serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}});
    let file = env.path("node.json");
    std::fs::write(&file, node.to_string()).expect("node");
    env.kubectl("edge", &["create", "-f", &file.display().to_string()])
        .expect("node");
    let status = serde_json::json!({"status": {
        "addresses": [{"type": "InternalIP", "address": worker.address.to_string()}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": KUBELET_PORT}},
    }});
    env.kubectl(
        "edge",
        &[
            "patch",
            "node",
            NODE,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ],
    )
    .expect("node status");
    let path = format!("/api/v1/nodes/{NODE}/proxy/page.txt");
    let mut last = String::new();
    let reached = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(60), || {
            match env.kubectl("edge", &["get", "--raw", &path]) {
                Ok(body) => {
                    last = body.clone();
                    body.trim() == worker.token
                }
                Err(e) => {
                    last = e.to_string();
                    false
                }
            }
        })
    });
    assert!(
        reached,
        "no page through the tunnel: {last}\n{}",
        env.logs("edge")
    );
}

/// With room for one booting tenant, the second waits with a StartQueued condition and then
/// boots; an operator killed outright (SIGKILL: no shutdown) leaves both tenants' processes
/// running; the next operator adopts them at once, past its start gate (same pids, no
/// restart), and they answer again as soon as their addresses are served.
#[test]
fn a_killed_operator_is_succeeded_without_restarting_the_control_plane() {
    let env = Env::new();
    let version = pinned_version();
    for (name, address) in [("kept", "127.0.84.10"), ("later", "127.0.84.11")] {
        let yaml = tenant_yaml(name, address, free_port().expect("port"), 1, &version);
        apply(&env.state, env.dir.path(), &format!("{name}.yaml"), &yaml);
    }
    let first = env.run_with(&["--boot-limit", "1"]);
    let queued = wait_until(Duration::from_secs(60), || {
        ["kept", "later"].iter().any(|n| {
            condition(&env.tenant(n), "ControlPlaneReady")
                .is_some_and(|c| c["reason"] == "StartQueued")
        })
    });
    assert!(
        queued,
        "no tenant waited its turn: {:#}",
        env.tenant("later")["status"]
    );
    env.wait_ready("kept", Duration::from_secs(240));
    env.wait_ready("later", Duration::from_secs(240));
    let pids = env.pids("kept");
    assert_eq!(pids.len(), 3, "{pids:?}");
    let apiservers = ["kept", "later"].map(|n| env.pid(n, "kube-apiserver-0").expect("pid"));
    first.kill();
    assert!(
        pids.iter().all(|p| alive(*p)),
        "the control plane outlives a crashed operator"
    );

    let _second = env.run_with(&["--boot-limit", "1"]);
    for name in ["kept", "later"] {
        let served = wait_until(Duration::from_secs(60), || {
            env.kubectl(name, &["get", "ns", "default"]).is_ok()
        });
        assert!(served, "{}", env.logs(name));
    }
    env.wait_ready("kept", Duration::from_secs(60));
    env.wait_ready("later", Duration::from_secs(60));
    // The controllers may have exited meanwhile by themselves (they do when they cannot
    // renew their Lease while nothing serves the tenant's address); the api-servers did not.
    assert_eq!(
        ["kept", "later"].map(|n| env.pid(n, "kube-apiserver-0")),
        apiservers.map(Some),
        "the api-servers were adopted, not restarted"
    );
}

/// Live migration of a running tenant from SQLite to PostgreSQL while `kubectl get -w`
/// watches: the watch stays open and shows the objects made after the cut-over (revisions
/// are kept, so the api-server's watch cache goes on), and no object is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_tenant_migrates_to_postgres_under_a_watch() {
    let pg = kmetal_testkit::PostgresServer::start(kmetal_testkit::PostgresOptions::default())
        .expect("postgres");
    let env = Env::new();
    apply(
        &env.state,
        env.dir.path(),
        "pg.yaml",
        &kmetal_testkit::manifests::pg_datastore(&pg),
    );
    let port = free_port().expect("port");
    let yaml = tenant_yaml("mover", "127.0.84.9", port, 1, &pinned_version());
    apply(&env.state, env.dir.path(), "m.yaml", &yaml);
    let _op = env.run();
    tokio::task::block_in_place(|| env.wait_ready("mover", Duration::from_secs(240)));
    for i in 0..20 {
        env.kubectl("mover", &["create", "configmap", &format!("before-{i}")])
            .expect("configmap");
    }
    let kubectl_bin = kmetal_testkit::process::peer_binary("kubectl").expect("kubectl");
    let watch_out = env.path("watch.out");
    let mut watch = common::operator::Op(
        std::process::Command::new(&kubectl_bin)
            .arg("--kubeconfig")
            .arg(env.admin_conf("mover"))
            .args(["get", "configmaps", "-w", "-o", "name"])
            .stdout(std::fs::File::create(&watch_out).expect("watch out"))
            .stderr(std::fs::File::create(env.path("watch.err")).expect("watch err"))
            .spawn()
            .expect("kubectl -w"),
    );
    std::thread::sleep(Duration::from_secs(2));

    apply(
        &env.state,
        env.dir.path(),
        "m.yaml",
        &yaml.replace("dataStore: embedded", "dataStore: postgres-main"),
    );
    let moved = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(120), || {
            let t = env.tenant("mover");
            ready(&t) && t["status"]["storage"]["driver"] == "PostgreSQL"
        })
    });
    assert!(
        moved,
        "{:#}\n{}",
        env.tenant("mover")["status"],
        env.logs("mover")
    );
    let after: Vec<String> = (0..5).map(|i| format!("after-{i}")).collect();
    for name in &after {
        env.kubectl("mover", &["create", "configmap", name])
            .expect("configmap after");
    }
    // The watch shows them, or it ended and a fresh list has them at once.
    let watched = wait_until(Duration::from_secs(20), || {
        let seen = std::fs::read_to_string(&watch_out).unwrap_or_default();
        after
            .iter()
            .all(|n| seen.contains(&format!("configmap/{n}")))
    });
    let still_watching = matches!(watch.0.try_wait(), Ok(None));
    eprintln!(
        "after the cut-over: the watch {} and {} the new objects",
        if still_watching {
            "is still open"
        } else {
            "ended"
        },
        if watched { "showed" } else { "did not show" }
    );
    let listed = env
        .kubectl("mover", &["get", "configmaps", "-o", "name"])
        .expect("list");
    for i in 0..20 {
        assert!(
            listed.contains(&format!("configmap/before-{i}")),
            "before-{i} lost: {listed}"
        );
    }
    for n in &after {
        assert!(
            listed.contains(&format!("configmap/{n}")),
            "{n} missing: {listed}"
        );
    }
    // Revisions are kept across the move, so the api-server's watch goes on: no relist.
    assert!(
        watched && still_watching,
        "the watch did not go on after the cut-over:\n{}\nstderr: {}",
        std::fs::read_to_string(&watch_out).unwrap_or_default(),
        std::fs::read_to_string(env.path("watch.err")).unwrap_or_default()
    );
    let _ = watch.0.kill();
}

/// The pid a dedicated etcd member's pid file names.
fn member_pid(env: &Env, tenant: &str, member: &str) -> u32 {
    env.pid(tenant, &format!("etcd-{member}"))
        .unwrap_or_else(|| panic!("no pid for etcd member {member}: {}", env.logs(tenant)))
}

fn sigkill(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -9 {pid}");
}

/// A tenant with a three-member dedicated etcd placed on pattern A's three control-plane
/// nodes: it serves kubectl with its api-server on the members; a killed member is replaced
/// (fresh data dir) while writes go on and nothing written is lost; two killed members turn
/// the tenant NotReady with a quorum-lost condition and Ready again once they are back;
/// deletion stops the members and removes their data.
#[test]
fn a_dedicated_etcd_tenant_replaces_a_member_and_reports_lost_quorum() {
    let env = Env::new();
    let port = free_port().expect("port");
    let yaml = format!(
        r#"
apiVersion: kamaji.clastix.io/v1alpha1
kind: TenantControlPlane
metadata: {{name: solo, namespace: tenants, annotations: {{kmetal.io/dedicated-etcd: "3"}}}}
spec:
  controlPlane: {{deployment: {{replicas: 1}}, service: {{serviceType: ClusterIP}}}}
  kubernetes: {{version: {}}}
  networkProfile: {{address: 127.0.84.30, port: {port}}}
"#,
        pinned_version()
    );
    apply(&env.state, env.dir.path(), "solo.yaml", &yaml);
    let topology = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/topologies/pattern-a.yaml"
    );
    let op = env.run_with(&["--topology", topology]);
    env.wait_ready("solo", Duration::from_secs(240));

    let t = env.tenant("solo");
    let etcd = &t["status"]["storage"]["dedicatedEtcd"];
    assert_eq!(etcd["quorum"], true, "{etcd:#}");
    let members: Vec<(String, String)> = etcd["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or_default().to_owned(),
                m["zone"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let names: Vec<&str> = members.iter().map(|(n, _)| n.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        ["cp-a", "cp-b", "cp-c"],
        "one member per node: {etcd:#}"
    );
    let zones: std::collections::BTreeSet<&str> = members.iter().map(|(_, z)| z.as_str()).collect();
    assert_eq!(zones.len(), 3, "spread over the zones: {etcd:#}");
    // The api-server talks to the three members, not to a gateway.
    let apiserver = env.pid("solo", "kube-apiserver-0").expect("api-server pid");
    let cmdline = std::fs::read_to_string(format!("/proc/{apiserver}/cmdline")).expect("cmdline");
    let servers = cmdline
        .split('\0')
        .find_map(|a| a.strip_prefix("--etcd-servers="))
        .expect("--etcd-servers");
    assert_eq!(servers.split(',').count(), 3, "{servers}");
    for m in etcd["members"].as_array().expect("members") {
        assert!(
            servers.contains(m["clientUrl"].as_str().unwrap_or("?")),
            "{servers}"
        );
    }
    env.kubectl("solo", &["get", "ns", "kube-system"])
        .expect("kubectl");

    // A writer creates ConfigMaps throughout; every one acknowledged must survive.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let conf = env.admin_conf("solo");
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut acked, mut failed) = (Vec::new(), Vec::new());
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let name = format!("w{i:04}");
                match kubectl(&conf, &["create", "configmap", &name, "--from-literal=k=v"]) {
                    Ok(_) => acked.push((Instant::now(), name)),
                    Err(e) => failed.push(e.to_string()),
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            (acked, failed)
        })
    };
    std::thread::sleep(Duration::from_secs(2));

    let victim = names[1].to_owned();
    let old = member_pid(&env, "solo", &victim);
    let killed_one = Instant::now();
    sigkill(old);
    let member = |t: &Value, name: &str| -> Value {
        t["status"]["storage"]["dedicatedEtcd"]["members"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["name"] == name).cloned())
            .unwrap_or(Value::Null)
    };
    let replaced = wait_until(Duration::from_secs(90), || {
        let t = env.tenant("solo");
        member(&t, &victim)["replacements"] == 1
            && condition(&t, "DataStoreReady").is_some_and(|c| c["reason"] == "Healthy")
            && ready(&t)
    });
    assert!(
        replaced,
        "{:#}\n{}",
        env.tenant("solo")["status"],
        env.logs("solo")
    );
    assert_ne!(member_pid(&env, "solo", &victim), old);
    std::thread::sleep(Duration::from_secs(2));

    // Two at once: no majority is left; the tenant says why it is not Ready.
    let (a, c) = (names[0].to_owned(), names[2].to_owned());
    let killed_two = Instant::now();
    sigkill(member_pid(&env, "solo", &a));
    sigkill(member_pid(&env, "solo", &c));
    let lost = wait_until(Duration::from_secs(30), || {
        let t = env.tenant("solo");
        !ready(&t)
            && condition(&t, "DataStoreReady").is_some_and(|c| {
                c["reason"] == "QuorumLost"
                    && c["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("quorum lost"))
            })
    });
    assert!(
        lost,
        "{:#}\n{}",
        env.tenant("solo")["status"],
        env.logs("solo")
    );
    env.wait_ready("solo", Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(2));

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, failed) = writer.join().expect("writer");
    let during = acked
        .iter()
        .filter(|(t, _)| *t > killed_one && *t < killed_two)
        .count();
    eprintln!(
        "writer: {} ConfigMaps acknowledged, {during} while a member was replaced, {} failed",
        acked.len(),
        failed.len()
    );
    assert!(
        during > 0,
        "no write went through while a member was replaced; failures: {failed:?}"
    );
    let listed = env
        .kubectl("solo", &["get", "configmaps", "-o", "name"])
        .expect("list");
    let listed: std::collections::BTreeSet<&str> = listed.lines().collect();
    let lost: Vec<&String> = acked
        .iter()
        .map(|(_, n)| n)
        .filter(|n| !listed.contains(format!("configmap/{n}").as_str()))
        .collect();
    assert!(lost.is_empty(), "acknowledged ConfigMaps lost: {lost:?}");

    // Deletion stops the members and removes their data.
    let pids = env.pids("solo");
    assert_eq!(
        pids.len(),
        6,
        "api-server, controllers and three members: {pids:?}"
    );
    env.delete_and_wait_gone("solo", &pids);
    drop(op);
}
