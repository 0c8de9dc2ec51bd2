//! The etcd v3 gateway: etcd's gRPC API (KV, Watch, Lease, Maintenance.Status/Alarm,
//! Cluster.MemberList) over any [`Datastore`], wire-compatible with etcd's protos, so a real
//! kube-apiserver, `etcdctl` or any etcd client runs on memory, SQLite, PostgreSQL or etcd.
//!
//! Errors carry etcd's gRPC codes and `etcdserver: …` messages, so clients react as they do
//! to etcd (retry on unavailable, relist on compacted). Services etcd has and the gateway
//! does not implement answer `Unimplemented` at once.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use kmetal_datastore::MemoryStore;
//! use kmetal_datastore::gateway::{Gateway, Listen};
//! let gateway = Gateway::new(Arc::new(MemoryStore::new()));
//! gateway.serve(Listen::Tcp("127.0.0.1:2379".parse()?), None, std::future::pending()).await?;
//! # Ok(()) }
//! ```

mod convert;
mod services;
mod tls;

pub use tls::TlsHandle;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use etcd_client::proto::{
    PbClusterServer, PbKvServer, PbLeaseServer, PbMaintenanceServer, PbWatchServer,
};
use tonic::transport::Server;

use crate::store::Datastore;
use convert::Identity;
use services::Backend;

/// Where the gateway listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A unix socket path (removed first if it exists), how a hosted control plane wires the
    /// gateway next to its api-server. etcd clients from 3.5 on (kube-apiserver's) dial it
    /// fine; etcdctl 3.4 sends the socket path as HTTP/2 `:authority`, which is refused.
    Unix(PathBuf),
}

impl std::str::FromStr for Listen {
    type Err = std::net::AddrParseError;

    /// `host:port` or `unix:///path`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.strip_prefix("unix://") {
            Some(path) => Ok(Self::Unix(PathBuf::from(path))),
            None => s.parse().map(Self::Tcp),
        }
    }
}

/// TLS for the TCP listener: the serving certificate and, for mTLS, the CA client
/// certificates must chain to (from the tenant's PKI).
#[derive(Clone)]
pub struct GatewayTls {
    /// Serving certificate, PEM.
    pub cert_pem: String,
    /// Its key, PEM.
    pub key_pem: String,
    /// Require client certificates signed by this CA (PEM).
    pub client_ca_pem: Option<String>,
}

impl std::fmt::Debug for GatewayTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayTls")
            .field("mtls", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// Why the gateway could not serve.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// Binding the listener failed.
    #[error("cannot listen on {listen}")]
    Bind {
        /// The address.
        listen: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("the gRPC server failed")]
    Serve(#[source] tonic::transport::Error),
    /// A certificate or key of the TLS configuration is not PEM.
    #[error("bad PEM in the {what}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// rustls refused the TLS configuration (a key that does not match its certificate).
    #[error("TLS configuration refused")]
    Tls(#[source] rustls::Error),
    /// The client CA does not make a verifier.
    #[error("the client CA makes no verifier")]
    ClientVerifier(#[source] rustls::server::VerifierBuilderError),
}

/// The gateway for one tenant's store.
#[derive(Clone)]
pub struct Gateway {
    backend: Backend,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway over `store`.
    pub fn new(store: Arc<dyn Datastore>) -> Self {
        Self {
            backend: Backend {
                store,
                id: Identity {
                    cluster_id: 0x6b6d_6574_616c_0001,
                    member_id: 0x6b6d_6574_616c_0002,
                },
                client_urls: Vec::new(),
            },
        }
    }

    fn router(self, client_url: String) -> tonic::transport::server::Router {
        let mut backend = self.backend;
        backend.client_urls = vec![client_url];
        Server::builder()
            .add_service(PbKvServer::new(backend.clone()).max_decoding_message_size(4 << 20))
            .add_service(PbWatchServer::new(backend.clone()))
            .add_service(PbLeaseServer::new(backend.clone()))
            .add_service(PbMaintenanceServer::new(backend.clone()))
            .add_service(PbClusterServer::new(backend))
    }

    /// Serves until `shutdown` completes, then stops accepting and lets open requests finish.
    pub async fn serve(
        self,
        listen: Listen,
        tls: Option<GatewayTls>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), GatewayError> {
        match listen {
            Listen::Tcp(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| GatewayError::Bind {
                        listen: addr.to_string(),
                        source,
                    })?;
                self.serve_on(listener, tls, shutdown).await
            }
            Listen::Unix(path) => {
                let _ = std::fs::remove_file(&path);
                let listener =
                    tokio::net::UnixListener::bind(&path).map_err(|source| GatewayError::Bind {
                        listen: path.display().to_string(),
                        source,
                    })?;
                let router = self.router(format!("unix://{}", path.display()));
                let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
                serve_incoming(
                    router,
                    incoming,
                    tls.map(|t| TlsHandle::new(&t)).transpose()?,
                    shutdown,
                )
                .await
            }
        }
    }

    /// Serves on a listener the caller bound (to port 0, say, learning the port first).
    pub async fn serve_on(
        self,
        listener: tokio::net::TcpListener,
        tls: Option<GatewayTls>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), GatewayError> {
        let tls = tls.map(|t| TlsHandle::new(&t)).transpose()?;
        self.serve_on_with(listener, tls, shutdown).await
    }

    /// [`serve_on`](Self::serve_on) with TLS the caller can replace while it serves
    /// ([`TlsHandle::replace`]): renewed or rotated certificates on the same address.
    pub async fn serve_on_with(
        self,
        listener: tokio::net::TcpListener,
        tls: Option<TlsHandle>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), GatewayError> {
        let addr = listener.local_addr().map_err(|source| GatewayError::Bind {
            listen: "bound listener".into(),
            source,
        })?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let router = self.router(format!("{scheme}://{addr}"));
        // Without TCP_NODELAY small responses wait out Nagle against delayed ACKs:
        // ~40 ms per watch event or list page.
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            |conn| {
                conn.inspect(|s| {
                    let _ = s.set_nodelay(true);
                })
            },
        );
        serve_incoming(router, incoming, tls, shutdown).await
    }
}

/// Serves `incoming` connections, through TLS when there is a handle; with TLS the
/// listener goes as soon as `shutdown` completes.
async fn serve_incoming<S, I>(
    router: tonic::transport::server::Router,
    incoming: I,
    tls: Option<TlsHandle>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), GatewayError>
where
    S: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    I: tokio_stream::Stream<Item = std::io::Result<S>> + Send + Unpin + 'static,
{
    match tls {
        None => router
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .map_err(GatewayError::Serve),
        Some(tls) => {
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let stop = async move {
                let _ = stop_rx.await;
            };
            let shutdown = async move {
                shutdown.await;
                let _ = stop_tx.send(());
            };
            router
                .serve_with_incoming_shutdown(tls::accept(incoming, tls, stop), shutdown)
                .await
                .map_err(GatewayError::Serve)
        }
    }
}
