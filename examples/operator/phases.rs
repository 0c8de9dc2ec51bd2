//! The phases of one reconcile pass, in order: validate → place → datastore → certificates
//! → endpoint → migration → Konnectivity → version → control plane (`control_plane.rs`) →
//! ready. Each phase records its condition
//! and either hands the next one what it made or halts the pass with the reason.

use std::time::{Duration, SystemTime};

use kmetal::core::tenant::{
    CertificateStatus, ReplicaPlacement, StorageSetup, StorageStatus, TenantControlPlaneStatus,
};
use kmetal::core::{FieldError, Phase, TenantControlPlane};
use kmetal::datastore::migrate::MigratableStore;
use kmetal::pki::{Bundle, PkiSpec};
use kmetal::runtime::{EtcdClient, EtcdTls};

use crate::drivers::{SliceConfig, datastore_identity};
use crate::reconcile::{Placed, ReconcileError, Reconciler, set_condition, set_phase, write_out};
use crate::store::{ObjectKey, StoreError, Stored};

/// How a [`Halt::NotReady`] reason ends when work is under way (processes starting), so
/// loops look again soon instead of backing off or giving up.
pub(crate) const IN_PROGRESS: &str = "starting";

/// How a [`Halt::NotReady`] reason ends when the tenant waits for its turn to boot: the
/// runtime says when it comes, so loops look again only now and then.
pub(crate) const QUEUED: &str = "queued";

/// One pass over one tenant: the stored object and the status being built.
pub(crate) struct Pass<'a> {
    pub(crate) key: &'a ObjectKey,
    pub(crate) stored: Stored,
    pub(crate) status: TenantControlPlaneStatus,
    /// Where the schedule phase put the tenant's dedicated etcd members.
    pub(crate) placed_etcd: Vec<ReplicaPlacement>,
}

/// Why a pass stops before its last phase.
pub(crate) enum Halt {
    /// A phase is not done; its condition says why; the reason names the phase.
    NotReady(&'static str),
    /// Done early and Ready (an upgrade refused: the running version keeps serving).
    Ready,
    /// The object changed while the pass worked: the watch brings the change.
    Conflict,
    /// The management store failed.
    Store(ReconcileError),
}

impl From<ReconcileError> for Halt {
    fn from(e: ReconcileError) -> Self {
        Halt::Store(e)
    }
}

impl From<StoreError> for Halt {
    fn from(e: StoreError) -> Self {
        Halt::Store(e.into())
    }
}

/// How long each phase of a pass took, logged at debug level when the pass ends (also when
/// it halts), so a slow first reconcile shows where the time went.
struct Laps {
    tenant: String,
    start: std::time::Instant,
    last: std::time::Instant,
    laps: Vec<(&'static str, Duration)>,
}

impl Laps {
    fn new(key: &ObjectKey) -> Self {
        let now = std::time::Instant::now();
        Self {
            tenant: key.display(),
            start: now,
            last: now,
            laps: Vec::new(),
        }
    }

    fn lap(&mut self, phase: &'static str) {
        let now = std::time::Instant::now();
        self.laps.push((phase, now - self.last));
        self.last = now;
    }
}

impl Drop for Laps {
    fn drop(&mut self) {
        let laps: Vec<String> = self
            .laps
            .iter()
            .map(|(p, d)| format!("{p} {:.1} ms", d.as_secs_f64() * 1e3))
            .collect();
        tracing::debug!(
            tenant = %self.tenant,
            total_ms = self.start.elapsed().as_secs_f64() * 1e3,
            "pass: {}",
            laps.join(", ")
        );
    }
}

/// Which DataStore the tenant wants and whether that moves it.
struct Target {
    name: String,
    previous: Option<String>,
    migrating: bool,
}

impl Reconciler {
    /// Runs every phase; `problems` are the decoding problems of the stored object.
    pub(crate) async fn phases(
        &self,
        p: &mut Pass<'_>,
        tcp: &mut TenantControlPlane,
        problems: &[FieldError],
    ) -> Result<(), Halt> {
        let mut laps = Laps::new(p.key);
        validate(p, tcp, problems)?;
        self.schedule(p, tcp).await?;
        laps.lap("schedule");
        refuse_storage_switch(p)?;
        if !p.placed_etcd.is_empty() {
            let bundle = self.certificates(p, tcp, None).await?;
            laps.lap("certificates");
            let etcd = self.dedicated_etcd(p, &bundle).await?;
            laps.lap("dedicated etcd");
            self.konnectivity(p, &bundle).await?;
            laps.lap("konnectivity");
            self.version(p, tcp).await?;
            let served = self.control_plane(p, tcp, &bundle, etcd).await?;
            laps.lap("control plane");
            ready(p, tcp, &bundle, served);
            return Ok(());
        }
        let target = self.target(p, tcp);
        let slice = self.datastore(p, tcp, &target.name).await?;
        laps.lap("datastore");
        let bundle = self.certificates(p, tcp, Some(&target.name)).await?;
        laps.lap("certificates");
        let (etcd, live) = self.endpoint(p, &bundle, &slice, target.migrating).await?;
        laps.lap("endpoint");
        if target.migrating {
            self.migrate(p, tcp, &target, &live, &bundle, &slice)
                .await?;
            laps.lap("migration");
        }
        storage_status(p, &target.name, &slice);
        self.konnectivity(p, &bundle).await?;
        laps.lap("konnectivity");
        self.version(p, tcp).await?;
        let etcd = EtcdClient {
            servers: vec![format!("https://{etcd}")],
            tls: EtcdTls::Bundle,
            prefix: None,
        };
        let served = self.control_plane(p, tcp, &bundle, etcd).await?;
        laps.lap("control plane");
        ready(p, tcp, &bundle, served);
        Ok(())
    }

    async fn schedule(&self, p: &mut Pass<'_>, tcp: &TenantControlPlane) -> Result<(), Halt> {
        let existing = Placed {
            replicas: p.status.replicas.clone(),
            etcd: p
                .status
                .storage
                .dedicated_etcd
                .iter()
                .flat_map(|d| &d.members)
                .map(|m| ReplicaPlacement {
                    name: m.name.clone(),
                    node: m.node.clone(),
                    zone: m.zone.clone(),
                })
                .collect(),
        };
        match self.place(p.key, tcp, &existing).await {
            Ok(placed) => {
                let mut msg = format!("{} replicas", placed.replicas.len());
                if !placed.etcd.is_empty() {
                    msg.push_str(&format!(", {} etcd members", placed.etcd.len()));
                }
                set_condition(&mut p.status, "Scheduled", true, "Placed", msg);
                p.status.replicas = placed.replicas;
                p.placed_etcd = placed.etcd;
                Ok(())
            }
            Err(reason) => {
                set_condition(&mut p.status, "Scheduled", false, "Unschedulable", reason);
                set_phase(&mut p.status, Phase::Provisioning);
                Err(Halt::NotReady("unschedulable"))
            }
        }
    }

    fn target(&self, p: &mut Pass<'_>, tcp: &TenantControlPlane) -> Target {
        let name = tcp
            .spec
            .data_store
            .clone()
            .unwrap_or_else(|| self.settings.default_datastore.clone());
        let previous = p.status.storage.data_store_name.clone();
        let migrating = previous.as_ref().is_some_and(|prev| *prev != name);
        if p.status.kubernetes_resources.version.status.is_none() {
            set_phase(&mut p.status, Phase::Provisioning);
        }
        Target {
            name,
            previous,
            migrating,
        }
    }

    async fn datastore(
        &self,
        p: &mut Pass<'_>,
        tcp: &TenantControlPlane,
        ds_name: &str,
    ) -> Result<SliceConfig, Halt> {
        self.provision(p.key, tcp, ds_name).await.map_err(|e| {
            let why = kmetal::Report(&e).to_string();
            set_condition(
                &mut p.status,
                "DataStoreProvisioned",
                false,
                "ProvisioningFailed",
                why,
            );
            Halt::NotReady("datastore")
        })
    }

    async fn certificates(
        &self,
        p: &mut Pass<'_>,
        tcp: &TenantControlPlane,
        ds_name: Option<&str>,
    ) -> Result<Bundle, Halt> {
        let bundle = match self.pki(p.key, tcp, ds_name).await {
            Ok(b) => b,
            Err(e) => {
                set_condition(&mut p.status, "CertificatesReady", false, "IssueFailed", e);
                return Err(Halt::NotReady("pki"));
            }
        };
        match bundle.expiry_report(SystemTime::now()) {
            Ok(report) => {
                p.status.certificates = report
                    .into_iter()
                    .map(|e| {
                        let cert = CertificateStatus {
                            last_update: None,
                            not_after: Some(e.expires),
                            checksum: None,
                        };
                        (e.name, cert)
                    })
                    .collect();
                set_condition(
                    &mut p.status,
                    "CertificatesReady",
                    true,
                    "Issued",
                    String::new(),
                );
            }
            Err(e) => {
                let why = kmetal::Report(&e).to_string();
                set_condition(&mut p.status, "CertificatesReady", false, "Unreadable", why);
                return Err(Halt::NotReady("pki"));
            }
        }
        if let Some(out) = &self.settings.out
            && let Err(e) = write_out(&bundle, out, &p.key.name)
        {
            set_condition(
                &mut p.status,
                "CertificatesWritten",
                false,
                "WriteFailed",
                e,
            );
            return Err(Halt::NotReady("out"));
        }
        Ok(bundle)
    }

    /// The tenant's etcd endpoint: a gateway over its slice (kine's role), which a migration
    /// switches to the new slice under live traffic.
    async fn endpoint(
        &self,
        p: &mut Pass<'_>,
        bundle: &Bundle,
        slice: &SliceConfig,
        migrating: bool,
    ) -> Result<(std::net::SocketAddr, std::sync::Arc<MigratableStore>), Halt> {
        let serving = match self.slice_config(p.key).await? {
            Some(c) if migrating => c,
            _ => slice.clone(),
        };
        match self.ensure_gateway(p.key, bundle, &serving).await {
            Ok((addr, live)) => {
                let url = format!("https://{addr}");
                set_condition(
                    &mut p.status,
                    "DataStoreEndpointReady",
                    true,
                    "Serving",
                    url,
                );
                Ok((addr, live))
            }
            Err(e) => {
                set_condition(
                    &mut p.status,
                    "DataStoreEndpointReady",
                    false,
                    "ServeFailed",
                    e,
                );
                Err(Halt::NotReady("datastore endpoint"))
            }
        }
    }

    async fn migrate(
        &self,
        p: &mut Pass<'_>,
        tcp: &TenantControlPlane,
        target: &Target,
        live: &std::sync::Arc<MigratableStore>,
        bundle: &Bundle,
        slice: &SliceConfig,
    ) -> Result<(), Halt> {
        let from = target.previous.clone().unwrap_or_default();
        // Observable before the copy starts; until the cut-over the old slice serves.
        set_phase(&mut p.status, Phase::Migrating);
        let moving = format!("{from} -> {}", target.name);
        set_condition(
            &mut p.status,
            "DataStoreMigrated",
            false,
            "InProgress",
            moving,
        );
        if !self.checkpoint(p.key, &mut p.stored, &p.status).await? {
            return Err(Halt::Conflict);
        }
        // Other controllers stop serving the tenant when they see Migrating; no write may
        // reach the old slice through them while it is copied.
        if let Some(reg) = &self.registry
            && let Err(e) = reg.wait_others_gone(p.key, Duration::from_secs(30)).await
        {
            set_condition(
                &mut p.status,
                "DataStoreMigrated",
                false,
                "WaitingForReplicas",
                e,
            );
            return Err(Halt::NotReady("migration"));
        }
        let identity = datastore_identity(bundle);
        let copied =
            crate::migration::migrate(self, p.key, tcp, live, identity, &from, &target.name, slice)
                .await;
        if let Err(e) = copied {
            set_phase(&mut p.status, Phase::Migrating);
            let why = kmetal::Report(&e).to_string();
            set_condition(
                &mut p.status,
                "DataStoreMigrated",
                false,
                "MigrationFailed",
                why,
            );
            return Err(Halt::NotReady("migration"));
        }
        let done = format!("from {from}");
        set_condition(&mut p.status, "DataStoreMigrated", true, "Migrated", done);
        if let Some(e) = self.endpoints.lock().await.get_mut(p.key) {
            e.data_store = target.name.clone();
        }
        Ok(())
    }

    async fn konnectivity(&self, p: &mut Pass<'_>, bundle: &Bundle) -> Result<(), Halt> {
        match self.ensure_tunnel(p.key, bundle).await {
            Ok(addr) => {
                let msg = format!("agents connect to {addr}");
                set_condition(&mut p.status, "KonnectivityReady", true, "Serving", msg);
                self.announce(p.key, &addr).await;
                Ok(())
            }
            Err(e) => {
                set_condition(&mut p.status, "KonnectivityReady", false, "ServeFailed", e);
                Err(Halt::NotReady("konnectivity"))
            }
        }
    }

    /// One minor version at a time, never down; rolling, one replica at a time, each step
    /// recorded, never all down.
    async fn version(&self, p: &mut Pass<'_>, tcp: &TenantControlPlane) -> Result<(), Halt> {
        let want = tcp.spec.kubernetes.version.clone().unwrap_or_default();
        let running = p.status.kubernetes_resources.version.version.clone();
        if let Some(running) = running.filter(|r| *r != want) {
            if let Err(msg) = crate::lifecycle::check_upgrade(&running, &want) {
                set_condition(&mut p.status, "Upgraded", false, "UpgradeRefused", msg);
                let still = format!("still running {running}");
                set_condition(&mut p.status, "Ready", true, "Ready", still);
                set_phase(&mut p.status, Phase::Ready);
                return Err(Halt::Ready);
            }
            set_phase(&mut p.status, Phase::Upgrading);
            let n = p.status.replicas.len();
            for i in 0..n {
                let step = format!("{running} -> {want}: replica {}/{n} updated", i + 1);
                set_condition(&mut p.status, "Upgraded", false, "RollingOut", step);
                if !self.checkpoint(p.key, &mut p.stored, &p.status).await? {
                    return Err(Halt::Conflict);
                }
            }
            let done = format!("{running} -> {want}");
            set_condition(&mut p.status, "Upgraded", true, "RolledOut", done);
        }
        p.status.kubernetes_resources.version.version = Some(want);
        Ok(())
    }
}

/// A tenant does not move between a DataStore slice and a dedicated etcd: that would start
/// it on an empty store (a migration into or out of a dedicated etcd is not built yet).
fn refuse_storage_switch(p: &mut Pass<'_>) -> Result<(), Halt> {
    let storage = &p.status.storage;
    let why = match (&storage.data_store_name, &storage.dedicated_etcd) {
        (Some(ds), _) if !p.placed_etcd.is_empty() => format!(
            "the tenant's data is on dataStore {ds}; moving it to a dedicated etcd is not \
             supported: remove the kmetal.io/dedicated-etcd annotation"
        ),
        (None, Some(_)) if p.placed_etcd.is_empty() => "the tenant's data is on its dedicated \
             etcd; moving it to a dataStore is not supported: restore the \
             kmetal.io/dedicated-etcd annotation"
            .to_string(),
        _ => return Ok(()),
    };
    set_condition(
        &mut p.status,
        "DataStoreReady",
        false,
        "SwitchUnsupported",
        why,
    );
    Err(Halt::NotReady("storage switch refused"))
}

/// Decoding problems and validation failures: the spec is refused as a whole.
fn validate(
    p: &mut Pass<'_>,
    tcp: &mut TenantControlPlane,
    problems: &[FieldError],
) -> Result<(), Halt> {
    let mut problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
    if let Err(errs) = kmetal::core::validate::validate_tenant(tcp) {
        problems.extend(errs.0.iter().map(ToString::to_string));
    }
    tcp.apply_defaults();
    if !problems.is_empty() {
        let all = problems.join("; ");
        set_condition(&mut p.status, "Valid", false, "InvalidSpec", all);
        if p.status.kubernetes_resources.version.status.is_none() {
            set_phase(&mut p.status, Phase::Provisioning);
        }
        return Err(Halt::NotReady("invalid spec"));
    }
    set_condition(&mut p.status, "Valid", true, "Valid", String::new());
    Ok(())
}

fn storage_status(p: &mut Pass<'_>, ds_name: &str, slice: &SliceConfig) {
    let provisioned = format!("dataStore {ds_name}");
    set_condition(
        &mut p.status,
        "DataStoreProvisioned",
        true,
        "Provisioned",
        provisioned,
    );
    p.status.storage = StorageStatus {
        driver: slice.get("driver").cloned(),
        data_store_name: Some(ds_name.to_owned()),
        setup: StorageSetup {
            schema: slice.get("schema").cloned(),
            user: slice.get("user").cloned(),
        },
        dedicated_etcd: None,
    };
}

/// The last phase; `served` says whether this operator runs the control plane (without a
/// runtime, Ready means provisioned, and the reason says so).
fn ready(p: &mut Pass<'_>, tcp: &TenantControlPlane, bundle: &Bundle, served: bool) {
    let endpoint = PkiSpec::from_tenant(tcp).map(|s| {
        let (h, port) = s.host_port();
        format!("{h}:{port}")
    });
    p.status.control_plane_endpoint = endpoint.ok();
    let phase = if bundle.rotation_in_progress() {
        Phase::CertificateAuthorityRotating
    } else {
        Phase::Ready
    };
    set_phase(&mut p.status, phase);
    if served {
        set_condition(&mut p.status, "Ready", true, "Ready", String::new());
    } else {
        let why = "provisioned; no control plane runs here (--runtime none)".to_string();
        set_condition(&mut p.status, "Ready", true, "Provisioned", why);
    }
}
