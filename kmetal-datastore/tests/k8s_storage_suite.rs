//! Kubernetes' own storage tests (k8s.io/apiserver's etcd3 store and watch cache packages,
//! unpatched) against real etcd 3.6 (the control) and kmetal's gateway on memory, SQLite and
//! PostgreSQL (each must pass every test), kmetal's gateway on a tenant slice of a shared etcd
//! with RBAC (every test but those that number a tenant's revisions as a fresh etcd would:
//! [`NUMBERING`]), and, reported beside them, kine on SQLite and PostgreSQL (the peer).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kmetal_datastore::Datastore;
use kmetal_datastore::MemoryStore;
use kmetal_datastore::etcd::{AuthBootstrap, EtcdConfig, EtcdProvisioner, EtcdStore};
use kmetal_datastore::gateway::Gateway;
use kmetal_datastore::postgres::{PgConfig, PgStore};
use kmetal_datastore::provision::{Provisioner, TenantSlice};
use kmetal_datastore::sqlite::{SqliteConfig, SqliteStore};
use kmetal_testkit::k8s_storage::{self, Backend, Outcome, Package, Report};
use kmetal_testkit::{
    EtcdCluster, EtcdOptions, EtcdRelease, Kine, KineBackend, PostgresOptions, PostgresServer,
};

type BoxError = Box<dyn Error + Send + Sync>;

/// A gateway serving `store` on a loopback port until dropped.
struct Served {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(store: Arc<dyn Datastore>) -> Result<(String, Served), BoxError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let task = tokio::spawn(async move {
        let _ = Gateway::new(store)
            .serve_on(listener, None, std::future::pending())
            .await;
    });
    Ok((endpoint, Served { task }))
}

/// Runs both packages against one backend kind and prints their summaries. A test that
/// fails is run once more against a fresh backend; one that then passes is printed as FLAKY
/// with its failure lines (the upstream watch-cache tests wait on timers of 100 ms to 1 s,
/// which two busy cores sometimes miss, and the gateway's progress answers race a SQL watch
/// hub: see the note on the datastore-guarantees issue), one that fails twice fails the run.
async fn suite<F, Fut>(name: &str, factory: F) -> Vec<Report>
where
    F: Fn(Duration) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Backend, BoxError>> + Send + 'static,
{
    let mut reports = Vec::new();
    for package in [Package::Etcd3, Package::Cacher] {
        let mut report = k8s_storage::run(package, name, factory.clone())
            .await
            .unwrap_or_else(|e| panic!("{name} {package:?}: {e}"));
        let failed: Vec<String> = report
            .top_level(Outcome::Fail)
            .into_iter()
            .map(str::to_owned)
            .collect();
        if !failed.is_empty() {
            let filter = format!("^({})$", failed.join("|"));
            let rerun = k8s_storage::run_filtered(package, name, Some(&filter), factory.clone())
                .await
                .unwrap_or_else(|e| panic!("{name} {package:?} rerun: {e}"));
            for test in &failed {
                if rerun.tests.get(test) != Some(&Outcome::Pass) {
                    continue;
                }
                // What the test said about its failure (Go's `file.go:123: message` lines).
                let first: Vec<String> = report
                    .output_of(test)
                    .lines()
                    .filter(|l| l.contains(".go:") || l.contains("--- FAIL"))
                    .take(20)
                    .map(str::to_owned)
                    .collect();
                println!(
                    "FLAKY (failed, then passed against a fresh backend): {name} {package:?} {test}\n{}",
                    first.join("\n")
                );
                let own = |n: &str| n == test || n.starts_with(&format!("{test}/"));
                report.tests.retain(|n, _| !own(n));
                report.tests.extend(
                    rerun
                        .tests
                        .iter()
                        .filter(|(n, _)| own(n))
                        .map(|(n, o)| (n.clone(), *o)),
                );
            }
        }
        println!("{}", report.summary());
        let skipped: Vec<&str> = report
            .tests
            .iter()
            .filter(|(_, o)| **o == Outcome::Skip)
            .map(|(n, _)| n.as_str())
            .collect();
        if !skipped.is_empty() {
            println!("  skipped (by the test itself): {}", skipped.join(", "));
        }
        reports.push(report);
    }
    reports
}

/// Fails with each failed test's output.
fn assert_all_pass(reports: &[Report]) {
    assert_all_pass_but(reports, &[]);
}

/// The tests that cannot apply to a tenant slice of a shared etcd. A tenant's revisions are
/// etcd's own (its writes carry the cluster's revision numbers, its responses its last
/// write's), so they are sparse: another tenant's write, or the marker write that records a
/// tenant's compaction, takes a number in between. These tests compute expected revisions as
/// a fresh, single-user etcd numbers them: "the next write is the current revision + 1"
/// (TestList's and TestConsistentList's consistent RVs, TestCompact's and
/// TestCompactConflict's revisions after a compaction, TestLists in the cacher), or absolute
/// revisions ("RV=1" is before the first write in TestWatchSemantics; "102" is in the future
/// in TestTooLargeResourceVersionErrorForWatchList). kube-apiserver itself only compares
/// revisions it was given.
const NUMBERING: &[(Package, &str)] = &[
    (Package::Etcd3, "TestCompact"),
    (Package::Etcd3, "TestCompactConflict"),
    (Package::Etcd3, "TestConsistentList"),
    (Package::Etcd3, "TestList"),
    (
        Package::Etcd3,
        "TestTooLargeResourceVersionErrorForWatchList",
    ),
    (Package::Cacher, "TestLists"),
    (Package::Cacher, "TestWatchSemantics"),
];

/// Every test passed but those `except` names (which may pass or fail).
fn assert_all_pass_but(reports: &[Report], except: &[(Package, &str)]) {
    let mut text = String::new();
    for r in reports {
        // A failing subtest fails its parent, so the top level covers every failure.
        for test in r.top_level(Outcome::Fail) {
            if except.contains(&(r.package, test)) {
                continue;
            }
            text.push_str(&format!(
                "\n==== {} {:?} {test}\n{}",
                r.backend,
                r.package,
                r.output_of(test)
            ));
        }
    }
    assert!(text.is_empty(), "failed tests:{text}");
}

/// The control: Kubernetes' tests against the etcd they were written for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_etcd_3_6_passes_kubernetes_storage_tests() {
    let reports = suite("etcd 3.6", |progress| async move {
        let etcd = EtcdCluster::start(EtcdOptions {
            release: EtcdRelease::V36,
            progress_notify_interval: Some(progress),
            ..EtcdOptions::default()
        })
        .await?;
        Ok(Backend::new(etcd.endpoints()[0].clone(), etcd))
    })
    .await;
    assert_all_pass(&reports);
}

/// kmetal's gateway over the memory driver passes every test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_on_memory_passes_kubernetes_storage_tests() {
    let reports = suite("kmetal gateway + memory", |progress| async move {
        let store = Arc::new(MemoryStore::new().with_progress_interval(progress));
        let (endpoint, served) = serve(store).await?;
        Ok(Backend::new(endpoint, served))
    })
    .await;
    assert_all_pass(&reports);
}

/// kmetal's gateway over the SQLite log passes every test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_on_sqlite_passes_kubernetes_storage_tests() {
    let reports = suite("kmetal gateway + SQLite", |progress| async move {
        let dir = tempfile::tempdir()?;
        let cfg = SqliteConfig::new(dir.path().join("t.db")).with_progress_interval(progress);
        let store = Arc::new(SqliteStore::open(cfg).await?);
        let (endpoint, served) = serve(store).await?;
        Ok(Backend::new(endpoint, (served, dir)))
    })
    .await;
    assert_all_pass(&reports);
}

/// kmetal's gateway over the PostgreSQL log (one database per test): every test passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_on_postgres_passes_kubernetes_storage_tests() {
    let pg = fast_postgres();
    let n = Arc::new(AtomicUsize::new(0));
    let reports = suite("kmetal gateway + PostgreSQL", move |progress| {
        let (pg, n) = (pg.clone(), n.clone());
        async move {
            let db = format!("k{}", n.fetch_add(1, Ordering::Relaxed));
            pg.create_database(&db).await?;
            let cfg = PgConfig::new(pg.url(&db)).with_progress_interval(progress);
            let store = Arc::new(PgStore::connect(cfg).await?);
            let (endpoint, served) = serve(store).await?;
            Ok(Backend::new(endpoint, served))
        }
    })
    .await;
    assert_all_pass(&reports);
}

/// A shared etcd 3.6 with auth on, and its provisioner.
struct SharedEtcd {
    cluster: Arc<EtcdCluster>,
    provisioner: EtcdProvisioner,
}

/// kmetal's gateway over a tenant slice (prefix + RBAC user) of a shared etcd 3.6: every test
/// passes but the [`NUMBERING`] ones. The watch progress interval is the server's, so the
/// tests that ask for the same interval share one cluster, each test a tenant of its own
/// (other tenants write while a test runs, as on a real shared etcd).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_on_shared_etcd_passes_kubernetes_storage_tests() {
    let clusters: Arc<tokio::sync::Mutex<BTreeMap<Duration, Arc<SharedEtcd>>>> = Arc::default();
    let n = Arc::new(AtomicUsize::new(0));
    let reports = suite("kmetal gateway + shared etcd", move |progress| {
        let (clusters, n) = (clusters.clone(), n.clone());
        async move {
            let shared = {
                let mut clusters = clusters.lock().await;
                match clusters.get(&progress) {
                    Some(s) => s.clone(),
                    None => {
                        let cluster = EtcdCluster::start(EtcdOptions {
                            release: EtcdRelease::V36,
                            progress_notify_interval: Some(progress),
                            ..EtcdOptions::default()
                        })
                        .await?;
                        let provisioner = EtcdProvisioner::shared(
                            EtcdConfig::new(cluster.endpoints()),
                            AuthBootstrap::EnableWithRoot {
                                password: "root-secret".into(),
                            },
                        )
                        .await?;
                        let s = Arc::new(SharedEtcd {
                            cluster: Arc::new(cluster),
                            provisioner,
                        });
                        clusters.insert(progress, s.clone());
                        s
                    }
                }
            };
            let tenant = format!("t{}", n.fetch_add(1, Ordering::Relaxed));
            let slice = TenantSlice::with_password(&tenant, &tenant, "tenant-secret");
            let creds = shared.provisioner.provision(&slice).await?;
            let store =
                Arc::new(EtcdStore::connect(creds.config(None), creds.keyspace.clone()).await?);
            let (endpoint, served) = serve(store).await?;
            Ok(Backend::new(endpoint, (served, shared.cluster.clone())))
        }
    })
    .await;
    report_failures(&reports);
    assert_all_pass_but(&reports, NUMBERING);
}

/// The peer: kine on SQLite and on PostgreSQL, reported beside ours (kine patches two of
/// these tests' expectations upstream, so failures here are expected and listed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kine_results_on_kubernetes_storage_tests() {
    let mut all = suite("kine + SQLite", |progress| async move {
        let kine = Kine::start_with(KineBackend::Sqlite, &progress_flag(progress)).await?;
        Ok(Backend::new(kine.endpoint(), kine))
    })
    .await;
    let pg = fast_postgres();
    let n = Arc::new(AtomicUsize::new(0));
    all.extend(
        suite("kine + PostgreSQL", move |progress| {
            let (pg, n) = (pg.clone(), n.clone());
            async move {
                let db = format!("kine{}", n.fetch_add(1, Ordering::Relaxed));
                let kine =
                    Kine::start_with(KineBackend::Postgres(pg.url(&db)), &progress_flag(progress))
                        .await?;
                Ok(Backend::new(kine.endpoint(), (kine, pg)))
            }
        })
        .await,
    );
    report_failures(&all);
}

/// Prints which tests failed on which backend, and checks that the suite really ran (a
/// backend that answered nothing would fail every test, not pass some).
fn report_failures(reports: &[Report]) {
    let mut failed: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in reports {
        for t in r.top_level(Outcome::Fail) {
            failed
                .entry(format!("{:?} {t}", r.package))
                .or_default()
                .push(r.backend.clone());
        }
    }
    for (test, backends) in &failed {
        println!("fails {test} on {}", backends.join(", "));
    }
    for r in reports {
        for t in r.top_level(Outcome::Fail) {
            let lines: Vec<String> = r
                .output_of(t)
                .lines()
                .filter(|l| {
                    (l.contains(".go:") && !l.starts_with(['W', 'E', 'I']))
                        || l.contains("--- FAIL")
                })
                .take(12)
                .map(str::to_owned)
                .collect();
            println!("{} {:?} {t}:\n{}", r.backend, r.package, lines.join("\n"));
        }
    }
    assert!(
        reports
            .iter()
            .all(|r| !r.top_level(Outcome::Pass).is_empty())
    );
}

/// A PostgreSQL 15 without fsync (test data is thrown away), shared by a suite's backends.
fn fast_postgres() -> Arc<PostgresServer> {
    Arc::new(
        PostgresServer::start(PostgresOptions {
            fsync: false,
            ..PostgresOptions::default()
        })
        .unwrap(),
    )
}

fn progress_flag(progress: Duration) -> Vec<String> {
    vec![format!(
        "--watch-progress-notify-interval={}ms",
        progress.as_millis()
    )]
}
