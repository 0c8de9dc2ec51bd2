//! Reads shared by the dialects: a range's page and count, the count cache of paginated
//! lists, key-range bounds as SQL parameters, and events from log rows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::dialect::{LogRead, Page, RangeOutcome};
use crate::model::{Event, EventKind, KeyRange, KeyValue, LeaseId, RangeRequest, Revision};

/// Bounds of a key range as SQL parameters: (from, to) with `to` None = unbounded; a single
/// key is (key, key + "\0").
pub(crate) fn bounds(r: &KeyRange) -> (Vec<u8>, Option<Vec<u8>>) {
    if r.range_end.is_empty() {
        let mut end = r.key.to_vec();
        end.push(0);
        return (r.key.to_vec(), Some(end));
    }
    let from = if r.key.as_ref() == [0] && r.range_end.as_ref() == [0] {
        Vec::new()
    } else {
        r.key.to_vec()
    };
    let to = (r.range_end.as_ref() != [0]).then(|| r.range_end.to_vec());
    (from, to)
}

/// The revision a read at `requested` is served from: `None` for the current one (the
/// cheap path through `kmetal_current`), else the past revision.
pub(crate) fn past(requested: Revision, current: Revision) -> Option<Revision> {
    (requested > 0 && requested < current).then_some(requested)
}

/// Counts of paginated lists: at a fixed revision, the count of `[lastKey+"\0", end)` is the
/// previous page's count minus its keys, so only a list's first page pays for a full count.
#[derive(Debug, Clone, Default)]
pub(crate) struct Counts(Arc<Mutex<HashMap<CountKey, i64>>>);

/// (range end, revision, page start).
type CountKey = (Bytes, Revision, Bytes);

/// Most remembered page counts (a handful of concurrent paginated lists).
const COUNT_CACHE_SIZE: usize = 1024;

impl Counts {
    fn known(&self, range: &KeyRange, at: Revision) -> Option<i64> {
        let key = (range.range_end.clone(), at, range.key.clone());
        self.0.lock().ok()?.get(&key).copied()
    }

    fn remember(&self, range: &KeyRange, at: Revision, page: &Page) {
        // Only a page with more after it starts a continuation worth remembering; the lock
        // is taken for those alone.
        let (true, Some(last)) = (page.more, page.kvs.last()) else {
            return;
        };
        let Ok(mut cache) = self.0.lock() else {
            return;
        };
        if cache.len() >= COUNT_CACHE_SIZE {
            cache.clear();
        }
        let mut next = last.key.to_vec();
        next.push(0);
        let key = (range.range_end.clone(), at, Bytes::from(next));
        cache.insert(key, page.count - page.kvs.len() as i64);
    }
}

/// A range's page (`req.limit`, 0 = all) and its count at `at`; `known` is the count when the
/// caller already has it.
pub(crate) async fn read_range<R: LogRead + ?Sized>(
    r: &mut R,
    req: &RangeRequest,
    at: Option<Revision>,
    known: Option<i64>,
) -> Result<Page, R::Error> {
    if req.count_only {
        let count = r.count(&req.range, at).await?;
        return Ok(Page {
            count,
            ..Page::default()
        });
    }
    let limited = req.limit > 0;
    let probe = limited.then(|| req.limit.saturating_add(1));
    let mut kvs = r.rows(&req.range, at, probe, req.keys_only).await?;
    let more = limited && kvs.len() as i64 > req.limit;
    let count = if more {
        kvs.truncate(usize::try_from(req.limit).unwrap_or(usize::MAX));
        match known {
            Some(n) => n,
            None => r.count(&req.range, at).await?,
        }
    } else {
        kvs.len() as i64
    };
    Ok(Page { kvs, more, count })
}

/// A range request in one snapshot: the revision checks, then the page (paginated lists
/// count once, through `counts`).
pub(crate) async fn range_in<R: LogRead + ?Sized>(
    r: &mut R,
    req: &RangeRequest,
    counts: &Counts,
) -> Result<RangeOutcome, R::Error> {
    let (current, compacted) = r.meta().await?;
    if req.revision > current || (req.revision > 0 && req.revision < compacted) {
        return Ok(RangeOutcome::OutOfBounds { current, compacted });
    }
    let at = past(req.revision, current);
    let at_rev = at.unwrap_or(current);
    let paged = req.limit > 0 && !req.count_only;
    let known = paged.then(|| counts.known(&req.range, at_rev)).flatten();
    let page = read_range(r, req, at, known).await?;
    counts.remember(&req.range, at_rev, &page);
    Ok(RangeOutcome::Rows { current, page })
}

/// One `kmetal_kv` row as the dialects read it for events.
#[derive(Debug, Default)]
pub(crate) struct LogRow {
    /// Its revision.
    pub(crate) rev: Revision,
    /// Whether it is a tombstone.
    pub(crate) deleted: bool,
    /// Create revision.
    pub(crate) create_revision: Revision,
    /// Version.
    pub(crate) version: i64,
    /// Lease.
    pub(crate) lease: LeaseId,
    /// Value.
    pub(crate) value: Bytes,
}

/// The event of `row` of `key`, with `prev` (the row it replaced, if any) as its previous
/// value when that row was live.
pub(crate) fn event(key: Bytes, row: LogRow, prev: Option<LogRow>) -> (Revision, Event) {
    let prev_kv = prev.filter(|p| !p.deleted).map(|p| KeyValue {
        key: key.clone(),
        value: p.value,
        create_revision: p.create_revision,
        mod_revision: p.rev,
        version: p.version,
        lease: p.lease,
    });
    let rev = row.rev;
    let (kind, kv) = if row.deleted {
        let kv = KeyValue {
            key,
            mod_revision: rev,
            ..KeyValue::default()
        };
        (EventKind::Delete, kv)
    } else {
        let kv = KeyValue {
            key,
            value: row.value,
            create_revision: row.create_revision,
            mod_revision: rev,
            version: row.version,
            lease: row.lease,
        };
        (EventKind::Put, kv)
    };
    (rev, Event { kind, kv, prev_kv })
}
