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

fn secret_file(dir: &Path) -> PathBuf {
    let path = dir.join("cluster.secret");
    std::fs::write(&path, format!("{SECRET}\n")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    path
}

async fn start_workers(n: usize) -> Vec<RunningWorker> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            worker::start("127.0.0.1:0".parse().unwrap(), secret(), 512 << 20)
                .await
                .unwrap(),
        );
    }
    out
}

/// Every scan spread as wide as it goes: the test tables are tiny.
fn cluster(urls: impl IntoIterator<Item = String>, secret_file: PathBuf) -> ClusterConfig {
    ClusterConfig {
        workers: urls
            .into_iter()
            .map(|u| airlock::cluster::parse_worker_url(&u).unwrap())
            .collect(),
        secret_file,
        scan_partition_bytes: Some(1),
    }
}

fn urls(workers: &[RunningWorker]) -> Vec<String> {
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
    let forged = SignedChannels::new(Arc::new(
        ClusterSecret::from_bytes(b"some-other-cluster-secret-0123456789abcdef").unwrap(),
    ));
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
    let ours = SignedChannels::new(secret());
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

/// `airlock worker` as a child process, and the address it listens on.
fn worker_process(secret_file: &Path) -> (std::process::Child, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["worker", "--listen", "127.0.0.1:0", "--cluster-secret-file"])
        .arg(secret_file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("airlock worker listening on ")
        .unwrap_or_else(|| panic!("ready line: {line:?}"))
        .to_string();
    (child, format!("http://{addr}"))
}

fn signal(child: &std::process::Child, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
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
    let mut children: Vec<(std::process::Child, String)> =
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
    children[0].0.wait().unwrap();
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
    for (mut child, _) in children.into_iter().skip(1) {
        child.kill().ok();
        child.wait().ok();
    }
}
