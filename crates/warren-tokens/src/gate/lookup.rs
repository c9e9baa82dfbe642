//! Finding a token by its secret's hash: the cache, the database, and
//! forgetting what a notification says changed.
//!
//! **Unknown secrets cost (almost) nothing.** A well-formed secret the
//! database does not know is remembered as unknown for `unknown_ttl`
//! ([`UnknownSecrets`], at most `unknown_max` of them), so repeating it is
//! refused from memory. Lookups that do reach the database are batched: every
//! secret waiting when a batch starts is asked in ONE query (`secret_hash =
//! ANY(...)`, at most `lookup_batch_max`), and batches follow each other no
//! closer than `lookup_spacing`. A flood of distinct random secrets therefore
//! costs at most one query per `lookup_spacing`, not one per request. The
//! price: a token created after its secret was presented (only possible when
//! the secret was guessed or leaked before creation) is refused as unknown
//! for up to `unknown_ttl`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::Gate;
use crate::error::TokenError;
use crate::model::{Limit, TokenRecord};
use crate::secret::SecretHash;

/// What a lookup finds: the token, none, or why the database could not say.
type Found = Result<Option<Arc<TokenRecord>>, String>;

/// Lookups waiting for the next batch.
#[derive(Default)]
pub(super) struct PendingLookups {
    waiting: HashMap<SecretHash, Vec<oneshot::Sender<Found>>>,
}

impl PendingLookups {
    /// Takes up to `max` secrets and their waiters.
    fn take(&mut self, max: usize) -> Vec<(SecretHash, Vec<oneshot::Sender<Found>>)> {
        let hashes: Vec<SecretHash> = self.waiting.keys().take(max.max(1)).copied().collect();
        hashes
            .into_iter()
            .filter_map(|hash| self.waiting.remove_entry(&hash))
            .collect()
    }
}

/// Well-formed secrets the database did not know, and when it said so.
pub(super) struct UnknownSecrets {
    seen: HashMap<SecretHash, DateTime<Utc>>,
    ttl: chrono::Duration,
    max: usize,
}

impl UnknownSecrets {
    pub(super) fn new(ttl: Duration, max: usize) -> Self {
        Self {
            seen: HashMap::new(),
            ttl: chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::zero()),
            max: max.max(1),
        }
    }

    /// Whether `hash` was found unknown less than the TTL before `now`.
    pub(super) fn contains(&self, hash: &SecretHash, now: DateTime<Utc>) -> bool {
        self.seen.get(hash).is_some_and(|at| now - *at < self.ttl)
    }

    /// Remembers `hash` as unknown at `now`. When full, expired entries go
    /// first, then everything (the bound is kept; the cost is a few lookups).
    pub(super) fn insert(&mut self, hash: SecretHash, now: DateTime<Utc>) {
        if self.seen.len() >= self.max {
            let ttl = self.ttl;
            self.seen.retain(|_, at| now - *at < ttl);
            if self.seen.len() >= self.max {
                self.seen.clear();
            }
        }
        self.seen.insert(hash, now);
    }

    pub(super) fn clear(&mut self) {
        self.seen.clear();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.seen.len()
    }
}

impl Gate {
    pub(super) fn cached(&self, hash: &SecretHash) -> Option<Arc<TokenRecord>> {
        self.inner.cache.read().ok()?.get(hash).cloned()
    }

    /// Whether `hash` was recently found unknown.
    pub(super) fn known_unknown(&self, hash: &SecretHash) -> bool {
        let now = self.inner.clock.now();
        self.inner
            .unknown
            .lock()
            .is_ok_and(|unknown| unknown.contains(hash, now))
    }

    /// Queries made to find tokens so far (one per batch).
    pub fn lookup_queries(&self) -> u64 {
        self.inner.lookup_queries.load(Ordering::Relaxed)
    }

    /// The token with this hash, asked in the next batch.
    pub(super) async fn lookup(
        &self,
        hash: SecretHash,
    ) -> Result<Option<Arc<TokenRecord>>, TokenError> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut pending) = self.inner.lookups.lock() {
            pending.waiting.entry(hash).or_default().push(tx);
        }
        self.inner.lookup_wanted.notify_one();
        match tokio::time::timeout(Duration::from_secs(5), rx).await {
            Ok(Ok(found)) => found.map_err(TokenError::Pool),
            Ok(Err(_)) => Err(TokenError::Pool("the gate is closing".into())),
            Err(_) => Err(TokenError::Pool("looking up the token timed out".into())),
        }
    }

    /// Runs the lookup batches (see the module documentation).
    pub(super) async fn lookup_loop(self) {
        let config = &self.inner.config;
        loop {
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => break,
                _ = self.inner.lookup_wanted.notified() => {}
            }
            loop {
                let batch = match self.inner.lookups.lock() {
                    Ok(mut pending) => pending.take(config.lookup_batch_max),
                    Err(_) => Vec::new(),
                };
                if batch.is_empty() {
                    break;
                }
                self.answer(batch).await;
                tokio::select! {
                    _ = self.inner.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(config.lookup_spacing) => {}
                }
            }
        }
    }

    /// One query for a batch; the answers cached (known and unknown) and sent.
    async fn answer(&self, batch: Vec<(SecretHash, Vec<oneshot::Sender<Found>>)>) {
        let generation = self.inner.generation.load(Ordering::Acquire);
        let hashes: Vec<SecretHash> = batch.iter().map(|(hash, _)| *hash).collect();
        self.inner.lookup_queries.fetch_add(1, Ordering::Relaxed);
        let found = self.query(&hashes).await;
        if let Ok(found) = &found {
            self.remember(&hashes, found, generation);
        }
        for (hash, waiters) in batch {
            let answer: Found = match &found {
                Ok(found) => Ok(found.get(&hash).cloned()),
                Err(err) => Err(err.to_string()),
            };
            for waiter in waiters {
                let _ = waiter.send(answer.clone());
            }
        }
    }

    /// Caches what a batch found, unless an invalidation raced it.
    fn remember(
        &self,
        hashes: &[SecretHash],
        found: &HashMap<SecretHash, Arc<TokenRecord>>,
        generation: u64,
    ) {
        let coherent =
            || self.inner.generation.load(Ordering::Acquire) == generation && self.is_ready();
        if let Ok(mut cache) = self.inner.cache.write()
            && coherent()
        {
            cache.extend(found.iter().map(|(hash, record)| (*hash, record.clone())));
        }
        let now = self.inner.clock.now();
        if let Ok(mut unknown) = self.inner.unknown.lock()
            && coherent()
        {
            for hash in hashes.iter().filter(|hash| !found.contains_key(*hash)) {
                unknown.insert(*hash, now);
            }
        }
    }

    async fn query(
        &self,
        hashes: &[SecretHash],
    ) -> Result<HashMap<SecretHash, Arc<TokenRecord>>, TokenError> {
        let client = self.inner.pool.get().await?;
        let wanted: Vec<&[u8]> = hashes.iter().map(|hash| hash.as_slice()).collect();
        let rows = client
            .query(
                "SELECT secret_hash, id, limit_kind, limit_value, queues, expires_at,
                        revoked_at IS NOT NULL
                 FROM tokens WHERE secret_hash = ANY($1)",
                &[&wanted],
            )
            .await
            .map_err(TokenError::db("looking up tokens"))?;
        let mut found = HashMap::with_capacity(rows.len());
        for row in rows {
            let stored: Vec<u8> = row.get(0);
            let Ok(hash) = SecretHash::try_from(stored.as_slice()) else {
                continue;
            };
            let kind: String = row.get(2);
            let limit = Limit::from_parts(&kind, row.get(3))
                .ok_or_else(|| TokenError::Invalid(format!("stored limit {kind:?}")))?;
            let record = TokenRecord {
                id: row.get(1),
                limit,
                queues: row.get(4),
                expires_at: row.get(5),
                revoked: row.get(6),
            };
            found.insert(hash, Arc::new(record));
        }
        Ok(found)
    }

    pub(super) fn invalidate(&self, token_id: Option<Uuid>) {
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut cache) = self.inner.cache.write() {
            match token_id {
                Some(id) => cache.retain(|_, record| record.id != id),
                None => cache.clear(),
            }
        }
        if token_id.is_none()
            && let Ok(mut unknown) = self.inner.unknown.lock()
        {
            unknown.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_secrets_expire_and_stay_bounded() {
        let t0: DateTime<Utc> = "2026-06-01T00:00:00Z".parse().unwrap();
        let mut unknown = UnknownSecrets::new(Duration::from_secs(2), 3);
        unknown.insert([1; 32], t0);
        assert!(unknown.contains(&[1; 32], t0 + chrono::Duration::milliseconds(1999)));
        assert!(!unknown.contains(&[1; 32], t0 + chrono::Duration::seconds(2)));
        assert!(!unknown.contains(&[2; 32], t0));
        // Full: expired entries make room first...
        unknown.insert([2; 32], t0 + chrono::Duration::seconds(1));
        unknown.insert([3; 32], t0 + chrono::Duration::seconds(1));
        let later = t0 + chrono::Duration::seconds(2);
        unknown.insert([4; 32], later);
        assert_eq!(unknown.len(), 3);
        assert!(unknown.contains(&[2; 32], later) && unknown.contains(&[4; 32], later));
        // ...then everything, never more than the bound.
        unknown.insert([5; 32], later);
        assert_eq!(unknown.len(), 1);
        assert!(unknown.contains(&[5; 32], later));
    }

    #[test]
    fn a_batch_takes_at_most_its_size_and_each_waiter_once() {
        let mut pending = PendingLookups::default();
        for byte in 0..10u8 {
            let (tx, _rx) = oneshot::channel();
            pending.waiting.entry([byte; 32]).or_default().push(tx);
        }
        let (tx, _rx) = oneshot::channel();
        pending.waiting.entry([0; 32]).or_default().push(tx);
        let first = pending.take(4);
        let second = pending.take(100);
        assert_eq!((first.len(), second.len()), (4, 6));
        let waiters: usize = first.iter().chain(&second).map(|(_, w)| w.len()).sum();
        assert_eq!(waiters, 11);
        assert!(pending.take(100).is_empty());
    }
}
