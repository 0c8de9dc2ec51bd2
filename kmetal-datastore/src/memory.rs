//! The in-memory reference driver: etcd's semantics, nothing persisted.
//!
//! Every other driver is checked against this one. State is one mutex-guarded structure: a
//! history per key (for reads at old revisions), an event log since the last compaction (for
//! watches that start in the past), leases with deadlines, and the registered watchers.
//! Transactions apply at one revision and are rolled back from an undo record if any
//! operation fails, so a failed txn leaves no trace.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;

use crate::error::{DatastoreError, Result};
use crate::model::{
    CompactResponse, DeleteRangeRequest, DeleteRangeResponse, Event, EventKind, KeyRange, KeyValue,
    LeaseGrant, LeaseId, LeaseInfo, Limits, PutRequest, PutResponse, RangeRequest, RangeResponse,
    RequestOp, ResponseOp, Revision, Status, TxnRequest, TxnResponse, WatchBatch, WatchRequest,
};
use crate::store::{Datastore, WatchSender, WatchStream, reopen, watch_channel};

/// Bytes we count per stored revision on top of key and value, for `db_size` and the quota.
const ENTRY_OVERHEAD: u64 = 48;
/// How often the background task looks for expired leases.
const LEASE_TICK: Duration = Duration::from_millis(100);
/// etcd's `--experimental-watch-progress-notify-interval` default.

#[derive(Debug, Clone)]
struct Entry {
    rev: Revision,
    kv: Option<KeyValue>,
}

#[derive(Debug)]
struct Lease {
    granted_ttl: i64,
    deadline: Instant,
    keys: BTreeSet<Bytes>,
}

struct Watcher {
    range: KeyRange,
    next_rev: Revision,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    /// Send empty batches when idle for `State::progress_interval`.
    progress: bool,
    /// When the watcher was last sent anything.
    last_sent: Instant,
    tx: WatchSender,
}

/// An import was asked of a store that already has keys or writes.
#[derive(Debug, thiserror::Error)]
#[error("cannot import into a store that is already at revision {revision}")]
struct ImportIntoUsedStore {
    revision: Revision,
}

#[derive(Default)]
struct State {
    revision: Revision,
    compacted: Revision,
    keys: BTreeMap<Bytes, Vec<Entry>>,
    log: VecDeque<(Revision, Event)>,
    leases: HashMap<LeaseId, Lease>,
    watchers: HashMap<u64, Watcher>,
    next_watch: u64,
    progress_interval: Duration,
    next_lease: LeaseId,
    db_size: u64,
}

#[derive(Default)]
struct Undo {
    keys: Vec<Bytes>,
    leases: HashMap<LeaseId, BTreeSet<Bytes>>,
    db_size: u64,
}

struct Shared {
    state: Mutex<State>,
    limits: Limits,
}

/// The in-memory reference store.
///
/// ```
/// # tokio_test_block_on(async {
/// use kmetal_datastore::{Datastore, MemoryStore, model::{PutRequest, RangeRequest}};
/// let store = MemoryStore::new();
/// store.put(PutRequest::new("/a/1", "x")).await?;
/// let r = store.range(RangeRequest::prefix("/a/")).await?;
/// assert_eq!(r.kvs[0].value, "x");
/// # Ok::<(), kmetal_datastore::DatastoreError>(()) });
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

/// `now + ttl` seconds, saturating far in the future instead of overflowing.
fn deadline(ttl: i64) -> Instant {
    let now = Instant::now();
    now.checked_add(Duration::from_secs(ttl.unsigned_abs()))
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

fn entry_size(key: &[u8], value: &[u8]) -> u64 {
    (key.len() + value.len()) as u64 + ENTRY_OVERHEAD
}

impl MemoryStore {
    /// A store with etcd's default limits. Within a tokio runtime, a background task expires
    /// leases even when no request arrives; outside one, expiry happens on the next request.
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    /// A store with custom limits.
    pub fn with_limits(limits: Limits) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                // etcd starts at revision 1: a fresh store's header revision is 1 and its first
                // write is revision 2. kube-apiserver's watch cache refuses a list at revision 0
                // ("illegal resource version from storage: 0") and never becomes ready.
                revision: 1,
                next_lease: 1,
                progress_interval: crate::model::DEFAULT_PROGRESS_INTERVAL,
                ..State::default()
            }),
            limits,
        });
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let weak: Weak<Shared> = Arc::downgrade(&shared);
            handle.spawn(async move {
                loop {
                    tokio::time::sleep(LEASE_TICK).await;
                    let Some(shared) = weak.upgrade() else { return };
                    let mut s = lock(&shared);
                    s.expire(Instant::now());
                    s.notify_progress(Instant::now());
                }
            });
        }
        Self { shared }
    }

    /// Sets how long a watch asking for progress notifications may stay idle before it gets
    /// an empty batch with the current revision (etcd's default: 10 minutes).
    pub fn with_progress_interval(self, interval: Duration) -> Self {
        lock(&self.shared).progress_interval = interval;
        self
    }

    fn state(&self) -> MutexGuard<'_, State> {
        let mut s = lock(&self.shared);
        s.expire(Instant::now());
        s
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // A panic while holding the lock cannot leave a half-applied txn (undo runs first), so
    // the state is still consistent: keep serving.
    shared.state.lock().unwrap_or_else(|p| p.into_inner())
}

fn key_range<'a>(
    map: &'a BTreeMap<Bytes, Vec<Entry>>,
    r: &KeyRange,
) -> Box<dyn Iterator<Item = (&'a Bytes, &'a Vec<Entry>)> + 'a> {
    if r.is_single() {
        return Box::new(map.get_key_value(&r.key).into_iter());
    }
    let upper = if r.range_end.as_ref() == [0] {
        Bound::Unbounded
    } else if r.range_end <= r.key {
        return Box::new(std::iter::empty());
    } else {
        Bound::Excluded(r.range_end.clone())
    };
    Box::new(map.range((Bound::Included(r.key.clone()), upper)))
}

fn at(history: &[Entry], rev: Revision) -> Option<&KeyValue> {
    let idx = history.partition_point(|e| e.rev <= rev);
    idx.checked_sub(1)
        .and_then(|i| history.get(i))
        .and_then(|e| e.kv.as_ref())
}

impl State {
    fn current(&self, key: &[u8]) -> Option<&KeyValue> {
        self.keys
            .get(key)
            .and_then(|h| h.last())
            .and_then(|e| e.kv.as_ref())
    }

    fn check_read_revision(&self, rev: Revision) -> Result<Revision> {
        if rev == 0 {
            return Ok(Revision::MAX);
        }
        if rev > self.revision {
            return Err(DatastoreError::FutureRevision {
                requested: rev,
                current: self.revision,
            });
        }
        if rev < self.compacted {
            return Err(DatastoreError::Compacted {
                requested: rev,
                compacted: self.compacted,
            });
        }
        Ok(rev)
    }

    fn range(&self, req: &RangeRequest) -> Result<RangeResponse> {
        if req.range.key.is_empty() {
            return Err(DatastoreError::EmptyKey);
        }
        let rev = self.check_read_revision(req.revision)?;
        let mut kvs = Vec::new();
        let mut count = 0i64;
        for (_, history) in key_range(&self.keys, &req.range) {
            if let Some(kv) = at(history, rev) {
                count += 1;
                if !req.count_only && (req.limit <= 0 || (kvs.len() as i64) < req.limit) {
                    let mut kv = kv.clone();
                    if req.keys_only {
                        kv.value = Bytes::new();
                    }
                    kvs.push(kv);
                }
            }
        }
        let more = req.limit > 0 && count > req.limit && !req.count_only;
        Ok(RangeResponse {
            revision: self.revision,
            kvs,
            more,
            count,
        })
    }

    fn touch_lease(&mut self, undo: &mut Undo, id: LeaseId) -> Option<&mut Lease> {
        let lease = self.leases.get_mut(&id)?;
        undo.leases.entry(id).or_insert_with(|| lease.keys.clone());
        Some(lease)
    }

    fn put(
        &mut self,
        req: &PutRequest,
        rev: Revision,
        limits: &Limits,
        undo: &mut Undo,
        events: &mut Vec<Event>,
    ) -> Result<PutResponse> {
        limits.check_put(req)?;
        if req.lease != 0 && !self.leases.contains_key(&req.lease) {
            return Err(DatastoreError::LeaseNotFound { id: req.lease });
        }
        let size = entry_size(&req.key, &req.value);
        if self.db_size + size > limits.quota_backend_bytes {
            return Err(DatastoreError::QuotaExceeded {
                used: self.db_size,
                quota: limits.quota_backend_bytes,
            });
        }
        let prev = self.current(&req.key).cloned();
        let kv = KeyValue {
            key: req.key.clone(),
            value: req.value.clone(),
            create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
            mod_revision: rev,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            lease: req.lease,
        };
        if let Some(old) = prev
            .as_ref()
            .map(|p| p.lease)
            .filter(|l| *l != 0 && *l != req.lease)
            && let Some(l) = self.touch_lease(undo, old)
        {
            l.keys.remove(&req.key);
        }
        if req.lease != 0
            && let Some(l) = self.touch_lease(undo, req.lease)
        {
            l.keys.insert(req.key.clone());
        }
        undo.keys.push(req.key.clone());
        self.keys.entry(req.key.clone()).or_default().push(Entry {
            rev,
            kv: Some(kv.clone()),
        });
        self.db_size += size;
        events.push(Event {
            kind: EventKind::Put,
            kv,
            prev_kv: prev.clone(),
        });
        Ok(PutResponse {
            revision: rev,
            prev_kv: if req.prev_kv { prev } else { None },
        })
    }

    fn delete(
        &mut self,
        req: &DeleteRangeRequest,
        rev: Revision,
        undo: &mut Undo,
        events: &mut Vec<Event>,
    ) -> Result<DeleteRangeResponse> {
        if req.range.key.is_empty() {
            return Err(DatastoreError::EmptyKey);
        }
        let victims: Vec<KeyValue> = key_range(&self.keys, &req.range)
            .filter_map(|(_, h)| h.last().and_then(|e| e.kv.clone()))
            .collect();
        for prev in &victims {
            if prev.lease != 0
                && let Some(l) = self.touch_lease(undo, prev.lease)
            {
                l.keys.remove(&prev.key);
            }
            undo.keys.push(prev.key.clone());
            self.keys
                .entry(prev.key.clone())
                .or_default()
                .push(Entry { rev, kv: None });
            self.db_size += entry_size(&prev.key, &[]);
            events.push(Event {
                kind: EventKind::Delete,
                kv: KeyValue {
                    key: prev.key.clone(),
                    mod_revision: rev,
                    ..KeyValue::default()
                },
                prev_kv: Some(prev.clone()),
            });
        }
        Ok(DeleteRangeResponse {
            revision: rev,
            deleted: victims.len() as i64,
            prev_kvs: if req.prev_kv { victims } else { Vec::new() },
        })
    }

    fn txn(
        &mut self,
        req: &TxnRequest,
        rev: Revision,
        limits: &Limits,
        undo: &mut Undo,
        events: &mut Vec<Event>,
    ) -> Result<TxnResponse> {
        let succeeded = req.compare.iter().all(|c| {
            let mut any = false;
            let all_pass = key_range(&self.keys, &c.range)
                .filter_map(|(_, h)| h.last().and_then(|e| e.kv.as_ref()))
                .all(|kv| {
                    any = true;
                    c.matches(Some(kv))
                });
            // A single missing key compares as absent; an empty range passes vacuously.
            if any || !c.range.is_single() {
                all_pass
            } else {
                c.matches(None)
            }
        });
        let ops = if succeeded {
            &req.success
        } else {
            &req.failure
        };
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            responses.push(match op {
                RequestOp::Range(r) => ResponseOp::Range(self.range(r)?),
                RequestOp::Put(p) => ResponseOp::Put(self.put(p, rev, limits, undo, events)?),
                RequestOp::DeleteRange(d) => {
                    ResponseOp::DeleteRange(self.delete(d, rev, undo, events)?)
                }
                RequestOp::Txn(t) => ResponseOp::Txn(self.txn(t, rev, limits, undo, events)?),
            });
        }
        Ok(TxnResponse {
            revision: rev,
            succeeded,
            responses,
        })
    }

    fn rollback(&mut self, undo: Undo, rev: Revision) {
        for k in undo.keys {
            if let Some(h) = self.keys.get_mut(&k) {
                while h.last().is_some_and(|e| e.rev == rev) {
                    h.pop();
                }
                if h.is_empty() {
                    self.keys.remove(&k);
                }
            }
        }
        for (id, keys) in undo.leases {
            if let Some(l) = self.leases.get_mut(&id) {
                l.keys = keys;
            }
        }
        self.db_size = undo.db_size;
    }

    /// Runs `f` as one write at the next revision: commits and notifies watchers if it wrote
    /// anything, rolls back if it failed.
    fn write<T>(
        &mut self,
        f: impl FnOnce(&mut State, Revision, &mut Undo, &mut Vec<Event>) -> Result<T>,
    ) -> Result<T> {
        let rev = self.revision + 1;
        let mut undo = Undo {
            db_size: self.db_size,
            ..Undo::default()
        };
        let mut events = Vec::new();
        match f(self, rev, &mut undo, &mut events) {
            Ok(v) => {
                if !events.is_empty() {
                    self.revision = rev;
                    self.publish(rev, events);
                }
                Ok(v)
            }
            Err(e) => {
                self.rollback(undo, rev);
                Err(e)
            }
        }
    }

    fn publish(&mut self, rev: Revision, events: Vec<Event>) {
        let mut dead = Vec::new();
        for (id, w) in &mut self.watchers {
            if w.next_rev > rev {
                continue;
            }
            let batch: Vec<Event> = events
                .iter()
                .filter(|e| wants(w, e))
                .map(|e| strip(w, e))
                .collect();
            w.next_rev = rev + 1;
            if !batch.is_empty() {
                w.last_sent = Instant::now();
            }
            if !batch.is_empty()
                && !w.tx.send(Ok(WatchBatch {
                    revision: rev,
                    events: batch,
                }))
            {
                dead.push(*id);
            }
        }
        for id in dead {
            self.watchers.remove(&id);
        }
        self.log.extend(events.into_iter().map(|e| (rev, e)));
    }

    /// Sends an empty batch at the current revision to each idle watcher that asked for
    /// progress notifications.
    fn notify_progress(&mut self, now: Instant) {
        let (revision, interval) = (self.revision, self.progress_interval);
        for w in self.watchers.values_mut() {
            if w.progress && now.duration_since(w.last_sent) >= interval {
                w.last_sent = now;
                let _ = w.tx.send(Ok(WatchBatch {
                    revision,
                    events: Vec::new(),
                }));
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        let expired: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let _ = self.revoke(id);
        }
    }

    fn revoke(&mut self, id: LeaseId) -> Result<Revision> {
        let lease = self
            .leases
            .remove(&id)
            .ok_or(DatastoreError::LeaseNotFound { id })?;
        if lease.keys.is_empty() {
            return Ok(self.revision);
        }
        self.write(|s, rev, undo, events| {
            for k in &lease.keys {
                s.delete(&DeleteRangeRequest::key(k.clone()), rev, undo, events)?;
            }
            Ok(())
        })?;
        Ok(self.revision)
    }

    fn compact(&mut self, rev: Revision) -> Result<CompactResponse> {
        if rev > self.revision {
            return Err(DatastoreError::FutureRevision {
                requested: rev,
                current: self.revision,
            });
        }
        if rev <= self.compacted {
            return Err(DatastoreError::Compacted {
                requested: rev,
                compacted: self.compacted,
            });
        }
        let mut freed = 0u64;
        self.keys.retain(|k, h| {
            let idx = h.partition_point(|e| e.rev <= rev);
            // Keep the newest entry at or below `rev` if it is a live value.
            let keep_from = match idx.checked_sub(1).and_then(|i| h.get(i)) {
                Some(e) if e.kv.is_some() => idx - 1,
                _ => idx,
            };
            for e in h.drain(..keep_from) {
                freed += entry_size(k, e.kv.as_ref().map_or(&[][..], |kv| &kv.value));
            }
            !h.is_empty()
        });
        while self.log.front().is_some_and(|(r, _)| *r <= rev) {
            self.log.pop_front();
        }
        self.db_size = self.db_size.saturating_sub(freed);
        self.compacted = rev;
        Ok(CompactResponse {
            revision: self.revision,
        })
    }
}

fn wants(w: &Watcher, e: &Event) -> bool {
    w.range.contains(&e.kv.key)
        && match e.kind {
            EventKind::Put => !w.no_put,
            EventKind::Delete => !w.no_delete,
        }
}

fn strip(w: &Watcher, e: &Event) -> Event {
    let mut e = e.clone();
    if !w.prev_kv {
        e.prev_kv = None;
    }
    e
}

struct Unregister {
    shared: Weak<Shared>,
    id: u64,
}

impl Drop for Unregister {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            lock(&shared).watchers.remove(&self.id);
        }
    }
}

#[async_trait]
impl Datastore for MemoryStore {
    async fn range(&self, req: RangeRequest) -> Result<RangeResponse> {
        self.state().range(&req)
    }

    async fn put(&self, req: PutRequest) -> Result<PutResponse> {
        let limits = self.shared.limits;
        self.state()
            .write(|s, rev, undo, ev| s.put(&req, rev, &limits, undo, ev))
    }

    async fn delete_range(&self, req: DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        let mut s = self.state();
        let mut r = s.write(|s, rev, undo, ev| s.delete(&req, rev, undo, ev))?;
        r.revision = s.revision;
        Ok(r)
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse> {
        let limits = self.shared.limits;
        limits.check_txn(&req)?;
        let mut s = self.state();
        let mut r = s.write(|s, rev, undo, ev| s.txn(&req, rev, &limits, undo, ev))?;
        r.revision = s.revision;
        Ok(r)
    }

    async fn compact(&self, revision: Revision) -> Result<CompactResponse> {
        self.state().compact(revision)
    }

    async fn import(&self, kvs: &[KeyValue], revision: Revision) -> Result<bool> {
        let quota = self.shared.limits.quota_backend_bytes;
        let size: u64 = kvs.iter().map(|kv| entry_size(&kv.key, &kv.value)).sum();
        let mut s = self.state();
        if s.db_size + size > quota {
            return Err(DatastoreError::QuotaExceeded {
                used: s.db_size,
                quota,
            });
        }
        if s.revision > 1 || !s.keys.is_empty() || revision < s.revision {
            return Err(DatastoreError::Backend {
                source: Box::new(ImportIntoUsedStore {
                    revision: s.revision,
                }),
            });
        }
        for kv in kvs {
            s.db_size += entry_size(&kv.key, &kv.value);
            if kv.lease != 0
                && let Some(l) = s.leases.get_mut(&kv.lease)
            {
                l.keys.insert(kv.key.clone());
            }
            s.keys.insert(
                kv.key.clone(),
                vec![Entry {
                    rev: kv.mod_revision,
                    kv: Some(kv.clone()),
                }],
            );
        }
        // History below the imported revision is not there: reads and watches of it say so.
        s.revision = revision;
        s.compacted = revision;
        Ok(true)
    }

    async fn watch(&self, req: WatchRequest) -> Result<WatchStream> {
        let mut s = self.state();
        let start = if req.start_revision <= 0 {
            s.revision + 1
        } else {
            req.start_revision
        };
        if start <= s.compacted {
            return Err(DatastoreError::Compacted {
                requested: start,
                compacted: s.compacted,
            });
        }
        let id = s.next_watch;
        s.next_watch += 1;
        let weak = Arc::downgrade(&self.shared);
        let resume = reopen(&req, move || {
            weak.upgrade().map(|shared| MemoryStore { shared })
        });
        let (tx, stream) = watch_channel(
            self.shared.limits.watch_buffer_bytes,
            Unregister {
                shared: Arc::downgrade(&self.shared),
                id,
            },
            Some(resume),
        );
        let mut w = Watcher {
            range: req.range,
            next_rev: start,
            prev_kv: req.prev_kv,
            no_put: req.no_put,
            no_delete: req.no_delete,
            progress: req.progress_notify,
            last_sent: Instant::now(),
            tx,
        };
        // Replay history under the same lock that registers the watcher: no gap, no
        // duplicate. A replay larger than the queue stops there; the stream reads on from
        // where it stopped once its consumer has caught up.
        let first = s.log.partition_point(|(r, _)| *r < start);
        let mut batch: Option<WatchBatch> = None;
        for (rev, e) in s.log.range(first..) {
            if batch.as_ref().is_some_and(|b| b.revision != *rev)
                && let Some(b) = batch.take()
                && !w.tx.send(Ok(b))
            {
                return Ok(stream);
            }
            if wants(&w, e) {
                batch
                    .get_or_insert_with(|| WatchBatch {
                        revision: *rev,
                        events: Vec::new(),
                    })
                    .events
                    .push(strip(&w, e));
            }
        }
        if let Some(b) = batch
            && !w.tx.send(Ok(b))
        {
            return Ok(stream);
        }
        w.next_rev = w.next_rev.max(s.revision + 1);
        s.watchers.insert(id, w);
        Ok(stream)
    }

    async fn lease_grant(&self, ttl: i64, id: LeaseId) -> Result<LeaseGrant> {
        let max = self.shared.limits.max_lease_ttl;
        if !(1..=max).contains(&ttl) {
            return Err(DatastoreError::InvalidTtl { ttl, max });
        }
        let mut s = self.state();
        let id = if id == 0 {
            while s.leases.contains_key(&s.next_lease) {
                s.next_lease += 1;
            }
            s.next_lease
        } else if s.leases.contains_key(&id) {
            return Err(DatastoreError::LeaseExists { id });
        } else {
            id
        };
        s.leases.insert(
            id,
            Lease {
                granted_ttl: ttl,
                deadline: deadline(ttl),
                keys: BTreeSet::new(),
            },
        );
        Ok(LeaseGrant { id, ttl })
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<Revision> {
        self.state().revoke(id)
    }

    async fn lease_keep_alive(&self, id: LeaseId) -> Result<i64> {
        let mut s = self.state();
        let l = s
            .leases
            .get_mut(&id)
            .ok_or(DatastoreError::LeaseNotFound { id })?;
        l.deadline = deadline(l.granted_ttl);
        Ok(l.granted_ttl)
    }

    async fn lease_time_to_live(&self, id: LeaseId, keys: bool) -> Result<LeaseInfo> {
        let s = self.state();
        let l = s
            .leases
            .get(&id)
            .ok_or(DatastoreError::LeaseNotFound { id })?;
        let left = l.deadline.saturating_duration_since(Instant::now());
        Ok(LeaseInfo {
            id,
            ttl: i64::try_from(left.as_secs_f64().ceil() as u64).unwrap_or(i64::MAX),
            granted_ttl: l.granted_ttl,
            keys: if keys {
                l.keys.iter().cloned().collect()
            } else {
                Vec::new()
            },
        })
    }

    async fn leases(&self) -> Result<Vec<LeaseId>> {
        let mut ids: Vec<LeaseId> = self.state().leases.keys().copied().collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Writes hand their events to every watch before they return.
    async fn watch_dispatched(&self) -> Option<Revision> {
        Some(lock(&self.shared).revision)
    }

    async fn status(&self) -> Result<Status> {
        let s = self.state();
        Ok(Status {
            revision: s.revision,
            compact_revision: s.compacted,
            db_size: s.db_size,
        })
    }
}
