//! The components' command lines, built the way Kamaji builds its Deployment's container
//! args (kubeadm's static-pod flags, pointed at the tenant's files), with the user's
//! `extraArgs` winning flag by flag, as in Kamaji.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use crate::layout::{Ca, LayoutError, TenantLayout};

/// Kamaji's default `spec.kubernetes.admissionControllers`.
pub const DEFAULT_ADMISSION_PLUGINS: [&str; 17] = [
    "CertificateApproval",
    "CertificateSigning",
    "CertificateSubjectRestriction",
    "DefaultIngressClass",
    "DefaultStorageClass",
    "DefaultTolerationSeconds",
    "LimitRanger",
    "MutatingAdmissionWebhook",
    "NamespaceLifecycle",
    "PersistentVolumeClaimResize",
    "Priority",
    "ResourceQuota",
    "RuntimeClass",
    "ServiceAccount",
    "StorageObjectInUseProtection",
    "TaintNodesByCondition",
    "ValidatingAdmissionWebhook",
];

/// Why a user's argument was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FlagError {
    /// An `extraArgs` entry is not `--name` or `--name=value`.
    #[error("extraArgs[{index}]: `{arg}` is not a flag (--name or --name=value)")]
    NotAFlag {
        /// Its position in the list.
        index: usize,
        /// The entry.
        arg: String,
    },
}

/// A command line as ordered `--name[=value]` flags, one value per name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flags {
    entries: Vec<(String, Option<String>)>,
}

impl Flags {
    /// No flags.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `--name=value`, replacing an earlier value in its place.
    pub fn set(&mut self, name: &str, value: impl Into<String>) -> &mut Self {
        self.put(name, Some(value.into()))
    }

    /// Sets `--name=<path>`.
    pub fn path(&mut self, name: &str, path: &Path) -> &mut Self {
        self.set(name, path.display().to_string())
    }

    fn put(&mut self, name: &str, value: Option<String>) -> &mut Self {
        match self.entries.iter_mut().find(|(n, _)| n == name) {
            Some(entry) => entry.1 = value,
            None => self.entries.push((name.to_owned(), value)),
        }
        self
    }

    /// The value of `--name`, if set with one.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    /// Applies the user's `extraArgs`: each replaces ours of the same name or is added.
    ///
    /// ```
    /// let mut f = kmetal_runtime::flags::Flags::new();
    /// f.set("secure-port", "6443").set("v", "0");
    /// f.apply_extra(&["--v=4", "--profiling"]).unwrap();
    /// assert_eq!(f.to_args(), ["--secure-port=6443", "--v=4", "--profiling"]);
    /// assert!(f.apply_extra(&["v=4"]).is_err());
    /// ```
    pub fn apply_extra<S: AsRef<str>>(&mut self, extra: &[S]) -> Result<(), FlagError> {
        for (index, arg) in extra.iter().enumerate() {
            let arg = arg.as_ref();
            let body = arg
                .strip_prefix("--")
                .filter(|b| !b.is_empty() && !b.starts_with('='))
                .ok_or_else(|| FlagError::NotAFlag {
                    index,
                    arg: arg.to_owned(),
                })?;
            match body.split_once('=') {
                Some((name, value)) => self.put(name, Some(value.to_owned())),
                None => self.put(body, None),
            };
        }
        Ok(())
    }

    /// The arguments, `--name=value` or `--name`.
    pub fn to_args(&self) -> Vec<String> {
        self.entries
            .iter()
            .map(|(n, v)| match v {
                Some(v) => format!("--{n}={v}"),
                None => format!("--{n}"),
            })
            .collect()
    }
}

/// How the api-server authenticates to its etcd endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum EtcdTls {
    /// Plain `http://` endpoints.
    #[default]
    None,
    /// The bundle's `apiserver-etcd-client` certificate and `etcd/ca.crt` (kmetal's gateway
    /// or a dedicated etcd, both serving with the tenant's etcd CA).
    Bundle,
    /// Files issued elsewhere (a shared datastore's CA and the tenant's client certificate).
    Files {
        /// CA that signs the etcd servers' certificates.
        ca: PathBuf,
        /// Client certificate.
        cert: PathBuf,
        /// Its key.
        key: PathBuf,
    },
}

/// The api-server's etcd: endpoints, authentication and key prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdClient {
    /// `--etcd-servers`.
    pub servers: Vec<String>,
    /// How it authenticates.
    pub tls: EtcdTls,
    /// `--etcd-prefix` (the api-server's `/registry` when `None`).
    pub prefix: Option<String>,
}

/// The egress selector (`--egress-selector-config-file`) for traffic to the cluster's nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Egress {
    /// Konnectivity's gRPC frontend on a unix socket (Kamaji's setup).
    GrpcUds(PathBuf),
    /// Konnectivity's HTTP CONNECT frontend on a unix socket.
    HttpConnectUds(PathBuf),
}

impl Egress {
    /// The `EgressSelectorConfiguration` file's text.
    pub fn config(&self) -> String {
        let (protocol, socket) = match self {
            Self::GrpcUds(p) => ("GRPC", p),
            Self::HttpConnectUds(p) => ("HTTPConnect", p),
        };
        format!(
            "apiVersion: apiserver.k8s.io/v1beta1\n\
             kind: EgressSelectorConfiguration\n\
             egressSelections:\n\
             - name: cluster\n  \
               connection:\n    \
                 proxyProtocol: {protocol}\n    \
                 transport:\n      \
                   uds:\n        \
                     udsName: {}\n",
            socket.display()
        )
    }
}

/// What one kube-apiserver replica is started with.
#[derive(Debug, Clone)]
pub struct ApiserverInputs<'a> {
    /// The tenant's files.
    pub layout: &'a TenantLayout,
    /// The replica's own listening address (`--bind-address`, `--secure-port`).
    pub bind: SocketAddr,
    /// `--advertise-address`: the address the `kubernetes` Service's endpoints name.
    pub advertise: IpAddr,
    /// `--service-cluster-ip-range`.
    pub service_cidr: &'a str,
    /// The cluster domain (the service-account issuer is `kubernetes.default.svc.<domain>`).
    pub cluster_domain: &'a str,
    /// `--enable-admission-plugins` ([`DEFAULT_ADMISSION_PLUGINS`] when empty).
    pub admission_plugins: &'a [String],
    /// `--kubelet-preferred-address-types` (Kamaji's Hostname,InternalIP,ExternalIP when empty).
    pub kubelet_address_types: &'a [String],
    /// Its etcd.
    pub etcd: &'a EtcdClient,
    /// `--egress-selector-config-file`, already written.
    pub egress_file: Option<&'a Path>,
    /// Where it writes nothing it needs (`--cert-dir`, unused with our serving certificate).
    pub cert_dir: &'a Path,
}

/// kube-apiserver's flags.
pub fn apiserver(i: &ApiserverInputs<'_>) -> Result<Flags, LayoutError> {
    let l = i.layout;
    let mut f = Flags::new();
    f.set("advertise-address", i.advertise.to_string())
        .set("bind-address", i.bind.ip().to_string())
        .set("secure-port", i.bind.port().to_string())
        .path("cert-dir", i.cert_dir)
        .set("allow-privileged", "true")
        .set("authorization-mode", "Node,RBAC")
        .set("enable-bootstrap-token-auth", "true")
        .path("client-ca-file", &l.trust(Ca::Cluster)?)
        .path("tls-cert-file", &l.file("pki/apiserver.crt")?)
        .path("tls-private-key-file", &l.file("pki/apiserver.key")?)
        .path(
            "kubelet-client-certificate",
            &l.file("pki/apiserver-kubelet-client.crt")?,
        )
        .path(
            "kubelet-client-key",
            &l.file("pki/apiserver-kubelet-client.key")?,
        )
        .path(
            "proxy-client-cert-file",
            &l.file("pki/front-proxy-client.crt")?,
        )
        .path(
            "proxy-client-key-file",
            &l.file("pki/front-proxy-client.key")?,
        )
        .path("requestheader-client-ca-file", &l.trust(Ca::FrontProxy)?)
        .set("requestheader-allowed-names", "front-proxy-client")
        .set("requestheader-extra-headers-prefix", "X-Remote-Extra-")
        .set("requestheader-group-headers", "X-Remote-Group")
        .set("requestheader-username-headers", "X-Remote-User")
        .path("service-account-key-file", &l.file("pki/sa.pub")?)
        .path("service-account-signing-key-file", &l.file("pki/sa.key")?)
        .set(
            "service-account-issuer",
            format!("https://kubernetes.default.svc.{}", i.cluster_domain),
        )
        .set("service-cluster-ip-range", i.service_cidr)
        .set("etcd-servers", i.etcd.servers.join(","));
    let admission = if i.admission_plugins.is_empty() {
        DEFAULT_ADMISSION_PLUGINS.join(",")
    } else {
        i.admission_plugins.join(",")
    };
    f.set("enable-admission-plugins", admission);
    let address_types = if i.kubelet_address_types.is_empty() {
        "Hostname,InternalIP,ExternalIP".to_owned()
    } else {
        i.kubelet_address_types.join(",")
    };
    f.set("kubelet-preferred-address-types", address_types);
    match &i.etcd.tls {
        EtcdTls::None => {}
        EtcdTls::Bundle => {
            f.path("etcd-cafile", &l.trust(Ca::Etcd)?)
                .path("etcd-certfile", &l.file("pki/apiserver-etcd-client.crt")?)
                .path("etcd-keyfile", &l.file("pki/apiserver-etcd-client.key")?);
        }
        EtcdTls::Files { ca, cert, key } => {
            f.path("etcd-cafile", ca)
                .path("etcd-certfile", cert)
                .path("etcd-keyfile", key);
        }
    }
    if let Some(prefix) = &i.etcd.prefix {
        f.set("etcd-prefix", prefix.as_str());
    }
    if let Some(egress) = i.egress_file {
        f.path("egress-selector-config-file", egress);
    }
    if i.advertise.is_loopback() {
        // The `kubernetes` Service's endpoints may not name a loopback address: the
        // api-server would retry writing them every 10 s, forever.
        f.set("endpoint-reconciler-type", "none");
    }
    Ok(f)
}

/// kube-controller-manager's or kube-scheduler's flags: the bundle's kubeconfig for it,
/// leader election through a Lease in the tenant's own `kube-system`, its health port on
/// `bind`.
pub fn controller(
    component: crate::Component,
    layout: &TenantLayout,
    bind: SocketAddr,
    service_cidr: &str,
    cluster_cidr: Option<&str>,
    cert_dir: &Path,
) -> Result<Flags, LayoutError> {
    let kubeconfig = match component {
        crate::Component::Scheduler => layout.file("scheduler.conf")?,
        _ => layout.file("controller-manager.conf")?,
    };
    let mut f = Flags::new();
    f.path("kubeconfig", &kubeconfig)
        .path("authentication-kubeconfig", &kubeconfig)
        .path("authorization-kubeconfig", &kubeconfig)
        .set("bind-address", bind.ip().to_string())
        .set("secure-port", bind.port().to_string())
        .path("cert-dir", cert_dir)
        .set("leader-elect", "true");
    if component == crate::Component::ControllerManager {
        f.path("client-ca-file", &layout.trust(Ca::Cluster)?)
            .path(
                "requestheader-client-ca-file",
                &layout.trust(Ca::FrontProxy)?,
            )
            .path("cluster-signing-cert-file", &layout.file("pki/ca.crt")?)
            .path("cluster-signing-key-file", &layout.file("pki/ca.key")?)
            .path("root-ca-file", &layout.trust(Ca::Cluster)?)
            .path(
                "service-account-private-key-file",
                &layout.file("pki/sa.key")?,
            )
            .set("use-service-account-credentials", "true")
            .set("controllers", "*,bootstrapsigner,tokencleaner")
            .set("service-cluster-ip-range", service_cidr);
        if let Some(cidr) = cluster_cidr {
            f.set("cluster-cidr", cidr)
                .set("allocate-node-cidrs", "true");
        }
    }
    Ok(f)
}

/// Whether a dedicated etcd member founds its cluster or joins a running one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterState {
    /// `--initial-cluster-state=new`: every member of `initial_cluster` starts together.
    New,
    /// `--initial-cluster-state=existing`: a member added to a running cluster.
    Existing,
}

/// What one dedicated etcd member's command line is built from.
#[derive(Debug, Clone, Copy)]
pub struct EtcdMemberInputs<'a> {
    /// The member's name.
    pub name: &'a str,
    /// Its data dir.
    pub data_dir: &'a Path,
    /// Where clients reach it.
    pub client: SocketAddr,
    /// Where the other members reach it.
    pub peer: SocketAddr,
    /// `name=https://peer` for every member it starts with, itself included.
    pub initial_cluster: &'a str,
    /// New cluster or joining one.
    pub state: ClusterState,
    /// The cluster's token (members of different clusters never join each other).
    pub token: &'a str,
}

/// A dedicated etcd member's flags: client and peer TLS with certificate authentication,
/// both from the tenant's etcd CA (kubeadm's `etcd/server` and `etcd/peer` certificates).
pub fn etcd_member(layout: &TenantLayout, m: &EtcdMemberInputs<'_>) -> Result<Flags, LayoutError> {
    let trust = layout.trust(Ca::Etcd)?;
    let mut f = Flags::new();
    f.set("name", m.name)
        .path("data-dir", m.data_dir)
        .set("listen-client-urls", format!("https://{}", m.client))
        .set("advertise-client-urls", format!("https://{}", m.client))
        .set("listen-peer-urls", format!("https://{}", m.peer))
        .set("initial-advertise-peer-urls", format!("https://{}", m.peer))
        .set("initial-cluster", m.initial_cluster)
        .set(
            "initial-cluster-state",
            match m.state {
                ClusterState::New => "new",
                ClusterState::Existing => "existing",
            },
        )
        .set("initial-cluster-token", m.token)
        .path("cert-file", &layout.file("pki/etcd/server.crt")?)
        .path("key-file", &layout.file("pki/etcd/server.key")?)
        .path("trusted-ca-file", &trust)
        .set("client-cert-auth", "true")
        .path("peer-cert-file", &layout.file("pki/etcd/peer.crt")?)
        .path("peer-key-file", &layout.file("pki/etcd/peer.key")?)
        .path("peer-trusted-ca-file", &trust)
        .set("peer-client-cert-auth", "true")
        // kube-apiserver's watch cache asks for progress; kubeadm's static pod sets this too.
        .set("watch-progress-notify-interval", "5s")
        .set("logger", "zap")
        .set("log-outputs", "stderr");
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_args_replace_in_place_and_keep_switches() {
        let mut f = Flags::new();
        f.set("a", "1").set("b", "2");
        f.apply_extra(&["--b=3", "--c", "--a=", "--d=x=y"])
            .expect("flags");
        assert_eq!(f.to_args(), ["--a=", "--b=3", "--c", "--d=x=y"]);
        assert_eq!(f.get("d"), Some("x=y"));
        assert_eq!(f.get("c"), None);
    }

    #[test]
    fn refuses_what_is_not_a_flag_with_its_index() {
        for bad in ["-v=4", "--", "--=x", "v"] {
            let e = Flags::new().apply_extra(&["--ok", bad]).expect_err(bad);
            assert_eq!(
                e,
                FlagError::NotAFlag {
                    index: 1,
                    arg: bad.into()
                }
            );
        }
    }

    #[test]
    fn egress_names_the_socket_and_protocol() {
        let grpc = Egress::GrpcUds("/run/k/t.sock".into()).config();
        assert!(grpc.contains("proxyProtocol: GRPC") && grpc.contains("udsName: /run/k/t.sock"));
        let connect = Egress::HttpConnectUds("/s".into()).config();
        assert!(connect.contains("proxyProtocol: HTTPConnect"));
    }
}
