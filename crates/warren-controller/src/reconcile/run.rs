//! The kube runtime `Controller` that drives [`reconcile`]: the QueueScaler
//! watch, the Deployment and StatefulSet watches (their caches are what the
//! reconciler reads targets from) and the janitor that forgets deleted
//! scalers.

use std::sync::Arc;
use std::time::Duration;

use std::fmt::Debug;

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use kube::runtime::controller::{self, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{PredicateConfig, WatchStreamExt, predicates, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use warren_crd::{QueueScaler, TargetKind};

use super::context::Context;
use super::target::TargetStores;
use super::{error_policy, reconcile};

/// The scalers in `store` whose target is `kind` `namespace/name`.
pub fn scalers_targeting(
    store: &Store<QueueScaler>,
    kind: TargetKind,
    namespace: Option<&str>,
    name: &str,
) -> Vec<ObjectRef<QueueScaler>> {
    store
        .state()
        .iter()
        .filter(|qs| {
            qs.spec.scale_target_ref.kind == kind
                && qs.spec.scale_target_ref.name == name
                && qs.namespace().as_deref() == namespace
        })
        .map(|qs| ObjectRef::from_obj(qs.as_ref()))
        .collect()
}

/// Runs the controller until `stop` is cancelled (leadership lost or
/// shutdown); in-flight reconciles finish first. `namespace` limits the
/// watch to one namespace (`None`: all namespaces).
pub async fn run(ctx: Arc<Context>, namespace: Option<String>, stop: CancellationToken) {
    let client = ctx.client.clone();
    let namespace = namespace.as_deref();
    let (reader, writer) = reflector::store();
    // Status writes do not change the generation: only spec changes (and
    // the requeue timer) trigger a reconcile, so writing the status does not
    // loop back into another one.
    let scaler_events = generation_changes(namespaced_or_all(client.clone(), namespace), writer);
    // A target's generation changes with its spec.replicas (someone scaled
    // it, or a rollout): re-decide at once.
    // The same watches fill the caches the reconciler reads targets from.
    let (deployment_cache, deployment_writer) = reflector::store();
    let (statefulset_cache, statefulset_writer) = reflector::store();
    ctx.read_targets_from(TargetStores {
        deployments: deployment_cache,
        statefulsets: statefulset_cache,
    });
    let deployment_events = generation_changes(
        namespaced_or_all(client.clone(), namespace),
        deployment_writer,
    );
    let statefulset_events =
        generation_changes(namespaced_or_all(client, namespace), statefulset_writer);

    let by_deployment = reader.clone();
    let by_statefulset = reader.clone();
    let controller = Controller::for_stream(scaler_events, reader.clone())
        .with_config(controller::Config::default().concurrency(ctx.settings.concurrency))
        .watches_stream(deployment_events, move |d: Deployment| {
            scalers_targeting(
                &by_deployment,
                TargetKind::Deployment,
                d.namespace().as_deref(),
                &d.name_any(),
            )
        })
        .watches_stream(statefulset_events, move |s: StatefulSet| {
            scalers_targeting(
                &by_statefulset,
                TargetKind::StatefulSet,
                s.namespace().as_deref(),
                &s.name_any(),
            )
        })
        .graceful_shutdown_on(stop.clone().cancelled_owned())
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(error = %err, "controller event");
            }
        });
    tokio::select! {
        () = controller => {}
        () = janitor(ctx, reader) => {}
    }
    tracing::info!("scaling loop stopped");
}

/// The objects of `api` whose generation changed, cached in `writer`'s store.
fn generation_changes<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
) -> impl Stream<Item = Result<K, watcher::Error>>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
{
    watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation, PredicateConfig::default())
}

/// Every minute, forgets the memory of scalers that are gone.
async fn janitor(ctx: Arc<Context>, reader: Store<QueueScaler>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        if reader.wait_until_ready().await.is_ok() {
            ctx.forget_missing(&reader);
        }
    }
}

fn namespaced_or_all<K>(client: Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    }
}
