//! Rust-side validation of a [`QueueScalerSpec`].
//!
//! The CRD schema already enforces the bounds and the CEL rules below when
//! the API server admits a resource; [`QueueScalerSpec::validate`] repeats
//! them (a resource may predate the schema, or come from a test) and adds what
//! the schema cannot express: parseable URLs with the right scheme, no
//! credentials inside URLs, and `apps/v1` as the target's API version. The
//! controller reports a failure as `Ready=False` with reason `InvalidSpec`.
//!
//! `fallback.replicas` above `maxReplicas` is an error here (and a CEL rule in
//! the schema); the decision still clamps it into `[max(minReplicas, 1),
//! maxReplicas]` as a second line of defence.

use thiserror::Error;
use url::Url;

use crate::behavior::ScalingPolicy;
use crate::spec::{Operation, QueueScalerSpec};

/// Longest stabilization window accepted (HPA's limit).
pub const MAX_STABILIZATION_WINDOW_SECONDS: u32 = 3600;
/// Longest policy period accepted (HPA's limit).
pub const MAX_POLICY_PERIOD_SECONDS: u32 = 1800;

/// Why a spec cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SpecError {
    #[error("{field} must not be empty")]
    Empty { field: &'static str },
    #[error("scaleTargetRef.apiVersion must be apps/v1, got {0:?}")]
    UnsupportedApiVersion(String),
    #[error("minReplicas must be >= 0, got {0}")]
    NegativeMinReplicas(i32),
    #[error("maxReplicas must be >= 1, got {0}")]
    MaxReplicasBelowOne(i32),
    #[error("maxReplicas ({max}) must be >= minReplicas ({min})")]
    MaxBelowMin { min: i32, max: i32 },
    #[error("{field} must be >= 1")]
    Zero { field: &'static str },
    #[error("{field} must be <= {limit}, got {value}")]
    TooLarge {
        field: &'static str,
        value: u32,
        limit: u32,
    },
    #[error("fallback.replicas must be within [1, maxReplicas ({max})], got {replicas}")]
    FallbackOutOfRange { replicas: i32, max: i32 },
    #[error("{field} is not a valid URL: {reason}")]
    BadUrl { field: &'static str, reason: String },
    #[error("{field} must use scheme {expected}, got {got:?}")]
    WrongScheme {
        field: &'static str,
        expected: &'static str,
        got: String,
    },
    #[error("{field} must not contain credentials; use broker.credentialsSecretRef")]
    CredentialsInUrl { field: &'static str },
    #[error("queue needs name, names or pattern")]
    NoQueue,
    #[error("queue.pattern {pattern:?} is not a valid regular expression: {reason}")]
    BadPattern { pattern: String, reason: String },
    #[error("targetDrainSeconds needs queue.operation sum, got {0}")]
    DrainNeedsSum(Operation),
}

impl SpecError {
    /// Condition reason for every spec error.
    pub const REASON: &'static str = "InvalidSpec";
}

impl QueueScalerSpec {
    /// Checks the rules of the CRD schema plus those it cannot express.
    /// Returns the first violation found.
    pub fn validate(&self) -> Result<(), SpecError> {
        non_empty("scaleTargetRef.name", &self.scale_target_ref.name)?;
        if self.scale_target_ref.api_version != "apps/v1" {
            return Err(SpecError::UnsupportedApiVersion(
                self.scale_target_ref.api_version.clone(),
            ));
        }
        self.validate_queue()?;
        self.validate_broker()?;
        self.validate_sizing()?;
        self.validate_behavior()?;
        self.validate_fallback()
    }

    fn validate_broker(&self) -> Result<(), SpecError> {
        let secret = &self.broker.credentials_secret_ref;
        non_empty("broker.credentialsSecretRef.name", &secret.name)?;
        non_empty(
            "broker.credentialsSecretRef.usernameKey",
            &secret.username_key,
        )?;
        non_empty(
            "broker.credentialsSecretRef.passwordKey",
            &secret.password_key,
        )?;
        check_url(
            "broker.managementUrl",
            &self.broker.management_url,
            &["http", "https"],
            "http or https",
        )?;
        check_url(
            "broker.amqpUrl",
            &self.broker.amqp_url,
            &["amqp", "amqps"],
            "amqp or amqps",
        )
    }

    /// Replica bounds and the counts that size them.
    fn validate_sizing(&self) -> Result<(), SpecError> {
        if self.min_replicas < 0 {
            return Err(SpecError::NegativeMinReplicas(self.min_replicas));
        }
        if self.max_replicas < 1 {
            return Err(SpecError::MaxReplicasBelowOne(self.max_replicas));
        }
        if self.max_replicas < self.min_replicas {
            return Err(SpecError::MaxBelowMin {
                min: self.min_replicas,
                max: self.max_replicas,
            });
        }
        let zero = [
            ("messagesPerReplica", self.messages_per_replica == 0),
            ("targetDrainSeconds", self.target_drain_seconds == Some(0)),
            ("pollingIntervalSeconds", self.polling_interval_seconds == 0),
        ];
        match zero.into_iter().find(|(_, is_zero)| *is_zero) {
            Some((field, _)) => Err(SpecError::Zero { field }),
            None => Ok(()),
        }
    }

    fn validate_behavior(&self) -> Result<(), SpecError> {
        let up = &self.behavior.scale_up;
        let down = &self.behavior.scale_down;
        at_most(
            "behavior.scaleUp.stabilizationWindowSeconds",
            up.stabilization_window_seconds,
            MAX_STABILIZATION_WINDOW_SECONDS,
        )?;
        at_most(
            "behavior.scaleDown.stabilizationWindowSeconds",
            down.stabilization_window_seconds,
            MAX_STABILIZATION_WINDOW_SECONDS,
        )?;
        check_policies("behavior.scaleUp.policies", &up.policies)?;
        check_policies("behavior.scaleDown.policies", &down.policies)
    }

    fn validate_fallback(&self) -> Result<(), SpecError> {
        if self.fallback.failure_threshold == 0 {
            return Err(SpecError::Zero {
                field: "fallback.failureThreshold",
            });
        }
        if let Some(replicas) = self.fallback.replicas
            && !(1..=self.max_replicas).contains(&replicas)
        {
            return Err(SpecError::FallbackOutOfRange {
                replicas,
                max: self.max_replicas,
            });
        }
        Ok(())
    }
}

impl QueueScalerSpec {
    fn validate_queue(&self) -> Result<(), SpecError> {
        let queue = &self.queue;
        non_empty("queue.vhost", &queue.vhost)?;
        if !queue.name.is_empty() {
            non_empty("queue.name", &queue.name)?;
        }
        if queue.names.iter().any(|name| name.trim().is_empty()) {
            return Err(SpecError::Empty {
                field: "queue.names[]",
            });
        }
        if queue.pattern.as_deref().is_some_and(|p| p.is_empty()) {
            return Err(SpecError::Empty {
                field: "queue.pattern",
            });
        }
        if queue.named().is_empty() && queue.pattern.is_none() {
            return Err(SpecError::NoQueue);
        }
        if let Some(Err(err)) = queue.pattern_regex() {
            return Err(SpecError::BadPattern {
                pattern: queue.pattern.clone().unwrap_or_default(),
                reason: err.to_string(),
            });
        }
        if self.target_drain_seconds.is_some() && queue.operation != Operation::Sum {
            return Err(SpecError::DrainNeedsSum(queue.operation));
        }
        Ok(())
    }
}

fn non_empty(field: &'static str, value: &str) -> Result<(), SpecError> {
    if value.trim().is_empty() {
        Err(SpecError::Empty { field })
    } else {
        Ok(())
    }
}

fn at_most(field: &'static str, value: u32, limit: u32) -> Result<(), SpecError> {
    if value > limit {
        Err(SpecError::TooLarge {
            field,
            value,
            limit,
        })
    } else {
        Ok(())
    }
}

fn check_policies(field: &'static str, policies: &[ScalingPolicy]) -> Result<(), SpecError> {
    for policy in policies {
        if policy.value == 0 || policy.period_seconds == 0 {
            return Err(SpecError::Zero { field });
        }
        at_most(field, policy.period_seconds, MAX_POLICY_PERIOD_SECONDS)?;
    }
    Ok(())
}

fn check_url(
    field: &'static str,
    value: &str,
    schemes: &[&str],
    expected: &'static str,
) -> Result<(), SpecError> {
    let url = Url::parse(value).map_err(|e| SpecError::BadUrl {
        field,
        reason: e.to_string(),
    })?;
    if !schemes.contains(&url.scheme()) {
        return Err(SpecError::WrongScheme {
            field,
            expected,
            got: url.scheme().to_owned(),
        });
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(SpecError::CredentialsInUrl { field });
    }
    Ok(())
}
