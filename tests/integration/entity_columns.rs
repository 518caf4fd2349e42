//! One column per entity key (`rewrite::dedupe`): a query that uses the entity key
//! itself carries it once, and still releases exactly what the k rule releases.

use std::collections::BTreeMap;
use std::sync::Arc;

use airlock::auth::Principal;
use airlock::rewrite::protect::EntityColumn;
use airlock::server::Airlock;
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::Int64Type;
use datafusion::common::Column;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::logical_expr::LogicalPlan;
use futures::TryStreamExt;

async fn demo() -> (Airlock, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = airlock::demo::prepare(
        dir.path(),
        "127.0.0.1:0".parse().unwrap(),
        airlock::demo::Sizes {
            patients: 2_000,
            staff: 40,
        },
    )
    .unwrap();
    (Airlock::build(config).await.unwrap(), dir)
}

async fn run(airlock: &Airlock, who: &str, sql: &str) -> (LogicalPlan, Vec<RecordBatch>) {
    let principal = Arc::new(Principal {
        name: who.into(),
        roles: vec![who.into()],
    });
    let session = airlock.sessions.session_for(&principal);
    let planned = airlock::query::plan(session, sql, None).await.unwrap();
    let stream = airlock::query::execute(&planned, &airlock.sessions)
        .await
        .unwrap();
    let batches: Vec<RecordBatch> = stream.try_collect().await.unwrap();
    (planned.plan, batches)
}

/// Whether some node of the plan outputs both a table's `patient_id` and that table's
/// hidden entity column (which holds the same values).
fn carries_the_key_twice(plan: &LogicalPlan) -> bool {
    let mut twice = false;
    plan.apply_with_subqueries(|p| {
        let schema = p.schema();
        twice |= schema.iter().any(|(q, f)| {
            EntityColumn::parse(f.name()).is_some()
                && schema.has_column(&Column::new(q.cloned(), "patient_id"))
        });
        Ok(TreeNodeRecursion::Continue)
    })
    .unwrap();
    twice
}

/// (key) -> (first Int64 column, second Int64 column if any).
fn by_key(batches: &[RecordBatch]) -> BTreeMap<String, (i64, Option<i64>)> {
    let mut out = BTreeMap::new();
    for b in batches {
        let key = b.column(0).as_string::<i32>();
        let first = b.column(1).as_primitive::<Int64Type>();
        let second = (b.num_columns() > 2).then(|| b.column(2).as_primitive::<Int64Type>());
        for row in 0..b.num_rows() {
            if key.is_null(row) {
                continue;
            }
            out.insert(
                key.value(row).to_string(),
                (first.value(row), second.map(|s| s.value(row))),
            );
        }
    }
    out
}

#[tokio::test]
async fn a_join_on_the_entity_key_carries_it_once_and_releases_what_the_k_rule_releases() {
    let (airlock, _dir) = demo().await;
    let join = "FROM hospital.patients p JOIN hospital.visits v ON p.patient_id = v.patient_id \
                GROUP BY p.diagnosis";
    let (plan, released) = run(
        &airlock,
        "analyst",
        &format!("SELECT p.diagnosis, count(*) AS visits {join}"),
    )
    .await;
    // Both scans read patient_id for the join: no node carries a second copy of it.
    assert!(!carries_the_key_twice(&plan), "{plan}");

    // The owner's view: every group, with its distinct patients.
    let (_, truth) = run(
        &airlock,
        "owner",
        &format!("SELECT p.diagnosis, count(*) AS visits, count(DISTINCT p.patient_id) {join}"),
    )
    .await;
    let truth = by_key(&truth);
    let released = by_key(&released);
    let expected: BTreeMap<String, (i64, Option<i64>)> = truth
        .iter()
        .filter(|(_, (_, patients))| patients.unwrap() >= 10)
        .map(|(k, (visits, _))| (k.clone(), (*visits, None)))
        .collect();
    assert_eq!(released, expected);
    // The case must be able to fail both ways: some groups released, some withheld.
    assert!(
        !expected.is_empty() && expected.len() < truth.len(),
        "{truth:?}"
    );

    // The threshold counts patients from the key itself, up to the join and past it.
    let text = plan.display_indent().to_string();
    assert!(text.contains("p.patient_id AS __airlock_entity"), "{text}");
}
