//! The etcd driver against raw etcd-client on one real etcd, in one run: put (16 in flight),
//! range of 1,000 keys, and kube-apiserver's update txn (16 in flight); dedicated and shared
//! (prefixed) keyspaces. Prints each driver's throughput as a ratio of raw etcd-client's.
//!
//! Targets (issue 4): driver ≥ 0.9× raw; shared prefixing costs ≤ 5 % against dedicated.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use kmetal::datastore::Datastore;
use kmetal::datastore::etcd::{EtcdConfig, EtcdStore, Keyspace};
use kmetal::datastore::model::{
    Compare as KCompare, CompareOp as KCompareOp, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use kmetal_testkit::{EtcdCluster, EtcdOptions};

const IN_FLIGHT: u64 = 16;
const LIST_KEYS: usize = 1000;
const VALUE: [u8; 256] = [b'v'; 256];

/// Who answers: raw etcd-client or our driver in a keyspace.
#[derive(Clone)]
enum Subject {
    Raw(Arc<Client>),
    Driver(Arc<EtcdStore>),
}

impl Subject {
    /// Name in the report.
    fn label(&self) -> &'static str {
        match self {
            Self::Raw(_) => "raw",
            Self::Driver(s) if *s.keyspace() == Keyspace::Dedicated => "dedicated",
            Self::Driver(_) => "shared",
        }
    }

    /// The key this subject uses for `path`, so that every subject touches the same cluster
    /// keys (the shared store adds `/bench_tenant/` itself) and key lengths match.
    fn key(&self, path: &str) -> String {
        match self {
            Self::Driver(s) if *s.keyspace() != Keyspace::Dedicated => path.to_string(),
            _ => format!("/bench_tenant/{path}"),
        }
    }

    async fn put(&self, key: String) {
        match self {
            Self::Raw(c) => {
                c.kv_client().put(key, VALUE.to_vec(), None).await.unwrap();
            }
            Self::Driver(s) => {
                s.put(PutRequest::new(key, &VALUE[..])).await.unwrap();
            }
        }
    }

    async fn list(&self, prefix: &str) -> usize {
        match self {
            Self::Raw(c) => {
                let r = c
                    .kv_client()
                    .max_decoding_message_size(usize::MAX)
                    .get(prefix, Some(GetOptions::new().with_prefix()))
                    .await
                    .unwrap();
                r.kvs().len()
            }
            Self::Driver(s) => s
                .range(RangeRequest::prefix(prefix.to_string()))
                .await
                .unwrap()
                .kvs
                .len(),
        }
    }

    /// kube-apiserver's update: `If mod_revision(k) = R Then Put Else Get`, with a stale R
    /// half the time so both branches run.
    async fn update(&self, key: String, rev: i64) {
        match self {
            Self::Raw(c) => {
                let txn = Txn::new()
                    .when(vec![Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        rev,
                    )])
                    .and_then(vec![TxnOp::put(key.clone(), VALUE.to_vec(), None)])
                    .or_else(vec![TxnOp::get(key, None)]);
                c.kv_client().txn(txn).await.unwrap();
            }
            Self::Driver(s) => {
                let txn = TxnRequest {
                    compare: vec![KCompare::mod_revision(key.clone(), KCompareOp::Equal, rev)],
                    success: vec![RequestOp::Put(PutRequest::new(key.clone(), &VALUE[..]))],
                    failure: vec![RequestOp::Range(RangeRequest::get(key))],
                };
                s.txn(txn).await.unwrap();
            }
        }
    }
}

fn main() {
    let rt = common::runtime();
    let cluster = rt
        .block_on(EtcdCluster::start(EtcdOptions::default()))
        .expect("etcd (Debian package etcd-server) must be installed: run ./scripts/test.sh once");
    let subjects = rt.block_on(async {
        let raw = Client::connect(cluster.endpoints(), None).await.unwrap();
        let cfg = EtcdConfig::new(cluster.endpoints());
        let dedicated = EtcdStore::connect(cfg.clone(), Keyspace::Dedicated)
            .await
            .unwrap();
        let shared = EtcdStore::connect(cfg, Keyspace::shared("bench_tenant").unwrap())
            .await
            .unwrap();
        vec![
            Subject::Raw(Arc::new(raw)),
            Subject::Driver(Arc::new(dedicated)),
            Subject::Driver(Arc::new(shared)),
        ]
    });
    // 1,000 keys every subject lists (the same cluster keys for all).
    rt.block_on(async {
        for i in 0..LIST_KEYS {
            subjects[0]
                .put(subjects[0].key(&format!("/list/{i:05}")))
                .await;
        }
    });

    let mut c = Criterion::default()
        .output_directory(&common::criterion_dir())
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6))
        .configure_from_args();
    let counter = Arc::new(AtomicU64::new(0));
    for w in WORKLOADS {
        let mut g = c.benchmark_group(w.name());
        g.throughput(Throughput::Elements(w.ops()));
        for s in &subjects {
            g.bench_function(s.label(), |b| {
                b.to_async(&rt)
                    .iter(|| w.once(s.clone(), counter.fetch_add(IN_FLIGHT, Ordering::Relaxed)))
            });
        }
        g.finish();
    }
    c.final_summary();

    // Sequential groups drift with the machine (etcd's fsyncs, the other core's load), so the
    // headline ratios come from rounds that run every subject back to back, in rotating order.
    println!(
        "\nthroughput as a ratio of raw etcd-client (same etcd, same run; median of {ROUNDS} interleaved rounds):"
    );
    println!(
        "{:<18} {:>10} {:>10} {:>17}",
        "benchmark", "dedicated", "shared", "shared/dedicated"
    );
    for w in WORKLOADS {
        let [raw, ded, sh] = rt.block_on(paired(&subjects, w, &counter));
        println!(
            "{:<18} {:>9.3}x {:>9.3}x {:>16.3}x",
            w.name(),
            median(&raw, &ded),
            median(&raw, &sh),
            median(&ded, &sh)
        );
    }
    drop(cluster);
}

const ROUNDS: usize = 15;
const BATCHES_PER_ROUND: usize = 40;

/// What each subject is timed doing.
#[derive(Clone, Copy)]
enum Workload {
    /// 16 puts in flight.
    Put,
    /// One range over 1,000 keys.
    Range,
    /// 16 update txns in flight.
    Txn,
}

const WORKLOADS: [Workload; 3] = [Workload::Put, Workload::Range, Workload::Txn];

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Self::Put => "etcd_put",
            Self::Range => "etcd_range_1000",
            Self::Txn => "etcd_txn",
        }
    }

    fn ops(self) -> u64 {
        match self {
            Self::Range => 1,
            _ => IN_FLIGHT,
        }
    }

    async fn once(self, s: Subject, n: u64) {
        if let Self::Range = self {
            assert_eq!(s.list(&s.key("/list/")).await, LIST_KEYS);
            return;
        }
        let mut tasks = Vec::new();
        for i in 0..IN_FLIGHT {
            let s = s.clone();
            let key = |kind| s.key(&format!("/{kind}/{:08}", (n + i) % 10_000));
            tasks.push(match self {
                Self::Put => {
                    let k = key("put");
                    tokio::spawn(async move { s.put(k).await })
                }
                // Guard revision 1 never matches (the Else branch, a Get); revision 0 matches
                // only keys not yet written (the Then branch, a Put): both shapes run.
                _ => {
                    let k = key("txn");
                    let rev = i64::from(i % 2 == 0);
                    tokio::spawn(async move { s.update(k, rev).await })
                }
            });
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
}

/// Seconds per batch for each subject in each round.
async fn paired(subjects: &[Subject], w: Workload, counter: &AtomicU64) -> [Vec<f64>; 3] {
    let mut times: [Vec<f64>; 3] = Default::default();
    for round in 0..ROUNDS {
        for k in 0..subjects.len() {
            let i = (round + k) % subjects.len();
            let start = Instant::now();
            for _ in 0..BATCHES_PER_ROUND {
                w.once(
                    subjects[i].clone(),
                    counter.fetch_add(IN_FLIGHT, Ordering::Relaxed),
                )
                .await;
            }
            times[i].push(start.elapsed().as_secs_f64());
        }
    }
    times
}

/// Median over rounds of `base / other`: the other's throughput relative to the base's.
fn median(base: &[f64], other: &[f64]) -> f64 {
    let mut r: Vec<f64> = base.iter().zip(other).map(|(b, o)| b / o).collect();
    r.sort_by(f64::total_cmp);
    r.get(r.len() / 2).copied().unwrap_or(f64::NAN)
}
