//! What `kubeadm init` does once a new cluster answers, and a hosted control plane must do
//! in its place: bind kubeadm's `kubeadm:cluster-admins` group to `cluster-admin`, which is
//! what makes the bundle's `admin.conf` an admin.

use crate::http::Client;
use crate::probe::ProbeError;

/// Creates the binding through `client` (a `system:masters` identity: the bundle's
/// `super-admin.conf`); one that exists already is fine.
pub async fn bind_cluster_admins(client: &Client) -> Result<(), ProbeError> {
    let body = br#"{"apiVersion":"rbac.authorization.k8s.io/v1","kind":"ClusterRoleBinding",
        "metadata":{"name":"kubeadm:cluster-admins"},
        "roleRef":{"apiGroup":"rbac.authorization.k8s.io","kind":"ClusterRole","name":"cluster-admin"},
        "subjects":[{"apiGroup":"rbac.authorization.k8s.io","kind":"Group","name":"kubeadm:cluster-admins"}]}"#;
    let r = client
        .request(
            "POST",
            "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
            Some(body),
        )
        .await?;
    match r.status {
        201 | 409 => Ok(()),
        status => Err(ProbeError::NotOk {
            status,
            body: r.text(),
        }),
    }
}
