//! Per-tenant PKI on kubeadm's certificate profile.
//!
//! # Layout
//! - [`profile`]: the kubeadm certificate table (CN, O, EKU, signer, SAN rule, validity).
//! - [`spec`]: [`PkiSpec`], what a bundle is issued for (endpoint, SANs, service CIDR, cluster
//!   domain, algorithm, dedicated or shared datastore), from a `TenantControlPlane`.
//! - [`bundle`]: [`Bundle`], a tenant's CAs, leaves, service-account keys and kubeconfigs in
//!   kubeadm's layout; generation and kubeconfig rendering/parsing.
//! - [`store`]: kubeadm's on-disk layout and the Secret-shaped map, with load-time checks
//!   (key matches certificate, chain to CA, CA not expired).
//! - [`error`]: [`PkiError`], naming the file or field that is wrong.
//!
//! Still to come (issue 7): expiry reports and renewal, CA rotation in prepare / finalize
//! phases, RSA-2048 generation, the `pki` example and benchmarks.

pub mod bundle;
pub mod error;
pub mod profile;
pub mod spec;
pub mod store;

pub use bundle::Bundle;
pub use error::PkiError;
pub use spec::{Algorithm, PkiSpec};
