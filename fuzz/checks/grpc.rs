//! The grpc target's property, shared by the fuzz target and the corpus replay test: a gRPC
//! byte stream, delivered whole or in pieces (the first input byte is the piece size), gives
//! the same packets and errors, and never panics the decoder.

use bytes::Bytes;
use kmetal_tunnel::grpc::{Decoder, GrpcError};

/// Decodes what has arrived into `out`; true once the framing failed (the stream is over).
fn drain(d: &mut Decoder, out: &mut Vec<String>) -> bool {
    loop {
        match d.next_packet() {
            Ok(None) => return false,
            Ok(Some(p)) => out.push(format!("{p:?}")),
            Err(e) => {
                out.push(e.to_string());
                if matches!(e, GrpcError::Compressed | GrpcError::TooLarge(_)) {
                    return true;
                }
            }
        }
    }
}

/// Panics when whole and piecewise decoding disagree.
pub fn check(input: &[u8]) {
    let Some((&step, stream)) = input.split_first() else {
        return;
    };
    let mut whole = Decoder::default();
    whole.push(Bytes::copy_from_slice(stream));
    let mut at_once = Vec::new();
    let whole_failed = drain(&mut whole, &mut at_once);
    let mut pieces = Decoder::default();
    let mut piecewise = Vec::new();
    let mut failed = false;
    for chunk in stream.chunks(usize::from(step.max(1))) {
        pieces.push(Bytes::copy_from_slice(chunk));
        failed = drain(&mut pieces, &mut piecewise);
        if failed {
            break;
        }
    }
    assert_eq!(at_once, piecewise);
    assert_eq!(whole_failed, failed);
    if !failed {
        assert_eq!(whole.pending(), pieces.pending());
    }
}
