//! warren's Grafana dashboards and Prometheus alert rules as data.
//!
//! The chart ships them (`charts/warren/dashboards/*.json`,
//! `charts/warren/files/prometheus-rules.yaml`); this crate reads them, lists
//! every query they run ([`dashboard`], [`rules`]), runs queries through a
//! Prometheus HTTP API ([`prometheus`]) and draws panels to PNG without
//! Grafana ([`snapshot`]). The observability test in `warren-e2e` uses all
//! of it against a real Prometheus scraping the real processes.

pub mod dashboard;
pub mod prometheus;
pub mod rules;
pub mod snapshot;

use std::path::PathBuf;

/// The chart directory of this checkout (`charts/warren`).
pub fn chart_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../charts/warren")
}

/// Errors reading dashboards or rules.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a dashboard: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} is not a Prometheus rules file: {message}")]
    Yaml { path: PathBuf, message: String },
}
