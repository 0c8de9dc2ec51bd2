//! The placement simulator: where must etcd members and control planes go so that a zone, site
//! or region can fail, and what does it cost in write latency?
//!
//! ```text
//! cargo run --example simulator -- analyze FILE [--format text|json] [--svg OUT.svg] [--monte-carlo YEARS]
//! cargo run --example simulator -- place FILE (--tenants N | --tenants-file F) [--seed S] [--format text|json]
//! cargo run --example simulator -- fail FILE --domain NAME [--domain NAME ...] [--tenants N] [--format text|json]
//! cargo run --example simulator -- fail FILE --partition A,B --partition C [--format text|json]
//! cargo run --example simulator -- patterns
//! ```
//! With no arguments: a demo over the bundled topologies in `examples/topologies/`.
//! Exit codes: 0 ok, 1 the analysis found violations or tenants could not be placed, 2 bad
//! input (unreadable or invalid file, unknown domain).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use kmetal::topology::availability::monte_carlo;
use kmetal::topology::model::{Resources, Topology};
use kmetal::topology::placement::{Placement, TenantRequest, place, place_with_progress};
use kmetal::topology::simulate::{FailureReport, Outage, simulate};
use kmetal::topology::{Analysis, analyze};

#[derive(Parser)]
#[command(
    name = "simulator",
    about = "kmetal topology analysis and placement simulator"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Pattern, quorum, rule violations, Raft latency and availability of a topology.
    Analyze {
        /// Topology YAML.
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Write an SVG of the topology and its latency/availability chart.
        #[arg(long)]
        svg: Option<PathBuf>,
        /// Also simulate this many years of correlated outages.
        #[arg(long = "monte-carlo")]
        monte_carlo: Option<f64>,
    },
    /// Place tenants' control planes (and dedicated etcd members) on the nodes.
    Place {
        /// Topology YAML.
        file: PathBuf,
        /// That many identical tenants (3 replicas, shared datastore).
        #[arg(
            long,
            conflicts_with = "tenants_file",
            required_unless_present = "tenants_file"
        )]
        tenants: Option<usize>,
        /// Tenants from a YAML list.
        #[arg(long = "tenants-file")]
        tenants_file: Option<PathBuf>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Apply outages to a placement and report per tenant.
    Fail {
        /// Topology YAML.
        file: PathBuf,
        /// A zone, site or region (repeat), or `management` for the management plane.
        #[arg(long = "domain", required_unless_present = "sides")]
        domains: Vec<String>,
        /// One side of a network partition: comma-separated zones, sites or regions (repeat
        /// for each side); zones outside the side with quorum are cut off.
        #[arg(long = "partition", conflicts_with = "domains")]
        sides: Vec<String>,
        /// Tenants to place first.
        #[arg(long, default_value_t = 30)]
        tenants: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// The seed's comparison table, computed from the bundled topologies.
    Patterns,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantLine {
    name: String,
    #[serde(default = "three")]
    replicas: u32,
    cpu: Option<f64>,
    memory_gib: Option<f64>,
    pods: Option<u32>,
    max_skew: Option<u32>,
    #[serde(default)]
    etcd_members: u32,
    etcd_rtt_budget_ms: Option<f64>,
    #[serde(default)]
    cloud_only: bool,
    region: Option<String>,
}

fn three() -> u32 {
    3
}

fn bundled(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/topologies")
        .join(format!("{name}.yaml"))
}

const BUNDLED: [&str; 4] = ["pattern-a", "pattern-b", "pattern-c", "two-zone"];

fn load(file: &Path) -> Result<Topology, u8> {
    Topology::from_file(file).map_err(|e| {
        eprintln!("{}: {}", file.display(), kmetal::Report(&e));
        2
    })
}

fn tenants_from(n: Option<usize>, file: Option<&Path>) -> Result<Vec<TenantRequest>, u8> {
    if let Some(f) = file {
        let text = std::fs::read_to_string(f).map_err(|e| {
            eprintln!("{}: {e}", f.display());
            2u8
        })?;
        let value: serde_json::Value = serde_saphyr::from_str(&text).map_err(|e| {
            eprintln!("{}: not valid YAML: {e}", f.display());
            2u8
        })?;
        let lines: Vec<TenantLine> = serde_path_to_error::deserialize(value).map_err(|e| {
            eprintln!("{}: {}: {}", f.display(), e.path(), e.inner());
            2u8
        })?;
        return Ok(lines
            .into_iter()
            .map(|l| {
                let base = TenantRequest::new(l.name, l.replicas);
                TenantRequest {
                    resources: Resources {
                        cpu: l.cpu.unwrap_or(base.resources.cpu),
                        memory_gib: l.memory_gib.unwrap_or(base.resources.memory_gib),
                        pods: l.pods.unwrap_or(base.resources.pods),
                    },
                    max_skew: l.max_skew.unwrap_or(base.max_skew),
                    etcd_members: l.etcd_members,
                    etcd_rtt_budget_ms: l.etcd_rtt_budget_ms.unwrap_or(base.etcd_rtt_budget_ms),
                    cloud_only: l.cloud_only,
                    region: l.region,
                    ..base
                }
            })
            .collect());
    }
    Ok((0..n.unwrap_or(0))
        .map(|i| TenantRequest::new(format!("tenant-{i:05}"), 3))
        .collect())
}

fn progress_bar(label: &str) -> impl FnMut(f64) {
    let tty = std::io::stderr().is_terminal();
    let label = label.to_string();
    let mut last = -1i64;
    move |done: f64| {
        let pct = (done * 100.0) as i64;
        if tty && pct != last {
            last = pct;
            eprint!("\r{label}: {pct:3}%");
            if pct >= 100 {
                eprintln!();
            }
        }
    }
}

fn print_analysis(a: &Analysis, t: &Topology) {
    let verdict = if a.violations.is_empty() {
        "OK"
    } else {
        "NEEDS ATTENTION"
    };
    println!("== {} — pattern {} — {verdict}", a.topology, a.pattern);
    println!(
        "etcd: {} members, quorum {}; survives any {} zone loss(es); availability {:.6} ({:.1} min/year down)",
        a.members,
        a.quorum_size,
        a.zone_failures_tolerated,
        a.availability,
        a.annual_downtime_minutes
    );
    if !a.violations.is_empty() {
        println!("\nviolations:");
        for v in &a.violations {
            println!("  [{}] {}", v.code, v.message);
        }
    }
    println!(
        "\n{:<20} {:>8} {:>14} {:>12}",
        "zone", "members", "survives loss", "rto (s)"
    );
    for (z, zone) in t.zones.iter().enumerate() {
        let rto = a.raft.rto_zone_loss[z]
            .rto_s
            .map_or("never".to_string(), |s| format!("{s:.1}"));
        println!(
            "{:<20} {:>8} {:>14} {:>12}",
            zone.name,
            a.members_per_zone[&zone.name].as_u64().unwrap_or(0),
            if a.survives_zone_loss[&zone.name] == true {
                "yes"
            } else {
                "NO"
            },
            rto
        );
    }
    println!("\ntolerated simultaneous losses:");
    for tol in &a.tolerance {
        let sets: Vec<String> = tol
            .minimal_failing_sets
            .iter()
            .take(5)
            .map(|s| format!("{{{}}}", s.domains.join(", ")))
            .collect();
        println!(
            "  {:<7} {}   smallest failures that lose quorum: {}",
            format!("{:?}", tol.level).to_lowercase(),
            tol.tolerated,
            if sets.is_empty() {
                "-".to_string()
            } else {
                sets.join(" ")
            }
        );
    }
    println!("\nraft: commit latency by leader zone (best first):");
    for l in &a.raft.per_leader_zone {
        println!("  {:<20} {:>8.2} ms", l.zone, l.commit_ms);
    }
    println!(
        "recommended: --heartbeat-interval={} --election-timeout={} (max member RTT {:.1} ms); leader loss RTO {:.2} s",
        a.recommended_heartbeat_ms,
        a.recommended_election_timeout_ms,
        a.raft.max_member_rtt_ms,
        a.raft.rto_leader_loss_s
    );
}

fn svg(a: &Analysis, t: &Topology) -> String {
    let n = t.zones.len().max(1);
    let (w, h) = (900.0, 520.0);
    let (cx, cy, r) = (260.0, 260.0, 180.0);
    let pos = |z: usize| {
        let ang = std::f64::consts::TAU * z as f64 / n as f64 - std::f64::consts::FRAC_PI_2;
        (cx + r * ang.cos(), cy + r * ang.sin())
    };
    let per = t.members_per_zone();
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <title>{}: pattern {}</title>\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        esc(&a.topology),
        a.pattern
    );
    for i in 0..n.min(t.zones.len()) {
        for j in i + 1..t.zones.len() {
            if per[i] == 0 && per[j] == 0 {
                continue;
            }
            let ((x1, y1), (x2, y2)) = (pos(i), pos(j));
            let rtt = t.rtt_ms(i, j);
            let over = per[i] > 0 && per[j] > 0 && rtt > t.params.rtt_budget_ms;
            let color = if over { "#d33" } else { "#999" };
            out += &format!(
                "<line x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" y2=\"{y2:.1}\" stroke=\"{color}\"/>\n\
                 <text x=\"{:.1}\" y=\"{:.1}\" fill=\"{color}\">{rtt} ms</text>\n",
                (x1 + x2) / 2.0,
                (y1 + y2) / 2.0
            );
        }
    }
    for (z, zone) in t.zones.iter().enumerate() {
        let (x, y) = pos(z);
        let survives = a.survives_zone_loss[&zone.name] == true;
        let fill = if per[z] == 0 {
            "#eee"
        } else if survives {
            "#cfe8cf"
        } else {
            "#f4c7c3"
        };
        out += &format!(
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"120\" height=\"44\" rx=\"6\" fill=\"{fill}\" stroke=\"#333\"/>\n\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{} etcd member(s)</text>\n",
            x - 60.0,
            y - 22.0,
            y - 5.0,
            esc(&zone.name),
            y + 12.0,
            per[z]
        );
    }
    // Latency chart.
    let max = a
        .raft
        .per_leader_zone
        .iter()
        .map(|l| l.commit_ms)
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max);
    out += "<text x=\"560\" y=\"40\" font-weight=\"bold\">commit latency by leader zone</text>\n";
    for (i, l) in a.raft.per_leader_zone.iter().enumerate() {
        let y = 60.0 + i as f64 * 28.0;
        let bw = if l.commit_ms.is_finite() {
            260.0 * l.commit_ms / max
        } else {
            0.0
        };
        out += &format!(
            "<text x=\"560\" y=\"{:.1}\">{}</text><rect x=\"660\" y=\"{:.1}\" width=\"{bw:.1}\" height=\"16\" fill=\"#4a7fd4\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{:.2} ms</text>\n",
            y + 12.0,
            esc(&l.zone),
            y,
            665.0 + bw,
            y + 12.0,
            l.commit_ms
        );
    }
    out += &format!(
        "<text x=\"560\" y=\"{:.1}\">availability {:.6} — {:.1} min/year down; quorum {} of {}</text>\n</svg>\n",
        80.0 + a.raft.per_leader_zone.len() as f64 * 28.0,
        a.availability,
        a.annual_downtime_minutes,
        a.quorum_size,
        a.members
    );
    out
}

fn cmd_analyze(file: &Path, format: Format, svg_out: Option<&Path>, mc: Option<f64>) -> u8 {
    let t = match load(file) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let a = analyze(&t);
    let mc_report = mc.map(|years| monte_carlo(&t, years, 1, &mut progress_bar("monte carlo")));
    match format {
        Format::Json => {
            let mut v = serde_json::to_value(&a).unwrap_or_default();
            if let Some(m) = &mc_report {
                v["monte_carlo"] = serde_json::to_value(m).unwrap_or_default();
            }
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        Format::Text => {
            print_analysis(&a, &t);
            if let Some(m) = &mc_report {
                println!(
                    "monte carlo over {} years: availability {:.6}, {:.1} min/year down, {:.2} outages/year",
                    m.years, m.availability, m.downtime_minutes_per_year, m.outages_per_year
                );
            }
        }
    }
    if let Some(path) = svg_out
        && let Err(e) = std::fs::write(path, svg(&a, &t))
    {
        eprintln!("{}: {e}", path.display());
        return 2;
    }
    u8::from(!a.violations.is_empty())
}

fn print_placement(t: &Topology, p: &Placement, format: Format) {
    if format == Format::Json {
        let placed: Vec<serde_json::Value> = p
            .placed
            .iter()
            .map(|tp| {
                serde_json::json!({
                    "tenant": tp.tenant,
                    "replicas": tp.replicas.iter().map(|&n| &t.nodes[n].name).collect::<Vec<_>>(),
                    "etcd": tp.etcd.iter().map(|&n| &t.nodes[n].name).collect::<Vec<_>>(),
                })
            })
            .collect();
        let v = serde_json::json!({ "placed": placed, "failed": p.failed });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    println!(
        "placed {} tenant(s), {} could not be placed",
        p.placed.len(),
        p.failed.len()
    );
    for f in p.failed.iter().take(20) {
        println!("  {}: {}", f.tenant, f.reason);
    }
    println!("\n{:<20} {:>9} {:>10}", "zone", "replicas", "cpu used");
    for (z, zone) in t.zones.iter().enumerate() {
        let replicas = p
            .placed
            .iter()
            .flat_map(|tp| tp.replicas.iter().chain(&tp.etcd))
            .filter(|&&n| t.nodes[n].zone == z)
            .count();
        let (used, cap) = t
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.zone == z)
            .fold((0.0, 0.0), |(u, c), (i, n)| {
                (u + n.capacity.cpu - p.free[i].cpu, c + n.capacity.cpu)
            });
        if cap > 0.0 {
            println!(
                "{:<20} {:>9} {:>9.0}%",
                zone.name,
                replicas,
                100.0 * used / cap
            );
        }
    }
}

fn cmd_place(file: &Path, n: Option<usize>, tf: Option<&Path>, seed: u64, format: Format) -> u8 {
    let t = match load(file) {
        Ok(t) => t,
        Err(c) => return c,
    };
    let reqs = match tenants_from(n, tf) {
        Ok(r) => r,
        Err(c) => return c,
    };
    let p = place_with_progress(&t, &reqs, seed, &mut progress_bar("placing"));
    print_placement(&t, &p, format);
    u8::from(!p.failed.is_empty())
}

fn print_failure(r: &FailureReport, format: Format) {
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(r).unwrap_or_default());
        return;
    }
    println!(
        "down: {}; under-cluster etcd quorum: {}",
        if r.zones_down.is_empty() {
            "-".to_string()
        } else {
            r.zones_down.join(", ")
        },
        if r.under_cluster_quorum {
            "kept"
        } else {
            "LOST"
        }
    );
    println!(
        "tenants: {} up, {} down, {} without a running reconciler",
        r.tenants_up, r.tenants_down, r.tenants_unmanaged
    );
    println!(
        "\n{:<16} {:>6} {:>6} {:>5} {:>13} {:>8}",
        "tenant", "api", "etcd", "lost", "reschedulable", "rto (s)"
    );
    for o in r.tenants.iter().take(40) {
        println!(
            "{:<16} {:>6} {:>6} {:>5} {:>13} {:>8}",
            o.tenant,
            if o.api_up { "up" } else { "DOWN" },
            if o.etcd_quorum { "ok" } else { "LOST" },
            o.replicas_lost,
            if o.reschedulable { "yes" } else { "no" },
            o.rto_s.map_or("never".into(), |s| format!("{s:.1}"))
        );
    }
    if r.tenants.len() > 40 {
        println!("… {} more", r.tenants.len() - 40);
    }
}

fn cmd_fail(
    file: &Path,
    domains: &[String],
    sides: &[String],
    tenants: usize,
    seed: u64,
    format: Format,
) -> u8 {
    let t = match load(file) {
        Ok(t) => t,
        Err(c) => return c,
    };
    let reqs = (0..tenants)
        .map(|i| TenantRequest::new(format!("tenant-{i:03}"), 3))
        .collect::<Vec<_>>();
    let p = place(&t, &reqs, seed);
    let outage = if !sides.is_empty() {
        Outage::Partition(
            sides
                .iter()
                .map(|s| s.split(',').map(|n| n.trim().to_string()).collect())
                .collect(),
        )
    } else if domains.iter().any(|d| d == "management") {
        Outage::ManagementPlane
    } else {
        Outage::Domains(domains.to_vec())
    };
    match simulate(&t, &reqs, &p, &outage) {
        Ok(r) => {
            print_failure(&r, format);
            0
        }
        Err(e) => {
            eprintln!("{e}");
            2
        }
    }
}

fn cmd_patterns() -> u8 {
    println!(
        "{:<11} {:>7} {:>6} {:>11} {:>11} {:>10} {:>13} {:>12}",
        "topology",
        "pattern",
        "etcd",
        "zone loss",
        "site loss",
        "commit ms",
        "availability",
        "min/yr down"
    );
    for name in BUNDLED {
        let t = match load(&bundled(name)) {
            Ok(t) => t,
            Err(c) => return c,
        };
        let a = analyze(&t);
        let members: Vec<String> = a
            .members_per_zone
            .values()
            .filter_map(|v| v.as_u64())
            .filter(|&m| m > 0)
            .map(|m| m.to_string())
            .collect();
        println!(
            "{:<11} {:>7} {:>6} {:>11} {:>11} {:>10.2} {:>13.6} {:>12.1}",
            name,
            a.pattern.to_string(),
            members.join("+"),
            if a.zone_failures_tolerated > 0 {
                "survives"
            } else {
                "FAILS"
            },
            if a.tolerance[2].tolerated > 0 {
                "survives"
            } else {
                "FAILS"
            },
            a.commit_latency_ms,
            a.availability,
            a.annual_downtime_minutes
        );
    }
    0
}

fn demo() -> u8 {
    println!("kmetal placement simulator — demo over the bundled topologies\n");
    cmd_patterns();
    for name in BUNDLED {
        println!();
        let t = match load(&bundled(name)) {
            Ok(t) => t,
            Err(c) => return c,
        };
        print_analysis(&analyze(&t), &t);
    }
    println!("\n== failing zone room-1 of two-zone with 10 tenants");
    cmd_fail(
        &bundled("two-zone"),
        &["room-1".to_string()],
        &[],
        10,
        1,
        Format::Text,
    );
    0
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        None => demo(),
        Some(Command::Analyze {
            file,
            format,
            svg,
            monte_carlo,
        }) => cmd_analyze(&file, format, svg.as_deref(), monte_carlo),
        Some(Command::Place {
            file,
            tenants,
            tenants_file,
            seed,
            format,
        }) => cmd_place(&file, tenants, tenants_file.as_deref(), seed, format),
        Some(Command::Fail {
            file,
            domains,
            sides,
            tenants,
            seed,
            format,
        }) => cmd_fail(&file, &domains, &sides, tenants, seed, format),
        Some(Command::Patterns) => cmd_patterns(),
    };
    ExitCode::from(code)
}
