//! Real mTLS handshakes over loopback: a server presenting tenant A's apiserver certificate
//! and requiring client certificates from A's CA accepts A's admin.conf and refuses tenant
//! B's; across a CA rotation, old credentials work during the overlap and not after finalize.

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
    // The api-server's --client-ca-file is the trust bundle (old + new CA during a rotation).
    let client_ca = bundle
        .get("pki/ca-bundle.crt")
        .or_else(|| bundle.get("pki/ca.crt"))
        .unwrap();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(client_ca)), provider())
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
    let server_ca = if server_ca.is_empty() {
        kc.ca_pem.as_str()
    } else {
        server_ca
    };
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

/// The client trusts what its kubeconfig says (empty `server_ca`).
async fn connect_as(addr: std::net::SocketAddr, kubeconfig: &str) -> Result<(), String> {
    connect(addr, "", kubeconfig).await
}

#[tokio::test]
async fn ca_rotation_keeps_old_credentials_working_until_finalize() {
    let mut bundle = Bundle::generate(&PkiSpec::new("ta", "api.ta.example.com:6443")).unwrap();
    let old_admin = bundle.get("admin.conf").unwrap().to_string();
    let before = server(&bundle).await;
    connect_as(before, &old_admin)
        .await
        .expect("before the rotation");

    bundle.rotate_prepare(std::time::SystemTime::now()).unwrap();
    bundle.verify().unwrap();
    let new_admin = bundle.get("admin.conf").unwrap().to_string();
    assert_ne!(new_admin, old_admin);
    let overlap = server(&bundle).await;
    // Old credentials (old client cert, trusting only the old CA) still work: the server
    // trusts both CAs and its new certificate chains to the old CA through the cross cert.
    connect_as(overlap, &old_admin)
        .await
        .expect("old admin.conf during the overlap");
    connect_as(overlap, &new_admin)
        .await
        .expect("new admin.conf during the overlap");
    // Every consumer moved in the same phase: konnectivity and the controllers too.
    for conf in [
        "konnectivity-server.conf",
        "controller-manager.conf",
        "scheduler.conf",
    ] {
        connect_as(overlap, bundle.get(conf).unwrap())
            .await
            .unwrap_or_else(|e| panic!("{conf}: {e}"));
    }

    bundle.rotate_finalize().unwrap();
    bundle.verify().unwrap();
    let after = server(&bundle).await;
    let refused = connect_as(after, &old_admin).await;
    assert!(
        refused.is_err(),
        "old credentials must be refused after finalize"
    );
    connect_as(after, bundle.get("admin.conf").unwrap())
        .await
        .expect("new admin.conf after finalize");
    assert!(
        bundle.rotate_finalize().is_err(),
        "finalize twice is refused"
    );
}
