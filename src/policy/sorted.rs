//! Which DP tables are stored in the order of their privacy unit (PRIVACY.md §5b).
//!
//! The DP release bounds each unit's contribution. When a table's rows are stored sorted
//! by unit, it can do so as the rows stream past, with nothing kept per unit
//! (`crate::dp::bound::Runs`); otherwise it gathers every unit's rows first. Which of
//! the two runs must not depend on the rows a query selects, or its running time
//! would tell the analyst something about them: so the order is read once, when the
//! policy loads, for the whole table, and a query's filters (which keep the order of
//! what they keep) cannot change the choice.

use std::sync::Arc;

use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::execution::SessionStateBuilder;
use datafusion::physical_plan::{ExecutionPlan, execute_stream};
use datafusion::prelude::{SessionConfig, SessionContext, ident};
use futures::StreamExt;

use super::dp::{ReleaseMode, StoredFile};
use super::tables::TablesPolicy;
use crate::catalog::Catalog;

/// Marks each DP table whose rows are stored in non-decreasing order of its unit
/// (NULL units, which the release drops, aside). A table that cannot be read is left
/// unmarked: the release then takes the path that needs no order.
pub async fn mark(tables: &mut TablesPolicy, catalog: &Catalog) {
    let config = SessionConfig::new().with_target_partitions(1);
    let ctx = SessionContext::new_with_state(
        SessionStateBuilder::new()
            .with_config(config)
            .with_default_features()
            .build(),
    );
    for (name, rules) in tables.tables.iter_mut() {
        let unit = rules.privacy_unit.clone();
        let ReleaseMode::Dp(dp) = &mut rules.release else {
            continue;
        };
        let (Some(unit), Some((_, provider))) = (unit, catalog.tables().find(|(n, _)| *n == name))
        else {
            continue;
        };
        dp.stored_in_unit_order = in_order(&ctx, provider, &unit).await.unwrap_or(None);
    }
}

/// The table's one file, if its rows are in order of `unit`.
async fn in_order(
    ctx: &SessionContext,
    table: &Arc<dyn datafusion::catalog::TableProvider>,
    unit: &str,
) -> datafusion::error::Result<Option<StoredFile>> {
    let df = ctx
        .read_table(Arc::clone(table))?
        .select(vec![ident(unit)])?;
    let plan = df.create_physical_plan().await?;
    let Some(file) = one_file(&plan) else {
        return Ok(None);
    };
    let mut stream = execute_stream(plan, ctx.task_ctx())?;
    let Some(field) = stream.schema().fields().first().cloned() else {
        return Ok(None);
    };
    let converter = RowConverter::new(vec![SortField::new(field.data_type().clone())])?;
    let mut last: Option<Vec<u8>> = None;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        let column = batch.column(0);
        let rows = converter.convert_columns(std::slice::from_ref(column))?;
        for r in 0..batch.num_rows() {
            if column.is_null(r) {
                continue;
            }
            let row = rows.row(r);
            if last.as_deref().is_some_and(|l| row.as_ref() < l) {
                return Ok(None);
            }
            match &mut last {
                Some(l) if l.as_slice() == row.as_ref() => {}
                _ => last = Some(row.as_ref().to_vec()),
            }
        }
    }
    Ok(Some(file))
}

/// The one file a scan reads, as it is now (none if it reads several, or no file).
fn one_file(plan: &Arc<dyn ExecutionPlan>) -> Option<StoredFile> {
    let mut found: Option<StoredFile> = None;
    let mut many = false;
    let _ = plan.apply(|p| {
        if let Some(scan) = p
            .downcast_ref::<DataSourceExec>()
            .and_then(|s| s.data_source().downcast_ref::<FileScanConfig>())
        {
            for f in scan.file_groups.iter().flat_map(|g| g.files()) {
                let this = stored_file(f);
                match &found {
                    Some(known) if *known != this => many = true,
                    _ => found = Some(this),
                }
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found.filter(|_| !many)
}

/// A file's identity as a scan lists it.
pub fn stored_file(meta: &datafusion::datasource::listing::PartitionedFile) -> StoredFile {
    let meta = &meta.object_meta;
    StoredFile {
        location: meta.location.to_string(),
        size: meta.size,
        modified: meta.last_modified.timestamp_micros(),
        e_tag: meta.e_tag.clone(),
    }
}
