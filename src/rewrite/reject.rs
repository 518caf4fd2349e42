//! The rejections of PRIVACY.md §3.6 (and §3.5's other paths), each with its own code.
//!
//! Windows, grouping sets, INTERSECT/EXCEPT, recursive CTEs and correlated subqueries
//! over raw protected rows; comparing a non-filterable column (the entity key, a wiped
//! column) with a literal; raw rows meeting the output through a subquery; DISTINCT ON;
//! and any plan node the lineage walk could not classify.

use std::collections::BTreeSet;

use super::PolicyContext;
use super::gate::{Violation, names};
use super::lineage::{Finding, Report};
use crate::policy::refusal::ReasonCode;

pub fn violations(report: &Report, ctx: &PolicyContext) -> Vec<Violation> {
    let mut out = Vec::new();
    let v = |code, tables: &BTreeSet<_>, message: String| Violation {
        code,
        tables: tables.clone(),
        message,
    };
    for f in &report.findings {
        match f {
            Finding::Window(t) => out.push(v(
                ReasonCode::WindowNotAllowed,
                t,
                format!(
                    "window functions over raw rows of {} are not released automatically",
                    names(t)
                ),
            )),
            Finding::GroupingSets(t) => out.push(v(
                ReasonCode::GroupingSetsNotAllowed,
                t,
                format!(
                    "ROLLUP, CUBE and GROUPING SETS over {} are not released automatically",
                    names(t)
                ),
            )),
            Finding::SetOperation(t) => out.push(v(
                ReasonCode::SetOperationNotAllowed,
                t,
                format!(
                    "INTERSECT and EXCEPT over raw rows of {} are not released automatically",
                    names(t)
                ),
            )),
            Finding::Recursive(t) => out.push(v(
                ReasonCode::RecursiveNotAllowed,
                t,
                format!(
                    "recursive queries over {} are not released automatically",
                    names(t)
                ),
            )),
            Finding::CorrelatedSubquery(t) => out.push(v(
                ReasonCode::CorrelatedSubqueryNotAllowed,
                t,
                format!(
                    "correlated subqueries on {} are not released automatically",
                    names(t)
                ),
            )),
            Finding::RawSubquery(t) => out.push(v(
                ReasonCode::SubqueryNotAllowed,
                t,
                format!(
                    "a subquery feeds raw rows of {} into the query; aggregate it first",
                    names(t)
                ),
            )),
            Finding::DistinctOn(t) => out.push(v(
                ReasonCode::AggregateNotAllowed,
                t,
                format!("DISTINCT ON keeps one row's values per key of {}", names(t)),
            )),
            Finding::LiteralComparison(s) => {
                let Some(rules) = ctx.tables.get(&s.table) else {
                    continue;
                };
                if !rules.policy.filterable.contains(&s.column) {
                    let why = if rules.policy.privacy_unit.as_deref() == Some(s.column.as_str()) {
                        "the entity key"
                    } else if rules.policy.wipe.contains(&s.column) {
                        "a wiped column"
                    } else {
                        "not filterable"
                    };
                    out.push(v(
                        ReasonCode::FilterNotAllowed,
                        &BTreeSet::from([s.table.clone()]),
                        format!(
                            "{}.{} is {why} and may not be compared with a literal",
                            s.table, s.column
                        ),
                    ));
                }
            }
            Finding::Unclassified { node, tables } => out.push(v(
                ReasonCode::UnclassifiedPlan,
                tables,
                format!("the plan contains a node the policy cannot classify: {node}"),
            )),
            Finding::RawOutput(_) | Finding::Aggregate { .. } | Finding::NoAutomaticAccess(_) => {}
        }
    }
    out
}
