//! Tenant runtimes on every controller of a region, not only on the leader: each controller
//! serves every Ready tenant's etcd endpoint and Konnectivity server (as replicas of a
//! control plane would), so tenants keep running while the leader is down. Each controller
//! announces its runtimes under `/kmetal/runtime/<tenant>/<controller>`, bound to a lease of
//! its own; a migration waits until every other controller has released the tenant, so no
//! write can reach the old slice through another replica.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kmetal::datastore::Datastore;
use kmetal::datastore::model::{DeleteRangeRequest, PutRequest, RangeRequest};
use serde_json::{Value, json};

use crate::store::ObjectKey;

/// Where runtimes are announced.
pub const PREFIX: &str = "/kmetal/runtime/";

fn prefix_of(tenant: &ObjectKey) -> String {
    format!("{PREFIX}{}/", tenant.display())
}

/// This controller's announcements.
pub struct Registry {
    ds: Arc<dyn Datastore>,
    identity: String,
    ttl: i64,
    lease: tokio::sync::Mutex<Option<i64>>,
    announced: tokio::sync::Mutex<BTreeMap<ObjectKey, Value>>,
}

impl Registry {
    /// A registry for `identity`; its lease lasts `ttl` without renewal.
    pub fn start(ds: Arc<dyn Datastore>, identity: String, ttl: Duration) -> Arc<Registry> {
        let r = Arc::new(Registry {
            ds,
            identity,
            ttl: ttl.as_secs().max(1) as i64,
            lease: tokio::sync::Mutex::default(),
            announced: tokio::sync::Mutex::default(),
        });
        let weak = Arc::downgrade(&r);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
                let Some(r) = weak.upgrade() else { return };
                r.keep_alive().await;
            }
        });
        r
    }

    async fn lease(&self) -> Result<i64, String> {
        let mut l = self.lease.lock().await;
        if let Some(id) = *l {
            return Ok(id);
        }
        let id = self
            .ds
            .lease_grant(self.ttl, 0)
            .await
            .map_err(|e| format!("runtime lease: {}", kmetal::Report(&e)))?
            .id;
        *l = Some(id);
        Ok(id)
    }

    async fn keep_alive(&self) {
        let current = *self.lease.lock().await;
        let Some(id) = current else { return };
        if matches!(self.ds.lease_keep_alive(id).await, Ok(t) if t > 0) {
            return;
        }
        // The lease ran out (the store was away): announce everything again on a new one.
        *self.lease.lock().await = None;
        let all: Vec<(ObjectKey, Value)> = self
            .announced
            .lock()
            .await
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, v) in all {
            let _ = self.put(&k, &v).await;
        }
    }

    async fn put(&self, tenant: &ObjectKey, v: &Value) -> Result<(), String> {
        let lease = self.lease().await?;
        let key = format!("{}{}", prefix_of(tenant), self.identity);
        self.ds
            .put(PutRequest::new(key, v.to_string()).with_lease(lease))
            .await
            .map(|_| ())
            .map_err(|e| format!("announcing the runtime: {}", kmetal::Report(&e)))
    }

    /// Announces that this controller serves `tenant` at these addresses.
    pub async fn announce(
        &self,
        tenant: &ObjectKey,
        endpoint: &str,
        agents: &str,
    ) -> Result<(), String> {
        let v = json!({"endpoint": endpoint, "konnectivity": agents});
        if self.announced.lock().await.get(tenant) == Some(&v) {
            return Ok(());
        }
        self.put(tenant, &v).await?;
        self.announced.lock().await.insert(tenant.clone(), v);
        Ok(())
    }

    /// Withdraws this controller's runtime of `tenant`.
    pub async fn withdraw(&self, tenant: &ObjectKey) {
        if self.announced.lock().await.remove(tenant).is_some() {
            let key = format!("{}{}", prefix_of(tenant), self.identity);
            let _ = self.ds.delete_range(DeleteRangeRequest::key(key)).await;
        }
    }

    /// The controllers other than this one that serve `tenant`.
    pub async fn others(&self, tenant: &ObjectKey) -> Result<Vec<String>, String> {
        let prefix = prefix_of(tenant);
        let r = self
            .ds
            .range(RangeRequest::prefix(prefix.clone()))
            .await
            .map_err(|e| kmetal::Report(&e).to_string())?;
        Ok(r.kvs
            .iter()
            .map(|kv| String::from_utf8_lossy(&kv.key[prefix.len()..]).to_string())
            .filter(|id| *id != self.identity)
            .collect())
    }

    /// Waits until no other controller serves `tenant` (they stop when they see it migrate);
    /// an error names the ones still serving after `timeout`.
    pub async fn wait_others_gone(
        &self,
        tenant: &ObjectKey,
        timeout: Duration,
    ) -> Result<(), String> {
        let end = tokio::time::Instant::now() + timeout;
        loop {
            let others = self.others(tenant).await?;
            if others.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= end {
                return Err(format!(
                    "replicas still serving the old slice: {}",
                    others.join(", ")
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
