//! Quorum tolerance and exact availability equal brute-force enumeration on small random
//! topologies.

#![allow(clippy::unwrap_used)]

use kmetal_topology::Topology;
use kmetal_topology::availability::{brute_force, exact};
use kmetal_topology::quorum::{Level, quorum_size, tolerance};
use proptest::prelude::*;

/// A random topology: 1–2 regions, 1–2 sites each, 1–3 zones each, 0–3 members per zone.
fn topology() -> impl Strategy<Value = String> {
    let zone = (0usize..=3, 0.5f64..1.0, proptest::bool::ANY);
    let site = (prop::collection::vec(zone, 1..=3), 0.8f64..=1.0);
    let region = (prop::collection::vec(site, 1..=2), 0.9f64..=1.0);
    (prop::collection::vec(region, 1..=2), proptest::bool::ANY).prop_map(|(regions, exposed)| {
        let mut y = String::from("name: random\ndefaults: { rtt_ms: { same_site: 1, same_region: 3, wan: 30 } }\nregions:\n");
        let mut z = 0;
        for (ri, (sites, ra)) in regions.iter().enumerate() {
            y += &format!("  - name: r{ri}\n    availability: {ra}\n    sites:\n");
            for (si, (zones, sa)) in sites.iter().enumerate() {
                y += &format!("      - name: r{ri}s{si}\n        availability: {sa}\n        zones:\n");
                for (members, za, flaky) in zones {
                    y += &format!("          - name: z{z}\n            availability: {za}\n            nodes:\n");
                    y += &format!("              - {{ name: w{z}, roles: [worker] }}\n");
                    for m in 0..*members {
                        let na = if *flaky { 0.9 } else { 1.0 };
                        y += &format!("              - {{ name: m{z}-{m}, roles: [control-plane], availability: {na} }}\n");
                    }
                    z += 1;
                }
            }
        }
        if exposed {
            y += "exposure: { kind: stretched-l2-vip, zone: z0, availability: 0.99 }\n";
        }
        y
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn exact_availability_equals_enumeration(yaml in topology()) {
        let t = Topology::from_yaml(&yaml).unwrap();
        prop_assume!(t.regions.len() + t.sites.len() + t.zones.len() + t.members() <= 20);
        let (e, b) = (exact(&t), brute_force(&t).unwrap());
        prop_assert!((e - b).abs() < 1e-9, "exact {e} vs brute force {b}\n{yaml}");
    }

    #[test]
    fn tolerance_equals_enumeration(yaml in topology()) {
        let t = Topology::from_yaml(&yaml).unwrap();
        let total = t.members();
        for level in [Level::Zone, Level::Site, Level::Region] {
            let d = kmetal_topology::quorum::domains(&t, level);
            let n = d.members.len();
            // Brute force: the largest k with every k-subset keeping quorum.
            let keeps = |mask: usize| {
                let lost: usize = (0..n).filter(|b| mask & (1 << b) != 0).map(|b| d.members[b]).sum();
                total > 0 && total - lost >= quorum_size(total)
            };
            let mut k = 0;
            while k < n && (0usize..1 << n).filter(|m| m.count_ones() as usize == k + 1).all(keeps) {
                k += 1;
            }
            // Losing every domain never keeps quorum, so cap at what tolerance reports.
            let tol = tolerance(&t, level);
            prop_assert_eq!(tol.tolerated, if total == 0 { 0 } else { k }, "{:?}\n{}", level, yaml);
            for set in &tol.minimal_failing_sets {
                let mask = set.domains.iter().map(|name| 1usize << d.names.iter().position(|x| x == name).unwrap()).sum::<usize>();
                prop_assert!(!keeps(mask));
            }
        }
    }
}
