//! The gateway's TLS, done here with rustls rather than by tonic so the certificates can be
//! replaced while it serves (renewal, CA rotation): new handshakes use the new ones, open
//! connections keep theirs, the address never changes. The listener is dropped as soon as
//! shutdown begins, so its address is free at once even while watch streams drain.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};

use super::{GatewayError, GatewayTls};

/// How long a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The gateway's TLS configuration, replaceable while it serves.
#[derive(Clone)]
pub struct TlsHandle(Arc<RwLock<Arc<rustls::ServerConfig>>>);

impl std::fmt::Debug for TlsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsHandle").finish_non_exhaustive()
    }
}

impl TlsHandle {
    /// A handle serving `tls`.
    pub fn new(tls: &GatewayTls) -> Result<Self, GatewayError> {
        Ok(Self(Arc::new(RwLock::new(server_config(tls)?))))
    }

    /// Serves `tls` from the next handshake on; a configuration that does not build is
    /// refused and the current one stays.
    pub fn replace(&self, tls: &GatewayTls) -> Result<(), GatewayError> {
        let config = server_config(tls)?;
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(())
    }

    fn current(&self) -> Arc<rustls::ServerConfig> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn server_config(tls: &GatewayTls) -> Result<Arc<rustls::ServerConfig>, GatewayError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let pem = |what: &'static str| move |source| GatewayError::Pem { what, source };
    let chain = CertificateDer::pem_slice_iter(tls.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem("serving certificate"))?;
    let key = PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes()).map_err(pem("serving key"))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(GatewayError::Tls)?;
    let builder = match &tls.client_ca_pem {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                roots
                    .add(cert.map_err(pem("client CA"))?)
                    .map_err(GatewayError::Tls)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(GatewayError::ClientVerifier)?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(GatewayError::Tls)?;
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A connection after its handshake, as tonic takes it.
pub(super) struct TlsIo<S>(tokio_rustls::server::TlsStream<S>);

impl<S> tonic::transport::server::Connected for TlsIo<S> {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// Accepts from `incoming` until `stop` completes (then drops it, freeing the address),
/// shaking hands with the configuration current at each accept, off the accept loop so a
/// slow client holds up no other.
pub(super) fn accept<S, I>(
    incoming: I,
    tls: TlsHandle,
    stop: impl Future<Output = ()> + Send + 'static,
) -> impl Stream<Item = std::io::Result<TlsIo<S>>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    I: Stream<Item = std::io::Result<S>> + Send + Unpin + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut incoming = incoming;
        let mut stop = std::pin::pin!(stop);
        loop {
            let next = tokio::select! {
                n = incoming.next() => n,
                () = &mut stop => return,
            };
            let Some(Ok(conn)) = next else {
                if next.is_none() {
                    return;
                }
                continue;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Ok(Ok(stream)) =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(conn)).await
                {
                    let _ = tx.send(Ok(TlsIo(stream))).await;
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
