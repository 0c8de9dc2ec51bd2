//! The agent link's gRPC framing: any byte stream, delivered whole or in pieces of any size,
//! never panics the decoder and yields the same packets and errors either way.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../checks/grpc.rs"]
mod grpc;

fuzz_target!(|data: &[u8]| grpc::check(data));
