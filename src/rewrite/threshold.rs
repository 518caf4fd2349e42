//! Rule 3: at least k distinct entities behind every released row (§3.3).
//!
//! The hidden entity columns the scan rule added are carried up through projections,
//! aliases, filters, sorts, limits, joins and unions to the first aggregate (or
//! DISTINCT) above them. There, one `count(DISTINCT entity)` per protected scan is added
//! and a filter keeps only groups where every count reaches that table's k; a final
//! projection restores the aggregate's own columns. Counting distinct entities, not
//! rows, means join fan-out, UNION ALL copies and one person's many rows do not make a
//! small group look large. A global aggregate over fewer than k entities keeps no row.
//! Each scan occurrence is checked on its own (a self-join needs k entities on each
//! side), which is never weaker than counting their union.
//!
//! `small_groups = "remainder"` (§3.4) is not implemented yet: such tables are treated
//! as `drop`, which releases less, never more.

use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::Transformed;
use datafusion::common::ExprSchema;
use datafusion::common::{Column, DFSchemaRef, ScalarValue};
use datafusion::error::Result;
use datafusion::functions_aggregate::expr_fn::count_distinct;
use datafusion::logical_expr::{
    Aggregate, Distinct, Expr, Filter, LogicalPlan, LogicalPlanBuilder, Projection, Union, lit,
};
use datafusion::optimizer::AnalyzerRule;

use super::scan::k_of;
use super::{HIDDEN_PREFIX, is_hidden};

#[derive(Debug)]
pub struct ThresholdRule;

impl AnalyzerRule for ThresholdRule {
    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        plan.transform_up_with_subqueries(carry).map(|t| t.data)
    }

    fn name(&self) -> &str {
        "airlock_threshold"
    }
}

/// Hidden entity columns of a schema, with their qualifiers.
fn hidden(schema: &DFSchemaRef) -> Vec<Column> {
    schema
        .iter()
        .filter(|(_, f)| is_hidden(f.name()) && k_of(f.name()).is_some())
        .map(|(q, f)| Column::new(q.cloned(), f.name()))
        .collect()
}

fn carry(plan: LogicalPlan) -> Result<Transformed<LogicalPlan>> {
    let inputs_hidden = plan.inputs().iter().any(|i| !hidden(i.schema()).is_empty());
    if !inputs_hidden {
        return Ok(Transformed::no(plan));
    }
    match plan {
        LogicalPlan::Projection(p) => {
            let mut exprs = p.expr.clone();
            for c in hidden(p.input.schema()) {
                if !p.schema.has_column(&c) {
                    exprs.push(Expr::Column(c));
                }
            }
            Ok(Transformed::yes(LogicalPlan::Projection(Projection::try_new(exprs, p.input)?)))
        }
        LogicalPlan::Aggregate(a) => threshold(a).map(Transformed::yes),
        LogicalPlan::Distinct(Distinct::All(input)) => {
            let groups: Vec<Expr> = input
                .schema()
                .iter()
                .filter(|(_, f)| !is_hidden(f.name()))
                .map(|(q, f)| Expr::Column(Column::new(q.cloned(), f.name())))
                .collect();
            let agg = Aggregate::try_new(input, groups, vec![])?;
            threshold(agg).map(Transformed::yes)
        }
        LogicalPlan::Union(u) => {
            // Every branch must carry the same hidden columns in the same order.
            let mut names: Vec<(String, DataType)> = u
                .inputs
                .iter()
                .flat_map(|i| {
                    hidden(i.schema())
                        .into_iter()
                        .filter_map(|c| {
                            let t = i.schema().field_from_column(&c).ok()?.data_type().clone();
                            Some((c.name, t))
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            names.sort_by(|a, b| a.0.cmp(&b.0));
            names.dedup_by(|a, b| a.0 == b.0);
            let mut inputs = Vec::with_capacity(u.inputs.len());
            for input in u.inputs {
                let mut exprs: Vec<Expr> = input
                    .schema()
                    .iter()
                    .filter(|(_, f)| !is_hidden(f.name()))
                    .map(|(q, f)| Expr::Column(Column::new(q.cloned(), f.name())))
                    .collect();
                for (name, data_type) in &names {
                    let present = input.schema().iter().find(|(_, f)| f.name() == name);
                    exprs.push(match present {
                        Some((q, f)) => Expr::Column(Column::new(q.cloned(), f.name())),
                        None => Expr::Literal(ScalarValue::try_from(data_type)?, None).alias(name),
                    });
                }
                inputs.push(Arc::new(LogicalPlan::Projection(Projection::try_new(exprs, input)?)));
            }
            Ok(Transformed::yes(LogicalPlan::Union(Union::try_new_with_loose_types(inputs)?)))
        }
        // Filters, sorts, limits, aliases, joins, windows: recompute the schema so the
        // hidden columns pass through.
        other => Ok(Transformed::yes(other.recompute_schema()?)),
    }
}

/// Adds the entity counts to an aggregate over hidden columns and keeps only groups
/// where every count reaches its k.
fn threshold(a: Aggregate) -> Result<LogicalPlan> {
    let entities = hidden(a.input.schema());
    let original: Vec<Expr> = a
        .schema
        .iter()
        .map(|(q, f)| Expr::Column(Column::new(q.cloned(), f.name())))
        .collect();
    let mut aggr = a.aggr_expr.clone();
    let mut conditions = Vec::with_capacity(entities.len());
    for (i, c) in entities.iter().enumerate() {
        let k = k_of(&c.name).unwrap_or(u64::MAX);
        let name = format!("{HIDDEN_PREFIX}count_{i}");
        aggr.push(count_distinct(Expr::Column(c.clone())).alias(&name));
        conditions.push(Expr::Column(Column::from_name(&name)).gt_eq(lit(k as i64)));
    }
    let counted = LogicalPlan::Aggregate(Aggregate::try_new(a.input, a.group_expr, aggr)?);
    let predicate = conditions.into_iter().reduce(Expr::and).unwrap_or_else(|| lit(true));
    let kept = LogicalPlan::Filter(Filter::try_new(predicate, Arc::new(counted))?);
    LogicalPlanBuilder::from(kept).project(original)?.build()
}
