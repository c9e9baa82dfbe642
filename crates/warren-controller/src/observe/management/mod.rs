//! Queue depth and per-connection unacked counts from RabbitMQ's management HTTP API.
//!
//! Cost model: one `GET /api/queues/{vhost}?columns=...` returns every queue
//! of a vhost with only the six fields a scaler needs, so a single request
//! serves every QueueScaler on that broker and vhost. [`QueueStatsHub`]
//! coalesces the requests of concurrent reconciles: the first caller for a
//! (broker, credentials, vhost) fetches, callers arriving while it runs wait
//! for the same answer, and answers younger than `max_age` are reused.
//!
//! Pagination: by default the listing is fetched unpaginated (RabbitMQ
//! serves the whole vhost in one answer, ~120 bytes per queue with the
//! `columns=` filter, so even 10 000 queues are about 1.2 MB). For vhosts
//! with very many queues a page size can be configured
//! ([`ManagementConfig::page_size`]); then the client walks `page=1..page_count`
//! and the cost is `ceil(queues / page_size)` requests per tick, still
//! independent of the number of scalers.
//!
//! Busy pods: workers name their AMQP connection after their pod. RabbitMQ
//! reports unacked counts per channel and names channels after the
//! connection's address, not its user-provided name, so telling busy pods
//! apart takes two requests (`connections` and `channels` of the vhost,
//! both with `columns=`). They are only made before a scale-in.

mod hub;

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::metrics::ControllerMetrics;

pub use hub::QueueStatsHub;

/// Columns requested from `/api/queues/{vhost}`.
pub const QUEUE_COLUMNS: &str = "name,messages_ready,messages_unacknowledged,consumers,message_stats.publish_details.rate,message_stats.ack_details.rate";
const CONNECTION_COLUMNS: &str = "name,user_provided_name";
const CHANNEL_COLUMNS: &str = "connection_details.name,messages_unacknowledged";

/// User name and password for RabbitMQ (management API and AMQP).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Where a management API lives and how to log in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ManagementEndpoint {
    /// Base URL, e.g. `http://warren-rabbitmq:15672` (a path prefix is kept).
    pub url: String,
    pub credentials: Credentials,
}

/// Why a management API request failed.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("invalid management URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("cannot build the management HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("management API {url} timed out")]
    Timeout { url: String },
    #[error("management API {url} unreachable: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("management API {url} rejected the credentials of user {username:?} (HTTP {status})")]
    Unauthorized {
        url: String,
        username: String,
        status: u16,
    },
    #[error("vhost {vhost:?} does not exist on {url}")]
    VhostNotFound { url: String, vhost: String },
    #[error("management API {url} answered HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("cannot decode the answer of {url}: {source}")]
    Decode {
        url: String,
        #[source]
        source: serde_json::Error,
    },
}

impl StatsError {
    /// Short, bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            StatsError::InvalidUrl { .. } => "invalid_url",
            StatsError::Client(_) => "client",
            StatsError::Timeout { .. } => "timeout",
            StatsError::Unreachable { .. } => "unreachable",
            StatsError::Unauthorized { .. } => "unauthorized",
            StatsError::VhostNotFound { .. } => "vhost_not_found",
            StatsError::Status { .. } => "http_status",
            StatsError::Decode { .. } => "decode",
        }
    }
}

/// One queue as the management API reports it. Counts are `None` until the
/// broker has collected statistics for a new queue (it answers with the
/// name only for up to `collect_statistics_interval`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct QueueStats {
    pub name: String,
    #[serde(default)]
    pub messages_ready: Option<u64>,
    #[serde(default)]
    pub messages_unacknowledged: Option<u64>,
    #[serde(default)]
    pub consumers: Option<u64>,
    #[serde(default)]
    message_stats: Option<MessageStats>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
struct MessageStats {
    #[serde(default)]
    publish_details: Option<Rate>,
    #[serde(default)]
    ack_details: Option<Rate>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
struct Rate {
    rate: f64,
}

impl QueueStats {
    /// Messages published per second (broker's sliding average), if known.
    pub fn publish_rate(&self) -> Option<f64> {
        self.message_stats
            .as_ref()?
            .publish_details
            .as_ref()
            .map(|r| r.rate)
    }

    /// Messages acked per second, if known.
    pub fn ack_rate(&self) -> Option<f64> {
        self.message_stats
            .as_ref()?
            .ack_details
            .as_ref()
            .map(|r| r.rate)
    }

    /// Whether the broker has collected counts for this queue yet.
    pub fn has_counts(&self) -> bool {
        self.messages_ready.is_some() && self.messages_unacknowledged.is_some()
    }
}

/// Every queue of one vhost, by name.
#[derive(Debug, Clone, Default)]
pub struct VhostQueues {
    pub queues: HashMap<String, QueueStats>,
}

impl VhostQueues {
    pub fn get(&self, queue: &str) -> Option<&QueueStats> {
        self.queues.get(queue)
    }
}

/// Unacked messages held by each named connection of a vhost
/// (key: the client-provided connection name, i.e. the worker's POD_NAME).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConnectionUnacked {
    pub by_connection: HashMap<String, u64>,
}

impl ConnectionUnacked {
    /// Unacked messages held by the connection named `name` (0 if unknown).
    pub fn unacked(&self, name: &str) -> u64 {
        self.by_connection.get(name).copied().unwrap_or(0)
    }
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ManagementConfig {
    /// Whole-request timeout.
    pub timeout: Duration,
    /// Walk the queue listing in pages of this size (RabbitMQ caps it at 500);
    /// `None` fetches the vhost in one answer.
    pub page_size: Option<NonZeroU32>,
}

impl Default for ManagementConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            page_size: None,
        }
    }
}

/// HTTP client for the management API. Counts every request it sends.
#[derive(Clone)]
pub struct ManagementClient {
    http: reqwest::Client,
    config: ManagementConfig,
    requests: Arc<AtomicU64>,
    metrics: Option<ControllerMetrics>,
}

#[derive(Deserialize)]
struct Page<T> {
    items: Vec<T>,
    page_count: u32,
}

#[derive(Deserialize)]
struct ConnectionRow {
    name: String,
    #[serde(default)]
    user_provided_name: Option<String>,
}

#[derive(Deserialize)]
struct ChannelRow {
    connection_details: ConnectionDetails,
    #[serde(default)]
    messages_unacknowledged: u64,
}

#[derive(Deserialize)]
struct ConnectionDetails {
    name: String,
}

impl ManagementClient {
    pub fn new(config: ManagementConfig) -> Result<Self, StatsError> {
        // reqwest is built without a bundled provider; make sure ring is the
        // process default before it builds its TLS config (idempotent).
        warren_telemetry::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(StatsError::Client)?;
        Ok(Self {
            http,
            config,
            requests: Arc::new(AtomicU64::new(0)),
            metrics: None,
        })
    }

    /// Records request counts, latencies and errors in `metrics`.
    pub fn with_metrics(mut self, metrics: ControllerMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// HTTP requests sent so far (all endpoints).
    pub fn requests_sent(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Every queue of `vhost` with the columns a scaler needs.
    pub async fn vhost_queues(
        &self,
        endpoint: &ManagementEndpoint,
        vhost: &str,
    ) -> Result<VhostQueues, StatsError> {
        let path = format!("api/queues/{}", encode(vhost));
        let rows: Vec<QueueStats> = match self.config.page_size {
            None => {
                self.get_json(
                    endpoint,
                    vhost,
                    "queues",
                    &path,
                    &[("columns", QUEUE_COLUMNS)],
                )
                .await?
            }
            Some(size) => {
                let size = size.get().min(500).to_string();
                let mut rows = Vec::new();
                let mut page = 1u32;
                loop {
                    let page_text = page.to_string();
                    let answer: Page<QueueStats> = self
                        .get_json(
                            endpoint,
                            vhost,
                            "queues",
                            &path,
                            &[
                                ("columns", QUEUE_COLUMNS),
                                ("page", &page_text),
                                ("page_size", &size),
                            ],
                        )
                        .await?;
                    rows.extend(answer.items);
                    if page >= answer.page_count {
                        break;
                    }
                    page += 1;
                }
                rows
            }
        };
        Ok(VhostQueues {
            queues: rows.into_iter().map(|q| (q.name.clone(), q)).collect(),
        })
    }

    /// Unacked messages per client-named connection of `vhost` (two requests).
    pub async fn connection_unacked(
        &self,
        endpoint: &ManagementEndpoint,
        vhost: &str,
    ) -> Result<ConnectionUnacked, StatsError> {
        let vhost_path = encode(vhost);
        let connections: Vec<ConnectionRow> = self
            .get_json(
                endpoint,
                vhost,
                "connections",
                &format!("api/vhosts/{vhost_path}/connections"),
                &[("columns", CONNECTION_COLUMNS)],
            )
            .await?;
        let channels: Vec<ChannelRow> = self
            .get_json(
                endpoint,
                vhost,
                "channels",
                &format!("api/vhosts/{vhost_path}/channels"),
                &[("columns", CHANNEL_COLUMNS)],
            )
            .await?;
        Ok(join_unacked(&connections, &channels))
    }

    async fn get_json<T: DeserializeOwned>(
        &self,
        endpoint: &ManagementEndpoint,
        vhost: &str,
        request: &'static str,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<T, StatsError> {
        let timer = self.metrics.as_ref().map(|m| m.broker_timer(request));
        let result = self.get_json_untimed(endpoint, vhost, path, query).await;
        if let Some(timer) = timer {
            timer.finish(result.as_ref().err().map(StatsError::metric_label));
        }
        result
    }

    async fn get_json_untimed<T: DeserializeOwned>(
        &self,
        endpoint: &ManagementEndpoint,
        vhost: &str,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<T, StatsError> {
        let url = join_url(&endpoint.url, path)?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        let response = self
            .http
            .get(url.clone())
            .basic_auth(
                &endpoint.credentials.username,
                Some(&endpoint.credentials.password),
            )
            .query(query)
            .send()
            .await
            .map_err(|source| transport_error(&url, source))?;
        let status = response.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(StatsError::Unauthorized {
                url: url.to_string(),
                username: endpoint.credentials.username.clone(),
                status: status.as_u16(),
            });
        }
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(StatsError::VhostNotFound {
                url: endpoint.url.clone(),
                vhost: vhost.to_string(),
            });
        }
        let body = response
            .bytes()
            .await
            .map_err(|source| transport_error(&url, source))?;
        if !status.is_success() {
            return Err(StatsError::Status {
                url: url.to_string(),
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body).chars().take(200).collect(),
            });
        }
        serde_json::from_slice(&body).map_err(|source| StatsError::Decode {
            url: url.to_string(),
            source,
        })
    }
}

fn transport_error(url: &reqwest::Url, source: reqwest::Error) -> StatsError {
    if source.is_timeout() {
        StatsError::Timeout {
            url: url.to_string(),
        }
    } else {
        StatsError::Unreachable {
            url: url.to_string(),
            source,
        }
    }
}

/// Percent-encodes a vhost (or other name) as one URL path segment (`/` → `%2F`).
pub fn encode(segment: &str) -> String {
    utf8_percent_encode(segment, NON_ALPHANUMERIC).to_string()
}

fn join_url(base: &str, path: &str) -> Result<reqwest::Url, StatsError> {
    let invalid = |reason: String| StatsError::InvalidUrl {
        url: base.to_string(),
        reason,
    };
    let parsed = reqwest::Url::parse(base).map_err(|e| invalid(e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid(format!(
            "scheme {:?} is not http or https",
            parsed.scheme()
        )));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(invalid(
            "credentials belong in the Secret, not in the URL".into(),
        ));
    }
    // `path` is already percent-encoded; keep any prefix of the base URL.
    let joined = format!("{}/{}", base.trim_end_matches('/'), path);
    reqwest::Url::parse(&joined).map_err(|e| invalid(e.to_string()))
}

fn join_unacked(connections: &[ConnectionRow], channels: &[ChannelRow]) -> ConnectionUnacked {
    let names: HashMap<&str, &str> = connections
        .iter()
        .filter_map(|c| {
            c.user_provided_name
                .as_deref()
                .map(|given| (c.name.as_str(), given))
        })
        .collect();
    let mut by_connection: HashMap<String, u64> =
        names.values().map(|given| (given.to_string(), 0)).collect();
    for channel in channels {
        if let Some(given) = names.get(channel.connection_details.name.as_str()) {
            *by_connection.entry(given.to_string()).or_default() += channel.messages_unacknowledged;
        }
    }
    ConnectionUnacked { by_connection }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vhost_is_one_path_segment() {
        assert_eq!(encode("/"), "%2F");
        assert_eq!(encode("team a/b"), "team%20a%2Fb");
        let url = join_url("http://rabbit:15672/prefix/", "api/queues/%2F").unwrap();
        assert_eq!(url.as_str(), "http://rabbit:15672/prefix/api/queues/%2F");
    }

    #[test]
    fn urls_with_credentials_or_other_schemes_are_refused() {
        let err = join_url("http://u:p@rabbit:15672", "api").unwrap_err();
        assert_eq!(err.metric_label(), "invalid_url");
        let err = join_url("amqp://rabbit:5672", "api").unwrap_err();
        assert!(err.to_string().contains("not http"), "{err}");
    }

    #[test]
    fn queue_rows_decode_with_and_without_stats() {
        let rows: Vec<QueueStats> = serde_json::from_str(
            r#"[{"name":"fresh"},
                {"name":"q","messages_ready":7,"messages_unacknowledged":2,"consumers":1,
                 "message_stats":{"publish_details":{"rate":1.5},"ack_details":{"rate":0.5}}}]"#,
        )
        .unwrap();
        assert!(!rows[0].has_counts());
        assert_eq!(rows[0].publish_rate(), None);
        assert_eq!(rows[1].messages_ready, Some(7));
        assert_eq!(rows[1].publish_rate(), Some(1.5));
        assert_eq!(rows[1].ack_rate(), Some(0.5));
    }

    #[test]
    fn unacked_is_summed_per_named_connection() {
        let connections = vec![
            ConnectionRow {
                name: "a:1 -> b:2".into(),
                user_provided_name: Some("pod-a".into()),
            },
            ConnectionRow {
                name: "a:3 -> b:2".into(),
                user_provided_name: Some("pod-b".into()),
            },
            ConnectionRow {
                name: "a:4 -> b:2".into(),
                user_provided_name: None,
            },
        ];
        let channel = |conn: &str, unacked| ChannelRow {
            connection_details: ConnectionDetails { name: conn.into() },
            messages_unacknowledged: unacked,
        };
        let channels = vec![
            channel("a:1 -> b:2", 1),
            channel("a:1 -> b:2", 2),
            channel("a:4 -> b:2", 9),
        ];
        let joined = join_unacked(&connections, &channels);
        assert_eq!(joined.unacked("pod-a"), 3);
        assert_eq!(joined.unacked("pod-b"), 0);
        assert!(joined.by_connection.contains_key("pod-b"));
        assert_eq!(joined.by_connection.len(), 2);
    }

    #[test]
    fn credentials_debug_hides_the_password() {
        let c = Credentials {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
