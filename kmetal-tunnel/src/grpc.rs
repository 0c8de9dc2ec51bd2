//! gRPC message framing for the agent link (`AgentService.Connect`) and the gRPC frontend
//! (`ProxyService.Proxy`), done here instead of by tonic's codec so bulk DATA payloads cross
//! the HTTP/2 layer without being copied.
//!
//! tonic copies every outgoing message into its encode buffer and every incoming body chunk
//! into its decode buffer; on a link that carries all of a tenant's kubelet traffic those
//! copies were the largest user-space cost after the TLS ciphers. Here a DATA packet is
//! sent as two body chunks, the gRPC prefix plus the protobuf fields up to the payload's
//! length, then the payload itself (`Data.data` is the last field of its message, so the
//! bytes that follow it on the wire are exactly the payload); the receiver keeps the
//! chunks as they arrived and the payload of a message that arrived whole is a slice of the
//! chunk HTTP/2 read. The wire format is plain gRPC (length-prefixed, uncompressed
//! messages; `grpc-status` trailers), so either side interoperates with any gRPC peer.
//!
//! A payload slice keeps HTTP/2's read buffer alive until the payload reaches its socket,
//! so HTTP/2 allocates a fresh read buffer for most frames. That is cheap with an allocator
//! that keeps freed pages (mimalloc, jemalloc, or glibc with a high trim threshold); glibc's
//! default returns them to the kernel and faults them back in. See the crate docs.
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};
use hyper_util::rt::TokioExecutor;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
use tokio_stream::Stream;

use crate::proto::wire::packet::Payload;
use crate::proto::{MAX_PACKET, Packet};

/// The message prefix: a compressed flag and the big-endian message length.
const PREFIX: usize = 5;
/// DATA payloads from this size on travel as a chunk of their own instead of being copied.
const SPLIT_PAYLOAD: usize = 2 << 10;
/// Small packets ready at once are coalesced into one body chunk up to this size.
const COALESCE: usize = 32 << 10;
/// `Packet.payload` field number of `Data`, and `Data.data`'s.
const PACKET_DATA: u32 = 4;
const DATA_DATA: u32 = 3;

/// The gRPC content type both directions carry.
const CONTENT_TYPE: &str = "application/grpc";

/// A streaming gRPC request to `uri` whose body sends `packets`; metadata goes into its
/// headers.
pub(crate) fn request<S>(uri: &'static str, packets: S) -> http::Request<tonic::body::Body>
where
    S: Stream<Item = Packet> + Unpin + Send + 'static,
{
    let mut request = http::Request::new(tonic::body::Body::new(PacketBody::request(packets)));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = http::Uri::from_static(uri);
    let headers = request.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(CONTENT_TYPE),
    );
    headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    request
}

/// The response to a streaming gRPC request whose body sends `packets` and ends with
/// `grpc-status: 0`; metadata goes into its headers.
pub(crate) fn response<S>(packets: S) -> http::Response<tonic::body::Body>
where
    S: Stream<Item = Packet> + Unpin + Send + 'static,
{
    let mut response = http::Response::new(tonic::body::Body::new(PacketBody::response(packets)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(CONTENT_TYPE),
    );
    response
}

/// A gRPC stream that could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GrpcError {
    /// The HTTP/2 body failed (connection reset, keepalive timeout, protocol error).
    #[error("stream failed")]
    Body(#[source] tonic::Status),
    /// The peer ended the stream with a non-OK `grpc-status`.
    #[error("peer ended the stream")]
    Status(#[source] tonic::Status),
    /// A message was marked compressed; no compression is ever negotiated on this link.
    #[error("compressed message received without negotiated compression")]
    Compressed,
    /// A message's length prefix exceeds [`MAX_PACKET`].
    #[error("message of {0} bytes exceeds the {MAX_PACKET}-byte limit")]
    TooLarge(usize),
    /// The message is not a protobuf `Packet`.
    #[error("message is not a Packet")]
    Decode(#[source] prost::DecodeError),
    /// The stream ended in the middle of a message.
    #[error("stream ended inside a message ({0} bytes left over)")]
    Truncated(usize),
}

/// Appends `packet`, framed as a gRPC message, to `out`; a large DATA payload is returned
/// instead of copied, and belongs on the wire right after `out`.
///
/// ```
/// use bytes::{Bytes, BytesMut};
/// use kmetal_tunnel::Frame;
/// use kmetal_tunnel::grpc::{Decoder, encode};
///
/// let payload = Bytes::from(vec![7u8; 64 << 10]);
/// let frame = Frame::Data { connect_id: 1, data: payload.clone(), error: String::new() };
/// let mut head = BytesMut::new();
/// let rest = encode(frame.clone().into(), &mut head).expect("a bulk payload is not copied");
/// assert_eq!(rest.as_ptr(), payload.as_ptr());
///
/// let mut decoder = Decoder::default();
/// decoder.push(head.freeze());
/// decoder.push(rest);
/// let packet = decoder.next_packet().unwrap().expect("a whole packet");
/// assert_eq!(Frame::try_from(packet), Ok(frame));
/// ```
pub fn encode(packet: Packet, out: &mut BytesMut) -> Option<Bytes> {
    let kind = packet.r#type;
    match packet.payload {
        Some(Payload::Data(mut data)) if data.data.len() >= SPLIT_PAYLOAD => {
            let payload = std::mem::take(&mut data.data);
            let data_len = data.encoded_len()
                + key_len(DATA_DATA)
                + encoded_len_varint(payload.len() as u64)
                + payload.len();
            let kind_len = if kind == 0 {
                0
            } else {
                key_len(1) + encoded_len_varint(i64::from(kind) as u64)
            };
            let packet_len =
                kind_len + key_len(PACKET_DATA) + encoded_len_varint(data_len as u64) + data_len;
            out.reserve(PREFIX + packet_len - payload.len());
            put_prefix(out, packet_len);
            if kind != 0 {
                prost::encoding::int32::encode(1, &kind, out);
            }
            encode_key(PACKET_DATA, WireType::LengthDelimited, out);
            encode_varint(data_len as u64, out);
            data.encode_raw(out);
            encode_key(DATA_DATA, WireType::LengthDelimited, out);
            encode_varint(payload.len() as u64, out);
            Some(payload)
        }
        payload => {
            let packet = Packet {
                r#type: kind,
                payload,
            };
            let len = packet.encoded_len();
            out.reserve(PREFIX + len);
            put_prefix(out, len);
            packet.encode_raw(out);
            None
        }
    }
}

fn put_prefix(out: &mut BytesMut, len: usize) {
    out.put_u8(0);
    // Packets are bounded by MAX_CHUNK plus a few header bytes, far below 4 GiB.
    out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
}

/// An HTTP body that sends a stream of packets as gRPC messages; a response body ends with
/// `grpc-status: 0` trailers, a request body with END_STREAM.
struct PacketBody<S> {
    packets: S,
    payload: Option<Bytes>,
    ended: bool,
    trailers: bool,
}

impl<S> PacketBody<S> {
    /// The body of a client's request stream.
    fn request(packets: S) -> Self {
        PacketBody {
            packets,
            payload: None,
            ended: false,
            trailers: false,
        }
    }

    /// The body of a server's response stream.
    fn response(packets: S) -> Self {
        PacketBody {
            trailers: true,
            ..PacketBody::request(packets)
        }
    }
}

impl<S: Stream<Item = Packet> + Unpin> http_body::Body for PacketBody<S> {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if let Some(payload) = self.payload.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(payload))));
        }
        let mut head = BytesMut::new();
        while !self.ended && head.len() < COALESCE {
            match Pin::new(&mut self.packets).poll_next(cx) {
                Poll::Ready(Some(packet)) => {
                    if let Some(payload) = encode(packet, &mut head) {
                        self.payload = Some(payload);
                        break;
                    }
                }
                Poll::Ready(None) => self.ended = true,
                Poll::Pending => break,
            }
        }
        if !head.is_empty() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(head.freeze()))));
        }
        if !self.ended {
            return Poll::Pending;
        }
        if std::mem::take(&mut self.trailers) {
            let mut t = HeaderMap::new();
            t.insert("grpc-status", HeaderValue::from_static("0"));
            return Poll::Ready(Some(Ok(http_body::Frame::trailers(t))));
        }
        Poll::Ready(None)
    }
}

/// Received body chunks, kept as they arrived; a [`Buf`] whose `copy_to_bytes` slices the
/// front chunk when it holds the whole range, which is how a payload stays uncopied.
#[derive(Debug, Default)]
struct Chunks {
    chunks: VecDeque<Bytes>,
    len: usize,
}

impl Chunks {
    fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.len += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    /// The first `N` bytes, without consuming them.
    fn peek<const N: usize>(&self) -> Option<[u8; N]> {
        if self.len < N {
            return None;
        }
        let mut out = [0u8; N];
        let mut at = 0;
        for c in &self.chunks {
            let n = c.len().min(N - at);
            out[at..at + n].copy_from_slice(&c[..n]);
            at += n;
            if at == N {
                break;
            }
        }
        Some(out)
    }
}

impl Buf for Chunks {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.chunks.front().map_or(&[], |c| c.as_ref())
    }

    fn advance(&mut self, cnt: usize) {
        let mut left = cnt.min(self.len);
        self.len -= left;
        while left > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            if left < front.len() {
                front.advance(left);
                break;
            }
            left -= front.len();
            self.chunks.pop_front();
        }
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        if let Some(front) = self.chunks.front_mut() {
            if front.len() >= len {
                let out = front.split_to(len);
                if front.is_empty() {
                    self.chunks.pop_front();
                }
                self.len -= len;
                return out;
            }
        }
        let mut out = BytesMut::with_capacity(len.min(self.len));
        out.put((&mut *self).take(len));
        out.freeze()
    }
}

/// Splits a gRPC byte stream (the body of an `AgentService.Connect` or `ProxyService.Proxy`
/// request or response) into packets; a payload that arrived in one piece is a slice of it, not a copy.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Chunks,
}

impl Decoder {
    /// Adds bytes received from the peer.
    pub fn push(&mut self, chunk: Bytes) {
        self.buf.push(chunk);
    }

    /// The next whole packet, if one has arrived. An error about the framing (compressed,
    /// too large) repeats on every later call: the stream cannot be resynchronised. A
    /// message that is not a `Packet` is an error once, and decoding goes on after it.
    pub fn next_packet(&mut self) -> Result<Option<Packet>, GrpcError> {
        let Some(prefix) = self.buf.peek::<PREFIX>() else {
            return Ok(None);
        };
        if prefix[0] != 0 {
            return Err(GrpcError::Compressed);
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if len > MAX_PACKET {
            return Err(GrpcError::TooLarge(len));
        }
        if self.buf.remaining() < PREFIX + len {
            return Ok(None);
        }
        self.buf.advance(PREFIX);
        let mut message = (&mut self.buf).take(len);
        let packet = Packet::decode(&mut message);
        // A message that did not decode is skipped whole, keeping the stream in step.
        let rest = message.remaining();
        message.advance(rest);
        packet.map(Some).map_err(GrpcError::Decode)
    }

    /// Bytes received that do not yet form a whole packet.
    pub fn pending(&self) -> usize {
        self.buf.remaining()
    }
}

/// Reads the packets of a gRPC stream's body (a request body on the server, a response
/// body on the client).
#[derive(Debug)]
pub(crate) struct PacketReader {
    body: tonic::body::Body,
    decoder: Decoder,
}

impl PacketReader {
    pub(crate) fn new(body: tonic::body::Body) -> Self {
        PacketReader {
            body,
            decoder: Decoder::default(),
        }
    }

    /// The next packet; `None` when the peer ended the stream cleanly.
    pub(crate) async fn next(&mut self) -> Result<Option<Packet>, GrpcError> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// [`PacketReader::next`] for callers that poll (a stream's `poll_read`).
    pub(crate) fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Packet>, GrpcError>> {
        loop {
            if let Some(p) = self.decoder.next_packet()? {
                return Poll::Ready(Ok(Some(p)));
            }
            let frame = match http_body::Body::poll_frame(Pin::new(&mut self.body), cx) {
                Poll::Ready(frame) => frame,
                Poll::Pending => return Poll::Pending,
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.decoder.push(data),
                    Err(frame) => {
                        if let Some(status) = frame
                            .trailers_ref()
                            .and_then(tonic::Status::from_header_map)
                        {
                            if status.code() != tonic::Code::Ok {
                                return Poll::Ready(Err(GrpcError::Status(status)));
                            }
                        }
                    }
                },
                Some(Err(status)) => return Poll::Ready(Err(GrpcError::Body(status))),
                None => {
                    return Poll::Ready(match self.decoder.pending() {
                        0 => Ok(None),
                        n => Err(GrpcError::Truncated(n)),
                    });
                }
            }
        }
    }
}

/// The largest HTTP/2 frame our peers may send: a whole DATA chunk and its message header,
/// so a payload arrives in one frame instead of 16 KiB pieces the decoder must copy together.
pub(crate) const MAX_FRAME: u32 = crate::proto::MAX_CHUNK as u32 + 1024;

/// The HTTP/2 client settings of the agent link and the gRPC frontend client: windows as
/// large as the servers', and [`MAX_FRAME`] (tonic's Channel cannot set the frame size).
pub(crate) fn client_builder() -> hyper::client::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(8 << 20)
        .max_frame_size(MAX_FRAME);
    builder
}

/// `response` if its headers say the server accepted the call, else the server's status.
pub(crate) fn accepted<B>(response: http::Response<B>) -> Result<http::Response<B>, tonic::Status> {
    if response.status() != http::StatusCode::OK {
        return Err(tonic::Status::unavailable(format!(
            "HTTP status {}",
            response.status()
        )));
    }
    // A refusal comes as a trailers-only response: the status is in the headers.
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        if status.code() != tonic::Code::Ok {
            return Err(status);
        }
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Frame;
    use proptest::prelude::*;

    fn packets() -> Vec<Packet> {
        vec![
            Frame::Data {
                connect_id: 7,
                data: Bytes::from(vec![0xab; 100 << 10]),
                error: String::new(),
            }
            .into(),
            Frame::Data {
                connect_id: 0,
                data: Bytes::from(vec![1; 3000]),
                error: "reset".into(),
            }
            .into(),
            Frame::Data {
                connect_id: 9,
                data: Bytes::from_static(b"tiny"),
                error: String::new(),
            }
            .into(),
            Frame::DialRequest {
                protocol: "tcp".into(),
                address: "10.0.0.1:10250".into(),
                random: -5,
            }
            .into(),
            Frame::Window {
                connect_id: 3,
                bytes: 65536,
            }
            .into(),
            Frame::Drain.into(),
        ]
    }

    /// A response body carrying thousands of small DATA packets (a real agent's 4 KiB) and
    /// then a close, polled while the packets arrive in bursts, delivers every packet in
    /// order, the close last.
    #[tokio::test]
    async fn a_response_body_keeps_every_small_packet_and_its_order() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Packet>(64);
        let n = 3_000usize;
        tokio::spawn(async move {
            for i in 0..n {
                let f = Frame::Data {
                    connect_id: 1,
                    data: Bytes::from(vec![(i % 251) as u8; 4096]),
                    error: String::new(),
                };
                tx.send(f.into()).await.expect("send");
                if i % 7 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            let close = Frame::CloseResponse {
                connect_id: 1,
                error: String::new(),
            };
            tx.send(close.into()).await.expect("send");
        });
        let mut body = PacketBody::response(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut decoder = Decoder::default();
        let mut got = Vec::new();
        loop {
            let frame =
                std::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut body), cx))
                    .await;
            let Some(Ok(frame)) = frame else { break };
            if let Ok(data) = frame.into_data() {
                decoder.push(data);
                while let Some(p) = decoder.next_packet().expect("decode") {
                    got.push(Frame::try_from(p).expect("frame"));
                }
            }
        }
        assert_eq!(got.len(), n + 1);
        for (i, f) in got[..n].iter().enumerate() {
            let Frame::Data { data, .. } = f else {
                panic!("packet {i} is {f:?}");
            };
            assert_eq!(data.len(), 4096, "packet {i}");
            assert_eq!(data[0], (i % 251) as u8, "packet {i} out of order");
        }
        assert!(matches!(got[n], Frame::CloseResponse { .. }));
    }

    #[test]
    fn split_encoding_is_byte_identical_to_prost() {
        for p in packets() {
            let mut head = BytesMut::new();
            let payload = encode(p.clone(), &mut head);
            let mut wire = head.to_vec();
            wire.extend_from_slice(payload.as_deref().unwrap_or_default());
            let mut want = Vec::new();
            want.push(0);
            want.extend_from_slice(&(p.encoded_len() as u32).to_be_bytes());
            p.encode(&mut want).expect("vec grows");
            assert_eq!(wire, want, "{p:?}");
        }
    }

    #[test]
    fn a_payload_that_arrived_whole_is_not_copied() {
        let p = packets().swap_remove(0);
        let mut head = BytesMut::new();
        let payload = encode(p, &mut head).expect("split");
        let mut d = Decoder::default();
        d.push(head.freeze());
        assert!(d.next_packet().expect("ok").is_none());
        d.push(payload.clone());
        let got = d.next_packet().expect("ok").expect("packet");
        let Some(Payload::Data(data)) = got.payload else {
            panic!("not data: {got:?}");
        };
        assert_eq!(data.data.as_ptr(), payload.as_ptr());
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn bad_prefixes_are_typed_errors_and_bad_messages_are_skipped() {
        let mut d = Decoder::default();
        d.push(Bytes::from_static(&[1, 0, 0, 0, 1, 0]));
        assert!(matches!(d.next_packet(), Err(GrpcError::Compressed)));
        let mut d = Decoder::default();
        d.push(Bytes::from_static(&[0, 0xff, 0, 0, 0]));
        assert!(matches!(d.next_packet(), Err(GrpcError::TooLarge(_))));
        let mut d = Decoder::default();
        d.push(Bytes::from_static(&[0, 0, 0, 0, 2, 0xff, 0xff]));
        let mut head = BytesMut::new();
        assert!(encode(Frame::Drain.into(), &mut head).is_none());
        d.push(head.freeze());
        assert!(matches!(d.next_packet(), Err(GrpcError::Decode(_))));
        let next = d.next_packet().expect("ok").expect("packet");
        assert_eq!(Frame::try_from(next), Ok(Frame::Drain));
    }

    proptest! {
        #[test]
        fn any_chunking_decodes_the_same_packets(
            sizes in proptest::collection::vec(1usize..70_000, 1..40),
        ) {
            let want = packets();
            let mut wire = BytesMut::new();
            for p in &want {
                if let Some(payload) = encode(p.clone(), &mut wire) {
                    wire.extend_from_slice(&payload);
                }
            }
            let mut wire = wire.freeze();
            let mut d = Decoder::default();
            let mut got = Vec::new();
            let mut sizes = sizes.into_iter().cycle();
            while !wire.is_empty() {
                let n = sizes.next().unwrap_or(1).min(wire.len());
                d.push(wire.split_to(n));
                while let Some(p) = d.next_packet().expect("valid stream") {
                    got.push(p);
                }
            }
            prop_assert_eq!(got, want);
            prop_assert_eq!(d.pending(), 0);
        }
    }
}
