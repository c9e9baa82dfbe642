//! Test support for warren: private RabbitMQ nodes, private PostgreSQL
//! clusters ([`PgNode`]), private Prometheus servers and free ports.
//!
//! Tests that kill or restart a broker, or need the management API, start
//! their own [`RabbitNode`] and never touch the machine's shared broker.
//! A node lives in a temporary directory and is killed and removed on drop.

pub mod amqp;
pub mod hostile;
mod postgres;
mod prometheus;
mod rabbit;

pub use amqp::{EventTap, ready_count};
pub use postgres::PgNode;
pub use prometheus::{PROMETHEUS_BIN, PrometheusServer};
pub use rabbit::{RabbitNode, RabbitOptions, TestkitError};

/// The shared broker's AMQP URL for tests that only need a live broker
/// (`AMQP_URL` overrides the machine default).
pub fn shared_amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A server's log file opened for appending, twice (stdout and stderr).
pub(crate) fn log_file(
    path: &std::path::Path,
) -> Result<(std::fs::File, std::fs::File), TestkitError> {
    let fail = |source| TestkitError::Dir {
        path: path.to_path_buf(),
        source,
    };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(fail)?;
    let log_err = log.try_clone().map_err(fail)?;
    Ok((log, log_err))
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16, TestkitError> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(TestkitError::Port)?;
    let port = listener.local_addr().map_err(TestkitError::Port)?.port();
    Ok(port)
}

/// A name no other test run uses, for queues on a shared broker.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}
