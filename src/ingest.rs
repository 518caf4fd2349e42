//! Owner uploads: ADBC bulk ingest (Flight SQL `CommandStatementIngest`) into Parquet.
//!
//! Uploads land only in the `uploads` schema (a client naming any other schema, or
//! another catalog, is refused with `WRITE_NOT_ALLOWED`), under a table name of at most [`MAX_NAME_LEN`] lower-case
//! identifier characters. Only a principal holding `admin` on the target table may
//! ingest. Batches are written
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

/// The schema every ingest goes to (the default when the client names none, and the only
/// one accepted).
pub const DEFAULT_SCHEMA: &str = "uploads";

/// Longest upload table name.
pub const MAX_NAME_LEN: usize = 63;

/// Writes an ingest stream and registers the table. Returns the number of rows written.
/// `record` audits the upload once its file is complete; the table is served only when
/// it succeeds (otherwise the file is removed and its error returned).
pub async fn ingest<S>(
    sessions: &Sessions,
    state_dir: &Path,
    principal: &Principal,
    cmd: CommandStatementIngest,
    mut batches: S,
    record: impl FnOnce(&TableName, i64) -> Result<()>,
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
    write(sessions, principal, target, batches, record).await
}

/// The table an ingest command names, if it is one uploads may go to.
fn target_name(cmd: &CommandStatementIngest) -> Result<TableName> {
    if let Some(catalog) = cmd.catalog.as_deref().filter(|c| !c.is_empty())
        && catalog != crate::catalog::CATALOG_NAME
    {
        return Err(Refusal::new(
            ReasonCode::WriteNotAllowed,
            format!(
                "uploads go to the catalog {:?}, not {:?}",
                crate::catalog::CATALOG_NAME,
                truncated(catalog)
            ),
        )
        .into());
    }
    let schema = cmd.schema.as_deref().unwrap_or(DEFAULT_SCHEMA);
    if schema != DEFAULT_SCHEMA {
        return Err(Refusal::new(
            ReasonCode::WriteNotAllowed,
            format!(
                "uploads go to the {DEFAULT_SCHEMA} schema only (db_schema_name={DEFAULT_SCHEMA:?} or none), not {:?}",
                truncated(schema)
            ),
        )
        .into());
    }
    if cmd.table.is_empty() || cmd.table.len() > MAX_NAME_LEN {
        return Err(Error::InvalidRequest(format!(
            "an upload's table name must be 1 to {MAX_NAME_LEN} characters (got {})",
            cmd.table.len()
        )));
    }
    TableName::parse(&format!("{schema}.{}", cmd.table)).map_err(|_| {
        Error::InvalidRequest(format!(
            "table name {:?}: use a lower-case identifier ([a-z_][a-z0-9_]*)",
            truncated(&cmd.table)
        ))
    })
}

/// A client's name, cut for an error message.
fn truncated(s: &str) -> String {
    s.chars().take(64).collect()
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
    let name = target_name(&cmd)?;
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
    record: impl FnOnce(&TableName, i64) -> Result<()>,
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
    if let Err(e) = w.close() {
        let _ = std::fs::remove_file(&temp);
        return Err(Error::Internal(e.to_string()));
    }
    if let Err(e) = record(&name, rows) {
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    std::fs::rename(&temp, &part).map_err(|e| Error::Internal(e.to_string()))?;

    let table = open_upload(&dir, &crate::session::Sessions::bootstrap_state())
        .await
        .map_err(Error::Internal)?;
    sessions.update_catalog(|c| c.with_upload(name.clone(), Arc::clone(&table)));
    tracing::info!(table = %name, rows, by = %principal.name, "upload registered");
    Ok(rows)
}
