//! A tenant's tunnel server with every listener, agents, backends and CONNECT clients.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kmetal_pki::{Bundle, PkiSpec};
use kmetal_tunnel::{Agent, AgentConfig, ConnectListener, Server, ServerConfig, tls};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;

/// A tenant bundle whose server certificate is valid for 127.0.0.1.
pub fn bundle(tenant: &str) -> Bundle {
    Bundle::generate(&PkiSpec::new(tenant, "127.0.0.1:6443")).expect("bundle")
}

/// A server with its agent listener, mTLS and unix CONNECT frontends and gRPC frontend.
pub struct Tunnel {
    pub server: Server,
    pub agent_addr: SocketAddr,
    pub connect_addr: SocketAddr,
    pub connect_uds: PathBuf,
    pub grpc_uds: PathBuf,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Tunnel {
    pub async fn start(bundle: &Bundle, config: ServerConfig) -> Tunnel {
        Self::start_on(bundle, config, "127.0.0.1:0".parse().expect("addr")).await
    }

    pub async fn start_on(
        bundle: &Bundle,
        config: ServerConfig,
        agent_listen: SocketAddr,
    ) -> Tunnel {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = Server::new(config);
        let (stop, stop_rx) = watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let agents = TcpListener::bind(agent_listen).await.expect("bind agents");
        let agent_addr = agents.local_addr().expect("addr");
        let connect = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind connect");
        let connect_addr = connect.local_addr().expect("addr");
        let connect_uds = dir.path().join("connect.sock");
        let grpc_uds = dir.path().join("grpc.sock");
        let mut tasks = Vec::new();
        {
            let s = server.clone();
            let tls = tls::agent_listener(bundle).expect("tls");
            let f = stopped();
            tasks.push(tokio::spawn(async move {
                s.serve_agents(agents, tls, f).await.expect("serve agents");
            }));
        }
        {
            let s = server.clone();
            let tls = tls::connect_listener(bundle).expect("tls");
            let f = stopped();
            tasks.push(tokio::spawn(async move {
                s.serve_connect(ConnectListener::Tls(connect, tls), f)
                    .await
                    .expect("serve connect");
            }));
        }
        {
            let s = server.clone();
            let l = UnixListener::bind(&connect_uds).expect("bind uds");
            let f = stopped();
            tasks.push(tokio::spawn(async move {
                s.serve_connect(ConnectListener::Unix(l), f)
                    .await
                    .expect("serve uds");
            }));
        }
        {
            let s = server.clone();
            let l = UnixListener::bind(&grpc_uds).expect("bind grpc uds");
            let f = stopped();
            tasks.push(tokio::spawn(async move {
                s.serve_proxy_grpc(l, f).await.expect("serve grpc");
            }));
        }
        Tunnel {
            server,
            agent_addr,
            connect_addr,
            connect_uds,
            grpc_uds,
            stop,
            tasks,
            _dir: dir,
        }
    }

    /// Stops every listener and ends every agent stream; waits for the listeners to finish.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

/// Fast test settings for a server.
pub fn server_config(id: &str, count: u32) -> ServerConfig {
    let mut c = ServerConfig::new(id, count);
    c.keepalive_interval = Duration::from_secs(1);
    c.keepalive_timeout = Duration::from_secs(1);
    c
}

/// An agent of `bundle`'s tenant connecting to `servers`.
pub fn agent(bundle: &Bundle, servers: Vec<String>, id: &str) -> Agent {
    let mut c = AgentConfig::new(servers, tls::agent_client(bundle).expect("tls"), id);
    c.backoff_initial = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(500);
    c.sync_interval = Duration::from_millis(100);
    c.keepalive_interval = Duration::from_secs(1);
    c.keepalive_timeout = Duration::from_secs(1);
    c.drain_grace = Duration::from_secs(2);
    Agent::start(c).expect("agent")
}

/// A tenant's server with one connected agent (`node-1`) and an echo backend.
pub struct Connected {
    pub bundle: Bundle,
    pub tunnel: Tunnel,
    pub agent: Agent,
    pub backend: String,
}

/// Starts [`Connected`] for `tenant`.
pub async fn connected(tenant: &str) -> Connected {
    let bundle = bundle(tenant);
    let tunnel = Tunnel::start(&bundle, server_config("s0", 1)).await;
    let agent = agent(&bundle, vec![tunnel.agent_addr.to_string()], "node-1");
    assert!(agent.wait_connected(1, Duration::from_secs(10)).await);
    let backend = echo_backend().await.to_string();
    Connected {
        bundle,
        tunnel,
        agent,
        backend,
    }
}

/// An echo server on loopback; each connection echoes until EOF.
pub async fn echo_backend() -> SocketAddr {
    kmetal_testkit::ports::echo_server()
        .await
        .expect("echo server")
}

/// Sends a CONNECT for `target` and reads the response head; Ok(stream) on 200, else the
/// status line and body.
pub async fn connect_over<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    target: &str,
) -> Result<S, String> {
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte).await {
            Ok(0) => return Err(format!("closed after {:?}", String::from_utf8_lossy(&head))),
            Ok(_) => head.push(byte[0]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    if head.starts_with("HTTP/1.1 200") {
        Ok(s)
    } else {
        let mut body = String::new();
        let _ = s.read_to_string(&mut body).await;
        Err(format!("{}{body}", head.lines().next().unwrap_or_default()))
    }
}

/// CONNECT over the unix-socket frontend.
pub async fn connect_unix(t: &Tunnel, target: &str) -> Result<UnixStream, String> {
    let s = UnixStream::connect(&t.connect_uds)
        .await
        .map_err(|e| e.to_string())?;
    connect_over(s, target).await
}

/// CONNECT over the mTLS frontend with `client`'s credentials.
pub async fn connect_tls(
    t: &Tunnel,
    client: Arc<rustls::ClientConfig>,
    target: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect(t.connect_addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let s = tokio_rustls::TlsConnector::from(client)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    connect_over(s, target).await
}

/// Writes `msg` and reads the echo back.
pub async fn echo_round<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.expect("write");
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).await.expect("read echo");
    got
}

/// Polls `f` until it holds or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// A TCP load balancer handing each new connection to the next upstream.
pub async fn round_robin(upstreams: Vec<std::net::SocketAddr>) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut i = 0;
        while let Ok((mut down, _)) = l.accept().await {
            let up = upstreams[i % upstreams.len()];
            i += 1;
            tokio::spawn(async move {
                if let Ok(mut up) = tokio::net::TcpStream::connect(up).await {
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                }
            });
        }
    });
    addr
}

/// The real Konnectivity pieces' certificates, from the tenant's kmetal-pki bundle: the
/// server and agent certificates our own server and agent use.
pub fn link_tls(bundle: &Bundle) -> kmetal_testkit::konnectivity::LinkTls {
    kmetal_testkit::konnectivity::LinkTls::from_bundle(bundle).expect("link certificates")
}
