//! The privacy rewriter: PRIVACY.md §1–3 on every query a principal plans.
//!
//! Version 2 of §3 is an allow-list below a release boundary. One analyzer rule,
//! [`PolicyRule`], runs after DataFusion's type coercion (so implicit casts are seen):
//!
//! 1. [`reserved`]: names starting with `__airlock` or `airlock_` are refused.
//! 2. [`check`]: the one checker walks the plan against the lists in [`allow`]
//!    (operators, functions, casts, aggregate arguments) and returns typed violations;
//!    [`decision`] turns them into release, `APPROVAL_PENDING` or a refusal.
//! 3. On release: [`protect`] puts masks, row filters and a hidden entity column over
//!    each protected scan; [`threshold`] carries the entity columns to the aggregate
//!    that consumes them and puts a [`boundary::Release`] node directly above it (the k
//!    rule, §3.3–3.4); [`total`] puts every expression below a boundary in total form.
//!
//! Then DataFusion optimizes, and [`verify`] re-walks the optimized plan and refuses
//! anything it cannot classify ([`plan`] does both); [`dedupe`] then drops the hidden
//! copy of any entity key the query carries anyway. Principals holding `read` on a
//! table, and owner-approved results, get masks and row filters only.

pub mod allow;
pub mod boundary;
pub mod branches;
pub mod check;
pub mod checked;
pub mod decision;
pub mod dedupe;
pub mod dp;
pub mod dp_release;
pub mod drain;
pub mod explain;
pub mod fingerprint;
pub mod protect;
pub mod reaches;
pub mod reserved;
pub mod threshold;
pub mod total;
pub mod typed;
pub mod verify;

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::common::TableReference;
use datafusion::common::config::ConfigOptions;
use datafusion::error::Result as DFResult;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::optimizer::AnalyzerRule;

use crate::auth::Principal;
use crate::catalog::CATALOG_NAME;
use crate::config::TableName;
use crate::policy::tables::TablePolicy;
use crate::policy::{Action, PolicySnapshot};

/// Prefix of every column the rewriter adds; user columns may not use it.
pub const HIDDEN_PREFIX: &str = "__airlock_";

/// What a principal may do with one protected table, resolved once per session.
#[derive(Debug, Clone)]
pub struct TableRules {
    pub policy: TablePolicy,
    pub aggregate: bool,
    pub request: bool,
    pub read: bool,
    pub unmasked: bool,
    /// The row filters of the principal's roles, AND-ed (the most restrictive reading).
    pub row_filter: Option<Expr>,
    /// The result was approved by an owner (§4): released like `read`, masks still apply.
    pub approved: bool,
}

impl TableRules {
    /// Whether the automatic rules (gate, threshold) apply to this principal.
    pub fn automatic(&self) -> bool {
        !self.read && !self.approved
    }

    /// How a column of this table may be used below a boundary (§3.2).
    pub fn class(&self, column: &str) -> allow::aggregates::ColumnClass {
        use allow::aggregates::ColumnClass;
        if self.policy.privacy_unit.as_deref() == Some(column) {
            ColumnClass::Unit
        } else if self.policy.wipe.contains(column) {
            // In clear for a principal holding `unmasked`: then it is data, not a mask.
            if self.unmasked {
                ColumnClass::NotFilterable
            } else {
                ColumnClass::Wiped
            }
        } else if self.policy.filterable.contains(column) {
            ColumnClass::Filterable
        } else {
            ColumnClass::NotFilterable
        }
    }
}

/// Everything the rules need to know about the principal and the policy.
#[derive(Debug)]
pub struct PolicyContext {
    pub principal: Arc<Principal>,
    pub policy: Arc<PolicySnapshot>,
    pub tables: BTreeMap<TableName, TableRules>,
    /// Plans of this context release an owner-approved result.
    pub approved: bool,
}

impl PolicyContext {
    /// Resolves the principal's rights on every protected table.
    pub fn new(
        principal: Arc<Principal>,
        policy: Arc<PolicySnapshot>,
        catalog: &crate::catalog::Catalog,
    ) -> Self {
        let mut tables = BTreeMap::new();
        // Uploads without a section in tables.toml are protected by the defaults.
        let defaults: Vec<(TableName, TablePolicy)> = catalog
            .uploads()
            .filter(|t| policy.tables.get(t).is_none())
            .filter_map(|t| {
                catalog
                    .schema(t)
                    .map(|s| (t.clone(), TablePolicy::defaults(&s)))
            })
            .collect();
        for (name, tp) in policy
            .tables
            .tables
            .iter()
            .chain(defaults.iter().map(|(n, p)| (n, p)))
        {
            let allows = |a| policy.allows(&principal, name, a);
            let filters: Vec<Expr> = tp
                .row_filters
                .iter()
                .filter(|rf| principal.roles.contains(&rf.role))
                .map(|rf| {
                    catalog
                        .schema(name)
                        .ok_or(())
                        .and_then(|s| {
                            crate::policy::tables::parse_predicate(name, &s, &rf.predicate)
                                .map_err(|_| ())
                        })
                        // A filter that no longer parses lets no row through: fail closed.
                        .unwrap_or_else(|_| datafusion::logical_expr::lit(false))
                })
                .collect();
            let row_filter = filters.into_iter().reduce(Expr::and);
            tables.insert(
                name.clone(),
                TableRules {
                    policy: tp.clone(),
                    aggregate: allows(Action::Aggregate),
                    request: allows(Action::Request),
                    read: allows(Action::Read),
                    unmasked: allows(Action::Unmasked),
                    row_filter,
                    approved: false,
                },
            );
        }
        Self {
            principal,
            policy,
            tables,
            approved: false,
        }
    }

    /// The same rights, for releasing a result an owner approved: no gate and no
    /// threshold, but masks and row filters as always.
    pub fn approved(&self) -> Self {
        let mut tables = self.tables.clone();
        for r in tables.values_mut() {
            r.approved = true;
        }
        Self {
            principal: Arc::clone(&self.principal),
            policy: Arc::clone(&self.policy),
            tables,
            approved: true,
        }
    }

    /// The rules of a scanned table, if it is protected.
    pub fn rules(&self, table: &TableReference) -> Option<(&TableName, &TableRules)> {
        let name = table_name(table)?;
        self.tables.get_key_value(&name)
    }

    /// The session's whole analyzer, in order: DataFusion's grouping-function
    /// resolution and type coercion, then the privacy rule on the typed plan.
    pub fn analyzer_rules(
        self: &Arc<Self>,
        masks: &protect::MaskSecret,
    ) -> Vec<Arc<dyn AnalyzerRule + Send + Sync>> {
        use datafusion::optimizer::analyzer::resolve_grouping_function::ResolveGroupingFunction;
        use datafusion::optimizer::analyzer::type_coercion::TypeCoercion;
        vec![
            Arc::new(ResolveGroupingFunction::new()),
            Arc::new(TypeCoercion::new()),
            Arc::new(PolicyRule::new(Arc::clone(self), masks)),
        ]
    }

    /// Whether a node's expressions run on raw protected rows (below a boundary):
    /// some input carries a hidden entity column.
    fn below_boundary(plan: &LogicalPlan) -> bool {
        plan.inputs()
            .iter()
            .any(|i| !threshold::hidden(i.schema()).is_empty())
    }
}

/// The privacy rule: checks, decides, and rewrites a plan for one principal.
#[derive(Debug)]
pub struct PolicyRule {
    ctx: Arc<PolicyContext>,
    /// The salt of `hash` masks: stable for the life of the process (or cluster) and policy.
    salt: Arc<str>,
}

impl PolicyRule {
    pub fn new(ctx: Arc<PolicyContext>, masks: &protect::MaskSecret) -> Self {
        let salt = masks.salt(&ctx.policy.digest);
        Self { ctx, salt }
    }
}

impl AnalyzerRule for PolicyRule {
    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> DFResult<LogicalPlan> {
        reserved::check(&plan)?;
        if !self.ctx.approved {
            let analysis = check::analyze(&plan, &self.ctx);
            if let Some(r) = decision::refusal(decision::decide(analysis, &self.ctx)) {
                return Err(r.into());
            }
        }
        let plan = protect::apply(plan, &self.ctx, &self.salt)?;
        // The entity columns reach every node below a boundary only once carried up.
        let plan = threshold::apply(plan, &self.ctx)?;
        let plan = dp::finish(plan, &self.ctx)?;
        total::rewrite(plan, &PolicyContext::below_boundary)
    }

    fn name(&self) -> &str {
        "airlock_policy"
    }
}

/// Analyzes, optimizes and verifies `plan` in `state`: the only way a plan of a
/// principal's session becomes executable.
pub fn plan(
    state: &datafusion::execution::session_state::SessionState,
    ctx: &PolicyContext,
    plan: &LogicalPlan,
) -> DFResult<LogicalPlan> {
    // A panic inside DataFusion's analyzer or optimizer on some plan is a defect, but
    // must not take the request's task (or, with panic = abort, the server) down: it
    // becomes an internal error, and nothing runs.
    let optimized = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| state.optimize(plan)))
        .map_err(|_| {
            tracing::error!("the optimizer panicked on a plan; refused");
            datafusion::error::DataFusionError::Internal(
                "the query planner failed on this query".into(),
            )
        })??;
    verify::verify(&optimized, ctx)?;
    typed::check(&optimized)?;
    // Only after the verifier accepted it: one column per entity key (values that are
    // equal by construction). Should it fail, the verified plan runs as it is.
    let deduped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        dedupe::apply(optimized.clone())
    }));
    match deduped {
        Ok(Ok(plan)) => Ok(plan),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "entity columns not deduplicated");
            Ok(optimized)
        }
        Err(_) => {
            tracing::error!("deduplicating entity columns panicked; the verified plan runs");
            Ok(optimized)
        }
    }
}

/// The catalog table a scan reads, as `schema.table`.
pub fn table_name(table: &TableReference) -> Option<TableName> {
    match table {
        TableReference::Partial { schema, table } => {
            TableName::parse(&format!("{schema}.{table}")).ok()
        }
        TableReference::Full {
            catalog,
            schema,
            table,
        } if catalog.as_ref() == CATALOG_NAME => {
            TableName::parse(&format!("{schema}.{table}")).ok()
        }
        _ => None,
    }
}

/// Whether a column name is one the rewriter added.
pub fn is_hidden(name: &str) -> bool {
    name.starts_with(HIDDEN_PREFIX)
}
