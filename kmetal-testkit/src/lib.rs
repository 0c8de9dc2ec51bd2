//! Real servers for kmetal's tests and benchmarks, started on free loopback ports in temporary
//! directories and always stopped afterwards.
//!
//! # Layout
//! - [`process`]: finding binaries (a missing Debian one names its package, a missing peer
//!   names `scripts/peers.sh`) and supervising children that die with the test process, even
//!   when it is killed.
//! - [`etcd`]: [`EtcdCluster`]: one or N members of Debian's etcd 3.4 or of etcd 3.6 built by
//!   `scripts/peers.sh` ([`EtcdRelease`]), optional TLS with
//!   client-certificate auth, optional RBAC with a root user, optional fault proxies on the
//!   peer links; kill, restart, find the leader.
//! - [`postgres`]: [`PostgresServer`]: PostgreSQL 15 via `initdb`, run as the `postgres` user
//!   when we are root; restart, crash, a synchronous streaming standby and its promotion;
//!   stop on drop.
//! - [`kube`]: [`KubeApiserver`] and [`KubeController`] (kube-controller-manager,
//!   kube-scheduler): the real control plane from `scripts/peers.sh`, serving a kmetal-pki
//!   tenant bundle on loopback, pointed at any etcd endpoint; kubectl as the tenant's admin.
//! - [`kine`]: [`Kine`]: the real kine on SQLite or PostgreSQL.
//! - [`konnectivity`]: [`KonnectivityServer`] and [`KonnectivityAgent`]: the real
//!   Konnectivity with an mTLS agent link.
//! - [`k8s_storage`]: Kubernetes' own storage tests (k8s.io/apiserver's etcd3 store and watch
//!   cache), built by `scripts/peers.sh`, run against backends a test hands out.
//! - [`http`]: kmetal-runtime's small HTTP/1.1 client (plain or rustls), re-exported for the
//!   peers' health endpoints and for load.
//! - [`proxy`]: [`FaultProxy`]: a TCP proxy with one-way latency per direction, cut modes
//!   (hang or reset) and byte counters.
//! - [`netns`]: [`Netns`]: a worker host in its own network namespace, joined by a veth
//!   pair, with addresses the host cannot reach.
//! - [`manifests`]: Kamaji DataStore manifests (with their Secrets) for the servers above.
//! - [`tls`]: a throwaway CA issuing server and client certificates for tests.
//! - [`ports`]: free loopback ports.
//! - [`conformance`]: the datastore conformance suite, run against every driver.
//! - [`linearizability`]: a checker for histories of register operations (put, get, CAS)
//!   with unknown outcomes, porcupine's model in etcd's robustness tests.
//! - [`history`]: the recorded workload it checks (clients, faults, a resumed watch) through
//!   any etcd endpoint, and a restartable `etcd_gateway` process.

pub mod conformance;
pub mod etcd;
pub mod history;
pub mod k8s_storage;
pub mod kine;
pub mod konnectivity;
pub mod kube;
pub mod linearizability;
pub mod manifests;
pub mod netns;
pub mod ports;
pub mod postgres;
pub mod process;
pub mod proxy;
pub mod tls;

/// kmetal-runtime's HTTP/1.1 client (the runtime probes the api-servers with it).
pub use kmetal_runtime::http;

pub use etcd::{EtcdCluster, EtcdOptions, EtcdRelease};
pub use kine::{Kine, KineBackend};
pub use konnectivity::{KonnectivityAgent, KonnectivityServer};
pub use kube::{KubeApiserver, KubeController};
pub use netns::Netns;
pub use postgres::{PostgresOptions, PostgresServer};
pub use process::ProcessError;
pub use proxy::{FaultProxy, LinkState};
