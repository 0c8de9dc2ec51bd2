//! The fuzz targets' seed corpus (`fuzz/corpus/{packet,connect,grpc}`): generated here,
//! checked in, and replayed through the parsers on every test run.
//!
//! Regenerate with `KMETAL_WRITE_FUZZ_SEEDS=1 cargo test -p kmetal-tunnel --test fuzz_corpus`.

use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use kmetal_tunnel::connect::parse_request;
use kmetal_tunnel::{Frame, Identifiers};

// The grpc target's property, the same file the fuzz target runs.
#[path = "../../fuzz/checks/grpc.rs"]
mod grpc;

fn corpus(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn packet_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let data = |b: &'static [u8]| Frame::Data {
        connect_id: 7,
        data: Bytes::from_static(b),
        error: String::new(),
    };
    vec![
        (
            "dial-request",
            Frame::DialRequest {
                protocol: "tcp".into(),
                address: "10.0.0.7:10250".into(),
                random: 4_242_424_242,
            }
            .encode(),
        ),
        (
            "dial-response-error",
            Frame::DialResponse {
                random: 1,
                connect_id: 0,
                error: "dial tcp 10.0.0.7:10250: connection refused".into(),
            }
            .encode(),
        ),
        ("data", data(b"GET /healthz HTTP/1.1\r\n\r\n").encode()),
        (
            "close-request",
            Frame::CloseRequest { connect_id: 7 }.encode(),
        ),
        (
            "close-response",
            Frame::CloseResponse {
                connect_id: 7,
                error: String::new(),
            }
            .encode(),
        ),
        ("close-dial", Frame::CloseDial { random: -1 }.encode()),
        ("drain", Frame::Drain.encode()),
        ("drain-bare", vec![0x08, 0x06]),
        (
            "window",
            Frame::Window {
                connect_id: 7,
                bytes: 65536,
            }
            .encode(),
        ),
        (
            "type-payload-mismatch",
            vec![0x08, 0x00, 0x2a, 0x02, 0x08, 0x01],
        ),
        ("unknown-type", vec![0x08, 0x2a]),
        ("truncated", vec![0x08, 0x04, 0x22, 0x7f, 0x08]),
    ]
}

fn connect_seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "kube-apiserver",
            b"CONNECT 10.0.0.7:10250 HTTP/1.1\r\nHost: 10.0.0.7:10250\r\n\r\n".to_vec(),
        ),
        (
            "curl",
            b"CONNECT 127.0.0.1:18080 HTTP/1.1\r\nHost: 127.0.0.1:18080\r\nUser-Agent: curl/7.88.1\r\nProxy-Connection: Keep-Alive\r\n\r\n".to_vec(),
        ),
        ("ipv6", b"CONNECT [fd00::1]:443 HTTP/1.0\r\n\r\n".to_vec()),
        ("with-payload", b"CONNECT a:1 HTTP/1.1\r\n\r\n\x16\x03\x01".to_vec()),
        ("get", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
        ("bad-port", b"CONNECT a:99999 HTTP/1.1\r\n\r\n".to_vec()),
        ("incomplete", b"CONNECT a:1 HTTP/1.1\r\nHost: a".to_vec()),
        (
            "identifiers",
            b"cidr=10.244.0.0%2F16&default-route=true&host=node-1&ipv4=192.168.1.5".to_vec(),
        ),
    ]
}

/// gRPC streams; the first byte of a seed is the size of the pieces the target delivers.
fn grpc_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let stream = |step: u8, frames: Vec<Frame>| {
        let mut out = BytesMut::new();
        for f in frames {
            if let Some(payload) = kmetal_tunnel::grpc::encode(f.into(), &mut out) {
                out.extend_from_slice(&payload);
            }
        }
        let mut seed = vec![step];
        seed.extend_from_slice(&out);
        seed
    };
    let data = |len: usize| Frame::Data {
        connect_id: 3,
        data: Bytes::from(vec![0x5a; len]),
        error: String::new(),
    };
    let mut bad = stream(7, vec![Frame::Drain]);
    bad.extend_from_slice(&[0, 0, 0, 0, 2, 0xff, 0xff]);
    bad.extend_from_slice(&stream(1, vec![Frame::CloseRequest { connect_id: 3 }])[1..]);
    let mut compressed = stream(2, vec![Frame::Drain]);
    compressed.extend_from_slice(&[1, 0, 0, 0, 2, 0x08, 0x06]);
    vec![
        (
            "dial-then-data",
            stream(
                5,
                vec![
                    Frame::DialResponse {
                        random: 9,
                        connect_id: 3,
                        error: String::new(),
                    },
                    data(10),
                    data(5000),
                    Frame::Window {
                        connect_id: 3,
                        bytes: 5010,
                    },
                    Frame::CloseRequest { connect_id: 3 },
                ],
            ),
        ),
        ("bulk-in-pieces", stream(255, vec![data(9000), data(3000)])),
        ("bad-message-then-more", bad),
        ("compressed", compressed),
        ("too-large", vec![1, 0, 0x7f, 0xff, 0xff, 0xff]),
        ("truncated", stream(3, vec![data(4000)])[..2000].to_vec()),
    ]
}

#[test]
fn seeds_are_checked_in_and_the_corpus_never_panics_the_parsers() {
    let write = std::env::var_os("KMETAL_WRITE_FUZZ_SEEDS").is_some();
    for (target, seeds) in [
        ("packet", packet_seeds()),
        ("connect", connect_seeds()),
        ("grpc", grpc_seeds()),
    ] {
        let dir = corpus(target);
        for (name, bytes) in seeds {
            let file = dir.join(name);
            if write {
                std::fs::create_dir_all(&dir).expect("corpus dir");
                std::fs::write(&file, &bytes).expect("write seed");
            }
            let stored = std::fs::read(&file).unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (regenerate with KMETAL_WRITE_FUZZ_SEEDS=1)",
                    file.display()
                )
            });
            assert_eq!(stored, bytes, "{} is stale", file.display());
        }
        // Everything in the corpus, including inputs a fuzzer added, goes through the parsers.
        for entry in std::fs::read_dir(&dir).expect("corpus") {
            let bytes = std::fs::read(entry.expect("entry").path()).expect("read");
            if let Ok(frame) = Frame::decode(&bytes) {
                assert_eq!(Frame::decode(&frame.clone().encode()), Ok(frame));
            }
            if let Ok(Some((_, used))) = parse_request(&bytes) {
                assert!(used <= bytes.len());
            }
            if let Ok(text) = std::str::from_utf8(&bytes) {
                let _ = Identifiers::parse(text);
            }
            grpc::check(&bytes);
        }
    }
}
