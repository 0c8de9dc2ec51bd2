//! The writer's quick path: a run of plain puts and kube-apiserver's guarded puts (its create
//! and its update: a txn comparing one key, putting that key on success, reading it or
//! nothing on failure) over distinct keys, evaluated from one read of their live rows and
//! written by one [`put_many`](LogWriter::put_many), with no savepoint: none of them can fail
//! halfway once its compare and lease are checked.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;

use super::dialect::LogWriter;
use super::write::{Done, Job, Meta, Op};
use crate::error::{DatastoreError, Result};
use crate::model::{
    Compare, Event, EventKind, KeyValue, LeaseId, PutRequest, PutResponse, RangeRequest,
    RangeResponse, RequestOp, ResponseOp, Revision, TxnResponse,
};

/// A write the quick path takes.
enum Quick<'a> {
    /// A put that asks for no previous value.
    Put(&'a PutRequest),
    /// A txn: `compare` on the put's key; `put` on success; on failure a plain get of the
    /// key (`read`) or nothing.
    Guarded {
        compare: &'a Compare,
        put: &'a PutRequest,
        read: bool,
    },
}

impl Quick<'_> {
    fn put(&self) -> &PutRequest {
        match self {
            Self::Put(p) | Self::Guarded { put: p, .. } => p,
        }
    }
}

/// A get of `key` alone at the current revision, whole values.
fn plain_get(r: &RangeRequest, key: &Bytes) -> bool {
    r.range.is_single() && r.range.key == *key && r.revision == 0 && !r.keys_only && !r.count_only
}

fn quick(op: &Op) -> Option<Quick<'_>> {
    match op {
        Op::Put(p) if !p.prev_kv => Some(Quick::Put(p)),
        Op::Txn(t) => {
            let ([compare], [RequestOp::Put(put)]) = (t.compare.as_slice(), t.success.as_slice())
            else {
                return None;
            };
            let read = match t.failure.as_slice() {
                [] => false,
                [RequestOp::Range(r)] if plain_get(r, &put.key) => true,
                _ => return None,
            };
            let same_key = compare.range.is_single() && compare.range.key == put.key;
            (same_key && !put.prev_kv).then_some(Quick::Guarded { compare, put, read })
        }
        _ => None,
    }
}

/// How many of `jobs`, from the first, the quick path takes: a run of quick writes to
/// distinct keys (a repeated key waits for the next run, to see the first one's write).
pub(crate) fn run_len(jobs: &[Job]) -> usize {
    let mut seen = HashSet::new();
    jobs.iter()
        .map_while(|j| quick(&j.op))
        .take_while(|q| seen.insert(q.put().key.clone()))
        .count()
}

/// The answers and the events of a run; `None` events when a plain put wrote (its create
/// revision and version are the database's to work out).
pub(crate) type Applied = (Vec<Result<Done>>, Option<Vec<(Revision, Event)>>);

/// Applies `jobs` (a run [`run_len`] measured) at the revisions after `meta.revision`.
pub(crate) async fn apply_run<W: LogWriter>(
    w: &mut W,
    jobs: &[Job],
    meta: &mut Meta,
) -> std::result::Result<Applied, W::Error> {
    let run: Vec<Quick<'_>> = jobs.iter().filter_map(|j| quick(&j.op)).collect();
    let guarded: Vec<&[u8]> = run
        .iter()
        .filter(|q| matches!(q, Quick::Guarded { .. }))
        .map(|q| q.put().key.as_ref())
        .collect();
    let live: HashMap<Bytes, KeyValue> = if guarded.is_empty() {
        HashMap::new()
    } else {
        w.live_many(&guarded)
            .await?
            .into_iter()
            .map(|kv| (kv.key.clone(), kv))
            .collect()
    };
    let mut leases: HashMap<LeaseId, bool> = HashMap::new();
    for q in &run {
        let id = q.put().lease;
        if id != 0 && !leases.contains_key(&id) {
            leases.insert(id, w.lease_exists(id).await?);
        }
    }
    let first = meta.revision + 1;
    let mut puts = Vec::with_capacity(run.len());
    let mut results = Vec::with_capacity(run.len());
    let mut events = Some(Vec::with_capacity(run.len()));
    for q in &run {
        let p = q.put();
        let row = live.get(&p.key);
        if let Quick::Guarded { compare, read, .. } = q
            && !compare.matches(row)
        {
            results.push(Ok(Done::Txn(failed(meta.revision, row, *read))));
            continue;
        }
        if p.lease != 0 && !leases.get(&p.lease).copied().unwrap_or(false) {
            results.push(Err(DatastoreError::LeaseNotFound { id: p.lease }));
            continue;
        }
        meta.revision += 1;
        puts.push(p);
        events = match (events, q) {
            (Some(mut all), Quick::Guarded { .. }) => {
                all.push((meta.revision, put_event(p, meta.revision, row)));
                Some(all)
            }
            _ => None,
        };
        let put = PutResponse {
            revision: meta.revision,
            prev_kv: None,
        };
        results.push(Ok(match q {
            Quick::Put(_) => Done::Put(put),
            Quick::Guarded { .. } => Done::Txn(TxnResponse {
                revision: meta.revision,
                succeeded: true,
                responses: vec![ResponseOp::Put(put)],
            }),
        }));
    }
    if !puts.is_empty() {
        w.put_many(first, &puts).await?;
    }
    Ok((results, events))
}

/// The event of `p` written at `rev` over the key's live row `prev`, as the log will hold
/// it (what [`event`](super::read::event) makes of the rows read back).
fn put_event(p: &PutRequest, rev: Revision, prev: Option<&KeyValue>) -> Event {
    Event {
        kind: EventKind::Put,
        kv: KeyValue {
            key: p.key.clone(),
            value: p.value.clone(),
            create_revision: prev.map_or(rev, |l| l.create_revision),
            mod_revision: rev,
            version: prev.map_or(1, |l| l.version + 1),
            lease: p.lease,
        },
        prev_kv: prev.cloned(),
    }
}

/// A guarded put whose compare failed, answering its get (when `read`) with the key's live
/// row.
fn failed(revision: Revision, row: Option<&KeyValue>, read: bool) -> TxnResponse {
    let responses = if read {
        let kvs: Vec<KeyValue> = row.cloned().into_iter().collect();
        vec![ResponseOp::Range(RangeResponse {
            revision,
            count: kvs.len() as i64,
            more: false,
            kvs,
        })]
    } else {
        Vec::new()
    };
    TxnResponse {
        revision,
        succeeded: false,
        responses,
    }
}
