//! The `airlock` binary: sql client formats and refusals, check, user hash.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::support::*;

fn airlock() -> Command {
    Command::new(env!("CARGO_BIN_EXE_airlock"))
}

async fn sql(server: &airlock::server::Running, user: &str, args: &[&str]) -> std::process::Output {
    let url = format!("grpc://{}", server.addr);
    let mut cmd = airlock();
    cmd.args(["sql", "--url", &url, "--user", user])
        .env("AIRLOCK_PASSWORD", user)
        .args(args);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn sql_prints_tables_csv_and_json() {
    let server = start().await;
    let out = sql(
        &server,
        "analyst",
        &["SELECT ward, count(*) AS n FROM hospital.patients GROUP BY ward ORDER BY ward"],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("| ward | n "), "{text}");
    assert!(text.contains("(6 rows)"), "{text}");

    let out = sql(
        &server,
        "analyst",
        &["--format", "csv", "SELECT 1 AS a, 'x' AS b"],
    )
    .await;
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "a,b\n1,x\n");

    let out = sql(
        &server,
        "analyst",
        &[
            "--format",
            "json",
            "SELECT 1 AS a UNION ALL SELECT 2 ORDER BY a",
        ],
    )
    .await;
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "{\"a\":1}\n{\"a\":2}\n"
    );
}

#[tokio::test]
async fn sql_prints_refusals_with_their_code() {
    let server = start().await;
    let out = sql(&server, "analyst", &["DROP TABLE hospital.patients"]).await;
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("PermissionDenied: [STATEMENT_NOT_ALLOWED]"),
        "{err}"
    );

    let out = sql(&server, "analyst", &["SELEC 1"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("InvalidArgument")
    );

    let url = format!("grpc://{}", server.addr);
    let out = airlock()
        .args([
            "sql",
            "--url",
            &url,
            "--user",
            "analyst",
            "--password",
            "nope",
            "SELECT 1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("Unauthenticated")
    );
}

/// The `--flag [env: AIRLOCK_*]` pairs a subcommand's help lists.
fn settings(command: &str) -> std::collections::BTreeSet<(String, String)> {
    let out = airlock().args([command, "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let mut found = std::collections::BTreeSet::new();
    let mut flag = None;
    for line in help.lines() {
        let line = line.trim_start();
        // `-x, --flag <V>` or `--flag <V>` starts an option; its description follows.
        let option = line
            .strip_prefix("--")
            .or_else(|| line.split_once(", --").map(|(_, rest)| rest));
        if let Some(rest) = option.filter(|_| line.starts_with('-')) {
            flag = rest.split_whitespace().next().map(str::to_string);
        }
        if let Some((_, var)) = line.split_once("[env: ")
            && let Some(f) = flag.take()
        {
            let var = var.split(['=', ']']).next().unwrap_or_default();
            found.insert((f, var.to_string()));
        }
    }
    found
}

/// Every setting of `serve` is a flag and an `AIRLOCK_*` variable of `demo` too, except
/// the files the demo writes for itself.
#[test]
fn demo_takes_every_setting_serve_takes() {
    let own = ["config", "policy-dir", "users-file"];
    let serve = settings("serve");
    let demo = settings("demo");
    assert!(serve.len() > 20, "{serve:?}");
    let missing: Vec<_> = serve
        .iter()
        .filter(|(flag, _)| !own.contains(&flag.as_str()))
        .filter(|s| !demo.contains(*s))
        .collect();
    assert!(missing.is_empty(), "demo lacks {missing:?}");
    assert!(demo.contains(&(
        "memory-per-query".to_string(),
        "AIRLOCK_MEMORY_PER_QUERY".to_string()
    )));
}

#[test]
fn user_hash_reads_stdin_and_prints_argon2id() {
    let mut child = airlock()
        .args(["user", "hash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"s3cret\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(!hash.contains("s3cret"));
}

#[test]
fn check_accepts_the_shipped_config_and_names_file_and_line_of_errors() {
    let root = env!("CARGO_MANIFEST_DIR");
    // conf/airlock.toml serves the demo's files from state/demo (gitignored).
    airlock::demo::write_hospital(
        &std::path::Path::new(root).join("state/demo/data"),
        Default::default(),
    )
    .unwrap();
    let out = airlock()
        .current_dir(root)
        .args(["check", "--config", "conf/airlock.toml"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("bad.toml");
    std::fs::write(
        &conf,
        format!(
            "policy_dir = \"{root}/policies\"\nusers_file = \"{root}/conf/users.toml\"\n\n[[datasets]]\nname = \"hospital.patients\"\npath = \"nowhere.parquet\"\n"
        ),
    )
    .unwrap();
    let out = airlock()
        .args(["check", "--config"])
        .arg(&conf)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("bad.toml:6: dataset hospital.patients: path"),
        "{err}"
    );

    // A policy naming a column that does not exist is caught with its line.
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    for f in ["model.conf", "policy.csv"] {
        std::fs::copy(format!("{root}/policies/{f}"), policies.join(f)).unwrap();
    }
    std::fs::write(
        policies.join("tables.toml"),
        "[tables.\"hospital.patients\"]\nprivacy_unit = \"patient_id\"\nwipe = [\"nam\"]\n",
    )
    .unwrap();
    let out = airlock()
        .current_dir(root)
        .args(["check", "--config", "conf/airlock.toml", "--policy-dir"])
        .arg(&policies)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("tables.toml:3: hospital.patients: wiped column \"nam\" does not exist"),
        "{err}"
    );

    // A declared unique key is checked against the data: zip repeats, patient_id does not.
    let check = |tables: &str| {
        std::fs::write(policies.join("tables.toml"), tables).unwrap();
        airlock()
            .current_dir(root)
            .args(["check", "--config", "conf/airlock.toml", "--policy-dir"])
            .arg(&policies)
            .output()
            .unwrap()
    };
    let out = check(
        "[tables.\"hospital.patients\"]\nprivacy_unit = \"patient_id\"\nunique = [[\"patient_id\"], [\"zip\"]]\n",
    );
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("tables.toml:3: hospital.patients: the unique key (zip) repeats in the data"),
        "{err}"
    );
    assert!(!err.contains("(patient_id)"), "{err}");
    let out = check(
        "[tables.\"hospital.patients\"]\nprivacy_unit = \"patient_id\"\nunique = [[\"patient_id\"]]\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
