//! Quorum: how many members must agree, which losses of nodes, zones, sites or regions the
//! member layout always survives, which failure sets break it, and which side of a partition
//! keeps it.
//!
//! ```
//! use kmetal_topology::quorum::{quorum_size, tolerated_losses};
//! assert_eq!(quorum_size(3), 2);
//! assert_eq!(quorum_size(4), 3);
//! // 2 + 1 members over two zones: losing the zone with 2 loses quorum.
//! assert_eq!(tolerated_losses(&[2, 1]), 0);
//! assert_eq!(tolerated_losses(&[1, 1, 1]), 1);
//! ```

use serde::Serialize;

use crate::model::Topology;

/// Votes needed for a decision among `members` voters.
pub fn quorum_size(members: usize) -> usize {
    members / 2 + 1
}

/// A level of failure domains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Single nodes.
    Node,
    /// Zones.
    Zone,
    /// Sites.
    Site,
    /// Regions.
    Region,
}

impl Level {
    /// Every level, smallest first.
    pub const ALL: [Level; 4] = [Level::Node, Level::Zone, Level::Site, Level::Region];
}

/// The domains of one level and the voting members each holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domains {
    /// The level.
    pub level: Level,
    /// Domain names.
    pub names: Vec<String>,
    /// Members per domain.
    pub members: Vec<usize>,
}

/// The domain of zone `z` at `level` (nodes are handled by the caller).
fn domain_of_zone(t: &Topology, z: usize, level: Level) -> usize {
    match level {
        Level::Node | Level::Zone => z,
        Level::Site => t.zones[z].site,
        Level::Region => t.region_of(z),
    }
}

/// Members per domain at `level`.
pub fn domains(t: &Topology, level: Level) -> Domains {
    let names: Vec<String> = match level {
        Level::Node => t.nodes.iter().map(|n| n.name.clone()).collect(),
        Level::Zone => t.zones.iter().map(|z| z.name.clone()).collect(),
        Level::Site => t.sites.iter().map(|s| s.name.clone()).collect(),
        Level::Region => t.regions.iter().map(|r| r.name.clone()).collect(),
    };
    let mut members = vec![0; names.len()];
    for (i, n) in t.nodes.iter().enumerate().filter(|(_, n)| n.etcd_member) {
        let d = match level {
            Level::Node => i,
            _ => domain_of_zone(t, n.zone, level),
        };
        members[d] += 1;
    }
    Domains {
        level,
        names,
        members,
    }
}

/// The largest k such that losing any k domains keeps quorum (the worst k are the k largest).
pub fn tolerated_losses(members: &[usize]) -> usize {
    let total: usize = members.iter().sum();
    if total == 0 {
        return 0;
    }
    let q = quorum_size(total);
    let mut sorted: Vec<usize> = members.to_vec();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let mut left = total;
    let mut k = 0;
    for m in sorted {
        if left - m < q {
            // Domains without members can always be lost, but "any k" includes this one.
            return k;
        }
        left -= m;
        k += 1;
    }
    k
}

/// For every subset of domains (bit i = domain i lost), whether quorum holds. Index = mask.
///
/// ```
/// let keeps = kmetal_topology::quorum::failure_combinations(&[1, 1, 1]);
/// assert_eq!(keeps.len(), 8);
/// assert!(keeps[0b001] && !keeps[0b011]);
/// ```
pub fn failure_combinations(members: &[usize]) -> Vec<bool> {
    let n = members.len().min(24);
    let total: usize = members.iter().sum();
    let q = quorum_size(total);
    // lost[mask] = members lost, built from the mask without its lowest bit.
    let mut lost = vec![0usize; 1 << n];
    let mut keeps = vec![false; 1 << n];
    keeps[0] = total >= q && total > 0;
    for mask in 1usize..(1 << n) {
        let low = mask.trailing_zeros() as usize;
        lost[mask] = lost[mask & (mask - 1)] + members[low];
        keeps[mask] = total > 0 && total - lost[mask] >= q;
    }
    keeps
}

/// A failure set that loses quorum while each of its proper subsets keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailingSet {
    /// The domains lost together.
    pub domains: Vec<String>,
}

/// How a level's losses affect quorum.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tolerance {
    /// The level.
    pub level: Level,
    /// Losses of any this many domains always keep quorum.
    pub tolerated: usize,
    /// Minimal failure sets that lose quorum (domains with members only; at most 20 of them
    /// are enumerated).
    pub minimal_failing_sets: Vec<FailingSet>,
    /// Whether the enumeration was cut short.
    pub truncated: bool,
}

/// Most member-holding domains whose subsets are enumerated.
const MAX_ENUMERATED: usize = 20;

/// Quorum tolerance at `level`.
pub fn tolerance(t: &Topology, level: Level) -> Tolerance {
    let d = domains(t, level);
    let tolerated = tolerated_losses(&d.members);
    let holders: Vec<usize> = (0..d.members.len()).filter(|&i| d.members[i] > 0).collect();
    let truncated = holders.len() > MAX_ENUMERATED;
    let mut minimal_failing_sets = Vec::new();
    if !truncated {
        let m: Vec<usize> = holders.iter().map(|&i| d.members[i]).collect();
        let keeps = failure_combinations(&m);
        for mask in 1usize..keeps.len() {
            if keeps[mask] {
                continue;
            }
            // Minimal: dropping any one lost domain restores quorum.
            let minimal = (0..m.len())
                .filter(|b| mask & (1 << b) != 0)
                .all(|b| keeps[mask & !(1 << b)]);
            if minimal {
                minimal_failing_sets.push(FailingSet {
                    domains: (0..m.len())
                        .filter(|b| mask & (1 << b) != 0)
                        .map(|b| d.names[holders[b]].clone())
                        .collect(),
                });
            }
        }
        minimal_failing_sets.sort_by(|a, b| {
            a.domains
                .len()
                .cmp(&b.domains.len())
                .then_with(|| a.domains.cmp(&b.domains))
        });
    }
    Tolerance {
        level,
        tolerated,
        minimal_failing_sets,
        truncated,
    }
}

/// Whether quorum holds with the zones in `lost` down.
pub fn survives_zones(t: &Topology, lost: &[usize]) -> bool {
    let total = t.members();
    if total == 0 {
        return false;
    }
    let up = t
        .nodes
        .iter()
        .filter(|n| n.etcd_member && !lost.contains(&n.zone))
        .count();
    up >= quorum_size(total)
}

/// For a partition of the zones into sides, the side (index) that keeps quorum, if any.
/// Zones in no side count as lost.
pub fn partition_winner(t: &Topology, sides: &[Vec<usize>]) -> Option<usize> {
    let total = t.members();
    let q = quorum_size(total);
    let per_zone = t.members_per_zone();
    sides.iter().position(|side| {
        total > 0
            && side
                .iter()
                .map(|&z| per_zone.get(z).copied().unwrap_or(0))
                .sum::<usize>()
                >= q
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerance_is_largest_first() {
        assert_eq!(tolerated_losses(&[2, 2, 1]), 1);
        assert_eq!(tolerated_losses(&[1, 1, 1, 1, 1]), 2);
        assert_eq!(tolerated_losses(&[3, 0, 0]), 0);
        assert_eq!(tolerated_losses(&[]), 0);
    }

    #[test]
    fn combinations_match_counting() {
        let m = [2, 1, 1, 3];
        let keeps = failure_combinations(&m);
        for (mask, &k) in keeps.iter().enumerate() {
            let lost: usize = (0..4).filter(|b| mask & (1 << b) != 0).map(|b| m[b]).sum();
            assert_eq!(k, 7 - lost >= 4, "mask {mask:b}");
        }
    }
}
