//! Policy reload without restart: the admin Flight action and SIGHUP. Atomic; a bad
//! policy leaves the last good one in force.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use airlock::client::Client;

use crate::support::*;

const MAX_SQL: &str = "SELECT max(cost) FROM hospital.patients";

fn copy_policies(to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    for f in ["model.conf", "policy.csv", "tables.toml"] {
        std::fs::copy(format!("{root}/policies/{f}"), to.join(f)).unwrap();
    }
}

fn allow_max(dir: &Path) {
    let text = std::fs::read_to_string(dir.join("tables.toml")).unwrap().replace(
        "min_group_size = 10             # k",
        "aggregates = [\"count\", \"sum\", \"avg\", \"max\"]\nmin_group_size = 10             # k",
    );
    assert!(text.contains("\"max\""));
    std::fs::write(dir.join("tables.toml"), text).unwrap();
}

#[tokio::test]
async fn admin_action_reloads_atomically_and_keeps_the_last_good_policy() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = demo_config();
    config.policy_dir = dir.path().to_path_buf();
    copy_policies(dir.path());
    let server = start_with(config).await;
    let url = format!("grpc://{}", server.addr);
    let mut analyst = Client::connect(&url, "analyst", "analyst", None)
        .await
        .unwrap();
    let mut owner = Client::connect(&url, "owner", "owner", None).await.unwrap();

    let before = analyst.query(MAX_SQL).await.unwrap_err();
    assert!(
        before.to_string().contains("AGGREGATE_NOT_ALLOWED"),
        "{before}"
    );

    // Only a service admin may reload.
    let err = analyst.reload_policy().await.unwrap_err();
    assert_eq!(err.reason_code().as_deref(), Some("ACCESS_DENIED"));

    allow_max(dir.path());
    let answer = owner.reload_policy().await.unwrap();
    assert!(answer.starts_with("policy version 2"), "{answer}");
    assert!(
        analyst.query(MAX_SQL).await.is_ok(),
        "the new policy is in force"
    );

    // A broken policy is refused with its file and line; the last good one stays.
    std::fs::write(
        dir.path().join("tables.toml"),
        "[tables.\"hospital.patients\"]\nprivacy_unit = \"nobody\"\n",
    )
    .unwrap();
    let err = owner.reload_policy().await.unwrap_err().to_string();
    assert!(
        err.contains(
            "tables.toml:2: hospital.patients: privacy_unit column \"nobody\" does not exist"
        ),
        "{err}"
    );
    assert!(
        analyst.query(MAX_SQL).await.is_ok(),
        "still the last good policy"
    );
}

#[test]
fn sighup_reloads_the_policy_of_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    copy_policies(&policies);
    let mut config = demo_config();
    config.policy_dir = policies.clone();
    config.state_dir = dir.path().to_path_buf();
    let (mut child, addr) = serve_binary(&write_config_file(dir.path(), &config));

    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = format!("grpc://{addr}");
    let mut analyst = rt
        .block_on(Client::connect(&url, "analyst", "analyst", None))
        .unwrap();
    assert!(rt.block_on(analyst.query(MAX_SQL)).is_err());

    allow_max(&policies);
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    // Wait (bounded) for the reload to take effect.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if rt.block_on(analyst.query(MAX_SQL)).is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload the policy"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A statement prepared under one policy and run after a reload is planned again: the
/// plan made when it was prepared (its first execution's, see `flight::handles`) belongs
/// to the old policy's session and never runs under the new one.
#[tokio::test]
async fn a_statement_prepared_before_a_reload_runs_under_the_new_policy() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = demo_config();
    config.policy_dir = dir.path().to_path_buf();
    copy_policies(dir.path());
    let without_max = std::fs::read_to_string(dir.path().join("tables.toml")).unwrap();
    allow_max(dir.path());
    let server = start_with(config).await;
    let url = format!("grpc://{}", server.addr);
    let mut admin = Client::connect(&url, "owner", "owner", None).await.unwrap();
    let mut analyst = client(&server, "analyst", "analyst").await;

    // Prepared and run at once: allowed, twice (the second run plans again).
    let mut stmt = analyst.prepare(MAX_SQL.into(), None).await.unwrap();
    for _ in 0..2 {
        let info = stmt.execute().await.unwrap();
        assert_eq!(rows(&fetch(&mut analyst, info).await.unwrap().1), 1);
    }

    // Prepared, then the policy no longer allows max: the run is refused.
    let mut stmt = analyst.prepare(MAX_SQL.into(), None).await.unwrap();
    std::fs::write(dir.path().join("tables.toml"), without_max).unwrap();
    assert!(
        admin
            .reload_policy()
            .await
            .unwrap()
            .starts_with("policy version 2")
    );
    let err = stmt.execute().await.unwrap_err().to_string();
    assert!(err.contains("AGGREGATE_NOT_ALLOWED"), "{err}");
}
