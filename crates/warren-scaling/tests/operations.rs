//! Scalers over several queues: how `queue.operation` (sum, max, avg)
//! combines per-queue counts into the decision, as a table and as properties.

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::t;
use proptest::prelude::*;
use warren_crd::{Observation, Operation, QueueObservation, QueueScalerSpec};
use warren_scaling::{DecisionInput, History, Reason, counted_messages, decide};

/// `spec()` over queues a, b, c (names) with `operation`.
fn multi_spec(operation: Operation) -> QueueScalerSpec {
    let mut spec = common::spec();
    spec.queue.name = String::new();
    spec.queue.names = vec!["a".into(), "b".into(), "c".into()];
    spec.queue.operation = operation;
    spec
}

fn queue(name: &str, ready: u64, unacked: u64) -> QueueObservation {
    QueueObservation {
        name: name.into(),
        ready,
        unacked,
        consumers: 0,
        publish_rate: None,
        ack_rate: None,
    }
}

/// An observation of queues a, b, c... with (ready, unacked) each.
fn queues(counts: &[(u64, u64)]) -> Observation {
    let names = ["a", "b", "c", "d", "e", "f", "g", "h"];
    Observation::of_queues(
        counts
            .iter()
            .zip(names)
            .map(|((ready, unacked), name)| queue(name, *ready, *unacked))
            .collect(),
        t(0),
    )
}

fn replicas(spec: &QueueScalerSpec, current: i32, observation: Observation) -> i32 {
    decide(
        spec,
        &DecisionInput::observed(current, observation),
        &History::new(),
        t(0),
    )
    .replicas
}

/// (operation, per-queue (ready, unacked), counted, replicas at 5 per replica from 1)
type Row = (Operation, &'static [(u64, u64)], u64, i32);

#[test]
fn operations_table() {
    use Operation::{Avg, Max, Sum};
    let table: &[Row] = &[
        (Sum, &[(12, 0), (3, 0), (0, 0)], 15, 3),
        (Max, &[(12, 0), (3, 0), (0, 0)], 12, 3),
        (Avg, &[(12, 0), (3, 0), (0, 0)], 5, 1),
        // Unacked counts per queue (countUnacked is on by default).
        (Sum, &[(4, 2), (0, 5), (1, 0)], 12, 3),
        (Max, &[(4, 2), (0, 5), (1, 0)], 6, 2),
        (Avg, &[(4, 2), (0, 5), (1, 0)], 4, 1),
        // avg rounds up: one message on one of three queues still counts.
        (Avg, &[(1, 0), (0, 0), (0, 0)], 1, 1),
        (Avg, &[(7, 0), (0, 0), (0, 0)], 3, 1),
        (Avg, &[(31, 0), (0, 0), (0, 0)], 11, 3),
        // Large counts hit maxReplicas (10) under every operation.
        (Sum, &[(100, 0), (100, 0), (100, 0)], 300, 10),
        (Max, &[(100, 0), (0, 0), (0, 0)], 100, 10),
        (Avg, &[(100, 0), (100, 0), (100, 0)], 100, 10),
    ];
    for (operation, counts, counted, expected) in table {
        let spec = multi_spec(*operation);
        let observation = queues(counts);
        assert_eq!(
            counted_messages(&spec, &observation),
            *counted,
            "{operation} {counts:?}"
        );
        assert_eq!(
            replicas(&spec, 1, observation),
            *expected,
            "{operation} {counts:?}"
        );
    }
}

#[test]
fn the_observation_keeps_totals_and_each_queue() {
    let observation = queues(&[(12, 1), (3, 2), (0, 0)]);
    assert_eq!((observation.ready, observation.unacked), (15, 3));
    assert_eq!(observation.queues.len(), 3);
    assert_eq!(observation.queues[1], queue("b", 3, 2));
    assert!(!observation.is_empty());
    assert!(queues(&[(0, 0), (0, 0)]).is_empty());
}

#[test]
fn count_unacked_off_counts_ready_per_queue() {
    let mut spec = multi_spec(Operation::Max);
    spec.count_unacked = false;
    assert_eq!(
        counted_messages(&spec, &queues(&[(2, 9), (4, 0), (0, 0)])),
        4
    );
}

#[test]
fn activation_applies_to_the_combined_count() {
    // Two queues with 3 ready each; activation above 4 messages.
    for (operation, activates) in [
        (Operation::Sum, true),
        (Operation::Max, false),
        (Operation::Avg, false),
    ] {
        let mut spec = multi_spec(operation);
        spec.activation_messages = 4;
        let decision = decide(
            &spec,
            &DecisionInput::observed(0, queues(&[(3, 0), (3, 0)])),
            &History::new(),
            t(0),
        );
        assert_eq!(decision.replicas > 0, activates, "{operation}");
        if !activates {
            assert!(
                matches!(decision.reason, Reason::BelowActivation { messages: 3, .. }),
                "{operation}: {:?}",
                decision.reason
            );
        }
    }
}

#[test]
fn unacked_on_any_queue_keeps_one_replica() {
    // Nothing ready anywhere, one message in flight on queue c: no
    // operation scales to zero (avg would be 1/3 without rounding up).
    for operation in [Operation::Sum, Operation::Max, Operation::Avg] {
        let mut spec = multi_spec(operation);
        spec.count_unacked = false;
        let decision = decide(
            &spec,
            &DecisionInput::observed(2, queues(&[(0, 0), (0, 0), (0, 1)])),
            &History::new(),
            t(0),
        );
        assert_eq!(decision.replicas, 1, "{operation}");
        assert_eq!(decision.reason, Reason::UnackedInFlight { unacked: 1 });
    }
}

#[test]
fn no_matching_queue_counts_nothing() {
    for operation in [Operation::Sum, Operation::Max, Operation::Avg] {
        let spec = multi_spec(operation);
        let observation = Observation::of_queues(Vec::new(), t(0));
        assert_eq!(counted_messages(&spec, &observation), 0);
        assert_eq!(replicas(&spec, 0, observation), 0);
    }
}

#[test]
fn per_replica_ack_rate_over_several_queues() {
    // Two queues, each consumed by the pool's 4 replicas: 8 consumers,
    // 4 replicas, 20 acks/s in total -> 5 acks/s per replica.
    let queue_with = |name: &str, ack_rate: f64| QueueObservation {
        consumers: 4,
        ack_rate: Some(ack_rate),
        publish_rate: Some(1.0),
        ..queue(name, 10, 0)
    };
    let observation =
        Observation::of_queues(vec![queue_with("a", 15.0), queue_with("b", 5.0)], t(0));
    assert_eq!(observation.consumers, 8);
    assert_eq!(observation.ack_rate, Some(20.0));
    assert_eq!(observation.publish_rate, Some(2.0));
    assert_eq!(observation.per_replica_ack_rate, Some(5.0));
}

fn operation() -> impl Strategy<Value = Operation> {
    prop_oneof![
        Just(Operation::Sum),
        Just(Operation::Max),
        Just(Operation::Avg)
    ]
}

fn counts() -> impl Strategy<Value = Vec<(u64, u64)>> {
    proptest::collection::vec(
        (
            prop_oneof![Just(0u64), 0u64..50, 0u64..5000],
            prop_oneof![Just(0u64), 0u64..20],
        ),
        1..8,
    )
}

proptest! {
    /// sum >= max >= avg, and every operation counts 0 exactly when every
    /// queue's count is 0.
    #[test]
    fn operations_are_ordered_and_zero_only_when_all_queues_are(
        counts in counts(),
        count_unacked in any::<bool>(),
    ) {
        let observation = queues(&counts);
        let counted = |operation| {
            let mut spec = multi_spec(operation);
            spec.count_unacked = count_unacked;
            counted_messages(&spec, &observation)
        };
        let (sum, max, avg) = (counted(Operation::Sum), counted(Operation::Max), counted(Operation::Avg));
        prop_assert!(sum >= max && max >= avg, "sum {sum} max {max} avg {avg}");
        let per_queue: Vec<u64> = counts
            .iter()
            .map(|(r, u)| if count_unacked { r + u } else { *r })
            .collect();
        let all_zero = per_queue.iter().all(|c| *c == 0);
        for c in [sum, max, avg] {
            prop_assert_eq!(c == 0, all_zero);
        }
        prop_assert_eq!(sum, per_queue.iter().sum::<u64>());
        prop_assert_eq!(max, *per_queue.iter().max().unwrap());
        let n = per_queue.len() as u64;
        prop_assert!(avg * n >= sum && (avg.saturating_sub(1)) * n < sum.max(1));
    }

    /// With the same current replicas and history, more counted messages
    /// never mean fewer replicas: sum asks for at least what max asks, max
    /// for at least what avg asks.
    #[test]
    fn replicas_follow_the_operation_order(counts in counts(), current in 0i32..12) {
        let observation = queues(&counts);
        let r = |operation| replicas(&multi_spec(operation), current, observation.clone());
        let (sum, max, avg) = (r(Operation::Sum), r(Operation::Max), r(Operation::Avg));
        prop_assert!(sum >= max && max >= avg, "sum {sum} max {max} avg {avg}");
    }

    /// Over one queue every operation decides as the single-queue form does.
    #[test]
    fn one_queue_is_the_same_under_every_operation(
        ready in 0u64..500,
        unacked in 0u64..20,
        current in 0i32..12,
        operation in operation(),
    ) {
        let single = common::spec();
        let expected = decide(
            &single,
            &DecisionInput::observed(current, Observation::new(ready, unacked, 0, None, None, t(0))),
            &History::new(),
            t(0),
        );
        let got = decide(
            &multi_spec(operation),
            &DecisionInput::observed(current, queues(&[(ready, unacked)])),
            &History::new(),
            t(0),
        );
        prop_assert_eq!(got.replicas, expected.replicas);
    }

    /// Never from N to 0 while any queue holds unacked messages, whatever the
    /// operation and history.
    #[test]
    fn never_to_zero_with_unacked_anywhere(
        counts in counts(),
        operation in operation(),
        current in 1i32..12,
        empty_for in 0i64..1000,
    ) {
        let observation = queues(&counts);
        prop_assume!(observation.unacked > 0);
        let history = History::new().with_empty_since(Some(t(-empty_for)));
        let decision = decide(
            &multi_spec(operation),
            &DecisionInput::observed(current, observation),
            &history,
            t(0),
        );
        prop_assert!(decision.replicas >= 1);
    }
}
