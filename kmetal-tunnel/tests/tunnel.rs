//! Server, agents and frontends over real sockets: routing, drain, restart, refusal, HA,
//! keepalive, flow control and leak checks.

mod common;

use std::time::Duration;

use common::*;
use kmetal_tunnel::{ProxyClient, tls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every frontend reaches a backend through the agent: mTLS CONNECT, unix CONNECT, gRPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_frontend_reaches_the_backend_through_the_agent() {
    let Connected {
        bundle: b,
        tunnel: t,
        agent: _agent,
        backend,
    } = connected("tenant-a").await;

    let client = tls::connect_client(&b).expect("client tls");
    let mut s = connect_tls(&t, client, &backend)
        .await
        .expect("mTLS CONNECT");
    assert_eq!(echo_round(&mut s, b"over mTLS").await, b"over mTLS");

    let mut s = connect_unix(&t, &backend).await.expect("unix CONNECT");
    assert_eq!(echo_round(&mut s, b"over uds").await, b"over uds");

    let grpc = ProxyClient::connect_unix(&t.grpc_uds).await.expect("grpc");
    let mut s = grpc.dial(&backend).await.expect("grpc dial");
    assert_eq!(echo_round(&mut s, b"over grpc").await, b"over grpc");
    // A large payload crosses several chunks and windows intact.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(echo_round(&mut s, &big).await, big);

    let info = t.server.agents();
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].id, "node-1");
    assert!(
        info[0].flow_control,
        "our agent and server negotiate flow control"
    );
    t.stop().await;
}

/// A connection that goes quiet after a bulk transfer (its reads give their pooled chunk back
/// after a second) carries every byte of the next burst and of small messages intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_idle_after_a_bulk_transfer_resumes_intact() {
    let Connected {
        tunnel: t,
        agent: _agent,
        backend,
        ..
    } = connected("tenant-a").await;
    let mut s = connect_unix(&t, &backend).await.expect("unix CONNECT");
    let big: Vec<u8> = (0..2_000_000u32).map(|i| (i % 253) as u8).collect();
    for round in 0..3 {
        assert_eq!(echo_round(&mut s, &big).await, big, "burst {round}");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            echo_round(&mut s, b"ping").await,
            b"ping",
            "after idling {round}"
        );
    }
    t.stop().await;
}

/// With no agent, or a backend nobody listens on, the dial fails at once with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dials_fail_fast_with_a_clear_error() {
    let b = bundle("tenant-a");
    let mut config = server_config("s0", 1);
    // Far longer than the test's own deadline: an answer proves no backstop was waited out.
    config.dial_timeout = Duration::from_secs(120);
    let t = Tunnel::start(&b, config).await;
    let err = tokio::time::timeout(Duration::from_secs(10), connect_unix(&t, "10.1.2.3:80"))
        .await
        .expect("answered without waiting for the dial timeout")
        .expect_err("no agent");
    assert!(err.starts_with("HTTP/1.1 503"), "{err}");
    assert!(err.contains("no agent available for 10.1.2.3:80"), "{err}");

    let agent = agent(&b, vec![t.agent_addr.to_string()], "node-1");
    assert!(agent.wait_connected(1, Duration::from_secs(10)).await);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = closed.local_addr().expect("addr").to_string();
    drop(closed);
    let err = connect_unix(&t, &dead).await.expect_err("refused");
    assert!(err.starts_with("HTTP/1.1 502"), "{err}");
    assert!(err.contains("could not dial"), "{err}");

    let grpc = ProxyClient::connect_unix(&t.grpc_uds).await.expect("grpc");
    let err = grpc.dial(&dead).await.expect_err("refused over grpc");
    assert!(err.to_string().contains("could not dial"), "{err}");
    t.stop().await;
}

/// A draining agent keeps its open connections but receives no new dials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_agent_receives_no_new_dials() {
    let b = bundle("tenant-a");
    let t = Tunnel::start(&b, server_config("s0", 1)).await;
    let a = agent(&b, vec![t.agent_addr.to_string()], "node-a");
    let z = agent(&b, vec![t.agent_addr.to_string()], "node-z");
    assert!(a.wait_connected(1, Duration::from_secs(10)).await);
    assert!(z.wait_connected(1, Duration::from_secs(10)).await);
    let backend = echo_backend().await.to_string();

    // Open connections until one rides on agent a.
    let mut on_a = None;
    for _ in 0..20 {
        let before = a.stats().dials_ok;
        let s = connect_unix(&t, &backend).await.expect("dial");
        if a.stats().dials_ok > before {
            on_a = Some(s);
            break;
        }
    }
    let mut on_a = on_a.expect("round robin reaches agent a");
    a.drain();
    assert!(eventually(Duration::from_secs(5), || t.server.stats().draining == 1).await);
    let a_dials = a.stats().dials_ok;
    for i in 0..20 {
        let mut s = connect_unix(&t, &backend)
            .await
            .expect("dial while a drains");
        assert_eq!(
            echo_round(&mut s, format!("n{i}").as_bytes()).await,
            format!("n{i}").as_bytes()
        );
    }
    assert_eq!(
        a.stats().dials_ok,
        a_dials,
        "no dial reached the draining agent"
    );
    assert_eq!(echo_round(&mut on_a, b"still open").await, b"still open");

    z.drain();
    assert!(eventually(Duration::from_secs(5), || t.server.stats().draining == 2).await);
    let err = connect_unix(&t, &backend)
        .await
        .expect_err("every agent drains");
    assert!(err.contains("2 draining"), "{err}");
    t.stop().await;
}

/// The agent reconnects by itself after its server restarts on the same address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reconnects_after_a_server_restart() {
    let b = bundle("tenant-a");
    let t = Tunnel::start(&b, server_config("s0", 1)).await;
    let addr = t.agent_addr;
    let agent = agent(&b, vec![addr.to_string()], "node-1");
    assert!(agent.wait_connected(1, Duration::from_secs(10)).await);
    let backend = echo_backend().await.to_string();
    let mut s = connect_unix(&t, &backend).await.expect("dial");
    assert_eq!(echo_round(&mut s, b"before").await, b"before");

    t.stop().await;
    assert!(eventually(Duration::from_secs(10), || agent.stats().servers == 0).await);
    // The connection that rode the old server is closed, not hung.
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("closed, not hung");
    assert!(matches!(n, Ok(0) | Err(_)));
    let failures = agent.stats().connect_failures;

    let t = Tunnel::start_on(&b, server_config("s0", 1), addr).await;
    assert!(
        agent.wait_connected(1, Duration::from_secs(20)).await,
        "reconnected"
    );
    assert!(agent.stats().connect_failures >= failures);
    let mut s = connect_unix(&t, &backend)
        .await
        .expect("dial after restart");
    assert_eq!(echo_round(&mut s, b"after").await, b"after");
    t.stop().await;
}

/// Another tenant's agent and client are refused in the TLS handshake; so is a cert from the
/// right CA that is not an agent's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tenant_agents_and_clients_are_refused() {
    let a = bundle("tenant-a");
    let other = bundle("tenant-b");
    let t = Tunnel::start(&a, server_config("s0", 1)).await;

    let intruder = agent(&other, vec![t.agent_addr.to_string()], "node-b");
    assert!(!intruder.wait_connected(1, Duration::from_secs(2)).await);
    assert!(intruder.stats().connect_failures > 0);
    // An admin certificate of tenant A's own CA is not an agent.
    let admin =
        kmetal_pki::bundle::parse_kubeconfig("admin.conf", a.get("admin.conf").expect("admin"))
            .expect("kubeconfig");
    let admin_tls = tls::client_config(
        a.get(tls::CA).expect("ca"),
        &admin.cert_pem,
        &admin.key_pem,
        &[b"h2"],
    )
    .expect("tls");
    let mut config =
        kmetal_tunnel::AgentConfig::new(vec![t.agent_addr.to_string()], admin_tls, "admin");
    config.backoff_initial = Duration::from_millis(50);
    let impostor = kmetal_tunnel::Agent::start(config).expect("agent");
    assert!(!impostor.wait_connected(1, Duration::from_secs(2)).await);
    assert_eq!(t.server.stats().agents, 0);
    assert!(t.server.stats().refused_handshakes >= 2);

    let backend = echo_backend().await.to_string();
    let wrong_client = tls::connect_client(&other).expect("tls");
    assert!(connect_tls(&t, wrong_client, &backend).await.is_err());
    t.stop().await;
}

/// Three replicas behind one address: the agent connects to each, and a dial succeeds
/// through every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_the_agent_reaches_every_replica_through_one_address() {
    let b = bundle("tenant-a");
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push(Tunnel::start(&b, server_config(&format!("s{i}"), 3)).await);
    }
    let lb = round_robin(replicas.iter().map(|t| t.agent_addr).collect()).await;
    let agent = agent(&b, vec![lb.to_string()], "node-1");
    assert!(
        agent.wait_connected(3, Duration::from_secs(20)).await,
        "{:?}",
        agent.stats()
    );
    assert_eq!(agent.servers(), ["s0", "s1", "s2"]);
    assert_eq!(agent.stats().server_count, 3);
    let backend = echo_backend().await.to_string();
    for t in &replicas {
        let mut s = connect_unix(t, &backend).await.expect("dial via replica");
        assert_eq!(echo_round(&mut s, b"ha").await, b"ha");
    }
    for t in replicas {
        t.stop().await;
    }
}

/// An agent whose connection goes silent is dropped by the keepalive; dials then fail fast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_drops_a_dead_agent() {
    let b = bundle("tenant-a");
    let t = Tunnel::start(&b, server_config("s0", 1)).await;
    let proxy = kmetal_testkit::FaultProxy::start(t.agent_addr)
        .await
        .expect("proxy");
    let agent = agent(&b, vec![proxy.addr().to_string()], "node-1");
    assert!(agent.wait_connected(1, Duration::from_secs(10)).await);
    assert_eq!(t.server.stats().agents, 1);
    proxy.blackhole();
    assert!(
        eventually(Duration::from_secs(15), || t.server.stats().agents == 0).await,
        "the server dropped the silent agent"
    );
    let err = connect_unix(&t, "127.0.0.1:9").await.expect_err("no agent");
    assert!(err.starts_with("HTTP/1.1 503"), "{err}");
    drop(agent);
    t.stop().await;
}

/// One stream whose reader stalls does not stall another stream through the same agent,
/// and the server buffers for it about its starting window, not the largest one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_does_not_stall_the_others() {
    let b = bundle("tenant-a");
    let t = Tunnel::start(&b, server_config("s0", 1)).await;
    let agent = agent(&b, vec![t.agent_addr.to_string()], "node-1");
    assert!(agent.wait_connected(1, Duration::from_secs(10)).await);
    // A backend that streams without end, like `kubectl logs -f` on a chatty pod.
    let firehose = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let firehose_addr = firehose.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = firehose.accept().await {
            tokio::spawn(async move {
                let chunk = vec![b'x'; 64 << 10];
                while s.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    let stalled = connect_unix(&t, &firehose_addr)
        .await
        .expect("dial firehose");
    // Never read `stalled`; give the firehose time to fill every buffer it can.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The client socket absorbs the first window quickly (so it may double once); after
    // that nothing is consumed and the window stays put.
    let buffered = t.server.stats().buffered;
    assert!(
        buffered > 0,
        "the stalled stream's data waits at the server"
    );
    assert!(
        buffered <= 2 * kmetal_tunnel::proto::INITIAL_FLOW_WINDOW as usize,
        "{buffered} bytes buffered for one stalled stream"
    );
    assert!(buffered < kmetal_tunnel::proto::DEFAULT_FLOW_WINDOW as usize);
    let backend = echo_backend().await.to_string();
    let mut s = connect_unix(&t, &backend).await.expect("second dial");
    for i in 0..50 {
        let msg = format!("ping {i}");
        let got = tokio::time::timeout(Duration::from_secs(5), echo_round(&mut s, msg.as_bytes()))
            .await
            .expect("the second stream is not blocked by the first");
        assert_eq!(got, msg.as_bytes());
    }
    drop(stalled);
    t.stop().await;
}

/// destHost routes by the agents' identifiers, defaultRoute catches the rest, and with no
/// matching agent the dial fails at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_strategies_route_by_identifiers() {
    let b = bundle("tenant-a");
    let mut config = server_config("s0", 1);
    config.strategies = kmetal_tunnel::Strategy::parse_list("destHost,defaultRoute").expect("list");
    let t = Tunnel::start(&b, config).await;
    let mk = |id: &str, ids: &[(&str, &str)]| {
        let mut c = kmetal_tunnel::AgentConfig::new(
            vec![t.agent_addr.to_string()],
            tls::agent_client(&b).expect("tls"),
            id,
        );
        for (k, v) in ids {
            c.identifiers.add(k, v).expect("identifier");
        }
        kmetal_tunnel::Agent::start(c).expect("agent")
    };
    // Linux routes all of 127.0.0.0/8 to loopback: 127.0.0.2 stands for another node.
    let node = mk("node-a", &[("host", "node-a"), ("ipv4", "127.0.0.2")]);
    let gateway = mk("gateway", &[("default-route", "true")]);
    assert!(node.wait_connected(1, Duration::from_secs(10)).await);
    assert!(gateway.wait_connected(1, Duration::from_secs(10)).await);
    let l = tokio::net::TcpListener::bind("0.0.0.0:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    for _ in 0..5 {
        let mut s = connect_unix(&t, &format!("127.0.0.2:{port}"))
            .await
            .expect("dial node");
        assert_eq!(echo_round(&mut s, b"n").await, b"n");
        let mut s = connect_unix(&t, &format!("127.0.0.1:{port}"))
            .await
            .expect("dial other");
        assert_eq!(echo_round(&mut s, b"g").await, b"g");
    }
    assert_eq!(
        node.stats().dials_ok,
        5,
        "destHost sent the node's address to the node"
    );
    assert_eq!(
        gateway.stats().dials_ok,
        5,
        "everything else took the default route"
    );

    let mut strict = server_config("s1", 1);
    strict.strategies = vec![kmetal_tunnel::Strategy::DestHost];
    let t2 = Tunnel::start(&b, strict).await;
    let only = agent(&b, vec![t2.agent_addr.to_string()], "node-x");
    assert!(only.wait_connected(1, Duration::from_secs(10)).await);
    let err = connect_unix(&t2, &format!("127.0.0.1:{port}"))
        .await
        .expect_err("no match");
    assert!(err.starts_with("HTTP/1.1 503"), "{err}");
    t.stop().await;
    t2.stop().await;
}

/// A stream dialed through the gRPC frontend closes its connection on shutdown and on drop,
/// and its reads end instead of hanging when the agent behind it goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_frontend_streams_close_on_shutdown_drop_and_agent_loss() {
    let Connected {
        tunnel: t,
        agent,
        backend,
        ..
    } = connected("tenant-a").await;
    let grpc = ProxyClient::connect_unix(&t.grpc_uds).await.expect("grpc");
    let open = |n| {
        let server = t.server.clone();
        move || server.stats().connections == n
    };

    let mut s = grpc.dial(&backend).await.expect("dial");
    assert_eq!(echo_round(&mut s, b"shutdown").await, b"shutdown");
    assert!(eventually(Duration::from_secs(10), open(1)).await);
    s.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("the close is answered in time")
        .expect("a clean end");
    assert!(rest.is_empty());
    assert!(
        s.write_all(b"late").await.is_err(),
        "no writes after shutdown"
    );
    assert!(eventually(Duration::from_secs(10), open(0)).await);

    let mut s = grpc.dial(&backend).await.expect("dial");
    assert_eq!(echo_round(&mut s, b"drop").await, b"drop");
    assert!(eventually(Duration::from_secs(10), open(1)).await);
    drop(s);
    assert!(eventually(Duration::from_secs(10), open(0)).await);

    let mut s = grpc.dial(&backend).await.expect("dial");
    assert_eq!(echo_round(&mut s, b"agent loss").await, b"agent loss");
    drop(agent);
    let mut buf = [0u8; 16];
    let end = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("reads end when the agent goes away");
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    assert!(eventually(Duration::from_secs(10), open(0)).await);
    t.stop().await;
}

/// Stopping the server ends the gRPC frontend's open streams (their connections close)
/// instead of waiting for kube-apiserver to end them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_grpc_frontend_ends_its_open_streams() {
    let Connected {
        tunnel: t,
        agent: _agent,
        backend,
        ..
    } = connected("tenant-a").await;
    let grpc = ProxyClient::connect_unix(&t.grpc_uds).await.expect("grpc");
    let mut s = grpc.dial(&backend).await.expect("dial");
    assert_eq!(echo_round(&mut s, b"open").await, b"open");
    let server = t.server.clone();
    tokio::time::timeout(Duration::from_secs(5), t.stop())
        .await
        .expect("the listeners stop with a stream open");
    let mut buf = [0u8; 16];
    let end = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("the stream ends");
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    assert!(eventually(Duration::from_secs(10), || server.stats().connections == 0).await);
}

/// With windows smaller than a read chunk on both sides, data is sent in pieces the window
/// admits instead of waiting forever for credit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_smaller_than_a_chunk_still_carry_bulk_data() {
    let b = bundle("tenant-a");
    let mut config = server_config("s0", 1);
    config.flow_window = 16 << 10;
    let t = Tunnel::start(&b, config).await;
    let mut c = kmetal_tunnel::AgentConfig::new(
        vec![t.agent_addr.to_string()],
        tls::agent_client(&b).expect("tls"),
        "node-1",
    );
    c.flow_window = 16 << 10;
    let agent = kmetal_tunnel::Agent::start(c).expect("agent");
    assert!(agent.wait_connected(1, Duration::from_secs(10)).await);
    assert!(t.server.agents()[0].flow_control);
    let backend = echo_backend().await.to_string();
    let mut s = connect_unix(&t, &backend).await.expect("dial");
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 241) as u8).collect();
    let got = tokio::time::timeout(Duration::from_secs(30), echo_round(&mut s, &big))
        .await
        .expect("no stall on a small window");
    assert_eq!(got, big);
    t.stop().await;
}

/// A gRPC frontend client whose frontend went away fails its dials with a typed error (no
/// hang), and dials through a new connection once a frontend listens on the socket again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_client_reconnects_after_the_frontend_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("grpc.sock");
    let server = kmetal_tunnel::Server::new(server_config("s0", 1));
    let serve = |server: kmetal_tunnel::Server| {
        let _ = std::fs::remove_file(&path);
        let l = tokio::net::UnixListener::bind(&path).expect("bind");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = server
                .serve_proxy_grpc(l, async {
                    let _ = stopped.await;
                })
                .await;
        });
        (stop, task)
    };
    // No agent is connected, so a dial that reaches the frontend is answered "no agent".
    let reached = |r: Result<kmetal_tunnel::ProxyStream, kmetal_tunnel::ClientError>| {
        matches!(r, Err(kmetal_tunnel::ClientError::Dial { .. }))
    };

    let (stop, task) = serve(server.clone());
    let grpc = ProxyClient::connect_unix(&path).await.expect("connect");
    assert!(reached(grpc.dial("10.0.0.1:80").await));

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the frontend stops")
        .expect("join");
    let _ = std::fs::remove_file(&path);
    let gone = tokio::time::timeout(Duration::from_secs(5), grpc.dial("10.0.0.1:80"))
        .await
        .expect("a dial to a gone frontend fails in time");
    assert!(
        matches!(
            gone,
            Err(kmetal_tunnel::ClientError::Connect { .. } | kmetal_tunnel::ClientError::Call(_))
        ),
        "{gone:?}"
    );

    let (stop, task) = serve(server.clone());
    assert!(reached(grpc.dial("10.0.0.1:80").await));
    let _ = stop.send(());
    let _ = task.await;
}
