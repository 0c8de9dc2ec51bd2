//! Live migration of a tenant between any two drivers (etcd ↔ PostgreSQL ↔ memory, …).
//!
//! The tenant is served through a [`MigratableStore`]. [`migrate`] freezes its writes (new
//! writes wait; reads, watches and keep-alives go on), copies leases and keys to the target,
//! verifies key count and content hash, switches the store over to the target, and unfreezes.
//! If anything fails before the switch, the store still serves the untouched source.
//!
//! Into a target that imports ([`Datastore::import`]: the SQL stores, memory) every key keeps
//! its create/mod revision and version and the target continues at the source's revision, so
//! clients see the same resourceVersions; watches opened before the switch move to the
//! target and go on from the next revision, without a gap or a duplicate. Into one that
//! chooses its own revisions (etcd) those watches end with etcd's compacted error, so
//! clients relist; the report says which happened.
//!
//! ```
//! # block_on(async {
//! use std::sync::Arc;
//! use kmetal_datastore::{Datastore, MemoryStore};
//! use kmetal_datastore::migrate::{MigratableStore, migrate};
//! use kmetal_datastore::model::{PutRequest, RangeRequest};
//! let store = MigratableStore::new(Arc::new(MemoryStore::new()));
//! store.put(PutRequest::new("/k", "v")).await.unwrap();
//! let report = migrate(&store, Arc::new(MemoryStore::new()), |_| {}).await.unwrap();
//! assert_eq!(report.keys, 1);
//! assert_eq!(store.range(RangeRequest::get("/k")).await.unwrap().count, 1);
//! # });
//! # fn block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(f)
//! # }
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{RwLock, watch};

use crate::backup::{all_keys, content_hash, copy_keys};
use crate::error::{DatastoreError, Result};
use crate::model::{
    CompactResponse, DeleteRangeRequest, DeleteRangeResponse, KeyValue, LeaseGrant, LeaseId,
    LeaseInfo, Limits, PutRequest, PutResponse, RangeRequest, RangeResponse, Revision, Status,
    TxnRequest, TxnResponse, WatchRequest,
};
use crate::store::{Datastore, WatchSender, WatchStream, watch_channel};

/// A write waited longer than the freeze allows.
#[derive(Debug, Clone, thiserror::Error)]
#[error("writes are frozen for a migration and did not resume within {waited:?}")]
pub struct Frozen {
    /// How long the write waited.
    pub waited: Duration,
}

/// A store whose backend can be switched by a migration.
pub struct MigratableStore {
    backend: RwLock<Arc<dyn Datastore>>,
    /// Writes hold it shared; a migration holds it exclusively.
    gate: RwLock<()>,
    freeze_timeout: Duration,
    /// The last switch, for the watches opened before it.
    switched: watch::Sender<Option<Switch>>,
}

/// A switch from one backend to another, as the watches see it.
#[derive(Clone)]
struct Switch {
    target: Arc<dyn Datastore>,
    /// The source's revision when writes froze: every event up to it came from the source.
    revision: Revision,
    /// Whether the target continues the source's revisions.
    continuous: bool,
}

impl std::fmt::Debug for MigratableStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigratableStore").finish_non_exhaustive()
    }
}

impl MigratableStore {
    /// Serves `backend`; writes wait up to 30 s for a migration to finish.
    pub fn new(backend: Arc<dyn Datastore>) -> Self {
        Self::with_freeze_timeout(backend, Duration::from_secs(30))
    }

    /// Serves `backend`; writes wait up to `freeze_timeout` during a migration, then fail
    /// with `Unavailable` (caused by [`Frozen`]).
    pub fn with_freeze_timeout(backend: Arc<dyn Datastore>, freeze_timeout: Duration) -> Self {
        Self {
            backend: RwLock::new(backend),
            gate: RwLock::new(()),
            freeze_timeout,
            switched: watch::channel(None).0,
        }
    }

    /// The backend currently served.
    pub async fn backend(&self) -> Arc<dyn Datastore> {
        self.backend.read().await.clone()
    }

    async fn write_gate(&self) -> Result<tokio::sync::RwLockReadGuard<'_, ()>> {
        tokio::time::timeout(self.freeze_timeout, self.gate.read())
            .await
            .map_err(|_| {
                DatastoreError::unavailable(Frozen {
                    waited: self.freeze_timeout,
                })
            })
    }
}

#[async_trait]
impl Datastore for MigratableStore {
    async fn range(&self, req: RangeRequest) -> Result<RangeResponse> {
        self.backend().await.range(req).await
    }
    async fn put(&self, req: PutRequest) -> Result<PutResponse> {
        let _open = self.write_gate().await?;
        self.backend().await.put(req).await
    }
    async fn delete_range(&self, req: DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        let _open = self.write_gate().await?;
        self.backend().await.delete_range(req).await
    }
    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse> {
        let _open = self.write_gate().await?;
        self.backend().await.txn(req).await
    }
    async fn compact(&self, revision: Revision) -> Result<CompactResponse> {
        let _open = self.write_gate().await?;
        self.backend().await.compact(revision).await
    }
    async fn watch(&self, req: WatchRequest) -> Result<WatchStream> {
        // Subscribed before the backend is read: a switch in between is seen, not missed.
        let mut switches = self.switched.subscribe();
        switches.mark_unchanged();
        let backend = self.backend().await;
        let inner = backend.watch(req.clone()).await?;
        // The inner stream catches up by itself when it falls behind; this queue waits for
        // its consumer, and the task ends once the stream is gone.
        let (tx, stream) = watch_channel(Limits::default().watch_buffer_bytes, (), None);
        tokio::spawn(follow(inner, backend, req, switches, tx));
        Ok(stream)
    }
    async fn lease_grant(&self, ttl: i64, id: LeaseId) -> Result<LeaseGrant> {
        let _open = self.write_gate().await?;
        self.backend().await.lease_grant(ttl, id).await
    }
    async fn lease_revoke(&self, id: LeaseId) -> Result<Revision> {
        let _open = self.write_gate().await?;
        self.backend().await.lease_revoke(id).await
    }
    async fn lease_keep_alive(&self, id: LeaseId) -> Result<i64> {
        self.backend().await.lease_keep_alive(id).await
    }
    async fn lease_time_to_live(&self, id: LeaseId, keys: bool) -> Result<LeaseInfo> {
        self.backend().await.lease_time_to_live(id, keys).await
    }
    async fn leases(&self) -> Result<Vec<LeaseId>> {
        self.backend().await.leases().await
    }
    async fn watch_dispatched(&self) -> Option<Revision> {
        self.backend().await.watch_dispatched().await
    }
    async fn status(&self) -> Result<Status> {
        self.backend().await.status().await
    }
    async fn import(&self, kvs: &[KeyValue], revision: Revision) -> Result<bool> {
        let _open = self.write_gate().await?;
        self.backend().await.import(kvs, revision).await
    }
}

/// Forwards one watch from the backend it was opened on, and across every switch: drains
/// what the old backend had for it up to the switch, then goes on from the target at the
/// next revision, or ends with etcd's compacted error when the target's revisions differ.
async fn follow(
    mut stream: WatchStream,
    mut on: Arc<dyn Datastore>,
    req: WatchRequest,
    mut switches: watch::Receiver<Option<Switch>>,
    tx: WatchSender,
) {
    let mut open = true;
    loop {
        tokio::select! {
            () = tx.closed() => return,
            batch = stream.next(), if open => match batch {
                Some(Ok(batch)) => {
                    if !tx.send_wait(Ok(batch)).await {
                        return;
                    }
                }
                Some(Err(e)) => {
                    let _ = tx.send(Err(e));
                    return;
                }
                // The old backend went away; the switch that replaced it comes next.
                None => open = false,
            },
            changed = switches.changed() => {
                if changed.is_err() {
                    return;
                }
                let Some(switch) = switches.borrow_and_update().clone() else {
                    continue;
                };
                if same(&on, &switch.target) {
                    // Opened on the target already (the switch came as it was opened).
                    continue;
                }
                if open {
                    drain(&mut stream, on.as_ref(), switch.revision, &tx).await;
                }
                if !switch.continuous {
                    let current = switch.target.status().await.map_or(0, |s| s.revision);
                    let _ = tx.send(Err(DatastoreError::Compacted {
                        requested: switch.revision + 1,
                        compacted: current,
                    }));
                    return;
                }
                let mut next = req.clone();
                next.start_revision = req.start_revision.max(switch.revision + 1);
                match switch.target.watch(next).await {
                    Ok(s) => {
                        stream = s;
                        on = switch.target;
                        open = true;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            }
        }
    }
}

/// Whether two handles are the same store.
fn same(a: &Arc<dyn Datastore>, b: &Arc<dyn Datastore>) -> bool {
    std::ptr::eq(Arc::as_ptr(a).cast::<()>(), Arc::as_ptr(b).cast::<()>())
}

/// Forwards what the old backend holds for this watch up to `revision` (the switch's).
async fn drain(
    stream: &mut WatchStream,
    source: &dyn Datastore,
    revision: Revision,
    tx: &WatchSender,
) {
    // Everything up to the switch has been handed to the watches once the source says so
    // (writes are frozen, so it gets there); a source that cannot tell gets a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match source.watch_dispatched().await {
            Some(r) if r >= revision => break,
            None => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                break;
            }
            _ if Instant::now() > deadline => break,
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    loop {
        // What is queued, then, for a watch that fell behind, the rest read back from the
        // source (frozen at the switch, so the read-back ends there).
        let batch = match stream.try_next() {
            Some(b) => b,
            None if stream.is_behind() => match stream.next().await {
                Some(b) => b,
                None => return,
            },
            None => return,
        };
        let end = batch.is_err();
        if !tx.send_wait(batch).await || end {
            return;
        }
    }
}

/// Where a migration is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Progress {
    /// Writes are frozen (in-flight writes have finished).
    Frozen,
    /// Keys copied so far of the total.
    Copying {
        /// Copied.
        done: u64,
        /// Total.
        total: u64,
    },
    /// Comparing key count and content hash.
    Verifying,
    /// The store now serves the target.
    SwitchedOver,
}

/// Why a migration failed; the source is untouched and still served in every case.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrationError {
    /// The target already holds keys.
    #[error("the target store is not empty ({keys} keys)")]
    TargetNotEmpty {
        /// Keys found.
        keys: i64,
    },
    /// Reading the source failed.
    #[error("reading the source failed")]
    Source(#[source] DatastoreError),
    /// Writing the target failed.
    #[error("writing the target failed after {copied} keys")]
    Target {
        /// Keys written before the failure.
        copied: u64,
        /// The target's error.
        #[source]
        source: DatastoreError,
    },
    /// The copy does not match.
    #[error(
        "verification failed: source {source_keys} keys ({source_hash}), target {target_keys} keys ({target_hash})"
    )]
    Mismatch {
        /// Keys in the source.
        source_keys: u64,
        /// Keys in the target.
        target_keys: u64,
        /// Source content hash.
        source_hash: String,
        /// Target content hash.
        target_hash: String,
    },
}

/// What a migration did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// Keys copied.
    pub keys: u64,
    /// Leases copied.
    pub leases: u64,
    /// The content hash both sides agreed on.
    pub content_hash: String,
    /// How long writes were frozen.
    pub frozen_for: Duration,
    /// Whether the target kept every revision (open watches went on from it) or chose its
    /// own (open watches ended with the compacted error; clients relist).
    pub revisions_kept: bool,
}

/// Migrates `store` to `target` (which must be empty) and switches it over.
pub async fn migrate(
    store: &MigratableStore,
    target: Arc<dyn Datastore>,
    mut progress: impl FnMut(Progress),
) -> std::result::Result<MigrationReport, MigrationError> {
    let existing = target
        .range(RangeRequest::prefix(bytes::Bytes::new()).count_only())
        .await
        .map_err(|source| MigrationError::Target { copied: 0, source })?
        .count;
    if existing > 0 {
        return Err(MigrationError::TargetNotEmpty { keys: existing });
    }
    // Exclusive: waits for in-flight writes, then holds new ones back.
    let freeze = store.gate.write().await;
    let frozen_at = Instant::now();
    progress(Progress::Frozen);
    let source = store.backend().await;
    let mut kvs: Vec<KeyValue> = Vec::new();
    all_keys(source.as_ref(), 0, |kv| kvs.push(kv.clone()))
        .await
        .map_err(MigrationError::Source)?;
    let mut leases = 0u64;
    for id in source.leases().await.map_err(MigrationError::Source)? {
        let info = match source.lease_time_to_live(id, false).await {
            Ok(i) => i,
            Err(DatastoreError::LeaseNotFound { .. }) => continue,
            Err(e) => return Err(MigrationError::Source(e)),
        };
        target
            .lease_grant(info.ttl.max(1), id)
            .await
            .map_err(|source| MigrationError::Target { copied: 0, source })?;
        leases += 1;
    }
    let total = kvs.len() as u64;
    let revision = source
        .range(RangeRequest::prefix(bytes::Bytes::new()).count_only())
        .await
        .map_err(MigrationError::Source)?
        .revision;
    let mut copied = 0u64;
    let revisions_kept = target
        .import(&kvs, revision)
        .await
        .map_err(|source| MigrationError::Target { copied: 0, source })?;
    if revisions_kept {
        copied = total;
        progress(Progress::Copying {
            done: copied,
            total,
        });
    } else {
        copy_keys(target.as_ref(), &kvs, |done| {
            copied = done as u64;
            progress(Progress::Copying {
                done: copied,
                total,
            });
        })
        .await
        .map_err(|source| MigrationError::Target { copied, source })?;
    }
    progress(Progress::Verifying);
    let (source_keys, source_hash) = content_hash(source.as_ref(), 0)
        .await
        .map_err(MigrationError::Source)?;
    let (target_keys, target_hash) = content_hash(target.as_ref(), 0)
        .await
        .map_err(|source| MigrationError::Target { copied, source })?;
    if (source_keys, &source_hash) != (target_keys, &target_hash) {
        return Err(MigrationError::Mismatch {
            source_keys,
            target_keys,
            source_hash,
            target_hash,
        });
    }
    *store.backend.write().await = target.clone();
    drop(source);
    store.switched.send_replace(Some(Switch {
        target,
        revision,
        continuous: revisions_kept,
    }));
    progress(Progress::SwitchedOver);
    let frozen_for = frozen_at.elapsed();
    drop(freeze);
    Ok(MigrationReport {
        keys: source_keys,
        leases,
        content_hash: source_hash,
        frozen_for,
        revisions_kept,
    })
}
