//! The kmetal operator (Kamaji model): TenantControlPlanes and DataStores in a management
//! store (any Datastore driver; an embedded SQLite file by default), reconciled into placed
//! replicas, a provisioned datastore slice, a PKI, a Konnectivity server and a status.
//!
//! ```text
//! operator                                    # demo: bundled tenants with real control planes
//! operator demo [--exit]                      # the same; --exit: stop once they are checked
//! operator apply -f FILE [-f FILE ...]       [--state URL]
//! operator get [KIND[/NAME]] [-n NS] [-o json|yaml]
//! operator delete KIND/NAME [-n NS]
//! operator run [--once] [--state URL] [--topology FILE] [--listen ADDR] [--out DIR] [--format text|json]
//! operator validate -f FILE [-f FILE ...]    # offline manifest checks
//! ```
//! `--state` defaults to `sqlite://kmetal-state/management.db`. `run --once` reconciles to
//! convergence, prints a status table (or JSON) and exits 1 if any tenant is not Ready.

/// `println!` that tolerates a closed stdout (`operator get | head`).
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($t)*);
    }};
}

mod control_plane;
mod dedicated_etcd;
mod drivers;
mod leader;
mod lifecycle;
mod migration;
mod observe;
mod phases;
mod reconcile;
mod run;
mod runtime;
#[path = "../common/shutdown.rs"]
mod shutdown;
mod status;
mod store;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use kmetal::core::manifest::{Content, ManifestError, parse_file};
use kmetal::datastore::url::DatastoreUrl;
use serde_json::Value;

use crate::store::{Kind, ObjectKey, Store};

/// The management store when `--state` is not given.
pub(crate) const DEFAULT_STATE: &str = "sqlite://kmetal-state/management.db";

#[derive(Parser)]
#[command(name = "operator", about = "kmetal hosted-control-plane operator")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum Format {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Subcommand)]
enum Command {
    /// Validate TenantControlPlane and DataStore manifests (YAML or JSON, multi-document).
    Validate {
        /// Manifest file; repeat for several.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// Create or update objects (TenantControlPlane, DataStore, v1 Secret) from manifests.
    Apply {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Management store URL.
        #[arg(long, default_value = DEFAULT_STATE)]
        state: String,
    },
    /// Show objects.
    Get {
        /// `tcp`, `datastore`, `secret`, optionally `/NAME`; all kinds when omitted.
        what: Option<String>,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
        #[arg(long, default_value = DEFAULT_STATE)]
        state: String,
    },
    /// Delete an object (a TenantControlPlane is finalized by the operator first).
    Delete {
        /// `KIND/NAME`.
        what: String,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(long, default_value = DEFAULT_STATE)]
        state: String,
    },
    /// Watch the management store and reconcile.
    Run(Box<run::RunArgs>),
    /// The demo (what `operator` with no arguments runs): bundled tenants with real control
    /// planes, served until Ctrl-C.
    Demo {
        /// Stop the control planes and exit once every tenant was checked, instead of
        /// serving them until Ctrl-C.
        #[arg(long)]
        exit: bool,
    },
}

/// Worst outcome over all files: 0 ok, 1 invalid object, 2 unreadable/unparsable file.
fn validate(files: &[PathBuf]) -> u8 {
    files.iter().map(|f| validate_file(f)).max().unwrap_or(0)
}

fn read_documents(file: &Path) -> Result<Vec<kmetal::core::Document>, String> {
    let shown = file.display();
    parse_file(file).map_err(|e| match e {
        ManifestError::Syntax {
            line,
            column,
            source,
        } => format!("{shown}:{line}:{column}: cannot parse: {source}"),
        e => format!("{shown}: {}", kmetal::Report(&e)),
    })
}

fn validate_file(file: &Path) -> u8 {
    let shown = file.display();
    let docs = match read_documents(file) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let mut worst = 0;
    for doc in &docs {
        let label = doc.label();
        if let Content::Other {
            api_version, kind, ..
        } = &doc.content
        {
            out!("{shown}: {label}: skipped: {api_version} {kind} is not a kmetal kind");
            continue;
        }
        let problems = doc.problems();
        if problems.is_empty() {
            out!("{label}: ok");
        } else {
            worst = 1;
            for p in problems {
                out!("{shown}: {label}: {p}");
            }
        }
    }
    worst
}

pub(crate) async fn open_store(state: &str) -> Result<Store, String> {
    let url: DatastoreUrl = state
        .parse()
        .map_err(|e| format!("--state {}", kmetal::Report(&e)))?;
    let ds = url
        .open()
        .await
        .map_err(|e| format!("management store {url}: {}", kmetal::Report(&e)))?;
    Ok(Store::new(ds))
}

/// Applies every object of `files`; invalid objects are reported and skipped.
pub(crate) async fn apply_files(store: &Store, files: &[PathBuf]) -> Result<u8, String> {
    let mut worst = 0u8;
    for file in files {
        let docs = read_documents(file)?;
        let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let raw: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap_or_default();
        for doc in &docs {
            let label = doc.label();
            let value = match &doc.content {
                Content::Object { object, .. } => {
                    let problems = doc.problems();
                    if !problems.is_empty() {
                        worst = 1;
                        for p in problems {
                            eprintln!("{}: {label}: {p}", file.display());
                        }
                        continue;
                    }
                    object.to_value()
                }
                Content::Other {
                    api_version,
                    kind,
                    name,
                } if api_version == "v1" && kind == "Secret" => {
                    let Some(v) = raw.iter().find(|v| {
                        v["kind"] == "Secret" && v["metadata"]["name"].as_str() == name.as_deref()
                    }) else {
                        continue;
                    };
                    v.clone()
                }
                Content::Other {
                    api_version, kind, ..
                } => {
                    eprintln!(
                        "{}: {label}: skipped: {api_version} {kind} is not stored",
                        file.display()
                    );
                    continue;
                }
                Content::Invalid(e) => {
                    worst = worst.max(1);
                    eprintln!("{}: {label}: {e}", file.display());
                    continue;
                }
                _ => continue,
            };
            match store.apply(value).await {
                Ok((key, outcome)) => out!(
                    "{} {}",
                    key.display(),
                    match outcome {
                        store::Applied::Created => "created",
                        store::Applied::Configured => "configured",
                        store::Applied::Unchanged => "unchanged",
                    }
                ),
                Err(e) => {
                    worst = worst.max(1);
                    eprintln!("{}: {label}: {}", file.display(), kmetal::Report(&e));
                }
            }
        }
    }
    Ok(worst)
}

fn parse_what(what: &str, namespace: Option<&str>) -> Result<(Kind, Option<String>), String> {
    let (kind, name) = match what.split_once('/') {
        Some((k, n)) => (k, Some(n.to_string())),
        None => (what, None),
    };
    let kind = Kind::parse(kind).ok_or_else(|| {
        format!("unknown kind {kind:?}: expected tenantcontrolplane (tcp), datastore or secret")
    })?;
    let _ = namespace;
    Ok((kind, name))
}

async fn get(
    what: Option<String>,
    namespace: Option<String>,
    output: Output,
    state: String,
) -> Result<u8, String> {
    let store = open_store(&state).await?;
    let (kinds, name) = match &what {
        Some(w) => {
            let (k, n) = parse_what(w, namespace.as_deref())?;
            (vec![k], n)
        }
        None => (
            vec![Kind::DataStore, Kind::TenantControlPlane, Kind::Secret],
            None,
        ),
    };
    let mut objects = Vec::new();
    for kind in kinds {
        let (list, _) = store
            .list(kind)
            .await
            .map_err(|e| kmetal::Report(&e).to_string())?;
        objects.extend(list.into_iter().filter(|s| {
            name.as_deref().is_none_or(|n| s.key.name == n)
                && namespace
                    .as_deref()
                    .is_none_or(|ns| s.key.namespace.as_deref().is_none_or(|x| x == ns))
        }));
    }
    if let Some(n) = &name {
        if objects.is_empty() {
            return Err(format!("{} {n:?} not found", what.unwrap_or_default()));
        }
    }
    match output {
        Output::Json => {
            let values: Vec<&Value> = objects.iter().map(|s| &s.value).collect();
            let v = if name.is_some() && values.len() == 1 {
                values[0].clone()
            } else {
                serde_json::json!({"apiVersion": "v1", "kind": "List", "items": values})
            };
            out!(
                "{}",
                serde_json::to_string_pretty(&v).map_err(|e| kmetal::Report(&e).to_string())?
            );
        }
        Output::Yaml => {
            for s in &objects {
                out!(
                    "---\n{}",
                    serde_saphyr::to_string(&s.value).map_err(|e| kmetal::Report(&e).to_string())?
                );
            }
        }
        Output::Table => out!("{}", status::objects_table(&objects).trim_end()),
    }
    Ok(0)
}

async fn delete(what: String, namespace: Option<String>, state: String) -> Result<u8, String> {
    let store = open_store(&state).await?;
    let (kind, name) = parse_what(&what, namespace.as_deref())?;
    let name = name.ok_or_else(|| format!("{what:?}: expected KIND/NAME"))?;
    let key = ObjectKey::new(kind, namespace.as_deref(), &name);
    if store
        .delete(&key)
        .await
        .map_err(|e| kmetal::Report(&e).to_string())?
    {
        out!("{} deleted", key.display());
        Ok(0)
    } else {
        Err(format!("{} not found", key.display()))
    }
}

// Every tenant's Konnectivity server runs in this process, and the tunnel's zero-copy link
// wants an allocator that keeps freed pages (kmetal-tunnel's "Allocator" docs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    run::init_logs();
    // Every tenant's Konnectivity server holds sockets: lift the soft open-files limit to the
    // hard one (1024 by default on many systems).
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Some(Command::Validate { files }) => Ok(validate(&files)),
            Some(Command::Apply { files, state }) => {
                let store = open_store(&state).await?;
                apply_files(&store, &files).await
            }
            Some(Command::Get {
                what,
                namespace,
                output,
                state,
            }) => get(what, namespace, output, state).await,
            Some(Command::Delete {
                what,
                namespace,
                state,
            }) => delete(what, namespace, state).await,
            Some(Command::Run(args)) => run::run(*args).await,
            None => run::demo(false).await,
            Some(Command::Demo { exit }) => run::demo(exit).await,
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
