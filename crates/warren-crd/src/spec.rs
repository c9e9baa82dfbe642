//! The desired state of a QueueScaler: what to scale, which queue to watch,
//! and the rules that turn queue depth into a replica count.
//!
//! Every default lives in a named function so that serde (when reading a
//! resource) and schemars (the `default:` shown in the CRD) agree.

use std::time::Duration;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::behavior::{Behavior, Fallback};
use crate::schema::strip_unsigned_formats;
use crate::status::QueueScalerStatus;

/// Scales a Deployment or StatefulSet on the depth of a RabbitMQ queue.
///
/// The controller polls the queue every `pollingIntervalSeconds`, computes a
/// replica count from the backlog (or from measured rates when
/// `targetDrainSeconds` is set), smooths it with HPA-style stabilization
/// windows and rate policies, and patches the target's `/scale` subresource.
// Several printer columns share `type_ = ...`; clippy mistakes that for a
// repeated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "QueueScaler",
    plural = "queuescalers",
    shortname = "qs",
    namespaced,
    status = "QueueScalerStatus",
    derive = "PartialEq",
    doc = "Scales a Deployment or StatefulSet on the depth of a RabbitMQ queue",
    printcolumn(
        name = "Target",
        type_ = "string",
        json_path = ".spec.scaleTargetRef.name"
    ),
    printcolumn(name = "Queue", type_ = "string", json_path = ".status.queueSummary"),
    printcolumn(
        name = "Messages",
        type_ = "integer",
        json_path = ".status.observation.ready"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".status.currentReplicas"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.desiredReplicas"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(
    transform = strip_unsigned_formats,
    extend("x-kubernetes-validations" = [
        {
            "rule": "self.maxReplicas >= self.minReplicas",
            "message": "maxReplicas must be greater than or equal to minReplicas"
        },
        {
            "rule": "!has(self.fallback) || !has(self.fallback.replicas) || self.fallback.replicas <= self.maxReplicas",
            "message": "fallback.replicas must not exceed maxReplicas"
        },
        {
            "rule": "!has(self.targetDrainSeconds) || !has(self.queue.operation) || self.queue.operation == 'sum'",
            "message": "targetDrainSeconds needs queue.operation sum"
        }
    ])
)]
pub struct QueueScalerSpec {
    /// The workload whose replica count this scaler owns.
    pub scale_target_ref: ScaleTargetRef,

    /// The queue (or queues) whose depth drives the scaling.
    pub queue: QueueRef,

    /// How to reach RabbitMQ (management API for depth and rates, AMQP for
    /// an instant ready count when activating from zero).
    pub broker: BrokerRef,

    /// Lower bound on replicas. 0 allows scale to zero once the queue has been
    /// empty (no ready and no unacked messages) for `behavior.cooldownSeconds`.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0))]
    pub min_replicas: i32,

    /// Upper bound on replicas. Must be at least `minReplicas`.
    #[schemars(range(min = 1))]
    pub max_replicas: i32,

    /// Target backlog per replica: desired = ceil(messages / messagesPerReplica).
    #[serde(default = "default_messages_per_replica")]
    #[schemars(range(min = 1))]
    pub messages_per_replica: u64,

    /// At zero replicas, stay at zero until more than this many messages are
    /// counted. Ignored once at least one replica runs.
    #[serde(default = "default_activation_messages")]
    pub activation_messages: u64,

    /// Count unacknowledged (in-flight) messages as backlog, not just ready ones.
    #[serde(default = "default_count_unacked")]
    pub count_unacked: bool,

    /// Size by measured rates instead of backlog per replica: desired =
    /// ceil((publish rate + backlog / targetDrainSeconds) / ack rate per replica).
    /// Falls back to `messagesPerReplica` while no per-replica ack rate is measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub target_drain_seconds: Option<u32>,

    /// How often the controller reads the queue and decides.
    #[serde(default = "default_polling_interval_seconds")]
    #[schemars(range(min = 1))]
    pub polling_interval_seconds: u32,

    /// Stabilization windows, rate policies and cooldown (HPA semantics).
    #[serde(default)]
    pub behavior: Behavior,

    /// What to do when queue metrics cannot be read.
    #[serde(default)]
    pub fallback: Fallback,

    /// Stop changing the target's replicas (the current count is kept).
    #[serde(default = "default_paused")]
    pub paused: bool,
}

/// The scaled workload. Both kinds live in `apps/v1`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ScaleTargetRef {
    /// API version of the target; `apps/v1` for both supported kinds.
    #[serde(default = "default_target_api_version")]
    pub api_version: String,
    /// Kind of the target.
    #[serde(default)]
    pub kind: TargetKind,
    /// Name of the target in the QueueScaler's namespace.
    #[schemars(length(min = 1))]
    pub name: String,
}

/// Workload kinds that can be scaled.
#[derive(
    JsonSchema,
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
)]
pub enum TargetKind {
    #[default]
    Deployment,
    StatefulSet,
}

impl TargetKind {
    /// The kind as written in Kubernetes (`Deployment`, `StatefulSet`).
    pub fn as_str(self) -> &'static str {
        match self {
            TargetKind::Deployment => "Deployment",
            TargetKind::StatefulSet => "StatefulSet",
        }
    }
}

impl std::fmt::Display for TargetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The queues of one RabbitMQ virtual host that drive a scaler: `name` (one
/// queue, the original form), `names` and `pattern`, in any combination (at
/// least one). The scaler watches the union, each queue once.
///
/// With several queues, `operation` combines their per-queue counts (ready,
/// plus unacked when `countUnacked`) into the one count the sizing rule
/// divides by `messagesPerReplica` (KEDA's `operation` of its RabbitMQ
/// scaler): `sum` adds them, `max` takes the largest, `avg` divides the sum by
/// the number of queues watched, rounded up (KEDA rounds down; up means one
/// waiting message is never averaged away). A scaler over one queue counts the
/// same under every operation.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "(has(self.name) && size(self.name) > 0) || (has(self.names) && size(self.names) > 0) || (has(self.pattern) && size(self.pattern) > 0)",
        "message": "queue needs name, names or pattern"
    }
]))]
pub struct QueueRef {
    /// One queue by name. May be left out when `names` or `pattern` is given.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(min = 1, max = 255))]
    pub name: String,
    /// More queues by name, on the same vhost.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 255)))]
    pub names: Vec<String>,
    /// A regular expression (Rust `regex` syntax) matched against the name of
    /// every queue of the vhost, as listed by the management API. Unanchored,
    /// like RabbitMQ's `use_regex` filter that KEDA's `useRegex` relies on:
    /// `sms` matches `sms` and `bulk-sms-2`; write `^sms$` for one name.
    /// Queues matching no listing (a new queue, before the listing shows it)
    /// are not watched until listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub pattern: Option<String>,
    /// Virtual host of the queues.
    #[serde(default = "default_vhost")]
    #[schemars(length(min = 1))]
    pub vhost: String,
    /// How several queues' counts combine: `sum` (default), `max` or `avg`.
    #[serde(default, skip_serializing_if = "Operation::is_default")]
    pub operation: Operation,
}

impl QueueRef {
    /// One queue on `vhost` (the original form).
    pub fn single(name: impl Into<String>, vhost: impl Into<String>) -> Self {
        QueueRef {
            name: name.into(),
            names: Vec::new(),
            pattern: None,
            vhost: vhost.into(),
            operation: Operation::default(),
        }
    }

    /// The queues named explicitly (`name`, then `names`), each once, in order.
    pub fn named(&self) -> Vec<&str> {
        let mut named: Vec<&str> = Vec::new();
        let listed =
            std::iter::once(self.name.as_str()).chain(self.names.iter().map(String::as_str));
        for queue in listed {
            if !queue.is_empty() && !named.contains(&queue) {
                named.push(queue);
            }
        }
        named
    }

    /// More than one queue may be watched: `names` or `pattern` is set.
    /// Such a scaler reports per-queue observations in its status.
    pub fn is_multi(&self) -> bool {
        !self.names.is_empty() || self.pattern.is_some()
    }

    /// The compiled `pattern` (`None` without one; an error when it is not a
    /// valid regular expression).
    pub fn pattern_regex(&self) -> Option<Result<regex::Regex, regex::Error>> {
        self.pattern.as_deref().map(regex::Regex::new)
    }

    /// The queues this selector watches, given the names the vhost lists:
    /// the named queues (listed or not: their absence is an error to report),
    /// then the listed queues the pattern matches, each once, sorted after
    /// the named ones. An invalid pattern matches nothing (validation
    /// reports it).
    pub fn resolve<'l>(&self, listed: impl IntoIterator<Item = &'l str>) -> Vec<String> {
        let mut queues: Vec<String> = self.named().into_iter().map(str::to_owned).collect();
        if let Some(Ok(pattern)) = self.pattern_regex() {
            let mut matched: Vec<String> = listed
                .into_iter()
                .filter(|name| pattern.is_match(name) && !queues.iter().any(|q| q == name))
                .map(str::to_owned)
                .collect();
            matched.sort();
            matched.dedup();
            queues.extend(matched);
        }
        queues
    }

    /// One line for the printer column and messages: `tasks`;
    /// `sms,email (sum)`; `sms,/^mail-/ (max)`.
    pub fn summary(&self) -> String {
        if !self.is_multi() {
            return self.name.clone();
        }
        let mut parts: Vec<String> = self.named().into_iter().map(str::to_owned).collect();
        if let Some(pattern) = &self.pattern {
            parts.push(format!("/{pattern}/"));
        }
        format!("{} ({})", parts.join(","), self.operation)
    }
}

/// How the counts of several queues combine (KEDA's `operation`).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// The total over the queues.
    #[default]
    Sum,
    /// The largest per-queue count.
    Max,
    /// The total divided by the number of queues watched, rounded up.
    Avg,
}

impl Operation {
    fn is_default(&self) -> bool {
        *self == Operation::default()
    }

    /// The operation as written in the spec (`sum`, `max`, `avg`).
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Sum => "sum",
            Operation::Max => "max",
            Operation::Avg => "avg",
        }
    }

    /// Combines per-queue counts; no queue at all counts 0.
    pub fn combine(self, counts: &[u64]) -> u64 {
        match self {
            Operation::Sum => counts.iter().fold(0u64, |a, b| a.saturating_add(*b)),
            Operation::Max => counts.iter().copied().max().unwrap_or(0),
            Operation::Avg => {
                let n = counts.len() as u64;
                if n == 0 {
                    0
                } else {
                    Operation::Sum.combine(counts).div_ceil(n)
                }
            }
        }
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where RabbitMQ is and which Secret holds its credentials.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct BrokerRef {
    /// Base URL of the management HTTP API.
    #[serde(default = "default_management_url")]
    pub management_url: String,
    /// AMQP URL without credentials (they come from the Secret).
    #[serde(default = "default_amqp_url")]
    pub amqp_url: String,
    /// Secret in the QueueScaler's namespace with the user name and password.
    pub credentials_secret_ref: CredentialsSecretRef,
}

/// Keys of a Secret holding RabbitMQ credentials. Passwords are never inline.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSecretRef {
    /// Secret name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key of the user name in the Secret.
    #[serde(default = "default_username_key")]
    #[schemars(length(min = 1))]
    pub username_key: String,
    /// Key of the password in the Secret.
    #[serde(default = "default_password_key")]
    #[schemars(length(min = 1))]
    pub password_key: String,
}

impl QueueScalerSpec {
    /// Time between two decisions.
    pub fn polling_interval(&self) -> Duration {
        Duration::from_secs(u64::from(self.polling_interval_seconds))
    }

    /// Time the queue must stay empty before scaling to zero.
    pub fn cooldown(&self) -> Duration {
        Duration::from_secs(u64::from(self.behavior.cooldown_seconds))
    }

    /// How far back a decision needs history: the longest stabilization
    /// window or policy period of either direction.
    pub fn history_retention(&self) -> Duration {
        let up = self.behavior.scale_up.resolved();
        let down = self.behavior.scale_down.resolved();
        let longest = [up, down]
            .iter()
            .flat_map(|rules| {
                std::iter::once(rules.stabilization_window_seconds)
                    .chain(rules.policies.iter().map(|p| p.period_seconds))
            })
            .max()
            .unwrap_or(0);
        Duration::from_secs(u64::from(longest))
    }
}

fn default_min_replicas() -> i32 {
    0
}
fn default_messages_per_replica() -> u64 {
    5
}
fn default_activation_messages() -> u64 {
    0
}
fn default_count_unacked() -> bool {
    true
}
fn default_polling_interval_seconds() -> u32 {
    5
}
fn default_paused() -> bool {
    false
}
fn default_target_api_version() -> String {
    "apps/v1".to_owned()
}
fn default_vhost() -> String {
    "/".to_owned()
}
fn default_management_url() -> String {
    "http://warren-rabbitmq:15672".to_owned()
}
fn default_amqp_url() -> String {
    "amqp://warren-rabbitmq:5672".to_owned()
}
fn default_username_key() -> String {
    "username".to_owned()
}
fn default_password_key() -> String {
    "password".to_owned()
}
