//! HTTP CONNECT request heads and agent identifiers: parsing never panics, and a parsed
//! head never claims more bytes than it was given.
#![no_main]

use kmetal_tunnel::Identifiers;
use kmetal_tunnel::connect::parse_request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((_, used))) = parse_request(data) {
        assert!(used <= data.len());
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Identifiers::parse(text);
    }
});
