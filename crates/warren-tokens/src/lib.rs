//! warren-tokens: who may send, how much, and why not.
//!
//! - [`secret`]: the `wrn_…` secret format (checksum, SHA-256 hash).
//! - [`model`]: subjects, limits, periods (UTC calendar months), refusal reasons.
//! - [`migrate`]: the PostgreSQL schema, applied by `warren-admin` at start.
//! - [`refusals`]: how refusals are stored, aggregated past a per-token rate,
//!   folded into days and deleted after a retention, so floods stay bounded.
//! - [`store`]: what the admin API and CLI do (subjects, tokens, usage, refusals).
//! - [`gate`]: what the sender asks before publishing: is this token good for
//!   this queue, and may it spend one more use? Limits stay exact across
//!   replicas through leases taken from PostgreSQL; revocations arrive by
//!   LISTEN/NOTIFY.
//!
//! Time is an input ([`clock::Clock`]) so tests cross month boundaries and
//! expiries without waiting.

pub mod clock;
pub mod error;
pub mod gate;
pub mod migrate;
pub mod model;
pub mod refusals;
pub mod secret;
pub mod store;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::TokenError;
pub use gate::{Admission, Gate, GateConfig, Ticket};
pub use model::{Limit, Reason, Refusal, SubjectKind, SubjectRef, TokenRecord};
pub use store::{NewToken, Store, TokenView};

/// A connection pool for `url` (`postgres://user:password@host:port/db`), without TLS.
pub fn pool(url: &str, max_size: usize) -> Result<deadpool_postgres::Pool, TokenError> {
    let config: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| TokenError::Config(e.to_string()))?;
    let manager = deadpool_postgres::Manager::from_config(
        config,
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    deadpool_postgres::Pool::builder(manager)
        .max_size(max_size.max(1))
        .wait_timeout(Some(std::time::Duration::from_secs(2)))
        .create_timeout(Some(std::time::Duration::from_secs(2)))
        .recycle_timeout(Some(std::time::Duration::from_secs(2)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| TokenError::Pool(e.to_string()))
}
