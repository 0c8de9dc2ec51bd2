//! The agent: runs on the worker side, dials out to the proxy servers over mTLS, advertises
//! its identifiers, keeps one connection per distinct server replica until it holds the
//! advertised server count, reconnects with jittered backoff, dials backends on the server's
//! behalf (with a timeout), and sends DRAIN before it shuts down.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};

use crate::conn::{self, ConnTable, Flow, Role};
use crate::grpc;
use crate::link::Link;
use crate::proto::{self, Frame, Identifiers};

/// The agent's settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Server addresses (`host:port`), tried in turn; one address behind a load balancer
    /// reaches every replica, as with Konnectivity.
    pub servers: Vec<String>,
    /// The name the server certificate must carry (default: the host of each address).
    pub server_name: Option<String>,
    /// mTLS client configuration ([`crate::tls::agent_client`]).
    pub tls: Arc<rustls::ClientConfig>,
    /// The agent's id (`agentID`).
    pub agent_id: String,
    /// What the agent can reach (`agentIdentifiers`).
    pub identifiers: Identifiers,
    /// Deadline for dialing a backend.
    pub dial_timeout: Duration,
    /// Deadline for connecting to a server (TCP, TLS and the stream's headers).
    pub connect_timeout: Duration,
    /// How often to look for a server replica not yet connected.
    pub sync_interval: Duration,
    /// First reconnect delay after a failure (doubled per failure, jittered).
    pub backoff_initial: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// HTTP/2 ping interval toward servers.
    pub keepalive_interval: Duration,
    /// How long an unanswered ping may take before the connection is dropped.
    pub keepalive_timeout: Duration,
    /// The largest receive window per connection with servers that do flow control (default
    /// [`crate::proto::DEFAULT_FLOW_WINDOW`]); windows start at
    /// [`crate::proto::INITIAL_FLOW_WINDOW`] and grow while the backend keeps up.
    pub flow_window: u32,
    /// On shutdown, how long open connections may finish after DRAIN.
    pub drain_grace: Duration,
}

impl AgentConfig {
    /// Defaults for an agent `agent_id` connecting to `servers`.
    pub fn new(
        servers: Vec<String>,
        tls: Arc<rustls::ClientConfig>,
        agent_id: impl Into<String>,
    ) -> Self {
        AgentConfig {
            servers,
            server_name: None,
            tls,
            agent_id: agent_id.into(),
            identifiers: Identifiers::default(),
            dial_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            sync_interval: Duration::from_secs(1),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            flow_window: proto::DEFAULT_FLOW_WINDOW,
            drain_grace: Duration::from_secs(10),
        }
    }
}

/// Connecting to a server failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// No server address configured.
    #[error("no server address configured")]
    NoServers,
    /// The TLS server name is not a valid DNS name or IP address.
    #[error("invalid server name {0:?}")]
    ServerName(String),
    /// The TCP connection or the TLS handshake failed.
    #[error("connecting to {server}")]
    Connect {
        /// The server address.
        server: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP/2 connection failed (handshake, or carrying the Connect call).
    #[error("HTTP/2 with {server}")]
    Http {
        /// The server address.
        server: String,
        /// Why.
        #[source]
        source: hyper::Error,
    },
    /// The server refused or failed the Connect stream.
    #[error("opening the Connect stream on {server}")]
    Stream {
        /// The server address.
        server: String,
        /// The server's status.
        #[source]
        source: tonic::Status,
    },
    /// The server did not answer in time.
    #[error("{server} did not answer within {after:?}")]
    Timeout {
        /// The server address.
        server: String,
        /// The deadline.
        after: Duration,
    },
}

/// Counters for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentStats {
    /// Server replicas connected.
    pub servers: usize,
    /// The server count the servers advertised.
    pub server_count: u32,
    /// Backend connections open.
    pub connections: usize,
    /// Backend dials that succeeded.
    pub dials_ok: u64,
    /// Backend dials that failed.
    pub dials_failed: u64,
    /// Failed attempts to connect to a server.
    pub connect_failures: u64,
}

struct Session {
    server_id: String,
    link: Link,
}

struct Shared {
    config: AgentConfig,
    sessions: Mutex<HashMap<String, Session>>,
    draining: AtomicBool,
    open: Arc<AtomicUsize>,
    next_connect_id: AtomicI64,
    server_count: AtomicUsize,
    dials_ok: AtomicU64,
    dials_failed: AtomicU64,
    connect_failures: AtomicU64,
    changed: watch::Sender<()>,
}

impl Shared {
    fn sessions(&self) -> MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running agent. Dropping it stops it without draining; call [`Agent::shutdown`] to
/// drain first.
pub struct Agent {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("agent_id", &self.shared.config.agent_id)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
        for s in self.shared.sessions().values() {
            s.link.end();
        }
    }
}

impl Agent {
    /// Starts the agent on the current runtime; it connects in the background.
    pub fn start(config: AgentConfig) -> Result<Agent, AgentError> {
        if config.servers.is_empty() {
            return Err(AgentError::NoServers);
        }
        let (stop, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            config,
            sessions: Mutex::default(),
            draining: AtomicBool::new(false),
            open: Arc::new(AtomicUsize::new(0)),
            next_connect_id: AtomicI64::new(1),
            server_count: AtomicUsize::new(1),
            dials_ok: AtomicU64::new(0),
            dials_failed: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            changed: watch::channel(()).0,
        });
        let task = tokio::spawn(run(shared.clone(), stop_rx));
        Ok(Agent { shared, stop, task })
    }

    /// The ids of the server replicas connected now.
    pub fn servers(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.shared.sessions().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Counters.
    pub fn stats(&self) -> AgentStats {
        AgentStats {
            servers: self.shared.sessions().len(),
            server_count: self.shared.server_count.load(Ordering::Relaxed) as u32,
            connections: self.shared.open.load(Ordering::Relaxed),
            dials_ok: self.shared.dials_ok.load(Ordering::Relaxed),
            dials_failed: self.shared.dials_failed.load(Ordering::Relaxed),
            connect_failures: self.shared.connect_failures.load(Ordering::Relaxed),
        }
    }

    /// Waits until `n` server replicas are connected; false after `timeout`.
    pub async fn wait_connected(&self, n: usize, timeout: Duration) -> bool {
        let mut changed = self.shared.changed.subscribe();
        let wait = async {
            while self.shared.sessions().len() < n {
                if changed.changed().await.is_err() {
                    return false;
                }
            }
            true
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or(false)
    }

    /// Sends DRAIN to every server (and to any it connects to later): no new dials come,
    /// open connections keep working.
    pub fn drain(&self) {
        self.shared.draining.store(true, Ordering::Release);
        for s in self.shared.sessions().values() {
            s.link.control(Frame::Drain);
        }
    }

    /// Drains, lets open connections finish for up to the drain grace, then disconnects.
    pub async fn shutdown(self) {
        self.drain();
        let grace = tokio::time::Instant::now() + self.shared.config.drain_grace;
        while self.shared.open.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < grace {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.stop.send(true);
        // Drop ends every link, which closes the streams cleanly.
    }
}

fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    // Between 50% and 150% of d, so a fleet of agents does not reconnect in lockstep.
    let f = 0.5 + f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX);
    d.mul_f64(f)
}

enum Connected {
    New,
    Duplicate,
}

async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<()>();
    let mut backoff = shared.config.backoff_initial;
    let mut next = 0usize;
    loop {
        if *stop.borrow() {
            break;
        }
        let have = shared.sessions().len();
        let want = shared.server_count.load(Ordering::Relaxed);
        let delay = if have < want {
            let addr = shared.config.servers[next % shared.config.servers.len()].clone();
            next += 1;
            match connect_once(&shared, &addr, ended_tx.clone()).await {
                Ok(Connected::New) => {
                    backoff = shared.config.backoff_initial;
                    Duration::ZERO
                }
                Ok(Connected::Duplicate) => jitter(shared.config.sync_interval),
                Err(e) => {
                    shared.connect_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(server = %addr, error = %e, "connecting to the proxy server failed");
                    let d = jitter(backoff);
                    backoff = (backoff * 2).min(shared.config.backoff_max);
                    d
                }
            }
        } else {
            shared.config.sync_interval
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = ended_rx.recv() => {}
            _ = stop.changed() => {}
        }
    }
    for s in shared.sessions().values() {
        s.link.end();
    }
}

async fn connect_once(
    shared: &Arc<Shared>,
    addr: &str,
    ended: mpsc::UnboundedSender<()>,
) -> Result<Connected, AgentError> {
    let c = &shared.config;
    let host = c.server_name.clone().unwrap_or_else(|| {
        let h = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        h.trim_start_matches('[').trim_end_matches(']').to_string()
    });
    let name = ServerName::try_from(host.clone()).map_err(|_| AgentError::ServerName(host))?;
    let tls = tokio_rustls::TlsConnector::from(c.tls.clone());
    let failed = |source| AgentError::Connect {
        server: addr.into(),
        source,
    };
    let http = |source| AgentError::Http {
        server: addr.into(),
        source,
    };
    let connect = async {
        let tcp = TcpStream::connect(addr).await.map_err(failed)?;
        tcp.set_nodelay(true).map_err(failed)?;
        let stream = tls.connect(name, tcp).await.map_err(failed)?;
        // hyper's HTTP/2 rather than tonic's Channel: it lets the server send frames as large
        // as a DATA chunk, so uploads arrive whole instead of in 16 KiB pieces to reassemble.
        let (mut send, connection) = grpc::client_builder()
            .timer(TokioTimer::new())
            .keep_alive_interval(c.keepalive_interval)
            .keep_alive_timeout(c.keepalive_timeout)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        // Dropped (timeout, refusal, session end): the connection goes with it.
        let driver = AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection to the proxy server ended");
            }
        }));
        let (link, outbound) = Link::new();
        let mut request =
            grpc::request("http://konnectivity.invalid/AgentService/Connect", outbound);
        let md = request.headers_mut();
        if let Ok(v) = http::HeaderValue::from_str(&c.agent_id) {
            md.insert(proto::AGENT_ID, v);
        }
        if let Ok(v) = http::HeaderValue::from_str(&c.identifiers.to_string()) {
            md.insert(proto::AGENT_IDENTIFIERS, v);
        }
        md.insert(
            proto::FLOW_WINDOW,
            conn::Window::up_to(c.flow_window).initial.into(),
        );
        let call = async {
            send.ready().await.map_err(http)?;
            let response = send.send_request(request).await.map_err(http)?;
            grpc::accepted(response).map_err(|source| AgentError::Stream {
                server: addr.into(),
                source,
            })
        };
        Ok::<_, AgentError>((driver, link, call.await?))
    };
    let (driver, link, response) = tokio::time::timeout(c.connect_timeout, connect)
        .await
        .map_err(|_| AgentError::Timeout {
            server: addr.into(),
            after: c.connect_timeout,
        })??;
    let md = response.headers();
    let get = |k: &str| md.get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
    let server_id = get(proto::SERVER_ID).unwrap_or_else(|| addr.to_string());
    let count: usize = get(proto::SERVER_COUNT)
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    shared.server_count.store(count, Ordering::Relaxed);
    let peer_window = get(proto::FLOW_WINDOW).and_then(|v| v.parse().ok());
    let flow = Flow::negotiated(c.flow_window, peer_window);
    {
        let mut sessions = shared.sessions();
        if sessions.contains_key(&server_id) {
            link.end();
            return Ok(Connected::Duplicate);
        }
        sessions.insert(
            server_id.clone(),
            Session {
                server_id: server_id.clone(),
                link: link.clone(),
            },
        );
    }
    tracing::info!(server = %addr, %server_id, server_count = count, flow_control = flow.peer.is_some(), "connected to proxy server");
    if shared.draining.load(Ordering::Acquire) {
        link.control(Frame::Drain);
    }
    shared.changed.send_replace(());
    let shared = shared.clone();
    let inbound = grpc::PacketReader::new(tonic::body::Body::new(response.into_body()));
    tokio::spawn(async move {
        serve_session(&shared, inbound, link, flow).await;
        let removed = shared.sessions().remove(&server_id);
        if let Some(s) = removed {
            tracing::info!(server_id = %s.server_id, "disconnected from proxy server");
        }
        shared.changed.send_replace(());
        drop(driver);
        let _ = ended.send(());
    });
    Ok(Connected::New)
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn serve_session(
    shared: &Arc<Shared>,
    mut inbound: grpc::PacketReader,
    link: Link,
    flow: Flow,
) {
    let conns = ConnTable::new(shared.open.clone());
    let pending: Arc<Mutex<HashMap<i64, oneshot::Sender<()>>>> = Arc::default();
    loop {
        let frame = match inbound.next().await {
            Ok(Some(p)) => match Frame::try_from(p) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(error = %e, "malformed packet from the server; ignored");
                    continue;
                }
            },
            Ok(None) | Err(_) => break,
        };
        match frame {
            Frame::DialRequest {
                protocol,
                address,
                random,
            } => {
                let (cancel, cancelled) = oneshot::channel();
                lock(&pending).insert(random, cancel);
                tokio::spawn(dial(
                    shared.clone(),
                    conns.clone(),
                    link.clone(),
                    flow,
                    pending.clone(),
                    protocol,
                    address,
                    random,
                    cancelled,
                ));
            }
            Frame::Data {
                connect_id, data, ..
            } => match conns.with(connect_id, |s| s.deliver(data)) {
                Some(conn::Delivery::Queued) => {}
                // A server without flow control: wait for the backend to take the bytes.
                Some(conn::Delivery::Backlogged(backlog)) => {
                    tokio::select! {
                        _ = backlog.drained() => {}
                        _ = link.closed() => break,
                    }
                }
                Some(conn::Delivery::Overrun) | None => {
                    conns.remove(connect_id);
                    link.control(Frame::CloseResponse {
                        connect_id,
                        error: "unknown or overrun connection".into(),
                    });
                }
            },
            Frame::CloseRequest { connect_id } => {
                if conns.with(connect_id, |s| s.close()).is_none() {
                    link.control(Frame::CloseResponse {
                        connect_id,
                        error: String::new(),
                    });
                }
            }
            Frame::CloseDial { random } => {
                if let Some(c) = lock(&pending).remove(&random) {
                    let _ = c.send(());
                }
            }
            Frame::Window { connect_id, bytes } => {
                conns.with(connect_id, |s| s.grant(bytes));
            }
            other => tracing::debug!(?other, "unexpected packet from the server; ignored"),
        }
    }
    lock(&pending).clear();
    conns.close_all();
    link.end();
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[allow(clippy::too_many_arguments)]
async fn dial(
    shared: Arc<Shared>,
    conns: Arc<ConnTable>,
    link: Link,
    flow: Flow,
    pending: Arc<Mutex<HashMap<i64, oneshot::Sender<()>>>>,
    protocol: String,
    address: String,
    random: i64,
    cancelled: oneshot::Receiver<()>,
) {
    let fail = |error: String| {
        shared.dials_failed.fetch_add(1, Ordering::Relaxed);
        link.control(Frame::DialResponse {
            random,
            connect_id: 0,
            error,
        });
    };
    if protocol != "tcp" && !protocol.is_empty() {
        lock(&pending).remove(&random);
        fail(format!("protocol {protocol:?} not supported (tcp only)"));
        return;
    }
    let timeout = shared.config.dial_timeout;
    let result = tokio::select! {
        r = tokio::time::timeout(timeout, TcpStream::connect(&address)) => r,
        _ = cancelled => {
            tracing::debug!(%address, "dial abandoned by the server");
            return;
        }
    };
    lock(&pending).remove(&random);
    let tcp = match result {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return fail(format!("dial tcp {address}: {e}")),
        Err(_) => return fail(format!("dial tcp {address}: timed out after {timeout:?}")),
    };
    let _ = tcp.set_nodelay(true);
    let connect_id = shared.next_connect_id.fetch_add(1, Ordering::Relaxed);
    let end = conns.open(connect_id, link.clone(), flow);
    shared.dials_ok.fetch_add(1, Ordering::Relaxed);
    link.control(Frame::DialResponse {
        random,
        connect_id,
        error: String::new(),
    });
    conn::pump(tcp, Bytes::new(), end, Role::Agent).await;
}
