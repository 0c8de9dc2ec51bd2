//! The kmetal operator (Kamaji model). For now: `validate` checks manifests offline.
//!
//! ```text
//! cargo run --example operator -- validate -f FILE [-f FILE ...]
//! ```
//! Prints `Kind/name: ok` per valid object, `FILE: Kind/name: path: problem` per problem;
//! exits 0 when everything is valid, 1 when any object is invalid, 2 when a file cannot be
//! read or parsed. With no arguments it validates the bundled sample manifests.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kmetal::core::manifest::{Content, ManifestError, parse_file};

#[derive(Parser)]
#[command(name = "operator", about = "kmetal hosted-control-plane operator")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate TenantControlPlane and DataStore manifests (YAML or JSON, multi-document).
    Validate {
        /// Manifest file; repeat for several.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
}

/// Worst outcome over all files: 0 ok, 1 invalid object, 2 unreadable/unparsable file.
fn validate(files: &[PathBuf]) -> u8 {
    let mut worst = 0u8;
    for file in files {
        worst = worst.max(validate_file(file));
    }
    worst
}

fn validate_file(file: &Path) -> u8 {
    let shown = file.display();
    let docs = match parse_file(file) {
        Ok(d) => d,
        Err(ManifestError::Syntax {
            line,
            column,
            source,
        }) => {
            eprintln!("{shown}:{line}:{column}: cannot parse: {source}");
            return 2;
        }
        Err(e) => {
            eprintln!("{shown}: {e}");
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
            println!("{shown}: {label}: skipped: {api_version} {kind} is not a kmetal kind");
            continue;
        }
        let problems = doc.problems();
        if problems.is_empty() {
            println!("{label}: ok");
        } else {
            worst = 1;
            for p in problems {
                println!("{shown}: {label}: {p}");
            }
        }
    }
    worst
}

fn bundled_samples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/manifests");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "json"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Some(Command::Validate { files }) => validate(&files),
        None => {
            let files = bundled_samples();
            println!(
                "kmetal operator demo: validating {} bundled manifests",
                files.len()
            );
            validate(&files)
        }
    };
    ExitCode::from(code)
}
