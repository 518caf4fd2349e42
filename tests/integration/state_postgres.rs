//! Shared state in PostgreSQL (issue 13): a real PostgreSQL server (Debian's, run as the
//! unprivileged `postgres` user from a temporary data directory), two front ends and
//! three workers on loopback. A request made through front end A is approved and
//! released through front end B, a token issued by A is honoured by B, both write one
//! audit chain that `airlock audit verify` accepts, and with PostgreSQL stopped a front
//! end refuses queries and recovers when it is back.
//!
//! The PostgreSQL binaries come from `AIRLOCK_TEST_PG_BIN` or `/usr/lib/postgresql/*/bin`
//! (`scripts/test.sh` installs Debian's `postgresql` when missing).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use airlock::approval::budget::BudgetLedger;
use airlock::state::conformance;
use airlock::state::postgres::PgState;
use arrow_flight::sql::client::FlightSqlServiceClient;
use serde_json::json;

use crate::approvals::{login, request_id};
use crate::cluster::{cluster, secret_file, start_workers, urls};
use crate::mtls::TestCa;
use crate::support::*;

/// A PostgreSQL server of this test's own, stopped (immediately) on drop.
struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

fn pg_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("AIRLOCK_TEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").exists())
        .collect();
    found.sort();
    found.pop().expect(
        "PostgreSQL's server binaries are needed (Debian's postgresql package: scripts/test.sh installs it), \
         or set AIRLOCK_TEST_PG_BIN",
    )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

impl Postgres {
    /// `initdb` and start, as `postgres` when this runs as root (PostgreSQL refuses
    /// root), on a free loopback port, sockets in the data directory's parent.
    fn start() -> Self {
        Self::start_with(None)
    }

    /// [`Postgres::start`]; with `ca`, TLS only: a certificate for localhost from `ca`,
    /// and `pg_hba.conf` accepting TCP connections over TLS alone.
    fn start_with(ca: Option<&TestCa>) -> Self {
        let bin = pg_bin();
        let dir = tempfile::tempdir().unwrap();
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown the data directory to postgres");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = Self { dir, bin, port };
        pg.run(
            "initdb",
            &[
                "-D",
                &pg.data(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        if let Some(ca) = ca {
            let data = pg.dir.path().join("data");
            let (cert, key) = ca.issue("localhost", &["localhost"], false);
            std::fs::write(data.join("server.crt"), cert).unwrap();
            std::fs::write(data.join("server.key"), key).unwrap();
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
            )
            .unwrap();
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(
                    data.join("server.key"),
                    std::fs::Permissions::from_mode(0o600),
                )
                .unwrap();
            }
            if is_root() {
                for f in ["server.crt", "server.key", "pg_hba.conf"] {
                    Command::new("chown")
                        .arg("postgres:postgres")
                        .arg(data.join(f))
                        .status()
                        .unwrap();
                }
            }
            let mut conf = std::fs::OpenOptions::new()
                .append(true)
                .open(data.join("postgresql.conf"))
                .unwrap();
            std::io::Write::write_all(&mut conf, b"ssl = on\n").unwrap();
        }
        pg.start_again();
        pg
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// A PostgreSQL tool, as `postgres` when this runs as root, from a directory that
    /// user can read.
    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.current_dir(self.dir.path());
        cmd
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self.command(tool).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start_again(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-o",
                &options,
                "-w",
                "start",
            ],
        );
    }

    fn stop(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self
            .command("pg_ctl")
            .args(["-D", &data, "-m", "immediate", "stop"])
            .output();
    }
}

fn key_file(dir: &Path) -> PathBuf {
    let path = dir.join("audit.key");
    airlock::audit::load_key_at(&path, true).unwrap();
    path
}

/// `airlock audit <command> --state-url <pg> --audit-key-file <key> <extra...>`.
fn audit_cli(command: &str, pg: &Postgres, key: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args([
            "audit",
            command,
            "--state-url",
            &pg.url(),
            "--audit-key-file",
        ])
        .arg(key)
        .args(extra)
        .output()
        .unwrap()
}

/// A front end's state on `pg`, its anchor in `state_dir`.
async fn connect(pg: &Postgres, key: &Path, state_dir: &Path) -> PgState {
    PgState::open(
        &pg.url(),
        None,
        airlock::audit::load_key_at(key, false).unwrap(),
        state_dir,
    )
    .await
    .unwrap()
}

fn event(principal: &str, request_id: &str, decision: &str) -> airlock::audit::Event {
    airlock::audit::Event {
        kind: "query".into(),
        principal: principal.into(),
        request_id: request_id.into(),
        decision: decision.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_keeps_the_promises_of_the_embedded_store() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let a = connect(&pg, &key, &dir.path().join("a")).await;
    let b = connect(&pg, &key, &dir.path().join("b")).await;
    conformance::approvals(&a, "pg-").await;
    conformance::ledger(&a, "analyst").await;
    // Two front ends racing on one principal's budget.
    let ledgers: Vec<Arc<dyn BudgetLedger>> = vec![Arc::new(a.clone()), Arc::new(b.clone())];
    conformance::concurrent_charges(ledgers, "racer").await;

    // Two front ends appending at once write one chain.
    let mut tasks = Vec::new();
    for (i, s) in [a.clone(), b.clone()].into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            for n in 0..50 {
                airlock::audit::AuditTrail::append(
                    &s,
                    airlock::audit::Event {
                        kind: "login".into(),
                        principal: format!("fe{i}"),
                        request_id: format!("{i}-{n}"),
                        decision: "failed".into(),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (records, _) = a.verify().await.unwrap();
    assert!(records >= 100, "{records}");

    // A front end that stopped during a release: its release is marked interrupted by
    // the next front end that checks (here: one opening).
    let c = PgState::reader(
        &pg.url(),
        None,
        airlock::audit::load_key_at(&key, false).unwrap(),
        None,
    )
    .unwrap();
    airlock::audit::AuditTrail::append(
        &c,
        event("analyst", "lost-release", airlock::audit::RELEASING),
    )
    .await
    .unwrap();
    let _d = connect(&pg, &key, &dir.path().join("d")).await;
    let tail = a.tail(3).await.unwrap().join("\n");
    assert!(
        tail.contains(airlock::audit::RELEASE_INTERRUPTED) && tail.contains("lost-release"),
        "{tail}"
    );
    a.verify().await.unwrap();

    // A front end with another key refuses to start rather than write records nobody
    // can verify.
    let other = tempfile::tempdir().unwrap();
    let err = PgState::open(
        &pg.url(),
        None,
        airlock::audit::load_key_at(&key_file(other.path()), false).unwrap(),
        other.path(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("--audit-key-file"), "{err}");
}

/// Hostile round 11: whoever can write the database cut the newest records off the
/// chain and moved its head back, and the chain still verified. Each front end now keeps
/// the last record it wrote outside the database: it refuses to append to a chain that
/// lost it, and `airlock audit verify --state-dir` of that front end fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_cut_off_the_end_by_a_database_writer_are_caught_by_the_front_end_that_wrote_them()
{
    use airlock::audit::AuditTrail;
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    let a = connect(&pg, &key, &a_dir).await;
    let b = connect(&pg, &key, &b_dir).await;
    b.append(event("analyst", "b1", "refused")).await.unwrap();
    a.append(event("owner", "a1", "releasing")).await.unwrap();
    let cut = a.append(event("owner", "a1", "released")).await.unwrap();

    let (client, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let before: String = client
        .query_one(
            "SELECT line FROM audit_records WHERE seq = $1",
            &[&(cut.seq as i64 - 2)],
        )
        .await
        .unwrap()
        .get(0);
    let before: airlock::audit::Record = serde_json::from_str(&before).unwrap();
    client
        .batch_execute(&format!(
            "DELETE FROM audit_records WHERE seq >= {}; DELETE FROM audit_open_releases; UPDATE audit_head SET seq = {}, hash = '{}'",
            cut.seq - 1,
            before.seq,
            before.hash
        ))
        .await
        .unwrap();

    // Another front end carries on (it wrote nothing that was cut); the chain is whole
    // again as far as the database alone can tell.
    b.append(event("analyst", "b2", "refused")).await.unwrap();
    b.append(event("analyst", "b3", "refused")).await.unwrap();
    let alone = PgState::reader(
        &pg.url(),
        None,
        airlock::audit::load_key_at(&key, false).unwrap(),
        None,
    )
    .unwrap();
    alone.verify().await.unwrap();

    // The front end whose records were cut refuses to append, at once and after a restart.
    let err = a
        .append(event("owner", "a2", "refused"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tampered") && err.contains(&format!("record {}", cut.seq)),
        "{err}"
    );
    drop(a);
    let err = PgState::open(
        &pg.url(),
        None,
        airlock::audit::load_key_at(&key, false).unwrap(),
        &a_dir,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("tampered"), "{err}");
    // And verify with its state directory names the cut.
    let out = audit_cli(
        "verify",
        &pg,
        &key,
        &["--state-dir", a_dir.to_str().unwrap()],
    );
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(text.contains(&format!("record {}", cut.seq)), "{text}");
}

const RAW: &str =
    "SELECT name, zip, age FROM hospital.patients WHERE age > 85 ORDER BY zip LIMIT 5";
const AGGREGATE: &str =
    "SELECT zip, count(*) AS n, avg(cost) AS cost FROM hospital.patients GROUP BY zip ORDER BY zip";

async fn run(c: &mut airlock::client::Client, sql: &str) -> Result<String, airlock::client::Error> {
    let mut out = Vec::new();
    airlock::client::run_sql(c, sql, airlock::client::Format::Csv, &mut out).await?;
    Ok(String::from_utf8(out).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_front_ends_and_three_workers_share_requests_tokens_and_one_audit_chain() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let workers = start_workers(3).await;
    let secret = secret_file(dir.path());
    let front_end = |name: &str| {
        let mut config = demo_config();
        config.state_dir = dir.path().join(name);
        config.cluster = Some(cluster(urls(&workers), secret.clone()));
        config.state = airlock::state::StateConfig {
            url: Some(pg.url()),
            audit_key_file: Some(key.clone()),
            ca_file: None,
        };
        config
    };
    let a = start_with(front_end("a")).await;
    let b = start_with(front_end("b")).await;

    // The same aggregate through either front end: the same answer.
    let mut analyst_a = login(a.addr, "analyst").await;
    let mut analyst_b = login(b.addr, "analyst").await;
    let through_a = run(&mut analyst_a, AGGREGATE).await.unwrap();
    assert_eq!(through_a, run(&mut analyst_b, AGGREGATE).await.unwrap());

    // Asked through A, listed and approved through B, released through B.
    let e = run(&mut analyst_a, RAW).await.unwrap_err();
    assert_eq!(e.reason_code().as_deref(), Some("APPROVAL_PENDING"), "{e}");
    let id = request_id(&e);
    let again = run(&mut analyst_b, RAW).await.unwrap_err();
    assert_eq!(request_id(&again), id, "B finds A's request");
    let mut owner_b = login(b.addr, "owner").await;
    let pending = owner_b
        .json_action(airlock::flight::approvals::LIST, json!({ "pending": true }))
        .await
        .unwrap();
    assert!(
        pending.as_array().unwrap().iter().any(|r| r["id"] == id),
        "{pending}"
    );
    owner_b
        .json_action(
            airlock::flight::approvals::APPROVE,
            json!({ "id": id, "max_rows": 3 }),
        )
        .await
        .unwrap();
    let released = run(&mut analyst_b, RAW).await.unwrap();
    assert_eq!(released.lines().count(), 1 + 3, "{released}");
    // Single use: spent through B, so A asks again.
    let after = run(&mut analyst_a, RAW).await.unwrap_err();
    assert_eq!(after.reason_code().as_deref(), Some("APPROVAL_PENDING"));
    assert_ne!(request_id(&after), id);

    // A token issued by A is honoured by B.
    let mut on_a = FlightSqlServiceClient::new(channel(&a).await);
    on_a.handshake("analyst", "analyst").await.unwrap();
    let token = on_a.token().cloned().unwrap();
    let mut on_b = FlightSqlServiceClient::new(channel(&b).await);
    on_b.set_token(token);
    let batches = query(&mut on_b, AGGREGATE).await.unwrap();
    assert!(rows(&batches) > 0);
    let mut forged = FlightSqlServiceClient::new(channel(&b).await);
    forged.set_token("not-a-token".into());
    assert_eq!(
        query(&mut forged, AGGREGATE).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );

    // Both write at once: still one chain.
    tokio::join!(
        async {
            for _ in 0..5 {
                run(&mut analyst_a, AGGREGATE).await.unwrap();
            }
        },
        async {
            for _ in 0..5 {
                run(&mut analyst_b, AGGREGATE).await.unwrap();
            }
        }
    );
    drop((a, b));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    let out = audit_cli("verify", &pg, &key, &[]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("chain intact"), "{text}");
    let tail = audit_cli("tail", &pg, &key, &["--lines", "200"]);
    let tail = String::from_utf8_lossy(&tail.stdout).to_string();
    for wanted in [
        "\"decision\":\"approved\"",
        "\"decision\":\"released_approved\"",
        "\"decision\":\"approval_pending\"",
    ] {
        assert!(tail.contains(wanted), "{wanted} in {tail}");
    }

    // An edited record breaks the chain, and verify names it.
    let (client, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .execute(
            "UPDATE audit_records SET line = replace(line, '\"analyst\"', '\"someone\"') WHERE seq = (SELECT min(seq) FROM audit_records WHERE principal = 'analyst')",
            &[],
        )
        .await
        .unwrap();
    let out = audit_cli("verify", &pg, &key, &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("was edited"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_postgres_stopped_a_front_end_refuses_and_recovers_when_it_is_back() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let mut config = demo_config();
    config.state_dir = dir.path().join("fe");
    config.state = airlock::state::StateConfig {
        url: Some(pg.url()),
        audit_key_file: Some(key_file(dir.path())),
        ca_file: None,
    };
    let server = start_with(config).await;
    let mut analyst = login(server.addr, "analyst").await;
    run(&mut analyst, AGGREGATE).await.unwrap();

    pg.stop();
    let e = run(&mut analyst, AGGREGATE).await.unwrap_err();
    assert_eq!(e.reason_code().as_deref(), Some("AUDIT_UNAVAILABLE"), "{e}");
    // A new login needs the shared token store: refused too, with the same code.
    let e = airlock::client::Client::connect(
        &format!("grpc://{}", server.addr),
        "analyst",
        "analyst",
        None,
    )
    .await
    .map(|_| ())
    .unwrap_err();
    assert!(e.to_string().contains("AUDIT_UNAVAILABLE"), "{e}");

    pg.start_again();
    let mut back = None;
    for _ in 0..50 {
        match run(&mut analyst, AGGREGATE).await {
            Ok(out) => {
                back = Some(out);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
        }
    }
    assert!(back.is_some(), "answers again once PostgreSQL is back");
    let mut fresh = login(server.addr, "analyst").await;
    run(&mut fresh, AGGREGATE).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_ca_file_the_state_travels_over_tls_and_only_to_the_right_server() {
    let ca = TestCa::new("Airlock test PostgreSQL CA");
    let pg = Postgres::start_with(Some(&ca));
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("pg-ca.pem");
    std::fs::write(&ca_file, &ca.cert_pem).unwrap();
    let url = format!("postgres://postgres@localhost:{}/postgres", pg.port);
    let key = key_file(dir.path());
    let load = || airlock::audit::load_key_at(&key, false).unwrap();

    // This server accepts TCP over TLS only: plaintext is turned away.
    assert!(
        tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .is_err()
    );
    let state = PgState::open(&url, Some(&ca_file), load(), &dir.path().join("fe"))
        .await
        .unwrap();
    conformance::approvals(&state, "tls-").await;
    state.verify().await.unwrap();

    // A server whose certificate another CA signed is not trusted.
    let other = TestCa::new("Another CA");
    let other_file = dir.path().join("other-ca.pem");
    std::fs::write(&other_file, &other.cert_pem).unwrap();
    let err = PgState::open(&url, Some(&other_file), load(), &dir.path().join("fe2"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("TLS handshake") && err.contains("UnknownIssuer"),
        "{err}"
    );

    // Another machine needs TLS; with a CA file the URL is accepted.
    assert!(airlock::state::postgres::check_url("postgres://a@db.example/airlock", false).is_err());
    assert!(airlock::state::postgres::check_url("postgres://a@db.example/airlock", true).is_ok());
}

/// Hostile round 11: the end record of a release that finished while PostgreSQL was down
/// was lost, leaving the release open (and later "interrupted") with no row count. It is
/// now kept and written by the first heartbeat that reaches PostgreSQL again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_end_of_a_release_that_finished_during_an_outage_is_written_when_postgres_is_back() {
    use airlock::audit::AuditTrail;
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path());
    let a = connect(&pg, &key, &dir.path().join("a")).await;
    a.append(event("owner", "r1", airlock::audit::RELEASING))
        .await
        .unwrap();
    pg.stop();
    a.record(airlock::audit::Event {
        rows_released: Some(1234),
        ..event("owner", "r1", "released")
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!a.writable());
    pg.start_again();
    let mut written = String::new();
    for _ in 0..40 {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        if let Ok(lines) = a.tail(5).await {
            written = lines.join("\n");
            if written.contains("\"rows_released\":1234") {
                break;
            }
        }
    }
    assert!(written.contains("\"rows_released\":1234"), "{written}");
    assert!(
        !written.contains(airlock::audit::RELEASE_INTERRUPTED),
        "{written}"
    );
    a.verify().await.unwrap();
}
