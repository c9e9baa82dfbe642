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

/// Ports [`free_port`] hands out: below Linux's ephemeral range (32768–60999 by
/// default), so no outgoing connection of any process takes one as its source
/// port between a test choosing it and a server (re)binding it — a private
/// broker restarted after a crash gets its port back. Clear of the local
/// cluster's fixed ports (etcd 23790/23800, apiserver 6443, kubelet 10250).
const TEST_PORTS: std::ops::Range<u16> = 24_000..32_700;

/// A TCP port on 127.0.0.1 that was free a moment ago, from [`TEST_PORTS`].
pub fn free_port() -> Result<u16, TestkitError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let span = u64::from(TEST_PORTS.end - TEST_PORTS.start);
    // Different processes start from different places (pid, time), then walk
    // with a step coprime to the span.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let seed = u64::from(std::process::id())
        .wrapping_mul(2_654_435_761)
        .wrapping_add(u64::from(nanos))
        .wrapping_add(CALLS.fetch_add(1, Ordering::Relaxed).wrapping_mul(7_919));
    let mut last_error = None;
    for attempt in 0..span.min(512) {
        let port = TEST_PORTS.start + ((seed + attempt * 7_919) % span) as u16;
        // Free on loopback and on every interface (RabbitMQ listens on both).
        let free = |host: &str| std::net::TcpListener::bind((host, port)).map(drop);
        match free("127.0.0.1")
            .and_then(|()| free("0.0.0.0"))
            .and_then(|()| reserve(port))
        {
            Ok(()) => return Ok(port),
            Err(err) => last_error = Some(err),
        }
    }
    Err(TestkitError::Port(last_error.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::AddrInUse, "no free test port")
    })))
}

/// Keeps `port` to this process until it exits: an exclusive lock on a file
/// named after the port, which every test process on the machine checks. A
/// free port is not enough: a private broker killed by its test frees its
/// port until it restarts, and another test must not take it meanwhile (its
/// own node would then answer the restarted one's clients).
fn reserve(port: u16) -> std::io::Result<()> {
    use std::sync::Mutex;
    static HELD: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("warren-test-ports");
    std::fs::create_dir_all(&dir)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(port.to_string()))?;
    file.try_lock().map_err(|err| match err {
        std::fs::TryLockError::Error(err) => err,
        std::fs::TryLockError::WouldBlock => std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("port {port} is reserved by another test process"),
        ),
    })?;
    HELD.lock()
        .map_err(|_| std::io::Error::other("port reservations poisoned"))?
        .push(file);
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_below_the_ephemeral_range_and_bindable() {
        let ports: Vec<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        for port in &ports {
            assert!(TEST_PORTS.contains(port), "{port}");
            std::net::TcpListener::bind(("127.0.0.1", *port)).unwrap();
        }
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(
            distinct.len(),
            ports.len(),
            "never the same port twice: {ports:?}"
        );
    }

    #[test]
    fn a_handed_out_port_stays_reserved_against_other_processes() {
        let port = free_port().unwrap();
        let err = reserve(port).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
        // Another process (util-linux flock) cannot take the reservation either.
        let lock = std::env::temp_dir()
            .join("warren-test-ports")
            .join(port.to_string());
        let other = std::process::Command::new("flock")
            .args(["--nonblock", "--conflict-exit-code", "7"])
            .arg(&lock)
            .arg("true")
            .status()
            .unwrap();
        assert_eq!(
            other.code(),
            Some(7),
            "the lock on {} must be held",
            lock.display()
        );
    }
}
