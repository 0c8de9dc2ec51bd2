//! The PostgreSQL driver: a kine-style revision log that beats kine's known weaknesses.
//!
//! - **Writes are batched**: one writer task per store takes every queued write, runs them in
//!   one SQL transaction under the `kmetal_meta` row lock (one revision per write, gapless),
//!   and commits once, so 32 concurrent writers share one fsync (etcd batches its Raft log the
//!   same way). Any compare/op combination within etcd's limits runs atomically.
//! - **Watches** are fed by one hub task per store: it `LISTEN`s for the writers' `NOTIFY`
//!   (any process sharing the database), reads new rows in revision order and dispatches them.
//!   Revisions commit in order, so there are no gaps to wait out; a missed notification is
//!   covered by a 1 s safety read, and a lost connection resumes from the last revision.
//! - **Leases** are rows with an expiry time; a sweeper revokes expired ones, so expiry
//!   survives restarts.
//! - **Compaction** marks the revision at once and deletes superseded rows in bounded batches
//!   outside the writer, so it never holds writers for long.

mod provision;
mod schema;
mod tls;

pub use provision::{PgCredentials, PgProvisioner};
pub use schema::SCHEMA_VERSION;
pub use tls::PgTls;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{NoTls, Row};

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

/// How to reach the database and how the store behaves.
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// A libpq-style connection string or URL (`host=… user=… dbname=…`).
    pub url: String,
    /// Connections in the read pool.
    pub pool_size: usize,
    /// Deadline of every request.
    pub request_timeout: Duration,
    /// etcd's limits.
    pub limits: Limits,
    /// How often expired leases are looked for.
    pub lease_sweep: Duration,
    /// Rows deleted per compaction batch.
    pub compaction_batch: i64,
    /// TLS to the server (`sslmode=require` with certificate verification), or plain TCP.
    pub tls: Option<PgTls>,
    /// Compact automatically: every `.0`, keep the last `.1` revisions (kube-apiserver's
    /// compactor does the same every 5 minutes through the gateway; this covers clients that
    /// never compact).
    pub auto_compact: Option<(Duration, i64)>,
    /// How long a watch that asked for progress notifications may stay idle before it gets
    /// one (etcd's `--watch-progress-notify-interval`, 10 minutes by default).
    pub progress_interval: Duration,
}

impl PgConfig {
    /// Defaults for `url`: 8 pooled connections, 5 s requests, etcd's limits.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            pool_size: 8,
            request_timeout: Duration::from_secs(5),
            limits: Limits::default(),
            lease_sweep: Duration::from_millis(500),
            compaction_batch: 1000,
            tls: None,
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

/// Most writes committed together.
const MAX_BATCH: usize = 256;
/// The NOTIFY channel.
const CHANNEL: &str = "kmetal_revision";

/// A database error as the cause of `Unavailable`.
fn db(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> DatastoreError {
    DatastoreError::unavailable(e)
}

/// A PostgreSQL error as the etcd-style kind a caller can act on: authentication and
/// privilege failures are `PermissionDenied`; connection loss, shutdown, overload and
/// serialization conflicts `Unavailable`; anything else `Backend`.
pub(crate) fn pg_error(e: tokio_postgres::Error) -> DatastoreError {
    let Some(code) = e.code().map(|c| c.code().to_string()) else {
        return DatastoreError::unavailable(e);
    };
    match code.get(..2) {
        Some("28") => DatastoreError::PermissionDenied {
            source: Some(Box::new(e)),
        },
        _ if code == "42501" => DatastoreError::PermissionDenied {
            source: Some(Box::new(e)),
        },
        Some("08" | "57" | "53" | "40") => DatastoreError::unavailable(e),
        _ => DatastoreError::Backend {
            source: Box::new(e),
        },
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> DatastoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_error(e),
        other => DatastoreError::unavailable(other),
    }
}

/// A [`Datastore`] on PostgreSQL.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

/// Counts of paginated lists: at a fixed revision, the count of `[lastKey+"\0", end)` is the
/// previous page's count minus its keys, so only the first page pays for a full count.
/// Key: (range end, revision, page start).
type CountCache = std::sync::Mutex<HashMap<(Vec<u8>, Revision, Vec<u8>), i64>>;

/// Most remembered page counts (a handful of concurrent paginated lists).
const COUNT_CACHE_SIZE: usize = 1024;

struct Inner {
    pool: Pool,
    counts: CountCache,
    writer: mpsc::Sender<Job>,
    hub: mpsc::UnboundedSender<HubMsg>,
    dispatched: Dispatched,
    cfg: PgConfig,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

enum Op {
    Put(PutRequest),
    Delete(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact(Revision),
    LeaseGrant { ttl: i64, id: LeaseId },
    LeaseRevoke(LeaseId),
}

enum Done {
    Put(PutResponse),
    Delete(DeleteRangeResponse),
    Txn(TxnResponse),
    Compact(CompactResponse),
    LeaseGrant(LeaseGrant),
    LeaseRevoke(Revision),
}

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Done>>,
}

/// A failure while applying one write: the request's own error, or the database's (which
/// fails the whole batch).
enum Fail {
    Request(DatastoreError),
    Db(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        Fail::Db(e)
    }
}

impl From<DatastoreError> for Fail {
    fn from(e: DatastoreError) -> Self {
        Fail::Request(e)
    }
}

/// The latest live row of every key in a range at revision `$3` (`$2` NULL = unbounded; `$4`
/// the row limit, NULL for all).
const LIVE_IN_RANGE: &str = "SELECT name, rev, create_revision, version, lease, value FROM (
    SELECT DISTINCT ON (name) name, rev, create_revision, version, deleted, lease, value
    FROM kmetal_kv WHERE name >= $1 AND ($2::bytea IS NULL OR name < $2) AND rev <= $3
    ORDER BY name, rev DESC) t WHERE NOT deleted ORDER BY name LIMIT $4";

/// The same at the current revision, from `kmetal_current` (`$3` is unused but keeps the
/// parameter list the same; `$4` is the row limit, NULL for all). The limit sits inside, on
/// the ordered index scan of `kmetal_current`, so a page costs its own rows whatever the
/// planner's statistics say.
const CURRENT_IN_RANGE: &str =
    "SELECT k.name, k.rev, k.create_revision, k.version, k.lease, k.value
    FROM (SELECT name, rev FROM kmetal_current
          WHERE name >= $1 AND ($2::bytea IS NULL OR name < $2) AND $3::bigint IS NOT NULL
          ORDER BY name LIMIT $4) c
    CROSS JOIN LATERAL (SELECT * FROM kmetal_kv k WHERE k.name = c.name AND k.rev = c.rev) k
    ORDER BY c.name";

/// Counts at the current revision: an index-only range scan (`$4` unused, always NULL).
const CURRENT_COUNT: &str = "SELECT count(*) FROM kmetal_current
    WHERE name >= $1 AND ($2::bytea IS NULL OR name < $2) AND $3::bigint IS NOT NULL
    AND $4::bigint IS NULL";

fn kv_from(row: &Row, keys_only: bool) -> KeyValue {
    let value: Vec<u8> = if keys_only {
        Vec::new()
    } else {
        row.get("value")
    };
    KeyValue {
        key: Bytes::from(row.get::<_, Vec<u8>>("name")),
        value: Bytes::from(value),
        create_revision: row.get("create_revision"),
        mod_revision: row.get("rev"),
        version: row.get("version"),
        lease: row.get("lease"),
    }
}

/// Where a read is served from.
#[derive(Clone, Copy)]
enum At {
    /// The current revision (the writer's transaction, or a snapshot at its own revision).
    Current,
    /// A past revision.
    Past(Revision),
}

fn at_rev(at: At, current: Revision) -> Revision {
    match at {
        At::Current => current,
        At::Past(r) => r,
    }
}

/// One page without the count (the caller knows it).
async fn page_at<C: deadpool_postgres::GenericClient + Sync>(
    c: &C,
    req: &RangeRequest,
    at: At,
) -> std::result::Result<(Vec<KeyValue>, bool), tokio_postgres::Error> {
    let (from, to) = bounds(&req.range);
    let (sql, rev) = match at {
        At::Current => (CURRENT_IN_RANGE, 0i64),
        At::Past(r) => (LIVE_IN_RANGE, r),
    };
    let n = req.limit.saturating_add(1);
    let rows = c.query(sql, &[&from, &to, &rev, &Some(n)]).await?;
    let more = rows.len() as i64 > req.limit;
    let mut kvs: Vec<KeyValue> = rows.iter().map(|r| kv_from(r, req.keys_only)).collect();
    kvs.truncate(usize::try_from(req.limit).unwrap_or(usize::MAX));
    Ok((kvs, more))
}

/// Reads through any client (pooled connection or the writer's transaction).
async fn range_at<C: deadpool_postgres::GenericClient + Sync>(
    c: &C,
    req: &RangeRequest,
    at: At,
) -> std::result::Result<(Vec<KeyValue>, bool, i64), tokio_postgres::Error> {
    let (from, to) = bounds(&req.range);
    let (rows_sql, count_sql, rev) = match at {
        At::Current => (
            CURRENT_IN_RANGE.to_string(),
            CURRENT_COUNT.to_string(),
            0i64,
        ),
        At::Past(r) => (
            LIVE_IN_RANGE.to_string(),
            format!("SELECT count(*) FROM ({LIVE_IN_RANGE}) c WHERE $4::bigint IS NULL"),
            r,
        ),
    };
    let all: Option<i64> = None;
    if req.count_only {
        let row = c.query_one(&count_sql, &[&from, &to, &rev, &all]).await?;
        return Ok((Vec::new(), false, row.get(0)));
    }
    let limited = req.limit > 0;
    let limit = limited.then(|| req.limit.saturating_add(1));
    let rows = c.query(&rows_sql, &[&from, &to, &rev, &limit]).await?;
    let more = limited && rows.len() as i64 > req.limit;
    let mut kvs: Vec<KeyValue> = rows.iter().map(|r| kv_from(r, req.keys_only)).collect();
    let count = if more {
        kvs.truncate(usize::try_from(req.limit).unwrap_or(usize::MAX));
        c.query_one(&count_sql, &[&from, &to, &rev, &all])
            .await?
            .get(0)
    } else {
        kvs.len() as i64
    };
    Ok((kvs, more, count))
}

impl PgStore {
    /// Connects, creates or upgrades the schema, and starts the writer, watch hub and lease
    /// sweeper.
    pub async fn connect(cfg: PgConfig) -> Result<Self> {
        let mut pg: tokio_postgres::Config = cfg.url.parse().map_err(db)?;
        let manager_config = || ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let tls = cfg.tls.as_ref().map(PgTls::connector).transpose()?;
        let mgr = match &tls {
            Some(connector) => {
                pg.ssl_mode(tokio_postgres::config::SslMode::Require);
                Manager::from_config(pg.clone(), connector.clone(), manager_config())
            }
            None => Manager::from_config(pg.clone(), NoTls, manager_config()),
        };
        let pool = Pool::builder(mgr)
            .max_size(cfg.pool_size.max(2))
            .wait_timeout(Some(cfg.request_timeout))
            .create_timeout(Some(cfg.request_timeout))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(db)?;
        {
            let client = tokio::time::timeout(cfg.request_timeout, pool.get())
                .await
                .map_err(db)?
                .map_err(pool_error)?;
            client.batch_execute(schema::CREATE).await.map_err(db)?;
            let v: i32 = client
                .query_one("SELECT schema_version FROM kmetal_meta WHERE id = 1", &[])
                .await
                .map_err(db)?
                .get(0);
            if v > SCHEMA_VERSION {
                return Err(DatastoreError::Backend {
                    source: format!(
                        "database schema version {v} is newer than this kmetal ({SCHEMA_VERSION})"
                    )
                    .into(),
                });
            }
        }
        let (wtx, wrx) = mpsc::channel(4096);
        let (htx, hrx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(writer_task(pool.clone(), wrx));
        let dispatched = Dispatched::default();
        let hub = tokio::spawn(hub_task(
            pg,
            tls,
            pool.clone(),
            hrx,
            ProgressClock::new(cfg.progress_interval),
            dispatched.clone(),
        ));
        let mut inner = Inner {
            pool,
            counts: CountCache::default(),
            writer: wtx,
            hub: htx,
            dispatched,
            cfg,
            tasks: vec![writer.abort_handle(), hub.abort_handle()],
        };
        let sweeper = tokio::spawn(sweeper_task(
            inner.pool.clone(),
            inner.writer.clone(),
            inner.cfg.lease_sweep,
        ));
        inner.tasks.push(sweeper.abort_handle());
        let auto = inner.cfg.auto_compact;
        let store = Self {
            inner: Arc::new(inner),
        };
        if let Some((every, keep)) = auto {
            let weak = Arc::downgrade(&store.inner);
            spawn_auto_compaction(every, keep, move || {
                weak.upgrade()
                    .map(|inner| Arc::new(PgStore { inner }) as Arc<dyn Datastore>)
            });
        }
        Ok(store)
    }

    async fn write(&self, op: Op) -> Result<Done> {
        let (reply, rx) = oneshot::channel();
        let deadline = self.inner.cfg.request_timeout;
        let send = self.inner.writer.send(Job { op, reply });
        tokio::time::timeout(deadline, async {
            send.await.map_err(|_| db("the writer task has stopped"))?;
            rx.await
                .map_err(|_| db("the writer task dropped the request"))?
        })
        .await
        .map_err(|_| db(format!("write did not finish within {deadline:?}")))?
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        tokio::time::timeout(self.inner.cfg.request_timeout, self.inner.pool.get())
            .await
            .map_err(db)?
            .map_err(pool_error)
    }

    async fn meta(&self) -> Result<(Revision, Revision)> {
        let c = self.client().await?;
        let row = c
            .query_one(
                "SELECT revision, compact_revision FROM kmetal_meta WHERE id = 1",
                &[],
            )
            .await
            .map_err(db)?;
        Ok((row.get(0), row.get(1)))
    }

    /// Runs one compaction batch; returns rows deleted.
    async fn compact_batch(&self, upto: Revision) -> Result<u64> {
        let c = self.client().await?;
        let n = c
            .execute(
                "DELETE FROM kmetal_kv WHERE ctid IN (
                    SELECT k.ctid FROM kmetal_kv k WHERE k.rev <= $1 AND (
                        (k.deleted) OR EXISTS (
                            SELECT 1 FROM kmetal_kv n WHERE n.name = k.name AND n.rev > k.rev AND n.rev <= $1))
                    LIMIT $2)",
                &[&upto, &self.inner.cfg.compaction_batch],
            )
            .await
            .map_err(db)?;
        Ok(n)
    }
}

// ---- the writer ----------------------------------------------------------------------

async fn writer_task(pool: Pool, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let ops: Vec<&Op> = jobs.iter().map(|j| &j.op).collect();
        match run_batch(&pool, &ops).await {
            Ok(results) => {
                for (job, r) in jobs.into_iter().zip(results) {
                    let _ = job.reply.send(r);
                }
            }
            Err(e) => {
                let e = Arc::new(chain(e.as_ref()));
                for job in jobs {
                    // The commit's outcome is unknown: report unavailable, never success.
                    let _ = job.reply.send(Err(db(format!(
                        "the batch failed or its commit is uncertain: {e}"
                    ))));
                }
            }
        }
    }
}

/// An error with its causes, for messages that must be copied to many requests.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

async fn run_batch(
    pool: &Pool,
    ops: &[&Op],
) -> std::result::Result<Vec<Result<Done>>, Box<dyn std::error::Error + Send + Sync>> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_one(
            "SELECT revision, compact_revision, next_lease FROM kmetal_meta WHERE id = 1 FOR UPDATE",
            &[],
        )
        .await?;
    let mut meta = Meta {
        revision: row.get(0),
        compact: row.get(1),
        next_lease: row.get(2),
    };
    let start = meta.revision;
    let mut results = Vec::with_capacity(ops.len());
    let put_many = tx.prepare_cached(PUT_MANY).await?;
    let mut i = 0;
    while i < ops.len() {
        // Puts without a lease or prev_kv cannot fail on their own: a run of them with
        // distinct keys is one multi-row statement (revisions in order), no savepoints.
        let simple = |op: &Op| matches!(op, Op::Put(p) if p.lease == 0 && !p.prev_kv);
        if simple(ops[i]) {
            let mut j = i;
            let mut seen = std::collections::HashSet::new();
            let (mut revs, mut names, mut leases, mut values) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            while j < ops.len() && simple(ops[j]) {
                let Op::Put(p) = ops[j] else { break };
                // A repeated key waits for the next statement: upserts touch a row once.
                if !seen.insert(p.key.clone()) {
                    break;
                }
                revs.push(meta.revision + 1 + (j - i) as i64);
                names.push(p.key.to_vec());
                leases.push(p.lease);
                values.push(p.value.to_vec());
                j += 1;
            }
            tx.execute(&put_many, &[&revs, &names, &leases, &values])
                .await?;
            for _ in i..j {
                meta.revision += 1;
                results.push(Ok(Done::Put(PutResponse {
                    revision: meta.revision,
                    prev_kv: None,
                })));
            }
            i = j;
            continue;
        }
        // A savepoint keeps a failing request from undoing the others in the batch.
        tx.batch_execute("SAVEPOINT w").await?;
        let before = (meta.revision, meta.compact, meta.next_lease);
        match apply(&tx, ops[i], &mut meta).await {
            Ok(done) => {
                tx.batch_execute("RELEASE SAVEPOINT w").await?;
                results.push(Ok(done));
            }
            Err(Fail::Request(e)) => {
                tx.batch_execute("ROLLBACK TO SAVEPOINT w").await?;
                (meta.revision, meta.compact, meta.next_lease) = before;
                results.push(Err(e));
            }
            Err(Fail::Db(e)) => return Err(Box::new(e)),
        }
        i += 1;
    }
    // One round trip: move the meta row and, if anything was written, notify watchers
    // (delivered at commit).
    let stmt = tx
        .prepare_cached(
            "WITH u AS (UPDATE kmetal_meta SET revision = $1, compact_revision = $2, next_lease = $3
                        WHERE id = 1 RETURNING revision)
             SELECT pg_notify($4, revision::text) FROM u WHERE revision <> $5",
        )
        .await?;
    tx.query(
        &stmt,
        &[
            &meta.revision,
            &meta.compact,
            &meta.next_lease,
            &CHANNEL,
            &start,
        ],
    )
    .await?;
    tx.commit().await?;
    Ok(results)
}

type Tx<'a> = deadpool_postgres::Transaction<'a>;

async fn apply(tx: &Tx<'_>, op: &Op, meta: &mut Meta) -> std::result::Result<Done, Fail> {
    match op {
        Op::Put(p) => {
            let rev = meta.revision + 1;
            let r = put(tx, p, rev).await?;
            meta.revision = rev;
            Ok(Done::Put(PutResponse {
                revision: rev,
                prev_kv: r,
            }))
        }
        Op::Delete(d) => {
            let rev = meta.revision + 1;
            let (deleted, prev_kvs) = delete(tx, d, rev).await?;
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
            let rev = meta.revision + 1;
            let mut wrote = false;
            let r = txn(tx, t, rev, &mut wrote).await?;
            if wrote {
                meta.revision = rev;
            }
            Ok(Done::Txn(TxnResponse {
                revision: meta.revision,
                ..r
            }))
        }
        Op::Compact(at) => Ok(Done::Compact(meta.compact_to(*at)?)),
        Op::LeaseGrant { ttl, id } => {
            let id = meta.lease_id(*id);
            let n = tx
                .execute(
                    "INSERT INTO kmetal_lease (id, ttl, expires_at) VALUES ($1, $2::bigint, now() + make_interval(secs => $2::bigint::float8))
                     ON CONFLICT (id) DO NOTHING",
                    &[&id, ttl],
                )
                .await?;
            if n == 0 {
                return Err(DatastoreError::LeaseExists { id }.into());
            }
            Ok(Done::LeaseGrant(LeaseGrant { id, ttl: *ttl }))
        }
        Op::LeaseRevoke(id) => {
            let n = tx
                .execute("DELETE FROM kmetal_lease WHERE id = $1", &[id])
                .await?;
            if n == 0 {
                return Err(DatastoreError::LeaseNotFound { id: *id }.into());
            }
            let rev = meta.revision + 1;
            let keys = tx
                .query(
                    "SELECT c.name FROM kmetal_current c JOIN kmetal_kv k ON k.name = c.name AND k.rev = c.rev WHERE k.lease = $1",
                    &[id],
                )
                .await?;
            for k in &keys {
                let name: Vec<u8> = k.get(0);
                tombstone(tx, &name, rev).await?;
            }
            if !keys.is_empty() {
                meta.revision = rev;
            }
            Ok(Done::LeaseRevoke(meta.revision))
        }
    }
}

async fn lease_exists(tx: &Tx<'_>, id: LeaseId) -> std::result::Result<(), Fail> {
    if id == 0 {
        return Ok(());
    }
    let r = tx
        .query_opt("SELECT 1 FROM kmetal_lease WHERE id = $1", &[&id])
        .await?;
    match r {
        Some(_) => Ok(()),
        None => Err(DatastoreError::LeaseNotFound { id }.into()),
    }
}

/// The latest row of `name` if the key is live.
async fn live(tx: &Tx<'_>, name: &[u8]) -> std::result::Result<Option<KeyValue>, Fail> {
    let stmt = tx
        .prepare_cached(
            "SELECT k.name, k.rev, k.create_revision, k.version, k.lease, k.value
             FROM kmetal_current c JOIN kmetal_kv k ON k.name = c.name AND k.rev = c.rev
             WHERE c.name = $1",
        )
        .await?;
    let row = tx.query_opt(&stmt, &[&name]).await?;
    Ok(row.map(|r| kv_from(&r, false)))
}

/// Writes one put at `rev` and moves `kmetal_current`, in one statement.
const PUT: &str = "WITH prev AS (
        SELECT rev, create_revision, version FROM kmetal_current WHERE name = $2),
    ins AS (
        INSERT INTO kmetal_kv (rev, name, create_revision, prev_revision, version, deleted, lease, value)
        SELECT $1, $2, COALESCE(p.create_revision, $1),
            COALESCE(p.rev, (SELECT rev FROM kmetal_kv WHERE name = $2 ORDER BY rev DESC LIMIT 1), 0),
            COALESCE(p.version, 0) + 1, false, $3, $4
        FROM (SELECT 1) one LEFT JOIN prev p ON true
        RETURNING rev, create_revision, version)
    INSERT INTO kmetal_current (name, rev, create_revision, version)
    SELECT $2, rev, create_revision, version FROM ins
    ON CONFLICT (name) DO UPDATE SET rev = EXCLUDED.rev,
        create_revision = EXCLUDED.create_revision, version = EXCLUDED.version";

/// [`PUT`] for many keys (distinct) at consecutive revisions, from parallel arrays.
const PUT_MANY: &str = "WITH input AS (
        SELECT * FROM unnest($1::bigint[], $2::bytea[], $3::bigint[], $4::bytea[])
            AS t(rev, name, lease, value)),
    ins AS (
        INSERT INTO kmetal_kv (rev, name, create_revision, prev_revision, version, deleted, lease, value)
        SELECT i.rev, i.name, COALESCE(c.create_revision, i.rev),
            COALESCE(c.rev, (SELECT k.rev FROM kmetal_kv k WHERE k.name = i.name ORDER BY k.rev DESC LIMIT 1), 0),
            COALESCE(c.version, 0) + 1, false, i.lease, i.value
        FROM input i LEFT JOIN kmetal_current c ON c.name = i.name
        RETURNING rev, name, create_revision, version)
    INSERT INTO kmetal_current (name, rev, create_revision, version)
    SELECT name, rev, create_revision, version FROM ins
    ON CONFLICT (name) DO UPDATE SET rev = EXCLUDED.rev,
        create_revision = EXCLUDED.create_revision, version = EXCLUDED.version";

async fn put(
    tx: &Tx<'_>,
    p: &PutRequest,
    rev: Revision,
) -> std::result::Result<Option<KeyValue>, Fail> {
    lease_exists(tx, p.lease).await?;
    let stmt = tx.prepare_cached(PUT).await?;
    let prev = if p.prev_kv {
        live(tx, &p.key).await?
    } else {
        None
    };
    tx.execute(&stmt, &[&rev, &p.key.as_ref(), &p.lease, &p.value.as_ref()])
        .await?;
    Ok(prev)
}

async fn tombstone(tx: &Tx<'_>, name: &[u8], rev: Revision) -> std::result::Result<(), Fail> {
    let stmt = tx
        .prepare_cached(
            "WITH gone AS (DELETE FROM kmetal_current WHERE name = $2 RETURNING rev)
             INSERT INTO kmetal_kv (rev, name, create_revision, prev_revision, version, deleted, lease, value)
             SELECT $1, $2, 0, rev, 0, true, 0, ''::bytea FROM gone",
        )
        .await?;
    tx.execute(&stmt, &[&rev, &name]).await?;
    Ok(())
}

async fn delete(
    tx: &Tx<'_>,
    d: &DeleteRangeRequest,
    rev: Revision,
) -> std::result::Result<(i64, Vec<KeyValue>), Fail> {
    let req = RangeRequest {
        range: d.range.clone(),
        ..RangeRequest::default()
    };
    let (kvs, _, _) = range_at(tx, &req, At::Current).await?;
    for kv in &kvs {
        tombstone(tx, &kv.key, rev).await?;
    }
    let n = kvs.len() as i64;
    Ok((n, if d.prev_kv { kvs } else { Vec::new() }))
}

async fn compare_ok(tx: &Tx<'_>, c: &Compare) -> std::result::Result<bool, Fail> {
    if c.range.is_single() {
        let kv = live(tx, &c.range.key).await?;
        return Ok(c.matches(kv.as_ref()));
    }
    let req = RangeRequest {
        range: c.range.clone(),
        keys_only: !matches!(c.target, CompareTarget::Value(_)),
        ..RangeRequest::default()
    };
    let (kvs, _, _) = range_at(tx, &req, At::Current).await?;
    // An empty range passes vacuously, as in the memory driver.
    Ok(kvs.iter().all(|kv| c.matches(Some(kv))))
}

async fn txn(
    tx: &Tx<'_>,
    t: &TxnRequest,
    rev: Revision,
    wrote: &mut bool,
) -> std::result::Result<TxnResponse, Fail> {
    let mut succeeded = true;
    for c in &t.compare {
        if !compare_ok(tx, c).await? {
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
                let at = if r.revision > 0 && r.revision < rev - 1 {
                    At::Past(r.revision)
                } else {
                    At::Current
                };
                let (kvs, more, count) = range_at(tx, r, at).await?;
                ResponseOp::Range(RangeResponse {
                    revision: rev - 1 + i64::from(*wrote),
                    kvs,
                    more,
                    count,
                })
            }
            RequestOp::Put(p) => {
                let prev_kv = put(tx, p, rev).await?;
                *wrote = true;
                ResponseOp::Put(PutResponse {
                    revision: rev,
                    prev_kv,
                })
            }
            RequestOp::DeleteRange(d) => {
                let (deleted, prev_kvs) = delete(tx, d, rev).await?;
                *wrote |= deleted > 0;
                ResponseOp::DeleteRange(DeleteRangeResponse {
                    revision: rev,
                    deleted,
                    prev_kvs,
                })
            }
            RequestOp::Txn(inner) => ResponseOp::Txn(Box::pin(txn(tx, inner, rev, wrote)).await?),
        });
    }
    Ok(TxnResponse {
        revision: rev,
        succeeded,
        responses,
    })
}

// ---- watches --------------------------------------------------------------------------

/// Rows of revisions `> after` (or `>= from` for a replay), with the previous row's value.
const EVENTS: &str =
    "SELECT k.rev, k.name, k.create_revision, k.version, k.deleted, k.lease, k.value,
        p.rev AS p_rev, p.create_revision AS p_create, p.version AS p_version, p.lease AS p_lease,
        p.value AS p_value, p.deleted AS p_deleted
    FROM kmetal_kv k LEFT JOIN kmetal_kv p ON p.name = k.name AND p.rev = k.prev_revision
    WHERE k.rev > $1 AND k.rev <= $2 ORDER BY k.rev, k.name";

fn event_from(row: &Row) -> (Revision, Event) {
    let rev: Revision = row.get("rev");
    let key = Bytes::from(row.get::<_, Vec<u8>>("name"));
    let deleted: bool = row.get("deleted");
    let prev = row.get::<_, Option<Revision>>("p_rev").and_then(|p_rev| {
        if row.get::<_, Option<bool>>("p_deleted").unwrap_or(true) {
            return None;
        }
        Some(KeyValue {
            key: key.clone(),
            value: Bytes::from(row.get::<_, Option<Vec<u8>>>("p_value").unwrap_or_default()),
            create_revision: row.get::<_, Option<i64>>("p_create").unwrap_or(0),
            mod_revision: p_rev,
            version: row.get::<_, Option<i64>>("p_version").unwrap_or(0),
            lease: row.get::<_, Option<i64>>("p_lease").unwrap_or(0),
        })
    });
    let kv = if deleted {
        KeyValue {
            key,
            mod_revision: rev,
            ..KeyValue::default()
        }
    } else {
        KeyValue {
            key,
            value: Bytes::from(row.get::<_, Vec<u8>>("value")),
            create_revision: row.get("create_revision"),
            mod_revision: rev,
            version: row.get("version"),
            lease: row.get("lease"),
        }
    };
    (
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
    )
}

/// Polls a LISTEN connection, forwarding each notification's revision.
fn spawn_listener<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    tx: mpsc::UnboundedSender<Option<Revision>>,
) -> tokio::task::JoinHandle<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                    let _ = tx.send(n.payload().parse().ok());
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            }
        }
    })
}

async fn hub_task(
    pg: tokio_postgres::Config,
    tls: Option<tls::RustlsConnect>,
    pool: Pool,
    mut rx: mpsc::UnboundedReceiver<HubMsg>,
    mut progress: ProgressClock,
    dispatched: Dispatched,
) {
    let mut watchers: HashMap<u64, Watcher> = HashMap::new();
    let mut last: Option<Revision> = None;
    let mut progress_tick = tokio::time::interval(progress.tick());
    loop {
        // A dedicated connection for LISTEN, also used for the hub's reads (no pool waits on
        // the watch path). Notifications carry the committed revision.
        let (notify_tx, mut notify_rx) = mpsc::unbounded_channel::<Option<Revision>>();
        // The driver owns the only sender: when the connection dies the channel closes and
        // the hub reconnects.
        let connected = match &tls {
            Some(connector) => match pg.connect(connector.clone()).await {
                Ok((client, conn)) => Some((client, spawn_listener(conn, notify_tx))),
                Err(_) => None,
            },
            None => match pg.connect(NoTls).await {
                Ok((client, conn)) => Some((client, spawn_listener(conn, notify_tx))),
                Err(_) => None,
            },
        };
        let listener = match connected {
            Some((client, driver)) => {
                if client
                    .batch_execute(&format!("LISTEN {CHANNEL}"))
                    .await
                    .is_err()
                {
                    driver.abort();
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Some((client, driver))
            }
            None => None,
        };
        if listener.is_none() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        loop {
            // What to read: None = nothing; Some(None) = ask the database; Some(Some(r)) = up
            // to the notified revision.
            let mut read: Option<Option<Revision>> = None;
            tokio::select! {
                msg = rx.recv() => match msg {
                    None => return,
                    Some(HubMsg::Remove(id)) => { watchers.remove(&id); }
                    Some(HubMsg::Add(id, mut w)) => {
                        // Replay history up to what has been dispatched, then go live.
                        let upto = match last {
                            Some(l) => l,
                            None => match current(listener.as_ref().map(|l| &l.0), &pool).await {
                                Ok(c) => c,
                                Err(e) => { let _ = w.tx.send(Err(db(e))); continue; }
                            },
                        };
                        if w.next <= upto {
                            match load_events(listener.as_ref().map(|l| &l.0), &pool, w.next - 1, upto).await {
                                Ok(ev) => { deliver(&mut w, &ev, upto); }
                                Err(e) => { let _ = w.tx.send(Err(db(e))); continue; }
                            }
                        } else {
                            w.next = w.next.max(upto + 1);
                        }
                        last = Some(upto);
                        dispatched.set(upto);
                        watchers.insert(id, w);
                    }
                },
                n = notify_rx.recv(), if listener.is_some() => {
                    let Some(mut rev) = n else { break };
                    // Coalesce a burst of notifications into one read.
                    while let Ok(more) = notify_rx.try_recv() {
                        rev = match (rev, more) { (Some(a), Some(b)) => Some(a.max(b)), _ => None };
                    }
                    read = Some(rev);
                }
                _ = progress_tick.tick() => { read = Some(None); }
            }
            let client = listener.as_ref().map(|l| &l.0);
            match read {
                Some(hint) if !watchers.is_empty() => {
                    // A failed read means a broken connection: reconnect and read again from
                    // `last`, so nothing is skipped.
                    let now = match hint {
                        Some(r) => r,
                        None => match current(client, &pool).await {
                            Ok(c) => c,
                            Err(_) => break,
                        },
                    };
                    let from = last.unwrap_or(now);
                    if now > from {
                        let Ok(ev) = load_events(client, &pool, from, now).await else {
                            break;
                        };
                        watchers.retain(|_, w| deliver(w, &ev, now));
                        last = Some(now);
                        dispatched.set(now);
                    } else if hint.is_none() {
                        last = Some(from);
                        dispatched.set(from);
                        // Idle: progress notifications for those who asked, once per interval.
                        if progress.due() {
                            watchers.retain(|_, w| {
                                !w.progress
                                    || w.tx
                                        .send(Ok(WatchBatch {
                                            revision: from,
                                            events: Vec::new(),
                                        }))
                                        .is_ok()
                            });
                        }
                    }
                }
                Some(_) => {
                    last = current(client, &pool).await.ok().or(last);
                    // No watch is registered: none has anything pending.
                    if let Some(l) = last {
                        dispatched.set(l);
                    }
                }
                None => {}
            }
            // Without a listener, serve one round from the pool, then try to listen again.
            if listener
                .as_ref()
                .is_none_or(|(_, driver)| driver.is_finished())
            {
                break;
            }
        }
        if let Some((_, driver)) = listener {
            driver.abort();
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The current revision, through `client` if there is one, else a pooled connection.
async fn current(
    client: Option<&tokio_postgres::Client>,
    pool: &Pool,
) -> std::result::Result<Revision, BoxError> {
    const SQL: &str = "SELECT revision FROM kmetal_meta WHERE id = 1";
    Ok(match client {
        Some(c) => c.query_one(SQL, &[]).await?.get(0),
        None => pool.get().await?.query_one(SQL, &[]).await?.get(0),
    })
}

async fn load_events(
    client: Option<&tokio_postgres::Client>,
    pool: &Pool,
    after: Revision,
    upto: Revision,
) -> std::result::Result<Vec<(Revision, Event)>, BoxError> {
    let rows = match client {
        Some(c) => c.query(EVENTS, &[&after, &upto]).await?,
        None => pool.get().await?.query(EVENTS, &[&after, &upto]).await?,
    };
    Ok(rows.iter().map(event_from).collect())
}

// ---- leases ---------------------------------------------------------------------------

async fn sweeper_task(pool: Pool, writer: mpsc::Sender<Job>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let Ok(c) = pool.get().await else { continue };
        let Ok(rows) = c
            .query(
                "SELECT id FROM kmetal_lease WHERE expires_at <= now() LIMIT 100",
                &[],
            )
            .await
        else {
            continue;
        };
        drop(c);
        for r in rows {
            let (reply, rx) = oneshot::channel();
            let id: LeaseId = r.get(0);
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
            // Another process may have revoked it first: LeaseNotFound is fine.
            let _ = rx.await;
        }
    }
}

#[async_trait]
impl Datastore for PgStore {
    async fn range(&self, req: RangeRequest) -> Result<RangeResponse> {
        if req.range.key.is_empty() {
            return Err(DatastoreError::EmptyKey);
        }
        let c = self.client().await?;
        // One snapshot for the revision and the rows.
        let mut c = c;
        let tx = c
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(db)?;
        let row = tx
            .query_one(
                "SELECT revision, compact_revision FROM kmetal_meta WHERE id = 1",
                &[],
            )
            .await
            .map_err(db)?;
        let (current, compacted): (Revision, Revision) = (row.get(0), row.get(1));
        if req.revision > current {
            return Err(DatastoreError::FutureRevision {
                requested: req.revision,
                current,
            });
        }
        if req.revision > 0 && req.revision < compacted {
            return Err(DatastoreError::Compacted {
                requested: req.revision,
                compacted,
            });
        }
        // The snapshot holds meta and kmetal_current together: at its own revision the
        // current table is exact.
        let at = if req.revision > 0 && req.revision < current {
            At::Past(req.revision)
        } else {
            At::Current
        };
        let key = |from: &[u8]| {
            (
                req.range.range_end.to_vec(),
                at_rev(at, current),
                from.to_vec(),
            )
        };
        let cached = self
            .inner
            .counts
            .lock()
            .ok()
            .and_then(|c| c.get(&key(&req.range.key)).copied());
        let (kvs, more, count) = match cached {
            Some(count) if req.limit > 0 && !req.count_only => {
                let (kvs, more) = page_at(&tx, &req, at).await.map_err(db)?;
                (kvs, more, count)
            }
            _ => range_at(&tx, &req, at).await.map_err(db)?,
        };
        tx.commit().await.map_err(db)?;
        if more && let (Some(last), Ok(mut cache)) = (kvs.last(), self.inner.counts.lock()) {
            if cache.len() >= COUNT_CACHE_SIZE {
                cache.clear();
            }
            let mut next = last.key.to_vec();
            next.push(0);
            cache.insert(key(&next), count - kvs.len() as i64);
        }
        Ok(RangeResponse {
            revision: current,
            kvs,
            more,
            count,
        })
    }

    async fn put(&self, req: PutRequest) -> Result<PutResponse> {
        self.inner.cfg.limits.check_put(&req)?;
        match self.write(Op::Put(req)).await? {
            Done::Put(r) => Ok(r),
            _ => Err(db("writer answered with the wrong kind")),
        }
    }

    async fn delete_range(&self, req: DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        if req.range.key.is_empty() {
            return Err(DatastoreError::EmptyKey);
        }
        match self.write(Op::Delete(req)).await? {
            Done::Delete(r) => Ok(r),
            _ => Err(db("writer answered with the wrong kind")),
        }
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse> {
        self.inner.cfg.limits.check_txn(&req)?;
        match self.write(Op::Txn(req)).await? {
            Done::Txn(r) => Ok(r),
            _ => Err(db("writer answered with the wrong kind")),
        }
    }

    async fn compact(&self, revision: Revision) -> Result<CompactResponse> {
        let r = match self.write(Op::Compact(revision)).await? {
            Done::Compact(r) => r,
            _ => return Err(db("writer answered with the wrong kind")),
        };
        // Bounded batches outside the writer: writers are never held for long.
        while self.compact_batch(revision).await? > 0 {}
        Ok(r)
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
        let w = Watcher {
            range: req.range,
            next,
            prev_kv: req.prev_kv,
            no_put: req.no_put,
            no_delete: req.no_delete,
            progress: req.progress_notify,
            tx,
        };
        self.inner
            .hub
            .send(HubMsg::Add(id, w))
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
            _ => Err(db("writer answered with the wrong kind")),
        }
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<Revision> {
        match self.write(Op::LeaseRevoke(id)).await? {
            Done::LeaseRevoke(r) => Ok(r),
            _ => Err(db("writer answered with the wrong kind")),
        }
    }

    async fn lease_keep_alive(&self, id: LeaseId) -> Result<i64> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                "UPDATE kmetal_lease SET expires_at = now() + make_interval(secs => ttl::float8)
                 WHERE id = $1 AND expires_at > now() RETURNING ttl",
                &[&id],
            )
            .await
            .map_err(db)?;
        row.map(|r| r.get(0))
            .ok_or(DatastoreError::LeaseNotFound { id })
    }

    async fn lease_time_to_live(&self, id: LeaseId, keys: bool) -> Result<LeaseInfo> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                "SELECT ttl, GREATEST(0, ceil(extract(epoch FROM expires_at - now())))::bigint
                 FROM kmetal_lease WHERE id = $1 AND expires_at > now()",
                &[&id],
            )
            .await
            .map_err(db)?
            .ok_or(DatastoreError::LeaseNotFound { id })?;
        let mut names = Vec::new();
        if keys {
            let rows = c
                .query(
                    "SELECT c.name FROM kmetal_current c JOIN kmetal_kv k ON k.name = c.name AND k.rev = c.rev WHERE k.lease = $1 ORDER BY c.name",
                    &[&id],
                )
                .await
                .map_err(db)?;
            names = rows
                .iter()
                .map(|r| Bytes::from(r.get::<_, Vec<u8>>(0)))
                .collect();
        }
        Ok(LeaseInfo {
            id,
            ttl: row.get(1),
            granted_ttl: row.get(0),
            keys: names,
        })
    }

    async fn leases(&self) -> Result<Vec<LeaseId>> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT id FROM kmetal_lease WHERE expires_at > now() ORDER BY id",
                &[],
            )
            .await
            .map_err(db)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn watch_dispatched(&self) -> Option<Revision> {
        Some(self.inner.dispatched.get())
    }

    async fn status(&self) -> Result<Status> {
        let c = self.client().await?;
        let row = c
            .query_one(
                "SELECT revision, compact_revision, pg_database_size(current_database())::bigint
                 FROM kmetal_meta WHERE id = 1",
                &[],
            )
            .await
            .map_err(db)?;
        Ok(Status {
            revision: row.get(0),
            compact_revision: row.get(1),
            db_size: u64::try_from(row.get::<_, i64>(2)).unwrap_or(0),
        })
    }
}
