//! Prometheus metrics of the controller.
//!
//! One [`ControllerMetrics`] is created at start, registered in the process
//! registry (served on `/metrics` by `warren_telemetry::ops_router`) and
//! shared by the reconciler and the broker readers.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use warren_crd::{ConditionStatus, QueueScalerStatus, condition_type};

/// Error labels used, per (namespace, name) of a QueueScaler.
type ErrorLabelsSeen = HashMap<(String, String), BTreeSet<&'static str>>;

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// `result` label of a reconcile: `ok` or the error's metric label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

/// One QueueScaler: the labels of its per-scaler gauges. Bounded by the
/// number of QueueScaler objects; the series go when the object does.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScalerLabels {
    pub namespace: String,
    pub name: String,
}

/// A scaling decision of one QueueScaler and its `reason` (a
/// `warren_scaling::Reason` label: a fixed set).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

/// A failure while reconciling one QueueScaler: a queue read that failed
/// (the `ObserveError` label) or a failed reconcile (the `Error` label).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScalerErrorLabels {
    pub namespace: String,
    pub name: String,
    pub error: String,
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

/// What the in-flight guard did: `raised` (an observation's unacked count
/// was raised: messages that just left ready counted as in flight) or
/// `held` (a decision kept more replicas than the measured counts alone).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InFlightGuardLabels {
    pub effect: String,
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
    /// Reconciles the in-flight guard acted on, by effect.
    pub in_flight_guard: Family<InFlightGuardLabels, Counter>,
    pub scale_patches: Family<DirectionLabels, Counter>,
    pub deletion_cost_patches: Counter,
    pub audit_events_dropped: Counter,
    pub leader: Gauge,
    /// The per-QueueScaler view: what the last reconcile saw and decided.
    pub scaler: ScalerMetrics,
    pub scaler_errors: Family<ScalerErrorLabels, Counter>,
    /// Error labels each scaler has used, so [`Self::forget_scaler`] can
    /// remove its series.
    scaler_error_labels: Arc<Mutex<ErrorLabelsSeen>>,
}

/// Gauges per QueueScaler (labels [`ScalerLabels`]), set from the status
/// each reconcile computes, so they always agree with `kubectl get qs`.
#[derive(Clone, Default)]
pub struct ScalerMetrics {
    pub ready_messages: Family<ScalerLabels, Gauge>,
    pub unacked_messages: Family<ScalerLabels, Gauge>,
    pub consumers: Family<ScalerLabels, Gauge>,
    pub current_replicas: Family<ScalerLabels, Gauge>,
    pub desired_replicas: Family<ScalerLabels, Gauge>,
    /// Condition Ready (1 true, 0 otherwise).
    pub ready: Family<ScalerLabels, Gauge>,
    /// Condition Active.
    pub active: Family<ScalerLabels, Gauge>,
    /// Condition Fallback.
    pub fallback: Family<ScalerLabels, Gauge>,
    /// Condition Paused.
    pub paused: Family<ScalerLabels, Gauge>,
    /// Failed queue reads in a row.
    pub consecutive_failures: Family<ScalerLabels, Gauge>,
}

impl ScalerMetrics {
    fn families(&self) -> [(&'static str, &'static str, &Family<ScalerLabels, Gauge>); 10] {
        [
            (
                "scaler_ready_messages",
                "Messages ready in the scaler's queue at the last observation",
                &self.ready_messages,
            ),
            (
                "scaler_unacked_messages",
                "Messages delivered and not yet acknowledged at the last observation",
                &self.unacked_messages,
            ),
            (
                "scaler_consumers",
                "Consumers on the scaler's queue at the last observation",
                &self.consumers,
            ),
            (
                "scaler_current_replicas",
                "Replicas of the scale target when last reconciled",
                &self.current_replicas,
            ),
            (
                "scaler_desired_replicas",
                "Replicas the last decision wants",
                &self.desired_replicas,
            ),
            (
                "scaler_ready",
                "1 while the QueueScaler's Ready condition is True",
                &self.ready,
            ),
            (
                "scaler_active",
                "1 while the QueueScaler's Active condition is True (the target runs)",
                &self.active,
            ),
            (
                "scaler_fallback",
                "1 while the QueueScaler's Fallback condition is True (metrics missing)",
                &self.fallback,
            ),
            (
                "scaler_paused",
                "1 while the QueueScaler is paused",
                &self.paused,
            ),
            (
                "scaler_consecutive_failures",
                "Failed queue reads in a row",
                &self.consecutive_failures,
            ),
        ]
    }
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
            in_flight_guard: Family::default(),
            scale_patches: Family::default(),
            deletion_cost_patches: Counter::default(),
            audit_events_dropped: Counter::default(),
            leader: Gauge::default(),
            scaler: ScalerMetrics::default(),
            scaler_errors: Family::default(),
            scaler_error_labels: Arc::default(),
        }
    }
}

impl ControllerMetrics {
    /// Creates the metrics and registers them under `warren_controller_`.
    pub fn register(registry: &mut Registry) -> Self {
        warren_telemetry::register_process_start_time(registry);
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
            "Scaling decisions by QueueScaler and reason",
            metrics.decisions.clone(),
        );
        metrics.register_broker_reads(r);
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
        for (name, help, family) in metrics.scaler.families() {
            r.register(name, help, family.clone());
        }
        r.register(
            "scaler_errors",
            "Failed queue reads and failed reconciles by QueueScaler and error",
            metrics.scaler_errors.clone(),
        );
        metrics
    }

    /// The metrics of the reads from RabbitMQ.
    fn register_broker_reads(&self, r: &mut Registry) {
        r.register(
            "broker_requests",
            "Requests sent to RabbitMQ (management API and AMQP passive declares)",
            self.broker_requests.clone(),
        );
        r.register_with_unit(
            "broker_request_duration",
            "Latency of requests to RabbitMQ",
            Unit::Seconds,
            self.broker_request_duration.clone(),
        );
        r.register(
            "broker_errors",
            "Failed requests to RabbitMQ by request and error",
            self.broker_errors.clone(),
        );
        r.register(
            "passive_declares",
            "AMQP passive queue.declare reads of a queue's ready and consumer counts, by result",
            self.passive_declares.clone(),
        );
        r.register(
            "amqp_opens",
            "AMQP connections and channels opened for passive declares (what: connection, shared_channel, private_channel)",
            self.amqp_opens.clone(),
        );
        r.register(
            "observations",
            "Queue observations by where ready (passive_declare, management) and unacked (management, last_known, assumed_zero) came from",
            self.observations.clone(),
        );
        r.register(
            "in_flight_guard",
            "Reconciles where messages that just left ready were counted as in flight because the management API's unacked count may predate them (effect: raised = the count was raised, held = a decision kept more replicas than the measured counts alone)",
            self.in_flight_guard.clone(),
        );
    }

    /// Counts one act of the in-flight guard (`raised` or `held`).
    pub fn record_in_flight_guard(&self, effect: &'static str) {
        self.in_flight_guard
            .get_or_create(&InFlightGuardLabels {
                effect: effect.to_string(),
            })
            .inc();
    }

    /// Sets the per-scaler gauges from the status a reconcile computed.
    pub fn record_status(&self, namespace: &str, name: &str, status: &QueueScalerStatus) {
        let labels = ScalerLabels {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        let set = |family: &Family<ScalerLabels, Gauge>, value: i64| {
            family.get_or_create(&labels).set(value);
        };
        let s = &self.scaler;
        if let Some(o) = &status.observation {
            set(&s.ready_messages, saturating_i64(o.ready));
            set(&s.unacked_messages, saturating_i64(o.unacked));
            set(&s.consumers, saturating_i64(o.consumers));
        }
        if let Some(current) = status.current_replicas {
            set(&s.current_replicas, i64::from(current));
        }
        if let Some(desired) = status.desired_replicas {
            set(&s.desired_replicas, i64::from(desired));
        }
        let is_true = |type_: &str| {
            i64::from(
                status
                    .condition(type_)
                    .is_some_and(|c| c.status == ConditionStatus::True),
            )
        };
        set(&s.ready, is_true(condition_type::READY));
        set(&s.active, is_true(condition_type::ACTIVE));
        set(&s.fallback, is_true(condition_type::FALLBACK));
        set(&s.paused, is_true(condition_type::PAUSED));
        set(
            &s.consecutive_failures,
            i64::from(status.consecutive_failures),
        );
    }

    /// Counts one decision of a scaler.
    pub fn record_decision(&self, namespace: &str, name: &str, reason: &'static str) {
        self.decisions
            .get_or_create(&ReasonLabels {
                namespace: namespace.to_string(),
                name: name.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Counts one failure of a scaler (`error`: a bounded error label).
    pub fn record_scaler_error(&self, namespace: &str, name: &str, error: &'static str) {
        self.scaler_error_labels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((namespace.to_string(), name.to_string()))
            .or_default()
            .insert(error);
        self.scaler_errors
            .get_or_create(&ScalerErrorLabels {
                namespace: namespace.to_string(),
                name: name.to_string(),
                error: error.to_string(),
            })
            .inc();
    }

    /// Drops every series of a scaler that no longer exists.
    pub fn forget_scaler(&self, namespace: &str, name: &str) {
        let labels = ScalerLabels {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        for (_, _, family) in self.scaler.families() {
            family.remove(&labels);
        }
        for reason in warren_scaling::Reason::LABELS {
            self.decisions.remove(&ReasonLabels {
                namespace: namespace.to_string(),
                name: name.to_string(),
                reason: (*reason).to_string(),
            });
        }
        let seen = self
            .scaler_error_labels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(namespace.to_string(), name.to_string()))
            .unwrap_or_default();
        for error in seen {
            self.scaler_errors.remove(&ScalerErrorLabels {
                namespace: namespace.to_string(),
                name: name.to_string(),
                error: error.to_string(),
            });
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use warren_crd::{Condition, Observation};

    fn encode(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    }

    #[test]
    fn per_scaler_series_follow_the_status_and_go_with_the_scaler() {
        let mut registry = Registry::default();
        let metrics = ControllerMetrics::register(&mut registry);
        let now = Utc::now();
        let mut status = QueueScalerStatus {
            observation: Some(Observation::new(12, 3, 2, None, None, now)),
            current_replicas: Some(2),
            desired_replicas: Some(4),
            consecutive_failures: 0,
            ..QueueScalerStatus::default()
        };
        status.set_condition(Condition::new(
            condition_type::READY,
            ConditionStatus::True,
            "Observed",
            "",
            now,
        ));
        status.set_condition(Condition::new(
            condition_type::FALLBACK,
            ConditionStatus::False,
            "MetricsAvailable",
            "",
            now,
        ));
        metrics.record_status("team-a", "jobs", &status);
        metrics.record_decision("team-a", "jobs", "Backlog");
        metrics.record_scaler_error("team-a", "jobs", "timeout");
        metrics.record_status("team-b", "other", &QueueScalerStatus::default());

        let text = encode(&registry);
        for series in [
            r#"warren_controller_scaler_ready_messages{namespace="team-a",name="jobs"} 12"#,
            r#"warren_controller_scaler_unacked_messages{namespace="team-a",name="jobs"} 3"#,
            r#"warren_controller_scaler_current_replicas{namespace="team-a",name="jobs"} 2"#,
            r#"warren_controller_scaler_desired_replicas{namespace="team-a",name="jobs"} 4"#,
            r#"warren_controller_scaler_ready{namespace="team-a",name="jobs"} 1"#,
            r#"warren_controller_scaler_fallback{namespace="team-a",name="jobs"} 0"#,
            r#"warren_controller_scaler_active{namespace="team-a",name="jobs"} 0"#,
            r#"warren_controller_decisions_total{namespace="team-a",name="jobs",reason="Backlog"} 1"#,
            r#"warren_controller_scaler_errors_total{namespace="team-a",name="jobs",error="timeout"} 1"#,
            r#"warren_controller_scaler_ready{namespace="team-b",name="other"} 0"#,
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }

        metrics.forget_scaler("team-a", "jobs");
        let text = encode(&registry);
        assert!(!text.contains(r#"name="jobs""#), "{text}");
        assert!(
            text.contains(r#"warren_controller_scaler_ready{namespace="team-b",name="other"} 0"#),
            "the other scaler's series stay:\n{text}"
        );
    }
}
