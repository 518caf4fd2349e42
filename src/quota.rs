//! Per-principal quotas: queries per minute, result streams at once, rows and bytes
//! released per day (`[limits]` and `[limits.users.<name>]` in `conf/airlock.toml`).
//!
//! - **Queries per minute** are counted when a query is planned (GetFlightInfo of SQL or
//!   of a prepared statement, or a DoGet that plans one), over a sliding minute; one
//!   more is refused with `RATE_LIMITED` and the seconds until the oldest leaves the
//!   window.
//! - **Queries at once** are the principal's open result streams; one more is refused
//!   with `RATE_LIMITED` (retry in a second). The slot is given back when the stream
//!   ends, fails or is dropped.
//! - **Rows and bytes per day** (UTC) are counted batch by batch as a result streams
//!   out. Bytes are the Arrow data of the batches (the sliced buffers, about the IPC
//!   body on the wire, without framing). A release that starts at or over either limit
//!   is refused with `QUOTA_EXCEEDED`; a stream whose next batch would cross a limit is
//!   stopped before that batch with `QUOTA_EXCEEDED` (what was sent counts, nothing
//!   over the limit leaves) and its audit record says `..._incomplete` with that code.
//!   The retry hint is the time until midnight UTC.
//!
//! The daily counts survive a restart: at start they are summed from today's release
//! records in the audit trail (`rows_released`, `bytes_released`). A release cut short
//! by a crash has no end record and does not count (see docs/RELIABILITY.md).
//! 0 means no limit, for every quota.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use datafusion::arrow::array::{Array, RecordBatch};
use parking_lot::Mutex;

use crate::config::{Limits, Quota};
use crate::policy::refusal::{ReasonCode, Refusal};

const MINUTE: Duration = Duration::from_secs(60);
const DAY: u64 = 86_400;

/// The quotas of every principal and what each has used.
#[derive(Debug)]
pub struct Quotas {
    limits: Limits,
    usage: DashMap<String, Arc<Mutex<Usage>>>,
}

#[derive(Debug, Default)]
struct Usage {
    /// When the queries of the last minute were started (at most the limit are kept).
    starts: VecDeque<Instant>,
    running: u64,
    /// Days since the epoch (UTC) that `rows` and `bytes` are of.
    day: u64,
    rows: u64,
    bytes: u64,
}

/// Seconds since the epoch, now.
fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The time until the next midnight UTC, at least a second.
pub fn until_midnight_utc() -> Duration {
    let now = now_secs();
    Duration::from_secs((DAY - now % DAY).max(1))
}

impl Usage {
    /// Starts a new day's counts when the day changed.
    fn roll(&mut self) {
        let today = now_secs() / DAY;
        if self.day != today {
            self.day = today;
            self.rows = 0;
            self.bytes = 0;
        }
    }

    fn daily_refusal(&self, quota: &Quota, rows: u64, bytes: u64) -> Option<Refusal> {
        let over =
            |limit: u64, used: u64, more: u64| limit > 0 && used.saturating_add(more) > limit;
        let what = if over(quota.rows_per_day, self.rows, rows) {
            format!(
                "{} of {} rows released today",
                self.rows, quota.rows_per_day
            )
        } else if over(quota.bytes_per_day, self.bytes, bytes) {
            format!(
                "{} of {} bytes released today",
                self.bytes, quota.bytes_per_day
            )
        } else {
            return None;
        };
        let after = until_midnight_utc();
        Some(
            Refusal::new(
                ReasonCode::QuotaExceeded,
                format!(
                    "daily quota: {what}; retry in {} s (midnight UTC)",
                    after.as_secs()
                ),
            )
            .retry_after(after),
        )
    }
}

impl Quotas {
    /// Quotas under `limits`, with today's releases (principal → rows, bytes) already
    /// counted (from the audit trail).
    pub fn new(limits: &Limits, released_today: BTreeMap<String, (u64, u64)>) -> Self {
        let usage = DashMap::new();
        let day = now_secs() / DAY;
        for (principal, (rows, bytes)) in released_today {
            usage.insert(
                principal,
                Arc::new(Mutex::new(Usage {
                    day,
                    rows,
                    bytes,
                    ..Default::default()
                })),
            );
        }
        Self {
            limits: limits.clone(),
            usage,
        }
    }

    fn usage(&self, principal: &str) -> Arc<Mutex<Usage>> {
        if let Some(u) = self.usage.get(principal) {
            return Arc::clone(&u);
        }
        Arc::clone(&self.usage.entry(principal.to_string()).or_default())
    }

    /// Counts a query being planned; `RATE_LIMITED` when the principal already started
    /// `queries_per_minute` within the last minute (the refused one does not count).
    pub fn start_query(&self, principal: &str) -> Result<(), Refusal> {
        let limit = self.limits.quota_for(principal).queries_per_minute;
        if limit == 0 {
            return Ok(());
        }
        let usage = self.usage(principal);
        let mut u = usage.lock();
        let now = Instant::now();
        while u
            .starts
            .front()
            .is_some_and(|t| now.duration_since(*t) >= MINUTE)
        {
            u.starts.pop_front();
        }
        if u.starts.len() as u64 >= limit {
            let oldest = *u.starts.front().expect("limit is at least one");
            let after = (MINUTE - now.duration_since(oldest)).max(Duration::from_millis(1));
            let secs = after.as_secs_f64().ceil() as u64;
            return Err(Refusal::new(
                ReasonCode::RateLimited,
                format!("{limit} queries per minute; retry in {secs} s"),
            )
            .retry_after(Duration::from_secs(secs)));
        }
        u.starts.push_back(now);
        Ok(())
    }

    /// Opens a release (a result stream): `RATE_LIMITED` when the principal has
    /// `concurrent_queries` open already, `QUOTA_EXCEEDED` when today's rows or bytes are
    /// used up. The returned handle counts the stream's batches and gives the slot back
    /// when dropped.
    pub fn open_release(&self, principal: &str) -> Result<Release, Refusal> {
        let quota = self.limits.quota_for(principal);
        let usage = self.usage(principal);
        {
            let mut u = usage.lock();
            u.roll();
            if let Some(r) = u.daily_refusal(&quota, 1, 1) {
                return Err(r);
            }
            if quota.concurrent_queries > 0 && u.running >= quota.concurrent_queries {
                return Err(Refusal::new(
                    ReasonCode::RateLimited,
                    format!(
                        "{} queries at once; retry in 1 s, or when one of yours ends",
                        quota.concurrent_queries
                    ),
                )
                .retry_after(Duration::from_secs(1)));
            }
            u.running += 1;
        }
        Ok(Release { usage, quota })
    }

    /// What the principal has left, for the `MyAccess` action (JSON; `null` where there
    /// is no limit).
    pub fn remaining(&self, principal: &str) -> serde_json::Value {
        let quota = self.limits.quota_for(principal);
        let usage = self.usage(principal);
        let mut u = usage.lock();
        u.roll();
        let now = Instant::now();
        let recent = u
            .starts
            .iter()
            .filter(|t| now.duration_since(**t) < MINUTE)
            .count() as u64;
        let left = |limit: u64, used: u64| (limit > 0).then(|| limit.saturating_sub(used));
        let limit = |limit: u64| (limit > 0).then_some(limit);
        serde_json::json!({
            "queries_per_minute": limit(quota.queries_per_minute),
            "queries_left_this_minute": left(quota.queries_per_minute, recent),
            "concurrent_queries": limit(quota.concurrent_queries),
            "queries_running": u.running,
            "rows_per_day": limit(quota.rows_per_day),
            "rows_released_today": u.rows,
            "rows_left_today": left(quota.rows_per_day, u.rows),
            "bytes_per_day": limit(quota.bytes_per_day),
            "bytes_released_today": u.bytes,
            "bytes_left_today": left(quota.bytes_per_day, u.bytes),
            "resets_in_secs": until_midnight_utc().as_secs(),
        })
    }
}

/// One open result stream of a principal.
#[derive(Debug)]
pub struct Release {
    usage: Arc<Mutex<Usage>>,
    quota: Quota,
}

impl Release {
    /// Counts a batch about to be sent, or refuses it (`QUOTA_EXCEEDED`) when it would
    /// take the day's rows or bytes over their limit; a refused batch counts nothing.
    pub fn admit(&self, batch: &RecordBatch) -> Result<(), Refusal> {
        let rows = batch.num_rows() as u64;
        let bytes = batch_bytes(batch);
        let mut u = self.usage.lock();
        u.roll();
        if let Some(r) = u.daily_refusal(&self.quota, rows, bytes) {
            return Err(r);
        }
        u.rows += rows;
        u.bytes += bytes;
        Ok(())
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        let mut u = self.usage.lock();
        u.running = u.running.saturating_sub(1);
    }
}

/// The bytes of a batch's Arrow data: its columns' sliced buffers.
pub fn batch_bytes(batch: &RecordBatch) -> u64 {
    batch
        .columns()
        .iter()
        .map(|c| {
            c.to_data()
                .get_slice_memory_size()
                .unwrap_or_else(|_| c.get_array_memory_size()) as u64
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::QuotaOverride;
    use datafusion::arrow::array::Int64Array;

    fn batch(rows: i64) -> RecordBatch {
        RecordBatch::try_from_iter([("n", Arc::new(Int64Array::from_iter_values(0..rows)) as _)])
            .unwrap()
    }

    fn limits(quota: Quota) -> Limits {
        let mut l = Limits {
            quota,
            ..Default::default()
        };
        l.user_quotas.insert(
            "boss".into(),
            (
                QuotaOverride {
                    rows_per_day: Some(0),
                    ..Default::default()
                },
                None,
            ),
        );
        l
    }

    #[test]
    fn queries_per_minute_and_at_once() {
        let q = Quotas::new(
            &limits(Quota {
                queries_per_minute: 2,
                concurrent_queries: 1,
                ..Default::default()
            }),
            BTreeMap::new(),
        );
        q.start_query("ann").unwrap();
        q.start_query("ann").unwrap();
        let r = q.start_query("ann").unwrap_err();
        assert_eq!(r.code, ReasonCode::RateLimited);
        assert!(r.retry_after.unwrap() <= MINUTE, "{r:?}");
        q.start_query("bob").unwrap();
        let open = q.open_release("ann").unwrap();
        assert_eq!(
            q.open_release("ann").unwrap_err().code,
            ReasonCode::RateLimited
        );
        drop(open);
        q.open_release("ann").unwrap();
    }

    #[test]
    fn rows_per_day_stop_before_the_crossing_batch_and_survive_a_restart() {
        let quota = Quota {
            rows_per_day: 10,
            ..Default::default()
        };
        let q = Quotas::new(&limits(quota), BTreeMap::from([("ann".into(), (4, 0))]));
        let r = q.open_release("ann").unwrap();
        r.admit(&batch(6)).unwrap();
        let refused = r.admit(&batch(1)).unwrap_err();
        assert_eq!(refused.code, ReasonCode::QuotaExceeded);
        assert!(refused.message.contains("10 of 10 rows"), "{refused}");
        assert!(refused.retry_after.unwrap() <= Duration::from_secs(DAY));
        drop(r);
        assert_eq!(
            q.open_release("ann").unwrap_err().code,
            ReasonCode::QuotaExceeded
        );
        // The override lifts the limit for one principal.
        q.open_release("boss").unwrap().admit(&batch(100)).unwrap();
        assert_eq!(q.remaining("ann")["rows_left_today"], 0);
        assert_eq!(
            q.remaining("boss")["rows_left_today"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn bytes_are_the_arrow_data() {
        assert_eq!(batch_bytes(&batch(10)), 80);
        assert_eq!(batch_bytes(&batch(10).slice(2, 3)), 24);
    }
}
