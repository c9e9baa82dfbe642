//! The QueueScaler reconciler and the kube runtime `Controller` that drives it.
//!
//! One reconcile (see [`reconcile`]):
//! 1. `spec.validate()`; on error `Ready=False/InvalidSpec`, a Warning
//!    Event (once per distinct error) and a slow requeue — never a crash loop.
//! 2. The target's (Deployment or StatefulSet) current replicas and pod
//!    selector, from the controller's watch cache of Deployments and
//!    StatefulSets ([`Context::read_targets_from`]): no apiserver request per
//!    tick. A target the cache does not hold (not synced yet, or not there)
//!    is read with one `GET /scale`; a missing target is
//!    `Ready=False/TargetNotFound`. After its own `/scale` write the
//!    reconciler trusts the replicas it wrote until the cache shows a newer
//!    version of the target.
//! 3. Unless paused, the queue observation from the [`MetricsSource`]: the
//!    ready count from an AMQP passive declare (exact, now) and the unacked
//!    count and rates from the management API (see [`crate::source`]). A
//!    failed read increments the scaler's consecutive failures (kept in
//!    memory, seeded from and mirrored to `status.consecutiveFailures`).
//!    When only the unacked count is unknown (the management API failed
//!    but the passive declare worked), the last known unacked count stands
//!    in for it (0 when none is known: first read, nothing in the status).
//! 4. [`warren_scaling::decide`] with the scaler's in-memory [`History`].
//!    With the unacked count unknown, a decision to scale a running target
//!    to zero is replaced by holding its replicas
//!    ([`hold_if_unacked_unknown`]): work may still be in flight, and a
//!    worker that cancelled its consumer still holds its unacked message, so
//!    not even "no consumers" proves the queue idle.
//! 5. When the decision differs from the current replicas: before a
//!    scale-in of a Deployment, pod-deletion-cost annotations on its pods
//!    (busy pods expensive, idle ones cheap); then a merge patch of `/scale`,
//!    a `Scaled` Event and a `scaler.scaled` audit event.
//! 6. A merge patch of `/status`, skipped when only timestamps would change.
//!    The status is built on the one this controller last wrote for the
//!    object (the watch cache can lag its own writes), else the object's.
//! 7. Requeue after `pollingIntervalSeconds`.
//!
//! The QueueScaler watch only triggers on generation changes (status writes
//! do not re-trigger), and Deployments / StatefulSets map to the scalers
//! whose `scaleTargetRef` names them, through the controller's reflector
//! store, so a scaler reacts at once when its target's replicas change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v1::Scale;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::{ListParams, Patch, PatchParams};
use kube::core::Selector;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{PredicateConfig, WatchStreamExt, predicates, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use warren_crd::{QueueScaler, QueueScalerStatus, TargetKind};
use warren_scaling::{Decision, DecisionInput, History, Reason, decide};

use crate::audit::{ScaleAudit, ScaleRecord};
use crate::deletion_cost::{self, DELETION_COST_ANNOTATION, PodView};
use crate::error::Error;
use crate::metrics::{ControllerMetrics, DirectionLabels, ObservationLabels, ResultLabels};
use crate::source::{BrokerTarget, MetricsError, MetricsSource};
use crate::status::{self, REASON_INVALID_SPEC, REASON_TARGET_NOT_FOUND, TickOutcome};

/// `reportingController` of the Events this controller records.
pub const CONTROLLER_NAME: &str = "warren-controller";

/// Timing knobs of the reconciler.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Requeue of a scaler whose spec fails validation (a spec change
    /// triggers a reconcile anyway).
    pub invalid_spec_requeue: Duration,
    /// Rewrite the status at least this often even when only the
    /// observation time changed.
    pub status_heartbeat: Duration,
    /// First delay after a failed reconcile; doubles per consecutive failure.
    pub error_backoff_min: Duration,
    /// Cap of the failed-reconcile backoff.
    pub error_backoff_max: Duration,
    /// Reconciles running at once (0: unlimited). Bounds the burst of
    /// Kubernetes API requests when many scalers come due together.
    pub concurrency: u16,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            invalid_spec_requeue: Duration::from_secs(300),
            status_heartbeat: Duration::from_secs(60),
            error_backoff_min: Duration::from_secs(1),
            error_backoff_max: Duration::from_secs(300),
            concurrency: 64,
        }
    }
}

/// What the controller remembers about one scaler between reconciles.
#[derive(Debug, Default)]
struct Memory {
    uid: Option<String>,
    history: History,
    /// Failed queue reads in a row.
    failures: u32,
    /// Failed reconciles in a row (error_policy backoff).
    error_streak: u32,
    /// The last unacked count the management API reported.
    last_unacked: Option<u64>,
    /// Reads in a row without an unacked count.
    unacked_unknown: u32,
    /// The status this controller last wrote for this object (uid): the next
    /// status is built on it, not on the watch cache's copy, which can lag
    /// the write (a busy apiserver, many scalers) — building on a stale copy
    /// rewrote an unchanged status every tick.
    written_status: Option<QueueScalerStatus>,
}

/// What [`Context::recall`] gives back.
struct Recalled {
    history: History,
    failures: u32,
    last_unacked: Option<u64>,
    unacked_unknown: u32,
}

type ScalerKey = (String, String);

/// A scale target: kind, namespace, name.
type TargetKey = (TargetKind, String, String);

/// The watch caches the reconciler reads targets from (filled by the
/// Deployment and StatefulSet watches that also trigger reconciles).
#[derive(Clone)]
pub struct TargetStores {
    pub deployments: Store<Deployment>,
    pub statefulsets: Store<StatefulSet>,
}

/// What a reconcile needs from the target's `/scale`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TargetScale {
    replicas: i32,
    /// The pod selector, as `/scale`'s `status.selector` writes it.
    selector: Option<String>,
    /// The target's resourceVersion when read from the cache (`None` from a GET).
    version: Option<String>,
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

/// Everything a reconcile needs. One per leadership term.
pub struct Context {
    pub client: Client,
    /// Who records the Events (see [`record_event`]).
    pub reporter: Reporter,
    pub metrics: ControllerMetrics,
    pub source: Arc<dyn MetricsSource>,
    pub audit: Arc<dyn ScaleAudit>,
    pub settings: Settings,
    memory: Mutex<HashMap<ScalerKey, Memory>>,
    targets: Mutex<Option<TargetStores>>,
    /// Replicas this controller wrote to a target's `/scale`, with the
    /// target's version in the cache before the write: while the cache still
    /// shows that version, the write is newer than the cache.
    written: Mutex<HashMap<TargetKey, (Option<String>, i32)>>,
}

impl Context {
    /// `instance` names this replica in Events (its pod name).
    pub fn new(
        client: Client,
        instance: Option<String>,
        metrics: ControllerMetrics,
        source: Arc<dyn MetricsSource>,
        audit: Arc<dyn ScaleAudit>,
        settings: Settings,
    ) -> Self {
        Self {
            client,
            reporter: Reporter {
                controller: CONTROLLER_NAME.into(),
                instance,
            },
            metrics,
            source,
            audit,
            settings,
            memory: Mutex::default(),
            targets: Mutex::default(),
            written: Mutex::default(),
        }
    }

    /// Reads targets from these watch caches from now on instead of one
    /// `GET /scale` per reconcile ([`run`] calls it with its watches' caches).
    pub fn read_targets_from(&self, stores: TargetStores) {
        *self.targets.lock().unwrap_or_else(|p| p.into_inner()) = Some(stores);
    }

    /// The target's replicas and selector: from the watch cache when it holds
    /// the target, else `GET /scale`.
    async fn target_scale(&self, api: &TargetApi, key: &TargetKey) -> kube::Result<TargetScale> {
        let (kind, namespace, name) = key;
        let stores = self
            .targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(cached) = stores.and_then(|t| t.get(*kind, namespace, name)) else {
            let scale = api.get_scale(name).await?;
            return Ok(TargetScale::from_scale(&scale));
        };
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
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

    /// Remembers a `/scale` write made on top of `read` (see [`Self::written`]).
    fn remember_write(&self, key: &TargetKey, read: &TargetScale, replicas: i32) {
        if read.version.is_some() {
            let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
            written.insert(key.clone(), (read.version.clone(), replicas));
        }
    }

    fn with_memory<T>(&self, key: &ScalerKey, f: impl FnOnce(&mut Memory) -> T) -> T {
        let mut map = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        f(map.entry(key.clone()).or_default())
    }

    /// The scaler's history, failure count and last known unacked count,
    /// reset when the object was recreated (new uid); after a restart the
    /// failures and the last unacked count start from the status.
    fn recall(&self, key: &ScalerKey, scaler: &QueueScaler) -> Recalled {
        let uid = scaler.uid();
        let status = scaler.status.as_ref();
        let status_failures = status.map(|s| s.consecutive_failures).unwrap_or(0);
        let status_unacked = status.and_then(|s| s.observation.as_ref().map(|o| o.unacked));
        self.with_memory(key, |m| {
            if m.uid != uid {
                *m = Memory {
                    uid: uid.clone(),
                    history: inherited_history(status, Utc::now()),
                    failures: status_failures,
                    last_unacked: status_unacked,
                    ..Memory::default()
                };
            }
            Recalled {
                history: m.history.clone(),
                failures: m.failures,
                last_unacked: m.last_unacked,
                unacked_unknown: m.unacked_unknown,
            }
        })
    }

    /// The status the next one is built on: the one this controller last
    /// wrote for this object when it has one, else the object's.
    fn status_base(&self, key: &ScalerKey, scaler: &QueueScaler) -> QueueScalerStatus {
        let uid = scaler.uid();
        self.with_memory(key, |m| match &m.written_status {
            Some(written) if m.uid == uid => written.clone(),
            _ => scaler.status.clone().unwrap_or_default(),
        })
    }

    fn remember_unacked(&self, key: &ScalerKey, measured: Option<u64>, unknown_streak: u32) {
        self.with_memory(key, |m| {
            if measured.is_some() {
                m.last_unacked = measured;
            }
            m.unacked_unknown = unknown_streak;
        });
    }

    fn remember(&self, key: &ScalerKey, history: History, failures: u32) {
        self.with_memory(key, |m| {
            m.history = history;
            m.failures = failures;
        });
    }

    /// Forgets scalers that are no longer in `store`.
    fn forget_missing(&self, store: &Store<QueueScaler>) {
        let mut map = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|(namespace, name), _| {
            let exists = store.get(&ObjectRef::new(name).within(namespace)).is_some();
            if !exists {
                self.metrics.forget_scaler(namespace, name);
            }
            exists
        });
    }

    /// Scalers with in-memory state (for tests and diagnostics).
    pub fn remembered(&self) -> usize {
        self.memory.lock().map(|m| m.len()).unwrap_or(0)
    }
}

/// How a successful reconcile ended (the `result` metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Scaled,
    Unchanged,
    Paused,
    MetricsUnavailable,
    InvalidSpec,
    TargetNotFound,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Scaled => "scaled",
            Outcome::Unchanged => "unchanged",
            Outcome::Paused => "paused",
            Outcome::MetricsUnavailable => "metrics_unavailable",
            Outcome::InvalidSpec => "invalid_spec",
            Outcome::TargetNotFound => "target_not_found",
        }
    }
}

/// The `/scale` subresource of a Deployment or StatefulSet.
enum TargetApi {
    Deployment(Api<Deployment>),
    StatefulSet(Api<StatefulSet>),
}

impl TargetApi {
    fn new(client: Client, namespace: &str, kind: TargetKind) -> Self {
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

    async fn patch_scale(&self, name: &str, replicas: i32) -> kube::Result<Scale> {
        let patch = Patch::Merge(json!({"spec": {"replicas": replicas}}));
        let params = PatchParams::default();
        match self {
            TargetApi::Deployment(api) => api.patch_scale(name, &params, &patch).await,
            TargetApi::StatefulSet(api) => api.patch_scale(name, &params, &patch).await,
        }
    }
}

/// Reconciles one QueueScaler; records the result and duration metrics.
pub async fn reconcile(scaler: Arc<QueueScaler>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&scaler, &ctx).await;
    let label = match &result {
        Ok((outcome, _)) => outcome.label(),
        Err(err) => {
            if let Some(namespace) = scaler.namespace() {
                ctx.metrics
                    .record_scaler_error(&namespace, &scaler.name_any(), err.metric_label());
            }
            err.metric_label()
        }
    };
    let labels = ResultLabels {
        result: label.to_string(),
    };
    ctx.metrics.reconciles.get_or_create(&labels).inc();
    ctx.metrics
        .reconcile_duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok((_, action)) => {
            if let Some(namespace) = scaler.namespace() {
                ctx.with_memory(&(namespace, scaler.name_any()), |m| m.error_streak = 0);
            }
            Ok(action)
        }
        Err(err) => Err(err),
    }
}

/// Backs off exponentially per scaler (from `error_backoff_min`, doubling,
/// capped at `error_backoff_max`) after a failed reconcile.
pub fn error_policy(scaler: Arc<QueueScaler>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = (scaler.namespace().unwrap_or_default(), scaler.name_any());
    let streak = ctx.with_memory(&key, |m| {
        m.error_streak = m.error_streak.saturating_add(1);
        m.error_streak
    });
    let delay = backoff_delay(
        streak,
        ctx.settings.error_backoff_min,
        ctx.settings.error_backoff_max,
    );
    tracing::warn!(
        scaler = %format!("{}/{}", key.0, key.1),
        error = %error,
        failures_in_a_row = streak,
        retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}

/// `min * 2^(streak-1)`, capped at `max`.
pub fn backoff_delay(streak: u32, min: Duration, max: Duration) -> Duration {
    let exponent = streak.saturating_sub(1).min(20);
    min.saturating_mul(1u32 << exponent).min(max)
}

async fn reconcile_inner(scaler: &QueueScaler, ctx: &Context) -> Result<(Outcome, Action), Error> {
    let namespace = scaler.namespace().ok_or(Error::MissingNamespace)?;
    let name = scaler.name_any();
    let key = (namespace.clone(), name.clone());
    let spec = &scaler.spec;
    let generation = scaler.metadata.generation;
    let previous = ctx.status_base(&key, scaler);
    let now = Utc::now();
    let scalers: Api<QueueScaler> = Api::namespaced(ctx.client.clone(), &namespace);

    // 1. A bad spec is reported, not retried fast.
    if let Err(err) = spec.validate() {
        let message = err.to_string();
        if !status::already_not_ready(&previous, REASON_INVALID_SPEC, &message) {
            record_event(
                ctx,
                scaler,
                EventType::Warning,
                REASON_INVALID_SPEC,
                "Validate",
                &message,
            )
            .await;
        }
        let next = status::not_ready(&previous, generation, REASON_INVALID_SPEC, message, now);
        write_status(ctx, &scalers, &namespace, &name, &previous, &next, now).await?;
        return Ok((
            Outcome::InvalidSpec,
            Action::requeue(ctx.settings.invalid_spec_requeue),
        ));
    }
    let polling = Action::requeue(spec.polling_interval());

    // 2. The target's replicas.
    let target_ref = &spec.scale_target_ref;
    let target_name = format!("{} {}/{}", target_ref.kind, namespace, target_ref.name);
    let target = TargetApi::new(ctx.client.clone(), &namespace, target_ref.kind);
    let target_key = (target_ref.kind, namespace.clone(), target_ref.name.clone());
    let scale = match ctx.target_scale(&target, &target_key).await {
        Ok(scale) => scale,
        Err(kube::Error::Api(status)) if status.is_not_found() => {
            let message = format!("{target_name} not found");
            if !status::already_not_ready(&previous, REASON_TARGET_NOT_FOUND, &message) {
                record_event(
                    ctx,
                    scaler,
                    EventType::Warning,
                    REASON_TARGET_NOT_FOUND,
                    "GetScale",
                    &message,
                )
                .await;
            }
            let next =
                status::not_ready(&previous, generation, REASON_TARGET_NOT_FOUND, message, now);
            write_status(ctx, &scalers, &namespace, &name, &previous, &next, now).await?;
            return Ok((Outcome::TargetNotFound, polling));
        }
        Err(source) => {
            return Err(Error::GetScale {
                target: target_name,
                source,
            });
        }
    };
    let current = scale.replicas;
    let selector = scale.selector.clone();

    // 3. The observation.
    let broker_target = BrokerTarget {
        namespace: namespace.clone(),
        broker: spec.broker.clone(),
        queue: spec.queue.clone(),
    };
    let recalled = ctx.recall(&key, scaler);
    let mut history = recalled.history;
    let previous_failures = recalled.failures;
    let mut metrics_error: Option<MetricsError> = None;
    let mut observation = None;
    // Reads in a row without an unacked count, when this one has none.
    let mut unacked_unknown: Option<u32> = None;
    let (input, failures) = if spec.paused {
        (
            DecisionInput::unavailable(current, previous_failures),
            previous_failures,
        )
    } else {
        match ctx.source.observe(&broker_target).await {
            Ok(read) => {
                let observed = read.observation(recalled.last_unacked);
                let unacked_from = match (read.unacked, recalled.last_unacked) {
                    (Some(_), _) => "management",
                    (None, Some(_)) => "last_known",
                    (None, None) => "assumed_zero",
                };
                ctx.metrics
                    .observations
                    .get_or_create(&ObservationLabels {
                        ready: read.ready_source.label().to_string(),
                        unacked: unacked_from.to_string(),
                    })
                    .inc();
                let streak = match read.unacked {
                    Some(_) => 0,
                    None => recalled.unacked_unknown.saturating_add(1),
                };
                ctx.remember_unacked(&key, read.unacked, streak);
                if read.unacked.is_none() {
                    unacked_unknown = Some(streak);
                    tracing::debug!(
                        scaler = %format!("{namespace}/{name}"),
                        unacked = observed.unacked,
                        unacked_from,
                        reads_in_a_row = streak,
                        "unacked count unknown (management API unavailable)"
                    );
                }
                observation = Some(observed.clone());
                (DecisionInput::observed(current, observed), 0)
            }
            Err(err) => {
                let failures = previous_failures.saturating_add(1);
                tracing::warn!(
                    scaler = %format!("{namespace}/{name}"),
                    error = %err,
                    failures_in_a_row = failures,
                    "cannot read the queue"
                );
                metrics_error = Some(err);
                (DecisionInput::unavailable(current, failures), failures)
            }
        }
    };

    // 4. The decision.
    let mut decision = decide(spec, &input, &history, now);
    if let Some(unknown_reads) = unacked_unknown {
        let decided = decision.replicas;
        decision = hold_if_unacked_unknown(decision, current, spec.max_replicas, unknown_reads);
        if decision.replicas != decided {
            tracing::info!(
                scaler = %format!("{namespace}/{name}"),
                replicas = current,
                "not scaling to zero: the unacked count is unknown"
            );
        }
    }
    history.record(spec, &input, &decision, now);
    ctx.remember(&key, history.clone(), failures);
    ctx.metrics
        .record_decision(&namespace, &name, decision.reason.label());
    if let Some(err) = &metrics_error {
        ctx.metrics
            .record_scaler_error(&namespace, &name, err.metric_label());
    }
    if previous_failures == 0
        && let Some(err) = &metrics_error
    {
        let message = format!("cannot read queue {:?}: {err}", spec.queue.summary());
        record_event(
            ctx,
            scaler,
            EventType::Warning,
            "MetricsUnavailable",
            "Observe",
            &message,
        )
        .await;
    }

    // 5. Scale when the decision changes the replicas.
    let mut scaled_at = None;
    if decision.replicas != current && !spec.paused {
        let to = decision.replicas;
        if to < current && target_ref.kind == TargetKind::Deployment {
            mark_deletion_costs(ctx, &namespace, selector.as_deref(), &broker_target).await;
        }
        target
            .patch_scale(&target_ref.name, to)
            .await
            .map_err(|source| Error::PatchScale {
                target: target_name.clone(),
                replicas: to,
                source,
            })?;
        ctx.remember_write(&target_key, &scale, to);
        history.record_scale(now, current, to);
        ctx.remember(&key, history, failures);
        scaled_at = Some(now);
        let direction = if to > current { "up" } else { "down" };
        ctx.metrics
            .scale_patches
            .get_or_create(&DirectionLabels {
                direction: direction.to_string(),
            })
            .inc();
        let explanation = decision.reason.to_string();
        tracing::info!(
            scaler = %format!("{namespace}/{name}"),
            target = %target_name,
            from = current,
            to,
            reason = decision.reason.label(),
            "{explanation}"
        );
        let note = format!("from {current} to {to}: {explanation}");
        record_event(ctx, scaler, EventType::Normal, "Scaled", "Scale", &note).await;
        ctx.audit.publish(
            &broker_target,
            &ScaleRecord {
                namespace: namespace.clone(),
                scaler: name.clone(),
                target_kind: target_ref.kind.to_string(),
                target_name: target_ref.name.clone(),
                from: current,
                to,
                reason: decision.reason.label().to_string(),
                message: explanation,
                at: now,
            },
        );
    }

    // 6. The status.
    let next = status::after_tick(
        &previous,
        &TickOutcome {
            generation,
            now,
            current_replicas: current,
            decision: &decision,
            observation,
            metrics_error: metrics_error.as_ref(),
            consecutive_failures: failures,
            paused: spec.paused,
            scaled_at,
            queue: &spec.queue.summary(),
            unacked_unknown: unacked_unknown.is_some(),
        },
    );
    write_status(ctx, &scalers, &namespace, &name, &previous, &next, now).await?;

    let outcome = if spec.paused {
        Outcome::Paused
    } else if scaled_at.is_some() {
        Outcome::Scaled
    } else if metrics_error.is_some() {
        Outcome::MetricsUnavailable
    } else {
        Outcome::Unchanged
    };
    Ok((outcome, polling))
}

/// With the unacked count unknown, replaces a decision to scale a running
/// target (`current > 0`) to zero by holding its replicas (capped at
/// `max_replicas`), as for missing metrics: messages may still be in
/// flight. Any other decision stands (the last known unacked count already
/// went into it). `unknown_reads`: reads in a row without an unacked count.
pub fn hold_if_unacked_unknown(
    decision: Decision,
    current: i32,
    max_replicas: i32,
    unknown_reads: u32,
) -> Decision {
    if decision.replicas != 0 || current <= 0 {
        return decision;
    }
    let held = current.min(max_replicas.max(1));
    Decision {
        replicas: held,
        recommendation: held,
        reason: Reason::MetricsUnavailable {
            consecutive_failures: unknown_reads,
        },
    }
}

/// Merge-patches `/status` when [`status::needs_patch`] says so.
async fn write_status(
    ctx: &Context,
    scalers: &Api<QueueScaler>,
    namespace: &str,
    name: &str,
    previous: &QueueScalerStatus,
    next: &QueueScalerStatus,
    now: DateTime<Utc>,
) -> Result<(), Error> {
    ctx.metrics.record_status(namespace, name, next);
    if !status::needs_patch(previous, next, now, ctx.settings.status_heartbeat) {
        return Ok(());
    }
    let key = (namespace.to_string(), name.to_string());
    scalers
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": next })),
        )
        .await
        .map_err(|source| Error::PatchStatus {
            namespace: namespace.to_string(),
            name: name.to_string(),
            source,
        })?;
    ctx.with_memory(&key, |m| m.written_status = Some(next.clone()));
    Ok(())
}

/// Records a Kubernetes Event about the scaler; a failure is logged, never
/// fatal (the change it reports already happened).
///
/// A fresh [`Recorder`] per Event: kube's Recorder folds Events with the
/// same reason and object into one series for 6 minutes and keeps the
/// *first* note, so a second `Scaled` Event would still read "from 1 to 3".
/// Each scale is its own Event; repeated warnings are already limited to
/// condition transitions by the reconciler.
async fn record_event(
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
    let unacked = match ctx.source.connection_unacked(target).await {
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
    let scalers: Api<QueueScaler> = namespaced_or_all(client.clone(), namespace.as_deref());
    let deployments: Api<Deployment> = namespaced_or_all(client.clone(), namespace.as_deref());
    let statefulsets: Api<StatefulSet> = namespaced_or_all(client, namespace.as_deref());

    let (reader, writer) = reflector::store();
    // Status writes do not change the generation: only spec changes (and
    // the requeue timer) trigger a reconcile, so writing the status does not
    // loop back into another one.
    let scaler_events = watcher(scalers, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation, PredicateConfig::default());
    // A target's generation changes with its spec.replicas (someone scaled
    // it, or a rollout): re-decide at once.
    // The same watches fill the caches the reconciler reads targets from.
    let (deployment_cache, deployment_writer) = reflector::store();
    let (statefulset_cache, statefulset_writer) = reflector::store();
    ctx.read_targets_from(TargetStores {
        deployments: deployment_cache,
        statefulsets: statefulset_cache,
    });
    let deployment_events = watcher(deployments, watcher::Config::default())
        .default_backoff()
        .reflect(deployment_writer)
        .applied_objects()
        .predicate_filter(predicates::generation, PredicateConfig::default());
    let statefulset_events = watcher(statefulsets, watcher::Config::default())
        .default_backoff()
        .reflect(statefulset_writer)
        .applied_objects()
        .predicate_filter(predicates::generation, PredicateConfig::default());

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

    let janitor = {
        let ctx = ctx.clone();
        let reader = reader.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                if reader.wait_until_ready().await.is_ok() {
                    ctx.forget_missing(&reader);
                }
            }
        }
    };
    tokio::select! {
        () = controller => {}
        () = janitor => {}
    }
    tracing::info!("scaling loop stopped");
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

/// The history a scaler starts with when this replica first sees it (a
/// controller restart or a new leader): the replica count the status last
/// reported counts as a recommendation made now. A new leader therefore
/// waits a full scale-down stabilization window before scaling in, exactly
/// as the previous leader would have, instead of acting on a history it
/// never saw.
fn inherited_history(
    status: Option<&warren_crd::QueueScalerStatus>,
    now: DateTime<Utc>,
) -> History {
    let mut history = History::new();
    if let Some(current) = status.and_then(|s| s.current_replicas) {
        history.push_recommendation(now, current);
    }
    history
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_leader_waits_out_the_scale_down_window() {
        use warren_crd::{Observation, QueueScalerSpec, QueueScalerStatus};
        let spec: QueueScalerSpec = serde_json::from_value(serde_json::json!({
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "w"},
            "queue": {"name": "tasks"},
            "broker": {"credentialsSecretRef": {"name": "s"}},
            "minReplicas": 0,
            "maxReplicas": 10,
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 60}}
        }))
        .unwrap();
        let status = QueueScalerStatus {
            current_replicas: Some(4),
            ..QueueScalerStatus::default()
        };
        let now = Utc::now();
        let history = inherited_history(Some(&status), now);
        // 5 messages want 1 replica; inside the window the new leader holds 4.
        let observation = Observation::new(5, 0, 4, None, None, now);
        let input = DecisionInput::observed(4, observation.clone());
        assert_eq!(decide(&spec, &input, &history, now).replicas, 4);
        // After the window it scales in, and without inherited history it
        // would have done so at once.
        let later = now + chrono::TimeDelta::seconds(61);
        assert_eq!(decide(&spec, &input, &history, later).replicas, 1);
        assert_eq!(decide(&spec, &input, &History::new(), now).replicas, 1);
        assert!(inherited_history(None, now).recommendations().is_empty());
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let min = Duration::from_secs(1);
        let max = Duration::from_secs(300);
        let delays: Vec<u64> = (1..=11)
            .map(|n| backoff_delay(n, min, max).as_secs())
            .collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(backoff_delay(u32::MAX, min, max), max);
    }

    fn decision(replicas: i32, reason: Reason) -> Decision {
        Decision {
            replicas,
            recommendation: replicas,
            reason,
        }
    }

    #[test]
    fn unknown_unacked_never_takes_a_running_target_to_zero() {
        let to_zero = || decision(0, Reason::QueueEmpty);
        let held = hold_if_unacked_unknown(to_zero(), 3, 10, 2);
        assert_eq!((held.replicas, held.recommendation), (3, 3));
        assert_eq!(
            held.reason,
            Reason::MetricsUnavailable {
                consecutive_failures: 2
            }
        );
        // Held within maxReplicas.
        assert_eq!(hold_if_unacked_unknown(to_zero(), 12, 10, 1).replicas, 10);
        // Staying at zero, scaling down to one, scaling up: unchanged.
        assert_eq!(hold_if_unacked_unknown(to_zero(), 0, 10, 1), to_zero());
        let down = decision(
            1,
            Reason::CooldownPending {
                remaining_seconds: 30,
            },
        );
        assert_eq!(hold_if_unacked_unknown(down.clone(), 4, 10, 1), down);
        let up = decision(
            5,
            Reason::Backlog {
                messages: 25,
                per_replica: 5,
            },
        );
        assert_eq!(hold_if_unacked_unknown(up.clone(), 1, 10, 1), up);
    }
}
