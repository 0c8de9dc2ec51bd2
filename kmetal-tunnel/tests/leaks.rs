//! 10,000 dial/close cycles leave connections, pending dials, tasks and memory at baseline.
//! Alone in its test binary, so no other test's allocations move the RSS it measures.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_close_cycles_free_everything() {
    let Connected {
        tunnel: t,
        agent,
        backend,
        ..
    } = connected("tenant-a").await;
    let cycle = |i: usize| {
        let t = &t;
        let backend = &backend;
        async move {
            let mut s = connect_unix(t, backend).await.expect("dial");
            if i % 2 == 0 {
                assert_eq!(echo_round(&mut s, b"x").await, b"x");
            }
            drop(s);
        }
    };
    for i in 0..200 {
        cycle(i).await;
    }
    let settled = |t: &Tunnel| {
        let s = t.server.stats();
        s.connections == 0 && s.pending_dials == 0 && agent.stats().connections == 0
    };
    assert!(eventually(Duration::from_secs(10), || settled(&t)).await);
    let metrics = tokio::runtime::Handle::current().metrics();
    let tasks_before = metrics.num_alive_tasks();
    let rss_before = rss_bytes();
    for i in 0..10_000 {
        cycle(i).await;
    }
    assert!(
        eventually(Duration::from_secs(20), || settled(&t)).await,
        "server {:?}, agent {:?}",
        t.server.stats(),
        agent.stats()
    );
    // Echo backends' own tasks end with their connections too.
    assert!(
        eventually(Duration::from_secs(20), || metrics.num_alive_tasks()
            <= tasks_before)
        .await,
        "tasks {} -> {}",
        tasks_before,
        metrics.num_alive_tasks()
    );
    let grown = rss_bytes().saturating_sub(rss_before);
    assert!(grown < 32 << 20, "resident memory grew by {grown} bytes");
    assert_eq!(t.server.stats().dials_ok, 10_200);
    t.stop().await;
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}
