//! What the templates share: the page frame and how requests and times read.

use std::time::{Duration, UNIX_EPOCH};

use crate::approval::{Request, Status};

/// The frame around every page: who is signed in, which menu they get, the token that
/// the sign-out form (and every other form) carries.
#[derive(Debug, Clone)]
pub struct Layout {
    pub user: Option<String>,
    pub owner: bool,
    pub csrf: String,
    /// The menu entry to highlight.
    pub active: &'static str,
}

/// Seconds since the epoch as `2026-01-31 12:00:00 UTC`.
pub fn when(secs: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replace('T', " ")
        .replace('Z', " UTC")
}

/// One request as the pages list it.
#[derive(Debug, Clone)]
pub struct RequestRow {
    pub id: String,
    pub principal: String,
    pub created: String,
    pub tables: String,
    pub reasons: String,
    pub sql: String,
    /// `pending`, `approved`, `denied`, `expired` or `used`.
    pub state: &'static str,
    /// What was decided, in words (row cap, expiry, reuse; or the owner's reason).
    pub outcome: String,
    pub decided_by: String,
    pub decided: String,
    /// For pending requests: rows approving would release, when counted.
    pub rows: Option<u64>,
}

impl RequestRow {
    pub fn new(r: &Request, now: i64) -> Self {
        let (state, outcome) = match &r.status {
            Status::Pending => ("pending", String::new()),
            Status::Denied { reason } => ("denied", reason.clone()),
            Status::Approved {
                max_rows,
                expires_at,
                reusable,
                used,
            } => {
                let state = if *expires_at <= now {
                    "expired"
                } else if *used && !*reusable {
                    "used"
                } else {
                    "approved"
                };
                let cap =
                    max_rows.map_or("no row cap".to_string(), |n| format!("at most {n} rows"));
                let reuse = if *reusable { "reusable" } else { "single use" };
                (
                    state,
                    format!("{cap}, {reuse}, until {}", when(*expires_at)),
                )
            }
        };
        Self {
            id: r.id.clone(),
            principal: r.key.principal.clone(),
            created: when(r.created_at),
            tables: r.tables.join(", "),
            reasons: r.reasons.clone(),
            sql: r.sql.clone(),
            state,
            outcome,
            decided_by: r.decided_by.clone().unwrap_or_default(),
            decided: r.decided_at.map(when).unwrap_or_default(),
            rows: None,
        }
    }

    /// A one-line preview of long text.
    pub fn short(text: &str, n: usize) -> String {
        let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if line.chars().count() <= n {
            line
        } else {
            line.chars().take(n).collect::<String>() + "…"
        }
    }

    pub fn sql_preview(&self) -> String {
        Self::short(&self.sql, 90)
    }

    pub fn reasons_preview(&self) -> String {
        Self::short(&self.reasons, 120)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_in_utc() {
        assert_eq!(when(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(RequestRow::short("a\n  b", 10), "a b");
        assert_eq!(RequestRow::short("abcdef", 3), "abc…");
    }
}
