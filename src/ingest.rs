//! Owner uploads: ADBC bulk ingest (Flight SQL `CommandStatementIngest`) into Parquet.
//!
//! Only a principal holding `admin` on the target table may ingest. Batches are written
//! one at a time to `<state-dir>/uploads/<schema>/<table>/part-<id>.parquet` (a temporary
//! name first, renamed when complete), the table is (re)registered in the catalog, and
//! every session is rebuilt on its next call. A table without a section in
//! `tables.toml` is protected by the product's defaults (one entity per row, k = 10,
//! non-aggregate results need approval). Configured datasets cannot be written to.

use std::path::Path;
use std::sync::Arc;

use arrow_flight::sql::CommandStatementIngest;
use arrow_flight::sql::{TableExistsOption, TableNotExistOption};
use datafusion::arrow::array::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use futures::{Stream, StreamExt};

use crate::auth::Principal;
use crate::catalog::{open_upload, uploads_dir};
use crate::config::TableName;
use crate::error::{Error, Result};
use crate::policy::Action;
use crate::policy::refusal::{ReasonCode, Refusal};
use crate::session::Sessions;

/// The schema an ingest goes to when the client names none.
pub const DEFAULT_SCHEMA: &str = "uploads";

/// Writes an ingest stream and registers the table. Returns the number of rows written.
pub async fn ingest<S>(
    sessions: &Sessions,
    state_dir: &Path,
    principal: &Principal,
    cmd: CommandStatementIngest,
    mut batches: S,
) -> Result<i64>
where
    S: Stream<Item = Result<RecordBatch, arrow_flight::error::FlightError>> + Unpin,
{
    let target = match prepare(sessions, state_dir, principal, cmd) {
        Ok(t) => t,
        Err(e) => {
            // Read the client's stream to its end so that it sees the refusal rather
            // than a broken upload (some drivers only look at the status afterwards).
            while batches.next().await.is_some() {}
            return Err(e);
        }
    };
    write(sessions, principal, target, batches).await
}

/// Where an accepted upload goes.
struct Target {
    name: TableName,
    dir: std::path::PathBuf,
}

/// Checks the right to upload and the ingest mode; clears the table for `replace`.
fn prepare(
    sessions: &Sessions,
    state_dir: &Path,
    principal: &Principal,
    cmd: CommandStatementIngest,
) -> Result<Target> {
    if cmd.transaction_id.is_some() {
        return Err(Error::Unimplemented(
            "transactions are not supported".into(),
        ));
    }
    if cmd.temporary {
        return Err(Error::Unimplemented(
            "temporary tables are not supported".into(),
        ));
    }
    let schema = cmd
        .schema
        .clone()
        .unwrap_or_else(|| DEFAULT_SCHEMA.to_string());
    let name =
        TableName::parse(&format!("{schema}.{}", cmd.table)).map_err(Error::InvalidRequest)?;
    let policy = sessions.policy().current();
    if !policy.allows(principal, &name, Action::Admin) {
        return Err(Refusal::new(
            ReasonCode::WriteNotAllowed,
            format!("uploading to {name} needs the admin action on it"),
        )
        .into());
    }
    let catalog = sessions.catalog();
    if catalog.contains(&name) && !catalog.is_upload(&name) {
        return Err(Refusal::new(
            ReasonCode::WriteNotAllowed,
            format!("{name} is a configured dataset and cannot be written to"),
        )
        .into());
    }
    let options = cmd.table_definition_options.unwrap_or_default();
    let exists = catalog.contains(&name);
    let dir = uploads_dir(state_dir).join(&name.schema).join(&name.table);
    if exists {
        match TableExistsOption::try_from(options.if_exists)
            .unwrap_or(TableExistsOption::Unspecified)
        {
            TableExistsOption::Append => {}
            TableExistsOption::Replace => {
                std::fs::remove_dir_all(&dir)
                    .map_err(|e| Error::Internal(format!("replacing {name}: {e}")))?;
            }
            _ => {
                return Err(Error::InvalidRequest(format!(
                    "table {name} already exists (ingest mode create)"
                )));
            }
        }
    } else if TableNotExistOption::try_from(options.if_not_exist)
        .unwrap_or(TableNotExistOption::Unspecified)
        == TableNotExistOption::Fail
    {
        return Err(Error::InvalidRequest(format!(
            "table {name} does not exist (ingest mode append)"
        )));
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::Internal(format!("creating {}: {e}", dir.display())))?;
    Ok(Target { name, dir })
}

async fn write<S>(
    sessions: &Sessions,
    principal: &Principal,
    target: Target,
    mut batches: S,
) -> Result<i64>
where
    S: Stream<Item = Result<RecordBatch, arrow_flight::error::FlightError>> + Unpin,
{
    let Target { name, dir } = target;
    let part = dir.join(format!("part-{}.parquet", uuid::Uuid::new_v4().simple()));
    let temp = part.with_extension("parquet.tmp");

    let mut writer: Option<ArrowWriter<std::fs::File>> = None;
    let mut rows: i64 = 0;
    let outcome: Result<()> = async {
        while let Some(batch) = batches.next().await {
            let batch =
                batch.map_err(|e| Error::InvalidRequest(format!("reading the upload: {e}")))?;
            if writer.is_none() {
                let file =
                    std::fs::File::create(&temp).map_err(|e| Error::Internal(e.to_string()))?;
                writer = Some(
                    ArrowWriter::try_new(file, batch.schema(), None)
                        .map_err(|e| Error::Internal(e.to_string()))?,
                );
            }
            let w = writer.as_mut().expect("created above");
            w.write(&batch)
                .map_err(|e| Error::InvalidRequest(format!("writing the upload: {e}")))?;
            rows += batch.num_rows() as i64;
        }
        Ok(())
    }
    .await;
    if let Err(e) = outcome {
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    let Some(w) = writer else {
        return Err(Error::InvalidRequest("the upload holds no batch".into()));
    };
    w.close().map_err(|e| Error::Internal(e.to_string()))?;
    std::fs::rename(&temp, &part).map_err(|e| Error::Internal(e.to_string()))?;

    let table = open_upload(&dir, &crate::session::Sessions::bootstrap_state())
        .await
        .map_err(Error::Internal)?;
    sessions.update_catalog(|c| c.with_upload(name.clone(), Arc::clone(&table)));
    tracing::info!(table = %name, rows, by = %principal.name, "upload registered");
    Ok(rows)
}
