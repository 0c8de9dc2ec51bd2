//! PostgreSQL failover, CloudNativePG's model: a primary with a synchronous streaming standby,
//! and the tenant's URL naming both hosts with `target_session_attrs=read-write`. The primary
//! is killed under write load and an open watch, then the standby is promoted. The driver and
//! its watch hub move to the new primary by themselves, every acknowledged write is there,
//! and the watch has no gap and no duplicate. Prints the failover time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kmetal_datastore::model::{PutRequest, RangeRequest, WatchRequest};
use kmetal_datastore::postgres::{PgConfig, PgStore};
use kmetal_datastore::{Datastore, DatastoreError};
use kmetal_testkit::{PostgresOptions, PostgresServer};

/// How long the primary stays dead before the standby is promoted (an operator's failover
/// delay; CloudNativePG's default is 0 once the primary's pod is gone).
const PROMOTE_AFTER: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_standby_takes_over_and_nothing_acknowledged_is_lost() {
    let mut primary = PostgresServer::start(PostgresOptions::default()).unwrap();
    primary.create_database("failover").await.unwrap();
    let mut standby = primary.start_standby().await.unwrap();
    let url = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=postgres password={} dbname=failover \
         target_session_attrs=read-write connect_timeout=2",
        primary.port(),
        standby.port(),
        primary.password()
    );
    let mut cfg = PgConfig::new(url);
    cfg.log.request_timeout = Duration::from_secs(3);
    let s = PgStore::connect(cfg).await.unwrap();
    let start = s.status().await.unwrap().revision + 1;
    let mut w = s.watch(WatchRequest::prefix("/f/", start)).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(std::sync::Mutex::new(Vec::<(String, Instant)>::new()));
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (s, stop, acked) = (s.clone(), stop.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("/f/{t}/{i:05}");
                match s.put(PutRequest::new(key.clone(), "x")).await {
                    Ok(_) => acked.lock().unwrap().push((key, Instant::now())),
                    // Mid-failover: no primary, or the write's outcome is unknown.
                    Err(DatastoreError::Unavailable { .. }) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => panic!("unexpected error {e:?}"),
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    primary.crash().unwrap();
    // From here no write can reach the old primary.
    let killed = Instant::now();
    tokio::time::sleep(PROMOTE_AFTER).await;
    standby.promote().unwrap();
    let promoted = Instant::now();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let first_after = acked
        .iter()
        .map(|(_, at)| *at)
        .filter(|at| *at > killed)
        .min()
        .expect("writes resumed on the promoted standby");
    let before = acked.iter().filter(|(_, at)| *at <= killed).count();
    eprintln!(
        "failover: primary killed, standby promoted after {} ms (pg_ctl promote took {} ms), \
         first acknowledged write {} ms after the kill ({} ms after the promotion); \
         {before} writes before, {} after",
        PROMOTE_AFTER.as_millis(),
        promoted
            .saturating_duration_since(killed + PROMOTE_AFTER)
            .as_millis(),
        (first_after - killed).as_millis(),
        first_after.saturating_duration_since(promoted).as_millis(),
        acked.len() - before
    );
    assert!(before > 0, "writes went to the primary first");

    let present = s.range(RangeRequest::prefix("/f/")).await.unwrap();
    let keys: HashSet<Vec<u8>> = present.kvs.iter().map(|kv| kv.key.to_vec()).collect();
    for (k, _) in &acked {
        assert!(
            keys.contains(k.as_bytes()),
            "acknowledged write {k} is present"
        );
    }
    // Every present key once, in revision order, across the failover.
    let mut seen = Vec::new();
    while seen.len() < present.kvs.len() {
        let b = tokio::time::timeout(Duration::from_secs(15), w.next())
            .await
            .expect("the watch goes on on the new primary")
            .unwrap()
            .unwrap();
        seen.extend(b.events.iter().map(|e| e.kv.mod_revision));
    }
    let mut expected: Vec<i64> = present.kvs.iter().map(|kv| kv.mod_revision).collect();
    expected.sort_unstable();
    assert_eq!(seen, expected, "no gap, no duplicate");
}
