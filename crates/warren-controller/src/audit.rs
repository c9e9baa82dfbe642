//! `scaler.scaled` audit events on the `warren.events` exchange of the
//! scaler's broker.
//!
//! [`ScaleAudit`] is the edge the reconciler talks to (faked in tests);
//! [`BrokerAudit`] publishes through [`warren_broker::AuditSink`] over one
//! lazily-opened AMQP connection per (broker URL, user, vhost). Publishing
//! never blocks or fails a reconcile: [`ScaleAudit::publish`] returns at
//! once, the connection is opened in the background (at most one attempt
//! per [`RECONNECT_PAUSE`] after a failure), and an event that cannot be
//! delivered is dropped and counted in `warren_controller_audit_events_dropped`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use lapin::{Channel, Connection};
use serde_json::{Map, Value, json};
use warren_broker::{AuditEvent, AuditSink, EventsLogRetention, QueueType, Topology};

use crate::metrics::ControllerMetrics;
use crate::observe::BrokerTarget;
use crate::observe::credentials::CredentialsCache;
use crate::observe::management::Credentials;
use crate::observe::peek::amqp_uri;

/// Routing key (and `event` field) of a scale audit event.
pub const SCALED_ROUTING_KEY: &str = "scaler.scaled";
/// Pause between connection attempts to a broker that refused one.
pub const RECONNECT_PAUSE: Duration = Duration::from_secs(10);
/// Events buffered per broker while its connection opens.
const BUFFER: usize = 256;

/// What a scale changed, for the audit event.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleRecord {
    /// `namespace/name` of the QueueScaler.
    pub namespace: String,
    pub scaler: String,
    /// `Deployment` or `StatefulSet`.
    pub target_kind: String,
    pub target_name: String,
    pub from: i32,
    pub to: i32,
    /// Decision reason label (`Backlog`, `QueueEmpty`, ...).
    pub reason: String,
    /// Human-readable explanation of the decision.
    pub message: String,
    pub at: DateTime<Utc>,
}

impl ScaleRecord {
    /// The `scaler.scaled` event: `{event, id, at, namespace, scaler, target,
    /// queue, vhost, from, to, direction, reason, message}`.
    pub fn audit_event(&self, target: &BrokerTarget) -> AuditEvent {
        let mut fields = Map::new();
        fields.insert("namespace".into(), json!(self.namespace));
        fields.insert("scaler".into(), json!(self.scaler));
        fields.insert(
            "target".into(),
            json!({"kind": self.target_kind, "name": self.target_name}),
        );
        fields.insert("queue".into(), json!(target.queue.summary()));
        fields.insert("vhost".into(), json!(target.queue.vhost));
        fields.insert("from".into(), json!(self.from));
        fields.insert("to".into(), json!(self.to));
        fields.insert(
            "direction".into(),
            json!(if self.to > self.from { "up" } else { "down" }),
        );
        fields.insert("reason".into(), json!(self.reason));
        fields.insert("message".into(), json!(self.message));
        let mut event = AuditEvent::job(
            SCALED_ROUTING_KEY,
            &uuid::Uuid::new_v4().to_string(),
            fields,
        );
        // The decision time, not the time the event object was built.
        event.body["at"] = Value::String(self.at.to_rfc3339_opts(SecondsFormat::Millis, true));
        event
    }
}

/// Publishes scale audit events. Must return at once and never fail.
pub trait ScaleAudit: Send + Sync {
    fn publish(&self, target: &BrokerTarget, record: &ScaleRecord);
}

/// Drops every event (audit disabled).
pub struct NoAudit;

impl ScaleAudit for NoAudit {
    fn publish(&self, _target: &BrokerTarget, _record: &ScaleRecord) {}
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct LinkKey {
    url: String,
    credentials: Credentials,
    vhost: String,
}

/// One broker's audit connection and its buffered sink (which holds the
/// connection's channel).
struct AuditLink {
    connection: tokio::sync::Mutex<LinkState>,
    sink: AuditSink,
}

#[derive(Default)]
struct LinkState {
    connection: Option<Connection>,
    last_failure: Option<Instant>,
}

/// The real [`ScaleAudit`]: AMQP to each scaler's broker.
pub struct BrokerAudit {
    credentials: Arc<CredentialsCache>,
    timeout: Duration,
    metrics: ControllerMetrics,
    links: Arc<Links>,
    events_log: Arc<EventsLogRetention>,
}

#[derive(Default)]
struct Links {
    by_key: Mutex<HashMap<LinkKey, Arc<AuditLink>>>,
    /// Sum of the sinks' drop counters already added to the metric.
    dropped_reported: Mutex<u64>,
}

impl BrokerAudit {
    pub fn new(
        credentials: Arc<CredentialsCache>,
        timeout: Duration,
        metrics: ControllerMetrics,
    ) -> Self {
        Self {
            credentials,
            timeout,
            metrics,
            links: Arc::default(),
            events_log: Arc::default(),
        }
    }

    /// The retention `warren.events.log` gets when the controller declares it first.
    pub fn with_events_log(mut self, retention: EventsLogRetention) -> Self {
        self.events_log = Arc::new(retention);
        self
    }
}

impl Links {
    fn link(&self, key: &LinkKey) -> Arc<AuditLink> {
        let mut links = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        links
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(AuditLink {
                    connection: tokio::sync::Mutex::default(),
                    sink: AuditSink::spawn(BUFFER),
                })
            })
            .clone()
    }

    /// Adds the sinks' new drops to the metric.
    fn report_dropped(&self, metrics: &ControllerMetrics) {
        let total: u64 = {
            let links = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
            links.values().map(|l| l.sink.dropped()).sum()
        };
        let mut reported = self
            .dropped_reported
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if total > *reported {
            metrics.audit_events_dropped.inc_by(total - *reported);
            *reported = total;
        }
    }
}

impl AuditLink {
    /// Opens the connection and channel (and declares the audit exchange)
    /// unless they are up, or a recent attempt failed.
    async fn ensure_connected(
        &self,
        key: &LinkKey,
        timeout: Duration,
        events_log: &EventsLogRetention,
    ) {
        let mut state = self.connection.lock().await;
        if self.sink.is_attached() {
            return;
        }
        if state
            .last_failure
            .is_some_and(|at| at.elapsed() < RECONNECT_PAUSE)
        {
            return;
        }
        match tokio::time::timeout(timeout, open(key, timeout, events_log)).await {
            Ok(Ok((connection, channel))) => {
                self.sink.attach(channel);
                state.connection = Some(connection);
                state.last_failure = None;
            }
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "cannot open the audit connection; scale events are dropped");
                state.last_failure = Some(Instant::now());
            }
            Err(_) => {
                tracing::warn!(after = ?timeout, "opening the audit connection timed out; scale events are dropped");
                state.last_failure = Some(Instant::now());
            }
        }
    }
}

async fn open(
    key: &LinkKey,
    timeout: Duration,
    events_log: &EventsLogRetention,
) -> Result<(Connection, Channel), String> {
    let uri = amqp_uri(&key.url, &key.credentials, &key.vhost).map_err(|e| e.to_string())?;
    let connection = warren_broker::connect_uri(uri, "warren-controller-audit", timeout)
        .await
        .map_err(|e| e.to_string())?;
    // The exchange may not exist yet if the controller talks to the broker
    // before the sender or a worker does; declaring is idempotent.
    Topology::new(Vec::new(), QueueType::Quorum)
        .with_events_log(events_log.clone())
        .declare(&connection)
        .await
        .map_err(|e| e.to_string())?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| format!("cannot open a channel on {}: {e}", key.url))?;
    Ok((connection, channel))
}

impl ScaleAudit for BrokerAudit {
    fn publish(&self, target: &BrokerTarget, record: &ScaleRecord) {
        let event = record.audit_event(target);
        let credentials = self.credentials.clone();
        let keys = target.secret_keys();
        let url = target.broker.amqp_url.clone();
        let vhost = target.queue.vhost.clone();
        let timeout = self.timeout;
        let metrics = self.metrics.clone();
        let links = self.links.clone();
        let events_log = self.events_log.clone();
        tokio::spawn(async move {
            let credentials = match credentials.get(&keys).await {
                Ok(c) => c,
                Err(err) => {
                    tracing::warn!(error = %err, "no credentials for the audit connection; scale event dropped");
                    metrics.audit_events_dropped.inc();
                    return;
                }
            };
            let key = LinkKey {
                url,
                credentials,
                vhost,
            };
            let link = links.link(&key);
            link.ensure_connected(&key, timeout, &events_log).await;
            link.sink.emit(event);
            // The sink publishes in the background; give it a moment, then
            // mirror its drop counter into the metric.
            tokio::time::sleep(Duration::from_millis(200)).await;
            links.report_dropped(&metrics);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_crd::{BrokerRef, CredentialsSecretRef, QueueRef};

    #[test]
    fn scaled_event_carries_the_decision_and_its_time() {
        let target = BrokerTarget {
            namespace: "ns".into(),
            broker: BrokerRef {
                management_url: "http://rabbit:15672".into(),
                amqp_url: "amqp://rabbit:5672".into(),
                credentials_secret_ref: CredentialsSecretRef {
                    name: "s".into(),
                    username_key: "username".into(),
                    password_key: "password".into(),
                },
            },
            queue: QueueRef::single("jobs", "/"),
        };
        let at = DateTime::parse_from_rfc3339("2025-01-02T03:04:05.678Z")
            .unwrap()
            .with_timezone(&Utc);
        let record = ScaleRecord {
            namespace: "ns".into(),
            scaler: "jobs".into(),
            target_kind: "Deployment".into(),
            target_name: "worker".into(),
            from: 4,
            to: 1,
            reason: "QueueEmpty".into(),
            message: "the queue is empty".into(),
            at,
        };
        let event = record.audit_event(&target);
        assert_eq!(event.routing_key, "scaler.scaled");
        let body = &event.body;
        assert_eq!(body["event"], "scaler.scaled");
        assert_eq!(body["at"], "2025-01-02T03:04:05.678Z");
        assert_eq!(body["direction"], "down");
        assert_eq!(
            body["target"],
            json!({"kind": "Deployment", "name": "worker"})
        );
        assert_eq!(
            (body["from"].as_i64(), body["to"].as_i64()),
            (Some(4), Some(1))
        );
        assert_eq!(body["queue"], "jobs");
        assert_eq!(body["vhost"], "/");
        let id = body["id"].as_str().unwrap();
        assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
        assert_ne!(record.audit_event(&target).body["id"], body["id"]);
    }
}
