//! The [`Datastore`] trait every driver implements, and the [`WatchStream`] it hands out.

use async_trait::async_trait;
use tokio::sync::mpsc;

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

/// A stream of watch batches. Dropping it cancels the watch.
pub struct WatchStream {
    rx: mpsc::UnboundedReceiver<Result<WatchBatch>>,
    _cancel_on_drop: Box<dyn Send + Sync>,
}

impl std::fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchStream").finish_non_exhaustive()
    }
}

impl WatchStream {
    /// A stream fed by `rx`; `guard` is dropped with the stream (drivers unregister there).
    pub fn new(
        rx: mpsc::UnboundedReceiver<Result<WatchBatch>>,
        guard: impl Send + Sync + 'static,
    ) -> Self {
        Self {
            rx,
            _cancel_on_drop: Box::new(guard),
        }
    }

    /// The next batch; `None` when the watch ended (store dropped); an error ends it too.
    pub async fn next(&mut self) -> Option<Result<WatchBatch>> {
        self.rx.recv().await
    }

    /// The next batch if one is already waiting (never waits).
    pub fn try_next(&mut self) -> Option<Result<WatchBatch>> {
        self.rx.try_recv().ok()
    }
}
