//! The pki example end to end: init a tenant into kubeadm's layout, check expiration (text
//! and JSON), renew, rotate the CAs in two phases, and exit 2 naming the field on bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

fn pki(args: &[&str]) -> Output {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    common::example("pki")
        .args(args)
        .current_dir(&root)
        .output()
        .expect("the example runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn dir_arg(d: &Path) -> &str {
    d.to_str().expect("utf-8 temp path")
}

#[test]
fn init_check_renew_rotate() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let d = tmp.path();
    let out = pki(&[
        "init",
        "--tenant",
        "t1",
        "--endpoint",
        "api.t1.example.com:6443",
        "--san",
        "10.0.0.7",
        "--node",
        "cp-0",
        "--out",
        dir_arg(d),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    for f in [
        "pki/ca.crt",
        "pki/ca.key",
        "pki/apiserver.crt",
        "pki/etcd/ca.crt",
        "pki/sa.key",
        "pki/sa.pub",
        "admin.conf",
    ] {
        assert!(d.join(f).is_file(), "{f} written");
    }

    let out = pki(&["check-expiration", "--dir", dir_arg(d)]);
    let t = text(&out);
    assert!(
        out.status.success() && t.contains("CERTIFICATE AUTHORITY") && t.contains("apiserver"),
        "{t}"
    );
    let out = pki(&["check-expiration", "--dir", dir_arg(d), "--format", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert!(
        v.as_array()
            .is_some_and(|a| a.iter().any(|e| e["name"] == "admin.conf"))
    );

    let before = std::fs::read_to_string(d.join("pki/apiserver.crt")).expect("apiserver.crt");
    let out = pki(&["renew", "--dir", dir_arg(d), "apiserver"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_ne!(
        std::fs::read_to_string(d.join("pki/apiserver.crt")).expect("renewed"),
        before
    );
    let out = pki(&["renew", "--dir", dir_arg(d), "--all"]);
    assert!(
        out.status.success() && text(&out).contains("renewed admin.conf"),
        "{}",
        text(&out)
    );

    let out = pki(&["rotate-ca", "--dir", dir_arg(d), "--phase", "prepare"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(d.join("pki/ca-previous.crt").is_file() && d.join("pki/ca-bundle.crt").is_file());
    let out = pki(&["rotate-ca", "--dir", dir_arg(d), "--phase", "finalize"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!d.join("pki/ca-previous.crt").exists() && !d.join("pki/ca-cross.crt").exists());
    let out = pki(&["rotate-ca", "--dir", dir_arg(d), "--phase", "finalize"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "finalize without prepare is refused"
    );
}

#[test]
fn bad_input_exits_2_naming_the_field_or_file() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let out = pki(&[
        "init",
        "--tenant",
        "t1",
        "--endpoint",
        "api.example.com",
        "--san",
        "bad san!",
        "--out",
        dir_arg(tmp.path()),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("certSANs[0]"), "{}", text(&out));
    let out = pki(&[
        "init",
        "--tenant",
        "t1",
        "--endpoint",
        "api.example.com",
        "--service-cidr",
        "10.96.0.0/99",
        "--out",
        dir_arg(tmp.path()),
    ]);
    assert!(text(&out).contains("serviceCidr"), "{}", text(&out));
    let out = pki(&["check-expiration", "--dir", "/nonexistent/kmetal"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("/nonexistent/kmetal"), "{}", text(&out));
}

#[test]
fn rsa_2048_bundles_verify_with_openssl() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let d = tmp.path();
    let out = pki(&[
        "init",
        "--tenant",
        "r1",
        "--endpoint",
        "api.r1.example.com",
        "--algorithm",
        "rsa-2048",
        "--out",
        dir_arg(d),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let openssl = kmetal_testkit::process::find_binary("openssl", "openssl", &[]).expect("openssl");
    let info = Command::new(&openssl)
        .args(["x509", "-noout", "-text", "-in"])
        .arg(d.join("pki/apiserver.crt"))
        .output()
        .expect("openssl runs");
    let t = String::from_utf8_lossy(&info.stdout);
    assert!(t.contains("rsaEncryption") && t.contains("2048 bit"), "{t}");
    let verify = Command::new(&openssl)
        .arg("verify")
        .arg("-CAfile")
        .arg(d.join("pki/ca.crt"))
        .arg(d.join("pki/apiserver.crt"))
        .output()
        .expect("openssl runs");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let out = pki(&["renew", "--dir", dir_arg(d), "apiserver"]);
    assert!(out.status.success(), "renewal keeps RSA: {}", text(&out));
}
