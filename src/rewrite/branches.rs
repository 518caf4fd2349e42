//! The rows each branch of a conditional aggregate keeps, so the boundary can hold them
//! to k (PRIVACY.md §3.3, read for `conditional_aggregates`).
//!
//! `sum(CASE WHEN c_acctbal = 9977.62 THEN o_totalprice ELSE 0 END)` over all orders is
//! one row of thousands of customers, yet its value is one customer's total. The k rule
//! counts the entities of the group; here it must also count the entities of each row set
//! a value depends on separately. So every CASE branch (under the branches around it) and
//! every `FILTER (WHERE ...)` is a *region*, and the boundary adds one distinct-entity
//! count per region and entity column (`airlock_reaches_k(e) FILTER (WHERE region)`): a
//! group with a region below k is withheld whole.
//!
//! Every branch is counted, a NULL or zero one too: `sum(CASE WHEN <one person> THEN 0
//! ELSE x END)` next to `sum(x)` is that person's x by subtraction. (The checker keeps
//! a CASE out of arithmetic, where two CASEs would combine into a region nobody counts.)
//! Two regions may still differ by one person (`sum(CASE WHEN a ...) - sum(CASE WHEN b
//! ...)`): that is differencing, which the k rule does not stop across two queries or a
//! UNION ALL either (docs/DESIGN.md); DP tables are the answer to it.

use datafusion::common::ScalarValue;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::expr::{AggregateFunction, Case};
use datafusion::logical_expr::{BinaryExpr, Expr, Operator, not};

/// The regions of a boundary's aggregate expressions, each once, in order.
pub fn regions(aggr_exprs: &[Expr]) -> Vec<Expr> {
    let mut out = Vec::new();
    for e in aggr_exprs {
        let Some(f) = aggregate(e) else { continue };
        let filter = f.params.filter.as_deref().map(|w| is_true(w.clone()));
        if let Some(w) = &filter {
            push(&mut out, w.clone());
        }
        for arg in &f.params.args {
            nested(arg, &filter, &mut out);
        }
    }
    out
}

fn aggregate(e: &Expr) -> Option<&AggregateFunction> {
    match e {
        Expr::Alias(a) => aggregate(&a.expr),
        Expr::AggregateFunction(f) => Some(f),
        _ => None,
    }
}

/// Every CASE inside `e`, each with the branches around it.
fn nested(e: &Expr, path: &Option<Expr>, out: &mut Vec<Expr>) {
    let _ = e.apply(|node| {
        if let Expr::Case(c) = node {
            case(c, path, out);
            return Ok(TreeNodeRecursion::Jump);
        }
        Ok(TreeNodeRecursion::Continue)
    });
}

/// One CASE under `path`: one region per branch, ELSE (or the missing ELSE's NULL)
/// included.
fn case(c: &Case, path: &Option<Expr>, out: &mut Vec<Expr>) {
    let mut earlier: Option<Expr> = None;
    let branch = |value: &Expr, region: Expr, out: &mut Vec<Expr>| {
        push(out, region.clone());
        nested(value, &Some(region), out);
    };
    for (when, then) in &c.when_then_expr {
        let condition = match &c.expr {
            Some(operand) => operand.as_ref().clone().eq(when.as_ref().clone()),
            None => when.as_ref().clone(),
        };
        let hit = is_true(condition);
        let region = and(and_opt(path.clone(), earlier.clone().map(not)), hit.clone());
        branch(then, region, out);
        earlier = Some(match earlier {
            Some(e) => e.or(hit),
            None => hit,
        });
    }
    let rest = and_opt(path.clone(), earlier.map(not))
        .unwrap_or(Expr::Literal(ScalarValue::Boolean(Some(true)), None));
    match &c.else_expr {
        Some(value) => branch(value, rest, out),
        // No ELSE is ELSE NULL.
        None => branch(&Expr::Literal(ScalarValue::Null, None), rest, out),
    }
}

/// `c IS TRUE`, written as `c IS NOT DISTINCT FROM true`: the same rows, and a form
/// whose nullability DataFusion's logical and physical plans agree on (with `IS TRUE`,
/// common-subexpression elimination of a nested CASE's regions fails the physical plan).
fn is_true(c: Expr) -> Expr {
    Expr::BinaryExpr(BinaryExpr::new(
        Box::new(c),
        Operator::IsNotDistinctFrom,
        Box::new(Expr::Literal(ScalarValue::Boolean(Some(true)), None)),
    ))
}

fn and(a: Option<Expr>, b: Expr) -> Expr {
    match a {
        Some(a) => a.and(b),
        None => b,
    }
}

fn and_opt(a: Option<Expr>, b: Option<Expr>) -> Option<Expr> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.and(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

fn push(out: &mut Vec<Expr>, region: Expr) {
    if !out.contains(&region) {
        out.push(region);
    }
}
