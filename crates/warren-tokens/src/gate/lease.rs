//! Uses held by this replica: leases taken from the database, handed out
//! from memory, spent by tickets (see the exactness rule in [`super`]).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use uuid::Uuid;

use super::{Admission, Gate, GateConfig, unavailable};
use crate::error::TokenError;
use crate::model::{Refusal, TokenRecord};

/// Uses of one token this replica holds.
pub(super) struct Quota {
    pub(super) token_id: Uuid,
    pub(super) limited: bool,
    pub(super) state: Mutex<QuotaState>,
    /// One lease request per token at a time.
    refill: tokio::sync::Mutex<()>,
}

pub(super) struct QuotaState {
    pub(super) period: NaiveDate,
    /// Leased, not yet handed out.
    pub(super) available: u64,
    /// Handed out and committed, not yet written back.
    pub(super) spent: u64,
    pub(super) last_used: Instant,
    pub(super) exhausted_until: Option<Instant>,
    /// When `available` falls to this, the next lease is taken in the
    /// background, so a hot token's requests do not wait for the database.
    pub(super) low_water: u64,
    /// A background lease request is under way.
    pub(super) prefetching: bool,
    /// The size of the next lease, and when the last one was granted.
    pub(super) lease_size: u64,
    pub(super) leased_at: Instant,
    /// Earlier periods' leftovers: (period, unspent to return, spent to write).
    pub(super) retired: Vec<(NaiveDate, u64, u64)>,
    /// Committed uses per UTC day, not yet written back.
    pub(super) daily: Vec<(NaiveDate, u64)>,
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

    pub(super) fn add_daily(&mut self, day: NaiveDate, n: u64) {
        match self.daily.iter_mut().find(|(d, _)| *d == day) {
            Some(slot) => slot.1 += n,
            None => self.daily.push((day, n)),
        }
    }
}

/// One reserved use. [`commit`](Self::commit) spends it; dropping gives it back.
pub struct Ticket {
    gate: Gate,
    quota: Arc<Quota>,
    period: NaiveDate,
    committed: bool,
}

impl Gate {
    pub(super) fn quota(&self, record: &TokenRecord, period: NaiveDate) -> Arc<Quota> {
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

    pub(super) fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.inner.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(super) fn mark_db_ok(&self) {
        self.inner
            .db_ok_at
            .store(self.elapsed_ms(), Ordering::Release);
    }

    pub(super) fn leases_valid(&self) -> bool {
        let age = self
            .elapsed_ms()
            .saturating_sub(self.inner.db_ok_at.load(Ordering::Acquire));
        self.is_ready() && Duration::from_millis(age) < self.inner.config.lease_valid_for
    }

    /// Takes a lease of up to `size` uses for `token_id` in `period`; 0 when spent.
    pub(super) async fn acquire(
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
        let stale = reclaim_stale(&tx, token_id, period, config.stale_after).await?;
        used += stale;
        leased -= stale;
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
                return Err(unavailable(&gate.unready_reason()));
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
    pub(super) async fn prefetch(self, quota: Arc<Quota>, period: NaiveDate, limit: u64) {
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

pub(super) fn lock(state: &Mutex<QuotaState>) -> std::sync::MutexGuard<'_, QuotaState> {
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

/// Deletes `token_id`'s leases in `period` not renewed for `stale_after` (a
/// crashed replica's) and counts what they held as spent; returns that count.
async fn reclaim_stale(
    tx: &tokio_postgres::Transaction<'_>,
    token_id: Uuid,
    period: NaiveDate,
    stale_after: Duration,
) -> Result<i64, TokenError> {
    let stale: i64 = tx
        .query_one(
            "WITH gone AS (DELETE FROM token_leases
                 WHERE token_id = $1 AND period = $2 AND renewed_at < now() - make_interval(secs => $3)
                 RETURNING held)
             SELECT COALESCE(SUM(held), 0)::bigint FROM gone",
            &[&token_id, &period, &stale_after.as_secs_f64()],
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
    }
    Ok(stale)
}

#[cfg(test)]
mod tests {
    use super::*;

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
