//! Server-side handles behind tickets and prepared statements.
//!
//! A ticket carries only a random 128-bit handle; the planned query it names stays on
//! the server, bound to the principal that planned it. Another principal presenting the
//! handle gets exactly the answer an unknown handle gets. Statement tickets are single
//! use; unused ones and idle prepared statements expire.
//!
//! A prepared statement without parameters also keeps the plan made when it was prepared,
//! for its first execution only and only for [`FIRST_RUN_TTL`]: ADBC and JDBC prepare
//! every query and run it at once, and planning it twice cost as much as a small query.
//! The server runs that plan only while the principal's session (policy version and
//! catalog) is the one it was made in; a later execution plans again, so the time
//! `now()` and its kin stand for is never older than the TTL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use datafusion::common::ScalarValue;
use rand::RngCore;

use crate::auth::Principal;
use crate::error::{Error, Result};
use crate::query::{PlannedQuery, Prepared};

/// How long an unused ticket stays valid.
pub const TICKET_TTL: Duration = Duration::from_secs(600);
/// How long an untouched prepared statement is kept.
pub const PREPARED_TTL: Duration = Duration::from_secs(3600);
/// How long the plan made at preparation may stand in for its first execution's.
pub const FIRST_RUN_TTL: Duration = Duration::from_secs(5);

type Handle = [u8; 16];

#[derive(Debug)]
struct Entry<T> {
    value: T,
    touched: Instant,
}

/// A prepared statement: SQL, its shapes and the parameters bound so far.
#[derive(Debug, Clone)]
pub struct PreparedStatement {
    pub principal: Arc<Principal>,
    pub sql: String,
    pub prepared: Prepared,
    pub params: Option<Vec<ScalarValue>>,
}

#[derive(Debug, Default)]
pub struct Handles {
    queries: DashMap<Handle, Entry<Arc<PlannedQuery>>>,
    prepared: DashMap<Handle, Entry<PreparedStatement>>,
    /// The plan made when a statement was prepared, by its handle (see the module docs).
    first_run: DashMap<Handle, Entry<PlannedQuery>>,
}

fn new_handle() -> Handle {
    let mut h = [0u8; 16];
    rand::rng().fill_bytes(&mut h);
    h
}

fn parse(bytes: &[u8]) -> Result<Handle> {
    bytes.try_into().map_err(|_| unknown())
}

fn unknown() -> Error {
    Error::InvalidRequest("unknown or expired ticket or statement handle".into())
}

impl Handles {
    /// Stores a planned query and returns its ticket handle.
    pub fn put_query(&self, query: PlannedQuery) -> Bytes {
        self.sweep();
        let h = new_handle();
        self.queries.insert(
            h,
            Entry {
                value: Arc::new(query),
                touched: Instant::now(),
            },
        );
        Bytes::copy_from_slice(&h)
    }

    /// Takes the planned query behind a ticket, if it belongs to `principal`.
    pub fn take_query(&self, handle: &[u8], principal: &Principal) -> Result<Arc<PlannedQuery>> {
        let h = parse(handle)?;
        let (_, entry) = self
            .queries
            .remove_if(&h, |_, e| {
                e.value.principal().as_ref() == principal && e.touched.elapsed() < TICKET_TTL
            })
            .ok_or_else(unknown)?;
        Ok(entry.value)
    }

    /// Stores a prepared statement, and the plan its first execution may run.
    pub fn put_prepared(&self, stmt: PreparedStatement, planned: Option<PlannedQuery>) -> Bytes {
        self.sweep();
        let h = new_handle();
        let touched = Instant::now();
        if self.first_run.len() >= 64 {
            self.first_run
                .retain(|_, e| e.touched.elapsed() < FIRST_RUN_TTL);
        }
        if let Some(value) = planned {
            self.first_run.insert(h, Entry { value, touched });
        }
        self.prepared.insert(
            h,
            Entry {
                value: stmt,
                touched,
            },
        );
        Bytes::copy_from_slice(&h)
    }

    /// Takes the plan made when the statement was prepared, if it belongs to `principal`
    /// and is younger than [`FIRST_RUN_TTL`]. Whether it is still the plan the statement
    /// would get (same session) is the caller's to check.
    pub fn take_first_run(&self, handle: &[u8], principal: &Principal) -> Option<PlannedQuery> {
        let h = parse(handle).ok()?;
        self.first_run
            .remove_if(&h, |_, e| {
                e.value.principal().as_ref() == principal && e.touched.elapsed() < FIRST_RUN_TTL
            })
            .map(|(_, e)| e.value)
    }

    /// A copy of the prepared statement behind a handle, if it belongs to `principal`.
    pub fn prepared(&self, handle: &[u8], principal: &Principal) -> Result<PreparedStatement> {
        let h = parse(handle)?;
        let mut e = self.prepared.get_mut(&h).ok_or_else(unknown)?;
        if e.value.principal.as_ref() != principal || e.touched.elapsed() >= PREPARED_TTL {
            return Err(unknown());
        }
        e.touched = Instant::now();
        Ok(e.value.clone())
    }

    /// Binds parameters to a prepared statement.
    pub fn bind(
        &self,
        handle: &[u8],
        principal: &Principal,
        params: Vec<ScalarValue>,
    ) -> Result<()> {
        let h = parse(handle)?;
        let mut e = self.prepared.get_mut(&h).ok_or_else(unknown)?;
        if e.value.principal.as_ref() != principal {
            return Err(unknown());
        }
        e.value.params = Some(params);
        e.touched = Instant::now();
        self.first_run.remove(&h);
        Ok(())
    }

    pub fn close_prepared(&self, handle: &[u8], principal: &Principal) -> Result<()> {
        let h = parse(handle)?;
        self.prepared
            .remove_if(&h, |_, e| e.value.principal.as_ref() == principal)
            .map(|_| {
                self.first_run.remove(&h);
            })
            .ok_or_else(unknown)
    }

    fn sweep(&self) {
        if (self.queries.len() + self.prepared.len()) % 128 == 127 {
            self.queries.retain(|_, e| e.touched.elapsed() < TICKET_TTL);
            self.prepared
                .retain(|_, e| e.touched.elapsed() < PREPARED_TTL);
            self.first_run
                .retain(|_, e| e.touched.elapsed() < FIRST_RUN_TTL);
        }
    }
}
