//! A tenant's requests on a shared etcd, each carrying its marker (see `tenant.rs`): a
//! branch that writes ends by touching it, a branch that reads ends by reading it, and the
//! response's revisions are the tenant's.

use etcd_client::Txn;

use super::tenant::TenantView;
use super::{Ctx, EtcdStore, Retry, writes};
use crate::error::{DatastoreError, Result};
use crate::model::{
    Compare, CompareOp, CompareTarget, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, RequestOp, ResponseOp, Revision, TxnRequest,
    TxnResponse,
};

/// Sets every revision in `ops` to `revision`: inside a txn etcd answers each op with the
/// txn's own header.
fn set_revision(ops: &mut [ResponseOp], revision: Revision) {
    for op in ops {
        match op {
            ResponseOp::Range(r) => r.revision = revision,
            ResponseOp::Put(p) => p.revision = revision,
            ResponseOp::DeleteRange(d) => d.revision = revision,
            ResponseOp::Txn(t) => {
                t.revision = revision;
                set_revision(&mut t.responses, revision);
            }
        }
    }
}

fn unexpected(what: &'static str) -> DatastoreError {
    DatastoreError::Backend {
        source: what.into(),
    }
}

impl EtcdStore {
    fn marked_branch(&self, view: &TenantView, ops: &[RequestOp]) -> Vec<etcd_client::TxnOp> {
        let mut out = self.txn_ops(ops);
        out.push(if writes(ops) {
            view.touch()
        } else {
            view.read()
        });
        out
    }

    /// Runs `t` with the marker in both branches; the answer without the marker's op, at the
    /// tenant's revision.
    pub(super) async fn shared_txn(
        &self,
        view: &TenantView,
        t: &TxnRequest,
        ctx: Ctx,
    ) -> Result<TxnResponse> {
        if t.success.len().max(t.failure.len()) >= self.config.limits.max_txn_ops {
            // The marker's op must fit beside them.
            return Err(DatastoreError::TooManyOps {
                ops: t.success.len().max(t.failure.len()) + 1,
                limit: self.config.limits.max_txn_ops,
            });
        }
        let txn = Txn::new()
            .when(
                t.compare
                    .iter()
                    .map(|c| self.compare(c))
                    .collect::<Vec<_>>(),
            )
            .and_then(self.marked_branch(view, &t.success))
            .or_else(self.marked_branch(view, &t.failure));
        let r = self.send_txn(txn, t, ctx).await?;
        let mut resp = self.txn_response(r, 0)?;
        let revision = match resp.responses.pop() {
            Some(ResponseOp::Range(marker)) => view.revision(marker.kvs.first(), resp.revision),
            Some(ResponseOp::Put(touched)) => touched.revision,
            _ => return Err(unexpected("etcd's txn answer lacks the tenant marker's op")),
        };
        resp.revision = revision;
        set_revision(&mut resp.responses, revision);
        Ok(resp)
    }

    /// A range as a txn that also reads the marker.
    pub(super) async fn shared_range(
        &self,
        view: &TenantView,
        req: RangeRequest,
    ) -> Result<RangeResponse> {
        let ctx = Ctx {
            revision: req.revision,
            ..Ctx::default()
        };
        let t = TxnRequest {
            success: vec![RequestOp::Range(req)],
            ..TxnRequest::default()
        };
        match self.shared_txn(view, &t, ctx).await?.responses.pop() {
            Some(ResponseOp::Range(r)) => Ok(r),
            _ => Err(unexpected("etcd's txn answer lacks the range")),
        }
    }

    /// A put as a txn that also touches the marker.
    pub(super) async fn shared_put(
        &self,
        view: &TenantView,
        req: PutRequest,
        ctx: Ctx,
    ) -> Result<PutResponse> {
        let t = TxnRequest {
            success: vec![RequestOp::Put(req)],
            ..TxnRequest::default()
        };
        match self.shared_txn(view, &t, ctx).await?.responses.pop() {
            Some(ResponseOp::Put(p)) => Ok(p),
            _ => Err(unexpected("etcd's txn answer lacks the put")),
        }
    }

    /// A delete as a txn that touches the marker only when some key in the range exists
    /// (an empty range's `create_revision > 0` fails), so deleting nothing moves no
    /// revision, as in etcd.
    pub(super) async fn shared_delete(
        &self,
        view: &TenantView,
        req: DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse> {
        let t = TxnRequest {
            compare: vec![Compare {
                range: req.range.clone(),
                op: CompareOp::Greater,
                target: CompareTarget::CreateRevision(0),
            }],
            success: vec![RequestOp::DeleteRange(req)],
            failure: Vec::new(),
        };
        let mut r = self.shared_txn(view, &t, Ctx::default()).await?;
        if !r.succeeded {
            return Ok(DeleteRangeResponse {
                revision: r.revision,
                deleted: 0,
                prev_kvs: Vec::new(),
            });
        }
        match r.responses.pop() {
            Some(ResponseOp::DeleteRange(d)) => Ok(d),
            _ => Err(unexpected("etcd's txn answer lacks the delete")),
        }
    }

    /// Touches the marker alone (after etcd deleted the tenant's keys of a revoked lease, a
    /// write the driver cannot put in the same transaction); the tenant's new revision.
    pub(super) async fn shared_touch(&self, view: &TenantView) -> Result<Revision> {
        let r = self
            .run(
                "touch the tenant marker",
                Ctx::default(),
                Retry::NotSent,
                || {
                    let mut kv = self.kv_client();
                    let txn = Txn::new().and_then([view.touch()]);
                    async move { kv.txn(txn).await }
                },
            )
            .await?;
        Ok(r.0.header.map_or(0, |h| h.revision))
    }
}
