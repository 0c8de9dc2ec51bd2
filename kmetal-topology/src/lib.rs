//! Where etcd members and control-plane replicas go so that a zone, site or region can fail,
//! and what that costs in write latency.
//!
//! # Layout
//! - [`model`]: regions ⊃ sites ⊃ zones ⊃ nodes, roles, capacity, the RTT matrix, API
//!   exposure; [`Topology::from_yaml`] with path-named errors.
//! - [`patterns`]: recognising the stretched patterns A, B, C; rule checks with codes (RTT
//!   budget, even members, the two-zone trap with its fix, arbiter rules, exposure).
//! - [`quorum`]: quorum sizes, tolerated domain losses per level, minimal failing sets,
//!   partitions.
//! - [`raft`]: commit latency per leader zone, heartbeat / election recommendations, RTO.
//! - [`availability`]: exact quorum probability (polynomial) and correlated Monte Carlo.
//! - [`analysis`]: one serialisable report over all of the above.
//! - [`placement`]: placing many tenants under spread, anti-affinity, capacity, RTT and
//!   region/cloud constraints; infeasible tenants name their blocking constraint.
//! - [`simulate`]: applying outages, partitions or the management plane's loss to a placement
//!   and reporting per tenant.

pub mod analysis;
pub mod availability;
pub mod model;
pub mod patterns;
pub mod placement;
pub mod quorum;
pub mod raft;
pub mod simulate;

pub use analysis::{Analysis, analyze};
pub use model::{Topology, TopologyError};
