//! The proxy server: an mTLS agent listener (`AgentService.Connect`), the frontends
//! kube-apiserver can use (gRPC `ProxyService` on a unix socket, HTTP CONNECT on a unix
//! socket or on mTLS TCP), the proxy strategies that pick an agent for a dial, and the
//! bookkeeping that frees every connection when either side goes away.
//!
//! What it does better than Konnectivity's server: a dial with no usable agent fails at once
//! (not after a 30 s backstop); nothing is routed to a draining agent or to one whose
//! connection failed its keepalive; per-connection flow control with our agents; every
//! dial, connection and task is released when a frontend, a backend or an agent goes away.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::conn::{self, ConnEnd, ConnTable, Flow, Role};
use crate::connect;
use crate::grpc;
use crate::link::Link;
use crate::proto::{self, Frame, Identifiers, Packet};

/// How a dial picks an agent (Konnectivity's `--proxy-strategies`, tried in order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Strategy {
    /// Any ready agent.
    Default,
    /// An agent whose identifiers (host, ipv4, ipv6, cidr) claim the dialed host.
    DestHost,
    /// An agent that identifies as a default route.
    DefaultRoute,
}

/// A bad `--proxy-strategies` value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StrategyError {
    /// A name other than default, destHost, defaultRoute.
    #[error("unknown proxy strategy {0:?} (expected default, destHost or defaultRoute)")]
    Unknown(String),
    /// No strategy at all.
    #[error("no proxy strategy given")]
    Empty,
}

impl Strategy {
    /// Parses a comma-separated list (`destHost,default`).
    pub fn parse_list(s: &str) -> Result<Vec<Strategy>, StrategyError> {
        let list = s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| match p {
                "default" => Ok(Strategy::Default),
                "destHost" => Ok(Strategy::DestHost),
                "defaultRoute" => Ok(Strategy::DefaultRoute),
                other => Err(StrategyError::Unknown(other.into())),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if list.is_empty() {
            return Err(StrategyError::Empty);
        }
        Ok(list)
    }

    fn admits(self, ids: &Identifiers, host: &str) -> bool {
        match self {
            Strategy::Default => true,
            Strategy::DestHost => ids.matches_host(host),
            Strategy::DefaultRoute => ids.default_route,
        }
    }
}

/// The server's settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// This replica's id, sent to agents.
    pub server_id: String,
    /// How many replicas serve the tenant; agents connect until they reach each.
    pub server_count: u32,
    /// Agent selection, tried in order.
    pub strategies: Vec<Strategy>,
    /// How long a dial waits for the agent's answer.
    pub dial_timeout: Duration,
    /// HTTP/2 ping interval on agent connections.
    pub keepalive_interval: Duration,
    /// How long an unanswered ping may take before the agent is dropped.
    pub keepalive_timeout: Duration,
    /// Deadline for a TLS handshake or a CONNECT request head.
    pub handshake_timeout: Duration,
    /// The largest receive window per connection with agents that do flow control: the
    /// bytes one stream keeps in flight at full speed (default
    /// [`crate::proto::DEFAULT_FLOW_WINDOW`]). Windows start at
    /// [`crate::proto::INITIAL_FLOW_WINDOW`] and grow only while the connection's consumer
    /// keeps up, so a stalled connection buffers the starting window, not this.
    pub flow_window: u32,
    /// The CN an agent's client certificate must carry (`None`: any cert from the CA).
    pub agent_common_name: Option<String>,
}

impl ServerConfig {
    /// Defaults for replica `server_id` of `server_count`.
    pub fn new(server_id: impl Into<String>, server_count: u32) -> Self {
        ServerConfig {
            server_id: server_id.into(),
            server_count: server_count.max(1),
            strategies: vec![Strategy::Default],
            dial_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            flow_window: proto::DEFAULT_FLOW_WINDOW,
            agent_common_name: Some("system:konnectivity-agent".into()),
        }
    }
}

/// Serving a listener failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Grpc(#[source] tonic::transport::Error),
    /// Accepting a connection failed.
    #[error("accept: {0}")]
    Accept(#[source] std::io::Error),
}

/// A dial through the tunnel failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// No connected, non-draining agent matches the strategies: fails at once.
    #[error(
        "no agent available for {address} (strategies {strategies:?}; {agents} connected, {draining} draining)"
    )]
    NoAgent {
        /// The dialed address.
        address: String,
        /// The strategies that were tried.
        strategies: Vec<Strategy>,
        /// Agents connected to this server.
        agents: usize,
        /// Of which draining.
        draining: usize,
    },
    /// The agent did not answer within the dial timeout.
    #[error("agent {agent} did not answer the dial to {address} within {after:?}")]
    Timeout {
        /// The dialed address.
        address: String,
        /// The agent.
        agent: String,
        /// The timeout.
        after: Duration,
    },
    /// The agent could not reach the address.
    #[error("agent {agent} could not dial {address}: {message}")]
    Refused {
        /// The dialed address.
        address: String,
        /// The agent.
        agent: String,
        /// The agent's error.
        message: String,
    },
    /// The agent's connection went away during the dial.
    #[error("agent {agent} went away while dialing {address}")]
    AgentGone {
        /// The dialed address.
        address: String,
        /// The agent.
        agent: String,
    },
}

impl DialError {
    /// The HTTP status a CONNECT frontend answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            DialError::NoAgent { .. } => 503,
            DialError::Timeout { .. } => 504,
            DialError::Refused { .. } | DialError::AgentGone { .. } => 502,
        }
    }
}

/// A connected agent, as [`Server::agents`] reports it.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    /// The agent's id.
    pub id: String,
    /// Its identifiers.
    pub identifiers: Identifiers,
    /// Whether it sent DRAIN.
    pub draining: bool,
    /// Connections open through it.
    pub connections: usize,
    /// Whether it negotiated flow control.
    pub flow_control: bool,
}

/// Counters for tests, metrics and leak checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Agent connections registered.
    pub agents: usize,
    /// Of which draining.
    pub draining: usize,
    /// Tunneled connections open.
    pub connections: usize,
    /// Dials waiting for an agent's answer.
    pub pending_dials: usize,
    /// Dials that succeeded since start.
    pub dials_ok: u64,
    /// Dials that failed since start.
    pub dials_failed: u64,
    /// Handshakes refused on the agent listener and the mTLS frontend (wrong CA, no cert,
    /// wrong agent CN, timeout).
    pub refused_handshakes: u64,
    /// Bytes received from agents and not yet written to their frontend connections (with
    /// flow control, at most each connection's current window).
    pub buffered: usize,
}

type DialReply = Result<ConnEnd, String>;

struct Session {
    serial: u64,
    id: String,
    identifiers: Identifiers,
    link: Link,
    flow: Flow,
    draining: AtomicBool,
    conns: Arc<ConnTable>,
    dials: Mutex<HashMap<i64, oneshot::Sender<DialReply>>>,
    /// Cancelled when the session is unregistered: its reader stops and drops the request
    /// body, so the agent's stream ends on both sides (and a graceful shutdown finishes)
    /// even if the agent keeps its side open.
    ended: tokio_util::sync::CancellationToken,
}

impl Session {
    fn dials(&self) -> MutexGuard<'_, HashMap<i64, oneshot::Sender<DialReply>>> {
        self.dials.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Shared {
    config: ServerConfig,
    sessions: Mutex<Vec<Arc<Session>>>,
    next: AtomicUsize,
    serial: AtomicU64,
    open: Arc<AtomicUsize>,
    dials_ok: AtomicU64,
    dials_failed: AtomicU64,
    refused: AtomicU64,
}

impl Shared {
    fn sessions(&self) -> MutexGuard<'_, Vec<Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pick(&self, host: &str) -> Option<Arc<Session>> {
        let sessions = self.sessions();
        for s in &self.config.strategies {
            let ready: Vec<&Arc<Session>> = sessions
                .iter()
                .filter(|x| !x.draining.load(Ordering::Acquire) && s.admits(&x.identifiers, host))
                .collect();
            if !ready.is_empty() {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % ready.len();
                return Some(ready[i].clone());
            }
        }
        None
    }

    async fn dial(&self, address: &str) -> Result<ConnEnd, DialError> {
        let result = self.dial_inner(address).await;
        match &result {
            Ok(_) => self.dials_ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.dials_failed.fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    async fn dial_inner(&self, address: &str) -> Result<ConnEnd, DialError> {
        let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
        let Some(session) = self.pick(host) else {
            let sessions = self.sessions();
            return Err(DialError::NoAgent {
                address: address.into(),
                strategies: self.config.strategies.clone(),
                agents: sessions.len(),
                draining: sessions
                    .iter()
                    .filter(|s| s.draining.load(Ordering::Acquire))
                    .count(),
            });
        };
        let random = random_i64();
        let (tx, rx) = oneshot::channel();
        session.dials().insert(random, tx);
        let gone = || DialError::AgentGone {
            address: address.into(),
            agent: session.id.clone(),
        };
        if !session.link.control(Frame::DialRequest {
            protocol: "tcp".into(),
            address: address.into(),
            random,
        }) {
            session.dials().remove(&random);
            return Err(gone());
        }
        match tokio::time::timeout(self.config.dial_timeout, rx).await {
            Ok(Ok(Ok(end))) => Ok(end),
            Ok(Ok(Err(message))) => Err(DialError::Refused {
                address: address.into(),
                agent: session.id.clone(),
                message,
            }),
            Ok(Err(_)) => Err(gone()),
            Err(_) => {
                session.dials().remove(&random);
                session.link.control(Frame::CloseDial { random });
                Err(DialError::Timeout {
                    address: address.into(),
                    agent: session.id.clone(),
                    after: self.config.dial_timeout,
                })
            }
        }
    }

    fn register(&self, session: Arc<Session>) {
        self.sessions().push(session);
    }

    fn unregister(&self, session: &Session) {
        self.sessions().retain(|s| s.serial != session.serial);
        session.dials().clear();
        session.conns.close_all();
        session.link.end();
        session.ended.cancel();
    }

    /// Handles one packet from an agent.
    fn on_agent_frame(&self, session: &Session, frame: Frame) {
        match frame {
            Frame::DialResponse {
                random,
                connect_id,
                error,
            } => {
                let waiter = session.dials().remove(&random);
                match waiter {
                    Some(tx) if error.is_empty() => {
                        let end =
                            session
                                .conns
                                .open(connect_id, session.link.clone(), session.flow);
                        if let Err(Ok(end)) = tx.send(Ok(end)) {
                            // The dialer gave up in the meantime: close what the agent opened.
                            drop(end);
                            session.link.control(Frame::CloseRequest { connect_id });
                        }
                    }
                    Some(tx) => {
                        let _ = tx.send(Err(error));
                    }
                    None if error.is_empty() => {
                        session.link.control(Frame::CloseRequest { connect_id });
                    }
                    None => {}
                }
            }
            Frame::Data {
                connect_id, data, ..
            } => {
                let delivered = session.conns.with(connect_id, |s| s.deliver(data));
                match delivered {
                    Some(Ok(())) => {}
                    Some(Err(_)) => {
                        tracing::warn!(agent = %session.id, connect_id, "connection overran its receive window; closing it");
                        session.conns.remove(connect_id);
                        session.link.control(Frame::CloseRequest { connect_id });
                    }
                    None => {
                        session.link.control(Frame::CloseRequest { connect_id });
                    }
                }
            }
            Frame::CloseResponse { connect_id, .. } => {
                session.conns.with(connect_id, |s| s.close());
            }
            Frame::Window { connect_id, bytes } => {
                session.conns.with(connect_id, |s| s.grant(bytes));
            }
            Frame::Drain => {
                tracing::info!(agent = %session.id, "agent is draining; no new dials go to it");
                session.draining.store(true, Ordering::Release);
            }
            Frame::CloseDial { random } => {
                if let Some(tx) = session.dials().remove(&random) {
                    let _ = tx.send(Err("the agent abandoned the dial".into()));
                }
            }
            other => {
                tracing::debug!(agent = %session.id, ?other, "unexpected packet from an agent; ignored");
            }
        }
    }
}

fn random_i64() -> i64 {
    let mut b = [0u8; 8];
    // SystemRandom only fails when the OS has no entropy source; a fixed id still works
    // because pending dials are keyed per agent.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    i64::from_le_bytes(b)
}

/// The proxy server of one tenant. Cheap to clone; every listener shares its agents.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("server_id", &self.shared.config.server_id)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Where a CONNECT frontend listens.
#[derive(Debug)]
#[non_exhaustive]
pub enum ConnectListener {
    /// A unix socket (next to the api-server, as in a hosted control plane pod).
    Unix(UnixListener),
    /// TCP with mTLS: clients need a certificate from the tenant's CA.
    Tls(TcpListener, Arc<rustls::ServerConfig>),
}

impl Server {
    /// A server with `config` and no agents yet.
    pub fn new(config: ServerConfig) -> Server {
        Server {
            shared: Arc::new(Shared {
                config,
                sessions: Mutex::default(),
                next: AtomicUsize::new(0),
                serial: AtomicU64::new(0),
                open: Arc::new(AtomicUsize::new(0)),
                dials_ok: AtomicU64::new(0),
                dials_failed: AtomicU64::new(0),
                refused: AtomicU64::new(0),
            }),
        }
    }

    /// The server's settings.
    pub fn config(&self) -> &ServerConfig {
        &self.shared.config
    }

    /// Counters (agents, connections, pending dials, outcomes).
    pub fn stats(&self) -> ServerStats {
        let sessions = self.shared.sessions();
        ServerStats {
            agents: sessions.len(),
            draining: sessions
                .iter()
                .filter(|s| s.draining.load(Ordering::Acquire))
                .count(),
            connections: self.shared.open.load(Ordering::Relaxed),
            pending_dials: sessions.iter().map(|s| s.dials().len()).sum(),
            dials_ok: self.shared.dials_ok.load(Ordering::Relaxed),
            dials_failed: self.shared.dials_failed.load(Ordering::Relaxed),
            refused_handshakes: self.shared.refused.load(Ordering::Relaxed),
            buffered: sessions.iter().map(|s| s.conns.buffered()).sum(),
        }
    }

    /// The connected agents.
    pub fn agents(&self) -> Vec<AgentInfo> {
        self.shared
            .sessions()
            .iter()
            .map(|s| AgentInfo {
                id: s.id.clone(),
                identifiers: s.identifiers.clone(),
                draining: s.draining.load(Ordering::Acquire),
                connections: s.conns.len(),
                flow_control: s.flow.peer.is_some(),
            })
            .collect()
    }

    /// Dials `address` (`host:port`) through an agent, from inside this process. The
    /// returned stream carries the connection; dropping it closes the connection.
    pub async fn dial(&self, address: &str) -> Result<tokio::io::DuplexStream, DialError> {
        let end = self.shared.dial(address).await?;
        let (ours, theirs) = tokio::io::duplex(proto::MAX_CHUNK * 2);
        tokio::spawn(conn::pump(ours, Bytes::new(), end, Role::Dialer));
        Ok(theirs)
    }

    /// Serves `AgentService` to agents on `listener` with mTLS (`tls` must require client
    /// certificates, as [`crate::tls::agent_listener`] does) until `shutdown` completes.
    pub async fn serve_agents(
        &self,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServerError> {
        let (tx, rx) = mpsc::channel::<Result<AgentIo, std::io::Error>>(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let shared = self.shared.clone();
        let stop_accepting = Arc::new(tokio::sync::Notify::new());
        let stop = stop_accepting.clone();
        let accept = tokio::spawn(async move {
            loop {
                // The listener is dropped (the port freed) as soon as shutdown begins, not
                // when the last agent connection has drained.
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stop.notified() => return,
                };
                let Ok((tcp, addr)) = accepted else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let shared = shared.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let deadline = shared.config.handshake_timeout;
                    let tls = match tokio::time::timeout(deadline, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            shared.refused.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(%addr, error = %e, "agent TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            shared.refused.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    };
                    let cn = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| crate::tls::common_name(c));
                    if let Some(want) = &shared.config.agent_common_name {
                        if cn.as_deref() != Some(want.as_str()) {
                            shared.refused.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(%addr, ?cn, "client certificate is not an agent's; refused");
                            return;
                        }
                    }
                    let _ = tx.send(Ok(AgentIo { tls, cn })).await;
                });
            }
        });
        let c = &self.shared.config;
        // Ending the agent streams lets tonic's graceful shutdown finish and tells agents to
        // reconnect (to another replica, or to this one once it is back).
        let shutdown = {
            let shared = self.shared.clone();
            let stop = stop_accepting.clone();
            async move {
                shutdown.await;
                stop.notify_one();
                let sessions: Vec<Arc<Session>> = shared.sessions().clone();
                for s in sessions {
                    shared.unregister(&s);
                }
            }
        };
        let result = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(c.keepalive_interval))
            .http2_keepalive_timeout(Some(c.keepalive_timeout))
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(8 << 20))
            // Agents may send DATA frames as large as our chunks instead of 16 KiB pieces.
            .max_frame_size(Some(grpc::MAX_FRAME))
            .add_service(Endpoint(AgentEndpoint {
                shared: self.shared.clone(),
            }))
            .serve_with_incoming_shutdown(tokio_stream::wrappers::ReceiverStream::new(rx), shutdown)
            .await
            .map_err(ServerError::Grpc);
        stop_accepting.notify_one();
        let _ = accept.await;
        result
    }

    /// Serves the gRPC `ProxyService` frontend on a unix socket until `shutdown` completes.
    pub async fn serve_proxy_grpc(
        &self,
        listener: UnixListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServerError> {
        // A Proxy stream lives as long as kube-apiserver keeps it, so tonic's graceful
        // shutdown would wait for them forever: shutdown ends them (closing their
        // connections) with a clean grpc-status.
        let stopped = tokio_util::sync::CancellationToken::new();
        // Cancels when `shutdown` completes, and when the server ends without it.
        let guard = stopped.clone().drop_guard();
        let shutdown = async move {
            shutdown.await;
            drop(guard);
        };
        tonic::transport::Server::builder()
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(8 << 20))
            .max_frame_size(Some(grpc::MAX_FRAME))
            .add_service(Endpoint(ProxyEndpoint {
                shared: self.shared.clone(),
                stopped,
            }))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                shutdown,
            )
            .await
            .map_err(ServerError::Grpc)
    }

    /// Serves the HTTP CONNECT frontend until `shutdown` completes.
    pub async fn serve_connect(
        &self,
        listener: ConnectListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServerError> {
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            match &listener {
                ConnectListener::Unix(l) => {
                    let conn = tokio::select! {
                        c = l.accept() => c,
                        _ = &mut shutdown => return Ok(()),
                    };
                    let Ok((stream, _)) = conn else { continue };
                    let shared = self.shared.clone();
                    tokio::spawn(async move { serve_connect_one(&shared, stream).await });
                }
                ConnectListener::Tls(l, tls) => {
                    let conn = tokio::select! {
                        c = l.accept() => c,
                        _ = &mut shutdown => return Ok(()),
                    };
                    let Ok((tcp, addr)) = conn else { continue };
                    let _ = tcp.set_nodelay(true);
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
                    let shared = self.shared.clone();
                    tokio::spawn(async move {
                        let deadline = shared.config.handshake_timeout;
                        match tokio::time::timeout(deadline, acceptor.accept(tcp)).await {
                            Ok(Ok(stream)) => serve_connect_one(&shared, stream).await,
                            Ok(Err(e)) => {
                                shared.refused.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(%addr, error = %e, "CONNECT client TLS handshake refused");
                            }
                            Err(_) => {
                                shared.refused.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                }
            }
        }
    }
}

async fn serve_connect_one<S>(shared: &Shared, mut stream: S)
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let head = tokio::time::timeout(
        shared.config.handshake_timeout,
        connect::read_request(&mut stream),
    )
    .await;
    let (request, rest) = match head {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let status = match e {
                connect::ConnectError::Method(_) => 405,
                connect::ConnectError::Incomplete | connect::ConnectError::Io(_) => return,
                _ => 400,
            };
            let _ = stream
                .write_all(&connect::error_response(status, &e.to_string()))
                .await;
            return;
        }
        Err(_) => return,
    };
    match shared.dial(&request.address).await {
        Ok(end) => {
            if stream.write_all(connect::ESTABLISHED).await.is_err() {
                return;
            }
            conn::pump(stream, rest, end, Role::Dialer).await;
        }
        Err(e) => {
            let _ = stream
                .write_all(&connect::error_response(e.http_status(), &e.to_string()))
                .await;
            let _ = stream.shutdown().await;
        }
    }
}

/// An agent's TLS connection, with the identity tonic hands to the service.
struct AgentIo {
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    cn: Option<String>,
}

/// The verified identity of an agent connection.
#[derive(Debug, Clone)]
struct AgentPeer {
    cn: Option<String>,
}

impl tonic::transport::server::Connected for AgentIo {
    type ConnectInfo = AgentPeer;
    fn connect_info(&self) -> AgentPeer {
        AgentPeer {
            cn: self.cn.clone(),
        }
    }
}

impl AsyncRead for AgentIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for AgentIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

/// `AgentService` as a plain HTTP service: the link frames gRPC itself ([`crate::grpc`]) so
/// DATA payloads are not copied by a codec.
#[derive(Clone)]
struct AgentEndpoint {
    shared: Arc<Shared>,
}

/// The one method of `AgentService`.
const AGENT_CONNECT_PATH: &str = "/AgentService/Connect";

impl Method for AgentEndpoint {
    const SERVICE: &'static str = "AgentService";

    fn answer(
        &self,
        request: http::Request<tonic::body::Body>,
    ) -> Result<http::Response<tonic::body::Body>, Status> {
        self.connect(request)
    }
}

/// A gRPC service with one streaming method, answered as plain HTTP so [`crate::grpc`]
/// frames its messages; [`Endpoint`] makes it a service tonic's server can route to.
trait Method: Clone + Send + 'static {
    /// The service name (the first path segment).
    const SERVICE: &'static str;

    /// The response to a call, or the status that refuses it.
    fn answer(
        &self,
        request: http::Request<tonic::body::Body>,
    ) -> Result<http::Response<tonic::body::Body>, Status>;
}

#[derive(Clone)]
struct Endpoint<M>(M);

impl<M: Method> tonic::server::NamedService for Endpoint<M> {
    const NAME: &'static str = M::SERVICE;
}

impl<M: Method> tower::Service<http::Request<tonic::body::Body>> for Endpoint<M> {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        std::future::ready(Ok(self.0.answer(request).unwrap_or_else(Status::into_http)))
    }
}

/// Refuses a call to anything but `path`, or one whose messages would be compressed.
fn check_call(request: &http::Request<tonic::body::Body>, path: &str) -> Result<(), Status> {
    if request.uri().path() != path {
        return Err(Status::unimplemented(format!(
            "no method {}",
            request.uri().path()
        )));
    }
    if header_str(request.headers(), "grpc-encoding").is_some_and(|e| e != "identity") {
        return Err(Status::unimplemented(
            "compressed streams are not supported",
        ));
    }
    Ok(())
}

fn header_str<'a>(headers: &'a http::HeaderMap, key: &str) -> Option<&'a str> {
    headers.get(key).and_then(|v| v.to_str().ok())
}

impl AgentEndpoint {
    fn connect(
        &self,
        request: http::Request<tonic::body::Body>,
    ) -> Result<http::Response<tonic::body::Body>, Status> {
        check_call(&request, AGENT_CONNECT_PATH)?;
        let md = request.headers();
        let id = header_str(md, proto::AGENT_ID)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Status::invalid_argument("missing agentID metadata"))?
            .to_string();
        let identifiers = match header_str(md, proto::AGENT_IDENTIFIERS) {
            Some(q) => Identifiers::parse(q)
                .map_err(|e| Status::invalid_argument(format!("agentIdentifiers: {e}")))?,
            None => Identifiers::default(),
        };
        let peer_window = header_str(md, proto::FLOW_WINDOW).and_then(|w| w.parse().ok());
        let flow = Flow::negotiated(self.shared.config.flow_window, peer_window);
        let cn = request
            .extensions()
            .get::<AgentPeer>()
            .and_then(|p| p.cn.clone());
        let (link, outbound) = Link::new();
        let session = Arc::new(Session {
            serial: self.shared.serial.fetch_add(1, Ordering::Relaxed),
            id: id.clone(),
            identifiers,
            link,
            flow,
            draining: AtomicBool::new(false),
            conns: ConnTable::new(self.shared.open.clone()),
            dials: Mutex::default(),
            ended: tokio_util::sync::CancellationToken::new(),
        });
        tracing::info!(agent = %id, ?cn, flow_control = flow.peer.is_some(), "agent connected");
        self.shared.register(session.clone());
        let mut inbound = grpc::PacketReader::new(request.into_body());
        let shared = self.shared.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = inbound.next() => next,
                    _ = session.ended.cancelled() => break,
                };
                match next {
                    Ok(Some(packet)) => match Frame::try_from(packet) {
                        Ok(frame) => shared.on_agent_frame(&session, frame),
                        Err(e) => {
                            tracing::warn!(agent = %session.id, error = %e, "malformed packet from agent; ignored")
                        }
                    },
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(agent = %session.id, error = %e, "agent stream failed");
                        break;
                    }
                }
            }
            tracing::info!(agent = %session.id, "agent disconnected");
            shared.unregister(&session);
        });
        let mut response = grpc::response(outbound);
        let md = response.headers_mut();
        if let Ok(v) = http::HeaderValue::from_str(&self.shared.config.server_id) {
            md.insert(proto::SERVER_ID, v);
        }
        md.insert(proto::SERVER_COUNT, self.shared.config.server_count.into());
        if let Some(window) = flow.own {
            md.insert(proto::FLOW_WINDOW, window.initial.into());
        }
        Ok(response)
    }
}

/// `ProxyService` as a plain HTTP service, framed by [`crate::grpc`] like the agent link, so
/// a DATA payload from kube-apiserver reaches the agent link, and one from the agent
/// reaches kube-apiserver, without being copied.
#[derive(Clone)]
struct ProxyEndpoint {
    shared: Arc<Shared>,
    /// Cancelled when the frontend shuts down.
    stopped: tokio_util::sync::CancellationToken,
}

/// The one method of `ProxyService`.
const PROXY_PATH: &str = "/ProxyService/Proxy";

/// Packets queued toward one gRPC frontend stream before its forwarders wait (HTTP/2 flow
/// control then pushes back per stream).
const FRONTEND_QUEUE: usize = 64;

impl Method for ProxyEndpoint {
    const SERVICE: &'static str = "ProxyService";

    fn answer(
        &self,
        request: http::Request<tonic::body::Body>,
    ) -> Result<http::Response<tonic::body::Body>, Status> {
        self.proxy(request)
    }
}

impl ProxyEndpoint {
    fn proxy(
        &self,
        request: http::Request<tonic::body::Body>,
    ) -> Result<http::Response<tonic::body::Body>, Status> {
        check_call(&request, PROXY_PATH)?;
        let (tx, rx) = mpsc::channel::<Packet>(FRONTEND_QUEUE);
        let shared = self.shared.clone();
        let stopped = self.stopped.clone();
        let mut inbound = grpc::PacketReader::new(request.into_body());
        tokio::spawn(async move {
            let mut frontend = GrpcFrontend {
                shared,
                tx,
                conns: HashMap::new(),
                dials: HashMap::new(),
                next_id: 0,
            };
            let (done_tx, mut done_rx) = mpsc::unbounded_channel::<GrpcEvent>();
            loop {
                tokio::select! {
                    msg = inbound.next() => match msg {
                        Ok(Some(packet)) => match Frame::try_from(packet) {
                            Ok(frame) => frontend.on_frame(frame, &done_tx).await,
                            Err(e) => tracing::debug!(error = %e, "malformed packet from a frontend; ignored"),
                        },
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(error = %e, "frontend stream failed");
                            break;
                        }
                    },
                    Some(ev) = done_rx.recv() => frontend.on_event(ev, &done_tx).await,
                    _ = stopped.cancelled() => break,
                }
            }
            frontend.close_all().await;
        });
        Ok(grpc::response(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }
}

/// Results reported back to a gRPC frontend's loop by its dial and forwarder tasks.
enum GrpcEvent {
    Dialed {
        random: i64,
        result: Result<ConnEnd, DialError>,
    },
    Closed {
        id: i64,
    },
}

struct FrontendConn {
    /// Toward the agent, under the agent's connect id.
    sender: conn::Sender,
    forwarder: tokio::task::JoinHandle<()>,
}

struct GrpcFrontend {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Packet>,
    conns: HashMap<i64, FrontendConn>,
    dials: HashMap<i64, tokio::task::JoinHandle<()>>,
    next_id: i64,
}

impl GrpcFrontend {
    async fn send(&self, frame: Frame) {
        let _ = self.tx.send(frame.into()).await;
    }

    async fn on_frame(&mut self, frame: Frame, events: &mpsc::UnboundedSender<GrpcEvent>) {
        match frame {
            Frame::DialRequest {
                address, random, ..
            } => {
                let shared = self.shared.clone();
                let events = events.clone();
                let task = tokio::spawn(async move {
                    let result = shared.dial(&address).await;
                    let _ = events.send(GrpcEvent::Dialed { random, result });
                });
                self.dials.insert(random, task);
            }
            Frame::CloseDial { random } => {
                if let Some(t) = self.dials.remove(&random) {
                    t.abort();
                }
            }
            Frame::Data {
                connect_id, data, ..
            } => {
                let Some(c) = self.conns.get(&connect_id) else {
                    return;
                };
                // A closed connection or a gone agent ends this connection only; the
                // frontend learns of it from the close that follows.
                let _ = c.sender.data(data).await;
            }
            Frame::CloseRequest { connect_id } => {
                if let Some(c) = self.conns.get(&connect_id) {
                    c.sender.close().await;
                }
            }
            other => tracing::debug!(?other, "unexpected packet from a frontend; ignored"),
        }
    }

    async fn on_event(&mut self, ev: GrpcEvent, events: &mpsc::UnboundedSender<GrpcEvent>) {
        match ev {
            GrpcEvent::Dialed { random, result } => {
                self.dials.remove(&random);
                match result {
                    Ok(end) => {
                        self.next_id += 1;
                        let id = self.next_id;
                        let sender = end.sender();
                        let tx = self.tx.clone();
                        let events = events.clone();
                        let forwarder = tokio::spawn(async move {
                            forward_to_frontend(end, id, tx).await;
                            let _ = events.send(GrpcEvent::Closed { id });
                        });
                        self.conns.insert(id, FrontendConn { sender, forwarder });
                        self.send(Frame::DialResponse {
                            random,
                            connect_id: id,
                            error: String::new(),
                        })
                        .await;
                    }
                    Err(e) => {
                        self.send(Frame::DialResponse {
                            random,
                            connect_id: 0,
                            error: e.to_string(),
                        })
                        .await;
                    }
                }
            }
            GrpcEvent::Closed { id } => {
                self.conns.remove(&id);
            }
        }
    }

    async fn close_all(&mut self) {
        for (_, t) in self.dials.drain() {
            t.abort();
        }
        for (_, c) in self.conns.drain() {
            c.forwarder.abort();
            c.sender.close_now();
        }
    }
}

/// Forwards one connection's bytes from the agent to a gRPC frontend stream, returning
/// credit to the agent as the frontend's HTTP/2 stream accepts them.
async fn forward_to_frontend(mut end: ConnEnd, id: i64, tx: mpsc::Sender<Packet>) {
    while let Some(msg) = end.recv().await {
        match msg {
            conn::Inbound::Data(data) => {
                let len = data.len();
                let packet = Frame::Data {
                    connect_id: id,
                    data,
                    error: String::new(),
                };
                if tx.send(packet.into()).await.is_err() {
                    return;
                }
                end.consumed(len);
            }
            conn::Inbound::Close => {
                let _ = tx
                    .send(
                        Frame::CloseResponse {
                            connect_id: id,
                            error: String::new(),
                        }
                        .into(),
                    )
                    .await;
                return;
            }
        }
    }
}
