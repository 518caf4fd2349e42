//! Shared by the harness programs: the TPC-H tables registered as `tpch.<table>` in a
//! plain DataFusion context, read from Parquet or held in memory.

use std::path::Path;
use std::sync::Arc;

use datafusion::catalog::{MemorySchemaProvider, SchemaProvider};
use datafusion::datasource::MemTable;
use datafusion::prelude::{ParquetReadOptions, SessionContext};

pub const TABLES: [&str; 8] = [
    "region", "nation", "supplier", "customer", "part", "partsupp", "orders", "lineitem",
];

/// Where the data lives: read from the Parquet files each query, or loaded once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    Parquet,
    Memory,
}

/// Registers `tpch.<table>` for every TPC-H table under `data`.
pub async fn register_tpch(
    ctx: &SessionContext,
    data: &Path,
    source: Source,
) -> datafusion::error::Result<()> {
    let schema = Arc::new(MemorySchemaProvider::new());
    ctx.catalog("datafusion")
        .expect("default catalog")
        .register_schema("tpch", Arc::clone(&schema) as Arc<dyn SchemaProvider>)?;
    for table in TABLES {
        let path = data.join(format!("{table}.parquet"));
        let df = ctx
            .read_parquet(
                path.to_string_lossy().as_ref(),
                ParquetReadOptions::default(),
            )
            .await?;
        let provider: Arc<dyn datafusion::catalog::TableProvider> = match source {
            Source::Parquet => df.into_view(),
            Source::Memory => {
                let schema = df.schema().inner().clone();
                let partitions = df.collect_partitioned().await?;
                Arc::new(MemTable::try_new(schema, partitions)?)
            }
        };
        schema.register_table(table.to_string(), provider)?;
    }
    Ok(())
}
