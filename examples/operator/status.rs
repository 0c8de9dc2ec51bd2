//! Tables and JSON for `get` and `run --once`.

use std::fmt::Write as _;

use kmetal::core::TenantControlPlane;
use serde_json::{Value, json};

use crate::store::{Kind, Stored};

fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            let _ = write!(l, "{c:<w$}  ", w = widths[i]);
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut out, header.to_vec());
    for r in rows {
        line(&mut out, r.iter().map(String::as_str).collect());
    }
    out
}

/// One tenant's summary.
pub struct TenantRow {
    pub namespace: String,
    pub name: String,
    pub phase: String,
    pub ready: bool,
    pub reason: String,
    pub version: String,
    pub datastore: String,
    pub driver: String,
    pub schema: String,
    pub user: String,
    pub endpoint: String,
    pub replicas: Vec<(String, String)>,
    pub first_expiry: String,
    pub konnectivity: String,
}

impl TenantRow {
    pub fn of(s: &Stored) -> TenantRow {
        let tcp = TenantControlPlane::decode(s.value.clone()).object;
        let st = tcp.status.clone().unwrap_or_default();
        let cond = |t: &str| st.conditions.iter().find(|c| c.type_ == t);
        let ready =
            cond("Ready").is_some_and(|c| c.status == kmetal::core::meta::ConditionStatus::True);
        let reason = st
            .conditions
            .iter()
            .filter(|c| c.status != kmetal::core::meta::ConditionStatus::True && c.type_ != "Ready")
            .map(|c| {
                format!(
                    "{}: {}",
                    c.type_,
                    if c.message.is_empty() {
                        &c.reason
                    } else {
                        &c.message
                    }
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        TenantRow {
            namespace: s.key.namespace.clone().unwrap_or_default(),
            name: s.key.name.clone(),
            phase: st.phase().as_str().to_string(),
            ready,
            reason,
            version: st
                .kubernetes_resources
                .version
                .version
                .clone()
                .unwrap_or_default(),
            // A dedicated etcd is the tenant's own, not a named DataStore.
            datastore: match (&st.storage.data_store_name, &st.storage.dedicated_etcd) {
                (Some(name), _) => name.clone(),
                (None, Some(d)) => format!("dedicated-{}", d.members.len()),
                (None, None) => String::new(),
            },
            driver: st.storage.driver.clone().unwrap_or_default(),
            schema: st.storage.setup.schema.clone().unwrap_or_default(),
            user: st.storage.setup.user.clone().unwrap_or_default(),
            endpoint: st.control_plane_endpoint.clone().unwrap_or_default(),
            replicas: st
                .replicas
                .iter()
                .map(|r| (r.node.clone(), r.zone.clone()))
                .collect(),
            first_expiry: st
                .certificates
                .values()
                .filter_map(|c| c.not_after.clone())
                .min()
                .unwrap_or_default(),
            konnectivity: cond("KonnectivityReady")
                .map(|c| {
                    c.message
                        .trim_start_matches("agents connect to ")
                        .to_string()
                })
                .unwrap_or_default(),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "namespace": self.namespace,
            "name": self.name,
            "phase": self.phase,
            "ready": self.ready,
            "reason": self.reason,
            "version": self.version,
            "dataStore": self.datastore,
            "driver": self.driver,
            "schema": self.schema,
            "user": self.user,
            "endpoint": self.endpoint,
            "replicas": self.replicas.iter().map(|(n, z)| json!({"node": n, "zone": z})).collect::<Vec<_>>(),
            "firstCertificateExpiry": self.first_expiry,
            "konnectivity": self.konnectivity,
        })
    }
}

/// The `run --once` status table.
pub fn tenants_table(rows: &[TenantRow]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut zones: Vec<&str> = r.replicas.iter().map(|(_, z)| z.as_str()).collect();
            zones.sort_unstable();
            zones.dedup();
            vec![
                r.namespace.clone(),
                r.name.clone(),
                r.phase.clone(),
                r.version.clone(),
                format!("{} ({})", r.datastore, r.driver),
                r.endpoint.clone(),
                format!("{} in {}", r.replicas.len(), zones.join(",")),
                r.first_expiry.clone(),
                if r.ready {
                    String::new()
                } else {
                    r.reason.clone()
                },
            ]
        })
        .collect();
    table(
        &[
            "NAMESPACE",
            "NAME",
            "PHASE",
            "VERSION",
            "DATASTORE",
            "ENDPOINT",
            "REPLICAS",
            "CERTS EXPIRE",
            "NOT READY BECAUSE",
        ],
        &cells,
    )
}

/// The `get` table of any kinds.
pub fn objects_table(objects: &[Stored]) -> String {
    let rows: Vec<Vec<String>> = objects
        .iter()
        .map(|s| {
            let detail = match s.key.kind {
                Kind::TenantControlPlane => {
                    let r = TenantRow::of(s);
                    format!("{} {} {}", r.phase, r.version, r.datastore)
                }
                Kind::DataStore => format!(
                    "{} {}",
                    s.value["spec"]["driver"].as_str().unwrap_or("etcd"),
                    s.value["spec"]["endpoints"]
                        .as_array()
                        .map(|e| e
                            .iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(","))
                        .unwrap_or_default()
                ),
                Kind::Secret => format!(
                    "{} keys",
                    s.value["data"].as_object().map_or(0, serde_json::Map::len)
                ),
            };
            vec![
                s.key.kind.name().to_string(),
                s.key.namespace.clone().unwrap_or_default(),
                s.key.name.clone(),
                detail,
            ]
        })
        .collect();
    table(&["KIND", "NAMESPACE", "NAME", "STATUS"], &rows)
}
