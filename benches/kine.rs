//! kmetal's SQL revision log behind the gateway against kine on the same databases, with real
//! etcd 3.6 as the reference: one client for every subject (etcd-client through our etcd
//! driver), same machine, same run, the requests kube-apiserver sends (issue 15, 3a):
//! - creates (kube-apiserver's create txn, 32 clients): target ≥ 3× kine on each database;
//! - watch latency create → event: target p99 ≤ 1/10 of kine's;
//! - list by 500 at one revision: target ≤ kine's time.
//!
//! kine only accepts the transaction shapes kube-apiserver uses (no plain put), so every write
//! here is a create.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::Arc;

use common::{create_throughput, etcd_client, fill_n, gateway, list_n, watch_latency};
use kmetal::datastore::Datastore;
use kmetal::datastore::postgres::{PgConfig, PgStore};
use kmetal::datastore::sqlite::{SqliteConfig, SqliteStore};
use kmetal_testkit::{
    EtcdCluster, EtcdOptions, EtcdRelease, Kine, KineBackend, PostgresOptions, PostgresServer,
};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let quick = common::quick();
    let rt = common::runtime();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        // Durable like a deployment: fsync on for PostgreSQL, etcd and both SQLite files.
        let pg = PostgresServer::start(PostgresOptions::default()).unwrap();
        let etcd = EtcdCluster::start(EtcdOptions {
            release: EtcdRelease::V36,
            ..EtcdOptions::default()
        })
        .await
        .unwrap();
        pg.create_database("kmetal").await.unwrap();
        let kmetal_pg: Arc<dyn Datastore> =
            Arc::new(PgStore::connect(PgConfig::new(pg.conninfo("kmetal"))).await.unwrap());
        let kmetal_sqlite: Arc<dyn Datastore> = Arc::new(
            SqliteStore::open(SqliteConfig::new(dir.path().join("kmetal.db")))
                .await
                .unwrap(),
        );
        let kine_pg = Kine::start(KineBackend::Postgres(pg.url("kine"))).await.unwrap();
        let kine_sqlite = Kine::start(KineBackend::Sqlite).await.unwrap();
        let subjects: Vec<(&str, Arc<dyn Datastore>)> = vec![
            ("etcd 3.6", etcd_client(etcd.endpoint(0).unwrap()).await),
            ("kmetal PostgreSQL", etcd_client(gateway(kmetal_pg).await).await),
            ("kine PostgreSQL", etcd_client(kine_pg.endpoint()).await),
            ("kmetal SQLite", etcd_client(gateway(kmetal_sqlite).await).await),
            ("kine SQLite", etcd_client(kine_sqlite.endpoint()).await),
        ];
        // Pairs compared: (ours, kine) on each database.
        let pairs = [(1, 2), (3, 4)];

        for (_, s) in &subjects {
            create_throughput(s.clone(), 3, "warm").await;
        }
        let (per, rounds) = if quick { (5, 1) } else { (100, 5) };
        let mut tp: Vec<Vec<f64>> = vec![Vec::new(); subjects.len()];
        // Rounds run every subject back to back, so each round's ratios pair measurements
        // taken under the same conditions; the median ratio is the headline.
        for round in 0..rounds {
            for (i, (_, s)) in subjects.iter().enumerate() {
                tp[i].push(create_throughput(s.clone(), per, &format!("r{round}")).await);
            }
        }
        println!("create (kube-apiserver's txn), 32 clients, 1 KiB, median of {rounds} interleaved rounds:");
        for (i, (name, _)) in subjects.iter().enumerate() {
            let vs_etcd = median(tp[i].iter().zip(&tp[0]).map(|(x, e)| x / e).collect());
            println!("  {name:<18} {:>8.0}/s  {vs_etcd:.2}x etcd", median(tp[i].clone()));
        }
        for (ours, kine) in pairs {
            let r = median(tp[ours].iter().zip(&tp[kine]).map(|(o, k)| o / k).collect());
            println!(
                "  {} / {}: {r:.2}x (target >= 3x)",
                subjects[ours].0, subjects[kine].0
            );
        }

        let n = if quick { 10 } else { 300 };
        println!("watch latency create -> event ({n} creates, one watcher):");
        let mut p99s = Vec::new();
        for (name, s) in &subjects {
            let l = watch_latency(s.clone(), s.clone(), n).await;
            println!(
                "  {name:<18} p50 {:>7.2} ms  p99 {:>7.2} ms  (answer -> event p99 {:>5.2} ms)",
                l.p50, l.p99, l.after_answer_p99
            );
            p99s.push(l.p99);
        }
        for (ours, kine) in pairs {
            println!(
                "  {} / {} p99: {:.3}x (target <= 0.1x)",
                subjects[ours].0,
                subjects[kine].0,
                p99s[ours] / p99s[kine]
            );
        }

        let keys = if quick { 1_000 } else { 20_000 };
        println!("list {keys} keys by 500 at one revision (best of 2):");
        let mut times = Vec::new();
        for (name, s) in &subjects {
            fill_n(s, keys).await;
            let t = list_n(s, keys).await.min(list_n(s, keys).await);
            println!("  {name:<18} {t:>10.2?}");
            times.push(t.as_secs_f64());
        }
        for (ours, kine) in pairs {
            println!(
                "  {} / {} time: {:.2}x (target <= 1x)",
                subjects[ours].0,
                subjects[kine].0,
                times[ours] / times[kine]
            );
        }
    });
}
