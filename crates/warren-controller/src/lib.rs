//! The warren controller: watches `QueueScaler` resources, reads queue depth
//! from RabbitMQ and scales the target workload.

pub mod credentials;
pub mod deletion_cost;
pub mod leader;
pub mod metrics;
pub mod queue_peek;
pub mod queue_stats;
