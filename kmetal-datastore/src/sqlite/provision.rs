//! Slices of the embedded default: one SQLite file per tenant.

use std::path::PathBuf;

use super::{SqliteConfig, SqliteStore};

/// Where a tenant's SQLite slice lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteCredentials {
    /// The slice's database file.
    pub path: PathBuf,
}

/// Slices of the embedded default: one SQLite file per tenant (`<dir>/<schema>.db`), so a
/// tenant's data is isolated by the file system and removed with its file. SQLite has no
/// users: the slice's user is recorded but authenticates with nothing.
#[derive(Debug, Clone)]
pub struct SqliteProvisioner {
    dir: PathBuf,
}

impl SqliteProvisioner {
    /// Slices in `dir` (created when missing).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The file of slice `schema`.
    pub fn path(&self, schema: &str) -> PathBuf {
        self.dir.join(format!("{schema}.db"))
    }
}

#[async_trait::async_trait]
impl crate::provision::Provisioner for SqliteProvisioner {
    type Credentials = SqliteCredentials;

    async fn provision(
        &self,
        slice: &crate::provision::TenantSlice,
    ) -> std::result::Result<SqliteCredentials, crate::provision::ProvisionError> {
        use crate::provision::ProvisionError;
        slice.check()?;
        std::fs::create_dir_all(&self.dir).map_err(|source| ProvisionError::File {
            step: "create directory",
            path: self.dir.clone(),
            source,
        })?;
        let path = self.path(&slice.schema);
        let mut cfg = SqliteConfig::new(&path);
        cfg.readers = 1;
        // Opening creates the file and its schema; the store closes when dropped.
        SqliteStore::open(cfg)
            .await
            .map_err(|source| ProvisionError::Step {
                step: "create database file",
                source,
            })?;
        Ok(SqliteCredentials { path })
    }

    async fn deprovision(
        &self,
        slice: &crate::provision::TenantSlice,
    ) -> std::result::Result<(), crate::provision::ProvisionError> {
        slice.check()?;
        let path = self.path(&slice.schema);
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let mut file = path.clone().into_os_string();
            file.push(suffix);
            let file = PathBuf::from(file);
            match std::fs::remove_file(&file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(crate::provision::ProvisionError::File {
                        step: "remove database file",
                        path: file,
                        source,
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod provision_tests {
    use super::*;
    use crate::Datastore;
    use crate::model::{PutRequest, RangeRequest};
    use crate::provision::{Provisioner, TenantSlice};

    #[tokio::test]
    async fn a_slice_is_one_file_created_idempotently_and_removed_with_its_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = SqliteProvisioner::new(dir.path().join("slices"));
        let slice = TenantSlice::with_password("tenant_a", "tenant_a", "unused");
        let creds = p.provision(&slice).await.expect("provision");
        assert_eq!(p.provision(&slice).await.expect("again"), creds);
        {
            let s = SqliteStore::open(SqliteConfig::new(&creds.path))
                .await
                .expect("open");
            s.put(PutRequest::new("/k", "v")).await.expect("put");
        }
        let other = TenantSlice::with_password("tenant_b", "tenant_b", "unused");
        let b = p.provision(&other).await.expect("b");
        assert_ne!(b.path, creds.path);
        p.deprovision(&slice).await.expect("deprovision");
        p.deprovision(&slice).await.expect("idempotent");
        assert!(!creds.path.exists());
        let s = SqliteStore::open(SqliteConfig::new(&creds.path))
            .await
            .expect("reopen");
        assert!(
            s.range(RangeRequest::get("/k"))
                .await
                .expect("get")
                .kvs
                .is_empty()
        );
        assert!(matches!(
            p.provision(&TenantSlice::with_password("../x", "u", "p"))
                .await,
            Err(crate::provision::ProvisionError::InvalidSchema(_))
        ));
    }
}
