//! The etcd driver: [`EtcdStore`] over a dedicated cluster or a tenant's prefix of a shared one,
//! and [`EtcdProvisioner`], which creates a tenant's user, role and keyspace.
//!
//! In shared mode the tenant's keys live under `/<schema>/`. The store rewrites every key,
//! range end, compare and watch into that prefix and strips it from what comes back; etcd's
//! RBAC (a role with READWRITE on exactly that range) makes the confinement hold even against
//! a client that bypasses this driver. A tenant sees its own revision and compacts only its
//! own view (`tenant.rs`; the requests that carry it, `shared.rs`): etcd's revision and
//! compaction are the cluster's. Leases are the cluster's too; a tenant's lease ids carry a
//! tag of its own and other tenants' ids do not exist for it (`leases.rs`).
//!
//! Writes are never retried: after a timeout or a lost connection the outcome of a write is
//! unknown, and only the caller knows whether repeating it is safe. Watches are different:
//! they resume by themselves from the revision after the last one delivered, so a consumer
//! sees every event once across a member failure.

mod config;
mod dispatch;
mod errors;
mod leases;
mod provision;
mod shared;
mod tenant;

pub use config::{EtcdConfig, EtcdPassword, EtcdTls, Keyspace};
pub use errors::RequestTimeout;
pub use provision::{AuthBootstrap, EtcdCredentials, EtcdProvisioner};

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use etcd_client::proto::{PbKeyValue, PbTxnOpResponse};
use etcd_client::{
    Client, DeleteOptions, GetOptions, LeaseGrantOptions, LeaseTimeToLiveOptions, PutOptions, Txn,
    TxnOp, WatchFilterType, WatchOptions,
};

use crate::error::{DatastoreError, Result};
use crate::model::{
    CompactResponse, Compare, CompareOp, CompareTarget, DeleteRangeRequest, DeleteRangeResponse,
    Event, EventKind, KeyValue, LeaseGrant, LeaseId, LeaseInfo, PutRequest, PutResponse,
    RangeRequest, RangeResponse, RequestOp, ResponseOp, Revision, Status, TxnRequest, TxnResponse,
    WatchBatch, WatchRequest,
};
use crate::store::{Datastore, WatchSender, WatchStream, watch_channel};
use config::Prefixer;
use errors::Kind;

/// Which failed attempts may be repeated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// The request only reads: repeat it on any unavailability.
    Reads,
    /// The request writes: repeat it only if etcd cannot have received it.
    NotSent,
}

/// What a failed request was about, to fill in the error's details.
#[derive(Debug, Clone, Copy, Default)]
struct Ctx {
    revision: Revision,
    lease: LeaseId,
    ttl: i64,
    size: usize,
}

/// A [`Datastore`] backed by etcd.
///
/// ```no_run
/// # async fn demo() -> kmetal_datastore::Result<()> {
/// use kmetal_datastore::Datastore;
/// use kmetal_datastore::etcd::{EtcdConfig, EtcdStore, Keyspace};
/// use kmetal_datastore::model::PutRequest;
/// let keyspace = Keyspace::shared("default_t1").expect("valid schema");
/// let cfg = EtcdConfig::new(["http://127.0.0.1:2379"]).with_password("default_t1", "secret");
/// let store = EtcdStore::connect(cfg, keyspace).await?;
/// store.put(PutRequest::new("/registry/ns/default", "{}")).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    keyspace: Keyspace,
    prefixer: Prefixer,
    config: EtcdConfig,
    /// Highest compaction revision seen; compaction only moves forward.
    compacted: Arc<AtomicI64>,
    /// The tenant's own compaction, in shared mode.
    tenant: Option<Arc<tenant::TenantView>>,
    /// When the auth token was last renewed: requests refused for a stale token renew it
    /// once between them, not once each (authenticating costs etcd a bcrypt).
    renewed: Arc<tokio::sync::Mutex<tokio::time::Instant>>,
    /// What each live watch has handed on (the gateway's progress answers wait on it).
    watches: Arc<dispatch::Registry>,
    /// The tenant's own lease ids, in shared mode (`leases.rs`).
    wall: Option<leases::LeaseWall>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.config.endpoints)
            .field("keyspace", &self.keyspace)
            .finish_non_exhaustive()
    }
}

/// etcd's Go client accepts responses up to 2 GiB; tonic's 4 MiB default would fail large lists.
const MAX_RESPONSE_BYTES: usize = i32::MAX as usize;

impl EtcdStore {
    /// Connects (authenticating if `config` carries a password) and checks that the keyspace
    /// is readable, so bad credentials fail here rather than on first use.
    pub async fn connect(config: EtcdConfig, keyspace: Keyspace) -> Result<Self> {
        let client = connect_client(&config, true).await?;
        let tenant = match &keyspace {
            Keyspace::Dedicated => None,
            Keyspace::Shared { .. } => Some(Arc::new(tenant::TenantView::new(&keyspace.prefix()))),
        };
        let store = Self {
            client,
            prefixer: Prefixer::new(&keyspace),
            keyspace,
            config,
            compacted: Arc::new(AtomicI64::new(0)),
            tenant,
            renewed: Arc::new(tokio::sync::Mutex::new(tokio::time::Instant::now())),
            watches: Arc::default(),
            wall: None,
        };
        let mut store = store;
        store
            .range(RangeRequest::get(Bytes::from_static(b"\0")).count_only())
            .await?;
        if let Some(t) = &store.tenant {
            store
                .run(
                    "read the tenant's compaction",
                    Ctx::default(),
                    Retry::Reads,
                    || t.load(&store.client),
                )
                .await?;
            let prefix = store.keyspace.prefix();
            let tag = store
                .run(
                    "read the tenant's lease tag",
                    Ctx::default(),
                    Retry::Reads,
                    || leases::load(&store.client, &prefix),
                )
                .await?;
            store.wall = tag.map(leases::LeaseWall::new);
        }
        Ok(store)
    }

    /// The keyspace this store sees.
    pub fn keyspace(&self) -> &Keyspace {
        &self.keyspace
    }

    /// The etcd-client handle underneath (for operations the trait does not cover).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Runs the call `make` builds under the request deadline, classifying failures.
    ///
    /// Failed attempts are repeated within the deadline when that is safe: reads (`retry` is
    /// [`Retry::Reads`]) on any unavailability, and every request when etcd cannot have seen
    /// it (no connection, or a member without a leader refused it).
    async fn run<T, F, Fut>(
        &self,
        op: &'static str,
        ctx: Ctx,
        retry: Retry,
        mut make: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        let mut backoff = Duration::from_millis(20);
        loop {
            let sent = tokio::time::Instant::now();
            match tokio::time::timeout_at(deadline, make()).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if errors::classify(&e) == Kind::StaleAuth => {
                    // Refused unapplied, so safe to repeat even for a write.
                    if !self.renew_token(sent, deadline).await {
                        return Err(self.fail(e, ctx).await);
                    }
                }
                Ok(Err(e)) => {
                    let again = errors::classify(&e) == Kind::Unavailable
                        && (retry == Retry::Reads || errors::not_sent(&e))
                        && tokio::time::Instant::now() + backoff < deadline;
                    if !again {
                        return Err(self.fail(e, ctx).await);
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(_) => {
                    return Err(DatastoreError::unavailable(RequestTimeout {
                        op,
                        after: self.config.request_timeout,
                    }));
                }
            }
        }
    }

    /// Sends `txn` (built from `req`), repeating it like a read when `req` cannot write.
    async fn send_txn(
        &self,
        txn: Txn,
        req: &TxnRequest,
        ctx: Ctx,
    ) -> Result<etcd_client::proto::PbTxnResponse> {
        let retry = if writes(&req.success) || writes(&req.failure) {
            Retry::NotSent
        } else {
            Retry::Reads
        };
        let r = self
            .run("txn", ctx, retry, || {
                let mut kv = self.kv_client();
                let txn = txn.clone();
                async move { kv.txn(txn).await }
            })
            .await?;
        Ok(r.0)
    }

    /// Renews the auth token after a request sent at `sent` was refused for a stale one,
    /// unless another request renewed it since; false when renewing failed (revoked
    /// credentials) or `deadline` passed.
    async fn renew_token(
        &self,
        sent: tokio::time::Instant,
        deadline: tokio::time::Instant,
    ) -> bool {
        let Ok(mut renewed) = tokio::time::timeout_at(deadline, self.renewed.lock()).await else {
            return false;
        };
        if *renewed > sent {
            return true;
        }
        match tokio::time::timeout_at(deadline, self.client.refresh_token()).await {
            Ok(Ok(())) => {
                *renewed = tokio::time::Instant::now();
                true
            }
            _ => false,
        }
    }

    /// Turns an etcd error into ours, asking the server for the details etcd's messages leave
    /// out (the compaction revision, the current revision, the db size).
    async fn fail(&self, e: etcd_client::Error, ctx: Ctx) -> DatastoreError {
        let kind = errors::classify(&e);
        let e = match errors::simple(kind, e) {
            Ok(done) => return done,
            Err(e) => e,
        };
        let limits = self.config.limits;
        match kind {
            Kind::TooLarge => DatastoreError::RequestTooLarge {
                size: ctx.size,
                limit: limits.max_request_bytes,
            },
            Kind::TooManyOps => DatastoreError::TooManyOps {
                ops: ctx.size,
                limit: limits.max_txn_ops,
            },
            Kind::Compacted => DatastoreError::Compacted {
                requested: ctx.revision,
                compacted: self.compact_revision().await.unwrap_or(0),
            },
            Kind::FutureRevision => DatastoreError::FutureRevision {
                requested: ctx.revision,
                current: self.current_revision().await.unwrap_or(0),
            },
            Kind::LeaseNotFound => DatastoreError::LeaseNotFound { id: ctx.lease },
            Kind::LeaseExists => DatastoreError::LeaseExists { id: ctx.lease },
            Kind::TtlTooLarge => DatastoreError::InvalidTtl {
                ttl: ctx.ttl,
                max: limits.max_lease_ttl,
            },
            Kind::QuotaExceeded => DatastoreError::QuotaExceeded {
                used: self.db_size().await.unwrap_or(0),
                quota: limits.quota_backend_bytes,
            },
            _ => DatastoreError::Backend {
                source: Box::new(e),
            },
        }
    }

    /// A cheap read of a key nobody writes (`\0` in the keyspace) at `revision`.
    async fn probe(&self, revision: Revision) -> std::result::Result<i64, etcd_client::Error> {
        let mut kv = self.client.kv_client();
        let opts = GetOptions::new().with_count_only().with_revision(revision);
        let fut = kv.get(self.prefixer.key(b"\0"), Some(opts));
        match tokio::time::timeout(self.config.request_timeout, fut).await {
            Ok(r) => r.map(|r| r.0.header.map_or(0, |h| h.revision)),
            Err(_) => Err(etcd_client::Error::Internal("probe timed out".into())),
        }
    }

    /// The revision as this store's caller sees it (the tenant's, in shared mode).
    async fn own_revision(&self) -> Result<Revision> {
        let probe = RangeRequest::get(Bytes::from_static(b"\0")).count_only();
        Ok(self.range(probe).await?.revision)
    }

    async fn current_revision(&self) -> Option<Revision> {
        self.probe(0).await.ok()
    }

    /// The compaction revision: reads at `r` fail for `r` below it and succeed at or above it,
    /// so a binary search finds it; the last value found makes the usual case one probe.
    async fn compact_revision(&self) -> Option<Revision> {
        let compacted = |r: std::result::Result<i64, etcd_client::Error>| -> Option<bool> {
            match r {
                Ok(_) => Some(false),
                Err(e) if errors::classify(&e) == Kind::Compacted => Some(true),
                Err(_) => None,
            }
        };
        let own = self.tenant.as_ref().map_or(0, |t| t.compacted());
        let known = self.compacted.load(Ordering::Relaxed);
        if !compacted(self.probe(known.max(1)).await)? {
            return Some(known.max(own));
        }
        let (mut lo, mut hi) = (known.max(1), self.current_revision().await?);
        // Invariant: reading at lo fails, reading at hi succeeds.
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if compacted(self.probe(mid).await)? {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        self.compacted.fetch_max(hi, Ordering::Relaxed);
        Some(hi.max(own))
    }

    async fn db_size(&self) -> Option<u64> {
        let mut m = self.client.maintenance_client();
        let fut = m.status();
        let r = tokio::time::timeout(self.config.request_timeout, fut)
            .await
            .ok()?
            .ok()?;
        u64::try_from(r.db_size()).ok()
    }

    fn kv_client(&self) -> etcd_client::KvClient {
        self.client
            .kv_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
    }

    fn kv(&self, kv: PbKeyValue) -> KeyValue {
        KeyValue {
            key: self.prefixer.strip(kv.key),
            value: Bytes::from(kv.value),
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            lease: kv.lease,
        }
    }

    fn get_options(&self, req: &RangeRequest) -> (Vec<u8>, GetOptions) {
        let (key, end) = self.prefixer.range(&req.range);
        let mut o = GetOptions::new()
            .with_limit(req.limit)
            .with_revision(req.revision);
        if !end.is_empty() {
            o = o.with_range(end);
        }
        if req.keys_only {
            o = o.with_keys_only();
        }
        if req.count_only {
            o = o.with_count_only();
        }
        (key, o)
    }

    fn delete_options(&self, req: &DeleteRangeRequest) -> (Vec<u8>, DeleteOptions) {
        let (key, end) = self.prefixer.range(&req.range);
        let mut o = DeleteOptions::new();
        if !end.is_empty() {
            o = o.with_range(end);
        }
        if req.prev_kv {
            o = o.with_prev_key();
        }
        (key, o)
    }

    fn put_parts(&self, req: &PutRequest) -> (Vec<u8>, Vec<u8>, PutOptions) {
        let mut o = PutOptions::new().with_lease(req.lease);
        if req.prev_kv {
            o = o.with_prev_key();
        }
        (self.prefixer.key(&req.key), req.value.to_vec(), o)
    }

    fn compare(&self, c: &Compare) -> etcd_client::Compare {
        let (key, end) = self.prefixer.range(&c.range);
        let op = match c.op {
            CompareOp::Equal => etcd_client::CompareOp::Equal,
            CompareOp::Greater => etcd_client::CompareOp::Greater,
            CompareOp::Less => etcd_client::CompareOp::Less,
            CompareOp::NotEqual => etcd_client::CompareOp::NotEqual,
        };
        let cmp = match &c.target {
            CompareTarget::Version(v) => etcd_client::Compare::version(key, op, *v),
            CompareTarget::CreateRevision(v) => etcd_client::Compare::create_revision(key, op, *v),
            CompareTarget::ModRevision(v) => etcd_client::Compare::mod_revision(key, op, *v),
            CompareTarget::Value(v) => etcd_client::Compare::value(key, op, v.to_vec()),
            CompareTarget::Lease(v) => etcd_client::Compare::lease(key, op, *v),
        };
        if end.is_empty() {
            cmp
        } else {
            cmp.with_range(end)
        }
    }

    fn txn_ops(&self, ops: &[RequestOp]) -> Vec<TxnOp> {
        ops.iter()
            .map(|op| match op {
                RequestOp::Range(r) => {
                    let (k, o) = self.get_options(r);
                    TxnOp::get(k, Some(o))
                }
                RequestOp::Put(p) => {
                    let (k, v, o) = self.put_parts(p);
                    TxnOp::put(k, v, Some(o))
                }
                RequestOp::DeleteRange(d) => {
                    let (k, o) = self.delete_options(d);
                    TxnOp::delete(k, Some(o))
                }
                RequestOp::Txn(t) => TxnOp::txn(self.txn(t)),
            })
            .collect()
    }

    fn txn(&self, t: &TxnRequest) -> Txn {
        Txn::new()
            .when(
                t.compare
                    .iter()
                    .map(|c| self.compare(c))
                    .collect::<Vec<_>>(),
            )
            .and_then(self.txn_ops(&t.success))
            .or_else(self.txn_ops(&t.failure))
    }

    fn range_response(
        &self,
        r: etcd_client::proto::PbRangeResponse,
        rev: Revision,
    ) -> RangeResponse {
        RangeResponse {
            revision: r.header.map_or(rev, |h| h.revision),
            kvs: r.kvs.into_iter().map(|kv| self.kv(kv)).collect(),
            more: r.more,
            count: r.count,
        }
    }

    fn txn_response(
        &self,
        r: etcd_client::proto::PbTxnResponse,
        rev: Revision,
    ) -> Result<TxnResponse> {
        let revision = r.header.map_or(rev, |h| h.revision);
        let mut responses = Vec::with_capacity(r.responses.len());
        for op in r.responses {
            let Some(op) = op.response else {
                return Err(DatastoreError::Backend {
                    source: "etcd returned a txn response op without a response".into(),
                });
            };
            responses.push(match op {
                PbTxnOpResponse::ResponseRange(g) => {
                    ResponseOp::Range(self.range_response(g, revision))
                }
                PbTxnOpResponse::ResponsePut(p) => ResponseOp::Put(PutResponse {
                    revision: p.header.map_or(revision, |h| h.revision),
                    prev_kv: p.prev_kv.map(|kv| self.kv(kv)),
                }),
                PbTxnOpResponse::ResponseDeleteRange(d) => {
                    ResponseOp::DeleteRange(DeleteRangeResponse {
                        revision: d.header.map_or(revision, |h| h.revision),
                        deleted: d.deleted,
                        prev_kvs: d.prev_kvs.into_iter().map(|kv| self.kv(kv)).collect(),
                    })
                }
                PbTxnOpResponse::ResponseTxn(t) => ResponseOp::Txn(self.txn_response(t, revision)?),
            });
        }
        Ok(TxnResponse {
            revision,
            succeeded: r.succeeded,
            responses,
        })
    }

    /// Refuses, as etcd refuses a lease that does not exist, a lease id of another tenant.
    fn check_lease(&self, id: LeaseId) -> Result<()> {
        self.wall.map_or(Ok(()), |w| w.check(id))
    }

    async fn grant(&self, ttl: i64, id: LeaseId) -> Result<LeaseGrant> {
        let ctx = Ctx {
            lease: id,
            ttl,
            ..Ctx::default()
        };
        let r = self
            .run("lease grant", ctx, Retry::NotSent, || {
                let mut l = self.client.lease_client();
                let opts = LeaseGrantOptions::new().with_id(id);
                async move { l.grant(ttl, Some(opts)).await }
            })
            .await?;
        Ok(LeaseGrant {
            id: r.id(),
            ttl: r.ttl(),
        })
    }

    async fn revoke(&self, id: LeaseId) -> Result<Revision> {
        let ctx = Ctx {
            lease: id,
            ..Ctx::default()
        };
        // etcd deletes a revoked lease's keys at a revision of its own: the tenant's marker
        // follows it when some of them were this tenant's.
        let touches = match &self.tenant {
            Some(_) => !self.lease_time_to_live(id, true).await?.keys.is_empty(),
            None => false,
        };
        let r = self
            .run("lease revoke", ctx, Retry::NotSent, || {
                let mut l = self.client.lease_client();
                async move { l.revoke(id).await }
            })
            .await?;
        match &self.tenant {
            Some(t) if touches => self.shared_touch(t).await,
            Some(_) => self.own_revision().await,
            None => Ok(r.0.header.map_or(0, |h| h.revision)),
        }
    }

    async fn keep_alive(&self, id: LeaseId) -> Result<i64> {
        let ctx = Ctx {
            lease: id,
            ..Ctx::default()
        };
        // Renewing twice is harmless, so a keep-alive retries like a read.
        let ttl = self
            .run("lease keep-alive", ctx, Retry::Reads, || {
                let mut l = self.client.lease_client();
                async move {
                    let (mut keeper, mut stream) = l.keep_alive(id).await?;
                    keeper.keep_alive().await?;
                    Ok(stream.message().await?.map(|m| m.ttl()))
                }
            })
            .await?;
        match ttl {
            Some(ttl) if ttl > 0 => Ok(ttl),
            // etcd answers a keep-alive of an unknown lease with TTL 0.
            Some(_) => Err(DatastoreError::LeaseNotFound { id }),
            None => Err(DatastoreError::unavailable(
                "the lease keep-alive stream closed without an answer",
            )),
        }
    }

    async fn time_to_live(&self, id: LeaseId, keys: bool) -> Result<LeaseInfo> {
        let ctx = Ctx {
            lease: id,
            ..Ctx::default()
        };
        let r = self
            .run("lease time-to-live", ctx, Retry::Reads, || {
                let mut l = self.client.lease_client();
                let opts = keys.then(|| LeaseTimeToLiveOptions::new().with_keys());
                async move { l.time_to_live(id, opts).await }
            })
            .await?;
        if r.ttl() < 0 {
            return Err(DatastoreError::LeaseNotFound { id });
        }
        let prefix = self.prefixer.prefix().clone();
        Ok(LeaseInfo {
            id,
            ttl: r.ttl(),
            granted_ttl: r.granted_ttl(),
            // A lease may carry other tenants' keys; only ours are shown.
            keys: r
                .keys()
                .iter()
                .filter(|k| k.starts_with(&prefix))
                .map(|k| self.prefixer.strip(k.clone()))
                .collect(),
        })
    }

    fn check_lease_ttl(&self, ttl: i64) -> Result<()> {
        let max = self.config.limits.max_lease_ttl;
        if (1..=max).contains(&ttl) {
            Ok(())
        } else {
            Err(DatastoreError::InvalidTtl { ttl, max })
        }
    }

    fn watch_options(&self, req: &WatchRequest, start: Revision) -> (Vec<u8>, WatchOptions) {
        let (key, end) = self.prefixer.range(&req.range);
        let mut o = WatchOptions::new().with_start_revision(start);
        if !end.is_empty() {
            o = o.with_range(end);
        }
        if req.prev_kv {
            o = o.with_prev_key();
        }
        if req.progress_notify {
            o = o.with_progress_notify();
        }
        let mut filters = Vec::new();
        if req.no_put {
            filters.push(WatchFilterType::NoPut);
        }
        if req.no_delete {
            filters.push(WatchFilterType::NoDelete);
        }
        if !filters.is_empty() {
            o = o.with_filters(filters);
        }
        (key, o)
    }
}

async fn connect_client(config: &EtcdConfig, with_password: bool) -> Result<Client> {
    let opts = config.connect_options(with_password);
    let fut = Client::connect(&config.endpoints, Some(opts));
    match tokio::time::timeout(config.connect_timeout + config.request_timeout, fut).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(match errors::simple(errors::classify(&e), e) {
            Ok(d) => d,
            Err(e) => DatastoreError::unavailable(e),
        }),
        Err(_) => Err(DatastoreError::unavailable(RequestTimeout {
            op: "connect",
            after: config.connect_timeout + config.request_timeout,
        })),
    }
}

#[async_trait]
impl Datastore for EtcdStore {
    async fn range(&self, req: RangeRequest) -> Result<RangeResponse> {
        if req.range.key.is_empty() {
            return Err(DatastoreError::EmptyKey);
        }
        if let Some(t) = &self.tenant {
            t.check(req.revision)?;
            return self.shared_range(t, req).await;
        }
        let (key, opts) = self.get_options(&req);
        let ctx = Ctx {
            revision: req.revision,
            ..Ctx::default()
        };
        let r = self
            .run("range", ctx, Retry::Reads, || {
                let mut kv = self.kv_client();
                let (key, opts) = (key.clone(), opts.clone());
                async move { kv.get(key, Some(opts)).await }
            })
            .await?;
        Ok(self.range_response(r.0, 0))
    }

    async fn put(&self, req: PutRequest) -> Result<PutResponse> {
        self.config.limits.check_put(&req)?;
        self.check_lease(req.lease)?;
        let ctx = Ctx {
            lease: req.lease,
            size: req.key.len() + req.value.len(),
            ..Ctx::default()
        };
        if let Some(t) = &self.tenant {
            return self.shared_put(t, req, ctx).await;
        }
        let (k, v, o) = self.put_parts(&req);
        let r = self
            .run("put", ctx, Retry::NotSent, || {
                let mut kv = self.kv_client();
                let (k, v, o) = (k.clone(), v.clone(), o.clone());
                async move { kv.put(k, v, Some(o)).await }
            })
            .await?
            .0;
        Ok(PutResponse {
            revision: r.header.map_or(0, |h| h.revision),
            prev_kv: r.prev_kv.map(|kv| self.kv(kv)),
        })
    }

    async fn delete_range(&self, req: DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        if req.range.key.is_empty() {
            return Err(DatastoreError::EmptyKey);
        }
        if let Some(t) = &self.tenant {
            return self.shared_delete(t, req).await;
        }
        let (k, o) = self.delete_options(&req);
        let r = self
            .run("delete", Ctx::default(), Retry::NotSent, || {
                let mut kv = self.kv_client();
                let (k, o) = (k.clone(), o.clone());
                async move { kv.delete(k, Some(o)).await }
            })
            .await?
            .0;
        Ok(DeleteRangeResponse {
            revision: r.header.map_or(0, |h| h.revision),
            deleted: r.deleted,
            prev_kvs: r.prev_kvs.into_iter().map(|kv| self.kv(kv)).collect(),
        })
    }

    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse> {
        self.config.limits.check_txn(&req)?;
        for op in req.success.iter().chain(&req.failure) {
            if let RequestOp::Put(p) = op {
                self.check_lease(p.lease)?;
            }
        }
        let ctx = Ctx {
            size: req.success.len().max(req.failure.len()),
            lease: first_lease(&req),
            ..Ctx::default()
        };
        if let Some(t) = &self.tenant {
            t.check_txn(&req)?;
            return self.shared_txn(t, &req, ctx).await;
        }
        let r = self.send_txn(self.txn(&req), &req, ctx).await?;
        self.txn_response(r, 0)
    }

    async fn compact(&self, revision: Revision) -> Result<CompactResponse> {
        let ctx = Ctx {
            revision,
            ..Ctx::default()
        };
        if let Some(t) = &self.tenant {
            let at = self
                .run("compact", ctx, Retry::NotSent, || {
                    t.compact(&self.client, revision)
                })
                .await??;
            return Ok(CompactResponse { revision: at });
        }
        let r = self
            .run("compact", ctx, Retry::NotSent, || {
                let mut kv = self.kv_client();
                async move { kv.compact(revision, None).await }
            })
            .await?;
        self.compacted.fetch_max(revision, Ordering::Relaxed);
        Ok(CompactResponse {
            revision: r.0.header.map_or(0, |h| h.revision),
        })
    }

    async fn watch(&self, req: WatchRequest) -> Result<WatchStream> {
        if req.range.key.is_empty() {
            return Err(DatastoreError::EmptyKey);
        }
        if let Some(t) = &self.tenant {
            t.check(req.start_revision)?;
        }
        // etcd reports a compacted start revision asynchronously on the stream; asking first
        // lets the caller get the error from `watch` itself, as from every other driver.
        if req.start_revision > 0 {
            match self
                .range(RangeRequest {
                    range: req.range.clone(),
                    revision: req.start_revision,
                    count_only: true,
                    ..RangeRequest::default()
                })
                .await
            {
                Ok(_) | Err(DatastoreError::FutureRevision { .. }) => {}
                Err(DatastoreError::Compacted { compacted, .. }) => {
                    return Err(DatastoreError::Compacted {
                        requested: req.start_revision,
                        compacted,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let tracked = self.watches.register();
        // etcd's own stream waits for us (gRPC flow control) and etcd keeps a slow watch's
        // events itself, so this queue waits for its consumer instead of falling behind.
        // The task ends by itself once the stream is gone (`WatchSender::closed`).
        let (tx, stream) = watch_channel(self.config.limits.watch_buffer_bytes, (), None);
        tokio::spawn(watch_loop(self.clone(), req, tx, ready_tx, tracked));
        match ready_rx.await {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(DatastoreError::Backend {
                source: "the watch task ended before the watch was created".into(),
            }),
        }
    }

    async fn lease_grant(&self, ttl: i64, asked: LeaseId) -> Result<LeaseGrant> {
        self.check_lease_ttl(ttl)?;
        let Some(wall) = &self.wall else {
            return self.grant(ttl, asked).await;
        };
        // A random id of ours may already be taken (by us): a few draws find a free one.
        for _ in 0..4 {
            match self.grant(ttl, wall.grant_id(asked)?).await {
                Err(DatastoreError::LeaseExists { .. }) if asked == 0 => continue,
                other => return other,
            }
        }
        self.grant(ttl, wall.grant_id(asked)?).await
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<Revision> {
        self.check_lease(id)?;
        self.revoke(id).await
    }

    async fn lease_keep_alive(&self, id: LeaseId) -> Result<i64> {
        self.check_lease(id)?;
        self.keep_alive(id).await
    }

    async fn lease_time_to_live(&self, id: LeaseId, keys: bool) -> Result<LeaseInfo> {
        self.check_lease(id)?;
        self.time_to_live(id, keys).await
    }

    async fn leases(&self) -> Result<Vec<LeaseId>> {
        let r = self
            .run("leases", Ctx::default(), Retry::Reads, || {
                let mut l = self.client.lease_client();
                async move { l.leases().await }
            })
            .await?;
        let ids = r.leases().iter().map(|s| s.id());
        Ok(match &self.wall {
            Some(w) => ids.filter(|id| w.owns(*id)).collect(),
            None => ids.collect(),
        })
    }

    async fn watch_dispatched(&self) -> Option<Revision> {
        Some(self.watches.dispatched())
    }

    async fn status(&self) -> Result<Status> {
        let r = self
            .run("status", Ctx::default(), Retry::Reads, || {
                let mut m = self.client.maintenance_client();
                async move { m.status().await }
            })
            .await?;
        let compact_revision = match self.compact_revision().await {
            Some(c) => c,
            None => {
                return Err(DatastoreError::unavailable(
                    "cannot determine the compaction revision",
                ));
            }
        };
        Ok(Status {
            revision: match &self.tenant {
                Some(_) => self.own_revision().await?,
                None => r.header().map_or(0, |h| h.revision()),
            },
            compact_revision,
            db_size: u64::try_from(r.db_size()).unwrap_or(0),
        })
    }
}

/// Whether a branch writes (a put, a delete, or a nested txn either of whose branches does).
fn writes(ops: &[RequestOp]) -> bool {
    ops.iter().any(|op| match op {
        RequestOp::Range(_) => false,
        RequestOp::Put(_) | RequestOp::DeleteRange(_) => true,
        RequestOp::Txn(t) => writes(&t.success) || writes(&t.failure),
    })
}

fn first_lease(t: &TxnRequest) -> LeaseId {
    t.success
        .iter()
        .chain(&t.failure)
        .find_map(|op| match op {
            RequestOp::Put(p) if p.lease != 0 => Some(p.lease),
            _ => None,
        })
        .unwrap_or(0)
}

type Ready = tokio::sync::oneshot::Sender<Result<()>>;

/// Feeds `tx` from etcd, re-creating the etcd watch from the next undelivered revision whenever
/// the stream breaks, until `watch_resume_timeout` passes without success.
async fn watch_loop(
    store: EtcdStore,
    req: WatchRequest,
    tx: WatchSender,
    ready: Ready,
    tracked: Arc<dispatch::Tracked>,
) {
    let mut ready = Some(ready);
    // 0 until the first watch is created; then the first revision not yet delivered.
    let mut next = req.start_revision.max(0);
    let mut broken_since: Option<tokio::time::Instant> = None;
    let mut backoff = Duration::from_millis(50);
    loop {
        if tx.is_closed() {
            return;
        }
        let outcome = watch_once(&store, &req, &mut next, &tx, &mut ready, &tracked).await;
        let err = match outcome {
            WatchEnd::ConsumerGone => return,
            WatchEnd::Fatal(e) => return report(e, &mut ready, &tx),
            WatchEnd::Broken { error, delivered } => {
                if delivered {
                    broken_since = None;
                    backoff = Duration::from_millis(50);
                }
                error
            }
        };
        let since = *broken_since.get_or_insert_with(tokio::time::Instant::now);
        // Creating the watch gets one request deadline; a running watch gets the resume budget.
        let budget = if ready.is_some() {
            store.config.request_timeout
        } else {
            store.config.watch_resume_timeout
        };
        if since.elapsed() >= budget {
            return report(DatastoreError::unavailable(err), &mut ready, &tx);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Ends a watch with `e`: to the `watch` call while it waits, else as the stream's last item.
fn report(e: DatastoreError, ready: &mut Option<Ready>, tx: &WatchSender) {
    match ready.take() {
        Some(r) => {
            let _ = r.send(Err(e));
        }
        None => {
            let _ = tx.send(Err(e));
        }
    }
}

enum WatchEnd {
    ConsumerGone,
    Fatal(DatastoreError),
    Broken {
        error: Box<dyn std::error::Error + Send + Sync>,
        delivered: bool,
    },
}

async fn watch_once(
    store: &EtcdStore,
    req: &WatchRequest,
    next: &mut Revision,
    tx: &WatchSender,
    ready: &mut Option<Ready>,
    tracked: &dispatch::Tracked,
) -> WatchEnd {
    let (key, opts) = store.watch_options(req, *next);
    let mut w = store.client.watch_client();
    let sent = tokio::time::Instant::now();
    let created =
        tokio::time::timeout(store.config.request_timeout, w.watch(key, Some(opts))).await;
    let mut stream = match created {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return match errors::classify(&e) {
                Kind::Unavailable => WatchEnd::Broken {
                    error: Box::new(e),
                    delivered: false,
                },
                Kind::StaleAuth => {
                    let until = tokio::time::Instant::now() + store.config.request_timeout;
                    if store.renew_token(sent, until).await {
                        WatchEnd::Broken {
                            error: Box::new(e),
                            delivered: false,
                        }
                    } else {
                        WatchEnd::Fatal(store.fail(e, Ctx::default()).await)
                    }
                }
                _ => WatchEnd::Fatal(store.fail(e, Ctx::default()).await),
            };
        }
        Err(_) => {
            return WatchEnd::Broken {
                error: Box::new(RequestTimeout {
                    op: "watch",
                    after: store.config.request_timeout,
                }),
                delivered: false,
            };
        }
    };
    let mut delivered = false;
    loop {
        let msg = if ready.is_some() {
            // Until etcd confirms the watch, a silent stream is a failed attempt.
            match tokio::time::timeout(store.config.request_timeout, stream.message()).await {
                Ok(m) => m,
                Err(_) => {
                    return WatchEnd::Broken {
                        error: Box::new(RequestTimeout {
                            op: "watch",
                            after: store.config.request_timeout,
                        }),
                        delivered,
                    };
                }
            }
        } else {
            tokio::select! {
                m = stream.message() => m,
                () = tx.closed() => return WatchEnd::ConsumerGone,
                () = tracked.ask.notified() => {
                    // Answered on this stream once every event before it has been sent; a
                    // failure here shows up on the stream itself.
                    let _ = stream.request_progress().await;
                    continue;
                }
            }
        };
        let resp = match msg {
            Ok(Some(r)) => r.0,
            Ok(None) => {
                return WatchEnd::Broken {
                    error: "etcd closed the watch stream".into(),
                    delivered,
                };
            }
            Err(e) => {
                return WatchEnd::Broken {
                    error: Box::new(e),
                    delivered,
                };
            }
        };
        let header_rev = resp.header.as_ref().map_or(0, |h| h.revision);
        if resp.canceled {
            if resp.compact_revision > 0 {
                return WatchEnd::Fatal(DatastoreError::Compacted {
                    requested: *next,
                    compacted: resp.compact_revision,
                });
            }
            let kind = errors::classify_message(&resp.cancel_reason);
            let until = tokio::time::Instant::now() + store.config.request_timeout;
            let denied = match kind {
                Some(Kind::PermissionDenied) => true,
                Some(Kind::StaleAuth) => !store.renew_token(sent, until).await,
                _ => false,
            };
            if denied {
                return WatchEnd::Fatal(DatastoreError::PermissionDenied {
                    source: Some(resp.cancel_reason.into()),
                });
            }
            // "no leader", a renewed token and friends: try again.
            return WatchEnd::Broken {
                error: format!("etcd cancelled the watch: {}", resp.cancel_reason).into(),
                delivered,
            };
        }
        if resp.created {
            if *next == 0 {
                *next = header_rev + 1;
            }
            tracked.handed(*next - 1);
            if let Some(r) = ready.take() {
                let _ = r.send(Ok(()));
            }
            continue;
        }
        if resp.events.is_empty() {
            // A progress answer: every event up to etcd's revision has been sent before it.
            tracked.handed(header_rev);
            // Watch id -1 answers a progress request the driver made for the gateway's
            // accounting: it is no notification this watch's consumer asked for (a request on
            // one client stream must not reach another's watches).
            if !req.progress_notify || resp.watch_id == -1 {
                continue;
            }
            // Every event up to etcd's revision has been sent; a tenant is told the same in
            // its own revisions: its revision now if that is no later, never below what it
            // was sent.
            let revision = match &store.tenant {
                Some(_) => match store.own_revision().await {
                    Ok(own) => own.min(header_rev).max(*next - 1),
                    Err(_) => continue,
                },
                None => header_rev,
            };
            let progress = WatchBatch {
                revision,
                events: Vec::new(),
            };
            if !tx.send_wait(Ok(progress)).await {
                return WatchEnd::ConsumerGone;
            }
            continue;
        }
        let mut events = Vec::with_capacity(resp.events.len());
        for e in resp.events {
            let Some(kv) = e.kv else { continue };
            let rev = kv.mod_revision;
            // After a resume etcd may repeat what it sent before the break; drop it.
            if rev < *next {
                continue;
            }
            events.push((
                rev,
                Event {
                    kind: if e.r#type == 1 {
                        EventKind::Delete
                    } else {
                        EventKind::Put
                    },
                    kv: store.kv(kv),
                    prev_kv: e.prev_kv.map(|kv| store.kv(kv)),
                },
            ));
        }
        let Some(last) = events.last().map(|(r, _)| *r) else {
            continue;
        };
        // Only whole revisions advance `next`: a txn's events arrive in one response.
        *next = last + 1;
        delivered = true;
        let batch = WatchBatch {
            // etcd's revision may be other tenants'; the last event's is this tenant's.
            revision: if store.tenant.is_some() {
                last
            } else {
                header_rev.max(last)
            },
            events: events.into_iter().map(|(_, e)| e).collect(),
        };
        if !tx.send_wait(Ok(batch)).await {
            return WatchEnd::ConsumerGone;
        }
        tracked.handed(last);
    }
}
