//! The privacy rewriter: DataFusion analyzer rules that enforce PRIVACY.md §1–3.
//!
//! They run with DataFusion's own analyzer rules (see
//! [`PolicyContext::analyzer_rules`] for the exact order), on every query a principal
//! plans:
//!
//! 1. [`gate::PolicyGate`]: computes the plan's lineage ([`lineage`]), collects every
//!    violation of the automatic rules (the aggregate-only gate and allow-list in
//!    [`gate`], the rejections of §3.6 in [`reject`]) and decides, for the whole query:
//!    release, approval (`APPROVAL_PENDING`), or refusal with a stable reason code.
//! 2. [`scan::ScanRule`]: row filters and masks directly above each protected scan,
//!    plus a hidden entity column for every table the threshold must count.
//! 3. [`threshold::ThresholdRule`]: carries the hidden entity columns up to the first
//!    aggregate (or DISTINCT) over them and keeps only groups with at least k distinct
//!    entities of every protected table behind them.
//! 4. [`verify::VerifyRule`]: re-walks the final plan and refuses anything it cannot
//!    classify or any hidden column that was not consumed. Fail closed.
//!
//! Principals holding `read` on a table see its rows (masks and row filters still apply),
//! so for them the table is not subject to the gate and the threshold.

pub mod explain;
pub mod gate;
pub mod lineage;
pub mod reaches;
pub mod reject;
pub mod scan;
pub mod threshold;
pub mod verify;

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::common::TableReference;
use datafusion::logical_expr::Expr;
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

    /// The session's whole analyzer, in order. The gate judges the plan as written;
    /// the scan rule's masks go through DataFusion's type coercion; the threshold and
    /// the verifier see the final, typed plan.
    pub fn analyzer_rules(self: &Arc<Self>) -> Vec<Arc<dyn AnalyzerRule + Send + Sync>> {
        use datafusion::optimizer::analyzer::resolve_grouping_function::ResolveGroupingFunction;
        use datafusion::optimizer::analyzer::type_coercion::TypeCoercion;
        if self.approved {
            return vec![
                Arc::new(ResolveGroupingFunction::new()),
                Arc::new(scan::ScanRule::new(Arc::clone(self))),
                Arc::new(TypeCoercion::new()),
                Arc::new(verify::VerifyRule::new(Arc::clone(self))),
            ];
        }
        vec![
            Arc::new(ResolveGroupingFunction::new()),
            Arc::new(gate::PolicyGate::new(Arc::clone(self))),
            Arc::new(scan::ScanRule::new(Arc::clone(self))),
            Arc::new(TypeCoercion::new()),
            Arc::new(threshold::ThresholdRule),
            Arc::new(verify::VerifyRule::new(Arc::clone(self))),
        ]
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
