//! What the admin API, the panel and the CLI do: subjects, tokens, usage and
//! refusals in PostgreSQL. The sender never uses this module (see [`crate::gate`]).

use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use crate::clock::{Clock, month_start, next_month_start};
use crate::error::TokenError;
use crate::model::{LIFETIME, Limit, Reason, SubjectKind, SubjectRef};
use crate::secret::Secret;

/// A token to create.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct NewToken {
    pub subject: SubjectRef,
    pub limit: Limit,
    #[serde(default)]
    pub queues: Option<Vec<String>>,
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
}

/// The period a token's usage counts in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Period {
    /// `monthly` or `lifetime`.
    pub kind: &'static str,
    pub start: NaiveDate,
    /// When the next period begins (monthly tokens only).
    pub resets_at: Option<DateTime<Utc>>,
}

/// A token as the admin API shows it: never the secret, only its hint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenView {
    pub id: Uuid,
    pub subject: SubjectRef,
    pub limit: Limit,
    pub queues: Option<Vec<String>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked: bool,
    pub revoked_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    /// The secret's last four characters.
    pub hint: String,
    pub period: Period,
    /// Uses spent in the period.
    pub used: u64,
    /// Uses left in the period (null when unlimited).
    pub remaining: Option<u64>,
    /// Uses sender replicas hold right now and have not spent yet.
    pub leased: u64,
}

/// An application, group or user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubjectView {
    pub id: Uuid,
    pub kind: SubjectKind,
    pub name: String,
    /// A user's group.
    pub group: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A stored refusal, or (`aggregated`) `count` refusals of one token, reason
/// and queue in one UTC minute or day (`span`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DenialView {
    pub id: i64,
    pub token_id: Option<Uuid>,
    pub reason: String,
    pub queue: Option<String>,
    pub at: DateTime<Utc>,
    pub count: u64,
    pub aggregated: bool,
    /// `one`, `minute` or `day`: what the row covers.
    pub span: String,
}

/// Which refusals to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DenialFilter {
    pub token_id: Option<Uuid>,
    pub reason: Option<Reason>,
    pub limit: i64,
}

/// The admin side of the token database.
#[derive(Clone)]
pub struct Store {
    pool: deadpool_postgres::Pool,
    clock: Arc<dyn Clock>,
}

const TOKEN_SELECT: &str = "
    SELECT t.id, t.subject_kind, COALESCE(a.name, g.name, u.name), t.limit_kind, t.limit_value,
           t.queues, t.expires_at, t.revoked_at, t.created_at, t.hint,
           COALESCE(us.used, 0), COALESCE(us.leased, 0)
    FROM tokens t
    LEFT JOIN applications a ON a.id = t.application_id
    LEFT JOIN user_groups g ON g.id = t.group_id
    LEFT JOIN users u ON u.id = t.user_id
    LEFT JOIN token_usage us ON us.token_id = t.id
        AND us.period = CASE WHEN t.limit_kind = 'monthly' THEN $1::date ELSE DATE '1970-01-01' END";

fn as_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Store {
    pub fn new(pool: deadpool_postgres::Pool, clock: Arc<dyn Clock>) -> Self {
        Self { pool, clock }
    }

    pub fn pool(&self) -> &deadpool_postgres::Pool {
        &self.pool
    }

    /// Applies pending migrations.
    pub async fn migrate(&self) -> Result<usize, TokenError> {
        let mut client = self.pool.get().await?;
        crate::migrate::migrate(&mut client).await
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), TokenError> {
        let client = self.pool.get().await?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(TokenError::db("ping"))?;
        Ok(())
    }

    async fn insert_named(
        &self,
        kind: SubjectKind,
        name: &str,
        group: Option<&str>,
    ) -> Result<Uuid, TokenError> {
        let name = name.trim();
        if name.is_empty() || name.len() > 200 {
            return Err(TokenError::Invalid("a name has 1 to 200 characters".into()));
        }
        let client = self.pool.get().await?;
        let id = Uuid::new_v4();
        let result = match kind {
            SubjectKind::Application => {
                client
                    .execute(
                        "INSERT INTO applications (id, name) VALUES ($1, $2)",
                        &[&id, &name],
                    )
                    .await
            }
            SubjectKind::Group => {
                client
                    .execute(
                        "INSERT INTO user_groups (id, name) VALUES ($1, $2)",
                        &[&id, &name],
                    )
                    .await
            }
            SubjectKind::User => {
                let group_id = match group {
                    Some(group) => Some(self.subject_id(SubjectKind::Group, group).await?),
                    None => None,
                };
                client
                    .execute(
                        "INSERT INTO users (id, name, group_id) VALUES ($1, $2, $3)",
                        &[&id, &name, &group_id],
                    )
                    .await
            }
        };
        match result {
            Ok(_) => Ok(id),
            Err(err) if err.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                Err(TokenError::Exists {
                    kind: kind.as_str(),
                    name: name.to_string(),
                })
            }
            Err(err) => Err(TokenError::db("creating a subject")(err)),
        }
    }

    pub async fn create_application(&self, name: &str) -> Result<Uuid, TokenError> {
        self.insert_named(SubjectKind::Application, name, None)
            .await
    }

    pub async fn create_group(&self, name: &str) -> Result<Uuid, TokenError> {
        self.insert_named(SubjectKind::Group, name, None).await
    }

    pub async fn create_user(&self, name: &str, group: Option<&str>) -> Result<Uuid, TokenError> {
        self.insert_named(SubjectKind::User, name, group).await
    }

    async fn subject_id(&self, kind: SubjectKind, name: &str) -> Result<Uuid, TokenError> {
        let client = self.pool.get().await?;
        let table = match kind {
            SubjectKind::Application => "applications",
            SubjectKind::Group => "user_groups",
            SubjectKind::User => "users",
        };
        let row = client
            .query_opt(&format!("SELECT id FROM {table} WHERE name = $1"), &[&name])
            .await
            .map_err(TokenError::db("looking up a subject"))?;
        row.map(|r| r.get(0))
            .ok_or_else(|| TokenError::NoSuchSubject {
                kind: kind.as_str(),
                name: name.to_string(),
            })
    }

    /// Applications, groups or users, by name.
    pub async fn subjects(&self, kind: SubjectKind) -> Result<Vec<SubjectView>, TokenError> {
        let client = self.pool.get().await?;
        let sql = match kind {
            SubjectKind::Application => {
                "SELECT id, name, NULL::text, created_at FROM applications ORDER BY name"
            }
            SubjectKind::Group => {
                "SELECT id, name, NULL::text, created_at FROM user_groups ORDER BY name"
            }
            SubjectKind::User => {
                "SELECT u.id, u.name, g.name, u.created_at FROM users u
                 LEFT JOIN user_groups g ON g.id = u.group_id ORDER BY u.name"
            }
        };
        let rows = client
            .query(sql, &[])
            .await
            .map_err(TokenError::db("listing subjects"))?;
        Ok(rows
            .iter()
            .map(|r| SubjectView {
                id: r.get(0),
                kind,
                name: r.get(1),
                group: r.get(2),
                created_at: r.get(3),
            })
            .collect())
    }

    /// Creates a token; the secret is returned here and never again.
    pub async fn create_token(&self, new: &NewToken) -> Result<(TokenView, Secret), TokenError> {
        if let Some(queues) = &new.queues
            && queues.iter().any(|q| q.trim().is_empty())
        {
            return Err(TokenError::Invalid("queue names may not be blank".into()));
        }
        if new.limit.value().is_some_and(|v| v > i64::MAX as u64) {
            return Err(TokenError::Invalid("the limit is too large".into()));
        }
        let subject_id = self.subject_id(new.subject.kind, &new.subject.name).await?;
        let secret = Secret::generate()?;
        let id = Uuid::new_v4();
        let (app, group, user) = match new.subject.kind {
            SubjectKind::Application => (Some(subject_id), None, None),
            SubjectKind::Group => (None, Some(subject_id), None),
            SubjectKind::User => (None, None, Some(subject_id)),
        };
        let limit_value = new.limit.value().map(|v| v as i64);
        let hash = secret.hash().to_vec();
        let client = self.pool.get().await?;
        client
            .execute(
                "INSERT INTO tokens (id, secret_hash, hint, subject_kind, application_id, group_id,
                     user_id, limit_kind, limit_value, queues, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                &[
                    &id,
                    &hash,
                    &secret.hint(),
                    &new.subject.kind.as_str(),
                    &app,
                    &group,
                    &user,
                    &new.limit.kind(),
                    &limit_value,
                    &new.queues,
                    &new.expires_at,
                ],
            )
            .await
            .map_err(TokenError::db("creating a token"))?;
        let view = self.token(id).await?;
        Ok((view, secret))
    }

    fn view(&self, row: &Row) -> Result<TokenView, TokenError> {
        let now = self.clock.now();
        let kind: String = row.get(1);
        let limit_kind: String = row.get(3);
        let limit = Limit::from_parts(&limit_kind, row.get(4)).ok_or_else(|| {
            TokenError::Invalid(format!("stored limit {limit_kind:?} is invalid"))
        })?;
        let used = as_u64(row.get(10));
        let revoked_at: Option<DateTime<Utc>> = row.get(7);
        let period = match limit {
            Limit::Monthly(_) => Period {
                kind: "monthly",
                start: month_start(now),
                resets_at: Some(next_month_start(now)),
            },
            _ => Period {
                kind: "lifetime",
                start: LIFETIME,
                resets_at: None,
            },
        };
        Ok(TokenView {
            id: row.get(0),
            subject: SubjectRef {
                kind: SubjectKind::parse(&kind)
                    .ok_or_else(|| TokenError::Invalid(format!("stored kind {kind:?}")))?,
                name: row.get(2),
            },
            limit,
            queues: row.get(5),
            expires_at: row.get(6),
            revoked: revoked_at.is_some(),
            revoked_at,
            created_at: row.get(8),
            hint: row.get(9),
            period,
            used,
            remaining: limit.value().map(|v| v.saturating_sub(used)),
            leased: as_u64(row.get(11)),
        })
    }

    /// Every token, newest first.
    pub async fn tokens(&self) -> Result<Vec<TokenView>, TokenError> {
        let client = self.pool.get().await?;
        let period = month_start(self.clock.now());
        let rows = client
            .query(
                &format!("{TOKEN_SELECT} ORDER BY t.created_at DESC"),
                &[&period],
            )
            .await
            .map_err(TokenError::db("listing tokens"))?;
        rows.iter().map(|r| self.view(r)).collect()
    }

    pub async fn token(&self, id: Uuid) -> Result<TokenView, TokenError> {
        let client = self.pool.get().await?;
        let period = month_start(self.clock.now());
        let row = client
            .query_opt(&format!("{TOKEN_SELECT} WHERE t.id = $2"), &[&period, &id])
            .await
            .map_err(TokenError::db("reading a token"))?
            .ok_or(TokenError::NoSuchToken(id))?;
        self.view(&row)
    }

    /// Revokes a token (idempotent). Every sender replica hears of it at once.
    pub async fn revoke(&self, id: Uuid) -> Result<(), TokenError> {
        let client = self.pool.get().await?;
        let n = client
            .execute(
                "UPDATE tokens SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1",
                &[&id, &self.clock.now()],
            )
            .await
            .map_err(TokenError::db("revoking a token"))?;
        if n == 0 {
            return Err(TokenError::NoSuchToken(id));
        }
        Ok(())
    }

    /// Stored refusals, newest first.
    pub async fn denials(&self, filter: &DenialFilter) -> Result<Vec<DenialView>, TokenError> {
        let client = self.pool.get().await?;
        let reason = filter.reason.map(|r| r.code());
        let limit = if filter.limit <= 0 { 100 } else { filter.limit };
        let rows = client
            .query(
                "SELECT id, token_id, reason, queue, at, count, aggregated, span FROM token_refusals
                 WHERE ($1::uuid IS NULL OR token_id = $1) AND ($2::text IS NULL OR reason = $2)
                 ORDER BY at DESC, id DESC LIMIT $3",
                &[&filter.token_id, &reason, &limit],
            )
            .await
            .map_err(TokenError::db("listing refusals"))?;
        Ok(rows
            .iter()
            .map(|r| DenialView {
                id: r.get(0),
                token_id: r.get(1),
                reason: r.get(2),
                queue: r.get(3),
                at: r.get(4),
                count: as_u64(r.get(5)),
                aggregated: r.get(6),
                span: r.get(7),
            })
            .collect())
    }

    /// Uses per UTC day over the last `days` days (today included), oldest first, zeros filled in.
    pub async fn daily_uses(
        &self,
        id: Uuid,
        days: u32,
    ) -> Result<Vec<(NaiveDate, u64)>, TokenError> {
        let today = self.clock.now().date_naive();
        let first = today - chrono::Duration::days(i64::from(days.max(1)) - 1);
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT day, uses FROM token_daily_uses WHERE token_id = $1 AND day >= $2 AND day <= $3",
                &[&id, &first, &today],
            )
            .await
            .map_err(TokenError::db("reading uses per day"))?;
        let mut out: Vec<(NaiveDate, u64)> = first
            .iter_days()
            .take_while(|d| *d <= today)
            .map(|d| (d, 0))
            .collect();
        for row in rows {
            let day: NaiveDate = row.get(0);
            if let Some(slot) = out.iter_mut().find(|(d, _)| *d == day) {
                slot.1 = as_u64(row.get(1));
            }
        }
        Ok(out)
    }
}
