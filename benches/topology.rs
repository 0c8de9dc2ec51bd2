//! kmetal-topology at scale (issue 3 targets), each figure printed against its target:
//! - place 100,000 tenants × 3 replicas on 5,000 nodes over 30 zones: ≤ 1 s;
//! - exact availability over 64 zones: ≤ 1 ms (and against brute-force enumeration, the
//!   naive peer, on a 16-zone topology where enumeration is still possible);
//! - all zone-failure combinations for 9 zones: ≤ 1 ms.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use std::hint::black_box;

use criterion::Criterion;
use kmetal::topology::Topology;
use kmetal::topology::availability::{brute_force, exact};
use kmetal::topology::placement::{TenantRequest, place};
use kmetal::topology::quorum::failure_combinations;

/// `zones` zones over 3 sites, `nodes_per_zone` control-plane nodes each, one etcd member per
/// zone on the first node.
fn grid(zones: usize, nodes_per_zone: usize, availability: f64) -> Topology {
    let mut y = format!(
        "name: grid{zones}\ndefaults: {{ zone_availability: {availability}, rtt_ms: {{ same_site: 1, same_region: 4, wan: 40 }} }}\nregions:\n  - name: r\n    sites:\n"
    );
    for s in 0..3 {
        y += &format!("      - name: s{s}\n        zones:\n");
        for z in (0..zones).filter(|z| z % 3 == s) {
            y += &format!(
                "          - name: z{z}\n            nodes:\n              - {{ name: etcd{z}, roles: [control-plane], capacity: {{ cpu: 64, memory_gib: 256, pods: 250 }} }}\n"
            );
            if nodes_per_zone > 1 {
                y += &format!(
                    "              - {{ name: n{z}, roles: [control-plane], etcd: false, count: {}, capacity: {{ cpu: 64, memory_gib: 256, pods: 250 }} }}\n",
                    nodes_per_zone - 1
                );
            }
        }
    }
    Topology::from_yaml(&y).unwrap()
}

fn time_once(f: impl FnOnce()) -> Duration {
    let start = Instant::now();
    f();
    start.elapsed()
}

fn main() {
    let mut c = Criterion::default()
        .output_directory(&common::criterion_dir())
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();

    let big = grid(30, 167, 0.999);
    assert!(big.nodes.len() >= 5_000);
    let tenants: Vec<TenantRequest> = (0..100_000)
        .map(|i| TenantRequest::new(format!("t{i}"), 3))
        .collect();
    let mut g = c.benchmark_group("topology_place");
    g.sample_size(10);
    g.bench_function("100k_tenants_x3_on_5k_nodes_30_zones", |b| {
        b.iter(|| {
            let p = place(&big, black_box(&tenants), 42);
            assert!(p.failed.is_empty());
            p
        })
    });
    g.finish();

    let z64 = grid(64, 1, 0.999);
    let z8 = grid(8, 1, 0.99);
    c.bench_function("topology_exact_availability_64_zones", |b| {
        b.iter(|| exact(black_box(&z64)))
    });
    c.bench_function("topology_exact_availability_8_zones", |b| {
        b.iter(|| exact(black_box(&z8)))
    });
    c.bench_function("topology_brute_force_availability_8_zones", |b| {
        b.iter(|| brute_force(black_box(&z8)).unwrap())
    });
    let nine = [1usize, 2, 1, 3, 1, 1, 2, 1, 1];
    c.bench_function("topology_all_zone_failures_9_zones", |b| {
        b.iter(|| failure_combinations(black_box(&nine)))
    });
    c.final_summary();

    // Headline figures, each the median of a few direct runs, against the targets.
    let median = |mut runs: Vec<Duration>| {
        runs.sort();
        runs[runs.len() / 2]
    };
    let place_t = median(
        (0..3)
            .map(|_| time_once(|| drop(place(&big, &tenants, 42))))
            .collect(),
    );
    let avail_t = median(
        (0..101)
            .map(|_| {
                time_once(|| {
                    black_box(exact(&z64));
                })
            })
            .collect(),
    );
    let combos_t = median(
        (0..101)
            .map(|_| time_once(|| drop(black_box(failure_combinations(&nine)))))
            .collect(),
    );
    let exact8 = median(
        (0..101)
            .map(|_| {
                time_once(|| {
                    black_box(exact(&z8));
                })
            })
            .collect(),
    );
    let brute8 = median(
        (0..5)
            .map(|_| {
                time_once(|| {
                    black_box(brute_force(&z8));
                })
            })
            .collect(),
    );
    println!(
        "\nfigure (median of direct runs)                     time        target   time/target"
    );
    let row = |name: &str, t: Duration, target: Duration| {
        println!(
            "{name:<50} {:>10.3?} {:>10.3?} {:>10.4}",
            t,
            target,
            t.as_secs_f64() / target.as_secs_f64()
        )
    };
    row(
        "place 100k tenants x 3 on 5,010 nodes / 30 zones",
        place_t,
        Duration::from_secs(1),
    );
    row(
        "exact availability, 64 zones",
        avail_t,
        Duration::from_millis(1),
    );
    row(
        "all zone-failure combinations, 9 zones",
        combos_t,
        Duration::from_millis(1),
    );
    println!(
        "exact vs brute-force enumeration (8 zones, 8 members, 2^20 states): {:.3?} vs {:.3?} = {:.0}x faster",
        exact8,
        brute8,
        brute8.as_secs_f64() / exact8.as_secs_f64()
    );
}
