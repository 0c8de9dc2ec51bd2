//! A linearizability checker for histories of register operations (put, get, compare-and-set)
//! on independent keys, the model etcd's robustness tests check with porcupine.
//!
//! Each operation has its invocation and return times and what it returned. One whose outcome
//! the client never learned (a timeout, a dropped connection) returns at infinity: it may have
//! taken effect at any point after its invocation, or never. Keys are checked one by one
//! (operations on different keys commute), each by a depth-first search for an order that
//! respects real time (Wing & Gong, with Lowe's memoisation of the linearized set and the
//! register's value), so a history of a few thousand operations checks in well under a second.

use std::collections::HashSet;

/// A register's value: `None` while the key is absent.
pub type Value = Option<String>;

/// What one operation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpKind {
    /// Wrote `value`.
    Put {
        /// The value written (unique per put, so reads tell writes apart).
        value: String,
    },
    /// Read the key; `None` if the read's result is unknown (it constrains nothing).
    Get {
        /// What it returned, when it returned.
        got: Option<Value>,
    },
    /// Wrote `new` if the key held `expected`; `succeeded` as the client saw it, `None` when
    /// the outcome is unknown.
    Cas {
        /// The value compared against.
        expected: Value,
        /// The value written on success.
        new: String,
        /// Whether it swapped, when known.
        succeeded: Option<bool>,
    },
}

/// One operation of a history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// The key.
    pub key: String,
    /// When it was invoked (any monotonic clock, e.g. nanoseconds since the run began).
    pub call: u64,
    /// When it returned; `None` when the client never learned its outcome.
    pub ret: Option<u64>,
    /// What it did.
    pub kind: OpKind,
}

/// A history that has no linearization, with the key whose operations have none.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no linearization of the {ops} operations on key {key}")]
pub struct Violation {
    /// The key.
    pub key: String,
    /// How many operations it had.
    pub ops: usize,
}

/// Settles the outcomes clients never learned with what a watch saw written (etcd's
/// robustness tests patch their histories the same way): a write of unknown outcome whose
/// value was written happened, before `end` (when the watch was read), so it returns by
/// then; one whose value never was did nothing and goes, as does a CAS that wrote nothing
/// (its outcome says nothing either way). Values must be unique per write.
pub fn resolve(history: &[Op], written: &HashSet<String>, end: u64) -> Vec<Op> {
    history
        .iter()
        .filter_map(|op| {
            if op.ret.is_some() {
                return Some(op.clone());
            }
            let (value, kind) = match &op.kind {
                OpKind::Put { value } => (value, op.kind.clone()),
                OpKind::Cas { expected, new, .. } => (
                    new,
                    OpKind::Cas {
                        expected: expected.clone(),
                        new: new.clone(),
                        succeeded: Some(true),
                    },
                ),
                OpKind::Get { .. } => return None,
            };
            written.contains(value).then(|| Op {
                ret: Some(end),
                kind,
                ..op.clone()
            })
        })
        .collect()
}

/// Checks `history`; the keys' operation counts on success.
pub fn check(history: &[Op]) -> Result<usize, Violation> {
    let mut keys: Vec<&str> = history.iter().map(|o| o.key.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    for key in &keys {
        let mut ops: Vec<&Op> = history.iter().filter(|o| o.key == *key).collect();
        ops.sort_by_key(|o| o.call);
        if !linearizable(&ops) {
            return Err(Violation {
                key: (*key).to_owned(),
                ops: ops.len(),
            });
        }
    }
    Ok(keys.len())
}

/// The register after `op` from `state`, if `op` could return what it did there.
fn step(state: &Value, op: &OpKind) -> Option<Value> {
    match op {
        OpKind::Put { value } => Some(Some(value.clone())),
        OpKind::Get { got: None } => Some(state.clone()),
        OpKind::Get { got: Some(g) } => (g == state).then(|| state.clone()),
        OpKind::Cas {
            expected,
            new,
            succeeded,
        } => {
            let swaps = expected == state;
            match succeeded {
                Some(s) if *s != swaps => None,
                _ if swaps => Some(Some(new.clone())),
                _ => Some(state.clone()),
            }
        }
    }
}

fn linearizable(ops: &[&Op]) -> bool {
    use std::collections::BTreeMap;
    let n = ops.len();
    let words = n.div_ceil(64);
    let mut done = vec![0u64; words];
    let mut seen: HashSet<(Vec<u64>, Value)> = HashSet::new();
    // The returns of the operations not linearized yet (a multiset), for the horizon.
    let mut pending: BTreeMap<u64, usize> = BTreeMap::new();
    let mut returned = 0usize;
    for o in ops {
        if let Some(r) = o.ret {
            *pending.entry(r).or_default() += 1;
            returned += 1;
        }
    }
    let take = |pending: &mut BTreeMap<u64, usize>, r: Option<u64>| {
        if let Some(r) = r
            && let Some(c) = pending.get_mut(&r)
        {
            *c -= 1;
            if *c == 0 {
                pending.remove(&r);
            }
        }
    };
    let put_back = |pending: &mut BTreeMap<u64, usize>, r: Option<u64>| {
        if let Some(r) = r {
            *pending.entry(r).or_default() += 1;
        }
    };
    // Depth-first, with an explicit stack of (op linearized, state before it).
    let mut stack: Vec<(usize, Value)> = Vec::new();
    let mut state: Value = None;
    let mut from = 0usize;
    let mut linearized_returned = 0usize;
    let is_done = |d: &[u64], i: usize| d[i / 64] & (1 << (i % 64)) != 0;
    loop {
        // Finished when every operation that returned is linearized (the rest never happened).
        if linearized_returned == returned {
            return true;
        }
        // A candidate must be invoked before the earliest return of any pending operation;
        // operations are sorted by invocation, so the first one past it ends the search.
        let horizon = pending.keys().next().copied().unwrap_or(u64::MAX);
        let mut chosen = None;
        for i in from..n {
            if ops[i].call > horizon {
                break;
            }
            if is_done(&done, i) {
                continue;
            }
            if let Some(next) = step(&state, &ops[i].kind) {
                done[i / 64] |= 1 << (i % 64);
                if seen.insert((done.clone(), next.clone())) {
                    chosen = Some((i, next));
                    break;
                }
                done[i / 64] &= !(1 << (i % 64));
            }
        }
        match chosen {
            Some((i, next)) => {
                take(&mut pending, ops[i].ret);
                linearized_returned += usize::from(ops[i].ret.is_some());
                stack.push((i, std::mem::replace(&mut state, next)));
                from = 0;
            }
            None => {
                // Undo the last choice and try the candidates after it.
                let Some((i, before)) = stack.pop() else {
                    return false;
                };
                done[i / 64] &= !(1 << (i % 64));
                put_back(&mut pending, ops[i].ret);
                linearized_returned -= usize::from(ops[i].ret.is_some());
                state = before;
                from = i + 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(call: u64, ret: Option<u64>, kind: OpKind) -> Op {
        Op {
            key: "k".into(),
            call,
            ret,
            kind,
        }
    }
    fn put(v: &str) -> OpKind {
        OpKind::Put { value: v.into() }
    }
    fn get(v: Option<&str>) -> OpKind {
        OpKind::Get {
            got: Some(v.map(str::to_owned)),
        }
    }

    #[test]
    fn sequential_and_overlapping_histories_pass() {
        let h = [
            op(0, Some(10), put("a")),
            op(11, Some(20), get(Some("a"))),
            // Overlapping put and get: the get may see either value.
            op(21, Some(40), put("b")),
            op(22, Some(30), get(Some("a"))),
            op(41, Some(50), get(Some("b"))),
        ];
        assert_eq!(check(&h), Ok(1));
    }

    #[test]
    fn a_stale_read_after_a_write_returned_is_a_violation() {
        let h = [
            op(0, Some(10), put("a")),
            op(11, Some(20), put("b")),
            op(21, Some(30), get(Some("a"))),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn an_unknown_write_may_have_happened_or_not() {
        let lost = [
            op(0, None, put("x")),
            op(5, Some(10), get(None)),
            op(11, Some(20), get(None)),
        ];
        assert!(check(&lost).is_ok(), "never happened");
        let late = [
            op(0, None, put("x")),
            op(5, Some(10), get(None)),
            op(11, Some(20), get(Some("x"))),
        ];
        assert!(check(&late).is_ok(), "happened after the first read");
        let flicker = [
            op(0, None, put("x")),
            op(5, Some(10), get(Some("x"))),
            op(11, Some(20), get(None)),
        ];
        assert!(check(&flicker).is_err(), "a value cannot come and go");
    }

    #[test]
    fn unknown_outcomes_are_settled_by_what_was_written() {
        let h = [
            op(0, None, put("x")),
            op(0, None, put("y")),
            op(1, Some(5), get(None)),
        ];
        let written: HashSet<String> = ["x".to_owned()].into();
        let r = resolve(&h, &written, 100);
        assert_eq!(r.len(), 2, "the put of y never happened");
        assert_eq!(r[0].ret, Some(100), "the put of x did, before the end");
        let h = [
            op(0, Some(2), put("a")),
            op(3, None, put("x")),
            op(4, Some(5), get(Some("a"))),
        ];
        assert!(
            check(&resolve(&h, &written, 100)).is_ok(),
            "x landed after the read"
        );
    }

    #[test]
    fn compare_and_set_outcomes_are_checked() {
        let cas = |expected: Option<&str>, new: &str, ok: Option<bool>| OpKind::Cas {
            expected: expected.map(str::to_owned),
            new: new.into(),
            succeeded: ok,
        };
        let both_won = [
            op(0, Some(5), put("a")),
            op(10, Some(20), cas(Some("a"), "b", Some(true))),
            op(10, Some(20), cas(Some("a"), "c", Some(true))),
        ];
        assert!(
            check(&both_won).is_err(),
            "two CAS from the same value cannot both win"
        );
        let one_won = [
            op(0, Some(5), put("a")),
            op(10, Some(20), cas(Some("a"), "b", Some(true))),
            op(10, Some(20), cas(Some("a"), "c", Some(false))),
            op(21, Some(30), get(Some("b"))),
        ];
        assert!(check(&one_won).is_ok());
    }
}
