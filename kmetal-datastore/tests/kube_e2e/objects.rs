//! Objects through kubectl: many of them listed in chunks, selectors, a stale update, watches
//! from a resourceVersion, and a watch across a restart of the gateway.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use kmetal_datastore::Datastore;
use kmetal_testkit::KubeApiserver;

use crate::served::Served;
use crate::{Ctx, eventually, names};

/// ConfigMaps created in `e2e` by [`many_listed`], half of them `tier=a`.
pub const CONFIGMAPS: usize = 2000;
const WIDGETS: usize = 1000;

/// 2,000 ConfigMaps and a CRD with 1,000 custom resources, listed in chunks of 500, and
/// label and field selectors over them.
pub async fn many_listed(ctx: &Ctx) {
    let backend = ctx.backend;
    let mut cms = String::new();
    for i in 0..CONFIGMAPS {
        let tier = if i % 2 == 0 { "a" } else { "b" };
        write!(
            cms,
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm-{i:05}, namespace: e2e, labels: {{tier: {tier}}}}}\ndata: {{i: \"{i}\"}}\n"
        )
        .unwrap();
    }
    let file = ctx.file("cms.yaml", &cms);
    ctx.k(&["create", "-f", &file, "-o", "name"]).unwrap();
    let chunked = ["get", "cm", "-n", "e2e", "--chunk-size=500"];
    assert_eq!(
        ctx.count(&chunked, "configmap/cm-"),
        CONFIGMAPS,
        "{backend}: chunked list"
    );
    let tier_a = ["get", "cm", "-n", "e2e", "-l", "tier=a", "--chunk-size=500"];
    assert_eq!(
        ctx.count(&tier_a, "configmap/cm-"),
        CONFIGMAPS / 2,
        "{backend}: label selector"
    );
    let one = [
        "get",
        "cm",
        "-n",
        "e2e",
        "--field-selector",
        "metadata.name=cm-00042",
    ];
    assert_eq!(
        ctx.count(&one, "configmap/cm-00042"),
        1,
        "{backend}: field selector"
    );
    assert_eq!(
        ctx.count(&one, "configmap/"),
        1,
        "{backend}: field selector"
    );

    let crd = "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.e2e.kmetal.dev}
spec:
  group: e2e.kmetal.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec: {type: object, properties: {size: {type: integer}}}
";
    let file = ctx.file("crd.yaml", crd);
    ctx.k(&["create", "-f", &file]).unwrap();
    ctx.k(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/widgets.e2e.kmetal.dev",
    ])
    .unwrap();
    let mut widgets = String::new();
    for i in 0..WIDGETS {
        write!(
            widgets,
            "---\napiVersion: e2e.kmetal.dev/v1\nkind: Widget\nmetadata: {{name: w-{i:05}, namespace: e2e}}\nspec: {{size: {i}}}\n"
        )
        .unwrap();
    }
    let file = ctx.file("widgets.yaml", &widgets);
    // The CRD's REST endpoint appears a moment after Established on some servers: retry a
    // create that made nothing.
    eventually(
        "the widgets' endpoint",
        Duration::from_secs(30),
        || match ctx.k(&["create", "-f", &file, "-o", "name"]) {
            Ok(_) => Some(()),
            Err(e) => {
                let made = ctx.count(&["get", "widgets", "-n", "e2e"], "widget");
                assert_eq!(made, 0, "{backend}: partial create: {e}");
                None
            }
        },
    )
    .await;
    let chunked = ["get", "widgets", "-n", "e2e", "--chunk-size=500"];
    assert_eq!(
        ctx.count(&chunked, "widget.e2e.kmetal.dev/w-"),
        WIDGETS,
        "{backend}: CRs listed"
    );
}

/// An update carrying a stale resourceVersion is refused with 409.
pub fn stale_update_refused(ctx: &Ctx) {
    let stale = ctx
        .k(&["get", "cm", "cm-00001", "-n", "e2e", "-o", "json"])
        .unwrap();
    let file = ctx.file(
        "stale.json",
        &stale.replace("\"i\": \"1\"", "\"i\": \"one\""),
    );
    ctx.k(&["replace", "-f", &file]).unwrap();
    let text = ctx.k(&["replace", "-f", &file]).unwrap_err().to_string();
    assert!(
        text.contains("Conflict") || text.contains("the object has been modified"),
        "{}: a stale update must be refused with 409: {text}",
        ctx.backend
    );
}

/// The event types, in order, of `name`'s lines in a raw watch's output.
pub fn types_of(events: &str, name: &str) -> Vec<String> {
    let needle = format!("\"name\":\"{name}\"");
    events
        .lines()
        .filter(|l| l.contains(&needle))
        .map(|l| {
            l.strip_prefix("{\"type\":\"")
                .and_then(|rest| rest.split('"').next())
                .unwrap_or("?")
                .to_string()
        })
        .collect()
}

/// A raw watch from a resourceVersion sees each later change, in order.
pub fn watch_in_order(ctx: &Ctx) {
    let rv = ctx.rv("cm-00002");
    ctx.k(&[
        "create",
        "configmap",
        "watched",
        "-n",
        "e2e",
        "--from-literal=v=1",
    ])
    .unwrap();
    ctx.k(&["label", "configmap", "watched", "-n", "e2e", "step=2"])
        .unwrap();
    ctx.k(&["delete", "configmap", "watched", "-n", "e2e"])
        .unwrap();
    let path =
        format!("/api/v1/namespaces/e2e/configmaps?watch=1&resourceVersion={rv}&timeoutSeconds=3");
    let events = ctx.k(&["get", "--raw", &path]).unwrap();
    assert_eq!(
        types_of(&events, "watched"),
        ["ADDED", "MODIFIED", "DELETED"],
        "{}: the watch from {rv} saw every change in order",
        ctx.backend
    );
}

/// The gateway restarts underneath the apiserver while a client watches through it: the
/// apiserver recovers by itself and the watch sees a change made after the restart.
pub async fn across_restart<F, Fut>(backend: &str, api: &KubeApiserver, served: Served, open: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Arc<dyn Datastore>>,
{
    let rv = api
        .kubectl(&[
            "get",
            "cm",
            "-n",
            "e2e",
            "cm-00003",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ])
        .unwrap();
    let (kubeconfig, watch_path) = (
        api.admin_kubeconfig(),
        format!("/api/v1/namespaces/e2e/configmaps?watch=1&resourceVersion={rv}&timeoutSeconds=20"),
    );
    let watching = tokio::task::spawn_blocking(move || {
        kmetal_testkit::kube::kubectl(&kubeconfig, &["get", "--raw", &watch_path])
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let served = served.restart(open().await).await;
    let create = [
        "create",
        "configmap",
        "after-restart",
        "-n",
        "e2e",
        "--from-literal=v=1",
    ];
    eventually(
        &format!("{backend}: the apiserver recovers after the restart"),
        Duration::from_secs(30),
        || api.kubectl(&create).ok(),
    )
    .await;
    let events = watching.await.unwrap().unwrap();
    assert_eq!(
        types_of(&events, "after-restart"),
        ["ADDED"],
        "{backend}: the watch opened before the restart saw the ConfigMap created after it"
    );
    let all = api
        .kubectl(&["get", "cm", "-n", "e2e", "--chunk-size=500", "-o", "name"])
        .unwrap();
    assert_eq!(
        names(&all, "configmap/cm-"),
        CONFIGMAPS,
        "{backend}: nothing lost"
    );
    drop(served);
}
