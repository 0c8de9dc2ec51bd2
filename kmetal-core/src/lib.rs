//! Shared domain types for kmetal: Kamaji-compatible `TenantControlPlane` and `DataStore`
//! resources (`kamaji.clastix.io/v1alpha1`), their defaults and their validation.
//!
//! # Layout
//! - [`object`]: the generic object shape ([`Resource`]): metadata, spec, status, unknown
//!   fields kept for round-trips, decoding that reports every type error with its path.
//! - [`meta`]: `ObjectMeta` and status `Condition`s.
//! - [`tenant`]: [`TenantControlPlane`]: spec, status, phases, Kamaji's defaults.
//! - [`datastore`]: [`DataStore`]: drivers, endpoints, credentials.
//! - [`field`]: [`FieldError`] (a [`Problem`] at a field path) and [`FieldErrors`]: the leaf
//!   module decoding and validation both report through, so imports run one way.
//! - [`validate`]: all problems at once, each a [`FieldError`] with its field path; update rules.
//! - [`manifest`]: multi-document YAML/JSON files dispatched on `apiVersion`/`kind`.
//! - [`net`]: CIDRs, `host:port` endpoints, DNS names.
//! - [`version`]: Kubernetes versions and the upgrade rule.
//! - [`time`]: RFC 3339 timestamps as Kubernetes writes them (conditions, Leases).
//!
//! ```
//! use kmetal_core::manifest::{parse_str, Content};
//! let text = r#"
//! apiVersion: kamaji.clastix.io/v1alpha1
//! kind: TenantControlPlane
//! metadata: {name: tenant-a, namespace: tenants}
//! spec:
//!   controlPlane: {service: {serviceType: LoadBalancer}}
//!   kubernetes: {version: v1.30.2}
//!   networkProfile: {port: 70000}
//! "#;
//! let docs = parse_str(text).unwrap();
//! assert_eq!(docs[0].problems(), ["spec.networkProfile.port: must be 1..=65535"]);
//! ```

#[macro_use]
mod macros;

pub mod datastore;
pub mod field;
pub mod manifest;
pub mod meta;
pub mod net;
pub mod object;
pub mod tenant;
pub mod time;
pub mod validate;
pub mod version;

pub use datastore::DataStore;
pub use field::{FieldError, FieldErrors, Problem};
pub use manifest::{Document, Object, parse_file, parse_str};
pub use meta::{Condition, ObjectMeta};
pub use object::{API_VERSION, Resource, ResourceSpec};
pub use tenant::{Phase, TenantControlPlane};
