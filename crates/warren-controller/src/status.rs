//! The QueueScaler status a reconcile writes, computed purely from the
//! previous status and what the reconcile saw and did.
//!
//! Conditions keep their `lastTransitionTime` unless their status changes,
//! `lastDecision.at` is kept while the decision (replicas, reason, message)
//! stays the same, and [`needs_patch`] skips the status write when only the
//! observation time would change (a heartbeat still refreshes it every
//! `heartbeat`), so a thousand idle scalers do not rewrite their status
//! every polling interval.

use std::time::Duration;

use chrono::{DateTime, Utc};
use warren_crd::{
    Condition, ConditionStatus, LastDecision, Observation, QueueScalerStatus, condition_type,
};
use warren_scaling::Decision;

use crate::source::MetricsError;

/// Ready=False reason for a spec that fails validation.
pub const REASON_INVALID_SPEC: &str = "InvalidSpec";
/// Ready=False reason when the scale target does not exist.
pub const REASON_TARGET_NOT_FOUND: &str = "TargetNotFound";

/// What one regular (valid spec, target found) reconcile produced.
#[derive(Debug, Clone)]
pub struct TickOutcome<'a> {
    pub generation: Option<i64>,
    pub now: DateTime<Utc>,
    pub current_replicas: i32,
    pub decision: &'a Decision,
    /// This tick's observation (`None` when paused or the read failed).
    pub observation: Option<Observation>,
    /// Why the read failed, if it did.
    pub metrics_error: Option<&'a MetricsError>,
    pub consecutive_failures: u32,
    pub paused: bool,
    /// Set when this reconcile patched the target's replicas.
    pub scaled_at: Option<DateTime<Utc>>,
    /// What the scaler watches ([`warren_crd::QueueRef::summary`]), for
    /// messages and `status.queueSummary`.
    pub queue: &'a str,
    /// The read had no unacked count (the management API failed): the
    /// observation carries the last known one.
    pub unacked_unknown: bool,
}

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    outcome_generation: Option<i64>,
    now: DateTime<Utc>,
) -> Condition {
    let mut c = Condition::new(type_, ConditionStatus::from(status), reason, message, now);
    c.observed_generation = outcome_generation;
    c
}

/// The status after a regular reconcile.
pub fn after_tick(previous: &QueueScalerStatus, tick: &TickOutcome<'_>) -> QueueScalerStatus {
    let mut status = previous.clone();
    let now = tick.now;
    let generation = tick.generation;
    status.observed_generation = generation;
    status.queue_summary = Some(tick.queue.to_owned());
    if let Some(observation) = &tick.observation {
        status.observation = Some(observation.clone());
    }
    status.current_replicas = Some(tick.current_replicas);
    status.desired_replicas = Some(tick.decision.replicas);
    if let Some(at) = tick.scaled_at {
        status.last_scale_time = Some(at);
    }
    status.consecutive_failures = tick.consecutive_failures;

    let decision = LastDecision {
        replicas: tick.decision.replicas,
        reason: tick.decision.reason.label().to_string(),
        message: Some(tick.decision.reason.to_string()),
        at: now,
    };
    status.last_decision = Some(match &previous.last_decision {
        Some(last)
            if last.replicas == decision.replicas
                && last.reason == decision.reason
                && last.message == decision.message =>
        {
            last.clone()
        }
        _ => decision,
    });

    let ready = match (tick.metrics_error, tick.paused) {
        (Some(err), _) => condition(
            condition_type::READY,
            false,
            err.condition_reason(),
            format!(
                "cannot read queue {:?} ({} failed reads in a row): {err}",
                tick.queue, tick.consecutive_failures
            ),
            generation,
            now,
        ),
        (None, true) => condition(
            condition_type::READY,
            true,
            "Paused",
            "the spec is valid and the target exists; scaling is paused",
            generation,
            now,
        ),
        (None, false) if tick.unacked_unknown => condition(
            condition_type::READY,
            true,
            "MetricsPartial",
            format!(
                "reading queue {:?}; its unacked count is unknown (management API unavailable): using the last known one and not scaling to zero",
                tick.queue
            ),
            generation,
            now,
        ),
        (None, false) => condition(
            condition_type::READY,
            true,
            "MetricsAvailable",
            format!("reading queue {:?}", tick.queue),
            generation,
            now,
        ),
    };
    status.set_condition(ready);

    let active = tick.current_replicas > 0 || tick.decision.replicas > 0;
    status.set_condition(if active {
        condition(
            condition_type::ACTIVE,
            true,
            "ReplicasRunning",
            format!(
                "{} replicas, {} desired",
                tick.current_replicas, tick.decision.replicas
            ),
            generation,
            now,
        )
    } else {
        condition(
            condition_type::ACTIVE,
            false,
            "ScaledToZero",
            "the target runs no replica",
            generation,
            now,
        )
    });

    status.set_condition(if tick.decision.is_fallback() {
        condition(
            condition_type::FALLBACK,
            true,
            "FallbackReplicas",
            tick.decision.reason.to_string(),
            generation,
            now,
        )
    } else if tick.metrics_error.is_some() {
        condition(
            condition_type::FALLBACK,
            false,
            "HoldingReplicas",
            "metrics are missing; holding the current replicas until the fallback threshold",
            generation,
            now,
        )
    } else {
        condition(
            condition_type::FALLBACK,
            false,
            if tick.paused {
                "Paused"
            } else {
                "MetricsAvailable"
            },
            "",
            generation,
            now,
        )
    });

    status.set_condition(if tick.paused {
        condition(
            condition_type::PAUSED,
            true,
            "Paused",
            "spec.paused is true; replicas are left alone",
            generation,
            now,
        )
    } else {
        condition(
            condition_type::PAUSED,
            false,
            "Scaling",
            "",
            generation,
            now,
        )
    });
    status
}

/// The status when the reconcile stopped early with `Ready=False`
/// (`InvalidSpec`, `TargetNotFound`): only Ready and observedGeneration change.
pub fn not_ready(
    previous: &QueueScalerStatus,
    generation: Option<i64>,
    reason: &str,
    message: String,
    now: DateTime<Utc>,
) -> QueueScalerStatus {
    let mut status = previous.clone();
    status.observed_generation = generation;
    status.set_condition(condition(
        condition_type::READY,
        false,
        reason,
        message,
        generation,
        now,
    ));
    status
}

/// Whether `previous` is already `Ready=False` for `reason` with `message`
/// (then no new Warning event is recorded).
pub fn already_not_ready(previous: &QueueScalerStatus, reason: &str, message: &str) -> bool {
    previous.condition(condition_type::READY).is_some_and(|c| {
        c.status == ConditionStatus::False && c.reason == reason && c.message == message
    })
}

/// Whether `next` must be written: anything but the observation time
/// changed, or the written observation is older than `heartbeat`.
pub fn needs_patch(
    previous: &QueueScalerStatus,
    next: &QueueScalerStatus,
    now: DateTime<Utc>,
    heartbeat: Duration,
) -> bool {
    let strip = |s: &QueueScalerStatus| {
        let mut s = s.clone();
        if let Some(o) = s.observation.as_mut() {
            o.observed_at = DateTime::<Utc>::UNIX_EPOCH;
        }
        s
    };
    if strip(previous) != strip(next) {
        return true;
    }
    match (&previous.observation, &next.observation) {
        (Some(old), Some(new)) if old.observed_at != new.observed_at => {
            let age = (now - old.observed_at).to_std().unwrap_or(Duration::ZERO);
            age >= heartbeat
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;
    use warren_scaling::Reason;

    fn decision(replicas: i32, reason: Reason) -> Decision {
        Decision {
            replicas,
            recommendation: replicas,
            reason,
        }
    }

    fn observation(ready: u64, at: DateTime<Utc>) -> Observation {
        Observation::new(ready, 0, 1, None, None, at)
    }

    fn tick<'a>(
        d: &'a Decision,
        now: DateTime<Utc>,
        obs: Option<Observation>,
        err: Option<&'a MetricsError>,
    ) -> TickOutcome<'a> {
        TickOutcome {
            generation: Some(3),
            now,
            current_replicas: 1,
            decision: d,
            observation: obs,
            metrics_error: err,
            consecutive_failures: u32::from(err.is_some()),
            paused: false,
            scaled_at: None,
            queue: "jobs",
            unacked_unknown: false,
        }
    }

    #[test]
    fn conditions_keep_transition_times_and_decision_time_while_unchanged() {
        let t0 = DateTime::<Utc>::UNIX_EPOCH + TimeDelta::days(20000);
        let t1 = t0 + TimeDelta::seconds(5);
        let d = decision(
            2,
            Reason::Backlog {
                messages: 10,
                per_replica: 5,
            },
        );
        let first = after_tick(
            &QueueScalerStatus::default(),
            &tick(&d, t0, Some(observation(10, t0)), None),
        );
        let second = after_tick(&first, &tick(&d, t1, Some(observation(10, t1)), None));
        let ready = second.condition("Ready").unwrap();
        assert_eq!(ready.status, ConditionStatus::True);
        assert_eq!(ready.last_transition_time, t0);
        assert_eq!(ready.observed_generation, Some(3));
        assert_eq!(second.last_decision.as_ref().unwrap().at, t0);
        assert_eq!(second.observation.as_ref().unwrap().observed_at, t1);
        assert_eq!(second.observed_generation, Some(3));
        assert_eq!(second.desired_replicas, Some(2));
        // Only the observation time changed: no patch within the heartbeat.
        assert!(!needs_patch(&first, &second, t1, Duration::from_secs(60)));
        assert!(needs_patch(
            &first,
            &second,
            t0 + TimeDelta::seconds(61),
            Duration::from_secs(60)
        ));

        // A failed read flips Ready (new transition time) and keeps the
        // last good observation.
        let err = MetricsError::Other("connection refused".into());
        let held = decision(
            1,
            Reason::MetricsUnavailable {
                consecutive_failures: 1,
            },
        );
        let third = after_tick(&second, &tick(&held, t1, None, Some(&err)));
        let ready = third.condition("Ready").unwrap();
        assert_eq!(ready.status, ConditionStatus::False);
        assert_eq!(ready.reason, "BrokerUnavailable");
        assert_eq!(ready.last_transition_time, t1);
        assert_eq!(third.observation.as_ref().unwrap().ready, 10);
        assert_eq!(third.consecutive_failures, 1);
        assert_eq!(
            third.condition("Fallback").unwrap().status,
            ConditionStatus::False
        );
        assert!(needs_patch(&second, &third, t1, Duration::from_secs(60)));
    }

    #[test]
    fn fallback_and_scaled_to_zero_conditions() {
        let now = DateTime::<Utc>::UNIX_EPOCH + TimeDelta::days(20000);
        let err = MetricsError::Other("down".into());
        let d = decision(
            2,
            Reason::Fallback {
                consecutive_failures: 3,
                fallback_replicas: 2,
            },
        );
        let s = after_tick(
            &QueueScalerStatus::default(),
            &tick(&d, now, None, Some(&err)),
        );
        assert_eq!(
            s.condition("Fallback").unwrap().status,
            ConditionStatus::True
        );
        let zero = decision(0, Reason::QueueEmpty);
        let mut t = tick(&zero, now, Some(observation(0, now)), None);
        t.current_replicas = 0;
        let s = after_tick(&s, &t);
        let active = s.condition("Active").unwrap();
        assert_eq!(active.status, ConditionStatus::False);
        assert_eq!(active.reason, "ScaledToZero");
        assert_eq!(
            s.condition("Paused").unwrap().status,
            ConditionStatus::False
        );
    }

    #[test]
    fn not_ready_is_recognised_for_event_deduplication() {
        let now = DateTime::<Utc>::UNIX_EPOCH;
        let s = not_ready(
            &QueueScalerStatus::default(),
            Some(1),
            REASON_INVALID_SPEC,
            "bad".into(),
            now,
        );
        assert!(already_not_ready(&s, REASON_INVALID_SPEC, "bad"));
        assert!(!already_not_ready(&s, REASON_INVALID_SPEC, "other"));
        assert!(!already_not_ready(&s, REASON_TARGET_NOT_FOUND, "bad"));
    }
}
