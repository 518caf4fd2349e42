//! Rule 3: at least k distinct entities behind every released row (§3.3).
//!
//! The hidden entity columns the scan rule added are carried up through projections,
//! aliases, filters, sorts, limits, joins and unions to the first aggregate (or
//! DISTINCT) above them. There, one distinct-entity count per protected scan is added
//! (`airlock_reaches_k`, which counts only up to k: see `reaches.rs`) and a filter keeps
//! only groups where every count reaches that table's k; a final
//! projection restores the aggregate's own columns. Counting distinct entities, not
//! rows, means join fan-out, UNION ALL copies and one person's many rows do not make a
//! small group look large. A global aggregate over fewer than k entities keeps no row.
//! Each scan occurrence is checked on its own (a self-join needs k entities on each
//! side), which is never weaker than counting their union.
//!
//! With `small_groups = "remainder"` (§3.4) the groups below k are merged into one row
//! with NULL keys, itself released only if it reaches k, and marked by the boolean
//! column `airlock_remainder`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use datafusion::arrow::datatypes::DataType;
use datafusion::common::ExprSchema;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::Transformed;
use datafusion::common::{Column, DFSchemaRef, ScalarValue};
use datafusion::error::Result;
use datafusion::logical_expr::{
    Aggregate, Distinct, Expr, Filter, LogicalPlan, LogicalPlanBuilder, Projection, Union, lit,
};
use datafusion::optimizer::AnalyzerRule;

use super::reaches::reaches_k;
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

/// The column that tells the remainder row (true) from real groups (false), added to
/// results of aggregates over tables with `small_groups = "remainder"`.
pub const REMAINDER_COLUMN: &str = "airlock_remainder";

fn carry(plan: LogicalPlan) -> Result<Transformed<LogicalPlan>> {
    let marker = |p: &LogicalPlan| {
        p.schema()
            .fields()
            .iter()
            .any(|f| f.name() == REMAINDER_COLUMN)
    };
    let marker_to_carry =
        matches!(&plan, LogicalPlan::Projection(p) if marker(&p.input) && !marker(&plan));
    let hidden_below = plan.inputs().iter().any(|i| !hidden(i.schema()).is_empty());
    if !marker_to_carry && !hidden_below {
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
            if let Some((q, f)) = p
                .input
                .schema()
                .iter()
                .find(|(_, f)| f.name() == REMAINDER_COLUMN)
                && !p
                    .schema
                    .fields()
                    .iter()
                    .any(|f| f.name() == REMAINDER_COLUMN)
            {
                exprs.push(Expr::Column(Column::new(q.cloned(), f.name())));
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
    let mut slots: BTreeMap<(String, usize), (u64, bool, DataType)> = BTreeMap::new();
    for input in &u.inputs {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        let mut mine = BTreeMap::new();
        for c in hidden(input.schema()) {
            let Some(e) = EntityColumn::parse(&c.name) else {
                continue;
            };
            let slot = seen.entry(e.table.clone()).or_insert(0);
            let t = input.schema().field_from_column(&c)?.data_type().clone();
            let entry = slots
                .entry((e.table.clone(), *slot))
                .or_insert((e.k, e.remainder, t));
            entry.0 = entry.0.max(e.k);
            entry.1 &= e.remainder;
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
        for ((table, slot), (k, remainder, data_type)) in &slots {
            let name = EntityColumn {
                id: format!("u{id}s{slot}"),
                k: *k,
                remainder: *remainder,
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
/// where every count reaches its k (or, in remainder mode, merges the others).
fn threshold(a: Aggregate) -> Result<LogicalPlan> {
    let entities = hidden(a.input.schema());
    let remainder = entities
        .iter()
        .any(|c| EntityColumn::parse(&c.name).is_some_and(|e| e.remainder));
    let plain_groups = !a.group_expr.is_empty()
        && !a
            .group_expr
            .iter()
            .any(|e| matches!(e, Expr::GroupingSet(_)));
    if remainder && plain_groups {
        return threshold_with_remainder(a);
    }
    let original: Vec<Expr> = a
        .schema
        .iter()
        .map(|(q, f)| Expr::Column(Column::new(q.cloned(), f.name())))
        .collect();
    let (counts, predicate) = entity_counts(&entities);
    let mut aggr = a.aggr_expr.clone();
    aggr.extend(counts);
    let grouped = LogicalPlan::Aggregate(Aggregate::try_new(a.input, a.group_expr, aggr)?);
    let kept = LogicalPlan::Filter(Filter::try_new(counted(predicate), Arc::new(grouped))?);
    LogicalPlanBuilder::from(kept).project(original)?.build()
}

/// The entity counts and the condition that every one reaches its k.
fn entity_counts(entities: &[Column]) -> (Vec<Expr>, Expr) {
    let mut aggr = Vec::with_capacity(entities.len());
    let mut conditions = Vec::with_capacity(entities.len());
    for (i, c) in entities.iter().enumerate() {
        let k = EntityColumn::parse(&c.name).map_or(u64::MAX, |e| e.k);
        let name = format!("{HIDDEN_PREFIX}count_{i}");
        aggr.push(reaches_k(Expr::Column(c.clone()), k).alias(&name));
        conditions.push(
            Expr::Column(Column::from_name(&name)).gt_eq(lit(i64::try_from(k).unwrap_or(i64::MAX))),
        );
    }
    (
        aggr,
        conditions
            .into_iter()
            .reduce(Expr::and)
            .unwrap_or_else(|| lit(true)),
    )
}

/// `small_groups = "remainder"` (§3.4): groups below k are merged into one row whose
/// group keys are NULL, released only if it reaches k itself. A boolean column
/// [`REMAINDER_COLUMN`] tells that row from a real group whose key is NULL.
///
/// The input is used twice: once for the per-group counts, and once, joined (NULL-safe)
/// to the keys of the small groups, to aggregate those groups' rows together.
fn threshold_with_remainder(a: Aggregate) -> Result<LogicalPlan> {
    let entities = hidden(a.input.schema());
    let (counts, passes) = entity_counts(&entities);
    let mut aggr = a.aggr_expr.clone();
    aggr.extend(counts.iter().cloned());
    let key_names: Vec<Column> = a
        .schema
        .iter()
        .take(a.group_expr.len())
        .map(|(q, f)| Column::new(q.cloned(), f.name()))
        .collect();
    let original: Vec<Expr> = a
        .schema
        .iter()
        .map(|(q, f)| Expr::Column(Column::new(q.cloned(), f.name())))
        .collect();
    let counted = LogicalPlan::Aggregate(Aggregate::try_new(
        Arc::clone(&a.input),
        a.group_expr.clone(),
        aggr.clone(),
    )?);

    // Groups that reach k, as they are.
    let mut passing_cols = original.clone();
    passing_cols.push(lit(false).alias(REMAINDER_COLUMN));
    let passing = LogicalPlanBuilder::from(counted.clone())
        .filter(self::counted(passes.clone()))?
        .project(passing_cols)?
        .build()?;

    // The keys of the groups that do not.
    let small_keys: Vec<Expr> = key_names
        .iter()
        .enumerate()
        .map(|(j, c)| Expr::Column(c.clone()).alias(format!("{HIDDEN_PREFIX}small_{j}")))
        .collect();
    let small = LogicalPlanBuilder::from(counted)
        .filter(datafusion::logical_expr::not(passes.clone()))?
        .project(small_keys)?
        .build()?;

    // Their rows, aggregated together.
    let mut keyed: Vec<Expr> = a
        .input
        .schema()
        .iter()
        .map(|(q, f)| Expr::Column(Column::new(q.cloned(), f.name())))
        .collect();
    keyed.extend(
        a.group_expr
            .iter()
            .enumerate()
            .map(|(j, e)| e.clone().alias(format!("{HIDDEN_PREFIX}key_{j}"))),
    );
    let left_keys: Vec<Column> = (0..key_names.len())
        .map(|j| Column::from_name(format!("{HIDDEN_PREFIX}key_{j}")))
        .collect();
    let right_keys: Vec<Column> = (0..key_names.len())
        .map(|j| Column::from_name(format!("{HIDDEN_PREFIX}small_{j}")))
        .collect();
    let merged = LogicalPlanBuilder::from(Arc::unwrap_or_clone(a.input))
        .project(keyed)?
        .join_detailed(
            small,
            datafusion::logical_expr::JoinType::Inner,
            (left_keys, right_keys),
            None,
            datafusion::common::NullEquality::NullEqualsNull,
        )?
        .aggregate(Vec::<Expr>::new(), aggr)?
        .filter(passes)?
        .build()?;
    let mut remainder_cols: Vec<Expr> = Vec::with_capacity(original.len() + 1);
    for (i, (q, f)) in a.schema.iter().enumerate() {
        if i < key_names.len() {
            remainder_cols.push(
                Expr::Literal(ScalarValue::try_from(f.data_type())?, None)
                    .alias_qualified(q.cloned(), f.name()),
            );
        } else {
            remainder_cols.push(Expr::Column(Column::from_name(f.name())));
        }
    }
    remainder_cols.push(lit(true).alias(REMAINDER_COLUMN));
    let remainder_row = LogicalPlanBuilder::from(merged)
        .project(remainder_cols)?
        .build()?;
    let union = LogicalPlan::Union(Union::try_new_with_loose_types(vec![
        Arc::new(passing),
        Arc::new(remainder_row),
    ])?);
    // A union's columns are unqualified: restore the aggregate's own qualifiers.
    let mut requalified: Vec<Expr> = a
        .schema
        .iter()
        .map(|(q, f)| {
            Expr::Column(Column::from_name(f.name())).alias_qualified(q.cloned(), f.name())
        })
        .collect();
    requalified.push(Expr::Column(Column::from_name(REMAINDER_COLUMN)));
    LogicalPlanBuilder::from(union)
        .project(requalified)?
        .build()
}

/// A pass-through boolean function on the threshold's filter that counts the groups it
/// suppresses, for the audit log and the metrics. Volatile, so no optimizer moves,
/// merges or folds it.
#[derive(Debug)]
pub struct Released {
    signature: datafusion::logical_expr::Signature,
    suppressed: Arc<std::sync::atomic::AtomicU64>,
}

impl PartialEq for Released {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.suppressed, &other.suppressed)
    }
}

impl Eq for Released {}

impl std::hash::Hash for Released {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (Arc::as_ptr(&self.suppressed) as usize).hash(state);
    }
}

impl datafusion::logical_expr::ScalarUDFImpl for Released {
    fn name(&self) -> &str {
        "airlock_released"
    }

    fn signature(&self) -> &datafusion::logical_expr::Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Boolean)
    }

    fn invoke_with_args(
        &self,
        args: datafusion::logical_expr::ScalarFunctionArgs,
    ) -> Result<datafusion::logical_expr::ColumnarValue> {
        let array = args.args[0].clone().into_array(args.number_rows)?;
        let flags = datafusion::common::cast::as_boolean_array(&array)?;
        let kept = flags.true_count();
        self.suppressed.fetch_add(
            (flags.len() - kept) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(datafusion::logical_expr::ColumnarValue::Array(array))
    }
}

/// Wraps a threshold predicate so that the groups it drops are counted.
fn counted(predicate: Expr) -> Expr {
    let udf = datafusion::logical_expr::ScalarUDF::new_from_impl(Released {
        signature: datafusion::logical_expr::Signature::exact(
            vec![DataType::Boolean],
            datafusion::logical_expr::Volatility::Volatile,
        ),
        suppressed: Arc::default(),
    });
    udf.call(vec![predicate])
}

/// The suppressed-group counters of a rewritten plan (read them after execution).
pub fn suppression_counters(plan: &LogicalPlan) -> Vec<Arc<std::sync::atomic::AtomicU64>> {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    let mut out = Vec::new();
    let _ = plan.apply_with_subqueries(|p| {
        p.apply_expressions(|e| {
            e.apply(|e| {
                if let Expr::ScalarFunction(f) = e
                    && let Some(r) =
                        (f.func.inner().as_ref() as &dyn std::any::Any).downcast_ref::<Released>()
                {
                    out.push(Arc::clone(&r.suppressed));
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    });
    out
}
