//! Classifying etcd's gRPC errors into [`DatastoreError`] kinds.
//!
//! etcd's own Go client recognises server errors by their message (`rpctypes`), so do we; the
//! gRPC code settles the transport-level ones.

use std::time::Duration;

use tonic::Code;

use crate::error::DatastoreError;

/// A request to etcd did not finish before its deadline.
#[derive(Debug, Clone, thiserror::Error)]
#[error("etcd {op} request did not finish within {after:?}")]
pub struct RequestTimeout {
    /// The operation (`range`, `txn`, …).
    pub op: &'static str,
    /// The deadline.
    pub after: Duration,
}

/// What an etcd error means for us, before the details (revisions, sizes) are filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    TooLarge,
    TooManyOps,
    EmptyKey,
    DuplicateKey,
    Compacted,
    FutureRevision,
    LeaseNotFound,
    LeaseExists,
    TtlTooLarge,
    PermissionDenied,
    /// The token is expired, or older than the cluster's last auth change (another tenant's
    /// user or role was added): etcd refused the request unapplied, and a new token makes it
    /// valid again unless the credentials themselves were revoked.
    StaleAuth,
    QuotaExceeded,
    Unavailable,
    Backend,
}

/// Server messages (after `etcdserver: `) and what they mean.
const MESSAGES: &[(&str, Kind)] = &[
    ("request is too large", Kind::TooLarge),
    ("too many operations in txn request", Kind::TooManyOps),
    ("key is not provided", Kind::EmptyKey),
    ("duplicate key given in txn request", Kind::DuplicateKey),
    ("required revision has been compacted", Kind::Compacted),
    (
        "required revision is a future revision",
        Kind::FutureRevision,
    ),
    ("requested lease not found", Kind::LeaseNotFound),
    ("lease already exists", Kind::LeaseExists),
    ("too large lease TTL", Kind::TtlTooLarge),
    ("database space exceeded", Kind::QuotaExceeded),
    ("permission denied", Kind::PermissionDenied),
    ("invalid auth token", Kind::StaleAuth),
    ("revision of auth store is old", Kind::StaleAuth),
    ("authentication failed", Kind::PermissionDenied),
    ("user name is empty", Kind::PermissionDenied),
    ("user name not found", Kind::PermissionDenied),
    ("invalid auth management", Kind::PermissionDenied),
    // Leadership and overload: the cluster may serve the request later.
    ("no leader", Kind::Unavailable),
    ("not leader", Kind::Unavailable),
    ("leader changed", Kind::Unavailable),
    ("request timed out", Kind::Unavailable),
    ("server stopped", Kind::Unavailable),
    ("too many requests", Kind::Unavailable),
    ("unhealthy cluster", Kind::Unavailable),
];

/// Classifies a server message (a watch's cancel reason, a status message).
pub(crate) fn classify_message(message: &str) -> Option<Kind> {
    MESSAGES
        .iter()
        .find(|(m, _)| message.contains(m))
        .map(|(_, k)| *k)
}

/// Classifies an etcd-client error.
pub(crate) fn classify(e: &etcd_client::Error) -> Kind {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(s) => classify_message(s.message()).unwrap_or(match s.code() {
            Code::ResourceExhausted => Kind::TooLarge,
            Code::PermissionDenied | Code::Unauthenticated => Kind::PermissionDenied,
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted => {
                Kind::Unavailable
            }
            // tonic reports a dropped connection mid-call as Unknown with a transport cause.
            Code::Unknown => Kind::Unavailable,
            _ => Kind::Backend,
        }),
        E::TransportError(_) | E::IoError(_) | E::EndpointError(_) => Kind::Unavailable,
        // etcd-client turns a keep-alive answer with TTL 0 into this error.
        E::LeaseKeepAliveError(m) if m.contains("not found") => Kind::LeaseNotFound,
        E::WatchError(_) | E::LeaseKeepAliveError(_) => Kind::Unavailable,
        _ => Kind::Backend,
    }
}

/// Whether etcd cannot have received the request: no connection was made, or a member without
/// a leader refused it before proposing it. Such a request is safe to repeat even if it writes.
pub(crate) fn not_sent(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(s) => {
            let m = s.message();
            m.contains("tcp connect error")
                || m.contains("error trying to connect")
                || m.contains("Connection refused")
                || m.ends_with("etcdserver: no leader")
        }
        E::TransportError(_) => true,
        _ => false,
    }
}

/// The error for kinds that need no further detail; `None` for those that do.
pub(crate) fn simple(
    kind: Kind,
    e: etcd_client::Error,
) -> Result<DatastoreError, etcd_client::Error> {
    Ok(match kind {
        Kind::EmptyKey => DatastoreError::EmptyKey,
        Kind::DuplicateKey => DatastoreError::DuplicateKey,
        Kind::PermissionDenied | Kind::StaleAuth => DatastoreError::PermissionDenied {
            source: Some(Box::new(e)),
        },
        Kind::Unavailable => DatastoreError::unavailable(e),
        Kind::Backend => DatastoreError::Backend {
            source: Box::new(e),
        },
        _ => return Err(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: Code, msg: &str) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(tonic::Status::new(code, msg))
    }

    #[test]
    fn server_messages_classify() {
        let cases = [
            (
                "etcdserver: mvcc: required revision has been compacted",
                Kind::Compacted,
            ),
            ("etcdserver: permission denied", Kind::PermissionDenied),
            ("etcdserver: request timed out", Kind::Unavailable),
            (
                "etcdserver: too many operations in txn request",
                Kind::TooManyOps,
            ),
            (
                "etcdserver: mvcc: database space exceeded",
                Kind::QuotaExceeded,
            ),
        ];
        for (msg, kind) in cases {
            assert_eq!(classify(&status(Code::Unknown, msg)), kind, "{msg}");
        }
        assert_eq!(
            classify(&status(
                Code::ResourceExhausted,
                "grpc: received message larger than max"
            )),
            Kind::TooLarge
        );
        assert_eq!(classify(&status(Code::Internal, "boom")), Kind::Backend);
        assert!(not_sent(&status(Code::Unavailable, "tcp connect error")));
        assert!(not_sent(&status(
            Code::Unavailable,
            "etcdserver: no leader"
        )));
        assert!(!not_sent(&status(
            Code::Unavailable,
            "etcdserver: request timed out"
        )));
    }
}
