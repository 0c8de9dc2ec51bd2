//! One supervised process: started, restarted with exponential backoff when it dies, its
//! state published on a watch channel, stopped with SIGTERM then SIGKILL. Its pid file lets
//! a runtime that was itself killed adopt the process again instead of starting a second one
//! on the same ports.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    /// The binary.
    pub binary: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Where stdout and stderr go, appended across restarts.
    pub log: PathBuf,
    /// Where the running pid is kept (no adoption without one).
    pub pidfile: Option<PathBuf>,
    /// What else the process reads at start, as an opaque revision (a digest of its files):
    /// a spec that differs only here still means a restart to its owner.
    pub revision: u64,
}

/// Restart delays: doubling from `initial` up to `max`, back to `initial` once a run lasted
/// `reset_after` (a process that crashes at once is not restarted in a hot loop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
    /// A run this long resets the delay.
    pub reset_after: Duration,
}

impl Default for Backoff {
    /// 1 s doubling to 30 s, reset after a minute up (kubelet's CrashLoopBackOff, shorter).
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(60),
        }
    }
}

/// Where a supervised process is.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ProcessState {
    /// Being started.
    Starting,
    /// Running as `pid`.
    Running {
        /// Its process id.
        pid: u32,
        /// How often it was restarted before this run.
        restarts: u32,
        /// Whether it was found running (adopted) rather than started by us.
        adopted: bool,
    },
    /// It exited; it is started again after `retry_in`.
    Exited {
        /// Restarts so far, this one included.
        restarts: u32,
        /// How it ended (`exit status: 1`, `signal: 9 (SIGKILL)`).
        status: String,
        /// The delay before the next start.
        retry_in: Duration,
    },
    /// It could not be started; retried after `retry_in`.
    SpawnFailed {
        /// Restarts so far.
        restarts: u32,
        /// Why.
        error: Arc<std::io::Error>,
        /// The delay before the next try.
        retry_in: Duration,
    },
    /// Stopped on request; it is not restarted.
    Stopped,
}

impl ProcessState {
    /// The pid while running.
    pub fn pid(&self) -> Option<u32> {
        match self {
            Self::Running { pid, .. } => Some(*pid),
            _ => None,
        }
    }

    /// Restarts so far.
    pub fn restarts(&self) -> u32 {
        match self {
            Self::Running { restarts, .. }
            | Self::Exited { restarts, .. }
            | Self::SpawnFailed { restarts, .. } => *restarts,
            Self::Starting | Self::Stopped => 0,
        }
    }
}

impl std::fmt::Display for ProcessState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Starting => f.write_str("starting"),
            Self::Running { pid, .. } => write!(f, "running (pid {pid})"),
            Self::Exited {
                status, retry_in, ..
            } => write!(f, "exited ({status}), restarting in {retry_in:?}"),
            Self::SpawnFailed {
                error, retry_in, ..
            } => write!(f, "cannot start ({error}), retrying in {retry_in:?}"),
            Self::Stopped => f.write_str("stopped"),
        }
    }
}

enum Control {
    /// SIGTERM, SIGKILL after the grace period, no restart.
    Stop(Duration),
    /// SIGKILL now and start again at once (a rolling restart).
    Restart,
}

/// A supervised process; dropping it kills the process (SIGKILL) at once.
#[derive(Debug)]
pub struct Supervisor {
    state: watch::Receiver<ProcessState>,
    control: mpsc::Sender<Control>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            if let Some(pid) = self.state.borrow().pid() {
                signal(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

impl Supervisor {
    /// Starts supervising `spec` (adopting the process its pid file names if that still runs
    /// the same command line). Must be called inside a tokio runtime.
    pub fn start(spec: ProcessSpec, backoff: Backoff) -> Self {
        let (state_tx, state) = watch::channel(ProcessState::Starting);
        let (control, rx) = mpsc::channel(4);
        let task = tokio::spawn(supervise(spec, backoff, state_tx, rx));
        Self {
            state,
            control,
            task: Some(task),
        }
    }

    /// The state now.
    pub fn state(&self) -> ProcessState {
        self.state.borrow().clone()
    }

    /// A receiver of every state change.
    pub fn watch(&self) -> watch::Receiver<ProcessState> {
        self.state.clone()
    }

    /// Kills the process and starts it again without backoff.
    pub async fn restart(&self) {
        let _ = self.control.send(Control::Restart).await;
    }

    /// Stops it: SIGTERM, SIGKILL after `grace`; returns once it is gone.
    pub async fn stop(mut self, grace: Duration) {
        let _ = self.control.send(Control::Stop(grace)).await;
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// The process being watched: our child, or one adopted from the pid file.
enum Running {
    Child(tokio::process::Child),
    Adopted(u32),
}

impl Running {
    fn pid(&self) -> Option<u32> {
        match self {
            Self::Child(c) => c.id(),
            Self::Adopted(pid) => Some(*pid),
        }
    }

    /// Waits for it to end; how it ended.
    async fn wait(&mut self) -> String {
        match self {
            Self::Child(c) => match c.wait().await {
                Ok(status) => status.to_string(),
                Err(e) => format!("wait failed: {e}"),
            },
            Self::Adopted(pid) => {
                // Not our child: poll, as there is nothing to wait on.
                while alive(*pid) {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                "adopted process ended".into()
            }
        }
    }

    async fn kill(&mut self) {
        match self {
            Self::Child(c) => {
                let _ = c.kill().await;
            }
            Self::Adopted(pid) => {
                signal(*pid, rustix::process::Signal::KILL);
                while alive(*pid) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    async fn terminate(&mut self, grace: Duration) {
        if let Some(pid) = self.pid() {
            signal(pid, rustix::process::Signal::TERM);
        }
        if tokio::time::timeout(grace, self.wait()).await.is_err() {
            self.kill().await;
        }
    }
}

async fn supervise(
    spec: ProcessSpec,
    backoff: Backoff,
    state: watch::Sender<ProcessState>,
    mut control: mpsc::Receiver<Control>,
) {
    let mut restarts = 0u32;
    let mut delay = backoff.initial;
    let mut adopt = spec.pidfile.as_deref().and_then(|p| adoptable(p, &spec));
    if adopt.is_none()
        && let Some(pidfile) = &spec.pidfile
    {
        // Ours from an earlier run with another command line (a new etcd address, a new
        // version): it holds the replica's address, so it goes before the new one starts.
        stop_stale(pidfile, Duration::from_secs(10)).await;
    }
    loop {
        let _ = state.send(ProcessState::Starting);
        let (mut running, adopted) = match adopt.take() {
            Some(pid) => (Running::Adopted(pid), true),
            None => match spawn(&spec) {
                Ok(child) => (Running::Child(child), false),
                Err(e) => {
                    let _ = state.send(ProcessState::SpawnFailed {
                        restarts,
                        error: Arc::new(e),
                        retry_in: delay,
                    });
                    match pause(delay, &mut control).await {
                        Pause::Elapsed | Pause::Restart => {}
                        Pause::Stop => break,
                    }
                    restarts += 1;
                    delay = (delay * 2).min(backoff.max);
                    continue;
                }
            },
        };
        let Some(pid) = running.pid() else {
            continue;
        };
        if let Some(path) = &spec.pidfile {
            let _ = std::fs::write(path, pid.to_string());
        }
        let _ = state.send(ProcessState::Running {
            pid,
            restarts,
            adopted,
        });
        let started = Instant::now();
        let ended = tokio::select! {
            status = running.wait() => Some(status),
            ctl = control.recv() => match ctl {
                Some(Control::Restart) => {
                    running.kill().await;
                    None
                }
                Some(Control::Stop(grace)) => {
                    running.terminate(grace).await;
                    break;
                }
                None => {
                    running.kill().await;
                    break;
                }
            },
        };
        if let Some(path) = &spec.pidfile {
            let _ = std::fs::remove_file(path);
        }
        restarts += 1;
        let Some(status) = ended else {
            delay = backoff.initial;
            continue;
        };
        if started.elapsed() >= backoff.reset_after {
            delay = backoff.initial;
        }
        tracing::warn!(binary = %spec.binary.display(), %status, retry_in = ?delay, "process exited");
        let _ = state.send(ProcessState::Exited {
            restarts,
            status,
            retry_in: delay,
        });
        match pause(delay, &mut control).await {
            Pause::Elapsed => delay = (delay * 2).min(backoff.max),
            Pause::Restart => delay = backoff.initial,
            Pause::Stop => break,
        }
    }
    if let Some(path) = &spec.pidfile {
        let _ = std::fs::remove_file(path);
    }
    let _ = state.send(ProcessState::Stopped);
}

enum Pause {
    Elapsed,
    Restart,
    Stop,
}

async fn pause(delay: Duration, control: &mut mpsc::Receiver<Control>) -> Pause {
    tokio::select! {
        _ = tokio::time::sleep(delay) => Pause::Elapsed,
        ctl = control.recv() => match ctl {
            Some(Control::Restart) => Pause::Restart,
            Some(Control::Stop(_)) | None => Pause::Stop,
        },
    }
}

fn spawn(spec: &ProcessSpec) -> std::io::Result<tokio::process::Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)?;
    let err = log.try_clone()?;
    tokio::process::Command::new(&spec.binary)
        .args(&spec.args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
}

/// The pid in `pidfile` if that process still runs exactly `spec`'s command line.
fn adoptable(pidfile: &Path, spec: &ProcessSpec) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut want = Vec::new();
    for part in std::iter::once(spec.binary.as_os_str().as_encoded_bytes())
        .chain(spec.args.iter().map(|a| a.as_bytes()))
    {
        want.extend_from_slice(part);
        want.push(0);
    }
    (cmdline == want && alive(pid)).then_some(pid)
}

/// Stops the process `pidfile` names if its command line mentions the pid file's folder
/// (which only our processes name: their scratch dirs live there).
async fn stop_stale(pidfile: &Path, grace: Duration) {
    let Some(run_dir) = pidfile.parent() else {
        return;
    };
    let Some(pid) = std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    else {
        return;
    };
    if names(pid, run_dir) {
        tracing::info!(pid, pidfile = %pidfile.display(), "stopping a process left with another command line");
        signal(pid, rustix::process::Signal::TERM);
        let end = Instant::now() + grace;
        while alive(pid) && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if alive(pid) {
            signal(pid, rustix::process::Signal::KILL);
        }
    }
    let _ = std::fs::remove_file(pidfile);
}

/// Whether `pid` runs with `owner` somewhere in its command line.
fn names(pid: u32, owner: &Path) -> bool {
    let owner = owner.as_os_str().as_encoded_bytes();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    alive(pid) && !owner.is_empty() && cmdline.windows(owner.len()).any(|w| w == owner)
}

/// Stops the processes named by the `*.pid` files in `run_dir` whose command line mentions
/// `owner` (a folder only our processes name): SIGTERM, SIGKILL after `grace`.
pub async fn stop_orphans(run_dir: &Path, owner: &Path, grace: Duration) {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return;
    };
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "pid") {
            continue;
        }
        let Some(pid) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        else {
            continue;
        };
        if names(pid, owner) {
            signal(pid, rustix::process::Signal::TERM);
            pids.push(pid);
        }
    }
    let end = Instant::now() + grace;
    while pids.iter().any(|p| alive(*p)) && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for pid in pids.into_iter().filter(|p| alive(*p)) {
        signal(pid, rustix::process::Signal::KILL);
    }
}

/// Whether the process `pidfile` names still runs and is one of `owner`'s (its command line
/// names the folder): a runtime restarted next to running processes adopts them.
pub(crate) fn runs(pidfile: &Path, owner: &Path) -> bool {
    std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .is_some_and(|pid| alive(pid) && names(pid, owner))
}

/// Whether `pid` runs (a zombie does not).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|s| s != "Z" && s != "X"),
        Err(_) => false,
    }
}

fn signal(pid: u32, sig: rustix::process::Signal) -> bool {
    i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .is_some_and(|pid| rustix::process::kill_process(pid, sig).is_ok())
}

/// SIGKILLs `pid` the way a crash would (for drills); whether the signal was sent.
pub(crate) fn kill(pid: u32) -> bool {
    signal(pid, rustix::process::Signal::KILL)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, dir: &Path) -> ProcessSpec {
        ProcessSpec {
            binary: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            log: dir.join("log"),
            pidfile: Some(dir.join("pid")),
            revision: 0,
        }
    }

    async fn until(rx: &mut watch::Receiver<ProcessState>, f: impl Fn(&ProcessState) -> bool) {
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| f(s)))
            .await
            .expect("state in time")
            .expect("supervisor alive");
    }

    #[tokio::test]
    async fn restarts_a_dying_process_with_backoff_and_logs_every_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let backoff = Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(200),
            reset_after: Duration::from_secs(60),
        };
        let s = Supervisor::start(sh("echo run; exit 3", dir.path()), backoff);
        let mut rx = s.watch();
        until(&mut rx, |st| st.restarts() >= 3).await;
        let log = std::fs::read_to_string(dir.path().join("log")).expect("log");
        assert!(log.matches("run").count() >= 3, "{log}");
        let st = s.state();
        assert!(
            st.to_string().contains("exit status: 3") || st.pid().is_some(),
            "{st}"
        );
        s.stop(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn stop_terminates_and_drop_kills() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Supervisor::start(sh("exec sleep 60", dir.path()), Backoff::default());
        let mut rx = s.watch();
        until(&mut rx, |st| st.pid().is_some()).await;
        let pid = s.state().pid().expect("pid");
        assert!(dir.path().join("pid").exists());
        s.stop(Duration::from_secs(5)).await;
        assert!(!alive(pid));
        assert!(!dir.path().join("pid").exists(), "pid file removed");

        let s = Supervisor::start(sh("exec sleep 60", dir.path()), Backoff::default());
        let mut rx = s.watch();
        until(&mut rx, |st| st.pid().is_some()).await;
        let pid = s.state().pid().expect("pid");
        drop(s);
        let end = Instant::now() + Duration::from_secs(5);
        while alive(pid) && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!alive(pid), "killed on drop");
    }

    #[tokio::test]
    async fn a_second_supervisor_adopts_the_running_process() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A command line that stays what it was started as (a shell's `exec` would change it).
        let spec = ProcessSpec {
            binary: "/bin/sleep".into(),
            args: vec!["60".into()],
            ..sh("", dir.path())
        };
        // Left running by a runtime that was killed: not our child, its pid in the file.
        let orphan = std::process::Command::new(&spec.binary)
            .args(&spec.args)
            .spawn()
            .expect("spawn");
        let pid = orphan.id();
        std::fs::write(dir.path().join("pid"), pid.to_string()).expect("pid file");
        let second = Supervisor::start(spec, Backoff::default());
        let mut rx = second.watch();
        until(&mut rx, |st| st.pid().is_some()).await;
        assert!(matches!(
            second.state(),
            ProcessState::Running { pid: p, adopted: true, .. } if p == pid
        ));
        second.stop(Duration::from_secs(5)).await;
        let mut orphan = orphan;
        let _ = orphan.wait();
        assert!(!alive(pid));
    }

    #[tokio::test]
    async fn a_process_left_with_another_command_line_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        // An earlier run's process: ours (it names the run folder) but started differently.
        let old_binary = dir.path().join("sleep");
        std::os::unix::fs::symlink("/bin/sleep", &old_binary).expect("symlink");
        let mut orphan = std::process::Command::new(&old_binary)
            .arg("60")
            .spawn()
            .expect("spawn");
        std::fs::write(dir.path().join("pid"), orphan.id().to_string()).expect("pid file");
        let spec = ProcessSpec {
            binary: "/bin/sleep".into(),
            args: vec!["61".into()],
            ..sh("", dir.path())
        };
        let s = Supervisor::start(spec, Backoff::default());
        let mut rx = s.watch();
        until(&mut rx, |st| st.pid().is_some()).await;
        let _ = orphan.wait();
        assert!(!alive(orphan.id()), "the old process was stopped");
        assert!(matches!(
            s.state(),
            ProcessState::Running { adopted: false, .. }
        ));
        s.stop(Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn orphans_are_stopped_only_when_they_name_the_owner() {
        let dir = tempfile::tempdir().expect("tempdir");
        let owner = dir.path().join("tenant");
        // Ours runs from the owner's folder, so its command line names it.
        std::fs::create_dir_all(&owner).expect("owner");
        let sleep = owner.join("sleep");
        std::os::unix::fs::symlink("/bin/sleep", &sleep).expect("symlink");
        let spawn = |binary: &Path| {
            std::process::Command::new(binary)
                .arg("60")
                .spawn()
                .expect("spawn")
        };
        let mut ours = spawn(&sleep);
        let mut other = spawn(Path::new("/bin/sleep"));
        std::fs::write(dir.path().join("a.pid"), ours.id().to_string()).expect("pid");
        std::fs::write(dir.path().join("b.pid"), other.id().to_string()).expect("pid");
        stop_orphans(dir.path(), &owner, Duration::from_secs(5)).await;
        let _ = ours.wait();
        assert!(!alive(ours.id()));
        assert!(
            alive(other.id()),
            "a process that is not ours is left alone"
        );
        let _ = other.kill();
        let _ = other.wait();
    }

    #[tokio::test]
    async fn a_missing_binary_is_retried_and_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = ProcessSpec {
            binary: dir.path().join("nope"),
            args: vec![],
            log: dir.path().join("log"),
            pidfile: None,
            revision: 0,
        };
        let s = Supervisor::start(spec, Backoff::default());
        let mut rx = s.watch();
        until(&mut rx, |st| matches!(st, ProcessState::SpawnFailed { .. })).await;
        assert!(s.state().to_string().starts_with("cannot start"));
        s.stop(Duration::from_secs(1)).await;
    }
}
