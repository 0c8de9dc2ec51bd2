//! mTLS from a tenant's PKI: the agent listener and the CONNECT frontend require client
//! certificates from the tenant's cluster CA (so another tenant's agent or client is refused
//! in the handshake), and the agent verifies the server against the same CA.

use std::sync::Arc;

use kmetal_pki::Bundle;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};

/// The cluster CA.
pub const CA: &str = "pki/ca.crt";
/// During a CA rotation: the new and the old cluster CA, trusted side by side.
pub const CA_BUNDLE: &str = "pki/ca-bundle.crt";
/// The server certificate of the agent listener and the mTLS frontend.
pub const SERVER_CERT: &str = "pki/konnectivity-server.crt";
/// Its key.
pub const SERVER_KEY: &str = "pki/konnectivity-server.key";
/// The agent's client certificate (CN `system:konnectivity-agent`).
pub const AGENT_CERT: &str = "pki/konnectivity-agent.crt";
/// Its key.
pub const AGENT_KEY: &str = "pki/konnectivity-agent.key";
/// The client certificate a frontend client (kube-apiserver's egress) presents.
pub const FRONTEND_CERT: &str = "pki/apiserver-kubelet-client.crt";
/// Its key.
pub const FRONTEND_KEY: &str = "pki/apiserver-kubelet-client.key";

/// Building a TLS configuration failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The bundle lacks a file.
    #[error("{0}: missing from the PKI bundle")]
    MissingFile(String),
    /// A file holds no usable PEM certificate or key.
    #[error("{file}")]
    Pem {
        /// The file.
        file: String,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// rustls refused the certificates, key or roots.
    #[error("{what}")]
    Rustls {
        /// Which part of the configuration.
        what: &'static str,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The client verifier could not be built from the CA.
    #[error("client verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

/// The CAs the agent listener and the mTLS frontend trust: both during a CA rotation, so
/// peers holding certificates from the old CA keep working until the rotation is finalized.
pub fn trust(bundle: &Bundle) -> Result<&str, TlsError> {
    bundle.get(CA_BUNDLE).map_or_else(|| file(bundle, CA), Ok)
}

fn file<'a>(bundle: &'a Bundle, name: &str) -> Result<&'a str, TlsError> {
    bundle
        .get(name)
        .ok_or_else(|| TlsError::MissingFile(name.to_string()))
}

fn certs(name: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            file: name.into(),
            source,
        })
}

fn key(name: &str, pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|source| TlsError::Pem {
        file: name.into(),
        source,
    })
}

fn roots(name: &str, pem: &str) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(name, pem)? {
        roots.add(c).map_err(|source| TlsError::Rustls {
            what: "trust roots",
            source,
        })?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS server configuration that requires a client certificate issued by `ca_pem`.
pub fn server_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(CA, ca_pem)?),
        provider(),
    )
    .build()
    .map_err(TlsError::Verifier)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            what: "protocol versions",
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(SERVER_CERT, cert_pem)?, key(SERVER_KEY, key_pem)?)
        .map_err(|source| TlsError::Rustls {
            what: "server certificate",
            source,
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A TLS client configuration presenting `cert_pem` and trusting `ca_pem`.
pub fn client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            what: "protocol versions",
            source,
        })?
        .with_root_certificates(roots(CA, ca_pem)?)
        .with_client_auth_cert(
            certs("client certificate", cert_pem)?,
            key("client key", key_pem)?,
        )
        .map_err(|source| TlsError::Rustls {
            what: "client certificate",
            source,
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The agent listener's configuration from a tenant bundle (gRPC: ALPN `h2`, which Go's
/// gRPC clients insist on).
pub fn agent_listener(bundle: &Bundle) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    server_config(
        trust(bundle)?,
        file(bundle, SERVER_CERT)?,
        file(bundle, SERVER_KEY)?,
        &[b"h2"],
    )
}

/// The mTLS CONNECT frontend's configuration from a tenant bundle.
pub fn connect_listener(bundle: &Bundle) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    server_config(
        trust(bundle)?,
        file(bundle, SERVER_CERT)?,
        file(bundle, SERVER_KEY)?,
        &[b"http/1.1"],
    )
}

/// The agent's client configuration from a tenant bundle.
pub fn agent_client(bundle: &Bundle) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    client_config(
        trust(bundle)?,
        file(bundle, AGENT_CERT)?,
        file(bundle, AGENT_KEY)?,
        &[b"h2"],
    )
}

/// A frontend client's configuration from a tenant bundle (the api-server's identity).
pub fn connect_client(bundle: &Bundle) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    client_config(
        trust(bundle)?,
        file(bundle, FRONTEND_CERT)?,
        file(bundle, FRONTEND_KEY)?,
        &[b"http/1.1"],
    )
}

/// The subject CN of a DER certificate (the peer's identity after the handshake).
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
}
