//! Requests, responses and key ranges with etcd's semantics.
//!
//! Shapes follow etcd's v3 API closely (so the gateway maps them one to one), with builder
//! helpers for the requests kube-apiserver sends.

use bytes::Bytes;

/// How long a watch that asked for progress notifications may stay idle before it gets an
/// empty batch at the current revision: etcd's `--watch-progress-notify-interval` default.
pub const DEFAULT_PROGRESS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(600);

/// A store revision: increases by one per write (a whole txn is one write).
pub type Revision = i64;
/// A lease id; 0 means "no lease".
pub type LeaseId = i64;

/// A key with its value and metadata.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyValue {
    /// The key.
    pub key: Bytes,
    /// The value (empty with `keys_only`).
    pub value: Bytes,
    /// Revision of the put that created the key (since its last delete).
    pub create_revision: Revision,
    /// Revision of the last change.
    pub mod_revision: Revision,
    /// Number of puts since creation (1 after the first).
    pub version: i64,
    /// Attached lease, 0 for none.
    pub lease: LeaseId,
}

/// A key range in etcd's encoding: an empty `range_end` means the single key; `[0]` means every
/// key ≥ `key`; otherwise `[key, range_end)`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyRange {
    /// First key.
    pub key: Bytes,
    /// End (exclusive) in etcd's encoding.
    pub range_end: Bytes,
}

/// The end of every key that starts with `prefix` (etcd's `GetPrefixRangeEnd`).
///
/// ```
/// use kmetal_datastore::model::prefix_end;
/// assert_eq!(prefix_end(b"/registry/pods/"), b"/registry/pods0".to_vec());
/// assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
/// assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
/// ```
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl KeyRange {
    /// The single key `key`.
    pub fn key(key: impl Into<Bytes>) -> Self {
        Self {
            key: key.into(),
            range_end: Bytes::new(),
        }
    }

    /// Every key starting with `prefix`.
    pub fn prefix(prefix: impl Into<Bytes>) -> Self {
        let key: Bytes = prefix.into();
        let range_end = if key.is_empty() {
            Bytes::from_static(&[0])
        } else {
            Bytes::from(prefix_end(&key))
        };
        let key = if key.is_empty() {
            Bytes::from_static(&[0])
        } else {
            key
        };
        Self { key, range_end }
    }

    /// `[key, end)`.
    pub fn between(key: impl Into<Bytes>, end: impl Into<Bytes>) -> Self {
        Self {
            key: key.into(),
            range_end: end.into(),
        }
    }

    /// Whether this is a single-key range.
    pub fn is_single(&self) -> bool {
        self.range_end.is_empty()
    }

    /// Whether `k` lies in the range.
    pub fn contains(&self, k: &[u8]) -> bool {
        if self.range_end.is_empty() {
            return k == self.key.as_ref();
        }
        // key = [0] with range_end = [0] means every key.
        let from_ok = k >= self.key.as_ref() || self.key.as_ref() == [0];
        let to_ok = self.range_end.as_ref() == [0] || k < self.range_end.as_ref();
        from_ok && to_ok
    }

    /// Whether the two ranges share a key.
    pub fn overlaps(&self, other: &KeyRange) -> bool {
        let lo = |r: &KeyRange| -> Vec<u8> {
            if r.key.as_ref() == [0] && !r.range_end.is_empty() {
                Vec::new()
            } else {
                r.key.to_vec()
            }
        };
        // Exclusive upper bound; None = unbounded.
        let hi = |r: &KeyRange| -> Option<Vec<u8>> {
            if r.range_end.is_empty() {
                let mut k = r.key.to_vec();
                k.push(0);
                Some(k)
            } else if r.range_end.as_ref() == [0] {
                None
            } else {
                Some(r.range_end.to_vec())
            }
        };
        let (a_lo, a_hi, b_lo, b_hi) = (lo(self), hi(self), lo(other), hi(other));
        let a_before_b = a_hi.as_ref().is_some_and(|h| *h <= b_lo);
        let b_before_a = b_hi.as_ref().is_some_and(|h| *h <= a_lo);
        !(a_before_b || b_before_a)
    }
}

/// Range (get / list / count).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RangeRequest {
    /// Keys to read.
    pub range: KeyRange,
    /// At most this many keys (0 = no limit).
    pub limit: i64,
    /// Read at this revision (0 = current).
    pub revision: Revision,
    /// Leave values out.
    pub keys_only: bool,
    /// Only count.
    pub count_only: bool,
}

impl RangeRequest {
    /// Reads one key.
    pub fn get(key: impl Into<Bytes>) -> Self {
        Self {
            range: KeyRange::key(key),
            ..Self::default()
        }
    }

    /// Reads every key with `prefix`.
    pub fn prefix(prefix: impl Into<Bytes>) -> Self {
        Self {
            range: KeyRange::prefix(prefix),
            ..Self::default()
        }
    }

    /// Reads `[key, end)`.
    pub fn between(key: impl Into<Bytes>, end: impl Into<Bytes>) -> Self {
        Self {
            range: KeyRange::between(key, end),
            ..Self::default()
        }
    }

    /// Sets the limit.
    pub fn with_limit(mut self, limit: i64) -> Self {
        self.limit = limit;
        self
    }

    /// Sets the revision.
    pub fn at_revision(mut self, revision: Revision) -> Self {
        self.revision = revision;
        self
    }

    /// Counts only.
    pub fn count_only(mut self) -> Self {
        self.count_only = true;
        self
    }

    /// Leaves values out.
    pub fn keys_only(mut self) -> Self {
        self.keys_only = true;
        self
    }
}

/// Range result.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RangeResponse {
    /// Store revision the read was served at (the current one for revision 0).
    pub revision: Revision,
    /// Keys, in key order (empty with `count_only`).
    pub kvs: Vec<KeyValue>,
    /// Whether the limit cut the result.
    pub more: bool,
    /// Number of keys in the range (ignoring the limit).
    pub count: i64,
}

/// Put.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PutRequest {
    /// Key.
    pub key: Bytes,
    /// Value.
    pub value: Bytes,
    /// Lease to attach (0 = none).
    pub lease: LeaseId,
    /// Return the previous key-value.
    pub prev_kv: bool,
}

impl PutRequest {
    /// Puts `value` at `key`.
    pub fn new(key: impl Into<Bytes>, value: impl Into<Bytes>) -> Self {
        Self {
            key: key.into(),
            value: value.into(),
            ..Self::default()
        }
    }

    /// Attaches a lease.
    pub fn with_lease(mut self, lease: LeaseId) -> Self {
        self.lease = lease;
        self
    }

    /// Asks for the previous key-value.
    pub fn with_prev_kv(mut self) -> Self {
        self.prev_kv = true;
        self
    }
}

/// Put result.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PutResponse {
    /// Revision of this write.
    pub revision: Revision,
    /// The previous key-value, if asked for and present.
    pub prev_kv: Option<KeyValue>,
}

/// Delete a key or range.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeleteRangeRequest {
    /// Keys to delete.
    pub range: KeyRange,
    /// Return the deleted key-values.
    pub prev_kv: bool,
}

impl DeleteRangeRequest {
    /// Deletes one key.
    pub fn key(key: impl Into<Bytes>) -> Self {
        Self {
            range: KeyRange::key(key),
            prev_kv: false,
        }
    }

    /// Deletes every key with `prefix`.
    pub fn prefix(prefix: impl Into<Bytes>) -> Self {
        Self {
            range: KeyRange::prefix(prefix),
            prev_kv: false,
        }
    }
}

/// Delete result.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeleteRangeResponse {
    /// Store revision after the delete (unchanged when nothing was deleted).
    pub revision: Revision,
    /// Keys deleted.
    pub deleted: i64,
    /// Deleted key-values, if asked for.
    pub prev_kvs: Vec<KeyValue>,
}

/// What a txn compare looks at, with the operand.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CompareTarget {
    /// Key version (0 for a missing key).
    Version(i64),
    /// Create revision (0 for a missing key).
    CreateRevision(Revision),
    /// Mod revision (0 for a missing key).
    ModRevision(Revision),
    /// Value (a missing key fails every value compare).
    Value(Bytes),
    /// Attached lease (0 for none or a missing key).
    Lease(LeaseId),
}

/// How a compare relates the key's field to the operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    /// `=`.
    Equal,
    /// `>`.
    Greater,
    /// `<`.
    Less,
    /// `!=`.
    NotEqual,
}

/// A txn guard on one key or a range (every key in the range must pass).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    /// The key or range.
    pub range: KeyRange,
    /// The relation.
    pub op: CompareOp,
    /// Field and operand.
    pub target: CompareTarget,
}

impl Compare {
    /// `mod_revision(key) == rev` (0 means "does not exist": kube-apiserver's create guard).
    pub fn mod_revision(key: impl Into<Bytes>, op: CompareOp, rev: Revision) -> Self {
        Self {
            range: KeyRange::key(key),
            op,
            target: CompareTarget::ModRevision(rev),
        }
    }

    /// `version(key) op v`.
    pub fn version(key: impl Into<Bytes>, op: CompareOp, v: i64) -> Self {
        Self {
            range: KeyRange::key(key),
            op,
            target: CompareTarget::Version(v),
        }
    }

    /// `create_revision(key) op rev`.
    pub fn create_revision(key: impl Into<Bytes>, op: CompareOp, rev: Revision) -> Self {
        Self {
            range: KeyRange::key(key),
            op,
            target: CompareTarget::CreateRevision(rev),
        }
    }

    /// `value(key) op v`.
    pub fn value(key: impl Into<Bytes>, op: CompareOp, v: impl Into<Bytes>) -> Self {
        Self {
            range: KeyRange::key(key),
            op,
            target: CompareTarget::Value(v.into()),
        }
    }

    /// `lease(key) op id`.
    pub fn lease(key: impl Into<Bytes>, op: CompareOp, id: LeaseId) -> Self {
        Self {
            range: KeyRange::key(key),
            op,
            target: CompareTarget::Lease(id),
        }
    }

    /// Whether `kv` (None = missing key) passes.
    pub fn matches(&self, kv: Option<&KeyValue>) -> bool {
        use std::cmp::Ordering;
        let ord = match (&self.target, kv) {
            (CompareTarget::Value(_), None) => return false,
            (CompareTarget::Value(v), Some(kv)) => kv.value.as_ref().cmp(v.as_ref()),
            (CompareTarget::Version(v), kv) => kv.map_or(0, |k| k.version).cmp(v),
            (CompareTarget::CreateRevision(v), kv) => kv.map_or(0, |k| k.create_revision).cmp(v),
            (CompareTarget::ModRevision(v), kv) => kv.map_or(0, |k| k.mod_revision).cmp(v),
            (CompareTarget::Lease(v), kv) => kv.map_or(0, |k| k.lease).cmp(v),
        };
        match self.op {
            CompareOp::Equal => ord == Ordering::Equal,
            CompareOp::Greater => ord == Ordering::Greater,
            CompareOp::Less => ord == Ordering::Less,
            CompareOp::NotEqual => ord != Ordering::Equal,
        }
    }
}

/// An operation inside a txn branch.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestOp {
    /// Read.
    Range(RangeRequest),
    /// Write.
    Put(PutRequest),
    /// Delete.
    DeleteRange(DeleteRangeRequest),
    /// A nested transaction.
    Txn(TxnRequest),
}

/// The result of one txn operation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResponseOp {
    /// Read result.
    Range(RangeResponse),
    /// Write result.
    Put(PutResponse),
    /// Delete result.
    DeleteRange(DeleteRangeResponse),
    /// Nested transaction result.
    Txn(TxnResponse),
}

/// A transaction: if every compare passes run `success`, else `failure`; atomically, as one
/// revision.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TxnRequest {
    /// Guards.
    pub compare: Vec<Compare>,
    /// Operations when every guard passes.
    pub success: Vec<RequestOp>,
    /// Operations otherwise.
    pub failure: Vec<RequestOp>,
}

/// Transaction result.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TxnResponse {
    /// Store revision after the txn.
    pub revision: Revision,
    /// Whether the success branch ran.
    pub succeeded: bool,
    /// One result per operation of the branch that ran.
    pub responses: Vec<ResponseOp>,
}

/// Compaction result.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CompactResponse {
    /// Store revision when compacted.
    pub revision: Revision,
}

/// What a watch observes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WatchRequest {
    /// Key or range.
    pub range: KeyRange,
    /// First revision to deliver (0 = changes after now).
    pub start_revision: Revision,
    /// Include the previous key-value in each event.
    pub prev_kv: bool,
    /// Leave put events out.
    pub no_put: bool,
    /// Leave delete events out.
    pub no_delete: bool,
    /// Send empty progress batches so idle watchers learn the current revision.
    pub progress_notify: bool,
}

impl WatchRequest {
    /// Watches every key with `prefix` from `start_revision`.
    pub fn prefix(prefix: impl Into<Bytes>, start_revision: Revision) -> Self {
        Self {
            range: KeyRange::prefix(prefix),
            start_revision,
            ..Self::default()
        }
    }

    /// Watches one key from `start_revision`.
    pub fn key(key: impl Into<Bytes>, start_revision: Revision) -> Self {
        Self {
            range: KeyRange::key(key),
            start_revision,
            ..Self::default()
        }
    }

    /// Asks for previous key-values.
    pub fn with_prev_kv(mut self) -> Self {
        self.prev_kv = true;
        self
    }
}

/// Kind of change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Created or updated.
    Put,
    /// Deleted (or expired with its lease).
    Delete,
}

/// One change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change; for deletes only `key` and `mod_revision` are set.
    pub kv: KeyValue,
    /// The key before the change, when asked for and present.
    pub prev_kv: Option<KeyValue>,
}

/// Events of one or more revisions, in revision order; empty for a progress notification.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WatchBatch {
    /// Store revision when the batch was sent (≥ every event's revision).
    pub revision: Revision,
    /// The events.
    pub events: Vec<Event>,
}

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseGrant {
    /// Lease id.
    pub id: LeaseId,
    /// TTL in seconds.
    pub ttl: i64,
}

/// What is known about a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    /// Lease id.
    pub id: LeaseId,
    /// Seconds left.
    pub ttl: i64,
    /// TTL it was granted with.
    pub granted_ttl: i64,
    /// Keys attached (when asked for).
    pub keys: Vec<Bytes>,
}

/// Store status.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Status {
    /// Current revision.
    pub revision: Revision,
    /// Compaction revision (0 if never compacted).
    pub compact_revision: Revision,
    /// Approximate size of the stored data in bytes.
    pub db_size: u64,
}

/// Limits etcd enforces, mirrored by every driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request in bytes (etcd's `--max-request-bytes`, 1.5 MiB).
    pub max_request_bytes: usize,
    /// Most operations in one txn branch (etcd's `--max-txn-ops`, 128).
    pub max_txn_ops: usize,
    /// Backend space quota (etcd's `--quota-backend-bytes`, 2 GiB).
    pub quota_backend_bytes: u64,
    /// Longest lease TTL in seconds (etcd: 9,000,000,000).
    pub max_lease_ttl: i64,
    /// Bytes of batches one watch may have queued that its consumer has not taken (1 MiB);
    /// a watch that falls further behind is read back from history once it has caught up
    /// (see [`WatchStream`](crate::WatchStream)).
    pub watch_buffer_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_bytes: 1_572_864,
            max_txn_ops: 128,
            quota_backend_bytes: 2 * 1024 * 1024 * 1024,
            max_lease_ttl: 9_000_000_000,
            watch_buffer_bytes: 1 << 20,
        }
    }
}

impl Limits {
    /// Checks a put: non-empty key and request size.
    pub fn check_put(&self, req: &PutRequest) -> crate::Result<()> {
        self.check_size(req.key.len() + req.value.len() + 16, &req.key)
    }

    fn check_size(&self, size: usize, key: &[u8]) -> crate::Result<()> {
        if key.is_empty() {
            return Err(crate::DatastoreError::EmptyKey);
        }
        if size > self.max_request_bytes {
            return Err(crate::DatastoreError::RequestTooLarge {
                size,
                limit: self.max_request_bytes,
            });
        }
        Ok(())
    }

    /// Checks a txn: ops per branch, total size, empty keys, and that no key is written twice.
    pub fn check_txn(&self, txn: &TxnRequest) -> crate::Result<()> {
        let size = txn_size(txn);
        if size > self.max_request_bytes {
            return Err(crate::DatastoreError::RequestTooLarge {
                size,
                limit: self.max_request_bytes,
            });
        }
        check_ops(self, txn)
    }
}

fn txn_size(txn: &TxnRequest) -> usize {
    let range = |r: &KeyRange| r.key.len() + r.range_end.len() + 8;
    let ops = |ops: &[RequestOp]| -> usize {
        ops.iter()
            .map(|op| match op {
                RequestOp::Range(r) => range(&r.range),
                RequestOp::Put(p) => p.key.len() + p.value.len() + 16,
                RequestOp::DeleteRange(d) => range(&d.range),
                RequestOp::Txn(t) => txn_size(t),
            })
            .sum()
    };
    let cmp: usize = txn
        .compare
        .iter()
        .map(|c| {
            range(&c.range)
                + match &c.target {
                    CompareTarget::Value(v) => v.len(),
                    _ => 8,
                }
        })
        .sum();
    cmp + ops(&txn.success) + ops(&txn.failure)
}

fn check_ops(limits: &Limits, txn: &TxnRequest) -> crate::Result<()> {
    for branch in [&txn.success, &txn.failure] {
        let n = branch.len().max(txn.compare.len());
        if n > limits.max_txn_ops {
            return Err(crate::DatastoreError::TooManyOps {
                ops: n,
                limit: limits.max_txn_ops,
            });
        }
        // etcd refuses a branch whose writes overlap (two puts to one key, a put inside a
        // deleted range).
        let mut puts: Vec<&Bytes> = Vec::new();
        let mut deletes: Vec<&KeyRange> = Vec::new();
        for op in branch {
            match op {
                RequestOp::Put(p) => {
                    if p.key.is_empty() {
                        return Err(crate::DatastoreError::EmptyKey);
                    }
                    if puts.contains(&&p.key) || deletes.iter().any(|d| d.contains(&p.key)) {
                        return Err(crate::DatastoreError::DuplicateKey);
                    }
                    puts.push(&p.key);
                }
                RequestOp::DeleteRange(d) => {
                    if d.range.key.is_empty() {
                        return Err(crate::DatastoreError::EmptyKey);
                    }
                    if puts.iter().any(|k| d.range.contains(k)) {
                        return Err(crate::DatastoreError::DuplicateKey);
                    }
                    deletes.push(&d.range);
                }
                RequestOp::Range(r) => {
                    if r.range.key.is_empty() {
                        return Err(crate::DatastoreError::EmptyKey);
                    }
                }
                RequestOp::Txn(t) => check_ops(limits, t)?,
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let p = KeyRange::prefix("/a/");
        assert!(p.contains(b"/a/x"));
        assert!(
            !p.contains(b"/aa/x"),
            "the trailing slash keeps /a/ from covering /aa/"
        );
        let all = KeyRange::prefix("");
        assert!(all.contains(b"anything"));
        let from = KeyRange::between("m", vec![0u8]);
        assert!(from.contains(b"z") && !from.contains(b"a"));
        assert!(KeyRange::key("k").contains(b"k"));
        assert!(!KeyRange::key("k").contains(b"k2"));
        assert!(p.overlaps(&KeyRange::key("/a/b")));
        assert!(!p.overlaps(&KeyRange::prefix("/aa/")));
        assert!(all.overlaps(&p));
    }

    #[test]
    fn compares_on_missing_keys() {
        assert!(Compare::mod_revision("k", CompareOp::Equal, 0).matches(None));
        assert!(!Compare::value("k", CompareOp::Equal, "").matches(None));
        let kv = KeyValue {
            key: "k".into(),
            value: "v".into(),
            create_revision: 2,
            mod_revision: 5,
            version: 3,
            lease: 0,
        };
        assert!(Compare::version("k", CompareOp::Greater, 2).matches(Some(&kv)));
        assert!(Compare::value("k", CompareOp::Less, "w").matches(Some(&kv)));
        assert!(Compare::mod_revision("k", CompareOp::NotEqual, 4).matches(Some(&kv)));
    }

    #[test]
    fn txn_limits() {
        let l = Limits::default();
        let put = |k: &str| RequestOp::Put(PutRequest::new(k.to_string(), "v"));
        let mut t = TxnRequest {
            success: (0..129).map(|i| put(&format!("k{i}"))).collect(),
            ..TxnRequest::default()
        };
        assert!(matches!(
            l.check_txn(&t),
            Err(crate::DatastoreError::TooManyOps {
                ops: 129,
                limit: 128
            })
        ));
        t.success = vec![put("a"), put("a")];
        assert!(matches!(
            l.check_txn(&t),
            Err(crate::DatastoreError::DuplicateKey)
        ));
        t.success = vec![
            RequestOp::DeleteRange(DeleteRangeRequest::prefix("/p/")),
            put("/p/x"),
        ];
        assert!(matches!(
            l.check_txn(&t),
            Err(crate::DatastoreError::DuplicateKey)
        ));
        let big = PutRequest::new("k", vec![0u8; 2 * 1024 * 1024]);
        assert!(matches!(
            l.check_put(&big),
            Err(crate::DatastoreError::RequestTooLarge { .. })
        ));
    }
}
