//! One controller per region: a lease-backed key in the management store names the leader;
//! it keeps the lease alive, and every write it makes is fenced on still holding the key, so
//! a deposed leader (paused, partitioned, killed mid-reconcile) can never overwrite its
//! successor.

use std::time::Duration;

use kmetal::datastore::model::{
    Compare, CompareOp, PutRequest, RangeRequest, RequestOp, ResponseOp, TxnRequest,
};
use tokio::sync::watch;

use crate::store::Store;

/// Where leader keys live.
pub const PREFIX: &str = "/kmetal/leaders/";

/// The leader key of `region`.
pub fn key(region: &str) -> String {
    format!("{PREFIX}{region}")
}

/// Campaigns for `region` as `identity` until the process ends; the receiver says whether we
/// lead. Dropping `stop` (or sending true) releases the lease at once.
pub fn campaign(
    store: Store,
    region: &str,
    identity: &str,
    ttl: Duration,
    mut stop: watch::Receiver<bool>,
) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    let key = key(region);
    let identity = identity.to_string();
    let ds = store.datastore().clone();
    let ttl_secs = ttl.as_secs().max(1) as i64;
    let tick = ttl / 3;
    tokio::spawn(async move {
        loop {
            if *stop.borrow() {
                break;
            }
            let lease = match ds.lease_grant(ttl_secs, 0).await {
                Ok(l) => l.id,
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: lease grant failed");
                    tokio::time::sleep(tick).await;
                    continue;
                }
            };
            let txn = TxnRequest {
                compare: vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)],
                success: vec![RequestOp::Put(
                    PutRequest::new(key.clone(), identity.clone()).with_lease(lease),
                )],
                failure: vec![RequestOp::Range(RangeRequest::get(key.clone()))],
            };
            let won = match ds.txn(txn).await {
                Ok(r) if r.succeeded => true,
                Ok(r) => {
                    let holder = r.responses.first().and_then(|op| match op {
                        ResponseOp::Range(g) => g
                            .kvs
                            .first()
                            .map(|kv| String::from_utf8_lossy(&kv.value).to_string()),
                        _ => None,
                    });
                    tracing::debug!(?holder, "leader election: another controller leads");
                    false
                }
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: campaign failed");
                    false
                }
            };
            if !won {
                let _ = ds.lease_revoke(lease).await;
                tokio::select! {
                    _ = tokio::time::sleep(tick) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            tracing::info!(%identity, key = %key, "leading");
            let _ = tx.send(true);
            loop {
                let stopped = tokio::select! {
                    _ = tokio::time::sleep(tick) => false,
                    _ = stop.changed() => true,
                };
                if stopped {
                    break;
                }
                let alive = matches!(ds.lease_keep_alive(lease).await, Ok(t) if t > 0);
                let ours = match ds.range(RangeRequest::get(key.clone())).await {
                    Ok(r) => r
                        .kvs
                        .first()
                        .is_some_and(|kv| kv.value == identity.as_bytes()),
                    Err(_) => false,
                };
                if !alive || !ours {
                    tracing::warn!(%identity, "lost leadership");
                    break;
                }
            }
            let _ = tx.send(false);
            let _ = ds.lease_revoke(lease).await;
        }
        let _ = tx.send(false);
    });
    rx
}
