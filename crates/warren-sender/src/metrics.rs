//! The sender's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    /// HTTP status code.
    pub status: u16,
    /// Machine-readable outcome (`accepted` or the error code).
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PublishErrorLabels {
    pub kind: &'static str,
}

/// `reason` of a refused token (the problem `code` of the refusal).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub reason: &'static str,
}

/// Every reason a token can be refused for (the refusals' problem codes;
/// `auth_unavailable` is a 503, not a refusal, and counts in the responses).
/// Each series exists from the start at 0, so a rate over it is 0, not empty.
pub const TOKEN_REFUSAL_REASONS: [&str; 7] = [
    "missing_token",
    "invalid_token",
    "token_revoked",
    "token_expired",
    "queue_not_allowed",
    "usage_exceeded",
    "monthly_limit_reached",
];

/// Every metric the sender exports.
#[derive(Clone)]
pub struct SenderMetrics {
    pub responses: Family<ResponseLabels, Counter>,
    /// The `202 accepted` series of `responses`, resolved once (the hot path).
    pub accepted: Counter,
    pub publish_errors: Family<PublishErrorLabels, Counter>,
    pub publish_seconds: Histogram,
    pub broker_connected: Gauge,
    pub broker_blocked: Gauge,
    pub audit_dropped: Gauge,
    /// Requests refused by token checks, by reason.
    pub token_refusals: Family<RefusalLabels, Counter>,
    /// 1 while tokens can be checked (auth off: always).
    pub token_db_ready: Gauge,
    /// Queries made to find tokens (unknown secrets are remembered and
    /// lookups batched, so a flood of them does not cost one each).
    pub token_lookups: Gauge,
}

impl SenderMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let responses = Family::<ResponseLabels, Counter>::default();
        let accepted = responses
            .get_or_create(&ResponseLabels {
                status: 202,
                code: "accepted",
            })
            .clone();
        let metrics = Self {
            responses,
            accepted,
            publish_errors: Family::default(),
            // 100 µs .. ~3.3 s
            publish_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            broker_connected: Gauge::default(),
            broker_blocked: Gauge::default(),
            audit_dropped: Gauge::default(),
            token_refusals: Family::default(),
            token_db_ready: Gauge::default(),
            token_lookups: Gauge::default(),
        };
        warren_telemetry::register_process_start_time(registry);
        for reason in TOKEN_REFUSAL_REASONS {
            drop(
                metrics
                    .token_refusals
                    .get_or_create(&RefusalLabels { reason }),
            );
        }
        registry.register(
            "warren_sender_responses",
            "Responses to POST /send by status and outcome code",
            metrics.responses.clone(),
        );
        registry.register(
            "warren_sender_publish_errors",
            "Publishes that failed, by kind (unavailable, timeout, nacked, unroutable, broker)",
            metrics.publish_errors.clone(),
        );
        registry.register(
            "warren_sender_publish_seconds",
            "Time from publish to the broker's confirm",
            metrics.publish_seconds.clone(),
        );
        registry.register(
            "warren_sender_broker_connected",
            "1 while the sender has a connection to RabbitMQ",
            metrics.broker_connected.clone(),
        );
        registry.register(
            "warren_sender_broker_blocked",
            "1 while RabbitMQ blocks the sender's connection (memory or disk alarm)",
            metrics.broker_blocked.clone(),
        );
        registry.register(
            "warren_sender_audit_events_dropped",
            "Audit events dropped (buffer full or broker unavailable) since start",
            metrics.audit_dropped.clone(),
        );
        registry.register(
            "warren_sender_token_refusals",
            "Requests refused by the token check, by reason (missing_token, invalid_token, token_revoked, token_expired, queue_not_allowed, usage_exceeded, monthly_limit_reached)",
            metrics.token_refusals.clone(),
        );
        registry.register(
            "warren_sender_token_database_ready",
            "1 while sends can be checked against the token database (reachable and migrated; always 1 with WARREN_AUTH=off)",
            metrics.token_db_ready.clone(),
        );
        registry.register(
            "warren_sender_token_lookup_queries",
            "Queries made to the token database to find tokens since start (batched; unknown secrets remembered for a short time)",
            metrics.token_lookups.clone(),
        );
        metrics
    }

    /// Counts one refusal; `reason` is one of [`TOKEN_REFUSAL_REASONS`].
    pub fn record_token_refusal(&self, reason: &'static str) {
        self.token_refusals
            .get_or_create(&RefusalLabels { reason })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_tokens::Reason;

    #[test]
    fn refusal_reasons_are_the_token_refusal_codes() {
        let codes: Vec<&str> = Reason::ALL
            .into_iter()
            .filter(|r| *r != Reason::AuthUnavailable)
            .map(Reason::code)
            .collect();
        assert_eq!(codes, TOKEN_REFUSAL_REASONS);
    }
}
