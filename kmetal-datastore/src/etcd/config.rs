//! How to reach an etcd cluster and which part of its keyspace a tenant sees.

use std::time::Duration;

use bytes::Bytes;
use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

use crate::model::{KeyRange, Limits, prefix_end};
use crate::provision::{SchemaError, check_name};

/// Client TLS settings: the CA that signed the servers, and the client certificate (whose CN
/// is the etcd user when the cluster authenticates by certificate).
#[derive(Clone)]
pub struct EtcdTls {
    /// PEM of the CA that signed etcd's serving certificates.
    pub ca_pem: String,
    /// PEM certificate and key presented to etcd, if any.
    pub identity: Option<(String, String)>,
    /// Name to check the server certificate against (defaults to the endpoint host).
    pub domain: Option<String>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The private key never reaches logs.
        f.debug_struct("EtcdTls")
            .field("identity", &self.identity.as_ref().map(|_| "<redacted>"))
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

/// A user name and password for etcd's password authentication.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdPassword {
    /// etcd user.
    pub user: String,
    /// Its password.
    pub password: String,
}

impl std::fmt::Debug for EtcdPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdPassword")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Connection settings for an etcd cluster.
///
/// ```
/// use std::time::Duration;
/// use kmetal_datastore::etcd::EtcdConfig;
/// let cfg = EtcdConfig::new(["http://127.0.0.1:2379"]).with_request_timeout(Duration::from_secs(2));
/// assert_eq!(cfg.endpoints.len(), 1);
/// ```
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs of the members (`http://` or `https://`).
    pub endpoints: Vec<String>,
    /// TLS settings (required for `https://` endpoints).
    pub tls: Option<EtcdTls>,
    /// Password authentication, if the cluster has auth on and no client certificate is used.
    pub password: Option<EtcdPassword>,
    /// How long to wait for a connection.
    pub connect_timeout: Duration,
    /// Deadline of every request; past it the request fails with
    /// [`Unavailable`](crate::DatastoreError::Unavailable) instead of hanging.
    pub request_timeout: Duration,
    /// How long a broken watch keeps trying to resume before it reports `Unavailable`.
    pub watch_resume_timeout: Duration,
    /// The server's limits, checked locally so oversized requests fail before the network.
    pub limits: Limits,
}

impl EtcdConfig {
    /// Settings for `endpoints` with etcd's defaults: no TLS, no auth, 5 s requests, 30 s to
    /// resume a watch.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            tls: None,
            password: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            watch_resume_timeout: Duration::from_secs(30),
            limits: Limits::default(),
        }
    }

    /// Uses TLS.
    pub fn with_tls(mut self, tls: EtcdTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Authenticates with a password.
    pub fn with_password(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.password = Some(EtcdPassword {
            user: user.into(),
            password: password.into(),
        });
        self
    }

    /// Sets the per-request deadline.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets how long a broken watch tries to resume.
    pub fn with_watch_resume_timeout(mut self, timeout: Duration) -> Self {
        self.watch_resume_timeout = timeout;
        self
    }

    pub(crate) fn connect_options(&self, with_password: bool) -> ConnectOptions {
        let mut o = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            // A member cut off from the leader answers "no leader" at once instead of letting
            // requests (and watches) wait on it.
            .with_require_leader(true)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let Some(tls) = &self.tls {
            let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.identity {
                t = t.identity(Identity::from_pem(cert, key));
            }
            if let Some(d) = &tls.domain {
                t = t.domain_name(d.clone());
            }
            o = o.with_tls(t);
        }
        if with_password && let Some(p) = &self.password {
            o = o.with_user(p.user.clone(), p.password.clone());
        }
        o
    }
}

/// Which part of the cluster's keyspace a store sees.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Keyspace {
    /// The tenant owns the cluster: keys are stored as given.
    Dedicated,
    /// The cluster is shared: the tenant's keys live under `/<schema>/`, and every range,
    /// compare and watch is confined to it.
    Shared {
        /// The tenant's schema (Kamaji's `dataStoreSchema`).
        schema: String,
    },
}

impl Keyspace {
    /// The shared keyspace of `schema`, checked.
    pub fn shared(schema: impl Into<String>) -> Result<Self, SchemaError> {
        let schema = schema.into();
        // A '/' would let one schema nest inside another's prefix.
        check_name(&schema)?;
        Ok(Self::Shared { schema })
    }

    /// The key prefix: empty for dedicated, `/<schema>/` for shared.
    pub fn prefix(&self) -> Bytes {
        match self {
            Self::Dedicated => Bytes::new(),
            Self::Shared { schema } => Bytes::from(format!("/{schema}/")),
        }
    }

    /// The cluster key range the tenant owns (every key for dedicated).
    pub fn owned_range(&self) -> KeyRange {
        KeyRange::prefix(self.prefix())
    }
}

/// Maps tenant keys to cluster keys and back.
#[derive(Debug, Clone)]
pub(crate) struct Prefixer {
    prefix: Bytes,
}

impl Prefixer {
    pub(crate) fn new(keyspace: &Keyspace) -> Self {
        Self {
            prefix: keyspace.prefix(),
        }
    }

    pub(crate) fn prefix(&self) -> &Bytes {
        &self.prefix
    }

    pub(crate) fn key(&self, key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + key.len());
        k.extend_from_slice(&self.prefix);
        k.extend_from_slice(key);
        k
    }

    /// The cluster range for a tenant range: `[0]` ends (every key from `key`) stop at the end
    /// of the tenant's prefix, so no range reaches past it.
    pub(crate) fn range(&self, r: &KeyRange) -> (Vec<u8>, Vec<u8>) {
        let end = if r.range_end.is_empty() {
            Vec::new()
        } else if r.range_end.as_ref() == [0] {
            if self.prefix.is_empty() {
                vec![0]
            } else {
                prefix_end(&self.prefix)
            }
        } else {
            self.key(&r.range_end)
        };
        (self.key(&r.key), end)
    }

    /// The tenant key of a cluster key (the cluster key itself when it lies outside the prefix,
    /// which the server's range confinement makes impossible).
    pub(crate) fn strip(&self, key: Vec<u8>) -> Bytes {
        let b = Bytes::from(key);
        if !self.prefix.is_empty() && b.starts_with(&self.prefix) {
            b.slice(self.prefix.len()..)
        } else {
            b
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_ranges_stay_inside_the_prefix() {
        let p = Prefixer::new(&Keyspace::shared("a").unwrap());
        assert_eq!(p.key(b"k"), b"/a/k".to_vec());
        let (k, e) = p.range(&KeyRange::prefix(""));
        assert_eq!((k.as_slice(), e.as_slice()), (&b"/a/\0"[..], &b"/a0"[..]));
        let (k, e) = p.range(&KeyRange::prefix("/registry/"));
        assert_eq!(
            (k.as_slice(), e.as_slice()),
            (&b"/a//registry/"[..], &b"/a//registry0"[..])
        );
        assert!(!KeyRange::between(k, e).contains(b"/aa/registry/x"));
        assert_eq!(p.strip(b"/a/x".to_vec()), "x");
    }

    #[test]
    fn schemas_are_checked() {
        assert_eq!(Keyspace::shared(""), Err(SchemaError::Empty));
        assert!(matches!(
            Keyspace::shared("a/b"),
            Err(SchemaError::InvalidCharacter { .. })
        ));
        assert!(Keyspace::shared("x".repeat(64)).is_err());
        assert_eq!(
            Keyspace::shared("default_t1").unwrap().prefix(),
            "/default_t1/"
        );
        assert_eq!(Keyspace::Dedicated.owned_range(), KeyRange::prefix(""));
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let c = EtcdConfig::new(["http://x"]).with_password("u", "hunter2");
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
