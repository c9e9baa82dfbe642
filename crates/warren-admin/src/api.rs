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
        // Every answer of a matched route counted once, by status, here.
        .route_layer(axum::middleware::map_response_with_state(
            state.clone(),
            count_response,
        ))
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

/// Counts an API answer in `warren_admin_responses` (surface `api`).
async fn count_response(State(state): State<AdminState>, response: Response) -> Response {
    state.metrics.count("api", response.status());
    response
}

type ApiResult = Result<Response, AdminError>;

fn respond(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

fn bad_json(rejection: JsonRejection) -> Response {
    problem(
        rejection.status(),
        "invalid_request",
        &rejection.body_text(),
    )
}

#[derive(Deserialize)]
struct NameBody {
    name: String,
    #[serde(default)]
    group: Option<String>,
}

async fn create_named(state: AdminState, kind: SubjectKind, body: NameBody) -> ApiResult {
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
    Ok(respond(StatusCode::CREATED, out))
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

fn no_collection(name: &str) -> Response {
    problem(
        StatusCode::NOT_FOUND,
        "not_found",
        &format!("no collection {name:?}"),
    )
}

async fn create_subject(
    _: AdminAuth,
    State(state): State<AdminState>,
    Path(name): Path<String>,
    body: Result<Json<NameBody>, JsonRejection>,
) -> ApiResult {
    let Some(kind) = collection(&name) else {
        return Ok(no_collection(&name));
    };
    match body {
        Ok(Json(body)) => create_named(state, kind, body).await,
        Err(rejection) => Ok(bad_json(rejection)),
    }
}

async fn list_subjects(
    _: AdminAuth,
    State(state): State<AdminState>,
    Path(name): Path<String>,
) -> ApiResult {
    let Some(kind) = collection(&name) else {
        return Ok(no_collection(&name));
    };
    let subjects = state.store.subjects(kind).await?;
    Ok(respond(StatusCode::OK, json!(subjects)))
}

async fn create_token(
    _: AdminAuth,
    State(state): State<AdminState>,
    body: Result<Json<NewToken>, JsonRejection>,
) -> ApiResult {
    let new = match body {
        Ok(Json(new)) => new,
        Err(rejection) => return Ok(bad_json(rejection)),
    };
    let (view, secret) = state.store.create_token(&new).await?;
    let mut out = json!(view);
    out["token"] = json!(secret.as_str());
    Ok(respond(StatusCode::CREATED, out))
}

async fn list_tokens(_: AdminAuth, State(state): State<AdminState>) -> ApiResult {
    let tokens = state.store.tokens().await?;
    Ok(respond(StatusCode::OK, json!(tokens)))
}

/// The token id in the path; a path that holds none is a 404 `no_such_token`.
struct TokenId(Uuid);

impl FromRequestParts<AdminState> for TokenId {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AdminState) -> Result<Self, Response> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        id.parse().map(Self).map_err(|_| {
            problem(
                StatusCode::NOT_FOUND,
                "no_such_token",
                &format!("{id:?} is not a token id"),
            )
        })
    }
}

async fn show_token(
    _: AdminAuth,
    State(state): State<AdminState>,
    TokenId(id): TokenId,
) -> ApiResult {
    let view = state.store.token(id).await?;
    Ok(respond(StatusCode::OK, json!(view)))
}

async fn revoke_token(
    _: AdminAuth,
    State(state): State<AdminState>,
    TokenId(id): TokenId,
) -> ApiResult {
    state.store.revoke(id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct DenialQuery {
    reason: Option<String>,
    limit: Option<i64>,
}

async fn denials(
    _: AdminAuth,
    State(state): State<AdminState>,
    TokenId(id): TokenId,
    Query(query): Query<DenialQuery>,
) -> ApiResult {
    let reason = match query.reason.as_deref().map(Reason::parse) {
        Some(None) => {
            return Ok(problem(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "unknown reason",
            ));
        }
        other => other.flatten(),
    };
    state.store.token(id).await?;
    let filter = DenialFilter {
        token_id: Some(id),
        reason,
        limit: query.limit.unwrap_or(100).clamp(1, 1000),
    };
    let denials = state.store.denials(&filter).await?;
    Ok(respond(StatusCode::OK, json!(denials)))
}

#[derive(Deserialize)]
struct UsageQuery {
    days: Option<u32>,
}

async fn usage(
    _: AdminAuth,
    State(state): State<AdminState>,
    TokenId(id): TokenId,
    Query(query): Query<UsageQuery>,
) -> ApiResult {
    let view = state.store.token(id).await?;
    let days = state
        .store
        .daily_uses(id, query.days.unwrap_or(30).clamp(1, 366))
        .await?;
    let days: Vec<Value> = days
        .into_iter()
        .map(|(day, uses)| json!({"day": day, "uses": uses}))
        .collect();
    Ok(respond(
        StatusCode::OK,
        json!({"used": view.used, "remaining": view.remaining, "period": view.period, "days": days}),
    ))
}
