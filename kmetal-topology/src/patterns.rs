//! The stretched patterns (A, B, C), the two-zone trap, and rule checks with codes.
//!
//! - **A**: three or more on-prem zones with members, no zone holding a quorum, every member
//!   link within the RTT budget.
//! - **B**: two on-prem zones with control planes plus a single arbiter member in a third
//!   domain (typically a cloud VM), which may sit further away.
//! - **C**: every member in the cloud, workers on-prem (reached through the reverse tunnel, so
//!   no Raft crosses the WAN).

use serde::Serialize;

use crate::model::{Role, SiteKind, Topology};
use crate::quorum::{quorum_size, survives_zones};

/// A recognised layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Pattern {
    /// Three on-prem zones.
    A,
    /// Two on-prem zones and a remote arbiter.
    B,
    /// Control planes in the cloud, workers on-prem.
    C,
    /// Anything else.
    #[serde(rename = "custom")]
    Custom,
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::A => "A",
            Self::B => "B",
            Self::C => "C",
            Self::Custom => "custom",
        })
    }
}

/// Rule codes.
pub mod code {
    /// A synchronously replicated link exceeds the RTT budget.
    pub const RTT_BUDGET: &str = "RTT_BUDGET";
    /// A link to an arbiter exceeds the arbiter's RTT budget.
    pub const ARBITER_RTT_BUDGET: &str = "ARBITER_RTT_BUDGET";
    /// An even number of voting members.
    pub const EVEN_MEMBERS: &str = "EVEN_MEMBERS";
    /// No voting members at all.
    pub const NO_MEMBERS: &str = "NO_MEMBERS";
    /// Members in exactly two zones.
    pub const TWO_ZONE_TRAP: &str = "TWO_ZONE_TRAP";
    /// One zone holds a quorum by itself.
    pub const ZONE_MAJORITY: &str = "ZONE_MAJORITY";
    /// An arbiter node would accept pods.
    pub const ARBITER_SCHEDULABLE: &str = "ARBITER_SCHEDULABLE";
    /// The API exposure fails with one zone although etcd survives it.
    pub const EXPOSURE_ZONE: &str = "EXPOSURE_ZONE";
}

/// A broken rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// Stable code (see [`code`]).
    pub code: &'static str,
    /// What is wrong and how to fix it.
    pub message: String,
}

fn member_zones(t: &Topology) -> Vec<usize> {
    let per = t.members_per_zone();
    (0..t.zones.len()).filter(|&z| per[z] > 0).collect()
}

/// A zone whose members all sit on arbiter nodes.
fn is_arbiter_zone(t: &Topology, z: usize) -> bool {
    let mut members = t
        .nodes
        .iter()
        .filter(|n| n.zone == z && n.etcd_member)
        .peekable();
    members.peek().is_some() && members.all(|n| n.has(Role::Arbiter))
}

fn on_prem(t: &Topology, z: usize) -> bool {
    t.sites[t.zones[z].site].kind == SiteKind::OnPrem
}

/// Recognises the layout.
pub fn recognize(t: &Topology) -> Pattern {
    let zones = member_zones(t);
    let per = t.members_per_zone();
    let total = t.members();
    if zones.is_empty() {
        return Pattern::Custom;
    }
    let q = quorum_size(total);
    let on_prem_workers = t
        .nodes
        .iter()
        .any(|n| n.has(Role::Worker) && on_prem(t, n.zone));
    if zones.iter().all(|&z| !on_prem(t, z)) && on_prem_workers {
        return Pattern::C;
    }
    let arbiters: Vec<usize> = zones
        .iter()
        .copied()
        .filter(|&z| is_arbiter_zone(t, z))
        .collect();
    let data: Vec<usize> = zones
        .iter()
        .copied()
        .filter(|&z| !is_arbiter_zone(t, z))
        .collect();
    if arbiters.len() == 1
        && per[arbiters[0]] == 1
        && data.len() == 2
        && data
            .iter()
            .all(|&z| on_prem(t, z) && t.zone_has(z, Role::ControlPlane))
    {
        return Pattern::B;
    }
    if arbiters.is_empty() && zones.len() >= 3 && zones.iter().all(|&z| on_prem(t, z) && per[z] < q)
    {
        return Pattern::A;
    }
    Pattern::Custom
}

/// Every rule the layout breaks.
pub fn check(t: &Topology) -> Vec<Violation> {
    let mut v = Vec::new();
    let zones = member_zones(t);
    let per = t.members_per_zone();
    let total = t.members();
    let name = |z: usize| t.zones[z].name.as_str();
    if total == 0 {
        v.push(Violation {
            code: code::NO_MEMBERS,
            message: "no node hosts an etcd member".into(),
        });
        return v;
    }
    let q = quorum_size(total);
    let budget = t.params.rtt_budget_ms;
    let arbiter_budget = t.params.arbiter_rtt_budget_ms;
    for (i, &a) in zones.iter().enumerate() {
        for &b in &zones[i + 1..] {
            let rtt = t.rtt_ms(a, b);
            let arbiter = is_arbiter_zone(t, a) || is_arbiter_zone(t, b);
            let (limit, code) = if arbiter {
                (arbiter_budget, code::ARBITER_RTT_BUDGET)
            } else {
                (budget, code::RTT_BUDGET)
            };
            if rtt > limit {
                v.push(Violation {
                    code,
                    message: format!(
                        "RTT {rtt} ms between {} and {} exceeds the {limit} ms budget for \
                         synchronously replicated etcd members",
                        name(a),
                        name(b)
                    ),
                });
            }
        }
    }
    if total % 2 == 0 {
        v.push(Violation {
            code: code::EVEN_MEMBERS,
            message: format!(
                "{total} members need a quorum of {q} and tolerate no more failures than {}; \
                 use {} or {}",
                total - 1,
                total - 1,
                total + 1
            ),
        });
    }
    if zones.len() == 2 {
        v.push(Violation {
            code: code::TWO_ZONE_TRAP,
            message: two_zone_fix(t, zones[0], zones[1], &per),
        });
    } else if zones.len() > 2 {
        for &z in &zones {
            if per[z] >= q {
                let excess = per[z] - (q - 1);
                v.push(Violation {
                    code: code::ZONE_MAJORITY,
                    message: format!(
                        "zone {} holds {} of {total} members (quorum {q}): losing it loses \
                         quorum; move {excess} member(s) to other zones",
                        name(z),
                        per[z]
                    ),
                });
            }
        }
    }
    for n in t
        .nodes
        .iter()
        .filter(|n| n.has(Role::Arbiter) && n.capacity.pods > 0)
    {
        v.push(Violation {
            code: code::ARBITER_SCHEDULABLE,
            message: format!(
                "arbiter {} accepts {} pods; an arbiter runs etcd only (taint it, capacity 0)",
                n.name, n.capacity.pods
            ),
        });
    }
    if let Some(z) = t.exposure.as_ref().and_then(|e| e.zone)
        && survives_zones(t, &[z])
    {
        v.push(Violation {
            code: code::EXPOSURE_ZONE,
            message: format!(
                "the API endpoint depends on zone {}: losing it takes the API down although \
                 etcd keeps quorum; expose the API from every zone (load balancer or BGP)",
                name(z)
            ),
        });
    }
    v
}

/// The fix for members split over two zones: which third domain to add an arbiter to.
fn two_zone_fix(t: &Topology, a: usize, b: usize, per: &[usize]) -> String {
    let name = |z: usize| t.zones[z].name.as_str();
    let big = if per[a] >= per[b] { a } else { b };
    let mut head = format!(
        "members are split {}+{} over zones {} and {}: losing {} loses quorum, and moving or \
         adding members in these two zones cannot fix it; ",
        per[a],
        per[b],
        name(a),
        name(b),
        name(big)
    );
    let candidate = (0..t.zones.len())
        .filter(|&z| z != a && z != b)
        .map(|z| (z, t.rtt_ms(z, a).max(t.rtt_ms(z, b))))
        .filter(|(_, worst)| *worst <= t.params.arbiter_rtt_budget_ms)
        .min_by(|x, y| x.1.total_cmp(&y.1));
    let (keep_a, keep_b) = if per[a] + per[b] >= 3 {
        // With an arbiter, each data zone must stay below quorum on its own.
        let total = per[a] + per[b] + 1;
        let limit = quorum_size(total) - 1;
        (per[a].min(limit), per[b].min(limit))
    } else {
        (per[a], per[b])
    };
    match candidate {
        Some((z, worst)) => head.push_str(&format!(
            "add one arbiter member in zone {} (RTT ≤ {worst} ms to both) and keep {keep_a}+{keep_b} \
             members in {} and {}",
            name(z),
            name(a),
            name(b)
        )),
        None => head.push_str(&format!(
            "add a third failure domain (for example a cloud VM as etcd arbiter, pattern B) \
             within {} ms of both zones",
            t.params.arbiter_rtt_budget_ms
        )),
    }
    head
}
