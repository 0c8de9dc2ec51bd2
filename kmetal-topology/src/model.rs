//! The topology: regions ⊃ sites ⊃ zones ⊃ nodes, node roles and capacity, the zone RTT
//! matrix, and how the API endpoint is exposed; loaded from YAML with typed, path-named errors.
//!
//! ```
//! use kmetal_topology::model::Topology;
//! let t = Topology::from_yaml(r#"
//! name: small
//! defaults: { rtt_ms: { same_site: 1.0, same_region: 4.0, wan: 40.0 } }
//! regions:
//!   - name: eu
//!     sites:
//!       - name: dc1
//!         zones:
//!           - { name: a, nodes: [{ name: cp-a, roles: [control-plane] }] }
//!           - { name: b, nodes: [{ name: cp-b, roles: [control-plane] }] }
//!           - { name: c, nodes: [{ name: cp-c, roles: [control-plane] }] }
//! "#).unwrap();
//! assert_eq!(t.members(), 3);
//! assert_eq!(t.rtt_ms(0, 1), 1.0);
//! ```

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// What a node does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Runs the under cluster's control plane (and, stacked, an etcd member) and tenant
    /// control-plane pods.
    ControlPlane,
    /// Runs tenant workloads only.
    Worker,
    /// Runs an etcd member only (a tie-breaker in a third failure domain); never workloads.
    Arbiter,
}

/// Where a site runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SiteKind {
    /// An on-premises data centre.
    #[default]
    OnPrem,
    /// A cloud account / region.
    Cloud,
}

/// How the API endpoint of the under cluster is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExposureKind {
    /// A VIP on a stretched L2 network; it lives with the network's gateway zone.
    StretchedL2Vip,
    /// A floating IP on an overlay network.
    FloatingIp,
    /// An external load balancer.
    ExternalLb,
    /// HAProxy VMs in front of the api-servers.
    Haproxy,
    /// BGP / anycast announcements from every zone.
    Bgp,
}

/// Allocatable resources of a node, or requested by a replica.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU cores.
    #[serde(default)]
    pub cpu: f64,
    /// Memory in GiB.
    #[serde(default)]
    pub memory_gib: f64,
    /// Pods.
    #[serde(default)]
    pub pods: u32,
}

impl Resources {
    /// Whether `req` fits into `self`.
    pub fn fits(&self, req: &Resources) -> bool {
        req.cpu <= self.cpu + 1e-9
            && req.memory_gib <= self.memory_gib + 1e-9
            && req.pods <= self.pods
    }

    /// `self - req` (caller checked `fits`).
    pub fn minus(&self, req: &Resources) -> Resources {
        Resources {
            cpu: self.cpu - req.cpu,
            memory_gib: self.memory_gib - req.memory_gib,
            pods: self.pods.saturating_sub(req.pods),
        }
    }
}

/// A node.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Name (unique in the topology).
    pub name: String,
    /// Index of its zone.
    pub zone: usize,
    /// Roles.
    pub roles: Vec<Role>,
    /// Whether it hosts a voting etcd member of the under cluster.
    pub etcd_member: bool,
    /// Allocatable resources for tenant pods.
    pub capacity: Resources,
    /// Probability that the node is up.
    pub availability: f64,
}

impl Node {
    /// Whether the node has `role`.
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

/// A zone: nodes sharing power, cooling and network.
#[derive(Debug, Clone, PartialEq)]
pub struct Zone {
    /// Name.
    pub name: String,
    /// Index of its site.
    pub site: usize,
    /// Probability that the zone is up (given its site is).
    pub availability: f64,
    /// Mean time between failures in hours (Monte Carlo).
    pub mtbf_hours: f64,
    /// Mean time to repair in hours (Monte Carlo).
    pub mttr_hours: f64,
}

/// A site: a data centre or a cloud account.
#[derive(Debug, Clone, PartialEq)]
pub struct Site {
    /// Name.
    pub name: String,
    /// Index of its region.
    pub region: usize,
    /// On-prem or cloud.
    pub kind: SiteKind,
    /// Probability that the site is up (given its region is).
    pub availability: f64,
    /// Mean time between failures in hours.
    pub mtbf_hours: f64,
    /// Mean time to repair in hours.
    pub mttr_hours: f64,
}

/// A region.
#[derive(Debug, Clone, PartialEq)]
pub struct Region {
    /// Name.
    pub name: String,
    /// Probability that the region is up.
    pub availability: f64,
    /// Mean time between failures in hours.
    pub mtbf_hours: f64,
    /// Mean time to repair in hours.
    pub mttr_hours: f64,
}

/// How the API endpoint is exposed, and what it depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct Exposure {
    /// Mechanism.
    pub kind: ExposureKind,
    /// The zone it depends on (a VIP's gateway zone, the zone of HAProxy VMs), if any.
    pub zone: Option<usize>,
    /// Probability that the mechanism itself works.
    pub availability: f64,
}

/// Analysis parameters (all overridable in the file's `defaults`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// RTT budget on synchronously replicated links, ms (etcd: 10).
    pub rtt_budget_ms: f64,
    /// RTT budget towards an arbiter, ms.
    pub arbiter_rtt_budget_ms: f64,
    /// Disk sync (WAL fsync) time, ms.
    pub disk_sync_ms: f64,
    /// Time to reschedule lost api-server replicas, s.
    pub reschedule_s: f64,
}

/// The whole topology, flattened: indices link nodes to zones to sites to regions.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    /// Name.
    pub name: String,
    /// Regions.
    pub regions: Vec<Region>,
    /// Sites.
    pub sites: Vec<Site>,
    /// Zones.
    pub zones: Vec<Zone>,
    /// Nodes.
    pub nodes: Vec<Node>,
    /// Symmetric zone-to-zone RTT in ms (`rtt[i][i]` is the RTT inside zone i).
    pub rtt: Vec<Vec<f64>>,
    /// API exposure.
    pub exposure: Option<Exposure>,
    /// Parameters.
    pub params: Params,
}

/// Why a topology file is unusable. Every variant names the field path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TopologyError {
    /// The file is not YAML.
    #[error("not valid YAML")]
    Syntax(#[source] Box<serde_saphyr::Error>),
    /// A field has the wrong type, or is unknown or missing.
    #[error("{path}: {reason}")]
    Shape {
        /// Field path.
        path: String,
        /// The decoder's error (shown in the message, as field errors are, so not also a
        /// source).
        reason: serde_json::Error,
    },
    /// Two things of one kind share a name.
    #[error("{path}: duplicate {kind} name {name:?}")]
    Duplicate {
        /// Field path.
        path: String,
        /// region, site, zone or node.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// A reference to a zone that does not exist.
    #[error("{path}: unknown zone {zone:?}")]
    UnknownZone {
        /// Field path.
        path: String,
        /// The name.
        zone: String,
    },
    /// A pair of zones has no RTT, explicit or by default.
    #[error(
        "rtt: no RTT between zones {a:?} and {b:?} and no default for their relation ({relation})"
    )]
    MissingRtt {
        /// First zone.
        a: String,
        /// Second zone.
        b: String,
        /// same_zone, same_site, same_region or wan.
        relation: &'static str,
    },
    /// A number out of its range (negative RTT, probability over 1, …).
    #[error("{path}: {value} is out of range ({expected})")]
    OutOfRange {
        /// Field path.
        path: String,
        /// The value.
        value: f64,
        /// What is allowed.
        expected: &'static str,
    },
    /// An arbiter that also has the worker role.
    #[error("{path}: an arbiter must not also be a worker")]
    ArbiterWorker {
        /// Field path.
        path: String,
    },
    /// Reading the file failed.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

mod file {
    //! The YAML shape.
    use serde::Deserialize;

    use super::{ExposureKind, Resources, Role, SiteKind};

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct File {
        pub name: String,
        #[serde(default)]
        pub defaults: Defaults,
        pub regions: Vec<Region>,
        #[serde(default)]
        pub rtt: Vec<Rtt>,
        #[serde(default)]
        pub exposure: Option<Exposure>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct Defaults {
        #[serde(default)]
        pub rtt_ms: RttDefaults,
        pub rtt_budget_ms: Option<f64>,
        pub arbiter_rtt_budget_ms: Option<f64>,
        pub disk_sync_ms: Option<f64>,
        pub reschedule_s: Option<f64>,
        pub zone_availability: Option<f64>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct RttDefaults {
        pub same_zone: Option<f64>,
        pub same_site: Option<f64>,
        pub same_region: Option<f64>,
        pub wan: Option<f64>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Region {
        pub name: String,
        pub availability: Option<f64>,
        pub mttr_hours: Option<f64>,
        pub sites: Vec<Site>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Site {
        pub name: String,
        #[serde(default)]
        pub kind: SiteKind,
        pub availability: Option<f64>,
        pub mttr_hours: Option<f64>,
        pub zones: Vec<Zone>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Zone {
        pub name: String,
        pub availability: Option<f64>,
        pub mttr_hours: Option<f64>,
        #[serde(default)]
        pub nodes: Vec<Node>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Node {
        pub name: String,
        pub roles: Vec<Role>,
        pub etcd: Option<bool>,
        #[serde(default)]
        pub capacity: Option<Resources>,
        pub availability: Option<f64>,
        /// Create this many nodes named `<name>-1`, `<name>-2`, … (large under clusters).
        pub count: Option<u32>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Rtt {
        pub between: [String; 2],
        pub ms: f64,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Exposure {
        pub kind: ExposureKind,
        pub zone: Option<String>,
        pub availability: Option<f64>,
    }
}

/// Default capacity of a node without one: a modest control-plane node.
const DEFAULT_CAPACITY: Resources = Resources {
    cpu: 16.0,
    memory_gib: 64.0,
    pods: 110,
};

fn probability(path: String, v: Option<f64>, default: f64) -> Result<f64, TopologyError> {
    let v = v.unwrap_or(default);
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(TopologyError::OutOfRange {
            path,
            value: v,
            expected: "a probability in 0..=1",
        })
    }
}

fn non_negative(path: String, v: f64) -> Result<f64, TopologyError> {
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(TopologyError::OutOfRange {
            path,
            value: v,
            expected: "a finite number ≥ 0",
        })
    }
}

/// A domain's (availability, MTBF, MTTR) from its fields at `path`, with defaults.
fn rates(
    path: &str,
    availability: Option<f64>,
    default_availability: f64,
    mttr: Option<f64>,
    default_mttr: f64,
) -> Result<(f64, f64, f64), TopologyError> {
    let a = probability(
        format!("{path}.availability"),
        availability,
        default_availability,
    )?;
    let mttr = non_negative(format!("{path}.mttr_hours"), mttr.unwrap_or(default_mttr))?;
    Ok((a, mtbf(a, mttr), mttr))
}

/// MTBF from availability and MTTR: a = MTBF / (MTBF + MTTR).
fn mtbf(a: f64, mttr: f64) -> f64 {
    if a >= 1.0 {
        f64::INFINITY
    } else {
        mttr * a / (1.0 - a)
    }
}

impl Topology {
    /// Reads and checks a topology file.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Self, TopologyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text)
    }

    /// Parses and checks a topology.
    pub fn from_yaml(text: &str) -> Result<Self, TopologyError> {
        let value: serde_json::Value =
            serde_saphyr::from_str(text).map_err(|e| TopologyError::Syntax(Box::new(e)))?;
        let f: file::File = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            TopologyError::Shape {
                path,
                reason: e.into_inner(),
            }
        })?;
        Self::build(f)
    }

    fn build(f: file::File) -> Result<Self, TopologyError> {
        let d = &f.defaults;
        let zone_default = probability(
            "defaults.zone_availability".into(),
            d.zone_availability,
            0.999,
        )?;
        let params = Params {
            rtt_budget_ms: non_negative(
                "defaults.rtt_budget_ms".into(),
                d.rtt_budget_ms.unwrap_or(10.0),
            )?,
            arbiter_rtt_budget_ms: non_negative(
                "defaults.arbiter_rtt_budget_ms".into(),
                d.arbiter_rtt_budget_ms.unwrap_or(50.0),
            )?,
            disk_sync_ms: non_negative(
                "defaults.disk_sync_ms".into(),
                d.disk_sync_ms.unwrap_or(1.0),
            )?,
            reschedule_s: non_negative(
                "defaults.reschedule_s".into(),
                d.reschedule_s.unwrap_or(60.0),
            )?,
        };
        let mut t = Topology {
            name: f.name.clone(),
            regions: Vec::new(),
            sites: Vec::new(),
            zones: Vec::new(),
            nodes: Vec::new(),
            rtt: Vec::new(),
            exposure: None,
            params,
        };
        let mut names: HashMap<(&'static str, String), ()> = HashMap::new();
        let mut unique = |kind: &'static str, name: &str, path: String| {
            if names.insert((kind, name.to_string()), ()).is_some() {
                Err(TopologyError::Duplicate {
                    path,
                    kind,
                    name: name.to_string(),
                })
            } else {
                Ok(())
            }
        };
        for (ri, r) in f.regions.iter().enumerate() {
            let rp = format!("regions[{ri}]");
            unique("region", &r.name, format!("{rp}.name"))?;
            let (availability, mtbf_hours, mttr_hours) =
                rates(&rp, r.availability, 1.0, r.mttr_hours, 24.0)?;
            t.regions.push(Region {
                name: r.name.clone(),
                availability,
                mtbf_hours,
                mttr_hours,
            });
            for (si, s) in r.sites.iter().enumerate() {
                let sp = format!("{rp}.sites[{si}]");
                unique("site", &s.name, format!("{sp}.name"))?;
                let (availability, mtbf_hours, mttr_hours) =
                    rates(&sp, s.availability, 1.0, s.mttr_hours, 8.0)?;
                t.sites.push(Site {
                    name: s.name.clone(),
                    region: ri,
                    kind: s.kind,
                    availability,
                    mtbf_hours,
                    mttr_hours,
                });
                let site = t.sites.len() - 1;
                for (zi, z) in s.zones.iter().enumerate() {
                    let zp = format!("{sp}.zones[{zi}]");
                    unique("zone", &z.name, format!("{zp}.name"))?;
                    let (availability, mtbf_hours, mttr_hours) =
                        rates(&zp, z.availability, zone_default, z.mttr_hours, 4.0)?;
                    t.zones.push(Zone {
                        name: z.name.clone(),
                        site,
                        availability,
                        mtbf_hours,
                        mttr_hours,
                    });
                    let zone = t.zones.len() - 1;
                    for (ni, n) in z.nodes.iter().enumerate() {
                        let np = format!("{zp}.nodes[{ni}]");
                        if n.roles.contains(&Role::Arbiter) && n.roles.contains(&Role::Worker) {
                            return Err(TopologyError::ArbiterWorker {
                                path: format!("{np}.roles"),
                            });
                        }
                        let etcd_default = n.roles.contains(&Role::ControlPlane)
                            || n.roles.contains(&Role::Arbiter);
                        let a = probability(format!("{np}.availability"), n.availability, 1.0)?;
                        let capacity = match n.capacity {
                            Some(c) => {
                                non_negative(format!("{np}.capacity.cpu"), c.cpu)?;
                                non_negative(format!("{np}.capacity.memory_gib"), c.memory_gib)?;
                                c
                            }
                            // An arbiter runs etcd only: nothing is scheduled on it.
                            None if n.roles.contains(&Role::Arbiter) => Resources::default(),
                            None => DEFAULT_CAPACITY,
                        };
                        let count = n.count.unwrap_or(1);
                        for k in 0..count {
                            let name = if n.count.is_some() {
                                format!("{}-{}", n.name, k + 1)
                            } else {
                                n.name.clone()
                            };
                            unique("node", &name, format!("{np}.name"))?;
                            t.nodes.push(Node {
                                name,
                                zone,
                                roles: n.roles.clone(),
                                etcd_member: n.etcd.unwrap_or(etcd_default),
                                capacity,
                                availability: a,
                            });
                        }
                    }
                }
            }
        }
        t.rtt = rtt_matrix(&t, &f)?;
        if let Some(e) = &f.exposure {
            let zone = match &e.zone {
                Some(z) => Some(t.zone_index(z).ok_or_else(|| TopologyError::UnknownZone {
                    path: "exposure.zone".into(),
                    zone: z.clone(),
                })?),
                None => None,
            };
            t.exposure = Some(Exposure {
                kind: e.kind,
                zone,
                availability: probability("exposure.availability".into(), e.availability, 1.0)?,
            });
        }
        Ok(t)
    }

    /// Index of the zone named `name`.
    pub fn zone_index(&self, name: &str) -> Option<usize> {
        self.zones.iter().position(|z| z.name == name)
    }

    /// RTT between zones `a` and `b` in ms.
    pub fn rtt_ms(&self, a: usize, b: usize) -> f64 {
        self.rtt[a][b]
    }

    /// Number of voting etcd members.
    pub fn members(&self) -> usize {
        self.nodes.iter().filter(|n| n.etcd_member).count()
    }

    /// Voting etcd members per zone (indexed by zone).
    pub fn members_per_zone(&self) -> Vec<usize> {
        let mut m = vec![0; self.zones.len()];
        for n in self.nodes.iter().filter(|n| n.etcd_member) {
            m[n.zone] += 1;
        }
        m
    }

    /// The region of zone `z`.
    pub fn region_of(&self, z: usize) -> usize {
        self.sites[self.zones[z].site].region
    }

    /// The relation between two zones, as RTT defaults name it.
    pub fn relation(&self, a: usize, b: usize) -> &'static str {
        if a == b {
            "same_zone"
        } else if self.zones[a].site == self.zones[b].site {
            "same_site"
        } else if self.region_of(a) == self.region_of(b) {
            "same_region"
        } else {
            "wan"
        }
    }

    /// Whether any node of zone `z` has `role`.
    pub fn zone_has(&self, z: usize, role: Role) -> bool {
        self.nodes.iter().any(|n| n.zone == z && n.has(role))
    }
}

fn rtt_matrix(t: &Topology, f: &file::File) -> Result<Vec<Vec<f64>>, TopologyError> {
    let n = t.zones.len();
    let mut m = vec![vec![f64::NAN; n]; n];
    for (i, r) in f.rtt.iter().enumerate() {
        let path = format!("rtt[{i}]");
        let ms = non_negative(format!("{path}.ms"), r.ms)?;
        let idx = |k: usize| {
            t.zone_index(&r.between[k])
                .ok_or_else(|| TopologyError::UnknownZone {
                    path: format!("{path}.between[{k}]"),
                    zone: r.between[k].clone(),
                })
        };
        let (a, b) = (idx(0)?, idx(1)?);
        m[a][b] = ms;
        m[b][a] = ms;
    }
    let d = &f.defaults.rtt_ms;
    for (a, row) in m.iter_mut().enumerate() {
        for (b, cell) in row.iter_mut().enumerate() {
            if !cell.is_nan() {
                continue;
            }
            let relation = t.relation(a, b);
            let default = match relation {
                "same_zone" => Some(d.same_zone.unwrap_or(0.2)),
                "same_site" => d.same_site,
                "same_region" => d.same_region,
                _ => d.wan,
            };
            let Some(v) = default else {
                return Err(TopologyError::MissingRtt {
                    a: t.zones[a].name.clone(),
                    b: t.zones[b].name.clone(),
                    relation,
                });
            };
            *cell = non_negative(format!("defaults.rtt_ms.{relation}"), v)?;
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
name: t
defaults: { rtt_ms: { same_site: 1.0, same_region: 5.0, wan: 40.0 } }
regions:
  - name: r
    sites:
      - name: s
        zones:
          - { name: a, nodes: [{ name: n1, roles: [control-plane] }] }
          - { name: b, nodes: [{ name: n2, roles: [worker] }] }
"#;

    #[test]
    fn loads_and_defaults() {
        let t = Topology::from_yaml(BASE).unwrap();
        assert_eq!(t.members(), 1);
        assert_eq!(t.rtt_ms(0, 1), 1.0);
        assert_eq!(t.rtt_ms(0, 0), 0.2);
        assert_eq!(t.params.rtt_budget_ms, 10.0);
    }

    fn err(yaml: &str) -> String {
        Topology::from_yaml(yaml).unwrap_err().to_string()
    }

    #[test]
    fn bad_files_name_the_field() {
        assert_eq!(
            err(&BASE.replace("name: n2", "name: n1")),
            "regions[0].sites[0].zones[1].nodes[0].name: duplicate node name \"n1\""
        );
        assert_eq!(
            err(&BASE.replace("[worker]", "[arbiter, worker]")),
            "regions[0].sites[0].zones[1].nodes[0].roles: an arbiter must not also be a worker"
        );
        let e = err(&format!("{BASE}rtt: [{{ between: [a, zz], ms: 1 }}]\n"));
        assert_eq!(e, "rtt[0].between[1]: unknown zone \"zz\"");
        let e = err(&format!("{BASE}rtt: [{{ between: [a, b], ms: -1 }}]\n"));
        assert!(e.starts_with("rtt[0].ms: -1 is out of range"), "{e}");
        let e = err(&BASE.replace("same_site: 1.0, ", ""));
        assert!(e.contains("no RTT between zones \"a\" and \"b\""), "{e}");
        let e = err(&BASE.replace("roles: [worker]", "roles: [wizard]"));
        assert!(
            e.starts_with("regions[0].sites[0].zones[1].nodes[0].roles[0]: unknown variant"),
            "{e}"
        );
        let e = err(&BASE.replace("name: t", "name: t\nbogus: 1"));
        assert!(e.contains("unknown field `bogus`"), "{e}");
        let e = err(&format!(
            "{BASE}exposure: {{ kind: stretched-l2-vip, zone: nowhere }}\n"
        ));
        assert_eq!(e, "exposure.zone: unknown zone \"nowhere\"");
    }
}
