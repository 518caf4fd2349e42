//! The shared state in PostgreSQL: every front end of a deployment reads and writes the
//! same approval requests, budgets, tokens and audit chain.
//!
//! How it keeps the promises the embedded store keeps:
//!
//! - **One audit chain.** A record's hash covers the one before it, so appends must be
//!   serialised across front ends: each append runs in a transaction that first locks
//!   the chain's head row (`SELECT … FROM audit_head … FOR UPDATE`), computes the record
//!   from it, inserts the record and moves the head. Two front ends appending at once
//!   wait for each other; the chain never forks. The key stays outside the database (a
//!   file on each front end); the head records the key's id so that a front end with
//!   another key refuses to start instead of writing records nobody can verify.
//! - **Decisions never without their record.** An owner's decision and its audit record
//!   are written in one transaction (no outbox needed).
//! - **Budgets cannot be overspent.** A charge takes a transaction-scoped advisory lock
//!   on (principal, dataset), so charges of one principal are serialised across front
//!   ends, exactly as SQLite's `IMMEDIATE` transaction serialises them in one.
//! - **Releases interrupted by a crash are recorded.** A `releasing` record also enters
//!   `audit_open_releases` (same transaction) and its end record removes it. Every front
//!   end heartbeats in `frontends`; any front end marks the open releases of one that
//!   has not been seen for [`STALE_AFTER`] as `release_interrupted`.
//! - **Fail closed.** Every operation has a deadline ([`DEADLINE`]); when PostgreSQL is
//!   down or slow, appends fail, so queries are refused (`AUDIT_UNAVAILABLE`) and
//!   approvals and charges fail, until it answers again (connections are remade on
//!   demand).
//!
//! Connections are encrypted (TLS, the server's certificate verified against
//! `[state] ca_file`) whenever a CA file is given, and must be when PostgreSQL is on
//! another machine; plaintext only to this machine (loopback or a Unix socket), see
//! [`check_url`].

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio_postgres::config::Host;
use tokio_postgres::{Client, NoTls, Row, Transaction};

use super::{Error, SharedGrant, TokenStore};
use crate::approval::budget::{
    Allowance, BudgetLedger, Charge, LedgerRow, QueryIdentity, Spent, left, period_start,
};
use crate::approval::{self, ApprovalStore, Decision, NewRequest, Request, RequestKey, Status};
use crate::audit::{
    self, AuditTrail, Chain, Event, GENESIS, Key, RELEASE_INTERRUPTED, RELEASING, Record,
};

/// Longest any one operation (connecting included) may take before it fails.
pub const DEADLINE: Duration = Duration::from_secs(10);
/// How often a front end says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// A front end not seen for this long is gone: its open releases are interrupted.
pub const STALE_AFTER: Duration = Duration::from_secs(30);
/// Connections one front end holds at most.
const MAX_CONNECTIONS: usize = 8;
/// The advisory lock under which the schema is migrated.
const MIGRATION_LOCK: i64 = 0x6169_726c_6f63_6b01;

/// The schema, one entry per version; a database is brought to the last version at open.
const MIGRATIONS: &[&str] = &["
CREATE TABLE requests (
    id TEXT PRIMARY KEY,
    ord BIGSERIAL NOT NULL,
    principal TEXT NOT NULL,
    roles TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    params TEXT NOT NULL,
    policy TEXT NOT NULL,
    sql TEXT NOT NULL,
    tables TEXT NOT NULL,
    reasons TEXT NOT NULL,
    plan TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'denied')),
    max_rows BIGINT,
    expires_at BIGINT,
    reusable BOOLEAN NOT NULL DEFAULT FALSE,
    used BOOLEAN NOT NULL DEFAULT FALSE,
    deny_reason TEXT,
    decided_by TEXT,
    decided_at BIGINT
);
CREATE INDEX requests_by_key ON requests (principal, fingerprint, params, policy, created_at);
CREATE TABLE budget_charges (
    identity TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    dataset TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    policy TEXT NOT NULL,
    epsilon_micros BIGINT NOT NULL,
    delta_units BIGINT NOT NULL,
    seed BYTEA NOT NULL,
    charged_at BIGINT NOT NULL
);
CREATE INDEX budget_charges_by_holder ON budget_charges (principal, dataset, charged_at);
CREATE TABLE budget_answers (
    identity TEXT PRIMARY KEY REFERENCES budget_charges (identity),
    answer BYTEA NOT NULL,
    kept_at BIGINT NOT NULL
);
CREATE TABLE budget_grants (
    principal TEXT NOT NULL,
    dataset TEXT NOT NULL,
    epsilon_micros BIGINT NOT NULL,
    delta_units BIGINT NOT NULL,
    granted_by TEXT NOT NULL,
    granted_at BIGINT NOT NULL
);
CREATE TABLE audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL,
    key_id TEXT NOT NULL
);
CREATE TABLE audit_records (
    seq BIGINT PRIMARY KEY,
    time TEXT NOT NULL,
    kind TEXT NOT NULL,
    principal TEXT NOT NULL,
    decision TEXT NOT NULL,
    line TEXT NOT NULL
);
CREATE INDEX audit_records_by_time ON audit_records (time);
CREATE TABLE audit_open_releases (
    frontend TEXT NOT NULL,
    request_id TEXT NOT NULL,
    event TEXT NOT NULL,
    PRIMARY KEY (frontend, request_id)
);
CREATE TABLE frontends (
    id TEXT PRIMARY KEY,
    seen_at BIGINT NOT NULL
);
CREATE TABLE tokens (
    hash TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    certificate TEXT,
    expires_at BIGINT NOT NULL
);
"];

const COLUMNS: &str = "id, principal, roles, fingerprint, params, policy, sql, tables, reasons, plan, created_at, status, max_rows, expires_at, reusable, used, deny_reason, decided_by, decided_at";

/// Refuses a URL that is not a PostgreSQL URL, or that names another machine while the
/// connection would not be encrypted (`tls`): it carries SQL text, decisions, budgets
/// and tokens' hashes.
pub fn check_url(url: &str, tls: bool) -> Result<tokio_postgres::Config, Error> {
    let config = tokio_postgres::Config::from_str(url)
        .map_err(|e| Error::Config(format!("state URL: {e}")))?;
    if config.get_hosts().is_empty() {
        return Err(Error::Config(
            "state URL: name the host (e.g. postgres://airlock@127.0.0.1/airlock)".into(),
        ));
    }
    for host in config.get_hosts() {
        let local = match host {
            Host::Unix(_) => true,
            Host::Tcp(name) => {
                name == "localhost"
                    || name
                        .trim_matches(['[', ']'])
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
        };
        if !local && !tls {
            return Err(Error::Config(format!(
                "state URL: PostgreSQL at {host:?} is not on this machine: connections to it must be encrypted; \
                 set the CA that signed its certificate (state.ca_file, --state-ca-file, AIRLOCK_STATE_CA_FILE)"
            )));
        }
    }
    Ok(config)
}

/// A few connections, made on demand and remade after PostgreSQL comes back.
#[derive(Debug)]
struct Pool {
    config: tokio_postgres::Config,
    idle: Mutex<Vec<Client>>,
    permits: tokio::sync::Semaphore,
    runtime: tokio::runtime::Handle,
    /// TLS to PostgreSQL, when a CA is configured.
    tls: Option<Tls>,
}

/// The TLS connector (it has no `Debug` of its own).
struct Tls(tokio_postgres_rustls::MakeRustlsConnect);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls(rustls)")
    }
}

/// TLS to PostgreSQL: the server's certificate must chain to the CA in `ca_file` (and
/// name the URL's host).
fn tls_connector(
    ca_file: &std::path::Path,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, Error> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let named =
        |e: &dyn std::fmt::Display| Error::Config(format!("state CA {}: {e}", ca_file.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).map_err(|e| named(&e))? {
        roots
            .add(cert.map_err(|e| named(&e))?)
            .map_err(|e| named(&e))?;
    }
    if roots.is_empty() {
        return Err(named(&"no certificate in the file"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| named(&e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

struct Conn<'a> {
    client: Option<Client>,
    pool: &'a Pool,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl std::ops::Deref for Conn<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client.as_ref().expect("held until drop")
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.client.as_mut().expect("held until drop")
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.client.take()
            && !c.is_closed()
        {
            self.pool.idle.lock().push(c);
        }
    }
}

impl Pool {
    async fn get(&self) -> Result<Conn<'_>, Error> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Error::Config("the state store is closed".into()))?;
        loop {
            let Some(c) = self.idle.lock().pop() else {
                break;
            };
            if !c.is_closed() {
                return Ok(Conn {
                    client: Some(c),
                    pool: self,
                    _permit: permit,
                });
            }
        }
        let client = match &self.tls {
            Some(tls) => {
                let (client, connection) = self.config.connect(tls.0.clone()).await?;
                self.runtime.spawn(watch(connection));
                client
            }
            None => {
                let (client, connection) = self.config.connect(NoTls).await?;
                self.runtime.spawn(watch(connection));
                client
            }
        };
        Ok(Conn {
            client: Some(client),
            pool: self,
            _permit: permit,
        })
    }
}

/// Drives a connection until it ends.
async fn watch<F: Future<Output = Result<(), tokio_postgres::Error>>>(connection: F) {
    if let Err(e) = connection.await {
        tracing::warn!(error = %Error::from(e), "state: PostgreSQL connection ended");
    }
}

#[derive(Debug)]
struct Inner {
    pool: Pool,
    key: Key,
    /// This process's name in `frontends` and `audit_open_releases`.
    frontend: String,
    /// Whether the last operation reached PostgreSQL.
    healthy: AtomicBool,
    released_at_open: (String, BTreeMap<String, (u64, u64)>),
    /// The last read of the whole chain, by the head's sequence number.
    read: audit::CachedRead<u64>,
    /// Records that could not be written when they were made (ends of releases, while
    /// PostgreSQL did not answer): written by the next heartbeat that reaches it, so that
    /// a release this front end finished is not left open.
    unwritten: Mutex<Vec<Event>>,
    /// The last record this front end wrote (or found at start in its anchor), checked
    /// before every append ([`PgState::check_continuity`]).
    last: Mutex<Option<(u64, String)>>,
    /// Where `last` is kept across restarts (`None`: a reader without a state directory).
    anchor: Option<audit::SharedAnchor>,
    /// Heartbeats in a row that reached PostgreSQL: other front ends' releases are
    /// judged interrupted only after [`SWEEP_AFTER_BEATS`], so that a front end cut off
    /// by an outage of the database is not taken for dead when it comes back.
    beats: std::sync::atomic::AtomicU32,
}

/// Successful heartbeats in a row before a front end judges others stale.
const SWEEP_AFTER_BEATS: u32 = 3;

/// The shared state (see the module documentation).
#[derive(Debug, Clone)]
pub struct PgState {
    inner: Arc<Inner>,
}

/// Runs `$body` with a pooled connection bound to `$c` (a `&mut Client`), under
/// [`DEADLINE`], noting the outcome for [`AuditTrail::writable`].
macro_rules! run {
    ($state:expr, $c:ident, $body:block) => {{
        let state = $state;
        let r = deadline(async {
            let mut conn = state.inner.pool.get().await?;
            let $c: &mut Client = &mut conn;
            $body
        })
        .await;
        state.saw(r)
    }};
}

/// Runs `f` under [`DEADLINE`].
async fn deadline<T>(f: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
    tokio::time::timeout(DEADLINE, f)
        .await
        .map_err(|_| Error::Timeout(DEADLINE))?
}

fn now() -> i64 {
    approval::now()
}

impl PgState {
    fn pool(url: &str, ca_file: Option<&std::path::Path>) -> Result<Pool, Error> {
        let mut config = check_url(url, ca_file.is_some())?;
        config.connect_timeout(DEADLINE);
        config.application_name("airlock");
        let tls = ca_file.map(tls_connector).transpose()?.map(Tls);
        if tls.is_some() {
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
        }
        Ok(Pool {
            config,
            idle: Mutex::new(Vec::new()),
            permits: tokio::sync::Semaphore::new(MAX_CONNECTIONS),
            runtime: tokio::runtime::Handle::current(),
            tls,
        })
    }

    /// Connects to read the chain only (`airlock audit verify` and `tail`): no schema
    /// change, no heartbeat, no recovery. With a front end's `state_dir`, [`Self::verify`]
    /// also checks the chain against that front end's anchor.
    pub fn reader(
        url: &str,
        ca_file: Option<&std::path::Path>,
        key: Key,
        state_dir: Option<&std::path::Path>,
    ) -> Result<Self, Error> {
        let anchor = state_dir
            .filter(|d| audit::SharedAnchor::path_in(d).exists())
            .map(audit::SharedAnchor::open)
            .transpose()
            .map_err(|e| Error::Config(e.to_string()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                pool: Self::pool(url, ca_file)?,
                key,
                frontend: String::new(),
                healthy: AtomicBool::new(true),
                released_at_open: (String::new(), BTreeMap::new()),
                read: Mutex::new(None),
                unwritten: Mutex::new(Vec::new()),
                last: Mutex::new(
                    anchor
                        .as_ref()
                        .map(|a| a.get())
                        .transpose()
                        .map_err(|e| Error::Config(e.to_string()))?
                        .flatten(),
                ),
                anchor,
                beats: Default::default(),
            }),
        })
    }

    /// Connects, brings the schema up to date, checks that the chain is keyed with `key`
    /// and still holds the last record this front end wrote (its anchor, in
    /// `state_dir`), registers this front end and interrupts the releases of front ends
    /// that are gone.
    pub async fn open(
        url: &str,
        ca_file: Option<&std::path::Path>,
        key: Key,
        state_dir: &std::path::Path,
    ) -> Result<Self, Error> {
        let pool = Self::pool(url, ca_file)?;
        let anchor =
            audit::SharedAnchor::open(state_dir).map_err(|e| Error::Config(e.to_string()))?;
        let last = anchor.get().map_err(|e| Error::Config(e.to_string()))?;
        let frontend = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let released = deadline(async {
            let mut c = pool.get().await?;
            migrate(&mut c).await?;
            c.execute(
                "INSERT INTO audit_head (id, seq, hash, key_id) VALUES (1, 0, $1, $2) ON CONFLICT (id) DO NOTHING",
                &[&GENESIS, &key.id()],
            )
            .await?;
            let held: String = c
                .query_one("SELECT key_id FROM audit_head WHERE id = 1", &[])
                .await?
                .get(0);
            if held != key.id() {
                return Err(Error::Config(format!(
                    "the audit chain in PostgreSQL is keyed with key {held}, this front end holds key {}: \
                     give every front end the same audit key file (--audit-key-file)",
                    key.id()
                )));
            }
            // From the keyed lines (an edit of them breaks the chain), not from columns.
            let rows = c
                .query(
                    "SELECT line FROM audit_records WHERE kind = 'query' AND decision <> $1 AND time >= $2",
                    &[&RELEASING, &audit::today()],
                )
                .await?;
            let mut released = BTreeMap::<String, (u64, u64)>::new();
            for r in &rows {
                if let Ok(record) = serde_json::from_str::<Record>(r.get::<_, &str>(0)) {
                    let used = released.entry(record.event.principal).or_default();
                    used.0 += record.event.rows_released.unwrap_or(0);
                    used.1 += record.event.bytes_released.unwrap_or(0);
                }
            }
            Ok(released)
        })
        .await?;
        let state = Self {
            inner: Arc::new(Inner {
                pool,
                key,
                frontend,
                healthy: AtomicBool::new(true),
                released_at_open: (audit::today(), released),
                read: Mutex::new(None),
                unwritten: Mutex::new(Vec::new()),
                last: Mutex::new(last),
                anchor: Some(anchor),
                beats: Default::default(),
            }),
        };
        // The chain must still hold the last record this front end wrote.
        deadline(async {
            let c = state.inner.pool.get().await?;
            let head = c
                .query_one("SELECT seq, hash FROM audit_head WHERE id = 1", &[])
                .await?;
            state
                .check_continuity(&*c, head.get::<_, i64>(0) as u64, head.get(1))
                .await
        })
        .await?;
        state.heartbeat_sweeping(true).await?;
        let weak = Arc::downgrade(&state.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                let state = PgState { inner };
                if let Err(e) = state.heartbeat().await {
                    tracing::warn!(error = %e, "state: heartbeat failed");
                }
            }
        });
        tracing::info!(frontend = %state.inner.frontend, "state: PostgreSQL");
        Ok(state)
    }

    /// Notes an operation's outcome for [`AuditTrail::writable`].
    fn saw<T>(&self, r: Result<T, Error>) -> Result<T, Error> {
        let ok = r.is_ok()
            || matches!(&r, Err(Error::Postgres(e)) if e.as_db_error().is_some() && !e.is_closed());
        if self.inner.healthy.swap(ok, Ordering::Relaxed) != ok {
            if ok {
                tracing::info!("state: PostgreSQL answers again");
            } else if let Err(e) = &r {
                tracing::error!(error = %e, "state: PostgreSQL does not answer; queries are refused until it does");
            }
        }
        r
    }

    /// Says this front end is alive, and interrupts the open releases of front ends that
    /// have not said so for [`STALE_AFTER`].
    async fn heartbeat(&self) -> Result<(), Error> {
        self.heartbeat_sweeping(false).await
    }

    /// [`Self::heartbeat`]; `opening`: sweep at once (a front end starting is the moment
    /// to recover), otherwise only after [`SWEEP_AFTER_BEATS`] good heartbeats in a row.
    async fn heartbeat_sweeping(&self, opening: bool) -> Result<(), Error> {
        let unwritten = std::mem::take(&mut *self.inner.unwritten.lock());
        for (i, event) in unwritten.iter().enumerate() {
            if let Err(e) = self.append_now(event.clone()).await {
                self.inner
                    .unwritten
                    .lock()
                    .extend(unwritten[i..].iter().cloned());
                return Err(e);
            }
        }
        let r = deadline(async {
            let mut c = self.inner.pool.get().await?;
            c.execute(
                "INSERT INTO frontends (id, seen_at) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at",
                &[&self.inner.frontend, &now()],
            )
            .await?;
            let sweep = opening
                || self.inner.beats.load(Ordering::Relaxed) + 1 >= SWEEP_AFTER_BEATS;
            if !sweep {
                return Ok(None);
            }
            let tx = c.transaction().await?;
            let stale = now() - STALE_AFTER.as_secs() as i64;
            tx.query_one("SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE", &[])
                .await?;
            let mut last = None;
            let open = tx
                .query(
                    "SELECT frontend, event FROM audit_open_releases o WHERE NOT EXISTS
                       (SELECT 1 FROM frontends f WHERE f.id = o.frontend AND f.seen_at >= $1)
                     ORDER BY frontend, request_id",
                    &[&stale],
                )
                .await?;
            for row in open {
                let frontend: String = row.get(0);
                let started: Event = serde_json::from_str(row.get::<_, &str>(1))
                    .map_err(|e| Error::Schema(format!("an open release does not parse: {e}")))?;
                tracing::warn!(frontend = %frontend, request_id = %started.request_id, "state: a front end stopped during a release");
                last = Some(self.append_in(
                    &tx,
                    Event {
                        decision: RELEASE_INTERRUPTED.into(),
                        detail: Some(format!(
                            "front end {frontend} stopped before the release ended"
                        )),
                        ..started
                    },
                    &frontend,
                )
                .await?);
            }
            tx.execute("DELETE FROM frontends WHERE seen_at < $1", &[&stale])
                .await?;
            tx.execute("DELETE FROM tokens WHERE expires_at < $1", &[&now()])
                .await?;
            tx.commit().await?;
            Ok(last)
        })
        .await;
        match &r {
            Ok(last) => {
                self.wrote(last.as_ref());
                self.inner.beats.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => self.inner.beats.store(0, Ordering::Relaxed),
        }
        self.saw(r).map(|_| ())
    }

    /// Appends a record inside `tx` (which then holds the chain's head until it ends).
    /// `frontend` is the front end whose release the record starts or ends.
    async fn append_in(
        &self,
        tx: &Transaction<'_>,
        event: Event,
        frontend: &str,
    ) -> Result<Record, Error> {
        let head = tx
            .query_one(
                "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE",
                &[],
            )
            .await?;
        let head_seq = head.get::<_, i64>(0) as u64;
        let prev: String = head.get(1);
        self.check_continuity(tx, head_seq, prev.clone()).await?;
        let seq = head_seq + 1;
        let time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let hash = audit::hash_of(&self.inner.key, seq, &time, &event, &prev);
        let record = Record {
            seq,
            time,
            event,
            prev,
            hash,
        };
        let line = serde_json::to_string(&record).unwrap_or_default();
        let e = &record.event;
        tx.execute(
            "INSERT INTO audit_records (seq, time, kind, principal, decision, line)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &(seq as i64),
                &record.time,
                &e.kind,
                &e.principal,
                &e.decision,
                &line,
            ],
        )
        .await?;
        tx.execute(
            "UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1",
            &[&(seq as i64), &record.hash],
        )
        .await?;
        match (e.kind.as_str(), e.decision.as_str()) {
            ("query", RELEASING) => {
                tx.execute(
                    "INSERT INTO audit_open_releases (frontend, request_id, event) VALUES ($1, $2, $3)
                     ON CONFLICT (frontend, request_id) DO UPDATE SET event = excluded.event",
                    &[
                        &frontend,
                        &e.request_id,
                        &serde_json::to_string(e).unwrap_or_default(),
                    ],
                )
                .await?;
            }
            ("query", _) => {
                tx.execute(
                    "DELETE FROM audit_open_releases WHERE frontend = $1 AND request_id = $2",
                    &[&frontend, &e.request_id],
                )
                .await?;
            }
            _ => {}
        }
        Ok(record)
    }

    /// Checks that the chain still holds the last record this front end wrote, given
    /// the chain's head: not moved back, and the record at that number the same.
    async fn check_continuity(
        &self,
        c: &impl tokio_postgres::GenericClient,
        head_seq: u64,
        head_hash: String,
    ) -> Result<(), Error> {
        let Some((seq, hash)) = self.inner.last.lock().clone() else {
            return Ok(());
        };
        let tampered = |what: String| {
            tracing::error!(%what, "audit chain tampered with; appends are refused");
            Err(Error::Tampered(what))
        };
        if head_seq < seq {
            return tampered(format!(
                "the chain ends at record {head_seq}, but this front end wrote record {seq}: records were removed from its end"
            ));
        }
        let found = if head_seq == seq {
            Some(head_hash)
        } else {
            c.query_opt(
                "SELECT line FROM audit_records WHERE seq = $1",
                &[&(seq as i64)],
            )
            .await?
            .and_then(|r| serde_json::from_str::<Record>(r.get::<_, &str>(0)).ok())
            .map(|r| r.hash)
        };
        if found.as_deref() != Some(hash.as_str()) {
            return tampered(format!(
                "record {seq}, which this front end wrote, was removed or replaced"
            ));
        }
        Ok(())
    }

    /// Notes records just committed: the last becomes this front end's anchor.
    fn wrote(&self, record: Option<&Record>) {
        let Some(r) = record else { return };
        {
            let mut last = self.inner.last.lock();
            if last.as_ref().is_some_and(|(seq, _)| *seq >= r.seq) {
                return;
            }
            *last = Some((r.seq, r.hash.clone()));
        }
        if let Some(anchor) = &self.inner.anchor
            && let Err(e) = anchor.set(r.seq, &r.hash)
        {
            // The record is committed; only the anchor's protection lags.
            tracing::error!(error = %e, "audit: cannot move this front end's anchor");
        }
    }

    async fn append_now(&self, event: Event) -> Result<Record, Error> {
        let r = deadline(async {
            let mut c = self.inner.pool.get().await?;
            let tx = c.transaction().await?;
            let record = self.append_in(&tx, event, &self.inner.frontend).await?;
            tx.commit().await?;
            Ok(record)
        })
        .await;
        if let Ok(record) = &r {
            self.wrote(Some(record));
        }
        self.saw(r)
    }

    /// Every record as JSON lines, and the head (the chain's anchor).
    async fn chain(&self) -> Result<(String, (u64, String)), Error> {
        let r = deadline(async {
            let mut c = self.inner.pool.get().await?;
            // One snapshot: the head and the records agree.
            let tx = c
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let head = tx
                .query_one("SELECT seq, hash FROM audit_head WHERE id = 1", &[])
                .await?;
            let rows = tx
                .query("SELECT line FROM audit_records ORDER BY seq", &[])
                .await?;
            tx.commit().await?;
            let mut text = String::new();
            for r in rows {
                text.push_str(r.get::<_, &str>(0));
                text.push('\n');
            }
            Ok((text, (head.get::<_, i64>(0) as u64, head.get(1))))
        })
        .await;
        self.saw(r)
    }

    /// Checks the whole chain in PostgreSQL with this front end's key: the number of
    /// records and the last hash, or the first bad record (`airlock audit verify`).
    /// With a front end's anchor ([`Self::reader`] given its state directory), the chain
    /// must also hold the last record that front end wrote.
    pub async fn verify(&self) -> Result<(u64, String), audit::Error> {
        let (text, head) = self.chain().await?;
        let verified = audit::verify_text(&text, &self.inner.key, Some(&head))?;
        let anchor = self.inner.last.lock().clone();
        if let Some(anchor) = anchor {
            audit::verify_text(&text, &self.inner.key, Some(&anchor))?;
        }
        Ok(verified)
    }

    /// The record of this front end's anchor, if it has one (what [`Self::verify`] also
    /// checked).
    pub fn anchor(&self) -> Option<u64> {
        self.inner.last.lock().as_ref().map(|(seq, _)| *seq)
    }

    /// The last `n` records, as JSON lines (`airlock audit tail`).
    pub async fn tail(&self, n: usize) -> Result<Vec<String>, Error> {
        let r = deadline(async {
            let c = self.inner.pool.get().await?;
            let rows = c
                .query(
                    "SELECT line FROM (SELECT seq, line FROM audit_records ORDER BY seq DESC LIMIT $1) t ORDER BY seq",
                    &[&(n as i64)],
                )
                .await?;
            Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
        })
        .await;
        self.saw(r)
    }
}

/// Brings the schema to the last version, under a lock (front ends may start together).
async fn migrate(c: &mut Client) -> Result<(), Error> {
    let tx = c.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS airlock_schema (version INTEGER NOT NULL)")
        .await?;
    let version: i32 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM airlock_schema", &[])
        .await?
        .get(0);
    let version = version.max(0) as usize;
    if version > MIGRATIONS.len() {
        return Err(Error::Schema(format!(
            "the state database is at schema version {version}, newer than this airlock knows ({}): upgrade airlock",
            MIGRATIONS.len()
        )));
    }
    for (i, m) in MIGRATIONS.iter().enumerate().skip(version) {
        tx.batch_execute(m).await?;
        tx.execute(
            "INSERT INTO airlock_schema (version) VALUES ($1)",
            &[&(i as i32 + 1)],
        )
        .await?;
        tracing::info!(version = i + 1, "state: schema migrated");
    }
    tx.commit().await?;
    Ok(())
}

fn request(r: &Row) -> Request {
    let json =
        |i: usize| -> Vec<String> { serde_json::from_str(r.get::<_, &str>(i)).unwrap_or_default() };
    let status = match r.get::<_, &str>(11) {
        "approved" => Status::Approved {
            max_rows: r.get::<_, Option<i64>>(12).map(|n| n as u64),
            expires_at: r.get::<_, Option<i64>>(13).unwrap_or(0),
            reusable: r.get(14),
            used: r.get(15),
        },
        "denied" => Status::Denied {
            reason: r.get::<_, Option<String>>(16).unwrap_or_default(),
        },
        _ => Status::Pending,
    };
    Request {
        id: r.get(0),
        key: RequestKey {
            principal: r.get(1),
            fingerprint: r.get(3),
            params: r.get(4),
            policy: r.get(5),
        },
        roles: json(2),
        sql: r.get(6),
        tables: json(7),
        reasons: r.get(8),
        plan: r.get(9),
        created_at: r.get(10),
        status,
        decided_by: r.get(17),
        decided_at: r.get(18),
    }
}

async fn get_request(
    c: &impl tokio_postgres::GenericClient,
    id: &str,
    lock: bool,
) -> Result<Option<Request>, Error> {
    let lock = if lock { " FOR UPDATE" } else { "" };
    Ok(c.query_opt(
        &format!("SELECT {COLUMNS} FROM requests WHERE id = $1{lock}"),
        &[&id],
    )
    .await?
    .as_ref()
    .map(request))
}

/// A transaction-scoped advisory lock on a text key (serialises writers of that key
/// across front ends). The lock's number is the first 8 bytes of the key's SHA-256: two
/// keys sharing one only wait for each other.
async fn lock_key(tx: &Transaction<'_>, key: &str) -> Result<(), Error> {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(key.as_bytes());
    let id = i64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&id])
        .await?;
    Ok(())
}

#[async_trait::async_trait]
impl ApprovalStore for PgState {
    async fn find_or_create(&self, new: NewRequest, now: i64) -> approval::Result<Request> {
        Ok(run!(self, c, {
            let tx = c.transaction().await?;
            let k = &new.key;
            lock_key(
                &tx,
                &format!(
                    "request\0{}\0{}\0{}\0{}",
                    k.principal, k.fingerprint, k.params, k.policy
                ),
            )
            .await?;
            let latest = tx
                    .query_opt(
                        &format!(
                            "SELECT {COLUMNS} FROM requests WHERE principal = $1 AND fingerprint = $2 AND params = $3 AND policy = $4 \
                             ORDER BY created_at DESC, ord DESC LIMIT 1"
                        ),
                        &[&k.principal, &k.fingerprint, &k.params, &k.policy],
                    )
                    .await?
                    .as_ref()
                    .map(request);
            if let Some(r) = latest {
                let keep = match r.status {
                    Status::Pending | Status::Denied { .. } => true,
                    Status::Approved { .. } => r.usable(now),
                };
                if keep {
                    tx.commit().await?;
                    return Ok(r);
                }
            }
            let id = approval::new_id();
            tx.execute(
                    "INSERT INTO requests (id, principal, roles, fingerprint, params, policy, sql, tables, reasons, plan, created_at, status) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'pending')",
                    &[
                        &id,
                        &k.principal,
                        &serde_json::to_string(&new.roles).unwrap_or_default(),
                        &k.fingerprint,
                        &k.params,
                        &k.policy,
                        &new.sql,
                        &serde_json::to_string(&new.tables).unwrap_or_default(),
                        &new.reasons,
                        &new.plan,
                        &now,
                    ],
                )
                .await?;
            let r = get_request(&tx, &id, false).await?;
            tx.commit().await?;
            r.ok_or_else(|| Error::Schema("a request just written is not there".into()))
        })?)
    }

    async fn get(&self, id: &str) -> approval::Result<Request> {
        run!(self, c, { get_request(c, id, false).await })?
            .ok_or_else(|| approval::Error::NotFound(id.to_string()))
    }

    async fn list(&self, pending_only: bool) -> approval::Result<Vec<Request>> {
        let filter = if pending_only {
            "WHERE status = 'pending'"
        } else {
            ""
        };
        Ok(run!(self, c, {
            let rows = c
                .query(
                    &format!(
                        "SELECT {COLUMNS} FROM requests {filter} ORDER BY created_at DESC, ord DESC"
                    ),
                    &[],
                )
                .await?;
            Ok(rows.iter().map(request).collect())
        })?)
    }

    async fn decide(
        &self,
        id: &str,
        decision: Decision,
        by: &str,
        now: i64,
        record: &Event,
    ) -> approval::Result<(Request, Option<i64>)> {
        let max_rows = match &decision {
            Decision::Approve { max_rows, .. } => max_rows
                .map(i64::try_from)
                .transpose()
                .map_err(|_| approval::Error::OutOfRange("max_rows is too large".into()))?,
            Decision::Deny { .. } => None,
        };
        enum Outcome {
            Missing,
            Decided,
            Done(Box<Request>),
        }
        let outcome = run!(self, c, {
            let tx = c.transaction().await?;
            let Some(current) = get_request(&tx, id, true).await? else {
                return Ok(Outcome::Missing);
            };
            if current.status != Status::Pending {
                return Ok(Outcome::Decided);
            }
            match &decision {
                    Decision::Approve {
                        expires_at,
                        reusable,
                        ..
                    } => {
                        tx.execute(
                            "UPDATE requests SET status = 'approved', max_rows = $2, expires_at = $3, reusable = $4, decided_by = $5, decided_at = $6 WHERE id = $1",
                            &[&id, &max_rows, expires_at, reusable, &by, &now],
                        )
                        .await?
                    }
                    Decision::Deny { reason } => {
                        tx.execute(
                            "UPDATE requests SET status = 'denied', deny_reason = $2, decided_by = $3, decided_at = $4 WHERE id = $1",
                            &[&id, reason, &by, &now],
                        )
                        .await?
                    }
                };
            let r = get_request(&tx, id, false).await?;
            let event = Event {
                approval: Some(id.to_string()),
                ..record.clone()
            };
            self.append_in(&tx, event, &self.inner.frontend).await?;
            tx.commit().await?;
            Ok(r.map_or(Outcome::Missing, |r| Outcome::Done(Box::new(r))))
        })?;
        match outcome {
            Outcome::Missing => Err(approval::Error::NotFound(id.to_string())),
            Outcome::Decided => Err(approval::Error::AlreadyDecided(id.to_string())),
            Outcome::Done(r) => Ok((*r, None)),
        }
    }

    async fn consume(&self, id: &str, now: i64) -> approval::Result<bool> {
        let n = run!(self, c, {
            Ok(c.execute(
                    "UPDATE requests SET used = TRUE WHERE id = $1 AND status = 'approved' AND expires_at > $2 AND (reusable OR NOT used)",
                    &[&id, &now],
                )
                .await?)
        })?;
        Ok(n == 1)
    }
}

async fn sums(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Spent, Error> {
    let r = tx.query_one(sql, params).await?;
    Ok(Spent {
        epsilon_micros: r.get::<_, i64>(0).max(0) as u64,
        delta_units: r.get::<_, i64>(1).max(0) as u64,
    })
}

const SPENT: &str =
    "SELECT COALESCE(SUM(epsilon_micros), 0)::BIGINT, COALESCE(SUM(delta_units), 0)::BIGINT
     FROM budget_charges WHERE principal = $1 AND dataset = $2 AND charged_at >= $3";
const GRANTED: &str =
    "SELECT COALESCE(SUM(epsilon_micros), 0)::BIGINT, COALESCE(SUM(delta_units), 0)::BIGINT
     FROM budget_grants WHERE principal = $1 AND dataset = $2";

#[async_trait::async_trait]
impl BudgetLedger for PgState {
    async fn charge(
        &self,
        query: &QueryIdentity,
        cost: Spent,
        allowance: &Allowance,
    ) -> approval::Result<Charge> {
        let key = query.key();
        Ok(run!(self, c, {
            let tx = c.transaction().await?;
            lock_key(
                &tx,
                &format!("budget\0{}\0{}", query.principal, query.dataset),
            )
            .await?;
            if let Some(row) = tx
                    .query_opt(
                        "SELECT c.seed, a.answer FROM budget_charges c LEFT JOIN budget_answers a USING (identity) WHERE c.identity = $1",
                        &[&key],
                    )
                    .await?
                {
                    tx.commit().await?;
                    let seed: Vec<u8> = row.get(0);
                    return Ok(Charge::Repeat {
                        seed: seed.try_into().unwrap_or([0; 32]),
                        answer: row.get(1),
                    });
                }
            let at = now();
            let since = period_start(allowance.renew_secs, at);
            let spent = sums(&tx, SPENT, &[&query.principal, &query.dataset, &since]).await?;
            let granted = sums(&tx, GRANTED, &[&query.principal, &query.dataset]).await?;
            let left = left(allowance, granted, spent);
            if cost.epsilon_micros > left.epsilon_micros || cost.delta_units > left.delta_units {
                tx.commit().await?;
                return Ok(Charge::Exhausted { remaining: left });
            }
            let mut seed = [0u8; 32];
            rand::RngCore::fill_bytes(&mut crate::dp::noise::os_rng(), &mut seed);
            tx.execute(
                "INSERT INTO budget_charges (identity, principal, dataset, fingerprint, policy,
                        epsilon_micros, delta_units, seed, charged_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                &[
                    &key,
                    &query.principal,
                    &query.dataset,
                    &query.fingerprint,
                    &query.policy,
                    &(cost.epsilon_micros as i64),
                    &(cost.delta_units as i64),
                    &seed.as_slice(),
                    &at,
                ],
            )
            .await?;
            tx.commit().await?;
            Ok(Charge::Charged {
                seed,
                remaining: Spent {
                    epsilon_micros: left.epsilon_micros - cost.epsilon_micros,
                    delta_units: left.delta_units - cost.delta_units,
                },
            })
        })?)
    }

    async fn keep_answer(&self, identity: &str, answer: Vec<u8>) -> approval::Result<Vec<u8>> {
        Ok(run!(self, c, {
            c.execute(
                    "INSERT INTO budget_answers (identity, answer, kept_at) VALUES ($1, $2, $3) ON CONFLICT (identity) DO NOTHING",
                    &[&identity, &answer.as_slice(), &now()],
                )
                .await?;
            Ok(c.query_one(
                "SELECT answer FROM budget_answers WHERE identity = $1",
                &[&identity],
            )
            .await?
            .get(0))
        })?)
    }

    async fn remaining(
        &self,
        principal: &str,
        dataset: &str,
        allowance: &Allowance,
    ) -> approval::Result<Spent> {
        Ok(run!(self, c, {
            let tx = c.transaction().await?;
            let since = period_start(allowance.renew_secs, now());
            let spent = sums(&tx, SPENT, &[&principal, &dataset, &since]).await?;
            let granted = sums(&tx, GRANTED, &[&principal, &dataset]).await?;
            tx.commit().await?;
            Ok(left(allowance, granted, spent))
        })?)
    }

    async fn grant(
        &self,
        principal: &str,
        dataset: &str,
        extra: Spent,
        by: &str,
    ) -> approval::Result<()> {
        Ok(run!(self, c, {
            c.execute(
                    "INSERT INTO budget_grants (principal, dataset, epsilon_micros, delta_units, granted_by, granted_at)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                    &[
                        &principal,
                        &dataset,
                        &(extra.epsilon_micros as i64),
                        &(extra.delta_units as i64),
                        &by,
                        &now(),
                    ],
                )
                .await?;
            Ok(())
        })?)
    }

    async fn list(&self) -> approval::Result<Vec<LedgerRow>> {
        Ok(run!(self, c, {
            let rows = c
                    .query(
                        "SELECT p, d, SUM(n)::BIGINT, SUM(e)::BIGINT, SUM(dl)::BIGINT, SUM(g)::BIGINT FROM (
                            SELECT principal p, dataset d, 1 n, epsilon_micros e, delta_units dl, 0::BIGINT g FROM budget_charges
                            UNION ALL
                            SELECT principal, dataset, 0, 0, 0, epsilon_micros FROM budget_grants) t
                         GROUP BY p, d ORDER BY p, d",
                        &[],
                    )
                    .await?;
            Ok(rows
                .iter()
                .map(|r| LedgerRow {
                    principal: r.get(0),
                    dataset: r.get(1),
                    charges: r.get::<_, i64>(2) as u64,
                    epsilon_spent: r.get::<_, i64>(3) as f64 / 1e6,
                    delta_spent: r.get::<_, i64>(4) as f64 / crate::approval::budget::DELTA_UNITS,
                    epsilon_granted: r.get::<_, i64>(5) as f64 / 1e6,
                })
                .collect())
        })?)
    }
}

#[async_trait::async_trait]
impl AuditTrail for PgState {
    async fn append(&self, event: Event) -> audit::Result<Record> {
        Ok(self.append_now(event).await?)
    }

    fn append_blocking(&self, event: Event) -> audit::Result<Record> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        match Handle::try_current() {
            Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
                Ok(tokio::task::block_in_place(|| {
                    h.block_on(self.append_now(event))
                })?)
            }
            _ => Err(audit::Error::Unavailable),
        }
    }

    fn record(&self, event: Event) {
        let this = self.clone();
        self.inner.pool.runtime.spawn(async move {
            if let Err(e) = this.append_now(event.clone()).await {
                tracing::error!(error = %e, "cannot write the audit trail; the record is kept for the next heartbeat");
                this.inner.unwritten.lock().push(event);
            }
        });
    }

    async fn append_from_outbox(&self, _outbox_id: i64, event: Event) -> audit::Result<Record> {
        // Decisions are appended in their own transaction here; nothing is ever put in
        // an outbox. Appending keeps the record rather than dropping it.
        Ok(self.append_now(event).await?)
    }

    fn writable(&self) -> bool {
        self.inner.healthy.load(Ordering::Relaxed)
    }

    fn released_today_at_open(&self) -> BTreeMap<String, (u64, u64)> {
        let (day, released) = &self.inner.released_at_open;
        if *day == audit::today() {
            released.clone()
        } else {
            BTreeMap::new()
        }
    }

    async fn read_all(&self) -> audit::Result<(Arc<Vec<Record>>, Chain)> {
        let (text, head) = self.chain().await?;
        if let Some((seq, records, chain)) = self.inner.read.lock().as_ref()
            && *seq == head.0
        {
            return Ok((Arc::clone(records), chain.clone()));
        }
        let records: Arc<Vec<Record>> = Arc::new(
            text.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect(),
        );
        let chain = Chain::of(&audit::verify_text(&text, &self.inner.key, Some(&head)));
        *self.inner.read.lock() = Some((head.0, Arc::clone(&records), chain.clone()));
        Ok((records, chain))
    }
}

#[async_trait::async_trait]
impl TokenStore for PgState {
    async fn put_token(&self, grant: &SharedGrant) -> Result<(), Error> {
        run!(self, c, {
            c.execute(
                "INSERT INTO tokens (hash, principal, certificate, expires_at) VALUES ($1, $2, $3, $4)",
                &[&grant.hash, &grant.principal, &grant.certificate, &grant.expires_at],
            )
            .await?;
            Ok(())
        })
    }

    async fn get_token(&self, hash: &str, now: i64) -> Result<Option<SharedGrant>, Error> {
        run!(self, c, {
            Ok(c.query_opt(
                "SELECT hash, principal, certificate, expires_at FROM tokens WHERE hash = $1 AND expires_at > $2",
                &[&hash, &now],
            )
            .await?
            .map(|r| SharedGrant {
                hash: r.get(0),
                principal: r.get(1),
                certificate: r.get(2),
                expires_at: r.get(3),
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_urls_on_this_machine_are_accepted() {
        for ok in [
            "postgres://airlock@127.0.0.1:5432/airlock",
            "postgres://airlock@localhost/airlock",
            "postgresql://airlock@[::1]:5433/airlock",
            "host=/var/run/postgresql user=airlock dbname=airlock",
        ] {
            assert!(check_url(ok, false).is_ok(), "{ok}");
        }
        for bad in [
            "postgres://airlock@db.example.com/airlock",
            "postgres://airlock@10.0.0.5/airlock",
            "postgres://airlock@127.0.0.1,10.0.0.5/airlock",
        ] {
            assert!(check_url(bad, false).is_err(), "{bad}");
            assert!(check_url(bad, true).is_ok(), "{bad} over TLS");
        }
        assert!(check_url("mysql://x", true).is_err());
    }
}
