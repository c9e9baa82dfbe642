//! Prometheus metrics of the controller.
//!
//! One [`ControllerMetrics`] is created at start, registered in the process
//! registry (served on `/metrics` by `warren_telemetry::ops_router`) and
//! shared by the reconciler and the broker readers.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// `result` label of a reconcile: `ok` or the error's metric label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

/// `reason` label of a scaling decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// Which broker request (`queues`, `connections`, `channels`, `passive_declare`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BrokerRequestLabels {
    pub request: String,
}

/// A failed broker request and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BrokerErrorLabels {
    pub request: String,
    pub error: String,
}

/// What an AMQP open was for (`connection`, `shared_channel`, `private_channel`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AmqpOpenLabels {
    pub what: String,
}

/// Where an observation's counts came from: `ready` is `passive_declare` or
/// `management`; `unacked` is `management`, `last_known` (the management
/// API failed this tick) or `assumed_zero` (failed, and nothing known yet).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObservationLabels {
    pub ready: String,
    pub unacked: String,
}

/// Direction of a `/scale` patch (`up`, `down`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 1 ms .. ~16 s
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Every metric the controller exports (names prefixed `warren_controller_`).
#[derive(Clone)]
pub struct ControllerMetrics {
    pub reconciles: Family<ResultLabels, Counter>,
    pub reconcile_duration: HistogramFamily<ResultLabels>,
    pub decisions: Family<ReasonLabels, Counter>,
    pub broker_requests: Family<BrokerRequestLabels, Counter>,
    pub broker_request_duration: HistogramFamily<BrokerRequestLabels>,
    pub broker_errors: Family<BrokerErrorLabels, Counter>,
    /// AMQP passive declares by result (`ok` or the error label).
    pub passive_declares: Family<ResultLabels, Counter>,
    /// AMQP connections and channels opened by the queue peeker.
    pub amqp_opens: Family<AmqpOpenLabels, Counter>,
    /// Queue observations by the source of their counts.
    pub observations: Family<ObservationLabels, Counter>,
    pub scale_patches: Family<DirectionLabels, Counter>,
    pub deletion_cost_patches: Counter,
    pub audit_events_dropped: Counter,
    pub leader: Gauge,
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self {
            reconciles: Family::default(),
            reconcile_duration: Family::new_with_constructor(duration_histogram),
            decisions: Family::default(),
            broker_requests: Family::default(),
            broker_request_duration: Family::new_with_constructor(duration_histogram),
            broker_errors: Family::default(),
            passive_declares: Family::default(),
            amqp_opens: Family::default(),
            observations: Family::default(),
            scale_patches: Family::default(),
            deletion_cost_patches: Counter::default(),
            audit_events_dropped: Counter::default(),
            leader: Gauge::default(),
        }
    }
}

impl ControllerMetrics {
    /// Creates the metrics and registers them under `warren_controller_`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let r = registry.sub_registry_with_prefix("warren_controller");
        r.register(
            "reconciles",
            "Reconciles of QueueScalers by result",
            metrics.reconciles.clone(),
        );
        r.register_with_unit(
            "reconcile_duration",
            "Time spent in one reconcile, by result",
            Unit::Seconds,
            metrics.reconcile_duration.clone(),
        );
        r.register(
            "decisions",
            "Scaling decisions by reason",
            metrics.decisions.clone(),
        );
        r.register(
            "broker_requests",
            "Requests sent to RabbitMQ (management API and AMQP passive declares)",
            metrics.broker_requests.clone(),
        );
        r.register_with_unit(
            "broker_request_duration",
            "Latency of requests to RabbitMQ",
            Unit::Seconds,
            metrics.broker_request_duration.clone(),
        );
        r.register(
            "broker_errors",
            "Failed requests to RabbitMQ by request and error",
            metrics.broker_errors.clone(),
        );
        r.register(
            "passive_declares",
            "AMQP passive queue.declare reads of a queue's ready and consumer counts, by result",
            metrics.passive_declares.clone(),
        );
        r.register(
            "amqp_opens",
            "AMQP connections and channels opened for passive declares (what: connection, shared_channel, private_channel)",
            metrics.amqp_opens.clone(),
        );
        r.register(
            "observations",
            "Queue observations by where ready (passive_declare, management) and unacked (management, last_known, assumed_zero) came from",
            metrics.observations.clone(),
        );
        r.register(
            "scale_patches",
            "Patches of a target's /scale subresource by direction",
            metrics.scale_patches.clone(),
        );
        r.register(
            "deletion_cost_patches",
            "Pod deletion-cost annotations written before a scale-in",
            metrics.deletion_cost_patches.clone(),
        );
        r.register(
            "audit_events_dropped",
            "scaler.scaled audit events that could not be queued",
            metrics.audit_events_dropped.clone(),
        );
        r.register(
            "leader",
            "1 while this replica holds the leader lease (or leader election is off)",
            metrics.leader.clone(),
        );
        metrics
    }

    /// Starts timing a broker request; call [`BrokerTimer::finish`] with its outcome.
    pub fn broker_timer(&self, request: &'static str) -> BrokerTimer<'_> {
        BrokerTimer {
            metrics: self,
            request,
            started: Instant::now(),
        }
    }
}

/// Measures one broker request.
pub struct BrokerTimer<'a> {
    metrics: &'a ControllerMetrics,
    request: &'static str,
    started: Instant,
}

impl BrokerTimer<'_> {
    /// Records the request, its latency and, on failure, the error label.
    pub fn finish(self, error: Option<&str>) {
        let labels = BrokerRequestLabels {
            request: self.request.to_string(),
        };
        self.metrics.broker_requests.get_or_create(&labels).inc();
        self.metrics
            .broker_request_duration
            .get_or_create(&labels)
            .observe(self.started.elapsed().as_secs_f64());
        if let Some(error) = error {
            self.metrics
                .broker_errors
                .get_or_create(&BrokerErrorLabels {
                    request: self.request.to_string(),
                    error: error.to_string(),
                })
                .inc();
        }
    }
}
