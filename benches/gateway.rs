//! The etcd v3 gateway against a real single-member etcd, the same client (etcd-client
//! through our etcd driver) for both, same machine, same run (issue 6 targets):
//! - gateway on memory: put throughput (32 clients) ≥ 1.0× etcd;
//! - gateway on PostgreSQL: put throughput (32 clients) ≥ 0.5× etcd;
//! - paginated range and watch latency reported for both.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::Arc;

use common::{etcd_client, fill_n, gateway, list_n, put_throughput, watch_latency};
use kmetal::datastore::postgres::{PgConfig, PgStore};
use kmetal::datastore::{Datastore, MemoryStore};
use kmetal_testkit::{EtcdCluster, EtcdOptions, PostgresOptions, PostgresServer};

const KEYS: usize = 20_000;

fn main() {
    let quick = common::quick();
    let rt = common::runtime();
    rt.block_on(async {
        let etcd = EtcdCluster::start(EtcdOptions::default()).await.unwrap();
        let pg = PostgresServer::start(PostgresOptions::default()).unwrap();
        pg.create_database("gw").await.unwrap();
        let direct = etcd_client(etcd.endpoint(0).unwrap()).await;
        let on_memory = etcd_client(gateway(Arc::new(MemoryStore::new())).await).await;
        let pg_store: Arc<dyn Datastore> = Arc::new(
            PgStore::connect(PgConfig::new(pg.conninfo("gw")))
                .await
                .unwrap(),
        );
        let on_pg = etcd_client(gateway(pg_store).await).await;
        let subjects = [
            ("etcd", &direct),
            ("gateway+memory", &on_memory),
            ("gateway+postgres", &on_pg),
        ];

        let per = if quick { 5 } else { 150 };
        for (_, s) in &subjects {
            put_throughput((*s).clone(), 5).await;
        }
        // Rounds run every subject back to back; each round's ratio pairs measurements taken
        // under the same conditions, and the median ratio is the headline.
        let rounds = if quick { 1 } else { 5 };
        let mut tp = [Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..rounds {
            for (i, (_, s)) in subjects.iter().enumerate() {
                tp[i].push(put_throughput((*s).clone(), per).await);
            }
        }
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!("put, 32 clients, 1 KiB (median of {rounds} interleaved rounds):");
        for (i, (name, _)) in subjects.iter().enumerate() {
            let ratios: Vec<f64> = tp[i].iter().zip(&tp[0]).map(|(x, e)| x / e).collect();
            println!(
                "  {name:<18} {:>8.0}/s  {:.2}x etcd",
                median(tp[i].clone()),
                median(ratios)
            );
        }

        let n = if quick { 10 } else { 300 };
        println!("watch latency write -> event:");
        for (name, s) in &subjects {
            let common::Latency { p50, p99, .. } =
                watch_latency((*s).clone(), (*s).clone(), n).await;
            println!("  {name:<18} p50 {p50:.2} ms  p99 {p99:.2} ms");
        }

        if !quick {
            println!("list {KEYS} keys by 500:");
            let mut base = 0.0;
            for (name, s) in &subjects {
                fill_n(s, KEYS).await;
                let t = list_n(s, KEYS).await.min(list_n(s, KEYS).await);
                if base == 0.0 {
                    base = t.as_secs_f64();
                }
                println!(
                    "  {name:<18} {t:>10.2?}  {:.2}x etcd's time",
                    t.as_secs_f64() / base
                );
            }
        }
    });
}
