//! Hot datasets: `cache = true` holds a dataset's rows in memory as Arrow batches.
//!
//! All hot datasets together stay within `limits.cache_memory`: loading counts the
//! batches' memory as they arrive and stops as soon as the budget would be passed, so a
//! start-up refusal never holds more than the budget first. The files are fingerprinted
//! (path, size, modification time) before they are read; when the fingerprint changes,
//! [`reload`] reads them again and the new batches replace the old ones in one catalog
//! swap (queries already running keep the batches they started with). A reload that
//! fails, would pass the budget, or finds a different schema leaves the old data in
//! force: policies were checked against that schema.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use datafusion::arrow::array::RecordBatch;
use datafusion::catalog::TableProvider;
use datafusion::datasource::MemTable;
use datafusion::execution::SessionState;
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;

/// The files a dataset was read from, as they were just before the read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fingerprint(Vec<(PathBuf, u64, Option<SystemTime>)>);

impl Fingerprint {
    /// Every file under `path` (or `path` itself), sorted.
    pub fn of(path: &Path) -> Self {
        let mut files = Vec::new();
        walk(path, &mut files);
        files.sort();
        Self(files)
    }
}

fn walk(path: &Path, out: &mut Vec<(PathBuf, u64, Option<SystemTime>)>) {
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
            walk(&entry.path(), out);
        }
    } else {
        out.push((path.to_path_buf(), meta.len(), meta.modified().ok()));
    }
}

/// A hot dataset's bookkeeping: what it was read from and what it holds.
#[derive(Debug, Clone)]
pub struct Hot {
    pub files: Fingerprint,
    pub bytes: usize,
}

/// Reads every row of `source` into memory, failing once more than `budget` bytes
/// would be held. Partitions are kept, so scans of the cached table stay parallel.
pub async fn load(
    source: Arc<dyn TableProvider>,
    state: &SessionState,
    budget: usize,
) -> Result<(Arc<dyn TableProvider>, usize), String> {
    let schema = source.schema();
    let ctx = SessionContext::new_with_state(state.clone());
    let plan = ctx
        .read_table(source)
        .map_err(|e| e.strip_backtrace())?
        .create_physical_plan()
        .await
        .map_err(|e| e.strip_backtrace())?;
    let task = ctx.task_ctx();
    let held = AtomicUsize::new(0);
    let partitions = (0..plan.properties().partitioning.partition_count()).map(|i| {
        let (plan, task, held) = (Arc::clone(&plan), Arc::clone(&task), &held);
        async move {
            let stream = plan.execute(i, task).map_err(|e| e.strip_backtrace())?;
            stream
                .map_err(|e| e.strip_backtrace())
                .try_fold(Vec::<RecordBatch>::new(), |mut batches, batch| async move {
                    let now = held.fetch_add(batch.get_array_memory_size(), Ordering::Relaxed)
                        + batch.get_array_memory_size();
                    if now > budget {
                        return Err(format!(
                            "needs more than the {} left in limits.cache_memory",
                            bytesize::ByteSize::b(budget as u64)
                        ));
                    }
                    batches.push(batch);
                    Ok(batches)
                })
                .await
        }
    });
    let partitions = futures::future::try_join_all(partitions).await?;
    let table = MemTable::try_new(schema, partitions).map_err(|e| e.strip_backtrace())?;
    Ok((Arc::new(table), held.into_inner()))
}

/// What checking a hot dataset's files found.
#[derive(Debug)]
pub enum Refresh {
    Unchanged,
    /// The files changed and were read again.
    Reloaded(Arc<dyn TableProvider>, Hot),
    /// The files changed but could not be taken; the old rows stay.
    Kept {
        files: Fingerprint,
        error: String,
    },
}

/// Why a changed hot dataset was not reloaded.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("cannot read the changed files: {0}")]
    Read(String),
    #[error("the changed files have a different schema; restart to take it")]
    SchemaChanged,
}

/// Reads a changed hot dataset again from `source` (a fresh listing of its files) within
/// `budget` (the cache budget less what the other hot datasets hold).
pub async fn reload(
    source: Arc<dyn TableProvider>,
    current: &Arc<dyn TableProvider>,
    state: &SessionState,
    budget: usize,
) -> Result<(Arc<dyn TableProvider>, usize), ReloadError> {
    if source.schema() != current.schema() {
        return Err(ReloadError::SchemaChanged);
    }
    load(source, state, budget).await.map_err(ReloadError::Read)
}
