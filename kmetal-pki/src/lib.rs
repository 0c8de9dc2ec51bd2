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
//! - [`renew`]: expiry reports and renewal (keeps CN, O, SANs, EKU; re-issues kubeconfigs;
//!   never `sa.key`).
//! - [`rotate`]: CA rotation without outage, prepare / finalize, every consumer at once.
//! - [`error`]: [`PkiError`], naming the file or field that is wrong.

pub mod bundle;
pub mod error;
pub mod profile;
pub mod renew;
pub mod rotate;
pub mod spec;
pub mod store;

pub use bundle::Bundle;
pub use error::PkiError;
pub use renew::{Expiry, RenewalPolicy};
pub use rotate::RotationPhase;
pub use spec::{Algorithm, PkiSpec};
