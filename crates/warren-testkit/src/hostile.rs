//! Clients that never finish asking, and the process figures that show what
//! they cost a server (for the sender's tests and `make bench-hostile`).

use std::time::{Duration, Instant};

use futures::future::join_all;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How a stalled client misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stall {
    /// Connects and sends nothing.
    Silent,
    /// Sends half a request head, then nothing.
    HalfHead,
    /// Sends a complete `POST /send` head announcing 100 bytes of body, and 10 of them.
    PartialBody,
}

impl Stall {
    pub const ALL: [Stall; 3] = [Stall::Silent, Stall::HalfHead, Stall::PartialBody];

    pub fn bytes(self) -> &'static [u8] {
        match self {
            Stall::Silent => b"",
            Stall::HalfHead => b"POST /send HTTP/1.1\r\nHost: sender\r\nContent-Ty",
            Stall::PartialBody => {
                b"POST /send HTTP/1.1\r\nHost: sender\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"message\""
            }
        }
    }
}

/// Opens `count` stalled connections to `addr`, the kinds in turn.
pub async fn open_stalled(addr: &str, count: usize) -> std::io::Result<Vec<(Stall, TcpStream)>> {
    let mut stalled = Vec::with_capacity(count);
    for i in 0..count {
        let kind = Stall::ALL[i % Stall::ALL.len()];
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(kind.bytes()).await?;
        stalled.push((kind, stream));
    }
    Ok(stalled)
}

/// What became of one stalled connection.
#[derive(Debug)]
pub struct StallEnd {
    pub kind: Stall,
    /// When the server closed it, from the start of the wait (None: still open at the end).
    pub closed_after: Option<Duration>,
    /// What the server sent before closing.
    pub received: String,
}

/// Waits up to `within` for the server to close each connection.
pub async fn wait_closed(stalled: Vec<(Stall, TcpStream)>, within: Duration) -> Vec<StallEnd> {
    let started = Instant::now();
    join_all(stalled.into_iter().map(|(kind, mut stream)| async move {
        let mut received = Vec::new();
        let read = tokio::time::timeout(within, stream.read_to_end(&mut received)).await;
        StallEnd {
            kind,
            // A reset counts as closed as much as an orderly end of stream.
            closed_after: read.is_ok().then(|| started.elapsed()),
            received: String::from_utf8_lossy(&received).into_owned(),
        }
    }))
    .await
}

/// A process's peak resident memory (VmHWM) in bytes.
pub fn peak_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Raises this process's open-files soft limit to its hard limit; returns it.
pub fn raise_open_files_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Ok((soft, _)) => soft,
        Err(_) => 0,
    }
}
