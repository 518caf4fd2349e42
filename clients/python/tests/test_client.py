"""The Python client against a real demo server: lazy chains, SQL, results, approvals."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

import airlock
from airlock import col, lit

from conftest import ROOT, airlock_binary


@pytest.fixture(scope="module")
def analyst(server):
    with airlock.connect(server.uri, "analyst", "analyst") as c:
        yield c


@pytest.fixture(scope="module")
def owner(server):
    with airlock.connect(server.uri, "owner", "owner") as c:
        yield c


def owner_cli(server, *args):
    env = {"AIRLOCK_URL": server.uri, "AIRLOCK_USER": "owner", "AIRLOCK_PASSWORD": "owner", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([airlock_binary(), "approvals", *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def rows(table: pa.Table, key: str):
    return {r[key]: r for r in table.to_pylist()}


def test_tables_list_schemas_and_actions(analyst):
    tables = {t.name: t for t in analyst.tables()}
    assert set(tables) == {"hospital.claims", "hospital.patients", "hospital.visits"}
    assert tables["hospital.patients"].actions == ["aggregate", "request"]
    assert "diagnosis" in tables["hospital.patients"].schema.names


def test_nothing_runs_until_asked_and_the_sql_is_readable(analyst):
    lf = (
        analyst.table("hospital.patients")
        .filter((col("age") >= 40) & col("ward").is_in(["A", "B"]))
        .with_columns((col("cost") / 1000).alias("cost_k"))
        .group_by("ward")
        .agg(airlock.count().alias("n"), col("cost_k").mean(), col("age").std(), col("zip").n_unique())
        .sort("ward")
    )
    sql = lf.sql()
    assert "WHERE" in sql and "GROUP BY" in sql and "ORDER BY" in sql
    assert '"cost_k" AS "cost_k_mean"' not in sql  # aggregates are named by alias
    assert 'avg("cost_k") AS "cost_k_mean"' in sql
    assert lf.columns == ["ward", "n", "cost_k_mean", "age_std", "zip_n_unique"]


def test_results_match_the_owners_raw_answer(analyst, owner):
    def query(client):
        return (
            client.table("hospital.patients")
            .filter(col("age") > 30)
            .group_by("ward")
            .agg(airlock.count().alias("n"), col("cost").sum().alias("total"))
            .collect()
            .fetch()
        )

    mine, truth = rows(query(analyst), "ward"), rows(query(owner), "ward")
    assert mine.keys() == truth.keys() and len(mine) == 6
    for ward in mine:
        assert mine[ward]["n"] == truth[ward]["n"]
        assert mine[ward]["total"] == pytest.approx(truth[ward]["total"])


def test_collect_returns_a_result_that_starts_new_queries(analyst, owner):
    per_zip = analyst.table("hospital.patients").group_by("zip").agg(airlock.count().alias("n")).collect()
    # Aggregates of released aggregates: the server evaluates the combined query.
    summary = per_zip.agg(col("n").mean().alias("mean_n"), airlock.count().alias("zips")).fetch()
    assert summary.num_rows == 1
    released = per_zip.fetch()
    assert summary.column("zips")[0].as_py() == released.num_rows
    assert all(n >= 10 for n in released.column("n").to_pylist()), "k = 10"


def test_joins_distinct_rename_limit_and_helpers(analyst):
    visits = analyst.table("hospital.visits")
    patients = analyst.table("hospital.patients")
    joined = (
        patients.join(visits.rename({"cost": "visit_cost"}), on="patient_id")
        .group_by("department")
        .agg(col("visit_cost").sum().alias("spent"), airlock.count().alias("visits"))
        .sort("spent", descending=True)
        .limit(3)
        .fetch()
    )
    assert joined.num_rows == 3
    assert joined.column("spent").to_pylist() == sorted(joined.column("spent").to_pylist(), reverse=True)
    wards = patients.select(col("ward").str.lower().alias("w")).distinct().collect().fetch()
    assert set(wards.column("w").to_pylist()) == set("abcdef")
    years = (
        patients.group_by(col("admitted").dt.year().alias("year"))
        .agg(airlock.count().alias("n"))
        .fetch()
    )
    assert set(years.column("year").to_pylist()) <= {2020, 2021, 2022, 2023, 2024}
    nulls = patients.filter(col("zip").is_null() | (col("age") < lit(0))).agg(airlock.count().alias("n")).fetch()
    assert nulls.num_rows == 0, "a global aggregate over fewer than k patients releases no row"


def test_to_pandas_and_polars(analyst):
    result = analyst.table("hospital.patients").group_by("sex").agg(airlock.count().alias("n")).collect()
    df = result.to_pandas()
    assert df["n"].sum() == 5000
    result = analyst.table("hospital.patients").group_by("sex").agg(airlock.count().alias("n")).collect()
    pl_df = result.to_polars()
    assert pl_df["n"].sum() == 5000


def test_describe_is_k_safe(analyst):
    d = analyst.table("hospital.patients").describe()
    stats = d.column("statistic").to_pylist()
    assert stats[:2] == ["count", "n_unique"] and "mean" in stats
    summary = {s: v for s, v in zip(stats, d.column("age").to_pylist())}
    assert summary["count"] == 5000 and 0 < summary["mean"] < 100
    names = {s: v for s, v in zip(stats, d.column("name").to_pylist())}
    assert names["n_unique"] == 1, "wiped names are masked"


def test_explain_shows_sql_and_policy(analyst):
    text = analyst.table("hospital.patients").group_by("ward").agg(airlock.count()).explain()
    assert "SQL:" in text and "released automatically" in text and "masked at the scan" in text


def test_refusals_raise_policy_violation_with_codes(analyst):
    with pytest.raises(airlock.PolicyViolation) as err:
        analyst.sql("SET datafusion.execution.batch_size = 1").collect()
    assert err.value.code == "STATEMENT_NOT_ALLOWED"
    with pytest.raises(airlock.ApprovalPending) as pending:
        analyst.table("hospital.patients").select("name", "zip").limit(3).collect()
    # Which rule the server names (AGGREGATE_REQUIRED, OPERATOR_NOT_ALLOWED for the LIMIT,
    # ...) is the policy's business; the client carries the request id and the codes.
    assert pending.value.request_id and pending.value.reason_codes


def test_fetch_waits_for_approval(server, analyst):
    lf = analyst.table("hospital.patients").filter(col("age") > 91).select("zip", "age").limit(2)
    with pytest.raises(airlock.ApprovalPending) as pending:
        lf.fetch()
    request = pending.value.request_id

    def approve_soon():
        time.sleep(1.0)
        owner_cli(server, "approve", request)

    threading.Thread(target=approve_soon).start()
    table = lf.fetch(wait=True, timeout=30, progress=True)
    assert table.num_rows == 2


def test_fetch_wait_ends_in_denial_and_timeout(server, analyst):
    lf = analyst.table("hospital.patients").filter(col("age") > 92).select("zip").limit(1)
    with pytest.raises(airlock.ApprovalPending) as pending:
        lf.fetch()
    with pytest.raises(TimeoutError):
        lf.fetch(wait=True, timeout=1)
    threading.Thread(target=lambda: (time.sleep(0.5), owner_cli(server, "deny", pending.value.request_id, "--reason", "not today"))).start()
    with pytest.raises(airlock.ApprovalDenied) as denied:
        lf.fetch(wait=True, timeout=30)
    assert denied.value.reason == "not today"


def test_the_tutorial_runs_to_completion(server):
    script = Path(__file__).resolve().parents[1] / "examples" / "tutorial.py"
    out = subprocess.run(
        [__import__("sys").executable, str(script), server.uri],
        capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, "AIRLOCK_BIN": airlock_binary()},
    )
    assert out.returncode == 0, out.stderr
    assert "Done." in out.stdout


def test_exact_sql_of_a_simple_chain(analyst):
    lf = analyst.table("hospital.patients").filter(col("age") > 40).group_by("ward").agg(airlock.count().alias("n"))
    sql = lf.sql()
    assert sql.startswith('SELECT "ward", count(*) AS "n" FROM (SELECT * FROM hospital.patients WHERE ("age" > 40)) AS _t')
    assert sql.endswith(' GROUP BY "ward"')


def test_string_date_and_statistics_helpers(analyst, owner):
    def run(client):
        p = client.table("hospital.patients")
        return (
            p.filter(col("diagnosis").str.starts_with("hyper") | col("diagnosis").str.contains("flu"))
            .with_columns(
                col("diagnosis").str.upper().alias("dx"),
                col("diagnosis").str.len().alias("dx_len"),
                col("diagnosis").str.slice(0, 3).alias("dx3"),
                col("admitted").dt.month().alias("month"),
                col("admitted").dt.truncate("year").alias("year_start"),
            )
            .group_by("dx", "dx3", "dx_len", "month", "year_start")
            .agg(col("cost").var().alias("v"), airlock.len().alias("n"))
            .sort("dx", "month", "year_start")
            .fetch()
        )

    mine, truth = run(analyst), run(owner)
    assert set(mine.column("dx").to_pylist()) == {"HYPERTENSION", "INFLUENZA"}
    assert set(mine.column("dx3").to_pylist()) == {"hyp", "inf"}
    assert set(zip(mine.column("dx").to_pylist(), mine.column("dx_len").to_pylist())) == {
        ("HYPERTENSION", 12), ("INFLUENZA", 9),
    }
    assert set(mine.column("month").to_pylist()) == set(range(1, 13))
    released = {(r["dx"], r["month"], r["year_start"]): r for r in mine.to_pylist()}
    everything = {(r["dx"], r["month"], r["year_start"]): r for r in truth.to_pylist()}
    assert released and set(released) <= set(everything)
    for key, row in released.items():
        assert row["n"] == everything[key]["n"] >= 10
        assert row["v"] == pytest.approx(everything[key]["v"])


def test_dp_epsilon_reaches_the_server_and_intervals_come_back(server):
    """hospital.claims is in DP mode: ``collect(epsilon=...)`` sends the ε through the
    ADBC driver's call header; the answer carries ``_ci95`` columns; the identical query
    is answered identically (and for free); an ε above the table's maximum is refused."""
    sql = "SELECT kind, count(*) AS n FROM hospital.claims GROUP BY kind"
    with airlock.connect(server.uri, "analyst", "analyst") as c:
        first = c.sql(sql).collect(epsilon=0.5).fetch()
        assert first.column_names == ["kind", "n", "n_ci95"]
        # A smaller ε means wider intervals than the default ε = 1 would give (±108 at
        # ε = 1 with L0 = 4, C = 3 and ε split over two measurements).
        assert first.column("n_ci95")[0].as_py() > 108
        again = c.sql(sql).collect(epsilon=0.5).fetch()
        assert first.sort_by("kind").equals(again.sort_by("kind"))
        with pytest.raises(airlock.PolicyViolation) as e:
            c.sql(sql).collect(epsilon=5.0).fetch()
        assert e.value.code == "DP_NOT_SUPPORTED"
