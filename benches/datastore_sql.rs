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
use std::time::Duration;

use kmetal::datastore::Datastore;
use kmetal::datastore::etcd::{EtcdConfig, EtcdStore, Keyspace};
use kmetal::datastore::postgres::{PgConfig, PgStore};
use kmetal_testkit::{EtcdCluster, EtcdOptions, PostgresOptions, PostgresServer};

mod common;

use common::{LIST_KEYS, WRITERS, fill_n, list_n, put_throughput, watch_latency};

fn main() {
    let quick = common::quick();
    let rt = common::runtime();
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
        cfg.log.request_timeout = Duration::from_secs(30);
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
        let common::Latency { p50: e50, p99: e99, .. } = watch_latency(etcd_store.clone(), etcd_store.clone(), n).await;
        let common::Latency { p50, p99, .. } = watch_latency(pg_store.clone(), pg_other.clone(), n).await;
        println!(
            "watch latency write -> event: etcd p50 {e50:.2} ms p99 {e99:.2} ms; postgres (second store) p50 {p50:.2} ms p99 {p99:.2} ms (target p99 <= 10 ms)"
        );
        if !quick {
            fill_n(&etcd_store, LIST_KEYS).await;
            fill_n(&pg_store, LIST_KEYS).await;
            let (e_list, p_list) = (list_n(&etcd_store, LIST_KEYS).await, list_n(&pg_store, LIST_KEYS).await);
            let (e_list2, p_list2) = (list_n(&etcd_store, LIST_KEYS).await, list_n(&pg_store, LIST_KEYS).await);
            let (e_list, p_list) = (e_list.min(e_list2), p_list.min(p_list2));
            println!(
                "list {LIST_KEYS} keys by 500: etcd {e_list:.2?}, postgres {p_list:.2?} = {:.2}x etcd's time (target <= 1.5x)",
                p_list.as_secs_f64() / e_list.as_secs_f64()
            );
        }

    });
}
