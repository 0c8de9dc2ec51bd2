//! The real kine (`github.com/k3s-io/kine`, built by `scripts/peers.sh`) on loopback: the peer
//! kmetal's SQL log exists to beat, on SQLite in its own temp dir or on a PostgreSQL database.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kmetal_testkit::kine::KineError> {
//! use kmetal_testkit::kine::{Kine, KineBackend};
//! let kine = Kine::start(KineBackend::Sqlite).await?;
//! let mut client = etcd_client::Client::connect([kine.endpoint()], None)
//!     .await
//!     .map_err(kmetal_testkit::kine::KineError::Client)?;
//! # Ok(()) }
//! ```

use std::path::PathBuf;
use std::time::Duration;

use tempfile::TempDir;

use crate::ports::free_port;
use crate::process::{self, Launch, ProcessError, Supervised};

/// Why kine could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KineError {
    /// Finding, starting or waiting for the binary failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// The etcd client could not reach it.
    #[error("etcd client call to kine failed")]
    Client(#[source] etcd_client::Error),
    /// Creating the temporary directory failed.
    #[error("cannot create a temporary directory")]
    TempDir(#[source] std::io::Error),
}

/// Where kine keeps its log.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KineBackend {
    /// A SQLite file in kine's temp dir, with k3s's connection settings (WAL, shared cache,
    /// 30 s busy timeout).
    Sqlite,
    /// A PostgreSQL connection URL (`postgres://user:pass@host:port/db`); kine creates the
    /// database if it is missing.
    Postgres(String),
}

/// A running kine, killed on drop.
#[derive(Debug)]
pub struct Kine {
    process: Supervised,
    port: u16,
    log: PathBuf,
    _dir: TempDir,
}

const READY_TIMEOUT: Duration = Duration::from_secs(30);

impl Kine {
    /// Starts kine on `backend` and waits until it answers an etcd range.
    pub async fn start(backend: KineBackend) -> Result<Self, KineError> {
        Self::start_with(backend, &[]).await
    }

    /// [`start`](Self::start) with further flags after ours (kine takes the last value).
    pub async fn start_with(
        backend: KineBackend,
        extra_args: &[String],
    ) -> Result<Self, KineError> {
        let binary = process::peer_binary("kine")?;
        let dir = tempfile::Builder::new()
            .prefix("kmetal-kine-")
            .tempdir()
            .map_err(KineError::TempDir)?;
        let port = free_port().map_err(KineError::TempDir)?;
        let endpoint = match &backend {
            KineBackend::Sqlite => format!(
                "sqlite://{}?_journal=WAL&cache=shared&_busy_timeout=30000",
                dir.path().join("state.db").display()
            ),
            KineBackend::Postgres(url) if url.contains('?') => format!("{url}&sslmode=disable"),
            KineBackend::Postgres(url) => format!("{url}?sslmode=disable"),
        };
        let log = dir.path().join("kine.log");
        let mut cmd = process::command(&binary, &Launch::default());
        cmd.args([
            format!("--listen-address=127.0.0.1:{port}"),
            format!("--endpoint={endpoint}"),
            // kine serves metrics on :8080 unless told not to; tests run several at once.
            "--metrics-bind-address=0".to_string(),
        ]);
        cmd.args(extra_args);
        let mut kine = Self {
            process: Supervised::spawn(cmd, &log)?,
            port,
            log,
            _dir: dir,
        };
        let endpoint = kine.endpoint();
        kine.process
            .wait_until("kine answering an etcd range", READY_TIMEOUT, || {
                answers_range(endpoint.clone())
            })
            .await?;
        Ok(kine)
    }

    /// `http://127.0.0.1:<port>`, for etcd clients and `--etcd-servers`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        process::log_tail(&self.log, lines)
    }

    /// Whether the process runs.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Its process id, while running .
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }
}

async fn answers_range(endpoint: String) -> bool {
    match etcd_client::Client::connect([endpoint], None).await {
        Ok(mut c) => c.get("/kmetal-ready", None).await.is_ok(),
        Err(_) => false,
    }
}
