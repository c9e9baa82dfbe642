//! Properties that hold for every spec, input and history.

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use chrono::{DateTime, Utc};
use common::t;
use proptest::prelude::*;
use warren_crd::{Observation, PolicyType, QueueScalerSpec, ScalingPolicy, SelectPolicy};
use warren_scaling::{Decision, DecisionInput, History, Metrics, Reason, counted_messages, decide};

const NOW: i64 = 10_000;

fn now() -> DateTime<Utc> {
    t(NOW)
}

fn policy() -> impl Strategy<Value = ScalingPolicy> {
    (
        prop_oneof![Just(PolicyType::Pods), Just(PolicyType::Percent)],
        1u32..200,
        1u32..120,
    )
        .prop_map(|(policy_type, value, period_seconds)| ScalingPolicy {
            policy_type,
            value,
            period_seconds,
        })
}

fn select_policy() -> impl Strategy<Value = SelectPolicy> {
    prop_oneof![
        3 => Just(SelectPolicy::Max),
        1 => Just(SelectPolicy::Min),
        1 => Just(SelectPolicy::Disabled),
    ]
}

prop_compose! {
    fn spec()(
        min in 0i32..5,
        span in 0i32..20,
        messages_per_replica in 1u64..20,
        activation_messages in 0u64..20,
        count_unacked in any::<bool>(),
        target_drain_seconds in proptest::option::of(1u32..300),
        up_window in 0u32..600,
        down_window in 0u32..600,
        up_policies in proptest::collection::vec(policy(), 0..3),
        down_policies in proptest::collection::vec(policy(), 0..3),
        up_select in select_policy(),
        down_select in select_policy(),
        cooldown_seconds in 0u32..300,
        failure_threshold in 1u32..5,
        fallback in proptest::option::of(1i32..40),
        paused in prop::bool::weighted(0.1),
    ) -> QueueScalerSpec {
        let mut spec = common::default_spec();
        spec.min_replicas = min;
        spec.max_replicas = (min + span).max(1);
        spec.messages_per_replica = messages_per_replica;
        spec.activation_messages = activation_messages;
        spec.count_unacked = count_unacked;
        spec.target_drain_seconds = target_drain_seconds;
        spec.behavior.scale_up.stabilization_window_seconds = up_window;
        spec.behavior.scale_down.stabilization_window_seconds = down_window;
        spec.behavior.scale_up.policies = up_policies;
        spec.behavior.scale_down.policies = down_policies;
        spec.behavior.scale_up.select_policy = up_select;
        spec.behavior.scale_down.select_policy = down_select;
        spec.behavior.cooldown_seconds = cooldown_seconds;
        spec.fallback.failure_threshold = failure_threshold;
        spec.fallback.replicas = fallback.map(|f| f.min(spec.max_replicas));
        spec.paused = paused;
        spec
    }
}

prop_compose! {
    fn observation()(
        ready in prop_oneof![Just(0u64), 0u64..50, 0u64..5000],
        unacked in prop_oneof![Just(0u64), 0u64..50],
        consumers in 0u64..10,
        publish_rate in proptest::option::of(0.0f64..100.0),
        ack_rate in proptest::option::of(0.0f64..100.0),
    ) -> Observation {
        Observation::new(ready, unacked, consumers, publish_rate, ack_rate, now())
    }
}

fn metrics() -> impl Strategy<Value = Metrics> {
    prop_oneof![
        3 => observation().prop_map(Metrics::Observed),
        1 => (0u32..10).prop_map(|consecutive_failures| Metrics::Unavailable { consecutive_failures }),
    ]
}

prop_compose! {
    fn history()(
        recommendations in proptest::collection::vec((0i64..900, 0i32..40), 0..12),
        events in proptest::collection::vec((0i64..200, 0i32..40, 0i32..40), 0..6),
        empty_for in proptest::option::of(0i64..600),
    ) -> History {
        let history = recommendations
            .into_iter()
            .fold(History::new(), |h, (age, r)| h.with_recommendation(t(NOW - age), r));
        let history = events
            .into_iter()
            .fold(history, |h, (age, from, to)| h.with_scale(t(NOW - age), from, to));
        history.with_empty_since(empty_for.map(|age| t(NOW - age)))
    }
}

type Scenario = (QueueScalerSpec, DecisionInput, History);

fn scenario_with(
    current: impl Strategy<Value = i32>,
    metrics: impl Strategy<Value = Metrics>,
) -> impl Strategy<Value = Scenario> {
    (spec(), current, metrics, history()).prop_map(|(spec, current, metrics, history)| {
        let input = DecisionInput {
            current_replicas: current,
            metrics,
        };
        (spec, input, history)
    })
}

fn scenario() -> impl Strategy<Value = Scenario> {
    scenario_with(0i32..40, metrics())
}

/// Scenarios with a successful read of the queue.
fn observed_scenario() -> impl Strategy<Value = Scenario> {
    scenario_with(0i32..40, observation().prop_map(Metrics::Observed))
}

/// Scenarios at zero replicas, allowed to stay there.
fn idle_scenario() -> impl Strategy<Value = Scenario> {
    scenario_with(Just(0), observation().prop_map(Metrics::Observed)).prop_map(
        |(mut spec, input, history)| {
            spec.min_replicas = 0;
            (spec, input, history)
        },
    )
}

fn highest_recent_recommendation(spec: &QueueScalerSpec, history: &History) -> Option<i32> {
    let window = i64::from(spec.behavior.scale_down.stabilization_window_seconds);
    history
        .recommendations()
        .iter()
        .filter(|r| r.at > t(NOW - window))
        .map(|r| r.replicas)
        .max()
}

fn is_scale_to_zero_after_cooldown(decision: &Decision) -> bool {
    decision.replicas == 0 && decision.reason == Reason::QueueEmpty
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn result_is_within_bounds_unless_paused((spec, input, history) in scenario()) {
        let d = decide(&spec, &input, &history, now());
        if spec.paused {
            prop_assert_eq!(d.replicas, input.current_replicas);
            prop_assert_eq!(d.reason, Reason::Paused);
        } else {
            prop_assert!(d.replicas >= spec.min_replicas, "{:?}", d);
            prop_assert!(d.replicas <= spec.max_replicas, "{:?}", d);
        }
    }

    #[test]
    fn no_scale_down_below_a_recent_higher_recommendation((spec, input, history) in observed_scenario()) {
        prop_assume!(!spec.paused);
        let d = decide(&spec, &input, &history, now());
        let current = input.current_replicas;
        if let Some(highest) = highest_recent_recommendation(&spec, &history)
            && d.replicas < current
            && !is_scale_to_zero_after_cooldown(&d)
        {
            let floor = current.min(highest).min(spec.max_replicas);
            prop_assert!(d.replicas >= floor, "{:?} highest {} current {}", d, highest, current);
        }
    }

    #[test]
    fn never_from_n_to_zero_while_messages_are_unacked((spec, input, history) in observed_scenario()) {
        let d = decide(&spec, &input, &history, now());
        if let Metrics::Observed(observation) = &input.metrics
            && observation.unacked > 0
            && input.current_replicas > 0
        {
            prop_assert!(d.replicas > 0, "{:?}", d);
        }
    }

    #[test]
    fn never_to_zero_without_an_empty_queue((spec, input, history) in scenario()) {
        let d = decide(&spec, &input, &history, now());
        if input.current_replicas > 0 && d.replicas == 0 {
            match &input.metrics {
                Metrics::Observed(observation) => prop_assert!(observation.is_empty(), "{:?}", d),
                Metrics::Unavailable { .. } => prop_assert!(false, "to zero on missing data: {:?}", d),
            }
        }
    }

    #[test]
    fn missing_data_never_scales_down_and_respects_fallback(
        (spec, input, history) in scenario_with(0i32..40, (0u32..10).prop_map(|consecutive_failures| Metrics::Unavailable { consecutive_failures }))
    ) {
        prop_assume!(!spec.paused);
        let Metrics::Unavailable { consecutive_failures } = input.metrics else {
            return Ok(());
        };
        let d = decide(&spec, &input, &history, now());
        let current = input.current_replicas;
        prop_assert!(d.replicas >= current.min(spec.max_replicas), "{:?}", d);
        if current > 0 {
            prop_assert!(d.replicas > 0);
        }
        if let Some(fallback) = spec.fallback.replicas
            && consecutive_failures >= spec.fallback.failure_threshold
        {
            let expected_floor = fallback.max(spec.min_replicas).max(1).min(spec.max_replicas);
            prop_assert!(d.replicas >= expected_floor, "{:?}", d);
            prop_assert!(d.is_fallback());
        } else {
            prop_assert!(!d.is_fallback());
        }
    }

    #[test]
    fn stays_at_zero_below_activation((spec, input, history) in idle_scenario()) {
        prop_assume!(!spec.paused);
        if let Metrics::Observed(observation) = &input.metrics
            && counted_messages(&spec, observation) <= spec.activation_messages
        {
            let d = decide(&spec, &input, &history, now());
            prop_assert_eq!(d.replicas, 0);
        }
    }

    #[test]
    fn recommendation_is_within_bounds((spec, input, history) in scenario()) {
        prop_assume!(!spec.paused);
        let d = decide(&spec, &input, &history, now());
        prop_assert!(d.recommendation >= spec.min_replicas);
        prop_assert!(d.recommendation <= spec.max_replicas);
    }
}
