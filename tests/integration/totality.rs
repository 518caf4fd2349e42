//! Totality below the release boundary (PRIVACY.md §3.2.1, issue 10 part 3): random
//! expressions from the allow-list, over data full of zeros, NULLs, extremes and empty
//! strings, in predicates, group keys and aggregate arguments. Every query is either
//! refused by the policy or planned and run: never a run-time error, since an error that
//! depends on a protected value is an oracle.

use std::path::Path;

use airlock::config::{DatasetConfig, DatasetFormat, Limits, ServiceConfig, TableName};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tonic::Code;

use crate::support::*;

const QUERIES: usize = 400;

/// One entity per row, k = 1 (every group is released, so every expression runs), and
/// both opt-ins so aggregates take arithmetic and CASE.
fn write_fixture(dir: &Path) -> ServiceConfig {
    let mut csv = String::from("pid,i,j,f,s,d\n");
    let ints = [
        "0",
        "1",
        "-1",
        "9223372036854775807",
        "-9223372036854775808",
        "",
        "7",
        "-50",
    ];
    let smalls = ["0", "1", "-1", "2147483647", "-2147483648", "", "3"];
    let floats = ["0", "-0.0", "1e308", "-1e308", "", "0.5", "3.25"];
    let strings = ["", "x", "123", "-7", "2020-01-01", "a'b", "ÿ€"];
    let dates = [
        "2020-01-01",
        "1970-01-01",
        "",
        "2262-04-11",
        "1677-09-22",
        "9999-12-31",
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for pid in 1..=60 {
        csv.push_str(&format!(
            "{pid},{},{},{},{},{}\n",
            ints.choose(&mut rng).unwrap(),
            smalls.choose(&mut rng).unwrap(),
            floats.choose(&mut rng).unwrap(),
            strings.choose(&mut rng).unwrap(),
            dates.choose(&mut rng).unwrap(),
        ));
    }
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("data/p.x.csv"), csv).unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    std::fs::copy(
        format!("{root}/policies/model.conf"),
        dir.join("model.conf"),
    )
    .unwrap();
    std::fs::write(dir.join("policy.csv"), "p, analyst, p.*, aggregate\n").unwrap();
    std::fs::write(
        dir.join("tables.toml"),
        "[tables.\"p.x\"]\nprivacy_unit = \"pid\"\nmin_group_size = 1\n\
         arithmetic_aggregates = true\nconditional_aggregates = true\n",
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
    ServiceConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: None,
        datasets: vec![DatasetConfig {
            name: TableName::parse("p.x").unwrap(),
            path: dir.join("data/p.x.csv"),
            format: DatasetFormat::Csv,
            has_header: true,
            delimiter: b',',
            cache: false,
            origin: None,
        }],
        policy_dir: dir.to_path_buf(),
        users_file: dir.join("users.toml"),
        state_dir: dir.join("state"),
        limits: Limits::default(),
        metrics_listen: None,
        otlp_endpoint: None,
        console_listen: None,
        cluster: None,
        state: Default::default(),
    }
}

/// A random numeric expression over the fixture's columns.
fn number(rng: &mut ChaCha8Rng, depth: u32) -> String {
    let leaves = [
        "i",
        "j",
        "f",
        "0",
        "1",
        "-1",
        "2147483647",
        "9223372036854775807",
        "0.0",
    ];
    if depth == 0 || rng.random_bool(0.3) {
        return leaves.choose(rng).unwrap().to_string();
    }
    let a = number(rng, depth - 1);
    let b = number(rng, depth - 1);
    match rng.random_range(0..16) {
        0 => format!("({a} + {b})"),
        1 => format!("({a} - {b})"),
        2 => format!("({a} * {b})"),
        3 => format!("({a} / {b})"),
        4 => format!("({a} % {b})"),
        5 => format!("abs({a})"),
        6 => format!("round({a}, 2)"),
        7 => format!("sqrt({a})"),
        8 => format!("ln({a})"),
        9 => format!("power({a}, {b})"),
        10 => format!("CAST({} AS INT)", text(rng, depth - 1)),
        11 => format!("CAST({a} AS SMALLINT)"),
        12 => format!("CAST({a} AS DECIMAL(5, 2))"),
        13 => format!("coalesce({a}, {b})"),
        14 => format!(
            "CASE WHEN {} THEN {a} ELSE {b} END",
            predicate(rng, depth - 1)
        ),
        _ => format!("date_part('year', {})", date(rng)),
    }
}

fn text(rng: &mut ChaCha8Rng, depth: u32) -> String {
    let leaves = ["s", "''", "'x'"];
    if depth == 0 || rng.random_bool(0.4) {
        return leaves.choose(rng).unwrap().to_string();
    }
    let a = text(rng, depth - 1);
    match rng.random_range(0..8) {
        0 => format!("lower({a})"),
        1 => format!("substr({a}, 2, 3)"),
        2 => format!("left({a}, 2)"),
        3 => format!("concat({a}, 'z')"),
        4 => format!("CAST({} AS VARCHAR)", number(rng, depth - 1)),
        5 => format!("split_part({a}, '-', 2)"),
        6 => format!("lpad({a}, 4, '*')"),
        _ => format!("reverse({a})"),
    }
}

fn date(rng: &mut ChaCha8Rng) -> String {
    [
        "d",
        "CAST(s AS DATE)",
        "date_trunc('month', d)",
        "DATE '2020-02-29'",
    ]
    .choose(rng)
    .unwrap()
    .to_string()
}

fn predicate(rng: &mut ChaCha8Rng, depth: u32) -> String {
    match rng.random_range(0..6) {
        0 => format!("{} > {}", number(rng, depth), number(rng, depth)),
        1 => format!("{} = {}", text(rng, depth), text(rng, depth)),
        2 => format!("{} IS NULL", number(rng, depth)),
        3 => format!("{} LIKE '%1%'", text(rng, depth)),
        4 => format!("{} < DATE '2021-01-01'", date(rng)),
        _ => format!("NOT ({} BETWEEN -1 AND 1)", number(rng, depth)),
    }
}

fn query(rng: &mut ChaCha8Rng) -> String {
    match rng.random_range(0..4) {
        0 => format!("SELECT count(*) FROM p.x WHERE {}", predicate(rng, 3)),
        1 => format!(
            "SELECT {} AS g, count(*) FROM p.x GROUP BY 1",
            [number(rng, 3), text(rng, 3)].choose(rng).unwrap()
        ),
        2 => format!(
            "SELECT sum({}), avg(j) FROM p.x WHERE {}",
            // Arithmetic and CASE of columns: what the opt-ins allow inside an aggregate.
            [
                "(i + j)",
                "(f * 2)",
                "(CASE WHEN j > 0 THEN f ELSE 0 END)",
                "(i - j - 1)"
            ]
            .choose(rng)
            .unwrap(),
            predicate(rng, 2)
        ),
        _ => format!(
            "SELECT {} AS g, sum(f) FROM p.x WHERE {} GROUP BY 1",
            date(rng),
            predicate(rng, 2)
        ),
    }
}

#[tokio::test]
async fn no_run_time_error_below_the_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(write_fixture(dir.path())).await;
    let mut c = analyst(&server).await;
    let mut rng = ChaCha8Rng::seed_from_u64(2026);
    let (mut ran, mut refused, mut invalid) = (0, 0, 0);
    for _ in 0..QUERIES {
        let sql = query(&mut rng);
        match crate::support::query(&mut c, &sql).await {
            Ok(_) => ran += 1,
            Err(s) if s.code() == Code::PermissionDenied => refused += 1,
            // Type errors are found while planning, before any row is read.
            Err(s) if s.code() == Code::InvalidArgument => invalid += 1,
            Err(s) => panic!("{sql}\n  failed at run time: {s:?}"),
        }
    }
    eprintln!("totality: {ran} ran, {refused} refused, {invalid} did not plan");
    assert!(
        ran > QUERIES / 2,
        "most generated queries should run: {ran}"
    );
}
