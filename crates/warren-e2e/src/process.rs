//! A warren binary running as a child process, with its log file and its
//! ops port (`/healthz`, `/readyz`, `/metrics`).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::{HarnessError, MetricsText, http_client};

/// Memory of a process, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryUsage {
    /// Resident set size now (VmRSS), KiB.
    pub rss_kib: u64,
    /// Peak resident set size (VmHWM), KiB.
    pub peak_kib: u64,
}

/// A child process started by the harness. Killed (SIGKILL) on drop.
pub struct Process {
    pub name: String,
    pub listen_addr: SocketAddr,
    pub log: PathBuf,
    child: Child,
    pid: u32,
    exit: Option<ExitStatus>,
    http: reqwest::Client,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("name", &self.name)
            .field("pid", &self.pid)
            .field("listen_addr", &self.listen_addr)
            .finish()
    }
}

impl Process {
    /// Starts `program` with `env` added to the inherited environment,
    /// `WARREN_LISTEN_ADDR` set to a free local port and both output streams
    /// appended to `<log_dir>/<name>.log`.
    pub fn spawn(
        program: &Path,
        name: &str,
        env: &[(OsString, OsString)],
        log_dir: &Path,
    ) -> Result<Self, HarnessError> {
        let io = |context: String| move |source| HarnessError::Io { context, source };
        std::fs::create_dir_all(log_dir).map_err(io(format!("creating {}", log_dir.display())))?;
        let port = warren_testkit::free_port()?;
        let listen_addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io(format!("opening {}", log.display())))?;
        let stderr = file
            .try_clone()
            .map_err(io(format!("opening {}", log.display())))?;
        let mut command = Command::new(program);
        command
            // Never let an in-cluster environment or a developer's settings leak in.
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .env_remove("RUST_LOG")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("WARREN_LISTEN_ADDR", listen_addr.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        let child = command
            .spawn()
            .map_err(io(format!("starting {}", program.display())))?;
        let pid = child.id().unwrap_or_default();
        Ok(Self {
            name: name.to_string(),
            listen_addr,
            log,
            child,
            pid,
            exit: None,
            http: http_client()?,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `http://<listen_addr>`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.listen_addr)
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) -> Result<(), HarnessError> {
        kill(Pid::from_raw(self.pid as i32), signal)
            .map_err(|err| HarnessError::Other(format!("{signal} to {}: {err}", self.name)))
    }

    /// Whether the process has exited (and how), without waiting.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Waits up to `timeout` for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exit.is_none()
            && let Ok(Ok(status)) = tokio::time::timeout(timeout, self.child.wait()).await
        {
            self.exit = Some(status);
        }
        self.exit
    }

    /// GET `path` on the ops port: (status, body).
    pub async fn get(&self, path: &str) -> Result<(u16, String), HarnessError> {
        let url = format!("{}{path}", self.base_url());
        let http = |source| HarnessError::Http {
            context: format!("GET {url}"),
            source,
        };
        let response = self.http.get(&url).send().await.map_err(http)?;
        let status = response.status().as_u16();
        let body = response.text().await.map_err(http)?;
        Ok((status, body))
    }

    /// Waits until GET `path` answers 200; fails early if the process exits.
    pub async fn wait_http_ok(
        &mut self,
        path: &str,
        timeout: Duration,
    ) -> Result<(), HarnessError> {
        let started = Instant::now();
        loop {
            if let Ok((200, _)) = self.get(path).await {
                return Ok(());
            }
            if let Some(status) = self.try_exit() {
                return Err(HarnessError::Other(format!(
                    "{} exited ({status}) before {path} answered 200; log:\n{}",
                    self.name,
                    self.log_tail(40)
                )));
            }
            if started.elapsed() > timeout {
                return Err(HarnessError::Timeout {
                    what: format!("{} {path} to answer 200", self.name),
                    waited: started.elapsed(),
                    detail: self.log_tail(40),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One scrape of `/metrics`.
    pub async fn metrics(&self) -> Result<MetricsText, HarnessError> {
        let (status, body) = self.get("/metrics").await?;
        if status != 200 {
            return Err(HarnessError::Other(format!(
                "{} /metrics answered {status}",
                self.name
            )));
        }
        Ok(MetricsText(body))
    }

    /// Resident memory, if the process is alive.
    pub fn memory(&self) -> Option<MemoryUsage> {
        memory_of(self.pid)
    }

    /// The whole log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_text(), lines)
    }
}

/// The last `lines` lines of `text`.
pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// VmRSS and VmHWM of `pid`.
pub fn memory_of(pid: u32) -> Option<MemoryUsage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some(MemoryUsage {
        rss_kib: field("VmRSS:")?,
        peak_kib: field("VmHWM:")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_of_self_is_plausible() {
        let m = memory_of(std::process::id()).unwrap();
        assert!(m.rss_kib > 100 && m.peak_kib >= m.rss_kib, "{m:?}");
        assert_eq!(memory_of(u32::MAX), None);
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
