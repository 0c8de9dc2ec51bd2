//! One tunneled connection: its slot in a link's connection table, per-connection flow
//! control, and the pump that moves bytes between a local socket and the link.
//!
//! Flow control (a kmetal extension, negotiated with the [`FLOW_WINDOW`](crate::proto::FLOW_WINDOW)
//! metadata key): a sender may have at most the peer's window of unconsumed bytes in flight
//! per connection; the receiver returns credit once bytes are written to the local socket.
//! The packet reader of a link therefore never waits for a slow consumer, and a slow stream
//! stalls only itself. A peer that does not negotiate (a real Konnectivity piece) cannot be
//! slowed per connection, so each connection buffers up to [`LEGACY_BUFFER`]; beyond that
//! the link's reader waits for the connection to drain ([`Backlog`]). Nothing is dropped,
//! and the link stalls only behind a connection that is that far behind, where Konnectivity
//! stalls it as soon as one frontend's small channel is full.
//!
//! Windows are tuned per connection, like TCP's receive buffer: the advertised window is
//! only the starting credit ([`INITIAL_FLOW_WINDOW`](crate::proto::INITIAL_FLOW_WINDOW)), and
//! the receiver doubles a connection's window, up to the configured maximum, each time a
//! whole window is consumed within [`GROW_WITHIN`] (it returns the extra credit with the
//! consumed bytes). A bulk stream reaches the maximum within a few windows; a stalled or
//! slow one keeps the small window, so many stalled connections hold little memory.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::time::Instant;

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

/// A connection's window doubles when a whole window is consumed within this time, that is
/// when its consumer drains at least `window / GROW_WITHIN` (2.6 MB/s at the initial window).
pub(crate) const GROW_WITHIN: Duration = Duration::from_millis(100);

/// The link-side handle of a connection, kept in the link's table.
#[derive(Debug)]
pub(crate) struct Slot {
    tx: mpsc::UnboundedSender<Inbound>,
    buffered: Arc<AtomicUsize>,
    /// The receive window: more buffered than this is an overrun (with flow control) or a
    /// backlog (without).
    limit: Arc<AtomicUsize>,
    credit: Option<Arc<Semaphore>>,
    /// Woken when the local side consumes bytes.
    drained: Arc<Notify>,
}

/// What became of bytes handed to a connection.
#[derive(Debug)]
pub(crate) enum Delivery {
    /// Queued for the local socket.
    Queued,
    /// Queued, but the connection is over its buffer and its peer does no flow control:
    /// the link's reader should wait on the backlog before reading on.
    Backlogged(Backlog),
    /// The peer overran the window it agreed to, or the local side is gone: the
    /// connection must be closed.
    Overrun,
}

/// A connection over its buffer; [`Backlog::drained`] waits until it is not.
#[derive(Debug)]
pub(crate) struct Backlog {
    buffered: Arc<AtomicUsize>,
    limit: Arc<AtomicUsize>,
    drained: Arc<Notify>,
    tx: mpsc::UnboundedSender<Inbound>,
}

impl Backlog {
    /// Returns once the connection's buffer is back within its limit, or its local side is
    /// gone.
    pub(crate) async fn drained(self) {
        loop {
            let woken = self.drained.notified();
            let mut woken = pin!(woken);
            woken.as_mut().enable();
            if self.buffered.load(Ordering::Acquire) <= self.limit.load(Ordering::Acquire)
                || self.tx.is_closed()
            {
                return;
            }
            tokio::select! {
                _ = woken => {}
                _ = self.tx.closed() => return,
            }
        }
    }
}

impl Slot {
    /// Queues bytes for the local socket.
    pub(crate) fn deliver(&self, data: Bytes) -> Delivery {
        let len = data.len();
        let over = self.buffered.fetch_add(len, Ordering::AcqRel) + len
            > self.limit.load(Ordering::Acquire);
        if over && self.credit.is_some() {
            return Delivery::Overrun;
        }
        if self.tx.send(Inbound::Data(data)).is_err() {
            return Delivery::Overrun;
        }
        if !over {
            return Delivery::Queued;
        }
        Delivery::Backlogged(Backlog {
            buffered: self.buffered.clone(),
            limit: self.limit.clone(),
            drained: self.drained.clone(),
            tx: self.tx.clone(),
        })
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
    /// Our receive window per connection, if negotiated.
    pub own: Option<Window>,
    /// The window the peer advertised (our starting send credit per connection), if
    /// negotiated.
    pub peer: Option<u32>,
}

/// Our receive window per connection: where it starts (what we advertise) and how far it
/// may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    pub initial: u32,
    pub max: u32,
}

impl Window {
    /// The window for a configured maximum: it starts at
    /// [`INITIAL_FLOW_WINDOW`](crate::proto::INITIAL_FLOW_WINDOW) or the maximum if smaller.
    pub(crate) fn up_to(max: u32) -> Window {
        let max = max.max(1);
        Window {
            initial: crate::proto::INITIAL_FLOW_WINDOW.min(max),
            max,
        }
    }
}

impl Flow {
    /// Flow control runs when the peer advertised a window; `own` is our configured
    /// maximum window.
    pub(crate) fn negotiated(own: u32, peer: Option<u32>) -> Flow {
        match peer {
            Some(p) if p > 0 => Flow {
                own: Some(Window::up_to(own)),
                peer: Some(p),
            },
            _ => Flow {
                own: None,
                peer: None,
            },
        }
    }
}

/// The receiving side of one connection's flow control.
#[derive(Debug)]
struct Receive {
    buffered: Arc<AtomicUsize>,
    limit: Arc<AtomicUsize>,
    drained: Arc<Notify>,
    /// `None` without flow control: nothing is granted back.
    tuning: Option<Tuning>,
}

/// A connection's current receive window and the consumption measured against it.
#[derive(Debug)]
struct Tuning {
    window: usize,
    max: usize,
    since: Instant,
    consumed: usize,
}

impl Receive {
    /// `len` bytes reached the local side: the credit to grant the peer (the bytes, plus
    /// the window's growth), or `None` without flow control.
    fn consumed(&mut self, len: usize) -> Option<usize> {
        self.buffered.fetch_sub(len, Ordering::AcqRel);
        self.drained.notify_waiters();
        let t = self.tuning.as_mut()?;
        let mut grant = len;
        t.consumed += len;
        if t.consumed >= t.window {
            let now = Instant::now();
            if t.window < t.max && now.duration_since(t.since) < GROW_WITHIN {
                let extra = t.window.min(t.max - t.window);
                // The limit grows before the peer can use the credit.
                self.limit.fetch_add(extra, Ordering::AcqRel);
                t.window += extra;
                grant += extra;
            }
            t.since = now;
            t.consumed = 0;
        }
        Some(grant)
    }
}

/// Returns `len` consumed bytes of `connect_id` as credit over `link`; false when the link
/// is gone.
fn return_credit(link: &Link, connect_id: i64, recv: &mut Receive, len: usize) -> bool {
    match recv.consumed(len) {
        Some(bytes) => link.control(Frame::Window {
            connect_id,
            bytes: bytes as i64,
        }),
        None => true,
    }
}

/// The local-side handle of a connection, consumed by [`pump`].
#[derive(Debug)]
pub(crate) struct ConnEnd {
    pub connect_id: i64,
    rx: mpsc::UnboundedReceiver<Inbound>,
    recv: Receive,
    send: Sender,
    table: Arc<ConnTable>,
}

impl ConnEnd {
    /// What sends this connection's bytes toward the peer.
    pub(crate) fn sender(&self) -> Sender {
        self.send.clone()
    }

    /// The next message for the local side.
    pub(crate) async fn recv(&mut self) -> Option<Inbound> {
        self.rx.recv().await
    }

    /// `len` bytes were handed to the local side: return the credit to the peer.
    pub(crate) fn consumed(&mut self, len: usize) {
        return_credit(&self.send.link, self.connect_id, &mut self.recv, len);
    }
}

/// The sending side of one connection: its link, its id on that link, and the peer's
/// credit.
#[derive(Debug, Clone)]
pub(crate) struct Sender {
    link: Link,
    connect_id: i64,
    /// `None` without flow control.
    credit: Option<Arc<Semaphore>>,
    /// The largest DATA payload the peer's starting window admits (a larger one would wait
    /// for credit that never comes).
    max_send: usize,
}

impl Sender {
    /// Sends `data` once the peer's window has room for it (at once without flow control),
    /// in packets of at most the peer's starting window.
    pub(crate) async fn data(&self, mut data: Bytes) -> Result<(), Ended> {
        while !data.is_empty() {
            let part = data.split_to(data.len().min(self.max_send.max(1)));
            if let Some(c) = &self.credit {
                let n = u32::try_from(part.len()).unwrap_or(u32::MAX);
                match c.acquire_many(n).await {
                    Ok(p) => p.forget(),
                    Err(_) => return Err(Ended::RemoteClose),
                }
            }
            let frame = Frame::Data {
                connect_id: self.connect_id,
                data: part,
                error: String::new(),
            };
            if !self.link.data(frame).await {
                return Err(Ended::LinkGone);
            }
        }
        Ok(())
    }

    /// Asks the peer to close the connection, after the bytes already queued.
    pub(crate) async fn close(&self) {
        let close = Frame::CloseRequest {
            connect_id: self.connect_id,
        };
        self.link.data(close).await;
    }

    /// Asks the peer to close the connection at once, ahead of queued bytes.
    pub(crate) fn close_now(&self) {
        self.link.control(Frame::CloseRequest {
            connect_id: self.connect_id,
        });
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
        let limit = Arc::new(AtomicUsize::new(
            flow.own.map_or(LEGACY_BUFFER, |w| w.initial as usize),
        ));
        let drained = Arc::new(Notify::new());
        let slot = Slot {
            tx,
            buffered: buffered.clone(),
            limit: limit.clone(),
            credit: credit.clone(),
            drained: drained.clone(),
        };
        if let Some(old) = self.lock().insert(connect_id, slot) {
            old.close();
        } else {
            self.open.fetch_add(1, Ordering::Relaxed);
        }
        ConnEnd {
            connect_id,
            rx,
            recv: Receive {
                buffered,
                limit,
                drained,
                tuning: flow.own.map(|w| Tuning {
                    window: w.initial as usize,
                    max: w.max as usize,
                    since: Instant::now(),
                    consumed: 0,
                }),
            },
            send: Sender {
                link,
                connect_id,
                credit,
                max_send: flow
                    .peer
                    .map_or(MAX_CHUNK, |w| (w as usize).clamp(1, MAX_CHUNK)),
            },
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

    /// Bytes delivered to the table's connections and not yet consumed.
    pub(crate) fn buffered(&self) -> usize {
        self.lock()
            .values()
            .map(|s| s.buffered.load(Ordering::Acquire))
            .sum()
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

/// How long a bulk read may wait holding a pooled chunk before the connection counts as idle.
const BULK_IDLE: Duration = Duration::from_secs(1);

/// The read buffer an idle or chatty connection holds (it doubles while reads fill it). A
/// 64 B request/response fits; 2 KiB was a fifth of what an idle connection cost our agent
/// (10.5 KB measured by `cargo bench --bench konnectivity`).
const SMALL_READ: usize = 512;

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
    let sender = &end.send;
    let link = &sender.link;
    let rx = &mut end.rx;
    let recv = &mut end.recv;
    let (mut rd, mut wr) = tokio::io::split(io);
    let up = async {
        let send = |data: Bytes| sender.data(data);
        if !first.is_empty() {
            if let Err(e) = send(first.clone()).await {
                return e;
            }
        }
        // Start small (an idle connection holds only this) and double while reads fill the
        // buffer, up to one chunk, so bulk transfers move in large packets; at that size
        // the buffers come from the pool.
        let mut want = SMALL_READ;
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
                        want = SMALL_READ;
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
                        want = (want / 2).max(SMALL_READ);
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
                    if !return_credit(link, connect_id, recv, len) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(window: Window) -> Receive {
        Receive {
            buffered: Arc::new(AtomicUsize::new(usize::MAX / 2)),
            limit: Arc::new(AtomicUsize::new(window.initial as usize)),
            drained: Arc::new(Notify::new()),
            tuning: Some(Tuning {
                window: window.initial as usize,
                max: window.max as usize,
                since: Instant::now(),
                consumed: 0,
            }),
        }
    }

    #[test]
    fn windows_start_small_and_never_above_the_configured_maximum() {
        let w = Window::up_to(proto_max());
        assert_eq!(w.initial, crate::proto::INITIAL_FLOW_WINDOW);
        assert_eq!(w.max, proto_max());
        let tiny = Window::up_to(16 << 10);
        assert_eq!((tiny.initial, tiny.max), (16 << 10, 16 << 10));
        assert_eq!(
            Window::up_to(0).initial,
            1,
            "a zero window would never send"
        );
    }

    fn proto_max() -> u32 {
        crate::proto::DEFAULT_FLOW_WINDOW
    }

    #[tokio::test(start_paused = true)]
    async fn a_consumer_that_keeps_up_doubles_the_window_up_to_the_maximum() {
        let w = Window::up_to(proto_max());
        let mut r = receive(w);
        let mut granted = 0;
        let mut windows = vec![];
        for _ in 0..40 {
            // 64 KiB every 2 ms: 32 MB/s, even the largest window drains within 100 ms.
            tokio::time::advance(Duration::from_millis(2)).await;
            granted += r.consumed(64 << 10).expect("flow control");
            windows.push(r.tuning.as_ref().map(|t| t.window).unwrap_or_default());
        }
        let last = *windows.last().expect("rounds");
        assert_eq!(last, w.max as usize);
        assert!(windows.windows(2).all(|p| p[1] >= p[0]));
        // Every byte comes back, plus exactly the growth, and the overrun limit follows.
        let growth = w.max as usize - w.initial as usize;
        assert_eq!(granted, 40 * (64 << 10) + growth);
        assert_eq!(r.limit.load(Ordering::Acquire), w.max as usize);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_or_stalled_consumer_keeps_the_starting_window() {
        let w = Window::up_to(proto_max());
        let mut r = receive(w);
        let mut granted = 0;
        for _ in 0..40 {
            // 64 KiB every 50 ms: 1.3 MB/s, a window in 200 ms, slower than GROW_WITHIN.
            tokio::time::advance(Duration::from_millis(50)).await;
            granted += r.consumed(64 << 10).expect("flow control");
        }
        assert_eq!(granted, 40 * (64 << 10), "credit is only what was consumed");
        assert_eq!(r.limit.load(Ordering::Acquire), w.initial as usize);
        // A burst after an idle spell does not count the idle time as fast consumption,
        // and neither does it count against the next window.
        tokio::time::advance(Duration::from_secs(5)).await;
        r.consumed(200 << 10);
        assert_eq!(r.limit.load(Ordering::Acquire), w.initial as usize);
    }

    #[test]
    fn without_flow_control_nothing_is_granted() {
        let mut r = Receive {
            buffered: Arc::new(AtomicUsize::new(10)),
            limit: Arc::new(AtomicUsize::new(LEGACY_BUFFER)),
            drained: Arc::new(Notify::new()),
            tuning: None,
        };
        assert_eq!(r.consumed(10), None);
        assert_eq!(r.buffered.load(Ordering::Acquire), 0);
    }

    /// Without flow control, bytes beyond the buffer are still queued (none is lost), and
    /// the backlog they return is drained once the local side has consumed enough, or is
    /// gone.
    #[tokio::test]
    async fn a_legacy_connection_over_its_buffer_backs_the_reader_off_and_loses_nothing() {
        let table = Arc::new(ConnTable::default());
        let (link, _rx) = Link::new();
        let legacy = Flow {
            own: None,
            peer: None,
        };
        let mut end = table.open(1, link.clone(), legacy);
        let chunk = Bytes::from(vec![0u8; LEGACY_BUFFER / 2]);
        for _ in 0..2 {
            let d = table.with(1, |s| s.deliver(chunk.clone())).expect("slot");
            assert!(matches!(d, Delivery::Queued), "{d:?}");
        }
        let Some(Delivery::Backlogged(backlog)) = table.with(1, |s| s.deliver(chunk.clone()))
        else {
            panic!("over the buffer: a backlog");
        };
        let waiting = tokio::spawn(backlog.drained());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "still over the buffer");
        for _ in 0..3 {
            let Some(Inbound::Data(d)) = end.recv().await else {
                panic!("every queued byte arrives");
            };
            end.consumed(d.len());
        }
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("drained once consumed")
            .expect("task");

        // A local side that goes away ends the wait too.
        let end2 = table.open(2, link, legacy);
        for _ in 0..2 {
            table.with(2, |s| s.deliver(chunk.clone()));
        }
        let Some(Delivery::Backlogged(backlog)) = table.with(2, |s| s.deliver(chunk.clone()))
        else {
            panic!("a backlog");
        };
        drop(end2);
        tokio::time::timeout(Duration::from_secs(5), backlog.drained())
            .await
            .expect("the local side is gone");
    }
}
