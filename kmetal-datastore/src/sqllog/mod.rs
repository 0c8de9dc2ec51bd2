//! The SQL revision log, written once for every SQL database (kine's `logstructured/sqllog`
//! is the model); PostgreSQL and SQLite supply only a dialect.
//!
//! # Layout
//! - [`dialect`]: what a database brings (read snapshot, write transaction, store-level
//!   reads, change feed) and the one error classification every error passes through.
//! - [`write`]: the writer: batching, etcd transaction evaluation, savepoints per request,
//!   leases and compaction as writes.
//! - [`read`]: ranges with their counts, the paginated-list count cache, events from rows.
//! - [`hub`]: watch fan-out: replay and live delivery in one task, progress notifications.
//! - this file: [`LogOptions`] (public: the settings both SQL stores share), `SqlLog` (the
//!   [`Datastore`] over a dialect), its lease sweeper and automatic compaction.
//!
//! The memory driver keeps its own watcher: it delivers inside its write lock with no reads
//! at all, and as the reference model the conformance suite checks every driver against, it
//! must not share the code it is meant to catch out.

pub(crate) mod dialect;
pub(crate) mod hub;
pub(crate) mod quick;
pub(crate) mod read;
pub(crate) mod write;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, watch};

use self::dialect::{Dialect, LogFeed, LogWriter, NextExpiry, RangeOutcome, fault};
use self::hub::{Dispatched, HubMsg, ProgressClock, Unregister, Watcher, next_watch_id};
use self::write::{Done, Job, Op};
use crate::error::{DatastoreError, Result};
use crate::model::{
    CompactResponse, DeleteRangeRequest, DeleteRangeResponse, KeyValue, LeaseGrant, LeaseId,
    LeaseInfo, Limits, PutRequest, PutResponse, RangeRequest, RangeResponse, Revision, Status,
    TxnRequest, TxnResponse, WatchRequest,
};
use crate::store::{Datastore, WatchStream, reopen, watch_channel};

/// What went wrong inside the log itself (the cause of an `Unavailable` or `Backend`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum LogError {
    /// The writer is gone (its thread or task ended).
    #[error("the writer has stopped")]
    WriterStopped,
    /// The writer did not answer within the request timeout.
    #[error("the write did not finish within {0:?}")]
    Timeout(Duration),
    /// The watch hub is gone.
    #[error("the watch hub has stopped")]
    HubStopped,
    /// The writer answered a request with another request's kind of answer.
    #[error("the writer answered with the wrong kind")]
    WrongAnswer,
    /// The database was written by a newer kmetal.
    #[error("database schema version {found} is newer than this kmetal ({supported})")]
    NewerSchema {
        /// The database's version.
        found: i64,
        /// The newest this code reads.
        supported: i64,
    },
    /// The writer thread could not be started.
    #[error("cannot start the writer thread")]
    Thread(#[source] std::io::Error),
    /// An import was asked of a log that already has writes.
    #[error("cannot import into a log that is already at revision {revision}")]
    ImportIntoUsedLog {
        /// Its revision.
        revision: Revision,
    },
}

/// What every SQL store ([`SqliteStore`](crate::sqlite::SqliteStore),
/// [`PgStore`](crate::postgres::PgStore)) does the same way: its deadlines, limits, lease
/// sweep, compaction and watch progress.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Deadline of every request.
    pub request_timeout: Duration,
    /// etcd's limits.
    pub limits: Limits,
    /// How often expired leases are looked for.
    pub lease_sweep: Duration,
    /// Rows deleted per compaction batch (each batch is one write, between other writes).
    pub compaction_batch: i64,
    /// Compact automatically: every `.0`, keep the last `.1` revisions (kube-apiserver's
    /// compactor does the same every 5 minutes through the gateway; this covers clients that
    /// never compact).
    pub auto_compact: Option<(Duration, i64)>,
    /// How long a watch that asked for progress notifications may stay idle before it gets
    /// one (etcd's `--watch-progress-notify-interval`, 10 minutes by default).
    pub progress_interval: Duration,
}

impl Default for LogOptions {
    /// 5 s requests, etcd's limits, a sweep every 500 ms, 1,000 rows per compaction batch,
    /// no automatic compaction, etcd's progress interval.
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(5),
            limits: Limits::default(),
            lease_sweep: Duration::from_millis(500),
            compaction_batch: 1000,
            auto_compact: None,
            progress_interval: crate::model::DEFAULT_PROGRESS_INTERVAL,
        }
    }
}

/// Refuses a database whose schema is newer than `supported`.
pub(crate) fn check_schema(found: i64, supported: i64) -> Result<()> {
    if found > supported {
        let source = Box::new(LogError::NewerSchema { found, supported });
        return Err(DatastoreError::Backend { source });
    }
    Ok(())
}

/// Where the writer runs.
pub(crate) enum WriterHome {
    /// A tokio task (a database reached over the network).
    Task,
    /// A thread of its own with this name, for a database whose calls block (SQLite).
    Thread(&'static str),
}

/// A [`Datastore`] over a dialect: the writer, the watch hub and the lease sweeper.
pub(crate) struct SqlLog<D: Dialect> {
    shared: Arc<Shared<D>>,
}

impl<D: Dialect> Clone for SqlLog<D> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

struct Shared<D> {
    db: Arc<D>,
    cfg: LogOptions,
    writer: mpsc::Sender<Job>,
    hub: mpsc::UnboundedSender<HubMsg>,
    dispatched: Dispatched,
    counts: read::Counts,
    tasks: Vec<tokio::task::AbortHandle>,
    /// Tells a sweeper that waits for grants (see `sweeper`) that one happened.
    granted: Option<Arc<tokio::sync::Notify>>,
}

impl<D> Drop for Shared<D> {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl<D: Dialect> SqlLog<D> {
    /// Starts the writer (at `home`), the hub over `feed` and the lease sweeper; `start` is
    /// the revision the database is at.
    pub(crate) fn start<W, F>(
        db: D,
        writer: W,
        feed: F,
        start: Revision,
        home: WriterHome,
        cfg: LogOptions,
    ) -> Result<Self>
    where
        W: LogWriter + 'static,
        F: LogFeed,
    {
        let db = Arc::new(db);
        let (wtx, wrx) = mpsc::channel(4096);
        let (committed_tx, committed_rx) = watch::channel(write::Commit {
            after: start,
            revision: start,
            events: None,
        });
        let mut tasks = Vec::new();
        let writing = write::write_loop(writer, wrx, committed_tx);
        match home {
            WriterHome::Task => tasks.push(tokio::spawn(writing).abort_handle()),
            WriterHome::Thread(name) => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .map_err(|e| DatastoreError::unavailable(LogError::Thread(e)))?;
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn(move || rt.block_on(writing))
                    .map_err(|e| DatastoreError::unavailable(LogError::Thread(e)))?;
            }
        }
        let (htx, hrx) = mpsc::unbounded_channel();
        let dispatched = Dispatched::default();
        let progress = ProgressClock::new(cfg.progress_interval);
        let granted = (!feed.remote_writers()).then(|| Arc::new(tokio::sync::Notify::new()));
        tasks.push(
            tokio::spawn(hub::hub(
                feed,
                hrx,
                committed_rx,
                progress,
                dispatched.clone(),
            ))
            .abort_handle(),
        );
        let sweeping = sweeper(db.clone(), wtx.clone(), cfg.lease_sweep, granted.clone());
        tasks.push(tokio::spawn(sweeping).abort_handle());
        let auto = cfg.auto_compact;
        let log = Self {
            shared: Arc::new(Shared {
                db,
                cfg,
                writer: wtx,
                hub: htx,
                dispatched,
                counts: read::Counts::default(),
                tasks,
                granted,
            }),
        };
        if let Some((every, keep)) = auto {
            let weak = Arc::downgrade(&log.shared);
            spawn_auto_compaction(every, keep, move || {
                weak.upgrade()
                    .map(|shared| Arc::new(SqlLog { shared }) as Arc<dyn Datastore>)
            });
        }
        Ok(log)
    }

    /// The dialect.
    pub(crate) fn db(&self) -> &D {
        &self.shared.db
    }

    async fn write<T>(&self, op: Op, pick: fn(Done) -> Option<T>) -> Result<T> {
        let done = send(&self.shared.writer, op, self.shared.cfg.request_timeout).await?;
        pick(done).ok_or_else(|| DatastoreError::Backend {
            source: Box::new(LogError::WrongAnswer),
        })
    }
}

/// Queues `op` for the writer and waits for its answer, at most `deadline`.
async fn send(writer: &mpsc::Sender<Job>, op: Op, deadline: Duration) -> Result<Done> {
    let (reply, rx) = oneshot::channel();
    let stopped = || DatastoreError::unavailable(LogError::WriterStopped);
    tokio::time::timeout(deadline, async {
        writer
            .send(Job { op, reply })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    })
    .await
    .map_err(|_| DatastoreError::unavailable(LogError::Timeout(deadline)))?
}

/// Revokes expired leases every `every`, through the writer (as another process's sweeper
/// may too: a lease already gone is fine).
/// Revokes expired leases, looking every `every`; with `granted` (the store is its log's
/// only writer, so every lease is granted through it) it looks only when the next lease is
/// due or a new one was granted, so an idle store with no leases touches the database never.
async fn sweeper<D: Dialect>(
    db: Arc<D>,
    writer: mpsc::Sender<Job>,
    every: Duration,
    granted: Option<Arc<tokio::sync::Notify>>,
) {
    // After a failed look, wait longer each time (up to a minute): stores sharing a full
    // server must not keep it full by asking again in step.
    let mut backoff = every;
    loop {
        let looked = match &granted {
            None => db
                .expired_leases(100)
                .await
                .map(|e| (e, NextExpiry::Unknown)),
            Some(_) => db.lease_sweep(100).await,
        };
        let next = match looked {
            Ok((expired, next)) => {
                backoff = every;
                for id in expired {
                    let _ = send(
                        &writer,
                        Op::LeaseRevoke(id),
                        every.max(Duration::from_secs(5)),
                    )
                    .await;
                    if writer.is_closed() {
                        return;
                    }
                }
                next
            }
            Err(_) => {
                backoff = (backoff * 2).min(Duration::from_secs(60));
                NextExpiry::In(backoff)
            }
        };
        let Some(granted) = &granted else {
            tokio::time::sleep(every).await;
            continue;
        };
        let wait = match next {
            NextExpiry::NoLeases => None,
            NextExpiry::In(d) => Some(d.max(every)),
            NextExpiry::Unknown => Some(every),
        };
        match wait {
            Some(d) => {
                tokio::select! {
                    () = tokio::time::sleep(d) => {}
                    () = granted.notified() => {}
                }
            }
            None => granted.notified().await,
        }
    }
}

/// Compacts `store()` every `every`, keeping the last `keep` revisions, until `store()` is
/// gone (the closure holds a weak handle, so dropping the store ends the task).
pub(crate) fn spawn_auto_compaction(
    every: Duration,
    keep: Revision,
    store: impl Fn() -> Option<Arc<dyn Datastore>> + Send + 'static,
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

#[async_trait]
impl<D: Dialect> Datastore for SqlLog<D> {
    async fn range(&self, req: RangeRequest) -> Result<RangeResponse> {
        if req.range.key.is_empty() {
            return Err(DatastoreError::EmptyKey);
        }
        let requested = req.revision;
        let counts = self.shared.counts.clone();
        match self.shared.db.range(req, counts).await.map_err(fault)? {
            RangeOutcome::Rows { current, page } => Ok(RangeResponse {
                revision: current,
                kvs: page.kvs,
                more: page.more,
                count: page.count,
            }),
            RangeOutcome::OutOfBounds { current, .. } if requested > current => {
                Err(DatastoreError::FutureRevision { requested, current })
            }
            RangeOutcome::OutOfBounds { compacted, .. } => Err(DatastoreError::Compacted {
                requested,
                compacted,
            }),
        }
    }

    async fn put(&self, req: PutRequest) -> Result<PutResponse> {
        self.shared.cfg.limits.check_put(&req)?;
        self.write(Op::Put(req), |d| match d {
            Done::Put(r) => Some(r),
            _ => None,
        })
        .await
    }

    async fn delete_range(&self, req: DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        if req.range.key.is_empty() {
            return Err(DatastoreError::EmptyKey);
        }
        self.write(Op::Delete(req), |d| match d {
            Done::Delete(r) => Some(r),
            _ => None,
        })
        .await
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse> {
        self.shared.cfg.limits.check_txn(&req)?;
        self.write(Op::Txn(req), |d| match d {
            Done::Txn(r) => Some(r),
            _ => None,
        })
        .await
    }

    async fn import(&self, kvs: &[KeyValue], revision: Revision) -> Result<bool> {
        self.write(Op::Import(kvs.into(), revision), |d| match d {
            Done::Imported => Some(()),
            _ => None,
        })
        .await?;
        Ok(true)
    }

    async fn compact(&self, revision: Revision) -> Result<CompactResponse> {
        let r = self
            .write(Op::Compact(revision), |d| match d {
                Done::Compact(r) => Some(r),
                _ => None,
            })
            .await?;
        // Bounded batches through the writer, so other writes interleave.
        let batch = self.shared.cfg.compaction_batch;
        while self
            .write(Op::CompactRows(revision, batch), |d| match d {
                Done::CompactedRows(n) => Some(n),
                _ => None,
            })
            .await?
            > 0
        {}
        Ok(r)
    }

    async fn watch(&self, req: WatchRequest) -> Result<WatchStream> {
        if req.range.key.is_empty() {
            return Err(DatastoreError::EmptyKey);
        }
        let (current, compacted) = self.shared.db.meta().await.map_err(fault)?;
        let next = if req.start_revision > 0 {
            req.start_revision
        } else {
            current + 1
        };
        if next <= compacted {
            return Err(DatastoreError::Compacted {
                requested: next,
                compacted,
            });
        }
        let id = next_watch_id();
        let hub = self.shared.hub.clone();
        let weak = Arc::downgrade(&self.shared);
        let resume = reopen(&req, move || weak.upgrade().map(|shared| SqlLog { shared }));
        let (tx, stream) = watch_channel(
            self.shared.cfg.limits.watch_buffer_bytes,
            Unregister { hub, id },
            Some(resume),
        );
        let w = Watcher {
            range: req.range,
            next,
            prev_kv: req.prev_kv,
            no_put: req.no_put,
            no_delete: req.no_delete,
            progress: req.progress_notify,
            tx,
        };
        let stopped = || DatastoreError::unavailable(LogError::HubStopped);
        let (registered, ack) = oneshot::channel();
        self.shared
            .hub
            .send(HubMsg::Add(id, w, registered))
            .map_err(|_| stopped())?;
        // Returned only once registered: a progress answer the caller asks for next covers
        // this watch too (see `Datastore::watch_dispatched`).
        let deadline = self.shared.cfg.request_timeout;
        match tokio::time::timeout(deadline, ack).await {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(_)) => Err(stopped()),
            Err(_) => Err(DatastoreError::unavailable(LogError::Timeout(deadline))),
        }
    }

    async fn lease_grant(&self, ttl: i64, id: LeaseId) -> Result<LeaseGrant> {
        let max = self.shared.cfg.limits.max_lease_ttl;
        if !(1..=max).contains(&ttl) {
            return Err(DatastoreError::InvalidTtl { ttl, max });
        }
        let g = self
            .write(Op::LeaseGrant { ttl, id }, |d| match d {
                Done::LeaseGrant(g) => Some(g),
                _ => None,
            })
            .await?;
        if let Some(n) = &self.shared.granted {
            n.notify_one();
        }
        Ok(g)
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<Revision> {
        self.write(Op::LeaseRevoke(id), |d| match d {
            Done::LeaseRevoke(r) => Some(r),
            _ => None,
        })
        .await
    }

    async fn lease_keep_alive(&self, id: LeaseId) -> Result<i64> {
        self.write(Op::LeaseKeepAlive(id), |d| match d {
            Done::LeaseTtl(t) => Some(t),
            _ => None,
        })
        .await
    }

    async fn lease_time_to_live(&self, id: LeaseId, keys: bool) -> Result<LeaseInfo> {
        let row = self.shared.db.lease(id, keys).await.map_err(fault)?;
        let row = row.ok_or(DatastoreError::LeaseNotFound { id })?;
        Ok(LeaseInfo {
            id,
            ttl: row.left,
            granted_ttl: row.granted,
            keys: row.keys,
        })
    }

    async fn leases(&self) -> Result<Vec<LeaseId>> {
        self.shared.db.leases().await.map_err(fault)
    }

    async fn status(&self) -> Result<Status> {
        let (revision, compact_revision) = self.shared.db.meta().await.map_err(fault)?;
        let db_size = self.shared.db.size().await.map_err(fault)?;
        Ok(Status {
            revision,
            compact_revision,
            db_size,
        })
    }

    async fn watch_dispatched(&self) -> Option<Revision> {
        Some(self.shared.dispatched.get())
    }
}

/// Implements [`Datastore`] for a public store type that wraps a [`SqlLog`] in field
/// `log`.
macro_rules! delegate_datastore {
    ($store:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::Datastore for $store {
            async fn range(
                &self,
                req: $crate::model::RangeRequest,
            ) -> $crate::Result<$crate::model::RangeResponse> {
                self.log.range(req).await
            }
            async fn put(
                &self,
                req: $crate::model::PutRequest,
            ) -> $crate::Result<$crate::model::PutResponse> {
                self.log.put(req).await
            }
            async fn delete_range(
                &self,
                req: $crate::model::DeleteRangeRequest,
            ) -> $crate::Result<$crate::model::DeleteRangeResponse> {
                self.log.delete_range(req).await
            }
            async fn txn(
                &self,
                req: $crate::model::TxnRequest,
            ) -> $crate::Result<$crate::model::TxnResponse> {
                self.log.txn(req).await
            }
            async fn compact(
                &self,
                revision: $crate::model::Revision,
            ) -> $crate::Result<$crate::model::CompactResponse> {
                self.log.compact(revision).await
            }
            async fn watch(
                &self,
                req: $crate::model::WatchRequest,
            ) -> $crate::Result<$crate::store::WatchStream> {
                self.log.watch(req).await
            }
            async fn lease_grant(
                &self,
                ttl: i64,
                id: $crate::model::LeaseId,
            ) -> $crate::Result<$crate::model::LeaseGrant> {
                self.log.lease_grant(ttl, id).await
            }
            async fn lease_revoke(
                &self,
                id: $crate::model::LeaseId,
            ) -> $crate::Result<$crate::model::Revision> {
                self.log.lease_revoke(id).await
            }
            async fn lease_keep_alive(&self, id: $crate::model::LeaseId) -> $crate::Result<i64> {
                self.log.lease_keep_alive(id).await
            }
            async fn lease_time_to_live(
                &self,
                id: $crate::model::LeaseId,
                keys: bool,
            ) -> $crate::Result<$crate::model::LeaseInfo> {
                self.log.lease_time_to_live(id, keys).await
            }
            async fn leases(&self) -> $crate::Result<Vec<$crate::model::LeaseId>> {
                self.log.leases().await
            }
            async fn status(&self) -> $crate::Result<$crate::model::Status> {
                self.log.status().await
            }
            async fn watch_dispatched(&self) -> Option<$crate::model::Revision> {
                self.log.watch_dispatched().await
            }
            async fn import(
                &self,
                kvs: &[$crate::model::KeyValue],
                revision: $crate::model::Revision,
            ) -> $crate::Result<bool> {
                self.log.import(kvs, revision).await
            }
        }
    };
}
pub(crate) use delegate_datastore;
