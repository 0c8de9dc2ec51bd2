//! Runs tenant control planes: kube-apiserver replicas, kube-controller-manager and
//! kube-scheduler for each TenantControlPlane, started from the tenant's PKI bundle with the
//! flags Kamaji gives them, supervised, and judged Ready only when they answer.
//!
//! # Layout
//! - [`runtime`]: the [`ControlPlaneRuntime`] trait (ensure, status, remove, shutdown), the
//!   [`ControlPlanePlan`] a runtime runs and the [`ControlPlaneStatus`] it reports, so a
//!   Kubernetes Deployment runtime can take the process runtime's place.
//! - [`plan`]: building a [`ControlPlanePlan`] from a `TenantControlPlane` (version,
//!   replicas, service address, network settings, `extraArgs`).
//! - [`process`]: [`ProcessRuntime`], the runtime that runs components as local processes
//!   (the stand-in for the under cluster's pods), each tenant behind its own [`Front`].
//! - [`etcd`]: [`EtcdCluster`], a tenant's dedicated etcd: members supervised, a dead one
//!   replaced while the others hold quorum, quorum loss reported in [`EtcdStatus`].
//! - [`gate`]: [`StartGate`], how many tenants boot at once; the rest wait their turn.
//! - [`catalog`]: [`Catalog`], which Kubernetes versions have binaries, found by asking them.
//! - [`flags`]: the components' command lines, Kamaji's recipe, with the user's `extraArgs`
//!   winning flag by flag.
//! - [`layout`]: a tenant's folder: the PKI bundle in kubeadm's layout, per-replica logs,
//!   the egress selector file.
//! - [`supervisor`]: [`Supervisor`]: one process, restarted with backoff, its state watched,
//!   adopted again after the runtime itself was killed.
//! - [`front`]: [`Front`]: the tenant's Service address, forwarding connections to the
//!   replicas that are ready.
//! - [`ports`]: free loopback ports for replicas and etcd members, below the ephemeral
//!   range so no outgoing connection takes one before its server binds it.
//! - [`probe`]: `/readyz` of one replica and the holder of a Lease.
//! - [`bootstrap`]: what `kubeadm init` does once the cluster answers (the cluster-admins
//!   binding behind `admin.conf`).
//! - [`http`]: a small HTTP/1.1 client (plain or rustls) the probes use.

pub mod bootstrap;
pub mod catalog;
pub mod etcd;
pub mod flags;
pub mod front;
pub mod gate;
pub mod http;
pub mod layout;
pub mod plan;
pub mod ports;
pub mod probe;
pub mod process;
pub mod runtime;
pub mod supervisor;

pub use catalog::{Catalog, CatalogError, Component};
pub use etcd::{
    EtcdCluster, EtcdClusterConfig, EtcdClusterError, EtcdPlan, EtcdStatus, MemberState,
    MemberStatus,
};
pub use flags::{Egress, EtcdClient, EtcdTls};
pub use front::{Backends, Front};
pub use gate::{Queued, StartGate};
pub use plan::{ControlPlanePlan, PlanError};
pub use process::{ProcessRuntime, ProcessRuntimeConfig};
pub use runtime::{
    ControlPlaneRuntime, ControlPlaneStatus, ReplicaState, ReplicaStatus, RuntimeError, TenantId,
};
pub use supervisor::{Backoff, ProcessSpec, ProcessState, Supervisor};
