//! Validation: every problem in an object at once, each with its field path.
//!
//! [`validate_tenant`] and [`validate_datastore`] check one object; [`validate_tenant_update`]
//! and [`validate_datastore_update`] add the rules that compare an update with what is stored
//! (immutable fields, the Kubernetes upgrade rule).

use std::fmt;
use std::net::IpAddr;

use base64::Engine as _;

use crate::datastore::{CertKeyPair, ContentRef, DataStore, Driver};
use crate::field::{FieldError, FieldErrors, Problem};
use crate::net::{Cidr, HostPort, is_dns_label, is_dns_name, is_san_name};
use crate::tenant::{AgentMode, TenantControlPlane};
use crate::version::{KubernetesVersion, UpgradeStep};

struct Check(Vec<FieldError>);

impl Check {
    fn push(&mut self, path: impl Into<String>, problem: Problem) {
        self.0.push(FieldError::new(path, problem));
    }

    fn port(&mut self, path: &str, value: Option<i64>) {
        if let Some(p) = value
            && !(1..=65535).contains(&p)
        {
            self.push(
                path,
                Problem::OutOfRange {
                    min: 1,
                    max: 65535,
                    found: p,
                },
            );
        }
    }

    fn at_least(&mut self, path: &str, value: Option<i64>, min: i64) {
        if let Some(v) = value
            && v < min
        {
            self.push(path, Problem::TooSmall { min, found: v });
        }
    }

    fn cidr(&mut self, path: &str, value: Option<&str>) -> Option<Cidr> {
        let v = value?;
        match v.parse::<Cidr>() {
            Ok(c) => Some(c),
            Err(reason) => {
                self.push(
                    path,
                    Problem::InvalidCidr {
                        found: v.to_owned(),
                        reason,
                    },
                );
                None
            }
        }
    }

    fn known<T: fmt::Display>(
        &mut self,
        path: &str,
        value: Option<&T>,
        is_known: impl Fn(&T) -> bool,
        allowed: &'static [&'static str],
    ) {
        if let Some(v) = value
            && !is_known(v)
        {
            self.push(
                path,
                Problem::NotOneOf {
                    allowed,
                    found: v.to_string(),
                },
            );
        }
    }

    fn identifier(&mut self, path: &str, value: Option<&str>) {
        if let Some(v) = value {
            let ok = !v.is_empty()
                && v.len() <= 63
                && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                self.push(path, Problem::InvalidIdentifier { found: v.into() });
            }
        }
    }

    fn name(&mut self, path: &str, value: Option<&str>, label: bool) {
        match value {
            None => self.push(path, Problem::Required),
            Some(v) => {
                let ok = if label {
                    is_dns_label(v)
                } else {
                    is_dns_name(v)
                };
                if !ok {
                    self.push(
                        path,
                        Problem::InvalidName {
                            what: if label { "label" } else { "subdomain" },
                            found: v.into(),
                        },
                    );
                }
            }
        }
    }

    fn into_result(self) -> Result<(), FieldErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(FieldErrors(self.0))
        }
    }
}

/// Checks one TenantControlPlane. Run it before or after [`TenantControlPlane::apply_defaults`];
/// defaults never make a valid object invalid.
///
/// ```
/// use kmetal_core::{TenantControlPlane, validate::validate_tenant};
/// let mut tcp = TenantControlPlane::named("t1", Some("tenants"));
/// tcp.spec.network_profile.port = Some(70000);
/// let errs = validate_tenant(&tcp).unwrap_err();
/// let lines: Vec<String> = errs.0.iter().map(|e| e.to_string()).collect();
/// assert!(lines.contains(&"spec.controlPlane.service.serviceType: required".to_string()));
/// assert!(lines.contains(&"spec.kubernetes.version: required".to_string()));
/// assert!(lines.contains(&"spec.networkProfile.port: must be 1..=65535".to_string()));
/// ```
pub fn validate_tenant(tcp: &TenantControlPlane) -> Result<(), FieldErrors> {
    let mut c = Check(Vec::new());
    let md = &tcp.metadata;
    c.name("metadata.name", md.name.as_deref(), true);
    if let Some(ns) = md.namespace.as_deref()
        && !is_dns_label(ns)
    {
        c.push(
            "metadata.namespace",
            Problem::InvalidName {
                what: "label",
                found: ns.into(),
            },
        );
    }
    let spec = &tcp.spec;
    if let Some(ds) = spec.data_store.as_deref()
        && !is_dns_name(ds)
    {
        c.push(
            "spec.dataStore",
            Problem::InvalidName {
                what: "subdomain",
                found: ds.into(),
            },
        );
    }
    match tcp.dedicated_etcd_members() {
        Err(e) => c.0.push(e),
        Ok(Some(_)) if spec.data_store.is_some() => c.push(
            format!(
                "metadata.annotations[{}]",
                crate::tenant::DEDICATED_ETCD_ANNOTATION
            ),
            Problem::ConflictsWith {
                other: "spec.dataStore",
            },
        ),
        Ok(_) => {}
    }
    c.identifier("spec.dataStoreSchema", spec.data_store_schema.as_deref());
    c.identifier(
        "spec.dataStoreUsername",
        spec.data_store_username.as_deref(),
    );

    let dep = &spec.control_plane.deployment;
    c.at_least("spec.controlPlane.deployment.replicas", dep.replicas, 1);
    match &spec.control_plane.service.service_type {
        None => c.push("spec.controlPlane.service.serviceType", Problem::Required),
        Some(t) => c.known(
            "spec.controlPlane.service.serviceType",
            Some(t),
            |t| t.is_known(),
            crate::tenant::ServiceType::KNOWN,
        ),
    }

    let k = &spec.kubernetes;
    match k.version.as_deref() {
        None => c.push("spec.kubernetes.version", Problem::Required),
        Some(v) => {
            if let Err(reason) = v.parse::<KubernetesVersion>() {
                c.push(
                    "spec.kubernetes.version",
                    Problem::InvalidVersion {
                        found: v.into(),
                        reason,
                    },
                );
            }
        }
    }
    c.known(
        "spec.kubernetes.kubelet.cgroupfs",
        k.kubelet.cgroupfs.as_ref(),
        |v| v.is_known(),
        crate::tenant::CgroupDriver::KNOWN,
    );
    for (i, t) in k.kubelet.preferred_address_types.iter().enumerate() {
        c.known(
            &format!("spec.kubernetes.kubelet.preferredAddressTypes[{i}]"),
            Some(t),
            |v| v.is_known(),
            crate::tenant::AddressType::KNOWN,
        );
    }
    duplicates(
        &mut c,
        "spec.kubernetes.admissionControllers",
        &k.admission_controllers,
    );

    let np = &spec.network_profile;
    c.port("spec.networkProfile.port", np.port);
    if let Some(a) = np.address.as_deref()
        && a.parse::<IpAddr>().is_err()
        && !is_dns_name(a)
    {
        c.push(
            "spec.networkProfile.address",
            Problem::InvalidAddress { found: a.into() },
        );
    }
    if let Some(a) = np.advertise_address.as_deref()
        && a.parse::<IpAddr>().is_err()
    {
        c.push(
            "spec.networkProfile.advertiseAddress",
            Problem::InvalidIp { found: a.into() },
        );
    }
    for (i, s) in np.cert_sans.iter().enumerate() {
        if s.parse::<IpAddr>().is_err() && !is_san_name(s) {
            c.push(
                format!("spec.networkProfile.certSANs[{i}]"),
                Problem::InvalidAddress { found: s.clone() },
            );
        }
    }
    duplicates(&mut c, "spec.networkProfile.certSANs", &np.cert_sans);
    if let Some(d) = np.cluster_domain.as_deref()
        && !is_dns_name(d)
    {
        c.push(
            "spec.networkProfile.clusterDomain",
            Problem::InvalidName {
                what: "subdomain",
                found: d.into(),
            },
        );
    }
    let svc = c.cidr(
        "spec.networkProfile.serviceCidr",
        np.service_cidr.as_deref(),
    );
    let pod = c.cidr("spec.networkProfile.podCidr", np.pod_cidr.as_deref());
    if let (Some(s), Some(p)) = (svc, pod)
        && s.overlaps(&p)
    {
        c.push(
            "spec.networkProfile.podCidr",
            Problem::CidrOverlap {
                other: "spec.networkProfile.serviceCidr",
                found: p.to_string(),
            },
        );
    }
    for (i, ip) in np.dns_service_ips.iter().enumerate() {
        let path = format!("spec.networkProfile.dnsServiceIPs[{i}]");
        match ip.parse::<IpAddr>() {
            Err(_) => c.push(path, Problem::InvalidIp { found: ip.clone() }),
            Ok(addr) => {
                if let Some(s) = svc
                    && !s.contains(addr)
                {
                    c.push(
                        path,
                        Problem::OutsideCidr {
                            found: ip.clone(),
                            cidr: s.to_string(),
                        },
                    );
                }
            }
        }
    }
    for (i, r) in np.load_balancer_source_ranges.iter().enumerate() {
        c.cidr(
            &format!("spec.networkProfile.loadBalancerSourceRanges[{i}]"),
            Some(r),
        );
    }

    if let Some(k) = &spec.addons.konnectivity {
        c.port("spec.addons.konnectivity.server.port", k.server.port);
        c.known(
            "spec.addons.konnectivity.agent.mode",
            k.agent.mode.as_ref(),
            |m| m.is_known(),
            AgentMode::KNOWN,
        );
        c.at_least(
            "spec.addons.konnectivity.agent.replicas",
            k.agent.replicas,
            0,
        );
        let daemonset = matches!(k.agent.mode, None | Some(AgentMode::DaemonSet));
        if daemonset && k.agent.replicas.is_some_and(|r| r > 0) {
            c.push(
                "spec.addons.konnectivity.agent.replicas",
                Problem::MustBeZero {
                    because: "spec.addons.konnectivity.agent.mode is DaemonSet",
                },
            );
        }
        if let (Some(kp), Some(ap)) = (k.server.port, np.port)
            && kp == ap
        {
            c.push(
                "spec.addons.konnectivity.server.port",
                Problem::Duplicate {
                    found: format!("{kp} (same as spec.networkProfile.port)"),
                },
            );
        }
    }
    c.into_result()
}

fn duplicates(c: &mut Check, path: &str, values: &[String]) {
    let mut seen = std::collections::BTreeSet::new();
    for (i, v) in values.iter().enumerate() {
        if !seen.insert(v.as_str()) {
            c.push(
                format!("{path}[{i}]"),
                Problem::Duplicate { found: v.clone() },
            );
        }
    }
}

fn content_ref(c: &mut Check, path: &str, r: Option<&ContentRef>, required: bool) {
    let Some(r) = r else {
        if required {
            c.push(path, Problem::Required);
        }
        return;
    };
    match (&r.content, &r.secret_reference) {
        (Some(content), None) => {
            if let Err(e) = base64::engine::general_purpose::STANDARD.decode(content.trim()) {
                c.push(format!("{path}.content"), Problem::InvalidBase64(e));
            }
        }
        (None, Some(s)) => {
            c.name(
                &format!("{path}.secretReference.name"),
                s.name.as_deref(),
                false,
            );
            c.name(
                &format!("{path}.secretReference.namespace"),
                s.namespace.as_deref(),
                true,
            );
            if s.key_path.as_deref().is_none_or(str::is_empty) {
                c.push(format!("{path}.secretReference.keyPath"), Problem::Required);
            }
        }
        _ => c.push(
            path,
            Problem::ExactlyOneOf {
                fields: &["content", "secretReference"],
            },
        ),
    }
}

fn cert_key(c: &mut Check, path: &str, pair: Option<&CertKeyPair>, key_required: bool) {
    let Some(p) = pair else {
        c.push(path, Problem::Required);
        return;
    };
    content_ref(
        c,
        &format!("{path}.certificate"),
        p.certificate.as_ref(),
        true,
    );
    content_ref(
        c,
        &format!("{path}.privateKey"),
        p.private_key.as_ref(),
        key_required,
    );
}

/// Checks one DataStore.
///
/// ```
/// use kmetal_core::{DataStore, datastore::Driver, validate::validate_datastore};
/// let mut ds = DataStore::named("etcd-shared", None);
/// ds.spec.driver = Some(Driver::Etcd);
/// ds.spec.endpoints = vec!["etcd-0:2379".into()];
/// let errs = validate_datastore(&ds).unwrap_err();
/// assert_eq!(errs.0[0].to_string(), "spec.tlsConfig: required");
/// ```
pub fn validate_datastore(ds: &DataStore) -> Result<(), FieldErrors> {
    let mut c = Check(Vec::new());
    c.name("metadata.name", ds.metadata.name.as_deref(), false);
    let spec = &ds.spec;
    let driver = match &spec.driver {
        None => {
            c.push("spec.driver", Problem::Required);
            None
        }
        Some(d) if !d.is_known() => {
            c.push(
                "spec.driver",
                Problem::NotOneOf {
                    allowed: Driver::KNOWN,
                    found: d.to_string(),
                },
            );
            None
        }
        Some(d) => Some(d),
    };
    if spec.endpoints.is_empty() {
        c.push("spec.endpoints", Problem::Required);
    }
    if driver == Some(&Driver::Sqlite) {
        if spec.endpoints.len() > 1 {
            c.push(
                "spec.endpoints",
                Problem::DriverRule("SQLite takes exactly one endpoint: the database file path"),
            );
        }
        for (i, e) in spec.endpoints.iter().enumerate() {
            if e.trim().is_empty() {
                c.push(format!("spec.endpoints[{i}]"), Problem::Required);
            }
        }
    } else {
        for (i, e) in spec.endpoints.iter().enumerate() {
            if let Err(reason) = e.parse::<HostPort>() {
                c.push(
                    format!("spec.endpoints[{i}]"),
                    Problem::InvalidEndpoint {
                        found: e.clone(),
                        reason,
                    },
                );
            }
        }
        duplicates(&mut c, "spec.endpoints", &spec.endpoints);
    }

    let tls = spec.tls_config.as_ref();
    match driver {
        Some(Driver::Etcd) => match tls {
            None => c.push("spec.tlsConfig", Problem::Required),
            Some(t) => {
                // The operator signs each tenant's etcd client certificate with this CA.
                cert_key(
                    &mut c,
                    "spec.tlsConfig.certificateAuthority",
                    t.certificate_authority.as_ref(),
                    true,
                );
                cert_key(
                    &mut c,
                    "spec.tlsConfig.clientCertificate",
                    t.client_certificate.as_ref(),
                    true,
                );
            }
        },
        Some(Driver::MySql | Driver::PostgreSql | Driver::Nats) => {
            if tls.is_none() && spec.basic_auth.is_none() {
                c.push(
                    "spec",
                    Problem::OneOfRequired {
                        fields: &["tlsConfig", "basicAuth"],
                        why: "this driver needs credentials",
                    },
                );
            }
            if let Some(t) = tls {
                cert_key(
                    &mut c,
                    "spec.tlsConfig.certificateAuthority",
                    t.certificate_authority.as_ref(),
                    false,
                );
                if let Some(cc) = &t.client_certificate {
                    cert_key(&mut c, "spec.tlsConfig.clientCertificate", Some(cc), true);
                }
            }
        }
        _ => {}
    }
    if let Some(b) = &spec.basic_auth {
        content_ref(&mut c, "spec.basicAuth.username", b.username.as_ref(), true);
        content_ref(&mut c, "spec.basicAuth.password", b.password.as_ref(), true);
    }
    c.into_result()
}

fn immutable(c: &mut Check, path: &str, old: Option<&str>, new: Option<&str>) {
    if let Some(o) = old
        && new != Some(o)
    {
        c.push(
            path,
            Problem::Immutable {
                old: o.into(),
                new: new.unwrap_or("").into(),
            },
        );
    }
}

/// Checks an update of a TenantControlPlane against the stored object: the new object's own
/// rules, immutable fields, and the upgrade rule (no downgrade, one minor step at a time).
pub fn validate_tenant_update(
    old: &TenantControlPlane,
    new: &TenantControlPlane,
) -> Result<(), FieldErrors> {
    let mut c = Check(validate_tenant(new).err().map(|e| e.0).unwrap_or_default());
    let (o, n) = (&old.spec, &new.spec);
    immutable(
        &mut c,
        "spec.dataStoreSchema",
        o.data_store_schema.as_deref(),
        n.data_store_schema.as_deref(),
    );
    immutable(
        &mut c,
        "spec.dataStoreUsername",
        o.data_store_username.as_deref(),
        n.data_store_username.as_deref(),
    );
    // A dedicated etcd is not resized or dropped in place (its members hold the data).
    let etcd = |t: &TenantControlPlane| {
        t.metadata
            .annotations
            .get(crate::tenant::DEDICATED_ETCD_ANNOTATION)
            .cloned()
    };
    immutable(
        &mut c,
        &format!(
            "metadata.annotations[{}]",
            crate::tenant::DEDICATED_ETCD_ANNOTATION
        ),
        etcd(old).as_deref(),
        etcd(new).as_deref(),
    );
    let domain = |t: &TenantControlPlane| {
        t.spec
            .network_profile
            .cluster_domain
            .clone()
            .unwrap_or_else(|| crate::tenant::DEFAULT_CLUSTER_DOMAIN.into())
    };
    immutable(
        &mut c,
        "spec.networkProfile.clusterDomain",
        Some(&domain(old)),
        Some(&domain(new)),
    );
    let parse = |t: &TenantControlPlane| {
        t.spec
            .kubernetes
            .version
            .as_deref()
            .and_then(|v| v.parse::<KubernetesVersion>().ok())
    };
    if let (Some(from), Some(to)) = (parse(old), parse(new)) {
        let (f, t) = (from.to_string(), to.to_string());
        match from.upgrade_to(&to) {
            UpgradeStep::Downgrade => c.push(
                "spec.kubernetes.version",
                Problem::Downgrade { from: f, to: t },
            ),
            UpgradeStep::Skip => c.push(
                "spec.kubernetes.version",
                Problem::VersionSkip { from: f, to: t },
            ),
            _ => {}
        }
    }
    c.into_result()
}

/// Checks an update of a DataStore: its own rules, and the driver is immutable.
pub fn validate_datastore_update(old: &DataStore, new: &DataStore) -> Result<(), FieldErrors> {
    let mut c = Check(
        validate_datastore(new)
            .err()
            .map(|e| e.0)
            .unwrap_or_default(),
    );
    immutable(
        &mut c,
        "spec.driver",
        old.spec.driver.as_ref().map(Driver::as_str),
        new.spec.driver.as_ref().map(Driver::as_str),
    );
    c.into_result()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::{BasicAuth, SecretReference, TlsConfig};
    use crate::tenant::{KonnectivitySpec, ServiceType};

    fn good_tcp() -> TenantControlPlane {
        let mut t = TenantControlPlane::named("t1", Some("tenants"));
        t.spec.control_plane.service.service_type = Some(ServiceType::LoadBalancer);
        t.spec.kubernetes.version = Some("v1.30.2".into());
        t
    }

    fn paths(r: Result<(), FieldErrors>) -> Vec<String> {
        r.err()
            .map(|e| e.0.into_iter().map(|e| e.to_string()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn good_tenant_passes_before_and_after_defaults() {
        let mut t = good_tcp();
        assert!(validate_tenant(&t).is_ok());
        t.apply_defaults();
        assert!(validate_tenant(&t).is_ok());
    }

    #[test]
    fn every_tenant_problem_is_reported() {
        let mut t = good_tcp();
        t.metadata.name = Some("Bad_Name".into());
        t.spec.control_plane.service.service_type = Some(ServiceType::parse("Ingress"));
        t.spec.kubernetes.version = Some("1.30".into());
        t.spec.control_plane.deployment.replicas = Some(0);
        let np = &mut t.spec.network_profile;
        np.port = Some(0);
        np.advertise_address = Some("api.example.com".into());
        np.service_cidr = Some("10.96.0.1/16".into());
        np.pod_cidr = Some("10.0.0.0/8".into());
        np.dns_service_ips = vec!["10.200.0.10".into()];
        np.cert_sans = vec!["ok.example".into(), "not valid".into()];
        let mut k = KonnectivitySpec::default();
        k.agent.replicas = Some(3);
        t.spec.addons.konnectivity = Some(k);
        let got = paths(validate_tenant(&t));
        let want = [
            "metadata.name: must be a lowercase RFC 1123 label (found \"Bad_Name\")",
            "spec.controlPlane.deployment.replicas: must be at least 1 (found 0)",
            "spec.controlPlane.service.serviceType: must be one of ClusterIP, NodePort, LoadBalancer (found \"Ingress\")",
            "spec.kubernetes.version: invalid version \"1.30\": must look like v1.30.2",
            "spec.networkProfile.port: must be 1..=65535",
            "spec.networkProfile.advertiseAddress: must be an IP address (found \"api.example.com\")",
            "spec.networkProfile.certSANs[1]: must be an IP address or DNS name (found \"not valid\")",
            "spec.networkProfile.serviceCidr: invalid CIDR \"10.96.0.1/16\": host bits are set; the network is 10.96.0.0/16",
            "spec.addons.konnectivity.agent.replicas: must be 0 when spec.addons.konnectivity.agent.mode is DaemonSet",
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn overlapping_cidrs_and_dns_ip_outside() {
        let mut t = good_tcp();
        t.spec.network_profile.service_cidr = Some("10.96.0.0/16".into());
        t.spec.network_profile.pod_cidr = Some("10.0.0.0/8".into());
        t.spec.network_profile.dns_service_ips = vec!["10.97.0.10".into()];
        let got = paths(validate_tenant(&t));
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].starts_with("spec.networkProfile.podCidr: overlaps"));
        assert!(got[1].starts_with("spec.networkProfile.dnsServiceIPs[0]: 10.97.0.10 is outside"));
    }

    #[test]
    fn update_rules() {
        let mut old = good_tcp();
        old.apply_defaults();
        let mut new = old.clone();
        new.spec.kubernetes.version = Some("v1.31.0".into());
        assert!(validate_tenant_update(&old, &new).is_ok());
        new.spec.kubernetes.version = Some("v1.32.0".into());
        new.spec.data_store_schema = Some("other".into());
        new.spec.network_profile.cluster_domain = Some("corp.local".into());
        let got = paths(validate_tenant_update(&old, &new));
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got[0].starts_with("spec.dataStoreSchema: field is immutable"));
        assert!(got[1].starts_with("spec.networkProfile.clusterDomain: field is immutable"));
        assert_eq!(
            got[2],
            "spec.kubernetes.version: cannot upgrade from v1.30.2 to v1.32.0: one minor version at a time"
        );
        new = old.clone();
        new.spec.kubernetes.version = Some("v1.29.9".into());
        assert_eq!(
            paths(validate_tenant_update(&old, &new)),
            ["spec.kubernetes.version: cannot downgrade from v1.30.2 to v1.29.9"]
        );
    }

    fn inline(s: &str) -> ContentRef {
        ContentRef {
            content: Some(base64::engine::general_purpose::STANDARD.encode(s)),
            secret_reference: None,
        }
    }

    #[test]
    fn datastore_rules() {
        let mut ds = DataStore::named("pg", None);
        ds.spec.driver = Some(Driver::PostgreSql);
        ds.spec.endpoints = vec!["pg:5432".into(), "pg".into(), "pg:5432".into()];
        assert_eq!(
            paths(validate_datastore(&ds)),
            [
                "spec.endpoints[1]: invalid endpoint \"pg\": missing ':port' (expected host:port)",
                "spec.endpoints[2]: duplicate value \"pg:5432\"",
                "spec: this driver needs credentials: one of tlsConfig, basicAuth must be set",
            ]
        );
        ds.spec.endpoints.truncate(1);
        ds.spec.basic_auth = Some(BasicAuth {
            username: Some(inline("postgres")),
            password: Some(ContentRef {
                content: Some("!!!".into()),
                secret_reference: Some(SecretReference::default()),
            }),
        });
        assert_eq!(
            paths(validate_datastore(&ds)),
            ["spec.basicAuth.password: exactly one of content, secretReference must be set"]
        );
        ds.spec.basic_auth.as_mut().unwrap().password = Some(ContentRef {
            content: None,
            secret_reference: Some(SecretReference {
                name: Some("pg-secret".into()),
                namespace: Some("kamaji-system".into()),
                key_path: None,
            }),
        });
        assert_eq!(
            paths(validate_datastore(&ds)),
            ["spec.basicAuth.password.secretReference.keyPath: required"]
        );

        let mut etcd = DataStore::named("etcd", None);
        etcd.spec.driver = Some(Driver::Etcd);
        etcd.spec.endpoints = vec!["etcd-0:2379".into()];
        etcd.spec.tls_config = Some(TlsConfig {
            certificate_authority: Some(CertKeyPair {
                certificate: Some(inline("ca")),
                private_key: None,
            }),
            client_certificate: None,
        });
        assert_eq!(
            paths(validate_datastore(&etcd)),
            [
                "spec.tlsConfig.certificateAuthority.privateKey: required",
                "spec.tlsConfig.clientCertificate: required",
            ]
        );
        let mut changed = etcd.clone();
        changed.spec.driver = Some(Driver::PostgreSql);
        assert!(
            paths(validate_datastore_update(&etcd, &changed))
                .iter()
                .any(|p| p.starts_with("spec.driver: field is immutable"))
        );
    }
}
