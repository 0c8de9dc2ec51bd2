//! Two OS processes on one PostgreSQL database, 8 writers in each (16 in all), a watcher in
//! each: both watchers see every revision exactly once, in order. The test re-runs its own
//! binary as the second process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use kmetal_datastore::Datastore;
use kmetal_datastore::model::{PutRequest, WatchRequest};
use kmetal_datastore::postgres::{PgConfig, PgStore};
use kmetal_testkit::{PostgresOptions, PostgresServer};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const WRITERS_PER_PROCESS: usize = 8;
const PUTS_PER_WRITER: usize = 25;
const TOTAL: usize = 2 * WRITERS_PER_PROCESS * PUTS_PER_WRITER;

/// One process's share: watch from `start`, wait for "go" on stdin, write, then report the
/// revisions its watcher saw (one per line) once it has them all.
async fn participant(
    conninfo: &str,
    start: i64,
    tag: &str,
    go: impl std::future::Future<Output = ()>,
) -> Vec<i64> {
    let s = Arc::new(PgStore::connect(PgConfig::new(conninfo)).await.unwrap());
    let mut w = s.watch(WatchRequest::prefix("/two/", start)).await.unwrap();
    go.await;
    let mut writers = Vec::new();
    for i in 0..WRITERS_PER_PROCESS {
        let (s, tag) = (s.clone(), tag.to_string());
        writers.push(tokio::spawn(async move {
            for j in 0..PUTS_PER_WRITER {
                s.put(PutRequest::new(format!("/two/{tag}/{i}/{j}"), "x"))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in writers {
        t.await.unwrap();
    }
    let mut revs = Vec::new();
    while revs.len() < TOTAL {
        let b = tokio::time::timeout(Duration::from_secs(20), w.next())
            .await
            .expect("watcher stalled")
            .unwrap()
            .unwrap();
        revs.extend(b.events.iter().map(|e| e.kv.mod_revision));
    }
    revs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_sixteen_writers_every_revision_once() {
    if let Ok(conninfo) = std::env::var("KMETAL_CHILD_CONNINFO") {
        // The second process.
        let start: i64 = std::env::var("KMETAL_CHILD_START")
            .unwrap()
            .parse()
            .unwrap();
        let go = async {
            let mut line = String::new();
            BufReader::new(tokio::io::stdin())
                .read_line(&mut line)
                .await
                .unwrap();
        };
        let revs = participant(&conninfo, start, "child", go).await;
        let mut out = tokio::io::stdout();
        for r in revs {
            out.write_all(format!("{r}\n").as_bytes()).await.unwrap();
        }
        out.flush().await.unwrap();
        return;
    }
    let pg = PostgresServer::start(PostgresOptions::default()).unwrap();
    pg.create_database("two").await.unwrap();
    let conninfo = pg.conninfo("two");
    let probe = PgStore::connect(PgConfig::new(&conninfo)).await.unwrap();
    let start = probe.status().await.unwrap().revision + 1;
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "two_processes_sixteen_writers_every_revision_once",
            "--exact",
            "--nocapture",
            "--quiet",
        ])
        .env("KMETAL_CHILD_CONNINFO", &conninfo)
        .env("KMETAL_CHILD_START", start.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let go = async move {
        // Let the child connect and register its watch, then start both at once.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stdin.write_all(b"go\n").await.unwrap();
        stdin.flush().await.unwrap();
    };
    let mine = participant(&conninfo, start, "parent", go).await;
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the child finishes")
        .unwrap();
    assert!(out.status.success(), "child failed");
    let theirs: Vec<i64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let expected: Vec<i64> = (start..start + TOTAL as i64).collect();
    assert_eq!(mine, expected, "this process's watcher");
    assert_eq!(theirs, expected, "the other process's watcher");
}
