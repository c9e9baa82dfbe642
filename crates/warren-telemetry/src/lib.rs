//! The runtime every warren process shares: logging, Prometheus metrics,
//! health endpoints and shutdown on a signal.
//!
//! Each binary flattens [`LogArgs`] into its clap arguments, calls
//! [`init_tracing`] and [`install_crypto_provider`] first thing in `main`,
//! takes its shutdown token from [`shutdown_on_signal`], registers its
//! metrics in a [`prometheus_client::registry::Registry`] and either merges
//! [`ops_router`] into its own HTTP server or, when it serves nothing else,
//! starts [`serve_ops`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt as _;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Logging flags shared by every binary.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, env = "WARREN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter in `tracing` EnvFilter syntax (e.g. `info,warren_worker=debug`).
    #[arg(long, env = "WARREN_LOG", default_value = "info")]
    pub log_filter: String,
}

/// Errors while setting up telemetry.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter {filter:?}: {source}")]
    Filter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
    #[error("binding the ops server to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Installs the global tracing subscriber described by `args`, writing to
/// standard output.
pub fn init_tracing(args: &LogArgs) -> Result<(), TelemetryError> {
    subscriber(args, std::io::stdout)?
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)
}

/// The subscriber [`init_tracing`] installs, writing to `writer`.
///
/// JSON lines carry the event's fields at the top level, the innermost span
/// under `span` (its name and fields) and every span it is in under `spans`,
/// outermost first: a worker's lines inside a job carry `span.id` and
/// `span.queue`.
fn subscriber<W>(
    args: &LogArgs,
    writer: W,
) -> Result<Box<dyn tracing::Subscriber + Send + Sync>, TelemetryError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(&args.log_filter).map_err(|source| TelemetryError::Filter {
        filter: args.log_filter.clone(),
        source,
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    Ok(match args.log_format {
        LogFormat::Text => Box::new(builder.finish()),
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(true)
                .finish(),
        ),
    })
}

/// Makes rustls' `ring` provider the process default.
///
/// warren compiles exactly one rustls crypto provider (ring); installing it
/// explicitly means no library ever has to guess. Calling it twice is harmless.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Readiness flag flipped by the process (e.g. "broker connected").
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
struct OpsState {
    registry: Arc<Registry>,
    readiness: Readiness,
}

/// `/healthz` (process alive), `/readyz` (the readiness flag) and `/metrics`
/// (Prometheus text format of `registry`).
pub fn ops_router<S>(registry: Arc<Registry>, readiness: Readiness) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(OpsState {
            registry,
            readiness,
        })
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<OpsState>) -> Response {
    if state.readiness.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics(State(state): State<OpsState>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("metrics encoding failed: {err}\n"),
        )
            .into_response(),
    }
}

/// The ops HTTP server of a process that serves nothing else (the worker,
/// the controller): [`ops_router`] on its own listener.
pub struct OpsServer {
    /// The bound address (port 0 resolved).
    pub addr: SocketAddr,
    task: JoinHandle<std::io::Result<()>>,
}

/// Binds `addr` and serves `/healthz`, `/readyz` and `/metrics` until
/// `shutdown` fires.
pub async fn serve_ops(
    addr: SocketAddr,
    registry: Registry,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<OpsServer, TelemetryError> {
    let bind_error = |source| TelemetryError::Bind { addr, source };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    let router: Router = ops_router(Arc::new(registry), readiness);
    let task = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    });
    Ok(OpsServer { addr: bound, task })
}

impl OpsServer {
    /// Waits until the server has stopped (after its shutdown token fired);
    /// a failure is logged, not returned: the process is on its way out.
    pub async fn stopped(self) {
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(error = %err, "ops HTTP server failed"),
            Err(err) => tracing::warn!(error = %err, "ops HTTP server task failed"),
        }
    }
}

/// A token cancelled when the process receives SIGTERM or SIGINT: every
/// binary's shutdown starts here.
pub fn shutdown_on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let cancel = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        cancel.cancel();
    });
    shutdown
}

/// Registers `process_start_time_seconds` (the Unix time this process
/// started), the conventional series for counting restarts: each restart
/// changes its value, so `changes(process_start_time_seconds[15m])` counts them.
pub fn register_process_start_time(registry: &mut Registry) {
    use prometheus_client::metrics::gauge::Gauge;
    use std::sync::atomic::AtomicU64;
    let started: Gauge<f64, AtomicU64> = Gauge::default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    started.set(now);
    registry.register(
        "process_start_time_seconds",
        "Start time of the process since the Unix epoch, in seconds",
        started,
    );
}

/// Resolves when the process receives SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(err) => {
            tracing::error!(error = %err, "cannot listen for SIGTERM; only SIGINT will stop the process");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http::Request;
    use prometheus_client::metrics::counter::Counter;
    use tower::ServiceExt;

    async fn get_path(router: Router, path: &str) -> (StatusCode, String) {
        let response = router
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn readyz_follows_the_flag_and_metrics_are_encoded() {
        let mut registry = Registry::default();
        let jobs: Counter = Counter::default();
        registry.register("warren_test_jobs", "jobs seen", jobs.clone());
        jobs.inc_by(3);
        register_process_start_time(&mut registry);
        let readiness = Readiness::default();
        let router: Router = ops_router(Arc::new(registry), readiness.clone());

        assert_eq!(get_path(router.clone(), "/healthz").await.0, StatusCode::OK);
        assert_eq!(
            get_path(router.clone(), "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        readiness.set(true);
        assert_eq!(get_path(router.clone(), "/readyz").await.0, StatusCode::OK);

        let (status, body) = get_path(router, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("warren_test_jobs_total 3"), "{body}");
        let started: f64 = body
            .lines()
            .find_map(|l| l.strip_prefix("process_start_time_seconds "))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no process_start_time_seconds in {body}"));
        // Some time after 2020 and not in the future.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(started > 1.6e9 && started <= now, "{started}");
    }

    /// A writer tests read back.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_carry_their_span_fields() {
        let args = LogArgs {
            log_format: LogFormat::Json,
            log_filter: "info".into(),
        };
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = subscriber(&args, move || writer.clone()).unwrap();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("job", id = "j-1", queue = "tasks");
            let _entered = span.enter();
            tracing::info!(duration_ms = 5, "job done");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["message"], "job done", "{text}");
        assert_eq!(line["duration_ms"], 5, "event fields at the top: {text}");
        assert_eq!(line["span"]["name"], "job", "{text}");
        assert_eq!(line["span"]["id"], "j-1", "{text}");
        assert_eq!(line["span"]["queue"], "tasks", "{text}");
        assert_eq!(line["spans"][0]["id"], "j-1", "{text}");
    }

    #[tokio::test]
    async fn the_ops_server_serves_until_its_shutdown() {
        let shutdown = CancellationToken::new();
        let readiness = Readiness::default();
        readiness.set(true);
        let server = serve_ops(
            "127.0.0.1:0".parse().unwrap(),
            Registry::default(),
            readiness,
            shutdown.clone(),
        )
        .await
        .unwrap();
        let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        shutdown.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), server.stopped())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_taken_ops_address_is_a_bind_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = serve_ops(
            addr,
            Registry::default(),
            Readiness::default(),
            CancellationToken::new(),
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(err, TelemetryError::Bind { .. }), "{err}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }

    #[test]
    fn bad_log_filter_is_a_clear_error() {
        let args = LogArgs {
            log_format: LogFormat::Json,
            log_filter: "info,[[[".into(),
        };
        let err = init_tracing(&args).unwrap_err();
        assert!(err.to_string().contains("invalid log filter"), "{err}");
    }
}
