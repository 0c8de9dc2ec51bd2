//! `DataStore`: a cluster-scoped datastore that tenant control planes are carved out of.

use serde::{Deserialize, Serialize};

use crate::object::{Resource, ResourceSpec};

/// A datastore (`kamaji.clastix.io/v1alpha1`, kind `DataStore`, cluster-scoped).
pub type DataStore = Resource<DataStoreSpec>;

string_enum! {
    /// Datastore driver. `SQLite` is kmetal's embedded default and not a Kamaji value.
    Driver {
        /// etcd (shared with per-tenant prefix and RBAC, or dedicated).
        Etcd => "etcd",
        /// MySQL through a kine-style log.
        MySql => "MySQL",
        /// PostgreSQL through a kine-style log.
        PostgreSql => "PostgreSQL",
        /// NATS JetStream.
        Nats => "NATS",
        /// Embedded SQLite file (kmetal's zero-setup default).
        Sqlite => "SQLite",
    }
}

/// Desired state of a DataStore.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DataStoreSpec {
    /// Required, immutable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver: Option<Driver>,
    /// `host:port` endpoints (a file path for SQLite); at least one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// Username and password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub basic_auth: Option<BasicAuth>,
    /// CA and client certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_config: Option<TlsConfig>,
}

impl ResourceSpec for DataStoreSpec {
    const KIND: &'static str = "DataStore";
    const NAMESPACED: bool = false;
    type Status = DataStoreStatus;
}

/// `spec.basicAuth`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct BasicAuth {
    /// The user name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<ContentRef>,
    /// The password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<ContentRef>,
}

/// `spec.tlsConfig`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TlsConfig {
    /// CA that signs the servers (and, for etcd, the tenant client certificates: key needed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate_authority: Option<CertKeyPair>,
    /// Client certificate the operator authenticates with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<CertKeyPair>,
}

/// A certificate and, optionally, its private key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CertKeyPair {
    /// PEM certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<ContentRef>,
    /// PEM private key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_key: Option<ContentRef>,
}

/// A credential: inline base64 `content` or a `secretReference`, exactly one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ContentRef {
    /// Base64 of the value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Where the value is stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_reference: Option<SecretReference>,
}

/// A key inside a Secret.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SecretReference {
    /// Secret name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Secret namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Key within the Secret's data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_path: Option<String>,
}

/// Observed state of a DataStore.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DataStoreStatus {
    /// `namespace/name` of each TenantControlPlane using it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub used_by: Vec<String>,
}
