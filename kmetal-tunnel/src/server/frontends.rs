//! The frontends kube-apiserver dials through: HTTP CONNECT (unix socket or mTLS TCP) and
//! gRPC `ProxyService` on a unix socket.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::Status;

use super::registry::{DialError, Shared};
use super::service::{Method, check_call};
use crate::conn::{self, ConnEnd, Role};
use crate::connect;
use crate::grpc;
use crate::proto::{Frame, Packet};

pub(super) async fn serve_connect_one<S>(shared: &Shared, mut stream: S)
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let head = tokio::time::timeout(
        shared.config.handshake_timeout,
        connect::read_request(&mut stream),
    )
    .await;
    let (request, rest) = match head {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let status = match e {
                connect::ConnectError::Method(_) => 405,
                connect::ConnectError::Incomplete | connect::ConnectError::Io(_) => return,
                _ => 400,
            };
            let _ = stream
                .write_all(&connect::error_response(status, &e.to_string()))
                .await;
            return;
        }
        Err(_) => return,
    };
    match shared.dial(&request.address).await {
        Ok(end) => {
            if stream.write_all(connect::ESTABLISHED).await.is_err() {
                return;
            }
            conn::pump(stream, rest, end, Role::Dialer).await;
        }
        Err(e) => {
            let _ = stream
                .write_all(&connect::error_response(e.http_status(), &e.to_string()))
                .await;
            let _ = stream.shutdown().await;
        }
    }
}

/// `ProxyService` as a plain HTTP service, framed by [`crate::grpc`] like the agent link, so
/// a DATA payload from kube-apiserver reaches the agent link, and one from the agent
/// reaches kube-apiserver, without being copied.
#[derive(Clone)]
pub(super) struct ProxyEndpoint {
    pub(super) shared: Arc<Shared>,
    /// Cancelled when the frontend shuts down.
    pub(super) stopped: tokio_util::sync::CancellationToken,
}

/// The one method of `ProxyService`.
pub(super) const PROXY_PATH: &str = "/ProxyService/Proxy";

/// Packets queued toward one gRPC frontend stream before its forwarders wait (HTTP/2 flow
/// control then pushes back per stream).
pub(super) const FRONTEND_QUEUE: usize = 64;

impl Method for ProxyEndpoint {
    const SERVICE: &'static str = "ProxyService";

    fn answer(
        &self,
        request: http::Request<tonic::body::Body>,
    ) -> Result<http::Response<tonic::body::Body>, Status> {
        self.proxy(request)
    }
}

impl ProxyEndpoint {
    pub(super) fn proxy(
        &self,
        request: http::Request<tonic::body::Body>,
    ) -> Result<http::Response<tonic::body::Body>, Status> {
        check_call(&request, PROXY_PATH)?;
        let (tx, rx) = mpsc::channel::<Packet>(FRONTEND_QUEUE);
        let shared = self.shared.clone();
        let stopped = self.stopped.clone();
        let mut inbound = grpc::PacketReader::new(request.into_body());
        tokio::spawn(async move {
            let mut frontend = GrpcFrontend {
                shared,
                tx,
                conns: HashMap::new(),
                dials: HashMap::new(),
                next_id: 0,
            };
            let (done_tx, mut done_rx) = mpsc::unbounded_channel::<GrpcEvent>();
            loop {
                tokio::select! {
                    msg = inbound.next() => match msg {
                        Ok(Some(packet)) => match Frame::try_from(packet) {
                            Ok(frame) => frontend.on_frame(frame, &done_tx).await,
                            Err(e) => tracing::debug!(error = %e, "malformed packet from a frontend; ignored"),
                        },
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(error = %e, "frontend stream failed");
                            break;
                        }
                    },
                    Some(ev) = done_rx.recv() => frontend.on_event(ev, &done_tx).await,
                    _ = stopped.cancelled() => break,
                }
            }
            frontend.close_all().await;
        });
        Ok(grpc::response(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }
}

/// Results reported back to a gRPC frontend's loop by its dial and forwarder tasks.
pub(super) enum GrpcEvent {
    Dialed {
        random: i64,
        /// Boxed: every frontend stream's event channel allocates 32 slots up front, and
        /// unboxed this made each slot 136 bytes (4 KiB per idle stream).
        result: Box<Result<ConnEnd, DialError>>,
    },
    Closed {
        id: i64,
    },
}

pub(super) struct FrontendConn {
    /// Toward the agent, under the agent's connect id.
    pub(super) sender: conn::Sender,
    pub(super) forwarder: tokio::task::JoinHandle<()>,
}

pub(super) struct GrpcFrontend {
    pub(super) shared: Arc<Shared>,
    pub(super) tx: mpsc::Sender<Packet>,
    pub(super) conns: HashMap<i64, FrontendConn>,
    pub(super) dials: HashMap<i64, tokio::task::JoinHandle<()>>,
    pub(super) next_id: i64,
}

impl GrpcFrontend {
    pub(super) async fn send(&self, frame: Frame) {
        let _ = self.tx.send(frame.into()).await;
    }

    pub(super) async fn on_frame(
        &mut self,
        frame: Frame,
        events: &mpsc::UnboundedSender<GrpcEvent>,
    ) {
        match frame {
            Frame::DialRequest {
                address, random, ..
            } => {
                let shared = self.shared.clone();
                let events = events.clone();
                let task = tokio::spawn(async move {
                    let result = shared.dial(&address).await;
                    let _ = events.send(GrpcEvent::Dialed {
                        random,
                        result: Box::new(result),
                    });
                });
                self.dials.insert(random, task);
            }
            Frame::CloseDial { random } => {
                if let Some(t) = self.dials.remove(&random) {
                    t.abort();
                }
            }
            Frame::Data {
                connect_id, data, ..
            } => {
                let Some(c) = self.conns.get(&connect_id) else {
                    return;
                };
                // A closed connection or a gone agent ends this connection only; the
                // frontend learns of it from the close that follows.
                let _ = c.sender.data(data).await;
            }
            Frame::CloseRequest { connect_id } => {
                if let Some(c) = self.conns.get(&connect_id) {
                    c.sender.close().await;
                }
            }
            other => tracing::debug!(?other, "unexpected packet from a frontend; ignored"),
        }
    }

    pub(super) async fn on_event(
        &mut self,
        ev: GrpcEvent,
        events: &mpsc::UnboundedSender<GrpcEvent>,
    ) {
        match ev {
            GrpcEvent::Dialed { random, result } => {
                self.dials.remove(&random);
                match *result {
                    Ok(end) => {
                        self.next_id += 1;
                        let id = self.next_id;
                        // The answer goes out before the forwarder starts: a backend that
                        // speaks first (a real agent sends its bytes at once) would
                        // otherwise put DATA ahead of it, and a client drops DATA that
                        // comes before its dial's answer.
                        self.send(Frame::DialResponse {
                            random,
                            connect_id: id,
                            error: String::new(),
                        })
                        .await;
                        let sender = end.sender();
                        let tx = self.tx.clone();
                        let events = events.clone();
                        let forwarder = tokio::spawn(async move {
                            forward_to_frontend(end, id, tx).await;
                            let _ = events.send(GrpcEvent::Closed { id });
                        });
                        self.conns.insert(id, FrontendConn { sender, forwarder });
                    }
                    Err(e) => {
                        self.send(Frame::DialResponse {
                            random,
                            connect_id: 0,
                            error: e.to_string(),
                        })
                        .await;
                    }
                }
            }
            GrpcEvent::Closed { id } => {
                self.conns.remove(&id);
            }
        }
    }

    pub(super) async fn close_all(&mut self) {
        for (_, t) in self.dials.drain() {
            t.abort();
        }
        for (_, c) in self.conns.drain() {
            c.forwarder.abort();
            c.sender.close_now();
        }
    }
}

/// Forwards one connection's bytes from the agent to a gRPC frontend stream, returning
/// credit to the agent as the frontend's HTTP/2 stream accepts them.
pub(super) async fn forward_to_frontend(mut end: ConnEnd, id: i64, tx: mpsc::Sender<Packet>) {
    while let Some(msg) = end.recv().await {
        match msg {
            conn::Inbound::Data(data) => {
                let len = data.len();
                let packet = Frame::Data {
                    connect_id: id,
                    data,
                    error: String::new(),
                };
                if tx.send(packet.into()).await.is_err() {
                    return;
                }
                end.consumed(len);
            }
            conn::Inbound::Close => {
                let _ = tx
                    .send(
                        Frame::CloseResponse {
                            connect_id: id,
                            error: String::new(),
                        }
                        .into(),
                    )
                    .await;
                return;
            }
        }
    }
}
