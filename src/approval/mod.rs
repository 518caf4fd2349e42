//! Durable approval requests and the owners' decisions (PRIVACY.md §4).
//!
//! A result that fails the automatic rules, asked for by a principal holding `request`,
//! becomes a request keyed by principal, normalized plan fingerprint, bound parameters
//! and policy version: asking twice finds the same request. Owners approve (with an
//! optional row cap, an expiry, single use or reusable) or deny (with a reason). The
//! [`ApprovalStore`] trait keeps the storage replaceable; [`sqlite::SqliteStore`] is the
//! embedded default (WAL, synchronous writes: nothing the analyst was told about is lost
//! on `kill -9`).

pub mod budget;
pub mod sqlite;

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("approval store: {0}")]
    Store(#[from] rusqlite::Error),
    #[error("shared state: {0}")]
    Shared(#[from] crate::state::Error),
    #[error("no approval request {0}")]
    NotFound(String),
    #[error("request {0} was already decided")]
    AlreadyDecided(String),
    #[error("{0}")]
    OutOfRange(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What identifies a request: the same principal asking the same (normalized) query
/// with the same parameters under the same policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestKey {
    pub principal: String,
    pub fingerprint: String,
    pub params: String,
    pub policy: String,
}

/// A request about to be created.
#[derive(Debug, Clone)]
pub struct NewRequest {
    pub key: RequestKey,
    pub roles: Vec<String>,
    pub sql: String,
    pub tables: Vec<String>,
    pub reasons: String,
    pub plan: String,
}

/// Where a request stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Status {
    Pending,
    Approved {
        max_rows: Option<u64>,
        expires_at: i64,
        reusable: bool,
        used: bool,
    },
    Denied {
        reason: String,
    },
}

/// A stored request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: String,
    pub key: RequestKey,
    pub roles: Vec<String>,
    pub sql: String,
    pub tables: Vec<String>,
    pub reasons: String,
    pub plan: String,
    pub created_at: i64,
    #[serde(flatten)]
    pub status: Status,
    pub decided_by: Option<String>,
    pub decided_at: Option<i64>,
}

impl Request {
    /// Whether an approval can release rows now.
    pub fn usable(&self, now: i64) -> bool {
        matches!(self.status, Status::Approved { expires_at, reusable, used, .. } if expires_at > now && (reusable || !used))
    }
}

/// An owner's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Approve {
        max_rows: Option<u64>,
        expires_at: i64,
        reusable: bool,
    },
    Deny {
        reason: String,
    },
}

/// Storage for requests and decisions: [`SqliteStore`] (embedded, one front end) or
/// [`crate::state::postgres::PgState`] (shared by every front end of a deployment).
#[async_trait::async_trait]
pub trait ApprovalStore: Send + Sync + std::fmt::Debug {
    /// The latest request for `new.key` if it is pending, denied or still usable;
    /// otherwise a new pending request.
    async fn find_or_create(&self, new: NewRequest, now: i64) -> Result<Request>;
    async fn get(&self, id: &str) -> Result<Request>;
    /// Every request, newest first (only pending ones if asked).
    async fn list(&self, pending_only: bool) -> Result<Vec<Request>>;
    /// Records an owner's decision on a pending request, and in the same transaction its
    /// audit record (`record`, with the request id filled in), so that a decision never
    /// exists without its record (PRIVACY.md §5). Where the audit trail lives in another
    /// store (SQLite beside the audit file) the record goes to the audit outbox and this
    /// returns its outbox id, for the trail to append and clear
    /// ([`crate::audit::AuditTrail::append_from_outbox`]); where it lives in the same
    /// database (PostgreSQL) it is appended to the chain in the transaction: `None`.
    async fn decide(
        &self,
        id: &str,
        decision: Decision,
        by: &str,
        now: i64,
        record: &crate::audit::Event,
    ) -> Result<(Request, Option<i64>)>;
    /// Uses an approval once: true if it could release rows (and, when single use, it
    /// cannot any more).
    async fn consume(&self, id: &str, now: i64) -> Result<bool>;
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A short random request id.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}
