//! The revision log's tables, created and upgraded automatically with a recorded version.
//!
//! - `kmetal_meta`: one row; the current revision, the compaction revision, the next lease
//!   id and the schema version. Writers lock it (`FOR UPDATE`), which makes revisions gapless
//!   and commits land in revision order, so watchers never wait on a gap.
//! - `kmetal_kv`: one row per key per revision (a txn writes several rows at one revision).
//!   Keys are `bytea`, which sorts bytewise like etcd (kine's `text` cannot hold arbitrary
//!   bytes). The unique `(name, rev DESC)` index serves reads at past revisions (newest row
//!   per key first, no sort); `rev` feeds watches; the unique `(name, prev_revision)` is
//!   kine's optimistic-concurrency guard.
//! - `kmetal_current`: each live key with its latest revision, create revision and version,
//!   maintained by the writer in the same transaction (a put reads its predecessor from one
//!   row). Reads at the current revision (almost all of them, and every page of
//!   a list nobody wrote into meanwhile) and counts are plain index range scans on it, which
//!   is what makes kine's list and count slow on large tables fast here.
//! - `kmetal_lease`: leases with their expiry time, so expiry survives restarts.

/// The schema version this code writes.
pub const SCHEMA_VERSION: i64 = 1;

/// Statements that bring an empty database to [`SCHEMA_VERSION`] (idempotent).
pub const CREATE: &str = r#"
CREATE TABLE IF NOT EXISTS kmetal_meta (
    id INT PRIMARY KEY CHECK (id = 1),
    revision BIGINT NOT NULL,
    compact_revision BIGINT NOT NULL,
    next_lease BIGINT NOT NULL,
    schema_version INT NOT NULL
);
INSERT INTO kmetal_meta (id, revision, compact_revision, next_lease, schema_version)
    VALUES (1, 1, 0, 1, 1) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS kmetal_kv (
    rev BIGINT NOT NULL,
    name BYTEA NOT NULL,
    create_revision BIGINT NOT NULL,
    prev_revision BIGINT NOT NULL,
    version BIGINT NOT NULL,
    deleted BOOLEAN NOT NULL,
    lease BIGINT NOT NULL,
    value BYTEA NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS kmetal_kv_name_rev ON kmetal_kv (name, rev DESC);
CREATE INDEX IF NOT EXISTS kmetal_kv_rev ON kmetal_kv (rev);
CREATE UNIQUE INDEX IF NOT EXISTS kmetal_kv_name_prev ON kmetal_kv (name, prev_revision);
CREATE INDEX IF NOT EXISTS kmetal_kv_lease ON kmetal_kv (lease) WHERE lease <> 0;
CREATE TABLE IF NOT EXISTS kmetal_current (
    name BYTEA PRIMARY KEY,
    rev BIGINT NOT NULL,
    create_revision BIGINT NOT NULL,
    version BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS kmetal_lease (
    id BIGINT PRIMARY KEY,
    ttl BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
"#;
