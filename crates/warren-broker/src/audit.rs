//! Audit events on the `warren.events` topic exchange.
//!
//! Emitting is a non-blocking `try_send` into a bounded buffer; a background
//! task publishes the events on a plain (no-confirm) channel. When the buffer
//! is full or no connection is up, the event is dropped and counted: an audit
//! event never blocks, slows or fails a job.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{SecondsFormat, Utc};
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use crate::topology::EVENTS_EXCHANGE;

/// One audit event: a routing key (`message.accepted`, …) and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    pub routing_key: String,
    pub body: Value,
}

impl AuditEvent {
    /// An event about job `id`, stamped now, with extra `fields`.
    pub fn job(routing_key: &str, id: &str, fields: Map<String, Value>) -> Self {
        let mut body = json!({
            "event": routing_key,
            "id": id,
            "at": Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
        });
        if let Some(object) = body.as_object_mut() {
            for (key, value) in fields {
                object.entry(key).or_insert(value);
            }
        }
        Self {
            routing_key: routing_key.to_string(),
            body,
        }
    }
}

/// The sending side. Cheap to clone.
#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<AuditEvent>,
    dropped: Arc<AtomicU64>,
    published: Arc<AtomicU64>,
}

impl AuditSink {
    /// Starts the publishing task. `channel` is asked for the current channel
    /// for every event (None while disconnected).
    pub fn spawn<F>(capacity: usize, channel: F) -> Self
    where
        F: Fn() -> Option<Channel> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<AuditEvent>(capacity.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let published = Arc::new(AtomicU64::new(0));
        let sink = Self {
            tx,
            dropped: dropped.clone(),
            published: published.clone(),
        };
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                let Some(channel) = channel() else {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let body = serde_json::to_vec(&event.body).unwrap_or_default();
                let properties = BasicProperties::default()
                    .with_content_type(ShortString::from("application/json"))
                    .with_delivery_mode(2);
                let result = channel
                    .basic_publish(
                        ShortString::from(EVENTS_EXCHANGE),
                        ShortString::from(event.routing_key.as_str()),
                        BasicPublishOptions::default(),
                        &body,
                        properties,
                    )
                    .await;
                match result {
                    Ok(_) => {
                        published.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(err) => {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(error = %err, "audit event dropped");
                    }
                }
            }
        });
        sink
    }

    /// Queues `event` for publishing; drops it (and counts it) when the
    /// buffer is full.
    pub fn emit(&self, event: AuditEvent) {
        if self.tx.try_send(event).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Events dropped so far (buffer full, disconnected, publish error).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Events handed to the broker so far.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_events_carry_id_time_and_fields_without_overriding() {
        let mut fields = Map::new();
        fields.insert("worker".into(), json!("pod-a"));
        fields.insert("id".into(), json!("spoofed"));
        let event = AuditEvent::job("message.processed", "abc", fields);
        assert_eq!(event.routing_key, "message.processed");
        assert_eq!(event.body["id"], "abc");
        assert_eq!(event.body["worker"], "pod-a");
        assert_eq!(event.body["event"], "message.processed");
        assert!(event.body["at"].as_str().unwrap().ends_with('Z'));
    }

    #[tokio::test]
    async fn emitting_never_blocks_when_disconnected_or_full() {
        let sink = AuditSink::spawn(2, || None);
        for i in 0..100 {
            sink.emit(AuditEvent::job(
                "message.accepted",
                &i.to_string(),
                Map::new(),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(sink.dropped(), 100);
        assert_eq!(sink.published(), 0);
    }
}
