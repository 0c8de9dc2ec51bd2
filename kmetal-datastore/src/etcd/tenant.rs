//! A tenant's own view of a shared etcd: its revision and its compaction.
//!
//! etcd's revision is the cluster's: every tenant's writes move it. A tenant sees its own
//! instead: the revision of its last write, kept as the mod revision of its marker key,
//! `/<schema>/` itself (inside the role's range, yet no tenant key maps to it: tenant keys are
//! never empty). Every write the driver sends touches the marker in the same transaction
//! (a put that keeps its value), and every read reads it alongside, so a response's revision
//! is the tenant's. Revisions stay etcd's own numbers, only sparser: events, mod revisions
//! and reads at a revision are untouched.
//!
//! Compacting etcd is the cluster's too (and etcd 3.6 refuses it to a tenant's role), so a
//! tenant's compaction is kept in the marker's value; reads and watches below it fail with
//! `Compacted` as etcd's would. The marker write a compaction makes would move the tenant's
//! revision, which a compaction must not: the value also names the version that write gave
//! the marker and the revision before it, which stands while the version does. The cluster
//! is compacted by its operator, up to the lowest of its tenants' compactions
//! ([`EtcdProvisioner::compact_shared`](super::EtcdProvisioner::compact_shared)).
//!
//! Not covered: keys etcd deletes itself when their lease expires move no marker, so their
//! delete events may carry revisions above the tenant's revision; reads at such a revision
//! still succeed (only etcd's own revision bounds them).

use std::sync::atomic::{AtomicI64, Ordering};

use bytes::Bytes;
use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};

use crate::error::{DatastoreError, Result};
use crate::model::{KeyValue, RequestOp, Revision, TxnRequest};

/// How many times a compaction retries when another gateway moved the marker under it.
const CAS_ATTEMPTS: usize = 8;

/// What the marker's value holds: `C` or `C,V,R` (compaction `C`, written by a compaction
/// that left the marker at version `V` when the tenant's revision was `R`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Marker {
    compacted: Revision,
    hidden: Option<(i64, Revision)>,
}

impl Marker {
    fn parse(value: &[u8]) -> Self {
        let text = std::str::from_utf8(value).unwrap_or_default();
        let mut fields = text.split(',').map(|f| f.trim().parse::<i64>().ok());
        let compacted = fields.next().flatten().unwrap_or(0);
        let hidden = match (fields.next().flatten(), fields.next().flatten()) {
            (Some(v), Some(r)) => Some((v, r)),
            _ => None,
        };
        Self { compacted, hidden }
    }

    /// The tenant's revision, given the marker row's version and mod revision: the one
    /// before the compaction's write while that write is the marker's last.
    fn tenant_revision(&self, version: i64, mod_revision: Revision) -> Revision {
        match self.hidden {
            Some((v, before)) if v == version => before,
            _ => mod_revision,
        }
    }

    fn text(&self) -> String {
        match self.hidden {
            Some((v, r)) => format!("{},{v},{r}", self.compacted),
            None => self.compacted.to_string(),
        }
    }
}

/// A tenant's marker key and its compaction as last seen.
#[derive(Debug)]
pub(crate) struct TenantView {
    marker: Vec<u8>,
    /// The highest compaction this process has read or written; other gateways may be
    /// ahead, which only lets a read below their compaction succeed here (the data is still
    /// there).
    compacted: AtomicI64,
}

impl TenantView {
    /// The view of the tenant whose keys live under `prefix`.
    pub(crate) fn new(prefix: &Bytes) -> Self {
        Self {
            marker: prefix.to_vec(),
            compacted: AtomicI64::new(0),
        }
    }

    /// The compaction revision as last seen.
    pub(crate) fn compacted(&self) -> Revision {
        self.compacted.load(Ordering::Relaxed)
    }

    /// The op a writing branch ends with: touches the marker, keeping its value.
    pub(crate) fn touch(&self) -> TxnOp {
        TxnOp::put(
            self.marker.clone(),
            Vec::new(),
            Some(PutOptions::new().with_ignore_value()),
        )
    }

    /// The op a reading branch ends with: reads the marker.
    pub(crate) fn read(&self) -> TxnOp {
        TxnOp::get(self.marker.clone(), None)
    }

    /// The tenant's revision from the marker's row (stripped of the prefix, so its key is
    /// empty); `fallback` (etcd's revision) when there is no marker.
    pub(crate) fn revision(&self, row: Option<&KeyValue>, fallback: Revision) -> Revision {
        let Some(kv) = row else { return fallback };
        let m = Marker::parse(&kv.value);
        self.compacted.fetch_max(m.compacted, Ordering::Relaxed);
        m.tenant_revision(kv.version, kv.mod_revision)
    }

    /// Reads the marker, creating it if the tenant has none yet.
    pub(crate) async fn load(
        &self,
        client: &Client,
    ) -> std::result::Result<(), etcd_client::Error> {
        let mut kv = client.kv_client();
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.marker.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(self.marker.clone(), "0", None)])
            .or_else([TxnOp::get(self.marker.clone(), None)]);
        let r = kv.txn(txn).await?;
        if let Some(etcd_client::TxnOpResponse::Get(g)) = r.op_responses().into_iter().next()
            && let Some(kv) = g.kvs().first()
        {
            let m = Marker::parse(kv.value());
            self.compacted.fetch_max(m.compacted, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Refuses a read at `revision` below the compaction, as etcd does.
    pub(crate) fn check(&self, revision: Revision) -> Result<()> {
        let compacted = self.compacted();
        if revision > 0 && revision < compacted {
            return Err(DatastoreError::Compacted {
                requested: revision,
                compacted,
            });
        }
        Ok(())
    }

    /// [`check`](Self::check) for every range inside a transaction.
    pub(crate) fn check_txn(&self, t: &TxnRequest) -> Result<()> {
        for op in t.success.iter().chain(&t.failure) {
            match op {
                RequestOp::Range(r) => self.check(r.revision)?,
                RequestOp::Txn(inner) => self.check_txn(inner)?,
                _ => {}
            }
        }
        Ok(())
    }

    /// Moves the compaction to `revision`, which must lie above it and at or below the
    /// tenant's revision (etcd's rules), leaving the tenant's revision where it was; a
    /// compare-and-swap on the marker keeps concurrent gateways from moving it back.
    /// Returns the tenant's revision.
    pub(crate) async fn compact(
        &self,
        client: &Client,
        revision: Revision,
    ) -> std::result::Result<Result<Revision>, etcd_client::Error> {
        let mut kv = client.kv_client();
        for _ in 0..CAS_ATTEMPTS {
            let got = kv.get(self.marker.clone(), Some(GetOptions::new())).await?;
            let Some(row) = got.kvs().first() else {
                return Ok(Err(DatastoreError::Backend {
                    source: "the tenant's marker key is gone (deprovisioned?)".into(),
                }));
            };
            let old = Marker::parse(row.value());
            self.compacted.fetch_max(old.compacted, Ordering::Relaxed);
            let current = old.tenant_revision(row.version(), row.mod_revision());
            if revision > current {
                return Ok(Err(DatastoreError::FutureRevision {
                    requested: revision,
                    current,
                }));
            }
            if revision <= old.compacted {
                return Ok(Err(DatastoreError::Compacted {
                    requested: revision,
                    compacted: old.compacted,
                }));
            }
            let new = Marker {
                compacted: revision,
                hidden: Some((row.version() + 1, current)),
            };
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    self.marker.clone(),
                    CompareOp::Equal,
                    row.mod_revision(),
                )])
                .and_then([TxnOp::put(self.marker.clone(), new.text(), None)]);
            if kv.txn(txn).await?.succeeded() {
                self.compacted.fetch_max(revision, Ordering::Relaxed);
                return Ok(Ok(current));
            }
        }
        Ok(Err(DatastoreError::Backend {
            source: "the tenant's compaction marker kept moving under the compaction".into(),
        }))
    }
}

/// The compaction revisions of the tenants whose prefixes are `prefixes`, read with a client
/// that may read them all (the cluster's root): 0 for a tenant that never compacted.
pub(crate) async fn compactions(
    client: &Client,
    prefixes: &[Bytes],
) -> std::result::Result<Vec<Revision>, etcd_client::Error> {
    let mut kv = client.kv_client();
    let mut out = Vec::with_capacity(prefixes.len());
    for p in prefixes {
        let got = kv.get(p.to_vec(), None).await?;
        out.push(
            got.kvs()
                .first()
                .map_or(0, |kv| Marker::parse(kv.value()).compacted),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(value: &str, version: i64, mod_revision: Revision) -> KeyValue {
        KeyValue {
            key: Bytes::new(),
            value: Bytes::from(value.to_string()),
            create_revision: 1,
            mod_revision,
            version,
            lease: 0,
        }
    }

    #[test]
    fn reads_below_the_compaction_fail() {
        let t = TenantView::new(&Bytes::from_static(b"/t/"));
        t.compacted.store(10, Ordering::Relaxed);
        assert!(
            t.check(0).is_ok(),
            "the current revision is never compacted"
        );
        assert!(
            t.check(10).is_ok(),
            "the compaction revision itself is readable"
        );
        assert!(matches!(
            t.check(9),
            Err(DatastoreError::Compacted {
                requested: 9,
                compacted: 10
            })
        ));
        let mut txn = TxnRequest::default();
        txn.failure.push(RequestOp::Range(
            crate::model::RangeRequest::get("k").at_revision(3),
        ));
        assert!(t.check_txn(&txn).is_err());
    }

    #[test]
    fn a_compaction_leaves_the_tenant_revision_alone() {
        let t = TenantView::new(&Bytes::from_static(b"/t/"));
        assert_eq!(t.revision(Some(&row("0", 4, 40)), 99), 40, "the last write");
        assert_eq!(t.revision(None, 99), 99, "no marker: etcd's revision");
        // The compaction wrote version 5 at revision 45, when the tenant was at 40.
        assert_eq!(t.revision(Some(&row("30,5,40", 5, 45)), 99), 40);
        assert_eq!(t.compacted(), 30);
        // A later write touches the marker (version 6): its revision is the tenant's.
        assert_eq!(t.revision(Some(&row("30,5,40", 6, 47)), 99), 47);
        assert_eq!(Marker::parse(b"junk"), Marker::default());
        let m = Marker {
            compacted: 3,
            hidden: Some((2, 1)),
        };
        assert_eq!(Marker::parse(m.text().as_bytes()), m);
    }

    #[test]
    fn writing_branches_are_found() {
        use crate::etcd::writes;
        use crate::model::{PutRequest, RangeRequest};
        assert!(!writes(&[RequestOp::Range(RangeRequest::get("k"))]));
        assert!(writes(&[RequestOp::Put(PutRequest::new("k", "v"))]));
        let nested = TxnRequest {
            failure: vec![RequestOp::Put(PutRequest::new("k", "v"))],
            ..TxnRequest::default()
        };
        assert!(writes(&[RequestOp::Txn(nested)]));
    }
}
