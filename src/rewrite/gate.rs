//! Rule 1: the aggregate-only gate, its allow-list, and the decision for the whole query.
//!
//! Every output value that derives from a protected table must pass through an
//! aggregate (or DISTINCT) whose functions are on the table's allow-list (§3.2). The
//! gate collects these violations and those of [`super::reject`], then decides in the
//! contract's order (§1): no violation → release; every failing table allows `request`
//! → `APPROVAL_PENDING`; otherwise → refusal with the first violation's code.

use std::collections::BTreeSet;
use std::sync::Arc;

use datafusion::common::config::ConfigOptions;
use datafusion::error::Result;
use datafusion::logical_expr::LogicalPlan;
use datafusion::optimizer::AnalyzerRule;

use super::lineage::{self, Finding, Report};
use super::{PolicyContext, reject};
use crate::config::TableName;
use crate::policy::refusal::{ReasonCode, Refusal};

/// A reason the automatic rules do not release a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub code: ReasonCode,
    /// The protected tables the violation is about (never empty for table violations).
    pub tables: BTreeSet<TableName>,
    pub message: String,
}

/// The outcome of the automatic rules for one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Release,
    Approval(Vec<Violation>),
    Refuse(Violation),
}

/// Violations of the gate itself: raw output, the allow-list, conditional aggregates,
/// and access without the `aggregate` action.
pub fn violations(report: &Report, ctx: &PolicyContext) -> Vec<Violation> {
    let mut out = Vec::new();
    for f in &report.findings {
        match f {
            Finding::RawOutput(tables) => out.push(Violation {
                code: ReasonCode::AggregateRequired,
                tables: tables.clone(),
                message: format!(
                    "rows of {} would leave unaggregated; aggregate them (count, sum, avg, ...) with GROUP BY",
                    names(tables)
                ),
            }),
            Finding::Aggregate {
                tables,
                function,
                conditional,
                filter,
            } => {
                let refusing: BTreeSet<TableName> = tables
                    .iter()
                    .filter(|t| ctx.tables.get(*t).is_some_and(|r| !r.policy.aggregates.contains(function)))
                    .cloned()
                    .collect();
                if !refusing.is_empty() {
                    out.push(Violation {
                        code: ReasonCode::AggregateNotAllowed,
                        tables: refusing.clone(),
                        message: format!(
                            "aggregate {function} is not on the allow-list of {} (allowed: {})",
                            names(&refusing),
                            allowed(ctx, &refusing)
                        ),
                    });
                }
                if *conditional || *filter {
                    let strict: BTreeSet<TableName> = tables
                        .iter()
                        .filter(|t| ctx.tables.get(*t).is_some_and(|r| !r.policy.conditional_aggregates))
                        .cloned()
                        .collect();
                    if !strict.is_empty() {
                        out.push(Violation {
                            code: ReasonCode::ConditionalAggregate,
                            tables: strict.clone(),
                            message: format!(
                                "conditional logic ({}) inside {function} can single one person out of a group of {}",
                                if *filter { "a FILTER clause" } else { "CASE, IF, COALESCE or NULLIF" },
                                names(&strict)
                            ),
                        });
                    }
                }
            }
            Finding::NoAutomaticAccess(table) => out.push(Violation {
                code: ReasonCode::AccessDenied,
                tables: BTreeSet::from([table.clone()]),
                message: format!("no automatic results from {table}: its results need the data owner's approval"),
            }),
            _ => {}
        }
    }
    out
}

/// Decides for the whole query (§1).
pub fn decide(mut violations: Vec<Violation>, ctx: &PolicyContext) -> Decision {
    if violations.is_empty() {
        return Decision::Release;
    }
    violations.dedup();
    let can_request = |v: &Violation| {
        !v.tables.is_empty()
            && v.tables
                .iter()
                .all(|t| ctx.tables.get(t).is_some_and(|r| r.request))
    };
    match violations.iter().find(|v| !can_request(v)) {
        Some(v) => Decision::Refuse(v.clone()),
        None => Decision::Approval(violations),
    }
}

/// The refusal a decision ends in, if any.
pub fn refusal(decision: Decision) -> Option<Refusal> {
    match decision {
        Decision::Release => None,
        Decision::Refuse(v) => Some(Refusal::new(v.code, v.message)),
        Decision::Approval(vs) => Some(Refusal::new(
            ReasonCode::ApprovalPending,
            vs.iter()
                .map(|v| format!("{}: {}", v.code, v.message))
                .collect::<Vec<_>>()
                .join("; "),
        )),
    }
}

/// Runs the lineage walk and every automatic check.
pub fn evaluate(plan: &LogicalPlan, ctx: &PolicyContext) -> (Report, Vec<Violation>) {
    let report = lineage::analyze(plan, ctx);
    // The specific rejections first: they say more than "aggregate it".
    let mut v = reject::violations(&report, ctx);
    v.extend(violations(&report, ctx));
    (report, v)
}

/// The gate as an analyzer rule: errors with the decision's refusal, or passes the plan on.
#[derive(Debug)]
pub struct PolicyGate {
    ctx: Arc<PolicyContext>,
}

impl PolicyGate {
    pub fn new(ctx: Arc<PolicyContext>) -> Self {
        Self { ctx }
    }
}

impl AnalyzerRule for PolicyGate {
    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        let (_, violations) = evaluate(&plan, &self.ctx);
        match refusal(decide(violations, &self.ctx)) {
            None => Ok(plan),
            Some(r) => Err(r.into()),
        }
    }

    fn name(&self) -> &str {
        "airlock_policy_gate"
    }
}

pub(crate) fn names(tables: &BTreeSet<TableName>) -> String {
    tables
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn allowed(ctx: &PolicyContext, tables: &BTreeSet<TableName>) -> String {
    let mut common: Option<BTreeSet<String>> = None;
    for t in tables {
        if let Some(r) = ctx.tables.get(t) {
            common = Some(match common {
                None => r.policy.aggregates.clone(),
                Some(c) => c.intersection(&r.policy.aggregates).cloned().collect(),
            });
        }
    }
    common
        .unwrap_or_default()
        .into_iter()
        .collect::<Vec<_>>()
        .join(", ")
}
