//! Step 4 of a reconcile: the QueueScaler status it writes, computed purely
//! from the previous status and what the reconcile saw and did
//! ([`after_tick`], one function per condition; [`not_ready`] for a
//! reconcile that stopped early), then written by `write`.
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
    Condition, ConditionStatus, LastDecision, Observation, QueueScaler, QueueScalerStatus,
    condition_type,
};
use warren_scaling::Decision;

use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::context::{Context, Memory, ScalerKey};
use crate::error::Error;
use crate::observe::ObserveError;

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
    pub observe_error: Option<&'a ObserveError>,
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
    /// The in-flight guard held replicas this tick (see
    /// [`super::in_flight`]).
    pub in_flight_held: Option<InFlightHeld>,
}

/// How the in-flight guard changed a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlightHeld {
    /// Messages counted in flight on top of the management API's count.
    pub counted: u64,
    /// The replicas the measured counts alone would have given.
    pub measured_replicas: i32,
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

/// The status after a regular reconcile: the tick's figures, the last
/// decision and one condition per type.
pub fn after_tick(previous: &QueueScalerStatus, tick: &TickOutcome<'_>) -> QueueScalerStatus {
    let mut status = previous.clone();
    status.observed_generation = tick.generation;
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
    status.last_decision = Some(last_decision(previous.last_decision.as_ref(), tick));
    status.set_condition(ready_condition(tick));
    status.set_condition(active_condition(tick));
    status.set_condition(fallback_condition(tick));
    status.set_condition(paused_condition(tick));
    status
}

/// The tick's decision; the previous one (its time kept) while replicas,
/// reason and message stay the same.
fn last_decision(previous: Option<&LastDecision>, tick: &TickOutcome<'_>) -> LastDecision {
    let decision = LastDecision {
        replicas: tick.decision.replicas,
        reason: tick.decision.reason.label().to_string(),
        message: Some(tick.decision.reason.to_string()),
        at: tick.now,
    };
    match previous {
        Some(last)
            if last.replicas == decision.replicas
                && last.reason == decision.reason
                && last.message == decision.message =>
        {
            last.clone()
        }
        _ => decision,
    }
}

/// `Ready`: False when the queue could not be read; True otherwise, with
/// the reason saying whether the read was complete, partial or paused.
fn ready_condition(tick: &TickOutcome<'_>) -> Condition {
    let (status, reason, message) = match (tick.observe_error, tick.paused) {
        (Some(err), _) => (
            false,
            err.condition_reason(),
            format!(
                "cannot read queue {:?} ({} failed reads in a row): {err}",
                tick.queue, tick.consecutive_failures
            ),
        ),
        (None, true) => (
            true,
            "Paused",
            "the spec is valid and the target exists; scaling is paused".to_owned(),
        ),
        (None, false) if tick.unacked_unknown => (
            true,
            "MetricsPartial",
            format!(
                "reading queue {:?}; its unacked count is unknown (management API unavailable): using the last known one and not scaling to zero",
                tick.queue
            ),
        ),
        (None, false) => (
            true,
            "MetricsAvailable",
            match tick.in_flight_held {
                Some(held) => format!(
                    "reading queue {:?}; holding {} replicas, not {}: {} messages that just left ready count as in flight until the management API's unacked count can show them",
                    tick.queue, tick.decision.replicas, held.measured_replicas, held.counted
                ),
                None => format!("reading queue {:?}", tick.queue),
            },
        ),
    };
    tick.condition(condition_type::READY, status, reason, message)
}

/// `Active`: whether the target runs or should run replicas.
fn active_condition(tick: &TickOutcome<'_>) -> Condition {
    if tick.current_replicas > 0 || tick.decision.replicas > 0 {
        let message = format!(
            "{} replicas, {} desired",
            tick.current_replicas, tick.decision.replicas
        );
        tick.condition(condition_type::ACTIVE, true, "ReplicasRunning", message)
    } else {
        tick.condition(
            condition_type::ACTIVE,
            false,
            "ScaledToZero",
            "the target runs no replica",
        )
    }
}

/// `Fallback`: True when the decision is the fallback replica count.
fn fallback_condition(tick: &TickOutcome<'_>) -> Condition {
    if tick.decision.is_fallback() {
        let message = tick.decision.reason.to_string();
        tick.condition(condition_type::FALLBACK, true, "FallbackReplicas", message)
    } else if tick.observe_error.is_some() {
        tick.condition(
            condition_type::FALLBACK,
            false,
            "HoldingReplicas",
            "metrics are missing; holding the current replicas until the fallback threshold",
        )
    } else {
        let reason = if tick.paused {
            "Paused"
        } else {
            "MetricsAvailable"
        };
        tick.condition(condition_type::FALLBACK, false, reason, "")
    }
}

/// `Paused`: mirrors `spec.paused`.
fn paused_condition(tick: &TickOutcome<'_>) -> Condition {
    if tick.paused {
        tick.condition(
            condition_type::PAUSED,
            true,
            "Paused",
            "spec.paused is true; replicas are left alone",
        )
    } else {
        tick.condition(condition_type::PAUSED, false, "Scaling", "")
    }
}

impl TickOutcome<'_> {
    /// A condition of this tick (its generation and time).
    fn condition(
        &self,
        type_: &str,
        status: bool,
        reason: &str,
        message: impl Into<String>,
    ) -> Condition {
        condition(type_, status, reason, message, self.generation, self.now)
    }
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

/// Merge-patches `/status` when [`needs_patch`] says so and remembers the
/// written status in `memory` (the next one is built on it).
pub(super) async fn write(
    ctx: &Context,
    (namespace, name): &ScalerKey,
    previous: &QueueScalerStatus,
    next: QueueScalerStatus,
    now: DateTime<Utc>,
    memory: &mut Memory,
) -> Result<(), Error> {
    ctx.metrics.record_status(namespace, name, &next);
    if !needs_patch(previous, &next, now, ctx.settings.status_heartbeat) {
        return Ok(());
    }
    let scalers: Api<QueueScaler> = Api::namespaced(ctx.client.clone(), namespace);
    scalers
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": next })),
        )
        .await
        .map_err(|source| Error::PatchStatus {
            namespace: namespace.clone(),
            name: name.clone(),
            source,
        })?;
    memory.written_status = Some(next);
    Ok(())
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
        err: Option<&'a ObserveError>,
    ) -> TickOutcome<'a> {
        TickOutcome {
            generation: Some(3),
            now,
            current_replicas: 1,
            decision: d,
            observation: obs,
            observe_error: err,
            consecutive_failures: u32::from(err.is_some()),
            paused: false,
            scaled_at: None,
            queue: "jobs",
            unacked_unknown: false,
            in_flight_held: None,
        }
    }

    #[test]
    fn the_ready_message_says_when_the_in_flight_guard_held_replicas() {
        let now = DateTime::<Utc>::UNIX_EPOCH + TimeDelta::days(20000);
        let d = decision(4, Reason::QueueEmpty);
        let mut held = tick(&d, now, Some(observation(0, now)), None);
        held.in_flight_held = Some(InFlightHeld {
            counted: 40,
            measured_replicas: 0,
        });
        let status = after_tick(&QueueScalerStatus::default(), &held);
        let ready = status.condition("Ready").unwrap();
        assert_eq!(ready.reason, "MetricsAvailable");
        assert!(
            ready
                .message
                .contains("holding 4 replicas, not 0: 40 messages"),
            "{}",
            ready.message
        );
        // The status keeps the measured observation.
        assert_eq!(status.observation.as_ref().unwrap().unacked, 0);
        let plain = after_tick(&status, &tick(&d, now, Some(observation(0, now)), None));
        assert_eq!(
            plain.condition("Ready").unwrap().message,
            "reading queue \"jobs\""
        );
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
        let err = ObserveError::Other("connection refused".into());
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
        let err = ObserveError::Other("down".into());
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
