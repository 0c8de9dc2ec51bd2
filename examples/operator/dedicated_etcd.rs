//! The dedicated-etcd phase: a tenant annotated `kmetal.io/dedicated-etcd: "N"` gets an etcd
//! cluster of N members, one per node the placement chose, run by the runtime with the
//! bundle's etcd CA; its api-servers talk to the members directly (no gateway in between,
//! as with Kamaji's dedicated etcd). Quorum loss turns the tenant NotReady with a condition
//! that says so; status lists every member.

use kmetal::core::tenant::{DedicatedEtcdStatus, EtcdMemberStatus, StorageStatus};
use kmetal::pki::Bundle;
use kmetal::runtime::{EtcdClient, EtcdPlan, EtcdStatus, EtcdTls, TenantId};

use crate::phases::{Halt, Pass};
use crate::reconcile::{Reconciler, set_condition};

const CONDITION: &str = "DataStoreReady";

impl Reconciler {
    /// Runs the tenant's dedicated etcd; the api-servers' etcd client once it has quorum.
    pub(crate) async fn dedicated_etcd(
        &self,
        p: &mut Pass<'_>,
        bundle: &Bundle,
    ) -> Result<EtcdClient, Halt> {
        let Some(runtime) = &self.settings.runtime else {
            let why = "a dedicated etcd needs a runtime (--runtime process)".to_string();
            set_condition(&mut p.status, CONDITION, false, "NoRuntime", why);
            return Err(Halt::NotReady("dedicated etcd"));
        };
        let ns = p.key.namespace.as_deref().unwrap_or("default");
        let plan = EtcdPlan {
            tenant: TenantId::new(ns, &p.key.name),
            members: p.placed_etcd.iter().map(|m| m.name.clone()).collect(),
            bundle: bundle.clone(),
        };
        let status = match runtime.ensure_etcd(&plan).await {
            Ok(s) => s,
            Err(e) => {
                let why = kmetal::Report(&e).to_string();
                set_condition(&mut p.status, CONDITION, false, "EtcdFailed", why);
                return Err(Halt::NotReady("dedicated etcd"));
            }
        };
        // Quorum lost is a cluster that had it; before that, the members are starting.
        let had_quorum = p
            .status
            .storage
            .dedicated_etcd
            .as_ref()
            .is_some_and(|d| d.quorum)
            || p.status
                .conditions
                .iter()
                .any(|c| c.type_ == CONDITION && c.reason == "QuorumLost");
        record(p, &status);
        let n = status.members.len();
        let summary = format!(
            "{}/{n} etcd members healthy ({} needed)",
            status.healthy(),
            status.quorum_size()
        );
        let problems = status.problems();
        let detail = if problems.is_empty() {
            summary
        } else {
            format!("{summary}; {}", problems.join("; "))
        };
        if status.has_quorum() {
            let reason = if problems.is_empty() {
                "Healthy"
            } else {
                "Degraded"
            };
            set_condition(&mut p.status, CONDITION, true, reason, detail);
            return Ok(EtcdClient {
                servers: status.client_urls(),
                tls: EtcdTls::Bundle,
                prefix: None,
            });
        }
        if had_quorum {
            let why = format!("quorum lost: {detail}");
            set_condition(&mut p.status, CONDITION, false, "QuorumLost", why);
            return Err(Halt::NotReady("dedicated etcd quorum lost"));
        }
        set_condition(&mut p.status, CONDITION, false, "Starting", detail);
        // Ends with IN_PROGRESS: the loops look again soon instead of backing off.
        Err(Halt::NotReady("dedicated etcd starting"))
    }
}

/// `status.storage` for a dedicated etcd: no DataStore; every member with its node.
fn record(p: &mut Pass<'_>, status: &EtcdStatus) {
    let members = status
        .members
        .iter()
        .map(|m| {
            let placed = p.placed_etcd.iter().find(|x| x.name == m.name);
            EtcdMemberStatus {
                name: m.name.clone(),
                node: placed.map(|x| x.node.clone()).unwrap_or_default(),
                zone: placed.map(|x| x.zone.clone()).unwrap_or_default(),
                client_url: m.client_url.clone(),
                state: m.state.to_string(),
                replacements: m.replacements,
            }
        })
        .collect();
    p.status.storage = StorageStatus {
        driver: Some("etcd".into()),
        data_store_name: None,
        dedicated_etcd: Some(DedicatedEtcdStatus {
            quorum: status.has_quorum(),
            members,
        }),
        ..StorageStatus::default()
    };
}
