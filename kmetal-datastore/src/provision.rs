//! Provisioning: creating and removing a tenant's slice of a datastore (an etcd prefix with its
//! user and role, a SQL database with its role) and handing back what the tenant's api-server
//! needs to reach it.
//!
//! Every [`Provisioner`] is idempotent: provisioning twice leaves one slice (with the password
//! of the last call), and deprovisioning something already gone succeeds.

use async_trait::async_trait;

use crate::error::DatastoreError;

/// How the tenant authenticates to its slice.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SliceAuth {
    /// With this password (the caller generates and stores it, Kamaji-style, in a Secret).
    Password(String),
    /// With a TLS client certificate whose CN is the slice's user.
    ClientCertificate,
}

impl std::fmt::Debug for SliceAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Password(_) => f.write_str("Password(<redacted>)"),
            Self::ClientCertificate => f.write_str("ClientCertificate"),
        }
    }
}

/// One tenant's slice: Kamaji's `status.storage.setup` schema and user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantSlice {
    /// Schema: the etcd prefix `/<schema>/` or the SQL database name.
    pub schema: String,
    /// The user (etcd user or SQL role) the tenant's api-server connects as.
    pub user: String,
    /// How that user authenticates.
    pub auth: SliceAuth,
}

impl TenantSlice {
    /// A slice whose user authenticates with `password`.
    pub fn with_password(
        schema: impl Into<String>,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        Self {
            schema: schema.into(),
            user: user.into(),
            auth: SliceAuth::Password(password.into()),
        }
    }

    /// A slice whose user authenticates with a client certificate (CN = `user`).
    pub fn with_client_certificate(schema: impl Into<String>, user: impl Into<String>) -> Self {
        Self {
            schema: schema.into(),
            user: user.into(),
            auth: SliceAuth::ClientCertificate,
        }
    }

    /// Checks schema and user names.
    pub fn check(&self) -> Result<(), ProvisionError> {
        check_name(&self.schema).map_err(ProvisionError::InvalidSchema)?;
        check_name(&self.user).map_err(ProvisionError::InvalidUser)?;
        Ok(())
    }
}

/// A random password for a tenant's datastore user: 32 hex digits (122 random bits from the OS's
/// generator).
///
/// ```
/// let p = kmetal_datastore::provision::generate_password();
/// assert_eq!(p.len(), 32);
/// assert_ne!(p, kmetal_datastore::provision::generate_password());
/// ```
pub fn generate_password() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Why a schema or user name cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    /// The name is empty.
    #[error("name is empty")]
    Empty,
    /// The name is longer than PostgreSQL's 63-byte identifiers allow.
    #[error("name {name:?} is longer than 63 bytes")]
    TooLong {
        /// The name.
        name: String,
    },
    /// The name has a character other than ASCII letters, digits, `_` and `-`.
    #[error("{schema:?} may contain only ASCII letters, digits, '_' and '-'")]
    InvalidCharacter {
        /// The name.
        schema: String,
    },
}

/// Checks a schema or user name: 1..=63 bytes of ASCII letters, digits, `_` and `-`, which is
/// safe as an etcd prefix segment and as a quoted SQL identifier.
///
/// ```
/// use kmetal_datastore::provision::check_name;
/// assert!(check_name("default_tenant1").is_ok());
/// assert!(check_name("a/b").is_err());
/// ```
pub fn check_name(name: &str) -> Result<(), SchemaError> {
    if name.is_empty() {
        return Err(SchemaError::Empty);
    }
    if name.len() > 63 {
        return Err(SchemaError::TooLong { name: name.into() });
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(SchemaError::InvalidCharacter {
            schema: name.into(),
        });
    }
    Ok(())
}

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProvisionError {
    /// The schema is unusable.
    #[error("invalid schema")]
    InvalidSchema(#[source] SchemaError),
    /// The user name is unusable.
    #[error("invalid user name")]
    InvalidUser(#[source] SchemaError),
    /// The driver does not support this way of authenticating.
    #[error("{driver} slices cannot authenticate with {auth}")]
    UnsupportedAuth {
        /// The driver.
        driver: &'static str,
        /// The refused method.
        auth: &'static str,
    },
    /// A file of a file-backed slice could not be created or removed.
    #[error("{step} {path}")]
    File {
        /// What was being done (`create directory`, `remove database file`).
        step: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A step against the datastore failed.
    #[error("provisioning step {step:?} failed")]
    Step {
        /// What was being done (`create role`, `grant permission`, …).
        step: &'static str,
        /// The datastore's error.
        #[source]
        source: DatastoreError,
    },
}

/// Creates and removes tenant slices of one datastore.
#[async_trait]
pub trait Provisioner: Send + Sync {
    /// What a tenant needs to connect to its slice.
    type Credentials: Send;

    /// Creates the slice (or brings an existing one in line) and returns its credentials.
    async fn provision(&self, slice: &TenantSlice) -> Result<Self::Credentials, ProvisionError>;

    /// Removes the slice's data, user and role; succeeds if they are already gone.
    async fn deprovision(&self, slice: &TenantSlice) -> Result<(), ProvisionError>;
}
