//! Storing and loading bundles — kubeadm's directory layout and a Secret-shaped map — and
//! checking them: every key matches its certificate, every certificate chains to its CA, no
//! CA has expired.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::SystemTime;

use rcgen::{KeyPair, PublicKeyData};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::bundle::{Bundle, ca_file, parse_kubeconfig};
use crate::error::PkiError;
use crate::profile::{self, Signer};

/// A certificate checked to parse, kept as DER.
pub(crate) struct Parsed {
    pub(crate) file: String,
    pub(crate) der: Vec<u8>,
}

impl Parsed {
    pub(crate) fn from_pem(file: &str, pem_text: &str) -> Result<Self, PkiError> {
        let block = pem::parse(pem_text).map_err(|e| PkiError::Parse {
            file: file.to_string(),
            what: "not a PEM certificate",
            source: Some(Box::new(e)),
        })?;
        if block.tag() != "CERTIFICATE" {
            return Err(PkiError::Parse {
                file: format!("{file} (PEM block {:?})", block.tag()),
                what: "not a CERTIFICATE block",
                source: None,
            });
        }
        let der = block.into_contents();
        X509Certificate::from_der(&der).map_err(|e| PkiError::Parse {
            file: file.to_string(),
            what: "not an X.509 certificate",
            source: Some(Box::new(e)),
        })?;
        Ok(Self {
            file: file.to_string(),
            der,
        })
    }

    pub(crate) fn cert(&self) -> Result<X509Certificate<'_>, PkiError> {
        X509Certificate::from_der(&self.der)
            .map(|(_, c)| c)
            .map_err(|e| PkiError::Parse {
                file: self.file.clone(),
                what: "not an X.509 certificate",
                source: Some(Box::new(e)),
            })
    }
}

/// Every PEM certificate in a text (a trust bundle may hold several).
pub(crate) fn certificates(file: &str, text: &str) -> Result<Vec<Parsed>, PkiError> {
    let blocks = pem::parse_many(text).map_err(|e| PkiError::Parse {
        file: file.to_string(),
        what: "not PEM",
        source: Some(Box::new(e)),
    })?;
    blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| Parsed::from_pem(file, &pem::encode(&b)))
        .collect()
}

fn key_matches(file: &str, cert_file: &str, key_pem: &str, cert: &Parsed) -> Result<(), PkiError> {
    let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::Parse {
        file: file.to_string(),
        what: "not a private key",
        source: Some(Box::new(e)),
    })?;
    if key.subject_public_key_info() != cert.cert()?.tbs_certificate.subject_pki.raw {
        return Err(PkiError::KeyMismatch {
            file: file.to_string(),
            cert: cert_file.to_string(),
        });
    }
    Ok(())
}

/// Whether `cert` is signed by one of `cas`.
pub(crate) fn signed_by_any(cert: &Parsed, cas: &[Parsed]) -> bool {
    let Ok(c) = cert.cert() else { return false };
    cas.iter().any(|ca| {
        ca.cert().is_ok_and(|ca| {
            c.tbs_certificate.issuer == ca.tbs_certificate.subject
                && c.verify_signature(Some(ca.public_key())).is_ok()
        })
    })
}

fn not_after(c: &X509Certificate<'_>) -> SystemTime {
    let secs = c.validity().not_after.timestamp();
    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

impl Bundle {
    /// Checks the bundle at the current time.
    pub fn verify(&self) -> Result<(), PkiError> {
        self.verify_at(SystemTime::now())
    }

    /// Checks the bundle as of `now`: keys match certificates and kubeconfigs, certificates
    /// chain to their CA (any CA in the trust bundle during a rotation), CAs are valid.
    pub fn verify_at(&self, now: SystemTime) -> Result<(), PkiError> {
        let get = |path: &str| {
            self.get(path).ok_or_else(|| PkiError::Missing {
                file: path.to_string(),
            })
        };
        // CAs, with any older CA still trusted during a rotation.
        let mut cas: BTreeMap<Signer, Vec<Parsed>> = BTreeMap::new();
        for (p, signer) in [
            (&profile::CA, Signer::ClusterCa),
            (&profile::FRONT_PROXY_CA, Signer::FrontProxyCa),
            (&profile::ETCD_CA, Signer::EtcdCa),
        ] {
            let file = format!("{}.crt", p.path);
            let Some(text) = self.get(&file) else {
                if p.name == "ca" || p.name == "front-proxy-ca" {
                    return Err(PkiError::Missing { file });
                }
                continue;
            };
            let ca = Parsed::from_pem(&file, text)?;
            key_matches(
                &format!("{}.key", p.path),
                &file,
                get(&format!("{}.key", p.path))?,
                &ca,
            )?;
            let expiry = {
                let c = ca.cert()?;
                (not_after(&c), c.validity().not_after.to_string())
            };
            if expiry.0 < now {
                return Err(PkiError::ExpiredCa {
                    file,
                    not_after: expiry.1,
                });
            }
            if !signed_by_any(&ca, std::slice::from_ref(&ca)) {
                return Err(PkiError::NotSignedBy {
                    file: file.clone(),
                    ca: file,
                });
            }
            let mut trusted = vec![ca];
            // During a CA rotation the previous CA stays trusted until finalize.
            let old = format!("{}-previous.crt", p.path);
            if let Some(text) = self.get(&old) {
                trusted.push(Parsed::from_pem(&old, text)?);
            }
            cas.insert(signer, trusted);
        }
        if let Some(text) = self.get("pki/datastore-ca.crt") {
            cas.insert(
                Signer::DatastoreCa,
                vec![Parsed::from_pem("pki/datastore-ca.crt", text)?],
            );
        }
        for p in profile::LEAVES.iter() {
            let Some(trusted) = cas.get(&p.signer) else {
                continue;
            };
            if p.kubeconfig {
                let Some(text) = self.get(p.path) else {
                    return Err(PkiError::Missing {
                        file: p.path.to_string(),
                    });
                };
                let kc = parse_kubeconfig(p.path, text)?;
                let cert = Parsed::from_pem(p.path, &kc.cert_pem)?;
                key_matches(p.path, p.path, &kc.key_pem, &cert)?;
                if !signed_by_any(&cert, trusted) {
                    return Err(PkiError::NotSignedBy {
                        file: p.path.to_string(),
                        ca: ca_file(p.signer).to_string(),
                    });
                }
                let bundle = certificates(p.path, &kc.ca_pem)?;
                if !trusted
                    .iter()
                    .all(|t| bundle.iter().any(|b| b.der == t.der))
                {
                    return Err(PkiError::Parse {
                        file: p.path.to_string(),
                        what: "certificate-authority-data does not carry every trusted CA",
                        source: None,
                    });
                }
                continue;
            }
            let file = format!("{}.crt", p.path);
            let Some(text) = self.get(&file) else {
                continue;
            };
            let cert = Parsed::from_pem(&file, text)?;
            key_matches(
                &format!("{}.key", p.path),
                &file,
                get(&format!("{}.key", p.path))?,
                &cert,
            )?;
            if !signed_by_any(&cert, trusted) {
                return Err(PkiError::NotSignedBy {
                    file,
                    ca: ca_file(p.signer).to_string(),
                });
            }
        }
        let sa = get(profile::SERVICE_ACCOUNT_KEY)?;
        let key = KeyPair::from_pem(sa).map_err(|e| PkiError::Parse {
            file: profile::SERVICE_ACCOUNT_KEY.into(),
            what: "not a private key",
            source: Some(Box::new(e)),
        })?;
        if key.public_key_pem().trim() != get(profile::SERVICE_ACCOUNT_PUB)?.trim() {
            return Err(PkiError::KeyMismatch {
                file: profile::SERVICE_ACCOUNT_KEY.into(),
                cert: profile::SERVICE_ACCOUNT_PUB.into(),
            });
        }
        Ok(())
    }

    /// Writes every file under `dir` in kubeadm's layout (keys and kubeconfigs with mode
    /// 0600; each file replaced whole, unchanged ones left alone), and removes the rotation files (`*-previous.crt`, `*-cross.crt`) the bundle no
    /// longer has, so a finalized rotation leaves no old CA on disk.
    pub fn write_dir(&self, dir: &Path) -> Result<(), PkiError> {
        for p in profile::CAS.iter() {
            for suffix in ["-previous.crt", "-cross.crt"] {
                let rel = format!("{}{suffix}", p.path);
                let full = dir.join(&rel);
                if self.get(&rel).is_none() && full.is_file() {
                    std::fs::remove_file(&full).map_err(|source| PkiError::Io {
                        file: full.display().to_string(),
                        source,
                    })?;
                }
            }
        }
        for (path, content) in self.files() {
            let full = dir.join(path);
            let io = |source| PkiError::Io {
                file: full.display().to_string(),
                source,
            };
            // Unchanged files stay as they are: running processes that watch them (the
            // api-server reloads its serving certificate and client CA) see no churn.
            if std::fs::read(&full).is_ok_and(|old| old == content.as_bytes()) {
                continue;
            }
            if let Some(parent) = full.parent() {
                std::fs::create_dir_all(parent).map_err(io)?;
            }
            // Written beside and renamed over, so a reader never sees half a file.
            let tmp = full.with_extension("kmetal-tmp");
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            if path.ends_with(".key") || path.ends_with(".conf") {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            let written = options.open(&tmp).and_then(|mut f| {
                use std::io::Write;
                f.write_all(content.as_bytes())
            });
            written
                .and_then(|()| std::fs::rename(&tmp, &full))
                .map_err(io)?;
        }
        Ok(())
    }

    /// Reads a bundle written by [`write_dir`](Self::write_dir) (or by kubeadm) and checks it.
    pub fn load_dir(dir: &Path) -> Result<Self, PkiError> {
        let mut files = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let io = |source| PkiError::Io {
                file: d.display().to_string(),
                source,
            };
            for entry in std::fs::read_dir(&d).map_err(io)? {
                let entry = entry.map_err(io)?;
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let rel = path
                    .strip_prefix(dir)
                    .map(|r| r.to_string_lossy().replace('\\', "/"))
                    .unwrap_or_default();
                let wanted = rel.ends_with(".crt")
                    || rel.ends_with(".key")
                    || rel.ends_with(".pub")
                    || rel.ends_with(".conf");
                if !wanted {
                    continue;
                }
                let text = std::fs::read_to_string(&path).map_err(|source| PkiError::Io {
                    file: path.display().to_string(),
                    source,
                })?;
                files.push((rel, text));
            }
        }
        let b = Self::from_files(files);
        b.verify()?;
        Ok(b)
    }

    /// The bundle as a Secret's `data`/`stringData` map: keys are the paths with `/` as `.`
    /// (`pki.etcd.ca.crt`), which Secret keys allow.
    pub fn to_secret_map(&self) -> BTreeMap<String, String> {
        self.files()
            .map(|(k, v)| (k.replace('/', "."), v.to_string()))
            .collect()
    }

    /// The inverse of [`to_secret_map`](Self::to_secret_map), checked.
    pub fn from_secret_map(map: &BTreeMap<String, String>) -> Result<Self, PkiError> {
        let files = map.iter().map(|(k, v)| {
            // Every dot but the extension's was a slash.
            let path = match k.rsplit_once('.') {
                Some((stem, ext)) => format!("{}.{ext}", stem.replace('.', "/")),
                None => k.clone(),
            };
            (path, v.clone())
        });
        let b = Self::from_files(files);
        b.verify()?;
        Ok(b)
    }
}
