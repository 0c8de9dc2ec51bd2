//! Konnectivity's known failures, each run the same way through the real pair (the real
//! konnectivity-server and konnectivity-agent, processes) and through ours (our server and
//! agent): ours must hold up, and each test prints its row of the comparison table, real vs
//! ours (`cargo test -p kmetal-tunnel --test konnectivity_failures -- --nocapture`).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use kmetal_testkit::konnectivity::{AgentOptions, ServerOptions};
use kmetal_testkit::{FaultProxy, KonnectivityAgent, KonnectivityServer};
use kmetal_tunnel::{ProxyClient, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(30);

/// The real pair (no agent when `with_agent` is false), at our tests' keepalive.
async fn real_pair(
    b: &kmetal_pki::Bundle,
    with_agent: bool,
) -> (KonnectivityServer, Option<KonnectivityAgent>) {
    let tls = link_tls(b);
    let mut o = ServerOptions::grpc_uds(&tls);
    // The same keepalive as ours (tests' server_config): the real default is an hour.
    o.extra_args.push("--keepalive-time=1s".into());
    let server = KonnectivityServer::start(o)
        .await
        .expect("konnectivity-server");
    if !with_agent {
        return (server, None);
    }
    let mut a = AgentOptions::to(&server, &tls);
    a.extra_args.push("--keepalive-time=1s".into());
    let mut agent = KonnectivityAgent::start(a)
        .await
        .expect("konnectivity-agent");
    agent.wait_connected().await.expect("connected");
    (server, Some(agent))
}

/// A backend that writes without end to every connection.
async fn flood() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let chunk = vec![1u8; 64 << 10];
                while s.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    addr.to_string()
}

/// Ten 1 KiB round trips on a new dial, within 10 s; the time they took.
async fn probe(uds: &Path, echo: &str) -> Result<Duration, String> {
    let client = ProxyClient::connect_unix(uds)
        .await
        .map_err(|e| e.to_string())?
        .with_dial_timeout(Duration::from_secs(10));
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut s = client.dial(echo).await.map_err(|e| e.to_string())?;
        let (msg, mut back) = ([9u8; 1024], [0u8; 1024]);
        for _ in 0..10 {
            s.write_all(&msg).await.map_err(|e| e.to_string())?;
            s.read_exact(&mut back).await.map_err(|e| e.to_string())?;
        }
        Ok::<_, String>(t.elapsed())
    })
    .await
    .map_err(|_| "no answer within 10 s".to_string())?
}

/// With one stream's reader stalled (its backend keeps writing), a new stream through the
/// same agent still answers.
async fn head_of_line(uds: &Path, flood: &str, echo: &str) -> Result<Duration, String> {
    let stalled_client = ProxyClient::connect_unix(uds)
        .await
        .map_err(|e| e.to_string())?;
    let stalled = stalled_client
        .dial(flood)
        .await
        .map_err(|e| e.to_string())?;
    // Let every buffer between the backend and the stalled reader fill.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let result = probe(uds, echo).await;
    drop(stalled);
    result
}

fn row(name: &str, real: &Result<Duration, String>, ours: &Result<Duration, String>) {
    let show = |r: &Result<Duration, String>| match r {
        Ok(d) => format!("ok in {:.1} ms", d.as_secs_f64() * 1e3),
        Err(e) => format!("FAILS: {e}"),
    };
    println!("| {name} | {} | {} |", show(real), show(ours));
}

/// Head-of-line blocking (ANP #180, #881): one stalled stream on an agent must not block
/// another stream through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_blocks_no_other_stream() {
    let b = bundle("tenant-a");
    let (flood, echo) = (flood().await, echo_backend().await.to_string());
    let (real_server, _real_agent) = real_pair(&b, true).await;
    let real = head_of_line(real_server.uds(), &flood, &echo).await;
    let tunnel = Tunnel::start(&b, server_config("s0", 1)).await;
    let _agent = agent(&b, vec![tunnel.agent_addr.to_string()], "node-1");
    assert!(eventually(WAIT, || tunnel.server.stats().agents == 1).await);
    let ours = head_of_line(&tunnel.grpc_uds, &flood, &echo).await;
    row(
        "one stalled stream, then a new stream's 10 round trips",
        &real,
        &ours,
    );
    assert!(ours.is_ok(), "{ours:?}");
}

/// The dial backstop: with no agent connected, a dial fails at once instead of waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_agent_a_dial_fails_at_once() {
    let b = bundle("tenant-a");
    let echo = echo_backend().await.to_string();
    let dial_error = |uds: std::path::PathBuf| {
        let echo = echo.clone();
        async move {
            let client = ProxyClient::connect_unix(&uds)
                .await
                .map_err(|e| e.to_string())?
                .with_dial_timeout(Duration::from_secs(60));
            let t = Instant::now();
            match client.dial(&echo).await {
                Ok(_) => Err("the dial succeeded with no agent".to_string()),
                Err(e) => Ok((t.elapsed(), e.to_string())),
            }
        }
    };
    let (real_server, _) = real_pair(&b, false).await;
    let real = dial_error(real_server.uds().to_owned()).await;
    let tunnel = Tunnel::start(&b, server_config("s0", 1)).await;
    let ours = dial_error(tunnel.grpc_uds.clone()).await;
    println!("| no agent: time to the dial's error | {real:?} | {ours:?} |");
    let (took, _) = ours.expect("a dial error");
    assert!(took < Duration::from_secs(1), "{took:?}");
}

/// An agent that goes silent (its link black-holed, no FIN): dials must fail fast once the
/// keepalive notices, not be sent to it and hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dials_are_not_sent_to_an_agent_that_is_gone() {
    let b = bundle("tenant-a");
    let echo = echo_backend().await.to_string();
    let after_cut = |uds: std::path::PathBuf, proxy: FaultProxy| {
        let echo = echo.clone();
        async move {
            proxy.blackhole();
            tokio::time::sleep(Duration::from_millis(500)).await;
            // The real server keeps such a dial until the client gives up; 20 s is enough to
            // show it.
            let client = ProxyClient::connect_unix(&uds)
                .await
                .map_err(|e| e.to_string())?
                .with_dial_timeout(Duration::from_secs(20));
            let t = Instant::now();
            match client.dial(&echo).await {
                Ok(_) => Err("a dial reached a black-holed agent".to_string()),
                Err(e) => Ok((t.elapsed(), e.to_string())),
            }
        }
    };
    // The real pair, with the proxy between agent and server.
    let tls = link_tls(&b);
    let mut o = ServerOptions::grpc_uds(&tls);
    o.extra_args.push("--keepalive-time=1s".into());
    let real_server = KonnectivityServer::start(o).await.expect("server");
    let proxy = FaultProxy::start(real_server.agent_addr())
        .await
        .expect("proxy");
    let (_, _real_agent) = {
        let mut a = AgentOptions::to(&real_server, &tls);
        a.server = proxy.addr();
        a.extra_args.push("--keepalive-time=1s".into());
        let mut agent = KonnectivityAgent::start(a).await.expect("agent");
        agent.wait_connected().await.expect("connected");
        ((), agent)
    };
    let real = after_cut(real_server.uds().to_owned(), proxy).await;

    let tunnel = Tunnel::start(&b, server_config("s0", 1)).await;
    let proxy = FaultProxy::start(tunnel.agent_addr).await.expect("proxy");
    let _agent = agent(&b, vec![proxy.addr().to_string()], "node-1");
    assert!(eventually(WAIT, || tunnel.server.stats().agents == 1).await);
    let ours = after_cut(tunnel.grpc_uds.clone(), proxy).await;
    println!("| silent agent: time to the dial's error | {real:?} | {ours:?} |");
    let (took, _) = ours.expect("a dial error");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

/// `go_goroutines` of a real process's metrics.
fn goroutines(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("go_goroutines "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// 10,000 dial / round trip / close cycles, 16 at a time.
async fn cycles(uds: &Path, echo: &str, n: usize) -> usize {
    let client = ProxyClient::connect_unix(uds).await.expect("client");
    let mut ok = 0;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        if set.len() >= 16 {
            ok += usize::from(matches!(set.join_next().await, Some(Ok(true))));
        }
        let (client, echo) = (client.clone(), echo.to_string());
        set.spawn(async move {
            let Ok(mut s) = client.dial(&echo).await else {
                return false;
            };
            let msg = [i as u8; 64];
            let mut back = [0u8; 64];
            s.write_all(&msg).await.is_ok() && s.read_exact(&mut back).await.is_ok()
        });
    }
    while let Some(r) = set.join_next().await {
        ok += usize::from(matches!(r, Ok(true)));
    }
    ok
}

/// Leaks: after 10,000 dial/close cycles every connection, pending dial and task of ours is
/// released; the real server's goroutines and RSS are printed for the same load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_dial_close_cycles_leak_nothing() {
    let n = 10_000;
    let b = bundle("tenant-a");
    let echo = echo_backend().await.to_string();

    let (real_server, real_agent) = real_pair(&b, true).await;
    let real_agent = real_agent.expect("agent");
    let pid = real_server.pid().expect("pid");
    cycles(real_server.uds(), &echo, 10).await;
    let (g0, m0) = (
        goroutines(&real_server.metrics().await.expect("metrics")),
        rss_kb(pid),
    );
    let real_ok = cycles(real_server.uds(), &echo, n).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (g1, m1) = (
        goroutines(&real_server.metrics().await.expect("metrics")),
        rss_kb(pid),
    );
    let agent_g = goroutines(&real_agent.metrics().await.expect("metrics"));
    println!(
        "| real: {real_ok}/{n} cycles ok; server goroutines {g0} -> {g1}, RSS {m0} -> {m1} KiB; agent goroutines {agent_g} |"
    );

    let tunnel = Tunnel::start(&b, server_config("s0", 1)).await;
    let _agent = agent(&b, vec![tunnel.agent_addr.to_string()], "node-1");
    assert!(eventually(WAIT, || tunnel.server.stats().agents == 1).await);
    cycles(&tunnel.grpc_uds, &echo, 10).await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let (t0, r0) = (metrics.num_alive_tasks(), rss_kb(std::process::id()));
    let ours_ok = cycles(&tunnel.grpc_uds, &echo, n).await;
    assert!(
        eventually(WAIT, || {
            let s = tunnel.server.stats();
            s.connections == 0 && s.pending_dials == 0
        })
        .await,
        "{:?}",
        tunnel.server.stats()
    );
    let settled = eventually(WAIT, || metrics.num_alive_tasks() <= t0 + 4).await;
    let (t1, r1) = (metrics.num_alive_tasks(), rss_kb(std::process::id()));
    println!(
        "| ours: {ours_ok}/{n} cycles ok; tasks {t0} -> {t1}, RSS (server, agent, client, backend) {r0} -> {r1} KiB; {:?} |",
        tunnel.server.stats()
    );
    assert_eq!(ours_ok, n);
    assert!(settled, "tasks {t0} -> {t1}");
}

/// A backend that accepts slowly: a backlog of 8, one accept every 20 ms, then it closes the
/// connection.
async fn slow_acceptor() -> String {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let addr = socket.local_addr().expect("addr");
    let l = socket.listen(8).expect("listen");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            drop(s);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    addr.to_string()
}

/// `n` CONNECT dials at once through the unix socket `uds`, each given up after 3 s; the
/// dials answered 200 and the largest pending count `pending` reported meanwhile.
async fn pile_up(
    uds: &Path,
    target: &str,
    n: usize,
    pending: impl AsyncFn() -> usize,
) -> (usize, usize) {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (uds, target) = (uds.to_owned(), target.to_string());
        set.spawn(async move {
            let Ok(s) = tokio::net::UnixStream::connect(&uds).await else {
                return false;
            };
            matches!(
                tokio::time::timeout(Duration::from_secs(3), connect_over(s, &target)).await,
                Ok(Ok(_))
            )
        });
    }
    let (mut ok, mut most) = (0, 0);
    loop {
        most = most.max(pending().await);
        match tokio::time::timeout(Duration::from_millis(200), set.join_next()).await {
            Ok(Some(r)) => ok += usize::from(matches!(r, Ok(true))),
            Ok(None) => break,
            Err(_) => {}
        }
    }
    (ok, most)
}

/// Pending dials piling up under load (ANP #855): 1,000 HTTP CONNECT dials to a backend that
/// accepts slowly, every client giving up after 3 s. Once they have, no dial may stay pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_dials_do_not_pile_up_behind_a_slow_backend() {
    let n = 1_000;
    let b = bundle("tenant-a");
    let slow = slow_acceptor().await;

    let tls = link_tls(&b);
    let mut o = ServerOptions::grpc_uds(&tls);
    o.mode = kmetal_testkit::konnectivity::Mode::HttpConnect;
    let real_server = KonnectivityServer::start(o).await.expect("server");
    let mut agent = KonnectivityAgent::start(AgentOptions::to(&real_server, &tls))
        .await
        .expect("agent");
    agent.wait_connected().await.expect("connected");
    let real_pending = async || {
        let m = real_server.metrics().await.unwrap_or_default();
        m.lines()
            .filter(|l| l.starts_with("konnectivity_network_proxy_server_pending_backend_dials"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as usize
    };
    let t = Instant::now();
    let (real_ok, real_most) = pile_up(real_server.uds(), &slow, n, real_pending).await;
    let real_took = t.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let real_left = real_pending().await;

    let tunnel = Tunnel::start(&b, server_config("s0", 1)).await;
    let _agent = agent_for(&b, &tunnel);
    assert!(eventually(WAIT, || tunnel.server.stats().agents == 1).await);
    let ours_pending = async || tunnel.server.stats().pending_dials;
    let t = Instant::now();
    let (ours_ok, ours_most) = pile_up(&tunnel.connect_uds, &slow, n, ours_pending).await;
    let ours_took = t.elapsed();
    let settled = eventually(Duration::from_secs(15), || {
        tunnel.server.stats().pending_dials == 0
    })
    .await;
    println!(
        "| {n} dials to a slow backend | {real_ok} answered in {real_took:.1?}, at most {real_most} pending, {real_left} still pending 5 s after | {ours_ok} answered in {ours_took:.1?}, at most {ours_most} pending, {} still pending |",
        tunnel.server.stats().pending_dials
    );
    assert!(settled, "{:?}", tunnel.server.stats());
}

/// Our agent for `tunnel`, connected.
fn agent_for(b: &kmetal_pki::Bundle, tunnel: &Tunnel) -> kmetal_tunnel::Agent {
    agent(b, vec![tunnel.agent_addr.to_string()], "node-1")
}

/// ANP #855 itself: the agent's link stops making progress while it still counts as
/// connected (the link black-holed: no bytes, no FIN), each side at its default keepalive,
/// and 1,000 HTTP CONNECT dials arrive, each client giving up after 3 s. A real server's
/// handlers block sending DIAL_REQ into the stalled stream and their pending dials stay; ours
/// must hold none 15 s later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_dials_do_not_pile_up_behind_a_stalled_agent_link() {
    let n = 1_000;
    let b = bundle("tenant-a");
    let echo = echo_backend().await.to_string();

    let tls = link_tls(&b);
    let mut o = ServerOptions::grpc_uds(&tls);
    o.mode = kmetal_testkit::konnectivity::Mode::HttpConnect;
    let real_server = KonnectivityServer::start(o).await.expect("server");
    let proxy = FaultProxy::start(real_server.agent_addr())
        .await
        .expect("proxy");
    let mut a = AgentOptions::to(&real_server, &tls);
    a.server = proxy.addr();
    let mut real_agent = KonnectivityAgent::start(a).await.expect("agent");
    real_agent.wait_connected().await.expect("connected");
    proxy.blackhole();
    let real_pending = async || {
        let m = real_server.metrics().await.unwrap_or_default();
        m.lines()
            .filter(|l| l.starts_with("konnectivity_network_proxy_server_pending_backend_dials"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as usize
    };
    let (real_ok, real_most) = pile_up(real_server.uds(), &echo, n, real_pending).await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    let real_left = real_pending().await;

    let tunnel = Tunnel::start(&b, ServerConfig::new("s0", 1)).await;
    let proxy = FaultProxy::start(tunnel.agent_addr).await.expect("proxy");
    let _agent = agent(&b, vec![proxy.addr().to_string()], "node-1");
    assert!(eventually(WAIT, || tunnel.server.stats().agents == 1).await);
    proxy.blackhole();
    let ours_pending = async || tunnel.server.stats().pending_dials;
    let (ours_ok, ours_most) = pile_up(&tunnel.connect_uds, &echo, n, ours_pending).await;
    let settled = eventually(Duration::from_secs(15), || {
        tunnel.server.stats().pending_dials == 0
    })
    .await;
    println!(
        "| {n} dials behind a stalled agent link | {real_ok} answered, at most {real_most} pending, {real_left} still pending 15 s after | {ours_ok} answered, at most {ours_most} pending, {} still pending |",
        tunnel.server.stats().pending_dials
    );
    assert!(settled, "{:?}", tunnel.server.stats());
}
