//! `TenantControlPlane`: one tenant cluster's control plane, as Kamaji models it.
//!
//! Kubernetes core types that kmetal passes through untouched (resource requirements,
//! tolerations, affinity, spread constraints, addon specs) are kept as opaque JSON values.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::macros::is_default;
use crate::meta::Condition;
use crate::net::Cidr;
use crate::object::{Resource, ResourceSpec};

/// A tenant control plane (`kamaji.clastix.io/v1alpha1`, kind `TenantControlPlane`, short name `tcp`).
pub type TenantControlPlane = Resource<TenantControlPlaneSpec>;

/// Default control-plane replicas.
pub const DEFAULT_REPLICAS: i64 = 2;
/// Default API server port.
pub const DEFAULT_PORT: i64 = 6443;
/// Default cluster DNS domain.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
/// Default service CIDR.
pub const DEFAULT_SERVICE_CIDR: &str = "10.96.0.0/16";
/// Default pod CIDR.
pub const DEFAULT_POD_CIDR: &str = "10.244.0.0/16";
/// Default Konnectivity server port.
pub const DEFAULT_KONNECTIVITY_PORT: i64 = 8132;

/// Desired state of a tenant control plane.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TenantControlPlaneSpec {
    /// Name of the `DataStore` backing this tenant; empty means the operator's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_store: Option<String>,
    /// etcd key prefix or SQL database name; immutable; defaults from the object's uid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_store_schema: Option<String>,
    /// Datastore user; immutable; defaults from the object's uid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_store_username: Option<String>,
    /// Control-plane pods and their service.
    #[serde(skip_serializing_if = "is_default")]
    pub control_plane: ControlPlaneSpec,
    /// Kubernetes version and component settings.
    #[serde(skip_serializing_if = "is_default")]
    pub kubernetes: KubernetesSpec,
    /// Addresses, ports and CIDRs.
    #[serde(skip_serializing_if = "is_default")]
    pub network_profile: NetworkProfile,
    /// CoreDNS, kube-proxy and Konnectivity.
    #[serde(skip_serializing_if = "is_default")]
    pub addons: Addons,
}

impl ResourceSpec for TenantControlPlaneSpec {
    const KIND: &'static str = "TenantControlPlane";
    const NAMESPACED: bool = true;
    type Status = TenantControlPlaneStatus;
}

/// `spec.controlPlane`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ControlPlaneSpec {
    /// The control-plane Deployment.
    #[serde(skip_serializing_if = "is_default")]
    pub deployment: DeploymentSpec,
    /// The Service exposing the API server.
    #[serde(skip_serializing_if = "is_default")]
    pub service: ServiceSpec,
}

/// `spec.controlPlane.deployment`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DeploymentSpec {
    /// Control-plane replicas (default 2, at least 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i64>,
    /// Resource requirements per component.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<ControlPlaneResources>,
    /// Node selector for the control-plane pods.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations (Kubernetes `Toleration` objects, passed through).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Value>,
    /// Affinity (Kubernetes `Affinity`, passed through).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Value>,
    /// Topology spread constraints (passed through).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<Value>,
    /// Extra command-line arguments per component.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra_args: Option<ControlPlaneExtraArgs>,
    /// Labels and annotations added to the pods.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub additional_metadata: Option<AdditionalMetadata>,
}

/// Per-component resource requirements (each a Kubernetes `ResourceRequirements`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ControlPlaneResources {
    /// kube-apiserver.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_server: Option<Value>,
    /// kube-controller-manager.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controller_manager: Option<Value>,
    /// kube-scheduler.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<Value>,
    /// The kine sidecar (SQL datastores).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kine: Option<Value>,
}

/// Per-component extra arguments.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ControlPlaneExtraArgs {
    /// kube-apiserver.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub api_server: Vec<String>,
    /// kube-controller-manager.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub controller_manager: Vec<String>,
    /// kube-scheduler.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scheduler: Vec<String>,
    /// The kine sidecar.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kine: Vec<String>,
}

/// Extra labels and annotations.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AdditionalMetadata {
    /// Labels.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

string_enum! {
    /// How the API server Service is exposed.
    ServiceType {
        /// In-cluster virtual IP.
        ClusterIp => "ClusterIP",
        /// A port on every node.
        NodePort => "NodePort",
        /// An external load balancer.
        LoadBalancer => "LoadBalancer",
    }
}

/// `spec.controlPlane.service`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServiceSpec {
    /// Required: ClusterIP, NodePort or LoadBalancer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_type: Option<ServiceType>,
    /// Labels and annotations added to the Service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub additional_metadata: Option<AdditionalMetadata>,
}

/// `spec.kubernetes`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct KubernetesSpec {
    /// Required: `vMAJOR.MINOR.PATCH`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Kubelet settings pushed to joining workers.
    #[serde(skip_serializing_if = "is_default")]
    pub kubelet: KubeletSpec,
    /// Admission plugins enabled on the API server.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub admission_controllers: Vec<String>,
}

string_enum! {
    /// Kubelet cgroup driver.
    CgroupDriver {
        /// systemd.
        Systemd => "systemd",
        /// cgroupfs.
        Cgroupfs => "cgroupfs",
    }
}

string_enum! {
    /// Node address types, in the kubelet's preference order.
    AddressType {
        /// Node hostname.
        Hostname => "Hostname",
        /// Internal IP.
        InternalIp => "InternalIP",
        /// External IP.
        ExternalIp => "ExternalIP",
        /// Internal DNS name.
        InternalDns => "InternalDNS",
        /// External DNS name.
        ExternalDns => "ExternalDNS",
    }
}

/// `spec.kubernetes.kubelet`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct KubeletSpec {
    /// Cgroup driver.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroupfs: Option<CgroupDriver>,
    /// Address types the API server tries when reaching kubelets.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub preferred_address_types: Vec<AddressType>,
    /// JSON patches applied to the kubelet configuration.
    #[serde(
        rename = "configurationJSONPatches",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub configuration_json_patches: Vec<Value>,
}

/// `spec.networkProfile`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NetworkProfile {
    /// Address the API server is reached at (IP or DNS name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// IP the API server advertises to cluster members.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_address: Option<String>,
    /// API server port (default 6443).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    /// Extra names and IPs for the API server certificate.
    #[serde(rename = "certSANs", skip_serializing_if = "Vec::is_empty")]
    pub cert_sans: Vec<String>,
    /// Cluster DNS domain (default cluster.local); immutable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_domain: Option<String>,
    /// Service CIDR (default 10.96.0.0/16).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_cidr: Option<String>,
    /// Pod CIDR (default 10.244.0.0/16).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_cidr: Option<String>,
    /// Cluster DNS service IPs (default: the 10th address of the service CIDR).
    #[serde(rename = "dnsServiceIPs", skip_serializing_if = "Vec::is_empty")]
    pub dns_service_ips: Vec<String>,
    /// Source ranges allowed to reach a LoadBalancer service.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub load_balancer_source_ranges: Vec<String>,
}

/// `spec.addons`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Addons {
    /// CoreDNS addon (passed through; present means enabled).
    #[serde(rename = "coreDNS", skip_serializing_if = "Option::is_none")]
    pub core_dns: Option<Value>,
    /// kube-proxy addon (passed through; present means enabled).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kube_proxy: Option<Value>,
    /// Konnectivity reverse tunnel (present means enabled).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub konnectivity: Option<KonnectivitySpec>,
}

/// `spec.addons.konnectivity`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct KonnectivitySpec {
    /// The server, next to the API server.
    #[serde(skip_serializing_if = "is_default")]
    pub server: KonnectivityServerSpec,
    /// The agent, on the workers.
    #[serde(skip_serializing_if = "is_default")]
    pub agent: KonnectivityAgentSpec,
}

/// `spec.addons.konnectivity.server`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct KonnectivityServerSpec {
    /// Agent port (default 8132).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    /// Image tag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Resource requirements (passed through).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<Value>,
    /// Extra arguments.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extra_args: Vec<String>,
}

string_enum! {
    /// How agents run on the workers.
    AgentMode {
        /// One agent per node.
        DaemonSet => "DaemonSet",
        /// A fixed number of agents.
        Deployment => "Deployment",
    }
}

/// `spec.addons.konnectivity.agent`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct KonnectivityAgentSpec {
    /// DaemonSet (default) or Deployment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<AgentMode>,
    /// Replicas in Deployment mode; must be 0 in DaemonSet mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i64>,
    /// Image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Image tag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Tolerations (passed through).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Value>,
    /// Extra arguments.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extra_args: Vec<String>,
}

string_enum! {
    /// Lifecycle phase, as Kamaji reports it in `status.kubernetesResources.version.status`.
    Phase {
        /// Not observed yet.
        Unknown => "Unknown",
        /// Being created.
        Provisioning => "Provisioning",
        /// The CA is being rotated.
        CertificateAuthorityRotating => "CertificateAuthorityRotating",
        /// Kubernetes version change in progress.
        Upgrading => "Upgrading",
        /// Moving to another DataStore.
        Migrating => "Migrating",
        /// Serving.
        Ready => "Ready",
        /// Created but not serving.
        NotReady => "NotReady",
        /// Scaled to zero.
        Sleeping => "Sleeping",
        /// The datastore refuses writes (quota).
        WriteLimited => "WriteLimited",
    }
}

/// Observed state of a tenant control plane.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TenantControlPlaneStatus {
    /// `host:port` the tenant's API server is reached at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_plane_endpoint: Option<String>,
    /// Version and phase.
    #[serde(skip_serializing_if = "is_default")]
    pub kubernetes_resources: KubernetesResourcesStatus,
    /// Datastore slice in use.
    #[serde(skip_serializing_if = "is_default")]
    pub storage: StorageStatus,
    /// Certificate name → issue and expiry times.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub certificates: BTreeMap<String, CertificateStatus>,
    /// Where each control-plane replica runs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaPlacement>,
    /// Conditions (`Ready`, `DataStoreProvisioned`, ...).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Generation last reconciled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl TenantControlPlaneStatus {
    /// The phase, `Unknown` when not reported.
    pub fn phase(&self) -> Phase {
        self.kubernetes_resources
            .version
            .status
            .clone()
            .unwrap_or(Phase::Unknown)
    }
}

/// `status.kubernetesResources`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct KubernetesResourcesStatus {
    /// Running version and phase.
    #[serde(skip_serializing_if = "is_default")]
    pub version: VersionStatus,
    /// The control plane's replicas (Kamaji: the Deployment's status), with each
    /// component process's state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deployment: Option<DeploymentStatus>,
}

/// `status.kubernetesResources.deployment`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DeploymentStatus {
    /// api-server replicas asked for.
    pub replicas: i64,
    /// api-server replicas answering `/readyz`.
    pub ready_replicas: i64,
    /// Every component process: `kube-apiserver-0`, `kube-controller-manager-0`, ….
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<ComponentStatus>,
}

/// One component process of the control plane.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ComponentStatus {
    /// `kube-apiserver-0`.
    pub name: String,
    /// `ready`, `starting`, `not ready: …`, `restarting: …`.
    pub state: String,
    /// Restarts so far.
    pub restarts: u32,
}

/// `status.kubernetesResources.version`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VersionStatus {
    /// Running Kubernetes version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Phase>,
}

/// `status.storage`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StorageStatus {
    /// Driver of the DataStore in use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// Name of the DataStore in use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_store_name: Option<String>,
    /// Schema and user provisioned.
    #[serde(skip_serializing_if = "is_default")]
    pub setup: StorageSetup,
    /// The tenant's dedicated etcd (kmetal's [`DEDICATED_ETCD_ANNOTATION`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedicated_etcd: Option<DedicatedEtcdStatus>,
}

/// `status.storage.dedicatedEtcd`: the members of a tenant's dedicated etcd.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DedicatedEtcdStatus {
    /// A majority of the members is healthy.
    pub quorum: bool,
    /// Each member.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<EtcdMemberStatus>,
}

/// One member of a dedicated etcd.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EtcdMemberStatus {
    /// Member name (the node it was placed on).
    pub name: String,
    /// The node it runs on.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// The node's zone.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub zone: String,
    /// Its client URL.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub client_url: String,
    /// `healthy`, `healthy (leader)`, `down: …`, `being replaced`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub state: String,
    /// How often it was replaced on a fresh data dir.
    #[serde(skip_serializing_if = "is_default")]
    pub replacements: u32,
}

/// `status.storage.setup`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StorageSetup {
    /// Provisioned schema (etcd prefix or database).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// Provisioned user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// Issue and expiry time of one certificate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CertificateStatus {
    /// RFC 3339 time of the last (re)issue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_update: Option<String>,
    /// RFC 3339 expiry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    /// Checksum of the stored certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

/// Where one control-plane replica was placed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ReplicaPlacement {
    /// Replica name.
    pub name: String,
    /// Under-cluster node.
    pub node: String,
    /// Zone of that node.
    pub zone: String,
}

/// Turns a uid into the default schema/user name: SQL and etcd safe, collision-free.
fn schema_from_uid(uid: &str) -> String {
    uid.replace('-', "_")
}

/// Annotation asking kmetal to run a dedicated etcd of this many members for the tenant
/// (`"1"`, `"3"`, `"5"` or `"7"`), placed on the under cluster's nodes and served with the
/// etcd CA of the tenant's own PKI. Kamaji has no such thing (its dedicated etcd is a
/// DataStore someone else runs); the tenant then names no `spec.dataStore`.
pub const DEDICATED_ETCD_ANNOTATION: &str = "kmetal.io/dedicated-etcd";

/// The member counts [`DEDICATED_ETCD_ANNOTATION`] accepts (odd: a majority survives a loss).
pub const DEDICATED_ETCD_SIZES: &[&str] = &["1", "3", "5", "7"];

impl TenantControlPlane {
    /// The members of the dedicated etcd the tenant asks for ([`DEDICATED_ETCD_ANNOTATION`]),
    /// `None` when it uses a DataStore.
    ///
    /// ```
    /// use kmetal_core::TenantControlPlane;
    /// use kmetal_core::tenant::DEDICATED_ETCD_ANNOTATION;
    /// let mut tcp = TenantControlPlane::named("t1", Some("tenants"));
    /// assert_eq!(tcp.dedicated_etcd_members().ok(), Some(None));
    /// tcp.metadata.annotations.insert(DEDICATED_ETCD_ANNOTATION.into(), "3".into());
    /// assert_eq!(tcp.dedicated_etcd_members().ok(), Some(Some(3)));
    /// tcp.metadata.annotations.insert(DEDICATED_ETCD_ANNOTATION.into(), "2".into());
    /// let e = tcp.dedicated_etcd_members().unwrap_err();
    /// assert_eq!(e.to_string(), r#"metadata.annotations[kmetal.io/dedicated-etcd]: must be one of 1, 3, 5, 7 (found "2")"#);
    /// ```
    pub fn dedicated_etcd_members(&self) -> Result<Option<u32>, crate::FieldError> {
        let Some(v) = self.metadata.annotations.get(DEDICATED_ETCD_ANNOTATION) else {
            return Ok(None);
        };
        match v.trim().parse::<u32>() {
            Ok(n) if DEDICATED_ETCD_SIZES.contains(&v.trim()) => Ok(Some(n)),
            _ => Err(crate::FieldError::new(
                format!("metadata.annotations[{DEDICATED_ETCD_ANNOTATION}]"),
                crate::field::Problem::NotOneOf {
                    allowed: DEDICATED_ETCD_SIZES,
                    found: v.clone(),
                },
            )),
        }
    }

    /// Applies Kamaji's defaults in place. Assigns a uid first if the object has none, because
    /// the datastore schema and user derive from it (names collide across namespaces).
    ///
    /// ```
    /// use kmetal_core::TenantControlPlane;
    /// let mut tcp = TenantControlPlane::named("t1", Some("tenants"));
    /// tcp.metadata.uid = Some("3f1c0d2e-0000-4000-8000-000000000001".into());
    /// tcp.apply_defaults();
    /// let np = &tcp.spec.network_profile;
    /// assert_eq!(np.port, Some(6443));
    /// assert_eq!(np.dns_service_ips, ["10.96.0.10"]);
    /// assert_eq!(tcp.spec.data_store_schema.as_deref(), Some("3f1c0d2e_0000_4000_8000_000000000001"));
    /// ```
    pub fn apply_defaults(&mut self) {
        if self.metadata.namespace.is_none() {
            self.metadata.namespace = Some("default".into());
        }
        let uid = schema_from_uid(self.metadata.ensure_uid());
        let spec = &mut self.spec;
        spec.data_store_schema.get_or_insert_with(|| uid.clone());
        spec.data_store_username.get_or_insert(uid);
        spec.control_plane
            .deployment
            .replicas
            .get_or_insert(DEFAULT_REPLICAS);
        let np = &mut spec.network_profile;
        np.port.get_or_insert(DEFAULT_PORT);
        np.cluster_domain
            .get_or_insert_with(|| DEFAULT_CLUSTER_DOMAIN.into());
        np.service_cidr
            .get_or_insert_with(|| DEFAULT_SERVICE_CIDR.into());
        np.pod_cidr.get_or_insert_with(|| DEFAULT_POD_CIDR.into());
        if np.dns_service_ips.is_empty()
            && let Some(ip) = np
                .service_cidr
                .as_deref()
                .and_then(|c| c.parse::<Cidr>().ok())
                .and_then(|c| c.nth(10))
        {
            np.dns_service_ips.push(ip.to_string());
        }
        if let Some(k) = &mut spec.addons.konnectivity {
            k.server.port.get_or_insert(DEFAULT_KONNECTIVITY_PORT);
            k.agent.mode.get_or_insert(AgentMode::DaemonSet);
        }
    }

    /// The phase reported in status (`Unknown` without status).
    pub fn phase(&self) -> Phase {
        self.status
            .as_ref()
            .map(TenantControlPlaneStatus::phase)
            .unwrap_or(Phase::Unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_kamaji() {
        let mut t = TenantControlPlane::named("a", None);
        t.spec.addons.konnectivity = Some(KonnectivitySpec::default());
        t.apply_defaults();
        assert_eq!(t.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(t.spec.control_plane.deployment.replicas, Some(2));
        let np = &t.spec.network_profile;
        assert_eq!(np.cluster_domain.as_deref(), Some("cluster.local"));
        assert_eq!(np.service_cidr.as_deref(), Some("10.96.0.0/16"));
        assert_eq!(np.pod_cidr.as_deref(), Some("10.244.0.0/16"));
        let k = t.spec.addons.konnectivity.as_ref().unwrap();
        assert_eq!(k.server.port, Some(8132));
        assert_eq!(k.agent.mode, Some(AgentMode::DaemonSet));
        // Two tenants with the same name in different namespaces never share a schema.
        let mut u = TenantControlPlane::named("a", Some("other"));
        u.apply_defaults();
        assert_ne!(t.spec.data_store_schema, u.spec.data_store_schema);
    }

    #[test]
    fn defaults_keep_explicit_values() {
        let mut t = TenantControlPlane::named("a", Some("ns"));
        t.spec.network_profile.service_cidr = Some("10.0.0.0/24".into());
        t.spec.data_store_schema = Some("custom".into());
        t.apply_defaults();
        assert_eq!(t.spec.network_profile.dns_service_ips, ["10.0.0.10"]);
        assert_eq!(t.spec.data_store_schema.as_deref(), Some("custom"));
    }
}
