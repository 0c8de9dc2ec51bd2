//! Per-tenant PKI on kubeadm's certificate profile.
//!
//! # Layout
//! Filled in by the PKI issue; the module map it grows into:
//! - `profile`: the kubeadm certificate table (CN, O, EKU, SANs, validity).
//! - `bundle`: a tenant's CAs, leaves, service-account keys and kubeconfigs.
//! - `store`: kubeadm's on-disk layout and the Secret-shaped map, with load-time checks.
//! - `renew`: expiry reports and renewal policy.
//! - `rotate`: CA rotation in prepare / finalize phases.
//!
//! Nothing is exported yet.
