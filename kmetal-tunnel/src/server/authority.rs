//! The gRPC frontend's connections from clients that name the socket as `:authority`.
//!
//! kube-apiserver's egress selector dials the frontend's unix socket with grpc-go, which sends
//! the socket path, percent-encoded (`%2Frun%2Fkonnectivity.sock`), as `:authority`. That is
//! not a valid URI authority, and h2 (under tonic) answers every such request with
//! RST_STREAM(PROTOCOL_ERROR) (hyperium/h2#442; the relaxing PR #487 is still open), so
//! Kamaji's exact setup would fail against a tonic server. The real konnectivity-server (Go)
//! ignores the authority.
//!
//! [`AuthorityFix`] sits between the socket and h2 and rewrites only what h2 refuses: it
//! reads the client's frames, decodes every header block (HPACK state is per connection,
//! so all of them go through one decoder and one encoder), replaces an `:authority` that
//! does not parse with `localhost`, and passes every other frame through untouched, DATA
//! included, without copying it. Writes toward the client are not touched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Re-encoded blocks go out in frames no larger than every HTTP/2 peer accepts.
const OUT_FRAME: usize = 16_384;
/// The largest header block accepted (h2's default header list limit is 16 MiB; a Proxy
/// call's headers are a few hundred bytes).
const MAX_BLOCK: usize = 1 << 20;
/// h2's SETTINGS_HEADER_TABLE_SIZE (it never changes it), which bounds the client's
/// encoder table and so ours.
const TABLE_SIZE: usize = 4_096;
/// What a refused authority becomes.
const LOCALHOST: &[u8] = b"localhost";

/// Where the reader is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Passing the connection preface through (bytes left).
    Preface(usize),
    /// Waiting for a whole frame header.
    Header,
    /// Passing a frame's payload through (bytes left).
    Payload(usize),
    /// Collecting a HEADERS or CONTINUATION payload (bytes left).
    Block(usize),
}

/// A header block being collected across HEADERS and CONTINUATION frames.
#[derive(Debug, Default)]
struct Pending {
    stream: u32,
    /// END_STREAM and, when set, PRIORITY with its five bytes.
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: BytesMut,
    /// The frame whose payload is being read: HEADERS (padding, priority) or CONTINUATION.
    frame_type: u8,
    frame_flags: u8,
    payload: BytesMut,
}

/// A client connection to the gRPC frontend whose refused `:authority` values are replaced
/// (see the module docs).
pub(crate) struct AuthorityFix<S> {
    inner: S,
    state: State,
    /// Bytes read from the socket and not yet handled.
    input: BytesMut,
    /// Rewritten bytes ready for h2.
    output: BytesMut,
    pending: Option<Pending>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    /// Authorities replaced so far (for tests).
    replaced: u64,
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

impl<S> AuthorityFix<S> {
    pub(crate) fn new(inner: S) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        AuthorityFix {
            inner,
            state: State::Preface(PREFACE.len()),
            input: BytesMut::with_capacity(16 << 10),
            output: BytesMut::new(),
            pending: None,
            decoder,
            encoder: loona_hpack::Encoder::new(),
            replaced: 0,
        }
    }

    /// Moves what `input` holds through the state machine: pass-through bytes go to
    /// `output` only when `output` would otherwise be empty (the caller reads them straight
    /// from `input` via [`Self::take_passthrough`]); header blocks are rewritten.
    fn advance(&mut self) -> io::Result<()> {
        loop {
            match self.state {
                State::Preface(_) | State::Payload(_) => return Ok(()),
                State::Header => {
                    if self.input.len() < HEADER_LEN {
                        return Ok(());
                    }
                    let h = self.input.split_to(HEADER_LEN);
                    let len =
                        (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                    let (kind, flags) = (h[3], h[4]);
                    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                    match (kind, &mut self.pending) {
                        (HEADERS, None) => {
                            self.pending = Some(Pending {
                                stream,
                                flags: flags & END_STREAM,
                                frame_type: HEADERS,
                                frame_flags: flags,
                                ..Pending::default()
                            });
                            self.state = State::Block(len);
                        }
                        (CONTINUATION, Some(p)) if p.stream == stream => {
                            p.frame_type = CONTINUATION;
                            p.frame_flags = flags;
                            self.state = State::Block(len);
                        }
                        (_, Some(_)) => {
                            return Err(invalid("a frame inside a header block"));
                        }
                        (_, None) => {
                            self.output.extend_from_slice(&h);
                            self.state = State::Payload(len);
                        }
                    }
                    if self
                        .pending
                        .as_ref()
                        .is_some_and(|p| p.fragment.len() + len > MAX_BLOCK)
                    {
                        return Err(invalid("header block too large"));
                    }
                }
                State::Block(left) => {
                    let n = left.min(self.input.len());
                    let chunk = self.input.split_to(n);
                    let p = self
                        .pending
                        .as_mut()
                        .ok_or_else(|| invalid("no header block"))?;
                    p.payload.extend_from_slice(&chunk);
                    if n < left {
                        self.state = State::Block(left - n);
                        return Ok(());
                    }
                    self.end_frame()?;
                    self.state = State::Header;
                }
            }
        }
    }

    /// A HEADERS or CONTINUATION payload is complete: keep its fragment, and rewrite the
    /// block once END_HEADERS arrives.
    fn end_frame(&mut self) -> io::Result<()> {
        let p = self
            .pending
            .as_mut()
            .ok_or_else(|| invalid("no header block"))?;
        let mut payload = std::mem::take(&mut p.payload);
        if p.frame_type == HEADERS {
            let mut pad = 0;
            if p.frame_flags & PADDED != 0 {
                if payload.is_empty() {
                    return Err(invalid("PADDED HEADERS without its pad length"));
                }
                pad = usize::from(payload.get_u8());
            }
            if p.frame_flags & PRIORITY != 0 {
                if payload.len() < 5 {
                    return Err(invalid("PRIORITY HEADERS without its priority"));
                }
                let mut prio = [0u8; 5];
                payload.copy_to_slice(&mut prio);
                p.priority = Some(prio);
            }
            if pad > payload.len() {
                return Err(invalid("padding longer than the HEADERS payload"));
            }
            payload.truncate(payload.len() - pad);
        }
        p.fragment.extend_from_slice(&payload);
        if p.frame_flags & END_HEADERS == 0 {
            return Ok(());
        }
        let p = self
            .pending
            .take()
            .ok_or_else(|| invalid("no header block"))?;
        let mut headers = self
            .decoder
            .decode(&p.fragment)
            .map_err(|e| invalid(format!("HPACK: {e:?}")))?;
        for (name, value) in &mut headers {
            if name.as_slice() == b":authority"
                && http::uri::Authority::try_from(value.as_slice()).is_err()
            {
                *value = LOCALHOST.to_vec();
                self.replaced += 1;
            }
        }
        let block = self
            .encoder
            .encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        self.emit_block(p.stream, p.flags, p.priority, &block);
        Ok(())
    }

    fn emit_block(&mut self, stream: u32, flags: u8, priority: Option<[u8; 5]>, block: &[u8]) {
        let first_room = OUT_FRAME - if priority.is_some() { 5 } else { 0 };
        let (first, mut rest) = block.split_at(block.len().min(first_room));
        let mut frame = |kind: u8, flags: u8, parts: &[&[u8]]| {
            let len: usize = parts.iter().map(|p| p.len()).sum();
            // At most OUT_FRAME: fits the 24-bit length.
            self.output.put_uint(len as u64, 3);
            self.output.put_u8(kind);
            self.output.put_u8(flags);
            self.output.put_u32(stream);
            for part in parts {
                self.output.extend_from_slice(part);
            }
        };
        let end = if rest.is_empty() { END_HEADERS } else { 0 };
        match &priority {
            Some(prio) => frame(HEADERS, flags | PRIORITY | end, &[prio, first]),
            None => frame(HEADERS, flags | end, &[first]),
        }
        while !rest.is_empty() {
            let (piece, tail) = rest.split_at(rest.len().min(OUT_FRAME));
            rest = tail;
            let end = if rest.is_empty() { END_HEADERS } else { 0 };
            frame(CONTINUATION, end, &[piece]);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if let State::Preface(left) | State::Payload(left) = this.state {
                if left == 0 {
                    this.state = State::Header;
                    continue;
                }
                let n = if this.input.is_empty() {
                    // Straight from the socket into h2's buffer: DATA is not copied.
                    let dst = buf.initialize_unfilled_to(left.min(buf.remaining()));
                    let mut direct = ReadBuf::new(dst);
                    ready!(Pin::new(&mut this.inner).poll_read(cx, &mut direct))?;
                    let n = direct.filled().len();
                    if n == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    buf.advance(n);
                    n
                } else {
                    let n = left.min(this.input.len()).min(buf.remaining());
                    buf.put_slice(&this.input.split_to(n));
                    n
                };
                this.state = match this.state {
                    State::Preface(_) => State::Preface(left - n),
                    _ => State::Payload(left - n),
                };
                return Poll::Ready(Ok(()));
            }
            this.advance()?;
            if !this.output.is_empty() || matches!(this.state, State::Payload(_)) {
                continue;
            }
            // More of a frame header or a header block is needed.
            let mut tmp = [0u8; 16 << 10];
            let mut rb = ReadBuf::new(&mut tmp);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                // EOF: whatever is left is a truncated frame h2 would refuse anyway.
                return Poll::Ready(Ok(()));
            }
            this.input.extend_from_slice(rb.filled());
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S> tonic::transport::server::Connected for AuthorityFix<S>
where
    S: Send + Sync + 'static,
{
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Splits `bytes` into frames after the preface: (type, flags, stream, payload).
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert!(bytes.starts_with(PREFACE));
        bytes = &bytes[PREFACE.len()..];
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len = (usize::from(bytes[0]) << 16)
                | (usize::from(bytes[1]) << 8)
                | usize::from(bytes[2]);
            let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
            out.push((bytes[3], bytes[4], stream, bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        out
    }

    /// Runs `input` through the fix in reads of `chunk` bytes; returns what h2 would read.
    async fn through(input: Vec<u8>, chunk: usize) -> (Vec<u8>, u64) {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let writer = tokio::spawn(async move {
            for piece in input.chunks(chunk) {
                client.write_all(piece).await.expect("write");
            }
            client.shutdown().await.expect("shutdown");
        });
        let mut fix = AuthorityFix::new(server);
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await.expect("read");
        writer.await.expect("writer");
        (out, fix.replaced)
    }

    fn request(authority: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        vec![
            (b":method".to_vec(), b"POST".to_vec()),
            (b":scheme".to_vec(), b"http".to_vec()),
            (b":path".to_vec(), b"/ProxyService/Proxy".to_vec()),
            (b":authority".to_vec(), authority.to_vec()),
            (b"content-type".to_vec(), b"application/grpc".to_vec()),
            (b"te".to_vec(), b"trailers".to_vec()),
        ]
    }

    fn encode(enc: &mut loona_hpack::Encoder<'static>, h: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        enc.encode(h.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
    }

    /// grpc-go's percent-encoded socket path becomes `localhost` on two requests (the second
    /// refers to the first through the dynamic table), a valid authority stays, and the
    /// SETTINGS and DATA frames between them pass through byte for byte, whatever the read
    /// sizes.
    #[tokio::test]
    async fn refused_authorities_become_localhost_and_other_frames_pass_untouched() {
        let mut enc = loona_hpack::Encoder::new();
        let bad = b"%2Ftmp%2Fkonnectivity%2Fgrpc.sock";
        let settings = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        let data = frame(0x0, 0, 1, &vec![7u8; 40_000]);
        let mut input = PREFACE.to_vec();
        input.extend(&settings);
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &encode(&mut enc, &request(bad)),
        ));
        input.extend(&data);
        // The second request is split over HEADERS (padded, with priority) + CONTINUATION.
        let block = encode(&mut enc, &request(bad));
        let (a, b) = block.split_at(block.len() / 2);
        let mut first = vec![2u8];
        first.extend_from_slice(&[0, 0, 0, 1, 16]);
        first.extend_from_slice(a);
        first.extend_from_slice(&[0, 0]);
        input.extend(frame(HEADERS, PADDED | PRIORITY, 3, &first));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, b));
        input.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            5,
            &encode(&mut enc, &request(b"localhost:8090")),
        ));
        for chunk in [1, 7, 4096, 1 << 20] {
            let (out, replaced) = through(input.clone(), chunk).await;
            assert_eq!(replaced, 2, "chunk {chunk}");
            let got = frames(&out);
            assert_eq!(got.len(), 5, "chunk {chunk}");
            assert_eq!(frame(got[0].0, got[0].1, got[0].2, &got[0].3), settings);
            assert_eq!(frame(got[2].0, got[2].1, got[2].2, &got[2].3), data);
            let mut dec = loona_hpack::Decoder::new();
            let h1 = dec.decode(&got[1].3).expect("block 1");
            assert_eq!(h1, request(b"localhost"));
            assert_eq!(
                (got[3].0, got[3].1 & (PRIORITY | END_HEADERS)),
                (HEADERS, PRIORITY | END_HEADERS)
            );
            assert_eq!(&got[3].3[..5], &[0, 0, 0, 1, 16]);
            let h2 = dec.decode(&got[3].3[5..]).expect("block 2");
            assert_eq!(h2, request(b"localhost"));
            assert_eq!(got[4].1 & END_STREAM, END_STREAM);
            let h3 = dec.decode(&got[4].3).expect("block 3");
            assert_eq!(h3, request(b"localhost:8090"));
        }
    }

    /// A block too large to re-encode in one frame goes out as HEADERS + CONTINUATION.
    #[tokio::test]
    async fn a_large_block_is_split_into_continuations() {
        let mut enc = loona_hpack::Encoder::new();
        let mut h = request(b"%2Fx");
        h.push((b"x-big".to_vec(), vec![b'a'; 40_000]));
        let mut input = PREFACE.to_vec();
        let block = encode(&mut enc, &h);
        for (i, piece) in block.chunks(16_000).enumerate() {
            let (kind, flags) = if i == 0 {
                (HEADERS, 0)
            } else {
                (CONTINUATION, 0)
            };
            let last = (i + 1) * 16_000 >= block.len();
            input.extend(frame(
                kind,
                flags | if last { END_HEADERS } else { 0 },
                1,
                piece,
            ));
        }
        let (out, replaced) = through(input, 4096).await;
        assert_eq!(replaced, 1);
        let got = frames(&out);
        assert!(got.len() >= 3);
        assert_eq!(got[0].0, HEADERS);
        assert!(
            got[1..]
                .iter()
                .all(|f| f.0 == CONTINUATION && f.3.len() <= OUT_FRAME)
        );
        let whole: Vec<u8> = got.iter().flat_map(|f| f.3.clone()).collect();
        let mut want = h.clone();
        want[3].1 = b"localhost".to_vec();
        assert_eq!(
            loona_hpack::Decoder::new().decode(&whole).expect("block"),
            want
        );
    }

    /// A frame of another stream in the middle of a header block, or a malformed HPACK
    /// block, fails the read instead of reaching h2 half-rewritten.
    #[tokio::test]
    async fn broken_header_blocks_fail_the_connection() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, b"\x82"));
        input.extend(frame(0x0, 0, 1, b"data"));
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client.write_all(&input).await.expect("write");
        drop(client);
        let mut out = Vec::new();
        let err = AuthorityFix::new(server)
            .read_to_end(&mut out)
            .await
            .expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);

        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff]));
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client.write_all(&input).await.expect("write");
        drop(client);
        let err = AuthorityFix::new(server)
            .read_to_end(&mut out)
            .await
            .expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
