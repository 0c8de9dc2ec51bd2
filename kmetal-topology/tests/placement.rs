//! Placement never breaks a constraint, is deterministic per seed, explains infeasible
//! tenants; failure simulation reports per tenant as the quorum rules say.

#![allow(clippy::unwrap_used)]

use kmetal_topology::Topology;
use kmetal_topology::model::Resources;
use kmetal_topology::placement::{Blocker, TenantRequest, place, violations};
use kmetal_topology::simulate::{Outage, simulate};
use proptest::prelude::*;

fn load(name: &str) -> Topology {
    Topology::from_file(format!(
        "{}/../examples/topologies/{name}.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn grid(zones: &[(usize, u32)]) -> Topology {
    let mut y = String::from(
        "name: grid\ndefaults: { rtt_ms: { same_site: 2, same_region: 8, wan: 40 } }\nregions:\n  - name: r\n    sites:\n      - name: s\n        zones:\n",
    );
    for (z, (nodes, pods)) in zones.iter().enumerate() {
        if *nodes == 0 {
            y += &format!("          - {{ name: z{z}, nodes: [] }}\n");
            continue;
        }
        y += &format!("          - name: z{z}\n            nodes:\n");
        for n in 0..*nodes {
            y += &format!(
                "              - {{ name: n{z}-{n}, roles: [control-plane], capacity: {{ cpu: 8, memory_gib: 16, pods: {pods} }} }}\n"
            );
        }
    }
    Topology::from_yaml(&y).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn placements_never_violate_a_constraint(
        zones in prop::collection::vec((0usize..4, 0u32..40), 1..6),
        tenants in prop::collection::vec((1u32..5, 0u32..3, 1u32..3, 0u32..4), 1..40),
        seed in any::<u64>(),
    ) {
        let t = grid(&zones);
        let reqs: Vec<TenantRequest> = tenants
            .iter()
            .enumerate()
            .map(|(i, &(replicas, skew, pods, etcd))| TenantRequest {
                max_skew: skew,
                resources: Resources { cpu: 0.5, memory_gib: 1.0, pods },
                etcd_members: etcd,
                ..TenantRequest::new(format!("t{i}"), replicas)
            })
            .collect();
        let p = place(&t, &reqs, seed);
        prop_assert_eq!(p.placed.len() + p.failed.len(), reqs.len());
        let v = violations(&t, &reqs, &p);
        prop_assert!(v.is_empty(), "{:?}", v);
        prop_assert_eq!(place(&t, &reqs, seed), p, "same seed, same placement");
    }
}

#[test]
fn infeasible_tenants_name_their_constraint() {
    let a = load("pattern-a");
    let cloud = TenantRequest {
        cloud_only: true,
        ..TenantRequest::new("c", 3)
    };
    let huge = TenantRequest {
        resources: Resources {
            cpu: 64.0,
            memory_gib: 1.0,
            pods: 1,
        },
        ..TenantRequest::new("huge", 1)
    };
    let four = TenantRequest::new("four", 4); // 3 control-plane nodes, one replica each
    let tight = TenantRequest {
        etcd_members: 3,
        etcd_rtt_budget_ms: 1.0,
        ..TenantRequest::new("tight", 1)
    };
    let p = place(&a, &[cloud, huge, four, tight], 1);
    assert!(p.placed.is_empty(), "{:?}", p.placed);
    let blockers: Vec<&Blocker> = p.failed.iter().map(|f| &f.blocker).collect();
    assert!(
        matches!(blockers[0], Blocker::NoEligibleNodes { .. }),
        "{blockers:?}"
    );
    assert!(
        matches!(blockers[1], Blocker::Capacity { .. }),
        "{blockers:?}"
    );
    assert!(matches!(blockers[2], Blocker::AntiAffinity), "{blockers:?}");
    assert!(
        matches!(blockers[3], Blocker::RttBudget { .. }),
        "{blockers:?}"
    );
    assert!(
        p.failed[3].reason.contains("1 ms"),
        "{}",
        p.failed[3].reason
    );
    // Rolled back: the capacity is untouched.
    assert_eq!(
        p.free,
        a.nodes.iter().map(|n| n.capacity).collect::<Vec<_>>()
    );
}

#[test]
fn pattern_c_places_control_planes_in_the_cloud() {
    let c = load("pattern-c");
    let reqs: Vec<TenantRequest> = (0..20)
        .map(|i| TenantRequest {
            cloud_only: true,
            ..TenantRequest::new(format!("t{i}"), 3)
        })
        .collect();
    let p = place(&c, &reqs, 3);
    assert!(p.failed.is_empty(), "{:?}", p.failed);
    for tp in &p.placed {
        for &n in &tp.replicas {
            assert!(c.nodes[n].name.starts_with("cp-"));
        }
    }
}

#[test]
fn zone_and_site_failures_per_tenant() {
    let a = load("pattern-a");
    let reqs: Vec<TenantRequest> = (0..30)
        .map(|i| TenantRequest::new(format!("t{i}"), 3))
        .collect();
    let p = place(&a, &reqs, 11);
    assert!(p.failed.is_empty());

    let zone = simulate(&a, &reqs, &p, &Outage::Domains(vec!["fra1-a".into()])).unwrap();
    assert!(zone.under_cluster_quorum);
    assert_eq!(zone.tenants_up, 30);
    for o in &zone.tenants {
        assert_eq!(o.replicas_lost, 1);
        assert!(
            !o.reschedulable,
            "every surviving node already runs a replica"
        );
        assert_eq!(o.rto_s, Some(0.0), "two replicas keep serving");
    }

    let site = simulate(&a, &reqs, &p, &Outage::Domains(vec!["fra-dc1".into()])).unwrap();
    assert!(!site.under_cluster_quorum);
    assert_eq!(site.tenants_down, 30);
    assert!(site.tenants.iter().all(|o| o.rto_s.is_none()));

    // A partition: the side with two members keeps quorum.
    let split = Outage::Partition(vec![vec!["fra-dc1".into()], vec!["fra-dc2".into()]]);
    let r = simulate(&a, &reqs, &p, &split).unwrap();
    assert_eq!(r.zones_down, vec!["fra2-a".to_string()]);
    assert!(r.under_cluster_quorum);

    let mgmt = simulate(&a, &reqs, &p, &Outage::ManagementPlane).unwrap();
    assert_eq!((mgmt.tenants_up, mgmt.tenants_unmanaged), (30, 30));

    assert!(simulate(&a, &reqs, &p, &Outage::Domains(vec!["atlantis".into()])).is_err());
}

#[test]
fn dedicated_etcd_tenants_keep_their_own_quorum() {
    // Pattern B has two nodes that take pods: three members cannot get a node each.
    let b = load("pattern-b");
    let three = vec![TenantRequest {
        etcd_members: 3,
        ..TenantRequest::new("d", 2)
    }];
    let p = place(&b, &three, 5);
    assert!(
        matches!(
            p.failed[0].blocker,
            Blocker::EtcdNodes {
                members: 3,
                available: 2
            }
        ),
        "{:?}",
        p.failed
    );

    let a = load("pattern-a");
    let p = place(&a, &three, 5);
    assert!(p.failed.is_empty(), "{:?}", p.failed);
    let zones: std::collections::HashSet<_> =
        p.placed[0].etcd.iter().map(|&n| a.nodes[n].zone).collect();
    assert_eq!(zones.len(), 3, "members spread over the three zones");
    let one = simulate(&a, &three, &p, &Outage::Domains(vec!["fra1-a".into()])).unwrap();
    let o = &one.tenants[0];
    assert!(o.etcd_quorum && o.api_up);
    assert_eq!(
        o.rto_s,
        Some(1.0),
        "a lost member may have been the leader: one election"
    );
    let two = simulate(
        &a,
        &three,
        &p,
        &Outage::Domains(vec!["fra1-a".into(), "fra1-b".into()]),
    )
    .unwrap();
    assert!(!two.tenants[0].etcd_quorum && two.tenants[0].rto_s.is_none());
}
