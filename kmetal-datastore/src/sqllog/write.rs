//! The writer: batches queued writes into one transaction (one revision per write,
//! gapless, one commit per batch), evaluates etcd transactions, and isolates a failing
//! request behind a savepoint so the rest of its batch still commits.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};

use super::dialect::{Classify, LogWriter};
use super::read::{past, read_range};
use crate::error::{DatastoreError, Result};
use crate::model::{
    CompactResponse, Compare, CompareTarget, DeleteRangeRequest, DeleteRangeResponse, Event,
    KeyValue, LeaseGrant, LeaseId, PutRequest, PutResponse, RangeResponse, RequestOp, ResponseOp,
    Revision, TxnRequest, TxnResponse,
};

/// Most writes committed together.
pub(crate) const MAX_BATCH: usize = 256;

/// The `kmetal_meta` row a writer holds while applying a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    /// The current revision.
    pub(crate) revision: Revision,
    /// The compaction revision.
    pub(crate) compact: Revision,
    /// The next lease id the store hands out.
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

/// What the writer tells the watch hub at each commit: the revisions the batch moved
/// through, and their events when the writer knows them whole (a batch of guarded puts: the
/// quick path read every key's live row), so that the hub need not read them back.
#[derive(Debug, Clone, Default)]
pub(crate) struct Commit {
    /// The revision before the batch.
    pub(crate) after: Revision,
    /// The revision after it.
    pub(crate) revision: Revision,
    /// The events of `after + 1 ..= revision`, in order, when known.
    pub(crate) events: Option<Arc<Vec<(Revision, Event)>>>,
}

/// A write request to the writer.
#[derive(Debug)]
pub(crate) enum Op {
    Put(PutRequest),
    Delete(DeleteRangeRequest),
    Txn(TxnRequest),
    /// Marks the compaction revision.
    Compact(Revision),
    /// Deletes one bounded batch of rows compacted away at the revision.
    CompactRows(Revision, i64),
    LeaseGrant {
        ttl: i64,
        id: LeaseId,
    },
    LeaseRevoke(LeaseId),
    LeaseKeepAlive(LeaseId),
    /// Live keys with their revisions into an empty log, which moves to the revision.
    Import(Arc<[KeyValue]>, Revision),
}

/// The writer's answer to an [`Op`].
#[derive(Debug)]
pub(crate) enum Done {
    Put(PutResponse),
    Delete(DeleteRangeResponse),
    Txn(TxnResponse),
    Compact(CompactResponse),
    /// Rows a [`Op::CompactRows`] deleted.
    CompactedRows(u64),
    LeaseGrant(LeaseGrant),
    LeaseRevoke(Revision),
    LeaseTtl(i64),
    Imported,
}

/// A queued write and where its answer goes.
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) op: Op,
    pub(crate) reply: oneshot::Sender<Result<Done>>,
}

/// A failure while applying one write: the request's own error, or the database's.
enum Fail<E> {
    Request(DatastoreError),
    Db(E),
}

impl<E> From<DatastoreError> for Fail<E> {
    fn from(e: DatastoreError) -> Self {
        Fail::Request(e)
    }
}

impl<E: Classify> From<E> for Fail<E> {
    fn from(e: E) -> Self {
        Fail::Db(e)
    }
}

/// Serves jobs until every sender is gone, telling `committed` each new revision.
pub(crate) async fn write_loop<W: LogWriter>(
    mut w: W,
    mut rx: mpsc::Receiver<Job>,
    committed: watch::Sender<Commit>,
) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        match run_batch(&mut w, &jobs).await {
            Ok(Batch {
                results,
                start,
                revision,
                events,
            }) => {
                committed.send_if_modified(|c| {
                    let moved = revision > c.revision;
                    if moved {
                        *c = Commit {
                            after: start,
                            revision,
                            events: events.map(Arc::new),
                        };
                    }
                    moved
                });
                for (job, r) in jobs.into_iter().zip(results) {
                    let _ = job.reply.send(r);
                }
            }
            Err(e) => {
                w.rollback().await;
                // Every request of the batch gets the same cause, kept whole: when the
                // commit's outcome is unknown the class says so (unavailable), never success.
                let class = e.class();
                let cause = Arc::new(e);
                for job in jobs {
                    let _ = job.reply.send(Err(class.error(Box::new(cause.clone()))));
                }
            }
        }
        if rx.is_empty() {
            w.idle().await;
        }
    }
}

/// A committed batch: each job's answer, the revisions it moved through, and their events
/// when every write's are known.
struct Batch {
    results: Vec<Result<Done>>,
    start: Revision,
    revision: Revision,
    events: Option<Vec<(Revision, Event)>>,
}

async fn run_batch<W: LogWriter>(w: &mut W, jobs: &[Job]) -> std::result::Result<Batch, W::Error> {
    let mut meta = w.begin().await?;
    let start = meta.revision;
    let mut results = Vec::with_capacity(jobs.len());
    let mut events = Some(Vec::new());
    let mut i = 0;
    while i < jobs.len() {
        // Plain and guarded puts go to the dialect a run at a time (PostgreSQL reads their
        // keys in one statement and writes them in another).
        let run = super::quick::run_len(&jobs[i..]);
        if run > 0 {
            let (done, known) = super::quick::apply_run(w, &jobs[i..i + run], &mut meta).await?;
            results.extend(done);
            events = events.zip(known).map(|(mut all, more)| {
                all.extend(more);
                all
            });
            i += run;
            continue;
        }
        w.savepoint().await?;
        let before = meta;
        match apply(w, &jobs[i].op, &mut meta).await {
            Ok(done) => {
                w.release().await?;
                if meta.revision != before.revision {
                    events = None;
                }
                results.push(Ok(done));
            }
            Err(fail) => {
                let e = match fail {
                    Fail::Request(e) => e,
                    Fail::Db(e) if e.class() == super::dialect::ErrorClass::Unavailable => {
                        return Err(e);
                    }
                    // The database refused this request alone (a constraint, a privilege):
                    // it fails, the rest of the batch goes on.
                    Fail::Db(e) => e.into_datastore(),
                };
                w.rollback_to().await?;
                meta = before;
                results.push(Err(e));
            }
        }
        i += 1;
    }
    w.commit(&meta, start).await?;
    Ok(Batch {
        results,
        start,
        revision: meta.revision,
        events,
    })
}

async fn apply<W: LogWriter>(
    w: &mut W,
    op: &Op,
    meta: &mut Meta,
) -> std::result::Result<Done, Fail<W::Error>> {
    let rev = meta.revision + 1;
    Ok(match op {
        Op::Put(p) => {
            let prev_kv = put(w, p, rev).await?;
            meta.revision = rev;
            Done::Put(PutResponse {
                revision: rev,
                prev_kv,
            })
        }
        Op::Delete(d) => {
            let (deleted, prev_kvs) = delete(w, d, rev).await?;
            if deleted > 0 {
                meta.revision = rev;
            }
            Done::Delete(DeleteRangeResponse {
                revision: meta.revision,
                deleted,
                prev_kvs,
            })
        }
        Op::Txn(t) => {
            let mut wrote = false;
            let r = txn(w, t, *meta, &mut wrote).await?;
            if wrote {
                meta.revision = rev;
            }
            Done::Txn(TxnResponse {
                revision: meta.revision,
                ..r
            })
        }
        Op::Compact(at) => Done::Compact(meta.compact_to(*at)?),
        Op::Import(kvs, revision) => {
            if meta.revision > 1 || *revision < meta.revision {
                let used = super::LogError::ImportIntoUsedLog {
                    revision: meta.revision,
                };
                return Err(DatastoreError::Backend {
                    source: Box::new(used),
                }
                .into());
            }
            for kv in kvs.iter() {
                w.import(kv).await?;
            }
            // History below the imported revision is not there: reads of it say so.
            meta.revision = *revision;
            meta.compact = *revision;
            Done::Imported
        }
        Op::CompactRows(upto, limit) => Done::CompactedRows(w.compact_rows(*upto, *limit).await?),
        Op::LeaseGrant { ttl, id } => {
            let id = meta.lease_id(*id);
            if !w.lease_insert(id, *ttl).await? {
                return Err(DatastoreError::LeaseExists { id }.into());
            }
            Done::LeaseGrant(LeaseGrant { id, ttl: *ttl })
        }
        Op::LeaseKeepAlive(id) => match w.lease_refresh(*id).await? {
            Some(ttl) => Done::LeaseTtl(ttl),
            None => return Err(DatastoreError::LeaseNotFound { id: *id }.into()),
        },
        Op::LeaseRevoke(id) => {
            if !w.lease_delete(*id).await? {
                return Err(DatastoreError::LeaseNotFound { id: *id }.into());
            }
            let keys = w.lease_keys(*id).await?;
            for k in &keys {
                w.tombstone(k, rev).await?;
            }
            if !keys.is_empty() {
                meta.revision = rev;
            }
            Done::LeaseRevoke(meta.revision)
        }
    })
}

async fn put<W: LogWriter>(
    w: &mut W,
    p: &PutRequest,
    rev: Revision,
) -> std::result::Result<Option<KeyValue>, Fail<W::Error>> {
    if p.lease != 0 && !w.lease_exists(p.lease).await? {
        return Err(DatastoreError::LeaseNotFound { id: p.lease }.into());
    }
    Ok(w.put(rev, p).await?)
}

async fn delete<W: LogWriter>(
    w: &mut W,
    d: &DeleteRangeRequest,
    rev: Revision,
) -> std::result::Result<(i64, Vec<KeyValue>), W::Error> {
    let kvs = w.rows(&d.range, None, None, !d.prev_kv).await?;
    for kv in &kvs {
        w.tombstone(&kv.key, rev).await?;
    }
    Ok((kvs.len() as i64, if d.prev_kv { kvs } else { Vec::new() }))
}

async fn compare_ok<W: LogWriter>(w: &mut W, cmp: &Compare) -> std::result::Result<bool, W::Error> {
    if cmp.range.is_single() {
        return Ok(cmp.matches(w.live(&cmp.range.key).await?.as_ref()));
    }
    let keys_only = !matches!(cmp.target, CompareTarget::Value(_));
    let kvs = w.rows(&cmp.range, None, None, keys_only).await?;
    // An empty range passes vacuously, as in the memory driver.
    Ok(kvs.iter().all(|kv| cmp.matches(Some(kv))))
}

type TxnFuture<'a, E> =
    Pin<Box<dyn Future<Output = std::result::Result<TxnResponse, Fail<E>>> + Send + 'a>>;

/// Evaluates `t` at revision `meta.revision + 1` (boxed: transactions nest).
fn txn<'a, W: LogWriter>(
    w: &'a mut W,
    t: &'a TxnRequest,
    meta: Meta,
    wrote: &'a mut bool,
) -> TxnFuture<'a, W::Error> {
    Box::pin(async move {
        let rev = meta.revision + 1;
        let mut succeeded = true;
        for cmp in &t.compare {
            if !compare_ok(w, cmp).await? {
                succeeded = false;
                break;
            }
        }
        let ops = if succeeded { &t.success } else { &t.failure };
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            responses.push(match op {
                RequestOp::Range(r) => {
                    if r.range.key.is_empty() {
                        return Err(DatastoreError::EmptyKey.into());
                    }
                    if r.revision > meta.revision {
                        return Err(DatastoreError::FutureRevision {
                            requested: r.revision,
                            current: meta.revision,
                        }
                        .into());
                    }
                    if r.revision > 0 && r.revision < meta.compact {
                        return Err(DatastoreError::Compacted {
                            requested: r.revision,
                            compacted: meta.compact,
                        }
                        .into());
                    }
                    let page = read_range(w, r, past(r.revision, meta.revision), None).await?;
                    ResponseOp::Range(RangeResponse {
                        revision: meta.revision + i64::from(*wrote),
                        kvs: page.kvs,
                        more: page.more,
                        count: page.count,
                    })
                }
                RequestOp::Put(p) => {
                    let prev_kv = put(w, p, rev).await?;
                    *wrote = true;
                    ResponseOp::Put(PutResponse {
                        revision: rev,
                        prev_kv,
                    })
                }
                RequestOp::DeleteRange(d) => {
                    let (deleted, prev_kvs) = delete(w, d, rev).await?;
                    *wrote |= deleted > 0;
                    ResponseOp::DeleteRange(DeleteRangeResponse {
                        revision: rev,
                        deleted,
                        prev_kvs,
                    })
                }
                RequestOp::Txn(inner) => ResponseOp::Txn(txn(w, inner, meta, wrote).await?),
            });
        }
        Ok(TxnResponse {
            revision: rev,
            succeeded,
            responses,
        })
    })
}
