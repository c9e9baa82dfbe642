//! Why a decision came out the way it did.

use std::fmt;

/// The explanation of a [`Decision`](crate::Decision): the last step of the
/// pipeline that determined the replica count. [`Reason::label`] is a stable
/// CamelCase machine label (status `lastDecision.reason`, Kubernetes Event
/// reason, metric label); `Display` is a human sentence.
#[derive(Debug, Clone, PartialEq)]
pub enum Reason {
    /// `spec.paused`: the current replica count is kept.
    Paused,
    /// Metrics are missing (fewer than `fallback.failureThreshold` failures in
    /// a row, or no `fallback.replicas`): the current count is held.
    MetricsUnavailable { consecutive_failures: u32 },
    /// Metrics have been missing for `fallback.failureThreshold` reads: at
    /// least `fallback.replicas` run.
    Fallback {
        consecutive_failures: u32,
        fallback_replicas: i32,
    },
    /// At zero replicas with no more than `activationMessages` messages.
    BelowActivation { messages: u64, activation: u64 },
    /// Sized by backlog: ceil(messages / messagesPerReplica).
    Backlog { messages: u64, per_replica: u64 },
    /// Sized by rates: ceil((arrival + backlog / drainSeconds) / perReplicaAckRate).
    DrainRate {
        arrival_rate: f64,
        backlog: u64,
        drain_seconds: u32,
        per_replica_ack_rate: f64,
    },
    /// Nothing counted (countUnacked is false) but messages are still being
    /// processed: one replica stays.
    UnackedInFlight { unacked: u64 },
    /// The queue is empty but not yet for `cooldownSeconds`: one replica stays.
    CooldownPending { remaining_seconds: i64 },
    /// The queue is empty (for `cooldownSeconds` when scaling to zero).
    QueueEmpty,
    /// The sizing rule wanted fewer than `minReplicas`.
    AtMinReplicas { wanted: u64 },
    /// The sizing rule wanted more than `maxReplicas`.
    AtMaxReplicas { wanted: u64 },
    /// Scale-up held back by the lowest recommendation in the scale-up window.
    ScaleUpStabilized {
        window_seconds: u32,
        recommendation: i32,
    },
    /// Scale-down held back by the highest recommendation in the scale-down window.
    ScaleDownStabilized {
        window_seconds: u32,
        recommendation: i32,
    },
    /// Scale-up capped by the scale-up policies (or disabled).
    ScaleUpLimited { limit: i32, wanted: i32 },
    /// Scale-down capped by the scale-down policies (or disabled).
    ScaleDownLimited { limit: i32, wanted: i32 },
}

impl Reason {
    /// Stable CamelCase label of the variant.
    pub fn label(&self) -> &'static str {
        match self {
            Reason::Paused => "Paused",
            Reason::MetricsUnavailable { .. } => "MetricsUnavailable",
            Reason::Fallback { .. } => "Fallback",
            Reason::BelowActivation { .. } => "BelowActivation",
            Reason::Backlog { .. } => "Backlog",
            Reason::DrainRate { .. } => "DrainRate",
            Reason::UnackedInFlight { .. } => "UnackedInFlight",
            Reason::CooldownPending { .. } => "CooldownPending",
            Reason::QueueEmpty => "QueueEmpty",
            Reason::AtMinReplicas { .. } => "AtMinReplicas",
            Reason::AtMaxReplicas { .. } => "AtMaxReplicas",
            Reason::ScaleUpStabilized { .. } => "ScaleUpStabilized",
            Reason::ScaleDownStabilized { .. } => "ScaleDownStabilized",
            Reason::ScaleUpLimited { .. } => "ScaleUpLimited",
            Reason::ScaleDownLimited { .. } => "ScaleDownLimited",
        }
    }

    /// Every label, e.g. to pre-register metric series.
    pub const LABELS: [&'static str; 15] = [
        "Paused",
        "MetricsUnavailable",
        "Fallback",
        "BelowActivation",
        "Backlog",
        "DrainRate",
        "UnackedInFlight",
        "CooldownPending",
        "QueueEmpty",
        "AtMinReplicas",
        "AtMaxReplicas",
        "ScaleUpStabilized",
        "ScaleDownStabilized",
        "ScaleUpLimited",
        "ScaleDownLimited",
    ];
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Paused => write!(f, "scaling is paused; replicas are left as they are"),
            Reason::MetricsUnavailable {
                consecutive_failures,
            } => write!(
                f,
                "queue metrics unavailable ({consecutive_failures} failed reads in a row); holding the current replicas"
            ),
            Reason::Fallback {
                consecutive_failures,
                fallback_replicas,
            } => write!(
                f,
                "queue metrics unavailable ({consecutive_failures} failed reads in a row); running at least the fallback of {fallback_replicas} replicas"
            ),
            Reason::BelowActivation {
                messages,
                activation,
            } => write!(
                f,
                "{messages} messages do not exceed the activation threshold of {activation}; staying at zero"
            ),
            Reason::Backlog {
                messages,
                per_replica,
            } => write!(f, "{messages} messages at {per_replica} per replica"),
            Reason::DrainRate {
                arrival_rate,
                backlog,
                drain_seconds,
                per_replica_ack_rate,
            } => write!(
                f,
                "arrivals of {arrival_rate:.2}/s plus {backlog} messages to drain in {drain_seconds}s at {per_replica_ack_rate:.2} acks/s per replica"
            ),
            Reason::UnackedInFlight { unacked } => write!(
                f,
                "{unacked} messages are still being processed; keeping one replica"
            ),
            Reason::CooldownPending { remaining_seconds } => write!(
                f,
                "the queue is empty; scaling to zero in {remaining_seconds}s if it stays empty"
            ),
            Reason::QueueEmpty => write!(f, "the queue is empty"),
            Reason::AtMinReplicas { wanted } => {
                write!(f, "{wanted} replicas wanted, raised to minReplicas")
            }
            Reason::AtMaxReplicas { wanted } => {
                write!(f, "{wanted} replicas wanted, capped at maxReplicas")
            }
            Reason::ScaleUpStabilized {
                window_seconds,
                recommendation,
            } => write!(
                f,
                "scale-up to {recommendation} held back by the lowest recommendation of the last {window_seconds}s"
            ),
            Reason::ScaleDownStabilized {
                window_seconds,
                recommendation,
            } => write!(
                f,
                "scale-down to {recommendation} held back by the highest recommendation of the last {window_seconds}s"
            ),
            Reason::ScaleUpLimited { limit, wanted } => write!(
                f,
                "scale-up to {wanted} limited to {limit} by the scale-up policies"
            ),
            Reason::ScaleDownLimited { limit, wanted } => write!(
                f,
                "scale-down to {wanted} limited to {limit} by the scale-down policies"
            ),
        }
    }
}
