//! Raft timing: commit latency for each possible leader zone, etcd's heartbeat and election
//! timeouts for the measured RTTs, and recovery times after a leader or zone loss.
//!
//! A write commits when the leader has a majority: its own fsync plus the acknowledgement of
//! the (quorum − 1)-th nearest other member, one RTT away, which fsynced in parallel.
//!
//! ```
//! use kmetal_topology::raft::commit_latency_ms;
//! // Leader's view: other members at 2 ms and 8 ms RTT; quorum 2 needs one of them.
//! assert_eq!(commit_latency_ms(&[2.0, 8.0], 2, 1.0), 3.0);
//! ```

use serde::Serialize;

use crate::model::Topology;
use crate::quorum::{quorum_size, survives_zones};

/// Commit latency for a leader whose other members are `others_rtt` ms away (any order).
pub fn commit_latency_ms(others_rtt: &[f64], quorum: usize, disk_sync_ms: f64) -> f64 {
    if quorum <= 1 {
        return disk_sync_ms;
    }
    let mut sorted = others_rtt.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.get(quorum - 2) {
        Some(rtt) => rtt + disk_sync_ms,
        None => f64::INFINITY,
    }
}

/// Commit latency with the leader in one zone.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LeaderLatency {
    /// The leader's zone.
    pub zone: String,
    /// Commit latency in ms.
    pub commit_ms: f64,
}

/// Recovery time after losing one zone.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ZoneLossRto {
    /// The zone lost.
    pub zone: String,
    /// Seconds until writes work again; `None` when they do not come back without the zone.
    pub rto_s: Option<f64>,
}

/// Raft timing for the under cluster's etcd.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RaftReport {
    /// Commit latency per zone that hosts a member, best first.
    pub per_leader_zone: Vec<LeaderLatency>,
    /// The zone where a leader commits fastest.
    pub best_leader_zone: Option<String>,
    /// Its commit latency in ms.
    pub commit_latency_ms: f64,
    /// Largest RTT between two members, ms.
    pub max_member_rtt_ms: f64,
    /// Recommended `--heartbeat-interval`, ms.
    pub heartbeat_ms: u64,
    /// Recommended `--election-timeout`, ms.
    pub election_timeout_ms: u64,
    /// Seconds to recover from losing the leader (election plus one commit).
    pub rto_leader_loss_s: f64,
    /// Recovery per zone loss, assuming the leader sat in the best zone.
    pub rto_zone_loss: Vec<ZoneLossRto>,
}

/// etcd's largest election timeout.
const MAX_ELECTION_MS: u64 = 50_000;

/// Heartbeat ≈ the largest member RTT (never below etcd's 100 ms default); election ≥ 10 ×
/// RTT and ≥ 5 × heartbeat (never below 1000 ms), capped at 50 s.
pub fn recommended_timeouts(max_member_rtt_ms: f64) -> (u64, u64) {
    let round_up = |v: f64, step: u64| ((v / step as f64).ceil() as u64).max(1) * step;
    let heartbeat = round_up(max_member_rtt_ms.max(100.0), 10);
    let election = round_up(
        (10.0 * max_member_rtt_ms)
            .max(5.0 * heartbeat as f64)
            .max(1000.0),
        100,
    )
    .min(MAX_ELECTION_MS);
    (heartbeat, election)
}

/// Raft timing for `t`.
pub fn analyze(t: &Topology) -> RaftReport {
    let members: Vec<usize> = t
        .nodes
        .iter()
        .filter(|n| n.etcd_member)
        .map(|n| n.zone)
        .collect();
    let q = quorum_size(members.len());
    let disk = t.params.disk_sync_ms;
    let mut zones: Vec<usize> = members.clone();
    zones.sort_unstable();
    zones.dedup();
    let mut per: Vec<(usize, f64)> = zones
        .iter()
        .map(|&lz| {
            // The leader is one of the members in lz; the others are everyone else.
            let mut skipped = false;
            let others: Vec<f64> = members
                .iter()
                .filter(|&&z| {
                    if z == lz && !skipped {
                        skipped = true;
                        false
                    } else {
                        true
                    }
                })
                .map(|&z| t.rtt_ms(lz, z))
                .collect();
            (lz, commit_latency_ms(&others, q, disk))
        })
        .collect();
    per.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    let max_rtt = members
        .iter()
        .flat_map(|&a| members.iter().map(move |&b| (a, b)))
        .map(|(a, b)| t.rtt_ms(a, b))
        .fold(0.0, f64::max);
    let (heartbeat_ms, election_timeout_ms) = recommended_timeouts(max_rtt);
    let best = per.first().map(|p| p.0);
    let commit = per.first().map_or(f64::INFINITY, |p| p.1);
    let election_s = election_timeout_ms as f64 / 1000.0;
    let rto_leader_loss_s = election_s + commit / 1000.0;
    let rto_zone_loss = (0..t.zones.len())
        .map(|z| ZoneLossRto {
            zone: t.zones[z].name.clone(),
            rto_s: if !survives_zones(t, &[z]) {
                None
            } else if best == Some(z) {
                Some(rto_leader_loss_s)
            } else {
                Some(0.0)
            },
        })
        .collect();
    RaftReport {
        per_leader_zone: per
            .iter()
            .map(|&(z, c)| LeaderLatency {
                zone: t.zones[z].name.clone(),
                commit_ms: c,
            })
            .collect(),
        best_leader_zone: best.map(|z| t.zones[z].name.clone()),
        commit_latency_ms: commit,
        max_member_rtt_ms: max_rtt,
        heartbeat_ms,
        election_timeout_ms,
        rto_leader_loss_s,
        rto_zone_loss,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_follow_the_tuning_guide() {
        assert_eq!(recommended_timeouts(2.0), (100, 1000));
        assert_eq!(recommended_timeouts(150.0), (150, 1500));
        assert_eq!(recommended_timeouts(400.0), (400, 4000));
        assert_eq!(recommended_timeouts(20_000.0).1, 50_000);
    }

    #[test]
    fn quorum_picks_the_right_neighbour() {
        // Five members: quorum 3 needs the 2nd nearest of the four others.
        assert_eq!(commit_latency_ms(&[9.0, 1.0, 30.0, 2.0], 3, 0.5), 2.5);
        assert_eq!(commit_latency_ms(&[], 1, 0.5), 0.5);
    }
}
