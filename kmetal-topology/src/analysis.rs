//! One report over a topology: pattern, quorum and tolerance per level, rule violations, Raft
//! timing and availability; serialisable to the JSON the simulator prints.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::availability::{MINUTES_PER_YEAR, exact};
use crate::model::Topology;
use crate::patterns::{Pattern, Violation, check, recognize};
use crate::quorum::{Level, Tolerance, quorum_size, survives_zones, tolerance};
use crate::raft::{RaftReport, analyze as raft};

/// Everything [`analyze`] finds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Analysis {
    /// Topology name.
    pub topology: String,
    /// Recognised pattern.
    pub pattern: Pattern,
    /// Voting etcd members.
    pub members: usize,
    /// Votes needed.
    pub quorum_size: usize,
    /// Members per zone, in file order.
    pub members_per_zone: Map<String, Value>,
    /// Zone losses always survived.
    pub zone_failures_tolerated: usize,
    /// Per zone: does quorum survive its loss?
    pub survives_zone_loss: Map<String, Value>,
    /// Tolerance at every level, with the minimal failure sets that lose quorum.
    pub tolerance: Vec<Tolerance>,
    /// Broken rules.
    pub violations: Vec<Violation>,
    /// Zone where a leader commits fastest.
    pub leader_zone: Option<String>,
    /// Its commit latency, ms.
    pub commit_latency_ms: f64,
    /// Recommended heartbeat, ms.
    pub recommended_heartbeat_ms: u64,
    /// Recommended election timeout, ms.
    pub recommended_election_timeout_ms: u64,
    /// Raft details.
    pub raft: RaftReport,
    /// Probability that the API is up (quorum and exposure).
    pub availability: f64,
    /// Expected downtime per year, minutes.
    pub annual_downtime_minutes: f64,
}

/// Analyses `t`.
///
/// ```
/// use kmetal_topology::{analysis::analyze, model::Topology, patterns::Pattern};
/// let t = Topology::from_yaml(r#"
/// name: trap
/// defaults: { rtt_ms: { same_site: 1 } }
/// regions: [{ name: r, sites: [{ name: s, zones: [
///   { name: a, nodes: [{ name: a1, roles: [control-plane] }, { name: a2, roles: [control-plane] }] },
///   { name: b, nodes: [{ name: b1, roles: [control-plane] }] } ] }] }]
/// "#).unwrap();
/// let r = analyze(&t);
/// assert_eq!(r.pattern, Pattern::Custom);
/// assert_eq!(r.zone_failures_tolerated, 0);
/// assert!(r.violations.iter().any(|v| v.code == "TWO_ZONE_TRAP"));
/// ```
pub fn analyze(t: &Topology) -> Analysis {
    let per = t.members_per_zone();
    let mut members_per_zone = Map::new();
    let mut survives = Map::new();
    for (z, zone) in t.zones.iter().enumerate() {
        members_per_zone.insert(zone.name.clone(), Value::from(per[z]));
        survives.insert(zone.name.clone(), Value::from(survives_zones(t, &[z])));
    }
    let tolerance: Vec<Tolerance> = Level::ALL.iter().map(|&l| tolerance(t, l)).collect();
    let raft = raft(t);
    let availability = exact(t);
    Analysis {
        topology: t.name.clone(),
        pattern: recognize(t),
        members: t.members(),
        quorum_size: quorum_size(t.members()),
        members_per_zone,
        zone_failures_tolerated: tolerance[1].tolerated,
        survives_zone_loss: survives,
        tolerance,
        violations: check(t),
        leader_zone: raft.best_leader_zone.clone(),
        commit_latency_ms: raft.commit_latency_ms,
        recommended_heartbeat_ms: raft.heartbeat_ms,
        recommended_election_timeout_ms: raft.election_timeout_ms,
        raft,
        availability,
        annual_downtime_minutes: (1.0 - availability) * MINUTES_PER_YEAR,
    }
}
