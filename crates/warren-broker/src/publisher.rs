//! Confirmed publishing over a self-healing pool of confirm-mode channels.
//!
//! One connection carries `channels` confirm-mode channels. Concurrent
//! publishes are spread round-robin over them and never wait for each other:
//! lapin pipelines many unconfirmed publishes per channel and resolves each
//! [`lapin::PublisherConfirm`] when the broker's
//! `basic.ack`/`basic.nack` arrives. [`Publisher::publish`] returns only when
//! the broker has confirmed the message (persisted it, for a durable queue),
//! and fails — never hangs — on nack, return (unroutable), timeout, or when no
//! connection is up.
//!
//! A supervisor task owns the connection: it connects (with backoff),
//! declares the [`Topology`], opens the channels, and when the connection or
//! a channel dies it drops the session and reconnects. Publishes that were in
//! flight fail with an error; nothing is replayed behind the caller's back.
//!
//! The supervisor also follows RabbitMQ's `connection.blocked` /
//! `connection.unblocked` ([`Publisher::is_blocked`]): while a resource
//! alarm blocks the connection, nothing written to it is read, so callers
//! should refuse work at once instead of waiting for a confirm that cannot
//! come.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::audit::AuditSink;
use crate::connect::{Backoff, close_quietly, connect, redact_url};
use crate::topology::Topology;

/// How the publisher connects.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    pub amqp_url: String,
    /// Shown by RabbitMQ as the connection's name.
    pub connection_name: String,
    /// Confirm-mode channels in the pool.
    pub channels: usize,
    /// Longest wait for one publish's confirm.
    pub confirm_timeout: Duration,
    /// Longest wait for the TCP + AMQP handshake.
    pub connect_timeout: Duration,
    /// First and longest delay between reconnect attempts.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

impl PublisherConfig {
    pub fn new(amqp_url: impl Into<String>, connection_name: impl Into<String>) -> Self {
        Self {
            amqp_url: amqp_url.into(),
            connection_name: connection_name.into(),
            channels: 4,
            confirm_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
        }
    }
}

/// Why a publish did not succeed. Every variant means the message may not
/// be stored; the caller must tell its client so.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("not connected to RabbitMQ")]
    Unavailable,
    #[error("publish failed: {0}")]
    Broker(#[source] lapin::Error),
    #[error("the broker did not confirm the message within {0:?}")]
    Timeout(Duration),
    #[error("the broker refused the message (nack)")]
    Nacked,
    #[error("the message could not be routed to a queue: {0}")]
    Unroutable(String),
    /// RabbitMQ blocked the connection (resource alarm) before confirming:
    /// the message may still be stored once the alarm clears.
    #[error("RabbitMQ blocked the connection (memory or disk alarm)")]
    Blocked,
}

impl PublishError {
    /// A stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PublishError::Unavailable => "unavailable",
            PublishError::Broker(_) => "broker",
            PublishError::Timeout(_) => "timeout",
            PublishError::Nacked => "nacked",
            PublishError::Unroutable(_) => "unroutable",
            PublishError::Blocked => "blocked",
        }
    }
}

/// One live connection and its channels.
struct Session {
    connection: Connection,
    confirm_channels: Vec<Channel>,
    /// A plain (no-confirm) channel for best-effort audit events.
    audit_channel: Channel,
    broken: Notify,
}

/// A cloneable handle; all clones share one connection.
#[derive(Clone)]
pub struct Publisher {
    session: watch::Receiver<Option<Arc<Session>>>,
    blocked: watch::Receiver<bool>,
    next_channel: Arc<AtomicUsize>,
    confirm_timeout: Duration,
    connects: Arc<AtomicUsize>,
}

impl Publisher {
    /// Starts the supervisor; the returned handle is usable at once
    /// (publishes fail with [`PublishError::Unavailable`] until connected).
    /// The supervisor stops and closes the connection when `shutdown` fires.
    pub fn start(config: PublisherConfig, topology: Topology, shutdown: CancellationToken) -> Self {
        Self::start_supervisor(config, topology, None, shutdown)
    }

    /// [`Publisher::start`], and `audit` publishes on a plain channel of
    /// each session's connection (attached when the session is up, detached
    /// when it goes).
    pub fn start_with_audit(
        config: PublisherConfig,
        topology: Topology,
        audit: AuditSink,
        shutdown: CancellationToken,
    ) -> Self {
        Self::start_supervisor(config, topology, Some(audit), shutdown)
    }

    fn start_supervisor(
        config: PublisherConfig,
        topology: Topology,
        audit: Option<AuditSink>,
        shutdown: CancellationToken,
    ) -> Self {
        let (tx, rx) = watch::channel(None);
        let (blocked_tx, blocked) = watch::channel(false);
        let connects = Arc::new(AtomicUsize::new(0));
        let confirm_timeout = config.confirm_timeout;
        let states = SessionStates {
            session: tx,
            blocked: blocked_tx,
            audit,
        };
        tokio::spawn(supervise(
            config,
            topology,
            states,
            shutdown,
            connects.clone(),
        ));
        Self {
            session: rx,
            blocked,
            next_channel: Arc::new(AtomicUsize::new(0)),
            confirm_timeout,
            connects,
        }
    }

    /// True while a connection with its channels is up.
    pub fn is_connected(&self) -> bool {
        self.session.borrow().is_some()
    }

    /// True while RabbitMQ blocks the connection (`connection.blocked`: a
    /// memory or disk alarm). Publishing now would wait for nothing.
    pub fn is_blocked(&self) -> bool {
        *self.blocked.borrow()
    }

    /// A watch on the blocked state (see [`Publisher::is_blocked`]).
    pub fn blocked_watch(&self) -> watch::Receiver<bool> {
        self.blocked.clone()
    }

    /// How many times a session was established (1 after the first connect).
    pub fn connect_count(&self) -> usize {
        self.connects.load(Ordering::Relaxed)
    }

    /// A watch on the connection state, for readiness.
    pub fn connection_watch(&self) -> ConnectionWatch {
        ConnectionWatch(self.session.clone())
    }

    /// Waits until connected or `timeout` passes; returns whether connected.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut rx = self.session.clone();
        tokio::time::timeout(timeout, rx.wait_for(|s| s.is_some()))
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false)
    }

    /// Publishes `payload` with `mandatory` set and waits for the broker's
    /// confirm. `properties` should carry `delivery_mode = 2` for jobs.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let session = self
            .session
            .borrow()
            .clone()
            .ok_or(PublishError::Unavailable)?;
        let index = self.next_channel.fetch_add(1, Ordering::Relaxed);
        let channel = &session.confirm_channels[index % session.confirm_channels.len()];
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let publish_and_confirm = async {
            channel
                .basic_publish(
                    ShortString::from(exchange),
                    ShortString::from(routing_key),
                    options,
                    payload,
                    properties,
                )
                .await?
                .await
        };
        // RabbitMQ blocks a connection on the first publish after an alarm
        // and then reads nothing more from it: a confirm waited for on a
        // blocked connection would only end in a timeout.
        let mut blocked = self.blocked.clone();
        let until_blocked = blocked.wait_for(|blocked| *blocked);
        let confirmed = tokio::select! {
            confirmed = tokio::time::timeout(self.confirm_timeout, publish_and_confirm) => confirmed,
            Ok(_) = until_blocked => return Err(PublishError::Blocked),
        };
        let confirmation = match confirmed {
            Err(_) => return Err(PublishError::Timeout(self.confirm_timeout)),
            Ok(Err(err)) => {
                // A failed publish means the channel or connection is gone:
                // have the supervisor rebuild the session.
                session.broken.notify_one();
                return Err(PublishError::Broker(err));
            }
            Ok(Ok(confirmation)) => confirmation,
        };
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(PublishError::Unroutable(format!(
                "{} {}",
                returned.reply_code, returned.reply_text
            ))),
            Confirmation::Nack(_) => Err(PublishError::Nacked),
            // Only on a channel without confirm mode, which the pool never has.
            Confirmation::NotRequested => Err(PublishError::Nacked),
        }
    }
}

/// Follows the publisher's connection state.
pub struct ConnectionWatch(watch::Receiver<Option<Arc<Session>>>);

impl ConnectionWatch {
    /// Waits for the next change; returns whether connected afterwards
    /// (false, at once, when the publisher has stopped).
    pub async fn changed(&mut self) -> bool {
        if self.0.changed().await.is_err() {
            return false;
        }
        self.0.borrow_and_update().is_some()
    }
}

/// What the supervisor publishes to the handles.
struct SessionStates {
    session: watch::Sender<Option<Arc<Session>>>,
    blocked: watch::Sender<bool>,
    /// Gets each session's audit channel.
    audit: Option<AuditSink>,
}

impl SessionStates {
    fn up(&self, session: &Arc<Session>) {
        if let Some(audit) = &self.audit {
            audit.attach(session.audit_channel.clone());
        }
        self.blocked.send_replace(false);
        self.session.send_replace(Some(session.clone()));
    }

    fn down(&self) {
        if let Some(audit) = &self.audit {
            audit.detach();
        }
        self.session.send_replace(None);
        self.blocked.send_replace(false);
    }
}

async fn supervise(
    config: PublisherConfig,
    topology: Topology,
    state: SessionStates,
    shutdown: CancellationToken,
    connects: Arc<AtomicUsize>,
) {
    let mut backoff = Backoff::new(config.reconnect_min, config.reconnect_max);
    let url = redact_url(&config.amqp_url);
    loop {
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => break,
            attempt = tokio::time::timeout(config.connect_timeout * 3, open_session(&config, &topology)) => {
                attempt.unwrap_or(Err(SessionError::SetupTimeout(config.connect_timeout * 3)))
            }
        };
        match attempt {
            Ok(session) => {
                backoff.reset();
                connects.fetch_add(1, Ordering::Relaxed);
                tracing::info!(url = %url, channels = config.channels, "publisher connected");
                let session = Arc::new(session);
                state.up(&session);
                let stop = tokio::select! {
                    _ = shutdown.cancelled() => true,
                    reason = wait_until_broken(&session, &state.blocked) => {
                        tracing::warn!(url = %url, reason = %reason, "publisher lost its connection; reconnecting");
                        false
                    }
                };
                state.down();
                close_quietly(&session.connection).await;
                if stop {
                    return;
                }
            }
            Err(err) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %err, retry_in = ?delay, "publisher cannot connect");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    state.session.send_replace(None);
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Connect(#[from] crate::connect::ConnectError),
    #[error(transparent)]
    Topology(#[from] crate::topology::TopologyError),
    #[error("setting up the session took longer than {0:?}")]
    SetupTimeout(Duration),
    #[error("opening a channel: {0}")]
    Channel(#[source] lapin::Error),
}

async fn open_session(
    config: &PublisherConfig,
    topology: &Topology,
) -> Result<Session, SessionError> {
    let connection = connect(
        &config.amqp_url,
        &config.connection_name,
        config.connect_timeout,
    )
    .await?;
    let result = async {
        topology.declare(&connection).await?;
        let mut confirm_channels = Vec::with_capacity(config.channels.max(1));
        for _ in 0..config.channels.max(1) {
            let channel = connection
                .create_channel()
                .await
                .map_err(SessionError::Channel)?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(SessionError::Channel)?;
            confirm_channels.push(channel);
        }
        let audit_channel = connection
            .create_channel()
            .await
            .map_err(SessionError::Channel)?;
        Ok((confirm_channels, audit_channel))
    }
    .await;
    match result {
        Ok((confirm_channels, audit_channel)) => Ok(Session {
            connection,
            confirm_channels,
            audit_channel,
            broken: Notify::new(),
        }),
        Err(err) => {
            close_quietly(&connection).await;
            Err(err)
        }
    }
}

/// Resolves, with a reason, when the session can no longer publish;
/// meanwhile follows the connection's blocked state.
async fn wait_until_broken(session: &Session, blocked: &watch::Sender<bool>) -> String {
    let mut events = session.connection.events_listener();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(lapin::Event::Error(err)) => return format!("connection error: {err}"),
                Some(event) => {
                    if let Some(now) = crate::blocked::blocked_transition(&event, "publisher") {
                        blocked.send_replace(now);
                    }
                }
                None => return "connection closed".to_string(),
            },
            _ = session.broken.notified() => return "a publish failed".to_string(),
            _ = tick.tick() => {
                if !session.connection.status().connected() {
                    return "connection closed".to_string();
                }
                if session.confirm_channels.iter().any(|c| !c.status().connected()) {
                    return "a channel closed".to_string();
                }
                // The events above are the fast path; the status is the truth
                // (an event sent before this listener existed is not replayed).
                let now = session.connection.status().blocked();
                blocked.send_if_modified(|was| std::mem::replace(was, now) != now);
            }
        }
    }
}
