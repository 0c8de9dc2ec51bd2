//! A full tenant bundle (3 CAs, 15 leaves and kubeconfig identities, sa key pair), ours vs the
//! `openssl` command line producing the equivalent certificates, in one run.
//! Target (issue 7): ECDSA-P256 bundle ≤ 5 ms; RSA-2048 reported.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::hint::black_box;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::Criterion;
use kmetal::pki::profile::{self, Signer, Usage};
use kmetal::pki::{Algorithm, Bundle, PkiSpec};

fn spec(algorithm: Algorithm) -> PkiSpec {
    let mut s = PkiSpec::new("bench", "api.bench.example.com:6443");
    s.cert_sans = vec!["10.0.0.7".into()];
    s.algorithm = algorithm;
    s
}

fn openssl(args: &[&str], dir: &Path) {
    let ok = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (Debian package openssl) must be installed")
        .status
        .success();
    assert!(ok, "openssl {args:?}");
}

/// The same certificates with the openssl CLI: CAs self-signed, each leaf a key + CSR +
/// signature with its profile's subject, EKU and SANs.
fn openssl_bundle(dir: &Path, rsa: bool, sans: &[String]) {
    let newkey: &[&str] = if rsa {
        &["-newkey", "rsa:2048"]
    } else {
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    };
    let name = |p: &str| p.replace('/', "_");
    for ca in profile::CAS {
        let n = name(ca.path);
        let mut args = vec!["req", "-x509", "-nodes", "-days", "3650"];
        args.extend_from_slice(newkey);
        let subj = format!("/CN={}", ca.cn);
        let (key, crt) = (format!("{n}.key"), format!("{n}.crt"));
        args.extend_from_slice(&["-subj", &subj, "-keyout", &key, "-out", &crt]);
        openssl(&args, dir);
    }
    for leaf in profile::LEAVES {
        let n = name(leaf.path);
        let cn = if leaf.cn.is_empty() {
            "node-0"
        } else {
            leaf.cn
        };
        let subj = match leaf.org {
            Some(o) => format!("/O={o}/CN={cn}"),
            None => format!("/CN={cn}"),
        };
        let (key, csr, crt, ext) = (
            format!("{n}.key"),
            format!("{n}.csr"),
            format!("{n}.crt"),
            format!("{n}.ext"),
        );
        let mut args = vec!["req", "-new", "-nodes"];
        args.extend_from_slice(newkey);
        args.extend_from_slice(&["-subj", &subj, "-keyout", &key, "-out", &csr]);
        openssl(&args, dir);
        let eku = match leaf.usage {
            Usage::Server => "serverAuth",
            Usage::Client => "clientAuth",
            _ => "serverAuth,clientAuth",
        };
        let mut ext_text =
            format!("extendedKeyUsage={eku}\nkeyUsage=digitalSignature,keyEncipherment\n");
        if leaf.sans != profile::SanRule::None {
            let list: Vec<String> = sans
                .iter()
                .map(|s| {
                    if s.parse::<std::net::IpAddr>().is_ok() {
                        format!("IP:{s}")
                    } else {
                        format!("DNS:{s}")
                    }
                })
                .collect();
            ext_text += &format!("subjectAltName={}\n", list.join(","));
        }
        std::fs::write(dir.join(&ext), ext_text).unwrap();
        let ca = match leaf.signer {
            Signer::FrontProxyCa => "pki_front-proxy-ca",
            Signer::EtcdCa | Signer::DatastoreCa => "pki_etcd_ca",
            _ => "pki_ca",
        };
        let (ca_crt, ca_key) = (format!("{ca}.crt"), format!("{ca}.key"));
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_crt,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "365",
                "-extfile",
                &ext,
                "-out",
                &crt,
            ],
            dir,
        );
    }
    if rsa {
        openssl(
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                "sa.key",
            ],
            dir,
        );
    } else {
        openssl(
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "sa.key",
            ],
            dir,
        );
    }
    openssl(&["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"], dir);
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let mut c = Criterion::default()
        .output_directory(&common::criterion_dir())
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let ecdsa = spec(Algorithm::EcdsaP256);
    let rsa = spec(Algorithm::Rsa2048);
    c.bench_function("pki_bundle_ecdsa_p256", |b| {
        b.iter(|| Bundle::generate(black_box(&ecdsa)).unwrap())
    });
    let mut g = c.benchmark_group("pki_bundle_rsa_2048");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function("ours", |b| {
        b.iter(|| Bundle::generate(black_box(&rsa)).unwrap())
    });
    g.finish();
    c.final_summary();

    let sans = ecdsa.apiserver_sans().unwrap();
    let time = |f: &dyn Fn()| {
        let start = Instant::now();
        f();
        start.elapsed()
    };
    let ours_ec = median(
        (0..21)
            .map(|_| time(&|| drop(Bundle::generate(&ecdsa).unwrap())))
            .collect(),
    );
    let ours_rsa = median(
        (0..5)
            .map(|_| time(&|| drop(Bundle::generate(&rsa).unwrap())))
            .collect(),
    );
    let peer = |rsa: bool| {
        median(
            (0..3)
                .map(|_| {
                    let dir = tempfile::tempdir().unwrap();
                    time(&|| openssl_bundle(dir.path(), rsa, &sans))
                })
                .collect(),
        )
    };
    let (peer_ec, peer_rsa) = (peer(false), peer(true));
    println!(
        "\nfull tenant bundle (median)       ours         openssl CLI   openssl/ours   target"
    );
    println!(
        "ECDSA-P256                    {:>10.3?}  {:>12.3?}  {:>12.0}x   ≤ 5 ms ({:.2} of target)",
        ours_ec,
        peer_ec,
        peer_ec.as_secs_f64() / ours_ec.as_secs_f64(),
        ours_ec.as_secs_f64() / 0.005
    );
    println!(
        "RSA-2048                      {:>10.3?}  {:>12.3?}  {:>12.1}x   (reported)",
        ours_rsa,
        peer_rsa,
        peer_rsa.as_secs_f64() / ours_rsa.as_secs_f64()
    );
}
