//! Which Kubernetes versions this machine can run: folders of binaries, each asked for its
//! version (`kube-apiserver --version` prints `Kubernetes v1.34.4`), so a folder's name never
//! has to be trusted.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use kmetal_core::version::KubernetesVersion;

/// A control-plane component the runtime runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Component {
    /// kube-apiserver.
    ApiServer,
    /// kube-controller-manager.
    ControllerManager,
    /// kube-scheduler.
    Scheduler,
}

impl Component {
    /// Every component, in start order.
    pub const ALL: [Component; 3] = [
        Component::ApiServer,
        Component::ControllerManager,
        Component::Scheduler,
    ];

    /// The binary's file name (also the name of the Lease a controller holds).
    pub fn binary(self) -> &'static str {
        match self {
            Self::ApiServer => "kube-apiserver",
            Self::ControllerManager => "kube-controller-manager",
            Self::Scheduler => "kube-scheduler",
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.binary())
    }
}

/// Why a binary could not be found or identified.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogError {
    /// No folder has the component at the wanted version.
    #[error("no {component} binary for {wanted}; available: {}", list(available))]
    NoBinary {
        /// The component.
        component: Component,
        /// The version asked for.
        wanted: String,
        /// The versions there are binaries for.
        available: Vec<KubernetesVersion>,
    },
    /// Running `<binary> --version` failed.
    #[error("cannot run {} --version", binary.display())]
    Run {
        /// The binary.
        binary: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `--version` printed something that names no Kubernetes version.
    #[error("{} --version printed no Kubernetes version: {output:?}", binary.display())]
    UnknownVersion {
        /// The binary.
        binary: PathBuf,
        /// What it printed.
        output: String,
    },
}

fn list(versions: &[KubernetesVersion]) -> String {
    if versions.is_empty() {
        return "none (scripts/peers.sh builds the pinned release)".into();
    }
    versions
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Folders of control-plane binaries by the Kubernetes version they report.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    releases: BTreeMap<KubernetesVersion, PathBuf>,
}

impl Catalog {
    /// An empty catalog (every lookup fails with [`CatalogError::NoBinary`]).
    pub fn empty() -> Self {
        Self::default()
    }

    /// Asks the kube-apiserver of each folder for its version; folders without one are
    /// skipped, so a `PATH`-like list can be handed in. When two folders report the same
    /// version the first wins.
    pub fn discover<P: AsRef<Path>>(
        dirs: impl IntoIterator<Item = P>,
    ) -> Result<Self, CatalogError> {
        let mut catalog = Self::empty();
        for dir in dirs {
            let dir = dir.as_ref();
            let binary = dir.join(Component::ApiServer.binary());
            if !binary.is_file() {
                continue;
            }
            let version = version_of(&binary)?;
            catalog
                .releases
                .entry(version)
                .or_insert_with(|| dir.to_owned());
        }
        Ok(catalog)
    }

    /// Adds a folder for `version` without asking its binaries (tests, pre-checked installs).
    pub fn with_release(mut self, version: KubernetesVersion, dir: impl Into<PathBuf>) -> Self {
        self.releases.insert(version, dir.into());
        self
    }

    /// The versions there are binaries for, oldest first.
    pub fn versions(&self) -> Vec<KubernetesVersion> {
        self.releases.keys().cloned().collect()
    }

    /// The newest version, if any.
    pub fn newest(&self) -> Option<&KubernetesVersion> {
        self.releases.keys().next_back()
    }

    /// The path of `component` at exactly `version` (Kamaji runs the image tag it is given).
    pub fn binary(
        &self,
        component: Component,
        version: &KubernetesVersion,
    ) -> Result<PathBuf, CatalogError> {
        self.releases
            .get(version)
            .map(|dir| dir.join(component.binary()))
            .filter(|p| p.is_file())
            .ok_or_else(|| CatalogError::NoBinary {
                component,
                wanted: version.to_string(),
                available: self.versions(),
            })
    }
}

/// Runs `binary --version` and reads `Kubernetes vX.Y.Z` from it.
fn version_of(binary: &Path) -> Result<KubernetesVersion, CatalogError> {
    let out = std::process::Command::new(binary)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| CatalogError::Run {
            binary: binary.to_owned(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_version_line(&text).ok_or_else(|| CatalogError::UnknownVersion {
        binary: binary.to_owned(),
        output: text.trim().to_owned(),
    })
}

fn parse_version_line(text: &str) -> Option<KubernetesVersion> {
    text.split_whitespace()
        .skip_while(|w| *w != "Kubernetes")
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_version_line() {
        let v = parse_version_line("Kubernetes v1.34.4\n").expect("version");
        assert_eq!(v.to_string(), "v1.34.4");
        assert!(parse_version_line("kine v0.17.5").is_none());
        assert!(parse_version_line("Kubernetes v1.34").is_none());
    }

    #[test]
    fn a_missing_version_names_what_there_is() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("kube-apiserver"), "").expect("file");
        let catalog = Catalog::empty().with_release("v1.34.2".parse().expect("v"), dir.path());
        let e = catalog
            .binary(Component::ApiServer, &"v1.29.3".parse().expect("v"))
            .expect_err("missing");
        assert_eq!(
            e.to_string(),
            "no kube-apiserver binary for v1.29.3; available: v1.34.2"
        );
        let e = catalog
            .binary(Component::Scheduler, &"v1.34.2".parse().expect("v"))
            .expect_err("no scheduler in the folder");
        assert!(
            e.to_string()
                .starts_with("no kube-scheduler binary for v1.34.2")
        );
        let none = Catalog::empty()
            .binary(Component::ApiServer, &"v1.34.2".parse().expect("v"))
            .expect_err("empty");
        assert!(none.to_string().contains("scripts/peers.sh"), "{none}");
    }
}
