//! What the reconciler keeps between reconciles: the [`Context`] (clients,
//! settings, observers) and, per scaler, its [`Memory`] — loaded once at the
//! start of a reconcile and committed once at its end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use warren_crd::{QueueScaler, QueueScalerStatus};
use warren_scaling::History;

use super::in_flight::InFlightGuard;
use super::target::{TargetKey, TargetStores};
use super::unacked::UnackedMemory;
use crate::audit::ScaleAudit;
use crate::metrics::ControllerMetrics;
use crate::observe::QueueObserver;

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
    /// How old the management API's unacked count can be (see
    /// [`super::in_flight::horizon`]): messages that left `ready` within it
    /// count as in flight. Zero turns the guard off.
    pub in_flight_horizon: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            invalid_spec_requeue: Duration::from_secs(300),
            status_heartbeat: Duration::from_secs(60),
            error_backoff_min: Duration::from_secs(1),
            error_backoff_max: Duration::from_secs(300),
            concurrency: 64,
            in_flight_horizon: super::in_flight::horizon(
                Duration::from_secs(5),
                Duration::from_secs(1),
            ),
        }
    }
}

/// `(namespace, name)` of a scaler.
pub(crate) type ScalerKey = (String, String);

/// What the controller remembers about one scaler between reconciles
/// (reset when the object is recreated: a new uid).
#[derive(Debug, Default, Clone)]
pub(crate) struct Memory {
    uid: Option<String>,
    pub history: History,
    /// Failed queue reads in a row.
    pub failures: u32,
    /// The last known unacked count and the reads in a row without one.
    pub unacked: UnackedMemory,
    /// Recent drops of the ready count the unacked sample may not show yet.
    pub in_flight: InFlightGuard,
    /// The status this controller last wrote for this object (uid): the next
    /// status is built on it, not on the watch cache's copy, which can lag
    /// the write (a busy apiserver, many scalers) — building on a stale copy
    /// rewrote an unchanged status every tick.
    pub written_status: Option<QueueScalerStatus>,
}

impl Memory {
    /// What a replica that has never seen `scaler` starts from (a controller
    /// restart or a new leader): history, failures and the last unacked
    /// count inherited from the status.
    fn inherited(scaler: &QueueScaler, now: DateTime<Utc>) -> Self {
        let status = scaler.status.as_ref();
        Self {
            uid: scaler.uid(),
            history: inherited_history(status, now),
            failures: status.map(|s| s.consecutive_failures).unwrap_or(0),
            unacked: UnackedMemory::seeded(
                status.and_then(|s| s.observation.as_ref().map(|o| o.unacked)),
            ),
            in_flight: InFlightGuard::default(),
            written_status: None,
        }
    }

    /// The status the next one is built on: the one this controller last
    /// wrote for this object when it has one, else the object's.
    pub fn status_base(&self, scaler: &QueueScaler) -> QueueScalerStatus {
        match &self.written_status {
            Some(written) => written.clone(),
            None => scaler.status.clone().unwrap_or_default(),
        }
    }
}

/// Everything a reconcile needs. One per leadership term.
pub struct Context {
    pub client: Client,
    /// Who records the Events (see [`super::apply::record_event`]).
    pub reporter: Reporter,
    pub metrics: ControllerMetrics,
    pub observer: Arc<dyn QueueObserver>,
    pub audit: Arc<dyn ScaleAudit>,
    pub settings: Settings,
    memory: Mutex<HashMap<ScalerKey, Memory>>,
    /// Failed reconciles in a row per scaler (the error_policy backoff).
    error_streaks: Mutex<HashMap<ScalerKey, u32>>,
    pub(super) targets: Mutex<Option<TargetStores>>,
    /// Replicas this controller wrote to a target's `/scale`, with the
    /// target's version in the cache before the write: while the cache still
    /// shows that version, the write is newer than the cache.
    pub(super) written: Mutex<HashMap<TargetKey, (Option<String>, i32)>>,
}

/// A poisoned lock only means a panic elsewhere; the data is still valid.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Context {
    /// `instance` names this replica in Events (its pod name).
    pub fn new(
        client: Client,
        instance: Option<String>,
        metrics: ControllerMetrics,
        observer: Arc<dyn QueueObserver>,
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
            observer,
            audit,
            settings,
            memory: Mutex::default(),
            error_streaks: Mutex::default(),
            targets: Mutex::default(),
            written: Mutex::default(),
        }
    }

    /// Reads targets from these watch caches from now on instead of one
    /// `GET /scale` per reconcile ([`super::run`] calls it with its watches' caches).
    pub fn read_targets_from(&self, stores: TargetStores) {
        *lock(&self.targets) = Some(stores);
    }

    /// The scaler's memory, reset to what the status says when the object
    /// was recreated (new uid) or never seen.
    pub(super) fn load(&self, key: &ScalerKey, scaler: &QueueScaler) -> Memory {
        let mut map = lock(&self.memory);
        let memory = map.entry(key.clone()).or_default();
        if memory.uid != scaler.uid() {
            *memory = Memory::inherited(scaler, Utc::now());
        }
        memory.clone()
    }

    /// Stores what a reconcile [`Self::load`]ed and updated.
    pub(super) fn commit(&self, key: &ScalerKey, memory: Memory) {
        lock(&self.memory).insert(key.clone(), memory);
    }

    /// One more failed reconcile in a row; returns the streak.
    pub(super) fn count_error(&self, key: &ScalerKey) -> u32 {
        let mut streaks = lock(&self.error_streaks);
        let streak = streaks.entry(key.clone()).or_default();
        *streak = streak.saturating_add(1);
        *streak
    }

    /// A reconcile succeeded: the backoff starts over.
    pub(super) fn clear_errors(&self, key: &ScalerKey) {
        lock(&self.error_streaks).remove(key);
    }

    /// Forgets scalers that are no longer in `store`.
    pub(super) fn forget_missing(&self, store: &Store<QueueScaler>) {
        let exists = |(namespace, name): &ScalerKey| {
            store.get(&ObjectRef::new(name).within(namespace)).is_some()
        };
        lock(&self.error_streaks).retain(|key, _| exists(key));
        lock(&self.memory).retain(|key, _| {
            let kept = exists(key);
            if !kept {
                self.metrics.forget_scaler(&key.0, &key.1);
            }
            kept
        });
    }

    /// Scalers with in-memory state (for tests).
    #[cfg(any(test, feature = "test-util"))]
    pub fn remembered(&self) -> usize {
        lock(&self.memory).len()
    }
}

/// The history a scaler starts with when this replica first sees it: the
/// replica count the status last reported counts as a recommendation made
/// now. A new leader therefore waits a full scale-down stabilization window
/// before scaling in, exactly as the previous leader would have, instead of
/// acting on a history it never saw.
fn inherited_history(status: Option<&QueueScalerStatus>, now: DateTime<Utc>) -> History {
    let mut history = History::new();
    if let Some(current) = status.and_then(|s| s.current_replicas) {
        history.push_recommendation(now, current);
    }
    history
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_crd::{Observation, QueueScalerSpec};
    use warren_scaling::{DecisionInput, decide};

    #[test]
    fn a_new_leader_waits_out_the_scale_down_window() {
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
}
