//! Scale-out (issue 13): a front end with workers gives the answers one process gives,
//! workers answer only callers that prove the cluster secret, and a worker lost in the
//! middle of a query fails that query cleanly, with nothing released.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use airlock::cluster::ClusterConfig;
use airlock::cluster::auth::ClusterSecret;
use airlock::cluster::channel::SignedChannels;
use airlock::cluster::worker::{self, RunningWorker};
use datafusion_distributed::grpc::{BoxCloneSyncChannel, create_worker_client};
use datafusion_distributed::{ChannelResolver, GetWorkerInfoRequest};

use crate::policy_slt::{fixtures, run_file, slt_files, start_fixture_with};
use crate::support::*;

const SECRET: &str = "integration-test-cluster-secret-0123456789abcdef";

fn secret() -> Arc<ClusterSecret> {
    Arc::new(ClusterSecret::from_bytes(SECRET.as_bytes()).unwrap())
}

pub(crate) fn secret_file(dir: &Path) -> PathBuf {
    let path = dir.join("cluster.secret");
    std::fs::write(&path, format!("{SECRET}\n")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    path
}

pub(crate) async fn start_workers(n: usize) -> Vec<RunningWorker> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            worker::start("127.0.0.1:0".parse().unwrap(), secret(), 512 << 20, None)
                .await
                .unwrap(),
        );
    }
    out
}

/// Every scan spread as wide as it goes: the test tables are tiny.
pub(crate) fn cluster(
    urls: impl IntoIterator<Item = String>,
    secret_file: PathBuf,
) -> ClusterConfig {
    ClusterConfig {
        workers: urls
            .into_iter()
            .map(|u| airlock::cluster::parse_worker_url(&u).unwrap())
            .collect(),
        secret_file,
        scan_partition_bytes: Some(1),
        tls: None,
    }
}

pub(crate) fn urls(workers: &[RunningWorker]) -> Vec<String> {
    workers
        .iter()
        .map(|w| format!("http://{}", w.addr))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_policy_corpus_gives_the_same_answers_through_a_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = secret_file(dir.path());
    let workers = start_workers(3).await;
    let mut failures = Vec::new();
    for fixture in fixtures() {
        let state = tempfile::tempdir().unwrap();
        let config = cluster(urls(&workers), secret_file.clone());
        let server = start_fixture_with(&fixture, state.path(), Some(config)).await;
        for f in slt_files(&fixture) {
            failures.extend(run_file(&server, &f).await);
        }
    }
    assert!(
        failures.is_empty(),
        "{} records differ through the cluster:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The stages really ran on the workers, on more than one of them.
    let stages: Vec<u64> = workers.iter().map(RunningWorker::stages).collect();
    assert!(
        stages.iter().filter(|s| **s > 0).count() >= 2,
        "stages per worker: {stages:?}"
    );
    for w in workers {
        w.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_answer_only_callers_that_prove_the_cluster_secret() {
    let w = start_workers(1).await.pop().unwrap();
    let url = url::Url::parse(&format!("http://{}", w.addr)).unwrap();
    // No proof at all: a plain gRPC client of the worker service.
    let plain = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let err = create_worker_client(BoxCloneSyncChannel::new(plain))
        .get_worker_info(GetWorkerInfoRequest {})
        .await
        .err()
        .expect("a caller without the secret is refused");
    assert!(
        err.to_string().contains("answers only its cluster"),
        "{err}"
    );
    // A proof made with another secret.
    let forged = SignedChannels::new(
        Arc::new(ClusterSecret::from_bytes(b"some-other-cluster-secret-0123456789abcdef").unwrap()),
        None,
    );
    let err = forged
        .get_worker_client_for_url(&url)
        .await
        .unwrap()
        .get_worker_info(GetWorkerInfoRequest {})
        .await
        .err()
        .expect("a caller with another secret is refused");
    assert!(
        err.to_string().contains("answers only its cluster"),
        "{err}"
    );
    // The cluster's own secret.
    let ours = SignedChannels::new(secret(), None);
    let info = ours
        .get_worker_client_for_url(&url)
        .await
        .unwrap()
        .get_worker_info(GetWorkerInfoRequest {})
        .await
        .unwrap();
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
    w.stop().await.unwrap();
}

/// A child process killed when dropped, so a failing test leaves no worker behind.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

/// `airlock worker` as a child process, and the address it listens on.
fn worker_process(secret_file: &Path) -> (Reaped, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["worker", "--listen", "127.0.0.1:0", "--cluster-secret-file"])
        .arg(secret_file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr = ready_address(&mut child, "airlock worker listening on ");
    (Reaped(child), format!("http://{addr}"))
}

fn signal(child: &Reaped, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &child.0.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

/// The decisions the audit log holds for one SQL text, in order.
fn decisions(server: &airlock::server::Running, sql: &str) -> Vec<String> {
    let log =
        std::fs::read_to_string(server.airlock.config.state_dir.join("audit/audit.jsonl")).unwrap();
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["sql"].as_str() == Some(sql))
        .filter_map(|r| r["decision"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_lost_mid_query_fails_that_query_and_the_next_one_works() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = secret_file(dir.path());
    let mut children: Vec<(Reaped, String)> =
        (0..3).map(|_| worker_process(&secret_file)).collect();
    let mut config = demo_config();
    config.cluster = Some(cluster(
        children.iter().map(|(_, u)| u.clone()),
        secret_file.clone(),
    ));
    let server = start_with(config).await;
    let sql = "SELECT diagnosis, count(*) AS n, sum(cost) AS total FROM hospital.patients GROUP BY diagnosis ORDER BY diagnosis";
    let mut client = analyst(&server).await;
    let before = pretty(&query(&mut client, sql).await.unwrap());

    // A stopped worker still accepts connections (the kernel queues them), so it stays
    // in the live list and gets its share of the next query, which then waits on it.
    signal(&children[0].0, "-STOP");
    let running = {
        let mut client = analyst(&server).await;
        tokio::spawn(async move { query(&mut client, sql).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !running.is_finished(),
        "the query waits on the stopped worker"
    );
    // Now the worker dies in the middle of it.
    signal(&children[0].0, "-KILL");
    children[0].0.0.wait().unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the query ends once its worker is gone")
        .unwrap();
    let status = outcome.expect_err("a query that lost a worker fails");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("worker of the cluster was lost"),
        "{status:?}"
    );
    let seen = decisions(&server, sql);
    assert_eq!(
        seen.iter().filter(|d| *d == "released").count(),
        1,
        "only the first run was released: {seen:?}"
    );
    assert!(
        seen.last()
            .is_some_and(|d| d == "failed" || d == "released_incomplete"),
        "the failed run is audited as such: {seen:?}"
    );

    // The probe drops the dead worker; the next query runs on the two left.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = pretty(&query(&mut client, sql).await.unwrap());
    assert_eq!(before, after);
    drop(children);
}

/// Writes PEM text to `dir/name` and returns its path.
fn pem(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_cluster_tls_only_members_with_a_certificate_from_the_cluster_ca_connect() {
    use airlock::cluster::tls::{ClusterTls, ClusterTlsFiles};
    let dir = tempfile::tempdir().unwrap();
    let ca = crate::mtls::TestCa::new("cluster CA");
    let ca_file = pem(dir.path(), "ca.pem", &ca.cert_pem);
    let member = |name: &str| {
        let (cert, key) = ca.issue(name, &["127.0.0.1", "localhost"], false);
        ClusterTlsFiles {
            cert: pem(dir.path(), &format!("{name}.pem"), &cert),
            key: pem(dir.path(), &format!("{name}.key"), &key),
            ca: ca_file.clone(),
        }
    };
    let mut workers = Vec::new();
    for i in 0..2 {
        let tls = ClusterTls::load(&member(&format!("worker{i}"))).unwrap();
        workers.push(
            worker::start(
                "127.0.0.1:0".parse().unwrap(),
                secret(),
                512 << 20,
                Some(tls),
            )
            .await
            .unwrap(),
        );
    }
    let urls: Vec<String> = workers
        .iter()
        .map(|w| format!("https://{}", w.addr))
        .collect();

    // A front end with its own certificate: queries run on the workers, as without TLS.
    let mut config = demo_config();
    let mut c = cluster(urls.clone(), secret_file(dir.path()));
    c.tls = Some(member("frontend"));
    config.cluster = Some(c);
    let server = start_with(config).await;
    let sql = "SELECT diagnosis, count(*) AS n FROM hospital.patients GROUP BY diagnosis ORDER BY diagnosis";
    let through_cluster = pretty(&query(&mut analyst(&server).await, sql).await.unwrap());
    let single = start().await;
    assert_eq!(
        through_cluster,
        pretty(&query(&mut analyst(&single).await, sql).await.unwrap())
    );
    assert!(workers.iter().any(|w| w.stages() > 0));

    // The secret alone is not enough: no client certificate, or one from another CA.
    let url = url::Url::parse(&urls[0]).unwrap();
    let no_certificate = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&ca.cert_pem));
    let other_ca = crate::mtls::TestCa::new("another CA");
    let (cert, key) = other_ca.issue("intruder", &["127.0.0.1"], false);
    let foreign = no_certificate
        .clone()
        .identity(tonic::transport::Identity::from_pem(cert, key));
    for tls in [no_certificate, foreign] {
        let caller = SignedChannels::new(secret(), Some(tls));
        let refused = caller
            .get_worker_client_for_url(&url)
            .await
            .unwrap()
            .get_worker_info(GetWorkerInfoRequest {})
            .await;
        assert!(
            refused.is_err(),
            "a caller without a cluster certificate got in"
        );
    }
    for w in workers {
        w.stop().await.unwrap();
    }
}

/// What a query gives: its rows, or its error's code (messages carry request ids).
async fn outcome(server: &airlock::server::Running, sql: &str) -> Result<String, tonic::Code> {
    query(&mut analyst(server).await, sql)
        .await
        .map(|b| pretty(&b))
        .map_err(|s| s.code())
}

/// Hostile round 10: where a shipped input replaced one side of a partitioned join (a
/// scalar subquery's, a generate_series join's), the join failed with an internal error
/// whose appearance followed the planner's estimates (file statistics). Each query now
/// answers through the cluster exactly as through one process.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joins_beside_a_shipped_input_answer_as_on_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let workers = start_workers(2).await;
    let mut config = demo_config();
    config.cluster = Some(cluster(urls(&workers), secret_file(dir.path())));
    let clustered = start_with(config).await;
    let single = start().await;
    let same_age = "SELECT count(*) FROM hospital.patients p WHERE p.age = (SELECT avg(age) FROM hospital.patients WHERE sex = 'F')";
    let mut sqls = vec![
        same_age.to_string(),
        "SELECT count(*) FROM hospital.patients p JOIN (SELECT * FROM generate_series(80, 90) g(x)) s ON p.age = s.x".to_string(),
        "SELECT g.value, count(*) FROM hospital.patients p JOIN generate_series(80, 90) g ON p.age = g.value GROUP BY g.value ORDER BY 1".to_string(),
    ];
    for x in [0, 1000, 5000, 9877, 9878, 20000, 100_000] {
        sqls.push(format!("{same_age} AND p.cost > {x}"));
    }
    for sql in &sqls {
        assert_eq!(
            outcome(&clustered, sql).await,
            outcome(&single, sql).await,
            "{sql}"
        );
    }
    for w in workers {
        w.stop().await.unwrap();
    }
}
