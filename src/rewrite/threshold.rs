//! The k rule (§3.3): hidden entity columns carried up to the release boundary.
//!
//! The entity columns that [`super::protect`] adds at each protected scan are carried
//! up through projections, filters, aliases and joins (the only nodes the checker lets
//! stand below a boundary) to the first aggregate (or DISTINCT) above them. There, one
//! distinct-entity count per protected scan is added (`airlock_reaches_k`, which counts
//! only up to k: see `reaches.rs`) and a [`Release`] node goes directly above, keeping
//! only groups where every count reaches its table's k. Counting distinct entities, not
//! rows, means join fan-out and one person's many rows do not make a small group look
//! large. A global aggregate over fewer than k entities keeps no row. Each scan
//! occurrence is checked on its own (a self-join needs k entities on each side), which
//! is never weaker than counting their union. Each branch of a conditional aggregate
//! (CASE, FILTER) is counted too, over its own rows (`super::branches`).
//!
//! With `small_groups = "remainder"` (§3.4) the groups below k are merged into one row
//! with NULL keys, itself released only if it reaches k, and marked by the boolean
//! column `airlock_remainder`.

use std::sync::Arc;

use datafusion::common::tree_node::Transformed;
use datafusion::common::{Column, DFSchemaRef, ScalarValue};
use datafusion::error::Result;
use datafusion::logical_expr::{
    Aggregate, Distinct, Expr, Extension, LogicalPlan, LogicalPlanBuilder, Projection, Union, lit,
};

use super::boundary::{COUNT_PREFIX, Release};
use super::protect::EntityColumn;
use super::reaches::reaches_k;
use super::{HIDDEN_PREFIX, is_hidden};

/// Carries the entity columns up and puts a release boundary over every aggregate
/// (or DISTINCT) that consumes them.
/// Aggregates over tables in DP mode get a DP release instead ([`super::dp`]).
pub fn apply(plan: LogicalPlan, ctx: &super::PolicyContext) -> Result<LogicalPlan> {
    plan.transform_up_with_subqueries(|p| carry(p, ctx))
        .map(|t| t.data)
}

/// Hidden entity columns of a schema, with their qualifiers.
pub fn hidden(schema: &DFSchemaRef) -> Vec<Column> {
    schema
        .iter()
        .filter(|(_, f)| EntityColumn::parse(f.name()).is_some())
        .map(|(q, f)| Column::new(q.cloned(), f.name()))
        .collect()
}

/// The column that tells the remainder row (true) from real groups (false), added to
/// results of aggregates over tables with `small_groups = "remainder"`.
pub const REMAINDER_COLUMN: &str = "airlock_remainder";

fn carry(plan: LogicalPlan, ctx: &super::PolicyContext) -> Result<Transformed<LogicalPlan>> {
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
        LogicalPlan::Aggregate(a) => match super::dp::boundary(&a, ctx)? {
            Some(dp) => Ok(Transformed::yes(dp)),
            None => boundary(a).map(Transformed::yes),
        },
        LogicalPlan::Distinct(Distinct::All(input)) => {
            if let Some(t) = hidden(input.schema())
                .iter()
                .find_map(|c| super::dp::dp_table(ctx, &c.name))
            {
                return Err(crate::policy::refusal::Refusal::new(
                    crate::policy::refusal::ReasonCode::DpNotSupported,
                    format!(
                        "{}: DISTINCT is not supported in DP mode (use GROUP BY with COUNT(*))",
                        t.0
                    ),
                )
                .into());
            }
            let groups: Vec<Expr> = input
                .schema()
                .iter()
                .filter(|(_, f)| !is_hidden(f.name()))
                .map(|(q, f)| Expr::Column(Column::new(q.cloned(), f.name())))
                .collect();
            let agg = Aggregate::try_new(input, groups, vec![])?;
            boundary(agg).map(Transformed::yes)
        }
        // Filters, aliases and joins: recompute the schema so the hidden columns pass
        // through. (The checker lets nothing else stand below a boundary.)
        other => Ok(Transformed::yes(other.recompute_schema()?)),
    }
}

fn release(input: LogicalPlan, counts: Vec<(String, u64)>, remainder: bool) -> Result<LogicalPlan> {
    Ok(LogicalPlan::Extension(Extension {
        node: Arc::new(Release::try_new(input, counts, remainder)?),
    }))
}

/// Adds the entity counts to an aggregate over hidden columns and puts the release
/// boundary over it (or, in remainder mode, over the groups and their merged rest).
fn boundary(a: Aggregate) -> Result<LogicalPlan> {
    let entities = hidden(a.input.schema());
    let remainder = entities
        .iter()
        .any(|c| EntityColumn::parse(&c.name).is_some_and(|e| e.remainder));
    if remainder && !a.group_expr.is_empty() {
        return boundary_with_remainder(a);
    }
    let (counts, ks) = entity_counts(&entities, &super::branches::regions(&a.aggr_expr));
    let mut aggr = a.aggr_expr.clone();
    aggr.extend(counts);
    let grouped = LogicalPlan::Aggregate(Aggregate::try_new(a.input, a.group_expr, aggr)?);
    release(grouped, ks, false)
}

/// The entity counts, and each count column's name with its k: one per entity column
/// over the whole group, and one per entity column and region of a conditional
/// aggregate (`super::branches`) over the rows of that region.
fn entity_counts(entities: &[Column], regions: &[Expr]) -> (Vec<Expr>, Vec<(String, u64)>) {
    let mut aggr = Vec::with_capacity(entities.len() * (1 + regions.len()));
    let mut ks = Vec::with_capacity(aggr.capacity());
    for region in std::iter::once(None).chain(regions.iter().map(Some)) {
        for c in entities {
            let k = EntityColumn::parse(&c.name).map_or(u64::MAX, |e| e.k);
            let name = format!("{COUNT_PREFIX}{}", ks.len());
            let count = match (reaches_k(Expr::Column(c.clone()), k), region) {
                (Expr::AggregateFunction(mut f), Some(r)) => {
                    f.params.filter = Some(Box::new(r.clone()));
                    Expr::AggregateFunction(f)
                }
                (count, _) => count,
            };
            aggr.push(count.alias(&name));
            ks.push((name, k));
        }
    }
    (aggr, ks)
}

/// The condition that every count reaches its k (used inside the remainder plan to find
/// the small groups; the boundary itself applies the same rule).
fn passes(ks: &[(String, u64)]) -> Expr {
    ks.iter()
        .map(|(name, k)| {
            Expr::Column(Column::from_name(name)).gt_eq(lit(i64::try_from(*k).unwrap_or(i64::MAX)))
        })
        .reduce(Expr::and)
        .unwrap_or_else(|| lit(true))
}

/// `small_groups = "remainder"` (§3.4): groups below k are merged into one row whose
/// group keys are NULL, released only if it reaches k itself. A boolean column
/// [`REMAINDER_COLUMN`] tells that row from a real group whose key is NULL.
///
/// The input is used twice: once for the per-group counts, and once, joined (NULL-safe)
/// to the keys of the small groups, to aggregate those groups' rows together. The
/// boundary goes over the union of both, so the k rule is applied in one place.
fn boundary_with_remainder(a: Aggregate) -> Result<LogicalPlan> {
    let entities = hidden(a.input.schema());
    let (counts, ks) = entity_counts(&entities, &super::branches::regions(&a.aggr_expr));
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
    let count_cols: Vec<Expr> = ks
        .iter()
        .map(|(name, _)| Expr::Column(Column::from_name(name)))
        .collect();
    let counted = LogicalPlan::Aggregate(Aggregate::try_new(
        Arc::clone(&a.input),
        a.group_expr.clone(),
        aggr.clone(),
    )?);

    // Every group as it is, with its counts (the boundary drops those below k).
    let mut group_cols = original.clone();
    group_cols.push(lit(false).alias(REMAINDER_COLUMN));
    group_cols.extend(count_cols.iter().cloned());
    let groups = LogicalPlanBuilder::from(counted.clone())
        .project(group_cols)?
        .build()?;

    // The keys of the groups below k.
    let small_keys: Vec<Expr> = key_names
        .iter()
        .enumerate()
        .map(|(j, c)| Expr::Column(c.clone()).alias(format!("{HIDDEN_PREFIX}small_{j}")))
        .collect();
    let small = LogicalPlanBuilder::from(counted)
        .filter(datafusion::logical_expr::not(passes(&ks)))?
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
        .build()?;
    let mut remainder_cols: Vec<Expr> = Vec::with_capacity(original.len() + 1 + ks.len());
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
    remainder_cols.extend(count_cols.iter().cloned());
    let remainder_row = LogicalPlanBuilder::from(merged)
        .project(remainder_cols)?
        .build()?;
    let union = LogicalPlan::Union(Union::try_new_with_loose_types(vec![
        Arc::new(groups),
        Arc::new(remainder_row),
    ])?);
    let released = release(union, ks, true)?;
    // A union's columns are unqualified: restore the aggregate's own qualifiers.
    let mut requalified: Vec<Expr> = a
        .schema
        .iter()
        .map(|(q, f)| {
            Expr::Column(Column::from_name(f.name())).alias_qualified(q.cloned(), f.name())
        })
        .collect();
    requalified.push(Expr::Column(Column::from_name(REMAINDER_COLUMN)));
    LogicalPlanBuilder::from(released)
        .project(requalified)?
        .build()
}
