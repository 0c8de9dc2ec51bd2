//! The SQLite driver: the same revision log as PostgreSQL, embedded in one file — the
//! project's zero-setup default (k3s's choice).
//!
//! - One writer thread owns the write connection (SQLite's own model) and batches every
//!   queued write into one `BEGIN IMMEDIATE` transaction with a savepoint per request: gapless
//!   revisions, one fsync per batch.
//! - Readers use their own connections; WAL mode lets them read a consistent snapshot while
//!   the writer commits.
//! - The watch hub is woken by the writer after each commit, and reads the file every second
//!   as well, so a second process on the same file is seen within a second.
//! - Leases have persisted expiry times; compaction runs in bounded batches through the
//!   writer, between other writes.
//!
//! ```
//! # block_on(async {
//! use kmetal_datastore::Datastore;
//! use kmetal_datastore::model::{PutRequest, RangeRequest};
//! use kmetal_datastore::sqlite::{SqliteConfig, SqliteStore};
//! let dir = std::env::temp_dir().join(format!("kmetal-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let store = SqliteStore::open(SqliteConfig::new(dir.join("tenant.db"))).await.unwrap();
//! store.put(PutRequest::new("/registry/ns/default", "{}")).await.unwrap();
//! assert_eq!(store.range(RangeRequest::prefix("/registry/")).await.unwrap().count, 1);
//! # drop(store);
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # });
//! # fn block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(f)
//! # }
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{DatastoreError, Result};
use crate::model::{
    CompactResponse, Compare, CompareTarget, DeleteRangeRequest, DeleteRangeResponse, Event,
    EventKind, KeyValue, LeaseGrant, LeaseId, LeaseInfo, Limits, PutRequest, PutResponse,
    RangeRequest, RangeResponse, RequestOp, ResponseOp, Revision, Status, TxnRequest, TxnResponse,
    WatchBatch, WatchRequest,
};
use crate::sqllog::{
    Dispatched, HubMsg, Meta, ProgressClock, Unregister, Watcher, bounds, deliver, next_watch_id,
    spawn_auto_compaction,
};
use crate::store::{Datastore, WatchStream};

/// The schema version this code writes.
pub const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = r#"
PRAGMA journal_mode = WAL;
CREATE TABLE IF NOT EXISTS kmetal_meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    revision INTEGER NOT NULL,
    compact_revision INTEGER NOT NULL,
    next_lease INTEGER NOT NULL,
    schema_version INTEGER NOT NULL
);
INSERT INTO kmetal_meta (id, revision, compact_revision, next_lease, schema_version)
    VALUES (1, 1, 0, 1, 1) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS kmetal_kv (
    rev INTEGER NOT NULL,
    name BLOB NOT NULL,
    create_revision INTEGER NOT NULL,
    prev_revision INTEGER NOT NULL,
    version INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    lease INTEGER NOT NULL,
    value BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS kmetal_kv_name_rev ON kmetal_kv (name, rev DESC);
CREATE INDEX IF NOT EXISTS kmetal_kv_rev ON kmetal_kv (rev);
CREATE UNIQUE INDEX IF NOT EXISTS kmetal_kv_name_prev ON kmetal_kv (name, prev_revision);
CREATE INDEX IF NOT EXISTS kmetal_kv_lease ON kmetal_kv (lease) WHERE lease <> 0;
CREATE TABLE IF NOT EXISTS kmetal_current (name BLOB PRIMARY KEY, rev INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kmetal_lease (
    id INTEGER PRIMARY KEY,
    ttl INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL
);
"#;

/// How to open the store.
#[derive(Debug, Clone)]
pub struct SqliteConfig {
    /// The database file (created if missing).
    pub path: PathBuf,
    /// Deadline of every request.
    pub request_timeout: Duration,
    /// etcd's limits.
    pub limits: Limits,
    /// Read connections.
    pub readers: usize,
    /// How often expired leases are looked for.
    pub lease_sweep: Duration,
    /// Rows deleted per compaction batch.
    pub compaction_batch: i64,
    /// Compact automatically: every `.0`, keep the last `.1` revisions.
    pub auto_compact: Option<(Duration, i64)>,
    /// How long a watch that asked for progress notifications may stay idle before it gets
    /// one (etcd's `--watch-progress-notify-interval`, 10 minutes by default).
    pub progress_interval: Duration,
}

impl SqliteConfig {
    /// Defaults for `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            request_timeout: Duration::from_secs(5),
            limits: Limits::default(),
            readers: 4,
            lease_sweep: Duration::from_millis(500),
            compaction_batch: 1000,
            auto_compact: None,
            progress_interval: crate::model::DEFAULT_PROGRESS_INTERVAL,
        }
    }

    /// The same with another watch progress notification interval.
    pub fn with_progress_interval(mut self, interval: Duration) -> Self {
        self.progress_interval = interval;
        self
    }
}

fn db(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> DatastoreError {
    DatastoreError::unavailable(e)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn open(path: &std::path::Path) -> rusqlite::Result<Connection> {
    let c = Connection::open(path)?;
    c.busy_timeout(Duration::from_secs(5))?;
    // Durable like etcd: every commit is on disk before it is acknowledged.
    c.pragma_update(None, "synchronous", "FULL")?;
    Ok(c)
}

/// A [`Datastore`] in one SQLite file.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.cfg.path)
            .finish_non_exhaustive()
    }
}

struct Inner {
    cfg: SqliteConfig,
    writer: mpsc::Sender<Job>,
    readers: Arc<Mutex<Vec<Connection>>>,
    hub: mpsc::UnboundedSender<HubMsg>,
    dispatched: Dispatched,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

enum Op {
    Put(PutRequest),
    Delete(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact(Revision),
    CompactBatch(Revision, i64),
    LeaseGrant { ttl: i64, id: LeaseId },
    LeaseRevoke(LeaseId),
    LeaseKeepAlive(LeaseId),
}

enum Done {
    Put(PutResponse),
    Delete(DeleteRangeResponse),
    Txn(TxnResponse),
    Compact(CompactResponse),
    Deleted(usize),
    LeaseGrant(LeaseGrant),
    LeaseRevoke(Revision),
    LeaseTtl(i64),
}

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Done>>,
}

enum Fail {
    Request(DatastoreError),
    Db(rusqlite::Error),
}

impl From<rusqlite::Error> for Fail {
    fn from(e: rusqlite::Error) -> Self {
        Fail::Db(e)
    }
}

impl From<DatastoreError> for Fail {
    fn from(e: DatastoreError) -> Self {
        Fail::Request(e)
    }
}

const KV_COLS: &str = "k.name, k.rev, k.create_revision, k.version, k.lease, k.value";

fn kv_from(row: &Row<'_>, keys_only: bool) -> rusqlite::Result<KeyValue> {
    Ok(KeyValue {
        key: Bytes::from(row.get::<_, Vec<u8>>(0)?),
        mod_revision: row.get(1)?,
        create_revision: row.get(2)?,
        version: row.get(3)?,
        lease: row.get(4)?,
        value: if keys_only {
            Bytes::new()
        } else {
            Bytes::from(row.get::<_, Vec<u8>>(5)?)
        },
    })
}

/// Keys of a range: at the current revision from `kmetal_current`, else the newest row at or
/// below `at` per key. `limit` < 0 means all.
fn range_at(
    c: &Connection,
    req: &RangeRequest,
    at: Option<Revision>,
) -> rusqlite::Result<(Vec<KeyValue>, bool, i64)> {
    let (from, to) = bounds(&req.range);
    let (rows_sql, count_sql) = match at {
        None => (
            format!(
                "SELECT {KV_COLS} FROM (SELECT name, rev FROM kmetal_current
                 WHERE name >= ?1 AND (?2 IS NULL OR name < ?2) ORDER BY name LIMIT ?4) c
                 JOIN kmetal_kv k ON k.name = c.name AND k.rev = c.rev
                 WHERE ?3 IS NULL OR ?3 IS NOT NULL ORDER BY c.name"
            ),
            "SELECT count(*) FROM kmetal_current WHERE name >= ?1 AND (?2 IS NULL OR name < ?2)
             AND (?3 IS NULL OR ?3 IS NOT NULL)"
                .to_string(),
        ),
        Some(_) => {
            let live = "FROM kmetal_kv k WHERE k.name >= ?1 AND (?2 IS NULL OR k.name < ?2)
                AND k.rev = (SELECT max(rev) FROM kmetal_kv WHERE name = k.name AND rev <= ?3)
                AND k.deleted = 0";
            (
                format!("SELECT {KV_COLS} {live} ORDER BY k.name LIMIT ?4"),
                format!("SELECT count(*) {live}"),
            )
        }
    };
    let rev = at.unwrap_or(0);
    let count = |c: &Connection| -> rusqlite::Result<i64> {
        c.query_row(&count_sql, params![from, to, rev], |r| r.get(0))
    };
    if req.count_only {
        return Ok((Vec::new(), false, count(c)?));
    }
    let limit = if req.limit > 0 {
        req.limit.saturating_add(1)
    } else {
        -1
    };
    let mut stmt = c.prepare_cached(&rows_sql)?;
    let mut kvs = stmt
        .query_map(params![from, to, rev, limit], |r| kv_from(r, req.keys_only))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let more = req.limit > 0 && kvs.len() as i64 > req.limit;
    let total = if more {
        kvs.truncate(usize::try_from(req.limit).unwrap_or(usize::MAX));
        count(c)?
    } else {
        kvs.len() as i64
    };
    Ok((kvs, more, total))
}

fn live(c: &Connection, name: &[u8]) -> rusqlite::Result<Option<KeyValue>> {
    c.prepare_cached(&format!(
        "SELECT {KV_COLS} FROM kmetal_current c JOIN kmetal_kv k ON k.name = c.name AND k.rev = c.rev
         WHERE c.name = ?1"
    ))?
    .query_row(params![name], |r| kv_from(r, false))
    .optional()
}

fn lease_exists(c: &Connection, id: LeaseId) -> std::result::Result<(), Fail> {
    if id == 0 {
        return Ok(());
    }
    let found: Option<i64> = c
        .prepare_cached("SELECT 1 FROM kmetal_lease WHERE id = ?1")?
        .query_row(params![id], |r| r.get(0))
        .optional()?;
    found
        .map(drop)
        .ok_or(Fail::Request(DatastoreError::LeaseNotFound { id }))
}

fn put(
    c: &Connection,
    p: &PutRequest,
    rev: Revision,
) -> std::result::Result<Option<KeyValue>, Fail> {
    lease_exists(c, p.lease)?;
    let prev = live(c, &p.key)?;
    let last: Option<Revision> = c
        .prepare_cached("SELECT rev FROM kmetal_kv WHERE name = ?1 ORDER BY rev DESC LIMIT 1")?
        .query_row(params![p.key.as_ref()], |r| r.get(0))
        .optional()?;
    let (create, version) = prev
        .as_ref()
        .map_or((rev, 1), |kv| (kv.create_revision, kv.version + 1));
    c.prepare_cached(
        "INSERT INTO kmetal_kv (rev, name, create_revision, prev_revision, version, deleted, lease, value)
         VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, ?7)",
    )?
    .execute(params![rev, p.key.as_ref(), create, last.unwrap_or(0), version, p.lease, p.value.as_ref()])?;
    c.prepare_cached(
        "INSERT INTO kmetal_current (name, rev) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET rev = excluded.rev",
    )?
    .execute(params![p.key.as_ref(), rev])?;
    Ok(if p.prev_kv { prev } else { None })
}

fn tombstone(c: &Connection, name: &[u8], rev: Revision) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT INTO kmetal_kv (rev, name, create_revision, prev_revision, version, deleted, lease, value)
         SELECT ?1, name, 0, rev, 0, 1, 0, x'' FROM kmetal_current WHERE name = ?2",
    )?
    .execute(params![rev, name])?;
    c.prepare_cached("DELETE FROM kmetal_current WHERE name = ?1")?
        .execute(params![name])?;
    Ok(())
}

fn delete(
    c: &Connection,
    d: &DeleteRangeRequest,
    rev: Revision,
) -> rusqlite::Result<(i64, Vec<KeyValue>)> {
    let req = RangeRequest {
        range: d.range.clone(),
        ..RangeRequest::default()
    };
    let (kvs, _, _) = range_at(c, &req, None)?;
    for kv in &kvs {
        tombstone(c, &kv.key, rev)?;
    }
    Ok((kvs.len() as i64, if d.prev_kv { kvs } else { Vec::new() }))
}

fn compare_ok(c: &Connection, cmp: &Compare) -> rusqlite::Result<bool> {
    if cmp.range.is_single() {
        return Ok(cmp.matches(live(c, &cmp.range.key)?.as_ref()));
    }
    let req = RangeRequest {
        range: cmp.range.clone(),
        keys_only: !matches!(cmp.target, CompareTarget::Value(_)),
        ..RangeRequest::default()
    };
    let (kvs, _, _) = range_at(c, &req, None)?;
    Ok(kvs.iter().all(|kv| cmp.matches(Some(kv))))
}

fn txn(
    c: &Connection,
    t: &TxnRequest,
    rev: Revision,
    wrote: &mut bool,
) -> std::result::Result<TxnResponse, Fail> {
    let mut succeeded = true;
    for cmp in &t.compare {
        if !compare_ok(c, cmp)? {
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
                let at = (r.revision > 0 && r.revision < rev - 1).then_some(r.revision);
                let (kvs, more, count) = range_at(c, r, at)?;
                ResponseOp::Range(RangeResponse {
                    revision: rev - 1 + i64::from(*wrote),
                    kvs,
                    more,
                    count,
                })
            }
            RequestOp::Put(p) => {
                let prev_kv = put(c, p, rev)?;
                *wrote = true;
                ResponseOp::Put(PutResponse {
                    revision: rev,
                    prev_kv,
                })
            }
            RequestOp::DeleteRange(d) => {
                let (deleted, prev_kvs) = delete(c, d, rev)?;
                *wrote |= deleted > 0;
                ResponseOp::DeleteRange(DeleteRangeResponse {
                    revision: rev,
                    deleted,
                    prev_kvs,
                })
            }
            RequestOp::Txn(inner) => ResponseOp::Txn(txn(c, inner, rev, wrote)?),
        });
    }
    Ok(TxnResponse {
        revision: rev,
        succeeded,
        responses,
    })
}

fn apply(c: &Connection, op: &Op, meta: &mut Meta) -> std::result::Result<Done, Fail> {
    let rev = meta.revision + 1;
    match op {
        Op::Put(p) => {
            let prev_kv = put(c, p, rev)?;
            meta.revision = rev;
            Ok(Done::Put(PutResponse {
                revision: rev,
                prev_kv,
            }))
        }
        Op::Delete(d) => {
            let (deleted, prev_kvs) = delete(c, d, rev)?;
            if deleted > 0 {
                meta.revision = rev;
            }
            Ok(Done::Delete(DeleteRangeResponse {
                revision: meta.revision,
                deleted,
                prev_kvs,
            }))
        }
        Op::Txn(t) => {
            let mut wrote = false;
            let r = txn(c, t, rev, &mut wrote)?;
            if wrote {
                meta.revision = rev;
            }
            Ok(Done::Txn(TxnResponse {
                revision: meta.revision,
                ..r
            }))
        }
        Op::Compact(at) => Ok(Done::Compact(meta.compact_to(*at)?)),
        Op::CompactBatch(upto, n) => {
            let deleted = c
                .prepare_cached(
                    "DELETE FROM kmetal_kv WHERE rowid IN (
                        SELECT k.rowid FROM kmetal_kv k WHERE k.rev <= ?1 AND (k.deleted = 1 OR EXISTS (
                            SELECT 1 FROM kmetal_kv n WHERE n.name = k.name AND n.rev > k.rev AND n.rev <= ?1))
                        LIMIT ?2)",
                )?
                .execute(params![upto, n])?;
            Ok(Done::Deleted(deleted))
        }
        Op::LeaseGrant { ttl, id } => {
            let id = meta.lease_id(*id);
            let n = c
                .prepare_cached(
                    "INSERT INTO kmetal_lease (id, ttl, expires_at_ms) VALUES (?1, ?2, ?3)
                     ON CONFLICT (id) DO NOTHING",
                )?
                .execute(params![
                    id,
                    ttl,
                    now_ms().saturating_add(ttl.saturating_mul(1000))
                ])?;
            if n == 0 {
                return Err(DatastoreError::LeaseExists { id }.into());
            }
            Ok(Done::LeaseGrant(LeaseGrant { id, ttl: *ttl }))
        }
        Op::LeaseKeepAlive(id) => {
            let now = now_ms();
            let ttl: Option<i64> = c
                .prepare_cached(
                    "UPDATE kmetal_lease SET expires_at_ms = ?2 + ttl * 1000
                     WHERE id = ?1 AND expires_at_ms > ?2 RETURNING ttl",
                )?
                .query_row(params![id, now], |r| r.get(0))
                .optional()?;
            ttl.map(Done::LeaseTtl)
                .ok_or(Fail::Request(DatastoreError::LeaseNotFound { id: *id }))
        }
        Op::LeaseRevoke(id) => {
            let n = c
                .prepare_cached("DELETE FROM kmetal_lease WHERE id = ?1")?
                .execute(params![id])?;
            if n == 0 {
                return Err(DatastoreError::LeaseNotFound { id: *id }.into());
            }
            let keys: Vec<Vec<u8>> = c
                .prepare_cached(
                    "SELECT c.name FROM kmetal_current c JOIN kmetal_kv k ON k.name = c.name AND k.rev = c.rev
                     WHERE k.lease = ?1",
                )?
                .query_map(params![id], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            for k in &keys {
                tombstone(c, k, rev)?;
            }
            if !keys.is_empty() {
                meta.revision = rev;
            }
            Ok(Done::LeaseRevoke(meta.revision))
        }
    }
}

fn run_batch(
    conn: &mut Connection,
    jobs: &[Job],
) -> rusqlite::Result<(Vec<Result<Done>>, Revision)> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut meta = tx.query_row(
        "SELECT revision, compact_revision, next_lease FROM kmetal_meta WHERE id = 1",
        [],
        |r| {
            Ok(Meta {
                revision: r.get(0)?,
                compact: r.get(1)?,
                next_lease: r.get(2)?,
            })
        },
    )?;
    let mut results = Vec::with_capacity(jobs.len());
    for job in jobs {
        // A savepoint keeps a failing request from undoing the others in the batch.
        tx.execute_batch("SAVEPOINT w")?;
        let before = (meta.revision, meta.compact, meta.next_lease);
        match apply(&tx, &job.op, &mut meta) {
            Ok(done) => {
                tx.execute_batch("RELEASE SAVEPOINT w")?;
                results.push(Ok(done));
            }
            Err(Fail::Request(e)) => {
                tx.execute_batch("ROLLBACK TO SAVEPOINT w; RELEASE SAVEPOINT w")?;
                (meta.revision, meta.compact, meta.next_lease) = before;
                results.push(Err(e));
            }
            Err(Fail::Db(e)) => return Err(e),
        }
    }
    tx.execute(
        "UPDATE kmetal_meta SET revision = ?1, compact_revision = ?2, next_lease = ?3 WHERE id = 1",
        params![meta.revision, meta.compact, meta.next_lease],
    )?;
    tx.commit()?;
    Ok((results, meta.revision))
}

fn writer_thread(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Job>,
    committed: watch::Sender<Revision>,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        while jobs.len() < 256 {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        match run_batch(&mut conn, &jobs) {
            Ok((results, revision)) => {
                committed.send_replace(revision);
                for (job, r) in jobs.into_iter().zip(results) {
                    let _ = job.reply.send(r);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for job in jobs {
                    let _ = job.reply.send(Err(db(format!("the batch failed: {msg}"))));
                }
            }
        }
    }
}

type Pool = Arc<Mutex<Vec<Connection>>>;

/// Runs `f` on a reader connection on the blocking pool.
async fn with_reader<T: Send + 'static>(
    pool: &Pool,
    path: &std::path::Path,
    f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
) -> Result<T> {
    let (pool, path) = (pool.clone(), path.to_path_buf());
    tokio::task::spawn_blocking(move || {
        let taken = pool.lock().ok().and_then(|mut p| p.pop());
        let mut conn = match taken {
            Some(c) => c,
            None => open(&path).map_err(db)?,
        };
        let r = f(&mut conn).map_err(db);
        if let Ok(mut p) = pool.lock() {
            p.push(conn);
        }
        r
    })
    .await
    .map_err(db)?
}

const EVENTS: &str =
    "SELECT k.rev, k.name, k.create_revision, k.version, k.deleted, k.lease, k.value,
        p.rev, p.create_revision, p.version, p.lease, p.value, p.deleted
    FROM kmetal_kv k LEFT JOIN kmetal_kv p ON p.name = k.name AND p.rev = k.prev_revision
    WHERE k.rev > ?1 AND k.rev <= ?2 ORDER BY k.rev, k.name";

fn event_from(row: &Row<'_>) -> rusqlite::Result<(Revision, Event)> {
    let rev: Revision = row.get(0)?;
    let key = Bytes::from(row.get::<_, Vec<u8>>(1)?);
    let deleted: bool = row.get::<_, i64>(4)? != 0;
    let prev = match row.get::<_, Option<Revision>>(7)? {
        Some(p_rev) if row.get::<_, Option<i64>>(12)? == Some(0) => Some(KeyValue {
            key: key.clone(),
            create_revision: row.get::<_, Option<i64>>(8)?.unwrap_or(0),
            mod_revision: p_rev,
            version: row.get::<_, Option<i64>>(9)?.unwrap_or(0),
            lease: row.get::<_, Option<i64>>(10)?.unwrap_or(0),
            value: Bytes::from(row.get::<_, Option<Vec<u8>>>(11)?.unwrap_or_default()),
        }),
        _ => None,
    };
    let kv = if deleted {
        KeyValue {
            key,
            mod_revision: rev,
            ..KeyValue::default()
        }
    } else {
        KeyValue {
            key,
            create_revision: row.get(2)?,
            mod_revision: rev,
            version: row.get(3)?,
            lease: row.get(5)?,
            value: Bytes::from(row.get::<_, Vec<u8>>(6)?),
        }
    };
    Ok((
        rev,
        Event {
            kind: if deleted {
                EventKind::Delete
            } else {
                EventKind::Put
            },
            kv,
            prev_kv: prev,
        },
    ))
}

fn current_revision(c: &mut Connection) -> rusqlite::Result<Revision> {
    c.query_row("SELECT revision FROM kmetal_meta WHERE id = 1", [], |r| {
        r.get(0)
    })
}

async fn hub_task(
    pool: Pool,
    path: PathBuf,
    mut rx: mpsc::UnboundedReceiver<HubMsg>,
    mut committed: watch::Receiver<Revision>,
    mut progress: ProgressClock,
    dispatched: Dispatched,
) {
    let mut watchers: HashMap<u64, Watcher> = HashMap::new();
    let mut last: Revision = with_reader(&pool, &path, current_revision)
        .await
        .unwrap_or_default();
    let mut tick = tokio::time::interval(progress.tick());
    loop {
        let mut hint: Option<Revision> = None;
        let mut idle_tick = false;
        tokio::select! {
            msg = rx.recv() => match msg {
                None => return,
                Some(HubMsg::Remove(id)) => { watchers.remove(&id); continue; }
                Some(HubMsg::Add(id, mut w)) => {
                    if w.next <= last {
                        let (from, upto) = (w.next - 1, last);
                        match with_reader(&pool, &path, move |c| {
                            c.prepare_cached(EVENTS)?.query_map(params![from, upto], event_from)?.collect::<rusqlite::Result<Vec<_>>>()
                        }).await {
                            Ok(ev) => { deliver(&mut w, &ev, last); }
                            Err(e) => { let _ = w.tx.send(Err(e)); continue; }
                        }
                    } else {
                        w.next = w.next.max(last + 1);
                    }
                    watchers.insert(id, w);
                    continue;
                }
            },
            changed = committed.changed() => {
                if changed.is_err() { return; }
                hint = Some(*committed.borrow_and_update());
            }
            _ = tick.tick() => { idle_tick = true; }
        }
        // Another process may have written: the tick reads the file's revision.
        let now = match hint {
            Some(r) => r,
            None => match with_reader(&pool, &path, current_revision).await {
                Ok(r) => r,
                Err(_) => continue,
            },
        };
        if now > last {
            let from = last;
            let ev = match with_reader(&pool, &path, move |c| {
                c.prepare_cached(EVENTS)?
                    .query_map(params![from, now], event_from)?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .await
            {
                Ok(ev) => ev,
                Err(_) => continue,
            };
            watchers.retain(|_, w| deliver(w, &ev, now));
            last = now;
            dispatched.set(last);
        } else if idle_tick && progress.due() {
            watchers.retain(|_, w| {
                !w.progress
                    || w.tx
                        .send(Ok(WatchBatch {
                            revision: last,
                            events: Vec::new(),
                        }))
                        .is_ok()
            });
        }
    }
}

async fn sweeper_task(pool: Pool, path: PathBuf, writer: mpsc::Sender<Job>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let now = now_ms();
        let Ok(expired) = with_reader(&pool, &path, move |c| {
            c.prepare_cached("SELECT id FROM kmetal_lease WHERE expires_at_ms <= ?1 LIMIT 100")?
                .query_map(params![now], |r| r.get::<_, i64>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .await
        else {
            continue;
        };
        for id in expired {
            let (reply, rx) = oneshot::channel();
            if writer
                .send(Job {
                    op: Op::LeaseRevoke(id),
                    reply,
                })
                .await
                .is_err()
            {
                return;
            }
            let _ = rx.await;
        }
    }
}

impl SqliteStore {
    /// Opens (or creates) the database, brings its schema up to date, and starts the writer
    /// thread, the watch hub and the lease sweeper.
    pub async fn open(cfg: SqliteConfig) -> Result<Self> {
        let path = cfg.path.clone();
        let conn = tokio::task::spawn_blocking(move || -> rusqlite::Result<Connection> {
            let c = open(&path)?;
            c.execute_batch(SCHEMA)?;
            Ok(c)
        })
        .await
        .map_err(db)?
        .map_err(db)?;
        let version: i64 = conn
            .query_row(
                "SELECT schema_version FROM kmetal_meta WHERE id = 1",
                [],
                |r| r.get(0),
            )
            .map_err(db)?;
        if version > SCHEMA_VERSION {
            return Err(DatastoreError::Backend {
                source: format!(
                    "database schema version {version} is newer than this kmetal ({SCHEMA_VERSION})"
                )
                .into(),
            });
        }
        let start: Revision = conn
            .query_row("SELECT revision FROM kmetal_meta WHERE id = 1", [], |r| {
                r.get(0)
            })
            .map_err(db)?;
        let (wtx, wrx) = mpsc::channel(4096);
        let (committed_tx, committed_rx) = watch::channel(start);
        std::thread::Builder::new()
            .name("kmetal-sqlite-writer".into())
            .spawn(move || writer_thread(conn, wrx, committed_tx))
            .map_err(db)?;
        let pool: Pool = Arc::new(Mutex::new(Vec::new()));
        let (htx, hrx) = mpsc::unbounded_channel();
        let dispatched = Dispatched::default();
        let hub = tokio::spawn(hub_task(
            pool.clone(),
            cfg.path.clone(),
            hrx,
            committed_rx,
            ProgressClock::new(cfg.progress_interval),
            dispatched.clone(),
        ));
        let sweeper = tokio::spawn(sweeper_task(
            pool.clone(),
            cfg.path.clone(),
            wtx.clone(),
            cfg.lease_sweep,
        ));
        let auto = cfg.auto_compact;
        let store = Self {
            inner: Arc::new(Inner {
                cfg,
                writer: wtx,
                readers: pool,
                hub: htx,
                dispatched,
                tasks: vec![hub.abort_handle(), sweeper.abort_handle()],
            }),
        };
        if let Some((every, keep)) = auto {
            let weak = Arc::downgrade(&store.inner);
            spawn_auto_compaction(every, keep, move || {
                weak.upgrade()
                    .map(|inner| Arc::new(SqliteStore { inner }) as Arc<dyn Datastore>)
            });
        }
        Ok(store)
    }

    async fn write(&self, op: Op) -> Result<Done> {
        let (reply, rx) = oneshot::channel();
        let deadline = self.inner.cfg.request_timeout;
        tokio::time::timeout(deadline, async {
            self.inner
                .writer
                .send(Job { op, reply })
                .await
                .map_err(|_| db("the writer thread has stopped"))?;
            rx.await.map_err(|_| db("the writer dropped the request"))?
        })
        .await
        .map_err(|_| db(format!("write did not finish within {deadline:?}")))?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        with_reader(&self.inner.readers, &self.inner.cfg.path, f).await
    }
}

fn wrong_kind() -> DatastoreError {
    db("the writer answered with the wrong kind")
}

#[async_trait]
impl Datastore for SqliteStore {
    async fn range(&self, req: RangeRequest) -> Result<RangeResponse> {
        if req.range.key.is_empty() {
            return Err(DatastoreError::EmptyKey);
        }
        type Read = (Revision, Revision, Vec<KeyValue>, bool, i64);
        let requested = req.revision;
        let r: std::result::Result<Read, Revision> = self
            .read(move |c| {
                // One read transaction: meta and rows from the same snapshot.
                let tx = c.transaction()?;
                let (current, compacted): (Revision, Revision) = tx.query_row(
                    "SELECT revision, compact_revision FROM kmetal_meta WHERE id = 1",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                if req.revision > current || (req.revision > 0 && req.revision < compacted) {
                    return Ok(Err(current.max(compacted)));
                }
                let at = (req.revision > 0 && req.revision < current).then_some(req.revision);
                let (kvs, more, count) = range_at(&tx, &req, at)?;
                tx.commit()?;
                Ok(Ok((current, compacted, kvs, more, count)))
            })
            .await?;
        match r {
            Ok((current, _, kvs, more, count)) => Ok(RangeResponse {
                revision: current,
                kvs,
                more,
                count,
            }),
            Err(_) => {
                let (current, compacted) = self.meta().await?;
                if requested > current {
                    Err(DatastoreError::FutureRevision { requested, current })
                } else {
                    Err(DatastoreError::Compacted {
                        requested,
                        compacted,
                    })
                }
            }
        }
    }

    async fn put(&self, req: PutRequest) -> Result<PutResponse> {
        self.inner.cfg.limits.check_put(&req)?;
        match self.write(Op::Put(req)).await? {
            Done::Put(r) => Ok(r),
            _ => Err(wrong_kind()),
        }
    }

    async fn delete_range(&self, req: DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        if req.range.key.is_empty() {
            return Err(DatastoreError::EmptyKey);
        }
        match self.write(Op::Delete(req)).await? {
            Done::Delete(r) => Ok(r),
            _ => Err(wrong_kind()),
        }
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse> {
        self.inner.cfg.limits.check_txn(&req)?;
        match self.write(Op::Txn(req)).await? {
            Done::Txn(r) => Ok(r),
            _ => Err(wrong_kind()),
        }
    }

    async fn compact(&self, revision: Revision) -> Result<CompactResponse> {
        let r = match self.write(Op::Compact(revision)).await? {
            Done::Compact(r) => r,
            _ => return Err(wrong_kind()),
        };
        // Bounded batches through the writer, so other writes interleave.
        loop {
            match self
                .write(Op::CompactBatch(revision, self.inner.cfg.compaction_batch))
                .await?
            {
                Done::Deleted(0) => return Ok(r),
                Done::Deleted(_) => {}
                _ => return Err(wrong_kind()),
            }
        }
    }

    async fn watch(&self, req: WatchRequest) -> Result<WatchStream> {
        if req.range.key.is_empty() {
            return Err(DatastoreError::EmptyKey);
        }
        let (current, compacted) = self.meta().await?;
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
        let (tx, rx) = mpsc::unbounded_channel();
        let id = next_watch_id();
        self.inner
            .hub
            .send(HubMsg::Add(
                id,
                Watcher {
                    range: req.range,
                    next,
                    prev_kv: req.prev_kv,
                    no_put: req.no_put,
                    no_delete: req.no_delete,
                    progress: req.progress_notify,
                    tx,
                },
            ))
            .map_err(|_| db("the watch hub has stopped"))?;
        Ok(WatchStream::new(
            rx,
            Unregister {
                hub: self.inner.hub.clone(),
                id,
            },
        ))
    }

    async fn lease_grant(&self, ttl: i64, id: LeaseId) -> Result<LeaseGrant> {
        let max = self.inner.cfg.limits.max_lease_ttl;
        if !(1..=max).contains(&ttl) {
            return Err(DatastoreError::InvalidTtl { ttl, max });
        }
        match self.write(Op::LeaseGrant { ttl, id }).await? {
            Done::LeaseGrant(g) => Ok(g),
            _ => Err(wrong_kind()),
        }
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<Revision> {
        match self.write(Op::LeaseRevoke(id)).await? {
            Done::LeaseRevoke(r) => Ok(r),
            _ => Err(wrong_kind()),
        }
    }

    async fn lease_keep_alive(&self, id: LeaseId) -> Result<i64> {
        // Through the writer: SQLite has one writer, and the write connection is open already.
        match self.write(Op::LeaseKeepAlive(id)).await? {
            Done::LeaseTtl(ttl) => Ok(ttl),
            _ => Err(wrong_kind()),
        }
    }

    async fn lease_time_to_live(&self, id: LeaseId, keys: bool) -> Result<LeaseInfo> {
        let now = now_ms();
        let found = self
            .read(move |c| {
                let row: Option<(i64, i64)> = c
                    .query_row(
                        "SELECT ttl, expires_at_ms FROM kmetal_lease WHERE id = ?1 AND expires_at_ms > ?2",
                        params![id, now],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                let Some((ttl, expires)) = row else {
                    return Ok(None);
                };
                let names: Vec<Vec<u8>> = if keys {
                    c.prepare_cached(
                        "SELECT c.name FROM kmetal_current c JOIN kmetal_kv k ON k.name = c.name AND k.rev = c.rev
                         WHERE k.lease = ?1 ORDER BY c.name",
                    )?
                    .query_map(params![id], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?
                } else {
                    Vec::new()
                };
                Ok(Some((ttl, (expires - now + 999) / 1000, names)))
            })
            .await?;
        let (granted, left, names) = found.ok_or(DatastoreError::LeaseNotFound { id })?;
        Ok(LeaseInfo {
            id,
            ttl: left,
            granted_ttl: granted,
            keys: names.into_iter().map(Bytes::from).collect(),
        })
    }

    async fn leases(&self) -> Result<Vec<LeaseId>> {
        let now = now_ms();
        self.read(move |c| {
            c.prepare_cached("SELECT id FROM kmetal_lease WHERE expires_at_ms > ?1 ORDER BY id")?
                .query_map(params![now], |r| r.get(0))?
                .collect()
        })
        .await
    }

    async fn watch_dispatched(&self) -> Option<Revision> {
        Some(self.inner.dispatched.get())
    }

    async fn status(&self) -> Result<Status> {
        let (revision, compact_revision) = self.meta().await?;
        let db_size = std::fs::metadata(&self.inner.cfg.path).map_or(0, |m| m.len());
        Ok(Status {
            revision,
            compact_revision,
            db_size,
        })
    }
}

impl SqliteStore {
    async fn meta(&self) -> Result<(Revision, Revision)> {
        self.read(|c| {
            c.query_row(
                "SELECT revision, compact_revision FROM kmetal_meta WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
        .await
    }
}

/// Where a tenant's SQLite slice lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteCredentials {
    /// The slice's database file.
    pub path: PathBuf,
}

/// Slices of the embedded default: one SQLite file per tenant (`<dir>/<schema>.db`), so a
/// tenant's data is isolated by the file system and removed with its file. SQLite has no
/// users: the slice's user is recorded but authenticates with nothing.
#[derive(Debug, Clone)]
pub struct SqliteProvisioner {
    dir: PathBuf,
}

impl SqliteProvisioner {
    /// Slices in `dir` (created when missing).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The file of slice `schema`.
    pub fn path(&self, schema: &str) -> PathBuf {
        self.dir.join(format!("{schema}.db"))
    }
}

#[async_trait::async_trait]
impl crate::provision::Provisioner for SqliteProvisioner {
    type Credentials = SqliteCredentials;

    async fn provision(
        &self,
        slice: &crate::provision::TenantSlice,
    ) -> std::result::Result<SqliteCredentials, crate::provision::ProvisionError> {
        use crate::provision::ProvisionError;
        slice.check()?;
        std::fs::create_dir_all(&self.dir).map_err(|source| ProvisionError::File {
            step: "create directory",
            path: self.dir.clone(),
            source,
        })?;
        let path = self.path(&slice.schema);
        let mut cfg = SqliteConfig::new(&path);
        cfg.readers = 1;
        // Opening creates the file and its schema; the store closes when dropped.
        SqliteStore::open(cfg)
            .await
            .map_err(|source| ProvisionError::Step {
                step: "create database file",
                source,
            })?;
        Ok(SqliteCredentials { path })
    }

    async fn deprovision(
        &self,
        slice: &crate::provision::TenantSlice,
    ) -> std::result::Result<(), crate::provision::ProvisionError> {
        slice.check()?;
        let path = self.path(&slice.schema);
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let mut file = path.clone().into_os_string();
            file.push(suffix);
            let file = PathBuf::from(file);
            match std::fs::remove_file(&file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(crate::provision::ProvisionError::File {
                        step: "remove database file",
                        path: file,
                        source,
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod provision_tests {
    use super::*;
    use crate::Datastore;
    use crate::model::{PutRequest, RangeRequest};
    use crate::provision::{Provisioner, TenantSlice};

    #[tokio::test]
    async fn a_slice_is_one_file_created_idempotently_and_removed_with_its_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = SqliteProvisioner::new(dir.path().join("slices"));
        let slice = TenantSlice::with_password("tenant_a", "tenant_a", "unused");
        let creds = p.provision(&slice).await.expect("provision");
        assert_eq!(p.provision(&slice).await.expect("again"), creds);
        {
            let s = SqliteStore::open(SqliteConfig::new(&creds.path))
                .await
                .expect("open");
            s.put(PutRequest::new("/k", "v")).await.expect("put");
        }
        let other = TenantSlice::with_password("tenant_b", "tenant_b", "unused");
        let b = p.provision(&other).await.expect("b");
        assert_ne!(b.path, creds.path);
        p.deprovision(&slice).await.expect("deprovision");
        p.deprovision(&slice).await.expect("idempotent");
        assert!(!creds.path.exists());
        let s = SqliteStore::open(SqliteConfig::new(&creds.path))
            .await
            .expect("reopen");
        assert!(
            s.range(RangeRequest::get("/k"))
                .await
                .expect("get")
                .kvs
                .is_empty()
        );
        assert!(matches!(
            p.provision(&TenantSlice::with_password("../x", "u", "p"))
                .await,
            Err(crate::provision::ProvisionError::InvalidSchema(_))
        ));
    }
}
