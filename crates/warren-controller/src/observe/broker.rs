//! [`BrokerObserver`], the real [`QueueObserver`]: the credentials Secret,
//! then an AMQP passive declare and the shared management-API listing,
//! combined by [`combine`] (see the table in [`crate::observe`]).

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::credentials::CredentialsCache;
use super::management::{
    ConnectionUnacked, Credentials, ManagementEndpoint, QueueStats, QueueStatsHub,
};
use super::peek::{PeekError, QueuePeek, QueuePeeker};
use super::{BrokerTarget, ObserveError, QueueObserver, QueueRead, ReadySource};

/// The real [`QueueObserver`]: Secret → passive declare + management API.
pub struct BrokerObserver {
    credentials: Arc<CredentialsCache>,
    hub: Arc<QueueStatsHub>,
    peeker: Arc<QueuePeeker>,
}

impl BrokerObserver {
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
    #[cfg(any(test, feature = "test-util"))]
    pub fn hub(&self) -> &QueueStatsHub {
        &self.hub
    }

    /// The shared passive-declare reader (declare and connection counts).
    #[cfg(any(test, feature = "test-util"))]
    pub fn peeker(&self) -> &QueuePeeker {
        &self.peeker
    }

    async fn endpoint(
        &self,
        target: &BrokerTarget,
    ) -> Result<(ManagementEndpoint, Credentials), ObserveError> {
        let credentials = self.credentials.get(&target.secret_keys()).await?;
        Ok((
            ManagementEndpoint {
                url: target.broker.management_url.clone(),
                credentials: credentials.clone(),
            },
            credentials,
        ))
    }
}

impl BrokerObserver {
    /// One queue of the target's vhost: passive declare + the shared listing.
    async fn observe_queue(
        &self,
        target: &BrokerTarget,
        endpoint: &ManagementEndpoint,
        credentials: &Credentials,
        name: &str,
    ) -> Result<QueueRead, ObserveError> {
        let vhost = &target.queue.vhost;
        let amqp_url = &target.broker.amqp_url;
        if self
            .peeker
            .is_known_missing(amqp_url, credentials, vhost, name)
            && let Ok(listing) = self.hub.vhost_queues(endpoint, vhost).await
            && listing.get(name).is_none()
        {
            // Still absent from the (shared, already paid for) listing, which
            // shows a new queue at once: spare the broker a channel and a 404.
            return Err(ObserveError::QueueNotFound {
                queue: name.to_owned(),
                vhost: vhost.clone(),
            });
        }
        let (listing, peek) = tokio::join!(
            self.hub.vhost_queues(endpoint, vhost),
            self.peeker.peek(amqp_url, credentials, vhost, name),
        );
        let row = listing
            .as_ref()
            .map(|queues| queues.get(name))
            .map_err(|e| ObserveError::Management(e.clone()));
        combine(name, vhost, row, peek, Utc::now())
    }

    /// The queues a multi-queue target watches now: its named queues and the
    /// listed queues its pattern matches (the shared per-vhost listing; a
    /// pattern cannot be resolved without it, names can).
    async fn resolve_queues(
        &self,
        target: &BrokerTarget,
        endpoint: &ManagementEndpoint,
    ) -> Result<Vec<String>, ObserveError> {
        let queue = &target.queue;
        match self.hub.vhost_queues(endpoint, &queue.vhost).await {
            Ok(listing) => Ok(queue.resolve(listing.queues.keys().map(String::as_str))),
            Err(err) if queue.pattern.is_some() => Err(ObserveError::Management(err)),
            Err(_) => Ok(queue.resolve(std::iter::empty())),
        }
    }
}

#[async_trait]
impl QueueObserver for BrokerObserver {
    /// One queue: [`combine`] of its declare and listing row. Several: each
    /// resolved queue read the same way (concurrently, on the same pooled
    /// channel and the same cached listing); any queue's failure fails the
    /// whole read, so the scaler holds its replicas rather than size on part
    /// of its queues.
    async fn observe(&self, target: &BrokerTarget) -> Result<QueueRead, ObserveError> {
        let (endpoint, credentials) = self.endpoint(target).await?;
        if !target.queue.is_multi() {
            return self
                .observe_queue(target, &endpoint, &credentials, &target.queue.name)
                .await;
        }
        let names = self.resolve_queues(target, &endpoint).await?;
        let reads = futures::future::join_all(
            names
                .iter()
                .map(|name| self.observe_queue(target, &endpoint, &credentials, name)),
        )
        .await;
        let queues = names
            .into_iter()
            .zip(reads)
            .map(|(name, read)| read.map(|read| (name, read)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(QueueRead::of_queues(queues, Utc::now()))
    }

    async fn connection_unacked(
        &self,
        target: &BrokerTarget,
    ) -> Result<ConnectionUnacked, ObserveError> {
        let (endpoint, _) = self.endpoint(target).await?;
        self.hub
            .connection_unacked(&endpoint, &target.queue.vhost)
            .await
            .map(|shared| (*shared).clone())
            .map_err(ObserveError::Management)
    }
}

/// Combines the management row of the queue (`Ok(None)`: the listing has no
/// such queue) and the passive declare into one read; see the table in the
/// module documentation.
pub fn combine(
    queue: &str,
    vhost: &str,
    management: Result<Option<&QueueStats>, ObserveError>,
    peek: Result<QueuePeek, PeekError>,
    now: DateTime<Utc>,
) -> Result<QueueRead, ObserveError> {
    let not_found = || ObserveError::QueueNotFound {
        queue: queue.to_owned(),
        vhost: vhost.to_owned(),
    };
    let counted = |row: &&QueueStats| row.has_counts();
    match peek {
        Ok(peek) => {
            let row = management.ok().flatten().filter(counted);
            Ok(QueueRead {
                ready: peek.ready,
                unacked: row.and_then(|r| r.messages_unacknowledged),
                consumers: peek.consumers,
                publish_rate: row.and_then(QueueStats::publish_rate),
                ack_rate: row.and_then(QueueStats::ack_rate),
                ready_source: ReadySource::PassiveDeclare,
                observed_at: now,
                queues: Vec::new(),
            })
        }
        Err(PeekError::QueueNotFound { .. }) => Err(not_found()),
        Err(peek_err) => match management {
            Ok(Some(row)) if row.has_counts() => {
                tracing::debug!(
                    queue,
                    error = %peek_err,
                    "passive declare failed; using the management API's counts"
                );
                Ok(QueueRead {
                    ready: row.messages_ready.unwrap_or(0),
                    unacked: row.messages_unacknowledged,
                    consumers: row.consumers.unwrap_or(0),
                    publish_rate: row.publish_rate(),
                    ack_rate: row.ack_rate(),
                    ready_source: ReadySource::Management,
                    observed_at: now,
                    queues: Vec::new(),
                })
            }
            Ok(Some(_)) => Err(ObserveError::Peek(Arc::new(peek_err))),
            Ok(None) => Err(not_found()),
            Err(management_err) => Err(management_err),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::management::StatsError;
    use crate::reconcile::unacked;

    fn row(ready: u64, unacked: u64, consumers: u64) -> QueueStats {
        serde_json::from_value(serde_json::json!({
            "name": "jobs", "messages_ready": ready, "messages_unacknowledged": unacked,
            "consumers": consumers,
            "message_stats": {"publish_details": {"rate": 2.0}, "ack_details": {"rate": 1.0}}
        }))
        .unwrap()
    }

    fn no_counts() -> QueueStats {
        serde_json::from_value(serde_json::json!({"name": "jobs"})).unwrap()
    }

    fn peek(ready: u64, consumers: u64) -> Result<QueuePeek, PeekError> {
        Ok(QueuePeek { ready, consumers })
    }

    fn peek_failed() -> Result<QueuePeek, PeekError> {
        Err(PeekError::Timeout {
            queue: "jobs".into(),
            after: std::time::Duration::from_secs(5),
        })
    }

    fn peek_404() -> Result<QueuePeek, PeekError> {
        Err(PeekError::QueueNotFound {
            queue: "jobs".into(),
            vhost: "/".into(),
        })
    }

    fn management_down() -> ObserveError {
        ObserveError::Management(Arc::new(StatsError::Timeout {
            url: "http://rabbit:15672/api/queues/%2F".into(),
        }))
    }

    #[test]
    fn ready_and_consumers_come_from_the_declare_unacked_and_rates_from_management() {
        let stale = row(0, 3, 1);
        let read = combine("jobs", "/", Ok(Some(&stale)), peek(50, 2), Utc::now()).unwrap();
        assert_eq!(read.ready, 50);
        assert_eq!(read.consumers, 2);
        assert_eq!(read.unacked, Some(3));
        assert_eq!(read.publish_rate, Some(2.0));
        assert_eq!(read.ack_rate, Some(1.0));
        assert_eq!(read.ready_source, ReadySource::PassiveDeclare);
        let observation = unacked::observation(&read, Some(99));
        assert_eq!((observation.ready, observation.unacked), (50, 3));
        assert_eq!(observation.per_replica_ack_rate, Some(0.5));
    }

    #[test]
    fn management_down_still_observes_with_unacked_unknown() {
        let read = combine("jobs", "/", Err(management_down()), peek(7, 1), Utc::now()).unwrap();
        assert_eq!(read.ready, 7);
        assert_eq!(read.unacked, None);
        assert_eq!(read.publish_rate, None);
        assert_eq!(unacked::observation(&read, Some(4)).unacked, 4);
        assert_eq!(unacked::observation(&read, None).unacked, 0);

        // A queue the management API has no counts (or no row) for yet.
        let fresh = no_counts();
        let read = combine("jobs", "/", Ok(Some(&fresh)), peek(2, 0), Utc::now()).unwrap();
        assert_eq!((read.ready, read.unacked), (2, None));
        let read = combine("jobs", "/", Ok(None), peek(2, 0), Utc::now()).unwrap();
        assert_eq!((read.ready, read.unacked), (2, None));
    }

    #[test]
    fn declare_down_falls_back_to_the_management_counts() {
        let counts = row(12, 3, 2);
        let read = combine("jobs", "/", Ok(Some(&counts)), peek_failed(), Utc::now()).unwrap();
        assert_eq!((read.ready, read.unacked, read.consumers), (12, Some(3), 2));
        assert_eq!(read.ready_source, ReadySource::Management);

        let fresh = no_counts();
        let err = combine("jobs", "/", Ok(Some(&fresh)), peek_failed(), Utc::now()).unwrap_err();
        assert_eq!(err.metric_label(), "timeout");
        let err = combine("jobs", "/", Ok(None), peek_failed(), Utc::now()).unwrap_err();
        assert_eq!(err.condition_reason(), "QueueNotFound");
        let err = combine(
            "jobs",
            "/",
            Err(management_down()),
            peek_failed(),
            Utc::now(),
        )
        .unwrap_err();
        assert!(matches!(err, ObserveError::Management(_)), "{err:?}");
    }

    #[test]
    fn a_404_from_the_declare_is_queue_not_found_whatever_management_says() {
        let stale = row(5, 0, 1);
        for management in [Ok(Some(&stale)), Ok(None), Err(management_down())] {
            let err = combine("jobs", "/", management, peek_404(), Utc::now()).unwrap_err();
            assert!(
                matches!(&err, ObserveError::QueueNotFound { queue, .. } if queue == "jobs"),
                "{err:?}"
            );
        }
    }
}
