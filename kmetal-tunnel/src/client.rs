//! A client of the gRPC `ProxyService` frontend (what kube-apiserver's konnectivity-client
//! does): one `Proxy` stream per dial over a unix socket, read and written as a byte stream.
//!
//! The stream is framed by [`crate::grpc`], like the agent link: a DATA payload from the
//! server is handed to `poll_read` as the slice HTTP/2 received, and each `poll_write`
//! becomes one DATA packet, so a byte crosses the client with one copy each way (the one
//! into or out of the caller's buffer). The HTTP/2 connection is hyper's, because it lets
//! the client accept frames as large as a DATA chunk: with HTTP/2's default 16 KiB frames a
//! 256 KiB payload arrives in sixteen pieces that must be copied together (one stream's
//! throughput went from 0.55–0.62x direct TLS to 0.86–0.97x).

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

use crate::grpc::{self, GrpcError, PacketReader};
use crate::proto::{self, Frame, Packet};

/// A dial through the gRPC frontend failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Connecting to the frontend's socket failed.
    #[error("connecting to {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The HTTP/2 handshake on the frontend's socket failed.
    #[error("HTTP/2 handshake on {path}")]
    Handshake {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: hyper::Error,
    },
    /// The connection to the frontend could not carry a new `Proxy` stream.
    #[error("calling Proxy")]
    Call(#[source] hyper::Error),
    /// The frontend refused the stream.
    #[error("opening a Proxy stream")]
    Stream(#[source] tonic::Status),
    /// The server could not dial (its message says why: no agent, timeout, refused).
    #[error("dial {address}: {message}")]
    Dial {
        /// The dialed address.
        address: String,
        /// The server's error.
        message: String,
    },
    /// The stream ended before the dial was answered.
    #[error("dial {0}: the stream ended before the answer")]
    NoAnswer(String),
    /// The server sent more DATA before the dial's answer than the client keeps.
    #[error("dial {address}: more than {limit} bytes arrived before the answer")]
    EarlyData {
        /// The dialed address.
        address: String,
        /// The bytes kept before the answer.
        limit: usize,
    },
    /// The server did not answer the dial in time (the dial is then abandoned with
    /// DIAL_CLS, as konnectivity-client does).
    #[error("dial {address}: no answer within {after:?}")]
    DialTimeout {
        /// The dialed address.
        address: String,
        /// The deadline.
        after: std::time::Duration,
    },
    /// The stream failed before the dial was answered.
    #[error("dial {address}")]
    Answer {
        /// The dialed address.
        address: String,
        /// How the stream failed.
        #[source]
        source: GrpcError,
    },
}

/// A client of one server's gRPC frontend: one HTTP/2 connection, opened again on the next
/// dial after it fails.
#[derive(Debug, Clone)]
pub struct ProxyClient {
    path: PathBuf,
    connection: Arc<tokio::sync::Mutex<SendRequest<tonic::body::Body>>>,
    dial_timeout: std::time::Duration,
}

/// How long a dial waits for the server's answer by default (the server's own dial timeout
/// toward the agent is shorter, so a healthy server always answers first).
pub const DEFAULT_DIAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How long an abandoned dial's stream stays open for its DIAL_CLS to reach the server.
const ABANDON_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Packets queued toward the server per dial before `poll_write` waits.
const QUEUE: usize = 16;

impl ProxyClient {
    /// Connects to the frontend's unix socket.
    pub async fn connect_unix(path: impl AsRef<Path>) -> Result<ProxyClient, ClientError> {
        let path = path.as_ref().to_path_buf();
        let connection = connect(&path).await?;
        Ok(ProxyClient {
            path,
            connection: Arc::new(tokio::sync::Mutex::new(connection)),
            dial_timeout: DEFAULT_DIAL_TIMEOUT,
        })
    }

    /// Sets how long each dial waits for the server's answer ([`DEFAULT_DIAL_TIMEOUT`]).
    pub fn with_dial_timeout(mut self, timeout: std::time::Duration) -> ProxyClient {
        self.dial_timeout = timeout;
        self
    }

    /// The connection, opened again if it has failed.
    async fn connection(&self) -> Result<SendRequest<tonic::body::Body>, ClientError> {
        let mut connection = self.connection.lock().await;
        if connection.is_closed() {
            *connection = connect(&self.path).await?;
        }
        Ok(connection.clone())
    }

    /// Dials `address` through the tunnel; the returned stream carries the connection.
    pub async fn dial(&self, address: &str) -> Result<ProxyStream, ClientError> {
        let deadline = tokio::time::Instant::now() + self.dial_timeout;
        let timed_out = || ClientError::DialTimeout {
            address: address.into(),
            after: self.dial_timeout,
        };
        let (tx, rx) = mpsc::channel::<Packet>(QUEUE);
        let random = proto::random_i64();
        let dial = Frame::DialRequest {
            protocol: "tcp".into(),
            address: address.into(),
            random,
        };
        // The queue is new and empty, so this cannot fail.
        let _ = tx.try_send(dial.into());
        let mut inbound = tokio::time::timeout_at(deadline, self.open(rx))
            .await
            .map_err(|_| timed_out())??;
        match tokio::time::timeout_at(deadline, answer(&mut inbound, address)).await {
            Ok(Ok((connect_id, early))) => Ok(ProxyStream {
                connect_id,
                inbound,
                early,
                current: Bytes::new(),
                eof: false,
                outbound: PollSender::new(tx),
                closed: false,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                // Tell the server to forget the dial, as konnectivity-client does. Dropping
                // the response body now would reset the stream before DIAL_CLS goes out,
                // so a task keeps it until the server ends the stream (or a grace passes).
                let _ = tx.try_send(Frame::CloseDial { random }.into());
                drop(tx);
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(ABANDON_GRACE, async {
                        while let Ok(Some(_)) = inbound.next().await {}
                    })
                    .await;
                });
                Err(timed_out())
            }
        }
    }

    /// Opens a `Proxy` stream whose request body is `rx`; returns its response body.
    async fn open(&self, rx: mpsc::Receiver<Packet>) -> Result<PacketReader, ClientError> {
        let request = grpc::request(
            "http://konnectivity.invalid/ProxyService/Proxy",
            tokio_stream::wrappers::ReceiverStream::new(rx),
        );
        let mut connection = self.connection().await?;
        connection.ready().await.map_err(ClientError::Call)?;
        let response = connection
            .send_request(request)
            .await
            .map_err(ClientError::Call)?;
        let response = grpc::accepted(response).map_err(ClientError::Stream)?;
        Ok(PacketReader::new(tonic::body::Body::new(
            response.into_body(),
        )))
    }
}

/// The most DATA kept that arrives before the dial's answer.
const MAX_EARLY: usize = 4 << 20;

/// Reads packets until the dial's answer; returns the new connection's id and the bytes
/// for it that came before the answer (a server may forward a backend that speaks first
/// ahead of it), in order.
async fn answer(
    inbound: &mut PacketReader,
    address: &str,
) -> Result<(i64, VecDeque<Bytes>), ClientError> {
    let mut early: Vec<(i64, Bytes)> = Vec::new();
    let mut early_len = 0;
    loop {
        let packet = match inbound.next().await {
            Ok(Some(p)) => p,
            Ok(None) => return Err(ClientError::NoAnswer(address.into())),
            Err(source) => {
                return Err(ClientError::Answer {
                    address: address.into(),
                    source,
                });
            }
        };
        match Frame::try_from(packet) {
            Ok(Frame::DialResponse {
                connect_id, error, ..
            }) => {
                if error.is_empty() {
                    let mine = early
                        .into_iter()
                        .filter(|(id, _)| *id == connect_id)
                        .map(|(_, data)| data)
                        .collect();
                    return Ok((connect_id, mine));
                }
                return Err(ClientError::Dial {
                    address: address.into(),
                    message: error,
                });
            }
            Ok(Frame::Data {
                connect_id, data, ..
            }) => {
                early_len += data.len();
                if early_len > MAX_EARLY {
                    return Err(ClientError::EarlyData {
                        address: address.into(),
                        limit: MAX_EARLY,
                    });
                }
                early.push((connect_id, data));
            }
            _ => {}
        }
    }
}

/// Opens an HTTP/2 connection to the frontend at `path`. Frames may be as large as a DATA
/// chunk, so the server's payloads arrive whole instead of in 16 KiB pieces to reassemble.
async fn connect(path: &Path) -> Result<SendRequest<tonic::body::Body>, ClientError> {
    let io = UnixStream::connect(path)
        .await
        .map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    let (send, connection) = grpc::client_builder()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|source| ClientError::Handshake {
            path: path.to_path_buf(),
            source,
        })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "gRPC frontend connection ended");
        }
    });
    Ok(send)
}

/// One connection dialed through the gRPC frontend, as a byte stream.
///
/// Shutting down the write half sends `CLOSE_REQ`, which closes the whole connection (the
/// Konnectivity protocol has no half-close); dropping the stream ends its `Proxy` call,
/// which closes the connection too.
#[derive(Debug)]
pub struct ProxyStream {
    connect_id: i64,
    inbound: PacketReader,
    /// Bytes that arrived before the dial's answer, read before anything newer.
    early: VecDeque<Bytes>,
    current: Bytes,
    eof: bool,
    outbound: PollSender<Packet>,
    closed: bool,
}

impl ProxyStream {
    /// The connection id the server gave this dial.
    pub fn connect_id(&self) -> i64 {
        self.connect_id
    }

    /// Waits for room in the request queue, then queues the frame `make` builds (built
    /// only once there is room, so a pending write copies nothing).
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        make: impl FnOnce(i64) -> Frame,
    ) -> Poll<io::Result<()>> {
        ready!(self.outbound.poll_reserve(cx)).map_err(|_| gone())?;
        let frame = make(self.connect_id);
        self.outbound.send_item(frame.into()).map_err(|_| gone())?;
        Poll::Ready(Ok(()))
    }
}

/// The request half of the `Proxy` call has ended (the server or the connection went away).
fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the Proxy stream has ended")
}

impl AsyncRead for ProxyStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.current.is_empty() && !this.eof {
            if let Some(data) = this.early.pop_front() {
                this.current = data;
                continue;
            }
            match ready!(this.inbound.poll_next(cx)) {
                Ok(Some(packet)) => match Frame::try_from(packet) {
                    Ok(Frame::Data { data, error, .. }) => {
                        if !error.is_empty() {
                            this.eof = true;
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::ConnectionReset,
                                error,
                            )));
                        }
                        this.current = data;
                    }
                    Ok(Frame::CloseResponse { .. }) | Ok(Frame::CloseRequest { .. }) => {
                        this.eof = true
                    }
                    _ => {}
                },
                Ok(None) => this.eof = true,
                Err(e) => {
                    this.eof = true;
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, e)));
                }
            }
        }
        let n = this.current.len().min(buf.remaining());
        buf.put_slice(&this.current[..n]);
        this.current.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ProxyStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.closed {
            return Poll::Ready(Err(gone()));
        }
        let n = buf.len().min(proto::MAX_CHUNK);
        ready!(self.poll_send(cx, |connect_id| Frame::Data {
            connect_id,
            data: Bytes::copy_from_slice(&buf[..n]),
            error: String::new(),
        }))?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Queued packets go out as soon as the HTTP/2 stream's window allows.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.closed {
            return Poll::Ready(Ok(()));
        }
        ready!(self.poll_send(cx, |connect_id| Frame::CloseRequest { connect_id }))?;
        self.closed = true;
        Poll::Ready(Ok(()))
    }
}
