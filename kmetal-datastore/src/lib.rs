//! The tenant datastore: an async [`Datastore`] trait with etcd's semantics, and its drivers.
//!
//! # Layout
//! - [`model`]: keys, key ranges, revisions; range / put / delete / txn / watch / lease
//!   requests and responses; etcd's [`Limits`](model::Limits).
//! - [`error`]: [`DatastoreError`], typed errors mirroring etcd's (too large, too many ops,
//!   compacted, future revision, lease not found, permission denied, quota, unavailable).
//! - [`store`]: the [`Datastore`] trait and the bounded [`WatchStream`] (a watch that falls
//!   behind its queue reads the rest back from history; [`watch_channel`] makes one).
//! - [`memory`]: [`MemoryStore`], the in-process reference model every driver is checked
//!   against.
//! - [`etcd`] (feature `etcd`, default): [`EtcdStore`](etcd::EtcdStore) over a dedicated
//!   cluster or a tenant's `/<schema>/` of a shared one, and
//!   [`EtcdProvisioner`](etcd::EtcdProvisioner) (user + role with RBAC per tenant, and on a
//!   shared cluster a lease tag: each tenant's lease ids are its own, `etcd/leases.rs`).
//! - [`postgres`] (feature `postgres`, default): [`PgStore`](postgres::PgStore), a kine-style
//!   revision log on PostgreSQL with batched writes, LISTEN/NOTIFY watches and real leases.
//! - [`sqlite`] (feature `sqlite`, default): [`SqliteStore`](sqlite::SqliteStore), the same
//!   revision log embedded in one file: the zero-setup default.
//! - [`sqllog`]: the revision log both SQL drivers share, written once over a small dialect
//!   trait: writer batching and txn evaluation (`sqllog/write.rs`), watch fan-out with replay
//!   and progress notifications (`sqllog/hub.rs`), lease expiry (the sweeper in
//!   `sqllog/mod.rs`, expiry times persisted by each dialect), compaction in bounded batches,
//!   and the one error classification per dialect; its public part is
//!   [`LogOptions`](sqllog::LogOptions). The memory driver expires leases and fans out
//!   watches itself, inside its write lock.
//! - [`backup`]: per-tenant logical snapshots (one portable file with a checksum) from any
//!   driver, restorable into any driver.
//! - [`migrate`]: live migration of a tenant between any two drivers (freeze, copy, verify,
//!   cut over, unfreeze).
//! - [`url`]: [`DatastoreUrl`](url::DatastoreUrl) (`memory`, `sqlite://`, `postgres://`,
//!   `etcd://`) and opening the driver it names.
//! - [`provision`]: the [`Provisioner`] trait, [`TenantSlice`](provision::TenantSlice) and
//!   name checks shared by every driver.
//!
//! - [`gateway`] (feature `gateway`, default): etcd's v3 gRPC API over any driver.

pub mod backup;
pub mod error;
#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "gateway")]
pub mod gateway;
pub mod memory;
pub mod migrate;
pub mod model;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod provision;
#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub mod sqllog;
pub mod store;
pub mod url;

pub use error::{DatastoreError, Result};
pub use memory::MemoryStore;
pub use provision::Provisioner;
pub use store::{Datastore, WatchSender, WatchStream, watch_channel};
