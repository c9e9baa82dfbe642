//! The whole controller — kube runtime `Controller`, real management API and
//! AMQP readers, real audit publisher — against a real kube-apiserver (a
//! private control plane, `warren_testkit::ControlPlane`: the QueueScaler CRD
//! and its validation, the Deployment and ReplicaSet controllers creating Pod
//! objects that nothing runs) and a private RabbitMQ node with the management
//! plugin.
//!
//! - in process: scale-up on backlog, busy-aware scale-in (deletion costs
//!   from real named connections), pause, scale to zero and activation from
//!   zero through the passive declare;
//! - the binary: KUBECONFIG, leader Lease, ops endpoints, SIGTERM.
//!
//! Needs the localcluster binary (`make local-build`).

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use warren_broker::events_log::{self, StartAt};
use warren_broker::{QueueType, Topology};
use warren_controller::audit::BrokerAudit;
use warren_controller::metrics::ControllerMetrics;
use warren_controller::observe::BrokerObserver;
use warren_controller::observe::credentials::CredentialsCache;
use warren_controller::observe::management::{
    Credentials, ManagementClient, ManagementConfig, ManagementEndpoint, QueueStatsHub,
};
use warren_controller::observe::peek::QueuePeeker;
use warren_controller::reconcile::{self, Context, Settings};
use warren_testkit::amqp::publish_confirmed;
use warren_testkit::{ControlPlane, RabbitNode, RabbitOptions, unique_name};

const STEP: Duration = Duration::from_secs(30);
const COST: &str = "controller.kubernetes.io/pod-deletion-cost";

async fn rabbit() -> RabbitNode {
    RabbitNode::start(RabbitOptions {
        management: true,
        stats_interval_ms: 200,
        ..RabbitOptions::default()
    })
    .await
    .expect("a private RabbitMQ node with management must start (is rabbitmq-server installed?)")
}

fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The kinds the tests read and write, as JSON through the real apiserver.
#[derive(Clone, Copy)]
enum Kind {
    Secret,
    Deployment,
    Pod,
    Lease,
    Scaler,
}

fn resource(kind: Kind) -> ApiResource {
    match kind {
        Kind::Secret => ApiResource::erase::<Secret>(&()),
        Kind::Deployment => ApiResource::erase::<Deployment>(&()),
        Kind::Pod => ApiResource::erase::<Pod>(&()),
        Kind::Lease => ApiResource::erase::<Lease>(&()),
        Kind::Scaler => ApiResource::erase::<warren_crd::QueueScaler>(&()),
    }
}

/// A private control plane and an admin client for it.
struct Kube {
    plane: ControlPlane,
    client: kube::Client,
}

impl Kube {
    async fn start() -> Self {
        let plane = ControlPlane::start()
            .await
            .expect("a private control plane must start (make local-build builds localcluster)");
        let client = plane.client().await.unwrap();
        Self { plane, client }
    }

    fn api(&self, kind: Kind) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), "default", &resource(kind))
    }

    async fn put(&self, kind: Kind, object: Value) {
        let object: DynamicObject = serde_json::from_value(object).unwrap();
        self.api(kind)
            .create(&PostParams::default(), &object)
            .await
            .unwrap();
    }

    async fn get(&self, kind: Kind, name: &str) -> Option<Value> {
        let object = self.api(kind).get_opt(name).await.unwrap()?;
        Some(serde_json::to_value(object).unwrap())
    }

    async fn patch(&self, kind: Kind, name: &str, patch: Value) {
        self.api(kind)
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    /// Polls `name` until `pred` holds (the object), or `timeout` passes (None).
    async fn wait_for(
        &self,
        kind: Kind,
        name: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(object) = self.get(kind, name).await
                && pred(&object)
            {
                return Some(object);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The notes of the `Scaled` Events (events.k8s.io/v1) in `default`.
    async fn scaled_notes(&self) -> Vec<String> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), "default");
        events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("Scaled"))
            .filter_map(|e| e.note)
            .collect()
    }
}

/// Secret, Deployment `worker` (label app=worker) and a QueueScaler `jobs`
/// on `queue`, in namespace `default`.
async fn seed(kube: &Kube, node: &RabbitNode, queue: &str, replicas: i32, extra: Value) {
    kube.put(
        Kind::Secret,
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "warren-rabbitmq", "namespace": "default"},
               "data": {"username": "Z3Vlc3Q=", "password": "Z3Vlc3Q="}}),
    )
    .await;
    kube.put(
        Kind::Deployment,
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "worker", "namespace": "default"},
               "spec": {"replicas": replicas,
                        "selector": {"matchLabels": {"app": "worker"}},
                        "template": {"metadata": {"labels": {"app": "worker"}},
                                     "spec": {"containers": [{"name": "w", "image": "worker"}]}}}}),
    )
    .await;
    let mut spec = json!({
        "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "worker"},
        "queue": {"name": queue, "vhost": "/"},
        "broker": {
            "managementUrl": node.management_url(),
            "amqpUrl": format!("amqp://127.0.0.1:{}", node.amqp_port()),
            "credentialsSecretRef": {"name": "warren-rabbitmq"}
        },
        "minReplicas": 1,
        "maxReplicas": 10,
        "messagesPerReplica": 5,
        "pollingIntervalSeconds": 1,
        "behavior": {"scaleDown": {"stabilizationWindowSeconds": 0}, "cooldownSeconds": 0}
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            spec.insert(k.clone(), v.clone());
        }
    }
    kube.put(
        Kind::Scaler,
        json!({"apiVersion": "warren.dev/v1alpha1", "kind": "QueueScaler",
               "metadata": {"name": "jobs", "namespace": "default"},
               "spec": spec}),
    )
    .await;
}

async fn channel(node: &RabbitNode, name: &str) -> (Connection, Channel) {
    let connection = Connection::connect(
        &node.amqp_url(),
        ConnectionProperties::default().with_connection_name(name.into()),
    )
    .await
    .unwrap();
    let channel = connection.create_channel().await.unwrap();
    (connection, channel)
}

async fn declare(connection: &Connection, channel: &Channel, queue: &str) {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    // warren.events for the audit tap.
    Topology::new(Vec::new(), QueueType::Quorum)
        .declare(connection)
        .await
        .unwrap();
}

async fn replicas(kube: &Kube) -> i64 {
    kube.get(Kind::Deployment, "worker")
        .await
        .and_then(|d| d.pointer("/spec/replicas").and_then(Value::as_i64))
        .unwrap_or(-1)
}

async fn wait_for_replicas(kube: &Kube, want: i64) {
    let found = kube
        .wait_for(Kind::Deployment, "worker", STEP, |d| {
            d.pointer("/spec/replicas").and_then(Value::as_i64) == Some(want)
        })
        .await;
    assert!(
        found.is_some(),
        "replicas never became {want} (now {}); scaler: {:#}",
        replicas(kube).await,
        kube.get(Kind::Scaler, "jobs").await.unwrap_or_default()
    );
}

async fn wait_for_scaler(kube: &Kube, what: &str, pred: impl FnMut(&Value) -> bool) {
    let found = kube.wait_for(Kind::Scaler, "jobs", STEP, pred).await;
    assert!(
        found.is_some(),
        "the scaler never showed {what}: {:#}",
        kube.get(Kind::Scaler, "jobs").await.unwrap_or_default()
    );
}

fn condition(scaler: &Value, type_: &str) -> Option<(String, String)> {
    scaler
        .pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_string(),
                c["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
}

fn context(client: kube::Client, metrics: &ControllerMetrics) -> Arc<Context> {
    let credentials = Arc::new(CredentialsCache::new(
        client.clone(),
        Duration::from_secs(60),
    ));
    let management = ManagementClient::new(ManagementConfig::default())
        .unwrap()
        .with_metrics(metrics.clone());
    let hub = Arc::new(QueueStatsHub::new(management, Duration::from_millis(500)));
    let peeker = Arc::new(QueuePeeker::new(Duration::from_secs(5)).with_metrics(metrics.clone()));
    Arc::new(Context::new(
        client,
        Some("controller-test".into()),
        metrics.clone(),
        Arc::new(BrokerObserver::new(credentials.clone(), hub, peeker)),
        Arc::new(BrokerAudit::new(
            credentials,
            Duration::from_secs(5),
            metrics.clone(),
        )),
        Settings::default(),
    ))
}

#[tokio::test]
async fn scales_up_on_backlog_in_busy_aware_to_zero_and_back_against_a_real_apiserver() {
    init();
    let node = rabbit().await;
    let server = Kube::start().await;
    let queue = unique_name("qs-e2e");
    let (admin_conn, admin) = channel(&node, "test-admin").await;
    declare(&admin_conn, &admin, &queue).await;
    seed(&server, &node, &queue, 1, json!({})).await;
    // Pods of the Deployment's selector besides the ReplicaSet's own (which
    // also match, and are never connected to the broker).
    for pod in ["worker-a", "worker-b", "worker-c"] {
        server
            .put(
                Kind::Pod,
                json!({"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": pod, "namespace": "default", "labels": {"app": "worker"}},
                       "spec": {"containers": [{"name": "w", "image": "worker"}]}}),
            )
            .await;
    }

    let client = server.client.clone();
    let metrics = ControllerMetrics::default();
    let ctx = context(client.clone(), &metrics);
    let stop = CancellationToken::new();
    let running = tokio::spawn(reconcile::run(ctx.clone(), None, stop.clone()));

    // 1. Backlog of 12 at 5 per replica: 1 -> 3.
    publish_confirmed(&admin, &queue, 12).await.unwrap();
    wait_for_replicas(&server, 3).await;
    wait_for_scaler(&server, "desiredReplicas 3 and Ready", |s| {
        s.pointer("/status/desiredReplicas") == Some(&json!(3))
            && condition(s, "Ready") == Some(("True".into(), "MetricsAvailable".into()))
    })
    .await;
    let scaler = server.get(Kind::Scaler, "jobs").await.unwrap();
    assert_eq!(scaler["status"]["observation"]["ready"], 12);
    assert_eq!(scaler["status"]["observedGeneration"], 1);
    assert_eq!(scaler["status"]["lastDecision"]["reason"], "Backlog");
    let notes = server.scaled_notes().await;
    assert!(
        notes.iter().any(|n| n.starts_with("from 1 to 3: ")),
        "{notes:?}"
    );
    // The audit event, read back from the events log like an operator would.
    let audit = events_log::find(&admin_conn, &StartAt::First, STEP, |e| {
        e.routing_key == "scaler.scaled" && e.event["from"] == 1 && e.event["to"] == 3
    })
    .await
    .unwrap()
    .expect("no scaler.scaled audit event from 1 to 3 in warren.events.log")
    .event;
    assert_eq!(audit["queue"], queue.as_str());
    assert_eq!(audit["scaler"], "jobs");
    assert_eq!(audit["target"]["name"], "worker");
    assert_eq!(audit["reason"], "Backlog");
    assert!(audit["id"].as_str().is_some_and(|id| id.len() == 36));

    // 2. Pause, then set up one busy and one idle worker connection.
    server
        .patch(Kind::Scaler, "jobs", json!({"spec": {"paused": true}}))
        .await;
    wait_for_scaler(&server, "Paused", |s| {
        condition(s, "Paused").is_some_and(|c| c.0 == "True")
    })
    .await;
    admin
        .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    let (_busy_conn, busy) = channel(&node, "worker-a").await;
    busy.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut busy_consumer = busy
        .basic_consume(
            queue.as_str().into(),
            "busy".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    publish_confirmed(&admin, &queue, 1).await.unwrap();
    let held = tokio::time::timeout(STEP, busy_consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let (_idle_conn, idle) = channel(&node, "worker-b").await;
    idle.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let _idle_consumer = idle
        .basic_consume(
            queue.as_str().into(),
            "idle".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // Wait until the management API reports it (stats lag).
    let probe = ManagementClient::new(ManagementConfig::default()).unwrap();
    let endpoint = ManagementEndpoint {
        url: node.management_url(),
        credentials: Credentials {
            username: "guest".into(),
            password: "guest".into(),
        },
    };
    let deadline = Instant::now() + STEP;
    loop {
        let unacked = probe.connection_unacked(&endpoint, "/").await.unwrap();
        let queues = probe.vhost_queues(&endpoint, "/").await.unwrap();
        let row = queues.get(&queue).cloned().unwrap_or_default();
        if unacked.unacked("worker-a") == 1
            && unacked.by_connection.contains_key("worker-b")
            && row.messages_unacknowledged == Some(1)
            && row.messages_ready == Some(0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stats never settled: {unacked:?} {row:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(replicas(&server).await, 3, "paused: nothing moved");

    // 3. Unpause: one unacked message needs one replica; 3 -> 1, with the
    // busy pod expensive, the idle one cheap, the unconnected one cheapest.
    server
        .patch(Kind::Scaler, "jobs", json!({"spec": {"paused": false}}))
        .await;
    wait_for_replicas(&server, 1).await;
    let mut costs = Vec::new();
    for pod in ["worker-a", "worker-b", "worker-c"] {
        let found = server.get(Kind::Pod, pod).await.unwrap();
        costs.push(
            found["metadata"]["annotations"][COST]
                .as_str()
                .map(String::from),
        );
    }
    assert_eq!(
        costs,
        [Some("1001".into()), Some("0".into()), Some("-1000".into())]
    );
    // The annotations were written before the scale patch (the apiserver's
    // audit log, in the order it answered; the controller is kubernetes-admin).
    let audit = server.plane.audit_events();
    let by_admin_patching = |e: &&Value, resource: &str| {
        e["verb"] == "patch"
            && e["user"]["username"] == "kubernetes-admin"
            && e["objectRef"]["namespace"] == "default"
            && e["objectRef"]["resource"] == resource
    };
    let last_pod_patch = audit
        .iter()
        .rposition(|e| by_admin_patching(&e, "pods"))
        .expect("pod patches");
    let scale_in = audit
        .iter()
        .rposition(|e| {
            by_admin_patching(&e, "deployments")
                && e["objectRef"]["subresource"] == "scale"
                && e["objectRef"]["name"] == "worker"
        })
        .expect("scale patch");
    assert!(last_pod_patch < scale_in);

    // 4. Work done, workers gone, minReplicas 0: the queue is empty -> 0.
    held.acker.ack(BasicAckOptions::default()).await.unwrap();
    busy.close(200, "done".into()).await.unwrap();
    idle.close(200, "done".into()).await.unwrap();
    server
        .patch(Kind::Scaler, "jobs", json!({"spec": {"minReplicas": 0}}))
        .await;
    wait_for_replicas(&server, 0).await;
    wait_for_scaler(&server, "Active=False", |s| {
        condition(s, "Active") == Some(("False".into(), "ScaledToZero".into()))
    })
    .await;

    // 5. Activation from zero: the passive declare sees the messages at once.
    publish_confirmed(&admin, &queue, 2).await.unwrap();
    wait_for_replicas(&server, 1).await;
    let peeks = metrics
        .broker_requests
        .get_or_create(&warren_controller::metrics::BrokerRequestLabels {
            request: "passive_declare".into(),
        })
        .get();
    assert!(peeks > 0, "no passive declare at zero replicas");

    // The Event follows the scale patch.
    let expected = [
        "from 1 to 3: ",
        "from 3 to 1: ",
        "from 1 to 0: ",
        "from 0 to 1: ",
    ];
    let deadline = Instant::now() + STEP;
    let notes = loop {
        let notes = server.scaled_notes().await;
        let all = expected
            .iter()
            .all(|e| notes.iter().any(|n| n.starts_with(e)));
        if all || Instant::now() > deadline {
            break notes;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for expected in expected {
        assert!(
            notes.iter().any(|n| n.starts_with(expected)),
            "{expected:?} missing from {notes:?}"
        );
    }
    // The fourth scale's audit event, from the log (offsets count every event).
    let mut scaled = 0;
    let fourth = events_log::find(&admin_conn, &StartAt::First, STEP, |e| {
        if e.routing_key == "scaler.scaled" {
            scaled += 1;
        }
        scaled >= 4
    })
    .await
    .unwrap();
    assert!(
        fourth.is_some(),
        "only {scaled} scaler.scaled events in warren.events.log"
    );

    stop.cancel();
    tokio::time::timeout(STEP, running)
        .await
        .expect("the scaling loop stops when cancelled")
        .unwrap();
}

async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let response = reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

#[tokio::test]
async fn the_binary_runs_against_a_kubeconfig_holds_the_lease_scales_and_stops_on_sigterm() {
    init();
    let node = rabbit().await;
    let server = Kube::start().await;
    let queue = unique_name("qs-bin");
    let (admin_conn, admin) = channel(&node, "test-admin").await;
    declare(&admin_conn, &admin, &queue).await;
    seed(&server, &node, &queue, 1, json!({})).await;
    publish_confirmed(&admin, &queue, 12).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = server.plane.kubeconfig();
    let port = warren_testkit::free_port().unwrap();
    let addr = format!("127.0.0.1:{port}");
    let log_path = dir.path().join("controller.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_warren-controller"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KUBECONFIG", &kubeconfig)
        .env("WARREN_LISTEN_ADDR", &addr)
        .env("WARREN_LEADER_ELECTION", "true")
        .env("WARREN_LEASE_NAME", "warren-controller")
        .env("POD_NAMESPACE", "default")
        .env("POD_NAME", "controller-0")
        .env("WARREN_WATCH_NAMESPACE", "default")
        .env("WARREN_LOG", "info,warren_controller=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // Ops endpoints.
    let deadline = Instant::now() + STEP;
    loop {
        if let Some((200, body)) = http_get(&addr, "/healthz").await {
            assert_eq!(body, "ok\n");
            break;
        }
        assert!(Instant::now() < deadline, "no /healthz");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Ready once the clients are built (shortly after /healthz answers).
    loop {
        if http_get(&addr, "/readyz").await.map(|r| r.0) == Some(200) {
            break;
        }
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The leader scales.
    wait_for_replicas(&server, 3).await;
    let lease = server
        .get(Kind::Lease, "warren-controller")
        .await
        .expect("a Lease");
    assert_eq!(lease["spec"]["holderIdentity"], "controller-0");
    // The counters are bumped when the reconcile ends, after the patch.
    let deadline = Instant::now() + STEP;
    let metrics = loop {
        let (_, metrics) = http_get(&addr, "/metrics").await.unwrap();
        if metrics.contains("warren_controller_reconciles_total{result=\"scaled\"}")
            || Instant::now() > deadline
        {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for series in [
        "warren_controller_reconciles_total{result=\"scaled\"}",
        "warren_controller_scale_patches_total{direction=\"up\"}",
        "warren_controller_leader 1",
        "warren_controller_broker_requests_total{request=\"queues\"}",
        "warren_controller_decisions_total{namespace=\"default\",name=\"jobs\",reason=\"Backlog\"}",
        "warren_controller_reconcile_duration_seconds_bucket",
        // The per-QueueScaler view agrees with what the scaler saw and did.
        "warren_controller_scaler_desired_replicas{namespace=\"default\",name=\"jobs\"} 3",
        "warren_controller_scaler_current_replicas{namespace=\"default\",name=\"jobs\"}",
        "warren_controller_scaler_ready_messages{namespace=\"default\",name=\"jobs\"} 12",
        "warren_controller_scaler_ready{namespace=\"default\",name=\"jobs\"} 1",
        "warren_controller_scaler_active{namespace=\"default\",name=\"jobs\"} 1",
        "warren_controller_scaler_fallback{namespace=\"default\",name=\"jobs\"} 0",
    ] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }

    // SIGTERM: exit 0 soon, releasing the Lease.
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(STEP, child.wait())
        .await
        .expect("the controller exits after SIGTERM")
        .unwrap();
    let stderr = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(status.success(), "exit {status:?}; log:\n{stderr}");
    let lease = server
        .get(Kind::Lease, "warren-controller")
        .await
        .expect("a Lease");
    assert!(
        lease["spec"]["holderIdentity"].is_null()
            || lease["spec"]["holderIdentity"] != "controller-0",
        "the Lease was not released: {lease}"
    );
}
