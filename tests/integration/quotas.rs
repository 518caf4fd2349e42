//! Per-principal quotas: queries per minute, queries at once, rows and bytes per day;
//! each refusal's code, status and retry hint; a stream stopped mid-way; the daily
//! count surviving a restart; `MyAccess` showing what is left.

use std::time::Duration;

use airlock::config::{Quota, QuotaOverride, ServiceConfig};
use arrow_flight::Action;
use futures::TryStreamExt;
use serde_json::Value;
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::*;

/// 20 000 integers: three batches (8192 rows each at most), 8 bytes a row.
const SERIES: &str = "SELECT value FROM generate_series(1, 20000)";

fn with_quota(quota: Quota) -> ServiceConfig {
    let mut config = demo_config();
    config.limits.quota = quota;
    // The owner is exempt from the rows limit: overrides replace single keys.
    config.limits.user_quotas.insert(
        "owner".into(),
        (
            QuotaOverride {
                rows_per_day: Some(0),
                bytes_per_day: Some(0),
                ..Default::default()
            },
            None,
        ),
    );
    config
}

/// Asserts a quota refusal: ResourceExhausted, `[code]` first, the reason header, a
/// retry hint in the message and as gRPC RetryInfo.
#[track_caller]
fn assert_quota(result: Result<impl std::fmt::Debug, tonic::Status>, code: &str) -> Duration {
    let s = result.expect_err("expected a quota refusal");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().starts_with(&format!("[{code}]")), "{s:?}");
    assert!(s.message().contains("retry in"), "{s:?}");
    assert_eq!(
        s.metadata()
            .get("airlock-reason-code")
            .and_then(|v| v.to_str().ok()),
        Some(code)
    );
    s.get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo")
}

async fn my_access(
    c: &mut arrow_flight::sql::client::FlightSqlServiceClient<tonic::transport::Channel>,
) -> Value {
    let mut stream = c.do_action(Action::new("MyAccess", "")).await.unwrap();
    let body = stream.try_next().await.unwrap().unwrap();
    serde_json::from_slice(&body.body).unwrap()
}

#[tokio::test]
async fn queries_per_minute_are_rate_limited_per_principal() {
    let server = start_with(with_quota(Quota {
        queries_per_minute: 3,
        ..Default::default()
    }))
    .await;
    let mut a = analyst(&server).await;
    for _ in 0..3 {
        query(&mut a, "SELECT 1").await.unwrap();
    }
    assert_eq!(
        my_access(&mut a).await["quota"]["queries_left_this_minute"],
        0
    );
    let retry = assert_quota(query(&mut a, "SELECT 1").await, "RATE_LIMITED");
    assert!(
        retry <= Duration::from_secs(60) && retry > Duration::ZERO,
        "{retry:?}"
    );
    // Others have their own budget.
    let mut o = owner(&server).await;
    query(&mut o, "SELECT 1").await.unwrap();
}

#[tokio::test]
async fn concurrent_queries_are_limited_per_principal() {
    let server = start_with(with_quota(Quota {
        concurrent_queries: 1,
        ..Default::default()
    }))
    .await;
    let mut a = analyst(&server).await;
    let mut b = analyst(&server).await;
    // Hold one open stream: read one batch and stop.
    let info = a
        .execute("SELECT * FROM generate_series(1, 100000000)".into(), None)
        .await
        .unwrap();
    let mut held = a.do_get(ticket(&info)).await.unwrap();
    held.try_next().await.unwrap();
    assert_quota(query(&mut b, "SELECT 1").await, "RATE_LIMITED");
    // Another principal is not affected.
    let mut o = owner(&server).await;
    query(&mut o, "SELECT 1").await.unwrap();
    // Once the stream is gone, the slot comes back.
    drop(held);
    let mut freed = false;
    for _ in 0..100 {
        if query(&mut b, "SELECT 1").await.is_ok() {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(freed, "the slot is given back when the stream is dropped");
}

/// Reads a query's stream until it ends or fails: (rows received, the error).
async fn drain(
    c: &mut arrow_flight::sql::client::FlightSqlServiceClient<tonic::transport::Channel>,
    sql: &str,
) -> (usize, Option<tonic::Status>) {
    let info = c.execute(sql.to_string(), None).await.unwrap();
    let mut stream = match c.do_get(ticket(&info)).await {
        Ok(s) => s,
        Err(e) => return (0, Some(status(e))),
    };
    let mut n = 0;
    loop {
        match stream.try_next().await {
            Ok(Some(b)) => n += b.num_rows(),
            Ok(None) => return (n, None),
            Err(e) => return (n, Some(status(e))),
        }
    }
}

#[tokio::test]
async fn rows_per_day_stop_a_stream_before_the_crossing_batch_and_survive_a_restart() {
    let state = tempfile::tempdir().unwrap();
    let mut config = with_quota(Quota {
        rows_per_day: 10_000,
        ..Default::default()
    });
    config.state_dir = state.path().to_path_buf();
    let server = start_with(config.clone()).await;
    let mut a = analyst(&server).await;
    let (sent, err) = drain(&mut a, SERIES).await;
    assert!(sent > 0 && sent <= 10_000, "{sent} rows sent");
    let retry = assert_quota(Err::<(), _>(err.expect("stopped")), "QUOTA_EXCEEDED");
    assert!(retry <= Duration::from_secs(86_400), "{retry:?}");
    // What is left can still be used, up to the limit exactly.
    let left = 10_000 - sent;
    let small = format!("SELECT value FROM generate_series(1, {left})");
    let (n, err) = drain(&mut a, &small).await;
    assert_eq!((n, err.map(|e| e.code())), (left, None));
    let access = my_access(&mut a).await;
    assert_eq!(access["quota"]["rows_left_today"], 0, "{access}");
    assert_eq!(access["quota"]["rows_released_today"], 10_000, "{access}");
    // At the limit, a release is refused before it starts.
    let info = a.execute("SELECT 1".into(), None).await.unwrap();
    assert_quota(
        a.do_get(ticket(&info)).await.map_err(status),
        "QUOTA_EXCEEDED",
    );
    // The owner's override lifts the limit.
    let mut o = owner(&server).await;
    assert_eq!(drain(&mut o, SERIES).await.0, 20_000);
    drop(server);

    // The audit trail holds the stopped release, with its code.
    let text = std::fs::read_to_string(airlock::audit::path_in(state.path())).unwrap();
    let stopped: Value = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|r| r["decision"] == "released_incomplete")
        .expect("an incomplete release");
    assert_eq!(stopped["reason_code"], "QUOTA_EXCEEDED");
    assert_eq!(stopped["rows_released"], sent as u64);

    // After a restart the day's count is still there.
    let server = restart(config).await;
    let mut a = analyst(&server).await;
    let access = my_access(&mut a).await;
    assert_eq!(access["quota"]["rows_released_today"], 10_000, "{access}");
    let info = a.execute("SELECT 1".into(), None).await.unwrap();
    assert_quota(
        a.do_get(ticket(&info)).await.map_err(status),
        "QUOTA_EXCEEDED",
    );
}

#[tokio::test]
async fn bytes_per_day_stop_a_stream_too() {
    let server = start_with(with_quota(Quota {
        bytes_per_day: 100_000,
        ..Default::default()
    }))
    .await;
    let mut a = analyst(&server).await;
    let (sent, err) = drain(&mut a, SERIES).await;
    assert!(sent > 0 && sent * 8 <= 100_000, "{sent} rows sent");
    assert_quota(Err::<(), _>(err.expect("stopped")), "QUOTA_EXCEEDED");
    let access = my_access(&mut a).await;
    assert_eq!(
        access["quota"]["bytes_released_today"],
        (sent * 8) as u64,
        "{access}"
    );
    assert_eq!(access["quota"]["bytes_per_day"], 100_000, "{access}");
}

/// Starts a server on a state directory a dropped server may still hold for a moment
/// (its runtime shuts down in the background).
async fn restart(config: ServiceConfig) -> airlock::server::Running {
    for _ in 0..100 {
        match airlock::server::Airlock::build(config.clone()).await {
            Ok(a) => return a.start().await.expect("server starts"),
            Err(e) if e.to_string().contains("in use") => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("the state directory stayed locked");
}
