//! The owners' side of approvals as Flight actions (JSON bodies), and the analyst's
//! status poll. No decision logic beyond who may see and decide what.
//!
//! | action | body | who |
//! |---|---|---|
//! | `ListRequests` | `{"pending": bool}` | approvers of a table the request touches; admins see all |
//! | `ShowRequest` | `{"id": ...}` | the same |
//! | `ApproveRequest` | `{"id", "max_rows"?, "expires_in_secs"? (86400), "reusable"?}` | `approve` on every table |
//! | `DenyRequest` | `{"id", "reason"}` | `approve` on every table |
//! | `RequestStatus` | `{"id"}` | the requester and approvers |

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::approval::{ApprovalStore, Decision, Request, Status, now};
use crate::audit::{AuditTrail, Event as AuditEvent};
use crate::auth::Principal;
use crate::config::TableName;
use crate::error::{Error, Result};
use crate::flight::RequestId;
use crate::policy::Action;
use crate::policy::refusal::{ReasonCode, Refusal};
use crate::query;
use crate::session::Sessions;

pub const LIST: &str = "ListRequests";
pub const SHOW: &str = "ShowRequest";
pub const APPROVE: &str = "ApproveRequest";
pub const DENY: &str = "DenyRequest";
pub const STATUS: &str = "RequestStatus";

/// Default lifetime of an approval: 24 hours.
pub const DEFAULT_EXPIRY_SECS: i64 = 24 * 3600;

/// Longest lifetime of an approval: ten years (a longer one is a mistake, and a much
/// longer one would overflow the clock's arithmetic).
pub const MAX_EXPIRY_SECS: i64 = 10 * 365 * 24 * 3600;

#[derive(Debug, Default, Deserialize)]
struct IdBody {
    id: String,
}

#[derive(Debug, Default, Deserialize)]
struct ListBody {
    #[serde(default)]
    pending: bool,
}

#[derive(Debug, Deserialize)]
struct ApproveBody {
    id: String,
    max_rows: Option<u64>,
    expires_in_secs: Option<i64>,
    #[serde(default)]
    reusable: bool,
}

#[derive(Debug, Deserialize)]
struct DenyBody {
    id: String,
    reason: String,
}

/// What an owner sees of a request.
#[derive(Debug, Serialize)]
pub struct RequestView<'a> {
    #[serde(flatten)]
    pub request: &'a Request,
    pub would_release_rows: Option<u64>,
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| Error::InvalidRequest(format!("bad action body: {e}")))
}

/// The request a `{"id": ...}` body names.
async fn request_in(body: &[u8], store: &dyn ApprovalStore) -> Result<Request> {
    let b: IdBody = parse(body)?;
    store.get(&b.id).await.map_err(store_err)
}

fn tables(r: &Request) -> Vec<TableName> {
    r.tables
        .iter()
        .filter_map(|t| TableName::parse(t).ok())
        .collect()
}

/// Whether `principal` may decide `r`: `approve` on every table it touches.
pub fn can_decide(sessions: &Sessions, principal: &Principal, r: &Request) -> bool {
    let policy = sessions.policy().current();
    let t = tables(r);
    !t.is_empty()
        && t.len() == r.tables.len()
        && t.iter()
            .all(|t| policy.allows(principal, t, Action::Approve))
}

/// Admins see every request; an approver sees those touching a table they approve for.
pub fn can_see(sessions: &Sessions, principal: &Principal, r: &Request) -> bool {
    let policy = sessions.policy().current();
    policy.is_service_admin(principal)
        || tables(r)
            .iter()
            .any(|t| policy.allows(principal, t, Action::Approve))
}

fn not_yours(id: &str) -> Error {
    // The same answer as an unknown id: requests of others do not exist for you.
    Error::InvalidRequest(format!("no approval request {id}"))
}

fn store_err(e: crate::approval::Error) -> Error {
    match e {
        crate::approval::Error::NotFound(id) => {
            Error::InvalidRequest(format!("no approval request {id}"))
        }
        crate::approval::Error::AlreadyDecided(id) => {
            Error::InvalidRequest(format!("request {id} was already decided"))
        }
        crate::approval::Error::OutOfRange(m) => Error::InvalidRequest(m),
        other => Error::from_store(other),
    }
}

/// Runs one approval action; `None` when `kind` is not one.
pub async fn handle(
    kind: &str,
    body: &[u8],
    principal: &Arc<Principal>,
    sessions: &Sessions,
    store: &dyn ApprovalStore,
    audit: &dyn AuditTrail,
    rid: &RequestId,
) -> Option<Result<String>> {
    let result = match kind {
        LIST => list(body, principal, sessions, store).await,
        SHOW => show(body, principal, sessions, store).await,
        APPROVE | DENY => {
            decide(
                body,
                principal,
                sessions,
                store,
                audit,
                rid,
                kind == APPROVE,
            )
            .await
        }
        STATUS => status(body, principal, sessions, store).await,
        _ => return None,
    };
    Some(result)
}

async fn list(
    body: &[u8],
    principal: &Principal,
    sessions: &Sessions,
    store: &dyn ApprovalStore,
) -> Result<String> {
    let b: ListBody = if body.is_empty() {
        ListBody::default()
    } else {
        parse(body)?
    };
    let all = store.list(b.pending).await.map_err(store_err)?;
    let visible: Vec<&Request> = all
        .iter()
        .filter(|r| can_see(sessions, principal, r))
        .collect();
    Ok(serde_json::to_string(&visible).unwrap_or_default())
}

async fn show(
    body: &[u8],
    principal: &Principal,
    sessions: &Sessions,
    store: &dyn ApprovalStore,
) -> Result<String> {
    let r = request_in(body, store).await?;
    if !can_see(sessions, principal, &r) {
        return Err(not_yours(&r.id));
    }
    // How many rows approving it would release, computed as the requester.
    let requester = Arc::new(Principal {
        name: r.key.principal.clone(),
        roles: r.roles.clone(),
    });
    let session = sessions.session_for(&requester);
    let rows = async {
        let params = query::params_from_key(&r.key.params)?;
        let plan = query::approved_plan(&session, &r.sql, Some(&params)).await?;
        query::count_rows(sessions, &session, plan).await
    }
    .await
    .ok();
    Ok(serde_json::to_string(&RequestView {
        request: &r,
        would_release_rows: rows,
    })
    .unwrap_or_default())
}

/// Records a decision and its audit record in one durable step (the approval store's
/// transaction writes the record to the audit outbox, or with PostgreSQL to the chain
/// itself), then moves an outbox record to the log.
/// Refused with `AUDIT_UNAVAILABLE`, deciding nothing, while the log cannot be written.
async fn decide(
    body: &[u8],
    principal: &Principal,
    sessions: &Sessions,
    store: &dyn ApprovalStore,
    audit: &dyn AuditTrail,
    rid: &RequestId,
    approve: bool,
) -> Result<String> {
    let (id, decision) = if approve {
        let b: ApproveBody = parse(body)?;
        let expires = b.expires_in_secs.unwrap_or(DEFAULT_EXPIRY_SECS);
        if !(1..=MAX_EXPIRY_SECS).contains(&expires) {
            return Err(Error::InvalidRequest(format!(
                "expires_in_secs must be between 1 and {MAX_EXPIRY_SECS} (ten years)"
            )));
        }
        if let Some(n) = b.max_rows
            && i64::try_from(n).is_err()
        {
            return Err(Error::InvalidRequest(format!(
                "max_rows must be at most {}",
                i64::MAX
            )));
        }
        let expires_at = now()
            .checked_add(expires)
            .ok_or_else(|| Error::InvalidRequest("expires_in_secs is too large".into()))?;
        (
            b.id,
            Decision::Approve {
                max_rows: b.max_rows,
                expires_at,
                reusable: b.reusable,
            },
        )
    } else {
        let b: DenyBody = parse(body)?;
        if b.reason.trim().is_empty() {
            return Err(Error::InvalidRequest("a denial needs a reason".into()));
        }
        (b.id, Decision::Deny { reason: b.reason })
    };
    let r = store.get(&id).await.map_err(store_err)?;
    if !can_decide(sessions, principal, &r) {
        if can_see(sessions, principal, &r) {
            return Err(Refusal::new(
                ReasonCode::AccessDenied,
                format!(
                    "deciding request {id} needs the approve action on {}",
                    r.tables.join(", ")
                ),
            )
            .into());
        }
        return Err(not_yours(&id));
    }
    if !audit.writable() {
        return Err(Error::AuditUnavailable(crate::audit::Error::Unavailable));
    }
    let record = AuditEvent {
        kind: "decision".into(),
        principal: principal.name.clone(),
        request_id: rid.to_string(),
        approval: Some(id.clone()),
        sql: Some(r.sql.clone()),
        decision: if approve { "approved" } else { "denied" }.into(),
        ..Default::default()
    };
    let (decided, outbox) = store
        .decide(&id, decision, &principal.name, now(), &record)
        .await
        .map_err(store_err)?;
    tracing::info!(request = %id, decided_by = %principal.name, approved = approve, "approval decision");
    if let Some(outbox) = outbox
        && let Err(e) = audit.append_from_outbox(outbox, record).await
    {
        // The decision and its record are durable together in the state store; the record
        // reaches the log when the server next starts.
        tracing::error!(request = %id, error = %e, "decision recorded in the outbox only");
    }
    Ok(serde_json::to_string(&decided).unwrap_or_default())
}

async fn status(
    body: &[u8],
    principal: &Principal,
    sessions: &Sessions,
    store: &dyn ApprovalStore,
) -> Result<String> {
    let r = request_in(body, store).await?;
    if r.key.principal != principal.name && !can_see(sessions, principal, &r) {
        return Err(not_yours(&r.id));
    }
    let expired = matches!(r.status, Status::Approved { expires_at, .. } if expires_at <= now());
    // {"status": "...", plus the decision's own fields}, then the request's.
    let mut out = serde_json::to_value(&r.status).unwrap_or_default();
    if let Some(o) = out.as_object_mut() {
        for (k, v) in [
            ("id", json!(r.id)),
            ("expired", json!(expired)),
            ("reasons", json!(r.reasons)),
            ("created_at", json!(r.created_at)),
            ("decided_at", json!(r.decided_at)),
        ] {
            o.insert(k.into(), v);
        }
    }
    Ok(out.to_string())
}
