//! Datastore errors, mirroring the error kinds etcd returns so that callers (and the etcd
//! gateway) can react the way etcd clients do.

/// A cause from below (a network error, a driver error), kept as the error's source.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a datastore request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DatastoreError {
    /// The request is larger than the server accepts (etcd: 1.5 MiB by default).
    #[error("request is too large: {size} bytes, limit {limit}")]
    RequestTooLarge {
        /// Approximate request size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A transaction has more operations than allowed (etcd: 128).
    #[error("too many operations in txn request: {ops}, limit {limit}")]
    TooManyOps {
        /// Operations in the largest branch.
        ops: usize,
        /// The limit.
        limit: usize,
    },
    /// The key is empty.
    #[error("key is not provided")]
    EmptyKey,
    /// A transaction writes the same key twice.
    #[error("duplicate key given in txn request")]
    DuplicateKey,
    /// The requested revision has been compacted away.
    #[error("required revision {requested} has been compacted (compacted up to {compacted})")]
    Compacted {
        /// What was asked for.
        requested: i64,
        /// The compaction revision.
        compacted: i64,
    },
    /// The requested revision is in the future.
    #[error("required revision {requested} is a future revision (current {current})")]
    FutureRevision {
        /// What was asked for.
        requested: i64,
        /// The current revision.
        current: i64,
    },
    /// The lease does not exist (never granted, revoked or expired).
    #[error("requested lease {id} not found")]
    LeaseNotFound {
        /// Lease id.
        id: i64,
    },
    /// A lease with that id already exists.
    #[error("lease {id} already exists")]
    LeaseExists {
        /// Lease id.
        id: i64,
    },
    /// The lease TTL is out of range.
    #[error("lease TTL {ttl}s is out of range (1..={max})")]
    InvalidTtl {
        /// Requested TTL in seconds.
        ttl: i64,
        /// Largest allowed.
        max: i64,
    },
    /// The credentials do not allow the request (a tenant touching another tenant's keys).
    #[error("permission denied")]
    PermissionDenied {
        /// The server's error, when there is one.
        #[source]
        source: Option<Cause>,
    },
    /// The backend is over its space quota; only deletes and compaction are accepted.
    #[error("database space exceeded: {used} bytes of {quota}")]
    QuotaExceeded {
        /// Bytes in use.
        used: u64,
        /// The quota.
        quota: u64,
    },
    /// A watch fell further behind than its queue holds and cannot be opened again where it
    /// stopped (a stream without a way to resume): watch again from `from`, or relist.
    #[error("watch fell behind at revision {from}: resume from there")]
    WatchBehind {
        /// The first revision the watch did not deliver.
        from: i64,
    },
    /// The datastore cannot serve the request now (no quorum, connection lost, timeout).
    /// Retrying later may succeed; a write that failed this way may or may not have been
    /// applied.
    #[error("datastore unavailable")]
    Unavailable {
        /// What went wrong underneath.
        #[source]
        source: Cause,
    },
    /// The backend refused the request for a reason etcd has no error kind for (a server
    /// fault, a malformed response); retrying will not help.
    #[error("datastore backend failed")]
    Backend {
        /// The backend's error.
        #[source]
        source: Cause,
    },
}

impl DatastoreError {
    /// An [`DatastoreError::Unavailable`] with `source` as its cause.
    pub fn unavailable(source: impl Into<Cause>) -> Self {
        Self::Unavailable {
            source: source.into(),
        }
    }
}

/// Result of a datastore call.
pub type Result<T, E = DatastoreError> = std::result::Result<T, E>;
