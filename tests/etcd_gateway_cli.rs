//! The etcd_gateway example end to end: serve a SQLite file, etcdctl writes and reads through
//! it, SIGINT stops it cleanly (exit 0); a bad --datastore exits 2 naming the flag.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

#[test]
fn serves_etcdctl_and_shuts_down_on_sigint() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = kmetal_testkit::ports::free_port().expect("port");
    let db = dir.path().join("t.db");
    let mut gw = common::example("etcd_gateway")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--datastore", &format!("sqlite://{}", db.display())])
        .stderr(Stdio::piped())
        .spawn()
        .expect("gateway starts");
    let etcdctl =
        kmetal_testkit::process::find_binary("etcdctl", "etcd-client", &[]).expect("etcdctl");
    let ctl = |args: &[&str]| {
        Command::new(&etcdctl)
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints=127.0.0.1:{port}"))
            .args(args)
            .output()
            .expect("etcdctl runs")
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ctl(&["put", "/k", "v"]).status.success() {
        assert!(Instant::now() < deadline, "the gateway never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = ctl(&["get", "/k", "--print-value-only"]);
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "v");
    let _ = Command::new("kill")
        .args(["-INT", &gw.id().to_string()])
        .status();
    let status = gw.wait().expect("gateway exits");
    assert!(status.success(), "graceful shutdown exits 0: {status:?}");
    assert!(db.exists(), "the data is in the SQLite file");

    let out = common::example("etcd_gateway")
        .args(["--datastore", "cassandra://nope"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--datastore"));
}
