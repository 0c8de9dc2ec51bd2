//! Kubernetes' own storage tests (`k8s.io/apiserver/pkg/storage/etcd3` and `.../cacher`,
//! compiled by `scripts/peers.sh` at the pinned release) against any etcd endpoint.
//!
//! The test binaries are built with one file swapped: their `testserver` package, which
//! upstream starts an embedded etcd per test, asks a [`BackendFactory`] of ours for a fresh
//! backend instead (`peers/storage-tests/testserver`). Each test connects to the factory,
//! sends the watch progress interval it wants, gets back an endpoint, and holds the
//! connection for its lifetime; when it closes, the factory drops that backend. The tests
//! themselves, and every expectation in them, are Kubernetes' unchanged.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kmetal_testkit::k8s_storage::SuiteError> {
//! use kmetal_testkit::k8s_storage::{self, Backend, Package};
//! let report = k8s_storage::run(Package::Etcd3, "etcd 3.6", |progress| async move {
//!     let etcd = kmetal_testkit::EtcdCluster::start(kmetal_testkit::EtcdOptions {
//!         release: kmetal_testkit::EtcdRelease::V36,
//!         progress_notify_interval: Some(progress),
//!         ..Default::default()
//!     })
//!     .await?;
//!     Ok(Backend::new(etcd.endpoints()[0].clone(), etcd))
//! })
//! .await?;
//! assert!(report.failed().is_empty());
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::process::{self, ProcessError};

/// Why the suite could not run (a test failing is a result, not an error).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SuiteError {
    /// The test binary is missing (built by `scripts/peers.sh`).
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// The factory could not listen, or the binary could not be run or read.
    #[error("running {binary} failed")]
    Io {
        /// The test binary.
        binary: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The binary ended without Go's closing `PASS`/`FAIL` line (it crashed or timed out).
    #[error("{binary} ended without a verdict ({status}); last output:\n{tail}")]
    NoVerdict {
        /// The test binary.
        binary: &'static str,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The end of its output.
        tail: String,
    },
}

/// Which upstream test package.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Package {
    /// `k8s.io/apiserver/pkg/storage/etcd3`: the etcd3 store (create, get, list and paging,
    /// GuaranteedUpdate, delete preconditions, watch, progress notify, compaction, leases).
    Etcd3,
    /// `k8s.io/apiserver/pkg/storage/cacher`: the watch cache over the etcd3 store
    /// (consistent reads from cache, watch-list, bookmarks).
    Cacher,
}

impl Package {
    /// The test binary `scripts/peers.sh` builds.
    pub fn binary(self) -> &'static str {
        match self {
            Self::Etcd3 => "k8s-storage-etcd3.test",
            Self::Cacher => "k8s-storage-cacher.test",
        }
    }

    /// The Go import path.
    pub fn import_path(self) -> &'static str {
        match self {
            Self::Etcd3 => "k8s.io/apiserver/pkg/storage/etcd3",
            Self::Cacher => "k8s.io/apiserver/pkg/storage/cacher",
        }
    }
}

/// One backend handed to one test: its etcd endpoint and whatever keeps it alive (dropped
/// when the test closes its connection).
pub struct Backend {
    endpoint: String,
    _guard: Box<dyn Send>,
}

impl Backend {
    /// A backend at `endpoint`, alive while `guard` lives.
    pub fn new(endpoint: impl Into<String>, guard: impl Send + 'static) -> Self {
        Self {
            endpoint: endpoint.into(),
            _guard: Box::new(guard),
        }
    }
}

/// A test's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `--- PASS`.
    Pass,
    /// `--- FAIL`.
    Fail,
    /// `--- SKIP`.
    Skip,
}

/// What one run of a package reported, test by test (subtests as `Parent/child`).
#[derive(Debug, Clone)]
pub struct Report {
    /// The backend's name.
    pub backend: String,
    /// The package.
    pub package: Package,
    /// Every test and subtest Go reported on.
    pub tests: BTreeMap<String, Outcome>,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// The whole `-test.v` output, for diagnosing failures.
    pub output: String,
}

impl Report {
    /// Names with `outcome` among the top-level tests (no `/`).
    pub fn top_level(&self, outcome: Outcome) -> Vec<&str> {
        self.tests
            .iter()
            .filter(|(name, o)| !name.contains('/') && **o == outcome)
            .map(|(name, _)| name.as_str())
            .collect()
    }

    /// Every failed test or subtest.
    pub fn failed(&self) -> Vec<&str> {
        self.tests
            .iter()
            .filter(|(_, o)| **o == Outcome::Fail)
            .map(|(name, _)| name.as_str())
            .collect()
    }

    /// `passed / failed / skipped` of the top-level tests, and of all subtests.
    pub fn summary(&self) -> String {
        let count = |o, top: bool| {
            self.tests
                .iter()
                .filter(|(n, x)| **x == o && (!top || !n.contains('/')))
                .count()
        };
        format!(
            "{:<28} {:<7} tests {:>3} passed {:>2} failed {:>2} skipped | with subtests {:>4} / {:>3} / {:>2} | {:>5.1} s",
            self.backend,
            format!("{:?}", self.package),
            count(Outcome::Pass, true),
            count(Outcome::Fail, true),
            count(Outcome::Skip, true),
            count(Outcome::Pass, false),
            count(Outcome::Fail, false),
            count(Outcome::Skip, false),
            self.elapsed.as_secs_f64()
        )
    }

    /// The output of one test (its `=== RUN` to its verdict), for a failure message.
    pub fn output_of(&self, test: &str) -> String {
        let run = format!("=== RUN   {test}");
        let mut lines = self.output.lines().skip_while(|l| *l != run);
        let mut out: Vec<&str> = lines.by_ref().take(200).collect();
        out.truncate(200);
        out.join("\n")
    }
}

/// Runs `package`'s tests (all of them, or those matching `filter`, Go's `-test.run`) with
/// `factory` making each test's backend; `factory` gets the watch progress interval the test
/// asked for (etcd's 10 minutes unless the test set one).
pub async fn run<F, Fut>(package: Package, backend: &str, factory: F) -> Result<Report, SuiteError>
where
    F: Fn(Duration) -> Fut + Send + Sync + 'static,
    Fut:
        Future<Output = Result<Backend, Box<dyn std::error::Error + Send + Sync>>> + Send + 'static,
{
    run_filtered(package, backend, None, factory).await
}

/// [`run`] limited to the tests matching the Go regular expression `filter`.
///
/// The package's top-level tests are split over [`SHARDS`] processes of the test binary run
/// at once: each test gets a backend of its own, and most of the suite's time is waiting
/// (watch timeouts, bookmarks, progress intervals), which overlaps.
pub async fn run_filtered<F, Fut>(
    package: Package,
    backend: &str,
    filter: Option<&str>,
    factory: F,
) -> Result<Report, SuiteError>
where
    F: Fn(Duration) -> Fut + Send + Sync + 'static,
    Fut:
        Future<Output = Result<Backend, Box<dyn std::error::Error + Send + Sync>>> + Send + 'static,
{
    let binary = package.binary();
    let path: PathBuf = process::peer_binary(binary)?;
    let io = |source| SuiteError::Io { binary, source };
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.map_err(io)?;
    let addr = listener.local_addr().map_err(io)?;
    let serving = tokio::spawn(serve(listener, Arc::new(factory)));
    let started = Instant::now();
    let names = list_tests(&path, filter).await.map_err(io)?;
    let count = SHARDS.min(names.len()).max(1);
    let mut shards: Vec<Vec<String>> = vec![Vec::new(); count];
    for (i, name) in names.into_iter().enumerate() {
        shards[i % count].push(name);
    }
    let mut runs = tokio::task::JoinSet::new();
    for names in shards {
        let path = path.clone();
        runs.spawn(async move { run_shard(&path, binary, addr, &names).await });
    }
    let results = runs.join_all().await;
    serving.abort();
    let mut report = Report {
        backend: backend.to_owned(),
        package,
        tests: BTreeMap::new(),
        elapsed: started.elapsed(),
        output: String::new(),
    };
    for result in results {
        let output = result?;
        report.tests.extend(parse_verdicts(&output));
        report.output.push_str(&output);
    }
    Ok(report)
}

/// How many processes of one test binary run at once.
pub const SHARDS: usize = 4;

/// The binary's top-level tests (`-test.list`), matching `filter` when given.
async fn list_tests(path: &std::path::Path, filter: Option<&str>) -> std::io::Result<Vec<String>> {
    let out = tokio::process::Command::new(path)
        .arg(format!("-test.list={}", filter.unwrap_or(".")))
        .stdin(Stdio::null())
        .output()
        .await?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("Test"))
        .map(str::to_owned)
        .collect())
}

/// Runs the tests `names` in one process; returns its whole output, checked for Go's verdict.
async fn run_shard(
    path: &std::path::Path,
    binary: &'static str,
    factory: std::net::SocketAddr,
    names: &[String],
) -> Result<String, SuiteError> {
    let io = |source| SuiteError::Io { binary, source };
    let dir = tempfile::tempdir().map_err(io)?;
    // One file for both streams keeps Go's verdict lines and klog's lines in order.
    let log_path = dir.path().join("go-test.log");
    let log = std::fs::File::create(&log_path).map_err(io)?;
    let status = tokio::process::Command::new(path)
        .args(["-test.v", "-test.timeout=20m", "-test.count=1"])
        .arg(format!("-test.run=^({})$", names.join("|")))
        .env("KMETAL_STORAGE_FACTORY", factory.to_string())
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(io)?)
        .stderr(log)
        .kill_on_drop(true)
        .status()
        .await
        .map_err(io)?;
    let output = String::from_utf8_lossy(&std::fs::read(&log_path).map_err(io)?).into_owned();
    let verdict = output
        .lines()
        .rev()
        .take(5)
        .any(|l| l == "PASS" || l == "FAIL" || l.starts_with("ok ") || l.starts_with("FAIL\t"));
    if !verdict {
        let tail = output.lines().rev().take(30).collect::<Vec<_>>();
        return Err(SuiteError::NoVerdict {
            binary,
            status,
            tail: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        });
    }
    Ok(output)
}

/// Accepts the tests' requests for backends until aborted.
async fn serve<F, Fut>(listener: TcpListener, factory: Arc<F>)
where
    F: Fn(Duration) -> Fut + Send + Sync + 'static,
    Fut:
        Future<Output = Result<Backend, Box<dyn std::error::Error + Send + Sync>>> + Send + 'static,
{
    while let Ok((conn, _)) = listener.accept().await {
        let factory = factory.clone();
        tokio::spawn(async move {
            let _ = hand_out(conn, factory).await;
        });
    }
}

/// One test's request: `progress_ms=N\n` in, `endpoint=URL\n` (or `error=TEXT\n`) out, then
/// the backend lives until the test closes the connection.
async fn hand_out<F, Fut>(conn: TcpStream, factory: Arc<F>) -> std::io::Result<()>
where
    F: Fn(Duration) -> Fut + Send + Sync + 'static,
    Fut:
        Future<Output = Result<Backend, Box<dyn std::error::Error + Send + Sync>>> + Send + 'static,
{
    let _ = conn.set_nodelay(true);
    let mut conn = BufReader::new(conn);
    let mut line = String::new();
    conn.read_line(&mut line).await?;
    let progress = line
        .trim()
        .strip_prefix("progress_ms=")
        .and_then(|ms| ms.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map_or(Duration::from_secs(600), Duration::from_millis);
    match factory(progress).await {
        Ok(backend) => {
            let answer = format!("endpoint={}\n", backend.endpoint);
            conn.get_mut().write_all(answer.as_bytes()).await?;
            // The backend lives until the test hangs up.
            let mut sink = [0u8; 64];
            while conn.read(&mut sink).await? > 0 {}
            drop(backend);
        }
        Err(e) => {
            let mut text = e.to_string();
            let mut source = e.source();
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            let answer = format!("error={}\n", text.replace('\n', " "));
            conn.get_mut().write_all(answer.as_bytes()).await?;
        }
    }
    Ok(())
}

/// Reads Go's `--- PASS: Name (1.00s)` lines (indented for subtests, whose names already
/// carry their parents').
fn parse_verdicts(output: &str) -> BTreeMap<String, Outcome> {
    let mut tests = BTreeMap::new();
    for line in output.lines() {
        let line = line.trim_start();
        let (outcome, rest) = if let Some(r) = line.strip_prefix("--- PASS: ") {
            (Outcome::Pass, r)
        } else if let Some(r) = line.strip_prefix("--- FAIL: ") {
            (Outcome::Fail, r)
        } else if let Some(r) = line.strip_prefix("--- SKIP: ") {
            (Outcome::Skip, r)
        } else {
            continue;
        };
        if let Some(name) = rest.split_whitespace().next() {
            tests.insert(name.to_owned(), outcome);
        }
    }
    tests
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_go_verdicts_with_subtests() {
        let out = "=== RUN   TestA\n--- PASS: TestA (0.01s)\n=== RUN   TestB\n\
                   === RUN   TestB/one\n    --- FAIL: TestB/one (0.00s)\n\
                   --- FAIL: TestB (0.02s)\n--- SKIP: TestC (0.00s)\nFAIL\n";
        let v = parse_verdicts(out);
        assert_eq!(v.get("TestA"), Some(&Outcome::Pass));
        assert_eq!(v.get("TestB/one"), Some(&Outcome::Fail));
        assert_eq!(v.get("TestB"), Some(&Outcome::Fail));
        assert_eq!(v.get("TestC"), Some(&Outcome::Skip));
        assert_eq!(v.len(), 4);
    }
}
