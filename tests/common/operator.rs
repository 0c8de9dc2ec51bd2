//! Driving the operator example as a user does: `apply`, `get -o json`, long-running `run`
//! processes stopped the way an init system stops them.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A long-running operator: SIGTERM on drop (it stops the control planes it runs), SIGKILL
/// if it has not exited 30 s later.
pub struct Op(pub Child);

impl Drop for Op {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Op {
    /// SIGKILL, no chance to clean up or hand over (a crash, an OOM kill).
    pub fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The operator with `args`, on the management store `state`.
pub fn operator(state: &str, args: &[&str]) -> Command {
    let mut c = super::example("operator");
    c.args(args).arg("--state").arg(state);
    c
}

/// Writes `yaml` to `dir/name` and applies it.
pub fn apply(state: &str, dir: &Path, name: &str, yaml: &str) {
    let file = dir.join(name);
    std::fs::write(&file, yaml).expect("manifest");
    let out = operator(state, &["apply", "-f", file.to_str().expect("utf-8")])
        .output()
        .expect("apply");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every TenantControlPlane, as `get tcp -o json` prints them.
pub fn tenants(state: &str) -> Vec<Value> {
    let out = operator(state, &["get", "tcp", "-o", "json"])
        .output()
        .expect("get");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["items"].as_array().cloned().unwrap_or_default()
}

/// The tenant called `name`.
pub fn tenant(state: &str, name: &str) -> Option<Value> {
    tenants(state)
        .into_iter()
        .find(|t| t["metadata"]["name"] == name)
}

/// The condition `type_` of a tenant.
pub fn condition<'a>(t: &'a Value, type_: &str) -> Option<&'a Value> {
    t["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// Whether its Ready condition is True.
pub fn ready(t: &Value) -> bool {
    condition(t, "Ready").is_some_and(|c| c["status"] == "True")
}

/// Polls `f` every 200 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    f()
}
