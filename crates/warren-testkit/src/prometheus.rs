//! A private Prometheus server (Debian's `prometheus`) on a free loopback
//! port, with its configuration and data in a temporary directory; killed
//! and removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{TestkitError, free_port};

/// Where Debian's `prometheus` package installs the server.
pub const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";

/// A running Prometheus.
pub struct PrometheusServer {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl PrometheusServer {
    /// Starts Prometheus with `config` (the text of prometheus.yml) and
    /// `files` (name, content) written beside it first (rule files, file_sd
    /// lists: relative paths in the config resolve against [`Self::dir`]),
    /// and waits until `/-/ready` answers.
    pub async fn start(config: &str, files: &[(&str, &str)]) -> Result<Self, TestkitError> {
        let dir = tempfile::Builder::new()
            .prefix("warren-prometheus-")
            .tempdir()
            .map_err(|source| TestkitError::Dir {
                path: std::env::temp_dir(),
                source,
            })?;
        let port = free_port()?;
        let mut server = Self {
            dir,
            port,
            child: None,
        };
        for (name, content) in files {
            server.write_file(name, content)?;
        }
        server.write_file("prometheus.yml", config)?;
        let log_path = server.dir().join("prometheus.log");
        let log = std::fs::File::create(&log_path).map_err(|source| TestkitError::Dir {
            path: log_path.clone(),
            source,
        })?;
        let log_err = log.try_clone().map_err(|source| TestkitError::Dir {
            path: log_path.clone(),
            source,
        })?;
        let child = Command::new(PROMETHEUS_BIN)
            .arg(format!(
                "--config.file={}",
                server.dir().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                server.dir().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .current_dir(server.dir())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|source| TestkitError::Program {
                program: PROMETHEUS_BIN.into(),
                hint: "install Debian's prometheus package".into(),
                source,
            })?;
        server.child = Some(child);
        server.wait_ready(Duration::from_secs(60)).await?;
        Ok(server)
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The configuration and data directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `name` in [`Self::dir`] atomically (write, then rename), so a
    /// file_sd file is never read half written.
    pub fn write_file(&self, name: &str, content: &str) -> Result<PathBuf, TestkitError> {
        let path = self.dir().join(name);
        let temporary = self.dir().join(format!(".{name}.tmp"));
        std::fs::write(&temporary, content)
            .and_then(|()| std::fs::rename(&temporary, &path))
            .map_err(|source| TestkitError::Dir {
                path: path.clone(),
                source,
            })?;
        Ok(path)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir().join("prometheus.log")).unwrap_or_default()
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), TestkitError> {
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(TestkitError::NotReady {
                    node: format!("prometheus on {}", self.port),
                    waited: started.elapsed(),
                    log: format!("exited with {status}\n{}", self.log()),
                });
            }
            if http_status(self.port, "/-/ready").await == Some(200) {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(TestkitError::NotReady {
                    node: format!("prometheus on {}", self.port),
                    waited: started.elapsed(),
                    log: self.log(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The status code of `GET path` on 127.0.0.1:`port`, if it answers.
async fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut head = [0u8; 32];
    let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut head))
        .await
        .ok()?
        .ok()?;
    let text = std::str::from_utf8(&head[..n]).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
