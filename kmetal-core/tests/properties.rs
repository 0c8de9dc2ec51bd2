//! Property tests: valid objects round-trip through YAML and JSON; arbitrary YAML never panics.

use std::collections::BTreeMap;

use kmetal_core::datastore::{
    BasicAuth, CertKeyPair, ContentRef, Driver, SecretReference, TlsConfig,
};
use kmetal_core::manifest::{Content, parse_str};
use kmetal_core::tenant::{AgentMode, KonnectivitySpec, ServiceType};
use kmetal_core::validate::{validate_datastore, validate_tenant};
use kmetal_core::{DataStore, Object, TenantControlPlane};
use proptest::prelude::*;
use serde_json::{Value, json};

fn label() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,20}[a-z0-9]"
}

fn opaque() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        "[a-zA-Z0-9 ._:/-]{0,12}".prop_map(Value::from),
        any::<i32>().prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
            prop::collection::btree_map("[a-z][a-zA-Z]{0,6}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

prop_compose! {
    fn tenant()(
        name in label(),
        ns in label(),
        version in (20u64..40, 0u64..20).prop_map(|(m, p)| format!("v1.{m}.{p}")),
        service in prop_oneof![Just(ServiceType::ClusterIp), Just(ServiceType::NodePort), Just(ServiceType::LoadBalancer)],
        replicas in prop::option::of(1i64..9),
        port in prop::option::of(1i64..=65535),
        sans in prop::collection::vec(prop_oneof![label().prop_map(|l| format!("{l}.example.com")), (1u8..250).prop_map(|o| format!("192.0.2.{o}"))], 0..4),
        svc_net in 0u8..50,
        konn in prop::option::of((prop::option::of(1i64..=5000), any::<bool>())),
        labels in prop::collection::btree_map("[a-z]{1,8}", "[a-z0-9]{0,8}", 0..3),
        tolerations in prop::collection::vec(opaque(), 0..2),
        affinity in prop::option::of(opaque()),
        schema in prop::option::of("[a-z_][a-z0-9_]{0,20}"),
    ) -> TenantControlPlane {
        let mut t = TenantControlPlane::named(&name, Some(&ns));
        t.metadata.labels = labels;
        t.spec.kubernetes.version = Some(version);
        t.spec.control_plane.service.service_type = Some(service);
        t.spec.control_plane.deployment.replicas = replicas;
        t.spec.control_plane.deployment.tolerations = tolerations;
        t.spec.control_plane.deployment.affinity = affinity;
        t.spec.data_store_schema = schema;
        let np = &mut t.spec.network_profile;
        np.port = port;
        let mut sans = sans;
        sans.sort();
        sans.dedup();
        np.cert_sans = sans;
        np.service_cidr = Some(format!("10.{svc_net}.0.0/16"));
        np.pod_cidr = Some("10.244.0.0/16".into());
        if let Some((kport, deployment)) = konn {
            let mut k = KonnectivitySpec::default();
            k.server.port = kport;
            if deployment {
                k.agent.mode = Some(AgentMode::Deployment);
                k.agent.replicas = Some(2);
            }
            t.spec.addons.konnectivity = Some(k);
        }
        t
    }
}

fn content(s: &str) -> ContentRef {
    use base64::Engine as _;
    ContentRef {
        content: Some(base64::engine::general_purpose::STANDARD.encode(s)),
        secret_reference: None,
    }
}

prop_compose! {
    fn datastore()(
        name in label(),
        driver in 0usize..3,
        hosts in prop::collection::btree_set(label(), 1..4),
        by_ref in any::<bool>(),
    ) -> DataStore {
        let mut d = DataStore::named(&name, None);
        let hosts: Vec<String> = hosts.into_iter().collect();
        match driver {
            0 => {
                d.spec.driver = Some(Driver::Etcd);
                d.spec.endpoints = hosts.iter().map(|h| format!("{h}:2379")).collect();
                d.spec.tls_config = Some(TlsConfig {
                    certificate_authority: Some(CertKeyPair { certificate: Some(content("ca")), private_key: Some(content("key")) }),
                    client_certificate: Some(CertKeyPair { certificate: Some(content("c")), private_key: Some(content("k")) }),
                });
            }
            1 => {
                d.spec.driver = Some(Driver::PostgreSql);
                d.spec.endpoints = hosts.iter().map(|h| format!("{h}:5432")).collect();
                let password = if by_ref {
                    ContentRef { content: None, secret_reference: Some(SecretReference {
                        name: Some("pg".into()), namespace: Some("kamaji-system".into()), key_path: Some("password".into()) }) }
                } else { content("secret") };
                d.spec.basic_auth = Some(BasicAuth { username: Some(content("postgres")), password: Some(password) });
            }
            _ => {
                d.spec.driver = Some(Driver::Sqlite);
                d.spec.endpoints = vec![format!("/var/lib/kmetal/{}.db", hosts[0])];
            }
        }
        d
    }
}

fn reparse(yaml: &str) -> Object {
    let docs = parse_str(yaml).expect("reparse");
    assert_eq!(docs.len(), 1);
    match docs.into_iter().next().map(|d| d.content) {
        Some(Content::Object { object, problems }) => {
            assert!(problems.is_empty(), "{problems:?}");
            object
        }
        other => panic!("unexpected {other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn valid_tenants_round_trip(t in tenant(), defaults in any::<bool>()) {
        let mut t = t;
        if defaults { t.apply_defaults(); }
        prop_assert!(validate_tenant(&t).is_ok(), "{:?}", validate_tenant(&t));
        let yaml = t.to_yaml().expect("yaml");
        prop_assert_eq!(reparse(&yaml), Object::TenantControlPlane(Box::new(t.clone())), "{}", yaml);
        let json = serde_json::to_string(&t).expect("json");
        let back: TenantControlPlane = serde_json::from_str(&json).expect("json back");
        prop_assert_eq!(back, t);
    }

    #[test]
    fn valid_datastores_round_trip(d in datastore()) {
        prop_assert!(validate_datastore(&d).is_ok(), "{:?}", validate_datastore(&d));
        let yaml = d.to_yaml().expect("yaml");
        prop_assert_eq!(reparse(&yaml), Object::DataStore(Box::new(d.clone())), "{}", yaml);
    }

    #[test]
    fn unknown_fields_round_trip(extra in opaque(), key in "[a-z]{3,8}Future") {
        let raw = json!({
            "apiVersion": "kamaji.clastix.io/v1alpha1", "kind": "TenantControlPlane",
            "metadata": {"name": "t"},
            "spec": {"kubernetes": {"version": "v1.30.0", key.clone(): extra.clone()}, key: extra},
        });
        let t = TenantControlPlane::from_value(raw.clone()).expect("decode");
        prop_assert_eq!(t.to_value(), raw);
    }

    #[test]
    fn validator_never_panics_on_structured_yaml(v in shaped_value()) {
        let yaml = serde_saphyr::to_string(&v).expect("yaml");
        if let Ok(docs) = parse_str(&yaml) {
            for d in docs { let _ = d.problems(); }
        }
    }

    #[test]
    fn validator_never_panics_on_arbitrary_text(text in "(apiVersion: kamaji.clastix.io/v1alpha1\nkind: (TenantControlPlane|DataStore)\n)?[ -~\n]{0,200}") {
        if let Ok(docs) = parse_str(&text) {
            for d in docs { let _ = d.problems(); }
        }
    }
}

/// Values shaped like our manifests (real field names, wrong or random contents), so that the
/// generator reaches deep into decoding and validation.
fn shaped_value() -> impl Strategy<Value = Value> {
    const KEYS: &[&str] = &[
        "spec",
        "metadata",
        "name",
        "controlPlane",
        "deployment",
        "replicas",
        "service",
        "serviceType",
        "kubernetes",
        "version",
        "networkProfile",
        "port",
        "certSANs",
        "serviceCidr",
        "podCidr",
        "dnsServiceIPs",
        "addons",
        "konnectivity",
        "server",
        "agent",
        "mode",
        "driver",
        "endpoints",
        "basicAuth",
        "tlsConfig",
        "content",
        "secretReference",
        "certificateAuthority",
        "privateKey",
        "status",
        "conditions",
        "advertiseAddress",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        "[ -~]{0,16}".prop_map(Value::from),
        Just(Value::from("10.96.0.0/16")),
        Just(Value::from("v1.30.0")),
        // Edge cases that once panicked or sit on boundaries.
        Just(Value::from("fd00::1/128")),
        Just(Value::from("::/0")),
        Just(Value::from("192.0.2.7/32")),
        Just(Value::from(format!("v1.{}.0", u64::MAX))),
        Just(Value::from(65536)),
    ];
    let tree = leaf.prop_recursive(5, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(prop::sample::select(KEYS), inner, 0..6).prop_map(|m| {
                Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    });
    (
        prop_oneof![Just("TenantControlPlane"), Just("DataStore"), Just("Other")],
        tree,
    )
        .prop_map(|(kind, v)| {
            let mut top = BTreeMap::new();
            top.insert(
                "apiVersion".to_string(),
                Value::from("kamaji.clastix.io/v1alpha1"),
            );
            top.insert("kind".to_string(), Value::from(kind));
            if let Value::Object(m) = v {
                for (k, v) in m {
                    top.insert(k, v);
                }
            }
            Value::Object(top.into_iter().collect())
        })
}
