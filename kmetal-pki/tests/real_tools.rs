//! A generated tenant bundle checked with real tools (`openssl verify`, `openssl x509`,
//! `kubectl config view`), stored and loaded in kubeadm's layout and as a Secret map, and
//! refused with typed errors when tampered with; tenants do not verify under each other's CA.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use kmetal_pki::bundle::parse_kubeconfig;
use kmetal_pki::profile::{self, Signer};
use kmetal_pki::spec::DatastoreIssuer;
use kmetal_pki::{Bundle, PkiError, PkiSpec};
use kmetal_testkit::process::find_binary;

fn openssl() -> PathBuf {
    find_binary("openssl", "openssl", &[]).unwrap()
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A shared datastore's CA, as the DataStore resource would carry it.
fn datastore_ca() -> DatastoreIssuer {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "shared-etcd-ca");
    let cert = params.self_signed(&key).unwrap();
    DatastoreIssuer {
        user: "default_t1".into(),
        ca_cert_pem: cert.pem(),
        ca_key_pem: key.serialize_pem(),
    }
}

fn spec(tenant: &str) -> PkiSpec {
    let mut s = PkiSpec::new(tenant, format!("api.{tenant}.example.com:6443"));
    s.cert_sans = vec!["10.0.0.7".into(), format!("{tenant}.internal")];
    s.node_names = vec![format!("{tenant}-cp-0")];
    s.datastore = Some(datastore_ca());
    s
}

fn written(tenant: &str) -> (tempfile::TempDir, Bundle) {
    let dir = tempfile::tempdir().unwrap();
    let b = Bundle::generate(&spec(tenant)).unwrap();
    b.write_dir(dir.path()).unwrap();
    (dir, b)
}

fn ca_path(dir: &Path, signer: Signer) -> PathBuf {
    dir.join(match signer {
        Signer::SelfSigned | Signer::ClusterCa => "pki/ca.crt",
        Signer::FrontProxyCa => "pki/front-proxy-ca.crt",
        Signer::EtcdCa => "pki/etcd/ca.crt",
        Signer::DatastoreCa => "pki/datastore-ca.crt",
    })
}

/// The PEM certificate of a leaf: its .crt, or extracted from its kubeconfig.
fn leaf_cert(dir: &Path, b: &Bundle, p: &profile::Profile) -> PathBuf {
    if p.kubeconfig {
        let kc = parse_kubeconfig(p.path, b.get(p.path).unwrap()).unwrap();
        let out = dir.join(format!("{}.crt", p.path));
        std::fs::write(&out, kc.cert_pem).unwrap();
        out
    } else {
        dir.join(format!("{}.crt", p.path))
    }
}

#[test]
fn openssl_verifies_every_leaf_against_its_ca() {
    let (dir, b) = written("t1");
    for p in profile::LEAVES.iter() {
        let cert = leaf_cert(dir.path(), &b, p);
        let (ok, text) = run(Command::new(openssl())
            .arg("verify")
            .arg("-CAfile")
            .arg(ca_path(dir.path(), p.signer))
            .arg(&cert));
        assert!(ok && text.contains(": OK"), "{}: {text}", p.name);
    }
    for ca in ["pki/ca.crt", "pki/front-proxy-ca.crt", "pki/etcd/ca.crt"] {
        let path = dir.path().join(ca);
        let (ok, text) = run(Command::new(openssl())
            .arg("verify")
            .arg("-CAfile")
            .arg(&path)
            .arg(&path));
        assert!(ok, "{ca}: {text}");
    }
}

#[test]
fn openssl_shows_the_kubeadm_profile() {
    let (dir, b) = written("t1");
    let show = |p: &profile::Profile| {
        let cert = leaf_cert(dir.path(), &b, p);
        let (ok, text) = run(Command::new(openssl())
            .args([
                "x509",
                "-noout",
                "-subject",
                "-ext",
                "subjectAltName,extendedKeyUsage",
                "-in",
            ])
            .arg(&cert));
        assert!(ok, "{text}");
        text
    };
    let api = show(profile::by_name("apiserver").unwrap());
    assert!(
        api.contains("CN = kube-apiserver") || api.contains("CN=kube-apiserver"),
        "{api}"
    );
    assert!(api.contains("TLS Web Server Authentication"), "{api}");
    for san in [
        "DNS:t1-cp-0",
        "DNS:kubernetes.default.svc.cluster.local",
        "IP Address:10.96.0.1",
        "DNS:api.t1.example.com",
        "IP Address:10.0.0.7",
        "DNS:t1.internal",
    ] {
        assert!(api.contains(san), "missing {san}: {api}");
    }
    let admin = show(profile::by_name("admin.conf").unwrap());
    assert!(
        admin.contains("O = kubeadm:cluster-admins") || admin.contains("O=kubeadm:cluster-admins"),
        "{admin}"
    );
    assert!(admin.contains("TLS Web Client Authentication"), "{admin}");
    let etcd = show(profile::by_name("etcd-server").unwrap());
    assert!(
        etcd.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{etcd}"
    );
    assert!(
        etcd.contains("DNS:localhost") && etcd.contains("IP Address:127.0.0.1"),
        "{etcd}"
    );
    let ds = show(profile::by_name("datastore-client").unwrap());
    assert!(
        ds.contains("CN = default_t1") || ds.contains("CN=default_t1"),
        "{ds}"
    );
    let sm = show(profile::by_name("super-admin.conf").unwrap());
    assert!(sm.contains("system:masters"), "{sm}");
    // Leaves last a year, CAs ten, both backdated.
    let (_, dates) = run(Command::new(openssl())
        .args(["x509", "-noout", "-dates", "-in"])
        .arg(dir.path().join("pki/apiserver.crt")));
    assert!(
        dates.contains("notBefore") && dates.contains("notAfter"),
        "{dates}"
    );
}

#[test]
fn kubectl_reads_every_kubeconfig() {
    let kubectl = kmetal_testkit::process::peer_binary("kubectl").unwrap();
    let (dir, _) = written("t1");
    for (name, user) in [
        ("admin.conf", "kubernetes-admin"),
        ("super-admin.conf", "kubernetes-super-admin"),
        ("controller-manager.conf", "system:kube-controller-manager"),
        ("scheduler.conf", "system:kube-scheduler"),
        ("konnectivity-server.conf", "system:konnectivity-server"),
    ] {
        let (ok, text) = run(Command::new(&kubectl)
            .args(["config", "view", "--raw", "-o", "json", "--kubeconfig"])
            .arg(dir.path().join(name)));
        assert!(ok, "{name}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["users"][0]["name"], user, "{name}");
        assert_eq!(
            v["clusters"][0]["cluster"]["server"],
            "https://api.t1.example.com:6443"
        );
        assert_eq!(v["current-context"], format!("{user}@t1"));
    }
}

#[test]
fn layouts_round_trip_and_tampering_is_named() {
    let (dir, b) = written("t1");
    assert_eq!(Bundle::load_dir(dir.path()).unwrap(), b);
    let secret = b.to_secret_map();
    assert!(secret.contains_key("pki.etcd.ca.crt") && secret.contains_key("admin.conf"));
    assert_eq!(Bundle::from_secret_map(&secret).unwrap(), b);

    // A key swapped for another certificate's.
    let other = std::fs::read_to_string(dir.path().join("pki/front-proxy-client.key")).unwrap();
    std::fs::write(dir.path().join("pki/apiserver.key"), other).unwrap();
    let err = Bundle::load_dir(dir.path()).unwrap_err();
    assert!(
        matches!(&err, PkiError::KeyMismatch { file, cert } if file == "pki/apiserver.key" && cert == "pki/apiserver.crt"),
        "{err}"
    );

    // A leaf from another tenant.
    let (dir_b, _) = written("t2");
    let (dir, _) = written("t1");
    std::fs::copy(
        dir_b.path().join("pki/apiserver.crt"),
        dir.path().join("pki/apiserver.crt"),
    )
    .unwrap();
    std::fs::copy(
        dir_b.path().join("pki/apiserver.key"),
        dir.path().join("pki/apiserver.key"),
    )
    .unwrap();
    let err = Bundle::load_dir(dir.path()).unwrap_err();
    assert!(
        matches!(&err, PkiError::NotSignedBy { file, .. } if file == "pki/apiserver.crt"),
        "{err}"
    );

    // Garbage where a certificate should be.
    let (dir, _) = written("t1");
    std::fs::write(
        dir.path().join("pki/front-proxy-client.crt"),
        "not a certificate",
    )
    .unwrap();
    let err = Bundle::load_dir(dir.path()).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("pki/front-proxy-client.crt: not a PEM certificate"),
        "{err}"
    );

    // An unreadable file (a directory where the CA should be).
    let (dir, _) = written("t1");
    std::fs::remove_file(dir.path().join("pki/ca.crt")).unwrap();
    std::fs::create_dir(dir.path().join("pki/ca.crt")).unwrap();
    assert!(matches!(
        Bundle::load_dir(dir.path()),
        Err(PkiError::Missing { .. }) | Err(PkiError::Io { .. })
    ));
}

#[test]
fn an_expired_ca_is_refused() {
    let eleven_years_ago = SystemTime::now() - Duration::from_secs(11 * 365 * 24 * 3600);
    let b = Bundle::generate_at(&spec("old"), eleven_years_ago).unwrap();
    let err = b.verify().unwrap_err();
    assert!(
        matches!(&err, PkiError::ExpiredCa { file, .. } if file == "pki/ca.crt"),
        "{err}"
    );
    // Valid as of its own time.
    b.verify_at(eleven_years_ago + Duration::from_secs(3600))
        .unwrap();
}

#[test]
fn tenants_do_not_verify_under_each_others_ca() {
    let (a, _) = written("ta");
    let (b, _) = written("tb");
    let (ok, text) = run(Command::new(openssl())
        .arg("verify")
        .arg("-CAfile")
        .arg(b.path().join("pki/ca.crt"))
        .arg(a.path().join("pki/apiserver.crt")));
    assert!(!ok, "tenant A's certificate verified under B's CA: {text}");
}

#[test]
fn bad_specs_name_the_field() {
    let mut s = PkiSpec::new("t1", "api.example.com");
    s.cert_sans = vec!["bad name!".into()];
    assert!(
        matches!(Bundle::generate(&s), Err(PkiError::InvalidSan { field, .. }) if field == "certSANs[0]")
    );
    let mut s = PkiSpec::new("t1", "api.example.com");
    s.service_cidr = "10.96.0.0/33".into();
    assert!(
        matches!(Bundle::generate(&s), Err(PkiError::InvalidCidr { field, .. }) if field == "serviceCidr")
    );
    let s = PkiSpec::new("t1", "not a host:6443");
    assert!(
        matches!(Bundle::generate(&s), Err(PkiError::InvalidSan { field, .. }) if field == "endpoint")
    );
}

#[test]
fn shared_datastore_tenants_get_no_etcd_ca() {
    let mut s = spec("shared");
    s.dedicated_etcd = false;
    let b = Bundle::generate(&s).unwrap();
    assert!(b.files().all(|(path, _)| !path.starts_with("pki/etcd/")));
    assert!(b.get("pki/apiserver-etcd-client.crt").is_none());
    assert!(b.get("pki/datastore-client.crt").is_some());
    b.verify().unwrap();
}

#[test]
fn specs_come_from_a_tenant_control_plane() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/manifests/tenant-etcd.yaml"
    );
    let docs = kmetal_core::parse_file(std::path::Path::new(path)).unwrap();
    let tcp = docs
        .iter()
        .find_map(|d| match &d.content {
            kmetal_core::manifest::Content::Object {
                object: kmetal_core::Object::TenantControlPlane(t),
                ..
            } => Some(t.as_ref().clone()),
            _ => None,
        })
        .unwrap();
    let s = PkiSpec::from_tenant(&tcp).unwrap();
    let sans = s.apiserver_sans().unwrap();
    assert!(
        sans.contains(&"tenant-etcd.k8s.example.com".to_string()),
        "{sans:?}"
    );
    assert!(sans.contains(&"10.96.0.1".to_string()));
    assert!(s.server_url().ends_with(":6443"));
    let mut bad = tcp.clone();
    bad.spec.network_profile.advertise_address = Some("10.0.0.300".into());
    assert!(matches!(
        PkiSpec::from_tenant(&bad),
        Err(PkiError::InvalidIp { field, .. }) if field == "spec.networkProfile.advertiseAddress"
    ));
}
