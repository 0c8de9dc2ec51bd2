//! Kamaji manifests for the servers the testkit starts: a DataStore (and the Secret holding
//! its credentials) per real backend, as a user would write them for Kamaji.

use base64::Engine;

use crate::{EtcdCluster, PostgresServer};

/// Standard base64, as Secret data holds it.
pub fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A shared etcd DataStore the way Kamaji declares one: TLS with the CA (and its key, to sign
/// tenant client certificates), the operator's client certificate, and root's password.
/// `None` for a cluster without TLS (Kamaji's etcd driver needs it).
pub fn etcd_datastore(etcd: &EtcdCluster) -> Option<String> {
    let host = etcd.endpoint(0)?.trim_start_matches("https://").to_string();
    let root = etcd.client_cert("root").ok()??;
    Some(format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: etcd-certs, namespace: kamaji-system}}
data: {{ca.crt: {}, ca.key: {}, tls.crt: {}, tls.key: {}, password: {}}}
---
apiVersion: kamaji.clastix.io/v1alpha1
kind: DataStore
metadata: {{name: etcd-shared}}
spec:
  driver: etcd
  endpoints: [{host}]
  basicAuth:
    username: {{content: {}}}
    password:
      secretReference: {{name: etcd-certs, namespace: kamaji-system, keyPath: password}}
  tlsConfig:
    certificateAuthority:
      certificate: {{secretReference: {{name: etcd-certs, namespace: kamaji-system, keyPath: ca.crt}}}}
      privateKey: {{secretReference: {{name: etcd-certs, namespace: kamaji-system, keyPath: ca.key}}}}
    clientCertificate:
      certificate: {{secretReference: {{name: etcd-certs, namespace: kamaji-system, keyPath: tls.crt}}}}
      privateKey: {{secretReference: {{name: etcd-certs, namespace: kamaji-system, keyPath: tls.key}}}}
"#,
        b64(etcd.ca_pem()?),
        b64(etcd.ca_key_pem()?),
        b64(&root.cert),
        b64(&root.key),
        b64("root-secret"),
        b64("root")
    ))
}

/// A PostgreSQL DataStore on `pg`, its superuser's password in a Secret.
pub fn pg_datastore(pg: &PostgresServer) -> String {
    format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: pg-admin, namespace: kamaji-system}}
data: {{password: {}}}
---
apiVersion: kamaji.clastix.io/v1alpha1
kind: DataStore
metadata: {{name: postgres-main}}
spec:
  driver: PostgreSQL
  endpoints: ["{}:{}"]
  basicAuth:
    username: {{content: {}}}
    password:
      secretReference: {{name: pg-admin, namespace: kamaji-system, keyPath: password}}
"#,
        b64(pg.password()),
        pg.host(),
        pg.port(),
        b64(pg.superuser())
    )
}
