//! What a database brings to the shared log: a read snapshot ([`LogRead`]), a write
//! transaction ([`LogWriter`]), store-level reads ([`Dialect`]), the change feed of other
//! processes ([`LogFeed`]), and one error classification ([`Classify`]) every error passes
//! through.
//!
//! The SQLite dialect implements these with synchronous calls inside `async fn`s (its
//! connections live on blocking threads); PostgreSQL's await the server.

use async_trait::async_trait;
use bytes::Bytes;

use super::write::Meta;
use crate::error::{Cause, DatastoreError};
use crate::model::{Event, KeyRange, KeyValue, LeaseId, PutRequest, RangeRequest, Revision};

/// The kind a database error becomes, so a client can tell "retry" from "fix something".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorClass {
    /// Credentials or privileges: retrying will not help, other credentials will.
    PermissionDenied,
    /// The database cannot serve now (connection lost, shutdown, overload, busy): retry.
    Unavailable,
    /// Anything else (a constraint, a missing database, bad settings): retrying will not help.
    Backend,
}

impl ErrorClass {
    /// The datastore error of this kind with `cause` as its source.
    pub(crate) fn error(self, cause: Cause) -> DatastoreError {
        match self {
            Self::PermissionDenied => DatastoreError::PermissionDenied {
                source: Some(cause),
            },
            Self::Unavailable => DatastoreError::Unavailable { source: cause },
            Self::Backend => DatastoreError::Backend { source: cause },
        }
    }
}

/// A dialect's error type, sorted once into the kind a client acts on.
pub(crate) trait Classify: std::error::Error + Send + Sync + Sized + 'static {
    /// The kind of this error.
    fn class(&self) -> ErrorClass;

    /// This error as a datastore error of its kind, kept whole as the source.
    fn into_datastore(self) -> DatastoreError {
        self.class().error(Box::new(self))
    }
}

/// A datastore error from a dialect's error (for `map_err`).
pub(crate) fn fault<E: Classify>(e: E) -> DatastoreError {
    e.into_datastore()
}

/// One page of a range and the range's size.
#[derive(Debug, Default)]
pub(crate) struct Page {
    /// The keys, in key order.
    pub(crate) kvs: Vec<KeyValue>,
    /// Whether keys beyond the limit exist.
    pub(crate) more: bool,
    /// Live keys in the whole range.
    pub(crate) count: i64,
}

/// Reads inside one snapshot (a read transaction, or the writer's transaction).
#[async_trait]
pub(crate) trait LogRead: Send {
    /// The dialect's error.
    type Error: Classify;

    /// The current and the compaction revision, as this snapshot sees them.
    async fn meta(&mut self) -> Result<(Revision, Revision), Self::Error>;

    /// Live keys of `range` in key order at revision `at` (`None`: the current one), at most
    /// `limit` of them (`None`: all); values left empty when `keys_only`.
    async fn rows(
        &mut self,
        range: &KeyRange,
        at: Option<Revision>,
        limit: Option<i64>,
        keys_only: bool,
    ) -> Result<Vec<KeyValue>, Self::Error>;

    /// How many live keys `range` holds at `at` (`None`: the current revision).
    async fn count(&mut self, range: &KeyRange, at: Option<Revision>) -> Result<i64, Self::Error>;
}

/// The writer's transaction: the only place rows are written.
#[async_trait]
pub(crate) trait LogWriter: LogRead {
    /// Starts a write transaction and reads the meta row, locked against other writers
    /// (other processes included), so revisions stay gapless and commit in order.
    async fn begin(&mut self) -> Result<Meta, Self::Error>;
    /// Stores `meta` and commits. `start` is the revision before the batch: when it moved,
    /// other processes are told (PostgreSQL's NOTIFY).
    async fn commit(&mut self, meta: &Meta, start: Revision) -> Result<(), Self::Error>;
    /// Abandons the transaction after a failure (best effort: the connection may be gone).
    async fn rollback(&mut self);
    /// Marks the point a failing request rolls back to.
    async fn savepoint(&mut self) -> Result<(), Self::Error>;
    /// Keeps what the request since [`savepoint`](Self::savepoint) wrote.
    async fn release(&mut self) -> Result<(), Self::Error>;
    /// Undoes what the request since [`savepoint`](Self::savepoint) wrote.
    async fn rollback_to(&mut self) -> Result<(), Self::Error>;
    /// Nothing is queued after the last batch: a dialect may give its connection back.
    async fn idle(&mut self) {}

    /// The live row of `key`.
    async fn live(&mut self, key: &[u8]) -> Result<Option<KeyValue>, Self::Error>;
    /// The live rows of `keys` (distinct), in any order: a hook for one statement.
    async fn live_many(&mut self, keys: &[&[u8]]) -> Result<Vec<KeyValue>, Self::Error> {
        let mut rows = Vec::with_capacity(keys.len());
        for key in keys {
            rows.extend(self.live(key).await?);
        }
        Ok(rows)
    }
    /// Whether lease `id` exists.
    async fn lease_exists(&mut self, id: LeaseId) -> Result<bool, Self::Error>;
    /// Writes `p` at `rev` (create revision and version follow from the key's live row);
    /// returns that live row when `p.prev_kv` asks for it (read once, by whichever way the
    /// dialect already reads it).
    async fn put(&mut self, rev: Revision, p: &PutRequest)
    -> Result<Option<KeyValue>, Self::Error>;
    /// Writes puts of distinct keys at `first`, `first + 1`, … (their leases checked, no
    /// previous values asked for): a hook for a multi-row statement.
    async fn put_many(&mut self, first: Revision, puts: &[&PutRequest]) -> Result<(), Self::Error> {
        for (i, p) in (0..).zip(puts) {
            self.put(first + i, p).await?;
        }
        Ok(())
    }
    /// Deletes live `key` at `rev`, leaving a tombstone row.
    async fn tombstone(&mut self, key: &[u8], rev: Revision) -> Result<(), Self::Error>;
    /// Inserts a lease; false if the id is taken.
    async fn lease_insert(&mut self, id: LeaseId, ttl: i64) -> Result<bool, Self::Error>;
    /// Renews an unexpired lease; its TTL, or `None` if it is gone.
    async fn lease_refresh(&mut self, id: LeaseId) -> Result<Option<i64>, Self::Error>;
    /// Deletes a lease; false if it did not exist.
    async fn lease_delete(&mut self, id: LeaseId) -> Result<bool, Self::Error>;
    /// The live keys attached to lease `id`.
    async fn lease_keys(&mut self, id: LeaseId) -> Result<Vec<Bytes>, Self::Error>;
    /// Deletes at most `limit` rows made obsolete by compacting at `upto`; how many.
    async fn compact_rows(&mut self, upto: Revision, limit: i64) -> Result<u64, Self::Error>;
    /// Writes live `kv` as it is (its create/mod revisions, version and lease), for an
    /// import into an empty log.
    async fn import(&mut self, kv: &KeyValue) -> Result<(), Self::Error>;
}

/// How a range request came out of its snapshot.
#[derive(Debug)]
pub(crate) enum RangeOutcome {
    /// The page, read at the snapshot whose current revision is `current`.
    Rows {
        /// The snapshot's current revision.
        current: Revision,
        /// The page.
        page: Page,
    },
    /// The requested revision is compacted or in the future.
    OutOfBounds {
        /// The snapshot's current revision.
        current: Revision,
        /// Its compaction revision.
        compacted: Revision,
    },
}

/// A lease as stored.
#[derive(Debug)]
pub(crate) struct LeaseRow {
    /// The TTL it was granted.
    pub(crate) granted: i64,
    /// Seconds left.
    pub(crate) left: i64,
    /// Its keys, when asked for.
    pub(crate) keys: Vec<Bytes>,
}

/// Store-level reads, each in its own snapshot or statement.
#[async_trait]
pub(crate) trait Dialect: Send + Sync + 'static {
    /// The dialect's error.
    type Error: Classify;

    /// The current and the compaction revision.
    async fn meta(&self) -> Result<(Revision, Revision), Self::Error>;
    /// Runs [`range_in`](super::read::range_in) in a read snapshot.
    async fn range(
        &self,
        req: RangeRequest,
        counts: super::read::Counts,
    ) -> Result<RangeOutcome, Self::Error>;
    /// An unexpired lease.
    async fn lease(&self, id: LeaseId, keys: bool) -> Result<Option<LeaseRow>, Self::Error>;
    /// Ids of unexpired leases.
    async fn leases(&self) -> Result<Vec<LeaseId>, Self::Error>;
    /// Up to `limit` ids of expired leases (the sweeper revokes them).
    async fn expired_leases(&self, limit: i64) -> Result<Vec<LeaseId>, Self::Error>;
    /// Up to `limit` expired leases and when the next one expires, in one visit to the
    /// database, for a sweeper that looks only when it must (its log's only writer,
    /// `LogFeed::remote_writers`).
    async fn lease_sweep(&self, limit: i64) -> Result<(Vec<LeaseId>, NextExpiry), Self::Error> {
        Ok((self.expired_leases(limit).await?, NextExpiry::Unknown))
    }
    /// The database's size in bytes.
    async fn size(&self) -> Result<u64, Self::Error>;
}

/// When the next lease expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NextExpiry {
    /// The dialect does not say: sweep on the interval.
    Unknown,
    /// There are no leases: nothing expires until one is granted.
    NoLeases,
    /// In this long (zero when one is due).
    In(std::time::Duration),
}

/// What the watch hub reads: the log's events, and word of other processes' writes.
#[async_trait]
pub(crate) trait LogFeed: Send + 'static {
    /// The dialect's error.
    type Error: Classify;

    /// Waits until another process may have written: `Some(revision)` when it is known.
    /// A dialect that cannot hear other processes never returns (the hub's tick reads the
    /// revision instead). Must be cancel-safe.
    async fn changed(&mut self) -> Option<Revision>;
    /// The current revision.
    async fn current(&mut self) -> Result<Revision, Self::Error>;
    /// Whether other processes may write the log: if not, nothing but this store's own
    /// writer moves the revision and the hub's tick reads nothing.
    fn remote_writers(&self) -> bool {
        true
    }
    /// The events of revisions `after + 1 ..= upto`, in revision order.
    async fn events(
        &mut self,
        after: Revision,
        upto: Revision,
    ) -> Result<Vec<(Revision, Event)>, Self::Error>;
}
