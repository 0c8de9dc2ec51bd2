//! The operator end to end, as a user drives it (`apply`, `run --once`, `get`, `delete`)
//! against real servers: tenants on SQLite, shared etcd with RBAC and PostgreSQL reach
//! Ready; deletion leaves nothing behind; a live tenant migrates from etcd to PostgreSQL;
//! version and CA-rotation rules. Run without a control-plane runtime (`--runtime none`):
//! tests/operator_control_plane.rs runs the real ones.

mod common;

use base64::Engine;
use kmetal_testkit::manifests::{b64, etcd_datastore, pg_datastore};

use std::path::PathBuf;
use std::process::{Command, Output};

use kmetal_testkit::{EtcdCluster, EtcdOptions, PostgresOptions, PostgresServer};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Env {
    dir: tempfile::TempDir,
    state: String,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = format!("sqlite://{}/management.db", dir.path().display());
        Env { dir, state }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn op(&self, args: &[&str]) -> Output {
        common::example("operator")
            .args(args)
            .arg("--state")
            .arg(&self.state)
            .output()
            .expect("run operator")
    }

    fn apply(&self, name: &str, yaml: &str) {
        let file = self.path(name);
        std::fs::write(&file, yaml).expect("write manifest");
        let out = self.op(&["apply", "-f", file.to_str().expect("utf-8")]);
        assert!(
            out.status.success(),
            "apply {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `run --once`; the status JSON and whether every tenant is Ready.
    fn run_once(&self) -> (bool, Vec<Value>) {
        let topology = root().join("examples/topologies/under-cluster.yaml");
        let out = common::example("operator")
            .args([
                "run",
                "--once",
                "--format",
                "json",
                "--default-datastore",
                "embedded",
                // Operator logic only: tests/operator_control_plane.rs runs real ones.
                "--runtime",
                "none",
            ])
            .arg("--state")
            .arg(&self.state)
            .arg("--state-dir")
            .arg(self.path("state"))
            .arg("--out")
            .arg(self.path("out"))
            .arg("--topology")
            .arg(topology)
            .args(["--timeout", "60"])
            .output()
            .expect("run operator");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let rows: Vec<Value> = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "status JSON: {e}\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.success(), rows)
    }

    fn secret(&self, ns: &str, name: &str) -> Option<std::collections::BTreeMap<String, String>> {
        let out = self.op(&["get", &format!("secret/{name}"), "-n", ns, "-o", "json"]);
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        let data = v["data"].as_object()?;
        Some(
            data.iter()
                .map(|(k, v)| {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(v.as_str().unwrap_or_default())
                        .expect("base64");
                    (k.clone(), String::from_utf8(bytes).expect("utf-8"))
                })
                .collect(),
        )
    }

    fn secrets_of(&self, tenant: &str) -> usize {
        let out = self.op(&["get", "secret", "-o", "json"]);
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        v["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter(|s| s["metadata"]["labels"]["kmetal.io/tenant"] == tenant)
                    .count()
            })
            .unwrap_or(0)
    }
}

/// Every status the operator wrote for tenant `name`, oldest first (read back from the
/// management store's revision history).
async fn history(env: &Env, name: &str) -> Vec<Value> {
    use kmetal::datastore::Datastore;
    use kmetal::datastore::model::RangeRequest;
    let path = env.path("management.db");
    let store = kmetal::datastore::sqlite::SqliteStore::open(
        kmetal::datastore::sqlite::SqliteConfig::new(path),
    )
    .await
    .expect("management store");
    let key = format!("/kmetal/objects/TenantControlPlane/tenants/{name}");
    let now = store
        .range(RangeRequest::get(key.clone()))
        .await
        .expect("get");
    let first = now
        .kvs
        .first()
        .map_or(now.revision, |kv| kv.create_revision);
    let mut out = Vec::new();
    for rev in first..=now.revision {
        let r = store
            .range(RangeRequest::get(key.clone()).at_revision(rev))
            .await
            .expect("history");
        if let Some(kv) = r.kvs.first() {
            if kv.mod_revision == rev {
                let v: Value = serde_json::from_slice(&kv.value).expect("json");
                out.push(v["status"].clone());
            }
        }
    }
    out
}

fn row<'a>(rows: &'a [Value], name: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("{name} missing from {rows:?}"))
}

const SQLITE_DS: &str = r#"
apiVersion: kamaji.clastix.io/v1alpha1
kind: DataStore
metadata: {name: embedded}
spec: {driver: SQLite, endpoints: [slices]}
"#;

fn tenant(name: &str, datastore: &str, version: &str, extra_meta: &str) -> String {
    format!(
        r#"
apiVersion: kamaji.clastix.io/v1alpha1
kind: TenantControlPlane
metadata:
  name: {name}
  namespace: tenants
{extra_meta}
spec:
  dataStore: {datastore}
  controlPlane:
    deployment: {{replicas: 2}}
    service: {{serviceType: ClusterIP}}
  kubernetes: {{version: {version}}}
  networkProfile: {{port: 6443}}
"#
    )
}

/// SQLite tenants reach Ready with placed replicas, PKI in kubeadm's layout and a slice file;
/// deleting one removes its slice, secrets and files, and leaves the other alone.
#[test]
fn sqlite_tenants_reach_ready_and_deletion_leaves_nothing() {
    let env = Env::new();
    env.apply("ds.yaml", SQLITE_DS);
    env.apply("a.yaml", &tenant("alpha", "embedded", "v1.30.2", ""));
    env.apply("b.yaml", &tenant("beta", "embedded", "v1.29.6", ""));
    let (ready, rows) = env.run_once();
    assert!(ready, "{rows:#?}");
    let alpha = row(&rows, "alpha");
    assert_eq!(alpha["phase"], "Ready");
    assert_eq!(alpha["driver"], "SQLite");
    assert_eq!(alpha["replicas"].as_array().map(Vec::len), Some(2));
    let zones: std::collections::BTreeSet<&str> = alpha["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .filter_map(|r| r["zone"].as_str())
        .collect();
    assert_eq!(zones.len(), 2, "replicas spread over zones: {alpha}");
    for f in [
        "pki/ca.crt",
        "pki/apiserver.key",
        "pki/etcd/ca.crt",
        "admin.conf",
        "konnectivity-server.conf",
    ] {
        assert!(env.path("out/alpha").join(f).exists(), "out/alpha/{f}");
    }
    let schema = alpha["schema"].as_str().expect("schema").to_string();
    let slice = env.path("state/slices").join(format!("{schema}.db"));
    assert!(slice.exists(), "{}", slice.display());
    assert!(env.secrets_of("alpha") >= 2);

    // Idempotent: a second pass changes nothing and stays Ready.
    let (ready, again) = env.run_once();
    assert!(ready);
    assert_eq!(
        row(&again, "alpha")["firstCertificateExpiry"],
        alpha["firstCertificateExpiry"]
    );

    let out = env.op(&["delete", "tcp/alpha", "-n", "tenants"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ready, rows) = env.run_once();
    assert!(ready, "{rows:#?}");
    assert!(rows.iter().all(|r| r["name"] != "alpha"), "{rows:?}");
    assert!(!slice.exists(), "slice file removed");
    assert_eq!(env.secrets_of("alpha"), 0, "secrets removed");
    assert!(!env.path("out/alpha").exists(), "PKI folder removed");
    assert!(env.secrets_of("beta") >= 2, "the other tenant is untouched");
    let out = env.op(&["get", "tcp/alpha", "-n", "tenants"]);
    assert!(!out.status.success());
}

/// An invalid tenant is refused by apply with the field path; a schedulable-but-broken one
/// reports why in its conditions and makes `run --once` exit 1.
#[test]
fn failures_land_in_conditions_and_the_exit_code() {
    let env = Env::new();
    let file = env.path("bad.yaml");
    std::fs::write(
        &file,
        tenant("bad", "embedded", "v1.30.2", "").replace("port: 6443", "port: 70000"),
    )
    .expect("write");
    let out = env.op(&["apply", "-f", file.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("spec.networkProfile.port: must be 1..=65535"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Valid, but its DataStore does not exist.
    env.apply("orphan.yaml", &tenant("orphan", "nowhere", "v1.30.2", ""));
    let (ready, rows) = env.run_once();
    assert!(!ready);
    let r = row(&rows, "orphan");
    assert_eq!(r["ready"], false);
    assert!(
        r["reason"]
            .as_str()
            .expect("reason")
            .contains("dataStore \"nowhere\" does not exist"),
        "{r}"
    );
}

/// Version changes go one minor at a time and never down; a CA rotation requested by
/// annotation puts both CAs in every trust bundle, and finalize leaves only the new one.
#[test]
fn upgrades_and_ca_rotation_follow_the_rules() {
    let env = Env::new();
    env.apply("ds.yaml", SQLITE_DS);
    env.apply("t.yaml", &tenant("gamma", "embedded", "v1.29.6", ""));
    assert!(env.run_once().0);
    env.apply("t.yaml", &tenant("gamma", "embedded", "v1.31.0", ""));
    let (_, rows) = env.run_once();
    let r = row(&rows, "gamma");
    assert_eq!(r["version"], "v1.29.6", "a skipped minor is refused: {r}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("one minor at a time"),
        "{r}"
    );
    env.apply("t.yaml", &tenant("gamma", "embedded", "v1.30.1", ""));
    let (ready, rows) = env.run_once();
    assert!(ready);
    assert_eq!(row(&rows, "gamma")["version"], "v1.30.1");
    // The rollout was visible: phase Upgrading, one replica at a time.
    let steps: Vec<String> = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(history(&env, "gamma"))
        .iter()
        .filter(|s| s["kubernetesResources"]["version"]["status"] == "Upgrading")
        .filter_map(|s| {
            s["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "Upgraded")
                .and_then(|c| c["message"].as_str().map(str::to_string))
        })
        .collect();
    assert_eq!(
        steps,
        [
            "v1.29.6 -> v1.30.1: replica 1/2 updated",
            "v1.29.6 -> v1.30.1: replica 2/2 updated"
        ]
    );

    let certs_in = |env: &Env, f: &str| {
        std::fs::read_to_string(env.path("out/gamma/pki").join(f))
            .map(|s| s.matches("BEGIN CERTIFICATE").count())
            .unwrap_or(0)
    };
    let old_ca = std::fs::read_to_string(env.path("out/gamma/pki/ca.crt")).expect("ca");
    let old_admin = std::fs::read_to_string(env.path("out/gamma/admin.conf")).expect("admin");
    env.apply(
        "t.yaml",
        &tenant(
            "gamma",
            "embedded",
            "v1.30.1",
            "  annotations: {kmetal.io/rotate-ca: prepare}",
        ),
    );
    let (ready, rows) = env.run_once();
    assert!(ready, "{rows:?}");
    assert_eq!(row(&rows, "gamma")["phase"], "CertificateAuthorityRotating");
    assert_eq!(
        certs_in(&env, "ca-bundle.crt"),
        2,
        "trust bundle carries new and old CA"
    );
    assert_eq!(
        std::fs::read_to_string(env.path("out/gamma/pki/ca-previous.crt")).expect("previous"),
        old_ca
    );
    assert_ne!(
        std::fs::read_to_string(env.path("out/gamma/admin.conf")).expect("admin"),
        old_admin
    );
    env.apply(
        "t.yaml",
        &tenant(
            "gamma",
            "embedded",
            "v1.30.1",
            "  annotations: {kmetal.io/rotate-ca: finalize}",
        ),
    );
    let (ready, rows) = env.run_once();
    assert!(ready);
    assert_eq!(row(&rows, "gamma")["phase"], "Ready");
    assert_eq!(certs_in(&env, "ca-previous.crt"), 0, "old CA gone");
    assert_eq!(
        certs_in(&env, "ca-bundle.crt"),
        1,
        "only the new CA is trusted"
    );
    assert_ne!(
        std::fs::read_to_string(env.path("out/gamma/pki/ca.crt")).expect("ca"),
        old_ca
    );
}

/// TLS material for etcdctl: the cluster CA and root's client certificate.
struct EtcdTls {
    dir: tempfile::TempDir,
}

impl EtcdTls {
    fn new(etcd: &EtcdCluster) -> EtcdTls {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("ca.crt"),
            etcd.ca_pem().expect("tls cluster"),
        )
        .expect("ca");
        let root = etcd
            .client_cert("root")
            .expect("cert")
            .expect("tls cluster");
        std::fs::write(dir.path().join("root.crt"), &root.cert).expect("cert");
        std::fs::write(dir.path().join("root.key"), &root.key).expect("key");
        EtcdTls { dir }
    }

    fn ctl(
        &self,
        endpoint: &str,
        cert: &std::path::Path,
        key: &std::path::Path,
        user: Option<&str>,
        args: &[&str],
    ) -> Output {
        let bin =
            kmetal_testkit::process::find_binary("etcdctl", "etcd-client", &[]).expect("etcdctl");
        let mut c = Command::new(bin);
        c.env("ETCDCTL_API", "3")
            .args(["--endpoints", endpoint])
            .arg("--cacert")
            .arg(self.dir.path().join("ca.crt"))
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key);
        if let Some(u) = user {
            c.args(["--user", u]);
        }
        c.args(args).output().expect("etcdctl")
    }

    /// etcdctl as root.
    fn root(&self, endpoint: &str, args: &[&str]) -> String {
        let out = self.ctl(
            endpoint,
            &self.dir.path().join("root.crt"),
            &self.dir.path().join("root.key"),
            Some("root:root-secret"),
            args,
        );
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }
}

/// Tenants on shared etcd (RBAC enabled by the operator) and on PostgreSQL reach Ready; a
/// tenant on etcd migrates to PostgreSQL with every key; deleting tenants leaves no etcd
/// user, role or prefix and no database or role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_and_postgres_tenants_migrate_and_clean_up() {
    let etcd = EtcdCluster::start(EtcdOptions {
        tls: true,
        ..EtcdOptions::default()
    })
    .await
    .expect("etcd");
    let endpoint = etcd.endpoint(0).expect("endpoint");
    let tls = EtcdTls::new(&etcd);
    let pg = PostgresServer::start(PostgresOptions::default()).expect("postgres");
    let env = Env::new();
    env.apply("etcd.yaml", &etcd_datastore(&etcd).expect("a TLS cluster"));
    env.apply("pg.yaml", &pg_datastore(&pg));
    env.apply("e.yaml", &tenant("on-etcd", "etcd-shared", "v1.30.2", ""));
    env.apply("p.yaml", &tenant("on-pg", "postgres-main", "v1.30.2", ""));
    let (ready, rows) = tokio::task::block_in_place(|| env.run_once());
    assert!(ready, "{rows:#?}");
    let e = row(&rows, "on-etcd").clone();
    assert_eq!(e["driver"], "etcd");
    let user = e["user"].as_str().expect("user").to_string();
    let schema = e["schema"].as_str().expect("schema").to_string();
    assert!(tls.root(&endpoint, &["user", "list"]).contains(&user));
    assert!(tls.root(&endpoint, &["role", "list"]).contains(&user));
    let p = row(&rows, "on-pg").clone();
    assert_eq!(p["driver"], "PostgreSQL");

    // The tenant's api-server connects with the client certificate its PKI holds (CN = its
    // etcd user, signed by the DataStore's CA), as Kamaji's tenants do.
    let pki = env.path("out/on-etcd/pki");
    let tenant_ctl = |args: &[&str]| {
        tls.ctl(
            &endpoint,
            &pki.join("datastore-client.crt"),
            &pki.join("datastore-client.key"),
            None,
            args,
        )
    };
    for i in 0..50 {
        let out = tenant_ctl(&[
            "put",
            &format!("/{schema}/registry/pods/p{i:02}"),
            &format!("v{i}"),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Outside its prefix the tenant's user is refused.
    assert!(!tenant_ctl(&["put", "/other/x", "y"]).status.success());

    // Move it to PostgreSQL.
    env.apply("e.yaml", &tenant("on-etcd", "postgres-main", "v1.30.2", ""));
    let (ready, rows) = tokio::task::block_in_place(|| env.run_once());
    assert!(ready, "{rows:#?}");
    let moved = row(&rows, "on-etcd");
    assert_eq!(moved["driver"], "PostgreSQL");
    assert!(
        history(&env, "on-etcd")
            .await
            .iter()
            .any(|s| s["kubernetesResources"]["version"]["status"] == "Migrating"),
        "phase Migrating was recorded"
    );
    assert_eq!(moved["dataStore"], "postgres-main");
    let cfg = env
        .secret("tenants", "on-etcd-datastore-config")
        .expect("slice secret");
    assert_eq!(cfg["driver"], "PostgreSQL");
    let store = kmetal::datastore::postgres::PgStore::connect(
        kmetal::datastore::postgres::PgConfig::new(cfg["conninfo"].clone()),
    )
    .await
    .expect("tenant database");
    use kmetal::datastore::Datastore;
    // The tenant's view of a shared etcd slice is its keys below `/<schema>/`.
    let got = store
        .range(kmetal::datastore::model::RangeRequest::prefix(
            "registry/pods/",
        ))
        .await
        .expect("range");
    assert_eq!(got.kvs.len(), 50, "every key arrived");
    assert_eq!(got.kvs[7].value, "v7");
    assert!(
        !tls.root(&endpoint, &["user", "list"]).contains(&user),
        "the old etcd user is gone after the cut-over"
    );
    let left = tls.root(
        &endpoint,
        &["get", "--prefix", &format!("/{schema}/"), "--keys-only"],
    );
    assert!(left.trim().is_empty(), "the old prefix is empty: {left}");
    drop(store);

    for t in ["on-etcd", "on-pg"] {
        let out = env.op(&["delete", &format!("tcp/{t}"), "-n", "tenants"]);
        assert!(out.status.success());
    }
    let (ready, rows) = tokio::task::block_in_place(|| env.run_once());
    assert!(ready && rows.is_empty(), "{rows:?}");
    let client = tokio_postgres::connect(&pg.conninfo("postgres"), tokio_postgres::NoTls).await;
    let (client, conn) = client.expect("connect");
    tokio::spawn(conn);
    for db in [
        moved["schema"].as_str().expect("schema"),
        p["schema"].as_str().expect("schema"),
    ] {
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_database WHERE datname = $1",
                &[&db],
            )
            .await
            .expect("query")
            .get(0);
        assert_eq!(n, 0, "database {db} dropped");
        let n: i64 = client
            .query_one("SELECT count(*) FROM pg_roles WHERE rolname = $1", &[&db])
            .await
            .expect("query")
            .get(0);
        assert_eq!(n, 0, "role {db} dropped");
    }
    assert_eq!(env.secrets_of("on-etcd") + env.secrets_of("on-pg"), 0);
}

/// Certificates close to their deadline are renewed by the operator on its own: a tenant
/// whose PKI was issued 350 days ago gets fresh leaves (same CA), kubeconfigs included.
#[test]
fn certificates_near_expiry_are_renewed() {
    let env = Env::new();
    env.apply("ds.yaml", SQLITE_DS);
    env.apply("t.yaml", &tenant("old", "embedded", "v1.30.2", ""));
    // The tenant's PKI, issued long ago, stored where the operator keeps it.
    let mut spec = kmetal::pki::PkiSpec::new("old", "old:6443");
    spec.service_cidr = "10.96.0.0/16".into();
    let issued = std::time::SystemTime::now() - std::time::Duration::from_secs(350 * 86_400);
    let bundle = kmetal::pki::Bundle::generate_at(&spec, issued).expect("bundle");
    let data: Vec<String> = bundle
        .to_secret_map()
        .iter()
        .map(|(k, v)| format!("  {k}: {}", b64(v)))
        .collect();
    env.apply(
        "pki.yaml",
        &format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: old-pki\n  namespace: tenants\n  labels: {{kmetal.io/tenant: old}}\ndata:\n{}\n",
            data.join("\n")
        ),
    );
    let old_ca = bundle.get("pki/ca.crt").expect("ca").to_string();
    let old_admin = bundle.get("admin.conf").expect("admin").to_string();
    let (ready, rows) = env.run_once();
    assert!(ready, "{rows:?}");
    assert_eq!(
        std::fs::read_to_string(env.path("out/old/pki/ca.crt")).expect("ca"),
        old_ca,
        "the CA is kept"
    );
    assert_ne!(
        std::fs::read_to_string(env.path("out/old/admin.conf")).expect("admin"),
        old_admin,
        "kubeconfigs re-issued"
    );
    let renewed = kmetal::pki::Bundle::load_dir(&env.path("out/old")).expect("load");
    let report = renewed
        .expiry_report(std::time::SystemTime::now())
        .expect("report");
    let apiserver = report
        .iter()
        .find(|e| e.name == "apiserver")
        .expect("apiserver");
    assert!(apiserver.residual_seconds > 300 * 86_400, "{apiserver:?}");
}

/// A live tenant moves from etcd to PostgreSQL while its api-server keeps writing through
/// the tenant's etcd endpoint: every acknowledged write is on PostgreSQL afterwards, and the
/// writes kept being accepted across the cut-over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_tenant_migrates_under_writes_without_losing_any() {
    use kmetal::datastore::Datastore;
    use kmetal::datastore::etcd::{EtcdConfig, EtcdStore, EtcdTls as Tls, Keyspace};
    use kmetal::datastore::model::{PutRequest, RangeRequest};
    let etcd = EtcdCluster::start(EtcdOptions {
        tls: true,
        ..EtcdOptions::default()
    })
    .await
    .expect("etcd");
    let pg = PostgresServer::start(PostgresOptions::default()).expect("postgres");
    let env = Env::new();
    env.apply("etcd.yaml", &etcd_datastore(&etcd).expect("a TLS cluster"));
    env.apply("pg.yaml", &pg_datastore(&pg));
    env.apply("t.yaml", &tenant("busy", "etcd-shared", "v1.30.2", ""));
    let log = std::fs::File::create(env.path("run.log")).expect("log");
    let mut op = common::example("operator")
        .args([
            "run",
            "--runtime",
            "none",
            "--lease-ttl",
            "2",
            "--state",
            &env.state,
        ])
        .arg("--state-dir")
        .arg(env.path("state"))
        .arg("--out")
        .arg(env.path("out"))
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("operator");
    let status = |env: &Env| {
        let out = env.op(&["get", "tcp/busy", "-n", "tenants", "-o", "json"]);
        serde_json::from_slice::<Value>(&out.stdout).unwrap_or(Value::Null)["status"].clone()
    };
    let condition = |st: &Value, t: &str| {
        st["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == t).cloned())
            .unwrap_or(Value::Null)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let endpoint = loop {
        let st = tokio::task::block_in_place(|| status(&env));
        let e = condition(&st, "DataStoreEndpointReady");
        if condition(&st, "Ready")["status"] == "True" && e["status"] == "True" {
            break e["message"].as_str().expect("endpoint").to_string();
        }
        assert!(std::time::Instant::now() < deadline, "not ready: {st}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    // The tenant's api-server: kubeadm's apiserver-etcd-client against the tenant's etcd CA.
    let pki = env.path("out/busy/pki");
    let read = |f: &str| std::fs::read_to_string(pki.join(f)).expect("pki file");
    let cfg = EtcdConfig::new([endpoint])
        .with_tls(Tls {
            ca_pem: read("etcd/ca.crt"),
            identity: Some((
                read("apiserver-etcd-client.crt"),
                read("apiserver-etcd-client.key"),
            )),
            domain: None,
        })
        .with_request_timeout(std::time::Duration::from_secs(30));
    let api = EtcdStore::connect(cfg, Keyspace::Dedicated)
        .await
        .expect("tenant endpoint");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (api, stop) = (api.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut acked, mut failed, mut i) = (Vec::new(), 0u32, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("/registry/configmaps/default/cm{i:05}");
                match api.put(PutRequest::new(key.clone(), format!("v{i}"))).await {
                    Ok(_) => acked.push(key),
                    Err(_) => failed += 1,
                }
                i += 1;
            }
            (acked, failed)
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| {
        env.apply("t.yaml", &tenant("busy", "postgres-main", "v1.30.2", ""))
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let st = tokio::task::block_in_place(|| status(&env));
        if st["storage"]["driver"] == "PostgreSQL" && condition(&st, "Ready")["status"] == "True" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not migrated: {st}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // Keep writing on the new slice for a moment, then stop.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, failed) = writer.await.expect("writer");
    assert!(
        acked.len() > 20,
        "the api-server kept writing: {} acked",
        acked.len()
    );
    assert_eq!(failed, 0, "no write was refused across the cut-over");
    let _ = op.kill();
    let _ = op.wait();
    let slice = env
        .secret("tenants", "busy-datastore-config")
        .expect("slice");
    let pg_store = kmetal::datastore::postgres::PgStore::connect(
        kmetal::datastore::postgres::PgConfig::new(slice["conninfo"].clone()),
    )
    .await
    .expect("tenant database");
    let on_pg = pg_store
        .range(RangeRequest::prefix("/registry/configmaps/"))
        .await
        .expect("range");
    let present: std::collections::BTreeSet<String> = on_pg
        .kvs
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).to_string())
        .collect();
    let missing: Vec<&String> = acked.iter().filter(|k| !present.contains(*k)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged writes lost: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}
