//! The observed state of a QueueScaler, written by the controller.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::schema::strip_unsigned_formats;

/// What the controller last saw and did.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = strip_unsigned_formats)]
pub struct QueueScalerStatus {
    /// The `metadata.generation` this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// What the scaler watches, in one line (the `Queue` printer column):
    /// `tasks`, or for several queues `sms,email (sum)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_summary: Option<String>,
    /// The last successful read of the queue (of every queue, for a scaler
    /// over several: totals, and each queue under `queues`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observation: Option<Observation>,
    /// Replicas of the target when the controller last looked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_replicas: Option<i32>,
    /// Replicas the controller wants the target to have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// When the controller last changed the target's replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<DateTime<Utc>>,
    /// The last decision and why it was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decision: Option<LastDecision>,
    /// Failed metric reads in a row (0 after a success).
    #[serde(default)]
    pub consecutive_failures: u32,
    /// Ready, Active, Fallback and Paused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["type"]
    ))]
    pub conditions: Vec<Condition>,
}

/// One read of the queue's depth and rates. For a scaler over several queues
/// the counts and rates are totals over them, `queues` holds each queue's
/// own, and `operation` (in the spec) decides how the decision combines them.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Observation {
    /// Messages waiting to be delivered.
    pub ready: u64,
    /// Messages delivered to consumers and not yet acknowledged.
    pub unacked: u64,
    /// Consumers attached to the queue.
    pub consumers: u64,
    /// Messages published per second (management API), if measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_rate: Option<f64>,
    /// Messages acknowledged per second (management API), if measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_rate: Option<f64>,
    /// Acknowledgements per second per consumer: `ackRate / consumers`,
    /// present only when both are positive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_replica_ack_rate: Option<f64>,
    /// When the read was made.
    pub observed_at: DateTime<Utc>,
    /// Per queue, for a scaler over several queues (`queue.names` or
    /// `queue.pattern`); empty for the single-queue form.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<QueueObservation>,
}

/// One queue's counts within an observation of several queues.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct QueueObservation {
    /// Queue name.
    pub name: String,
    /// Messages waiting to be delivered.
    pub ready: u64,
    /// Messages delivered to consumers and not yet acknowledged.
    pub unacked: u64,
    /// Consumers attached to the queue.
    pub consumers: u64,
    /// Messages published per second, if measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_rate: Option<f64>,
    /// Messages acknowledged per second, if measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_rate: Option<f64>,
}

impl Observation {
    /// An observation with `perReplicaAckRate` derived as `ack_rate / consumers`
    /// (each worker replica holds one consumer).
    pub fn new(
        ready: u64,
        unacked: u64,
        consumers: u64,
        publish_rate: Option<f64>,
        ack_rate: Option<f64>,
        observed_at: DateTime<Utc>,
    ) -> Self {
        let per_replica_ack_rate = match ack_rate {
            Some(rate) if rate > 0.0 && rate.is_finite() && consumers > 0 => {
                Some(rate / consumers as f64)
            }
            _ => None,
        };
        Observation {
            ready,
            unacked,
            consumers,
            publish_rate,
            ack_rate,
            per_replica_ack_rate,
            observed_at,
            queues: Vec::new(),
        }
    }

    /// The observation of several queues: counts and rates are totals, each
    /// queue is kept under `queues`. A worker of the pool consumes every one
    /// of them, so the replicas are estimated as the largest consumer count
    /// of a queue, and `perReplicaAckRate` is the total ack rate over that.
    /// No queue at all is an empty observation.
    pub fn of_queues(queues: Vec<QueueObservation>, observed_at: DateTime<Utc>) -> Self {
        let total =
            |f: fn(&QueueObservation) -> u64| queues.iter().map(f).fold(0u64, u64::saturating_add);
        let rate = |f: fn(&QueueObservation) -> Option<f64>| {
            queues.iter().filter_map(f).reduce(|a, b| a + b)
        };
        let replicas = queues.iter().map(|q| q.consumers).max().unwrap_or(0);
        let mut observation = Observation::new(
            total(|q| q.ready),
            total(|q| q.unacked),
            replicas,
            rate(|q| q.publish_rate),
            rate(|q| q.ack_rate),
            observed_at,
        );
        observation.consumers = total(|q| q.consumers);
        observation.queues = queues;
        observation
    }

    /// No message is waiting and none is being processed.
    pub fn is_empty(&self) -> bool {
        self.ready == 0 && self.unacked == 0
    }
}

/// The last scaling decision.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LastDecision {
    /// Replicas decided.
    pub replicas: i32,
    /// Machine-readable reason (CamelCase), e.g. `Backlog`, `ScaleDownStabilized`.
    pub reason: String,
    /// Human-readable explanation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the decision was made.
    pub at: DateTime<Utc>,
}

/// A standard Kubernetes condition.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Ready, Active, Fallback or Paused (see `condition_type`).
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: ConditionStatus,
    /// Machine-readable CamelCase reason for the last transition.
    #[serde(default)]
    pub reason: String,
    /// Human-readable details.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed.
    pub last_transition_time: DateTime<Utc>,
    /// The `metadata.generation` the condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Status of a [`Condition`].
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl From<bool> for ConditionStatus {
    fn from(value: bool) -> Self {
        if value {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        }
    }
}

/// The condition types a QueueScaler reports.
pub mod condition_type {
    /// The spec is valid, the target exists and metrics are being read.
    pub const READY: &str = "Ready";
    /// The target runs at least one replica (or is being scaled from zero).
    pub const ACTIVE: &str = "Active";
    /// Metrics are missing and the fallback rule decides.
    pub const FALLBACK: &str = "Fallback";
    /// `spec.paused` is true; replicas are left alone.
    pub const PAUSED: &str = "Paused";
}

impl Condition {
    /// A condition that transitions at `now`.
    pub fn new(
        type_: &str,
        status: ConditionStatus,
        reason: impl Into<String>,
        message: impl Into<String>,
        now: DateTime<Utc>,
    ) -> Self {
        Condition {
            type_: type_.to_owned(),
            status,
            reason: reason.into(),
            message: message.into(),
            last_transition_time: now,
            observed_generation: None,
        }
    }
}

impl QueueScalerStatus {
    /// The condition of this type, if set.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// Insert or replace the condition of `condition.type_`. When its status
    /// does not change, the previous `lastTransitionTime` is kept.
    pub fn set_condition(&mut self, mut condition: Condition) {
        match self
            .conditions
            .iter_mut()
            .find(|c| c.type_ == condition.type_)
        {
            Some(existing) => {
                if existing.status == condition.status {
                    condition.last_transition_time = existing.last_transition_time;
                }
                *existing = condition;
            }
            None => self.conditions.push(condition),
        }
    }
}
