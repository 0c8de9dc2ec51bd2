//! A tenant's dedicated etcd run by the process runtime with real etcd 3.6 (`scripts/peers.sh`):
//! three members with the tenant's etcd TLS, a killed member replaced on a fresh data dir while
//! writes go on, two killed members reported as lost quorum and the cluster back afterwards, a
//! hung member replaced, nothing left after removal.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use kmetal_pki::{Bundle, PkiSpec};
use kmetal_runtime::{
    Catalog, ControlPlaneRuntime, EtcdClusterError, EtcdPlan, EtcdStatus, ProcessRuntime,
    ProcessRuntimeConfig, RuntimeError, TenantId,
};

fn runtime(state: &std::path::Path) -> ProcessRuntime {
    let mut config = ProcessRuntimeConfig::new(state, Catalog::empty());
    config.etcd_binary = Some(kmetal_testkit::process::peer_binary("etcd").expect("etcd 3.6"));
    ProcessRuntime::new(config)
}

fn plan(name: &str, members: &[&str]) -> EtcdPlan {
    let mut spec = PkiSpec::new(name, "127.0.0.1:6443");
    spec.node_names = members.iter().map(|m| m.to_string()).collect();
    EtcdPlan {
        tenant: TenantId::new("tenants", name),
        members: members.iter().map(|m| m.to_string()).collect(),
        bundle: Bundle::generate(&spec).expect("bundle"),
    }
}

/// Calls `ensure_etcd` until `done` holds, at most `timeout`.
async fn ensure_until(
    rt: &ProcessRuntime,
    plan: &EtcdPlan,
    timeout: Duration,
    done: impl Fn(&EtcdStatus) -> bool,
) -> EtcdStatus {
    let end = Instant::now() + timeout;
    loop {
        let status = rt.ensure_etcd(plan).await.expect("ensure_etcd");
        if done(&status) {
            return status;
        }
        if Instant::now() >= end {
            let logs = rt.tenant_dir(&plan.tenant).join("logs");
            let mut tails = String::new();
            for e in std::fs::read_dir(&logs).into_iter().flatten().flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(12)..].join("\n");
                tails.push_str(&format!("{}:\n{tail}\n", e.path().display()));
            }
            panic!("not there after {timeout:?}: {status:#?}\n{tails}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A client as the api-server is one: `apiserver-etcd-client`, trusting the etcd CA.
async fn client(plan: &EtcdPlan, status: &EtcdStatus) -> Client {
    let b = &plan.bundle;
    let tls = TlsOptions::new()
        .ca_certificate(Certificate::from_pem(b.get("pki/etcd/ca.crt").expect("ca")))
        .identity(Identity::from_pem(
            b.get("pki/apiserver-etcd-client.crt").expect("cert"),
            b.get("pki/apiserver-etcd-client.key").expect("key"),
        ))
        .domain_name("localhost");
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(3))
        .with_tls(tls);
    Client::connect(status.client_urls(), Some(options))
        .await
        .expect("connect")
}

/// How many keys the writer has made.
async fn count(c: &mut Client) -> i64 {
    let only = etcd_client::GetOptions::new()
        .with_prefix()
        .with_count_only();
    c.get("/registry/", Some(only))
        .await
        .expect("count")
        .count()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

fn all_healthy(s: &EtcdStatus) -> bool {
    s.healthy() == s.members.len()
}

/// Three members serve with the tenant's TLS; one killed is replaced (fresh data dir, a new
/// member id) while a writer keeps writing and loses nothing; two killed lose quorum and the
/// status says so; they come back; removal stops every member and removes the folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_replaced_and_quorum_loss_is_reported() {
    let state = tempfile::tempdir().expect("tempdir");
    let rt = runtime(state.path());
    let plan = plan("delta", &["node-a", "node-b", "node-c"]);
    let up = ensure_until(&rt, &plan, Duration::from_secs(60), all_healthy).await;
    assert!(up.has_quorum());
    assert_eq!(
        up.members
            .iter()
            .filter(|m| m.state.to_string().contains("leader"))
            .count(),
        1,
        "{up:#?}"
    );

    // Wrong-CA clients are refused: the members demand a certificate from the tenant's CA.
    let other = Bundle::generate(&PkiSpec::new("other", "127.0.0.1:6443")).expect("bundle");
    let stranger = TlsOptions::new()
        .ca_certificate(Certificate::from_pem(
            plan.bundle.get("pki/etcd/ca.crt").expect("ca"),
        ))
        .identity(Identity::from_pem(
            other.get("pki/apiserver-etcd-client.crt").expect("cert"),
            other.get("pki/apiserver-etcd-client.key").expect("key"),
        ))
        .domain_name("localhost");
    let refused = async {
        let mut c = Client::connect(
            up.client_urls(),
            Some(ConnectOptions::new().with_tls(stranger)),
        )
        .await?;
        c.put("x", "y", None).await
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(10), refused)
            .await
            .map_or(true, |r| r.is_err()),
        "another tenant's certificate wrote to this etcd"
    );

    // A writer runs throughout; every acknowledged key must be there at the end.
    let mut c = client(&plan, &up).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let mut c = c.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut acked = BTreeSet::new();
            let mut failed = 0u32;
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("/registry/k{i:06}");
                match c.put(key.clone(), "v", None).await {
                    Ok(_) => {
                        acked.insert(key);
                    }
                    Err(_) => failed += 1,
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (acked, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    let victim = &up.members[1];
    let data = rt.tenant_dir(&plan.tenant).join("etcd").join(&victim.name);
    let marker = data.join("kmetal-marker");
    std::fs::write(&marker, "old data dir").expect("marker");
    let pid = rt
        .kill_etcd_member(&plan.tenant, &victim.name)
        .await
        .expect("killed");
    let replaced = ensure_until(&rt, &plan, Duration::from_secs(60), |s| {
        s.members[1].replacements == 1 && all_healthy(s)
    })
    .await;
    assert_ne!(replaced.members[1].pid, Some(pid), "{replaced:#?}");
    assert!(
        !marker.exists(),
        "the replacement started on the old data dir"
    );
    // The writer kept writing while the member was replaced.
    let before = count(&mut c).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = count(&mut c).await;
    assert!(after > before, "writes stopped after the replacement");
    // The member list names three members, the replaced one under a new id.
    let members = c.member_list().await.expect("members");
    let names: BTreeSet<&str> = members.members().iter().map(|m| m.name()).collect();
    assert_eq!(names, BTreeSet::from(["node-a", "node-b", "node-c"]));

    // Two at once: no majority is left to remove anyone; the status says quorum is lost.
    let a = rt
        .kill_etcd_member(&plan.tenant, "node-a")
        .await
        .expect("a");
    let b = rt
        .kill_etcd_member(&plan.tenant, "node-b")
        .await
        .expect("b");
    let lost = ensure_until(&rt, &plan, Duration::from_secs(30), |s| !s.has_quorum()).await;
    assert!(lost.problems().len() >= 2, "{lost:#?}");
    let back = ensure_until(&rt, &plan, Duration::from_secs(90), all_healthy).await;
    assert_eq!(
        back.members
            .iter()
            .map(|m| m.replacements)
            .collect::<Vec<_>>(),
        [0, 1, 0],
        "members without quorum restart on their own data: {back:#?}"
    );
    assert!(back.members[0].pid != Some(a) && back.members[1].pid != Some(b));

    stop.store(true, Ordering::Relaxed);
    let (acked, failed) = writer.await.expect("writer");
    assert!(
        acked.len() > 50,
        "only {} writes acknowledged ({failed} failed)",
        acked.len()
    );
    let mut c = client(&plan, &back).await;
    let stored: BTreeSet<String> = c
        .get(
            "/registry/",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await
        .expect("list")
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect();
    let lost: Vec<_> = acked.difference(&stored).collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");

    let pids: Vec<u32> = back.members.iter().filter_map(|m| m.pid).collect();
    assert_eq!(pids.len(), 3);
    rt.remove(&plan.tenant).await;
    for pid in pids {
        assert!(!alive(pid), "member {pid} left running");
    }
    assert!(!rt.tenant_dir(&plan.tenant).exists());
}

/// A member that hangs (SIGSTOP: its process runs but never answers) is replaced once it
/// has not answered for the configured time, and the hung process is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_member_is_replaced() {
    let state = tempfile::tempdir().expect("tempdir");
    let mut config = ProcessRuntimeConfig::new(state.path(), Catalog::empty());
    config.etcd_binary = Some(kmetal_testkit::process::peer_binary("etcd").expect("etcd 3.6"));
    config.etcd_replace_unresponsive_after = Duration::from_secs(3);
    let rt = ProcessRuntime::new(config);
    let plan = plan("hung", &["h-a", "h-b", "h-c"]);
    let up = ensure_until(&rt, &plan, Duration::from_secs(60), all_healthy).await;
    let pid = up.members[2].pid.expect("pid");
    let stopped = std::process::Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .expect("kill -STOP");
    assert!(stopped.success());
    let replaced = ensure_until(&rt, &plan, Duration::from_secs(60), |s| {
        s.members[2].replacements == 1 && all_healthy(s)
    })
    .await;
    assert_ne!(replaced.members[2].pid, Some(pid));
    assert!(!alive(pid), "the hung member {pid} was left running");
    rt.remove(&plan.tenant).await;
}

/// An even member count and a missing binary are typed errors, not crashes.
#[tokio::test]
async fn bad_plans_are_refused() {
    let state = tempfile::tempdir().expect("tempdir");
    let rt = runtime(state.path());
    let even = plan("even", &["a", "b"]);
    assert!(matches!(
        rt.ensure_etcd(&even).await,
        Err(RuntimeError::Etcd(EtcdClusterError::MemberCount(2)))
    ));
    let mut config = ProcessRuntimeConfig::new(state.path(), Catalog::empty());
    config.etcd_binary = Some(state.path().join("no-etcd"));
    let rt = ProcessRuntime::new(config);
    let e = rt
        .ensure_etcd(&plan("one", &["a"]))
        .await
        .expect_err("no binary");
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    assert!(text.contains("scripts/peers.sh"), "{text}");
}
