//! The scaling decision of a QueueScaler, as a pure function of
//! (spec, input, history, now): [`decide`].
//!
//! The pipeline, for an observation of the queue:
//! 1. **Recommend** ([`size`], [`counted_messages`]): size by backlog
//!    (`ceil(counted / messagesPerReplica)`) or, with `targetDrainSeconds`
//!    and a measured per-replica ack rate, by rates; apply activation from
//!    zero, the cooldown before zero, and `[minReplicas, maxReplicas]`.
//! 2. **Stabilize** ([`stabilize()`]): HPA stabilization windows.
//! 3. **Limit** ([`scale_up_limit`], [`scale_down_limit`]): HPA rate policies,
//!    for a running target. The step from zero (activation) goes straight to
//!    the recommendation (unless `selectPolicy: Disabled`), and steps from or to zero do not count in the
//!    policies' periods: the HPA never takes those steps either (KEDA's
//!    activation does), and a queue's backlog is an exact count of the work,
//!    so starting fewer pods than it asks for only delays the drain.
//! 4. **Bound**: the result is clamped to `[minReplicas, maxReplicas]` again
//!    (bounds win over policies when the target sits outside them).
//!
//! Special cases that skip the pipeline:
//! - `paused`: the current count is kept, even outside the bounds.
//! - Metrics unavailable: the current count is held (within bounds); after
//!   `fallback.failureThreshold` failures in a row and with
//!   `fallback.replicas` set, at least `fallback.replicas` run (never fewer
//!   than now: missing data never scales down, and never to zero).
//! - Scale to zero: once the queue (ready and unacked) has been empty for
//!   `cooldownSeconds` with `minReplicas` 0, the target goes to zero at
//!   once. The cooldown alone governs this step (as KEDA does); the
//!   scale-down window and policies do not delay it further.
//!
//! Guarantees (property-tested): the result is within bounds unless paused;
//! a scale-down never goes below the highest recommendation of the
//! scale-down window (except the step to zero after the cooldown); never
//! from N to 0 while messages are unacked; never to 0 on missing data.

mod history;
mod policy;
mod reason;
mod recommend;
mod stabilize;

use chrono::{DateTime, Utc};
use warren_crd::{Observation, QueueScalerSpec};

pub use history::{History, Recommendation, ScaleEvent};
pub use policy::{scale_down_limit, scale_up_limit};
pub use reason::Reason;
pub use recommend::{counted_messages, size};
pub use stabilize::stabilize;

/// What the controller knows at decision time.
#[derive(Debug, Clone, PartialEq)]
pub struct DecisionInput {
    /// Replicas of the target now (`spec.replicas` of its `/scale`).
    pub current_replicas: i32,
    /// The queue read of this tick.
    pub metrics: Metrics,
}

/// The result of reading the queue.
#[derive(Debug, Clone, PartialEq)]
pub enum Metrics {
    Observed(Observation),
    /// The read failed; `consecutive_failures` counts this one.
    Unavailable {
        consecutive_failures: u32,
    },
}

impl DecisionInput {
    pub fn observed(current_replicas: i32, observation: Observation) -> Self {
        DecisionInput {
            current_replicas,
            metrics: Metrics::Observed(observation),
        }
    }

    pub fn unavailable(current_replicas: i32, consecutive_failures: u32) -> Self {
        DecisionInput {
            current_replicas,
            metrics: Metrics::Unavailable {
                consecutive_failures,
            },
        }
    }
}

/// The replica count to set, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Replicas the target should have.
    pub replicas: i32,
    /// The unsmoothed recommendation (step 1), what [`History::record`] keeps.
    pub recommendation: i32,
    /// The step that determined `replicas`.
    pub reason: Reason,
}

impl Decision {
    /// Metrics are missing and the fallback rule applies (condition Fallback).
    pub fn is_fallback(&self) -> bool {
        matches!(self.reason, Reason::Fallback { .. })
    }

    /// The decision changes the target's replicas.
    pub fn changes(&self, current_replicas: i32) -> bool {
        self.replicas != current_replicas
    }
}

/// Decides the target's replica count. Pure: the same arguments give the
/// same decision. See the crate documentation for the rules.
pub fn decide(
    spec: &QueueScalerSpec,
    input: &DecisionInput,
    history: &History,
    now: DateTime<Utc>,
) -> Decision {
    let current = input.current_replicas.max(0);
    if spec.paused {
        return Decision {
            replicas: current,
            recommendation: current,
            reason: Reason::Paused,
        };
    }
    match &input.metrics {
        Metrics::Unavailable {
            consecutive_failures,
        } => decide_without_metrics(spec, current, *consecutive_failures),
        Metrics::Observed(observation) => {
            decide_from_observation(spec, observation, current, history, now)
        }
    }
}

/// Hold the current count; after `failureThreshold` failures run at least
/// `fallback.replicas` (clamped to `[max(minReplicas, 1), maxReplicas]`).
fn decide_without_metrics(spec: &QueueScalerSpec, current: i32, failures: u32) -> Decision {
    let (min, max) = bounds(spec);
    let held = current.clamp(min, max);
    let (replicas, reason) = match spec.fallback.replicas {
        Some(fallback) if failures >= spec.fallback.failure_threshold => {
            let fallback = fallback.clamp(min.max(1).min(max), max);
            (
                held.max(fallback),
                Reason::Fallback {
                    consecutive_failures: failures,
                    fallback_replicas: fallback,
                },
            )
        }
        _ => (
            held,
            Reason::MetricsUnavailable {
                consecutive_failures: failures,
            },
        ),
    };
    Decision {
        replicas,
        recommendation: replicas,
        reason,
    }
}

fn decide_from_observation(
    spec: &QueueScalerSpec,
    observation: &Observation,
    current: i32,
    history: &History,
    now: DateTime<Utc>,
) -> Decision {
    let target = recommend::recommend(spec, observation, current, history, now);
    let recommendation = target.replicas;
    let decision = |replicas, reason| Decision {
        replicas,
        recommendation,
        reason,
    };

    // The step to zero after the cooldown is not smoothed further.
    if recommendation == 0 {
        return decision(0, target.reason);
    }

    let stabilized = stabilize(spec, recommendation, current, history, now);
    let mut reason = if stabilized < recommendation {
        Reason::ScaleUpStabilized {
            window_seconds: spec.behavior.scale_up.stabilization_window_seconds,
            recommendation,
        }
    } else if stabilized > recommendation {
        Reason::ScaleDownStabilized {
            window_seconds: spec.behavior.scale_down.stabilization_window_seconds,
            recommendation,
        }
    } else {
        target.reason
    };

    let mut replicas = stabilized;
    // From zero: straight to the recommendation (see step 3 above), unless
    // scale-up is disabled altogether.
    let activation =
        current == 0 && spec.behavior.scale_up.select_policy != warren_crd::SelectPolicy::Disabled;
    if stabilized > current && !activation {
        let limit = scale_up_limit(spec, current, history, now);
        if stabilized > limit {
            replicas = limit;
            reason = Reason::ScaleUpLimited {
                limit,
                wanted: stabilized,
            };
        }
    } else if stabilized < current {
        let limit = scale_down_limit(spec, current, history, now);
        if stabilized < limit {
            replicas = limit;
            reason = Reason::ScaleDownLimited {
                limit,
                wanted: stabilized,
            };
        }
    }

    let (min, max) = bounds(spec);
    if replicas > max {
        reason = Reason::AtMaxReplicas {
            wanted: replicas as u64,
        };
    } else if replicas < min {
        reason = Reason::AtMinReplicas {
            wanted: replicas.max(0) as u64,
        };
    }
    decision(replicas.clamp(min, max), reason)
}

/// `[minReplicas, maxReplicas]`, made consistent for a spec that failed
/// validation (negative min becomes 0, max below min becomes min).
pub(crate) fn bounds(spec: &QueueScalerSpec) -> (i32, i32) {
    let min = spec.min_replicas.max(0);
    (min, spec.max_replicas.max(min))
}
