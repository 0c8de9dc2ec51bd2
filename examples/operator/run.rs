//! `run`: watch the management store and reconcile (workers, requeue with backoff, periodic
//! resync), or with `--once` reconcile to convergence and report; and the no-argument demo.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kmetal::datastore::model::WatchRequest;
use kmetal::pki::RenewalPolicy;
use kmetal::topology::model::Topology;
use tokio::sync::{Semaphore, mpsc};

use crate::Format;
use crate::reconcile::{Outcome, Reconciler, Settings, backoff};
use crate::status::{TenantRow, tenants_table};
use crate::store::{Kind, ObjectKey, PREFIX, Store};

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

async fn reconciler(args: &RunArgs) -> Result<(Arc<Reconciler>, Store), String> {
    let store = crate::open_store(&args.state).await?;
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
    };
    Ok((Arc::new(Reconciler::new(store.clone(), settings)), store))
}

async fn tenant_keys(store: &Store) -> Result<Vec<ObjectKey>, String> {
    let (list, _) = store
        .list(Kind::TenantControlPlane)
        .await
        .map_err(|e| e.to_string())?;
    Ok(list.into_iter().map(|s| s.key).collect())
}

/// Reconciles `keys` with at most `workers` at a time.
async fn pass(
    r: &Arc<Reconciler>,
    keys: Vec<ObjectKey>,
    workers: usize,
    done: &Arc<AtomicUsize>,
) -> Vec<(ObjectKey, Outcome)> {
    let gate = Arc::new(Semaphore::new(workers.max(1)));
    let mut set = tokio::task::JoinSet::new();
    for key in keys {
        let (r, gate, done) = (r.clone(), gate.clone(), done.clone());
        set.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let outcome = match r.reconcile(&key).await {
                Ok(o) => o,
                Err(e) => Outcome::NotReady(e.to_string()),
            };
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

/// Reconciles every tenant until all are Ready (or gone), nothing changes any more, or the
/// timeout passes. Returns whether every tenant is Ready.
pub async fn converge(
    r: &Arc<Reconciler>,
    store: &Store,
    workers: usize,
    timeout: Duration,
    progress: bool,
) -> Result<bool, String> {
    let deadline = Instant::now() + timeout;
    let done = Arc::new(AtomicUsize::new(0));
    let mut attempt = 0u32;
    let mut last: Option<Vec<(ObjectKey, String)>> = None;
    let mut stable = 0;
    let total = tenant_keys(store).await?.len();
    let reporter = progress.then(|| {
        let done = done.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                eprintln!(
                    "reconciling: {} of {total} tenants done",
                    done.load(Ordering::Relaxed).min(total)
                );
            }
        })
    });
    let mut keys = tenant_keys(store).await?;
    let ready = loop {
        let outcomes = pass(r, keys.clone(), workers, &done).await;
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
        // The same tenants failing for the same reasons three passes in a row: converged.
        if last.as_ref() == Some(&pending) && pending.iter().all(|(_, w)| w != "conflict") {
            stable += 1;
        } else {
            stable = 0;
        }
        if stable >= 2 || Instant::now() > deadline {
            break false;
        }
        keys = pending.iter().map(|(k, _)| k.clone()).collect();
        last = Some(pending);
        tokio::time::sleep(backoff(attempt)).await;
        attempt += 1;
    };
    if let Some(t) = reporter {
        t.abort();
    }
    Ok(ready)
}

pub async fn report(store: &Store, format: Format) -> Result<bool, String> {
    let (list, _) = store
        .list(Kind::TenantControlPlane)
        .await
        .map_err(|e| e.to_string())?;
    let rows: Vec<TenantRow> = list.iter().map(TenantRow::of).collect();
    match format {
        Format::Json => {
            let v: Vec<serde_json::Value> = rows.iter().map(TenantRow::to_json).collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
            );
        }
        Format::Text => print!("{}", tenants_table(&rows)),
    }
    Ok(rows.iter().all(|r| r.ready))
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
}

pub async fn run(args: RunArgs) -> Result<u8, String> {
    let (r, store) = reconciler(&args).await?;
    if args.once {
        let many = tenant_keys(&store).await?.len() > 20 && args.format == Format::Text;
        converge(
            &r,
            &store,
            args.workers,
            Duration::from_secs(args.timeout),
            many,
        )
        .await?;
        let ready = report(&store, args.format).await?;
        return Ok(if ready { 0 } else { 1 });
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<ObjectKey>();
    // Watch first, then list: nothing changes unseen in between.
    let start = store
        .datastore()
        .range(kmetal::datastore::model::RangeRequest::get("/").count_only())
        .await
        .map_err(|e| e.to_string())?
        .revision;
    let mut watch = store
        .datastore()
        .watch(WatchRequest::prefix(PREFIX, start + 1))
        .await
        .map_err(|e| e.to_string())?;
    for k in tenant_keys(&store).await? {
        let _ = tx.send(k);
    }
    {
        let (tx, store) = (tx.clone(), store.clone());
        tokio::spawn(async move {
            while let Some(Ok(batch)) = watch.next().await {
                let mut all = false;
                for ev in batch.events {
                    let key = String::from_utf8_lossy(&ev.kv.key).to_string();
                    let rest = key.trim_start_matches(PREFIX);
                    let parts: Vec<&str> = rest.splitn(3, '/').collect();
                    match parts.as_slice() {
                        ["TenantControlPlane", ns, name] => {
                            let _ =
                                tx.send(ObjectKey::new(Kind::TenantControlPlane, Some(ns), name));
                        }
                        _ => all = true,
                    }
                }
                if all {
                    for k in tenant_keys(&store).await.unwrap_or_default() {
                        let _ = tx.send(k);
                    }
                }
            }
        });
    }
    {
        // Periodic resync: certificate deadlines pass without any write to the store.
        let (tx, store) = (tx.clone(), store.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                for k in tenant_keys(&store).await.unwrap_or_default() {
                    let _ = tx.send(k);
                }
            }
        });
    }
    let gate = Arc::new(Semaphore::new(args.workers.max(1)));
    let in_flight: Arc<std::sync::Mutex<HashSet<ObjectKey>>> = Arc::default();
    let failures: Arc<std::sync::Mutex<HashMap<ObjectKey, u32>>> = Arc::default();
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        let key = tokio::select! {
            k = rx.recv() => match k { Some(k) => k, None => break },
            _ = &mut signal => break,
        };
        if !in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone())
        {
            continue;
        }
        let (r, gate, in_flight, failures, tx) = (
            r.clone(),
            gate.clone(),
            in_flight.clone(),
            failures.clone(),
            tx.clone(),
        );
        tokio::spawn(async move {
            let _permit = gate.acquire_owned().await;
            let outcome = r.reconcile(&key).await;
            in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
            let retry = match outcome {
                Ok(Outcome::Ready) | Ok(Outcome::Gone) => {
                    failures
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&key);
                    None
                }
                Ok(Outcome::NotReady(why)) => Some(why),
                Err(e) => Some(e.to_string()),
            };
            if let Some(why) = retry {
                let n = {
                    let mut f = failures.lock().unwrap_or_else(|e| e.into_inner());
                    let n = f.entry(key.clone()).or_insert(0);
                    *n += 1;
                    *n
                };
                tracing::info!(tenant = %key.display(), reason = %why, attempt = n, "not ready; requeued");
                tokio::time::sleep(backoff(n)).await;
                let _ = tx.send(key);
            }
        });
    }
    Ok(0)
}

/// The no-argument demo: the bundled demo manifests and under-cluster topology on a fresh
/// embedded management store, reconciled to Ready.
pub async fn demo() -> Result<u8, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples");
    let dir = std::env::temp_dir().join(format!("kmetal-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let state = format!("sqlite://{}/management.db", dir.display());
    println!("kmetal operator demo");
    println!("  management store: {state}");
    let store = crate::open_store(&state).await?;
    let manifests = root.join("manifests/demo/tenants.yaml");
    println!("  manifests:        {}", manifests.display());
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
    };
    let started = Instant::now();
    let (r, store) = reconciler(&args).await?;
    let ready = converge(
        &r,
        &store,
        args.workers,
        Duration::from_secs(args.timeout),
        false,
    )
    .await?;
    println!(
        "\nreconciled in {:.2} s:\n",
        started.elapsed().as_secs_f64()
    );
    report(&store, Format::Text).await?;
    println!(
        "\n  PKI and kubeconfigs: {}/<tenant>/ (pki/, admin.conf, ...)",
        dir.join("tenants").display()
    );
    println!(
        "  datastore slices:    {}/embedded/<schema>.db",
        dir.display()
    );
    for (key, _) in r.agents_connected() {
        if let Some(addr) = r.agent_address(&key) {
            println!("  konnectivity {:<16} agents dial {addr}", key.name);
        }
    }
    println!("\n  inspect: cargo run --example operator -- get tcp --state {state}");
    Ok(if ready { 0 } else { 1 })
}
