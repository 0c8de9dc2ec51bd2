//! Tenants with real control planes (kube-apiserver, controller-manager, scheduler from
//! `scripts/peers.sh`), run by the release operator (`examples/operator run`) the way a user
//! runs it, against the same kube-apiserver started by hand on etcd (what a kubeadm-style
//! control plane costs on this machine) in the same run:
//!
//! - time from `apply` to the first successful `kubectl get ns` with the tenant's admin.conf,
//!   per driver (SQLite, PostgreSQL, shared etcd, a dedicated etcd), against the bare api-server's start to its
//!   first `kubectl get ns` (target: ≤ 5 s on SQLite);
//! - memory per running tenant (RSS of its processes, and the anonymous part each tenant
//!   adds: the binaries' pages are shared), its idle CPU, how many this machine holds by each,
//!   and the operator's own RSS and idle CPU per tenant (Kamaji publishes about 6 MiB and 12 mCPU of operator
//!   overhead per tenant);
//! - the operator's overhead over a batch of real tenants: time to all Ready, its RSS.
//!
//! `cargo bench --bench control_plane` (`KMETAL_BENCH_BATCH=N` sizes the batch); `cargo test
//! --benches` runs it small.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kmetal_testkit::kube::{ApiserverOptions, KubeApiserver};
use kmetal_testkit::ports::free_port;
use kmetal_testkit::{EtcdCluster, EtcdOptions, PostgresOptions, PostgresServer};

/// The operator, stopped with SIGTERM (it stops the control planes it runs).
struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(60);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Env {
    op: PathBuf,
    dir: tempfile::TempDir,
    state: String,
    /// The operator's `/metrics`.
    metrics: std::net::SocketAddr,
}

/// The operator's reconcile count and total seconds, from its `/metrics`.
fn reconciles(rt: &tokio::runtime::Runtime, metrics: std::net::SocketAddr) -> (f64, f64) {
    let text = rt
        .block_on(kmetal_testkit::http::Client::plain(metrics).get("/metrics"))
        .map(|r| r.text())
        .unwrap_or_default();
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value("kmetal_reconcile_duration_seconds_count "),
        value("kmetal_reconcile_duration_seconds_sum "),
    )
}

impl Env {
    fn apply(&self, name: &str, yaml: &str) {
        let file = self.dir.path().join(name);
        std::fs::write(&file, yaml).unwrap();
        let out = Command::new(&self.op)
            .args(["apply", "-f"])
            .arg(&file)
            .args(["--state", &self.state])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn run(&self) -> Operator {
        let log = std::fs::File::create(self.dir.path().join("operator.log")).unwrap();
        Operator(
            Command::new(&self.op)
                .args(["run", "--state", &self.state, "--workers", "8"])
                .args(["--listen", &self.metrics.to_string()])
                .arg("--state-dir")
                .arg(self.dir.path().join("state"))
                .arg("--out")
                .arg(self.dir.path().join("out"))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }

    fn admin_conf(&self, tenant: &str) -> PathBuf {
        self.dir.path().join("out").join(tenant).join("admin.conf")
    }

    fn pids(&self, tenant: &str) -> Vec<u32> {
        let run = self
            .dir
            .path()
            .join("state/control-planes/tenants")
            .join(tenant)
            .join("run");
        std::fs::read_dir(run)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A one-replica tenant on DataStore `store`, or with a three-member dedicated etcd when
/// `store` is empty.
fn tenant_yaml(name: &str, store: &str, address: &str, version: &str) -> String {
    let (annotations, data_store) = if store.is_empty() {
        ("{kmetal.io/dedicated-etcd: \"3\"}", String::new())
    } else {
        ("{}", format!("\n  dataStore: {store}"))
    };
    format!(
        "apiVersion: kamaji.clastix.io/v1alpha1\nkind: TenantControlPlane\n\
         metadata: {{name: {name}, namespace: tenants, annotations: {annotations}}}\n\
         spec:{data_store}\n  controlPlane: {{deployment: {{replicas: 1}}, service: {{serviceType: ClusterIP}}}}\n  \
         kubernetes: {{version: {version}}}\n  networkProfile: {{address: {address}, port: {}}}\n",
        free_port().unwrap()
    )
}

fn kubectl_ok(kubectl: &Path, conf: &Path) -> bool {
    conf.exists()
        && Command::new(kubectl)
            .arg("--kubeconfig")
            .arg(conf)
            .args(["get", "ns", "--request-timeout", "5s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// Polls kubectl with `conf` every 50 ms; the seconds until it first succeeds.
fn until_kubectl(kubectl: &Path, conf: &Path, started: Instant) -> f64 {
    within(kubectl, conf, started, Duration::from_secs(300))
        .unwrap_or_else(|| panic!("no kubectl success with {}", conf.display()))
}

/// Polls kubectl with `conf` every 50 ms until `limit` after `started`; the seconds until it
/// first succeeded.
fn within(kubectl: &Path, conf: &Path, started: Instant, limit: Duration) -> Option<f64> {
    while !kubectl_ok(kubectl, conf) {
        if started.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(started.elapsed().as_secs_f64())
}

/// A process's resident memory, KiB: all of it, and its own (anonymous) part.
struct Memory {
    rss: u64,
    anon: u64,
}

fn memory_kib(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Memory {
        rss: field("VmRSS:"),
        anon: field("RssAnon:"),
    }
}

/// Resident memory of `pid`, KiB.
fn rss_kib(pid: u32) -> u64 {
    memory_kib(pid).rss
}

fn cpu_seconds(pid: u32) -> f64 {
    kmetal_testkit::process::cpu_time(pid).map_or(0.0, |d| d.as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn mem_total_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let quick = common::quick();
    let rounds = if quick { 1 } else { 3 };
    // KMETAL_BENCH_BATCH=N takes N tenants at once (memory bounds it: ~430 MiB each).
    let batch = std::env::var("KMETAL_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 2 } else { 12 });
    let rt = common::runtime();
    let kubectl = kmetal_testkit::process::peer_binary("kubectl").unwrap();
    let version = {
        let api = kmetal_testkit::process::peer_binary("kube-apiserver").unwrap();
        let out = Command::new(api).arg("--version").output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string()
    };
    let etcd = rt
        .block_on(EtcdCluster::start(EtcdOptions {
            tls: true,
            ..EtcdOptions::default()
        }))
        .unwrap();
    let plain_etcd = rt
        .block_on(EtcdCluster::start(EtcdOptions::default()))
        .unwrap();
    let pg = PostgresServer::start(PostgresOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env = Env {
        op: common::example("operator", quick),
        state: format!("sqlite://{}/m.db", dir.path().display()),
        dir,
        metrics: ([127, 0, 0, 1], free_port().unwrap()).into(),
    };
    env.apply(
        "ds.yaml",
        &format!(
            "apiVersion: kamaji.clastix.io/v1alpha1\nkind: DataStore\nmetadata: {{name: embedded}}\n\
             spec: {{driver: SQLite, endpoints: [\"{}\"]}}\n",
            env.dir.path().join("slices").display()
        ),
    );
    env.apply(
        "etcd.yaml",
        &kmetal_testkit::manifests::etcd_datastore(&etcd).expect("a TLS cluster"),
    );
    env.apply("pg.yaml", &kmetal_testkit::manifests::pg_datastore(&pg));
    let operator = env.run();
    let op_pid = operator.0.id();
    std::thread::sleep(Duration::from_secs(1));
    let op_rss_idle = rss_kib(op_pid);

    // Rounds interleave the drivers and the bare api-server, so drift hits all alike.
    let drivers = [
        ("SQLite", "embedded"),
        ("PostgreSQL", "postgres-main"),
        ("etcd", "etcd-shared"),
        ("dedicated etcd", ""),
    ];
    let mut ours: Vec<Vec<f64>> = vec![Vec::new(); drivers.len()];
    let mut peer = Vec::new();
    let mut tenants = Vec::new();
    let mut dedicated = Vec::new();
    let mut address = 0u8;
    for round in 0..rounds {
        for (i, (driver, store)) in drivers.iter().enumerate() {
            address += 1;
            let name = format!("{}-{round}", driver.to_lowercase().replace(' ', "-"));
            let started = Instant::now();
            env.apply(
                &format!("{name}.yaml"),
                &tenant_yaml(&name, store, &format!("127.0.86.{address}"), &version),
            );
            ours[i].push(until_kubectl(&kubectl, &env.admin_conf(&name), started));
            if store.is_empty() {
                dedicated.push(name);
            } else {
                tenants.push(name);
            }
        }
        let started = Instant::now();
        let api = rt
            .block_on(KubeApiserver::start(ApiserverOptions::new(
                plain_etcd.endpoints(),
            )))
            .unwrap();
        peer.push(until_kubectl(&kubectl, &api.admin_kubeconfig(), started));
        drop(api);
    }
    let bare = median(peer.clone());
    println!(
        "apply -> first `kubectl get ns`, median of {rounds} (bare kube-apiserver on etcd: start -> first kubectl):"
    );
    println!("  bare kube-apiserver (peer)  {bare:6.2} s");
    for (i, (driver, _)) in drivers.iter().enumerate() {
        let t = median(ours[i].clone());
        let target = if *driver == "SQLite" {
            format!(
                "   target <= 5 s: {}",
                if t <= 5.0 { "met" } else { "MISSED" }
            )
        } else {
            String::new()
        };
        println!(
            "  kmetal tenant on {driver:<14} {t:6.2} s  = {:.2}x the bare api-server{target}",
            t / bare
        );
    }

    // Memory per running tenant: its processes, after Ready. RSS counts the binaries' pages,
    // which every tenant's processes share; what each tenant adds is its anonymous memory.
    std::thread::sleep(Duration::from_secs(5));
    let footprint = |names: &[String]| -> (f64, f64) {
        let per: Vec<(f64, f64)> = names
            .iter()
            .map(|t| {
                env.pids(t)
                    .into_iter()
                    .map(memory_kib)
                    .fold((0.0, 0.0), |a, m| (a.0 + m.rss as f64, a.1 + m.anon as f64))
            })
            .collect();
        (
            median(per.iter().map(|m| m.0).collect()),
            median(per.iter().map(|m| m.1).collect()),
        )
    };
    let (tenant_rss, tenant_anon) = footprint(&tenants);
    let (dedicated_rss, dedicated_anon) = footprint(&dedicated);
    let op_rss = rss_kib(op_pid);
    let running = tenants.len() + dedicated.len();
    let op_per_tenant = op_rss.saturating_sub(op_rss_idle) as f64 / running as f64;
    // Idle CPU: what the running tenants and the operator take with nothing to do.
    let tenant_pids: Vec<Vec<u32>> = tenants.iter().map(|t| env.pids(t)).collect();
    let cpu_of = |pids: &[u32]| pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
    let window = Duration::from_secs(if quick { 5 } else { 30 });
    let before: Vec<f64> = tenant_pids.iter().map(|p| cpu_of(p)).collect();
    let op_before = cpu_seconds(op_pid);
    std::thread::sleep(window);
    let tenant_mcpu = median(
        tenant_pids
            .iter()
            .zip(&before)
            .map(|(p, b)| (cpu_of(p) - b) * 1e3 / window.as_secs_f64())
            .collect(),
    );
    let op_mcpu = (cpu_seconds(op_pid) - op_before) * 1e3 / window.as_secs_f64() / running as f64;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let by_memory =
        (mem_total_kib() as f64 - tenant_rss + tenant_anon) / (tenant_anon + op_per_tenant);
    let by_cpu = cpus as f64 * 1e3 / (tenant_mcpu + op_mcpu);
    println!("memory and idle CPU with {running} running tenants (1 api-server replica each):");
    println!(
        "  per tenant (api-server + controller-manager + scheduler): RSS {:.0} MiB, of it its own (anonymous) {:.0} MiB; idle {tenant_mcpu:.0} mCPU",
        tenant_rss / 1024.0,
        tenant_anon / 1024.0,
    );
    println!(
        "  a tenant with a dedicated etcd (the same and three etcd members): RSS {:.0} MiB, own {:.0} MiB",
        dedicated_rss / 1024.0,
        dedicated_anon / 1024.0
    );
    println!(
        "  operator: {} MiB idle, {} MiB now: {:.1} MiB per tenant (Kamaji publishes ~6 MiB) = {:.2}x Kamaji's; idle {op_mcpu:.1} mCPU per tenant (Kamaji: ~12 mCPU) = {:.2}x, its gateways serving the tenants' etcd traffic included",
        op_rss_idle / 1024,
        op_rss / 1024,
        op_per_tenant / 1024.0,
        op_per_tenant / 1024.0 / 6.0,
        op_mcpu / 12.0
    );
    println!(
        "  this machine ({} GiB, {cpus} CPUs) holds about {:.0} idle tenants: {by_memory:.0} by memory, {by_cpu:.0} by CPU",
        mem_total_kib() / 1024 / 1024,
        by_memory.min(by_cpu)
    );

    // A batch of real tenants at once: time to all answering, the operator's RSS and CPU.
    let cpu_before = cpu_seconds(op_pid);
    let (n_before, sum_before) = reconciles(&rt, env.metrics);
    let started = Instant::now();
    let mut batch_names = Vec::new();
    for i in 0..batch {
        let name = format!("batch-{i}");
        env.apply(
            &format!("{name}.yaml"),
            &tenant_yaml(&name, "embedded", &format!("127.0.87.{}", i + 1), &version),
        );
        batch_names.push(name);
    }
    // The gate boots them in the order they were applied: the first answers long before
    // the last.
    let first = batch_names.first().map_or(0.0, |n| {
        until_kubectl(&kubectl, &env.admin_conf(n), started)
    });
    // Boots share the CPUs with the tenants already idling, whose number grows: allow each
    // tenant 20 s, and say how many answered rather than fail when that is not enough.
    let limit = Duration::from_secs(60 + 20 * batch as u64);
    let answered = batch_names
        .iter()
        .take_while(|n| within(&kubectl, &env.admin_conf(n), started, limit).is_some())
        .count();
    if answered < batch {
        println!(
            "{batch} more SQLite tenants applied at once: the first answers kubectl in {first:.1} s, only {answered} within {} s",
            limit.as_secs()
        );
        return;
    }
    let took = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(op_pid) - cpu_before;
    let (n_after, sum_after) = reconciles(&rt, env.metrics);
    let passes = n_after - n_before;
    let mean_ms = if passes > 0.0 {
        (sum_after - sum_before) / passes * 1e3
    } else {
        0.0
    };
    println!(
        "{batch} more SQLite tenants applied at once: the first answers kubectl in {first:.1} s, all in {took:.1} s; {passes:.0} reconciles, {mean_ms:.1} ms each on average; operator CPU {:.0} ms per tenant, RSS {} MiB with {} tenants",
        cpu * 1e3 / batch as f64,
        rss_kib(op_pid) / 1024,
        tenants.len() + dedicated.len() + batch
    );
    drop(operator);
}
