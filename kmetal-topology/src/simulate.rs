//! Failure simulation: apply zone, site or region outages (or a partition, or the management
//! plane's loss) to a placement and report, per tenant, whether its API is up, whether its
//! etcd keeps quorum, the recovery time, and whether lost replicas can be rescheduled.

use serde::Serialize;

use crate::model::Topology;
use crate::placement::{Placement, TenantRequest};
use crate::quorum::{partition_winner, quorum_size, survives_zones};
use crate::raft;

/// What fails.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outage {
    /// These zones, sites or regions (by name) go down.
    Domains(Vec<String>),
    /// The network splits into these sides (zone, site or region names); zones on the sides
    /// without the under cluster's quorum are cut off.
    Partition(Vec<Vec<String>>),
    /// The management plane is lost: no tenant is reconciled, running control planes go on.
    ManagementPlane,
}

/// Why an outage cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SimulateError {
    /// A name that is no zone, site or region.
    #[error("unknown failure domain {0:?} (not a zone, site or region)")]
    UnknownDomain(String),
}

/// Per-tenant outcome.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TenantOutcome {
    /// Tenant name.
    pub tenant: String,
    /// The API answers (a replica survives and its datastore has quorum).
    pub api_up: bool,
    /// Its datastore keeps quorum (the under cluster's etcd for shared tenants).
    pub etcd_quorum: bool,
    /// Replicas lost.
    pub replicas_lost: usize,
    /// Lost replicas fit on surviving eligible nodes (one per node).
    pub reschedulable: bool,
    /// Seconds until the API is whole again; `None` if it does not recover without repair.
    pub rto_s: Option<f64>,
    /// A reconciler (management plane and the tenant's regional controller) is still running.
    pub managed: bool,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailureReport {
    /// Zones down or cut off.
    pub zones_down: Vec<String>,
    /// The under cluster's etcd keeps quorum.
    pub under_cluster_quorum: bool,
    /// Tenants whose API stays up.
    pub tenants_up: usize,
    /// Tenants whose API is down.
    pub tenants_down: usize,
    /// Tenants without a running reconciler.
    pub tenants_unmanaged: usize,
    /// Per tenant.
    pub tenants: Vec<TenantOutcome>,
}

/// The zones a domain name covers.
pub fn zones_of(t: &Topology, name: &str) -> Result<Vec<usize>, SimulateError> {
    if let Some(z) = t.zone_index(name) {
        return Ok(vec![z]);
    }
    if let Some(s) = t.sites.iter().position(|s| s.name == name) {
        return Ok((0..t.zones.len())
            .filter(|&z| t.zones[z].site == s)
            .collect());
    }
    if let Some(r) = t.regions.iter().position(|r| r.name == name) {
        return Ok((0..t.zones.len())
            .filter(|&z| t.region_of(z) == r)
            .collect());
    }
    Err(SimulateError::UnknownDomain(name.to_string()))
}

/// Applies `outage` to `placement`.
pub fn simulate(
    t: &Topology,
    tenants: &[TenantRequest],
    placement: &Placement,
    outage: &Outage,
) -> Result<FailureReport, SimulateError> {
    let mut down: Vec<usize> = Vec::new();
    let mut management = true;
    let mut regions_down: Vec<usize> = Vec::new();
    match outage {
        Outage::Domains(names) => {
            for n in names {
                down.extend(zones_of(t, n)?);
                if let Some(r) = t.regions.iter().position(|r| &r.name == n) {
                    regions_down.push(r);
                }
            }
        }
        Outage::Partition(sides) => {
            let sides: Vec<Vec<usize>> = sides
                .iter()
                .map(|side| {
                    side.iter()
                        .map(|n| zones_of(t, n))
                        .collect::<Result<Vec<_>, _>>()
                        .map(|v| v.concat())
                })
                .collect::<Result<_, _>>()?;
            let winner = partition_winner(t, &sides);
            for z in 0..t.zones.len() {
                let on_winner = winner.is_some_and(|w| sides[w].contains(&z));
                if !on_winner {
                    down.push(z);
                }
            }
        }
        Outage::ManagementPlane => management = false,
    }
    down.sort_unstable();
    down.dedup();
    let under_quorum = survives_zones(t, &down);
    let election_s = raft::analyze(t).election_timeout_ms as f64 / 1000.0;
    // What survives, for rescheduling: free capacity on nodes in zones still up.
    let alive = |n: usize| !down.contains(&t.nodes[n].zone);
    let mut free = placement.free.clone();
    let mut outcomes = Vec::with_capacity(placement.placed.len());
    for tp in &placement.placed {
        let Some(req) = tenants.iter().find(|r| r.name == tp.tenant) else {
            continue;
        };
        let lost = tp.replicas.iter().filter(|&&n| !alive(n)).count();
        let etcd_quorum = if tp.etcd.is_empty() {
            under_quorum
        } else {
            let up = tp.etcd.iter().filter(|&&n| alive(n)).count();
            up >= quorum_size(tp.etcd.len())
        };
        let etcd_lost_leader = !tp.etcd.is_empty() && tp.etcd.iter().any(|&n| !alive(n));
        // Reschedule the lost replicas greedily on surviving eligible nodes not already used.
        let mut used: Vec<usize> = tp.replicas.iter().copied().filter(|&n| alive(n)).collect();
        let mut reschedulable = true;
        for _ in 0..lost {
            let target = (0..t.nodes.len()).find(|&n| {
                alive(n)
                    && !used.contains(&n)
                    && t.nodes[n].has(crate::model::Role::ControlPlane)
                    && !t.nodes[n].has(crate::model::Role::Arbiter)
                    && free[n].fits(&req.resources)
            });
            match target {
                Some(n) => {
                    free[n] = free[n].minus(&req.resources);
                    used.push(n);
                }
                None => {
                    reschedulable = false;
                    break;
                }
            }
        }
        let survivors = tp.replicas.len() - lost;
        let api_up = survivors > 0 && etcd_quorum;
        let rto_s = if !etcd_quorum || (survivors == 0 && !reschedulable) {
            None
        } else {
            let etcd = if etcd_lost_leader { election_s } else { 0.0 };
            let sched = if survivors == 0 {
                t.params.reschedule_s
            } else {
                0.0
            };
            Some(etcd.max(sched))
        };
        let tenant_region = req
            .region
            .as_ref()
            .and_then(|r| t.regions.iter().position(|x| &x.name == r));
        let managed = management && tenant_region.is_none_or(|r| !regions_down.contains(&r));
        outcomes.push(TenantOutcome {
            tenant: tp.tenant.clone(),
            api_up,
            etcd_quorum,
            replicas_lost: lost,
            reschedulable,
            rto_s,
            managed,
        });
    }
    let up = outcomes.iter().filter(|o| o.api_up).count();
    Ok(FailureReport {
        zones_down: down.iter().map(|&z| t.zones[z].name.clone()).collect(),
        under_cluster_quorum: under_quorum,
        tenants_up: up,
        tenants_down: outcomes.len() - up,
        tenants_unmanaged: outcomes.iter().filter(|o| !o.managed).count(),
        tenants: outcomes,
    })
}
