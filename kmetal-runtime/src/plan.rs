//! What a runtime runs for one tenant, built from its TenantControlPlane the way Kamaji
//! reads one: version, replicas, the Service address and port, network settings, admission
//! plugins and each component's `extraArgs`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use kmetal_core::TenantControlPlane;
use kmetal_core::version::{KubernetesVersion, VersionError};
use kmetal_pki::Bundle;

use crate::catalog::Component;
use crate::flags::{Egress, EtcdClient};
use crate::runtime::TenantId;

/// Why a TenantControlPlane does not make a plan; each names the field.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// A required field is not set.
    #[error("{field}: required")]
    Missing {
        /// The field path.
        field: &'static str,
    },
    /// `spec.kubernetes.version` is not a version.
    #[error("spec.kubernetes.version: `{value}`")]
    Version {
        /// What it holds.
        value: String,
        /// Why.
        #[source]
        source: VersionError,
    },
    /// The address the tenant is reached on is not an IP address (this runtime listens on
    /// it itself; a DNS name needs a load balancer in front).
    #[error("{field}: `{value}` is not an IP address")]
    NotAnAddress {
        /// The field path.
        field: &'static str,
        /// What it holds.
        value: String,
    },
    /// A number out of range.
    #[error("{field}: {value} is out of range")]
    OutOfRange {
        /// The field path.
        field: &'static str,
        /// What it holds.
        value: i64,
    },
}

/// One tenant's control plane, as a runtime runs it.
#[derive(Debug, Clone)]
pub struct ControlPlanePlan {
    /// Whose.
    pub tenant: TenantId,
    /// `spec.kubernetes.version`.
    pub version: KubernetesVersion,
    /// `spec.controlPlane.deployment.replicas`: api-servers, each with a controller-manager
    /// and a scheduler beside it (Kamaji's pod), one of each electing itself leader.
    pub replicas: usize,
    /// The tenant's Service address: what its kubeconfigs name.
    pub endpoint: SocketAddr,
    /// `--advertise-address`.
    pub advertise: IpAddr,
    /// The name the serving certificate is verified for (the endpoint's host).
    pub server_name: String,
    /// The tenant's PKI.
    pub bundle: Bundle,
    /// The api-servers' etcd.
    pub etcd: EtcdClient,
    /// The egress selector to the tenant's Konnectivity server.
    pub egress: Option<Egress>,
    /// `spec.networkProfile.serviceCidr`.
    pub service_cidr: String,
    /// `spec.networkProfile.podCidr`.
    pub pod_cidr: Option<String>,
    /// `spec.networkProfile.clusterDomain`.
    pub cluster_domain: String,
    /// `spec.kubernetes.admissionControllers`.
    pub admission_plugins: Vec<String>,
    /// `spec.kubernetes.kubelet.preferredAddressTypes`.
    pub kubelet_address_types: Vec<String>,
    /// `spec.controlPlane.deployment.extraArgs`, by component.
    pub extra_args: BTreeMap<Component, Vec<String>>,
}

impl ControlPlanePlan {
    /// The plan for `tcp` (its defaults applied) with its issued `bundle`, its `etcd` and
    /// egress.
    pub fn from_tenant(
        tcp: &TenantControlPlane,
        bundle: Bundle,
        etcd: EtcdClient,
        egress: Option<Egress>,
    ) -> Result<Self, PlanError> {
        let mut tcp = tcp.clone();
        tcp.apply_defaults();
        let tenant = TenantId::new(
            tcp.metadata.namespace.clone().unwrap_or_default(),
            tcp.metadata.name.clone().ok_or(PlanError::Missing {
                field: "metadata.name",
            })?,
        );
        let spec = &tcp.spec;
        let value = spec.kubernetes.version.clone().ok_or(PlanError::Missing {
            field: "spec.kubernetes.version",
        })?;
        let version = value
            .parse()
            .map_err(|source| PlanError::Version { value, source })?;
        let replicas = spec.control_plane.deployment.replicas.unwrap_or(1);
        let replicas = usize::try_from(replicas)
            .ok()
            .filter(|r| (1..=16).contains(r))
            .ok_or(PlanError::OutOfRange {
                field: "spec.controlPlane.deployment.replicas",
                value: replicas,
            })?;
        let np = &spec.network_profile;
        let (field, host) = match (&np.address, &np.advertise_address) {
            (Some(a), _) => ("spec.networkProfile.address", a.clone()),
            (None, Some(a)) => ("spec.networkProfile.advertiseAddress", a.clone()),
            (None, None) => {
                return Err(PlanError::Missing {
                    field: "spec.networkProfile.address",
                });
            }
        };
        let ip: IpAddr = host.parse().map_err(|_| PlanError::NotAnAddress {
            field,
            value: host.clone(),
        })?;
        let advertise = match &np.advertise_address {
            Some(a) => a.parse().map_err(|_| PlanError::NotAnAddress {
                field: "spec.networkProfile.advertiseAddress",
                value: a.clone(),
            })?,
            None => ip,
        };
        let port = np.port.unwrap_or(kmetal_core::tenant::DEFAULT_PORT);
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or(PlanError::OutOfRange {
                field: "spec.networkProfile.port",
                value: port,
            })?;
        let mut extra_args = BTreeMap::new();
        if let Some(x) = &spec.control_plane.deployment.extra_args {
            extra_args.insert(Component::ApiServer, x.api_server.clone());
            extra_args.insert(Component::ControllerManager, x.controller_manager.clone());
            extra_args.insert(Component::Scheduler, x.scheduler.clone());
        }
        Ok(Self {
            tenant,
            version,
            replicas,
            endpoint: SocketAddr::new(ip, port),
            advertise,
            server_name: host,
            bundle,
            etcd,
            egress,
            service_cidr: np
                .service_cidr
                .clone()
                .unwrap_or_else(|| kmetal_core::tenant::DEFAULT_SERVICE_CIDR.into()),
            pod_cidr: np.pod_cidr.clone(),
            cluster_domain: np
                .cluster_domain
                .clone()
                .unwrap_or_else(|| kmetal_core::tenant::DEFAULT_CLUSTER_DOMAIN.into()),
            admission_plugins: spec.kubernetes.admission_controllers.clone(),
            kubelet_address_types: spec
                .kubernetes
                .kubelet
                .preferred_address_types
                .iter()
                .map(|t| t.as_str().to_owned())
                .collect(),
            extra_args,
        })
    }

    /// The user's `extraArgs` for `component`.
    pub fn extra(&self, component: Component) -> &[String] {
        self.extra_args.get(&component).map_or(&[], Vec::as_slice)
    }
}
