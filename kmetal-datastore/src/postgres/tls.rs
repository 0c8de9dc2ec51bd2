//! TLS to PostgreSQL over rustls with ring (the project's one crypto provider): a
//! `MakeTlsConnect` for tokio-postgres.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// Why TLS settings for PostgreSQL are unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgTlsError {
    /// `ca_pem` does not parse as PEM.
    #[error("ca_pem is not PEM")]
    CaPem(#[source] rustls::pki_types::pem::Error),
    /// A certificate in `ca_pem` cannot be a root.
    #[error("ca_pem holds an unusable certificate")]
    CaCert(#[source] rustls::Error),
    /// The provider offers no safe protocol version.
    #[error("no TLS protocol versions")]
    Versions(#[source] rustls::Error),
    /// The client certificate does not parse as PEM.
    #[error("client certificate is not PEM")]
    ClientCert(#[source] rustls::pki_types::pem::Error),
    /// The client key does not parse as PEM.
    #[error("client key is not PEM")]
    ClientKey(#[source] rustls::pki_types::pem::Error),
    /// The client certificate and key do not belong together.
    #[error("client certificate and key do not match")]
    Identity(#[source] rustls::Error),
}

/// TLS settings for the connection to PostgreSQL.
#[derive(Clone)]
pub struct PgTls {
    /// PEM of the CA that signed the server certificate.
    pub ca_pem: String,
    /// Client certificate and key (PEM), for `clientcert=verify-full` servers.
    pub identity: Option<(String, String)>,
}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTls")
            .field("identity", &self.identity.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl PgTls {
    /// The connector for tokio-postgres.
    pub(crate) fn connector(&self) -> Result<RustlsConnect, PgTlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            let c = c.map_err(PgTlsError::CaPem)?;
            roots.add(c).map_err(PgTlsError::CaCert)?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(PgTlsError::Versions)?
            .with_root_certificates(roots);
        let config = match &self.identity {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(PgTlsError::ClientCert)?;
                let key =
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(PgTlsError::ClientKey)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(PgTlsError::Identity)?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(RustlsConnect {
            config: Arc::new(config),
        })
    }
}

/// Makes a TLS connector per connection (tokio-postgres's `MakeTlsConnect`).
#[derive(Clone)]
pub(crate) struct RustlsConnect {
    config: Arc<rustls::ClientConfig>,
}

impl<S> MakeTlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnector;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnector, Self::Error> {
        Ok(RustlsConnector {
            connector: tokio_rustls::TlsConnector::from(self.config.clone()),
            name: ServerName::try_from(domain.to_string())?,
        })
    }
}

/// Connects one socket.
pub(crate) struct RustlsConnector {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsConnector
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            self.connector
                .connect(self.name, stream)
                .await
                .map(RustlsStream)
        })
    }
}

/// An established TLS stream.
pub(crate) struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM without channel binding, as with libpq's default `channel_binding=prefer`
        // against a server that does not offer it.
        ChannelBinding::none()
    }
}
