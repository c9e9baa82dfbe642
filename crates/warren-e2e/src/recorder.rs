//! The replica history of a workload, timestamped as it is seen: in the fake
//! API server as the store changes (the fake notifies in-process, so a change
//! is seen within the scheduling latency of this task, well under a
//! millisecond on an idle machine), on a cluster as a watch event arrives
//! (see `Cluster::recorder`).

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use warren_fakekube::FakeApiServer;
use warren_fakekube::resources::ResourceType;

/// `spec.replicas` of the workload changed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplicaChange {
    pub at: Instant,
    pub wall: DateTime<Utc>,
    /// The previous value (`None` for the first record).
    pub from: Option<i64>,
    pub to: i64,
}

/// Where a source reports the value it sees; a value equal to the last one
/// is no change.
pub struct Recording {
    sink: Arc<Mutex<Vec<ReplicaChange>>>,
    notify: watch::Sender<usize>,
    last: Option<i64>,
}

impl Recording {
    /// The workload has `to` replicas now.
    pub fn record(&mut self, to: i64) {
        if self.last == Some(to) {
            return;
        }
        let change = ReplicaChange {
            at: Instant::now(),
            wall: Utc::now(),
            from: self.last,
            to,
        };
        self.last = Some(to);
        let len = {
            let mut guard = self.sink.lock().unwrap_or_else(PoisonError::into_inner);
            guard.push(change);
            guard.len()
        };
        self.notify.send_replace(len);
    }
}

/// Records every change of `spec.replicas` of one workload.
pub struct ReplicaRecorder {
    changes: Arc<Mutex<Vec<ReplicaChange>>>,
    seen: watch::Receiver<usize>,
    task: JoinHandle<()>,
}

impl Drop for ReplicaRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ReplicaRecorder {
    /// Starts recording `namespace/name` of type `rt` in the fake API server.
    pub fn start(
        api: &FakeApiServer,
        rt: &'static ResourceType,
        namespace: &str,
        name: &str,
    ) -> Self {
        let api = api.clone();
        let namespace = namespace.to_string();
        let name = name.to_string();
        let mut store_changes = api.changes();
        Self::from_source(move |mut recording| async move {
            loop {
                let replicas = api
                    .get_object(rt, &namespace, &name)
                    .and_then(|o| o.pointer("/spec/replicas").and_then(Value::as_i64));
                if let Some(to) = replicas {
                    recording.record(to);
                }
                if store_changes.changed().await.is_err() {
                    return;
                }
            }
        })
    }

    /// Records what `source` reports through its [`Recording`] (a task
    /// aborted when the recorder is dropped).
    pub fn from_source<F, Fut>(source: F) -> Self
    where
        F: FnOnce(Recording) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let changes: Arc<Mutex<Vec<ReplicaChange>>> = Arc::default();
        let (notify, seen) = watch::channel(0usize);
        let task = tokio::spawn(source(Recording {
            sink: changes.clone(),
            notify,
            last: None,
        }));
        Self {
            changes,
            seen,
            task,
        }
    }

    /// Every change so far, oldest first.
    pub fn history(&self) -> Vec<ReplicaChange> {
        self.changes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The latest recorded value.
    pub fn current(&self) -> Option<i64> {
        self.history().last().map(|c| c.to)
    }

    /// Changes at or after `since`.
    pub fn since(&self, since: Instant) -> Vec<ReplicaChange> {
        self.history()
            .into_iter()
            .filter(|c| c.at >= since)
            .collect()
    }

    /// The value in force at `at` (the last change before it).
    pub fn value_at(&self, at: Instant) -> Option<i64> {
        self.history()
            .iter()
            .rev()
            .find(|c| c.at <= at)
            .map(|c| c.to)
    }

    /// Highest and lowest value in force during `[from, to]`.
    pub fn range_during(&self, from: Instant, to: Instant) -> Option<(i64, i64)> {
        let mut values: Vec<i64> = self.value_at(from).into_iter().collect();
        values.extend(
            self.history()
                .iter()
                .filter(|c| c.at > from && c.at <= to)
                .map(|c| c.to),
        );
        Some((*values.iter().max()?, *values.iter().min()?))
    }

    /// Waits until a change at or after `since` satisfies `pred` (or the
    /// current value does, when it was set at or after `since`); returns that
    /// change.
    pub async fn wait_change(
        &self,
        since: Instant,
        timeout: Duration,
        mut pred: impl FnMut(&ReplicaChange) -> bool,
    ) -> Option<ReplicaChange> {
        let mut seen = self.seen.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            seen.borrow_and_update();
            if let Some(found) = self.since(since).into_iter().find(|c| pred(c)) {
                return Some(found);
            }
            if tokio::time::timeout_at(deadline, seen.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    /// Waits until the current value satisfies `pred`; returns the change
    /// that made it so.
    pub async fn wait_value(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(i64) -> bool,
    ) -> Option<ReplicaChange> {
        let mut seen = self.seen.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            seen.borrow_and_update();
            if let Some(last) = self.history().last()
                && pred(last.to)
            {
                return Some(*last);
            }
            if tokio::time::timeout_at(deadline, seen.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    /// The history as `0→3 (+1.20s) 3→1 (+6.02s)`, relative to `origin`.
    pub fn describe(&self, origin: Instant) -> String {
        self.history()
            .iter()
            .map(|c| {
                let offset = c.at.saturating_duration_since(origin).as_secs_f64();
                let sign = if c.at < origin { "-" } else { "+" };
                match c.from {
                    Some(from) => format!("{from}→{} ({sign}{offset:.2}s)", c.to),
                    None => format!("{} ({sign}{offset:.2}s)", c.to),
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use warren_fakekube::resources::DEPLOYMENTS;

    #[tokio::test]
    async fn records_replica_changes_in_order() {
        let api = FakeApiServer::start().await.unwrap();
        api.put_object(
            &DEPLOYMENTS,
            json!({"metadata": {"name": "d", "namespace": "default"}, "spec": {"replicas": 0}}),
        )
        .unwrap();
        let recorder = ReplicaRecorder::start(&api, &DEPLOYMENTS, "default", "d");
        let t0 = Instant::now();
        assert!(
            recorder
                .wait_value(Duration::from_secs(5), |v| v == 0)
                .await
                .is_some()
        );
        for n in [2, 2, 5, 1] {
            api.patch_object(
                &DEPLOYMENTS,
                "default",
                "d",
                &json!({"spec": {"replicas": n}}),
            )
            .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let up = recorder
            .wait_change(t0, Duration::from_secs(5), |c| c.to == 5)
            .await
            .unwrap();
        assert_eq!(up.from, Some(2));
        recorder
            .wait_value(Duration::from_secs(5), |v| v == 1)
            .await
            .unwrap();
        let values: Vec<i64> = recorder.history().iter().map(|c| c.to).collect();
        assert_eq!(values, vec![0, 2, 5, 1]);
        assert_eq!(recorder.range_during(t0, Instant::now()), Some((5, 0)));
        assert!(recorder.describe(t0).contains("2→5"));
        assert!(
            recorder
                .wait_change(Instant::now(), Duration::from_millis(100), |c| c.to == 9)
                .await
                .is_none()
        );
    }
}
