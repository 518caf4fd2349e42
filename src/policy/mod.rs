//! Policy: who may do what (casbin), and the privacy settings of each table.
//!
//! A [`PolicySnapshot`] is immutable; the [`PolicyStore`] swaps whole snapshots
//! atomically, so a query plans and runs against exactly one of them and a bad reload
//! leaves the last good one in force. The plan rewriter (`crate::rewrite`) reads the
//! snapshot a session was built with.

pub mod access;
pub mod dp;
pub mod refusal;
pub mod sorted;
pub mod tables;
pub mod unique;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

use crate::auth::{Principal, Users};
use crate::catalog::Catalog;
use crate::config::{Diagnostic, Diagnostics, TableName};
pub use access::{AccessPolicy, SERVICE_OBJECT};
pub use tables::{TablePolicy, TablesPolicy};

/// Casbin actions (PRIVACY.md §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Aggregate,
    Request,
    Read,
    Unmasked,
    Approve,
    Admin,
}

impl Action {
    pub const ALL: [Action; 6] = [
        Action::Aggregate,
        Action::Request,
        Action::Read,
        Action::Unmasked,
        Action::Approve,
        Action::Admin,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Action::Aggregate => "aggregate",
            Action::Request => "request",
            Action::Read => "read",
            Action::Unmasked => "unmasked",
            Action::Approve => "approve",
            Action::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

/// The three policy files of a policy directory.
pub const MODEL_FILE: &str = "model.conf";
pub const POLICY_FILE: &str = "policy.csv";
pub const TABLES_FILE: &str = "tables.toml";

/// One immutable, validated policy: access rules plus table settings.
#[derive(Debug)]
pub struct PolicySnapshot {
    /// Increases by one with each successful load in this process.
    pub version: u64,
    /// SHA-256 of the three files: identifies the policy across restarts.
    pub digest: String,
    pub access: AccessPolicy,
    pub tables: TablesPolicy,
}

impl PolicySnapshot {
    /// Loads and validates a policy directory against the catalog.
    pub async fn load(
        dir: &Path,
        users: &Users,
        catalog: &Catalog,
        version: u64,
    ) -> Result<Self, Diagnostics> {
        let read = |name: &str| -> Result<(PathBuf, String), Diagnostics> {
            let path = dir.join(name);
            std::fs::read_to_string(&path)
                .map(|t| (path.clone(), t))
                .map_err(|e| {
                    Diagnostics::one(Diagnostic::new(&path, None, format!("cannot read: {e}")))
                })
        };
        let (model_path, model) = read(MODEL_FILE)?;
        let (policy_path, policy) = read(POLICY_FILE)?;
        let (tables_path, tables_text) = read(TABLES_FILE)?;
        let mut errors = Vec::new();
        let access = AccessPolicy::load(&model_path, &model, &policy_path, &policy, users).await;
        let schema_of = |t: &TableName| catalog.schema(t).map(|s| s.as_ref().clone());
        let tables = TablesPolicy::parse(&tables_path, &tables_text, &schema_of);
        let (access, mut tables) = match (access, tables) {
            (Ok(a), Ok(t)) => (a, t),
            (a, t) => {
                if let Err(e) = a {
                    errors.extend(e.0);
                }
                if let Err(e) = t {
                    errors.extend(e.0);
                }
                return Err(Diagnostics(errors));
            }
        };
        let repeated = unique::violations(&tables, catalog).await;
        if !repeated.is_empty() {
            return Err(Diagnostics(
                repeated
                    .into_iter()
                    .map(|(key, m)| {
                        Diagnostic::at_span(&tables_path, &tables_text, Some(key.span), m)
                    })
                    .collect(),
            ));
        }
        sorted::mark(&mut tables, catalog).await;
        let mut h = Sha256::new();
        for text in [&model, &policy, &tables_text] {
            h.update((text.len() as u64).to_le_bytes());
            h.update(text.as_bytes());
        }
        let digest = h
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        Ok(Self {
            version,
            digest,
            access,
            tables,
        })
    }

    /// Whether `principal` holds `action` on `table`.
    pub fn allows(&self, principal: &Principal, table: &TableName, action: Action) -> bool {
        self.access.allows(principal, &table.to_string(), action)
    }

    /// Whether `principal` holds any action at all on `table`: a table without one does
    /// not exist for them.
    pub fn can_see(&self, principal: &Principal, table: &TableName) -> bool {
        Action::ALL
            .into_iter()
            .any(|a| self.allows(principal, table, a))
    }

    /// Whether `principal` may run service-wide operations (`admin` on `*`).
    pub fn is_service_admin(&self, principal: &Principal) -> bool {
        self.access.allows(principal, SERVICE_OBJECT, Action::Admin)
    }
}

/// The policy in force, swapped atomically on reload.
#[derive(Debug)]
pub struct PolicyStore {
    dir: PathBuf,
    current: ArcSwap<PolicySnapshot>,
    next_version: AtomicU64,
}

impl PolicyStore {
    /// Loads the first policy; a bad one refuses to start.
    pub async fn open(dir: PathBuf, users: &Users, catalog: &Catalog) -> Result<Self, Diagnostics> {
        let snapshot = PolicySnapshot::load(&dir, users, catalog, 1).await?;
        Ok(Self {
            dir,
            current: ArcSwap::from_pointee(snapshot),
            next_version: AtomicU64::new(2),
        })
    }

    /// The snapshot in force now.
    pub fn current(&self) -> Arc<PolicySnapshot> {
        self.current.load_full()
    }

    /// Reloads the directory. On error the last good snapshot stays in force.
    pub async fn reload(
        &self,
        users: &Users,
        catalog: &Catalog,
    ) -> Result<Arc<PolicySnapshot>, Diagnostics> {
        let version = self.next_version.fetch_add(1, Ordering::SeqCst);
        let snapshot = Arc::new(PolicySnapshot::load(&self.dir, users, catalog, version).await?);
        self.current.store(Arc::clone(&snapshot));
        tracing::info!(version, digest = %snapshot.digest, "policy reloaded");
        Ok(snapshot)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
