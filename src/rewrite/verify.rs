//! The verifier: re-walks the optimized plan and refuses anything not provably safe.
//!
//! It runs after DataFusion's optimizer (an optimizer rule may be skipped on failure, and
//! rules move predicates, merge projections and fold constants), on the plan that will
//! execute. Fail closed, with `UNCLASSIFIED_PLAN`:
//!
//! - every scan of a protected table sits directly under its [`Protect`] node, whose wiped
//!   columns are masks (unless the principal holds `unmasked`);
//! - every `Protect` that carries an entity column (the k rule applies) is below a
//!   [`Release`] boundary; every boundary's counts are `airlock_reaches_k` aggregates;
//! - below a boundary stand only the nodes the checker allows (plus the rewriter's own
//!   remainder plan), and every expression there is in total form ([`total::not_total`]):
//!   an optimizer rule that moved an analyst's expression across the boundary would have
//!   to move it into this region, where it is re-checked;
//! - no hidden column reaches the output;
//! - no `now()`, `current_date()` or `current_time()` is left anywhere, subqueries
//!   included: the optimizer fixes them to the query's start, and one it did not fix
//!   (DataFusion leaves some in scalar subqueries) fails when it runs, after a DP query
//!   was charged. Refused here with `FUNCTION_NOT_ALLOWED`, before anything runs.

use datafusion::common::DFSchema;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::{Expr, LogicalPlan, Volatility};

use super::boundary::{COUNT_PREFIX, as_release};
use super::protect::{EntityColumn, as_mask, as_protect};
use super::{PolicyContext, is_hidden, total};
use crate::policy::refusal::{ReasonCode, Refusal};

/// Verifies an optimized plan for the principal of `ctx`.
pub fn verify(plan: &LogicalPlan, ctx: &PolicyContext) -> Result<(), Refusal> {
    if let Some(f) = plan.schema().fields().iter().find(|f| is_hidden(f.name())) {
        return Err(unclassified(format!(
            "internal column {} would reach the output",
            f.name()
        )));
    }
    unfixed_time(plan)?;
    Verifier { ctx }.node(plan, Region::Released)
}

/// A function whose value is fixed at planning (volatility `Stable`: `now()`,
/// `current_date()`, `current_time()`) that the optimizer left in the plan. DataFusion
/// cannot run one: its `invoke` is an internal error by design.
fn unfixed_time(plan: &LogicalPlan) -> Result<(), Refusal> {
    let mut found = None;
    let _ = plan.apply_with_subqueries(|p| {
        p.apply_expressions(|e| {
            e.apply(|e| {
                if let Expr::ScalarFunction(f) = e
                    && f.func.signature().volatility == Volatility::Stable
                {
                    found = Some(f.name().to_string());
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    });
    match found {
        Some(name) => Err(Refusal::new(
            ReasonCode::FunctionNotAllowed,
            format!(
                "{name}() could not be fixed to the query's start time where it stands \
                 (inside a subquery); write the time as a literal"
            ),
        )),
        None => Ok(()),
    }
}

fn unclassified(why: String) -> Refusal {
    Refusal::new(ReasonCode::UnclassifiedPlan, why)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Region {
    /// Above every boundary: released data.
    Released,
    /// Below a boundary.
    Below { remainder: bool },
}

struct Verifier<'a> {
    ctx: &'a PolicyContext,
}

impl Verifier<'_> {
    fn node(&self, plan: &LogicalPlan, region: Region) -> Result<(), Refusal> {
        self.subqueries(plan)?;
        if let Some(r) = as_release(plan) {
            self.counts(
                &r.input,
                &r.counts.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            )?;
            return self.node(
                &r.input,
                Region::Below {
                    remainder: r.remainder,
                },
            );
        }
        if let Some(d) = super::dp_release::as_dp_release(plan) {
            // Its input: one row per protected row, under the same rules as below a
            // threshold boundary, with no aggregate of its own (the node aggregates).
            if region != Region::Released {
                return Err(unclassified("a DP release below another boundary".into()));
            }
            let unit = d.input.schema().field(0).name().clone();
            if EntityColumn::parse(&unit).is_none() {
                return Err(unclassified(format!(
                    "the DP release of {} is not fed its privacy units",
                    d.table
                )));
            }
            return self.node(&d.input, Region::Below { remainder: false });
        }
        if let Some(p) = as_protect(plan) {
            return self.protect(p, region);
        }
        if let LogicalPlan::TableScan(scan) = plan
            && let Some((name, _)) = self.ctx.rules(&scan.table_name)
        {
            return Err(unclassified(format!(
                "scan of {name} is not under its masks and row filters"
            )));
        }
        if let Region::Below { remainder } = region {
            self.below(plan, remainder)?;
        }
        for input in plan.inputs() {
            self.node(input, region)?;
        }
        Ok(())
    }

    fn protect(&self, p: &super::protect::Protect, region: Region) -> Result<(), Refusal> {
        let LogicalPlan::TableScan(scan) = &p.input else {
            return Err(unclassified(format!(
                "the masks of {} are not directly over its scan",
                p.table
            )));
        };
        let Some((name, rules)) = self.ctx.rules(&scan.table_name) else {
            return Err(unclassified(format!(
                "masks over a table the policy does not know: {}",
                p.table
            )));
        };
        if name.to_string() != p.table {
            return Err(unclassified(format!(
                "the masks of {} sit over a scan of {name}",
                p.table
            )));
        }
        if !rules.unmasked {
            for (e, f) in p.exprs.iter().zip(p.schema.fields()) {
                if rules.policy.wipe.contains(f.name()) && as_mask(e).is_none() {
                    return Err(unclassified(format!(
                        "{name}.{} leaves without its mask",
                        f.name()
                    )));
                }
            }
        }
        if rules.row_filter.is_some() != p.row_filter.is_some() {
            return Err(unclassified(format!("the row filter of {name} is missing")));
        }
        let counted = p
            .schema
            .fields()
            .iter()
            .any(|f| EntityColumn::parse(f.name()).is_some());
        if rules.automatic() && !counted {
            return Err(unclassified(format!(
                "rows of {name} are not counted for the k rule"
            )));
        }
        if counted && region == Region::Released {
            return Err(unclassified(format!(
                "rows of {name} reach the output without a release boundary"
            )));
        }
        if let Some(e) = scan
            .filters
            .iter()
            .find_map(|e| total::not_total(e, scan.projected_schema.as_ref()))
        {
            return Err(unclassified(format!("{e} in the scan of {name}")));
        }
        Ok(())
    }

    /// A node below a boundary: an allowed kind, every expression total.
    fn below(&self, plan: &LogicalPlan, remainder: bool) -> Result<(), Refusal> {
        let allowed = match plan {
            LogicalPlan::Projection(_)
            | LogicalPlan::Filter(_)
            | LogicalPlan::SubqueryAlias(_)
            | LogicalPlan::Join(_)
            | LogicalPlan::Aggregate(_)
            | LogicalPlan::TableScan(_)
            | LogicalPlan::Values(_)
            | LogicalPlan::EmptyRelation(_)
            | LogicalPlan::Subquery(_) => true,
            LogicalPlan::Union(_) => remainder,
            LogicalPlan::Extension(_) => false,
            _ => false,
        };
        if !allowed {
            return Err(unclassified(format!(
                "{} below a release boundary",
                plan.display()
            )));
        }
        let inputs = plan.inputs();
        let schema = match (plan, inputs.as_slice()) {
            (LogicalPlan::Join(j), _) => j
                .left
                .schema()
                .join(j.right.schema())
                .map_err(|e| unclassified(format!("join schema: {e}")))?,
            (_, [first, ..]) => first.schema().as_ref().clone(),
            _ => DFSchema::empty(),
        };
        for e in plan.expressions() {
            if let Some(what) = total::not_total(&e, &schema) {
                return Err(unclassified(format!(
                    "{what} below a release boundary, in {}",
                    plan.display()
                )));
            }
        }
        Ok(())
    }

    /// The count columns of a boundary are computed by `airlock_reaches_k`.
    fn counts(&self, plan: &LogicalPlan, names: &[&str]) -> Result<(), Refusal> {
        match plan {
            LogicalPlan::Aggregate(a) => {
                for n in names {
                    let computed = a.aggr_expr.iter().any(|e| match e {
                        Expr::Alias(al) if al.name == *n => matches!(
                            al.expr.as_ref(),
                            Expr::AggregateFunction(f) if f.func.name() == super::reaches::NAME
                        ),
                        _ => false,
                    });
                    if !computed {
                        return Err(unclassified(format!(
                            "the boundary's count {n} is not an entity count"
                        )));
                    }
                }
                Ok(())
            }
            LogicalPlan::Projection(p) => {
                // Counts pass through projections as plain columns.
                for n in names {
                    let passes = p.expr.iter().any(|e| match e {
                        Expr::Column(c) => c.name == *n,
                        Expr::Alias(al) => {
                            al.name == *n
                                && matches!(al.expr.as_ref(), Expr::Column(c) if c.name == *n)
                        }
                        _ => false,
                    });
                    if !passes {
                        return Err(unclassified(format!(
                            "the boundary's count {n} is computed, not counted"
                        )));
                    }
                }
                self.counts(&p.input, names)
            }
            LogicalPlan::SubqueryAlias(s) => self.counts(&s.input, names),
            LogicalPlan::Union(u) => u.inputs.iter().try_for_each(|i| self.counts(i, names)),
            other => Err(unclassified(format!(
                "a release boundary over {} instead of its aggregate",
                other.display()
            ))),
        }
    }

    fn subqueries(&self, plan: &LogicalPlan) -> Result<(), Refusal> {
        use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
        let mut subs = Vec::new();
        for e in plan.expressions() {
            let _ = e.apply(|e| {
                match e {
                    Expr::ScalarSubquery(s) => subs.push(s.subquery.clone()),
                    Expr::InSubquery(s) => subs.push(s.subquery.subquery.clone()),
                    Expr::Exists(s) => subs.push(s.subquery.subquery.clone()),
                    Expr::SetComparison(s) => subs.push(s.subquery.subquery.clone()),
                    _ => {}
                }
                Ok(TreeNodeRecursion::Continue)
            });
        }
        for s in subs {
            if s.schema()
                .fields()
                .iter()
                .any(|f| is_hidden(f.name()) && !f.name().starts_with(COUNT_PREFIX))
            {
                return Err(unclassified(
                    "a subquery would expose internal columns".into(),
                ));
            }
            self.node(&s, Region::Released)?;
        }
        Ok(())
    }
}
