//! The PostgreSQL revision log on a real PostgreSQL 15: the conformance suite (a fresh
//! database per check) and the quota-free limits.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kmetal_datastore::Datastore;
use kmetal_datastore::postgres::{PgConfig, PgStore};
use kmetal_testkit::{PostgresOptions, PostgresServer};

async fn create_db(pg: &PostgresServer, name: &str) {
    let (client, conn) = tokio_postgres::connect(&pg.conninfo("postgres"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_driver_conforms() {
    let pg = PostgresServer::start(PostgresOptions {
        fsync: false,
        ..PostgresOptions::default()
    })
    .unwrap();
    let n = AtomicUsize::new(0);
    let pg = &pg;
    kmetal_testkit::conformance::run("postgres", || {
        let name = format!("conf{}", n.fetch_add(1, Ordering::Relaxed));
        async move {
            create_db(pg, &name).await;
            let mut cfg = PgConfig::new(pg.conninfo(&name));
            cfg.request_timeout = Duration::from_secs(10);
            Arc::new(PgStore::connect(cfg).await.unwrap()) as Arc<dyn Datastore>
        }
    })
    .await;
}
