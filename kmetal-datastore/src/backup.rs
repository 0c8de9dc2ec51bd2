//! Per-tenant logical snapshots: every key (with value, revisions, version and lease) at one
//! revision plus the live leases, in one portable file with a SHA-256 trailer; taken from any
//! driver and restorable into any driver — the per-tenant backup a shared etcd cannot give.
//!
//! Format (all integers big-endian): `KMSNAP01`, source revision (i64), lease count (u64),
//! key count (u64); per lease id, granted TTL, remaining TTL (i64 ×3); per key, key length
//! (u32) and bytes, value length (u32) and bytes, create revision, mod revision, version,
//! lease (i64 ×4); then the SHA-256 of everything before it.
//!
//! ```
//! # block_on(async {
//! use kmetal_datastore::{Datastore, MemoryStore, backup};
//! use kmetal_datastore::model::{PutRequest, RangeRequest};
//! let source = MemoryStore::new();
//! source.put(PutRequest::new("/registry/a", "1")).await.unwrap();
//! let mut file = Vec::new();
//! let info = backup::snapshot(&source, &mut file).await.unwrap();
//! assert_eq!(info.keys, 1);
//! let target = MemoryStore::new();
//! backup::restore(&target, &file).await.unwrap();
//! assert_eq!(target.range(RangeRequest::get("/registry/a")).await.unwrap().kvs[0].value, "1");
//! # });
//! # fn block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(f)
//! # }
//! ```

use bytes::Bytes;
use ring::digest::{Context, SHA256};

use crate::error::DatastoreError;
use crate::model::{KeyRange, KeyValue, PutRequest, RangeRequest, RequestOp, Revision, TxnRequest};
use crate::store::Datastore;

const MAGIC: &[u8; 8] = b"KMSNAP01";
/// Keys read per page while snapshotting.
const PAGE: i64 = 1000;

/// Why a snapshot or restore failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    /// The datastore failed.
    #[error("datastore request failed while {during}")]
    Datastore {
        /// What was being done.
        during: &'static str,
        /// The datastore's error.
        #[source]
        source: DatastoreError,
    },
    /// The file is not a kmetal snapshot or is cut short.
    #[error("not a valid snapshot at byte {offset}: {what}")]
    Format {
        /// Where.
        offset: usize,
        /// What is wrong.
        what: &'static str,
    },
    /// The checksum does not match: the file is corrupt.
    #[error("snapshot checksum mismatch: the file is corrupt")]
    Checksum,
    /// A restore asked to keep revisions into a store that chooses its own (etcd).
    #[error("the target store chooses its own revisions; restore with Revisions::Fresh")]
    RevisionsNotKept,
    /// Restoring into a store that already holds keys would mix tenants' data.
    #[error("the target store is not empty ({keys} keys)")]
    TargetNotEmpty {
        /// Keys found.
        keys: i64,
    },
}

fn ds(during: &'static str) -> impl FnOnce(DatastoreError) -> BackupError {
    move |source| BackupError::Datastore { during, source }
}

/// What a snapshot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Source revision the keys were read at.
    pub revision: Revision,
    /// Keys.
    pub keys: u64,
    /// Leases.
    pub leases: u64,
    /// SHA-256 of the file body (hex).
    pub sha256: String,
}

/// Every live key at `revision` (0 = current), page by page, and the revision read at.
pub async fn all_keys(
    store: &dyn Datastore,
    revision: Revision,
    mut each: impl FnMut(&KeyValue),
) -> Result<Revision, DatastoreError> {
    let mut from = Bytes::from_static(&[0]);
    let mut at = revision;
    loop {
        let page = store
            .range(RangeRequest {
                range: KeyRange::between(from.clone(), vec![0u8]),
                limit: PAGE,
                revision: at,
                ..RangeRequest::default()
            })
            .await?;
        if at == 0 {
            at = page.revision;
        }
        for kv in &page.kvs {
            each(kv);
        }
        match (page.more, page.kvs.last()) {
            (true, Some(last)) => {
                let mut next = last.key.to_vec();
                next.push(0);
                from = next.into();
            }
            _ => return Ok(at),
        }
    }
}

/// A content hash over every live key, value and lease at `revision`: equal stores hash
/// equal whatever their revisions.
pub async fn content_hash(
    store: &dyn Datastore,
    revision: Revision,
) -> Result<(u64, String), DatastoreError> {
    let mut ctx = Context::new(&SHA256);
    let mut n = 0u64;
    all_keys(store, revision, |kv| {
        n += 1;
        for part in [kv.key.as_ref(), kv.value.as_ref()] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part);
        }
        ctx.update(&kv.lease.to_be_bytes());
    })
    .await?;
    Ok((n, hex(ctx.finish().as_ref())))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes a snapshot of `store` into `out`.
pub async fn snapshot(
    store: &dyn Datastore,
    out: &mut Vec<u8>,
) -> Result<SnapshotInfo, BackupError> {
    let start = out.len();
    let mut keys: Vec<u8> = Vec::new();
    let mut n_keys = 0u64;
    let revision = all_keys(store, 0, |kv| {
        n_keys += 1;
        keys.extend_from_slice(&(kv.key.len() as u32).to_be_bytes());
        keys.extend_from_slice(&kv.key);
        keys.extend_from_slice(&(kv.value.len() as u32).to_be_bytes());
        keys.extend_from_slice(&kv.value);
        for v in [kv.create_revision, kv.mod_revision, kv.version, kv.lease] {
            keys.extend_from_slice(&v.to_be_bytes());
        }
    })
    .await
    .map_err(ds("reading keys"))?;
    let mut leases = Vec::new();
    for id in store.leases().await.map_err(ds("listing leases"))? {
        match store.lease_time_to_live(id, false).await {
            Ok(info) => leases.push((id, info.granted_ttl, info.ttl)),
            // Expired between the listing and now.
            Err(DatastoreError::LeaseNotFound { .. }) => {}
            Err(e) => return Err(ds("reading leases")(e)),
        }
    }
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&revision.to_be_bytes());
    out.extend_from_slice(&(leases.len() as u64).to_be_bytes());
    out.extend_from_slice(&n_keys.to_be_bytes());
    for (id, granted, left) in &leases {
        for v in [id, granted, left] {
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
    out.extend_from_slice(&keys);
    let digest = ring::digest::digest(&SHA256, &out[start..]);
    out.extend_from_slice(digest.as_ref());
    Ok(SnapshotInfo {
        revision,
        keys: n_keys,
        leases: leases.len() as u64,
        sha256: hex(digest.as_ref()),
    })
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&[u8], BackupError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or(BackupError::Format {
                offset: self.at,
                what,
            })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, BackupError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8, what)?);
        Ok(i64::from_be_bytes(a))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, BackupError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_be_bytes(a))
    }

    fn bytes(&mut self, what: &'static str) -> Result<Bytes, BackupError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4, what)?);
        let n = u32::from_be_bytes(a) as usize;
        Ok(Bytes::copy_from_slice(self.take(n, what)?))
    }
}

/// A parsed snapshot.
struct Parsed {
    revision: Revision,
    leases: Vec<(i64, i64, i64)>,
    keys: Vec<KeyValue>,
}

fn parse(file: &[u8]) -> Result<Parsed, BackupError> {
    if file.len() < MAGIC.len() + 24 + 32 {
        return Err(BackupError::Format {
            offset: file.len(),
            what: "too short",
        });
    }
    if &file[..8] != MAGIC {
        return Err(BackupError::Format {
            offset: 0,
            what: "missing KMSNAP01 header",
        });
    }
    let (body, sum) = file.split_at(file.len() - 32);
    if ring::digest::digest(&SHA256, body).as_ref() != sum {
        return Err(BackupError::Checksum);
    }
    let mut r = Reader { b: body, at: 8 };
    let revision = r.i64("revision")?;
    let n_leases = r.u64("lease count")?;
    let n_keys = r.u64("key count")?;
    let mut leases = Vec::new();
    for _ in 0..n_leases {
        leases.push((
            r.i64("lease id")?,
            r.i64("lease ttl")?,
            r.i64("lease ttl left")?,
        ));
    }
    let mut keys = Vec::new();
    for _ in 0..n_keys {
        let key = r.bytes("key")?;
        let value = r.bytes("value")?;
        keys.push(KeyValue {
            key,
            value,
            create_revision: r.i64("create revision")?,
            mod_revision: r.i64("mod revision")?,
            version: r.i64("version")?,
            lease: r.i64("lease")?,
        });
    }
    if r.at != body.len() {
        return Err(BackupError::Format {
            offset: r.at,
            what: "trailing bytes",
        });
    }
    Ok(Parsed {
        revision,
        leases,
        keys,
    })
}

/// Writes `kvs` into `target` in transactions within etcd's limits.
pub(crate) async fn copy_keys(
    target: &dyn Datastore,
    kvs: &[KeyValue],
    mut progress: impl FnMut(usize),
) -> Result<(), DatastoreError> {
    let limits = crate::model::Limits::default();
    let mut batch: Vec<RequestOp> = Vec::new();
    let mut size = 0usize;
    let mut done = 0usize;
    for kv in kvs {
        let item = kv.key.len() + kv.value.len() + 64;
        if !batch.is_empty() && (batch.len() >= 64 || size + item > limits.max_request_bytes / 2) {
            let n = batch.len();
            target
                .txn(TxnRequest {
                    success: std::mem::take(&mut batch),
                    ..TxnRequest::default()
                })
                .await?;
            done += n;
            progress(done);
            size = 0;
        }
        size += item;
        batch.push(RequestOp::Put(PutRequest {
            key: kv.key.clone(),
            value: kv.value.clone(),
            lease: kv.lease,
            prev_kv: false,
        }));
    }
    if !batch.is_empty() {
        let n = batch.len();
        target
            .txn(TxnRequest {
                success: batch,
                ..TxnRequest::default()
            })
            .await?;
        progress(done + n);
    }
    Ok(())
}

/// How a restore numbers the keys it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Revisions {
    /// The target's own revisions (a logical restore, into any driver): values, versions
    /// and lease attachments are kept, resourceVersions are not.
    #[default]
    Fresh,
    /// The snapshot's: every key keeps its create and mod revision and version, and the
    /// target's revision moves to the snapshot's ([`Datastore::import`]), so clients that
    /// held resourceVersions from the source see the same ones and watches go on from the
    /// next revision. Into a store that chooses revisions itself (etcd) the restore fails
    /// with [`BackupError::RevisionsNotKept`] and leaves the target empty.
    Keep,
}

/// Restores `file` into an empty `target` with the target's own revisions
/// ([`Revisions::Fresh`]); see [`restore_with`].
pub async fn restore(target: &dyn Datastore, file: &[u8]) -> Result<SnapshotInfo, BackupError> {
    restore_with(target, file, Revisions::Fresh).await
}

/// Restores `file` into an empty `target`: leases (same ids, the TTL they had left) then
/// keys, numbered as `revisions` says.
pub async fn restore_with(
    target: &dyn Datastore,
    file: &[u8],
    revisions: Revisions,
) -> Result<SnapshotInfo, BackupError> {
    let parsed = parse(file)?;
    let existing = target
        .range(RangeRequest::prefix(Bytes::new()).count_only())
        .await
        .map_err(ds("checking the target is empty"))?
        .count;
    if existing > 0 {
        return Err(BackupError::TargetNotEmpty { keys: existing });
    }
    for (id, _, left) in &parsed.leases {
        target
            .lease_grant((*left).max(1), *id)
            .await
            .map_err(ds("granting leases"))?;
    }
    match revisions {
        Revisions::Keep => {
            let kept = target
                .import(&parsed.keys, parsed.revision)
                .await
                .map_err(ds("importing keys"))?;
            if !kept {
                // Leave the target as it was: empty.
                for (id, _, _) in &parsed.leases {
                    let _ = target.lease_revoke(*id).await;
                }
                return Err(BackupError::RevisionsNotKept);
            }
        }
        Revisions::Fresh => copy_keys(target, &parsed.keys, |_| {})
            .await
            .map_err(ds("writing keys"))?,
    }
    let sum = &file[file.len() - 32..];
    Ok(SnapshotInfo {
        revision: parsed.revision,
        keys: parsed.keys.len() as u64,
        leases: parsed.leases.len() as u64,
        sha256: hex(sum),
    })
}
