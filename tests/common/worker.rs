//! A worker host for pattern C: its own network namespace, an address only it has, and an
//! HTTPS endpoint there standing for its kubelet, which the host cannot reach directly.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use kmetal_pki::{Bundle, PkiSpec};
use kmetal_testkit::Netns;
use kmetal_testkit::process::{self, Launch, Supervised};
use kmetal_testkit::tls::{Pem, TestCa};

/// The worker's Node name.
pub const NODE: &str = "worker-1";
/// Where its kubelet stand-in listens.
pub const KUBELET_PORT: u16 = 10250;

/// A page server for HTTPS on `addr:port` inside the namespace, like a kubelet's.
const HTTPS_SERVER: &str = r#"
import http.server, ssl, sys
addr, port, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
srv = http.server.ThreadingHTTPServer((addr, port), http.server.SimpleHTTPRequestHandler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"#;

/// A worker: its namespace, an address only it has, and the HTTPS endpoint on it.
pub struct Worker {
    // Processes first: they stop before the namespace goes.
    _https: Supervised,
    pub address: Ipv4Addr,
    pub token: String,
    pub netns: Netns,
    pub dir: tempfile::TempDir,
}

impl Worker {
    pub async fn start() -> Worker {
        let mut netns = Netns::create().expect("a network namespace (run as root; iproute2)");
        let address = netns
            .add_private_address()
            .expect("a namespace-only address");
        let dir = tempfile::tempdir().expect("tempdir");
        let site = dir.path().join("site");
        std::fs::create_dir(&site).expect("site");
        let token = format!("kmetal-kubelet-page-{}", std::process::id());
        std::fs::write(site.join("page.txt"), &token).expect("page");
        let ca = TestCa::new("worker-kubelet-ca").expect("ca");
        let Pem { cert, key } = ca.server(NODE).expect("cert");
        let (cert_file, key_file) = (
            dir.path().join("kubelet.crt"),
            dir.path().join("kubelet.key"),
        );
        std::fs::write(&cert_file, cert).expect("cert");
        std::fs::write(&key_file, key).expect("key");
        let launch = Launch {
            netns: Some(netns.name().into()),
            ..Launch::default()
        };
        let mut cmd = process::command(Path::new("python3"), &launch);
        cmd.args([
            "-c",
            HTTPS_SERVER,
            &address.to_string(),
            &KUBELET_PORT.to_string(),
        ])
        .arg(&cert_file)
        .arg(&key_file)
        .current_dir(&site);
        let mut https = Supervised::spawn(cmd, &dir.path().join("https.log"))
            .expect("python3 (Debian package python3)");
        let url = format!("https://{address}:{KUBELET_PORT}/page.txt");
        https
            .wait_until(
                "the worker's HTTPS endpoint",
                Duration::from_secs(30),
                || {
                    let out = netns
                        .command("curl")
                        .args(["-sk", "--max-time", "2", &url])
                        .output();
                    let ok = out.is_ok_and(|o| {
                        String::from_utf8_lossy(&o.stdout).contains("kmetal-kubelet-page")
                    });
                    async move { ok }
                },
            )
            .await
            .expect("endpoint up");
        Worker {
            _https: https,
            address,
            token,
            netns,
            dir,
        }
    }

    /// The tunnel's PKI: its server certificate covers the host's veth address, which agents
    /// in the namespace dial.
    pub fn tunnel_bundle(&self) -> Bundle {
        Bundle::generate(&PkiSpec::new(
            "tenant-egress",
            format!("{}:8132", self.netns.host_ip()),
        ))
        .expect("bundle")
    }

    /// The host cannot reach the endpoint: its route to the namespace-only address is
    /// unreachable, so only the tunnel gets there.
    pub fn assert_unreachable_from_host(&self) {
        let direct = std::net::TcpStream::connect_timeout(
            &(self.address, KUBELET_PORT).into(),
            Duration::from_secs(2),
        );
        assert!(
            direct.is_err(),
            "the host reached {} directly",
            self.address
        );
    }
}
