//! Test harness: real `warren-worker` processes, an in-process sender, and
//! the worker logs as the record of which job ran where.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::Parser;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use warren_sender::RunningSender;

pub const WORKER_BIN: &str = env!("CARGO_BIN_EXE_warren-worker");

/// One worker process, its log file and its ops port.
pub struct Worker {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
    pub ops: String,
    _dir: tempfile::TempDir,
}

/// Starts a worker and waits until it consumes (`/readyz` answers 200).
pub async fn spawn_worker(
    amqp_url: &str,
    queue: &str,
    name: &str,
    seconds_per_dot: f64,
    extra_env: &[(&str, &str)],
) -> Worker {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("worker.log");
    let port = warren_testkit::free_port().unwrap();
    let mut command = Command::new(WORKER_BIN);
    command
        .env_clear()
        .env("AMQP_URL", amqp_url)
        .env("WARREN_QUEUE", queue)
        .env("POD_NAME", name)
        .env("WARREN_SECONDS_PER_DOT", seconds_per_dot.to_string())
        .env("WARREN_LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("WARREN_LOG_FORMAT", "json")
        // `job started` is a debug line (one line per job at info).
        .env("WARREN_LOG", "info,warren_worker::job=debug")
        .env("WARREN_RECONNECT_MIN_MS", "100")
        .env("WARREN_RECONNECT_MAX_MS", "1000")
        .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    for (key, value) in extra_env {
        command.env(key, value);
    }
    let child = command.spawn().unwrap();
    let worker = Worker {
        name: name.to_string(),
        child,
        log,
        ops: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    };
    worker.wait_ready(Duration::from_secs(30)).await;
    worker
}

fn http() -> reqwest::Client {
    warren_telemetry::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

impl Worker {
    pub async fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(response) = http().get(format!("{}/readyz", self.ops)).send().await
                && response.status() == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "worker {} never became ready; log:\n{}",
                self.name,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A metric's value from `/metrics` (None when the worker does not answer).
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = http()
            .get(format!("{}/metrics", self.ops))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find(|line| line.split_whitespace().next() == Some(name))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }

    pub async fn is_busy(&self) -> bool {
        self.metric("warren_worker_busy").await == Some(1.0)
    }

    /// Waits until the worker reports `n` jobs in hand.
    pub async fn wait_in_hand(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.metric("warren_worker_jobs_in_hand").await != Some(n as f64) {
            assert!(
                Instant::now() < deadline,
                "worker {} never had {n} jobs in hand; log:\n{}",
                self.name,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Log messages in order (`job started`, `job done`, ...) with the job id.
    pub fn job_lines(&self) -> Vec<(String, String)> {
        self.log_text()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|line| line["message"] == "job started" || line["message"] == "job done")
            .map(|line| {
                (
                    line["message"].as_str().unwrap_or_default().to_string(),
                    line["id"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    pub fn signal(&self, signal: Signal) {
        let pid = self.child.id().expect("worker still running");
        kill(Pid::from_raw(pid as i32), signal).unwrap();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `job done` log lines: (id, redelivered).
    pub fn done(&self) -> Vec<(String, bool)> {
        job_lines(&self.log_text(), "job done")
    }

    /// `done()`, sorted.
    pub fn done_sorted(&self) -> Vec<(String, bool)> {
        let mut done = self.done();
        done.sort();
        done
    }

    /// Sends SIGTERM and waits (at most 30 s) for the exit; returns the exit code.
    pub async fn terminate(&mut self) -> Option<i32> {
        self.signal(Signal::SIGTERM);
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the worker did not exit within 30 s of SIGTERM")
            .expect("waiting for the worker");
        status.code()
    }

    /// `job done` lines as (queue, id), sorted.
    pub fn done_by_queue(&self) -> Vec<(String, String)> {
        let mut done = self.job_fields("job done", "queue");
        done.sort();
        done
    }

    /// The queue of each `job started` line, in the order the jobs started.
    pub fn started_queues(&self) -> Vec<String> {
        self.job_fields("job started", "queue")
            .into_iter()
            .map(|(queue, _)| queue)
            .collect()
    }

    /// (queue, id) of the `job` span around each log line with this message,
    /// in log order (JSON lines name their innermost span under `span`).
    pub fn span_of(&self, message: &str) -> Vec<(String, String)> {
        self.log_text()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|line| line["message"] == message && line["span"]["name"] == "job")
            .map(|line| {
                let field =
                    |name: &str| line["span"][name].as_str().unwrap_or_default().to_string();
                (field("queue"), field("id"))
            })
            .collect()
    }

    /// (field, id) of each log line with this message, in log order.
    fn job_fields(&self, message: &str, field: &str) -> Vec<(String, String)> {
        self.log_text()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|line| line["message"] == message)
            .map(|line| {
                (
                    line[field].as_str().unwrap_or_default().to_string(),
                    line["id"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    pub fn done_ids(&self) -> Vec<String> {
        self.done().into_iter().map(|(id, _)| id).collect()
    }

    pub fn started_ids(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|line| line["message"] == "job started")
            .map(|line| line["id"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

/// Waits until `check` holds, polling; panics with `what` after `timeout`.
pub async fn eventually<F: FnMut() -> bool>(timeout: Duration, what: &str, mut check: F) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until one of `workers` reports a job in hand; returns its index.
pub async fn wait_busy(workers: &[&Worker], timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        for (index, worker) in workers.iter().enumerate() {
            if worker.is_busy().await {
                return index;
            }
        }
        assert!(Instant::now() < deadline, "no worker became busy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An in-process sender publishing to `queue`.
pub async fn start_sender(amqp_url: &str, queue: &str, queue_type: &str) -> RunningSender {
    start_sender_with_queues(amqp_url, queue, &[], queue_type).await
}

/// An in-process sender publishing to `queue` (POST /send) and to `more`
/// (POST /send/{queue}); it declares them all.
pub async fn start_sender_with_queues(
    amqp_url: &str,
    queue: &str,
    more: &[&str],
    queue_type: &str,
) -> RunningSender {
    let more = more.join(",");
    let args = warren_sender::Args::try_parse_from([
        "warren-sender",
        "--amqp-url",
        amqp_url,
        "--queue",
        queue,
        "--queues",
        &more,
        "--queue-type",
        queue_type,
        "--listen-addr",
        "127.0.0.1:0",
        "--dot-rule-disabled",
    ])
    .unwrap();
    let sender = warren_sender::start(&args, CancellationToken::new())
        .await
        .unwrap();
    assert!(
        sender
            .publisher
            .wait_connected(Duration::from_secs(30))
            .await,
        "sender never connected"
    );
    sender
}

/// POSTs a job; returns (status, id if accepted).
pub async fn send(sender: &RunningSender, message: &str) -> (u16, Option<String>) {
    send_path(sender, "/send", message).await
}

/// POSTs a job to `path`; returns (status, id if accepted).
async fn send_path(sender: &RunningSender, path: &str, message: &str) -> (u16, Option<String>) {
    let response = http()
        .post(format!("http://{}{path}", sender.addr))
        .json(&json!({ "message": message }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    (status, body["id"].as_str().map(str::to_string))
}

/// POSTs a job to `/send/{queue}`, insists on 202; returns the job id.
pub async fn send_ok_to(sender: &RunningSender, queue: &str, message: &str) -> String {
    let (status, id) = send_path(sender, &format!("/send/{queue}"), message).await;
    assert_eq!(status, 202, "job {message:?} to {queue} was not accepted");
    id.unwrap()
}

/// Sends and insists on 202; returns the job id.
pub async fn send_ok(sender: &RunningSender, message: &str) -> String {
    let (status, id) = send(sender, message).await;
    assert_eq!(status, 202, "job {message:?} was not accepted");
    id.unwrap()
}

/// `ids` as sorted `done()` entries, all with the same `redelivered` flag.
pub fn as_done(ids: &[String], redelivered: bool) -> Vec<(String, bool)> {
    let mut done: Vec<(String, bool)> = ids.iter().map(|id| (id.clone(), redelivered)).collect();
    done.sort();
    done
}

pub fn dots(n: usize) -> String {
    format!("job{}", ".".repeat(n))
}

/// The JSON log lines of a worker whose message is `message` ("job started",
/// "job done"): (job id, redelivered).
pub fn job_lines(log: &str, message: &str) -> Vec<(String, bool)> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["message"] == message)
        .map(|line| {
            (
                line["id"].as_str().unwrap_or_default().to_string(),
                line["redelivered"] == true,
            )
        })
        .collect()
}
