//! The DP rule (PRIVACY.md §5b): an aggregate over a table in `release = "dp"` is
//! replaced by a [`DpRelease`] node at the same boundary.
//!
//! [`boundary`] is called by [`super::threshold`] where it would put a k-threshold
//! release: if the hidden entity column under the aggregate belongs to a DP table (and
//! the principal is under the automatic rules), the aggregate must be one DP mode can
//! answer, or the query is refused with `DP_NOT_SUPPORTED` (`APPROVAL_PENDING` for a
//! principal holding `request`). Supported: COUNT(*), COUNT(DISTINCT <privacy unit>),
//! SUM and AVG of a column with owner bounds (through DataFusion's implicit casts),
//! grouped by any allowed expressions, over one DP table joined only with public
//! tables or, on the privacy unit, with another protected table (the release then keeps
//! only rows whose units agree). The node's input is a projection (unit, keys, values as stored): the same
//! allow-list and totality rules as under a threshold boundary hold there.
//!
//! [`finish`] then recomputes the schemas above each DP node (counts stay Int64, sums
//! and averages become Float64) and carries each `<name>_ci95` interval column through
//! the projections that pass its figure on, renamed after the figure's output name.

use std::sync::Arc;

use datafusion::common::Column;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::error::Result;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    Aggregate, Expr, Extension, Filter, JoinType, LogicalPlan, Operator, Projection,
};

use super::dp_release::{CI_SUFFIX, DpAggregate, DpRelease, dp_releases};
use super::protect::EntityColumn;
use super::{HIDDEN_PREFIX, PolicyContext};
use crate::policy::refusal::{ReasonCode, Refusal};

/// Refuses (or sends to approval) a DP query DP mode cannot answer.
fn unsupported(
    ctx: &PolicyContext,
    table: &str,
    why: String,
) -> datafusion::error::DataFusionError {
    let request = ctx
        .tables
        .iter()
        .any(|(n, r)| n.to_string() == table && r.request);
    if request {
        Refusal::new(
            ReasonCode::ApprovalPending,
            format!(
                "{table} is released under differential privacy, which cannot answer this: {why}"
            ),
        )
        .into()
    } else {
        Refusal::new(ReasonCode::DpNotSupported, format!("{table}: {why}")).into()
    }
}

/// The DP table behind a hidden entity column, if the principal is under its
/// automatic rules.
pub fn dp_table<'a>(
    ctx: &'a PolicyContext,
    entity: &str,
) -> Option<(String, &'a crate::policy::dp::DpPolicy)> {
    let e = EntityColumn::parse(entity)?;
    ctx.tables
        .iter()
        .find(|(n, _)| n.to_string() == e.table)
        .filter(|(_, r)| r.automatic())
        .and_then(|(n, r)| r.policy.dp().map(|d| (n.to_string(), d)))
}

/// Replaces an aggregate over a DP table by its DP release (None: not a DP table).
pub fn boundary(a: &Aggregate, ctx: &PolicyContext) -> Result<Option<LogicalPlan>> {
    let entities = super::threshold::hidden(a.input.schema());
    let dp: Vec<_> = entities
        .iter()
        .filter_map(|c| dp_table(ctx, &c.name).map(|t| (c.clone(), t)))
        .collect();
    let Some((unit_col, (table, policy))) = dp.first().cloned() else {
        return Ok(None);
    };
    if dp.len() != 1 {
        return Err(unsupported(
            ctx,
            &table,
            "one DP table per aggregate: not joined with itself or another DP table".into(),
        ));
    }
    let unit_name = unit_of(ctx, &table);
    // Another protected table may stand below the same aggregate only joined on the
    // privacy unit; the release then also keeps only rows whose units agree, so every
    // row it bounds concerns one person whatever the join said.
    let mut same_person = Vec::new();
    for other in entities.iter().filter(|c| **c != unit_col) {
        let other_table = EntityColumn::parse(&other.name)
            .map(|e| e.table)
            .unwrap_or_default();
        let other_unit = unit_of(ctx, &other_table);
        if other_unit.is_empty() || !joined_on(&a.input, &unit_name, &other_unit) {
            return Err(unsupported(
                ctx,
                &table,
                format!(
                    "a DP table may be joined only with public tables or, on its privacy unit {unit_name}, with {other_table}.{}",
                    if other_unit.is_empty() {
                        "<unit>"
                    } else {
                        &other_unit
                    }
                ),
            ));
        }
        same_person.push(Expr::Column(unit_col.clone()).eq(Expr::Column(other.clone())));
    }
    let mut values: Vec<(String, i64, i64)> = Vec::new();
    let mut value_exprs: Vec<Expr> = Vec::new();
    let mut aggregates = Vec::new();
    for e in &a.aggr_expr {
        let inner = match e {
            Expr::Alias(al) => al.expr.as_ref(),
            other => other,
        };
        let Expr::AggregateFunction(f) = inner else {
            return Err(unsupported(
                ctx,
                &table,
                format!("{e} is not an aggregate DP mode supports"),
            ));
        };
        let name = f.func.name().to_ascii_lowercase();
        let p = &f.params;
        if p.filter.is_some() || !p.order_by.is_empty() {
            return Err(unsupported(
                ctx,
                &table,
                format!("{e}: FILTER and ORDER BY are not supported in DP mode"),
            ));
        }
        let arg = p.args.first().map(strip_casts);
        let agg = match (name.as_str(), p.distinct, arg) {
            ("count", false, Some(Expr::Literal(v, _))) if !v.is_null() && p.args.len() == 1 => {
                DpAggregate::Rows
            }
            ("count", true, Some(Expr::Column(c))) if c.name == unit_name => DpAggregate::Units,
            ("sum" | "avg", false, Some(Expr::Column(c))) => {
                let Some((lo, hi)) = policy.fixed_bounds(&c.name) else {
                    return Err(unsupported(
                        ctx,
                        &table,
                        format!(
                            "{e}: column {} has no bounds, so it cannot be summed",
                            c.name
                        ),
                    ));
                };
                let j = match values.iter().position(|(n, _, _)| *n == c.name) {
                    Some(j) => j,
                    None => {
                        values.push((c.name.clone(), lo, hi));
                        value_exprs.push(
                            Expr::Column(c.clone())
                                .alias(format!("{HIDDEN_PREFIX}dp_value_{}", values.len() - 1)),
                        );
                        values.len() - 1
                    }
                };
                if name == "sum" {
                    DpAggregate::Sum(j)
                } else {
                    DpAggregate::Avg(j)
                }
            }
            _ => {
                return Err(unsupported(
                    ctx,
                    &table,
                    format!(
                        "{e}: DP mode supports COUNT(*), COUNT(DISTINCT {unit_name}), SUM and AVG of bounded columns"
                    ),
                ));
            }
        };
        aggregates.push(agg);
    }
    let mut exprs = vec![Expr::Column(unit_col)];
    for (i, g) in a.group_expr.iter().enumerate() {
        exprs.push(g.clone().alias(format!("{HIDDEN_PREFIX}dp_key_{i}")));
    }
    exprs.extend(value_exprs);
    let rows = match same_person.into_iter().reduce(Expr::and) {
        None => Arc::clone(&a.input),
        Some(p) => Arc::new(LogicalPlan::Filter(Filter::try_new(
            p,
            Arc::clone(&a.input),
        )?)),
    };
    let input = LogicalPlan::Projection(Projection::try_new(exprs, rows)?);
    let node = DpRelease::try_new(
        input,
        table,
        a.group_expr.len(),
        values,
        aggregates,
        policy.clone(),
        &a.schema,
        Arc::default(),
    )?;
    Ok(Some(LogicalPlan::Extension(Extension {
        node: Arc::new(node),
    })))
}

/// The privacy unit (entity column) of a protected table.
fn unit_of(ctx: &PolicyContext, table: &str) -> String {
    ctx.tables
        .iter()
        .find(|(n, _)| n.to_string() == table)
        .and_then(|(_, r)| r.policy.privacy_unit.clone())
        .unwrap_or_default()
}

/// Whether `plan` holds an inner equi-join of a column named `left` with one named
/// `right` (either side). Names only: the row filter [`boundary`] adds is what makes
/// the release sound; this check is there to refuse other joins with a clear reason.
fn joined_on(plan: &LogicalPlan, left: &str, right: &str) -> bool {
    let named = |e: &Expr, n: &str| matches!(strip_casts(e), Expr::Column(c) if c.name == n);
    let pair = |l: &Expr, r: &Expr| {
        (named(l, left) && named(r, right)) || (named(l, right) && named(r, left))
    };
    let mut found = false;
    let _ = plan.apply(|p| {
        // Before the optimizer, `ON a = b` is still the join's filter.
        let in_filter = |j: &datafusion::logical_expr::Join| {
            j.filter.as_ref().is_some_and(|f| {
                split_conjunction(f).into_iter().any(|c| {
                    matches!(c, Expr::BinaryExpr(b) if b.op == Operator::Eq && pair(&b.left, &b.right))
                })
            })
        };
        if let LogicalPlan::Join(j) = p
            && j.join_type == JoinType::Inner
            && (j.on.iter().any(|(l, r)| pair(l, r)) || in_filter(j))
        {
            found = true;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

fn strip_aliases(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => strip_aliases(&a.expr),
        other => other,
    }
}

fn strip_casts(e: &Expr) -> &Expr {
    match e {
        Expr::Cast(c) => strip_casts(&c.expr),
        Expr::TryCast(c) => strip_casts(&c.expr),
        other => other,
    }
}

/// Recomputes the schemas above DP nodes and carries the interval columns up.
pub fn finish(plan: LogicalPlan, ctx: &PolicyContext) -> Result<LogicalPlan> {
    plan.transform_up_with_subqueries(|p| {
        if !p.inputs().iter().any(|i| !dp_releases(i).is_empty()) {
            return Ok(Transformed::no(p));
        }
        match p {
            LogicalPlan::Projection(pr) => {
                let input_schema = pr.input.schema();
                let mut exprs = pr.expr.clone();
                for e in &pr.expr {
                    let (col, out) = match e {
                        Expr::Column(c) => (c, c.name.clone()),
                        Expr::Alias(al) => match strip_aliases(&al.expr) {
                            Expr::Column(c) => (c, al.name.clone()),
                            _ => continue,
                        },
                        _ => continue,
                    };
                    let ci = format!("{}{CI_SUFFIX}", col.name);
                    let wanted = format!("{out}{CI_SUFFIX}");
                    if input_schema.fields().iter().any(|f| *f.name() == ci)
                        && !pr
                            .expr
                            .iter()
                            .any(|x| x.schema_name().to_string() == wanted)
                    {
                        exprs.push(Expr::Column(Column::from_name(ci)).alias(wanted));
                    }
                }
                Ok(Transformed::yes(LogicalPlan::Projection(
                    Projection::try_new(exprs, pr.input)?,
                )))
            }
            // The branches of a union must line up column by column; a DP branch has
            // its interval columns, which no other branch has (found by the fuzzer:
            // the union's schema no longer matched its inputs, and DataFusion's union
            // optimizer panicked).
            LogicalPlan::Union(u) => {
                let table = u
                    .inputs
                    .iter()
                    .flat_map(|i| dp_releases(i))
                    .map(|d| d.table)
                    .next()
                    .unwrap_or_default();
                Err(unsupported(
                    ctx,
                    &table,
                    "a DP result inside UNION (its interval columns do not line up with the other branches'): run the parts as separate queries".into(),
                ))
            }
            other => Ok(Transformed::yes(other.recompute_schema()?)),
        }
    })
    .map(|t| t.data)
}
