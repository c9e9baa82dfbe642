//! warren-admin: the admin side of warren's Bearer tokens.
//!
//! `warren-admin serve` applies the token database's migrations, then serves
//! - the JSON API under `/api` ([`api`]), authorized by
//!   `Authorization: Bearer $WARREN_ADMIN_TOKEN`;
//! - the web panel ([`panel`]): server-rendered pages (maud templates,
//!   checked at compile time), a session cookie after logging in with the
//!   admin token ([`session`]), cross-site requests refused;
//! - `/healthz`, `/readyz` (database reachable and migrated) and `/metrics`.
//!
//! The CLI subcommands (see `main.rs`) do the same operations directly on
//! the database, for `kubectl exec deploy/warren-admin -- warren-admin …`.

pub mod api;
pub mod panel;
pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use warren_telemetry::Readiness;
use warren_tokens::{Store, SystemClock, TokenError};

use crate::session::SessionKey;

/// Where the token database is.
#[derive(Debug, Clone, clap::Args)]
pub struct DbArgs {
    /// PostgreSQL URL of the token database, e.g.
    /// `postgres://warren:PASSWORD@warren-postgres:5432/warren`.
    #[arg(long, env = "WARREN_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
}

/// `warren-admin serve` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// HTTP listen address (API, panel, /healthz, /readyz, /metrics).
    #[arg(long, env = "WARREN_LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen_addr: SocketAddr,
    /// The admin token: `Authorization: Bearer …` for the API, the password of the panel.
    #[arg(long, env = "WARREN_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: String,
    /// Mark the session cookie `Secure` (set when the panel is served over HTTPS).
    #[arg(long, env = "WARREN_ADMIN_SECURE_COOKIE", default_value_t = false, action = clap::ArgAction::Set)]
    pub secure_cookie: bool,
    /// How long a panel session lasts, in hours.
    #[arg(long, env = "WARREN_ADMIN_SESSION_HOURS", default_value_t = 12)]
    pub session_hours: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResponseLabels {
    /// `api` or `panel`.
    surface: &'static str,
    status: u16,
}

/// The admin server's metrics.
#[derive(Clone, Default)]
pub struct AdminMetrics {
    responses: Family<ResponseLabels, Counter>,
    database_up: Gauge,
}

impl AdminMetrics {
    fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "warren_admin_responses",
            "Admin API and panel responses by surface and status",
            metrics.responses.clone(),
        );
        registry.register(
            "warren_admin_database_up",
            "1 while the token database answers and is migrated",
            metrics.database_up.clone(),
        );
        metrics
    }

    fn count(&self, surface: &'static str, status: StatusCode) {
        self.responses
            .get_or_create(&ResponseLabels {
                surface,
                status: status.as_u16(),
            })
            .inc();
    }
}

/// Shared state of the API and panel handlers.
#[derive(Clone)]
pub struct AdminState {
    pub(crate) store: Store,
    pub(crate) admin_token_hash: [u8; 32],
    pub(crate) session: SessionKey,
    pub(crate) secure_cookie: bool,
    pub(crate) metrics: AdminMetrics,
}

/// A running admin server.
pub struct RunningAdmin {
    pub addr: SocketAddr,
    pub server: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Binds the listener, then migrates the database in the background
/// (retrying until it answers); `/readyz` turns ready once it is migrated.
pub async fn serve(
    db: &DbArgs,
    args: &ServeArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningAdmin> {
    if args.admin_token.trim().len() < 16 {
        anyhow::bail!("WARREN_ADMIN_TOKEN must have at least 16 characters");
    }
    let pool = warren_tokens::pool(&db.database_url, 8).context("WARREN_DATABASE_URL")?;
    let store = Store::new(pool, Arc::new(SystemClock));
    let mut registry = Registry::default();
    let metrics = AdminMetrics::register(&mut registry);
    let readiness = Readiness::default();
    tokio::spawn(watch_database(
        store.clone(),
        readiness.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let state = AdminState {
        store,
        admin_token_hash: session::digest(args.admin_token.trim().as_bytes()),
        session: SessionKey::new(
            args.admin_token.trim(),
            Duration::from_secs(args.session_hours.max(1) * 3600),
        ),
        secure_cookie: args.secure_cookie,
        metrics,
    };
    let app = api::router(state.clone())
        .merge(panel::router(state))
        .merge(warren_telemetry::ops_router(Arc::new(registry), readiness));
    let listener = tokio::net::TcpListener::bind(args.listen_addr)
        .await
        .with_context(|| format!("binding {}", args.listen_addr))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    });
    Ok(RunningAdmin { addr, server })
}

/// Migrates once the database answers, then keeps readiness in step with it.
async fn watch_database(
    store: Store,
    readiness: Readiness,
    metrics: AdminMetrics,
    shutdown: CancellationToken,
) {
    let mut migrated = false;
    loop {
        let up = if migrated {
            store.ping().await.is_ok()
        } else {
            match store.migrate().await {
                Ok(applied) => {
                    tracing::info!(applied, "token database migrated");
                    migrated = true;
                    true
                }
                Err(err) => {
                    tracing::warn!(error = %err, "token database not ready; retrying");
                    false
                }
            }
        };
        readiness.set(up);
        metrics.database_up.set(i64::from(up));
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
    readiness.set(false);
}

/// A failure of an admin operation, as problem+json.
#[derive(Debug)]
pub struct AdminError(pub TokenError);

impl From<TokenError> for AdminError {
    fn from(err: TokenError) -> Self {
        Self(err)
    }
}

impl AdminError {
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match &self.0 {
            TokenError::NoSuchSubject { .. } => (StatusCode::NOT_FOUND, "no_such_subject"),
            TokenError::NoSuchToken(_) => (StatusCode::NOT_FOUND, "no_such_token"),
            TokenError::Exists { .. } => (StatusCode::CONFLICT, "already_exists"),
            TokenError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            _ => (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable"),
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            tracing::warn!(error = %self.0, "admin operation failed");
        }
        problem(status, code, &self.0.to_string())
    }
}

/// An `application/problem+json` response.
pub fn problem(status: StatusCode, code: &str, detail: &str) -> Response {
    let body = json!({
        "type": format!("https://warren.dev/problems/{code}"),
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "code": code,
        "detail": detail,
    });
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        )],
        body.to_string(),
    )
        .into_response()
}
