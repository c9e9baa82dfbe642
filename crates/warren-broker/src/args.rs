//! The broker settings every warren process shares, as clap arguments.

use crate::topology::QueueType;

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
}
