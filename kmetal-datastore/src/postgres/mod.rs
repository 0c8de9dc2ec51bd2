//! The PostgreSQL dialect of the shared SQL log ([`crate::sqllog`]): a kine-style revision
//! log that beats kine's known weaknesses.
//!
//! - **Writes are batched** by the shared writer under the `kmetal_meta` row lock (one
//!   revision per write, gapless, commits in revision order); runs of plain puts are one
//!   multi-row statement.
//! - **Watches** hear this store's writer at once and other processes' writes through
//!   `LISTEN`/`NOTIFY`; the hub reads new rows over the listening connection, and a lost
//!   connection resumes from the last dispatched revision (a 1 s tick covers a missed
//!   notification).
//! - **Leases** are rows with an expiry time in the server's clock, so expiry survives restarts.
//! - **Errors** pass through one classification ([`PgError`]): authentication and privilege
//!   failures are `PermissionDenied`; connection loss, shutdown, overload and serialization
//!   conflicts `Unavailable`; anything else (a missing database, a constraint, a bad URL)
//!   `Backend`.

mod analyze;
mod provision;
mod schema;
mod tls;

pub use provision::{PgCredentials, PgProvisioner};
pub use schema::SCHEMA_VERSION;
pub use tls::{PgTls, PgTlsError};

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod};
use tokio::sync::{mpsc, watch};
use tokio_postgres::{NoTls, Row, Statement};

use crate::error::{DatastoreError, Result};
use crate::model::{Event, KeyRange, KeyValue, LeaseId, PutRequest, RangeRequest, Revision};
use crate::sqllog::dialect::{
    Classify, Dialect, ErrorClass, LeaseRow, LogFeed, LogRead, LogWriter, NextExpiry, RangeOutcome,
    fault,
};
use crate::sqllog::read::{Counts, LogRow, bounds, event, range_in};
use crate::sqllog::write::Meta;
use crate::sqllog::{LogOptions, SqlLog, WriterHome, check_schema, delegate_datastore};

/// How to reach the database and how the store behaves.
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// A libpq-style connection string or URL (`host=… user=… dbname=…`).
    pub url: String,
    /// Connections in the pool (the writer holds one of them).
    pub pool_size: usize,
    /// TLS to the server (`sslmode=require` with certificate verification), or plain TCP.
    pub tls: Option<PgTls>,
    /// What every SQL store shares.
    pub log: LogOptions,
    /// Connections unused this long are closed, the writer's included (it gives its own back
    /// whenever it has nothing queued); `None` keeps them open.
    pub idle_timeout: Option<Duration>,
    /// Whether other processes may write this database: a `LISTEN` connection then tells the
    /// watch hub about their writes (and its tick reads the revision). Off, the store is the
    /// database's only writer and holds no connection while idle.
    pub listen: bool,
}

impl PgConfig {
    /// Defaults for `url`: 8 pooled connections, plain TCP, [`LogOptions::default`].
    pub fn new(url: impl Into<String>) -> Self {
        let (url, pool_size, log) = (url.into(), 8, LogOptions::default());
        Self {
            url,
            pool_size,
            tls: None,
            log,
            idle_timeout: None,
            listen: true,
        }
    }

    /// The same for a store that is its database's only writer (the operator's per-tenant
    /// endpoint) on a server shared by more tenants than it has connection slots: no
    /// `LISTEN` connection, and every connection closed after `idle` unused, so an idle tenant
    /// holds none. A server that is full answers with a retryable `Unavailable`.
    /// Expired leases are then looked for every `2 × idle` (each look takes a connection).
    pub fn with_lazy_connections(mut self, idle: Duration) -> Self {
        self.idle_timeout = Some(idle);
        self.listen = false;
        self.log.lease_sweep = self.log.lease_sweep.max(idle * 2);
        self
    }

    /// The same with another watch progress notification interval.
    pub fn with_progress_interval(mut self, interval: Duration) -> Self {
        self.log.progress_interval = interval;
        self
    }
}

/// Why a PostgreSQL call failed (the source of the datastore error it becomes).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// The server refused or failed a statement, or the connection broke.
    #[error("postgres request failed")]
    Query(#[from] tokio_postgres::Error),
    /// No pooled connection could be had (connecting failed, or the wait timed out).
    #[error("no connection from the pool")]
    Pool(#[from] PoolError),
    /// The connection string does not parse.
    #[error("invalid connection string")]
    Config(#[source] tokio_postgres::Error),
    /// The writer had given its connection back (a bug: every transaction takes one first).
    #[error("the writer holds no connection")]
    Released,
    /// The pool could not be built.
    #[error("cannot build the connection pool")]
    Build(#[from] deadpool_postgres::BuildError),
    /// The TLS settings are unusable.
    #[error("unusable TLS settings")]
    Tls(#[from] tls::PgTlsError),
}

fn class_of(e: &tokio_postgres::Error) -> ErrorClass {
    if let Some(code) = e.code().map(|c| c.code()) {
        return match code.get(..2) {
            Some("28") => ErrorClass::PermissionDenied,
            _ if code == "42501" => ErrorClass::PermissionDenied,
            Some("08" | "57" | "53" | "40") => ErrorClass::Unavailable,
            _ => ErrorClass::Backend,
        };
    }
    // No SQLSTATE: the connection broke (I/O, closed) or the client gave up on it.
    let io = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
    if e.to_string().starts_with("authentication error") {
        ErrorClass::PermissionDenied
    } else if io || e.is_closed() {
        ErrorClass::Unavailable
    } else {
        ErrorClass::Backend
    }
}

impl Classify for PgError {
    fn class(&self) -> ErrorClass {
        match self {
            Self::Query(e) | Self::Pool(PoolError::Backend(e)) => class_of(e),
            Self::Pool(PoolError::Timeout(_) | PoolError::Closed) | Self::Released => {
                ErrorClass::Unavailable
            }
            Self::Pool(_) | Self::Config(_) | Self::Build(_) | Self::Tls(_) => ErrorClass::Backend,
        }
    }
}

/// The datastore error a PostgreSQL error becomes (for the provisioner).
pub(crate) fn pg_error(e: tokio_postgres::Error) -> DatastoreError {
    fault(PgError::Query(e))
}

type Pg<T> = std::result::Result<T, PgError>;
type Params<'a> = &'a [&'a (dyn tokio_postgres::types::ToSql + Sync)];

/// The NOTIFY channel.
const CHANNEL: &str = "kmetal_revision";

const META: &str = "SELECT revision, compact_revision, next_lease FROM kmetal_meta WHERE id = 1";

/// The latest live row of every key in a range at revision `$3` (`$2` NULL = unbounded; `$4`
/// the row limit, NULL for all).
const LIVE_IN_RANGE: &str = "SELECT name, rev, create_revision, version, lease, value FROM (
    SELECT DISTINCT ON (name) name, rev, create_revision, version, deleted, lease, value
    FROM kmetal_kv WHERE name >= $1 AND ($2::bytea IS NULL OR name < $2) AND rev <= $3
    ORDER BY name, rev DESC) t WHERE NOT deleted ORDER BY name LIMIT $4";

/// The same at the current revision, from `kmetal_current` (`$3` unused, keeping the
/// parameters alike). The limit sits inside, on the ordered index scan of `kmetal_current`,
/// so a page costs its own rows whatever the planner's statistics say.
const CURRENT_IN_RANGE: &str =
    "SELECT k.name, k.rev, k.create_revision, k.version, k.lease, k.value
    FROM (SELECT name, rev FROM kmetal_current
          WHERE name >= $1 AND ($2::bytea IS NULL OR name < $2) AND $3::bigint IS NOT NULL
          ORDER BY name LIMIT $4) c
    CROSS JOIN LATERAL (SELECT * FROM kmetal_kv k WHERE k.name = c.name AND k.rev = c.rev) k
    ORDER BY c.name";

/// Counts at the current revision: an index-only range scan (`$3` unused).
const CURRENT_COUNT: &str = "SELECT count(*) FROM kmetal_current
    WHERE name >= $1 AND ($2::bytea IS NULL OR name < $2) AND $3::bigint IS NOT NULL";

/// Writes one put at `$1` and moves `kmetal_current`, in one statement.
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

/// The live rows of the keys the `WHERE` clause picks.
macro_rules! live_rows {
    ($where:literal) => {
        concat!(
            "SELECT k.name, k.rev, k.create_revision, k.version, k.lease, k.value
             FROM kmetal_current c JOIN kmetal_kv k ON k.name = c.name AND k.rev = c.rev
             WHERE ",
            $where
        )
    };
}

/// The live row of `$1`.
const LIVE_ONE: &str = live_rows!("c.name = $1");
/// The live rows of the keys in `$1`.
const LIVE_ANY: &str = live_rows!("c.name = ANY($1::bytea[])");

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

/// Rows of revisions in `($1, $2]`, with the row each replaced.
const EVENTS: &str =
    "SELECT k.rev, k.name, k.create_revision, k.version, k.deleted, k.lease, k.value,
        p.rev AS p_rev, p.create_revision AS p_create, p.version AS p_version,
        p.deleted AS p_deleted, p.lease AS p_lease, p.value AS p_value
    FROM kmetal_kv k LEFT JOIN kmetal_kv p ON p.name = k.name AND p.rev = k.prev_revision
    WHERE k.rev > $1 AND k.rev <= $2 ORDER BY k.rev, k.name";

const LEASE_KEYS: &str = "SELECT c.name FROM kmetal_current c
    JOIN kmetal_kv k ON k.name = c.name AND k.rev = c.rev WHERE k.lease = $1 ORDER BY c.name";

fn kv_from(row: &Row, keys_only: bool) -> KeyValue {
    KeyValue {
        key: Bytes::from(row.get::<_, Vec<u8>>("name")),
        value: if keys_only {
            Bytes::new()
        } else {
            Bytes::from(row.get::<_, Vec<u8>>("value"))
        },
        create_revision: row.get("create_revision"),
        mod_revision: row.get("rev"),
        version: row.get("version"),
        lease: row.get("lease"),
    }
}

fn event_from(row: &Row) -> (Revision, Event) {
    let prev = row.get::<_, Option<Revision>>("p_rev").map(|rev| LogRow {
        rev,
        deleted: row.get::<_, Option<bool>>("p_deleted").unwrap_or(true),
        create_revision: row.get::<_, Option<i64>>("p_create").unwrap_or(0),
        version: row.get::<_, Option<i64>>("p_version").unwrap_or(0),
        lease: row.get::<_, Option<i64>>("p_lease").unwrap_or(0),
        value: Bytes::from(row.get::<_, Option<Vec<u8>>>("p_value").unwrap_or_default()),
    });
    let this = LogRow {
        rev: row.get("rev"),
        deleted: row.get("deleted"),
        create_revision: row.get("create_revision"),
        version: row.get("version"),
        lease: row.get("lease"),
        value: Bytes::from(row.get::<_, Vec<u8>>("value")),
    };
    event(Bytes::from(row.get::<_, Vec<u8>>("name")), this, prev)
}

/// A pooled connection: the writer's (kept while it works, replaced once broken) or a read
/// snapshot's.
struct Conn {
    pool: Pool,
    /// `None` once the writer gave it back while idle (`idle_timeout`).
    c: Option<Object>,
    /// The writer's: give the connection back whenever nothing is queued.
    release_idle: bool,
    /// The meta row a read snapshot began with (saves reading it twice).
    began: Option<(Revision, Revision)>,
    /// The writer's: when to refresh the planner's statistics.
    analyzer: Option<analyze::Analyzer>,
    /// The writer's: the id its notifications carry, so that its own store's listener can
    /// leave them to the hub's local wake-up (which brings the events along).
    writer_id: String,
}

impl Conn {
    async fn get(pool: &Pool) -> Pg<Self> {
        let (pool, c) = (pool.clone(), Some(pool.get().await?));
        Ok(Self {
            pool,
            c,
            release_idle: false,
            began: None,
            analyzer: None,
            writer_id: String::new(),
        })
    }

    fn c(&self) -> Pg<&Object> {
        self.c.as_ref().ok_or(PgError::Released)
    }

    async fn one(&self, sql: &str, params: Params<'_>) -> Pg<Row> {
        let c = self.c()?;
        let stmt = c.prepare_cached(sql).await?;
        Ok(c.query_one(&stmt, params).await?)
    }

    async fn opt(&self, sql: &str, params: Params<'_>) -> Pg<Option<Row>> {
        let c = self.c()?;
        let stmt = c.prepare_cached(sql).await?;
        Ok(c.query_opt(&stmt, params).await?)
    }

    async fn exec(&self, sql: &str, params: Params<'_>) -> Pg<u64> {
        let c = self.c()?;
        let stmt = c.prepare_cached(sql).await?;
        Ok(c.execute(&stmt, params).await?)
    }

    async fn all(&self, sql: &str, params: Params<'_>) -> Pg<Vec<Row>> {
        let c = self.c()?;
        let stmt = c.prepare_cached(sql).await?;
        Ok(c.query(&stmt, params).await?)
    }

    /// Starts a transaction with `begin` and reads the meta row, in one round trip.
    async fn open(&self, begin: &str, meta: &str) -> Pg<Meta> {
        let c = self.c()?;
        let stmt = c.prepare_cached(meta).await?;
        let (began, row) = tokio::join!(c.batch_execute(begin), c.query_one(&stmt, &[]));
        began?;
        let row = row?;
        Ok(Meta {
            revision: row.get(0),
            compact: row.get(1),
            next_lease: row.get(2),
        })
    }
}

#[async_trait]
impl LogRead for Conn {
    type Error = PgError;

    async fn meta(&mut self) -> Pg<(Revision, Revision)> {
        if let Some(m) = self.began.take() {
            return Ok(m);
        }
        let row = self.one(META, &[]).await?;
        Ok((row.get(0), row.get(1)))
    }

    async fn rows(
        &mut self,
        range: &KeyRange,
        at: Option<Revision>,
        limit: Option<i64>,
        keys_only: bool,
    ) -> Pg<Vec<KeyValue>> {
        let (from, to) = bounds(range);
        let (sql, rev) = match at {
            None => (CURRENT_IN_RANGE, 0),
            Some(r) => (LIVE_IN_RANGE, r),
        };
        let rows = self.all(sql, &[&from, &to, &rev, &limit]).await?;
        Ok(rows.iter().map(|r| kv_from(r, keys_only)).collect())
    }

    async fn count(&mut self, range: &KeyRange, at: Option<Revision>) -> Pg<i64> {
        let (from, to) = bounds(range);
        let row = match at {
            None => self.one(CURRENT_COUNT, &[&from, &to, &0i64]).await?,
            Some(rev) => {
                let sql = format!("SELECT count(*) FROM ({LIVE_IN_RANGE}) c");
                let all: Option<i64> = None;
                self.one(&sql, &[&from, &to, &rev, &all]).await?
            }
        };
        Ok(row.get(0))
    }
}

#[async_trait]
impl LogWriter for Conn {
    async fn begin(&mut self) -> Pg<Meta> {
        if self.c.as_ref().is_none_or(|c| c.is_closed()) {
            self.c = Some(self.pool.get().await?);
        }
        self.open("BEGIN", &format!("{META} FOR UPDATE")).await
    }

    async fn commit(&mut self, meta: &Meta, start: Revision) -> Pg<()> {
        // One round trip: move the meta row, notify other processes if anything was written
        // (delivered at commit), and commit.
        let stmt = self
            .c()?
            .prepare_cached(
                "WITH u AS (UPDATE kmetal_meta SET revision = $1, compact_revision = $2,
                    next_lease = $3 WHERE id = 1 RETURNING revision)
                 SELECT pg_notify($4, revision::text || ':' || $6) FROM u WHERE revision <> $5",
            )
            .await?;
        let c = self.c()?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] = [
            &meta.revision,
            &meta.compact,
            &meta.next_lease,
            &CHANNEL,
            &start,
            &self.writer_id,
        ];
        let (updated, committed) = tokio::join!(c.query(&stmt, &params), c.batch_execute("COMMIT"));
        updated?;
        committed?;
        if let Some(a) = &mut self.analyzer {
            a.committed(meta.revision, &self.pool);
        }
        Ok(())
    }

    async fn rollback(&mut self) {
        let rolled_back = match &self.c {
            Some(c) => c.batch_execute("ROLLBACK").await.is_ok(),
            None => true,
        };
        if !rolled_back && let Ok(fresh) = self.pool.get().await {
            self.c = Some(fresh);
        }
    }

    async fn idle(&mut self) {
        if self.release_idle {
            self.c = None;
        }
    }

    async fn savepoint(&mut self) -> Pg<()> {
        Ok(self.c()?.batch_execute("SAVEPOINT w").await?)
    }

    async fn release(&mut self) -> Pg<()> {
        Ok(self.c()?.batch_execute("RELEASE SAVEPOINT w").await?)
    }

    async fn rollback_to(&mut self) -> Pg<()> {
        Ok(self.c()?.batch_execute("ROLLBACK TO SAVEPOINT w").await?)
    }

    async fn live(&mut self, key: &[u8]) -> Pg<Option<KeyValue>> {
        let row = self.opt(LIVE_ONE, &[&key]).await?;
        Ok(row.map(|r| kv_from(&r, false)))
    }

    async fn live_many(&mut self, keys: &[&[u8]]) -> Pg<Vec<KeyValue>> {
        let rows = self.all(LIVE_ANY, &[&keys]).await?;
        Ok(rows.iter().map(|r| kv_from(r, false)).collect())
    }

    async fn lease_exists(&mut self, id: LeaseId) -> Pg<bool> {
        let sql = "SELECT 1 FROM kmetal_lease WHERE id = $1";
        Ok(self.opt(sql, &[&id]).await?.is_some())
    }

    async fn put(&mut self, rev: Revision, p: &PutRequest) -> Pg<Option<KeyValue>> {
        // PUT finds the predecessor in SQL; the value is read only when asked for.
        let prev = if p.prev_kv {
            self.live(&p.key).await?
        } else {
            None
        };
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&rev, &p.key.as_ref(), &p.lease, &p.value.as_ref()];
        self.exec(PUT, &params).await?;
        Ok(prev)
    }

    async fn put_many(&mut self, first: Revision, puts: &[&PutRequest]) -> Pg<()> {
        let revs: Vec<Revision> = (first..).take(puts.len()).collect();
        let names: Vec<&[u8]> = puts.iter().map(|p| p.key.as_ref()).collect();
        let leases: Vec<LeaseId> = puts.iter().map(|p| p.lease).collect();
        let values: Vec<&[u8]> = puts.iter().map(|p| p.value.as_ref()).collect();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&revs, &names, &leases, &values];
        self.exec(PUT_MANY, &params).await.map(drop)
    }

    async fn tombstone(&mut self, key: &[u8], rev: Revision) -> Pg<()> {
        let sql = "WITH gone AS (DELETE FROM kmetal_current WHERE name = $2 RETURNING rev)
             INSERT INTO kmetal_kv (rev, name, create_revision, prev_revision, version, deleted,
                lease, value)
             SELECT $1, $2, 0, rev, 0, true, 0, ''::bytea FROM gone";
        self.exec(sql, &[&rev, &key]).await.map(drop)
    }

    async fn lease_insert(&mut self, id: LeaseId, ttl: i64) -> Pg<bool> {
        let sql = "INSERT INTO kmetal_lease (id, ttl, expires_at)
             VALUES ($1, $2::bigint, now() + make_interval(secs => $2::bigint::float8))
             ON CONFLICT (id) DO NOTHING";
        Ok(self.exec(sql, &[&id, &ttl]).await? > 0)
    }

    async fn lease_refresh(&mut self, id: LeaseId) -> Pg<Option<i64>> {
        let sql = "UPDATE kmetal_lease SET expires_at = now() + make_interval(secs => ttl::float8)
             WHERE id = $1 AND expires_at > now() RETURNING ttl";
        Ok(self.opt(sql, &[&id]).await?.map(|r| r.get(0)))
    }

    async fn lease_delete(&mut self, id: LeaseId) -> Pg<bool> {
        let sql = "DELETE FROM kmetal_lease WHERE id = $1";
        Ok(self.exec(sql, &[&id]).await? > 0)
    }

    async fn lease_keys(&mut self, id: LeaseId) -> Pg<Vec<Bytes>> {
        let rows = self.all(LEASE_KEYS, &[&id]).await?;
        Ok(rows
            .iter()
            .map(|r| Bytes::from(r.get::<_, Vec<u8>>(0)))
            .collect())
    }

    async fn compact_rows(&mut self, upto: Revision, limit: i64) -> Pg<u64> {
        let sql = "DELETE FROM kmetal_kv WHERE ctid IN (
                SELECT k.ctid FROM kmetal_kv k WHERE k.rev <= $1 AND (k.deleted OR EXISTS (
                    SELECT 1 FROM kmetal_kv n WHERE n.name = k.name AND n.rev > k.rev AND n.rev <= $1))
                LIMIT $2)";
        self.exec(sql, &[&upto, &limit]).await
    }

    async fn import(&mut self, kv: &KeyValue) -> Pg<()> {
        let sql = "WITH ins AS (
                INSERT INTO kmetal_kv (rev, name, create_revision, prev_revision, version,
                    deleted, lease, value)
                VALUES ($1, $2, $3, 0, $4, false, $5, $6) RETURNING rev)
            INSERT INTO kmetal_current (name, rev, create_revision, version)
            SELECT $2, rev, $3, $4 FROM ins";
        let key: &[u8] = kv.key.as_ref();
        let value: &[u8] = kv.value.as_ref();
        self.exec(
            sql,
            &[
                &kv.mod_revision,
                &key,
                &kv.create_revision,
                &kv.version,
                &kv.lease,
                &value,
            ],
        )
        .await
        .map(drop)
    }
}

/// Store-level reads over the pool.
struct Reads {
    pool: Pool,
}

impl Reads {
    async fn conn(&self) -> Pg<Conn> {
        Conn::get(&self.pool).await
    }
}

#[async_trait]
impl Dialect for Reads {
    type Error = PgError;

    async fn meta(&self) -> Pg<(Revision, Revision)> {
        self.conn().await?.meta().await
    }

    async fn range(&self, req: RangeRequest, counts: Counts) -> Pg<RangeOutcome> {
        let mut c = self.conn().await?;
        // One snapshot for the revision and the rows.
        let m = c.open("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", META);
        let m = m.await?;
        c.began = Some((m.revision, m.compact));
        let out = range_in(&mut c, &req, &counts).await;
        // Nobody waits for the commit of a read: the connection goes back to the pool
        // once it is done, and the answer leaves now.
        tokio::spawn(async move {
            if let Ok(c) = c.c() {
                let _ = c.batch_execute("COMMIT").await;
            }
        });
        out
    }

    async fn lease(&self, id: LeaseId, keys: bool) -> Pg<Option<LeaseRow>> {
        let c = self.conn().await?;
        let sql = "SELECT ttl, GREATEST(0, ceil(extract(epoch FROM expires_at - now())))::bigint
             FROM kmetal_lease WHERE id = $1 AND expires_at > now()";
        let Some(row) = c.opt(sql, &[&id]).await? else {
            return Ok(None);
        };
        let keys = if keys {
            let rows = c.all(LEASE_KEYS, &[&id]).await?;
            rows.iter()
                .map(|r| Bytes::from(r.get::<_, Vec<u8>>(0)))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Some(LeaseRow {
            granted: row.get(0),
            left: row.get(1),
            keys,
        }))
    }

    async fn leases(&self) -> Pg<Vec<LeaseId>> {
        let sql = "SELECT id FROM kmetal_lease WHERE expires_at > now() ORDER BY id";
        let rows = self.conn().await?.all(sql, &[]).await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn expired_leases(&self, limit: i64) -> Pg<Vec<LeaseId>> {
        let sql = "SELECT id FROM kmetal_lease WHERE expires_at <= now() LIMIT $1";
        let rows = self.conn().await?.all(sql, &[&limit]).await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn lease_sweep(&self, limit: i64) -> Pg<(Vec<LeaseId>, NextExpiry)> {
        let c = self.conn().await?;
        let expired = "SELECT id FROM kmetal_lease WHERE expires_at <= now() LIMIT $1";
        let ids = c.all(expired, &[&limit]).await?;
        // NULL without leases (GREATEST would turn that into 0: clamped below instead).
        let next = "SELECT extract(epoch FROM min(expires_at) - now())::float8 FROM kmetal_lease";
        let secs: Option<f64> = c.one(next, &[]).await?.get(0);
        let next = match secs {
            None => NextExpiry::NoLeases,
            Some(s) => NextExpiry::In(Duration::try_from_secs_f64(s.max(0.0)).unwrap_or_default()),
        };
        Ok((ids.iter().map(|r| r.get(0)).collect(), next))
    }

    async fn size(&self) -> Pg<u64> {
        let sql = "SELECT pg_database_size(current_database())::bigint";
        let row = self.conn().await?.one(sql, &[]).await?;
        Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }
}

/// The listening connection with the hub's statements prepared on it.
struct Listening {
    client: tokio_postgres::Client,
    current: Statement,
    events: Statement,
}

/// The hub's feed: notifications from the listener task, reads over its connection (the
/// pool while it reconnects).
struct Feed {
    pool: Pool,
    hints: mpsc::UnboundedReceiver<Option<Revision>>,
    listening: watch::Receiver<Option<Arc<Listening>>>,
    /// Whether other processes may write (`PgConfig::listen`).
    remote: bool,
    /// The listener and the idle-connection closer, ended with the feed.
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for Feed {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Closes the pool's connections unused for `idle`, checking twice per `idle`.
async fn close_idle(pool: Pool, idle: Duration) {
    loop {
        tokio::time::sleep(idle / 2).await;
        pool.retain(|_, m| m.last_used() < idle);
    }
}

#[async_trait]
impl LogFeed for Feed {
    type Error = PgError;

    async fn changed(&mut self) -> Option<Revision> {
        let Some(mut hint) = self.hints.recv().await else {
            return std::future::pending().await;
        };
        // Coalesce a burst of notifications into one read.
        while let Ok(more) = self.hints.try_recv() {
            hint = hint.zip(more).map(|(a, b)| a.max(b));
        }
        hint
    }

    fn remote_writers(&self) -> bool {
        self.remote
    }

    async fn current(&mut self) -> Pg<Revision> {
        let listening = self.listening.borrow().clone();
        let row = match listening {
            Some(l) => l.client.query_one(&l.current, &[]).await?,
            None => self.pool.get().await?.query_one(META, &[]).await?,
        };
        Ok(row.get(0))
    }

    async fn events(&mut self, after: Revision, upto: Revision) -> Pg<Vec<(Revision, Event)>> {
        let listening = self.listening.borrow().clone();
        let rows = match listening {
            Some(l) => l.client.query(&l.events, &[&after, &upto]).await?,
            None => {
                self.pool
                    .get()
                    .await?
                    .query(EVENTS, &[&after, &upto])
                    .await?
            }
        };
        Ok(rows.iter().map(event_from).collect())
    }
}

/// Keeps a `LISTEN` connection up, forwarding each notification's revision (and `None` after
/// each (re)connect, so the hub catches up on what it may have missed).
async fn listen(
    pg: tokio_postgres::Config,
    tls: Option<tls::RustlsConnect>,
    hints: mpsc::UnboundedSender<Option<Revision>>,
    listening: watch::Sender<Option<Arc<Listening>>>,
    own: String,
) {
    loop {
        let (notes_tx, mut notes) = mpsc::unbounded_channel();
        let connected = match &tls {
            Some(t) => pg
                .connect(t.clone())
                .await
                .map(|(c, conn)| (c, drive(conn, notes_tx, own.clone()))),
            None => pg
                .connect(NoTls)
                .await
                .map(|(c, conn)| (c, drive(conn, notes_tx, own.clone()))),
        };
        if let Ok((client, driver)) = connected {
            let prepared = async {
                client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
                let current = client.prepare(META).await?;
                let events = client.prepare(EVENTS).await?;
                Ok::<_, tokio_postgres::Error>((current, events))
            };
            if let Ok((current, events)) = prepared.await {
                listening.send_replace(Some(Arc::new(Listening {
                    client,
                    current,
                    events,
                })));
                let _ = hints.send(None);
                // The driver owns the only sender: the channel closes with the connection.
                while let Some(rev) = notes.recv().await {
                    if hints.send(rev).is_err() {
                        return;
                    }
                }
                listening.send_replace(None);
            }
            driver.abort();
        }
        if hints.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Drives a connection, forwarding the revisions other writers announce (`<revision>:<id>`;
/// this store's own, id `own`, reach the hub with their events through the local wake-up).
fn drive<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    tx: mpsc::UnboundedSender<Option<Revision>>,
    own: String,
) -> tokio::task::JoinHandle<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        while let Some(Ok(m)) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let (revision, writer) = n.payload().split_once(':').unwrap_or((n.payload(), ""));
                if writer != own {
                    let _ = tx.send(revision.parse().ok());
                }
            }
        }
    })
}

/// A [`Datastore`](crate::Datastore) on PostgreSQL.
#[derive(Clone)]
pub struct PgStore {
    log: SqlLog<Reads>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

delegate_datastore!(PgStore);

impl PgStore {
    /// Connects, creates or upgrades the schema, and starts the writer, watch hub and lease
    /// sweeper.
    pub async fn connect(cfg: PgConfig) -> Result<Self> {
        let (reads, writer, feed, start, found) = Self::prepare(&cfg).await.map_err(fault)?;
        check_schema(found, SCHEMA_VERSION)?;
        let log = SqlLog::start(reads, writer, feed, start, WriterHome::Task, cfg.log)?;
        Ok(Self { log })
    }

    /// The pool with the schema in place, the writer, the feed and the current revision.
    async fn prepare(cfg: &PgConfig) -> Pg<(Reads, Conn, Feed, Revision, i64)> {
        let mut pg: tokio_postgres::Config = cfg.url.parse().map_err(PgError::Config)?;
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
            .wait_timeout(Some(cfg.log.request_timeout))
            .create_timeout(Some(cfg.log.request_timeout))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()?;
        let conn = Conn::get(&pool).await?;
        conn.c()?.batch_execute(schema::CREATE).await?;
        let found: i32 = conn
            .one("SELECT schema_version FROM kmetal_meta WHERE id = 1", &[])
            .await?
            .get(0);
        let start = conn.one(META, &[]).await?.get(0);
        let (hints_tx, hints) = mpsc::unbounded_channel();
        let (listening_tx, listening) = watch::channel(None);
        // Unique among the processes on this database: the pid and when the store opened.
        let writer_id = format!(
            "{}.{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let mut tasks = Vec::new();
        if cfg.listen {
            let listening = listen(pg, tls, hints_tx, listening_tx, writer_id.clone());
            tasks.push(tokio::spawn(listening).abort_handle());
        }
        if let Some(idle) = cfg.idle_timeout {
            tasks.push(tokio::spawn(close_idle(pool.clone(), idle)).abort_handle());
        }
        let feed = Feed {
            pool: pool.clone(),
            hints,
            listening,
            remote: cfg.listen,
            tasks,
        };
        let release_idle = cfg.idle_timeout.is_some();
        let conn = Conn {
            analyzer: Some(analyze::Analyzer::new(start)),
            writer_id,
            release_idle,
            // A lazy writer takes a connection with its first write.
            c: if release_idle { None } else { conn.c },
            ..conn
        };
        Ok((Reads { pool }, conn, feed, start, found.into()))
    }
}
