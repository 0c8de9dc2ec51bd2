//! Konnectivity's Packet protocol: the generated messages and services, a typed view
//! ([`Frame`]) that rejects malformed packets, and the stream metadata (agent identifiers,
//! server id and count, and kmetal's flow-control window).
//!
//! The messages come from `proto/konnectivity.proto`, written for kmetal with the field
//! numbers of kubernetes-sigs/apiserver-network-proxy, so the services are reachable at the
//! same gRPC paths (`/AgentService/Connect`, `/ProxyService/Proxy`) as the real ones.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::Bytes;
use kmetal_core::net::Cidr;
use prost::Message;

/// The generated protobuf messages and gRPC services.
#[allow(missing_docs, clippy::all)]
pub mod wire {
    tonic::include_proto!("_");
}

pub use wire::{Packet, PacketType};

/// Metadata key: the agent's id (sent by the agent).
pub const AGENT_ID: &str = "agentid";
/// Metadata key: the agent's identifiers, URL-query encoded (sent by the agent).
pub const AGENT_IDENTIFIERS: &str = "agentidentifiers";
/// Metadata key: the server replica's id (response header).
pub const SERVER_ID: &str = "serverid";
/// Metadata key: how many server replicas there are (response header).
pub const SERVER_COUNT: &str = "servercount";
/// Metadata key (kmetal extension): the sender's starting per-connection receive window in
/// bytes. Flow control runs only when both sides sent it; real Konnectivity pieces ignore
/// it. A receiver grows a connection's window by granting more credit than was consumed.
pub const FLOW_WINDOW: &str = "kmetal-flow-window";

/// The default largest per-connection window: one stream at full speed keeps about eight
/// 256 KiB chunks in flight between the socket reads at either end (measured on loopback,
/// one stream: 1 MiB 947 MB/s, 2 MiB 1,100 MB/s, 4 MiB 1,027 MB/s).
pub const DEFAULT_FLOW_WINDOW: u32 = 2 << 20;

/// The window every connection starts with (and advertises in [`FLOW_WINDOW`]), one
/// [`MAX_CHUNK`]: it grows toward the configured maximum only while its consumer keeps up,
/// so a stalled connection buffers at most this much.
pub const INITIAL_FLOW_WINDOW: u32 = MAX_CHUNK as u32;

/// The largest packet either side accepts (a DATA chunk is at most [`MAX_CHUNK`]).
pub const MAX_PACKET: usize = 4 << 20;
/// The largest DATA payload we send in one packet.
pub const MAX_CHUNK: usize = 256 << 10;

/// A random dial id (`random` of DIAL_REQ). A real konnectivity-server keys its pending
/// dials by it across all frontends, so every dial needs its own, as konnectivity-client's
/// `rand.Int63()` gives.
pub(crate) fn random_i64() -> i64 {
    let mut b = [0u8; 8];
    // SystemRandom only fails when the OS has no entropy source; the zeros left then still
    // work with our server, which keys pending dials per agent.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    // Non-negative like Int63: a peer may log or compare it as such.
    i64::from_le_bytes(b) & i64::MAX
}

/// A packet that is not a well-formed Konnectivity packet.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PacketError {
    /// The bytes are not a protobuf `Packet`.
    #[error("not a Packet")]
    Decode(#[from] prost::DecodeError),
    /// The packet exceeds [`MAX_PACKET`].
    #[error("packet of {0} bytes exceeds the {MAX_PACKET}-byte limit")]
    TooLarge(usize),
    /// The type field names no known packet type.
    #[error("unknown packet type {0}")]
    UnknownType(i32),
    /// The packet type needs a payload and has none.
    #[error("{0} packet without its payload")]
    MissingPayload(&'static str),
    /// The payload does not belong to the packet type.
    #[error("{kind} packet carries a {payload} payload")]
    PayloadMismatch {
        /// The packet's type.
        kind: &'static str,
        /// The payload it carries.
        payload: &'static str,
    },
    /// A window update with a credit that is not positive or larger than a packet.
    #[error("window update of {0} bytes")]
    InvalidWindow(i64),
}

/// A validated packet.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Frame {
    /// Open a connection to `address` on the agent's side.
    DialRequest {
        /// `tcp`.
        protocol: String,
        /// `host:port`.
        address: String,
        /// Matches the response to the request.
        random: i64,
    },
    /// The outcome of a dial.
    DialResponse {
        /// The request's `random`.
        random: i64,
        /// The new connection's id (meaningless when `error` is set).
        connect_id: i64,
        /// Empty on success.
        error: String,
    },
    /// Bytes of a connection.
    Data {
        /// The connection.
        connect_id: i64,
        /// The bytes.
        data: Bytes,
        /// An error the sender reports for the connection.
        error: String,
    },
    /// Close a connection (dialer to agent).
    CloseRequest {
        /// The connection.
        connect_id: i64,
    },
    /// A connection is closed (agent to dialer).
    CloseResponse {
        /// The connection.
        connect_id: i64,
        /// Why, if it failed.
        error: String,
    },
    /// Abandon an unanswered dial.
    CloseDial {
        /// The dial's `random`.
        random: i64,
    },
    /// The agent takes no new dials.
    Drain,
    /// kmetal extension: `bytes` more bytes of `connect_id` may be sent.
    Window {
        /// The connection.
        connect_id: i64,
        /// Credit in bytes.
        bytes: i64,
    },
}

fn type_name(t: i32) -> &'static str {
    PacketType::try_from(t)
        .map(|t| t.as_str_name())
        .unwrap_or("UNKNOWN")
}

fn payload_name(p: &wire::packet::Payload) -> &'static str {
    use wire::packet::Payload as P;
    match p {
        P::DialRequest(_) => "dialRequest",
        P::DialResponse(_) => "dialResponse",
        P::Data(_) => "data",
        P::CloseRequest(_) => "closeRequest",
        P::CloseResponse(_) => "closeResponse",
        P::CloseDial(_) => "closeDial",
        P::Drain(_) => "drain",
        P::WindowUpdate(_) => "windowUpdate",
    }
}

impl TryFrom<Packet> for Frame {
    type Error = PacketError;

    fn try_from(p: Packet) -> Result<Self, PacketError> {
        use wire::packet::Payload as P;
        let kind =
            PacketType::try_from(p.r#type).map_err(|_| PacketError::UnknownType(p.r#type))?;
        let name = type_name(p.r#type);
        let Some(payload) = p.payload else {
            // Go's agent sends DRAIN with an empty payload message, which proto3 may encode as
            // nothing at all.
            return match kind {
                PacketType::Drain => Ok(Frame::Drain),
                _ => Err(PacketError::MissingPayload(name)),
            };
        };
        let mismatch = |payload: &P| PacketError::PayloadMismatch {
            kind: name,
            payload: payload_name(payload),
        };
        Ok(match (kind, payload) {
            (PacketType::DialReq, P::DialRequest(d)) => Frame::DialRequest {
                protocol: d.protocol,
                address: d.address,
                random: d.random,
            },
            (PacketType::DialRsp, P::DialResponse(d)) => Frame::DialResponse {
                random: d.random,
                connect_id: d.connect_id,
                error: d.error,
            },
            (PacketType::Data, P::Data(d)) => Frame::Data {
                connect_id: d.connect_id,
                data: d.data,
                error: d.error,
            },
            (PacketType::CloseReq, P::CloseRequest(c)) => Frame::CloseRequest {
                connect_id: c.connect_id,
            },
            (PacketType::CloseRsp, P::CloseResponse(c)) => Frame::CloseResponse {
                connect_id: c.connect_id,
                error: c.error,
            },
            (PacketType::DialCls, P::CloseDial(c)) => Frame::CloseDial { random: c.random },
            (PacketType::Drain, P::Drain(_)) => Frame::Drain,
            (PacketType::KmetalWindow, P::WindowUpdate(w)) => {
                if w.bytes <= 0 || w.bytes > MAX_PACKET as i64 {
                    return Err(PacketError::InvalidWindow(w.bytes));
                }
                Frame::Window {
                    connect_id: w.connect_id,
                    bytes: w.bytes,
                }
            }
            (_, other) => return Err(mismatch(&other)),
        })
    }
}

impl From<Frame> for Packet {
    fn from(f: Frame) -> Packet {
        use wire::packet::Payload as P;
        let (kind, payload) = match f {
            Frame::DialRequest {
                protocol,
                address,
                random,
            } => (
                PacketType::DialReq,
                P::DialRequest(wire::DialRequest {
                    protocol,
                    address,
                    random,
                }),
            ),
            Frame::DialResponse {
                random,
                connect_id,
                error,
            } => (
                PacketType::DialRsp,
                P::DialResponse(wire::DialResponse {
                    error,
                    connect_id,
                    random,
                }),
            ),
            Frame::Data {
                connect_id,
                data,
                error,
            } => (
                PacketType::Data,
                P::Data(wire::Data {
                    connect_id,
                    error,
                    data,
                }),
            ),
            Frame::CloseRequest { connect_id } => (
                PacketType::CloseReq,
                P::CloseRequest(wire::CloseRequest { connect_id }),
            ),
            Frame::CloseResponse { connect_id, error } => (
                PacketType::CloseRsp,
                P::CloseResponse(wire::CloseResponse { error, connect_id }),
            ),
            Frame::CloseDial { random } => (
                PacketType::DialCls,
                P::CloseDial(wire::CloseDial { random }),
            ),
            Frame::Drain => (PacketType::Drain, P::Drain(wire::Drain {})),
            Frame::Window { connect_id, bytes } => (
                PacketType::KmetalWindow,
                P::WindowUpdate(wire::WindowUpdate { connect_id, bytes }),
            ),
        };
        Packet {
            r#type: kind as i32,
            payload: Some(payload),
        }
    }
}

impl Frame {
    /// Decodes and validates one packet from its protobuf encoding (the fuzzed entry point).
    pub fn decode(buf: &[u8]) -> Result<Frame, PacketError> {
        if buf.len() > MAX_PACKET {
            return Err(PacketError::TooLarge(buf.len()));
        }
        Frame::try_from(Packet::decode(buf)?)
    }

    /// The protobuf encoding of this frame.
    pub fn encode(self) -> Vec<u8> {
        Packet::from(self).encode_to_vec()
    }
}

/// A bad `agentIdentifiers` value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdentifierError {
    /// A key other than host, ipv4, ipv6, cidr, default-route.
    #[error("unknown identifier kind {0:?} (expected host, ipv4, ipv6, cidr or default-route)")]
    UnknownKind(String),
    /// An `ipv4`/`ipv6` value that is not such an address.
    #[error("{kind}={value:?} is not an {kind} address")]
    InvalidIp {
        /// `ipv4` or `ipv6`.
        kind: &'static str,
        /// The value.
        value: String,
    },
    /// A `cidr` value that is not a CIDR.
    #[error("cidr={value:?}")]
    InvalidCidr {
        /// The value.
        value: String,
        /// Why.
        #[source]
        source: kmetal_core::net::CidrError,
    },
    /// A `default-route` value other than true/false.
    #[error("default-route={0:?} is not true or false")]
    InvalidDefaultRoute(String),
    /// An empty host name.
    #[error("empty host identifier")]
    EmptyHost,
    /// A `%` escape that is not two hex digits, or bytes that are not UTF-8.
    #[error("bad percent-encoding in {0:?}")]
    BadEscape(String),
}

/// What an agent says it can reach: the keys Konnectivity's `destHost` and `defaultRoute`
/// strategies match on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identifiers {
    /// Host names (`host=`).
    pub hosts: Vec<String>,
    /// IPv4 addresses (`ipv4=`).
    pub ipv4: Vec<Ipv4Addr>,
    /// IPv6 addresses (`ipv6=`).
    pub ipv6: Vec<Ipv6Addr>,
    /// Networks (`cidr=`).
    pub cidrs: Vec<Cidr>,
    /// Whether the agent is a default route (`default-route=true`).
    pub default_route: bool,
}

impl Identifiers {
    /// Adds one `kind=value` identifier, as given on a command line.
    pub fn add(&mut self, kind: &str, value: &str) -> Result<(), IdentifierError> {
        match kind {
            "host" => {
                if value.is_empty() {
                    return Err(IdentifierError::EmptyHost);
                }
                self.hosts.push(value.to_string());
            }
            "ipv4" => self
                .ipv4
                .push(value.parse().map_err(|_| IdentifierError::InvalidIp {
                    kind: "ipv4",
                    value: value.into(),
                })?),
            "ipv6" => self
                .ipv6
                .push(value.parse().map_err(|_| IdentifierError::InvalidIp {
                    kind: "ipv6",
                    value: value.into(),
                })?),
            "cidr" => {
                self.cidrs.push(
                    value
                        .parse()
                        .map_err(|source| IdentifierError::InvalidCidr {
                            value: value.into(),
                            source,
                        })?,
                )
            }
            "default-route" => {
                self.default_route = match value {
                    "true" => true,
                    "false" => false,
                    other => return Err(IdentifierError::InvalidDefaultRoute(other.into())),
                }
            }
            other => return Err(IdentifierError::UnknownKind(other.into())),
        }
        Ok(())
    }

    /// Parses the URL-query form Konnectivity agents send (`host=a&ipv4=10.0.0.1&cidr=…`).
    pub fn parse(query: &str) -> Result<Self, IdentifierError> {
        let mut ids = Identifiers::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            ids.add(&unescape(k)?, &unescape(v)?)?;
        }
        Ok(ids)
    }

    /// Whether the agent claims `host` (a name or an IP address) by a host, address or CIDR.
    pub fn matches_host(&self, host: &str) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match host.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => {
                self.ipv4.contains(&ip) || self.cidrs.iter().any(|c| c.contains(ip.into()))
            }
            Ok(IpAddr::V6(ip)) => {
                self.ipv6.contains(&ip) || self.cidrs.iter().any(|c| c.contains(ip.into()))
            }
            Err(_) => self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)),
        }
    }
}

impl fmt::Display for Identifiers {
    /// The URL-query form, keys in Go's `url.Values.Encode` order (sorted).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut pairs: Vec<(&str, String)> = Vec::new();
        pairs.extend(self.cidrs.iter().map(|c| ("cidr", c.to_string())));
        if self.default_route {
            pairs.push(("default-route", "true".into()));
        }
        pairs.extend(self.hosts.iter().map(|h| ("host", h.clone())));
        pairs.extend(self.ipv4.iter().map(|a| ("ipv4", a.to_string())));
        pairs.extend(self.ipv6.iter().map(|a| ("ipv6", a.to_string())));
        for (i, (k, v)) in pairs.iter().enumerate() {
            if i > 0 {
                f.write_str("&")?;
            }
            write!(f, "{k}={}", escape(v))?;
        }
        Ok(())
    }
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn unescape(s: &str) -> Result<String, IdentifierError> {
    let bad = || IdentifierError::BadEscape(s.to_string());
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or_else(bad)?;
                let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_frame_round_trips_through_the_wire_encoding() {
        let frames = [
            Frame::DialRequest {
                protocol: "tcp".into(),
                address: "10.0.0.1:10250".into(),
                random: -7,
            },
            Frame::DialResponse {
                random: 3,
                connect_id: 9,
                error: String::new(),
            },
            Frame::Data {
                connect_id: 9,
                data: Bytes::from_static(b"hello"),
                error: String::new(),
            },
            Frame::CloseRequest { connect_id: 9 },
            Frame::CloseResponse {
                connect_id: 9,
                error: "eof".into(),
            },
            Frame::CloseDial { random: 3 },
            Frame::Drain,
            Frame::Window {
                connect_id: 9,
                bytes: 4096,
            },
        ];
        for f in frames {
            assert_eq!(Frame::decode(&f.clone().encode()), Ok(f));
        }
    }

    #[test]
    fn field_numbers_match_konnectivity() {
        // DATA{connectID=1, data="x"}: type 4 (field 1), payload field 4, inner fields 1 and 3.
        let bytes = Frame::Data {
            connect_id: 1,
            data: Bytes::from_static(b"x"),
            error: String::new(),
        }
        .encode();
        assert_eq!(
            bytes,
            [0x08, 0x04, 0x22, 0x05, 0x08, 0x01, 0x1a, 0x01, b'x']
        );
        // DRAIN with an absent payload, as proto3 may send it.
        assert_eq!(Frame::decode(&[0x08, 0x06]), Ok(Frame::Drain));
    }

    #[test]
    fn malformed_packets_are_typed_errors() {
        assert_eq!(
            Frame::decode(&[0x08, 0x04]),
            Err(PacketError::MissingPayload("DATA"))
        );
        assert_eq!(
            Frame::decode(&[0x08, 0x2a]),
            Err(PacketError::UnknownType(42))
        );
        // DIAL_REQ carrying a closeRequest payload.
        assert!(matches!(
            Frame::decode(&[0x08, 0x00, 0x2a, 0x02, 0x08, 0x01]),
            Err(PacketError::PayloadMismatch { .. })
        ));
        assert!(matches!(
            Frame::decode(&[0xff]),
            Err(PacketError::Decode(_))
        ));
        let bad_window = Packet::from(Frame::Window {
            connect_id: 1,
            bytes: -5,
        })
        .encode_to_vec();
        assert_eq!(
            Frame::decode(&bad_window),
            Err(PacketError::InvalidWindow(-5))
        );
    }

    #[test]
    fn identifiers_round_trip_and_match() {
        let mut ids = Identifiers::default();
        ids.add("host", "node-1").unwrap();
        ids.add("ipv4", "192.168.1.5").unwrap();
        ids.add("cidr", "10.244.0.0/16").unwrap();
        ids.add("default-route", "true").unwrap();
        let text = ids.to_string();
        assert_eq!(
            text,
            "cidr=10.244.0.0%2F16&default-route=true&host=node-1&ipv4=192.168.1.5"
        );
        assert_eq!(Identifiers::parse(&text).unwrap(), ids);
        assert!(ids.matches_host("node-1"));
        assert!(ids.matches_host("NODE-1"));
        assert!(ids.matches_host("192.168.1.5"));
        assert!(ids.matches_host("10.244.3.9"));
        assert!(!ids.matches_host("10.245.0.1"));
        assert!(!ids.matches_host("node-2"));
    }

    #[test]
    fn bad_identifiers_are_typed_errors() {
        assert!(matches!(
            Identifiers::parse("zone=a"),
            Err(IdentifierError::UnknownKind(_))
        ));
        assert!(matches!(
            Identifiers::parse("ipv4=300.1.1.1"),
            Err(IdentifierError::InvalidIp { .. })
        ));
        assert!(matches!(
            Identifiers::parse("cidr=10.0.0.0"),
            Err(IdentifierError::InvalidCidr { .. })
        ));
        assert!(matches!(
            Identifiers::parse("host=%zz"),
            Err(IdentifierError::BadEscape(_))
        ));
        assert!(matches!(
            Identifiers::parse("default-route=yes"),
            Err(IdentifierError::InvalidDefaultRoute(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = Frame::decode(&bytes);
        }

        #[test]
        fn arbitrary_identifier_strings_never_panic(s in "[a-z%=&0-9./:+-]{0,64}") {
            let _ = Identifiers::parse(&s);
        }
    }
}
