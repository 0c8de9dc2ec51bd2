//! A real mTLS handshake over loopback: a server presenting tenant A's apiserver certificate
//! and requiring client certificates from A's CA accepts A's admin.conf credentials and
//! refuses tenant B's.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use kmetal_pki::bundle::parse_kubeconfig;
use kmetal_pki::{Bundle, PkiSpec};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

fn roots(pem: &str) -> rustls::RootCertStore {
    let mut r = rustls::RootCertStore::empty();
    for c in certs(pem) {
        r.add(c).unwrap();
    }
    r
}

/// Serves one connection at a time: handshake, then echo one line.
async fn server(bundle: &Bundle) -> std::net::SocketAddr {
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(bundle.get("pki/ca.crt").unwrap())),
        provider(),
    )
    .build()
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certs(bundle.get("pki/apiserver.crt").unwrap()),
            PrivateKeyDer::from_pem_slice(bundle.get("pki/apiserver.key").unwrap().as_bytes())
                .unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let mut buf = [0u8; 5];
                    if tls.read_exact(&mut buf).await.is_ok() {
                        let _ = tls.write_all(&buf).await;
                        let _ = tls.shutdown().await;
                    }
                }
            });
        }
    });
    addr
}

/// Connects with the credentials of a kubeconfig, trusting `server_ca`; Ok when the
/// handshake completes and the echo comes back.
async fn connect(
    addr: std::net::SocketAddr,
    server_ca: &str,
    kubeconfig: &str,
) -> Result<(), String> {
    let kc = parse_kubeconfig("admin.conf", kubeconfig).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(server_ca))
        .with_client_auth_cert(
            certs(&kc.cert_pem),
            PrivateKeyDer::from_pem_slice(kc.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("api.ta.example.com").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    // TLS 1.3 reports a refused client certificate on the first read.
    tls.write_all(b"hello").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 5];
    tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    (&buf == b"hello")
        .then_some(())
        .ok_or_else(|| "wrong echo".to_string())
}

#[tokio::test]
async fn admin_conf_of_the_tenant_passes_and_another_tenants_is_refused() {
    let a = Bundle::generate(&PkiSpec::new("ta", "api.ta.example.com:6443")).unwrap();
    let b = Bundle::generate(&PkiSpec::new("tb", "api.tb.example.com:6443")).unwrap();
    let addr = server(&a).await;
    let ca_a = a.get("pki/ca.crt").unwrap();
    connect(addr, ca_a, a.get("admin.conf").unwrap())
        .await
        .expect("tenant A's admin.conf is accepted");
    let refused = connect(addr, ca_a, b.get("admin.conf").unwrap()).await;
    assert!(refused.is_err(), "tenant B's admin.conf must be refused");
    // And B's CA does not trust A's api-server.
    let wrong_server = connect(
        addr,
        b.get("pki/ca.crt").unwrap(),
        a.get("admin.conf").unwrap(),
    )
    .await;
    assert!(wrong_server.unwrap_err().contains("certificate"));
}
