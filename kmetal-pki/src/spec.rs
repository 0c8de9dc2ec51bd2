//! What a tenant's PKI is issued for: endpoint, SANs, service CIDR, cluster domain, node
//! names, algorithm, and how the datastore is reached.

use std::net::IpAddr;

use kmetal_core::TenantControlPlane;
use kmetal_core::net::{Cidr, is_san_name};

use crate::error::PkiError;

/// Key algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// ECDSA on P-256 with SHA-256 (fast; our default).
    #[default]
    EcdsaP256,
    /// RSA 2048 with SHA-256 (kubeadm's default; needs the `rsa` feature to generate keys).
    Rsa2048,
}

impl Algorithm {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::EcdsaP256 => "ecdsa-p256",
            Self::Rsa2048 => "rsa-2048",
        }
    }
}

/// The CA (certificate and key, PEM) of a shared datastore, and the tenant's user on it: the
/// tenant's datastore client certificate is issued with CN = `user` (etcd's client-cert auth).
#[derive(Clone, PartialEq, Eq)]
pub struct DatastoreIssuer {
    /// The tenant's datastore user.
    pub user: String,
    /// The datastore CA certificate, PEM.
    pub ca_cert_pem: String,
    /// The datastore CA key, PEM.
    pub ca_key_pem: String,
}

impl std::fmt::Debug for DatastoreIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatastoreIssuer")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Everything a tenant bundle is issued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PkiSpec {
    /// Tenant name (the kubeconfigs' cluster name).
    pub tenant: String,
    /// Where clients reach the api-server: `host` or `host:port` (port 6443 by default).
    pub endpoint: String,
    /// The api-server's advertise address.
    pub advertise_address: Option<IpAddr>,
    /// Service CIDR; its first IP is the `kubernetes` Service's.
    pub service_cidr: String,
    /// Cluster domain.
    pub cluster_domain: String,
    /// Extra SANs (IPs or DNS names).
    pub cert_sans: Vec<String>,
    /// Node names (api-server and etcd SANs; the first is the etcd certificates' CN).
    pub node_names: Vec<String>,
    /// Key algorithm.
    pub algorithm: Algorithm,
    /// Issue an etcd CA and etcd certificates (dedicated etcd).
    pub dedicated_etcd: bool,
    /// Issue a datastore client certificate from a shared datastore's CA.
    pub datastore: Option<DatastoreIssuer>,
}

impl PkiSpec {
    /// A spec with kubeadm's defaults (service CIDR 10.96.0.0/16, cluster.local, ECDSA-P256,
    /// dedicated etcd).
    pub fn new(tenant: impl Into<String>, endpoint: impl Into<String>) -> Self {
        let tenant = tenant.into();
        Self {
            node_names: vec![tenant.clone()],
            tenant,
            endpoint: endpoint.into(),
            advertise_address: None,
            service_cidr: kmetal_core::tenant::DEFAULT_SERVICE_CIDR.to_string(),
            cluster_domain: kmetal_core::tenant::DEFAULT_CLUSTER_DOMAIN.to_string(),
            cert_sans: Vec::new(),
            algorithm: Algorithm::EcdsaP256,
            dedicated_etcd: true,
            datastore: None,
        }
    }

    /// The spec for a TenantControlPlane: endpoint from `networkProfile.address` and `port`,
    /// SANs, service CIDR and cluster domain from its network profile (defaults applied).
    pub fn from_tenant(tcp: &TenantControlPlane) -> Result<Self, PkiError> {
        let mut tcp = tcp.clone();
        tcp.apply_defaults();
        let np = &tcp.spec.network_profile;
        let name = tcp.metadata.name.clone().unwrap_or_default();
        let host = np
            .address
            .clone()
            .or_else(|| np.advertise_address.clone())
            .unwrap_or_else(|| name.clone());
        let port = np.port.unwrap_or(kmetal_core::tenant::DEFAULT_PORT);
        let mut spec = Self::new(name, format!("{host}:{port}"));
        if let Some(a) = &np.advertise_address {
            spec.advertise_address = Some(a.parse().map_err(|_| PkiError::InvalidIp {
                field: "spec.networkProfile.advertiseAddress".into(),
                value: a.clone(),
            })?);
        }
        spec.cert_sans = np.cert_sans.clone();
        if let Some(c) = &np.service_cidr {
            spec.service_cidr = c.clone();
        }
        if let Some(d) = &np.cluster_domain {
            spec.cluster_domain = d.clone();
        }
        Ok(spec)
    }

    /// The endpoint's host and port.
    pub fn host_port(&self) -> (String, u16) {
        // An IPv6 literal is written [addr]:port.
        if let Some(rest) = self.endpoint.strip_prefix('[')
            && let Some((host, port)) = rest.split_once(']')
        {
            let port = port
                .strip_prefix(':')
                .and_then(|p| p.parse().ok())
                .unwrap_or(6443);
            return (host.to_string(), port);
        }
        match self.endpoint.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h.to_string(), p.parse().unwrap_or(6443)),
            _ => (self.endpoint.clone(), 6443),
        }
    }

    /// The api-server URL for kubeconfigs.
    pub fn server_url(&self) -> String {
        let (host, port) = self.host_port();
        if host.contains(':') {
            format!("https://[{host}]:{port}")
        } else {
            format!("https://{host}:{port}")
        }
    }

    /// Checks every name and address, naming the field of the first bad one.
    pub fn check(&self) -> Result<(), PkiError> {
        let (host, _) = self.host_port();
        if !is_san_name(&host) {
            return Err(PkiError::InvalidSan {
                field: "endpoint".into(),
                value: host,
            });
        }
        for (i, s) in self.cert_sans.iter().enumerate() {
            if !is_san_name(s) {
                return Err(PkiError::InvalidSan {
                    field: format!("certSANs[{i}]"),
                    value: s.clone(),
                });
            }
        }
        for (i, n) in self.node_names.iter().enumerate() {
            if !is_san_name(n) {
                return Err(PkiError::InvalidSan {
                    field: format!("nodeNames[{i}]"),
                    value: n.clone(),
                });
            }
        }
        if !kmetal_core::net::is_dns_name(&self.cluster_domain) {
            return Err(PkiError::InvalidSan {
                field: "clusterDomain".into(),
                value: self.cluster_domain.clone(),
            });
        }
        self.service_cidr()?;
        Ok(())
    }

    fn service_cidr(&self) -> Result<Cidr, PkiError> {
        self.service_cidr
            .parse()
            .map_err(|source| PkiError::InvalidCidr {
                field: "serviceCidr".into(),
                value: self.service_cidr.clone(),
                source,
            })
    }

    /// The api-server's SANs: node names, `kubernetes`, `kubernetes.default`,
    /// `kubernetes.default.svc`, `kubernetes.default.svc.<domain>`, the first service IP,
    /// the advertise address, the endpoint host and certSANs (deduplicated, in that order).
    pub fn apiserver_sans(&self) -> Result<Vec<String>, PkiError> {
        self.check()?;
        let first_ip = self
            .service_cidr()?
            .nth(1)
            .ok_or_else(|| PkiError::InvalidCidr {
                field: "serviceCidr".into(),
                value: self.service_cidr.clone(),
                source: kmetal_core::net::CidrError::MissingPrefix,
            })?;
        let mut sans: Vec<String> = self.node_names.clone();
        sans.extend(
            [
                "kubernetes".to_string(),
                "kubernetes.default".into(),
                "kubernetes.default.svc".into(),
                format!("kubernetes.default.svc.{}", self.cluster_domain),
                first_ip.to_string(),
            ]
            .into_iter()
            .chain(self.advertise_address.map(|a| a.to_string()))
            .chain(std::iter::once(self.host_port().0))
            .chain(self.cert_sans.iter().cloned()),
        );
        let mut seen = std::collections::HashSet::new();
        sans.retain(|s| seen.insert(s.clone()));
        Ok(sans)
    }

    /// etcd's SANs: node names, `localhost`, `127.0.0.1`, `::1`.
    pub fn etcd_sans(&self) -> Vec<String> {
        let mut sans = self.node_names.clone();
        sans.extend(["localhost".to_string(), "127.0.0.1".into(), "::1".into()]);
        sans
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apiserver_sans_follow_kubeadm() {
        let mut s = PkiSpec::new("t1", "api.t1.example.com:6443");
        s.cert_sans = vec!["10.0.0.7".into(), "t1.internal".into()];
        s.advertise_address = Some("192.168.1.10".parse().unwrap());
        let sans = s.apiserver_sans().unwrap();
        assert_eq!(
            sans,
            [
                "t1",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
                "10.96.0.1",
                "192.168.1.10",
                "api.t1.example.com",
                "10.0.0.7",
                "t1.internal"
            ]
        );
        assert_eq!(s.server_url(), "https://api.t1.example.com:6443");
    }

    #[test]
    fn bad_names_name_their_field() {
        let mut s = PkiSpec::new("t1", "api.example.com");
        s.cert_sans = vec!["ok.example.com".into(), "not a name".into()];
        assert_eq!(
            s.check().unwrap_err().to_string(),
            "certSANs[1]: \"not a name\" is neither an IP address nor a DNS name"
        );
        let mut s = PkiSpec::new("t1", "api.example.com");
        s.service_cidr = "10.96.0.0".into();
        assert!(
            s.check()
                .unwrap_err()
                .to_string()
                .starts_with("serviceCidr: \"10.96.0.0\" is not a CIDR")
        );
        let s = PkiSpec::new("t1", "[fd00::1]:7443");
        assert_eq!(s.host_port(), ("fd00::1".to_string(), 7443));
        assert_eq!(s.server_url(), "https://[fd00::1]:7443");
    }
}
