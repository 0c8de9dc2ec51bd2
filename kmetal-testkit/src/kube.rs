//! The real Kubernetes control plane (kube-apiserver, kube-controller-manager, kube-scheduler,
//! built by `scripts/peers.sh`) on loopback, serving a kmetal-pki tenant bundle in kubeadm's
//! layout, with its flags set the way kubeadm and Kamaji set them.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kmetal_testkit::kube::KubeError> {
//! use kmetal_testkit::kube::{ApiserverOptions, KubeApiserver};
//! let api = KubeApiserver::start(ApiserverOptions::new(["http://127.0.0.1:2379"])).await?;
//! let out = api.kubectl(&["get", "ns", "-o", "name"])?;
//! assert!(out.contains("namespace/default"));
//! # Ok(()) }
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kmetal_pki::{Bundle, PkiSpec};
use kmetal_runtime::Component;
use kmetal_runtime::flags::{self, ApiserverInputs, EtcdClient};
use kmetal_runtime::layout::TenantLayout;
use tempfile::TempDir;

use crate::http::{self, HttpError};
use crate::ports::free_port;
use crate::process::{self, Launch, ProcessError, Supervised};

/// Why a control-plane component could not be started or driven.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KubeError {
    /// Finding, starting or waiting for the binary failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// Issuing or writing the tenant bundle failed.
    #[error("cannot issue the tenant's PKI")]
    Pki(#[source] Box<kmetal_pki::PkiError>),
    /// A request to the component failed.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// The tenant's files could not be written or lack one a component needs.
    #[error(transparent)]
    Layout(#[from] kmetal_runtime::layout::LayoutError),
    /// Bootstrapping an object (kubeadm's cluster-admins binding) was refused.
    #[error("{what} answered {status}: {body}")]
    Refused {
        /// What was asked.
        what: &'static str,
        /// HTTP status.
        status: u16,
        /// The api-server's answer.
        body: String,
    },
    /// kmetal-runtime's bootstrap of the cluster failed otherwise.
    #[error("bootstrapping the cluster failed")]
    Bootstrap(#[source] kmetal_runtime::probe::ProbeError),
    /// kubectl ran but failed.
    #[error("kubectl {args} failed ({status}): {stderr}")]
    Kubectl {
        /// Its arguments.
        args: String,
        /// Exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Creating the temporary directory or a file in it failed.
    #[error("i/o in the control plane's directory")]
    Io(#[source] std::io::Error),
}

impl From<kmetal_pki::PkiError> for KubeError {
    fn from(e: kmetal_pki::PkiError) -> Self {
        Self::Pki(Box::new(e))
    }
}

/// The egress selector (`--egress-selector-config-file`) for traffic to the cluster's nodes.
pub use kmetal_runtime::flags::Egress;
/// How the api-server authenticates to etcd (the runtime's type: tests start api-servers
/// with the flags kmetal runs tenants with).
pub use kmetal_runtime::flags::EtcdTls as EtcdClientTls;

/// How to start a kube-apiserver.
#[derive(Debug, Clone)]
pub struct ApiserverOptions {
    /// `--etcd-servers`.
    pub etcd_servers: Vec<String>,
    /// How it authenticates to them.
    pub etcd_tls: EtcdClientTls,
    /// `--etcd-prefix` (the api-server's default, `/registry`, when `None`).
    pub etcd_prefix: Option<String>,
    /// `--etcd-servers-overrides` entries (`group/resource#servers`).
    pub etcd_servers_overrides: Vec<String>,
    /// `--etcd-compaction-interval` (the api-server's 5 minutes when `None`; zero turns it off).
    pub compaction_interval: Option<Duration>,
    /// `--egress-selector-config-file`, written for this selection.
    pub egress: Option<Egress>,
    /// A bundle issued for `127.0.0.1:<port>` to serve with; a fresh one when `None`.
    pub bundle: Option<(Bundle, u16)>,
    /// Further flags, after ours (the api-server takes the last value given).
    pub extra_args: Vec<String>,
}

impl ApiserverOptions {
    /// Options for plain-HTTP etcd `servers`, everything else at its default.
    pub fn new<S: Into<String>>(servers: impl IntoIterator<Item = S>) -> Self {
        Self {
            etcd_servers: servers.into_iter().map(Into::into).collect(),
            etcd_tls: EtcdClientTls::None,
            etcd_prefix: None,
            etcd_servers_overrides: Vec::new(),
            compaction_interval: None,
            egress: None,
            bundle: None,
            extra_args: Vec::new(),
        }
    }
}

/// The namespaces every api-server creates at start-up, sorted.
pub const SYSTEM_NAMESPACES: [&str; 4] =
    ["default", "kube-node-lease", "kube-public", "kube-system"];

/// How long a component may take to become ready: on two busy cores a cold api-server takes
/// 10-20 s to install its storage and post-start hooks.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// A running kube-apiserver, killed on drop.
#[derive(Debug)]
pub struct KubeApiserver {
    process: Option<Supervised>,
    binary: PathBuf,
    args: Vec<String>,
    port: u16,
    log: PathBuf,
    files: TenantLayout,
    // Dropped last: the process and the files live in it.
    _dir: TempDir,
}

impl KubeApiserver {
    /// Issues (or takes) the tenant bundle, starts the api-server, waits for `/readyz` and
    /// binds kubeadm's `kubeadm:cluster-admins` group to `cluster-admin`, as `kubeadm init`
    /// does, so [`admin_kubeconfig`](Self::admin_kubeconfig) is a cluster admin.
    pub async fn start(options: ApiserverOptions) -> Result<Self, KubeError> {
        let binary = process::peer_binary("kube-apiserver")?;
        let dir = tempfile::Builder::new()
            .prefix("kmetal-apiserver-")
            .tempdir()
            .map_err(KubeError::Io)?;
        let (bundle, port) = match options.bundle.clone() {
            Some(b) => b,
            None => {
                let port = free_port().map_err(KubeError::Io)?;
                (tenant_bundle("kmetal-test", port)?, port)
            }
        };
        let files = TenantLayout::write(dir.path(), bundle)?;
        let args = apiserver_args(&files, port, &options, dir.path())?;
        let mut api = Self {
            process: None,
            binary,
            args,
            port,
            log: dir.path().join("kube-apiserver.log"),
            files,
            _dir: dir,
        };
        api.spawn()?;
        api.wait_ready().await?;
        api.bind_cluster_admins().await?;
        Ok(api)
    }

    fn spawn(&mut self) -> Result<(), KubeError> {
        let mut cmd = process::command(&self.binary, &Launch::default());
        cmd.args(&self.args);
        self.process = Some(Supervised::spawn(cmd, &self.log)?);
        Ok(())
    }

    /// Waits until `/readyz` answers 200, failing early with the log's tail if the process exits.
    pub async fn wait_ready(&mut self) -> Result<(), KubeError> {
        let client = self
            .client("super-admin.conf")?
            .with_timeout(Duration::from_secs(5));
        let process = self.process.as_mut().ok_or(ProcessError::NotReady {
            what: "kube-apiserver (killed)".into(),
            log_tail: String::new(),
        })?;
        process
            .wait_until("kube-apiserver /readyz", READY_TIMEOUT, || {
                client.is_ok("/readyz")
            })
            .await?;
        Ok(())
    }

    async fn bind_cluster_admins(&self) -> Result<(), KubeError> {
        let client = self.client("super-admin.conf")?;
        match kmetal_runtime::bootstrap::bind_cluster_admins(&client).await {
            Ok(()) => Ok(()),
            Err(kmetal_runtime::probe::ProbeError::NotOk { status, body }) => {
                Err(KubeError::Refused {
                    what: "creating the kubeadm:cluster-admins ClusterRoleBinding",
                    status,
                    body,
                })
            }
            Err(kmetal_runtime::probe::ProbeError::Http(e)) => Err(e.into()),
            Err(e) => Err(KubeError::Bootstrap(e)),
        }
    }

    /// An HTTPS client for the api-server presenting the client certificate of one of the
    /// bundle's kubeconfigs (`admin.conf`: kubeadm's cluster admin; `super-admin.conf`:
    /// `system:masters`; `controller-manager.conf`, `scheduler.conf`).
    pub fn client(&self, kubeconfig: &'static str) -> Result<http::Client, KubeError> {
        let text = self.files.pem(kubeconfig)?;
        let parts = kmetal_pki::bundle::parse_kubeconfig(kubeconfig, text)?;
        Ok(http::Client::tls(
            self.addr(),
            "127.0.0.1",
            self.files.pem("pki/ca.crt")?,
            Some((&parts.cert_pem, &parts.key_pem)),
        )?)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, self.port).into()
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The tenant's folder (kubeadm's layout: `pki/…`, `*.conf`).
    pub fn dir(&self) -> &Path {
        self.files.dir()
    }

    /// The bundle it serves with.
    pub fn bundle(&self) -> &Bundle {
        self.files.bundle()
    }

    /// `admin.conf`: kubeadm's admin (group `kubeadm:cluster-admins`, bound to cluster-admin).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.files.dir().join("admin.conf")
    }

    /// Waits (the api-server's system-namespaces controller runs right after `/readyz`)
    /// until `kubectl get ns` lists `default`, `kube-node-lease`, `kube-public` and
    /// `kube-system`, at most 30 s, and returns the namespaces it listed last, sorted.
    pub async fn system_namespaces(&self) -> Result<Vec<String>, KubeError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.kubectl(&["get", "ns", "-o", "name"])?;
            let mut names: Vec<String> = out
                .lines()
                .filter_map(|l| l.strip_prefix("namespace/"))
                .map(str::to_owned)
                .collect();
            names.sort();
            if SYSTEM_NAMESPACES
                .iter()
                .all(|n| names.iter().any(|m| m == n))
                || tokio::time::Instant::now() > deadline
            {
                return Ok(names);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Runs the real kubectl (from `scripts/peers.sh`) as the admin and returns its stdout.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, KubeError> {
        kubectl(&self.admin_kubeconfig(), args)
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        process::log_tail(&self.log, lines)
    }

    /// Whether the process runs.
    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(Supervised::is_running)
    }

    /// Its process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(Supervised::pid)
    }

    /// Kills it (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Kills it and starts it again with the same flags, waiting for `/readyz`.
    pub async fn restart(&mut self) -> Result<(), KubeError> {
        self.kill();
        self.spawn()?;
        self.wait_ready().await
    }
}

/// Runs the real kubectl with `kubeconfig` and returns its stdout.
pub fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<String, KubeError> {
    let binary = process::peer_binary("kubectl")?;
    let out = Command::new(binary)
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(KubeError::Io)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(KubeError::Kubectl {
            args: args.join(" "),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

/// A tenant bundle for an api-server on `127.0.0.1:port`.
pub fn tenant_bundle(tenant: &str, port: u16) -> Result<Bundle, KubeError> {
    let mut spec = PkiSpec::new(tenant, format!("127.0.0.1:{port}"));
    spec.advertise_address = Some(Ipv4Addr::LOCALHOST.into());
    Ok(Bundle::generate(&spec)?)
}

/// kube-apiserver's flags: the runtime's recipe on loopback, then the test's options.
fn apiserver_args(
    files: &TenantLayout,
    port: u16,
    o: &ApiserverOptions,
    dir: &Path,
) -> Result<Vec<String>, KubeError> {
    let egress = o
        .egress
        .as_ref()
        .map(|e| files.write_egress(e))
        .transpose()?;
    let etcd = EtcdClient {
        servers: o.etcd_servers.clone(),
        tls: o.etcd_tls.clone(),
        prefix: o.etcd_prefix.clone(),
    };
    let cert_dir = dir.join("serving");
    let mut flags = flags::apiserver(&ApiserverInputs {
        layout: files,
        bind: (Ipv4Addr::LOCALHOST, port).into(),
        advertise: Ipv4Addr::LOCALHOST.into(),
        service_cidr: kmetal_core::tenant::DEFAULT_SERVICE_CIDR,
        cluster_domain: kmetal_core::tenant::DEFAULT_CLUSTER_DOMAIN,
        admission_plugins: &[],
        kubelet_address_types: &[],
        etcd: &etcd,
        egress_file: egress.as_deref(),
        cert_dir: &cert_dir,
    })?;
    if !o.etcd_servers_overrides.is_empty() {
        flags.set("etcd-servers-overrides", o.etcd_servers_overrides.join(","));
    }
    if let Some(every) = o.compaction_interval {
        flags.set(
            "etcd-compaction-interval",
            format!("{}ms", every.as_millis()),
        );
    }
    let mut args = flags.to_args();
    args.extend(o.extra_args.iter().cloned());
    Ok(args)
}

/// Which of the two controllers a [`KubeController`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Controller {
    /// kube-controller-manager, with `controller-manager.conf`.
    ControllerManager,
    /// kube-scheduler, with `scheduler.conf`.
    Scheduler,
}

impl Controller {
    fn binary(self) -> &'static str {
        match self {
            Self::ControllerManager => "kube-controller-manager",
            Self::Scheduler => "kube-scheduler",
        }
    }

    /// The name of the Lease in `kube-system` the elected leader holds.
    pub fn lease(self) -> &'static str {
        self.binary()
    }
}

/// A running kube-controller-manager or kube-scheduler, killed on drop.
#[derive(Debug)]
pub struct KubeController {
    kind: Controller,
    process: Supervised,
    port: u16,
    log: PathBuf,
    _dir: TempDir,
}

impl KubeController {
    /// Starts `kind` against `api` with the bundle's kubeconfig for it (leader election on,
    /// as kubeadm runs them) and waits for its `/healthz`. `extra_args` come after ours.
    pub async fn start(
        kind: Controller,
        api: &KubeApiserver,
        extra_args: &[&str],
    ) -> Result<Self, KubeError> {
        let binary = process::peer_binary(kind.binary())?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("kmetal-{}-", kind.binary()))
            .tempdir()
            .map_err(KubeError::Io)?;
        let port = free_port().map_err(KubeError::Io)?;
        let component = match kind {
            Controller::ControllerManager => Component::ControllerManager,
            Controller::Scheduler => Component::Scheduler,
        };
        let mut args = flags::controller(
            component,
            &api.files,
            (Ipv4Addr::LOCALHOST, port).into(),
            kmetal_core::tenant::DEFAULT_SERVICE_CIDR,
            None,
            dir.path(),
        )?
        .to_args();
        args.extend(extra_args.iter().map(|a| a.to_string()));
        let log = dir.path().join(format!("{}.log", kind.binary()));
        let mut cmd = process::command(&binary, &Launch::default());
        cmd.args(&args);
        let mut controller = Self {
            kind,
            process: Supervised::spawn(cmd, &log)?,
            port,
            log,
            _dir: dir,
        };
        let client = http::Client::tls_unverified((Ipv4Addr::LOCALHOST, port).into())?
            .with_timeout(Duration::from_secs(5));
        let what = format!("{} /healthz", kind.binary());
        controller
            .process
            .wait_until(&what, READY_TIMEOUT, || client.is_ok("/healthz"))
            .await?;
        Ok(controller)
    }

    /// Its secure port (`/healthz`, `/metrics`), serving a certificate it signed itself.
    pub fn addr(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, self.port).into()
    }

    /// Which controller this is.
    pub fn kind(&self) -> Controller {
        self.kind
    }

    /// Whether the process runs.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        process::log_tail(&self.log, lines)
    }
}
