//! A real Prometheus watching a real run: [`observed_load`] starts the
//! sender, [`WORKERS`] workers and the controller as processes, a private
//! RabbitMQ with its Prometheus plugin, a private Kubernetes control plane
//! (`warren_testkit::ControlPlane`: the controller's real kube-apiserver,
//! holding the QueueScalers and their Deployments; nothing runs pods there, so
//! the workers are a fixed set), and a private Debian Prometheus scraping all
//! of them every second with the chart's alert rules loaded, and drives a
//! short load. Targets are labelled as the chart's PodMonitors label them
//! (`warren_component`, `namespace`, `pod`), so the chart's dashboards and
//! alerts run unchanged.
//!
//! The load exercises every series the dashboards and alerts read: jobs of
//! one to three dots (backlog and scale-up decisions), a few refused bodies
//! (400s), one undecodable message (dead-lettered), and a second
//! QueueScaler reading a queue that does not exist (errors, fallback, not
//! Ready).

use std::ffi::OsString;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;
use warren_dashboards::prometheus::PrometheusApi;
use warren_dashboards::rules::RuleFile;
use warren_testkit::{ControlPlane, PrometheusServer, RabbitNode, RabbitOptions};

use crate::{
    Binaries, DEPLOYMENT, HarnessError, HarnessOptions, NAMESPACE, Process, SCALER, SECRET,
    base_spec, deployment_object, job, scaler_object,
};

/// The second, broken QueueScaler (its queue does not exist).
pub const BROKEN_SCALER: &str = "warren-broken";
/// Scrape and rule evaluation interval of the test Prometheus.
pub const SCRAPE_INTERVAL: &str = "1s";
/// What `$__rate_interval` stands for with a 1 s scrape (Grafana would use
/// at least four scrape intervals).
pub const RATE_INTERVAL: &str = "10s";
/// Worker processes of the run (a fixed set: the private control plane runs
/// no pods; the QueueScaler still decides and patches its Deployment).
pub const WORKERS: usize = 3;

/// How long and how hard [`observed_load`] loads the system.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Seconds of sending.
    pub load_seconds: u64,
    /// Jobs sent each second.
    pub jobs_per_second: usize,
    /// Seconds of watching after the last send (drain, scale-in).
    pub settle_seconds: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            load_seconds: 25,
            jobs_per_second: 6,
            settle_seconds: 10,
        }
    }
}

/// A finished observed run; everything stops when it is dropped.
pub struct ObservedRun {
    pub prometheus: PrometheusServer,
    pub api: PrometheusApi,
    /// The work queue.
    pub queue: String,
    /// Unix seconds when the load started and when the run ended.
    pub start: f64,
    pub end: f64,
    _processes: Processes,
}

/// What the load runs on; on drop the processes stop before the broker and
/// the control plane.
struct Processes {
    sender: Process,
    controller: Process,
    workers: Vec<Process>,
    node: RabbitNode,
    _plane: ControlPlane,
    _dir: tempfile::TempDir,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The test Prometheus' configuration: one scrape job per component,
/// labelled as the chart's PodMonitors label their targets.
fn prometheus_config(run: &Processes) -> String {
    let sender = run.sender.listen_addr;
    let controllers = format!("'{}'", run.controller.listen_addr);
    let rabbit = run
        .node
        .prometheus_url()
        .trim_start_matches("http://")
        .to_string();
    format!(
        r#"global:
  scrape_interval: {SCRAPE_INTERVAL}
  scrape_timeout: {SCRAPE_INTERVAL}
  evaluation_interval: {SCRAPE_INTERVAL}
rule_files: [rules.yaml]
scrape_configs:
  - job_name: sender
    static_configs:
      - targets: ['{sender}']
        labels: {{warren_component: sender, namespace: {NAMESPACE}, pod: warren-sender}}
  - job_name: controller
    honor_labels: true
    static_configs:
      - targets: [{controllers}]
        labels: {{warren_component: controller, namespace: {NAMESPACE}}}
  - job_name: worker
    file_sd_configs:
      - files: [workers.json]
        refresh_interval: 1s
  - job_name: rabbitmq
    static_configs:
      - targets: ['{rabbit}']
        labels: {{warren_component: rabbitmq}}
  - job_name: rabbitmq-queues
    metrics_path: /metrics/detailed
    params:
      family: [queue_coarse_metrics]
    static_configs:
      - targets: ['{rabbit}']
        labels: {{warren_component: rabbitmq-queues}}
"#,
    )
}

/// The workers as Prometheus file_sd targets, labelled like pods.
fn worker_targets(workers: &[Process]) -> Result<String, HarnessError> {
    let targets: Vec<serde_json::Value> = workers
        .iter()
        .map(|w| {
            json!({
                "targets": [w.listen_addr.to_string()],
                "labels": {"warren_component": "worker", "namespace": NAMESPACE, "pod": w.name},
            })
        })
        .collect();
    Ok(serde_json::to_string(&targets)?)
}

/// Publishes a message no worker can decode, straight to the work queue.
async fn publish_poison(node: &RabbitNode, queue: &str) -> Result<(), HarnessError> {
    let amqp = |context: &str| {
        let context = context.to_string();
        move |source| HarnessError::Amqp { context, source }
    };
    let connection = Connection::connect(&node.amqp_url(), ConnectionProperties::default())
        .await
        .map_err(amqp("connecting to publish a poison message"))?;
    let channel = connection
        .create_channel()
        .await
        .map_err(amqp("opening a channel"))?;
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            b"this is not an envelope",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .map_err(amqp("publishing the poison message"))?
        .await
        .map_err(amqp("confirming the poison message"))?;
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

/// POSTs `message` to the sender `count` times at once; each must get `status`.
async fn send(
    http: &reqwest::Client,
    sender: &Process,
    message: &str,
    count: usize,
    status: u16,
) -> Result<(), HarnessError> {
    let sends = (0..count).map(|_| async {
        let response = http
            .post(format!("{}/send", sender.base_url()))
            .json(&json!({ "message": message }))
            .send()
            .await
            .map_err(|source| HarnessError::Http {
                context: format!("POST /send {message:?}"),
                source,
            })?;
        if response.status().as_u16() != status {
            return Err(HarnessError::Other(format!(
                "{message:?} got {} instead of {status}",
                response.status()
            )));
        }
        Ok(())
    });
    futures::future::try_join_all(sends).await.map(drop)
}

fn vars(pairs: &[(&str, String)]) -> Vec<(OsString, OsString)> {
    pairs
        .iter()
        .map(|(k, v)| (OsString::from(k), OsString::from(v)))
        .collect()
}

/// The broker, the control plane with the Secret, the Deployments and the
/// QueueScalers (the real one, and one on a queue that does not exist:
/// errors, fallback, not Ready), the sender (it declares the topology), the
/// workers and the controller.
async fn start_processes(queue: &str) -> Result<Processes, HarnessError> {
    let defaults = HarnessOptions::default();
    let binaries = Binaries::locate()?;
    let dir = tempfile::Builder::new()
        .prefix("warren-observed-")
        .tempdir()
        .map_err(|source| HarnessError::Io {
            context: "creating the run directory".into(),
            source,
        })?;
    let logs = dir.path().join("logs");
    let node = RabbitNode::start(RabbitOptions {
        management: true,
        prometheus: true,
        stats_interval_ms: defaults.stats_interval_ms,
        ..RabbitOptions::default()
    })
    .await?;
    let plane = ControlPlane::start().await?;
    let client = plane.client().await?;
    let amqp = format!("amqp://127.0.0.1:{}", node.amqp_port());
    let spec = base_spec(queue, &node.management_url(), &amqp);
    let mut broken = spec.clone();
    broken.scale_target_ref.name = "warren-idle".into();
    broken.queue.name = "no-such-queue".into();
    ControlPlane::create_all(
        &client,
        vec![
            json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": SECRET, "namespace": NAMESPACE},
                "data": {"username": "Z3Vlc3Q=", "password": "Z3Vlc3Q="},
            }),
            deployment_object(DEPLOYMENT, 0, defaults.grace_seconds),
            deployment_object("warren-idle", 0, defaults.grace_seconds),
            scaler_object(SCALER, spec)?,
            scaler_object(BROKEN_SCALER, broken)?,
        ],
    )
    .await?;

    let queue_type = defaults.queue_kind.as_str().to_string();
    let mut sender = Process::spawn(
        &binaries.sender,
        "warren-sender",
        &vars(&[
            ("AMQP_URL", node.amqp_url()),
            ("WARREN_QUEUE", queue.to_string()),
            ("WARREN_QUEUE_TYPE", queue_type.clone()),
            ("WARREN_DOT_RULE_DISABLED", "true".into()),
            ("WARREN_LOG_FORMAT", "json".into()),
            ("POD_NAME", "warren-sender".into()),
        ]),
        &logs,
    )?;
    sender
        .wait_http_ok("/readyz", Duration::from_secs(30))
        .await?;
    let mut workers = Vec::new();
    for i in 0..WORKERS {
        let name = format!("{DEPLOYMENT}-{i}");
        let mut worker = Process::spawn(
            &binaries.worker,
            &name,
            &vars(&[
                ("AMQP_URL", node.amqp_url()),
                ("WARREN_QUEUE", queue.to_string()),
                ("WARREN_QUEUE_TYPE", queue_type.clone()),
                (
                    "WARREN_SECONDS_PER_DOT",
                    defaults.seconds_per_dot.to_string(),
                ),
                ("WARREN_PREFETCH", "1".into()),
                ("WARREN_LOG_FORMAT", "json".into()),
                ("POD_NAME", name.clone()),
            ]),
            &logs,
        )?;
        worker
            .wait_http_ok("/readyz", Duration::from_secs(30))
            .await?;
        workers.push(worker);
    }
    let mut controller = Process::spawn(
        &binaries.controller,
        "warren-controller",
        &vars(&[
            ("KUBECONFIG", plane.kubeconfig().display().to_string()),
            ("POD_NAME", "warren-controller".into()),
            ("POD_NAMESPACE", NAMESPACE.into()),
            ("WARREN_LEADER_ELECTION", "false".into()),
            ("WARREN_LOG_FORMAT", "json".into()),
            // Audit events (scaler.scaled) go to this broker.
            ("AMQP_URL", node.amqp_url()),
        ]),
        &logs,
    )?;
    controller
        .wait_http_ok("/healthz", Duration::from_secs(30))
        .await?;
    Ok(Processes {
        sender,
        controller,
        workers,
        node,
        _plane: plane,
        _dir: dir,
    })
}

/// Starts everything, loads it for `options.load_seconds`, lets it settle,
/// and returns the run with Prometheus still up for queries.
pub async fn observed_load(options: LoadOptions) -> Result<ObservedRun, HarnessError> {
    let queue = warren_testkit::unique_name("observed");
    let run = start_processes(&queue).await?;
    let rules = std::fs::read_to_string(RuleFile::path()).map_err(|source| HarnessError::Io {
        context: format!("reading {}", RuleFile::path().display()),
        source,
    })?;
    let config = prometheus_config(&run);
    let workers = worker_targets(&run.workers)?;
    let prometheus = PrometheusServer::start(
        &config,
        &[
            ("rules.yaml", rules.as_str()),
            ("workers.json", workers.as_str()),
        ],
    )
    .await?;
    let api = PrometheusApi::new(prometheus.url())
        .map_err(|e| HarnessError::Other(format!("Prometheus client: {e}")))?;

    let http = crate::http_client()?;
    let start = unix_now();
    publish_poison(&run.node, &queue).await?;
    send(&http, &run.sender, "   ", 3, 400).await?;
    let began = Instant::now();
    for second in 0..options.load_seconds {
        // Each second's jobs go out at a phase that moves through the second
        // (golden-ratio steps): the controller ticks exactly once a second,
        // and sends at a fixed phase could always fall between two ticks'
        // reads, leaving a scaler that never sees the backlog.
        let phase = Duration::from_secs_f64((second as f64 * 0.618_034).fract());
        if let Some(wait) = (Duration::from_secs(second) + phase).checked_sub(began.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        let messages: Vec<String> = (0..options.jobs_per_second)
            .map(|i| job(1 + (i + second as usize) % 3))
            .collect();
        futures::future::try_join_all(
            messages
                .iter()
                .map(|message| send(&http, &run.sender, message, 1, 202)),
        )
        .await?;
    }
    tokio::time::sleep(Duration::from_secs(options.settle_seconds)).await;
    Ok(ObservedRun {
        prometheus,
        api,
        queue,
        start,
        end: unix_now(),
        _processes: run,
    })
}
