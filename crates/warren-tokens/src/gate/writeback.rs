//! Background work: spent uses written back, idle leases returned, leases
//! renewed, refusals stored and compacted, and the orderly close.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::NaiveDate;

use super::Gate;
use super::lease::Quota;
use crate::error::TokenError;
use crate::refusals;

impl Gate {
    pub(super) async fn flush_loop(self) {
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
        let _one_at_a_time = self.inner.flushing.lock().await;
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
    pub(super) async fn write_refusals(self) {
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
