//! The sender's side: may this request spend one use of this token?
//!
//! [`Gate::check`] parses `Authorization: Bearer …`, refuses malformed
//! secrets without a round trip (checksum), finds the token (cached by hash)
//! and checks revocation, expiry and the queue. [`Admission::reserve`] takes
//! one use; [`Ticket::commit`] spends it once the job is accepted, dropping
//! the ticket gives it back (validation or publish failed).
//!
//! **Exact limits across replicas.** A replica never counts against the
//! database per request. It takes a *lease* of a few uses in one transaction
//! that keeps `used + leased <= limit` on the token's usage row, hands them
//! out from memory and writes spent uses back every `flush_interval`. A lease
//! is `min(size, max(1, remaining / lease_divisor))` uses, so it shrinks as
//! the remainder shrinks and the last uses go one at a time; `size` starts at
//! `lease_min` and doubles (up to `lease_max`) while a token's leases last
//! less than `lease_target`, halving again when they last much longer. When
//! half a lease is left the next one is taken in the background, so a hot
//! token's requests do not wait for the database. Unspent uses
//! go back when a token is idle for `idle_return` and at shutdown, so while
//! requests keep coming the token gets all of its limit. A replica that
//! cannot reach the database stops using its leases after `lease_valid_for`;
//! leases not renewed for `stale_after` are reclaimed by the next replica
//! that asks, and counted as *spent* (a crashed replica may have used them),
//! which may under-admit by at most one lease but never over-admits.
//!
//! **Revocation within a second.** One connection LISTENs on
//! `warren_tokens` (a trigger notifies every change to a token); the cache
//! forgets a token as soon as its notification arrives. The listener pings
//! every `ping_interval`; while it is down, every check answers
//! `auth_unavailable` (never an accept without a check) and the cache is
//! cleared on reconnect.
//!
//! **Refusals** are counted in memory and stored by a background writer:
//! per token (all refusals without a known token share one key) and UTC
//! minute the first `refusals_per_minute` are stored one row each; past that
//! rate they are counted into one row per (token, reason, queue, minute).
//! Rows older than `refusal_detail_for` are folded into one row per (token,
//! reason, queue, UTC day), rows older than `refusal_retention` deleted; see
//! [`crate::refusals`] for the bound this gives.

mod lease;
mod listen;
mod lookup;
mod writeback;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::clock::Clock;
use crate::error::TokenError;
use crate::model::{Reason, Refusal, TokenRecord};
use crate::refusals::{RefusalBuffer, RefusalEvent};
use crate::secret::{self, SecretHash};

use lease::Quota;
pub use lease::Ticket;

/// Tuning of the gate; the defaults suit production.
#[derive(Debug, Clone)]
pub struct GateConfig {
    /// Smallest lease size, in uses (a lease is smaller only near the limit).
    pub lease_min: u64,
    /// Largest lease, in uses.
    pub lease_max: u64,
    /// A hot token's leases grow until one lasts about this long.
    pub lease_target: Duration,
    /// A lease is at most the remainder divided by this.
    pub lease_divisor: u64,
    /// How often spent uses are written back.
    pub flush_interval: Duration,
    /// Unspent leased uses of a token idle this long go back.
    pub idle_return: Duration,
    /// How often this replica renews its leases.
    pub heartbeat: Duration,
    /// Leases are used only this long after the database last answered.
    pub lease_valid_for: Duration,
    /// Leases not renewed this long are reclaimed (counted as spent).
    pub stale_after: Duration,
    /// How often the LISTEN connection is pinged.
    pub ping_interval: Duration,
    /// After a token was found spent, ask the database again after this long.
    pub exhausted_recheck: Duration,
    /// Refusals stored one row each per token and minute; more are aggregated.
    pub refusals_per_minute: u32,
    /// Refusal rows older than this are folded into one row per token, reason, queue and day.
    pub refusal_detail_for: Duration,
    /// Refusal rows older than this are deleted.
    pub refusal_retention: Duration,
    /// How often this replica folds and deletes old refusal rows.
    pub refusal_compact_every: Duration,
    /// Connections in the pool.
    pub pool_size: usize,
    /// A well-formed secret the database did not know is refused from
    /// memory for this long (a token created meanwhile works after it).
    pub unknown_ttl: Duration,
    /// Unknown secrets remembered at most.
    pub unknown_max: usize,
    /// Secrets asked in one lookup query at most.
    pub lookup_batch_max: usize,
    /// Shortest time between two lookup queries.
    pub lookup_spacing: Duration,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            lease_min: 64,
            lease_max: 4096,
            lease_target: Duration::from_millis(250),
            lease_divisor: 8,
            flush_interval: Duration::from_millis(100),
            idle_return: Duration::from_secs(1),
            heartbeat: Duration::from_secs(2),
            lease_valid_for: Duration::from_secs(10),
            stale_after: Duration::from_secs(30),
            ping_interval: Duration::from_millis(250),
            exhausted_recheck: Duration::from_millis(200),
            refusals_per_minute: 10,
            refusal_detail_for: Duration::from_secs(24 * 3600),
            refusal_retention: Duration::from_secs(90 * 24 * 3600),
            refusal_compact_every: Duration::from_secs(600),
            pool_size: 4,
            unknown_ttl: Duration::from_secs(2),
            unknown_max: 10_000,
            lookup_batch_max: 500,
            lookup_spacing: Duration::from_millis(5),
        }
    }
}

/// The token gate of one sender replica. Cheap to clone.
#[derive(Clone)]
pub struct Gate {
    inner: Arc<Inner>,
}

struct Inner {
    pool: deadpool_postgres::Pool,
    listen_config: tokio_postgres::Config,
    clock: Arc<dyn Clock>,
    config: GateConfig,
    /// This replica's name in `token_leases`.
    holder: Uuid,
    started: Instant,
    /// The LISTEN connection is up and the cache is coherent.
    healthy: AtomicBool,
    /// Milliseconds since `started` when the database last answered.
    db_ok_at: AtomicU64,
    /// Bumped on every invalidation, so a lookup racing a revocation is not cached.
    generation: AtomicU64,
    cache: RwLock<HashMap<SecretHash, Arc<TokenRecord>>>,
    /// Well-formed secrets recently found unknown.
    unknown: Mutex<lookup::UnknownSecrets>,
    /// Lookups waiting for the next batch, and the bell that starts one.
    lookups: Mutex<lookup::PendingLookups>,
    lookup_wanted: tokio::sync::Notify,
    lookup_queries: AtomicU64,
    /// Why checks cannot be answered now (shown in `auth_unavailable`).
    unready: Mutex<String>,
    quotas: RwLock<HashMap<Uuid, Arc<Quota>>>,
    refusals: Mutex<RefusalBuffer>,
    /// Wakes the refusal writer early when many single rows wait.
    refusals_waiting: tokio::sync::Notify,
    refusal_writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Held by each write-back of uses and leases: the last one at close
    /// waits for a periodic one already under way instead of returning before
    /// that one's rows are written.
    flushing: tokio::sync::Mutex<()>,
    shutdown: CancellationToken,
}

/// A token that passed the checks for one queue; [`reserve`](Self::reserve) takes a use.
pub struct Admission {
    gate: Gate,
    record: Arc<TokenRecord>,
    hash: SecretHash,
    /// The gate's invalidation generation when the record was read.
    generation: u64,
    queue: String,
}

impl Gate {
    /// Connects (lazily) to `database_url` and starts the listener, the
    /// flusher and the refusal writer. Checks answer `auth_unavailable` until
    /// the listener is up; see [`wait_ready`](Self::wait_ready).
    pub fn start(
        database_url: &str,
        clock: Arc<dyn Clock>,
        config: GateConfig,
    ) -> Result<Self, TokenError> {
        let listen_config: tokio_postgres::Config = database_url
            .parse()
            .map_err(|e: tokio_postgres::Error| TokenError::Config(e.to_string()))?;
        let pool = crate::pool(database_url, config.pool_size)?;
        let per_minute = config.refusals_per_minute;
        let unknown = lookup::UnknownSecrets::new(config.unknown_ttl, config.unknown_max);
        let gate = Self {
            inner: Arc::new(Inner {
                pool,
                listen_config,
                clock,
                config,
                holder: Uuid::new_v4(),
                started: Instant::now(),
                healthy: AtomicBool::new(false),
                db_ok_at: AtomicU64::new(0),
                generation: AtomicU64::new(0),
                cache: RwLock::new(HashMap::new()),
                unknown: Mutex::new(unknown),
                lookups: Mutex::new(lookup::PendingLookups::default()),
                lookup_wanted: tokio::sync::Notify::new(),
                lookup_queries: AtomicU64::new(0),
                unready: Mutex::new("the token database is not connected yet".into()),
                quotas: RwLock::new(HashMap::new()),
                refusals: Mutex::new(RefusalBuffer::new(per_minute)),
                refusals_waiting: tokio::sync::Notify::new(),
                refusal_writer: Mutex::new(None),
                flushing: tokio::sync::Mutex::new(()),
                shutdown: CancellationToken::new(),
            }),
        };
        tokio::spawn(gate.clone().listen());
        tokio::spawn(gate.clone().lookup_loop());
        tokio::spawn(gate.clone().flush_loop());
        let writer = tokio::spawn(gate.clone().write_refusals());
        if let Ok(mut slot) = gate.inner.refusal_writer.lock() {
            *slot = Some(writer);
        }
        Ok(gate)
    }

    /// Whether checks can be answered (the LISTEN connection is up).
    pub fn is_ready(&self) -> bool {
        self.inner.healthy.load(Ordering::Acquire)
    }

    /// Waits until [`is_ready`](Self::is_ready), up to `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.is_ready() {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Refusals lost because the database could not store them for very
    /// long (see [`crate::refusals`]); a flood alone loses none.
    pub fn refusals_dropped(&self) -> u64 {
        self.inner.refusals.lock().map(|b| b.dropped()).unwrap_or(0)
    }

    /// Checks the `Authorization` header's token for `queue`. Refusals are recorded.
    pub async fn check(
        &self,
        authorization: Option<&str>,
        queue: &str,
    ) -> Result<Admission, Refusal> {
        let result = self.check_inner(authorization, queue).await;
        if let Err(refusal) = &result {
            self.record(refusal, queue);
        }
        result
    }

    async fn check_inner(
        &self,
        authorization: Option<&str>,
        queue: &str,
    ) -> Result<Admission, Refusal> {
        let Some(candidate) = bearer(authorization) else {
            return Err(Refusal::new(
                Reason::MissingToken,
                None,
                "send `Authorization: Bearer <token>`",
            ));
        };
        if !secret::well_formed(candidate) {
            return Err(Refusal::new(
                Reason::InvalidToken,
                None,
                "this is not a warren token (wrong shape or checksum)",
            ));
        }
        let hash = secret::hash(candidate);
        let (record, generation) = self.find(hash).await?;
        record.check(queue, self.inner.clock.now())?;
        Ok(Admission {
            gate: self.clone(),
            record,
            hash,
            generation,
            queue: queue.to_string(),
        })
    }

    /// The token with this hash, from the cache or the database, and the
    /// invalidation generation it is at least as new as.
    async fn find(&self, hash: SecretHash) -> Result<(Arc<TokenRecord>, u64), Refusal> {
        if !self.is_ready() {
            return Err(unavailable(&self.unready_reason()));
        }
        let generation = self.inner.generation.load(Ordering::Acquire);
        let not_known = || Refusal::new(Reason::InvalidToken, None, "this token is not known");
        if let Some(record) = self.cached(&hash) {
            return Ok((record, generation));
        }
        if self.known_unknown(&hash) {
            return Err(not_known());
        }
        let record = self
            .lookup(hash)
            .await
            .map_err(|e| unavailable(&e.to_string()))?
            .ok_or_else(not_known)?;
        Ok((record, generation))
    }

    /// Why checks cannot be answered now.
    pub(super) fn unready_reason(&self) -> String {
        self.inner
            .unready
            .lock()
            .map(|why| why.clone())
            .unwrap_or_default()
    }

    fn record(&self, refusal: &Refusal, queue: &str) {
        if refusal.reason == Reason::AuthUnavailable {
            return;
        }
        let event = RefusalEvent {
            token_id: refusal.token_id,
            reason: refusal.reason,
            queue: Some(queue.to_string()),
            at: self.inner.clock.now(),
        };
        let waiting = match self.inner.refusals.lock() {
            Ok(mut buffer) => {
                buffer.add(event);
                buffer.pending_rows()
            }
            Err(_) => 0,
        };
        if waiting >= 200 {
            self.inner.refusals_waiting.notify_one();
        }
    }
}

fn unavailable(why: &str) -> Refusal {
    Refusal {
        reason: Reason::AuthUnavailable,
        token_id: None,
        detail: format!("tokens cannot be checked right now ({why}); retry later"),
        retry_after: Some(1),
    }
}

/// The token in `Authorization: Bearer <token>`, if any.
fn bearer(header: Option<&str>) -> Option<&str> {
    let header = header?.trim();
    let (scheme, token) = header.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(None), None);
    }
}
