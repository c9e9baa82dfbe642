//! Instant ready count through an AMQP passive `queue.declare`.
//!
//! The management API's counts lag up to `collect_statistics_interval`
//! (5 s by default). When a target sits at zero replicas, the controller
//! asks the queue itself: a passive declare answers with the ready count and
//! consumer count as of now, and changes nothing on the broker.
//!
//! One AMQP connection per (broker, user, vhost) is kept and reused; a
//! channel is opened per declare (a failed passive declare closes its
//! channel) and closed afterwards.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties, ErrorKind};

use crate::metrics::ControllerMetrics;
use crate::queue_stats::Credentials;

/// What a passive declare tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuePeek {
    /// Messages ready for delivery (not counting unacked ones).
    pub ready: u64,
    pub consumers: u64,
}

/// Why a passive declare failed.
#[derive(Debug, thiserror::Error)]
pub enum PeekError {
    #[error("invalid AMQP URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("cannot connect to {url}: {source}")]
    Connect {
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
            PeekError::Connect { .. } => "connect",
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

/// Passive declares over cached AMQP connections.
pub struct QueuePeeker {
    timeout: Duration,
    connections: tokio::sync::Mutex<HashMap<PeekKey, Arc<Connection>>>,
    metrics: Option<ControllerMetrics>,
}

impl QueuePeeker {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            connections: Default::default(),
            metrics: None,
        }
    }

    pub fn with_metrics(mut self, metrics: ControllerMetrics) -> Self {
        self.metrics = Some(metrics);
        self
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
        if let Some(timer) = timer {
            timer.finish(result.as_ref().err().map(PeekError::metric_label));
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
        let key = PeekKey {
            url: amqp_url.to_string(),
            credentials: credentials.clone(),
            vhost: vhost.to_string(),
        };
        let connection = self.connection(&key).await?;
        let channel = match connection.create_channel().await {
            Ok(channel) => channel,
            Err(source) => {
                // The cached connection went bad; forget it so the next call reconnects.
                self.connections.lock().await.remove(&key);
                return Err(PeekError::Connect {
                    url: redacted(amqp_url),
                    source,
                });
            }
        };
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(q) => {
                let _ = channel.close(200, "peeked".into()).await;
                Ok(QueuePeek {
                    ready: u64::from(q.message_count()),
                    consumers: u64::from(q.consumer_count()),
                })
            }
            Err(source) if is_not_found(&source) => Err(PeekError::QueueNotFound {
                queue: queue.to_string(),
                vhost: vhost.to_string(),
            }),
            Err(source) => Err(PeekError::Declare {
                queue: queue.to_string(),
                source,
            }),
        }
    }

    async fn connection(&self, key: &PeekKey) -> Result<Arc<Connection>, PeekError> {
        let mut connections = self.connections.lock().await;
        if let Some(existing) = connections.get(key) {
            if existing.status().connected() {
                return Ok(existing.clone());
            }
            connections.remove(key);
        }
        let uri = amqp_uri(&key.url, &key.credentials, &key.vhost)?;
        let properties =
            ConnectionProperties::default().with_connection_name("warren-controller".into());
        let connection = Connection::connect_uri(uri, properties)
            .await
            .map(Arc::new)
            .map_err(|source| PeekError::Connect {
                url: redacted(&key.url),
                source,
            })?;
        connections.insert(key.clone(), connection.clone());
        Ok(connection)
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
            url: redacted(url),
            reason,
        })?;
    uri.authority.userinfo.username = credentials.username.clone();
    uri.authority.userinfo.password = credentials.password.clone();
    uri.vhost = vhost.to_string();
    Ok(uri)
}

/// `url` with any password replaced, for messages.
fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
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
    fn bad_url_is_an_error_without_password() {
        let creds = Credentials {
            username: "u".into(),
            password: "p".into(),
        };
        let err = amqp_uri("http://x", &creds, "/").unwrap_err();
        assert_eq!(err.metric_label(), "invalid_url");
        assert_eq!(redacted("amqp://u:secret@h:1/"), "amqp://u:***@h:1/");
    }
}
