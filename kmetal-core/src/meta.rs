//! Object metadata and status conditions, shaped like Kubernetes' `ObjectMeta` and `Condition`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The subset of Kubernetes `metadata` that kmetal reads and writes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ObjectMeta {
    /// Object name (RFC 1123 label for TenantControlPlane, subdomain for DataStore).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Namespace; DataStores are cluster-scoped and leave it empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Stable unique id. Datastore schema and user default to it, never to the name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Labels.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Generation of the spec, bumped on each spec change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// Opaque store version used for optimistic concurrency.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    /// RFC 3339 creation time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    /// RFC 3339 time at which deletion was requested.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<String>,
    /// Finalizers that must be removed before the object goes away.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub finalizers: Vec<String>,
}

impl ObjectMeta {
    /// Returns the uid, assigning a fresh random one first if the object has none
    /// (what an API server does on create).
    pub fn ensure_uid(&mut self) -> &str {
        self.uid
            .get_or_insert_with(|| uuid::Uuid::new_v4().to_string())
            .as_str()
    }
}

string_enum! {
    /// A condition's truth value.
    ConditionStatus {
        /// The condition holds.
        True => "True",
        /// The condition does not hold.
        False => "False",
        /// Not known yet.
        Unknown => "Unknown",
    }
}

/// One status condition (`type`, `status`, `reason`, `message`, transition time).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. `Ready`, `DataStoreProvisioned`.
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: ConditionStatus,
    /// CamelCase machine-readable reason.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Human-readable detail.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// RFC 3339 time of the last status change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// Generation the condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_uid_is_stable() {
        let mut m = ObjectMeta::default();
        let first = m.ensure_uid().to_owned();
        assert_eq!(first.len(), 36);
        assert_eq!(m.ensure_uid(), first);
    }

    #[test]
    fn unknown_condition_status_is_kept() {
        let s: ConditionStatus = serde_json::from_str("\"Maybe\"").unwrap();
        assert_eq!(s, ConditionStatus::Unrecognized("Maybe".into()));
        assert!(!s.is_known());
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"Maybe\"");
    }
}
