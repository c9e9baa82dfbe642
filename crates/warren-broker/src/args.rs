//! The broker settings every warren process shares, as clap arguments.

use crate::topology::{
    DEFAULT_EVENTS_MAX_AGE, DEFAULT_EVENTS_MAX_BYTES, EventsLogRetention, QueueType, parse_max_age,
};

/// Where RabbitMQ is and which work queue to use. Flattened into the
/// sender's and the worker's arguments so both read the same variables.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// RabbitMQ AMQP URL (vhost URL-encoded: %2f is "/").
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// The work queue: where `POST /send` publishes, what the worker consumes.
    #[arg(long, env = "WARREN_QUEUE", default_value = "tasks")]
    pub queue: String,
    /// Type of the work queues, when this process declares them first.
    #[arg(long, env = "WARREN_QUEUE_TYPE", value_enum, default_value_t = QueueType::Quorum)]
    pub queue_type: QueueType,
    #[command(flatten)]
    pub events_log: EventsLogArgs,
}

impl BrokerArgs {
    /// The work queue first, then `more` (WARREN_QUEUES of the sender and of
    /// the worker), each once, blank entries ignored: the queues a sender
    /// publishes to, the queues a worker consumes.
    pub fn queues_with(&self, more: &[String]) -> Vec<String> {
        let mut queues = vec![self.queue.clone()];
        for queue in more {
            let queue = queue.trim();
            if !queue.is_empty() && !queues.iter().any(|q| q == queue) {
                queues.push(queue.to_string());
            }
        }
        queues
    }
}

/// Retention of the audit events log `warren.events.log` (a RabbitMQ stream),
/// applied by whichever process declares it first. Flattened into the
/// sender's, the worker's and the controller's arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct EventsLogArgs {
    /// Events older than this leave the log: a number and a unit, Y, M, D, h, m or s.
    #[arg(long, env = "WARREN_EVENTS_MAX_AGE", default_value = DEFAULT_EVENTS_MAX_AGE, value_parser = parse_max_age)]
    pub events_max_age: String,
    /// The log's size bound in bytes (its on-disk segments); the oldest events leave first.
    #[arg(
        long,
        env = "WARREN_EVENTS_MAX_BYTES",
        default_value_t = DEFAULT_EVENTS_MAX_BYTES,
        value_parser = clap::value_parser!(u64).range(65_536..)
    )]
    pub events_max_bytes: u64,
}

impl EventsLogArgs {
    pub fn retention(&self) -> EventsLogRetention {
        EventsLogRetention {
            max_age: self.events_max_age.clone(),
            max_bytes: self.events_max_bytes,
        }
    }
}
