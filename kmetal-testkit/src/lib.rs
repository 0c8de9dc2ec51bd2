//! Real servers for kmetal's tests and benchmarks, started on free loopback ports in temporary
//! directories and always stopped afterwards.
//!
//! # Layout
//! - [`process`]: finding binaries (a missing one names the Debian package to install) and
//!   supervising children that die with the test process, even when it is killed.
//! - [`etcd`]: [`EtcdCluster`]: one or N members of Debian's `etcd`, optional TLS with
//!   client-certificate auth, optional RBAC with a root user, optional fault proxies on the
//!   peer links; kill, restart, find the leader.
//! - [`postgres`]: [`PostgresServer`]: PostgreSQL 15 via `initdb`, run as the `postgres` user
//!   when we are root; restart; stop on drop.
//! - [`proxy`]: [`FaultProxy`]: a TCP proxy with one-way latency per direction, cut modes
//!   (hang or reset) and byte counters.
//! - [`tls`]: a throwaway CA issuing server and client certificates for tests.
//! - [`ports`]: free loopback ports.
//! - [`conformance`]: the datastore conformance suite, run against every driver.

pub mod conformance;
pub mod etcd;
pub mod ports;
pub mod postgres;
pub mod process;
pub mod proxy;
pub mod tls;

pub use etcd::{EtcdCluster, EtcdOptions};
pub use postgres::{PostgresOptions, PostgresServer};
pub use process::ProcessError;
pub use proxy::{FaultProxy, LinkState};
