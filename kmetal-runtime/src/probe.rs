//! What "the tenant answers" is made of: `/readyz` of one api-server replica, and who holds
//! a Lease (controller-manager and scheduler elect their leader through one in the tenant's
//! own `kube-system`).

use std::time::{Duration, SystemTime};

use crate::http::{Client, HttpError};

/// Why a probe did not pass.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// The request failed (refused, timed out, TLS refused).
    #[error(transparent)]
    Http(#[from] HttpError),
    /// The component answered, but not ok; the body lists the failing checks.
    #[error("answered {status}: {}", summary(body))]
    NotOk {
        /// HTTP status.
        status: u16,
        /// The answer.
        body: String,
    },
    /// The Lease object could not be read.
    #[error("Lease {name} is not a Lease object")]
    Malformed {
        /// The Lease.
        name: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// The failing lines of a `/readyz?verbose` answer, or its first line.
fn summary(body: &str) -> String {
    let failed: Vec<&str> = body.lines().filter(|l| l.starts_with("[-]")).collect();
    if failed.is_empty() {
        body.lines()
            .next()
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect()
    } else {
        failed.join("; ")
    }
}

/// Passes when `/readyz` answers 200.
pub async fn readyz(client: &Client) -> Result<(), ProbeError> {
    let r = client.get("/readyz?verbose").await?;
    if r.status == 200 {
        Ok(())
    } else {
        Err(ProbeError::NotOk {
            status: r.status,
            body: r.text(),
        })
    }
}

/// Who holds a Lease and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    /// `spec.holderIdentity`.
    pub holder: String,
    /// `spec.renewTime`.
    pub renewed: Option<SystemTime>,
    /// `spec.leaseDurationSeconds`.
    pub duration: Duration,
}

impl LeaseHolder {
    /// Whether the lease is held at `now`: renewed within its duration.
    pub fn is_current(&self, now: SystemTime) -> bool {
        !self.holder.is_empty()
            && self.renewed.is_some_and(|r| {
                now.duration_since(r)
                    .map_or(true, |age| age <= self.duration)
            })
    }
}

/// The holder of Lease `namespace/name`; `None` when there is no such Lease.
pub async fn lease(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<LeaseHolder>, ProbeError> {
    let path = format!("/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}");
    let r = client.get(&path).await?;
    match r.status {
        200 => parse_lease(name, &r.body).map(Some),
        404 => Ok(None),
        status => Err(ProbeError::NotOk {
            status,
            body: r.text(),
        }),
    }
}

fn parse_lease(name: &str, body: &[u8]) -> Result<LeaseHolder, ProbeError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Spec {
        #[serde(default)]
        holder_identity: String,
        renew_time: Option<String>,
        #[serde(default)]
        lease_duration_seconds: u64,
    }
    #[derive(serde::Deserialize)]
    struct Lease {
        spec: Spec,
    }
    let lease: Lease = serde_json::from_slice(body).map_err(|source| ProbeError::Malformed {
        name: name.to_owned(),
        source,
    })?;
    Ok(LeaseHolder {
        holder: lease.spec.holder_identity,
        renewed: lease
            .spec
            .renew_time
            .as_deref()
            .and_then(kmetal_core::time::parse_rfc3339),
        duration: Duration::from_secs(lease.spec.lease_duration_seconds),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_lease_and_judges_it_by_its_renewal() {
        let body = br#"{"kind":"Lease","spec":{"holderIdentity":"h_1","leaseDurationSeconds":15,
            "renewTime":"2026-12-01T21:30:00.000001Z","acquireTime":"2026-12-01T21:00:00.000000Z"}}"#;
        let l = parse_lease("kube-scheduler", body).expect("lease");
        assert_eq!(l.holder, "h_1");
        let renewed = l.renewed.expect("renewed");
        assert!(l.is_current(renewed + Duration::from_secs(15)));
        assert!(!l.is_current(renewed + Duration::from_secs(16)));
        let released = parse_lease("x", br#"{"spec":{"holderIdentity":""}}"#).expect("lease");
        assert!(!released.is_current(SystemTime::now()));
        assert!(matches!(
            parse_lease("x", b"[]"),
            Err(ProbeError::Malformed { .. })
        ));
    }

    #[test]
    fn a_failed_readyz_names_the_failing_checks() {
        let e = ProbeError::NotOk {
            status: 500,
            body: "[+]ping ok\n[-]etcd failed: reason withheld\n[-]poststarthook/x failed\nreadyz check failed".into(),
        };
        assert_eq!(
            e.to_string(),
            "answered 500: [-]etcd failed: reason withheld; [-]poststarthook/x failed"
        );
    }
}
