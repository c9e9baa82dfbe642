//! The refusals page (filter by token and reason) and the refusal table
//! the token page shares.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use maud::{Markup, html};
use serde::Deserialize;
use uuid::Uuid;
use warren_tokens::Reason;
use warren_tokens::store::{DenialFilter, DenialView, TokenView};

use super::{PanelSession, error_page, page, render};
use crate::AdminState;

pub(super) fn denial_table(denials: &[DenialView], tokens: &[TokenView]) -> Markup {
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
#[derive(Deserialize)]
pub(super) struct RefusalQuery {
    token: Option<String>,
    reason: Option<String>,
}

pub(super) async fn refusals(
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
