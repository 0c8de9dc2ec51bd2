//! Real etcd clusters on loopback: Debian's `etcd-server` (v3.4, the default) or etcd 3.6 built
//! by `scripts/peers.sh` (the etcd Kamaji deploys), chosen by [`EtcdOptions::release`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), kmetal_testkit::etcd::EtcdError> {
//! use kmetal_testkit::{EtcdCluster, EtcdOptions};
//! let cluster = EtcdCluster::start(EtcdOptions { members: 3, ..EtcdOptions::default() }).await?;
//! let mut client = cluster.client().await?;
//! client.put("k", "v", None).await.map_err(kmetal_testkit::etcd::EtcdError::Client)?;
//! # Ok(()) }
//! ```

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use tempfile::TempDir;

use crate::ports::free_port;
use crate::process::{self, Launch, ProcessError, Supervised, find_binary};
use crate::proxy::{FaultProxy, ProxyError};
use crate::tls::{Pem, TestCa, TlsError, write_pem};

/// Why a cluster could not be started or driven.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EtcdError {
    /// Finding or running the binary failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// Making test certificates failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Starting a peer proxy failed.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// A client call failed.
    #[error("etcd client call failed")]
    Client(#[source] etcd_client::Error),
    /// No leader was elected in time.
    #[error("no leader among the running members within {timeout:?}; last log lines:\n{log_tail}")]
    NoLeader {
        /// How long we waited.
        timeout: Duration,
        /// The tail of the first member's log.
        log_tail: String,
    },
    /// A member index out of range.
    #[error("no member {0}")]
    NoSuchMember(usize),
    /// Creating the temporary directory failed.
    #[error("cannot create a temporary directory")]
    TempDir(#[source] std::io::Error),
}

/// Which etcd to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum EtcdRelease {
    /// Debian's `etcd-server` package (3.4).
    #[default]
    Debian34,
    /// etcd 3.6 from its Go modules, built by `scripts/peers.sh`.
    V36,
}

impl EtcdRelease {
    /// The server binary.
    fn binary(self) -> Result<PathBuf, ProcessError> {
        match self {
            Self::Debian34 => find_binary("etcd", "etcd-server", &[]),
            Self::V36 => process::peer_binary("etcd"),
        }
    }

    /// The flag setting the watch progress notification interval (3.6 dropped the
    /// `experimental-` prefix and warns on the old name).
    fn progress_notify_flag(self) -> &'static str {
        match self {
            Self::Debian34 => "--experimental-watch-progress-notify-interval",
            Self::V36 => "--watch-progress-notify-interval",
        }
    }
}

/// How to start a cluster.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Which etcd.
    pub release: EtcdRelease,
    /// Number of members (1 for a single server).
    pub members: usize,
    /// Serve clients over TLS and require client certificates from the test CA (etcd's
    /// client-cert auth: with auth on, the CN is the user name).
    pub tls: bool,
    /// Enable RBAC with a `root` user (password in [`EtcdCluster::root_password`]).
    pub auth: bool,
    /// Route each member's peer traffic through a [`FaultProxy`] in front of it.
    pub peer_proxies: bool,
    /// Raft heartbeat interval.
    pub heartbeat: Duration,
    /// Raft election timeout.
    pub election_timeout: Duration,
    /// Backend quota (`--quota-backend-bytes`), etcd's default when `None`.
    pub quota_backend_bytes: Option<u64>,
    /// Interval of watch progress notifications (etcd's default, 10 minutes, when `None`).
    pub progress_notify_interval: Option<Duration>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            release: EtcdRelease::default(),
            members: 1,
            tls: false,
            auth: false,
            peer_proxies: false,
            heartbeat: Duration::from_millis(100),
            election_timeout: Duration::from_millis(1000),
            quota_backend_bytes: None,
            progress_notify_interval: None,
        }
    }
}

#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    args: Vec<String>,
    log: PathBuf,
    process: Option<Supervised>,
    peer_proxy: Option<FaultProxy>,
}

/// A running etcd cluster; every member is killed and its data removed on drop.
#[derive(Debug)]
pub struct EtcdCluster {
    binary: PathBuf,
    members: Vec<Member>,
    ca: Option<TestCa>,
    root_cert: Option<Pem>,
    root_password: String,
    auth_enabled: bool,
    options: EtcdOptions,
    // Dropped last: members hold files inside it.
    _dir: TempDir,
}

const READY_TIMEOUT: Duration = Duration::from_secs(30);

impl EtcdCluster {
    /// Starts the members, waits for a leader and, if asked, enables auth.
    pub async fn start(options: EtcdOptions) -> Result<Self, EtcdError> {
        let binary = options.release.binary()?;
        let dir = tempfile::Builder::new()
            .prefix("kmetal-etcd-")
            .tempdir()
            .map_err(EtcdError::TempDir)?;
        let n = options.members.max(1);
        let ca = options
            .tls
            .then(|| TestCa::new("kmetal-test-etcd-ca"))
            .transpose()?;
        let mut tls_args = Vec::new();
        let mut root_cert = None;
        if let Some(ca) = &ca {
            let server = ca.server("etcd")?;
            let ca_path = write_pem(dir.path(), "ca.crt", &ca.cert_pem)?;
            let cert = write_pem(dir.path(), "server.crt", &server.cert)?;
            let key = write_pem(dir.path(), "server.key", &server.key)?;
            tls_args = vec![
                format!("--cert-file={}", cert.display()),
                format!("--key-file={}", key.display()),
                format!("--trusted-ca-file={}", ca_path.display()),
                "--client-cert-auth".to_string(),
            ];
            root_cert = Some(ca.client("root")?);
        }
        let scheme = if options.tls { "https" } else { "http" };
        let mut plan = Vec::with_capacity(n);
        for i in 0..n {
            let client_port = free_port().map_err(EtcdError::TempDir)?;
            let peer_port = free_port().map_err(EtcdError::TempDir)?;
            let proxy = if options.peer_proxies {
                Some(FaultProxy::start(([127, 0, 0, 1], peer_port).into()).await?)
            } else {
                None
            };
            let advertised = proxy.as_ref().map_or(peer_port, |p| p.addr().port());
            plan.push((format!("m{i}"), client_port, peer_port, advertised, proxy));
        }
        let initial_cluster = plan
            .iter()
            .map(|(name, _, _, adv, _)| format!("{name}=http://127.0.0.1:{adv}"))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("kmetal-{}", dir.path().display()).replace('/', "-");
        let mut members = Vec::with_capacity(n);
        for (name, client_port, peer_port, advertised, proxy) in plan {
            let data = dir.path().join(&name);
            let mut args = vec![
                format!("--name={name}"),
                format!("--data-dir={}", data.display()),
                format!("--listen-client-urls={scheme}://127.0.0.1:{client_port}"),
                format!("--advertise-client-urls={scheme}://127.0.0.1:{client_port}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{advertised}"),
                format!("--initial-cluster={initial_cluster}"),
                "--initial-cluster-state=new".to_string(),
                format!("--initial-cluster-token={token}"),
                format!("--heartbeat-interval={}", options.heartbeat.as_millis()),
                format!(
                    "--election-timeout={}",
                    options.election_timeout.as_millis()
                ),
                "--logger=zap".to_string(),
                "--log-outputs=stderr".to_string(),
            ];
            if let Some(q) = options.quota_backend_bytes {
                args.push(format!("--quota-backend-bytes={q}"));
            }
            if let Some(p) = options.progress_notify_interval {
                args.push(format!(
                    "{}={}ms",
                    options.release.progress_notify_flag(),
                    p.as_millis()
                ));
            }
            args.extend(tls_args.iter().cloned());
            let log = dir.path().join(format!("{name}.log"));
            members.push(Member {
                name,
                client_port,
                args,
                log,
                process: None,
                peer_proxy: proxy,
            });
        }
        let mut cluster = Self {
            binary,
            members,
            ca,
            root_cert,
            root_password: "kmetal-root-password".into(),
            auth_enabled: false,
            options,
            _dir: dir,
        };
        for i in 0..n {
            cluster.spawn(i)?;
        }
        cluster.wait_for_leader(READY_TIMEOUT).await?;
        if cluster.options.auth {
            cluster.enable_auth().await?;
            cluster.auth_enabled = true;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> Result<(), EtcdError> {
        let m = self.members.get_mut(i).ok_or(EtcdError::NoSuchMember(i))?;
        let mut cmd = process::command(&self.binary, &Launch::default());
        cmd.args(&m.args);
        m.process = Some(Supervised::spawn(cmd, &m.log)?);
        Ok(())
    }

    async fn enable_auth(&self) -> Result<(), EtcdError> {
        // Before auth is on, any client may administer; with TLS our client cert says "root".
        let mut c = Client::connect(self.endpoints(), Some(self.base_options()))
            .await
            .map_err(EtcdError::Client)?;
        c.user_add("root", self.root_password.clone(), None)
            .await
            .map_err(EtcdError::Client)?;
        c.user_grant_role("root", "root")
            .await
            .map_err(EtcdError::Client)?;
        c.auth_enable().await.map_err(EtcdError::Client)?;
        Ok(())
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no members (never true for a started cluster).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Whether TLS is on.
    pub fn uses_tls(&self) -> bool {
        self.options.tls
    }

    /// Client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> Option<String> {
        let scheme = if self.options.tls { "https" } else { "http" };
        self.members
            .get(i)
            .map(|m| format!("{scheme}://127.0.0.1:{}", m.client_port))
    }

    /// Client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len())
            .filter_map(|i| self.endpoint(i))
            .collect()
    }

    /// The member's name (`m0`, `m1`, ...).
    pub fn member_name(&self, i: usize) -> Option<&str> {
        self.members.get(i).map(|m| m.name.as_str())
    }

    /// The fault proxy in front of member `i`'s peer port, when started with `peer_proxies`.
    pub fn peer_proxy(&self, i: usize) -> Option<&FaultProxy> {
        self.members.get(i).and_then(|m| m.peer_proxy.as_ref())
    }

    /// The test CA (TLS clusters only), PEM.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca.as_ref().map(|c| c.cert_pem.as_str())
    }

    /// The test CA's private key (TLS clusters only), PEM.
    pub fn ca_key_pem(&self) -> Option<&str> {
        self.ca.as_ref().map(|c| c.key_pem.as_str())
    }

    /// A client certificate with CN `user`, signed by the cluster's CA (TLS clusters only).
    pub fn client_cert(&self, user: &str) -> Result<Option<Pem>, EtcdError> {
        Ok(self.ca.as_ref().map(|c| c.client(user)).transpose()?)
    }

    /// The last `lines` lines of member `i`'s log (etcd logs JSON lines to it).
    pub fn member_log(&self, i: usize, lines: usize) -> String {
        self.members
            .get(i)
            .map(|m| process::log_tail(&m.log, lines))
            .unwrap_or_default()
    }

    /// The root user's password (auth clusters).
    pub fn root_password(&self) -> &str {
        &self.root_password
    }

    /// TLS options for a client authenticating with `identity` (TLS clusters only).
    pub fn tls_options(&self, identity: &Pem) -> Option<TlsOptions> {
        self.ca.as_ref().map(|ca| {
            TlsOptions::new()
                .ca_certificate(Certificate::from_pem(ca.cert_pem.clone()))
                .identity(Identity::from_pem(
                    identity.cert.clone(),
                    identity.key.clone(),
                ))
                .domain_name("localhost")
        })
    }

    fn base_options(&self) -> ConnectOptions {
        let mut o = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5));
        if let Some(t) = self.root_cert.as_ref().and_then(|p| self.tls_options(p)) {
            o = o.with_tls(t);
        }
        o
    }

    /// Connect options with root's credentials (password when auth is on, the root client
    /// certificate when TLS is on).
    pub fn root_options(&self) -> ConnectOptions {
        let o = self.base_options();
        // Until auth is on there is no root user to log in as.
        if self.auth_enabled && !self.options.tls {
            o.with_user("root", self.root_password.clone())
        } else {
            o
        }
    }

    /// A root client over every member.
    pub async fn client(&self) -> Result<Client, EtcdError> {
        Client::connect(self.endpoints(), Some(self.root_options()))
            .await
            .map_err(EtcdError::Client)
    }

    /// A root client talking to member `i` only.
    pub async fn member_client(&self, i: usize) -> Result<Client, EtcdError> {
        let ep = self.endpoint(i).ok_or(EtcdError::NoSuchMember(i))?;
        Client::connect([ep], Some(self.root_options()))
            .await
            .map_err(EtcdError::Client)
    }

    /// Member `i`'s process id, while running.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members
            .get(i)
            .and_then(|m| m.process.as_ref())
            .and_then(Supervised::pid)
    }

    /// Whether member `i`'s process is running.
    pub fn is_running(&mut self, i: usize) -> bool {
        self.members
            .get_mut(i)
            .and_then(|m| m.process.as_mut())
            .is_some_and(Supervised::is_running)
    }

    /// Kills member `i` (SIGKILL: no graceful leader transfer).
    pub fn kill(&mut self, i: usize) -> Result<(), EtcdError> {
        let m = self.members.get_mut(i).ok_or(EtcdError::NoSuchMember(i))?;
        if let Some(mut p) = m.process.take() {
            p.kill();
        }
        Ok(())
    }

    /// Restarts member `i` on its data directory and waits until it serves again.
    pub async fn restart(&mut self, i: usize) -> Result<(), EtcdError> {
        self.kill(i)?;
        self.spawn(i)?;
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(_)) = self.member_status(i).await {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                let m = &self.members[i];
                return Err(ProcessError::NotReady {
                    what: format!("etcd member {}", m.name),
                    log_tail: process::log_tail(&m.log, 20),
                }
                .into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// (member id, leader id) as member `i` sees them; `None` while it has no leader.
    async fn member_status(&self, i: usize) -> Result<Option<(u64, u64)>, EtcdError> {
        let mut c = self.member_client(i).await?;
        let s = c.status().await.map_err(EtcdError::Client)?;
        let id = s.header().map(|h| h.member_id()).unwrap_or_default();
        Ok((s.leader() != 0).then_some((id, s.leader())))
    }

    /// Index of the current leader, asking the running members.
    pub async fn leader(&mut self) -> Result<usize, EtcdError> {
        let mut ids = vec![None; self.members.len()];
        let mut leader_id = None;
        for (i, id) in ids.iter_mut().enumerate() {
            if !self.is_running(i) {
                continue;
            }
            if let Ok(Some((me, leader))) = self.member_status(i).await {
                *id = Some(me);
                leader_id = Some(leader);
            }
        }
        let no_leader = || EtcdError::NoLeader {
            timeout: Duration::ZERO,
            log_tail: String::new(),
        };
        let leader_id = leader_id.ok_or_else(no_leader)?;
        ids.iter()
            .position(|id| *id == Some(leader_id))
            .ok_or_else(no_leader)
    }

    /// Waits until the running members agree on a leader that is itself running.
    pub async fn wait_for_leader(&mut self, timeout: Duration) -> Result<usize, EtcdError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            for i in 0..self.members.len() {
                let exited = self.members[i]
                    .process
                    .as_mut()
                    .is_some_and(|p| !p.is_running());
                if exited {
                    let m = &self.members[i];
                    return Err(ProcessError::NotReady {
                        what: format!("etcd member {} exited", m.name),
                        log_tail: process::log_tail(&m.log, 20),
                    }
                    .into());
                }
            }
            if let Ok(i) = self.leader().await {
                return Ok(i);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(EtcdError::NoLeader {
                    timeout,
                    log_tail: self
                        .members
                        .first()
                        .map(|m| process::log_tail(&m.log, 15))
                        .unwrap_or_default(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
