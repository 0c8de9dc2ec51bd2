//! A DataStore's driver: connecting as its administrator (credentials from the DataStore's
//! inline content or from Secrets in the management store), provisioning and removing a
//! tenant's slice, and opening a tenant's slice as a Datastore (for live migration).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use kmetal::core::DataStore;
use kmetal::core::datastore::{ContentRef, Driver as DriverKind};
use kmetal::datastore::Datastore;
use kmetal::datastore::etcd::{
    AuthBootstrap, EtcdConfig, EtcdProvisioner, EtcdStore, EtcdTls, Keyspace,
};
use kmetal::datastore::postgres::{PgConfig, PgProvisioner, PgStore};
use kmetal::datastore::provision::{ProvisionError, Provisioner, TenantSlice};
use kmetal::datastore::sqlite::{SqliteConfig, SqliteProvisioner, SqliteStore};

use crate::store::{Store, StoreError};

/// Why a DataStore cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("dataStore {0:?} does not exist")]
    Missing(String),
    #[error("dataStore {name}: driver {driver} is not supported by kmetal's operator")]
    Unsupported { name: String, driver: String },
    #[error("dataStore {0}: no endpoints")]
    NoEndpoints(String),
    #[error("dataStore {name}: {field}: secret {namespace}/{secret} has no key {key:?}")]
    SecretKey {
        name: String,
        field: &'static str,
        namespace: String,
        secret: String,
        key: String,
    },
    #[error("dataStore {name}: {field}: content is not base64")]
    Content { name: String, field: &'static str },
    #[error("dataStore {name}")]
    Provision {
        name: String,
        #[source]
        source: ProvisionError,
    },
    #[error("dataStore {name}: opening the tenant's slice")]
    Open {
        name: String,
        #[source]
        source: kmetal::datastore::DatastoreError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A connected DataStore.
pub enum Driver {
    Sqlite {
        provisioner: SqliteProvisioner,
    },
    Etcd {
        provisioner: Box<EtcdProvisioner>,
        /// The DataStore's CA (certificate, key): tenants' client certificates are signed with it.
        ca: Option<(String, String)>,
    },
    Postgres {
        provisioner: PgProvisioner,
    },
}

/// What the tenant's control plane needs to reach its slice (stored as the tenant's
/// `<name>-datastore-config` Secret).
pub type SliceConfig = BTreeMap<String, String>;

async fn resolve(
    store: &Store,
    name: &str,
    field: &'static str,
    r: Option<&ContentRef>,
) -> Result<Option<String>, DriverError> {
    let Some(r) = r else { return Ok(None) };
    if let Some(c) = &r.content {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(c.trim())
            .map_err(|_| DriverError::Content {
                name: name.into(),
                field,
            })?;
        return Ok(Some(String::from_utf8_lossy(&bytes).to_string()));
    }
    let Some(s) = &r.secret_reference else {
        return Ok(None);
    };
    let ns = s.namespace.clone().unwrap_or_else(|| "default".into());
    let secret = s.name.clone().unwrap_or_default();
    let key = s.key_path.clone().unwrap_or_default();
    let missing = || DriverError::SecretKey {
        name: name.into(),
        field,
        namespace: ns.clone(),
        secret: secret.clone(),
        key: key.clone(),
    };
    let data = store.secret(&ns, &secret).await?.ok_or_else(missing)?;
    data.get(&key).cloned().map(Some).ok_or_else(missing)
}

impl Driver {
    /// Connects to `ds` as its administrator.
    pub async fn connect(
        ds: &DataStore,
        store: &Store,
        state_dir: &Path,
    ) -> Result<Driver, DriverError> {
        let name = ds.metadata.name.clone().unwrap_or_default();
        let spec = &ds.spec;
        let first = spec
            .endpoints
            .first()
            .cloned()
            .ok_or_else(|| DriverError::NoEndpoints(name.clone()))?;
        let auth = spec.basic_auth.as_ref();
        let user = resolve(
            store,
            &name,
            "spec.basicAuth.username",
            auth.and_then(|a| a.username.as_ref()),
        )
        .await?;
        let password = resolve(
            store,
            &name,
            "spec.basicAuth.password",
            auth.and_then(|a| a.password.as_ref()),
        )
        .await?;
        let tls = spec.tls_config.as_ref();
        let ca = resolve(
            store,
            &name,
            "spec.tlsConfig.certificateAuthority.certificate",
            tls.and_then(|t| t.certificate_authority.as_ref())
                .and_then(|c| c.certificate.as_ref()),
        )
        .await?;
        let provision_err = |source| DriverError::Provision {
            name: name.clone(),
            source,
        };
        match spec.driver.clone().unwrap_or(DriverKind::Etcd) {
            DriverKind::Sqlite => {
                let dir = if Path::new(&first).is_absolute() {
                    PathBuf::from(&first)
                } else {
                    state_dir.join(&first)
                };
                Ok(Driver::Sqlite {
                    provisioner: SqliteProvisioner::new(&dir),
                })
            }
            DriverKind::Etcd => {
                let scheme = if ca.is_some() { "https" } else { "http" };
                let endpoints: Vec<String> = spec
                    .endpoints
                    .iter()
                    .map(|e| {
                        if e.contains("://") {
                            e.clone()
                        } else {
                            format!("{scheme}://{e}")
                        }
                    })
                    .collect();
                let mut cfg = EtcdConfig::new(endpoints);
                let ca_key = resolve(
                    store,
                    &name,
                    "spec.tlsConfig.certificateAuthority.privateKey",
                    tls.and_then(|t| t.certificate_authority.as_ref())
                        .and_then(|c| c.private_key.as_ref()),
                )
                .await?;
                let signing_ca = ca.clone().zip(ca_key);
                if let Some(ca) = ca {
                    let cert = resolve(
                        store,
                        &name,
                        "spec.tlsConfig.clientCertificate.certificate",
                        tls.and_then(|t| t.client_certificate.as_ref())
                            .and_then(|c| c.certificate.as_ref()),
                    )
                    .await?;
                    let key = resolve(
                        store,
                        &name,
                        "spec.tlsConfig.clientCertificate.privateKey",
                        tls.and_then(|t| t.client_certificate.as_ref())
                            .and_then(|c| c.private_key.as_ref()),
                    )
                    .await?;
                    cfg = cfg.with_tls(EtcdTls {
                        ca_pem: ca,
                        identity: cert.zip(key),
                        domain: None,
                    });
                }
                // root with a password: enable auth on a fresh cluster, log in on one that has it.
                let bootstrap = match (user.as_deref(), password) {
                    (Some("root"), Some(p)) => AuthBootstrap::EnableWithRoot { password: p },
                    (Some(u), Some(p)) => {
                        cfg = cfg.with_password(u, p);
                        AuthBootstrap::Existing
                    }
                    _ => AuthBootstrap::Existing,
                };
                let provisioner = EtcdProvisioner::shared(cfg, bootstrap)
                    .await
                    .map_err(provision_err)?;
                Ok(Driver::Etcd {
                    provisioner: Box::new(provisioner),
                    ca: signing_ca,
                })
            }
            DriverKind::PostgreSql => {
                let (host, port) = match first.rsplit_once(':') {
                    Some((h, p)) => (h.to_string(), p.parse().unwrap_or(5432)),
                    None => (first.clone(), 5432),
                };
                let mut conninfo = format!("host={host} port={port} dbname=postgres");
                if let Some(u) = &user {
                    conninfo.push_str(&format!(" user={u}"));
                }
                if let Some(p) = &password {
                    conninfo.push_str(&format!(" password={p}"));
                }
                Ok(Driver::Postgres {
                    provisioner: PgProvisioner::new(conninfo),
                })
            }
            other => Err(DriverError::Unsupported {
                name,
                driver: other.as_str().to_string(),
            }),
        }
    }

    /// The CA that signs tenants' datastore client certificates (etcd with a CA key).
    pub fn signing_ca(&self) -> Option<&(String, String)> {
        match self {
            Driver::Etcd { ca, .. } => ca.as_ref(),
            _ => None,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Driver::Sqlite { .. } => "SQLite",
            Driver::Etcd { .. } => "etcd",
            Driver::Postgres { .. } => "PostgreSQL",
        }
    }

    /// Creates (or brings in line) the slice; returns the tenant's connection settings.
    pub async fn provision(
        &self,
        name: &str,
        slice: &TenantSlice,
    ) -> Result<SliceConfig, DriverError> {
        let err = |source| DriverError::Provision {
            name: name.into(),
            source,
        };
        let mut c = SliceConfig::new();
        c.insert("driver".into(), self.kind().into());
        c.insert("schema".into(), slice.schema.clone());
        c.insert("user".into(), slice.user.clone());
        match self {
            Driver::Sqlite { provisioner } => {
                let creds = provisioner.provision(slice).await.map_err(err)?;
                c.insert("path".into(), creds.path.display().to_string());
            }
            Driver::Etcd { provisioner, .. } => {
                let creds = provisioner.provision(slice).await.map_err(err)?;
                c.insert("endpoints".into(), creds.endpoints.join(","));
                c.insert("prefix".into(), format!("/{}/", slice.schema));
                if let Some(p) = creds.password {
                    c.insert("password".into(), p);
                }
                if let Some(ca) = creds.ca_pem {
                    c.insert("ca.crt".into(), ca);
                }
            }
            Driver::Postgres { provisioner } => {
                let creds = provisioner.provision(slice).await.map_err(err)?;
                c.insert("host".into(), creds.host.clone());
                c.insert("port".into(), creds.port.to_string());
                c.insert("database".into(), creds.database.clone());
                c.insert("password".into(), creds.password.clone());
                c.insert("conninfo".into(), creds.conninfo());
            }
        }
        Ok(c)
    }

    /// Removes the slice (data, user, role); succeeds when already gone.
    pub async fn deprovision(&self, name: &str, slice: &TenantSlice) -> Result<(), DriverError> {
        let r = match self {
            Driver::Sqlite { provisioner } => provisioner.deprovision(slice).await,
            Driver::Etcd { provisioner, .. } => provisioner.deprovision(slice).await,
            Driver::Postgres { provisioner } => provisioner.deprovision(slice).await,
        };
        r.map_err(|source| DriverError::Provision {
            name: name.into(),
            source,
        })
    }
}

/// The tenant's datastore client certificate and key (etcd DataStores with a CA), if its PKI
/// has them.
pub fn datastore_identity(bundle: &kmetal::pki::Bundle) -> Option<(String, String)> {
    bundle
        .get("pki/datastore-client.crt")
        .zip(bundle.get("pki/datastore-client.key"))
        .map(|(c, k)| (c.to_string(), k.to_string()))
}

/// Opens a tenant's slice from its connection settings, as the tenant's api-server would;
/// `identity` is the tenant's datastore client certificate and key, when it has one.
pub async fn open_slice(
    name: &str,
    c: &SliceConfig,
    identity: Option<(String, String)>,
) -> Result<Arc<dyn Datastore>, DriverError> {
    let get = |k: &str| c.get(k).cloned().unwrap_or_default();
    let open_err = |source| DriverError::Open {
        name: name.into(),
        source,
    };
    Ok(match get("driver").as_str() {
        "SQLite" => Arc::new({
            // One tenant's api-server: two readers serve it; thousands of tenants share a host.
            let mut cfg = SqliteConfig::new(get("path"));
            cfg.readers = 2;
            SqliteStore::open(cfg).await.map_err(open_err)?
        }),
        "PostgreSQL" => Arc::new(
            PgStore::connect(PgConfig::new(get("conninfo")))
                .await
                .map_err(open_err)?,
        ),
        _ => {
            let endpoints: Vec<String> = get("endpoints").split(',').map(str::to_string).collect();
            let mut cfg = EtcdConfig::new(endpoints);
            if let Some(ca) = c.get("ca.crt") {
                cfg = cfg.with_tls(EtcdTls {
                    ca_pem: ca.clone(),
                    identity,
                    domain: None,
                });
            }
            if let Some(p) = c.get("password") {
                cfg = cfg.with_password(get("user"), p.clone());
            }
            Arc::new(
                EtcdStore::connect(
                    cfg,
                    Keyspace::Shared {
                        schema: get("schema"),
                    },
                )
                .await
                .map_err(open_err)?,
            )
        }
    })
}
