//! The worker's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The queue a job came from (bounded: the queues the worker consumes).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    pub queue: String,
}

#[derive(Clone)]
pub struct WorkerMetrics {
    pub processed: Counter,
    pub dead_lettered: Counter,
    pub redelivered: Counter,
    pub reconnects: Counter,
    pub busy: Gauge,
    pub broker_blocked: Gauge,
    pub jobs_in_hand: Gauge,
    pub job_seconds: Histogram,
    pub job_wait_seconds: Family<QueueLabel, Histogram>,
}

impl WorkerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            processed: Counter::default(),
            dead_lettered: Counter::default(),
            redelivered: Counter::default(),
            reconnects: Counter::default(),
            busy: Gauge::default(),
            broker_blocked: Gauge::default(),
            jobs_in_hand: Gauge::default(),
            // 1 ms .. ~65 s
            job_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            // 10 ms .. ~87 min
            job_wait_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.01, 2.0, 20))
            }),
        };
        warren_telemetry::register_process_start_time(registry);
        registry.register(
            "warren_worker_broker_blocked",
            "1 while RabbitMQ blocks the worker's connection (memory or disk alarm; nothing it writes, acks included, is read)",
            metrics.broker_blocked.clone(),
        );
        registry.register(
            "warren_worker_jobs_processed",
            "Jobs processed and acked",
            metrics.processed.clone(),
        );
        registry.register(
            "warren_worker_jobs_dead_lettered",
            "Poison messages rejected to the dead-letter queue",
            metrics.dead_lettered.clone(),
        );
        registry.register(
            "warren_worker_jobs_redelivered",
            "Deliveries the broker marked as redelivered",
            metrics.redelivered.clone(),
        );
        registry.register(
            "warren_worker_reconnects",
            "Broker connections lost or refused",
            metrics.reconnects.clone(),
        );
        registry.register(
            "warren_worker_busy",
            "1 while any job is in hand",
            metrics.busy.clone(),
        );
        registry.register(
            "warren_worker_jobs_in_hand",
            "Jobs being worked on now (at most WARREN_CONCURRENCY)",
            metrics.jobs_in_hand.clone(),
        );
        registry.register(
            "warren_worker_job_seconds",
            "Job processing time",
            metrics.job_seconds.clone(),
        );
        registry.register(
            "warren_worker_job_wait_seconds",
            "Time a job waited between the sender accepting it and a worker starting it (the age of the oldest jobs being taken)",
            metrics.job_wait_seconds.clone(),
        );
        metrics
    }
}
