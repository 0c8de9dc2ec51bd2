//! A TCP fault proxy: one-way latency per direction, link cuts, byte counters.
//!
//! Put it between a client and a server (or between etcd members) to emulate a WAN link or a
//! zone loss. Latency is applied per chunk from the moment it was read, so a link keeps its
//! throughput while every byte arrives `latency` later (like a long pipe, not a slow one).
//! Each direction runs in its own task, so bulk traffic both ways cannot deadlock.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// Binding the listen socket failed.
    #[error("cannot bind the proxy listener")]
    Bind(#[source] std::io::Error),
}

/// The state of the emulated link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkState {
    /// Traffic flows (with the configured latency).
    Up,
    /// A silent partition: nothing is delivered, connections hang, new ones are accepted but
    /// not forwarded until the link comes back. Buffered data is delivered on restore.
    Blackhole,
    /// A hard failure: open connections are reset (RST) and new ones are reset on accept.
    Reset,
}

/// Direction of traffic through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client → upstream.
    Up,
    /// Upstream → client.
    Down,
}

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    latency_up_us: AtomicU64,
    latency_down_us: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    accepted: AtomicU64,
    state: watch::Sender<LinkState>,
}

/// A running proxy; stops (and resets its connections) when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

/// Chunks buffered per direction before the proxy stops reading (TCP backpressure then holds
/// the sender).
const MAX_QUEUED: usize = 256;
const CHUNK: usize = 64 * 1024;

impl FaultProxy {
    /// Starts a proxy on a free loopback port forwarding to `upstream`. Must be called within
    /// a tokio runtime.
    pub async fn start(upstream: SocketAddr) -> Result<Self, ProxyError> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), upstream).await
    }

    /// Starts a proxy listening on `listen`.
    pub async fn start_on(listen: SocketAddr, upstream: SocketAddr) -> Result<Self, ProxyError> {
        let listener = TcpListener::bind(listen).await.map_err(ProxyError::Bind)?;
        let addr = listener.local_addr().map_err(ProxyError::Bind)?;
        let (state, _) = watch::channel(LinkState::Up);
        let shared = Arc::new(Shared {
            upstream,
            latency_up_us: AtomicU64::new(0),
            latency_down_us: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            state,
        });
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                s.accepted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(connection(client, s.clone()));
            }
        });
        Ok(Self {
            addr,
            shared,
            accept,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address traffic is forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// Sets the one-way latency of each direction (applies to data read from now on).
    pub fn set_latency(&self, up: Duration, down: Duration) {
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.shared.latency_up_us.store(us(up), Ordering::Relaxed);
        self.shared
            .latency_down_us
            .store(us(down), Ordering::Relaxed);
    }

    /// Sets the same one-way latency in both directions (round trip = 2 × `one_way`).
    pub fn set_symmetric_latency(&self, one_way: Duration) {
        self.set_latency(one_way, one_way);
    }

    /// Changes the link state.
    pub fn set_state(&self, state: LinkState) {
        self.shared.state.send_replace(state);
    }

    /// Cuts the link silently ([`LinkState::Blackhole`]).
    pub fn blackhole(&self) {
        self.set_state(LinkState::Blackhole);
    }

    /// Cuts the link hard ([`LinkState::Reset`]).
    pub fn reset(&self) {
        self.set_state(LinkState::Reset);
    }

    /// Restores the link ([`LinkState::Up`]).
    pub fn restore(&self) {
        self.set_state(LinkState::Up);
    }

    /// The current link state.
    pub fn state(&self) -> LinkState {
        *self.shared.state.borrow()
    }

    /// Bytes delivered in a direction so far.
    pub fn bytes(&self, dir: Direction) -> u64 {
        match dir {
            Direction::Up => self.shared.bytes_up.load(Ordering::Relaxed),
            Direction::Down => self.shared.bytes_down.load(Ordering::Relaxed),
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.shared.state.send_replace(LinkState::Reset);
    }
}

async fn connection(client: TcpStream, shared: Arc<Shared>) {
    let mut state = shared.state.subscribe();
    // A partitioned link swallows the handshake: wait for it to come back before dialing.
    loop {
        let s = *state.borrow_and_update();
        match s {
            LinkState::Up => break,
            LinkState::Reset => return abort(&client),
            LinkState::Blackhole => {
                if state.changed().await.is_err() {
                    return abort(&client);
                }
            }
        }
    }
    let Ok(server) = TcpStream::connect(shared.upstream).await else {
        return abort(&client);
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::spawn(pump(cr, sw, shared.clone(), Direction::Up));
    tokio::spawn(pump(sr, cw, shared, Direction::Down));
}

/// Sleeps until `due`, or not at all when it has passed (or is `None`).
async fn wait_until(due: Option<Instant>) {
    if let Some(due) = due.filter(|d| *d > Instant::now()) {
        tokio::time::sleep_until(due).await;
    }
}

fn abort(stream: &TcpStream) {
    // SO_LINGER 0 makes the close an RST instead of a FIN.
    let _ = stream.set_zero_linger();
}

enum Item {
    Data(Vec<u8>),
    Eof,
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: Arc<Shared>,
    dir: Direction,
) {
    let mut state = shared.state.subscribe();
    let (latency, counter) = match dir {
        Direction::Up => (&shared.latency_up_us, &shared.bytes_up),
        Direction::Down => (&shared.latency_down_us, &shared.bytes_down),
    };
    let mut queue: VecDeque<(Instant, Item)> = VecDeque::new();
    let mut buf = vec![0u8; CHUNK];
    let mut eof = false;
    loop {
        let link = *state.borrow_and_update();
        if link == LinkState::Reset {
            break;
        }
        let due = queue.front().map(|(t, _)| *t);
        let deliver = link == LinkState::Up && due.is_some();
        tokio::select! {
            r = from.read(&mut buf), if !eof && queue.len() < MAX_QUEUED => {
                let delay = Duration::from_micros(latency.load(Ordering::Relaxed));
                match r {
                    Ok(0) => { eof = true; queue.push_back((Instant::now() + delay, Item::Eof)); }
                    Ok(n) => queue.push_back((Instant::now() + delay, Item::Data(buf[..n].to_vec()))),
                    Err(_) => break,
                }
            }
            // A chunk already due goes at once: tokio's timer rounds a deadline up to its next
            // millisecond, which would add up to 1 ms each way to a link with no latency set.
            _ = wait_until(due), if deliver => {
                match queue.pop_front() {
                    Some((_, Item::Data(d))) => {
                        if to.write_all(&d).await.is_err() { break; }
                        counter.fetch_add(d.len() as u64, Ordering::Relaxed);
                    }
                    Some((_, Item::Eof)) => {
                        let _ = to.shutdown().await;
                        return;
                    }
                    None => {}
                }
            }
            changed = state.changed() => {
                if changed.is_err() { break; }
            }
        }
    }
    // Reset: drop both halves with SO_LINGER 0 so both peers see a connection reset.
    abort(from.as_ref());
    abort(to.as_ref());
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        crate::ports::echo_server().await.unwrap()
    }

    async fn round_trip(addr: SocketAddr) -> Duration {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let start = std::time::Instant::now();
        s.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ping");
        start.elapsed()
    }

    #[tokio::test]
    async fn adds_at_least_the_configured_latency() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        proxy.set_latency(Duration::from_millis(20), Duration::from_millis(10));
        let rtt = round_trip(proxy.addr()).await;
        assert!(rtt >= Duration::from_millis(30), "rtt {rtt:?}");
        assert_eq!(proxy.bytes(Direction::Up), 4);
        assert_eq!(proxy.bytes(Direction::Down), 4);
    }

    #[tokio::test]
    async fn blackhole_hangs_and_restore_delivers() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        proxy.blackhole();
        s.write_all(b"held").await.unwrap();
        let mut b = [0u8; 4];
        let r = tokio::time::timeout(Duration::from_millis(200), s.read_exact(&mut b)).await;
        assert!(r.is_err(), "nothing may arrive through a blackhole");
        proxy.restore();
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&b, b"held");
    }

    #[tokio::test]
    async fn reset_kills_open_and_new_connections() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        round_trip(proxy.addr()).await;
        proxy.reset();
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .unwrap();
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), fresh.read(&mut b))
            .await
            .unwrap();
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        proxy.restore();
        round_trip(proxy.addr()).await;
    }

    #[tokio::test]
    async fn bulk_both_ways_does_not_deadlock() {
        let proxy = FaultProxy::start(echo_server().await).await.unwrap();
        proxy.set_symmetric_latency(Duration::from_millis(1));
        let s = TcpStream::connect(proxy.addr()).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let total = 8 * 1024 * 1024;
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 64 * 1024];
            for _ in 0..total / chunk.len() {
                w.write_all(&chunk).await.unwrap();
            }
            w.shutdown().await.unwrap();
        });
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(20), r.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        writer.await.unwrap();
        assert_eq!(got, total);
    }
}
