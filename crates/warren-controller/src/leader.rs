//! Leader election on a `coordination.k8s.io/v1` Lease (kube-lease-manager).
//!
//! Two controller replicas may run; only the one holding the Lease runs the
//! scaling loop. Each leadership term starts the loop with a fresh
//! [`CancellationToken`]; losing the Lease cancels it and the loop stops
//! after its in-flight reconciles finish. On shutdown the Lease is released
//! so the other replica takes over without waiting for it to expire.
//!
//! A leader cut off from the API server cannot renew, but it cannot patch
//! `/scale` either, so a stale leader does no harm until it notices.

use std::future::Future;
use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use tokio_util::sync::CancellationToken;

use crate::metrics::ControllerMetrics;

/// Lease settings.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub lease_name: String,
    pub namespace: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How long a lease is valid after its last renewal.
    pub duration: Duration,
    /// Renew this long before the lease expires.
    pub grace: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error(
        "lease duration {duration:?} must be longer than the grace period {grace:?}, both at least 1 s"
    )]
    Timing { duration: Duration, grace: Duration },
    #[error("cannot set up the Lease {namespace}/{name}: {source}")]
    Setup {
        namespace: String,
        name: String,
        #[source]
        source: LeaseManagerError,
    },
    /// The lease manager's watcher closed its channel (it stopped).
    #[error("the lease watcher stopped: lease channel closed")]
    WatcherStopped,
}

/// Runs `term` for each leadership term until `shutdown` resolves.
///
/// `term` gets a token that is cancelled when the lease is lost or the
/// process shuts down; it must return soon after.
pub async fn run_while_leader<F, Fut>(
    client: Client,
    config: LeaseConfig,
    metrics: ControllerMetrics,
    shutdown: impl Future<Output = ()>,
    mut term: F,
) -> Result<(), LeaderError>
where
    F: FnMut(CancellationToken) -> Fut,
    Fut: Future<Output = ()>,
{
    let manager = lease_manager(client, &config).await?;
    let (mut leading, watcher) = manager.watch().await;
    tokio::pin!(shutdown);

    let outcome = loop {
        // Follower: wait for the lease or for shutdown.
        if !*leading.borrow_and_update() {
            tracing::info!(lease = %config.lease_name, identity = %config.identity, "waiting for the leader lease");
            tokio::select! {
                () = &mut shutdown => break Ok(()),
                changed = leading.changed() => {
                    if changed.is_err() {
                        break Err(LeaderError::WatcherStopped);
                    }
                    continue;
                }
            }
        }

        tracing::info!(lease = %config.lease_name, identity = %config.identity, "acquired the leader lease; scaling");
        metrics.leader.set(1);
        let stop = CancellationToken::new();
        let running = term(stop.clone());
        tokio::pin!(running);
        let lost = async {
            loop {
                if leading.changed().await.is_err() {
                    return Err(LeaderError::WatcherStopped);
                }
                if !*leading.borrow_and_update() {
                    return Ok(());
                }
            }
        };
        let end = tokio::select! {
            () = &mut running => Some(Ok(())),
            result = lost => {
                tracing::warn!(lease = %config.lease_name, "lost the leader lease; stopping the scaling loop");
                stop.cancel();
                running.as_mut().await;
                result.err().map(Err)
            }
            () = &mut shutdown => {
                stop.cancel();
                running.as_mut().await;
                Some(Ok(()))
            }
        };
        metrics.leader.set(0);
        if let Some(end) = end {
            break end;
        }
    };

    // Closing the channel makes the watcher release the lease and exit.
    drop(leading);
    match watcher.await {
        Ok(Ok(_)) => tracing::info!(lease = %config.lease_name, "released the leader lease"),
        Ok(Err(err)) => tracing::warn!(error = %err, "releasing the leader lease failed"),
        Err(err) => tracing::warn!(error = %err, "lease watcher task failed"),
    }
    outcome
}

/// The lease manager of `config`, after checking its timing.
async fn lease_manager(client: Client, config: &LeaseConfig) -> Result<LeaseManager, LeaderError> {
    let duration = config.duration.as_secs();
    let grace = config.grace.as_secs();
    if grace == 0 || grace >= duration {
        return Err(LeaderError::Timing {
            duration: config.duration,
            grace: config.grace,
        });
    }
    LeaseManagerBuilder::new(client, &config.lease_name)
        .with_namespace(&config.namespace)
        .with_identity(&config.identity)
        .with_duration(duration)
        .with_grace(grace)
        .build()
        .await
        .map_err(|source| LeaderError::Setup {
            namespace: config.namespace.clone(),
            name: config.lease_name.clone(),
            source,
        })
}
