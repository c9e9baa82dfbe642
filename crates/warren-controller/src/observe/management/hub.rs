//! [`QueueStatsHub`]: management API reads shared by every scaler of a
//! (broker, credentials, vhost) — one request per `max_age`, concurrent
//! callers wait for the same answer, failures are shared too.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{ConnectionUnacked, ManagementClient, ManagementEndpoint, StatsError, VhostQueues};

type Shared<T> = Result<Arc<T>, Arc<StatsError>>;

struct Cached<T> {
    at: Instant,
    value: Shared<T>,
}

type Slot<T> = Arc<tokio::sync::Mutex<Option<Cached<T>>>>;

#[derive(Clone, PartialEq, Eq, Hash)]
struct HubKey {
    endpoint: ManagementEndpoint,
    vhost: String,
}

/// Coalesces management API reads across scalers: at most one request (or
/// one walk of pages) per (broker, credentials, vhost) per `max_age`.
/// Failures are shared too, so a broken broker is not hammered by every scaler.
pub struct QueueStatsHub {
    client: ManagementClient,
    max_age: Duration,
    queues: std::sync::Mutex<HashMap<HubKey, Slot<VhostQueues>>>,
    connections: std::sync::Mutex<HashMap<HubKey, Slot<ConnectionUnacked>>>,
}

impl QueueStatsHub {
    pub fn new(client: ManagementClient, max_age: Duration) -> Self {
        Self {
            client,
            max_age,
            queues: Default::default(),
            connections: Default::default(),
        }
    }

    pub fn client(&self) -> &ManagementClient {
        &self.client
    }

    /// Every queue of the vhost, fresh within `max_age`.
    pub async fn vhost_queues(
        &self,
        endpoint: &ManagementEndpoint,
        vhost: &str,
    ) -> Shared<VhostQueues> {
        let slot = slot_for(&self.queues, endpoint, vhost);
        self.cached_or_fetch(slot, self.client.vhost_queues(endpoint, vhost))
            .await
    }

    /// Unacked messages per named connection of the vhost, fresh within `max_age`.
    pub async fn connection_unacked(
        &self,
        endpoint: &ManagementEndpoint,
        vhost: &str,
    ) -> Shared<ConnectionUnacked> {
        let slot = slot_for(&self.connections, endpoint, vhost);
        self.cached_or_fetch(slot, self.client.connection_unacked(endpoint, vhost))
            .await
    }

    /// The slot's answer if younger than `max_age`, else `fetch`'s (stored).
    /// Holding the slot's lock while fetching makes concurrent callers wait
    /// for the same answer instead of sending their own request; `fetch` is
    /// lazy and only polled on a miss.
    async fn cached_or_fetch<T>(
        &self,
        slot: Slot<T>,
        fetch: impl std::future::Future<Output = Result<T, StatsError>>,
    ) -> Shared<T> {
        let mut guard = slot.lock().await;
        if let Some(cached) = guard.as_ref()
            && cached.at.elapsed() < self.max_age
        {
            return cached.value.clone();
        }
        let value = fetch.await.map(Arc::new).map_err(Arc::new);
        *guard = Some(Cached {
            at: Instant::now(),
            value: value.clone(),
        });
        value
    }
}

fn slot_for<T>(
    map: &std::sync::Mutex<HashMap<HubKey, Slot<T>>>,
    endpoint: &ManagementEndpoint,
    vhost: &str,
) -> Slot<T> {
    let key = HubKey {
        endpoint: endpoint.clone(),
        vhost: vhost.to_string(),
    };
    // A poisoned lock only means another reconcile panicked mid-insert; the
    // map itself is still a valid map.
    let mut map = map.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    map.entry(key).or_default().clone()
}
