//! Per-tenant PKI on kubeadm's profile, on disk in kubeadm's layout.
//!
//! ```text
//! cargo run --example pki -- init --tenant NAME --endpoint HOST[:PORT] [--san S ...] [--service-cidr CIDR]
//!     [--cluster-domain D] [--node NAME ...] [--algorithm ecdsa-p256|rsa-2048] --out DIR
//! cargo run --example pki -- check-expiration --dir DIR [--format text|json]
//! cargo run --example pki -- renew --dir DIR (--all | NAME ...)
//! cargo run --example pki -- rotate-ca --dir DIR --phase prepare|finalize
//! ```
//! Exit codes: 0 ok, 2 bad input (invalid SAN/IP/CIDR, unreadable or inconsistent bundle).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Parser, Subcommand, ValueEnum};
use kmetal::pki::{Algorithm, Bundle, PkiError, PkiSpec, RotationPhase};

#[derive(Parser)]
#[command(name = "pki", about = "kmetal per-tenant PKI (kubeadm profile)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Alg {
    #[value(name = "ecdsa-p256")]
    EcdsaP256,
    #[value(name = "rsa-2048")]
    Rsa2048,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum Phase {
    Prepare,
    Finalize,
}

#[derive(Subcommand)]
enum Command {
    /// Issue a tenant bundle into DIR (kubeadm layout: DIR/pki/…, DIR/admin.conf, …).
    Init {
        #[arg(long)]
        tenant: String,
        /// Where clients reach the api-server: HOST or HOST:PORT.
        #[arg(long)]
        endpoint: String,
        /// Extra SAN (repeat).
        #[arg(long = "san")]
        sans: Vec<String>,
        #[arg(long = "service-cidr", default_value = "10.96.0.0/16")]
        service_cidr: String,
        #[arg(long = "cluster-domain", default_value = "cluster.local")]
        cluster_domain: String,
        /// Node name (repeat); the first names the etcd certificates.
        #[arg(long = "node")]
        nodes: Vec<String>,
        #[arg(long, value_enum, default_value_t = Alg::EcdsaP256)]
        algorithm: Alg,
        #[arg(long)]
        out: PathBuf,
    },
    /// Report every certificate's expiry, like `kubeadm certs check-expiration`.
    CheckExpiration {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Renew certificates (keeping CN, O, SANs and EKU) and the kubeconfigs embedding them.
    Renew {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, conflicts_with = "names")]
        all: bool,
        /// Certificate names (apiserver, admin.conf, ca, …).
        names: Vec<String>,
    },
    /// Rotate every CA without outage: prepare, roll out, then finalize.
    RotateCa {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, value_enum)]
        phase: Phase,
    },
}

fn fail(e: &PkiError) -> u8 {
    eprintln!("error: {}", kmetal::Report(e));
    2
}

fn human(secs: u64) -> String {
    let days = secs / 86_400;
    if days >= 365 {
        format!("{}y", days / 365)
    } else if days > 0 {
        format!("{days}d")
    } else {
        format!("{}h", secs / 3600)
    }
}

fn check_expiration(dir: &Path, format: Format) -> Result<(), PkiError> {
    let b = Bundle::load_dir(dir)?;
    let report = b.expiry_report(SystemTime::now())?;
    if format == Format::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
        return Ok(());
    }
    println!(
        "{:<28} {:<22} {:>14} {:<24}",
        "CERTIFICATE", "EXPIRES", "RESIDUAL TIME", "CERTIFICATE AUTHORITY"
    );
    for e in report.iter().filter(|e| !e.is_ca) {
        println!(
            "{:<28} {:<22} {:>14} {:<24}",
            e.name,
            e.expires,
            human(e.residual_seconds),
            e.certificate_authority.as_deref().unwrap_or("-")
        );
    }
    println!(
        "\n{:<28} {:<22} {:>14}",
        "CERTIFICATE AUTHORITY", "EXPIRES", "RESIDUAL TIME"
    );
    for e in report.iter().filter(|e| e.is_ca) {
        println!(
            "{:<28} {:<22} {:>14}",
            e.name,
            e.expires,
            human(e.residual_seconds)
        );
    }
    if b.rotation_in_progress() {
        println!("\nCA rotation prepared: finalize it once every consumer runs on the new CA.");
    }
    Ok(())
}

fn run(cli: Cli) -> Result<(), PkiError> {
    match cli.command {
        Command::Init {
            tenant,
            endpoint,
            sans,
            service_cidr,
            cluster_domain,
            nodes,
            algorithm,
            out,
        } => {
            let mut spec = PkiSpec::new(tenant, endpoint);
            spec.cert_sans = sans;
            spec.service_cidr = service_cidr;
            spec.cluster_domain = cluster_domain;
            if !nodes.is_empty() {
                spec.node_names = nodes;
            }
            spec.algorithm = match algorithm {
                Alg::EcdsaP256 => Algorithm::EcdsaP256,
                Alg::Rsa2048 => Algorithm::Rsa2048,
            };
            let b = Bundle::generate(&spec)?;
            b.write_dir(&out)?;
            println!("wrote {} files to {}", b.files().count(), out.display());
        }
        Command::CheckExpiration { dir, format } => check_expiration(&dir, format)?,
        Command::Renew { dir, all, names } => {
            let mut b = Bundle::load_dir(&dir)?;
            let now = SystemTime::now();
            let renewed = if all {
                b.renew_all(now)?
            } else {
                let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                b.renew(&refs, now)?;
                names
            };
            b.verify()?;
            b.write_dir(&dir)?;
            for n in renewed {
                println!("renewed {n}");
            }
        }
        Command::RotateCa { dir, phase } => {
            let mut b = Bundle::load_dir(&dir)?;
            let phase = match phase {
                Phase::Prepare => RotationPhase::Prepare,
                Phase::Finalize => RotationPhase::Finalize,
            };
            b.rotate(phase, SystemTime::now())?;
            b.verify()?;
            b.write_dir(&dir)?;
            match phase {
                RotationPhase::Prepare => println!(
                    "new CAs issued; trust bundles carry old and new; every certificate and kubeconfig re-issued.\n\
                     Roll out the new files to every consumer, then run --phase finalize."
                ),
                RotationPhase::Finalize => {
                    println!("old CAs removed from every bundle and kubeconfig.")
                }
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => ExitCode::from(fail(&e)),
    }
}
