//! The warren controller: watches `QueueScaler` resources, reads queue depth
//! from RabbitMQ and scales the target workload.
//!
//! - [`reconcile`]: the reconciler and the kube runtime `Controller`.
//! - [`source`]: where observations come from ([`source::MetricsSource`]),
//!   built on [`queue_stats`] (management API), [`queue_peek`] (AMQP passive
//!   declare) and [`credentials`] (Secrets).
//! - [`audit`]: `scaler.scaled` events on `warren.events`.
//! - [`deletion_cost`]: busy-aware scale-in.
//! - [`status`]: the status a reconcile writes.
//! - [`leader`]: Lease-based leader election; [`metrics`]: Prometheus metrics.

pub mod audit;
pub mod credentials;
pub mod deletion_cost;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod queue_peek;
pub mod queue_stats;
pub mod reconcile;
pub mod source;
pub mod status;

pub use error::Error;
