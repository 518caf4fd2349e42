//! The plan nodes allowed below a release boundary (PRIVACY.md §3.2), as one exhaustive
//! match: a new DataFusion node kind is a compile error here until someone decides.

use datafusion::logical_expr::{Distinct, JoinType, LogicalPlan};

use crate::policy::refusal::ReasonCode;

/// What a plan node is, below a release boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRule {
    /// Allowed; its expressions are checked by the expression rules.
    Allowed,
    /// The aggregate (or DISTINCT) that the boundary releases.
    Boundary,
    /// A leaf: a table scan, VALUES, an empty relation.
    Leaf,
    /// Never released automatically over protected rows.
    Refused {
        code: ReasonCode,
        what: &'static str,
    },
}

const fn refused(code: ReasonCode, what: &'static str) -> NodeRule {
    NodeRule::Refused { code, what }
}

/// The rule for one node whose input carries raw protected rows.
pub fn rule(plan: &LogicalPlan) -> NodeRule {
    use ReasonCode::*;
    match plan {
        LogicalPlan::Projection(_) | LogicalPlan::Filter(_) | LogicalPlan::SubqueryAlias(_) => {
            NodeRule::Allowed
        }
        LogicalPlan::Join(j) => match j.join_type {
            JoinType::Inner | JoinType::Left | JoinType::Right | JoinType::Full => {
                NodeRule::Allowed
            }
            JoinType::LeftSemi
            | JoinType::RightSemi
            | JoinType::LeftAnti
            | JoinType::RightAnti
            | JoinType::LeftMark
            | JoinType::RightMark => refused(
                SetOperationNotAllowed,
                "a semi or anti join (INTERSECT, EXCEPT, IN or EXISTS over a subquery)",
            ),
        },
        LogicalPlan::Aggregate(_) | LogicalPlan::Distinct(Distinct::All(_)) => NodeRule::Boundary,
        LogicalPlan::TableScan(_) | LogicalPlan::Values(_) | LogicalPlan::EmptyRelation(_) => {
            NodeRule::Leaf
        }
        LogicalPlan::Distinct(Distinct::On(_)) => refused(
            OperatorNotAllowed,
            "DISTINCT ON (it keeps one row's values per key)",
        ),
        LogicalPlan::Sort(_) => refused(OperatorNotAllowed, "ORDER BY"),
        LogicalPlan::Limit(_) => refused(OperatorNotAllowed, "LIMIT or OFFSET"),
        LogicalPlan::Window(_) => refused(WindowNotAllowed, "a window function"),
        LogicalPlan::Union(_) => refused(SetOperationNotAllowed, "UNION"),
        LogicalPlan::Unnest(_) => refused(OperatorNotAllowed, "UNNEST"),
        LogicalPlan::RecursiveQuery(_) => refused(RecursiveNotAllowed, "a recursive query"),
        LogicalPlan::Repartition(_) => refused(OperatorNotAllowed, "a repartition"),
        LogicalPlan::Subquery(_) => NodeRule::Allowed,
        LogicalPlan::Explain(_) | LogicalPlan::Analyze(_) => refused(ExplainNotAllowed, "EXPLAIN"),
        LogicalPlan::Extension(_)
        | LogicalPlan::Statement(_)
        | LogicalPlan::Dml(_)
        | LogicalPlan::Ddl(_)
        | LogicalPlan::Copy(_)
        | LogicalPlan::DescribeTable(_) => refused(UnclassifiedPlan, "a statement node"),
    }
}

#[cfg(test)]
mod tests {
    use datafusion::logical_expr::{LogicalPlanBuilder, col};

    use super::*;

    #[test]
    fn sort_and_limit_are_refused_below_the_boundary() {
        let base = LogicalPlanBuilder::empty(true);
        let sorted = base.clone().sort(vec![col("x").sort(true, true)]);
        // Sorting an empty relation with no column fails to plan; build by hand.
        let limit = LogicalPlanBuilder::empty(true)
            .limit(0, Some(1))
            .unwrap()
            .build()
            .unwrap();
        assert!(matches!(
            rule(&limit),
            NodeRule::Refused {
                code: ReasonCode::OperatorNotAllowed,
                ..
            }
        ));
        drop(sorted);
        let empty = LogicalPlanBuilder::empty(true).build().unwrap();
        assert_eq!(rule(&empty), NodeRule::Leaf);
    }
}
