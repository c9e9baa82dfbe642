//! The fake API server driven by a real `kube::Client`, built from the
//! kubeconfig the fake writes.

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ObjectReference, Pod, Secret};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Config};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warren_fakekube::resources::{DEPLOYMENTS, EVENTS, QUEUESCALERS, SECRETS};
use warren_fakekube::{FakeApiOptions, FakeApiServer};

const STEP: Duration = Duration::from_secs(10);

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

/// A client built the way a process would: from the kubeconfig file.
async fn client_from_file(server: &FakeApiServer) -> (Client, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path).unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    assert_eq!(config.default_namespace, "default");
    assert_eq!(
        config.cluster_url.to_string(),
        format!("{}/", server.base_url())
    );
    (Client::try_from(config).unwrap(), dir)
}

fn deployment(name: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "main", "image": "busybox"}]}
            }
        }
    }))
    .unwrap()
}

fn pod(name: &str, labels: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]}
    }))
    .unwrap()
}

fn api_error(err: kube::Error) -> (u16, String) {
    match err {
        kube::Error::Api(status) => (status.code, status.reason),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn deployments_create_get_list_delete() {
    init();
    let server = FakeApiServer::start().await.unwrap();
    let (client, _dir) = client_from_file(&server).await;
    let api: Api<Deployment> = Api::default_namespaced(client);

    let created = api
        .create(&PostParams::default(), &deployment("worker", 2))
        .await
        .unwrap();
    let meta = &created.metadata;
    assert_eq!(meta.namespace.as_deref(), Some("default"));
    assert_eq!(meta.generation, Some(1));
    assert!(meta.uid.is_some() && meta.creation_timestamp.is_some());
    let rv1: u64 = meta.resource_version.as_deref().unwrap().parse().unwrap();

    api.create(&PostParams::default(), &deployment("sender", 1))
        .await
        .unwrap();
    let dup = api
        .create(&PostParams::default(), &deployment("worker", 2))
        .await
        .unwrap_err();
    assert_eq!(api_error(dup), (409, "AlreadyExists".into()));

    let got = api.get("worker").await.unwrap();
    assert_eq!(got.spec.unwrap().replicas, Some(2));
    assert_eq!(
        api_error(api.get("nope").await.unwrap_err()),
        (404, "NotFound".into())
    );
    assert!(api.get_opt("nope").await.unwrap().is_none());

    let all = api.list(&ListParams::default()).await.unwrap();
    let names: Vec<_> = all
        .items
        .iter()
        .map(|d| d.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["sender", "worker"]);
    let list_rv: u64 = all.metadata.resource_version.unwrap().parse().unwrap();
    assert!(list_rv > rv1);

    let selected = api
        .list(&ListParams::default().labels("app=worker"))
        .await
        .unwrap();
    assert_eq!(selected.items.len(), 1);
    let by_field = api
        .list(&ListParams::default().fields("metadata.name=sender"))
        .await
        .unwrap();
    assert_eq!(by_field.items[0].metadata.name.as_deref(), Some("sender"));

    // Paging: limit 1 gives a continue token and the rest on the next page.
    let page1 = api.list(&ListParams::default().limit(1)).await.unwrap();
    assert_eq!(page1.items.len(), 1);
    let token = page1.metadata.continue_.clone().unwrap();
    let page2 = api
        .list(&ListParams::default().limit(1).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(page2.items[0].metadata.name.as_deref(), Some("worker"));
    assert!(page2.metadata.continue_.is_none());

    // A Deployment in another namespace is not in this namespace's list but is
    // in the all-namespaces one.
    let other: Api<Deployment> = Api::namespaced(api.clone().into_client(), "other");
    other
        .create(&PostParams::default(), &deployment("worker", 1))
        .await
        .unwrap();
    assert_eq!(
        api.list(&ListParams::default()).await.unwrap().items.len(),
        2
    );
    let everywhere: Api<Deployment> = Api::all(api.clone().into_client());
    assert_eq!(
        everywhere
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        3
    );

    api.delete("sender", &DeleteParams::default())
        .await
        .unwrap();
    assert!(api.get_opt("sender").await.unwrap().is_none());
    assert!(
        server
            .get_object(&DEPLOYMENTS, "default", "sender")
            .is_none()
    );

    // Every request the client made is in the log, with its token accepted.
    let requests = server.requests();
    assert!(requests.iter().all(|r| r.status != 401));
    assert!(requests.iter().any(|r| r.method == "POST"
        && r.path == "/apis/apps/v1/namespaces/default/deployments"
        && r.content_type.as_deref() == Some("application/json")));
}

#[tokio::test]
async fn requests_without_the_token_are_unauthorized() {
    init();
    let server = FakeApiServer::start().await.unwrap();
    let raw = |path: &'static str| {
        let addr = server.addr();
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        }
    };
    let denied = raw("/api/v1/namespaces/default/pods").await;
    assert!(denied.starts_with("HTTP/1.1 401"), "{denied}");
    assert!(denied.contains("\"reason\":\"Unauthorized\""));
    let version = raw("/version").await;
    assert!(version.starts_with("HTTP/1.1 200"), "{version}");
    let unknown = raw("/apis/batch/v1/namespaces/default/jobs").await;
    assert!(unknown.starts_with("HTTP/1.1 404"), "{unknown}");

    let client = server.client().await.unwrap();
    let info = client.apiserver_version().await.unwrap();
    assert_eq!(info.major, "1");
}

async fn next_event(
    stream: &mut (impl futures::Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> + Unpin),
) -> watcher::Event<Pod> {
    tokio::time::timeout(STEP, stream.next())
        .await
        .expect("watch event in time")
        .expect("stream open")
        .expect("no watch error")
}

fn name_of(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap()
}

#[tokio::test]
async fn pod_watcher_sees_added_modified_deleted() {
    init();
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client().await.unwrap();
    let pods: Api<Pod> = Api::default_namespaced(client);
    pods.create(&PostParams::default(), &pod("before", json!({"app": "w"})))
        .await
        .unwrap();

    let mut stream = watcher(pods.clone(), watcher::Config::default().labels("app=w")).boxed();
    assert!(matches!(
        next_event(&mut stream).await,
        watcher::Event::Init
    ));
    match next_event(&mut stream).await {
        watcher::Event::InitApply(p) => assert_eq!(name_of(&p), "before"),
        other => panic!("expected InitApply, got {other:?}"),
    }
    assert!(matches!(
        next_event(&mut stream).await,
        watcher::Event::InitDone
    ));

    pods.create(&PostParams::default(), &pod("p1", json!({"app": "w"})))
        .await
        .unwrap();
    // Not matching the selector: never seen.
    pods.create(&PostParams::default(), &pod("other", json!({"app": "x"})))
        .await
        .unwrap();
    match next_event(&mut stream).await {
        watcher::Event::Apply(p) => assert_eq!(name_of(&p), "p1"),
        other => panic!("expected Apply(p1), got {other:?}"),
    }
    let cost =
        json!({"metadata": {"annotations": {"controller.kubernetes.io/pod-deletion-cost": "-10"}}});
    pods.patch("p1", &PatchParams::default(), &Patch::Merge(&cost))
        .await
        .unwrap();
    match next_event(&mut stream).await {
        watcher::Event::Apply(p) => {
            assert_eq!(name_of(&p), "p1");
            let annotations = p.metadata.annotations.unwrap();
            assert_eq!(
                annotations["controller.kubernetes.io/pod-deletion-cost"],
                "-10"
            );
        }
        other => panic!("expected Apply(p1 patched), got {other:?}"),
    }
    // Relabelled out of the selector: the watch sees a deletion.
    pods.patch(
        "before",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "gone"}}})),
    )
    .await
    .unwrap();
    match next_event(&mut stream).await {
        watcher::Event::Delete(p) => assert_eq!(name_of(&p), "before"),
        other => panic!("expected Delete(before), got {other:?}"),
    }
    pods.delete("p1", &DeleteParams::default()).await.unwrap();
    match next_event(&mut stream).await {
        watcher::Event::Delete(p) => assert_eq!(name_of(&p), "p1"),
        other => panic!("expected Delete(p1), got {other:?}"),
    }

    // The runtime listed first, then watched from the list's resourceVersion
    // with bookmarks.
    let requests = server.requests();
    let list = requests
        .iter()
        .find(|r| r.path == "/api/v1/namespaces/default/pods" && r.method == "GET")
        .unwrap();
    assert!(!list.has_query("watch", "true"));
    assert!(requests.iter().any(|r| r.has_query("watch", "true")
        && r.has_query("allowWatchBookmarks", "true")
        && r.has_query("labelSelector", "app=w")));
}

#[tokio::test]
async fn streaming_list_watcher_and_bookmarks() {
    init();
    let server = FakeApiServer::start_with(FakeApiOptions {
        bookmark_interval: Duration::from_millis(200),
        ..Default::default()
    })
    .await
    .unwrap();
    let client = server.client().await.unwrap();
    let pods: Api<Pod> = Api::default_namespaced(client);
    for name in ["a", "b"] {
        pods.create(&PostParams::default(), &pod(name, json!({})))
            .await
            .unwrap();
    }
    let mut stream = watcher(pods.clone(), watcher::Config::default().streaming_lists()).boxed();
    assert!(matches!(
        next_event(&mut stream).await,
        watcher::Event::Init
    ));
    let mut seen = Vec::new();
    loop {
        match next_event(&mut stream).await {
            watcher::Event::InitApply(p) => seen.push(name_of(&p).to_string()),
            watcher::Event::InitDone => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, ["a", "b"]);
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.has_query("sendInitialEvents", "true"))
    );

    // A raw watch from the current resourceVersion gets bookmarks while idle
    // and replays from an older resourceVersion.
    let rv = server.resource_version().to_string();
    let mut raw = pods
        .watch(&WatchParams::default().timeout(5), &rv)
        .await
        .unwrap()
        .boxed();
    let first = tokio::time::timeout(STEP, raw.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match first {
        WatchEvent::Bookmark(b) => assert_eq!(b.metadata.resource_version, rv),
        other => panic!("expected a bookmark, got {other:?}"),
    }
    let mut replay = pods
        .watch(&WatchParams::default(), "1")
        .await
        .unwrap()
        .boxed();
    match tokio::time::timeout(STEP, replay.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        WatchEvent::Added(p) => assert_eq!(name_of(&p), "b"),
        other => panic!("expected Added(b), got {other:?}"),
    }
}

#[tokio::test]
async fn watch_from_a_compacted_resource_version_is_gone() {
    init();
    let server = FakeApiServer::start_with(FakeApiOptions {
        event_log_capacity: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    let client = server.client().await.unwrap();
    let pods: Api<Pod> = Api::default_namespaced(client);
    for i in 0..6 {
        pods.create(&PostParams::default(), &pod(&format!("p{i}"), json!({})))
            .await
            .unwrap();
    }
    let mut stream = pods
        .watch(&WatchParams::default(), "1")
        .await
        .unwrap()
        .boxed();
    match tokio::time::timeout(STEP, stream.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        WatchEvent::Error(status) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
        }
        other => panic!("expected 410 Expired, got {other:?}"),
    }
    // The runtime watcher recovers by relisting.
    let mut w = watcher(pods, watcher::Config::default()).boxed();
    assert!(matches!(next_event(&mut w).await, watcher::Event::Init));
}

#[tokio::test]
async fn scale_subresource_drives_deployment_replicas() {
    init();
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client().await.unwrap();
    let api: Api<Deployment> = Api::default_namespaced(client);
    api.create(&PostParams::default(), &deployment("worker", 1))
        .await
        .unwrap();

    let mut deployments = watcher(api.clone(), watcher::Config::default()).boxed();
    // Skip the initial list.
    loop {
        let ev = tokio::time::timeout(STEP, deployments.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if matches!(ev, watcher::Event::InitDone) {
            break;
        }
    }

    let scale = api.get_scale("worker").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(1));
    assert_eq!(
        scale.status.unwrap().selector.as_deref(),
        Some("app=worker")
    );

    let scaled = api
        .patch_scale(
            "worker",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 4}})),
        )
        .await
        .unwrap();
    assert_eq!(scaled.spec.unwrap().replicas, Some(4));

    let got = api.get("worker").await.unwrap();
    assert_eq!(got.spec.unwrap().replicas, Some(4));
    assert_eq!(got.metadata.generation, Some(2));
    match tokio::time::timeout(STEP, deployments.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        watcher::Event::Apply(d) => assert_eq!(d.spec.unwrap().replicas, Some(4)),
        other => panic!("expected Apply, got {other:?}"),
    }

    // A no-op scale patch changes nothing.
    let rv = server.resource_version();
    api.patch_scale(
        "worker",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 4}})),
    )
    .await
    .unwrap();
    assert_eq!(server.resource_version(), rv);

    // Scale with a stale resourceVersion conflicts.
    let stale = json!({"metadata": {"resourceVersion": "1"}, "spec": {"replicas": 2}});
    let err = api
        .patch_scale("worker", &PatchParams::default(), &Patch::Merge(stale))
        .await
        .unwrap_err();
    assert_eq!(api_error(err), (409, "Conflict".into()));

    let patch = server
        .requests()
        .into_iter()
        .find(|r| r.method == "PATCH")
        .unwrap();
    assert_eq!(
        patch.path,
        "/apis/apps/v1/namespaces/default/deployments/worker/scale"
    );
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(patch.json_body().unwrap(), json!({"spec": {"replicas": 4}}));
}

#[tokio::test]
async fn leases_create_replace_conflict_and_json_patch() {
    init();
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client().await.unwrap();
    let leases: Api<Lease> = Api::default_namespaced(client);
    let lease: Lease =
        serde_json::from_value(json!({"metadata": {"name": "ctl"}, "spec": {}})).unwrap();
    let created = leases.create(&PostParams::default(), &lease).await.unwrap();

    let mut mine = created.clone();
    mine.spec.as_mut().unwrap().holder_identity = Some("a".into());
    let replaced = leases
        .replace("ctl", &PostParams::default(), &mine)
        .await
        .unwrap();
    assert_ne!(
        replaced.metadata.resource_version,
        created.metadata.resource_version
    );

    // The same stale object again: someone else's write would be lost.
    let mut theirs = created.clone();
    theirs.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let err = leases
        .replace("ctl", &PostParams::default(), &theirs)
        .await
        .unwrap_err();
    assert_eq!(api_error(err), (409, "Conflict".into()));
    let got = leases.get("ctl").await.unwrap();
    assert_eq!(got.spec.unwrap().holder_identity.as_deref(), Some("a"));

    // JSON patch (kube's `Patch::Json` needs a feature the workspace does not
    // enable, so send it as a raw request through the same client).
    let json_patch = |ops: Value| {
        http::Request::patch("/apis/coordination.k8s.io/v1/namespaces/default/leases/ctl")
            .header("content-type", "application/json-patch+json")
            .body(ops.to_string().into_bytes())
            .unwrap()
    };
    let client = leases.clone().into_client();
    let err = client
        .request::<Lease>(json_patch(json!([
            {"op": "test", "path": "/spec/holderIdentity", "value": "b"},
            {"op": "replace", "path": "/spec/holderIdentity", "value": "c"}
        ])))
        .await
        .unwrap_err();
    assert_eq!(api_error(err).0, 422);
    let patched = client
        .request::<Lease>(json_patch(json!([
            {"op": "test", "path": "/spec/holderIdentity", "value": "a"},
            {"op": "replace", "path": "/spec/holderIdentity", "value": "c"}
        ])))
        .await
        .unwrap();
    assert_eq!(patched.spec.unwrap().holder_identity.as_deref(), Some("c"));
}

#[tokio::test]
async fn lease_manager_elects_one_leader_and_hands_over() {
    init();
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client().await.unwrap();
    let manager = |identity: &'static str| {
        kube_lease_manager::LeaseManagerBuilder::new(client.clone(), "warren-controller")
            .with_namespace("default")
            .with_identity(identity)
            .with_duration(3)
            .with_grace(1)
            .build()
    };
    let (a, b) = (manager("a").await.unwrap(), manager("b").await.unwrap());
    let (mut a_leads, a_task) = a.watch().await;
    let (mut b_leads, b_task) = b.watch().await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !*a_leads.borrow() && !*b_leads.borrow() {
        tokio::select! {
            _ = a_leads.changed() => {}
            _ = b_leads.changed() => {}
            () = tokio::time::sleep_until(deadline) => panic!("nobody became leader"),
        }
    }
    // Let both settle for a couple of renewals: never two leaders.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!(*a_leads.borrow() && *b_leads.borrow()), "two leaders");
    }
    let lease = server
        .get_object(
            &warren_fakekube::resources::LEASES,
            "default",
            "warren-controller",
        )
        .unwrap();
    let holder = lease["spec"]["holderIdentity"]
        .as_str()
        .unwrap()
        .to_string();
    let a_is_leader = *a_leads.borrow();
    assert_eq!(holder, if a_is_leader { "a" } else { "b" });

    // The leader steps down (drops its receiver, which releases the lease);
    // the other takes over.
    let (mut follower, leader_task) = if a_is_leader {
        drop(a_leads);
        (b_leads, a_task)
    } else {
        drop(b_leads);
        (a_leads, b_task)
    };
    let _ = tokio::time::timeout(STEP, leader_task).await.unwrap();
    tokio::time::timeout(Duration::from_secs(15), follower.wait_for(|leads| *leads))
        .await
        .expect("follower takes over")
        .unwrap();
}

fn queuescaler_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("warren.dev", "v1alpha1", "QueueScaler"),
        "queuescalers",
    )
}

#[tokio::test]
async fn queuescaler_status_patches_do_not_bump_generation() {
    init();
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client().await.unwrap();
    let ar = queuescaler_resource();
    let api: Api<DynamicObject> = Api::namespaced_with(client, "default", &ar);
    let mut qs = DynamicObject::new("jobs", &ar);
    qs.data = json!({"spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "worker"},
        "queue": {"name": "tasks"}, "maxReplicas": 5},
        "status": {"desiredReplicas": 99}});
    let created = api.create(&PostParams::default(), &qs).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert!(
        created.data.get("status").is_none(),
        "status is ignored on create"
    );

    let status =
        json!({"status": {"observedGeneration": 1, "desiredReplicas": 3, "currentReplicas": 1}});
    let patched = api
        .patch_status("jobs", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    assert_eq!(patched.metadata.generation, Some(1));
    assert_eq!(patched.data["status"]["desiredReplicas"], 3);

    // Server-side apply on /status, as a controller would do it.
    let applied = json!({"apiVersion": "warren.dev/v1alpha1", "kind": "QueueScaler",
        "status": {"desiredReplicas": 4}});
    let patched = api
        .patch_status(
            "jobs",
            &PatchParams::apply("warren-controller").force(),
            &Patch::Apply(&applied),
        )
        .await
        .unwrap();
    assert_eq!(patched.data["status"]["desiredReplicas"], 4);
    assert_eq!(patched.data["status"]["currentReplicas"], 1);
    assert_eq!(patched.metadata.generation, Some(1));

    // A spec change bumps generation; status in a main-resource patch is ignored.
    let spec = json!({"spec": {"maxReplicas": 7}, "status": {"desiredReplicas": 0}});
    let patched = api
        .patch("jobs", &PatchParams::default(), &Patch::Merge(&spec))
        .await
        .unwrap();
    assert_eq!(patched.metadata.generation, Some(2));
    assert_eq!(patched.data["spec"]["maxReplicas"], 7);
    assert_eq!(patched.data["status"]["desiredReplicas"], 4);

    // The all-namespaces list the controller's watcher uses.
    let all: Api<DynamicObject> = Api::all_with(api.into_client(), &ar);
    assert_eq!(
        all.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );

    let stored = server.get_object(&QUEUESCALERS, "default", "jobs").unwrap();
    assert_eq!(stored["status"]["desiredReplicas"], 4);
    assert!(server.requests().iter().any(|r| r.method == "PATCH"
        && r.path == "/apis/warren.dev/v1alpha1/namespaces/default/queuescalers/jobs/status"
        && r.content_type.as_deref() == Some("application/apply-patch+yaml")
        && r.has_query("fieldManager", "warren-controller")
        && r.has_query("force", "true")));
}

#[tokio::test]
async fn recorder_creates_then_patches_event_series() {
    init();
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client().await.unwrap();
    let deployments: Api<Deployment> = Api::default_namespaced(client.clone());
    let d = deployments
        .create(&PostParams::default(), &deployment("worker", 1))
        .await
        .unwrap();
    let reference = ObjectReference {
        api_version: Some("apps/v1".into()),
        kind: Some("Deployment".into()),
        name: d.metadata.name.clone(),
        namespace: d.metadata.namespace.clone(),
        uid: d.metadata.uid.clone(),
        ..Default::default()
    };
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "warren-controller".into(),
            instance: Some("test".into()),
        },
    );
    let event = Event {
        type_: EventType::Normal,
        reason: "Scaled".into(),
        note: Some("1 -> 3 replicas".into()),
        action: "Scale".into(),
        secondary: None,
    };
    recorder.publish(&event, &reference).await.unwrap();
    recorder.publish(&event, &reference).await.unwrap();

    let events = server.events();
    assert_eq!(events.len(), 1, "the second publish patches the series");
    let e = &events[0];
    assert_eq!(e["reason"], "Scaled");
    assert_eq!(e["note"], "1 -> 3 replicas");
    assert_eq!(e["regarding"]["name"], "worker");
    assert_eq!(e["reportingController"], "warren-controller");
    assert_eq!(e["series"]["count"], 2);

    let listed: Api<K8sEvent> = Api::default_namespaced(client);
    assert_eq!(
        listed
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    let methods: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| {
            r.path
                .starts_with("/apis/events.k8s.io/v1/namespaces/default/events")
        })
        .map(|r| r.method)
        .collect();
    assert_eq!(methods, ["POST", "PATCH", "GET"]);
    assert_eq!(server.list_objects(&EVENTS, Some("default")).len(), 1);
}

#[tokio::test]
async fn secrets_and_test_hooks() {
    init();
    let server = FakeApiServer::start().await.unwrap();
    server
        .put_object(
            &SECRETS,
            json!({"metadata": {"name": "warren-rabbitmq", "namespace": "warren"},
                   "data": {"username": "Z3Vlc3Q=", "password": "Z3Vlc3Q="}}),
        )
        .unwrap();
    let client = server.client().await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "warren");
    let secret = secrets.get("warren-rabbitmq").await.unwrap();
    assert_eq!(secret.data.unwrap()["username"].0, b"guest");

    // put_object on an existing object replaces it, status included.
    let d = server
        .put_object(
            &DEPLOYMENTS,
            serde_json::to_value(deployment("w", 1)).unwrap(),
        )
        .unwrap();
    assert_eq!(d["metadata"]["generation"], 1);
    let mut next = serde_json::to_value(deployment("w", 3)).unwrap();
    next["status"] = json!({"replicas": 1});
    let d = server.put_object(&DEPLOYMENTS, next).unwrap();
    assert_eq!(d["metadata"]["generation"], 2);
    assert_eq!(d["status"]["replicas"], 1);

    let waiter = {
        let server = server.clone();
        tokio::spawn(async move {
            server
                .wait_for_object(&DEPLOYMENTS, "default", "w", STEP, |d| {
                    d["spec"]["replicas"] == 5
                })
                .await
        })
    };
    let api: Api<Deployment> = Api::default_namespaced(client);
    api.patch_scale(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 5}})),
    )
    .await
    .unwrap();
    let seen = waiter
        .await
        .unwrap()
        .expect("wait_for_object sees the scale");
    assert_eq!(seen["spec"]["replicas"], 5);

    // Strategic merge (treated as merge) and metadata-only reads.
    api.patch(
        "w",
        &PatchParams::default(),
        &Patch::Strategic(json!({"metadata": {"annotations": {"a": "b"}}})),
    )
    .await
    .unwrap();
    let meta = api.get_metadata("w").await.unwrap();
    assert_eq!(meta.metadata.annotations.unwrap()["a"], "b");
    let metas = api.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(metas.items.len(), 1);

    assert!(server.delete_object(&DEPLOYMENTS, "default", "w").is_some());
    assert!(api.get_opt("w").await.unwrap().is_none());
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

/// (scaler name, its generation, the Deployment's replicas) per reconcile.
type Seen = (String, i64, i64);
type Ctx = (Api<Deployment>, tokio::sync::mpsc::UnboundedSender<Seen>);

/// The kube runtime `Controller` the warren controller is built on: it
/// reconciles a QueueScaler on start, on a spec change and when the target
/// Deployment changes under it.
#[tokio::test]
async fn kube_runtime_controller_reconciles_on_changes() {
    use kube::runtime::controller::{Action, Controller};
    use kube::runtime::reflector::ObjectRef;
    use std::sync::Arc;

    init();
    let server = FakeApiServer::start().await.unwrap();
    let client = server.client().await.unwrap();
    let ar = queuescaler_resource();
    let scalers: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
    let deployments: Api<Deployment> = Api::default_namespaced(client.clone());
    deployments
        .create(&PostParams::default(), &deployment("worker", 1))
        .await
        .unwrap();
    let mut qs = DynamicObject::new("jobs", &ar);
    qs.data = json!({"spec": {"scaleTargetRef": {"name": "worker"}, "maxReplicas": 5}});
    scalers.create(&PostParams::default(), &qs).await.unwrap();

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Seen>();
    let mapper_ar = ar.clone();
    let controller = Controller::new_with(
        Api::all_with(client.clone(), &ar),
        watcher::Config::default(),
        ar.clone(),
    )
    .watches(
        Api::<Deployment>::all(client),
        watcher::Config::default(),
        move |d| {
            // The fake's test mapping: a Deployment maps to the scaler of the same name "jobs".
            let _ = d;
            Some(ObjectRef::new_with("jobs", mapper_ar.clone()).within("default"))
        },
    )
    .run(
        move |obj: Arc<DynamicObject>, ctx: Arc<Ctx>| async move {
            let replicas = ctx
                .0
                .get("worker")
                .await
                .ok()
                .and_then(|d| d.spec.and_then(|s| s.replicas))
                .unwrap_or(-1);
            let _ = ctx.1.send((
                obj.metadata.name.clone().unwrap_or_default(),
                obj.metadata.generation.unwrap_or_default(),
                i64::from(replicas),
            ));
            Ok::<_, Never>(Action::await_change())
        },
        |_, _, _| Action::requeue(Duration::from_secs(1)),
        Arc::new((deployments.clone(), tx)),
    );
    let driver = tokio::spawn(controller.for_each(|_| async {}));

    let mut next = async || {
        tokio::time::timeout(STEP, rx.recv())
            .await
            .expect("reconcile")
            .unwrap()
    };
    assert_eq!(next().await, ("jobs".to_string(), 1, 1));

    scalers
        .patch(
            "jobs",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"maxReplicas": 8}})),
        )
        .await
        .unwrap();
    // Wait for the reconcile that saw generation 2 (a Deployment event may
    // have triggered one in between).
    loop {
        let (_, generation, _) = next().await;
        if generation == 2 {
            break;
        }
    }
    deployments
        .patch_scale(
            "worker",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .unwrap();
    loop {
        let (_, _, replicas) = next().await;
        if replicas == 3 {
            break;
        }
    }
    driver.abort();
}
