//! The [`Datastore`] trait every driver implements, and the bounded [`WatchStream`] it hands
//! out.
//!
//! A watch's queue holds at most [`Limits::watch_buffer_bytes`](crate::model::Limits) of
//! batches its consumer has not taken (one batch always fits). A driver that fans events out
//! to many watches never waits for one of them: a batch that does not fit puts the watch
//! *behind* (the driver forgets it), and once its consumer has taken what is queued the
//! stream opens the same watch again from the first revision it missed, read back from the
//! store's history, as etcd's unsynced watchers catch up from its backend. A watch whose
//! missing revisions were compacted in the meantime ends with etcd's compacted error, so a
//! stalled client costs its queue and nothing more, and a slow one still sees every event
//! once, in order. Forwarders that read another bounded stream wait for room instead
//! ([`WatchSender::send_wait`]).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::DatastoreError;
use crate::error::Result;
use crate::model::{
    CompactResponse, DeleteRangeRequest, DeleteRangeResponse, KeyValue, LeaseGrant, LeaseId,
    LeaseInfo, PutRequest, PutResponse, RangeRequest, RangeResponse, Revision, Status, TxnRequest,
    TxnResponse, WatchBatch, WatchRequest,
};

/// A key-value store with etcd's semantics: one global revision, per-key create/mod revision,
/// version and lease, atomic transactions, ordered watches, compaction and leases.
///
/// Implementations are shared across tasks (`Arc<dyn Datastore>`).
#[async_trait]
pub trait Datastore: Send + Sync {
    /// Reads a key or range.
    async fn range(&self, req: RangeRequest) -> Result<RangeResponse>;
    /// Writes a key.
    async fn put(&self, req: PutRequest) -> Result<PutResponse>;
    /// Deletes a key or range.
    async fn delete_range(&self, req: DeleteRangeRequest) -> Result<DeleteRangeResponse>;
    /// Runs a transaction atomically.
    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse>;
    /// Discards history at and below `revision` (reads below it fail with `Compacted`).
    async fn compact(&self, revision: Revision) -> Result<CompactResponse>;
    /// Streams changes from `req.start_revision` on, every event once, in revision order.
    async fn watch(&self, req: WatchRequest) -> Result<WatchStream>;
    /// Grants a lease of `ttl` seconds; `id` 0 lets the store choose.
    async fn lease_grant(&self, ttl: i64, id: LeaseId) -> Result<LeaseGrant>;
    /// Revokes a lease, deleting its keys; returns the store revision afterwards.
    async fn lease_revoke(&self, id: LeaseId) -> Result<Revision>;
    /// Renews a lease; returns its TTL.
    async fn lease_keep_alive(&self, id: LeaseId) -> Result<i64>;
    /// Describes a lease (with its keys when `keys`).
    async fn lease_time_to_live(&self, id: LeaseId, keys: bool) -> Result<LeaseInfo>;
    /// Lists lease ids.
    async fn leases(&self) -> Result<Vec<LeaseId>>;
    /// Current revision, compaction revision and size.
    async fn status(&self) -> Result<Status>;
    /// Writes live `kvs` into this empty store with their create/mod revisions and versions
    /// as they are, and moves its revision to `revision` (reads and watches below it answer
    /// `Compacted`, as after a compaction): a migration its clients cannot notice, same
    /// resourceVersions, watches continuing at `revision + 1`. `Ok(false)` from drivers
    /// that choose revisions themselves (etcd): nothing was written.
    async fn import(&self, kvs: &[KeyValue], revision: Revision) -> Result<bool> {
        let _ = (kvs, revision);
        Ok(false)
    }
    /// The revision up to which every open watch of this store has been handed its events
    /// (a watch whose range saw none has nothing pending below it), so a watch progress
    /// notification at that revision is true for every watch once each has drained what it
    /// was handed. `None` when the driver cannot tell (a real etcd keeps that knowledge to
    /// itself); the gateway then answers progress requests with the current revision.
    async fn watch_dispatched(&self) -> Option<Revision> {
        None
    }
}

/// How a stream that fell behind opens its watch again from a revision: `None` when the
/// store is gone (the stream then ends).
pub type Resume = Box<
    dyn Fn(Revision) -> Pin<Box<dyn Future<Output = Option<Result<WatchStream>>> + Send>>
        + Send
        + Sync,
>;

/// The [`Resume`] of a fan-out driver: `req` opened again from the missed revision on the
/// store `store()` gives back (`None` once it is gone, which ends the stream).
pub(crate) fn reopen<S>(
    req: &WatchRequest,
    store: impl Fn() -> Option<S> + Send + Sync + 'static,
) -> Resume
where
    S: Datastore + 'static,
{
    let req = req.clone();
    let store = Arc::new(store);
    Box::new(move |from| {
        let (store, mut req) = (store.clone(), req.clone());
        req.start_revision = from;
        Box::pin(async move { Some(store()?.watch(req).await) })
    })
}

/// A bounded stream of watch batches. Dropping it cancels the watch.
pub struct WatchStream {
    chan: Arc<Chan>,
    resume: Option<Resume>,
    _cancel_on_drop: Box<dyn Send + Sync>,
}

impl std::fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchStream").finish_non_exhaustive()
    }
}

/// A new watch queue of `budget` bytes: the driver's sending half and the stream it returns,
/// with `guard` dropped with the stream (drivers unregister there) and `resume` opening the
/// watch again after the queue overflowed (without one, an overflow ends the stream with
/// [`DatastoreError::WatchBehind`]).
pub fn watch_channel(
    budget: usize,
    guard: impl Send + Sync + 'static,
    resume: Option<Resume>,
) -> (WatchSender, WatchStream) {
    let chan = Arc::new(Chan {
        queue: Mutex::new(Queue::default()),
        budget,
        ready: Notify::new(),
        room: Notify::new(),
    });
    (
        WatchSender { chan: chan.clone() },
        WatchStream {
            chan,
            resume,
            _cancel_on_drop: Box::new(guard),
        },
    )
}

/// The driver's half of a watch queue; dropping it ends the stream once drained.
pub struct WatchSender {
    chan: Arc<Chan>,
}

impl std::fmt::Debug for WatchSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchSender").finish_non_exhaustive()
    }
}

struct Chan {
    queue: Mutex<Queue>,
    budget: usize,
    /// Woken when an item is queued or the watch ends.
    ready: Notify,
    /// Woken when the consumer takes an item (for [`WatchSender::send_wait`]).
    room: Notify,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<(usize, Result<WatchBatch>)>,
    bytes: usize,
    /// The first revision that did not fit: the watch is behind from there.
    behind: Option<Revision>,
    sender_gone: bool,
    stream_gone: bool,
}

impl Chan {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing can panic while the queue is locked; a poisoned lock still holds a
        // consistent queue.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What one queued batch is counted as: its keys and values plus a fixed cost per event.
fn weight(item: &Result<WatchBatch>) -> usize {
    const EVENT: usize = 64;
    let kv = |kv: &crate::model::KeyValue| EVENT + kv.key.len() + kv.value.len();
    match item {
        Ok(b) => {
            EVENT
                + b.events
                    .iter()
                    .map(|e| kv(&e.kv) + e.prev_kv.as_ref().map_or(0, kv))
                    .sum::<usize>()
        }
        Err(_) => EVENT,
    }
}

impl WatchSender {
    /// Queues `item` without waiting. `false` means stop sending to this watch: its stream
    /// is gone, or the batch did not fit and the stream will open the watch again from this
    /// batch's first revision (an error always fits: it ends the watch).
    pub fn send(&self, item: Result<WatchBatch>) -> bool {
        let mut q = self.chan.lock();
        if q.stream_gone || q.behind.is_some() {
            return false;
        }
        let w = weight(&item);
        if let Ok(b) = &item
            && !q.items.is_empty()
            && q.bytes + w > self.chan.budget
        {
            q.behind = Some(
                b.events
                    .first()
                    .map_or(b.revision + 1, |e| e.kv.mod_revision),
            );
            drop(q);
            self.chan.ready.notify_one();
            return false;
        }
        q.bytes += w;
        q.items.push_back((w, item));
        drop(q);
        self.chan.ready.notify_one();
        true
    }

    /// Queues `item`, waiting while the queue is full; `false` when the stream is gone.
    pub async fn send_wait(&self, item: Result<WatchBatch>) -> bool {
        let w = weight(&item);
        let mut item = Some(item);
        loop {
            let room = self.chan.room.notified();
            {
                let mut q = self.chan.lock();
                if q.stream_gone {
                    return false;
                }
                if q.items.is_empty() || q.bytes + w <= self.chan.budget {
                    q.bytes += w;
                    if let Some(item) = item.take() {
                        q.items.push_back((w, item));
                    }
                    drop(q);
                    self.chan.ready.notify_one();
                    return true;
                }
            }
            room.await;
        }
    }

    /// Whether the stream is gone (its consumer dropped it).
    pub fn is_closed(&self) -> bool {
        self.chan.lock().stream_gone
    }

    /// Waits until the stream is gone.
    pub async fn closed(&self) {
        loop {
            let room = self.chan.room.notified();
            if self.is_closed() {
                return;
            }
            room.await;
        }
    }
}

impl Drop for WatchSender {
    fn drop(&mut self) {
        self.chan.lock().sender_gone = true;
        self.chan.ready.notify_one();
    }
}

/// What the queue had for the stream.
enum Taken {
    Item(Result<WatchBatch>),
    /// Drained, and behind from this revision.
    Behind(Revision),
    Ended,
    Empty,
}

impl WatchStream {
    fn take(&self) -> Taken {
        let mut q = self.chan.lock();
        let taken = match q.items.pop_front() {
            Some((w, item)) => {
                q.bytes -= w;
                Taken::Item(item)
            }
            None => match q.behind {
                Some(r) => Taken::Behind(r),
                None if q.sender_gone => Taken::Ended,
                None => Taken::Empty,
            },
        };
        drop(q);
        if matches!(taken, Taken::Item(_)) {
            self.chan.room.notify_one();
        }
        taken
    }

    /// The next batch; `None` when the watch ended (store dropped); an error ends it too.
    /// Cancel safe: a batch is taken only when returned.
    pub async fn next(&mut self) -> Option<Result<WatchBatch>> {
        loop {
            let chan = self.chan.clone();
            let ready = chan.ready.notified();
            match self.take() {
                Taken::Item(item) => return Some(item),
                Taken::Ended => return None,
                Taken::Empty => ready.await,
                Taken::Behind(from) => match &self.resume {
                    None => {
                        self.resume_failed();
                        return Some(Err(DatastoreError::WatchBehind { from }));
                    }
                    Some(resume) => match resume(from).await {
                        Some(Ok(again)) => *self = again,
                        Some(Err(e)) => {
                            self.resume_failed();
                            return Some(Err(e));
                        }
                        None => {
                            self.resume_failed();
                            return None;
                        }
                    },
                },
            }
        }
    }

    /// Ends the stream for good after a resume that did not happen.
    fn resume_failed(&mut self) {
        let mut q = self.chan.lock();
        q.behind = None;
        q.sender_gone = true;
    }

    /// The next batch if one is already queued (never waits, never resumes).
    pub fn try_next(&mut self) -> Option<Result<WatchBatch>> {
        match self.take() {
            Taken::Item(item) => Some(item),
            _ => None,
        }
    }

    /// Whether the watch fell behind: events after what is queued are still to be read back
    /// (by [`next`](Self::next)), so the queue does not hold everything up to the store's
    /// dispatched revision.
    pub fn is_behind(&self) -> bool {
        self.chan.lock().behind.is_some()
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.chan.lock().stream_gone = true;
        self.chan.room.notify_waiters();
        self.chan.room.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Event, EventKind, KeyValue};
    use bytes::Bytes;

    fn batch(rev: Revision, bytes: usize) -> Result<WatchBatch> {
        Ok(WatchBatch {
            revision: rev,
            events: vec![Event {
                kind: EventKind::Put,
                kv: KeyValue {
                    key: Bytes::from_static(b"/k"),
                    value: Bytes::from(vec![0; bytes]),
                    mod_revision: rev,
                    ..KeyValue::default()
                },
                prev_kv: None,
            }],
        })
    }

    fn revision(item: Option<Result<WatchBatch>>) -> Revision {
        item.expect("an item").expect("a batch").revision
    }

    #[tokio::test]
    async fn a_full_queue_puts_the_watch_behind_at_the_first_batch_that_did_not_fit() {
        let (tx, mut rx) = watch_channel(1_000, (), None);
        // One batch always fits, even one larger than the queue.
        assert!(tx.send(batch(1, 5_000)));
        assert!(!tx.send(batch(2, 10)), "a second batch over the budget");
        assert!(!tx.send(batch(3, 10)), "behind: nothing more is queued");
        assert!(rx.is_behind());
        assert_eq!(revision(rx.next().await), 1);
        // Without a way to resume, the stream says where to watch from again.
        match rx.next().await {
            Some(Err(DatastoreError::WatchBehind { from })) => assert_eq!(from, 2),
            other => panic!("expected WatchBehind, got {other:?}"),
        }
        assert!(rx.next().await.is_none(), "then it ends");
    }

    #[tokio::test]
    async fn a_stream_resumes_from_where_its_queue_ended() {
        let resume: Resume = Box::new(|from| {
            Box::pin(async move {
                let (tx, rx) = watch_channel(1_000, (), None);
                tx.send(batch(from, 10));
                Some(Ok(rx))
            })
        });
        let (tx, mut rx) = watch_channel(1_000, (), Some(resume));
        assert!(tx.send(batch(1, 600)));
        assert!(!tx.send(batch(2, 600)));
        drop(tx);
        assert_eq!(revision(rx.next().await), 1);
        assert_eq!(revision(rx.next().await), 2, "read again from revision 2");
        assert!(rx.next().await.is_none());
    }

    #[tokio::test]
    async fn an_error_always_fits_and_a_dropped_sender_ends_the_stream() {
        let (tx, mut rx) = watch_channel(100, (), None);
        assert!(tx.send(batch(1, 500)));
        assert!(tx.send(Err(DatastoreError::EmptyKey)));
        drop(tx);
        assert_eq!(revision(rx.next().await), 1);
        assert!(matches!(
            rx.next().await,
            Some(Err(DatastoreError::EmptyKey))
        ));
        assert!(rx.next().await.is_none());
    }

    #[tokio::test]
    async fn send_wait_waits_for_room_and_sees_a_dropped_stream() {
        let (tx, mut rx) = watch_channel(1_000, (), None);
        assert!(tx.send_wait(batch(1, 900)).await);
        let waiting = tokio::spawn(async move {
            let sent = tx.send_wait(batch(2, 900)).await;
            (tx, sent)
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(
            !waiting.is_finished(),
            "no room until the consumer takes one"
        );
        assert_eq!(revision(rx.next().await), 1);
        let (tx, sent) = waiting.await.expect("task");
        assert!(sent);
        assert!(!rx.is_behind(), "waiting never falls behind");
        assert_eq!(revision(rx.next().await), 2);
        drop(rx);
        assert!(tx.is_closed());
        assert!(!tx.send_wait(batch(3, 1)).await);
        tx.closed().await;
    }
}
