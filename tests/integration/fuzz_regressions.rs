//! Inputs the fuzz targets (`fuzz/`) found crashing, each planned and run as the demo
//! analyst: it must be answered or refused, never panic. `fuzz/README.md` says how a new
//! crash becomes a case here.

use std::sync::Arc;

use airlock::auth::Principal;
use airlock::server::Airlock;
use futures::StreamExt;

use crate::support::demo_airlock;

/// Plans and runs `sql` as the demo analyst; Ok(rows) or the error's text.
async fn answer(airlock: &Airlock, sql: &str) -> Result<usize, String> {
    let principal = Arc::new(Principal {
        name: "analyst".into(),
        roles: vec!["analyst".into()],
    });
    let session = airlock.sessions.session_for(&principal);
    let planned = airlock::query::plan(session, sql, None)
        .await
        .map_err(|e| e.to_string())?;
    let mut stream = airlock::query::execute(&planned, &airlock.sessions)
        .await
        .map_err(|e| e.to_string())?;
    let mut rows = 0;
    while let Some(batch) = stream.next().await {
        rows += batch.map_err(|e| e.to_string())?.num_rows();
    }
    Ok(rows)
}

/// sql_analyzer, 2026-11-28: a UNION ALL one of whose branches is a DP aggregate (the
/// DP release adds interval columns) made DataFusion's union optimizer index past the
/// union's schema and panic.
#[tokio::test]
async fn a_union_with_a_dp_branch_is_answered_or_refused() {
    let (airlock, _dir) = demo_airlock().await;
    let sql = "SELECT count(*) AS c0 FROM hospital.patients p UNION ALL SELECT count(*) AS c0 FROM hospital.patients p JOIN hospital.claims c ON p.patient_id = c.patient_id GROUP BY upper((left(substr(upper(p.name), 39, 41), 44) || lower(lower(lower(p.name))))) ORDER BY 1 DESC LIMIT 76";
    let got = answer(&airlock, sql).await;
    assert!(
        got.as_ref()
            .is_err_and(|e| e.contains("DP_NOT_SUPPORTED") && e.contains("UNION")),
        "{got:?}"
    );
    // The plain form of the same shape, and a union of two threshold results (released).
    let got = answer(
        &airlock,
        "SELECT count(*) AS n FROM hospital.patients UNION ALL SELECT count(*) AS n FROM hospital.claims",
    )
    .await;
    assert!(
        got.as_ref().is_err_and(|e| e.contains("DP_NOT_SUPPORTED")),
        "{got:?}"
    );
    let got = answer(
        &airlock,
        "SELECT count(*) AS n FROM hospital.patients UNION ALL SELECT count(*) AS n FROM hospital.visits",
    )
    .await;
    assert_eq!(got, Ok(2));
}
