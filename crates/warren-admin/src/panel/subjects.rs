//! The applications, groups and users pages: a list and a create form each.

use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;
use serde::Deserialize;
use warren_tokens::SubjectKind;

use super::{PanelSession, cross_site, error_page, page, render, render_form};
use crate::AdminState;
use crate::api::collection;

#[derive(Deserialize)]
pub(super) struct NameForm {
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
    render_form(state, error.is_some(), page(title, active, body))
}

pub(super) async fn subjects(
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

pub(super) async fn create_subject(
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
