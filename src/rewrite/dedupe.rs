//! One column per entity key, after the plan is verified.
//!
//! [`super::protect`] adds the entity key as a hidden column of its own
//! (`l_orderkey AS __airlock_entity#…`), so that no analyst projection can rename or
//! recompute it on its way to the boundary. When the query uses the key itself (TPC-H
//! joins on `l_orderkey = o_orderkey`), every scan, repartition and join below carries
//! the same values twice: 50 ms of a 460 ms TPC-H q5 on this machine.
//!
//! This pass runs on the optimized plan after [`super::verify`] accepted it, and only
//! changes *which column* holds values that are equal by construction:
//!
//! - at a [`Protect`](super::protect::Protect) whose entity is a plain column `U AS E`
//!   and which also outputs `U` unmasked, `E` is dropped: `U` holds the same values on
//!   every row;
//! - up through projections, filters, subquery aliases and inner or outer joins, `E`
//!   stays dropped while a column equal to it is carried, and is put back (`U AS E`) at
//!   the first projection that keeps none of them;
//! - an inner join's `a = b` (both plain columns of one exact type: integers, strings,
//!   dates, decimals, booleans; never floats, where `-0.0 = 0.0`) makes `a` and `b`
//!   equal on every row it outputs, so an entity equal to one is equal to the other;
//! - the boundary's aggregate reads the column that holds the values.
//!
//! It starts only at a threshold [`Release`](super::boundary::Release) over an
//! aggregate, stops at any other node (which is left exactly as it was), and keeps the
//! aggregate's output schema exactly: if anything does not fit, the aggregate is left as
//! the verifier saw it, and every count must read a column of the entity's own type.
//! Counting the same values from another column gives the same counts, so the k rule's
//! decisions do not change (`tests/integration/entity_columns.rs` and the property test
//! compare every release with the owner's view).

use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, ExprSchema};
use datafusion::error::Result;
use datafusion::logical_expr::{
    Aggregate, Expr, Extension, Filter, JoinType, LogicalPlan, Projection, SubqueryAlias,
};

use super::boundary::as_release;
use super::protect::{EntityColumn, as_protect};

/// For each hidden entity column a node's new output no longer carries: the columns of
/// the new output that hold its values on every row (never empty).
type Same = Vec<(Column, Vec<Column>)>;

/// Drops the hidden copy of every entity key the plan carries anyway.
pub fn apply(plan: LogicalPlan) -> Result<LogicalPlan> {
    plan.transform_down_with_subqueries(|node| {
        let Some(release) = as_release(&node) else {
            return Ok(Transformed::no(node));
        };
        let LogicalPlan::Aggregate(aggregate) = &release.input else {
            return Ok(Transformed::no(node));
        };
        let Some(input) = boundary_aggregate(aggregate)? else {
            return Ok(Transformed::no(node));
        };
        let LogicalPlan::Extension(ext) = &node else {
            return Ok(Transformed::no(node));
        };
        let rebuilt = ext
            .node
            .with_exprs_and_inputs(ext.node.expressions(), vec![input])?;
        Ok(Transformed::yes(LogicalPlan::Extension(Extension {
            node: rebuilt,
        })))
    })
    .map(|t| t.data)
}

/// The boundary's aggregate over the deduplicated input, or `None` to keep it as it is.
fn boundary_aggregate(a: &Aggregate) -> Result<Option<LogicalPlan>> {
    let (input, same) = node(&a.input)?;
    if input == *a.input {
        return Ok(None);
    }
    // Every count must read a column of the entity's own type.
    for (entity, equal) in &same {
        let before = a.input.schema().field_from_column(entity)?.data_type();
        let after = input.schema().field_from_column(&equal[0])?.data_type();
        if before != after {
            return Ok(None);
        }
    }
    // A group key on an entity column would change the output's names: keep it as is.
    if a.group_expr.iter().any(|g| mentions(g, &same)) {
        return Ok(None);
    }
    let aggr = a
        .aggr_expr
        .iter()
        .map(|e| replace(e.clone(), &same))
        .collect::<Result<Vec<_>>>()?;
    let new = Aggregate::try_new(Arc::new(input), a.group_expr.clone(), aggr)?;
    let kept = new.schema.fields().len() == a.schema.fields().len()
        && new
            .schema
            .iter()
            .zip(a.schema.iter())
            .all(|((nq, nf), (oq, of))| {
                nq == oq && nf.name() == of.name() && nf.data_type() == of.data_type()
            });
    Ok(kept.then_some(LogicalPlan::Aggregate(new)))
}

/// Rewrites one node below a boundary's aggregate: the new node and what it dropped.
/// Nodes this pass does not know are returned unchanged, with nothing dropped.
fn node(plan: &LogicalPlan) -> Result<(LogicalPlan, Same)> {
    if let Some(p) = as_protect(plan) {
        return protect(p);
    }
    match plan {
        LogicalPlan::Projection(p) => projection(p),
        LogicalPlan::Filter(f) => {
            let (input, same) = node(&f.input)?;
            let predicate = replace(f.predicate.clone(), &same)?;
            let filter = Filter::try_new(predicate, Arc::new(input))?;
            Ok((LogicalPlan::Filter(filter), same))
        }
        LogicalPlan::SubqueryAlias(s) => {
            let (input, same) = node(&s.input)?;
            let alias = SubqueryAlias::try_new(Arc::new(input), s.alias.clone())?;
            let requalify = |c: &Column| Column::new(Some(s.alias.clone()), &c.name);
            let same = same
                .iter()
                .map(|(e, cs)| (requalify(e), cs.iter().map(requalify).collect()))
                .collect();
            Ok((LogicalPlan::SubqueryAlias(alias), same))
        }
        LogicalPlan::Join(j)
            if matches!(
                j.join_type,
                JoinType::Inner | JoinType::Left | JoinType::Right | JoinType::Full
            ) =>
        {
            let (left, mut same) = node(&j.left)?;
            let (right, same_right) = node(&j.right)?;
            same.extend(same_right);
            let mut join = j.clone();
            join.left = Arc::new(left);
            join.right = Arc::new(right);
            join.on =
                j.on.iter()
                    .map(|(l, r)| Ok((replace(l.clone(), &same)?, replace(r.clone(), &same)?)))
                    .collect::<Result<Vec<_>>>()?;
            join.filter = j.filter.clone().map(|f| replace(f, &same)).transpose()?;
            if j.join_type == JoinType::Inner {
                let pairs: Vec<(&Column, &Column)> = join
                    .on
                    .iter()
                    .filter_map(|(l, r)| match (l, r) {
                        (Expr::Column(a), Expr::Column(b)) if exact_equality(&join, a, b) => {
                            Some((a, b))
                        }
                        _ => None,
                    })
                    .collect();
                // Until nothing changes: `b = c` then `a = b` still joins `a` to `c`.
                while pairs.iter().any(|(a, b)| equate(&mut same, a, b)) {}
            }
            Ok((LogicalPlan::Join(join).recompute_schema()?, same))
        }
        other => Ok((other.clone(), Vec::new())),
    }
}

/// `U AS E` next to a plain `U`: drop `E`.
fn protect(p: &super::protect::Protect) -> Result<(LogicalPlan, Same)> {
    let plain = |c: &Column| {
        p.exprs
            .iter()
            .any(|e| matches!(e, Expr::Column(x) if x == c))
    };
    let mut drop = Vec::new();
    let mut same = Same::new();
    for (i, e) in p.exprs.iter().enumerate() {
        let (qualifier, field) = p.schema.qualified_field(i);
        if EntityColumn::parse(field.name()).is_none() {
            continue;
        }
        if let Expr::Alias(alias) = e
            && let Expr::Column(unit) = alias.expr.as_ref()
            && plain(unit)
        {
            drop.push(i);
            same.push((
                Column::new(qualifier.cloned(), field.name()),
                vec![unit.clone()],
            ));
        }
    }
    if drop.is_empty() {
        return Ok((wrap(p.clone()), same));
    }
    Ok((wrap(p.without(&drop)?), same))
}

fn wrap(p: super::protect::Protect) -> LogicalPlan {
    LogicalPlan::Extension(Extension { node: Arc::new(p) })
}

/// A projection keeps a dropped entity dropped while it outputs a column equal to it,
/// and puts it back (`U AS E`) otherwise.
fn projection(p: &Projection) -> Result<(LogicalPlan, Same)> {
    let (input, same) = node(&p.input)?;
    let outputs_plain = |c: &Column| {
        p.expr
            .iter()
            .any(|e| matches!(e, Expr::Column(x) if x == c))
    };
    let mut exprs = Vec::with_capacity(p.expr.len());
    let mut kept_out = Same::new();
    // Entities put back here, with the columns equal to them.
    let mut restored: Vec<(Column, Vec<Column>)> = Vec::new();
    for e in &p.expr {
        let dropped = match e {
            Expr::Column(c) => same.iter().find(|(entity, _)| entity == c),
            _ => None,
        };
        let Some((entity, equal)) = dropped else {
            exprs.push(replace(e.clone(), &same)?);
            continue;
        };
        let carried: Vec<Column> = equal.iter().filter(|c| outputs_plain(c)).cloned().collect();
        if !carried.is_empty() {
            kept_out.push((entity.clone(), carried));
            continue;
        }
        if let Some((other, _)) = restored
            .iter()
            .find(|(_, cs)| cs.iter().any(|c| equal.contains(c)))
        {
            kept_out.push((entity.clone(), vec![other.clone()]));
            continue;
        }
        exprs.push(
            Expr::Column(equal[0].clone())
                .alias_qualified(entity.relation.clone(), entity.name.clone()),
        );
        restored.push((entity.clone(), equal.clone()));
    }
    let projection = Projection::try_new(exprs, Arc::new(input))?;
    Ok((LogicalPlan::Projection(projection), kept_out))
}

/// Every reference to a dropped entity, read from a column equal to it.
fn replace(expr: Expr, same: &Same) -> Result<Expr> {
    if same.is_empty() {
        return Ok(expr);
    }
    expr.transform(|e| match e {
        Expr::Column(c) => match same.iter().find(|(entity, _)| *entity == c) {
            Some((_, equal)) => Ok(Transformed::yes(Expr::Column(equal[0].clone()))),
            None => Ok(Transformed::no(Expr::Column(c))),
        },
        other => Ok(Transformed::no(other)),
    })
    .map(|t| t.data)
}

fn mentions(expr: &Expr, same: &Same) -> bool {
    expr.column_refs()
        .iter()
        .any(|c| same.iter().any(|(entity, _)| entity == *c))
}

/// After an inner join on `a = b`, a column equal to `a` is equal to `b` too. Whether
/// anything was added.
fn equate(same: &mut Same, a: &Column, b: &Column) -> bool {
    let mut added = false;
    for (_, equal) in same.iter_mut() {
        let has_a = equal.contains(a);
        let has_b = equal.contains(b);
        if has_a && !has_b {
            equal.push(b.clone());
            added = true;
        } else if has_b && !has_a {
            equal.push(a.clone());
            added = true;
        }
    }
    added
}

/// Whether `a = b` holds only for identical values: both of one type that [`exact`].
fn exact_equality(join: &datafusion::logical_expr::Join, a: &Column, b: &Column) -> bool {
    let type_of = |c: &Column| {
        join.left
            .schema()
            .field_from_column(c)
            .or_else(|_| join.right.schema().field_from_column(c))
            .map(|f| f.data_type().clone())
            .ok()
    };
    match (type_of(a), type_of(b)) {
        (Some(ta), Some(tb)) => ta == tb && exact(&ta),
        _ => false,
    }
}

/// Types whose equal values are identical values (the same entity for
/// `airlock_reaches_k`, which hashes them). Not floats (`-0.0 = 0.0`, and NaN), and
/// nothing not listed.
fn exact(t: &DataType) -> bool {
    use DataType::*;
    matches!(
        t,
        Int8 | Int16
            | Int32
            | Int64
            | UInt8
            | UInt16
            | UInt32
            | UInt64
            | Utf8
            | LargeUtf8
            | Utf8View
            | Date32
            | Date64
            | Boolean
            | Decimal128(_, _)
            | Decimal256(_, _)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_types_whose_equal_values_are_identical_equate_columns() {
        use DataType::*;
        for (t, expected) in [
            (Int64, true),
            (UInt32, true),
            (Utf8, true),
            (Utf8View, true),
            (Date32, true),
            (Decimal128(15, 2), true),
            (Float64, false),
            (Float32, false),
            (Float16, false),
            (Null, false),
            (Binary, false),
        ] {
            assert_eq!(exact(&t), expected, "{t}");
        }
    }

    #[test]
    fn an_inner_join_key_joins_the_columns_equal_to_either_side() {
        let c = |n: &str| Column::new(Some("t"), n);
        let mut same: Same = vec![(c("e0"), vec![c("a")]), (c("e1"), vec![c("x")])];
        assert!(equate(&mut same, &c("a"), &c("b")));
        assert!(equate(&mut same, &c("y"), &c("x")));
        assert!(!equate(&mut same, &c("y"), &c("x")));
        assert_eq!(same[0].1, vec![c("a"), c("b")]);
        assert_eq!(same[1].1, vec![c("x"), c("y")]);
    }
}
