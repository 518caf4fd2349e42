//! The identity of a query for approvals (PRIVACY.md §4): a hash of a complete,
//! canonical encoding of its normalized plan, and the complete text an owner reads.
//!
//! DataFusion's display form abbreviates (a VALUES list shows five rows, then `...`), so
//! it cannot identify a query: an approval for six rows would match a seventh. The
//! encoding here is the indented plan (structure, join types, sort directions, limits)
//! followed by the full debug form of every expression of every node, subqueries
//! included: every literal, every VALUES row, every type.

use std::fmt::Write;

use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::{Expr, LogicalPlan, lit};

/// The canonical encoding of a plan.
pub fn canonical(plan: &LogicalPlan) -> String {
    let mut out = plan.display_indent_schema().to_string();
    out.push('\n');
    let _ = plan.apply_with_subqueries(|node| {
        let _ = writeln!(out, "# {}", node_kind(node));
        let _ = node.apply_expressions(|e| {
            let _ = writeln!(out, "{:?}", without_subqueries(e));
            Ok(TreeNodeRecursion::Continue)
        });
        Ok(TreeNodeRecursion::Continue)
    });
    out
}

/// The hex SHA-256 of [`canonical`].
pub fn fingerprint(plan: &LogicalPlan) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(canonical(plan).as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The plan as an owner reads it: the indented plan, with every VALUES row in full.
pub fn full_text(plan: &LogicalPlan) -> String {
    let mut out = String::new();
    write_node(plan, 0, &mut out);
    out
}

fn write_node(plan: &LogicalPlan, depth: usize, out: &mut String) {
    let indent = "  ".repeat(depth);
    match plan {
        LogicalPlan::Values(v) => {
            let rows: Vec<String> = v
                .values
                .iter()
                .map(|r| {
                    let cells: Vec<String> = r.iter().map(ToString::to_string).collect();
                    format!("({})", cells.join(", "))
                })
                .collect();
            let _ = writeln!(out, "{indent}Values: {}", rows.join(", "));
        }
        other => {
            let _ = writeln!(out, "{indent}{}", other.display());
        }
    }
    let _ = plan.apply_expressions(|e| {
        e.apply(|e| {
            let sub = match e {
                Expr::ScalarSubquery(s) => Some(&s.subquery),
                Expr::InSubquery(s) => Some(&s.subquery.subquery),
                Expr::Exists(s) => Some(&s.subquery.subquery),
                Expr::SetComparison(s) => Some(&s.subquery.subquery),
                _ => None,
            };
            if let Some(s) = sub {
                let _ = writeln!(out, "{indent}  Subquery:");
                write_node(s, depth + 2, out);
            }
            Ok(TreeNodeRecursion::Continue)
        })
    });
    for input in plan.inputs() {
        write_node(input, depth + 1, out);
    }
}

fn node_kind(plan: &LogicalPlan) -> String {
    let display = plan.display().to_string();
    display.split(':').next().unwrap_or_default().to_string()
}

/// The expression with each subquery replaced by a marker (the walk visits the
/// subquery's own plan; its debug form would drag whole schemas in).
fn without_subqueries(e: &Expr) -> Expr {
    e.clone()
        .transform(|e| match e {
            Expr::ScalarSubquery(_) => Ok(Transformed::yes(lit("<scalar subquery>"))),
            Expr::Exists(x) => Ok(Transformed::yes(lit(format!(
                "<exists, negated {}>",
                x.negated
            )))),
            Expr::InSubquery(x) => Ok(Transformed::yes(
                lit(format!("<in subquery, negated {}>", x.negated)).and(*x.expr),
            )),
            Expr::SetComparison(x) => Ok(Transformed::yes(
                lit(format!("<{:?} {:?} subquery>", x.op, x.quantifier)).and(*x.expr),
            )),
            other => Ok(Transformed::no(other)),
        })
        .map(|t| t.data)
        .unwrap_or_else(|_| e.clone())
}
