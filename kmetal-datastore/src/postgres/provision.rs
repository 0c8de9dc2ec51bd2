//! [`PgProvisioner`]: a database and a login role per tenant; the role owns its database and
//! nobody else may connect to it.

use async_trait::async_trait;
use tokio_postgres::NoTls;

use super::pg_error;
use crate::provision::{ProvisionError, Provisioner, SliceAuth, TenantSlice};

/// What the tenant's api-server (through the gateway) needs to reach its database.
#[derive(Clone, PartialEq, Eq)]
pub struct PgCredentials {
    /// Server host.
    pub host: String,
    /// Server port.
    pub port: u16,
    /// The tenant's database.
    pub database: String,
    /// The tenant's role.
    pub user: String,
    /// Its password.
    pub password: String,
}

impl std::fmt::Debug for PgCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCredentials")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl PgCredentials {
    /// A libpq connection string for [`PgConfig::new`](super::PgConfig::new).
    pub fn conninfo(&self) -> String {
        format!(
            "host={} port={} user={} password='{}' dbname={}",
            self.host,
            self.port,
            self.user,
            self.password.replace('\\', "\\\\").replace('\'', "\\'"),
            self.database
        )
    }
}

/// Creates tenant databases on a PostgreSQL server, connected as an administrator.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use kmetal_datastore::postgres::PgProvisioner;
/// use kmetal_datastore::provision::{Provisioner, TenantSlice, generate_password};
/// let p = PgProvisioner::new("host=127.0.0.1 user=postgres password=admin dbname=postgres");
/// let creds = p.provision(&TenantSlice::with_password("default_t1", "default_t1", generate_password())).await?;
/// println!("{}", creds.database);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PgProvisioner {
    admin: String,
}

mod step {
    pub const CONNECT: &str = "connect as admin";
    pub const ROLE: &str = "create or update role";
    pub const DATABASE: &str = "create database";
    pub const GRANTS: &str = "restrict connect";
    pub const DROP_DATABASE: &str = "drop database";
    pub const DROP_ROLE: &str = "drop role";
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl PgProvisioner {
    /// A provisioner using the admin connection string `admin` (a superuser or a role with
    /// CREATEDB and CREATEROLE).
    pub fn new(admin: impl Into<String>) -> Self {
        Self {
            admin: admin.into(),
        }
    }

    async fn admin(&self) -> Result<tokio_postgres::Client, ProvisionError> {
        let (client, conn) = tokio_postgres::connect(&self.admin, NoTls)
            .await
            .map_err(|e| ProvisionError::Step {
                step: step::CONNECT,
                source: pg_error(e),
            })?;
        tokio::spawn(conn);
        Ok(client)
    }

    fn host_port(&self) -> (String, u16) {
        let cfg: Result<tokio_postgres::Config, _> = self.admin.parse();
        let Ok(cfg) = cfg else {
            return ("localhost".into(), 5432);
        };
        let host = match cfg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        (host, cfg.get_ports().first().copied().unwrap_or(5432))
    }
}

async fn run(
    c: &tokio_postgres::Client,
    step: &'static str,
    sql: &str,
) -> Result<(), ProvisionError> {
    c.batch_execute(sql)
        .await
        .map_err(|e| ProvisionError::Step {
            step,
            source: pg_error(e),
        })
}

#[async_trait]
impl Provisioner for PgProvisioner {
    type Credentials = PgCredentials;

    async fn provision(&self, slice: &TenantSlice) -> Result<PgCredentials, ProvisionError> {
        slice.check()?;
        let SliceAuth::Password(password) = &slice.auth else {
            return Err(ProvisionError::UnsupportedAuth {
                driver: "postgres",
                auth: "client certificate",
            });
        };
        let c = self.admin().await?;
        let (db, user) = (&slice.schema, &slice.user);
        let exists = |sql: &'static str, name: &str| {
            let name = name.to_string();
            let c = &c;
            async move {
                c.query_opt(sql, &[&name])
                    .await
                    .map(|r| r.is_some())
                    .map_err(|e| ProvisionError::Step {
                        step: step::ROLE,
                        source: pg_error(e),
                    })
            }
        };
        // The password of this call wins, so re-provisioning hands out working credentials.
        let verb = if exists("SELECT 1 FROM pg_roles WHERE rolname = $1", user).await? {
            "ALTER"
        } else {
            "CREATE"
        };
        run(
            &c,
            step::ROLE,
            &format!(
                "{verb} ROLE \"{user}\" LOGIN PASSWORD {}",
                quote_literal(password)
            ),
        )
        .await?;
        if !exists("SELECT 1 FROM pg_database WHERE datname = $1", db).await? {
            run(
                &c,
                step::DATABASE,
                &format!("CREATE DATABASE \"{db}\" OWNER \"{user}\""),
            )
            .await?;
        }
        run(
            &c,
            step::GRANTS,
            &format!(
                "ALTER DATABASE \"{db}\" OWNER TO \"{user}\";
                 REVOKE ALL ON DATABASE \"{db}\" FROM PUBLIC;
                 GRANT CONNECT, TEMPORARY ON DATABASE \"{db}\" TO \"{user}\";"
            ),
        )
        .await?;
        let (host, port) = self.host_port();
        Ok(PgCredentials {
            host,
            port,
            database: db.clone(),
            user: user.clone(),
            password: password.clone(),
        })
    }

    async fn deprovision(&self, slice: &TenantSlice) -> Result<(), ProvisionError> {
        slice.check()?;
        let c = self.admin().await?;
        run(
            &c,
            step::DROP_DATABASE,
            &format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", slice.schema),
        )
        .await?;
        run(
            &c,
            step::DROP_ROLE,
            &format!("DROP ROLE IF EXISTS \"{}\"", slice.user),
        )
        .await?;
        Ok(())
    }
}
