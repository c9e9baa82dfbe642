//! Queue observations: what a reconcile knows about its queue. The
//! [`QueueObserver`] trait (I/O at the edge, faked in tests) and
//! [`BrokerObserver`], the real one.
//!
//! # Every tick, two reads, combined
//!
//! For every scaler on every tick, [`BrokerObserver`] reads the credentials
//! Secret (cached) and then, concurrently:
//! - an AMQP passive `queue.declare` ([`peek::QueuePeeker`]): the **ready** and
//!   **consumer** counts as of now — exact, no statistics lag;
//! - the management API through the shared [`management::QueueStatsHub`]: **unacked**
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
//! what the reconciler makes of it is decided in one place,
//! [`crate::reconcile::unacked`].
//!
//! # Cost model
//!
//! - Management API: still ONE `GET /api/queues/{vhost}?columns=...` per
//!   (broker, credentials, vhost) per tick, shared by every scaler on it
//!   (coalesced by [`management::QueueStatsHub`]), independent of the number of scalers.
//! - AMQP: one passive declare per scaler per tick, i.e. one
//!   `queue.declare`/`declare-ok` frame pair (~100 bytes each way) on a
//!   channel that stays open, over one long-lived connection per
//!   (broker, credentials, vhost). No HTTP, no TCP or channel setup per
//!   read, no statistics database query on the broker: the queue process
//!   answers from its own state. 1000 scalers at a 1 s polling interval are
//!   1000 small frames per second on one connection.
//! - A declare that fails on the shared channel is retried once on a
//!   private channel (see [`peek`]). A queue last seen missing
//!   is not declared again while the management listing still lacks it;
//!   once listed (or with the management API down) it is declared on a
//!   private channel (open + declare + close). Extra cost only for broken
//!   scalers.

pub mod broker;
pub mod credentials;
pub mod management;
pub mod peek;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use kube::ResourceExt;
use warren_crd::{BrokerRef, Observation, QueueRef, QueueScaler};

pub use broker::{BrokerObserver, combine};
use credentials::{CredentialsError, SecretKeys};
use management::{ConnectionUnacked, StatsError};
use peek::PeekError;

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
pub enum ObserveError {
    #[error("{0}")]
    Credentials(Arc<CredentialsError>),
    #[error("{0}")]
    Management(Arc<StatsError>),
    #[error("{0}")]
    Peek(Arc<PeekError>),
    #[error("queue {queue:?} not found in vhost {vhost:?}")]
    QueueNotFound { queue: String, vhost: String },
    /// A failure made up by a test's fake observer.
    #[cfg(any(test, feature = "test-util"))]
    #[error("{0}")]
    Other(String),
}

impl ObserveError {
    /// Short, bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ObserveError::Credentials(e) => e.metric_label(),
            ObserveError::Management(e) => e.metric_label(),
            ObserveError::Peek(e) => e.metric_label(),
            ObserveError::QueueNotFound { .. } => "queue_not_found",
            #[cfg(any(test, feature = "test-util"))]
            ObserveError::Other(_) => "other",
        }
    }

    /// CamelCase reason for the `Ready=False` condition.
    pub fn condition_reason(&self) -> &'static str {
        match self {
            ObserveError::Credentials(_) => "CredentialsUnavailable",
            ObserveError::Management(e) if matches!(**e, StatsError::Unauthorized { .. }) => {
                "BrokerUnauthorized"
            }
            ObserveError::QueueNotFound { .. } => "QueueNotFound",
            ObserveError::Management(_) | ObserveError::Peek(_) => "BrokerUnavailable",
            #[cfg(any(test, feature = "test-util"))]
            ObserveError::Other(_) => "BrokerUnavailable",
        }
    }
}

impl From<CredentialsError> for ObserveError {
    fn from(value: CredentialsError) -> Self {
        ObserveError::Credentials(Arc::new(value))
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
pub trait QueueObserver: Send + Sync {
    /// The queue's depth, consumers and rates now.
    async fn observe(&self, target: &BrokerTarget) -> Result<QueueRead, ObserveError>;

    /// Unacked messages per client-named connection (worker pod) of the
    /// target's vhost.
    async fn connection_unacked(
        &self,
        target: &BrokerTarget,
    ) -> Result<ConnectionUnacked, ObserveError>;
}
