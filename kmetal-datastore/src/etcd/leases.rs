//! A tenant's own leases on a shared etcd.
//!
//! etcd's leases are the cluster's: any user may list every lease id, keep any lease alive
//! and attach keys to it, and a lease carrying another tenant's keys can no longer be revoked
//! by its owner (etcd checks the revoker's permission on every attached key). So on a shared
//! cluster each tenant's lease ids carry a tag of its own in their upper 32 bits: the driver
//! grants ids `tag << 32 | n`, lists only its tag's, and answers every other id as etcd
//! answers a lease that does not exist (`LeaseNotFound`), whether it is kept alive, revoked,
//! described or named by a put; granting a foreign id is refused outright.
//!
//! Tags are handed out by the provisioner, one per tenant and never reused, from a counter
//! under `\0kmetal/`, a key no tenant's range covers (tenant prefixes start with `/`). The
//! tenant's role may read its own tag key and nothing else there, so it learns its tag and
//! cannot change it.

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use ring::rand::SecureRandom;

use crate::error::{DatastoreError, Result};
use crate::model::LeaseId;

/// The counter of handed-out tags.
const COUNTER: &[u8] = b"\0kmetal/lease-tags";

/// The key that holds the lease tag of the tenant with `prefix` (`/<schema>/`).
pub(crate) fn tag_key(prefix: &[u8]) -> Vec<u8> {
    let mut k = b"\0kmetal/lease-tag".to_vec();
    k.extend_from_slice(prefix);
    k
}

/// How many times allocation retries when another provisioner moved the counter under it.
const CAS_ATTEMPTS: usize = 16;

/// The tag of the tenant with `prefix`: the one it has, or the next unused one.
pub(crate) async fn allocate(admin: &Client, prefix: &[u8]) -> Result<i64, etcd_client::Error> {
    let key = tag_key(prefix);
    let mut kv = admin.kv_client();
    for _ in 0..CAS_ATTEMPTS {
        let r = kv.get(key.clone(), None).await?;
        if let Some(tag) = r.kvs().first().and_then(|k| parse(k.value())) {
            return Ok(tag);
        }
        let c = kv.get(COUNTER, None).await?;
        let (last, version) = c
            .kvs()
            .first()
            .map_or((0, 0), |k| (parse(k.value()).unwrap_or(0), k.version()));
        let next = last + 1;
        let txn = Txn::new()
            .when([
                Compare::version(COUNTER, CompareOp::Equal, version),
                Compare::version(key.clone(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(COUNTER, next.to_string(), None),
                TxnOp::put(key.clone(), next.to_string(), None),
            ]);
        if kv.txn(txn).await?.succeeded() {
            return Ok(next);
        }
    }
    Err(etcd_client::Error::InvalidArgs(
        "the lease tag counter kept moving under this provisioner".into(),
    ))
}

fn parse(v: &[u8]) -> Option<i64> {
    std::str::from_utf8(v)
        .ok()?
        .parse()
        .ok()
        .filter(|t| (1..=i64::from(i32::MAX)).contains(t))
}

/// The tag of the tenant with `prefix`, read as the tenant; `None` when the slice was
/// provisioned without one (its leases are then the cluster's, as before tags existed).
pub(crate) async fn load(
    client: &Client,
    prefix: &[u8],
) -> Result<Option<i64>, etcd_client::Error> {
    let r = client.kv_client().get(tag_key(prefix), None).await;
    match r {
        Ok(r) => Ok(r.kvs().first().and_then(|k| parse(k.value()))),
        // A role without read on the tag key: provisioned before tags.
        Err(e) if super::errors::classify(&e) == super::errors::Kind::PermissionDenied => Ok(None),
        Err(e) => Err(e),
    }
}

/// The lease ids one tenant owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LeaseWall {
    tag: i64,
}

impl LeaseWall {
    pub(crate) fn new(tag: i64) -> Self {
        Self { tag }
    }

    /// Whether `id` is one of this tenant's (0, no lease, always is).
    pub(crate) fn owns(&self, id: LeaseId) -> bool {
        id == 0 || id >> 32 == self.tag
    }

    /// A foreign id looks like a lease that does not exist.
    pub(crate) fn check(&self, id: LeaseId) -> Result<()> {
        if self.owns(id) {
            Ok(())
        } else {
            Err(DatastoreError::LeaseNotFound { id })
        }
    }

    /// The id to grant: a fresh one of ours for 0, the asked one if it is ours.
    pub(crate) fn grant_id(&self, asked: LeaseId) -> Result<LeaseId> {
        if asked == 0 {
            let mut b = [0u8; 4];
            ring::rand::SystemRandom::new()
                .fill(&mut b)
                .map_err(|_| DatastoreError::unavailable("no randomness for a lease id"))?;
            // Never 0 in the low half, so no id of ours is `tag << 32` alone.
            let low = i64::from(u32::from_be_bytes(b).max(1));
            Ok(self.tag << 32 | low)
        } else if self.owns(asked) {
            Ok(asked)
        } else {
            Err(DatastoreError::PermissionDenied {
                source: Some(format!("lease {asked:#x} is outside this tenant's lease ids").into()),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_the_tag_and_foreign_ones_are_refused() {
        let (a, b) = (LeaseWall::new(1), LeaseWall::new(2));
        let id = a.grant_id(0).expect("an id");
        assert!(a.owns(id) && !b.owns(id));
        assert!(id > 0, "etcd lease ids are positive");
        assert!(matches!(
            b.check(id),
            Err(DatastoreError::LeaseNotFound { .. })
        ));
        assert!(matches!(
            b.grant_id(id),
            Err(DatastoreError::PermissionDenied { .. })
        ));
        assert_eq!(a.grant_id(id).expect("its own"), id);
        assert!(b.check(0).is_ok(), "no lease is everyone's");
        let top = LeaseWall::new(i64::from(i32::MAX)).grant_id(0).expect("id");
        assert!(top > 0);
    }

    #[test]
    fn tag_keys_are_outside_every_tenant_range() {
        assert!(tag_key(b"/t1/").starts_with(b"\0"));
        assert_eq!(parse(b"7"), Some(7));
        assert_eq!(parse(b"0"), None);
        assert_eq!(parse(b"x"), None);
    }
}
