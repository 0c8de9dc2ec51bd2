//! The agent link and the gRPC frontend frame gRPC by hand (`src/grpc.rs`); these tests hold
//! them to tonic's own generated AgentService and ProxyService clients and server, an
//! independent gRPC implementation: big DATA packets both ways, the stream metadata, and the
//! trailers that end a stream cleanly.

mod common;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use kmetal_tunnel::proto::wire::agent_service_client::AgentServiceClient;
use kmetal_tunnel::proto::wire::agent_service_server::{AgentService, AgentServiceServer};
use kmetal_tunnel::proto::wire::proxy_service_client::ProxyServiceClient;
use kmetal_tunnel::proto::{self, Packet};
use kmetal_tunnel::{Frame, tls};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Endpoint, Uri};
use tonic::{Request, Response, Status, Streaming};

const DEADLINE: Duration = Duration::from_secs(20);

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

async fn next(stream: &mut Streaming<Packet>) -> Frame {
    let packet = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("a packet in time")
        .expect("stream ok")
        .expect("stream open");
    Frame::try_from(packet).expect("valid packet")
}

/// Collects DATA of `connect_id` until `len` bytes arrived.
async fn collect(stream: &mut Streaming<Packet>, connect_id: i64, len: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < len {
        match next(stream).await {
            Frame::Data {
                connect_id: id,
                data,
                ..
            } if id == connect_id => got.extend_from_slice(&data),
            other => panic!("expected DATA, got {other:?}"),
        }
    }
    got
}

/// The connect id of a successful DIAL_RSP to dial `random`.
async fn dialed(stream: &mut Streaming<Packet>, random: i64) -> i64 {
    match next(stream).await {
        Frame::DialResponse {
            random: r,
            connect_id,
            error,
        } if r == random && error.is_empty() => connect_id,
        other => panic!("expected a good DIAL_RSP to {random}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tonic_agent_client_talks_to_our_server() {
    let bundle = common::bundle("interop");
    let tunnel = common::Tunnel::start(&bundle, common::server_config("s0", 1)).await;
    let addr = tunnel.agent_addr;
    let tls = tokio_rustls::TlsConnector::from(tls::agent_client(&bundle).expect("tls"));
    let channel = Endpoint::from_static("http://127.0.0.1")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let tls = tls.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let name = ServerName::try_from("127.0.0.1").expect("ip name");
                Ok::<_, std::io::Error>(TokioIo::new(tls.connect(name, tcp).await?))
            }
        }))
        .await
        .expect("channel");
    let mut client = AgentServiceClient::new(channel).max_decoding_message_size(proto::MAX_PACKET);
    let (to_server, rx) = mpsc::channel::<Packet>(16);
    let mut request = Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert(proto::AGENT_ID, "tonic-agent".parse().expect("value"));
    let response = client.connect(request).await.expect("connect");
    assert_eq!(
        response
            .metadata()
            .get(proto::SERVER_ID)
            .map(|v| v.to_str().ok()),
        Some(Some("s0"))
    );
    let mut from_server = response.into_inner();
    assert!(common::eventually(DEADLINE, || tunnel.server.stats().agents == 1).await);

    let server = tunnel.server.clone();
    let dial = tokio::spawn(async move { server.dial("10.0.0.1:80").await });
    let Frame::DialRequest { random, .. } = next(&mut from_server).await else {
        panic!("expected DIAL_REQ");
    };
    to_server
        .send(
            Frame::DialResponse {
                random,
                connect_id: 7,
                error: String::new(),
            }
            .into(),
        )
        .await
        .expect("send");
    let mut conn = dial
        .await
        .expect("join")
        .expect("dial through the tonic agent");

    // tonic's encoding of a big message, read by our decoder.
    let up = pattern(300_000, 1);
    to_server
        .send(
            Frame::Data {
                connect_id: 7,
                data: Bytes::from(up.clone()),
                error: String::new(),
            }
            .into(),
        )
        .await
        .expect("send");
    let mut got = vec![0; up.len()];
    tokio::time::timeout(DEADLINE, conn.read_exact(&mut got))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(got, up);

    // Our split encoding of big payloads, read by tonic's decoder.
    let down = pattern(600_000, 2);
    conn.write_all(&down).await.expect("write");
    assert_eq!(collect(&mut from_server, 7, down.len()).await, down);

    drop(conn);
    assert_eq!(
        next(&mut from_server).await,
        Frame::CloseRequest { connect_id: 7 }
    );

    // Shutdown ends the stream with grpc-status 0 trailers: a clean end for tonic. It does
    // not wait for the agent to end its side (this one never would: `to_server` is alive).
    tokio::time::timeout(Duration::from_secs(5), tunnel.stop())
        .await
        .expect("the agent listener stops with an agent's request side still open");
    let end = tokio::time::timeout(DEADLINE, from_server.message())
        .await
        .expect("in time");
    assert!(matches!(end, Ok(None)), "{end:?}");
}

/// kube-apiserver's side: tonic's generated ProxyService client dials through our gRPC
/// frontend, sends a big message, reads our split encoding of the echo, and closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tonic_proxy_client_talks_to_our_grpc_frontend() {
    let common::Connected {
        tunnel,
        agent: _agent,
        backend,
        ..
    } = common::connected("interop-proxy").await;
    let uds = tunnel.grpc_uds.clone();
    let channel = Endpoint::from_static("http://konnectivity")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let uds = uds.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(uds).await?)) }
        }))
        .await
        .expect("channel");
    let client = ProxyServiceClient::new(channel).max_decoding_message_size(proto::MAX_PACKET);

    // One Proxy call per dial, as konnectivity-client makes them.
    let call = |address: String, random| {
        let mut client = client.clone();
        async move {
            let (to_server, rx) = mpsc::channel::<Packet>(16);
            let dial = Frame::DialRequest {
                protocol: "tcp".into(),
                address,
                random,
            };
            to_server.send(dial.into()).await.expect("send");
            let from_server = client
                .proxy(ReceiverStream::new(rx))
                .await
                .expect("proxy")
                .into_inner();
            (to_server, from_server)
        }
    };

    // A dial that cannot succeed is answered with an error, not a hang.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let (_to_server, mut from_server) = call(dead, 9).await;
    match next(&mut from_server).await {
        Frame::DialResponse {
            random: 9, error, ..
        } => assert!(!error.is_empty(), "a refused dial carries its error"),
        other => panic!("expected DIAL_RSP, got {other:?}"),
    }

    let (to_server, mut from_server) = call(backend, 5).await;
    let connect_id = dialed(&mut from_server, 5).await;
    // tonic's encoding of a big message, read by our decoder; the echo comes back in our
    // split encoding, read by tonic's decoder.
    let up = pattern(500_000, 4);
    to_server
        .send(
            Frame::Data {
                connect_id,
                data: Bytes::from(up.clone()),
                error: String::new(),
            }
            .into(),
        )
        .await
        .expect("send");
    assert_eq!(collect(&mut from_server, connect_id, up.len()).await, up);
    assert!(common::eventually(DEADLINE, || tunnel.server.stats().connections == 1).await);

    to_server
        .send(Frame::CloseRequest { connect_id }.into())
        .await
        .expect("send");
    assert_eq!(
        next(&mut from_server).await,
        Frame::CloseResponse {
            connect_id,
            error: String::new()
        }
    );
    assert!(common::eventually(DEADLINE, || tunnel.server.stats().connections == 0).await);
    tunnel.stop().await;
}

/// A tonic AgentService server that tunnels one dial to `target` and echoes nothing itself.
struct TonicServer {
    target: String,
    results: mpsc::Sender<Vec<u8>>,
}

#[tonic::async_trait]
impl AgentService for TonicServer {
    type ConnectStream = ReceiverStream<Result<Packet, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<Packet>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let agent_id = request
            .metadata()
            .get(proto::AGENT_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        assert_eq!(agent_id.as_deref(), Some("our-agent"));
        let mut from_agent = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let target = self.target.clone();
        let results = self.results.clone();
        tokio::spawn(async move {
            let send = |f: Frame| {
                let tx = tx.clone();
                async move { tx.send(Ok(f.into())).await.expect("send") }
            };
            send(Frame::DialRequest {
                protocol: "tcp".into(),
                address: target,
                random: 42,
            })
            .await;
            let connect_id = dialed(&mut from_agent, 42).await;
            let up = pattern(700_000, 3);
            // tonic's encoding of big messages, read by our agent; the backend echoes them
            // and our agent's split encoding comes back through tonic's decoder.
            for part in up.chunks(350_000) {
                send(Frame::Data {
                    connect_id,
                    data: Bytes::copy_from_slice(part),
                    error: String::new(),
                })
                .await;
            }
            let echoed = collect(&mut from_agent, connect_id, up.len()).await;
            results.send(echoed).await.expect("result");
            drop(tx);
        });
        let mut response = Response::new(ReceiverStream::new(rx));
        let md = response.metadata_mut();
        md.insert(proto::SERVER_ID, "tonic-server".parse().expect("value"));
        md.insert(proto::SERVER_COUNT, "1".parse().expect("value"));
        Ok(response)
    }
}

/// A TLS connection for tonic's server (which needs `Connected` for its IO type).
struct TlsIo(tokio_rustls::server::TlsStream<TcpStream>);

impl tonic::transport::server::Connected for TlsIo {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_agent_talks_to_a_tonic_agent_service() {
    let bundle = common::bundle("interop");
    let backend = common::echo_backend().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls::agent_listener(&bundle).expect("tls"));
    let (conns_tx, conns_rx) = mpsc::channel::<Result<TlsIo, std::io::Error>>(4);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            if let Ok(tls) = acceptor.accept(tcp).await {
                let _ = conns_tx.send(Ok(TlsIo(tls))).await;
            }
        }
    });
    let (results, mut results_rx) = mpsc::channel(1);
    let service = AgentServiceServer::from_arc(Arc::new(TonicServer {
        target: backend.to_string(),
        results,
    }))
    .max_decoding_message_size(proto::MAX_PACKET);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(ReceiverStream::new(conns_rx)),
    );
    let agent = common::agent(&bundle, vec![addr.to_string()], "our-agent");
    assert!(agent.wait_connected(1, DEADLINE).await);
    let echoed = tokio::time::timeout(DEADLINE, results_rx.recv())
        .await
        .expect("in time")
        .expect("a result");
    assert_eq!(echoed, pattern(700_000, 3));
    agent.shutdown().await;
}

/// A tonic ProxyService that takes every dial and never answers it, reporting the packets
/// the client sends.
struct SilentFrontend {
    seen: mpsc::Sender<Frame>,
}

#[tonic::async_trait]
impl kmetal_tunnel::proto::wire::proxy_service_server::ProxyService for SilentFrontend {
    type ProxyStream = ReceiverStream<Result<Packet, Status>>;

    async fn proxy(
        &self,
        request: Request<Streaming<Packet>>,
    ) -> Result<Response<Self::ProxyStream>, Status> {
        let mut from_client = request.into_inner();
        let seen = self.seen.clone();
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            while let Ok(Some(p)) = from_client.message().await {
                let _ = seen.send(Frame::try_from(p).expect("a valid packet")).await;
            }
            drop(tx);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A dial the frontend never answers ends with a typed timeout instead of hanging, and is
/// abandoned with DIAL_CLS for the same dial id, as konnectivity-client does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_nobody_answers_times_out_and_is_abandoned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("silent.sock");
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    let (seen, mut seen_rx) = mpsc::channel(8);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                kmetal_tunnel::proto::wire::proxy_service_server::ProxyServiceServer::new(
                    SilentFrontend { seen },
                ),
            )
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    let client = kmetal_tunnel::ProxyClient::connect_unix(&path)
        .await
        .expect("client")
        .with_dial_timeout(Duration::from_millis(300));
    let started = tokio::time::Instant::now();
    let err = client.dial("10.0.0.1:10250").await.expect_err("no answer");
    assert!(
        matches!(err, kmetal_tunnel::ClientError::DialTimeout { .. }),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let Some(Frame::DialRequest { random, .. }) = seen_rx.recv().await else {
        panic!("the dial request first");
    };
    let abandoned = tokio::time::timeout(DEADLINE, seen_rx.recv())
        .await
        .expect("DIAL_CLS within the deadline");
    assert_eq!(abandoned, Some(Frame::CloseDial { random }));
}

/// A tonic ProxyService that forwards a backend which speaks first: its bytes come before
/// the dial's answer, then more bytes and the close.
struct EagerFrontend;

#[tonic::async_trait]
impl kmetal_tunnel::proto::wire::proxy_service_server::ProxyService for EagerFrontend {
    type ProxyStream = ReceiverStream<Result<Packet, Status>>;

    async fn proxy(
        &self,
        request: Request<Streaming<Packet>>,
    ) -> Result<Response<Self::ProxyStream>, Status> {
        let mut from_client = request.into_inner();
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(async move {
            let Ok(Some(p)) = from_client.message().await else {
                return;
            };
            let Ok(Frame::DialRequest { random, .. }) = Frame::try_from(p) else {
                return;
            };
            let data = |connect_id, bytes: &'static [u8]| Frame::Data {
                connect_id,
                data: Bytes::from_static(bytes),
                error: String::new(),
            };
            for f in [
                data(7, b"hello, "),
                data(99, b"not ours "),
                Frame::DialResponse {
                    random,
                    connect_id: 7,
                    error: String::new(),
                },
                data(7, b"world"),
                Frame::CloseResponse {
                    connect_id: 7,
                    error: String::new(),
                },
            ] {
                let _ = tx.send(Ok(f.into())).await;
            }
            // Keep the stream open until the client is done.
            while let Ok(Some(_)) = from_client.message().await {}
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Bytes a server sends before the dial's answer (a backend that speaks first) are kept and
/// read first, in order; another connection's are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_before_the_dial_answer_are_not_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("eager.sock");
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                kmetal_tunnel::proto::wire::proxy_service_server::ProxyServiceServer::new(
                    EagerFrontend,
                ),
            )
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    let client = kmetal_tunnel::ProxyClient::connect_unix(&path)
        .await
        .expect("client");
    let mut s = client.dial("10.0.0.1:10250").await.expect("dial");
    let mut got = String::new();
    tokio::time::timeout(DEADLINE, s.read_to_string(&mut got))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(got, "hello, world");
}
