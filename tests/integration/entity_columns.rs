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

use crate::support::demo_airlock;

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

/// Queries whose scans read the entity key, as the analyst runs them, and the owner's
/// ground truth: every group with its rows and the fewest distinct patients on any side.
const CASES: &[(&str, &str)] = &[
    (
        // Inner join on the key: the two tables' entities share one column.
        "SELECT p.diagnosis, count(*) AS n FROM hospital.patients p \
         JOIN hospital.visits v ON p.patient_id = v.patient_id GROUP BY p.diagnosis",
        "SELECT p.diagnosis, count(*) AS n, \
         least(count(DISTINCT p.patient_id), count(DISTINCT v.patient_id)) FROM hospital.patients p \
         JOIN hospital.visits v ON p.patient_id = v.patient_id GROUP BY p.diagnosis",
    ),
    (
        // Outer join: the null-padded side's entity is NULL with its key, never equated.
        "SELECT p.diagnosis, count(*) AS n FROM hospital.patients p \
         LEFT JOIN hospital.visits v ON p.patient_id = v.patient_id GROUP BY p.diagnosis",
        "SELECT p.diagnosis, count(*) AS n, \
         least(count(DISTINCT p.patient_id), count(DISTINCT v.patient_id)) FROM hospital.patients p \
         LEFT JOIN hospital.visits v ON p.patient_id = v.patient_id GROUP BY p.diagnosis",
    ),
    (
        // A self-join through two aliases.
        "SELECT a.department, count(*) AS n FROM hospital.visits a \
         JOIN hospital.visits b ON a.patient_id = b.patient_id GROUP BY a.department",
        "SELECT a.department, count(*) AS n, \
         least(count(DISTINCT a.patient_id), count(DISTINCT b.patient_id)) FROM hospital.visits a \
         JOIN hospital.visits b ON a.patient_id = b.patient_id GROUP BY a.department",
    ),
    (
        // The key renamed in a subquery, then joined.
        "SELECT p.diagnosis, count(*) AS n FROM \
         (SELECT patient_id AS pid, diagnosis FROM hospital.patients) p \
         JOIN hospital.visits v ON p.pid = v.patient_id GROUP BY p.diagnosis",
        "SELECT p.diagnosis, count(*) AS n, \
         least(count(DISTINCT p.pid), count(DISTINCT v.patient_id)) FROM \
         (SELECT patient_id AS pid, diagnosis FROM hospital.patients) p \
         JOIN hospital.visits v ON p.pid = v.patient_id GROUP BY p.diagnosis",
    ),
];

#[tokio::test]
async fn a_query_reading_the_entity_key_carries_it_once_and_releases_what_the_k_rule_releases() {
    let (airlock, _dir) = demo_airlock().await;
    let (mut released_groups, mut withheld_groups) = (0, 0);
    for (analyst_sql, owner_sql) in CASES {
        let (plan, released) = run(&airlock, "analyst", analyst_sql).await;
        assert!(!carries_the_key_twice(&plan), "{analyst_sql}\n{plan}");
        let (_, truth) = run(&airlock, "owner", owner_sql).await;
        let truth = by_key(&truth);
        let expected: BTreeMap<String, (i64, Option<i64>)> = truth
            .iter()
            .filter(|(_, (_, patients))| patients.unwrap() >= 10)
            .map(|(k, (n, _))| (k.clone(), (*n, None)))
            .collect();
        assert_eq!(by_key(&released), expected, "{analyst_sql}");
        released_groups += expected.len();
        withheld_groups += truth.len() - expected.len();
    }
    // The cases must be able to fail both ways: groups released and groups withheld.
    assert!(released_groups > 0 && withheld_groups > 0);

    // The threshold counts patients from the key itself, up to the join and past it.
    let (plan, _) = run(&airlock, "analyst", CASES[0].0).await;
    let text = plan.display_indent().to_string();
    assert!(text.contains("p.patient_id AS __airlock_entity"), "{text}");
}
