//! RabbitMQ plumbing shared by warren's processes.
//!
//! - [`envelope`]: the versioned JSON body of every job.
//! - [`topology`]: the queues and exchanges warren declares, idempotently.
//! - [`connect`]: opening a named connection with a bounded wait.
//! - [`publisher`]: a self-healing pool of confirm-mode channels; a publish
//!   resolves only when the broker has confirmed it.
//! - [`blocked`]: RabbitMQ's `connection.blocked`/`unblocked` (resource alarms).
//! - [`audit`]: best-effort audit events on the `warren.events` exchange that
//!   never block or fail a job.
//! - [`events_log`]: reading the bounded audit log `warren.events.log` (a
//!   stream) live or from a point in time.

pub mod args;
pub mod audit;
pub mod blocked;
pub mod connect;
pub mod envelope;
pub mod events_log;
pub mod publisher;
pub mod topology;

pub use args::{BrokerArgs, EventsLogArgs};
pub use audit::{AuditEvent, AuditSink, Batching, JobEvent, events_in};
pub use blocked::blocked_transition;
pub use connect::{Backoff, ConnectError, close_quietly, connect, connect_uri, redact_url};
pub use envelope::{ENVELOPE_VERSION, Envelope, EnvelopeError, NewJob};
pub use publisher::{PublishError, Publisher, PublisherConfig};
pub use topology::{EventsLogRetention, EventsLogStatus, QueueType, Topology};
