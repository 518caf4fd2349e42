//! The audit trail (PRIVACY.md §5): one JSON line per query and per decision, under
//! `<state-dir>/audit/audit.jsonl`, each carrying the hash of the one before it.
//!
//! A record's `hash` is the SHA-256 of the previous record's hash and the record's own
//! JSON without its hash; editing, removing or reordering any record breaks the chain
//! from there on, which [`verify`] reports with the first bad line. Records are
//! appended and synced to disk one at a time, under a lock: the chain has one writer.
//! The SQL text is in the records because the log is for owners and admins only (the
//! file lives in the state directory; nothing serves it to analysts).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
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
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What happened, as the owner reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// `query` or `decision`.
    pub kind: String,
    pub principal: String,
    /// The RPC's request id (as in the server log).
    pub request_id: String,
    /// The approval request, if one is involved.
    pub approval: Option<String>,
    pub sql_fingerprint: Option<String>,
    pub sql: Option<String>,
    /// released, refused, approval_pending, approval_denied, approved, denied, failed.
    pub decision: String,
    pub reason_code: Option<String>,
    pub groups_suppressed: Option<u64>,
    pub rows_released: Option<u64>,
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

#[derive(Serialize)]
struct Unsigned<'a> {
    seq: u64,
    time: &'a str,
    #[serde(flatten)]
    event: &'a Event,
    prev: &'a str,
}

fn hash_of(seq: u64, time: &str, event: &Event, prev: &str) -> String {
    let body = serde_json::to_string(&Unsigned {
        seq,
        time,
        event,
        prev,
    })
    .unwrap_or_default();
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(body.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug)]
struct Tail {
    file: File,
    seq: u64,
    last: String,
}

/// The append-only, hash-chained log.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    tail: Mutex<Tail>,
}

/// The log file of a state directory.
pub fn path_in(state_dir: &Path) -> PathBuf {
    state_dir.join("audit").join("audit.jsonl")
}

impl AuditLog {
    /// Opens the log of a state directory, continuing its chain. A chain that does not
    /// verify refuses to open: appending to it would hide the break.
    pub fn open(state_dir: &Path) -> Result<Self> {
        let path = path_in(state_dir);
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(path.parent().expect("has a parent")).map_err(io)?;
        let (seq, last) = if path.exists() {
            verify(&path)?
        } else {
            (0, GENESIS.to_string())
        };
        let file = OpenOptions::new()
            .create(true)
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
        Ok(Self {
            path: path.clone(),
            tail: Mutex::new(Tail { file, seq, last }),
        })
    }

    /// Appends one record and syncs it to disk.
    pub fn append(&self, event: Event) -> Result<Record> {
        let mut tail = self.tail.lock();
        let seq = tail.seq + 1;
        let time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let hash = hash_of(seq, &time, &event, &tail.last);
        let record = Record {
            seq,
            time,
            event,
            prev: tail.last.clone(),
            hash,
        };
        let line = serde_json::to_string(&record).unwrap_or_default();
        let io = |source| Error::Io {
            path: self.path.clone(),
            source,
        };
        writeln!(tail.file, "{line}").map_err(io)?;
        tail.file.sync_data().map_err(io)?;
        tail.seq = seq;
        tail.last = record.hash.clone();
        Ok(record)
    }

    /// Appends, logging (not failing) when the disk refuses: the query has already been
    /// decided by then.
    pub fn record(&self, event: Event) {
        if let Err(e) = self.append(event) {
            tracing::error!(error = %e, "cannot write the audit log");
        }
    }
}

/// Checks a log file's chain. Returns the last sequence number and hash, or the first
/// bad record.
pub fn verify(path: &Path) -> Result<(u64, String)> {
    let file = File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut prev = GENESIS.to_string();
    let mut seq = 0;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let r: Record = serde_json::from_str(&line).map_err(|e| Error::Broken {
            line: n,
            message: format!("not a record: {e}"),
        })?;
        if r.seq != seq + 1 {
            return Err(Error::Broken {
                line: n,
                message: format!(
                    "sequence {} follows {seq}: a record was removed or reordered",
                    r.seq
                ),
            });
        }
        if r.prev != prev {
            return Err(Error::Broken {
                line: n,
                message: format!("record {} does not follow the record before it", r.seq),
            });
        }
        if hash_of(r.seq, &r.time, &r.event, &r.prev) != r.hash {
            return Err(Error::Broken {
                line: n,
                message: format!("record {} was edited", r.seq),
            });
        }
        seq = r.seq;
        prev = r.hash;
    }
    Ok((seq, prev))
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
        assert_eq!(verify(&path).unwrap().0, 5);
        let good = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = good.lines().collect();

        std::fs::write(
            &path,
            good.replace("\"rows_released\":2", "\"rows_released\":20"),
        )
        .unwrap();
        assert!(
            matches!(verify(&path), Err(Error::Broken { line: 3, .. })),
            "{:?}",
            verify(&path)
        );

        let removed = [lines[0], lines[2], lines[3], lines[4]].join("\n") + "\n";
        std::fs::write(&path, removed).unwrap();
        assert!(matches!(verify(&path), Err(Error::Broken { line: 2, .. })));

        let reordered = [lines[0], lines[2], lines[1], lines[3], lines[4]].join("\n") + "\n";
        std::fs::write(&path, reordered).unwrap();
        assert!(matches!(verify(&path), Err(Error::Broken { line: 2, .. })));
        assert!(
            AuditLog::open(dir.path()).is_err(),
            "a broken chain is not appended to"
        );
    }
}
