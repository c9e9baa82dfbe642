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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use futures::StreamExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::clock::Clock;
use crate::error::TokenError;
use crate::model::{Limit, Reason, Refusal, TokenRecord};
use crate::refusals::{self, RefusalBuffer, RefusalEvent};
use crate::secret::{self, SecretHash};

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
    quotas: RwLock<HashMap<Uuid, Arc<Quota>>>,
    refusals: Mutex<RefusalBuffer>,
    /// Wakes the refusal writer early when many single rows wait.
    refusals_waiting: tokio::sync::Notify,
    refusal_writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    shutdown: CancellationToken,
}

/// Uses of one token this replica holds.
struct Quota {
    token_id: Uuid,
    limited: bool,
    state: Mutex<QuotaState>,
    /// One lease request per token at a time.
    refill: tokio::sync::Mutex<()>,
}

struct QuotaState {
    period: NaiveDate,
    /// Leased, not yet handed out.
    available: u64,
    /// Handed out and committed, not yet written back.
    spent: u64,
    last_used: Instant,
    exhausted_until: Option<Instant>,
    /// When `available` falls to this, the next lease is taken in the
    /// background, so a hot token's requests do not wait for the database.
    low_water: u64,
    /// A background lease request is under way.
    prefetching: bool,
    /// The size of the next lease, and when the last one was granted.
    lease_size: u64,
    leased_at: Instant,
    /// Earlier periods' leftovers: (period, unspent to return, spent to write).
    retired: Vec<(NaiveDate, u64, u64)>,
    /// Committed uses per UTC day, not yet written back.
    daily: Vec<(NaiveDate, u64)>,
}

impl QuotaState {
    fn new(period: NaiveDate, lease_size: u64) -> Self {
        Self {
            period,
            available: 0,
            spent: 0,
            last_used: Instant::now(),
            exhausted_until: None,
            low_water: 0,
            prefetching: false,
            lease_size: lease_size.max(1),
            leased_at: Instant::now(),
            retired: Vec::new(),
            daily: Vec::new(),
        }
    }

    fn roll(&mut self, period: NaiveDate) {
        if period > self.period {
            if self.available > 0 || self.spent > 0 {
                self.retired.push((self.period, self.available, self.spent));
            }
            self.period = period;
            self.available = 0;
            self.spent = 0;
            self.exhausted_until = None;
        }
    }

    fn add_daily(&mut self, day: NaiveDate, n: u64) {
        match self.daily.iter_mut().find(|(d, _)| *d == day) {
            Some(slot) => slot.1 += n,
            None => self.daily.push((day, n)),
        }
    }
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

/// One reserved use. [`commit`](Self::commit) spends it; dropping gives it back.
pub struct Ticket {
    gate: Gate,
    quota: Arc<Quota>,
    period: NaiveDate,
    committed: bool,
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
                quotas: RwLock::new(HashMap::new()),
                refusals: Mutex::new(RefusalBuffer::new(per_minute)),
                refusals_waiting: tokio::sync::Notify::new(),
                refusal_writer: Mutex::new(None),
                shutdown: CancellationToken::new(),
            }),
        };
        tokio::spawn(gate.clone().listen());
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
            return Err(unavailable("the token database cannot be reached"));
        }
        let generation = self.inner.generation.load(Ordering::Acquire);
        let record = match self.cached(&hash) {
            Some(record) => record,
            None => self
                .lookup(hash, generation)
                .await
                .map_err(|e| unavailable(&e.to_string()))?
                .ok_or_else(|| {
                    Refusal::new(Reason::InvalidToken, None, "this token is not known")
                })?,
        };
        Ok((record, generation))
    }

    fn cached(&self, hash: &SecretHash) -> Option<Arc<TokenRecord>> {
        self.inner.cache.read().ok()?.get(hash).cloned()
    }

    async fn lookup(
        &self,
        hash: SecretHash,
        generation: u64,
    ) -> Result<Option<Arc<TokenRecord>>, TokenError> {
        let client = self.inner.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT id, limit_kind, limit_value, queues, expires_at, revoked_at IS NOT NULL
                 FROM tokens WHERE secret_hash = $1",
                &[&hash.as_slice()],
            )
            .await
            .map_err(TokenError::db("looking up a token"))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let kind: String = row.get(1);
        let limit = Limit::from_parts(&kind, row.get(2))
            .ok_or_else(|| TokenError::Invalid(format!("stored limit {kind:?}")))?;
        let record = Arc::new(TokenRecord {
            id: row.get(0),
            limit,
            queues: row.get(3),
            expires_at: row.get(4),
            revoked: row.get(5),
        });
        if let Ok(mut cache) = self.inner.cache.write()
            && self.inner.generation.load(Ordering::Acquire) == generation
            && self.is_ready()
        {
            cache.insert(hash, record.clone());
        }
        Ok(Some(record))
    }

    fn invalidate(&self, token_id: Option<Uuid>) {
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut cache) = self.inner.cache.write() {
            match token_id {
                Some(id) => cache.retain(|_, record| record.id != id),
                None => cache.clear(),
            }
        }
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

    fn quota(&self, record: &TokenRecord, period: NaiveDate) -> Arc<Quota> {
        if let Some(quota) = self
            .inner
            .quotas
            .read()
            .ok()
            .and_then(|q| q.get(&record.id).cloned())
        {
            return quota;
        }
        let fresh = Arc::new(Quota {
            token_id: record.id,
            limited: record.limit.value().is_some(),
            state: Mutex::new(QuotaState::new(period, self.inner.config.lease_min)),
            refill: tokio::sync::Mutex::new(()),
        });
        match self.inner.quotas.write() {
            Ok(mut quotas) => quotas.entry(record.id).or_insert(fresh).clone(),
            Err(_) => fresh,
        }
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.inner.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn mark_db_ok(&self) {
        self.inner
            .db_ok_at
            .store(self.elapsed_ms(), Ordering::Release);
    }

    fn leases_valid(&self) -> bool {
        let age = self
            .elapsed_ms()
            .saturating_sub(self.inner.db_ok_at.load(Ordering::Acquire));
        self.is_ready() && Duration::from_millis(age) < self.inner.config.lease_valid_for
    }

    /// Takes a lease of up to `size` uses for `token_id` in `period`; 0 when spent.
    async fn acquire(
        &self,
        token_id: Uuid,
        period: NaiveDate,
        limit: u64,
        size: u64,
    ) -> Result<u64, TokenError> {
        let config = &self.inner.config;
        let mut client = self.inner.pool.get().await?;
        let tx = client
            .transaction()
            .await
            .map_err(TokenError::db("starting a lease"))?;
        tx.execute(
            "INSERT INTO token_usage (token_id, period) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&token_id, &period],
        )
        .await
        .map_err(TokenError::db("creating a usage row"))?;
        let row = tx
            .query_one(
                "SELECT used, leased FROM token_usage WHERE token_id = $1 AND period = $2
                 FOR NO KEY UPDATE",
                &[&token_id, &period],
            )
            .await
            .map_err(TokenError::db("locking a usage row"))?;
        let (mut used, mut leased): (i64, i64) = (row.get(0), row.get(1));
        let stale_secs = config.stale_after.as_secs_f64();
        let stale: i64 = tx
            .query_one(
                "WITH gone AS (DELETE FROM token_leases
                     WHERE token_id = $1 AND period = $2 AND renewed_at < now() - make_interval(secs => $3)
                     RETURNING held)
                 SELECT COALESCE(SUM(held), 0)::bigint FROM gone",
                &[&token_id, &period, &stale_secs],
            )
            .await
            .map_err(TokenError::db("reclaiming stale leases"))?
            .get(0);
        if stale > 0 {
            tracing::warn!(%token_id, stale, "reclaimed stale leases (counted as spent)");
            tx.execute(
                "UPDATE token_usage SET used = used + $3, leased = leased - $3
                 WHERE token_id = $1 AND period = $2",
                &[&token_id, &period, &stale],
            )
            .await
            .map_err(TokenError::db("reclaiming stale leases"))?;
            used += stale;
            leased -= stale;
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let remaining = u64::try_from(limit - used - leased).unwrap_or(0);
        let grant = if remaining == 0 {
            0
        } else {
            (remaining / config.lease_divisor.max(1))
                .clamp(1, size.max(1))
                .min(remaining)
        };
        if grant > 0 {
            let grant_i = i64::try_from(grant).unwrap_or(0);
            tx.execute(
                "UPDATE token_usage SET leased = leased + $3 WHERE token_id = $1 AND period = $2",
                &[&token_id, &period, &grant_i],
            )
            .await
            .map_err(TokenError::db("taking a lease"))?;
            tx.execute(
                "INSERT INTO token_leases (token_id, period, holder, held) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (token_id, period, holder)
                 DO UPDATE SET held = token_leases.held + EXCLUDED.held, renewed_at = now()",
                &[&token_id, &period, &self.inner.holder, &grant_i],
            )
            .await
            .map_err(TokenError::db("recording a lease"))?;
        }
        tx.commit()
            .await
            .map_err(TokenError::db("committing a lease"))?;
        self.mark_db_ok();
        Ok(grant)
    }

    /// Keeps one LISTEN connection up; the gate is ready only while it is.
    async fn listen(self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.inner.shutdown.is_cancelled() {
                break;
            }
            match self.listen_once().await {
                Ok(()) => break,
                Err(err) => {
                    tracing::warn!(error = %err, "token listener lost; refusing with auth_unavailable until it is back");
                }
            }
            self.inner.healthy.store(false, Ordering::Release);
            self.invalidate(None);
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
        self.inner.healthy.store(false, Ordering::Release);
    }

    async fn listen_once(&self) -> Result<(), TokenError> {
        let connect = self.inner.listen_config.connect(tokio_postgres::NoTls);
        let (client, mut connection) = tokio::time::timeout(Duration::from_secs(3), connect)
            .await
            .map_err(|_| TokenError::Pool("connecting the listener timed out".into()))?
            .map_err(TokenError::db("connecting the listener"))?;
        let (note_tx, mut notes) = mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(tokio_postgres::AsyncMessage::Notification(note)) => {
                        if note_tx.send(Some(note.payload().to_string())).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            let _ = note_tx.send(None);
        });
        let result = async {
            client
                .batch_execute("LISTEN warren_tokens")
                .await
                .map_err(TokenError::db("LISTEN warren_tokens"))?;
            // Anything cached before this point may have missed a notification.
            self.invalidate(None);
            self.inner.healthy.store(true, Ordering::Release);
            self.mark_db_ok();
            tracing::info!("token listener connected");
            let mut ping = tokio::time::interval(self.inner.config.ping_interval);
            loop {
                tokio::select! {
                    _ = self.inner.shutdown.cancelled() => return Ok(()),
                    note = notes.recv() => match note {
                        Some(Some(payload)) => self.invalidate(Some(payload.parse().unwrap_or(Uuid::nil())).filter(|id| !id.is_nil())),
                        _ => return Err(TokenError::Pool("the listener connection closed".into())),
                    },
                    _ = ping.tick() => {
                        let pong = tokio::time::timeout(Duration::from_secs(1), client.simple_query("SELECT 1")).await;
                        match pong {
                            Ok(Ok(_)) => self.mark_db_ok(),
                            Ok(Err(e)) => return Err(TokenError::db("pinging the listener")(e)),
                            Err(_) => return Err(TokenError::Pool("the listener ping timed out".into())),
                        }
                    }
                }
            }
        }
        .await;
        driver.abort();
        result
    }

    async fn flush_loop(self) {
        let mut tick = tokio::time::interval(self.inner.config.flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heartbeat = Instant::now();
        loop {
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            self.flush(false).await;
            if last_heartbeat.elapsed() >= self.inner.config.heartbeat {
                last_heartbeat = Instant::now();
                if let Err(err) = self.heartbeat().await {
                    tracing::warn!(error = %err, "renewing leases failed");
                }
            }
        }
    }

    async fn heartbeat(&self) -> Result<(), TokenError> {
        let client = self.inner.pool.get().await?;
        client
            .execute(
                "UPDATE token_leases SET renewed_at = now() WHERE holder = $1",
                &[&self.inner.holder],
            )
            .await
            .map_err(TokenError::db("renewing leases"))?;
        self.mark_db_ok();
        Ok(())
    }

    /// Writes spent uses back and returns idle leases (all leases when `closing`).
    async fn flush(&self, closing: bool) {
        let quotas: Vec<Arc<Quota>> = match self.inner.quotas.read() {
            Ok(q) => q.values().cloned().collect(),
            Err(_) => return,
        };
        for quota in quotas {
            let taken = {
                let Ok(mut st) = quota.state.lock() else {
                    continue;
                };
                let mut batches = std::mem::take(&mut st.retired);
                let idle = closing || st.last_used.elapsed() >= self.inner.config.idle_return;
                let give_back = if idle {
                    std::mem::take(&mut st.available)
                } else {
                    0
                };
                let spent = std::mem::take(&mut st.spent);
                if give_back > 0 || spent > 0 {
                    batches.push((st.period, give_back, spent));
                }
                let daily = std::mem::take(&mut st.daily);
                (batches, daily)
            };
            if taken.0.is_empty() && taken.1.is_empty() {
                continue;
            }
            if let Err(err) = self.write_back(&quota, &taken.0, &taken.1).await {
                tracing::warn!(error = %err, token_id = %quota.token_id, "writing uses back failed; will retry");
                if let Ok(mut st) = quota.state.lock() {
                    for (period, give_back, spent) in taken.0 {
                        if period == st.period {
                            st.available += give_back;
                            st.spent += spent;
                        } else {
                            st.retired.push((period, give_back, spent));
                        }
                    }
                    for (day, n) in taken.1 {
                        st.add_daily(day, n);
                    }
                }
            } else {
                self.mark_db_ok();
            }
        }
    }

    async fn write_back(
        &self,
        quota: &Quota,
        batches: &[(NaiveDate, u64, u64)],
        daily: &[(NaiveDate, u64)],
    ) -> Result<(), TokenError> {
        let mut client = self.inner.pool.get().await?;
        let tx = client
            .transaction()
            .await
            .map_err(TokenError::db("starting a write-back"))?;
        let id = quota.token_id;
        for &(period, give_back, spent) in batches {
            let (give_back, spent) = (
                i64::try_from(give_back).unwrap_or(0),
                i64::try_from(spent).unwrap_or(0),
            );
            if quota.limited {
                // The usage row first, in the same order as a lease, or the two deadlock.
                tx.execute(
                    "SELECT 1 FROM token_usage WHERE token_id = $1 AND period = $2 FOR NO KEY UPDATE",
                    &[&id, &period],
                )
                .await
                .map_err(TokenError::db("locking a usage row"))?;
                let moved = tx
                    .execute(
                        "UPDATE token_leases SET held = held - $4, renewed_at = now()
                         WHERE token_id = $1 AND period = $2 AND holder = $3 AND held >= $4",
                        &[&id, &period, &self.inner.holder, &(give_back + spent)],
                    )
                    .await
                    .map_err(TokenError::db("shrinking a lease"))?;
                // No lease row: it was reclaimed as stale and already counted as spent.
                if moved == 1 {
                    tx.execute(
                        "UPDATE token_usage SET used = used + $3, leased = leased - $4
                         WHERE token_id = $1 AND period = $2",
                        &[&id, &period, &spent, &(give_back + spent)],
                    )
                    .await
                    .map_err(TokenError::db("writing uses back"))?;
                }
            } else if spent > 0 {
                tx.execute(
                    "INSERT INTO token_usage (token_id, period, used) VALUES ($1, $2, $3)
                     ON CONFLICT (token_id, period) DO UPDATE SET used = token_usage.used + EXCLUDED.used",
                    &[&id, &period, &spent],
                )
                .await
                .map_err(TokenError::db("writing uses back"))?;
            }
        }
        for &(day, n) in daily {
            let n = i64::try_from(n).unwrap_or(0);
            tx.execute(
                "INSERT INTO token_daily_uses (token_id, day, uses) VALUES ($1, $2, $3)
                 ON CONFLICT (token_id, day) DO UPDATE SET uses = token_daily_uses.uses + EXCLUDED.uses",
                &[&id, &day, &n],
            )
            .await
            .map_err(TokenError::db("writing uses per day"))?;
        }
        tx.commit()
            .await
            .map_err(TokenError::db("committing a write-back"))?;
        Ok(())
    }

    /// Writes back every spent use, returns every unspent lease, stores the
    /// refusals still in memory and stops the background tasks. Call at
    /// shutdown, after the last request.
    pub async fn close(&self) {
        self.inner.shutdown.cancel();
        self.flush(true).await;
        if let Ok(client) = self.inner.pool.get().await {
            let _ = client
                .execute(
                    "DELETE FROM token_leases WHERE holder = $1 AND held = 0",
                    &[&self.inner.holder],
                )
                .await;
        }
        self.inner.healthy.store(false, Ordering::Release);
        let writer = self
            .inner
            .refusal_writer
            .lock()
            .ok()
            .and_then(|mut w| w.take());
        if let Some(writer) = writer {
            let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
        }
    }

    /// Stores the refusals counted in memory: every 500 ms, sooner when many
    /// single rows wait, and once more at shutdown. Folds and deletes old
    /// rows every `refusal_compact_every`.
    async fn write_refusals(self) {
        let config = &self.inner.config;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut compact = tokio::time::interval(config.refusal_compact_every);
        compact.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut closing = false;
            tokio::select! {
                _ = self.inner.refusals_waiting.notified() => {}
                _ = tick.tick() => {}
                _ = compact.tick() => {
                    if let Err(err) = self.compact_refusals().await {
                        tracing::warn!(error = %err, "compacting refusals failed; will retry");
                    }
                }
                _ = self.inner.shutdown.cancelled() => closing = true,
            }
            self.store_refusals().await;
            if closing {
                break;
            }
        }
    }

    /// Writes what the refusal buffer holds; puts it back on failure.
    async fn store_refusals(&self) {
        let now = self.inner.clock.now();
        let batch = match self.inner.refusals.lock() {
            Ok(mut buffer) => buffer.take(now),
            Err(_) => return,
        };
        if batch.is_empty() {
            return;
        }
        let written = match self.inner.pool.get().await {
            Ok(mut client) => batch.write(&mut client).await,
            Err(err) => Err(err.into()),
        };
        if let Err(err) = written {
            tracing::warn!(error = %err, "storing refusals failed; will retry");
            if let Ok(mut buffer) = self.inner.refusals.lock() {
                buffer.restore(batch);
            }
        }
    }

    /// Folds refusal rows past `refusal_detail_for` into days and deletes
    /// those past `refusal_retention` (see [`crate::refusals::compact`]).
    pub async fn compact_refusals(&self) -> Result<refusals::Compaction, TokenError> {
        let config = &self.inner.config;
        let mut client = self.inner.pool.get().await?;
        let to_chrono =
            |d: Duration| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
        refusals::compact(
            &mut client,
            self.inner.clock.now(),
            to_chrono(config.refusal_detail_for),
            to_chrono(config.refusal_retention),
        )
        .await
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

impl Admission {
    pub fn token_id(&self) -> Uuid {
        self.record.id
    }

    /// Takes one use: from this replica's lease, or a new lease from the database.
    pub async fn reserve(self) -> Result<Ticket, Refusal> {
        let result = self.reserve_inner().await;
        if let Err(refusal) = &result {
            self.gate.record(refusal, &self.queue);
        }
        result
    }

    async fn reserve_inner(&self) -> Result<Ticket, Refusal> {
        let gate = &self.gate;
        let now = gate.inner.clock.now();
        // The body may have taken a while: a token revoked (any token changed)
        // since the check is read again, and its expiry is checked again.
        if gate.inner.generation.load(Ordering::Acquire) != self.generation {
            let (record, _) = gate.find(self.hash).await?;
            record.check(&self.queue, now)?;
        }
        self.record.check(&self.queue, now)?;
        let limit = self.record.limit;
        let period = limit.period(now);
        let quota = gate.quota(&self.record, period);
        let ticket = |quota: &Arc<Quota>| Ticket {
            gate: gate.clone(),
            quota: quota.clone(),
            period,
            committed: false,
        };
        let Some(max) = limit.value() else {
            return Ok(ticket(&quota));
        };
        loop {
            {
                let mut st = lock(&quota.state);
                st.roll(period);
                if st.available > 0 && gate.leases_valid() {
                    st.available -= 1;
                    st.last_used = Instant::now();
                    if st.available <= st.low_water && !st.prefetching {
                        st.prefetching = true;
                        tokio::spawn(gate.clone().prefetch(quota.clone(), period, max));
                    }
                    return Ok(ticket(&quota));
                }
                if st
                    .exhausted_until
                    .is_some_and(|until| Instant::now() < until)
                {
                    return Err(Refusal::spent(limit, self.record.id, now));
                }
            }
            if !gate.is_ready() {
                return Err(unavailable("the token database cannot be reached"));
            }
            let _refill = quota.refill.lock().await;
            {
                let st = lock(&quota.state);
                if st.period == period && st.available > 0 && gate.leases_valid() {
                    continue;
                }
                if st
                    .exhausted_until
                    .is_some_and(|until| Instant::now() < until)
                {
                    continue;
                }
            }
            let size = lock(&quota.state).next_lease_size(&gate.inner.config);
            let grant = gate
                .acquire(self.record.id, period, max, size)
                .await
                .map_err(|e| unavailable(&e.to_string()))?;
            let mut st = lock(&quota.state);
            st.roll(period);
            if grant == 0 {
                st.exhausted_until = Some(Instant::now() + gate.inner.config.exhausted_recheck);
                return Err(Refusal::spent(limit, self.record.id, now));
            }
            st.add_lease(period, grant);
        }
    }
}

impl QuotaState {
    /// The next lease's size: doubled when the last one went faster than
    /// `lease_target`, halved when it lasted over four times that.
    fn next_lease_size(&mut self, config: &GateConfig) -> u64 {
        let lasted = self.leased_at.elapsed();
        let (min, max) = (config.lease_min.max(1), config.lease_max.max(1));
        if lasted < config.lease_target {
            self.lease_size = (self.lease_size * 2).min(max);
        } else if lasted > config.lease_target * 4 {
            self.lease_size = (self.lease_size / 2).max(min);
        }
        self.lease_size.clamp(min.min(max), max)
    }

    /// Adds a granted lease of `grant` uses for `period`.
    fn add_lease(&mut self, period: NaiveDate, grant: u64) {
        self.roll(period);
        self.exhausted_until = None;
        self.leased_at = Instant::now();
        if self.period == period {
            self.available += grant;
            self.low_water = grant / 2;
        } else {
            self.retired.push((period, grant, 0));
        }
    }
}

impl Gate {
    /// Takes the next lease of a hot token in the background (see `low_water`).
    async fn prefetch(self, quota: Arc<Quota>, period: NaiveDate, limit: u64) {
        let guard = quota.refill.lock().await;
        let wanted = {
            let st = lock(&quota.state);
            st.period == period && st.available <= st.low_water
        };
        let size = lock(&quota.state).next_lease_size(&self.inner.config);
        let grant = if wanted {
            Some(self.acquire(quota.token_id, period, limit, size).await)
        } else {
            None
        };
        let mut st = lock(&quota.state);
        st.prefetching = false;
        match grant {
            Some(Ok(grant)) if grant > 0 => st.add_lease(period, grant),
            // Spent: no more prefetching until a request gets a lease itself.
            Some(Ok(_)) => st.low_water = 0,
            // The database failed: the next request that runs out asks itself.
            Some(Err(err)) => tracing::debug!(error = %err, "prefetching a lease failed"),
            None => {}
        }
        drop(st);
        drop(guard);
    }
}

fn lock(state: &Mutex<QuotaState>) -> std::sync::MutexGuard<'_, QuotaState> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Ticket {
    /// The job was accepted: the use is spent.
    pub fn commit(mut self) {
        self.committed = true;
        let day = self.gate.inner.clock.now().date_naive();
        let mut st = lock(&self.quota.state);
        if st.period == self.period {
            st.spent += 1;
        } else {
            st.retired.push((self.period, 0, 1));
        }
        st.add_daily(day, 1);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.committed || !self.quota.limited {
            return;
        }
        let mut st = lock(&self.quota.state);
        if st.period == self.period {
            st.available += 1;
        } else {
            st.retired.push((self.period, 1, 0));
        }
    }
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

    #[test]
    fn leases_grow_for_a_hot_token_and_shrink_when_it_cools() {
        let config = GateConfig::default();
        let mut st = QuotaState::new(NaiveDate::MIN, config.lease_min);
        // Leases used up at once: doubling up to lease_max, never past it.
        let sizes: Vec<u64> = (0..8)
            .map(|_| {
                st.leased_at = Instant::now();
                st.next_lease_size(&config)
            })
            .collect();
        assert_eq!(sizes, [128, 256, 512, 1024, 2048, 4096, 4096, 4096]);
        // A lease that lasted long: halving, down to lease_min.
        let long_ago = Instant::now() - config.lease_target * 5;
        let sizes: Vec<u64> = (0..8)
            .map(|_| {
                st.leased_at = long_ago;
                st.next_lease_size(&config)
            })
            .collect();
        assert_eq!(sizes, [2048, 1024, 512, 256, 128, 64, 64, 64]);
        // Granting a lease sets the point where the next is prefetched.
        st.add_lease(NaiveDate::MIN, 64);
        assert_eq!((st.available, st.low_water), (64, 32));
    }
}
