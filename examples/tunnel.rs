//! A tenant's Konnectivity-compatible tunnel: the server on the control-plane side, the agent
//! on a worker.
//!
//! ```text
//! tunnel server --agent-listen 0.0.0.0:8132 --connect-listen unix:///run/konnectivity.sock \
//!               [--grpc-uds /run/konnectivity-grpc.sock] --pki DIR --server-id ID --server-count N
//! tunnel agent  --server cp.example.com:8132 --pki DIR [--identity host=node-1 ...]
//! ```
//!
//! `--pki DIR` is a tenant directory in kubeadm's layout (`examples/pki init --out DIR`); the
//! agent needs only `pki/ca.crt` and `pki/konnectivity-agent.{crt,key}`. The server prints
//! one `listening` line per listener (with the bound address) and both stop on Ctrl-C or
//! SIGTERM; the agent sends DRAIN first and lets open connections finish.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[path = "common/shutdown.rs"]
mod shutdown;

use clap::{Parser, Subcommand};
use kmetal_pki::Bundle;
use kmetal_tunnel::{
    Agent, AgentConfig, ConnectListener, Identifiers, Server, ServerConfig, Strategy, tls,
};
use shutdown::shutdown_signal;

#[derive(Parser)]
#[command(about = "Konnectivity-compatible reverse tunnel: server and agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy server (control-plane side).
    Server {
        /// Where agents connect (mTLS), `host:port`.
        #[arg(long)]
        agent_listen: String,
        /// The HTTP CONNECT frontend: `host:port` (mTLS) or `unix:///path`.
        #[arg(long)]
        connect_listen: String,
        /// The gRPC ProxyService frontend on a unix socket.
        #[arg(long)]
        grpc_uds: Option<PathBuf>,
        /// The tenant's PKI directory.
        #[arg(long)]
        pki: PathBuf,
        /// This replica's id.
        #[arg(long)]
        server_id: String,
        /// How many replicas serve the tenant.
        #[arg(long, default_value_t = 1)]
        server_count: u32,
        /// Agent selection, in order: default, destHost, defaultRoute.
        #[arg(long, default_value = "default")]
        proxy_strategies: String,
        /// Seconds a dial waits for the agent's answer.
        #[arg(long, default_value_t = 10)]
        dial_timeout: u64,
    },
    /// Run an agent (worker side).
    Agent {
        /// A server address, `host:port` (repeat for several).
        #[arg(long = "server", required = true)]
        servers: Vec<String>,
        /// The tenant's PKI directory (ca.crt and the agent certificate).
        #[arg(long)]
        pki: PathBuf,
        /// An identifier, `host=NAME`, `ipv4=ADDR`, `ipv6=ADDR`, `cidr=NET` or `default-route=true`.
        #[arg(long = "identity")]
        identities: Vec<String>,
        /// The agent's id (default: the first host identity, else the machine's hostname).
        #[arg(long)]
        agent_id: Option<String>,
        /// The name the server certificate must carry (default: the server's host).
        #[arg(long)]
        server_name: Option<String>,
    },
}

/// Why the example failed.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error(transparent)]
    Pki(#[from] kmetal_pki::PkiError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("{file}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--proxy-strategies")]
    Strategy(#[from] kmetal_tunnel::server::StrategyError),
    #[error("--identity {value:?}: {reason}")]
    Identity { value: String, reason: String },
    #[error("binding {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Serve(#[from] kmetal_tunnel::ServerError),
    #[error(transparent)]
    Agent(#[from] kmetal_tunnel::AgentError),
}

fn load_files(dir: &Path, names: &[&str]) -> Result<Bundle, Error> {
    let mut files = Vec::new();
    for name in names {
        let file = dir.join(name);
        let text = std::fs::read_to_string(&file).map_err(|source| Error::Read { file, source })?;
        files.push((name.to_string(), text));
    }
    Ok(Bundle::from_files(files))
}

async fn run_server(
    agent_listen: String,
    connect_listen: String,
    grpc_uds: Option<PathBuf>,
    pki: PathBuf,
    config: ServerConfig,
) -> Result<(), Error> {
    let bundle = Bundle::load_dir(&pki)?;
    let server = Server::new(config);
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let bind = |addr: String| async move {
        tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|source| Error::Bind { addr, source })
    };
    let bind_unix = |path: PathBuf| {
        let _ = std::fs::remove_file(&path);
        tokio::net::UnixListener::bind(&path).map_err(|source| Error::Bind {
            addr: path.display().to_string(),
            source,
        })
    };
    let mut tasks = tokio::task::JoinSet::new();
    let agents = bind(agent_listen).await?;
    println!(
        "listening agents=https://{}",
        agents.local_addr().map_err(|source| Error::Bind {
            addr: "agent listener".into(),
            source
        })?
    );
    {
        let (s, tls, f) = (server.clone(), tls::agent_listener(&bundle)?, stopped());
        tasks.spawn(async move { s.serve_agents(agents, tls, f).await });
    }
    let connect = match connect_listen.strip_prefix("unix://") {
        Some(path) => {
            let l = bind_unix(PathBuf::from(path))?;
            println!("listening connect=unix://{path}");
            ConnectListener::Unix(l)
        }
        None => {
            let l = bind(connect_listen).await?;
            println!(
                "listening connect=https://{}",
                l.local_addr().map_err(|source| Error::Bind {
                    addr: "connect listener".into(),
                    source
                })?
            );
            ConnectListener::Tls(l, tls::connect_listener(&bundle)?)
        }
    };
    {
        let (s, f) = (server.clone(), stopped());
        tasks.spawn(async move { s.serve_connect(connect, f).await });
    }
    if let Some(path) = grpc_uds {
        let l = bind_unix(path.clone())?;
        println!("listening grpc=unix://{}", path.display());
        let (s, f) = (server.clone(), stopped());
        tasks.spawn(async move { s.serve_proxy_grpc(l, f).await });
    }
    tokio::select! {
        _ = shutdown_signal() => {}
        Some(r) = tasks.join_next() => {
            if let Ok(Err(e)) = r {
                return Err(e.into());
            }
        }
    }
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}

async fn run_agent(
    servers: Vec<String>,
    pki: PathBuf,
    identities: Vec<String>,
    agent_id: Option<String>,
    server_name: Option<String>,
) -> Result<(), Error> {
    let bundle = load_files(&pki, &[tls::CA, tls::AGENT_CERT, tls::AGENT_KEY])?;
    let mut ids = Identifiers::default();
    for value in &identities {
        let (k, v) = value.split_once('=').ok_or_else(|| Error::Identity {
            value: value.clone(),
            reason: "expected KEY=VALUE".into(),
        })?;
        ids.add(k, v).map_err(|e| Error::Identity {
            value: value.clone(),
            reason: e.to_string(),
        })?;
    }
    let agent_id = agent_id
        .or_else(|| ids.hosts.first().cloned())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "agent".into());
    let mut config = AgentConfig::new(servers, tls::agent_client(&bundle)?, agent_id.clone());
    config.identifiers = ids;
    config.server_name = server_name;
    let agent = Agent::start(config)?;
    println!("agent {agent_id} started");
    let report = async {
        let mut last = usize::MAX;
        loop {
            let n = agent.stats().servers;
            if n != last {
                println!("connected servers={n}");
                last = n;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        _ = shutdown_signal() => {}
        _ = report => {}
    }
    println!("draining");
    agent.shutdown().await;
    Ok(())
}

// The link hands HTTP/2's read buffers on to the sockets without copying, so HTTP/2
// allocates a fresh buffer for most frames; glibc's malloc returns those pages to the kernel
// and faults them back in, mimalloc keeps them (see kmetal-tunnel's "Allocator" docs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let result = match Cli::parse().command {
        Command::Server {
            agent_listen,
            connect_listen,
            grpc_uds,
            pki,
            server_id,
            server_count,
            proxy_strategies,
            dial_timeout,
        } => {
            let mut config = ServerConfig::new(server_id, server_count);
            match Strategy::parse_list(&proxy_strategies) {
                Ok(s) => config.strategies = s,
                Err(e) => {
                    eprintln!("error: {}", kmetal::Report(&Error::from(e)));
                    return ExitCode::from(2);
                }
            }
            config.dial_timeout = Duration::from_secs(dial_timeout);
            run_server(agent_listen, connect_listen, grpc_uds, pki, config).await
        }
        Command::Agent {
            servers,
            pki,
            identities,
            agent_id,
            server_name,
        } => run_agent(servers, pki, identities, agent_id, server_name).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", kmetal::Report(&e));
            ExitCode::FAILURE
        }
    }
}
