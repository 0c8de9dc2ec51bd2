//! 200 watchers that never read, on the etcd_gateway process over memory, while 100,000
//! puts of 1 KiB happen (compacted every 10,000, as a kube-apiserver does): the gateway's
//! memory stays under a stated bound, healthy watchers see every put once, in order, and
//! each stalled watcher, once it reads, gets what was queued for it and then etcd's
//! compacted cancel (it must relist).

use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{Client, WatchOptions, WatchStream};

mod common;

const STALLED: usize = 200;
const STALLED_CLIENTS: usize = 4;
const HEALTHY: usize = 2;
const PUTS: u64 = 100_000;
const COMPACT_EVERY: u64 = 10_000;
const WRITERS: u64 = 8;
/// The gateway's default per-watch queue (`Limits::watch_buffer_bytes`).
const WATCH_BUFFER: u64 = 1 << 20;

struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

async fn connect(ep: &str) -> Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut c) = Client::connect([ep], None).await
            && c.status().await.is_ok()
        {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway never answered on {ep}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn watch(c: &mut Client, start: i64) -> WatchStream {
    let opts = WatchOptions::new().with_prefix().with_start_revision(start);
    c.watch("/w/", Some(opts)).await.expect("watch")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_watchers_cost_their_queue_and_nothing_more() {
    let port = kmetal_testkit::ports::free_port().expect("port");
    let ep = format!("127.0.0.1:{port}");
    let gw = Gateway(
        common::example("etcd_gateway")
            .args(["--listen", &ep, "--datastore", "memory"])
            .stderr(Stdio::null())
            .spawn()
            .expect("gateway starts"),
    );
    let pid = gw.0.id();
    let mut control = connect(&ep).await;
    let start = control
        .status()
        .await
        .expect("status")
        .header()
        .expect("header")
        .revision()
        + 1;

    // Stalled watchers share a few connections (their unread data blocks only those).
    let mut stalled_clients = Vec::new();
    let mut stalled = Vec::new();
    for c in 0..STALLED_CLIENTS {
        let mut client = connect(&ep).await;
        for _ in 0..STALLED / STALLED_CLIENTS {
            stalled.push(watch(&mut client, start).await);
        }
        stalled_clients.push((c, client));
    }
    let mut healthy = Vec::new();
    for _ in 0..HEALTHY {
        let mut client = connect(&ep).await;
        let mut w = watch(&mut client, start).await;
        healthy.push(tokio::spawn(async move {
            let _client = client;
            let mut next = start;
            while next < start + PUTS as i64 {
                let resp = w.message().await.expect("healthy watch").expect("open");
                assert!(
                    !resp.canceled(),
                    "a healthy watch is never cancelled: {resp:?}"
                );
                for e in resp.events() {
                    let rev = e.kv().expect("kv").mod_revision();
                    assert_eq!(rev, next, "every put once, in order");
                    next += 1;
                }
            }
            next - start
        }));
    }
    let before = rss_bytes(pid);

    let done = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    let value = vec![7u8; 1024];
    for _ in 0..WRITERS {
        let mut kv = connect(&ep).await.kv_client();
        let (done, value) = (done.clone(), value.clone());
        writers.push(tokio::spawn(async move {
            loop {
                let n = done.fetch_add(1, Ordering::Relaxed);
                if n >= PUTS {
                    return;
                }
                kv.put(format!("/w/{:03}", n % 1_000), value.clone(), None)
                    .await
                    .expect("put");
                if n > 0 && n % COMPACT_EVERY == 0 {
                    let rev = kv.get("/w/000", None).await.expect("get");
                    let rev = rev.header().expect("header").revision();
                    kv.compact(rev, None).await.expect("compact");
                }
            }
        }));
    }
    let mut peak = before;
    while writers.iter().any(|w| !w.is_finished()) {
        peak = peak.max(rss_bytes(pid));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for w in writers {
        w.await.expect("writer");
    }
    for h in healthy {
        assert_eq!(h.await.expect("healthy reader"), PUTS as i64);
    }
    peak = peak.max(rss_bytes(pid));
    let grown = peak.saturating_sub(before);
    // Each stalled watch holds at most its queue, the gateway's 64 responses for its stream
    // and h2's send buffer (400 KiB); the store itself holds 1,000 live keys and the
    // history between two compactions.
    let bound = STALLED as u64 * (WATCH_BUFFER + 64 * 1200 + 400 * 1024) + (64 << 20);
    eprintln!(
        "gateway RSS {} MiB before, {} MiB peak ({} MiB grown, bound {} MiB) with {STALLED} \
         stalled watchers over {PUTS} puts of 1 KiB",
        before >> 20,
        peak >> 20,
        grown >> 20,
        bound >> 20
    );
    assert!(grown < bound, "grew {grown} bytes, bound {bound}");

    // The last compaction covers everything a stalled watcher had not been handed.
    let now = control
        .status()
        .await
        .expect("status")
        .header()
        .expect("header")
        .revision();
    control.compact(now, None).await.expect("compact");
    // Read all at once: watches that share a connection share its flow-control window.
    let readers: Vec<_> = stalled
        .into_iter()
        .map(|mut w| {
            tokio::spawn(async move {
                let mut next = start;
                let cancel = loop {
                    let resp = tokio::time::timeout(Duration::from_secs(60), w.message())
                        .await
                        .expect("a stalled watch answers once read")
                        .expect("stream")
                        .expect("open");
                    if resp.canceled() {
                        break resp;
                    }
                    for e in resp.events() {
                        assert_eq!(e.kv().expect("kv").mod_revision(), next, "queued in order");
                        next += 1;
                    }
                };
                assert!(next > start, "it had its queue's worth first");
                assert!(
                    cancel.compact_revision() > 0,
                    "ended with the compacted error, so its client relists: {cancel:?}"
                );
            })
        })
        .collect();
    let mut ended = 0;
    for r in readers {
        r.await.expect("stalled reader");
        ended += 1;
    }
    assert_eq!(ended, STALLED);
    drop(stalled_clients);
}
