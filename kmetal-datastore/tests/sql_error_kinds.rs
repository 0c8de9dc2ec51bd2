//! Every database error reaches the client as the kind it can act on, on both SQL dialects:
//! wrong credentials are PermissionDenied, a missing database or a constraint is Backend
//! (retrying will not help), a server that went away or a locked file is Unavailable (retry),
//! and the store serves again once the cause is gone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use kmetal_datastore::model::{PutRequest, RangeRequest};
use kmetal_datastore::postgres::{PgConfig, PgStore};
use kmetal_datastore::sqlite::{SqliteConfig, SqliteStore};
use kmetal_datastore::{Datastore, DatastoreError};
use kmetal_testkit::{PostgresOptions, PostgresServer};

fn kind(e: &DatastoreError) -> &'static str {
    match e {
        DatastoreError::PermissionDenied { .. } => "PermissionDenied",
        DatastoreError::Unavailable { .. } => "Unavailable",
        DatastoreError::Backend { .. } => "Backend",
        _ => "other",
    }
}

/// The error's whole chain, so a failed assertion shows what the database said.
fn chain(e: &DatastoreError) -> String {
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

async fn admin(pg: &PostgresServer) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&pg.conninfo("postgres"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

fn quick(url: String) -> PgConfig {
    let mut cfg = PgConfig::new(url);
    cfg.log.request_timeout = Duration::from_secs(3);
    cfg
}

/// PostgreSQL: wrong password, missing database, bad URL, a constraint the log trips over,
/// and the server going away mid-use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_errors_keep_their_kind() {
    let mut pg = PostgresServer::start(PostgresOptions {
        fsync: false,
        ..PostgresOptions::default()
    })
    .unwrap();
    let admin = admin(&pg).await;
    // Two statements: CREATE DATABASE refuses to run inside a transaction block.
    for sql in [
        "CREATE ROLE kinds LOGIN PASSWORD 'right'",
        "CREATE DATABASE kinds OWNER kinds",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    let url = |password: &str, db: &str| {
        format!(
            "host=127.0.0.1 port={} user=kinds password={password} dbname={db}",
            pg.port()
        )
    };

    let err = PgStore::connect(quick(url("wrong", "kinds")))
        .await
        .unwrap_err();
    assert_eq!(
        kind(&err),
        "PermissionDenied",
        "wrong password: {}",
        chain(&err)
    );
    let err = PgStore::connect(quick(url("right", "nowhere")))
        .await
        .unwrap_err();
    assert_eq!(kind(&err), "Backend", "missing database: {}", chain(&err));
    let err = PgStore::connect(quick("host=127.0.0.1 port=notaport".into()))
        .await
        .unwrap_err();
    assert_eq!(kind(&err), "Backend", "bad URL: {}", chain(&err));

    let store = PgStore::connect(quick(url("right", "kinds")))
        .await
        .unwrap();
    let rev = store
        .put(PutRequest::new("/a", "1"))
        .await
        .unwrap()
        .revision;
    // A row squatting on the next revision of /b: the log's unique (name, rev) index refuses
    // the put. The request fails as Backend, nothing half-written stays behind.
    let owner = tokio_postgres::connect(&url("right", "kinds"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(owner.1);
    let squat = format!(
        "INSERT INTO kmetal_kv (rev, name, create_revision, prev_revision, version, deleted, lease, value)
         VALUES ({}, '\\x2f62', 1, -1, 1, false, 0, '')",
        rev + 1
    );
    owner.0.batch_execute(&squat).await.unwrap();
    let err = store.put(PutRequest::new("/b", "2")).await.unwrap_err();
    assert_eq!(kind(&err), "Backend", "constraint: {}", chain(&err));
    owner
        .0
        .batch_execute("DELETE FROM kmetal_kv WHERE prev_revision = -1")
        .await
        .unwrap();
    let r = store.put(PutRequest::new("/b", "2")).await.unwrap();
    assert_eq!(
        r.revision,
        rev + 1,
        "no revision was used up by the refused put"
    );

    // The server goes away: Unavailable, then the same store serves again.
    pg.stop().unwrap();
    let err = store.range(RangeRequest::get("/a")).await.unwrap_err();
    assert_eq!(
        kind(&err),
        "Unavailable",
        "server gone (read): {}",
        chain(&err)
    );
    let err = store.put(PutRequest::new("/c", "3")).await.unwrap_err();
    assert_eq!(
        kind(&err),
        "Unavailable",
        "server gone (write): {}",
        chain(&err)
    );
    pg.resume().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match store.put(PutRequest::new("/c", "3")).await {
            Ok(_) => break,
            Err(e) if tokio::time::Instant::now() < deadline => {
                assert_eq!(kind(&e), "Unavailable", "while recovering: {}", chain(&e));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no recovery: {}", chain(&e)),
        }
    }
    assert_eq!(
        store.range(RangeRequest::prefix("/")).await.unwrap().count,
        3
    );
}

/// SQLite: a file that cannot be opened, a constraint the log trips over, and a file another
/// process holds locked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_errors_keep_their_kind() {
    let dir = tempfile::tempdir().unwrap();
    let err = SqliteStore::open(SqliteConfig::new(dir.path().join("missing/dir/t.db")))
        .await
        .unwrap_err();
    assert_eq!(kind(&err), "Backend", "missing database: {}", chain(&err));

    let path = dir.path().join("t.db");
    let mut cfg = SqliteConfig::new(&path);
    cfg.log.request_timeout = Duration::from_secs(30);
    let store = SqliteStore::open(cfg).await.unwrap();
    let rev = store
        .put(PutRequest::new("/a", "1"))
        .await
        .unwrap()
        .revision;
    let other = rusqlite::Connection::open(&path).unwrap();
    other
        .execute(
            "INSERT INTO kmetal_kv (rev, name, create_revision, prev_revision, version, deleted, lease, value)
             VALUES (?1, x'2f62', 1, -1, 1, 0, 0, x'')",
            [rev + 1],
        )
        .unwrap();
    let err = store.put(PutRequest::new("/b", "2")).await.unwrap_err();
    assert_eq!(kind(&err), "Backend", "constraint: {}", chain(&err));
    other
        .execute("DELETE FROM kmetal_kv WHERE prev_revision = -1", [])
        .unwrap();
    let r = store.put(PutRequest::new("/b", "2")).await.unwrap();
    assert_eq!(
        r.revision,
        rev + 1,
        "no revision was used up by the refused put"
    );

    // Another process holds the file's write lock past the busy timeout: retry later.
    other.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let err = store.put(PutRequest::new("/c", "3")).await.unwrap_err();
    assert_eq!(kind(&err), "Unavailable", "locked: {}", chain(&err));
    other.execute_batch("COMMIT").unwrap();
    store.put(PutRequest::new("/c", "3")).await.unwrap();
    assert_eq!(
        store.range(RangeRequest::prefix("/")).await.unwrap().count,
        3
    );
}

/// SQLite has no credentials: a file this process may not write is its PermissionDenied
/// (made immutable with `chattr +i`, which binds root too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_unwritable_file_is_permission_denied() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    drop(SqliteStore::open(SqliteConfig::new(&path)).await.unwrap());
    let chattr = |flag: &str| {
        let out = std::process::Command::new("chattr")
            .args([flag, path.to_str().unwrap()])
            .output()
            .expect("chattr (package e2fsprogs) runs");
        assert!(
            out.status.success(),
            "chattr {flag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    chattr("+i");
    let opened = SqliteStore::open(SqliteConfig::new(&path)).await;
    let written = match &opened {
        Ok(s) => s.put(PutRequest::new("/a", "1")).await.map(drop),
        Err(_) => Ok(()),
    };
    chattr("-i");
    let err = opened
        .err()
        .or(written.err())
        .expect("an immutable file refuses writes");
    assert_eq!(
        kind(&err),
        "PermissionDenied",
        "unwritable: {}",
        chain(&err)
    );
}
