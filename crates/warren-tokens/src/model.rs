//! The token domain: subjects, limits, periods, refusal reasons.

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::clock::{month_start, seconds_until_next_month};

/// What a token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubjectKind {
    Application,
    Group,
    User,
}

impl SubjectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Application => "application",
            Self::Group => "group",
            Self::User => "user",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "application" => Some(Self::Application),
            "group" => Some(Self::Group),
            "user" => Some(Self::User),
            _ => None,
        }
    }
}

/// A subject named by kind and name, as the API takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubjectRef {
    pub kind: SubjectKind,
    pub name: String,
}

/// How many uses a token has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Limit {
    Unlimited,
    /// This many uses over the token's lifetime.
    MaxUses(u64),
    /// This many uses per UTC calendar month.
    Monthly(u64),
}

/// The lifetime period of non-monthly tokens.
pub const LIFETIME: NaiveDate = NaiveDate::from_ymd_opt(1970, 1, 1).expect("a valid date");

impl Limit {
    pub fn kind(self) -> &'static str {
        match self {
            Self::Unlimited => "unlimited",
            Self::MaxUses(_) => "max_uses",
            Self::Monthly(_) => "monthly",
        }
    }

    pub fn value(self) -> Option<u64> {
        match self {
            Self::Unlimited => None,
            Self::MaxUses(n) | Self::Monthly(n) => Some(n),
        }
    }

    pub fn from_parts(kind: &str, value: Option<i64>) -> Option<Self> {
        let value = value.map(|v| u64::try_from(v).unwrap_or(0));
        match (kind, value) {
            ("unlimited", None) => Some(Self::Unlimited),
            ("max_uses", Some(n)) => Some(Self::MaxUses(n)),
            ("monthly", Some(n)) => Some(Self::Monthly(n)),
            _ => None,
        }
    }

    /// The period uses count against at `now`.
    pub fn period(self, now: DateTime<Utc>) -> NaiveDate {
        match self {
            Self::Monthly(_) => month_start(now),
            Self::Unlimited | Self::MaxUses(_) => LIFETIME,
        }
    }
}

/// Why a request was refused. The code is the problem+json `code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    MissingToken,
    InvalidToken,
    TokenRevoked,
    TokenExpired,
    QueueNotAllowed,
    UsageExceeded,
    MonthlyLimitReached,
    /// The database cannot be asked: never an accept without a check.
    AuthUnavailable,
}

impl Reason {
    pub const ALL: [Reason; 8] = [
        Self::MissingToken,
        Self::InvalidToken,
        Self::TokenRevoked,
        Self::TokenExpired,
        Self::QueueNotAllowed,
        Self::UsageExceeded,
        Self::MonthlyLimitReached,
        Self::AuthUnavailable,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::InvalidToken => "invalid_token",
            Self::TokenRevoked => "token_revoked",
            Self::TokenExpired => "token_expired",
            Self::QueueNotAllowed => "queue_not_allowed",
            Self::UsageExceeded => "usage_exceeded",
            Self::MonthlyLimitReached => "monthly_limit_reached",
            Self::AuthUnavailable => "auth_unavailable",
        }
    }

    pub fn parse(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }

    pub fn status(self) -> u16 {
        match self {
            Self::MissingToken | Self::InvalidToken | Self::TokenRevoked | Self::TokenExpired => {
                401
            }
            Self::QueueNotAllowed => 403,
            Self::UsageExceeded | Self::MonthlyLimitReached => 429,
            Self::AuthUnavailable => 503,
        }
    }

    /// 401s carry `WWW-Authenticate: Bearer`.
    pub fn challenges(self) -> bool {
        self.status() == 401
    }
}

/// A refused request: the reason, the token when known, and what to tell the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    pub token_id: Option<Uuid>,
    pub detail: String,
    /// Seconds for `Retry-After` (monthly limit: until the next month; unavailable: a short wait).
    pub retry_after: Option<u64>,
}

impl Refusal {
    pub fn new(reason: Reason, token_id: Option<Uuid>, detail: impl Into<String>) -> Self {
        Self {
            reason,
            token_id,
            detail: detail.into(),
            retry_after: None,
        }
    }

    pub(crate) fn spent(limit: Limit, token_id: Uuid, now: DateTime<Utc>) -> Self {
        match limit {
            Limit::Monthly(n) => Self {
                reason: Reason::MonthlyLimitReached,
                token_id: Some(token_id),
                detail: format!("this token's {n} uses for this month are spent"),
                retry_after: Some(seconds_until_next_month(now)),
            },
            _ => Self::new(
                Reason::UsageExceeded,
                Some(token_id),
                format!("this token's {} uses are spent", limit.value().unwrap_or(0)),
            ),
        }
    }
}

/// A token as the gate needs it (no secret, no usage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: Uuid,
    pub limit: Limit,
    pub queues: Option<Vec<String>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked: bool,
}

impl TokenRecord {
    /// The refusal this token earns for `queue` at `now`, before counting uses.
    pub fn check(&self, queue: &str, now: DateTime<Utc>) -> Result<(), Refusal> {
        if self.revoked {
            return Err(Refusal::new(
                Reason::TokenRevoked,
                Some(self.id),
                "this token was revoked",
            ));
        }
        if self.expires_at.is_some_and(|at| at <= now) {
            return Err(Refusal::new(
                Reason::TokenExpired,
                Some(self.id),
                "this token has expired",
            ));
        }
        if let Some(queues) = &self.queues
            && !queues.iter().any(|q| q == queue)
        {
            return Err(Refusal::new(
                Reason::QueueNotAllowed,
                Some(self.id),
                format!("this token may not send to queue {queue:?}"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_serialize_as_the_api_shows_them() {
        assert_eq!(
            serde_json::to_value(Limit::Monthly(5)).unwrap(),
            serde_json::json!({"kind": "monthly", "value": 5})
        );
        assert_eq!(
            serde_json::from_value::<Limit>(serde_json::json!({"kind": "unlimited"})).unwrap(),
            Limit::Unlimited
        );
        assert_eq!(
            Limit::from_parts("max_uses", Some(3)),
            Some(Limit::MaxUses(3))
        );
        assert_eq!(Limit::from_parts("max_uses", None), None);
    }

    #[test]
    fn checks_in_order_revoked_expired_queue() {
        let now: DateTime<Utc> = "2026-05-01T00:00:00Z".parse().unwrap();
        let mut token = TokenRecord {
            id: Uuid::nil(),
            limit: Limit::Unlimited,
            queues: Some(vec!["sms".into()]),
            expires_at: Some(now),
            revoked: true,
        };
        let reason = |t: &TokenRecord, q| t.check(q, now).err().map(|r| r.reason);
        assert_eq!(reason(&token, "jobs"), Some(Reason::TokenRevoked));
        token.revoked = false;
        assert_eq!(reason(&token, "jobs"), Some(Reason::TokenExpired));
        token.expires_at = Some(now + chrono::Duration::seconds(1));
        assert_eq!(reason(&token, "jobs"), Some(Reason::QueueNotAllowed));
        assert_eq!(reason(&token, "sms"), None);
        assert_eq!(
            Reason::parse("monthly_limit_reached"),
            Some(Reason::MonthlyLimitReached)
        );
        assert!(Reason::InvalidToken.challenges() && !Reason::UsageExceeded.challenges());
    }
}
