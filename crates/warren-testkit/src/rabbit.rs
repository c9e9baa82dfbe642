use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, User, chown};

use crate::free_port;

/// Where the Debian package installs the real (unwrapped) scripts.
const RABBIT_BIN: &str = "/usr/lib/rabbitmq/bin";
/// The rabbitmq user's home holds the Erlang cookie the CLI tools need.
const RABBIT_HOME: &str = "/var/lib/rabbitmq";

#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    #[error("cannot find a free port: {0}")]
    Port(#[source] std::io::Error),
    #[error("cannot prepare the node directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot chown {path} to the rabbitmq user: {source}")]
    Chown {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error(
        "cannot start RabbitMQ ({RABBIT_BIN}/rabbitmq-server): {0}; install Debian's rabbitmq-server"
    )]
    Spawn(#[source] std::io::Error),
    #[error(
        "private RabbitMQ node {node} did not become ready within {waited:?}; log tail:\n{log}"
    )]
    NotReady {
        node: String,
        waited: Duration,
        log: String,
    },
    #[error("{0}")]
    Postgres(String),
    #[error("cannot start {program}: {source}; {hint}")]
    Program {
        program: String,
        hint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("private control plane: {0}")]
    ControlPlane(String),
    #[error("cannot signal RabbitMQ node {node}: {reason}")]
    Signal { node: String, reason: String },
}

/// How to start a private node.
#[derive(Debug, Clone)]
pub struct RabbitOptions {
    /// Enable the management plugin (HTTP API on `management_port`).
    pub management: bool,
    /// Enable the Prometheus plugin (`/metrics` on `prometheus_port`).
    pub prometheus: bool,
    /// `collect_statistics_interval` in milliseconds (RabbitMQ default: 5000).
    pub stats_interval_ms: u64,
    /// How long to wait for the node to accept AMQP connections.
    pub start_timeout: Duration,
    /// Serve the management and Prometheus HTTP APIs on every interface
    /// instead of 127.0.0.1 (AMQP always listens on every interface), so pods
    /// of the local cluster reach them through the node's bridge address.
    pub http_on_all_interfaces: bool,
}

impl Default for RabbitOptions {
    fn default() -> Self {
        Self {
            management: false,
            prometheus: false,
            stats_interval_ms: 5000,
            start_timeout: Duration::from_secs(90),
            http_on_all_interfaces: false,
        }
    }
}

/// A private RabbitMQ node in a temporary directory, on its own ports.
///
/// Data survives [`RabbitNode::kill`] / [`RabbitNode::stop`] and
/// [`RabbitNode::start_again`], like a broker restart; the directory is
/// removed and the node killed when the value is dropped.
pub struct RabbitNode {
    dir: tempfile::TempDir,
    node: String,
    amqp_port: u16,
    management_port: u16,
    prometheus_port: u16,
    dist_port: u16,
    options: RabbitOptions,
    child: Option<Child>,
}

impl RabbitNode {
    /// Starts a node and waits until it accepts AMQP connections.
    pub async fn start(options: RabbitOptions) -> Result<Self, TestkitError> {
        let dir = tempfile::Builder::new()
            .prefix("warren-rabbit-")
            .tempdir()
            .map_err(|source| TestkitError::Dir {
                path: std::env::temp_dir(),
                source,
            })?;
        let amqp_port = free_port()?;
        let management_port = free_port()?;
        let dist_port = free_port()?;
        let prometheus_port = free_port()?;
        let mut node = Self {
            // Unique, not just the port: a node of another test that had this port
            // may still be registered with epmd while it dies (duplicate_node_name).
            node: format!(
                "{}@localhost",
                crate::unique_name(&format!("warren-test-{amqp_port}"))
            ),
            dir,
            amqp_port,
            management_port,
            prometheus_port,
            dist_port,
            options,
            child: None,
        };
        node.write_files()?;
        node.start_again().await?;
        Ok(node)
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    pub fn amqp_port(&self) -> u16 {
        self.amqp_port
    }

    /// `http://127.0.0.1:PORT` (only serves when `management` was enabled).
    pub fn management_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.management_port)
    }

    /// `http://127.0.0.1:PORT` of the Prometheus plugin (only serves when
    /// `prometheus` was enabled): `/metrics`, `/metrics/detailed?family=…`.
    pub fn prometheus_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.prometheus_port)
    }

    pub fn node_name(&self) -> &str {
        &self.node
    }

    fn base(&self) -> &Path {
        self.dir.path()
    }

    fn write_files(&self) -> Result<(), TestkitError> {
        let base = self.base().to_path_buf();
        let write = |name: &str, content: String| -> Result<(), TestkitError> {
            let path = base.join(name);
            std::fs::write(&path, content).map_err(|source| TestkitError::Dir { path, source })
        };
        for sub in ["mnesia", "log"] {
            let path = base.join(sub);
            std::fs::create_dir_all(&path).map_err(|source| TestkitError::Dir { path, source })?;
        }
        let mut conf = format!(
            "listeners.tcp.default = {}\nloopback_users = none\ncollect_statistics_interval = {}\n",
            self.amqp_port, self.options.stats_interval_ms
        );
        let mut plugins = Vec::new();
        let http_ip = if self.options.http_on_all_interfaces {
            "0.0.0.0"
        } else {
            "127.0.0.1"
        };
        if self.options.management {
            conf.push_str(&format!(
                "management.tcp.port = {}\nmanagement.tcp.ip = {http_ip}\n",
                self.management_port
            ));
            plugins.push("rabbitmq_management");
        }
        if self.options.prometheus {
            conf.push_str(&format!(
                "prometheus.tcp.port = {}\nprometheus.tcp.ip = {http_ip}\n",
                self.prometheus_port
            ));
            plugins.push("rabbitmq_prometheus");
        }
        write("rabbitmq.conf", conf)?;
        write("enabled_plugins", format!("[{}].", plugins.join(",")))?;
        self.chown_to_rabbitmq()
    }

    /// When run as root, the node runs as the `rabbitmq` user and must own its files.
    fn chown_to_rabbitmq(&self) -> Result<(), TestkitError> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(());
        }
        let Ok(Some(user)) = User::from_name("rabbitmq") else {
            return Ok(());
        };
        let mut stack = vec![self.base().to_path_buf()];
        while let Some(path) = stack.pop() {
            chown(&path, Some(user.uid), Some(user.gid)).map_err(|source| TestkitError::Chown {
                path: path.clone(),
                source,
            })?;
            if path.is_dir() {
                let entries = std::fs::read_dir(&path).map_err(|source| TestkitError::Dir {
                    path: path.clone(),
                    source,
                })?;
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        }
        Ok(())
    }

    fn command(&self, program: &str) -> Command {
        self.configure(Command::new(Path::new(RABBIT_BIN).join(program)))
    }

    /// The node's environment, directory and user on `cmd`.
    fn configure(&self, mut cmd: Command) -> Command {
        let base = self.base();
        cmd.env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", base.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", base.join("log"))
            .env("RABBITMQ_CONFIG_FILE", base.join("rabbitmq.conf"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                base.join("enabled_plugins"),
            )
            .env("RABBITMQ_FEATURE_FLAGS_FILE", base.join("feature_flags"))
            .env("RABBITMQ_PID_FILE", base.join("rabbit.pid"))
            .env("HOME", RABBIT_HOME)
            .current_dir(base);
        if nix::unistd::geteuid().is_root()
            && let Ok(Some(user)) = User::from_name("rabbitmq")
        {
            cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        cmd
    }

    /// Starts the node (again, after [`kill`](Self::kill) or [`stop`](Self::stop))
    /// and waits until an AMQP connection succeeds.
    pub async fn start_again(&mut self) -> Result<(), TestkitError> {
        let log_path = self.base().join("server.log");
        let (log, log_err) = crate::log_file(&log_path)?;
        // TERM: the wrapper script traps it and stops the Erlang VM it started
        // (a SIGKILLed wrapper would leave the VM running).
        let child = self
            .configure(crate::tied_command(
                Path::new(RABBIT_BIN).join("rabbitmq-server"),
                "TERM",
            ))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .spawn()
            .map_err(TestkitError::Spawn)?;
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<(), TestkitError> {
        let started = Instant::now();
        let url = self.amqp_url();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(self.not_ready(started, &format!("server exited with {status}")));
            }
            let connect = lapin::Connection::connect(&url, lapin::ConnectionProperties::default());
            if let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(2), connect).await {
                let _ = conn.close(200, "testkit ready check".into()).await;
                if (!self.options.management || port_open(self.management_port).await)
                    && (!self.options.prometheus || port_open(self.prometheus_port).await)
                {
                    return Ok(());
                }
            }
            if started.elapsed() > self.options.start_timeout {
                return Err(self.not_ready(started, "timed out"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn not_ready(&self, started: Instant, why: &str) -> TestkitError {
        let mut log = format!("({why})\n");
        for name in ["server.log"] {
            if let Ok(text) = std::fs::read_to_string(self.base().join(name)) {
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                log.extend(tail.into_iter().rev().map(|l| format!("{l}\n")));
            }
        }
        TestkitError::NotReady {
            node: self.node.clone(),
            waited: started.elapsed(),
            log,
        }
    }

    /// The Erlang VM's pid, from the pid file the node writes at start.
    fn beam_pid(&self) -> Option<Pid> {
        let text = std::fs::read_to_string(self.base().join("rabbit.pid")).ok()?;
        text.trim().parse::<i32>().ok().map(Pid::from_raw)
    }

    fn signal_all(&mut self, signal: Signal) -> Result<(), TestkitError> {
        let mut signalled = false;
        if let Some(pid) = self.beam_pid() {
            signalled |= kill(pid, signal).is_ok();
        }
        if let Some(child) = self.child.as_ref() {
            // The wrapper script and everything it started share a process group.
            let group = Pid::from_raw(-(child.id() as i32));
            signalled |= kill(group, signal).is_ok();
        }
        if signalled {
            Ok(())
        } else {
            Err(TestkitError::Signal {
                node: self.node.clone(),
                reason: "no running process found".into(),
            })
        }
    }

    /// Kills the broker abruptly (SIGKILL), as a crash would. Waits until
    /// its AMQP port is closed.
    pub async fn kill(&mut self) -> Result<(), TestkitError> {
        self.signal_all(Signal::SIGKILL)?;
        self.reap().await;
        Ok(())
    }

    /// Stops the broker gracefully (SIGTERM) and waits for it to exit.
    pub async fn stop(&mut self) -> Result<(), TestkitError> {
        self.signal_all(Signal::SIGTERM)?;
        self.reap().await;
        Ok(())
    }

    async fn reap(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let port_closed = tokio::net::TcpStream::connect(("127.0.0.1", self.amqp_port))
                .await
                .is_err();
            let beam_gone = self.beam_pid().is_none_or(|pid| kill(pid, None).is_err());
            if (port_closed && beam_gone) || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(self.base().join("rabbit.pid"));
    }

    /// Bytes in the segment files of stream `queue` (vhost `/`) on disk: what a
    /// stream's `x-max-length-bytes` bounds. `None` when the stream has no directory.
    pub fn stream_segment_bytes(&self, queue: &str) -> Option<u64> {
        // The directory is `<vhost>_<queue>_<id>` with `/` and `.` turned into `_`.
        let escaped: String = queue
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let prefix = format!("__{escaped}_");
        let mnesia = self.base().join("mnesia");
        let mut total = None;
        for node_dir in std::fs::read_dir(&mnesia).ok()?.flatten() {
            let Ok(streams) = std::fs::read_dir(node_dir.path().join("stream")) else {
                continue;
            };
            for stream in streams.flatten() {
                if !stream.file_name().to_string_lossy().starts_with(&prefix) {
                    continue;
                }
                let Ok(files) = std::fs::read_dir(stream.path()) else {
                    continue;
                };
                let bytes: u64 = files
                    .flatten()
                    .filter(|f| f.path().extension().is_some_and(|e| e == "segment"))
                    .filter_map(|f| f.metadata().ok().map(|m| m.len()))
                    .sum();
                *total.get_or_insert(0) += bytes;
            }
        }
        total
    }

    /// The node's resource alarms (memory, disk) as RabbitMQ prints them:
    /// `[]` when there is none.
    pub fn alarms(&self) -> Result<String, TestkitError> {
        Ok(self
            .rabbitmqctl(&["eval", "rabbit_alarm:get_alarms()."])?
            .trim()
            .to_string())
    }

    /// Runs `rabbitmqctl` against this node (e.g. `["list_queues", "name", "messages"]`)
    /// and returns its standard output.
    pub fn rabbitmqctl(&self, args: &[&str]) -> Result<String, TestkitError> {
        let output = self
            .command("rabbitmqctl")
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .output()
            .map_err(TestkitError::Spawn)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

async fn port_open(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        let _ = self.signal_all(Signal::SIGKILL);
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Give the VM a moment to release files before the directory is removed.
        std::thread::sleep(Duration::from_millis(100));
    }
}
