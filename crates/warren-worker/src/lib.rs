//! warren-worker: consumes jobs one at a time and never loses one.
//!
//! - Prefetch (default 1) per consumer, manual ack after the work is done.
//! - Simulated work: `seconds_per_dot` seconds per dot in the message.
//! - SIGTERM: stop taking jobs, finish the one in hand, ack it, close, exit 0.
//! - Broker loss: reconnect with backoff. Unacked jobs go back to the queue
//!   (the broker redelivers them); the worker keeps nothing across reconnects.
//! - Poison: a body that is not a job envelope is rejected without requeue,
//!   so the broker dead-letters it to `<queue>.dead`. A job that keeps
//!   crashing its workers is dead-lettered by the quorum queue's delivery limit.
//! - The AMQP connection is named after `POD_NAME`, which is how the
//!   controller tells busy pods from idle ones.

pub mod metrics;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection};
use serde_json::{Map, json};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;
use warren_broker::connect::{Backoff, close_quietly, redact_url};
use warren_broker::{AuditEvent, AuditSink, BrokerArgs, Envelope, Topology, connect};
use warren_telemetry::{LogArgs, Readiness};

use crate::metrics::WorkerMetrics;

/// Command-line flags and environment variables.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "warren-worker",
    version,
    about = "Consumes warren jobs one at a time; acks after the work; never loses one"
)]
pub struct Args {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// HTTP listen address for /healthz, /readyz and /metrics.
    #[arg(long, env = "WARREN_LISTEN_ADDR", default_value = "0.0.0.0:9090")]
    pub listen_addr: SocketAddr,
    /// Seconds of simulated work per dot in the message.
    #[arg(long, env = "WARREN_SECONDS_PER_DOT", default_value_t = 1.0)]
    pub seconds_per_dot: f64,
    /// Unacked jobs the broker may hand this worker at once.
    #[arg(long, env = "WARREN_PREFETCH", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,
    /// This worker's name: its AMQP connection name and consumer tag (the pod name on Kubernetes).
    #[arg(long, env = "POD_NAME", default_value = "warren-worker")]
    pub pod_name: String,
    /// First delay before reconnecting to the broker, in milliseconds (doubles up to the max).
    #[arg(long, env = "WARREN_RECONNECT_MIN_MS", default_value_t = 200)]
    pub reconnect_min_ms: u64,
    /// Longest delay between reconnect attempts, in milliseconds.
    #[arg(long, env = "WARREN_RECONNECT_MAX_MS", default_value_t = 5000)]
    pub reconnect_max_ms: u64,
    #[command(flatten)]
    pub log: LogArgs,
}

impl Args {
    /// Simulated work for a message with `dots` dots.
    pub fn work_duration(&self, dots: usize) -> Duration {
        let seconds = self.seconds_per_dot.max(0.0) * dots as f64;
        Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX)
    }
}

/// Why a consuming session ended.
enum SessionEnd {
    Shutdown,
    Lost(String),
}

/// Consumes until `shutdown` fires (after finishing the job in hand).
pub async fn run(
    args: Args,
    metrics: WorkerMetrics,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let topology = Topology::new(vec![args.broker.queue.clone()], args.broker.queue_type);
    let audit_channel: Arc<Mutex<Option<Channel>>> = Arc::default();
    let audit_source = audit_channel.clone();
    let audit = AuditSink::spawn(1000, move || {
        audit_source.lock().ok().and_then(|guard| guard.clone())
    });
    let mut backoff = Backoff::new(
        Duration::from_millis(args.reconnect_min_ms.max(1)),
        Duration::from_millis(args.reconnect_max_ms.max(args.reconnect_min_ms).max(1)),
    );
    let url = redact_url(&args.broker.amqp_url);
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            connected = connect(&args.broker.amqp_url, &args.pod_name, Duration::from_secs(10)) => connected,
        };
        let end = match connected {
            Ok(connection) => {
                tracing::info!(url = %url, queue = %args.broker.queue, prefetch = args.prefetch, "connected");
                let blocked = tokio::spawn(follow_blocked(
                    connection.events_listener(),
                    metrics.broker_blocked.clone(),
                ));
                let end = serve(
                    &args,
                    &connection,
                    &topology,
                    &audit,
                    &audit_channel,
                    &metrics,
                    &readiness,
                    &shutdown,
                )
                .await;
                // A session that got as far as consuming was healthy: the
                // next reconnect starts from the shortest delay again.
                if readiness.is_ready() {
                    backoff.reset();
                }
                readiness.set(false);
                blocked.abort();
                metrics.broker_blocked.set(0);
                if let Ok(mut guard) = audit_channel.lock() {
                    *guard = None;
                }
                close_quietly(&connection).await;
                end
            }
            Err(err) => SessionEnd::Lost(err.to_string()),
        };
        match end {
            SessionEnd::Shutdown => {
                tracing::info!("stopped consuming; exiting");
                return Ok(());
            }
            SessionEnd::Lost(reason) => {
                metrics.reconnects.inc();
                let delay = backoff.next_delay();
                tracing::warn!(reason = %reason, retry_in = ?delay, "broker connection lost or refused; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    args: &Args,
    connection: &Connection,
    topology: &Topology,
    audit: &AuditSink,
    audit_channel: &Mutex<Option<Channel>>,
    metrics: &WorkerMetrics,
    readiness: &Readiness,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let setup = async {
        let channel = connection.create_channel().await?;
        topology.declare(&channel).await.map_err(|err| err.source)?;
        channel
            .basic_qos(args.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                ShortString::from(args.broker.queue.as_str()),
                ShortString::from(args.pod_name.as_str()),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let events = connection.create_channel().await?;
        Ok::<_, lapin::Error>((channel, consumer, events))
    };
    let (channel, mut consumer, events) = match setup.await {
        Ok(parts) => parts,
        Err(err) => return SessionEnd::Lost(format!("setting up the consumer: {err}")),
    };
    if let Ok(mut guard) = audit_channel.lock() {
        *guard = Some(events);
    }
    readiness.set(true);
    tracing::info!(queue = %args.broker.queue, consumer = %args.pod_name, "waiting for jobs");
    loop {
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                // No job in hand: stop the consumer and leave. Anything the
                // broker pushed meanwhile is unacked and goes back to the queue
                // when the channel closes.
                stop_consuming(&channel, &args.pod_name).await;
                close_channel(&channel).await;
                return SessionEnd::Shutdown;
            }
            next = consumer.next() => next,
        };
        let delivery = match next {
            None => return SessionEnd::Lost("the broker cancelled the consumer".into()),
            Some(Err(err)) => return SessionEnd::Lost(format!("consumer error: {err}")),
            Some(Ok(delivery)) => delivery,
        };
        // The job in hand always runs to its ack. A SIGTERM meanwhile cancels
        // the consumer at once, before the ack, so the broker has no chance
        // to push this worker another job that would only come back
        // redelivered when the channel closes.
        let handling = handle(args, delivery, audit, metrics);
        tokio::pin!(handling);
        let finished = tokio::select! {
            result = &mut handling => Some(result),
            _ = shutdown.cancelled() => None,
        };
        let result = match finished {
            Some(result) => result,
            None => {
                tracing::info!("SIGTERM: no more jobs; finishing the one in hand");
                stop_consuming(&channel, &args.pod_name).await;
                handling.await
            }
        };
        if let Err(reason) = result {
            return SessionEnd::Lost(reason);
        }
        if shutdown.is_cancelled() {
            stop_consuming(&channel, &args.pod_name).await;
            close_channel(&channel).await;
            return SessionEnd::Shutdown;
        }
    }
}

/// Logs RabbitMQ's `connection.blocked`/`unblocked` and mirrors it in the
/// `warren_worker_broker_blocked` gauge. This connection publishes audit
/// events, so an alarm blocks it, and a blocked connection's acks wait too.
async fn follow_blocked(
    events: impl futures::Stream<Item = lapin::Event>,
    gauge: prometheus_client::metrics::gauge::Gauge,
) {
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        if let Some(blocked) = warren_broker::blocked_transition(&event, "worker") {
            gauge.set(i64::from(blocked));
        }
    }
}

/// Cancels the consumer (tag = pod name): the broker sends no more jobs.
async fn stop_consuming(channel: &Channel, consumer_tag: &str) {
    let _ = channel
        .basic_cancel(
            ShortString::from(consumer_tag),
            BasicCancelOptions::default(),
        )
        .await;
}

/// Closes the channel; unacked deliveries go back to the queue.
async fn close_channel(channel: &Channel) {
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        channel.close(200, "shutting down".into()),
    )
    .await;
}

/// Processes one delivery to the end: the work, then the ack (or the
/// dead-lettering reject). Never interrupted by SIGTERM.
async fn handle(
    args: &Args,
    delivery: Delivery,
    audit: &AuditSink,
    metrics: &WorkerMetrics,
) -> Result<(), String> {
    let redelivered = delivery.redelivered;
    if redelivered {
        metrics.redelivered.inc();
    }
    let envelope = match Envelope::from_bytes(&delivery.data) {
        Ok(envelope) => envelope,
        Err(err) => {
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
                .unwrap_or_default();
            tracing::warn!(id = %id, error = %err, "poison message: dead-lettering it");
            delivery
                .acker
                .reject(BasicRejectOptions { requeue: false })
                .await
                .map_err(|err| format!("rejecting a poison message: {err}"))?;
            metrics.dead_lettered.inc();
            let mut fields = Map::new();
            fields.insert("worker".into(), json!(args.pod_name));
            fields.insert("queue".into(), json!(args.broker.queue));
            fields.insert("reason".into(), json!(err.to_string()));
            audit.emit(AuditEvent::job("message.dead_lettered", &id, fields));
            return Ok(());
        }
    };
    let id = envelope.id.to_string();
    tracing::info!(id = %id, job_message = %envelope.message, redelivered, "job started");
    metrics.busy.set(1);
    let started = Instant::now();
    tokio::time::sleep(args.work_duration(envelope.dots())).await;
    let acked = delivery.acker.ack(BasicAckOptions::default()).await;
    metrics.busy.set(0);
    let elapsed = started.elapsed();
    if let Err(err) = acked {
        // The broker will redeliver it: at-least-once, never lost.
        return Err(format!("acking job {id}: {err}"));
    }
    metrics.processed.inc();
    metrics.job_seconds.observe(elapsed.as_secs_f64());
    tracing::info!(id = %id, job_message = %envelope.message, redelivered, duration_ms = elapsed.as_millis() as u64, "job done");
    let mut fields = Map::new();
    fields.insert("worker".into(), json!(args.pod_name));
    fields.insert("queue".into(), json!(args.broker.queue));
    fields.insert("redelivered".into(), json!(redelivered));
    fields.insert("duration_ms".into(), json!(elapsed.as_millis() as u64));
    audit.emit(AuditEvent::job("message.processed", &id, fields));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn defaults_match_the_contract() {
        let args = Args::try_parse_from(["warren-worker"]).unwrap();
        assert_eq!(args.broker.queue, "tasks");
        assert_eq!(args.prefetch, 1);
        assert_eq!(args.listen_addr.port(), 9090);
        assert_eq!(args.work_duration(3), Duration::from_secs(3));
    }

    #[test]
    fn work_scales_with_dots_and_prefetch_zero_is_refused() {
        let args = Args::try_parse_from(["warren-worker", "--seconds-per-dot", "0.01"]).unwrap();
        assert_eq!(args.work_duration(5), Duration::from_millis(50));
        assert_eq!(args.work_duration(0), Duration::ZERO);
        assert!(Args::try_parse_from(["warren-worker", "--prefetch", "0"]).is_err());
    }
}
