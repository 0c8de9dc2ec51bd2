//! The revision log's tables in SQLite, created automatically with a recorded version: the
//! same tables as PostgreSQL's (see `postgres/schema.rs`), except that `kmetal_current` keeps
//! only each live key's revision.

/// The schema version this code writes.
pub const SCHEMA_VERSION: i64 = 1;

pub(super) const SCHEMA: &str = r#"
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
