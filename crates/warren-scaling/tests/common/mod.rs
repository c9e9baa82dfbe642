//! Builders shared by the decision tests.
#![allow(dead_code)]

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use serde_json::json;
use warren_crd::{Observation, PolicyType, QueueScalerSpec, ScalingPolicy};

/// 2025-01-01T00:00:00Z plus `seconds`.
pub fn t(seconds: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap() + TimeDelta::seconds(seconds)
}

/// The contract defaults, maxReplicas 10, and no stabilization or rate
/// limits, so each test switches on only the rule it is about.
pub fn spec() -> QueueScalerSpec {
    let mut spec: QueueScalerSpec = serde_json::from_value(json!({
        "scaleTargetRef": {"name": "warren-worker"},
        "queue": {"name": "tasks"},
        "broker": {"credentialsSecretRef": {"name": "warren-rabbitmq"}},
        "maxReplicas": 10
    }))
    .unwrap();
    spec.behavior.scale_down.stabilization_window_seconds = 0;
    spec.behavior.scale_up.policies = vec![pods(1000, 1)];
    spec.behavior.scale_down.policies = vec![percent(100, 1)];
    spec
}

/// The spec with its serde defaults only (HPA default behavior).
pub fn default_spec() -> QueueScalerSpec {
    serde_json::from_value(json!({
        "scaleTargetRef": {"name": "warren-worker"},
        "queue": {"name": "tasks"},
        "broker": {"credentialsSecretRef": {"name": "warren-rabbitmq"}},
        "maxReplicas": 100
    }))
    .unwrap()
}

pub fn pods(value: u32, period_seconds: u32) -> ScalingPolicy {
    ScalingPolicy {
        policy_type: PolicyType::Pods,
        value,
        period_seconds,
    }
}

pub fn percent(value: u32, period_seconds: u32) -> ScalingPolicy {
    ScalingPolicy {
        policy_type: PolicyType::Percent,
        value,
        period_seconds,
    }
}

/// A queue with `ready` and `unacked` messages, no rates.
pub fn queue(ready: u64, unacked: u64) -> Observation {
    Observation::new(ready, unacked, 0, None, None, t(0))
}

/// A queue with rates: `consumers` each acking `ack_rate / consumers` per second.
pub fn queue_with_rates(
    ready: u64,
    unacked: u64,
    consumers: u64,
    publish_rate: f64,
    ack_rate: f64,
) -> Observation {
    Observation::new(
        ready,
        unacked,
        consumers,
        Some(publish_rate),
        Some(ack_rate),
        t(0),
    )
}
