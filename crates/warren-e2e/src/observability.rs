//! A real Prometheus watching a real run: [`observed_load`] starts a
//! [`Harness`] (sender, autoscaled workers, controller, a private RabbitMQ
//! with its Prometheus plugin), a private Debian Prometheus scraping all of
//! them every second with the chart's alert rules loaded, and drives a short
//! load. Targets are labelled as the chart's PodMonitors label them
//! (`warren_component`, `namespace`, `pod`), so the chart's dashboards and
//! alerts run unchanged.
//!
//! The load exercises every series the dashboards and alerts read: jobs of
//! one to three dots (backlog, scale-up and scale-in), a few refused bodies
//! (400s), one undecodable message (dead-lettered), and a second
//! QueueScaler reading a queue that does not exist (errors, fallback, not
//! Ready).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;
use warren_dashboards::prometheus::PrometheusApi;
use warren_dashboards::rules::RuleFile;
use warren_testkit::PrometheusServer;

use crate::{Harness, HarnessError, HarnessOptions, NAMESPACE, deployment_object, job};

/// The second, broken QueueScaler (its queue does not exist).
pub const BROKEN_SCALER: &str = "warren-broken";
/// Scrape and rule evaluation interval of the test Prometheus.
pub const SCRAPE_INTERVAL: &str = "1s";
/// What `$__rate_interval` stands for with a 1 s scrape (Grafana would use
/// at least four scrape intervals).
pub const RATE_INTERVAL: &str = "10s";

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
    pub harness: Harness,
    /// Unix seconds when the load started and when the run ended.
    pub start: f64,
    pub end: f64,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The test Prometheus' configuration: one scrape job per component,
/// labelled as the chart's PodMonitors label their targets.
pub fn prometheus_config(harness: &Harness) -> String {
    let sender = harness.sender.listen_addr;
    let controllers: Vec<String> = harness
        .controllers
        .iter()
        .map(|c| format!("'{}'", c.listen_addr))
        .collect();
    let rabbit = harness
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
        controllers = controllers.join(", ")
    )
}

/// Writes the worker pods (file_sd) as Prometheus should see them now.
fn write_worker_targets(
    prometheus: &PrometheusServer,
    harness: &Harness,
) -> Result<(), HarnessError> {
    let pods = harness
        .workers
        .as_ref()
        .map(|w| w.pods())
        .unwrap_or_default();
    let targets: Vec<serde_json::Value> = pods
        .iter()
        .map(|p| {
            json!({
                "targets": [p.listen_addr.to_string()],
                "labels": {"warren_component": "worker", "namespace": NAMESPACE, "pod": p.name},
            })
        })
        .collect();
    prometheus.write_file("workers.json", &serde_json::to_string(&targets)?)?;
    Ok(())
}

/// Publishes a message no worker can decode, straight to the work queue.
async fn publish_poison(harness: &Harness) -> Result<(), HarnessError> {
    let amqp = |context: &str| {
        let context = context.to_string();
        move |source| HarnessError::Amqp { context, source }
    };
    let connection = Connection::connect(&harness.node.amqp_url(), ConnectionProperties::default())
        .await
        .map_err(amqp("connecting to publish a poison message"))?;
    let channel = connection
        .create_channel()
        .await
        .map_err(amqp("opening a channel"))?;
    channel
        .basic_publish(
            "".into(),
            harness.queue.as_str().into(),
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

/// POSTs bodies the sender refuses (blank message: 400).
async fn send_refused(harness: &Harness, count: usize) -> Result<(), HarnessError> {
    let http = crate::http_client()?;
    for _ in 0..count {
        let response = http
            .post(format!("{}/send", harness.sender.base_url()))
            .json(&json!({"message": "   "}))
            .send()
            .await
            .map_err(|source| HarnessError::Http {
                context: "POST /send with a blank message".into(),
                source,
            })?;
        if response.status().as_u16() != 400 {
            return Err(HarnessError::Other(format!(
                "a blank message got {} instead of 400",
                response.status()
            )));
        }
    }
    Ok(())
}

/// Starts everything, loads it for `options.load_seconds`, lets it settle,
/// and returns the run with Prometheus still up for queries.
pub async fn observed_load(options: LoadOptions) -> Result<ObservedRun, HarnessError> {
    let harness = Harness::start(HarnessOptions {
        rabbit_prometheus: true,
        ..HarnessOptions::default()
    })
    .await?;

    // A QueueScaler that cannot read its queue: errors, fallback, not Ready.
    harness
        .put_deployment(deployment_object("warren-idle", 0, 30))
        .await?;
    let mut broken = harness.default_spec();
    broken.scale_target_ref.name = "warren-idle".into();
    broken.queue.name = "no-such-queue".into();
    harness.put_scaler(BROKEN_SCALER, broken).await?;

    let rules = std::fs::read_to_string(RuleFile::path()).map_err(|source| HarnessError::Io {
        context: format!("reading {}", RuleFile::path().display()),
        source,
    })?;
    let config = prometheus_config(&harness);
    let prometheus = PrometheusServer::start(
        &config,
        &[("rules.yaml", rules.as_str()), ("workers.json", "[]")],
    )
    .await?;
    let api = PrometheusApi::new(prometheus.url())
        .map_err(|e| HarnessError::Other(format!("Prometheus client: {e}")))?;

    let start = unix_now();
    publish_poison(&harness).await?;
    send_refused(&harness, 3).await?;
    let began = Instant::now();
    for second in 0..options.load_seconds {
        let messages: Vec<String> = (0..options.jobs_per_second)
            .map(|i| job(1 + (i + second as usize) % 3))
            .collect();
        harness.send_messages(&messages).await?;
        write_worker_targets(&prometheus, &harness)?;
        let next = Duration::from_secs(second + 1);
        if let Some(wait) = next.checked_sub(began.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(options.settle_seconds) {
        write_worker_targets(&prometheus, &harness)?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(ObservedRun {
        prometheus,
        api,
        harness,
        start,
        end: unix_now(),
    })
}
