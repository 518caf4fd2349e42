//! The audit trail as the owner reads it: records touching their tables, filterable by
//! principal, table and decision, the hash chain's verification status, and a chart of
//! queries per hour by decision.
//!
//! Which tables a record touches: the approval request's tables when it names one, else
//! the tables its SQL names (parsed with the same statement gate as queries; no
//! catalog). A record whose tables cannot be told is shown to service admins only. The
//! file is read and verified again only when it changed (length or modification time).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use askama::Template;
use axum::extract::{Query, State};
use axum::response::Html;
use serde::Deserialize;

use super::chart::{self, Chart};
use super::error::{Error, Result};
use super::session::Owner;
use super::views::Layout;
use super::{Console, Scope};
use crate::audit::Record;
use crate::config::TableName;

/// How many records the page lists (the newest that match).
pub const SHOWN: usize = 200;

/// Decisions a record may carry, in the order the filter offers them.
pub const DECISIONS: [&str; 7] = [
    "released",
    "refused",
    "approval_pending",
    "approval_denied",
    "failed",
    "approved",
    "denied",
];

pub use crate::audit::Chain;

impl Console {
    /// The tables an audit record touches (`requests`: each approval request's tables);
    /// empty when they cannot be told.
    pub(super) fn record_tables(
        &self,
        record: &Record,
        requests: &HashMap<String, Vec<String>>,
    ) -> Vec<TableName> {
        let e = &record.event;
        if let Some(tables) = e.approval.as_ref().and_then(|id| requests.get(id)) {
            return tables
                .iter()
                .filter_map(|t| TableName::parse(t).ok())
                .collect();
        }
        match &e.sql {
            Some(sql) => self.sql_tables(sql),
            None => Vec::new(),
        }
    }

    /// The catalog tables a statement names (CTE names aside).
    fn sql_tables(&self, sql: &str) -> Vec<TableName> {
        if let Some(t) = self.sql_tables.lock().get(sql) {
            return t.clone();
        }
        let limit = self
            .parser
            .config_options()
            .sql_parser
            .recursion_limit
            .get();
        let tables = match crate::query::parse::parse(sql, limit) {
            Ok(
                crate::query::parse::Checked::Query(s) | crate::query::parse::Checked::Explain(s),
            ) => self
                .parser
                .resolve_table_references(&s)
                .map(|refs| {
                    refs.iter()
                        .filter_map(crate::rewrite::table_name)
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect()
                })
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let mut cache = self.sql_tables.lock();
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(sql.to_string(), tables.clone());
        tables
    }
}

/// The page's filters (query string); empty means any.
#[derive(Debug, Default, Deserialize)]
pub struct Filter {
    #[serde(default)]
    pub principal: String,
    #[serde(default)]
    pub table: String,
    #[serde(default)]
    pub decision: String,
}

/// One record as the page lists it.
#[derive(Debug, Clone)]
pub struct Row {
    pub seq: u64,
    pub time: String,
    pub kind: String,
    pub principal: String,
    pub decision: String,
    pub reason_code: String,
    pub tables: String,
    pub approval: String,
    pub rows_released: String,
    pub groups_suppressed: String,
    pub sql: String,
}

#[derive(Template)]
#[template(path = "activity.html")]
struct ActivityPage {
    layout: Layout,
    filter: Filter,
    principals: Vec<String>,
    tables: Vec<String>,
    decisions: Vec<&'static str>,
    chain: Chain,
    rows: Vec<Row>,
    matching: usize,
    chart: Chart,
}

/// The records `scope` may see, each with its tables.
pub async fn visible<'a>(
    console: &Console,
    scope: &Scope,
    records: &'a [Record],
) -> Result<Vec<(&'a Record, Vec<TableName>)>> {
    let requests: HashMap<String, Vec<String>> = console
        .airlock
        .approvals
        .list(false)
        .await
        .map_err(|e| Error::Internal(format!("reading approval requests: {e}")))?
        .into_iter()
        .map(|r| (r.id, r.tables))
        .collect();
    Ok(records
        .iter()
        .map(|r| (r, console.record_tables(r, &requests)))
        .filter(|(_, t)| scope.covers(t))
        .collect())
}

/// GET `/activity?principal=&table=&decision=`.
pub async fn page(
    State(console): State<Arc<Console>>,
    Owner(who): Owner,
    Query(filter): Query<Filter>,
) -> Result<Html<String>> {
    let scope = console.scope(&who.principal);
    let (records, chain) = console
        .airlock
        .audit
        .read_all()
        .await
        .map_err(|e| Error::Internal(format!("reading the audit trail: {e}")))?;
    let seen = visible(&console, &scope, &records).await?;
    let principals: BTreeSet<String> = seen
        .iter()
        .map(|(r, _)| r.event.principal.clone())
        .collect();
    let table = TableName::parse(&filter.table).ok();
    // Principal and table narrow the chart too; the chart splits by decision itself.
    let narrowed: Vec<&(&Record, Vec<TableName>)> = seen
        .iter()
        .filter(|(r, _)| filter.principal.is_empty() || r.event.principal == filter.principal)
        .filter(|(_, t)| table.as_ref().is_none_or(|x| t.contains(x)))
        .collect();
    let chart = chart::hourly(
        narrowed
            .iter()
            .filter(|(r, _)| r.event.kind == "query")
            .map(|(r, _)| (r.time.as_str(), r.event.decision.as_str())),
        SystemTime::now(),
    );
    let matched: Vec<&&(&Record, Vec<TableName>)> = narrowed
        .iter()
        .filter(|(r, _)| filter.decision.is_empty() || r.event.decision == filter.decision)
        .collect();
    let rows = matched
        .iter()
        .rev()
        .take(SHOWN)
        .map(|(r, t)| {
            let e = &r.event;
            Row {
                seq: r.seq,
                time: r.time.replace('T', " ").replace('Z', " UTC"),
                kind: e.kind.clone(),
                principal: e.principal.clone(),
                decision: e.decision.clone(),
                reason_code: e.reason_code.clone().unwrap_or_default(),
                tables: t
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                approval: e.approval.clone().unwrap_or_default(),
                rows_released: e.rows_released.map(|n| n.to_string()).unwrap_or_default(),
                groups_suppressed: e
                    .groups_suppressed
                    .map(|n| n.to_string())
                    .unwrap_or_default(),
                sql: e.sql.clone().unwrap_or_default(),
            }
        })
        .collect();
    let page = ActivityPage {
        layout: who.layout("activity"),
        principals: principals.into_iter().collect(),
        tables: scope.tables.iter().map(ToString::to_string).collect(),
        decisions: DECISIONS.to_vec(),
        chain,
        matching: matched.len(),
        rows,
        chart,
        filter,
    };
    page.render().map(Html).map_err(Error::render)
}
