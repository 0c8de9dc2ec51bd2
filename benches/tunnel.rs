//! The tunnel against direct connections, same process, same run (issue 8 targets):
//! - one stream's bulk throughput through the tunnel (unix CONNECT frontend → server → mTLS
//!   gRPC link → agent → backend) vs one direct TLS stream over loopback — target ≥ 0.8×;
//!   the same through the mTLS CONNECT frontend and the gRPC `ProxyService` frontend (our
//!   `ProxyClient` on the unix socket) for comparison, and uploads (client → backend)
//!   through the unix CONNECT and gRPC frontends vs a direct TLS upload;
//! - request/response latency added by the tunnel over a direct TCP round trip — target
//!   p50 ≤ 150 µs;
//! - 1,000 concurrent streams through one agent, vs 1,000 direct connections;
//! - resident memory per idle tunneled stream, vs per idle direct connection;
//! - bytes the server holds per stalled stream (a client that stops reading), vs the
//!   largest flow window.
//!
//! Client, server, agent and backends share this process's two worker threads.
//! `KMETAL_BENCH_THROUGHPUT_ONLY=1` stops after the throughput part;
//! `KMETAL_BENCH_TUNNEL_ONLY=1` skips the direct peer there and `KMETAL_BENCH_DIRECT_ONLY=1`
//! the tunnels (for profiling either alone); `KMETAL_BENCH_TUNNEL_EXE=PATH` runs another
//! build of `examples/tunnel` in the separate-process rounds (to compare two builds).
//! Both sides of every comparison run on mimalloc, the allocator `examples/tunnel` ships with.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::streams::{
    drain, echo_backend, median, pct, read_total, round_trips, serve, sink, source, upload,
    write_total,
};
use kmetal_pki::{Bundle, PkiSpec};
use kmetal_tunnel::{Agent, AgentConfig, ConnectListener, ProxyClient, Server, ServerConfig, tls};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

struct Setup {
    bundle: Bundle,
    server: Server,
    uds: PathBuf,
    grpc: ProxyClient,
    mtls: SocketAddr,
    agent: Agent,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let bundle = Bundle::generate(&PkiSpec::new("bench", "127.0.0.1:6443")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::new(ServerConfig::new("s0", 1));
    let agents = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent_addr = agents.local_addr().unwrap();
    let s = server.clone();
    let t = tls::agent_listener(&bundle).unwrap();
    tokio::spawn(async move { s.serve_agents(agents, t, std::future::pending()).await });
    let uds = dir.path().join("connect.sock");
    let l = UnixListener::bind(&uds).unwrap();
    let s = server.clone();
    tokio::spawn(async move {
        s.serve_connect(ConnectListener::Unix(l), std::future::pending())
            .await
    });
    let grpc_uds = dir.path().join("grpc.sock");
    let l = UnixListener::bind(&grpc_uds).unwrap();
    let s = server.clone();
    tokio::spawn(async move { s.serve_proxy_grpc(l, std::future::pending()).await });
    let grpc = ProxyClient::connect_unix(&grpc_uds).await.unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mtls = l.local_addr().unwrap();
    let s = server.clone();
    let t = tls::connect_listener(&bundle).unwrap();
    tokio::spawn(async move {
        s.serve_connect(ConnectListener::Tls(l, t), std::future::pending())
            .await
    });
    let agent = Agent::start(AgentConfig::new(
        vec![agent_addr.to_string()],
        tls::agent_client(&bundle).unwrap(),
        "bench-node",
    ))
    .unwrap();
    assert!(agent.wait_connected(1, Duration::from_secs(10)).await);
    Setup {
        bundle,
        server,
        uds,
        grpc,
        mtls,
        agent,
        _dir: dir,
    }
}

async fn connect<S: AsyncRead + AsyncWrite + Unpin>(s: S, target: &str) -> S {
    match try_connect(s, target).await {
        Ok(s) => s,
        Err(head) => panic!("CONNECT {target} refused: {head:?}"),
    }
}

/// A CONNECT; the response head (empty if the stream closed) when it is not a 200.
async fn try_connect<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    target: &str,
) -> Result<S, String> {
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    s.write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await.map_err(|e| e.to_string())? == 0 {
            return Err(String::from_utf8_lossy(&head).to_string());
        }
        head.push(b[0]);
    }
    if head.starts_with(b"HTTP/1.1 200") {
        Ok(s)
    } else {
        Err(String::from_utf8_lossy(&head).to_string())
    }
}

/// The peer: a TLS stream straight to the TLS source.
async fn direct(s: &Setup, addr: SocketAddr) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    tokio_rustls::TlsConnector::from(tls::connect_client(&s.bundle).unwrap())
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap()
}

async fn via_uds(s: &Setup, target: &str) -> UnixStream {
    connect(UnixStream::connect(&s.uds).await.unwrap(), target).await
}

async fn via_mtls(s: &Setup, target: &str) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(s.mtls).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let tls = tokio_rustls::TlsConnector::from(tls::connect_client(&s.bundle).unwrap())
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    connect(tls, target).await
}

/// The peer: a direct TLS server with the same certificate profile writing `total` bytes.
async fn tls_source(bundle: &Bundle, total: usize) -> SocketAddr {
    tls_serve(bundle, move |mut s| async move {
        write_total(&mut s, total).await
    })
    .await
}

/// The peer for uploads: a direct TLS server reading `total` bytes, then answering one.
async fn tls_sink(bundle: &Bundle, total: usize) -> SocketAddr {
    tls_serve(bundle, move |mut s| async move {
        read_total(&mut s, total).await
    })
    .await
}

async fn tls_serve<F, Fut>(bundle: &Bundle, f: F) -> SocketAddr
where
    F: Fn(tokio_rustls::server::TlsStream<TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(tls::connect_listener(bundle).unwrap());
    let f = Arc::new(f);
    serve(move |tcp| {
        tcp.set_nodelay(true).unwrap();
        let acceptor = acceptor.clone();
        let f = f.clone();
        async move { f(acceptor.accept(tcp).await.unwrap()).await }
    })
    .await
}

fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 4096
}

/// The tunnel as it is deployed: `examples/tunnel` server and agent as separate processes
/// (release build), the client and backend in this one.
struct Processes {
    children: Vec<std::process::Child>,
    uds: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Processes {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn processes(bundle: &Bundle) -> Processes {
    use std::io::BufRead;
    let exe = std::env::var_os("KMETAL_BENCH_TUNNEL_EXE")
        .map_or_else(|| common::example("tunnel", false), PathBuf::from);
    let dir = tempfile::tempdir().unwrap();
    bundle.write_dir(dir.path()).unwrap();
    let uds = dir.path().join("connect.sock");
    let mut server = std::process::Command::new(&exe)
        .args([
            "server",
            "--agent-listen",
            "127.0.0.1:0",
            "--server-id",
            "s0",
        ])
        .arg("--connect-listen")
        .arg(format!("unix://{}", uds.display()))
        .arg("--pki")
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(server.stdout.take().unwrap()).lines();
    let agents = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            l.strip_prefix("listening agents=https://")
                .map(str::to_string)
        })
        .unwrap();
    std::thread::spawn(move || for _ in lines {});
    let agent = std::process::Command::new(&exe)
        .args(["agent", "--server", &agents, "--identity", "host=bench"])
        .arg("--pki")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Processes {
        children: vec![server, agent],
        uds,
        _dir: dir,
    }
}

// The allocator `examples/tunnel` ships with, for both sides of every comparison (the
// direct peer measured the same with glibc's malloc and with this one).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let quick = common::quick();
    let rt = common::runtime();
    rt.block_on(async {
        let s = setup().await;
        let total: usize = if quick { 4 << 20 } else { 128 << 20 };
        let rounds = if quick { 1 } else { 15 };

        // 1. Bulk throughput, one stream, interleaved rounds.
        let plain = source(total).await.to_string();
        let direct_tls = tls_source(&s.bundle, total).await;
        let (mut d, mut u, mut m, mut g) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let tunnel_only = std::env::var_os("KMETAL_BENCH_TUNNEL_ONLY").is_some();
            let t = Instant::now();
            if tunnel_only {
                d.push(1.0);
                assert_eq!(drain(via_uds(&s, &plain).await).await, total);
                u.push(total as f64 / t.elapsed().as_secs_f64() / 1e6);
                m.push(1.0);
                g.push(1.0);
                continue;
            }
            let stream = direct(&s, direct_tls).await;
            assert_eq!(drain(stream).await, total);
            d.push(total as f64 / t.elapsed().as_secs_f64() / 1e6);
            if std::env::var_os("KMETAL_BENCH_DIRECT_ONLY").is_some() {
                u.push(1.0);
                m.push(1.0);
                g.push(1.0);
                continue;
            }

            let t = Instant::now();
            assert_eq!(drain(via_uds(&s, &plain).await).await, total);
            u.push(total as f64 / t.elapsed().as_secs_f64() / 1e6);

            let t = Instant::now();
            assert_eq!(drain(via_mtls(&s, &plain).await).await, total);
            m.push(total as f64 / t.elapsed().as_secs_f64() / 1e6);

            let t = Instant::now();
            assert_eq!(drain(s.grpc.dial(&plain).await.unwrap()).await, total);
            g.push(total as f64 / t.elapsed().as_secs_f64() / 1e6);

        }
        // This machine's speed drifts between rounds (direct TLS alone varies 2x from one
        // run to the next); each round measures both back to back, so the ratio is taken per
        // round and its median reported.
        let ratio_u = median(u.iter().zip(&d).map(|(u, d)| u / d).collect());
        let ratio_m = median(m.iter().zip(&d).map(|(m, d)| m / d).collect());
        let ratio_g = median(g.iter().zip(&d).map(|(g, d)| g / d).collect());
        let (d, u, m, g) = (median(d), median(u), median(m), median(g));
        let only_throughput = std::env::var_os("KMETAL_BENCH_THROUGHPUT_ONLY").is_some();
        println!("throughput, one stream, {} MiB, median of {rounds} paired rounds:", total >> 20);
        println!("  direct TLS                        {d:8.0} MB/s");
        println!("  tunnel (unix CONNECT frontend)    {u:8.0} MB/s   ratio {ratio_u:.2}x  (target >= 0.8x)");
        println!("  tunnel (mTLS CONNECT frontend)    {m:8.0} MB/s   ratio {ratio_m:.2}x");
        println!("  tunnel (gRPC frontend)            {g:8.0} MB/s   ratio {ratio_g:.2}x");

        // Uploads (kubectl cp into a pod, port-forward sends): server to agent, the other
        // direction of the link.
        let plain_sink = sink(total).await.to_string();
        let direct_sink = tls_sink(&s.bundle, total).await;
        let (mut du, mut uu, mut gu) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let t = Instant::now();
            upload(direct(&s, direct_sink).await, total).await;
            du.push(total as f64 / t.elapsed().as_secs_f64() / 1e6);
            let t = Instant::now();
            upload(via_uds(&s, &plain_sink).await, total).await;
            uu.push(total as f64 / t.elapsed().as_secs_f64() / 1e6);
            let t = Instant::now();
            upload(s.grpc.dial(&plain_sink).await.unwrap(), total).await;
            gu.push(total as f64 / t.elapsed().as_secs_f64() / 1e6);
        }
        let ratio_uu = median(uu.iter().zip(&du).map(|(u, d)| u / d).collect());
        let ratio_gu = median(gu.iter().zip(&du).map(|(g, d)| g / d).collect());
        println!("upload, one stream, {} MiB, median of {rounds} paired rounds:", total >> 20);
        println!("  direct TLS                        {:8.0} MB/s", median(du));
        println!("  tunnel (unix CONNECT frontend)    {:8.0} MB/s   ratio {ratio_uu:.2}x", median(uu));
        println!("  tunnel (gRPC frontend)            {:8.0} MB/s   ratio {ratio_gu:.2}x", median(gu));

        // The same against `examples/tunnel` server and agent as separate processes, in rounds
        // of their own: with those processes present the direct peer itself runs slower here.
        if std::env::var_os("KMETAL_BENCH_NO_PROCESSES").is_none() && !quick {
            let procs = processes(&s.bundle);
            let end = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(c) = UnixStream::connect(&procs.uds).await {
                    let dial = tokio::time::timeout(Duration::from_secs(2), try_connect(c, &plain));
                    if let Ok(Ok(c)) = dial.await {
                        drop(c);
                        break;
                    }
                }
                assert!(Instant::now() < end, "the agent process never connected");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let (mut d2, mut x) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                let t = Instant::now();
                assert_eq!(drain(direct(&s, direct_tls).await).await, total);
                d2.push(total as f64 / t.elapsed().as_secs_f64() / 1e6);
                let t = Instant::now();
                let c = connect(UnixStream::connect(&procs.uds).await.unwrap(), &plain).await;
                assert_eq!(drain(c).await, total);
                x.push(total as f64 / t.elapsed().as_secs_f64() / 1e6);
            }
            let ratio_x = median(x.iter().zip(&d2).map(|(x, d)| x / d).collect());
            println!(
                "  server and agent as processes:    {:8.0} MB/s   ratio {ratio_x:.2}x  (direct TLS {:.0} MB/s in these rounds)",
                median(x),
                median(d2)
            );
        }

        if only_throughput {
            println!("tunnel {u:.0} MB/s, direct {d:.0} MB/s, ratio {ratio_u:.2}x");
            return;
        }
        // 2. Request/response latency.
        let echo = echo_backend().await;
        let n = if quick { 200 } else { 20_000 };
        let tcp = TcpStream::connect(echo).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let mut direct = tcp;
        let mut tunneled = via_uds(&s, &echo.to_string()).await;
        let mut tunneled_tls = via_mtls(&s, &echo.to_string()).await;
        round_trips(&mut direct, n / 10).await;
        round_trips(&mut tunneled, n / 10).await;
        let mut dl = round_trips(&mut direct, n).await;
        let mut tl = round_trips(&mut tunneled, n).await;
        let mut ml = round_trips(&mut tunneled_tls, n).await;
        let (d50, d99) = (pct(&mut dl, 0.5), pct(&mut dl, 0.99));
        let (t50, t99) = (pct(&mut tl, 0.5), pct(&mut tl, 0.99));
        let (m50, m99) = (pct(&mut ml, 0.5), pct(&mut ml, 0.99));
        println!("request/response, 64 B, {n} round trips:");
        println!("  direct TCP          p50 {:7.1} µs  p99 {:7.1} µs", us(d50), us(d99));
        println!(
            "  tunnel (unix)       p50 {:7.1} µs  p99 {:7.1} µs   added p50 {:.1} µs (target <= 150)",
            us(t50),
            us(t99),
            us(t50) - us(d50)
        );
        println!(
            "  tunnel (mTLS)       p50 {:7.1} µs  p99 {:7.1} µs   added p50 {:.1} µs",
            us(m50),
            us(m99),
            us(m50) - us(d50)
        );

        // 3. 1,000 concurrent streams through one agent, 10 round trips each.
        let streams = if quick { 50 } else { 1000 };
        let run = |tunnel: bool| {
            let s = &s;
            async move {
                let gate = Arc::new(tokio::sync::Semaphore::new(32));
                let t = Instant::now();
                let mut tasks = Vec::new();
                for _ in 0..streams {
                    let gate = gate.clone();
                    let target = echo.to_string();
                    let uds = s.uds.clone();
                    tasks.push(tokio::spawn(async move {
                        // Bound connection setup (listen backlogs), not the open streams.
                        let mut permit = Some(gate.acquire_owned().await.unwrap());
                        let mut c: Box<dyn Io> = if tunnel {
                            Box::new(connect(UnixStream::connect(uds).await.unwrap(), &target).await)
                        } else {
                            let c = TcpStream::connect(&target).await.unwrap();
                            c.set_nodelay(true).unwrap();
                            Box::new(c)
                        };
                        let msg = [1u8; 1024];
                        let mut back = [0u8; 1024];
                        for i in 0..10 {
                            c.write_all(&msg).await.unwrap();
                            c.read_exact(&mut back).await.unwrap();
                            if i == 0 && permit.is_some() {
                                // Held until the backend has accepted and answered: a connect
                                // completes before accept(), so releasing earlier lets a
                                // thousand handshakes overflow the listen queue into 1 s SYN
                                // retransmits.
                                permit = None;
                            }
                        }
                        c
                    }));
                }
                let mut open = Vec::new();
                for t in tasks {
                    open.push(t.await.unwrap());
                }
                let elapsed = t.elapsed();
                drop(open);
                elapsed
            }
        };
        let direct_t = run(false).await;
        let tunnel_t = run(true).await;
        println!("{streams} concurrent streams, 10 x 1 KiB round trips each:");
        println!("  direct TCP   {:8.1} ms", direct_t.as_secs_f64() * 1e3);
        println!(
            "  tunnel       {:8.1} ms   ratio {:.2}x the direct time; agent served {} dials",
            tunnel_t.as_secs_f64() * 1e3,
            tunnel_t.as_secs_f64() / direct_t.as_secs_f64(),
            s.agent.stats().dials_ok
        );

        // 4. Resident memory per idle stream.
        let idle = if quick { 100 } else { 2000 };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = rss();
        let mut held: Vec<TcpStream> = Vec::new();
        for _ in 0..idle {
            let c = TcpStream::connect(echo).await.unwrap();
            held.push(c);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let direct_per = (rss().saturating_sub(before)) as f64 / idle as f64;
        drop(held);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = rss();
        let mut held: Vec<UnixStream> = Vec::new();
        for _ in 0..idle {
            held.push(via_uds(&s, &echo.to_string()).await);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let tunnel_per = (rss().saturating_sub(before)) as f64 / idle as f64;
        println!("memory per idle stream ({idle} streams, growth of this process's RSS):");
        println!("  direct TCP (client + echo backend; socket buffers are kernel memory) {direct_per:8.0} B");
        println!("  tunnel (client, server, agent, backend)                              {tunnel_per:8.0} B");
        drop(held);

        // 5. Stalled streams: a client that stops reading while its backend keeps writing
        // (kubectl logs -f behind a slow terminal). With flow control the server holds at
        // most the connection's window for it; windows start small and grow only while
        // the consumer keeps up.
        let stalled = if quick { 10 } else { 200 };
        let firehose = source(usize::MAX).await.to_string();
        let mut held = Vec::new();
        for _ in 0..stalled {
            held.push(via_uds(&s, &firehose).await);
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let per = s.server.stats().buffered as f64 / stalled as f64;
        let max = kmetal_tunnel::proto::DEFAULT_FLOW_WINDOW as f64;
        println!("stalled streams ({stalled}, never read; the backend writes without end):");
        println!(
            "  server buffers {:6.0} KiB per stream   ratio {:.2}x the largest window ({:.0} KiB)",
            per / 1024.0,
            per / max,
            max / 1024.0
        );
        drop(held);
    });
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
