//! kmetal: hosted Kubernetes control planes (the Kamaji model) as a Rust library workspace.
//!
//! # Layout
//! This facade re-exports the workspace crates under short names:
//! - [`core`] (`kmetal-core`): Kamaji-compatible `TenantControlPlane` / `DataStore` resources.
//! - [`datastore`] (`kmetal-datastore`): the Datastore trait and its drivers.
//! - [`topology`] (`kmetal-topology`): failure domains, quorum, Raft latency, placement.
//! - [`pki`] (`kmetal-pki`): per-tenant certificate authorities and kubeconfigs.
//! - [`tunnel`] (`kmetal-tunnel`): the Konnectivity-compatible reverse tunnel.
//!
//! The runnable compositions live in `examples/` (operator, simulator, etcd gateway, pki,
//! tunnel).

pub use kmetal_core as core;
pub use kmetal_datastore as datastore;
pub use kmetal_pki as pki;
pub use kmetal_topology as topology;
pub use kmetal_tunnel as tunnel;

/// The README's code blocks, compiled as doctests so they cannot rot.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
