//! The SQLite dialect of the shared SQL log ([`crate::sqllog`]): the revision log embedded in
//! one file, the project's zero-setup default (k3s's choice).
//!
//! - The writer runs on a thread of its own that owns the write connection (SQLite's model):
//!   each batch is one `BEGIN IMMEDIATE` transaction, one fsync.
//! - Readers use their own connections on the blocking pool; WAL mode gives each read a
//!   consistent snapshot while the writer commits.
//! - Another process writing the same file is seen by the watch hub's tick (at most a
//!   second); SQLite has no notifications to hear it sooner.
//! - Lease expiry times are persisted (milliseconds since the epoch, this machine's clock).
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

mod provision;
mod schema;

pub use provision::{SqliteCredentials, SqliteProvisioner};
use schema::SCHEMA;
pub use schema::SCHEMA_VERSION;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{Connection, ErrorCode, OptionalExtension, Row, params};

use crate::error::Result;
use crate::model::{Event, KeyRange, KeyValue, LeaseId, PutRequest, RangeRequest, Revision};
use crate::sqllog::dialect::{
    Classify, Dialect, ErrorClass, LeaseRow, LogFeed, LogRead, LogWriter, RangeOutcome, fault,
};
use crate::sqllog::read::{Counts, LogRow, bounds, event, range_in};
use crate::sqllog::write::Meta;
use crate::sqllog::{LogOptions, SqlLog, WriterHome, check_schema, delegate_datastore};

/// How to open the store.
#[derive(Debug, Clone)]
pub struct SqliteConfig {
    /// The database file (created if missing).
    pub path: PathBuf,
    /// Read connections, at most: reads beyond them wait for one.
    pub readers: usize,
    /// What every SQL store shares.
    pub log: LogOptions,
}

impl SqliteConfig {
    /// Defaults for `path`: 4 readers and [`LogOptions::default`].
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let (path, readers, log) = (path.into(), 4, LogOptions::default());
        Self { path, readers, log }
    }

    /// The same with another watch progress notification interval.
    pub fn with_progress_interval(mut self, interval: Duration) -> Self {
        self.log.progress_interval = interval;
        self
    }
}

/// Why a SQLite call failed (the source of the datastore error it becomes).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SqliteError {
    /// SQLite refused or failed a statement.
    #[error("sqlite statement failed")]
    Sql(#[from] rusqlite::Error),
    /// A blocking read task was cancelled or panicked.
    #[error("the read task ended early")]
    Task(#[from] tokio::task::JoinError),
}

impl Classify for SqliteError {
    fn class(&self) -> ErrorClass {
        let Self::Sql(rusqlite::Error::SqliteFailure(e, _)) = self else {
            return match self {
                Self::Task(_) => ErrorClass::Unavailable,
                Self::Sql(_) => ErrorClass::Backend,
            };
        };
        match e.code {
            ErrorCode::PermissionDenied
            | ErrorCode::AuthorizationForStatementDenied
            | ErrorCode::ReadOnly => ErrorClass::PermissionDenied,
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::OutOfMemory
            | ErrorCode::OperationInterrupted => ErrorClass::Unavailable,
            _ => ErrorClass::Backend,
        }
    }
}

type Sql<T> = std::result::Result<T, SqliteError>;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A connection; the writer's and every reader's.
struct Db(Connection);

impl Db {
    fn open(path: &Path) -> Sql<Self> {
        let c = Connection::open(path)?;
        c.busy_timeout(Duration::from_secs(5))?;
        // Durable like etcd: every commit is on disk before it is acknowledged.
        c.pragma_update(None, "synchronous", "FULL")?;
        Ok(Self(c))
    }

    fn exec(&self, sql: &str) -> Sql<()> {
        Ok(self.0.execute_batch(sql)?)
    }

    fn meta_row(&self) -> Sql<Meta> {
        Ok(self.0.query_row(
            "SELECT revision, compact_revision, next_lease FROM kmetal_meta WHERE id = 1",
            [],
            |r| {
                Ok(Meta {
                    revision: r.get(0)?,
                    compact: r.get(1)?,
                    next_lease: r.get(2)?,
                })
            },
        )?)
    }

    fn events(&self, after: Revision, upto: Revision) -> Sql<Vec<(Revision, Event)>> {
        let mut stmt = self.0.prepare_cached(
            "SELECT k.rev, k.name, k.create_revision, k.version, k.deleted, k.lease, k.value,
                p.rev, p.create_revision, p.version, p.deleted, p.lease, p.value
             FROM kmetal_kv k LEFT JOIN kmetal_kv p ON p.name = k.name AND p.rev = k.prev_revision
             WHERE k.rev > ?1 AND k.rev <= ?2 ORDER BY k.rev, k.name",
        )?;
        let rows = stmt.query_map(params![after, upto], |r| {
            let row = |rev: Revision, at: usize| -> rusqlite::Result<LogRow> {
                Ok(LogRow {
                    rev,
                    create_revision: r.get(at)?,
                    version: r.get(at + 1)?,
                    deleted: r.get::<_, i64>(at + 2)? != 0,
                    lease: r.get(at + 3)?,
                    value: Bytes::from(r.get::<_, Vec<u8>>(at + 4)?),
                })
            };
            let this = row(r.get(0)?, 2)?;
            let prev = match r.get::<_, Option<Revision>>(7)? {
                Some(rev) => Some(row(rev, 8)?),
                None => None,
            };
            Ok(event(Bytes::from(r.get::<_, Vec<u8>>(1)?), this, prev))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
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

/// The newest row at or below `?3` of each key in `[?1, ?2)`, if live.
const PAST: &str = "FROM kmetal_kv k WHERE k.name >= ?1 AND (?2 IS NULL OR k.name < ?2)
    AND k.rev = (SELECT max(rev) FROM kmetal_kv WHERE name = k.name AND rev <= ?3)
    AND k.deleted = 0";

#[async_trait]
impl LogRead for Db {
    type Error = SqliteError;

    async fn meta(&mut self) -> Sql<(Revision, Revision)> {
        let m = self.meta_row()?;
        Ok((m.revision, m.compact))
    }

    async fn rows(
        &mut self,
        range: &KeyRange,
        at: Option<Revision>,
        limit: Option<i64>,
        keys_only: bool,
    ) -> Sql<Vec<KeyValue>> {
        let (from, to) = bounds(range);
        let limit = limit.unwrap_or(-1);
        let map = |r: &Row<'_>| kv_from(r, keys_only);
        let rows = match at {
            None => self
                .0
                .prepare_cached(&format!(
                    "SELECT {KV_COLS} FROM (SELECT name, rev FROM kmetal_current
                     WHERE name >= ?1 AND (?2 IS NULL OR name < ?2) ORDER BY name LIMIT ?3) c
                     JOIN kmetal_kv k ON k.name = c.name AND k.rev = c.rev ORDER BY c.name"
                ))?
                .query_map(params![from, to, limit], map)?
                .collect::<rusqlite::Result<_>>()?,
            Some(rev) => self
                .0
                .prepare_cached(&format!("SELECT {KV_COLS} {PAST} ORDER BY k.name LIMIT ?4"))?
                .query_map(params![from, to, rev, limit], map)?
                .collect::<rusqlite::Result<_>>()?,
        };
        Ok(rows)
    }

    async fn count(&mut self, range: &KeyRange, at: Option<Revision>) -> Sql<i64> {
        let (from, to) = bounds(range);
        let n = match at {
            None => self.0.prepare_cached(
                "SELECT count(*) FROM kmetal_current WHERE name >= ?1 AND (?2 IS NULL OR name < ?2)",
            )?
            .query_row(params![from, to], |r| r.get(0))?,
            Some(rev) => self
                .0
                .prepare_cached(&format!("SELECT count(*) {PAST}"))?
                .query_row(params![from, to, rev], |r| r.get(0))?,
        };
        Ok(n)
    }
}

#[async_trait]
impl LogWriter for Db {
    async fn begin(&mut self) -> Sql<Meta> {
        self.exec("BEGIN IMMEDIATE")?;
        self.meta_row()
    }

    async fn commit(&mut self, meta: &Meta, _start: Revision) -> Sql<()> {
        self.0
            .prepare_cached(
                "UPDATE kmetal_meta SET revision = ?1, compact_revision = ?2, next_lease = ?3
                 WHERE id = 1",
            )?
            .execute(params![meta.revision, meta.compact, meta.next_lease])?;
        self.exec("COMMIT")
    }

    async fn rollback(&mut self) {
        let _ = self.exec("ROLLBACK");
    }

    async fn savepoint(&mut self) -> Sql<()> {
        self.exec("SAVEPOINT w")
    }

    async fn release(&mut self) -> Sql<()> {
        self.exec("RELEASE SAVEPOINT w")
    }

    async fn rollback_to(&mut self) -> Sql<()> {
        self.exec("ROLLBACK TO SAVEPOINT w; RELEASE SAVEPOINT w")
    }

    async fn live(&mut self, key: &[u8]) -> Sql<Option<KeyValue>> {
        Ok(self
            .0
            .prepare_cached(&format!(
                "SELECT {KV_COLS} FROM kmetal_current c
                 JOIN kmetal_kv k ON k.name = c.name AND k.rev = c.rev WHERE c.name = ?1"
            ))?
            .query_row(params![key], |r| kv_from(r, false))
            .optional()?)
    }

    async fn lease_exists(&mut self, id: LeaseId) -> Sql<bool> {
        Ok(self
            .0
            .prepare_cached("SELECT 1 FROM kmetal_lease WHERE id = ?1")?
            .exists(params![id])?)
    }

    async fn put(&mut self, rev: Revision, p: &PutRequest) -> Sql<Option<KeyValue>> {
        let prev = self.live(&p.key).await?;
        let last: Option<Revision> = self
            .0
            .prepare_cached("SELECT rev FROM kmetal_kv WHERE name = ?1 ORDER BY rev DESC LIMIT 1")?
            .query_row(params![p.key.as_ref()], |r| r.get(0))
            .optional()?;
        let (create, version) = prev
            .as_ref()
            .map_or((rev, 1), |kv| (kv.create_revision, kv.version + 1));
        self.0
            .prepare_cached(
                "INSERT INTO kmetal_kv (rev, name, create_revision, prev_revision, version,
                    deleted, lease, value) VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, ?7)",
            )?
            .execute(params![
                rev,
                p.key.as_ref(),
                create,
                last.unwrap_or(0),
                version,
                p.lease,
                p.value.as_ref()
            ])?;
        self.0
            .prepare_cached(
                "INSERT INTO kmetal_current (name, rev) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET rev = excluded.rev",
            )?
            .execute(params![p.key.as_ref(), rev])?;
        Ok(prev.filter(|_| p.prev_kv))
    }

    async fn tombstone(&mut self, key: &[u8], rev: Revision) -> Sql<()> {
        self.0
            .prepare_cached(
                "INSERT INTO kmetal_kv (rev, name, create_revision, prev_revision, version,
                    deleted, lease, value)
                 SELECT ?1, name, 0, rev, 0, 1, 0, x'' FROM kmetal_current WHERE name = ?2",
            )?
            .execute(params![rev, key])?;
        self.0
            .prepare_cached("DELETE FROM kmetal_current WHERE name = ?1")?
            .execute(params![key])?;
        Ok(())
    }

    async fn lease_insert(&mut self, id: LeaseId, ttl: i64) -> Sql<bool> {
        let expires = now_ms().saturating_add(ttl.saturating_mul(1000));
        let n = self
            .0
            .prepare_cached(
                "INSERT INTO kmetal_lease (id, ttl, expires_at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO NOTHING",
            )?
            .execute(params![id, ttl, expires])?;
        Ok(n > 0)
    }

    async fn lease_refresh(&mut self, id: LeaseId) -> Sql<Option<i64>> {
        Ok(self
            .0
            .prepare_cached(
                "UPDATE kmetal_lease SET expires_at_ms = ?2 + ttl * 1000
                 WHERE id = ?1 AND expires_at_ms > ?2 RETURNING ttl",
            )?
            .query_row(params![id, now_ms()], |r| r.get(0))
            .optional()?)
    }

    async fn lease_delete(&mut self, id: LeaseId) -> Sql<bool> {
        let n = self
            .0
            .prepare_cached("DELETE FROM kmetal_lease WHERE id = ?1")?
            .execute(params![id])?;
        Ok(n > 0)
    }

    async fn lease_keys(&mut self, id: LeaseId) -> Sql<Vec<Bytes>> {
        lease_keys(&self.0, id)
    }

    async fn compact_rows(&mut self, upto: Revision, limit: i64) -> Sql<u64> {
        let n = self
            .0
            .prepare_cached(
                "DELETE FROM kmetal_kv WHERE rowid IN (
                    SELECT k.rowid FROM kmetal_kv k WHERE k.rev <= ?1 AND (k.deleted = 1 OR EXISTS (
                        SELECT 1 FROM kmetal_kv n WHERE n.name = k.name AND n.rev > k.rev AND n.rev <= ?1))
                    LIMIT ?2)",
            )?
            .execute(params![upto, limit])?;
        Ok(n as u64)
    }

    async fn import(&mut self, kv: &KeyValue) -> Sql<()> {
        self.0
            .prepare_cached(
                "INSERT INTO kmetal_kv (rev, name, create_revision, prev_revision, version,
                    deleted, lease, value) VALUES (?1, ?2, ?3, 0, ?4, 0, ?5, ?6)",
            )?
            .execute(params![
                kv.mod_revision,
                kv.key.as_ref(),
                kv.create_revision,
                kv.version,
                kv.lease,
                kv.value.as_ref()
            ])?;
        self.0
            .prepare_cached("INSERT INTO kmetal_current (name, rev) VALUES (?1, ?2)")?
            .execute(params![kv.key.as_ref(), kv.mod_revision])?;
        Ok(())
    }
}

fn lease_keys(c: &Connection, id: LeaseId) -> Sql<Vec<Bytes>> {
    let names = c
        .prepare_cached(
            "SELECT c.name FROM kmetal_current c JOIN kmetal_kv k ON k.name = c.name AND k.rev = c.rev
             WHERE k.lease = ?1 ORDER BY c.name",
        )?
        .query_map(params![id], |r| r.get::<_, Vec<u8>>(0).map(Bytes::from))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(names)
}

/// The reader connections: the dialect's store-level reads and the hub's feed.
#[derive(Clone)]
struct Readers {
    path: PathBuf,
    pool: Arc<Mutex<Vec<Db>>>,
    /// One permit per reader connection: reads beyond them wait rather than open more (an
    /// api-server's boot lists every resource at once, and each connection opened for it
    /// would stay in the pool with its page cache for the life of the store).
    slots: Arc<tokio::sync::Semaphore>,
    /// The WAL file as the feed last saw it (modified time, length; `None` before the first
    /// look), and when to look next.
    wal_seen: Option<Option<(Option<SystemTime>, u64)>>,
    next_look: tokio::time::Instant,
}

/// How often the feed looks for commits by other processes on the same file.
const FOREIGN_COMMITS: Duration = Duration::from_millis(100);

impl Readers {
    /// Runs `f` on a reader connection on the blocking pool.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Db) -> Sql<T> + Send + 'static,
    ) -> Sql<T> {
        let this = self.clone();
        // The semaphore is never closed: a permit always comes.
        let permit = self.slots.clone().acquire_owned().await.ok();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let taken = this.pool.lock().ok().and_then(|mut p| p.pop());
            let mut db = match taken {
                Some(db) => db,
                None => Db::open(&this.path)?,
            };
            let r = f(&mut db);
            if let Ok(mut p) = this.pool.lock() {
                p.push(db);
            }
            r
        })
        .await?
    }
}

#[async_trait]
impl Dialect for Readers {
    type Error = SqliteError;

    async fn meta(&self) -> Sql<(Revision, Revision)> {
        self.with(|db| db.meta_row().map(|m| (m.revision, m.compact)))
            .await
    }

    async fn range(&self, req: RangeRequest, counts: Counts) -> Sql<RangeOutcome> {
        let rt = tokio::runtime::Handle::current();
        self.with(move |db| {
            // One read transaction: meta and rows from the same WAL snapshot. The calls
            // inside do not suspend (SQLite is synchronous), so blocking on them is free.
            db.exec("BEGIN")?;
            let out = rt.block_on(range_in(db, &req, &counts));
            let _ = db.exec("COMMIT");
            out
        })
        .await
    }

    async fn lease(&self, id: LeaseId, keys: bool) -> Sql<Option<LeaseRow>> {
        let now = now_ms();
        self.with(move |db| {
            let row: Option<(i64, i64)> = db
                .0
                .query_row(
                    "SELECT ttl, expires_at_ms FROM kmetal_lease WHERE id = ?1 AND expires_at_ms > ?2",
                    params![id, now],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((granted, expires)) = row else {
                return Ok(None);
            };
            let keys = if keys {
                lease_keys(&db.0, id)?
            } else {
                Vec::new()
            };
            let left = (expires - now + 999) / 1000;
            Ok(Some(LeaseRow { granted, left, keys }))
        })
        .await
    }

    async fn leases(&self) -> Sql<Vec<LeaseId>> {
        self.with(move |db| {
            let ids = db
                .0
                .prepare_cached("SELECT id FROM kmetal_lease WHERE expires_at_ms > ?1 ORDER BY id")?
                .query_map(params![now_ms()], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(ids)
        })
        .await
    }

    async fn expired_leases(&self, limit: i64) -> Sql<Vec<LeaseId>> {
        self.with(move |db| {
            let ids = db
                .0
                .prepare_cached("SELECT id FROM kmetal_lease WHERE expires_at_ms <= ?1 LIMIT ?2")?
                .query_map(params![now_ms(), limit], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(ids)
        })
        .await
    }

    async fn size(&self) -> Sql<u64> {
        Ok(std::fs::metadata(&self.path).map_or(0, |m| m.len()))
    }
}

#[async_trait]
impl LogFeed for Readers {
    type Error = SqliteError;

    /// This process's commits wake the hub through its commit channel; another process's (a
    /// second gateway, `operator apply` on the management store) show only in the file, as
    /// a WAL that grew or was rewritten. A stat every 100 ms finds them; the hub's own tick
    /// would take up to a second (kine polls its SQL log once a second too).
    async fn changed(&mut self) -> Option<Revision> {
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        loop {
            // A deadline, not a sleep: the hub drops this future on every other wake-up.
            tokio::time::sleep_until(self.next_look).await;
            self.next_look = tokio::time::Instant::now() + FOREIGN_COMMITS;
            let now = std::fs::metadata(&wal)
                .ok()
                .map(|m| (m.modified().ok(), m.len()));
            match self.wal_seen.replace(now) {
                Some(before) if before != now => return None,
                _ => {}
            }
        }
    }

    async fn current(&mut self) -> Sql<Revision> {
        self.with(|db| db.meta_row().map(|m| m.revision)).await
    }

    async fn events(&mut self, after: Revision, upto: Revision) -> Sql<Vec<(Revision, Event)>> {
        self.with(move |db| db.events(after, upto)).await
    }
}

/// A [`Datastore`](crate::Datastore) in one SQLite file.
#[derive(Clone)]
pub struct SqliteStore {
    log: SqlLog<Readers>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.log.db().path)
            .finish_non_exhaustive()
    }
}

delegate_datastore!(SqliteStore);

impl SqliteStore {
    /// Opens (or creates) the database, brings its schema up to date, and starts the writer
    /// thread, the watch hub and the lease sweeper.
    pub async fn open(cfg: SqliteConfig) -> Result<Self> {
        let path = cfg.path.clone();
        let (writer, start, found) =
            tokio::task::spawn_blocking(move || -> Sql<(Db, Revision, i64)> {
                let db = Db::open(&path)?;
                db.exec(SCHEMA)?;
                let found: i64 = db.0.query_row(
                    "SELECT schema_version FROM kmetal_meta WHERE id = 1",
                    [],
                    |r| r.get(0),
                )?;
                let start = db.meta_row()?.revision;
                Ok((db, start, found))
            })
            .await
            .map_err(|e| fault(SqliteError::Task(e)))?
            .map_err(fault)?;
        check_schema(found, SCHEMA_VERSION)?;
        let readers = Readers {
            path: cfg.path.clone(),
            pool: Arc::new(Mutex::new(Vec::with_capacity(cfg.readers))),
            slots: Arc::new(tokio::sync::Semaphore::new(cfg.readers.max(1))),
            wal_seen: None,
            next_look: tokio::time::Instant::now(),
        };
        let log = SqlLog::start(
            readers.clone(),
            writer,
            readers,
            start,
            WriterHome::Thread("kmetal-sqlite-writer"),
            cfg.log,
        )?;
        Ok(Self { log })
    }
}
