//! `examples/tunnel`: bad flags and missing PKI files get clear errors naming what is wrong.

mod common;

fn fails_with(args: &[&str], needle: &str) {
    let out = common::example("tunnel").args(args).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(stderr.contains(needle), "{args:?}: {stderr}");
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().to_str().expect("utf-8");
    fails_with(
        &["agent", "--server", "127.0.0.1:1", "--pki", pki],
        "pki/ca.crt: No such file",
    );
    kmetal_pki::Bundle::generate(&kmetal_pki::PkiSpec::new("t", "127.0.0.1:6443"))
        .expect("bundle")
        .write_dir(dir.path())
        .expect("write");
    fails_with(
        &[
            "agent",
            "--server",
            "127.0.0.1:1",
            "--pki",
            pki,
            "--identity",
            "zone=a",
        ],
        "--identity \"zone=a\": unknown identifier kind",
    );
    fails_with(
        &[
            "agent",
            "--server",
            "127.0.0.1:1",
            "--pki",
            pki,
            "--identity",
            "ipv4=1.2.3",
        ],
        "is not an ipv4 address",
    );
    fails_with(
        &[
            "server",
            "--agent-listen",
            "127.0.0.1:0",
            "--connect-listen",
            "127.0.0.1:0",
            "--pki",
            pki,
            "--server-id",
            "s0",
            "--proxy-strategies",
            "nearest",
        ],
        "unknown proxy strategy \"nearest\"",
    );
    fails_with(
        &[
            "server",
            "--agent-listen",
            "256.0.0.1:0",
            "--connect-listen",
            "127.0.0.1:0",
            "--pki",
            pki,
            "--server-id",
            "s0",
        ],
        "binding 256.0.0.1:0",
    );
}
