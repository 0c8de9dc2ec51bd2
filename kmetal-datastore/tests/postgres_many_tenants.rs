//! 300 tenants on one PostgreSQL with `max_connections = 100`, one database each, all served
//! from one process (the operator's per-tenant endpoints) with lazy connections: every
//! tenant opens, writes, reads and watches its write; a full server answers with the typed,
//! retryable `Unavailable` (never a hang); once idle, the tenants hold no connection.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kmetal_datastore::model::{PutRequest, RangeRequest, WatchRequest};
use kmetal_datastore::postgres::{PgConfig, PgStore};
use kmetal_datastore::{Datastore, DatastoreError};
use kmetal_testkit::{PostgresOptions, PostgresServer};

const TENANTS: usize = 300;
const IDLE: Duration = Duration::from_secs(2);

/// Retries `f` while it fails with `Unavailable` (counted), for at most a minute.
async fn retried<T, F, Fut>(retries: &AtomicUsize, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, DatastoreError>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // Bounded: a full server must answer, not hang.
        match tokio::time::timeout(Duration::from_secs(20), f())
            .await
            .expect("answers")
        {
            Ok(v) => return v,
            Err(DatastoreError::Unavailable { .. }) if Instant::now() < deadline => {
                retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("only Unavailable is retried: {e:?}"),
        }
    }
}

/// Connections to the tenants' databases now (asked while the server may still be full).
async fn connections(pg: &PostgresServer) -> i64 {
    let (c, conn) = loop {
        match tokio_postgres::connect(&pg.conninfo("postgres"), tokio_postgres::NoTls).await {
            Ok(c) => break c,
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    let driver = tokio::spawn(conn);
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname LIKE 'tenant_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    drop(c);
    let _ = driver.await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_tenants_share_a_hundred_connections() {
    let pg = PostgresServer::start(PostgresOptions {
        fsync: false,
        max_connections: 100,
        ..PostgresOptions::default()
    })
    .unwrap();
    for t in 0..TENANTS {
        pg.create_database(&format!("tenant_{t}")).await.unwrap();
    }
    let retries = Arc::new(AtomicUsize::new(0));
    let began = Instant::now();
    let opened: Vec<_> = (0..TENANTS)
        .map(|t| {
            let (url, retries) = (pg.conninfo(&format!("tenant_{t}")), retries.clone());
            tokio::spawn(async move {
                let mut cfg = PgConfig::new(url).with_lazy_connections(IDLE);
                cfg.pool_size = 2;
                cfg.log.request_timeout = Duration::from_secs(10);
                retried(&retries, || PgStore::connect(cfg.clone())).await
            })
        })
        .collect();
    let mut stores = Vec::new();
    for o in opened {
        stores.push(Arc::new(o.await.unwrap()));
    }
    let served: Vec<_> = stores
        .iter()
        .enumerate()
        .map(|(t, s)| {
            let (s, retries) = (s.clone(), retries.clone());
            tokio::spawn(async move {
                let start = retried(&retries, || s.status()).await.revision + 1;
                let mut w = retried(&retries, || s.watch(WatchRequest::key("/k", start))).await;
                let value = format!("tenant {t}");
                retried(&retries, || s.put(PutRequest::new("/k", value.clone()))).await;
                let got = retried(&retries, || s.range(RangeRequest::get("/k"))).await;
                assert_eq!(got.kvs[0].value, value.as_bytes());
                let b = tokio::time::timeout(Duration::from_secs(30), w.next())
                    .await
                    .expect("the watch delivers")
                    .unwrap()
                    .unwrap();
                assert_eq!(b.events[0].kv.value, value.as_bytes(), "its own write");
            })
        })
        .collect();
    for s in served {
        s.await.unwrap();
    }
    eprintln!(
        "{TENANTS} tenants opened, wrote, read and watched in {:.1} s on max_connections = 100 \
         ({} requests retried after Unavailable)",
        began.elapsed().as_secs_f64(),
        retries.load(Ordering::Relaxed)
    );
    // Idle tenants give their connections back (a sweeper refused by the full server looks
    // again after a backoff of up to a minute, then rests until a lease is granted).
    let idle_since = Instant::now();
    let deadline = idle_since + Duration::from_secs(90);
    loop {
        let n = connections(&pg).await;
        if n == 0 {
            eprintln!(
                "no connection held {:.1} s after the last request",
                idle_since.elapsed().as_secs_f64()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{n} connections still held while idle"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // And they still serve.
    for s in stores.iter().take(10) {
        let r = retried(&retries, || s.range(RangeRequest::get("/k"))).await;
        assert_eq!(r.kvs.len(), 1);
    }
}

/// A lazy store's sweeper rests while there are no leases, yet a lease granted later still
/// expires (its keys deleted) on time, give or take the sweep interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_store_still_expires_its_leases() {
    let pg = PostgresServer::start(PostgresOptions {
        fsync: false,
        ..PostgresOptions::default()
    })
    .unwrap();
    pg.create_database("tenant_lazy").await.unwrap();
    let cfg = PgConfig::new(pg.conninfo("tenant_lazy")).with_lazy_connections(IDLE);
    let s = PgStore::connect(cfg).await.unwrap();
    // Resting first: no leases.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lease = s.lease_grant(1, 0).await.unwrap().id;
    s.put(PutRequest::new("/leased", "x").with_lease(lease))
        .await
        .unwrap();
    let granted = Instant::now();
    loop {
        let r = s.range(RangeRequest::get("/leased")).await.unwrap();
        if r.kvs.is_empty() {
            break;
        }
        assert!(
            granted.elapsed() < Duration::from_secs(15),
            "the lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "a 1 s lease expired after {:.1} s",
        granted.elapsed().as_secs_f64()
    );
}
