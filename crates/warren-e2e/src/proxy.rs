//! A counting HTTP proxy in front of RabbitMQ's management API: an
//! independent count of the requests the controller sends to the broker
//! (independent of the controller's own metrics).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use http::{HeaderName, StatusCode, header};
use tokio::task::JoinHandle;

use crate::{HarnessError, http_client};

struct ProxyState {
    upstream: String,
    client: reqwest::Client,
    counts: Mutex<BTreeMap<String, u64>>,
}

/// Forwards every request to `upstream` and counts them by `METHOD path`.
pub struct CountingProxy {
    addr: SocketAddr,
    state: Arc<ProxyState>,
    task: JoinHandle<()>,
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const HOP_BY_HOP: [HeaderName; 4] = [
    header::HOST,
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::CONTENT_LENGTH,
];

impl CountingProxy {
    /// Listens on a free local port and forwards to `upstream`
    /// (e.g. `http://127.0.0.1:15672`).
    pub async fn start(upstream: &str) -> Result<Self, HarnessError> {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST, upstream).await
    }

    /// [`start`](Self::start) on `ip` (`0.0.0.0`: reachable from the local
    /// cluster's pods too).
    pub async fn start_on(ip: std::net::Ipv4Addr, upstream: &str) -> Result<Self, HarnessError> {
        let listener = tokio::net::TcpListener::bind((ip, 0))
            .await
            .map_err(|source| HarnessError::Io {
                context: "binding the counting proxy".into(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| HarnessError::Io {
            context: "reading the counting proxy's address".into(),
            source,
        })?;
        let state = Arc::new(ProxyState {
            upstream: upstream.trim_end_matches('/').to_string(),
            client: http_client()?,
            counts: Mutex::default(),
        });
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, state, task })
    }

    /// `http://<ip>:<port>`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Requests so far by `METHOD path` (query not included).
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.state
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Requests so far.
    pub fn total(&self) -> u64 {
        self.counts().values().sum()
    }

    /// Forgets the counts.
    pub fn reset(&self) {
        self.state
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

async fn forward(State(state): State<Arc<ProxyState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let key = format!("{} {}", parts.method, parts.uri.path());
    *state
        .counts
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(key)
        .or_insert(0) += 1;
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let bytes = match axum::body::to_bytes(body, 16 * 1024 * 1024).await {
        Ok(bytes) => bytes,
        Err(err) => return error(StatusCode::BAD_REQUEST, err.to_string()),
    };
    let mut outgoing = state
        .client
        .request(parts.method, format!("{}{path_and_query}", state.upstream))
        .body(bytes);
    for (name, value) in &parts.headers {
        if !HOP_BY_HOP.contains(name) {
            outgoing = outgoing.header(name, value);
        }
    }
    let upstream = match outgoing.send().await {
        Ok(response) => response,
        Err(err) => return error(StatusCode::BAD_GATEWAY, err.to_string()),
    };
    let status = upstream.status();
    let headers = upstream.headers().clone();
    let body = match upstream.bytes().await {
        Ok(body) => body,
        Err(err) => return error(StatusCode::BAD_GATEWAY, err.to_string()),
    };
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    for (name, value) in &headers {
        if !HOP_BY_HOP.contains(name) {
            response.headers_mut().append(name, value.clone());
        }
    }
    response
}

fn error(status: StatusCode, message: String) -> Response {
    let mut response = Response::new(Body::from(message));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;

    #[tokio::test]
    async fn forwards_and_counts() {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let upstream = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new().route(
            "/api/queues/{vhost}",
            get(|request: Request| async move {
                let auth = request
                    .headers()
                    .get(header::AUTHORIZATION)
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                let query = request.uri().query().unwrap_or_default().to_string();
                format!("{auth}|{query}")
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });

        let proxy = CountingProxy::start(&upstream).await.unwrap();
        let client = http_client().unwrap();
        for _ in 0..3 {
            let body = client
                .get(format!("{}/api/queues/%2F?columns=name", proxy.url()))
                .basic_auth("guest", Some("guest"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            assert_eq!(body, "Basic Z3Vlc3Q6Z3Vlc3Q=|columns=name");
        }
        let missing = client
            .get(format!("{}/nowhere", proxy.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(missing.status(), 404);
        assert_eq!(proxy.counts().get("GET /api/queues/%2F"), Some(&3));
        assert_eq!(proxy.total(), 4);
        proxy.reset();
        assert_eq!(proxy.total(), 0);
    }
}
