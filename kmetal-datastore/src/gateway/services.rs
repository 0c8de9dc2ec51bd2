//! The gRPC services: KV, Watch, Lease, Maintenance (Status, Alarm) and Cluster
//! (MemberList) over a [`Datastore`]; everything else answers `Unimplemented` at once.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use etcd_client::proto::{
    PbAlarmRequest, PbAlarmResponse, PbClusterService, PbCompactionRequest, PbCompactionResponse,
    PbDefragmentRequest, PbDefragmentResponse, PbDeleteRequest, PbDeleteResponse,
    PbDowngradeRequest, PbDowngradeResponse, PbHashKvRequest, PbHashKvResponse, PbHashRequest,
    PbHashResponse, PbKvService, PbLeaseGrantRequest, PbLeaseGrantResponse,
    PbLeaseKeepAliveRequest, PbLeaseKeepAliveResponse, PbLeaseLeasesRequest, PbLeaseLeasesResponse,
    PbLeaseRevokeRequest, PbLeaseRevokeResponse, PbLeaseService, PbLeaseStatus,
    PbLeaseTimeToLiveRequest, PbLeaseTimeToLiveResponse, PbMaintenanceService, PbMember,
    PbMemberAddRequest, PbMemberAddResponse, PbMemberListRequest, PbMemberListResponse,
    PbMemberPromoteRequest, PbMemberPromoteResponse, PbMemberRemoveRequest, PbMemberRemoveResponse,
    PbMemberUpdateRequest, PbMemberUpdateResponse, PbMoveLeaderRequest, PbMoveLeaderResponse,
    PbPutRequest, PbPutResponse, PbRangeRequest, PbRangeResponse, PbRangeStreamResponse,
    PbSnapshotRequest, PbSnapshotResponse, PbStatusRequest, PbStatusResponse, PbTxnRequest,
    PbTxnResponse, PbWatchRequest, PbWatchRequestUnion, PbWatchResponse, PbWatchService,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::convert::{self, Identity, status};
use crate::error::DatastoreError;
use crate::model::{KeyRange, RangeRequest, WatchRequest};
use crate::store::Datastore;

/// The state every service shares.
#[derive(Clone)]
pub(crate) struct Backend {
    pub(crate) store: Arc<dyn Datastore>,
    pub(crate) id: Identity,
    pub(crate) client_urls: Vec<String>,
}

impl Backend {
    /// The store's current revision for a response header (0 if the store cannot say).
    /// A count-only read of one key: `status()` would also size the database (a directory
    /// walk on PostgreSQL, extra probes on etcd) on every keep-alive and watch creation.
    async fn revision(&self) -> i64 {
        self.store
            .range(RangeRequest::get(Bytes::from_static(b"\0")).count_only())
            .await
            .map(|r| r.revision)
            .unwrap_or(0)
    }
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!("the kmetal etcd gateway does not implement {what}"))
}

#[tonic::async_trait]
impl PbKvService for Backend {
    async fn range(
        &self,
        req: Request<PbRangeRequest>,
    ) -> Result<Response<PbRangeResponse>, Status> {
        let r = req.into_inner();
        let mut mreq = convert::range_req(&r);
        let post = convert::needs_post_processing(&r);
        if post {
            mreq.limit = 0;
            mreq.count_only = false;
        }
        let mut resp = self.store.range(mreq).await.map_err(status)?;
        if post {
            resp = convert::post_process(&r, resp);
            if r.count_only {
                resp.kvs.clear();
            }
        }
        Ok(Response::new(convert::range_resp(self.id, resp)))
    }

    type RangeStreamStream = Stream_<PbRangeStreamResponse>;

    async fn range_stream(
        &self,
        _: Request<PbRangeRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
        Err(unimplemented("KV.RangeStream"))
    }

    async fn put(&self, req: Request<PbPutRequest>) -> Result<Response<PbPutResponse>, Status> {
        let p = req.into_inner();
        let mut put = convert::put_req(&p);
        if p.ignore_value || p.ignore_lease {
            // etcd keeps the current value / lease: the key must exist.
            let cur = self
                .store
                .range(RangeRequest::get(Bytes::from(p.key.clone())))
                .await
                .map_err(status)?;
            let Some(kv) = cur.kvs.into_iter().next() else {
                return Err(Status::invalid_argument("etcdserver: key not found"));
            };
            if p.ignore_value {
                put.value = kv.value;
            }
            if p.ignore_lease {
                put.lease = kv.lease;
            }
        }
        let r = self.store.put(put).await.map_err(status)?;
        Ok(Response::new(convert::put_resp(self.id, r)))
    }

    async fn delete_range(
        &self,
        req: Request<PbDeleteRequest>,
    ) -> Result<Response<PbDeleteResponse>, Status> {
        let r = self
            .store
            .delete_range(convert::delete_req(&req.into_inner()))
            .await
            .map_err(status)?;
        Ok(Response::new(convert::delete_resp(self.id, r)))
    }

    async fn txn(&self, req: Request<PbTxnRequest>) -> Result<Response<PbTxnResponse>, Status> {
        let t = convert::txn_req(&req.into_inner())?;
        let r = self.store.txn(t).await.map_err(status)?;
        Ok(Response::new(convert::txn_resp(self.id, r)))
    }

    async fn compact(
        &self,
        req: Request<PbCompactionRequest>,
    ) -> Result<Response<PbCompactionResponse>, Status> {
        let r = self
            .store
            .compact(req.into_inner().revision)
            .await
            .map_err(status)?;
        Ok(Response::new(PbCompactionResponse {
            header: self.id.header(r.revision),
        }))
    }
}

#[tonic::async_trait]
impl PbWatchService for Backend {
    type WatchStream = Stream_<PbWatchResponse>;

    /// Several watches multiplexed on one stream: each create gets its own forwarding task;
    /// cancel ends it; a progress request is answered once every watch of this stream has
    /// passed on what the store handed it up to the answer's revision (see [`progress`]).
    async fn watch(
        &self,
        req: Request<Streaming<PbWatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let mut incoming = req.into_inner();
        // Bounded: a client that stops reading holds its forwarders, whose store watches then
        // fall behind at their own bound instead of piling responses up here.
        let (tx, rx) = mpsc::channel::<Result<PbWatchResponse, Status>>(STREAM_QUEUE);
        let backend = self.clone();
        tokio::spawn(async move {
            let mut watches: HashMap<i64, Forwarder> = HashMap::new();
            let mut next_id = 0i64;
            while let Ok(Some(msg)) = incoming.message().await {
                match msg.request_union {
                    Some(PbWatchRequestUnion::CreateRequest(c)) => {
                        let id = if c.watch_id != 0 { c.watch_id } else { next_id };
                        next_id = next_id.max(id) + 1;
                        let wreq = WatchRequest {
                            range: KeyRange::between(Bytes::from(c.key), Bytes::from(c.range_end)),
                            start_revision: c.start_revision,
                            prev_kv: c.prev_kv,
                            // filters: 0 NOPUT, 1 NODELETE.
                            no_put: c.filters.contains(&0),
                            no_delete: c.filters.contains(&1),
                            progress_notify: c.progress_notify,
                        };
                        let (drain_tx, drain_rx) = mpsc::unbounded_channel();
                        let task =
                            tokio::spawn(forward(backend.clone(), id, wreq, tx.clone(), drain_rx));
                        watches.insert(
                            id,
                            Forwarder {
                                task,
                                drain: drain_tx,
                            },
                        );
                    }
                    Some(PbWatchRequestUnion::CancelRequest(c)) => {
                        if let Some(f) = watches.remove(&c.watch_id) {
                            f.task.abort();
                        }
                        let rev = backend.revision().await;
                        let _ = tx
                            .send(Ok(PbWatchResponse {
                                header: backend.id.header(rev),
                                watch_id: c.watch_id,
                                canceled: true,
                                ..PbWatchResponse::default()
                            }))
                            .await;
                    }
                    Some(PbWatchRequestUnion::ProgressRequest(_)) => {
                        let drains = watches.values().map(|f| f.drain.clone()).collect();
                        tokio::spawn(progress(backend.clone(), drains, tx.clone()));
                    }
                    None => {}
                }
            }
            for (_, f) in watches {
                f.task.abort();
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Responses one watch stream may have waiting for its client.
const STREAM_QUEUE: usize = 64;

/// A forwarder's answer to a drain: whether it has passed on everything its store watch was
/// handed (false while the watch is behind and reading its history back).
type Drained = oneshot::Sender<bool>;

/// One watch's forwarding task and the way to ask it to pass on what it has been handed.
struct Forwarder {
    task: tokio::task::JoinHandle<()>,
    drain: mpsc::UnboundedSender<Drained>,
}

/// How long a progress answer waits for the store's watch hub to catch up with the current
/// revision before answering anyway (a hub that lags that long is broken, and its watches
/// end with an error of their own).
const PROGRESS_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Answers a progress request on watch id -1 (as etcd does) with revision R only once every
/// event at or below R has gone out on this stream: R is the store's current revision, the
/// answer waits until the store's watch hub has handed every watch its events up to R
/// ([`Datastore::watch_dispatched`]), then each of this stream's forwarders passes on what it
/// holds. kube-apiserver's watch cache trusts such an answer for consistent reads: sent any
/// earlier, a read served from the cache could miss the last write. While a watch of the
/// stream is behind (reading its history back) no answer is sent: the client asks again.
async fn progress(
    backend: Backend,
    drains: Vec<mpsc::UnboundedSender<Drained>>,
    tx: mpsc::Sender<Result<PbWatchResponse, Status>>,
) {
    let rev = backend.revision().await;
    let deadline = tokio::time::Instant::now() + PROGRESS_WAIT;
    while let Some(d) = backend.store.watch_dispatched().await {
        if d >= rev || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    for drain in drains {
        let (done, drained) = oneshot::channel();
        // A forwarder that has ended has nothing left to pass on.
        if drain.send(done).is_ok()
            && let Ok(Ok(false)) = tokio::time::timeout(PROGRESS_WAIT, drained).await
        {
            return;
        }
    }
    let _ = tx
        .send(Ok(PbWatchResponse {
            header: backend.id.header(rev),
            watch_id: -1,
            ..PbWatchResponse::default()
        }))
        .await;
}

/// One store batch as a watch response, or the cancel that ends the watch.
fn batch_response(
    backend: &Backend,
    id: i64,
    rev: i64,
    item: Result<crate::model::WatchBatch, DatastoreError>,
) -> PbWatchResponse {
    match item {
        Ok(batch) => PbWatchResponse {
            header: backend.id.header(batch.revision),
            watch_id: id,
            events: batch.events.into_iter().map(convert::event_to_pb).collect(),
            ..PbWatchResponse::default()
        },
        Err(e) => PbWatchResponse {
            header: backend.id.header(rev),
            watch_id: id,
            canceled: true,
            // A watch that fell behind into compacted history: the client relists.
            compact_revision: match &e {
                DatastoreError::Compacted { compacted, .. } => *compacted,
                _ => 0,
            },
            cancel_reason: status(e).message().to_string(),
            ..PbWatchResponse::default()
        },
    }
}

/// Runs one watch: `created`, then its events (or a cancel with the compaction revision);
/// on a drain request, passes on every batch already handed to it, then acknowledges.
async fn forward(
    backend: Backend,
    id: i64,
    req: WatchRequest,
    tx: mpsc::Sender<Result<PbWatchResponse, Status>>,
    mut drains: mpsc::UnboundedReceiver<Drained>,
) {
    let rev = backend.revision().await;
    let created = PbWatchResponse {
        header: backend.id.header(rev),
        watch_id: id,
        created: true,
        ..PbWatchResponse::default()
    };
    if tx.send(Ok(created)).await.is_err() {
        return;
    }
    let mut stream = match backend.store.watch(req).await {
        Ok(s) => s,
        Err(DatastoreError::Compacted { compacted, .. }) => {
            let _ = tx
                .send(Ok(PbWatchResponse {
                    header: backend.id.header(rev),
                    watch_id: id,
                    canceled: true,
                    compact_revision: compacted,
                    cancel_reason: "etcdserver: mvcc: required revision has been compacted".into(),
                    ..PbWatchResponse::default()
                }))
                .await;
            return;
        }
        Err(e) => {
            let _ = tx
                .send(Ok(PbWatchResponse {
                    header: backend.id.header(rev),
                    watch_id: id,
                    canceled: true,
                    cancel_reason: status(e).message().to_string(),
                    ..PbWatchResponse::default()
                }))
                .await;
            return;
        }
    };
    loop {
        tokio::select! {
            item = stream.next() => {
                let Some(item) = item else { return };
                let resp = batch_response(&backend, id, rev, item);
                let end = resp.canceled;
                if tx.send(Ok(resp)).await.is_err() || end {
                    return;
                }
            }
            Some(done) = drains.recv() => {
                while let Some(item) = stream.try_next() {
                    let resp = batch_response(&backend, id, rev, item);
                    let end = resp.canceled;
                    if tx.send(Ok(resp)).await.is_err() || end {
                        return;
                    }
                }
                let _ = done.send(!stream.is_behind());
            }
        }
    }
}

#[tonic::async_trait]
impl PbLeaseService for Backend {
    async fn lease_grant(
        &self,
        req: Request<PbLeaseGrantRequest>,
    ) -> Result<Response<PbLeaseGrantResponse>, Status> {
        let r = req.into_inner();
        let g = self.store.lease_grant(r.ttl, r.id).await.map_err(status)?;
        let rev = self.revision().await;
        Ok(Response::new(PbLeaseGrantResponse {
            header: self.id.header(rev),
            id: g.id,
            ttl: g.ttl,
            error: String::new(),
        }))
    }

    async fn lease_revoke(
        &self,
        req: Request<PbLeaseRevokeRequest>,
    ) -> Result<Response<PbLeaseRevokeResponse>, Status> {
        let rev = self
            .store
            .lease_revoke(req.into_inner().id)
            .await
            .map_err(status)?;
        Ok(Response::new(PbLeaseRevokeResponse {
            header: self.id.header(rev),
        }))
    }

    type LeaseKeepAliveStream = Stream_<PbLeaseKeepAliveResponse>;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<PbLeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut incoming = req.into_inner();
        // Bounded: a client that sends keep-alives without reading the answers stops being
        // read itself.
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let backend = self.clone();
        tokio::spawn(async move {
            while let Ok(Some(k)) = incoming.message().await {
                // An unknown or expired lease answers TTL 0, as etcd does.
                let ttl = match backend.store.lease_keep_alive(k.id).await {
                    Ok(ttl) => ttl,
                    Err(DatastoreError::LeaseNotFound { .. }) => 0,
                    Err(e) => {
                        let _ = tx.send(Err(status(e))).await;
                        return;
                    }
                };
                let rev = backend.revision().await;
                if tx
                    .send(Ok(PbLeaseKeepAliveResponse {
                        header: backend.id.header(rev),
                        id: k.id,
                        ttl,
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<PbLeaseTimeToLiveRequest>,
    ) -> Result<Response<PbLeaseTimeToLiveResponse>, Status> {
        let r = req.into_inner();
        let rev = self.revision().await;
        let resp = match self.store.lease_time_to_live(r.id, r.keys).await {
            Ok(info) => PbLeaseTimeToLiveResponse {
                header: self.id.header(rev),
                id: r.id,
                ttl: info.ttl,
                granted_ttl: info.granted_ttl,
                keys: info.keys.into_iter().map(|k| k.to_vec()).collect(),
            },
            // etcd reports a missing lease as TTL -1.
            Err(DatastoreError::LeaseNotFound { .. }) => PbLeaseTimeToLiveResponse {
                header: self.id.header(rev),
                id: r.id,
                ttl: -1,
                granted_ttl: 0,
                keys: Vec::new(),
            },
            Err(e) => return Err(status(e)),
        };
        Ok(Response::new(resp))
    }

    async fn lease_leases(
        &self,
        _: Request<PbLeaseLeasesRequest>,
    ) -> Result<Response<PbLeaseLeasesResponse>, Status> {
        let ids = self.store.leases().await.map_err(status)?;
        let rev = self.revision().await;
        Ok(Response::new(PbLeaseLeasesResponse {
            header: self.id.header(rev),
            leases: ids.into_iter().map(|id| PbLeaseStatus { id }).collect(),
        }))
    }
}

/// The version reported by Status: recent enough for kube-apiserver to use watch progress
/// requests.
pub(crate) const VERSION: &str = "3.5.17";

#[tonic::async_trait]
impl PbMaintenanceService for Backend {
    async fn alarm(&self, _: Request<PbAlarmRequest>) -> Result<Response<PbAlarmResponse>, Status> {
        let rev = self.revision().await;
        Ok(Response::new(PbAlarmResponse {
            header: self.id.header(rev),
            alarms: Vec::new(),
        }))
    }

    async fn status(
        &self,
        _: Request<PbStatusRequest>,
    ) -> Result<Response<PbStatusResponse>, Status> {
        let s = self.store.status().await.map_err(status)?;
        let size = i64::try_from(s.db_size).unwrap_or(i64::MAX);
        let index = u64::try_from(s.revision).unwrap_or(0);
        Ok(Response::new(PbStatusResponse {
            header: self.id.header(s.revision),
            version: VERSION.into(),
            db_size: size,
            leader: self.id.member_id,
            raft_index: index,
            raft_term: 1,
            raft_applied_index: index,
            errors: Vec::new(),
            db_size_in_use: size,
            is_learner: false,
            ..PbStatusResponse::default()
        }))
    }

    async fn defragment(
        &self,
        _: Request<PbDefragmentRequest>,
    ) -> Result<Response<PbDefragmentResponse>, Status> {
        Err(unimplemented("Maintenance.Defragment"))
    }

    async fn hash(&self, _: Request<PbHashRequest>) -> Result<Response<PbHashResponse>, Status> {
        Err(unimplemented("Maintenance.Hash"))
    }

    async fn hash_kv(
        &self,
        _: Request<PbHashKvRequest>,
    ) -> Result<Response<PbHashKvResponse>, Status> {
        Err(unimplemented("Maintenance.HashKV"))
    }

    type SnapshotStream = Stream_<PbSnapshotResponse>;

    async fn snapshot(
        &self,
        _: Request<PbSnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        Err(unimplemented(
            "Maintenance.Snapshot (use kmetal's per-tenant logical snapshots)",
        ))
    }

    async fn move_leader(
        &self,
        _: Request<PbMoveLeaderRequest>,
    ) -> Result<Response<PbMoveLeaderResponse>, Status> {
        Err(unimplemented("Maintenance.MoveLeader"))
    }

    async fn downgrade(
        &self,
        _: Request<PbDowngradeRequest>,
    ) -> Result<Response<PbDowngradeResponse>, Status> {
        Err(unimplemented("Maintenance.Downgrade"))
    }
}

#[tonic::async_trait]
impl PbClusterService for Backend {
    async fn member_add(
        &self,
        _: Request<PbMemberAddRequest>,
    ) -> Result<Response<PbMemberAddResponse>, Status> {
        Err(unimplemented("Cluster.MemberAdd"))
    }

    async fn member_remove(
        &self,
        _: Request<PbMemberRemoveRequest>,
    ) -> Result<Response<PbMemberRemoveResponse>, Status> {
        Err(unimplemented("Cluster.MemberRemove"))
    }

    async fn member_update(
        &self,
        _: Request<PbMemberUpdateRequest>,
    ) -> Result<Response<PbMemberUpdateResponse>, Status> {
        Err(unimplemented("Cluster.MemberUpdate"))
    }

    async fn member_list(
        &self,
        _: Request<PbMemberListRequest>,
    ) -> Result<Response<PbMemberListResponse>, Status> {
        let rev = self.revision().await;
        Ok(Response::new(PbMemberListResponse {
            header: self.id.header(rev),
            members: vec![PbMember {
                id: self.id.member_id,
                name: "kmetal-gateway".into(),
                peer_ur_ls: Vec::new(),
                client_ur_ls: self.client_urls.clone(),
                is_learner: false,
            }],
        }))
    }

    async fn member_promote(
        &self,
        _: Request<PbMemberPromoteRequest>,
    ) -> Result<Response<PbMemberPromoteResponse>, Status> {
        Err(unimplemented("Cluster.MemberPromote"))
    }
}
