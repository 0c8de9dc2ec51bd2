//! The tenant's Service, played by a local TCP front: it listens on the address the tenant's
//! kubeconfigs name and forwards each connection to one of the replicas that are ready,
//! round-robin, trying the next when one refuses. TLS passes through untouched, so clients
//! verify the api-server's own certificate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// How long one replica may take to accept before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A listening front; dropping it closes the listener and every forwarded connection.
#[derive(Debug)]
pub struct Front {
    addr: SocketAddr,
    backends: Backends,
    task: tokio::task::JoinHandle<()>,
}

/// The replicas a [`Front`] forwards to, changeable from another task than the front's owner
/// (one watching a booting replica adds it the moment it is ready).
#[derive(Debug, Clone)]
pub struct Backends(watch::Sender<Vec<SocketAddr>>);

impl Backends {
    /// Sets the replicas new connections go to (connections already forwarded stay).
    pub fn set(&self, backends: Vec<SocketAddr>) {
        self.0.send_if_modified(|b| {
            let changed = *b != backends;
            *b = backends;
            changed
        });
    }

    /// Adds one replica, if it is not among them yet.
    pub fn add(&self, backend: SocketAddr) {
        self.0.send_if_modified(|b| {
            let new = !b.contains(&backend);
            if new {
                b.push(backend);
            }
            new
        });
    }

    /// The replicas it forwards to now.
    pub fn get(&self) -> Vec<SocketAddr> {
        self.0.borrow().clone()
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Front {
    /// Listens on `addr` with no backends yet (connections are closed until there are).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (backends, rx) = watch::channel(Vec::new());
        let task = tokio::spawn(serve(listener, rx));
        Ok(Self {
            addr,
            backends: Backends(backends),
            task,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The replicas new connections go to (connections already forwarded stay).
    pub fn set_backends(&self, backends: Vec<SocketAddr>) {
        self.backends.set(backends);
    }

    /// The replicas it forwards to now.
    pub fn backends(&self) -> Vec<SocketAddr> {
        self.backends.get()
    }

    /// A handle on its replicas for another task.
    pub fn backends_handle(&self) -> Backends {
        self.backends.clone()
    }
}

async fn serve(listener: TcpListener, backends: watch::Receiver<Vec<SocketAddr>>) {
    let next = Arc::new(AtomicUsize::new(0));
    // Owned here so that aborting the front ends every connection with it.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else {
                    // Out of descriptors and the like: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let targets = backends.borrow().clone();
                let start = next.fetch_add(1, Ordering::Relaxed);
                connections.spawn(forward(client, targets, start));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn forward(mut client: TcpStream, targets: Vec<SocketAddr>, start: usize) {
    let _ = client.set_nodelay(true);
    for i in 0..targets.len() {
        let target = targets[(start + i) % targets.len()];
        let Ok(Ok(mut upstream)) =
            tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await
        else {
            continue;
        };
        let _ = upstream.set_nodelay(true);
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn echo(tag: u8) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 1];
                    if s.read_exact(&mut b).await.is_ok() {
                        let _ = s.write_all(&[tag, b[0]]).await;
                    }
                });
            }
        });
        (addr, task)
    }

    async fn ask(addr: SocketAddr) -> Option<u8> {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"x").await.ok()?;
        let mut b = [0u8; 2];
        s.read_exact(&mut b).await.ok()?;
        Some(b[0])
    }

    #[tokio::test]
    async fn spreads_over_backends_and_skips_a_dead_one() {
        let (a, _ta) = echo(1).await;
        let (b, tb) = echo(2).await;
        let front = Front::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("front");
        assert_eq!(ask(front.addr()).await, None, "no backends: closed");
        front.set_backends(vec![a, b]);
        let mut seen = [0; 3];
        for _ in 0..4 {
            seen[usize::from(ask(front.addr()).await.expect("answer"))] += 1;
        }
        assert_eq!((seen[1], seen[2]), (2, 2));
        tb.abort();
        tokio::time::sleep(Duration::from_millis(50)).await;
        for _ in 0..3 {
            assert_eq!(ask(front.addr()).await, Some(1));
        }
        let addr = front.addr();
        drop(front);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
    }
}
