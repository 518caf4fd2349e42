//! Test support: a demo server on 127.0.0.1:0 and authenticated clients.

use std::sync::OnceLock;

use airlock::config::ServiceConfig;
use airlock::server::{Airlock, Running};
use arrow_flight::error::FlightError;
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::{FlightInfo, Ticket};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use futures::TryStreamExt;
use tonic::Status;
use tonic::transport::Channel;

/// The demo's files, generated once per test run (small, so tests stay quick).
pub fn demo_config() -> ServiceConfig {
    static CONFIG: OnceLock<(tempfile::TempDir, ServiceConfig)> = OnceLock::new();
    let (_, config) = CONFIG.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let sizes = airlock::demo::Sizes {
            patients: 3_000,
            staff: 60,
        };
        let config = airlock::demo::prepare(dir.path(), "127.0.0.1:0".parse().unwrap(), sizes)
            .expect("demo files");
        (dir, config)
    });
    config.clone()
}

/// Starts a demo server on a free loopback port.
pub async fn start() -> Running {
    start_with(demo_config()).await
}

pub async fn start_with(mut config: ServiceConfig) -> Running {
    airlock::telemetry::init("warn", false);
    // Every server gets its own state (audit chain, approvals) unless the test chose one.
    if config.state_dir == demo_config().state_dir {
        config.state_dir = tempfile::tempdir().expect("temp dir").keep();
    }
    Airlock::build(config)
        .await
        .expect("valid config")
        .start()
        .await
        .expect("server starts")
}

pub async fn channel(server: &Running) -> Channel {
    Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .expect("connect")
}

/// A Flight SQL client that has done the Basic → bearer handshake.
pub async fn client(
    server: &Running,
    user: &str,
    password: &str,
) -> FlightSqlServiceClient<Channel> {
    let mut c = FlightSqlServiceClient::new(channel(server).await);
    c.handshake(user, password).await.expect("handshake");
    c
}

pub async fn analyst(server: &Running) -> FlightSqlServiceClient<Channel> {
    client(server, "analyst", "analyst").await
}

pub async fn owner(server: &Running) -> FlightSqlServiceClient<Channel> {
    client(server, "owner", "owner").await
}

pub fn ticket(info: &FlightInfo) -> Ticket {
    info.endpoint[0].ticket.clone().expect("ticket")
}

/// Fetches every batch behind a FlightInfo, checking that the stream's schema is
/// exactly the one FlightInfo promised.
pub async fn fetch(
    c: &mut FlightSqlServiceClient<Channel>,
    info: FlightInfo,
) -> Result<(SchemaRef, Vec<RecordBatch>), Status> {
    let promised: SchemaRef = std::sync::Arc::new(
        info.clone()
            .try_decode_schema()
            .expect("schema in FlightInfo"),
    );
    assert_eq!(info.total_records, -1, "no row counts in FlightInfo");
    assert_eq!(info.total_bytes, -1, "no byte counts in FlightInfo");
    let mut stream = c.do_get(ticket(&info)).await.map_err(status)?;
    let mut batches = Vec::new();
    while let Some(b) = stream.try_next().await.map_err(status)? {
        assert_eq!(
            b.schema(),
            promised,
            "batch schema differs from FlightInfo's"
        );
        batches.push(b);
    }
    if let Some(s) = stream.schema() {
        assert_eq!(s, &promised, "stream schema differs from FlightInfo's");
    }
    Ok((promised, batches))
}

/// Runs SQL through GetFlightInfo + DoGet.
pub async fn query(
    c: &mut FlightSqlServiceClient<Channel>,
    sql: &str,
) -> Result<Vec<RecordBatch>, Status> {
    let info = c.execute(sql.to_string(), None).await.map_err(status)?;
    fetch(c, info).await.map(|(_, b)| b)
}

pub fn status(e: FlightError) -> Status {
    match e {
        FlightError::Tonic(s) => *s,
        other => Status::unknown(other.to_string()),
    }
}

pub fn rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(RecordBatch::num_rows).sum()
}

/// The batches as aligned text, for readable assertions.
pub fn pretty(batches: &[RecordBatch]) -> String {
    datafusion::arrow::util::pretty::pretty_format_batches(batches)
        .unwrap()
        .to_string()
}

/// Asserts a refusal: PermissionDenied with `[code]` in the message and header.
#[track_caller]
pub fn assert_refused(result: Result<impl std::fmt::Debug, Status>, code: &str) {
    let s = result.expect_err("expected a refusal");
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(s.message().starts_with(&format!("[{code}]")), "{s:?}");
    assert_eq!(
        s.metadata()
            .get("airlock-reason-code")
            .and_then(|v| v.to_str().ok()),
        Some(code)
    );
}

/// A raw request carrying a bearer token.
pub fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

/// Writes `config` as an `airlock.toml` under `dir` (for tests that run the binary).
pub fn write_config_file(dir: &std::path::Path, config: &ServiceConfig) -> std::path::PathBuf {
    let mut conf = format!(
        "listen = \"127.0.0.1:0\"\npolicy_dir = \"{}\"\nusers_file = \"{}\"\nstate_dir = \"{}\"\n",
        config.policy_dir.display(),
        config.users_file.display(),
        config.state_dir.display()
    );
    for d in &config.datasets {
        conf.push_str(&format!(
            "\n[[datasets]]\nname = \"{}\"\npath = \"{}\"\n",
            d.name,
            d.path.display()
        ));
    }
    let path = dir.join("airlock.toml");
    std::fs::write(&path, conf).unwrap();
    path
}

/// Runs `airlock serve --config <path>` and waits for its ready line.
pub fn serve_binary(config: &std::path::Path) -> (std::process::Child, std::net::SocketAddr) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["serve", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr = ready_address(&mut child, "airlock listening on ")
        .parse()
        .unwrap();
    (child, addr)
}

/// The address a child `airlock` prints on its first stdout line, after `prefix`.
pub fn ready_address(child: &mut std::process::Child, prefix: &str) -> String {
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    line.trim()
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("ready line, got {line:?}"))
        .to_string()
}

/// The demo built in-process (no listener): 2,000 patients, for tests that plan and run
/// queries directly.
pub async fn demo_airlock() -> (Airlock, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = airlock::demo::prepare(
        dir.path(),
        "127.0.0.1:0".parse().unwrap(),
        airlock::demo::Sizes {
            patients: 2_000,
            staff: 40,
        },
    )
    .unwrap();
    (Airlock::build(config).await.unwrap(), dir)
}
