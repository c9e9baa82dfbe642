//! `POST /send` and `POST /send/{queue}`: one job per request, in steps.
//!
//! 1. the queue is one this sender serves (else 404 `unknown_queue`);
//! 2. the token is good for it ([`Auth::check`](crate::auth::Auth::check),
//!    before the body is read);
//! 3. the body arrives in time and within the size limit, and validates
//!    ([`crate::validation`]);
//! 4. load shedding: the broker is not blocking us and fewer than
//!    `max_in_flight` publishes wait for a confirm;
//! 5. one use of the token is reserved;
//! 6. the envelope is published and confirmed; then the use is spent, the
//!    `message.accepted` audit event emitted and `202 {"id", "queue"}` sent.
//!
//! Each step returns a [`SendError`] when it declines; [`AppState::respond`]
//! counts the outcome and turns it into the response. Every request runs in
//! one `send` span (method, path, queue) that its log lines inherit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt as _;
use tokio::sync::SemaphorePermit;
use uuid::Uuid;
use warren_broker::{JobEvent, NewJob};
use warren_tokens::Refusal;

use crate::auth;
use crate::error::SendError;
use crate::metrics::{PublishErrorLabels, ResponseLabels};
use crate::validation::{JobRequest, Rejection, parse_job};
use crate::{AppInner, AppState};

// The handlers take the request whole: extracting the `HeaderMap` and the
// `Uri` would clone them.
pub(crate) async fn send_default(State(state): State<AppState>, request: Request) -> Response {
    state.send_default(request).await
}

pub(crate) async fn send_to_queue(
    State(state): State<AppState>,
    Path(queue): Path<String>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let result = send(&state, &parts.uri, &queue, &parts.headers, body).await;
    state.respond(result)
}

/// Steps 1 to 6 of the module documentation, in the request's span: every
/// log line of the request carries its method, path and queue.
#[tracing::instrument(
    name = "send",
    skip_all,
    fields(method = "POST", path = %uri.path(), queue = %queue)
)]
async fn send(
    state: &AppState,
    uri: &Uri,
    queue: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Accepted, SendError> {
    let inner = &state.inner;
    let Some(queue) = inner.queues.iter().find(|known| &***known == queue) else {
        return Err(inner.unknown_queue(queue));
    };
    let admission = inner
        .auth
        .check(headers, queue)
        .await
        .map_err(|refusal| inner.token_error(refusal))?;
    let bytes = inner.read_job_body(headers, body).await?;
    let job = inner.parse_job(headers, &bytes)?;
    let _in_flight = inner.admit_publish()?;
    // Taken after validation and load shedding: a bad body or a shed
    // request spends nothing; dropped on a failed publish.
    let ticket = auth::reserve(admission)
        .await
        .map_err(|refusal| inner.token_error(refusal))?;
    let accepted = inner.publish(queue, job).await?;
    if let Some(ticket) = ticket {
        ticket.commit();
    }
    if inner.audit_events {
        inner.audit.emit_job(accepted.audit_event());
    }
    tracing::debug!(id = %accepted.id, "job accepted");
    Ok(accepted)
}

impl AppState {
    /// `POST /send`: a job for the default queue. Also called straight from
    /// [`Routes::serve`](crate::Routes::serve), without axum's router.
    pub(crate) async fn send_default(&self, request: Request) -> Response {
        let (parts, body) = request.into_parts();
        let queue = self.inner.queues[0].clone();
        let result = send(self, &parts.uri, &queue, &parts.headers, body).await;
        self.respond(result)
    }

    /// Counts the outcome and answers it.
    fn respond(&self, result: Result<Accepted, SendError>) -> Response {
        let metrics = &self.inner.metrics;
        match result {
            Ok(accepted) => {
                metrics.accepted.inc();
                accepted.into_response()
            }
            Err(error) => {
                metrics
                    .responses
                    .get_or_create(&ResponseLabels {
                        status: error.status().as_u16(),
                        code: error.code(),
                    })
                    .inc();
                if let Some(reason) = error.token_refusal() {
                    metrics.record_token_refusal(reason.code());
                }
                error.into_response()
            }
        }
    }
}

impl AppInner {
    fn unknown_queue(&self, queue: &str) -> SendError {
        SendError::Invalid(Rejection::new(
            StatusCode::NOT_FOUND,
            "unknown_queue",
            format!(
                "queue {queue:?} is not served here; known queues: {}",
                self.queues.join(", ")
            ),
        ))
    }

    fn token_error(&self, refusal: Refusal) -> SendError {
        SendError::Token {
            refusal,
            retry_after: self.retry_after_seconds,
        }
    }

    /// Step 3: the body, read within its limits...
    async fn read_job_body(&self, headers: &HeaderMap, body: Body) -> Result<Bytes, SendError> {
        read_body(headers, body, self.max_body_bytes, self.body_timeout)
            .await
            .map_err(SendError::Invalid)
    }

    /// ...and validated (the job borrows from the body).
    fn parse_job<'a>(
        &self,
        headers: &HeaderMap,
        bytes: &'a [u8],
    ) -> Result<JobRequest<'a>, SendError> {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        parse_job(content_type, bytes, &self.dot_rule).map_err(SendError::Invalid)
    }

    /// Step 4: refuse at once what cannot be stored soon. A blocked
    /// connection is not read by the broker, and queueing beyond the
    /// in-flight bound only grows memory and latency.
    fn admit_publish(&self) -> Result<SemaphorePermit<'_>, SendError> {
        let retry_after = self.retry_after_seconds;
        if self.publisher.is_blocked() {
            return Err(SendError::BrokerBlocked { retry_after });
        }
        self.in_flight
            .try_acquire()
            .map_err(|_| SendError::Overloaded {
                max_in_flight: self.max_in_flight,
                retry_after,
            })
    }

    /// Step 6: the envelope, published persistent and mandatory, confirmed.
    async fn publish(&self, queue: &Arc<str>, job: JobRequest<'_>) -> Result<Accepted, SendError> {
        let job = NewJob::new(&job.message, &job.extra);
        let id = job.id;
        let properties = job.publish_properties("warren-sender");
        let body = job.to_bytes();
        let started = Instant::now();
        let published = self.publisher.publish("", queue, &body, properties).await;
        match published {
            Ok(()) => {
                self.metrics
                    .publish_seconds
                    .observe(started.elapsed().as_secs_f64());
                Ok(Accepted {
                    id,
                    queue: queue.clone(),
                })
            }
            Err(error) => {
                self.metrics
                    .publish_errors
                    .get_or_create(&PublishErrorLabels { kind: error.kind() })
                    .inc();
                tracing::warn!(%error, "publish failed");
                Err(SendError::NotStored {
                    error,
                    retry_after: self.retry_after_seconds,
                })
            }
        }
    }
}

/// A job RabbitMQ confirmed: `202 {"id": ..., "queue": ...}`.
pub(crate) struct Accepted {
    id: Uuid,
    queue: Arc<str>,
}

impl Accepted {
    fn audit_event(&self) -> JobEvent {
        JobEvent::new("message.accepted", self.id, self.queue.clone())
    }
}

/// The bytes of a 202 body around the queue name: `{"id":"` + 36 + `","queue":` + `"` `"` + `}`.
const ACCEPTED_BODY_FIXED: usize = 7 + 36 + 10 + 2 + 1;

impl IntoResponse for Accepted {
    /// `content-length` is written by hyper from the body's exact size.
    fn into_response(self) -> Response {
        // The id is a UUID (nothing to escape); the queue name is escaped.
        // Sized exactly for a name without escapes, so the body becomes
        // `Bytes` without another allocation.
        let mut body = Vec::with_capacity(ACCEPTED_BODY_FIXED + self.queue.len());
        body.extend_from_slice(b"{\"id\":\"");
        body.extend_from_slice(
            self.id
                .hyphenated()
                .encode_lower(&mut Uuid::encode_buffer())
                .as_bytes(),
        );
        body.extend_from_slice(b"\",\"queue\":");
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut body, &*self.queue);
        body.push(b'}');
        let mut response = Response::new(Body::from(body));
        *response.status_mut() = StatusCode::ACCEPTED;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }
}

/// Reads the body up to `limit` bytes within `timeout`; larger bodies are a
/// 413, slower ones a 408.
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, Rejection> {
    let too_large = || {
        Rejection::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body is larger than {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    let Ok(read) = tokio::time::timeout(timeout, collect_limited(body, limit)).await else {
        return Err(Rejection::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!("the body did not arrive within {} ms", timeout.as_millis()),
        ));
    };
    read.map_err(|err| {
        if err.is::<http_body_util::LengthLimitError>() {
            too_large()
        } else {
            Rejection::new(
                StatusCode::BAD_REQUEST,
                "unreadable_body",
                format!("the body could not be read: {err}"),
            )
        }
    })
}

/// The body's bytes, at most `limit` of them (more: the error is a
/// `LengthLimitError`), trailers left out: what `axum::body::to_bytes`
/// returns, without its list of chunks. A small body usually comes in one
/// chunk, kept as it came; more chunks are joined.
async fn collect_limited(body: Body, limit: usize) -> Result<Bytes, axum::BoxError> {
    let mut body = http_body_util::Limited::new(body, limit);
    let mut first: Option<Bytes> = None;
    let mut joined: Option<Vec<u8>> = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        if let Some(joined) = joined.as_mut() {
            joined.extend_from_slice(&data);
        } else if let Some(head) = first.take() {
            let mut both = Vec::with_capacity(head.len() + data.len());
            both.extend_from_slice(&head);
            both.extend_from_slice(&data);
            joined = Some(both);
        } else {
            first = Some(data);
        }
    }
    Ok(joined.map(Bytes::from).or(first).unwrap_or_default())
}
