//! A recorded workload for [`linearizability`](crate::linearizability) checks through any
//! etcd endpoint: clients run puts, gets and compare-and-sets on a few keys while the caller's
//! faults hit, every operation is recorded with its invocation, return and result (unknown
//! when the request failed), and a watch over the keys, resumed after every break, must see
//! each revision once, in order, every acknowledged write among them. The watch's values
//! settle the unknown outcomes ([`resolve`](crate::linearizability::resolve)) before the
//! history is checked. Also [`GatewayProcess`], an `etcd_gateway` a fault can kill and start
//! again on the same address.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, EventType, Txn, TxnOp, WatchOptions};

use crate::linearizability::{self, Op, OpKind, Violation};

/// The workload's shape.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Concurrent clients, each on its own connection.
    pub clients: usize,
    /// Keys (`/lin/0` …), few so that operations contend.
    pub keys: usize,
    /// How long a request may take before its outcome counts as unknown.
    pub op_timeout: Duration,
    /// How long the workload runs after the last fault.
    pub tail: Duration,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            clients: 4,
            keys: 3,
            op_timeout: Duration::from_secs(2),
            tail: Duration::from_secs(2),
        }
    }
}

/// A fault: run `action` (on a blocking thread) `after` the previous one.
pub struct Fault {
    /// The wait before it.
    pub after: Duration,
    /// What it does.
    pub action: Box<dyn FnOnce() + Send>,
}

impl Fault {
    /// `action` after `after`.
    pub fn new(after: Duration, action: impl FnOnce() + Send + 'static) -> Self {
        Self {
            after,
            action: Box::new(action),
        }
    }
}

/// What a run recorded and checked.
#[derive(Debug, Clone)]
pub struct Report {
    /// Operations recorded.
    pub ops: usize,
    /// Of which the client never learned the outcome.
    pub unknown: usize,
    /// Acknowledged writes (puts and successful CASes).
    pub acked: usize,
    /// Keys checked.
    pub keys: usize,
    /// Revisions the watch saw.
    pub watched: usize,
    /// How long the workload ran (from the first operation to the stop).
    pub ran: Duration,
    /// How long the check took.
    pub checked_in: Duration,
}

impl Report {
    /// Operations with a known outcome per second of the workload.
    pub fn rate(&self) -> f64 {
        (self.ops - self.unknown) as f64 / self.ran.as_secs_f64().max(1e-9)
    }
}

/// Why a run failed its checks.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HistoryError {
    /// The history has no linearization.
    #[error("the history is not linearizable")]
    NotLinearizable(#[source] Violation),
    /// The watch saw a revision twice or out of order.
    #[error("the watch saw revision {revision} after {after}")]
    WatchOrder {
        /// The revision.
        revision: i64,
        /// The one before it.
        after: i64,
    },
    /// The watch gave a compacted error (nothing compacts in a run).
    #[error("the watch was compacted at {0}")]
    WatchCompacted(i64),
    /// Acknowledged writes the watch never delivered.
    #[error("acknowledged writes the watch never saw: {0:?}")]
    WatchMissed(Vec<i64>),
    /// The watch did not catch up within a minute after the run.
    #[error("the watch did not catch up with the acknowledged writes")]
    WatchStalled,
    /// The checker accepted the history with a stale read added: it checks nothing.
    #[error("the checker accepted a stale read")]
    CheckerBlind,
    /// The endpoint never answered.
    #[error("the endpoint {0} never answered")]
    Unreachable(String),
}

/// An `etcd_gateway` process (the example binary at `binary`), restartable on the same
/// address and datastore; killed on drop.
#[derive(Debug)]
pub struct GatewayProcess {
    binary: PathBuf,
    listen: String,
    datastore: String,
    child: Option<Child>,
}

impl GatewayProcess {
    /// Starts `binary --listen <listen> --datastore <datastore>`.
    pub fn start(binary: PathBuf, listen: &str, datastore: &str) -> std::io::Result<Self> {
        let mut g = Self {
            binary,
            listen: listen.into(),
            datastore: datastore.into(),
            child: None,
        };
        g.spawn()?;
        Ok(g)
    }

    /// Starts it again (after [`kill`](Self::kill)).
    pub fn spawn(&mut self) -> std::io::Result<()> {
        let child = std::process::Command::new(&self.binary)
            .args(["--listen", &self.listen, "--datastore", &self.datastore])
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILLs it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A fault: SIGKILL, `down` later start again.
    pub fn kill_and_restart(gw: &Arc<Mutex<Self>>, after: Duration, down: Duration) -> Fault {
        let gw = gw.clone();
        Fault::new(after, move || {
            let mut g = gw.lock().unwrap_or_else(PoisonError::into_inner);
            g.kill();
            std::thread::sleep(down);
            // A gateway that does not come back shows up as a stalled workload.
            let _ = g.spawn();
        })
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Run {
    start: Instant,
    ops: Mutex<Vec<Op>>,
    acked: Mutex<Vec<i64>>,
    stop: AtomicBool,
}

impl Run {
    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
    fn ack(&self, rev: i64) {
        self.acked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(rev);
    }
}

async fn connect(ep: &str, timeout: Duration) -> Result<Client, HistoryError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(timeout);
        if let Ok(mut c) = Client::connect([ep], Some(opts)).await
            && c.status().await.is_ok()
        {
            return Ok(c);
        }
        if Instant::now() > deadline {
            return Err(HistoryError::Unreachable(ep.into()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One client: random puts, gets and CASes (from the value it last read) until told to stop.
async fn client(id: usize, mut kv: etcd_client::KvClient, w: Workload, run: Arc<Run>) {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ (id as u64 + 1);
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut last_read: Vec<Option<String>> = vec![None; w.keys];
    let mut n = 0u64;
    while !run.stop.load(Ordering::Relaxed) {
        let k = (rand() % w.keys as u64) as usize;
        let key = format!("/lin/{k}");
        n += 1;
        let value = format!("c{id}-{n}");
        let call = run.now();
        let (ret, kind) = match rand() % 10 {
            0..=3 => match tokio::time::timeout(w.op_timeout, kv.get(key.clone(), None)).await {
                Ok(Ok(resp)) => {
                    let got = resp
                        .kvs()
                        .first()
                        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
                    last_read[k] = got.clone();
                    (Some(run.now()), OpKind::Get { got: Some(got) })
                }
                // A failed read did nothing.
                _ => continue,
            },
            4..=6 => {
                let put = kv.put(key.clone(), value.clone(), None);
                let ret = match tokio::time::timeout(w.op_timeout, put).await {
                    Ok(Ok(resp)) => {
                        run.ack(resp.header().map_or(0, |h| h.revision()));
                        Some(run.now())
                    }
                    _ => None,
                };
                (ret, OpKind::Put { value })
            }
            _ => {
                let expected = last_read[k].clone();
                let cmp = match &expected {
                    Some(v) => Compare::value(key.clone(), CompareOp::Equal, v.clone()),
                    None => Compare::version(key.clone(), CompareOp::Equal, 0),
                };
                let txn =
                    Txn::new()
                        .when([cmp])
                        .and_then([TxnOp::put(key.clone(), value.clone(), None)]);
                let (ret, succeeded) = match tokio::time::timeout(w.op_timeout, kv.txn(txn)).await {
                    Ok(Ok(resp)) => {
                        if resp.succeeded() {
                            run.ack(resp.header().map_or(0, |h| h.revision()));
                        }
                        (Some(run.now()), Some(resp.succeeded()))
                    }
                    _ => (None, None),
                };
                let new = value;
                (
                    ret,
                    OpKind::Cas {
                        expected,
                        new,
                        succeeded,
                    },
                )
            }
        };
        if ret.is_none() {
            // Mid-fault: give the endpoint a moment instead of spinning on errors.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        run.ops
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Op {
                key,
                call,
                ret,
                kind,
            });
    }
}

/// Watches the keys from `start`, resuming after each break from the revision after the
/// last one seen, until the run has stopped and `until` (the last acknowledged revision) has
/// come; every put seen, as (revision, value).
async fn watcher(
    ep: String,
    start: i64,
    run: Arc<Run>,
    until: Arc<Mutex<Option<i64>>>,
) -> Result<Vec<(i64, String)>, HistoryError> {
    let mut seen: Vec<(i64, String)> = Vec::new();
    let upto = || *until.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        let next = seen.last().map_or(start, |(r, _)| r + 1);
        if upto().is_some_and(|u| next > u) {
            return Ok(seen);
        }
        let connected =
            tokio::time::timeout(Duration::from_secs(3), Client::connect([ep.as_str()], None));
        let Ok(Ok(mut c)) = connected.await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let opts = WatchOptions::new().with_prefix().with_start_revision(next);
        let Ok(mut stream) = c.watch("/lin/", Some(opts)).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        loop {
            let resp =
                match tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
                    Ok(Ok(Some(r))) => r,
                    Err(_) => {
                        // Idle: done once the run stopped and everything acknowledged came.
                        let caught_up = seen
                            .last()
                            .is_some_and(|(l, _)| upto().is_some_and(|u| *l >= u));
                        if run.stop.load(Ordering::Relaxed) && caught_up {
                            return Ok(seen);
                        }
                        continue;
                    }
                    _ => break,
                };
            if resp.compact_revision() != 0 {
                return Err(HistoryError::WatchCompacted(resp.compact_revision()));
            }
            if resp.canceled() {
                break;
            }
            for e in resp.events() {
                let Some(kv) = e.kv().filter(|_| e.event_type() == EventType::Put) else {
                    continue;
                };
                let revision = kv.mod_revision();
                if let Some((after, _)) = seen.last()
                    && revision <= *after
                {
                    return Err(HistoryError::WatchOrder {
                        revision,
                        after: *after,
                    });
                }
                seen.push((revision, String::from_utf8_lossy(kv.value()).into_owned()));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `workload` against the etcd endpoint `ep` while `faults` happen one after another,
/// then checks the watch and the history.
pub async fn run(
    ep: &str,
    workload: &Workload,
    faults: Vec<Fault>,
) -> Result<Report, HistoryError> {
    let mut control = connect(ep, workload.op_timeout).await?;
    let start = control
        .status()
        .await
        .ok()
        .and_then(|s| s.header().map(|h| h.revision()))
        .ok_or_else(|| HistoryError::Unreachable(ep.into()))?
        + 1;
    let run = Arc::new(Run {
        start: Instant::now(),
        ops: Mutex::new(Vec::new()),
        acked: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
    });
    let until = Arc::new(Mutex::new(None));
    let watch = tokio::spawn(watcher(ep.into(), start, run.clone(), until.clone()));
    let mut clients = Vec::new();
    for id in 0..workload.clients {
        let kv = connect(ep, workload.op_timeout).await?.kv_client();
        clients.push(tokio::spawn(client(id, kv, workload.clone(), run.clone())));
    }
    for fault in faults {
        tokio::time::sleep(fault.after).await;
        let _ = tokio::task::spawn_blocking(fault.action).await;
    }
    tokio::time::sleep(workload.tail).await;
    run.stop.store(true, Ordering::Relaxed);
    let ran = run.start.elapsed();
    for c in clients {
        let _ = c.await;
    }
    let acked: BTreeSet<i64> = run
        .acked
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .copied()
        .collect();
    *until.lock().unwrap_or_else(PoisonError::into_inner) =
        Some(acked.last().copied().unwrap_or(0));
    let seen = match tokio::time::timeout(Duration::from_secs(60), watch).await {
        Ok(Ok(seen)) => seen?,
        _ => return Err(HistoryError::WatchStalled),
    };
    let revisions: BTreeSet<i64> = seen.iter().map(|(r, _)| *r).collect();
    let missed: Vec<i64> = acked.difference(&revisions).copied().collect();
    if !missed.is_empty() {
        return Err(HistoryError::WatchMissed(missed));
    }
    let ops = run
        .ops
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let written: HashSet<String> = seen.into_iter().map(|(_, v)| v).collect();
    let began = Instant::now();
    let settled = linearizability::resolve(&ops, &written, run.now());
    let keys = linearizability::check(&settled).map_err(HistoryError::NotLinearizable)?;
    // The checker must also see a violation in this very history: the first value written
    // to a key, read again at the end, long after another write returned.
    if let Some(stale) = with_stale_read(&settled, run.now())
        && linearizability::check(&stale).is_ok()
    {
        return Err(HistoryError::CheckerBlind);
    }
    Ok(Report {
        ops: ops.len(),
        unknown: ops.iter().filter(|o| o.ret.is_none()).count(),
        acked: acked.len(),
        keys,
        watched: revisions.len(),
        ran,
        checked_in: began.elapsed(),
    })
}

/// `history` plus a read at `end` of a key's first acknowledged value, where a later write to
/// that key began after it returned (values are unique, so it cannot be current).
fn with_stale_read(history: &[Op], end: u64) -> Option<Vec<Op>> {
    for key in history.iter().map(|o| o.key.as_str()) {
        let puts: Vec<&Op> = history
            .iter()
            .filter(|o| o.key == key && o.ret.is_some())
            .filter(|o| matches!(o.kind, OpKind::Put { .. }))
            .collect();
        let Some(first) = puts.iter().min_by_key(|o| o.ret) else {
            continue;
        };
        let overwritten = puts.iter().any(|o| o.call > first.ret.unwrap_or(u64::MAX));
        if let (true, OpKind::Put { value }) = (overwritten, &first.kind) {
            let mut h = history.to_vec();
            h.push(Op {
                key: key.to_owned(),
                call: end + 1,
                ret: Some(end + 2),
                kind: OpKind::Get {
                    got: Some(Some(value.clone())),
                },
            });
            return Some(h);
        }
    }
    None
}
