//! The simulator example end to end: JSON analysis of every bundled topology, SVG output,
//! placement from a tenants file, failure reports, and exit code 2 with a field path on bad
//! input.

use std::path::PathBuf;
use std::process::Output;

mod common;

fn simulator(args: &[&str]) -> Output {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    common::example("simulator")
        .args(args)
        .current_dir(&root)
        .output()
        .expect("the example runs")
}

fn topo(name: &str) -> String {
    format!("examples/topologies/{name}.yaml")
}

#[test]
fn analyze_json_for_every_bundled_topology() {
    for (name, pattern, tolerated) in [
        ("pattern-a", "A", 1),
        ("pattern-b", "B", 1),
        ("pattern-c", "C", 1),
        ("two-zone", "custom", 0),
    ] {
        let out = simulator(&["analyze", &topo(name), "--format", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{name}: not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        assert_eq!(v["pattern"], pattern, "{name}");
        assert_eq!(v["zone_failures_tolerated"], tolerated, "{name}");
        assert!(
            v["availability"]
                .as_f64()
                .is_some_and(|a| a > 0.99 && a < 1.0),
            "{name}"
        );
        let expected_exit = i32::from(name == "two-zone");
        assert_eq!(
            out.status.code(),
            Some(expected_exit),
            "{name}: exit 1 only with violations"
        );
    }
}

#[test]
fn analyze_text_svg_and_monte_carlo() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("t.svg");
    let out = simulator(&[
        "analyze",
        &topo("two-zone"),
        "--svg",
        svg.to_str().unwrap(),
        "--monte-carlo",
        "200",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("NEEDS ATTENTION") && text.contains("[TWO_ZONE_TRAP]"),
        "{text}"
    );
    assert!(text.contains("monte carlo over 200 years"), "{text}");
    let drawing = std::fs::read_to_string(&svg).unwrap();
    assert!(
        drawing.starts_with("<svg")
            && drawing.contains("room-1")
            && drawing.contains("commit latency")
    );
}

#[test]
fn place_from_a_tenants_file_and_fail_a_zone() {
    let dir = tempfile::tempdir().unwrap();
    let tenants = dir.path().join("tenants.yaml");
    std::fs::write(
        &tenants,
        "- { name: small, replicas: 2 }\n- { name: dedicated, replicas: 3, etcd_members: 3 }\n- { name: impossible, replicas: 1, cpu: 1000 }\n",
    )
    .unwrap();
    let out = simulator(&[
        "place",
        &topo("pattern-a"),
        "--tenants-file",
        tenants.to_str().unwrap(),
        "--format",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["placed"].as_array().unwrap().len(), 2);
    assert_eq!(v["failed"][0]["tenant"], "impossible");
    assert_eq!(v["failed"][0]["blocker"]["constraint"], "capacity");
    assert_eq!(out.status.code(), Some(1));

    let out = simulator(&[
        "fail",
        &topo("two-zone"),
        "--domain",
        "room-1",
        "--format",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["under_cluster_quorum"], false);
    assert_eq!(v["tenants_up"], 0);
    let out = simulator(&[
        "fail",
        &topo("two-zone"),
        "--domain",
        "room-2",
        "--format",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["under_cluster_quorum"], true);
}

#[test]
fn bad_input_exits_2_with_the_field_path() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(topo("pattern-a"))
            .unwrap()
            .replace("ms: 3.0", "ms: -3.0"),
    )
    .unwrap();
    let out = simulator(&["analyze", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rtt[0].ms: -3 is out of range"), "{err}");
    let out = simulator(&["fail", &topo("pattern-a"), "--domain", "atlantis"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown failure domain \"atlantis\""));
}

#[test]
fn patterns_table_covers_the_bundle() {
    let out = simulator(&["patterns"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for name in ["pattern-a", "pattern-b", "pattern-c", "two-zone"] {
        assert!(text.contains(name), "{text}");
    }
    assert!(out.status.success());
}
