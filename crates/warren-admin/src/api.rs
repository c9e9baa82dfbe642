//! The JSON API under `/api`, authorized by `Authorization: Bearer $WARREN_ADMIN_TOKEN`.
//!
//! | request | answer |
//! |---|---|
//! | `POST /api/applications`, `POST /api/groups` `{"name"}` | 201 `{"id", "name"}` |
//! | `POST /api/users` `{"name", "group"?}` | 201 `{"id", "name", "group"}` |
//! | `GET /api/applications`, `/api/groups`, `/api/users` | 200 list |
//! | `POST /api/tokens` `{"subject", "limit", "queues"?, "expires_at"?}` | 201 the token with its secret (`token`), shown once |
//! | `GET /api/tokens`, `GET /api/tokens/{id}` | 200 with `used`, `remaining`, `period`, `revoked` |
//! | `DELETE /api/tokens/{id}` | 204 (revoked) |
//! | `GET /api/tokens/{id}/denials` | 200 the stored refusals with their reasons |
//! | `GET /api/tokens/{id}/usage?days=30` | 200 uses per UTC day |

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;
use warren_tokens::store::DenialFilter;
use warren_tokens::{NewToken, Reason, SubjectKind};

use crate::session::{digest, same_digest};
use crate::{AdminError, AdminState, problem};

pub fn router(state: AdminState) -> Router {
    Router::new()
        // applications, groups, users (the static /api/tokens routes take precedence)
        .route("/api/{collection}", get(list_subjects).post(create_subject))
        .route("/api/tokens", get(list_tokens).post(create_token))
        .route("/api/tokens/{id}", get(show_token).delete(revoke_token))
        .route("/api/tokens/{id}/denials", get(denials))
        .route("/api/tokens/{id}/usage", get(usage))
        .with_state(state)
}

/// Proof that the request carried the admin token.
pub struct AdminAuth;

impl FromRequestParts<AdminState> for AdminAuth {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AdminState) -> Result<Self, Response> {
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| digest(token.trim().as_bytes()));
        match presented {
            Some(hash) if same_digest(&hash, &state.admin_token_hash) => Ok(Self),
            _ => {
                state.metrics.count("api", StatusCode::UNAUTHORIZED);
                let mut response = problem(
                    StatusCode::UNAUTHORIZED,
                    "admin_token_required",
                    "send `Authorization: Bearer <WARREN_ADMIN_TOKEN>`",
                );
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer realm=\"warren-admin\""),
                );
                Err(response)
            }
        }
    }
}

type ApiResult = Result<Response, AdminError>;

fn respond(state: &AdminState, status: StatusCode, body: Value) -> Response {
    state.metrics.count("api", status);
    (status, Json(body)).into_response()
}

fn bad_json(state: &AdminState, rejection: JsonRejection) -> Response {
    state.metrics.count("api", rejection.status());
    problem(
        rejection.status(),
        "invalid_request",
        &rejection.body_text(),
    )
}

fn counted(state: &AdminState, result: ApiResult) -> Response {
    match result {
        Ok(response) => response,
        Err(err) => {
            state.metrics.count("api", err.status_and_code().0);
            err.into_response()
        }
    }
}

#[derive(Deserialize)]
struct NameBody {
    name: String,
    #[serde(default)]
    group: Option<String>,
}

async fn create_named(
    state: AdminState,
    kind: SubjectKind,
    body: Result<Json<NameBody>, JsonRejection>,
) -> Response {
    let body = match body {
        Ok(Json(body)) => body,
        Err(rejection) => return bad_json(&state, rejection),
    };
    let result = async {
        let id = match kind {
            SubjectKind::Application => state.store.create_application(&body.name).await?,
            SubjectKind::Group => state.store.create_group(&body.name).await?,
            SubjectKind::User => {
                state
                    .store
                    .create_user(&body.name, body.group.as_deref())
                    .await?
            }
        };
        let mut out = json!({"id": id, "kind": kind, "name": body.name.trim()});
        if kind == SubjectKind::User {
            out["group"] = json!(body.group);
        }
        Ok(respond(&state, StatusCode::CREATED, out))
    }
    .await;
    counted(&state, result)
}

/// `applications`, `groups` or `users`.
pub(crate) fn collection(name: &str) -> Option<SubjectKind> {
    match name {
        "applications" => Some(SubjectKind::Application),
        "groups" => Some(SubjectKind::Group),
        "users" => Some(SubjectKind::User),
        _ => None,
    }
}

/// A counted 404 with its problem code.
fn not_found(state: &AdminState, code: &str, detail: &str) -> Response {
    state.metrics.count("api", StatusCode::NOT_FOUND);
    problem(StatusCode::NOT_FOUND, code, detail)
}

fn no_collection(state: &AdminState, name: &str) -> Response {
    not_found(state, "not_found", &format!("no collection {name:?}"))
}

async fn create_subject(
    _: AdminAuth,
    State(state): State<AdminState>,
    Path(name): Path<String>,
    body: Result<Json<NameBody>, JsonRejection>,
) -> Response {
    match collection(&name) {
        Some(kind) => create_named(state, kind, body).await,
        None => no_collection(&state, &name),
    }
}

async fn list_subjects(
    _: AdminAuth,
    State(state): State<AdminState>,
    Path(name): Path<String>,
) -> Response {
    let Some(kind) = collection(&name) else {
        return no_collection(&state, &name);
    };
    let result = async {
        let subjects = state.store.subjects(kind).await?;
        Ok(respond(&state, StatusCode::OK, json!(subjects)))
    }
    .await;
    counted(&state, result)
}

async fn create_token(
    _: AdminAuth,
    State(state): State<AdminState>,
    body: Result<Json<NewToken>, JsonRejection>,
) -> Response {
    let new = match body {
        Ok(Json(new)) => new,
        Err(rejection) => return bad_json(&state, rejection),
    };
    let result = async {
        let (view, secret) = state.store.create_token(&new).await?;
        let mut out = json!(view);
        out["token"] = json!(secret.as_str());
        Ok(respond(&state, StatusCode::CREATED, out))
    }
    .await;
    counted(&state, result)
}

async fn list_tokens(_: AdminAuth, State(state): State<AdminState>) -> Response {
    let result = async {
        let tokens = state.store.tokens().await?;
        Ok(respond(&state, StatusCode::OK, json!(tokens)))
    }
    .await;
    counted(&state, result)
}

fn not_a_token(state: &AdminState, id: &str) -> Response {
    not_found(state, "no_such_token", &format!("{id:?} is not a token id"))
}

async fn show_token(
    _: AdminAuth,
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Response {
    let Ok(id) = id.parse::<Uuid>() else {
        return not_a_token(&state, &id);
    };
    let result = async {
        let view = state.store.token(id).await?;
        Ok(respond(&state, StatusCode::OK, json!(view)))
    }
    .await;
    counted(&state, result)
}

async fn revoke_token(
    _: AdminAuth,
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Response {
    let Ok(id) = id.parse::<Uuid>() else {
        return not_a_token(&state, &id);
    };
    let result = async {
        state.store.revoke(id).await?;
        state.metrics.count("api", StatusCode::NO_CONTENT);
        Ok(StatusCode::NO_CONTENT.into_response())
    }
    .await;
    counted(&state, result)
}

#[derive(Deserialize)]
struct DenialQuery {
    reason: Option<String>,
    limit: Option<i64>,
}

async fn denials(
    _: AdminAuth,
    State(state): State<AdminState>,
    Path(id): Path<String>,
    Query(query): Query<DenialQuery>,
) -> Response {
    let Ok(id) = id.parse::<Uuid>() else {
        return not_a_token(&state, &id);
    };
    let reason = match query.reason.as_deref().map(Reason::parse) {
        Some(None) => {
            state.metrics.count("api", StatusCode::BAD_REQUEST);
            return problem(StatusCode::BAD_REQUEST, "invalid_request", "unknown reason");
        }
        other => other.flatten(),
    };
    let result = async {
        state.store.token(id).await?;
        let denials = state
            .store
            .denials(&DenialFilter {
                token_id: Some(id),
                reason,
                limit: query.limit.unwrap_or(100).clamp(1, 1000),
            })
            .await?;
        Ok(respond(&state, StatusCode::OK, json!(denials)))
    }
    .await;
    counted(&state, result)
}

#[derive(Deserialize)]
struct UsageQuery {
    days: Option<u32>,
}

async fn usage(
    _: AdminAuth,
    State(state): State<AdminState>,
    Path(id): Path<String>,
    Query(query): Query<UsageQuery>,
) -> Response {
    let Ok(id) = id.parse::<Uuid>() else {
        return not_a_token(&state, &id);
    };
    let result = async {
        let view = state.store.token(id).await?;
        let days = state.store.daily_uses(id, query.days.unwrap_or(30).clamp(1, 366)).await?;
        let days: Vec<Value> = days
            .into_iter()
            .map(|(day, uses)| json!({"day": day, "uses": uses}))
            .collect();
        Ok(respond(
            &state,
            StatusCode::OK,
            json!({"used": view.used, "remaining": view.remaining, "period": view.period, "days": days}),
        ))
    }
    .await;
    counted(&state, result)
}
