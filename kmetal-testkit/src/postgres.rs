//! A real PostgreSQL 15 server in a temporary directory on a free loopback port.
//!
//! `initdb` and `postgres` are found on `PATH` or through `pg_config --bindir` (Debian keeps
//! them in `/usr/lib/postgresql/15/bin`). PostgreSQL refuses to run as root, so when the tests
//! run as root the server runs as the `postgres` user. The postmaster is our direct child (not
//! daemonised by `pg_ctl`), so it dies with the test process; `pg_ctl` does the stopping.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::ports::free_port;
use crate::process::{self, Launch, ProcessError, Supervised, find_binary, running_as_root};

const PACKAGE: &str = "postgresql-15";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How to start the server.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// `fsync` on (durable, as in production) or off (faster tests).
    pub fsync: bool,
    /// `max_connections`.
    pub max_connections: u32,
    /// Serve TLS (`ssl=on`) with a certificate from a throwaway CA ([`PostgresServer::ca_pem`]).
    pub tls: bool,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            fsync: true,
            max_connections: 200,
            tls: false,
        }
    }
}

/// A running PostgreSQL server; stopped and removed on drop.
#[derive(Debug)]
pub struct PostgresServer {
    bindir: PathBuf,
    data: PathBuf,
    socket_dir: PathBuf,
    log: PathBuf,
    port: u16,
    password: String,
    options: PostgresOptions,
    launch: Launch,
    process: Option<Supervised>,
    tls_args: Vec<String>,
    ca_pem: Option<String>,
    _dir: TempDir,
}

/// The four server binaries we run must sit together; PATH may hold symlinks to some of them.
fn complete(dir: &Path) -> bool {
    ["initdb", "postgres", "pg_ctl", "pg_isready"]
        .iter()
        .all(|b| dir.join(b).is_file())
}

fn bindir() -> Result<PathBuf, ProcessError> {
    if let Ok(p) = find_binary("initdb", PACKAGE, &[])
        && let Some(dir) = std::fs::canonicalize(&p)
            .ok()
            .and_then(|r| r.parent().map(Path::to_owned))
        && complete(&dir)
    {
        return Ok(dir);
    }
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .map_err(|_| ProcessError::MissingBinary {
            binary: "pg_config",
            package: "postgresql-15 (and libpq-dev)",
        })?;
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if complete(&dir) {
        Ok(dir)
    } else {
        Err(ProcessError::MissingBinary {
            binary: "initdb",
            package: PACKAGE,
        })
    }
}

/// uid and gid of a user, from /etc/passwd.
fn user_ids(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&user))
            .then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))?
    })
}

fn tls_error(e: crate::tls::TlsError) -> ProcessError {
    ProcessError::Certificates(Box::new(e))
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ProcessError + '_ {
    move |source| ProcessError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A temp dir for one server, owned by the user it runs as (`postgres` when we are root:
/// the server refuses to run as root).
fn server_dir() -> Result<(TempDir, Launch), ProcessError> {
    let dir = tempfile::Builder::new()
        .prefix("kmetal-pg-")
        .tempdir()
        .map_err(io(Path::new("/tmp")))?;
    let launch = if running_as_root() {
        let (uid, gid) = user_ids("postgres").ok_or(ProcessError::MissingBinary {
            binary: "postgres user",
            package: PACKAGE,
        })?;
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).map_err(io(dir.path()))?;
        Launch {
            user: Some("postgres".into()),
            ..Launch::default()
        }
    } else {
        Launch::default()
    };
    Ok((dir, launch))
}

impl PostgresServer {
    /// Runs `initdb`, starts the server and waits until it accepts connections.
    pub fn start(options: PostgresOptions) -> Result<Self, ProcessError> {
        let bindir = bindir()?;
        let (dir, launch) = server_dir()?;
        let data = dir.path().join("data");
        let socket_dir = dir.path().join("sock");
        let log = dir.path().join("postgres.log");
        let password = format!("kmetal-{}", std::process::id());
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, &password).map_err(io(&pwfile))?;
        std::fs::create_dir(&socket_dir).map_err(io(&socket_dir))?;
        if let Some(user) = &launch.user
            && let Some((uid, gid)) = user_ids(user)
        {
            for p in [&pwfile, &socket_dir] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid)).map_err(io(p))?;
            }
        }
        let mut initdb = process::command(&bindir.join("initdb"), &launch);
        initdb.args([
            "-D",
            &data.display().to_string(),
            "-U",
            "postgres",
            &format!("--pwfile={}", pwfile.display()),
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        ]);
        process::run(initdb)?;
        let mut tls_args = Vec::new();
        let mut ca_pem = None;
        if options.tls {
            let ca = crate::tls::TestCa::new("kmetal-test-postgres-ca").map_err(tls_error)?;
            let server_cert = ca.server("localhost").map_err(tls_error)?;
            let cert = crate::tls::write_pem(dir.path(), "server.crt", &server_cert.cert)
                .map_err(tls_error)?;
            let key = crate::tls::write_pem(dir.path(), "server.key", &server_cert.key)
                .map_err(tls_error)?;
            // PostgreSQL refuses a key readable by others or owned by someone else.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
                .map_err(io(&key))?;
            if let Some(user) = &launch.user
                && let Some((uid, gid)) = user_ids(user)
            {
                for p in [&cert, &key] {
                    std::os::unix::fs::chown(p, Some(uid), Some(gid)).map_err(io(p))?;
                }
            }
            tls_args = vec![
                "-c".to_string(),
                "ssl=on".to_string(),
                "-c".to_string(),
                format!("ssl_cert_file={}", cert.display()),
                "-c".to_string(),
                format!("ssl_key_file={}", key.display()),
            ];
            ca_pem = Some(ca.cert_pem.clone());
        }
        let mut server = Self {
            tls_args,
            ca_pem,
            bindir,
            data,
            socket_dir,
            log,
            port: free_port().map_err(io(Path::new("127.0.0.1")))?,
            password,
            options,
            launch,
            process: None,
            _dir: dir,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<(), ProcessError> {
        let mut cmd = process::command(&self.bindir.join("postgres"), &self.launch);
        cmd.args([
            "-D",
            &self.data.display().to_string(),
            "-p",
            &self.port.to_string(),
            "-k",
            &self.socket_dir.display().to_string(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            &format!("fsync={}", if self.options.fsync { "on" } else { "off" }),
            "-c",
            &format!("max_connections={}", self.options.max_connections),
        ]);
        cmd.args(&self.tls_args);
        self.process = Some(Supervised::spawn(cmd, &self.log)?);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), ProcessError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut probe = String::new();
        loop {
            let running = self.process.as_mut().is_some_and(Supervised::is_running);
            if running {
                match Command::new(self.bindir.join("pg_isready"))
                    .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-t", "1"])
                    .output()
                {
                    Ok(o) if o.status.success() => return Ok(()),
                    Ok(o) => probe = String::from_utf8_lossy(&o.stdout).into_owned(),
                    Err(e) => probe = e.to_string(),
                }
            }
            if !running || Instant::now() > deadline {
                return Err(ProcessError::NotReady {
                    what: format!(
                        "postgres on port {} (running: {running}, pg_isready: {probe})",
                        self.port
                    ),
                    log_tail: process::log_tail(&self.log, 20),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Host to connect to.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// Superuser name.
    pub fn superuser(&self) -> &'static str {
        "postgres"
    }

    /// Superuser password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// A connection URL for `database` as the superuser.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{database}",
            self.password, self.port
        )
    }

    /// The PEM of the CA that signed the server certificate, when serving TLS.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// Creates database `name` (a fresh one per test or per conformance check).
    pub async fn create_database(&self, name: &str) -> Result<(), tokio_postgres::Error> {
        let (client, conn) =
            tokio_postgres::connect(&self.conninfo("postgres"), tokio_postgres::NoTls).await?;
        let driver = tokio::spawn(conn);
        let r = client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await;
        drop(client);
        let _ = driver.await;
        r
    }

    /// A libpq key/value connection string for `database` as the superuser.
    pub fn conninfo(&self, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres password={} dbname={database}",
            self.port, self.password
        )
    }

    fn pg_ctl_stop(&mut self, mode: &str) -> Result<(), ProcessError> {
        let mut cmd = process::command(&self.bindir.join("pg_ctl"), &self.launch);
        cmd.args([
            "stop",
            "-D",
            &self.data.display().to_string(),
            "-m",
            mode,
            "-w",
        ]);
        let r = process::run(cmd);
        if let Some(p) = &mut self.process {
            p.wait_or_kill(Duration::from_secs(30));
        }
        self.process = None;
        r
    }

    /// Stops the server (fast shutdown) and starts it again on the same port and data.
    /// Connections open across the restart are broken, as with `pg_ctl restart`.
    pub fn restart(&mut self) -> Result<(), ProcessError> {
        self.pg_ctl_stop("fast")?;
        self.spawn()
    }

    /// Crashes the server (immediate shutdown, recovery on start) and starts it again.
    pub fn crash_restart(&mut self) -> Result<(), ProcessError> {
        self.pg_ctl_stop("immediate")?;
        self.spawn()
    }

    /// Stops the server now (fast shutdown).
    pub fn stop(&mut self) -> Result<(), ProcessError> {
        if self.process.is_some() {
            self.pg_ctl_stop("fast")?;
        }
        Ok(())
    }

    /// Starts a server stopped with [`stop`](Self::stop) again, on the same port and data.
    pub fn resume(&mut self) -> Result<(), ProcessError> {
        if self.process.is_none() {
            self.spawn()?;
        }
        Ok(())
    }

    /// A streaming standby of this server (`pg_basebackup -R`) on its own port, made
    /// synchronous once it streams: from then on a commit here returns only after the
    /// standby has flushed it (`synchronous_standby_names = '*'`), as in a CloudNativePG
    /// cluster with synchronous replicas. Not for TLS servers.
    pub async fn start_standby(&self) -> Result<PostgresServer, ProcessError> {
        let (dir, launch) = server_dir()?;
        let data = dir.path().join("data");
        let socket_dir = dir.path().join("sock");
        std::fs::create_dir(&socket_dir).map_err(io(&socket_dir))?;
        if let Some(user) = &launch.user
            && let Some((uid, gid)) = user_ids(user)
        {
            std::os::unix::fs::chown(&socket_dir, Some(uid), Some(gid)).map_err(io(&socket_dir))?;
        }
        let mut base = process::command(&self.bindir.join("pg_basebackup"), &launch);
        base.args([
            "-D",
            &data.display().to_string(),
            "-R",
            "-X",
            "stream",
            "--no-sync",
            // An immediate checkpoint: a spread one takes minutes.
            "--checkpoint=fast",
            "-d",
            &format!(
                "host=127.0.0.1 port={} user=postgres password={} application_name=standby",
                self.port, self.password
            ),
        ]);
        process::run(base)?;
        let mut standby = Self {
            tls_args: Vec::new(),
            ca_pem: None,
            bindir: self.bindir.clone(),
            log: dir.path().join("postgres.log"),
            data,
            socket_dir,
            port: free_port().map_err(io(Path::new("127.0.0.1")))?,
            password: self.password.clone(),
            options: self.options.clone(),
            launch,
            process: None,
            _dir: dir,
        };
        standby.spawn()?;
        let admin = |e: tokio_postgres::Error| ProcessError::NotReady {
            what: format!(
                "synchronous replication to the standby on port {}: {e}",
                standby.port
            ),
            log_tail: process::log_tail(&self.log, 20),
        };
        let (client, conn) =
            tokio_postgres::connect(&self.conninfo("postgres"), tokio_postgres::NoTls)
                .await
                .map_err(admin)?;
        let driver = tokio::spawn(conn);
        // One statement each: ALTER SYSTEM refuses to run in a (multi-statement) transaction.
        for sql in [
            "ALTER SYSTEM SET synchronous_standby_names = '*'",
            "SELECT pg_reload_conf()",
        ] {
            client.batch_execute(sql).await.map_err(admin)?;
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let rows = client
                .query(
                    "SELECT 1 FROM pg_stat_replication WHERE sync_state = 'sync'",
                    &[],
                )
                .await
                .map_err(admin)?;
            if !rows.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                return Err(ProcessError::NotReady {
                    what: format!(
                        "the standby on port {} never became synchronous",
                        standby.port
                    ),
                    log_tail: process::log_tail(&standby.log, 20),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(client);
        let _ = driver.await;
        Ok(standby)
    }

    /// Promotes a standby to primary (`pg_ctl promote`, waiting until it accepts writes).
    pub fn promote(&mut self) -> Result<(), ProcessError> {
        let mut cmd = process::command(&self.bindir.join("pg_ctl"), &self.launch);
        cmd.args(["promote", "-D", &self.data.display().to_string(), "-w"]);
        process::run(cmd)
    }

    /// Kills the server as a crash would (immediate shutdown) and leaves it down.
    pub fn crash(&mut self) -> Result<(), ProcessError> {
        if self.process.is_some() {
            self.pg_ctl_stop("immediate")?;
        }
        Ok(())
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(Supervised::is_running)
    }

    /// The postmaster's process id, while running; its backends are its children (what
    /// [`crate::process::cpu_time_with_children`] counts with it).
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(Supervised::pid)
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if self.process.is_some() {
            let _ = self.pg_ctl_stop("immediate");
        }
    }
}
