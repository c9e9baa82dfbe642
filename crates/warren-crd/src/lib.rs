//! The `QueueScaler` custom resource (`warren.dev/v1alpha1`, short name `qs`).
//!
//! - [`QueueScalerSpec`]: what to scale, which queue, and the scaling rules.
//!   Every field has its default in the generated schema and in serde.
//! - [`QueueScalerStatus`]: the last [`Observation`], current and desired
//!   replicas, the last decision and the conditions.
//! - [`QueueScalerSpec::validate`]: the schema's rules plus those it cannot
//!   express, so the controller can report a bad spec as a condition.
//! - [`crd_yaml`]: the CustomResourceDefinition as YAML, as checked in under
//!   `manifests/crds.yaml` and `charts/warren/crds/queuescaler.yaml`
//!   (`make crds` regenerates both; a test fails when they drift).

mod behavior;
mod schema;
mod spec;
mod status;
mod validate;

use kube::{CustomResourceExt, ResourceExt};

pub use behavior::{
    Behavior, DEFAULT_SCALE_DOWN_POLICIES, DEFAULT_SCALE_UP_POLICIES, DirectionRules, Fallback,
    PolicyType, ScaleDownRules, ScaleUpRules, ScalingPolicy, SelectPolicy,
};
pub use spec::{
    BrokerRef, CredentialsSecretRef, Operation, QueueRef, QueueScaler, QueueScalerSpec,
    ScaleTargetRef, TargetKind,
};
pub use status::{
    Condition, ConditionStatus, LastDecision, Observation, QueueObservation, QueueScalerStatus,
    condition_type,
};
pub use validate::{MAX_POLICY_PERIOD_SECONDS, MAX_STABILIZATION_WINDOW_SECONDS, SpecError};

/// Identifies the workload a QueueScaler scales.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetKey {
    pub namespace: String,
    pub kind: TargetKind,
    pub name: String,
}

impl std::fmt::Display for TargetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
    }
}

impl QueueScaler {
    /// The scaled workload: the target lives in the QueueScaler's namespace.
    /// `None` only for an object without a namespace (never one read from
    /// the API server, since the resource is namespaced).
    pub fn target_key(&self) -> Option<TargetKey> {
        Some(TargetKey {
            namespace: self.namespace()?,
            kind: self.spec.scale_target_ref.kind,
            name: self.spec.scale_target_ref.name.clone(),
        })
    }
}

/// The CustomResourceDefinition of [`QueueScaler`] as YAML (serde-saphyr).
pub fn crd_yaml() -> Result<String, serde_saphyr::SerializeError> {
    serde_saphyr::to_string(&QueueScaler::crd())
}
