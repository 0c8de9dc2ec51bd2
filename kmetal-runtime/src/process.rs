//! [`ProcessRuntime`]: each tenant's components as supervised local processes (the stand-in
//! for the under cluster's pods), each api-server replica on a loopback port of its own and
//! the tenant's Service address served by a [`Front`] that forwards to the ready ones.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::{Mutex, broadcast};
use tokio::task::JoinSet;

use crate::catalog::{Catalog, Component};
use crate::etcd::{EtcdCluster, EtcdClusterConfig, EtcdPlan, EtcdStatus};
use crate::flags::{self, ApiserverInputs, Flags};
use crate::front::{Backends, Front};
use crate::gate::{StartGate, Ticket};
use crate::http::Client;
use crate::layout::{ReplicaId, TenantLayout, pidfile_in};
use crate::plan::ControlPlanePlan;
use crate::ports::free_port;
use crate::probe;
use crate::runtime::{
    ControlPlaneRuntime, ControlPlaneStatus, ReplicaState, ReplicaStatus, RuntimeError, TenantId,
};
use crate::supervisor::{self, Backoff, ProcessSpec, ProcessState, Supervisor};

/// How the process runtime runs.
#[derive(Debug, Clone)]
pub struct ProcessRuntimeConfig {
    /// Where each tenant's folder goes (`<state_dir>/<namespace>/<name>/`).
    pub state_dir: PathBuf,
    /// The binaries by version.
    pub catalog: Catalog,
    /// Restart delays.
    pub backoff: Backoff,
    /// How long one probe may take.
    pub probe_timeout: Duration,
    /// SIGTERM to SIGKILL on stop.
    pub stop_grace: Duration,
    /// The etcd binary dedicated etcds run (etcd 3.6; `None`: no dedicated etcd here).
    pub etcd_binary: Option<PathBuf>,
    /// How long a dedicated etcd member may run without answering before it is replaced.
    pub etcd_replace_unresponsive_after: Duration,
    /// How many tenants may boot at once; the others wait their turn (a tenant whose
    /// processes are found running is adopted without waiting).
    pub boot_limit: usize,
    /// A tenant boots until all its replicas are ready or this long has passed; then its
    /// place goes to the next.
    pub boot_timeout: Duration,
}

impl ProcessRuntimeConfig {
    /// Defaults: kubelet-like backoff, 3 s probes, 10 s grace, one tenant booting per CPU
    /// for at most two minutes.
    pub fn new(state_dir: impl Into<PathBuf>, catalog: Catalog) -> Self {
        Self {
            state_dir: state_dir.into(),
            catalog,
            backoff: Backoff::default(),
            probe_timeout: Duration::from_secs(3),
            stop_grace: Duration::from_secs(10),
            etcd_binary: None,
            etcd_replace_unresponsive_after: Duration::from_secs(30),
            boot_limit: std::thread::available_parallelism().map_or(1, |n| n.get()),
            boot_timeout: Duration::from_secs(120),
        }
    }
}

/// One replica and the command line it was started with.
struct Replica {
    id: ReplicaId,
    addr: SocketAddr,
    spec: ProcessSpec,
    supervisor: Supervisor,
}

/// What runs for one tenant.
struct Tenant {
    layout: TenantLayout,
    front: Front,
    replicas: Vec<Replica>,
    /// kubeadm's `kubeadm:cluster-admins` binding exists (admin.conf is an admin).
    bootstrapped: Arc<AtomicBool>,
    /// While it boots: makes that binding and puts each api-server behind the front as soon
    /// as it answers, between probes ([`watch_boot`]).
    _boot_watch: JoinSet<()>,
    /// The probes' client per replica address, for the bundle with this digest.
    clients: (u64, HashMap<SocketAddr, Client>),
    status: Option<ControlPlaneStatus>,
    watcher: JoinSet<()>,
    /// Its place at the start gate while it boots.
    boot: Option<Ticket>,
}

/// A tenant's place in the runtime: what runs for it, or that it was removed (an `ensure`
/// that raced the removal must not start it again in a slot nobody can reach).
#[derive(Default)]
struct Slot {
    tenant: Option<Tenant>,
    removed: bool,
}

/// Runs tenant control planes as local processes.
pub struct ProcessRuntime {
    config: ProcessRuntimeConfig,
    /// One lock per tenant: a slow probe of one tenant never holds up another's.
    tenants: Mutex<HashMap<TenantId, Arc<Mutex<Slot>>>>,
    etcds: Mutex<HashMap<TenantId, Arc<EtcdCluster>>>,
    gate: StartGate,
    changes: broadcast::Sender<TenantId>,
}

impl std::fmt::Debug for ProcessRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessRuntime")
            .field("state_dir", &self.config.state_dir)
            .finish_non_exhaustive()
    }
}

impl ProcessRuntime {
    /// A runtime with no tenants yet.
    pub fn new(config: ProcessRuntimeConfig) -> Self {
        let changes = broadcast::channel(256).0;
        Self {
            gate: StartGate::new(config.boot_limit, changes.clone()),
            config,
            tenants: Mutex::default(),
            etcds: Mutex::default(),
            changes,
        }
    }

    /// The start gate (how many tenants boot, how many wait).
    pub fn gate(&self) -> &StartGate {
        &self.gate
    }

    /// The configuration.
    pub fn config(&self) -> &ProcessRuntimeConfig {
        &self.config
    }

    /// The tenant's folder (logs under `logs/`).
    pub fn tenant_dir(&self, tenant: &TenantId) -> PathBuf {
        self.config
            .state_dir
            .join(&tenant.namespace)
            .join(&tenant.name)
    }

    /// Kills one replica's process (SIGKILL) the way a crash would, for tests and drills;
    /// its supervisor starts it again after the backoff. Returns the pid killed.
    pub async fn kill_replica(&self, tenant: &TenantId, replica: ReplicaId) -> Option<u32> {
        let slot = self.tenants.lock().await.get(tenant)?.clone();
        let slot = slot.lock().await;
        let r = slot
            .tenant
            .as_ref()?
            .replicas
            .iter()
            .find(|r| r.id == replica)?;
        let pid = r.supervisor.state().pid()?;
        crate::supervisor::kill(pid).then_some(pid)
    }

    /// The tenant's slot, made if it has none; never a removed one.
    async fn slot(&self, tenant: &TenantId) -> Arc<Mutex<Slot>> {
        let mut map = self.tenants.lock().await;
        map.entry(tenant.clone()).or_default().clone()
    }

    /// Kills one member of the tenant's dedicated etcd (SIGKILL), for tests and drills.
    /// Returns the pid killed.
    pub async fn kill_etcd_member(&self, tenant: &TenantId, member: &str) -> Option<u32> {
        self.etcds
            .lock()
            .await
            .get(tenant)?
            .kill_member(member)
            .await
    }

    fn command_line(
        &self,
        plan: &ControlPlanePlan,
        layout: &TenantLayout,
        id: ReplicaId,
        addr: SocketAddr,
    ) -> Result<ProcessSpec, RuntimeError> {
        let binary = self.config.catalog.binary(id.component, &plan.version)?;
        let cert_dir = layout.scratch(id)?;
        let mut flags: Flags = match id.component {
            Component::ApiServer => {
                let egress = plan
                    .egress
                    .as_ref()
                    .map(|e| layout.write_egress(e))
                    .transpose()?;
                flags::apiserver(&ApiserverInputs {
                    layout,
                    bind: addr,
                    advertise: plan.advertise,
                    service_cidr: &plan.service_cidr,
                    cluster_domain: &plan.cluster_domain,
                    admission_plugins: &plan.admission_plugins,
                    kubelet_address_types: &plan.kubelet_address_types,
                    etcd: &plan.etcd,
                    egress_file: egress.as_deref(),
                    cert_dir: &cert_dir,
                })?
            }
            c => flags::controller(
                c,
                layout,
                addr,
                &plan.service_cidr,
                plan.pod_cidr.as_deref(),
                &cert_dir,
            )?,
        };
        flags
            .apply_extra(plan.extra(id.component))
            .map_err(|source| RuntimeError::Flags {
                component: id.component,
                source,
            })?;
        Ok(ProcessSpec {
            binary,
            args: flags.to_args(),
            log: layout.log(id),
            pidfile: Some(layout.pidfile(id)),
            revision: layout.digest(),
        })
    }

    /// The replica's own address: the one it had (kept in `run/<replica>.addr`, so a restarted
    /// runtime builds the same command line and adopts the process), or a free loopback port.
    fn replica_addr(layout: &TenantLayout, id: ReplicaId) -> Result<SocketAddr, RuntimeError> {
        let file = layout.run_file(id, "addr");
        if let Some(addr) = std::fs::read_to_string(&file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return Ok(addr);
        }
        let port_err = |source| RuntimeError::Port {
            replica: id,
            source,
        };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port().map_err(port_err)?));
        std::fs::write(&file, addr.to_string()).map_err(port_err)?;
        Ok(addr)
    }

    /// One task per replica, each telling [`changes`](ControlPlaneRuntime::changes) when
    /// its process changes state; dropping the set stops them.
    fn watch_replicas(&self, tenant: &TenantId, replicas: &[Replica]) -> JoinSet<()> {
        let mut set = JoinSet::new();
        for r in replicas {
            let mut w = r.supervisor.watch();
            let changes = self.changes.clone();
            let tenant = tenant.clone();
            set.spawn(async move {
                while w.changed().await.is_ok() {
                    let _ = changes.send(tenant.clone());
                }
            });
        }
        set
    }

    /// Starts the tenant's processes when the gate lets it boot (or they already run and
    /// are adopted); otherwise reports its place in the queue.
    async fn start_tenant(&self, plan: &ControlPlanePlan) -> Result<Start, RuntimeError> {
        let dir = self.tenant_dir(&plan.tenant);
        let ids = replica_ids(plan.replicas);
        // Processes a runtime before this one left running are adopted, not booted.
        let adopting = ids
            .iter()
            .any(|id| supervisor::runs(&pidfile_in(&dir, id), &dir));
        let boot = if adopting {
            None
        } else {
            match self.gate.enter(&plan.tenant) {
                Ok(ticket) => Some(ticket),
                Err(q) => {
                    return Ok(Start::Queued(ControlPlaneStatus {
                        version: plan.version.clone(),
                        endpoint: plan.endpoint,
                        replicas: Vec::new(),
                        leases: unheld_leases(),
                        queued: Some(q),
                    }));
                }
            }
        };
        let layout = TenantLayout::write(dir, plan.bundle.clone())?;
        let mut specs = Vec::new();
        for id in ids {
            let addr = Self::replica_addr(&layout, id)?;
            specs.push((id, addr, self.command_line(plan, &layout, id, addr)?));
        }
        let front = Front::bind(plan.endpoint)
            .await
            .map_err(|source| RuntimeError::Listen {
                addr: plan.endpoint,
                source,
            })?;
        let replicas: Vec<Replica> = specs
            .into_iter()
            .map(|(id, addr, spec)| Replica {
                id,
                addr,
                supervisor: Supervisor::start(spec.clone(), self.config.backoff),
                spec,
            })
            .collect();
        let watcher = self.watch_replicas(&plan.tenant, &replicas);
        let bootstrapped = Arc::new(AtomicBool::new(false));
        let mut boot_watch = JoinSet::new();
        let clients = replicas
            .iter()
            .filter(|r| r.id.component == Component::ApiServer)
            .map(|r| Ok((r.addr, self.probe_client(&layout, plan, r.addr)?)))
            .collect::<Result<Vec<_>, RuntimeError>>()?;
        boot_watch.spawn(watch_boot(Boot {
            apiservers: clients,
            front: front.backends_handle(),
            bootstrapped: bootstrapped.clone(),
            tenant: plan.tenant.clone(),
            changes: self.changes.clone(),
            until: tokio::time::Instant::now() + self.config.boot_timeout,
        }));
        Ok(Start::Running(Box::new(Tenant {
            layout,
            front,
            replicas,
            bootstrapped,
            _boot_watch: boot_watch,
            clients: (0, HashMap::new()),
            status: None,
            watcher,
            boot,
        })))
    }

    /// Moves a running tenant one step toward `plan`: new files, added or removed replicas,
    /// and at most one replica replaced, only while all the others are ready.
    async fn update_tenant(
        &self,
        t: &mut Tenant,
        plan: &ControlPlanePlan,
    ) -> Result<(), RuntimeError> {
        if t.layout.bundle() != &plan.bundle {
            t.layout = TenantLayout::write(t.layout.dir(), plan.bundle.clone())?;
        }
        let want = replica_ids(plan.replicas);
        let mut changed = false;
        let (keep, gone): (Vec<Replica>, Vec<Replica>) = std::mem::take(&mut t.replicas)
            .into_iter()
            .partition(|r| want.contains(&r.id));
        for r in gone {
            changed = true;
            r.supervisor.stop(self.config.stop_grace).await;
            let _ = std::fs::remove_file(t.layout.dir().join("run").join(format!("{}.addr", r.id)));
        }
        t.replicas = keep;
        for id in &want {
            if t.replicas.iter().any(|r| r.id == *id) {
                continue;
            }
            changed = true;
            let addr = Self::replica_addr(&t.layout, *id)?;
            let spec = self.command_line(plan, &t.layout, *id, addr)?;
            let supervisor = Supervisor::start(spec.clone(), self.config.backoff);
            t.replicas.push(Replica {
                id: *id,
                addr,
                spec,
                supervisor,
            });
        }
        t.replicas.sort_by_key(|r| r.id);
        let all_ready = t
            .status
            .as_ref()
            .is_some_and(ControlPlaneStatus::replicas_ready);
        if all_ready && !changed {
            for i in 0..t.replicas.len() {
                let (id, addr) = (t.replicas[i].id, t.replicas[i].addr);
                let spec = self.command_line(plan, &t.layout, id, addr)?;
                if spec != t.replicas[i].spec {
                    tracing::info!(tenant = %plan.tenant, replica = %id, "replacing replica: its command line or files changed");
                    // New connections go to the others first, so none lands on a replica
                    // that is stopping.
                    let others: Vec<SocketAddr> = t
                        .front
                        .backends()
                        .into_iter()
                        .filter(|a| *a != addr)
                        .collect();
                    if id.component == Component::ApiServer && others.is_empty() {
                        // The only replica: replacing it is an outage the caller asked for.
                        tracing::warn!(tenant = %plan.tenant, replica = %id, "replacing the only ready api-server");
                    }
                    t.front.set_backends(others);
                    // The new process takes the old one's address: stop the old one first.
                    let old = t.replicas.remove(i);
                    old.supervisor.stop(self.config.stop_grace).await;
                    let supervisor = Supervisor::start(spec.clone(), self.config.backoff);
                    t.replicas.insert(
                        i,
                        Replica {
                            id,
                            addr,
                            spec,
                            supervisor,
                        },
                    );
                    changed = true;
                    break;
                }
            }
        }
        if changed {
            t.watcher = self.watch_replicas(&plan.tenant, &t.replicas);
        }
        Ok(())
    }

    /// A client for one replica as the probes use it: `super-admin.conf`'s identity, the
    /// cluster CA, the probe timeout.
    fn probe_client(
        &self,
        layout: &TenantLayout,
        plan: &ControlPlanePlan,
        addr: SocketAddr,
    ) -> Result<Client, RuntimeError> {
        let ca = layout.pem("pki/ca.crt")?;
        let identity = identity(layout, "super-admin.conf")?;
        Ok(Client::tls(
            addr,
            &plan.server_name,
            ca,
            Some((&identity.0, &identity.1)),
        )
        .map_err(RuntimeError::Client)?
        .with_timeout(self.config.probe_timeout))
    }

    async fn probe(
        &self,
        t: &mut Tenant,
        plan: &ControlPlanePlan,
    ) -> Result<ControlPlaneStatus, RuntimeError> {
        // Clients are made once per replica and bundle (parsing the identity and building
        // the TLS configuration is most of a probe's cost).
        let digest = t.layout.digest();
        if t.clients.0 != digest {
            t.clients = (digest, HashMap::new());
        }
        for r in &t.replicas {
            if let Entry::Vacant(v) = t.clients.1.entry(r.addr) {
                v.insert(self.probe_client(&t.layout, plan, r.addr)?);
            }
        }
        let clients = t.clients.1.clone();
        let client_for = |addr: SocketAddr| -> Result<Client, RuntimeError> {
            match clients.get(&addr) {
                Some(c) => Ok(c.clone()),
                None => self.probe_client(&t.layout, plan, addr),
            }
        };
        let mut replicas = Vec::new();
        let mut ready_apiservers = Vec::new();
        for r in &t.replicas {
            let process = r.supervisor.state();
            let state = match &process {
                ProcessState::Starting => ReplicaState::Starting,
                ProcessState::Stopped => ReplicaState::Stopped,
                ProcessState::Exited { .. } | ProcessState::SpawnFailed { .. } => {
                    ReplicaState::Restarting {
                        reason: process.to_string(),
                    }
                }
                ProcessState::Running { .. } if r.id.component == Component::ApiServer => {
                    match probe::readyz(&client_for(r.addr)?).await {
                        Ok(()) => {
                            ready_apiservers.push(r.addr);
                            ReplicaState::Ready
                        }
                        Err(e) => ReplicaState::NotReady(Arc::new(e)),
                    }
                }
                ProcessState::Running { .. } => ReplicaState::Ready,
            };
            replicas.push(ReplicaStatus {
                replica: r.id,
                state,
                restarts: process.restarts(),
                address: r.addr,
                pid: process.pid(),
            });
        }
        t.front.set_backends(ready_apiservers.clone());
        let mut leases = Vec::new();
        if let Some(addr) = ready_apiservers.first() {
            let client = client_for(*addr)?;
            if !t.bootstrapped.load(Ordering::Acquire)
                && crate::bootstrap::bind_cluster_admins(&client).await.is_ok()
            {
                t.bootstrapped.store(true, Ordering::Release);
            }
            for c in [Component::ControllerManager, Component::Scheduler] {
                let holder = match probe::lease(&client, "kube-system", c.binary()).await {
                    Ok(Some(l)) if l.is_current(SystemTime::now()) => Some(l.holder),
                    _ => None,
                };
                leases.push((c, holder));
            }
        } else {
            leases = unheld_leases();
        }
        Ok(ControlPlaneStatus {
            version: plan.version.clone(),
            endpoint: t.front.addr(),
            replicas,
            leases,
            queued: None,
        })
    }
}

/// What [`ProcessRuntime::start_tenant`] did.
enum Start {
    /// The tenant's processes run.
    Running(Box<Tenant>),
    /// It waits for its turn to boot.
    Queued(ControlPlaneStatus),
}

/// The controllers' Leases as reported when no api-server answers: held by nobody.
fn unheld_leases() -> Vec<(Component, Option<String>)> {
    vec![
        (Component::ControllerManager, None),
        (Component::Scheduler, None),
    ]
}

/// Each api-server with its controller-manager and scheduler, replica by replica.
fn replica_ids(replicas: usize) -> Vec<ReplicaId> {
    let mut ids: Vec<ReplicaId> = (0..replicas)
        .flat_map(|index| {
            Component::ALL
                .into_iter()
                .map(move |component| ReplicaId { component, index })
        })
        .collect();
    ids.sort();
    ids
}

/// What [`watch_boot`] watches: a booting tenant's api-servers.
struct Boot {
    apiservers: Vec<(SocketAddr, Client)>,
    front: Backends,
    bootstrapped: Arc<AtomicBool>,
    tenant: TenantId,
    changes: broadcast::Sender<TenantId>,
    until: tokio::time::Instant,
}

/// Every 100 ms while the tenant boots: tries the `kubeadm:cluster-admins` binding (the
/// api-server accepts it well before `/readyz` is ok, so admin.conf works from the first
/// moment it is served) and puts each api-server behind the front the moment its `/readyz`
/// is ok, telling the operator. Probes between reconciles would be up to a pass late.
async fn watch_boot(mut b: Boot) {
    while tokio::time::Instant::now() < b.until {
        if !b.bootstrapped.load(Ordering::Acquire) {
            for (_, c) in &b.apiservers {
                if crate::bootstrap::bind_cluster_admins(c).await.is_ok() {
                    b.bootstrapped.store(true, Ordering::Release);
                    break;
                }
            }
        }
        let mut answered = false;
        let mut booting = Vec::new();
        for (addr, c) in std::mem::take(&mut b.apiservers) {
            if probe::readyz(&c).await.is_ok() {
                b.front.add(addr);
                answered = true;
            } else {
                booting.push((addr, c));
            }
        }
        b.apiservers = booting;
        if answered {
            let _ = b.changes.send(b.tenant.clone());
        }
        if b.apiservers.is_empty() && b.bootstrapped.load(Ordering::Acquire) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The client certificate and key of one of the bundle's kubeconfigs.
fn identity(
    layout: &TenantLayout,
    kubeconfig: &'static str,
) -> Result<(String, String), RuntimeError> {
    let text = layout.pem(kubeconfig)?;
    let parts = kmetal_pki::bundle::parse_kubeconfig(kubeconfig, text).map_err(|e| {
        RuntimeError::Kubeconfig {
            kubeconfig,
            source: Box::new(e),
        }
    })?;
    Ok((parts.cert_pem, parts.key_pem))
}

#[async_trait::async_trait]
impl ControlPlaneRuntime for ProcessRuntime {
    async fn ensure(&self, plan: &ControlPlanePlan) -> Result<ControlPlaneStatus, RuntimeError> {
        // Refuse a version without binaries before touching what runs.
        for c in Component::ALL {
            self.config.catalog.binary(c, &plan.version)?;
        }
        loop {
            let slot = self.slot(&plan.tenant).await;
            let mut slot = slot.lock().await;
            if slot.removed {
                // Removed while this call waited: the map has a fresh slot now.
                continue;
            }
            let t = match &mut slot.tenant {
                Some(t) => {
                    self.update_tenant(t, plan).await?;
                    t
                }
                empty @ None => match self.start_tenant(plan).await? {
                    Start::Running(t) => empty.insert(*t),
                    Start::Queued(status) => return Ok(status),
                },
            };
            let status = self.probe(t, plan).await?;
            let booted = status.replicas_ready();
            if t.boot
                .as_ref()
                .is_some_and(|b| booted || b.elapsed() > self.config.boot_timeout)
            {
                t.boot = None;
            }
            t.status = Some(status.clone());
            return Ok(status);
        }
    }

    async fn ensure_etcd(&self, plan: &EtcdPlan) -> Result<EtcdStatus, RuntimeError> {
        let cluster = {
            let mut etcds = self.etcds.lock().await;
            match etcds.entry(plan.tenant.clone()) {
                Entry::Occupied(e) => e.get().clone(),
                Entry::Vacant(v) => {
                    let config = EtcdClusterConfig {
                        binary: self.config.etcd_binary.clone().unwrap_or_default(),
                        stop_grace: self.config.stop_grace,
                        replace_unresponsive_after: self.config.etcd_replace_unresponsive_after,
                    };
                    let layout =
                        TenantLayout::write(self.tenant_dir(&plan.tenant), plan.bundle.clone())?;
                    let cluster = EtcdCluster::start(plan, &config, layout, self.changes.clone())?;
                    v.insert(Arc::new(cluster)).clone()
                }
            }
        };
        // Outside the map's lock: a member being replaced holds up only its own tenant.
        cluster.update(plan).await?;
        Ok(cluster.status())
    }

    async fn status(&self, tenant: &TenantId) -> Option<ControlPlaneStatus> {
        let slot = self.tenants.lock().await.get(tenant)?.clone();
        let slot = slot.lock().await;
        slot.tenant.as_ref()?.status.clone()
    }

    async fn remove(&self, tenant: &TenantId) {
        self.gate.forget(tenant);
        let slot = self.tenants.lock().await.remove(tenant);
        if let Some(slot) = slot {
            let mut slot = slot.lock().await;
            slot.removed = true;
            if let Some(mut t) = slot.tenant.take() {
                for r in std::mem::take(&mut t.replicas) {
                    r.supervisor.stop(self.config.stop_grace).await;
                }
            }
        }
        let etcd = self.etcds.lock().await.remove(tenant);
        if let Some(etcd) = etcd {
            etcd.stop().await;
        }
        // Processes left by an earlier runtime that never ran this tenant again.
        let dir = self.tenant_dir(tenant);
        crate::supervisor::stop_orphans(&dir.join("run"), &dir, self.config.stop_grace).await;
        let _ = std::fs::remove_dir_all(dir);
    }

    async fn shutdown(&self) {
        let slots: Vec<_> = self.tenants.lock().await.drain().map(|(_, s)| s).collect();
        let mut all = Vec::new();
        for slot in slots {
            let mut slot = slot.lock().await;
            slot.removed = true;
            all.extend(slot.tenant.take());
        }
        let grace = self.config.stop_grace;
        let stops = all.into_iter().flat_map(|mut t| {
            std::mem::take(&mut t.replicas)
                .into_iter()
                .map(move |r| r.supervisor.stop(grace))
        });
        let mut set = tokio::task::JoinSet::new();
        for stop in stops {
            set.spawn(stop);
        }
        while set.join_next().await.is_some() {}
        // The api-servers are gone: their etcds may stop now.
        let etcds: Vec<Arc<EtcdCluster>> =
            self.etcds.lock().await.drain().map(|(_, c)| c).collect();
        for c in etcds {
            set.spawn(async move { c.stop().await });
        }
        while set.join_next().await.is_some() {}
    }

    fn changes(&self) -> broadcast::Receiver<TenantId> {
        self.changes.subscribe()
    }
}
