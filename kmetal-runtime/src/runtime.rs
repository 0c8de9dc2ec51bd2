//! The runtime seam: what the operator asks of whatever runs tenant control planes (local
//! processes here; a Kubernetes Deployment in an under cluster later), and what it reports.

use std::net::SocketAddr;
use std::sync::Arc;

use kmetal_core::version::KubernetesVersion;

use crate::catalog::{CatalogError, Component};
use crate::etcd::{EtcdClusterError, EtcdPlan, EtcdStatus};
use crate::flags::FlagError;
use crate::gate::Queued;
use crate::layout::{LayoutError, ReplicaId};
use crate::plan::ControlPlanePlan;
use crate::probe::ProbeError;

/// A tenant: the TenantControlPlane's namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TenantId {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl TenantId {
    /// `namespace/name`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for TenantId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why a runtime could not run a plan.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// There is no binary for the version (or a component of it).
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The tenant's files could not be written or lack one a component needs.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// An `extraArgs` entry is not a flag.
    #[error("{component}: bad extraArgs")]
    Flags {
        /// Whose extraArgs.
        component: Component,
        /// Which entry.
        #[source]
        source: FlagError,
    },
    /// The tenant's Service address could not be listened on.
    #[error("cannot listen on the tenant's address {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No free port for a replica.
    #[error("no free port for {replica}")]
    Port {
        /// The replica.
        replica: ReplicaId,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A kubeconfig of the bundle (the probes' identity) does not parse.
    #[error("cannot read the bundle's {kubeconfig}")]
    Kubeconfig {
        /// Which kubeconfig.
        kubeconfig: &'static str,
        /// Why.
        #[source]
        source: Box<kmetal_pki::PkiError>,
    },
    /// The probes' TLS client was refused (a certificate or key that does not parse).
    #[error("cannot make the probes' TLS client")]
    Client(#[source] crate::http::HttpError),
    /// The tenant's dedicated etcd could not be run.
    #[error("dedicated etcd")]
    Etcd(#[from] EtcdClusterError),
}

/// Where one replica is.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ReplicaState {
    /// Started, not yet answering.
    Starting,
    /// Answering its probe (api-server: `/readyz` ok; controllers: running).
    Ready,
    /// Running but its probe fails.
    NotReady(Arc<ProbeError>),
    /// It died (or could not start) and is started again after its backoff.
    Restarting {
        /// How it ended, or why it could not start.
        reason: String,
    },
    /// Stopped.
    Stopped,
}

impl std::fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Starting => f.write_str("starting"),
            Self::Ready => f.write_str("ready"),
            Self::NotReady(e) => write!(f, "not ready: {e}"),
            Self::Restarting { reason } => write!(f, "restarting: {reason}"),
            Self::Stopped => f.write_str("stopped"),
        }
    }
}

/// One replica's state.
#[derive(Debug, Clone)]
pub struct ReplicaStatus {
    /// Which replica.
    pub replica: ReplicaId,
    /// Where it is.
    pub state: ReplicaState,
    /// How often it was restarted.
    pub restarts: u32,
    /// Its own listening address.
    pub address: SocketAddr,
    /// Its process, while running.
    pub pid: Option<u32>,
}

/// A tenant control plane as its runtime sees it.
#[derive(Debug, Clone)]
pub struct ControlPlaneStatus {
    /// The version running.
    pub version: KubernetesVersion,
    /// The tenant's Service address.
    pub endpoint: SocketAddr,
    /// Every replica of every component.
    pub replicas: Vec<ReplicaStatus>,
    /// Who holds the controller-manager's and the scheduler's Lease (`None`: nobody does).
    pub leases: Vec<(Component, Option<String>)>,
    /// The tenant waits for its turn to boot (nothing of it runs yet, `replicas` is empty).
    pub queued: Option<Queued>,
}

impl ControlPlaneStatus {
    /// Every replica answers (the Leases aside).
    pub fn replicas_ready(&self) -> bool {
        self.replicas
            .iter()
            .all(|r| matches!(r.state, ReplicaState::Ready))
    }

    /// Ready: every replica is ready and each controller's Lease is held.
    pub fn is_ready(&self) -> bool {
        self.problems().is_empty()
    }

    /// What keeps it from being ready, one line each (`kube-apiserver-1: restarting: …`).
    pub fn problems(&self) -> Vec<String> {
        if let Some(q) = self.queued {
            return vec![q.to_string()];
        }
        let mut out: Vec<String> = self
            .replicas
            .iter()
            .filter(|r| !matches!(r.state, ReplicaState::Ready))
            .map(|r| format!("{}: {}", r.replica, r.state))
            .collect();
        for (component, holder) in &self.leases {
            if holder.is_none() {
                out.push(format!("{component}: no replica holds its Lease"));
            }
        }
        out
    }
}

/// Runs tenant control planes. Every call is level-based: `ensure` is called again and again
/// with the plan the tenant should run, and moves what runs one step toward it.
#[async_trait::async_trait]
pub trait ControlPlaneRuntime: Send + Sync {
    /// Runs `plan` (starting, or replacing replicas whose command line changed one at a
    /// time, never one while another is not ready) and reports where it is.
    async fn ensure(&self, plan: &ControlPlanePlan) -> Result<ControlPlaneStatus, RuntimeError>;

    /// Runs the tenant's dedicated etcd (starting it, or moving it toward `plan`) and
    /// reports where its members are. Called before [`ensure`](Self::ensure), whose plan
    /// then names the members' client URLs.
    async fn ensure_etcd(&self, plan: &EtcdPlan) -> Result<EtcdStatus, RuntimeError>;

    /// The last status of a tenant it runs.
    async fn status(&self, tenant: &TenantId) -> Option<ControlPlaneStatus>;

    /// Stops every process of the tenant (its dedicated etcd too) and removes its files and
    /// addresses.
    async fn remove(&self, tenant: &TenantId);

    /// Stops every tenant's processes (files stay, so a new runtime starts them again).
    async fn shutdown(&self);

    /// A tenant's runtime changed by itself (a replica died or restarted): the operator
    /// reconciles it again.
    fn changes(&self) -> tokio::sync::broadcast::Receiver<TenantId>;
}
