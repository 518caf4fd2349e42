//! The audit trail: one record per query and decision, hash-chained; `airlock audit`.

use std::process::Command;

use airlock::client::Client;
use serde_json::{Value, json};

use crate::support::*;

#[tokio::test]
async fn queries_and_decisions_are_chained_and_verified() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = demo_config();
    config.state_dir = dir.path().to_path_buf();
    let server = start_with(config).await;
    let url = format!("grpc://{}", server.addr);
    let mut analyst = Client::connect(&url, "analyst", "analyst", None)
        .await
        .unwrap();
    let mut owner = Client::connect(&url, "owner", "owner", None).await.unwrap();
    let mut out = Vec::new();
    let fmt = airlock::client::Format::Csv;
    airlock::client::run_sql(
        &mut analyst,
        "SELECT zip, count(*) FROM hospital.patients GROUP BY zip",
        fmt,
        &mut out,
    )
    .await
    .unwrap();
    let refused = airlock::client::run_sql(
        &mut analyst,
        "SELECT name FROM hospital.patients LIMIT 1",
        fmt,
        &mut out,
    )
    .await
    .unwrap_err();
    let id = refused
        .to_string()
        .split("request ")
        .nth(1)
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .to_string();
    owner
        .json_action(
            airlock::flight::approvals::DENY,
            json!({ "id": id, "reason": "no" }),
        )
        .await
        .unwrap();
    drop(server);

    let path = airlock::audit::path_in(dir.path());
    let records: Vec<Value> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let released = records
        .iter()
        .find(|r| r["decision"] == "released")
        .expect("a released query");
    assert_eq!(released["principal"], "analyst");
    assert!(released["rows_released"].as_u64().unwrap() > 0);
    assert!(
        released["groups_suppressed"].as_u64().unwrap() > 0,
        "the demo has rare zips: {released}"
    );
    assert!(released["sql_fingerprint"].as_str().unwrap().len() == 32);
    let pending = records
        .iter()
        .find(|r| r["decision"] == "approval_pending")
        .expect("a pending query");
    assert_eq!(pending["reason_code"], "APPROVAL_PENDING");
    assert_eq!(pending["approval"], id.as_str());
    let denied = records
        .iter()
        .find(|r| r["decision"] == "denied")
        .expect("a decision");
    assert_eq!(denied["kind"], "decision");
    assert_eq!(denied["principal"], "owner");

    let verify = |state: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_airlock"))
            .args(["audit", "verify", "--state-dir"])
            .arg(state)
            .output()
            .unwrap()
    };
    let ok = verify(dir.path());
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let tail = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["audit", "tail", "-n", "1", "--state-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        String::from_utf8(tail.stdout)
            .unwrap()
            .contains("\"decision\":\"denied\"")
    );

    // An edited line is caught, and named.
    let text = std::fs::read_to_string(&path).unwrap();
    let edited = text.replacen("\"principal\":\"analyst\"", "\"principal\":\"someone\"", 1);
    assert_ne!(edited, text);
    std::fs::write(&path, edited).unwrap();
    let bad = verify(dir.path());
    assert!(!bad.status.success());
    let err = String::from_utf8(bad.stderr).unwrap();
    assert!(
        err.contains("line 1") && err.contains("was edited"),
        "{err}"
    );
}
