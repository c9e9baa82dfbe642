//! Bearer tokens on `POST /send` (seed 004, section 9).
//!
//! With `WARREN_AUTH=required` every send is checked by a
//! [`warren_tokens::Gate`] against the token database at
//! `WARREN_DATABASE_URL`, in two steps around the existing pipeline:
//! [`Auth::check`] before the body is read (401 missing/invalid/revoked/
//! expired token with `WWW-Authenticate: Bearer`, 403 queue not allowed) and
//! [`reserve`] after the body validated (429 uses or monthly quota spent,
//! with `Retry-After` until the next UTC month). The reserved use is spent
//! only when the job is accepted (202); a failed publish gives it back. When
//! the database cannot be asked the answer is 503 `auth_unavailable`, never
//! an accept without a check.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, header};
use warren_tokens::{Admission, Gate, GateConfig, Refusal, SystemClock, Ticket};

/// Whether sends need a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Anyone who reaches the sender may send.
    Off,
    /// Every send needs `Authorization: Bearer <token>` with uses left.
    Required,
}

/// Token flags.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthArgs {
    /// `required`: every send needs a Bearer token from the token database.
    #[arg(long = "auth", env = "WARREN_AUTH", value_enum, default_value_t = AuthMode::Off)]
    pub mode: AuthMode,
    /// PostgreSQL URL of the token database (needed with `--auth required`),
    /// e.g. `postgres://warren:PASSWORD@warren-postgres:5432/warren`.
    #[arg(long, env = "WARREN_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

/// The sender's token checks: nothing when auth is off.
#[derive(Clone)]
pub struct Auth {
    gate: Option<Gate>,
}

impl Auth {
    /// Starts the gate when auth is required (it connects in the background).
    pub fn start(args: &AuthArgs) -> anyhow::Result<Self> {
        let gate = match args.mode {
            AuthMode::Off => None,
            AuthMode::Required => {
                let url = args.database_url.as_deref().ok_or_else(|| {
                    anyhow::anyhow!("WARREN_AUTH=required needs WARREN_DATABASE_URL")
                })?;
                Some(Gate::start(
                    url,
                    Arc::new(SystemClock),
                    GateConfig::default(),
                )?)
            }
        };
        Ok(Self { gate })
    }

    /// The gate, when auth is on.
    pub fn gate(&self) -> Option<&Gate> {
        self.gate.as_ref()
    }

    /// Step one: the token is good for `queue` (no use taken yet).
    pub async fn check(
        &self,
        headers: &HeaderMap,
        queue: &str,
    ) -> Result<Option<Admission>, Refusal> {
        let Some(gate) = &self.gate else {
            return Ok(None);
        };
        let authorization = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        gate.check(authorization, queue).await.map(Some)
    }

    /// Returns every unspent lease; call after the server stopped.
    pub async fn close(&self) {
        if let Some(gate) = &self.gate {
            gate.close().await;
        }
    }

    /// Whether sends can be checked now: the token database is reachable and
    /// migrated (always when auth is off). Part of `/readyz`.
    pub fn is_ready(&self) -> bool {
        self.gate.as_ref().is_none_or(Gate::is_ready)
    }

    /// Queries made to find tokens so far (0 when auth is off).
    pub fn lookup_queries(&self) -> u64 {
        self.gate.as_ref().map_or(0, Gate::lookup_queries)
    }

    /// Waits until the gate can answer (true at once when auth is off).
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        match &self.gate {
            Some(gate) => gate.wait_ready(timeout).await,
            None => true,
        }
    }
}

/// Step two, once the body validated: take one use.
pub async fn reserve(admission: Option<Admission>) -> Result<Option<Ticket>, Refusal> {
    match admission {
        Some(admission) => admission.reserve().await.map(Some),
        None => Ok(None),
    }
}
