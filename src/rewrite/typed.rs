//! The optimized plan is still well typed (§3.2.1: no run-time error below the boundary).
//!
//! DataFusion's simplifier can change an expression's type: it folds `c_acctbal * 0`
//! (a `Decimal128(15, 2)` times an integer) to the literal `Decimal128(0, 20, 0)`, so
//! `c_acctbal * 0 + c_nationkey = 21` becomes a comparison of `Decimal128(21, 0)` with
//! `Decimal128(37, 2)`, which the Arrow kernel refuses at run time. Inside a CASE branch
//! that error fires only if some row reaches the branch: a hostile analyst read one
//! customer's balance in 17 queries, one bit (error or not) per query, whatever k. A
//! plan in which a comparison's two sides differ in type, or an expression's type
//! cannot be computed, is refused before it runs.

use datafusion::arrow::datatypes::DataType;
use datafusion::common::DFSchema;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::{BinaryExpr, Expr, ExprSchemable, LogicalPlan, Operator};

use crate::policy::refusal::{ReasonCode, Refusal};

/// Checks every expression of every node (subqueries included).
pub fn check(plan: &LogicalPlan) -> Result<(), Refusal> {
    let mut found: Option<Refusal> = None;
    let _ = plan.apply_with_subqueries(|node| {
        let Some(schema) = input_schema(node) else {
            return Ok(TreeNodeRecursion::Continue);
        };
        let _ = node.apply_expressions(|e| {
            e.apply(|x| {
                if let Expr::BinaryExpr(b) = x
                    && let Err(why) = binary(b, &schema)
                {
                    found = Some(Refusal::new(ReasonCode::UnclassifiedPlan, why));
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })
        });
        Ok(if found.is_some() {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    found.map_or(Ok(()), Err)
}

/// The columns a node's expressions may name: its inputs' together (a scan's filters
/// name the table's own columns, which its output schema may have projected away).
fn input_schema(node: &LogicalPlan) -> Option<DFSchema> {
    if let LogicalPlan::TableScan(scan) = node {
        return DFSchema::try_from_qualified_schema(scan.table_name.clone(), &scan.source.schema())
            .ok();
    }
    let mut schema = DFSchema::empty();
    for input in node.inputs() {
        schema.merge(input.schema());
    }
    Some(schema)
}

fn binary(b: &BinaryExpr, schema: &DFSchema) -> Result<(), String> {
    let (l, r) = match (b.left.get_type(schema), b.right.get_type(schema)) {
        (Ok(l), Ok(r)) => (l, r),
        // A column this walk cannot resolve (an outer reference): DataFusion's own
        // checks stand for it.
        _ => return Ok(()),
    };
    let comparison = matches!(
        b.op,
        Operator::Eq
            | Operator::NotEq
            | Operator::Lt
            | Operator::LtEq
            | Operator::Gt
            | Operator::GtEq
            | Operator::IsDistinctFrom
            | Operator::IsNotDistinctFrom
    );
    if comparison && !comparable(&l, &r) {
        return Err(format!(
            "the optimized plan compares {l} with {r} in {b} (an optimizer rule changed a type); refused rather than run, since such a comparison fails at run time only on the rows that reach it"
        ));
    }
    Ok(())
}

/// Types an Arrow comparison kernel takes together: equal ones, NULL with anything, a
/// dictionary with its value type, and the string types among themselves.
fn comparable(l: &DataType, r: &DataType) -> bool {
    use DataType::{Dictionary, LargeUtf8, Null, Utf8, Utf8View};
    match (l, r) {
        _ if l == r => true,
        (Null, _) | (_, Null) => true,
        (Dictionary(_, v), other) | (other, Dictionary(_, v)) => comparable(v, other),
        (Utf8 | LargeUtf8 | Utf8View, Utf8 | LargeUtf8 | Utf8View) => true,
        _ => false,
    }
}
