//! Serving HTTP/1.1 to clients that may never finish asking.
//!
//! `axum::serve` has no header-read timeout and no connection cap, so a
//! client that sends half its headers and goes silent holds a socket (and a
//! file descriptor) for ever. This accept loop bounds every phase of a
//! connection's life:
//!
//! - **Headers**: a new connection, or a keep-alive connection whose next
//!   request has begun to arrive, must deliver a complete request head within
//!   `header_timeout`; otherwise the connection is closed.
//! - **Idle keep-alive**: a connection with no request under way is closed
//!   after `idle_timeout` (measured from the end of its last response).
//! - **Body**: while a request is being handled the watchdog stands aside;
//!   the handler bounds its own body read (see `read_body` in the crate
//!   root: 408 `body_timeout`) and the publish is bounded by the confirm
//!   timeout. A response the client never reads puts the connection back in
//!   the idle phase, so it is closed after `idle_timeout` too.
//! - **Connections**: at most `max_connections` are served at once; one more
//!   is answered `503 too_many_connections` (problem+json, `Retry-After`) and
//!   closed at once, without reading its request.
//!
//! Each phase change is recorded by [`ConnectionClock`]: the socket wrapper
//! notices the first bytes of a request, the service wrapper notices the
//! request head being complete and the response being ready. The per-connection
//! task sleeps until the current phase's deadline and drops the connection
//! when it passes.
//!
//! Graceful shutdown: stop accepting, ask every connection to finish its
//! request in hand and close (idle ones close at once), wait for them all.
//! Stalled ones are still bounded by their deadlines.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Routes;

/// How long each phase of a connection may last, and how many connections
/// are served at once.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// `Retry-After` (seconds) on the refusal of a connection over the cap.
    pub retry_after_seconds: u64,
}

/// Refusals in progress at once (each writes a small answer and waits up to
/// [`REFUSAL_LINGER`] for the client to read it); beyond this, a refused
/// connection is answered with a single non-blocking write and closed.
const REFUSING_AT_ONCE: usize = 256;
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// Pause after an accept error such as EMFILE, so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TimeoutLabels {
    /// `header` or `idle`.
    pub phase: &'static str,
}

/// The connection-level metrics.
#[derive(Clone, Default)]
pub struct ConnectionMetrics {
    pub open: Gauge,
    pub refused: Counter,
    pub timed_out: Family<TimeoutLabels, Counter>,
}

impl ConnectionMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "warren_sender_connections_open",
            "HTTP connections being served",
            metrics.open.clone(),
        );
        registry.register(
            "warren_sender_connections_refused",
            "HTTP connections refused because --max-connections were open",
            metrics.refused.clone(),
        );
        registry.register(
            "warren_sender_connections_timed_out",
            "HTTP connections closed by the server because a phase (header read, idle keep-alive) lasted too long",
            metrics.timed_out.clone(),
        );
        metrics
    }
}

/// Accepts and serves connections until `shutdown` fires, then drains them.
pub async fn serve(
    listener: TcpListener,
    app: Routes,
    limits: ConnectionLimits,
    metrics: ConnectionMetrics,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let limits = Arc::new(limits);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let refusing = Arc::new(Semaphore::new(REFUSING_AT_ONCE));
    let refusal: Arc<[u8]> = refusal_response(&limits).into();
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(err) => {
                // Out of file descriptors, or a connection reset before it
                // was accepted: neither is a reason to stop serving.
                tracing::warn!(error = %err, "accepting a connection failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                metrics.open.inc();
                let metrics = metrics.clone();
                let connection = serve_connection(
                    stream,
                    app.clone(),
                    limits.clone(),
                    metrics.clone(),
                    shutdown.clone(),
                );
                connections.spawn(async move {
                    connection.await;
                    metrics.open.dec();
                    drop(slot);
                });
            }
            Err(_) => {
                metrics.refused.inc();
                refuse(stream, &refusing, refusal.clone());
            }
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// File descriptors kept aside for everything but client connections (the
/// broker connection, the listener, logs, refusals being answered).
const RESERVED_FILES: u64 = 128;

/// Raises this process's open-files soft limit to its hard limit and returns
/// `wanted`, lowered if even that limit cannot hold `wanted` connections
/// (a container's soft limit is often 1,024).
pub fn fit_open_files_limit(wanted: usize) -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return wanted;
    };
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let room = usize::try_from(limit.saturating_sub(RESERVED_FILES)).unwrap_or(usize::MAX);
    if room < wanted {
        tracing::warn!(
            max_connections = wanted,
            open_files_limit = limit,
            serving = room.max(1),
            "the open-files limit cannot hold --max-connections; serving fewer"
        );
    }
    wanted.min(room).max(1)
}

/// The answer to a connection over the cap: the same problem+json shape as
/// every other error.
fn refusal_response(limits: &ConnectionLimits) -> Vec<u8> {
    let body = crate::error::problem_json(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "too_many_connections",
        &format!(
            "this sender already serves {} connections; retry later",
            limits.max_connections
        ),
    );
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\nretry-after: {}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        limits.retry_after_seconds,
        body.len()
    )
    .into_bytes()
}

/// Answers 503 and closes without reading the request. The answer is
/// written, the write side shut, and the client given a moment to read it
/// (closing a socket with unread input resets it, which can destroy the
/// answer in flight); when many refusals are already lingering, one
/// non-blocking write and an immediate close.
fn refuse(stream: TcpStream, refusing: &Arc<Semaphore>, refusal: Arc<[u8]>) {
    let Ok(permit) = refusing.clone().try_acquire_owned() else {
        let _ = stream.try_write(&refusal);
        return;
    };
    tokio::spawn(async move {
        let mut stream = stream;
        let _ = tokio::time::timeout(REFUSAL_LINGER, async {
            stream.write_all(&refusal).await?;
            stream.shutdown().await?;
            let mut sink = [0u8; 1024];
            while stream.read(&mut sink).await? > 0 {}
            Ok::<_, io::Error>(())
        })
        .await;
        drop(permit);
    });
}

/// Where a connection is in its life, and since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Accepted; its first request head has not arrived yet.
    Opened,
    /// Between requests, nothing of the next one received.
    Idle,
    /// Bytes of the next request's head have arrived.
    Head,
    /// A request is being handled (body read and publish are bounded by the handler).
    Busy,
}

/// Records a connection's phase transitions; read by its watchdog.
///
/// Every transition happens while the connection's task polls hyper's
/// connection (the socket read, the service call and the service future
/// all run inside that poll), so the watchdog re-reads the deadline after
/// each such poll and needs no wake-up of its own.
struct ConnectionClock {
    state: Mutex<(Phase, Instant)>,
    header_timeout: Duration,
    idle_timeout: Duration,
}

impl ConnectionClock {
    fn new(limits: &ConnectionLimits) -> Self {
        Self {
            state: Mutex::new((Phase::Opened, Instant::now())),
            header_timeout: limits.header_timeout,
            idle_timeout: limits.idle_timeout,
        }
    }

    fn set(&self, from: &[Phase], to: Phase) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if from.contains(&state.0) {
            *state = (to, Instant::now());
        }
    }

    /// Bytes arrived from the client.
    fn bytes_read(&self) {
        self.set(&[Phase::Idle], Phase::Head);
    }

    /// A request head is complete; the returned guard marks the response
    /// ready when dropped.
    fn request_started(self: &Arc<Self>) -> RequestGuard {
        self.set(&[Phase::Opened, Phase::Idle, Phase::Head], Phase::Busy);
        RequestGuard(self.clone())
    }

    /// The current phase's deadline and its name (none while busy).
    fn deadline(&self) -> Option<(Instant, &'static str)> {
        let (phase, since) = *self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match phase {
            Phase::Opened | Phase::Head => Some((since + self.header_timeout, "header")),
            Phase::Idle => Some((since + self.idle_timeout, "idle")),
            Phase::Busy => None,
        }
    }
}

struct RequestGuard(Arc<ConnectionClock>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.set(&[Phase::Busy], Phase::Idle);
    }
}

/// A socket that tells the clock when bytes arrive.
struct WatchedIo {
    inner: TcpStream,
    clock: Arc<ConnectionClock>,
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// hyper's HTTP/1 settings for every connection: keep-alive on, and no header
/// timeout of hyper's own — the watchdog in [`serve_connection`] owns every read
/// deadline (hyper's would also cut idle keep-alive connections short).
fn http1_settings() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .keep_alive(true)
        .header_read_timeout(None::<Duration>);
    builder
}

/// Serves one connection's requests until the client closes, a phase times
/// out, or shutdown completes.
async fn serve_connection(
    stream: TcpStream,
    app: Routes,
    limits: Arc<ConnectionLimits>,
    metrics: ConnectionMetrics,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let clock = Arc::new(ConnectionClock::new(&limits));
    let io = TokioIo::new(WatchedIo {
        inner: stream,
        clock: clock.clone(),
    });
    let request_clock = clock.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let guard = request_clock.request_started();
        let app = app.clone();
        async move {
            let response = app.serve(request).await;
            drop(guard);
            Ok::<_, Infallible>(response)
        }
    });
    let connection = http1_settings().serve_connection(io, service);
    tokio::pin!(connection);
    // One timer for the connection's life, moved when the deadline moves
    // (not a new one at every wake-up).
    let watchdog = tokio::time::sleep_until(Instant::now() + Duration::from_secs(3600));
    tokio::pin!(watchdog);
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    let mut armed = None;
    let mut draining = false;
    loop {
        let event = std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = connection.as_mut().poll(cx) {
                return Poll::Ready(Wake::Ended(result));
            }
            // The phase changes only inside the poll above: the deadline
            // read now holds until the task is woken again.
            if let Some((at, phase)) = clock.deadline() {
                if armed != Some(at) {
                    watchdog.as_mut().reset(at);
                    armed = Some(at);
                }
                if watchdog.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Stalled(phase));
                }
            }
            if !draining && cancelled.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Shutdown);
            }
            Poll::Pending
        })
        .await;
        match event {
            Wake::Ended(result) => {
                if let Err(err) = result {
                    tracing::debug!(error = %err, "connection ended with an error");
                }
                return;
            }
            Wake::Stalled(phase) => {
                metrics
                    .timed_out
                    .get_or_create(&TimeoutLabels { phase })
                    .inc();
                tracing::debug!(phase, "closing a connection that stalled");
                return;
            }
            Wake::Shutdown => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Why a connection's task woke up with something to do.
enum Wake {
    /// hyper is done with the connection.
    Ended(Result<(), hyper::Error>),
    /// The current phase's deadline passed.
    Stalled(&'static str),
    /// The server is shutting down.
    Shutdown,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 8,
            retry_after_seconds: 2,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_phase_has_its_deadline() {
        let clock = Arc::new(ConnectionClock::new(&limits()));
        let opened = Instant::now();
        // A new connection must send its head within the header timeout,
        // and its first bytes do not restart that clock.
        assert_eq!(
            clock.deadline(),
            Some((opened + Duration::from_secs(10), "header"))
        );
        tokio::time::advance(Duration::from_secs(3)).await;
        clock.bytes_read();
        assert_eq!(
            clock.deadline(),
            Some((opened + Duration::from_secs(10), "header"))
        );
        // While a request is handled there is no watchdog deadline.
        let guard = clock.request_started();
        assert_eq!(clock.deadline(), None);
        tokio::time::advance(Duration::from_secs(30)).await;
        clock.bytes_read();
        assert_eq!(clock.deadline(), None);
        // After the response, the idle keep-alive clock runs...
        drop(guard);
        let idle_since = Instant::now();
        assert_eq!(
            clock.deadline(),
            Some((idle_since + Duration::from_secs(60), "idle"))
        );
        // ...until the next request starts arriving: then the header clock.
        tokio::time::advance(Duration::from_secs(20)).await;
        clock.bytes_read();
        assert_eq!(
            clock.deadline(),
            Some((Instant::now() + Duration::from_secs(10), "header"))
        );
    }

    #[test]
    fn the_refusal_is_a_complete_problem_json_response() {
        let bytes = refusal_response(&limits());
        let text = String::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(head.contains("\r\nretry-after: 2"), "{head}");
        assert!(head.contains("\r\nconnection: close"), "{head}");
        assert!(head.contains(&format!("\r\ncontent-length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["code"], "too_many_connections");
        assert_eq!(json["status"], 503);
    }
}
