//! A Konnectivity-compatible reverse tunnel: workers dial out, the API server's traffic rides back.
//!
//! # Layout
//! Filled in by the tunnel issue; the module map it grows into:
//! - `proto`: Konnectivity's Packet protocol and stream metadata.
//! - `server`: agent listener, frontends (gRPC and HTTP CONNECT), proxy strategies.
//! - `agent`: dial-out, identifiers, server-count, reconnect and drain.
//!
//! Nothing is exported yet.
