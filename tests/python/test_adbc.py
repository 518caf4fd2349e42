"""The real ADBC Flight SQL driver against a real Airlock server."""

from __future__ import annotations

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import pandas as pd
import pyarrow as pa
import pytest


def connect(server, user: str, password: str | None = None):
    return flightsql.connect(
        server.uri,
        db_kwargs={"username": user, "password": user if password is None else password},
    )


def test_connect_and_aggregate_to_pyarrow_and_pandas(server):
    with connect(server, "analyst") as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT ward, count(*) AS n, avg(cost) AS mean_cost "
            "FROM hospital.patients GROUP BY ward ORDER BY ward"
        )
        table = cur.fetch_arrow_table()
        assert table.column_names == ["ward", "n", "mean_cost"]
        assert table.schema.field("ward").type == pa.string(), "strings arrive as Utf8"
        assert table.num_rows == 6
        assert sum(table.column("n").to_pylist()) == 5000

        cur.execute("SELECT diagnosis, count(*) AS n FROM hospital.patients GROUP BY diagnosis")
        df = cur.fetch_df()
        assert isinstance(df, pd.DataFrame)
        # Rare diagnoses are suppressed for the analyst: every released group has k = 10.
        assert (df["n"] >= 10).all()
        assert 4900 < df["n"].sum() <= 5000
        assert "hypertension" in set(df["diagnosis"])


def test_parameterized_query(server):
    with connect(server, "owner") as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) AS n FROM hospital.patients WHERE age >= ? AND ward = ?",
            parameters=(60, "A"),
        )
        with_params = cur.fetchone()[0]
        cur.execute("SELECT count(*) AS n FROM hospital.patients WHERE age >= 60 AND ward = 'A'")
        assert cur.fetchone()[0] == with_params
        assert with_params > 0

        # The same prepared statement re-executed with other parameters.
        cur.execute("SELECT count(*) FROM hospital.visits WHERE cost > ?", parameters=(3000.0,))
        high = cur.fetchone()[0]
        cur.execute("SELECT count(*) FROM hospital.visits WHERE cost > ?", parameters=(100.0,))
        assert cur.fetchone()[0] > high


def test_get_objects_lists_only_visible_tables(server):
    def tables(user):
        with connect(server, user) as conn:
            objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
        names = set()
        for catalog in objects:
            for schema in catalog["catalog_db_schemas"] or []:
                for t in schema["db_schema_tables"] or []:
                    names.add(f"{schema['db_schema_name']}.{t['table_name']}")
        return names

    assert tables("analyst") == {"hospital.claims", "hospital.patients", "hospital.visits"}
    assert tables("owner") == {"hospital.claims", "hospital.patients", "hospital.visits", "hospital.staff"}


def test_get_objects_with_columns(server):
    with connect(server, "analyst") as conn:
        objects = conn.adbc_get_objects(depth="all", table_name_filter="patients").read_all().to_pylist()
    columns = [
        c["column_name"]
        for cat in objects
        for sch in cat["catalog_db_schemas"] or []
        for t in sch["db_schema_tables"] or []
        for c in t["table_columns"] or []
    ]
    assert "patient_id" in columns and "diagnosis" in columns


def test_get_table_schema(server):
    with connect(server, "analyst") as conn:
        schema = conn.adbc_get_table_schema("patients", db_schema_filter="hospital")
    assert schema.field("patient_id").type == pa.int64()
    assert schema.field("admitted").type == pa.date32()
    assert schema.field("zip").type == pa.string()


def test_forbidden_table_fails_like_a_missing_one(server):
    with connect(server, "analyst") as conn, conn.cursor() as cur:
        with pytest.raises(adbc_driver_manager.Error) as forbidden:
            cur.execute("SELECT count(*) FROM hospital.staff")
        with pytest.raises(adbc_driver_manager.Error) as missing:
            cur.execute("SELECT count(*) FROM hospital.nosuch")
    f, m = str(forbidden.value), str(missing.value)
    assert "not found" in f and "not found" in m
    assert f.replace("staff", "X") == m.replace("nosuch", "X")
    with pytest.raises(adbc_driver_manager.Error):
        with connect(server, "analyst") as conn:
            conn.adbc_get_table_schema("staff", db_schema_filter="hospital")


@pytest.mark.parametrize(
    "sql",
    [
        "DROP TABLE hospital.patients",
        "INSERT INTO hospital.patients SELECT * FROM hospital.patients",
        "SET datafusion.execution.batch_size = 1",
        "COPY hospital.patients TO '/tmp/out.csv'",
        "CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'",
    ],
)
def test_refusals_carry_their_code(server, sql):
    with connect(server, "owner") as conn, conn.cursor() as cur:
        with pytest.raises(adbc_driver_manager.Error) as err:
            cur.execute(sql)
        assert "[STATEMENT_NOT_ALLOWED]" in str(err.value)
        # The connection still works.
        cur.execute("SELECT 1 AS one")
        assert cur.fetchone() == (1,)


def test_explain_is_refused_for_the_analyst(server):
    with connect(server, "analyst") as conn, conn.cursor() as cur:
        with pytest.raises(adbc_driver_manager.Error) as err:
            cur.execute("EXPLAIN ANALYZE SELECT ward, count(*) FROM hospital.patients GROUP BY ward")
        assert "[EXPLAIN_NOT_ALLOWED]" in str(err.value)


def test_wrong_password_is_refused(server):
    with pytest.raises(adbc_driver_manager.Error) as err:
        with connect(server, "analyst", "wrong") as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
    assert "nauthenticated" in str(err.value) or "UNAUTHENTICATED" in str(err.value)


def test_syntax_error_is_invalid_argument(server):
    with connect(server, "analyst") as conn, conn.cursor() as cur:
        with pytest.raises(adbc_driver_manager.Error) as err:
            cur.execute("SELEC 1")
        assert "INVALID_ARGUMENT" in str(err.value) or "InvalidArgument" in str(err.value) or "SQL error" in str(err.value)


EPSILON = "adbc.flight.sql.rpc.call_header.airlock-epsilon"


def test_differential_privacy_through_the_adbc_driver(tmp_path):
    """hospital.claims is in DP mode: the ε travels as the ``airlock-epsilon`` call header
    (an ADBC option); answers carry ``_ci95`` columns; the identical query is answered
    identically and for free; the budget (ε = 10) runs out with BUDGET_EXHAUSTED."""
    from conftest import start_server

    srv = start_server(tmp_path / "state", patients=2000, console=False)
    try:
        kwargs = {"username": "analyst", "password": "analyst", EPSILON: "0.5"}
        with flightsql.connect(srv.uri, db_kwargs=kwargs) as conn, conn.cursor() as cur:
            sql = "SELECT kind, count(*) AS n FROM hospital.claims GROUP BY kind ORDER BY kind"
            cur.execute(sql)
            first = cur.fetch_arrow_table()
            assert first.column_names == ["kind", "n", "n_ci95"]
            assert all(ci > 0 for ci in first.column("n_ci95").to_pylist())
            cur.execute(sql)
            assert cur.fetch_arrow_table().equals(first), "a repeat gets the same noise"
            answered, refusal = 1, None
            for i in range(40):
                try:
                    cur.execute(f"SELECT count(*) FROM hospital.claims WHERE amount > {i}")
                    cur.fetch_arrow_table()
                    answered += 1
                except adbc_driver_manager.Error as e:
                    refusal = str(e)
                    break
            assert answered == 20, "ε = 10 pays for twenty queries at ε = 0.5"
            assert refusal is not None and "[BUDGET_EXHAUSTED]" in refusal
            assert "remaining ε=0" in refusal
        over = {"username": "analyst", "password": "analyst", EPSILON: "5"}
        with flightsql.connect(srv.uri, db_kwargs=over) as conn, conn.cursor() as cur:
            with pytest.raises(adbc_driver_manager.Error) as err:
                # The charge (and this refusal) comes with the data, at the first fetch.
                cur.execute("SELECT count(*) FROM hospital.claims")
                cur.fetch_arrow_table()
            assert "[DP_NOT_SUPPORTED]" in str(err.value)
    finally:
        srv.proc.terminate()
        srv.proc.wait(timeout=10)
