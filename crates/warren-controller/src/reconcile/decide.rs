//! Step 2 of a reconcile: decide. [`warren_scaling::decide`] (pure, with the
//! scaler's history) and the controller's guard on top of it: with the
//! unacked count unknown, never scale a running target to zero
//! ([`super::unacked::hold_if_unacked_unknown`]). The decision is recorded
//! in the history the next decisions stabilize on.

use chrono::{DateTime, Utc};
use warren_crd::QueueScalerSpec;
use warren_scaling::{Decision, History};

use super::observe::Observed;
use super::unacked::hold_if_unacked_unknown;

/// The replicas the target should run, given what was `observed` and the
/// target's `current` replicas; records the decision in `history`.
pub(super) fn decide(
    spec: &QueueScalerSpec,
    observed: &Observed,
    current: i32,
    history: &mut History,
    now: DateTime<Utc>,
) -> Decision {
    let mut decision = warren_scaling::decide(spec, &observed.input, history, now);
    if let Some(unknown_reads) = observed.unacked_unknown {
        let decided = decision.replicas;
        decision = hold_if_unacked_unknown(decision, current, spec.max_replicas, unknown_reads);
        if decision.replicas != decided {
            tracing::info!(
                replicas = current,
                "not scaling to zero: the unacked count is unknown"
            );
        }
    }
    history.record(spec, &observed.input, &decision, now);
    decision
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::{QueueRead, ReadySource};
    use crate::reconcile::context::Memory;
    use crate::reconcile::observe::absorb;
    use warren_scaling::Reason;

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
        let observed = absorb(Ok(read(0, None, now)), 2, &mut memory);
        let decision = decide(&spec(), &observed, 2, &mut memory.history, now);
        assert_eq!(decision.replicas, 2);
        assert_eq!(
            decision.reason,
            Reason::MetricsUnavailable {
                consecutive_failures: 1
            }
        );
        assert_eq!(memory.history.recommendations().len(), 1);

        // The same empty queue with the unacked count known: to zero.
        let observed = absorb(Ok(read(0, Some(0), now)), 2, &mut memory);
        let decision = decide(&spec(), &observed, 2, &mut History::new(), now);
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
        absorb(failed(), 3, &mut memory);
        let observed = absorb(failed(), 3, &mut memory);
        assert_eq!((observed.previous_failures, observed.failures), (1, 2));
        let decision = decide(&spec(), &observed, 3, &mut memory.history, now);
        assert_eq!(decision.replicas, 3);
        assert_eq!(
            decision.reason,
            Reason::MetricsUnavailable {
                consecutive_failures: 2
            }
        );
        let observed = absorb(Ok(read(4, Some(0), now)), 3, &mut memory);
        assert_eq!((observed.failures, memory.failures), (0, 0));
    }
}
