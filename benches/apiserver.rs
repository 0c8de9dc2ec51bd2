//! Through a real kube-apiserver (issue 15, 3b): each backend behind a fresh apiserver in turn,
//! in one run — real etcd 3.6, kmetal's gateway on PostgreSQL, kine on the same PostgreSQL,
//! kmetal on SQLite, kine on SQLite:
//! - create 10,000 ConfigMaps (1 KiB) with 32 clients on kept-alive connections (as client-go
//!   keeps them): throughput, p99 and write errors;
//! - watch lag p99 under that load: a create's answer → its ADDED event at a watching client;
//! - list all 10,000 by 500;
//! - where the time goes: CPU seconds of the apiserver, of the backend's processes, and of this
//!   process (the clients, and kmetal's gateway when it is the backend) during the creates.
//!
//! Targets: kmetal PostgreSQL ≥ 3× kine PostgreSQL on creates and ≥ 0.7× etcd; watch lag p99
//! ≤ 2× etcd's; zero write errors on every kmetal backend.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kmetal::datastore::Datastore;
use kmetal::datastore::postgres::{PgConfig, PgStore};
use kmetal::datastore::sqlite::{SqliteConfig, SqliteStore};
use kmetal_testkit::http::{Client, Session};
use kmetal_testkit::kube::ApiserverOptions;
use kmetal_testkit::process::{cpu_time, cpu_time_with_children};
use kmetal_testkit::{
    EtcdCluster, EtcdOptions, EtcdRelease, Kine, KineBackend, KubeApiserver, PostgresOptions,
    PostgresServer,
};

const CLIENTS: usize = 32;
const CONFIGMAPS: &str = "/api/v1/namespaces/bench/configmaps";

/// One backend's figures.
struct Figures {
    name: &'static str,
    creates_per_s: f64,
    create_p99: Duration,
    errors: usize,
    lag_p50: Duration,
    lag_p99: Duration,
    unseen: usize,
    list: Duration,
    /// CPU during the creates: the apiserver, the backend's own processes, this process.
    cpu: [Duration; 3],
    wall: Duration,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn configmap(name: &str, filler: &str) -> String {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name},
        "data": {"v": filler},
    })
    .to_string()
}

/// The creates, from `clients` sessions: each create's answer time, by name, and the errors
/// (a non-201 answer or a failed exchange, after which the client opens a new session).
async fn create_all(
    client: &Client,
    n: usize,
    clients: usize,
) -> (HashMap<String, Instant>, Vec<Duration>, usize) {
    let filler = "x".repeat(1024);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (client, filler) = (client.clone(), filler.clone());
        tasks.push(tokio::spawn(async move {
            let mut session: Session = client.session().await.unwrap();
            let (mut answered, mut latencies, mut errors) = (Vec::new(), Vec::new(), 0);
            for i in (c..n).step_by(clients) {
                let name = format!("cm-{i:05}");
                let sent = Instant::now();
                match session
                    .request("POST", CONFIGMAPS, Some(configmap(&name, &filler)))
                    .await
                {
                    Ok(r) if r.status == 201 => {
                        let at = Instant::now();
                        latencies.push(at - sent);
                        answered.push((name, at));
                    }
                    Ok(r) => {
                        errors += 1;
                        eprintln!("create {name}: {} {}", r.status, r.text());
                    }
                    Err(e) => {
                        errors += 1;
                        eprintln!("create {name}: {e}");
                        session = client.session().await.unwrap();
                    }
                }
            }
            (answered, latencies, errors)
        }));
    }
    let (mut answered, mut latencies, mut errors) = (HashMap::new(), Vec::new(), 0);
    for t in tasks {
        let (a, l, e) = t.await.unwrap();
        answered.extend(a);
        latencies.extend(l);
        errors += e;
    }
    (answered, latencies, errors)
}

/// Lists every ConfigMap in pages of 500; the count and the time.
async fn list_all(client: &Client) -> (usize, Duration) {
    let mut session = client.session().await.unwrap();
    let start = Instant::now();
    let (mut items, mut token) = (0, String::new());
    loop {
        let path = if token.is_empty() {
            format!("{CONFIGMAPS}?limit=500")
        } else {
            format!("{CONFIGMAPS}?limit=500&continue={token}")
        };
        let page = session.request("GET", &path, None).await.unwrap();
        assert_eq!(page.status, 200, "{}", page.text());
        let page: serde_json::Value = serde_json::from_slice(&page.body).unwrap();
        items += page["items"].as_array().map_or(0, Vec::len);
        match page["metadata"]["continue"].as_str() {
            Some(t) if !t.is_empty() => token = t.to_string(),
            _ => return (items, start.elapsed()),
        }
    }
}

/// The CPU time used so far by the apiserver, the backend's processes and this process.
fn cpu_now(api: u32, backend: &[u32]) -> [Duration; 3] {
    [
        cpu_time(api).unwrap_or_default(),
        backend
            .iter()
            .filter_map(|p| cpu_time_with_children(*p))
            .sum(),
        cpu_time(std::process::id()).unwrap_or_default(),
    ]
}

/// A fresh apiserver on `endpoint`, and the figures of the load through it.
async fn measure(name: &'static str, endpoint: String, backend: Vec<u32>, n: usize) -> Figures {
    let api = KubeApiserver::start(ApiserverOptions::new([endpoint]))
        .await
        .unwrap();
    let client = api
        .client("admin.conf")
        .unwrap()
        .with_timeout(Duration::from_secs(60));
    let mut s = client.session().await.unwrap();
    let ns = r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"bench"}}"#;
    let r = s
        .request("POST", "/api/v1/namespaces", Some(ns.into()))
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{name}: {}", r.text());
    let list = s
        .request("GET", &format!("{CONFIGMAPS}?limit=1"), None)
        .await
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&list.body).unwrap();
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();

    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut lines = client
        .session()
        .await
        .unwrap()
        .stream(&format!(
            "{CONFIGMAPS}?watch=1&resourceVersion={rv}&timeoutSeconds=900"
        ))
        .await
        .unwrap();
    assert_eq!(lines.status(), 200, "{name}: watch");
    let watcher = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let at = Instant::now();
                let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if event["type"] == "ADDED"
                    && let Some(n) = event["object"]["metadata"]["name"].as_str()
                {
                    seen.lock().unwrap().insert(n.to_string(), at);
                }
            }
        })
    };

    let cpu0 = cpu_now(api.pid().unwrap(), &backend);
    let start = Instant::now();
    let (answered, mut latencies, errors) = create_all(&client, n, CLIENTS).await;
    let wall = start.elapsed();
    let cpu1 = cpu_now(api.pid().unwrap(), &backend);
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.lock().unwrap().len() < answered.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watcher.abort();
    let seen = seen.lock().unwrap().clone();
    let mut lags: Vec<Duration> = answered
        .iter()
        .filter_map(|(name, at)| Some(seen.get(name)?.saturating_duration_since(*at)))
        .collect();
    let unseen = answered.len() - lags.len();
    lags.sort();
    latencies.sort();

    let (count, first) = list_all(&client).await;
    assert_eq!(count, answered.len(), "{name}: listed");
    let (_, second) = list_all(&client).await;
    Figures {
        name,
        creates_per_s: answered.len() as f64 / wall.as_secs_f64(),
        create_p99: percentile(&latencies, 0.99),
        errors,
        lag_p50: percentile(&lags, 0.50),
        lag_p99: percentile(&lags, 0.99),
        unseen,
        list: first.min(second),
        cpu: [0, 1, 2].map(|i| cpu1[i].saturating_sub(cpu0[i])),
        wall,
    }
}

fn main() {
    let quick = common::quick();
    let n = if quick { 200 } else { 10_000 };
    let rt = common::runtime();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        // Durable like a deployment: fsync on for PostgreSQL, etcd and the SQLite files.
        let pg = PostgresServer::start(PostgresOptions::default()).unwrap();
        pg.create_database("kmetal").await.unwrap();
        let pg_pid = pg.pid().unwrap();
        let mut all = Vec::new();
        {
            let etcd = EtcdCluster::start(EtcdOptions {
                release: EtcdRelease::V36,
                ..EtcdOptions::default()
            })
            .await
            .unwrap();
            let pid = etcd.pid(0).unwrap();
            all.push(measure("etcd 3.6", etcd.endpoint(0).unwrap(), vec![pid], n).await);
        }
        {
            let store: Arc<dyn Datastore> = Arc::new(
                PgStore::connect(PgConfig::new(pg.conninfo("kmetal")))
                    .await
                    .unwrap(),
            );
            let endpoint = common::gateway(store).await;
            all.push(measure("kmetal PostgreSQL", endpoint, vec![pg_pid], n).await);
        }
        {
            let kine = Kine::start(KineBackend::Postgres(pg.url("kine")))
                .await
                .unwrap();
            let pids = vec![kine.pid().unwrap(), pg_pid];
            all.push(measure("kine PostgreSQL", kine.endpoint(), pids, n).await);
        }
        {
            let store: Arc<dyn Datastore> = Arc::new(
                SqliteStore::open(SqliteConfig::new(dir.path().join("kmetal.db")))
                    .await
                    .unwrap(),
            );
            let endpoint = common::gateway(store).await;
            all.push(measure("kmetal SQLite", endpoint, vec![], n).await);
        }
        {
            let kine = Kine::start(KineBackend::Sqlite).await.unwrap();
            let pids = vec![kine.pid().unwrap()];
            all.push(measure("kine SQLite", kine.endpoint(), pids, n).await);
        }
        report(&all, n);
    });
}

fn report(all: &[Figures], n: usize) {
    let etcd = &all[0];
    println!(
        "through kube-apiserver: {n} ConfigMaps (1 KiB) created by {CLIENTS} clients, then listed by 500:"
    );
    println!(
        "  {:<18} {:>9} {:>9} {:>6} {:>9} {:>9} {:>6} {:>9}   cpu s: apiserver / backend / bench process (wall)",
        "backend", "creates/s", "p99", "errors", "lag p50", "lag p99", "unseen", "list"
    );
    for f in all {
        println!(
            "  {:<18} {:>9.0} {:>9.2?} {:>6} {:>9.2?} {:>9.2?} {:>6} {:>9.2?}   {:.1} / {:.1} / {:.1} ({:.1})",
            f.name,
            f.creates_per_s,
            f.create_p99,
            f.errors,
            f.lag_p50,
            f.lag_p99,
            f.unseen,
            f.list,
            f.cpu[0].as_secs_f64(),
            f.cpu[1].as_secs_f64(),
            f.cpu[2].as_secs_f64(),
            f.wall.as_secs_f64(),
        );
    }
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    println!("ratios (to etcd 3.6 | to kine on the same database):");
    for (ours, kine) in [(1, 2), (3, 4)] {
        let (o, k) = (&all[ours], &all[kine]);
        println!(
            "  {:<18} creates {:.2}x etcd | {:.2}x kine (targets: >= 0.7x etcd on PostgreSQL, >= 3x kine)",
            o.name,
            ratio(o.creates_per_s, etcd.creates_per_s),
            ratio(o.creates_per_s, k.creates_per_s)
        );
        println!(
            "  {:<18} create p99 {:.2}x etcd | {:.2}x kine",
            "",
            ratio(o.create_p99.as_secs_f64(), etcd.create_p99.as_secs_f64()),
            ratio(o.create_p99.as_secs_f64(), k.create_p99.as_secs_f64())
        );
        println!(
            "  {:<18} watch lag p99 {:.2}x etcd (target <= 2x) | {:.2}x kine",
            "",
            ratio(o.lag_p99.as_secs_f64(), etcd.lag_p99.as_secs_f64()),
            ratio(o.lag_p99.as_secs_f64(), k.lag_p99.as_secs_f64())
        );
        println!(
            "  {:<18} list {:.2}x etcd | {:.2}x kine; write errors {} (target 0), kine {}",
            "",
            ratio(o.list.as_secs_f64(), etcd.list.as_secs_f64()),
            ratio(o.list.as_secs_f64(), k.list.as_secs_f64()),
            o.errors,
            k.errors
        );
    }
    for f in all.iter().filter(|f| f.name.starts_with("kmetal")) {
        assert_eq!(f.errors, 0, "{}: write errors", f.name);
        assert_eq!(f.unseen, 0, "{}: creates never seen by the watch", f.name);
    }
}
