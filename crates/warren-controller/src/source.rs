//! Where a reconcile gets its queue observation: the [`MetricsSource`] trait
//! (I/O at the edge, faked in tests) and [`BrokerMetrics`], the real one.
//!
//! # Every tick, two reads, combined
//!
//! For every scaler on every tick, [`BrokerMetrics`] reads the credentials
//! Secret (cached) and then, concurrently:
//! - an AMQP passive `queue.declare` ([`QueuePeeker`]): the **ready** and
//!   **consumer** counts as of now — exact, no statistics lag;
//! - the management API through the shared [`QueueStatsHub`]: **unacked**
//!   count and the publish / ack **rates**, which only the management API
//!   knows (ready and consumers too, as a fallback).
//!
//! | passive declare | management API     | observation                                                     |
//! |-----------------|--------------------|-----------------------------------------------------------------|
//! | ok              | row with counts    | ready, consumers: declare; unacked, rates: management           |
//! | ok              | failed / no counts | ready, consumers: declare; unacked unknown, no rates            |
//! | 404             | anything           | error `QueueNotFound` (the broker itself says so, now)          |
//! | failed          | row with counts    | everything from management (as before: lagging but usable)      |
//! | failed          | no row for queue   | error `QueueNotFound`                                           |
//! | failed          | failed / no counts | error (the management error if it failed, else the declare's)   |
//!
//! An unknown unacked count is reported as `None` ([`QueueRead::unacked`]);
//! the reconciler substitutes the last known count (0 if none is known) and
//! never scales a running target to zero on it (see `crate::reconcile`).
//!
//! # Cost model
//!
//! - Management API: still ONE `GET /api/queues/{vhost}?columns=...` per
//!   (broker, credentials, vhost) per tick, shared by every scaler on it
//!   (coalesced by [`QueueStatsHub`]), independent of the number of scalers.
//! - AMQP: one passive declare per scaler per tick, i.e. one
//!   `queue.declare`/`declare-ok` frame pair (~100 bytes each way) on a
//!   channel that stays open, over one long-lived connection per
//!   (broker, credentials, vhost). No HTTP, no TCP or channel setup per
//!   read, no statistics database query on the broker: the queue process
//!   answers from its own state. 1000 scalers at a 1 s polling interval are
//!   1000 small frames per second on one connection.
//! - A declare that fails on the shared channel is retried once on a
//!   private channel (see [`crate::queue_peek`]). A queue last seen missing
//!   is not declared again while the management listing still lacks it;
//!   once listed (or with the management API down) it is declared on a
//!   private channel (open + declare + close). Extra cost only for broken
//!   scalers.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use kube::ResourceExt;
use warren_crd::{BrokerRef, Observation, QueueObservation, QueueRef, QueueScaler};

use crate::credentials::{CredentialsCache, CredentialsError, SecretKeys};
use crate::queue_peek::{PeekError, QueuePeek, QueuePeeker};
use crate::queue_stats::{
    ConnectionUnacked, Credentials, ManagementEndpoint, QueueStats, QueueStatsHub, StatsError,
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

/// Where a read's ready (and consumer) count came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadySource {
    /// AMQP passive declare: exact, as of the read.
    PassiveDeclare,
    /// Management API: lags by up to the statistics interval.
    Management,
}

impl ReadySource {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            ReadySource::PassiveDeclare => "passive_declare",
            ReadySource::Management => "management",
        }
    }
}

/// One read of a queue. Unlike an [`Observation`], the unacked count may be
/// unknown (the management API failed or has no counts for the queue yet).
///
/// For a scaler over several queues, `queues` holds each queue's read and
/// the fields above are totals: `unacked` is unknown when any queue's is,
/// `ready_source` is the management API when any queue's ready count came
/// from it.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueRead {
    pub ready: u64,
    /// `None`: unknown this tick.
    pub unacked: Option<u64>,
    pub consumers: u64,
    pub publish_rate: Option<f64>,
    pub ack_rate: Option<f64>,
    pub ready_source: ReadySource,
    pub observed_at: DateTime<Utc>,
    /// Per queue (name, read), for a multi-queue scaler; empty otherwise.
    pub queues: Vec<(String, QueueRead)>,
}

impl QueueRead {
    /// The observation for the decision and the status: an unknown unacked
    /// count is replaced by `last_known_unacked`, or 0 when nothing is known.
    ///
    /// Several queues: each queue with an unknown unacked count counts 0 for
    /// it in `queues`, and the total is at least `last_known_unacked`; the
    /// reconciler still never scales a running target to zero on such a read.
    pub fn observation(&self, last_known_unacked: Option<u64>) -> Observation {
        if self.queues.is_empty() {
            return Observation::new(
                self.ready,
                self.unacked.or(last_known_unacked).unwrap_or(0),
                self.consumers,
                self.publish_rate,
                self.ack_rate,
                self.observed_at,
            );
        }
        let queues = self
            .queues
            .iter()
            .map(|(name, read)| QueueObservation {
                name: name.clone(),
                ready: read.ready,
                unacked: read.unacked.unwrap_or(0),
                consumers: read.consumers,
                publish_rate: read.publish_rate,
                ack_rate: read.ack_rate,
            })
            .collect();
        let mut observation = Observation::of_queues(queues, self.observed_at);
        if self.unacked.is_none() {
            observation.unacked = observation.unacked.max(last_known_unacked.unwrap_or(0));
        }
        observation
    }

    /// The read of several queues: totals over `queues` (see the type).
    pub fn of_queues(queues: Vec<(String, QueueRead)>, observed_at: DateTime<Utc>) -> Self {
        let sum = |f: fn(&QueueRead) -> u64| {
            queues
                .iter()
                .map(|(_, r)| f(r))
                .fold(0u64, u64::saturating_add)
        };
        let rate = |f: fn(&QueueRead) -> Option<f64>| {
            queues.iter().filter_map(|(_, r)| f(r)).reduce(|a, b| a + b)
        };
        let unacked = queues
            .iter()
            .map(|(_, r)| r.unacked)
            .try_fold(0u64, |total, u| u.map(|u| total.saturating_add(u)));
        let ready_source = if queues
            .iter()
            .any(|(_, r)| r.ready_source == ReadySource::Management)
        {
            ReadySource::Management
        } else {
            ReadySource::PassiveDeclare
        };
        QueueRead {
            ready: sum(|r| r.ready),
            unacked,
            consumers: sum(|r| r.consumers),
            publish_rate: rate(|r| r.publish_rate),
            ack_rate: rate(|r| r.ack_rate),
            ready_source,
            observed_at,
            queues,
        }
    }
}

impl From<Observation> for QueueRead {
    /// A complete read (every count known), as from the management API.
    fn from(o: Observation) -> Self {
        QueueRead {
            ready: o.ready,
            unacked: Some(o.unacked),
            consumers: o.consumers,
            publish_rate: o.publish_rate,
            ack_rate: o.ack_rate,
            ready_source: ReadySource::Management,
            observed_at: o.observed_at,
            queues: Vec::new(),
        }
    }
}

/// Reads a scaler's queue. Implementations must be cheap to call from many
/// concurrent reconciles.
#[async_trait]
pub trait MetricsSource: Send + Sync {
    /// The queue's depth, consumers and rates now.
    async fn observe(&self, target: &BrokerTarget) -> Result<QueueRead, MetricsError>;

    /// Unacked messages per client-named connection (worker pod) of the
    /// target's vhost.
    async fn connection_unacked(
        &self,
        target: &BrokerTarget,
    ) -> Result<ConnectionUnacked, MetricsError>;
}

/// The real [`MetricsSource`]: Secret → passive declare + management API.
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

    /// The shared passive-declare reader (declare and connection counts).
    pub fn peeker(&self) -> &QueuePeeker {
        &self.peeker
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
}

impl BrokerMetrics {
    /// One queue of the target's vhost: passive declare + the shared listing.
    async fn observe_queue(
        &self,
        target: &BrokerTarget,
        endpoint: &ManagementEndpoint,
        credentials: &Credentials,
        name: &str,
    ) -> Result<QueueRead, MetricsError> {
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
            return Err(MetricsError::QueueNotFound {
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
            .map_err(|e| MetricsError::Management(e.clone()));
        combine(name, vhost, row, peek, Utc::now())
    }

    /// The queues a multi-queue target watches now: its named queues and the
    /// listed queues its pattern matches (the shared per-vhost listing; a
    /// pattern cannot be resolved without it, names can).
    async fn resolve_queues(
        &self,
        target: &BrokerTarget,
        endpoint: &ManagementEndpoint,
    ) -> Result<Vec<String>, MetricsError> {
        let queue = &target.queue;
        match self.hub.vhost_queues(endpoint, &queue.vhost).await {
            Ok(listing) => Ok(queue.resolve(listing.queues.keys().map(String::as_str))),
            Err(err) if queue.pattern.is_some() => Err(MetricsError::Management(err)),
            Err(_) => Ok(queue.resolve(std::iter::empty())),
        }
    }
}

#[async_trait]
impl MetricsSource for BrokerMetrics {
    /// One queue: [`combine`] of its declare and listing row. Several: each
    /// resolved queue read the same way (concurrently, on the same pooled
    /// channel and the same cached listing); any queue's failure fails the
    /// whole read, so the scaler holds its replicas rather than size on part
    /// of its queues.
    async fn observe(&self, target: &BrokerTarget) -> Result<QueueRead, MetricsError> {
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
    ) -> Result<ConnectionUnacked, MetricsError> {
        let (endpoint, _) = self.endpoint(target).await?;
        self.hub
            .connection_unacked(&endpoint, &target.queue.vhost)
            .await
            .map(|shared| (*shared).clone())
            .map_err(MetricsError::Management)
    }
}

/// Combines the management row of the queue (`Ok(None)`: the listing has no
/// such queue) and the passive declare into one read; see the table in the
/// module documentation.
pub fn combine(
    queue: &str,
    vhost: &str,
    management: Result<Option<&QueueStats>, MetricsError>,
    peek: Result<QueuePeek, PeekError>,
    now: DateTime<Utc>,
) -> Result<QueueRead, MetricsError> {
    let not_found = || MetricsError::QueueNotFound {
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
            Ok(Some(_)) => Err(MetricsError::Peek(Arc::new(peek_err))),
            Ok(None) => Err(not_found()),
            Err(management_err) => Err(management_err),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn management_down() -> MetricsError {
        MetricsError::Management(Arc::new(StatsError::Timeout {
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
        let observation = read.observation(Some(99));
        assert_eq!((observation.ready, observation.unacked), (50, 3));
        assert_eq!(observation.per_replica_ack_rate, Some(0.5));
    }

    #[test]
    fn management_down_still_observes_with_unacked_unknown() {
        let read = combine("jobs", "/", Err(management_down()), peek(7, 1), Utc::now()).unwrap();
        assert_eq!(read.ready, 7);
        assert_eq!(read.unacked, None);
        assert_eq!(read.publish_rate, None);
        assert_eq!(read.observation(Some(4)).unacked, 4);
        assert_eq!(read.observation(None).unacked, 0);

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
        assert!(matches!(err, MetricsError::Management(_)), "{err:?}");
    }

    #[test]
    fn a_404_from_the_declare_is_queue_not_found_whatever_management_says() {
        let stale = row(5, 0, 1);
        for management in [Ok(Some(&stale)), Ok(None), Err(management_down())] {
            let err = combine("jobs", "/", management, peek_404(), Utc::now()).unwrap_err();
            assert!(
                matches!(&err, MetricsError::QueueNotFound { queue, .. } if queue == "jobs"),
                "{err:?}"
            );
        }
    }
}
