//! Reserved names (PRIVACY.md §3.6): identifiers that start with `__airlock` or
//! `airlock_` belong to the rewriter. A query that uses one as an alias, a column or a
//! relation name is refused before any rule looks at it, so no analyst name can change
//! what the rewriter does.

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::{Expr, LogicalPlan};

use crate::policy::refusal::{ReasonCode, Refusal};

/// Whether a name is reserved for the rewriter.
pub fn is_reserved(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("__airlock") || lower.starts_with("airlock_")
}

/// Refuses a plan that names anything with a reserved prefix.
pub fn check(plan: &LogicalPlan) -> Result<(), Refusal> {
    let mut found: Option<String> = None;
    let _ = plan.apply_with_subqueries(|node| {
        let mut names: Vec<String> = node
            .schema()
            .iter()
            .flat_map(|(q, f)| {
                let mut n = vec![f.name().clone()];
                if let Some(q) = q {
                    n.push(q.table().to_string());
                }
                n
            })
            .collect();
        if let LogicalPlan::SubqueryAlias(a) = node {
            names.push(a.alias.table().to_string());
        }
        let _ = node.apply_expressions(|e| {
            e.apply(|e| {
                if let Expr::Alias(a) = e {
                    names.push(a.name.clone());
                }
                Ok(TreeNodeRecursion::Continue)
            })
        });
        if let Some(n) = names.into_iter().find(|n| is_reserved(n)) {
            found = Some(n);
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    match found {
        Some(name) => Err(Refusal::new(
            ReasonCode::ReservedName,
            format!(
                "the name {name:?} is reserved: names starting with __airlock or airlock_ belong to the privacy rewriter"
            ),
        )),
        None => Ok(()),
    }
}
