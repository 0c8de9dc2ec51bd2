//! Linearizability checked over a long run (issue 18 §6), the short version of which is
//! `tests/gateway_linearizability.rs`: the same recorded workload (kmetal_testkit::history:
//! four clients, puts, gets and CASes on three keys, a resumed watch) against real etcd 3.6
//! (the control, SIGKILLed and restarted) and the etcd_gateway process on SQLite (SIGKILLed
//! and restarted) and on PostgreSQL (its connections cut by the fault proxy, PostgreSQL
//! restarted, the gateway SIGKILLed, in turn). Prints the histories checked and any
//! violation, and each subject's completed operations per second beside etcd's.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kmetal_testkit::history::{self, Fault, GatewayProcess, Report, Workload};
use kmetal_testkit::{
    EtcdCluster, EtcdOptions, EtcdRelease, FaultProxy, LinkState, PostgresOptions, PostgresServer,
};

/// Seconds between faults, and how many faults a subject gets.
const EVERY: Duration = Duration::from_secs(4);

fn main() {
    let quick = common::quick();
    let faults = if quick { 1 } else { 15 };
    let rt = common::runtime();
    let gateway_bin = common::example("etcd_gateway", quick);
    rt.block_on(async {
        let workload = Workload::default();
        let mut rows: Vec<(&str, Report)> = Vec::new();

        // etcd 3.6, the control.
        let etcd = Arc::new(tokio::sync::Mutex::new(
            EtcdCluster::start(EtcdOptions {
                release: EtcdRelease::V36,
                ..EtcdOptions::default()
            })
            .await
            .unwrap(),
        ));
        let ep = etcd.lock().await.endpoint(0).unwrap();
        let rt_handle = tokio::runtime::Handle::current();
        let kills = (0..faults)
            .map(|_| {
                let (etcd, h) = (etcd.clone(), rt_handle.clone());
                Fault::new(EVERY, move || {
                    h.block_on(async {
                        let mut e = etcd.lock().await;
                        e.kill(0).unwrap();
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        e.restart(0).await.unwrap();
                    });
                })
            })
            .collect();
        rows.push(timed("etcd 3.6", &ep, &workload, kills).await);

        // The gateway on SQLite.
        let dir = tempfile::tempdir().unwrap();
        let ep = format!("127.0.0.1:{}", kmetal_testkit::ports::free_port().unwrap());
        let db = format!("sqlite://{}", dir.path().join("lin.db").display());
        let gw = Arc::new(Mutex::new(
            GatewayProcess::start(gateway_bin.clone(), &ep, &db).unwrap(),
        ));
        let down = Duration::from_millis(500);
        let kills = (0..faults)
            .map(|_| GatewayProcess::kill_and_restart(&gw, EVERY, down))
            .collect();
        rows.push(timed("gateway+sqlite", &ep, &workload, kills).await);
        drop(gw);

        // The gateway on PostgreSQL, three kinds of fault in turn.
        let pg = PostgresServer::start(PostgresOptions::default()).unwrap();
        pg.create_database("lin").await.unwrap();
        let upstream = std::net::SocketAddr::from(([127, 0, 0, 1], pg.port()));
        let proxy = Arc::new(FaultProxy::start(upstream).await.unwrap());
        let url = format!("postgres://postgres:{}@{}/lin", pg.password(), proxy.addr());
        let ep = format!("127.0.0.1:{}", kmetal_testkit::ports::free_port().unwrap());
        let gw = Arc::new(Mutex::new(
            GatewayProcess::start(gateway_bin.clone(), &ep, &url).unwrap(),
        ));
        let pg = Arc::new(Mutex::new(pg));
        let faults = (0..faults)
            .map(|i| match i % 3 {
                0 => {
                    let proxy = proxy.clone();
                    Fault::new(EVERY, move || {
                        proxy.reset();
                        std::thread::sleep(Duration::from_millis(800));
                        proxy.set_state(LinkState::Up);
                    })
                }
                1 => {
                    let pg = pg.clone();
                    Fault::new(EVERY, move || pg.lock().unwrap().restart().unwrap())
                }
                _ => GatewayProcess::kill_and_restart(&gw, EVERY, down),
            })
            .collect();
        rows.push(timed("gateway+postgres", &ep, &workload, faults).await);

        let etcd_rate = rows[0].1.rate();
        println!(
            "\nlinearizability under faults ({} s between faults)",
            EVERY.as_secs()
        );
        println!(
            "{:<18} {:>8} {:>8} {:>8} {:>9} {:>8} {:>10} {:>8}",
            "subject", "ops", "unknown", "acked", "watched", "check", "ops/s", "vs etcd"
        );
        for (name, r) in &rows {
            println!(
                "{:<18} {:>8} {:>8} {:>8} {:>9} {:>6}ms {:>10.0} {:>7.2}x",
                name,
                r.ops,
                r.unknown,
                r.acked,
                r.watched,
                r.checked_in.as_millis(),
                r.rate(),
                r.rate() / etcd_rate
            );
        }
        println!("every history linearizable, every watch complete and in order");
    });
}

async fn timed(
    name: &'static str,
    ep: &str,
    w: &Workload,
    faults: Vec<Fault>,
) -> (&'static str, Report) {
    let r = history::run(ep, w, faults)
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    (name, r)
}
