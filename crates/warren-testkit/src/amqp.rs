//! AMQP helpers for tests: queue depth, and a tap on the audit events.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;

/// A test-side connection error, with the URL.
#[derive(Debug, thiserror::Error)]
#[error("AMQP test helper ({context}): {source}")]
pub struct AmqpError {
    pub context: String,
    #[source]
    pub source: lapin::Error,
}

fn ctx(context: &str) -> impl FnOnce(lapin::Error) -> AmqpError + '_ {
    move |source| AmqpError {
        context: context.to_string(),
        source,
    }
}

/// Ready messages in `queue` right now (passive declare: exact, no stats lag).
pub async fn ready_count(amqp_url: &str, queue: &str) -> Result<u32, AmqpError> {
    let connection = Connection::connect(amqp_url, ConnectionProperties::default())
        .await
        .map_err(ctx("connect"))?;
    let channel = connection.create_channel().await.map_err(ctx("channel"))?;
    let declared = channel
        .queue_declare(
            ShortString::from(queue),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(ctx("passive declare"))?;
    let _ = connection.close(200, "bye".into()).await;
    Ok(declared.message_count())
}

/// Publishes `count` messages (`job`) to `queue` through the default exchange and
/// waits for each confirm: when this returns, the broker holds them all.
pub async fn publish_confirmed(
    channel: &Channel,
    queue: &str,
    count: usize,
) -> Result<(), AmqpError> {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(ctx("confirm select"))?;
    for _ in 0..count {
        channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                b"job",
                BasicProperties::default(),
            )
            .await
            .map_err(ctx("publish"))?
            .await
            .map_err(ctx("publish confirm"))?;
    }
    Ok(())
}

/// Audit events received by a private exclusive queue bound to `warren.events`.
///
/// Every test binds its own queue, so parallel tests on a shared broker each
/// see every event and filter by the job ids they know.
pub struct EventTap {
    events: Arc<Mutex<Vec<Value>>>,
    _connection: Connection,
}

impl EventTap {
    /// Binds to `warren.events` with `pattern` (e.g. `#`, `message.*`).
    /// The exchange must exist (declare the topology first).
    pub async fn bind(amqp_url: &str, pattern: &str) -> Result<Self, AmqpError> {
        let connection = Connection::connect(amqp_url, ConnectionProperties::default())
            .await
            .map_err(ctx("connect"))?;
        let channel = connection.create_channel().await.map_err(ctx("channel"))?;
        let queue = channel
            .queue_declare(
                ShortString::from(""),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(ctx("declare tap queue"))?;
        channel
            .queue_bind(
                queue.name().clone(),
                ShortString::from("warren.events"),
                ShortString::from(pattern),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(ctx("bind tap queue to warren.events"))?;
        let mut consumer = channel
            .basic_consume(
                queue.name().clone(),
                ShortString::from("event-tap"),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(ctx("consume tap queue"))?;
        let events: Arc<Mutex<Vec<Value>>> = Arc::default();
        let sink = events.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                if let Ok(value) = serde_json::from_slice::<Value>(&delivery.data)
                    && let Ok(mut guard) = sink.lock()
                {
                    // A batch (warren_broker::audit) carries its events in `batch`.
                    match value.get("batch").and_then(Value::as_array) {
                        Some(events) => guard.extend(events.iter().cloned()),
                        None => guard.push(value),
                    }
                }
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            }
        });
        Ok(Self {
            events,
            _connection: connection,
        })
    }

    /// Every event so far (the events of a batch one by one).
    pub fn all(&self) -> Vec<Value> {
        self.events.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// Events of kind `event` (e.g. `message.processed`).
    pub fn of(&self, event: &str) -> Vec<Value> {
        self.all()
            .into_iter()
            .filter(|e| e["event"] == event)
            .collect()
    }

    /// `message.processed` events per job id.
    pub fn processed_by_id(&self) -> HashMap<String, Vec<Value>> {
        let mut by_id: HashMap<String, Vec<Value>> = HashMap::new();
        for event in self.of("message.processed") {
            let id = event["id"].as_str().unwrap_or_default().to_string();
            by_id.entry(id).or_default().push(event);
        }
        by_id
    }

    /// Waits until `done(events)` holds or `timeout` passes; returns whether it held.
    pub async fn wait_until(&self, timeout: Duration, done: impl Fn(&[Value]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.all()) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}
