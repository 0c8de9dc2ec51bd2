//! The topology model against a real 3-member etcd: the fault proxies reproduce a topology's
//! RTTs between members; the measured median put latency matches the model's commit latency,
//! and losing each zone keeps or loses write availability exactly as the model says.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use etcd_client::Client;
use kmetal::topology::{Topology, analyze};
use kmetal_testkit::{EtcdCluster, EtcdOptions};

/// Member i sits in zone i; RTTs a–b 20 ms, a–c 30 ms, b–c 40 ms.
const THREE_ZONES: &str = r#"
name: measured
defaults: { rtt_ms: { same_zone: 0.1, same_site: 1.0 } }
regions: [{ name: r, sites: [{ name: s, zones: [
  { name: a, nodes: [{ name: m0, roles: [control-plane] }] },
  { name: b, nodes: [{ name: m1, roles: [control-plane] }] },
  { name: c, nodes: [{ name: m2, roles: [control-plane] }] } ] }] }]
rtt:
  - { between: [a, b], ms: 20 }
  - { between: [a, c], ms: 30 }
  - { between: [b, c], ms: 40 }
"#;

/// The same three members read as the two-zone trap: m0 and m1 in zone a, m2 in zone b.
const TWO_ZONES: &str = r#"
name: trap
defaults: { rtt_ms: { same_zone: 0.1, same_site: 1.0 } }
regions: [{ name: r, sites: [{ name: s, zones: [
  { name: a, nodes: [{ name: m0, roles: [control-plane] }, { name: m1, roles: [control-plane] }] },
  { name: b, nodes: [{ name: m2, roles: [control-plane] }] } ] }] }]
"#;

/// Member index of each node (the nodes are named m0, m1, m2).
fn member_of(t: &Topology, node: usize) -> usize {
    t.nodes[node].name[1..].parse().unwrap()
}

async fn median_put_ms(client: &mut Client, n: usize) -> f64 {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let start = Instant::now();
        client.put(format!("/lat/{i}"), "x", None).await.unwrap();
        samples.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    samples[n / 2]
}

/// Whether a write through member `via` succeeds within 10 s (a lost leader first needs an
/// election: the model's RTO is one election timeout, 1 s here).
async fn can_write(cluster: &EtcdCluster, via: usize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Ok(mut c)) =
            tokio::time::timeout(Duration::from_secs(2), cluster.member_client(via)).await
            && let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(2), c.put("/probe", "x", None)).await
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_matches_a_real_cluster() {
    let mut cluster = EtcdCluster::start(EtcdOptions {
        members: 3,
        peer_proxies: true,
        ..EtcdOptions::default()
    })
    .await
    .unwrap();
    let leader = cluster
        .wait_for_leader(Duration::from_secs(30))
        .await
        .unwrap();
    let mut client = cluster.member_client(leader).await.unwrap();
    // The machine's own cost of a commit (fsyncs, loopback) is the model's disk sync.
    let baseline = median_put_ms(&mut client, 100).await;

    // Each peer message crosses exactly one proxy (the receiving side's for pipelined
    // posts, the sending side's for streams), so RTT(i, j) = d_i + d_j for one-way delays
    // d_a = 5, d_b = 15, d_c = 25 ms.
    let mut t = Topology::from_yaml(THREE_ZONES).unwrap();
    for (i, d) in [5u64, 15, 25].into_iter().enumerate() {
        cluster
            .peer_proxy(i)
            .unwrap()
            .set_symmetric_latency(Duration::from_millis(d));
    }
    t.params.disk_sync_ms = baseline;
    let a = analyze(&t);
    let leader = cluster
        .wait_for_leader(Duration::from_secs(30))
        .await
        .unwrap();
    let node = t.nodes.iter().position(|n| n.name == format!("m{leader}"));
    let leader_zone = &t.zones[t.nodes[node.unwrap()].zone].name;
    let expected = a
        .raft
        .per_leader_zone
        .iter()
        .find(|l| &l.zone == leader_zone)
        .unwrap()
        .commit_ms;
    let mut client = cluster.member_client(leader).await.unwrap();
    median_put_ms(&mut client, 10).await; // warm the streams
    let measured = median_put_ms(&mut client, 60).await;
    eprintln!(
        "leader m{leader} (zone {leader_zone}): measured {measured:.2} ms, model {expected:.2} ms (baseline {baseline:.2} ms)"
    );
    assert!(
        (measured - expected).abs() <= 0.25 * expected + 1.0,
        "measured {measured:.2} ms vs model {expected:.2} ms"
    );
    for i in 0..3 {
        cluster
            .peer_proxy(i)
            .unwrap()
            .set_symmetric_latency(Duration::ZERO);
    }

    // Zone cuts: kill every member of the zone, try to write through a survivor.
    for yaml in [THREE_ZONES, TWO_ZONES] {
        let t = Topology::from_yaml(yaml).unwrap();
        let a = analyze(&t);
        for (z, zone) in t.zones.iter().enumerate() {
            let members: Vec<usize> = (0..t.nodes.len())
                .filter(|&n| t.nodes[n].zone == z)
                .map(|n| member_of(&t, n))
                .collect();
            let survivor = (0..3).find(|m| !members.contains(m)).unwrap();
            for &m in &members {
                cluster.kill(m).unwrap();
            }
            let writes = can_write(&cluster, survivor).await;
            let model = a.survives_zone_loss[&zone.name] == true;
            eprintln!(
                "{}: zone {} down -> writes {writes}, model {model}",
                t.name, zone.name
            );
            assert_eq!(writes, model, "{}: losing zone {}", t.name, zone.name);
            for &m in &members {
                cluster.restart(m).await.unwrap();
            }
            cluster
                .wait_for_leader(Duration::from_secs(30))
                .await
                .unwrap();
        }
    }
}
