//! Moving a tenant to another DataStore (also across drivers): provision the new slice,
//! copy everything with kmetal-datastore's migration (freeze, copy, verify by content hash,
//! cut over), record the new slice, remove the old one.

use kmetal::core::TenantControlPlane;
use kmetal::datastore::migrate::{MigratableStore, migrate as copy};

use crate::drivers::{DriverError, SliceConfig, open_slice};
use crate::reconcile::Reconciler;
use crate::store::ObjectKey;

/// Why a migration did not complete (the tenant stays on its old slice).
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("no slice recorded for the tenant")]
    NoSlice,
    #[error("copying")]
    Copy(#[from] kmetal::datastore::migrate::MigrationError),
}

/// Migrates `key` from `from` to `to` (whose slice `target` is already provisioned) under
/// `live`, the store the tenant's endpoint serves: writes pause for the final copy and
/// resume on the new slice.
#[allow(clippy::too_many_arguments)]
pub async fn migrate(
    r: &Reconciler,
    key: &ObjectKey,
    tcp: &TenantControlPlane,
    live: &MigratableStore,
    identity: Option<(String, String)>,
    from: &str,
    to: &str,
    target: &SliceConfig,
) -> Result<(), MigrationError> {
    let old = r.slice_config(key).await?.ok_or(MigrationError::NoSlice)?;
    if old.get("dataStore").map(String::as_str) == Some(to) {
        return Ok(());
    }
    let dest = open_slice(to, target, identity).await?;
    let report = copy(live, dest, |_| {}).await?;
    tracing::info!(tenant = %key.name, keys = report.keys, leases = report.leases, hash = %report.content_hash, "migrated");
    r.record_slice(key, target).await?;
    r.deprovision(tcp, from).await?;
    Ok(())
}
