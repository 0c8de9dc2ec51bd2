//! The README's main job: the operator demo brings up its bundled tenants with real control
//! planes and prints the kubectl command that reaches each; every command works, a tenant's
//! admin.conf is refused by another tenant, and Ctrl-C (SIGTERM) stops every process.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use common::operator::{Op, wait_until};

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

/// Every printed command reaches its tenant; SIGTERM stops the tenants' processes.
#[test]
fn the_demo_serves_every_bundled_tenant() {
    let mut child = common::example("operator")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("demo");
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout");
    let op = Op(child);
    let mut commands = Vec::new();
    let mut printed = String::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("line");
        printed.push_str(&line);
        printed.push('\n');
        if let Some(i) = line.find("https://") {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.len() >= 5 && words[3] == "--kubeconfig" {
                let url = line[i..]
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                commands.push((
                    words[0].to_string(),
                    url,
                    words[2].to_string(),
                    words[4].to_string(),
                ));
            }
        }
        if line.contains("serving until Ctrl-C") {
            break;
        }
    }
    let names: Vec<&str> = commands.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(names, ["acme", "globex", "hooli", "initech"], "{printed}");
    for (name, _, kubectl, conf) in &commands {
        let out = std::process::Command::new(kubectl)
            .args(["--kubeconfig", conf, "get", "ns", "-o", "name"])
            .output()
            .expect("kubectl");
        assert!(
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains("namespace/default"),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (_, globex_url, kubectl, _) = &commands[1];
    let acme_conf = &commands[0].3;
    let out = std::process::Command::new(kubectl)
        .args([
            "--kubeconfig",
            acme_conf,
            "--server",
            globex_url,
            "get",
            "ns",
        ])
        .output()
        .expect("kubectl");
    assert!(
        !out.status.success(),
        "acme's admin.conf must not reach globex"
    );

    let demo_dir = std::env::temp_dir().join(format!("kmetal-demo-{pid}"));
    let mut pids = Vec::new();
    for tenant in ["acme", "globex", "hooli", "initech"] {
        let run = demo_dir
            .join("control-planes/tenants")
            .join(tenant)
            .join("run");
        for e in std::fs::read_dir(&run).expect("run dir").flatten() {
            if e.path().extension().is_some_and(|x| x == "pid") {
                pids.extend(
                    std::fs::read_to_string(e.path())
                        .ok()
                        .and_then(|s| s.trim().parse::<u32>().ok()),
                );
            }
        }
    }
    assert_eq!(
        pids.len(),
        24,
        "3 + 2 + 1 + 1 replicas of three components and hooli's three etcd members: {pids:?}"
    );
    drop(op);
    assert!(
        wait_until(Duration::from_secs(30), || pids.iter().all(|p| !alive(*p))),
        "the demo's control planes outlived it"
    );
    let _ = std::fs::remove_dir_all(demo_dir);
}
