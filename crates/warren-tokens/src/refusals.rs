//! How refusals are stored without letting a flood grow the database.
//!
//! **In memory, per replica** ([`RefusalBuffer`]): refusals are keyed by
//! token; every refusal that carries no known token (`missing_token`,
//! `invalid_token`) shares ONE key, so a client spraying bad secrets is one
//! "token" here. Per key and UTC minute the first `per_minute` refusals
//! become one row each (`span = 'one'`); every further one is only counted,
//! into the bucket (key, reason, queue, minute). The queue is always one of
//! the sender's configured queues (others are 404 before any token check),
//! and reasons are a fixed set, so a minute of any flood adds at most
//! `per_minute` rows per key and replica plus one bucket row per (key,
//! reason, queue). Nothing is dropped: the counts of a flood are all kept.
//!
//! **In the database** ([`Batch::write`]): bucket rows (`span = 'minute'`)
//! are upserted on a unique index, so replicas add into the same row.
//!
//! **Over time** ([`compact`]): rows older than `detail_for` (default 24 h)
//! are folded into one row per (token, reason, queue, UTC day)
//! (`span = 'day'`, counts summed), and rows older than `retention`
//! (default 90 days) are deleted. Every sender replica runs this every few
//! minutes; an advisory lock lets only one do it at a time.
//!
//! So the table holds at most, per token (and once for "no token"):
//! `detail_for` worth of minutes × (`per_minute` × replicas + reasons ×
//! queues) rows, plus reasons × queues rows per retained day.

use std::collections::HashMap;

use chrono::{DateTime, Duration, DurationRound as _, Utc};
use uuid::Uuid;

use crate::error::TokenError;
use crate::model::Reason;

/// Rows held in memory at most (only reached while the database is down);
/// past it refusals are counted into buckets only.
const MAX_PENDING_ROWS: usize = 10_000;
/// Buckets held in memory at most while the database is down; past it
/// refusals are dropped and counted in [`RefusalBuffer::dropped`].
const MAX_PENDING_BUCKETS: usize = 100_000;
/// Advisory lock key for [`compact`]: one replica at a time.
const COMPACT_LOCK_KEY: i64 = 0x7761_7272_656e_0002;

/// One refused request.
#[derive(Debug, Clone)]
pub(crate) struct RefusalEvent {
    pub token_id: Option<Uuid>,
    pub reason: Reason,
    pub queue: Option<String>,
    pub at: DateTime<Utc>,
}

/// (token, reason, queue, UTC minute) of a bucket row.
type BucketKey = (Option<Uuid>, Reason, Option<String>, i64);

/// Refusals not yet stored.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    rows: Vec<RefusalEvent>,
    buckets: HashMap<BucketKey, u64>,
}

/// Refusals waiting for the writer, with each key's budget of single rows.
#[derive(Debug)]
pub(crate) struct RefusalBuffer {
    per_minute: u32,
    /// key → (minute, single rows used in it)
    budget: HashMap<Option<Uuid>, (i64, u32)>,
    pending: Batch,
    dropped: u64,
}

impl RefusalBuffer {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            budget: HashMap::new(),
            pending: Batch::default(),
            dropped: 0,
        }
    }

    pub fn add(&mut self, event: RefusalEvent) {
        let minute = event.at.timestamp().div_euclid(60);
        let slot = self.budget.entry(event.token_id).or_insert((minute, 0));
        if slot.0 != minute {
            *slot = (minute, 0);
        }
        if slot.1 < self.per_minute && self.pending.rows.len() < MAX_PENDING_ROWS {
            slot.1 += 1;
            self.pending.rows.push(event);
            return;
        }
        let key = (event.token_id, event.reason, event.queue, minute);
        if self.pending.buckets.len() >= MAX_PENDING_BUCKETS
            && !self.pending.buckets.contains_key(&key)
        {
            self.dropped += 1;
            return;
        }
        *self.pending.buckets.entry(key).or_insert(0) += 1;
    }

    /// Single rows waiting (the writer hurries when many are).
    pub fn pending_rows(&self) -> usize {
        self.pending.rows.len()
    }

    /// Refusals lost because the database was unreachable for very long.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Takes what waits, for the writer; forgets budgets of past minutes.
    pub fn take(&mut self, now: DateTime<Utc>) -> Batch {
        let now_minute = now.timestamp().div_euclid(60);
        self.budget
            .retain(|_, (minute, _)| *minute >= now_minute - 1);
        std::mem::take(&mut self.pending)
    }

    /// Puts back a batch the writer could not store.
    pub fn restore(&mut self, mut batch: Batch) {
        let room = MAX_PENDING_ROWS.saturating_sub(self.pending.rows.len());
        if batch.rows.len() > room {
            // Keep the newest single rows; count the rest into their buckets.
            for event in batch.rows.drain(..batch.rows.len() - room) {
                let minute = event.at.timestamp().div_euclid(60);
                *batch
                    .buckets
                    .entry((event.token_id, event.reason, event.queue, minute))
                    .or_insert(0) += 1;
            }
        }
        batch.rows.append(&mut self.pending.rows);
        self.pending.rows = batch.rows;
        for (key, n) in batch.buckets {
            *self.pending.buckets.entry(key).or_insert(0) += n;
        }
    }
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.buckets.is_empty()
    }

    /// Stores the batch in one transaction.
    pub async fn write(&self, client: &mut tokio_postgres::Client) -> Result<(), TokenError> {
        let tx = client
            .transaction()
            .await
            .map_err(TokenError::db("starting to store refusals"))?;
        for event in &self.rows {
            tx.execute(
                "INSERT INTO token_refusals (token_id, reason, queue, at) VALUES ($1, $2, $3, $4)",
                &[
                    &event.token_id,
                    &event.reason.code(),
                    &event.queue,
                    &event.at,
                ],
            )
            .await
            .map_err(TokenError::db("storing a refusal"))?;
        }
        for ((token_id, reason, queue, minute), count) in &self.buckets {
            let at = DateTime::<Utc>::from_timestamp(minute * 60, 0).unwrap_or_default();
            let count = i64::try_from(*count).unwrap_or(i64::MAX);
            tx.execute(
                "INSERT INTO token_refusals (token_id, reason, queue, at, count, aggregated, span)
                 VALUES ($1, $2, $3, $4, $5, true, 'minute')
                 ON CONFLICT (token_id, reason, queue, span, at) WHERE span <> 'one'
                 DO UPDATE SET count = token_refusals.count + EXCLUDED.count",
                &[token_id, &reason.code(), queue, &at, &count],
            )
            .await
            .map_err(TokenError::db("counting refusals"))?;
        }
        tx.commit()
            .await
            .map_err(TokenError::db("committing refusals"))
    }
}

/// What one [`compact`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compaction {
    /// Single and per-minute rows folded into per-day rows.
    pub folded: u64,
    /// Rows past the retention, deleted.
    pub deleted: u64,
    /// Another replica was compacting; nothing done.
    pub skipped: bool,
}

/// Folds refusal rows older than `detail_for` into per-day rows and deletes
/// rows older than `retention` (both measured back from `now`).
pub async fn compact(
    client: &mut tokio_postgres::Client,
    now: DateTime<Utc>,
    detail_for: Duration,
    retention: Duration,
) -> Result<Compaction, TokenError> {
    let tx = client
        .transaction()
        .await
        .map_err(TokenError::db("starting a refusal compaction"))?;
    let locked: bool = tx
        .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&COMPACT_LOCK_KEY])
        .await
        .map_err(TokenError::db("taking the compaction lock"))?
        .get(0);
    if !locked {
        return Ok(Compaction {
            skipped: true,
            ..Compaction::default()
        });
    }
    let detail_cutoff = now - detail_for;
    let folded: i64 = tx
        .query_one(
            "WITH old AS (
                 DELETE FROM token_refusals WHERE at < $1 AND span <> 'day'
                 RETURNING token_id, reason, queue, date_trunc('day', at, 'UTC') AS day, count
             ), folded AS (
                 INSERT INTO token_refusals (token_id, reason, queue, at, count, aggregated, span)
                 SELECT token_id, reason, queue, day, sum(count)::bigint, true, 'day'
                 FROM old GROUP BY token_id, reason, queue, day
                 ON CONFLICT (token_id, reason, queue, span, at) WHERE span <> 'one'
                 DO UPDATE SET count = token_refusals.count + EXCLUDED.count
             )
             SELECT count(*) FROM old",
            &[&detail_cutoff],
        )
        .await
        .map_err(TokenError::db("folding old refusals into days"))?
        .get(0);
    // Whole days only: a day row goes when its whole day is past the retention.
    let retention_cutoff = (now - retention)
        .duration_trunc(Duration::days(1))
        .unwrap_or(now - retention);
    let deleted = tx
        .execute(
            "DELETE FROM token_refusals WHERE at < $1",
            &[&retention_cutoff],
        )
        .await
        .map_err(TokenError::db("deleting refusals past the retention"))?;
    tx.commit()
        .await
        .map_err(TokenError::db("committing a refusal compaction"))?;
    Ok(Compaction {
        folded: u64::try_from(folded).unwrap_or(0),
        deleted,
        skipped: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(token: Option<Uuid>, reason: Reason, at: DateTime<Utc>) -> RefusalEvent {
        RefusalEvent {
            token_id: token,
            reason,
            queue: Some("jobs".into()),
            at,
        }
    }

    fn total(batch: &Batch) -> u64 {
        batch.rows.len() as u64 + batch.buckets.values().sum::<u64>()
    }

    #[test]
    fn refusals_past_the_rate_are_counted_into_buckets() {
        let mut buffer = RefusalBuffer::new(3);
        let at: DateTime<Utc> = "2026-05-01T10:00:30Z".parse().unwrap();
        let token = Some(Uuid::new_v4());
        for _ in 0..1000 {
            buffer.add(event(token, Reason::UsageExceeded, at));
        }
        // Unknown tokens share one budget whatever the reason.
        for i in 0..500 {
            let reason = if i % 2 == 0 {
                Reason::InvalidToken
            } else {
                Reason::MissingToken
            };
            buffer.add(event(None, reason, at));
        }
        assert_eq!(buffer.pending_rows(), 6);
        assert_eq!(buffer.pending.buckets.len(), 3);
        assert_eq!(
            buffer.pending.buckets[&(
                token,
                Reason::UsageExceeded,
                Some("jobs".into()),
                at.timestamp() / 60
            )],
            997
        );
        // A new minute gets a fresh budget.
        buffer.add(event(
            token,
            Reason::UsageExceeded,
            at + Duration::seconds(60),
        ));
        assert_eq!(buffer.pending_rows(), 7);
        let batch = buffer.take(at);
        assert_eq!(total(&batch), 1501, "every refusal is counted");
        assert!(buffer.take(at).is_empty());
    }

    #[test]
    fn a_batch_that_failed_goes_back_without_losing_counts() {
        let mut buffer = RefusalBuffer::new(2);
        let at: DateTime<Utc> = "2026-05-01T10:00:30Z".parse().unwrap();
        for _ in 0..10 {
            buffer.add(event(None, Reason::InvalidToken, at));
        }
        let failed = buffer.take(at);
        assert_eq!(total(&failed), 10);
        for _ in 0..5 {
            buffer.add(event(None, Reason::InvalidToken, at));
        }
        buffer.restore(failed);
        let batch = buffer.take(at);
        assert_eq!(total(&batch), 15);
        assert_eq!(batch.rows.len(), 2, "the minute's budget was spent before");
        assert_eq!(buffer.dropped(), 0);
    }
}
