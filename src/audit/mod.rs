//! The audit trail (PRIVACY.md §5): one JSON line per query and per decision, under
//! `<state-dir>/audit/audit.jsonl`, each carrying a keyed hash of the one before it.
//! [`AuditTrail`] is what the service writes through; [`AuditLog`] is this file, and
//! [`crate::state::postgres::PgState`] keeps the same records, chained the same way, in
//! PostgreSQL for several front ends.
//!
//! What it guarantees, and how:
//!
//! - **Keyed chain.** A record's `hash` is HMAC-SHA256, under a secret kept outside the
//!   log (`<state-dir>/keys/audit.key`, mode 0600), of the previous record's hash and the
//!   record's own JSON without its hash. Editing, removing or reordering any record breaks
//!   the chain from there on, and whoever can write the log but not read the key cannot
//!   recompute it. [`verify`] reports the first bad line.
//! - **Anchored head.** After every append the last sequence number and hash are kept in
//!   the state store (`audit_anchor` in the approvals SQLite database). A log cut short
//!   no longer reaches its anchor: [`verify`] and [`AuditLog::open`] report it.
//! - **Fail closed.** [`AuditLog::append`] returns an error when the record is not on
//!   disk (write or sync failed); a partly written line is cut back at once, so the next
//!   append (when the disk can take it again) continues a clean chain. Callers refuse to
//!   release anything they could not audit (`AUDIT_UNAVAILABLE`).
//! - **Crash recovery.** [`AuditLog::open`] cuts a partial last line (a crash in the
//!   middle of a write) and records the cut; marks every release whose start was
//!   recorded but whose end was not as `release_interrupted`; and appends the decision
//!   records that the approval store committed with its decisions (`audit_outbox`) but
//!   that did not reach the log before the process died.
//!
//! Records are appended and synced one at a time, under a lock: the chain has one writer.
//! The SQL text is in the records because the log is for owners and admins only (the
//! file lives in the state directory; nothing serves it to analysts).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("audit log {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("audit log line {line}: {message}")]
    Broken { line: usize, message: String },
    #[error("audit anchor: {0}")]
    Anchor(#[from] rusqlite::Error),
    #[error("audit key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error(
        "the audit log cannot be written (its last append failed or it does not open for appending)"
    )]
    Unavailable,
    #[error("audit trail in the shared state: {0}")]
    Shared(#[from] crate::state::Error),
}

/// The audit trail's operations, wherever its chain lives: [`AuditLog`] (a file in the
/// state directory, anchored in SQLite: one front end) or
/// [`crate::state::postgres::PgState`] (a table in PostgreSQL, appended under a lock
/// so that every front end of a deployment writes one chain).
#[async_trait::async_trait]
pub trait AuditTrail: Send + Sync + std::fmt::Debug {
    /// Appends one record, durably. On error nothing of it stays and the caller must not
    /// act as if it was audited.
    async fn append(&self, event: Event) -> Result<Record>;
    /// [`AuditTrail::append`] for callers that cannot wait asynchronously (a refusal's
    /// record, written before the refusal is answered). The shared store blocks this
    /// thread (`block_in_place`) and fails closed where it cannot.
    fn append_blocking(&self, event: Event) -> Result<Record>;
    /// Appends, logging (not failing) when the trail refuses: for records of things that
    /// release nothing or have ended (a refusal, a release's end) and must not wait. The
    /// record may land after this returns; a release whose end record never lands is
    /// marked `release_interrupted` by recovery.
    fn record(&self, event: Event);
    /// Appends one outbox record (written by the approval store with its decision) and
    /// removes it from the outbox.
    async fn append_from_outbox(&self, outbox_id: i64, event: Event) -> Result<Record>;
    /// Whether the trail can be written now, as far as this process can tell cheaply.
    fn writable(&self) -> bool;
    /// Rows and bytes released per principal today (UTC), as the trail held them when
    /// it was opened (the daily quotas start from these).
    fn released_today_at_open(&self) -> BTreeMap<String, (u64, u64)>;
    /// Every record and the chain's state (the owner console's activity page).
    async fn read_all(&self) -> Result<(Arc<Vec<Record>>, Chain)>;
}

/// The last read of a whole chain, under the version it was read at (the file's length
/// and time; the head's sequence number).
pub(crate) type CachedRead<V> = Mutex<Option<(V, Arc<Vec<Record>>, Chain)>>;

/// The chain's state, as last verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chain {
    /// No record yet.
    Empty,
    Intact {
        records: u64,
    },
    Broken {
        message: String,
    },
}

impl Chain {
    /// The state a verification's outcome shows.
    pub fn of(verified: &Result<(u64, String)>) -> Self {
        match verified {
            Ok((0, _)) => Chain::Empty,
            Ok((n, _)) => Chain::Intact { records: *n },
            Err(e) => Chain::Broken {
                message: e.to_string(),
            },
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What happened, as the owner reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// `query`, `decision`, `explain`, `upload`, `login` or `recovery`.
    pub kind: String,
    pub principal: String,
    /// The RPC's request id (as in the server log).
    pub request_id: String,
    /// The approval request, if one is involved.
    pub approval: Option<String>,
    pub sql_fingerprint: Option<String>,
    pub sql: Option<String>,
    /// A prepared statement's bound parameter values (`[[type, value], ...]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<String>,
    /// releasing (a release about to start), released, released_approved,
    /// released_incomplete, release_interrupted, refused, approval_pending,
    /// approval_denied, approved, denied, failed, explained, ingested, rate_limited,
    /// partial_line_cut.
    pub decision: String,
    pub reason_code: Option<String>,
    pub groups_suppressed: Option<u64>,
    pub rows_released: Option<u64>,
    /// Bytes of Arrow data released (`quota::batch_bytes`), on the end record of a
    /// release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_released: Option<u64>,
    /// The client's address (logins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Anything else the record needs: the table of an upload, what a recovery cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// A DP query's charge: ε and δ charged (or not, for a repeat) and what is left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy_budget: Option<String>,
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    pub time: String,
    #[serde(flatten)]
    pub event: Event,
    pub prev: String,
    pub hash: String,
}

/// The hash of the first record's predecessor.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The decision of a record written before a release's first batch.
pub const RELEASING: &str = "releasing";
/// The decision recovery gives a release whose end was never recorded.
pub const RELEASE_INTERRUPTED: &str = "release_interrupted";

#[derive(Serialize)]
struct Unsigned<'a> {
    seq: u64,
    time: &'a str,
    #[serde(flatten)]
    event: &'a Event,
    prev: &'a str,
}

/// The secret the chain is keyed with.
#[derive(Clone)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// A name for the key that does not reveal it (an HMAC of a fixed text), so that
    /// front ends sharing one chain can tell they hold the same key.
    pub fn id(&self) -> String {
        self.mac(&[b"airlock audit key id v1"])[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// HMAC-SHA256 (RFC 2104) of `parts`, concatenated.
    fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut ipad = [0x36u8; 64];
        let mut opad = [0x5cu8; 64];
        for (i, b) in self.0.iter().enumerate() {
            ipad[i] ^= b;
            opad[i] ^= b;
        }
        let mut inner = Sha256::new();
        inner.update(ipad);
        for p in parts {
            inner.update(p);
        }
        let mut outer = Sha256::new();
        outer.update(opad);
        outer.update(inner.finalize());
        outer.finalize().into()
    }
}

pub(crate) fn hash_of(key: &Key, seq: u64, time: &str, event: &Event, prev: &str) -> String {
    let body = serde_json::to_string(&Unsigned {
        seq,
        time,
        event,
        prev,
    })
    .unwrap_or_default();
    key.mac(&[prev.as_bytes(), body.as_bytes()])
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The log file of a state directory.
pub fn path_in(state_dir: &Path) -> PathBuf {
    state_dir.join("audit").join("audit.jsonl")
}

/// The chain's key file of a state directory.
pub fn key_path(state_dir: &Path) -> PathBuf {
    state_dir.join("keys").join("audit.key")
}

/// The database holding the anchor (the approvals store's).
pub fn anchor_db(state_dir: &Path) -> PathBuf {
    state_dir.join("approvals").join("approvals.sqlite")
}

/// The tables the audit trail keeps in the state store. The approval store creates them
/// too: it writes decision records into the outbox in the decision's own transaction.
pub const STORE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit_anchor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event TEXT NOT NULL
);
";

/// Reads the key of a state directory, creating it (0600) when `create` and missing.
pub fn load_key(state_dir: &Path, create: bool) -> Result<Key> {
    load_key_at(&key_path(state_dir), create)
}

/// Reads a key file, creating it (0600) when `create` and missing.
pub fn load_key_at(path: &Path, create: bool) -> Result<Key> {
    let path = path.to_path_buf();
    let err = |message: String| Error::Key {
        path: path.clone(),
        message,
    };
    match std::fs::read(&path) {
        Ok(bytes) => {
            let bytes: [u8; 32] = bytes
                .try_into()
                .map_err(|_| err("not a 32-byte key".into()))?;
            Ok(Key(bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            use rand::RngCore;
            let dir = path.parent().expect("has a parent");
            // A directory made here holds only keys: closed to others. One that exists
            // (`--audit-key-file /tmp/audit.key`) is left as it is.
            if !dir.exists() {
                std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
                }
            }
            let mut bytes = [0u8; 32];
            rand::rng().fill_bytes(&mut bytes);
            let tmp = path.with_extension("key.tmp");
            let mut options = OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            let mut f = options.open(&tmp).map_err(|e| err(e.to_string()))?;
            f.write_all(&bytes).map_err(|e| err(e.to_string()))?;
            f.sync_all().map_err(|e| err(e.to_string()))?;
            std::fs::rename(&tmp, &path).map_err(|e| err(e.to_string()))?;
            Ok(Key(bytes))
        }
        Err(e) => Err(err(e.to_string())),
    }
}

fn open_store(state_dir: &Path) -> Result<Connection> {
    open_anchor_db(&anchor_db(state_dir), STORE_SCHEMA)
}

/// Opens (or creates) a SQLite database holding an anchor, with `schema`. A lagging
/// anchor (power loss) is still a record of the log: verification only needs the
/// anchored record to be there, so `synchronous = NORMAL`; process crashes lose nothing
/// in WAL mode.
fn open_anchor_db(path: &Path, schema: &str) -> Result<Connection> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.execute_batch(schema)?;
    Ok(conn)
}

fn read_anchor(conn: &Connection) -> Result<Option<(u64, String)>> {
    Ok(conn
        .query_row("SELECT seq, hash FROM audit_anchor WHERE id = 1", [], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?))
        })
        .optional()?)
}

/// Where a front end keeps the last record it wrote to a chain that lives elsewhere (the
/// PostgreSQL state): `<state-dir>/audit/shared-anchor.sqlite`. Whoever can write the
/// database could cut records off the chain's end and move its head back; they cannot
/// also reach every front end's anchor. A front end checks the chain against its anchor
/// before each append and at start, and `airlock audit verify --state-dir` checks it.
#[derive(Debug)]
pub struct SharedAnchor(Mutex<Connection>);

impl SharedAnchor {
    /// The anchor file of a state directory.
    pub fn path_in(state_dir: &Path) -> PathBuf {
        state_dir.join("audit").join("shared-anchor.sqlite")
    }

    /// Opens (or creates) the anchor of a state directory.
    pub fn open(state_dir: &Path) -> Result<Self> {
        let conn = open_anchor_db(
            &Self::path_in(state_dir),
            "CREATE TABLE IF NOT EXISTS anchor (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, hash TEXT NOT NULL)",
        )?;
        Ok(Self(Mutex::new(conn)))
    }

    /// The last record written (sequence number and hash), if any.
    pub fn get(&self) -> Result<Option<(u64, String)>> {
        Ok(self
            .0
            .lock()
            .query_row("SELECT seq, hash FROM anchor WHERE id = 1", [], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?))
            })
            .optional()?)
    }

    /// Moves the anchor forward to a record just written.
    pub fn set(&self, seq: u64, hash: &str) -> Result<()> {
        self.0.lock().execute(
            "INSERT INTO anchor (id, seq, hash) VALUES (1, ?1, ?2) \
             ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash WHERE excluded.seq > anchor.seq",
            params![seq as i64, hash],
        )?;
        Ok(())
    }
}

#[derive(Debug)]
struct Tail {
    file: File,
    seq: u64,
    last: String,
    /// Bytes of complete records in the file: a failed append is cut back to this.
    len: u64,
}

/// The append-only, keyed, anchored log.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    key: Key,
    tail: Mutex<Tail>,
    store: Mutex<Connection>,
    /// Whether the last append reached the disk.
    healthy: AtomicBool,
    /// What the log held at open: rows and bytes released today, per principal.
    released_at_open: (String, BTreeMap<String, (u64, u64)>),
    /// The last read of the whole file (for [`AuditTrail::read_all`]), with the file's
    /// length and time when it was read.
    read: CachedRead<(u64, Option<std::time::SystemTime>)>,
    state_dir: PathBuf,
    key_file: PathBuf,
}

/// What a walk over the log found.
#[derive(Debug, Default)]
struct Walk {
    seq: u64,
    last: String,
    /// Releases started (request id → their `releasing` event) and not yet ended.
    open_releases: BTreeMap<String, Event>,
    /// Approval requests with a decision record.
    decided: BTreeSet<String>,
    /// Whether the anchored record was seen with its hash.
    anchored: bool,
    /// Rows and bytes released per principal on the UTC day `today` (the end records
    /// of releases), for the daily quotas.
    released_today: BTreeMap<String, (u64, u64)>,
}

/// Today's date (UTC) as the first ten characters of a record's `time`.
pub(crate) fn today() -> String {
    humantime::format_rfc3339(std::time::SystemTime::now()).to_string()[..10].to_string()
}

/// Checks a chain given as JSON lines against its key and, when given, its anchor (the
/// last sequence number and hash recorded beside it). Returns the number of records and
/// the last hash, or the first bad record.
pub fn verify_text(text: &str, key: &Key, anchor: Option<&(u64, String)>) -> Result<(u64, String)> {
    let w = walk(text, key, anchor)?;
    Ok((w.seq, w.last))
}

/// Walks `text` (whole lines), checking the chain. `anchor` is checked when given.
fn walk(text: &str, key: &Key, anchor: Option<&(u64, String)>) -> Result<Walk> {
    let mut w = Walk {
        last: GENESIS.to_string(),
        anchored: anchor.is_none_or(|(seq, _)| *seq == 0),
        ..Default::default()
    };
    let today = today();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let r: Record = serde_json::from_str(line).map_err(|e| Error::Broken {
            line: n,
            message: format!("not a record: {e}"),
        })?;
        if r.seq != w.seq + 1 {
            return Err(Error::Broken {
                line: n,
                message: format!(
                    "sequence {} follows {}: a record was removed or reordered",
                    r.seq, w.seq
                ),
            });
        }
        if r.prev != w.last {
            return Err(Error::Broken {
                line: n,
                message: format!("record {} does not follow the record before it", r.seq),
            });
        }
        if hash_of(key, r.seq, &r.time, &r.event, &r.prev) != r.hash {
            return Err(Error::Broken {
                line: n,
                message: format!(
                    "record {} was edited (or is not keyed with this key)",
                    r.seq
                ),
            });
        }
        if let Some((seq, hash)) = anchor
            && *seq == r.seq
        {
            if *hash != r.hash {
                return Err(Error::Broken {
                    line: n,
                    message: format!("record {} is not the record the anchor names", r.seq),
                });
            }
            w.anchored = true;
        }
        match (r.event.kind.as_str(), r.event.decision.as_str()) {
            ("query", RELEASING) => {
                w.open_releases
                    .insert(r.event.request_id.clone(), r.event.clone());
            }
            ("query", _) => {
                w.open_releases.remove(&r.event.request_id);
                if r.time.starts_with(&today)
                    && (r.event.rows_released.is_some() || r.event.bytes_released.is_some())
                {
                    let used = w
                        .released_today
                        .entry(r.event.principal.clone())
                        .or_default();
                    used.0 += r.event.rows_released.unwrap_or(0);
                    used.1 += r.event.bytes_released.unwrap_or(0);
                }
            }
            ("decision", _) => {
                if let Some(a) = &r.event.approval {
                    w.decided.insert(a.clone());
                }
            }
            _ => {}
        }
        w.seq = r.seq;
        w.last = r.hash;
    }
    if !w.anchored {
        let (seq, _) = anchor.expect("unanchored only with an anchor");
        return Err(Error::Broken {
            line: text.lines().count(),
            message: format!(
                "the log ends at record {} but its anchor names record {seq}: records were removed from the end",
                w.seq
            ),
        });
    }
    Ok(w)
}

/// Splits a log's bytes into whole records and a partial last line (a write the process
/// did not finish), if any.
fn split_partial(bytes: &[u8]) -> (usize, Option<usize>) {
    let complete = match bytes.iter().rposition(|b| *b == b'\n') {
        Some(i) => i + 1,
        None => 0,
    };
    if complete < bytes.len() {
        return (complete, Some(bytes.len() - complete));
    }
    // A last line that is whole but not a record is a partial write too (e.g. a write
    // cut short and a newline after it); one that is a record is left to the chain check.
    let body = &bytes[..complete];
    let start = body[..complete.saturating_sub(1)]
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    let last = &body[start..complete];
    let parses = std::str::from_utf8(last)
        .ok()
        .and_then(|l| serde_json::from_str::<Record>(l.trim_end()).ok())
        .is_some();
    if complete > 0 && !parses {
        (start, Some(complete - start))
    } else {
        (complete, None)
    }
}

impl AuditLog {
    /// Opens the log of a state directory, recovering from a crash (see the module
    /// documentation) and continuing its chain. A chain that does not verify, or that
    /// does not reach its anchor, refuses to open: appending to it would hide the break.
    pub fn open(state_dir: &Path) -> Result<Self> {
        Self::open_with_key(state_dir, &key_path(state_dir))
    }

    /// [`AuditLog::open`] with the chain's key in `key_file` (created when missing).
    pub fn open_with_key(state_dir: &Path, key_file: &Path) -> Result<Self> {
        let path = path_in(state_dir);
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(path.parent().expect("has a parent")).map_err(io)?;
        let key = load_key_at(key_file, true)?;
        let store = open_store(state_dir)?;
        let anchor = read_anchor(&store)?;

        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        // One writer per chain: a second server on the same state directory would
        // interleave records and break it.
        file.try_lock().map_err(|_| Error::Io {
            path: path.clone(),
            source: std::io::Error::other(
                "the audit log is in use by another server on the same state directory",
            ),
        })?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        let (keep, cut) = split_partial(&bytes);
        let text = std::str::from_utf8(&bytes[..keep]).map_err(|_| Error::Broken {
            line: 0,
            message: "the log is not UTF-8".into(),
        })?;
        let w = walk(text, &key, anchor.as_ref())?;
        let cut_line = text.lines().count() + 1;
        if cut.is_some() {
            file.set_len(keep as u64).map_err(io)?;
            file.sync_data().map_err(io)?;
        }
        let log = Self {
            path: path.clone(),
            key,
            tail: Mutex::new(Tail {
                file,
                seq: w.seq,
                last: w.last.clone(),
                len: keep as u64,
            }),
            store: Mutex::new(store),
            healthy: AtomicBool::new(true),
            released_at_open: (today(), w.released_today.clone()),
            read: Mutex::new(None),
            state_dir: state_dir.to_path_buf(),
            key_file: key_file.to_path_buf(),
        };
        if let Some(n) = cut {
            tracing::warn!(
                bytes = n,
                line = cut_line,
                "audit log: cut a partial last line"
            );
            log.append(Event {
                kind: "recovery".into(),
                decision: "partial_line_cut".into(),
                detail: Some(format!(
                    "cut {n} bytes of a partial record at line {cut_line}"
                )),
                ..Default::default()
            })?;
        }
        for (_, started) in w.open_releases {
            log.append(Event {
                decision: RELEASE_INTERRUPTED.into(),
                detail: Some("the server stopped before the release ended".into()),
                ..started
            })?;
        }
        log.drain_outbox(&w.decided)?;
        Ok(log)
    }

    /// Appends the decision records the approval store committed and the log does not
    /// hold yet, then clears them from the outbox.
    fn drain_outbox(&self, decided: &BTreeSet<String>) -> Result<()> {
        let rows: Vec<(i64, String)> = {
            let store = self.store.lock();
            let mut stmt = store.prepare("SELECT id, event FROM audit_outbox ORDER BY id")?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?
        };
        for (id, text) in rows {
            if let Ok(event) = serde_json::from_str::<Event>(&text) {
                let logged = event.approval.as_ref().is_some_and(|a| decided.contains(a));
                if !logged {
                    self.append(event)?;
                }
            }
            self.store
                .lock()
                .execute("DELETE FROM audit_outbox WHERE id = ?1", params![id])?;
        }
        Ok(())
    }

    /// Appends one outbox record (written by the approval store with its decision) and
    /// removes it from the outbox.
    pub fn append_from_outbox(&self, outbox_id: i64, event: Event) -> Result<Record> {
        let record = self.append(event)?;
        if let Err(e) = self
            .store
            .lock()
            .execute("DELETE FROM audit_outbox WHERE id = ?1", params![outbox_id])
        {
            // The record is in the log; recovery skips decisions it already holds.
            tracing::warn!(error = %e, "audit outbox: cannot clear a written record");
        }
        Ok(record)
    }

    /// Rows and bytes released per principal today (UTC), as the log held them when it
    /// was opened (end records of releases; the daily quotas start from these).
    pub fn released_today_at_open(&self) -> BTreeMap<String, (u64, u64)> {
        let (day, released) = &self.released_at_open;
        if *day == today() {
            released.clone()
        } else {
            BTreeMap::new()
        }
    }

    /// Appends one record and syncs it to disk. On error nothing of the record stays in
    /// the file and the caller must not act as if it was audited.
    pub fn append(&self, event: Event) -> Result<Record> {
        let mut tail = self.tail.lock();
        let seq = tail.seq + 1;
        let time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let hash = hash_of(&self.key, seq, &time, &event, &tail.last);
        let record = Record {
            seq,
            time,
            event,
            prev: tail.last.clone(),
            hash,
        };
        let mut line = serde_json::to_string(&record).unwrap_or_default();
        line.push('\n');
        let io = |source| Error::Io {
            path: self.path.clone(),
            source,
        };
        let written = tail
            .file
            .write_all(line.as_bytes())
            .and_then(|_| tail.file.sync_data());
        if let Err(e) = written {
            // Cut back whatever part of the line reached the file, so that the next
            // append continues a clean chain.
            let len = tail.len;
            let grew = tail.file.metadata().map_or(true, |m| m.len() != len);
            if grew && let Err(cut) = tail.file.set_len(len).and_then(|_| tail.file.sync_data()) {
                tracing::error!(error = %cut, "audit log: cannot cut back a failed append");
            }
            if self.healthy.swap(false, Ordering::Relaxed) {
                tracing::error!(error = %e, "audit log: cannot write; releases are refused until it can");
            }
            return Err(io(e));
        }
        tail.seq = seq;
        tail.last = record.hash.clone();
        tail.len += line.len() as u64;
        if !self.healthy.swap(true, Ordering::Relaxed) {
            tracing::info!("audit log: writable again");
        }
        if let Err(e) = self.store.lock().execute(
            "INSERT INTO audit_anchor (id, seq, hash) VALUES (1, ?1, ?2) \
             ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
            params![seq as i64, record.hash],
        ) {
            // The record is on disk; only truncation detection lags until the next append.
            tracing::error!(error = %e, "audit log: cannot update the anchor");
        }
        Ok(record)
    }

    /// Appends, logging (not failing) when the disk refuses: for records of things that
    /// release nothing (a refusal, a failed call) and must be answered anyway.
    pub fn record(&self, event: Event) {
        if let Err(e) = self.append(event) {
            tracing::error!(error = %e, "cannot write the audit log");
        }
    }

    /// Whether the trail can be written now: the last append reached the disk and the
    /// file opens for appending (an immutable or read-only file does not).
    pub fn writable(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
            && OpenOptions::new().append(true).open(&self.path).is_ok()
    }
}

#[async_trait::async_trait]
impl AuditTrail for AuditLog {
    async fn append(&self, event: Event) -> Result<Record> {
        AuditLog::append(self, event)
    }
    fn append_blocking(&self, event: Event) -> Result<Record> {
        AuditLog::append(self, event)
    }
    fn record(&self, event: Event) {
        AuditLog::record(self, event)
    }
    async fn append_from_outbox(&self, outbox_id: i64, event: Event) -> Result<Record> {
        AuditLog::append_from_outbox(self, outbox_id, event)
    }
    fn writable(&self) -> bool {
        AuditLog::writable(self)
    }
    fn released_today_at_open(&self) -> BTreeMap<String, (u64, u64)> {
        AuditLog::released_today_at_open(self)
    }
    /// Read again only when the file changed.
    async fn read_all(&self) -> Result<(Arc<Vec<Record>>, Chain)> {
        let meta = std::fs::metadata(&self.path).ok();
        let (len, modified) = match &meta {
            Some(m) => (m.len(), m.modified().ok()),
            None => return Ok((Arc::new(Vec::new()), Chain::Empty)),
        };
        if let Some(((l, m), records, chain)) = self.read.lock().as_ref()
            && *l == len
            && *m == modified
        {
            return Ok((Arc::clone(records), chain.clone()));
        }
        let (path, state_dir, key_file) = (
            self.path.clone(),
            self.state_dir.clone(),
            self.key_file.clone(),
        );
        let (records, chain) = tokio::task::spawn_blocking(move || {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let records: Vec<Record> = text
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            (
                Arc::new(records),
                Chain::of(&verify_with_key(&state_dir, &key_file)),
            )
        })
        .await
        .map_err(|e| Error::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        *self.read.lock() = Some(((len, modified), Arc::clone(&records), chain.clone()));
        Ok((records, chain))
    }
}

/// Whether a directory takes a small synced write.
pub fn probe_dir(dir: &Path) -> bool {
    let probe = dir.join(".probe");
    let ok = File::create(&probe)
        .and_then(|mut f| {
            f.write_all(&[0u8; 4096])?;
            f.sync_data()
        })
        .is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

/// Checks the log of a state directory: its keyed chain and that it reaches its anchor.
/// Returns the number of records and the last hash, or the first bad record.
pub fn verify(state_dir: &Path) -> Result<(u64, String)> {
    verify_with_key(state_dir, &key_path(state_dir))
}

/// [`verify`] with the chain's key in `key_file`.
pub fn verify_with_key(state_dir: &Path, key_file: &Path) -> Result<(u64, String)> {
    let path = path_in(state_dir);
    let key = load_key_at(key_file, false)?;
    let db = anchor_db(state_dir);
    let anchor = if db.exists() {
        let conn = Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let has_table: bool = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'audit_anchor'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n > 0)?;
        if has_table { read_anchor(&conn)? } else { None }
    } else {
        None
    };
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    let w = walk(&text, &key, anchor.as_ref())?;
    Ok((w.seq, w.last))
}

/// The last `n` records of a log.
pub fn tail(path: &Path, n: usize) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    Ok(lines[lines.len().saturating_sub(n)..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: u64) -> Event {
        Event {
            kind: "query".into(),
            principal: "ann".into(),
            request_id: format!("r{i}"),
            decision: "released".into(),
            rows_released: Some(i),
            ..Default::default()
        }
    }

    #[test]
    fn one_writer_per_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        let first = AuditLog::open(dir.path()).unwrap();
        assert!(AuditLog::open(dir.path()).is_err());
        drop(first);
        assert!(AuditLog::open(dir.path()).is_ok());
    }

    #[test]
    fn hmac_matches_rfc_4231_case_2_shape() {
        // Key shorter than the block: RFC 4231 test case 2 uses "Jefe", here padded to 32
        // bytes with zeros, which HMAC treats the same as the 4-byte key.
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(b"Jefe");
        let mac = Key(k).mac(&[b"what do ya want ", b"for nothing?"]);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn chain_verifies_and_catches_edits_removals_and_reordering() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path()).unwrap();
        for i in 0..4 {
            log.append(event(i)).unwrap();
        }
        drop(log);
        // Reopening continues the chain.
        AuditLog::open(dir.path())
            .unwrap()
            .append(event(9))
            .unwrap();
        let path = path_in(dir.path());
        assert_eq!(verify(dir.path()).unwrap().0, 5);
        let good = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = good.lines().collect();

        std::fs::write(
            &path,
            good.replace("\"rows_released\":2", "\"rows_released\":20"),
        )
        .unwrap();
        assert!(
            matches!(verify(dir.path()), Err(Error::Broken { line: 3, .. })),
            "{:?}",
            verify(dir.path())
        );

        let removed = [lines[0], lines[2], lines[3], lines[4]].join("\n") + "\n";
        std::fs::write(&path, removed).unwrap();
        assert!(matches!(
            verify(dir.path()),
            Err(Error::Broken { line: 2, .. })
        ));

        let reordered = [lines[0], lines[2], lines[1], lines[3], lines[4]].join("\n") + "\n";
        std::fs::write(&path, reordered).unwrap();
        assert!(matches!(
            verify(dir.path()),
            Err(Error::Broken { line: 2, .. })
        ));
        assert!(
            AuditLog::open(dir.path()).is_err(),
            "a broken chain is not appended to"
        );

        // Cutting records off the end keeps a valid chain, but not its anchor.
        let truncated = [lines[0], lines[1], lines[2]].join("\n") + "\n";
        std::fs::write(&path, truncated).unwrap();
        let err = verify(dir.path()).unwrap_err().to_string();
        assert!(err.contains("removed from the end"), "{err}");
        assert!(AuditLog::open(dir.path()).is_err());
    }

    /// Hostile round 11: `--audit-key-file /tmp/audit.key` closed `/tmp` (mode 0700). A
    /// directory made for the key is closed; one that exists is left as it is.
    #[cfg(unix)]
    #[test]
    fn a_new_key_closes_only_a_directory_made_for_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        load_key_at(&dir.path().join("audit.key"), true).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(dir.path()), 0o755);
        let made = dir.path().join("keys");
        load_key_at(&made.join("audit.key"), true).unwrap();
        assert_eq!(mode(&made), 0o700);
        assert_eq!(mode(&made.join("audit.key")), 0o600);
    }

    #[test]
    fn a_partial_last_line_is_cut_and_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path()).unwrap();
        for i in 0..3 {
            log.append(event(i)).unwrap();
        }
        drop(log);
        let path = path_in(dir.path());
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":4,\"time\":\"20").unwrap();
        drop(f);
        let log = AuditLog::open(dir.path()).unwrap();
        log.append(event(5)).unwrap();
        drop(log);
        let (n, _) = verify(dir.path()).unwrap();
        assert_eq!(n, 5, "three records, the cut, one more");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("partial_line_cut"), "{text}");
    }

    #[test]
    fn a_started_release_without_an_end_is_marked_interrupted() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path()).unwrap();
        log.append(Event {
            decision: RELEASING.into(),
            ..event(1)
        })
        .unwrap();
        log.append(Event {
            decision: RELEASING.into(),
            ..event(2)
        })
        .unwrap();
        log.append(event(2)).unwrap();
        drop(log);
        drop(AuditLog::open(dir.path()).unwrap());
        let text = std::fs::read_to_string(path_in(dir.path())).unwrap();
        let interrupted: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(RELEASE_INTERRUPTED))
            .collect();
        assert_eq!(interrupted.len(), 1, "{text}");
        assert!(interrupted[0].contains("\"request_id\":\"r1\""));
        // Reopening again adds nothing.
        drop(AuditLog::open(dir.path()).unwrap());
        assert_eq!(verify(dir.path()).unwrap().0, 4);
    }
}
