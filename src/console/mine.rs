//! The analyst's view (open to every signed-in principal): their own requests with status
//! and the owner's reason, and their access: tables, actions, limits. Nothing here shows
//! another principal's request.

use std::sync::Arc;

use askama::Template;
use axum::extract::State;
use axum::response::Html;

use super::Console;
use super::error::{Error, Result};
use super::policy::Settings;
use super::session::Signed;
use super::views::{Layout, RequestRow};
use crate::approval::now;
use crate::policy::Action;

#[derive(Template)]
#[template(path = "mine.html")]
struct MinePage {
    layout: Layout,
    live: MineLive,
}

#[derive(Template)]
#[template(path = "mine_live.html")]
struct MineLive {
    requests: Vec<RequestRow>,
    updated: String,
}

async fn live_of(console: &Console, who: &Signed) -> Result<MineLive> {
    let t = now();
    let requests = console
        .airlock
        .approvals
        .list(false)
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
        .iter()
        .filter(|r| r.key.principal == who.principal.name)
        .map(|r| RequestRow::new(r, t))
        .collect();
    Ok(MineLive {
        requests,
        updated: super::views::when(t),
    })
}

/// GET `/mine`.
pub async fn requests(State(console): State<Arc<Console>>, who: Signed) -> Result<Html<String>> {
    let page = MinePage {
        layout: who.layout("mine"),
        live: live_of(&console, &who).await?,
    };
    page.render().map(Html).map_err(Error::render)
}

/// GET `/mine/live`: the list alone, polled by the page.
pub async fn live(State(console): State<Arc<Console>>, who: Signed) -> Result<Html<String>> {
    live_of(&console, &who)
        .await?
        .render()
        .map(Html)
        .map_err(Error::render)
}

/// One table as its principal may use it.
#[derive(Debug, Clone)]
pub struct AccessRow {
    pub name: String,
    pub actions: String,
    pub settings: Settings,
    /// Wiped columns are masked for this principal (no `unmasked`).
    pub masked: bool,
    /// The row filters of this principal's roles.
    pub my_filters: Vec<String>,
    pub automatic: bool,
    pub can_request: bool,
}

#[derive(Template)]
#[template(path = "access.html")]
struct AccessPage {
    layout: Layout,
    roles: String,
    tables: Vec<AccessRow>,
    query_timeout: String,
    memory_per_query: String,
    max_concurrent_queries: usize,
}

/// GET `/access`: the tables this principal may use and how.
pub async fn access(State(console): State<Arc<Console>>, who: Signed) -> Result<Html<String>> {
    let policy = console.airlock.sessions.policy().current();
    let catalog = console.airlock.sessions.catalog();
    let p = &who.principal;
    let mut names: Vec<_> = catalog
        .tables()
        .map(|(t, _)| t.clone())
        .filter(|t| policy.can_see(p, t))
        .collect();
    names.sort();
    let tables = names
        .iter()
        .map(|t| {
            let held: Vec<&str> = Action::ALL
                .iter()
                .filter(|a| policy.allows(p, t, **a))
                .map(|a| a.as_str())
                .collect();
            let settings = Settings::of(&policy, &catalog, t);
            let my_filters = settings
                .row_filters
                .iter()
                .filter(|(role, _)| p.roles.contains(role))
                .map(|(_, w)| w.clone())
                .collect();
            AccessRow {
                name: t.to_string(),
                actions: held.join(", "),
                masked: !policy.allows(p, t, Action::Unmasked),
                my_filters,
                automatic: !policy.allows(p, t, Action::Read),
                can_request: policy.allows(p, t, Action::Request),
                settings,
            }
        })
        .collect();
    let limits = &console.airlock.config.limits;
    let page = AccessPage {
        layout: who.layout("access"),
        roles: p.roles.join(", "),
        tables,
        query_timeout: humantime::format_duration(limits.query_timeout).to_string(),
        memory_per_query: bytesize::ByteSize::b(limits.memory_per_query as u64).to_string(),
        max_concurrent_queries: limits.max_concurrent_queries,
    };
    page.render().map(Html).map_err(Error::render)
}
