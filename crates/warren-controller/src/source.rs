//! Where a reconcile gets its queue observation: the [`MetricsSource`] trait
//! (I/O at the edge, faked in tests) and [`BrokerMetrics`], the real one.
//!
//! [`BrokerMetrics`] reads the credentials Secret (cached), the management
//! API through the shared [`QueueStatsHub`] (one request per broker and vhost
//! per tick, whatever the number of scalers) and, when the target sits at
//! zero replicas or the management API has no counts yet for the queue, an
//! AMQP passive declare for an instant ready count.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;
use kube::ResourceExt;
use warren_crd::{BrokerRef, Observation, QueueRef, QueueScaler};

use crate::credentials::{CredentialsCache, CredentialsError, SecretKeys};
use crate::queue_peek::{PeekError, QueuePeeker};
use crate::queue_stats::{
    ConnectionUnacked, Credentials, ManagementEndpoint, QueueStatsHub, StatsError,
};

/// The broker-side identity of a scaler: which queue on which broker, and
/// which Secret (in `namespace`) holds the credentials.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BrokerTarget {
    pub namespace: String,
    pub broker: BrokerRef,
    pub queue: QueueRef,
}

impl BrokerTarget {
    /// The broker target of `scaler` (`None` without a namespace).
    pub fn of(scaler: &QueueScaler) -> Option<Self> {
        Some(Self {
            namespace: scaler.namespace()?,
            broker: scaler.spec.broker.clone(),
            queue: scaler.spec.queue.clone(),
        })
    }

    /// The Secret keys holding this target's credentials.
    pub fn secret_keys(&self) -> SecretKeys {
        let secret = &self.broker.credentials_secret_ref;
        SecretKeys {
            namespace: self.namespace.clone(),
            name: secret.name.clone(),
            username_key: secret.username_key.clone(),
            password_key: secret.password_key.clone(),
        }
    }
}

/// Why the queue could not be observed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MetricsError {
    #[error("{0}")]
    Credentials(Arc<CredentialsError>),
    #[error("{0}")]
    Management(Arc<StatsError>),
    #[error("{0}")]
    Peek(Arc<PeekError>),
    #[error("queue {queue:?} not found in vhost {vhost:?}")]
    QueueNotFound { queue: String, vhost: String },
    /// Used by fakes and tests.
    #[error("{0}")]
    Other(String),
}

impl MetricsError {
    /// Short, bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            MetricsError::Credentials(e) => e.metric_label(),
            MetricsError::Management(e) => e.metric_label(),
            MetricsError::Peek(e) => e.metric_label(),
            MetricsError::QueueNotFound { .. } => "queue_not_found",
            MetricsError::Other(_) => "other",
        }
    }

    /// CamelCase reason for the `Ready=False` condition.
    pub fn condition_reason(&self) -> &'static str {
        match self {
            MetricsError::Credentials(_) => "CredentialsUnavailable",
            MetricsError::Management(e) if matches!(**e, StatsError::Unauthorized { .. }) => {
                "BrokerUnauthorized"
            }
            MetricsError::QueueNotFound { .. } => "QueueNotFound",
            MetricsError::Management(_) | MetricsError::Peek(_) | MetricsError::Other(_) => {
                "BrokerUnavailable"
            }
        }
    }
}

impl From<CredentialsError> for MetricsError {
    fn from(value: CredentialsError) -> Self {
        MetricsError::Credentials(Arc::new(value))
    }
}

/// Reads a scaler's queue. Implementations must be cheap to call from many
/// concurrent reconciles.
#[async_trait]
pub trait MetricsSource: Send + Sync {
    /// The queue's depth, consumers and rates now. `instant_ready` asks for
    /// an up-to-date ready count (the target is at zero replicas and the
    /// management API's statistics lag).
    async fn observe(
        &self,
        target: &BrokerTarget,
        instant_ready: bool,
    ) -> Result<Observation, MetricsError>;

    /// Unacked messages per client-named connection (worker pod) of the
    /// target's vhost.
    async fn connection_unacked(
        &self,
        target: &BrokerTarget,
    ) -> Result<ConnectionUnacked, MetricsError>;
}

/// The real [`MetricsSource`]: Secret → management API (+ passive declare).
pub struct BrokerMetrics {
    credentials: Arc<CredentialsCache>,
    hub: Arc<QueueStatsHub>,
    peeker: Arc<QueuePeeker>,
}

impl BrokerMetrics {
    pub fn new(
        credentials: Arc<CredentialsCache>,
        hub: Arc<QueueStatsHub>,
        peeker: Arc<QueuePeeker>,
    ) -> Self {
        Self {
            credentials,
            hub,
            peeker,
        }
    }

    /// The shared management-API reader (request counts for benchmarks).
    pub fn hub(&self) -> &QueueStatsHub {
        &self.hub
    }

    async fn endpoint(
        &self,
        target: &BrokerTarget,
    ) -> Result<(ManagementEndpoint, Credentials), MetricsError> {
        let credentials = self.credentials.get(&target.secret_keys()).await?;
        Ok((
            ManagementEndpoint {
                url: target.broker.management_url.clone(),
                credentials: credentials.clone(),
            },
            credentials,
        ))
    }

    async fn peek(
        &self,
        target: &BrokerTarget,
        credentials: &Credentials,
    ) -> Result<crate::queue_peek::QueuePeek, MetricsError> {
        self.peeker
            .peek(
                &target.broker.amqp_url,
                credentials,
                &target.queue.vhost,
                &target.queue.name,
            )
            .await
            .map_err(|e| match e {
                PeekError::QueueNotFound { queue, vhost } => {
                    MetricsError::QueueNotFound { queue, vhost }
                }
                other => MetricsError::Peek(Arc::new(other)),
            })
    }
}

#[async_trait]
impl MetricsSource for BrokerMetrics {
    async fn observe(
        &self,
        target: &BrokerTarget,
        instant_ready: bool,
    ) -> Result<Observation, MetricsError> {
        let (endpoint, credentials) = self.endpoint(target).await?;
        let listing = self
            .hub
            .vhost_queues(&endpoint, &target.queue.vhost)
            .await
            .map_err(MetricsError::Management);
        let row = match &listing {
            Ok(queues) => match queues.get(&target.queue.name) {
                Some(row) => Some(row.clone()),
                None => {
                    return Err(MetricsError::QueueNotFound {
                        queue: target.queue.name.clone(),
                        vhost: target.queue.vhost.clone(),
                    });
                }
            },
            Err(_) => None,
        };
        let counted_row = row.filter(|r| r.has_counts());

        match counted_row {
            Some(row) => {
                let mut ready = row.messages_ready.unwrap_or(0);
                let mut consumers = row.consumers.unwrap_or(0);
                if instant_ready {
                    // Management counts lag; the queue itself knows now. A
                    // failed declare is not fatal: the management row is
                    // good enough.
                    match self.peek(target, &credentials).await {
                        Ok(peek) => {
                            ready = peek.ready;
                            consumers = peek.consumers;
                        }
                        Err(err) => tracing::debug!(
                            queue = %target.queue.name,
                            error = %err,
                            "passive declare failed; using management counts"
                        ),
                    }
                }
                Ok(Observation::new(
                    ready,
                    row.messages_unacknowledged.unwrap_or(0),
                    consumers,
                    row.publish_rate(),
                    row.ack_rate(),
                    Utc::now(),
                ))
            }
            None => {
                // No usable management row: the API failed, or the broker has
                // not collected statistics for a new queue yet. At zero
                // replicas (or for a queue without stats) the passive declare
                // alone is enough to decide activation; otherwise the read
                // failed.
                if let (false, Err(management_err)) = (instant_ready, &listing) {
                    return Err(management_err.clone());
                }
                match self.peek(target, &credentials).await {
                    Ok(peek) => Ok(Observation::new(
                        peek.ready,
                        0,
                        peek.consumers,
                        None,
                        None,
                        Utc::now(),
                    )),
                    Err(peek_err) => Err(match listing {
                        Err(management_err) => management_err,
                        Ok(_) => peek_err,
                    }),
                }
            }
        }
    }

    async fn connection_unacked(
        &self,
        target: &BrokerTarget,
    ) -> Result<ConnectionUnacked, MetricsError> {
        let (endpoint, _) = self.endpoint(target).await?;
        self.hub
            .connection_unacked(&endpoint, &target.queue.vhost)
            .await
            .map(|shared| (*shared).clone())
            .map_err(MetricsError::Management)
    }
}
