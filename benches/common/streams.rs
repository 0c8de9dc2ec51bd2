//! Byte-stream workloads the tunnel benchmarks share: loopback backends (a source, an echo),
//! draining, 64 B round trips, and their statistics.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend that writes `total` bytes to each connection, then closes it.
pub async fn source(total: usize) -> SocketAddr {
    serve(move |mut s| async move { write_total(&mut s, total).await }).await
}

/// A loopback TCP server running `f` on each connection.
pub async fn serve<F, Fut>(f: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(f(s));
        }
    });
    addr
}

pub async fn write_total<S: AsyncWrite + Unpin>(s: &mut S, total: usize) {
    let chunk = vec![0x5a; 64 << 10];
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk.len());
        if s.write_all(&chunk[..n]).await.is_err() {
            return;
        }
        left -= n;
    }
    let _ = s.shutdown().await;
}

pub async fn drain<S: AsyncRead + Unpin>(mut s: S) -> usize {
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0;
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got += n,
        }
    }
}

pub async fn echo_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            s.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

pub async fn round_trips<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, n: usize) -> Vec<Duration> {
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&msg).await.unwrap();
        s.read_exact(&mut back).await.unwrap();
        out.push(t.elapsed());
    }
    out
}

pub fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p) as usize]
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// A backend that reads `total` bytes from each connection, then answers one byte.
pub async fn sink(total: usize) -> SocketAddr {
    serve(move |mut s| async move { read_total(&mut s, total).await }).await
}

pub async fn read_total<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, total: usize) {
    let mut buf = vec![0u8; 256 << 10];
    let mut left = total;
    while left > 0 {
        match s.read(&mut buf[..left.min(256 << 10)]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => left -= n,
        }
    }
    let _ = s.write_all(b"!").await;
    let _ = s.flush().await;
}

/// Writes `total` bytes to `s` and waits for the sink's answer; the bytes written.
pub async fn upload<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, total: usize) -> usize {
    let chunk = vec![0xa5; 256 << 10];
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n]).await.unwrap();
        left -= n;
    }
    s.flush().await.unwrap();
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).await.unwrap();
    total
}
