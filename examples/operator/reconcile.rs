//! Reconciling one TenantControlPlane, level-based and idempotent: the [`Reconciler`], its
//! per-tenant runtimes (datastore endpoint, Konnectivity server) and the finalizer. The
//! phases of one pass (validate → place → datastore → certificates → endpoint → migration →
//! Konnectivity → version → ready) live in `phases.rs`; every failure lands in a status
//! condition; deletion runs the finalizer.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use kmetal::core::meta::ConditionStatus;
use kmetal::core::tenant::{ReplicaPlacement, TenantControlPlaneStatus};
use kmetal::core::{Condition, DataStore, Phase, TenantControlPlane};
use kmetal::datastore::gateway::{Gateway as DatastoreGateway, GatewayTls, TlsHandle};
use kmetal::datastore::migrate::MigratableStore;
use kmetal::datastore::provision::{TenantSlice, generate_password};
use kmetal::pki::{Bundle, PkiSpec, RenewalPolicy};
use kmetal::runtime::{ControlPlaneRuntime, TenantId};
use kmetal::topology::model::{Resources, Topology};
use kmetal::topology::placement::{TenantRequest, place};
use kmetal::tunnel::{ConnectListener, Server, ServerConfig, tls};
use serde_json::json;
use tokio::sync::watch;

use crate::drivers::{Driver, DriverError, SliceConfig, datastore_identity};
use crate::phases::{Halt, Pass};
use crate::store::{FINALIZER, Kind, ObjectKey, Store, StoreError, now_rfc3339};

/// Operator-wide settings.
#[derive(Clone)]
pub struct Settings {
    /// The under cluster's topology (replicas are placed on its control-plane nodes).
    pub topology: Option<Arc<Topology>>,
    /// Where to write each tenant's PKI and kubeconfigs (kubeadm layout).
    pub out: Option<PathBuf>,
    /// Operator state: SQLite slices with relative paths, tunnel sockets.
    pub state_dir: PathBuf,
    /// The DataStore of tenants that name none.
    pub default_datastore: String,
    /// Renewal policy for tenant certificates.
    pub renewal: RenewalPolicy,
    /// The address each tenant's Konnectivity server takes agents on (port chosen per tenant).
    pub konnectivity_bind: std::net::IpAddr,
    /// What runs the tenants' control planes (`None`: nothing here does; see `--runtime`).
    pub runtime: Option<Arc<dyn ControlPlaneRuntime>>,
}

/// The result of one reconcile.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Ready,
    /// Not ready; the reason is in the conditions. Retried with backoff.
    NotReady(String),
    /// The object is gone (finalized or never existed).
    Gone,
}

/// Why a reconcile could not even record its result.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

struct Tunnel {
    server: Server,
    agent_addr: SocketAddr,
    connect_uds: PathBuf,
    /// The gRPC frontend the tenant's api-servers dial (Kamaji's egress mode).
    grpc_uds: PathBuf,
    ca_fingerprint: String,
    stop: watch::Sender<bool>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        let _ = std::fs::remove_file(&self.connect_uds);
        let _ = std::fs::remove_file(&self.grpc_uds);
    }
}

/// A tenant's etcd endpoint: the gateway serving its slice through a store that a
/// migration can switch underneath it.
pub(crate) struct Endpoint {
    addr: SocketAddr,
    live: Arc<MigratableStore>,
    /// The DataStore the live store's backend belongs to.
    pub(crate) data_store: String,
    /// Its TLS, replaced when a renewal or rotation changes the certificates.
    tls: TlsHandle,
    /// What `tls` was made from.
    tls_fingerprint: String,
    stop: watch::Sender<bool>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// The reconciler shared by every worker of one operator process.
pub struct Reconciler {
    store: Store,
    pub(crate) settings: Settings,
    tunnels: Mutex<HashMap<ObjectKey, Tunnel>>,
    pub(crate) endpoints: tokio::sync::Mutex<HashMap<ObjectKey, Endpoint>>,
    /// Where this controller announces the runtimes it serves (long-running controllers).
    pub(crate) registry: Option<Arc<crate::runtime::Registry>>,
    drivers: tokio::sync::Mutex<HashMap<String, (i64, Arc<Driver>)>>,
    placements: tokio::sync::Mutex<BTreeMap<ObjectKey, Placed>>,
}

pub(crate) fn set_condition(
    status: &mut TenantControlPlaneStatus,
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
) {
    let want = if ok {
        ConditionStatus::True
    } else {
        ConditionStatus::False
    };
    if let Some(c) = status.conditions.iter_mut().find(|c| c.type_ == type_) {
        if c.status != want {
            c.last_transition_time = Some(now_rfc3339());
        }
        c.status = want;
        c.reason = reason.into();
        c.message = message;
        return;
    }
    status.conditions.push(Condition {
        type_: type_.into(),
        status: want,
        reason: reason.into(),
        message,
        last_transition_time: Some(now_rfc3339()),
        observed_generation: None,
    });
}

pub(crate) fn set_phase(status: &mut TenantControlPlaneStatus, phase: Phase) {
    status.kubernetes_resources.version.status = Some(phase);
}

/// Resources one api-server replica asks for, from `spec.controlPlane.deployment.resources`
/// (defaults when absent).
/// Where a tenant's replicas and dedicated etcd members went.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Placed {
    /// Control-plane replicas (`status.replicas`).
    pub(crate) replicas: Vec<ReplicaPlacement>,
    /// Dedicated etcd members (`status.storage.dedicatedEtcd`), named after their nodes.
    pub(crate) etcd: Vec<ReplicaPlacement>,
}

fn replica_resources(tcp: &TenantControlPlane) -> Resources {
    let mut r = Resources {
        cpu: 0.25,
        memory_gib: 0.5,
        pods: 1,
    };
    let req = tcp
        .spec
        .control_plane
        .deployment
        .resources
        .as_ref()
        .and_then(|c| c.api_server.as_ref())
        .map(|a| a["requests"].clone());
    if let Some(req) = req {
        if let Some(cpu) = req["cpu"].as_str().and_then(parse_cpu) {
            r.cpu = cpu;
        }
        if let Some(mem) = req["memory"].as_str().and_then(parse_gib) {
            r.memory_gib = mem;
        }
    }
    r
}

fn parse_cpu(s: &str) -> Option<f64> {
    match s.strip_suffix('m') {
        Some(m) => m.parse::<f64>().ok().map(|m| m / 1000.0),
        None => s.parse().ok(),
    }
}

fn parse_gib(s: &str) -> Option<f64> {
    let units = [
        ("Ki", 1.0 / 1048576.0),
        ("Mi", 1.0 / 1024.0),
        ("Gi", 1.0),
        ("Ti", 1024.0),
    ];
    for (u, f) in units {
        if let Some(n) = s.strip_suffix(u) {
            return n.parse::<f64>().ok().map(|n| n * f);
        }
    }
    s.parse::<f64>().ok().map(|b| b / 1073741824.0)
}

impl Reconciler {
    pub fn new(
        store: Store,
        settings: Settings,
        registry: Option<Arc<crate::runtime::Registry>>,
    ) -> Self {
        Self {
            store,
            settings,
            registry,
            tunnels: Mutex::default(),
            endpoints: tokio::sync::Mutex::default(),
            drivers: tokio::sync::Mutex::default(),
            placements: tokio::sync::Mutex::default(),
        }
    }

    /// Stops every control plane this operator runs (their files stay).
    pub async fn shutdown(&self) {
        if let Some(rt) = &self.settings.runtime {
            rt.shutdown().await;
        }
    }

    /// Agents connected to a tenant's Konnectivity server, by tenant.
    pub fn agents_connected(&self) -> Vec<(ObjectKey, usize)> {
        let t = self.tunnels.lock().unwrap_or_else(|e| e.into_inner());
        t.iter()
            .map(|(k, v)| (k.clone(), v.server.stats().agents))
            .collect()
    }

    /// The unix socket of `key`'s gRPC Konnectivity frontend, once its tunnel runs.
    pub(crate) fn egress_socket(&self, key: &ObjectKey) -> Option<PathBuf> {
        let t = self.tunnels.lock().unwrap_or_else(|e| e.into_inner());
        t.get(key).map(|t| t.grpc_uds.clone())
    }

    /// The address agents of `key` dial, once its tunnel runs.
    pub fn agent_address(&self, key: &ObjectKey) -> Option<SocketAddr> {
        let t = self.tunnels.lock().unwrap_or_else(|e| e.into_inner());
        t.get(key).map(|t| t.agent_addr)
    }

    async fn driver(&self, name: &str) -> Result<Arc<Driver>, DriverError> {
        let key = ObjectKey::new(Kind::DataStore, None, name);
        let stored = self
            .store
            .get(&key)
            .await?
            .ok_or_else(|| DriverError::Missing(name.into()))?;
        let mut cache = self.drivers.lock().await;
        if let Some((rev, d)) = cache.get(name) {
            if *rev == stored.revision {
                return Ok(d.clone());
            }
        }
        let ds = DataStore::from_value(stored.value.clone())
            .map_err(|_| DriverError::Missing(name.into()))?;
        let d = Arc::new(Driver::connect(&ds, &self.store, &self.settings.state_dir).await?);
        cache.insert(name.to_string(), (stored.revision, d.clone()));
        Ok(d)
    }

    /// Places the tenant's replicas (and its dedicated etcd members), keeping an existing
    /// placement; other tenants' replicas and members hold their capacity.
    pub(crate) async fn place(
        &self,
        key: &ObjectKey,
        tcp: &TenantControlPlane,
        existing: &Placed,
    ) -> Result<Placed, String> {
        let replicas = tcp
            .spec
            .control_plane
            .deployment
            .replicas
            .unwrap_or(2)
            .max(0) as u32;
        let members = tcp
            .dedicated_etcd_members()
            .map_err(|e| e.to_string())?
            .unwrap_or(0);
        let name = tcp.metadata.name.clone().unwrap_or_default();
        let fits =
            |p: &Placed| p.replicas.len() == replicas as usize && p.etcd.len() == members as usize;
        let Some(topo) = &self.settings.topology else {
            // Without a topology, keep what a run with one decided.
            if fits(existing) {
                return Ok(existing.clone());
            }
            let unscheduled = |name: String| ReplicaPlacement {
                name,
                node: "unscheduled".into(),
                zone: String::new(),
            };
            return Ok(Placed {
                replicas: (0..replicas)
                    .map(|i| unscheduled(format!("{name}-{i}")))
                    .collect(),
                etcd: (0..members)
                    .map(|i| unscheduled(format!("etcd-{i}")))
                    .collect(),
            });
        };
        let mut book = self.placements.lock().await;
        if let Some(p) = book.get(key)
            && fits(p)
        {
            return Ok(p.clone());
        }
        if fits(existing) && !existing.replicas.iter().any(|r| r.node == "unscheduled") {
            book.insert(key.clone(), existing.clone());
            return Ok(existing.clone());
        }
        book.remove(key);
        let need = replica_resources(tcp);
        let mut req = TenantRequest::new(name.clone(), replicas);
        req.resources = need;
        req.etcd_members = members;
        let mut t = (**topo).clone();
        for placed in book.values() {
            for (list, res) in [
                (&placed.replicas, &need),
                (&placed.etcd, &req.etcd_resources),
            ] {
                for r in list {
                    if let Some(n) = t.nodes.iter_mut().find(|n| n.name == r.node) {
                        n.capacity = n.capacity.minus(res);
                    }
                }
            }
        }
        let seed = key
            .name
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
        let result = place(&t, &[req], seed);
        if let Some(f) = result.failed.first() {
            return Err(f.reason.clone());
        }
        let Some(p) = result.placed.first() else {
            return Err("placement returned nothing".into());
        };
        let on = |n: usize, name: String| {
            let node = &t.nodes[n];
            ReplicaPlacement {
                name,
                node: node.name.clone(),
                zone: t.zones[node.zone].name.clone(),
            }
        };
        let out = Placed {
            replicas: p
                .replicas
                .iter()
                .enumerate()
                .map(|(i, &n)| on(n, format!("{name}-{i}")))
                .collect(),
            // A member is named after its node: one member per node, and the name says where.
            etcd: p
                .etcd
                .iter()
                .map(|&n| on(n, t.nodes[n].name.clone()))
                .collect(),
        };
        book.insert(key.clone(), out.clone());
        Ok(out)
    }

    /// Reconciles one tenant.
    pub async fn reconcile(&self, key: &ObjectKey) -> Result<Outcome, ReconcileError> {
        let Some(stored) = self.store.get(key).await? else {
            self.release(key).await;
            self.placements.lock().await.remove(key);
            return Ok(Outcome::Gone);
        };
        let decoded = TenantControlPlane::decode(stored.value.clone());
        let mut tcp = decoded.object;
        let status = tcp.status.clone().unwrap_or_default();
        if tcp.metadata.deletion_timestamp.is_some() {
            return self.finalize(key, &tcp, status).await;
        }
        let generation = tcp.metadata.generation;
        let mut pass = Pass {
            key,
            stored,
            status,
            placed_etcd: Vec::new(),
        };
        let halted = self.phases(&mut pass, &mut tcp, &decoded.problems).await;
        let Pass { stored, status, .. } = pass;
        match halted {
            Ok(()) | Err(Halt::Ready) => {
                self.finish(key, stored, status, generation, true, "").await
            }
            Err(Halt::NotReady(reason)) => {
                self.finish(key, stored, status, generation, false, reason)
                    .await
            }
            Err(Halt::Conflict) => Ok(Outcome::NotReady("conflict".into())),
            Err(Halt::Store(e)) => Err(e),
        }
    }

    /// Records an intermediate status (a phase others should see while work goes on).
    pub(crate) async fn checkpoint(
        &self,
        key: &ObjectKey,
        stored: &mut crate::store::Stored,
        status: &TenantControlPlaneStatus,
    ) -> Result<bool, ReconcileError> {
        let mut v = stored.value.clone();
        v["status"] = serde_json::to_value(status).unwrap_or(json!({}));
        match self.store.put_at(key, &v, stored.revision).await? {
            Some(rev) => {
                stored.value = v;
                stored.revision = rev;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn finish(
        &self,
        key: &ObjectKey,
        stored: crate::store::Stored,
        mut status: TenantControlPlaneStatus,
        generation: Option<i64>,
        ready: bool,
        reason: &str,
    ) -> Result<Outcome, ReconcileError> {
        if !ready {
            set_condition(&mut status, "Ready", false, "NotReady", reason.into());
        }
        status.observed_generation = generation;
        let mut v = stored.value.clone();
        v["status"] = serde_json::to_value(&status).unwrap_or(json!({}));
        if v != stored.value && !self.store.put_if(key, &v, stored.revision).await? {
            // Changed while we worked: the watch delivers the change; reconcile again.
            return Ok(Outcome::NotReady("conflict".into()));
        }
        Ok(if ready {
            Outcome::Ready
        } else {
            Outcome::NotReady(reason.into())
        })
    }

    fn slice_of(tcp: &TenantControlPlane, password: String) -> TenantSlice {
        TenantSlice::with_password(
            tcp.spec.data_store_schema.clone().unwrap_or_default(),
            tcp.spec.data_store_username.clone().unwrap_or_default(),
            password,
        )
    }

    /// Provisions the tenant's slice on `ds_name`, keeping the password of an earlier run.
    pub async fn provision(
        &self,
        key: &ObjectKey,
        tcp: &TenantControlPlane,
        ds_name: &str,
    ) -> Result<SliceConfig, DriverError> {
        let ns = key.namespace.as_deref().unwrap_or("default");
        let secret_name = format!("{}-datastore-config", key.name);
        let existing = self.store.secret(ns, &secret_name).await?;
        if let Some(c) = &existing {
            if c.get("dataStore").map(String::as_str) == Some(ds_name) {
                return Ok(c.clone());
            }
        }
        let password = existing
            .as_ref()
            .and_then(|c| c.get("password").cloned())
            .unwrap_or_else(generate_password);
        let driver = self.driver(ds_name).await?;
        let mut c = driver
            .provision(ds_name, &Self::slice_of(tcp, password))
            .await?;
        c.insert("dataStore".into(), ds_name.into());
        // During a migration the old slice's settings stay readable until cut-over.
        if existing.is_none() {
            self.store
                .put_secret(ns, &secret_name, &key.name, &c)
                .await?;
        }
        Ok(c)
    }

    /// Records `c` as the tenant's slice (after a migration's cut-over).
    pub async fn record_slice(&self, key: &ObjectKey, c: &SliceConfig) -> Result<(), StoreError> {
        let ns = key.namespace.as_deref().unwrap_or("default");
        self.store
            .put_secret(ns, &format!("{}-datastore-config", key.name), &key.name, c)
            .await
    }

    /// The tenant's slice settings as recorded.
    pub async fn slice_config(&self, key: &ObjectKey) -> Result<Option<SliceConfig>, StoreError> {
        let ns = key.namespace.as_deref().unwrap_or("default");
        self.store
            .secret(ns, &format!("{}-datastore-config", key.name))
            .await
    }

    /// Removes a slice of `ds_name`.
    pub async fn deprovision(
        &self,
        tcp: &TenantControlPlane,
        ds_name: &str,
    ) -> Result<(), DriverError> {
        let driver = self.driver(ds_name).await?;
        driver
            .deprovision(ds_name, &Self::slice_of(tcp, String::new()))
            .await
    }

    /// Loads or issues the tenant's bundle; renews what the policy says is due.
    pub(crate) async fn pki(
        &self,
        key: &ObjectKey,
        tcp: &TenantControlPlane,
        ds_name: Option<&str>,
    ) -> Result<Bundle, String> {
        let ns = key.namespace.as_deref().unwrap_or("default");
        let name = format!("{}-pki", key.name);
        let now = SystemTime::now();
        if let Some(map) = self
            .store
            .secret(ns, &name)
            .await
            .map_err(|e| kmetal::Report(&e).to_string())?
        {
            let mut bundle = Bundle::from_secret_map(&map)
                .map_err(|e| format!("secret {ns}/{name}: {}", kmetal::Report(&e)))?;
            let rotation = tcp
                .metadata
                .annotations
                .get(crate::lifecycle::ROTATE_CA)
                .cloned();
            let changed = crate::lifecycle::certificates(
                &mut bundle,
                &self.settings.renewal,
                rotation.as_deref(),
                now,
            )?;
            if changed {
                self.store
                    .put_secret(ns, &name, &key.name, &bundle.to_secret_map())
                    .await
                    .map_err(|e| kmetal::Report(&e).to_string())?;
            }
            return Ok(bundle);
        }
        let mut spec = PkiSpec::from_tenant(tcp).map_err(|e| kmetal::Report(&e).to_string())?;
        // Kamaji's model for etcd: the tenant authenticates with a client certificate (CN =
        // its etcd user) signed by the DataStore's CA. A dedicated etcd (no DataStore) trusts
        // the bundle's own etcd CA instead.
        let driver = match ds_name {
            Some(ds) => Some(
                self.driver(ds)
                    .await
                    .map_err(|e| kmetal::Report(&e).to_string())?,
            ),
            None => None,
        };
        if let Some((cert, key)) = driver.as_ref().and_then(|d| d.signing_ca()) {
            spec.datastore = Some(kmetal::pki::spec::DatastoreIssuer {
                user: tcp.spec.data_store_username.clone().unwrap_or_default(),
                ca_cert_pem: cert.clone(),
                ca_key_pem: key.clone(),
            });
        }
        let bundle = Bundle::generate(&spec).map_err(|e| kmetal::Report(&e).to_string())?;
        self.store
            .put_secret(ns, &name, &key.name, &bundle.to_secret_map())
            .await
            .map_err(|e| kmetal::Report(&e).to_string())?;
        Ok(bundle)
    }

    /// Starts the tenant's Konnectivity server, or restarts it when its CA bundle changed.
    pub(crate) async fn ensure_tunnel(
        &self,
        key: &ObjectKey,
        bundle: &Bundle,
    ) -> Result<SocketAddr, String> {
        // What the listener's TLS is built from: a rotation changes it, and then the
        // server restarts with the new trust and certificate.
        let fingerprint = format!(
            "{}{}",
            tls::trust(bundle).unwrap_or_default(),
            bundle.get(tls::SERVER_CERT).unwrap_or_default()
        );
        {
            let t = self.tunnels.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = t.get(key) {
                if t.ca_fingerprint == fingerprint {
                    return Ok(t.agent_addr);
                }
            }
        }
        self.stop_tunnel(key);
        let agent_tls = tls::agent_listener(bundle).map_err(|e| kmetal::Report(&e).to_string())?;
        let listener = tokio::net::TcpListener::bind((self.settings.konnectivity_bind, 0))
            .await
            .map_err(|e| format!("binding the agent listener: {}", kmetal::Report(&e)))?;
        let agent_addr = listener
            .local_addr()
            .map_err(|e| kmetal::Report(&e).to_string())?;
        let dir = self.settings.state_dir.join("konnectivity");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let uid_short: String = key.name.chars().take(40).collect();
        let connect_uds = dir.join(format!("{uid_short}.sock"));
        let _ = std::fs::remove_file(&connect_uds);
        let uds = tokio::net::UnixListener::bind(&connect_uds)
            .map_err(|e| format!("binding {}: {e}", connect_uds.display()))?;
        let grpc_uds = dir.join(format!("{uid_short}-grpc.sock"));
        let _ = std::fs::remove_file(&grpc_uds);
        let grpc = tokio::net::UnixListener::bind(&grpc_uds)
            .map_err(|e| format!("binding {}: {e}", grpc_uds.display()))?;
        let server = Server::new(ServerConfig::new(format!("kmetal-{}", key.name), 1));
        let (stop, rx) = watch::channel(false);
        let stopped = move |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let s = server.clone();
        let r = rx.clone();
        tokio::spawn(async move { s.serve_agents(listener, agent_tls, stopped(r)).await });
        let s = server.clone();
        let r = rx.clone();
        tokio::spawn(async move {
            s.serve_connect(ConnectListener::Unix(uds), stopped(r))
                .await
        });
        let s = server.clone();
        tokio::spawn(async move { s.serve_proxy_grpc(grpc, stopped(rx)).await });
        self.tunnels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                key.clone(),
                Tunnel {
                    server,
                    agent_addr,
                    connect_uds,
                    grpc_uds,
                    ca_fingerprint: fingerprint,
                    stop,
                },
            );
        Ok(agent_addr)
    }

    /// Starts the tenant's etcd endpoint over `cfg`'s slice (mTLS with the tenant's etcd CA:
    /// the api-server presents `apiserver-etcd-client`, as against a kubeadm etcd).
    pub(crate) async fn ensure_gateway(
        &self,
        key: &ObjectKey,
        bundle: &Bundle,
        cfg: &SliceConfig,
    ) -> Result<(SocketAddr, Arc<MigratableStore>), String> {
        let ds = cfg.get("dataStore").cloned().unwrap_or_default();
        let file = |f: &str| {
            bundle
                .get(f)
                .map(str::to_string)
                .ok_or_else(|| format!("{f} missing from the tenant's PKI"))
        };
        // Both etcd CAs while a rotation overlaps: api-servers restarted with the new client
        // certificate and those not yet restarted both get in.
        let client_ca = file("pki/etcd/ca-bundle.crt").or_else(|_| file("pki/etcd/ca.crt"))?;
        let tls = GatewayTls {
            cert_pem: file("pki/etcd/server.crt")?,
            key_pem: file("pki/etcd/server.key")?,
            client_ca_pem: Some(client_ca),
        };
        let fingerprint = format!(
            "{}{}",
            tls.cert_pem,
            tls.client_ca_pem.as_deref().unwrap_or_default()
        );
        let mut endpoints = self.endpoints.lock().await;
        if let Some(e) = endpoints.get_mut(key) {
            if e.data_store == ds {
                if e.tls_fingerprint != fingerprint {
                    // Renewed or rotated certificates: new handshakes get them, on the same
                    // address, while the api-servers roll.
                    e.tls
                        .replace(&tls)
                        .map_err(|e| kmetal::Report(&e).to_string())?;
                    e.tls_fingerprint = fingerprint;
                }
                return Ok((e.addr, e.live.clone()));
            }
            // Another controller migrated the tenant: serve the new slice.
            endpoints.remove(key);
        }
        let handle = TlsHandle::new(&tls).map_err(|e| kmetal::Report(&e).to_string())?;
        let backend = crate::drivers::open_slice(&ds, cfg, datastore_identity(bundle))
            .await
            .map_err(|e| kmetal::Report(&e).to_string())?;
        let live = Arc::new(MigratableStore::new(backend));
        let listener = self.endpoint_listener(key).await?;
        let addr = listener
            .local_addr()
            .map_err(|e| kmetal::Report(&e).to_string())?;
        let (stop, mut rx) = watch::channel(false);
        let gateway = DatastoreGateway::new(live.clone() as Arc<dyn kmetal::datastore::Datastore>);
        let serving = handle.clone();
        tokio::spawn(async move {
            let stopped = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = gateway
                .serve_on_with(listener, Some(serving), stopped)
                .await
            {
                tracing::warn!(error = %e, "datastore endpoint stopped");
            }
        });
        endpoints.insert(
            key.clone(),
            Endpoint {
                addr,
                live: live.clone(),
                data_store: ds,
                tls: handle,
                tls_fingerprint: fingerprint,
                stop,
            },
        );
        Ok((addr, live))
    }

    /// The listener of `key`'s etcd endpoint: on the address it had before (kept under the
    /// state dir), so api-servers that outlived an operator restart find it again and are
    /// adopted unchanged; a free port the first time or when that one is taken.
    async fn endpoint_listener(&self, key: &ObjectKey) -> Result<tokio::net::TcpListener, String> {
        let dir = self.settings.state_dir.join("endpoints");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let ns = key.namespace.as_deref().unwrap_or("default");
        let file = dir.join(format!("{ns}_{}.addr", key.name));
        let before: Option<SocketAddr> = std::fs::read_to_string(&file)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        if let Some(addr) = before
            && let Ok(l) = tokio::net::TcpListener::bind(addr).await
        {
            return Ok(l);
        }
        // Below the ephemeral range, so after an operator restart no outgoing connection
        // holds the recorded port and the api-servers' flags stay the same.
        let bind = async {
            let port = kmetal_runtime::ports::free_port()?;
            tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port)).await
        };
        let l = bind
            .await
            .map_err(|e| format!("binding the datastore endpoint: {}", kmetal::Report(&e)))?;
        let addr = l.local_addr().map_err(|e| kmetal::Report(&e).to_string())?;
        std::fs::write(&file, addr.to_string()).map_err(|e| format!("{}: {e}", file.display()))?;
        Ok(l)
    }

    async fn stop_gateway(&self, key: &ObjectKey) {
        self.endpoints.lock().await.remove(key);
    }

    pub(crate) async fn announce(&self, key: &ObjectKey, agents: &SocketAddr) {
        let Some(reg) = &self.registry else { return };
        let endpoint = self.endpoints.lock().await.get(key).map(|e| e.addr);
        if let Some(endpoint) = endpoint {
            if let Err(e) = reg
                .announce(key, &format!("https://{endpoint}"), &agents.to_string())
                .await
            {
                tracing::warn!(tenant = %key.display(), error = %e, "announcing the runtime failed");
            }
        }
    }

    /// Stops serving `key` here and says so: its control plane, tunnel and etcd endpoint.
    async fn release(&self, key: &ObjectKey) {
        if let Some(rt) = &self.settings.runtime {
            let ns = key.namespace.as_deref().unwrap_or("default");
            rt.remove(&TenantId::new(ns, &key.name)).await;
        }
        self.stop_tunnel(key);
        self.stop_gateway(key).await;
        if let Some(reg) = &self.registry {
            reg.withdraw(key).await;
        }
    }

    /// A standby's share: serve the tenant's runtime (etcd endpoint, Konnectivity server)
    /// from what the leader recorded, writing nothing but the announcement; stop while it
    /// migrates or once it is deleted.
    pub async fn serve_runtime(&self, key: &ObjectKey) -> Result<(), String> {
        let Some(stored) = self
            .store
            .get(key)
            .await
            .map_err(|e| kmetal::Report(&e).to_string())?
        else {
            self.release(key).await;
            return Ok(());
        };
        let tcp = TenantControlPlane::decode(stored.value.clone()).object;
        let phase = tcp.phase();
        let serving = matches!(
            phase,
            Phase::Ready | Phase::Upgrading | Phase::CertificateAuthorityRotating
        );
        if tcp.metadata.deletion_timestamp.is_some() || !serving {
            self.release(key).await;
            return Ok(());
        }
        let ns = key.namespace.as_deref().unwrap_or("default");
        let Some(map) = self
            .store
            .secret(ns, &format!("{}-pki", key.name))
            .await
            .map_err(|e| kmetal::Report(&e).to_string())?
        else {
            return Ok(());
        };
        let bundle = Bundle::from_secret_map(&map).map_err(|e| kmetal::Report(&e).to_string())?;
        let Some(cfg) = self
            .slice_config(key)
            .await
            .map_err(|e| kmetal::Report(&e).to_string())?
        else {
            return Ok(());
        };
        self.ensure_gateway(key, &bundle, &cfg).await?;
        let agents = self.ensure_tunnel(key, &bundle).await?;
        self.announce(key, &agents).await;
        Ok(())
    }

    fn stop_tunnel(&self, key: &ObjectKey) {
        let t = self
            .tunnels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        drop(t);
    }

    /// The finalizer: tunnel, datastore slice, secrets; then the object itself.
    async fn finalize(
        &self,
        key: &ObjectKey,
        tcp: &TenantControlPlane,
        mut status: TenantControlPlaneStatus,
    ) -> Result<Outcome, ReconcileError> {
        self.release(key).await;
        self.placements.lock().await.remove(key);
        let mut tcp = tcp.clone();
        tcp.apply_defaults();
        let ds = status
            .storage
            .data_store_name
            .clone()
            .or_else(|| tcp.spec.data_store.clone())
            .unwrap_or_else(|| self.settings.default_datastore.clone());
        // A dedicated etcd went with the tenant's processes; no DataStore holds a slice.
        let dedicated = matches!(tcp.dedicated_etcd_members(), Ok(Some(_)));
        if !dedicated && let Err(e) = self.deprovision(&tcp, &ds).await {
            set_condition(
                &mut status,
                "Ready",
                false,
                "DeprovisionFailed",
                e.to_string(),
            );
            let stored = self.store.get(key).await?;
            if let Some(stored) = stored {
                let mut v = stored.value.clone();
                v["status"] = serde_json::to_value(&status).unwrap_or(json!({}));
                let _ = self.store.put_if(key, &v, stored.revision).await?;
            }
            return Ok(Outcome::NotReady(format!("deprovision: {e}")));
        }
        let ns = key.namespace.as_deref().unwrap_or("default");
        self.store.delete_secrets_of(ns, &key.name).await?;
        if let Some(out) = &self.settings.out {
            let _ = std::fs::remove_dir_all(out.join(&key.name));
        }
        // Drop our finalizer; the object goes when no finalizer is left.
        let Some(stored) = self.store.get(key).await? else {
            return Ok(Outcome::Gone);
        };
        let mut v = stored.value.clone();
        let rest: Vec<serde_json::Value> = v["metadata"]["finalizers"]
            .as_array()
            .map(|f| {
                f.iter()
                    .filter(|x| x.as_str() != Some(FINALIZER))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let gone = if rest.is_empty() {
            self.store.delete_if(key, stored.revision).await?
        } else {
            v["metadata"]["finalizers"] = json!(rest);
            self.store.put_if(key, &v, stored.revision).await?
        };
        Ok(if gone {
            Outcome::Gone
        } else {
            Outcome::NotReady("conflict".into())
        })
    }
}

/// Writes the bundle to `out/<name>`, each file replaced whole (the rotation files a
/// finished CA rotation no longer has are removed).
pub(crate) fn write_out(bundle: &Bundle, out: &std::path::Path, name: &str) -> Result<(), String> {
    // Not a fresh folder swapped in: kubectl reading admin.conf meanwhile would miss it.
    bundle
        .write_dir(&out.join(name))
        .map_err(|e| kmetal::Report(&e).to_string())
}

/// How long to wait before retrying a tenant that is not ready, after `failures` attempts.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_millis(200u64.saturating_mul(1 << failures.min(8))).min(Duration::from_secs(30))
}
