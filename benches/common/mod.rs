//! What the benchmarks share: how they run (quick mode, the runtime, criterion's output
//! folder) and the datastore workloads (put throughput, paginated list, watch latency), run
//! the same way against every subject.

#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use kmetal::datastore::Datastore;
use kmetal::datastore::model::{PutRequest, RangeRequest, WatchRequest, prefix_end};

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

/// Where criterion writes its reports (the workspace's `target/criterion`).
pub fn criterion_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/criterion")
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

/// Writes `n` keys of 128 bytes under `/list/` with [`WRITERS`] writers.
pub async fn fill_n(s: &Arc<dyn Datastore>, n: usize) {
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..n).step_by(WRITERS) {
                s.put(PutRequest::new(format!("/list/{i:06}"), vec![b'x'; 128]))
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

/// Write on `writer`, time until `watcher` delivers the event; percentiles in ms.
pub async fn watch_latency(
    writer: Arc<dyn Datastore>,
    watcher: Arc<dyn Datastore>,
    n: usize,
) -> (f64, f64) {
    let mut w = watcher
        .watch(WatchRequest::prefix("/lat/", 0))
        .await
        .unwrap();
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let start = Instant::now();
        writer
            .put(PutRequest::new(format!("/lat/{i}"), "x"))
            .await
            .unwrap();
        loop {
            let b = w.next().await.unwrap().unwrap();
            if b.events.iter().any(|e| e.kv.key == format!("/lat/{i}")) {
                break;
            }
        }
        samples.push(start.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    samples.sort_by(f64::total_cmp);
    (samples[n / 2], samples[n * 99 / 100])
}
