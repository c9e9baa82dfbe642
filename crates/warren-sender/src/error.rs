//! Every way the sender declines a request, as one type with one response each.
//!
//! Handlers return `Result<_, SendError>`; [`SendError`]'s `IntoResponse` is
//! the only place an error response is built: its status, its
//! `application/problem+json` body (RFC 9457, with our `code`), and the
//! headers the refusal calls for (`WWW-Authenticate` on 401, `Retry-After`
//! on 429 and 503, `Connection: close` on 408).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use warren_broker::PublishError;
use warren_tokens::{Reason, Refusal};

use crate::validation::Rejection;

/// Why a request was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The request is wrong as sent: validation, body size or time, unknown queue.
    #[error("{}: {}", .0.code, .0.detail)]
    Invalid(Rejection),
    /// The token check refused the request, or could not be made
    /// (`auth_unavailable`, told to retry after `retry_after` seconds).
    #[error("{}: {}", .refusal.reason.code(), .refusal.detail)]
    Token { refusal: Refusal, retry_after: u64 },
    /// RabbitMQ is refusing new messages (resource alarm).
    #[error("broker_blocked")]
    BrokerBlocked { retry_after: u64 },
    /// `max_in_flight` publishes already wait for their confirm.
    #[error("overloaded: {max_in_flight} publishes in flight")]
    Overloaded {
        max_in_flight: usize,
        retry_after: u64,
    },
    /// The publish failed: the job may not be stored.
    #[error("not stored: {error}")]
    NotStored {
        #[source]
        error: PublishError,
        retry_after: u64,
    },
}

impl SendError {
    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Invalid(rejection) => rejection.status,
            Self::Token { refusal, .. } => token_status(refusal.reason),
            Self::BrokerBlocked { .. } | Self::Overloaded { .. } | Self::NotStored { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// The machine-readable `code` of the problem body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid(rejection) => rejection.code,
            Self::Token { refusal, .. } => refusal.reason.code(),
            Self::BrokerBlocked { .. } => "broker_blocked",
            Self::Overloaded { .. } => "overloaded",
            Self::NotStored { error, .. } => match error {
                PublishError::Unroutable(_) => "unroutable",
                PublishError::Nacked => "broker_refused",
                PublishError::Blocked => "broker_blocked",
                PublishError::Unavailable | PublishError::Broker(_) | PublishError::Timeout(_) => {
                    "broker_unavailable"
                }
            },
        }
    }

    /// The sentence of the problem body.
    pub fn detail(&self) -> String {
        match self {
            Self::Invalid(rejection) => rejection.detail.clone(),
            Self::Token { refusal, .. } => refusal.detail.clone(),
            Self::BrokerBlocked { .. } => {
                "RabbitMQ is refusing new messages (memory or disk alarm); retry later".into()
            }
            Self::Overloaded { max_in_flight, .. } => format!(
                "{max_in_flight} jobs are already waiting for the broker's confirm; retry later"
            ),
            Self::NotStored { error, .. } => {
                format!("the job was not stored ({error}); retry later")
            }
        }
    }

    /// Seconds for `Retry-After`, when the client should come back.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Invalid(_) => None,
            Self::Token {
                refusal,
                retry_after,
            } => match refusal.reason {
                Reason::AuthUnavailable => Some(*retry_after),
                _ => refusal.retry_after,
            },
            Self::BrokerBlocked { retry_after }
            | Self::Overloaded { retry_after, .. }
            | Self::NotStored { retry_after, .. } => Some(*retry_after),
        }
    }

    /// The `WWW-Authenticate` challenge of a 401.
    pub fn challenge(&self) -> Option<&'static str> {
        match self {
            Self::Token { refusal, .. } if refusal.reason.challenges() => {
                Some(match refusal.reason {
                    Reason::MissingToken => "Bearer realm=\"warren\"",
                    _ => "Bearer realm=\"warren\", error=\"invalid_token\"",
                })
            }
            _ => None,
        }
    }

    /// The token refusal reason this counts as (`auth_unavailable` is not a refusal).
    pub fn token_refusal(&self) -> Option<Reason> {
        match self {
            Self::Token { refusal, .. } if refusal.reason != Reason::AuthUnavailable => {
                Some(refusal.reason)
            }
            _ => None,
        }
    }
}

fn token_status(reason: Reason) -> StatusCode {
    StatusCode::from_u16(reason.status()).unwrap_or(StatusCode::UNAUTHORIZED)
}

impl IntoResponse for SendError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (
            status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            problem_json(status, self.code(), &self.detail()),
        )
            .into_response();
        let headers = response.headers_mut();
        if let Some(seconds) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(challenge) = self.challenge() {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        if status == StatusCode::REQUEST_TIMEOUT {
            // The rest of the body may never come: do not wait for it.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// An `application/problem+json` body (RFC 9457) with our `code`.
pub fn problem_json(status: StatusCode, code: &str, detail: &str) -> String {
    json!({
        "type": format!("https://warren.dev/problems/{code}"),
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "code": code,
        "detail": detail,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn header(response: &Response, name: header::HeaderName) -> Option<String> {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    fn refusal(reason: Reason, retry_after: Option<u64>) -> SendError {
        SendError::Token {
            refusal: Refusal {
                reason,
                token_id: None,
                detail: "why".into(),
                retry_after,
            },
            retry_after: 7,
        }
    }

    #[test]
    fn each_refusal_has_its_status_code_and_headers() {
        let cases = [
            (refusal(Reason::MissingToken, None), 401, "missing_token"),
            (refusal(Reason::TokenRevoked, None), 401, "token_revoked"),
            (
                refusal(Reason::QueueNotAllowed, None),
                403,
                "queue_not_allowed",
            ),
            (
                refusal(Reason::MonthlyLimitReached, Some(3600)),
                429,
                "monthly_limit_reached",
            ),
            (
                refusal(Reason::AuthUnavailable, Some(1)),
                503,
                "auth_unavailable",
            ),
            (
                SendError::NotStored {
                    error: PublishError::Nacked,
                    retry_after: 2,
                },
                503,
                "broker_refused",
            ),
            (
                SendError::NotStored {
                    error: PublishError::Timeout(Duration::from_secs(5)),
                    retry_after: 2,
                },
                503,
                "broker_unavailable",
            ),
            (
                SendError::NotStored {
                    error: PublishError::Unroutable("312 NO_ROUTE".into()),
                    retry_after: 2,
                },
                503,
                "unroutable",
            ),
        ];
        for (error, status, code) in cases {
            assert_eq!(error.code(), code);
            let response = error.into_response();
            assert_eq!(response.status().as_u16(), status, "{code}");
            assert_eq!(
                header(&response, header::CONTENT_TYPE).as_deref(),
                Some("application/problem+json")
            );
        }
        let missing = refusal(Reason::MissingToken, None).into_response();
        assert_eq!(
            header(&missing, header::WWW_AUTHENTICATE).as_deref(),
            Some("Bearer realm=\"warren\"")
        );
        assert_eq!(header(&missing, header::RETRY_AFTER), None);
        let invalid = refusal(Reason::InvalidToken, None).into_response();
        assert_eq!(
            header(&invalid, header::WWW_AUTHENTICATE).as_deref(),
            Some("Bearer realm=\"warren\", error=\"invalid_token\"")
        );
        let monthly = refusal(Reason::MonthlyLimitReached, Some(3600)).into_response();
        assert_eq!(
            header(&monthly, header::RETRY_AFTER).as_deref(),
            Some("3600")
        );
        assert_eq!(header(&monthly, header::WWW_AUTHENTICATE), None);
        // auth_unavailable: the configured wait, not the gate's.
        let unavailable = refusal(Reason::AuthUnavailable, Some(1)).into_response();
        assert_eq!(
            header(&unavailable, header::RETRY_AFTER).as_deref(),
            Some("7")
        );
        assert_eq!(refusal(Reason::AuthUnavailable, None).token_refusal(), None);
        assert_eq!(
            refusal(Reason::TokenExpired, None).token_refusal(),
            Some(Reason::TokenExpired)
        );
    }

    #[test]
    fn a_body_timeout_closes_the_connection() {
        let response = SendError::Invalid(Rejection::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "slow",
        ))
        .into_response();
        assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(
            header(&response, header::CONNECTION).as_deref(),
            Some("close")
        );
        assert_eq!(header(&response, header::RETRY_AFTER), None);
    }
}
