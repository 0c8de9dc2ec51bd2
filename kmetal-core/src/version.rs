//! Kubernetes versions (`v1.30.2`) and the upgrade rule: never down, at most one minor step.

use std::fmt;
use std::str::FromStr;

/// Why a version string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VersionError {
    /// Not of the form `vMAJOR.MINOR.PATCH[-pre]`.
    #[error("must look like v1.30.2")]
    Malformed,
}

/// A Kubernetes release version.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KubernetesVersion {
    /// Major version (1).
    pub major: u64,
    /// Minor version.
    pub minor: u64,
    /// Patch version.
    pub patch: u64,
    /// Pre-release suffix after '-', if any (`rc.0`).
    pub pre: Option<String>,
}

impl FromStr for KubernetesVersion {
    type Err = VersionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.strip_prefix('v').ok_or(VersionError::Malformed)?;
        let (core, pre) = match rest.split_once('-') {
            Some((c, p)) if !p.is_empty() => (c, Some(p.to_owned())),
            Some(_) => return Err(VersionError::Malformed),
            None => (rest, None),
        };
        let mut parts = core.split('.');
        let mut num = || -> Result<u64, VersionError> {
            let p = parts.next().ok_or(VersionError::Malformed)?;
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(VersionError::Malformed);
            }
            p.parse().map_err(|_| VersionError::Malformed)
        };
        let (major, minor, patch) = (num()?, num()?, num()?);
        if parts.next().is_some() {
            return Err(VersionError::Malformed);
        }
        Ok(Self {
            major,
            minor,
            patch,
            pre,
        })
    }
}

impl fmt::Display for KubernetesVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}.{}.{}", self.major, self.minor, self.patch)?;
        if let Some(pre) = &self.pre {
            write!(f, "-{pre}")?;
        }
        Ok(())
    }
}

impl PartialOrd for KubernetesVersion {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for KubernetesVersion {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.major, self.minor, self.patch)
            .cmp(&(other.major, other.minor, other.patch))
            // A release sorts after its pre-releases.
            .then_with(|| match (&self.pre, &other.pre) {
                (None, None) => std::cmp::Ordering::Equal,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(_), None) => std::cmp::Ordering::Less,
                (Some(a), Some(b)) => a.cmp(b),
            })
    }
}

/// What an upgrade from one version to another would do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum UpgradeStep {
    /// Same version.
    None,
    /// Patch change or a single minor step up: allowed.
    Allowed,
    /// Going down: refused.
    Downgrade,
    /// More than one minor step, or a major change: refused.
    Skip,
}

impl KubernetesVersion {
    /// Classifies an upgrade from `self` to `to`.
    ///
    /// ```
    /// use kmetal_core::version::{KubernetesVersion, UpgradeStep};
    /// let v = |s: &str| s.parse::<KubernetesVersion>().unwrap();
    /// assert_eq!(v("v1.29.3").upgrade_to(&v("v1.30.0")), UpgradeStep::Allowed);
    /// assert_eq!(v("v1.29.3").upgrade_to(&v("v1.31.0")), UpgradeStep::Skip);
    /// assert_eq!(v("v1.30.0").upgrade_to(&v("v1.29.9")), UpgradeStep::Downgrade);
    /// ```
    pub fn upgrade_to(&self, to: &KubernetesVersion) -> UpgradeStep {
        match self.cmp(to) {
            std::cmp::Ordering::Equal => UpgradeStep::None,
            std::cmp::Ordering::Greater => UpgradeStep::Downgrade,
            std::cmp::Ordering::Less => {
                if to.major != self.major || to.minor > self.minor.saturating_add(1) {
                    UpgradeStep::Skip
                } else {
                    UpgradeStep::Allowed
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_order() {
        let a: KubernetesVersion = "v1.30.2".parse().unwrap();
        assert_eq!(a.to_string(), "v1.30.2");
        assert!("1.30.2".parse::<KubernetesVersion>().is_err());
        assert!("v1.30".parse::<KubernetesVersion>().is_err());
        assert!("v1.30.2.1".parse::<KubernetesVersion>().is_err());
        let rc: KubernetesVersion = "v1.31.0-rc.1".parse().unwrap();
        let rel: KubernetesVersion = "v1.31.0".parse().unwrap();
        assert!(rc < rel);
        assert_eq!(a.upgrade_to(&rc), UpgradeStep::Allowed);
        assert_eq!(a.upgrade_to(&a), UpgradeStep::None);
        let huge: KubernetesVersion = format!("v1.{}.0", u64::MAX).parse().unwrap();
        assert_eq!(huge.upgrade_to(&huge), UpgradeStep::None);
        assert_eq!(a.upgrade_to(&huge), UpgradeStep::Skip);
    }
}
