//! The proxy server: an mTLS agent listener (`AgentService.Connect`), the frontends
//! kube-apiserver can use (gRPC `ProxyService` on a unix socket, HTTP CONNECT on a unix
//! socket or on mTLS TCP), the proxy strategies that pick an agent for a dial, and the
//! bookkeeping that frees every connection when either side goes away.
//!
//! What it does better than Konnectivity's server: a dial with no usable agent fails at once
//! (not after a 30 s backstop); nothing is routed to a draining agent or to one whose
//! connection failed its keepalive; per-connection flow control with our agents; every
//! dial, connection and task is released when a frontend, a backend or an agent goes away.

mod agent_link;
mod authority;
mod config;
mod frontends;
mod registry;
mod service;

pub use config::{ServerConfig, Strategy, StrategyError};
pub use registry::{AgentInfo, DialError, ServerStats};

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;

use self::agent_link::{AgentEndpoint, AgentIo};
use self::authority::AuthorityFix;
use self::frontends::{ProxyEndpoint, serve_connect_one};
use self::registry::{Session, Shared};
use self::service::Endpoint;
use crate::conn::{self, Role};
use crate::grpc;
use crate::proto::{self};

/// Serving a listener failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The gRPC server failed.
    #[error("gRPC server")]
    Grpc(#[source] tonic::transport::Error),
    /// Accepting a connection failed.
    #[error("accept")]
    Accept(#[source] std::io::Error),
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
                tokio_stream::StreamExt::map(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    |c| c.map(AuthorityFix::new),
                ),
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
