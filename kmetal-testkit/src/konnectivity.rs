//! The real Konnectivity (`sigs.k8s.io/apiserver-network-proxy`, built by `scripts/peers.sh`):
//! konnectivity-server and konnectivity-agent on loopback, with mTLS on the agent link.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kmetal_testkit::konnectivity::KonnectivityError> {
//! use kmetal_testkit::konnectivity::{AgentOptions, KonnectivityAgent, KonnectivityServer,
//!     LinkTls, ServerOptions};
//! let tls = LinkTls::generate()?;
//! let server = KonnectivityServer::start(ServerOptions::grpc_uds(&tls)).await?;
//! let mut agent = KonnectivityAgent::start(AgentOptions::to(&server, &tls)).await?;
//! agent.wait_connected().await?;
//! # Ok(()) }
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use tempfile::TempDir;

use crate::http::{self, HttpError};
use crate::ports::free_port;
use crate::process::{self, Launch, ProcessError, Supervised};
use crate::tls::{Pem, TestCa, TlsError, write_pem};

/// Why a Konnectivity process could not be started or driven.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KonnectivityError {
    /// Finding, starting or waiting for the binary failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// Making or writing test certificates failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A health or metrics request failed.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// Creating the temporary directory failed.
    #[error("cannot create a temporary directory")]
    TempDir(#[source] std::io::Error),
    /// The bundle lacks a file the link needs.
    #[error("{0}: missing from the PKI bundle")]
    MissingFile(String),
    /// Signalling the process failed.
    #[error("cannot signal {what}")]
    Signal {
        /// Which process.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The agent link's certificates: one CA, the server's serving certificate (for 127.0.0.1)
/// and the agent's client certificate.
#[derive(Debug, Clone)]
pub struct LinkTls {
    /// CA that signs both sides, PEM.
    pub ca_pem: String,
    /// The server's certificate for the agent port.
    pub server: Pem,
    /// The agent's client certificate.
    pub agent: Pem,
}

impl LinkTls {
    /// The certificates of a tenant's kmetal-pki bundle: its CA and the
    /// `konnectivity-server` and `konnectivity-agent` pairs kmetal's own tunnel uses.
    pub fn from_bundle(bundle: &kmetal_pki::Bundle) -> Result<Self, KonnectivityError> {
        let file = |name: String| {
            bundle
                .get(&name)
                .map(str::to_string)
                .ok_or(KonnectivityError::MissingFile(name))
        };
        let pem = |name: &str| -> Result<Pem, KonnectivityError> {
            Ok(Pem {
                cert: file(format!("pki/{name}.crt"))?,
                key: file(format!("pki/{name}.key"))?,
            })
        };
        Ok(Self {
            ca_pem: file("pki/ca.crt".into())?,
            server: pem("konnectivity-server")?,
            agent: pem("konnectivity-agent")?,
        })
    }

    /// A fresh CA and both certificates.
    pub fn generate() -> Result<Self, KonnectivityError> {
        let ca = TestCa::new("kmetal-test-konnectivity-ca")?;
        Ok(Self {
            server: ca.server("konnectivity-server")?,
            agent: ca.client("konnectivity-agent")?,
            ca_pem: ca.cert_pem,
        })
    }
}

/// konnectivity-server's `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// The gRPC `ProxyService` frontend (Kamaji's mode).
    Grpc,
    /// HTTP CONNECT.
    HttpConnect,
}

/// How to start a konnectivity-server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The agent link's certificates.
    pub tls: LinkTls,
    /// Frontend protocol.
    pub mode: Mode,
    /// `--server-id` (a fresh UUID-like name when `None`).
    pub server_id: Option<String>,
    /// `--server-count`.
    pub server_count: u32,
    /// `--proxy-strategies` (`default`, `destHost`, `defaultRoute`).
    pub proxy_strategies: Vec<String>,
    /// The address agents connect to (`--agent-bind-address`): loopback, or the host's veth
    /// address for agents in a network namespace.
    pub agent_bind: Ipv4Addr,
    /// Further flags, after ours.
    pub extra_args: Vec<String>,
}

impl ServerOptions {
    /// gRPC mode on a unix socket, one server.
    pub fn grpc_uds(tls: &LinkTls) -> Self {
        Self {
            tls: tls.clone(),
            mode: Mode::Grpc,
            server_id: None,
            server_count: 1,
            proxy_strategies: vec!["default".into()],
            agent_bind: Ipv4Addr::LOCALHOST,
            extra_args: Vec::new(),
        }
    }
}

/// A running konnectivity-server, killed on drop. Its frontend is a unix socket.
#[derive(Debug)]
pub struct KonnectivityServer {
    process: Supervised,
    agent_bind: Ipv4Addr,
    agent_port: u16,
    admin_port: u16,
    health_port: u16,
    uds: PathBuf,
    log: PathBuf,
    _dir: TempDir,
}

const READY_TIMEOUT: Duration = Duration::from_secs(30);

impl KonnectivityServer {
    /// Starts the server and waits for its `/healthz`.
    pub async fn start(options: ServerOptions) -> Result<Self, KonnectivityError> {
        let binary = process::peer_binary("konnectivity-server")?;
        let dir = tempfile::Builder::new()
            .prefix("kmetal-konnectivity-server-")
            .tempdir()
            .map_err(KonnectivityError::TempDir)?;
        let port = || free_port().map_err(KonnectivityError::TempDir);
        let (agent_port, admin_port, health_port) = (port()?, port()?, port()?);
        let ca = write_pem(dir.path(), "ca.crt", &options.tls.ca_pem)?;
        let cert = write_pem(dir.path(), "server.crt", &options.tls.server.cert)?;
        let key = write_pem(dir.path(), "server.key", &options.tls.server.key)?;
        let uds = dir.path().join("konnectivity.sock");
        let mode = match options.mode {
            Mode::Grpc => "grpc",
            Mode::HttpConnect => "http-connect",
        };
        let server_id = options
            .server_id
            .clone()
            .unwrap_or_else(|| format!("kmetal-test-{agent_port}"));
        let mut args = vec![
            format!("--mode={mode}"),
            format!("--uds-name={}", uds.display()),
            "--delete-existing-uds-file".to_string(),
            "--server-port=0".into(),
            format!("--agent-bind-address={}", options.agent_bind),
            format!("--agent-port={agent_port}"),
            "--admin-bind-address=127.0.0.1".into(),
            format!("--admin-port={admin_port}"),
            "--health-bind-address=127.0.0.1".into(),
            format!("--health-port={health_port}"),
            format!("--cluster-ca-cert={}", ca.display()),
            format!("--cluster-cert={}", cert.display()),
            format!("--cluster-key={}", key.display()),
            format!("--server-id={server_id}"),
            format!("--server-count={}", options.server_count),
            format!("--proxy-strategies={}", options.proxy_strategies.join(",")),
        ];
        args.extend(options.extra_args.iter().cloned());
        let log = dir.path().join("konnectivity-server.log");
        let mut cmd = process::command(&binary, &Launch::default());
        cmd.args(&args);
        let mut server = Self {
            process: Supervised::spawn(cmd, &log)?,
            agent_bind: options.agent_bind,
            agent_port,
            admin_port,
            health_port,
            uds,
            log,
            _dir: dir,
        };
        let health = http::Client::plain(server.health_addr());
        server
            .process
            .wait_until("konnectivity-server /healthz", READY_TIMEOUT, || {
                health.is_ok("/healthz")
            })
            .await?;
        Ok(server)
    }

    /// Where agents connect (mTLS).
    pub fn agent_addr(&self) -> SocketAddr {
        (self.agent_bind, self.agent_port).into()
    }

    /// The admin port (`/metrics`).
    pub fn admin_addr(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, self.admin_port).into()
    }

    /// The health port (`/healthz`, `/readyz`: ready once an agent is connected).
    pub fn health_addr(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, self.health_port).into()
    }

    /// The frontend's unix socket (what an api-server's egress selector names).
    pub fn uds(&self) -> &std::path::Path {
        &self.uds
    }

    /// Whether `/readyz` says an agent is connected.
    pub async fn has_agent(&self) -> Result<bool, KonnectivityError> {
        let r = http::Client::plain(self.health_addr())
            .get("/readyz")
            .await?;
        Ok(r.status == 200)
    }

    /// The `/metrics` text (Prometheus format).
    pub async fn metrics(&self) -> Result<String, KonnectivityError> {
        Ok(http::Client::plain(self.admin_addr())
            .get("/metrics")
            .await?
            .text())
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        process::log_tail(&self.log, lines)
    }

    /// Whether the process runs.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Its process id.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }
}

/// How to start a konnectivity-agent.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The server's agent address.
    pub server: SocketAddr,
    /// The link's certificates (the agent presents `tls.agent`, trusts `tls.ca_pem`).
    pub tls: LinkTls,
    /// `--agent-identifiers`, URL-encoded (`host=node-1&ipv4=10.0.0.1`).
    pub identifiers: Option<String>,
    /// The network namespace to run in (a worker host: [`crate::netns::Netns`]).
    pub netns: Option<String>,
    /// Where its health and admin servers listen: loopback, or the namespace's veth address
    /// (which the host reaches) when it runs in one.
    pub local_address: Ipv4Addr,
    /// Further flags, after ours.
    pub extra_args: Vec<String>,
}

impl AgentOptions {
    /// An agent for `server`'s agent port.
    pub fn to(server: &KonnectivityServer, tls: &LinkTls) -> Self {
        Self::new(server.agent_addr(), tls)
    }

    /// An agent for the server (or load balancer) at `server`.
    pub fn new(server: SocketAddr, tls: &LinkTls) -> Self {
        Self {
            server,
            tls: tls.clone(),
            identifiers: None,
            netns: None,
            local_address: Ipv4Addr::LOCALHOST,
            extra_args: Vec::new(),
        }
    }
}

/// A running konnectivity-agent, killed on drop.
#[derive(Debug)]
pub struct KonnectivityAgent {
    process: Supervised,
    local_address: Ipv4Addr,
    health_port: u16,
    admin_port: u16,
    log: PathBuf,
    _dir: TempDir,
}

impl KonnectivityAgent {
    /// Starts the agent and waits for its `/healthz` (not for a connection: see
    /// [`wait_connected`](Self::wait_connected)).
    pub async fn start(options: AgentOptions) -> Result<Self, KonnectivityError> {
        let binary = process::peer_binary("konnectivity-agent")?;
        let dir = tempfile::Builder::new()
            .prefix("kmetal-konnectivity-agent-")
            .tempdir()
            .map_err(KonnectivityError::TempDir)?;
        let port = || free_port().map_err(KonnectivityError::TempDir);
        let (health_port, admin_port) = (port()?, port()?);
        let ca = write_pem(dir.path(), "ca.crt", &options.tls.ca_pem)?;
        let cert = write_pem(dir.path(), "agent.crt", &options.tls.agent.cert)?;
        let key = write_pem(dir.path(), "agent.key", &options.tls.agent.key)?;
        let mut args = vec![
            format!("--proxy-server-host={}", options.server.ip()),
            format!("--proxy-server-port={}", options.server.port()),
            format!("--ca-cert={}", ca.display()),
            format!("--agent-cert={}", cert.display()),
            format!("--agent-key={}", key.display()),
            format!("--health-server-host={}", options.local_address),
            format!("--health-server-port={health_port}"),
            format!("--admin-bind-address={}", options.local_address),
            format!("--admin-server-port={admin_port}"),
            // Retry fast: tests start servers and agents in any order.
            "--sync-interval=200ms".into(),
            "--sync-interval-cap=2s".into(),
        ];
        if let Some(ids) = &options.identifiers {
            args.push(format!("--agent-identifiers={ids}"));
        }
        args.extend(options.extra_args.iter().cloned());
        let log = dir.path().join("konnectivity-agent.log");
        let launch = Launch {
            netns: options.netns.clone(),
            ..Launch::default()
        };
        let mut cmd = process::command(&binary, &launch);
        cmd.args(&args);
        let mut agent = Self {
            process: Supervised::spawn(cmd, &log)?,
            local_address: options.local_address,
            health_port,
            admin_port,
            log,
            _dir: dir,
        };
        let health = http::Client::plain(agent.health_addr());
        agent
            .process
            .wait_until("konnectivity-agent /healthz", READY_TIMEOUT, || {
                health.is_ok("/healthz")
            })
            .await?;
        Ok(agent)
    }

    /// Waits until the agent's `/readyz` says it holds a connection to a server.
    pub async fn wait_connected(&mut self) -> Result<(), KonnectivityError> {
        let health = http::Client::plain(self.health_addr());
        Ok(self
            .process
            .wait_until(
                "konnectivity-agent /readyz (a server connection)",
                READY_TIMEOUT,
                || health.is_ok("/readyz"),
            )
            .await?)
    }

    /// The health port (`/healthz`, `/readyz`).
    pub fn health_addr(&self) -> SocketAddr {
        (self.local_address, self.health_port).into()
    }

    /// The admin port (`/metrics`).
    pub fn admin_addr(&self) -> SocketAddr {
        (self.local_address, self.admin_port).into()
    }

    /// The `/metrics` text (Prometheus format; the agent serves it on its health port and
    /// only redirects there from the admin port).
    pub async fn metrics(&self) -> Result<String, KonnectivityError> {
        Ok(http::Client::plain(self.health_addr())
            .get("/metrics")
            .await?
            .text())
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        process::log_tail(&self.log, lines)
    }

    /// Whether the process runs.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Sends SIGTERM: the agent drains (DRAIN to every server, on its next packet from
    /// each) and keeps its connections until a second signal.
    pub fn terminate(&self) -> Result<(), KonnectivityError> {
        self.process
            .terminate()
            .map_err(|source| KonnectivityError::Signal {
                what: "konnectivity-agent",
                source,
            })
    }

    /// Its process id.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }
}
