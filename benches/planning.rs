//! How long Airlock takes to turn SQL into an optimized, policy-checked plan.
//!
//! Planning runs on every query before any data is read, so it is pure overhead next to
//! plain DataFusion. Run with `cargo bench --bench planning`; results go to
//! docs/BENCHMARKS.md.

use std::sync::Arc;

use airlock::auth::Principal;
use airlock::server::Airlock;
use criterion::{Criterion, criterion_group, criterion_main};

const QUERIES: [(&str, &str); 4] = [
    (
        "group_by",
        "SELECT ward, count(*), avg(cost) FROM hospital.patients GROUP BY ward",
    ),
    (
        "join",
        "SELECT p.diagnosis, count(*), sum(v.cost) FROM hospital.patients p JOIN hospital.visits v ON p.patient_id = v.patient_id WHERE p.age > 40 GROUP BY p.diagnosis",
    ),
    (
        "cte_subquery",
        "WITH t AS (SELECT zip, count(*) AS n FROM hospital.patients GROUP BY zip) SELECT avg(n) FROM t WHERE n > (SELECT 10)",
    ),
    (
        "metadata",
        "SELECT table_name FROM information_schema.tables",
    ),
];

fn planning(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sizes = airlock::demo::Sizes {
        patients: 1_000,
        staff: 10,
    };
    let config = airlock::demo::prepare(dir.path(), "127.0.0.1:0".parse().unwrap(), sizes).unwrap();
    let airlock = rt.block_on(Airlock::build(config)).unwrap();
    let analyst = Arc::new(Principal {
        name: "analyst".into(),
        roles: vec!["analyst".into()],
    });
    let mut group = c.benchmark_group("plan");
    for (name, sql) in QUERIES {
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| async {
                let session = airlock.sessions.session_for(&analyst);
                airlock::query::plan(session, sql, None).await.unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, planning);
criterion_main!(benches);
