//! Acks around the consumer cancel on SIGTERM.
//!
//! Every ack (and poison reject) gives the consumer one more delivery of
//! credit, and the queue hands it the next ready job at once. On RabbitMQ
//! (3.10's quorum queues at least) the channel stops forwarding to a consumer
//! as soon as it handles its `basic.cancel`, while the queue may still hand
//! that consumer a job until it applies the cancel: such a job never reaches
//! the worker, stays checked out to the cancelled consumer and goes back to
//! the queue when the channel closes, flagged redelivered (and counted
//! towards the queue's delivery limit). That is what a scale-in saw: a
//! worker that acked a job a few milliseconds before its SIGTERM
//! (tests/sigterm_race.rs reproduces it).
//!
//! What this does not cover: a job *published* during the few milliseconds
//! the queue takes to apply the cancel of an idle worker (spare credit) can
//! meet the same fate. Only a consumer with no credit left at the cancel is
//! safe from that, and an idle one always has credit.
//!
//! So on SIGTERM the worker:
//! 1. closes the [`SettleGate`]: no ack leaves until every cancel is
//!    answered (acks sent after the `basic.cancel` reach the queue after it,
//!    so they give credit to a consumer that no longer exists);
//! 2. waits until [`ACK_SETTLE`] has passed since the last ack it sent, taking
//!    the jobs those acks made the broker push (they arrive well within that
//!    time: a few milliseconds here, under load);
//! 3. cancels its consumers, opens the gate, finishes what it holds.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::{RwLock, RwLockWriteGuard};

/// How long after its last ack a stopping worker still waits for a job the
/// broker may push for that ack, before it cancels its consumers. The broker
/// pushes within its commit latency (milliseconds; tens under heavy load):
/// one second leaves a wide margin and delays the exit of a worker that was
/// just busy by at most that.
pub const ACK_SETTLE: Duration = Duration::from_secs(1);

/// Lets acks through until the worker stops, then holds them while its
/// consumers are cancelled; remembers when the last one was sent.
#[derive(Debug, Default)]
pub struct SettleGate {
    gate: RwLock<()>,
    last: Mutex<Option<Instant>>,
}

impl SettleGate {
    /// Runs `settle` (an ack or reject) once the gate is open, and records
    /// when it was sent.
    pub async fn settle<T>(&self, settle: impl Future<Output = T>) -> T {
        let _open = self.gate.read().await;
        let result = settle.await;
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        result
    }

    /// Closes the gate once the acks being sent are out; acks wait until
    /// the guard is dropped.
    pub async fn close(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().await
    }

    /// When the broker may still push a job for the last ack sent: that
    /// ack's time plus [`ACK_SETTLE`] (`None`: no ack sent yet).
    pub fn quiet_at(&self) -> Option<Instant> {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|at| at + ACK_SETTLE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn acks_wait_while_the_gate_is_closed_and_are_timed() {
        let gate = Arc::new(SettleGate::default());
        assert_eq!(gate.quiet_at(), None);
        gate.settle(async {}).await;
        let first = gate.quiet_at().expect("an ack was sent");
        assert!(first > Instant::now(), "the settle time lies ahead");

        let closed = gate.close().await;
        let waiting = tokio::spawn({
            let gate = gate.clone();
            async move { gate.settle(async { 7 }).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the ack waits for the gate");
        assert_eq!(gate.quiet_at(), Some(first), "nothing sent meanwhile");
        drop(closed);
        assert_eq!(waiting.await.expect("the ack task"), 7);
        assert!(gate.quiet_at().expect("sent") >= first);
    }
}
