//! Raw flags and files → one validated [`ServiceConfig`].
//!
//! Precedence is flags > environment (`AIRLOCK_*`, through clap) > file > default. The
//! file is validated whole; every problem is reported with its file and line, and a
//! config that has any problem is never served. Relative paths in a file are relative
//! to that file's directory.

pub mod diagnostic;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;
use toml::Spanned;

pub use diagnostic::{Collector, Diagnostic, Diagnostics};

/// Default listen address of `airlock serve`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

/// Command-line overrides shared by `serve` and `check`. Every flag can also be set
/// through its environment variable.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct ConfigArgs {
    /// Configuration file (TOML); see conf/airlock.toml for a documented example.
    #[arg(long, env = "AIRLOCK_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:50051 (port 0 picks a free port).
    #[arg(long, env = "AIRLOCK_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Directory for durable state: tokens are not kept, but approvals, audit and uploads are.
    #[arg(long, env = "AIRLOCK_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Directory holding model.conf, policy.csv and tables.toml.
    #[arg(long, env = "AIRLOCK_POLICY_DIR", value_name = "DIR")]
    pub policy_dir: Option<PathBuf>,
    /// Users file (TOML) with argon2id password hashes and roles.
    #[arg(long, env = "AIRLOCK_USERS_FILE", value_name = "FILE")]
    pub users_file: Option<PathBuf>,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Serve the owner console (web pages) at this address, e.g. 127.0.0.1:8080 (port 0
    /// picks a free port; `off` disables it). Off unless set.
    #[arg(long, env = "AIRLOCK_CONSOLE_LISTEN", value_name = "ADDR")]
    pub console_listen: Option<ConsoleListen>,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub state: StateArgs,
}

/// TLS files (shared by `serve` and `demo`); each overrides the `[tls]` key.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct TlsArgs {
    /// PEM certificate chain for TLS; needs --tls-key.
    #[arg(
        long,
        env = "AIRLOCK_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS; needs --tls-cert.
    #[arg(
        long,
        env = "AIRLOCK_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// PEM certificate(s) of the CA that issues client certificates: every Flight SQL
    /// client must then present one (mutual TLS). Needs TLS (--tls-cert, --tls-key).
    #[arg(long, env = "AIRLOCK_TLS_CLIENT_CA", value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
}

/// Limits that keep hostile clients from holding the service (shared by `serve` and
/// `demo`). Each overrides the `[limits]` key of the same name.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct LimitArgs {
    /// Longest a query may run, planning and streaming included (e.g. 60s, 5m).
    #[arg(long, env = "AIRLOCK_QUERY_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub query_timeout: Option<Duration>,
    /// Memory one query may hold (e.g. 512MiB, 2GiB); a query over it fails cleanly.
    #[arg(long, env = "AIRLOCK_MEMORY_PER_QUERY", value_name = "BYTES")]
    pub memory_per_query: Option<ByteSize>,
    /// Queries executing at once; further ones wait for a slot within their timeout.
    #[arg(long, env = "AIRLOCK_MAX_CONCURRENT_QUERIES", value_name = "N")]
    pub max_concurrent_queries: Option<usize>,
    /// Cancel a result stream whose client has not read for this long, freeing its query
    /// slot and memory (e.g. 60s).
    #[arg(long, env = "AIRLOCK_STREAM_IDLE_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub stream_idle_timeout: Option<Duration>,
    /// Most bytes a client may send when binding prepared-statement parameters (e.g. 1MiB).
    #[arg(long, env = "AIRLOCK_MAX_PARAMETER_BYTES", value_name = "BYTES")]
    pub max_parameter_bytes: Option<ByteSize>,
    /// Password checks (argon2id, 19 MiB each) running at once.
    #[arg(long, env = "AIRLOCK_MAX_CONCURRENT_LOGINS", value_name = "N")]
    pub max_concurrent_logins: Option<usize>,
    /// Failed logins per user name and per client address within a minute before further
    /// attempts are refused with RATE_LIMITED.
    #[arg(long, env = "AIRLOCK_FAILED_LOGINS_PER_MINUTE", value_name = "N")]
    pub failed_logins_per_minute: Option<u32>,
    /// Deepest expression a query may nest (operators, calls, subscripts), checked on
    /// the SQL before planning.
    #[arg(long, env = "AIRLOCK_MAX_EXPRESSION_DEPTH", value_name = "N")]
    pub max_expression_depth: Option<usize>,
    /// Most expression nodes a query may hold, checked on the SQL before planning.
    #[arg(long, env = "AIRLOCK_MAX_EXPRESSION_NODES", value_name = "N")]
    pub max_expression_nodes: Option<usize>,
    /// Queries (GetFlightInfo of SQL) one principal may start within a minute; more are
    /// refused with RATE_LIMITED. 0: no limit.
    #[arg(long, env = "AIRLOCK_QUERIES_PER_MINUTE", value_name = "N")]
    pub queries_per_minute: Option<u64>,
    /// Result streams one principal may have open at once; more are refused with
    /// RATE_LIMITED. 0: no limit.
    #[arg(long, env = "AIRLOCK_CONCURRENT_QUERIES_PER_USER", value_name = "N")]
    pub concurrent_queries_per_user: Option<u64>,
    /// Rows one principal may be sent per day (UTC); over it, QUOTA_EXCEEDED. 0: no limit.
    #[arg(long, env = "AIRLOCK_ROWS_PER_DAY", value_name = "N")]
    pub rows_per_day: Option<u64>,
    /// Bytes of Arrow data one principal may be sent per day (UTC), e.g. 10GiB; over it,
    /// QUOTA_EXCEEDED. 0: no limit.
    #[arg(long, env = "AIRLOCK_BYTES_PER_DAY", value_name = "BYTES")]
    pub bytes_per_day: Option<ByteSize>,
}

impl LimitArgs {
    /// Applies the flags given over `limits`.
    pub fn apply(&self, limits: &mut Limits) {
        if let Some(d) = self.query_timeout {
            limits.query_timeout = d;
        }
        if let Some(b) = self.memory_per_query {
            limits.memory_per_query = b.as_u64() as usize;
        }
        if let Some(n) = self.max_concurrent_queries {
            limits.max_concurrent_queries = n.max(1);
        }
        if let Some(d) = self.stream_idle_timeout {
            limits.stream_idle_timeout = d;
        }
        if let Some(b) = self.max_parameter_bytes {
            limits.max_parameter_bytes = b.as_u64() as usize;
        }
        if let Some(n) = self.max_concurrent_logins {
            limits.max_concurrent_logins = n.max(1);
        }
        if let Some(n) = self.failed_logins_per_minute {
            limits.failed_logins_per_minute = n.max(1);
        }
        if let Some(n) = self.max_expression_depth {
            limits.max_expression_depth = n.max(1);
        }
        if let Some(n) = self.max_expression_nodes {
            limits.max_expression_nodes = n.max(1);
        }
        if let Some(n) = self.queries_per_minute {
            limits.quota.queries_per_minute = n;
        }
        if let Some(n) = self.concurrent_queries_per_user {
            limits.quota.concurrent_queries = n;
        }
        if let Some(n) = self.rows_per_day {
            limits.quota.rows_per_day = n;
        }
        if let Some(b) = self.bytes_per_day {
            limits.quota.bytes_per_day = b.as_u64();
        }
    }
}

impl TlsArgs {
    /// The TLS files given as flags, if any (a client CA alone is checked at load).
    fn files(&self) -> Option<TlsFiles> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            }),
            _ => None,
        }
    }

    /// Applies the flags over `tls` (for `demo`, which has no file): an error when a
    /// client CA is given without a certificate and key.
    pub fn apply(&self, tls: &mut Option<TlsFiles>) -> Result<(), String> {
        if let Some(files) = self.files() {
            *tls = Some(files);
        } else if let Some(ca) = &self.tls_client_ca {
            match tls {
                Some(t) => t.client_ca = Some(ca.clone()),
                None => return Err("--tls-client-ca needs --tls-cert and --tls-key".into()),
            }
        }
        Ok(())
    }
}

/// Distributed execution (shared by `serve` and `demo`); each overrides its `[cluster]` key.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct ClusterArgs {
    /// Run the stages below the release boundary on these `airlock worker`s
    /// (comma-separated URLs, e.g. http://10.0.0.5:50061); needs --cluster-secret-file.
    #[arg(
        long,
        env = "AIRLOCK_WORKERS",
        value_name = "URL,...",
        value_delimiter = ','
    )]
    pub workers: Option<Vec<String>>,
    /// File with the secret the front ends and workers of a cluster share (at least 32
    /// bytes, e.g. `openssl rand -hex 32`): every call to a worker proves it.
    #[arg(long, env = "AIRLOCK_CLUSTER_SECRET_FILE", value_name = "FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// Bytes of files each scan partition reads when a scan is spread over workers
    /// (default 16MiB); lower spreads small tables over more workers.
    #[arg(
        long,
        env = "AIRLOCK_CLUSTER_SCAN_PARTITION_BYTES",
        value_name = "BYTES"
    )]
    pub cluster_scan_partition_bytes: Option<ByteSize>,
    #[command(flatten)]
    pub tls: ClusterTlsArgs,
}

/// Where approvals, budgets, tokens and the audit chain live (shared by `serve` and
/// `demo`); each overrides its `[state]` key.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct StateArgs {
    /// Keep the state in PostgreSQL at this URL (e.g.
    /// postgres://airlock@127.0.0.1/airlock), shared by every front end of a deployment;
    /// unset: SQLite and a file in the state directory.
    #[arg(long, env = "AIRLOCK_STATE_URL", value_name = "URL")]
    pub state_url: Option<String>,
    /// The audit chain's key file (default <state-dir>/keys/audit.key, created when
    /// missing); front ends sharing a PostgreSQL state need the same key.
    #[arg(long, env = "AIRLOCK_AUDIT_KEY_FILE", value_name = "FILE")]
    pub audit_key_file: Option<PathBuf>,
    /// PEM certificate of the CA that signed PostgreSQL's certificate: connections to
    /// --state-url then use TLS (required when PostgreSQL is on another machine).
    #[arg(long, env = "AIRLOCK_STATE_CA_FILE", value_name = "FILE")]
    pub state_ca_file: Option<PathBuf>,
}

impl StateArgs {
    /// The flags over the file's `[state]` section (paths already resolved).
    pub fn resolve(
        &self,
        file: crate::state::StateConfig,
    ) -> Result<crate::state::StateConfig, String> {
        let config = crate::state::StateConfig {
            url: self.state_url.clone().or(file.url),
            audit_key_file: self.audit_key_file.clone().or(file.audit_key_file),
            ca_file: self.state_ca_file.clone().or(file.ca_file),
        };
        if let Some(url) = &config.url {
            crate::state::postgres::check_url(url, config.ca_file.is_some())
                .map_err(|e| e.to_string())?;
        }
        if let Some(ca) = &config.ca_file
            && !ca.exists()
        {
            return Err(format!("state CA file {} does not exist", ca.display()));
        }
        Ok(config)
    }
}

/// Mutual TLS between front ends and workers (`serve`, `demo` and `worker`); each
/// overrides its `[cluster]` key. All three or none.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct ClusterTlsArgs {
    /// PEM certificate chain this front end or worker presents to the others of its
    /// cluster; needs --cluster-tls-key and --cluster-tls-ca.
    #[arg(long, env = "AIRLOCK_CLUSTER_TLS_CERT", value_name = "FILE")]
    pub cluster_tls_cert: Option<PathBuf>,
    /// PEM private key of --cluster-tls-cert.
    #[arg(long, env = "AIRLOCK_CLUSTER_TLS_KEY", value_name = "FILE")]
    pub cluster_tls_key: Option<PathBuf>,
    /// PEM certificate of the cluster's CA: the only issuer trusted between front ends
    /// and workers.
    #[arg(long, env = "AIRLOCK_CLUSTER_TLS_CA", value_name = "FILE")]
    pub cluster_tls_ca: Option<PathBuf>,
}

impl ClusterTlsArgs {
    /// The three files over the file's (`[cluster] tls_cert`, `tls_key`, `tls_ca`).
    pub fn resolve(
        &self,
        file: [Option<PathBuf>; 3],
    ) -> Result<Option<crate::cluster::tls::ClusterTlsFiles>, String> {
        let [cert, key, ca] = file;
        let cert = self.cluster_tls_cert.clone().or(cert);
        let key = self.cluster_tls_key.clone().or(key);
        let ca = self.cluster_tls_ca.clone().or(ca);
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => {
                for f in [&cert, &key, &ca] {
                    if !f.is_file() {
                        return Err(format!("cluster TLS file {} does not exist", f.display()));
                    }
                }
                Ok(Some(crate::cluster::tls::ClusterTlsFiles { cert, key, ca }))
            }
            _ => Err("cluster TLS needs all of tls_cert, tls_key and tls_ca (--cluster-tls-cert, --cluster-tls-key, --cluster-tls-ca)".to_string()),
        }
    }
}

/// The `[cluster]` section of a file, paths resolved against the file's directory.
#[derive(Debug, Default)]
pub struct ClusterSection {
    pub workers: Vec<String>,
    pub secret_file: Option<PathBuf>,
    pub scan_partition_bytes: Option<String>,
    /// tls_cert, tls_key, tls_ca.
    pub tls: [Option<PathBuf>; 3],
}

impl ClusterArgs {
    /// Applies the flags over the `[cluster]` section (`file`, already read) and checks
    /// the result: workers need a secret file that exists.
    pub fn resolve(
        &self,
        file: Option<ClusterSection>,
    ) -> Result<Option<crate::cluster::ClusterConfig>, String> {
        let ClusterSection {
            workers: file_workers,
            secret_file: file_secret,
            scan_partition_bytes: file_bytes,
            tls: file_tls,
        } = file.unwrap_or_default();
        let tls = self.tls.resolve(file_tls)?;
        let scan_partition_bytes = match (&self.cluster_scan_partition_bytes, file_bytes) {
            (Some(b), _) => Some(b.as_u64() as usize),
            (None, Some(s)) => Some(bytes(&s).map_err(|e| format!("scan_partition_bytes: {e}"))?),
            (None, None) => None,
        };
        let workers = self.workers.clone().unwrap_or(file_workers);
        let workers: Vec<String> = workers
            .into_iter()
            .map(|w| w.trim().to_string())
            .filter(|w| !w.is_empty())
            .collect();
        if workers.is_empty() {
            return Ok(None);
        }
        let workers = workers
            .iter()
            .map(|w| crate::cluster::parse_worker_url(w))
            .collect::<Result<Vec<_>, _>>()?;
        let Some(secret_file) = self.cluster_secret_file.clone().or(file_secret) else {
            return Err(
                "cluster workers need a shared secret: set cluster.secret_file, --cluster-secret-file or AIRLOCK_CLUSTER_SECRET_FILE"
                    .to_string(),
            );
        };
        if !secret_file.is_file() {
            return Err(format!(
                "cluster secret file {} does not exist",
                secret_file.display()
            ));
        }
        Ok(Some(crate::cluster::ClusterConfig {
            workers,
            secret_file,
            scan_partition_bytes,
            tls,
        }))
    }
}

/// Where traces and metrics go (shared by `serve` and `demo`).
#[derive(clap::Args, Debug, Default, Clone)]
pub struct TelemetryArgs {
    /// Serve Prometheus metrics on GET /metrics at this address (port 0 picks one).
    #[arg(long, env = "AIRLOCK_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Export spans with OTLP/gRPC to this endpoint, e.g. http://127.0.0.1:4317.
    #[arg(long, env = "AIRLOCK_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

/// A listen address for the owner console, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleListen(pub Option<SocketAddr>);

impl std::str::FromStr for ConsoleListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "off" | "none" | "" => Ok(Self(None)),
            addr => addr
                .parse()
                .map(|a| Self(Some(a)))
                .map_err(|e| format!("{e}: expected an address such as 127.0.0.1:8080, or off")),
        }
    }
}

/// The validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub listen: SocketAddr,
    pub tls: Option<TlsFiles>,
    pub datasets: Vec<DatasetConfig>,
    pub policy_dir: PathBuf,
    pub users_file: PathBuf,
    pub state_dir: PathBuf,
    pub limits: Limits,
    /// Prometheus metrics listener, if any.
    pub metrics_listen: Option<SocketAddr>,
    /// OTLP/gRPC span export endpoint, if any.
    pub otlp_endpoint: Option<String>,
    /// The owner console's listen address, if it is served (`crate::console`).
    pub console_listen: Option<SocketAddr>,
    /// Workers for distributed execution, if any (`crate::cluster`).
    pub cluster: Option<crate::cluster::ClusterConfig>,
    /// Where approvals, budgets, tokens and the audit chain live (`crate::state`).
    pub state: crate::state::StateConfig,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA certificates for client certificates: when set, every Flight SQL connection
    /// must present a certificate this CA issued (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// Per-principal quotas; 0 means no limit. See `crate::quota`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    /// Queries (GetFlightInfo of SQL) started within a sliding minute.
    pub queries_per_minute: u64,
    /// Result streams open at once.
    pub concurrent_queries: u64,
    /// Rows sent per UTC day.
    pub rows_per_day: u64,
    /// Bytes of Arrow data sent per UTC day.
    pub bytes_per_day: u64,
}

/// A `[limits.users.<name>]` table: each key given replaces the default's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaOverride {
    pub queries_per_minute: Option<u64>,
    pub concurrent_queries: Option<u64>,
    pub rows_per_day: Option<u64>,
    pub bytes_per_day: Option<u64>,
}

impl QuotaOverride {
    pub fn over(&self, base: Quota) -> Quota {
        Quota {
            queries_per_minute: self.queries_per_minute.unwrap_or(base.queries_per_minute),
            concurrent_queries: self.concurrent_queries.unwrap_or(base.concurrent_queries),
            rows_per_day: self.rows_per_day.unwrap_or(base.rows_per_day),
            bytes_per_day: self.bytes_per_day.unwrap_or(base.bytes_per_day),
        }
    }
}

/// Resource limits applied to every query.
#[derive(Debug, Clone)]
pub struct Limits {
    pub query_timeout: Duration,
    pub memory_per_query: usize,
    pub max_concurrent_queries: usize,
    pub token_ttl: Duration,
    /// Memory all `cache = true` datasets may hold together.
    pub cache_memory: usize,
    /// How often cached datasets' files are checked for changes.
    pub cache_check_interval: Duration,
    /// A result stream whose client has not read for this long is cancelled.
    pub stream_idle_timeout: Duration,
    /// Most bytes read from a DoPut of prepared-statement parameters.
    pub max_parameter_bytes: usize,
    /// Password verifications running at once.
    pub max_concurrent_logins: usize,
    /// Failed logins per user name and per address within a minute.
    pub failed_logins_per_minute: u32,
    /// Deepest expression nesting a query may have.
    pub max_expression_depth: usize,
    /// Most expression nodes a query may have.
    pub max_expression_nodes: usize,
    /// Every principal's quotas, unless `user_quotas` says otherwise.
    pub quota: Quota,
    /// `[limits.users.<name>]`: per-principal overrides (names checked against the users
    /// file at start), with the line each was declared on.
    pub user_quotas: std::collections::BTreeMap<String, (QuotaOverride, Option<(PathBuf, usize)>)>,
}

impl Limits {
    /// The quotas of one principal.
    pub fn quota_for(&self, principal: &str) -> Quota {
        match self.user_quotas.get(principal) {
            Some((o, _)) => o.over(self.quota),
            None => self.quota,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            query_timeout: Duration::from_secs(300),
            memory_per_query: 2 * 1024 * 1024 * 1024,
            max_concurrent_queries: 16,
            token_ttl: Duration::from_secs(8 * 3600),
            cache_memory: 1024 * 1024 * 1024,
            cache_check_interval: Duration::from_secs(2),
            stream_idle_timeout: Duration::from_secs(60),
            max_parameter_bytes: 1024 * 1024,
            max_concurrent_logins: 4,
            failed_logins_per_minute: 10,
            max_expression_depth: 256,
            max_expression_nodes: 10_000,
            quota: Quota::default(),
            user_quotas: Default::default(),
        }
    }
}

/// File formats a dataset can be read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetFormat {
    Parquet,
    Csv,
    Arrow,
}

impl DatasetFormat {
    pub fn extension(self) -> &'static str {
        match self {
            Self::Parquet => ".parquet",
            Self::Csv => ".csv",
            Self::Arrow => ".arrow",
        }
    }

    fn from_path(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "parquet" | "pq" => Some(Self::Parquet),
            "csv" => Some(Self::Csv),
            "arrow" | "ipc" | "feather" => Some(Self::Arrow),
            _ => None,
        }
    }
}

/// One table of the catalog: a file or a directory of files.
#[derive(Debug, Clone)]
pub struct DatasetConfig {
    pub name: TableName,
    pub path: PathBuf,
    pub format: DatasetFormat,
    /// CSV only: whether the first line holds column names (default true).
    pub has_header: bool,
    /// CSV only: the field delimiter (default `,`).
    pub delimiter: u8,
    /// Hold the rows in memory (within `limits.cache_memory`), reloaded when files change.
    pub cache: bool,
    /// Where the dataset was declared, for start-up errors.
    pub origin: Option<(PathBuf, usize)>,
}

/// A `schema.table` name. Both parts are lower-case SQL identifiers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableName {
    pub schema: String,
    pub table: String,
}

impl TableName {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (schema, table) = s
            .split_once('.')
            .ok_or_else(|| format!("table name {s:?} must be schema.table"))?;
        for part in [schema, table] {
            let ok = !part.is_empty()
                && part
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !ok {
                return Err(format!(
                    "table name {s:?}: each part must be a lower-case identifier ([a-z_][a-z0-9_]*)"
                ));
            }
        }
        Ok(Self {
            schema: schema.to_string(),
            table: table.to_string(),
        })
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

// ---- the file ------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    listen: Option<Spanned<String>>,
    policy_dir: Option<String>,
    users_file: Option<String>,
    state_dir: Option<String>,
    tls: Option<RawTls>,
    limits: Option<RawLimits>,
    metrics_listen: Option<Spanned<String>>,
    otlp_endpoint: Option<String>,
    console_listen: Option<Spanned<String>>,
    cluster: Option<RawCluster>,
    state: Option<RawState>,
    #[serde(default)]
    datasets: Vec<Spanned<RawDataset>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    #[serde(default)]
    workers: Vec<String>,
    secret_file: Option<String>,
    scan_partition_bytes: Option<String>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    tls_ca: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    url: Option<String>,
    audit_key_file: Option<String>,
    ca_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: String,
    key: String,
    client_ca: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuota {
    queries_per_minute: Option<u64>,
    concurrent_queries_per_user: Option<u64>,
    rows_per_day: Option<u64>,
    bytes_per_day: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    query_timeout: Option<Spanned<String>>,
    memory_per_query: Option<Spanned<String>>,
    max_concurrent_queries: Option<Spanned<usize>>,
    token_ttl: Option<Spanned<String>>,
    cache_memory: Option<Spanned<String>>,
    cache_check_interval: Option<Spanned<String>>,
    stream_idle_timeout: Option<Spanned<String>>,
    max_parameter_bytes: Option<Spanned<String>>,
    max_concurrent_logins: Option<Spanned<usize>>,
    failed_logins_per_minute: Option<Spanned<u32>>,
    max_expression_depth: Option<Spanned<usize>>,
    max_expression_nodes: Option<Spanned<usize>>,
    queries_per_minute: Option<u64>,
    concurrent_queries_per_user: Option<u64>,
    rows_per_day: Option<u64>,
    bytes_per_day: Option<Spanned<String>>,
    #[serde(default)]
    users: std::collections::BTreeMap<String, Spanned<RawQuota>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataset {
    name: Spanned<String>,
    path: Spanned<String>,
    format: Option<DatasetFormat>,
    has_header: Option<bool>,
    delimiter: Option<Spanned<String>>,
    cache: Option<bool>,
}

/// One `[limits]` value read with `parse`; a bad one is reported as `limits.<key>: ...`
/// at its place in the file.
fn limit<T>(
    out: &mut Collector,
    (file, text): (&Path, &str),
    key: &str,
    value: &Option<Spanned<String>>,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Option<T> {
    let s = value.as_ref()?;
    parse(s.get_ref())
        .map_err(|e| {
            out.push(Diagnostic::at_span(
                file,
                text,
                Some(s.span()),
                format!("limits.{key}: {e}"),
            ))
        })
        .ok()
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn bytes(s: &str) -> Result<usize, String> {
    s.parse::<ByteSize>().map(|b| b.as_u64() as usize)
}

impl ServiceConfig {
    /// Loads the file named by `args.config` (if any), applies flags and environment, and
    /// validates the result. Paths are checked to exist; dataset contents are read later,
    /// when the catalog is built.
    pub fn load(args: &ConfigArgs) -> Result<Self, Diagnostics> {
        let (raw, file, text) = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    Diagnostics::one(Diagnostic::new(path, None, format!("cannot read: {e}")))
                })?;
                let raw: RawFile = toml::from_str(&text)
                    .map_err(|e| Diagnostics::one(Diagnostic::from_toml(path, &text, &e)))?;
                (raw, path.clone(), text)
            }
            None => (
                RawFile::default(),
                PathBuf::from("<command line>"),
                String::new(),
            ),
        };
        let base = file
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty() && args.config.is_some())
            .unwrap_or_else(|| PathBuf::from("."));
        let rel = |p: &str| -> PathBuf {
            let p = PathBuf::from(p);
            if p.is_absolute() { p } else { base.join(p) }
        };
        let mut out = Collector::default();

        let listen = match (&args.listen, &raw.listen) {
            (Some(a), _) => *a,
            (None, Some(s)) => s.get_ref().parse().unwrap_or_else(|e| {
                out.push(Diagnostic::at_span(
                    &file,
                    &text,
                    Some(s.span()),
                    format!("listen: {e}"),
                ));
                DEFAULT_LISTEN.parse().expect("valid default")
            }),
            (None, None) => DEFAULT_LISTEN.parse().expect("valid default"),
        };

        let policy_dir = args
            .policy_dir
            .clone()
            .or_else(|| raw.policy_dir.as_deref().map(rel))
            .unwrap_or_else(|| PathBuf::from("policies"));
        let users_file = args
            .users_file
            .clone()
            .or_else(|| raw.users_file.as_deref().map(rel))
            .unwrap_or_else(|| PathBuf::from("conf/users.toml"));
        let state_dir = args
            .state_dir
            .clone()
            .or_else(|| raw.state_dir.as_deref().map(rel))
            .unwrap_or_else(|| PathBuf::from("state"));
        let mut tls = raw.tls.as_ref().map(|t| TlsFiles {
            cert: rel(&t.cert),
            key: rel(&t.key),
            client_ca: t.client_ca.as_deref().map(rel),
        });
        if let Err(e) = args.tls.apply(&mut tls) {
            out.push(Diagnostic::new(&file, None, e));
        }

        let mut limits = Limits::default();
        if let Some(l) = &raw.limits {
            let at = (file.as_path(), text.as_str());
            if let Some(d) = limit(&mut out, at, "query_timeout", &l.query_timeout, duration) {
                limits.query_timeout = d;
            }
            if let Some(d) = limit(&mut out, at, "token_ttl", &l.token_ttl, duration) {
                limits.token_ttl = d;
            }
            let interval = |s: &str| {
                duration(s).and_then(|d| match d.is_zero() {
                    true => Err("must be above zero".to_string()),
                    false => Ok(d),
                })
            };
            if let Some(d) = limit(
                &mut out,
                at,
                "cache_check_interval",
                &l.cache_check_interval,
                interval,
            ) {
                limits.cache_check_interval = d;
            }
            if let Some(b) = limit(&mut out, at, "cache_memory", &l.cache_memory, bytes) {
                limits.cache_memory = b;
            }
            if let Some(b) = limit(&mut out, at, "memory_per_query", &l.memory_per_query, bytes) {
                limits.memory_per_query = b;
            }
            if let Some(d) = limit(
                &mut out,
                at,
                "stream_idle_timeout",
                &l.stream_idle_timeout,
                interval,
            ) {
                limits.stream_idle_timeout = d;
            }
            if let Some(b) = limit(
                &mut out,
                at,
                "max_parameter_bytes",
                &l.max_parameter_bytes,
                bytes,
            ) {
                limits.max_parameter_bytes = b;
            }
            let mut count = |key: &str, n: &Option<Spanned<usize>>, into: &mut usize| {
                if let Some(n) = n {
                    *into = *n.get_ref();
                    if *n.get_ref() == 0 {
                        out.push(Diagnostic::at_span(
                            &file,
                            &text,
                            Some(n.span()),
                            format!("limits.{key} must be at least 1"),
                        ));
                    }
                }
            };
            count(
                "max_concurrent_queries",
                &l.max_concurrent_queries,
                &mut limits.max_concurrent_queries,
            );
            count(
                "max_concurrent_logins",
                &l.max_concurrent_logins,
                &mut limits.max_concurrent_logins,
            );
            count(
                "max_expression_depth",
                &l.max_expression_depth,
                &mut limits.max_expression_depth,
            );
            count(
                "max_expression_nodes",
                &l.max_expression_nodes,
                &mut limits.max_expression_nodes,
            );
            let per_minute = l
                .failed_logins_per_minute
                .as_ref()
                .map(|n| Spanned::new(n.span(), *n.get_ref() as usize));
            let mut failures = limits.failed_logins_per_minute as usize;
            count("failed_logins_per_minute", &per_minute, &mut failures);
            limits.failed_logins_per_minute = failures.min(u32::MAX as usize) as u32;
            let quota = |q: &RawQuota, out: &mut Collector, key: &str| QuotaOverride {
                queries_per_minute: q.queries_per_minute,
                concurrent_queries: q.concurrent_queries_per_user,
                rows_per_day: q.rows_per_day,
                bytes_per_day: limit(out, at, key, &q.bytes_per_day, bytes).map(|b| b as u64),
            };
            let defaults = RawQuota {
                queries_per_minute: l.queries_per_minute,
                concurrent_queries_per_user: l.concurrent_queries_per_user,
                rows_per_day: l.rows_per_day,
                bytes_per_day: l.bytes_per_day.clone(),
            };
            limits.quota = quota(&defaults, &mut out, "bytes_per_day").over(limits.quota);
            for (name, q) in &l.users {
                let o = quota(
                    q.get_ref(),
                    &mut out,
                    &format!("users.{name}.bytes_per_day"),
                );
                let line = diagnostic::line_of(&text, q.span().start);
                limits
                    .user_quotas
                    .insert(name.clone(), (o, Some((file.clone(), line))));
            }
        }
        args.limits.apply(&mut limits);

        let mut datasets = Vec::new();
        let mut seen = BTreeSet::new();
        for d in &raw.datasets {
            let line = diagnostic::line_of(&text, d.span().start);
            let d = d.get_ref();
            let at = |span| Diagnostic::at_span(&file, &text, Some(span), "");
            let name = match TableName::parse(d.name.get_ref()) {
                Ok(n) => n,
                Err(e) => {
                    out.push(Diagnostic {
                        message: format!("dataset name: {e}"),
                        ..at(d.name.span())
                    });
                    continue;
                }
            };
            if !seen.insert(name.clone()) {
                out.push(Diagnostic {
                    message: format!("dataset {name} is declared twice"),
                    ..at(d.name.span())
                });
            }
            let path = rel(d.path.get_ref());
            if !path.exists() {
                out.push(Diagnostic {
                    message: format!("dataset {name}: path {} does not exist", path.display()),
                    ..at(d.path.span())
                });
            }
            let format = match d.format.or_else(|| DatasetFormat::from_path(&path)) {
                Some(f) => f,
                None => {
                    out.push(Diagnostic {
                        message: format!(
                            "dataset {name}: cannot tell the format of {}; set format = \"parquet\", \"csv\" or \"arrow\"",
                            path.display()
                        ),
                        ..at(d.path.span())
                    });
                    continue;
                }
            };
            let delimiter = match &d.delimiter {
                None => b',',
                Some(s) if s.get_ref().len() == 1 => s.get_ref().as_bytes()[0],
                Some(s) => {
                    out.push(Diagnostic {
                        message: format!("dataset {name}: delimiter must be one ASCII character"),
                        ..at(s.span())
                    });
                    b','
                }
            };
            datasets.push(DatasetConfig {
                name,
                path,
                format,
                has_header: d.has_header.unwrap_or(true),
                delimiter,
                cache: d.cache.unwrap_or(false),
                origin: Some((file.clone(), line)),
            });
        }

        if let Some(t) = &tls {
            for p in [Some(&t.cert), Some(&t.key), t.client_ca.as_ref()]
                .into_iter()
                .flatten()
            {
                if !p.exists() {
                    out.push(Diagnostic::new(
                        &file,
                        None,
                        format!("TLS file {} does not exist", p.display()),
                    ));
                }
            }
        }

        let metrics_listen = match (&args.telemetry.metrics_listen, &raw.metrics_listen) {
            (Some(a), _) => Some(*a),
            (None, Some(s)) => match s.get_ref().parse() {
                Ok(a) => Some(a),
                Err(e) => {
                    out.push(Diagnostic::at_span(
                        &file,
                        &text,
                        Some(s.span()),
                        format!("metrics_listen: {e}"),
                    ));
                    None
                }
            },
            (None, None) => None,
        };
        let otlp_endpoint = args
            .telemetry
            .otlp_endpoint
            .clone()
            .or(raw.otlp_endpoint.clone());

        let console_listen = match (&args.console_listen, &raw.console_listen) {
            (Some(a), _) => a.0,
            (None, Some(s)) => match s.get_ref().parse::<ConsoleListen>() {
                Ok(a) => a.0,
                Err(e) => {
                    out.push(Diagnostic::at_span(
                        &file,
                        &text,
                        Some(s.span()),
                        format!("console_listen: {e}"),
                    ));
                    None
                }
            },
            (None, None) => None,
        };

        let cluster = args
            .cluster
            .resolve(raw.cluster.as_ref().map(|c| ClusterSection {
                workers: c.workers.clone(),
                secret_file: c.secret_file.as_deref().map(&rel),
                scan_partition_bytes: c.scan_partition_bytes.clone(),
                tls: [&c.tls_cert, &c.tls_key, &c.tls_ca].map(|f| f.as_deref().map(&rel)),
            }))
            .unwrap_or_else(|e| {
                out.push(Diagnostic::new(&file, None, format!("cluster: {e}")));
                None
            });

        let state = args
            .state
            .resolve(crate::state::StateConfig {
                url: raw.state.as_ref().and_then(|s| s.url.clone()),
                audit_key_file: raw
                    .state
                    .as_ref()
                    .and_then(|s| s.audit_key_file.as_deref())
                    .map(&rel),
                ca_file: raw
                    .state
                    .as_ref()
                    .and_then(|s| s.ca_file.as_deref())
                    .map(&rel),
            })
            .unwrap_or_else(|e| {
                out.push(Diagnostic::new(&file, None, format!("state: {e}")));
                Default::default()
            });

        out.finish(ServiceConfig {
            listen,
            tls,
            datasets,
            policy_dir,
            users_file,
            state_dir,
            limits,
            metrics_listen,
            otlp_endpoint,
            console_listen,
            cluster,
            state,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_workers_need_a_secret_file_and_flags_override_the_file() {
        assert_eq!(load_text("").unwrap().cluster, None);
        let err = load_text("[cluster]\nworkers = [\"http://127.0.0.1:1\"]\n").unwrap_err();
        assert!(err.to_string().contains("need a shared secret"), "{err}");
        let err = load_text(
            "[cluster]\nworkers = [\"grpc://127.0.0.1:1\"]\nsecret_file = \"/nonexistent\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("http://host:port"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("cluster.secret");
        std::fs::write(&secret, "x".repeat(40)).unwrap();
        let path = dir.path().join("airlock.toml");
        std::fs::write(
            &path,
            "[cluster]\nworkers = [\"http://127.0.0.1:1\"]\nsecret_file = \"cluster.secret\"\nscan_partition_bytes = \"1MiB\"\n",
        )
        .unwrap();
        let cluster = ServiceConfig::load(&ConfigArgs {
            config: Some(path.clone()),
            ..Default::default()
        })
        .unwrap()
        .cluster
        .unwrap();
        assert_eq!(cluster.secret_file, secret);
        assert_eq!(cluster.scan_partition_bytes, Some(1 << 20));
        assert_eq!(cluster.workers[0].as_str(), "http://127.0.0.1:1/");
        // --workers replaces the file's list.
        let cluster = ServiceConfig::load(&ConfigArgs {
            config: Some(path),
            cluster: ClusterArgs {
                workers: Some(vec![
                    "http://127.0.0.2:2".into(),
                    "http://127.0.0.3:3".into(),
                ]),
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap()
        .cluster
        .unwrap();
        assert_eq!(cluster.workers.len(), 2);
    }

    fn load_text(text: &str) -> Result<ServiceConfig, Diagnostics> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.parquet"), b"").unwrap();
        let path = dir.path().join("airlock.toml");
        std::fs::write(&path, text).unwrap();
        ServiceConfig::load(&ConfigArgs {
            config: Some(path),
            ..Default::default()
        })
    }

    #[test]
    fn names_file_and_line_of_each_error() {
        let err = load_text(
            "listen = \"127.0.0.1:1\"\n\n[[datasets]]\nname = \"Bad\"\npath = \"t.parquet\"\n\n[[datasets]]\nname = \"a.b\"\npath = \"missing.parquet\"\n",
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("airlock.toml:4: dataset name"), "{text}");
        assert!(text.contains("airlock.toml:9: dataset a.b: path"), "{text}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = load_text("lisen = \"x\"\n").unwrap_err();
        assert!(
            err.to_string().contains(":1: unknown field `lisen`"),
            "{err}"
        );
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("airlock.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:1\"\n[limits]\nquery_timeout = \"5s\"\n",
        )
        .unwrap();
        let cfg = ServiceConfig::load(&ConfigArgs {
            config: Some(path),
            listen: Some("127.0.0.1:2".parse().unwrap()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.listen.port(), 2);
        assert_eq!(cfg.limits.query_timeout, Duration::from_secs(5));
    }

    #[test]
    fn quotas_default_and_per_user() {
        let cfg = load_text(
            "[limits]\nqueries_per_minute = 60\nbytes_per_day = \"1MiB\"\n\n[limits.users.ann]\nrows_per_day = 5\nqueries_per_minute = 0\n",
        )
        .unwrap();
        let ann = cfg.limits.quota_for("ann");
        assert_eq!(
            (ann.queries_per_minute, ann.rows_per_day, ann.bytes_per_day),
            (0, 5, 1024 * 1024)
        );
        assert_eq!(cfg.limits.quota_for("bob").queries_per_minute, 60);
        let err =
            load_text("[limits]\n\n[limits.users.ann]\nbytes_per_day = \"lots\"\n").unwrap_err();
        assert!(
            err.to_string()
                .contains(":4: limits.users.ann.bytes_per_day"),
            "{err}"
        );
        let err = load_text("[limits.users.ann]\nrows = 1\n").unwrap_err();
        assert!(err.to_string().contains("unknown field `rows`"), "{err}");
    }

    #[test]
    fn a_client_ca_needs_a_certificate_and_key() {
        let cfg = load_text(
            "[tls]\ncert = \"t.parquet\"\nkey = \"t.parquet\"\nclient_ca = \"t.parquet\"\n",
        )
        .unwrap();
        assert!(cfg.tls.unwrap().client_ca.is_some());
        let err = ServiceConfig::load(&ConfigArgs {
            tls: TlsArgs {
                tls_client_ca: Some("ca.pem".into()),
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("--tls-client-ca needs"), "{err}");
    }

    #[test]
    fn console_is_off_unless_set_and_flags_win() {
        assert_eq!(load_text("").unwrap().console_listen, None);
        let cfg = load_text("console_listen = \"127.0.0.1:0\"\n").unwrap();
        assert_eq!(cfg.console_listen, Some("127.0.0.1:0".parse().unwrap()));
        let err = load_text("\nconsole_listen = \"nowhere\"\n").unwrap_err();
        assert!(err.to_string().contains(":2: console_listen:"), "{err}");
        assert_eq!("off".parse::<ConsoleListen>().unwrap(), ConsoleListen(None));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("airlock.toml");
        std::fs::write(&path, "console_listen = \"127.0.0.1:1\"\n").unwrap();
        let cfg = ServiceConfig::load(&ConfigArgs {
            config: Some(path),
            console_listen: Some("off".parse().unwrap()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.console_listen, None);
    }
}
