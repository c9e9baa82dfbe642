//! Step 1 of a reconcile: observe the queue. The read itself is the
//! [`QueueObserver`](crate::observe::QueueObserver)'s; this step folds its
//! result into the scaler's memory (failures in a row, the unacked count,
//! see [`super::unacked`]) and into the decision's input.

use warren_crd::Observation;
use warren_scaling::DecisionInput;

use super::context::{Context, Memory};
use super::unacked::UnackedFrom;
use crate::metrics::ObservationLabels;
use crate::observe::{BrokerTarget, ObserveError, QueueRead, ReadySource};

/// What the observe step hands to the decision and the status.
#[derive(Debug, Clone)]
pub struct Observed {
    pub input: DecisionInput,
    /// This tick's observation (`None` when paused or the read failed).
    pub observation: Option<Observation>,
    /// Why the read failed, if it did.
    pub error: Option<ObserveError>,
    /// Failed reads in a row before this one.
    pub previous_failures: u32,
    /// Failed reads in a row, this one included (0 after a good read).
    pub failures: u32,
    /// Reads in a row without an unacked count, when this one had none.
    pub unacked_unknown: Option<u32>,
    /// Where a good read's ready and unacked counts came from.
    pub read_from: Option<(ReadySource, UnackedFrom)>,
}

/// Reads the queue (unless `paused`) and folds the result into `memory`.
pub(super) async fn observe(
    ctx: &Context,
    target: &BrokerTarget,
    paused: bool,
    current: i32,
    memory: &mut Memory,
) -> Observed {
    if paused {
        return Observed {
            input: DecisionInput::unavailable(current, memory.failures),
            observation: None,
            error: None,
            previous_failures: memory.failures,
            failures: memory.failures,
            unacked_unknown: None,
            read_from: None,
        };
    }
    let observed = absorb(ctx.observer.observe(target).await, current, memory);
    if let Some((ready, unacked)) = observed.read_from {
        let labels = ObservationLabels {
            ready: ready.label().to_string(),
            unacked: unacked.label().to_string(),
        };
        ctx.metrics.observations.get_or_create(&labels).inc();
    }
    observed
}

/// Folds one read into `memory`: a good read resets the failures and
/// updates the unacked count, a failed one counts one more failure.
pub(super) fn absorb(
    read: Result<QueueRead, ObserveError>,
    current: i32,
    memory: &mut Memory,
) -> Observed {
    let previous_failures = memory.failures;
    match read {
        Ok(read) => {
            let absorbed = memory.unacked.absorb(&read);
            if let Some(reads_in_a_row) = absorbed.unknown_reads {
                tracing::debug!(
                    unacked = absorbed.observation.unacked,
                    unacked_from = absorbed.from.label(),
                    reads_in_a_row,
                    "unacked count unknown (management API unavailable)"
                );
            }
            memory.failures = 0;
            Observed {
                input: DecisionInput::observed(current, absorbed.observation.clone()),
                observation: Some(absorbed.observation),
                error: None,
                previous_failures,
                failures: 0,
                unacked_unknown: absorbed.unknown_reads,
                read_from: Some((read.ready_source, absorbed.from)),
            }
        }
        Err(err) => {
            let failures = previous_failures.saturating_add(1);
            tracing::warn!(
                error = %err,
                failures_in_a_row = failures,
                "cannot read the queue"
            );
            memory.failures = failures;
            Observed {
                input: DecisionInput::unavailable(current, failures),
                observation: None,
                error: Some(err),
                previous_failures,
                failures,
                unacked_unknown: None,
                read_from: None,
            }
        }
    }
}
