//! The PostgreSQL revision log against a real single-member etcd, same machine, same run
//! (issue 5 targets):
//! - put throughput, 32 concurrent writers, 1 KiB values: PostgreSQL ≥ 0.5× etcd;
//! - listing 100,000 keys paginated by 500: ≤ 1.5× etcd's time;
//! - watch latency from a write to the event on a second store sharing the database
//!   (another process's view): p99 ≤ 10 ms.
//!
//! Both servers run with fsync on (durable), each through our driver for the same trait.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use kmetal::datastore::Datastore;
use kmetal::datastore::etcd::{EtcdConfig, EtcdStore, Keyspace};
use kmetal::datastore::model::{PutRequest, RangeRequest, WatchRequest, prefix_end};
use kmetal::datastore::postgres::{PgConfig, PgStore};
use kmetal_testkit::{EtcdCluster, EtcdOptions, PostgresOptions, PostgresServer};

const WRITERS: usize = 32;
const LIST_KEYS: usize = 100_000;

async fn put_throughput(s: Arc<dyn Datastore>, per_writer: usize) -> f64 {
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

async fn fill(s: &Arc<dyn Datastore>) {
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..LIST_KEYS).step_by(WRITERS) {
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
async fn list_all(s: &Arc<dyn Datastore>) -> Duration {
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
    assert_eq!(seen, LIST_KEYS);
    start.elapsed()
}

/// Write on `writer`, time until `watcher` delivers the event; percentiles in ms.
async fn watch_latency(
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

fn main() {
    // `cargo test --benches` runs benches as tests: keep that quick and still exercise it.
    let quick = std::env::args().any(|a| a == "--test" || a == "--list");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let etcd = EtcdCluster::start(EtcdOptions::default()).await.unwrap();
        let pg = PostgresServer::start(PostgresOptions::default()).unwrap();
        pg.create_database("bench").await.unwrap();
        let etcd_store: Arc<dyn Datastore> = Arc::new(
            EtcdStore::connect(EtcdConfig::new(etcd.endpoints()), Keyspace::Dedicated)
                .await
                .unwrap(),
        );
        let mut cfg = PgConfig::new(pg.conninfo("bench"));
        cfg.request_timeout = Duration::from_secs(30);
        let pg_store: Arc<dyn Datastore> = Arc::new(PgStore::connect(cfg.clone()).await.unwrap());
        let pg_other: Arc<dyn Datastore> = Arc::new(PgStore::connect(cfg).await.unwrap());

        let per = if quick { 5 } else { 150 };
        // Warm both, then alternate rounds so drift hits both alike.
        put_throughput(etcd_store.clone(), 5).await;
        put_throughput(pg_store.clone(), 5).await;
        let (mut e_tp, mut p_tp) = (Vec::new(), Vec::new());
        for _ in 0..if quick { 1 } else { 3 } {
            e_tp.push(put_throughput(etcd_store.clone(), per).await);
            p_tp.push(put_throughput(pg_store.clone(), per).await);
        }
        let med = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (e_tp, p_tp) = (med(e_tp), med(p_tp));
        println!("put, {WRITERS} writers, 1 KiB: etcd {e_tp:.0}/s, postgres {p_tp:.0}/s = {:.2}x (target >= 0.5x)", p_tp / e_tp);

        let n = if quick { 10 } else { 300 };
        let (e50, e99) = watch_latency(etcd_store.clone(), etcd_store.clone(), n).await;
        let (p50, p99) = watch_latency(pg_store.clone(), pg_other.clone(), n).await;
        println!(
            "watch latency write -> event: etcd p50 {e50:.2} ms p99 {e99:.2} ms; postgres (second store) p50 {p50:.2} ms p99 {p99:.2} ms (target p99 <= 10 ms)"
        );
        if !quick {
            fill(&etcd_store).await;
            fill(&pg_store).await;
            let (e_list, p_list) = (list_all(&etcd_store).await, list_all(&pg_store).await);
            let (e_list2, p_list2) = (list_all(&etcd_store).await, list_all(&pg_store).await);
            let (e_list, p_list) = (e_list.min(e_list2), p_list.min(p_list2));
            println!(
                "list {LIST_KEYS} keys by 500: etcd {e_list:.2?}, postgres {p_list:.2?} = {:.2}x etcd's time (target <= 1.5x)",
                p_list.as_secs_f64() / e_list.as_secs_f64()
            );
        }

    });
}
