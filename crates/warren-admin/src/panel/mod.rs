//! The web panel: server-rendered pages (maud, checked at compile time), no
//! scripts beyond the copy button. Log in with the admin token; the session
//! lives in an HttpOnly SameSite=Strict cookie ([`crate::session`]); every
//! form post must come from this origin.
//!
//! Pages: applications, groups, users, tokens (create with subject, limit,
//! queues and expiry; the secret shown once with a copy button; revoke), a
//! token's usage (used and remaining this period, uses per day as a small
//! SVG chart, its latest refusals) and refusals (filter by token and reason).

mod refusals;
mod subjects;
mod tokens;

use axum::Router;
use axum::extract::{Form, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use chrono::Utc;
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde::Deserialize;

use crate::session::{digest, same_digest, same_origin, set_cookie};
use crate::{AdminError, AdminState};
use refusals::refusals;
use subjects::{create_subject, subjects};
use tokens::{create_token, revoke, token_page, tokens};

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/tokens") }))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        // applications, groups, users (the static routes above and below take precedence)
        .route("/{collection}", get(subjects).post(create_subject))
        .route("/tokens", get(tokens).post(create_token))
        .route("/tokens/{id}", get(token_page))
        .route("/tokens/{id}/revoke", post(revoke))
        .route("/refusals", get(refusals))
        .with_state(state)
}

fn now_unix() -> i64 {
    Utc::now().timestamp()
}

/// A logged-in panel user. Without a session: a redirect to the login page.
pub struct PanelSession;

impl FromRequestParts<AdminState> for PanelSession {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AdminState) -> Result<Self, Response> {
        if state.session.from_headers(&parts.headers, now_unix()) {
            Ok(Self)
        } else {
            Err(Redirect::to("/login").into_response())
        }
    }
}

/// Refuses a state-changing request that does not come from this origin.
fn cross_site(state: &AdminState, headers: &HeaderMap) -> Option<Response> {
    if same_origin(headers) {
        return None;
    }
    state.metrics.count("panel", StatusCode::FORBIDDEN);
    Some(
        (
            StatusCode::FORBIDDEN,
            page("Refused", "", html! { p { "Cross-site request refused." } }),
        )
            .into_response(),
    )
}

fn render(state: &AdminState, status: StatusCode, markup: Markup) -> Response {
    state.metrics.count("panel", status);
    let mut response = (status, markup).into_response();
    response
        .headers_mut()
        .insert("x-frame-options", HeaderValue::from_static("DENY"));
    response.headers_mut().insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    response
}

/// A page with a form: 400 when it shows the form's error, else 200.
fn render_form(state: &AdminState, failed: bool, markup: Markup) -> Response {
    let status = if failed {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    render(state, status, markup)
}

fn error_page(state: &AdminState, err: AdminError) -> Response {
    let (status, code) = err.status_and_code();
    render(
        state,
        status,
        page(
            "Error",
            "",
            html! { p.error { (code) ": " (err.0.to_string()) } },
        ),
    )
}

const STYLE: &str = "
body{font-family:system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:.6rem 1.2rem;display:flex;gap:1.2rem;align-items:center}
header a{color:#cfd6e4;text-decoration:none}header a.on{color:#fff;font-weight:600}
header form{margin-left:auto}main{padding:1rem 1.2rem;max-width:1100px}
table{border-collapse:collapse;width:100%;background:#fff}td,th{border-bottom:1px solid #e3e6eb;padding:.35rem .5rem;text-align:left;font-size:.92rem}
form.inline{display:flex;gap:.5rem;flex-wrap:wrap;align-items:end;background:#fff;padding:.8rem;margin:.8rem 0;border:1px solid #e3e6eb}
label{display:flex;flex-direction:column;font-size:.8rem;gap:.2rem}input,select,button{font-size:.95rem;padding:.3rem .4rem}
button{background:#2b5fd9;color:#fff;border:0;border-radius:3px;cursor:pointer}button.danger{background:#c23b3b}
.error{color:#b00020}.secret{background:#fff7d6;border:1px solid #e0c96b;padding:.8rem;margin:.8rem 0}
code{font-size:.9rem;word-break:break-all}.muted{color:#69707d}.tag{padding:0 .4rem;border-radius:3px;background:#e3e6eb}
.revoked{background:#f7d9d9}";

fn page(title: &str, active: &str, body: Markup) -> Markup {
    let nav = [
        ("tokens", "/tokens", "Tokens"),
        ("refusals", "/refusals", "Refusals"),
        ("applications", "/applications", "Applications"),
        ("groups", "/groups", "Groups"),
        ("users", "/users", "Users"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " · warren-admin" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    strong { "warren-admin" }
                    @if !active.is_empty() {
                        @for (key, href, label) in nav {
                            a href=(href) class=[(key == active).then_some("on")] { (label) }
                        }
                        form method="post" action="/logout" { button type="submit" id="logout" { "Log out" } }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
}

#[derive(Deserialize)]
struct LoginQuery {
    failed: Option<String>,
}

async fn login_page(State(state): State<AdminState>, Query(q): Query<LoginQuery>) -> Response {
    let body = html! {
        @if q.failed.is_some() { p.error { "That is not the admin token." } }
        form.inline method="post" action="/login" {
            label { "Admin token (WARREN_ADMIN_TOKEN)" input #token type="password" name="token" autocomplete="current-password" required; }
            button #login type="submit" { "Log in" }
        }
    };
    render(&state, StatusCode::OK, page("Log in", "", body))
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    if let Some(refused) = cross_site(&state, &headers) {
        return refused;
    }
    if !same_digest(
        &digest(form.token.trim().as_bytes()),
        &state.admin_token_hash,
    ) {
        state.metrics.count("panel", StatusCode::SEE_OTHER);
        return Redirect::to("/login?failed=1").into_response();
    }
    let cookie = state.session.issue(now_unix());
    let mut response = Redirect::to("/tokens").into_response();
    if let Ok(value) = HeaderValue::from_str(&set_cookie(
        Some(&cookie),
        state.session.lifetime(),
        state.secure_cookie,
    )) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    state.metrics.count("panel", StatusCode::SEE_OTHER);
    response
}

async fn logout(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if let Some(refused) = cross_site(&state, &headers) {
        return refused;
    }
    let mut response = Redirect::to("/login").into_response();
    if let Ok(value) = HeaderValue::from_str(&set_cookie(
        None,
        state.session.lifetime(),
        state.secure_cookie,
    )) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}
