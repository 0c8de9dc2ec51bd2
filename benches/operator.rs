//! The operator: 1,000 tenants to Ready on the embedded default (SQLite management store,
//! SQLite slices, PKI, Konnectivity server per tenant) — target ≤ 30 s on 2 cores — and
//! resident memory per tenant (peak RSS at 1,000 tenants minus at 10, per tenant).
//!
//! Builds and runs the release operator (`examples/operator`) the way a user does:
//! `apply -f` then `run --once`; only `run --once` is timed. No control plane runs
//! (`--runtime none`): this is the operator's own cost; `benches/control_plane.rs` measures
//! tenants with real ones.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

fn manifests(dir: &Path, n: usize) -> PathBuf {
    let mut y = format!(
        "apiVersion: kamaji.clastix.io/v1alpha1\nkind: DataStore\nmetadata: {{name: embedded}}\nspec: {{driver: SQLite, endpoints: [{}]}}\n",
        dir.join("slices").display()
    );
    for i in 0..n {
        y.push_str(&format!(
            "---\napiVersion: kamaji.clastix.io/v1alpha1\nkind: TenantControlPlane\nmetadata: {{name: t{i:04}, namespace: tenants}}\nspec:\n  dataStore: embedded\n  controlPlane: {{deployment: {{replicas: 2}}, service: {{serviceType: ClusterIP}}}}\n  kubernetes: {{version: v1.30.2}}\n"
        ));
    }
    let f = dir.join("tenants.yaml");
    std::fs::write(&f, y).unwrap();
    f
}

/// (seconds, peak RSS KiB) of `run --once` over `n` fresh tenants.
fn run(op: &Path, n: usize) -> (f64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let state = format!("sqlite://{}/m.db", dir.path().display());
    let file = manifests(dir.path(), n);
    let out = Command::new(op)
        .args(["apply", "-f"])
        .arg(&file)
        .args(["--state", &state])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let topology =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/topologies/under-cluster.yaml");
    let started = Instant::now();
    let out = Command::new(op)
        .args([
            "run",
            "--once",
            "--runtime",
            "none",
            "--format",
            "json",
            "--state",
            &state,
        ])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--topology")
        .arg(&topology)
        .output()
        .unwrap();
    let took = started.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), n);
    assert!(rows.iter().all(|r| r["ready"] == true));
    let rss = stderr
        .lines()
        .find_map(|l| l.split("peak RSS ").nth(1))
        .and_then(|v| v.trim_end_matches(" KiB").parse().ok())
        .unwrap_or(0);
    (took, rss)
}

fn main() {
    let quick = common::quick();
    let op = common::example("operator", quick);
    let n = if quick { 50 } else { 1000 };
    let (small_t, small_rss) = run(&op, 10);
    let (t, rss) = run(&op, n);
    println!("operator, embedded default (SQLite store and slices), 2 replicas per tenant:");
    println!(
        "  {n:>5} tenants to Ready: {t:6.2} s   ({:.2}x the 30 s target; {:.1} ms per tenant)",
        t / 30.0,
        t * 1e3 / n as f64
    );
    println!("     10 tenants to Ready: {small_t:6.2} s");
    println!(
        "  peak RSS {} MiB at {n} tenants, {} MiB at 10: {:.0} KiB per tenant",
        rss / 1024,
        small_rss / 1024,
        (rss.saturating_sub(small_rss)) as f64 / (n - 10) as f64
    );
}
