//! The in-flight guard: the management API's unacked count lags the ready
//! count, so messages a consumer just took are counted as in flight until a
//! management sample newer than the take can have arrived.
//!
//! The ready count comes from an AMQP passive declare (exact, now), the
//! unacked count from the management API, a sample up to RabbitMQ's
//! `collect_statistics_interval` old (plus the controller's own sharing of
//! the answer, `WARREN_STATS_MAX_AGE_MS`): the *horizon*. When workers take
//! messages, `ready` drops at once while the sampled unacked count still
//! shows fewer than they hold, so `ready + unacked` falls although the work
//! is still there. Decided on as is, the recommendation falls early, the
//! scale-down stabilization window starts early and the queue looks empty
//! (scale to zero) with jobs in hand.
//!
//! A message leaves `ready` by going to a consumer (or by a purge or an
//! expiry): it is in flight until acked. So, per queue, while a drop of the
//! ready count is younger than the horizon (the unacked sample may predate
//! it), the total the decision sees (`ready + unacked`) is held at
//! `max(measured, min(previous held total, measured + recent drops))`:
//! - never below what was measured: the guard only raises the in-flight
//!   count, so a scale-up is never slower;
//! - never above the total held on the previous read: it holds what was
//!   already seen, it never creates work (no scale-up of its own beyond a
//!   recommendation already made);
//! - never more than the drops of the last horizon above the measurement:
//!   once no drop is younger than the horizon, the measurement stands
//!   (a measured 0 after a quiet horizon scales to zero at once).
//!
//! The cost: a scale-down (or the step to zero) waits at most one horizon
//! after the last drop of the ready count. The status keeps the measured
//! counts; the guard shows in the `in_flight_guard` metric and, when it
//! changed a decision, in the `Ready` condition's message (see
//! [`super::decide`]).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use warren_crd::Observation;

use crate::observe::ReadySource;

/// One queue's memory: the last ready count, the total the last decision
/// saw, and the drops of the ready count younger than the horizon.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct QueueLag {
    ready: Option<u64>,
    held_total: u64,
    drops: VecDeque<(DateTime<Utc>, u64)>,
}

impl QueueLag {
    /// The unacked count to decide on for a read of `ready` and `unacked`
    /// (measured) at `now`: `unacked` raised by what the measurement may miss
    /// (see the module documentation). Remembers the read.
    pub fn guarded_unacked(
        &mut self,
        ready: u64,
        unacked: u64,
        now: DateTime<Utc>,
        horizon: Duration,
    ) -> u64 {
        if let Some(drop) = self.ready.and_then(|previous| previous.checked_sub(ready))
            && drop > 0
        {
            self.drops.push_back((now, drop));
        }
        self.ready = Some(ready);
        let cutoff = now - TimeDelta::from_std(horizon).unwrap_or(TimeDelta::MAX);
        while self.drops.front().is_some_and(|(at, _)| *at <= cutoff) {
            self.drops.pop_front();
        }
        let recent = self
            .drops
            .iter()
            .fold(0u64, |sum, (_, drop)| sum.saturating_add(*drop));
        let measured = ready.saturating_add(unacked);
        let held = if recent == 0 {
            measured
        } else {
            measured.max(self.held_total.min(measured.saturating_add(recent)))
        };
        self.held_total = held;
        held - ready
    }
}

/// The guard's memory for one scaler: one [`QueueLag`] per queue (the
/// single queue of a one-queue scaler under the name `""`).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct InFlightGuard {
    queues: HashMap<String, QueueLag>,
}

/// An observation after the guard.
#[derive(Debug, Clone, PartialEq)]
pub struct Guarded {
    /// What the decision uses: the measured observation with its unacked
    /// counts raised.
    pub observation: Observation,
    /// Messages the guard added to the unacked count (0: it did nothing).
    pub raised_by: u64,
}

impl InFlightGuard {
    /// [`Self::apply`] when the ready count came from the passive declare
    /// (`ready_source`); when it came from the management API too, ready and
    /// unacked are one sample, consistent with each other: the observation
    /// stands and the guard starts over.
    pub fn observe(
        &mut self,
        observation: &Observation,
        ready_source: ReadySource,
        horizon: Duration,
    ) -> Guarded {
        match ready_source {
            ReadySource::PassiveDeclare => self.apply(observation, horizon),
            ReadySource::Management => {
                *self = Self::default();
                Guarded {
                    observation: observation.clone(),
                    raised_by: 0,
                }
            }
        }
    }

    /// `observation` (measured at `observation.observed_at`) with each
    /// queue's unacked count raised by what a management sample up to
    /// `horizon` old may miss. Forgets queues the observation no longer has.
    pub fn apply(&mut self, observation: &Observation, horizon: Duration) -> Guarded {
        let now = observation.observed_at;
        let mut guarded = observation.clone();
        let mut raised_by = 0u64;
        if guarded.queues.is_empty() {
            self.queues.retain(|name, _| name.is_empty());
            let lag = self.queues.entry(String::new()).or_default();
            let unacked = lag.guarded_unacked(guarded.ready, guarded.unacked, now, horizon);
            raised_by = unacked.saturating_sub(guarded.unacked);
        } else {
            self.queues
                .retain(|name, _| guarded.queues.iter().any(|q| q.name == *name));
            for queue in &mut guarded.queues {
                let lag = self.queues.entry(queue.name.clone()).or_default();
                let unacked = lag.guarded_unacked(queue.ready, queue.unacked, now, horizon);
                raised_by = raised_by.saturating_add(unacked.saturating_sub(queue.unacked));
                queue.unacked = unacked;
            }
        }
        guarded.unacked = guarded.unacked.saturating_add(raised_by);
        Guarded {
            observation: guarded,
            raised_by,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_crd::QueueObservation;

    const HORIZON: Duration = Duration::from_secs(6);

    fn at(start: DateTime<Utc>, millis: i64) -> DateTime<Utc> {
        start + TimeDelta::milliseconds(millis)
    }

    #[test]
    fn messages_taken_by_consumers_stay_counted_until_the_sample_can_show_them() {
        // Pods take jobs one after another: ready 40 -> 30 -> 10 -> 0 while
        // the management API still reports the 0 unacked of before.
        let t0 = Utc::now();
        let mut lag = QueueLag::default();
        let reads = [(0, 40, 0), (1000, 30, 0), (2000, 10, 0), (3000, 0, 0)];
        let guarded: Vec<u64> = reads
            .iter()
            .map(|&(ms, ready, unacked)| lag.guarded_unacked(ready, unacked, at(t0, ms), HORIZON))
            .collect();
        assert_eq!(guarded, vec![0, 10, 30, 40]);
        // The sample catches up (38 in hand, 2 acked): the measurement is
        // more than the guard would hold on its own, so the total is held
        // at the 40 seen until the last drop (3 s) is a horizon old.
        assert_eq!(lag.guarded_unacked(0, 38, at(t0, 5000), HORIZON), 40);
        assert_eq!(lag.guarded_unacked(0, 38, at(t0, 8500), HORIZON), 40);
        // 9 s: every drop is older than the horizon: the measurement stands.
        assert_eq!(lag.guarded_unacked(0, 38, at(t0, 9000), HORIZON), 38);
        assert_eq!(lag.guarded_unacked(0, 0, at(t0, 10_000), HORIZON), 0);
    }

    #[test]
    fn the_guard_never_lowers_a_measurement_nor_holds_more_than_was_seen() {
        let t0 = Utc::now();
        let mut lag = QueueLag::default();
        assert_eq!(lag.guarded_unacked(10, 0, t0, HORIZON), 0);
        // New messages: the measurement passes through (scale-up not slowed).
        assert_eq!(lag.guarded_unacked(50, 2, at(t0, 1000), HORIZON), 2);
        // 20 taken (and maybe acked already): at most the 20 taken are added
        // to the measurement (50 held, below the 52 seen).
        assert_eq!(lag.guarded_unacked(30, 0, at(t0, 2000), HORIZON), 20);
        // A later burst raises the measured total over the held one.
        assert_eq!(lag.guarded_unacked(100, 5, at(t0, 3000), HORIZON), 5);
        // 5 more taken: the 105 seen is held (the drops of the horizon, 25,
        // would allow 120).
        assert_eq!(lag.guarded_unacked(95, 0, at(t0, 4000), HORIZON), 10);
        // Nothing taken for a horizon: the measurement stands.
        assert_eq!(lag.guarded_unacked(95, 0, at(t0, 10_000), HORIZON), 0);
    }

    #[test]
    fn a_fresh_measurement_without_a_recent_drop_stands() {
        let t0 = Utc::now();
        let mut lag = QueueLag::default();
        // First read ever: nothing to compare with.
        assert_eq!(lag.guarded_unacked(0, 0, t0, HORIZON), 0);
        // Ready rising or unchanged is no drop.
        assert_eq!(lag.guarded_unacked(3, 0, at(t0, 500), HORIZON), 0);
        assert_eq!(lag.guarded_unacked(3, 1, at(t0, 900), HORIZON), 1);
        // A zero horizon turns the guard off.
        assert_eq!(lag.guarded_unacked(0, 0, at(t0, 1000), Duration::ZERO), 0);
    }

    #[test]
    fn several_queues_are_guarded_one_by_one_and_gone_queues_forgotten() {
        let t0 = Utc::now();
        let queue = |name: &str, ready, unacked| QueueObservation {
            name: name.into(),
            ready,
            unacked,
            consumers: 1,
            publish_rate: None,
            ack_rate: None,
        };
        let observe = |queues, ms| Observation::of_queues(queues, at(t0, ms));
        let mut guard = InFlightGuard::default();
        let first = observe(vec![queue("a", 8, 0), queue("b", 4, 1)], 0);
        assert_eq!(guard.apply(&first, HORIZON).raised_by, 0);
        // a: 8 -> 2 taken; b: 4 -> 6 published.
        let second = observe(vec![queue("a", 2, 0), queue("b", 6, 1)], 1000);
        let guarded = guard.apply(&second, HORIZON);
        assert_eq!(guarded.raised_by, 6);
        let unacked: Vec<u64> = guarded
            .observation
            .queues
            .iter()
            .map(|q| q.unacked)
            .collect();
        assert_eq!(unacked, vec![6, 1]);
        assert_eq!(guarded.observation.unacked, 7);
        assert_eq!(guarded.observation.ready, 8);
        // Queue a goes away (pattern no longer matches): forgotten.
        let third = observe(vec![queue("b", 6, 1)], 2000);
        assert_eq!(guard.apply(&third, HORIZON).raised_by, 0);
        assert_eq!(guard.queues.len(), 1);
    }

    #[test]
    fn counts_from_one_management_sample_stand_and_the_guard_starts_over() {
        let t0 = Utc::now();
        let observe = |ready, ms| Observation::new(ready, 0, 1, None, None, at(t0, ms));
        let mut guard = InFlightGuard::default();
        let declared = ReadySource::PassiveDeclare;
        assert_eq!(
            guard.observe(&observe(9, 0), declared, HORIZON).raised_by,
            0
        );
        // Ready and unacked from the same sample: consistent, nothing added.
        let sampled = guard.observe(&observe(0, 1000), ReadySource::Management, HORIZON);
        assert_eq!((sampled.raised_by, sampled.observation.unacked), (0, 0));
        assert_eq!(guard, InFlightGuard::default());
        // Back to the declare: no earlier ready to compare with.
        assert_eq!(
            guard
                .observe(&observe(0, 2000), declared, HORIZON)
                .raised_by,
            0
        );
        assert_eq!(
            guard
                .observe(&observe(0, 3000), declared, HORIZON)
                .raised_by,
            0
        );
        // A drop seen by the declare is guarded again.
        let mut guard = InFlightGuard::default();
        guard.observe(&observe(9, 0), declared, HORIZON);
        assert_eq!(
            guard
                .observe(&observe(0, 1000), declared, HORIZON)
                .raised_by,
            9
        );
    }
}
