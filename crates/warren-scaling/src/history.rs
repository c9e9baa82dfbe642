//! What the decision remembers between ticks, per scaler.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use warren_crd::{Observation, QueueScalerSpec};

use crate::{Decision, DecisionInput, Metrics};

/// A recommendation made at some instant (before stabilization and policies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recommendation {
    pub at: DateTime<Utc>,
    pub replicas: i32,
}

/// A change of the target's replicas that was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaleEvent {
    pub at: DateTime<Utc>,
    pub from: i32,
    pub to: i32,
}

/// Per-scaler memory: recent recommendations (stabilization windows), recent
/// scale events (policy periods) and since when the queue has been empty
/// (cooldown to zero). The controller keeps one in memory per QueueScaler;
/// after a restart it starts empty, which only makes the scaler more
/// cautious (no stabilization memory, cooldown restarts).
///
/// Use: `let d = decide(&spec, &input, &history, now);`, then
/// `history.record(&spec, &input, &d, now)`, and after a successful patch of
/// the target `history.record_scale(now, current, d.replicas)`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    recommendations: Vec<Recommendation>,
    scale_events: Vec<ScaleEvent>,
    empty_since: Option<DateTime<Utc>>,
}

impl History {
    pub fn new() -> Self {
        Self::default()
    }

    /// Remembers one decision: the queue's emptiness and the recommendation
    /// (only decisions based on an observation; paused and missing-metrics
    /// decisions recommend nothing). Drops what is older than the spec's
    /// longest window or period.
    pub fn record(
        &mut self,
        spec: &QueueScalerSpec,
        input: &DecisionInput,
        decision: &Decision,
        now: DateTime<Utc>,
    ) {
        if let Metrics::Observed(observation) = &input.metrics {
            self.observe_queue(observation, now);
            if !spec.paused {
                self.push_recommendation(now, decision.recommendation);
            }
        }
        self.prune(now, spec.history_retention());
    }

    /// Remembers that the target was scaled from `from` to `to` at `at`.
    /// Call it only when the change was applied.
    pub fn record_scale(&mut self, at: DateTime<Utc>, from: i32, to: i32) {
        if from != to {
            self.scale_events.push(ScaleEvent { at, from, to });
        }
    }

    /// Tracks since when the queue has been empty (no ready, no unacked).
    pub fn observe_queue(&mut self, observation: &Observation, now: DateTime<Utc>) {
        if observation.is_empty() {
            self.empty_since.get_or_insert(now);
        } else {
            self.empty_since = None;
        }
    }

    /// Adds a recommendation.
    pub fn push_recommendation(&mut self, at: DateTime<Utc>, replicas: i32) {
        self.recommendations.push(Recommendation { at, replicas });
    }

    /// Drops recommendations and scale events older than `retention`.
    pub fn prune(&mut self, now: DateTime<Utc>, retention: Duration) {
        let cutoff = now - TimeDelta::from_std(retention).unwrap_or(TimeDelta::MAX);
        self.recommendations.retain(|r| r.at > cutoff);
        self.scale_events.retain(|e| e.at > cutoff);
    }

    pub fn recommendations(&self) -> &[Recommendation] {
        &self.recommendations
    }

    pub fn scale_events(&self) -> &[ScaleEvent] {
        &self.scale_events
    }

    /// Since when the queue has been seen empty, if it is empty.
    pub fn empty_since(&self) -> Option<DateTime<Utc>> {
        self.empty_since
    }

    /// Sets since when the queue has been empty (tests, restored state).
    pub fn with_empty_since(mut self, since: Option<DateTime<Utc>>) -> Self {
        self.empty_since = since;
        self
    }

    /// Adds a recommendation (builder form).
    pub fn with_recommendation(mut self, at: DateTime<Utc>, replicas: i32) -> Self {
        self.push_recommendation(at, replicas);
        self
    }

    /// Adds a scale event (builder form).
    pub fn with_scale(mut self, at: DateTime<Utc>, from: i32, to: i32) -> Self {
        self.record_scale(at, from, to);
        self
    }

    /// Recommendations made strictly after `now - window_seconds`.
    pub(crate) fn recommendations_within(
        &self,
        now: DateTime<Utc>,
        window_seconds: u32,
    ) -> impl Iterator<Item = i32> + '_ {
        let cutoff = now - TimeDelta::seconds(i64::from(window_seconds));
        self.recommendations
            .iter()
            .filter(move |r| r.at > cutoff)
            .map(|r| r.replicas)
    }

    /// Replicas added and removed by scale events strictly after
    /// `now - period_seconds`, as (added, removed). Steps from or to zero
    /// (activation, scale to zero) are not rate-limited and do not count.
    pub(crate) fn changes_within(&self, now: DateTime<Utc>, period_seconds: u32) -> (i64, i64) {
        let cutoff = now - TimeDelta::seconds(i64::from(period_seconds));
        self.scale_events
            .iter()
            .filter(|e| e.at > cutoff && e.from > 0 && e.to > 0)
            .fold((0, 0), |(added, removed), e| {
                let change = i64::from(e.to) - i64::from(e.from);
                if change > 0 {
                    (added + change, removed)
                } else {
                    (added, removed - change)
                }
            })
    }
}
