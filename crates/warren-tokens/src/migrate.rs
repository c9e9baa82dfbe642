//! Schema migrations: SQL files under `migrations/`, compiled in, applied in
//! order, each in its own transaction, recorded in `warren_migrations`.
//! Concurrent starters (several admin replicas) serialize on an advisory lock.

use crate::error::TokenError;

/// (version, name, SQL), in order.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "tokens", include_str!("../migrations/0001_tokens.sql")),
    (
        2,
        "refusal_spans",
        include_str!("../migrations/0002_refusal_spans.sql"),
    ),
];

/// An arbitrary constant: the advisory lock key for migrations.
const LOCK_KEY: i64 = 0x7761_7272_656e_0001;

/// Applies the migrations this build knows and the database lacks; returns
/// how many were applied.
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<usize, TokenError> {
    let tx = client
        .transaction()
        .await
        .map_err(TokenError::db("starting the migration transaction"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await
        .map_err(TokenError::db("taking the migration lock"))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS warren_migrations (
             version integer PRIMARY KEY,
             name text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .map_err(TokenError::db("creating warren_migrations"))?;
    let applied: Vec<i32> = tx
        .query("SELECT version FROM warren_migrations", &[])
        .await
        .map_err(TokenError::db("reading warren_migrations"))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut count = 0;
    for &(version, name, sql) in MIGRATIONS {
        if applied.contains(&version) {
            continue;
        }
        let fail = |source| TokenError::Migration {
            version,
            name,
            source,
        };
        tx.batch_execute(sql).await.map_err(fail)?;
        tx.execute(
            "INSERT INTO warren_migrations (version, name) VALUES ($1, $2)",
            &[&version, &name],
        )
        .await
        .map_err(fail)?;
        tracing::info!(version, name, "applied migration");
        count += 1;
    }
    tx.commit()
        .await
        .map_err(TokenError::db("committing migrations"))?;
    Ok(count)
}

/// The newest migration this build knows.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map(|m| m.0).unwrap_or(0)
}
