//! Where a front end keeps what must outlive a query: approval requests and decisions,
//! the privacy-budget ledger, the audit chain and (when several front ends share it)
//! bearer tokens.
//!
//! Two stores, one set of traits ([`ApprovalStore`], [`BudgetLedger`], [`AuditTrail`],
//! [`TokenStore`]):
//!
//! - **embedded** (default): SQLite and the audit file in the state directory. One front
//!   end; nothing to set up.
//! - **PostgreSQL** (`[state] url = "postgres://…"`, `--state-url`, `AIRLOCK_STATE_URL`):
//!   every front end behind a load balancer shares requests, budgets, tokens and one
//!   audit chain, whose appends are serialised in the database
//!   ([`postgres::PgState`]).
//!
//! Either way the store fails closed: when it cannot be written, queries are refused
//! (`AUDIT_UNAVAILABLE`), never answered unaudited.

#[doc(hidden)]
pub mod conformance;
pub mod postgres;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::approval::budget::BudgetLedger;
use crate::approval::{ApprovalStore, SqliteStore};
use crate::audit::{AuditLog, AuditTrail};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}", with_causes(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("PostgreSQL did not answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Schema(String),
    /// The chain in the database does not hold what this front end wrote: records were
    /// removed or replaced. Appends are refused until an operator looks.
    #[error("the audit chain was tampered with: {0}")]
    Tampered(String),
}

/// An error and what caused it ("error performing TLS handshake: invalid peer
/// certificate: UnknownIssuer"): tokio-postgres keeps the useful part in the causes.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Where the state lives (`[state]`, `--state-url`, `--audit-key-file`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateConfig {
    /// PostgreSQL connection URL; `None` keeps the embedded SQLite store.
    pub url: Option<String>,
    /// The audit chain's key (default `<state-dir>/keys/audit.key`, created when
    /// missing). Front ends sharing a PostgreSQL state must hold the same key.
    pub audit_key_file: Option<PathBuf>,
    /// The CA that signed PostgreSQL's certificate: with it, connections use TLS (and
    /// must, to PostgreSQL on another machine).
    pub ca_file: Option<PathBuf>,
}

impl StateConfig {
    /// The key file, given the state directory.
    pub fn key_file(&self, state_dir: &Path) -> PathBuf {
        self.audit_key_file
            .clone()
            .unwrap_or_else(|| crate::audit::key_path(state_dir))
    }
}

/// Bearer tokens shared by the front ends of a deployment: a token issued by one is
/// honoured by the others. Only a hash of the token is stored.
#[async_trait::async_trait]
pub trait TokenStore: Send + Sync + std::fmt::Debug {
    /// Keeps a token's grant until `expires_at` (Unix seconds).
    async fn put_token(&self, grant: &SharedGrant) -> Result<(), Error>;
    /// The grant of a token hash, if it exists and has not expired.
    async fn get_token(&self, hash: &str, now: i64) -> Result<Option<SharedGrant>, Error>;
}

/// A bearer token as the front ends share it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedGrant {
    /// SHA-256 of the token, hex.
    pub hash: String,
    pub principal: String,
    /// The client certificate the token is bound to (SHA-256, hex), if any.
    pub certificate: Option<String>,
    pub expires_at: i64,
}

/// The opened stores.
#[derive(Debug, Clone)]
pub struct State {
    pub approvals: Arc<dyn ApprovalStore>,
    pub ledger: Arc<dyn BudgetLedger>,
    pub audit: Arc<dyn AuditTrail>,
    /// Shared tokens (PostgreSQL only; the embedded store keeps them in memory).
    pub tokens: Option<Arc<dyn TokenStore>>,
}

impl State {
    /// Opens the store `config` names, recovering from a crash of this (or, with
    /// PostgreSQL, another) front end.
    pub async fn open(state_dir: &Path, config: &StateConfig) -> crate::server::Result<Self> {
        let key_file = config.key_file(state_dir);
        match &config.url {
            None => {
                let approvals = Arc::new(SqliteStore::open(&state_dir.join("approvals"))?);
                let ledger = Arc::new(crate::approval::budget::Ledger::open(
                    &state_dir.join("approvals"),
                )?);
                let audit = Arc::new(AuditLog::open_with_key(state_dir, &key_file)?);
                Ok(Self {
                    approvals,
                    ledger,
                    audit,
                    tokens: None,
                })
            }
            Some(url) => {
                let key = crate::audit::load_key_at(&key_file, true)?;
                let pg = Arc::new(
                    postgres::PgState::open(url, config.ca_file.as_deref(), key, state_dir)
                        .await
                        .map_err(crate::server::Error::State)?,
                );
                Ok(Self {
                    approvals: pg.clone(),
                    ledger: pg.clone(),
                    audit: pg.clone(),
                    tokens: Some(pg),
                })
            }
        }
    }
}
