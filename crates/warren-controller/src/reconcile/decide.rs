//! Step 2 of a reconcile: decide. [`warren_scaling::decide`] (pure, with the
//! scaler's history) on the observation after the in-flight guard
//! ([`super::in_flight`]), and the controller's guard on top of it: with the
//! unacked count unknown, never scale a running target to zero
//! ([`super::unacked::hold_if_unacked_unknown`]). The decision is recorded
//! in the history the next decisions stabilize on. When the in-flight guard
//! raised the unacked count, the decision on the measured counts alone is
//! computed too, to report when the guard held replicas.

use chrono::{DateTime, Utc};
use warren_crd::QueueScalerSpec;
use warren_scaling::{Decision, DecisionInput, History, Reason};

use super::observe::Observed;
use super::unacked::hold_if_unacked_unknown;

/// A decision, and the replicas the measured counts alone would have given
/// when that is fewer (the in-flight guard held the difference).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Decided {
    pub decision: Decision,
    pub held_from: Option<i32>,
}

/// The replicas the target should run, given what was `observed` and the
/// target's `current` replicas; records the decision in `history`.
pub(super) fn decide(
    spec: &QueueScalerSpec,
    observed: &Observed,
    current: i32,
    history: &mut History,
    now: DateTime<Utc>,
) -> Decided {
    let decide_on = |input: &DecisionInput| {
        let decision = warren_scaling::decide(spec, input, history, now);
        match observed.unacked_unknown {
            Some(unknown_reads) => {
                hold_if_unacked_unknown(decision, current, spec.max_replicas, unknown_reads)
            }
            None => decision,
        }
    };
    let decision = decide_on(&observed.input);
    if observed.unacked_unknown.is_some()
        && matches!(decision.reason, Reason::MetricsUnavailable { .. })
    {
        tracing::info!(
            replicas = current,
            "not scaling to zero: the unacked count is unknown"
        );
    }
    let held_from = match &observed.observation {
        Some(measured) if observed.in_flight_raised > 0 => {
            let unguarded = decide_on(&DecisionInput::observed(current, measured.clone()));
            (unguarded.replicas < decision.replicas).then_some(unguarded.replicas)
        }
        _ => None,
    };
    if let Some(unguarded) = held_from {
        tracing::info!(
            replicas = decision.replicas,
            measured_counts_would_give = unguarded,
            counted_in_flight = observed.in_flight_raised,
            "holding replicas: messages that just left ready count as in flight until the management API's unacked count can show them"
        );
    }
    history.record(spec, &observed.input, &decision, now);
    Decided {
        decision,
        held_from,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::{QueueRead, ReadySource};
    use crate::reconcile::context::Memory;
    use crate::reconcile::observe::absorb;
    use chrono::TimeDelta;
    use std::time::Duration;

    const HORIZON: Duration = Duration::from_secs(6);

    fn spec() -> QueueScalerSpec {
        serde_json::from_value(serde_json::json!({
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "w"},
            "queue": {"name": "tasks"},
            "broker": {"credentialsSecretRef": {"name": "s"}},
            "minReplicas": 0,
            "maxReplicas": 10,
            "behavior": {"cooldownSeconds": 0}
        }))
        .unwrap()
    }

    fn read(ready: u64, unacked: Option<u64>, now: DateTime<Utc>) -> QueueRead {
        QueueRead {
            ready,
            unacked,
            consumers: 2,
            publish_rate: None,
            ack_rate: None,
            ready_source: ReadySource::PassiveDeclare,
            observed_at: now,
            queues: Vec::new(),
        }
    }

    #[test]
    fn an_empty_queue_with_unacked_unknown_holds_a_running_target() {
        let now = Utc::now();
        let mut memory = Memory::default();
        let observed = absorb(Ok(read(0, None, now)), 2, &mut memory, HORIZON);
        let decision = decide(&spec(), &observed, 2, &mut memory.history, now).decision;
        assert_eq!(decision.replicas, 2);
        assert_eq!(
            decision.reason,
            Reason::MetricsUnavailable {
                consecutive_failures: 1
            }
        );
        assert_eq!(memory.history.recommendations().len(), 1);

        // The same empty queue with the unacked count known: to zero.
        let observed = absorb(Ok(read(0, Some(0), now)), 2, &mut memory, HORIZON);
        let decision = decide(&spec(), &observed, 2, &mut History::new(), now).decision;
        assert_eq!(
            (decision.replicas, decision.reason),
            (0, Reason::QueueEmpty)
        );
    }

    #[test]
    fn a_failed_read_holds_and_counts_the_failures() {
        let now = Utc::now();
        let mut memory = Memory::default();
        let failed = || {
            Err(crate::observe::ObserveError::QueueNotFound {
                queue: "tasks".into(),
                vhost: "/".into(),
            })
        };
        absorb(failed(), 3, &mut memory, HORIZON);
        let observed = absorb(failed(), 3, &mut memory, HORIZON);
        assert_eq!((observed.previous_failures, observed.failures), (1, 2));
        let decision = decide(&spec(), &observed, 3, &mut memory.history, now).decision;
        assert_eq!(decision.replicas, 3);
        assert_eq!(
            decision.reason,
            Reason::MetricsUnavailable {
                consecutive_failures: 2
            }
        );
        let observed = absorb(Ok(read(4, Some(0), now)), 3, &mut memory, HORIZON);
        assert_eq!((observed.failures, memory.failures), (0, 0));
    }

    /// One tick at `t0 + second` reading `ready` and a measured `unacked`.
    fn tick(
        spec: &QueueScalerSpec,
        memory: &mut Memory,
        horizon: Duration,
        (t0, second): (DateTime<Utc>, i64),
        (ready, unacked, current): (u64, u64, i32),
    ) -> Decided {
        let now = t0 + TimeDelta::seconds(second);
        let observed = absorb(
            Ok(read(ready, Some(unacked), now)),
            current,
            memory,
            horizon,
        );
        decide(spec, &observed, current, &mut memory.history, now)
    }

    fn spec_of(fields: serde_json::Value) -> QueueScalerSpec {
        let mut spec = serde_json::json!({
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "w"},
            "queue": {"name": "tasks"},
            "broker": {"credentialsSecretRef": {"name": "s"}},
        });
        spec.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        serde_json::from_value(spec).unwrap()
    }

    #[test]
    fn jobs_taken_while_the_unacked_sample_lags_hold_the_replicas_and_never_reach_zero() {
        // Four pods take 40 jobs (10 each) as they start: the passive declare
        // sees ready 40 -> 30 -> 10 -> 0 while the management API's unacked
        // count is still the 0 sampled before. Scale-down window 12 s,
        // cooldown 0: on the measured counts alone the queue looks empty at
        // t=3 and the target would go to zero with 40 jobs in hand.
        let spec = spec_of(serde_json::json!({
            "minReplicas": 0,
            "maxReplicas": 4,
            "messagesPerReplica": 10,
            "behavior": {"cooldownSeconds": 0, "scaleDown": {"stabilizationWindowSeconds": 12}}
        }));
        let t0 = Utc::now();
        let mut memory = Memory::default();
        let mut at = |second: i64, ready: u64, unacked: u64| {
            tick(
                &spec,
                &mut memory,
                HORIZON,
                (t0, second),
                (ready, unacked, 4),
            )
        };
        for (second, ready) in [(0, 40), (1, 30), (2, 10), (3, 0)] {
            let decided = at(second, ready, 0);
            assert_eq!(decided.decision.replicas, 4, "t={second}: {decided:?}");
            assert_eq!(decided.decision.recommendation, 4, "t={second}");
        }
        // On the measured counts alone: an empty queue, zero at once.
        let stale = at(4, 0, 0);
        assert_eq!((stale.decision.replicas, stale.held_from), (4, Some(0)));
        // The sample catches up (38 in hand, 2 acked) and the last drop
        // (t=3) becomes a horizon old at t=9: the measurement stands, 4
        // replicas for 38 jobs.
        for second in 5..=10 {
            assert_eq!(at(second, 0, 38).decision.replicas, 4, "t={second}");
        }
        // 15 jobs left in hand: 2 replicas recommended, held by the window.
        let fewer = at(11, 0, 15).decision;
        assert_eq!((fewer.replicas, fewer.recommendation), (4, 2));
        // No recommendation below 4 before the sample could show the jobs
        // taken: the scale-down window did not start early.
        let early: Vec<_> = memory
            .history
            .recommendations()
            .iter()
            .filter(|r| r.replicas < 4 && r.at < t0 + TimeDelta::seconds(11))
            .collect();
        assert!(early.is_empty(), "{early:?}");
        // The work is done and measured so, no drop for a horizon: a fresh
        // zero scales to zero at once (cooldown 0).
        let done = tick(&spec, &mut memory, HORIZON, (t0, 12), (0, 0, 4));
        assert_eq!(
            (done.decision.replicas, done.decision.reason, done.held_from),
            (0, Reason::QueueEmpty, None)
        );
    }

    #[test]
    fn the_guard_never_slows_a_scale_up() {
        // The same reads with the guard and with it off (horizon 0): a drop
        // then a burst. The guard only ever decides as many replicas or more.
        let spec = spec_of(serde_json::json!({
            "maxReplicas": 20,
            "messagesPerReplica": 5,
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 0}}
        }));
        let t0 = Utc::now();
        let reads = [(10, 0, 2), (5, 0, 2), (40, 0, 2), (20, 0, 6), (0, 3, 6)];
        let run = |horizon| {
            let mut memory = Memory::default();
            reads
                .iter()
                .zip(0..)
                .map(|(&read, second)| {
                    tick(&spec, &mut memory, horizon, (t0, second), read)
                        .decision
                        .replicas
                })
                .collect::<Vec<i32>>()
        };
        let (guarded, measured) = (run(HORIZON), run(Duration::ZERO));
        assert_eq!(measured, vec![2, 1, 6, 4, 1]);
        // The drop at t=1 holds 2; the burst at t=2 scales up as fast (to
        // the scale-up policy's limit). At t=3 and t=4 consumers took 20
        // and 20 of the 40 seen: they count as in flight (countUnacked), so
        // the guard goes on to the 8 replicas the 40 messages asked for —
        // never more than a total already seen.
        assert_eq!(guarded, vec![2, 2, 6, 8, 8]);
    }

    #[test]
    fn jobs_taken_while_the_unacked_count_is_unknown_stay_counted_until_it_is_known() {
        // A fresh queue the management API has no counts for yet (11 s on a
        // loaded CI node): 4 jobs, workers take 3; the 4th alone must not
        // size the pool, however long the count stays unknown.
        let spec = spec_of(serde_json::json!({
            "maxReplicas": 4,
            "messagesPerReplica": 1,
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 0}}
        }));
        let t0 = Utc::now();
        let mut memory = Memory::default();
        let mut at = |second: i64, ready: u64, unacked: Option<u64>| {
            let now = t0 + TimeDelta::seconds(second);
            let observed = absorb(Ok(read(ready, unacked, now)), 3, &mut memory, HORIZON);
            decide(&spec, &observed, 3, &mut memory.history, now)
        };
        assert_eq!(at(0, 4, None).decision.replicas, 4);
        assert_eq!(at(1, 1, None).decision.replicas, 4);
        let later = at(11, 1, None);
        assert_eq!((later.decision.replicas, later.held_from), (4, Some(1)));
        // Counts known at last (3 in hand): they stand.
        assert_eq!(at(12, 1, Some(3)).decision.replicas, 4);
        // A first count may be a horizon old: a 0 right after it is not
        // trusted until a horizon after the last unknown read (11 s + 6 s).
        let early = at(13, 1, Some(0));
        assert_eq!((early.decision.replicas, early.held_from), (4, Some(1)));
        assert_eq!(at(17, 1, Some(0)).held_from, None);
    }
}
