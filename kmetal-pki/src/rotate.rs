//! CA rotation without outage, in two phases, for every CA of the bundle at once (cluster,
//! front-proxy and etcd CAs), so no consumer is forgotten.
//!
//! - **prepare**: a new CA (new key, same name) replaces each CA; the old one stays trusted:
//!   `<ca>-bundle.crt` and every kubeconfig's CA data carry new + old, and verification
//!   accepts leaves of either. Every leaf and kubeconfig is re-issued by the new CA. Server
//!   certificates carry the new CA cross-signed by the old one (`<ca>-cross.crt`) in their
//!   chain, so clients that still trust only the old CA accept the new server certificate.
//! - **finalize**: the old CA, the cross certificate and the chains are dropped; bundles and
//!   kubeconfigs carry the new CA only. Credentials from the old CA stop working.
//!
//! ```
//! use kmetal_pki::{Bundle, PkiSpec};
//! let mut b = Bundle::generate(&PkiSpec::new("t1", "api.t1.example.com")).unwrap();
//! let old_ca = b.get("pki/ca.crt").unwrap().to_string();
//! b.rotate_prepare(std::time::SystemTime::now()).unwrap();
//! assert!(b.get("pki/ca-bundle.crt").unwrap().contains(old_ca.trim()));
//! b.verify().unwrap();
//! b.rotate_finalize().unwrap();
//! assert!(!b.get("pki/ca-bundle.crt").unwrap().contains(old_ca.trim()));
//! b.verify().unwrap();
//! ```

use std::time::SystemTime;

use crate::bundle::{Authority, Bundle, generate_key, kubeconfig, parse_kubeconfig};
use crate::error::PkiError;
use crate::profile::{self, Profile, Usage};
use crate::renew::{authority, describe, params_from};
use crate::spec::Algorithm;
use crate::store::{Parsed, certificates};

/// The rotation phase to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationPhase {
    /// New CAs in, old ones still trusted, everything re-issued.
    Prepare,
    /// Old CAs out.
    Finalize,
}

fn present_cas(b: &Bundle) -> Vec<&'static Profile> {
    profile::CAS
        .iter()
        .filter(|p| b.get(&format!("{}.crt", p.path)).is_some())
        .collect()
}

impl Bundle {
    /// Whether a rotation has been prepared and not finalized.
    pub fn rotation_in_progress(&self) -> bool {
        profile::CAS
            .iter()
            .any(|p| self.get(&format!("{}-previous.crt", p.path)).is_some())
    }

    /// Runs `phase`.
    pub fn rotate(&mut self, phase: RotationPhase, now: SystemTime) -> Result<(), PkiError> {
        match phase {
            RotationPhase::Prepare => self.rotate_prepare(now),
            RotationPhase::Finalize => self.rotate_finalize(),
        }
    }

    /// Phase 1: new CAs, old ones still trusted, every leaf and kubeconfig re-issued.
    pub fn rotate_prepare(&mut self, now: SystemTime) -> Result<(), PkiError> {
        if self.rotation_in_progress() {
            return Err(PkiError::Rotation {
                reason: "a rotation is already prepared; finalize it first",
            });
        }
        for ca in present_cas(self) {
            let file = format!("{}.crt", ca.path);
            let old = authority(self, ca.signer_of_children())?;
            let info = describe(&Parsed::from_pem(&file, &old.cert_pem)?)?;
            let algorithm = if old.key.algorithm() == &rcgen::PKCS_ECDSA_P256_SHA256 {
                Algorithm::EcdsaP256
            } else {
                Algorithm::Rsa2048
            };
            let key = generate_key(algorithm, &file)?;
            let params = params_from(&info, now, &file)?;
            let issue = |source| PkiError::Issue {
                file: file.clone(),
                source,
            };
            let new_cert = params.self_signed(&key).map_err(issue)?;
            // The new CA's name and key, vouched for by the old CA: the bridge for old clients.
            let cross = params
                .signed_by(&key, &old.issuer(&file)?)
                .map_err(|source| PkiError::Issue {
                    file: format!("{}-cross.crt", ca.path),
                    source,
                })?;
            let new = Authority {
                cert_pem: new_cert.pem(),
                key,
            };
            let trust = format!("{}{}", new.cert_pem, old.cert_pem);
            let files = self.files_mut();
            files.insert(format!("{}-previous.crt", ca.path), old.cert_pem.clone());
            files.insert(format!("{}-cross.crt", ca.path), cross.pem());
            files.insert(format!("{}-bundle.crt", ca.path), trust.clone());
            files.insert(file, new.cert_pem.clone());
            files.insert(format!("{}.key", ca.path), new.key.serialize_pem());
            for leaf in profile::LEAVES
                .iter()
                .filter(|l| l.signer == ca.signer_of_children())
            {
                let present = if leaf.kubeconfig {
                    self.get(leaf.path).is_some()
                } else {
                    self.get(&format!("{}.crt", leaf.path)).is_some()
                };
                if !present {
                    continue;
                }
                let chain =
                    matches!(leaf.usage, Usage::Server | Usage::ServerClient).then(|| cross.pem());
                self.reissue_leaf(leaf, &new, now, Some((&trust, chain.as_deref())))?;
            }
        }
        Ok(())
    }

    /// Phase 2: drop the old CAs from every bundle, chain and kubeconfig.
    pub fn rotate_finalize(&mut self) -> Result<(), PkiError> {
        if !self.rotation_in_progress() {
            return Err(PkiError::Rotation {
                reason: "no rotation has been prepared",
            });
        }
        for ca in present_cas(self) {
            let new_ca = self
                .get(&format!("{}.crt", ca.path))
                .unwrap_or_default()
                .to_string();
            let files = self.files_mut();
            files.remove(&format!("{}-previous.crt", ca.path));
            files.remove(&format!("{}-cross.crt", ca.path));
            files.insert(format!("{}-bundle.crt", ca.path), new_ca.clone());
            for leaf in profile::LEAVES
                .iter()
                .filter(|l| l.signer == ca.signer_of_children())
            {
                if leaf.kubeconfig {
                    let Some(text) = self.get(leaf.path) else {
                        continue;
                    };
                    let kc = parse_kubeconfig(leaf.path, text)?;
                    let updated = kubeconfig(
                        &kc.cluster,
                        &kc.server,
                        &new_ca,
                        &kc.user,
                        &kc.cert_pem,
                        &kc.key_pem,
                    );
                    self.files_mut().insert(leaf.path.to_string(), updated);
                } else {
                    let file = format!("{}.crt", leaf.path);
                    let Some(text) = self.get(&file) else {
                        continue;
                    };
                    // Keep the leaf, drop the cross-signed bridge from its chain.
                    let first = certificates(&file, text)?
                        .into_iter()
                        .next()
                        .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.der)))
                        .unwrap_or_default();
                    self.files_mut().insert(file, first);
                }
            }
        }
        Ok(())
    }
}

impl Profile {
    /// The signer value of the certificates this CA signs.
    pub(crate) fn signer_of_children(&self) -> profile::Signer {
        match self.name {
            "front-proxy-ca" => profile::Signer::FrontProxyCa,
            "etcd-ca" => profile::Signer::EtcdCa,
            _ => profile::Signer::ClusterCa,
        }
    }
}
