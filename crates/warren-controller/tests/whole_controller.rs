//! The whole controller — kube runtime `Controller`, real management API and
//! AMQP readers, real audit publisher — against the fake Kubernetes API server
//! and a private RabbitMQ node with the management plugin.
//!
//! - in process: scale-up on backlog, busy-aware scale-in (deletion costs
//!   from real named connections), pause, scale to zero and activation from
//!   zero through the passive declare;
//! - the binary: KUBECONFIG, leader Lease, ops endpoints, SIGTERM.

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
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
use warren_fakekube::FakeApiServer;
use warren_fakekube::resources::{DEPLOYMENTS, LEASES, PODS, QUEUESCALERS, SECRETS};
use warren_testkit::{RabbitNode, RabbitOptions, unique_name};

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

/// Secret, Deployment `worker` (label app=worker) and a QueueScaler `jobs`
/// on `queue`, in namespace `default`.
fn seed(server: &FakeApiServer, node: &RabbitNode, queue: &str, replicas: i32, extra: Value) {
    server
        .put_object(
            &SECRETS,
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "warren-rabbitmq", "namespace": "default"},
                   "data": {"username": "Z3Vlc3Q=", "password": "Z3Vlc3Q="}}),
        )
        .unwrap();
    server
        .put_object(
            &DEPLOYMENTS,
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": "worker", "namespace": "default"},
                   "spec": {"replicas": replicas,
                            "selector": {"matchLabels": {"app": "worker"}},
                            "template": {"metadata": {"labels": {"app": "worker"}},
                                         "spec": {"containers": [{"name": "w", "image": "worker"}]}}}}),
        )
        .unwrap();
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
    server
        .put_object(
            &QUEUESCALERS,
            json!({"apiVersion": "warren.dev/v1alpha1", "kind": "QueueScaler",
                   "metadata": {"name": "jobs", "namespace": "default"},
                   "spec": spec}),
        )
        .unwrap();
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

async fn publish(channel: &Channel, queue: &str, count: usize) {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .ok();
    for _ in 0..count {
        channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                b"job",
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

fn replicas(server: &FakeApiServer) -> i64 {
    server
        .get_object(&DEPLOYMENTS, "default", "worker")
        .and_then(|d| d.pointer("/spec/replicas").and_then(Value::as_i64))
        .unwrap_or(-1)
}

async fn wait_for_replicas(server: &FakeApiServer, want: i64) {
    let found = server
        .wait_for_object(&DEPLOYMENTS, "default", "worker", STEP, |d| {
            d.pointer("/spec/replicas").and_then(Value::as_i64) == Some(want)
        })
        .await;
    assert!(
        found.is_some(),
        "replicas never became {want} (now {}); scaler: {:#}",
        replicas(server),
        server
            .get_object(&QUEUESCALERS, "default", "jobs")
            .unwrap_or_default()
    );
}

async fn wait_for_scaler(server: &FakeApiServer, what: &str, pred: impl FnMut(&Value) -> bool) {
    let found = server
        .wait_for_object(&QUEUESCALERS, "default", "jobs", STEP, pred)
        .await;
    assert!(
        found.is_some(),
        "the scaler never showed {what}: {:#}",
        server
            .get_object(&QUEUESCALERS, "default", "jobs")
            .unwrap_or_default()
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

fn scaled_notes(server: &FakeApiServer) -> Vec<String> {
    server
        .events()
        .into_iter()
        .filter(|e| e["reason"] == "Scaled")
        .filter_map(|e| e["note"].as_str().map(String::from))
        .collect()
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
async fn scales_up_on_backlog_in_busy_aware_to_zero_and_back_against_fake_cluster() {
    init();
    let node = rabbit().await;
    let server = FakeApiServer::start().await.unwrap();
    let queue = unique_name("qs-e2e");
    let (admin_conn, admin) = channel(&node, "test-admin").await;
    declare(&admin_conn, &admin, &queue).await;
    seed(&server, &node, &queue, 1, json!({}));
    for pod in ["worker-a", "worker-b", "worker-c"] {
        server
            .put_object(
                &PODS,
                json!({"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": pod, "namespace": "default", "labels": {"app": "worker"}},
                       "spec": {"containers": [{"name": "w", "image": "worker"}]}}),
            )
            .unwrap();
    }

    let client = server.client().await.unwrap();
    let metrics = ControllerMetrics::default();
    let ctx = context(client.clone(), &metrics);
    let stop = CancellationToken::new();
    let running = tokio::spawn(reconcile::run(ctx.clone(), None, stop.clone()));

    // 1. Backlog of 12 at 5 per replica: 1 -> 3.
    publish(&admin, &queue, 12).await;
    wait_for_replicas(&server, 3).await;
    wait_for_scaler(&server, "desiredReplicas 3 and Ready", |s| {
        s.pointer("/status/desiredReplicas") == Some(&json!(3))
            && condition(s, "Ready") == Some(("True".into(), "MetricsAvailable".into()))
    })
    .await;
    let scaler = server.get_object(&QUEUESCALERS, "default", "jobs").unwrap();
    assert_eq!(scaler["status"]["observation"]["ready"], 12);
    assert_eq!(scaler["status"]["observedGeneration"], 1);
    assert_eq!(scaler["status"]["lastDecision"]["reason"], "Backlog");
    let notes = scaled_notes(&server);
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
        .patch_object(
            &QUEUESCALERS,
            "default",
            "jobs",
            &json!({"spec": {"paused": true}}),
        )
        .unwrap();
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
    publish(&admin, &queue, 1).await;
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
    assert_eq!(replicas(&server), 3, "paused: nothing moved");

    // 3. Unpause: one unacked message needs one replica; 3 -> 1, with the
    // busy pod expensive, the idle one cheap, the unconnected one cheapest.
    server
        .patch_object(
            &QUEUESCALERS,
            "default",
            "jobs",
            &json!({"spec": {"paused": false}}),
        )
        .unwrap();
    wait_for_replicas(&server, 1).await;
    let cost = |pod: &str| {
        server.get_object(&PODS, "default", pod).and_then(|p| {
            p["metadata"]["annotations"][COST]
                .as_str()
                .map(String::from)
        })
    };
    assert_eq!(cost("worker-a").as_deref(), Some("1001"));
    assert_eq!(cost("worker-b").as_deref(), Some("0"));
    assert_eq!(cost("worker-c").as_deref(), Some("-1000"));
    // The annotations were written before the scale patch.
    let requests = server.requests();
    let last_pod_patch = requests
        .iter()
        .rposition(|r| {
            r.method == "PATCH" && r.path.starts_with("/api/v1/namespaces/default/pods/")
        })
        .expect("pod patches");
    let scale_in = requests
        .iter()
        .rposition(|r| {
            r.method == "PATCH"
                && r.path == "/apis/apps/v1/namespaces/default/deployments/worker/scale"
        })
        .expect("scale patch");
    assert!(last_pod_patch < scale_in);

    // 4. Work done, workers gone, minReplicas 0: the queue is empty -> 0.
    held.acker.ack(BasicAckOptions::default()).await.unwrap();
    busy.close(200, "done".into()).await.unwrap();
    idle.close(200, "done".into()).await.unwrap();
    server
        .patch_object(
            &QUEUESCALERS,
            "default",
            "jobs",
            &json!({"spec": {"minReplicas": 0}}),
        )
        .unwrap();
    wait_for_replicas(&server, 0).await;
    wait_for_scaler(&server, "Active=False", |s| {
        condition(s, "Active") == Some(("False".into(), "ScaledToZero".into()))
    })
    .await;

    // 5. Activation from zero: the passive declare sees the messages at once.
    publish(&admin, &queue, 2).await;
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
        let notes = scaled_notes(&server);
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
    let server = FakeApiServer::start().await.unwrap();
    let queue = unique_name("qs-bin");
    let (admin_conn, admin) = channel(&node, "test-admin").await;
    declare(&admin_conn, &admin, &queue).await;
    seed(&server, &node, &queue, 1, json!({}));
    publish(&admin, &queue, 12).await;

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig).unwrap();
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
        .get_object(&LEASES, "default", "warren-controller")
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
        .get_object(&LEASES, "default", "warren-controller")
        .expect("a Lease");
    assert!(
        lease["spec"]["holderIdentity"].is_null()
            || lease["spec"]["holderIdentity"] != "controller-0",
        "the Lease was not released: {lease}"
    );
}
