//! The etcd v3 gateway with real clients: the etcd-client crate (through our etcd driver) runs
//! the whole conformance suite through the gateway on memory, SQLite and PostgreSQL, and
//! Debian's `etcdctl` (v3.4) drives put/get/del/txn/watch/lease/compaction/status against it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kmetal_datastore::etcd::{EtcdConfig, EtcdStore, Keyspace};
use kmetal_datastore::gateway::{Gateway, GatewayTls, Listen};
use kmetal_datastore::postgres::{PgConfig, PgStore};
use kmetal_datastore::sqlite::{SqliteConfig, SqliteStore};
use kmetal_datastore::{Datastore, MemoryStore};
use kmetal_testkit::process::find_binary;
use kmetal_testkit::{PostgresOptions, PostgresServer};

/// Serves `store` on a loopback port of its own (until the test ends); returns the port.
/// The listener is bound before the gateway runs, so no other socket can take the port in
/// between and clients never race the bind.
async fn serve_gateway(store: Arc<dyn Datastore>, tls: Option<GatewayTls>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(Gateway::new(store).serve_on(listener, tls, std::future::pending()));
    port
}

/// Serves `store` in plaintext; returns the endpoint.
async fn serve(store: Arc<dyn Datastore>) -> String {
    format!("http://127.0.0.1:{}", serve_gateway(store, None).await)
}

async fn through_gateway(store: Arc<dyn Datastore>) -> Arc<dyn Datastore> {
    let endpoint = serve(store).await;
    let cfg = EtcdConfig::new([endpoint]).with_request_timeout(Duration::from_secs(10));
    Arc::new(EtcdStore::connect(cfg, Keyspace::Dedicated).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_client_conforms_through_the_gateway_on_memory() {
    kmetal_testkit::conformance::run("gateway+memory", || async {
        through_gateway(Arc::new(
            MemoryStore::new().with_progress_interval(Duration::from_secs(1)),
        ))
        .await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_client_conforms_through_the_gateway_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let n = AtomicUsize::new(0);
    let base = dir.path().to_path_buf();
    kmetal_testkit::conformance::run("gateway+sqlite", || {
        let path = base.join(format!("g{}.db", n.fetch_add(1, Ordering::Relaxed)));
        async move {
            through_gateway(Arc::new(
                SqliteStore::open(
                    SqliteConfig::new(path).with_progress_interval(Duration::from_secs(1)),
                )
                .await
                .unwrap(),
            ))
            .await
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_client_conforms_through_the_gateway_on_postgres() {
    let pg = PostgresServer::start(PostgresOptions {
        fsync: false,
        ..PostgresOptions::default()
    })
    .unwrap();
    let n = AtomicUsize::new(0);
    let pg = &pg;
    kmetal_testkit::conformance::run("gateway+postgres", || {
        let name = format!("g{}", n.fetch_add(1, Ordering::Relaxed));
        async move {
            pg.create_database(&name).await.unwrap();
            through_gateway(Arc::new(
                PgStore::connect(
                    PgConfig::new(pg.conninfo(&name))
                        .with_progress_interval(Duration::from_secs(1)),
                )
                .await
                .unwrap(),
            ))
            .await
        }
    })
    .await;
}

fn etcdctl(endpoint: &str, args: &[&str]) -> (bool, String) {
    let bin = find_binary("etcdctl", "etcd-client", &[]).unwrap();
    let out = Command::new(bin)
        .env("ETCDCTL_API", "3")
        .arg(format!(
            "--endpoints={}",
            endpoint.trim_start_matches("http://")
        ))
        .arg("--command-timeout=5s")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_drives_the_gateway_on_each_driver() {
    let dir = tempfile::tempdir().unwrap();
    let pg = PostgresServer::start(PostgresOptions {
        fsync: false,
        ..PostgresOptions::default()
    })
    .unwrap();
    pg.create_database("ctl").await.unwrap();
    let stores: Vec<(&str, Arc<dyn Datastore>)> = vec![
        ("memory", Arc::new(MemoryStore::new())),
        (
            "sqlite",
            Arc::new(
                SqliteStore::open(SqliteConfig::new(dir.path().join("ctl.db")))
                    .await
                    .unwrap(),
            ),
        ),
        (
            "postgres",
            Arc::new(
                PgStore::connect(PgConfig::new(pg.conninfo("ctl")))
                    .await
                    .unwrap(),
            ),
        ),
    ];
    for (name, store) in stores {
        eprintln!("etcdctl against the gateway on {name}");
        etcdctl_script(serve(store).await).await;
    }
}

async fn etcdctl_script(ep: String) {
    let ok = |r: (bool, String)| {
        assert!(r.0, "{}", r.1);
        r.1
    };
    assert_eq!(ok(etcdctl(&ep, &["put", "/a/1", "one"])).trim(), "OK");
    ok(etcdctl(&ep, &["put", "/a/2", "two"]));
    ok(etcdctl(&ep, &["put", "/b/1", "bee"]));
    assert_eq!(
        ok(etcdctl(&ep, &["get", "/a/1", "--print-value-only"])).trim(),
        "one"
    );
    let prefix = ok(etcdctl(&ep, &["get", "/a/", "--prefix", "--keys-only"]));
    assert!(
        prefix.contains("/a/1") && prefix.contains("/a/2") && !prefix.contains("/b/1"),
        "{prefix}"
    );
    let json = ok(etcdctl(
        &ep,
        &["get", "/a/", "--prefix", "--limit=1", "-w", "json"],
    ));
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(
        (v["count"].as_i64(), v["more"].as_bool()),
        (Some(2), Some(true)),
        "{json}"
    );
    let rev = v["header"]["revision"].as_i64().unwrap();
    ok(etcdctl(&ep, &["put", "/a/1", "uno"]));
    assert_eq!(
        ok(etcdctl(
            &ep,
            &["get", "/a/1", "--print-value-only", &format!("--rev={rev}")]
        ))
        .trim(),
        "one",
        "reads at an older revision"
    );
    assert_eq!(ok(etcdctl(&ep, &["del", "/b/1"])).trim(), "1");

    // txn from stdin: compares, then success / failure requests.
    let bin = find_binary("etcdctl", "etcd-client", &[]).unwrap();
    let mut child = Command::new(&bin)
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", ep.trim_start_matches("http://")))
        .args(["txn"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"value(\"/a/1\") = \"uno\"\n\nput /txn/ok yes\n\nput /txn/bad no\n\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("SUCCESS"), "{text}");
    assert_eq!(
        ok(etcdctl(&ep, &["get", "/txn/ok", "--print-value-only"])).trim(),
        "yes"
    );

    // watch from a revision with prev-kv: replays history, then the command is ended.
    let watch = Command::new(&bin)
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", ep.trim_start_matches("http://")))
        .args(["watch", "/a/1", &format!("--rev={rev}"), "--prev-kv"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid = watch.id();
    let _ = Command::new("kill").arg(pid.to_string()).status();
    let out = watch.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("PUT") && text.contains("uno") && text.contains("one"),
        "{text}"
    );

    // leases
    let granted = ok(etcdctl(&ep, &["lease", "grant", "60"]));
    let id = granted.split_whitespace().nth(1).unwrap().to_string();
    ok(etcdctl(
        &ep,
        &["put", "/leased", "v", &format!("--lease={id}")],
    ));
    let once = ok(etcdctl(&ep, &["lease", "keep-alive", "--once", &id]));
    assert!(once.contains("keepalived with TTL"), "{once}");
    let ttl = ok(etcdctl(&ep, &["lease", "timetolive", &id, "--keys"]));
    assert!(
        ttl.contains("granted with TTL(60s)") && ttl.contains("/leased"),
        "{ttl}"
    );
    ok(etcdctl(&ep, &["lease", "revoke", &id]));
    assert_eq!(
        ok(etcdctl(&ep, &["get", "/leased", "--print-value-only"])).trim(),
        ""
    );
    let gone = ok(etcdctl(&ep, &["lease", "timetolive", &id]));
    assert!(gone.contains("already expired"), "{gone}");

    // compaction, then a read below it is refused with etcd's message.
    let cur = ok(etcdctl(&ep, &["get", "/a/1", "-w", "json"]));
    let cur: serde_json::Value = serde_json::from_str(cur.trim()).unwrap();
    let cur = cur["header"]["revision"].as_i64().unwrap();
    ok(etcdctl(&ep, &["compaction", &cur.to_string()]));
    let (okay, text) = etcdctl(&ep, &["get", "/a/1", &format!("--rev={rev}")]);
    assert!(
        !okay && text.contains("required revision has been compacted"),
        "{text}"
    );

    let st = ok(etcdctl(&ep, &["endpoint", "status", "-w", "json"]));
    assert!(st.contains("\"version\":\"3.5"), "{st}");
    let members = ok(etcdctl(&ep, &["member", "list"]));
    assert!(members.contains("kmetal-gateway"), "{members}");
    let (okay, text) = etcdctl(&ep, &["defrag"]);
    assert!(
        !okay && text.contains("does not implement"),
        "unimplemented answers at once: {text}"
    );
}

/// The gateway on a unix socket (next to an api-server), and on TCP with mTLS from a tenant
/// CA: the tenant's client certificate passes, a stranger's is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_and_mtls() {
    use kmetal_datastore::model::{PutRequest, RangeRequest};
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("etcd.sock");
    tokio::spawn(Gateway::new(Arc::new(MemoryStore::new())).serve(
        Listen::Unix(sock.clone()),
        None,
        std::future::pending(),
    ));
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // etcd clients from 3.5 (kube-apiserver's) dial unix sockets with a valid :authority;
    // etcdctl 3.4 sends the socket path there, which HTTP/2 servers refuse. Dial as 3.5 does.
    let path = sock.clone();
    let channel = tonic::transport::Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap();
    let mut client = etcd_client::Client::from_channel(etcd_client::Channel::Tonic(channel), None)
        .await
        .unwrap();
    client.put("k", "v", None).await.unwrap();
    let got = client.get("k", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"v");

    // mTLS with the tenant's own PKI: etcd's serving certificate and CA from the bundle, the
    // api-server's etcd client certificate passes, another tenant's does not.
    let bundle =
        kmetal_pki::Bundle::generate(&kmetal_pki::PkiSpec::new("t1", "api.t1.example.com"))
            .unwrap();
    let other = kmetal_pki::Bundle::generate(&kmetal_pki::PkiSpec::new("t2", "api.t2.example.com"))
        .unwrap();
    let file = |b: &kmetal_pki::Bundle, f: &str| b.get(f).unwrap().to_string();
    let tls = GatewayTls {
        cert_pem: file(&bundle, "pki/etcd/server.crt"),
        key_pem: file(&bundle, "pki/etcd/server.key"),
        client_ca_pem: Some(file(&bundle, "pki/etcd/ca.crt")),
    };
    let port = serve_gateway(Arc::new(MemoryStore::new()), Some(tls)).await;
    let config = |client: &kmetal_pki::Bundle| {
        EtcdConfig::new([format!("https://127.0.0.1:{port}")])
            .with_request_timeout(Duration::from_secs(3))
            .with_tls(kmetal_datastore::etcd::EtcdTls {
                ca_pem: file(&bundle, "pki/etcd/ca.crt"),
                identity: Some((
                    file(client, "pki/apiserver-etcd-client.crt"),
                    file(client, "pki/apiserver-etcd-client.key"),
                )),
                domain: Some("localhost".into()),
            })
    };
    let tenant = EtcdStore::connect(config(&bundle), Keyspace::Dedicated)
        .await
        .unwrap();
    tenant.put(PutRequest::new("/k", "v")).await.unwrap();
    assert_eq!(
        tenant.range(RangeRequest::get("/k")).await.unwrap().count,
        1
    );
    let refused = EtcdStore::connect(config(&other), Keyspace::Dedicated).await;
    assert!(
        refused.is_err(),
        "another tenant's client certificate must be refused"
    );
}
