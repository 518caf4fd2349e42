//! The embedded approval store: SQLite in the state directory, WAL journal, synchronous
//! writes (`synchronous = FULL`): a request is on disk before the analyst hears of it.

use std::path::Path;

use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{
    ApprovalStore, Decision, Error, NewRequest, Request, RequestKey, Result, Status, new_id,
};

#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    roles TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    params TEXT NOT NULL,
    policy TEXT NOT NULL,
    sql TEXT NOT NULL,
    tables TEXT NOT NULL,
    reasons TEXT NOT NULL,
    plan TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'denied')),
    max_rows INTEGER,
    expires_at INTEGER,
    reusable INTEGER NOT NULL DEFAULT 0,
    used INTEGER NOT NULL DEFAULT 0,
    deny_reason TEXT,
    decided_by TEXT,
    decided_at INTEGER
);
CREATE INDEX IF NOT EXISTS requests_by_key ON requests (principal, fingerprint, params, policy, created_at);
";

const COLUMNS: &str = "id, principal, roles, fingerprint, params, policy, sql, tables, reasons, plan, created_at, status, max_rows, expires_at, reusable, used, deny_reason, decided_by, decided_at";

impl SqliteStore {
    /// Opens (or creates) `approvals.sqlite` under `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Store(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        let conn = Connection::open(dir.join("approvals.sqlite"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(crate::audit::STORE_SCHEMA)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn row(r: &Row<'_>) -> rusqlite::Result<Request> {
        let status: String = r.get(11)?;
        let json = |i: usize| -> rusqlite::Result<Vec<String>> {
            let s: String = r.get(i)?;
            Ok(serde_json::from_str(&s).unwrap_or_default())
        };
        let status = match status.as_str() {
            "approved" => Status::Approved {
                max_rows: r.get::<_, Option<i64>>(12)?.map(|n| n as u64),
                expires_at: r.get::<_, Option<i64>>(13)?.unwrap_or(0),
                reusable: r.get::<_, i64>(14)? != 0,
                used: r.get::<_, i64>(15)? != 0,
            },
            "denied" => Status::Denied {
                reason: r.get::<_, Option<String>>(16)?.unwrap_or_default(),
            },
            _ => Status::Pending,
        };
        Ok(Request {
            id: r.get(0)?,
            key: RequestKey {
                principal: r.get(1)?,
                fingerprint: r.get(3)?,
                params: r.get(4)?,
                policy: r.get(5)?,
            },
            roles: json(2)?,
            sql: r.get(6)?,
            tables: json(7)?,
            reasons: r.get(8)?,
            plan: r.get(9)?,
            created_at: r.get(10)?,
            status,
            decided_by: r.get(17)?,
            decided_at: r.get(18)?,
        })
    }

    fn get_in(conn: &Connection, id: &str) -> Result<Request> {
        conn.query_row(
            &format!("SELECT {COLUMNS} FROM requests WHERE id = ?1"),
            params![id],
            Self::row,
        )
        .optional()?
        .ok_or_else(|| Error::NotFound(id.to_string()))
    }
}

#[async_trait::async_trait]
impl ApprovalStore for SqliteStore {
    async fn find_or_create(&self, new: NewRequest, now: i64) -> Result<Request> {
        let mut conn = self.conn.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let latest = tx
            .query_row(
                &format!(
                    "SELECT {COLUMNS} FROM requests WHERE principal = ?1 AND fingerprint = ?2 AND params = ?3 AND policy = ?4 \
                     ORDER BY created_at DESC, rowid DESC LIMIT 1"
                ),
                params![new.key.principal, new.key.fingerprint, new.key.params, new.key.policy],
                Self::row,
            )
            .optional()?;
        if let Some(r) = latest {
            let keep = match r.status {
                Status::Pending | Status::Denied { .. } => true,
                Status::Approved { .. } => r.usable(now),
            };
            if keep {
                tx.commit()?;
                return Ok(r);
            }
        }
        let id = new_id();
        tx.execute(
            "INSERT INTO requests (id, principal, roles, fingerprint, params, policy, sql, tables, reasons, plan, created_at, status) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 'pending')",
            params![
                id,
                new.key.principal,
                serde_json::to_string(&new.roles).unwrap_or_default(),
                new.key.fingerprint,
                new.key.params,
                new.key.policy,
                new.sql,
                serde_json::to_string(&new.tables).unwrap_or_default(),
                new.reasons,
                new.plan,
                now
            ],
        )?;
        let r = Self::get_in(&tx, &id)?;
        tx.commit()?;
        Ok(r)
    }

    async fn get(&self, id: &str) -> Result<Request> {
        Self::get_in(&self.conn.lock(), id)
    }

    async fn list(&self, pending_only: bool) -> Result<Vec<Request>> {
        let conn = self.conn.lock();
        let filter = if pending_only {
            "WHERE status = 'pending'"
        } else {
            ""
        };
        let mut stmt = conn.prepare(&format!(
            "SELECT {COLUMNS} FROM requests {filter} ORDER BY created_at DESC, rowid DESC"
        ))?;
        let rows = stmt
            .query_map([], Self::row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    async fn decide(
        &self,
        id: &str,
        decision: Decision,
        by: &str,
        now: i64,
        record: &crate::audit::Event,
    ) -> Result<(Request, Option<i64>)> {
        let mut conn = self.conn.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let current = Self::get_in(&tx, id)?;
        if current.status != Status::Pending {
            return Err(Error::AlreadyDecided(id.to_string()));
        }
        match decision {
            Decision::Approve {
                max_rows,
                expires_at,
                reusable,
            } => {
                let max_rows = max_rows
                    .map(i64::try_from)
                    .transpose()
                    .map_err(|_| Error::OutOfRange("max_rows is too large".into()))?;
                tx.execute(
                    "UPDATE requests SET status = 'approved', max_rows = ?2, expires_at = ?3, reusable = ?4, decided_by = ?5, decided_at = ?6 WHERE id = ?1",
                    params![id, max_rows, expires_at, reusable as i64, by, now],
                )?
            }
            Decision::Deny { reason } => tx.execute(
                "UPDATE requests SET status = 'denied', deny_reason = ?2, decided_by = ?3, decided_at = ?4 WHERE id = ?1",
                params![id, reason, by, now],
            )?,
        };
        let r = Self::get_in(&tx, id)?;
        let event = crate::audit::Event {
            approval: Some(id.to_string()),
            ..record.clone()
        };
        tx.execute(
            "INSERT INTO audit_outbox (event) VALUES (?1)",
            params![serde_json::to_string(&event).unwrap_or_default()],
        )?;
        let outbox = tx.last_insert_rowid();
        tx.commit()?;
        Ok((r, Some(outbox)))
    }

    async fn consume(&self, id: &str, now: i64) -> Result<bool> {
        let conn = self.conn.lock();
        let n = conn.execute(
            "UPDATE requests SET used = 1 WHERE id = ?1 AND status = 'approved' AND expires_at > ?2 AND (reusable = 1 OR used = 0)",
            params![id, now],
        )?;
        Ok(n == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The store's behaviour is checked by `crate::state::conformance` (run against this
    // store and PostgreSQL); here, only that it survives closing and reopening.
    #[tokio::test]
    async fn requests_and_decisions_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        crate::state::conformance::approvals(&store, "").await;
        drop(store);
        let store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(store.list(false).await.unwrap().len(), 5);
        assert_eq!(store.list(true).await.unwrap().len(), 2);
    }
}
