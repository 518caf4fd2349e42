//! Datasets from the configuration into DataFusion, and each principal's view of them.
//!
//! Every dataset is a Parquet, CSV or Arrow IPC file or a directory of them, registered
//! as `schema.table` in the one catalog [`CATALOG_NAME`]. A source that is missing,
//! empty or unreadable is a start-up error naming the dataset, the file and the line
//! that declared it. A principal never sees the full catalog: [`Catalog::view`] builds
//! one holding only the tables they hold some action on, and that view is all their
//! session can plan against or describe. Datasets marked `cache = true` are held in
//! memory (see [`hot`]).

pub mod hot;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{
    CatalogProvider, CatalogProviderList, MemoryCatalogProvider, MemoryCatalogProviderList,
    MemorySchemaProvider, SchemaProvider, TableProvider,
};
use datafusion::common::config::TableParquetOptions;
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::file_format::arrow::ArrowFormat;
use datafusion::datasource::file_format::csv::CsvFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::execution::SessionState;

use crate::config::{DatasetConfig, DatasetFormat, Diagnostic, Diagnostics, TableName};
use hot::{Fingerprint, Hot, Refresh};

/// The name of the one catalog every table lives in.
pub const CATALOG_NAME: &str = "airlock";

/// All datasets, by name.
#[derive(Debug, Default, Clone)]
pub struct Catalog {
    tables: BTreeMap<TableName, Arc<dyn TableProvider>>,
    /// Tables uploaded by owners (`<state-dir>/uploads/<schema>/<table>/`), not configured.
    uploads: std::collections::BTreeSet<TableName>,
    /// Datasets held in memory (`cache = true`).
    hot: BTreeMap<TableName, Hot>,
}

impl Catalog {
    /// Opens every dataset, reading each one's schema, and loads the `cache = true` ones
    /// into memory within `cache_memory` bytes. All failures are reported together.
    pub async fn open(
        datasets: &[DatasetConfig],
        state: &SessionState,
        cache_memory: usize,
    ) -> Result<Self, Diagnostics> {
        let mut tables = BTreeMap::new();
        let mut hot = BTreeMap::new();
        let mut errors = Vec::new();
        let mut cached = 0usize;
        for d in datasets {
            let opened = match open_dataset(d, state).await {
                Ok(t) if d.cache => {
                    let files = Fingerprint::of(&d.path);
                    let started = std::time::Instant::now();
                    hot::load(t, state, cache_memory.saturating_sub(cached))
                        .await
                        .map(|(t, bytes)| {
                            tracing::info!(
                                dataset = %d.name,
                                bytes,
                                ms = started.elapsed().as_millis() as u64,
                                "hot dataset loaded"
                            );
                            cached += bytes;
                            hot.insert(d.name.clone(), Hot { files, bytes });
                            t
                        })
                        .map_err(|e| format!("cache = true: {e}"))
                }
                other => other,
            };
            match opened {
                Ok(t) => {
                    tables.insert(d.name.clone(), t);
                }
                Err(message) => {
                    let (file, line) = d
                        .origin
                        .clone()
                        .map_or((d.path.clone(), None), |(f, l)| (f, Some(l)));
                    errors.push(Diagnostic::new(
                        file,
                        line,
                        format!("dataset {}: {message}", d.name),
                    ));
                }
            }
        }
        if errors.is_empty() {
            Ok(Self {
                tables,
                uploads: Default::default(),
                hot,
            })
        } else {
            Err(Diagnostics(errors))
        }
    }

    /// A catalog of already-built tables (uploads, tests).
    pub fn from_tables(
        tables: impl IntoIterator<Item = (TableName, Arc<dyn TableProvider>)>,
    ) -> Self {
        Self {
            tables: tables.into_iter().collect(),
            uploads: Default::default(),
            hot: Default::default(),
        }
    }

    /// Adds every upload found under `<state-dir>/uploads/<schema>/<table>/`.
    pub async fn with_uploads(
        mut self,
        state_dir: &Path,
        state: &SessionState,
    ) -> Result<Self, Diagnostics> {
        let root = uploads_dir(state_dir);
        let Ok(schemas) = std::fs::read_dir(&root) else {
            return Ok(self);
        };
        let mut errors = Vec::new();
        for schema in schemas.flatten().filter(|e| e.path().is_dir()) {
            // Uploads live in one schema; anything else under uploads/ (left by an older
            // version that accepted any schema) is not served.
            if schema.file_name() != crate::ingest::DEFAULT_SCHEMA {
                tracing::warn!(
                    dir = %schema.path().display(),
                    "ignoring uploads outside the uploads schema"
                );
                continue;
            }
            for table in std::fs::read_dir(schema.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = format!(
                    "{}.{}",
                    schema.file_name().to_string_lossy(),
                    table.file_name().to_string_lossy()
                );
                let Ok(name) = TableName::parse(&name) else {
                    continue;
                };
                if self.tables.contains_key(&name) {
                    continue;
                }
                match open_upload(&table.path(), state).await {
                    Ok(t) => {
                        self.tables.insert(name.clone(), t);
                        self.uploads.insert(name);
                    }
                    Err(e) => errors.push(Diagnostic::new(
                        table.path(),
                        None,
                        format!("upload {name}: {e}"),
                    )),
                }
            }
        }
        if errors.is_empty() {
            Ok(self)
        } else {
            Err(Diagnostics(errors))
        }
    }

    /// This catalog with one more (or a replaced) uploaded table.
    pub fn with_upload(&self, name: TableName, table: Arc<dyn TableProvider>) -> Self {
        let mut next = self.clone();
        next.tables.insert(name.clone(), table);
        next.uploads.insert(name);
        next
    }

    /// This catalog after a hot dataset's refresh: new rows, or (when the reload failed)
    /// the old rows with the new files noted, so they are not read again until they
    /// change again.
    pub fn with_refresh(&self, name: &TableName, refresh: &Refresh) -> Self {
        let mut next = self.clone();
        match refresh {
            Refresh::Unchanged => {}
            Refresh::Reloaded(table, hot) => {
                next.tables.insert(name.clone(), Arc::clone(table));
                next.hot.insert(name.clone(), hot.clone());
            }
            Refresh::Kept { files, .. } => {
                if let Some(h) = next.hot.get_mut(name) {
                    h.files = files.clone();
                }
            }
        }
        next
    }

    /// Memory held by hot datasets other than `except`.
    fn hot_memory_except(&self, except: &TableName) -> usize {
        self.hot
            .iter()
            .filter(|(n, _)| *n != except)
            .map(|(_, h)| h.bytes)
            .sum()
    }

    /// Reads a hot dataset again if its files changed since it was loaded; apply the
    /// answer with [`Catalog::with_refresh`].
    pub async fn refresh_hot(
        &self,
        d: &DatasetConfig,
        state: &SessionState,
        cache_memory: usize,
    ) -> Refresh {
        let (Some(current), Some(old)) = (self.tables.get(&d.name), self.hot.get(&d.name)) else {
            return Refresh::Unchanged;
        };
        let files = Fingerprint::of(&d.path);
        if files == old.files {
            return Refresh::Unchanged;
        }
        let budget = cache_memory.saturating_sub(self.hot_memory_except(&d.name));
        let reloaded = match open_dataset(d, state).await {
            Ok(source) => hot::reload(source, current, state, budget)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match reloaded {
            Ok((table, bytes)) => Refresh::Reloaded(table, Hot { files, bytes }),
            Err(error) => Refresh::Kept { files, error },
        }
    }

    pub fn contains(&self, table: &TableName) -> bool {
        self.tables.contains_key(table)
    }

    /// Whether a table was uploaded (rather than configured).
    pub fn is_upload(&self, table: &TableName) -> bool {
        self.uploads.contains(table)
    }

    pub fn uploads(&self) -> impl Iterator<Item = &TableName> {
        self.uploads.iter()
    }

    /// A digest of the data a table answers from: the files (path, size, modification
    /// time) a hot dataset was loaded from, or those under a listed table's paths now.
    /// Keys DP repeats (a repeat on changed data must not reuse the noise: the two
    /// answers would difference out the change exactly).
    pub fn data_version(&self, table: &TableName) -> String {
        use sha2::{Digest, Sha256};
        let files: Vec<Fingerprint> = match (self.hot.get(table), self.tables.get(table)) {
            (Some(h), _) => vec![h.files.clone()],
            (None, Some(t)) => match t.as_ref().downcast_ref::<ListingTable>() {
                Some(l) => l
                    .table_paths()
                    .iter()
                    .map(|u| match u.get_url().to_file_path() {
                        Ok(p) => Fingerprint::of(&p),
                        Err(()) => Fingerprint::default(),
                    })
                    .collect(),
                // Tables held otherwise (none today) never count as unchanged.
                None => return format!("unversioned:{:p}", Arc::as_ptr(t)),
            },
            (None, None) => return "absent".into(),
        };
        format!(
            "{:x}",
            Sha256::digest(format!("{table}:{files:?}").as_bytes())
        )
    }

    pub fn schema(&self, table: &TableName) -> Option<SchemaRef> {
        self.tables.get(table).map(|t| t.schema())
    }

    pub fn tables(&self) -> impl Iterator<Item = (&TableName, &Arc<dyn TableProvider>)> {
        self.tables.iter()
    }

    /// A catalog list holding only the tables `visible` admits.
    pub fn view(&self, visible: impl Fn(&TableName) -> bool) -> Arc<dyn CatalogProviderList> {
        let catalog = MemoryCatalogProvider::new();
        let mut schemas: BTreeMap<&str, Arc<MemorySchemaProvider>> = BTreeMap::new();
        for (name, table) in self.tables.iter().filter(|(n, _)| visible(n)) {
            let schema = schemas
                .entry(name.schema.as_str())
                .or_insert_with(|| Arc::new(MemorySchemaProvider::new()));
            schema
                .register_table(name.table.clone(), Arc::clone(table))
                .expect("names are unique in a BTreeMap");
        }
        for (name, schema) in schemas {
            catalog
                .register_schema(name, schema as Arc<dyn SchemaProvider>)
                .expect("memory catalog accepts schemas");
        }
        let list = MemoryCatalogProviderList::new();
        list.register_catalog(CATALOG_NAME.to_string(), Arc::new(catalog));
        Arc::new(list)
    }
}

/// Where uploads live.
pub fn uploads_dir(state_dir: &Path) -> std::path::PathBuf {
    state_dir.join("uploads")
}

/// An uploaded table: a directory of Parquet files.
pub async fn open_upload(
    dir: &Path,
    state: &SessionState,
) -> Result<Arc<dyn TableProvider>, String> {
    open_dataset(
        &DatasetConfig {
            name: TableName::parse("uploads.table").expect("valid"),
            path: dir.to_path_buf(),
            format: DatasetFormat::Parquet,
            has_header: true,
            delimiter: b',',
            cache: false,
            origin: None,
        },
        state,
    )
    .await
}

async fn open_dataset(
    d: &DatasetConfig,
    state: &SessionState,
) -> Result<Arc<dyn TableProvider>, String> {
    let path = d
        .path
        .canonicalize()
        .map_err(|e| format!("cannot open {}: {e}", d.path.display()))?;
    let ext = d.format.extension();
    let url = if path.is_dir() {
        if !has_file_with_extension(&path, ext) {
            return Err(format!("directory {} holds no {ext} files", path.display()));
        }
        ListingTableUrl::parse(format!("{}/", path.display()))
    } else {
        std::fs::File::open(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        ListingTableUrl::parse(path.display().to_string())
    }
    .map_err(|e| format!("bad path {}: {e}", path.display()))?;

    let format: Arc<dyn FileFormat> = match d.format {
        DatasetFormat::Parquet => {
            let mut options = TableParquetOptions::default();
            // Clients (JDBC, older pyarrow) want Utf8, not Utf8View: see docs/DESIGN.md.
            options.global.schema_force_view_types = false;
            Arc::new(ParquetFormat::default().with_options(options))
        }
        DatasetFormat::Csv => Arc::new(
            CsvFormat::default()
                .with_has_header(d.has_header)
                .with_delimiter(d.delimiter),
        ),
        DatasetFormat::Arrow => Arc::new(ArrowFormat),
    };
    let options =
        ListingOptions::new(format).with_file_extension(if path.is_dir() { ext } else { "" });
    let config = ListingTableConfig::new(url)
        .with_listing_options(options)
        .infer_schema(state)
        .await
        .map_err(|e| format!("cannot read {}: {}", path.display(), e.strip_backtrace()))?;
    let table = ListingTable::try_new(config).map_err(|e| e.strip_backtrace())?;
    if table.schema().fields().is_empty() {
        return Err(format!("{} has no columns", path.display()));
    }
    Ok(Arc::new(table))
}

fn has_file_with_extension(dir: &Path, ext: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let p = e.path();
        if p.is_dir() {
            has_file_with_extension(&p, ext)
        } else {
            p.to_string_lossy().ends_with(ext)
        }
    })
}
