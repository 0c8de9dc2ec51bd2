//! One tunneled connection: its slot in a link's connection table, per-connection flow
//! control, and the pump that moves bytes between a local socket and the link.
//!
//! Flow control (a kmetal extension, negotiated with the [`FLOW_WINDOW`](crate::proto::FLOW_WINDOW)
//! metadata key): a sender may have at most the peer's window of unconsumed bytes in flight
//! per connection; the receiver returns credit once bytes are written to the local socket.
//! The packet reader of a link therefore never waits for a slow consumer, and a slow stream
//! stalls only itself. With a peer that does not negotiate (a real Konnectivity piece), the
//! receive buffer is capped instead and a connection that overruns it is closed with an
//! error, rather than blocking every other connection on the link as Konnectivity does.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};

use crate::link::Link;
use crate::pool::Chunk;
use crate::proto::{Frame, MAX_CHUNK};

/// The receive buffer per connection when the peer does not do flow control.
pub(crate) const LEGACY_BUFFER: usize = 16 << 20;

/// What the pump's local side receives from the link.
#[derive(Debug)]
pub(crate) enum Inbound {
    Data(Bytes),
    Close,
}

/// Which end of the tunnel runs the pump: the end that dialed (server) or the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Dialer,
    Agent,
}

/// The link-side handle of a connection, kept in the link's table.
#[derive(Debug)]
pub(crate) struct Slot {
    tx: mpsc::UnboundedSender<Inbound>,
    buffered: Arc<AtomicUsize>,
    limit: usize,
    credit: Option<Arc<Semaphore>>,
}

/// A connection's data arrived beyond its receive buffer.
#[derive(Debug)]
pub(crate) struct Overrun;

impl Slot {
    /// Queues bytes for the local socket; `Err` when the peer overran the window.
    pub(crate) fn deliver(&self, data: Bytes) -> Result<(), Overrun> {
        let len = data.len();
        if self.buffered.fetch_add(len, Ordering::AcqRel) + len > self.limit {
            return Err(Overrun);
        }
        self.tx.send(Inbound::Data(data)).map_err(|_| Overrun)
    }

    /// Ends the connection after the bytes already queued.
    pub(crate) fn close(&self) {
        let _ = self.tx.send(Inbound::Close);
        if let Some(c) = &self.credit {
            c.close();
        }
    }

    /// The peer consumed `bytes`: that much more may be sent.
    pub(crate) fn grant(&self, bytes: i64) {
        if let (Some(c), Ok(n)) = (&self.credit, usize::try_from(bytes)) {
            c.add_permits(n.min(Semaphore::MAX_PERMITS - c.available_permits()));
        }
    }
}

/// Flow-control settings of one link.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Flow {
    /// The window we advertised (our receive buffer per connection), if negotiated.
    pub own: Option<u32>,
    /// The window the peer advertised (our send credit per connection), if negotiated.
    pub peer: Option<u32>,
}

impl Flow {
    pub(crate) fn negotiated(own: u32, peer: Option<u32>) -> Flow {
        match peer {
            Some(p) if p > 0 => Flow {
                own: Some(own),
                peer: Some(p),
            },
            _ => Flow {
                own: None,
                peer: None,
            },
        }
    }
}

/// The local-side handle of a connection, consumed by [`pump`].
#[derive(Debug)]
pub(crate) struct ConnEnd {
    pub connect_id: i64,
    link: Link,
    rx: mpsc::UnboundedReceiver<Inbound>,
    buffered: Arc<AtomicUsize>,
    credit: Option<Arc<Semaphore>>,
    send_windows: bool,
    table: Arc<ConnTable>,
}

impl ConnEnd {
    /// The send credit toward the peer (`None` without flow control).
    pub(crate) fn credit(&self) -> Option<Arc<Semaphore>> {
        self.credit.clone()
    }

    /// The next message for the local side.
    pub(crate) async fn recv(&mut self) -> Option<Inbound> {
        self.rx.recv().await
    }

    /// `len` bytes were handed to the local side: return the credit to the peer.
    pub(crate) fn consumed(&self, len: usize) {
        self.buffered.fetch_sub(len, Ordering::AcqRel);
        if self.send_windows {
            self.link.control(Frame::Window {
                connect_id: self.connect_id,
                bytes: len as i64,
            });
        }
    }
}

impl Drop for ConnEnd {
    fn drop(&mut self) {
        self.table.remove(self.connect_id);
    }
}

/// The connections of one link, by connect id.
#[derive(Debug, Default)]
pub(crate) struct ConnTable {
    conns: Mutex<HashMap<i64, Slot>>,
    /// Connections open across every table that shares this counter.
    open: Arc<AtomicUsize>,
}

impl ConnTable {
    pub(crate) fn new(open: Arc<AtomicUsize>) -> Arc<ConnTable> {
        Arc::new(ConnTable {
            conns: Mutex::default(),
            open,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i64, Slot>> {
        // A poisoned table only means another task panicked mid-insert; the map is intact.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers connection `connect_id` and returns the end its pump consumes.
    pub(crate) fn open(self: &Arc<Self>, connect_id: i64, link: Link, flow: Flow) -> ConnEnd {
        let (tx, rx) = mpsc::unbounded_channel();
        let buffered = Arc::new(AtomicUsize::new(0));
        let credit = flow.peer.map(|w| Arc::new(Semaphore::new(w as usize)));
        let slot = Slot {
            tx,
            buffered: buffered.clone(),
            limit: flow.own.map_or(LEGACY_BUFFER, |w| w as usize),
            credit: credit.clone(),
        };
        if let Some(old) = self.lock().insert(connect_id, slot) {
            old.close();
        } else {
            self.open.fetch_add(1, Ordering::Relaxed);
        }
        ConnEnd {
            connect_id,
            link,
            rx,
            buffered,
            credit,
            send_windows: flow.own.is_some(),
            table: self.clone(),
        }
    }

    /// Runs `f` on connection `connect_id`'s slot; false if there is no such connection.
    pub(crate) fn with<R>(&self, connect_id: i64, f: impl FnOnce(&Slot) -> R) -> Option<R> {
        self.lock().get(&connect_id).map(f)
    }

    /// Removes a connection (its pump ended or the peer overran it).
    pub(crate) fn remove(&self, connect_id: i64) -> Option<()> {
        let slot = self.lock().remove(&connect_id)?;
        slot.close();
        self.open.fetch_sub(1, Ordering::Relaxed);
        Some(())
    }

    /// Closes every connection (the link is gone).
    pub(crate) fn close_all(&self) {
        let slots: Vec<Slot> = self.lock().drain().map(|(_, s)| s).collect();
        self.open.fetch_sub(slots.len(), Ordering::Relaxed);
        for s in slots {
            s.close();
        }
    }

    /// How many connections the table holds.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Why a pump's direction ended.
pub(crate) enum Ended {
    LocalEof,
    LocalError,
    RemoteClose,
    LinkGone,
}

/// Sends `data` of connection `connect_id` once the peer's window has room for it (at
/// once without flow control).
pub(crate) async fn send_data(
    link: &Link,
    credit: Option<&Semaphore>,
    connect_id: i64,
    data: Bytes,
) -> Result<(), Ended> {
    if let Some(c) = credit {
        let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
        match c.acquire_many(n).await {
            Ok(p) => p.forget(),
            Err(_) => return Err(Ended::RemoteClose),
        }
    }
    let frame = Frame::Data {
        connect_id,
        data,
        error: String::new(),
    };
    if link.data(frame).await {
        Ok(())
    } else {
        Err(Ended::LinkGone)
    }
}

/// How long a bulk read may wait holding a pooled chunk before the connection counts as idle.
const BULK_IDLE: Duration = Duration::from_secs(1);

/// How long a dialer keeps delivering the peer's bytes after its local side stopped
/// sending (a half-closed client still reads the response).
const HALF_CLOSE_GRACE: Duration = Duration::from_secs(30);

/// Moves bytes between `io` and the link until either side closes; `first` is sent before
/// anything read from `io` (bytes a CONNECT client sent right after its request head).
pub(crate) async fn pump<S>(io: S, first: Bytes, mut end: ConnEnd, role: Role)
where
    S: AsyncRead + AsyncWrite + Send,
{
    let connect_id = end.connect_id;
    let send_windows = end.send_windows;
    let link = &end.link;
    let rx = &mut end.rx;
    let buffered = &end.buffered;
    let credit = &end.credit;
    let (mut rd, mut wr) = tokio::io::split(io);
    let up = async {
        let send = |data: Bytes| send_data(link, credit.as_deref(), connect_id, data);
        if !first.is_empty() {
            if let Err(e) = send(first.clone()).await {
                return e;
            }
        }
        // Start small (an idle connection holds only this) and double while reads fill the
        // buffer, up to one chunk, so bulk transfers move in large packets; at that size
        // the buffers come from the pool.
        let mut want = 2 << 10;
        let mut buf = BytesMut::new();
        loop {
            let read = if want >= MAX_CHUNK {
                // A connection idling after a bulk transfer gives its chunk back to the pool
                // and waits with a small buffer instead (a read is cancel-safe).
                if buf.capacity() > 0 {
                    // The small buffer's spare capacity would keep its allocation alive.
                    buf = BytesMut::new();
                }
                let mut chunk = Chunk::take();
                match tokio::time::timeout(BULK_IDLE, rd.read(chunk.space())).await {
                    Ok(Ok(n)) => Ok((n, chunk.freeze(n))),
                    Ok(Err(e)) => Err(e),
                    Err(_) => {
                        want = 2 << 10;
                        continue;
                    }
                }
            } else {
                buf.reserve(want);
                match rd.read_buf(&mut buf).await {
                    Ok(n) => Ok((n, buf.split().freeze())),
                    Err(e) => Err(e),
                }
            };
            match read {
                Ok((0, _)) => return Ended::LocalEof,
                Ok((n, data)) => {
                    if n >= want {
                        want = (want * 2).min(MAX_CHUNK);
                    } else if n < want / 8 {
                        want = (want / 2).max(2 << 10);
                    }
                    if let Err(e) = send(data).await {
                        return e;
                    }
                }
                Err(_) => return Ended::LocalError,
            }
        }
    };
    let down = async {
        while let Some(msg) = rx.recv().await {
            match msg {
                Inbound::Data(b) => {
                    let len = b.len();
                    if wr.write_all(&b).await.is_err() {
                        return Ended::LocalError;
                    }
                    buffered.fetch_sub(len, Ordering::AcqRel);
                    if send_windows
                        && !link.control(Frame::Window {
                            connect_id,
                            bytes: len as i64,
                        })
                    {
                        return Ended::LinkGone;
                    }
                }
                Inbound::Close => {
                    let _ = wr.shutdown().await;
                    return Ended::RemoteClose;
                }
            }
        }
        Ended::LinkGone
    };
    let mut up = pin!(up);
    let mut down = pin!(down);
    let (ended, down_done) = tokio::select! {
        u = &mut up => (u, false),
        d = &mut down => (d, true),
    };
    let close = match role {
        Role::Dialer => Frame::CloseRequest { connect_id },
        Role::Agent => Frame::CloseResponse {
            connect_id,
            error: String::new(),
        },
    };
    match ended {
        Ended::LinkGone => {}
        Ended::RemoteClose => {
            if role == Role::Agent {
                link.control(close);
            }
        }
        Ended::LocalEof if role == Role::Dialer && !down_done => {
            link.data(close).await;
            let _ = tokio::time::timeout(HALF_CLOSE_GRACE, down).await;
        }
        Ended::LocalEof | Ended::LocalError => {
            link.data(close).await;
        }
    }
}
