//! One table per rule of the decision.

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{default_spec, percent, pods, queue, queue_with_rates, spec, t};
use warren_crd::{QueueScalerSpec, SelectPolicy};
use warren_scaling::{Decision, DecisionInput, History, Reason, decide};

/// Recent recommendations as (age in seconds, replicas).
type Recent = &'static [(i64, i32)];
/// Recent scale events as (age in seconds, from, to).
type Events = &'static [(i64, i32, i32)];

fn observed(
    spec: &QueueScalerSpec,
    current: i32,
    ready: u64,
    unacked: u64,
    history: &History,
) -> Decision {
    decide(
        spec,
        &DecisionInput::observed(current, queue(ready, unacked)),
        history,
        t(1000),
    )
}

#[test]
fn backlog_rule_is_ceil_of_counted_over_messages_per_replica() {
    // (messagesPerReplica, countUnacked, current, ready, unacked, expected)
    let cases = [
        (5, true, 1, 1, 0, 1),
        (5, true, 1, 5, 0, 1),
        (5, true, 1, 6, 0, 2),
        (5, true, 1, 20, 5, 5),
        (5, false, 1, 20, 5, 4),
        (1, true, 3, 7, 0, 7),
        (3, true, 1, 0, 7, 3),
        (5, true, 4, 11, 0, 3),
    ];
    for (per_replica, count_unacked, current, ready, unacked, expected) in cases {
        let mut spec = spec();
        spec.messages_per_replica = per_replica;
        spec.count_unacked = count_unacked;
        let d = observed(&spec, current, ready, unacked, &History::new());
        assert_eq!(
            d.replicas, expected,
            "mpr {per_replica} countUnacked {count_unacked} ready {ready} unacked {unacked}"
        );
        assert_eq!(d.recommendation, expected);
        assert_eq!(d.reason.label(), "Backlog");
    }
}

#[test]
fn activation_applies_only_at_zero_replicas() {
    // (activationMessages, current, ready, expected, reason)
    let cases = [
        (0, 0, 0, 0, "QueueEmpty"),
        (0, 0, 1, 1, "Backlog"),
        (10, 0, 10, 0, "BelowActivation"),
        (10, 0, 11, 3, "Backlog"),
        // At one replica or more the threshold does not apply.
        (10, 1, 3, 1, "Backlog"),
        (10, 2, 10, 2, "Backlog"),
    ];
    for (activation, current, ready, expected, reason) in cases {
        let mut spec = spec();
        spec.activation_messages = activation;
        let d = observed(&spec, current, ready, 0, &History::new());
        assert_eq!(
            (d.replicas, d.reason.label()),
            (expected, reason),
            "activation {activation} current {current} ready {ready}"
        );
    }
}

#[test]
fn activation_does_not_apply_with_min_replicas_above_zero() {
    let mut spec = spec();
    spec.min_replicas = 2;
    spec.activation_messages = 100;
    let d = observed(&spec, 0, 3, 0, &History::new());
    assert_eq!((d.replicas, d.reason.label()), (2, "AtMinReplicas"));
}

#[test]
fn bounds_cap_and_raise_the_recommendation() {
    // (min, max, current, ready, expected, reason)
    let cases = [
        (0, 10, 1, 1000, 10, "AtMaxReplicas"),
        (2, 10, 5, 0, 2, "AtMinReplicas"),
        (2, 10, 2, 5, 2, "AtMinReplicas"),
        (3, 3, 1, 100, 3, "AtMaxReplicas"),
        // A target outside the bounds is brought back within them.
        (0, 4, 9, 50, 4, "AtMaxReplicas"),
        (5, 10, 1, 5, 5, "AtMinReplicas"),
    ];
    for (min, max, current, ready, expected, reason) in cases {
        let mut spec = spec();
        spec.min_replicas = min;
        spec.max_replicas = max;
        let d = observed(&spec, current, ready, 0, &History::new());
        assert_eq!(
            (d.replicas, d.reason.label()),
            (expected, reason),
            "min {min} max {max} current {current} ready {ready}"
        );
    }
}

#[test]
fn scale_to_zero_waits_for_an_empty_queue_and_the_cooldown() {
    // cooldown 60 s; now = t(1000).
    // (countUnacked, ready, unacked, empty_since, expected, reason)
    let cases = [
        (true, 0, 0, Some(t(940)), 0, "QueueEmpty"),
        (true, 0, 0, Some(t(0)), 0, "QueueEmpty"),
        (true, 0, 0, Some(t(941)), 1, "CooldownPending"),
        (true, 0, 0, None, 1, "CooldownPending"),
        (true, 0, 2, Some(t(0)), 1, "Backlog"),
        (false, 0, 2, Some(t(0)), 1, "UnackedInFlight"),
        (false, 0, 2, None, 1, "UnackedInFlight"),
    ];
    for (count_unacked, ready, unacked, empty_since, expected, reason) in cases {
        let mut spec = spec();
        spec.count_unacked = count_unacked;
        let history = History::new().with_empty_since(empty_since);
        let d = observed(&spec, 3, ready, unacked, &history);
        assert_eq!(
            (d.replicas, d.reason.label()),
            (expected, reason),
            "countUnacked {count_unacked} unacked {unacked} empty since {empty_since:?}"
        );
    }
}

#[test]
fn cooldown_pending_reports_the_remaining_seconds() {
    let history = History::new().with_empty_since(Some(t(990)));
    let d = observed(&spec(), 2, 0, 0, &history);
    assert_eq!(
        d.reason,
        Reason::CooldownPending {
            remaining_seconds: 50
        }
    );
}

#[test]
fn zero_cooldown_scales_to_zero_on_the_first_empty_read() {
    let mut spec = spec();
    spec.behavior.cooldown_seconds = 0;
    let d = observed(&spec, 4, 0, 0, &History::new());
    assert_eq!((d.replicas, d.reason.label()), (0, "QueueEmpty"));
}

#[test]
fn scale_to_zero_skips_the_scale_down_window_and_policies() {
    let mut spec = default_spec();
    spec.max_replicas = 10;
    let history = History::new()
        .with_empty_since(Some(t(0)))
        .with_recommendation(t(990), 8)
        .with_scale(t(995), 10, 8);
    let d = observed(&spec, 8, 0, 0, &history);
    assert_eq!((d.replicas, d.reason.label()), (0, "QueueEmpty"));
}

#[test]
fn min_replicas_above_zero_never_scales_to_zero() {
    let mut spec = spec();
    spec.min_replicas = 1;
    let history = History::new().with_empty_since(Some(t(0)));
    let d = observed(&spec, 3, 0, 0, &history);
    assert_eq!(d.replicas, 1);
}

#[test]
fn drain_rate_sizing_uses_measured_rates() {
    // targetDrainSeconds 60.
    // (ready, unacked, consumers, publish, ack, expected, reason)
    let cases = [
        // (2/s + 120/60) / (4/2) = 2
        (120, 0, 2, 2.0, 4.0, 2, "DrainRate"),
        // (10/s + 600/60) / (6/3) = 10
        (600, 0, 3, 10.0, 6.0, 10, "DrainRate"),
        // (0 + 61/60) / 1 -> 2
        (61, 0, 1, 0.0, 1.0, 2, "DrainRate"),
        // Queue momentarily empty but arrivals continue: ceil(3 / 1) = 3
        (0, 0, 2, 3.0, 2.0, 3, "DrainRate"),
        // Unacked count towards the backlog: (0 + 60/60) / 0.5 = 2
        (0, 60, 2, 0.0, 1.0, 2, "DrainRate"),
        // Huge demand is capped at maxReplicas.
        (100_000, 0, 1, 50.0, 1.0, 10, "AtMaxReplicas"),
    ];
    for (ready, unacked, consumers, publish, ack, expected, reason) in cases {
        let mut spec = spec();
        spec.target_drain_seconds = Some(60);
        let observation = queue_with_rates(ready, unacked, consumers, publish, ack);
        let d = decide(
            &spec,
            &DecisionInput::observed(2, observation),
            &History::new(),
            t(1000),
        );
        assert_eq!(
            (d.replicas, d.reason.label()),
            (expected, reason),
            "ready {ready} consumers {consumers} publish {publish} ack {ack}"
        );
    }
}

#[test]
fn drain_rate_falls_back_to_backlog_without_a_per_replica_rate() {
    let mut spec = spec();
    spec.target_drain_seconds = Some(60);
    // No consumers (e.g. at zero replicas): no per-replica rate.
    for observation in [
        queue_with_rates(12, 0, 0, 5.0, 0.0),
        queue_with_rates(12, 0, 3, 5.0, 0.0),
        queue(12, 0),
    ] {
        let d = decide(
            &spec,
            &DecisionInput::observed(1, observation),
            &History::new(),
            t(1000),
        );
        assert_eq!((d.replicas, d.reason.label()), (3, "Backlog"));
    }
}

#[test]
fn drain_rate_without_publish_rate_counts_no_arrivals() {
    let mut spec = spec();
    spec.target_drain_seconds = Some(10);
    let mut observation = queue_with_rates(40, 0, 2, 0.0, 4.0);
    observation.publish_rate = None;
    let d = decide(
        &spec,
        &DecisionInput::observed(2, observation),
        &History::new(),
        t(1000),
    );
    // (0 + 40/10) / 2 = 2
    assert_eq!((d.replicas, d.reason.label()), (2, "DrainRate"));
}

#[test]
fn scale_up_stabilization_takes_the_lowest_recent_recommendation() {
    let mut spec = spec();
    spec.behavior.scale_up.stabilization_window_seconds = 60;
    // (history recommendations (age seconds, replicas), current, ready, expected, reason)
    let cases: [(Recent, i32, u64, i32, &str); 4] = [
        (&[(30, 3)], 2, 40, 3, "ScaleUpStabilized"),
        (&[(30, 3), (10, 6)], 2, 40, 3, "ScaleUpStabilized"),
        // Outside the window: ignored.
        (&[(61, 3)], 2, 40, 8, "Backlog"),
        // The lowest recent one is at or below current: no scale-up yet.
        (&[(30, 1)], 2, 40, 2, "ScaleUpStabilized"),
    ];
    for (recent, current, ready, expected, reason) in cases {
        let history = recent.iter().fold(History::new(), |h, (age, replicas)| {
            h.with_recommendation(t(1000 - age), *replicas)
        });
        let d = observed(&spec, current, ready, 0, &history);
        assert_eq!(
            (d.replicas, d.reason.label()),
            (expected, reason),
            "{recent:?}"
        );
        assert_eq!(d.recommendation, 8);
    }
}

#[test]
fn scale_down_stabilization_takes_the_highest_recent_recommendation() {
    let mut spec = spec();
    spec.behavior.scale_down.stabilization_window_seconds = 300;
    let cases: [(Recent, i32, u64, i32, &str); 5] = [
        (&[(100, 7)], 8, 5, 7, "ScaleDownStabilized"),
        (&[(100, 7), (200, 9)], 8, 5, 8, "ScaleDownStabilized"),
        (&[(100, 4), (20, 3)], 8, 5, 4, "ScaleDownStabilized"),
        (&[(301, 7)], 8, 5, 1, "Backlog"),
        (&[], 8, 5, 1, "Backlog"),
    ];
    for (recent, current, ready, expected, reason) in cases {
        let history = recent.iter().fold(History::new(), |h, (age, replicas)| {
            h.with_recommendation(t(1000 - age), *replicas)
        });
        let d = observed(&spec, current, ready, 0, &history);
        assert_eq!(
            (d.replicas, d.reason.label()),
            (expected, reason),
            "{recent:?}"
        );
    }
}

#[test]
fn default_scale_up_policies_allow_four_pods_or_double_per_15s() {
    let spec = default_spec();
    // (current, ready, scale events (age, from, to), expected)
    let cases: [(i32, u64, Events, i32); 5] = [
        (1, 1000, &[], 5),
        (2, 1000, &[], 6),
        (10, 1000, &[], 20),
        // Already grew 2 -> 6 five seconds ago: the period started at 2.
        (6, 1000, &[(5, 2, 6)], 6),
        // That growth is older than the 15 s period: ignored.
        (6, 1000, &[(15, 2, 6)], 12),
    ];
    for (current, ready, events, expected) in cases {
        let history = events.iter().fold(History::new(), |h, (age, from, to)| {
            h.with_scale(t(1000 - age), *from, *to)
        });
        let d = observed(&spec, current, ready, 0, &history);
        assert_eq!(
            (d.replicas, d.reason.label()),
            (expected, "ScaleUpLimited"),
            "current {current} events {events:?}"
        );
    }
}

#[test]
fn scale_up_policies_select_max_min_or_disabled() {
    // Pods 2 / 60 s and Percent 50 / 60 s, from 10 replicas: 12 or 15.
    let cases = [
        (SelectPolicy::Max, 15, "ScaleUpLimited"),
        (SelectPolicy::Min, 12, "ScaleUpLimited"),
        (SelectPolicy::Disabled, 10, "ScaleUpLimited"),
    ];
    for (select, expected, reason) in cases {
        let mut spec = spec();
        spec.max_replicas = 100;
        spec.behavior.scale_up.policies = vec![pods(2, 60), percent(50, 60)];
        spec.behavior.scale_up.select_policy = select;
        let d = observed(&spec, 10, 500, 0, &History::new());
        assert_eq!(
            (d.replicas, d.reason.label()),
            (expected, reason),
            "{select:?}"
        );
    }
}

#[test]
fn the_step_from_zero_goes_straight_to_the_recommendation() {
    // Default policies (+4 pods or +100% per 15 s) and Percent-only ones
    // limit a running target; the activation is not limited. 40 ready at 5
    // per replica: 8 replicas at once; 1000 ready: maxReplicas.
    let mut spec = default_spec();
    spec.max_replicas = 20;
    let d = observed(&spec, 0, 40, 0, &History::new());
    assert_eq!((d.replicas, d.reason.label()), (8, "Backlog"));
    let d = observed(&spec, 0, 1000, 0, &History::new());
    assert_eq!((d.replicas, d.reason.label()), (20, "AtMaxReplicas"));
    spec.behavior.scale_up.policies = vec![percent(100, 60)];
    let d = observed(&spec, 0, 40, 0, &History::new());
    assert_eq!((d.replicas, d.reason.label()), (8, "Backlog"));
    // A running target is limited as before: from 1, at most 2 (+100%).
    let d = observed(&spec, 1, 40, 0, &History::new());
    assert_eq!((d.replicas, d.reason.label()), (2, "ScaleUpLimited"));
    // Disabled scale-up keeps even the activation from happening.
    spec.behavior.scale_up.select_policy = SelectPolicy::Disabled;
    let d = observed(&spec, 0, 40, 0, &History::new());
    assert_eq!((d.replicas, d.reason.label()), (0, "ScaleUpLimited"));
}

#[test]
fn steps_from_or_to_zero_do_not_count_in_the_policy_periods() {
    let spec = default_spec();
    // Activated 0 -> 8 five seconds ago: the period starts at 8, so 16
    // (+100%), not 4 (+4 from 0, i.e. no growth at all).
    let history = History::new().with_scale(t(995), 0, 8);
    let d = observed(&spec, 8, 1000, 0, &history);
    assert_eq!((d.replicas, d.reason.label()), (16, "ScaleUpLimited"));
    // A scale to zero and back within the period: the start is the
    // activation's 4, not 4 + 6 removed.
    let history = History::new()
        .with_scale(t(990), 6, 0)
        .with_scale(t(995), 0, 4);
    let d = observed(&spec, 4, 1000, 0, &history);
    assert_eq!((d.replicas, d.reason.label()), (8, "ScaleUpLimited"));
    // Growth of the running target still counts: 8 -> 12 after the activation.
    let history = History::new()
        .with_scale(t(990), 0, 8)
        .with_scale(t(995), 8, 12);
    let d = observed(&spec, 12, 1000, 0, &history);
    assert_eq!((d.replicas, d.reason.label()), (16, "ScaleUpLimited"));
}

#[test]
fn percent_only_scale_up_grows_a_running_target() {
    let mut spec = spec();
    spec.behavior.scale_up.policies = vec![percent(100, 60)];
    let d = observed(&spec, 1, 50, 0, &History::new());
    assert_eq!(d.replicas, 2);
    // 3 -> ceil(3 * 1.5) = 5
    spec.behavior.scale_up.policies = vec![percent(50, 60)];
    let d = observed(&spec, 3, 50, 0, &History::new());
    assert_eq!(d.replicas, 5);
}

#[test]
fn scale_down_policies_select_max_min_or_disabled() {
    // Pods 3 / 60 s and Percent 50 / 60 s, from 10 replicas: 7 or 5.
    let cases = [
        (SelectPolicy::Max, 5, "ScaleDownLimited"),
        (SelectPolicy::Min, 7, "ScaleDownLimited"),
        (SelectPolicy::Disabled, 10, "ScaleDownLimited"),
    ];
    for (select, expected, reason) in cases {
        let mut spec = spec();
        spec.behavior.scale_down.policies = vec![pods(3, 60), percent(50, 60)];
        spec.behavior.scale_down.select_policy = select;
        let d = observed(&spec, 10, 5, 0, &History::new());
        assert_eq!(
            (d.replicas, d.reason.label()),
            (expected, reason),
            "{select:?}"
        );
    }
}

#[test]
fn scale_down_limit_counts_from_the_start_of_the_period() {
    let mut spec = spec();
    spec.behavior.scale_down.policies = vec![pods(4, 60)];
    // Went 10 -> 8 thirty seconds ago: the period started at 10, so 6 is the floor.
    let history = History::new().with_scale(t(970), 10, 8);
    let d = observed(&spec, 8, 5, 0, &history);
    assert_eq!((d.replicas, d.reason.label()), (6, "ScaleDownLimited"));
    // A scale-up within the period lowers the start: 10 -> 12 then back down.
    let history = History::new().with_scale(t(970), 10, 12);
    let d = observed(&spec, 12, 5, 0, &history);
    assert_eq!(d.replicas, 6);
}

#[test]
fn default_scale_down_allows_everything_after_the_window() {
    let mut spec = default_spec();
    spec.max_replicas = 10;
    let d = observed(&spec, 10, 5, 0, &History::new());
    assert_eq!((d.replicas, d.reason.label()), (1, "Backlog"));
    let history = History::new().with_recommendation(t(800), 10);
    let d = observed(&spec, 10, 5, 0, &history);
    assert_eq!((d.replicas, d.reason.label()), (10, "ScaleDownStabilized"));
}

#[test]
fn missing_metrics_hold_then_fall_back() {
    // fallback: threshold 3, replicas 4; bounds [0, 10].
    // (fallback replicas, current, failures, expected, reason)
    let cases = [
        (Some(4), 6, 1, 6, "MetricsUnavailable"),
        (Some(4), 6, 2, 6, "MetricsUnavailable"),
        (Some(4), 0, 2, 0, "MetricsUnavailable"),
        (Some(4), 2, 3, 4, "Fallback"),
        (Some(4), 0, 3, 4, "Fallback"),
        // Never below current on missing data.
        (Some(4), 7, 5, 7, "Fallback"),
        // Fallback above maxReplicas is clamped.
        (Some(40), 2, 3, 10, "Fallback"),
        // No fallback replicas: hold whatever runs.
        (None, 3, 10, 3, "MetricsUnavailable"),
        (None, 0, 10, 0, "MetricsUnavailable"),
        // Holding still respects the bounds.
        (None, 12, 1, 10, "MetricsUnavailable"),
    ];
    for (fallback, current, failures, expected, reason) in cases {
        let mut spec = spec();
        spec.fallback.replicas = fallback;
        let d = decide(
            &spec,
            &DecisionInput::unavailable(current, failures),
            &History::new(),
            t(1000),
        );
        assert_eq!(
            (d.replicas, d.reason.label()),
            (expected, reason),
            "fallback {fallback:?} current {current} failures {failures}"
        );
        assert_eq!(d.is_fallback(), reason == "Fallback");
    }
}

#[test]
fn fallback_is_at_least_min_replicas() {
    let mut spec = spec();
    spec.min_replicas = 5;
    spec.fallback.replicas = Some(2);
    let d = decide(
        &spec,
        &DecisionInput::unavailable(0, 3),
        &History::new(),
        t(0),
    );
    assert_eq!(d.replicas, 5);
}

#[test]
fn paused_holds_current_replicas_even_outside_bounds() {
    let mut spec = spec();
    spec.paused = true;
    spec.min_replicas = 2;
    for (current, ready) in [(0, 100), (7, 0), (50, 3)] {
        let d = observed(&spec, current, ready, 0, &History::new());
        assert_eq!((d.replicas, d.reason.clone()), (current, Reason::Paused));
    }
    let d = decide(
        &spec,
        &DecisionInput::unavailable(4, 99),
        &History::new(),
        t(0),
    );
    assert_eq!((d.replicas, d.reason), (4, Reason::Paused));
}

#[test]
fn history_records_recommendations_emptiness_and_prunes() {
    let spec = default_spec(); // longest window: 300 s
    let mut history = History::new();
    let input = DecisionInput::observed(3, queue(0, 0));
    let d = decide(&spec, &input, &history, t(0));
    history.record(&spec, &input, &d, t(0));
    assert_eq!(history.empty_since(), Some(t(0)));
    assert_eq!(history.recommendations().len(), 1);
    assert_eq!(history.recommendations()[0].replicas, d.recommendation);

    let input = DecisionInput::observed(3, queue(0, 0));
    let d = decide(&spec, &input, &history, t(10));
    history.record(&spec, &input, &d, t(10));
    assert_eq!(
        history.empty_since(),
        Some(t(0)),
        "first empty read is kept"
    );

    let busy = DecisionInput::observed(3, queue(5, 0));
    let d = decide(&spec, &busy, &history, t(20));
    history.record(&spec, &busy, &d, t(20));
    assert_eq!(history.empty_since(), None);

    // Missing metrics record no recommendation and keep emptiness as is.
    let missing = DecisionInput::unavailable(3, 1);
    let d = decide(&spec, &missing, &history, t(30));
    history.record(&spec, &missing, &d, t(30));
    assert_eq!(history.recommendations().len(), 3);

    history.record_scale(t(30), 3, 1);
    history.record_scale(t(31), 1, 1);
    assert_eq!(history.scale_events().len(), 1, "a no-op is not an event");

    let d = decide(&spec, &busy, &history, t(315));
    history.record(&spec, &busy, &d, t(315));
    let ages: Vec<_> = history.recommendations().iter().map(|r| r.at).collect();
    assert_eq!(ages, vec![t(20), t(315)], "older than 300 s dropped");
    assert_eq!(history.scale_events().len(), 1);
    history.prune(t(331), spec.history_retention());
    assert!(history.scale_events().is_empty());
}

#[test]
fn a_burst_then_silence_goes_up_then_down_then_to_zero() {
    // An end-to-end walk through ticks with the example's behaviour.
    let mut spec = default_spec();
    spec.max_replicas = 10;
    spec.behavior.scale_down.stabilization_window_seconds = 60;
    spec.behavior.cooldown_seconds = 60;
    let mut history = History::new();
    let mut current = 0;
    let mut seen = Vec::new();
    // (second, ready, unacked)
    let ticks = [
        (0, 0, 0),
        (2, 40, 0),
        (4, 30, 8),
        (20, 50, 8),
        (40, 0, 3),
        (60, 0, 0),
        (100, 0, 0),
        (130, 0, 0),
    ];
    for (second, ready, unacked) in ticks {
        let input = DecisionInput::observed(current, queue(ready, unacked));
        let d = decide(&spec, &input, &history, t(second));
        history.record(&spec, &input, &d, t(second));
        if d.changes(current) {
            history.record_scale(t(second), current, d.replicas);
            current = d.replicas;
        }
        seen.push((second, current, d.reason.label()));
    }
    assert_eq!(
        seen,
        vec![
            (0, 0, "QueueEmpty"),
            // From zero straight to ceil(40 / 5) (the policies limit a
            // running target only).
            (2, 8, "Backlog"),
            (4, 8, "Backlog"),
            // 58 messages want 12; the period starts at the activation's 8.
            (20, 10, "AtMaxReplicas"),
            (40, 10, "ScaleDownStabilized"),
            (60, 10, "ScaleDownStabilized"),
            (100, 1, "CooldownPending"),
            (130, 0, "QueueEmpty"),
        ]
    );
}

#[test]
fn reason_labels_are_unique_and_listed() {
    let reasons = [
        Reason::Paused,
        Reason::MetricsUnavailable {
            consecutive_failures: 1,
        },
        Reason::Fallback {
            consecutive_failures: 3,
            fallback_replicas: 2,
        },
        Reason::BelowActivation {
            messages: 1,
            activation: 2,
        },
        Reason::Backlog {
            messages: 1,
            per_replica: 5,
        },
        Reason::DrainRate {
            arrival_rate: 1.0,
            backlog: 2,
            drain_seconds: 3,
            per_replica_ack_rate: 4.0,
        },
        Reason::UnackedInFlight { unacked: 1 },
        Reason::CooldownPending {
            remaining_seconds: 3,
        },
        Reason::QueueEmpty,
        Reason::AtMinReplicas { wanted: 0 },
        Reason::AtMaxReplicas { wanted: 20 },
        Reason::ScaleUpStabilized {
            window_seconds: 1,
            recommendation: 2,
        },
        Reason::ScaleDownStabilized {
            window_seconds: 1,
            recommendation: 2,
        },
        Reason::ScaleUpLimited {
            limit: 1,
            wanted: 2,
        },
        Reason::ScaleDownLimited {
            limit: 2,
            wanted: 1,
        },
    ];
    let labels: Vec<_> = reasons.iter().map(Reason::label).collect();
    assert_eq!(labels, Reason::LABELS.to_vec());
    let mut unique = labels.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), labels.len());
    assert_eq!(
        Reason::Backlog {
            messages: 42,
            per_replica: 5
        }
        .to_string(),
        "42 messages at 5 per replica"
    );
}
