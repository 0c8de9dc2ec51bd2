//! A tenant's bundle: CAs, leaves, the service-account key pair and kubeconfigs, as files in
//! kubeadm's layout (`pki/ca.crt`, `pki/etcd/server.key`, `admin.conf`, …).
//!
//! ```
//! use kmetal_pki::{Bundle, PkiSpec};
//! let bundle = Bundle::generate(&PkiSpec::new("t1", "api.t1.example.com:6443")).unwrap();
//! assert!(bundle.get("pki/apiserver.crt").unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
//! assert!(bundle.get("admin.conf").unwrap().contains("client-certificate-data"));
//! bundle.verify().unwrap();
//! ```

use std::collections::BTreeMap;
use std::time::SystemTime;

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use time::OffsetDateTime;

use crate::error::PkiError;
use crate::profile::{
    self, BACKDATE, CA_VALIDITY, LEAF_VALIDITY, Profile, SanRule, Signer, Subject, Usage,
};
use crate::spec::{Algorithm, PkiSpec};

/// The files of one tenant, keyed by their path in kubeadm's layout; values are PEM (or, for
/// kubeconfigs, YAML).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Bundle {
    files: BTreeMap<String, String>,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys never reach logs: list the files only.
        f.debug_struct("Bundle")
            .field("files", &self.files.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Generates a key pair for `algorithm`.
pub fn generate_key(algorithm: Algorithm, file: &str) -> Result<KeyPair, PkiError> {
    match algorithm {
        Algorithm::EcdsaP256 => {
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| {
                PkiError::Issue {
                    file: file.to_string(),
                    source,
                }
            })
        }
        Algorithm::Rsa2048 => rsa_key(file),
    }
}

#[cfg(feature = "rsa")]
fn rsa_key(file: &str) -> Result<KeyPair, PkiError> {
    use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
    let failed = |step| PkiError::KeyGeneration {
        file: file.to_string(),
        step,
    };
    let key = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
        .map_err(|_| failed("aws-lc refused to generate a key"))?;
    let der: Pkcs8V1Der<'static> = key
        .as_der()
        .map_err(|_| failed("the key cannot be encoded as PKCS#8"))?;
    let pkcs8 = rustls_pki_types::PrivatePkcs8KeyDer::from(der.as_ref().to_vec());
    KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_RSA_SHA256).map_err(|source| {
        PkiError::Issue {
            file: file.to_string(),
            source,
        }
    })
}

#[cfg(not(feature = "rsa"))]
fn rsa_key(_file: &str) -> Result<KeyPair, PkiError> {
    Err(PkiError::UnsupportedAlgorithm {
        algorithm: "rsa-2048",
        feature: "rsa",
    })
}

pub(crate) fn to_offset(t: SystemTime) -> OffsetDateTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(i64::MAX))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// A random, positive 16-byte serial.
pub(crate) fn serial() -> SerialNumber {
    let mut bytes = *uuid::Uuid::new_v4().as_bytes();
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

/// The parameters of `p` for `spec`, valid from `now - BACKDATE` for the profile's lifetime.
pub(crate) fn params_for(
    p: &Profile,
    spec: &PkiSpec,
    now: SystemTime,
) -> Result<CertificateParams, PkiError> {
    let issue = |source| PkiError::Issue {
        file: format!("{}.crt", p.path),
        source,
    };
    let sans = match p.sans {
        SanRule::None => Vec::new(),
        SanRule::ApiServer => spec.apiserver_sans()?,
        SanRule::Etcd => spec.etcd_sans(),
    };
    let mut params = CertificateParams::new(sans).map_err(issue)?;
    let cn = match p.subject {
        Subject::Fixed => p.cn.to_string(),
        Subject::NodeName => spec
            .node_names
            .first()
            .cloned()
            .unwrap_or_else(|| spec.tenant.clone()),
        Subject::DatastoreUser => spec
            .datastore
            .as_ref()
            .map(|d| d.user.clone())
            .unwrap_or_default(),
    };
    let mut dn = DistinguishedName::new();
    if let Some(o) = p.org {
        dn.push(DnType::OrganizationName, o);
    }
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    let validity = if p.usage == Usage::Ca {
        CA_VALIDITY
    } else {
        LEAF_VALIDITY
    };
    params.not_before = to_offset(now - BACKDATE);
    params.not_after = to_offset(now + validity);
    params.serial_number = Some(serial());
    params.use_authority_key_identifier_extension = p.usage != Usage::Ca;
    match p.usage {
        Usage::Ca => {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
                KeyUsagePurpose::KeyCertSign,
            ];
        }
        usage => {
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            params.extended_key_usages = match usage {
                Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
                Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
                _ => vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ],
            };
        }
    }
    Ok(params)
}

/// A CA that can sign: its certificate PEM and key.
pub(crate) struct Authority {
    pub(crate) cert_pem: String,
    pub(crate) key: KeyPair,
}

impl Authority {
    pub(crate) fn issuer(&self, file: &str) -> Result<Issuer<'static, &KeyPair>, PkiError> {
        Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).map_err(|source| PkiError::Issue {
            file: file.to_string(),
            source,
        })
    }
}

/// Which profiles a spec issues.
pub(crate) fn wanted(p: &Profile, spec: &PkiSpec) -> bool {
    match p.signer {
        Signer::EtcdCa => spec.dedicated_etcd,
        Signer::DatastoreCa => spec.datastore.is_some(),
        _ => p.name != "etcd-ca" || spec.dedicated_etcd,
    }
}

/// Renders a kubeconfig with embedded credentials.
pub fn kubeconfig(
    cluster: &str,
    server: &str,
    ca_pem: &str,
    user: &str,
    cert_pem: &str,
    key_pem: &str,
) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let context = format!("{user}@{cluster}");
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    certificate-authority-data: {}\n    server: {server}\n  name: {cluster}\ncontexts:\n- context:\n    cluster: {cluster}\n    user: {user}\n  name: {context}\ncurrent-context: {context}\npreferences: {{}}\nusers:\n- name: {user}\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\n",
        b64(ca_pem),
        b64(cert_pem),
        b64(key_pem)
    )
}

/// The credentials embedded in a kubeconfig.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeconfigParts {
    /// Cluster name.
    pub cluster: String,
    /// Server URL.
    pub server: String,
    /// CA bundle, PEM.
    pub ca_pem: String,
    /// User name.
    pub user: String,
    /// Client certificate, PEM.
    pub cert_pem: String,
    /// Client key, PEM.
    pub key_pem: String,
}

/// Reads the first cluster and user of a kubeconfig.
pub fn parse_kubeconfig(file: &str, text: &str) -> Result<KubeconfigParts, PkiError> {
    let bad = |at: Option<&str>, what, source: Option<crate::error::Cause>| PkiError::Parse {
        file: at.map_or_else(|| file.to_string(), |at| format!("{file}: {at}")),
        what,
        source,
    };
    let v: serde_json::Value =
        serde_saphyr::from_str(text).map_err(|e| bad(None, "not YAML", Some(Box::new(e))))?;
    let field = |path: &str| -> Result<String, PkiError> {
        let mut cur = &v;
        for part in path.split('.') {
            cur = match part.parse::<usize>() {
                Ok(i) => &cur[i],
                Err(_) => &cur[part],
            };
        }
        cur.as_str()
            .map(str::to_string)
            .ok_or_else(|| bad(Some(path), "missing", None))
    };
    let data = |path: &str| -> Result<String, PkiError> {
        let raw = field(path)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(raw.trim())
            .map_err(|e| bad(Some(path), "not base64", Some(Box::new(e))))?;
        String::from_utf8(bytes).map_err(|e| bad(Some(path), "not PEM text", Some(Box::new(e))))
    };
    Ok(KubeconfigParts {
        cluster: field("clusters.0.name")?,
        server: field("clusters.0.cluster.server")?,
        ca_pem: data("clusters.0.cluster.certificate-authority-data")?,
        user: field("users.0.name")?,
        cert_pem: data("users.0.user.client-certificate-data")?,
        key_pem: data("users.0.user.client-key-data")?,
    })
}

impl Bundle {
    /// Issues every CA, leaf, kubeconfig and the service-account key pair for `spec`.
    pub fn generate(spec: &PkiSpec) -> Result<Self, PkiError> {
        Self::generate_at(spec, SystemTime::now())
    }

    /// [`generate`](Self::generate) as if the time were `now` (for expiry tests).
    pub fn generate_at(spec: &PkiSpec, now: SystemTime) -> Result<Self, PkiError> {
        spec.check()?;
        let mut b = Bundle::default();
        let mut cas: BTreeMap<&'static str, Authority> = BTreeMap::new();
        for p in profile::CAS.iter().filter(|p| wanted(p, spec)) {
            let file = format!("{}.crt", p.path);
            let key = generate_key(spec.algorithm, &file)?;
            let cert = params_for(p, spec, now)?
                .self_signed(&key)
                .map_err(|source| PkiError::Issue {
                    file: file.clone(),
                    source,
                })?;
            b.files.insert(file, cert.pem());
            b.files
                .insert(format!("{}.key", p.path), key.serialize_pem());
            cas.insert(
                p.name,
                Authority {
                    cert_pem: cert.pem(),
                    key,
                },
            );
        }
        if let Some(ds) = &spec.datastore {
            let key = KeyPair::from_pem(&ds.ca_key_pem).map_err(|source| PkiError::Issue {
                file: "datastore CA key".into(),
                source,
            })?;
            cas.insert(
                "datastore-ca",
                Authority {
                    cert_pem: ds.ca_cert_pem.clone(),
                    key,
                },
            );
            b.files
                .insert("pki/datastore-ca.crt".into(), ds.ca_cert_pem.clone());
        }
        for p in profile::LEAVES.iter().filter(|p| wanted(p, spec)) {
            b.issue_leaf(p, spec, &cas, now)?;
        }
        let sa = generate_key(spec.algorithm, profile::SERVICE_ACCOUNT_KEY)?;
        b.files
            .insert(profile::SERVICE_ACCOUNT_KEY.into(), sa.serialize_pem());
        b.files
            .insert(profile::SERVICE_ACCOUNT_PUB.into(), sa.public_key_pem());
        Ok(b)
    }

    /// Issues (or re-issues) leaf `p` signed by its CA from `cas`, keeping a kubeconfig's
    /// CA data in step.
    pub(crate) fn issue_leaf(
        &mut self,
        p: &Profile,
        spec: &PkiSpec,
        cas: &BTreeMap<&'static str, Authority>,
        now: SystemTime,
    ) -> Result<(), PkiError> {
        let ca_name = signer_name(p.signer);
        let file = if p.kubeconfig {
            p.path.to_string()
        } else {
            format!("{}.crt", p.path)
        };
        let ca = cas.get(ca_name).ok_or_else(|| PkiError::Missing {
            file: format!("{} (CA of {file})", ca_file(p.signer)),
        })?;
        let key = generate_key(spec.algorithm, &file)?;
        let cert = params_for(p, spec, now)?
            .signed_by(&key, &ca.issuer(&file)?)
            .map_err(|source| PkiError::Issue {
                file: file.clone(),
                source,
            })?;
        if p.kubeconfig {
            // The CA data is the trust bundle clients use (old + new CA during a rotation).
            let trust = self
                .files
                .get("pki/ca-bundle.crt")
                .cloned()
                .unwrap_or_else(|| ca.cert_pem.clone());
            self.files.insert(
                file,
                kubeconfig(
                    &spec.tenant,
                    &spec.server_url(),
                    &trust,
                    p.cn,
                    &cert.pem(),
                    &key.serialize_pem(),
                ),
            );
        } else {
            self.files.insert(file, cert.pem());
            self.files
                .insert(format!("{}.key", p.path), key.serialize_pem());
        }
        Ok(())
    }

    /// The file at `path` (kubeadm layout).
    pub fn get(&self, path: &str) -> Option<&str> {
        self.files.get(path).map(String::as_str)
    }

    /// Every (path, content) pair, sorted by path.
    pub fn files(&self) -> impl Iterator<Item = (&str, &str)> {
        self.files.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub(crate) fn files_mut(&mut self) -> &mut BTreeMap<String, String> {
        &mut self.files
    }

    /// Builds a bundle from files (as read from disk or a Secret).
    pub fn from_files(files: impl IntoIterator<Item = (String, String)>) -> Self {
        Self {
            files: files.into_iter().collect(),
        }
    }
}

/// The key a CA goes by in [`Bundle::generate`]'s map.
pub(crate) fn signer_name(s: Signer) -> &'static str {
    match s {
        Signer::SelfSigned | Signer::ClusterCa => "ca",
        Signer::FrontProxyCa => "front-proxy-ca",
        Signer::EtcdCa => "etcd-ca",
        Signer::DatastoreCa => "datastore-ca",
    }
}

/// The certificate file of a signer.
pub(crate) fn ca_file(s: Signer) -> &'static str {
    match s {
        Signer::SelfSigned | Signer::ClusterCa => "pki/ca.crt",
        Signer::FrontProxyCa => "pki/front-proxy-ca.crt",
        Signer::EtcdCa => "pki/etcd/ca.crt",
        Signer::DatastoreCa => "pki/datastore-ca.crt",
    }
}
