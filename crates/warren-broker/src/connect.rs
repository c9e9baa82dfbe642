//! Opening a connection to RabbitMQ with a name and a bounded wait.

use std::time::Duration;

use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {url} timed out after {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("connecting to {url}: {source}")]
    Amqp {
        url: String,
        #[source]
        source: lapin::Error,
    },
}

/// Removes the password from an AMQP URL for logs and errors.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

/// Opens a connection to `url` named `connection_name` (shown by RabbitMQ as
/// `user_provided_name`; workers use their pod name), giving up after
/// `timeout`. No automatic recovery: callers own their reconnect loop, so a
/// pending confirm or an in-flight job is never silently replayed.
pub async fn connect(
    url: &str,
    connection_name: &str,
    timeout: Duration,
) -> Result<Connection, ConnectError> {
    let opening = Connection::connect(url, properties(connection_name));
    within(timeout, opening, || redact_url(url)).await
}

/// [`connect`] to a URI the caller built (e.g. a broker's URL with the
/// credentials of a Secret and a vhost filled in). Errors show the URI with
/// its password redacted.
pub async fn connect_uri(
    uri: AMQPUri,
    connection_name: &str,
    timeout: Duration,
) -> Result<Connection, ConnectError> {
    let shown = uri.to_string();
    let opening = Connection::connect_uri(uri, properties(connection_name));
    within(timeout, opening, || redact_url(&shown)).await
}

fn properties(connection_name: &str) -> ConnectionProperties {
    ConnectionProperties::default().with_connection_name(connection_name.into())
}

/// Waits for `opening` at most `timeout`; errors name the broker as `shown()`.
async fn within(
    timeout: Duration,
    opening: impl Future<Output = lapin::Result<Connection>>,
    shown: impl Fn() -> String,
) -> Result<Connection, ConnectError> {
    match tokio::time::timeout(timeout, opening).await {
        Err(_) => Err(ConnectError::Timeout {
            url: shown(),
            timeout,
        }),
        Ok(Err(source)) => Err(ConnectError::Amqp {
            url: shown(),
            source,
        }),
        Ok(Ok(connection)) => Ok(connection),
    }
}

/// Closes a connection without waiting long: a dead peer never answers
/// `connection.close-ok`.
pub async fn close_quietly(connection: &Connection) {
    let _ = tokio::time::timeout(Duration::from_secs(1), connection.close(200, "bye".into())).await;
}

/// Exponential backoff between reconnect attempts: `min` doubling to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    /// The delay to wait now; the following one doubles, up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// Back to `min` after a success.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let delays: Vec<_> = (0..5).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 400, 500, 500]);
        backoff.reset();
        assert_eq!(backoff.next_delay().as_millis(), 100);
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("amqp://user:secret@rabbit:5672/%2f"),
            "amqp://user:***@rabbit:5672/%2f"
        );
        assert_eq!(redact_url("amqp://rabbit"), "amqp://rabbit");
    }

    #[tokio::test]
    async fn a_refused_uri_is_named_without_its_password() {
        let port = warren_testkit::free_port().unwrap();
        let uri: AMQPUri = format!("amqp://warren:s3cret@127.0.0.1:{port}/jobs")
            .parse()
            .unwrap();
        let err = connect_uri(uri, "test", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::Amqp { .. }), "{err}");
        let shown = err.to_string();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains(&format!("warren:***@127.0.0.1:{port}/jobs")),
            "{shown}"
        );
    }

    #[tokio::test]
    async fn refused_connection_is_an_error_not_a_hang() {
        let port = warren_testkit::free_port().unwrap();
        let started = std::time::Instant::now();
        let err = connect(
            &format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
            "test",
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ConnectError::Amqp { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
