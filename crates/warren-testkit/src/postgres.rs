//! Private PostgreSQL clusters for tests: `initdb` + `postgres` from Debian's
//! packages, in a temporary directory, on a free loopback port. When run as
//! root the cluster runs as the `postgres` user (PostgreSQL refuses root).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, User, chown};

use crate::{TestkitError, free_port};

/// Where Debian installs PostgreSQL 15's programs (`WARREN_PG_BIN` overrides).
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn pg_bin(program: &str) -> PathBuf {
    let dir = std::env::var("WARREN_PG_BIN").unwrap_or_else(|_| PG_BIN.to_string());
    Path::new(&dir).join(program)
}

/// A private PostgreSQL cluster. Data survives [`PgNode::kill`] and
/// [`PgNode::start_again`]; the cluster is killed and removed on drop.
pub struct PgNode {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl PgNode {
    /// Creates a cluster (user `warren`, trust auth on loopback) and starts it.
    pub async fn start() -> Result<Self, TestkitError> {
        let dir = tempfile::Builder::new()
            .prefix("warren-pg-")
            .tempdir()
            .map_err(|source| TestkitError::Dir {
                path: std::env::temp_dir(),
                source,
            })?;
        let node = Self {
            port: free_port()?,
            dir,
            child: None,
        };
        node.own(node.dir.path())?;
        let output = node
            .command("initdb")
            .arg("-D")
            .arg(node.data())
            .args(["-U", "warren", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .map_err(|e| {
                TestkitError::Postgres(format!(
                    "cannot run {}: {e}; install Debian's postgresql",
                    pg_bin("initdb").display()
                ))
            })?;
        if !output.status.success() {
            return Err(TestkitError::Postgres(format!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        let mut node = node;
        node.start_again().await?;
        Ok(node)
    }

    /// `postgres://warren@127.0.0.1:PORT/postgres`
    pub fn url(&self) -> String {
        format!("postgres://warren@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Root runs PostgreSQL as `postgres`, which must own the directory.
    fn postgres_user() -> Option<User> {
        if nix::unistd::geteuid().is_root() {
            User::from_name("postgres").ok().flatten()
        } else {
            None
        }
    }

    fn own(&self, path: &Path) -> Result<(), TestkitError> {
        if let Some(user) = Self::postgres_user() {
            chown(path, Some(user.uid), Some(user.gid)).map_err(|source| TestkitError::Chown {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Ok(())
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(pg_bin(program));
        cmd.current_dir(self.dir.path()).stdin(Stdio::null());
        if let Some(user) = Self::postgres_user() {
            cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        cmd
    }

    /// Starts the server (again, after [`kill`](Self::kill)) and waits until it accepts connections.
    ///
    /// Backends killed with their postmaster can still be exiting (attached to
    /// the old shared memory) a moment after it: PostgreSQL then refuses to
    /// start ("pre-existing shared memory block ... is still in use"), and the
    /// start is tried again, for up to 10 s.
    pub async fn start_again(&mut self) -> Result<(), TestkitError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.start_once().await {
                Err(err)
                    if Instant::now() < deadline
                        && err.to_string().contains("pre-existing shared memory block") =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                done => return done,
            }
        }
    }

    async fn start_once(&mut self) -> Result<(), TestkitError> {
        let log_path = self.dir.path().join("server.log");
        let (log, log_err) = crate::log_file(&log_path)?;
        self.own(&log_path)?;
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ])
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .spawn()
            .map_err(|e| TestkitError::Postgres(format!("cannot start postgres: {e}")))?;
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(self.not_ready(&format!("postgres exited with {status}")));
            }
            let ready = Command::new(pg_bin("pg_isready"))
                .args([
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "warren",
                ])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(60) {
                return Err(self.not_ready("timed out after 60 s"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn not_ready(&self, why: &str) -> TestkitError {
        let log = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        TestkitError::Postgres(format!(
            "private PostgreSQL on port {} did not start ({why}); log tail:\n{}",
            self.port,
            tail.join("\n")
        ))
    }

    /// Kills the server and its backends (SIGKILL to the process group), as a crash would.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let group = Pid::from_raw(-(child.id() as i32));
            let _ = kill(group, Signal::SIGKILL);
            let _ = child.wait();
        }
        // The postmaster's pid file would make the next start wait.
        let _ = std::fs::remove_file(self.data().join("postmaster.pid"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_ok()
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs SQL through `psql` and returns its unaligned output.
    pub fn psql(&self, sql: &str) -> Result<String, TestkitError> {
        let output = Command::new("psql")
            .args([
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &self.url(),
                "-c",
                sql,
            ])
            .output()
            .map_err(|e| TestkitError::Postgres(format!("cannot run psql: {e}")))?;
        if !output.status.success() {
            return Err(TestkitError::Postgres(format!(
                "psql {sql:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }
}

impl Drop for PgNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let group = Pid::from_raw(-(child.id() as i32));
            let _ = kill(group, Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}
