//! The warren controller: watches `QueueScaler` resources, reads queue depth
//! from RabbitMQ and scales the target workload.
//!
//! - [`reconcile`]: the reconciler and the kube runtime `Controller`; one
//!   reconcile is observe → decide → apply → status, one module each.
//! - [`observe`]: queue observations, where they come from
//!   ([`observe::QueueObserver`]), built on [`observe::management`]
//!   (management API), [`observe::peek`] (AMQP passive declare) and
//!   [`observe::credentials`] (Secrets).
//! - [`audit`]: `scaler.scaled` events on `warren.events`.
//! - [`deletion_cost`]: busy-aware scale-in.
//! - [`leader`]: Lease-based leader election; [`metrics`]: the controller's
//!   own Prometheus metrics.

pub mod audit;
pub mod deletion_cost;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod observe;
pub mod reconcile;

pub use error::Error;
