//! kubeadm's certificate profile: for each certificate its file in kubeadm's layout, CN, O,
//! extended key usage, signer and SAN rule (kubeadm's `certs` phase is the reference).

use std::time::Duration;

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Usage {
    /// A certificate authority.
    Ca,
    /// A TLS server (serverAuth).
    Server,
    /// A TLS client (clientAuth).
    Client,
    /// Both (etcd server and peer certificates).
    ServerClient,
}

/// Which CA signs a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Signer {
    /// Self-signed (a CA).
    SelfSigned,
    /// The cluster CA (`ca`).
    ClusterCa,
    /// The front-proxy CA.
    FrontProxyCa,
    /// The etcd CA (dedicated etcd).
    EtcdCa,
    /// The shared datastore's CA (shared etcd; the DataStore's CA with its key).
    DatastoreCa,
}

/// Which names a certificate's SANs carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SanRule {
    /// None.
    None,
    /// The api-server's: node names, `kubernetes`, `kubernetes.default(.svc(.<domain>))`, the
    /// first service IP, advertise address, endpoint host, certSANs.
    ApiServer,
    /// etcd's: node names, `localhost`, `127.0.0.1`, `::1`.
    Etcd,
}

/// Which identity a certificate carries beyond its fixed CN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subject {
    /// The CN in the profile.
    Fixed,
    /// The first node name (etcd server and peer).
    NodeName,
    /// The tenant's datastore user (shared etcd: the CN is the etcd user).
    DatastoreUser,
}

/// One certificate of the profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    /// Short name, as `kubeadm certs` names it (`apiserver`, `etcd-server`, `admin.conf`).
    pub name: &'static str,
    /// Path without extension in kubeadm's layout (`pki/apiserver`), or the kubeconfig file.
    pub path: &'static str,
    /// Common name (when [`Subject::Fixed`]).
    pub cn: &'static str,
    /// Organisation, if any.
    pub org: Option<&'static str>,
    /// Key usage.
    pub usage: Usage,
    /// Signer.
    pub signer: Signer,
    /// SANs.
    pub sans: SanRule,
    /// Where the CN comes from.
    pub subject: Subject,
    /// Whether the certificate lives inside a kubeconfig rather than in `pki/`.
    pub kubeconfig: bool,
}

/// Validity of CAs (kubeadm: 10 years).
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Validity of leaves (kubeadm: 365 days).
pub const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// NotBefore is backdated so that slightly slow clocks accept new certificates.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);

const fn leaf(
    name: &'static str,
    path: &'static str,
    cn: &'static str,
    org: Option<&'static str>,
    usage: Usage,
    signer: Signer,
) -> Profile {
    Profile {
        name,
        path,
        cn,
        org,
        usage,
        signer,
        sans: SanRule::None,
        subject: Subject::Fixed,
        kubeconfig: false,
    }
}

const fn kubeconfig(name: &'static str, cn: &'static str, org: Option<&'static str>) -> Profile {
    Profile {
        name,
        path: name,
        cn,
        org,
        usage: Usage::Client,
        signer: Signer::ClusterCa,
        sans: SanRule::None,
        subject: Subject::Fixed,
        kubeconfig: true,
    }
}

/// The cluster CA.
pub const CA: Profile = leaf(
    "ca",
    "pki/ca",
    "kubernetes",
    None,
    Usage::Ca,
    Signer::SelfSigned,
);
/// The front-proxy CA.
pub const FRONT_PROXY_CA: Profile = leaf(
    "front-proxy-ca",
    "pki/front-proxy-ca",
    "front-proxy-ca",
    None,
    Usage::Ca,
    Signer::SelfSigned,
);
/// The etcd CA (dedicated etcd only).
pub const ETCD_CA: Profile = leaf(
    "etcd-ca",
    "pki/etcd/ca",
    "etcd-ca",
    None,
    Usage::Ca,
    Signer::SelfSigned,
);

/// Every certificate authority, in signing order.
pub const CAS: [Profile; 3] = [CA, FRONT_PROXY_CA, ETCD_CA];

/// Every leaf certificate and kubeconfig identity.
pub const LEAVES: [Profile; 15] = [
    Profile {
        sans: SanRule::ApiServer,
        ..leaf(
            "apiserver",
            "pki/apiserver",
            "kube-apiserver",
            None,
            Usage::Server,
            Signer::ClusterCa,
        )
    },
    leaf(
        "apiserver-kubelet-client",
        "pki/apiserver-kubelet-client",
        "kube-apiserver-kubelet-client",
        Some("kubeadm:cluster-admins"),
        Usage::Client,
        Signer::ClusterCa,
    ),
    leaf(
        "front-proxy-client",
        "pki/front-proxy-client",
        "front-proxy-client",
        None,
        Usage::Client,
        Signer::FrontProxyCa,
    ),
    Profile {
        sans: SanRule::Etcd,
        subject: Subject::NodeName,
        ..leaf(
            "etcd-server",
            "pki/etcd/server",
            "",
            None,
            Usage::ServerClient,
            Signer::EtcdCa,
        )
    },
    Profile {
        sans: SanRule::Etcd,
        subject: Subject::NodeName,
        ..leaf(
            "etcd-peer",
            "pki/etcd/peer",
            "",
            None,
            Usage::ServerClient,
            Signer::EtcdCa,
        )
    },
    leaf(
        "etcd-healthcheck-client",
        "pki/etcd/healthcheck-client",
        "kube-etcd-healthcheck-client",
        None,
        Usage::Client,
        Signer::EtcdCa,
    ),
    leaf(
        "apiserver-etcd-client",
        "pki/apiserver-etcd-client",
        "kube-apiserver-etcd-client",
        None,
        Usage::Client,
        Signer::EtcdCa,
    ),
    Profile {
        subject: Subject::DatastoreUser,
        ..leaf(
            "datastore-client",
            "pki/datastore-client",
            "",
            None,
            Usage::Client,
            Signer::DatastoreCa,
        )
    },
    Profile {
        sans: SanRule::ApiServer,
        ..leaf(
            "konnectivity-server",
            "pki/konnectivity-server",
            "konnectivity-server",
            None,
            Usage::Server,
            Signer::ClusterCa,
        )
    },
    leaf(
        "konnectivity-agent",
        "pki/konnectivity-agent",
        "system:konnectivity-agent",
        None,
        Usage::Client,
        Signer::ClusterCa,
    ),
    kubeconfig(
        "admin.conf",
        "kubernetes-admin",
        Some("kubeadm:cluster-admins"),
    ),
    kubeconfig(
        "super-admin.conf",
        "kubernetes-super-admin",
        Some("system:masters"),
    ),
    kubeconfig(
        "controller-manager.conf",
        "system:kube-controller-manager",
        None,
    ),
    kubeconfig("scheduler.conf", "system:kube-scheduler", None),
    kubeconfig(
        "konnectivity-server.conf",
        "system:konnectivity-server",
        None,
    ),
];

/// The profile named `name` (a CA or a leaf).
pub fn by_name(name: &str) -> Option<&'static Profile> {
    CAS.iter().chain(LEAVES.iter()).find(|p| p.name == name)
}

/// The service-account signing key pair (`sa.key` / `sa.pub`): a key, not a certificate,
/// and never renewed (renewing it would invalidate every issued token).
pub const SERVICE_ACCOUNT_KEY: &str = "pki/sa.key";
/// The service-account public key.
pub const SERVICE_ACCOUNT_PUB: &str = "pki/sa.pub";
