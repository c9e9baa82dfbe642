//! One job, from delivery to ack: decode, work, ack, record.
//!
//! Each step is a small function so metrics, logs and events can be added
//! to the path without reading the consumer loop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use serde_json::{Map, Value, json};
use warren_broker::{AuditEvent, AuditSink, Envelope, EnvelopeError};

use crate::metrics::{QueueLabel, WorkerMetrics};
use crate::settle::SettleGate;

/// What every job needs; shared by the jobs in flight.
pub struct JobContext {
    /// This worker's name (the pod name), in logs and events.
    pub worker: String,
    /// Seconds of simulated work per dot in the message.
    pub seconds_per_dot: f64,
    pub audit: AuditSink,
    pub metrics: WorkerMetrics,
    /// Every ack and reject goes through it (see [`crate::settle`]).
    pub settle: SettleGate,
}

impl JobContext {
    /// Simulated work for a message with `dots` dots.
    pub fn work_duration(&self, dots: usize) -> Duration {
        let seconds = self.seconds_per_dot.max(0.0) * dots as f64;
        Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX)
    }
}

/// How a delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Worked and acked.
    Done,
    /// Not a job: rejected without requeue, so the broker dead-letters it.
    DeadLettered,
}

/// Why the broker could not be told how a delivery ended. The delivery is
/// still unacked: the broker hands it out again (at-least-once, never lost).
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct SettleError {
    what: String,
    #[source]
    source: lapin::Error,
}

/// Processes one delivery from `queue` to the end: the work, then the ack
/// (or the dead-lettering reject). Never interrupted by SIGTERM.
///
/// Runs in the span `job` (`id`, `queue`, `redelivered`), which every log
/// line of the job inherits; `id` is the envelope's (a poison message's AMQP
/// `message_id`). The `job started`, `job done` and poison lines also carry
/// `id` and `queue` (and `redelivered`) themselves, at the top of a JSON line:
/// the e2e job log (warren-e2e `JobLog`) and the worker's tests read them there.
#[tracing::instrument(
    name = "job",
    skip_all,
    fields(id = tracing::field::Empty, queue = %queue, redelivered = delivery.redelivered)
)]
pub async fn process(
    ctx: Arc<JobContext>,
    queue: Arc<str>,
    delivery: Delivery,
) -> Result<Outcome, SettleError> {
    let redelivered = delivery.redelivered;
    if redelivered {
        ctx.metrics.redelivered.inc();
    }
    let envelope = match Envelope::from_bytes(&delivery.data) {
        Ok(envelope) => envelope,
        Err(err) => {
            dead_letter(&ctx, &queue, &delivery, &err).await?;
            return Ok(Outcome::DeadLettered);
        }
    };
    tracing::Span::current().record("id", tracing::field::display(envelope.id));
    tracing::debug!(id = %envelope.id, queue = %queue, job_message = %envelope.message, redelivered, "job started");
    ctx.metrics
        .job_wait_seconds
        .get_or_create(&QueueLabel {
            queue: queue.to_string(),
        })
        .observe(waited_seconds(envelope.created_at, Utc::now()));
    let started = Instant::now();
    work(ctx.work_duration(envelope.dots())).await;
    ctx.settle
        .settle(delivery.acker.ack(BasicAckOptions::default()))
        .await
        .map_err(|source| SettleError {
            what: format!("acking job {}", envelope.id),
            source,
        })?;
    record_done(&ctx, &queue, &envelope, redelivered, started.elapsed());
    Ok(Outcome::Done)
}

/// How long a job waited in the queue: from the sender's acceptance to now.
/// Clocks of different machines may disagree a little: never negative.
fn waited_seconds(created_at: DateTime<Utc>, now: DateTime<Utc>) -> f64 {
    (now - created_at)
        .to_std()
        .map(|waited| waited.as_secs_f64())
        .unwrap_or(0.0)
}

/// The simulated work. Zero work arms no timer.
async fn work(duration: Duration) {
    if !duration.is_zero() {
        tokio::time::sleep(duration).await;
    }
}

/// After the ack: metrics, the job's one log line at info, its audit event.
fn record_done(
    ctx: &JobContext,
    queue: &str,
    envelope: &Envelope,
    redelivered: bool,
    elapsed: Duration,
) {
    let duration_ms = elapsed.as_millis() as u64;
    ctx.metrics.processed.inc();
    ctx.metrics.job_seconds.observe(elapsed.as_secs_f64());
    tracing::info!(id = %envelope.id, queue, job_message = %envelope.message, redelivered, duration_ms, "job done");
    let mut fields = worker_fields(ctx, queue);
    fields.insert("redelivered".into(), json!(redelivered));
    fields.insert("duration_ms".into(), json!(duration_ms));
    ctx.audit.emit(AuditEvent::job(
        "message.processed",
        &envelope.id.to_string(),
        fields,
    ));
}

/// A body that is not a job: reject without requeue (the broker
/// dead-letters it to `<queue>.dead`), count it, say so.
async fn dead_letter(
    ctx: &JobContext,
    queue: &str,
    delivery: &Delivery,
    err: &EnvelopeError,
) -> Result<(), SettleError> {
    let id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.to_string())
        .unwrap_or_default();
    tracing::Span::current().record("id", id.as_str());
    tracing::warn!(id = %id, queue, error = %err, "poison message: dead-lettering it");
    ctx.settle
        .settle(delivery.acker.reject(BasicRejectOptions { requeue: false }))
        .await
        .map_err(|source| SettleError {
            what: format!("rejecting poison message {id:?}"),
            source,
        })?;
    ctx.metrics.dead_lettered.inc();
    let mut fields = worker_fields(ctx, queue);
    fields.insert("reason".into(), json!(err.to_string()));
    ctx.audit
        .emit(AuditEvent::job("message.dead_lettered", &id, fields));
    Ok(())
}

/// The fields every job event of this worker carries.
fn worker_fields(ctx: &JobContext, queue: &str) -> Map<String, Value> {
    let mut fields = Map::new();
    fields.insert("worker".into(), json!(ctx.worker));
    fields.insert("queue".into(), json!(queue));
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(seconds_per_dot: f64) -> JobContext {
        JobContext {
            worker: "w".into(),
            seconds_per_dot,
            audit: AuditSink::spawn(1),
            metrics: WorkerMetrics::register(&mut Default::default()),
            settle: SettleGate::default(),
        }
    }

    #[tokio::test]
    async fn work_scales_with_dots() {
        let ctx = context(0.01);
        assert_eq!(ctx.work_duration(5), Duration::from_millis(50));
        assert_eq!(ctx.work_duration(0), Duration::ZERO);
        assert_eq!(context(-1.0).work_duration(3), Duration::ZERO);
        assert_eq!(context(1.0).work_duration(3), Duration::from_secs(3));
    }

    #[test]
    fn waited_is_the_age_at_start_and_never_negative() {
        let accepted = DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default();
        let later = accepted + chrono::Duration::milliseconds(2_500);
        assert_eq!(waited_seconds(accepted, later), 2.5);
        // A sender whose clock runs ahead of the worker's.
        assert_eq!(waited_seconds(later, accepted), 0.0);
    }
}
