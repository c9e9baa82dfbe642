//! End to end: the real `warren-controller`, `warren-sender` and
//! `warren-worker` binaries, a real RabbitMQ node, and the local cluster
//! (`make local-up`: the upstream kube-apiserver, kube-controller-manager and
//! scheduler, and a node agent that runs pods as local processes) whose state
//! directory `WARREN_E2E_CLUSTER` names. Without it a [`Harness`] fails at
//! once (never a skip): `make local-scenarios` sets it.
//!
//! [`Harness::start`] brings up, for one test:
//! - a private RabbitMQ node with the management plugin (its own ports and
//!   data directory, so tests can kill it), reached by the pods through the
//!   node's address;
//! - a namespace of the cluster with the chart's objects (rendered by
//!   `helm template`): the controller Deployment with its ServiceAccount and
//!   RBAC, the worker Deployment `warren-worker` at 0 replicas (its pods run
//!   the real `warren-worker`, scaled in by the real ReplicaSet controller,
//!   which ranks victims by pod-deletion-cost), the Secret
//!   `warren-rabbitmq`, and a `QueueScaler` built from [`HarnessOptions`]
//!   (see [`cluster`]);
//! - the `warren-sender` binary on this machine (jobs go in through
//!   `POST /send`).
//!
//! What a test reads back: the Deployment's replica history with timestamps
//! ([`ReplicaRecorder`], from a watch), the `/scale` patches (the apiserver's
//! audit log), the QueueScaler's status, every worker's JSON log ([`JobLog`],
//! from the container logs the node agent keeps: which job started and
//! finished where, and whether it was a redelivery), container exits, the
//! scale-in victims' deletion costs, and each controller pod's `/metrics`.
//!
//! The sender is found next to the test executable (see [`Binaries`]):
//! build the binaries first with `cargo build --bins`; the pods run those
//! `make local-up` installed.

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
    NAMESPACE, PodExit, Pool, QueueKind, SCALER, SECRET, base_spec, deployment_object, job,
    scaler_object,
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
    #[error(
        "the end-to-end scenarios run on the local cluster, and {CLUSTER_ENV} is not set: \
         start the cluster with `make local-up` and run them with `make local-scenarios` \
         (or set {CLUSTER_ENV} to the cluster's state directory, .local/cluster)"
    )]
    NoCluster,
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
