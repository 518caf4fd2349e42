//! Issue 14: the service fails closed under faults (an unwritable or full audit disk,
//! SIGKILL, a half-written line, a truncated log) and stays up under hostile clients
//! (login floods, planning bombs, stalled readers, oversized parameters, bad uploads,
//! out-of-range approvals, malformed protobuf). Each test replays the original attack on
//! loopback and checks the fixed behaviour; figures go to docs/RELIABILITY.md.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use airlock::client::Client;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::sql::{
    Any, CommandStatementIngest, CommandStatementQuery, ProstMessageExt, TicketStatementQuery,
};
use arrow_flight::{Action, FlightDescriptor, Ticket};
use datafusion::arrow::array::{Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

use crate::support::*;

// ---- helpers ---------------------------------------------------------------------------

/// The audit records of a state directory.
fn records(state: &Path) -> Vec<Value> {
    std::fs::read_to_string(airlock::audit::path_in(state))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn verify(state: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["audit", "verify", "--state-dir"])
        .arg(state)
        .output()
        .unwrap()
}

/// `airlock serve --config <path>` with extra environment; waits for the ready line.
fn spawn_server(config: &Path, env: &[(&str, &str)]) -> (Child, std::net::SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["serve", "--config"])
        .arg(config)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = ready_address(&mut child, "airlock listening on ")
        .parse()
        .unwrap();
    (child, addr)
}

/// A demo configuration on a state directory of its own, written as a file.
fn binary_config(state: &Path) -> PathBuf {
    let mut config = demo_config();
    config.state_dir = state.to_path_buf();
    let dir = state.parent().unwrap().join(format!(
        "conf-{}",
        state.file_name().unwrap().to_string_lossy()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    write_config_file(&dir, &config)
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn code_of(s: &tonic::Status) -> Option<&str> {
    s.metadata()
        .get("airlock-reason-code")
        .and_then(|v| v.to_str().ok())
}

#[track_caller]
fn assert_audit_unavailable<T: std::fmt::Debug>(r: Result<T, tonic::Status>) {
    let s = r.expect_err("expected AUDIT_UNAVAILABLE");
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    assert!(s.message().starts_with("[AUDIT_UNAVAILABLE]"), "{s:?}");
    assert_eq!(code_of(&s), Some("AUDIT_UNAVAILABLE"));
}

const GROUPED: &str = "SELECT ward, count(*) AS n FROM hospital.patients GROUP BY ward";

/// The approval request id in an `APPROVAL_PENDING` error.
fn request_id(e: &impl std::fmt::Display) -> String {
    let text = e.to_string();
    text.split("request ")
        .nth(1)
        .and_then(|t| t.split(':').next())
        .unwrap_or_else(|| panic!("no request id in {text}"))
        .to_string()
}

fn rss_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

// ---- 1. audit fails closed, and resumes ------------------------------------------------

struct Immutable(PathBuf);

impl Immutable {
    fn set(path: &Path) -> Option<Self> {
        let ok = Command::new("chattr")
            .arg("+i")
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(path.to_path_buf()))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[tokio::test]
async fn issue14_unwritable_audit_refuses_release_and_readiness_then_resumes() {
    let state = tempfile::tempdir().unwrap();
    let mut config = demo_config();
    config.state_dir = state.path().to_path_buf();
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let server = start_with(config).await;
    let metrics = server.metrics_addr.unwrap();
    let mut c = analyst(&server).await;
    assert!(rows(&query(&mut c, GROUPED).await.unwrap()) > 0);
    assert!(
        http_get(metrics, "/healthz")
            .await
            .starts_with("HTTP/1.1 200")
    );
    assert!(
        http_get(metrics, "/readyz")
            .await
            .starts_with("HTTP/1.1 200")
    );

    let log = airlock::audit::path_in(state.path());
    let Some(guard) = Immutable::set(&log) else {
        println!(
            "SKIPPED issue14 immutable audit file: chattr +i failed (not root or no ext attrs)"
        );
        return;
    };
    let before = records(state.path()).len();
    assert_audit_unavailable(query(&mut c, GROUPED).await);
    let ready = http_get(metrics, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(ready.contains("audit trail"), "{ready}");
    assert!(
        http_get(metrics, "/healthz")
            .await
            .starts_with("HTTP/1.1 200")
    );
    // Decisions are refused too.
    let mut owner = Client::connect(&format!("grpc://{}", server.addr), "owner", "owner", None)
        .await
        .unwrap();
    let mut raw = analyst(&server).await;
    let pending = query(&mut raw, "SELECT name FROM hospital.patients LIMIT 3")
        .await
        .unwrap_err();
    // The pending refusal itself could not be audited: the analyst learns only that.
    assert_eq!(code_of(&pending), Some("AUDIT_UNAVAILABLE"), "{pending:?}");

    drop(guard);
    assert!(rows(&query(&mut c, GROUPED).await.unwrap()) > 0, "resumes");
    assert!(
        http_get(metrics, "/readyz")
            .await
            .starts_with("HTTP/1.1 200")
    );
    let err = owner
        .json_action(airlock::flight::approvals::LIST, json!({"pending": true}))
        .await;
    assert!(err.is_ok());
    let after = records(state.path());
    assert!(after.len() > before);
    assert_eq!(
        after.last().unwrap()["decision"],
        "released",
        "the resumed release ends its record"
    );
    assert!(verify(state.path()).status.success());
}

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Self> {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system of `dir` until a write fails.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![7u8; 64 * 1024];
    while f.write_all(&chunk).and_then(|_| f.sync_data()).is_ok() {}
    // Small writes, to the last block.
    while f.write_all(&[7u8; 512]).and_then(|_| f.sync_data()).is_ok() {}
    path
}

#[tokio::test]
async fn issue14_full_disk_refuses_release_then_resumes() {
    let mount = tempfile::tempdir().unwrap();
    let Some(tmpfs) = Tmpfs::mount(mount.path(), "8m") else {
        println!("SKIPPED issue14 disk full: cannot mount a tmpfs (needs root)");
        return;
    };
    let state = mount.path().join("state");
    let mut config = demo_config();
    config.state_dir = state.clone();
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let server = start_with(config).await;
    let metrics = server.metrics_addr.unwrap();
    let mut c = analyst(&server).await;
    assert!(rows(&query(&mut c, GROUPED).await.unwrap()) > 0);
    let mut released = 1;

    let filler = fill(mount.path());
    // The log file's last page may still take a record or two; then releases stop.
    let mut refused = None;
    for _ in 0..50 {
        match query(&mut c, GROUPED).await {
            Ok(_) => released += 1,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    assert_audit_unavailable::<()>(Err(refused.expect("releases stop on a full disk")));
    assert_audit_unavailable(query(&mut c, GROUPED).await);
    let ready = http_get(metrics, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");

    std::fs::remove_file(&filler).unwrap();
    assert!(rows(&query(&mut c, GROUPED).await.unwrap()) > 0, "resumes");
    released += 1;
    assert!(
        http_get(metrics, "/readyz")
            .await
            .starts_with("HTTP/1.1 200")
    );
    drop(server);
    // Every line in the log is a whole record and the chain holds.
    let text = std::fs::read_to_string(airlock::audit::path_in(&state)).unwrap();
    for line in text.lines() {
        serde_json::from_str::<Value>(line).expect("whole records only");
    }
    let recorded = records(&state)
        .iter()
        .filter(|r| r["decision"] == "released")
        .count();
    assert_eq!(
        recorded, released,
        "every release that returned rows is recorded"
    );
    assert!(verify(&state).status.success());
    drop(tmpfs);
}

// ---- 2 & 3. SIGKILL: records before acting; recovery at start --------------------------

#[tokio::test]
async fn issue14_sigkill_mid_download_leaves_a_record_marked_interrupted_at_restart() {
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("state");
    let conf = binary_config(&state);
    let (mut child, addr) = spawn_server(&conf, &[]);
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut owner = arrow_flight::sql::client::FlightSqlServiceClient::new(channel);
    owner.handshake("owner", "owner").await.unwrap();
    let info = owner
        .execute("SELECT * FROM generate_series(1, 100000000)".into(), None)
        .await
        .unwrap();
    let mut stream = owner.do_get(ticket(&info)).await.unwrap();
    let first = stream.try_next().await.unwrap().expect("a first batch");
    assert!(first.num_rows() > 0);
    child.kill().unwrap();
    child.wait().unwrap();

    let started: Vec<Value> = records(&state)
        .into_iter()
        .filter(|r| r["decision"] == "releasing")
        .collect();
    assert_eq!(
        started.len(),
        1,
        "the release was recorded before its first batch"
    );
    let rid = started[0]["request_id"].clone();

    // A crash in the middle of a later write leaves half a line.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(airlock::audit::path_in(&state))
            .unwrap();
        f.write_all(b"{\"seq\":99,\"time\":\"2026-").unwrap();
    }
    let (mut child, _) = spawn_server(&conf, &[]);
    child.kill().unwrap();
    child.wait().unwrap();
    let after = records(&state);
    assert!(
        after.iter().any(|r| r["decision"] == "partial_line_cut"),
        "the cut is recorded"
    );
    let interrupted: Vec<&Value> = after
        .iter()
        .filter(|r| r["decision"] == "release_interrupted")
        .collect();
    assert_eq!(interrupted.len(), 1);
    assert_eq!(interrupted[0]["request_id"], rid);
    let ok = verify(&state);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[tokio::test]
async fn issue14_sigkill_during_concurrent_approvals_keeps_one_record_per_decision() {
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("state");
    let conf = binary_config(&state);
    let (mut child, addr) = spawn_server(&conf, &[]);
    let url = format!("grpc://{addr}");
    let mut analyst = Client::connect(&url, "analyst", "analyst", None)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for n in 1..=60 {
        let sql = format!("SELECT name FROM hospital.patients LIMIT {n}");
        let mut out = Vec::new();
        let e =
            airlock::client::run_sql(&mut analyst, &sql, airlock::client::Format::Csv, &mut out)
                .await
                .unwrap_err();
        ids.push(request_id(&e));
    }
    let owner = Client::connect(&url, "owner", "owner", None).await.unwrap();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    for id in ids {
        let mut owner = owner.clone();
        let done = done_tx.clone();
        tokio::spawn(async move {
            let r = owner
                .json_action(airlock::flight::approvals::APPROVE, json!({ "id": id }))
                .await;
            let _ = done.send(r.is_ok());
        });
    }
    // Kill while approvals are in flight.
    for _ in 0..10 {
        done_rx.recv().await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Restarting reconciles the decisions committed with their records.
    let (mut child, _) = spawn_server(&conf, &[]);
    child.kill().unwrap();
    child.wait().unwrap();

    let db = rusqlite::Connection::open(airlock::audit::anchor_db(&state)).unwrap();
    let approved: i64 = db
        .query_row(
            "SELECT count(*) FROM requests WHERE status = 'approved'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let decided: Vec<String> = records(&state)
        .iter()
        .filter(|r| r["kind"] == "decision" && r["decision"] == "approved")
        .map(|r| r["approval"].as_str().unwrap().to_string())
        .collect();
    let unique: std::collections::BTreeSet<_> = decided.iter().collect();
    println!(
        "issue14 kill during approvals: {approved} approved in SQLite, {} records",
        decided.len()
    );
    assert!(approved >= 10);
    assert_eq!(decided.len(), unique.len(), "one record per decision");
    assert_eq!(
        approved as usize,
        decided.len(),
        "every decision has its record"
    );
    assert!(verify(&state).status.success());
}

// ---- 4. truncation of the tail ---------------------------------------------------------

#[tokio::test]
async fn issue14_tail_truncation_and_rewritten_chains_are_detected() {
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("state");
    let conf = binary_config(&state);
    let (mut child, addr) = spawn_server(&conf, &[]);
    let url = format!("grpc://{addr}");
    let mut c = Client::connect(&url, "analyst", "analyst", None)
        .await
        .unwrap();
    for _ in 0..3 {
        let mut out = Vec::new();
        airlock::client::run_sql(&mut c, GROUPED, airlock::client::Format::Csv, &mut out)
            .await
            .unwrap();
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(verify(&state).status.success());
    let path = airlock::audit::path_in(&state);
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // Drop the last two records: the chain that is left is intact, the anchor is not met.
    std::fs::write(&path, lines[..lines.len() - 2].join("\n") + "\n").unwrap();
    let out = verify(&state);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("removed from the end"), "{err}");
    // A chain recomputed with plain SHA-256 (the old format) is not accepted.
    let mut prev = airlock::audit::GENESIS.to_string();
    let mut forged = String::new();
    for line in &lines {
        let mut r: Value = serde_json::from_str(line).unwrap();
        r["prev"] = Value::String(prev.clone());
        let obj = r.as_object_mut().unwrap();
        obj.remove("hash");
        let body = serde_json::to_string(obj).unwrap();
        use sha2::Digest;
        let h: String = sha2::Sha256::digest(format!("{prev}{body}").as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        obj.insert("hash".into(), Value::String(h.clone()));
        prev = h;
        forged.push_str(&serde_json::to_string(&r).unwrap());
        forged.push('\n');
    }
    std::fs::write(&path, forged).unwrap();
    assert!(!verify(&state).status.success());
    let key = airlock::audit::key_path(&state);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the key is readable by its owner only");
    }
}

// ---- 5. coverage -----------------------------------------------------------------------

#[tokio::test]
async fn issue14_uploads_planning_errors_doget_failures_explain_and_failed_logins_are_audited() {
    let state = tempfile::tempdir().unwrap();
    let mut config = demo_config();
    config.state_dir = state.path().to_path_buf();
    let server = start_with(config).await;
    let url = format!("grpc://{}", server.addr);

    // A failed login.
    let mut bad = arrow_flight::sql::client::FlightSqlServiceClient::new(channel(&server).await);
    assert!(bad.handshake("analyst", "wrong").await.is_err());
    // A planning error.
    let mut c = analyst(&server).await;
    let e = query(&mut c, "SELECT * FROM hospital.nope")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // A DoGet failure: an unknown ticket.
    let ticket = TicketStatementQuery {
        statement_handle: vec![0u8; 16].into(),
    };
    let e = c
        .do_get(Ticket::new(ticket.as_any().encode_to_vec()))
        .await
        .unwrap_err();
    assert_eq!(status(e).code(), Code::InvalidArgument);
    // PrivacyExplain.
    let mut client = Client::connect(&url, "analyst", "analyst", None)
        .await
        .unwrap();
    client.explain(GROUPED).await.unwrap();
    // An upload.
    let mut owner = owner(&server).await;
    let batch = RecordBatch::try_new(
        std::sync::Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)])),
        vec![std::sync::Arc::new(Int64Array::from(vec![1, 2, 3]))],
    )
    .unwrap();
    let n = owner
        .execute_ingest(
            CommandStatementIngest {
                table: "audited".into(),
                schema: Some("uploads".into()),
                table_definition_options: None,
                ..Default::default()
            },
            futures::stream::iter(vec![Ok(batch)]),
        )
        .await
        .unwrap();
    assert_eq!(n, 3);
    drop(server);

    let all = records(state.path());
    let has = |kind: &str, decision: &str| {
        all.iter()
            .any(|r| r["kind"] == kind && r["decision"] == decision)
    };
    assert!(has("login", "failed"), "{all:#?}");
    assert!(
        all.iter().any(|r| r["kind"] == "query"
            && r["decision"] == "failed"
            && r["sql"] == "SELECT * FROM hospital.nope"),
        "planning error"
    );
    assert!(
        all.iter()
            .any(|r| r["kind"] == "query" && r["decision"] == "failed" && r["sql"].is_null()),
        "DoGet failure"
    );
    assert!(has("explain", "explained"));
    assert!(
        all.iter().any(|r| r["kind"] == "upload"
            && r["decision"] == "ingested"
            && r["rows_released"] == 3),
        "upload"
    );
}

// ---- 6. login floods -------------------------------------------------------------------

#[tokio::test]
async fn issue14_login_flood_is_bounded_in_memory_and_throttled() {
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("state");
    let conf = binary_config(&state);
    // No throttle here: the concurrency bound alone must hold memory.
    let (mut child, addr) = spawn_server(&conf, &[("AIRLOCK_FAILED_LOGINS_PER_MINUTE", "100000")]);
    let pid = child.id();
    let url = format!("grpc://{addr}");
    let mut probe = Client::connect(&url, "analyst", "analyst", None)
        .await
        .unwrap();
    let base = rss_kb(pid, "VmRSS:");
    let mut flood = Vec::new();
    for i in 0..40 {
        flood.push(tokio::spawn(async move {
            let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut c = arrow_flight::sql::client::FlightSqlServiceClient::new(channel);
            c.handshake(&format!("user{}", i % 5), "wrong")
                .await
                .is_err()
        }));
    }
    let started = Instant::now();
    let mut out = Vec::new();
    airlock::client::run_sql(&mut probe, GROUPED, airlock::client::Format::Csv, &mut out)
        .await
        .unwrap();
    let probe_latency = started.elapsed();
    for f in flood {
        assert!(f.await.unwrap(), "wrong passwords are refused");
    }
    let peak = rss_kb(pid, "VmHWM:");
    println!(
        "issue14 login flood: RSS {} MB before, peak {} MB after 40 concurrent bad logins; probe query {:?}",
        base / 1024,
        peak / 1024,
        probe_latency
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(peak < 1024 * 1024, "peak RSS {} MB", peak / 1024);
    let failed = records(&state)
        .iter()
        .filter(|r| r["kind"] == "login" && r["decision"] == "failed")
        .count();
    assert_eq!(failed, 40, "each failed login is one record");

    // With the throttle: the 11th failure within a minute is refused without argon2.
    let mut config = demo_config();
    config.limits.failed_logins_per_minute = 3;
    let server = start_with(config).await;
    let mut codes = Vec::new();
    for _ in 0..5 {
        let mut c = arrow_flight::sql::client::FlightSqlServiceClient::new(channel(&server).await);
        // The client wraps the handshake's status in an Arrow error: read its text.
        codes.push(
            c.handshake("analyst", "wrong")
                .await
                .unwrap_err()
                .to_string(),
        );
    }
    assert!(
        codes[..3]
            .iter()
            .all(|m| m.contains("invalid username or password")),
        "{codes:?}"
    );
    for m in &codes[3..] {
        assert!(m.contains("resource has been exhausted"), "{m}");
        assert!(
            m.contains("[RATE_LIMITED]") && m.contains("retry in"),
            "{m}"
        );
    }
    let rate_limited = records(&server.airlock.config.state_dir)
        .iter()
        .filter(|r| r["kind"] == "login" && r["decision"] == "rate_limited")
        .count();
    assert_eq!(rate_limited, 2);
}

// ---- 7. planning bombs -----------------------------------------------------------------

#[tokio::test]
async fn issue14_planning_bombs_are_refused_before_planning_and_do_not_stall_others() {
    let server = start().await;
    let slices = format!("SELECT make_array(1){}", "[1:1]".repeat(300));
    let sum = format!("SELECT {}", vec!["1"; 1999].join("+"));
    let mut c = analyst(&server).await;
    for sql in [&slices, &sum] {
        let started = Instant::now();
        let e = query(&mut c, sql).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("too complex"), "{e:?}");
        println!("issue14 bomb refused in {:?}", started.elapsed());
    }
    // Attackers hammer the server while a probe measures a normal query.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut attackers = Vec::new();
    for _ in 0..4 {
        let mut c = analyst(&server).await;
        let slices = slices.clone();
        let stop = std::sync::Arc::clone(&stop);
        attackers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = query(&mut c, &slices).await;
                n += 1;
            }
            n
        }));
    }
    let mut probe = analyst(&server).await;
    let mut worst = Duration::ZERO;
    for _ in 0..10 {
        let started = Instant::now();
        assert!(rows(&query(&mut probe, GROUPED).await.unwrap()) > 0);
        worst = worst.max(started.elapsed());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent = 0;
    for a in attackers {
        sent += a.await.unwrap();
    }
    println!("issue14 planning attack: {sent} bombs sent; worst probe latency {worst:?}");
    assert!(
        worst < Duration::from_secs(10),
        "probe stalled for {worst:?}"
    );
}

#[tokio::test]
async fn issue14_slow_planning_runs_inside_the_query_timeout() {
    let mut config = demo_config();
    // Let the bomb through the size check: the timeout alone must hold it.
    config.limits.max_expression_depth = 100_000;
    config.limits.query_timeout = Duration::from_millis(1500);
    let server = start_with(config).await;
    let mut c = analyst(&server).await;
    let slices = format!("SELECT make_array(1){}", "[1:1]".repeat(200));
    let started = Instant::now();
    let e = query(&mut c, &slices).await.unwrap_err();
    let took = started.elapsed();
    println!("issue14 200-slice plan ended after {took:?}: {e:?}");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("planning"), "{e:?}");
    assert!(took < Duration::from_secs(6), "{took:?}");
}

// ---- 8. stalled readers ----------------------------------------------------------------

#[tokio::test]
async fn issue14_stalled_readers_lose_their_slots_after_the_idle_timeout() {
    let mut config = demo_config();
    config.limits.max_concurrent_queries = 4;
    config.limits.query_timeout = Duration::from_secs(4);
    config.limits.stream_idle_timeout = Duration::from_millis(500);
    let server = start_with(config).await;
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut c = owner(&server).await;
        let info = c
            .execute("SELECT * FROM generate_series(1, 100000000)".into(), None)
            .await
            .unwrap();
        let mut s = c.do_get(ticket(&info)).await.unwrap();
        s.try_next().await.unwrap().expect("one batch");
        stalled.push((c, s));
    }
    let mut probe = owner(&server).await;
    let started = Instant::now();
    assert_eq!(rows(&query(&mut probe, "SELECT 1").await.unwrap()), 1);
    let latency = started.elapsed();
    println!("issue14 stalled readers: probe answered after {latency:?}");
    // Wait until every stalled stream was cancelled (their end records are written).
    let state = server.airlock.config.state_dir.clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    while records(&state)
        .iter()
        .filter(|r| r["decision"] == "released_incomplete")
        .count()
        < 4
    {
        assert!(
            Instant::now() < deadline,
            "stalled streams were not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A stalled reader that resumes learns why its stream ended.
    let (_, mut s) = stalled.pop().unwrap();
    let mut ended = None;
    while let Some(item) = s.next().await {
        if let Err(e) = item {
            ended = Some(status(e));
            break;
        }
    }
    let e = ended.expect("the stream was cancelled");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("not read"), "{e:?}");
}

// ---- 9. oversized parameters -----------------------------------------------------------

#[tokio::test]
async fn issue14_parameter_bytes_are_bounded() {
    let mut config = demo_config();
    config.limits.max_parameter_bytes = 64 * 1024;
    let server = start_with(config).await;
    let mut c = owner(&server).await;
    let mut stmt = c
        .prepare("SELECT length($1) AS n".into(), None)
        .await
        .unwrap();
    let big = "x".repeat(256 * 1024);
    let batch = RecordBatch::try_new(
        std::sync::Arc::new(Schema::new(vec![Field::new("$1", DataType::Utf8, true)])),
        vec![std::sync::Arc::new(StringArray::from(vec![big.as_str()]))],
    )
    .unwrap();
    stmt.set_parameters(batch).unwrap();
    let e = status(stmt.execute().await.unwrap_err());
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("limit"), "{e:?}");
    // A small one still binds and runs.
    let small = RecordBatch::try_new(
        std::sync::Arc::new(Schema::new(vec![Field::new("$1", DataType::Utf8, true)])),
        vec![std::sync::Arc::new(StringArray::from(vec!["abc"]))],
    )
    .unwrap();
    stmt.set_parameters(small).unwrap();
    let info = stmt.execute().await.unwrap();
    let (_, batches) = fetch(&mut c, info).await.unwrap();
    assert_eq!(rows(&batches), 1);
}

// ---- 10. uploads stay in their schema --------------------------------------------------

#[tokio::test]
async fn issue14_uploads_land_only_in_the_uploads_schema() {
    let server = start().await;
    let mut c = owner(&server).await;
    let batch = || {
        RecordBatch::try_new(
            std::sync::Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)])),
            vec![std::sync::Arc::new(Int64Array::from(vec![1]))],
        )
        .unwrap()
    };
    let long = "t".repeat(5000);
    for (schema, table) in [
        ("information_schema", "tables"),
        ("public", "t"),
        ("hospital", "newt"),
        ("uploads", long.as_str()),
        ("uploads", "Bad-Name"),
    ] {
        let e = c
            .execute_ingest(
                CommandStatementIngest {
                    table: table.into(),
                    schema: Some(schema.into()),
                    ..Default::default()
                },
                futures::stream::iter(vec![Ok(batch())]),
            )
            .await
            .unwrap_err();
        let e = status(e);
        if schema == "uploads" {
            assert_eq!(e.code(), Code::InvalidArgument, "{schema}.{table}: {e:?}");
        } else {
            assert_eq!(e.code(), Code::PermissionDenied, "{schema}: {e:?}");
            assert_eq!(code_of(&e), Some("WRITE_NOT_ALLOWED"));
            assert!(e.message().contains("uploads schema only"), "{e:?}");
        }
    }
    // information_schema still works for everyone.
    let mut a = analyst(&server).await;
    assert!(
        rows(
            &query(&mut a, "SELECT table_name FROM information_schema.tables")
                .await
                .unwrap()
        ) > 0
    );
    let n = c
        .execute_ingest(
            CommandStatementIngest {
                table: "fine".into(),
                schema: Some("uploads".into()),
                ..Default::default()
            },
            futures::stream::iter(vec![Ok(batch())]),
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
}

// ---- 11. approval values ---------------------------------------------------------------

#[tokio::test]
async fn issue14_approval_values_out_of_range_are_refused() {
    let server = start().await;
    let url = format!("grpc://{}", server.addr);
    let mut analyst = Client::connect(&url, "analyst", "analyst", None)
        .await
        .unwrap();
    let mut out = Vec::new();
    let e = airlock::client::run_sql(
        &mut analyst,
        "SELECT name FROM hospital.patients LIMIT 2",
        airlock::client::Format::Csv,
        &mut out,
    )
    .await
    .unwrap_err();
    let id = request_id(&e);
    let mut owner = Client::connect(&url, "owner", "owner", None).await.unwrap();
    for body in [
        json!({ "id": id, "max_rows": u64::MAX }),
        json!({ "id": id, "expires_in_secs": i64::MAX }),
        json!({ "id": id, "expires_in_secs": 0 }),
        json!({ "id": id, "expires_in_secs": -5 }),
    ] {
        let e = owner
            .json_action(airlock::flight::approvals::APPROVE, body.clone())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("InvalidArgument"), "{body}: {e}");
    }
    let ok = owner
        .json_action(
            airlock::flight::approvals::APPROVE,
            json!({ "id": id, "max_rows": 1, "expires_in_secs": 3600 }),
        )
        .await
        .unwrap();
    assert_eq!(ok["max_rows"], 1);
    assert!(ok["expires_at"].as_i64().unwrap() > airlock::approval::now());
}

// ---- 12. malformed protobuf ------------------------------------------------------------

#[tokio::test]
async fn issue14_malformed_protobuf_is_invalid_argument() {
    let server = start().await;
    let token = {
        let mut c = arrow_flight::sql::client::FlightSqlServiceClient::new(channel(&server).await);
        c.handshake("analyst", "analyst").await.unwrap();
        c.token().unwrap().clone()
    };
    let mut raw = FlightServiceClient::new(channel(&server).await);
    // A valid Any whose value is not the message its type names.
    let garbage = |type_url: &str| {
        Any {
            type_url: type_url.into(),
            value: vec![0x0a, 0xff, 0xff].into(),
        }
        .encode_to_vec()
    };
    let query_url = CommandStatementQuery::type_url();
    let e = raw
        .get_flight_info(with_token(
            FlightDescriptor::new_cmd(garbage(query_url)),
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "descriptor: {e:?}");
    let e = raw
        .do_get(with_token(
            Ticket::new(garbage(TicketStatementQuery::type_url())),
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "ticket: {e:?}");
    let e = raw
        .do_action(with_token(
            Action::new(
                "CreatePreparedStatement",
                garbage("type.googleapis.com/arrow.flight.protocol.sql.ActionCreatePreparedStatementRequest"),
            ),
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "action: {e:?}");
    let put = arrow_flight::FlightData {
        flight_descriptor: Some(FlightDescriptor::new_cmd(garbage(
            CommandStatementIngest::type_url(),
        ))),
        ..Default::default()
    };
    let e = raw
        .do_put(with_token(futures::stream::iter(vec![put]), &token))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "do_put: {e:?}");
    // The server is fine.
    let mut c = analyst(&server).await;
    assert!(rows(&query(&mut c, GROUPED).await.unwrap()) > 0);
}
