//! `run`: lead the region (or stand by), watch the management store and reconcile (workers,
//! requeue with backoff, periodic resync), or with `--once` reconcile to convergence and
//! report; and the no-argument demo.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kmetal::datastore::model::{RangeRequest, WatchRequest};
use kmetal::pki::RenewalPolicy;
use kmetal::topology::model::Topology;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::Format;
use crate::observe::Metrics;
use crate::reconcile::{Outcome, Reconciler, Settings, backoff};
use crate::shutdown::shutdown_signal;
use crate::status::{TenantRow, tenants_table};
use crate::store::{Kind, ObjectKey, PREFIX, Store, Stored};

/// How soon a tenant whose processes are starting is looked at again.
const IN_PROGRESS_POLL: Duration = Duration::from_millis(250);

/// How often a tenant waiting its turn to boot is looked at anyway (the runtime tells when
/// its turn comes; this keeps its place, which the runtime gives away after a minute).
const QUEUED_POLL: Duration = Duration::from_secs(15);

/// The label that assigns a tenant to a region (unlabelled tenants belong to `default`).
pub const REGION_LABEL: &str = "kmetal.io/region";

#[derive(clap::Args)]
pub struct RunArgs {
    /// Reconcile to convergence, print the status and exit (1 if any tenant is not Ready).
    #[arg(long)]
    once: bool,
    /// Management store URL.
    #[arg(long, default_value = crate::DEFAULT_STATE)]
    state: String,
    /// The under cluster's topology (YAML); replicas are placed on its control-plane nodes.
    #[arg(long)]
    topology: Option<PathBuf>,
    /// Serve /metrics, /healthz and /readyz on this address.
    #[arg(long)]
    listen: Option<String>,
    /// Write each tenant's PKI and kubeconfigs here (kubeadm layout, one folder per tenant).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Status output of `--once`.
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// The DataStore of tenants that name none.
    #[arg(long, default_value = "default")]
    default_datastore: String,
    /// Folder for operator state (relative SQLite slices, Konnectivity sockets).
    #[arg(long, default_value = "kmetal-state")]
    state_dir: PathBuf,
    /// Concurrent reconciles.
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// `--once` gives up after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// The region this controller serves (tenants labelled `kmetal.io/region: NAME`). One
    /// controller per region leads at a time; the others stand by.
    #[arg(long, default_value = "default")]
    region: String,
    /// This controller's identity in leader election (default: host name and process id).
    #[arg(long)]
    identity: Option<String>,
    /// Seconds a leader's lease lasts without renewal (a successor waits at most this long).
    #[arg(long, default_value_t = 10)]
    lease_ttl: u64,
    /// What runs the tenants' control planes: `process` runs kube-apiserver, controller-manager
    /// and scheduler here (Ready means they answer); `none` runs nothing (Ready means
    /// provisioned: datastore, PKI and Konnectivity; the api-servers run elsewhere).
    #[arg(long, value_enum, default_value = "process")]
    runtime: RuntimeKind,
    /// A folder of Kubernetes binaries (kube-apiserver, kube-controller-manager,
    /// kube-scheduler); repeat for several versions. Default: $KMETAL_PEERS_BIN, else the
    /// repository's peers/bin (built by scripts/peers.sh).
    #[arg(long = "kubernetes-bin")]
    kubernetes_bin: Vec<PathBuf>,
    /// How many tenants' control planes may boot at once (the rest wait their turn, with a
    /// `StartQueued` condition). Default: one per CPU.
    #[arg(long)]
    boot_limit: Option<usize>,
    /// The address tenants' Konnectivity servers take agents on (workers must reach it and
    /// it must be among the tenants' certSANs unless it is their address).
    #[arg(long, default_value = "127.0.0.1")]
    konnectivity_listen: std::net::IpAddr,
}

/// `--runtime`.
#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq, Debug)]
pub enum RuntimeKind {
    /// Supervised local processes.
    Process,
    /// No control planes run here.
    None,
}

/// `--kubernetes-bin`, or its default.
fn kubernetes_dirs(args: &RunArgs) -> Vec<PathBuf> {
    if args.kubernetes_bin.is_empty() {
        vec![std::env::var_os("KMETAL_PEERS_BIN").map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/bin"),
            PathBuf::from,
        )]
    } else {
        args.kubernetes_bin.clone()
    }
}

/// The control-plane runtime `args` ask for.
fn control_plane_runtime(
    args: &RunArgs,
) -> Result<Option<Arc<dyn kmetal::runtime::ControlPlaneRuntime>>, String> {
    if args.runtime == RuntimeKind::None {
        return Ok(None);
    }
    let catalog = kmetal::runtime::Catalog::discover(kubernetes_dirs(args))
        .map_err(|e| format!("--kubernetes-bin: {}", kmetal::Report(&e)))?;
    let dirs = kubernetes_dirs(args);
    let mut config =
        kmetal::runtime::ProcessRuntimeConfig::new(args.state_dir.join("control-planes"), catalog);
    // Dedicated etcds run the etcd 3.6 that scripts/peers.sh builds beside Kubernetes.
    config.etcd_binary = dirs
        .iter()
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
        .or_else(|| dirs.first().map(|d| d.join("etcd")));
    if let Some(n) = args.boot_limit {
        config.boot_limit = n;
    }
    Ok(Some(Arc::new(kmetal::runtime::ProcessRuntime::new(config))))
}

pub fn init_logs() {
    let level = match std::env::var("KMETAL_LOG").as_deref() {
        Ok("debug") => tracing::Level::DEBUG,
        Ok("info") => tracing::Level::INFO,
        _ => tracing::Level::WARN,
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_target(false)
        .init();
}

fn identity(args: &RunArgs) -> String {
    args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    })
}

/// The reconciler (writing through `fence`: only while this process leads the region) and
/// the plain store.
async fn reconciler(
    args: &RunArgs,
    fence: Option<String>,
    serve_replicas: bool,
) -> Result<(Arc<Reconciler>, Store), String> {
    let store = crate::open_store(&args.state).await?;
    // Long-running controllers serve tenant runtimes as replicas and announce them.
    let registry = match (&fence, serve_replicas) {
        (Some(id), true) => Some(crate::runtime::Registry::start(
            store.datastore().clone(),
            id.clone(),
            Duration::from_secs(args.lease_ttl),
        )),
        _ => None,
    };
    let writer = match fence {
        Some(id) => store.fenced(crate::leader::key(&args.region), id),
        None => store.clone(),
    };
    let topology = match &args.topology {
        Some(p) => Some(Arc::new(
            Topology::from_file(p).map_err(|e| format!("--topology {}: {e}", p.display()))?,
        )),
        None => None,
    };
    std::fs::create_dir_all(&args.state_dir)
        .map_err(|e| format!("--state-dir {}: {e}", args.state_dir.display()))?;
    let settings = Settings {
        topology,
        out: args.out.clone(),
        state_dir: args.state_dir.clone(),
        default_datastore: args.default_datastore.clone(),
        renewal: RenewalPolicy::default(),
        runtime: control_plane_runtime(args)?,
        konnectivity_bind: args.konnectivity_listen,
    };
    Ok((Arc::new(Reconciler::new(writer, settings, registry)), store))
}

fn in_region(s: &Stored, region: &str) -> bool {
    s.value["metadata"]["labels"][REGION_LABEL]
        .as_str()
        .unwrap_or("default")
        == region
}

/// The tenants of `region`.
async fn tenant_keys(store: &Store, region: &str) -> Result<Vec<ObjectKey>, String> {
    let (list, _) = store
        .list(Kind::TenantControlPlane)
        .await
        .map_err(|e| kmetal::Report(&e).to_string())?;
    Ok(list
        .into_iter()
        .filter(|s| in_region(s, region))
        .map(|s| s.key)
        .collect())
}

/// Reconciles `keys` with at most `workers` at a time.
async fn pass(
    r: &Arc<Reconciler>,
    keys: Vec<ObjectKey>,
    workers: usize,
    done: &Arc<AtomicUsize>,
    metrics: &Arc<Metrics>,
) -> Vec<(ObjectKey, Outcome)> {
    let gate = Arc::new(Semaphore::new(workers.max(1)));
    let mut set = tokio::task::JoinSet::new();
    for key in keys {
        let (r, gate, done, metrics) = (r.clone(), gate.clone(), done.clone(), metrics.clone());
        set.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let started = Instant::now();
            let outcome = match r.reconcile(&key).await {
                Ok(o) => o,
                Err(e) => Outcome::NotReady(e.to_string()),
            };
            metrics.observe_reconcile(started.elapsed());
            done.fetch_add(1, Ordering::Relaxed);
            (key, outcome)
        });
    }
    let mut out = Vec::new();
    while let Some(res) = set.join_next().await {
        if let Ok(x) = res {
            out.push(x);
        }
    }
    out
}

/// What `converge` works on.
pub struct Converge<'a> {
    pub region: &'a str,
    pub workers: usize,
    pub timeout: Duration,
    pub progress: bool,
    pub metrics: &'a Arc<Metrics>,
}

/// Reconciles every tenant of the region until all are Ready (or gone), the same tenants
/// fail for the same reasons three passes in a row, or the timeout passes. Returns whether
/// every tenant is Ready.
pub async fn converge(r: &Arc<Reconciler>, store: &Store, c: Converge<'_>) -> Result<bool, String> {
    let deadline = Instant::now() + c.timeout;
    let done = Arc::new(AtomicUsize::new(0));
    let mut attempt = 0u32;
    let mut last: Option<Vec<(ObjectKey, String)>> = None;
    let mut stable = 0;
    let mut keys = tenant_keys(store, c.region).await?;
    let total = keys.len();
    let reporter = c.progress.then(|| {
        let done = done.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let n = done.load(Ordering::Relaxed).min(total);
                eprintln!("reconciling: {n} of {total} tenants done");
            }
        })
    });
    let ready = loop {
        let outcomes = pass(r, keys.clone(), c.workers, &done, c.metrics).await;
        let mut pending: Vec<(ObjectKey, String)> = outcomes
            .into_iter()
            .filter_map(|(k, o)| match o {
                Outcome::NotReady(why) => Some((k, why)),
                _ => None,
            })
            .collect();
        pending.sort();
        if pending.is_empty() {
            break true;
        }
        let moving = pending.iter().any(|(_, w)| {
            w == "conflict"
                || w.ends_with(crate::phases::IN_PROGRESS)
                || w.ends_with(crate::phases::QUEUED)
        });
        if last.as_ref() == Some(&pending) && !moving {
            stable += 1;
        } else {
            stable = 0;
        }
        if stable >= 2 || Instant::now() > deadline {
            break false;
        }
        keys = pending.iter().map(|(k, _)| k.clone()).collect();
        last = Some(pending);
        let pause = if moving {
            backoff(attempt).min(IN_PROGRESS_POLL)
        } else {
            backoff(attempt)
        };
        tokio::time::sleep(pause).await;
        attempt += 1;
    };
    if let Some(t) = reporter {
        t.abort();
    }
    Ok(ready)
}

pub async fn report(store: &Store, region: &str, format: Format) -> Result<bool, String> {
    let (list, _) = store
        .list(Kind::TenantControlPlane)
        .await
        .map_err(|e| kmetal::Report(&e).to_string())?;
    let rows: Vec<TenantRow> = list
        .iter()
        .filter(|s| in_region(s, region))
        .map(TenantRow::of)
        .collect();
    match format {
        Format::Json => {
            let v: Vec<serde_json::Value> = rows.iter().map(TenantRow::to_json).collect();
            out!(
                "{}",
                serde_json::to_string_pretty(&v).map_err(|e| kmetal::Report(&e).to_string())?
            );
        }
        Format::Text => out!("{}", tenants_table(&rows).trim_end()),
    }
    Ok(rows.iter().all(|r| r.ready))
}

/// This process's peak resident memory (VmHWM), KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Whether a stored Secret is one the operator wrote for a tenant (its label says so).
fn tenant_owned(secret: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(secret)
        .is_ok_and(|v| v["metadata"]["labels"]["kmetal.io/tenant"].is_string())
}

/// Sends every tenant key of `region` to `tx`.
async fn enqueue_all(store: &Store, region: &str, tx: &mpsc::UnboundedSender<ObjectKey>) {
    for k in tenant_keys(store, region).await.unwrap_or_default() {
        let _ = tx.send(k);
    }
}

pub async fn run(args: RunArgs) -> Result<u8, String> {
    let me = identity(&args);
    let (r, store) = reconciler(&args, Some(me.clone()), !args.once).await?;
    let metrics = Metrics::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut leading = crate::leader::campaign(
        store.clone(),
        &args.region,
        &me,
        Duration::from_secs(args.lease_ttl),
        stop_rx,
    );
    if args.once {
        // Lead the region for the pass (a killed predecessor's lease has to run out first).
        let timeout = Duration::from_secs(args.timeout);
        let won = tokio::time::timeout(timeout, leading.wait_for(|l| *l)).await;
        if !matches!(won, Ok(Ok(_))) {
            return Err(format!(
                "region {}: another controller leads it; not reconciling",
                args.region
            ));
        }
        let count = tenant_keys(&store, &args.region).await?.len();
        let many = count > 20;
        let started = Instant::now();
        let c = Converge {
            region: &args.region,
            workers: args.workers,
            timeout,
            progress: many && args.format == Format::Text,
            metrics: &metrics,
        };
        converge(&r, &store, c).await?;
        let took = started.elapsed();
        let _ = stop_tx.send(true);
        let ready = report(&store, &args.region, args.format).await?;
        // A pass, not a service: the control planes it started stop with it.
        r.shutdown().await;
        eprintln!(
            "reconciled {count} tenants in {:.2} s; peak RSS {} KiB",
            took.as_secs_f64(),
            peak_rss_kib()
        );
        return Ok(if ready { 0 } else { 1 });
    }
    if let Some(listen) = &args.listen {
        crate::observe::serve(listen, metrics.clone(), store.clone(), r.clone()).await?;
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<ObjectKey>();
    // Watch from the current revision, then list: nothing changes unseen in between.
    let start = store
        .datastore()
        .range(RangeRequest::get("/").count_only())
        .await
        .map_err(|e| kmetal::Report(&e).to_string())?
        .revision;
    let mut watch = store
        .datastore()
        .watch(WatchRequest::prefix(PREFIX, start + 1))
        .await
        .map_err(|e| kmetal::Report(&e).to_string())?;
    {
        // Whoever becomes leader starts with a full pass.
        let (tx, store, metrics, region) = (
            tx.clone(),
            store.clone(),
            metrics.clone(),
            args.region.clone(),
        );
        let mut leading = leading.clone();
        tokio::spawn(async move {
            loop {
                let now = *leading.borrow_and_update();
                metrics.leader.store(now, Ordering::Release);
                // The leader reconciles every tenant; a standby serves their runtimes.
                enqueue_all(&store, &region, &tx).await;
                metrics.synced.store(true, Ordering::Release);
                if leading.changed().await.is_err() {
                    return;
                }
            }
        });
    }
    {
        let (tx, store, region) = (tx.clone(), store.clone(), args.region.clone());
        tokio::spawn(async move {
            while let Some(Ok(batch)) = watch.next().await {
                let mut all = false;
                for ev in batch.events {
                    let key = String::from_utf8_lossy(&ev.kv.key).to_string();
                    let rest = key.trim_start_matches(PREFIX);
                    let parts: Vec<&str> = rest.splitn(3, '/').collect();
                    match parts.as_slice() {
                        // Our own status writes bring nothing new; the passes that wrote
                        // them requeue by themselves when there is more to do.
                        ["TenantControlPlane", ..]
                            if store.is_own_write(&key, ev.kv.mod_revision) => {}
                        ["TenantControlPlane", ns, name] => {
                            let _ =
                                tx.send(ObjectKey::new(Kind::TenantControlPlane, Some(ns), name));
                        }
                        // The Secrets the operator writes for tenants change nothing to do.
                        ["Secret", ..] if tenant_owned(&ev.kv.value) => {}
                        _ => all = true,
                    }
                }
                if all {
                    enqueue_all(&store, &region, &tx).await;
                }
            }
        });
    }
    if let Some(rt) = &r.settings.runtime {
        // A replica that dies or comes back changes its tenant's readiness.
        let (tx, store, region) = (tx.clone(), store.clone(), args.region.clone());
        let mut changes = rt.changes();
        tokio::spawn(async move {
            loop {
                match changes.recv().await {
                    Ok(t) => {
                        let key =
                            ObjectKey::new(Kind::TenantControlPlane, Some(&t.namespace), &t.name);
                        let _ = tx.send(key);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        enqueue_all(&store, &region, &tx).await;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
    {
        // Periodic resync: certificate deadlines pass without any write to the store.
        let (tx, store, region) = (tx.clone(), store.clone(), args.region.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                enqueue_all(&store, &region, &tx).await;
            }
        });
    }
    let gate = Arc::new(Semaphore::new(args.workers.max(1)));
    let in_flight: Arc<std::sync::Mutex<HashMap<ObjectKey, bool>>> = Arc::default();
    let failures: Arc<std::sync::Mutex<HashMap<ObjectKey, u32>>> = Arc::default();
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        let key = tokio::select! {
            k = rx.recv() => match k { Some(k) => k, None => break },
            _ = &mut signal => break,
        };
        if !*leading.borrow_and_update() {
            // A standby serves the tenant's runtime from what the leader recorded.
            let r = r.clone();
            let me = me.clone();
            tokio::spawn(async move {
                if let Err(e) = r.serve_runtime(&key).await {
                    tracing::warn!(tenant = %key.display(), by = %me, error = %e, "serving the runtime failed");
                }
            });
            continue;
        }
        {
            // A key that comes while its reconcile runs is marked, and reconciled again
            // when that one ends: the change it stands for may have come too late for it.
            let mut flying = in_flight.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(again) = flying.get_mut(&key) {
                *again = true;
                continue;
            }
            flying.insert(key.clone(), false);
        }
        let worker = Worker {
            r: r.clone(),
            gate: gate.clone(),
            in_flight: in_flight.clone(),
            failures: failures.clone(),
            tx: tx.clone(),
            metrics: metrics.clone(),
            leading: leading.clone(),
            me: me.clone(),
        };
        tokio::spawn(worker.reconcile(key));
    }
    // Hand the region over at once instead of after the lease's TTL.
    let _ = stop_tx.send(true);
    r.shutdown().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(0)
}

/// What one reconcile in the long-running loop needs.
struct Worker {
    r: Arc<Reconciler>,
    gate: Arc<Semaphore>,
    /// Keys being reconciled, each marked when it came again meanwhile.
    in_flight: Arc<std::sync::Mutex<HashMap<ObjectKey, bool>>>,
    failures: Arc<std::sync::Mutex<HashMap<ObjectKey, u32>>>,
    tx: mpsc::UnboundedSender<ObjectKey>,
    metrics: Arc<Metrics>,
    leading: watch::Receiver<bool>,
    me: String,
}

impl Worker {
    async fn reconcile(self, key: ObjectKey) {
        let permit = self.gate.acquire_owned().await;
        let outcome = if *self.leading.borrow() {
            let started = Instant::now();
            let outcome = self.r.reconcile(&key).await;
            self.metrics.observe_reconcile(started.elapsed());
            tracing::info!(tenant = %key.display(), by = %self.me, ?outcome, "reconciled");
            Some(outcome)
        } else {
            None
        };
        // The worker is free now: the waits below hold no worker (thirty queued tenants
        // each sleeping on a worker once left none for the ones booting).
        drop(permit);
        let again = self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key)
            .unwrap_or(false);
        if again {
            let _ = self.tx.send(key.clone());
        }
        let retry = match outcome {
            None | Some(Ok(Outcome::Ready)) | Some(Ok(Outcome::Gone)) => {
                self.failures
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&key);
                None
            }
            Some(Ok(Outcome::NotReady(why))) => Some(why),
            Some(Err(e)) => Some(e.to_string()),
        };
        let Some(why) = retry else { return };
        // Starting processes and tenants waiting their turn to boot are not failures: look
        // again after a fixed pause, without backoff (a tenant is Ready, and its admin
        // bound, at the first look after its api-server is; a queued one is told its turn).
        let pause = if why.ends_with(crate::phases::IN_PROGRESS) {
            Some(IN_PROGRESS_POLL)
        } else if why.ends_with(crate::phases::QUEUED) {
            Some(QUEUED_POLL)
        } else {
            None
        };
        if let Some(pause) = pause {
            tracing::debug!(tenant = %key.display(), reason = %why, "in progress; requeued");
            tokio::time::sleep(pause).await;
            let _ = self.tx.send(key);
            return;
        }
        let n = {
            let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            let n = f.entry(key.clone()).or_insert(0);
            *n += 1;
            *n
        };
        tracing::info!(tenant = %key.display(), reason = %why, attempt = n, "not ready; requeued");
        tokio::time::sleep(backoff(n)).await;
        let _ = self.tx.send(key);
    }
}

/// The no-argument demo: the bundled demo manifests and under-cluster topology on a fresh
/// embedded management store, reconciled to Ready with real control planes, each tenant's
/// kubectl command printed; they serve until Ctrl-C (or stop at once with `exit`).
pub async fn demo(exit: bool) -> Result<u8, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples");
    let dir = std::env::temp_dir().join(format!("kmetal-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let state = format!("sqlite://{}/management.db", dir.display());
    out!("kmetal operator demo");
    out!("  management store: {state}");
    let store = crate::open_store(&state).await?;
    let manifests = root.join("manifests/demo/tenants.yaml");
    out!("  manifests:        {}", manifests.display());
    crate::apply_files(&store, std::slice::from_ref(&manifests)).await?;
    let args = RunArgs {
        once: true,
        state: state.clone(),
        topology: Some(root.join("topologies/under-cluster.yaml")),
        listen: None,
        out: Some(dir.join("tenants")),
        format: Format::Text,
        default_datastore: "embedded".into(),
        state_dir: dir.clone(),
        workers: 8,
        timeout: 120,
        region: "default".into(),
        identity: None,
        lease_ttl: 10,
        runtime: RuntimeKind::Process,
        kubernetes_bin: Vec::new(),
        boot_limit: None,
        konnectivity_listen: std::net::Ipv4Addr::LOCALHOST.into(),
    };
    let started = Instant::now();
    let (r, store) = reconciler(&args, None, false).await?;
    let metrics = Metrics::new();
    let c = Converge {
        region: "default",
        workers: args.workers,
        timeout: Duration::from_secs(args.timeout),
        progress: false,
        metrics: &metrics,
    };
    let ready = converge(&r, &store, c).await?;
    out!(
        "\nreconciled in {:.2} s:\n",
        started.elapsed().as_secs_f64()
    );
    report(&store, "default", Format::Text).await?;
    out!(
        "\n  PKI and kubeconfigs: {}/<tenant>/ (pki/, admin.conf, ...)",
        dir.join("tenants").display()
    );
    out!(
        "  datastore slices:    {}/embedded/<schema>.db",
        dir.display()
    );
    for (key, _) in r.agents_connected() {
        if let Some(addr) = r.agent_address(&key) {
            out!("  konnectivity {:<16} agents dial {addr}", key.name);
        }
    }
    out!("\n  inspect: cargo run --example operator -- get tcp --state {state}");
    if ready {
        // The kubectl scripts/peers.sh built beside the control plane, when there is one.
        let kubectl = kubernetes_dirs(&args)
            .into_iter()
            .map(|d| d.join("kubectl"))
            .find(|k| k.is_file())
            .map_or_else(|| "kubectl".to_string(), |k| k.display().to_string());
        out!("\n  each tenant's own cluster:");
        for (name, endpoint) in tenant_endpoints(&store).await? {
            let conf = dir.join("tenants").join(&name).join("admin.conf");
            out!(
                "    {name:<10} https://{endpoint:<20} {kubectl} --kubeconfig {} get ns",
                conf.display()
            );
        }
    }
    if ready && !exit {
        out!("\n  serving until Ctrl-C");
        shutdown_signal().await;
    }
    r.shutdown().await;
    Ok(if ready { 0 } else { 1 })
}

/// Each tenant's name and `status.controlPlaneEndpoint`.
async fn tenant_endpoints(store: &Store) -> Result<Vec<(String, String)>, String> {
    let (list, _) = store
        .list(Kind::TenantControlPlane)
        .await
        .map_err(|e| kmetal::Report(&e).to_string())?;
    Ok(list
        .iter()
        .filter_map(|s| {
            let name = s.key.name.clone();
            let endpoint = s.value["status"]["controlPlaneEndpoint"]
                .as_str()?
                .to_string();
            Some((name, endpoint))
        })
        .collect())
}
