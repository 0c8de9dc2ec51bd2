//! Observability: `/metrics` (prometheus-client: reconcile duration, tenants by phase,
//! seconds to certificate expiry, datastore sizes, agents connected), `/healthz`, `/readyz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use kmetal::core::TenantControlPlane;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::reconcile::Reconciler;
use crate::store::{Kind, Store, Stored, secret_data};

type Labels = Vec<(String, String)>;

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    reconcile: Histogram,
    tenants: Family<Labels, Gauge>,
    cert_expiry: Family<Labels, Gauge<f64, AtomicU64>>,
    slice_size: Family<Labels, Gauge>,
    store_size: Gauge,
    agents: Family<Labels, Gauge>,
    /// Set once the first full reconcile pass is done.
    pub synced: AtomicBool,
    /// Whether this process leads its region.
    pub leader: AtomicBool,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("kmetal");
        let reconcile = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let tenants = Family::<Labels, Gauge>::default();
        let cert_expiry = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let slice_size = Family::<Labels, Gauge>::default();
        let store_size = Gauge::default();
        let agents = Family::<Labels, Gauge>::default();
        registry.register(
            "reconcile_duration_seconds",
            "Time to reconcile one tenant",
            reconcile.clone(),
        );
        registry.register("tenants", "Tenants by phase", tenants.clone());
        registry.register(
            "certificate_expiry_seconds",
            "Seconds until the tenant's first certificate expires",
            cert_expiry.clone(),
        );
        registry.register(
            "datastore_slice_bytes",
            "Size of the tenant's datastore slice (file-backed slices)",
            slice_size.clone(),
        );
        registry.register(
            "management_store_bytes",
            "Size of the management store",
            store_size.clone(),
        );
        registry.register(
            "konnectivity_agents",
            "Agents connected to the tenant's Konnectivity server",
            agents.clone(),
        );
        Arc::new(Metrics {
            registry,
            reconcile,
            tenants,
            cert_expiry,
            slice_size,
            store_size,
            agents,
            synced: AtomicBool::new(false),
            leader: AtomicBool::new(false),
        })
    }

    pub fn observe_reconcile(&self, took: Duration) {
        self.reconcile.observe(took.as_secs_f64());
    }

    /// Refreshes the gauges from the store and the running tunnels, then encodes.
    pub async fn render(&self, store: &Store, r: &Reconciler) -> String {
        self.tenants.clear();
        self.cert_expiry.clear();
        self.slice_size.clear();
        self.agents.clear();
        let now = SystemTime::now();
        // One list of Secrets for every tenant's slice settings, not one read per tenant.
        let slices: std::collections::HashMap<(Option<String>, String), Stored> = store
            .list(Kind::Secret)
            .await
            .map(|(l, _)| {
                l.into_iter()
                    .map(|s| ((s.key.namespace.clone(), s.key.name.clone()), s))
                    .collect()
            })
            .unwrap_or_default();
        if let Ok((list, _)) = store.list(Kind::TenantControlPlane).await {
            for s in &list {
                let tcp = TenantControlPlane::decode(s.value.clone()).object;
                let tenant = vec![("tenant".to_string(), s.key.display())];
                let phase = tcp.phase().as_str().to_string();
                self.tenants
                    .get_or_create(&vec![("phase".into(), phase)])
                    .inc();
                let st = tcp.status.unwrap_or_default();
                if let Some(first) = st
                    .certificates
                    .values()
                    .filter_map(|c| c.not_after.as_deref())
                    .filter_map(kmetal::core::time::parse_rfc3339)
                    .min()
                {
                    let left = first.duration_since(now).map_or(0.0, |d| d.as_secs_f64());
                    self.cert_expiry.get_or_create(&tenant).set(left);
                }
                let slice = (
                    s.key.namespace.clone(),
                    format!("{}-datastore-config", s.key.name),
                );
                if let Some(cfg) = slices.get(&slice).map(|x| secret_data(&x.value)) {
                    if let Some(path) = cfg.get("path") {
                        let size = std::fs::metadata(path).map_or(0, |m| m.len());
                        self.slice_size.get_or_create(&tenant).set(size as i64);
                    }
                }
            }
        }
        for (key, n) in r.agents_connected() {
            self.agents
                .get_or_create(&vec![("tenant".into(), key.display())])
                .set(n as i64);
        }
        if let Ok(st) = store.datastore().status().await {
            self.store_size
                .set(i64::try_from(st.db_size).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listen` until the process ends.
pub async fn serve(
    listen: &str,
    metrics: Arc<Metrics>,
    store: Store,
    r: Arc<Reconciler>,
) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("--listen {listen}: {}", kmetal::Report(&e)))?;
    eprintln!(
        "serving /metrics, /healthz, /readyz on http://{}",
        listener
            .local_addr()
            .map_err(|e| kmetal::Report(&e).to_string())?
    );
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (metrics, store, r) = (metrics.clone(), store.clone(), r.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let head = String::from_utf8_lossy(&buf[..n]);
                let path = head.split_whitespace().nth(1).unwrap_or("/");
                let (status, ctype, body) = match path {
                    "/metrics" => (
                        "200 OK",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        metrics.render(&store, &r).await,
                    ),
                    "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
                    "/readyz" if metrics.synced.load(Ordering::Acquire) => {
                        let role = if metrics.leader.load(Ordering::Acquire) {
                            "leader"
                        } else {
                            "standby"
                        };
                        ("200 OK", "text/plain", format!("ok ({role})\n"))
                    }
                    "/readyz" => (
                        "503 Service Unavailable",
                        "text/plain",
                        "not synced yet\n".to_string(),
                    ),
                    _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(())
}
