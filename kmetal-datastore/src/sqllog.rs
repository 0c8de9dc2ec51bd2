//! What the SQL drivers (PostgreSQL, SQLite) share: key-range bounds as SQL parameters, and
//! the watch hub's bookkeeping (registered watchers, per-revision delivery, unregistering).

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::error::{DatastoreError, Result};
use crate::model::{CompactResponse, Event, EventKind, KeyRange, LeaseId, Revision, WatchBatch};

/// When an idle watch hub owes the watches that asked for progress an empty batch: once per
/// `interval` (etcd's `--watch-progress-notify-interval`). The hub's own tick (which also
/// notices other processes' writes) is [`tick`](Self::tick), at most a second.
#[derive(Debug)]
pub(crate) struct ProgressClock {
    interval: Duration,
    last: Instant,
}

impl ProgressClock {
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval: interval.max(Duration::from_millis(10)),
            last: Instant::now(),
        }
    }

    /// How often the hub should wake up when nothing happens.
    pub(crate) fn tick(&self) -> Duration {
        self.interval.min(Duration::from_secs(1))
    }

    /// Whether progress is due now (and, if so, restarts the interval).
    pub(crate) fn due(&mut self) -> bool {
        if self.last.elapsed() >= self.interval {
            self.last = Instant::now();
            true
        } else {
            false
        }
    }
}

/// The revision up to which a watch hub has handed every registered watch its events
/// (shared between the hub task, which advances it after each delivery, and the store,
/// which answers [`Datastore::watch_dispatched`](crate::Datastore::watch_dispatched)).
#[derive(Debug, Clone, Default)]
pub(crate) struct Dispatched(std::sync::Arc<std::sync::atomic::AtomicI64>);

impl Dispatched {
    pub(crate) fn set(&self, revision: Revision) {
        self.0
            .fetch_max(revision, std::sync::atomic::Ordering::Release);
    }

    pub(crate) fn get(&self) -> Revision {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// The `kmetal_meta` row a writer holds while applying a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    pub(crate) revision: Revision,
    pub(crate) compact: Revision,
    pub(crate) next_lease: LeaseId,
}

impl Meta {
    /// Moves the compaction revision to `at`, with etcd's errors for a compacted or future
    /// revision.
    pub(crate) fn compact_to(&mut self, at: Revision) -> Result<CompactResponse> {
        if at <= self.compact {
            return Err(DatastoreError::Compacted {
                requested: at,
                compacted: self.compact,
            });
        }
        if at > self.revision {
            return Err(DatastoreError::FutureRevision {
                requested: at,
                current: self.revision,
            });
        }
        self.compact = at;
        Ok(CompactResponse {
            revision: self.revision,
        })
    }

    /// The id of a new lease: the requested one, or the next free counter value for 0.
    pub(crate) fn lease_id(&mut self, requested: LeaseId) -> LeaseId {
        if requested != 0 {
            return requested;
        }
        let next = self.next_lease.max(1);
        self.next_lease = next + 1;
        next
    }
}

/// Bounds of a key range as SQL parameters: (from, to) with `to` None = unbounded; a single
/// key is (key, key + "\0").
pub(crate) fn bounds(r: &KeyRange) -> (Vec<u8>, Option<Vec<u8>>) {
    if r.range_end.is_empty() {
        let mut end = r.key.to_vec();
        end.push(0);
        return (r.key.to_vec(), Some(end));
    }
    let from = if r.key.as_ref() == [0] && r.range_end.as_ref() == [0] {
        Vec::new()
    } else {
        r.key.to_vec()
    };
    let to = (r.range_end.as_ref() != [0]).then(|| r.range_end.to_vec());
    (from, to)
}

/// A registered watch.
pub(crate) struct Watcher {
    pub(crate) range: KeyRange,
    pub(crate) next: Revision,
    pub(crate) prev_kv: bool,
    pub(crate) no_put: bool,
    pub(crate) no_delete: bool,
    pub(crate) progress: bool,
    pub(crate) tx: mpsc::UnboundedSender<Result<WatchBatch>>,
}

/// Messages to a hub task.
pub(crate) enum HubMsg {
    Add(u64, Watcher),
    Remove(u64),
}

/// Unregisters a watch when its stream is dropped.
pub(crate) struct Unregister {
    pub(crate) hub: mpsc::UnboundedSender<HubMsg>,
    pub(crate) id: u64,
}

impl Drop for Unregister {
    fn drop(&mut self) {
        let _ = self.hub.send(HubMsg::Remove(self.id));
    }
}

/// Sends `w` the events of `events` at or after its next revision, one batch per revision.
pub(crate) fn deliver(w: &mut Watcher, events: &[(Revision, Event)], upto: Revision) -> bool {
    let mut batch: Option<WatchBatch> = None;
    for (rev, e) in events {
        if *rev < w.next || !w.range.contains(&e.kv.key) {
            continue;
        }
        if (e.kind == EventKind::Put && w.no_put) || (e.kind == EventKind::Delete && w.no_delete) {
            continue;
        }
        if batch.as_ref().is_some_and(|b| b.revision != *rev)
            && let Some(b) = batch.take()
            && w.tx.send(Ok(b)).is_err()
        {
            return false;
        }
        let mut e = e.clone();
        if !w.prev_kv {
            e.prev_kv = None;
        }
        batch
            .get_or_insert_with(|| WatchBatch {
                revision: *rev,
                events: Vec::new(),
            })
            .events
            .push(e);
    }
    if let Some(b) = batch
        && w.tx.send(Ok(b)).is_err()
    {
        return false;
    }
    w.next = w.next.max(upto + 1);
    true
}

/// A process-wide id for watches.
pub(crate) fn next_watch_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Compacts `store()` every `every`, keeping the last `keep` revisions, until `store()` is
/// gone (the closure holds a weak handle, so dropping the store ends the task).
pub(crate) fn spawn_auto_compaction(
    every: std::time::Duration,
    keep: Revision,
    store: impl Fn() -> Option<std::sync::Arc<dyn crate::store::Datastore>> + Send + 'static,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(s) = store() else { return };
            if let Ok(st) = s.status().await {
                let target = st.revision - keep.max(1);
                if target > st.compact_revision {
                    // Another process may have compacted first: Compacted is fine.
                    let _ = s.compact(target).await;
                }
            }
        }
    });
}
