//! HTTP CONNECT, the frontend kube-apiserver's egress selector speaks over a unix socket or
//! mTLS TCP: request parsing (the fuzzed entry point) and the responses.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The largest request head accepted.
pub const MAX_HEAD: usize = 8 << 10;

/// A CONNECT request that cannot be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The request line and headers exceed [`MAX_HEAD`] bytes.
    #[error("request head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// The request head is not text.
    #[error("request head is not UTF-8")]
    NotText,
    /// The request line is not `METHOD TARGET VERSION`.
    #[error("malformed request line {0:?}")]
    RequestLine(String),
    /// A method other than CONNECT.
    #[error("method {0} not allowed: only CONNECT")]
    Method(String),
    /// A version other than HTTP/1.0 or HTTP/1.1.
    #[error("unsupported version {0}")]
    Version(String),
    /// The target is not `host:port` with a port in 1..=65535.
    #[error("target {0:?} is not host:port (port 1..=65535)")]
    Target(String),
    /// A header line without a colon.
    #[error("malformed header line {0:?}")]
    Header(String),
    /// The client closed the connection before the head was complete.
    #[error("connection closed before the request head was complete")]
    Incomplete,
    /// Reading the request failed.
    #[error("reading the request")]
    Io(#[source] std::io::Error),
}

/// A parsed CONNECT request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The host to reach (IPv6 without brackets).
    pub host: String,
    /// The port.
    pub port: u16,
    /// The target as written (`host:port`, IPv6 in brackets): what is dialed.
    pub address: String,
}

/// Parses a request head from `buf`: `Ok(None)` until the blank line has arrived, then the
/// request and the number of bytes the head used (anything after it is tunneled data).
pub fn parse_request(buf: &[u8]) -> Result<Option<(ConnectRequest, usize)>, ConnectError> {
    let Some(end) = find_head_end(buf) else {
        return if buf.len() > MAX_HEAD {
            Err(ConnectError::HeadTooLarge)
        } else {
            Ok(None)
        };
    };
    if end > MAX_HEAD {
        return Err(ConnectError::HeadTooLarge);
    }
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| ConnectError::NotText)?;
    let mut lines = head.split("\r\n").filter(|l| !l.is_empty());
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ConnectError::RequestLine(line.to_string()));
    };
    if method != "CONNECT" {
        return Err(ConnectError::Method(method.to_string()));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(ConnectError::Version(version.to_string()));
    }
    for l in lines {
        if !l.contains(':') {
            return Err(ConnectError::Header(l.to_string()));
        }
    }
    let (host, port) = split_target(target).ok_or_else(|| ConnectError::Target(target.into()))?;
    Ok(Some((
        ConnectRequest {
            host,
            port,
            address: target.to_string(),
        },
        end,
    )))
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn split_target(target: &str) -> Option<(String, u16)> {
    let (host, port) = target.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let host = if let Some(inner) = host.strip_prefix('[') {
        let inner = inner.strip_suffix(']')?;
        inner.parse::<std::net::Ipv6Addr>().ok()?;
        inner
    } else {
        host
    };
    let valid = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b));
    valid.then(|| (host.to_string(), port))
}

/// Reads a request head from `io`; returns the request and any bytes read past the head.
pub async fn read_request<R: AsyncRead + Unpin>(
    io: &mut R,
) -> Result<(ConnectRequest, Bytes), ConnectError> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if io.read_buf(&mut buf).await.map_err(ConnectError::Io)? == 0 {
            return Err(ConnectError::Incomplete);
        }
        if let Some((req, used)) = parse_request(&buf)? {
            let rest = buf.split_off(used).freeze();
            return Ok((req, rest));
        }
    }
}

/// The response that opens the tunnel.
pub const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

/// An error response with `message` as a plain-text body.
pub fn error_response(status: u16, message: &str) -> Vec<u8> {
    let reason = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{message}\n",
        message.len() + 1
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_kube_apiserver_and_curl_send() {
        let req = b"CONNECT 10.0.0.7:10250 HTTP/1.1\r\nHost: 10.0.0.7:10250\r\nUser-Agent: curl\r\n\r\nextra";
        let (r, used) = parse_request(req).unwrap().unwrap();
        assert_eq!(r.host, "10.0.0.7");
        assert_eq!(r.port, 10250);
        assert_eq!(&req[used..], b"extra");
        let (r, _) = parse_request(b"CONNECT [fd00::1]:443 HTTP/1.0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.host.as_str(), r.address.as_str()),
            ("fd00::1", "[fd00::1]:443")
        );
        assert!(
            parse_request(b"CONNECT a:1 HTTP/1.1\r\nHost: a")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn bad_requests_are_typed_errors() {
        type Check = fn(&ConnectError) -> bool;
        let cases: [(&[u8], Check); 7] = [
            (b"GET / HTTP/1.1\r\n\r\n", |e| {
                matches!(e, ConnectError::Method(_))
            }),
            (b"CONNECT a:0 HTTP/1.1\r\n\r\n", |e| {
                matches!(e, ConnectError::Target(_))
            }),
            (b"CONNECT a:70000 HTTP/1.1\r\n\r\n", |e| {
                matches!(e, ConnectError::Target(_))
            }),
            (b"CONNECT :80 HTTP/1.1\r\n\r\n", |e| {
                matches!(e, ConnectError::Target(_))
            }),
            (b"CONNECT a:80 HTTP/2\r\n\r\n", |e| {
                matches!(e, ConnectError::Version(_))
            }),
            (b"CONNECT a:80\r\n\r\n", |e| {
                matches!(e, ConnectError::RequestLine(_))
            }),
            (b"CONNECT a:80 HTTP/1.1\r\nno colon\r\n\r\n", |e| {
                matches!(e, ConnectError::Header(_))
            }),
        ];
        for (input, check) in cases {
            let err = parse_request(input).expect_err("rejected");
            assert!(
                check(&err),
                "{err:?} for {:?}",
                String::from_utf8_lossy(input)
            );
        }
        let huge = vec![b'a'; MAX_HEAD + 1];
        assert!(matches!(
            parse_request(&huge),
            Err(ConnectError::HeadTooLarge)
        ));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_heads_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse_request(&bytes);
        }

        #[test]
        fn arbitrary_connect_lines_never_panic(target in "[a-z0-9:\\[\\]. ]{0,40}") {
            let req = format!("CONNECT {target} HTTP/1.1\r\n\r\n");
            let _ = parse_request(req.as_bytes());
        }
    }
}
