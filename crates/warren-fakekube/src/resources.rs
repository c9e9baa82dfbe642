//! The resource types the fake serves.
//!
//! Only what the warren controller (and the kube-rs machinery it uses) talks
//! to. Every one of them is namespaced; the fake serves no cluster-scoped
//! resource and no discovery documents (typed `kube::Api`s do not need them).

/// One served resource type: group, version, plural and the behaviour of its
/// subresources.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct ResourceType {
    /// API group; empty for the core group.
    pub group: &'static str,
    /// API version within the group.
    pub version: &'static str,
    /// Plural resource name as it appears in the URL.
    pub plural: &'static str,
    /// `kind` of one object.
    pub kind: &'static str,
    /// Has a `/status` subresource: writes to the main resource keep the
    /// stored `status`, writes to `/status` change only `status`, and
    /// `metadata.generation` is tracked (bumped when anything outside
    /// `metadata` and `status` changes).
    pub status_subresource: bool,
    /// Has a `/scale` subresource backed by `spec.replicas`.
    pub scale_subresource: bool,
}

impl ResourceType {
    /// `apiVersion` of objects of this type (`v1`, `apps/v1`, ...).
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `plural.group` (or just `plural` for the core group), as Kubernetes
    /// spells a resource in error messages.
    pub fn qualified_name(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// Collection URL path for a namespace.
    pub fn collection_path(&self, namespace: &str) -> String {
        let prefix = if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        };
        format!("{prefix}/namespaces/{namespace}/{}", self.plural)
    }
}

/// `v1` Pods.
pub const PODS: ResourceType = ResourceType {
    group: "",
    version: "v1",
    plural: "pods",
    kind: "Pod",
    status_subresource: true,
    scale_subresource: false,
};

/// `v1` Secrets (the controller reads broker credentials).
pub const SECRETS: ResourceType = ResourceType {
    group: "",
    version: "v1",
    plural: "secrets",
    kind: "Secret",
    status_subresource: false,
    scale_subresource: false,
};

/// Core `v1` Events (the legacy API; kube's `Recorder` uses `events.k8s.io`).
pub const CORE_EVENTS: ResourceType = ResourceType {
    group: "",
    version: "v1",
    plural: "events",
    kind: "Event",
    status_subresource: false,
    scale_subresource: false,
};

/// `events.k8s.io/v1` Events, what `kube::runtime::events::Recorder` writes.
pub const EVENTS: ResourceType = ResourceType {
    group: "events.k8s.io",
    version: "v1",
    plural: "events",
    kind: "Event",
    status_subresource: false,
    scale_subresource: false,
};

/// `apps/v1` Deployments.
pub const DEPLOYMENTS: ResourceType = ResourceType {
    group: "apps",
    version: "v1",
    plural: "deployments",
    kind: "Deployment",
    status_subresource: true,
    scale_subresource: true,
};

/// `apps/v1` StatefulSets (a QueueScaler may target one).
pub const STATEFULSETS: ResourceType = ResourceType {
    group: "apps",
    version: "v1",
    plural: "statefulsets",
    kind: "StatefulSet",
    status_subresource: true,
    scale_subresource: true,
};

/// `coordination.k8s.io/v1` Leases (leader election).
pub const LEASES: ResourceType = ResourceType {
    group: "coordination.k8s.io",
    version: "v1",
    plural: "leases",
    kind: "Lease",
    status_subresource: false,
    scale_subresource: false,
};

/// `warren.dev/v1alpha1` QueueScalers (the CRD, with a status subresource).
pub const QUEUESCALERS: ResourceType = ResourceType {
    group: "warren.dev",
    version: "v1alpha1",
    plural: "queuescalers",
    kind: "QueueScaler",
    status_subresource: true,
    scale_subresource: false,
};

/// Every resource type the fake serves.
pub const ALL: [&ResourceType; 8] = [
    &PODS,
    &SECRETS,
    &CORE_EVENTS,
    &EVENTS,
    &DEPLOYMENTS,
    &STATEFULSETS,
    &LEASES,
    &QUEUESCALERS,
];

/// Finds a served resource type by group, version and plural.
pub fn lookup(group: &str, version: &str, plural: &str) -> Option<&'static ResourceType> {
    ALL.iter()
        .copied()
        .find(|rt| rt.group == group && rt.version == version && rt.plural == plural)
}
