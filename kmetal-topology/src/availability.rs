//! Availability of the under cluster's API: the probability that etcd keeps quorum and the
//! API exposure (with the domain it depends on) is up.
//!
//! Failures nest: a region down takes its sites down, a site its zones, a zone its nodes.
//! [`exact`] multiplies one polynomial per domain (coefficient k = probability that k members
//! are up), so its cost grows with members², not 2^domains. [`monte_carlo`] simulates
//! correlated outages over time with repair times and counts downtime.
//!
//! ```
//! use kmetal_topology::model::Topology;
//! use kmetal_topology::availability::exact;
//! let t = Topology::from_yaml(r#"
//! name: three
//! defaults: { zone_availability: 0.99, rtt_ms: { same_site: 1 } }
//! regions: [{ name: r, sites: [{ name: s, zones: [
//!   { name: a, nodes: [{ name: a1, roles: [control-plane] }] },
//!   { name: b, nodes: [{ name: b1, roles: [control-plane] }] },
//!   { name: c, nodes: [{ name: c1, roles: [control-plane] }] } ] }] }]
//! "#).unwrap();
//! // 2 of 3 zones up: 3p²(1-p) + p³.
//! let p: f64 = 0.99;
//! assert!((exact(&t) - (3.0 * p * p * (1.0 - p) + p.powi(3))).abs() < 1e-12);
//! ```

use serde::Serialize;

use crate::model::Topology;
use crate::quorum::quorum_size;

/// Minutes in a year.
pub const MINUTES_PER_YEAR: f64 = 365.0 * 24.0 * 60.0;

fn mul(a: &[f64], b: &[f64]) -> Vec<f64> {
    let mut out = vec![0.0; a.len() + b.len() - 1];
    for (i, x) in a.iter().enumerate() {
        if *x == 0.0 {
            continue;
        }
        for (j, y) in b.iter().enumerate() {
            out[i + j] += x * y;
        }
    }
    out
}

/// A domain up with probability `a` contributes `up` (its children's polynomial); down, it
/// contributes "0 members". A `required` domain must be up (the exposure depends on it).
fn mix(a: f64, up: Vec<f64>, required: bool) -> Vec<f64> {
    let mut out: Vec<f64> = up.into_iter().map(|c| c * a).collect();
    if !required {
        out[0] += 1.0 - a;
    }
    out
}

/// P(quorum ∧ exposure up), exactly.
pub fn exact(t: &Topology) -> f64 {
    let total = t.members();
    if total == 0 {
        return 0.0;
    }
    let q = quorum_size(total);
    let ez = t.exposure.as_ref().and_then(|e| e.zone);
    let mut top = vec![1.0];
    for (ri, r) in t.regions.iter().enumerate() {
        let mut rp = vec![1.0];
        for (si, s) in t.sites.iter().enumerate().filter(|(_, s)| s.region == ri) {
            let mut sp = vec![1.0];
            for (zi, z) in t.zones.iter().enumerate().filter(|(_, z)| z.site == si) {
                let mut zp = vec![1.0];
                for n in t.nodes.iter().filter(|n| n.zone == zi && n.etcd_member) {
                    zp = mul(&zp, &[1.0 - n.availability, n.availability]);
                }
                sp = mul(&sp, &mix(z.availability, zp, ez == Some(zi)));
            }
            let required = ez.is_some_and(|z| t.zones[z].site == si);
            rp = mul(&rp, &mix(s.availability, sp, required));
        }
        let required = ez.is_some_and(|z| t.region_of(z) == ri);
        top = mul(&top, &mix(r.availability, rp, required));
    }
    let quorum: f64 = top.iter().skip(q).sum();
    quorum * t.exposure.as_ref().map_or(1.0, |e| e.availability)
}

/// Most domains [`brute_force`] enumerates (2^24 combinations).
pub const BRUTE_FORCE_MAX_DOMAINS: usize = 24;

/// The same probability by enumerating every up/down combination of every region, site, zone
/// and member node: exponential, for checking [`exact`] on small topologies. `None` when
/// there are more than [`BRUTE_FORCE_MAX_DOMAINS`] domains.
pub fn brute_force(t: &Topology) -> Option<f64> {
    let total = t.members();
    if total == 0 {
        return Some(0.0);
    }
    let q = quorum_size(total);
    let member_nodes: Vec<usize> = (0..t.nodes.len())
        .filter(|&i| t.nodes[i].etcd_member)
        .collect();
    let mut probs: Vec<f64> = Vec::new();
    probs.extend(t.regions.iter().map(|r| r.availability));
    probs.extend(t.sites.iter().map(|s| s.availability));
    probs.extend(t.zones.iter().map(|z| z.availability));
    probs.extend(member_nodes.iter().map(|&i| t.nodes[i].availability));
    let (nr, ns, nz) = (t.regions.len(), t.sites.len(), t.zones.len());
    let n = probs.len();
    if n > BRUTE_FORCE_MAX_DOMAINS {
        return None;
    }
    let mut sum = 0.0;
    for mask in 0usize..(1 << n) {
        let up = |i: usize| mask & (1 << i) != 0;
        let p: f64 = (0..n)
            .map(|i| if up(i) { probs[i] } else { 1.0 - probs[i] })
            .product();
        if p == 0.0 {
            continue;
        }
        let zone_up = |z: usize| up(nr + ns + z) && up(nr + t.zones[z].site) && up(t.region_of(z));
        let members_up = member_nodes
            .iter()
            .enumerate()
            .filter(|(k, i)| up(nr + ns + nz + k) && zone_up(t.nodes[**i].zone))
            .count();
        let exposure_ok = t.exposure.as_ref().and_then(|e| e.zone).is_none_or(zone_up);
        if members_up >= q && exposure_ok {
            sum += p;
        }
    }
    Some(sum * t.exposure.as_ref().map_or(1.0, |e| e.availability))
}

/// A small deterministic generator (SplitMix64): the same seed gives the same simulation.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    /// Exponentially distributed with `mean`.
    pub fn exponential(&mut self, mean: f64) -> f64 {
        -mean * self.unit().ln()
    }
}

/// What a Monte Carlo run measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MonteCarlo {
    /// Simulated years.
    pub years: f64,
    /// Fraction of time the API was up.
    pub availability: f64,
    /// Downtime per year, minutes.
    pub downtime_minutes_per_year: f64,
    /// API outages per year.
    pub outages_per_year: f64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Region(usize),
    Site(usize),
    Zone(usize),
    Node(usize),
    Exposure,
}

/// Simulates `years` of alternating up times (mean MTBF) and repairs (mean MTTR) for every
/// region, site, zone, member node and the exposure; `progress` gets the fraction done.
pub fn monte_carlo(
    t: &Topology,
    years: f64,
    seed: u64,
    progress: &mut dyn FnMut(f64),
) -> MonteCarlo {
    let mut rng = Rng::new(seed);
    let mut doms: Vec<(Kind, f64, f64)> = Vec::new(); // kind, mtbf h, mttr h
    for (i, r) in t.regions.iter().enumerate() {
        doms.push((Kind::Region(i), r.mtbf_hours, r.mttr_hours));
    }
    for (i, s) in t.sites.iter().enumerate() {
        doms.push((Kind::Site(i), s.mtbf_hours, s.mttr_hours));
    }
    for (i, z) in t.zones.iter().enumerate() {
        doms.push((Kind::Zone(i), z.mtbf_hours, z.mttr_hours));
    }
    const NODE_MTTR_H: f64 = 4.0;
    for (i, n) in t.nodes.iter().enumerate().filter(|(_, n)| n.etcd_member) {
        let a = n.availability;
        let mtbf = if a >= 1.0 {
            f64::INFINITY
        } else {
            NODE_MTTR_H * a / (1.0 - a)
        };
        doms.push((Kind::Node(i), mtbf, NODE_MTTR_H));
    }
    if let Some(e) = &t.exposure {
        let a = e.availability;
        let mtbf = if a >= 1.0 {
            f64::INFINITY
        } else {
            a / (1.0 - a)
        };
        doms.push((Kind::Exposure, mtbf, 1.0));
    }
    let horizon = years * 365.0 * 24.0;
    let mut up = vec![true; doms.len()];
    let mut next: Vec<f64> = doms.iter().map(|d| rng.exponential(d.1)).collect();
    let total = t.members();
    let q = quorum_size(total);
    let idx = |k: Kind| doms.iter().position(|d| d.0 == k);
    let region_ix: Vec<Option<usize>> =
        (0..t.regions.len()).map(|i| idx(Kind::Region(i))).collect();
    let site_ix: Vec<Option<usize>> = (0..t.sites.len()).map(|i| idx(Kind::Site(i))).collect();
    let zone_ix: Vec<Option<usize>> = (0..t.zones.len()).map(|i| idx(Kind::Zone(i))).collect();
    let node_ix: Vec<(usize, Option<usize>)> = (0..t.nodes.len())
        .filter(|&i| t.nodes[i].etcd_member)
        .map(|i| (i, idx(Kind::Node(i))))
        .collect();
    let exposure_ix = idx(Kind::Exposure);
    let is_up = |up: &[bool], i: Option<usize>| i.is_none_or(|i| up[i]);
    let zone_up = |up: &[bool], z: usize| {
        is_up(up, zone_ix[z])
            && is_up(up, site_ix[t.zones[z].site])
            && is_up(up, region_ix[t.region_of(z)])
    };
    let api_up = |up: &[bool]| {
        let members = node_ix
            .iter()
            .filter(|(n, ix)| is_up(up, *ix) && zone_up(up, t.nodes[*n].zone))
            .count();
        let exposure = is_up(up, exposure_ix)
            && t.exposure
                .as_ref()
                .and_then(|e| e.zone)
                .is_none_or(|z| zone_up(up, z));
        total > 0 && members >= q && exposure
    };
    let (mut now, mut downtime, mut outages) = (0.0f64, 0.0f64, 0u64);
    let mut api = api_up(&up);
    let mut reported = 0.0;
    loop {
        let (i, at) =
            next.iter()
                .enumerate()
                .fold((usize::MAX, f64::INFINITY), |best, (i, &at)| {
                    if at < best.1 { (i, at) } else { best }
                });
        let step_to = at.min(horizon);
        if !api {
            downtime += step_to - now;
        }
        now = step_to;
        if now >= horizon || i == usize::MAX {
            break;
        }
        up[i] = !up[i];
        next[i] = now + rng.exponential(if up[i] { doms[i].1 } else { doms[i].2 });
        let was = api;
        api = api_up(&up);
        if was && !api {
            outages += 1;
        }
        let done = now / horizon;
        if done - reported >= 0.01 {
            reported = done;
            progress(done);
        }
    }
    progress(1.0);
    let availability = if horizon > 0.0 {
        1.0 - downtime / horizon
    } else {
        1.0
    };
    MonteCarlo {
        years,
        availability,
        downtime_minutes_per_year: (1.0 - availability) * MINUTES_PER_YEAR,
        outages_per_year: if years > 0.0 {
            outages as f64 / years
        } else {
            0.0
        },
    }
}
