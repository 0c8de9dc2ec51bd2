//! The agent link: `AgentService.Connect` over mTLS, one session per agent, its packets
//! read and written by [`crate::grpc`].

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncWrite};
use tonic::Status;

use super::registry::{Session, Shared};
use super::service::{Method, check_call, header_str};
use crate::conn::{ConnTable, Flow};
use crate::grpc;
use crate::link::Link;
use crate::proto::{self, Frame, Identifiers};

/// An agent's TLS connection, with the identity tonic hands to the service.
pub(super) struct AgentIo {
    pub(super) tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    pub(super) cn: Option<String>,
}

/// The verified identity of an agent connection.
#[derive(Debug, Clone)]
pub(super) struct AgentPeer {
    pub(super) cn: Option<String>,
}

impl tonic::transport::server::Connected for AgentIo {
    type ConnectInfo = AgentPeer;
    fn connect_info(&self) -> AgentPeer {
        AgentPeer {
            cn: self.cn.clone(),
        }
    }
}

impl AsyncRead for AgentIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for AgentIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

/// `AgentService` as a plain HTTP service: the link frames gRPC itself ([`crate::grpc`]) so
/// DATA payloads are not copied by a codec.
#[derive(Clone)]
pub(super) struct AgentEndpoint {
    pub(super) shared: Arc<Shared>,
}

/// The one method of `AgentService`.
pub(super) const AGENT_CONNECT_PATH: &str = "/AgentService/Connect";

impl Method for AgentEndpoint {
    const SERVICE: &'static str = "AgentService";

    fn answer(
        &self,
        request: http::Request<tonic::body::Body>,
    ) -> Result<http::Response<tonic::body::Body>, Status> {
        self.connect(request)
    }
}

impl AgentEndpoint {
    pub(super) fn connect(
        &self,
        request: http::Request<tonic::body::Body>,
    ) -> Result<http::Response<tonic::body::Body>, Status> {
        check_call(&request, AGENT_CONNECT_PATH)?;
        let md = request.headers();
        let id = header_str(md, proto::AGENT_ID)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Status::invalid_argument("missing agentID metadata"))?
            .to_string();
        let identifiers = match header_str(md, proto::AGENT_IDENTIFIERS) {
            Some(q) => Identifiers::parse(q)
                .map_err(|e| Status::invalid_argument(format!("agentIdentifiers: {e}")))?,
            None => Identifiers::default(),
        };
        let peer_window = header_str(md, proto::FLOW_WINDOW).and_then(|w| w.parse().ok());
        let flow = Flow::negotiated(self.shared.config.flow_window, peer_window);
        let cn = request
            .extensions()
            .get::<AgentPeer>()
            .and_then(|p| p.cn.clone());
        let (link, outbound) = Link::new();
        let session = Arc::new(Session {
            serial: self.shared.serial.fetch_add(1, Ordering::Relaxed),
            id: id.clone(),
            identifiers,
            link,
            flow,
            draining: AtomicBool::new(false),
            conns: ConnTable::new(self.shared.open.clone()),
            dials: Mutex::default(),
            ended: tokio_util::sync::CancellationToken::new(),
        });
        tracing::info!(agent = %id, ?cn, flow_control = flow.peer.is_some(), "agent connected");
        self.shared.register(session.clone());
        let mut inbound = grpc::PacketReader::new(request.into_body());
        let shared = self.shared.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = inbound.next() => next,
                    _ = session.ended.cancelled() => break,
                };
                match next {
                    Ok(Some(packet)) => match Frame::try_from(packet) {
                        Ok(frame) => {
                            if let Some(backlog) = shared.on_agent_frame(&session, frame) {
                                tokio::select! {
                                    _ = backlog.drained() => {}
                                    _ = session.ended.cancelled() => break,
                                }
                            }
                        }
                        Err(e) => {
                            tracing::warn!(agent = %session.id, error = %e, "malformed packet from agent; ignored")
                        }
                    },
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(agent = %session.id, error = %e, "agent stream failed");
                        break;
                    }
                }
            }
            tracing::info!(agent = %session.id, "agent disconnected");
            shared.unregister(&session);
        });
        let mut response = grpc::response(outbound);
        let md = response.headers_mut();
        if let Ok(v) = http::HeaderValue::from_str(&self.shared.config.server_id) {
            md.insert(proto::SERVER_ID, v);
        }
        md.insert(proto::SERVER_COUNT, self.shared.config.server_count.into());
        if let Some(window) = flow.own {
            md.insert(proto::FLOW_WINDOW, window.initial.into());
        }
        Ok(response)
    }
}
