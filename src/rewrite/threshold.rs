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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use datafusion::arrow::datatypes::DataType;
use datafusion::common::ExprSchema;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::Transformed;
use datafusion::common::{Column, DFSchemaRef, ScalarValue};
use datafusion::error::Result;
use datafusion::functions_aggregate::expr_fn::count_distinct;
use datafusion::logical_expr::{
    Aggregate, Distinct, Expr, Filter, LogicalPlan, LogicalPlanBuilder, Projection, Union, lit,
};
use datafusion::optimizer::AnalyzerRule;

use super::scan::EntityColumn;
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
        .filter(|(_, f)| EntityColumn::parse(f.name()).is_some())
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
            Ok(Transformed::yes(LogicalPlan::Projection(
                Projection::try_new(exprs, p.input)?,
            )))
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
        LogicalPlan::Union(u) => union(u).map(Transformed::yes),
        // Filters, sorts, limits, aliases, joins, windows: recompute the schema so the
        // hidden columns pass through.
        other => Ok(Transformed::yes(other.recompute_schema()?)),
    }
}

/// Aligns the hidden columns of a union's branches. The n-th occurrence of table T in
/// one branch and the n-th in another hold the same table's entities in different rows,
/// so they share one output column: counting distinct values there counts T's entities
/// across the branches (UNION ALL copies of one person count once).
fn union(u: Union) -> Result<LogicalPlan> {
    static UNIONS: AtomicUsize = AtomicUsize::new(0);
    let id = UNIONS.fetch_add(1, Ordering::Relaxed);
    // For each branch: (table, slot) → (column, type).
    let mut branches = Vec::with_capacity(u.inputs.len());
    let mut slots: BTreeMap<(String, usize), (u64, DataType)> = BTreeMap::new();
    for input in &u.inputs {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        let mut mine = BTreeMap::new();
        for c in hidden(input.schema()) {
            let Some(e) = EntityColumn::parse(&c.name) else {
                continue;
            };
            let slot = seen.entry(e.table.clone()).or_insert(0);
            let t = input.schema().field_from_column(&c)?.data_type().clone();
            let entry = slots.entry((e.table.clone(), *slot)).or_insert((e.k, t));
            entry.0 = entry.0.max(e.k);
            mine.insert((e.table.clone(), *slot), c);
            *slot += 1;
        }
        branches.push(mine);
    }
    let mut inputs = Vec::with_capacity(u.inputs.len());
    for (input, mine) in u.inputs.into_iter().zip(branches) {
        let mut exprs: Vec<Expr> = input
            .schema()
            .iter()
            .filter(|(_, f)| !is_hidden(f.name()))
            .map(|(q, f)| Expr::Column(Column::new(q.cloned(), f.name())))
            .collect();
        for ((table, slot), (k, data_type)) in &slots {
            let name = EntityColumn {
                id: format!("u{id}s{slot}"),
                k: *k,
                table: table.clone(),
            }
            .name();
            exprs.push(match mine.get(&(table.clone(), *slot)) {
                Some(c) => Expr::Column(c.clone()).alias(name),
                None => Expr::Literal(ScalarValue::try_from(data_type)?, None).alias(name),
            });
        }
        inputs.push(Arc::new(LogicalPlan::Projection(Projection::try_new(
            exprs, input,
        )?)));
    }
    Ok(LogicalPlan::Union(Union::try_new_with_loose_types(inputs)?))
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
        let k = EntityColumn::parse(&c.name).map_or(u64::MAX, |e| e.k);
        let name = format!("{HIDDEN_PREFIX}count_{i}");
        aggr.push(count_distinct(Expr::Column(c.clone())).alias(&name));
        conditions.push(Expr::Column(Column::from_name(&name)).gt_eq(lit(k as i64)));
    }
    let counted = LogicalPlan::Aggregate(Aggregate::try_new(a.input, a.group_expr, aggr)?);
    let predicate = conditions
        .into_iter()
        .reduce(Expr::and)
        .unwrap_or_else(|| lit(true));
    let kept = LogicalPlan::Filter(Filter::try_new(predicate, Arc::new(counted))?);
    LogicalPlanBuilder::from(kept).project(original)?.build()
}
