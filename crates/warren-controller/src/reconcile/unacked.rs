//! The "unacked count unknown" rule, in one place.
//!
//! A read can come back with the ready count (AMQP passive declare) but no
//! unacked count (the management API failed, or has no counts for the
//! queue yet): [`crate::observe::QueueRead::unacked`] is `None`. Then:
//! 1. the last known unacked count stands in for it (0 when none is known:
//!    first read, nothing in the status) — [`UnackedMemory::absorb`],
//!    [`observation`];
//! 2. a decision to scale a running target to zero is replaced by holding
//!    its replicas — [`hold_if_unacked_unknown`]: work may still be in
//!    flight, and a worker that cancelled its consumer still holds its
//!    unacked message, so not even "no consumers" proves the queue idle;
//! 3. the status says so (`Ready=True/MetricsPartial`, see
//!    [`super::status`]) and the `observations` metric labels the count
//!    `last_known` or `assumed_zero` ([`UnackedFrom`]).

use warren_crd::{Observation, QueueObservation};
use warren_scaling::{Decision, Reason};

use crate::observe::QueueRead;

/// What the reconciler remembers about a scaler's unacked count.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UnackedMemory {
    /// The last unacked count the management API reported.
    last_known: Option<u64>,
    /// Reads in a row without an unacked count.
    unknown_reads: u32,
}

/// Where the unacked count a decision uses came from (metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnackedFrom {
    Management,
    LastKnown,
    AssumedZero,
}

impl UnackedFrom {
    pub fn label(self) -> &'static str {
        match self {
            UnackedFrom::Management => "management",
            UnackedFrom::LastKnown => "last_known",
            UnackedFrom::AssumedZero => "assumed_zero",
        }
    }
}

/// One read, with its unacked count filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Absorbed {
    pub observation: Observation,
    pub from: UnackedFrom,
    /// Reads in a row without an unacked count, this one included; `None`
    /// when the read had one.
    pub unknown_reads: Option<u32>,
}

impl UnackedMemory {
    /// Starts from the unacked count the status last reported.
    pub fn seeded(last_known: Option<u64>) -> Self {
        Self {
            last_known,
            unknown_reads: 0,
        }
    }

    /// The observation of `read` (an unknown unacked count replaced by the
    /// last known one), remembering its unacked count when it has one.
    pub fn absorb(&mut self, read: &QueueRead) -> Absorbed {
        let observation = observation(read, self.last_known);
        let from = match (read.unacked, self.last_known) {
            (Some(_), _) => UnackedFrom::Management,
            (None, Some(_)) => UnackedFrom::LastKnown,
            (None, None) => UnackedFrom::AssumedZero,
        };
        match read.unacked {
            Some(measured) => {
                self.last_known = Some(measured);
                self.unknown_reads = 0;
            }
            None => self.unknown_reads = self.unknown_reads.saturating_add(1),
        }
        Absorbed {
            observation,
            from,
            unknown_reads: read.unacked.is_none().then_some(self.unknown_reads),
        }
    }
}

/// The observation for the decision and the status: an unknown unacked
/// count is replaced by `last_known_unacked`, or 0 when nothing is known.
///
/// Several queues: each queue with an unknown unacked count counts 0 for
/// it in `queues`, and the total is at least `last_known_unacked`; the
/// reconciler still never scales a running target to zero on such a read.
pub fn observation(read: &QueueRead, last_known_unacked: Option<u64>) -> Observation {
    if read.queues.is_empty() {
        return Observation::new(
            read.ready,
            read.unacked.or(last_known_unacked).unwrap_or(0),
            read.consumers,
            read.publish_rate,
            read.ack_rate,
            read.observed_at,
        );
    }
    let queues = read
        .queues
        .iter()
        .map(|(name, read)| QueueObservation {
            name: name.clone(),
            ready: read.ready,
            unacked: read.unacked.unwrap_or(0),
            consumers: read.consumers,
            publish_rate: read.publish_rate,
            ack_rate: read.ack_rate,
        })
        .collect();
    let mut observation = Observation::of_queues(queues, read.observed_at);
    if read.unacked.is_none() {
        observation.unacked = observation.unacked.max(last_known_unacked.unwrap_or(0));
    }
    observation
}

/// With the unacked count unknown, replaces a decision to scale a running
/// target (`current > 0`) to zero by holding its replicas (capped at
/// `max_replicas`), as for missing metrics: messages may still be in
/// flight. Any other decision stands (the last known unacked count already
/// went into it). `unknown_reads`: reads in a row without an unacked count.
pub fn hold_if_unacked_unknown(
    decision: Decision,
    current: i32,
    max_replicas: i32,
    unknown_reads: u32,
) -> Decision {
    if decision.replicas != 0 || current <= 0 {
        return decision;
    }
    let held = current.min(max_replicas.max(1));
    Decision {
        replicas: held,
        recommendation: held,
        reason: Reason::MetricsUnavailable {
            consecutive_failures: unknown_reads,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::ReadySource;
    use chrono::Utc;

    fn decision(replicas: i32, reason: Reason) -> Decision {
        Decision {
            replicas,
            recommendation: replicas,
            reason,
        }
    }

    fn read(ready: u64, unacked: Option<u64>) -> QueueRead {
        QueueRead {
            ready,
            unacked,
            consumers: 1,
            publish_rate: None,
            ack_rate: None,
            ready_source: ReadySource::PassiveDeclare,
            observed_at: Utc::now(),
            queues: Vec::new(),
        }
    }

    #[test]
    fn the_last_known_count_stands_in_and_unknown_reads_are_counted() {
        let mut memory = UnackedMemory::default();
        let first = memory.absorb(&read(5, None));
        assert_eq!(first.from, UnackedFrom::AssumedZero);
        assert_eq!(
            (first.observation.unacked, first.unknown_reads),
            (0, Some(1))
        );
        let measured = memory.absorb(&read(5, Some(3)));
        assert_eq!(measured.from, UnackedFrom::Management);
        assert_eq!(
            (measured.observation.unacked, measured.unknown_reads),
            (3, None)
        );
        let second = memory.absorb(&read(2, None));
        let third = memory.absorb(&read(2, None));
        assert_eq!(second.from.label(), "last_known");
        assert_eq!(
            (second.observation.unacked, second.unknown_reads),
            (3, Some(1))
        );
        assert_eq!(third.unknown_reads, Some(2));
        let seeded = UnackedMemory::seeded(Some(7)).absorb(&read(0, None));
        assert_eq!(
            (seeded.observation.unacked, seeded.from),
            (7, UnackedFrom::LastKnown)
        );
    }

    #[test]
    fn unknown_unacked_never_takes_a_running_target_to_zero() {
        let to_zero = || decision(0, Reason::QueueEmpty);
        let held = hold_if_unacked_unknown(to_zero(), 3, 10, 2);
        assert_eq!((held.replicas, held.recommendation), (3, 3));
        assert_eq!(
            held.reason,
            Reason::MetricsUnavailable {
                consecutive_failures: 2
            }
        );
        // Held within maxReplicas.
        assert_eq!(hold_if_unacked_unknown(to_zero(), 12, 10, 1).replicas, 10);
        // Staying at zero, scaling down to one, scaling up: unchanged.
        assert_eq!(hold_if_unacked_unknown(to_zero(), 0, 10, 1), to_zero());
        let down = decision(
            1,
            Reason::CooldownPending {
                remaining_seconds: 30,
            },
        );
        assert_eq!(hold_if_unacked_unknown(down.clone(), 4, 10, 1), down);
        let up = decision(
            5,
            Reason::Backlog {
                messages: 25,
                per_replica: 5,
            },
        );
        assert_eq!(hold_if_unacked_unknown(up.clone(), 1, 10, 1), up);
    }
}
