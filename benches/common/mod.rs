//! What the benchmarks share: how they run (quick mode, the runtime, criterion's output
//! folder) and the datastore workloads (put throughput, paginated list, watch latency), run
//! the same way against every subject.

#![allow(dead_code, clippy::unwrap_used)]

pub mod streams;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kmetal::datastore::Datastore;
use kmetal::datastore::model::{
    Compare, CompareOp, PutRequest, RangeRequest, RequestOp, TxnRequest, WatchRequest, prefix_end,
};

/// True when a benchmark runs as a test: a small workload that still exercises every path.
/// The rule is criterion's, so our own harnesses and criterion's agree: `cargo bench` passes
/// `--bench` (full run, unless `--test` is also given); `cargo test --benches` passes neither.
pub fn quick() -> bool {
    let (mut bench, mut test) = (false, false);
    for a in std::env::args() {
        match a.as_str() {
            "--bench" => bench = true,
            "--test" | "--list" => test = true,
            _ => {}
        }
    }
    test || !bench
}

/// The runtime every async benchmark runs on: two workers, the cores of the reference
/// machine, so ours and the peer share the same budget.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Builds the example `name` and returns its path: a release build for a measurement, the
/// test profile's (which `cargo test` has already made) in quick mode, where only the
/// workload's shape matters and a cold release build would cost CI minutes. The target
/// folder is the one this bench runs from (`<target>/<profile>/deps/`), so
/// `CARGO_TARGET_DIR` is honoured.
pub fn example(name: &str, quick: bool) -> std::path::PathBuf {
    use std::path::{Path, PathBuf};
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut build = std::process::Command::new(env!("CARGO"));
    build.args(["build", "--example", name]);
    if !quick {
        build.arg("--release");
    }
    let status = build.current_dir(&root).status().expect("cargo build");
    assert!(status.success(), "cargo build --example {name}");
    let target = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
        .unwrap_or_else(|| root.join("target"));
    target
        .join(if quick { "debug" } else { "release" })
        .join("examples")
        .join(name)
}

/// Where criterion writes its reports (the workspace's `target/criterion`).
pub fn criterion_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/criterion")
}

/// The client every gateway and peer benchmark measures through: etcd-client, behind our
/// etcd driver (dedicated keyspace, 30 s deadline).
pub async fn etcd_client(endpoint: String) -> Arc<dyn Datastore> {
    use kmetal::datastore::etcd::{EtcdConfig, EtcdStore, Keyspace};
    let cfg = EtcdConfig::new([endpoint]).with_request_timeout(Duration::from_secs(30));
    Arc::new(EtcdStore::connect(cfg, Keyspace::Dedicated).await.unwrap())
}

/// Serves `store` through the etcd v3 gateway on a loopback listener bound before the
/// gateway runs; returns the endpoint.
pub async fn gateway(store: Arc<dyn Datastore>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(kmetal::datastore::gateway::Gateway::new(store).serve_on(
        listener,
        None,
        std::future::pending(),
    ));
    format!("http://127.0.0.1:{port}")
}

/// Concurrent writers in the put benchmarks.
pub const WRITERS: usize = 32;
/// Keys in the list benchmarks.
pub const LIST_KEYS: usize = 100_000;

/// Puts per second with [`WRITERS`] concurrent writers of 1 KiB values.
pub async fn put_throughput(s: Arc<dyn Datastore>, per_writer: usize) -> f64 {
    let value = vec![b'v'; 1024];
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (s, value) = (s.clone(), value.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..per_writer {
                s.put(PutRequest::new(format!("/put/{w}/{i}"), value.clone()))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (WRITERS * per_writer) as f64 / start.elapsed().as_secs_f64()
}

/// kube-apiserver's create: put `key` if it does not exist (the only write shape every
/// subject takes; kine refuses plain puts).
pub fn create(key: String, value: Vec<u8>) -> TxnRequest {
    TxnRequest {
        compare: vec![Compare::mod_revision(key.clone(), CompareOp::Equal, 0)],
        success: vec![RequestOp::Put(PutRequest::new(key, value))],
        failure: vec![],
    }
}

/// Creates per second with [`WRITERS`] concurrent writers of 1 KiB values, under
/// `/create/<tag>/` (a tag per round keeps every key new).
pub async fn create_throughput(s: Arc<dyn Datastore>, per_writer: usize, tag: &str) -> f64 {
    let value = vec![b'v'; 1024];
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (s, value, tag) = (s.clone(), value.clone(), tag.to_owned());
        tasks.push(tokio::spawn(async move {
            for i in 0..per_writer {
                let r = s
                    .txn(create(format!("/create/{tag}/{w}/{i}"), value.clone()))
                    .await
                    .unwrap();
                assert!(r.succeeded, "the key was new");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (WRITERS * per_writer) as f64 / start.elapsed().as_secs_f64()
}

/// Writes `n` keys of 128 bytes under `/list/` with [`WRITERS`] writers.
pub async fn fill_n(s: &Arc<dyn Datastore>, n: usize) {
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..n).step_by(WRITERS) {
                s.txn(create(format!("/list/{i:06}"), vec![b'x'; 128]))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// kube-apiserver's paginated list: pages of 500 at one revision, continuing from
/// lastKey + "\0".
/// Time to list every `/list/` key in pages of 500 (expecting `n`).
pub async fn list_n(s: &Arc<dyn Datastore>, n: usize) -> Duration {
    let start = Instant::now();
    let end = prefix_end(b"/list/");
    let mut from = b"/list/".to_vec();
    let mut rev = 0;
    let mut seen = 0;
    loop {
        let page = s
            .range(
                RangeRequest::between(from.clone(), end.clone())
                    .with_limit(500)
                    .at_revision(rev),
            )
            .await
            .unwrap();
        if rev == 0 {
            rev = page.revision;
        }
        seen += page.kvs.len();
        if !page.more {
            break;
        }
        from = page.kvs.last().unwrap().key.to_vec();
        from.push(0);
    }
    assert_eq!(seen, n);
    start.elapsed()
}

/// Watch latency percentiles, in ms.
pub struct Latency {
    /// Create sent -> event delivered, median.
    pub p50: f64,
    /// Create sent -> event delivered, 99th percentile.
    pub p99: f64,
    /// Create answered -> event delivered, 99th percentile (0 when the event came first):
    /// the watch path alone, without the write's own commit.
    pub after_answer_p99: f64,
}

/// Create on `writer`, time until `watcher` delivers the event.
pub async fn watch_latency(
    writer: Arc<dyn Datastore>,
    watcher: Arc<dyn Datastore>,
    n: usize,
) -> Latency {
    let mut w = watcher
        .watch(WatchRequest::prefix("/lat/", 0))
        .await
        .unwrap();
    let mut samples = Vec::with_capacity(n);
    let mut after = Vec::with_capacity(n);
    for i in 0..n {
        let start = Instant::now();
        let key = format!("/lat/{i}");
        let mut write = std::pin::pin!(writer.txn(create(key.clone(), b"x".to_vec())));
        let mut answered = None;
        let mut seen = None;
        while answered.is_none() || seen.is_none() {
            tokio::select! {
                r = &mut write, if answered.is_none() => {
                    r.unwrap();
                    answered = Some(Instant::now());
                }
                b = w.next(), if seen.is_none() => {
                    let b = b.unwrap().unwrap();
                    if b.events.iter().any(|e| e.kv.key == key) {
                        seen = Some(Instant::now());
                    }
                }
            }
        }
        let (answered, seen) = (answered.unwrap(), seen.unwrap());
        samples.push((seen - start).as_secs_f64() * 1000.0);
        after.push(seen.saturating_duration_since(answered).as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    samples.sort_by(f64::total_cmp);
    after.sort_by(f64::total_cmp);
    Latency {
        p50: samples[n / 2],
        p99: samples[n * 99 / 100],
        after_answer_p99: after[n * 99 / 100],
    }
}
