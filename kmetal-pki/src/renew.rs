//! Expiry reports (like `kubeadm certs check-expiration`) and renewal: a renewed certificate
//! keeps the CN, O, SANs and EKU it had, gets a new key and a new validity, and every
//! kubeconfig that embeds a renewed certificate (or CA) is re-issued. `sa.key` is never
//! renewed.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use serde::Serialize;
use x509_parser::extensions::GeneralName;

use crate::bundle::{Authority, Bundle, ca_file, generate_key, kubeconfig, parse_kubeconfig};
use crate::error::PkiError;
use crate::profile::{self, BACKDATE, CA_VALIDITY, LEAF_VALIDITY, Profile, Signer};
use crate::spec::Algorithm;
use crate::store::Parsed;

/// What a certificate says about itself, enough to re-issue it unchanged in profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CertInfo {
    pub(crate) cn: String,
    pub(crate) orgs: Vec<String>,
    pub(crate) sans: Vec<String>,
    pub(crate) server_auth: bool,
    pub(crate) client_auth: bool,
    pub(crate) is_ca: bool,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
}

fn system_time(ts: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(ts).unwrap_or(0))
}

pub(crate) fn describe(p: &Parsed) -> Result<CertInfo, PkiError> {
    let c = p.cert()?;
    let subject = c.subject();
    let cn = subject
        .iter_common_name()
        .filter_map(|a| a.as_str().ok())
        .next()
        .unwrap_or_default()
        .to_string();
    let orgs = subject
        .iter_organization()
        .filter_map(|a| a.as_str().ok())
        .map(str::to_string)
        .collect();
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = c.subject_alternative_name() {
        for n in &ext.value.general_names {
            match n {
                GeneralName::DNSName(d) => sans.push(d.to_string()),
                GeneralName::IPAddress(ip) => match ip.len() {
                    4 => sans.push(std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]).to_string()),
                    16 => {
                        let mut b = [0u8; 16];
                        b.copy_from_slice(ip);
                        sans.push(std::net::Ipv6Addr::from(b).to_string());
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    let (server_auth, client_auth) = match c.extended_key_usage() {
        Ok(Some(e)) => (e.value.server_auth, e.value.client_auth),
        _ => (false, false),
    };
    Ok(CertInfo {
        cn,
        orgs,
        sans,
        server_auth,
        client_auth,
        is_ca: c.is_ca(),
        not_before: system_time(c.validity().not_before.timestamp()),
        not_after: system_time(c.validity().not_after.timestamp()),
    })
}

/// Parameters that re-issue `info` valid from `now`.
pub(crate) fn params_from(
    info: &CertInfo,
    now: SystemTime,
    file: &str,
) -> Result<CertificateParams, PkiError> {
    let mut params =
        CertificateParams::new(info.sans.clone()).map_err(|source| PkiError::Issue {
            file: file.to_string(),
            source,
        })?;
    let mut dn = DistinguishedName::new();
    for o in &info.orgs {
        dn.push(DnType::OrganizationName, o.as_str());
    }
    dn.push(DnType::CommonName, info.cn.as_str());
    params.distinguished_name = dn;
    let validity = if info.is_ca {
        CA_VALIDITY
    } else {
        LEAF_VALIDITY
    };
    params.not_before = crate::bundle::to_offset(now - BACKDATE);
    params.not_after = crate::bundle::to_offset(now + validity);
    params.serial_number = Some(crate::bundle::serial());
    if info.is_ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyCertSign,
        ];
    } else {
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        if info.server_auth {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if info.client_auth {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
    }
    Ok(params)
}

/// One line of the expiry report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Expiry {
    /// Certificate name (`apiserver`, `admin.conf`, `ca`).
    pub name: String,
    /// File in kubeadm's layout.
    pub file: String,
    /// NotAfter, seconds since the epoch.
    pub not_after_unix: u64,
    /// NotAfter, RFC 3339.
    pub expires: String,
    /// Seconds left (0 when expired).
    pub residual_seconds: u64,
    /// The CA that signed it (`None` for CAs).
    pub certificate_authority: Option<String>,
    /// Whether it is a CA.
    pub is_ca: bool,
}

/// When to renew.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenewalPolicy {
    /// Renew when less than this remains (never below 24 h).
    pub deadline: Duration,
    /// Also renew when less than this fraction of the lifetime remains.
    pub fraction: Option<f64>,
}

/// The smallest deadline a policy accepts (Kamaji's default and minimum).
pub const MIN_DEADLINE: Duration = Duration::from_secs(24 * 3600);

impl Default for RenewalPolicy {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(30 * 24 * 3600),
            fraction: None,
        }
    }
}

impl RenewalPolicy {
    /// A policy renewing `deadline` before expiry (raised to 24 h if lower) or when less than
    /// `fraction` of the lifetime remains.
    pub fn new(deadline: Duration, fraction: Option<f64>) -> Self {
        Self {
            deadline: deadline.max(MIN_DEADLINE),
            fraction: fraction.map(|f| f.clamp(0.0, 1.0)),
        }
    }

    /// Whether a certificate valid `[not_before, not_after]` is due at `now`.
    pub fn due(&self, not_before: SystemTime, not_after: SystemTime, now: SystemTime) -> bool {
        let left = not_after.duration_since(now).unwrap_or(Duration::ZERO);
        let deadline = self.deadline.max(MIN_DEADLINE);
        if left < deadline {
            return true;
        }
        match self.fraction {
            Some(f) => {
                let life = not_after
                    .duration_since(not_before)
                    .unwrap_or(Duration::ZERO);
                left.as_secs_f64() < f * life.as_secs_f64()
            }
            None => false,
        }
    }
}

fn fmt_time(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(0))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// The CA authority `signer` as stored in the bundle.
pub(crate) fn authority(b: &Bundle, signer: Signer) -> Result<Authority, PkiError> {
    let cert = ca_file(signer);
    let key_file = cert.replace(".crt", ".key");
    let cert_pem = b
        .get(cert)
        .ok_or_else(|| PkiError::Missing { file: cert.into() })?
        .to_string();
    let key_pem = b.get(&key_file).ok_or(PkiError::Missing {
        file: key_file.clone(),
    })?;
    let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::Parse {
        file: key_file,
        what: "not a private key",
        source: Some(Box::new(e)),
    })?;
    Ok(Authority { cert_pem, key })
}

/// The algorithm of an existing key (renewals keep it).
fn algorithm_of(key_pem: &str) -> Algorithm {
    match KeyPair::from_pem(key_pem) {
        Ok(k) if k.algorithm() == &rcgen::PKCS_ECDSA_P256_SHA256 => Algorithm::EcdsaP256,
        Ok(_) => Algorithm::Rsa2048,
        Err(_) => Algorithm::EcdsaP256,
    }
}

impl Bundle {
    /// Every certificate's expiry, CAs first, like `kubeadm certs check-expiration`.
    pub fn expiry_report(&self, now: SystemTime) -> Result<Vec<Expiry>, PkiError> {
        let mut out = Vec::new();
        let line = |p: &Profile, file: &str, pem_text: &str| -> Result<Expiry, PkiError> {
            let info = describe(&Parsed::from_pem(file, pem_text)?)?;
            Ok(Expiry {
                name: p.name.to_string(),
                file: file.to_string(),
                not_after_unix: info
                    .not_after
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                expires: fmt_time(info.not_after),
                residual_seconds: info
                    .not_after
                    .duration_since(now)
                    .map_or(0, |d| d.as_secs()),
                certificate_authority: (!info.is_ca).then(|| match p.signer {
                    Signer::SelfSigned | Signer::ClusterCa => "ca".to_string(),
                    Signer::FrontProxyCa => "front-proxy-ca".into(),
                    Signer::EtcdCa => "etcd-ca".into(),
                    Signer::DatastoreCa => "datastore-ca".into(),
                }),
                is_ca: info.is_ca,
            })
        };
        for p in profile::CAS.iter() {
            let file = format!("{}.crt", p.path);
            if let Some(text) = self.get(&file) {
                out.push(line(p, &file, text)?);
            }
        }
        for p in profile::LEAVES.iter() {
            if p.kubeconfig {
                if let Some(text) = self.get(p.path) {
                    let kc = parse_kubeconfig(p.path, text)?;
                    out.push(line(p, p.path, &kc.cert_pem)?);
                }
            } else {
                let file = format!("{}.crt", p.path);
                if let Some(text) = self.get(&file) {
                    out.push(line(p, &file, text)?);
                }
            }
        }
        Ok(out)
    }

    /// Names of the certificates `policy` says are due at `now`.
    pub fn due_for_renewal(
        &self,
        policy: &RenewalPolicy,
        now: SystemTime,
    ) -> Result<Vec<String>, PkiError> {
        let mut due = Vec::new();
        for e in self.expiry_report(now)? {
            let p = Parsed::from_pem(&e.file, &self.cert_pem_of(&e.name)?)?;
            let info = describe(&p)?;
            if policy.due(info.not_before, info.not_after, now) {
                due.push(e.name);
            }
        }
        Ok(due)
    }

    fn cert_pem_of(&self, name: &str) -> Result<String, PkiError> {
        let p = profile::by_name(name).ok_or_else(|| PkiError::NotRenewable {
            name: name.to_string(),
            reason: "no such certificate in the profile",
        })?;
        if p.kubeconfig {
            let text = self.get(p.path).ok_or_else(|| PkiError::Missing {
                file: p.path.into(),
            })?;
            Ok(parse_kubeconfig(p.path, text)?.cert_pem)
        } else {
            let file = format!("{}.crt", p.path);
            self.get(&file)
                .map(str::to_string)
                .ok_or(PkiError::Missing { file })
        }
    }

    /// Renews every certificate that has a file in the bundle (not `sa`), as of `now`.
    pub fn renew_all(&mut self, now: SystemTime) -> Result<Vec<String>, PkiError> {
        let names: Vec<String> = self
            .expiry_report(now)?
            .into_iter()
            .map(|e| e.name)
            .collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        self.renew(&refs, now)?;
        Ok(names)
    }

    /// Renews the named certificates (`apiserver`, `admin.conf`, `ca`, …) as of `now`. CAs
    /// are re-signed with their existing key, so everything they signed stays valid; the
    /// kubeconfigs embedding them are re-issued.
    pub fn renew(&mut self, names: &[&str], now: SystemTime) -> Result<(), PkiError> {
        for name in names {
            if *name == "sa" || *name == "sa.key" {
                return Err(PkiError::NotRenewable {
                    name: (*name).to_string(),
                    reason: "the service-account key is never renewed: every issued token would become invalid",
                });
            }
            let p = profile::by_name(name).ok_or_else(|| PkiError::NotRenewable {
                name: (*name).to_string(),
                reason: "no such certificate in the profile",
            })?;
            if p.usage == profile::Usage::Ca {
                self.renew_ca(p, now)?;
            } else {
                let ca = authority(self, p.signer)?;
                self.reissue_leaf(p, &ca, now, None)?;
            }
        }
        Ok(())
    }

    fn renew_ca(&mut self, p: &Profile, now: SystemTime) -> Result<(), PkiError> {
        let file = format!("{}.crt", p.path);
        let old_pem = self
            .get(&file)
            .ok_or_else(|| PkiError::Missing { file: file.clone() })?
            .to_string();
        let info = describe(&Parsed::from_pem(&file, &old_pem)?)?;
        let key_file = format!("{}.key", p.path);
        let key = KeyPair::from_pem(self.get(&key_file).ok_or_else(|| PkiError::Missing {
            file: key_file.clone(),
        })?)
        .map_err(|e| PkiError::Parse {
            file: key_file,
            what: "not a private key",
            source: Some(Box::new(e)),
        })?;
        let cert = params_from(&info, now, &file)?
            .self_signed(&key)
            .map_err(|source| PkiError::Issue {
                file: file.clone(),
                source,
            })?;
        let new_pem = cert.pem();
        self.files_mut().insert(file, new_pem.clone());
        // Every trust bundle (kubeconfigs, the CA bundle) that carried the old CA gets the new.
        let paths: Vec<String> = self.files().map(|(k, _)| k.to_string()).collect();
        for path in paths {
            if path.ends_with(".conf") {
                let text = self.get(&path).unwrap_or_default().to_string();
                let kc = parse_kubeconfig(&path, &text)?;
                if kc.ca_pem.contains(old_pem.trim()) {
                    let ca = kc.ca_pem.replace(old_pem.trim(), new_pem.trim());
                    self.files_mut().insert(
                        path.clone(),
                        kubeconfig(
                            &kc.cluster,
                            &kc.server,
                            &ca,
                            &kc.user,
                            &kc.cert_pem,
                            &kc.key_pem,
                        ),
                    );
                }
            } else if path.ends_with("-bundle.crt") {
                let text = self
                    .get(&path)
                    .unwrap_or_default()
                    .replace(old_pem.trim(), new_pem.trim());
                self.files_mut().insert(path, text);
            }
        }
        Ok(())
    }

    /// Re-issues leaf `p` under `ca`, keeping its CN, O, SANs and EKU; `trust` replaces a
    /// kubeconfig's CA data, `chain` is appended to a server certificate.
    pub(crate) fn reissue_leaf(
        &mut self,
        p: &Profile,
        ca: &Authority,
        now: SystemTime,
        trust: Option<(&str, Option<&str>)>,
    ) -> Result<(), PkiError> {
        let file = if p.kubeconfig {
            p.path.to_string()
        } else {
            format!("{}.crt", p.path)
        };
        let (info, old_key, kc) = if p.kubeconfig {
            let text = self
                .get(p.path)
                .ok_or_else(|| PkiError::Missing { file: file.clone() })?;
            let kc = parse_kubeconfig(p.path, text)?;
            (
                describe(&Parsed::from_pem(&file, &kc.cert_pem)?)?,
                kc.key_pem.clone(),
                Some(kc),
            )
        } else {
            let text = self
                .get(&file)
                .ok_or_else(|| PkiError::Missing { file: file.clone() })?;
            let key_file = format!("{}.key", p.path);
            let key = self.get(&key_file).unwrap_or_default().to_string();
            (describe(&Parsed::from_pem(&file, text)?)?, key, None)
        };
        let key = generate_key(algorithm_of(&old_key), &file)?;
        let cert = params_from(&info, now, &file)?
            .signed_by(&key, &ca.issuer(&file)?)
            .map_err(|source| PkiError::Issue {
                file: file.clone(),
                source,
            })?;
        match kc {
            Some(kc) => {
                let ca_data = trust.map_or(kc.ca_pem.clone(), |(t, _)| t.to_string());
                self.files_mut().insert(
                    file,
                    kubeconfig(
                        &kc.cluster,
                        &kc.server,
                        &ca_data,
                        &kc.user,
                        &cert.pem(),
                        &key.serialize_pem(),
                    ),
                );
            }
            None => {
                let mut pem_text = cert.pem();
                if let Some((_, Some(chain))) = trust {
                    pem_text.push_str(chain);
                }
                self.files_mut().insert(file, pem_text);
                self.files_mut()
                    .insert(format!("{}.key", p.path), key.serialize_pem());
            }
        }
        Ok(())
    }
}
