//! The management store: TenantControlPlanes, DataStores and Secrets as JSON objects in any
//! Datastore driver (the embedded SQLite file by default), under `/kmetal/objects/`.
//!
//! Writes are compare-and-swap on the key's mod revision, so `apply`, `delete` and the
//! reconcilers of several processes never overwrite each other's changes: `apply` owns
//! metadata and spec, reconcilers own status and finalizers.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use kmetal::datastore::model::{
    Compare, CompareOp, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use kmetal::datastore::{Datastore, DatastoreError};
use serde_json::{Value, json};

/// Where objects live.
pub const PREFIX: &str = "/kmetal/objects/";
/// The finalizer the operator puts on every TenantControlPlane.
pub const FINALIZER: &str = "kmetal.io/finalizer";

/// The kinds the management store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    TenantControlPlane,
    DataStore,
    Secret,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::TenantControlPlane => "TenantControlPlane",
            Kind::DataStore => "DataStore",
            Kind::Secret => "Secret",
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::DataStore)
    }

    /// Parses a kind as `get`/`delete` accept it (`tcp`, `tenantcontrolplane`, `datastore`,
    /// `ds`, `secret`, case-insensitive, plural or not).
    pub fn parse(s: &str) -> Option<Kind> {
        match s.to_ascii_lowercase().trim_end_matches('s') {
            "tenantcontrolplane" | "tcp" => Some(Kind::TenantControlPlane),
            "datastore" | "d" => Some(Kind::DataStore),
            "secret" => Some(Kind::Secret),
            _ => None,
        }
    }

    fn from_object(v: &Value) -> Option<Kind> {
        match (v["apiVersion"].as_str()?, v["kind"].as_str()?) {
            (kmetal::core::API_VERSION, "TenantControlPlane") => Some(Kind::TenantControlPlane),
            (kmetal::core::API_VERSION, "DataStore") => Some(Kind::DataStore),
            ("v1", "Secret") => Some(Kind::Secret),
            _ => None,
        }
    }
}

/// An object's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectKey {
    pub fn new(kind: Kind, namespace: Option<&str>, name: &str) -> Self {
        let namespace = if kind.namespaced() {
            Some(namespace.unwrap_or("default").to_string())
        } else {
            None
        };
        Self {
            kind,
            namespace,
            name: name.to_string(),
        }
    }

    fn of(v: &Value) -> Result<Self, StoreError> {
        let kind = Kind::from_object(v).ok_or_else(|| StoreError::UnknownKind {
            api_version: v["apiVersion"].as_str().unwrap_or_default().into(),
            kind: v["kind"].as_str().unwrap_or_default().into(),
        })?;
        let name = v["metadata"]["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .ok_or(StoreError::Unnamed(kind.name()))?;
        Ok(Self::new(kind, v["metadata"]["namespace"].as_str(), name))
    }

    fn key(&self) -> String {
        format!(
            "{PREFIX}{}/{}/{}",
            self.kind.name(),
            self.namespace.as_deref().unwrap_or("-"),
            self.name
        )
    }

    /// `kind/name` as messages show it (`namespace/name` for namespaced kinds).
    pub fn display(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{}/{ns}/{}", self.kind.name().to_lowercase(), self.name),
            None => format!("{}/{}", self.kind.name().to_lowercase(), self.name),
        }
    }
}

/// A stored object and the revision it was read at.
#[derive(Debug, Clone)]
pub struct Stored {
    pub key: ObjectKey,
    pub value: Value,
    pub revision: i64,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("management store")]
    Datastore(#[from] DatastoreError),
    #[error("{api_version}/{kind} is not a kind the management store holds")]
    UnknownKind { api_version: String, kind: String },
    #[error("{0} without metadata.name")]
    Unnamed(&'static str),
    #[error("{0} is being deleted")]
    BeingDeleted(String),
    #[error("{0}: this process no longer leads its region; write refused")]
    Fenced(String),
    #[error("{0}: stored object is not valid JSON")]
    Corrupt(String, #[source] serde_json::Error),
}

/// What `apply` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Created,
    Configured,
    Unchanged,
}

/// The management store.
#[derive(Clone)]
pub struct Store {
    ds: Arc<dyn Datastore>,
    /// Writes succeed only while this key holds this value (a region's leader key).
    fence: Option<Arc<(String, String)>>,
    /// The revision of this process's last write per object key (shared with the fenced
    /// copies), so the watch can tell its own status writes from other writers' changes.
    own: Arc<std::sync::Mutex<HashMap<String, i64>>>,
}

/// A Secret's `data`, decoded from base64 (undecodable values read as empty).
pub fn secret_data(secret: &Value) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    if let Some(data) = secret["data"].as_object() {
        for (k, v) in data {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(v.as_str().unwrap_or_default())
                .unwrap_or_default();
            out.insert(k.clone(), String::from_utf8_lossy(&bytes).to_string());
        }
    }
    out
}

pub use kmetal::core::time::now_rfc3339;

impl Store {
    pub fn new(ds: Arc<dyn Datastore>) -> Self {
        Self {
            ds,
            fence: None,
            own: Arc::default(),
        }
    }

    /// Whether the write at `revision` to `key` (a raw store key) was this process's own.
    pub fn is_own_write(&self, key: &str, revision: i64) -> bool {
        self.own
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .is_some_and(|r| *r == revision)
    }

    /// The same store, with every write fenced on `key` still holding `value`.
    pub fn fenced(&self, key: String, value: String) -> Self {
        Self {
            ds: self.ds.clone(),
            own: self.own.clone(),
            fence: Some(Arc::new((key, value))),
        }
    }

    fn guards(&self, key: &ObjectKey, revision: i64) -> Vec<Compare> {
        let mut c = vec![Compare::mod_revision(key.key(), CompareOp::Equal, revision)];
        if let Some(f) = &self.fence {
            c.push(Compare::value(f.0.clone(), CompareOp::Equal, f.1.clone()));
        }
        c
    }

    pub fn datastore(&self) -> &Arc<dyn Datastore> {
        &self.ds
    }

    fn decode(key: ObjectKey, raw: &[u8], revision: i64) -> Result<Stored, StoreError> {
        let mut value: Value =
            serde_json::from_slice(raw).map_err(|e| StoreError::Corrupt(key.display(), e))?;
        value["metadata"]["resourceVersion"] = json!(revision.to_string());
        Ok(Stored {
            key,
            value,
            revision,
        })
    }

    pub async fn get(&self, key: &ObjectKey) -> Result<Option<Stored>, StoreError> {
        let r = self.ds.range(RangeRequest::get(key.key())).await?;
        match r.kvs.first() {
            Some(kv) => Ok(Some(Self::decode(key.clone(), &kv.value, kv.mod_revision)?)),
            None => Ok(None),
        }
    }

    /// Every object of `kind`, sorted by namespace and name; and the store revision.
    pub async fn list(&self, kind: Kind) -> Result<(Vec<Stored>, i64), StoreError> {
        let prefix = format!("{PREFIX}{}/", kind.name());
        let r = self.ds.range(RangeRequest::prefix(prefix.clone())).await?;
        let mut out = Vec::with_capacity(r.kvs.len());
        for kv in &r.kvs {
            let rest = String::from_utf8_lossy(&kv.key[prefix.len()..]).to_string();
            let (ns, name) = rest.split_once('/').unwrap_or(("-", &rest));
            let key = ObjectKey::new(kind, (ns != "-").then_some(ns), name);
            out.push(Self::decode(key, &kv.value, kv.mod_revision)?);
        }
        Ok((out, r.revision))
    }

    /// Writes `value` if the key is still at `revision` (0: absent). Ok(false) on conflict.
    pub async fn put_if(
        &self,
        key: &ObjectKey,
        value: &Value,
        revision: i64,
    ) -> Result<bool, StoreError> {
        Ok(self.put_at(key, value, revision).await?.is_some())
    }

    /// Like [`put_if`](Self::put_if), returning the key's new revision.
    pub async fn put_at(
        &self,
        key: &ObjectKey,
        value: &Value,
        revision: i64,
    ) -> Result<Option<i64>, StoreError> {
        let mut value = value.clone();
        if let Some(m) = value["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        let body = serde_json::to_vec(&value).map_err(|e| StoreError::Corrupt(key.display(), e))?;
        let txn = TxnRequest {
            compare: self.guards(key, revision),
            success: vec![RequestOp::Put(PutRequest::new(key.key(), body))],
            failure: vec![],
        };
        let r = self.ds.txn(txn).await?;
        if r.succeeded {
            self.own
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key.key(), r.revision);
        }
        Ok(r.succeeded.then_some(r.revision))
    }

    /// Removes the key if it is still at `revision`. Ok(false) on conflict.
    pub async fn delete_if(&self, key: &ObjectKey, revision: i64) -> Result<bool, StoreError> {
        let txn = TxnRequest {
            compare: self.guards(key, revision),
            success: vec![RequestOp::DeleteRange(DeleteRangeRequest::key(key.key()))],
            failure: vec![],
        };
        Ok(self.ds.txn(txn).await?.succeeded)
    }

    /// Creates or updates an object from a manifest: metadata labels/annotations and spec (or
    /// a Secret's data) come from `applied`; uid, creation time, finalizers and status are
    /// kept; the generation moves when the spec does.
    pub async fn apply(&self, applied: Value) -> Result<(ObjectKey, Applied), StoreError> {
        let key = ObjectKey::of(&applied)?;
        loop {
            let existing = self.get(&key).await?;
            let (next, revision, outcome) = match existing {
                None => {
                    let mut v = applied.clone();
                    let meta = v["metadata"]
                        .as_object_mut()
                        .ok_or(StoreError::Unnamed(key.kind.name()))?;
                    if let Some(ns) = &key.namespace {
                        meta.insert("namespace".into(), json!(ns));
                    }
                    meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
                    meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
                    meta.insert("generation".into(), json!(1));
                    if key.kind == Kind::TenantControlPlane {
                        meta.insert("finalizers".into(), json!([FINALIZER]));
                    }
                    if let Some(o) = v.as_object_mut() {
                        o.remove("status");
                    }
                    (v, 0, Applied::Created)
                }
                Some(old) => {
                    if !old.value["metadata"]["deletionTimestamp"].is_null() {
                        return Err(StoreError::BeingDeleted(key.display()));
                    }
                    let mut v = old.value.clone();
                    let body = if key.kind == Kind::Secret {
                        "data"
                    } else {
                        "spec"
                    };
                    let spec_changed = v[body] != applied[body];
                    let meta_changed = ["labels", "annotations"]
                        .iter()
                        .any(|f| v["metadata"][f] != applied["metadata"][f]);
                    if !spec_changed && !meta_changed {
                        return Ok((key, Applied::Unchanged));
                    }
                    v[body] = applied[body].clone();
                    for f in ["labels", "annotations"] {
                        v["metadata"][f] = applied["metadata"][f].clone();
                        if v["metadata"][f].is_null() {
                            if let Some(m) = v["metadata"].as_object_mut() {
                                m.remove(f);
                            }
                        }
                    }
                    if spec_changed {
                        let g = v["metadata"]["generation"].as_i64().unwrap_or(1);
                        v["metadata"]["generation"] = json!(g + 1);
                    }
                    (v, old.revision, Applied::Configured)
                }
            };
            if self.put_if(&key, &next, revision).await? {
                return Ok((key, outcome));
            }
            self.check_fence(&key).await?;
        }
    }

    /// Deletes an object: objects with finalizers get a deletion timestamp and stay until
    /// their finalizers are removed. Ok(false) when there was no such object.
    pub async fn delete(&self, key: &ObjectKey) -> Result<bool, StoreError> {
        loop {
            let Some(old) = self.get(key).await? else {
                return Ok(false);
            };
            let has_finalizers = old.value["metadata"]["finalizers"]
                .as_array()
                .is_some_and(|f| !f.is_empty());
            let done = if has_finalizers {
                if !old.value["metadata"]["deletionTimestamp"].is_null() {
                    return Ok(true);
                }
                let mut v = old.value.clone();
                v["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
                self.put_if(key, &v, old.revision).await?
            } else {
                self.delete_if(key, old.revision).await?
            };
            if done {
                return Ok(true);
            }
            self.check_fence(key).await?;
        }
    }

    /// After a refused write: an error if the fence (not a concurrent change) refused it.
    async fn check_fence(&self, key: &ObjectKey) -> Result<(), StoreError> {
        let Some(f) = &self.fence else { return Ok(()) };
        let r = self.ds.range(RangeRequest::get(f.0.clone())).await?;
        if r.kvs.first().is_some_and(|kv| kv.value == f.1.as_bytes()) {
            Ok(())
        } else {
            Err(StoreError::Fenced(key.display()))
        }
    }

    /// A Secret's data, decoded from base64.
    pub async fn secret(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<std::collections::BTreeMap<String, String>>, StoreError> {
        let key = ObjectKey::new(Kind::Secret, Some(namespace), name);
        let Some(s) = self.get(&key).await? else {
            return Ok(None);
        };
        Ok(Some(secret_data(&s.value)))
    }

    /// Writes a Secret owned by a tenant (labelled, so deletion finds every one).
    pub async fn put_secret(
        &self,
        namespace: &str,
        name: &str,
        owner: &str,
        data: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), StoreError> {
        let encoded: serde_json::Map<String, Value> = data
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    json!(base64::engine::general_purpose::STANDARD.encode(v)),
                )
            })
            .collect();
        let value = json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {"kmetal.io/tenant": owner, "app.kubernetes.io/managed-by": "kmetal"},
            },
            "type": "Opaque",
            "data": encoded,
        });
        self.apply(value).await.map(|_| ())
    }

    /// Removes every Secret labelled as owned by `owner` in `namespace`.
    pub async fn delete_secrets_of(
        &self,
        namespace: &str,
        owner: &str,
    ) -> Result<usize, StoreError> {
        let (secrets, _) = self.list(Kind::Secret).await?;
        let mut n = 0;
        for s in secrets {
            if s.key.namespace.as_deref() == Some(namespace)
                && s.value["metadata"]["labels"]["kmetal.io/tenant"] == json!(owner)
                && self.delete_if(&s.key, s.revision).await?
            {
                n += 1;
            }
        }
        Ok(n)
    }
}
