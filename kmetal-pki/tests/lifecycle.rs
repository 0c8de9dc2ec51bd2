//! Expiry reports and renewal: due certificates are found by policy, renewal keeps the profile
//! (checked with `openssl x509`), re-issues kubeconfigs, keeps CA-signed leaves valid when a
//! CA is renewed, and never touches `sa.key`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, SystemTime};

use kmetal_pki::bundle::parse_kubeconfig;
use kmetal_pki::{Bundle, PkiError, PkiSpec, RenewalPolicy};
use kmetal_testkit::process::find_binary;

const DAY: Duration = Duration::from_secs(24 * 3600);

fn spec() -> PkiSpec {
    let mut s = PkiSpec::new("t1", "api.t1.example.com:6443");
    s.cert_sans = vec!["10.0.0.7".into()];
    s
}

/// Subject, SANs and EKU as openssl prints them.
fn profile_of(pem: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.crt");
    std::fs::write(&f, pem).unwrap();
    let out = Command::new(find_binary("openssl", "openssl", &[]).unwrap())
        .args([
            "x509",
            "-noout",
            "-subject",
            "-ext",
            "subjectAltName,extendedKeyUsage,basicConstraints",
            "-in",
        ])
        .arg(&f)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn policy_finds_what_is_due() {
    let now = SystemTime::now();
    let b = Bundle::generate_at(&spec(), now - 340 * DAY).unwrap();
    let report = b.expiry_report(now).unwrap();
    let api = report.iter().find(|e| e.name == "apiserver").unwrap();
    assert!(api.residual_seconds <= 26 * 24 * 3600 && api.residual_seconds > 24 * 24 * 3600);
    assert_eq!(api.certificate_authority.as_deref(), Some("ca"));
    let ca = report.iter().find(|e| e.name == "ca").unwrap();
    assert!(ca.is_ca && ca.certificate_authority.is_none());

    let due = b.due_for_renewal(&RenewalPolicy::default(), now).unwrap();
    assert!(due.contains(&"apiserver".to_string()) && due.contains(&"admin.conf".to_string()));
    assert!(!due.contains(&"ca".to_string()), "the CA has years left");
    // A deadline below 24 h is raised to 24 h.
    assert_eq!(
        RenewalPolicy::new(Duration::from_secs(60), None).deadline,
        DAY
    );
    // A fraction of the lifetime: half of 365 days left after 200 days is not enough.
    let young = Bundle::generate_at(&spec(), now - 200 * DAY).unwrap();
    assert!(
        young
            .due_for_renewal(&RenewalPolicy::default(), now)
            .unwrap()
            .is_empty()
    );
    let half = RenewalPolicy::new(DAY, Some(0.5));
    assert!(
        young
            .due_for_renewal(&half, now)
            .unwrap()
            .contains(&"apiserver".to_string())
    );
}

#[test]
fn renewal_keeps_the_profile_and_reissues_kubeconfigs() {
    let now = SystemTime::now();
    let mut b = Bundle::generate_at(&spec(), now - 340 * DAY).unwrap();
    let before_api = b.get("pki/apiserver.crt").unwrap().to_string();
    let before_admin = parse_kubeconfig("admin.conf", b.get("admin.conf").unwrap()).unwrap();
    let sa = b.get("pki/sa.key").unwrap().to_string();

    b.renew(&["apiserver", "admin.conf"], now).unwrap();
    b.verify().unwrap();
    let after_api = b.get("pki/apiserver.crt").unwrap().to_string();
    assert_ne!(after_api, before_api);
    assert_eq!(
        profile_of(&after_api),
        profile_of(&before_api),
        "CN, SANs and EKU kept"
    );
    let after_admin = parse_kubeconfig("admin.conf", b.get("admin.conf").unwrap()).unwrap();
    assert_ne!(after_admin.cert_pem, before_admin.cert_pem);
    assert_eq!(
        profile_of(&after_admin.cert_pem),
        profile_of(&before_admin.cert_pem)
    );
    assert_eq!(
        (after_admin.server, after_admin.user),
        (before_admin.server, before_admin.user)
    );
    let report = b.expiry_report(now).unwrap();
    let api = report.iter().find(|e| e.name == "apiserver").unwrap();
    assert!(api.residual_seconds > 360 * 24 * 3600, "a fresh year");

    assert!(matches!(
        b.renew(&["sa"], now),
        Err(PkiError::NotRenewable { .. })
    ));
    assert!(matches!(
        b.renew(&["nonsense"], now),
        Err(PkiError::NotRenewable { .. })
    ));
    assert_eq!(b.get("pki/sa.key").unwrap(), sa, "sa.key is never renewed");

    let renewed = b.renew_all(now).unwrap();
    assert!(renewed.contains(&"front-proxy-client".to_string()));
    assert_eq!(b.get("pki/sa.key").unwrap(), sa);
    b.verify().unwrap();
}

#[test]
fn renewing_a_ca_keeps_its_leaves_and_updates_every_kubeconfig() {
    let now = SystemTime::now();
    let mut b = Bundle::generate(&spec()).unwrap();
    let old_ca = b.get("pki/ca.crt").unwrap().to_string();
    let old_api = b.get("pki/apiserver.crt").unwrap().to_string();
    b.renew(&["ca"], now + DAY).unwrap();
    let new_ca = b.get("pki/ca.crt").unwrap().to_string();
    assert_ne!(new_ca, old_ca);
    assert_eq!(
        b.get("pki/apiserver.crt").unwrap(),
        old_api,
        "leaves untouched"
    );
    b.verify().unwrap();
    for conf in [
        "admin.conf",
        "super-admin.conf",
        "controller-manager.conf",
        "scheduler.conf",
        "konnectivity-server.conf",
    ] {
        let kc = parse_kubeconfig(conf, b.get(conf).unwrap()).unwrap();
        assert_eq!(
            kc.ca_pem.trim(),
            new_ca.trim(),
            "{conf} carries the renewed CA"
        );
    }
}

#[test]
fn rotation_phases_are_ordered_and_every_consumer_moves() {
    let mut b = Bundle::generate(&spec()).unwrap();
    assert!(matches!(
        b.rotate_finalize(),
        Err(PkiError::Rotation { .. })
    ));
    let old = b.clone();
    b.rotate_prepare(SystemTime::now()).unwrap();
    assert!(b.rotation_in_progress());
    assert!(matches!(
        b.rotate_prepare(SystemTime::now()),
        Err(PkiError::Rotation { .. })
    ));
    // Every leaf and kubeconfig re-issued; sa untouched.
    for (path, content) in old.files() {
        if path == "pki/sa.key" || path == "pki/sa.pub" {
            assert_eq!(b.get(path).unwrap(), content);
        } else {
            assert_ne!(
                b.get(path).unwrap(),
                content,
                "{path} must change in prepare"
            );
        }
    }
    b.rotate_finalize().unwrap();
    assert!(!b.rotation_in_progress());
    assert!(b.get("pki/ca-previous.crt").is_none() && b.get("pki/etcd/ca-cross.crt").is_none());
    // Old leaves no longer verify against the finalized bundle.
    let mut mixed: Vec<(String, String)> = b
        .files()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (k, v) in &mut mixed {
        if k == "pki/apiserver.crt" || k == "pki/apiserver.key" {
            *v = old.get(k).unwrap().to_string();
        }
    }
    let err = Bundle::from_files(mixed).verify().unwrap_err();
    assert!(matches!(err, PkiError::NotSignedBy { .. }), "{err}");
}
