//! The tenant datastore: an async [`Datastore`] trait with etcd's semantics, and its drivers.
//!
//! # Layout
//! - [`model`]: keys, key ranges, revisions; range / put / delete / txn / watch / lease
//!   requests and responses; etcd's [`Limits`](model::Limits).
//! - [`error`]: [`DatastoreError`], typed errors mirroring etcd's (too large, too many ops,
//!   compacted, future revision, lease not found, permission denied, quota, unavailable).
//! - [`store`]: the [`Datastore`] trait and [`WatchStream`].
//! - [`memory`]: [`MemoryStore`], the in-process reference model every driver is checked
//!   against.
//!
//! Still to come (see the open issues): the etcd driver (dedicated and shared with RBAC), the
//! kine-style SQL log on PostgreSQL and SQLite, provisioning, snapshots and migration, and the
//! etcd v3 gateway.

pub mod error;
pub mod memory;
pub mod model;
pub mod store;

pub use error::{DatastoreError, Result};
pub use memory::MemoryStore;
pub use store::{Datastore, WatchStream};
