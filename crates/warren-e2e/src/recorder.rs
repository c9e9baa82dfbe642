//! The replica history of a workload, timestamped as it is seen: on the
//! cluster, as a watch event of the Deployment arrives from the apiserver
//! (see `Cluster::recorder`).

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::task::JoinHandle;

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
    use tokio::sync::mpsc;

    /// A recorder fed by hand: what a source reports, in order.
    fn fed() -> (mpsc::UnboundedSender<i64>, ReplicaRecorder) {
        let (feed, mut values) = mpsc::unbounded_channel::<i64>();
        let recorder = ReplicaRecorder::from_source(move |mut recording| async move {
            while let Some(to) = values.recv().await {
                recording.record(to);
            }
        });
        (feed, recorder)
    }

    #[tokio::test]
    async fn records_replica_changes_in_order() {
        let (feed, recorder) = fed();
        let t0 = Instant::now();
        feed.send(0).unwrap();
        assert!(
            recorder
                .wait_value(Duration::from_secs(5), |v| v == 0)
                .await
                .is_some()
        );
        // A repeated value (a watch event that changed something else) is
        // no change.
        for n in [2, 2, 5, 1] {
            feed.send(n).unwrap();
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
        assert_eq!(recorder.history()[0].from, None);
        assert_eq!(recorder.range_during(t0, Instant::now()), Some((5, 0)));
        assert!(recorder.describe(t0).contains("2→5"));
        let before_five = up.at - Duration::from_millis(1);
        assert_eq!(recorder.value_at(before_five), Some(2));
        assert_eq!(recorder.since(up.at).len(), 2);
        assert!(
            recorder
                .wait_change(Instant::now(), Duration::from_millis(100), |c| c.to == 9)
                .await
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_dropped_recorder_stops_its_source() {
        let (feed, recorder) = fed();
        feed.send(3).unwrap();
        recorder
            .wait_value(Duration::from_secs(5), |v| v == 3)
            .await
            .unwrap();
        drop(recorder);
        // The source task is aborted: its receiver goes, and sending fails.
        let deadline = Instant::now() + Duration::from_secs(5);
        while feed.send(4).is_ok() {
            assert!(
                Instant::now() < deadline,
                "the source outlived its recorder"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
