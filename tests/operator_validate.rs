//! `examples/operator validate`: samples pass, broken manifests list every problem, exit codes.

use std::path::PathBuf;
use std::process::Command;

mod common;

fn operator() -> Command {
    common::example("operator")
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_sample_manifest_validates() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("examples/manifests"))
        .expect("manifests dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.push(root().join("examples/manifests/demo/tenants.yaml"));
    files.sort();
    assert!(files.len() >= 7, "{files:?}");
    let mut cmd = operator();
    cmd.arg("validate");
    for f in &files {
        cmd.arg("-f").arg(f);
    }
    let out = cmd.output().expect("run operator");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.ends_with(": ok")).count(),
        11,
        "{stdout}"
    );
    for kind in [
        "DataStore/etcd-shared",
        "DataStore/postgres-main",
        "DataStore/embedded",
    ] {
        assert!(stdout.contains(&format!("{kind}: ok")), "{stdout}");
    }
}

#[test]
fn broken_manifest_lists_every_problem_and_exits_1() {
    let file = root().join("tests/fixtures/broken.yaml");
    let out = operator()
        .args(["validate", "-f"])
        .arg(&file)
        .output()
        .expect("run operator");
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let f = file.display();
    let expected = [
        format!(
            "{f}: TenantControlPlane/broken-tenant: spec.controlPlane.deployment.replicas: must be at least 1 (found 0)"
        ),
        format!(
            "{f}: TenantControlPlane/broken-tenant: spec.controlPlane.service.serviceType: required"
        ),
        format!(
            "{f}: TenantControlPlane/broken-tenant: spec.kubernetes.version: invalid version \"1.30\": must look like v1.30.2"
        ),
        format!(
            "{f}: TenantControlPlane/broken-tenant: spec.networkProfile.port: must be 1..=65535"
        ),
        format!(
            "{f}: TenantControlPlane/broken-tenant: spec.networkProfile.advertiseAddress: must be an IP address (found \"api.example.com\")"
        ),
        format!(
            "{f}: TenantControlPlane/broken-tenant: spec.networkProfile.serviceCidr: invalid CIDR \"10.96.0.0/33\": prefix length must be 0..=32"
        ),
        format!(
            "{f}: TenantControlPlane/broken-tenant: spec.addons.konnectivity.agent.replicas: must be 0 when spec.addons.konnectivity.agent.mode is DaemonSet"
        ),
        format!(
            "{f}: DataStore/broken-etcd: spec.endpoints[0]: invalid endpoint \"etcd-0\": missing ':port' (expected host:port)"
        ),
        format!(
            "{f}: DataStore/broken-etcd: spec.tlsConfig.certificateAuthority.certificate.content: content must be base64"
        ),
        format!(
            "{f}: DataStore/broken-etcd: spec.tlsConfig.certificateAuthority.privateKey: required"
        ),
        format!("{f}: DataStore/broken-etcd: spec.tlsConfig.clientCertificate: required"),
        format!("{f}: ConfigMap/not-ours: skipped: v1 ConfigMap is not a kmetal kind"),
    ];
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, expected, "{stdout}");
}

#[test]
fn unparsable_or_missing_files_exit_2_with_position() {
    let file = root().join("tests/fixtures/unparsable.yaml");
    let out = operator()
        .args(["validate", "-f"])
        .arg(&file)
        .output()
        .expect("run operator");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let prefix = format!("{}:", file.display());
    let rest = stderr.strip_prefix(&prefix).expect("file name first");
    let mut parts = rest.splitn(3, ':');
    let line: u64 = parts
        .next()
        .and_then(|l| l.parse().ok())
        .expect("line number");
    let col: u64 = parts
        .next()
        .and_then(|c| c.parse().ok())
        .expect("column number");
    assert!(line >= 3 && col >= 1, "{stderr}");

    let out = operator()
        .args(["validate", "-f", "/nonexistent/kmetal.yaml", "-f"])
        .arg(root().join("tests/fixtures/broken.yaml"))
        .output()
        .expect("run operator");
    assert_eq!(
        out.status.code(),
        Some(2),
        "read errors outrank invalid objects"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/kmetal.yaml"));
}
