//! Linearizability through the etcd_gateway process, checked (kmetal_testkit::history): four
//! clients run puts, gets and compare-and-sets on three keys of SQLite and of PostgreSQL
//! while faults hit (the gateway SIGKILLed and restarted; PostgreSQL restarted; the fault
//! proxy cutting the gateway's PostgreSQL connections). The history, with unknown outcomes
//! where a request failed, has a linearization, the checker rejects it with a stale read
//! added, and a watch resumed after every break sees each revision once, in order, every
//! acknowledged write among them. `cargo bench --bench linearizability` runs it longer.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kmetal_testkit::history::{self, Fault, GatewayProcess, Report, Workload};
use kmetal_testkit::{FaultProxy, LinkState, PostgresOptions, PostgresServer};

mod common;

fn gateway(ep: &str, datastore: &str) -> Arc<Mutex<GatewayProcess>> {
    let binary = common::example("etcd_gateway").get_program().into();
    Arc::new(Mutex::new(
        GatewayProcess::start(binary, ep, datastore).expect("gateway starts"),
    ))
}

fn show(name: &str, r: &Report) {
    eprintln!(
        "{name}: {} operations on {} keys ({} of unknown outcome, {} acknowledged writes) \
         linearizable, checked in {} ms; the watch saw {} revisions, each once",
        r.ops,
        r.keys,
        r.unknown,
        r.acked,
        r.checked_in.as_millis(),
        r.watched
    );
    assert!(r.unknown > 0, "{name}: the faults hit requests in flight");
    assert!(r.ops > 200, "{name}: a real workload ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_through_the_gateway_is_linearizable_across_gateway_kills() {
    let dir = tempfile::tempdir().expect("dir");
    let ep = format!(
        "127.0.0.1:{}",
        kmetal_testkit::ports::free_port().expect("port")
    );
    let gw = gateway(
        &ep,
        &format!("sqlite://{}", dir.path().join("lin.db").display()),
    );
    let down = Duration::from_millis(500);
    let faults = vec![
        GatewayProcess::kill_and_restart(&gw, Duration::from_secs(3), down),
        GatewayProcess::kill_and_restart(&gw, Duration::from_secs(3), down),
    ];
    let r = history::run(&ep, &Workload::default(), faults)
        .await
        .expect("checked");
    show("sqlite", &r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_through_the_gateway_is_linearizable_across_faults() {
    let pg = PostgresServer::start(PostgresOptions::default()).expect("postgres");
    pg.create_database("lin").await.expect("db");
    let upstream = std::net::SocketAddr::from(([127, 0, 0, 1], pg.port()));
    let proxy = Arc::new(FaultProxy::start(upstream).await.expect("proxy"));
    let url = format!("postgres://postgres:{}@{}/lin", pg.password(), proxy.addr());
    let ep = format!(
        "127.0.0.1:{}",
        kmetal_testkit::ports::free_port().expect("port")
    );
    let gw = gateway(&ep, &url);
    let pg = Arc::new(Mutex::new(pg));
    let cut = {
        let proxy = proxy.clone();
        Fault::new(Duration::from_secs(2), move || {
            proxy.reset();
            std::thread::sleep(Duration::from_millis(800));
            proxy.set_state(LinkState::Up);
        })
    };
    let restart = Fault::new(Duration::from_secs(2), move || {
        pg.lock().expect("pg").restart().expect("restart");
    });
    let kill =
        GatewayProcess::kill_and_restart(&gw, Duration::from_secs(2), Duration::from_millis(500));
    let r = history::run(&ep, &Workload::default(), vec![cut, restart, kill])
        .await
        .expect("checked");
    show("postgres", &r);
}
