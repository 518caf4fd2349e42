//! The privacy rewrite's own time on TPC-H-shaped plans (issue 3: median < 1 ms).
//!
//! For each TPC-H query the SQL is planned once; the benchmark then times the analyzer
//! with the policy rules (`airlock`) against DataFusion's default analyzer
//! (`datafusion`) on the same plan. The difference is the rewrite's cost. Tables are
//! empty: planning never reads data. The `plan` group times the whole `query::plan`
//! (parse, analyzer, optimizer, verifier) as the analyst and as a reader. Run:
//! `cargo bench --bench rewrite`.

#[path = "tpch/schema.rs"]
mod schema;

use std::sync::Arc;

use airlock::auth::Principal;
use airlock::catalog::Catalog;
use airlock::config::{Limits, TableName};
use airlock::policy::PolicyStore;
use airlock::session::Sessions;
use criterion::{Criterion, criterion_group, criterion_main};
use datafusion::catalog::MemTable;
use datafusion::optimizer::Analyzer;

fn rewrite(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let catalog = Catalog::from_tables(schema::tables().into_iter().map(|(name, schema)| {
        let table: Arc<dyn datafusion::catalog::TableProvider> =
            Arc::new(MemTable::try_new(schema, vec![vec![]]).unwrap());
        (TableName::parse(&format!("tpch.{name}")).unwrap(), table)
    }));
    let users = airlock::auth::Users::from_entries([]);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/tpch/policies");
    let policy = rt
        .block_on(PolicyStore::open(dir, &users, &catalog))
        .unwrap();
    let sessions =
        Sessions::new(Arc::new(policy), Arc::new(catalog), Limits::default(), None).unwrap();
    let analyst = Arc::new(Principal {
        name: "bench_analyst".into(),
        roles: vec![],
    });
    let session = sessions.session_for(&analyst);
    let state = &session.state;
    let default_analyzer = Analyzer::new();
    let mut group = c.benchmark_group("rewrite");
    for (name, sql) in schema::queries() {
        let plan = rt.block_on(state.create_logical_plan(sql)).unwrap();
        // Every query must pass the policy (or this measures a refusal).
        state
            .analyzer()
            .execute_and_check(plan.clone(), state.config_options(), |_, _| {})
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        group.bench_function(format!("{name}/airlock"), |b| {
            b.iter(|| {
                state
                    .analyzer()
                    .execute_and_check(plan.clone(), state.config_options(), |_, _| {})
                    .unwrap()
            })
        });
        group.bench_function(format!("{name}/datafusion"), |b| {
            b.iter(|| {
                default_analyzer
                    .execute_and_check(plan.clone(), state.config_options(), |_, _| {})
                    .unwrap()
            })
        });
    }
    group.finish();

    // The whole planning of each query (parse, analyzer, optimizer, verifier, entity
    // columns), as the analyst and as a reader (masks only, no k rule).
    let reader = Arc::new(Principal {
        name: "bench_reader".into(),
        roles: vec![],
    });
    let mut group = c.benchmark_group("plan");
    for (name, sql) in schema::queries() {
        for (who, principal) in [("analyst", &analyst), ("reader", &reader)] {
            let session = sessions.session_for(principal);
            group.bench_function(format!("{name}/{who}"), |b| {
                b.iter(|| {
                    rt.block_on(airlock::query::plan(Arc::clone(&session), sql, None))
                        .unwrap()
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, rewrite);
criterion_main!(benches);
