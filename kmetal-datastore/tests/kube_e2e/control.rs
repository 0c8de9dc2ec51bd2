//! What takes the controller-manager or the apiserver's own machinery: finalizers, garbage
//! collection, events on a second datastore, compaction, watch-list and consistent reads
//! from the watch cache.

use std::time::Duration;

use kmetal_datastore::model::RangeRequest;

use crate::objects::{CONFIGMAPS, types_of};
use crate::{COMPACTION, Ctx, eventually};

/// The watch-list path (`sendInitialEvents=true`, on by default in 1.34): the initial state
/// streams as ADDED events, closed by a bookmark marked `k8s.io/initial-events-end`. Without
/// a resourceVersion it is a consistent read, which the watch cache answers only after a
/// progress notification (or an event) shows it is current.
pub fn watch_list(ctx: &Ctx) {
    let path = "/api/v1/namespaces/e2e/configmaps?watch=1&sendInitialEvents=true\
                &allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan&timeoutSeconds=5";
    let out = ctx.k(&["get", "--raw", path]).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    let end = lines
        .iter()
        .position(|l| {
            l.starts_with("{\"type\":\"BOOKMARK\"")
                && l.contains("\"k8s.io/initial-events-end\":\"true\"")
        })
        .unwrap_or_else(|| panic!("{}: no initial-events-end bookmark", ctx.backend));
    let initial = lines[..end]
        .iter()
        .filter(|l| l.starts_with("{\"type\":\"ADDED\"") && l.contains("\"name\":\"cm-"))
        .count();
    assert_eq!(
        initial, CONFIGMAPS,
        "{}: watch-list streamed the state",
        ctx.backend
    );
}

/// A finalizer holds a deleted object (deletionTimestamp set, still readable) until it is
/// removed; then the object is gone.
pub async fn finalizer_holds_deletion(ctx: &Ctx) {
    let held = "apiVersion: v1\nkind: ConfigMap\n\
                metadata: {name: held, namespace: e2e, finalizers: [kmetal.dev/hold]}\n";
    let file = ctx.file("held.yaml", held);
    ctx.k(&["create", "-f", &file]).unwrap();
    ctx.k(&["delete", "cm", "held", "-n", "e2e", "--wait=false"])
        .unwrap();
    let at = ctx
        .k(&[
            "get",
            "cm",
            "held",
            "-n",
            "e2e",
            "-o",
            "jsonpath={.metadata.deletionTimestamp}",
        ])
        .unwrap();
    assert!(
        !at.is_empty(),
        "{}: held object marked deleted",
        ctx.backend
    );
    let release = r#"{"metadata":{"finalizers":null}}"#;
    ctx.k(&[
        "patch",
        "cm",
        "held",
        "-n",
        "e2e",
        "--type=merge",
        "-p",
        release,
    ])
    .unwrap();
    eventually("the released object goes", Duration::from_secs(10), || {
        let e = ctx.k(&["get", "cm", "held", "-n", "e2e"]).err()?;
        assert!(e.to_string().contains("NotFound"), "{}: {e}", ctx.backend);
        Some(())
    })
    .await;
}

/// Dependents of `owner` (uid `uid`), blocking its foreground deletion.
fn dependents(owner: &str, uid: &str, n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {owner}-dep-{i}\n  \
                 namespace: e2e\n  labels: {{owner: {owner}}}\n  ownerReferences:\n  \
                 - {{apiVersion: v1, kind: ConfigMap, name: {owner}, uid: {uid}, \
                 blockOwnerDeletion: true}}\n"
            )
        })
        .collect()
}

/// The real kube-controller-manager collects garbage: a Deployment's ReplicaSet and pods go
/// with it (background), owned ConfigMaps go before their owner (foreground), and orphaned
/// ones stay with their owner reference dropped.
pub async fn garbage_collection(ctx: &Ctx) {
    let b = ctx.backend;
    ctx.k(&[
        "create",
        "deployment",
        "web",
        "-n",
        "e2e",
        "--image=registry.invalid/web:1",
        "--replicas=3",
    ])
    .unwrap();
    let pods = ["get", "pods", "-n", "e2e", "-l", "app=web"];
    eventually(
        &format!("{b}: the Deployment's 3 pods"),
        Duration::from_secs(90),
        || (ctx.count(&pods, "pod/web-") == 3).then_some(()),
    )
    .await;
    ctx.k(&["delete", "deployment", "web", "-n", "e2e"])
        .unwrap();
    let sets = ["get", "rs", "-n", "e2e", "-l", "app=web"];
    eventually(
        &format!("{b}: the ReplicaSet and pods collected"),
        Duration::from_secs(90),
        || (ctx.count(&pods, "pod/") + ctx.count(&sets, "replicaset") == 0).then_some(()),
    )
    .await;

    for (owner, cascade) in [("fg", "foreground"), ("orphaner", "orphan")] {
        ctx.k(&["create", "cm", owner, "-n", "e2e"]).unwrap();
        let uid = ctx
            .k(&[
                "get",
                "cm",
                owner,
                "-n",
                "e2e",
                "-o",
                "jsonpath={.metadata.uid}",
            ])
            .unwrap();
        let file = ctx.file(&format!("{owner}.yaml"), &dependents(owner, &uid, 3));
        ctx.k(&["create", "-f", &file]).unwrap();
        ctx.k(&[
            "delete",
            "cm",
            owner,
            "-n",
            "e2e",
            &format!("--cascade={cascade}"),
            "--timeout=90s",
        ])
        .unwrap();
    }
    // Foreground: the owner is gone only after the dependents that block it.
    let fg = ["get", "cm", "-n", "e2e", "-l", "owner=fg"];
    assert_eq!(ctx.count(&fg, "configmap/"), 0, "{b}: foreground deletion");
    let orphans = ["get", "cm", "-n", "e2e", "-l", "owner=orphaner"];
    assert_eq!(ctx.count(&orphans, "configmap/"), 3, "{b}: orphans stay");
    let refs = [
        "get",
        "cm",
        "-n",
        "e2e",
        "-l",
        "owner=orphaner",
        "-o",
        "jsonpath={.items[*].metadata.ownerReferences}",
    ];
    eventually(
        &format!("{b}: orphans lose their owner reference"),
        Duration::from_secs(30),
        || ctx.k(&refs).unwrap().trim().is_empty().then_some(()),
    )
    .await;
}

/// Events go to the store behind `--etcd-servers-overrides=/events#…` and never to the main
/// one: an Event written through kubectl and the controller-manager's own.
pub async fn events_on_second_store(ctx: &Ctx) {
    let b = ctx.backend;
    let event = "apiVersion: v1\nkind: Event\nmetadata: {name: e2e-probe, namespace: e2e}\n\
                 involvedObject: {apiVersion: v1, kind: ConfigMap, name: cm-00001, namespace: e2e}\n\
                 reason: Probe\nmessage: kmetal e2e\ntype: Normal\n";
    let file = ctx.file("event.yaml", event);
    ctx.k(&["create", "-f", &file]).unwrap();
    let probe = ctx
        .events
        .range(RangeRequest::get("/registry/events/e2e/e2e-probe"))
        .await
        .unwrap();
    assert_eq!(probe.count, 1, "{b}: the Event is in the events store");
    let scaled = [
        "get",
        "events",
        "-n",
        "e2e",
        "--field-selector=reason=ScalingReplicaSet",
    ];
    assert!(
        ctx.count(&scaled, "event/web") >= 1,
        "{b}: the controller-manager's events read back"
    );
    let elsewhere = ctx
        .events
        .range(RangeRequest::prefix("/registry/events/").keys_only())
        .await
        .unwrap();
    assert!(
        elsewhere.count >= 2,
        "{b}: {} events stored",
        elsewhere.count
    );
    let main = ctx
        .main
        .range(RangeRequest::prefix("/registry/events/").keys_only())
        .await
        .unwrap();
    assert_eq!(main.count, 0, "{b}: no event in the main store");
}

/// A resourceVersion as a number.
fn number(rv: &str) -> i64 {
    rv.trim()
        .parse()
        .unwrap_or_else(|_| panic!("a resourceVersion: {rv:?}"))
}

/// The apiserver compacts every [`COMPACTION`] while a client watches and writes go on: the
/// watch opened before the compaction passes its start sees every change and does not end
/// early, the apiserver's own watches never fall behind the compaction, and an old
/// resourceVersion (an exact list, a continue token) answers 410 Gone.
pub async fn compaction_under_watch(ctx: &Ctx) {
    let b = ctx.backend;
    let old = ctx.rv("cm-00004");
    let first = ctx
        .k(&["get", "--raw", "/api/v1/namespaces/e2e/configmaps?limit=1"])
        .unwrap();
    let token: serde_json::Value = serde_json::from_str(&first).unwrap();
    let token = token["metadata"]["continue"].as_str().unwrap().to_string();

    ctx.k(&["create", "cm", "compaction-start", "-n", "e2e"])
        .unwrap();
    let start = ctx.rv("compaction-start");
    let (kubeconfig, path) = (
        ctx.api.admin_kubeconfig(),
        format!(
            "/api/v1/namespaces/e2e/configmaps?watch=1&resourceVersion={start}&timeoutSeconds=30"
        ),
    );
    let watching = tokio::task::spawn_blocking(move || {
        kmetal_testkit::kube::kubectl(&kubeconfig, &["get", "--raw", &path])
    });
    let opened = std::time::Instant::now();
    let mut made = 0;
    let compacted = loop {
        let name = format!("during-{made:02}");
        ctx.k(&["create", "cm", &name, "-n", "e2e"]).unwrap();
        made += 1;
        let status = ctx.main.status().await.unwrap();
        if status.compact_revision > number(&start) && made >= 10 {
            break status.compact_revision;
        }
        assert!(
            opened.elapsed() < Duration::from_secs(22),
            "{b}: the apiserver compacts past {start} within 4 intervals of {COMPACTION:?} \
             (compacted to {})",
            status.compact_revision
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let events = watching.await.unwrap().unwrap();
    assert!(
        opened.elapsed() >= Duration::from_secs(28),
        "{b}: the watch ended early: {events}"
    );
    for i in 0..made {
        let name = format!("during-{i:02}");
        assert_eq!(types_of(&events, &name), ["ADDED"], "{b}: {name} watched");
    }
    assert!(
        !events.contains("\"type\":\"ERROR\""),
        "{b}: the watch ended in an error"
    );
    let log = ctx.api.log_tail(5000);
    assert!(
        log.lines().all(|l| !l.contains("has been compacted")),
        "{b}: an apiserver watch fell behind the compaction to {compacted}: {log}"
    );

    // The watch cache drops its snapshots up to the compaction within its 15 s poll; then
    // an old resourceVersion goes to the store and is gone.
    let exact = format!(
        "/api/v1/namespaces/e2e/configmaps?limit=1&resourceVersion={old}&resourceVersionMatch=Exact"
    );
    let resume = format!("/api/v1/namespaces/e2e/configmaps?limit=1&continue={token}");
    for path in [exact, resume] {
        eventually(
            &format!("{b}: {path} answers 410 Gone"),
            Duration::from_secs(45),
            || {
                let e = ctx.k(&["get", "--raw", &path]).err()?.to_string();
                assert!(
                    e.contains("Expired") || e.contains("too old"),
                    "{b}: {path}: {e}"
                );
                Some(())
            },
        )
        .await;
    }
}

/// The apiserver's counter of consistent reads served from its watch cache.
fn consistent_reads(metrics: &str, resource: &str, fallback: bool) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_watch_cache_consistent_read_total{"))
        .filter(|l| l.contains(&format!("resource=\"{resource}\"")))
        .filter(|l| l.contains(&format!("fallback=\"{fallback}\"")))
        .filter(|l| l.contains("success=\"true\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Lists without a resourceVersion are consistent reads, which a 1.34 apiserver serves from
/// its watch cache once it knows the cache is current (progress notifications); had the
/// progress requests gone unanswered, it would have fallen back to the store after 3 s.
pub fn consistent_reads_from_cache(ctx: &Ctx) {
    for path in [
        "/api/v1/namespaces/e2e/configmaps",
        "/api/v1/namespaces/e2e/configmaps?labelSelector=tier%3Da",
        "/apis/e2e.kmetal.dev/v1/namespaces/e2e/widgets",
    ] {
        ctx.k(&["get", "--raw", path]).unwrap();
    }
    let metrics = ctx.k(&["get", "--raw", "/metrics"]).unwrap();
    for resource in ["configmaps", "widgets"] {
        assert!(
            consistent_reads(&metrics, resource, false) >= 1.0,
            "{}: {resource} read from the cache",
            ctx.backend
        );
        assert_eq!(
            consistent_reads(&metrics, resource, true),
            0.0,
            "{}: {resource} fell back to the store",
            ctx.backend
        );
    }
}
