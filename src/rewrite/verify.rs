//! Rule 4: re-walk the final plan and refuse anything that is not provably safe.
//!
//! Checks, fail closed: every node is of a known kind; every scan of a protected table
//! sits directly under the scan rule's projection (masks applied, entity column present
//! when the threshold applies); every aggregate over hidden entity columns carries the
//! entity counts; no window sees them; and no hidden column reaches the output.

use std::sync::Arc;

use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::TreeNode;
use datafusion::error::Result;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::optimizer::AnalyzerRule;

use super::{HIDDEN_PREFIX, PolicyContext, is_hidden};
use crate::policy::refusal::{ReasonCode, Refusal};

#[derive(Debug)]
pub struct VerifyRule {
    ctx: Arc<PolicyContext>,
}

impl VerifyRule {
    pub fn new(ctx: Arc<PolicyContext>) -> Self {
        Self { ctx }
    }
}

fn unclassified(why: String) -> datafusion::error::DataFusionError {
    Refusal::new(ReasonCode::UnclassifiedPlan, why).into()
}

impl AnalyzerRule for VerifyRule {
    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        if let Some(f) = plan.schema().fields().iter().find(|f| is_hidden(f.name())) {
            return Err(unclassified(format!(
                "internal column {} would reach the output",
                f.name()
            )));
        }
        self.check(&plan, None)?;
        Ok(plan)
    }

    fn name(&self) -> &str {
        "airlock_verify"
    }
}

impl VerifyRule {
    fn check(&self, plan: &LogicalPlan, parent: Option<&LogicalPlan>) -> Result<()> {
        let input_hidden = plan
            .inputs()
            .iter()
            .any(|i| i.schema().fields().iter().any(|f| is_hidden(f.name())));
        match plan {
            LogicalPlan::TableScan(scan) => {
                if let Some((name, rules)) = self.ctx.rules(&scan.table_name) {
                    let under_mask = matches!(parent, Some(LogicalPlan::Projection(p))
                        if !rules.automatic() || p.schema.fields().iter().any(|f| super::scan::EntityColumn::parse(f.name()).is_some()));
                    let under_filter = matches!(parent, Some(LogicalPlan::Filter(_)))
                        && rules.row_filter.is_some();
                    if !under_mask && !under_filter {
                        return Err(unclassified(format!(
                            "scan of {name} is not protected by the scan rule"
                        )));
                    }
                }
            }
            LogicalPlan::Aggregate(a) if input_hidden => {
                let counted = a.aggr_expr.iter().any(|e| matches!(e, Expr::Alias(al) if al.name.starts_with(&format!("{HIDDEN_PREFIX}count_"))));
                if !counted {
                    return Err(unclassified(
                        "an aggregate over protected rows has no entity threshold".into(),
                    ));
                }
            }
            LogicalPlan::Window(_) | LogicalPlan::Distinct(_) | LogicalPlan::RecursiveQuery(_)
                if input_hidden =>
            {
                return Err(unclassified(format!(
                    "{} over protected rows",
                    plan.display()
                )));
            }
            LogicalPlan::Projection(_)
            | LogicalPlan::Filter(_)
            | LogicalPlan::Window(_)
            | LogicalPlan::Aggregate(_)
            | LogicalPlan::Sort(_)
            | LogicalPlan::Join(_)
            | LogicalPlan::Repartition(_)
            | LogicalPlan::Union(_)
            | LogicalPlan::EmptyRelation(_)
            | LogicalPlan::Subquery(_)
            | LogicalPlan::SubqueryAlias(_)
            | LogicalPlan::Limit(_)
            | LogicalPlan::Values(_)
            | LogicalPlan::Explain(_)
            | LogicalPlan::Analyze(_)
            | LogicalPlan::Distinct(_)
            | LogicalPlan::Unnest(_)
            | LogicalPlan::RecursiveQuery(_) => {}
            other => {
                return Err(unclassified(format!(
                    "unexpected plan node {}",
                    other.display()
                )));
            }
        }
        // A row-filtered scan sits under Filter under the mask projection; check that pair.
        if let (LogicalPlan::Filter(_), Some(LogicalPlan::TableScan(scan))) =
            (plan, plan.inputs().first().copied())
            && self
                .ctx
                .rules(&scan.table_name)
                .is_some_and(|(_, r)| r.row_filter.is_some())
        {
            let masked = matches!(parent, Some(LogicalPlan::Projection(_)));
            if !masked {
                return Err(unclassified(
                    "a row-filtered scan is not under its mask projection".into(),
                ));
            }
        }
        for e in plan.expressions() {
            let mut subs = Vec::new();
            let _ = e.apply(|e| {
                match e {
                    Expr::ScalarSubquery(s) => subs.push(Arc::clone(&s.subquery)),
                    Expr::InSubquery(s) => subs.push(Arc::clone(&s.subquery.subquery)),
                    Expr::Exists(s) => subs.push(Arc::clone(&s.subquery.subquery)),
                    Expr::SetComparison(s) => subs.push(Arc::clone(&s.subquery.subquery)),
                    _ => {}
                }
                Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
            });
            for s in subs {
                if s.schema().fields().iter().any(|f| is_hidden(f.name())) {
                    return Err(unclassified(
                        "a subquery would expose internal columns".into(),
                    ));
                }
                self.check(&s, None)?;
            }
        }
        for input in plan.inputs() {
            self.check(input, Some(plan))?;
        }
        Ok(())
    }
}
