//! [`EtcdProvisioner`]: a user and a role per tenant, READWRITE on exactly the tenant's range
//! (and, on a shared cluster, READ on its lease tag: `leases.rs`).

use async_trait::async_trait;
use etcd_client::{Client, Permission, UserAddOptions};

use super::config::{EtcdConfig, EtcdTls, Keyspace};
use super::{RequestTimeout, connect_client, errors};
use crate::error::DatastoreError;
use crate::model::KeyRange;
use crate::provision::{ProvisionError, Provisioner, SliceAuth, TenantSlice};

/// How many times an admin call is sent again after a stale-auth refusal: each one means
/// another auth change landed meanwhile, so this covers provisioners racing.
const STALE_AUTH_ATTEMPTS: u32 = 16;
/// The refusal in a row from which the token is renewed before sending again.
const STALE_AUTH_RENEW: u32 = 4;
/// The pause before the first resend after a stale-auth refusal; the n-th waits n times this.
const STALE_AUTH_PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

/// Whether the provisioner turns on etcd's auth.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthBootstrap {
    /// Auth is managed elsewhere; connect with the configured admin credentials as they are.
    Existing,
    /// On a cluster without auth, create `root` (with this password, granted the root role)
    /// and enable auth; on a cluster that has it, log in as `root` with this password (or by
    /// the client certificate, whose CN must then be `root`).
    EnableWithRoot {
        /// root's password.
        password: String,
    },
}

impl std::fmt::Debug for AuthBootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Existing => f.write_str("Existing"),
            Self::EnableWithRoot { .. } => f.write_str("EnableWithRoot { password: <redacted> }"),
        }
    }
}

/// What the tenant's api-server needs to reach its slice.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdCredentials {
    /// Client URLs.
    pub endpoints: Vec<String>,
    /// CA of the servers, when they serve TLS.
    pub ca_pem: Option<String>,
    /// The keyspace to open.
    pub keyspace: Keyspace,
    /// The etcd user.
    pub user: String,
    /// Its password (`None` for client-certificate users).
    pub password: Option<String>,
}

impl std::fmt::Debug for EtcdCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCredentials")
            .field("endpoints", &self.endpoints)
            .field("keyspace", &self.keyspace)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl EtcdCredentials {
    /// Connection settings for the tenant; `identity` is its client certificate and key (PEM),
    /// required for certificate users and optional otherwise.
    pub fn config(&self, identity: Option<(String, String)>) -> EtcdConfig {
        let mut c = EtcdConfig::new(self.endpoints.clone());
        if let Some(ca) = &self.ca_pem {
            c = c.with_tls(EtcdTls {
                ca_pem: ca.clone(),
                identity,
                domain: None,
            });
        }
        if let Some(p) = &self.password {
            c = c.with_password(self.user.clone(), p.clone());
        }
        c
    }
}

/// Creates tenant slices on an etcd cluster, shared (one prefix per tenant) or dedicated (the
/// tenant's user may use every key).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use kmetal_datastore::etcd::{AuthBootstrap, EtcdConfig, EtcdProvisioner};
/// use kmetal_datastore::provision::{Provisioner, TenantSlice};
/// let admin = EtcdConfig::new(["http://127.0.0.1:2379"]).with_password("root", "rootpw");
/// let bootstrap = AuthBootstrap::EnableWithRoot { password: "rootpw".into() };
/// let p = EtcdProvisioner::shared(admin, bootstrap).await?;
/// let creds = p.provision(&TenantSlice::with_password("default_t1", "default_t1", "pw")).await?;
/// assert_eq!(creds.user, "default_t1");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct EtcdProvisioner {
    admin: Client,
    config: EtcdConfig,
    dedicated: bool,
}

impl std::fmt::Debug for EtcdProvisioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdProvisioner")
            .field("endpoints", &self.config.endpoints)
            .field("dedicated", &self.dedicated)
            .finish_non_exhaustive()
    }
}

/// The step names reported in [`ProvisionError::Step`].
mod step {
    pub const CONNECT: &str = "connect as admin";
    pub const ENABLE_AUTH: &str = "enable auth";
    pub const ADD_ROLE: &str = "create role";
    pub const GRANT: &str = "grant permission";
    pub const ADD_USER: &str = "create user";
    pub const PASSWORD: &str = "set password";
    pub const BIND: &str = "grant role to user";
    pub const DELETE_KEYS: &str = "delete keys";
    pub const DELETE_USER: &str = "delete user";
    pub const DELETE_ROLE: &str = "delete role";
    pub const READ_COMPACTIONS: &str = "read the tenants' compactions";
    pub const COMPACT: &str = "compact the cluster";
    pub const LEASE_TAG: &str = "allocate the tenant's lease tag";
}

impl EtcdProvisioner {
    /// A provisioner for a shared cluster: each tenant gets `/<schema>/`.
    pub async fn shared(
        admin: EtcdConfig,
        bootstrap: AuthBootstrap,
    ) -> Result<Self, ProvisionError> {
        Self::connect(admin, bootstrap, false).await
    }

    /// A provisioner for dedicated clusters: the tenant's user may use every key.
    pub async fn dedicated(
        admin: EtcdConfig,
        bootstrap: AuthBootstrap,
    ) -> Result<Self, ProvisionError> {
        Self::connect(admin, bootstrap, true).await
    }

    async fn connect(
        mut config: EtcdConfig,
        bootstrap: AuthBootstrap,
        dedicated: bool,
    ) -> Result<Self, ProvisionError> {
        let fail = |source| ProvisionError::Step {
            step: step::CONNECT,
            source,
        };
        let admin = match bootstrap {
            AuthBootstrap::Existing => connect_client(&config, true).await.map_err(fail)?,
            AuthBootstrap::EnableWithRoot { password } => {
                let certificate_root = config.tls.as_ref().is_some_and(|t| t.identity.is_some());
                if !certificate_root {
                    config = config.with_password("root", password.clone());
                }
                match connect_client(&config, true).await {
                    Ok(c) if certificate_root => {
                        enable_auth(&mut c.clone(), &password).await?;
                        c
                    }
                    Ok(c) => c,
                    // Authenticating fails while auth is off: bootstrap it, then log in.
                    Err(DatastoreError::PermissionDenied { .. })
                    | Err(DatastoreError::Backend { .. }) => {
                        let mut open = connect_client(&config, false).await.map_err(fail)?;
                        enable_auth(&mut open, &password).await?;
                        connect_client(&config, true).await.map_err(fail)?
                    }
                    Err(e) => return Err(fail(e)),
                }
            }
        };
        Ok(Self {
            admin,
            config,
            dedicated,
        })
    }

    /// Compacts the shared cluster up to the lowest compaction of the tenants with `schemas`
    /// (each tenant compacts only its own view, `tenant.rs`): history none of them can read
    /// any more goes, history any of them still reads stays. The revision compacted to, or
    /// `None` when one of them has never compacted or the cluster is compacted that far.
    pub async fn compact_shared(
        &self,
        schemas: &[&str],
    ) -> Result<Option<crate::model::Revision>, ProvisionError> {
        let prefixes = schemas
            .iter()
            .map(|s| Ok(Keyspace::shared(*s)?.prefix()))
            .collect::<Result<Vec<_>, crate::provision::SchemaError>>()
            .map_err(ProvisionError::InvalidSchema)?;
        let step = |step, source| ProvisionError::Step { step, source };
        let read = |c: Client| {
            let prefixes = prefixes.clone();
            async move { super::tenant::compactions(&c, &prefixes).await }
        };
        let lowest = match self.deadline(step::READ_COMPACTIONS, read).await? {
            Ok(all) => all.into_iter().min().unwrap_or(0),
            Err(e) => return Err(step(step::READ_COMPACTIONS, admin_error(e))),
        };
        if lowest == 0 {
            return Ok(None);
        }
        let compact = |mut c: Client| async move { c.compact(lowest, None).await };
        match self.deadline(step::COMPACT, compact).await? {
            Ok(_) => Ok(Some(lowest)),
            Err(e) if errors::classify(&e) == errors::Kind::Compacted => Ok(None),
            Err(e) => Err(step(step::COMPACT, admin_error(e))),
        }
    }

    fn keyspace(&self, slice: &TenantSlice) -> Result<Keyspace, ProvisionError> {
        if self.dedicated {
            Ok(Keyspace::Dedicated)
        } else {
            Keyspace::shared(slice.schema.clone()).map_err(ProvisionError::InvalidSchema)
        }
    }

    /// Runs an admin call under the request deadline: its answer, or the step failed
    /// unavailable. A call refused for a stale auth revision (another provisioner changed a
    /// role or user between etcd stamping the request and applying it, so nothing was
    /// applied) is sent again, with a renewed token once refusals go on, as etcd's own client
    /// does.
    async fn deadline<T, F, Fut>(
        &self,
        step: &'static str,
        mut call: F,
    ) -> Result<Result<T, etcd_client::Error>, ProvisionError>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let retried = async {
            let mut stale = 0;
            loop {
                match call(self.admin.clone()).await {
                    Err(e)
                        if errors::classify(&e) == errors::Kind::StaleAuth
                            && stale < STALE_AUTH_ATTEMPTS =>
                    {
                        stale += 1;
                        // A simple token is stamped with the auth revision when etcd receives
                        // the request, so sending it again is enough, after a pause that grows
                        // with each refusal to get out of a burst of auth changes. A JWT carries
                        // the revision it was issued at, so refusals that go on renew it; not
                        // sooner, as a login is itself retried by etcd until no auth change
                        // lands during its password check. A failed renewal shows up as the
                        // next attempt's error.
                        tokio::time::sleep(STALE_AUTH_PAUSE * stale).await;
                        if stale >= STALE_AUTH_RENEW {
                            let _ = self.admin.clone().refresh_token().await;
                        }
                    }
                    r => return r,
                }
            }
        };
        tokio::time::timeout(self.config.request_timeout, retried)
            .await
            .map_err(|_| ProvisionError::Step {
                step,
                source: DatastoreError::unavailable(RequestTimeout {
                    op: step,
                    after: self.config.request_timeout,
                }),
            })
    }

    /// Runs an admin call under the request deadline; `tolerated` names the server message
    /// that means "already done".
    async fn admin<T, F, Fut>(
        &self,
        step: &'static str,
        tolerated: Option<&str>,
        call: F,
    ) -> Result<(), ProvisionError>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        match self.deadline(step, call).await? {
            Ok(_) => Ok(()),
            Err(etcd_client::Error::GRpcStatus(s))
                if tolerated.is_some_and(|t| s.message().contains(t)) =>
            {
                Ok(())
            }
            Err(e) => Err(ProvisionError::Step {
                step,
                source: admin_error(e),
            }),
        }
    }
}

fn admin_error(e: etcd_client::Error) -> DatastoreError {
    match errors::simple(errors::classify(&e), e) {
        Ok(d) => d,
        Err(e) => DatastoreError::Backend {
            source: Box::new(e),
        },
    }
}

async fn enable_auth(c: &mut Client, password: &str) -> Result<(), ProvisionError> {
    let step = |step, e: etcd_client::Error| ProvisionError::Step {
        step,
        source: admin_error(e),
    };
    let tolerate = |r: Result<(), etcd_client::Error>, msg: &str| match r {
        Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains(msg) => Ok(()),
        other => other,
    };
    tolerate(
        c.user_add("root", password, None).await.map(drop),
        "user name already exists",
    )
    .map_err(|e| step(step::ADD_USER, e))?;
    tolerate(
        c.user_grant_role("root", "root").await.map(drop),
        "role is already granted",
    )
    .map_err(|e| step(step::BIND, e))?;
    c.auth_enable()
        .await
        .map_err(|e| step(step::ENABLE_AUTH, e))?;
    Ok(())
}

#[async_trait]
impl Provisioner for EtcdProvisioner {
    type Credentials = EtcdCredentials;

    async fn provision(&self, slice: &TenantSlice) -> Result<EtcdCredentials, ProvisionError> {
        slice.check()?;
        let keyspace = self.keyspace(slice)?;
        let range = keyspace.owned_range();
        let role = slice.user.as_str();
        let user = slice.user.as_str();
        self.admin(
            step::ADD_ROLE,
            Some("role name already exists"),
            |mut c| async move { c.role_add(role).await },
        )
        .await?;
        let perm =
            Permission::read_write(range.key.to_vec()).with_range_end(range.range_end.to_vec());
        self.admin(step::GRANT, None, |mut c| {
            let perm = perm.clone();
            async move { c.role_grant_permission(role, perm).await }
        })
        .await?;
        if !self.dedicated {
            // The tenant's own lease ids (`leases.rs`): its tag, readable by it alone.
            let prefix = keyspace.prefix();
            let prefix = &prefix[..];
            let tag = self
                .deadline(step::LEASE_TAG, |c| async move {
                    super::leases::allocate(&c, prefix).await
                })
                .await?;
            if let Err(e) = tag {
                return Err(ProvisionError::Step {
                    step: step::LEASE_TAG,
                    source: admin_error(e),
                });
            }
            let read = Permission::read(super::leases::tag_key(prefix));
            self.admin(step::GRANT, None, |mut c| {
                let read = read.clone();
                async move { c.role_grant_permission(role, read).await }
            })
            .await?;
        }
        let (password, options) = match &slice.auth {
            SliceAuth::Password(p) => (Some(p.clone()), None),
            // A certificate user has no password anyone could guess.
            SliceAuth::ClientCertificate => (None, Some(UserAddOptions::new().with_no_pwd())),
        };
        let initial = password.clone().unwrap_or_default();
        self.admin(step::ADD_USER, Some("user name already exists"), |mut c| {
            let (initial, options) = (initial.clone(), options.clone());
            async move { c.user_add(user, initial, options).await }
        })
        .await?;
        if let Some(p) = password.as_deref() {
            // Re-provisioning sets the password of this call, so the credentials returned
            // always work.
            self.admin(step::PASSWORD, None, |mut c| async move {
                c.user_change_password(user, p).await
            })
            .await?;
        }
        self.admin(
            step::BIND,
            Some("role is already granted"),
            |mut c| async move { c.user_grant_role(user, role).await },
        )
        .await?;
        Ok(EtcdCredentials {
            endpoints: self.config.endpoints.clone(),
            ca_pem: self.config.tls.as_ref().map(|t| t.ca_pem.clone()),
            keyspace,
            user: slice.user.clone(),
            password,
        })
    }

    async fn deprovision(&self, slice: &TenantSlice) -> Result<(), ProvisionError> {
        slice.check()?;
        let range: KeyRange = self.keyspace(slice)?.owned_range();
        let user = slice.user.as_str();
        self.admin(step::DELETE_KEYS, None, |mut c| {
            let opts = etcd_client::DeleteOptions::new().with_range(range.range_end.to_vec());
            let key = range.key.to_vec();
            async move { c.delete(key, Some(opts)).await }
        })
        .await?;
        if !self.dedicated {
            // The tag is never handed out again (the counter only grows).
            let key = super::leases::tag_key(&self.keyspace(slice)?.prefix());
            self.admin(step::DELETE_KEYS, None, |mut c| {
                let key = key.clone();
                async move { c.delete(key, None).await }
            })
            .await?;
        }
        self.admin(
            step::DELETE_USER,
            Some("user name not found"),
            |mut c| async move { c.user_delete(user).await },
        )
        .await?;
        self.admin(
            step::DELETE_ROLE,
            Some("role name not found"),
            |mut c| async move { c.role_delete(user).await },
        )
        .await?;
        Ok(())
    }
}
