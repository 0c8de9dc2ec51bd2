//! Datastore URLs (`memory`, `sqlite://PATH`, `postgres://…`, `etcd://HOST:PORT[,…]`) and
//! opening the driver one names: how command-line tools and the operator's `--state` pick a
//! driver.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use crate::{Datastore, DatastoreError};

/// A parsed datastore URL.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DatastoreUrl {
    /// `memory`: the in-process reference store (nothing persisted).
    Memory,
    /// `sqlite://PATH`: one SQLite file (relative paths from the working directory).
    Sqlite(PathBuf),
    /// `postgres://…` or `postgresql://…`: a libpq URL.
    Postgres(String),
    /// `etcd://HOST:PORT[,HOST:PORT…]`: a dedicated etcd cluster (plain HTTP).
    Etcd(Vec<String>),
}

/// Settings [`DatastoreUrl::open_with`] applies to whichever driver the URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OpenOptions {
    /// How long a watch that asked for progress notifications may stay idle before it gets
    /// one (etcd's `--watch-progress-notify-interval`; a dedicated etcd keeps its own).
    pub progress_interval: std::time::Duration,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            progress_interval: crate::model::DEFAULT_PROGRESS_INTERVAL,
        }
    }
}

impl OpenOptions {
    /// The same with another watch progress notification interval.
    pub fn with_progress_interval(mut self, interval: std::time::Duration) -> Self {
        self.progress_interval = interval;
        self
    }
}

/// A URL that names no driver.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum UrlError {
    /// An unknown scheme.
    #[error(
        "{0:?}: expected memory, sqlite://PATH, postgres://URL or etcd://HOST:PORT[,HOST:PORT]"
    )]
    Scheme(String),
    /// A scheme without its path or hosts.
    #[error("{0:?}: missing the path or hosts after the scheme")]
    Empty(String),
}

impl FromStr for DatastoreUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<Self, UrlError> {
        let empty = || UrlError::Empty(s.to_string());
        if s == "memory" {
            return Ok(Self::Memory);
        }
        if let Some(path) = s.strip_prefix("sqlite://") {
            return if path.is_empty() {
                Err(empty())
            } else {
                Ok(Self::Sqlite(PathBuf::from(path)))
            };
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(Self::Postgres(s.to_string()));
        }
        if let Some(hosts) = s.strip_prefix("etcd://") {
            let hosts: Vec<String> = hosts
                .split(',')
                .filter(|h| !h.is_empty())
                .map(str::to_string)
                .collect();
            return if hosts.is_empty() {
                Err(empty())
            } else {
                Ok(Self::Etcd(hosts))
            };
        }
        Err(UrlError::Scheme(s.to_string()))
    }
}

impl std::fmt::Display for DatastoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Memory => f.write_str("memory"),
            Self::Sqlite(p) => write!(f, "sqlite://{}", p.display()),
            // The URL may carry a password.
            Self::Postgres(_) => f.write_str("postgres://…"),
            Self::Etcd(h) => write!(f, "etcd://{}", h.join(",")),
        }
    }
}

impl DatastoreUrl {
    /// Opens the store this URL names (for `sqlite://`, creating the file and its folder).
    pub async fn open(&self) -> Result<Arc<dyn Datastore>, DatastoreError> {
        self.open_with(&OpenOptions::default()).await
    }

    /// [`open`](Self::open) with settings that every driver takes.
    pub async fn open_with(
        &self,
        options: &OpenOptions,
    ) -> Result<Arc<dyn Datastore>, DatastoreError> {
        Ok(match self {
            Self::Memory => Arc::new(
                crate::MemoryStore::new().with_progress_interval(options.progress_interval),
            ),
            #[cfg(feature = "sqlite")]
            Self::Sqlite(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(DatastoreError::unavailable)?;
                }
                let cfg = crate::sqlite::SqliteConfig::new(path)
                    .with_progress_interval(options.progress_interval);
                Arc::new(crate::sqlite::SqliteStore::open(cfg).await?)
            }
            #[cfg(feature = "postgres")]
            Self::Postgres(url) => {
                let cfg = crate::postgres::PgConfig::new(url.clone())
                    .with_progress_interval(options.progress_interval);
                Arc::new(crate::postgres::PgStore::connect(cfg).await?)
            }
            #[cfg(feature = "etcd")]
            Self::Etcd(hosts) => {
                let endpoints: Vec<String> = hosts.iter().map(|h| format!("http://{h}")).collect();
                Arc::new(
                    crate::etcd::EtcdStore::connect(
                        crate::etcd::EtcdConfig::new(endpoints),
                        crate::etcd::Keyspace::Dedicated,
                    )
                    .await?,
                )
            }
            #[allow(unreachable_patterns)]
            other => {
                return Err(DatastoreError::unavailable(UrlError::Scheme(format!(
                    "{other} (driver not compiled in)"
                ))));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_scheme_and_rejects_the_rest() {
        assert_eq!("memory".parse(), Ok(DatastoreUrl::Memory));
        assert_eq!(
            "sqlite://state/m.db".parse(),
            Ok(DatastoreUrl::Sqlite("state/m.db".into()))
        );
        assert_eq!(
            "etcd://a:2379,b:2379".parse(),
            Ok(DatastoreUrl::Etcd(vec!["a:2379".into(), "b:2379".into()]))
        );
        assert!(matches!(
            "postgres://u:p@h/db".parse::<DatastoreUrl>(),
            Ok(DatastoreUrl::Postgres(_))
        ));
        assert_eq!(
            "postgres://u:p@h/db"
                .parse::<DatastoreUrl>()
                .map(|u| u.to_string()),
            Ok("postgres://…".to_string()),
            "passwords never reach logs"
        );
        assert!(matches!(
            "mysql://x".parse::<DatastoreUrl>(),
            Err(UrlError::Scheme(_))
        ));
        assert!(matches!(
            "sqlite://".parse::<DatastoreUrl>(),
            Err(UrlError::Empty(_))
        ));
        assert!(matches!(
            "etcd://".parse::<DatastoreUrl>(),
            Err(UrlError::Empty(_))
        ));
    }

    #[tokio::test]
    async fn opens_memory_and_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = DatastoreUrl::Sqlite(dir.path().join("nested/state.db"));
        url.open().await.expect("sqlite");
        DatastoreUrl::Memory.open().await.expect("memory");
    }
}
