//! Several operator processes on one management store (PostgreSQL): one leads the region and
//! reconciles, the other stands by and takes over when the leader is killed; /metrics,
//! /healthz and /readyz; a controller killed mid-reconcile converges when started again.

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kmetal_testkit::ports::free_port;
use kmetal_testkit::{PostgresOptions, PostgresServer};
use serde_json::Value;

use common::operator::{Op, apply, ready, tenants, wait_until};

/// The operator on `state`; `run` without a control-plane runtime (these tests are about
/// leadership and the store; tests/operator_control_plane.rs runs real control planes).
fn operator(state: &str, args: &[&str]) -> Command {
    let mut c = common::operator::operator(state, args);
    if args.first() == Some(&"run") {
        c.args(["--runtime", "none"]);
    }
    c
}

fn http_get(port: u16, path: &str) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn tenant_yaml(name: &str, slices: &std::path::Path) -> String {
    format!(
        r#"
apiVersion: kamaji.clastix.io/v1alpha1
kind: DataStore
metadata: {{name: embedded}}
spec: {{driver: SQLite, endpoints: ["{}"]}}
---
apiVersion: kamaji.clastix.io/v1alpha1
kind: TenantControlPlane
metadata: {{name: {name}, namespace: tenants}}
spec:
  dataStore: embedded
  controlPlane: {{deployment: {{replicas: 1}}, service: {{serviceType: ClusterIP}}}}
  kubernetes: {{version: v1.30.2}}
"#,
        slices.display()
    )
}

fn spawn_run(state: &str, dir: &std::path::Path, id: &str, port: u16) -> (Op, PathBuf) {
    let log = dir.join(format!("{id}.log"));
    let child = operator(state, &["run", "--lease-ttl", "6", "--identity", id])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--state-dir")
        .arg(dir.join(id))
        .env("KMETAL_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("run");
    (Op(child), log)
}

fn leadership_lines(log: &PathBuf) -> String {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("leading") || l.contains("leadership") || l.contains("election"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn reconciles_in(log: &PathBuf) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("reconciled"))
        .count()
}

/// Two controllers for one region: exactly one leads and reconciles; killing it hands the
/// region to the other, which reconciles what arrives next. Metrics and probes answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_per_region_and_failover() {
    let pg = PostgresServer::start(PostgresOptions::default()).expect("postgres");
    pg.create_database("mgmt").await.expect("database");
    let state = pg.url("mgmt");
    let dir = tempfile::tempdir().expect("tempdir");
    let slices = dir.path().join("slices");
    for i in 0..4 {
        apply(
            &state,
            dir.path(),
            &format!("t{i}.yaml"),
            &tenant_yaml(&format!("t{i}"), &slices),
        );
    }
    let (pa, pb) = (free_port().expect("port"), free_port().expect("port"));
    let (a, log_a) = spawn_run(&state, dir.path(), "op-a", pa);
    let (b, log_b) = spawn_run(&state, dir.path(), "op-b", pb);
    let all_ready = |n: usize| {
        let t = tenants(&state);
        t.len() == n && t.iter().all(ready)
    };
    assert!(
        tokio::task::block_in_place(|| wait_until(Duration::from_secs(60), || all_ready(4))),
        "{:#?}",
        tenants(&state)
    );
    assert!(http_get(pa, "/healthz").contains("ok"));
    let roles = || (http_get(pa, "/readyz"), http_get(pb, "/readyz"));
    assert!(tokio::task::block_in_place(|| wait_until(
        Duration::from_secs(10),
        || {
            let (ra, rb) = roles();
            ra.contains("(leader)") != rb.contains("(leader)")
        }
    )));
    let (ra, _) = roles();
    let (leader, leader_log, standby_log, standby_port, mut standby) = if ra.contains("(leader)") {
        (a, log_a, log_b, pb, Some(b))
    } else {
        (b, log_b, log_a, pa, Some(a))
    };
    assert!(reconciles_in(&leader_log) >= 4);
    // A 2-core CI box under load can starve a renewal past a short TTL, which hands the
    // region over legitimately; the log lines show whether that is what happened.
    assert_eq!(
        reconciles_in(&standby_log),
        0,
        "the standby never reconciles\nleader:\n{}\nstandby:\n{}",
        leadership_lines(&leader_log),
        leadership_lines(&standby_log)
    );
    let leader_port = if standby_port == pa { pb } else { pa };
    let metrics = http_get(leader_port, "/metrics");
    for needle in [
        "kmetal_tenants{phase=\"Ready\"} 4",
        "kmetal_reconcile_duration_seconds_count",
        "kmetal_certificate_expiry_seconds{tenant=\"tenantcontrolplane/tenants/t0\"}",
        "kmetal_konnectivity_agents{tenant=\"tenantcontrolplane/tenants/t0\"} 0",
        "kmetal_datastore_slice_bytes{tenant=",
        "kmetal_management_store_bytes",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from\n{metrics}");
    }

    // Kill the leader without a chance to hand over; the standby takes over within the TTL.
    leader.kill();
    apply(&state, dir.path(), "t9.yaml", &tenant_yaml("t9", &slices));
    assert!(
        tokio::task::block_in_place(|| wait_until(Duration::from_secs(60), || all_ready(5))),
        "{:#?}",
        tenants(&state)
    );
    assert!(http_get(standby_port, "/readyz").contains("(leader)"));
    assert!(
        reconciles_in(&standby_log) >= 1,
        "the new leader reconciled"
    );
    standby.take();
}

/// A controller killed in the middle of reconciling many tenants leaves nothing half-done
/// that a fresh `run --once` cannot finish.
#[test]
fn killed_mid_reconcile_then_restarted_converges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = format!("sqlite://{}/m.db", dir.path().display());
    let slices = dir.path().join("slices");
    let mut yaml = String::new();
    for i in 0..300 {
        yaml.push_str(&tenant_yaml(&format!("k{i:03}"), &slices));
        yaml.push_str("\n---\n");
    }
    apply(&state, dir.path(), "many.yaml", &yaml);
    let port = free_port().expect("port");
    let (op, log) = spawn_run(&state, dir.path(), "first", port);
    // Kill it as soon as it is visibly under way, long before it is done.
    let end = Instant::now() + Duration::from_secs(60);
    while reconciles_in(&log) == 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    op.kill();
    let done = tenants(&state).iter().filter(|t| ready(t)).count();
    assert!(done < 300, "killed mid-way ({done} ready)");
    let out = operator(
        &state,
        &["run", "--once", "--lease-ttl", "2", "--format", "json"],
    )
    .arg("--state-dir")
    .arg(dir.path().join("second"))
    .output()
    .expect("run --once");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(rows.len(), 300);
    assert!(rows.iter().all(|r| r["ready"] == true));
}

/// With the management store down, running tenants keep working: their etcd endpoint takes
/// writes and their Konnectivity server takes agents; the operator answers /healthz and
/// picks up again when the store is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_keep_running_while_the_management_store_is_down() {
    use kmetal::datastore::Datastore;
    use kmetal::datastore::model::{PutRequest, RangeRequest};
    let (mut pg, state, dir) = pg_management("steady").await;
    let port = free_port().expect("port");
    let out = dir.path().join("out");
    let log = dir.path().join("op.log");
    let _op = Op(operator(&state, &["run", "--lease-ttl", "2"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("run"));
    let message = |t: &Value, ty: &str| {
        t["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == ty))
            .and_then(|c| c["message"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    let mut found = None;
    assert!(tokio::task::block_in_place(|| wait_until(
        Duration::from_secs(60),
        || {
            let t = tenants(&state);
            if let Some(t) = t.first().filter(|t| ready(t)) {
                found = Some(t.clone());
                true
            } else {
                false
            }
        }
    )));
    let t = found.expect("tenant");
    let endpoint = message(&t, "DataStoreEndpointReady");
    let agents = message(&t, "KonnectivityReady")
        .trim_start_matches("agents connect to ")
        .to_string();

    pg.stop().expect("stop the management store");

    // The tenant's api-server keeps reading and writing its own slice.
    let api = tenant_api(&out.join("steady/pki"), &endpoint).await;
    api.put(PutRequest::new("/registry/leases/kube-system/x", "held"))
        .await
        .expect("write while the management store is down");
    let got = api
        .range(RangeRequest::get("/registry/leases/kube-system/x"))
        .await
        .expect("read");
    assert_eq!(got.kvs[0].value, "held");
    // A worker's agent still connects to the tenant's Konnectivity server.
    worker_agent_connects(&out, "steady", &agents).await;
    assert!(http_get(port, "/healthz").contains("ok"));

    pg.resume().expect("management store back");
    apply(
        &state,
        dir.path(),
        "u.yaml",
        &tenant_yaml("after", &dir.path().join("slices")),
    );
    assert!(
        tokio::task::block_in_place(|| wait_until(Duration::from_secs(60), || {
            let t = tenants(&state);
            t.len() == 2 && t.iter().all(ready)
        })),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// Each region's tenants are reconciled by that region's controller and by no other.
#[test]
fn each_region_is_reconciled_by_its_own_controller() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = format!("sqlite://{}/m.db", dir.path().display());
    let slices = dir.path().join("slices");
    let labelled = |name: &str, region: &str| {
        tenant_yaml(name, &slices).replace(
            "metadata: {name: NAME, namespace: tenants}".replace("NAME", name).as_str(),
            &format!("metadata: {{name: {name}, namespace: tenants, labels: {{kmetal.io/region: {region}}}}}"),
        )
    };
    apply(&state, dir.path(), "eu.yaml", &labelled("in-eu", "eu"));
    apply(&state, dir.path(), "us.yaml", &labelled("in-us", "us"));
    let once = |region: &str| {
        let out = operator(
            &state,
            &["run", "--once", "--format", "json", "--region", region],
        )
        .arg("--state-dir")
        .arg(dir.path().join(region))
        .output()
        .expect("run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Vec<Value>>(&out.stdout).expect("json")
    };
    let eu = once("eu");
    assert_eq!(eu.len(), 1);
    assert_eq!(eu[0]["name"], "in-eu");
    let status_of = |name: &str| {
        tenants(&state)
            .into_iter()
            .find(|t| t["metadata"]["name"] == name)
            .map(|t| t["status"].clone())
            .unwrap_or(Value::Null)
    };
    assert!(
        status_of("in-us").is_null(),
        "the eu controller left the us tenant alone"
    );
    let us = once("us");
    assert_eq!(us.len(), 1);
    assert!(ready(
        &tenants(&state)
            .into_iter()
            .find(|t| t["metadata"]["name"] == "in-us")
            .expect("us")
    ));
}

/// A long-running controller `id` on `state`, writing PKI to `out`.
fn controller(state: &str, dir: &std::path::Path, out: &std::path::Path, id: &str) -> Op {
    Op(
        operator(state, &["run", "--lease-ttl", "6", "--identity", id])
            .arg("--state-dir")
            .arg(dir.join(id))
            .arg("--out")
            .arg(out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run"),
    )
}

/// The runtimes controllers announce for tenants/`tenant`, by controller.
async fn runtimes(
    mgmt: &kmetal::datastore::postgres::PgStore,
    tenant: &str,
) -> std::collections::BTreeMap<String, Value> {
    use kmetal::datastore::Datastore;
    let prefix = format!("/kmetal/runtime/tenantcontrolplane/tenants/{tenant}/");
    mgmt.range(kmetal::datastore::model::RangeRequest::prefix(prefix))
        .await
        .expect("range")
        .kvs
        .iter()
        .map(|kv| {
            let key = String::from_utf8_lossy(&kv.key).to_string();
            let id = key.rsplit('/').next().unwrap_or_default().to_string();
            (
                id,
                serde_json::from_slice::<Value>(&kv.value).unwrap_or(Value::Null),
            )
        })
        .collect()
}

/// Waits until `n` controllers announce `tenant`.
async fn wait_runtimes(
    mgmt: &kmetal::datastore::postgres::PgStore,
    tenant: &str,
    n: usize,
) -> std::collections::BTreeMap<String, Value> {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let r = runtimes(mgmt, tenant).await;
        if r.len() == n {
            return r;
        }
        assert!(Instant::now() < end, "runtimes of {tenant}: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The tenant's api-server: its etcd client certificate against `endpoint`.
async fn tenant_api(pki: &std::path::Path, endpoint: &str) -> kmetal::datastore::etcd::EtcdStore {
    use kmetal::datastore::etcd::{EtcdConfig, EtcdStore, EtcdTls, Keyspace};
    let read = |f: &str| std::fs::read_to_string(pki.join(f)).expect("pki file");
    let tls = EtcdTls {
        ca_pem: read("etcd/ca.crt"),
        identity: Some((
            read("apiserver-etcd-client.crt"),
            read("apiserver-etcd-client.key"),
        )),
        domain: None,
    };
    EtcdStore::connect(
        EtcdConfig::new([endpoint.to_string()]).with_tls(tls),
        Keyspace::Dedicated,
    )
    .await
    .expect("tenant endpoint")
}

/// A worker's agent of `tenant` (PKI under `out`) connects to the Konnectivity server at
/// `agents`.
async fn worker_agent_connects(out: &std::path::Path, tenant: &str, agents: &str) {
    let bundle = kmetal::pki::Bundle::load_dir(&out.join(tenant)).expect("pki");
    let mut cfg = kmetal::tunnel::AgentConfig::new(
        vec![agents.to_string()],
        kmetal::tunnel::tls::agent_client(&bundle).expect("tls"),
        "worker-1",
    );
    cfg.server_name = Some(tenant.into());
    let agent = kmetal::tunnel::Agent::start(cfg).expect("agent");
    assert!(
        agent.wait_connected(1, Duration::from_secs(10)).await,
        "{:?}",
        agent.stats()
    );
}

/// A PostgreSQL management store holding one tenant (SQLite slices under the temp dir).
async fn pg_management(tenant: &str) -> (PostgresServer, String, tempfile::TempDir) {
    let pg = PostgresServer::start(PostgresOptions::default()).expect("postgres");
    pg.create_database("mgmt").await.expect("database");
    let state = pg.url("mgmt");
    let dir = tempfile::tempdir().expect("tempdir");
    apply(
        &state,
        dir.path(),
        "t.yaml",
        &tenant_yaml(tenant, &dir.path().join("slices")),
    );
    (pg, state, dir)
}

async fn management(state: &str) -> kmetal::datastore::postgres::PgStore {
    kmetal::datastore::postgres::PgStore::connect(kmetal::datastore::postgres::PgConfig::new(
        state.to_string(),
    ))
    .await
    .expect("management store")
}

/// Every controller serves the region's tenants, not only the leader: with the leader
/// killed, a tenant's api-server keeps writing through the standby's etcd endpoint and a
/// worker's agent connects to the standby's Konnectivity server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_keep_serving_through_a_standby_while_the_leader_is_down() {
    use kmetal::datastore::Datastore;
    use kmetal::datastore::model::{PutRequest, RangeRequest};
    let (_pg, state, dir) = pg_management("kept").await;
    let out = dir.path().join("out");
    let leader = controller(&state, dir.path(), &out, "leader");
    assert!(tokio::task::block_in_place(|| wait_until(
        Duration::from_secs(60),
        || { tenants(&state).first().is_some_and(ready) }
    )));
    let _standby = controller(&state, dir.path(), &out, "standby");
    let mgmt = management(&state).await;
    let standby_runtime = wait_runtimes(&mgmt, "kept", 2).await["standby"].clone();
    leader.kill();

    let api = tenant_api(
        &out.join("kept/pki"),
        standby_runtime["endpoint"].as_str().expect("endpoint"),
    )
    .await;
    api.put(PutRequest::new(
        "/registry/events/default/e1",
        "while the leader is down",
    ))
    .await
    .expect("write through the standby");
    assert_eq!(
        api.range(RangeRequest::get("/registry/events/default/e1"))
            .await
            .expect("read")
            .kvs
            .len(),
        1
    );
    let agents = standby_runtime["konnectivity"].as_str().expect("agents");
    worker_agent_connects(&out, "kept", agents).await;
}

/// With two controllers serving a tenant, a migration waits until the standby has stopped
/// serving the old slice, then both serve the new one; what was written before is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_with_two_controllers_moves_every_replica_to_the_new_slice() {
    use kmetal::datastore::Datastore;
    use kmetal::datastore::model::{PutRequest, RangeRequest};
    let pg = PostgresServer::start(PostgresOptions::default()).expect("postgres");
    pg.create_database("mgmt").await.expect("database");
    let state = pg.url("mgmt");
    let dir = tempfile::tempdir().expect("tempdir");
    let (old_dir, new_dir) = (dir.path().join("old"), dir.path().join("new"));
    apply(
        &state,
        dir.path(),
        "t.yaml",
        &tenant_yaml("mover", &old_dir),
    );
    let out = dir.path().join("out");
    let _a = controller(&state, dir.path(), &out, "a");
    assert!(tokio::task::block_in_place(|| wait_until(
        Duration::from_secs(60),
        || { tenants(&state).first().is_some_and(ready) }
    )));
    let _b = controller(&state, dir.path(), &out, "b");
    let mgmt = management(&state).await;
    let before = wait_runtimes(&mgmt, "mover", 2).await;
    let pki = out.join("mover/pki");
    let first = tenant_api(&pki, before["a"]["endpoint"].as_str().expect("endpoint")).await;
    for i in 0..20 {
        first
            .put(PutRequest::new(
                format!("/registry/secrets/default/s{i:02}"),
                "x",
            ))
            .await
            .expect("write before the move");
    }
    drop(first);

    // Move to another SQLite folder: a second DataStore.
    let second = format!(
        "apiVersion: kamaji.clastix.io/v1alpha1\nkind: DataStore\nmetadata: {{name: moved}}\nspec: {{driver: SQLite, endpoints: [\"{}\"]}}\n",
        new_dir.display()
    );
    apply(&state, dir.path(), "ds2.yaml", &second);
    apply(
        &state,
        dir.path(),
        "t.yaml",
        &tenant_yaml("mover", &old_dir).replace("dataStore: embedded", "dataStore: moved"),
    );
    assert!(
        tokio::task::block_in_place(|| wait_until(Duration::from_secs(60), || {
            tenants(&state)
                .first()
                .is_some_and(|t| ready(t) && t["status"]["storage"]["dataStoreName"] == "moved")
        })),
        "{:#?}",
        tenants(&state)
    );
    // Both controllers serve again, over the new slice, with everything written before. A
    // write through one replica is read through the other (a replica left on the removed old
    // file would not see it).
    let served = wait_runtimes(&mgmt, "mover", 2).await;
    let one = tenant_api(&pki, served["a"]["endpoint"].as_str().expect("endpoint")).await;
    let other = tenant_api(&pki, served["b"]["endpoint"].as_str().expect("endpoint")).await;
    one.put(PutRequest::new("/registry/secrets/default/after", "y"))
        .await
        .expect("write after the move");
    for api in [&one, &other] {
        let got = api
            .range(RangeRequest::prefix("/registry/secrets/default/").count_only())
            .await
            .expect("read through each replica");
        assert_eq!(got.count, 21, "every replica serves the migrated slice");
    }
    assert!(
        std::fs::read_dir(&new_dir)
            .expect("new slices")
            .next()
            .is_some()
    );
}
