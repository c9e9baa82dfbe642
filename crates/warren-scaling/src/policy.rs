//! Step 3: rate policies (HPA semantics).
//!
//! Each policy bounds the change relative to the replicas at the start of its
//! sliding period, reconstructed from the scale events in that period:
//! `start = current - added + removed`.
//! - Scale-up: `Pods` allows `start + value`, `Percent` allows
//!   `ceil(start * (100 + value) / 100)`.
//! - Scale-down: `Pods` allows `start - value`, `Percent` allows
//!   `trunc(start * (100 - value) / 100)`.
//!
//! `selectPolicy: Max` (default) takes the policy allowing the biggest change,
//! `Min` the smallest, `Disabled` forbids change in that direction. A limit
//! never reverses direction (a scale-up limit is at least `current`), and a
//! scale-up limit is at least one replica.
//!
//! The policies govern a running target: [`crate::decide`] does not limit the
//! step from zero (activation), and scale events from or to zero are left
//! out of `added` and `removed` ([`History`]), so after an activation to `n`
//! the period starts at `n`.

use chrono::{DateTime, Utc};
use warren_crd::{DirectionRules, PolicyType, QueueScalerSpec, SelectPolicy};

use crate::History;

/// Most replicas the scale-up policies allow now.
pub fn scale_up_limit(
    spec: &QueueScalerSpec,
    current: i32,
    history: &History,
    now: DateTime<Utc>,
) -> i32 {
    let rules = spec.behavior.scale_up.resolved();
    if rules.select_policy == SelectPolicy::Disabled {
        return current;
    }
    let proposals = proposals(
        &rules,
        current,
        history,
        now,
        |start, policy| match policy {
            (PolicyType::Pods, value) => start + value,
            (PolicyType::Percent, value) => {
                start.saturating_mul(100 + value).saturating_add(99) / 100
            }
        },
    );
    let limit = match rules.select_policy {
        SelectPolicy::Min => proposals.min(),
        _ => proposals.max(),
    };
    to_i32(limit.unwrap_or(i64::from(current)))
        .max(current)
        .max(1)
}

/// Fewest replicas the scale-down policies allow now.
pub fn scale_down_limit(
    spec: &QueueScalerSpec,
    current: i32,
    history: &History,
    now: DateTime<Utc>,
) -> i32 {
    let rules = spec.behavior.scale_down.resolved();
    if rules.select_policy == SelectPolicy::Disabled {
        return current;
    }
    let proposals = proposals(
        &rules,
        current,
        history,
        now,
        |start, policy| match policy {
            (PolicyType::Pods, value) => start - value,
            (PolicyType::Percent, value) => start.saturating_mul(100 - value) / 100,
        },
    );
    // The most permissive scale-down is the lowest count.
    let limit = match rules.select_policy {
        SelectPolicy::Min => proposals.max(),
        _ => proposals.min(),
    };
    to_i32(limit.unwrap_or(i64::from(current))).min(current)
}

/// One proposed limit per policy, from the replicas at the start of its period.
fn proposals<'a>(
    rules: &'a DirectionRules<'a>,
    current: i32,
    history: &'a History,
    now: DateTime<Utc>,
    propose: impl Fn(i64, (PolicyType, i64)) -> i64 + 'a,
) -> impl Iterator<Item = i64> + 'a {
    // `start` is never negative, so the integer divisions above round as stated.
    rules.policies.iter().map(move |policy| {
        let (added, removed) = history.changes_within(now, policy.period_seconds);
        let start = (i64::from(current) - added + removed).max(0);
        propose(start, (policy.policy_type, i64::from(policy.value)))
    })
}

fn to_i32(value: i64) -> i32 {
    value.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32
}
