//! The web panel: server-rendered pages (maud, checked at compile time), no
//! scripts beyond the copy button. Log in with the admin token; the session
//! lives in an HttpOnly SameSite=Strict cookie ([`crate::session`]); every
//! form post must come from this origin.
//!
//! Pages: applications, groups, users, tokens (create with subject, limit,
//! queues and expiry; the secret shown once with a copy button; revoke), a
//! token's usage (used and remaining this period, uses per day as a small
//! SVG chart, its latest refusals) and refusals (filter by token and reason).

use axum::Router;
use axum::extract::{Form, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use chrono::{NaiveDate, NaiveDateTime, Utc};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde::Deserialize;
use uuid::Uuid;
use warren_tokens::store::{DenialFilter, DenialView, TokenView};
use warren_tokens::{Limit, NewToken, Reason, SubjectKind, SubjectRef};

use crate::api::collection;
use crate::session::{digest, same_digest, same_origin, set_cookie};
use crate::{AdminError, AdminState};

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

#[derive(Deserialize)]
struct NameForm {
    name: String,
    #[serde(default)]
    group: String,
}

async fn subjects_page(state: &AdminState, kind: SubjectKind, error: Option<String>) -> Response {
    let subjects = match state.store.subjects(kind).await {
        Ok(s) => s,
        Err(err) => return error_page(state, err.into()),
    };
    let groups = if kind == SubjectKind::User {
        match state.store.subjects(SubjectKind::Group).await {
            Ok(g) => g,
            Err(err) => return error_page(state, err.into()),
        }
    } else {
        Vec::new()
    };
    let (title, active, path) = match kind {
        SubjectKind::Application => ("Applications", "applications", "/applications"),
        SubjectKind::Group => ("Groups", "groups", "/groups"),
        SubjectKind::User => ("Users", "users", "/users"),
    };
    let noun = kind.as_str();
    let body = html! {
        @if let Some(error) = &error { p.error { (error) } }
        form.inline method="post" action=(path) {
            label { "Name" input id=(format!("{noun}-name")) name="name" required; }
            @if kind == SubjectKind::User {
                label { "Group" select #user-group name="group" {
                    option value="" { "(none)" }
                    @for g in &groups { option value=(g.name) { (g.name) } }
                } }
            }
            button id=(format!("create-{noun}")) type="submit" { "Create " (noun) }
        }
        table {
            tr { th { "Name" } @if kind == SubjectKind::User { th { "Group" } } th { "Created" } th { "" } }
            @for s in &subjects {
                tr {
                    td { (s.name) }
                    @if kind == SubjectKind::User { td { (s.group.as_deref().unwrap_or("—")) } }
                    td.muted { (s.created_at.format("%Y-%m-%d %H:%M UTC")) }
                    td { a href=(format!("/tokens?subject_kind={noun}&subject_name={}", s.name)) { "new token" } }
                }
            }
        }
    };
    render(
        state,
        if error.is_some() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::OK
        },
        page(title, active, body),
    )
}

async fn subjects(
    _: PanelSession,
    State(state): State<AdminState>,
    Path(name): Path<String>,
) -> Response {
    match collection(&name) {
        Some(kind) => subjects_page(&state, kind, None).await,
        None => not_found(&state),
    }
}

fn not_found(state: &AdminState) -> Response {
    render(
        state,
        StatusCode::NOT_FOUND,
        page("Not found", "", html! { p { "No such page." } }),
    )
}

async fn create_kind(
    state: AdminState,
    headers: HeaderMap,
    kind: SubjectKind,
    form: NameForm,
) -> Response {
    if let Some(refused) = cross_site(&state, &headers) {
        return refused;
    }
    let group = Some(form.group.trim()).filter(|g| !g.is_empty());
    let result = match kind {
        SubjectKind::Application => state.store.create_application(&form.name).await,
        SubjectKind::Group => state.store.create_group(&form.name).await,
        SubjectKind::User => state.store.create_user(&form.name, group).await,
    };
    match result {
        Ok(_) => {
            state.metrics.count("panel", StatusCode::SEE_OTHER);
            Redirect::to(&format!(
                "/{}",
                match kind {
                    SubjectKind::Application => "applications",
                    SubjectKind::Group => "groups",
                    SubjectKind::User => "users",
                }
            ))
            .into_response()
        }
        Err(err) if !err.is_unavailable() => {
            subjects_page(&state, kind, Some(err.to_string())).await
        }
        Err(err) => error_page(&state, err.into()),
    }
}

async fn create_subject(
    _: PanelSession,
    State(state): State<AdminState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Form(form): Form<NameForm>,
) -> Response {
    match collection(&name) {
        Some(kind) => create_kind(state, headers, kind, form).await,
        None => not_found(&state),
    }
}

fn limit_text(limit: Limit) -> String {
    match limit {
        Limit::Unlimited => "unlimited".into(),
        Limit::MaxUses(n) => format!("{n} uses"),
        Limit::Monthly(n) => format!("{n} / month"),
    }
}

#[derive(Deserialize, Default)]
struct Prefill {
    subject_kind: Option<String>,
    subject_name: Option<String>,
}

async fn tokens(
    _: PanelSession,
    State(state): State<AdminState>,
    Query(prefill): Query<Prefill>,
) -> Response {
    tokens_page(&state, prefill, None).await
}

async fn tokens_page(state: &AdminState, prefill: Prefill, error: Option<String>) -> Response {
    let tokens = match state.store.tokens().await {
        Ok(t) => t,
        Err(err) => return error_page(state, err.into()),
    };
    let kind = prefill.subject_kind.unwrap_or_else(|| "user".into());
    let body = html! {
        @if let Some(error) = &error { p.error #form-error { (error) } }
        form.inline method="post" action="/tokens" {
            label { "Subject" select #subject-kind name="subject_kind" {
                @for k in ["application", "group", "user"] { option value=(k) selected[k == kind] { (k) } }
            } }
            label { "Name" input #subject-name name="subject_name" required value=(prefill.subject_name.unwrap_or_default()); }
            label { "Limit" select #limit-kind name="limit_kind" {
                option value="max_uses" { "maximum uses" }
                option value="monthly" { "uses per month" }
                option value="unlimited" { "unlimited" }
            } }
            label { "Uses" input #limit-value name="limit_value" type="number" min="0" value="1000"; }
            label { "Queues (comma-separated, empty: all)" input #queues name="queues"; }
            label { "Expires (UTC, optional)" input #expires-at name="expires_at" type="datetime-local"; }
            button #create-token type="submit" { "Create token" }
        }
        table #tokens {
            tr { th { "Token" } th { "Subject" } th { "Limit" } th { "Used" } th { "Remaining" } th { "Queues" } th { "Expires" } th { "" } }
            @for t in &tokens {
                tr class=[t.revoked.then_some("revoked")] {
                    td { a href=(format!("/tokens/{}", t.id)) { code { "wrn_…" (t.hint) } } }
                    td { span.tag { (t.subject.kind.as_str()) } " " (t.subject.name) }
                    td { (limit_text(t.limit)) }
                    td { (t.used) }
                    td { (t.remaining.map(|r| r.to_string()).unwrap_or_else(|| "∞".into())) }
                    td { (t.queues.as_ref().map(|q| q.join(", ")).unwrap_or_else(|| "all".into())) }
                    td.muted { (t.expires_at.map(|e| e.format("%Y-%m-%d %H:%M").to_string()).unwrap_or_else(|| "—".into())) }
                    td { @if t.revoked { "revoked" } }
                }
            }
        }
    };
    render(
        state,
        if error.is_some() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::OK
        },
        page("Tokens", "tokens", body),
    )
}

#[derive(Deserialize)]
struct TokenForm {
    subject_kind: String,
    subject_name: String,
    limit_kind: String,
    #[serde(default)]
    limit_value: String,
    #[serde(default)]
    queues: String,
    #[serde(default)]
    expires_at: String,
}

fn parse_token_form(form: &TokenForm) -> Result<NewToken, String> {
    let kind = SubjectKind::parse(&form.subject_kind).ok_or("choose application, group or user")?;
    let value = || {
        form.limit_value
            .trim()
            .parse::<u64>()
            .map_err(|_| "the number of uses must be a whole number".to_string())
    };
    let limit = match form.limit_kind.as_str() {
        "unlimited" => Limit::Unlimited,
        "max_uses" => Limit::MaxUses(value()?),
        "monthly" => Limit::Monthly(value()?),
        _ => return Err("choose a limit".into()),
    };
    let queues: Vec<String> = form
        .queues
        .split(',')
        .map(|q| q.trim().to_string())
        .filter(|q| !q.is_empty())
        .collect();
    let expires_at = match form.expires_at.trim() {
        "" => None,
        text => Some(
            NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M")
                .map_err(|_| format!("{text:?} is not a date and time"))?
                .and_utc(),
        ),
    };
    Ok(NewToken {
        subject: SubjectRef {
            kind,
            name: form.subject_name.trim().to_string(),
        },
        limit,
        queues: (!queues.is_empty()).then_some(queues),
        expires_at,
    })
}

async fn create_token(
    _: PanelSession,
    State(state): State<AdminState>,
    headers: HeaderMap,
    Form(form): Form<TokenForm>,
) -> Response {
    if let Some(refused) = cross_site(&state, &headers) {
        return refused;
    }
    let prefill = || Prefill {
        subject_kind: Some(form.subject_kind.clone()),
        subject_name: Some(form.subject_name.clone()),
    };
    let new = match parse_token_form(&form) {
        Ok(new) => new,
        Err(error) => return tokens_page(&state, prefill(), Some(error)).await,
    };
    let (view, secret) = match state.store.create_token(&new).await {
        Ok(created) => created,
        Err(err) if !err.is_unavailable() => {
            return tokens_page(&state, prefill(), Some(err.to_string())).await;
        }
        Err(err) => return error_page(&state, err.into()),
    };
    let body = html! {
        div.secret {
            p { strong { "Copy this token now: it is shown only once." } " Only its hash is stored." }
            p { code #secret { (secret.as_str()) } }
            button #copy type="button" onclick="navigator.clipboard.writeText(document.getElementById('secret').textContent).then(()=>{this.textContent='Copied'})" { "Copy" }
        }
        p { "Send with it: " code { "curl -X POST $SENDER/send -H 'Authorization: Bearer " (secret.as_str()) "' -H 'Content-Type: application/json' -d '{\"message\":\"hi\"}'" } }
        p { a #token-link href=(format!("/tokens/{}", view.id)) { "Usage of this token" } " · " a href="/tokens" { "All tokens" } }
    };
    let mut response = render(
        &state,
        StatusCode::CREATED,
        page("Token created", "tokens", body),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Uses per day as bars, oldest left.
fn chart(days: &[(NaiveDate, u64)]) -> Markup {
    let max = days.iter().map(|(_, n)| *n).max().unwrap_or(0).max(1);
    let (width, height, bar) = (620.0, 120.0, 620.0 / days.len().max(1) as f64);
    html! {
        svg #uses-chart width=(width) height=(height + 20.0) viewBox=(format!("0 0 {width} {}", height + 20.0)) role="img" aria-label="uses per day" {
            @for (i, (day, n)) in days.iter().enumerate() {
                @let h = (*n as f64 / max as f64) * height;
                rect x=(format!("{:.1}", i as f64 * bar + 1.0)) y=(format!("{:.1}", height - h)) width=(format!("{:.1}", (bar - 2.0).max(1.0))) height=(format!("{h:.1}")) fill="#2b5fd9" {
                    title { (day) ": " (n) }
                }
            }
            line x1="0" y1=(height) x2=(width) y2=(height) stroke="#69707d";
            text x="0" y=(height + 15.0) font-size="11" fill="#69707d" { (days.first().map(|d| d.0.to_string()).unwrap_or_default()) }
            text x=(width) y=(height + 15.0) font-size="11" fill="#69707d" text-anchor="end" { (days.last().map(|d| d.0.to_string()).unwrap_or_default()) " (max " (max) "/day)" }
        }
    }
}

fn denial_table(denials: &[DenialView], tokens: &[TokenView]) -> Markup {
    html! {
        table #refusals {
            tr { th { "When (UTC)" } th { "Token" } th { "Reason" } th { "Queue" } th { "Count" } }
            @for d in denials {
                tr {
                    td.muted { (d.at.format("%Y-%m-%d %H:%M:%S")) }
                    td { @match d.token_id.and_then(|id| tokens.iter().find(|t| t.id == id)) {
                        Some(t) => a href=(format!("/tokens/{}", t.id)) { code { "…" (t.hint) } " " (t.subject.name) },
                        None => span.muted { "(no valid token)" },
                    } }
                    td.reason { (d.reason) }
                    td { (d.queue.as_deref().unwrap_or("—")) }
                    td { (d.count) @if d.aggregated { span.muted { " (aggregated, per " (d.span) ")" } } }
                }
            }
        }
    }
}

async fn token_page(
    _: PanelSession,
    State(state): State<AdminState>,
    Path(id): Path<Uuid>,
) -> Response {
    let loaded = async {
        let view = state.store.token(id).await?;
        let days = state.store.daily_uses(id, 30).await?;
        let denials = state
            .store
            .denials(&DenialFilter {
                token_id: Some(id),
                reason: None,
                limit: 20,
            })
            .await?;
        Ok::<_, warren_tokens::TokenError>((view, days, denials))
    }
    .await;
    let (view, days, denials) = match loaded {
        Ok(l) => l,
        Err(err) => return error_page(&state, err.into()),
    };
    let period = match view.period.resets_at {
        Some(resets) => format!(
            "this month (resets {})",
            resets.format("%Y-%m-%d %H:%M UTC")
        ),
        None => "lifetime".to_string(),
    };
    let body = html! {
        table {
            tr { th { "Subject" } td { (view.subject.kind.as_str()) " " (view.subject.name) } }
            tr { th { "Limit" } td { (limit_text(view.limit)) } }
            tr { th { "Period" } td { (period) } }
            tr { th { "Used" } td #used { (view.used) } }
            tr { th { "Remaining" } td #remaining { (view.remaining.map(|r| r.to_string()).unwrap_or_else(|| "unlimited".into())) } }
            tr { th { "Queues" } td { (view.queues.as_ref().map(|q| q.join(", ")).unwrap_or_else(|| "all".into())) } }
            tr { th { "Expires" } td { (view.expires_at.map(|e| e.to_rfc3339()).unwrap_or_else(|| "never".into())) } }
            tr { th { "State" } td #state { @if view.revoked { "revoked" } @else { "active" } } }
        }
        h2 { "Uses per day (last 30 days, UTC)" }
        (chart(&days))
        @if !view.revoked {
            form method="post" action=(format!("/tokens/{}/revoke", view.id)) {
                button.danger #revoke type="submit" { "Revoke this token" }
            }
        }
        h2 { "Latest refusals" }
        (denial_table(&denials, std::slice::from_ref(&view)))
        p { a href=(format!("/refusals?token={}", view.id)) { "All refusals of this token" } }
    };
    render(
        &state,
        StatusCode::OK,
        page(&format!("Token …{}", view.hint), "tokens", body),
    )
}

async fn revoke(
    _: PanelSession,
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path(id): Path<Uuid>,
) -> Response {
    if let Some(refused) = cross_site(&state, &headers) {
        return refused;
    }
    match state.store.revoke(id).await {
        Ok(()) => {
            state.metrics.count("panel", StatusCode::SEE_OTHER);
            Redirect::to(&format!("/tokens/{id}")).into_response()
        }
        Err(err) => error_page(&state, err.into()),
    }
}

#[derive(Deserialize)]
struct RefusalQuery {
    token: Option<String>,
    reason: Option<String>,
}

async fn refusals(
    _: PanelSession,
    State(state): State<AdminState>,
    Query(q): Query<RefusalQuery>,
) -> Response {
    let token_id = q
        .token
        .as_deref()
        .filter(|t| !t.is_empty())
        .and_then(|t| t.parse::<Uuid>().ok());
    let reason = q.reason.as_deref().and_then(Reason::parse);
    let loaded = async {
        let tokens = state.store.tokens().await?;
        let denials = state
            .store
            .denials(&DenialFilter {
                token_id,
                reason,
                limit: 200,
            })
            .await?;
        Ok::<_, warren_tokens::TokenError>((tokens, denials))
    }
    .await;
    let (tokens, denials) = match loaded {
        Ok(l) => l,
        Err(err) => return error_page(&state, err.into()),
    };
    let body = html! {
        form.inline method="get" action="/refusals" {
            label { "Token" select #filter-token name="token" {
                option value="" { "(any)" }
                @for t in &tokens { option value=(t.id) selected[Some(t.id) == token_id] { "…" (t.hint) " " (t.subject.name) } }
            } }
            label { "Reason" select #filter-reason name="reason" {
                option value="" { "(any)" }
                @for r in Reason::ALL { option value=(r.code()) selected[Some(r) == reason] { (r.code()) } }
            } }
            button #filter type="submit" { "Filter" }
        }
        p.muted { "Each refusal is one row up to 10 per token and minute; past that rate they are counted into one row per token, reason, queue and minute." }
        (denial_table(&denials, &tokens))
    };
    render(&state, StatusCode::OK, page("Refusals", "refusals", body))
}
