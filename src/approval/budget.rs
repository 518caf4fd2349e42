//! The privacy-budget ledger (PRIVACY.md §5b): durable, in the approvals database.
//!
//! A DP query is charged *before* it reads data, in an `IMMEDIATE` transaction: SQLite
//! takes the write lock at `BEGIN`, so two queries of one principal (in this process or
//! another) are serialised and cannot both pass on the same remaining budget. A charge
//! is never refunded. The identity of a query (principal, normalized plan fingerprint,
//! ε, policy version) owns one noise seed, created with its one charge; asking again
//! finds the seed and pays nothing. The first answer released for an identity is kept
//! here before it leaves ([`Ledger::keep_answer`]) and every repeat is served that kept
//! answer, not a recomputation: a query whose result is not a function of its text
//! (`random()`, `now()`, a LIMIT over an unordered union) would otherwise get the same
//! noise over different rows, and two such answers difference the noise away.
//! ε is kept in millionths and δ in 1e-12 units, as integers, so sums are exact.

use std::path::Path;

use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{Error, Result, now};

/// δ is kept in units of 1e-12.
pub const DELTA_UNITS: f64 = 1e12;

/// What a query is: the key of its one charge and its seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryIdentity {
    pub principal: String,
    pub dataset: String,
    pub fingerprint: String,
    pub epsilon_micros: u64,
    pub policy: String,
    /// The data the query answers from ([`crate::catalog::Catalog::data_version`]).
    pub data: String,
}

impl QueryIdentity {
    /// The ledger's key of this identity (a SHA-256 of every part, length-prefixed).
    pub fn key(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for part in [
            self.principal.as_str(),
            self.dataset.as_str(),
            self.fingerprint.as_str(),
            &self.epsilon_micros.to_string(),
            self.policy.as_str(),
            self.data.as_str(),
        ] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        format!("{:x}", h.finalize())
    }
}

/// A budget as the ledger sees it: the policy's total plus any owner grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    pub epsilon_micros: u64,
    pub delta_units: u64,
    pub renew_secs: Option<u64>,
}

/// The outcome of asking to charge a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Charge {
    /// Charged now; the answer's seed, and what is left afterwards.
    Charged { seed: [u8; 32], remaining: Spent },
    /// The identical query was charged before: its seed and, once one was released, its
    /// kept answer (Arrow IPC stream bytes); nothing charged.
    Repeat {
        seed: [u8; 32],
        answer: Option<Vec<u8>>,
    },
    /// Not enough budget: nothing charged; what is left.
    Exhausted { remaining: Spent },
}

/// An amount of budget (spent or left), in ledger units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Spent {
    pub epsilon_micros: u64,
    pub delta_units: u64,
}

impl Spent {
    pub fn epsilon(&self) -> f64 {
        self.epsilon_micros as f64 / 1e6
    }
    pub fn delta(&self) -> f64 {
        self.delta_units as f64 / DELTA_UNITS
    }
}

/// One row of `airlock budget list`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LedgerRow {
    pub principal: String,
    pub dataset: String,
    pub charges: u64,
    pub epsilon_spent: f64,
    pub delta_spent: f64,
    pub epsilon_granted: f64,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS budget_charges (
    identity TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    dataset TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    policy TEXT NOT NULL,
    epsilon_micros INTEGER NOT NULL,
    delta_units INTEGER NOT NULL,
    seed BLOB NOT NULL,
    charged_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS budget_charges_by_holder ON budget_charges (principal, dataset, charged_at);
CREATE TABLE IF NOT EXISTS budget_answers (
    identity TEXT PRIMARY KEY REFERENCES budget_charges (identity),
    answer BLOB NOT NULL,
    kept_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS budget_grants (
    principal TEXT NOT NULL,
    dataset TEXT NOT NULL,
    epsilon_micros INTEGER NOT NULL,
    delta_units INTEGER NOT NULL,
    granted_by TEXT NOT NULL,
    granted_at INTEGER NOT NULL
);
";

/// The privacy-budget ledger's operations, whichever store keeps it: [`Ledger`]
/// (SQLite, the embedded default) or [`crate::state::postgres::PgState`] (shared by
/// every front end). Each implementation serialises charges of one principal so that
/// two queries cannot both pass on the same remaining budget, on any front end.
#[async_trait::async_trait]
pub trait BudgetLedger: Send + Sync + std::fmt::Debug {
    /// Charges `cost` for `query` unless the identical query was charged before, in one
    /// serialised transaction; durable when this returns.
    async fn charge(
        &self,
        query: &QueryIdentity,
        cost: Spent,
        allowance: &Allowance,
    ) -> Result<Charge>;
    /// Keeps the answer about to be released for a charged identity and returns the one
    /// to release (the first kept, when another execution got there before). Durable when
    /// this returns; on error nothing may be released.
    async fn keep_answer(&self, identity: &str, answer: Vec<u8>) -> Result<Vec<u8>>;
    /// What is left of a principal's budget on a dataset.
    async fn remaining(
        &self,
        principal: &str,
        dataset: &str,
        allowance: &Allowance,
    ) -> Result<Spent>;
    /// Adds ε (and δ) to a principal's budget on a dataset (an owner's decision).
    async fn grant(&self, principal: &str, dataset: &str, extra: Spent, by: &str) -> Result<()>;
    /// Every principal and dataset with charges or grants (all time).
    async fn list(&self) -> Result<Vec<LedgerRow>>;
}

#[async_trait::async_trait]
impl BudgetLedger for Ledger {
    async fn charge(
        &self,
        query: &QueryIdentity,
        cost: Spent,
        allowance: &Allowance,
    ) -> Result<Charge> {
        Ledger::charge(self, query, cost, allowance)
    }
    async fn keep_answer(&self, identity: &str, answer: Vec<u8>) -> Result<Vec<u8>> {
        Ledger::keep_answer(self, identity, answer)
    }
    async fn remaining(
        &self,
        principal: &str,
        dataset: &str,
        allowance: &Allowance,
    ) -> Result<Spent> {
        Ledger::remaining(self, principal, dataset, allowance)
    }
    async fn grant(&self, principal: &str, dataset: &str, extra: Spent, by: &str) -> Result<()> {
        Ledger::grant(self, principal, dataset, extra, by)
    }
    async fn list(&self) -> Result<Vec<LedgerRow>> {
        Ledger::list(self)
    }
}

/// Start of the renewal period that `at` falls in (charges before it no longer count).
pub fn period_start(renew_secs: Option<u64>, at: i64) -> i64 {
    match renew_secs {
        Some(p) if p > 0 => at - at.rem_euclid(p as i64),
        _ => i64::MIN,
    }
}

/// What is left of `allowance` plus `granted` after `spent`.
pub fn left(allowance: &Allowance, granted: Spent, spent: Spent) -> Spent {
    Spent {
        epsilon_micros: (allowance.epsilon_micros + granted.epsilon_micros)
            .saturating_sub(spent.epsilon_micros),
        delta_units: (allowance.delta_units + granted.delta_units)
            .saturating_sub(spent.delta_units),
    }
}

/// The SQLite ledger, on its own connection to the approvals database.
#[derive(Debug)]
pub struct Ledger {
    conn: Mutex<Connection>,
}

impl Ledger {
    /// Opens (or creates) the ledger tables in `approvals.sqlite` under `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Store(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        let conn = Connection::open(dir.join("approvals.sqlite"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn spent(
        tx: &rusqlite::Transaction<'_>,
        principal: &str,
        dataset: &str,
        since: i64,
    ) -> rusqlite::Result<Spent> {
        let (e, d): (i64, i64) = tx.query_row(
            "SELECT COALESCE(SUM(epsilon_micros), 0), COALESCE(SUM(delta_units), 0)
             FROM budget_charges WHERE principal = ?1 AND dataset = ?2 AND charged_at >= ?3",
            params![principal, dataset, since],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok(Spent {
            epsilon_micros: e.max(0) as u64,
            delta_units: d.max(0) as u64,
        })
    }

    fn granted(
        tx: &rusqlite::Transaction<'_>,
        principal: &str,
        dataset: &str,
    ) -> rusqlite::Result<Spent> {
        let (e, d): (i64, i64) = tx.query_row(
            "SELECT COALESCE(SUM(epsilon_micros), 0), COALESCE(SUM(delta_units), 0)
             FROM budget_grants WHERE principal = ?1 AND dataset = ?2",
            params![principal, dataset],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok(Spent {
            epsilon_micros: e.max(0) as u64,
            delta_units: d.max(0) as u64,
        })
    }

    /// Charges `cost` for `query` unless the identical query was charged before, in one
    /// serialised transaction; durable (`synchronous = FULL`) when this returns.
    pub fn charge(
        &self,
        query: &QueryIdentity,
        cost: Spent,
        allowance: &Allowance,
    ) -> Result<Charge> {
        let key = query.key();
        let mut conn = self.conn.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let seed: Option<Vec<u8>> = tx
            .query_row(
                "SELECT seed FROM budget_charges WHERE identity = ?1",
                params![key],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(seed) = seed {
            let answer = tx
                .query_row(
                    "SELECT answer FROM budget_answers WHERE identity = ?1",
                    params![key],
                    |r| r.get(0),
                )
                .optional()?;
            tx.commit()?;
            return Ok(Charge::Repeat {
                seed: seed.try_into().unwrap_or([0; 32]),
                answer,
            });
        }
        let at = now();
        let since = period_start(allowance.renew_secs, at);
        let spent = Self::spent(&tx, &query.principal, &query.dataset, since)?;
        let granted = Self::granted(&tx, &query.principal, &query.dataset)?;
        let left = left(allowance, granted, spent);
        if cost.epsilon_micros > left.epsilon_micros || cost.delta_units > left.delta_units {
            tx.commit()?;
            return Ok(Charge::Exhausted { remaining: left });
        }
        let mut seed = [0u8; 32];
        rand::RngCore::fill_bytes(&mut crate::dp::noise::os_rng(), &mut seed);
        tx.execute(
            "INSERT INTO budget_charges (identity, principal, dataset, fingerprint, policy,
                epsilon_micros, delta_units, seed, charged_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                key,
                query.principal,
                query.dataset,
                query.fingerprint,
                query.policy,
                cost.epsilon_micros as i64,
                cost.delta_units as i64,
                seed.to_vec(),
                at
            ],
        )?;
        tx.commit()?;
        Ok(Charge::Charged {
            seed,
            remaining: Spent {
                epsilon_micros: left.epsilon_micros - cost.epsilon_micros,
                delta_units: left.delta_units - cost.delta_units,
            },
        })
    }

    /// Keeps the answer about to be released for a charged identity and returns the one
    /// to release: `answer`, or the answer kept first when another execution of the same
    /// identity got there before (only one answer per identity ever leaves). Durable when
    /// this returns; on error nothing may be released.
    pub fn keep_answer(&self, identity: &str, answer: Vec<u8>) -> Result<Vec<u8>> {
        let mut conn = self.conn.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT OR IGNORE INTO budget_answers (identity, answer, kept_at) VALUES (?1, ?2, ?3)",
            params![identity, answer, now()],
        )?;
        let kept: Vec<u8> = tx.query_row(
            "SELECT answer FROM budget_answers WHERE identity = ?1",
            params![identity],
            |r| r.get(0),
        )?;
        tx.commit()?;
        Ok(kept)
    }

    /// What is left of a principal's budget on a dataset.
    pub fn remaining(
        &self,
        principal: &str,
        dataset: &str,
        allowance: &Allowance,
    ) -> Result<Spent> {
        let mut conn = self.conn.lock();
        let tx = conn.transaction()?;
        let since = period_start(allowance.renew_secs, now());
        let spent = Self::spent(&tx, principal, dataset, since)?;
        let granted = Self::granted(&tx, principal, dataset)?;
        Ok(left(allowance, granted, spent))
    }

    /// Adds ε (and δ) to a principal's budget on a dataset (an owner's decision).
    pub fn grant(&self, principal: &str, dataset: &str, extra: Spent, by: &str) -> Result<()> {
        self.conn.lock().execute(
            "INSERT INTO budget_grants (principal, dataset, epsilon_micros, delta_units, granted_by, granted_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                principal,
                dataset,
                extra.epsilon_micros as i64,
                extra.delta_units as i64,
                by,
                now()
            ],
        )?;
        Ok(())
    }

    /// Every principal and dataset with charges or grants (all time).
    pub fn list(&self) -> Result<Vec<LedgerRow>> {
        let conn = self.conn.lock();
        let mut stmt = conn.prepare(
            "SELECT p, d, SUM(n), SUM(e), SUM(dl), SUM(g) FROM (
                SELECT principal p, dataset d, 1 n, epsilon_micros e, delta_units dl, 0 g FROM budget_charges
                UNION ALL
                SELECT principal, dataset, 0, 0, 0, epsilon_micros FROM budget_grants)
             GROUP BY p, d ORDER BY p, d",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok(LedgerRow {
                    principal: r.get(0)?,
                    dataset: r.get(1)?,
                    charges: r.get::<_, i64>(2)? as u64,
                    epsilon_spent: r.get::<_, i64>(3)? as f64 / 1e6,
                    delta_spent: r.get::<_, i64>(4)? as f64 / DELTA_UNITS,
                    epsilon_granted: r.get::<_, i64>(5)? as f64 / 1e6,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::state::conformance::{TEN, cost};

    fn query(fp: &str, eps: u64) -> QueryIdentity {
        crate::state::conformance::query("analyst", fp, eps)
    }

    // Charges, repeats, exhaustion and grants: `crate::state::conformance::ledger`, run
    // against this ledger and PostgreSQL. Here: durability and OS-thread races.
    #[tokio::test]
    async fn a_new_connection_sees_the_same_ledger() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        crate::state::conformance::ledger(&l, "analyst").await;
        drop(l);
        let l = Ledger::open(dir.path()).unwrap();
        assert_eq!(
            l.remaining("analyst", "hospital", &TEN)
                .unwrap()
                .epsilon_micros,
            0
        );
        assert_eq!(l.list().unwrap()[0].charges, 11);
    }

    /// Many threads, each on its own connection (as separate server processes would
    /// be), racing to spend: exactly the budget is spent, never more.
    #[test]
    fn concurrent_charges_cannot_overspend() {
        let dir = tempfile::tempdir().unwrap();
        Ledger::open(dir.path()).unwrap();
        let charged = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..8 {
                let dir = dir.path();
                let charged = &charged;
                s.spawn(move || {
                    let l = Ledger::open(dir).unwrap();
                    for i in 0..5 {
                        if let Charge::Charged { .. } = l
                            .charge(&query(&format!("t{t}-{i}"), 700_000), cost(700_000), &TEN)
                            .unwrap()
                        {
                            charged.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        // 10 / 0.7 = 14 charges fit; 40 were attempted.
        assert_eq!(charged.into_inner(), 14);
        let l = Ledger::open(dir.path()).unwrap();
        assert_eq!(
            l.remaining("analyst", "hospital", &TEN)
                .unwrap()
                .epsilon_micros,
            200_000
        );
    }

    #[test]
    fn renewal_periods_start_afresh() {
        assert_eq!(period_start(Some(100), 1234), 1200);
        assert_eq!(period_start(None, 1234), i64::MIN);
    }
}
