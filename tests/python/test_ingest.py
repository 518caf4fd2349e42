"""Owner uploads through ADBC bulk ingest: the analyst can aggregate them, not read them."""

from __future__ import annotations

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import pyarrow as pa
import pytest


def connect(server, user):
    return flightsql.connect(server.uri, db_kwargs={"username": user, "password": user})


def lab_results(n=60):
    return pa.table(
        {
            "sample_id": pa.array(range(n), pa.int64()),
            "test": pa.array(["glucose" if i % 3 else "ferritin" for i in range(n)]),
            "value": pa.array([float(i % 17) for i in range(n)]),
        }
    )


def test_owner_ingests_and_analyst_aggregates_but_cannot_read(server):
    with connect(server, "owner") as conn, conn.cursor() as cur:
        rows = cur.adbc_ingest("lab_results", lab_results(), mode="create", db_schema_name="uploads")
        assert rows in (60, -1)
        cur.execute("SELECT count(*) FROM uploads.lab_results")
        assert cur.fetchone() == (60,)
        # Append adds rows; create again is refused.
        cur.adbc_ingest("lab_results", lab_results(6), mode="append", db_schema_name="uploads")
        cur.execute("SELECT count(*) FROM uploads.lab_results")
        assert cur.fetchone() == (66,)
        with pytest.raises(adbc_driver_manager.Error):
            cur.adbc_ingest("lab_results", lab_results(), mode="create", db_schema_name="uploads")

    with connect(server, "analyst") as conn, conn.cursor() as cur:
        cur.execute("SELECT test, count(*) AS n, avg(value) FROM uploads.lab_results GROUP BY test ORDER BY test")
        got = cur.fetchall()
        assert [(t, n) for t, n, _ in got] == [("ferritin", 22), ("glucose", 44)]
        with pytest.raises(adbc_driver_manager.Error) as err:
            cur.execute("SELECT * FROM uploads.lab_results")
        assert "[APPROVAL_PENDING]" in str(err.value) and "AGGREGATE_REQUIRED" in str(err.value)
        # Nobody but an admin of the table can upload.
        with pytest.raises(adbc_driver_manager.Error) as err:
            cur.adbc_ingest("mine", lab_results(), mode="create", db_schema_name="uploads")
        assert "[WRITE_NOT_ALLOWED]" in str(err.value)


def test_configured_datasets_cannot_be_overwritten(server):
    with connect(server, "owner") as conn, conn.cursor() as cur:
        with pytest.raises(adbc_driver_manager.Error) as err:
            cur.adbc_ingest("patients", lab_results(), mode="replace", db_schema_name="hospital")
        assert "[WRITE_NOT_ALLOWED]" in str(err.value)
