//! Rule 2: row filters and masks directly above each protected table scan (§3.1, §3.8).
//!
//! A scan of a protected table becomes `Projection(masks, hidden entity) ← Filter(row
//! filters) ← TableScan`. Row filters see the real values; everything above the
//! projection sees only the masks, under the column's own name and Arrow type, so
//! filters, joins, group keys, ORDER BY and functions cannot use a wiped value as an
//! oracle. For tables the threshold must count, the projection also carries a hidden
//! column `__airlock_entity#<n>#<k>#<d|r>#<table>` (k, and drop or remainder for small
//! groups): the entity key (or, for a table without one, the whole row, since every row
//! is its own entity).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use datafusion::arrow::datatypes::{DataType, Field};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, ScalarValue, TableReference};
use datafusion::error::Result;
use datafusion::logical_expr::{
    Expr, Filter, LogicalPlan, Projection, TableScan, TableScanBuilder, cast, lit,
};
use datafusion::optimizer::AnalyzerRule;

use super::{HIDDEN_PREFIX, PolicyContext, TableRules};
use crate::policy::tables::MaskKind;

#[derive(Debug)]
pub struct ScanRule {
    ctx: Arc<PolicyContext>,
    /// A secret for `hash` masks: stable for the life of the process and policy.
    salt: String,
}

impl ScanRule {
    pub fn new(ctx: Arc<PolicyContext>) -> Self {
        static PROCESS_SALT: std::sync::LazyLock<String> =
            std::sync::LazyLock::new(|| uuid::Uuid::new_v4().simple().to_string());
        let salt = format!("{}{}", *PROCESS_SALT, ctx.policy.digest);
        Self { ctx, salt }
    }
}

/// What a hidden entity column's name says: which scan (or union slot) it comes from,
/// the k to reach, and the table whose entities it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityColumn {
    pub id: String,
    pub k: u64,
    /// `small_groups = "remainder"` (§3.4) rather than drop.
    pub remainder: bool,
    pub table: String,
}

impl EntityColumn {
    pub fn name(&self) -> String {
        let mode = if self.remainder { "r" } else { "d" };
        format!(
            "{HIDDEN_PREFIX}entity#{}#{}#{mode}#{}",
            self.id, self.k, self.table
        )
    }

    pub fn parse(name: &str) -> Option<Self> {
        let rest = name.strip_prefix(HIDDEN_PREFIX)?.strip_prefix("entity#")?;
        let mut parts = rest.splitn(4, '#');
        let id = parts.next()?.to_string();
        let k = parts.next()?.parse().ok()?;
        let remainder = match parts.next()? {
            "r" => true,
            "d" => false,
            _ => return None,
        };
        let table = parts.next()?.to_string();
        Some(Self {
            id,
            k,
            remainder,
            table,
        })
    }
}

impl AnalyzerRule for ScanRule {
    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        let counter = AtomicUsize::new(0);
        plan.transform_up_with_subqueries(|node| match node {
            LogicalPlan::TableScan(scan) => match self.ctx.rules(&scan.table_name) {
                Some((table, rules)) => {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    self.protect(scan, table, rules, n).map(Transformed::yes)
                }
                None => Ok(Transformed::no(LogicalPlan::TableScan(scan))),
            },
            other => Ok(Transformed::no(other)),
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "airlock_scan"
    }
}

impl ScanRule {
    fn protect(
        &self,
        scan: TableScan,
        table: &crate::config::TableName,
        rules: &TableRules,
        n: usize,
    ) -> Result<LogicalPlan> {
        let qualifier = scan.table_name.clone();
        let wanted: Vec<Arc<Field>> = scan.projected_schema.fields().iter().cloned().collect();
        // Re-scan every column: the entity key must be there even when unselected.
        let full = LogicalPlan::TableScan(
            TableScanBuilder::new(scan.table_name.clone(), Arc::clone(&scan.source))
                .with_filters(scan.filters.clone())
                .with_fetch(scan.fetch)
                .build()?,
        );
        let input = match &rules.row_filter {
            Some(predicate) => LogicalPlan::Filter(Filter::try_new(
                requalify(predicate.clone(), &qualifier)?,
                Arc::new(full),
            )?),
            None => full,
        };
        let mut exprs: Vec<Expr> = wanted
            .iter()
            .map(|f| {
                let column = Expr::Column(Column::new(Some(qualifier.clone()), f.name()));
                match (!rules.unmasked)
                    .then(|| rules.policy.mask_for(f.name(), f.data_type()))
                    .flatten()
                {
                    Some(kind) => mask(column, kind, f.data_type(), &self.salt)
                        .alias_qualified(Some(qualifier.clone()), f.name()),
                    None => column,
                }
            })
            .collect();
        if rules.automatic() {
            let k = rules.policy.min_group_size;
            let entity = match &rules.policy.privacy_unit {
                Some(unit) => Expr::Column(Column::new(Some(qualifier.clone()), unit)),
                None => datafusion::functions::core::r#struct().call(
                    input
                        .schema()
                        .columns()
                        .into_iter()
                        .map(Expr::Column)
                        .collect(),
                ),
            };
            let name = EntityColumn {
                id: n.to_string(),
                k,
                remainder: rules.policy.small_groups
                    == crate::policy::tables::SmallGroups::Remainder,
                table: table.to_string(),
            }
            .name();
            exprs.push(entity.alias_qualified(Some(qualifier.clone()), name));
        }
        Ok(LogicalPlan::Projection(Projection::try_new(
            exprs,
            Arc::new(input),
        )?))
    }
}

/// Points a row filter's columns at the scan's qualifier as written in the query.
fn requalify(e: Expr, qualifier: &TableReference) -> Result<Expr> {
    e.transform(|e| match e {
        Expr::Column(c) => Ok(Transformed::yes(Expr::Column(Column::new(
            Some(qualifier.clone()),
            c.name,
        )))),
        other => Ok(Transformed::no(other)),
    })
    .map(|t| t.data)
}

/// The masked value of a column, of the column's own type.
fn mask(column: Expr, kind: MaskKind, data_type: &DataType, salt: &str) -> Expr {
    use datafusion::functions::{core, crypto, encoding, string, unicode};
    let masked = match kind {
        MaskKind::Null => {
            return Expr::Literal(
                ScalarValue::try_from(data_type).unwrap_or(ScalarValue::Null),
                None,
            );
        }
        MaskKind::Star => lit("*"),
        MaskKind::Hash => encoding::encode().call(vec![
            crypto::sha256().call(vec![
                string::concat().call(vec![lit(salt.to_string()), column]),
            ]),
            lit("hex"),
        ]),
        MaskKind::Last4 => {
            let hidden_len = core::greatest().call(vec![
                cast(
                    unicode::character_length().call(vec![column.clone()]),
                    DataType::Int64,
                ) - lit(4i64),
                lit(0i64),
            ]);
            string::concat().call(vec![
                string::repeat().call(vec![lit("*"), hidden_len]),
                unicode::right().call(vec![column, lit(4i64)]),
            ])
        }
    };
    cast(masked, data_type.clone())
}
