//! The in-flight guard: the management API's unacked count lags the ready
//! count, so messages a consumer just took are counted as in flight until a
//! management sample newer than the take can have arrived.
//!
//! The ready count comes from an AMQP passive declare (exact, now), the
//! unacked count from the management API, a sample up to two of RabbitMQ's
//! `collect_statistics_interval` old (plus the controller's own sharing of
//! the answer, `WARREN_STATS_MAX_AGE_MS`): the *horizon*, see [`horizon`].
//! When workers take
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
//! While a read has no unacked count at all (unknown: the management API
//! failed or has no counts for the queue yet), no sample can show the drops:
//! they are kept, and age out a horizon after the last read without a count
//! (the first count that arrives may itself be a horizon old).
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

/// How old the management API's unacked count can be, for RabbitMQ's
/// `collect_statistics_interval` (`stats_interval`) and the controller's
/// sharing of management answers (`max_age`): two intervals plus the age.
/// A queue writes its counts on a timer of that interval and the
/// management plugin collects them on another: one message published to a
/// quorum queue (RabbitMQ 3.10, 5 s interval) showed in the management API
/// 4.0 to 8.6 s later, depending on the two timers' phases. Zero (both
/// settings 0) turns the guard off.
pub fn horizon(stats_interval: Duration, max_age: Duration) -> Duration {
    stats_interval.saturating_mul(2).saturating_add(max_age)
}

/// Drops remembered per queue at most; beyond, the two oldest are merged
/// (kept as long as the younger one: never forgotten earlier).
const MAX_DROPS: usize = 256;

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
    /// at `now`: `unacked` raised by what the measurement may miss (see the
    /// module documentation). Remembers the read. `horizon`: how old the
    /// unacked sample can be; `None` when this read had no sample at all
    /// (unacked unknown, `unacked` is the last known count): then no drop
    /// is old enough to be shown by it, every drop is kept.
    pub fn guarded_unacked(
        &mut self,
        ready: u64,
        unacked: u64,
        now: DateTime<Utc>,
        horizon: Option<Duration>,
    ) -> u64 {
        if let Some(drop) = self.ready.and_then(|previous| previous.checked_sub(ready))
            && drop > 0
        {
            if self.drops.len() >= MAX_DROPS
                && let Some((_, oldest)) = self.drops.pop_front()
                && let Some((_, next)) = self.drops.front_mut()
            {
                *next = next.saturating_add(oldest);
            }
            self.drops.push_back((now, drop));
        }
        self.ready = Some(ready);
        if horizon.is_none() {
            // No sample this read: the first one to come may predate now.
            for (at, _) in &mut self.drops {
                *at = now;
            }
        }
        let cutoff = horizon
            .and_then(|h| TimeDelta::from_std(h).ok())
            .and_then(|h| now.checked_sub_signed(h));
        while let Some(cutoff) = cutoff
            && self.drops.front().is_some_and(|(at, _)| *at <= cutoff)
        {
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
    /// (`ready_source`), with every drop kept while the read had no unacked
    /// count (`unacked_known` false: no sample can have shown them). When the
    /// ready count came from the management API too, ready and unacked are
    /// one sample, consistent with each other; with a zero `horizon` the
    /// guard is off: then the observation stands and the guard starts over.
    pub fn observe(
        &mut self,
        observation: &Observation,
        ready_source: ReadySource,
        unacked_known: bool,
        horizon: Duration,
    ) -> Guarded {
        match ready_source {
            ReadySource::PassiveDeclare if !horizon.is_zero() => {
                self.apply(observation, unacked_known.then_some(horizon))
            }
            _ => {
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
    /// `horizon` old (`None`: no sample) may miss. Forgets queues the
    /// observation no longer has.
    pub fn apply(&mut self, observation: &Observation, horizon: Option<Duration>) -> Guarded {
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

    const HORIZON: Option<Duration> = Some(Duration::from_secs(6));

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
        // A zero horizon: no drop is younger.
        assert_eq!(
            lag.guarded_unacked(0, 0, at(t0, 1000), Some(Duration::ZERO)),
            0
        );
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
        let horizon = Duration::from_secs(6);
        let declared = ReadySource::PassiveDeclare;
        let read = |guard: &mut InFlightGuard, ready, ms, source| {
            guard.observe(&observe(ready, ms), source, true, horizon)
        };
        let mut guard = InFlightGuard::default();
        assert_eq!(read(&mut guard, 9, 0, declared).raised_by, 0);
        // Ready and unacked from the same sample: consistent, nothing added.
        let sampled = read(&mut guard, 0, 1000, ReadySource::Management);
        assert_eq!((sampled.raised_by, sampled.observation.unacked), (0, 0));
        assert_eq!(guard, InFlightGuard::default());
        // Back to the declare: no earlier ready to compare with.
        assert_eq!(read(&mut guard, 0, 2000, declared).raised_by, 0);
        assert_eq!(read(&mut guard, 0, 3000, declared).raised_by, 0);
        // A drop seen by the declare is guarded again.
        let mut guard = InFlightGuard::default();
        read(&mut guard, 9, 0, declared);
        assert_eq!(read(&mut guard, 0, 1000, declared).raised_by, 9);
        // A zero horizon turns the guard off.
        let mut off = InFlightGuard::default();
        off.observe(&observe(9, 0), declared, true, Duration::ZERO);
        let zero = off.observe(&observe(0, 1000), declared, true, Duration::ZERO);
        assert_eq!(zero.raised_by, 0);
    }

    #[test]
    fn the_horizon_covers_two_statistics_intervals_and_the_shared_age() {
        let ms = Duration::from_millis;
        assert_eq!(horizon(ms(5000), ms(1000)), ms(11_000));
        assert_eq!(horizon(ms(1000), ms(0)), ms(2000));
        assert_eq!(horizon(ms(0), ms(0)), Duration::ZERO);
        // A quorum queue's counts showed 8.6 s late at the default 5 s
        // interval: a drop that old is still guarded.
        let t0 = Utc::now();
        let mut lag = QueueLag::default();
        let h = Some(horizon(ms(5000), ms(1000)));
        lag.guarded_unacked(2, 0, t0, h);
        assert_eq!(lag.guarded_unacked(0, 0, at(t0, 1000), h), 2);
        assert_eq!(lag.guarded_unacked(0, 0, at(t0, 9600), h), 2);
        assert_eq!(lag.guarded_unacked(0, 0, at(t0, 12_000), h), 0);
    }

    #[test]
    fn a_first_count_long_after_the_drops_does_not_release_them_at_once() {
        // A fresh queue: no counts while two workers take the two jobs; the
        // first count arrives 20 s later and still says 0 unacked (a sample
        // from before the takes). The jobs stay counted for a horizon.
        let t0 = Utc::now();
        let mut lag = QueueLag::default();
        lag.guarded_unacked(2, 0, t0, None);
        assert_eq!(lag.guarded_unacked(0, 0, at(t0, 1000), None), 2);
        assert_eq!(lag.guarded_unacked(0, 0, at(t0, 20_000), None), 2);
        assert_eq!(lag.guarded_unacked(0, 0, at(t0, 21_000), HORIZON), 2);
        assert_eq!(lag.guarded_unacked(0, 0, at(t0, 25_900), HORIZON), 2);
        assert_eq!(lag.guarded_unacked(0, 0, at(t0, 26_000), HORIZON), 0);
    }

    #[test]
    fn without_an_unacked_sample_the_drops_are_kept_until_one_arrives() {
        // The management API has no counts for the queue yet (unknown,
        // assumed 0): workers take 3 of 4 jobs. No sample can show them,
        // however long it takes; the first measured count after a horizon
        // stands.
        let t0 = Utc::now();
        let mut lag = QueueLag::default();
        assert_eq!(lag.guarded_unacked(4, 0, t0, None), 0);
        assert_eq!(lag.guarded_unacked(1, 0, at(t0, 1000), None), 3);
        assert_eq!(lag.guarded_unacked(1, 0, at(t0, 11_000), None), 3);
        assert_eq!(lag.guarded_unacked(1, 3, at(t0, 12_000), HORIZON), 3);
        // The first count may be a horizon old: the 4 seen are held until a
        // horizon after the last read without a count (11 s + 6 s).
        assert_eq!(lag.guarded_unacked(1, 2, at(t0, 12_500), HORIZON), 3);
        assert_eq!(lag.guarded_unacked(1, 2, at(t0, 16_900), HORIZON), 3);
        assert_eq!(lag.guarded_unacked(1, 2, at(t0, 17_000), HORIZON), 2);
        // Drops beyond the cap are merged, never dropped.
        let mut lag = QueueLag::default();
        lag.guarded_unacked(1000, 0, t0, None);
        for n in 1..=300 {
            lag.guarded_unacked(1000 - n, 0, at(t0, n as i64), None);
        }
        assert_eq!(lag.drops.len(), MAX_DROPS);
        assert_eq!(lag.guarded_unacked(700, 0, at(t0, 400), None), 300);
    }
}
