//! Step 1: from one observation to a recommended replica count.
//!
//! - Counted messages: `ready`, plus `unacked` when `countUnacked`; over
//!   several queues, that count per queue combined by `queue.operation`.
//! - Sizing ([`size`]): with `targetDrainSeconds` set and a measured
//!   per-replica ack rate (> 0), `ceil((publishRate + counted /
//!   targetDrainSeconds) / perReplicaAckRate)`; otherwise (no rates yet, e.g.
//!   at zero replicas) `ceil(counted / messagesPerReplica)`. Rate sizing
//!   replaces the backlog rule rather than adding to it: it already accounts
//!   for the backlog, through the drain time.
//! - Activation: at zero replicas (and `minReplicas` 0) the scaler stays at
//!   zero while `counted <= activationMessages`. At one replica or more the
//!   threshold does not apply.
//! - Zero: with `minReplicas` 0 and nothing to size for, one replica stays
//!   while messages are unacked or until the queue (ready and unacked) has
//!   been empty for `cooldownSeconds`; then zero.
//! - Bounds: the result lies in `[minReplicas, maxReplicas]`.

use chrono::{DateTime, Utc};
use warren_crd::{Observation, QueueScalerSpec};

use crate::{History, Reason, bounds};

/// A recommended replica count and the rule that produced it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Target {
    pub replicas: i32,
    pub reason: Reason,
}

/// Messages that call for workers. For one queue: `ready`, plus `unacked`
/// when `countUnacked`. For several (`observation.queues`): that count per
/// queue, combined by `queue.operation` (sum, max, or avg rounded up), so
/// the count is 0 only when every queue's count is 0.
pub fn counted_messages(spec: &QueueScalerSpec, observation: &Observation) -> u64 {
    let count = |ready: u64, unacked: u64| {
        if spec.count_unacked {
            ready.saturating_add(unacked)
        } else {
            ready
        }
    };
    if observation.queues.is_empty() {
        return count(observation.ready, observation.unacked);
    }
    let per_queue: Vec<u64> = observation
        .queues
        .iter()
        .map(|q| count(q.ready, q.unacked))
        .collect();
    spec.queue.operation.combine(&per_queue)
}

/// Replicas the sizing rule asks for (unbounded; 0 when nothing calls for a
/// worker) and the rule used.
pub fn size(spec: &QueueScalerSpec, observation: &Observation, counted: u64) -> (u64, Reason) {
    let rate = observation
        .per_replica_ack_rate
        .filter(|r| r.is_finite() && *r > 0.0);
    if let (Some(drain_seconds), Some(per_replica_ack_rate)) = (spec.target_drain_seconds, rate)
        && drain_seconds > 0
    {
        let arrival_rate = observation
            .publish_rate
            .filter(|r| r.is_finite() && *r > 0.0)
            .unwrap_or(0.0);
        let needed_rate = arrival_rate + counted as f64 / f64::from(drain_seconds);
        // `as` saturates: a huge quotient becomes u64::MAX, capped later by
        // maxReplicas. Counted messages always need at least one replica.
        let replicas =
            ((needed_rate / per_replica_ack_rate).ceil() as u64).max(u64::from(counted > 0));
        let reason = Reason::DrainRate {
            arrival_rate,
            backlog: counted,
            drain_seconds,
            per_replica_ack_rate,
        };
        return (replicas, reason);
    }
    let per_replica = spec.messages_per_replica.max(1);
    (
        counted.div_ceil(per_replica),
        Reason::Backlog {
            messages: counted,
            per_replica,
        },
    )
}

/// The recommendation for one observation (before stabilization and policies).
pub(crate) fn recommend(
    spec: &QueueScalerSpec,
    observation: &Observation,
    current: i32,
    history: &History,
    now: DateTime<Utc>,
) -> Target {
    let (min, max) = bounds(spec);
    let counted = counted_messages(spec, observation);
    let (wanted, basis) = size(spec, observation, counted);

    let activating = current == 0 && min == 0;
    if activating && counted <= spec.activation_messages {
        let reason = if counted == 0 {
            Reason::QueueEmpty
        } else {
            Reason::BelowActivation {
                messages: counted,
                activation: spec.activation_messages,
            }
        };
        return Target {
            replicas: 0,
            reason,
        };
    }

    if wanted == 0 && min == 0 {
        return toward_zero(spec, observation, history, now);
    }

    // At least one replica is needed (or minReplicas > 0).
    let floor = min.max(1);
    let replicas = clamp_u64(wanted, floor, max);
    let reason = if wanted > max as u64 {
        Reason::AtMaxReplicas { wanted }
    } else if wanted < min as u64 {
        Reason::AtMinReplicas { wanted }
    } else {
        basis
    };
    Target { replicas, reason }
}

/// Nothing is counted, minReplicas is 0 and replicas are running: keep one
/// while work is in flight or the cooldown runs, then zero.
fn toward_zero(
    spec: &QueueScalerSpec,
    observation: &Observation,
    history: &History,
    now: DateTime<Utc>,
) -> Target {
    if observation.unacked > 0 {
        return Target {
            replicas: 1,
            reason: Reason::UnackedInFlight {
                unacked: observation.unacked,
            },
        };
    }
    let empty_for = (now - history.empty_since().unwrap_or(now)).num_seconds();
    let remaining_seconds = i64::from(spec.behavior.cooldown_seconds) - empty_for;
    if remaining_seconds > 0 {
        Target {
            replicas: 1,
            reason: Reason::CooldownPending { remaining_seconds },
        }
    } else {
        Target {
            replicas: 0,
            reason: Reason::QueueEmpty,
        }
    }
}

fn clamp_u64(value: u64, min: i32, max: i32) -> i32 {
    let capped = i32::try_from(value).unwrap_or(i32::MAX);
    capped.clamp(min, max.max(min))
}
