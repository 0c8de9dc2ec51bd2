//! kmetal-tunnel against the real Konnectivity binaries (sigs.k8s.io/apiserver-network-proxy,
//! built by `scripts/peers.sh`), one side swapped at a time, with the tenant's kmetal-pki
//! certificates on both sides: our agent under the real server (gRPC and HTTP CONNECT
//! frontends, every proxy strategy, three replicas behind one address), and the real agent
//! under our server (all three frontends, DRAIN, three replicas). Each test also checks that
//! our flow-control extension never reaches the real side: the real processes run at `-v=5`,
//! where they log every packet type they do not know, and count packets by type.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use kmetal_testkit::konnectivity::{AgentOptions, Mode, ServerOptions};
use kmetal_testkit::{KonnectivityAgent, KonnectivityServer};
use kmetal_tunnel::{AgentConfig, Identifiers, ProxyClient, tls};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};

const WAIT: Duration = Duration::from_secs(30);

/// The packet types the real Konnectivity knows (its `PacketType` enum names).
const KNOWN: [&str; 7] = [
    "DIAL_REQ",
    "DIAL_RSP",
    "CLOSE_REQ",
    "CLOSE_RSP",
    "DATA",
    "DIAL_CLS",
    "DRAIN",
];

/// The packet types in a real process's `*_stream_packets_total` counters.
fn packet_types(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains("_stream_packets_total{"))
        .filter_map(|l| {
            let (_, rest) = l.split_once("packet_type=\"")?;
            Some(rest.split('"').next()?.to_string())
        })
        .collect()
}

/// Asserts that a real process saw only packet types it knows (by its counters and by its
/// `-v=5` log), and that it saw `expected` (so the counters are really there).
fn assert_only_known_packets(who: &str, metrics: &str, log: &str, expected: &[&str]) {
    let seen = packet_types(metrics);
    for t in &seen {
        assert!(
            KNOWN.contains(&t.as_str()),
            "{who} counted a packet type it does not know: {t} (all: {seen:?})"
        );
    }
    for t in expected {
        assert!(seen.contains(*t), "{who} counted no {t}: {seen:?}");
    }
    for line in log.lines() {
        assert!(
            !line.to_ascii_lowercase().contains("unrecognized packet"),
            "{who} got a packet it does not know: {line}"
        );
    }
}

/// A real konnectivity-server with our tenant's certificates, logging at `-v=5`.
async fn real_server(
    b: &kmetal_pki::Bundle,
    mode: Mode,
    strategies: &[&str],
    id: &str,
    count: u32,
) -> KonnectivityServer {
    let mut o = ServerOptions::grpc_uds(&link_tls(b));
    o.mode = mode;
    o.proxy_strategies = strategies.iter().map(|s| s.to_string()).collect();
    o.server_id = Some(id.into());
    o.server_count = count;
    o.extra_args.push("-v=5".into());
    KonnectivityServer::start(o)
        .await
        .expect("konnectivity-server")
}

/// Our agent with `identifiers`, connecting to `servers`.
fn our_agent(
    b: &kmetal_pki::Bundle,
    servers: Vec<String>,
    id: &str,
    ids: &str,
) -> kmetal_tunnel::Agent {
    let mut c = AgentConfig::new(servers, tls::agent_client(b).expect("tls"), id);
    c.identifiers = Identifiers::parse(ids).expect("identifiers");
    c.backoff_initial = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(500);
    c.sync_interval = Duration::from_millis(100);
    kmetal_tunnel::Agent::start(c).expect("agent")
}

/// A real konnectivity-agent with our tenant's certificates, logging at `-v=5`.
async fn real_agent(
    b: &kmetal_pki::Bundle,
    server: SocketAddr,
    id: &str,
    ids: &str,
) -> KonnectivityAgent {
    let mut o = AgentOptions::new(server, &link_tls(b));
    o.identifiers = Some(ids.into());
    o.extra_args = vec![format!("--agent-id={id}"), "-v=5".into()];
    let mut a = KonnectivityAgent::start(o)
        .await
        .expect("konnectivity-agent");
    a.wait_connected().await.expect("connected");
    a
}

async fn wait_for(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let end = tokio::time::Instant::now() + WAIT;
    while !f().await {
        assert!(tokio::time::Instant::now() < end, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An echo server on `ip` (any loopback address).
async fn echo_on(ip: &str) -> SocketAddr {
    let ip: IpAddr = ip.parse().expect("ip");
    let l = TcpListener::bind((ip, 0)).await.expect("bind echo");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Sends `len` bytes through `s` while reading the echo, and checks every byte.
async fn echo_bulk<S: AsyncRead + AsyncWrite>(s: S, len: usize, seed: u8) {
    let data = pattern(len, seed);
    let (mut r, mut w) = tokio::io::split(s);
    let sent = data.clone();
    let writer = async move {
        w.write_all(&sent).await.expect("write");
        w
    };
    let reader = async move {
        let mut got = vec![0u8; len];
        r.read_exact(&mut got).await.expect("read echo");
        got
    };
    let (_w, got) = tokio::time::timeout(WAIT, async { tokio::join!(writer, reader) })
        .await
        .expect("echo within the deadline");
    assert!(got == data, "{len} bytes came back altered");
}

/// Our agent under a real konnectivity-server in gRPC mode: the server counts it as a ready
/// backend, and eight concurrent dials through the real gRPC frontend (our ProxyClient on
/// its unix socket) each carry 1 MiB both ways intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_agent_serves_the_real_server_in_grpc_mode() {
    let b = bundle("tenant-a");
    let server = real_server(&b, Mode::Grpc, &["default"], "real-0", 1).await;
    let agent = our_agent(
        &b,
        vec![server.agent_addr().to_string()],
        "node-1",
        "host=node-1",
    );
    assert!(
        agent.wait_connected(1, WAIT).await,
        "{:?}\n{}",
        agent.stats(),
        server.log_tail(30)
    );
    assert_eq!(agent.servers(), ["real-0"]);
    wait_for("the real server counts our agent", async || {
        server.has_agent().await.unwrap_or(false)
    })
    .await;
    let backend = echo_backend().await.to_string();
    let client = ProxyClient::connect_unix(server.uds())
        .await
        .expect("client");
    let mut streams = tokio::task::JoinSet::new();
    for i in 0..8u8 {
        let (client, backend) = (client.clone(), backend.clone());
        streams.spawn(async move {
            let s = client
                .dial(&backend)
                .await
                .expect("dial through the real server");
            echo_bulk(s, 1 << 20, i).await;
        });
    }
    while let Some(done) = streams.join_next().await {
        done.expect("stream");
    }
    assert!(agent.stats().dials_ok >= 8, "{:?}", agent.stats());
    assert_only_known_packets(
        "konnectivity-server",
        &server.metrics().await.expect("metrics"),
        &server.log_tail(usize::MAX),
        &["DIAL_REQ", "DIAL_RSP", "DATA"],
    );
}

/// Our agent under a real konnectivity-server in HTTP CONNECT mode: a CONNECT on the real
/// server's unix socket reaches the backend through our agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_agent_serves_the_real_server_in_http_connect_mode() {
    let b = bundle("tenant-a");
    let server = real_server(&b, Mode::HttpConnect, &["default"], "real-0", 1).await;
    let agent = our_agent(
        &b,
        vec![server.agent_addr().to_string()],
        "node-1",
        "host=node-1",
    );
    assert!(
        agent.wait_connected(1, WAIT).await,
        "{}",
        server.log_tail(30)
    );
    let backend = echo_backend().await.to_string();
    for i in 0..4u8 {
        let uds = UnixStream::connect(server.uds()).await.expect("uds");
        let s = connect_over(uds, &backend)
            .await
            .expect("CONNECT through the real server");
        echo_bulk(s, 1 << 20, i).await;
    }
    assert!(agent.stats().dials_ok >= 4, "{:?}", agent.stats());
    assert_only_known_packets(
        "konnectivity-server",
        &server.metrics().await.expect("metrics"),
        &server.log_tail(usize::MAX),
        &["DIAL_REQ", "DIAL_RSP", "DATA"],
    );
}

/// The real server routes by our agents' identifiers as it reads them: with
/// `destHost,defaultRoute` a dial to 127.0.0.2 goes to the agent claiming `ipv4=127.0.0.2` and
/// one to 127.0.0.1 to the `default-route=true` agent; with `destHost` alone a host nobody
/// claims is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_server_routes_by_our_agents_identifiers() {
    let b = bundle("tenant-a");
    let routed = real_server(&b, Mode::Grpc, &["destHost", "defaultRoute"], "real-0", 1).await;
    let claimed = echo_on("127.0.0.2").await.to_string();
    let other = echo_on("127.0.0.1").await.to_string();
    let a = our_agent(
        &b,
        vec![routed.agent_addr().to_string()],
        "node-a",
        "host=node-a&ipv4=127.0.0.2",
    );
    let d = our_agent(
        &b,
        vec![routed.agent_addr().to_string()],
        "gateway",
        "default-route=true",
    );
    assert!(a.wait_connected(1, WAIT).await && d.wait_connected(1, WAIT).await);
    // The real server files each agent under the strategy its identifiers qualify it for;
    // destHost counts one entry per identifier (node-a's host and ipv4).
    wait_for("each agent under its strategy", async || {
        let m = routed.metrics().await.unwrap_or_default();
        [("destHost", 2), ("defaultRoute", 1)].iter().all(|(s, n)| {
            let gauge = format!(
                "konnectivity_network_proxy_server_ready_backends{{proxy_strategy=\"{s}\"}} {n}"
            );
            m.lines().any(|l| l == gauge)
        })
    })
    .await;
    let client = ProxyClient::connect_unix(routed.uds())
        .await
        .expect("client");
    for round in 0..3u8 {
        let (a0, d0) = (a.stats().dials_ok, d.stats().dials_ok);
        let s = client.dial(&claimed).await.expect("dial the claimed host");
        echo_bulk(s, 4096, round).await;
        assert_eq!(
            (a.stats().dials_ok, d.stats().dials_ok),
            (a0 + 1, d0),
            "destHost"
        );
        let s = client.dial(&other).await.expect("dial an unclaimed host");
        echo_bulk(s, 4096, round).await;
        assert_eq!(
            (a.stats().dials_ok, d.stats().dials_ok),
            (a0 + 1, d0 + 1),
            "defaultRoute"
        );
    }

    let strict = real_server(&b, Mode::Grpc, &["destHost"], "real-1", 1).await;
    let c = our_agent(
        &b,
        vec![strict.agent_addr().to_string()],
        "node-c",
        "ipv4=127.0.0.2",
    );
    assert!(c.wait_connected(1, WAIT).await);
    wait_for("the strict server counts its agent", async || {
        strict.has_agent().await.unwrap_or(false)
    })
    .await;
    let client = ProxyClient::connect_unix(strict.uds())
        .await
        .expect("client");
    let s = client.dial(&claimed).await.expect("dial the claimed host");
    echo_bulk(s, 4096, 9).await;
    let refused = tokio::time::timeout(WAIT, client.dial(&other))
        .await
        .expect("a refusal, not a hang");
    assert!(
        refused.is_err(),
        "destHost alone must refuse an unclaimed host"
    );
    assert_eq!(c.stats().dials_ok, 1, "{:?}", c.stats());
    for server in [&routed, &strict] {
        assert_only_known_packets(
            "konnectivity-server",
            &server.metrics().await.expect("metrics"),
            &server.log_tail(usize::MAX),
            &["DIAL_REQ", "DATA"],
        );
    }
}

/// The real konnectivity-agent under our server: it is counted with its id and identifiers,
/// flow control stays off, and dials through all three of our frontends (mTLS CONNECT, unix
/// CONNECT, gRPC) carry 1 MiB both ways. After SIGTERM it sends DRAIN, which we honour: its
/// open connection keeps working and new dials are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_agent_serves_our_server_and_its_drain_is_honoured() {
    let b = bundle("tenant-a");
    let tunnel = Tunnel::start(&b, server_config("s0", 1)).await;
    let agent = real_agent(
        &b,
        tunnel.agent_addr,
        "real-node-1",
        "host=node-1&ipv4=10.0.0.1",
    )
    .await;
    assert!(
        eventually(WAIT, || tunnel.server.stats().agents == 1).await,
        "{:?}",
        tunnel.server.stats()
    );
    let info = &tunnel.server.agents()[0];
    assert_eq!(info.id, "real-node-1");
    assert!(info.identifiers.matches_host("node-1") && info.identifiers.matches_host("10.0.0.1"));
    assert!(
        !info.flow_control,
        "the real agent does not do our flow control"
    );

    let backend = echo_backend().await.to_string();
    let s = connect_tls(&tunnel, tls::connect_client(&b).expect("tls"), &backend)
        .await
        .expect("mTLS CONNECT");
    echo_bulk(s, 1 << 20, 1).await;
    let s = connect_unix(&tunnel, &backend).await.expect("unix CONNECT");
    echo_bulk(s, 1 << 20, 2).await;
    let client = ProxyClient::connect_unix(&tunnel.grpc_uds)
        .await
        .expect("client");
    let s = client.dial(&backend).await.expect("gRPC dial");
    echo_bulk(s, 1 << 20, 3).await;
    assert_eq!(tunnel.server.stats().dials_ok, 3);

    // The real agent sends DRAIN from its receive loop, so after the signal it goes out with
    // the agent's next packet from us: the echo on the open connection.
    let mut open = client.dial(&backend).await.expect("gRPC dial");
    agent.terminate().expect("SIGTERM");
    let mut draining = false;
    for i in 0..100u8 {
        assert_eq!(echo_round(&mut open, &[i; 64]).await, [i; 64]);
        if tunnel.server.stats().draining == 1 {
            draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        draining,
        "no DRAIN from the real agent: {}",
        agent.log_tail(20)
    );
    assert_eq!(echo_round(&mut open, b"still open").await, b"still open");
    let refused = connect_unix(&tunnel, &backend).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("503")),
        "a draining agent takes no new dial: {:?}",
        refused.map(|_| ())
    );
    assert!(client.dial(&backend).await.is_err());
    assert_only_known_packets(
        "konnectivity-agent",
        &agent.metrics().await.expect("metrics"),
        &agent.log_tail(usize::MAX),
        &["DIAL_REQ", "DATA"],
    );
    drop(open);
    tunnel.stop().await;
}

/// Three real konnectivity-servers (`--server-count 3`) behind one address: our agent holds
/// a connection to each, and a dial through each real server's frontend works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_agent_holds_three_real_servers_behind_one_address() {
    let b = bundle("tenant-a");
    let mut servers = Vec::new();
    for i in 0..3 {
        servers.push(real_server(&b, Mode::Grpc, &["default"], &format!("real-{i}"), 3).await);
    }
    let lb = round_robin(servers.iter().map(|s| s.agent_addr()).collect()).await;
    let agent = our_agent(&b, vec![lb.to_string()], "node-1", "host=node-1");
    assert!(agent.wait_connected(3, WAIT).await, "{:?}", agent.stats());
    let mut ids = agent.servers();
    ids.sort();
    assert_eq!(ids, ["real-0", "real-1", "real-2"]);
    assert_eq!(agent.stats().server_count, 3);
    let backend = echo_backend().await.to_string();
    for (i, server) in servers.iter().enumerate() {
        assert!(server.has_agent().await.expect("readyz"), "real-{i}");
        let client = ProxyClient::connect_unix(server.uds())
            .await
            .expect("client");
        let s = client
            .dial(&backend)
            .await
            .expect("dial through each replica");
        echo_bulk(s, 64 << 10, i as u8).await;
    }
}

/// The real konnectivity-agent behind one address to our three servers (server count 3): it
/// holds a connection to each, and a dial through each of our servers works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_agent_holds_our_three_servers_behind_one_address() {
    let b = bundle("tenant-a");
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push(Tunnel::start(&b, server_config(&format!("s{i}"), 3)).await);
    }
    let lb = round_robin(replicas.iter().map(|t| t.agent_addr).collect()).await;
    let agent = real_agent(&b, lb, "real-node-1", "host=node-1").await;
    assert!(
        eventually(WAIT, || replicas
            .iter()
            .all(|t| t.server.stats().agents == 1))
        .await,
        "{:?}\n{}",
        replicas
            .iter()
            .map(|t| t.server.stats().agents)
            .collect::<Vec<_>>(),
        agent.log_tail(30)
    );
    let backend = echo_backend().await.to_string();
    for (i, t) in replicas.iter().enumerate() {
        let s = connect_unix(t, &backend)
            .await
            .expect("dial via each replica");
        echo_bulk(s, 64 << 10, i as u8).await;
    }
    drop(agent);
    for t in replicas {
        t.stop().await;
    }
}

/// A bulk download from the real agent (no flow control), whose backend speaks first, to a
/// gRPC frontend reader that falls far behind loses nothing: the dial's answer comes before
/// the first bytes, and beyond its buffer the connection backs the link off instead of
/// being cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_behind_the_real_agent_loses_no_byte() {
    let b = bundle("tenant-a");
    let tunnel = Tunnel::start(&b, server_config("s0", 1)).await;
    let _agent = real_agent(&b, tunnel.agent_addr, "real-node-1", "host=node-1").await;
    assert!(eventually(WAIT, || tunnel.server.stats().agents == 1).await);
    let total = 48usize << 20;
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let source = l.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.expect("accept");
        let data = pattern(total, 5);
        s.write_all(&data).await.expect("write");
    });
    let client = ProxyClient::connect_unix(&tunnel.grpc_uds)
        .await
        .expect("client");
    let mut s = client.dial(&source).await.expect("dial");
    // Far behind: the agent sends the whole 48 MiB before we read a byte.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut got = Vec::with_capacity(total);
    let mut buf = vec![0u8; 1 << 16];
    while got.len() < total {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("data within the deadline")
            .expect("read");
        assert!(
            n > 0,
            "the stream ended after {} of {total} bytes",
            got.len()
        );
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got == pattern(total, 5), "bytes altered");
}
