//! kmetal: hosted Kubernetes control planes (the Kamaji model) as a Rust library workspace.
//!
//! # Layout
//! This facade re-exports the workspace crates under short names:
//! - [`core`] (`kmetal-core`): Kamaji-compatible `TenantControlPlane` / `DataStore` resources.
//! - [`datastore`] (`kmetal-datastore`): the Datastore trait and its drivers.
//! - [`topology`] (`kmetal-topology`): failure domains, quorum, Raft latency, placement.
//! - [`pki`] (`kmetal-pki`): per-tenant certificate authorities and kubeconfigs.
//! - [`tunnel`] (`kmetal-tunnel`): the Konnectivity-compatible reverse tunnel.
//! - [`runtime`] (`kmetal-runtime`): runs tenant control planes (kube-apiserver,
//!   controller-manager, scheduler) and judges them Ready when they answer.
//!
//! - [`Report`]: an error with its whole cause chain on one line, for programs that print
//!   errors (each error type shows its own step only; its cause is its `source()`).
//!
//! The runnable compositions live in `examples/` (operator, simulator, etcd gateway, pki,
//! tunnel).

pub use kmetal_core as core;
pub use kmetal_datastore as datastore;
pub use kmetal_pki as pki;
pub use kmetal_runtime as runtime;
pub use kmetal_topology as topology;
pub use kmetal_tunnel as tunnel;

/// Displays an error and every cause below it: `step: cause: cause`.
///
/// ```
/// let io = std::io::Error::other("disk on fire");
/// let e = kmetal::datastore::DatastoreError::unavailable(io);
/// assert_eq!(kmetal::Report(&e).to_string(), "datastore unavailable: disk on fire");
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Report<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

/// The README's code blocks, compiled as doctests so they cannot rot.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
