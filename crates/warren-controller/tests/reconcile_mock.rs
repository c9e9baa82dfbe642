//! The reconciler against a mocked Kubernetes API (tower-test), asserting
//! every request it makes, in order, with a fake queue observer.

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde_json::{Value, json};
use warren_controller::audit::{ScaleAudit, ScaleRecord};
use warren_controller::metrics::{
    ControllerMetrics, DirectionLabels, InFlightGuardLabels, ObservationLabels, ResultLabels,
};
use warren_controller::observe::management::ConnectionUnacked;
use warren_controller::observe::{
    BrokerTarget, ObserveError, QueueObserver, QueueRead, ReadySource,
};
use warren_controller::reconcile::{Context, Settings, TargetStores, error_policy, reconcile};
use warren_crd::{Observation, QueueScaler, QueueScalerSpec, QueueScalerStatus};

const NS: &str = "ns";
const SCALE_PATH: &str = "/apis/apps/v1/namespaces/ns/deployments/worker/scale";
const STATUS_PATH: &str = "/apis/warren.dev/v1alpha1/namespaces/ns/queuescalers/jobs/status";
const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/ns/events";
const PODS_PATH: &str = "/api/v1/namespaces/ns/pods";
const COST: &str = "controller.kubernetes.io/pod-deletion-cost";

// ---------------------------------------------------------------- fakes

/// Queue reads served from a script; the last entry repeats.
#[derive(Default)]
struct FakeObserver {
    script: Mutex<VecDeque<Result<QueueRead, ObserveError>>>,
    unacked: Mutex<ConnectionUnacked>,
    /// Observe calls so far.
    calls: Mutex<usize>,
    unacked_calls: Mutex<u32>,
}

impl FakeObserver {
    fn with(reads: Vec<Result<QueueRead, ObserveError>>) -> Arc<Self> {
        Arc::new(Self {
            script: Mutex::new(reads.into()),
            ..Self::default()
        })
    }
    fn calls(&self) -> usize {
        *self.calls.lock().unwrap()
    }
}

#[async_trait]
impl QueueObserver for FakeObserver {
    async fn observe(&self, _target: &BrokerTarget) -> Result<QueueRead, ObserveError> {
        *self.calls.lock().unwrap() += 1;
        let mut script = self.script.lock().unwrap();
        if script.len() > 1 {
            script.pop_front().unwrap()
        } else {
            script.front().cloned().expect("the test scripted no read")
        }
    }

    async fn connection_unacked(
        &self,
        _target: &BrokerTarget,
    ) -> Result<ConnectionUnacked, ObserveError> {
        *self.unacked_calls.lock().unwrap() += 1;
        Ok(self.unacked.lock().unwrap().clone())
    }
}

#[derive(Default)]
struct FakeAudit(Mutex<Vec<ScaleRecord>>);

impl ScaleAudit for FakeAudit {
    fn publish(&self, target: &BrokerTarget, record: &ScaleRecord) {
        assert!(target.queue.named().contains(&"jobs"), "{:?}", target.queue);
        self.0.lock().unwrap().push(record.clone());
    }
}

fn observed(ready: u64, unacked: u64) -> Result<QueueRead, ObserveError> {
    Ok(QueueRead::from(Observation::new(
        ready,
        unacked,
        1,
        None,
        None,
        Utc::now(),
    )))
}

/// The passive declare answered, the management API did not: no unacked count.
fn unacked_unknown(ready: u64) -> Result<QueueRead, ObserveError> {
    Ok(QueueRead {
        ready,
        unacked: None,
        consumers: 1,
        publish_rate: None,
        ack_rate: None,
        ready_source: ReadySource::PassiveDeclare,
        observed_at: Utc::now(),
        queues: Vec::new(),
    })
}

/// The usual read: ready from the passive declare (now), unacked from the
/// management API (a sample that may be older).
fn declared(ready: u64, unacked: u64) -> Result<QueueRead, ObserveError> {
    Ok(QueueRead {
        unacked: Some(unacked),
        ..unacked_unknown(ready)?
    })
}

/// A read of several queues, each (name, ready, unacked).
fn observed_queues(queues: &[(&str, u64, u64)]) -> Result<QueueRead, ObserveError> {
    let reads = queues
        .iter()
        .map(|(name, ready, unacked)| {
            let read = QueueRead::from(Observation::new(
                *ready,
                *unacked,
                1,
                None,
                None,
                Utc::now(),
            ));
            (name.to_string(), read)
        })
        .collect();
    Ok(QueueRead::of_queues(reads, Utc::now()))
}

fn broker_down() -> Result<QueueRead, ObserveError> {
    Err(ObserveError::Other("connection refused".into()))
}

// ------------------------------------------------------------- fixtures

/// A tick requeues for the rest of its polling interval (ticks start one
/// interval apart): whole milliseconds, more than half the interval, at most
/// all of it.
fn assert_requeued_for_the_next_tick(action: &Action, polling: Duration) {
    let ms = u64::try_from(polling.as_millis()).unwrap();
    assert!(
        (ms / 2..=ms).any(|d| *action == Action::requeue(Duration::from_millis(d))),
        "{action:?} is not a requeue within the {polling:?} polling interval"
    );
}

fn scaler(spec: Value) -> QueueScaler {
    let mut full = json!({
        "scaleTargetRef": {"name": "worker"},
        "queue": {"name": "jobs"},
        "broker": {"credentialsSecretRef": {"name": "warren-rabbitmq"}},
        "maxReplicas": 10,
        "behavior": {"scaleDown": {"stabilizationWindowSeconds": 0}}
    });
    merge(&mut full, &spec);
    let spec: QueueScalerSpec = serde_json::from_value(full).unwrap();
    let mut qs = QueueScaler::new("jobs", spec);
    qs.meta_mut().namespace = Some(NS.into());
    qs.meta_mut().uid = Some("uid-1".into());
    qs.meta_mut().generation = Some(4);
    qs
}

fn with_status(mut qs: QueueScaler, status: QueueScalerStatus) -> QueueScaler {
    qs.status = Some(status);
    qs
}

fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn scale(replicas: i32) -> Value {
    json!({
        "apiVersion": "autoscaling/v1", "kind": "Scale",
        "metadata": {"name": "worker", "namespace": NS},
        "spec": {"replicas": replicas},
        "status": {"replicas": replicas, "selector": "app=worker"}
    })
}

fn pod(name: &str, cost: Option<&str>) -> Value {
    let mut p = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": "worker"}}});
    if let Some(cost) = cost {
        p["metadata"]["annotations"] = json!({ COST: cost });
    }
    p
}

struct Harness {
    ctx: Arc<Context>,
    observer: Arc<FakeObserver>,
    audit: Arc<FakeAudit>,
    server: ApiServer,
}

fn harness(observer: Arc<FakeObserver>) -> Harness {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let audit = Arc::new(FakeAudit::default());
    let ctx = Arc::new(Context::new(
        client,
        Some("controller-0".into()),
        ControllerMetrics::default(),
        observer.clone(),
        audit.clone(),
        Settings::default(),
    ));
    Harness {
        ctx,
        observer,
        audit,
        server: ApiServer(handle),
    }
}

// ------------------------------------------------------- the verifier

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// The API server side: each `expect_*` takes the next request, asserts it
/// and answers it.
struct ApiServer(Handle);

/// A request as seen by the verifier.
#[derive(Debug)]
struct Seen {
    method: Method,
    path: String,
    query: String,
    body: Value,
}

impl ApiServer {
    async fn next(&mut self) -> (Seen, tower_test::mock::SendResponse<Response<Body>>) {
        let (request, send) = tokio::time::timeout(Duration::from_secs(5), self.0.next_request())
            .await
            .expect("the reconciler made no further request")
            .expect("the client is gone");
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let query = request.uri().query().unwrap_or_default().to_string();
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (
            Seen {
                method,
                path,
                query,
                body,
            },
            send,
        )
    }

    async fn expect(&mut self, method: Method, path: &str, answer: Value) -> Seen {
        let (seen, send) = self.next().await;
        assert_eq!(
            (&seen.method, seen.path.as_str()),
            (&method, path),
            "unexpected request {seen:?}"
        );
        send.send_response(
            Response::builder()
                .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                .unwrap(),
        );
        seen
    }

    async fn expect_get_scale(&mut self, replicas: i32) {
        let seen = self.expect(Method::GET, SCALE_PATH, scale(replicas)).await;
        assert_eq!(seen.body, Value::Null);
    }

    async fn expect_scale_patch(&mut self, replicas: i32) {
        let seen = self
            .expect(Method::PATCH, SCALE_PATH, scale(replicas))
            .await;
        assert_eq!(seen.body, json!({"spec": {"replicas": replicas}}));
    }

    /// The Event POST; returns its body.
    async fn expect_event(&mut self, type_: &str, reason: &str) -> Value {
        let (seen, send) = self.next().await;
        assert_eq!(
            (&seen.method, seen.path.as_str()),
            (&Method::POST, EVENTS_PATH),
            "unexpected request {seen:?}"
        );
        assert_eq!(seen.body["reason"], reason, "{:?}", seen.body);
        assert_eq!(seen.body["type"], type_);
        assert_eq!(seen.body["regarding"]["kind"], "QueueScaler");
        assert_eq!(seen.body["regarding"]["name"], "jobs");
        assert_eq!(seen.body["reportingController"], "warren-controller");
        assert_eq!(seen.body["reportingInstance"], "controller-0");
        send.send_response(
            Response::builder()
                .body(Body::from(serde_json::to_vec(&seen.body).unwrap()))
                .unwrap(),
        );
        seen.body
    }

    /// The status merge patch; returns the status written.
    async fn expect_status_patch(&mut self, qs: &QueueScaler) -> QueueScalerStatus {
        let (seen, send) = self.next().await;
        assert_eq!(
            (&seen.method, seen.path.as_str()),
            (&Method::PATCH, STATUS_PATH),
            "unexpected request {seen:?}"
        );
        let status: QueueScalerStatus =
            serde_json::from_value(seen.body["status"].clone()).expect("a full status");
        let answer = with_status(qs.clone(), status.clone());
        send.send_response(
            Response::builder()
                .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                .unwrap(),
        );
        status
    }

    async fn expect_pod_list(&mut self, pods: Vec<Value>) {
        let seen = self
            .expect(
                Method::GET,
                PODS_PATH,
                json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": pods}),
            )
            .await;
        assert!(
            seen.query.contains("labelSelector=app%3Dworker"),
            "{}",
            seen.query
        );
    }

    async fn expect_pod_cost(&mut self, name: &str, cost: &str) {
        let path = format!("{PODS_PATH}/{name}");
        let seen = self
            .expect(Method::PATCH, &path, pod(name, Some(cost)))
            .await;
        assert_eq!(
            seen.body,
            json!({"metadata": {"annotations": { COST: cost }}})
        );
    }

    /// Nothing else was asked of the API server.
    async fn expect_silence(&mut self) {
        match tokio::time::timeout(Duration::from_millis(100), self.0.next_request()).await {
            Err(_) | Ok(None) => {}
            Ok(Some((request, _))) => {
                panic!("unexpected request {} {}", request.method(), request.uri())
            }
        }
    }
}

/// Runs one reconcile while `script` plays the API server.
async fn run<F>(h: &mut Harness, qs: &QueueScaler, script: F) -> Result<Action, String>
where
    F: AsyncFnOnce(&mut ApiServer),
{
    let ctx = h.ctx.clone();
    let object = Arc::new(qs.clone());
    let reconciling = tokio::spawn(async move { reconcile(object, ctx).await });
    script(&mut h.server).await;
    let result = tokio::time::timeout(Duration::from_secs(5), reconciling)
        .await
        .expect("reconcile finished")
        .unwrap();
    h.server.expect_silence().await;
    result.map_err(|e| e.to_string())
}

fn count(ctx: &Context, result: &str) -> u64 {
    ctx.metrics
        .reconciles
        .get_or_create(&ResultLabels {
            result: result.into(),
        })
        .get()
}

fn scales(ctx: &Context, direction: &str) -> u64 {
    ctx.metrics
        .scale_patches
        .get_or_create(&DirectionLabels {
            direction: direction.into(),
        })
        .get()
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn backlog_scales_up_with_scale_patch_event_audit_and_status_and_no_pod_patches() {
    let mut h = harness(FakeObserver::with(vec![observed(12, 0)]));
    let qs = scaler(json!({"messagesPerReplica": 5}));
    let mut status = None;
    let action = run(&mut h, &qs, async |api: &mut ApiServer| {
        api.expect_get_scale(1).await;
        api.expect_scale_patch(3).await;
        let event = api.expect_event("Normal", "Scaled").await;
        let note = event["note"].as_str().unwrap();
        assert!(
            note.starts_with("from 1 to 3: 12 messages at 5 per replica"),
            "{note}"
        );
        status = Some(api.expect_status_patch(&qs).await);
    })
    .await
    .unwrap();
    assert_requeued_for_the_next_tick(&action, Duration::from_secs(5));

    let status = status.unwrap();
    assert_eq!(status.observed_generation, Some(4));
    assert_eq!(status.current_replicas, Some(1));
    assert_eq!(status.desired_replicas, Some(3));
    assert_eq!(status.consecutive_failures, 0);
    assert!(status.last_scale_time.is_some());
    let decision = status.last_decision.unwrap();
    assert_eq!(
        (decision.replicas, decision.reason.as_str()),
        (3, "Backlog")
    );
    assert_eq!(status.observation.unwrap().ready, 12);
    let cond = |t: &str| {
        let c = status.conditions.iter().find(|c| c.type_ == t).unwrap();
        (format!("{:?}", c.status), c.reason.clone())
    };
    assert_eq!(cond("Ready"), ("True".into(), "MetricsAvailable".into()));
    assert_eq!(cond("Active"), ("True".into(), "ReplicasRunning".into()));
    assert_eq!(cond("Fallback").0, "False");
    assert_eq!(cond("Paused").0, "False");

    assert_eq!(h.observer.calls(), 1);
    assert_eq!(*h.observer.unacked_calls.lock().unwrap(), 0);
    let audit = h.audit.0.lock().unwrap().clone();
    assert_eq!(audit.len(), 1);
    assert_eq!((audit[0].from, audit[0].to), (1, 3));
    assert_eq!(audit[0].reason, "Backlog");
    assert_eq!(audit[0].target_name, "worker");
    assert_eq!(count(&h.ctx, "scaled"), 1);
    assert_eq!(scales(&h.ctx, "up"), 1);
}

#[tokio::test]
async fn scale_in_marks_busy_pods_expensive_and_idle_ones_cheap_before_patching_scale() {
    let source = FakeObserver::with(vec![observed(2, 1)]);
    *source.unacked.lock().unwrap() = ConnectionUnacked {
        by_connection: [
            ("worker-a".to_string(), 1),
            ("worker-b".to_string(), 0),
            ("worker-c".to_string(), 0),
        ]
        .into(),
    };
    let mut h = harness(source);
    let qs = scaler(json!({"messagesPerReplica": 5, "minReplicas": 1}));
    run(&mut h, &qs, async |api: &mut ApiServer| {
        api.expect_get_scale(3).await;
        api.expect_pod_list(vec![
            pod("worker-a", Some("0")),
            pod("worker-b", Some("0")),
            pod("worker-c", None),
        ])
        .await;
        // worker-b already carries the idle cost: not patched.
        api.expect_pod_cost("worker-a", "1001").await;
        api.expect_pod_cost("worker-c", "0").await;
        api.expect_scale_patch(1).await;
        let event = api.expect_event("Normal", "Scaled").await;
        assert!(
            event["note"].as_str().unwrap().starts_with("from 3 to 1: "),
            "{event}"
        );
        let status = api.expect_status_patch(&qs).await;
        assert_eq!(status.desired_replicas, Some(1));
    })
    .await
    .unwrap();
    assert_eq!(*h.observer.unacked_calls.lock().unwrap(), 1);
    assert_eq!(h.ctx.metrics.deletion_cost_patches.get(), 2);
    assert_eq!(scales(&h.ctx, "down"), 1);
    let audit = h.audit.0.lock().unwrap().clone();
    assert_eq!((audit[0].from, audit[0].to), (3, 1));
}

#[tokio::test]
async fn nothing_to_change_means_no_scale_patch_and_an_unchanged_status_is_not_rewritten() {
    let mut h = harness(FakeObserver::with(vec![observed(10, 0)]));
    let qs = scaler(json!({"messagesPerReplica": 5}));
    let mut written = None;
    run(&mut h, &qs, async |api: &mut ApiServer| {
        api.expect_get_scale(2).await;
        // First status: written.
        written = Some(api.expect_status_patch(&qs).await);
    })
    .await
    .unwrap();
    let written = written.unwrap();
    assert_eq!(written.desired_replicas, Some(2));
    assert_eq!(written.last_decision.as_ref().unwrap().reason, "Backlog");

    // Same queue, same replicas: only the observation time would change.
    let qs = with_status(qs, written);
    run(&mut h, &qs, async |api: &mut ApiServer| {
        api.expect_get_scale(2).await;
    })
    .await
    .unwrap();
    assert_eq!(count(&h.ctx, "unchanged"), 2);
    assert_eq!(scales(&h.ctx, "up") + scales(&h.ctx, "down"), 0);
    assert!(h.audit.0.lock().unwrap().is_empty());
}

#[tokio::test]
async fn broker_failures_hold_then_fall_back_after_the_threshold() {
    let mut h = harness(FakeObserver::with(vec![broker_down()]));
    let qs = scaler(json!({"fallback": {"failureThreshold": 3, "replicas": 2}}));

    // 1st failure: hold 1 replica, Warning event once, Ready=False.
    let mut status = None;
    run(&mut h, &qs, async |api: &mut ApiServer| {
        api.expect_get_scale(1).await;
        let event = api.expect_event("Warning", "MetricsUnavailable").await;
        assert!(
            event["note"]
                .as_str()
                .unwrap()
                .contains("connection refused")
        );
        status = Some(api.expect_status_patch(&qs).await);
    })
    .await
    .unwrap();
    let s1 = status.take().unwrap();
    assert_eq!(s1.consecutive_failures, 1);
    assert_eq!(s1.desired_replicas, Some(1));
    assert_eq!(
        s1.last_decision.as_ref().unwrap().reason,
        "MetricsUnavailable"
    );
    let ready = s1.condition("Ready").unwrap();
    assert_eq!(ready.reason, "BrokerUnavailable");

    // 2nd failure: still holding, no new Warning.
    let qs2 = with_status(qs.clone(), s1);
    run(&mut h, &qs2, async |api: &mut ApiServer| {
        api.expect_get_scale(1).await;
        status = Some(api.expect_status_patch(&qs2).await);
    })
    .await
    .unwrap();
    let s2 = status.take().unwrap();
    assert_eq!(s2.consecutive_failures, 2);

    // 3rd failure: the fallback of 2 replicas applies.
    let qs3 = with_status(qs.clone(), s2);
    run(&mut h, &qs3, async |api: &mut ApiServer| {
        api.expect_get_scale(1).await;
        api.expect_scale_patch(2).await;
        api.expect_event("Normal", "Scaled").await;
        status = Some(api.expect_status_patch(&qs3).await);
    })
    .await
    .unwrap();
    let s3 = status.take().unwrap();
    assert_eq!(s3.consecutive_failures, 3);
    assert_eq!(s3.desired_replicas, Some(2));
    assert_eq!(s3.last_decision.as_ref().unwrap().reason, "Fallback");
    let fallback = s3.condition("Fallback").unwrap();
    assert_eq!(format!("{:?}", fallback.status), "True");
    assert_eq!(h.audit.0.lock().unwrap()[0].reason, "Fallback");
    assert_eq!(count(&h.ctx, "metrics_unavailable"), 2);
    assert_eq!(count(&h.ctx, "scaled"), 1);
}

#[tokio::test]
async fn failures_continue_from_the_status_after_a_restart() {
    // A fresh controller (empty memory) sees status.consecutiveFailures = 2.
    let mut h = harness(FakeObserver::with(vec![broker_down()]));
    let qs = with_status(
        scaler(json!({"fallback": {"failureThreshold": 3, "replicas": 2}})),
        QueueScalerStatus {
            consecutive_failures: 2,
            ..QueueScalerStatus::default()
        },
    );
    run(&mut h, &qs, async |api: &mut ApiServer| {
        api.expect_get_scale(1).await;
        api.expect_scale_patch(2).await;
        api.expect_event("Normal", "Scaled").await;
        let status = api.expect_status_patch(&qs).await;
        assert_eq!(status.consecutive_failures, 3);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn at_zero_replicas_the_ready_count_activates() {
    let mut h = harness(FakeObserver::with(vec![observed(3, 0)]));
    let qs = scaler(json!({"minReplicas": 0, "activationMessages": 2}));
    run(&mut h, &qs, async |api: &mut ApiServer| {
        api.expect_get_scale(0).await;
        api.expect_scale_patch(1).await;
        api.expect_event("Normal", "Scaled").await;
        let status = api.expect_status_patch(&qs).await;
        assert_eq!(
            status.condition("Active").map(|c| c.reason.as_str()),
            Some("ReplicasRunning")
        );
    })
    .await
    .unwrap();
    assert_eq!(h.observer.calls(), 1);
}

fn observations(ctx: &Context, ready: &str, unacked: &str) -> u64 {
    ctx.metrics
        .observations
        .get_or_create(&ObservationLabels {
            ready: ready.into(),
            unacked: unacked.into(),
        })
        .get()
}

#[tokio::test]
async fn unknown_unacked_never_scales_a_running_target_to_zero_but_a_measured_zero_does() {
    // Same empty queue twice: first without an unacked count (management
    // API down), then with a measured 0.
    let mut h = harness(FakeObserver::with(vec![unacked_unknown(0), observed(0, 0)]));
    let qs = scaler(json!({"minReplicas": 0, "behavior": {"cooldownSeconds": 0}}));
    let mut written = None;
    run(&mut h, &qs, async |api: &mut ApiServer| {
        api.expect_get_scale(1).await;
        // No scale patch: held at 1.
        written = Some(api.expect_status_patch(&qs).await);
    })
    .await
    .unwrap();
    let status = written.unwrap();
    assert_eq!(status.desired_replicas, Some(1));
    let decision = status.last_decision.clone().unwrap();
    assert_eq!(
        (decision.replicas, decision.reason.as_str()),
        (1, "MetricsUnavailable")
    );
    let ready = status.condition("Ready").unwrap();
    assert_eq!(
        (format!("{:?}", ready.status), ready.reason.as_str()),
        ("True".to_string(), "MetricsPartial")
    );
    assert_eq!(status.observation.as_ref().unwrap().unacked, 0);
    assert_eq!(status.consecutive_failures, 0);
    assert_eq!(observations(&h.ctx, "passive_declare", "assumed_zero"), 1);

    let qs = with_status(qs, status);
    run(&mut h, &qs, async |api: &mut ApiServer| {
        api.expect_get_scale(1).await;
        api.expect_pod_list(vec![pod("worker-a", None)]).await;
        // No connection named worker-a: unknown to the broker, cheapest.
        api.expect_pod_cost("worker-a", "-1000").await;
        api.expect_scale_patch(0).await;
        api.expect_event("Normal", "Scaled").await;
        let status = api.expect_status_patch(&qs).await;
        assert_eq!(status.last_decision.as_ref().unwrap().reason, "QueueEmpty");
        assert_eq!(
            status.condition("Ready").unwrap().reason,
            "MetricsAvailable"
        );
    })
    .await
    .unwrap();
    assert_eq!(scales(&h.ctx, "down"), 1);
    assert_eq!(observations(&h.ctx, "management", "management"), 1);
}

fn in_flight_guard(ctx: &Context, effect: &str) -> u64 {
    ctx.metrics
        .in_flight_guard
        .get_or_create(&InFlightGuardLabels {
            effect: effect.into(),
        })
        .get()
}

#[tokio::test]
async fn jobs_just_taken_hold_the_replicas_while_the_unacked_sample_may_predate_them() {
    // Four pods, four ready jobs; then the pods take them: the passive
    // declare sees ready 0 while the management API's sample still shows
    // 0 unacked. On those counts alone the queue is empty (cooldown 0: to
    // zero at once, with four jobs in hand); the in-flight guard counts the
    // four that left ready as in flight and holds the replicas.
    let mut h = harness(FakeObserver::with(vec![declared(4, 0), declared(0, 0)]));
    let qs = scaler(json!({
        "minReplicas": 0,
        "maxReplicas": 4,
        "messagesPerReplica": 1,
        "behavior": {"cooldownSeconds": 0}
    }));
    let mut written = None;
    run(&mut h, &qs, async |api: &mut ApiServer| {
        api.expect_get_scale(4).await;
        written = Some(api.expect_status_patch(&qs).await);
    })
    .await
    .unwrap();
    let qs = with_status(qs, written.unwrap());
    run(&mut h, &qs, async |api: &mut ApiServer| {
        api.expect_get_scale(4).await;
        // No pod list, no scale patch: held at 4.
        let status = api.expect_status_patch(&qs).await;
        assert_eq!(status.desired_replicas, Some(4));
        let ready = status.condition("Ready").unwrap();
        assert_eq!(ready.reason, "MetricsAvailable");
        assert!(
            ready
                .message
                .contains("holding 4 replicas, not 0: 4 messages that just left ready"),
            "{}",
            ready.message
        );
        // The status shows the counts as measured.
        let observation = status.observation.as_ref().unwrap();
        assert_eq!((observation.ready, observation.unacked), (0, 0));
    })
    .await
    .unwrap();
    assert_eq!(scales(&h.ctx, "down"), 0);
    assert_eq!(
        (
            in_flight_guard(&h.ctx, "raised"),
            in_flight_guard(&h.ctx, "held")
        ),
        (1, 1)
    );
}

#[tokio::test]
async fn unknown_unacked_is_the_last_known_count_from_the_status() {
    // A previous status saw 7 unacked; now the management API is down and
    // the passive declare sees 3 ready: 3 + 7 counted at 5 per replica.
    let mut h = harness(FakeObserver::with(vec![unacked_unknown(3)]));
    let qs = with_status(
        scaler(json!({"messagesPerReplica": 5})),
        QueueScalerStatus {
            observation: Some(Observation::new(0, 7, 1, None, None, Utc::now())),
            ..QueueScalerStatus::default()
        },
    );
    run(&mut h, &qs, async |api: &mut ApiServer| {
        api.expect_get_scale(1).await;
        api.expect_scale_patch(2).await;
        let event = api.expect_event("Normal", "Scaled").await;
        assert!(
            event["note"]
                .as_str()
                .unwrap()
                .starts_with("from 1 to 2: 10 messages at 5 per replica"),
            "{event}"
        );
        let status = api.expect_status_patch(&qs).await;
        let observation = status.observation.as_ref().unwrap();
        assert_eq!((observation.ready, observation.unacked), (3, 7));
        assert_eq!(status.condition("Ready").unwrap().reason, "MetricsPartial");
    })
    .await
    .unwrap();
    assert_eq!(observations(&h.ctx, "passive_declare", "last_known"), 1);
}

#[tokio::test]
async fn paused_scaler_reads_nothing_and_scales_nothing() {
    let mut h = harness(FakeObserver::with(vec![observed(100, 0)]));
    let qs = scaler(json!({"paused": true}));
    run(&mut h, &qs, async |api: &mut ApiServer| {
        api.expect_get_scale(1).await;
        let status = api.expect_status_patch(&qs).await;
        let paused = status.condition("Paused").unwrap();
        assert_eq!(format!("{:?}", paused.status), "True");
        assert_eq!(status.desired_replicas, Some(1));
        assert_eq!(status.last_decision.unwrap().reason, "Paused");
    })
    .await
    .unwrap();
    assert_eq!(h.observer.calls(), 0);
    assert_eq!(count(&h.ctx, "paused"), 1);
}

#[tokio::test]
async fn invalid_spec_is_reported_once_and_requeued_slowly() {
    let mut h = harness(FakeObserver::with(vec![observed(1, 0)]));
    let qs = scaler(json!({"maxReplicas": 0}));
    let mut status = None;
    let action = run(&mut h, &qs, async |api: &mut ApiServer| {
        let event = api.expect_event("Warning", "InvalidSpec").await;
        assert!(
            event["note"].as_str().unwrap().contains("maxReplicas"),
            "{event}"
        );
        status = Some(api.expect_status_patch(&qs).await);
    })
    .await
    .unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    let status = status.unwrap();
    let ready = status.condition("Ready").unwrap();
    assert_eq!(
        (format!("{:?}", ready.status), ready.reason.as_str()),
        ("False".to_string(), "InvalidSpec")
    );
    assert_eq!(status.observed_generation, Some(4));

    // Again with that status: no second Warning, no rewrite, no scale read.
    let qs = with_status(qs, status);
    run(&mut h, &qs, async |_api: &mut ApiServer| {})
        .await
        .unwrap();
    assert_eq!(h.observer.calls(), 0);
    assert_eq!(count(&h.ctx, "invalid_spec"), 2);
}

#[tokio::test]
async fn missing_target_is_reported_not_retried_fast() {
    let mut h = harness(FakeObserver::with(vec![observed(1, 0)]));
    let qs = scaler(json!({}));
    let action = run(&mut h, &qs, async |api: &mut ApiServer| {
        let (seen, send) = api.next().await;
        assert_eq!(seen.path, SCALE_PATH);
        send.send_response(
            Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(Body::from(
                    serde_json::to_vec(&json!({
                        "kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "reason": "NotFound", "code": 404,
                        "message": "deployments.apps \"worker\" not found"
                    }))
                    .unwrap(),
                ))
                .unwrap(),
        );
        api.expect_event("Warning", "TargetNotFound").await;
        let status = api.expect_status_patch(&qs).await;
        assert_eq!(status.condition("Ready").unwrap().reason, "TargetNotFound");
    })
    .await
    .unwrap();
    assert_requeued_for_the_next_tick(&action, Duration::from_secs(5));
    assert_eq!(h.observer.calls(), 0);
}

#[tokio::test]
async fn api_errors_fail_the_reconcile_and_back_off_exponentially() {
    let mut h = harness(FakeObserver::with(vec![observed(1, 0)]));
    let qs = scaler(json!({}));
    let failing_get = async |api: &mut ApiServer| {
        let (seen, send) = api.next().await;
        assert_eq!(seen.path, SCALE_PATH);
        send.send_response(
            Response::builder()
                .status(StatusCode::INTERNAL_SERVER_ERROR)
                .body(Body::from(
                    serde_json::to_vec(&json!({
                        "kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "reason": "InternalError", "code": 500, "message": "etcd down"
                    }))
                    .unwrap(),
                ))
                .unwrap(),
        );
    };
    let mut delays = Vec::new();
    for _ in 0..3 {
        let ctx = h.ctx.clone();
        let object = Arc::new(qs.clone());
        let reconciling = tokio::spawn(async move { reconcile(object, ctx).await });
        failing_get(&mut h.server).await;
        let err = reconciling.await.unwrap().unwrap_err();
        assert_eq!(err.metric_label(), "get_scale_failed");
        assert!(err.to_string().contains("Deployment ns/worker"), "{err}");
        delays.push(error_policy(Arc::new(qs.clone()), &err, h.ctx.clone()));
    }
    assert_eq!(
        delays,
        vec![
            Action::requeue(Duration::from_secs(1)),
            Action::requeue(Duration::from_secs(2)),
            Action::requeue(Duration::from_secs(4)),
        ]
    );
    assert_eq!(count(&h.ctx, "get_scale_failed"), 3);

    // A success resets the backoff.
    run(&mut h, &qs, async |api: &mut ApiServer| {
        api.expect_get_scale(1).await;
        api.expect_status_patch(&qs).await;
    })
    .await
    .unwrap();
    let err = warren_controller::Error::MissingNamespace;
    assert_eq!(
        error_policy(Arc::new(qs.clone()), &err, h.ctx.clone()),
        Action::requeue(Duration::from_secs(1))
    );
}

#[tokio::test]
async fn statefulset_targets_use_their_scale_subresource_and_skip_deletion_costs() {
    let mut h = harness(FakeObserver::with(vec![observed(0, 0)]));
    let qs = scaler(json!({
        "scaleTargetRef": {"kind": "StatefulSet", "name": "worker"},
        "minReplicas": 1
    }));
    let path = "/apis/apps/v1/namespaces/ns/statefulsets/worker/scale";
    run(&mut h, &qs, async |api: &mut ApiServer| {
        api.expect(Method::GET, path, scale(4)).await;
        let seen = api.expect(Method::PATCH, path, scale(1)).await;
        assert_eq!(seen.body, json!({"spec": {"replicas": 1}}));
        api.expect_event("Normal", "Scaled").await;
        api.expect_status_patch(&qs).await;
    })
    .await
    .unwrap();
    assert_eq!(*h.observer.unacked_calls.lock().unwrap(), 0);
}

// ------------------------------------------------- several queues

#[tokio::test]
async fn a_scaler_over_several_queues_sizes_by_its_operation_and_shows_each_queue() {
    // jobs 12, sms 9 at 5 per replica: max counts 12 -> 3 replicas (sum would be 5).
    let mut h = harness(FakeObserver::with(vec![observed_queues(&[
        ("jobs", 12, 0),
        ("sms", 9, 0),
    ])]));
    let qs = scaler(json!({
        "messagesPerReplica": 5,
        "queue": {"names": ["sms"], "operation": "max"}
    }));
    let mut status = None;
    run(&mut h, &qs, async |api: &mut ApiServer| {
        api.expect_get_scale(1).await;
        api.expect_scale_patch(3).await;
        let event = api.expect_event("Normal", "Scaled").await;
        let note = event["note"].as_str().unwrap();
        assert!(
            note.starts_with("from 1 to 3: 12 messages at 5 per replica"),
            "{note}"
        );
        status = Some(api.expect_status_patch(&qs).await);
    })
    .await
    .unwrap();
    let status = status.unwrap();
    assert_eq!(status.queue_summary.as_deref(), Some("jobs,sms (max)"));
    let observation = status.observation.unwrap();
    assert_eq!((observation.ready, observation.unacked), (21, 0));
    let per_queue: Vec<(String, u64)> = observation
        .queues
        .iter()
        .map(|q| (q.name.clone(), q.ready))
        .collect();
    assert_eq!(
        per_queue,
        vec![("jobs".to_string(), 12), ("sms".to_string(), 9)]
    );
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert!(
        ready.message.contains("jobs,sms (max)"),
        "{}",
        ready.message
    );
    let audit = h.audit.0.lock().unwrap().clone();
    assert_eq!((audit[0].from, audit[0].to), (1, 3));
}

#[tokio::test]
async fn avg_over_several_queues_rounds_up_and_never_scales_a_waiting_message_away() {
    // jobs 12, sms 0: avg 6 -> 2 replicas (sum and max would ask for 3).
    let mut h = harness(FakeObserver::with(vec![
        observed_queues(&[("jobs", 12, 0), ("sms", 0, 0)]),
        // Later: one message left on one queue of two: avg 1 (0.5 rounded up).
        observed_queues(&[("jobs", 0, 0), ("sms", 1, 0)]),
    ]));
    let qs = scaler(json!({
        "messagesPerReplica": 5,
        "queue": {"names": ["sms"], "operation": "avg"}
    }));
    let mut written = None;
    run(&mut h, &qs, async |api: &mut ApiServer| {
        api.expect_get_scale(0).await;
        api.expect_scale_patch(2).await;
        api.expect_event("Normal", "Scaled").await;
        written = Some(api.expect_status_patch(&qs).await);
    })
    .await
    .unwrap();
    let qs = with_status(qs, written.unwrap());
    run(&mut h, &qs, async |api: &mut ApiServer| {
        api.expect_get_scale(2).await;
        api.expect_pod_list(vec![pod("worker-a", None), pod("worker-b", None)])
            .await;
        // No connection at the broker for either pod: the cheapest cost.
        api.expect_pod_cost("worker-a", "-1000").await;
        api.expect_pod_cost("worker-b", "-1000").await;
        api.expect_scale_patch(1).await;
        api.expect_event("Normal", "Scaled").await;
        let status = api.expect_status_patch(&qs).await;
        assert_eq!(status.last_decision.unwrap().reason, "Backlog");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn an_invalid_pattern_is_an_invalid_spec() {
    let mut h = harness(FakeObserver::with(vec![observed(1, 0)]));
    let qs = scaler(json!({"queue": {"pattern": "sms(["}}));
    run(&mut h, &qs, async |api: &mut ApiServer| {
        let event = api.expect_event("Warning", "InvalidSpec").await;
        let note = event["note"].as_str().unwrap();
        assert!(note.contains("queue.pattern \"sms([\""), "{note}");
        let status = api.expect_status_patch(&qs).await;
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.reason, "InvalidSpec");
    })
    .await
    .unwrap();
    assert_eq!(h.observer.calls(), 0);
}

// ------------------------------------------------ targets from the watch cache

/// The worker Deployment as the controller's watch cache holds it.
fn cached_deployment(replicas: i32, version: &str) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "worker", "namespace": NS, "resourceVersion": version},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "worker"}},
            "template": {"metadata": {"labels": {"app": "worker"}},
                         "spec": {"containers": [{"name": "w", "image": "w"}]}}
        }
    }))
    .unwrap()
}

/// Synced caches holding `deployments` (and no StatefulSet); the writer
/// applies later changes.
fn synced_caches(deployments: Vec<Deployment>) -> (TargetStores, Writer<Deployment>) {
    let (deployment_cache, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for d in deployments {
        writer.apply_watcher_event(&watcher::Event::InitApply(d));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    let (statefulset_cache, mut sts_writer) = reflector::store::<StatefulSet>();
    sts_writer.apply_watcher_event(&watcher::Event::Init);
    sts_writer.apply_watcher_event(&watcher::Event::InitDone);
    let stores = TargetStores {
        deployments: deployment_cache,
        statefulsets: statefulset_cache,
    };
    (stores, writer)
}

/// One reconcile whose only request is a status patch; `qs` with that status.
async fn only_a_status_patch(h: &mut Harness, qs: QueueScaler) -> QueueScaler {
    let mut written = None;
    run(h, &qs, async |api: &mut ApiServer| {
        written = Some(api.expect_status_patch(&qs).await);
    })
    .await
    .unwrap();
    with_status(qs, written.unwrap())
}

#[tokio::test]
async fn targets_come_from_the_watch_cache_and_a_write_is_trusted_until_the_cache_moves() {
    // 10 messages at 5 per replica: 2 wanted; then 15: 3; then 20: 4.
    let mut h = harness(FakeObserver::with(vec![
        observed(10, 0),
        observed(15, 0),
        observed(15, 0),
        observed(20, 0),
    ]));
    let (stores, mut writer) = synced_caches(vec![cached_deployment(2, "7")]);
    h.ctx.read_targets_from(stores);
    let qs = scaler(json!({"messagesPerReplica": 5}));

    // Nothing to change: no GET /scale, only the first status.
    let qs = only_a_status_patch(&mut h, qs).await;
    assert_eq!(qs.status.as_ref().unwrap().current_replicas, Some(2));

    // A backlog: the scale patch is the only target request.
    let mut written = None;
    run(&mut h, &qs, async |api: &mut ApiServer| {
        api.expect_scale_patch(3).await;
        api.expect_event("Normal", "Scaled").await;
        written = Some(api.expect_status_patch(&qs).await);
    })
    .await
    .unwrap();
    let qs = with_status(qs, written.unwrap());

    // The cache still shows version 7 with 2 replicas: the 3 written stand
    // (no second patch, no GET); the status now reports 3 current.
    let qs = only_a_status_patch(&mut h, qs).await;
    assert_eq!(qs.status.as_ref().unwrap().current_replicas, Some(3));
    assert_eq!(scales(&h.ctx, "up"), 1);

    // The watch delivers a newer version (someone scaled to 4) and 4 are
    // wanted: the cache's 4 win over the 3 written, nothing to scale.
    writer.apply_watcher_event(&watcher::Event::Apply(cached_deployment(4, "9")));
    run(&mut h, &qs, async |api: &mut ApiServer| {
        let status = api.expect_status_patch(&qs).await;
        assert_eq!(status.current_replicas, Some(4));
    })
    .await
    .unwrap();
    assert_eq!(scales(&h.ctx, "up") + scales(&h.ctx, "down"), 1);
}

#[tokio::test]
async fn a_target_missing_from_the_cache_is_read_with_one_get() {
    let mut h = harness(FakeObserver::with(vec![observed(10, 0)]));
    let (stores, _writer) = synced_caches(vec![]);
    h.ctx.read_targets_from(stores);
    let qs = scaler(json!({"messagesPerReplica": 5}));
    run(&mut h, &qs, async |api: &mut ApiServer| {
        api.expect_get_scale(2).await;
        api.expect_status_patch(&qs).await;
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_status_already_written_is_not_rewritten_while_the_cache_shows_the_old_one() {
    let mut h = harness(FakeObserver::with(vec![observed(0, 0)]));
    let qs = scaler(json!({"messagesPerReplica": 5}));
    run(&mut h, &qs, async |api: &mut ApiServer| {
        api.expect_get_scale(0).await;
        api.expect_status_patch(&qs).await;
    })
    .await
    .unwrap();
    // The watch cache has not delivered the written status yet: the next
    // tick passes the status-less object again; nothing changed, no patch.
    run(&mut h, &qs, async |api: &mut ApiServer| {
        api.expect_get_scale(0).await;
    })
    .await
    .unwrap();
    assert_eq!(count(&h.ctx, "unchanged"), 2);
}

/// A log writer into a shared buffer (the JSON lines a test reads back).
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn json_log_lines_of_a_reconcile_carry_the_scaler() {
    // The JSON format of warren_telemetry::init_tracing (`--log-format json`).
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let mut h = harness(FakeObserver::with(vec![broker_down()]));
    let qs = scaler(json!({}));
    run(&mut h, &qs, async |api: &mut ApiServer| {
        api.expect_get_scale(1).await;
        api.expect_event("Warning", "MetricsUnavailable").await;
        api.expect_status_patch(&qs).await;
    })
    .await
    .unwrap();
    let err = warren_controller::Error::MissingNamespace;
    error_policy(Arc::new(qs.clone()), &err, h.ctx.clone());

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let line = |message: &str| {
        lines
            .iter()
            .find(|l| l["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} line in {text}"))
    };
    let read_failed = line("cannot read the queue");
    assert_eq!(read_failed["span"]["name"], "reconcile");
    assert_eq!(read_failed["span"]["scaler"], "ns/jobs");
    assert_eq!(read_failed["failures_in_a_row"], 1);
    assert_eq!(line("reconcile failed")["span"]["scaler"], "ns/jobs");
}
