//! A small HTTP/1.1 client for the control-plane components: over plain TCP or rustls, with the
//! tenant's CA and client certificate.
//!
//! - [`Client`] (here): one request per connection (`Connection: close`), for health checks
//!   and an object or two (the runtime's `/readyz` and Lease probes).
//! - [`Session`] (`session.rs`): a kept-alive connection for load (benchmarks send thousands
//!   of requests, as client-go does over connections it keeps), and [`Lines`], a streamed
//!   body read line by line (a watch).

mod session;

pub use session::{Lines, Session};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// A PEM certificate or key did not parse.
    #[error("bad PEM in {what}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The name to verify the server for is neither a DNS name nor an IP address.
    #[error("`{name}` is not a server name")]
    ServerName {
        /// The name given.
        name: String,
    },
    /// The TLS configuration was refused (a key that does not match, no usable root).
    #[error("TLS configuration refused")]
    Tls(#[source] rustls::Error),
    /// Connecting, the handshake, writing or reading failed.
    #[error("request to {addr} failed")]
    Io {
        /// The server.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The request took longer than allowed.
    #[error("request to {addr} timed out after {timeout:?}")]
    Timeout {
        /// The server.
        addr: SocketAddr,
        /// The limit.
        timeout: Duration,
    },
    /// The answer was not an HTTP/1.1 response we can read.
    #[error("malformed HTTP response from {addr}: {what}")]
    Malformed {
        /// The server.
        addr: SocketAddr,
        /// What was wrong.
        what: &'static str,
    },
    /// The method or path does not make a request.
    #[error("not a request")]
    Request {
        /// Why.
        #[source]
        source: http::Error,
    },
    /// A kept-alive exchange failed (the connection closed, a malformed frame).
    #[error("exchange with {addr} failed")]
    Exchange {
        /// The server.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: hyper::Error,
    },
}

/// A response: status code and the whole body (chunked encoding undone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// How a [`Client`] reaches its server.
#[derive(Clone)]
enum Transport {
    Plain,
    Tls {
        connector: TlsConnector,
        name: ServerName<'static>,
    },
}

/// A client for one server address.
#[derive(Clone)]
pub struct Client {
    addr: SocketAddr,
    transport: Transport,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.addr)
            .field("tls", &matches!(self.transport, Transport::Tls { .. }))
            .finish()
    }
}

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

impl Client {
    /// Plain HTTP (Konnectivity's health and admin ports).
    pub fn plain(addr: SocketAddr) -> Self {
        Self {
            addr,
            transport: Transport::Plain,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// HTTPS verifying the server against `ca_pem` for the name `server_name`, presenting
    /// `identity` (certificate PEM, key PEM) when given.
    pub fn tls(
        addr: SocketAddr,
        server_name: &str,
        ca_pem: &str,
        identity: Option<(&str, &str)>,
    ) -> Result<Self, HttpError> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            let cert = cert.map_err(|source| HttpError::Pem { what: "CA", source })?;
            roots.add(cert).map_err(HttpError::Tls)?;
        }
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(HttpError::Tls)?
            .with_root_certificates(roots);
        let config = with_identity(builder, identity)?;
        let name =
            ServerName::try_from(server_name.to_owned()).map_err(|_| HttpError::ServerName {
                name: server_name.to_owned(),
            })?;
        Ok(Self {
            addr,
            transport: Transport::Tls {
                connector: TlsConnector::from(Arc::new(config)),
                name,
            },
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// HTTPS that accepts any server certificate (still checking its signatures), for the
    /// health ports of kube-controller-manager and kube-scheduler, which serve a certificate
    /// they sign themselves at start-up.
    pub fn tls_unverified(addr: SocketAddr) -> Result<Self, HttpError> {
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(HttpError::Tls)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
        let config = with_identity(builder, None)?;
        Ok(Self {
            addr,
            transport: Transport::Tls {
                connector: TlsConnector::from(Arc::new(config)),
                name: ServerName::IpAddress(addr.ip().into()),
            },
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// The same client with another per-request timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Result<Response, HttpError> {
        self.request("GET", path, None).await
    }

    /// Whether `GET path` answers 200 (a health check: any failure is "no").
    pub async fn is_ok(&self, path: &str) -> bool {
        self.get(path).await.is_ok_and(|r| r.status == 200)
    }

    /// One request; `body` is sent as `application/json`.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, HttpError> {
        let addr = self.addr;
        let work = async {
            let stream = self.connect().await?;
            exchange(stream, addr, method, path, body).await
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| HttpError::Timeout {
                addr,
                timeout: self.timeout,
            })?
    }
}

/// A connected stream, TLS or not.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Client {
    /// Connects (and shakes hands) without a deadline: the callers put one around it.
    async fn connect(&self) -> Result<Box<dyn Io>, HttpError> {
        let addr = self.addr;
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| HttpError::Io { addr, source })?;
        // Small requests back to back on a kept-alive connection: Nagle would hold each.
        tcp.set_nodelay(true)
            .map_err(|source| HttpError::Io { addr, source })?;
        Ok(match &self.transport {
            Transport::Plain => Box::new(tcp),
            Transport::Tls { connector, name } => Box::new(
                connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|source| HttpError::Io { addr, source })?,
            ),
        })
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn with_identity(
    builder: rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>,
    identity: Option<(&str, &str)>,
) -> Result<ClientConfig, HttpError> {
    let Some((cert_pem, key_pem)) = identity else {
        return Ok(builder.with_no_client_auth());
    };
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| HttpError::Pem {
            what: "client certificate",
            source,
        })?;
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|source| HttpError::Pem {
            what: "client key",
            source,
        })?;
    builder
        .with_client_auth_cert(chain, key)
        .map_err(HttpError::Tls)
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<Response, HttpError> {
    let io = |source| HttpError::Io { addr, source };
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: application/json\r\n"
    );
    if let Some(body) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.map_err(io)?;
    if let Some(body) = body {
        stream.write_all(body).await.map_err(io)?;
    }
    stream.flush().await.map_err(io)?;
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw).await {
        Ok(_) => {}
        // Servers that close without TLS close_notify (Go's do on Connection: close) end
        // the stream this way after a complete response.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(io(e)),
    }
    parse_response(&raw).map_err(|what| HttpError::Malformed { addr, what })
}

/// Parses a whole `Connection: close` response.
fn parse_response(raw: &[u8]) -> Result<Response, &'static str> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| "headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or("no status code")?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let rest = &raw[split + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else {
        rest.to_vec()
    };
    Ok(Response { status, body })
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, &'static str> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size line not ended")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).map_err(|_| "chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "chunk size")?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if rest.len() < size + 2 {
            return Err("chunk shorter than its size");
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// Accepts any server certificate, checking only that the handshake is signed by its key.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_plain_response() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").expect("parse");
        assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    }

    #[test]
    fn undoes_chunked_encoding() {
        let raw = b"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\n\
                    4\r\nnot \r\n5;x=y\r\nready\r\n0\r\n\r\n";
        let r = parse_response(raw).expect("parse");
        assert_eq!((r.status, r.text().as_str()), (500, "not ready"));
    }

    #[test]
    fn refuses_a_truncated_answer() {
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-"),
            Err("no end of headers")
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc"),
            Err("chunk shorter than its size")
        );
    }
}
