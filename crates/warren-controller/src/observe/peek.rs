//! Instant ready and consumer counts through an AMQP passive `queue.declare`.
//!
//! The management API's counts lag up to `collect_statistics_interval`
//! (5 s by default, and 2–6 s measured even at 1 s). A passive declare asks
//! the queue itself: it answers with the ready count and the consumer count
//! as of now and changes nothing on the broker. The controller makes one per
//! scaler per tick (see [`crate::observe`] for how it is combined with the
//! management API).
//!
//! # Connections and channels
//!
//! [`QueuePeeker`] keeps ONE long-lived AMQP connection (named
//! `warren-controller`) and ONE long-lived channel per (AMQP URL,
//! credentials, vhost) — a pool keyed like [`crate::observe::management::QueueStatsHub`].
//! Every passive declare of that key goes on the shared channel; lapin
//! pipelines them (replies come back in order), so concurrent reconciles do
//! not wait for each other and a declare costs one frame pair on an open
//! channel. Both are opened lazily, on first use and again after they died
//! (broker restart, closed channel), under a per-key lock so a burst of
//! reconciles opens them once. A failed connect is remembered for
//! [`QueuePeeker::reconnect_backoff`] and handed to the callers of that
//! interval, so a broker that is down costs one attempt per interval, not
//! one per scaler. Keys unused for [`QueuePeeker::idle_ttl`] (e.g. rotated
//! credentials) are dropped and their connection closed.
//!
//! # Missing queues
//!
//! A passive declare of a queue that does not exist makes the broker close
//! the channel with `404 NOT_FOUND`; lapin then fails every declare still
//! pending on that channel with the same error, including those of queues
//! that do exist. So:
//! - a declare that fails on the shared channel is retried once on a
//!   private, short-lived channel, whose answer is final and concerns that
//!   queue only (unless the broker's 404 names the queue itself); the shared
//!   channel is reopened by the next caller;
//! - a queue last seen missing is declared on a private channel only, so a
//!   scaler pointing at a missing queue does not close the shared channel
//!   under the other scalers every tick. A successful declare clears it.
//!
//! Only the scaler whose queue is missing gets [`PeekError::QueueNotFound`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ErrorKind};
use warren_broker::connect::{ConnectError, connect, redact_url};

use crate::metrics::{AmqpOpenLabels, ControllerMetrics, ResultLabels};
use crate::observe::management::Credentials;

/// AMQP connection name of the controller (visible in the management UI).
pub const CONNECTION_NAME: &str = "warren-controller";

/// Queues remembered as missing per key; beyond this the set is cleared
/// (the names come from QueueScaler specs, so this is only a safety bound).
const MAX_MISSING: usize = 4096;

/// What a passive declare tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuePeek {
    /// Messages ready for delivery (not counting unacked ones).
    pub ready: u64,
    pub consumers: u64,
}

/// Why a passive declare failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeekError {
    #[error("invalid AMQP URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("{0}")]
    Connect(Arc<ConnectError>),
    #[error("cannot open a channel to {url}: {source}")]
    Channel {
        url: String,
        #[source]
        source: lapin::Error,
    },
    #[error("queue {queue:?} does not exist in vhost {vhost:?}")]
    QueueNotFound { queue: String, vhost: String },
    #[error("passive declare of {queue:?} failed: {source}")]
    Declare {
        queue: String,
        #[source]
        source: lapin::Error,
    },
    #[error("passive declare of {queue:?} timed out after {after:?}")]
    Timeout { queue: String, after: Duration },
}

impl PeekError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            PeekError::InvalidUrl { .. } => "invalid_url",
            PeekError::Connect(_) => "connect",
            PeekError::Channel { .. } => "channel",
            PeekError::QueueNotFound { .. } => "queue_not_found",
            PeekError::Declare { .. } => "declare",
            PeekError::Timeout { .. } => "timeout",
        }
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct PeekKey {
    url: String,
    credentials: Credentials,
    vhost: String,
}

/// The long-lived connection and shared channel of one key.
#[derive(Default)]
struct Session {
    connection: Option<Arc<Connection>>,
    channel: Option<Channel>,
    /// The last failed connect, handed out until `reconnect_backoff` passed.
    failed: Option<(Instant, PeekError)>,
}

/// Everything kept for one (URL, credentials, vhost).
struct Link {
    key: PeekKey,
    session: tokio::sync::Mutex<Session>,
    /// Queues whose last declare said 404: declared on private channels.
    missing: std::sync::Mutex<HashSet<String>>,
    last_used: std::sync::Mutex<Instant>,
}

impl Link {
    fn is_missing(&self, queue: &str) -> bool {
        lock(&self.missing).contains(queue)
    }

    fn set_missing(&self, queue: &str, missing: bool) {
        let mut set = lock(&self.missing);
        if missing {
            if set.len() >= MAX_MISSING {
                set.clear();
            }
            set.insert(queue.to_string());
        } else {
            set.remove(queue);
        }
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere; the data is still valid.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    shared_channels: AtomicU64,
    private_channels: AtomicU64,
    declares: AtomicU64,
}

/// Passive declares over pooled long-lived AMQP connections and channels.
pub struct QueuePeeker {
    timeout: Duration,
    reconnect_backoff: Duration,
    idle_ttl: Duration,
    links: std::sync::Mutex<HashMap<PeekKey, Arc<Link>>>,
    counters: Counters,
    metrics: Option<ControllerMetrics>,
}

impl QueuePeeker {
    /// `timeout` bounds one peek, connect and retry included (the broker
    /// timeout of the controller).
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            reconnect_backoff: timeout.min(Duration::from_secs(1)),
            idle_ttl: Duration::from_secs(600),
            links: Default::default(),
            counters: Counters::default(),
            metrics: None,
        }
    }

    pub fn with_metrics(mut self, metrics: ControllerMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// After a failed connect, callers get that failure without a new
    /// attempt for this long (default: the timeout, at most 1 s).
    pub fn reconnect_backoff(mut self, backoff: Duration) -> Self {
        self.reconnect_backoff = backoff;
        self
    }

    /// Connections of keys unused for this long are closed (default 10 min).
    pub fn idle_ttl(mut self, ttl: Duration) -> Self {
        self.idle_ttl = ttl;
        self
    }

    /// AMQP connections opened so far.
    pub fn connections_opened(&self) -> u64 {
        self.counters.connections.load(Ordering::Relaxed)
    }

    /// Channels opened so far (shared and private).
    pub fn channels_opened(&self) -> u64 {
        self.counters.shared_channels.load(Ordering::Relaxed)
            + self.counters.private_channels.load(Ordering::Relaxed)
    }

    /// Private (one-declare) channels opened so far: retries after a failure
    /// on the shared channel and declares of queues last seen missing.
    pub fn private_channels_opened(&self) -> u64 {
        self.counters.private_channels.load(Ordering::Relaxed)
    }

    /// `queue.declare` frames sent so far (a retry counts twice).
    pub fn declares_sent(&self) -> u64 {
        self.counters.declares.load(Ordering::Relaxed)
    }

    /// Whether the last declare of `queue` (with these URL, credentials and
    /// vhost) said it does not exist.
    pub fn is_known_missing(
        &self,
        amqp_url: &str,
        credentials: &Credentials,
        vhost: &str,
        queue: &str,
    ) -> bool {
        let key = PeekKey {
            url: amqp_url.to_string(),
            credentials: credentials.clone(),
            vhost: vhost.to_string(),
        };
        let link = lock(&self.links).get(&key).cloned();
        link.is_some_and(|link| link.is_missing(queue))
    }

    /// Ready and consumer counts of `queue` right now.
    pub async fn peek(
        &self,
        amqp_url: &str,
        credentials: &Credentials,
        vhost: &str,
        queue: &str,
    ) -> Result<QueuePeek, PeekError> {
        let timer = self
            .metrics
            .as_ref()
            .map(|m| m.broker_timer("passive_declare"));
        let result = match tokio::time::timeout(
            self.timeout,
            self.peek_untimed(amqp_url, credentials, vhost, queue),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(PeekError::Timeout {
                queue: queue.to_string(),
                after: self.timeout,
            }),
        };
        let label = result.as_ref().err().map(PeekError::metric_label);
        if let Some(timer) = timer {
            timer.finish(label);
        }
        if let Some(metrics) = &self.metrics {
            metrics
                .passive_declares
                .get_or_create(&ResultLabels {
                    result: label.unwrap_or("ok").to_string(),
                })
                .inc();
        }
        result
    }

    async fn peek_untimed(
        &self,
        amqp_url: &str,
        credentials: &Credentials,
        vhost: &str,
        queue: &str,
    ) -> Result<QueuePeek, PeekError> {
        let link = self.link(PeekKey {
            url: amqp_url.to_string(),
            credentials: credentials.clone(),
            vhost: vhost.to_string(),
        })?;
        if link.is_missing(queue) {
            return self.declare_privately(&link, queue).await;
        }
        let channel = self.shared_channel(&link).await?;
        match self.declare(&channel, queue).await {
            Ok(peek) => Ok(peek),
            // The broker's 404 names the queue: this one is missing (the
            // other declares pending on the channel get the same error).
            Err(source) if is_not_found(&source) && names_queue(&source, queue) => {
                link.set_missing(queue, true);
                Err(declare_error(vhost, queue, source))
            }
            Err(error) => {
                // Maybe another scaler's missing queue closed the shared
                // channel, maybe the connection died: ask again where only
                // this queue's answer counts (the shared channel and, if
                // needed, the connection are reopened on the way).
                tracing::debug!(
                    queue,
                    vhost,
                    error = %error,
                    "passive declare failed on the shared channel; retrying on a private one"
                );
                self.declare_privately(&link, queue).await
            }
        }
    }

    /// The key's link, created on first use; drops links idle for `idle_ttl`.
    fn link(&self, key: PeekKey) -> Result<Arc<Link>, PeekError> {
        let now = Instant::now();
        let mut links = lock(&self.links);
        links.retain(|_, link| now.duration_since(*lock(&link.last_used)) < self.idle_ttl);
        if let Some(link) = links.get(&key) {
            *lock(&link.last_used) = now;
            return Ok(link.clone());
        }
        // Refuse a bad URL before caching anything for it.
        amqp_uri(&key.url, &key.credentials, &key.vhost)?;
        let link = Arc::new(Link {
            key: key.clone(),
            session: Default::default(),
            missing: Default::default(),
            last_used: std::sync::Mutex::new(now),
        });
        links.insert(key, link.clone());
        Ok(link)
    }

    /// The key's shared channel, (re)opened if it is not open.
    async fn shared_channel(&self, link: &Link) -> Result<Channel, PeekError> {
        let mut session = link.session.lock().await;
        if let Some(channel) = &session.channel
            && channel.status().connected()
            && session
                .connection
                .as_ref()
                .is_some_and(|c| c.status().connected())
        {
            return Ok(channel.clone());
        }
        session.channel = None;
        let connection = self.connection(link, &mut session).await?;
        let channel = self
            .open_channel(&link.key, &mut session, &connection, "shared_channel")
            .await?;
        session.channel = Some(channel.clone());
        Ok(channel)
    }

    /// The key's connection, (re)connected if it is not open.
    async fn connection(
        &self,
        link: &Link,
        session: &mut Session,
    ) -> Result<Arc<Connection>, PeekError> {
        if let Some(connection) = &session.connection {
            if connection.status().connected() {
                return Ok(connection.clone());
            }
            session.connection = None;
            session.channel = None;
        }
        if let Some((at, error)) = &session.failed
            && at.elapsed() < self.reconnect_backoff
        {
            return Err(error.clone());
        }
        let key = &link.key;
        let uri = amqp_uri(&key.url, &key.credentials, &key.vhost)?;
        self.count_open(&self.counters.connections, "connection");
        // The URI renders back to a URL lapin parses into the same URI
        // (credentials and vhost percent-encoded).
        let connected = connect(&uri.to_string(), CONNECTION_NAME, self.timeout)
            .await
            .map(Arc::new)
            .map_err(|source| PeekError::Connect(Arc::new(source)));
        match connected {
            Ok(connection) => {
                tracing::debug!(url = %redact_url(&key.url), vhost = %key.vhost, "AMQP connection for passive declares opened");
                session.failed = None;
                session.connection = Some(connection.clone());
                Ok(connection)
            }
            Err(error) => {
                session.failed = Some((Instant::now(), error.clone()));
                Err(error)
            }
        }
    }

    /// Opens a channel; a failure forgets the connection (most likely it
    /// went bad; the next caller reconnects).
    async fn open_channel(
        &self,
        key: &PeekKey,
        session: &mut Session,
        connection: &Connection,
        what: &'static str,
    ) -> Result<Channel, PeekError> {
        let counter = if what == "shared_channel" {
            &self.counters.shared_channels
        } else {
            &self.counters.private_channels
        };
        self.count_open(counter, what);
        connection.create_channel().await.map_err(|source| {
            session.connection = None;
            session.channel = None;
            PeekError::Channel {
                url: redact_url(&key.url),
                source,
            }
        })
    }

    /// One declare on a channel of its own; the answer concerns `queue` only.
    async fn declare_privately(&self, link: &Link, queue: &str) -> Result<QueuePeek, PeekError> {
        let channel = {
            let mut session = link.session.lock().await;
            let connection = self.connection(link, &mut session).await?;
            self.open_channel(&link.key, &mut session, &connection, "private_channel")
                .await?
        };
        let result = self
            .declare(&channel, queue)
            .await
            .map_err(|source| declare_error(&link.key.vhost, queue, source));
        match &result {
            Ok(_) => link.set_missing(queue, false),
            Err(PeekError::QueueNotFound { .. }) => link.set_missing(queue, true),
            Err(_) => {}
        }
        // Dropping the last handle closes the channel (unless the broker
        // already closed it after a 404).
        drop(channel);
        result
    }

    async fn declare(&self, channel: &Channel, queue: &str) -> Result<QueuePeek, lapin::Error> {
        self.counters.declares.fetch_add(1, Ordering::Relaxed);
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(QueuePeek {
            ready: u64::from(declared.message_count()),
            consumers: u64::from(declared.consumer_count()),
        })
    }

    fn count_open(&self, counter: &AtomicU64, what: &'static str) {
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(metrics) = &self.metrics {
            metrics
                .amqp_opens
                .get_or_create(&AmqpOpenLabels {
                    what: what.to_string(),
                })
                .inc();
        }
    }
}

fn declare_error(vhost: &str, queue: &str, source: lapin::Error) -> PeekError {
    if is_not_found(&source) {
        PeekError::QueueNotFound {
            queue: queue.to_string(),
            vhost: vhost.to_string(),
        }
    } else {
        PeekError::Declare {
            queue: queue.to_string(),
            source,
        }
    }
}

/// Whether the broker's error text names `queue` (RabbitMQ: "NOT_FOUND -
/// no queue 'jobs' in vhost '/'"). Anything else counts as not ours.
fn names_queue(error: &lapin::Error, queue: &str) -> bool {
    match error.kind() {
        ErrorKind::ProtocolError(e) => e.get_message().as_str().contains(&format!("'{queue}'")),
        _ => false,
    }
}

fn is_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), ErrorKind::ProtocolError(e)
        if matches!(e.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

/// The spec's AMQP URL (no credentials, no vhost) completed with the
/// Secret's credentials and the scaler's vhost.
pub fn amqp_uri(url: &str, credentials: &Credentials, vhost: &str) -> Result<AMQPUri, PeekError> {
    let mut uri: AMQPUri = url
        .parse()
        .map_err(|reason: String| PeekError::InvalidUrl {
            url: redact_url(url),
            reason,
        })?;
    uri.authority.userinfo.username = credentials.username.clone();
    uri.authority.userinfo.password = credentials.password.clone();
    uri.vhost = vhost.to_string();
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_gets_credentials_and_vhost() {
        let creds = Credentials {
            username: "warren".into(),
            password: "p@ss/word".into(),
        };
        let uri = amqp_uri("amqp://warren-rabbitmq:5672", &creds, "/").unwrap();
        assert_eq!(uri.authority.host, "warren-rabbitmq");
        assert_eq!(uri.authority.port, 5672);
        assert_eq!(uri.authority.userinfo.password, "p@ss/word");
        assert_eq!(uri.vhost, "/");
    }

    #[test]
    fn a_404_is_ours_only_when_it_names_the_queue() {
        let not_found = |text: &str| -> lapin::Error {
            ErrorKind::ProtocolError(lapin::protocol::AMQPError::new(
                AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND),
                text.into(),
            ))
            .into()
        };
        let error = not_found("NOT_FOUND - no queue 'jobs' in vhost '/'");
        assert!(is_not_found(&error));
        assert!(names_queue(&error, "jobs"));
        assert!(!names_queue(&error, "job"));
        assert!(!names_queue(&error, "other"));
        assert_eq!(
            declare_error("/", "jobs", error).metric_label(),
            "queue_not_found"
        );
    }

    #[test]
    fn bad_url_is_an_error_without_password() {
        let creds = Credentials {
            username: "u".into(),
            password: "p".into(),
        };
        let err = amqp_uri("http://u:secret@x", &creds, "/").unwrap_err();
        assert_eq!(err.metric_label(), "invalid_url");
        assert!(!err.to_string().contains("secret"), "{err}");
    }
}
