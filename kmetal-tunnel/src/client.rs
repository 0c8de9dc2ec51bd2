//! A client of the gRPC `ProxyService` frontend (what kube-apiserver's konnectivity-client
//! does): one `Proxy` stream per dial over a unix socket, bridged to a local byte stream.

use std::path::{Path, PathBuf};

use bytes::BytesMut;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::proto::wire::proxy_service_client::ProxyServiceClient;
use crate::proto::{self, Frame, Packet};

/// A dial through the gRPC frontend failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Connecting to the frontend's socket failed.
    #[error("connecting to {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// The frontend refused the stream.
    #[error("opening a Proxy stream: {0}")]
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
}

/// A client of one server's gRPC frontend.
#[derive(Debug, Clone)]
pub struct ProxyClient {
    client: ProxyServiceClient<Channel>,
}

impl ProxyClient {
    /// Connects to the frontend's unix socket.
    pub async fn connect_unix(path: impl AsRef<Path>) -> Result<ProxyClient, ClientError> {
        let path = path.as_ref().to_path_buf();
        let p = path.clone();
        let channel = Endpoint::from_static("http://konnectivity.invalid")
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(8 << 20))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let p = p.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(p).await?)) }
            }))
            .await
            .map_err(|source| ClientError::Connect { path, source })?;
        Ok(ProxyClient {
            client: ProxyServiceClient::new(channel).max_decoding_message_size(proto::MAX_PACKET),
        })
    }

    /// Dials `address` through the tunnel; the returned stream carries the connection.
    pub async fn dial(&self, address: &str) -> Result<DuplexStream, ClientError> {
        let (tx, rx) = mpsc::channel::<Packet>(64);
        let random = 1;
        let _ = tx
            .send(
                Frame::DialRequest {
                    protocol: "tcp".into(),
                    address: address.into(),
                    random,
                }
                .into(),
            )
            .await;
        let mut client = self.client.clone();
        let mut inbound = client
            .proxy(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(ClientError::Stream)?
            .into_inner();
        let connect_id = loop {
            match inbound.message().await {
                Ok(Some(p)) => match Frame::try_from(p) {
                    Ok(Frame::DialResponse {
                        connect_id, error, ..
                    }) => {
                        if error.is_empty() {
                            break connect_id;
                        }
                        return Err(ClientError::Dial {
                            address: address.into(),
                            message: error,
                        });
                    }
                    _ => continue,
                },
                _ => return Err(ClientError::NoAnswer(address.into())),
            }
        };
        let (ours, theirs) = tokio::io::duplex(proto::MAX_CHUNK * 2);
        tokio::spawn(async move {
            let (mut rd, mut wr) = tokio::io::split(ours);
            let up = async {
                let mut buf = BytesMut::new();
                loop {
                    buf.reserve(proto::MAX_CHUNK);
                    match rd.read_buf(&mut buf).await {
                        Ok(n) if n > 0 => {
                            let data = buf.split().freeze();
                            let p = Frame::Data {
                                connect_id,
                                data,
                                error: String::new(),
                            };
                            if tx.send(p.into()).await.is_err() {
                                return;
                            }
                        }
                        _ => {
                            let _ = tx.send(Frame::CloseRequest { connect_id }.into()).await;
                            return;
                        }
                    }
                }
            };
            let down = async {
                while let Ok(Some(p)) = inbound.message().await {
                    match Frame::try_from(p) {
                        Ok(Frame::Data { data, .. }) if wr.write_all(&data).await.is_err() => {
                            return;
                        }
                        Ok(Frame::CloseResponse { .. }) => break,
                        _ => {}
                    }
                }
                let _ = wr.shutdown().await;
            };
            tokio::join!(up, down);
        });
        Ok(theirs)
    }
}
