//! Konnectivity packets: decoding and validation never panic, and whatever decodes
//! re-encodes to a packet that decodes to the same frame.
#![no_main]

use kmetal_tunnel::Frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = Frame::decode(data) {
        let again = Frame::decode(&frame.clone().encode()).expect("re-encoded frame decodes");
        assert_eq!(frame, again);
    }
});
