//! Day-2 rules: Kubernetes version changes (one minor at a time, never down), certificate
//! renewal before the deadline, manual renewal and CA rotation by annotation.

use std::time::SystemTime;

use kmetal::core::version::{KubernetesVersion, UpgradeStep};
use kmetal::pki::{Bundle, RenewalPolicy};

/// `kmetal.io/rotate-ca: prepare` starts a CA rotation (trust bundles carry old and new CA,
/// every leaf and kubeconfig re-issued by the new CA); `finalize` drops the old CA.
pub const ROTATE_CA: &str = "kmetal.io/rotate-ca";

/// Whether `running` may move to `want`.
pub fn check_upgrade(running: &str, want: &str) -> Result<(), String> {
    let parse = |s: &str| {
        s.parse::<KubernetesVersion>()
            .map_err(|e| format!("version {s:?}: {}", kmetal::Report(&e)))
    };
    match parse(running)?.upgrade_to(&parse(want)?) {
        UpgradeStep::None | UpgradeStep::Allowed => Ok(()),
        UpgradeStep::Downgrade => Err(format!("{running} -> {want} is a downgrade; refused")),
        _ => Err(format!(
            "{running} -> {want} skips a minor version; upgrade one minor at a time"
        )),
    }
}

/// Applies renewal and rotation to `bundle`; true when anything was re-issued.
pub fn certificates(
    bundle: &mut Bundle,
    policy: &RenewalPolicy,
    rotation: Option<&str>,
    now: SystemTime,
) -> Result<bool, String> {
    let mut changed = false;
    match rotation {
        Some("prepare") if !bundle.rotation_in_progress() => {
            bundle
                .rotate_prepare(now)
                .map_err(|e| kmetal::Report(&e).to_string())?;
            changed = true;
        }
        Some("finalize") if bundle.rotation_in_progress() => {
            bundle
                .rotate_finalize()
                .map_err(|e| kmetal::Report(&e).to_string())?;
            changed = true;
        }
        _ => {}
    }
    let due = bundle
        .due_for_renewal(policy, now)
        .map_err(|e| kmetal::Report(&e).to_string())?;
    let leaves: Vec<&str> = due
        .iter()
        .map(String::as_str)
        .filter(|n| !n.ends_with("ca") && *n != "sa")
        .collect();
    if !leaves.is_empty() {
        bundle
            .renew(&leaves, now)
            .map_err(|e| kmetal::Report(&e).to_string())?;
        changed = true;
    }
    Ok(changed)
}
