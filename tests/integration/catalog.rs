//! Datasets from Parquet, CSV and Arrow IPC files and directories; bad sources fail start-up.

use std::path::Path;
use std::sync::Arc;

use airlock::config::{ConfigArgs, ServiceConfig};
use airlock::server::Airlock;
use datafusion::arrow::array::{Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::ipc::writer::FileWriter;

use crate::support::*;

fn batch(offset: i64) -> RecordBatch {
    RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("city", DataType::Utf8, false),
        ])),
        vec![
            Arc::new(Int64Array::from(vec![offset + 1, offset + 2, offset + 3])),
            Arc::new(StringArray::from(vec!["Oslo", "Lyon", "Oslo"])),
        ],
    )
    .unwrap()
}

fn write_fixture(dir: &Path) {
    std::fs::write(dir.join("people.csv"), "id;city\n1;Oslo\n2;Lyon\n3;Oslo\n").unwrap();
    let f = std::fs::File::create(dir.join("people.arrow")).unwrap();
    let mut w = FileWriter::try_new(f, &batch(0).schema()).unwrap();
    w.write(&batch(0)).unwrap();
    w.finish().unwrap();
    std::fs::create_dir(dir.join("parts")).unwrap();
    for i in 0..3 {
        let f = std::fs::File::create(dir.join(format!("parts/part-{i}.parquet"))).unwrap();
        let mut w =
            datafusion::parquet::arrow::ArrowWriter::try_new(f, batch(0).schema(), None).unwrap();
        w.write(&batch(i * 10)).unwrap();
        w.close().unwrap();
    }
    let root = env!("CARGO_MANIFEST_DIR");
    std::fs::create_dir(dir.join("policies")).unwrap();
    std::fs::copy(
        format!("{root}/policies/model.conf"),
        dir.join("policies/model.conf"),
    )
    .unwrap();
    std::fs::write(dir.join("policies/policy.csv"), "p, owner, files.*, read\n").unwrap();
    std::fs::write(dir.join("policies/tables.toml"), "").unwrap();
    std::fs::copy(format!("{root}/conf/users.toml"), dir.join("users.toml")).unwrap();
}

fn config_text(datasets: &str) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\npolicy_dir = \"policies\"\nusers_file = \"users.toml\"\nstate_dir = \"state\"\n{datasets}"
    )
}

fn load(dir: &Path, text: &str) -> Result<ServiceConfig, airlock::config::Diagnostics> {
    let path = dir.join("airlock.toml");
    std::fs::write(&path, text).unwrap();
    ServiceConfig::load(&ConfigArgs {
        config: Some(path),
        ..Default::default()
    })
}

#[tokio::test]
async fn parquet_directories_csv_and_arrow_files_are_tables() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path());
    let config = load(
        dir.path(),
        &config_text(
            "[[datasets]]\nname = \"files.csv_people\"\npath = \"people.csv\"\ndelimiter = \";\"\n\n\
             [[datasets]]\nname = \"files.arrow_people\"\npath = \"people.arrow\"\n\n\
             [[datasets]]\nname = \"files.parquet_people\"\npath = \"parts\"\nformat = \"parquet\"\n",
        ),
    )
    .unwrap();
    let server = start_with(config).await;
    let mut c = owner(&server).await;
    for (table, n) in [
        ("csv_people", 3),
        ("arrow_people", 3),
        ("parquet_people", 9),
    ] {
        let b = query(&mut c, &format!("SELECT id, city FROM files.{table}"))
            .await
            .unwrap();
        assert_eq!(rows(&b), n, "{table}");
        assert_eq!(
            b[0].schema().field(1).data_type(),
            &DataType::Utf8,
            "{table}"
        );
    }
}

#[tokio::test]
async fn missing_or_unreadable_sources_fail_start_up_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path());
    std::fs::write(dir.path().join("broken.parquet"), b"this is not parquet").unwrap();
    std::fs::create_dir(dir.path().join("empty")).unwrap();
    let text = config_text(
        "[[datasets]]\nname = \"files.broken\"\npath = \"broken.parquet\"\n\n\
         [[datasets]]\nname = \"files.empty\"\npath = \"empty\"\nformat = \"csv\"\n",
    );
    let config = load(dir.path(), &text).unwrap();
    let err = Airlock::build(config).await.unwrap_err().to_string();
    assert!(
        err.contains("airlock.toml:5: dataset files.broken: cannot read"),
        "{err}"
    );
    assert!(
        err.contains("airlock.toml:9: dataset files.empty: directory"),
        "{err}"
    );

    let err = load(
        dir.path(),
        &config_text("[[datasets]]\nname = \"files.gone\"\npath = \"gone.parquet\"\n"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("airlock.toml:7: dataset files.gone: path"),
        "{err}"
    );
}

#[tokio::test]
async fn tls_with_rustls() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.path().join("server.crt"), key.cert.pem()).unwrap();
    std::fs::write(
        dir.path().join("server.key"),
        key.signing_key.serialize_pem(),
    )
    .unwrap();
    let mut config = demo_config();
    config.tls = Some(airlock::config::TlsFiles {
        cert: dir.path().join("server.crt"),
        key: dir.path().join("server.key"),
        client_ca: None,
    });
    let server = start_with(config).await;
    let url = format!("grpc+tls://localhost:{}", server.addr.port());
    let mut client = airlock::client::Client::connect(
        &url,
        "analyst",
        "analyst",
        Some(&dir.path().join("server.crt")),
    )
    .await
    .expect("TLS connection with the server's certificate as CA");
    let mut out = Vec::new();
    airlock::client::run_sql(
        &mut client,
        "SELECT 1 AS one",
        airlock::client::Format::Csv,
        &mut out,
    )
    .await
    .unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), "one\n1\n");
    // A plaintext client cannot talk to it.
    let plain = format!("grpc://{}", server.addr);
    assert!(
        airlock::client::Client::connect(&plain, "analyst", "analyst", None)
            .await
            .is_err()
    );
}

async fn count(
    c: &mut arrow_flight::sql::client::FlightSqlServiceClient<tonic::transport::Channel>,
    sql: &str,
) -> i64 {
    let b = query(c, sql).await.unwrap();
    b[0].column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap()
        .value(0)
}

#[tokio::test]
async fn hot_datasets_serve_from_memory_and_reload_when_their_files_change() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path());
    let config = load(
        dir.path(),
        &config_text(
            "[limits]\ncache_memory = \"64MiB\"\ncache_check_interval = \"50ms\"\n\n\
             [[datasets]]\nname = \"files.parquet_people\"\npath = \"parts\"\nformat = \"parquet\"\ncache = true\n",
        ),
    )
    .unwrap();
    let server = start_with(config).await;
    let mut c = owner(&server).await;
    let sql = "SELECT count(*) FROM files.parquet_people";
    assert_eq!(count(&mut c, sql).await, 9);

    // A new file: the rows are read again.
    let part = dir.path().join("parts/part-3.parquet");
    let tmp = dir.path().join("part-3.tmp");
    let mut w = datafusion::parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&tmp).unwrap(),
        batch(0).schema(),
        None,
    )
    .unwrap();
    w.write(&batch(30)).unwrap();
    w.close().unwrap();
    std::fs::rename(&tmp, &part).unwrap();
    let mut seen = 0;
    for _ in 0..200 {
        seen = count(&mut c, sql).await;
        if seen == 12 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(seen, 12, "the added file was loaded");

    // The files vanish: the reload fails and the rows in memory stay in force, which a
    // table reading its files would not manage.
    for i in 0..4 {
        std::fs::remove_file(dir.path().join(format!("parts/part-{i}.parquet"))).unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(count(&mut c, sql).await, 12);
    let b = query(
        &mut c,
        "SELECT city FROM files.parquet_people WHERE id = 31",
    )
    .await
    .unwrap();
    assert_eq!(pretty(&b).matches("Oslo").count(), 1);
}

#[tokio::test]
async fn hot_datasets_over_the_memory_budget_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path());
    let config = load(
        dir.path(),
        &config_text(
            "[limits]\ncache_memory = \"64B\"\n\n\
             [[datasets]]\nname = \"files.arrow_people\"\npath = \"people.arrow\"\n\n\
             [[datasets]]\nname = \"files.parquet_people\"\npath = \"parts\"\nformat = \"parquet\"\ncache = true\n",
        ),
    )
    .unwrap();
    let err = Airlock::build(config).await.unwrap_err().to_string();
    assert!(
        err.contains("airlock.toml:12: dataset files.parquet_people: cache = true: needs more than the 64 B left in limits.cache_memory"),
        "{err}"
    );
    let err = load(
        dir.path(),
        &config_text("[limits]\ncache_memory = \"lots\"\n"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("limits.cache_memory"), "{err}");
}

#[tokio::test]
async fn policy_holds_on_hot_datasets() {
    let mut config = demo_config();
    for d in &mut config.datasets {
        d.cache = true;
    }
    let server = start_with(config).await;
    let mut a = analyst(&server).await;
    let refused = query(&mut a, "SELECT name FROM hospital.patients")
        .await
        .unwrap_err();
    assert!(
        refused.message().contains("AGGREGATE_REQUIRED"),
        "{refused:?}"
    );
    let sql = "SELECT zip, count(*) AS n FROM hospital.patients GROUP BY zip ORDER BY zip";
    let b = query(&mut a, sql).await.unwrap();
    assert!(rows(&b) > 0);
    let cold = start().await;
    let expected = query(&mut analyst(&cold).await, sql).await.unwrap();
    assert_eq!(
        pretty(&b),
        pretty(&expected),
        "the same release, hot or not"
    );
    for batch in &b {
        let n = batch
            .column(1)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        assert!(n.values().iter().all(|&n| n >= 10), "{}", pretty(&b));
    }
}
