//! The worker logs as the record of which job ran where.
//!
//! Every worker pod writes JSON log lines (`WARREN_LOG_FORMAT=json`) to
//! `<pods dir>/<pod>.log`; the lines `"job started"` and `"job done"` carry
//! the job `id` and whether the delivery was a `redelivered` one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde_json::Value;

/// Whether a job began or finished (or the worker got SIGTERM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    Started,
    Done,
    /// `SIGTERM received` (no job id).
    Sigterm,
}

/// One `job started` / `job done` line.
#[derive(Debug, Clone, PartialEq)]
pub struct JobEvent {
    pub pod: String,
    pub kind: JobKind,
    pub id: String,
    pub redelivered: bool,
    /// The log line's timestamp.
    pub at: Option<DateTime<Utc>>,
}

/// Every job event of every worker pod, in log order per pod.
#[derive(Debug, Clone, Default)]
pub struct JobLog {
    pub events: Vec<JobEvent>,
}

impl JobLog {
    /// Reads `<dir>/*.log` (a missing directory is an empty log), each file
    /// named after its pod.
    pub fn read(dir: &Path) -> Self {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Self::default();
        };
        let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        Self::from_files(
            files
                .into_iter()
                .filter(|path| path.extension().and_then(|e| e.to_str()) == Some("log"))
                .map(|path| {
                    let pod = path
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    (pod, path)
                }),
        )
    }

    /// Reads each (pod, log file) in order; an unreadable file is empty.
    pub fn from_files(files: impl IntoIterator<Item = (String, PathBuf)>) -> Self {
        let mut events = Vec::new();
        for (pod, path) in files {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            events.extend(parse(&pod, &text));
        }
        Self { events }
    }

    /// Ids with a `job done` line, with how many.
    pub fn done_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for e in self.events.iter().filter(|e| e.kind == JobKind::Done) {
            *counts.entry(e.id.clone()).or_insert(0) += 1;
        }
        counts
    }

    /// Whether every id in `ids` has finished at least once.
    pub fn all_done<'a>(&self, ids: impl IntoIterator<Item = &'a String>) -> bool {
        let done = self.done_counts();
        ids.into_iter().all(|id| done.contains_key(id))
    }

    /// Events of one job, in log order per pod.
    pub fn of(&self, id: &str) -> Vec<&JobEvent> {
        self.events.iter().filter(|e| e.id == id).collect()
    }

    /// Pods that have started at least one job.
    pub fn busy_pods(&self) -> BTreeSet<String> {
        self.events
            .iter()
            .filter(|e| e.kind == JobKind::Started)
            .map(|e| e.pod.clone())
            .collect()
    }

    /// Jobs a pod has started but not (yet) finished: (pod, id).
    pub fn in_hand(&self) -> Vec<(String, String)> {
        let mut open: Vec<(String, String)> = Vec::new();
        for e in &self.events {
            let key = (e.pod.clone(), e.id.clone());
            match e.kind {
                JobKind::Started => open.push(key),
                JobKind::Done => {
                    if let Some(i) = open.iter().position(|k| *k == key) {
                        open.remove(i);
                    }
                }
                JobKind::Sigterm => {}
            }
        }
        open
    }

    /// Pods that got SIGTERM while a job was in hand: (pod, job). Whatever
    /// the grace period, a busy pod was chosen as a scale-in victim.
    pub fn busy_at_sigterm(&self) -> Vec<(String, String)> {
        let mut busy = Vec::new();
        let mut open: Vec<(String, String)> = Vec::new();
        for e in &self.events {
            let key = (e.pod.clone(), e.id.clone());
            match e.kind {
                JobKind::Started => open.push(key),
                JobKind::Done => open.retain(|k| *k != key),
                JobKind::Sigterm => {
                    busy.extend(open.iter().filter(|(pod, _)| *pod == e.pod).cloned())
                }
            }
        }
        busy
    }

    /// The latest `job done` timestamp among `ids`.
    pub fn last_done_at<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a String>,
    ) -> Option<DateTime<Utc>> {
        let ids: BTreeSet<&String> = ids.into_iter().collect();
        self.events
            .iter()
            .filter(|e| e.kind == JobKind::Done && ids.contains(&e.id))
            .filter_map(|e| e.at)
            .max()
    }

    /// Accounting of `sent` jobs against this log. `exited_pods` are pods
    /// whose process has ended: a job they started and never finished was
    /// interrupted.
    pub fn report(&self, sent: &[String], exited_pods: &BTreeSet<String>) -> JobReport {
        let done = self.done_counts();
        let lost = sent
            .iter()
            .filter(|id| !done.contains_key(*id))
            .cloned()
            .collect();
        let duplicated = sent
            .iter()
            .filter(|id| done.get(*id).copied().unwrap_or(0) > 1)
            .cloned()
            .collect();
        let mut redelivered: Vec<String> = self
            .events
            .iter()
            .filter(|e| e.kind == JobKind::Started && e.redelivered)
            .map(|e| e.id.clone())
            .collect();
        redelivered.sort();
        redelivered.dedup();
        let interrupted = self
            .in_hand()
            .into_iter()
            .filter(|(pod, _)| exited_pods.contains(pod))
            .collect();
        JobReport {
            sent: sent.len(),
            done: sent.iter().filter(|id| done.contains_key(*id)).count(),
            lost,
            duplicated,
            redelivered,
            interrupted,
        }
    }
}

/// What happened to a set of sent jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobReport {
    pub sent: usize,
    /// Sent jobs finished at least once.
    pub done: usize,
    /// Sent jobs never finished.
    pub lost: Vec<String>,
    /// Sent jobs finished more than once (at-least-once delivery after a
    /// crash allows it; a clean scale-in must not cause it).
    pub duplicated: Vec<String>,
    /// Jobs that were delivered again after a first delivery.
    pub redelivered: Vec<String>,
    /// (pod, job) pairs: the pod ended with the job in hand.
    pub interrupted: Vec<(String, String)>,
}

fn parse(pod: &str, text: &str) -> Vec<JobEvent> {
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter_map(|line| {
            let kind = match line.get("message").and_then(Value::as_str) {
                Some("job started") => JobKind::Started,
                Some("job done") => JobKind::Done,
                Some("SIGTERM received") => JobKind::Sigterm,
                _ => return None,
            };
            let id = match kind {
                JobKind::Sigterm => String::new(),
                _ => line.get("id")?.as_str()?.to_string(),
            };
            Some(JobEvent {
                pod: pod.to_string(),
                kind,
                id,
                redelivered: line.get("redelivered").and_then(Value::as_bool) == Some(true),
                at: line
                    .get("timestamp")
                    .and_then(Value::as_str)
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| t.with_timezone(&Utc)),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, pod: &str, lines: &[&str]) {
        std::fs::write(dir.join(format!("{pod}.log")), lines.join("\n")).unwrap();
    }

    #[test]
    fn accounts_for_lost_redelivered_and_interrupted_jobs() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "w-0",
            &[
                r#"{"timestamp":"2025-01-01T00:00:00.000001Z","level":"INFO","message":"job started","id":"a","redelivered":false}"#,
                r#"{"timestamp":"2025-01-01T00:00:01Z","level":"INFO","message":"job done","id":"a","redelivered":false,"duration_ms":1000}"#,
                r#"{"timestamp":"2025-01-01T00:00:01Z","level":"INFO","message":"job started","id":"b","redelivered":false}"#,
                r#"{"timestamp":"2025-01-01T00:00:02Z","level":"INFO","message":"SIGTERM received","target":"warren_telemetry"}"#,
                "not json",
            ],
        );
        write(
            dir.path(),
            "w-1",
            &[
                r#"{"timestamp":"2025-01-01T00:00:03Z","message":"job started","id":"b","redelivered":true}"#,
                r#"{"timestamp":"2025-01-01T00:00:04Z","message":"job done","id":"b","redelivered":true}"#,
                r#"{"timestamp":"2025-01-01T00:00:05Z","message":"job started","id":"c","redelivered":false}"#,
                r#"{"timestamp":"2025-01-01T00:00:04Z","message":"job done","id":"b","redelivered":true}"#,
            ],
        );
        write(
            dir.path(),
            "w-2",
            &[
                r#"{"timestamp":"2025-01-01T00:00:01Z","message":"job started","id":"d0","redelivered":false}"#,
                r#"{"timestamp":"2025-01-01T00:00:02Z","message":"job done","id":"d0","redelivered":false}"#,
                r#"{"timestamp":"2025-01-01T00:00:03Z","message":"SIGTERM received"}"#,
            ],
        );
        let log = JobLog::read(dir.path());
        assert_eq!(log.events.len(), 11);
        assert_eq!(
            log.busy_at_sigterm(),
            vec![("w-0".to_string(), "b".to_string())],
            "w-2 was idle when it got SIGTERM"
        );
        let sent: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let exited = BTreeSet::from(["w-0".to_string()]);
        let report = log.report(&sent, &exited);
        assert_eq!(report.done, 2);
        assert_eq!(report.lost, vec!["c".to_string(), "d".to_string()]);
        assert_eq!(report.redelivered, vec!["b".to_string()]);
        assert_eq!(
            report.interrupted,
            vec![("w-0".to_string(), "b".to_string())]
        );
        assert_eq!(report.duplicated, vec!["b".to_string()]);
        assert_eq!(
            log.in_hand(),
            vec![
                ("w-0".to_string(), "b".to_string()),
                ("w-1".to_string(), "c".to_string())
            ]
        );
        assert_eq!(
            log.last_done_at(&["a".to_string(), "b".to_string()])
                .unwrap()
                .to_rfc3339(),
            "2025-01-01T00:00:04+00:00"
        );
    }
}
