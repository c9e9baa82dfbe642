//! Step 3 of a reconcile: apply the decision. When it changes the
//! replicas: deletion costs on the pods before a Deployment's scale-in,
//! the `/scale` patch, a `Scaled` Event and a `scaler.scaled` audit event.
//! Also the Events a reconcile records about what it saw.

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use warren_crd::{QueueScaler, TargetKind};
use warren_scaling::Decision;

use super::context::Context;
use super::target::{TargetApi, TargetKey, TargetScale};
use crate::audit::ScaleRecord;
use crate::deletion_cost::{self, DELETION_COST_ANNOTATION, PodView};
use crate::error::Error;
use crate::metrics::DirectionLabels;
use crate::observe::BrokerTarget;

/// The target as the reconcile read it.
pub(super) struct Target {
    pub key: TargetKey,
    pub api: TargetApi,
    pub scale: TargetScale,
    /// `Kind namespace/name`, for messages.
    pub display: String,
}

/// What the apply step acts on.
pub(super) struct Plan<'a> {
    pub scaler: &'a QueueScaler,
    pub target: &'a Target,
    pub broker_target: &'a BrokerTarget,
    pub decision: &'a Decision,
    pub now: DateTime<Utc>,
}

/// Scales the target to the decision's replicas when they differ from its
/// current ones (and the scaler is not paused); returns when it did.
pub(super) async fn apply(ctx: &Context, plan: &Plan<'_>) -> Result<Option<DateTime<Utc>>, Error> {
    let Plan {
        scaler,
        target,
        broker_target,
        decision,
        now,
    } = *plan;
    let current = target.scale.replicas;
    let to = decision.replicas;
    if to == current || scaler.spec.paused {
        return Ok(None);
    }
    if to < current && target.key.0 == TargetKind::Deployment {
        mark_deletion_costs(
            ctx,
            &target.key.1,
            target.scale.selector.as_deref(),
            broker_target,
        )
        .await;
    }
    target
        .api
        .patch_scale(&target.key.2, to)
        .await
        .map_err(|source| Error::PatchScale {
            target: target.display.clone(),
            replicas: to,
            source,
        })?;
    ctx.remember_write(&target.key, &target.scale, to);
    let direction = if to > current { "up" } else { "down" };
    ctx.metrics
        .scale_patches
        .get_or_create(&DirectionLabels {
            direction: direction.to_string(),
        })
        .inc();
    announce_scale(ctx, plan).await;
    Ok(Some(now))
}

/// A done scale, told three ways: a log line, a `Scaled` Event and a
/// `scaler.scaled` audit event.
async fn announce_scale(ctx: &Context, plan: &Plan<'_>) {
    let (scaler, decision) = (plan.scaler, plan.decision);
    let (current, to) = (plan.target.scale.replicas, decision.replicas);
    let explanation = decision.reason.to_string();
    tracing::info!(
        target = %plan.target.display,
        from = current,
        to,
        reason = decision.reason.label(),
        "{explanation}"
    );
    let note = format!("from {current} to {to}: {explanation}");
    record_event(ctx, scaler, EventType::Normal, "Scaled", "Scale", &note).await;
    let target_ref = &scaler.spec.scale_target_ref;
    ctx.audit.publish(
        plan.broker_target,
        &ScaleRecord {
            namespace: plan.broker_target.namespace.clone(),
            scaler: scaler.name_any(),
            target_kind: target_ref.kind.to_string(),
            target_name: target_ref.name.clone(),
            from: current,
            to,
            reason: decision.reason.label().to_string(),
            message: explanation,
            at: plan.now,
        },
    );
}

/// Records a Kubernetes Event about the scaler; a failure is logged, never
/// fatal (the change it reports already happened).
///
/// A fresh [`Recorder`] per Event: kube's Recorder folds Events with the
/// same reason and object into one series for 6 minutes and keeps the
/// *first* note, so a second `Scaled` Event would still read "from 1 to 3".
/// Each scale is its own Event; repeated warnings are already limited to
/// condition transitions by the reconciler.
pub(super) async fn record_event(
    ctx: &Context,
    scaler: &QueueScaler,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    // The Events API caps notes at 1 kB.
    let note: String = note.chars().take(1000).collect();
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    if let Err(err) = recorder.publish(&event, &scaler.object_ref(&())).await {
        tracing::warn!(reason, error = %err, "cannot record a Kubernetes Event");
    }
}

/// Before a scale-in: annotate the target's pods so the ReplicaSet removes
/// idle pods first (see [`deletion_cost`]). Best effort: when busy pods
/// cannot be told apart the scale-in still happens (workers finish the job
/// in hand on SIGTERM, so nothing is lost, only time).
async fn mark_deletion_costs(
    ctx: &Context,
    namespace: &str,
    selector: Option<&str>,
    target: &BrokerTarget,
) {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        tracing::warn!(
            namespace,
            "the target's /scale has no selector; cannot mark deletion costs"
        );
        return;
    };
    let unacked = match ctx.observer.connection_unacked(target).await {
        Ok(unacked) => unacked,
        Err(err) => {
            tracing::warn!(error = %err, "cannot tell busy pods from idle ones; scaling in without deletion costs");
            return;
        }
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let listed = match pods.list(&ListParams::default().labels(selector)).await {
        Ok(list) => list.items,
        Err(err) => {
            tracing::warn!(error = %err, "cannot list the target's pods; scaling in without deletion costs");
            return;
        }
    };
    let views: Vec<PodView> = listed
        .iter()
        .map(|pod| PodView {
            name: pod.name_any(),
            current_cost: pod.annotations().get(DELETION_COST_ANNOTATION).cloned(),
            terminating: pod.metadata.deletion_timestamp.is_some(),
        })
        .collect();
    for (pod, cost) in deletion_cost::plan(&views, &unacked) {
        let patch = Patch::Merge(json!({
            "metadata": {"annotations": {DELETION_COST_ANNOTATION: cost.to_string()}}
        }));
        match pods.patch(&pod, &PatchParams::default(), &patch).await {
            Ok(_) => {
                ctx.metrics.deletion_cost_patches.inc();
            }
            Err(err) => tracing::warn!(pod, error = %err, "cannot set the pod's deletion cost"),
        }
    }
}
