//! End to end: the real `warren-controller`, `warren-sender` and
//! `warren-worker` binaries, a real RabbitMQ node, and Kubernetes either
//! replaced by [`warren_fakekube::FakeApiServer`] over HTTP (the default,
//! described below) or, with `WARREN_E2E_CLUSTER` set to the state directory
//! of `make local-up`, a real control plane where the controller and workers
//! are pods of the chart (see [`cluster`]).
//!
//! [`Harness::start`] brings up, for one test:
//! - a private RabbitMQ node with the management plugin (its own ports and
//!   data directory, so tests can kill it and run in parallel);
//! - a fake API server holding a Deployment `warren-worker` (replicas 0), the
//!   Secret `warren-rabbitmq` with the broker credentials, and a
//!   `QueueScaler` built from [`HarnessOptions`];
//! - a [`ProcessReplicaSet`](warren_fakekube::ProcessReplicaSet) that runs one
//!   real `warren-worker` process per replica of that Deployment, removing
//!   scale-in victims the way the ReplicaSet controller ranks them
//!   (pod-deletion-cost) with SIGTERM, grace period, SIGKILL;
//! - the `warren-sender` binary (jobs go in through `POST /send`);
//! - one or two `warren-controller` processes with `KUBECONFIG` pointing at
//!   the fake.
//!
//! What a test reads back: the Deployment's replica history with timestamps
//! ([`ReplicaRecorder`]), the fake's request log (scale patches), the
//! QueueScaler's status, every worker's JSON log ([`JobLog`]: which job
//! started and finished where, and whether it was a redelivery), pod exit
//! codes, and each controller's `/metrics`.
//!
//! The binaries are found next to the test executable (see [`Binaries`]):
//! build them first with `cargo build --bins` (or run the whole workspace,
//! `cargo nextest run --workspace`, which builds every binary).

mod binaries;
pub mod cluster;
mod harness;
mod jobs;
mod metrics;
pub mod observability;
mod process;
mod proxy;
mod recorder;

pub use binaries::{BIN_DIR_ENV, Binaries};
pub use cluster::{ApiWrite, CLUSTER_ENV};
pub use harness::{
    Burst, DATA_LAG_COOLDOWN, DATA_LAG_WINDOW, DEPLOYMENT, Harness, HarnessOptions, LEASE,
    NAMESPACE, Pool, QueueKind, SCALER, SECRET, base_spec, deployment_object, job, scaler_object,
};
pub use jobs::{JobEvent, JobKind, JobLog, JobReport};
pub use metrics::MetricsText;
pub use process::{MemoryUsage, Process};
pub use proxy::CountingProxy;
pub use recorder::{ReplicaChange, ReplicaRecorder};

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while setting up or driving a run.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error(
        "missing {} in {}: run `cargo build --bins` first (or set {BIN_DIR_ENV})",
        names(missing),
        dir.display()
    )]
    MissingBinaries { dir: PathBuf, missing: Vec<PathBuf> },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("test service (RabbitMQ node, control plane, Prometheus): {0}")]
    Rabbit(#[from] warren_testkit::TestkitError),
    #[error("fake API server: {0}")]
    FakeKube(#[from] warren_fakekube::FakeKubeError),
    #[error("fake API server rejected an object: {0}")]
    Api(#[from] warren_fakekube::ApiError),
    #[error("{context}: {source}")]
    Kube {
        context: String,
        #[source]
        source: kube::Error,
    },
    #[error("{context}: {source}")]
    Http {
        context: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{context}: {source}")]
    Amqp {
        context: String,
        #[source]
        source: lapin::Error,
    },
    #[error("encoding or decoding JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the sender answered {status} to a job: {body}")]
    Rejected { status: u16, body: String },
    #[error("timed out after {waited:?} waiting for {what}\n{detail}")]
    Timeout {
        what: String,
        waited: Duration,
        detail: String,
    },
    #[error("{0}")]
    Other(String),
}

fn names(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| p.display().to_string())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A reqwest client for talking to local processes (plain HTTP, short
/// timeouts). Installs rustls' ring provider first: warren builds reqwest
/// without a default provider.
pub fn http_client() -> Result<reqwest::Client, HarnessError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(64)
        .build()
        .map_err(|source| HarnessError::Http {
            context: "building the HTTP client".into(),
            source,
        })
}

/// The `p`-th percentile (0..=100) of `values` by nearest rank; `None` when empty.
pub fn percentile(values: &[Duration], p: f64) -> Option<Duration> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let ms = |v: &[u64]| {
            v.iter()
                .map(|m| Duration::from_millis(*m))
                .collect::<Vec<_>>()
        };
        let values = ms(&[50, 10, 40, 20, 30]);
        assert_eq!(percentile(&values, 50.0), Some(Duration::from_millis(30)));
        assert_eq!(percentile(&values, 95.0), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&values, 0.0), Some(Duration::from_millis(10)));
        assert_eq!(percentile(&[], 50.0), None);
        let twenty: Vec<Duration> = (1..=20).map(Duration::from_secs).collect();
        assert_eq!(percentile(&twenty, 95.0), Some(Duration::from_secs(19)));
    }
}
