//! A tenant's dedicated etcd: [`EtcdCluster`], one etcd member per placed node, with peer
//! and client TLS from the tenant's etcd CA, each member a supervised process.
//!
//! A monitor task asks every member for its status each second. A member whose process
//! died, or that has not answered for [`EtcdClusterConfig::replace_unresponsive_after`]
//! (a hung process or host), while the others hold quorum is replaced the way an etcd operator replaces a failed
//! member: removed from the cluster, added back, started on a fresh data dir. Without quorum
//! nothing can be removed or added, so the member is started again on its own data (the
//! only way back short of disaster recovery) and the status says quorum is lost. A bundle
//! change (renewal, rotation) restarts the members one at a time, each only while all of
//! them are healthy.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use kmetal_pki::Bundle;
use tokio::sync::{Mutex, broadcast, watch};
use tokio::task::JoinSet;

use crate::flags::{self, ClusterState, EtcdMemberInputs};
use crate::layout::{Ca, LayoutError, TenantLayout};
use crate::ports::free_port;
use crate::runtime::TenantId;
use crate::supervisor::{Backoff, ProcessSpec, ProcessState, Supervisor};

/// How often the monitor looks at the members.
const TICK: Duration = Duration::from_secs(1);
/// How long one member may take to answer a status request.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a membership change may take.
const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(5);
/// The first restart delay of a member: long enough for the monitor to replace it instead
/// (a restart in place is only for a cluster without quorum).
const MEMBER_BACKOFF: Backoff = Backoff {
    initial: Duration::from_secs(5),
    max: Duration::from_secs(30),
    reset_after: Duration::from_secs(60),
};

/// Why a dedicated etcd could not be run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EtcdClusterError {
    /// The etcd binary is not where the runtime was told it is.
    #[error("no etcd binary at {} (scripts/peers.sh builds etcd 3.6 into peers/bin)", path.display())]
    NoBinary {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// An even or zero member count: etcd needs an odd number for a majority to survive a
    /// failure.
    #[error("a dedicated etcd needs an odd number of members (1, 3, 5, 7), not {0}")]
    MemberCount(usize),
    /// The running cluster has other members than the plan: resizing is not supported.
    #[error("the running etcd has members {running:?}; the plan asks for {planned:?}")]
    MembersChanged {
        /// Members running.
        running: Vec<String>,
        /// Members asked for.
        planned: Vec<String>,
    },
    /// The tenant's files could not be written or lack an etcd certificate.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// A member's port or run file could not be had.
    #[error("member {member}: {what}")]
    Io {
        /// The member.
        member: String,
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// How a dedicated etcd is run.
#[derive(Debug, Clone)]
pub struct EtcdClusterConfig {
    /// The etcd binary (3.6).
    pub binary: PathBuf,
    /// SIGTERM to SIGKILL when the cluster stops.
    pub stop_grace: Duration,
    /// A member whose process runs but has not answered (or has had no leader while the
    /// others had one) for this long is replaced like a dead one: a hung process or host.
    pub replace_unresponsive_after: Duration,
}

impl EtcdClusterConfig {
    /// `binary` with a 10 s stop grace; unresponsive members are replaced after 30 s.
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            stop_grace: Duration::from_secs(10),
            replace_unresponsive_after: Duration::from_secs(30),
        }
    }
}

/// A dedicated etcd to run: the tenant, its member names (the nodes the placement chose)
/// and the bundle whose `etcd/` certificates it serves with.
#[derive(Debug, Clone)]
pub struct EtcdPlan {
    /// Whose etcd.
    pub tenant: TenantId,
    /// One member per name, in order.
    pub members: Vec<String>,
    /// The tenant's PKI bundle (etcd CA, server, peer and healthcheck-client certificates).
    pub bundle: Bundle,
}

/// Where one member is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MemberState {
    /// Started, not answering yet.
    Starting,
    /// Answers and follows a leader.
    Healthy {
        /// It is the leader.
        leader: bool,
    },
    /// Running but it does not answer, or it has no leader.
    Unhealthy {
        /// What its status request said.
        reason: String,
    },
    /// Its process is gone (exited, or could not start).
    Down {
        /// How it ended.
        reason: String,
    },
    /// Being removed and added back on a fresh data dir.
    Replacing,
}

impl MemberState {
    /// Answers and has a leader.
    pub fn is_healthy(&self) -> bool {
        matches!(self, Self::Healthy { .. })
    }
}

impl std::fmt::Display for MemberState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Starting => f.write_str("starting"),
            Self::Healthy { leader: true } => f.write_str("healthy (leader)"),
            Self::Healthy { leader: false } => f.write_str("healthy"),
            Self::Unhealthy { reason } => write!(f, "unhealthy: {reason}"),
            Self::Down { reason } => write!(f, "down: {reason}"),
            Self::Replacing => f.write_str("being replaced"),
        }
    }
}

/// One member as the monitor last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    /// Its name.
    pub name: String,
    /// `https://127.0.0.1:port`.
    pub client_url: String,
    /// Where it is.
    pub state: MemberState,
    /// Restarts of its current process (in place, on its own data).
    pub restarts: u32,
    /// How often it was replaced on a fresh data dir.
    pub replacements: u32,
    /// Its process, while running.
    pub pid: Option<u32>,
}

/// A dedicated etcd as the monitor last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EtcdStatus {
    /// Every member, in plan order.
    pub members: Vec<MemberStatus>,
}

impl EtcdStatus {
    /// How many healthy members a majority is.
    pub fn quorum_size(&self) -> usize {
        self.members.len() / 2 + 1
    }

    /// Members answering with a leader.
    pub fn healthy(&self) -> usize {
        self.members.iter().filter(|m| m.state.is_healthy()).count()
    }

    /// A majority is healthy: writes go on.
    pub fn has_quorum(&self) -> bool {
        !self.members.is_empty() && self.healthy() >= self.quorum_size()
    }

    /// Every member's client URL (the api-servers' `--etcd-servers`).
    pub fn client_urls(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// One line per member that is not healthy.
    pub fn problems(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| !m.state.is_healthy())
            .map(|m| format!("etcd member {}: {}", m.name, m.state))
            .collect()
    }
}

/// One member's process and what the monitor knows of it.
struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    spec: ProcessSpec,
    supervisor: Option<Supervisor>,
    /// Restarts of the process already accounted for.
    seen_restarts: u32,
    /// Its process died and it has not been healthy since.
    died: bool,
    /// Since when its process runs without answering.
    unresponsive_since: Option<std::time::Instant>,
    /// It must restart to read a new bundle.
    stale: bool,
    replacing: bool,
    replacements: u32,
    client_conn: Option<Client>,
}

impl Member {
    fn peer_url(&self) -> String {
        format!("https://{}", self.peer)
    }

    fn client_url(&self) -> String {
        format!("https://{}", self.client)
    }
}

struct Inner {
    tenant: TenantId,
    binary: PathBuf,
    layout: TenantLayout,
    token: String,
    members: Vec<Member>,
    stop_grace: Duration,
    replace_unresponsive_after: Duration,
}

/// A running dedicated etcd; dropping it kills its members.
pub struct EtcdCluster {
    inner: Arc<Mutex<Inner>>,
    status: watch::Receiver<EtcdStatus>,
    monitor: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.monitor.abort();
    }
}

impl EtcdCluster {
    /// Starts (or adopts, after a runtime restart) the members of `plan` in `layout`'s
    /// folder and the monitor that keeps them; `changes` hears the tenant whenever the
    /// status changes.
    pub fn start(
        plan: &EtcdPlan,
        config: &EtcdClusterConfig,
        layout: TenantLayout,
        changes: broadcast::Sender<TenantId>,
    ) -> Result<Self, EtcdClusterError> {
        let binary = config.binary.clone();
        let n = plan.members.len();
        if n % 2 == 0 {
            return Err(EtcdClusterError::MemberCount(n));
        }
        if !binary.is_file() {
            return Err(EtcdClusterError::NoBinary { path: binary });
        }
        let mut ports = Vec::with_capacity(n);
        for name in &plan.members {
            ports.push(member_ports(&layout, name)?);
        }
        let initial_cluster = plan
            .members
            .iter()
            .zip(&ports)
            .map(|(name, (_, peer))| format!("{name}=https://{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("kmetal-{}-{}", plan.tenant.namespace, plan.tenant.name);
        let mut members = Vec::with_capacity(n);
        for (name, (client, peer)) in plan.members.iter().zip(ports) {
            // A member that ran before keeps its command line (it may have joined as a
            // replacement), so a new runtime adopts the process the old one left.
            let args_file = layout.run_file(process_name(name), "args");
            let args = match std::fs::read_to_string(&args_file) {
                Ok(s) => s.lines().map(str::to_owned).collect(),
                Err(_) => {
                    let data = layout.etcd_data(name);
                    let inputs = EtcdMemberInputs {
                        name,
                        data_dir: &data,
                        client,
                        peer,
                        initial_cluster: &initial_cluster,
                        state: ClusterState::New,
                        token: &token,
                    };
                    let args = flags::etcd_member(&layout, &inputs)?.to_args();
                    write_args(&args_file, name, &args)?;
                    args
                }
            };
            let spec = ProcessSpec {
                binary: binary.clone(),
                args,
                log: layout.log(process_name(name)),
                pidfile: Some(layout.pidfile(process_name(name))),
                revision: layout.digest(),
            };
            members.push(Member {
                name: name.clone(),
                client,
                peer,
                supervisor: Some(Supervisor::start(spec.clone(), MEMBER_BACKOFF)),
                spec,
                seen_restarts: 0,
                died: false,
                unresponsive_since: None,
                stale: false,
                replacing: false,
                replacements: 0,
                client_conn: None,
            });
        }
        let inner = Inner {
            tenant: plan.tenant.clone(),
            binary,
            layout,
            token,
            members,
            stop_grace: config.stop_grace,
            replace_unresponsive_after: config.replace_unresponsive_after,
        };
        let initial = snapshot(&inner, &[]);
        let (tx, status) = watch::channel(initial);
        let inner = Arc::new(Mutex::new(inner));
        let monitor = tokio::spawn(monitor(inner.clone(), tx, changes));
        Ok(Self {
            inner,
            status,
            monitor,
        })
    }

    /// The status the monitor last published.
    pub fn status(&self) -> EtcdStatus {
        self.status.borrow().clone()
    }

    /// Moves the running cluster toward `plan`: a changed bundle is written and the members
    /// restart one at a time to read it. The member set cannot change.
    pub async fn update(&self, plan: &EtcdPlan) -> Result<(), EtcdClusterError> {
        let mut inner = self.inner.lock().await;
        let running: Vec<String> = inner.members.iter().map(|m| m.name.clone()).collect();
        if running != plan.members {
            return Err(EtcdClusterError::MembersChanged {
                running,
                planned: plan.members.clone(),
            });
        }
        if inner.layout.bundle() != &plan.bundle {
            inner.layout = TenantLayout::write(inner.layout.dir(), plan.bundle.clone())?;
            let digest = inner.layout.digest();
            for m in &mut inner.members {
                m.spec.revision = digest;
                m.stale = true;
            }
        }
        Ok(())
    }

    /// Kills one member's process (SIGKILL) the way a crash would, for tests and drills.
    /// Returns the pid killed.
    pub async fn kill_member(&self, name: &str) -> Option<u32> {
        let inner = self.inner.lock().await;
        let m = inner.members.iter().find(|m| m.name == name)?;
        let pid = m.supervisor.as_ref()?.state().pid()?;
        crate::supervisor::kill(pid).then_some(pid)
    }

    /// Stops the monitor and every member (SIGTERM, SIGKILL after the grace period).
    pub async fn stop(&self) {
        self.monitor.abort();
        let mut inner = self.inner.lock().await;
        let grace = inner.stop_grace;
        let mut set = JoinSet::new();
        for m in &mut inner.members {
            if let Some(s) = m.supervisor.take() {
                set.spawn(s.stop(grace));
            }
        }
        while set.join_next().await.is_some() {}
    }
}

/// `etcd-<member>`: the member's process name in the tenant's `logs/` and `run/`.
fn process_name(member: &str) -> String {
    format!("etcd-{member}")
}

/// The member's client and peer ports: the ones it had, or two free loopback ports (the
/// picker never hands a port out twice, so no two members share one).
fn member_ports(
    layout: &TenantLayout,
    name: &str,
) -> Result<(SocketAddr, SocketAddr), EtcdClusterError> {
    let file = layout.run_file(process_name(name), "addr");
    if let Some((c, p)) = std::fs::read_to_string(&file).ok().and_then(|s| {
        let (c, p) = s.trim().split_once(' ')?;
        Some((c.parse().ok()?, p.parse().ok()?))
    }) {
        return Ok((c, p));
    }
    let io = |what| {
        move |source| EtcdClusterError::Io {
            member: name.to_owned(),
            what,
            source,
        }
    };
    let free = || {
        let port = free_port().map_err(io("finding a free port"))?;
        Ok::<_, EtcdClusterError>(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
    };
    let (client, peer) = (free()?, free()?);
    std::fs::write(&file, format!("{client} {peer}")).map_err(io("writing its ports"))?;
    Ok((client, peer))
}

fn write_args(file: &std::path::Path, name: &str, args: &[String]) -> Result<(), EtcdClusterError> {
    std::fs::write(file, args.join("\n")).map_err(|source| EtcdClusterError::Io {
        member: name.to_owned(),
        what: "writing its command line",
        source,
    })
}

/// TLS for talking to the members: the etcd CA and the healthcheck-client certificate.
fn connect_options(layout: &TenantLayout) -> Result<ConnectOptions, LayoutError> {
    let trust =
        std::fs::read_to_string(layout.trust(Ca::Etcd)?).map_err(|source| LayoutError::Io {
            path: layout.dir().join("pki/etcd"),
            source,
        })?;
    let tls = TlsOptions::new()
        .ca_certificate(Certificate::from_pem(trust))
        .identity(Identity::from_pem(
            layout.pem("pki/etcd/healthcheck-client.crt")?,
            layout.pem("pki/etcd/healthcheck-client.key")?,
        ))
        // The members' certificate names localhost and 127.0.0.1 (kubeadm's etcd SANs).
        .domain_name("localhost");
    Ok(ConnectOptions::new()
        .with_connect_timeout(PROBE_TIMEOUT)
        .with_timeout(MEMBERSHIP_TIMEOUT)
        .with_tls(tls))
}

/// What one member's status request said: its id and its leader's, or why it failed.
type Probe = Result<(u64, u64), String>;

async fn probe(
    client: Option<Client>,
    url: String,
    options: ConnectOptions,
) -> (Option<Client>, Probe) {
    let work = async {
        let mut c = match client {
            Some(c) => c,
            None => Client::connect([url], Some(options))
                .await
                .map_err(|e| e.to_string())?,
        };
        let s = c.status().await.map_err(|e| e.to_string())?;
        let id = s.header().map_or(0, |h| h.member_id());
        Ok::<_, String>((c, (id, s.leader())))
    };
    match tokio::time::timeout(PROBE_TIMEOUT, work).await {
        Ok(Ok((c, ids))) => (Some(c), Ok(ids)),
        Ok(Err(e)) => (None, Err(e)),
        Err(_) => (None, Err(format!("no answer within {PROBE_TIMEOUT:?}"))),
    }
}

/// The status from the members' processes and their last probes.
fn snapshot(inner: &Inner, probes: &[Probe]) -> EtcdStatus {
    // The leader most healthy members follow (a partitioned member may name an old one).
    let mut votes: Vec<(u64, usize)> = Vec::new();
    for (_, leader) in probes.iter().flatten() {
        if *leader == 0 {
            continue;
        }
        match votes.iter_mut().find(|(l, _)| l == leader) {
            Some(v) => v.1 += 1,
            None => votes.push((*leader, 1)),
        }
    }
    let leader = votes.iter().max_by_key(|(_, n)| *n).map(|(l, _)| *l);
    let members = inner
        .members
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let process = m
                .supervisor
                .as_ref()
                .map_or(ProcessState::Stopped, |s| s.state());
            let state = if m.replacing {
                MemberState::Replacing
            } else {
                match (&process, probes.get(i)) {
                    (ProcessState::Exited { .. } | ProcessState::SpawnFailed { .. }, _) => {
                        MemberState::Down {
                            reason: process.to_string(),
                        }
                    }
                    (ProcessState::Stopped, _) => MemberState::Down {
                        reason: "stopped".into(),
                    },
                    (ProcessState::Running { .. }, Some(Ok((id, l))))
                        if *l != 0 && Some(*l) == leader =>
                    {
                        MemberState::Healthy { leader: id == l }
                    }
                    (ProcessState::Running { .. }, Some(Ok(_))) => MemberState::Unhealthy {
                        reason: "no leader".into(),
                    },
                    (ProcessState::Running { .. }, Some(Err(e))) => {
                        MemberState::Unhealthy { reason: e.clone() }
                    }
                    _ => MemberState::Starting,
                }
            };
            MemberStatus {
                name: m.name.clone(),
                client_url: m.client_url(),
                state,
                restarts: process.restarts(),
                replacements: m.replacements,
                pid: process.pid(),
            }
        })
        .collect();
    EtcdStatus { members }
}

/// Looks at the members every [`TICK`]: probes them, publishes the status, replaces a dead
/// member while the others hold quorum, restarts a stale one while all are healthy.
async fn monitor(
    inner: Arc<Mutex<Inner>>,
    status: watch::Sender<EtcdStatus>,
    changes: broadcast::Sender<TenantId>,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (tenant, options, work) = {
            let mut g = inner.lock().await;
            let Ok(options) = connect_options(&g.layout) else {
                continue;
            };
            let work: Vec<_> = g
                .members
                .iter_mut()
                .map(|m| (m.client_conn.take(), m.client_url()))
                .collect();
            (g.tenant.clone(), options, work)
        };
        let mut set = JoinSet::new();
        for (i, (conn, url)) in work.into_iter().enumerate() {
            let options = options.clone();
            set.spawn(async move { (i, probe(conn, url, options).await) });
        }
        let mut probes: Vec<Probe> = vec![Err("not probed".into()); set.len()];
        let mut conns: Vec<Option<Client>> = vec![None; set.len()];
        while let Some(Ok((i, (conn, p)))) = set.join_next().await {
            probes[i] = p;
            conns[i] = conn;
        }
        let mut g = inner.lock().await;
        for (m, c) in g.members.iter_mut().zip(conns) {
            m.client_conn = c;
        }
        let snap = snapshot(&g, &probes);
        for (m, s) in g.members.iter_mut().zip(&snap.members) {
            let restarts = m.supervisor.as_ref().map_or(0, |s| s.state().restarts());
            let down = matches!(s.state, MemberState::Down { .. });
            if restarts > m.seen_restarts || down {
                m.died = true;
            }
            m.seen_restarts = restarts;
            if s.state.is_healthy() {
                m.died = false;
            }
            m.unresponsive_since = match s.state {
                MemberState::Unhealthy { .. } => {
                    Some(m.unresponsive_since.unwrap_or_else(std::time::Instant::now))
                }
                _ => None,
            };
        }
        publish(&status, &changes, &tenant, snap.clone());
        let healthy: Vec<bool> = snap.members.iter().map(|m| m.state.is_healthy()).collect();
        let quorum = snap.quorum_size();
        let hung_after = g.replace_unresponsive_after;
        let dead = g.members.iter().position(|m| {
            m.died
                || m.unresponsive_since
                    .is_some_and(|t| t.elapsed() >= hung_after)
        });
        if let Some(i) = dead {
            let others = healthy
                .iter()
                .enumerate()
                .filter(|&(j, h)| j != i && *h)
                .count();
            if others >= quorum {
                g.members[i].replacing = true;
                publish(&status, &changes, &tenant, snapshot(&g, &probes));
                if let Err(e) = replace(&mut g, i, &healthy, &options).await {
                    tracing::warn!(tenant = %tenant, member = %g.members[i].name, "replacing an etcd member: {e}");
                }
                g.members[i].replacing = false;
            }
            // Without quorum the member's supervisor starts it again on its own data.
            continue;
        }
        if healthy.iter().all(|h| *h)
            && let Some(m) = g.members.iter_mut().find(|m| m.stale)
        {
            m.stale = false;
            if let Some(s) = &m.supervisor {
                s.restart().await;
            }
        }
    }
}

fn publish(
    tx: &watch::Sender<EtcdStatus>,
    changes: &broadcast::Sender<TenantId>,
    tenant: &TenantId,
    snap: EtcdStatus,
) {
    // Unhealthy reasons change every probe; the operator hears only what it acts on.
    let summary = |s: &EtcdStatus| -> Vec<(bool, u32)> {
        s.members
            .iter()
            .map(|m| (m.state.is_healthy(), m.replacements))
            .collect()
    };
    let before = summary(&tx.borrow());
    let after = summary(&snap);
    tx.send_replace(snap);
    if before != after {
        let _ = changes.send(tenant.clone());
    }
}

/// Replaces member `i`: stops its process, removes it from the cluster (through a healthy
/// member), adds it back with the same peer URL, and starts it on a fresh data dir as a
/// member joining an existing cluster. Each step checks what the cluster already has, so a
/// replacement cut short is finished by the next one.
async fn replace(
    g: &mut Inner,
    i: usize,
    healthy: &[bool],
    options: &ConnectOptions,
) -> Result<(), String> {
    let grace = g.stop_grace;
    if let Some(s) = g.members[i].supervisor.take() {
        s.stop(grace.min(Duration::from_secs(2))).await;
    }
    let via: Vec<String> = g
        .members
        .iter()
        .zip(healthy)
        .enumerate()
        .filter(|&(j, (_, h))| j != i && *h)
        .map(|(_, (m, _))| m.client_url())
        .collect();
    let work = async {
        let mut c = Client::connect(via, Some(options.clone()))
            .await
            .map_err(|e| format!("connecting to the healthy members: {e}"))?;
        let peer_url = g.members[i].peer_url();
        let list = c
            .member_list()
            .await
            .map_err(|e| format!("listing members: {e}"))?;
        let existing = list
            .members()
            .iter()
            .find(|m| m.peer_urls().contains(&peer_url))
            .map(|m| (m.id(), m.name().is_empty()));
        if let Some((id, false)) = existing {
            c.member_remove(id)
                .await
                .map_err(|e| format!("removing member {id:x}: {e}"))?;
        }
        let members = if let Some((_, true)) = existing {
            list.members().to_vec()
        } else {
            c.member_add([peer_url.as_str()], None)
                .await
                .map_err(|e| format!("adding {peer_url}: {e}"))?
                .member_list()
                .to_vec()
        };
        Ok::<_, String>(members)
    };
    let members = tokio::time::timeout(MEMBERSHIP_TIMEOUT * 2, work)
        .await
        .map_err(|_| "the membership change took too long".to_string())??;
    let m = &g.members[i];
    let initial_cluster = members
        .iter()
        .filter_map(|x| {
            let url = x.peer_urls().first()?;
            let name = if *url == m.peer_url() {
                m.name.as_str()
            } else if x.name().is_empty() {
                return None;
            } else {
                x.name()
            };
            Some(format!("{name}={url}"))
        })
        .collect::<Vec<_>>()
        .join(",");
    let data = g.layout.etcd_data(&m.name);
    if let Err(e) = std::fs::remove_dir_all(&data)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        return Err(format!("removing {}: {e}", data.display()));
    }
    let inputs = EtcdMemberInputs {
        name: &m.name,
        data_dir: &data,
        client: m.client,
        peer: m.peer,
        initial_cluster: &initial_cluster,
        state: ClusterState::Existing,
        token: &g.token,
    };
    let args = flags::etcd_member(&g.layout, &inputs)
        .map_err(|e| e.to_string())?
        .to_args();
    write_args(
        &g.layout.run_file(process_name(&m.name), "args"),
        &m.name,
        &args,
    )
    .map_err(|e| e.to_string())?;
    let spec = ProcessSpec {
        binary: g.binary.clone(),
        args,
        ..g.members[i].spec.clone()
    };
    let m = &mut g.members[i];
    m.supervisor = Some(Supervisor::start(spec.clone(), MEMBER_BACKOFF));
    m.spec = spec;
    m.seen_restarts = 0;
    m.died = false;
    m.unresponsive_since = None;
    m.stale = false;
    m.client_conn = None;
    m.replacements += 1;
    tracing::info!(member = %m.name, "replaced an etcd member on a fresh data dir");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(state: MemberState) -> MemberStatus {
        MemberStatus {
            name: "m".into(),
            client_url: "https://127.0.0.1:1".into(),
            state,
            restarts: 0,
            replacements: 0,
            pid: None,
        }
    }

    #[test]
    fn quorum_is_a_healthy_majority() {
        let up = || member(MemberState::Healthy { leader: false });
        let down = || {
            member(MemberState::Down {
                reason: "signal: 9".into(),
            })
        };
        let s = EtcdStatus {
            members: vec![up(), up(), down()],
        };
        assert!(s.has_quorum());
        assert_eq!(s.problems(), ["etcd member m: down: signal: 9"]);
        let s = EtcdStatus {
            members: vec![up(), down(), down()],
        };
        assert!(!s.has_quorum());
        assert!(!EtcdStatus::default().has_quorum());
    }
}
