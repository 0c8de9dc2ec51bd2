//! Serve etcd's v3 API over any kmetal datastore, so a kube-apiserver (or etcdctl) runs on
//! memory, SQLite or PostgreSQL.
//!
//! ```text
//! cargo run --example etcd_gateway -- --listen 127.0.0.1:2379 --datastore sqlite:///var/lib/kmetal/t1.db
//! cargo run --example etcd_gateway -- --listen unix:///run/kmetal/t1.sock --datastore memory
//! cargo run --example etcd_gateway -- --listen 0.0.0.0:2379 --datastore postgres://user:pw@db/t1 \
//!     --cert server.crt --key server.key --client-ca ca.crt
//! ```
//! Stops gracefully on Ctrl-C (open requests finish). Exit codes: 0 after shutdown, 2 bad
//! arguments or an unusable datastore, 1 the server failed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use kmetal::datastore::Datastore;
use kmetal::datastore::gateway::{Gateway, GatewayTls, Listen};
use kmetal::datastore::url::{DatastoreUrl, OpenOptions};

#[derive(Parser)]
#[command(name = "etcd_gateway", about = "etcd v3 API over a kmetal datastore")]
struct Cli {
    /// `host:port` or `unix:///path`.
    #[arg(long, default_value = "127.0.0.1:2379")]
    listen: String,
    /// `memory`, `sqlite://PATH` or `postgres://URL` (a libpq URL).
    #[arg(long, default_value = "memory")]
    datastore: String,
    /// Serving certificate (PEM) for TLS on TCP.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Its key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Require client certificates from this CA (PEM): mTLS.
    #[arg(long = "client-ca", requires = "cert")]
    client_ca: Option<PathBuf>,
    /// How long a watch that asked for progress notifications may stay idle before it gets
    /// one, like etcd's flag of the same name: `500ms`, `10s`, `10m`.
    #[arg(long = "watch-progress-notify-interval", default_value = "10m", value_parser = duration)]
    watch_progress_notify_interval: std::time::Duration,
}

/// `N` followed by `ms`, `s`, `m` or `h`.
fn duration(text: &str) -> Result<std::time::Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (n, unit) = text.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{text:?}: expected a number and a unit"))?;
    let ms = match unit {
        "ms" => n,
        "s" => n * 1000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        _ => return Err(format!("{text:?}: the unit is one of ms, s, m, h")),
    };
    Ok(std::time::Duration::from_millis(ms))
}

async fn store(spec: &str, options: &OpenOptions) -> Result<Arc<dyn Datastore>, String> {
    let url: DatastoreUrl = spec.parse().map_err(|e| format!("--datastore {e}"))?;
    if matches!(url, DatastoreUrl::Etcd(_)) {
        return Err(format!(
            "--datastore {url}: serve etcd's API from etcd itself"
        ));
    }
    url.open_with(options)
        .await
        .map_err(|e| format!("{url}: {e}"))
}

fn read(path: &PathBuf) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

async fn run(cli: Cli) -> Result<(), (u8, String)> {
    let listen: Listen = cli
        .listen
        .parse()
        .map_err(|e| (2, format!("--listen {}: {e}", cli.listen)))?;
    let options = OpenOptions::default().with_progress_interval(cli.watch_progress_notify_interval);
    let store = store(&cli.datastore, &options).await.map_err(|e| (2, e))?;
    let tls = match (&cli.cert, &cli.key) {
        (Some(c), Some(k)) => Some(GatewayTls {
            cert_pem: read(c).map_err(|e| (2, e))?,
            key_pem: read(k).map_err(|e| (2, e))?,
            client_ca_pem: cli
                .client_ca
                .as_ref()
                .map(read)
                .transpose()
                .map_err(|e| (2, e))?,
        }),
        _ => None,
    };
    eprintln!("serving etcd v3 on {} over {}", cli.listen, cli.datastore);
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("shutting down");
    };
    Gateway::new(store)
        .serve(listen, tls, shutdown)
        .await
        .map_err(|e| {
            (
                1,
                format!(
                    "{e}: {}",
                    std::error::Error::source(&e)
                        .map(ToString::to_string)
                        .unwrap_or_default()
                ),
            )
        })
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(code)
        }
    }
}
