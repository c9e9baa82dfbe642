//! The process-backed ReplicaSet, with stand-in processes (`sh`, `python3`)
//! so these tests do not depend on warren-worker being built.

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use warren_fakekube::replicaset::POD_DELETION_COST;
use warren_fakekube::resources::{DEPLOYMENTS, PODS};
use warren_fakekube::{
    ChildOutput, FakeApiServer, ProcessReplicaSet, ProcessTemplate, Readiness, Signal,
};

const WAIT: Duration = Duration::from_secs(20);

/// Exits 0 on SIGTERM; once its trap is installed, records its POD_NAME and
/// WARREN_LISTEN_ADDR in $OUT (so a test can wait until SIGTERM is handled).
const GRACEFUL: &str = r#"trap 'exit 0' TERM
echo "$POD_NAME $POD_NAMESPACE $WARREN_LISTEN_ADDR" > "$OUT/$POD_NAME"
while true; do sleep 0.05; done"#;

/// Waits until the GRACEFUL stand-in for `pod` has written its line.
async fn started_line(out: &std::path::Path, pod: &str) -> String {
    let path = out.join(pod);
    tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(text) = std::fs::read_to_string(&path)
                && text.ends_with('\n')
            {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("stand-in process started")
}

/// Ignores SIGTERM: only SIGKILL ends it.
const STUBBORN: &str = r#"trap '' TERM
while true; do sleep 0.05; done"#;

fn init() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,warren_fakekube=debug".into()),
        )
        .with_test_writer()
        .try_init();
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn deployment(name: &str, replicas: i32, grace_seconds: i64) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": grace_seconds,
                    "containers": [{"name": "worker", "image": "warren-worker:dev"}]
                }
            }
        }
    }))
    .unwrap()
}

fn sh(script: &str) -> ProcessTemplate {
    ProcessTemplate::new("sh").arg("-c").arg(script)
}

async fn scale(api: &Api<Deployment>, name: &str, replicas: i32) {
    api.patch_scale(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": replicas}})),
    )
    .await
    .unwrap();
}

fn names(rs: &ProcessReplicaSet) -> BTreeSet<String> {
    rs.pods().into_iter().map(|p| p.name).collect()
}

#[tokio::test]
async fn scales_up_with_pods_and_status_then_in_by_deletion_cost() {
    init();
    let out = tempfile::tempdir().unwrap();
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client().await.unwrap();
    let deployments: Api<Deployment> = Api::default_namespaced(client.clone());
    let pods: Api<Pod> = Api::default_namespaced(client);
    deployments
        .create(&PostParams::default(), &deployment("worker", 3, 10))
        .await
        .unwrap();
    let rs = ProcessReplicaSet::start(
        &server,
        "default",
        "worker",
        sh(GRACEFUL).env("OUT", out.path()),
    );
    assert!(rs.wait_for_ready(3, WAIT).await, "{:?}", rs.pods());

    // Pod objects: labels from the template, Running and Ready.
    let listed = pods
        .list(&ListParams::default().labels("app=worker"))
        .await
        .unwrap();
    let listed_names: BTreeSet<String> = listed
        .items
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(listed_names, names(&rs));
    for pod in &listed.items {
        let status = pod.status.as_ref().unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        let ready = status
            .conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "True");
    }
    // Each process got its own POD_NAME, namespace and listen address.
    let mut addrs = BTreeSet::new();
    for p in rs.pods() {
        let seen = started_line(out.path(), &p.name).await;
        assert_eq!(seen.trim(), format!("{} default {}", p.name, p.listen_addr));
        addrs.insert(p.listen_addr);
    }
    assert_eq!(addrs.len(), 3);

    // Deployment status reflects the processes.
    let status = server
        .wait_for_object(&DEPLOYMENTS, "default", "worker", WAIT, |d| {
            d["status"]["readyReplicas"] == 3
        })
        .await
        .unwrap()["status"]
        .clone();
    assert_eq!(status["replicas"], 3);
    assert_eq!(status["availableReplicas"], 3);
    assert_eq!(status["observedGeneration"], 1);

    // The controller marks busy pods expensive, idle ones cheap.
    let [a, b, c] = <[String; 3]>::try_from(names(&rs).into_iter().collect::<Vec<_>>()).unwrap();
    for (pod, cost) in [(&a, "100"), (&b, "-5"), (&c, "50")] {
        pods.patch(
            pod,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {POD_DELETION_COST: cost}}})),
        )
        .await
        .unwrap();
    }
    scale(&deployments, "worker", 1).await;

    let b_exit = rs.wait_for_exit(&b, WAIT).await.expect("b exits");
    let c_exit = rs.wait_for_exit(&c, WAIT).await.expect("c exits");
    for exit in [&b_exit, &c_exit] {
        assert!(exit.sigterm_sent && !exit.sigkill_sent, "{exit:?}");
        assert!(exit.success(), "worker exited 0 after SIGTERM: {exit:?}");
        assert_eq!(exit.signal, None);
    }
    assert!(rs.wait_for_ready(1, WAIT).await);
    assert_eq!(names(&rs), BTreeSet::from([a.clone()]));
    assert_eq!(rs.exits().len(), 2);
    let remaining = server.list_objects(&PODS, Some("default"));
    assert_eq!(remaining.len(), 1);
    assert_eq!(remaining[0]["metadata"]["name"], a.as_str());
    let status = server
        .wait_for_object(&DEPLOYMENTS, "default", "worker", WAIT, |d| {
            d["status"]["replicas"] == 1
        })
        .await
        .unwrap()["status"]
        .clone();
    assert_eq!(status["readyReplicas"], 1);
    assert_eq!(status["observedGeneration"], 2);

    // Without costs, the newest pod goes first.
    scale(&deployments, "worker", 3).await;
    assert!(rs.wait_for_ready(3, WAIT).await);
    for p in rs.pods() {
        started_line(out.path(), &p.name).await;
    }
    let newest = rs.pods().into_iter().max_by_key(|p| p.ordinal).unwrap();
    assert!(newest.name != a);
    pods.patch(
        &a,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {POD_DELETION_COST: null}}})),
    )
    .await
    .unwrap();
    scale(&deployments, "worker", 2).await;
    let exit = rs.wait_for_exit(&newest.name, WAIT).await.unwrap();
    assert!(exit.success());

    rs.shutdown().await.unwrap();
    assert!(server.list_objects(&PODS, Some("default")).is_empty());
}

#[tokio::test]
async fn terminating_pod_is_marked_then_sigkilled_after_grace() {
    init();
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client().await.unwrap();
    let deployments: Api<Deployment> = Api::default_namespaced(client);
    deployments
        .create(&PostParams::default(), &deployment("stubborn", 1, 1))
        .await
        .unwrap();
    let rs = ProcessReplicaSet::start(&server, "default", "stubborn", sh(STUBBORN));
    assert!(rs.wait_for_ready(1, WAIT).await);
    let pod = rs.pods().remove(0).name;
    // Give sh time to install its trap before the SIGTERM comes.
    tokio::time::sleep(Duration::from_millis(300)).await;

    scale(&deployments, "stubborn", 0).await;
    // While it ignores SIGTERM, the Pod object stays with a deletionTimestamp.
    let marked = server
        .wait_for_object(&PODS, "default", &pod, WAIT, |p| {
            p["metadata"]["deletionTimestamp"].is_string()
        })
        .await
        .expect("pod marked for deletion");
    assert_eq!(marked["metadata"]["deletionGracePeriodSeconds"], 1);
    let exit = rs.wait_for_exit(&pod, WAIT).await.unwrap();
    assert!(exit.sigterm_sent && exit.sigkill_sent, "{exit:?}");
    assert_eq!(exit.signal, Some(Signal::SIGKILL as i32));
    assert!(exit.ran_for >= Duration::from_secs(1));
    assert!(server.get_object(&PODS, "default", &pod).is_none());
    assert!(rs.pods().is_empty());
}

#[tokio::test]
async fn dead_or_deleted_pods_are_replaced_with_new_names() {
    init();
    let out = tempfile::tempdir().unwrap();
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client().await.unwrap();
    let deployments: Api<Deployment> = Api::default_namespaced(client.clone());
    let pods: Api<Pod> = Api::default_namespaced(client);
    deployments
        .create(&PostParams::default(), &deployment("worker", 2, 10))
        .await
        .unwrap();
    let rs = ProcessReplicaSet::start(
        &server,
        "default",
        "worker",
        sh(GRACEFUL)
            .env("OUT", out.path())
            .output(ChildOutput::Null),
    );
    assert!(rs.wait_for_ready(2, WAIT).await);
    let before = names(&rs);

    // A test kills one: the ReplicaSet did not ask for it, so it replaces it.
    let victim = before.iter().next().unwrap().clone();
    rs.kill_pod(&victim, Signal::SIGKILL).unwrap();
    let exit = rs.wait_for_exit(&victim, WAIT).await.unwrap();
    assert_eq!(exit.signal, Some(Signal::SIGKILL as i32));
    assert!(!exit.sigterm_sent);
    assert!(rs.wait_for_ready(2, WAIT).await);
    let after = names(&rs);
    assert!(!after.contains(&victim));
    assert_eq!(after.intersection(&before).count(), 1);
    assert!(server.get_object(&PODS, "default", &victim).is_none());

    // Deleting the Pod object through the API terminates the process
    // gracefully and a replacement appears.
    let deleted = after.iter().next().unwrap().clone();
    started_line(out.path(), &deleted).await;
    pods.delete(&deleted, &DeleteParams::default())
        .await
        .unwrap();
    let exit = rs.wait_for_exit(&deleted, WAIT).await.unwrap();
    assert!(exit.sigterm_sent && exit.success(), "{exit:?}");
    assert!(rs.wait_for_ready(2, WAIT).await);
    assert!(!names(&rs).contains(&deleted));
    assert_eq!(server.list_objects(&PODS, Some("default")).len(), 2);

    assert!(matches!(
        rs.kill_pod("nope", Signal::SIGTERM),
        Err(warren_fakekube::FakeKubeError::NoSuchPod(_))
    ));
}

#[tokio::test]
async fn http_readiness_probe_gates_ready_condition() {
    init();
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client().await.unwrap();
    let deployments: Api<Deployment> = Api::default_namespaced(client);
    deployments
        .create(&PostParams::default(), &deployment("web", 1, 5))
        .await
        .unwrap();
    // Starts serving HTTP only after a delay: not ready until then.
    let script =
        r#"sleep 1; exec python3 -m http.server --bind 127.0.0.1 "${WARREN_LISTEN_ADDR##*:}""#;
    let rs = ProcessReplicaSet::start(
        &server,
        "default",
        "web",
        sh(script)
            .readiness(Readiness::HttpGet { path: "/".into() })
            .output(ChildOutput::Null),
    );
    assert!(
        rs.wait_until(WAIT, |pods| pods.len() == 1).await,
        "pod started"
    );
    let pod = rs.pods().remove(0);
    assert!(!pod.ready);
    let object = server.get_object(&PODS, "default", &pod.name).unwrap();
    assert_eq!(ready_condition(&object), "False");
    let status = server.get_object(&DEPLOYMENTS, "default", "web").unwrap()["status"].clone();
    assert!(status.get("readyReplicas").is_none(), "{status}");
    assert_eq!(status["unavailableReplicas"], 1);

    assert!(
        rs.wait_for_ready(1, WAIT).await,
        "probe succeeds once python serves"
    );
    let object = server
        .wait_for_object(&PODS, "default", &pod.name, WAIT, |p| {
            ready_condition(p) == "True"
        })
        .await;
    assert!(object.is_some());
    let status = server
        .wait_for_object(&DEPLOYMENTS, "default", "web", WAIT, |d| {
            d["status"]["readyReplicas"] == 1
        })
        .await
        .unwrap()["status"]
        .clone();
    assert!(status.get("unavailableReplicas").is_none(), "{status}");
    rs.shutdown().await.unwrap();
}

fn ready_condition(pod: &Value) -> String {
    pod["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap()["status"]
        .as_str()
        .unwrap()
        .to_string()
}
