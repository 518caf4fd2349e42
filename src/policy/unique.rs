//! Declared unique keys, checked against the data (PRIVACY.md §3.2).
//!
//! Protected rows may join a relation the owner did not protect only on keys unique in
//! it: a key that repeats weights each person by its number of partner rows, a count
//! the analyst tunes with filters on that relation, and a lone person weighted once
//! among people weighted a thousand times is read off by the remainder. The owner
//! declares such keys in `tables.toml` (`unique = [["s_suppkey"]]`); a declaration is
//! believed only once the data bear it out, so loading a policy reads each key once.

use std::sync::Arc;

use datafusion::functions_aggregate::expr_fn::count;
use datafusion::logical_expr::Expr;
use datafusion::prelude::{SessionContext, ident, lit};

use super::tables::{TablesPolicy, UniqueKey};
use crate::catalog::Catalog;

/// The declared keys whose values repeat in the data (or that cannot be read), with why.
/// A NULL in any column of the key never joins, so such rows are not counted.
pub async fn violations(tables: &TablesPolicy, catalog: &Catalog) -> Vec<(UniqueKey, String)> {
    let ctx = SessionContext::new_with_state(crate::session::Sessions::bootstrap_state());
    let mut out = Vec::new();
    for (table, keys) in &tables.unique {
        let Some((_, provider)) = catalog.tables().find(|(n, _)| *n == table) else {
            out.push((keys[0].clone(), format!("{table} is not in the catalog")));
            continue;
        };
        for key in keys {
            let columns = key.columns.join(", ");
            let why = match repeats(&ctx, Arc::clone(provider), &key.columns).await {
                Ok(false) => continue,
                Ok(true) => format!(
                    "{table}: the unique key ({columns}) repeats in the data: joins on it would count a person several times"
                ),
                Err(e) => format!("{table}: cannot check the unique key ({columns}): {e}"),
            };
            out.push((key.clone(), why));
        }
    }
    out
}

/// Whether some value of `columns` (no NULL in it) stands on more than one row.
async fn repeats(
    ctx: &SessionContext,
    table: Arc<dyn datafusion::catalog::TableProvider>,
    columns: &[String],
) -> datafusion::error::Result<bool> {
    let keys: Vec<Expr> = columns.iter().map(ident).collect();
    let not_null = keys
        .iter()
        .map(|k| k.clone().is_not_null())
        .reduce(Expr::and)
        .unwrap_or(lit(true));
    let found = ctx
        .read_table(table)?
        .filter(not_null)?
        .aggregate(keys, vec![count(lit(1)).alias("n")])?
        .filter(ident("n").gt(lit(1)))?
        .limit(0, Some(1))?
        .count()
        .await?;
    Ok(found > 0)
}
