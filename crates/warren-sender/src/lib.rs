//! warren-sender: an HTTP API that accepts jobs and publishes them durably.
//!
//! `POST /send` and `POST /send/{queue}` validate the request
//! ([`validation`]), wrap the message in an [`Envelope`], publish it
//! persistent and mandatory on a confirm-mode channel and answer
//! `202 {"id": ...}` only after RabbitMQ confirmed it. When the broker is
//! unreachable the answer is `503` with `Retry-After`, within the confirm
//! timeout at the latest.
//!
//! Under hostile or excessive load ([`server`] for the connection level):
//! a body that does not arrive within the body timeout is `408
//! body_timeout`; beyond `--max-in-flight` publishes awaiting their confirm
//! the answer is `503 overloaded` at once; while RabbitMQ blocks the
//! connection (a resource alarm) it is `503 broker_blocked` at once and
//! `/readyz` is false.

mod api;
pub mod auth;
pub mod error;
pub mod metrics;
pub mod server;
pub mod validation;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::Method;
use axum::response::Response;
use axum::routing::post;
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;
use warren_broker::{AuditSink, Batching, BrokerArgs, Publisher, PublisherConfig, Topology};
use warren_telemetry::{LogArgs, Readiness};

use crate::auth::{Auth, AuthArgs};
use crate::metrics::SenderMetrics;
use crate::server::{ConnectionLimits, ConnectionMetrics};
use crate::validation::DotRule;

/// Command-line flags and environment variables.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "warren-sender",
    version,
    about = "HTTP API that accepts jobs and publishes them durably to RabbitMQ"
)]
pub struct Args {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// More queues `POST /send/{queue}` may publish to (comma-separated, e.g. `sms,email`).
    #[arg(long, env = "WARREN_QUEUES", value_delimiter = ',')]
    pub queues: Vec<String>,
    /// HTTP listen address (API, /healthz, /readyz, /metrics).
    #[arg(long, env = "WARREN_LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen_addr: SocketAddr,
    /// Largest accepted request body in bytes (larger: 413).
    #[arg(long, env = "WARREN_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    /// The dot rule: messages may have at most this many dots...
    #[arg(long, env = "WARREN_MAX_DOTS", default_value_t = 5)]
    pub max_dots: usize,
    /// ...or exactly one of these counts (comma-separated).
    #[arg(
        long,
        env = "WARREN_ALLOWED_DOT_COUNTS",
        value_delimiter = ',',
        default_value = "30,40"
    )]
    pub allowed_dot_counts: Vec<usize>,
    /// Accept any number of dots (turns the dot rule off).
    #[arg(long, env = "WARREN_DOT_RULE_DISABLED", default_value_t = false)]
    pub dot_rule_disabled: bool,
    /// Confirm-mode channels shared by concurrent requests.
    #[arg(long, env = "WARREN_PUBLISH_CHANNELS", default_value_t = 4)]
    pub publish_channels: usize,
    /// Longest wait for the broker's confirm before answering 503, in milliseconds.
    #[arg(long, env = "WARREN_CONFIRM_TIMEOUT_MS", default_value_t = 5000)]
    pub confirm_timeout_ms: u64,
    /// Seconds clients are told to wait (Retry-After) when the broker is unavailable.
    #[arg(long, env = "WARREN_RETRY_AFTER_SECONDS", default_value_t = 2)]
    pub retry_after_seconds: u64,
    /// Longest wait for a complete request head (new connections, and the next
    /// request on a keep-alive one), in milliseconds; then the connection is closed.
    #[arg(long, env = "WARREN_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_read_timeout_ms: u64,
    /// Longest wait for a request's complete body, in milliseconds; then 408 `body_timeout`.
    #[arg(long, env = "WARREN_BODY_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub body_read_timeout_ms: u64,
    /// Keep-alive connections idle longer than this (milliseconds) are closed.
    #[arg(long, env = "WARREN_IDLE_TIMEOUT_MS", default_value_t = 60_000)]
    pub idle_timeout_ms: u64,
    /// Connections served at once; one more is answered 503 `too_many_connections`
    /// and closed. Lowered at start to fit the open-files limit.
    #[arg(long, env = "WARREN_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Publishes awaiting the broker's confirm at once; beyond it, 503 `overloaded` at once.
    #[arg(long, env = "WARREN_MAX_IN_FLIGHT", default_value_t = 1024)]
    pub max_in_flight: usize,
    /// Publish a `message.accepted` audit event on `warren.events` for every accepted job.
    #[arg(long, env = "WARREN_AUDIT_EVENTS", default_value_t = true, action = clap::ArgAction::Set)]
    pub audit_events: bool,
    /// Audit events per broker message at most: `message.accepted` events
    /// are published in batches (1: one message per event).
    #[arg(long, env = "WARREN_AUDIT_BATCH", default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..))]
    pub audit_batch: u16,
    /// Longest wait, in milliseconds, before a batch of audit events that is
    /// not full is published.
    #[arg(long, env = "WARREN_AUDIT_LINGER_MS", default_value_t = 1000)]
    pub audit_linger_ms: u64,
    /// Connection name shown by RabbitMQ (the pod name on Kubernetes).
    #[arg(long, env = "POD_NAME", default_value = "warren-sender")]
    pub pod_name: String,
    #[command(flatten)]
    pub auth: AuthArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

impl Args {
    /// The queues this sender may publish to, default first, without duplicates.
    pub fn all_queues(&self) -> Vec<String> {
        self.broker.queues_with(&self.queues)
    }

    pub fn dot_rule(&self) -> DotRule {
        DotRule {
            enabled: !self.dot_rule_disabled,
            max_dots: self.max_dots,
            also_allowed: self.allowed_dot_counts.clone(),
        }
    }
}

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<AppInner>,
}

struct AppInner {
    publisher: Publisher,
    audit: AuditSink,
    /// The queues served, default first (shared by every accepted job's
    /// response and audit event).
    queues: Vec<Arc<str>>,
    audit_events: bool,
    dot_rule: DotRule,
    max_body_bytes: usize,
    body_timeout: Duration,
    /// One permit per publish awaiting its confirm (`--max-in-flight`).
    in_flight: Semaphore,
    max_in_flight: usize,
    /// `Retry-After` (seconds) when the broker or the token database is unavailable.
    retry_after_seconds: u64,
    metrics: SenderMetrics,
    auth: Auth,
}

/// A running sender: its address and the token that stops it.
pub struct RunningSender {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub publisher: Publisher,
    pub server: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Starts the publisher, the audit sink and the HTTP server; returns once
/// the listener is bound (the broker may still be connecting).
pub async fn start(args: &Args, shutdown: CancellationToken) -> anyhow::Result<RunningSender> {
    use anyhow::Context as _;
    let queues = args.all_queues();
    // The broker connection outlives the HTTP server's drain, so the last
    // jobs and their batched audit events still reach the broker.
    let broker_stop = CancellationToken::new();
    let (publisher, audit) = start_broker(args, &queues, broker_stop.clone());
    let auth = Auth::start(&args.auth).context("starting the token gate")?;
    let mut registry = Registry::default();
    let metrics = SenderMetrics::register(&mut registry);
    let connection_metrics = ConnectionMetrics::register(&mut registry);
    let readiness = Readiness::default();
    tokio::spawn(track_readiness(
        publisher.clone(),
        audit.clone(),
        auth.clone(),
        readiness.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));

    let state = AppState {
        inner: Arc::new(AppInner {
            publisher: publisher.clone(),
            audit: audit.clone(),
            queues: queues
                .iter()
                .map(|queue| Arc::from(queue.as_str()))
                .collect(),
            audit_events: args.audit_events,
            dot_rule: args.dot_rule(),
            max_body_bytes: args.max_body_bytes,
            body_timeout: Duration::from_millis(args.body_read_timeout_ms.max(1)),
            in_flight: Semaphore::new(args.max_in_flight.max(1)),
            max_in_flight: args.max_in_flight.max(1),
            retry_after_seconds: args.retry_after_seconds,
            metrics,
            auth: auth.clone(),
        }),
    };
    let app = Routes {
        state: state.clone(),
        router: router(state).merge(warren_telemetry::ops_router(Arc::new(registry), readiness)),
    };
    let listener = tokio::net::TcpListener::bind(args.listen_addr)
        .await
        .with_context(|| format!("binding {}", args.listen_addr))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let limits = ConnectionLimits {
        header_timeout: Duration::from_millis(args.header_read_timeout_ms.max(1)),
        idle_timeout: Duration::from_millis(args.idle_timeout_ms.max(1)),
        max_connections: server::fit_open_files_limit(args.max_connections.max(1)),
        retry_after_seconds: args.retry_after_seconds,
    };
    let serving = server::serve(listener, app, limits, connection_metrics, shutdown.clone());
    let server = tokio::spawn(async move {
        let served = serving.await;
        // Spent uses written back, unspent leases returned to other replicas.
        auth.close().await;
        audit.flush(Duration::from_secs(2)).await;
        broker_stop.cancel();
        served
    });
    Ok(RunningSender {
        addr,
        shutdown,
        publisher,
        server,
    })
}

/// The publisher and its audit sink (batched `message.accepted` events).
fn start_broker(args: &Args, queues: &[String], stop: CancellationToken) -> (Publisher, AuditSink) {
    let mut config = PublisherConfig::new(args.broker.amqp_url.clone(), args.pod_name.clone());
    config.channels = args.publish_channels.max(1);
    config.confirm_timeout = Duration::from_millis(args.confirm_timeout_ms.max(1));
    let audit = AuditSink::spawn_batched(
        10_000,
        Batching {
            max_events: usize::from(args.audit_batch),
            linger: Duration::from_millis(args.audit_linger_ms),
        },
    );
    let publisher = Publisher::start_with_audit(
        config,
        Topology::new(queues.to_vec(), args.broker.queue_type)
            .with_events_log(args.broker.events_log.retention()),
        audit.clone(),
        stop,
    );
    (publisher, audit)
}

/// What the HTTP server serves: `POST /send`, the hot path, straight to its
/// handler; every other request through axum's router (which also has
/// `/send`, so its other methods are answered 405 as before). Skipping the
/// router spares each job the request extensions it inserts (original URI,
/// matched path, path parameters) and its boxed route future.
#[derive(Clone)]
pub struct Routes {
    state: AppState,
    router: Router,
}

impl Routes {
    /// One request, answered.
    pub async fn serve(self, request: hyper::Request<hyper::body::Incoming>) -> Response {
        if request.method() == Method::POST && request.uri().path() == "/send" {
            return self.state.send_default(request.map(Body::new)).await;
        }
        match self.router.oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }
}

/// The API routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/send", post(api::send_default))
        .route("/send/{queue}", post(api::send_to_queue))
        .with_state(state)
}

/// Keeps `/readyz` and the connection gauges current: ready while the
/// broker connection is up and not blocked and, with auth on, while tokens
/// can be checked (the token database reachable and migrated).
async fn track_readiness(
    publisher: Publisher,
    audit: AuditSink,
    auth: Auth,
    readiness: Readiness,
    metrics: SenderMetrics,
    shutdown: CancellationToken,
) {
    let mut connection = publisher.connection_watch();
    let mut blocked = publisher.blocked_watch();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut connected = publisher.is_connected();
    loop {
        // Blocked by a resource alarm: not ready, so Kubernetes routes
        // requests to senders that can store them.
        let is_blocked = *blocked.borrow_and_update();
        readiness.set(connected && !is_blocked && auth.is_ready());
        metrics.broker_connected.set(i64::from(connected));
        metrics.broker_blocked.set(i64::from(is_blocked));
        metrics.token_db_ready.set(i64::from(auth.is_ready()));
        metrics
            .audit_dropped
            .set(i64::try_from(audit.dropped()).unwrap_or(i64::MAX));
        metrics
            .token_lookups
            .set(i64::try_from(auth.lookup_queries()).unwrap_or(i64::MAX));
        tokio::select! {
            _ = shutdown.cancelled() => break,
            now = connection.changed() => connected = now,
            Ok(()) = blocked.changed() => {}
            _ = tick.tick() => connected = publisher.is_connected(),
        }
    }
    readiness.set(false);
}
