//! The owner's requests: the pending list (polled by htmx, so a new request appears
//! without a reload), decided requests with their outcome, one request's SQL, rewritten
//! plan and privacy explanation, and the approve and deny forms.
//!
//! Listing, showing and deciding go through `flight::approvals::handle`, the code behind
//! the Flight actions: the same visibility rule (approvers of a table the request
//! touches; service admins see all), the same decision rule (`approve` on every table),
//! and the same audit record.

use std::sync::Arc;
use std::time::Instant;

use askama::Template;
use axum::extract::{Path, State};
use axum::response::{Html, Redirect};
use serde::Deserialize;
use serde_json::json;

use super::error::{Error, Result};
use super::session::{Action, Owner, Signed};
use super::views::{Layout, RequestRow};
use super::{Console, ROWS_TTL};
use crate::approval::{Request, Status, now};
use crate::auth::Principal;
use crate::flight::RequestId;
use crate::flight::approvals as actions;

/// How many pending requests get their row count computed in one list.
const COUNTED: usize = 20;
/// How many decided requests the list shows.
const DECIDED_SHOWN: usize = 50;

/// Expiry choices of the approve form: (label, seconds).
pub const EXPIRIES: [(&str, i64); 5] = [
    ("1 hour", 3600),
    ("8 hours", 8 * 3600),
    ("24 hours", 24 * 3600),
    ("7 days", 7 * 24 * 3600),
    ("30 days", 30 * 24 * 3600),
];

impl Console {
    /// Runs one approval action as `principal`, exactly as the Flight action would.
    pub(super) async fn action(
        &self,
        kind: &str,
        body: serde_json::Value,
        principal: &Arc<Principal>,
    ) -> Result<String> {
        let a = &self.airlock;
        actions::handle(
            kind,
            body.to_string().as_bytes(),
            principal,
            &a.sessions,
            a.approvals.as_ref(),
            a.audit.as_ref(),
            &RequestId::new(),
        )
        .await
        .unwrap_or_else(|| Err(crate::Error::Internal(format!("no action {kind}"))))
        .map_err(Error::from_service)
    }

    /// Every request `principal` may see, newest first.
    pub(super) async fn visible_requests(
        &self,
        principal: &Arc<Principal>,
    ) -> Result<Vec<Request>> {
        let text = self
            .action(actions::LIST, json!({ "pending": false }), principal)
            .await?;
        serde_json::from_str(&text).map_err(|e| Error::Internal(format!("request list: {e}")))
    }

    /// One request and how many rows approving it would release.
    async fn show(&self, principal: &Arc<Principal>, id: &str) -> Result<(Request, Option<u64>)> {
        let text = self
            .action(actions::SHOW, json!({ "id": id }), principal)
            .await?;
        let mut value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Internal(e.to_string()))?;
        let rows = value
            .as_object_mut()
            .and_then(|o| o.remove("would_release_rows"))
            .and_then(|v| v.as_u64());
        let request = serde_json::from_value(value).map_err(|e| Error::Internal(e.to_string()))?;
        self.rows
            .lock()
            .insert(id.to_string(), (Instant::now(), rows));
        Ok((request, rows))
    }

    /// The row count of a pending request, from the cache or counted now.
    async fn rows_of(&self, principal: &Arc<Principal>, id: &str) -> Option<u64> {
        if let Some((at, rows)) = self.rows.lock().get(id)
            && at.elapsed() < ROWS_TTL
        {
            return *rows;
        }
        self.show(principal, id).await.ok().and_then(|(_, n)| n)
    }
}

#[derive(Template)]
#[template(path = "requests.html")]
struct RequestsPage {
    layout: Layout,
    live: Live,
}

/// The part of the page htmx refreshes.
#[derive(Template)]
#[template(path = "requests_live.html")]
struct Live {
    pending: Vec<RequestRow>,
    decided: Vec<RequestRow>,
    updated: String,
}

async fn live_of(console: &Console, who: &Signed) -> Result<Live> {
    let all = console.visible_requests(&who.principal).await?;
    let t = now();
    let mut pending = Vec::new();
    let mut decided = Vec::new();
    for r in &all {
        let mut row = RequestRow::new(r, t);
        if r.status == Status::Pending {
            if pending.len() < COUNTED {
                row.rows = console.rows_of(&who.principal, &r.id).await;
            }
            pending.push(row);
        } else if decided.len() < DECIDED_SHOWN {
            decided.push(row);
        }
    }
    // Oldest pending first: the queue in the order it arrived.
    pending.reverse();
    Ok(Live {
        pending,
        decided,
        updated: super::views::when(t),
    })
}

/// GET `/requests`.
pub async fn page(State(console): State<Arc<Console>>, Owner(who): Owner) -> Result<Html<String>> {
    let page = RequestsPage {
        layout: who.layout("requests"),
        live: live_of(&console, &who).await?,
    };
    page.render().map(Html).map_err(Error::render)
}

/// GET `/requests/live`: the lists alone, polled by the page.
pub async fn live(State(console): State<Arc<Console>>, Owner(who): Owner) -> Result<Html<String>> {
    live_of(&console, &who)
        .await?
        .render()
        .map(Html)
        .map_err(Error::render)
}

#[derive(Template)]
#[template(path = "request.html")]
struct DetailPage {
    layout: Layout,
    row: RequestRow,
    plan: String,
    explanation: String,
    fingerprint: String,
    policy_digest: String,
    roles: String,
    can_decide: bool,
    expiries: Vec<(&'static str, i64)>,
}

/// GET `/requests/{id}`: who, when, the SQL, the rewritten plan, why, and the decision forms.
pub async fn detail(
    State(console): State<Arc<Console>>,
    Owner(who): Owner,
    Path(id): Path<String>,
) -> Result<Html<String>> {
    let (request, rows) = console.show(&who.principal, &id).await?;
    let requester = Arc::new(Principal {
        name: request.key.principal.clone(),
        roles: request.roles.clone(),
    });
    // The explanation as the requester's session sees the query: masks, filters,
    // thresholds and the decision. It runs nothing.
    let session = console.airlock.sessions.session_for(&requester);
    let explanation = match crate::query::explain_privacy(session, &request.sql).await {
        Ok(text) => text,
        Err(e) => format!("no explanation: {e}"),
    };
    let can_decide = request.status == Status::Pending
        && actions::can_decide(&console.airlock.sessions, &who.principal, &request);
    let mut row = RequestRow::new(&request, now());
    row.rows = rows;
    let page = DetailPage {
        layout: who.layout("requests"),
        row,
        plan: request.plan.clone(),
        explanation,
        fingerprint: request.key.fingerprint.clone(),
        policy_digest: request.key.policy.clone(),
        roles: request.roles.join(", "),
        can_decide,
        expiries: EXPIRIES.to_vec(),
    };
    page.render().map(Html).map_err(Error::render)
}

#[derive(Debug, Deserialize)]
pub struct ApproveForm {
    #[serde(default)]
    max_rows: String,
    expires_in_secs: i64,
    /// A checkbox: present when ticked.
    reusable: Option<String>,
}

/// POST `/requests/{id}/approve`.
pub async fn approve(
    State(console): State<Arc<Console>>,
    Path(id): Path<String>,
    action: Action<ApproveForm>,
) -> Result<Redirect> {
    action.who.require_owner()?;
    let f = action.form;
    let max_rows = match f.max_rows.trim() {
        "" => None,
        n => Some(n.parse::<u64>().map_err(|_| {
            Error::BadRequest("the row cap must be a whole number of rows, or empty".into())
        })?),
    };
    if !EXPIRIES.iter().any(|(_, s)| *s == f.expires_in_secs) {
        return Err(Error::BadRequest(
            "choose one of the offered expiries".into(),
        ));
    }
    let body = json!({
        "id": id,
        "max_rows": max_rows,
        "expires_in_secs": f.expires_in_secs,
        "reusable": f.reusable.is_some(),
    });
    console
        .action(actions::APPROVE, body, &action.who.principal)
        .await?;
    console.rows.lock().remove(&id);
    Ok(Redirect::to(&format!("/requests/{id}")))
}

#[derive(Debug, Deserialize)]
pub struct DenyForm {
    reason: String,
}

/// POST `/requests/{id}/deny`.
pub async fn deny(
    State(console): State<Arc<Console>>,
    Path(id): Path<String>,
    action: Action<DenyForm>,
) -> Result<Redirect> {
    action.who.require_owner()?;
    let body = json!({ "id": id, "reason": action.form.reason.trim() });
    console
        .action(actions::DENY, body, &action.who.principal)
        .await?;
    console.rows.lock().remove(&id);
    Ok(Redirect::to(&format!("/requests/{id}")))
}
