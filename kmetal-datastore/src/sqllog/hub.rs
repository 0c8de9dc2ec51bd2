//! The watch hub: one task per store that replays history to a new watch and delivers live
//! events to every watch, in revision order, each event once. It is woken by the store's own
//! writer at each commit, by the dialect's feed when another process wrote, and by a tick.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::dialect::{Classify, LogFeed};
use crate::model::{Event, EventKind, KeyRange, Revision, WatchBatch};
use crate::store::WatchSender;

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

/// Revisions read back at a time for a watch's replay.
const REPLAY_WINDOW: Revision = 1_000;

/// A registered watch.
pub(crate) struct Watcher {
    pub(crate) range: KeyRange,
    pub(crate) next: Revision,
    pub(crate) prev_kv: bool,
    pub(crate) no_put: bool,
    pub(crate) no_delete: bool,
    pub(crate) progress: bool,
    pub(crate) tx: WatchSender,
}

/// Messages to a hub task.
pub(crate) enum HubMsg {
    /// Registers a watch; the hub answers on the sender once the watch has been handed its
    /// replay (or its error), so that [`Dispatched`] never claims a revision a watch that its
    /// caller already holds has not been handed.
    Add(u64, Watcher, tokio::sync::oneshot::Sender<()>),
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
            && !w.tx.send(Ok(b))
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
        && !w.tx.send(Ok(b))
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

/// Why the hub woke up.
enum Wake {
    Msg(HubMsg),
    /// This store's writer committed (false: the writer is gone).
    Local(bool),
    /// Another process may have written.
    Feed(Option<Revision>),
    Tick,
}

/// Runs the hub until the store drops its sender.
pub(crate) async fn hub<F: LogFeed>(
    mut feed: F,
    mut rx: mpsc::UnboundedReceiver<HubMsg>,
    mut committed: watch::Receiver<super::write::Commit>,
    mut progress: ProgressClock,
    dispatched: Dispatched,
) {
    let mut watchers: HashMap<u64, Watcher> = HashMap::new();
    // Up to where every watch has been handed its events. A log only this store writes
    // starts where its writer does (no read, which a full server could refuse); one that
    // others write starts at the first revision the hub reads.
    let mut last: Option<Revision> = (!feed.remote_writers()).then(|| committed.borrow().revision);
    let mut tick = tokio::time::interval(progress.tick());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut local = true;
    loop {
        let wake = tokio::select! {
            msg = rx.recv() => match msg {
                None => return,
                Some(m) => Wake::Msg(m),
            },
            changed = committed.changed(), if local => Wake::Local(changed.is_ok()),
            hint = feed.changed() => Wake::Feed(hint),
            _ = tick.tick() => Wake::Tick,
        };
        let mut written = None;
        let (hint, idle) = match wake {
            Wake::Msg(HubMsg::Remove(id)) => {
                watchers.remove(&id);
                continue;
            }
            Wake::Msg(HubMsg::Add(id, w, registered)) => {
                if let Some(w) = register(&mut feed, &mut last, w).await {
                    watchers.insert(id, w);
                }
                if let Some(l) = last {
                    dispatched.set(l);
                }
                let _ = registered.send(());
                continue;
            }
            Wake::Local(false) => {
                local = false;
                continue;
            }
            Wake::Local(true) => {
                let c = committed.borrow_and_update().clone();
                let revision = c.revision;
                written = Some(c);
                (Some(revision), false)
            }
            Wake::Feed(hint) => (hint, false),
            // Only this store writes: nothing moved that its writer did not say, so the
            // tick reads nothing unless a delivery failed behind the writer (retried here),
            // and owes progress notifications.
            Wake::Tick if !feed.remote_writers() => {
                let c = committed.borrow().clone();
                if last.is_some_and(|l| c.revision > l) {
                    let revision = c.revision;
                    written = Some(c);
                    (Some(revision), false)
                } else {
                    if let Some(from) = last
                        && progress.due()
                    {
                        notify_progress(&mut watchers, from);
                    }
                    continue;
                }
            }
            Wake::Tick => (None, true),
        };
        let now = match hint {
            Some(r) => r,
            None => match feed.current().await {
                Ok(r) => r,
                Err(_) => continue,
            },
        };
        let Some(from) = last else {
            last = Some(now);
            dispatched.set(now);
            continue;
        };
        if now > from {
            if !watchers.is_empty() {
                // The writer's own events, when they are exactly the ones due; else read back
                // (a failed read is retried from `from` at the next wake-up: nothing skipped).
                let known = written
                    .filter(|c| c.after == from && c.revision == now)
                    .and_then(|c| c.events);
                let events = match known {
                    Some(e) => e,
                    None => match feed.events(from, now).await {
                        Ok(e) => std::sync::Arc::new(e),
                        Err(_) => continue,
                    },
                };
                watchers.retain(|_, w| deliver(w, &events, now));
            }
            last = Some(now);
            dispatched.set(now);
        } else if idle && progress.due() {
            notify_progress(&mut watchers, from);
        }
    }
}

/// Idle: an empty batch at `from` for the watches that asked for progress notifications.
fn notify_progress(watchers: &mut HashMap<u64, Watcher>, from: Revision) {
    watchers.retain(|_, w| {
        !w.progress
            || w.tx.send(Ok(WatchBatch {
                revision: from,
                events: Vec::new(),
            }))
    });
}

/// Replays history up to what has been dispatched to `w`, which then goes live; `None` when
/// the watch ended (its replay failed, with the error sent, or its stream is gone).
async fn register<F: LogFeed>(
    feed: &mut F,
    last: &mut Option<Revision>,
    mut w: Watcher,
) -> Option<Watcher> {
    let upto = match *last {
        Some(l) => l,
        None => match feed.current().await {
            Ok(c) => c,
            Err(e) => {
                let _ = w.tx.send(Err(e.into_datastore()));
                return None;
            }
        },
    };
    *last = Some(upto);
    // Read in windows: a replay larger than the watch's queue stops at the first window that
    // does not fit, and its stream reads on from there, so a far-behind watch costs one
    // window per catch-up, not its whole lag.
    while w.next <= upto {
        let to = upto.min(w.next - 1 + REPLAY_WINDOW);
        match feed.events(w.next - 1, to).await {
            Ok(events) => {
                if !deliver(&mut w, &events, to) {
                    return None;
                }
            }
            Err(e) => {
                let _ = w.tx.send(Err(e.into_datastore()));
                return None;
            }
        }
    }
    Some(w)
}
