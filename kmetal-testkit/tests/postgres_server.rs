//! Real PostgreSQL 15: starts in a temp dir, keeps data across a restart, accepts connections again.

use kmetal_testkit::{PostgresOptions, PostgresServer};
use tokio_postgres::NoTls;

async fn connect(pg: &PostgresServer) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&pg.conninfo("postgres"), NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepts_connections_again_after_restart() {
    let mut pg = PostgresServer::start(PostgresOptions::default()).expect("postgres");
    let c = connect(&pg).await;
    c.batch_execute("CREATE TABLE t (v int); INSERT INTO t VALUES (42);")
        .await
        .expect("write");

    pg.restart().expect("restart");
    assert!(
        c.simple_query("SELECT 1").await.is_err(),
        "old session is gone"
    );
    let c = connect(&pg).await;
    let row = c.query_one("SELECT v FROM t", &[]).await.expect("read");
    assert_eq!(row.get::<_, i32>(0), 42);

    pg.crash_restart().expect("crash restart");
    let c = connect(&pg).await;
    let row = c
        .query_one("SELECT v FROM t", &[])
        .await
        .expect("read after crash");
    assert_eq!(row.get::<_, i32>(0), 42);

    let bad = format!(
        "host=127.0.0.1 port={} user=postgres password=wrong dbname=postgres",
        pg.port()
    );
    assert!(
        tokio_postgres::connect(&bad, NoTls).await.is_err(),
        "password auth is enforced over TCP"
    );
}
