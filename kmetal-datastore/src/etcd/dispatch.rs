//! What the driver's watches have handed on, for the gateway's progress answers
//! ([`Datastore::watch_dispatched`](crate::Datastore::watch_dispatched)): each watch records the
//! revision up to which it has passed every event to its consumer, learnt from its events and
//! from etcd's progress answers on its stream, and asks etcd for one when the gateway waits.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;

use crate::model::Revision;

/// How often one watch asks etcd for progress while a progress answer waits on it.
const ASK_EVERY: Duration = Duration::from_millis(20);

/// One watch's record.
#[derive(Debug, Default)]
pub(crate) struct Tracked {
    handed: AtomicI64,
    asked: Mutex<Option<tokio::time::Instant>>,
    /// Wakes the watch's task to send etcd a progress request on its stream.
    pub(crate) ask: Notify,
}

impl Tracked {
    /// Every event up to `revision` has gone to the consumer.
    pub(crate) fn handed(&self, revision: Revision) {
        self.handed.fetch_max(revision, Ordering::Relaxed);
    }

    fn ask_now(&self) {
        let now = tokio::time::Instant::now();
        let mut asked = self.asked.lock().unwrap_or_else(|p| p.into_inner());
        if asked.is_none_or(|at| now.duration_since(at) >= ASK_EVERY) {
            *asked = Some(now);
            self.ask.notify_one();
        }
    }
}

/// The store's live watches.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    watches: Mutex<Vec<Weak<Tracked>>>,
}

impl Registry {
    /// A record for a new watch, held by its task (dropped when the watch ends).
    pub(crate) fn register(&self) -> Arc<Tracked> {
        let t = Arc::new(Tracked::default());
        let mut all = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&t));
        t
    }

    /// The revision up to which every live watch has handed on its events, asking each to
    /// learn more from etcd; `Revision::MAX` with no watch.
    pub(crate) fn dispatched(&self) -> Revision {
        let live: Vec<Arc<Tracked>> = {
            let mut all = self.watches.lock().unwrap_or_else(|p| p.into_inner());
            all.retain(|w| w.strong_count() > 0);
            all.iter().filter_map(Weak::upgrade).collect()
        };
        let mut lowest = Revision::MAX;
        for t in &live {
            t.ask_now();
            lowest = lowest.min(t.handed.load(Ordering::Relaxed));
        }
        lowest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_lowest_live_watch_bounds_progress() {
        let r = Registry::default();
        assert_eq!(r.dispatched(), Revision::MAX);
        let a = r.register();
        let b = r.register();
        a.handed(10);
        b.handed(4);
        assert_eq!(r.dispatched(), 4);
        // The wait asked both watches for progress.
        tokio::time::timeout(Duration::from_secs(1), b.ask.notified())
            .await
            .expect("asked");
        drop(b);
        assert_eq!(r.dispatched(), 10, "an ended watch holds nothing back");
    }
}
