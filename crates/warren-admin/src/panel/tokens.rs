//! The tokens pages: the list and the create form (the secret shown once),
//! one token's usage (this period, uses per day as a small SVG chart, its
//! latest refusals) and revoking it.

use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{NaiveDate, NaiveDateTime};
use maud::{Markup, html};
use serde::Deserialize;
use uuid::Uuid;
use warren_tokens::store::DenialFilter;
use warren_tokens::{Limit, NewToken, SubjectKind, SubjectRef};

use super::refusals::denial_table;
use super::{PanelSession, cross_site, error_page, page, render, render_form};
use crate::AdminState;

fn limit_text(limit: Limit) -> String {
    match limit {
        Limit::Unlimited => "unlimited".into(),
        Limit::MaxUses(n) => format!("{n} uses"),
        Limit::Monthly(n) => format!("{n} / month"),
    }
}

#[derive(Deserialize, Default)]
pub(super) struct Prefill {
    subject_kind: Option<String>,
    subject_name: Option<String>,
}

pub(super) async fn tokens(
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
    render_form(state, error.is_some(), page("Tokens", "tokens", body))
}

#[derive(Deserialize)]
pub(super) struct TokenForm {
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

pub(super) async fn create_token(
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

pub(super) async fn token_page(
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

pub(super) async fn revoke(
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
