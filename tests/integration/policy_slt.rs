//! Policy behaviour as data: every `tests/policy/<fixture>/*.slt` file runs against a
//! real server on 127.0.0.1:0 built from that fixture's policy and data.
//!
//! A fixture directory holds `model.conf`, `policy.csv`, `tables.toml`,
//! `principals.toml` (principal → roles; each password is the principal's name) and
//! `data/<schema>.<table>.csv`. Every record of a `.slt` file starts with
//! `connection <principal>`: the principal that sends it. Errors are matched against
//! `<gRPC code>: <message>`, so a record can expect a reason code such as
//! `statement error FILTER_NOT_ALLOWED`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use airlock::config::{DatasetConfig, DatasetFormat, Limits, ServiceConfig, TableName};
use airlock::server::Running;
use arrow_flight::sql::client::FlightSqlServiceClient;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use sqllogictest::{AsyncDB, DBOutput, DefaultColumnType, Record};
use tonic::transport::Channel;

use crate::support::*;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct DbError(String);

struct PrincipalDb {
    client: FlightSqlServiceClient<Channel>,
}

#[async_trait::async_trait]
impl AsyncDB for PrincipalDb {
    type Error = DbError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, DbError> {
        let batches = query(&mut self.client, sql)
            .await
            .map_err(|s| DbError(format!("{:?}: {}", s.code(), s.message())))?;
        let options = FormatOptions::default().with_null("NULL");
        let mut rows = Vec::new();
        let mut width = 0;
        for b in &batches {
            width = b.num_columns();
            let formatters: Vec<ArrayFormatter> = b
                .columns()
                .iter()
                .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).unwrap())
                .collect();
            for r in 0..b.num_rows() {
                rows.push(
                    formatters
                        .iter()
                        .map(|f| {
                            let v = f.value(r).to_string();
                            if v.is_empty() {
                                "(empty)".to_string()
                            } else {
                                v
                            }
                        })
                        .collect(),
                );
            }
        }
        Ok(DBOutput::Rows {
            types: vec![DefaultColumnType::Any; width],
            rows,
        })
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "airlock"
    }
}

pub(crate) async fn start_fixture(dir: &Path, state: &Path) -> Running {
    start_fixture_with(dir, state, None).await
}

/// The fixture's server, optionally a front end of a cluster.
pub(crate) async fn start_fixture_with(
    dir: &Path,
    state: &Path,
    cluster: Option<airlock::cluster::ClusterConfig>,
) -> Running {
    let principals: BTreeMap<String, Vec<String>> =
        toml::from_str(&std::fs::read_to_string(dir.join("principals.toml")).unwrap()).unwrap();
    let mut users = String::new();
    for (name, roles) in &principals {
        let hash = airlock::auth::hash_password(name).unwrap();
        let roles: Vec<String> = roles.iter().map(|r| format!("{r:?}")).collect();
        users.push_str(&format!(
            "[users.{name}]\npassword_hash = \"{hash}\"\nroles = [{}]\n\n",
            roles.join(", ")
        ));
    }
    let users_file = state.join("users.toml");
    std::fs::write(&users_file, users).unwrap();
    let mut datasets = Vec::new();
    for entry in std::fs::read_dir(dir.join("data")).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        datasets.push(DatasetConfig {
            name: TableName::parse(&stem).unwrap(),
            path,
            format: DatasetFormat::Csv,
            has_header: true,
            delimiter: b',',
            cache: false,
            origin: None,
        });
    }
    start_with(ServiceConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: None,
        datasets,
        policy_dir: dir.to_path_buf(),
        users_file,
        state_dir: state.to_path_buf(),
        limits: Limits::default(),
        metrics_listen: None,
        otlp_endpoint: None,
        console_listen: None,
        cluster,
        state: Default::default(),
    })
    .await
}

pub(crate) async fn run_file(server: &Running, file: &Path) -> Vec<String> {
    let addr = server.addr;
    let next: Arc<Mutex<Option<String>>> = Arc::default();
    let for_make = Arc::clone(&next);
    let mut runner = sqllogictest::Runner::new(move || {
        let principal = for_make.lock().unwrap().clone();
        async move {
            let principal = principal.ok_or_else(|| {
                DbError("every record must start with `connection <principal>`".into())
            })?;
            let channel = Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut client = FlightSqlServiceClient::new(channel);
            client
                .handshake(&principal, &principal)
                .await
                .map_err(|e| DbError(format!("cannot log in as {principal}: {e}")))?;
            Ok(PrincipalDb { client })
        }
    });
    let records = sqllogictest::parse_file::<DefaultColumnType>(file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let mut count = 0;
    let mut failures: Vec<String> = Vec::new();
    for record in records {
        let connection = match &record {
            Record::Statement { connection, .. } | Record::Query { connection, .. } => {
                Some(connection.clone())
            }
            _ => None,
        };
        if let Some(c) = connection {
            let name = match c {
                sqllogictest::Connection::Named(n) => Some(n),
                sqllogictest::Connection::Default => None,
            };
            *next.lock().unwrap() = name;
            count += 1;
        }
        if let Err(e) = runner.run_async(record).await {
            failures.push(e.display(true).to_string());
        }
    }
    eprintln!(
        "{}: {} of {count} records passed",
        file.display(),
        count - failures.len()
    );
    failures
        .into_iter()
        .map(|f| format!("{}: {f}", file.display()))
        .collect()
}

pub(crate) fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/policy");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

/// The `.slt` files of a fixture, in order.
pub(crate) fn slt_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} has no .slt file", dir.display());
    files
}

#[tokio::test]
async fn policy_files() {
    let fixtures = fixtures();
    assert!(!fixtures.is_empty());
    let mut failures = Vec::new();
    for dir in fixtures {
        let state = tempfile::tempdir().unwrap();
        let server = start_fixture(&dir, state.path()).await;
        for f in slt_files(&dir) {
            failures.extend(run_file(&server, &f).await);
        }
    }
    // Every failing record of every file at once, not just the first.
    assert!(
        failures.is_empty(),
        "{} records failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Issue 10 class 7: the analyst's privacy explanation carries no mask secret, no data
/// and no count, even for a table with a `hash` mask.
#[tokio::test]
async fn explanations_carry_no_secret_data_or_count() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/policy/attacks");
    let state = tempfile::tempdir().unwrap();
    let server = start_fixture(&dir, state.path()).await;
    let mut c = airlock::client::Client::connect(
        &format!("grpc://{}", server.addr),
        "analyst",
        "analyst",
        None,
    )
    .await
    .unwrap();
    for sql in [
        "SELECT code, count(*) FROM s.c GROUP BY code",
        "SELECT cat, count(*) FROM s.c WHERE card LIKE '%1' GROUP BY cat",
        "SELECT code FROM s.c",
        "SELECT zip, count(*) FROM s.t GROUP BY zip",
    ] {
        let text = c.explain(sql).await.unwrap();
        // A salt is a long hexadecimal string; no data value of the fixture appears.
        let longest_hex = text
            .split(|ch: char| !ch.is_ascii_hexdigit())
            .map(str::len)
            .max()
            .unwrap_or(0);
        assert!(longest_hex < 16, "{sql}: {text}");
        for value in ["CODE1", "4000-1234", "Name1", "123-45", "10004"] {
            assert!(!text.contains(value), "{sql} shows {value}: {text}");
        }
    }
}
