//! The LISTEN connection: revocations within a second, and the gate's
//! readiness (checks answer `auth_unavailable` while it is down).

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt as _;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::Gate;
use crate::error::TokenError;

impl Gate {
    /// Keeps one LISTEN connection up; the gate is ready only while it is.
    pub(super) async fn listen(self) {
        let mut backoff = Duration::from_millis(100);
        let mut last_error = String::new();
        loop {
            if self.inner.shutdown.is_cancelled() {
                break;
            }
            match self.listen_once().await {
                Ok(()) => break,
                Err(err) => {
                    let error = err.to_string();
                    // Said once per distinct cause, not at every retry.
                    if error != last_error {
                        tracing::warn!(%error, "token database unusable; refusing with auth_unavailable until it is back");
                    }
                    if let Ok(mut why) = self.inner.unready.lock() {
                        why.clone_from(&error);
                    }
                    last_error = error;
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
            check_schema(&client).await?;
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
}

/// Fails unless the database holds the schema this build needs (the sender
/// does not migrate: `warren-admin` applies the migrations when it starts).
async fn check_schema(client: &tokio_postgres::Client) -> Result<(), TokenError> {
    let needed = crate::migrate::latest_version();
    let version = client
        .query_one(
            "SELECT COALESCE(max(version), 0) FROM warren_migrations",
            &[],
        )
        .await;
    let found = match version {
        Ok(row) => row.get::<_, i32>(0),
        Err(err) if err.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => 0,
        Err(err) => return Err(TokenError::db("reading the schema version")(err)),
    };
    if found < needed {
        return Err(TokenError::Schema { found, needed });
    }
    Ok(())
}
