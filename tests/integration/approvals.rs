//! The approval workflow end to end: analysts' requests, owners' decisions, durability.

use std::path::Path;
use std::time::{Duration, Instant};

use airlock::client::{Client, Error};
use airlock::config::ServiceConfig;
use airlock::flight::approvals as a;
use serde_json::{Value, json};

use crate::support::*;

const RAW: &str =
    "SELECT name, zip, age FROM hospital.patients WHERE age > 85 ORDER BY zip LIMIT 5";

/// The demo plus a second analyst and a nurse who may approve visits only.
fn config(dir: &Path) -> ServiceConfig {
    let root = env!("CARGO_MANIFEST_DIR");
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    for f in ["model.conf", "tables.toml"] {
        std::fs::copy(format!("{root}/policies/{f}"), policies.join(f)).unwrap();
    }
    let mut policy = std::fs::read_to_string(format!("{root}/policies/policy.csv")).unwrap();
    policy.push_str("p, analyst2, hospital.patients, aggregate\np, analyst2, hospital.patients, request\np, nurse, hospital.visits, approve\n");
    std::fs::write(policies.join("policy.csv"), policy).unwrap();
    let mut users = String::new();
    for (name, role) in [
        ("analyst", "analyst"),
        ("owner", "owner"),
        ("analyst2", "analyst2"),
        ("nurse", "nurse"),
    ] {
        let hash = airlock::auth::hash_password(name).unwrap();
        users.push_str(&format!(
            "[users.{name}]\npassword_hash = \"{hash}\"\nroles = [\"{role}\"]\n\n"
        ));
    }
    std::fs::write(dir.join("users.toml"), users).unwrap();
    let mut config = demo_config();
    config.policy_dir = policies;
    config.users_file = dir.join("users.toml");
    config.state_dir = dir.join("state");
    config
}

pub(crate) async fn login(addr: std::net::SocketAddr, user: &str) -> Client {
    Client::connect(&format!("grpc://{addr}"), user, user, None)
        .await
        .unwrap()
}

/// Runs a query; Ok(rows) or the refusal.
async fn run(c: &mut Client, sql: &str) -> Result<usize, Error> {
    let mut out = Vec::new();
    airlock::client::run_sql(c, sql, airlock::client::Format::Csv, &mut out).await
}

/// Whether the owner's list of pending requests holds `id`.
async fn is_pending(owner: &mut Client, id: &str) -> bool {
    let listed = owner
        .json_action(a::LIST, json!({ "pending": true }))
        .await
        .unwrap();
    listed.as_array().unwrap().iter().any(|r| r["id"] == id)
}

/// The request id of an approval refusal.
pub(crate) fn request_id(e: &Error) -> String {
    let text = e.to_string();
    let rest = text
        .split("request ")
        .nth(1)
        .unwrap_or_else(|| panic!("no request id in {text}"));
    rest.split(':').next().unwrap().to_string()
}

#[tokio::test]
async fn pending_approve_rerun_with_cap_and_single_use() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(config(dir.path())).await;
    let mut analyst = login(server.addr, "analyst").await;
    let mut owner = login(server.addr, "owner").await;

    let e = run(&mut analyst, RAW).await.unwrap_err();
    assert_eq!(e.reason_code().as_deref(), Some("APPROVAL_PENDING"), "{e}");
    assert!(e.to_string().contains("AGGREGATE_REQUIRED"), "{e}");
    let id = request_id(&e);
    // Asking twice finds the same request, even written differently.
    let again = run(
        &mut analyst,
        "select NAME, zip,  age from HOSPITAL.PATIENTS where age > 85 order by zip limit 5",
    )
    .await
    .unwrap_err();
    assert_eq!(request_id(&again), id);
    let status = analyst
        .json_action(a::STATUS, json!({ "id": id }))
        .await
        .unwrap();
    assert_eq!(status["status"], "pending");

    let shown = owner
        .json_action(a::SHOW, json!({ "id": id }))
        .await
        .unwrap();
    assert_eq!(shown["key"]["principal"], "analyst");
    assert_eq!(shown["sql"], RAW);
    assert_eq!(shown["would_release_rows"], 5);
    assert!(shown["plan"].as_str().unwrap().contains("Projection"));
    assert!(
        shown["reasons"]
            .as_str()
            .unwrap()
            .contains("AGGREGATE_REQUIRED")
    );
    assert!(is_pending(&mut owner, &id).await);

    owner
        .json_action(a::APPROVE, json!({ "id": id, "max_rows": 3 }))
        .await
        .unwrap();
    // The analyst's rows: at most 3, masks still applied.
    let mut out = Vec::new();
    let rows = airlock::client::run_sql(&mut analyst, RAW, airlock::client::Format::Csv, &mut out)
        .await
        .unwrap();
    assert_eq!(rows, 3);
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.lines().skip(1).all(|l| l.starts_with("*,")),
        "names are masked: {text}"
    );
    // Single use: the next run is a new request.
    let next = run(&mut analyst, RAW).await.unwrap_err();
    assert_eq!(next.reason_code().as_deref(), Some("APPROVAL_PENDING"));
    assert_ne!(request_id(&next), id);
    // Deciding twice is refused.
    assert!(
        owner
            .json_action(a::DENY, json!({ "id": id, "reason": "late" }))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn deny_other_principals_edits_expiry_and_policy_changes() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let policy_dir = config.policy_dir.clone();
    let server = start_with(config).await;
    let mut analyst = login(server.addr, "analyst").await;
    let mut analyst2 = login(server.addr, "analyst2").await;
    let mut owner = login(server.addr, "owner").await;

    // Deny: the analyst sees the owner's reason, and asking again stays denied.
    let denied_sql = "SELECT ssn FROM hospital.patients LIMIT 1";
    let id = request_id(&run(&mut analyst, denied_sql).await.unwrap_err());
    owner
        .json_action(a::DENY, json!({ "id": id, "reason": "SSNs never leave" }))
        .await
        .unwrap();
    let e = run(&mut analyst, denied_sql).await.unwrap_err();
    assert_eq!(e.reason_code().as_deref(), Some("APPROVAL_DENIED"));
    assert!(
        e.to_string()
            .contains(&format!("request {id}: SSNs never leave")),
        "{e}"
    );

    // Another principal and an edited query do not match an approval.
    let id = request_id(&run(&mut analyst, RAW).await.unwrap_err());
    owner
        .json_action(a::APPROVE, json!({ "id": id, "reusable": true }))
        .await
        .unwrap();
    assert_eq!(run(&mut analyst, RAW).await.unwrap(), 5);
    assert_eq!(run(&mut analyst, RAW).await.unwrap(), 5, "reusable");
    let other = run(&mut analyst2, RAW).await.unwrap_err();
    assert_eq!(other.reason_code().as_deref(), Some("APPROVAL_PENDING"));
    assert_ne!(request_id(&other), id);
    let edited = run(&mut analyst, &RAW.replace("LIMIT 5", "LIMIT 6"))
        .await
        .unwrap_err();
    assert_ne!(request_id(&edited), id);

    // A changed policy does not match it either.
    let mut policy = std::fs::read_to_string(policy_dir.join("policy.csv")).unwrap();
    policy.push_str("# a new policy version\n");
    std::fs::write(policy_dir.join("policy.csv"), policy).unwrap();
    owner.reload_policy().await.unwrap();
    let changed = run(&mut analyst, RAW).await.unwrap_err();
    assert_eq!(changed.reason_code().as_deref(), Some("APPROVAL_PENDING"));
    assert_ne!(request_id(&changed), id);

    // Expiry.
    let id = request_id(&changed);
    owner
        .json_action(
            a::APPROVE,
            json!({ "id": id, "reusable": true, "expires_in_secs": 1 }),
        )
        .await
        .unwrap();
    assert_eq!(run(&mut analyst, RAW).await.unwrap(), 5);
    let deadline = Instant::now() + Duration::from_secs(10);
    while analyst
        .json_action(a::STATUS, json!({ "id": id }))
        .await
        .unwrap()["expired"]
        != Value::Bool(true)
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expired = run(&mut analyst, RAW).await.unwrap_err();
    assert_eq!(expired.reason_code().as_deref(), Some("APPROVAL_PENDING"));
    assert_ne!(request_id(&expired), id);
}

#[tokio::test]
async fn only_approvers_of_every_table_decide() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(config(dir.path())).await;
    let mut analyst = login(server.addr, "analyst").await;
    let mut nurse = login(server.addr, "nurse").await;
    let mut owner = login(server.addr, "owner").await;
    let sql = "SELECT v.department, p.zip FROM hospital.visits v JOIN hospital.patients p ON v.patient_id = p.patient_id LIMIT 2";
    let id = request_id(&run(&mut analyst, sql).await.unwrap_err());
    // The nurse approves visits only: she sees the request but cannot decide it.
    let err = nurse
        .json_action(a::APPROVE, json!({ "id": id }))
        .await
        .unwrap_err();
    assert_eq!(err.reason_code().as_deref(), Some("ACCESS_DENIED"), "{err}");
    let err = nurse
        .json_action(a::DENY, json!({ "id": id, "reason": "no" }))
        .await
        .unwrap_err();
    assert_eq!(err.reason_code().as_deref(), Some("ACCESS_DENIED"));
    // The analyst cannot decide their own request.
    assert!(
        analyst
            .json_action(a::APPROVE, json!({ "id": id }))
            .await
            .is_err()
    );
    owner
        .json_action(a::APPROVE, json!({ "id": id }))
        .await
        .unwrap();
    assert_eq!(run(&mut analyst, sql).await.unwrap(), 2);
}

#[test]
fn a_pending_request_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let conf_path = write_config_file(dir.path(), &config(dir.path()));
    let serve = || serve_binary(&conf_path);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut first, addr) = serve();
    let id = rt.block_on(async {
        let mut analyst = login(addr, "analyst").await;
        request_id(&run(&mut analyst, RAW).await.unwrap_err())
    });
    // kill -9 right after the analyst was told about the request.
    first.kill().unwrap();
    first.wait().unwrap();

    let (mut second, addr) = serve();
    rt.block_on(async {
        let mut owner = login(addr, "owner").await;
        assert!(is_pending(&mut owner, &id).await);
        owner
            .json_action(a::APPROVE, json!({ "id": id }))
            .await
            .unwrap();
        let mut analyst = login(addr, "analyst").await;
        assert_eq!(run(&mut analyst, RAW).await.unwrap(), 5);
    });
    second.kill().unwrap();
    second.wait().unwrap();
}

/// Issue 10 class 6 and PRIVACY.md §6 case 16: the fingerprint covers every literal and
/// every VALUES row; an approval matches no edited query, and the owner sees it whole.
#[tokio::test]
async fn an_approval_matches_no_edited_literal_or_values_row() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(config(dir.path())).await;
    let mut analyst = login(server.addr, "analyst").await;
    let mut owner = login(server.addr, "owner").await;
    let values =
        "(VALUES (61, 'a'), (62, 'b'), (63, 'c'), (64, 'd'), (65, 'e'), (66, 'f')) v(a, tag)";
    let approved = format!(
        "SELECT p.name, p.age, v.tag FROM hospital.patients p JOIN {values} ON p.age = v.a \
         WHERE p.zip <> '00000' AND p.cost > 1.5 AND p.admitted > DATE '2019-01-01' AND p.length_of_stay >= 0 AND (p.sex = 'M') = true"
    );
    let e = run(&mut analyst, &approved).await.unwrap_err();
    let id = request_id(&e);
    let shown = owner
        .json_action(a::SHOW, json!({ "id": id }))
        .await
        .unwrap();
    let plan = shown["plan"].as_str().unwrap();
    assert!(
        plan.contains(r#"Utf8("f")"#) && plan.contains("Int64(66)"),
        "the owner sees every VALUES row: {plan}"
    );
    owner
        .json_action(a::APPROVE, json!({ "id": id, "reusable": true }))
        .await
        .unwrap();
    assert!(run(&mut analyst, &approved).await.is_ok());
    assert!(run(&mut analyst, &approved).await.is_ok(), "reusable");
    let edits = [
        approved.replace("(66, 'f')", "(66, 'f'), (67, 'g')"),
        approved.replace("(66, 'f')", "(66, 'F')"),
        approved.replace("(61, 'a')", "(60, 'a')"),
        approved.replace("'00000'", "'00001'"),
        approved.replace("1.5", "1.25"),
        approved.replace("DATE '2019-01-01'", "DATE '2019-01-02'"),
        approved.replace(">= 0", ">= 1"),
        approved.replace("= true", "= false"),
    ];
    for edited in edits {
        assert_ne!(edited, approved);
        let e = run(&mut analyst, &edited).await.unwrap_err();
        assert_eq!(
            e.reason_code().as_deref(),
            Some("APPROVAL_PENDING"),
            "{edited}: {e}"
        );
        assert_ne!(request_id(&e), id, "{edited} matched the approval");
    }
}
