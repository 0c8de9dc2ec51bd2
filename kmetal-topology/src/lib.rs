//! Where etcd members and control-plane replicas go so that a zone, site or region can fail.
//!
//! # Layout
//! Filled in by the topology issue; the module map it grows into:
//! - `model`: regions ⊃ sites ⊃ zones ⊃ nodes, roles, capacity, the RTT matrix, API exposure.
//! - `patterns`: recognising the stretched patterns A, B, C and the two-zone trap; rule checks.
//! - `quorum`: quorum sizes, tolerated domain losses, partitions.
//! - `raft`: commit latency per leader zone, heartbeat / election recommendations, RTO.
//! - `availability`: exact quorum probability and correlated Monte Carlo.
//! - `placement`: placing many tenants under spread, capacity and RTT constraints.
//! - `simulate`: applying outages and partitions and reporting per tenant.
//!
//! Nothing is exported yet.
