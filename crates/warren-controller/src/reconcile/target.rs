//! The scale target (Deployment or StatefulSet): its replicas and pod
//! selector, read from the controller's watch caches when they hold it (no
//! apiserver request per tick), else with one `GET /scale`; and the
//! `/scale` patch.

use futures::FutureExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v1::Scale;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::{Patch, PatchParams};
use kube::core::Selector;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource};
use serde_json::json;
use warren_crd::TargetKind;

use super::context::{Context, lock};

/// A scale target: kind, namespace, name.
pub(crate) type TargetKey = (TargetKind, String, String);

/// The watch caches the reconciler reads targets from (filled by the
/// Deployment and StatefulSet watches that also trigger reconciles).
#[derive(Clone)]
pub struct TargetStores {
    pub deployments: Store<Deployment>,
    pub statefulsets: Store<StatefulSet>,
}

/// What a reconcile needs from the target's `/scale`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TargetScale {
    pub replicas: i32,
    /// The pod selector, as `/scale`'s `status.selector` writes it.
    pub selector: Option<String>,
    /// The target's resourceVersion when read from the cache (`None` from a GET).
    pub version: Option<String>,
}

impl TargetScale {
    fn from_scale(scale: &Scale) -> Self {
        Self {
            replicas: scale.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0),
            selector: scale.status.as_ref().and_then(|s| s.selector.clone()),
            version: None,
        }
    }

    /// `replicas` defaults to 1, as the apiserver defaults it.
    fn from_workload(meta: &ObjectMeta, replicas: Option<i32>, selector: &LabelSelector) -> Self {
        Self {
            replicas: replicas.unwrap_or(1),
            selector: Selector::try_from(selector.clone())
                .ok()
                .map(|s| s.to_string()),
            version: meta.resource_version.clone(),
        }
    }
}

impl TargetStores {
    /// The target from the cache; `None` when the cache is not synced yet or
    /// does not hold it (the caller asks the apiserver).
    fn get(&self, kind: TargetKind, namespace: &str, name: &str) -> Option<TargetScale> {
        match kind {
            TargetKind::Deployment => cached(&self.deployments, namespace, name, |d| {
                d.spec.as_ref().map(|s| (s.replicas, &s.selector))
            }),
            TargetKind::StatefulSet => cached(&self.statefulsets, namespace, name, |s| {
                s.spec.as_ref().map(|s| (s.replicas, &s.selector))
            }),
        }
    }
}

/// `namespace/name` from a synced `store`, its replicas and selector picked by `spec`.
fn cached<K>(
    store: &Store<K>,
    namespace: &str,
    name: &str,
    spec: impl Fn(&K) -> Option<(Option<i32>, &LabelSelector)>,
) -> Option<TargetScale>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    if !matches!(store.wait_until_ready().now_or_never(), Some(Ok(()))) {
        return None;
    }
    let object = store.get(&ObjectRef::new(name).within(namespace))?;
    let (replicas, selector) = spec(&object)?;
    Some(TargetScale::from_workload(
        object.meta(),
        replicas,
        selector,
    ))
}

/// The `/scale` subresource of a Deployment or StatefulSet.
pub(super) enum TargetApi {
    Deployment(Api<Deployment>),
    StatefulSet(Api<StatefulSet>),
}

impl TargetApi {
    pub fn new(client: Client, namespace: &str, kind: TargetKind) -> Self {
        match kind {
            TargetKind::Deployment => TargetApi::Deployment(Api::namespaced(client, namespace)),
            TargetKind::StatefulSet => TargetApi::StatefulSet(Api::namespaced(client, namespace)),
        }
    }

    async fn get_scale(&self, name: &str) -> kube::Result<Scale> {
        match self {
            TargetApi::Deployment(api) => api.get_scale(name).await,
            TargetApi::StatefulSet(api) => api.get_scale(name).await,
        }
    }

    pub async fn patch_scale(&self, name: &str, replicas: i32) -> kube::Result<Scale> {
        let patch = Patch::Merge(json!({"spec": {"replicas": replicas}}));
        let params = PatchParams::default();
        match self {
            TargetApi::Deployment(api) => api.patch_scale(name, &params, &patch).await,
            TargetApi::StatefulSet(api) => api.patch_scale(name, &params, &patch).await,
        }
    }
}

impl Context {
    /// The target's replicas and selector: from the watch cache when it holds
    /// the target, else `GET /scale`.
    pub(super) async fn target_scale(
        &self,
        api: &TargetApi,
        key: &TargetKey,
    ) -> kube::Result<TargetScale> {
        let (kind, namespace, name) = key;
        let stores = lock(&self.targets).clone();
        let Some(cached) = stores.and_then(|t| t.get(*kind, namespace, name)) else {
            let scale = api.get_scale(name).await?;
            return Ok(TargetScale::from_scale(&scale));
        };
        let mut written = lock(&self.written);
        match written.get(key) {
            Some((before, replicas)) if *before == cached.version => Ok(TargetScale {
                replicas: *replicas,
                ..cached
            }),
            Some(_) => {
                written.remove(key);
                Ok(cached)
            }
            None => Ok(cached),
        }
    }

    /// Remembers a `/scale` write made on top of `read` (see [`Context`]'s `written`).
    pub(super) fn remember_write(&self, key: &TargetKey, read: &TargetScale, replicas: i32) {
        if read.version.is_some() {
            lock(&self.written).insert(key.clone(), (read.version.clone(), replicas));
        }
    }
}
