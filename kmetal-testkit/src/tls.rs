//! A throwaway certificate authority for tests: server certificates for loopback and client
//! certificates whose CN is the user name (etcd's client-cert authentication).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Why a certificate could not be made or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// rcgen refused the parameters.
    #[error("cannot generate certificate")]
    Generate(#[source] rcgen::Error),
    /// Writing PEM files failed.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A PEM certificate and its PEM private key.
#[derive(Debug, Clone)]
pub struct Pem {
    /// Certificate, PEM.
    pub cert: String,
    /// Private key, PEM (PKCS#8).
    pub key: String,
}

/// A CA that issues test certificates.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// The CA's private key, PEM (for operators that sign tenant certificates with it, as
    /// Kamaji does with an etcd DataStore's CA).
    pub key_pem: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

impl TestCa {
    /// A fresh self-signed ECDSA-P256 CA with the given common name.
    pub fn new(common_name: &str) -> Result<Self, TlsError> {
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(TlsError::Generate)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().map_err(TlsError::Generate)?;
        let cert = params.self_signed(&key).map_err(TlsError::Generate)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    fn issue(
        &self,
        cn: &str,
        sans: Vec<String>,
        usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> Result<Pem, TlsError> {
        let mut params = CertificateParams::new(sans).map_err(TlsError::Generate)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = usages;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().map_err(TlsError::Generate)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(TlsError::Generate)?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }

    /// A server (and peer) certificate for `localhost` and `127.0.0.1`.
    pub fn server(&self, cn: &str) -> Result<Pem, TlsError> {
        self.issue(
            cn,
            vec!["localhost".into(), "127.0.0.1".into()],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    /// A client certificate whose CN is `user`.
    pub fn client(&self, user: &str) -> Result<Pem, TlsError> {
        self.issue(user, Vec::new(), vec![ExtendedKeyUsagePurpose::ClientAuth])
    }
}

/// Writes `contents` to `dir/name`, returning the path.
pub fn write_pem(dir: &Path, name: &str, contents: &str) -> Result<PathBuf, TlsError> {
    let path = dir.join(name);
    std::fs::write(&path, contents).map_err(|source| TlsError::Write {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}
