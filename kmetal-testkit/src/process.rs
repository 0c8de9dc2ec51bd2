//! Finding server binaries and supervising server processes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Why a server process could not be found, started or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessError {
    /// Making a server's test certificates failed.
    #[error("cannot make test certificates")]
    Certificates(#[source] Box<crate::tls::TlsError>),
    /// The binary is not installed.
    #[error("`{binary}` not found: install Debian's `{package}` (apt-get install {package})")]
    MissingBinary {
        /// Binary name.
        binary: &'static str,
        /// Debian package that ships it.
        package: &'static str,
    },
    /// A real peer built from the Go module proxy is not there.
    #[error(
        "`{binary}` not built in {}: run scripts/peers.sh, which builds the pinned peers \
         from the Go module proxy (or set {PEERS_ENV} to a folder that has them)",
        dir.display()
    )]
    MissingPeer {
        /// Binary name.
        binary: &'static str,
        /// Where it was looked for.
        dir: PathBuf,
    },
    /// Spawning failed.
    #[error("cannot start {binary}")]
    Spawn {
        /// Binary path.
        binary: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A setup command ran but failed.
    #[error("{command} failed ({status}): {output}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// Exit status.
        status: std::process::ExitStatus,
        /// Its stderr and stdout.
        output: String,
    },
    /// The server exited or never became ready; the tail of its log is attached.
    #[error("{what} did not become ready: {log_tail}")]
    NotReady {
        /// Which server.
        what: String,
        /// Last lines of its log.
        log_tail: String,
    },
    /// Filesystem work in the temporary directory failed.
    #[error("i/o in {}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Looks `binary` up on `PATH`, then in `extra_dirs`.
pub fn find_binary(
    binary: &'static str,
    package: &'static str,
    extra_dirs: &[PathBuf],
) -> Result<PathBuf, ProcessError> {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .iter()
        .chain(extra_dirs)
        .map(|d| d.join(binary))
        .find(|p| p.is_file())
        .ok_or(ProcessError::MissingBinary { binary, package })
}

/// The variable naming the folder of the peers' binaries (what `scripts/peers.sh --bin-dir`
/// prints); `peers/bin` of this workspace when unset.
pub const PEERS_ENV: &str = "KMETAL_PEERS_BIN";

/// The folder holding the real peers that `scripts/peers.sh` builds (kube-apiserver,
/// kube-controller-manager, kube-scheduler, kubectl, kine, konnectivity-server and -agent,
/// etcd and etcdctl 3.6).
pub fn peers_dir() -> PathBuf {
    std::env::var_os(PEERS_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../peers/bin"))
}

/// Finds one of the real peers built by `scripts/peers.sh`; a missing one is an error naming
/// the script (never a skip).
pub fn peer_binary(binary: &'static str) -> Result<PathBuf, ProcessError> {
    let dir = peers_dir();
    let path = dir.join(binary);
    if path.is_file() {
        Ok(path)
    } else {
        Err(ProcessError::MissingPeer { binary, dir })
    }
}

/// User + system ticks of one `/proc/<pid>/stat` line, and its parent's pid.
fn stat_ticks(pid: u32) -> Option<(u32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields count after it.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// Linux's USER_HZ, the unit of `/proc/<pid>/stat` times, on every architecture we run.
const TICK: Duration = Duration::from_millis(10);

/// CPU time (user + system) process `pid` has used so far; `None` when it is gone. Linux only.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    Some(TICK * u32::try_from(stat_ticks(pid)?.1).ok()?)
}

/// [`cpu_time`] of `pid` and its live children: a server's cost in a benchmark, the
/// PostgreSQL postmaster's backends included.
pub fn cpu_time_with_children(pid: u32) -> Option<Duration> {
    let own = stat_ticks(pid)?.1;
    let children: u64 = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(stat_ticks)
        .filter(|(ppid, _)| *ppid == pid)
        .map(|(_, t)| t)
        .sum();
    Some(TICK * u32::try_from(own + children).ok()?)
}

/// How a supervised child is launched.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// Run as this user (by name) when we are root; PostgreSQL refuses to run as root.
    pub user: Option<String>,
    /// Run inside this network namespace (`ip netns exec`; see [`crate::netns`]).
    pub netns: Option<String>,
}

/// Whether this process runs as root (checked through /proc to stay free of `unsafe`).
pub fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Builds a command that dies with this process (via `setpriv --pdeathsig KILL` when
/// available), optionally switches user and enters a network namespace. `ip netns exec`
/// and setpriv both exec, so the child's pid is the binary's own.
pub fn command(binary: &Path, launch: &Launch) -> Command {
    let setpriv = Path::new("/usr/bin/setpriv");
    let switch_user = launch.user.as_ref().filter(|_| running_as_root());
    let mut argv: Vec<std::ffi::OsString> = Vec::new();
    if let Some(ns) = &launch.netns {
        argv.extend(["ip", "netns", "exec", ns.as_str()].map(Into::into));
    }
    if setpriv.is_file() {
        argv.push(setpriv.into());
        if let Some(u) = switch_user {
            argv.extend([
                format!("--reuid={u}").into(),
                format!("--regid={u}").into(),
                "--init-groups".into(),
            ]);
        }
        argv.extend(["--pdeathsig", "KILL"].map(Into::into));
    } else if let Some(u) = switch_user {
        argv.extend(["runuser", "-u", u.as_str(), "--"].map(Into::into));
    }
    argv.push(binary.into());
    let mut c = Command::new(&argv[0]);
    c.args(&argv[1..]);
    c
}

/// Runs a setup command to completion, turning failure into [`ProcessError::CommandFailed`].
pub fn run(mut cmd: Command) -> Result<(), ProcessError> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ProcessError::Spawn {
            binary: PathBuf::from(cmd.get_program()),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ProcessError::CommandFailed {
            command: shown,
            status: out.status,
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ),
        })
    }
}

/// A running server process, killed when dropped. Its output goes to a log file.
#[derive(Debug)]
pub struct Supervised {
    child: Option<Child>,
    log: PathBuf,
}

impl Supervised {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(mut cmd: Command, log: &Path) -> Result<Self, ProcessError> {
        let io_err = |source| ProcessError::Io {
            path: log.to_owned(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io_err)?;
        let file2 = file.try_clone().map_err(io_err)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(file2)
            .spawn()
            .map_err(|source| ProcessError::Spawn {
                binary: PathBuf::from(cmd.get_program()),
                source,
            })?;
        Ok(Self {
            child: Some(child),
            log: log.to_owned(),
        })
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM (a graceful stop; the process keeps running until it exits by itself).
    pub fn terminate(&self) -> std::io::Result<()> {
        match &self.child {
            Some(c) => rustix::process::kill_process(
                rustix::process::Pid::from_child(c),
                rustix::process::Signal::TERM,
            )
            .map_err(std::io::Error::from),
            None => Ok(()),
        }
    }

    /// Waits up to `timeout` for the process to exit by itself; kills it after that.
    pub fn wait_or_kill(&mut self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        if let Some(c) = &mut self.child {
            while std::time::Instant::now() < deadline {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    self.child = None;
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }

    /// The last `lines` lines of the log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// Polls `check` until it holds; fails with [`ProcessError::NotReady`] and the log's
    /// tail as soon as the process exits, or when `timeout` passes.
    pub async fn wait_until<F, Fut>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: F,
    ) -> Result<(), ProcessError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if !self.is_running() {
                return Err(ProcessError::NotReady {
                    what: format!("{what} (the process exited)"),
                    log_tail: self.log_tail(30),
                });
            }
            if check().await {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ProcessError::NotReady {
                    what: format!("{what} within {timeout:?}"),
                    log_tail: self.log_tail(30),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The last `lines` lines of a log file.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_names_the_package() {
        let err = find_binary("kmetal-no-such-server", "kmetal-no-such-package", &[])
            .expect_err("must not be found");
        assert_eq!(
            err.to_string(),
            "`kmetal-no-such-server` not found: install Debian's `kmetal-no-such-package` \
             (apt-get install kmetal-no-such-package)"
        );
    }

    #[test]
    fn missing_peer_names_the_script() {
        let err = peer_binary("kmetal-no-such-peer").expect_err("must not be found");
        let text = err.to_string();
        assert!(
            text.starts_with("`kmetal-no-such-peer` not built in "),
            "{text}"
        );
        assert!(text.contains("run scripts/peers.sh"), "{text}");
    }

    #[test]
    fn cpu_time_counts_work_done() {
        let me = std::process::id();
        let before = cpu_time(me).expect("own stat");
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(200) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let after = cpu_time(me).expect("own stat");
        assert!(
            after >= before + Duration::from_millis(100),
            "{before:?} -> {after:?}"
        );
        assert!(cpu_time_with_children(me).expect("own stat") >= after);
        assert_eq!(cpu_time(u32::MAX), None);
    }

    #[test]
    fn supervised_child_is_killed_on_drop() {
        let sleep = find_binary("sleep", "coreutils", &[]).expect("sleep");
        let log = std::env::temp_dir().join(format!("kmetal-sup-{}.log", std::process::id()));
        let mut cmd = command(&sleep, &Launch::default());
        cmd.arg("600");
        let mut child = Supervised::spawn(cmd, &log).expect("spawn");
        assert!(child.is_running());
        let pid = child.pid().expect("pid");
        drop(child);
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")),
            "child must be gone after drop"
        );
        let _ = std::fs::remove_file(log);
    }
}
