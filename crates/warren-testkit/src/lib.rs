//! Test support for warren: private RabbitMQ nodes, private PostgreSQL
//! clusters ([`PgNode`]), private Prometheus servers, private Kubernetes
//! control planes (`ControlPlane`, feature `control-plane`) and free ports.
//!
//! Tests that kill or restart a broker, or need the management API, start
//! their own [`RabbitNode`] and never touch the machine's shared broker.
//! A node lives in a temporary directory and is killed and removed on drop;
//! a test process killed before it can drop one takes its servers with it
//! ([`tied_command`]).

pub mod amqp;
#[cfg(feature = "control-plane")]
mod controlplane;
pub mod hostile;
mod postgres;
mod prometheus;
mod rabbit;

pub use amqp::{EventTap, ready_count};
#[cfg(feature = "control-plane")]
pub use controlplane::{
    CONTROL_PLANE_PORTS, CONTROLLER_RESOURCES, ControlPlane, LOCALCLUSTER_BIN_ENV,
    apiserver_requests, controller_requests_between, localcluster_bin,
};
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
    let span = u64::from(TEST_PORTS.end - TEST_PORTS.start);
    let seed = search_start();
    let mut last_error = None;
    for attempt in 0..span.min(512) {
        let port = TEST_PORTS.start + ((seed + attempt * 7_919) % span) as u16;
        match reserve(port) {
            Ok(()) => return Ok(port),
            Err(err) => last_error = Some(err),
        }
    }
    Err(TestkitError::Port(last_error.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::AddrInUse, "no free test port")
    })))
}

/// Where a search for free ports starts: different processes (pid, time) and
/// calls start from different places, then walk with a step coprime to the span.
pub(crate) fn search_start() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    u64::from(std::process::id())
        .wrapping_mul(2_654_435_761)
        .wrapping_add(u64::from(nanos))
        .wrapping_add(CALLS.fetch_add(1, Ordering::Relaxed).wrapping_mul(7_919))
}

/// Keeps `port` to this process until it exits: an exclusive lock on a file
/// named after the port, which every test process on the machine checks. A
/// free port is not enough: a private broker killed by its test frees its
/// port until it restarts, and another test must not take it meanwhile (its
/// own node would then answer the restarted one's clients).
fn reserve(port: u16) -> std::io::Result<()> {
    use std::sync::Mutex;
    static HELD: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());
    let lock = claim(port)?;
    HELD.lock()
        .map_err(|_| std::io::Error::other("port reservations poisoned"))?
        .push(lock);
    Ok(())
}

/// Takes `port` if it is free on loopback and on every interface (RabbitMQ
/// listens on both) and no other test process holds its reservation; it stays
/// reserved while the returned lock file is open (see [`reserve`]).
pub(crate) fn claim(port: u16) -> std::io::Result<std::fs::File> {
    let free = |host: &str| std::net::TcpListener::bind((host, port)).map(drop);
    free("127.0.0.1")?;
    free("0.0.0.0")?;
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
    Ok(file)
}

/// A command that runs `program` so that it dies with the thread that spawns
/// it (`setpriv --pdeathsig`: `signal`, e.g. `KILL` or `TERM`, when that
/// thread or the whole test process ends — even by SIGKILL, when no `Drop`
/// runs) and inherits no file descriptor but stdin, stdout and stderr (a test
/// run under `flock LOCK make test` must not leave a server holding the
/// lock's descriptor). Add the arguments, environment and stdio as usual.
///
/// The signal follows the *thread*: spawn from a thread that outlives the
/// server (a test's own thread, a runtime's worker or `block_on` thread), not
/// from a short-lived helper thread or `spawn_blocking`.
pub fn tied_command(program: impl AsRef<std::ffi::OsStr>, signal: &str) -> std::process::Command {
    // bash closes what it inherited above fd 2 (std opens its own descriptors
    // close-on-exec; the ones a shell or flock passed down are not), then
    // setpriv sets the parent-death signal and execs the program: one pid.
    const TIED: &str = r#"sig=$1; shift
for fd in /proc/$$/fd/*; do
  n=${fd##*/}
  if [ "$n" -gt 2 ]; then eval "exec $n>&-"; fi
done
exec setpriv --pdeathsig "$sig" -- "$@""#;
    let mut command = std::process::Command::new("bash");
    command
        .args(["-c", TIED, "tied", signal])
        .arg(program.as_ref());
    command
}

/// CPU seconds used so far by process `pid` ("self" for this process): the
/// sum of its threads' run time from `/proc/<pid>/task/*/schedstat`
/// (nanoseconds), else utime + stime of `/proc/<pid>/stat` (clock ticks).
/// `None` when the process is gone.
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        let runs: Vec<u64> = tasks
            .flatten()
            .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
            .filter_map(|stat| stat.split_whitespace().next()?.parse().ok())
            .collect();
        if !runs.is_empty() {
            return Some(runs.iter().sum::<u64>() as f64 / 1e9);
        }
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After "pid (comm)": state is field 3, utime 14, stime 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let ticks_per_second = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0);
    Some((utime + stime) / ticks_per_second)
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
    fn cpu_seconds_grow_with_work_and_are_none_for_a_gone_process() {
        let before = cpu_seconds("self").unwrap();
        // Spin until 50 ms of CPU time show (a loaded machine gives us a fraction
        // of a core), for at most 20 s of wall time.
        let mut x = 0u64;
        let started = std::time::Instant::now();
        let mut after = before;
        while after < before + 0.05 && started.elapsed() < std::time::Duration::from_secs(20) {
            for _ in 0..100_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
            after = cpu_seconds(&std::process::id().to_string()).unwrap();
        }
        std::hint::black_box(x);
        assert!(after >= before + 0.05, "{before} -> {after}");
        assert_eq!(cpu_seconds("999999999"), None);
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
