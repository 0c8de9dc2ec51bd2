//! The control-plane phase: the tenant's kube-apiserver replicas, controller-manager and
//! scheduler run by the configured runtime against the tenant's etcd endpoint and
//! Konnectivity server; Ready only once they answer. Status records every component.

use kmetal::core::TenantControlPlane;
use kmetal::core::tenant::{ComponentStatus, DeploymentStatus};
use kmetal::pki::Bundle;
use kmetal::runtime::{
    CatalogError, Component, ControlPlanePlan, ControlPlaneStatus, Egress, EtcdClient,
    ReplicaState, RuntimeError,
};

use crate::phases::{Halt, Pass};
use crate::reconcile::{Reconciler, set_condition};

const CONDITION: &str = "ControlPlaneReady";

impl Reconciler {
    /// Runs the tenant's control plane; `Ok(false)` when this operator runs none.
    pub(crate) async fn control_plane(
        &self,
        p: &mut Pass<'_>,
        tcp: &TenantControlPlane,
        bundle: &Bundle,
        etcd: EtcdClient,
    ) -> Result<bool, Halt> {
        let Some(runtime) = &self.settings.runtime else {
            let why = "this operator runs no control planes (--runtime none)".to_string();
            set_condition(&mut p.status, CONDITION, false, "NoRuntime", why);
            return Ok(false);
        };
        let egress = self.egress_socket(p.key).map(Egress::GrpcUds);
        let plan = match ControlPlanePlan::from_tenant(tcp, bundle.clone(), etcd, egress) {
            Ok(plan) => plan,
            Err(e) => {
                let why = kmetal::Report(&e).to_string();
                set_condition(&mut p.status, CONDITION, false, "InvalidSpec", why);
                return Err(Halt::NotReady("control plane"));
            }
        };
        match runtime.ensure(&plan).await {
            Ok(status) => {
                record(p, &plan, &status);
                if status.is_ready() {
                    let msg = format!(
                        "{} api-server replicas ready at https://{}",
                        plan.replicas, status.endpoint
                    );
                    set_condition(&mut p.status, CONDITION, true, "Running", msg);
                    Ok(true)
                } else if let Some(q) = status.queued {
                    set_condition(
                        &mut p.status,
                        CONDITION,
                        false,
                        "StartQueued",
                        q.to_string(),
                    );
                    Err(Halt::NotReady("control plane queued"))
                } else {
                    let why = status.problems().join("; ");
                    set_condition(&mut p.status, CONDITION, false, "ReplicasNotReady", why);
                    Err(Halt::NotReady("control plane starting"))
                }
            }
            Err(e) => {
                let reason = match &e {
                    RuntimeError::Catalog(CatalogError::NoBinary { .. }) => "VersionUnavailable",
                    RuntimeError::Flags { .. } => "InvalidExtraArgs",
                    _ => "RuntimeFailed",
                };
                let why = kmetal::Report(&e).to_string();
                set_condition(&mut p.status, CONDITION, false, reason, why);
                Err(Halt::NotReady("control plane"))
            }
        }
    }
}

/// `status.kubernetesResources.deployment` from what the runtime reports.
fn record(p: &mut Pass<'_>, plan: &ControlPlanePlan, status: &ControlPlaneStatus) {
    let ready = status
        .replicas
        .iter()
        .filter(|r| {
            r.replica.component == Component::ApiServer && matches!(r.state, ReplicaState::Ready)
        })
        .count();
    p.status.kubernetes_resources.deployment = Some(DeploymentStatus {
        replicas: plan.replicas as i64,
        ready_replicas: ready as i64,
        components: status
            .replicas
            .iter()
            .map(|r| ComponentStatus {
                name: r.replica.to_string(),
                state: r.state.to_string(),
                restarts: r.restarts,
            })
            .collect(),
    });
}
