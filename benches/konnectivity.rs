//! kmetal's tunnel against the real Konnectivity (apiserver-network-proxy, built by
//! `scripts/peers.sh`), all four pairs in one run, every side a separate process on this
//! machine: (a) real konnectivity-server + real konnectivity-agent, (b) our server + our agent
//! (`examples/tunnel`, release), (c) our server + the real agent, (d) the real server + our
//! agent. The client is the same for all: our `ProxyClient` on each server's gRPC frontend
//! (a unix socket, as kube-apiserver uses it in Kamaji's setup); backends run in this process.
//!
//! Per pair: one stream's download and upload throughput, the 64 B round trip's added latency
//! (p50, p99, over direct TCP), 1,000 concurrent streams doing 10 x 1 KiB round trips, and
//! the memory per idle stream (RSS growth of the server and agent processes with 1,000 idle
//! streams open). Ratios are ours over the real pair's, from the same run; rounds are
//! interleaved across pairs so the machine's drift hits all of them alike.
//!
//! `cargo bench --bench konnectivity`; `cargo test --benches` runs it small.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::streams::{drain, echo_backend, median, pct, round_trips, sink, source, upload};
use kmetal_pki::{Bundle, PkiSpec};
use kmetal_testkit::konnectivity::{AgentOptions, LinkTls, ServerOptions};
use kmetal_testkit::{KonnectivityAgent, KonnectivityServer};
use kmetal_tunnel::ProxyClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One of our processes (`examples/tunnel`), killed on drop.
struct Ours(Child);

impl Drop for Ours {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A server: ours or the real one.
enum ServerSide {
    Real(KonnectivityServer),
    Ours {
        process: Ours,
        agents: String,
        grpc: PathBuf,
    },
}

impl ServerSide {
    fn agent_addr(&self) -> String {
        match self {
            ServerSide::Real(s) => s.agent_addr().to_string(),
            ServerSide::Ours { agents, .. } => agents.clone(),
        }
    }
    fn uds(&self) -> &Path {
        match self {
            ServerSide::Real(s) => s.uds(),
            ServerSide::Ours { grpc, .. } => grpc,
        }
    }
    fn pid(&self) -> u32 {
        match self {
            ServerSide::Real(s) => s.pid().unwrap(),
            ServerSide::Ours { process, .. } => process.0.id(),
        }
    }
}

/// An agent: ours or the real one.
enum AgentSide {
    Real(KonnectivityAgent),
    Ours(Ours),
}

impl AgentSide {
    fn pid(&self) -> u32 {
        match self {
            AgentSide::Real(a) => a.pid().unwrap(),
            AgentSide::Ours(p) => p.0.id(),
        }
    }
}

struct Pair {
    name: &'static str,
    server: ServerSide,
    agent: AgentSide,
    client: ProxyClient,
}

impl Pair {
    /// RSS of the server and of the agent process, bytes.
    fn rss(&self) -> (u64, u64) {
        let of = |pid: u32| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let kb: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap();
            kb * 1024
        };
        (of(self.server.pid()), of(self.agent.pid()))
    }
}

fn our_server(exe: &Path, pki: &Path, dir: &Path, id: &str) -> ServerSide {
    use std::io::BufRead;
    let grpc = dir.join(format!("{id}-grpc.sock"));
    let mut child = Command::new(exe)
        .args(["server", "--agent-listen", "127.0.0.1:0", "--server-id", id])
        .arg("--connect-listen")
        .arg(format!(
            "unix://{}",
            dir.join(format!("{id}-connect.sock")).display()
        ))
        .arg("--grpc-uds")
        .arg(&grpc)
        .arg("--pki")
        .arg(pki)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut agents = None;
    for line in lines.by_ref().map_while(Result::ok) {
        if let Some(a) = line.strip_prefix("listening agents=https://") {
            agents = Some(a.to_string());
        }
        if line.starts_with("listening grpc=") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    ServerSide::Ours {
        process: Ours(child),
        agents: agents.unwrap(),
        grpc,
    }
}

fn our_agent(exe: &Path, pki: &Path, server: &str) -> AgentSide {
    AgentSide::Ours(Ours(
        Command::new(exe)
            .args(["agent", "--server", server, "--identity", "host=bench"])
            .arg("--pki")
            .arg(pki)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ))
}

async fn real_server(tls: &LinkTls) -> ServerSide {
    ServerSide::Real(
        KonnectivityServer::start(ServerOptions::grpc_uds(tls))
            .await
            .unwrap(),
    )
}

async fn real_agent(tls: &LinkTls, server: &str) -> AgentSide {
    let mut a = KonnectivityAgent::start(AgentOptions::new(server.parse().unwrap(), tls))
        .await
        .unwrap();
    a.wait_connected().await.unwrap();
    AgentSide::Real(a)
}

/// Waits until a dial through the pair reaches `echo`, then returns the pair.
async fn ready(name: &'static str, server: ServerSide, agent: AgentSide, echo: &str) -> Pair {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(client) = ProxyClient::connect_unix(server.uds()).await {
            let client = client.with_dial_timeout(Duration::from_secs(5));
            if let Ok(mut s) = client.dial(echo).await {
                round_trips(&mut s, 1).await;
                return Pair {
                    name,
                    server,
                    agent,
                    client,
                };
            }
        }
        assert!(Instant::now() < end, "{name}: no dial got through");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn mbps(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e6
}

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let quick = common::quick();
    let rt = common::runtime();
    rt.block_on(async {
        let exe = common::example("tunnel", quick);
        let dir = tempfile::tempdir().unwrap();
        let bundle = Bundle::generate(&PkiSpec::new("bench", "127.0.0.1:6443")).unwrap();
        bundle.write_dir(dir.path()).unwrap();
        let tls = LinkTls::from_bundle(&bundle).unwrap();
        let echo = echo_backend().await.to_string();

        let s = real_server(&tls).await;
        let a = real_agent(&tls, &s.agent_addr()).await;
        let real = ready("real server + real agent", s, a, &echo).await;
        let s = our_server(&exe, dir.path(), dir.path(), "ours");
        let a = our_agent(&exe, dir.path(), &s.agent_addr());
        let ours = ready("our server + our agent", s, a, &echo).await;
        let s = our_server(&exe, dir.path(), dir.path(), "mixed");
        let a = real_agent(&tls, &s.agent_addr()).await;
        let ours_real = ready("our server + real agent", s, a, &echo).await;
        let s = real_server(&tls).await;
        let a = our_agent(&exe, dir.path(), &s.agent_addr());
        let real_ours = ready("real server + our agent", s, a, &echo).await;
        let pairs = [real, ours, ours_real, real_ours];

        // Memory first, while every process is fresh: later phases leave freed memory
        // behind that new streams would reuse unseen.
        let streams = if quick { 20 } else { 1_000 };
        println!(
            "memory per idle stream ({streams} open on fresh processes; RSS growth of the server and agent processes):"
        );
        let mut per = Vec::new();
        for p in &pairs {
            let before = p.rss();
            let mut open = Vec::new();
            for _ in 0..streams {
                let mut s = p.client.dial(&echo).await.unwrap();
                round_trips(&mut s, 1).await;
                open.push(s);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let after = p.rss();
            let grew = |a: u64, b: u64| a.saturating_sub(b) as f64 / streams as f64;
            per.push((grew(after.0, before.0), grew(after.1, before.1)));
            drop(open);
        }
        let all = |(s, a): (f64, f64)| s + a;
        for (p, b) in pairs.iter().zip(&per) {
            println!(
                "  {:26} {:8.0} B ({:.2}x): server {:.0} B, agent {:.0} B",
                p.name,
                all(*b),
                all(*b) / all(per[0]).max(1.0),
                b.0,
                b.1
            );
        }

        let total: usize = if quick { 1 << 20 } else { 64 << 20 };
        let rounds = if quick { 1 } else { 7 };
        let src = source(total).await.to_string();
        let snk = sink(total).await.to_string();
        let (mut down, mut up) = (vec![Vec::new(); 4], vec![Vec::new(); 4]);
        for _ in 0..rounds {
            for (i, p) in pairs.iter().enumerate() {
                let t = Instant::now();
                let got = drain(p.client.dial(&src).await.unwrap()).await;
                assert_eq!(got, total, "{}: the download lost bytes", p.name);
                down[i].push(mbps(total, t.elapsed()));
                let s = p.client.dial(&snk).await.unwrap();
                let t = Instant::now();
                upload(s, total).await;
                up[i].push(mbps(total, t.elapsed()));
            }
        }
        let ratio = |v: &Vec<Vec<f64>>, i: usize| {
            median(v[i].iter().zip(&v[0]).map(|(x, r)| x / r).collect())
        };
        println!(
            "throughput, one stream, {} MiB, median of {rounds} interleaved rounds (MB/s; ratio to the real pair):",
            total >> 20
        );
        for (i, p) in pairs.iter().enumerate() {
            println!(
                "  {:26} down {:7.0} ({:.2}x)   up {:7.0} ({:.2}x)",
                p.name,
                median(down[i].clone()),
                ratio(&down, i),
                median(up[i].clone()),
                ratio(&up, i)
            );
        }

        let n = if quick { 50 } else { 5_000 };
        let echo_addr = echo.clone();
        let mut direct = tokio::net::TcpStream::connect(&echo_addr).await.unwrap();
        direct.set_nodelay(true).unwrap();
        let mut d = round_trips(&mut direct, n).await;
        let (d50, d99) = (pct(&mut d, 0.5), pct(&mut d, 0.99));
        println!(
            "64 B round trip, {n} each: direct TCP p50 {:.1} µs p99 {:.1} µs; added by the tunnel (ratio to the real pair):",
            us(d50),
            us(d99)
        );
        let mut added = Vec::new();
        for p in &pairs {
            let mut s = p.client.dial(&echo).await.unwrap();
            let mut v = round_trips(&mut s, n).await;
            let (p50, p99) = (pct(&mut v, 0.5), pct(&mut v, 0.99));
            added.push((us(p50) - us(d50), us(p99) - us(d99)));
        }
        for (p, (a50, a99)) in pairs.iter().zip(&added) {
            println!(
                "  {:26} p50 +{a50:7.1} µs ({:.2}x)   p99 +{a99:7.1} µs ({:.2}x)",
                p.name,
                a50 / added[0].0,
                a99 / added[0].1
            );
        }

        println!("{streams} concurrent streams, 10 x 1 KiB round trips each (ratio of time to the real pair):");
        let mut times = Vec::new();
        for p in &pairs {
            let t = Instant::now();
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..streams {
                let (client, echo) = (p.client.clone(), echo.clone());
                set.spawn(async move {
                    let mut s = client.dial(&echo).await.map_err(|e| e.to_string())?;
                    let msg = [3u8; 1024];
                    let mut back = [0u8; 1024];
                    for _ in 0..10 {
                        s.write_all(&msg).await.map_err(|e| e.to_string())?;
                        s.read_exact(&mut back).await.map_err(|e| e.to_string())?;
                    }
                    Ok::<_, String>(())
                });
            }
            let mut failed = 0;
            while let Some(r) = set.join_next().await {
                if !matches!(r, Ok(Ok(()))) {
                    failed += 1;
                }
            }
            times.push((t.elapsed(), failed));
        }
        for (p, (t, failed)) in pairs.iter().zip(&times) {
            println!(
                "  {:26} {:8.1} ms ({:.2}x)  failed {failed}",
                p.name,
                t.as_secs_f64() * 1e3,
                t.as_secs_f64() / times[0].0.as_secs_f64()
            );
        }

    });
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
