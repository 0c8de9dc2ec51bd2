//! A kept-alive HTTP/1.1 connection (hyper's client connection over the [`Client`]'s TCP or
//! TLS stream): one handshake for many requests, and streamed bodies read line by line.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use http_body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use super::{Client, HttpError, Response};

/// A kept-alive connection to the [`Client`]'s server; requests go one at a time.
#[derive(Debug)]
pub struct Session {
    send: http1::SendRequest<String>,
    addr: SocketAddr,
    timeout: Duration,
    connection: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl Client {
    /// Opens a kept-alive connection (each request still bounded by the client's timeout).
    pub async fn session(&self) -> Result<Session, HttpError> {
        let (addr, timeout) = (self.addr, self.timeout);
        let stream = tokio::time::timeout(timeout, self.connect())
            .await
            .map_err(|_| HttpError::Timeout { addr, timeout })??;
        let (send, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| HttpError::Exchange { addr, source })?;
        let connection = tokio::spawn(async move {
            // Its end is seen by the next request on the session, as an error.
            let _ = connection.await;
        });
        Ok(Session {
            send,
            addr,
            timeout,
            connection,
        })
    }
}

impl Session {
    async fn send(
        &mut self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<hyper::Response<Incoming>, HttpError> {
        let addr = self.addr;
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, addr.to_string())
            .header(http::header::ACCEPT, "application/json");
        if body.is_some() {
            request = request.header(http::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(body.unwrap_or_default())
            .map_err(|source| HttpError::Request { source })?;
        let exchange = |source| HttpError::Exchange { addr, source };
        self.send.ready().await.map_err(exchange)?;
        self.send.send_request(request).await.map_err(exchange)
    }

    /// One request on the connection; `body` is sent as `application/json`.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<Response, HttpError> {
        let (addr, timeout) = (self.addr, self.timeout);
        let work = async {
            let response = self.send(method, path, body).await?;
            let status = response.status().as_u16();
            let mut body = response.into_body();
            let mut all = Vec::new();
            while let Some(data) = next_data(&mut body, addr).await? {
                all.extend_from_slice(&data);
            }
            Ok(Response { status, body: all })
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| HttpError::Timeout { addr, timeout })?
    }

    /// `GET path` whose body is read as it comes (a watch), with no deadline past the
    /// response's head: the caller bounds the reading.
    pub async fn stream(mut self, path: &str) -> Result<Lines, HttpError> {
        let (addr, timeout) = (self.addr, self.timeout);
        let response = tokio::time::timeout(timeout, self.send("GET", path, None))
            .await
            .map_err(|_| HttpError::Timeout { addr, timeout })??;
        Ok(Lines {
            status: response.status().as_u16(),
            body: response.into_body(),
            buf: Vec::new(),
            done: false,
            session: self,
        })
    }
}

/// The next data frame of `body`, skipping trailers; `None` at its end.
async fn next_data(
    body: &mut Incoming,
    addr: SocketAddr,
) -> Result<Option<bytes::Bytes>, HttpError> {
    loop {
        match std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await {
            None => return Ok(None),
            Some(Err(source)) => return Err(HttpError::Exchange { addr, source }),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    return Ok(Some(data));
                }
            }
        }
    }
}

/// A streamed response body, read one line at a time (a watch's JSON events).
#[derive(Debug)]
pub struct Lines {
    status: u16,
    body: Incoming,
    buf: Vec<u8>,
    done: bool,
    session: Session,
}

impl Lines {
    /// The response's status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The next line without its `\n`; `None` once the body has ended.
    pub async fn next_line(&mut self) -> Result<Option<String>, HttpError> {
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                return Ok(Some(String::from_utf8_lossy(&line[..end]).into_owned()));
            }
            if self.done {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                let rest = std::mem::take(&mut self.buf);
                return Ok(Some(String::from_utf8_lossy(&rest).into_owned()));
            }
            match next_data(&mut self.body, self.session.addr).await? {
                Some(data) => self.buf.extend_from_slice(&data),
                None => self.done = true,
            }
        }
    }
}
