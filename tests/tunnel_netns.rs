//! Real network separation: a worker in its own network namespace serves HTTP on the
//! namespace's own 127.0.0.1 and runs the agent, which dials out to the server on the host;
//! curl on the host fetches the page through the mTLS CONNECT frontend, and cannot directly.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kmetal_pki::{Bundle, PkiSpec};
use kmetal_testkit::Netns;

/// Stops the processes (before the namespace goes: `ns` is dropped after this).
struct Cleanup {
    children: Vec<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn curl_on_the_host_reaches_a_namespace_only_service_through_the_tunnel() {
    let ns = Netns::create().expect("a network namespace (run as root, install iproute2)");
    let (host_ip, ns_ip) = (ns.host_ip(), ns.ns_ip());
    let mut cleanup = Cleanup {
        children: Vec::new(),
    };
    let in_ns = |args: &[&str]| {
        let mut c = ns.command(args[0]);
        c.args(&args[1..]);
        c
    };

    // The tenant's PKI: the server certificate covers the host's veth address (agents) and
    // 127.0.0.1 (curl on the host).
    let dir = tempfile::tempdir().expect("tempdir");
    let mut spec = PkiSpec::new("tenant-net", format!("{host_ip}:6443"));
    spec.cert_sans.push("127.0.0.1".into());
    Bundle::generate(&spec)
        .expect("bundle")
        .write_dir(dir.path())
        .expect("write pki");

    // The worker's page, only on the namespace's loopback.
    let site = dir.path().join("site");
    std::fs::create_dir(&site).expect("site");
    let token = format!("kmetal-worker-page-{}", std::process::id());
    std::fs::write(site.join("index.html"), &token).expect("page");
    let http = in_ns(&[
        "python3",
        "-m",
        "http.server",
        "18080",
        "--bind",
        "127.0.0.1",
    ])
    .current_dir(&site)
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("python3 http.server (install python3)");
    cleanup.children.push(http);

    let mut server = common::example("tunnel")
        .args(["server", "--agent-listen", &format!("{host_ip}:0")])
        .args(["--connect-listen", "127.0.0.1:0", "--server-id", "s0"])
        .arg("--pki")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("tunnel server");
    let found = common::lines_with(
        &mut server,
        &["listening agents=https://", "listening connect=https://"],
    );
    cleanup.children.push(server);
    let (agent_addr, connect_addr) = (found[0].clone(), found[1].clone());

    // The agent runs inside the namespace and dials out to the host.
    let agent_exe = common::example("tunnel").get_program().to_owned();
    let agent = ns
        .command(agent_exe)
        .args([
            "agent",
            "--server",
            &agent_addr,
            "--identity",
            "host=worker-1",
        ])
        .arg("--pki")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tunnel agent");
    cleanup.children.push(agent);

    let pki = dir.path().join("pki");
    let curl_via_tunnel = || {
        Command::new("curl")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .args(["-sS", "--max-time", "10", "-p"])
            .args(["--proxy", &format!("https://{connect_addr}")])
            .arg("--proxy-cacert")
            .arg(pki.join("ca.crt"))
            .arg("--proxy-cert")
            .arg(pki.join("apiserver-kubelet-client.crt"))
            .arg("--proxy-key")
            .arg(pki.join("apiserver-kubelet-client.key"))
            .arg("http://127.0.0.1:18080/")
            .output()
            .expect("curl (install curl)")
    };
    // The agent and the namespace's HTTP server come up asynchronously.
    let deadline = Instant::now() + Duration::from_secs(60);
    let page = loop {
        let out = curl_via_tunnel();
        let body = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && body.contains(&token) {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "no page through the tunnel: {} {}",
            body,
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(page.contains(&token));

    // From the host, the worker's loopback service does not exist.
    let direct = Command::new("curl")
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .args(["-sS", "--max-time", "5", "http://127.0.0.1:18080/"])
        .output()
        .expect("curl");
    let direct_body = String::from_utf8_lossy(&direct.stdout);
    assert!(
        !direct.status.success() || !direct_body.contains(&token),
        "the host must not reach the namespace's service directly"
    );
    // Nor through the veth address: the service binds only the namespace's loopback.
    let via_veth = Command::new("curl")
        .args(["-sS", "--max-time", "5", &format!("http://{ns_ip}:18080/")])
        .output()
        .expect("curl");
    assert!(!via_veth.status.success());
}
