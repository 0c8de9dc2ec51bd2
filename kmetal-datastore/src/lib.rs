//! The tenant datastore: an async `Datastore` trait with etcd's semantics, and its drivers.
//!
//! # Layout
//! Filled in by the datastore issues; the module map it grows into:
//! - `model`: keys, key-values, revisions, range / put / delete / txn requests and responses.
//! - `error`: typed errors mirroring etcd's (too large, too many ops, compacted, ...).
//! - `memory`: the in-process reference model every other driver is checked against.
//! - `etcd`: dedicated and shared (per-tenant prefix + RBAC) modes over `etcd-client`.
//! - `sql`: the kine-style revision log on PostgreSQL and SQLite.
//! - `provision`: creating and removing a tenant's slice, per driver.
//! - `snapshot`: per-tenant backup, restore and cross-driver migration.
//! - `gateway`: etcd's v3 gRPC API served over any driver.
//!
//! Nothing is exported yet: no driver ships until it passes the conformance suite.
