//! How replicas may change: the scale-up and scale-down rules (HPA
//! `behavior` semantics), their policies with the defaults the decision
//! resolves to, and the fallback when the queue cannot be read.
//!
//! Every default lives in a named function so that serde (when reading a
//! resource) and schemars (the `default:` shown in the CRD) agree.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How fast replicas may change (HPA `behavior` semantics) and how long the
/// queue must stay empty before scaling to zero.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Behavior {
    /// Rules for increasing replicas.
    #[serde(default)]
    pub scale_up: ScaleUpRules,
    /// Rules for decreasing replicas.
    #[serde(default)]
    pub scale_down: ScaleDownRules,
    /// Seconds the queue must be empty (no ready, no unacked messages) before
    /// scaling from one replica to zero. Only used when minReplicas is 0.
    /// Messages that left the ready count less than the management API's
    /// statistics interval ago count as unacked (its count may not show them
    /// yet), so the queue is empty at the earliest that long after the last
    /// message was taken.
    #[serde(default = "default_cooldown_seconds")]
    pub cooldown_seconds: u32,
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            scale_up: ScaleUpRules::default(),
            scale_down: ScaleDownRules::default(),
            cooldown_seconds: default_cooldown_seconds(),
        }
    }
}

/// Scale-up rules. Defaults are the HPA's: no stabilization, and at most
/// +4 pods or +100% (whichever is more) per 15 seconds. The policies limit a
/// running target: the step from zero replicas goes straight to the
/// recommendation (within maxReplicas; selectPolicy Disabled keeps it at
/// zero), and steps from or to zero do not count in the policies' periods.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ScaleUpRules {
    /// Scale up only to the lowest recommendation seen in this many seconds.
    #[serde(default = "default_scale_up_stabilization")]
    #[schemars(range(max = 3600))]
    pub stabilization_window_seconds: u32,
    /// Limits on how much a running target's replicas may grow per period
    /// (the step from zero is not limited). Empty means the default.
    #[serde(default = "default_scale_up_policies")]
    pub policies: Vec<ScalingPolicy>,
    /// Which policy wins when several apply.
    #[serde(default)]
    pub select_policy: SelectPolicy,
}

impl Default for ScaleUpRules {
    fn default() -> Self {
        ScaleUpRules {
            stabilization_window_seconds: default_scale_up_stabilization(),
            policies: default_scale_up_policies(),
            select_policy: SelectPolicy::default(),
        }
    }
}

/// Scale-down rules. Defaults are the HPA's: a 300 second stabilization
/// window, and at most -100% per 15 seconds.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ScaleDownRules {
    /// Scale down only to the highest recommendation seen in this many seconds.
    #[serde(default = "default_scale_down_stabilization")]
    #[schemars(range(max = 3600))]
    pub stabilization_window_seconds: u32,
    /// Limits on how much replicas may shrink per period. Empty means the default.
    #[serde(default = "default_scale_down_policies")]
    pub policies: Vec<ScalingPolicy>,
    /// Which policy wins when several apply.
    #[serde(default)]
    pub select_policy: SelectPolicy,
}

impl Default for ScaleDownRules {
    fn default() -> Self {
        ScaleDownRules {
            stabilization_window_seconds: default_scale_down_stabilization(),
            policies: default_scale_down_policies(),
            select_policy: SelectPolicy::default(),
        }
    }
}

/// One direction's rules with defaults resolved: what the decision uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectionRules<'a> {
    pub stabilization_window_seconds: u32,
    /// Never empty: an empty list in the spec resolves to the default policies.
    pub policies: &'a [ScalingPolicy],
    pub select_policy: SelectPolicy,
}

impl ScaleUpRules {
    /// The rules with an empty policy list replaced by the default policies.
    pub fn resolved(&self) -> DirectionRules<'_> {
        DirectionRules {
            stabilization_window_seconds: self.stabilization_window_seconds,
            policies: if self.policies.is_empty() {
                &DEFAULT_SCALE_UP_POLICIES
            } else {
                &self.policies
            },
            select_policy: self.select_policy,
        }
    }
}

impl ScaleDownRules {
    /// The rules with an empty policy list replaced by the default policies.
    pub fn resolved(&self) -> DirectionRules<'_> {
        DirectionRules {
            stabilization_window_seconds: self.stabilization_window_seconds,
            policies: if self.policies.is_empty() {
                &DEFAULT_SCALE_DOWN_POLICIES
            } else {
                &self.policies
            },
            select_policy: self.select_policy,
        }
    }
}

/// A limit on the change of replicas within a sliding period.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ScalingPolicy {
    /// `Pods`: an absolute number of replicas; `Percent`: a percentage of the
    /// replicas at the start of the period.
    #[serde(rename = "type")]
    pub policy_type: PolicyType,
    /// Amount of change allowed per period.
    #[schemars(range(min = 1))]
    pub value: u32,
    /// Length of the sliding period in seconds.
    #[schemars(range(min = 1, max = 1800))]
    pub period_seconds: u32,
}

/// Unit of a [`ScalingPolicy`] value.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicyType {
    Pods,
    Percent,
}

/// Which of several policies applies (HPA `selectPolicy`).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SelectPolicy {
    /// The policy allowing the largest change.
    #[default]
    Max,
    /// The policy allowing the smallest change.
    Min,
    /// No change in this direction.
    Disabled,
}

/// Behaviour when queue metrics cannot be read.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Fallback {
    /// Consecutive failed reads before `replicas` applies. Until then, and
    /// when `replicas` is unset, the current replica count is held.
    #[serde(default = "default_failure_threshold")]
    #[schemars(range(min = 1))]
    pub failure_threshold: u32,
    /// Replicas to run while metrics are missing. Missing data never scales
    /// down: the controller runs at least this many, and never goes to zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub replicas: Option<i32>,
}

impl Default for Fallback {
    fn default() -> Self {
        Fallback {
            failure_threshold: default_failure_threshold(),
            replicas: None,
        }
    }
}

/// HPA's default scale-up policies: +4 pods or +100% per 15 s, the larger.
pub const DEFAULT_SCALE_UP_POLICIES: [ScalingPolicy; 2] = [
    ScalingPolicy {
        policy_type: PolicyType::Pods,
        value: 4,
        period_seconds: 15,
    },
    ScalingPolicy {
        policy_type: PolicyType::Percent,
        value: 100,
        period_seconds: 15,
    },
];

/// HPA's default scale-down policy: -100% per 15 s.
pub const DEFAULT_SCALE_DOWN_POLICIES: [ScalingPolicy; 1] = [ScalingPolicy {
    policy_type: PolicyType::Percent,
    value: 100,
    period_seconds: 15,
}];

fn default_cooldown_seconds() -> u32 {
    60
}
fn default_scale_up_stabilization() -> u32 {
    0
}
fn default_scale_down_stabilization() -> u32 {
    300
}
fn default_scale_up_policies() -> Vec<ScalingPolicy> {
    DEFAULT_SCALE_UP_POLICIES.to_vec()
}
fn default_scale_down_policies() -> Vec<ScalingPolicy> {
    DEFAULT_SCALE_DOWN_POLICIES.to_vec()
}
fn default_failure_threshold() -> u32 {
    3
}
