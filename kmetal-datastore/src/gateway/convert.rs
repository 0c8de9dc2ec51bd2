//! etcd's protobuf messages ↔ the datastore model, and datastore errors → etcd's gRPC
//! statuses (code and the `etcdserver: …` message clients match on).

use bytes::Bytes;
use etcd_client::proto::{
    PbCompare, PbCompareTarget, PbDeleteRequest, PbDeleteResponse, PbEvent, PbKeyValue,
    PbPutRequest, PbPutResponse, PbRangeRequest, PbRangeResponse, PbResponseHeader, PbResponseOp,
    PbTargetUnion, PbTxnOpRequest, PbTxnOpResponse, PbTxnRequest, PbTxnResponse,
};
use tonic::{Code, Status};

use crate::error::DatastoreError;
use crate::model::{
    Compare, CompareOp, CompareTarget, DeleteRangeRequest, DeleteRangeResponse, Event, EventKind,
    KeyRange, KeyValue, PutRequest, PutResponse, RangeRequest, RangeResponse, RequestOp,
    ResponseOp, Revision, TxnRequest, TxnResponse,
};

/// The identity the gateway reports in every response header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Identity {
    pub(crate) cluster_id: u64,
    pub(crate) member_id: u64,
}

impl Identity {
    pub(crate) fn header(&self, revision: Revision) -> Option<PbResponseHeader> {
        Some(PbResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.member_id,
            revision,
            raft_term: 1,
        })
    }
}

/// The metadata key carrying our description of an error whose message is etcd's own.
pub(crate) const DETAIL_KEY: &str = "kmetal-error-detail";

/// A datastore error as etcd reports it. etcd's clients turn a status into their typed
/// errors (`rpctypes.ErrCompacted`, …) only when the message is exactly etcd's, and
/// kube-apiserver compares those by identity (a compacted read must be `ErrCompacted` to
/// become 410 Gone), so the message is etcd's alone and what we know beyond it rides in the
/// `kmetal-error-detail` metadata. Errors etcd has no name for keep their detail in the text.
pub(crate) fn status(e: DatastoreError) -> Status {
    let (code, msg) = match &e {
        DatastoreError::RequestTooLarge { .. } => {
            (Code::InvalidArgument, "etcdserver: request is too large")
        }
        DatastoreError::TooManyOps { .. } => (
            Code::InvalidArgument,
            "etcdserver: too many operations in txn request",
        ),
        DatastoreError::EmptyKey => (Code::InvalidArgument, "etcdserver: key is not provided"),
        DatastoreError::DuplicateKey => (
            Code::InvalidArgument,
            "etcdserver: duplicate key given in txn request",
        ),
        DatastoreError::Compacted { .. } => (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted",
        ),
        DatastoreError::FutureRevision { .. } => (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision",
        ),
        DatastoreError::LeaseNotFound { .. } => {
            (Code::NotFound, "etcdserver: requested lease not found")
        }
        DatastoreError::LeaseExists { .. } => {
            (Code::FailedPrecondition, "etcdserver: lease already exists")
        }
        DatastoreError::InvalidTtl { .. } => (Code::OutOfRange, "etcdserver: too large lease TTL"),
        DatastoreError::PermissionDenied { .. } => {
            (Code::PermissionDenied, "etcdserver: permission denied")
        }
        DatastoreError::QuotaExceeded { .. } => (
            Code::ResourceExhausted,
            "etcdserver: mvcc: database space exceeded",
        ),
        DatastoreError::Unavailable { .. } => (Code::Unavailable, "etcdserver: request timed out"),
        // etcd's own text for a watch it cancelled: clients watch again from their revision.
        DatastoreError::WatchBehind { .. } => (Code::Unavailable, "etcdserver: watch canceled"),
        _ => return Status::new(Code::Internal, format!("etcdserver: backend failure ({e})")),
    };
    let mut status = Status::new(code, msg);
    // Metadata values are visible ASCII; a detail that is not stays out.
    if let Ok(detail) = e.to_string().parse() {
        status.metadata_mut().insert(DETAIL_KEY, detail);
    }
    status
}

pub(crate) fn kv_to_pb(kv: KeyValue) -> PbKeyValue {
    PbKeyValue {
        key: kv.key.to_vec(),
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        value: kv.value.to_vec(),
        lease: kv.lease,
    }
}

pub(crate) fn range_of(key: Vec<u8>, end: Vec<u8>) -> KeyRange {
    KeyRange::between(Bytes::from(key), Bytes::from(end))
}

pub(crate) fn range_req(r: &PbRangeRequest) -> RangeRequest {
    RangeRequest {
        range: range_of(r.key.clone(), r.range_end.clone()),
        limit: r.limit,
        revision: r.revision,
        keys_only: r.keys_only,
        count_only: r.count_only,
    }
}

/// Whether a range asks for more than the datastore does natively (sorting other than by
/// ascending key, revision filters): then the gateway reads everything and filters itself.
pub(crate) fn needs_post_processing(r: &PbRangeRequest) -> bool {
    // sort_order: 0 NONE, 1 ASCEND, 2 DESCEND; sort_target: 0 KEY.
    let sorted_by_key_ascending = r.sort_target == 0 && r.sort_order != 2;
    !sorted_by_key_ascending
        || r.min_mod_revision > 0
        || r.max_mod_revision > 0
        || r.min_create_revision > 0
        || r.max_create_revision > 0
}

/// Applies etcd's sort and revision filters to a full result, then the limit.
pub(crate) fn post_process(r: &PbRangeRequest, mut resp: RangeResponse) -> RangeResponse {
    resp.kvs.retain(|kv| {
        (r.min_mod_revision == 0 || kv.mod_revision >= r.min_mod_revision)
            && (r.max_mod_revision == 0 || kv.mod_revision <= r.max_mod_revision)
            && (r.min_create_revision == 0 || kv.create_revision >= r.min_create_revision)
            && (r.max_create_revision == 0 || kv.create_revision <= r.max_create_revision)
    });
    match r.sort_target {
        1 => resp.kvs.sort_by_key(|kv| kv.version),
        2 => resp.kvs.sort_by_key(|kv| kv.create_revision),
        3 => resp.kvs.sort_by_key(|kv| kv.mod_revision),
        4 => resp.kvs.sort_by(|a, b| a.value.cmp(&b.value)),
        _ => resp.kvs.sort_by(|a, b| a.key.cmp(&b.key)),
    }
    if r.sort_order == 2 {
        resp.kvs.reverse();
    }
    resp.count = resp.kvs.len() as i64;
    if r.limit > 0 && resp.kvs.len() as i64 > r.limit {
        resp.kvs
            .truncate(usize::try_from(r.limit).unwrap_or(usize::MAX));
        resp.more = true;
    }
    resp
}

pub(crate) fn range_resp(id: Identity, r: RangeResponse) -> PbRangeResponse {
    PbRangeResponse {
        header: id.header(r.revision),
        kvs: r.kvs.into_iter().map(kv_to_pb).collect(),
        more: r.more,
        count: r.count,
    }
}

pub(crate) fn put_req(p: &PbPutRequest) -> PutRequest {
    PutRequest {
        key: Bytes::from(p.key.clone()),
        value: Bytes::from(p.value.clone()),
        lease: p.lease,
        prev_kv: p.prev_kv,
    }
}

pub(crate) fn put_resp(id: Identity, r: PutResponse) -> PbPutResponse {
    PbPutResponse {
        header: id.header(r.revision),
        prev_kv: r.prev_kv.map(kv_to_pb),
    }
}

pub(crate) fn delete_req(d: &PbDeleteRequest) -> DeleteRangeRequest {
    DeleteRangeRequest {
        range: range_of(d.key.clone(), d.range_end.clone()),
        prev_kv: d.prev_kv,
    }
}

pub(crate) fn delete_resp(id: Identity, r: DeleteRangeResponse) -> PbDeleteResponse {
    PbDeleteResponse {
        header: id.header(r.revision),
        deleted: r.deleted,
        prev_kvs: r.prev_kvs.into_iter().map(kv_to_pb).collect(),
    }
}

fn compare(c: &PbCompare) -> Result<Compare, Status> {
    // result: 0 EQUAL, 1 GREATER, 2 LESS, 3 NOT_EQUAL.
    let op = match c.result {
        0 => CompareOp::Equal,
        1 => CompareOp::Greater,
        2 => CompareOp::Less,
        3 => CompareOp::NotEqual,
        _ => {
            return Err(Status::invalid_argument(
                "etcdserver: unknown compare result",
            ));
        }
    };
    let target = match (&c.target_union, PbCompareTarget::try_from(c.target)) {
        (Some(PbTargetUnion::Version(v)), _) => CompareTarget::Version(*v),
        (Some(PbTargetUnion::CreateRevision(v)), _) => CompareTarget::CreateRevision(*v),
        (Some(PbTargetUnion::ModRevision(v)), _) => CompareTarget::ModRevision(*v),
        (Some(PbTargetUnion::Value(v)), _) => CompareTarget::Value(Bytes::from(v.clone())),
        (Some(PbTargetUnion::Lease(v)), _) => CompareTarget::Lease(*v),
        // An absent union is the zero value of the named target (proto3 drops zeros).
        (None, Ok(PbCompareTarget::Version)) => CompareTarget::Version(0),
        (None, Ok(PbCompareTarget::Create)) => CompareTarget::CreateRevision(0),
        (None, Ok(PbCompareTarget::Mod)) => CompareTarget::ModRevision(0),
        (None, Ok(PbCompareTarget::Value)) => CompareTarget::Value(Bytes::new()),
        (None, Ok(PbCompareTarget::Lease)) => CompareTarget::Lease(0),
        (None, Err(_)) => {
            return Err(Status::invalid_argument(
                "etcdserver: unknown compare target",
            ));
        }
    };
    Ok(Compare {
        range: range_of(c.key.clone(), c.range_end.clone()),
        op,
        target,
    })
}

fn ops(ops: &[etcd_client::proto::PbTxnRequestOp]) -> Result<Vec<RequestOp>, Status> {
    ops.iter()
        .map(|op| match &op.request {
            Some(PbTxnOpRequest::RequestRange(r)) => Ok(RequestOp::Range(range_req(r))),
            Some(PbTxnOpRequest::RequestPut(p)) => Ok(RequestOp::Put(put_req(p))),
            Some(PbTxnOpRequest::RequestDeleteRange(d)) => {
                Ok(RequestOp::DeleteRange(delete_req(d)))
            }
            Some(PbTxnOpRequest::RequestTxn(t)) => Ok(RequestOp::Txn(txn_req(t)?)),
            None => Err(Status::invalid_argument("etcdserver: empty txn operation")),
        })
        .collect()
}

pub(crate) fn txn_req(t: &PbTxnRequest) -> Result<TxnRequest, Status> {
    Ok(TxnRequest {
        compare: t.compare.iter().map(compare).collect::<Result<_, _>>()?,
        success: ops(&t.success)?,
        failure: ops(&t.failure)?,
    })
}

pub(crate) fn txn_resp(id: Identity, t: TxnResponse) -> PbTxnResponse {
    PbTxnResponse {
        header: id.header(t.revision),
        succeeded: t.succeeded,
        responses: t
            .responses
            .into_iter()
            .map(|r| PbResponseOp {
                response: Some(match r {
                    ResponseOp::Range(r) => PbTxnOpResponse::ResponseRange(range_resp(id, r)),
                    ResponseOp::Put(p) => PbTxnOpResponse::ResponsePut(put_resp(id, p)),
                    ResponseOp::DeleteRange(d) => {
                        PbTxnOpResponse::ResponseDeleteRange(delete_resp(id, d))
                    }
                    ResponseOp::Txn(t) => PbTxnOpResponse::ResponseTxn(txn_resp(id, t)),
                }),
            })
            .collect(),
    }
}

pub(crate) fn event_to_pb(e: Event) -> PbEvent {
    PbEvent {
        r#type: match e.kind {
            EventKind::Put => 0,
            EventKind::Delete => 1,
        },
        kv: Some(kv_to_pb(e.kv)),
        prev_kv: e.prev_kv.map(kv_to_pb),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_errors_carry_etcds_exact_message_and_our_detail() {
        let s = status(DatastoreError::Compacted {
            requested: 3,
            compacted: 4,
        });
        assert_eq!(s.code(), Code::OutOfRange);
        // etcd's client maps exactly this text to rpctypes.ErrCompacted.
        assert_eq!(
            s.message(),
            "etcdserver: mvcc: required revision has been compacted"
        );
        let detail = s.metadata().get(DETAIL_KEY).and_then(|v| v.to_str().ok());
        assert_eq!(
            detail,
            Some("required revision 3 has been compacted (compacted up to 4)")
        );
    }
}
