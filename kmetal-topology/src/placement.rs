//! Placing many tenants' control-plane replicas (and dedicated etcd members) on the under
//! cluster's nodes.
//!
//! Rules, in order: eligible nodes only (control-plane role, never arbiters; the tenant's
//! region; cloud sites only for pattern-C tenants), one replica per node (anti-affinity),
//! zone spread within `max_skew`, capacity, and for dedicated etcd members an RTT budget
//! among them. Among the nodes left, spread first (the zone with fewest replicas of the
//! tenant), then balanced utilisation (the least used node). Ties break by a hash of the seed,
//! so a seed always gives the same placement. A tenant that cannot be placed is rolled back
//! and reported with the constraint that blocked it.
//!
//! ```
//! use kmetal_topology::{model::Topology, placement::{place, TenantRequest}};
//! let t = Topology::from_file(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/topologies/pattern-a.yaml")).unwrap();
//! let tenants: Vec<TenantRequest> = (0..10).map(|i| TenantRequest::new(format!("t{i}"), 3)).collect();
//! let p = place(&t, &tenants, 7);
//! assert!(p.failed.is_empty());
//! // Three replicas land in three different zones.
//! let zones: std::collections::HashSet<_> = p.placed[0].replicas.iter().map(|&n| t.nodes[n].zone).collect();
//! assert_eq!(zones.len(), 3);
//! ```

use std::collections::BTreeSet;

use serde::Serialize;

use crate::model::{Resources, Role, SiteKind, Topology};

/// What one tenant asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantRequest {
    /// Tenant name.
    pub name: String,
    /// Control-plane replicas.
    pub replicas: u32,
    /// Resources per replica (api-server + controller-manager + scheduler).
    pub resources: Resources,
    /// Most replicas one zone may have beyond the least-used zone.
    pub max_skew: u32,
    /// Dedicated etcd members (0 = the tenant uses a shared datastore).
    pub etcd_members: u32,
    /// Resources per etcd member.
    pub etcd_resources: Resources,
    /// Largest RTT allowed between two of the tenant's etcd members, ms.
    pub etcd_rtt_budget_ms: f64,
    /// Place control planes in cloud sites only (pattern C).
    pub cloud_only: bool,
    /// The region whose controller owns the tenant (any region when `None`).
    pub region: Option<String>,
}

impl TenantRequest {
    /// A tenant with `replicas` replicas of a small control plane (0.5 CPU, 1 GiB, 3 pods),
    /// max skew 1, a shared datastore.
    pub fn new(name: impl Into<String>, replicas: u32) -> Self {
        Self {
            name: name.into(),
            replicas,
            resources: Resources {
                cpu: 0.5,
                memory_gib: 1.0,
                pods: 3,
            },
            max_skew: 1,
            etcd_members: 0,
            etcd_resources: Resources {
                cpu: 0.5,
                memory_gib: 1.0,
                pods: 1,
            },
            etcd_rtt_budget_ms: 10.0,
            cloud_only: false,
            region: None,
        }
    }
}

/// Where one tenant went (node indices).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TenantPlacement {
    /// Tenant name.
    pub tenant: String,
    /// Nodes of its control-plane replicas.
    pub replicas: Vec<usize>,
    /// Nodes of its dedicated etcd members.
    pub etcd: Vec<usize>,
}

/// The constraint that stopped a tenant.
#[derive(Debug, Clone, PartialEq, Serialize, thiserror::Error)]
#[serde(tag = "constraint", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Blocker {
    /// No node is eligible at all (role, region, cloud-only).
    #[error("no eligible node: needs a control-plane node{scope}")]
    NoEligibleNodes {
        /// The restriction in words.
        scope: String,
    },
    /// Eligible nodes exist but none has room.
    #[error(
        "capacity: no eligible node has {needed_cpu} CPU, {needed_memory_gib} GiB and {needed_pods} pods free"
    )]
    Capacity {
        /// CPU needed.
        needed_cpu: f64,
        /// Memory needed.
        needed_memory_gib: f64,
        /// Pods needed.
        needed_pods: u32,
    },
    /// Room exists only on nodes that already run a replica of the tenant.
    #[error("anti-affinity: only nodes already running a replica of this tenant have room")]
    AntiAffinity,
    /// Room exists only in zones that would exceed the spread limit.
    #[error("zone spread: placing replica {replica} would exceed max skew {max_skew}")]
    Spread {
        /// Which replica (1-based).
        replica: u32,
        /// The limit.
        max_skew: u32,
    },
    /// Fewer eligible nodes have room for an etcd member than members are asked for.
    #[error(
        "etcd members: {members} members need {members} nodes with room, only {available} eligible nodes have it"
    )]
    EtcdNodes {
        /// Members asked for.
        members: u32,
        /// Nodes with room.
        available: usize,
    },
    /// The etcd members cannot all be within the RTT budget of each other.
    #[error(
        "RTT budget: no {members} nodes in zones within {budget_ms} ms of each other have room for etcd members"
    )]
    RttBudget {
        /// Members asked for.
        members: u32,
        /// The budget.
        budget_ms: f64,
    },
}

/// A tenant that could not be placed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Unplaced {
    /// Tenant name.
    pub tenant: String,
    /// Why.
    pub blocker: Blocker,
    /// The blocker in words.
    pub reason: String,
}

/// A placement of many tenants.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Placement {
    /// Placed tenants, in request order.
    pub placed: Vec<TenantPlacement>,
    /// Tenants that could not be placed.
    pub failed: Vec<Unplaced>,
    /// Resources left per node.
    #[serde(skip)]
    pub free: Vec<Resources>,
}

/// Utilisation key: the largest used fraction of cpu, memory, pods, scaled to an integer.
fn utilisation(cap: &Resources, free: &Resources) -> u32 {
    let frac = |used: f64, cap: f64| if cap > 0.0 { used / cap } else { 1.0 };
    let u = frac(cap.cpu - free.cpu, cap.cpu)
        .max(frac(cap.memory_gib - free.memory_gib, cap.memory_gib))
        .max(frac(f64::from(cap.pods - free.pods), f64::from(cap.pods)));
    (u.clamp(0.0, 1.0) * 1_000_000.0) as u32
}

fn mix(seed: u64, n: usize) -> u64 {
    let mut z = seed ^ (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^ (z >> 31)
}

struct State<'a> {
    t: &'a Topology,
    seed: u64,
    free: Vec<Resources>,
    /// Per zone: (utilisation, tie-break, node) of the control-plane nodes, least used first.
    by_zone: Vec<BTreeSet<(u32, u64, usize)>>,
}

impl State<'_> {
    fn key(&self, n: usize) -> (u32, u64, usize) {
        (
            utilisation(&self.t.nodes[n].capacity, &self.free[n]),
            mix(self.seed, n),
            n,
        )
    }

    fn take(&mut self, n: usize, req: &Resources) {
        let z = self.t.nodes[n].zone;
        let old = self.key(n);
        self.by_zone[z].remove(&old);
        self.free[n] = self.free[n].minus(req);
        let new = self.key(n);
        self.by_zone[z].insert(new);
    }

    fn give_back(&mut self, n: usize, req: &Resources) {
        let z = self.t.nodes[n].zone;
        let old = self.key(n);
        self.by_zone[z].remove(&old);
        let f = &mut self.free[n];
        f.cpu += req.cpu;
        f.memory_gib += req.memory_gib;
        f.pods += req.pods;
        let new = self.key(n);
        self.by_zone[z].insert(new);
    }

    /// The least used node of zone `z` that fits `req` and is not in `avoid`.
    fn best_in_zone(
        &self,
        z: usize,
        req: &Resources,
        avoid: &[usize],
    ) -> Option<(u32, u64, usize)> {
        self.by_zone[z]
            .iter()
            .find(|(_, _, n)| !avoid.contains(n) && self.free[*n].fits(req))
            .copied()
    }
}

fn zone_ok(t: &Topology, z: usize, req: &TenantRequest, region: Option<usize>) -> bool {
    region.is_none_or(|r| t.region_of(z) == r)
        && (!req.cloud_only || t.sites[t.zones[z].site].kind == SiteKind::Cloud)
}

fn eligible(t: &Topology, n: usize, req: &TenantRequest, region: Option<usize>) -> bool {
    let node = &t.nodes[n];
    node.has(Role::ControlPlane) && !node.has(Role::Arbiter) && zone_ok(t, node.zone, req, region)
}

/// Places `tenants` in order; deterministic for `seed`.
pub fn place(t: &Topology, tenants: &[TenantRequest], seed: u64) -> Placement {
    place_with_progress(t, tenants, seed, &mut |_| {})
}

/// [`place`], reporting the fraction of tenants done to `progress` (every 1 %).
pub fn place_with_progress(
    t: &Topology,
    tenants: &[TenantRequest],
    seed: u64,
    progress: &mut dyn FnMut(f64),
) -> Placement {
    let mut st = State {
        t,
        seed,
        free: t.nodes.iter().map(|n| n.capacity).collect(),
        by_zone: vec![BTreeSet::new(); t.zones.len()],
    };
    // Only nodes that may run tenant control planes are candidates; region and cloud rules
    // are per zone and applied per tenant.
    for (n, node) in t.nodes.iter().enumerate() {
        if node.has(Role::ControlPlane) && !node.has(Role::Arbiter) {
            let k = st.key(n);
            st.by_zone[node.zone].insert(k);
        }
    }
    let mut placed = Vec::with_capacity(tenants.len());
    let mut failed = Vec::new();
    let step = (tenants.len() / 100).max(1);
    for (i, req) in tenants.iter().enumerate() {
        if i % step == 0 {
            progress(i as f64 / tenants.len() as f64);
        }
        match place_one(&mut st, req) {
            Ok(p) => placed.push(p),
            Err(blocker) => failed.push(Unplaced {
                tenant: req.name.clone(),
                reason: blocker.to_string(),
                blocker,
            }),
        }
    }
    progress(1.0);
    Placement {
        placed,
        failed,
        free: st.free,
    }
}

fn place_one(st: &mut State<'_>, req: &TenantRequest) -> Result<TenantPlacement, Blocker> {
    let t = st.t;
    let region = match &req.region {
        Some(r) => match t.regions.iter().position(|x| &x.name == r) {
            Some(i) => Some(i),
            None => {
                return Err(Blocker::NoEligibleNodes {
                    scope: format!(" in region {r:?} (no such region)"),
                });
            }
        },
        None => None,
    };
    // Zones with at least one eligible node: the domains the spread counts.
    // Node eligibility beyond the role is per zone, so the candidate zones are the zones with
    // control-plane nodes that pass the tenant's zone rules.
    let zones: Vec<usize> = (0..t.zones.len())
        .filter(|&z| !st.by_zone[z].is_empty() && zone_ok(t, z, req, region))
        .collect();
    if zones.is_empty() {
        let mut scope = String::new();
        if let Some(r) = &req.region {
            scope += &format!(" in region {r}");
        }
        if req.cloud_only {
            scope += " in a cloud site";
        }
        return Err(Blocker::NoEligibleNodes { scope });
    }
    let mut taken: Vec<(usize, Resources)> = Vec::new();
    let result = (|| {
        let mut count = vec![0u32; t.zones.len()];
        let mut replicas = Vec::new();
        for r in 0..req.replicas {
            let min = zones.iter().map(|&z| count[z]).min().unwrap_or(0);
            // Spread first (fewest replicas of this tenant), within the skew, then the least
            // used node.
            let chosen = zones
                .iter()
                .filter(|&&z| count[z] < min + req.max_skew)
                .filter_map(|&z| {
                    st.best_in_zone(z, &req.resources, &replicas)
                        .map(|k| (count[z], k))
                })
                .min()
                .map(|(_, k)| k);
            let Some((_, _, n)) = chosen else {
                return Err(explain(st, &zones, req, &replicas, r + 1));
            };
            st.take(n, &req.resources);
            taken.push((n, req.resources));
            count[t.nodes[n].zone] += 1;
            replicas.push(n);
        }
        let etcd = place_etcd(st, &zones, req, &mut taken)?;
        Ok(TenantPlacement {
            tenant: req.name.clone(),
            replicas,
            etcd,
        })
    })();
    if result.is_err() {
        for (n, r) in taken {
            st.give_back(n, &r);
        }
    }
    result
}

/// Dedicated etcd members: one per node, spread over zones, all within the RTT budget of each
/// other. Tries each zone as the anchor; the first anchor (by least used node) that fits wins.
fn place_etcd(
    st: &mut State<'_>,
    zones: &[usize],
    req: &TenantRequest,
    taken: &mut Vec<(usize, Resources)>,
) -> Result<Vec<usize>, Blocker> {
    if req.etcd_members == 0 {
        return Ok(Vec::new());
    }
    let t = st.t;
    let available = zones
        .iter()
        .map(|&z| {
            st.by_zone[z]
                .iter()
                .filter(|(_, _, n)| st.free[*n].fits(&req.etcd_resources))
                .count()
        })
        .sum::<usize>();
    if available < req.etcd_members as usize {
        return Err(Blocker::EtcdNodes {
            members: req.etcd_members,
            available,
        });
    }
    let mut anchors: Vec<(u32, u64, usize, usize)> = zones
        .iter()
        .filter_map(|&z| {
            st.best_in_zone(z, &req.etcd_resources, &[])
                .map(|(u, h, _)| (u, h, z, 0))
        })
        .collect();
    anchors.sort();
    for &(_, _, anchor, _) in &anchors {
        let near: Vec<usize> = zones
            .iter()
            .copied()
            .filter(|&z| t.rtt_ms(anchor, z) <= req.etcd_rtt_budget_ms)
            .collect();
        let mut chosen: Vec<usize> = Vec::new();
        let mut count = vec![0u32; t.zones.len()];
        let mut ok = true;
        for _ in 0..req.etcd_members {
            let pick = near
                .iter()
                .filter(|&&z| {
                    chosen
                        .iter()
                        .all(|&c| t.rtt_ms(t.nodes[c].zone, z) <= req.etcd_rtt_budget_ms)
                })
                .filter_map(|&z| {
                    st.best_in_zone(z, &req.etcd_resources, &chosen)
                        .map(|k| (count[z], k))
                })
                .min()
                .map(|(_, k)| k);
            match pick {
                Some((_, _, n)) => {
                    count[t.nodes[n].zone] += 1;
                    chosen.push(n);
                }
                None => {
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            for &n in &chosen {
                st.take(n, &req.etcd_resources);
                taken.push((n, req.etcd_resources));
            }
            return Ok(chosen);
        }
    }
    Err(Blocker::RttBudget {
        members: req.etcd_members,
        budget_ms: req.etcd_rtt_budget_ms,
    })
}

/// Why replica `replica` found no node.
fn explain(
    st: &State<'_>,
    zones: &[usize],
    req: &TenantRequest,
    used: &[usize],
    replica: u32,
) -> Blocker {
    let any_fit = |avoid: &[usize]| {
        zones
            .iter()
            .any(|&z| st.best_in_zone(z, &req.resources, avoid).is_some())
    };
    if !any_fit(&[]) {
        Blocker::Capacity {
            needed_cpu: req.resources.cpu,
            needed_memory_gib: req.resources.memory_gib,
            needed_pods: req.resources.pods,
        }
    } else if !any_fit(used) {
        Blocker::AntiAffinity
    } else {
        Blocker::Spread {
            replica,
            max_skew: req.max_skew,
        }
    }
}

/// Every constraint violation in `p` (empty for a valid placement); for tests and audits.
pub fn violations(t: &Topology, tenants: &[TenantRequest], p: &Placement) -> Vec<String> {
    let mut v = Vec::new();
    let mut used = vec![Resources::default(); t.nodes.len()];
    for tp in &p.placed {
        let Some(req) = tenants.iter().find(|r| r.name == tp.tenant) else {
            v.push(format!("{}: not requested", tp.tenant));
            continue;
        };
        let region = req
            .region
            .as_ref()
            .and_then(|r| t.regions.iter().position(|x| &x.name == r));
        let mut seen = BTreeSet::new();
        for &n in &tp.replicas {
            if !eligible(t, n, req, region) {
                v.push(format!(
                    "{}: replica on ineligible node {}",
                    tp.tenant, t.nodes[n].name
                ));
            }
            if !seen.insert(n) {
                v.push(format!(
                    "{}: two replicas on node {}",
                    tp.tenant, t.nodes[n].name
                ));
            }
            add(&mut used[n], &req.resources);
        }
        if tp.replicas.len() != req.replicas as usize {
            v.push(format!(
                "{}: {} replicas placed of {}",
                tp.tenant,
                tp.replicas.len(),
                req.replicas
            ));
        }
        let zones: Vec<usize> = (0..t.zones.len())
            .filter(|&z| {
                (0..t.nodes.len()).any(|n| t.nodes[n].zone == z && eligible(t, n, req, region))
            })
            .collect();
        let per = |z: usize| {
            tp.replicas
                .iter()
                .filter(|&&n| t.nodes[n].zone == z)
                .count() as u32
        };
        let (lo, hi) = zones
            .iter()
            .map(|&z| per(z))
            .fold((u32::MAX, 0), |(lo, hi), c| (lo.min(c), hi.max(c)));
        if !zones.is_empty() && hi - lo > req.max_skew {
            v.push(format!(
                "{}: zone skew {} > {}",
                tp.tenant,
                hi - lo,
                req.max_skew
            ));
        }
        let mut seen = BTreeSet::new();
        for &a in &tp.etcd {
            if !seen.insert(a) {
                v.push(format!("{}: two etcd members on one node", tp.tenant));
            }
            for &b in &tp.etcd {
                let rtt = t.rtt_ms(t.nodes[a].zone, t.nodes[b].zone);
                if rtt > req.etcd_rtt_budget_ms {
                    v.push(format!("{}: etcd members {rtt} ms apart", tp.tenant));
                }
            }
            add(&mut used[a], &req.etcd_resources);
        }
    }
    for (n, u) in used.iter().enumerate() {
        if !t.nodes[n].capacity.fits(u) {
            v.push(format!("node {} over capacity", t.nodes[n].name));
        }
    }
    v
}

fn add(a: &mut Resources, b: &Resources) {
    a.cpu += b.cpu;
    a.memory_gib += b.memory_gib;
    a.pods += b.pods;
}
