//! The bundled topologies (examples/topologies) analyse to the patterns, tolerances, fixes
//! and latencies their comments promise.

#![allow(clippy::unwrap_used)]

use kmetal_topology::patterns::Pattern;
use kmetal_topology::{Topology, analyze};

fn load(name: &str) -> Topology {
    let path = format!(
        "{}/../examples/topologies/{name}.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    Topology::from_file(path).unwrap()
}

fn codes(a: &kmetal_topology::Analysis) -> Vec<&'static str> {
    a.violations.iter().map(|v| v.code).collect()
}

#[test]
fn pattern_a_survives_any_zone() {
    let a = analyze(&load("pattern-a"));
    assert_eq!(a.pattern, Pattern::A);
    assert_eq!(
        (a.members, a.quorum_size, a.zone_failures_tolerated),
        (3, 2, 1)
    );
    assert!(a.survives_zone_loss.values().all(|v| v == true));
    assert!(codes(&a).is_empty(), "{:?}", a.violations);
    // Leader in fra1-a: nearest other member 1.5 ms away, plus 1 ms fsync.
    assert_eq!(a.leader_zone.as_deref(), Some("fra1-a"));
    assert!((a.commit_latency_ms - 2.5).abs() < 1e-9);
    assert_eq!(
        (
            a.recommended_heartbeat_ms,
            a.recommended_election_timeout_ms
        ),
        (100, 1000)
    );
    // Site fra-dc1 holds two members: losing it loses quorum.
    let site = &a.tolerance[2];
    assert_eq!(site.tolerated, 0);
    assert_eq!(
        site.minimal_failing_sets[0].domains,
        vec!["fra-dc1".to_string()]
    );
    // Two of three zones at 0.999 (≈ 1 - 3e-6), times the load balancer's 0.9999.
    assert!(
        (a.availability - 0.999_897).abs() < 1e-6,
        "{}",
        a.availability
    );
}

#[test]
fn pattern_b_arbiter_may_be_far() {
    let a = analyze(&load("pattern-b"));
    assert_eq!(a.pattern, Pattern::B);
    assert_eq!(a.zone_failures_tolerated, 1);
    assert!(codes(&a).is_empty(), "{:?}", a.violations);
    assert_eq!(a.leader_zone.as_deref(), Some("north"));
    assert!((a.commit_latency_ms - 5.0).abs() < 1e-9);
    // Regions: losing the on-prem region (two members) loses quorum.
    assert_eq!(a.tolerance[3].tolerated, 0);
}

#[test]
fn pattern_c_keeps_raft_in_the_cloud() {
    let a = analyze(&load("pattern-c"));
    assert_eq!(a.pattern, Pattern::C);
    assert_eq!(a.zone_failures_tolerated, 1);
    assert!(a.survives_zone_loss["factory-floor"] == true);
    assert!(a.raft.max_member_rtt_ms <= 2.0);
}

#[test]
fn two_zone_trap_is_named_with_its_fix() {
    let a = analyze(&load("two-zone"));
    assert_eq!(a.pattern, Pattern::Custom);
    assert_eq!(a.zone_failures_tolerated, 0);
    assert!(a.survives_zone_loss["room-1"] == false);
    assert!(a.survives_zone_loss["room-2"] == true);
    let trap = a
        .violations
        .iter()
        .find(|v| v.code == "TWO_ZONE_TRAP")
        .unwrap();
    assert!(
        trap.message.contains("losing room-1 loses quorum"),
        "{}",
        trap.message
    );
    assert!(
        trap.message
            .contains("add one arbiter member in zone dc2-spare"),
        "{}",
        trap.message
    );
    // Leader in room-1 with a peer in the same zone: 0.2 ms + 1 ms.
    assert!((a.commit_latency_ms - 1.2).abs() < 1e-9);
    // The VIP lives in room-1, which already takes quorum down: no separate exposure rule.
    assert!(!codes(&a).contains(&"EXPOSURE_ZONE"));
}

#[test]
fn analysis_json_has_the_documented_keys() {
    let v = serde_json::to_value(analyze(&load("two-zone"))).unwrap();
    for key in [
        "pattern",
        "quorum_size",
        "members_per_zone",
        "zone_failures_tolerated",
        "survives_zone_loss",
        "violations",
        "leader_zone",
        "commit_latency_ms",
        "recommended_heartbeat_ms",
        "recommended_election_timeout_ms",
        "availability",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    assert_eq!(v["pattern"], "custom");
    assert_eq!(v["members_per_zone"]["room-1"], 2);
    assert_eq!(v["violations"][0]["code"], "TWO_ZONE_TRAP");
}

#[test]
fn monte_carlo_converges_to_the_exact_availability() {
    use kmetal_topology::availability::{exact, monte_carlo};
    for name in ["pattern-b", "two-zone"] {
        let t = load(name);
        let mut calls = 0;
        let mc = monte_carlo(&t, 3000.0, 7, &mut |_| calls += 1);
        let e = exact(&t);
        assert!(
            (mc.availability - e).abs() < 3e-5,
            "{name}: monte carlo {} vs exact {e}",
            mc.availability
        );
        assert!(calls > 10, "progress is reported");
        assert_eq!(
            monte_carlo(&t, 10.0, 7, &mut |_| {}),
            monte_carlo(&t, 10.0, 7, &mut |_| {})
        );
    }
}
