//! The queues and exchanges warren uses, declared idempotently by whichever
//! process starts first.
//!
//! For each work queue `q`:
//! - `q`: durable; quorum by default (classic by config), dead-lettering to
//!   the exchange `warren.dlx` with routing key `q.dead`; quorum queues also
//!   get `x-delivery-limit` so a job that keeps crashing its workers is
//!   dead-lettered instead of looping forever.
//! - `q.dead`: the durable dead-letter queue, bound to `warren.dlx` with `q.dead`.
//!
//! Audit events (seed 004's `logs` queue): the durable topic exchange
//! `warren.events`, with the durable queue `warren.events.log` bound to `#`
//! so every event is kept until someone reads it.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

/// The dead-letter exchange.
pub const DEAD_LETTER_EXCHANGE: &str = "warren.dlx";
/// The audit events exchange (topic).
pub const EVENTS_EXCHANGE: &str = "warren.events";
/// The queue that keeps every audit event.
pub const EVENTS_LOG_QUEUE: &str = "warren.events.log";
/// Deliveries after which a quorum queue dead-letters a message.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 5;

/// The kind of work queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum QueueType {
    /// Replicated Raft queue; poison-message protection by delivery limit.
    #[default]
    Quorum,
    /// Single-node queue (no delivery limit).
    Classic,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

/// The name of `queue`'s dead-letter queue (also its dead-letter routing key).
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

/// The declare arguments of a work queue.
pub fn work_queue_arguments(queue: &str, queue_type: QueueType, delivery_limit: u32) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from(queue_type.as_str())),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(DEAD_LETTER_EXCHANGE)),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from(dead_letter_queue(queue).as_str())),
    );
    if queue_type == QueueType::Quorum {
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(delivery_limit)),
        );
    }
    args
}

/// Everything a process declares before it publishes or consumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Work queues (the default queue first).
    pub work_queues: Vec<String>,
    pub queue_type: QueueType,
    pub delivery_limit: u32,
}

impl Topology {
    pub fn new(work_queues: Vec<String>, queue_type: QueueType) -> Self {
        Self {
            work_queues,
            queue_type,
            delivery_limit: DEFAULT_DELIVERY_LIMIT,
        }
    }

    /// Declares the exchanges, work queues, dead-letter queues and the audit
    /// log queue. Idempotent: redeclaring with the same arguments is a no-op
    /// for RabbitMQ. A queue that exists with other arguments (say classic
    /// where quorum is configured) fails with PRECONDITION_FAILED, reported
    /// with the queue's name.
    pub async fn declare(&self, channel: &Channel) -> Result<(), TopologyError> {
        let durable_exchange = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .exchange_declare(
                ShortString::from(DEAD_LETTER_EXCHANGE),
                ExchangeKind::Direct,
                durable_exchange,
                FieldTable::default(),
            )
            .await
            .map_err(|source| TopologyError::at(DEAD_LETTER_EXCHANGE, source))?;
        channel
            .exchange_declare(
                ShortString::from(EVENTS_EXCHANGE),
                ExchangeKind::Topic,
                durable_exchange,
                FieldTable::default(),
            )
            .await
            .map_err(|source| TopologyError::at(EVENTS_EXCHANGE, source))?;
        channel
            .queue_declare(
                ShortString::from(EVENTS_LOG_QUEUE),
                durable_queue,
                FieldTable::default(),
            )
            .await
            .map_err(|source| TopologyError::at(EVENTS_LOG_QUEUE, source))?;
        channel
            .queue_bind(
                ShortString::from(EVENTS_LOG_QUEUE),
                ShortString::from(EVENTS_EXCHANGE),
                ShortString::from("#"),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|source| TopologyError::at(EVENTS_LOG_QUEUE, source))?;
        for queue in &self.work_queues {
            let dead = dead_letter_queue(queue);
            channel
                .queue_declare(
                    ShortString::from(dead.as_str()),
                    durable_queue,
                    FieldTable::default(),
                )
                .await
                .map_err(|source| TopologyError::at(&dead, source))?;
            channel
                .queue_bind(
                    ShortString::from(dead.as_str()),
                    ShortString::from(DEAD_LETTER_EXCHANGE),
                    ShortString::from(dead.as_str()),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|source| TopologyError::at(&dead, source))?;
            channel
                .queue_declare(
                    ShortString::from(queue.as_str()),
                    durable_queue,
                    work_queue_arguments(queue, self.queue_type, self.delivery_limit),
                )
                .await
                .map_err(|source| TopologyError::at(queue, source))?;
        }
        Ok(())
    }
}

/// A declaration the broker refused.
#[derive(Debug, thiserror::Error)]
#[error("declaring {name:?}: {source}")]
pub struct TopologyError {
    pub name: String,
    #[source]
    pub source: lapin::Error,
}

impl TopologyError {
    fn at(name: &str, source: lapin::Error) -> Self {
        Self {
            name: name.to_string(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(args: &'a FieldTable, key: &str) -> Option<&'a AMQPValue> {
        args.inner().get(&ShortString::from(key))
    }

    #[test]
    fn quorum_queue_arguments_dead_letter_and_limit_deliveries() {
        let args = work_queue_arguments("tasks", QueueType::Quorum, 5);
        assert_eq!(
            get(&args, "x-queue-type"),
            Some(&AMQPValue::LongString("quorum".into()))
        );
        assert_eq!(
            get(&args, "x-dead-letter-exchange"),
            Some(&AMQPValue::LongString("warren.dlx".into()))
        );
        assert_eq!(
            get(&args, "x-dead-letter-routing-key"),
            Some(&AMQPValue::LongString("tasks.dead".into()))
        );
        assert_eq!(
            get(&args, "x-delivery-limit"),
            Some(&AMQPValue::LongLongInt(5))
        );
    }

    #[test]
    fn classic_queues_have_no_delivery_limit() {
        let args = work_queue_arguments("sms", QueueType::Classic, 5);
        assert_eq!(
            get(&args, "x-queue-type"),
            Some(&AMQPValue::LongString("classic".into()))
        );
        assert_eq!(get(&args, "x-delivery-limit"), None);
    }
}
