//! Step 1 of a reconcile: observe the queue. The read itself is the
//! [`QueueObserver`](crate::observe::QueueObserver)'s; this step folds its
//! result into the scaler's memory (failures in a row, the unacked count,
//! see [`super::unacked`]; recent drops of the ready count, see
//! [`super::in_flight`]) and into the decision's input.

use std::time::Duration;

use warren_crd::Observation;
use warren_scaling::DecisionInput;

use super::context::{Context, Memory};
use super::unacked::UnackedFrom;
use crate::metrics::ObservationLabels;
use crate::observe::{BrokerTarget, ObserveError, QueueRead, ReadySource};

/// What the observe step hands to the decision and the status.
#[derive(Debug, Clone)]
pub struct Observed {
    /// What the decision uses: the observation with the unacked count
    /// raised by the in-flight guard ([`super::in_flight`]).
    pub input: DecisionInput,
    /// This tick's observation as measured (`None` when paused or the read
    /// failed): the status shows it.
    pub observation: Option<Observation>,
    /// Messages the in-flight guard added to the measured unacked count.
    pub in_flight_raised: u64,
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
            in_flight_raised: 0,
        };
    }
    let read = ctx.observer.observe(target).await;
    let observed = absorb(read, current, memory, ctx.settings.in_flight_horizon);
    if let Some((ready, unacked)) = observed.read_from {
        let labels = ObservationLabels {
            ready: ready.label().to_string(),
            unacked: unacked.label().to_string(),
        };
        ctx.metrics.observations.get_or_create(&labels).inc();
    }
    if observed.in_flight_raised > 0 {
        ctx.metrics.record_in_flight_guard("raised");
    }
    observed
}

/// Folds one read into `memory`: a good read resets the failures, updates
/// the unacked count and goes through the in-flight guard (`horizon`: how
/// old the management sample can be); a failed one counts one more failure.
pub(super) fn absorb(
    read: Result<QueueRead, ObserveError>,
    current: i32,
    memory: &mut Memory,
    horizon: Duration,
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
            let guarded = memory.in_flight.observe(
                &absorbed.observation,
                read.ready_source,
                read.unacked.is_some(),
                horizon,
            );
            if guarded.raised_by > 0 {
                tracing::debug!(
                    measured_unacked = absorbed.observation.unacked,
                    counted_unacked = guarded.observation.unacked,
                    "counting messages that left ready as in flight (the unacked sample may predate it)"
                );
            }
            Observed {
                input: DecisionInput::observed(current, guarded.observation),
                observation: Some(absorbed.observation),
                in_flight_raised: guarded.raised_by,
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
                in_flight_raised: 0,
            }
        }
    }
}
