//! A property test with an independent oracle: random aggregate queries over a fixture
//! with planted rare entities. For every released row, a plain DataFusion session
//! (no policy) computes how many distinct entities are really behind it; any row below
//! k, any wiped value in any output, or any k-safe group that was not released fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use airlock::config::{DatasetConfig, DatasetFormat, Limits, ServiceConfig, TableName};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::prelude::{CsvReadOptions, SessionContext};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::support::*;

const K_A: usize = 4;
const K_B: usize = 3;
const QUERIES: usize = 300;

/// People 1..=120 with skewed attributes; a few planted people are alone in their
/// group but have many rows (and many visits), to tempt row-counting mistakes.
fn write_fixture(dir: &Path) -> BTreeSet<String> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let g1 = ["n", "s", "e", "w"];
    let g2 = ["x", "y", "z", "q", "r"];
    let g3 = ["p1", "p2", "p3", ""];
    let mut a = String::from("pid,g1,g2,g3,v,name\n");
    let mut b = String::from("pid,h,w\n");
    let mut names = BTreeSet::new();
    for pid in 1..=120u32 {
        let name = format!("Person{pid:03}");
        names.insert(name.clone());
        let planted = pid % 37 == 0;
        let rows = if planted {
            12
        } else {
            1 + rng.random_range(0..3)
        };
        let (c1, c2) = if planted {
            ("rare", "solo")
        } else {
            (
                g1[(rng.random::<f64>().powi(2) * 4.0) as usize],
                g2[(rng.random::<f64>().powi(3) * 5.0) as usize],
            )
        };
        for _ in 0..rows {
            let c3 = g3[rng.random_range(0..g3.len())];
            a.push_str(&format!(
                "{pid},{c1},{c2},{c3},{},{name}\n",
                rng.random_range(1..100)
            ));
        }
        let visits = if planted { 20 } else { rng.random_range(0..4) };
        for _ in 0..visits {
            let h = ["h1", "h2", "h3"][(rng.random::<f64>().powi(2) * 3.0) as usize];
            b.push_str(&format!("{pid},{h},{}\n", rng.random_range(1..50)));
        }
    }
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("data/p.a.csv"), a).unwrap();
    std::fs::write(dir.join("data/p.b.csv"), b).unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    std::fs::copy(
        format!("{root}/policies/model.conf"),
        dir.join("model.conf"),
    )
    .unwrap();
    std::fs::write(dir.join("policy.csv"), "p, analyst, p.*, aggregate\n").unwrap();
    std::fs::write(
        dir.join("tables.toml"),
        format!(
            "[tables.\"p.a\"]\nprivacy_unit = \"pid\"\nmin_group_size = {K_A}\nwipe = [\"name\"]\n\n\
             [tables.\"p.b\"]\nprivacy_unit = \"pid\"\nmin_group_size = {K_B}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("users.toml"),
        format!(
            "[users.analyst]\npassword_hash = \"{}\"\nroles = []\n",
            airlock::auth::hash_password("analyst").unwrap()
        ),
    )
    .unwrap();
    names
}

/// Replaces the `a.` and `b.` qualifiers of generated SQL.
fn requalify(sql: &str, to: &str) -> String {
    sql.replace("a.", "\u{1}")
        .replace("b.", "\u{1}")
        .replace('\u{1}', to)
}

struct Query {
    protected: String,
    oracle: String,
    keys: usize,
    join: bool,
}

fn random_query(rng: &mut ChaCha8Rng) -> Query {
    let join = rng.random_bool(0.5);
    // Bare columns and computed group keys (issue 10: expressions in group keys).
    let mut candidates = vec![
        "a.g1",
        "a.g2",
        "a.g3",
        "upper(a.g1)",
        "a.v % 7",
        "a.v / 25",
        "CASE WHEN a.v > 30 THEN 'hi' ELSE 'lo' END",
        "substr(a.g2, 1, 1)",
        "character_length(a.g3)",
    ];
    if join {
        candidates.push("b.h");
    }
    let n = rng.random_range(1..=3);
    let keys: Vec<&str> = candidates.choose_multiple(rng, n).copied().collect();
    let from = if join {
        "p.a a JOIN p.b b ON a.pid = b.pid"
    } else {
        "p.a a"
    };
    let filters = [
        "",
        "a.g1 = 'n'",
        "a.v > 50",
        "a.g2 IN ('x', 'y')",
        "a.g3 <> 'p2'",
        "a.v BETWEEN 10 AND 60",
        // Computed predicates (issue 10: expressions in predicates).
        "a.v % 3 = 0",
        "lower(a.g1) LIKE 'n%'",
        "a.v / 10 > 3",
        "CASE WHEN a.g3 = '' THEN 0 ELSE a.v END > 20",
        "abs(a.v - 50) < 20",
    ];
    let mut filter = filters.choose(rng).copied().unwrap().to_string();
    if join && rng.random_bool(0.3) {
        filter = if filter.is_empty() {
            "b.w < 30".into()
        } else {
            format!("{filter} AND b.w < 30")
        };
    }
    let where_clause = if filter.is_empty() {
        String::new()
    } else {
        format!(" WHERE {filter}")
    };
    let key_list = keys.join(", ");
    let distinct = rng.random_bool(0.25);
    let protected = if distinct {
        format!("SELECT DISTINCT {key_list} FROM {from}{where_clause}")
    } else {
        let aggs = ["count(*)", "sum(a.v)", "avg(a.v)", "count(DISTINCT a.g3)"];
        let agg = aggs.choose(rng).unwrap();
        if rng.random_bool(0.2) {
            // The same through a subquery.
            format!(
                "SELECT {key_list}, {agg} FROM (SELECT * FROM {from}{where_clause}) sub GROUP BY {key_list}",
                key_list = keys
                    .iter()
                    .map(|k| requalify(k, "sub."))
                    .collect::<Vec<_>>()
                    .join(", "),
                agg = requalify(agg, "sub."),
                from = if join {
                    "(SELECT a.*, b.h, b.w FROM p.a a JOIN p.b b ON a.pid = b.pid) j".to_string()
                } else {
                    "p.a".to_string()
                },
                where_clause = requalify(&where_clause, ""),
            )
        } else {
            format!("SELECT {key_list}, {agg} FROM {from}{where_clause} GROUP BY {key_list}")
        }
    };
    let entity_counts = if join {
        "count(DISTINCT a.pid) AS ea, count(DISTINCT b.pid) AS eb"
    } else {
        "count(DISTINCT a.pid) AS ea"
    };
    let oracle =
        format!("SELECT {key_list}, {entity_counts} FROM {from}{where_clause} GROUP BY {key_list}");
    Query {
        protected,
        oracle,
        keys: keys.len(),
        join,
    }
}

fn cells(batches: &[RecordBatch]) -> Vec<Vec<String>> {
    let options = FormatOptions::default().with_null("NULL");
    let mut out = Vec::new();
    for b in batches {
        let f: Vec<ArrayFormatter> = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).unwrap())
            .collect();
        for r in 0..b.num_rows() {
            out.push(f.iter().map(|f| f.value(r).to_string()).collect());
        }
    }
    out
}

#[tokio::test]
async fn no_released_row_has_fewer_than_k_entities() {
    let dir = tempfile::tempdir().unwrap();
    let names = write_fixture(dir.path());
    let datasets = ["p.a", "p.b"]
        .iter()
        .map(|t| DatasetConfig {
            name: TableName::parse(t).unwrap(),
            path: dir.path().join(format!("data/{t}.csv")),
            format: DatasetFormat::Csv,
            has_header: true,
            delimiter: b',',
            cache: false,
            origin: None,
        })
        .collect();
    let server = start_with(ServiceConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: None,
        datasets,
        policy_dir: dir.path().to_path_buf(),
        users_file: dir.path().join("users.toml"),
        state_dir: dir.path().to_path_buf(),
        limits: Limits::default(),
        metrics_listen: None,
        otlp_endpoint: None,
        console_listen: None,
        cluster: None,
        state: Default::default(),
    })
    .await;
    let mut client = analyst(&server).await;

    // The oracle: plain DataFusion on the same files, no policy at all.
    let oracle = SessionContext::new();
    oracle
        .catalog("datafusion")
        .unwrap()
        .register_schema(
            "p",
            std::sync::Arc::new(datafusion::catalog::MemorySchemaProvider::new()),
        )
        .unwrap();
    for t in ["a", "b"] {
        let path = dir.path().join(format!("data/p.{t}.csv"));
        oracle
            .register_csv(
                format!("p.{t}"),
                path.to_str().unwrap(),
                CsvReadOptions::new(),
            )
            .await
            .unwrap();
    }

    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    let (mut released_rows, mut suppressed_groups, mut refused) = (0usize, 0usize, 0usize);
    for i in 0..QUERIES {
        let q = random_query(&mut rng);
        let released = match query(&mut client, &q.protected).await {
            Ok(b) => cells(&b),
            Err(e) => {
                // Only the policy may refuse these queries, never with a data value.
                assert_eq!(
                    e.code(),
                    tonic::Code::PermissionDenied,
                    "query {i}: {}: {e:?}",
                    q.protected
                );
                refused += 1;
                continue;
            }
        };
        let truth = cells(
            &oracle
                .sql(&q.oracle)
                .await
                .unwrap()
                .collect()
                .await
                .unwrap(),
        );
        let mut entities: BTreeMap<Vec<String>, (usize, usize)> = BTreeMap::new();
        for row in truth {
            let ea: usize = row[q.keys].parse().unwrap();
            let eb: usize = if q.join {
                row[q.keys + 1].parse().unwrap()
            } else {
                usize::MAX
            };
            entities.insert(row[..q.keys].to_vec(), (ea, eb));
        }
        for row in &released {
            for v in row {
                assert!(
                    !names.contains(v),
                    "query {i} released a wiped name: {}",
                    q.protected
                );
            }
            let key = row[..q.keys].to_vec();
            let (ea, eb) = entities.get(&key).unwrap_or_else(|| {
                panic!(
                    "query {i}: released group {key:?} does not exist: {}",
                    q.protected
                )
            });
            assert!(
                *ea >= K_A,
                "query {i}: group {key:?} has {ea} entities of p.a (< {K_A}): {}",
                q.protected
            );
            assert!(
                *eb >= K_B,
                "query {i}: group {key:?} has {eb} entities of p.b (< {K_B}): {}",
                q.protected
            );
        }
        // Nothing k-safe was suppressed either.
        let expected: BTreeSet<Vec<String>> = entities
            .iter()
            .filter(|(_, (ea, eb))| *ea >= K_A && *eb >= K_B)
            .map(|(k, _)| k.clone())
            .collect();
        let got: BTreeSet<Vec<String>> = released.iter().map(|r| r[..q.keys].to_vec()).collect();
        assert_eq!(got, expected, "query {i}: {}", q.protected);
        released_rows += released.len();
        suppressed_groups += entities.len() - expected.len();
    }
    eprintln!(
        "property: {QUERIES} random queries, {released_rows} rows released, {suppressed_groups} groups suppressed, {refused} refused"
    );
    assert!(
        released_rows > 0 && suppressed_groups > 0,
        "the fixture must exercise both outcomes"
    );
}
