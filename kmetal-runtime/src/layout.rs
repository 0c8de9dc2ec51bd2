//! A tenant's folder under the runtime's state dir: the PKI bundle in kubeadm's layout
//! (`pki/…`, `*.conf`), the egress selector file, and per component and replica a log, a
//! pid file and a scratch `--cert-dir`.

use std::path::{Path, PathBuf};

use kmetal_pki::Bundle;

use crate::Component;
use crate::flags::Egress;

/// Why a tenant's files could not be written or are incomplete.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// The bundle has no file a component needs.
    #[error("the tenant bundle has no {0}")]
    MissingFile(&'static str),
    /// Writing the bundle failed.
    #[error("cannot write the tenant bundle")]
    Pki(#[source] Box<kmetal_pki::PkiError>),
    /// Creating a folder or writing a file failed.
    #[error("i/o at {}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The tenant's CAs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ca {
    /// The cluster CA (`pki/ca`).
    Cluster,
    /// The front-proxy CA (`pki/front-proxy-ca`).
    FrontProxy,
    /// The etcd CA (`pki/etcd/ca`).
    Etcd,
}

impl Ca {
    fn files(self) -> (&'static str, &'static str) {
        match self {
            Self::Cluster => ("pki/ca-bundle.crt", "pki/ca.crt"),
            Self::FrontProxy => ("pki/front-proxy-ca-bundle.crt", "pki/front-proxy-ca.crt"),
            Self::Etcd => ("pki/etcd/ca-bundle.crt", "pki/etcd/ca.crt"),
        }
    }
}

/// One replica of one component: `kube-apiserver-0`, `kube-scheduler-0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReplicaId {
    /// The component.
    pub component: Component,
    /// Its index.
    pub index: usize,
}

impl std::fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.component, self.index)
    }
}

/// A tenant's files on disk.
#[derive(Debug, Clone)]
pub struct TenantLayout {
    dir: PathBuf,
    bundle: Bundle,
}

impl TenantLayout {
    /// Writes `bundle` into `dir` (created if needed), replacing what was there.
    pub fn write(dir: impl Into<PathBuf>, bundle: Bundle) -> Result<Self, LayoutError> {
        let dir = dir.into();
        for sub in ["logs", "run"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(|source| LayoutError::Io { path, source })?;
        }
        bundle
            .write_dir(&dir)
            .map_err(|e| LayoutError::Pki(Box::new(e)))?;
        Ok(Self { dir, bundle })
    }

    /// The tenant's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The bundle the files hold.
    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    /// The path of a bundle file (`pki/ca.crt`, `admin.conf`), if the bundle has it.
    pub fn file(&self, rel: &'static str) -> Result<PathBuf, LayoutError> {
        self.bundle
            .get(rel)
            .map(|_| self.dir.join(rel))
            .ok_or(LayoutError::MissingFile(rel))
    }

    /// What to trust for a CA: its `-bundle.crt` (old and new CA while a rotation overlaps)
    /// when the bundle has one, else the CA itself. `ca` is the CA's path without `.crt`.
    pub fn trust(&self, ca: Ca) -> Result<PathBuf, LayoutError> {
        let (bundle, cert) = ca.files();
        self.file(bundle).or_else(|_| self.file(cert))
    }

    /// A digest of every bundle file: what the processes read at start, so a change
    /// (renewal, CA rotation) means they must restart.
    pub fn digest(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let mut files: Vec<(&str, &str)> = self.bundle.files().collect();
        files.sort_unstable();
        files.hash(&mut h);
        h.finish()
    }

    /// The text of a bundle file.
    pub fn pem(&self, rel: &'static str) -> Result<&str, LayoutError> {
        self.bundle.get(rel).ok_or(LayoutError::MissingFile(rel))
    }

    /// Writes the egress selector configuration and returns its path.
    pub fn write_egress(&self, egress: &Egress) -> Result<PathBuf, LayoutError> {
        let path = self.dir.join("egress-selector.yaml");
        std::fs::write(&path, egress.config()).map_err(|source| LayoutError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// `logs/<process>.log`: a replica's (or etcd member's) stdout and stderr, across
    /// restarts.
    pub fn log(&self, process: impl std::fmt::Display) -> PathBuf {
        self.dir.join("logs").join(format!("{process}.log"))
    }

    /// `run/<process>.pid`: the running process, for adoption after a runtime restart.
    pub fn pidfile(&self, process: impl std::fmt::Display) -> PathBuf {
        pidfile_in(&self.dir, process)
    }

    /// `run/<process>.<what>`: a small file a process's owner keeps across runtime
    /// restarts (its ports, its command line).
    pub fn run_file(&self, process: impl std::fmt::Display, what: &str) -> PathBuf {
        self.dir.join("run").join(format!("{process}.{what}"))
    }

    /// `etcd/<member>/`: a dedicated etcd member's data dir (not created: etcd makes it).
    pub fn etcd_data(&self, member: &str) -> PathBuf {
        self.dir.join("etcd").join(member)
    }

    /// `run/<replica>/`: the replica's `--cert-dir`, created.
    pub fn scratch(&self, replica: ReplicaId) -> Result<PathBuf, LayoutError> {
        let path = self.dir.join("run").join(replica.to_string());
        std::fs::create_dir_all(&path).map_err(|source| LayoutError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }
}

/// `<dir>/run/<process>.pid`, for a tenant folder not (yet) written.
pub(crate) fn pidfile_in(dir: &Path, process: impl std::fmt::Display) -> PathBuf {
    dir.join("run").join(format!("{process}.pid"))
}
