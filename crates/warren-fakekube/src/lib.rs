//! A fake Kubernetes API server, in memory, over plain HTTP — serving exactly
//! what the warren controller uses, so the real controller binary can run
//! against it through an ordinary kubeconfig file — and a process-backed
//! ReplicaSet that runs one real process per Deployment replica.
//!
//! What is served (all namespaced; see [`resources`]):
//! - QueueScalers (`warren.dev/v1alpha1`) with `/status`;
//! - Deployments and StatefulSets (`apps/v1`) with `/status` and `/scale`;
//! - Pods (`v1`) with `/status`, Secrets (`v1`);
//! - Events (`events.k8s.io/v1` and core `v1`);
//! - Leases (`coordination.k8s.io/v1`);
//! - `/version`.
//!
//! Verbs: GET, LIST (label and field selectors, `limit`/`continue`), WATCH
//! (ADDED/MODIFIED/DELETED/BOOKMARK, replay from a resourceVersion, 410 when
//! too old, streaming-list initial events), POST, PUT (409 on a stale
//! resourceVersion), PATCH (merge, strategic-as-merge, JSON patch, server-side
//! apply with field-ownership conflicts), DELETE. Errors are Kubernetes
//! `Status` objects. Requests must carry the kubeconfig's bearer token.
//!
//! ```no_run
//! # async fn demo() -> Result<(), warren_fakekube::FakeKubeError> {
//! use warren_fakekube::{FakeApiServer, resources::DEPLOYMENTS};
//! let server = FakeApiServer::start().await?;
//! server.write_kubeconfig("/tmp/kubeconfig")?; // KUBECONFIG=/tmp/kubeconfig warren-controller
//! let deployment = server.get_object(&DEPLOYMENTS, "default", "warren-worker");
//! # Ok(()) }
//! ```

pub mod patch;
pub mod replicaset;
pub mod resources;
pub mod selector;
mod server;
mod store;

pub use replicaset::{
    ChildOutput, PodExit, PodProcess, ProcessReplicaSet, ProcessTemplate, Readiness, Signal,
};
pub use server::{FakeApiOptions, FakeApiServer, KUBECONFIG_NAME, RecordedRequest};
pub use store::{ApiError, PatchType, Subresource, WatchEventType};

/// Errors of the fake's own plumbing (not API errors, which are [`ApiError`]).
#[derive(Debug, thiserror::Error)]
pub enum FakeKubeError {
    /// Binding the listener failed.
    #[error("binding the fake API server: {0}")]
    Bind(std::io::Error),
    /// Writing the kubeconfig file failed.
    #[error("writing kubeconfig {path}: {source}")]
    WriteKubeconfig {
        /// Where.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The generated kubeconfig was rejected by kube.
    #[error("loading the kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    /// Building the kube client failed.
    #[error("building the kube client: {0}")]
    Client(#[from] kube::Error),
    /// An API-level error from a test hook.
    #[error("API error: {0}")]
    Api(#[from] ApiError),
    /// No such pod process.
    #[error("no running pod process named {0:?}")]
    NoSuchPod(String),
    /// Sending a signal failed.
    #[error("sending {signal} to pod {pod}: {source}")]
    Signal {
        /// Pod name.
        pod: String,
        /// Which signal.
        signal: Signal,
        /// Why.
        source: nix::Error,
    },
    /// The ReplicaSet's task is gone.
    #[error("the process ReplicaSet has stopped")]
    Stopped,
}
